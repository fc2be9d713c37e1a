-- store: the packed store billing.usage_days (issue 16: src/store.c, src/compact.c)
-- read through every path equals a brute force over the raw reports, kept
-- apart in a table of the test: usage() at raw grain and rolled up by hour,
-- day and month, usage() over 200 ranges cut at any second (only the days
-- a range meets are read, billing._cells_in), and the period totals rating
-- reads (_usage_totals_many, with a dimension charged apart), for sum,
-- count, max and last meters with dimensions; with deltas only, compacted,
-- compacted plus new deltas, compacted twice (merged into existing rows)
-- and compacted in several batches; quantities keep their display scale
-- and values beyond the fixed-point range round-trip.
BEGIN;
SELECT plan(42);
\ir ../helpers.sql
SELECT setseed(0.1616);
SET LOCAL timezone = 'UTC';

INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('st_sum', 'sum', '100 years'), ('st_cnt', 'count', '100 years'),
    ('st_max', 'max', '100 years'), ('st_last', 'last', '100 years'),
    ('st_big', 'sum', '100 years');
INSERT INTO billing.accounts (account_id) SELECT generate_series(7601, 7603);

CREATE TEMP TABLE base AS SELECT timestamptz '2025-05-30 00:00+00' AS t0;
-- the raw reports, in arrival order
CREATE TEMP TABLE ev (id serial, account_id bigint, meter text, dim text, q numeric, ts timestamptz);

-- n random reports over four days (crossing a month), sent in id order
CREATE FUNCTION pg_temp.send(n integer) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    r record;
    first integer := (SELECT coalesce(max(id), 0) FROM ev);
BEGIN
    INSERT INTO ev (account_id, meter, dim, q, ts)
    SELECT 7601 + (random() * 2)::int,
           (ARRAY['st_sum', 'st_cnt', 'st_max', 'st_last'])[1 + (random() * 3)::int],
           (ARRAY['', 'a', 'b'])[1 + (random() * 2)::int],
           round((random() * 100)::numeric, (random() * 3)::int),
           (SELECT t0 FROM base) + interval '1 second' * floor(random() * 4 * 86400 / 7) * 7
      FROM generate_series(1, n);
    FOR r IN SELECT * FROM ev WHERE id > first ORDER BY id LOOP
        PERFORM billing.record(r.account_id, r.meter, r.q, r.ts, NULL, r.dim);
    END LOOP;
END
$$;

-- the raw reports of a bucket width folded by the meter's rule
CREATE FUNCTION pg_temp.brute(grain interval) RETURNS TABLE (account_id bigint, meter text, dimension text,
                                                           bucket_start timestamptz, quantity numeric, events bigint)
LANGUAGE sql AS $$
    SELECT e.account_id, e.meter, e.dim, billing._bin(grain, billing._bin('1 minute', e.ts)),
           CASE e.meter
               WHEN 'st_cnt' THEN count(*)::numeric
               WHEN 'st_max' THEN max(e.q)
               WHEN 'st_last' THEN (array_agg(e.q ORDER BY e.ts DESC, e.id DESC))[1]
               ELSE sum(e.q) END,
           count(*)
      FROM ev e
     GROUP BY 1, 2, 3, 4
$$;
-- what usage() reads for the three accounts
CREATE FUNCTION pg_temp.read(grain interval) RETURNS TABLE (account_id bigint, meter text, dimension text,
                                                          bucket_start timestamptz, quantity numeric, events bigint)
LANGUAGE sql AS $$
    SELECT a, u.meter, u.dimension, u.bucket_start, u.quantity, u.events
      FROM generate_series(7601::bigint, 7603) a,
           billing.usage(a, '2025-05-01', '2025-07-01', grain) u
     WHERE u.meter LIKE 'st\_%'
$$;

