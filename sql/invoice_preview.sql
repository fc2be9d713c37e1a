-- invoice_preview: the bill of the period holding a moment, as it stands
-- (SPEC §5).  One line per fixed fee, one per usage charge (also at
-- quantity 0), a cap line when the spend cap cuts the usage lines, pending
-- adjustments; each amount rounded at the line to the currency's minor unit
-- with billing.rounding.  Shown here: reserved volume the Sentry way, the
-- spend cap hit exactly and exceeded, a minimum at zero usage, JPY (0
-- decimals) and KWD (3), usage exactly at a period boundary, subscriptions
-- that start or end mid-month, a plan change, a price version that starts
-- inside a period.  Reading roll-ups after compact_usage() changes nothing.
-- Accounts 5201-5299, meters and plans prefixed pv_, periods in 2026.
SET search_path = billing, public;
\set SHOW_CONTEXT never
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET intervalstyle = 'postgres';

INSERT INTO meters (meter, aggregation, late_window, unit) VALUES
    ('pv_error', 'sum', '100 years', 'event'),
    ('pv_attach', 'sum', '100 years', 'GB'),
    ('pv_span', 'sum', '100 years', 'span'),
    ('pv_seat', 'max', '100 years', 'seat');

-- the lines of a preview without the period columns
CREATE FUNCTION pg_temp.bill(acc bigint, at timestamptz)
    RETURNS TABLE (line_no int, kind text, meter text, description text, quantity numeric, amount numeric)
    LANGUAGE sql AS $$
    SELECT line_no, kind, meter, description, quantity, amount
      FROM billing.invoice_preview(acc, at) ORDER BY line_no
$$;
-- period and total of a preview
CREATE FUNCTION pg_temp.total(acc bigint, at timestamptz)
    RETURNS TABLE (period_start timestamptz, period_end timestamptz, lines bigint, total numeric)
    LANGUAGE sql AS $$
    SELECT min(period_start), min(period_end), count(*), sum(amount)
      FROM billing.invoice_preview(acc, at)
$$;

-- Reserved volume the Sentry way: the reservation is a fixed fee, and the
-- usage charge's first tier, up to the reserved quantity, costs 0.
-- Business: 89/month with 100k errors reserved, then 0.00029 per error up
-- to 500k and 0.00021 above; attachments 0.25 per GB, not reserved.
INSERT INTO plans (plan, currency) VALUES ('pv_business', 'USD');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('pv_business', NULL, 'flat 89', 'Business (100k errors reserved)'),
    ('pv_business', 'pv_error', 'graduated 100000 @ 0 | 500000 @ 0.00029 | inf @ 0.00021', 'Errors'),
    ('pv_business', 'pv_attach', 'unit 0.25', 'Attachments (GB)');
INSERT INTO accounts (account_id, name) VALUES
    (5201, 'no usage'), (5202, 'exactly the reservation'), (5203, 'some overage'),
    (5204, 'into the third tier'), (5205, 'cap hit exactly'), (5206, 'cap exceeded');
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap) VALUES
    (5201, 'pv_business', '2026-01-01', NULL),
    (5202, 'pv_business', '2026-01-01', NULL),
    (5203, 'pv_business', '2026-01-01', NULL),
    (5204, 'pv_business', '2026-01-01', NULL),
    (5205, 'pv_business', '2026-01-01', 50),
    (5206, 'pv_business', '2026-01-01', 50);
SELECT count(*) FROM (
    SELECT record(5202, 'pv_error', 40000, '2026-01-03 10:15'),
           record(5202, 'pv_error', 60000, '2026-01-20 23:59'),
           record(5203, 'pv_error', 150000, '2026-01-05 08:00', NULL, 'web'),
           record(5203, 'pv_error', 100000, '2026-01-06 09:30', NULL, 'ios'),
           record(5203, 'pv_attach', 1.2, '2026-01-07 00:00'),
           record(5203, 'pv_attach', 1.3, '2026-01-31 23:59'),
           record(5204, 'pv_error', 600000, '2026-01-15 12:00'),
           record(5205, 'pv_error', 250000, '2026-01-10 00:00'),
           record(5205, 'pv_attach', 26, '2026-01-11 00:00'),
           record(5206, 'pv_error', 300000, '2026-01-10 00:00'),
           record(5206, 'pv_attach', 26, '2026-01-11 00:00')) r;

