-- invoice_period_edges: which period bills a bucket that straddles a period
-- boundary or a subscription's start or end (SPEC §10.5, issue 13 defect 8).
-- Every bucket inside a subscription's span is billed exactly once: a
-- bucket straddling a period boundary goes to the period holding its start,
-- one straddling the subscription's start to its first period (unless an
-- earlier subscription of the account reaches into it: a plan change inside
-- a bucket), one straddling the subscription's end to its last period.  A
-- plan's period must be a whole multiple of the bucket width of every meter
-- it charges (22023).
-- Accounts 5501-5599, meters and plans prefixed pe_, periods in January 2020.
SET search_path = billing, public;
\set SHOW_CONTEXT never
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET intervalstyle = 'postgres';

INSERT INTO meters (meter, bucket_width, late_window) VALUES
    ('pe_min', '1 minute', '100 years'),
    ('pe_hour', '1 hour', '100 years'),
    ('pe_day', '1 day', '100 years');
INSERT INTO plans (plan, period) VALUES
    ('pe_10min', '10 minutes'), ('pe_hourly', '1 hour'), ('pe_monthly', '1 month');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('pe_10min', 'pe_min', 'unit 1', 'minute buckets'),
    ('pe_hourly', 'pe_min', 'unit 1', 'minute buckets'),
    ('pe_hourly', 'pe_hour', 'unit 1', 'hour buckets'),
    ('pe_monthly', 'pe_min', 'unit 1', 'minute buckets'),
    ('pe_monthly', 'pe_day', 'unit 1', 'day buckets');

-- the quantity of each usage line of the periods holding some moments
CREATE FUNCTION pg_temp.billed(acc bigint, ats timestamptz[])
    RETURNS TABLE (period_start timestamptz, period_end timestamptz, meter text, quantity numeric)
    LANGUAGE sql AS $$
    SELECT p.period_start, p.period_end, p.meter, p.quantity
      FROM unnest(ats) a, billing.invoice_preview(acc, a) p
     WHERE p.kind = 'usage'
     ORDER BY p.period_start, p.meter
$$;

-- The example of issue 13: a subscription starting at 00:00:30.5 with
-- 10-minute periods, one unit at +15 s, +9m50s and +10m10s.  The first
-- unit's bucket (00:00) straddles the start: the first period bills it (1.0
-- billed it nowhere, 2 / 0 / 0).  The other two fall into the bucket 00:10,
-- which starts inside the first period: it bills them too.
INSERT INTO accounts (account_id, name) VALUES (5501, 'issue 13 example');
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at)
VALUES (5501, 'pe_10min', '2020-01-01 00:00:30.5', '2020-01-01 00:30:30.5');
SELECT record(5501, 'pe_min', 1, timestamptz '2020-01-01 00:00:30.5' + d)
  FROM unnest(ARRAY[interval '15 seconds', '9 minutes 50 seconds', '10 minutes 10 seconds']) d;
SELECT meter, bucket_start, quantity FROM usage(5501, '2020-01-01', '2020-01-02');
SELECT * FROM pg_temp.billed(5501, ARRAY['2020-01-01 00:00:30.5', '2020-01-01 00:10:30.5',
                                         '2020-01-01 00:20:30.5']::timestamptz[]);

-- 1-hour buckets cannot be billed every 10 minutes (1.0 billed 0 / 0 / 0):
-- the plan is refused, whichever change would make it.
INSERT INTO charges (plan, meter, price) VALUES ('pe_10min', 'pe_hour', 'unit 1');
UPDATE plans SET period = '90 minutes' WHERE plan = 'pe_hourly';
INSERT INTO plans (plan, period) VALUES ('pe_other', '10 minutes');
INSERT INTO meters (meter, bucket_width, late_window) VALUES ('pe_wide', '1 minute', '100 years');
INSERT INTO charges (plan, meter, price) VALUES ('pe_other', 'pe_wide', 'unit 1');
UPDATE meters SET bucket_width = '1 hour' WHERE meter = 'pe_wide';
UPDATE meters SET bucket_width = '5 minutes' WHERE meter = 'pe_wide';     -- 10 minutes = 2 x 5
-- months: a whole number of UTC days, so a bucket width must divide a day
INSERT INTO meters (meter, bucket_width, late_window) VALUES
    ('pe_week', '7 days', '100 years'), ('pe_7min', '7 minutes', '100 years');