-- periods: random minutes and seconds, whole hours, whole days
CREATE TEMP TABLE periods AS
SELECT i, 7601 + (random() * 2)::int AS account_id, ps, ps + len AS pe
  FROM (SELECT i,
               CASE i % 3
                   WHEN 0 THEN t0 + interval '1 second' * floor(random() * 4 * 86400)
                   WHEN 1 THEN t0 + interval '1 hour' * floor(random() * 96)
                   ELSE t0 + interval '1 day' * floor(random() * 4) END AS ps,
               CASE i % 4
                   WHEN 0 THEN interval '1 minute' * (1 + floor(random() * 180))
                   WHEN 1 THEN interval '1 hour' * (1 + floor(random() * 50))
                   WHEN 2 THEN interval '1 day' * (1 + floor(random() * 3))
                   ELSE interval '1 second' * (1 + floor(random() * 5 * 86400)) END AS len
          FROM base, generate_series(1, 200) AS i) x;

-- the totals rating reads (dimension 'a' of st_sum charged apart), and the brute force
CREATE FUNCTION pg_temp.totals() RETURNS TABLE (i integer, meter text, dimension text, quantity numeric)
LANGUAGE sql AS $$
    SELECT x.ids[t.idx], t.meter, t.dimension, t.quantity
      FROM (SELECT array_agg(account_id ORDER BY i) AS a, array_agg(ps ORDER BY i) AS s,
                   array_agg(pe ORDER BY i) AS e, array_agg(i ORDER BY i) AS ids FROM periods) x,
           billing._usage_totals_many(x.a, x.s, x.e,
                                      ARRAY(SELECT i FROM periods ORDER BY i),
                                      ARRAY(SELECT 'st_sum' FROM periods ORDER BY i),
                                      ARRAY(SELECT 'a' FROM periods ORDER BY i)) t
     WHERE t.meter LIKE 'st\_%'
$$;
CREATE FUNCTION pg_temp.brute_totals() RETURNS TABLE (i integer, meter text, dimension text, quantity numeric)
LANGUAGE sql AS $$
    SELECT p.i, e.meter, CASE WHEN e.meter = 'st_sum' AND e.dim = 'a' THEN 'a' END,
           CASE e.meter
               WHEN 'st_cnt' THEN count(*)::numeric
               WHEN 'st_max' THEN max(e.q)
               WHEN 'st_last' THEN (array_agg(e.q ORDER BY e.ts DESC, e.id DESC))[1]
               ELSE sum(e.q) END
      FROM periods p JOIN ev e ON e.account_id = p.account_id
       AND billing._bin('1 minute', e.ts) >= p.ps AND billing._bin('1 minute', e.ts) < p.pe
     GROUP BY p.i, e.meter, 3
$$;

-- usage() over the periods (any second to any second: the days of the
-- store at their edges are cut), against the raw reports
CREATE FUNCTION pg_temp.read_ranges() RETURNS TABLE (i integer, meter text, dimension text,
                                                     bucket_start timestamptz, quantity numeric, events bigint)
LANGUAGE sql AS $$
    SELECT p.i, u.meter, u.dimension, u.bucket_start, u.quantity, u.events
      FROM periods p, billing.usage(p.account_id, p.ps, p.pe) u
     WHERE u.meter LIKE 'st\_%'
$$;
CREATE FUNCTION pg_temp.brute_ranges() RETURNS TABLE (i integer, meter text, dimension text,
                                                      bucket_start timestamptz, quantity numeric, events bigint)
LANGUAGE sql AS $$
    SELECT p.i, b.meter, b.dimension, b.bucket_start, b.quantity, b.events
      FROM periods p JOIN pg_temp.brute('1 minute') b
        ON b.account_id = p.account_id AND b.bucket_start >= p.ps AND b.bucket_start < p.pe
$$;

