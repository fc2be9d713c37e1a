-- unique: meters with aggregation 'unique' (issue 18 part 3, SPEC 10.1).
-- The quantity of a period is the number of distinct dimension values with
-- a report in it.  Random seeded reports of two unique meters (minute and
-- hour buckets) for five accounts over three months, kept in a table of
-- their own, are the brute force: count(DISTINCT dimension) over the
-- reports whose bucket starts in the range.  Checked against it, before
-- compaction, after it and with new deltas on top: usage() rolled up to
-- the stored buckets, hours, days, weeks and months; the distinct counts of
-- 180 ranges (billing periods, their prefixes, and arbitrary ranges that
-- no billing period matches); named dimensions (a matrix charge on a
-- unique meter); every preview line, the finalized lines, and a rerate
-- after late reports.  Also: compaction keeps a row per billed period with
-- the exact count, and the errors of paths a unique meter does not take.
BEGIN;
SELECT plan(22);
SELECT setseed(0.7431);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;

INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window) VALUES
    ('uq_users', 'unique', '1 minute', '100 years'), ('uq_seats', 'unique', '1 hour', '100 years');
INSERT INTO billing.plans (plan, period) VALUES ('uq_month', '1 month'), ('uq_week', '7 days');
INSERT INTO billing.charges (plan, meter, dimension, price) VALUES
    ('uq_month', 'uq_users', NULL, 'unit 1'), ('uq_month', 'uq_seats', NULL, 'graduated 5 @ 0 | inf @ 10'),
    ('uq_week', 'uq_users', NULL, 'unit 1'), ('uq_week', 'uq_users', 'u1', 'unit 100');
INSERT INTO billing.accounts (account_id) SELECT generate_series(9501, 9505);
INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at) VALUES
    (9501, 'uq_month', '2025-03-10 13:37', NULL),
    (9502, 'uq_month', '2025-03-01', '2025-04-20 06:00'),   -- a period cut short
    (9502, 'uq_week', '2025-04-20 06:00', NULL),
    (9503, 'uq_week', '2025-03-03', NULL),
    (9505, 'uq_month', '2025-02-15', NULL);                 -- 9504: usage, no subscription

