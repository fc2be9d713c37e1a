-- period_buckets: every bucket inside a subscription's span is billed
-- exactly once (SPEC §10.5, issue 13 defect 8).  60 accounts, each with one
-- to three consecutive subscriptions on random plans (periods of 10, 30,
-- 40 and 45 minutes, 1 and 3 hours, 1, 2 and 7 days, 1 month), starting at
-- random moments (sub-second offsets; some aligned to the hour), back to
-- back (a plan change, often inside a bucket) or after a gap, each ending
-- after 0.3 to 3 periods; usage of meters with buckets of 5 seconds, 1, 2,
-- 15 and 20 minutes, 1 and 6 hours and 1 day (sum) and 1 hour (max), each
-- plan charging every meter whose width its period is a multiple of, half
-- of the usage close to a period or subscription boundary.  Each usage line of each period, through invoice_preview, then
-- finalize_invoices, must be what an independent attribution says: the
-- bucket of each report belongs to the subscription holding its start, or,
-- when none does, to the first subscription starting inside it (its first
-- period); within the subscription to the period holding its start.  After
-- a compaction (reads from roll-ups) rerate finds nothing to change.  Then
-- the refusals (22023) of plans whose period is not a multiple of a
-- bucket width, and the unit cases of the two C functions.
BEGIN;
SELECT plan(34);
SELECT setseed(0.1308);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;

INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window) VALUES
    ('pq_min', 'sum', '1 minute', '100 years'),
    ('pq_hour', 'sum', '1 hour', '100 years'),
    ('pq_day', 'sum', '1 day', '100 years'),
    ('pq_peak', 'max', '1 hour', '100 years'),
    ('pq_5s', 'sum', '5 seconds', '100 years'),
    ('pq_2m', 'sum', '2 minutes', '100 years'),
    ('pq_15m', 'sum', '15 minutes', '100 years'),
    ('pq_20m', 'sum', '20 minutes', '100 years'),
    ('pq_6h', 'sum', '6 hours', '100 years');
INSERT INTO billing.plans (plan, period) VALUES
    ('pq_10m', '10 minutes'), ('pq_30m', '30 minutes'), ('pq_40m', '40 minutes'),
    ('pq_45m', '45 minutes'), ('pq_1h', '1 hour'), ('pq_3h', '3 hours'), ('pq_1d', '1 day'),
    ('pq_2d', '2 days'), ('pq_7d', '7 days'), ('pq_1mon', '1 month');
-- each plan charges the meters whose bucket width divides its period (a
-- month's: a day), in seconds
INSERT INTO billing.charges (plan, meter, price)
SELECT p.plan, m.meter, 'unit 1'
  FROM billing.plans p, billing.meters m
 WHERE p.plan LIKE 'pq\_%' AND m.meter LIKE 'pq\_%'
   AND CASE WHEN p.period = '1 month' THEN 86400
            ELSE extract(epoch FROM p.period) END % extract(epoch FROM m.bucket_width) = 0;
SELECT is((SELECT string_agg(c.plan || ':' || c.meter, ' ' ORDER BY c.plan, c.meter)
             FROM billing.charges c WHERE c.plan IN ('pq_40m', 'pq_45m', 'pq_2d')),
          'pq_2d:pq_15m pq_2d:pq_20m pq_2d:pq_2m pq_2d:pq_5s pq_2d:pq_6h pq_2d:pq_day pq_2d:pq_hour '
          'pq_2d:pq_min pq_2d:pq_peak pq_40m:pq_20m pq_40m:pq_2m pq_40m:pq_5s pq_40m:pq_min '
          'pq_45m:pq_15m pq_45m:pq_5s pq_45m:pq_min',
          'the plans charge the meters of the widths their periods are multiples of');
INSERT INTO billing.accounts (account_id) SELECT a FROM generate_series(7701, 7760) a;

-- s + n periods, month arithmetic on UTC wall time (written here
-- independently of billing._add_periods)
CREATE FUNCTION pg_temp.nth(s timestamptz, period interval, n int) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE AS $$
    SELECT ((s AT TIME ZONE 'UTC') + n * period) AT TIME ZONE 'UTC'
$$;

-- random consecutive subscriptions
DO $$
DECLARE
    s timestamptz;
    e timestamptz;
    pl text;
    per interval;
BEGIN
    FOR a IN 7701..7760 LOOP
        s := timestamptz '2020-01-01' + random() * interval '20 days';
        IF random() < 0.2 THEN
            s := date_trunc('hour', s);
        END IF;
        FOR k IN 1 .. 1 + floor(random() * 3)::int LOOP
            SELECT p.plan, p.period INTO pl, per FROM billing.plans p
             WHERE p.plan LIKE 'pq\_%' ORDER BY random() LIMIT 1;
            e := s + (0.3 + random() * 2.7) * CASE WHEN per = '1 month' THEN interval '30 days' ELSE per END;
            INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at)
            VALUES (a, pl, s, e);
            -- the next one: back to back (a plan change) or after a gap
            s := e + CASE WHEN random() < 0.5 THEN interval '0' ELSE random() * interval '90 minutes' END;
        END LOOP;
    END LOOP;