INSERT INTO charges (plan, meter, price) VALUES ('pe_monthly', 'pe_week', 'unit 1');
INSERT INTO charges (plan, meter, price) VALUES ('pe_monthly', 'pe_7min', 'unit 1');
SELECT p.period, m.bucket_width, billing._period_fits_width(p.period, m.bucket_width) AS fits
  FROM (VALUES (interval '1 month'), ('1 year'), ('7 days'), ('1 hour'), ('10 minutes')) p(period),
       (VALUES (interval '1 minute'), ('7 minutes'), ('1 hour'), ('1 day'), ('7 days')) m(bucket_width)
 ORDER BY 1, 2;

-- Hour buckets with hourly periods, the subscription starting at 00:00:30.5:
-- every hour bucket straddles a period boundary and goes to the period
-- holding its start; the first period also bills the bucket 00:00.
INSERT INTO accounts (account_id, name) VALUES (5502, 'hour buckets');
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at)
VALUES (5502, 'pe_hourly', '2020-01-01 00:00:30.5', '2020-01-01 03:00:30.5');
SELECT record(5502, m, 1, t)
  FROM unnest(ARRAY['pe_min', 'pe_hour']) m,
       unnest(ARRAY['2020-01-01 00:00:10', '2020-01-01 00:59:59', '2020-01-01 01:00:20',
                    '2020-01-01 01:00:40', '2020-01-01 02:30']::timestamptz[]) t;
SELECT * FROM pg_temp.billed(5502, ARRAY['2020-01-01 00:00:30.5', '2020-01-01 01:00:30.5',
                                         '2020-01-01 02:00:30.5']::timestamptz[]);

-- The last period, cut at ends_at (00:25:10, inside the bucket 00:25):
-- that bucket starts inside the period and is billed by it, with what was
-- reported after ends_at in it (00:25:40); the bucket 00:26 is not billed.
INSERT INTO accounts (account_id, name) VALUES (5503, 'ends mid-bucket');
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at)
VALUES (5503, 'pe_10min', '2020-01-01 00:00:30.5', '2020-01-01 00:25:10');
SELECT record(5503, 'pe_min', 1, t)
  FROM unnest(ARRAY['2020-01-01 00:25:05', '2020-01-01 00:25:40', '2020-01-01 00:26:00']::timestamptz[]) t;
SELECT * FROM pg_temp.billed(5503, ARRAY['2020-01-01 00:20:30.5']::timestamptz[]);

-- A plan change at a moment inside a bucket (00:12:20.25): the first
-- subscription ends there and the next one starts there.  The bucket 00:12
-- starts inside the first subscription's last period, which bills it, also
-- what was reported in it after the change (00:12:40); the second
-- subscription's first period starts with the bucket 00:13.
INSERT INTO accounts (account_id, name) VALUES (5504, 'plan change mid-bucket');
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at) VALUES
    (5504, 'pe_10min', '2020-01-01 00:00:00', '2020-01-01 00:12:20.25'),
    (5504, 'pe_hourly', '2020-01-01 00:12:20.25', '2020-01-01 01:12:20.25');
SELECT record(5504, 'pe_min', 1, t)
  FROM unnest(ARRAY['2020-01-01 00:12:05', '2020-01-01 00:12:40', '2020-01-01 00:13:10']::timestamptz[]) t;
SELECT * FROM pg_temp.billed(5504, ARRAY['2020-01-01 00:10:00', '2020-01-01 00:12:20.25']::timestamptz[]);

-- After a gap, the bucket straddling the new start belongs to no earlier
-- subscription: the new subscription's first period bills it.
INSERT INTO accounts (account_id, name) VALUES (5505, 'gap');
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at) VALUES
    (5505, 'pe_10min', '2020-01-01 00:00:00', '2020-01-01 00:05:00'),
    (5505, 'pe_10min', '2020-01-01 00:07:30', '2020-01-01 00:17:30');
