-- read_only: nothing billing writes straight into a heap (delta rows of
-- every ingest path, compaction) gets past a read-only transaction, which
-- the executor would refuse for SQL writes.  A metered temporary table may
-- take rows in a read-only transaction (PostgreSQL allows that for
-- temporary tables); the usage it counts may not be written.  Every case
-- raises 25006 and writes nothing.
BEGIN;
SELECT plan(7);

INSERT INTO billing.accounts (account_id) VALUES (7501);
INSERT INTO billing.meters (meter, late_window) VALUES ('ro_m', '100 years');
CREATE TABLE pg_temp.ro_t (account_id bigint, meter text, quantity numeric, ts timestamptz);
SELECT billing.meter_table('pg_temp.ro_t', 'account_id', 'meter', 'quantity', 'ts', keep_rows => false);
CREATE TABLE pg_temp.ro_kept (account_id bigint, meter text, quantity numeric, ts timestamptz);
SELECT billing.meter_table('pg_temp.ro_kept', 'account_id', 'meter', 'quantity', 'ts');

SET LOCAL transaction_read_only = on;

SELECT throws_ok($$SELECT billing.record(7501, 'ro_m', 1, '2025-03-12 09:00+00')$$,
                 '25006', 'cannot execute a usage write in a read-only transaction',
                 'record() in a read-only transaction: 25006');
SELECT throws_ok($$SELECT * FROM billing.ingest('ro', 0, 1, ARRAY[7501]::bigint[], ARRAY['ro_m'],
                                                ARRAY[1]::numeric[], ARRAY[timestamptz '2025-03-12 09:00+00'])$$,
                 '25006', NULL, 'ingest(): 25006 (its offsets or its usage)');
SELECT throws_ok($$INSERT INTO pg_temp.ro_t VALUES (7501, 'ro_m', 1, '2025-03-12 09:00+00')$$,
                 '25006', 'cannot execute a usage write in a read-only transaction',
                 'an INSERT into a metered temporary table that keeps no rows: 25006');
SELECT throws_ok($$INSERT INTO pg_temp.ro_kept VALUES (7501, 'ro_m', 1, '2025-03-12 09:00+00')$$,
                 '25006', 'cannot execute a usage write in a read-only transaction',
                 'one that keeps its rows: 25006');
SELECT throws_ok($$COPY pg_temp.ro_t FROM PROGRAM 'printf "7501\tro_m\t1\t2025-03-12 09:00+00\n"'$$,
                 '25006', 'cannot execute a usage write in a read-only transaction',
                 'a COPY into it (counted by the COPY hook): 25006');
SELECT throws_ok($$SELECT billing.compact_usage()$$,
                 '25006', 'cannot execute compact_usage() in a read-only transaction',
                 'compact_usage(): 25006');
SELECT is((SELECT count(*) FROM billing.usage_deltas WHERE account_id = 7501), 0::bigint,
          'nothing was written');

SELECT * FROM finish();
ROLLBACK;
