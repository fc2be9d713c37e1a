-- compact_index: compaction writes usage_days straight into its heap and
-- primary key (src/compact_write.c).  A row it updates keeps its key, so
-- when the primary key is the only index its new entry goes in without the
-- unique check; with another index on the table, every entry goes through
-- the executor's checks.  Either way the index must stay whole: amcheck
-- finds every heap row in it, lookups through it find every row, and no key
-- appears twice.  usage_days leaves half of each page free (fillfactor
-- 50), so a compaction that rewrites every row of a page keeps the new
-- versions on it, heap-only, with no index entry; with full pages
-- (fillfactor 100, set here) the updates leave their page, which is the
-- path under test.
BEGIN;
SELECT plan(12);

CREATE EXTENSION IF NOT EXISTS amcheck;
INSERT INTO billing.accounts (account_id) SELECT 8800 + a FROM generate_series(1, 2000) a;
INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window) VALUES
    ('ci_sum', 'sum', '1 hour', '100 years'),
    ('ci_max', 'max', '1 hour', '100 years'),
    ('ci_last', 'last', '1 hour', '100 years');
CREATE TABLE pg_temp.ci_u (account_id bigint, meter text, quantity numeric, ts timestamptz);
SELECT billing.meter_table('pg_temp.ci_u', 'account_id', 'meter', 'quantity', 'ts', keep_rows => false);

-- load n: every account and meter, in two hours of 2025-05-05
CREATE FUNCTION pg_temp.load(n int) RETURNS void LANGUAGE sql AS $$
    INSERT INTO pg_temp.ci_u
    SELECT 8800 + a, m, a % 17 + n, timestamptz '2025-05-05 10:00+00' + (a % 2 + n) * interval '1 hour'
      FROM generate_series(1, 2000) a, unnest(ARRAY['ci_sum', 'ci_max', 'ci_last']) m $$;
-- the index holds each heap row once, and finds every row by its key
CREATE FUNCTION pg_temp.index_whole() RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    seq bigint;
    idx bigint;
BEGIN
    PERFORM bt_index_parent_check('billing.usage_days_pkey'::regclass, true, true);
    SELECT count(*) INTO seq FROM billing.usage_days WHERE account_id BETWEEN 8801 AND 10800;
    SET LOCAL enable_seqscan = off;
    SET LOCAL enable_bitmapscan = off;
    SELECT count(*) INTO idx FROM billing.usage_days u
     WHERE u.account_id BETWEEN 8801 AND 10800
       AND EXISTS (SELECT FROM billing.usage_days k
                    WHERE k.account_id = u.account_id AND k.meter = u.meter
                      AND k.day = u.day AND k.dimension = u.dimension AND k.ctid = u.ctid);
    RESET enable_seqscan;
    RESET enable_bitmapscan;
    RETURN format('%s rows, %s found by key', seq, idx);
END $$;
-- the usage of the test's accounts, as one value
CREATE FUNCTION pg_temp.usage_sum() RETURNS text LANGUAGE sql AS $$
    SELECT format('%s %s', sum(quantity), sum(events)) FROM billing.usage_cells
     WHERE account_id BETWEEN 8801 AND 10800 $$;
CREATE FUNCTION pg_temp.moved_updates() RETURNS bigint LANGUAGE sql AS $$
    SELECT pg_stat_get_xact_tuples_updated('billing.usage_days'::regclass)
           - pg_stat_get_xact_tuples_hot_updated('billing.usage_days'::regclass) $$;

-- the default: a full rewrite stays on its pages
SELECT pg_temp.load(0);
SELECT ok(billing.compact_usage() >= 6000, 'fillfactor 50: a first load compacted');
SELECT pg_temp.load(1);
SELECT billing.compact_usage() >= 6000 AS merged \gset
SELECT cmp_ok(pg_stat_get_xact_tuples_hot_updated('billing.usage_days'::regclass), '>=', 5400::bigint,
              'a second load (rows growing by a cell) rewrites 90% of the rows or more heap-only, without an index entry');
DELETE FROM billing.usage_days WHERE account_id BETWEEN 8801 AND 10800;

ALTER TABLE billing.usage_days SET (fillfactor = 100);
SELECT pg_temp.load(0);
SELECT ok(billing.compact_usage() >= 6000, 'fillfactor 100: a first load compacted: 6,000 new rows');
SELECT pg_temp.load(1);
SELECT pg_temp.usage_sum() AS before \gset
SELECT ok(billing.compact_usage() >= 6000, 'a second load merged into every row');
SELECT cmp_ok(pg_temp.moved_updates(), '>', 3000::bigint,
              'most updates leave their full page (not heap-only)');
SELECT is(pg_temp.index_whole(), '6000 rows, 6000 found by key',
          'the primary key holds every row once and finds it (amcheck, index lookups)');
SELECT is((SELECT count(*) FROM (SELECT account_id, meter, day, dimension FROM billing.usage_days
                                  GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) d),
          0::bigint, 'no key twice');
SELECT is(pg_temp.usage_sum(), :'before', 'usage is what it was before compaction');

-- another index on usage_days: entries through the executor's checks
CREATE INDEX ci_extra ON billing.usage_days (meter, day);
SELECT pg_temp.load(2);
SELECT pg_temp.usage_sum() AS before \gset
SELECT ok(billing.compact_usage() >= 6000, 'with another index, a third load merged');
SELECT is(pg_temp.index_whole(), '6000 rows, 6000 found by key', 'the primary key still whole');
SELECT lives_ok($$SELECT bt_index_parent_check('billing.ci_extra'::regclass, true, true)$$,
                'and the other index holds every row');
SELECT is(pg_temp.usage_sum(), :'before', 'usage is what it was before compaction');

SELECT * FROM finish();
ROLLBACK;
