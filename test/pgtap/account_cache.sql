-- account_cache: the trigger that keeps every backend's account cache exact
-- (src/ingest_accounts.c) is there on every event that can remove an
-- account, enabled always; an account deleted or renamed earlier in the
-- transaction is refused by every ingest path with 23503.  The cache
-- across sessions is tested by test/isolation/specs/account_cache.spec.
BEGIN;
SELECT plan(8);

SELECT is((SELECT tgenabled FROM pg_trigger
            WHERE tgrelid = 'billing.accounts'::regclass AND tgname = 'accounts_changed'),
          'A', 'accounts_changed is enabled always (no session_replication_role skips it)');
SELECT is((SELECT pg_get_triggerdef(oid) FROM pg_trigger
            WHERE tgrelid = 'billing.accounts'::regclass AND tgname = 'accounts_changed'),
          'CREATE TRIGGER accounts_changed AFTER DELETE OR UPDATE OR TRUNCATE ON billing.accounts FOR EACH STATEMENT EXECUTE FUNCTION billing._accounts_changed()',
          'accounts_changed fires after every UPDATE, DELETE and TRUNCATE');

INSERT INTO billing.accounts (account_id) VALUES (7301), (7302), (7303);
INSERT INTO billing.meters (meter, late_window) VALUES ('cache_m', '100 years');
CREATE TABLE pg_temp.cache_t (account_id bigint, meter text, quantity numeric, ts timestamptz);
SELECT billing.meter_table('pg_temp.cache_t', 'account_id', 'meter', 'quantity', 'ts');

SELECT is((SELECT accepted FROM billing.ingest('cache', 0, 1, ARRAY[7301, 7302, 7303]::bigint[],
                                               ARRAY['cache_m', 'cache_m', 'cache_m'],
                                               ARRAY[1, 2, 3]::numeric[],
                                               array_fill(timestamptz '2025-03-12 09:00+00', ARRAY[3]))),
          3, 'a batch for three accounts');
SELECT ok(billing.record(7301, 'cache_m', 1, '2025-03-12 09:00+00'), 'record() for one of them');

DELETE FROM billing.accounts WHERE account_id = 7302;
SELECT throws_ok($$SELECT * FROM billing.ingest('cache', 0, 2, ARRAY[7301, 7302]::bigint[],
                                                ARRAY['cache_m', 'cache_m'], ARRAY[1, 1]::numeric[],
                                                array_fill(timestamptz '2025-03-12 09:00+00', ARRAY[2]))$$,
                 '23503', 'account 7302 does not exist', 'ingest() after the account was deleted');
UPDATE billing.accounts SET account_id = 7304 WHERE account_id = 7301;
SELECT throws_ok($$SELECT billing.record(7301, 'cache_m', 1, '2025-03-12 09:00+00')$$,
                 '23503', 'account 7301 does not exist', 'record() after the account was renamed');
SELECT throws_ok($$INSERT INTO pg_temp.cache_t VALUES (7304, 'cache_m', 1, '2025-03-12 09:00+00'),
                                                      (7301, 'cache_m', 1, '2025-03-12 09:00+00')$$,
                 '23503', 'account 7301 does not exist', 'a metered INSERT after the account was renamed');
SELECT is((SELECT accepted FROM billing.ingest('cache', 0, 3, ARRAY[7303, 7304]::bigint[],
                                               ARRAY['cache_m', 'cache_m'], ARRAY[1, 1]::numeric[],
                                               array_fill(timestamptz '2025-03-12 09:00+00', ARRAY[2]))),
          2, 'the accounts that remain are counted');

SELECT * FROM finish();
ROLLBACK;
