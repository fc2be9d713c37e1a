-- invoice_finalize: finalize_invoices(as_of) writes the invoice of every
-- period that ended at or before as_of - billing.grace_period (default one
-- hour) and has none yet (SPEC §5).  It is idempotent; each line keeps its
-- provenance (the charge version, its price, the quantity rated and the
-- unrounded amount); invoices and lines never change afterwards (55000), nor
-- do the charge versions that rated them; the total is the sum of the
-- rounded lines.
-- Accounts 5301-5399, meters and plans prefixed fz_, periods in late 2025.
SET search_path = billing, public;
\set SHOW_CONTEXT never
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET intervalstyle = 'postgres';

-- SQLSTATE and message of a statement's error, identity values masked
CREATE FUNCTION pg_temp.error_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, '[0-9]+', 'N', 'g');
END $$;
-- finalize, showing only this file's accounts (finalize_invoices bills all)
CREATE FUNCTION pg_temp.finalize(as_of timestamptz)
    RETURNS TABLE (account_id bigint, period_start timestamptz, period_end timestamptz, total numeric)
    LANGUAGE sql AS $$
    SELECT f.account_id, f.period_start, f.period_end, f.total
      FROM billing.finalize_invoices(as_of) f
     WHERE f.account_id BETWEEN 5301 AND 5399
     ORDER BY 1, 2
$$;

INSERT INTO meters (meter, late_window, unit) VALUES
    ('fz_error', '100 years', 'event'),
    ('fz_attach', '100 years', 'GB'),
    ('fz_span', '100 years', 'span');
INSERT INTO plans (plan) VALUES ('fz_team');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('fz_team', NULL, 'flat 26', 'Team'),
    ('fz_team', 'fz_error', 'graduated 50000 @ 0 | inf @ 0.00029', 'Errors'),
    ('fz_team', 'fz_attach', 'unit 0.25', 'Attachments (GB)'),
    ('fz_team', 'fz_span', 'unit 0.000001', 'Spans');
INSERT INTO accounts (account_id, name) VALUES (5301, 'no cap'), (5302, 'cap 2'), (5303, 'ends Sep 20');
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at, spend_cap) VALUES
    (5301, 'fz_team', '2025-09-01', NULL, NULL),
    (5302, 'fz_team', '2025-09-01', NULL, 2),
    (5303, 'fz_team', '2025-09-01', '2025-09-20', NULL);
SELECT count(*) FROM (
    SELECT record(a, 'fz_error', 60000, '2025-09-10'), record(a, 'fz_attach', 0.02, '2025-09-11'),
           record(a, 'fz_span', 5000, '2025-09-12')
      FROM generate_series(5301, 5303) AS a) r;

-- The grace period edge.  September ends 2025-10-01 00:00; with the
-- default grace period of one hour it is finalized from 01:00 on, not a
-- microsecond before.  5303's period was cut at Sep 20 and ended then.
SHOW billing.grace_period;
SELECT * FROM pg_temp.finalize('2025-09-20 00:59:59.999999');
SELECT * FROM pg_temp.finalize('2025-09-20 01:00');
SELECT * FROM pg_temp.finalize('2025-10-01 00:59:59.999999');
-- 5301: 26 + 10000 errors over 50000 at 0.00029 = 2.90 + 0.02 GB at 0.25 =
-- 0.005 -> 0.01 + 5000 spans at 0.000001 = 0.005 -> 0.01: 28.92.
-- 5302: usage 2.90 + 0.01 + 0.01 = 2.92 capped at 2: -0.92; 26 + 2 = 28.00.
SELECT * FROM pg_temp.finalize('2025-10-01 01:00');
-- Idempotent: a second call, or a later one with nothing new, creates nothing.
SELECT * FROM pg_temp.finalize('2025-10-01 01:00');
SELECT * FROM pg_temp.finalize('2025-10-31 23:59');

-- The lines and their provenance: the charge version that rated each line
-- (charge_id, shown by its valid_from and price), the quantity and the
-- unrounded amount.  Fixed and cap lines have no meter and no quantity.
SELECT i.account_id, l.line_no, l.kind, l.meter, l.description, l.quantity,
       l.unrounded_amount, l.amount, l.price, c.valid_from AS version_from,
       c.price = l.price AS price_is_the_versions
  FROM invoices i
       JOIN invoice_lines l USING (account_id, invoice_id)
       LEFT JOIN charges c ON c.charge_id = l.charge_id
 WHERE i.account_id IN (5301, 5302) AND i.period_start = '2025-09-01'
 ORDER BY 1, 2;