END $$;

CREATE TEMP TABLE subs AS
SELECT s.account_id, s.plan, s.starts_at, s.ends_at, p.period,
       (row_number() OVER (PARTITION BY s.account_id ORDER BY s.starts_at))::int AS k
  FROM billing.subscriptions s JOIN billing.plans p USING (plan)
 WHERE s.account_id BETWEEN 7701 AND 7760;
-- every period of every subscription, cut at ends_at
CREATE TEMP TABLE periods AS
SELECT s.account_id, s.k, s.plan, n, pg_temp.nth(s.starts_at, s.period, n) AS ps,
       least(pg_temp.nth(s.starts_at, s.period, n + 1), s.ends_at) AS pe
  FROM subs s, generate_series(0, 200) n
 WHERE pg_temp.nth(s.starts_at, s.period, n) < s.ends_at;

SELECT cmp_ok((SELECT count(*) FROM subs), '>=', 100::bigint, 'at least 100 subscriptions');
SELECT cmp_ok((SELECT count(*) FROM subs s WHERE EXISTS (
                   SELECT 1 FROM subs t WHERE t.account_id = s.account_id AND t.ends_at = s.starts_at)),
              '>=', 20::bigint, 'at least 20 of them start where the one before ends (a plan change)');
SELECT cmp_ok((SELECT count(*) FROM subs WHERE date_trunc('second', starts_at) <> starts_at),
              '>=', 60::bigint, 'at least 60 start at a sub-second offset');

-- usage: 60 reports per account, half of them within 1.5 bucket widths of a
-- period or subscription boundary, the rest anywhere from 2 hours before
-- the first subscription to 2 hours after the last
CREATE TEMP TABLE reports AS
WITH spans AS (
    SELECT account_id, min(starts_at) - interval '2 hours' AS lo, max(ends_at) + interval '2 hours' AS hi
      FROM subs GROUP BY account_id
), draws AS (
    SELECT sp.account_id, i, sp.lo, sp.hi,
           (ARRAY['pq_min', 'pq_hour', 'pq_day', 'pq_peak', 'pq_5s', 'pq_2m', 'pq_15m', 'pq_20m',
                  'pq_6h'])[1 + floor(random() * 9)::int] AS meter,
           random() AS r1, random() AS r2, random() AS r3
      FROM spans sp, generate_series(1, 60) i
)
SELECT d.account_id, d.i, d.meter, m.bucket_width, m.aggregation,
       (1 + floor(d.r3 * 1000))::numeric AS quantity,
       CASE WHEN d.r1 < 0.5 THEN d.lo + d.r2 * (d.hi - d.lo)
            ELSE (SELECT b.edge FROM (SELECT p.ps AS edge FROM periods p WHERE p.account_id = d.account_id
                                      UNION ALL
                                      SELECT p.pe FROM periods p WHERE p.account_id = d.account_id) b
                   ORDER BY b.edge OFFSET floor(d.r2 * (SELECT 2 * count(*) FROM periods p
                                                          WHERE p.account_id = d.account_id))::int
                   LIMIT 1)
                 + (d.r1 - 0.75) * 6 * m.bucket_width END AS ts
  FROM draws d JOIN billing.meters m ON m.meter = d.meter;
SELECT is((SELECT count(*) FILTER (WHERE billing.record(account_id, meter, quantity, ts)) FROM reports),
          3600::bigint, '3600 usage reports counted');

-- the independent attribution: the bucket of each report, the subscription
-- that bills it and the period
CREATE TEMP TABLE attributed AS
WITH b AS (
    SELECT r.*, date_bin(r.bucket_width, r.ts, timestamptz '1970-01-01 00:00:00+00') AS bucket
      FROM reports r
), owner AS (
    SELECT b.*,
           coalesce((SELECT s.k FROM subs s WHERE s.account_id = b.account_id
                       AND s.starts_at <= b.bucket AND b.bucket < s.ends_at),
                    (SELECT s.k FROM subs s WHERE s.account_id = b.account_id
                       AND b.bucket < s.starts_at AND s.starts_at < b.bucket + b.bucket_width
                     ORDER BY s.starts_at LIMIT 1)) AS k
      FROM b
)
SELECT o.account_id, o.k, o.meter, o.aggregation, o.quantity, o.bucket,
       coalesce((SELECT max(p.n) FROM periods p
                  WHERE p.account_id = o.account_id AND p.k = o.k AND p.ps <= o.bucket), 0) AS n
  FROM owner o JOIN subs s ON s.account_id = o.account_id AND s.k = o.k
 WHERE EXISTS (SELECT 1 FROM billing.charges c WHERE c.plan = s.plan AND c.meter = o.meter);

