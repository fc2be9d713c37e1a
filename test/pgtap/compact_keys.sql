-- compact_keys: compact_usage() reads the rows of usage_days that the keys
-- of a batch have already by those keys only, a slice of keys at a time
-- (issue 16, src/compact_merge.c): a late cell reads its own day's row, not
-- every day of the account between it and today; a batch of more keys than
-- a slice (4,096) merges each into its row exactly once.
BEGIN;
SELECT plan(6);
SET LOCAL timezone = 'UTC';
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('ck_late', 'sum', '100 years'), ('ck_many', 'sum', '100 years');
INSERT INTO billing.accounts (account_id) SELECT generate_series(7701, 7790);

-- 1. 40 accounts with 60 days each, compacted; then a batch of today's
-- cells of every account and one cell of one account 59 days back
SELECT billing.ingest('ck', 1, 1, array_agg(a::bigint), array_agg('ck_late'::text), array_agg(1::numeric),
                      array_agg(timestamptz '2025-01-01' + d * interval '1 day'))
  FROM generate_series(7701, 7740) a, generate_series(0, 59) d;
SELECT billing.compact_usage();
SELECT billing.ingest('ck', 2, 1, array_agg(a::bigint), array_agg('ck_late'::text), array_agg(2::numeric),
                      array_agg(timestamptz '2025-03-01 10:00'))
  FROM generate_series(7701, 7740) a;
SELECT billing.record(7701, 'ck_late', 5, '2025-01-01 10:00');
CREATE TEMP TABLE reads_before AS
SELECT pg_stat_get_xact_tuples_fetched('billing.usage_days'::regclass)
       + pg_stat_get_xact_tuples_returned('billing.usage_days'::regclass) AS n;
SELECT is(billing.compact_usage(), 41::bigint, 'the batch with a late cell folds its 41 cells');
SELECT cmp_ok(pg_stat_get_xact_tuples_fetched('billing.usage_days'::regclass)
              + pg_stat_get_xact_tuples_returned('billing.usage_days'::regclass) - (SELECT n FROM reads_before),
              '<=', 100::bigint,
              'it reads the rows of its own 41 keys, not the 2,400 days of its accounts between them');
SELECT is((SELECT array_agg(quantity::text ORDER BY day) FROM billing.usage_days
            WHERE account_id = 7701 AND meter = 'ck_late' AND day IN ('2025-01-01', '2025-03-01')),
          ARRAY['6', '3'], 'the late cell and today''s merged into their days'' rows');

-- 2. 5,000 keys (50 accounts, 100 days), compacted twice: the second
-- batch merges into 5,000 existing rows over two slices
SELECT billing.ingest('ck', 3, 1, array_agg(a::bigint), array_agg('ck_many'::text), array_agg(d::numeric),
                      array_agg(timestamptz '2025-01-01' + d * interval '1 day'))
  FROM generate_series(7741, 7790) a, generate_series(0, 99) d;
SELECT billing.compact_usage();
SELECT billing.ingest('ck', 4, 1, array_agg(a::bigint), array_agg('ck_many'::text), array_agg(1::numeric),
                      array_agg(timestamptz '2025-01-01 12:00' + d * interval '1 day'))
  FROM generate_series(7741, 7790) a, generate_series(0, 99) d;
SELECT is(billing.compact_usage(), 5000::bigint, 'a batch of 5,000 keys folds every cell');
SELECT is((SELECT count(*) FROM billing.usage_days WHERE meter = 'ck_many'), 5000::bigint,
          'one row per key: every key found its row, in whichever slice');
SELECT is((SELECT sum(quantity) FROM billing.usage_days WHERE meter = 'ck_many'),
          (SELECT 50 * sum(d + 1) FROM generate_series(0, 99) d)::numeric,
          'the day totals hold both loads');

SELECT * FROM finish();
ROLLBACK;
