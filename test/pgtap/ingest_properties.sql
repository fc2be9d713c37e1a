-- ingest_properties: a property test of exactly-once counting across every
-- ingest path.  5,000 random reports (seeded) over 4 accounts, 4 meters (one
-- per aggregation), 2 dimensions and 10 minutes, about 30% repeating the
-- (account, meter, event_id) of another report (with another quantity,
-- time and dimension) and about 10% without event id, are sent in order,
-- in chunks of 50, through record(), a metered table with keep_rows false,
-- one with keep_rows true and ingest() batches.  What usage() returns must
-- equal what SQL computes on its own: the first arrival of each
-- (account, meter, event_id) counts once, reports without id always count.
-- Last, one metered statement much larger than work_mem.
BEGIN;
SELECT plan(19);
\ir ../helpers.sql

CREATE TEMP TABLE params AS
SELECT timestamptz '2025-03-12 09:00+00' AS t0,   -- fixed: the meters accept 100 years late
       timestamptz '1970-01-01 00:00+00' AS epoch;

INSERT INTO billing.accounts (account_id) VALUES (8001), (8002), (8003), (8004);
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('prop_sum', 'sum', '100 years'), ('prop_count', 'count', '100 years'),
    ('prop_max', 'max', '100 years'), ('prop_last', 'last', '100 years');

-- the reports ----------------------------------------------------------------
SELECT setseed(0.3141);
CREATE TEMP TABLE gen AS
SELECT n, 8001 + floor(random() * 4)::int AS account_id,
       (ARRAY['prop_sum', 'prop_count', 'prop_max', 'prop_last'])[1 + floor(random() * 4)::int] AS meter,
       random() AS r_qty, random() AS r_ts, random() AS r_id, random() AS r_src, random() AS r_dim
  FROM generate_series(1, 5000) n;
-- reports with their own event id, numbered, for repeats to pick from
CREATE TEMP TABLE originals AS
SELECT row_number() OVER (ORDER BY n) AS k, n, account_id, meter, 'u' || n AS event_id
  FROM gen WHERE r_id >= 0.4;
-- r_id < 0.1: no event id; < 0.4: a repeat of an original (which may arrive
-- before or after it): half of them a near one (often in the same statement
-- or batch), half any one; else an id of its own
CREATE TEMP TABLE picks AS
SELECT g.n,
       CASE WHEN g.r_src < 0.5
            THEN greatest(1, least(t.total, g.before + floor((g.r_src * 2 - 0.5) * 40)::int))
            ELSE 1 + floor((g.r_src - 0.5) * 2 * t.total)::int END AS k
  FROM (SELECT gen.*, count(*) FILTER (WHERE r_id >= 0.4) OVER (ORDER BY n) AS before FROM gen) g,
       (SELECT count(*)::int AS total FROM originals) t
 WHERE g.r_id >= 0.1 AND g.r_id < 0.4;
CREATE TEMP TABLE reports AS
SELECT g.n,
       coalesce(o.account_id, g.account_id) AS account_id,
       coalesce(o.meter, g.meter) AS meter,
       CASE WHEN coalesce(o.meter, g.meter) IN ('prop_max', 'prop_last')
            THEN round((g.r_qty * 200 - 100)::numeric, 3)
            ELSE round((g.r_qty * 100)::numeric, 3) END AS qty,
       p.t0 + g.r_ts * interval '10 minutes' AS ts,
       CASE WHEN g.r_id < 0.1 THEN NULL WHEN g.r_id < 0.4 THEN o.event_id ELSE 'u' || g.n END AS event_id,
       CASE WHEN g.r_dim < 0.3 THEN 'eu' ELSE '' END AS dim,
       (g.n - 1) / 50 AS chunk,
       (ARRAY['record', 'stream', 'kept', 'ingest'])[1 + ((g.n - 1) / 50) % 4] AS path
  FROM gen g CROSS JOIN params p
  LEFT JOIN picks pk ON pk.n = g.n
  LEFT JOIN originals o ON o.k = pk.k;

SELECT is((SELECT count(*) FROM reports), 5000::bigint, '5,000 reports');
SELECT ok((SELECT avg(CASE WHEN event_id IS NOT NULL AND event_id <> 'u' || n THEN 1 ELSE 0 END)
             FROM reports) BETWEEN 0.27 AND 0.33,
          'about 30% of the reports repeat another one''s event id');

-- what must be counted: the first arrival of each key, and every report
-- without id
CREATE TEMP TABLE counted AS
SELECT * FROM (
    SELECT r.*, row_number() OVER (PARTITION BY account_id, meter, event_id ORDER BY n) AS arrival
      FROM reports r) x
 WHERE event_id IS NULL OR arrival = 1;
SELECT ok((SELECT count(*) FROM reports) - (SELECT count(*) FROM counted) > 1000,
          'more than 1,000 reports are duplicates');
SELECT ok((SELECT count(*) FROM reports r JOIN originals o ON o.event_id = r.event_id
            WHERE r.n <> o.n AND r.chunk = (o.n - 1) / 50) > 300,
          'more than 300 repeats are sent in the same statement or batch as their original');