SELECT cmp_ok((SELECT count(*) FROM attributed a JOIN subs s USING (account_id, k)
                WHERE a.bucket < s.starts_at),
              '>=', 20::bigint, 'at least 20 reports in a bucket straddling a subscription''s start');
SELECT cmp_ok((SELECT count(*) FROM attributed a JOIN periods p USING (account_id, k, n)
                WHERE a.bucket >= p.ps AND a.bucket < p.pe
                  AND a.bucket + (SELECT bucket_width FROM billing.meters m WHERE m.meter = a.meter) > p.pe),
              '>=', 50::bigint, 'at least 50 in a bucket straddling a period''s end');
SELECT cmp_ok((SELECT count(*) FROM reports r JOIN subs s ON s.account_id = r.account_id
                WHERE date_bin(r.bucket_width, r.ts, timestamptz '1970-01-01 00:00:00+00') < s.starts_at
                  AND s.starts_at < date_bin(r.bucket_width, r.ts, timestamptz '1970-01-01 00:00:00+00') + r.bucket_width
                  AND EXISTS (SELECT 1 FROM subs t WHERE t.account_id = s.account_id AND t.ends_at = s.starts_at)),
              '>=', 10::bigint, 'at least 10 in a bucket straddling a plan change');

CREATE TEMP TABLE expected AS
SELECT a.account_id, p.ps, a.meter,
       CASE WHEN a.aggregation = 'max' THEN max(a.quantity) ELSE sum(a.quantity) END AS quantity
  FROM attributed a JOIN periods p USING (account_id, k, n)
 GROUP BY 1, 2, 3, a.aggregation;

-- what the preview bills, period by period
CREATE TEMP TABLE previewed AS
SELECT p.account_id, p.ps, v.meter, v.quantity, v.period_start, v.period_end, p.pe
  FROM periods p, billing.invoice_preview(p.account_id, p.ps) v
 WHERE v.kind = 'usage';
SELECT is_empty($$SELECT * FROM periods p JOIN previewed v USING (account_id, ps)
                   WHERE v.period_start <> p.ps OR v.period_end <> p.pe$$,
                'every preview is of the period computed here');
SELECT is_empty($$SELECT coalesce(e.account_id, v.account_id), coalesce(e.ps, v.ps),
                         coalesce(e.meter, v.meter), e.quantity AS expected, v.quantity AS billed
                    FROM expected e FULL JOIN previewed v USING (account_id, ps, meter)
                   WHERE coalesce(e.quantity, 0) <> coalesce(v.quantity, 0)$$,
                'invoice_preview: each period bills exactly the buckets attributed to it');
SELECT is((SELECT sum(quantity) FROM previewed WHERE meter <> 'pq_peak'),
          (SELECT sum(quantity) FROM attributed WHERE meter <> 'pq_peak'),
          'the sum over all periods is the usage of every attributed bucket, once');
SELECT cmp_ok((SELECT sum(quantity) FROM attributed WHERE meter <> 'pq_peak'), '>',
              (SELECT sum(r.quantity) FROM reports r WHERE r.meter <> 'pq_peak'
                  AND EXISTS (SELECT 1 FROM subs s JOIN billing.charges c ON c.plan = s.plan AND c.meter = r.meter
                               WHERE s.account_id = r.account_id
                                 AND s.starts_at <= r.ts AND r.ts < s.ends_at)) * 0.9,
              'most usage reported inside a subscription span is billed (sanity)');

-- finalize_invoices bills the same
CREATE TEMP TABLE finalized AS SELECT * FROM billing.finalize_invoices('2021-01-01');
SELECT is((SELECT count(*) FROM finalized WHERE account_id BETWEEN 7701 AND 7760),
          (SELECT count(*) FROM periods), 'finalize_invoices writes one invoice per period');