-- the invoice row
SELECT account_id, plan, period_start, period_end, currency, total, status
  FROM invoices WHERE account_id BETWEEN 5301 AND 5399 ORDER BY 1, 3;
-- The total is the sum of the rounded lines: 28.92, while the unrounded
-- amounts add up to 26 + 2.9 + 0.005 + 0.005 = 28.91.
SELECT i.account_id, i.total, sum(l.amount) AS sum_of_lines,
       sum(l.unrounded_amount) AS sum_unrounded
  FROM invoices i JOIN invoice_lines l USING (account_id, invoice_id)
 WHERE i.account_id = 5301
 GROUP BY i.account_id, i.invoice_id, i.total;
SELECT count(*) AS totals_not_the_sum_of_lines
  FROM invoices i
 WHERE i.account_id BETWEEN 5301 AND 5399
   AND i.total <> (SELECT coalesce(sum(l.amount), 0) FROM invoice_lines l
                    WHERE l.account_id = i.account_id AND l.invoice_id = i.invoice_id);
SELECT * FROM verify_invoices(5301);

-- Finalized invoices and their lines never change (55000).
UPDATE invoices SET total = 0 WHERE account_id = 5301;
UPDATE invoices SET status = 'void' WHERE account_id = 5301;
DELETE FROM invoices WHERE account_id = 5301;
TRUNCATE invoices CASCADE;
UPDATE invoice_lines SET amount = 0 WHERE account_id = 5301;
DELETE FROM invoice_lines WHERE account_id = 5301;
TRUNCATE invoice_lines;
SELECT count(*) AS invoices, sum(total) FROM invoices WHERE account_id IN (5301, 5302, 5303);

-- A charge version that rated a finalized invoice cannot be updated or
-- deleted (55000) ...
SELECT pg_temp.error_of($$UPDATE billing.charges SET price = 'unit 0.0003'
                          WHERE plan = 'fz_team' AND meter = 'fz_error'$$) AS update_version;
SELECT pg_temp.error_of($$UPDATE billing.charges SET description = 'Errors!'
                          WHERE plan = 'fz_team' AND meter = 'fz_error'$$) AS update_description;
SELECT pg_temp.error_of($$DELETE FROM billing.charges WHERE plan = 'fz_team' AND meter = 'fz_error'$$)
       AS delete_version;
-- ... a new version can be added: from October, errors above 50000 cost
-- 0.00025; it did not rate anything yet, so it can still be corrected.
INSERT INTO charges (plan, meter, price, valid_from, description)
VALUES ('fz_team', 'fz_error', 'graduated 50000 @ 0 | inf @ 0.0003', '2025-10-01', 'Errors');
UPDATE charges SET price = 'graduated 50000 @ 0 | inf @ 0.00025'
 WHERE plan = 'fz_team' AND meter = 'fz_error' AND valid_from = '2025-10-01';
SELECT price, valid_from FROM charges WHERE plan = 'fz_team' AND meter = 'fz_error' ORDER BY valid_from;

-- billing.grace_period takes the usual time units.  With 90 minutes,
-- October (ending Nov 1 00:00) is finalized from 01:30 on.  5301 has 70000
-- errors in October: 20000 at the new 0.00025 = 5.00, total 31.00; 5302
-- has none: 26.00.
SELECT record(5301, 'fz_error', 70000, '2025-10-31 23:59:59');
SET billing.grace_period = '90min';
SHOW billing.grace_period;
SELECT * FROM pg_temp.finalize('2025-11-01 01:00');
SELECT * FROM pg_temp.finalize('2025-11-01 01:29:59.999999');
SELECT * FROM pg_temp.finalize('2025-11-01 01:30');
SELECT l.line_no, l.quantity, l.amount, l.price, c.valid_from AS version_from
  FROM invoices i JOIN invoice_lines l USING (account_id, invoice_id)
       JOIN charges c ON c.charge_id = l.charge_id
 WHERE i.account_id = 5301 AND i.period_start = '2025-10-01' AND l.meter = 'fz_error';
-- September still shows the version that rated it
SELECT l.price FROM invoices i JOIN invoice_lines l USING (account_id, invoice_id)
 WHERE i.account_id = 5301 AND i.period_start = '2025-09-01' AND l.meter = 'fz_error';
SET billing.grace_period = '1h';
-- invalid settings are refused
SET billing.grace_period = '-1h';
SET billing.grace_period = 'soon';
SHOW billing.grace_period;
-- as_of must be given
SELECT * FROM finalize_invoices(NULL);