-- the paths --------------------------------------------------------------------
CREATE TABLE prop_stream (n int, account_id bigint, meter text, qty numeric, ts timestamptz,
                          event_id text, dim text);
CREATE TABLE prop_kept (LIKE prop_stream);
SELECT billing.meter_table('prop_stream', 'account_id', 'meter', 'qty', 'ts', 'event_id', 'dim',
                           keep_rows => false);
SELECT billing.meter_table('prop_kept', 'account_id', 'meter', 'qty', 'ts', 'event_id', 'dim',
                           keep_rows => true);
CREATE TEMP TABLE record_results (n int, counted boolean);
CREATE TEMP TABLE ingest_results (chunk int, accepted int, duplicates int, already_applied boolean);

DO $$
DECLARE
    c int;
    p text;
    r record;
BEGIN
    FOR c, p IN SELECT DISTINCT chunk, path FROM reports ORDER BY chunk LOOP
        IF p = 'record' THEN
            FOR r IN SELECT * FROM reports WHERE chunk = c ORDER BY n LOOP
                INSERT INTO record_results
                VALUES (r.n, billing.record(r.account_id, r.meter, r.qty, r.ts, r.event_id, r.dim));
            END LOOP;
        ELSIF p = 'stream' THEN
            INSERT INTO prop_stream
            SELECT n, account_id, meter, qty, ts, event_id, dim FROM reports WHERE chunk = c ORDER BY n;
        ELSIF p = 'kept' THEN
            INSERT INTO prop_kept
            SELECT n, account_id, meter, qty, ts, event_id, dim FROM reports WHERE chunk = c ORDER BY n;
        ELSE
            INSERT INTO ingest_results
            SELECT c, i.*
              FROM (SELECT array_agg(account_id ORDER BY n) a, array_agg(meter ORDER BY n) m,
                           array_agg(qty ORDER BY n) q, array_agg(ts ORDER BY n) t,
                           array_agg(event_id ORDER BY n) e, array_agg(dim ORDER BY n) d
                      FROM reports WHERE chunk = c) b,
                   billing.ingest('prop', 0, c, b.a, b.m, b.q, b.t, b.e, b.d) i;
        END IF;
    END LOOP;
END
$$;

-- replaying every batch changes nothing
INSERT INTO ingest_results
SELECT -1, i.*
  FROM (SELECT chunk, array_agg(account_id ORDER BY n) a, array_agg(meter ORDER BY n) m,
               array_agg(qty ORDER BY n) q, array_agg(ts ORDER BY n) t,
               array_agg(event_id ORDER BY n) e, array_agg(dim ORDER BY n) d
          FROM reports WHERE path = 'ingest' GROUP BY chunk) b,
       billing.ingest('prop', 0, b.chunk, b.a, b.m, b.q, b.t, b.e, b.d) i;

-- what each path said ------------------------------------------------------------
SELECT is((SELECT count(*) FROM record_results rr
             WHERE rr.counted IS DISTINCT FROM EXISTS (SELECT 1 FROM counted c WHERE c.n = rr.n)),
          0::bigint, 'record() returned true exactly for the reports that count');
SELECT is((SELECT sum(accepted) FROM ingest_results WHERE NOT already_applied),
          (SELECT count(*) FROM counted WHERE path = 'ingest'),
          'ingest() accepted exactly the reports that count');
SELECT is((SELECT sum(duplicates) FROM ingest_results WHERE NOT already_applied),
          (SELECT count(*) FROM reports WHERE path = 'ingest')
          - (SELECT count(*) FROM counted WHERE path = 'ingest'),
          'ingest() reported the others as duplicates');
SELECT is((SELECT count(*) FILTER (WHERE already_applied AND accepted = 0 AND duplicates = 0)
             FROM ingest_results WHERE chunk = -1),
          (SELECT count(DISTINCT chunk) FROM reports WHERE path = 'ingest'),
          'every replayed batch was already applied');
SELECT is((SELECT count(*) FROM prop_stream), 0::bigint, 'keep_rows false stored no row');
SELECT bag_eq($$SELECT n, account_id, meter, qty, ts, event_id, dim FROM prop_kept$$,
              $$SELECT n, account_id, meter, qty, ts, event_id, dim FROM counted WHERE path = 'kept'$$,
              'keep_rows true stored exactly the rows that count');
SELECT bag_eq($$SELECT account_id, meter, event_id FROM billing.dedupe_keys WHERE account_id BETWEEN 8001 AND 8004$$,
              $$SELECT DISTINCT account_id, meter, event_id FROM reports WHERE event_id IS NOT NULL$$,
              'one dedupe key per (account, meter, event_id)');

-- the counters -----------------------------------------------------------------------
CREATE TEMP VIEW expected_buckets AS
SELECT c.account_id, c.meter, c.dim AS dimension, date_bin(m.bucket_width, c.ts, p.epoch) AS bucket_start,
       CASE m.aggregation
           WHEN 'sum' THEN sum(c.qty)
           WHEN 'count' THEN count(*)::numeric
           WHEN 'max' THEN max(c.qty)
           ELSE (array_agg(c.qty ORDER BY c.ts DESC, c.n DESC))[1] END AS quantity,
       count(*) AS events
  FROM counted c JOIN billing.meters m USING (meter) CROSS JOIN params p
 GROUP BY c.account_id, c.meter, c.dim, 4, m.aggregation;
