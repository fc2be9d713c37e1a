-- Dimensions and event ids are index keys: over-long ones are refused with
-- 22023 before anything is counted (a dimension too long to index would
-- otherwise make every later compact_usage() fail).  (Reports are stamped
-- now(), the meter's default window; only errors and counts are checked.)
BEGIN;
SELECT plan(6);
INSERT INTO billing.meters (meter) VALUES ('lim_m');
INSERT INTO billing.accounts (account_id) VALUES (9901);

SELECT throws_ok($$SELECT billing.record(9901, 'lim_m', 1, now(), NULL, repeat('d', 257))$$,
                 '22023', 'usage dimension is too long', 'a 257-byte dimension is refused');
SELECT lives_ok($$SELECT billing.record(9901, 'lim_m', 1, now(), NULL, repeat('d', 256))$$,
                'a 256-byte dimension is counted');
SELECT throws_ok($$SELECT billing.record(9901, 'lim_m', 1, now(), repeat('e', 513))$$,
                 '22023', 'event id is too long', 'a 513-byte event id is refused');
SELECT throws_ok($$SELECT * FROM billing.ingest('lim', 0, 1, ARRAY[9901], ARRAY['lim_m'], ARRAY[1],
                                                 ARRAY[now()], NULL, ARRAY[repeat('d', 300)])$$,
                 '22023', 'usage dimension is too long', 'ingest refuses it too');
SELECT throws_ok($$SELECT billing.correct_usage(9901, 'lim_m', date_trunc('minute', now()), 1, 'fix',
                                                 repeat('d', 257))$$,
                 '22023', 'usage dimension is too long', 'and correct_usage');
SELECT cmp_ok(billing.compact_usage(), '>=', 1::bigint, 'compaction still works');
SELECT * FROM finish();
ROLLBACK;
