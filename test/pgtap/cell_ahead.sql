-- cell_ahead: a report is added to its counter cell ACC_AHEAD (8) reports
-- after it arrives (src/ingest.h, AccAhead), a numeric quantity at once.
-- Whatever the batch size around 8, and with flushes in the middle of a
-- COPY, every report is counted once: sum, count, max and last meters,
-- quantities that are 128-bit decimals and numerics (above 10^40) mixed
-- in the same cells, against a GROUP BY of the reports.
BEGIN;
SELECT plan(9);
\ir ../helpers.sql
SET LOCAL timezone = 'UTC';

INSERT INTO billing.accounts (account_id) SELECT 7800 + a FROM generate_series(1, 30) a;
INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window) VALUES
    ('ca_sum', 'sum', '1 minute', '100 years'), ('ca_cnt', 'count', '1 minute', '100 years'),
    ('ca_max', 'max', '1 minute', '100 years'), ('ca_last', 'last', '1 minute', '100 years');

-- 2,940 reports in arrival order n: 30 accounts, 4 meters, 20 minutes;
-- every 11th quantity a numeric beyond the 128-bit decimal; the last
-- meter's timestamps distinct within a cell, so its value is the latest
CREATE TEMP TABLE ca_raw AS
SELECT n, 7801 + (n * 7) % 30 AS account_id,
       (ARRAY['ca_sum', 'ca_cnt', 'ca_max', 'ca_last'])[1 + (n * 13) % 4] AS meter,
       CASE WHEN n % 11 = 0 THEN 10::numeric ^ 45 + n
            WHEN n % 5 = 0 THEN n / 8.0
            ELSE (n * 31) % 97 END AS quantity,
       timestamptz '2025-03-12 08:00+00' + ((n * 17) % 1200) * interval '1 second'
           + n * interval '1 microsecond' AS ts
  FROM generate_series(1, 2940) n;

-- the cells the reports make
CREATE TEMP TABLE ca_truth AS
SELECT account_id, meter, date_trunc('minute', ts) AS bucket_start,
       CASE meter WHEN 'ca_sum' THEN sum(quantity)
                  WHEN 'ca_cnt' THEN count(*)::numeric
                  WHEN 'ca_max' THEN max(quantity)
                  ELSE (array_agg(quantity ORDER BY ts DESC, n DESC))[1] END AS quantity,
       count(*) AS events
  FROM ca_raw GROUP BY 1, 2, 3;
CREATE FUNCTION pg_temp.counted() RETURNS TABLE (account_id bigint, meter text,
                                                 bucket_start timestamptz, quantity numeric,
                                                 events bigint)
    LANGUAGE sql AS $$
    SELECT a, u.meter, u.bucket_start, u.quantity, u.events
      FROM generate_series(7801, 7830) a,
           billing.usage(a, '2025-03-12 08:00+00', '2025-03-12 09:00+00') u $$;
CREATE FUNCTION pg_temp.mismatches() RETURNS bigint LANGUAGE sql AS $$
    SELECT count(*) FROM ((SELECT * FROM pg_temp.counted() EXCEPT ALL SELECT * FROM ca_truth)
                          UNION ALL
                          (SELECT * FROM ca_truth EXCEPT ALL SELECT * FROM pg_temp.counted())) d $$;

SELECT cmp_ok((SELECT count(*) FROM ca_truth WHERE quantity > 10::numeric ^ 40
                                              AND events > 1 AND meter <> 'ca_cnt'), '>', 100::bigint,
              'the data: cells holding numerics beyond the decimal among other reports');

-- 1. a metered COPY whose cells outgrow work_mem: flushed in the middle
CREATE TEMP TABLE ca_t (account_id bigint, meter text, quantity numeric, ts timestamptz);
SELECT billing.meter_table('pg_temp.ca_t', 'account_id', 'meter', 'quantity', 'ts', keep_rows => false);
SELECT format('/tmp/billing_cell_ahead_%s.tsv', pg_backend_pid()) AS ca_file \gset
SELECT format('COPY (SELECT account_id, meter, quantity, ts FROM ca_raw ORDER BY n) TO %L', :'ca_file') AS copy_out \gset
SELECT format('COPY pg_temp.ca_t FROM %L', :'ca_file') AS copy_in \gset
:copy_out;
SAVEPOINT s;
SET LOCAL work_mem = '64kB';
SELECT is(test.delta_parts(7801, 7830), 0::bigint, 'nothing counted before the COPY');
:copy_in;
SELECT cmp_ok(test.delta_parts(7801, 7830), '>', 30::bigint,
              'the COPY flushed its cells in the middle (more than a delta row per account)');
SELECT is(pg_temp.mismatches(), 0::bigint, 'the COPY counted every report once');
SELECT billing.compact_usage();
SELECT is(pg_temp.mismatches(), 0::bigint, 'and so reads the compacted store');
ROLLBACK TO SAVEPOINT s;

-- 2. ingest() batches of 1, 7, 8, 9 and 17 reports in turn (around ACC_AHEAD)
SAVEPOINT s;
CREATE TEMP TABLE ca_batch AS
SELECT n, b FROM (
    SELECT n, sum(CASE WHEN pos = 0 THEN 1 ELSE 0 END) OVER (ORDER BY n) AS b
      FROM (SELECT n, (n - 1) % 42 AS r FROM ca_raw) x,
           LATERAL (SELECT CASE WHEN r IN (0, 1, 8, 16, 25) THEN 0 ELSE 1 END AS pos) p) y;
SELECT is((SELECT array_agg(DISTINCT c ORDER BY c) FROM (SELECT count(*) AS c FROM ca_batch GROUP BY b) z),
          '{1,7,8,9,17}'::bigint[], 'batches of 1, 7, 8, 9 and 17 reports');
DO $$
DECLARE
    x record;
BEGIN
    FOR x IN SELECT b, array_agg(r.account_id ORDER BY r.n) AS a, array_agg(r.meter ORDER BY r.n) AS m,
                    array_agg(r.quantity ORDER BY r.n) AS q, array_agg(r.ts ORDER BY r.n) AS t
               FROM ca_raw r JOIN ca_batch USING (n) GROUP BY b ORDER BY b LOOP
        PERFORM billing.ingest('cell_ahead', 1, x.b, x.a, x.m, x.q, x.t);
    END LOOP;
END $$;
SELECT is(pg_temp.mismatches(), 0::bigint, 'ingest() counted every report once');
ROLLBACK TO SAVEPOINT s;

-- 3. record(), one report a statement, and the rows of one INSERT
SAVEPOINT s;
SELECT count(*) FROM ca_raw r, billing.record(r.account_id, r.meter, r.quantity, r.ts) WHERE r.n <= 1470;
INSERT INTO pg_temp.ca_t SELECT account_id, meter, quantity, ts FROM ca_raw WHERE n > 1470 ORDER BY n;
SELECT is(pg_temp.mismatches(), 0::bigint, 'record() and an INSERT counted every report once');
ROLLBACK TO SAVEPOINT s;

SELECT is(test.delta_parts(7801, 7830), 0::bigint, 'each path rolled back');

SELECT format('COPY (SELECT) TO PROGRAM %L', 'rm -f ' || :'ca_file') AS rm_sql \gset
:rm_sql;

SELECT * FROM finish();
ROLLBACK;