-- every read against its brute force: five assertions
CREATE FUNCTION pg_temp.check(what text) RETURNS SETOF text LANGUAGE plpgsql AS $$
BEGIN
    RETURN NEXT set_eq('SELECT * FROM pg_temp.read(NULL)', 'SELECT * FROM pg_temp.brute(''1 minute'')',
                       what || ': usage() at raw grain equals the raw reports');
    RETURN NEXT set_eq('SELECT * FROM pg_temp.read(''1 hour'')', 'SELECT * FROM pg_temp.brute(''1 hour'')',
                       what || ': usage() by hour');
    RETURN NEXT set_eq('SELECT * FROM pg_temp.read(''1 day'') UNION ALL SELECT * FROM pg_temp.read(''1 month'')',
                       'SELECT * FROM pg_temp.brute(''1 day'') UNION ALL SELECT * FROM pg_temp.brute(''1 month'')',
                       what || ': usage() by day and by month');
    RETURN NEXT set_eq('SELECT * FROM pg_temp.totals()', 'SELECT * FROM pg_temp.brute_totals()',
                       what || ': the period totals rating reads (a dimension apart)');
    RETURN NEXT set_eq('SELECT * FROM pg_temp.read_ranges()', 'SELECT * FROM pg_temp.brute_ranges()',
                       what || ': usage() of 200 ranges starting and ending at any second');
END
$$;

-- 1. deltas only
SELECT pg_temp.send(700);
SELECT ok((SELECT count(*) FROM pg_temp.brute_totals()) > 300, 'the periods hold usage of every kind');
SELECT * FROM pg_temp.check('deltas only');

-- 2. compacted
SELECT is(billing.compact_usage(), 700::bigint, 'compaction folds every delta cell');
SELECT is(test.delta_parts(7601, 7603), 0::bigint, 'no deltas left');
SELECT * FROM pg_temp.check('compacted');
SELECT is((SELECT count(*) FROM billing.usage_days WHERE account_id BETWEEN 7601 AND 7603),
          (SELECT count(DISTINCT (account_id, meter, dim, billing._bin('1 day', ts))) FROM ev),
          'one row per (account, meter, UTC day, dimension)');