-- every report, for the brute force (bucket: the start of the meter's bucket)
CREATE TEMP TABLE raw (account_id bigint, meter text, dimension text, ts timestamptz,
                       bucket timestamptz, sent boolean NOT NULL DEFAULT false);
CREATE INDEX ON raw (account_id, meter, bucket);
CREATE FUNCTION pg_temp.send(n integer, t_from timestamptz, t_to timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO raw (account_id, meter, dimension, ts)
    SELECT 9501 + floor(random() * 5)::int,
           (ARRAY['uq_users', 'uq_seats'])[1 + floor(random() * 2)::int],
           -- users u0 .. u299, the low ones much more often
           'u' || floor(300 * power(random(), 3))::int,
           t_from + (t_to - t_from) * random()
      FROM generate_series(1, n);
    UPDATE raw r SET bucket = date_bin(m.bucket_width, r.ts, timestamptz '1970-01-01')
      FROM billing.meters m WHERE m.meter = r.meter AND r.bucket IS NULL;
    PERFORM billing.record(r.account_id, r.meter, 1, r.ts, NULL, r.dimension)
       FROM raw r WHERE NOT r.sent;
    UPDATE raw SET sent = true WHERE NOT sent;
END $$;

CREATE FUNCTION pg_temp.brute(acc bigint, mtr text, s timestamptz, e timestamptz) RETURNS numeric
LANGUAGE sql STABLE AS $$
    SELECT count(DISTINCT r.dimension)::numeric FROM raw r
     WHERE r.account_id = acc AND r.meter = mtr AND r.bucket >= s AND r.bucket < e
$$;

-- usage() at a grain against the brute force, every account and meter
CREATE FUNCTION pg_temp.usage_diff(g interval) RETURNS bigint LANGUAGE sql AS $$
    WITH ours AS (
        SELECT a AS account_id, u.meter, u.dimension, u.bucket_start, u.quantity, u.events
          FROM generate_series(9501::bigint, 9505) a,
               billing.usage(a, '2025-01-01', '2025-08-01', g) u
         WHERE u.meter LIKE 'uq\_%'
    ), brute AS (
        SELECT r.account_id, r.meter, NULL::text AS dimension,
               CASE WHEN g IS NULL THEN r.bucket
                    WHEN g = interval '1 month' THEN date_trunc('month', r.bucket)
                    ELSE date_bin(g, r.bucket, timestamptz '1970-01-01') END AS bucket_start,
               count(DISTINCT r.dimension)::numeric AS quantity, count(*) AS events
          FROM raw r GROUP BY 1, 2, 3, 4
    )
    SELECT count(*) FROM ((TABLE ours EXCEPT TABLE brute) UNION ALL (TABLE brute EXCEPT TABLE ours)) x
$$;

-- ranges: 60 billing periods (of the subscriptions, whole or cut), 60
-- of their prefixes, 60 arbitrary ones
CREATE TEMP TABLE ranges AS
WITH periods AS (
    SELECT s.account_id, billing._add_periods(s.starts_at, p.period, n) AS ps,
           LEAST(billing._add_periods(s.starts_at, p.period, n + 1), s.ends_at) AS pe
      FROM billing.subscriptions s JOIN billing.plans p USING (plan),
           generate_series(0, 14) n
     WHERE s.account_id BETWEEN 9501 AND 9505
       AND billing._add_periods(s.starts_at, p.period, n) < LEAST(s.ends_at, '2025-06-01')
)
SELECT row_number() OVER () AS i, * FROM (
    (SELECT account_id, ps AS s, pe AS e FROM periods ORDER BY random() LIMIT 60)
    UNION ALL
    (SELECT account_id, ps, ps + (pe - ps) * random() FROM periods, generate_series(1, 5)
      ORDER BY random() LIMIT 60)
    UNION ALL
    SELECT 9501 + floor(random() * 5)::int, s, s + interval '1 minute' * floor(random() * 60000)
      FROM (SELECT timestamptz '2025-03-01' + interval '1 minute' * floor(random() * 130000) AS s
              FROM generate_series(1, 60)) x) y;

CREATE FUNCTION pg_temp.count_diff() RETURNS bigint LANGUAGE sql AS $$
    SELECT count(*) FROM ranges r, unnest('{uq_users,uq_seats}'::text[]) m
     WHERE coalesce((SELECT sum(c.quantity) FROM billing._unique_counts(r.account_id, r.s, r.e, ARRAY[m]) c), 0)
           IS DISTINCT FROM pg_temp.brute(r.account_id, m, r.s, r.e)
$$;
-- named dimensions: u1 and u7 apart, the rest without them
CREATE FUNCTION pg_temp.named_diff() RETURNS bigint LANGUAGE sql AS $$
    WITH ours AS (
        SELECT r.i, c.dimension, c.quantity
          FROM ranges r,
               billing._unique_counts(r.account_id, r.s, r.e, ARRAY['uq_users'],
                                      ARRAY['uq_users', 'uq_users'], ARRAY['u1', 'u7']) c
    ), brute AS (
        SELECT r.i, d.dimension, d.q
          FROM ranges r,
               LATERAL (SELECT x.dimension,
                               count(DISTINCT raw.dimension)::numeric AS q
                          FROM raw
                               CROSS JOIN LATERAL (SELECT CASE WHEN raw.dimension IN ('u1', 'u7')
                                                               THEN raw.dimension END AS dimension) x
                         WHERE raw.account_id = r.account_id AND raw.meter = 'uq_users'
                           AND raw.bucket >= r.s AND raw.bucket < r.e
                         GROUP BY x.dimension) d
    )
    SELECT count(*) FROM ((TABLE ours EXCEPT TABLE brute) UNION ALL (TABLE brute EXCEPT TABLE ours)) x
$$;
-- the usage lines of the previews of every period, and the brute force
CREATE FUNCTION pg_temp.preview_diff() RETURNS bigint LANGUAGE sql AS $$
    WITH ours AS (
        SELECT a AS account_id, p.period_start, p.meter, p.dimension, p.quantity
          FROM generate_series(9501::bigint, 9505) a,
               generate_series(timestamptz '2025-03-01', '2025-05-31', '4 days') at,
               billing.invoice_preview(a, at) p
         WHERE p.kind = 'usage'
    )
    SELECT count(*) FROM (SELECT DISTINCT * FROM ours) o
     WHERE o.quantity IS DISTINCT FROM
           (SELECT count(DISTINCT r.dimension)::numeric FROM raw r
             WHERE r.account_id = o.account_id AND r.meter = o.meter AND r.bucket >= o.period_start
               AND r.bucket < (SELECT min(x.period_end) FROM billing.invoice_preview(o.account_id, o.period_start) x)
               AND CASE WHEN o.dimension IS NOT NULL THEN r.dimension = o.dimension
                        WHEN o.meter = 'uq_users' AND (SELECT s.plan FROM billing.subscriptions s
                                                        WHERE s.account_id = o.account_id
                                                          AND s.starts_at <= o.period_start
                                                        ORDER BY s.starts_at DESC LIMIT 1) = 'uq_week'
                            THEN r.dimension <> 'u1'
                        ELSE true END)
$$;

-- 1. reports in March to May, not compacted ------------------------------------------------
SELECT pg_temp.send(4000, '2025-03-01', '2025-06-01');
SELECT ok((SELECT count(DISTINCT dimension) > 150 AND count(*) = 4000 FROM raw),
          'the reports name many distinct users, some of them often');
SELECT is(pg_temp.usage_diff(NULL), 0::bigint, 'deltas: usage per stored bucket = distinct count');
SELECT is(pg_temp.usage_diff('1 hour') + pg_temp.usage_diff('1 day') + pg_temp.usage_diff('7 days')
          + pg_temp.usage_diff('1 month'), 0::bigint,
          'deltas: usage per hour, day, week and month = distinct count');
SELECT is(pg_temp.count_diff(), 0::bigint, 'deltas: 180 ranges x 2 meters = distinct count');
SELECT is(pg_temp.named_diff(), 0::bigint, 'deltas: named dimensions apart = brute force');
SELECT is(pg_temp.preview_diff(), 0::bigint, 'deltas: every preview line = distinct count');

-- 2. compacted ------------------------------------------------------------------------------
SELECT ok(billing.compact_usage() > 0, 'compacted');
SELECT is_empty($$SELECT p.account_id, p.meter, p.period_start, p.distinct_count,
                         pg_temp.brute(p.account_id, p.meter, p.period_start, p.period_end)
                    FROM billing.unique_periods p
                   WHERE p.distinct_count <> pg_temp.brute(p.account_id, p.meter, p.period_start, p.period_end)
                      OR p.distinct_count <> (SELECT count(*) FROM billing.unique_values v
                                               WHERE (v.account_id, v.meter, v.period_start)
                                                   = (p.account_id, p.meter, p.period_start))$$,
                'compaction keeps one row per billed period and meter with the exact distinct count');
SELECT ok((SELECT count(*) FROM billing.unique_periods WHERE account_id BETWEEN 9501 AND 9505) >= 20
          AND NOT EXISTS (SELECT 1 FROM billing.unique_periods WHERE account_id = 9504),
          'a row for each period with usage of the subscribed accounts, none without a subscription');
SELECT is(pg_temp.usage_diff(NULL) + pg_temp.usage_diff('1 hour') + pg_temp.usage_diff('1 day')
          + pg_temp.usage_diff('7 days') + pg_temp.usage_diff('1 month'), 0::bigint,
          'compacted: usage at every grain = distinct count');
SELECT is(pg_temp.count_diff(), 0::bigint, 'compacted: 180 ranges x 2 meters = distinct count');
SELECT is(pg_temp.named_diff(), 0::bigint, 'compacted: named dimensions apart = brute force');
SELECT is(pg_temp.preview_diff(), 0::bigint, 'compacted: every preview line = distinct count');

-- 3. new reports on top (late ones too), then compacted again --------------------------------
SELECT pg_temp.send(1500, '2025-03-01', '2025-06-01');
SELECT is(pg_temp.count_diff() + pg_temp.named_diff() + pg_temp.preview_diff() + pg_temp.usage_diff('1 day'),
          0::bigint, 'compacted plus new deltas: ranges, named dimensions, previews, usage exact');
SELECT ok(billing.compact_usage() > 0, 'compacted again');
SELECT is(pg_temp.count_diff() + pg_temp.named_diff() + pg_temp.preview_diff() + pg_temp.usage_diff('1 day'),
          0::bigint, 'compacted twice: ranges, named dimensions, previews, usage exact');

-- 4. invoices and re-rating ------------------------------------------------------------------
SELECT ok((SELECT count(*) FROM billing.finalize_invoices('2025-06-01 02:00') f
            WHERE f.account_id BETWEEN 9501 AND 9505) > 10, 'finalized the periods that ended');
SELECT is((SELECT count(*) FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
            WHERE i.account_id BETWEEN 9501 AND 9505 AND l.kind = 'usage'
              AND l.quantity IS DISTINCT FROM (
                  SELECT count(DISTINCT r.dimension) FROM raw r
                   WHERE r.account_id = l.account_id AND r.meter = l.meter
                     AND r.bucket >= i.period_start AND r.bucket < i.period_end
                     AND CASE WHEN l.dimension IS NOT NULL THEN r.dimension = l.dimension
                              WHEN l.meter = 'uq_users' AND i.plan = 'uq_week' THEN r.dimension <> 'u1'
                              ELSE true END)),
          0::bigint, 'every finalized line bills the distinct count of its period');
-- late reports in finalized periods: a user never seen (+1) and one seen already (nothing)
SELECT billing.record(9501, 'uq_users', 1, '2025-03-20', NULL, 'newcomer'),
       billing.record(9501, 'uq_users', 1, '2025-03-21', NULL,
                      (SELECT dimension FROM raw WHERE account_id = 9501 AND meter = 'uq_users'
                          AND bucket >= '2025-03-10 13:37' AND bucket < '2025-04-10 13:37' LIMIT 1));
SELECT results_eq($$SELECT meter, billed_quantity + 1, correct_quantity, delta
                      FROM billing.rerate('2025-03-01', '2025-06-01', 9501)$$,
                  $$SELECT 'uq_users'::text, pg_temp.brute(9501, 'uq_users', '2025-03-10 13:37', '2025-04-10 13:37') + 1,
                           pg_temp.brute(9501, 'uq_users', '2025-03-10 13:37', '2025-04-10 13:37') + 1,
                           1.00::numeric$$,
                  'rerate: a new user in a finalized period bills one more, a known one nothing');
SELECT ok(billing.compact_usage() > 0 AND NOT EXISTS (SELECT 1 FROM billing.rerate('2025-03-01', '2025-06-01', 9501)),
          'after compaction the period reads the same: nothing more to re-rate');

-- 5. what a unique meter does not take -----------------------------------------------------------
SELECT throws_ok($$SELECT billing.correct_usage(9501, 'uq_users', '2025-03-20', 1, 'no', 'u1')$$,
                 '22023', NULL, 'correct_usage refuses a unique meter');
SELECT throws_ok($$SELECT billing.report_cumulative('s', 9501, 'uq_users', now(), 1, 'u1')$$,
                 '22023', NULL, 'report_cumulative refuses a unique meter');

SELECT * FROM finish();
ROLLBACK;