-- 5201, no usage: the reservation only; the usage lines show quantity 0.
SELECT * FROM pg_temp.bill(5201, '2026-01-20');
SELECT * FROM pg_temp.total(5201, '2026-01-20');
-- 5202, 100000 errors = the reservation: the usage line is 0.00.
SELECT * FROM pg_temp.bill(5202, '2026-01-20');
-- 5203, 250000 errors (web and ios together): 150000 over the reserved
-- 100000 at 0.00029 = 43.50; 1.2 + 1.3 = 2.5 GB at 0.25 = 0.625 -> 0.63
-- (half_up); total 89 + 43.50 + 0.63 = 133.13.
SELECT * FROM pg_temp.bill(5203, '2026-01-20');
SELECT * FROM pg_temp.total(5203, '2026-01-20');
-- 5204, 600000 errors: 400000 at 0.00029 = 116.00 plus 100000 at
-- 0.00021 = 21.00: 137.00; total 226.00.
SELECT * FROM pg_temp.bill(5204, '2026-01-20');
SELECT * FROM pg_temp.total(5204, '2026-01-20');

-- The spend cap caps the usage lines of a period, never the fixed fee.
-- 5205 hits its cap of 50 exactly: 150000 at 0.00029 = 43.50, 26 GB at
-- 0.25 = 6.50, 43.50 + 6.50 = 50.00: no cap line; total 139.00.
SELECT * FROM pg_temp.bill(5205, '2026-01-20');
SELECT * FROM pg_temp.total(5205, '2026-01-20');
-- 5206 exceeds it: 200000 at 0.00029 = 58.00, + 6.50 = 64.50, 14.50 over
-- the cap: a cap line of -14.50 with no meter and no quantity; total
-- 89 + 50 = 139.00.
SELECT * FROM pg_temp.bill(5206, '2026-01-20');
SELECT * FROM pg_temp.total(5206, '2026-01-20');
-- A cap is itself rounded to the currency: 49.996 caps at 50.00 (no cap
-- line for 5205), 50.004 at 50.00 too (5206 still -14.50).
UPDATE subscriptions SET spend_cap = 49.996 WHERE account_id = 5205;
UPDATE subscriptions SET spend_cap = 50.004 WHERE account_id = 5206;
SELECT account_id, kind, amount
  FROM unnest('{5205,5206}'::bigint[]) AS account_id, invoice_preview(account_id, '2026-01-20')
 WHERE kind = 'cap';
-- a cap of 0 takes every usage line back; the fixed fee stays
UPDATE subscriptions SET spend_cap = 0 WHERE account_id = 5206;
SELECT * FROM pg_temp.bill(5206, '2026-01-20');
UPDATE subscriptions SET spend_cap = 50 WHERE account_id IN (5205, 5206);

-- Zero usage with a minimum: spans at 0.000002 each with a 25 minimum.
-- January has no spans: 25.00; February 1,000,000 spans = 2.00: still
-- 25.00; March 20,000,000 spans = 40.00.
INSERT INTO plans (plan) VALUES ('pv_min');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('pv_min', 'pv_span', 'unit 0.000002 min 25', 'Spans (25 minimum)');
INSERT INTO accounts (account_id, name) VALUES (5207, 'minimum');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5207, 'pv_min', '2026-01-01');
SELECT record(5207, 'pv_span', 1000000, '2026-02-14 00:00'),
       record(5207, 'pv_span', 20000000, '2026-03-14 00:00');
SELECT to_char(at, 'YYYY-MM') AS month, b.*
  FROM unnest('{2026-01-20,2026-02-20,2026-03-20}'::timestamptz[]) AS at, pg_temp.bill(5207, at) b
 ORDER BY at;