-- 3. compacted plus new deltas, then compacted again (merged into the rows)
SELECT pg_temp.send(500);
SELECT * FROM pg_temp.check('compacted plus deltas');
-- the totals read an account's deltas through the index on account_id, in
-- C: no plan (the planner's settings, stale statistics) reads the whole
-- backlog of every account
SET LOCAL enable_indexscan = off;
SET LOCAL enable_bitmapscan = off;
CREATE TEMP TABLE scans_before AS
SELECT pg_stat_get_xact_numscans('billing.usage_deltas'::regclass) AS seq,
       pg_stat_get_xact_numscans('billing.usage_deltas_account'::regclass) AS idx;
SELECT count(*) FROM pg_temp.totals();
SELECT is(ARRAY[pg_stat_get_xact_numscans('billing.usage_deltas'::regclass) - (SELECT seq FROM scans_before),
                pg_stat_get_xact_numscans('billing.usage_deltas_account'::regclass) - (SELECT idx FROM scans_before)],
          ARRAY[0, 400]::bigint[],
          'the period totals take each period''s deltas by two index scans (the account''s rows, its block''s group rows), none sequential, with index scans disabled');
RESET enable_indexscan;
RESET enable_bitmapscan;
SELECT is(billing.compact_usage(), 500::bigint, 'the second compaction folds the new delta cells');
SELECT * FROM pg_temp.check('compacted twice');
SELECT is((SELECT sum(d.events)::bigint FROM billing.usage_days d WHERE account_id BETWEEN 7601 AND 7603),
          (SELECT count(*) FROM ev), 'the day totals count every report');

-- 4. a compaction in several batches (maintenance_work_mem 1MB): two rounds
-- of the same keys, the second merging into rows the first batch wrote
CREATE FUNCTION pg_temp.send_batch(round integer) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    first integer := (SELECT coalesce(max(id), 0) FROM ev);
BEGIN
    INSERT INTO ev (account_id, meter, dim, q, ts)
    SELECT 7601 + g % 3, (ARRAY['st_sum', 'st_cnt', 'st_max', 'st_last'])[1 + g / 3 % 4], '',
           (g % 7 + round)::numeric, (SELECT t0 FROM base) + interval '1 minute' * (g / 12)
      FROM generate_series(0, 12 * 3000 - 1) g;
    PERFORM billing.ingest('st_batch', round, 1,
                           array_agg(account_id ORDER BY id), array_agg(meter ORDER BY id),
                           array_agg(q ORDER BY id), array_agg(ts ORDER BY id),
                           NULL, array_agg(dim ORDER BY id))
       FROM ev WHERE id > first;
END
$$;
SELECT pg_temp.send_batch(1);
SELECT pg_temp.send_batch(2);
-- thousands of delta cells per period: the totals fold them in bounded memory
SELECT * FROM pg_temp.check('72,000 new reports in deltas');
SET LOCAL maintenance_work_mem = '1MB';
SELECT is(billing.compact_usage(), 72000::bigint, 'a compaction in several batches folds every delta cell');
RESET maintenance_work_mem;
SELECT * FROM pg_temp.check('compacted in several batches');

-- 5. display scale and values beyond the fixed point, compacted
SELECT billing.record(7603, 'st_big', 1.5, '2025-06-10 10:00:00+00');
SELECT billing.record(7603, 'st_big', 1.5, '2025-06-10 10:00:30+00');
SELECT billing.record(7603, 'st_big', 0.0000000000000000000000000000001, '2025-06-10 11:00:00+00');
SELECT billing.record(7603, 'st_big', 123456789012345678901234567890123456789, '2025-06-10 12:00:00+00');
SELECT billing.record(7603, 'st_big', 2.50, '2025-06-10 13:00:00+00');
SELECT billing.compact_usage();
SELECT is((SELECT array_agg(quantity::text ORDER BY bucket_start)
             FROM billing.usage(7603, '2025-06-10', '2025-06-11', NULL, 'st_big')),
          ARRAY['3.0', '0.0000000000000000000000000000001', '123456789012345678901234567890123456789', '2.5'],
          'compacted cells keep their value and display scale (1.5 + 1.5 is 3.0)');
SELECT is((SELECT quantity::text FROM billing.usage_days WHERE account_id = 7603 AND meter = 'st_big'),
          '123456789012345678901234567890123456794.5000000000000000000000000000001',
          'the day total too');
SELECT is((SELECT array_agg(t.quantity::text ORDER BY t.idx)
             FROM billing._usage_totals_many(ARRAY[7603, 7603, 7603]::bigint[],
                                             ARRAY['2025-06-10 09:00+00', '2025-06-10 10:00+00', '2025-06-10 10:00:30+00']::timestamptz[],
                                             ARRAY['2025-06-10 14:00+00', '2025-06-10 11:00:01+00', '2025-06-10 12:00:00+00']::timestamptz[]) t
            WHERE t.meter = 'st_big'),
          ARRAY['123456789012345678901234567890123456794.5000000000000000000000000000001',
                '3.0000000000000000000000000000001', '0.0000000000000000000000000000001'],
          'period totals cut inside a day add its cells exactly, at the largest display scale');
SELECT billing.record(7603, 'st_big', 99999999999999999999999999999999999999, '2025-06-10 15:00:00+00');
SELECT billing.record(7603, 'st_big', 99999999999999999999999999999999999999, '2025-06-10 16:00:00+00');
SELECT billing.record(7603, 'st_big', 0.5, '2025-06-10 17:00:00+00');
SELECT billing.compact_usage();
SELECT is((SELECT t.quantity::text
             FROM billing._usage_totals_many(ARRAY[7603]::bigint[], ARRAY['2025-06-10 14:30+00']::timestamptz[],
                                             ARRAY['2025-06-10 18:00+00']::timestamptz[]) t
            WHERE t.meter = 'st_big'),
          '199999999999999999999999999999999999998.5',
          'a sum of cells beyond 38 digits is exact');

SELECT * FROM finish();
ROLLBACK;