SELECT is_empty($$SELECT coalesce(e.account_id, f.account_id), coalesce(e.ps, f.ps),
                         coalesce(e.meter, f.meter), e.quantity AS expected, f.quantity AS billed
                    FROM expected e
                         FULL JOIN (SELECT i.account_id, i.period_start AS ps, l.meter::text AS meter, l.quantity
                                      FROM billing.invoices i
                                           JOIN billing.invoice_lines l
                                             ON l.account_id = i.account_id AND l.invoice_id = i.invoice_id
                                     WHERE i.account_id BETWEEN 7701 AND 7760 AND l.kind = 'usage') f
                         USING (account_id, ps, meter)
                   WHERE coalesce(e.quantity, 0) <> coalesce(f.quantity, 0)$$,
                'finalize_invoices: each invoice bills exactly the buckets attributed to its period');
SELECT is_empty($$SELECT * FROM billing.rerate('2019-12-01', '2021-01-01', NULL, true)
                   WHERE account_id BETWEEN 7701 AND 7760$$,
                'rerate finds nothing to change');
SELECT cmp_ok(billing.compact_usage(), '>', 0::bigint, 'usage compacted into buckets and roll-ups');
SELECT is_empty($$SELECT * FROM billing.rerate('2019-12-01', '2021-01-01', NULL, true)
                   WHERE account_id BETWEEN 7701 AND 7760$$,
                'rerate finds nothing to change when reading roll-ups');
SELECT is_empty($$SELECT * FROM billing.verify_invoices() WHERE account_id BETWEEN 7701 AND 7760$$,
                'verify_invoices finds nothing');

-- the refusals: a plan whose period is not a whole multiple of the bucket
-- width of a meter it charges (months: the width must divide a day)
INSERT INTO billing.meters (meter, bucket_width, late_window) VALUES
    ('pq_week', '7 days', '100 years'), ('pq_7min', '7 minutes', '100 years'),
    ('pq_free', '1 minute', '100 years');
INSERT INTO billing.plans (plan, period) VALUES ('pq_spare', '10 minutes');
SELECT throws_ok($$INSERT INTO billing.charges (plan, meter, price) VALUES ('pq_10m', 'pq_hour', 'unit 1')$$,
                 '22023', NULL, 'a charge of hour buckets every 10 minutes is refused');
SELECT throws_ok($$INSERT INTO billing.charges (plan, meter, price) VALUES ('pq_1mon', 'pq_week', 'unit 1')$$,
                 '22023', NULL, 'a charge of 7-day buckets every month is refused');
SELECT throws_ok($$INSERT INTO billing.charges (plan, meter, price) VALUES ('pq_1mon', 'pq_7min', 'unit 1')$$,
                 '22023', NULL, 'a charge of 7-minute buckets every month is refused (7 minutes do not divide a day)');
INSERT INTO billing.charges (plan, meter, price) VALUES ('pq_spare', 'pq_free', 'unit 1');
SELECT throws_ok($$UPDATE billing.charges SET meter = 'pq_hour' WHERE plan = 'pq_spare' AND meter = 'pq_free'$$,
                 '22023', NULL, 'a charge moved to a meter of hour buckets is refused');
SELECT throws_ok($$UPDATE billing.plans SET period = '90 seconds' WHERE plan = 'pq_spare'$$,
                 '22023', NULL, 'a period of 90 seconds for a plan of minute buckets is refused');
SELECT lives_ok($$UPDATE billing.plans SET period = '2 minutes' WHERE plan = 'pq_spare'$$,
                'a period of 2 minutes is taken');
SELECT throws_ok($$UPDATE billing.meters SET bucket_width = '1 hour' WHERE meter = 'pq_free'$$,
                 '22023', NULL, 'hour buckets for a meter a 2-minute plan charges are refused');
SELECT lives_ok($$UPDATE billing.meters SET bucket_width = '30 seconds' WHERE meter = 'pq_free'$$,
                '30-second buckets are taken');
-- a plan as 1.0 could leave it: kept, re-priced, but nobody new subscribes
ALTER TABLE billing.charges DISABLE TRIGGER charges_period_check;
INSERT INTO billing.charges (plan, meter, price) VALUES ('pq_spare', 'pq_week', 'unit 1');
ALTER TABLE billing.charges ENABLE TRIGGER charges_period_check;
SELECT lives_ok($$INSERT INTO billing.charges (plan, meter, price, valid_from)
                  VALUES ('pq_spare', 'pq_week', 'unit 2', '2020-06-01')$$,
                'a new version of a charge 1.0 left against the rule is taken');
SELECT throws_ok($$INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (7701, 'pq_spare', '2021-01-01')$$,
                 '22023', NULL, 'a subscription to a plan against the rule is refused');