-- 0- and 3-exponent currencies.  12345 errors at 0.1 JPY = 1234.5 -> 1235
-- yen (half_up), total 2980 + 1235 = 4215; at 0.0125 KWD = 154.3125 ->
-- 154.313 KWD, total 7.500 + 154.313 = 161.813.
INSERT INTO plans (plan, currency) VALUES ('pv_jpy', 'JPY'), ('pv_kwd', 'KWD');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('pv_jpy', NULL, 'flat 2980', 'Team (JPY)'),
    ('pv_jpy', 'pv_error', 'unit 0.1', 'Errors'),
    ('pv_kwd', NULL, 'flat 7.5', 'Team (KWD)'),
    ('pv_kwd', 'pv_error', 'unit 0.0125', 'Errors');
INSERT INTO accounts (account_id, currency, name) VALUES (5208, 'JPY', 'yen'), (5209, 'KWD', 'dinar');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES
    (5208, 'pv_jpy', '2026-01-01'), (5209, 'pv_kwd', '2026-01-01');
SELECT record(5208, 'pv_error', 12345, '2026-01-10'), record(5209, 'pv_error', 12345, '2026-01-10');
SELECT * FROM pg_temp.bill(5208, '2026-01-20');
SELECT * FROM pg_temp.total(5208, '2026-01-20');
SELECT * FROM pg_temp.bill(5209, '2026-01-20');
SELECT * FROM pg_temp.total(5209, '2026-01-20');
-- billing.rounding decides ties: half_even gives 1234 yen and 154.312 KWD,
-- down 1234 and 154.312, up 1235 and 154.313.
SET billing.rounding = 'half_even';
SELECT account_id, amount FROM unnest('{5208,5209}'::bigint[]) AS account_id,
       invoice_preview(account_id, '2026-01-20') WHERE kind = 'usage';
SET billing.rounding = 'down';
SELECT account_id, amount FROM unnest('{5208,5209}'::bigint[]) AS account_id,
       invoice_preview(account_id, '2026-01-20') WHERE kind = 'usage';
SET billing.rounding = 'up';
SELECT account_id, amount FROM unnest('{5208,5209}'::bigint[]) AS account_id,
       invoice_preview(account_id, '2026-01-20') WHERE kind = 'usage';
RESET billing.rounding;

-- A subscription that starts mid-month bills from its start: periods
-- [Jan 15 12:00, Feb 15 12:00), [Feb 15 12:00, Mar 15 12:00).  Usage exactly
-- at a period boundary belongs to the period that starts there.
-- Pay as you go: 0.0005 per error, 5 per seat at the period's peak.
INSERT INTO plans (plan) VALUES ('pv_payg');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('pv_payg', 'pv_error', 'unit 0.0005', 'Errors (pay as you go)'),
    ('pv_payg', 'pv_seat', 'unit 5', 'Seats (peak)');
INSERT INTO accounts (account_id, name) VALUES (5210, 'starts mid-month');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5210, 'pv_payg', '2026-01-15 12:00');
SELECT count(*) FROM (
    SELECT record(5210, 'pv_error', 1000, '2026-01-15 11:59:59'),      -- before the start
           record(5210, 'pv_error', 2000, '2026-01-15 12:00'),         -- first period
           record(5210, 'pv_error', 3000, '2026-02-15 11:59:59.999999'),
           record(5210, 'pv_error', 4000, '2026-02-15 12:00'),         -- second period
           record(5210, 'pv_seat', 3, '2026-01-20 00:00'),
           record(5210, 'pv_seat', 7, '2026-02-01 00:00'),
           record(5210, 'pv_seat', 2, '2026-02-10 00:00'),
           record(5210, 'pv_seat', 4, '2026-02-20 00:00')) r;