CREATE TEMP VIEW expected_hours AS
SELECT c.account_id, c.meter, c.dim AS dimension, date_bin('1 hour', c.ts, p.epoch) AS bucket_start,
       CASE m.aggregation
           WHEN 'sum' THEN sum(c.qty)
           WHEN 'count' THEN count(*)::numeric
           WHEN 'max' THEN max(c.qty)
           ELSE (array_agg(c.qty ORDER BY c.ts DESC, c.n DESC))[1] END AS quantity,
       count(*) AS events
  FROM counted c JOIN billing.meters m USING (meter) CROSS JOIN params p
 GROUP BY c.account_id, c.meter, c.dim, 4, m.aggregation;
CREATE TEMP VIEW actual_buckets AS
SELECT a.account_id, u.meter, u.dimension, u.bucket_start, u.quantity, u.events
  FROM (VALUES (8001::bigint), (8002), (8003), (8004)) a(account_id) CROSS JOIN params p,
       billing.usage(a.account_id, p.t0 - interval '1 day', p.t0 + interval '1 day') u;
CREATE TEMP VIEW actual_hours AS
SELECT a.account_id, u.meter, u.dimension, u.bucket_start, u.quantity, u.events
  FROM (VALUES (8001::bigint), (8002), (8003), (8004)) a(account_id) CROSS JOIN params p,
       billing.usage(a.account_id, p.t0 - interval '1 day', p.t0 + interval '1 day', '1 hour') u;

SELECT ok((SELECT count(*) FROM expected_buckets) > 250, 'the reports fill more than 250 buckets');
SELECT bag_eq('TABLE actual_buckets', 'TABLE expected_buckets',
              'usage(): every bucket holds exactly the reports that count');
SELECT bag_eq('TABLE actual_hours', 'TABLE expected_hours',
              'usage(): hourly roll-ups of every aggregation');
SELECT ok(billing.compact_usage() > 0, 'compact_usage() merged the deltas');
SELECT bag_eq('TABLE actual_buckets', 'TABLE expected_buckets',
              'usage() after compact_usage(): the same buckets');
SELECT bag_eq('TABLE actual_hours', 'TABLE expected_hours',
              'usage() after compact_usage(): the same hourly roll-ups');

-- one statement far larger than work_mem: the accumulator is flushed early
-- many times, and still every key counts once (30,000 rows, 15,000 ids, 20%
-- without id, over 50 accounts, a sum and a last meter, 10 minutes)
INSERT INTO billing.accounts (account_id) SELECT 8100 + g FROM generate_series(1, 50) g;
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('prop_wm_sum', 'sum', '100 years'), ('prop_wm_last', 'last', '100 years');
CREATE TEMP TABLE big AS
SELECT n, 8101 + (n * 7919) % 50 AS account_id,
       CASE WHEN n % 3 = 0 THEN 'prop_wm_last' ELSE 'prop_wm_sum' END AS meter,
       (n % 13)::numeric / 4 AS qty,
       p.t0 + ((n * 31) % 600) * interval '1 second' + (n % 1000) * interval '1 microsecond' AS ts,
       CASE WHEN n % 5 = 0 THEN NULL ELSE 'k' || (n % 15000) END AS event_id
  FROM generate_series(1, 30000) n, params p;
CREATE TABLE prop_big (LIKE big);
SELECT billing.meter_table('prop_big', 'account_id', 'meter', 'qty', 'ts', 'event_id', keep_rows => false);
SET LOCAL work_mem = '64kB';
INSERT INTO prop_big SELECT * FROM big ORDER BY n;
RESET work_mem;
SELECT ok(test.delta_parts(8101, 8150)
          > 10 * (SELECT count(DISTINCT account_id) FROM big),
          'the big statement was flushed early, many times');
SELECT bag_eq(
    $$SELECT a.account_id, u.meter, u.bucket_start, u.quantity, u.events
        FROM (SELECT DISTINCT account_id FROM big) a CROSS JOIN params p,
             billing.usage(a.account_id, p.t0 - interval '1 day', p.t0 + interval '1 day') u$$,
    $$SELECT account_id, meter, date_bin('1 minute', ts, p.epoch),
             CASE WHEN meter = 'prop_wm_sum' THEN sum(qty)
                  ELSE (array_agg(qty ORDER BY ts DESC, n DESC))[1] END,
             count(*)
        FROM (SELECT b.*, row_number() OVER (PARTITION BY account_id, meter, event_id ORDER BY n) AS arrival
                FROM big b) x CROSS JOIN params p
       WHERE event_id IS NULL OR arrival = 1
       GROUP BY account_id, meter, 3$$,
    'the big statement counted every key once');

SELECT * FROM finish();
ROLLBACK;