INSERT INTO billing.accounts (account_id) VALUES (7761);
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (7761, 'pq_10m', '2021-01-01');
SELECT throws_ok($$UPDATE billing.subscriptions SET plan = 'pq_spare' WHERE account_id = 7761$$,
                 '22023', NULL, 'a subscription moved to a plan against the rule is refused');
-- the reload of a dump (a superuser with check_function_bodies off) is not checked again
SET LOCAL check_function_bodies = off;
SELECT lives_ok($$INSERT INTO billing.charges (plan, meter, price) VALUES ('pq_10m', 'pq_day', 'unit 1')$$,
                'a dump reload brings its rows as they were');
RESET check_function_bodies;

-- the two C functions
SELECT results_eq(
    $$SELECT billing._period_first_bucket(ps, uf, w)
        FROM (VALUES (timestamptz '2020-01-01 00:00:30.5', timestamptz '-infinity', interval '1 minute', 1),
                     ('2020-01-01 00:00:30.5', '2020-01-01 00:00:30.5', '1 minute', 2),
                     ('2020-01-01 00:00:30.5', '2020-01-01 00:00:10', '1 minute', 3),
                     ('2020-01-01 00:00:30.5', '2020-01-01 00:00:00', '1 minute', 4),
                     ('2020-01-01 00:01:00', '-infinity', '1 minute', 5),
                     ('2020-01-01 10:00', '-infinity', '1 day', 6),
                     ('2020-01-01 10:00', '-infinity', '1 hour', 7),
                     ('1969-12-31 23:59:30.25', '-infinity', '1 minute', 8),
                     ('2020-01-01 00:00:00.000001', '-infinity', '7 days', 9)) x(ps, uf, w, i)
       ORDER BY i$$,
    $$VALUES (timestamptz '2020-01-01 00:00'), ('2020-01-01 00:00:30.5'), ('2020-01-01 00:00:30.5'),
             ('2020-01-01 00:00'), ('2020-01-01 00:01'), ('2020-01-01'), ('2020-01-01 10:00'),
             ('1969-12-31 23:59'), ('2019-12-26')$$,
    '_period_first_bucket: the bucket straddling the start unless usage_from is inside it');
SELECT throws_ok($$SELECT billing._period_first_bucket('infinity', '-infinity', '1 minute')$$,
                 '22008', NULL, '_period_first_bucket of an infinite period start: 22008');
SELECT throws_ok($$SELECT billing._period_fits_width('1 month', '1 month')$$,
                 '22023', NULL, '_period_fits_width of a bucket width in months: 22023');
SELECT results_eq(
    $$SELECT p::text || ' / ' || w::text
        FROM unnest(ARRAY['1 month', '3 months', '1 year', '1 day', '7 days', '10 minutes', '1 hour',
                          '90 seconds', '36 hours']::interval[]) p,
             unnest(ARRAY['1 second', '7 seconds', '1 minute', '7 minutes', '30 minutes', '1 hour',
                          '5 hours', '1 day', '2 days', '7 days']::interval[]) w
       WHERE billing._period_fits_width(p, w)
       ORDER BY p, w$$,
    $$VALUES ('00:01:30 / 00:00:01'), ('00:10:00 / 00:00:01'), ('00:10:00 / 00:01:00'),
             ('01:00:00 / 00:00:01'), ('01:00:00 / 00:01:00'), ('01:00:00 / 00:30:00'),
             ('01:00:00 / 01:00:00'), ('1 day / 00:00:01'), ('1 day / 00:01:00'),
             ('1 day / 00:30:00'), ('1 day / 01:00:00'), ('1 day / 1 day'),
             ('36:00:00 / 00:00:01'), ('36:00:00 / 00:01:00'), ('36:00:00 / 00:30:00'),
             ('36:00:00 / 01:00:00'), ('7 days / 00:00:01'), ('7 days / 00:00:07'),
             ('7 days / 00:01:00'), ('7 days / 00:07:00'), ('7 days / 00:30:00'),
             ('7 days / 01:00:00'), ('7 days / 1 day'), ('7 days / 7 days'),
             ('1 mon / 00:00:01'), ('1 mon / 00:01:00'), ('1 mon / 00:30:00'), ('1 mon / 01:00:00'),
             ('1 mon / 1 day'), ('3 mons / 00:00:01'), ('3 mons / 00:01:00'), ('3 mons / 00:30:00'),
             ('3 mons / 01:00:00'), ('3 mons / 1 day'), ('1 year / 00:00:01'), ('1 year / 00:01:00'),
             ('1 year / 00:30:00'), ('1 year / 01:00:00'), ('1 year / 1 day')$$,
    '_period_fits_width: a period of days and time when its length is a multiple; of months when the width divides a day');

SELECT * FROM finish();
ROLLBACK;
