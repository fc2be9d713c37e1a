-- totals: the period totals that rating reads (billing._usage_totals_many,
-- whose compacted part is the C function billing._rollup_totals: minute
-- buckets at the edges, hour and day roll-ups inside, deltas not yet
-- compacted) equal a brute-force aggregation of every minute cell in the
-- period, for sum, count, max and last meters, for periods aligned to days
-- or hours and for periods starting and ending at any minute, before and
-- after a compaction and with deltas on top of compacted cells.
BEGIN;
SELECT plan(10);
SELECT setseed(0.2511);
SET LOCAL timezone = 'UTC';

INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('tt_sum', 'sum', '100 years'), ('tt_cnt', 'count', '100 years'),
    ('tt_max', 'max', '100 years'), ('tt_last', 'last', '100 years');
INSERT INTO billing.accounts (account_id) SELECT generate_series(7301, 7304);

-- fixed dates, whatever the clock says (the meters accept reports 100 years late)
CREATE TEMP TABLE base AS SELECT timestamptz '2025-03-08 00:00+00' AS t0;

-- n random reports over three days; ties of timestamps on purpose (minute steps)
CREATE FUNCTION pg_temp.send(n integer) RETURNS void LANGUAGE sql AS $$
    SELECT count(billing.record(7301 + (random() * 3)::int,
                                (ARRAY['tt_sum', 'tt_cnt', 'tt_max', 'tt_last'])[1 + (random() * 3)::int],
                                round((random() * 1000)::numeric, 3),
                                (SELECT t0 FROM base) + interval '1 minute' * floor(random() * 4320)))
      FROM generate_series(1, n)
$$;

-- the periods: random minutes, whole hours, whole days, and a few edge cases
CREATE TEMP TABLE periods AS
SELECT i, 7301 + (random() * 3)::int AS account_id, ps, ps + len AS pe
  FROM (SELECT i,
               CASE i % 3
                   WHEN 0 THEN t0 + interval '1 minute' * floor(random() * 4320)
                   WHEN 1 THEN t0 + interval '1 hour' * floor(random() * 72)
                   ELSE t0 + interval '1 day' * floor(random() * 3) END AS ps,
               CASE i % 4
                   WHEN 0 THEN interval '1 minute' * (1 + floor(random() * 180))
                   WHEN 1 THEN interval '1 hour' * (1 + floor(random() * 50))
                   WHEN 2 THEN interval '1 day' * (1 + floor(random() * 2))
                   ELSE interval '1 minute' * (1 + floor(random() * 4400)) END AS len
          FROM base, generate_series(1, 300) AS i) x
UNION ALL
SELECT 1000 + k, 7301, t0 + a, t0 + b
  FROM base, (VALUES (1, interval '0', interval '3 days'),
                     (2, interval '59 minutes', interval '1 day 1 minute'),
                     (3, interval '1 day', interval '1 day 1 minute'),
                     (4, interval '-1 day', interval '10 days')) AS e(k, a, b);

-- what rating reads, and the brute force over every cell
CREATE FUNCTION pg_temp.read() RETURNS TABLE (i integer, meter text, quantity numeric)
LANGUAGE sql AS $$
    SELECT p.i, t.meter, t.quantity
      FROM (SELECT array_agg(account_id ORDER BY i) AS a, array_agg(ps ORDER BY i) AS s,
                   array_agg(pe ORDER BY i) AS e, array_agg(i ORDER BY i) AS ids FROM periods) x,
           billing._usage_totals_many(x.a, x.s, x.e) t
           JOIN LATERAL (SELECT x.ids[t.idx] AS i) p ON true
     WHERE t.meter LIKE 'tt\_%'
$$;
CREATE FUNCTION pg_temp.brute() RETURNS TABLE (i integer, meter text, quantity numeric)
LANGUAGE sql AS $$
    SELECT p.i, c.meter::text,
           CASE m.aggregation
               WHEN 'max' THEN max(c.quantity)
               WHEN 'last' THEN (array_agg(c.quantity ORDER BY c.last_ts DESC, c.last_seq DESC,
                                                              c.quantity DESC))[1]
               ELSE sum(c.quantity) END
      FROM periods p
           JOIN billing.usage_cells c
             ON c.account_id = p.account_id AND c.bucket_start >= p.ps AND c.bucket_start < p.pe
           JOIN billing.meters m ON m.meter = c.meter
     WHERE c.meter LIKE 'tt\_%'
     GROUP BY p.i, c.meter, m.aggregation
$$;

SELECT pg_temp.send(1500);
SELECT ok((SELECT count(*) FROM pg_temp.brute()) > 500, 'the periods hold usage of every kind of meter');
SELECT set_eq('SELECT * FROM pg_temp.read()', 'SELECT * FROM pg_temp.brute()',
              'deltas only: the totals equal the brute force');

SELECT ok(billing.compact_usage() > 0, 'compacted into the packed store');
SELECT is((SELECT count(*) FROM billing.usage_days WHERE meter LIKE 'tt\_%') > 0, true,
          'day rows of the packed store exist');
SELECT set_eq('SELECT * FROM pg_temp.read()', 'SELECT * FROM pg_temp.brute()',
              'compacted: the totals (minute edges, hours, days) equal the brute force');

SELECT pg_temp.send(600);
SELECT set_eq('SELECT * FROM pg_temp.read()', 'SELECT * FROM pg_temp.brute()',
              'compacted plus new deltas: the totals equal the brute force');

SELECT billing.compact_usage();
SELECT set_eq('SELECT * FROM pg_temp.read()', 'SELECT * FROM pg_temp.brute()',
              'compacted twice: the totals equal the brute force');

SELECT is((SELECT count(*) FROM billing._rollup_totals(ARRAY[7301::bigint], ARRAY[now()],
                                                       ARRAY[now() - interval '1 day'],
                                                       ARRAY['tt_sum'], ARRAY['sum'])),
          0::bigint, 'an empty period has no totals');
-- a set-returning function is STRICT: a NULL argument gives no rows, never
-- a row of NULLs (issue 13, defect 7)
SELECT ok((SELECT proisstrict FROM pg_proc WHERE oid = 'billing._rollup_totals'::regproc),
          '_rollup_totals is STRICT');
SELECT is((SELECT count(*) FROM billing._rollup_totals(NULL, ARRAY[now()], ARRAY[now()],
                                                       ARRAY['tt_sum'], ARRAY['sum'])),
          0::bigint, 'a NULL argument gives no rows');

SELECT * FROM finish();
ROLLBACK;
