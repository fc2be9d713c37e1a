-- rerate_reconcile: reconcile(source, account, meter, quantity, ts columns,
-- from_ts, to_ts) compares an independent record of usage with the
-- counters bucket by bucket and returns only the buckets that differ
-- (SPEC §6); verify_invoices() checks that every finalized invoice's total
-- is the sum of its lines and every usage and fixed line is the rounded
-- rating of its quantity with the price that rated it.
-- Accounts 6201-6299, meters and plans prefixed rc_, usage on 2023-07-04.
SET search_path = billing, public;
\set SHOW_CONTEXT never
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';

INSERT INTO meters (meter, aggregation, late_window) VALUES
    ('rc_error', 'sum', '100 years'),
    ('rc_request', 'count', '100 years'),
    ('rc_peak', 'max', '100 years');
INSERT INTO accounts (account_id, name) VALUES (6201, 'a'), (6202, 'b'), (6203, 'c');

-- The raw events, kept, and counted as they are inserted.
CREATE TABLE public.rc_events (account_id bigint, meter text, quantity numeric, ts timestamptz, event_id text);
SELECT meter_table('public.rc_events', 'account_id', 'meter', 'quantity', 'ts', 'event_id');
-- 3 accounts x 60 events of each meter between 10:00 and 11:59
INSERT INTO rc_events
SELECT a, m, (n % 7) + 1, timestamptz '2023-07-04 10:00' + n * interval '2 minutes' + (a - 6200) * interval '7 seconds',
       format('%s-%s-%s', a, m, n)
  FROM generate_series(6201, 6203) AS a, unnest('{rc_error,rc_request,rc_peak}'::text[]) AS m,
       generate_series(0, 59) AS n;
SELECT meter, count(*) AS rows, sum(quantity) AS quantity FROM rc_events GROUP BY meter ORDER BY meter;

-- The counters agree with the events: nothing differs, before and after
-- compaction (count meters count rows, max meters keep the largest).
SELECT * FROM reconcile('rc_events', 'account_id', 'meter', 'quantity', 'ts',
                        '2023-07-04', '2023-07-05');
SET client_min_messages = warning;
SELECT compact_usage() > 0 AS compacted;
RESET client_min_messages;
SELECT * FROM reconcile('rc_events', 'account_id', 'meter', 'quantity', 'ts',
                        '2023-07-04', '2023-07-05');

-- Inject three differences:
-- 1. a correction of +5 errors on 6202's 10:30 bucket (counted, not in the events)
SELECT correct_usage(6202, 'rc_error', '2023-07-04 10:30', 5, 'reconcile test');
-- 2. an event recorded for 6203 at 13:05 without a raw row
SELECT record(6203, 'rc_error', 4, '2023-07-04 13:05:10');
-- 3. a raw row that was never counted (triggers skipped): 6201 at 11:11
SET session_replication_role = replica;
INSERT INTO rc_events VALUES (6201, 'rc_request', 1, '2023-07-04 11:11:11', 'lost');
RESET session_replication_role;
-- and one outside the range compared (the next day)
SELECT record(6201, 'rc_error', 9, '2023-07-05 00:00');
-- reconcile finds exactly the three, and nothing else
SELECT * FROM reconcile('rc_events', 'account_id', 'meter', 'quantity', 'ts',
                        '2023-07-04', '2023-07-05');
-- the range is half-open: to_ts = 2023-07-05 00:00:00.000001 takes the
-- next day's first bucket too
SELECT count(*) FROM reconcile('rc_events', 'account_id', 'meter', 'quantity', 'ts',
                               '2023-07-04', '2023-07-05 00:00:00.000001');
-- a narrower range sees only what falls into it
SELECT account_id, meter, bucket_start, difference
  FROM reconcile('rc_events', 'account_id', 'meter', 'quantity', 'ts', '2023-07-04 10:30', '2023-07-04 10:31');
-- any relation works as the source, e.g. a view with other column names
CREATE VIEW public.rc_export AS SELECT account_id AS acct, meter AS what, quantity AS n, ts AS at FROM rc_events;
SELECT account_id, meter, bucket_start, difference
  FROM reconcile('rc_export', 'acct', 'what', 'n', 'at', '2023-07-04', '2023-07-05');