-- The grace period is an exact number of seconds, whatever the session's
-- time zone.  A daily plan for 5305 with periods ending at 06:30 UTC; the
-- US leaves daylight saving time on Nov 2 2025 at 06:00 UTC.  With a grace
-- period of 24 hours the period ending Nov 1 06:30 UTC (02:30 EDT) is final
-- from Nov 2 06:30 UTC on, 24 hours later, though the New York wall clock
-- then shows 01:30 EST, less than a calendar day later.  At Nov 2 07:00 UTC
-- both days are finalized.
INSERT INTO plans (plan, period) VALUES ('fz_daily', '1 day');
INSERT INTO charges (plan, meter, price, description) VALUES ('fz_daily', NULL, 'flat 1', 'Day');
INSERT INTO accounts (account_id, name) VALUES (5305, 'daily');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5305, 'fz_daily', '2025-10-30 06:30+00');
SET timezone = 'America/New_York';
SET billing.grace_period = '24h';
SELECT account_id, period_start AT TIME ZONE 'UTC' AS start_utc, period_end AT TIME ZONE 'UTC' AS end_utc, total
  FROM pg_temp.finalize('2025-11-02 06:29:59.999999+00');
SELECT account_id, period_start AT TIME ZONE 'UTC' AS start_utc, period_end AT TIME ZONE 'UTC' AS end_utc, total
  FROM pg_temp.finalize('2025-11-02 07:00+00');
SET timezone = 'UTC';
RESET billing.grace_period;

-- Periods not finalized yet are caught up in order, in one call: 5304
-- subscribed from June and was never finalized; at Dec 1 01:00 it gets
-- June to November.
INSERT INTO accounts (account_id, name) VALUES (5304, 'catch-up');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5304, 'fz_team', '2025-06-01');
SELECT record(5304, 'fz_error', 50001, '2025-07-31 23:59:59.999999');
SELECT * FROM pg_temp.finalize('2025-12-01 01:00') WHERE account_id = 5304;
-- July: 1 error over 50000 at 0.00029 = 0.00029 -> 0.00
SELECT i.period_start, l.quantity, l.unrounded_amount, l.amount
  FROM invoices i JOIN invoice_lines l USING (account_id, invoice_id)
 WHERE i.account_id = 5304 AND l.meter = 'fz_error' AND l.quantity > 0;
-- invoice numbers are unique and increase with the periods of an account
SELECT bool_and(invoice_id > prev) AS increasing
  FROM (SELECT invoice_id, lag(invoice_id, 1, 0::bigint) OVER (ORDER BY period_start) AS prev
          FROM invoices WHERE account_id = 5304) x;
SELECT count(*) = count(DISTINCT invoice_id) AS unique_ids FROM invoices;

-- billing.grace_period also takes interval syntax, also as the first
-- statement of a new connection (where, unless the server preloads billing,
-- the library is not loaded yet; test/settings/run.sh checks that case on
-- such a server).  December ends 2026-01-01 00:00: with 2 hours it is final
-- from 02:00 on, not at 01:00 as with the default of 1 hour.
\c -
SET billing.grace_period = '2 hours';
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SELECT f.account_id, f.period_start, f.total
  FROM billing.finalize_invoices('2026-01-01 01:59:59.999999+00') f
 WHERE f.account_id BETWEEN 5301 AND 5304 ORDER BY 1;
SHOW billing.grace_period;
SELECT f.account_id, f.period_start, f.total
  FROM billing.finalize_invoices('2026-01-01 02:00+00') f
 WHERE f.account_id BETWEEN 5301 AND 5304 ORDER BY 1;

-- A value the server cannot read is refused by SET (a value set before the
-- library was loaded, which SET cannot check, makes finalize_invoices fail:
-- test/settings/run.sh, on a server that does not preload billing).  A good
-- value set afterwards applies.
SET billing.grace_period = 'two hours';
SHOW billing.grace_period;
SET billing.grace_period = '90 min';
SELECT f.account_id, f.period_start, f.total
  FROM billing.finalize_invoices('2026-02-01 01:29:59.999999+00') f
 WHERE f.account_id BETWEEN 5301 AND 5304 ORDER BY 1;
SELECT f.account_id, f.period_start, f.total
  FROM billing.finalize_invoices('2026-02-01 01:30+00') f
 WHERE f.account_id BETWEEN 5301 AND 5304 ORDER BY 1;