SELECT record(5505, 'pe_min', 1, t)
  FROM unnest(ARRAY['2020-01-01 00:06:00', '2020-01-01 00:07:10', '2020-01-01 00:07:50']::timestamptz[]) t;
SELECT * FROM pg_temp.billed(5505, ARRAY['2020-01-01 00:00:00', '2020-01-01 00:07:30']::timestamptz[]);

-- Month periods starting at 10:00: each day bucket straddles a period
-- boundary and goes to the period holding its start (January bills the
-- day 2020-02-01, 00:00 to 24:00); the first period bills the day
-- 2020-01-01 from 00:00, minute buckets from 10:00.
INSERT INTO accounts (account_id, name) VALUES (5506, 'monthly at 10:00');
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at)
VALUES (5506, 'pe_monthly', '2020-01-01 10:00', '2020-03-01 10:00');
SELECT record(5506, m, 1, t)
  FROM unnest(ARRAY['pe_min', 'pe_day']) m,
       unnest(ARRAY['2020-01-01 09:00', '2020-01-01 10:30', '2020-02-01 09:59',
                    '2020-02-01 10:00', '2020-02-01 23:00']::timestamptz[]) t;
SELECT * FROM pg_temp.billed(5506, ARRAY['2020-01-01 10:00', '2020-02-01 10:00']::timestamptz[]);

-- finalize_invoices, rerate and remaining bill the same buckets as the
-- preview.  A correction of the bucket straddling the start of account
-- 5501 is re-rated onto its first period.
CREATE TEMP TABLE finalized AS SELECT * FROM finalize_invoices('2020-04-01');
SELECT count(*) AS invoices FROM finalized WHERE account_id BETWEEN 5501 AND 5599;
SELECT i.account_id, i.period_start, l.meter, l.quantity
  FROM finalized f
       JOIN invoices i ON i.account_id = f.account_id AND i.invoice_id = f.invoice_id
       JOIN invoice_lines l ON l.account_id = i.account_id AND l.invoice_id = i.invoice_id
 WHERE i.account_id BETWEEN 5501 AND 5599 AND l.kind = 'usage' AND l.quantity <> 0
 ORDER BY 1, 2, 3;
SELECT count(*) AS rerate_finds FROM rerate('2020-01-01', '2020-04-01', NULL, true)
 WHERE account_id BETWEEN 5501 AND 5599;
SELECT correct_usage(5501, 'pe_min', '2020-01-01 00:00', 4, 'late batch for the first minute');
SELECT account_id, billed_quantity, correct_quantity, delta
  FROM rerate('2020-01-01', '2020-04-01', 5501, true);
UPDATE subscriptions SET spend_cap = 10 WHERE account_id = 5501;
SELECT remaining(5501, 'pe_min', '2020-01-01 00:05');   -- 10 - (3 + 4)

-- Plans 1.0 created against the rule stay and go on billing (the update to
-- 1.1 names them in a WARNING); a new version of such a charge is taken, a
-- new subscription to such a plan is refused.
ALTER TABLE charges DISABLE TRIGGER charges_period_check;
INSERT INTO charges (plan, meter, price) VALUES ('pe_10min', 'pe_hour', 'unit 1');
ALTER TABLE charges ENABLE TRIGGER charges_period_check;
INSERT INTO charges (plan, meter, price, valid_from) VALUES ('pe_10min', 'pe_hour', 'unit 2', '2020-06-01');
INSERT INTO accounts (account_id, name) VALUES (5507, 'late joiner');
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at)
VALUES (5507, 'pe_10min', '2020-01-01 00:00', '2020-01-01 00:10');
UPDATE subscriptions SET spend_cap = 5 WHERE account_id = 5501;   -- an old subscription may change
DELETE FROM charges WHERE plan = 'pe_10min' AND meter = 'pe_hour';
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at)
VALUES (5507, 'pe_10min', '2020-01-01 00:00', '2020-01-01 00:10');
SELECT count(*) AS invoices FROM finalize_invoices('2020-04-01') WHERE account_id = 5507;