-- Errors: a column that does not exist (42703), NULL arguments (22004).
SELECT * FROM reconcile('rc_events', 'account_id', 'meter', 'qty', 'ts', '2023-07-04', '2023-07-05');
SELECT * FROM reconcile('rc_events', 'account_id', 'meter', 'quantity', 'ts', NULL, '2023-07-05');
SELECT * FROM reconcile(NULL, 'account_id', 'meter', 'quantity', 'ts', '2023-07-04', '2023-07-05');

-- verify_invoices: finalized invoices that are right give nothing.
INSERT INTO plans (plan) VALUES ('rc_team');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('rc_team', NULL, 'flat 26', 'Team'),
    ('rc_team', 'rc_error', 'graduated 100 @ 0 | inf @ 0.0033', 'Errors'),
    ('rc_team', 'rc_request', 'package 100 @ 0.5', 'Requests');
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap) VALUES
    (6201, 'rc_team', '2023-07-01', NULL),
    (6202, 'rc_team', '2023-07-01', 0.5),
    (6203, 'rc_team', '2023-07-01', NULL);
SELECT f.account_id, f.total FROM finalize_invoices('2023-08-01 01:00') f
 WHERE f.account_id BETWEEN 6201 AND 6299 ORDER BY 1;
-- Each account sent 60 events of 1..7 cycling: 8 cycles of 28 + 1+2+3+4 =
-- 234 errors.  6201: + 9 on July 5 = 243, 143 over the free 100 at 0.0033 =
-- 0.4719 -> 0.47; 60 requests = 1 package of 100 = 0.50 (the uncounted raw
-- row is not billed); 26.97.  6202: + 5 corrected = 239: 139 x 0.0033 =
-- 0.4587 -> 0.46, + 0.50 = 0.96 capped at 0.50: -0.46; 26.50.  6203: + 4 =
-- 238: 138 x 0.0033 = 0.4554 -> 0.46; 26.96.
SELECT i.account_id, l.line_no, l.kind, l.meter, l.quantity, l.unrounded_amount, l.amount
  FROM invoices i JOIN invoice_lines l USING (account_id, invoice_id)
 WHERE i.account_id BETWEEN 6201 AND 6299 ORDER BY 1, 2;
SELECT * FROM verify_invoices() WHERE account_id BETWEEN 6201 AND 6299;
SELECT * FROM verify_invoices(6201);

-- A line and a total changed behind the triggers' back are found.
CREATE TEMP TABLE rc_target AS
SELECT invoice_id FROM invoices WHERE account_id = 6201 AND period_start = '2023-07-01';
ALTER TABLE invoice_lines DISABLE TRIGGER invoice_lines_immutable;
ALTER TABLE invoices DISABLE TRIGGER invoices_immutable;
UPDATE invoice_lines SET amount = amount + 1
 WHERE account_id = 6201 AND invoice_id = (SELECT invoice_id FROM rc_target) AND meter = 'rc_error';
UPDATE invoices SET total = total + 0.01
 WHERE account_id = 6203 AND period_start = '2023-07-01';
SELECT v.account_id, v.line_no, v.problem
  FROM verify_invoices() v WHERE v.account_id BETWEEN 6201 AND 6299 ORDER BY 1, 2;
-- put them back
UPDATE invoice_lines SET amount = amount - 1
 WHERE account_id = 6201 AND invoice_id = (SELECT invoice_id FROM rc_target) AND meter = 'rc_error';
UPDATE invoices SET total = total - 0.01
 WHERE account_id = 6203 AND period_start = '2023-07-01';
ALTER TABLE invoice_lines ENABLE TRIGGER invoice_lines_immutable;
ALTER TABLE invoices ENABLE TRIGGER invoices_immutable;
SELECT count(*) FROM verify_invoices() WHERE account_id BETWEEN 6201 AND 6299;

-- clean up: the events table is no longer metered
SELECT unmeter_table('public.rc_events');
DROP VIEW public.rc_export;
DROP TABLE public.rc_events;