-- first period: 2000 + 3000 = 5000 errors at 0.0005 = 2.50, peak 7 seats
-- at 5 = 35.00, total 37.50
SELECT * FROM pg_temp.total(5210, '2026-02-15 11:59:59.999999');
SELECT * FROM pg_temp.bill(5210, '2026-01-15 12:00');
-- second period: 4000 errors = 2.00, peak 4 seats = 20.00, total 22.00
SELECT * FROM pg_temp.total(5210, '2026-02-15 12:00');
SELECT * FROM pg_temp.bill(5210, '2026-02-15 12:00');
-- before the start: no period, no lines
SELECT count(*) FROM invoice_preview(5210, '2026-01-15 11:59:59.999999');

-- A subscription that ends mid-month: its last period is cut at ends_at
-- [Mar 1, Mar 10); the fixed fee is not prorated.  150000 errors on Mar 9:
-- 50000 over the reservation at 0.00029 = 14.50, total 89 + 14.50 = 103.50;
-- the errors of Mar 10 fall after the end and are in no period.
INSERT INTO accounts (account_id, name) VALUES (5211, 'ends mid-month');
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at)
VALUES (5211, 'pv_business', '2026-01-01', '2026-03-10');
SELECT record(5211, 'pv_error', 150000, '2026-03-09 23:59'),
       record(5211, 'pv_error', 999999, '2026-03-10 00:00');
SELECT * FROM pg_temp.total(5211, '2026-03-05');
SELECT * FROM pg_temp.bill(5211, '2026-03-09 23:59:59.999999');
SELECT count(*) FROM invoice_preview(5211, '2026-03-10');

-- A plan change between periods is two subscriptions: Business for January,
-- pay as you go from February 1.  120000 errors in the last microsecond of
-- January: 20000 over the reservation at 0.00029 = 5.80, total 94.80;
-- 120000 errors at February 1 00:00 are February's, at 0.0005 = 60.00.
INSERT INTO accounts (account_id, name) VALUES (5212, 'changes plan');
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at) VALUES
    (5212, 'pv_business', '2026-01-01', '2026-02-01'),
    (5212, 'pv_payg', '2026-02-01', NULL);
SELECT record(5212, 'pv_error', 120000, '2026-01-31 23:59:59.999999'),
       record(5212, 'pv_error', 120000, '2026-02-01 00:00');
SELECT * FROM pg_temp.total(5212, '2026-01-31 23:59:59.999999');
SELECT * FROM pg_temp.bill(5212, '2026-01-31 23:59:59.999999');
SELECT * FROM pg_temp.total(5212, '2026-02-01');
SELECT * FROM pg_temp.bill(5212, '2026-02-01');
-- ... or mid-month: Business to Feb 15 (its period cut to [Feb 1, Feb 15)),
-- then pay as you go with periods anchored at Feb 15.
INSERT INTO accounts (account_id, name) VALUES (5214, 'changes plan mid-month');
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at) VALUES
    (5214, 'pv_business', '2026-01-01', '2026-02-15'),
    (5214, 'pv_payg', '2026-02-15', NULL);
SELECT at, t.* FROM unnest('{2026-01-31,2026-02-14 23:59:59.999999,2026-02-15,2026-03-15}'::timestamptz[]) AS at,
       pg_temp.total(5214, at) t ORDER BY at;

-- A price version whose valid_from falls inside a period applies from the
-- next period: the version in force at the period's start rates it all.
-- 1000 errors a month: January at 0.001 = 1.00 (the version of Jan 15 is
-- not in force on Jan 1), February at 0.002 = 2.00, March at 0.003 = 3.00
-- (a valid_from exactly at the period start applies to that period).
INSERT INTO plans (plan) VALUES ('pv_versioned');
INSERT INTO charges (plan, meter, price, valid_from, description) VALUES
    ('pv_versioned', 'pv_error', 'unit 0.001', '-infinity', 'Errors'),
    ('pv_versioned', 'pv_error', 'unit 0.002', '2026-01-15', 'Errors'),
    ('pv_versioned', 'pv_error', 'unit 0.003', '2026-03-01', 'Errors');
INSERT INTO accounts (account_id, name) VALUES (5213, 'price versions');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5213, 'pv_versioned', '2026-01-01');
SELECT record(5213, 'pv_error', 1000, '2026-01-20'), record(5213, 'pv_error', 1000, '2026-02-20'),
       record(5213, 'pv_error', 1000, '2026-03-20');
SELECT to_char(at, 'YYYY-MM') AS month, b.*
  FROM unnest('{2026-01-20,2026-02-20,2026-03-20}'::timestamptz[]) AS at, pg_temp.bill(5213, at) b
 ORDER BY at;

-- Period edges inside an hour: a subscription from Jan 10 12:30 with an
-- error every 97 minutes from Jan 9 to Feb 12; its first period
-- [Jan 10 12:30, Feb 10 12:30) holds exactly the events counted here
-- independently.
INSERT INTO accounts (account_id, name) VALUES (5215, 'starts mid-hour');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5215, 'pv_payg', '2026-01-10 12:30');
SELECT count(*) FROM (SELECT record(5215, 'pv_error', 1, ts)
                        FROM generate_series(timestamptz '2026-01-09', '2026-02-12', '97 minutes') AS ts) r;
SELECT (SELECT count(*) FROM generate_series(timestamptz '2026-01-09', '2026-02-12', '97 minutes') AS ts
         WHERE ts >= '2026-01-10 12:30' AND ts < '2026-02-10 12:30') AS expected,
       (SELECT quantity FROM invoice_preview(5215, '2026-01-20') WHERE meter = 'pv_error') AS previewed;

-- No subscription at that moment, or no such account: no lines.
SELECT count(*) FROM invoice_preview(5201, '2025-12-31 23:59:59.999999');
SELECT count(*) FROM invoice_preview(5299, '2026-01-20');

-- Previews read day and hour roll-ups once compact_usage() has run; the
-- bills do not change (every preview above, before and after).
CREATE FUNCTION pg_temp.all_previews()
    RETURNS TABLE (account_id bigint, at timestamptz, line_no int, kind text, meter text,
                   description text, period_start timestamptz, period_end timestamptz,
                   quantity numeric, amount numeric, dimension text)
    LANGUAGE sql AS $$
    SELECT a, at, p.*
      FROM generate_series(5201::bigint, 5215) AS a,
           unnest('{2026-01-10 12:30,2026-01-15 12:00,2026-01-20,2026-01-31 23:59:59.999999,
                    2026-02-01,2026-02-10 12:29:59.999999,2026-02-10 12:30,2026-02-14 23:59:59.999999,
                    2026-02-15 12:00,2026-02-20,2026-03-05,2026-03-20}'::timestamptz[]) AS at,
           billing.invoice_preview(a, at) p
$$;
CREATE TEMP TABLE pv_before AS SELECT * FROM pg_temp.all_previews();
SET client_min_messages = warning;
SELECT compact_usage() > 0 AS compacted;
RESET client_min_messages;
CREATE TEMP TABLE pv_after AS SELECT * FROM pg_temp.all_previews();
SELECT (SELECT count(*) FROM pv_before) AS lines,
       (SELECT count(*) FROM (SELECT * FROM pv_after EXCEPT SELECT * FROM pv_before) x)
     + (SELECT count(*) FROM (SELECT * FROM pv_before EXCEPT SELECT * FROM pv_after) x)
       AS changed_after_compaction;
SELECT quantity FROM invoice_preview(5215, '2026-01-20') WHERE meter = 'pv_error';
-- and with more usage counted after the compaction (deltas plus roll-ups):
-- 5203 gets 10000 more errors: 160000 over the reservation at 0.00029 = 46.40
SELECT record(5203, 'pv_error', 10000, '2026-01-31 23:30');
SELECT quantity, amount FROM invoice_preview(5203, '2026-01-20') WHERE meter = 'pv_error';
SET client_min_messages = warning;
SELECT compact_usage() > 0 AS compacted;
RESET client_min_messages;
SELECT quantity, amount FROM invoice_preview(5203, '2026-01-20') WHERE meter = 'pv_error';
