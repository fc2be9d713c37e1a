-- rerate: rerate(from_ts, to_ts, account_id, dry_run) recomputes each
-- finalized invoice whose period overlaps [from_ts, to_ts) from today's
-- counters and today's charge versions, compares it with what was billed
-- plus the adjustments already recorded, and writes the difference to
-- billing.adjustments; the account's next invoice carries them as
-- adjustment lines (SPEC §6).  Deltas are differences of rounded lines, so
-- billed + adjustments is always what a fresh finalize would bill.  Every
-- source of change goes through it: late usage, correct_usage, a backdated
-- price, a charge added in the past, a changed spend cap or end.
-- Accounts 6101-6199, meters and plans prefixed rr_, periods in 2024.
SET search_path = billing, public;
\set SHOW_CONTEXT never
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';

-- finalize, showing only this file's accounts
CREATE FUNCTION pg_temp.finalize(as_of timestamptz)
    RETURNS TABLE (account_id bigint, period_start timestamptz, total numeric)
    LANGUAGE sql AS $$
    SELECT f.account_id, f.period_start, f.total FROM billing.finalize_invoices(as_of) f
     WHERE f.account_id BETWEEN 6101 AND 6199 ORDER BY 1, 2
$$;
-- rerate output with the invoice shown by its period (invoice ids depend
-- on what ran before)
CREATE FUNCTION pg_temp.rerate(from_ts timestamptz, to_ts timestamptz, acc bigint,
                               dry_run boolean DEFAULT false)
    RETURNS TABLE (account_id bigint, period date, meter text, billed_quantity numeric,
                   billed_amount numeric, correct_quantity numeric, correct_amount numeric,
                   delta numeric)
    LANGUAGE sql AS $$
    SELECT r.account_id, i.period_start::date, r.meter, r.billed_quantity, r.billed_amount,
           r.correct_quantity, r.correct_amount, r.delta
      FROM billing.rerate(from_ts, to_ts, acc, dry_run) r
           JOIN billing.invoices i ON i.account_id = r.account_id AND i.invoice_id = r.invoice_id
     ORDER BY 1, 2, 3
$$;
-- the lines of an account's invoice for a period
CREATE FUNCTION pg_temp.lines(acc bigint, period timestamptz)
    RETURNS TABLE (line_no int, kind text, meter text, description text, quantity numeric, amount numeric)
    LANGUAGE sql AS $$
    SELECT l.line_no, l.kind, l.meter,
           regexp_replace(l.description, 'invoice [0-9]+', 'invoice N'), l.quantity, l.amount
      FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
     WHERE i.account_id = acc AND i.period_start = period ORDER BY l.line_no
$$;

INSERT INTO meters (meter, aggregation, late_window, unit) VALUES
    ('rr_error', 'sum', '100 years', 'event'),
    ('rr_span', 'sum', '100 years', 'span'),
    ('rr_gb', 'sum', '100 years', 'GB'),
    ('rr_peak', 'max', '100 years', 'seat');
INSERT INTO meters (meter, aggregation, unit) VALUES ('rr_count', 'count', 'request');
INSERT INTO plans (plan) VALUES ('rr_team');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('rr_team', NULL, 'flat 26', 'Team'),
    ('rr_team', 'rr_error', 'graduated 50000 @ 0 | inf @ 0.00029', 'Errors');

-- 1. A late event after finalization: one delta, carried by the next invoice.
-- January: 60000 errors, 10000 over the 50000 free at 0.00029 = 2.90;
-- total 28.90.
INSERT INTO accounts (account_id, name) VALUES (6101, 'late event');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (6101, 'rr_team', '2024-01-01');
SELECT record(6101, 'rr_error', 60000, '2024-01-10');
SELECT * FROM pg_temp.finalize('2024-02-01 01:00');
-- 10000 errors of January arrive late; re-rating January bills 20000 over
-- the free 50000 = 5.80: a delta of 2.90.
SELECT record(6101, 'rr_error', 10000, '2024-01-31 23:59');
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6101);
-- a second run finds nothing
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6101);
-- the adjustment: which invoice and line, old and new quantity and amount,
-- why; pending until an invoice carries it
SELECT a.account_id, i.period_start::date AS invoice_period, a.line_kind, a.meter,
       a.old_quantity, a.new_quantity, a.old_amount, a.new_amount, a.delta, a.reason,
       a.actor = current_user AS by_me, a.billed_invoice_id IS NULL AS pending
  FROM adjustments a JOIN invoices i USING (account_id, invoice_id)
 WHERE a.account_id = 6101;
-- the February preview shows it as an adjustment line
SELECT line_no, kind, meter, regexp_replace(description, 'invoice [0-9]+', 'invoice N') AS description,
       quantity, amount
  FROM invoice_preview(6101, '2024-02-10');
-- and the February invoice carries it: 26 + 0 errors + 2.90 = 28.90
SELECT * FROM pg_temp.finalize('2024-03-01 01:00') WHERE account_id = 6101;
SELECT * FROM pg_temp.lines(6101, '2024-02-01');
SELECT a.billed_invoice_id = i.invoice_id AS carried_by_february
  FROM adjustments a, invoices i
 WHERE a.account_id = 6101 AND i.account_id = 6101 AND i.period_start = '2024-02-01';
-- once carried, it is no longer pending: March shows no adjustment line
SELECT count(*) FILTER (WHERE kind = 'adjustment') AS adjustment_lines
  FROM invoice_preview(6101, '2024-03-10');
-- and re-rating January and February again finds nothing (February's
-- adjustment line is not one of its own lines to recompute)
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-03-01', 6101);
-- An adjustment never changes once written (55000): were the one February
-- carried deleted or zeroed, the next rerate would bill its 2.90 again.
SELECT test.sqlstate_of($$DELETE FROM billing.adjustments WHERE account_id = 6101$$) AS delete_adjustment,
       test.sqlstate_of($$UPDATE billing.adjustments SET delta = 0 WHERE account_id = 6101$$) AS update_adjustment;
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-03-01', 6101);

-- 2. A backdated price: deltas for exactly the periods it covers.
-- 1000 errors a month at 0.001 until March, 0.003 from April (a version
-- known before finalizing): Jan-Mar 1.00, Apr-May 3.00.
INSERT INTO plans (plan) VALUES ('rr_versioned');
INSERT INTO charges (plan, meter, price, valid_from, description) VALUES
    ('rr_versioned', 'rr_error', 'unit 0.001', '-infinity', 'Errors'),
    ('rr_versioned', 'rr_error', 'unit 0.003', '2024-04-01', 'Errors');
INSERT INTO accounts (account_id, name) VALUES (6102, 'backdated price');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (6102, 'rr_versioned', '2024-01-01');
SELECT count(*) FROM (SELECT record(6102, 'rr_error', 1000, m + interval '9 days')
                        FROM generate_series(timestamptz '2024-01-01', '2024-05-01', '1 month') AS m) r;
SELECT * FROM pg_temp.finalize('2024-06-01 01:00') WHERE account_id = 6102;
-- A version at 0.002 from Jan 15 is inserted today.  It rates the periods
-- that start from Jan 15 up to the next version: February and March.  Not
-- January (it started Jan 1, before Jan 15), not April and May (0.003).
INSERT INTO charges (plan, meter, price, valid_from, description)
VALUES ('rr_versioned', 'rr_error', 'unit 0.002', '2024-01-15', 'Errors');
-- dry run: the deltas, nothing written
SELECT count(*) AS adjustments_before FROM adjustments WHERE account_id = 6102;
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-06-01', 6102, true);
SELECT count(*) AS adjustments_after_dry_run FROM adjustments WHERE account_id = 6102;
-- a range picks the invoices whose period overlaps it: March only
SELECT * FROM pg_temp.rerate('2024-03-31 23:59', '2024-04-01', 6102);
-- then the whole range: February only (March is done)
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-06-01', 6102);
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-06-01', 6102);
-- June's invoice carries both: 26-free plan, 1000 June errors at 0.003 =
-- 3.00, + 1.00 + 1.00 = 5.00
SELECT record(6102, 'rr_error', 1000, '2024-06-10');
SELECT * FROM pg_temp.finalize('2024-07-01 01:00') WHERE account_id = 6102;
SELECT * FROM pg_temp.lines(6102, '2024-06-01');

-- 3. A correction that brings usage back below a tier edge.  March: 60000
-- errors = 2.90; 10000 of them were a client's retry storm: corrected
-- down to 50000, all within the free tier, 0.00: delta -2.90.
INSERT INTO accounts (account_id, name) VALUES (6103, 'correction');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (6103, 'rr_team', '2024-03-01');
SELECT record(6103, 'rr_error', 20000, '2024-03-05 10:00'), record(6103, 'rr_error', 40000, '2024-03-06 11:17');
SELECT * FROM pg_temp.finalize('2024-04-01 01:00') WHERE account_id = 6103;
SELECT correct_usage(6103, 'rr_error', '2024-03-06 11:17', -10000, 'retry storm, ticket 4711');
SELECT account_id, meter, dimension, bucket_start, delta, reason, actor = current_user AS by_me
  FROM usage_corrections WHERE account_id = 6103;
SELECT quantity FROM usage(6103, '2024-03-06', '2024-03-07');
SELECT * FROM pg_temp.rerate('2024-03-01', '2024-04-01', 6103);
-- One more error (50001) costs 0.00029, which rounds to 0.00: the quantity
-- changed, the line did not, so there is no delta.
SELECT correct_usage(6103, 'rr_error', '2024-03-06 11:17', 1, 'one was real');
SELECT * FROM pg_temp.rerate('2024-03-01', '2024-04-01', 6103);
-- The next invoice carries -2.90: 26 - 2.90 = 23.10.
SELECT * FROM pg_temp.finalize('2024-05-01 01:00') WHERE account_id = 6103;
SELECT * FROM pg_temp.lines(6103, '2024-04-01');

-- 4. Re-rating a period whose spend cap was hit: the delta respects the cap.
-- Cap 5.  January: 60000 errors = 2.90, under the cap; total 28.90.
INSERT INTO accounts (account_id, name) VALUES (6104, 'capped');
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap) VALUES (6104, 'rr_team', '2024-01-01', 5);
SELECT record(6104, 'rr_error', 60000, '2024-01-10');
SELECT * FROM pg_temp.finalize('2024-02-01 01:00') WHERE account_id = 6104;
-- 20000 late errors: 80000 = 30000 over at 0.00029 = 8.70, capped at 5: the
-- usage line +5.80, a cap line -3.70; net +2.10 (from 2.90 to the cap).
SELECT record(6104, 'rr_error', 20000, '2024-01-20');
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6104);
-- 10000 more: 90000 = 11.60; usage +2.90, cap -2.90: net 0, the cap holds.
SELECT record(6104, 'rr_error', 10000, '2024-01-21');
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6104);
SELECT sum(delta) AS net FROM adjustments WHERE account_id = 6104;
-- billed usage + cap + adjustments = the cap
SELECT (SELECT sum(l.amount) FROM invoices i JOIN invoice_lines l USING (account_id, invoice_id)
         WHERE i.account_id = 6104 AND i.period_start = '2024-01-01' AND l.kind IN ('usage', 'cap'))
     + (SELECT sum(delta) FROM adjustments WHERE account_id = 6104) AS usage_billed_for_january;

-- 5. Rounding: deltas are differences of rounded lines, so billed +
-- adjustments equals what a fresh finalize of the same data bills, to the
-- cent.  Errors at 0.0033, GB at 0.125.  January: 7 errors = 0.0231 ->
-- 0.02; 0.3 GB = 0.0375 -> 0.04.
INSERT INTO plans (plan) VALUES ('rr_fine');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('rr_fine', 'rr_error', 'unit 0.0033', 'Errors'),
    ('rr_fine', 'rr_gb', 'unit 0.125', 'Storage (GB)');
INSERT INTO accounts (account_id, name) VALUES (6105, 'rounding'), (6106, 'rounding twin');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (6105, 'rr_fine', '2024-01-01');
SELECT record(6105, 'rr_error', 7, '2024-01-05'), record(6105, 'rr_gb', 0.3, '2024-01-05');
SELECT * FROM pg_temp.finalize('2024-02-01 01:00') WHERE account_id = 6105;
-- +1 error: 8 = 0.0264 -> 0.03, delta 0.01; +0.1 GB: 0.4 = 0.05, delta 0.01
SELECT record(6105, 'rr_error', 1, '2024-01-06'), record(6105, 'rr_gb', 0.1, '2024-01-06');
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6105);
-- +2 errors: 10 = 0.033 -> 0.03: no delta
SELECT record(6105, 'rr_error', 2, '2024-01-07');
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6105);
-- +5 errors: 15 = 0.0495 -> 0.05: delta 0.02 (not 0.0231 + ... unrounded)
SELECT record(6105, 'rr_error', 5, '2024-01-08');
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6105);
-- -0.05 GB corrected: 0.35 GB = 0.04375 -> 0.04, delta -0.01
SELECT correct_usage(6105, 'rr_gb', '2024-01-06 00:00', -0.05, 'double upload');
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6105);
-- A twin account with the final usage (15 errors, 0.35 GB) finalized fresh:
-- 0.05 + 0.04 = 0.09, line by line what 6105 billed plus its adjustments.
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (6106, 'rr_fine', '2024-01-01');
SELECT record(6106, 'rr_error', 15, '2024-01-05'), record(6106, 'rr_gb', 0.35, '2024-01-05');
SELECT * FROM pg_temp.finalize('2024-02-01 01:00') WHERE account_id = 6106;
SELECT l.meter, l.amount AS billed,
       (SELECT coalesce(sum(a.delta), 0) FROM adjustments a
         WHERE a.account_id = 6105 AND a.invoice_id = i.invoice_id AND a.meter = l.meter) AS adjusted,
       l.amount + (SELECT coalesce(sum(a.delta), 0) FROM adjustments a
                    WHERE a.account_id = 6105 AND a.invoice_id = i.invoice_id AND a.meter = l.meter) AS billed_in_all,
       t.amount AS fresh_finalize
  FROM invoices i JOIN invoice_lines l USING (account_id, invoice_id)
       JOIN (SELECT l2.meter, l2.amount FROM invoices i2 JOIN invoice_lines l2 USING (account_id, invoice_id)
              WHERE i2.account_id = 6106 AND i2.period_start = '2024-01-01') t ON t.meter = l.meter
 WHERE i.account_id = 6105 AND i.period_start = '2024-01-01'
 ORDER BY l.meter;

-- 6. A charge added to a plan in the past (a fixed fee and a usage charge
-- from -infinity): January is re-rated with them.  1,000,000 spans at
-- 0.000002 = 2.00; support 5.00.  No spans were billed before: the billed
-- quantity of the new usage line is 0 (like its billed amount).
INSERT INTO plans (plan) VALUES ('rr_addon');
INSERT INTO charges (plan, meter, price, description) VALUES ('rr_addon', NULL, 'flat 10', 'Base');
INSERT INTO accounts (account_id, name) VALUES (6107, 'charge added');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (6107, 'rr_addon', '2024-01-01');
SELECT record(6107, 'rr_span', 1000000, '2024-01-10');
SELECT * FROM pg_temp.finalize('2024-02-01 01:00') WHERE account_id = 6107;
INSERT INTO charges (plan, meter, price, description) VALUES
    ('rr_addon', 'rr_span', 'unit 0.000002', 'Spans'),
    ('rr_addon', NULL, 'flat 5', 'Support');
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6107);
SELECT line_kind, meter, description, old_quantity, new_quantity, old_amount, new_amount, delta
  FROM adjustments WHERE account_id = 6107 ORDER BY line_kind, meter;
-- 500 late spans: 1,000,500 = 2.001 -> 2.00, no delta; 5000 more:
-- 1,005,500 = 2.011 -> 2.01, delta 0.01.  What was billed for spans so far
-- is the 1,000,000 of the first adjustment.
SELECT record(6107, 'rr_span', 500, '2024-01-11');
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6107);
SELECT record(6107, 'rr_span', 5000, '2024-01-12');
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6107);
-- February shows the three adjustments with the quantities they bill
SELECT kind, meter, quantity, amount FROM invoice_preview(6107, '2024-02-10')
 WHERE kind = 'adjustment' ORDER BY meter, amount;

-- 7. A changed spend cap.  January: 80000 errors = 8.70, no cap.
INSERT INTO accounts (account_id, name) VALUES (6108, 'cap changed');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (6108, 'rr_team', '2024-01-01');
SELECT record(6108, 'rr_error', 80000, '2024-01-10');
SELECT * FROM pg_temp.finalize('2024-02-01 01:00') WHERE account_id = 6108;
-- A cap of 5 set afterwards: a cap line of -3.70 (no meter).
UPDATE subscriptions SET spend_cap = 5 WHERE account_id = 6108;
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6108);
-- raised to 10: the cap no longer cuts, +3.70 back
UPDATE subscriptions SET spend_cap = 10 WHERE account_id = 6108;
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6108);
UPDATE subscriptions SET spend_cap = NULL WHERE account_id = 6108;
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6108);

-- 8. A changed subscription end: January had 60000 errors before Jan 20
-- and 30000 after (90000 = 11.60).  Ending the subscription at Jan 20 cuts
-- January to [Jan 1, Jan 20): 60000 = 2.90, a delta of -8.70; the fixed
-- fee stays (no proration).
INSERT INTO accounts (account_id, name) VALUES (6109, 'end moved');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (6109, 'rr_team', '2024-01-01');
SELECT record(6109, 'rr_error', 60000, '2024-01-10'), record(6109, 'rr_error', 30000, '2024-01-25');
SELECT * FROM pg_temp.finalize('2024-02-01 01:00') WHERE account_id = 6109;
UPDATE subscriptions SET ends_at = '2024-01-20' WHERE account_id = 6109;
SELECT * FROM pg_temp.rerate('2024-01-01', '2024-02-01', 6109);

-- 9. Errors.  correct_usage needs a reason (22004), must not make a bucket
-- negative (22023) and only corrects sum and count meters (22023).
SELECT correct_usage(6103, 'rr_error', '2024-03-06 11:17', -1, NULL);
SELECT correct_usage(6103, 'rr_error', '2024-03-06 11:17', -1, '  ');
SELECT correct_usage(6103, 'rr_error', '2024-03-06 11:17', -50002, 'too much');
SELECT correct_usage(6103, 'rr_error', '2024-03-07 00:00', -1, 'empty bucket');
SELECT record(6103, 'rr_peak', 3, '2024-03-06');
SELECT correct_usage(6103, 'rr_peak', '2024-03-06 00:00', 1, 'peak meter');
SELECT correct_usage(6103, 'rr_error', '2024-03-06 11:17:30', 1, 'not a bucket start');
SELECT correct_usage(6103, 'rr_error', '2024-03-06 11:17', NULL, 'no delta');
SELECT correct_usage(6103, 'rr_nope', '2024-03-06 11:17', 1, 'no such meter');
SELECT correct_usage(6199, 'rr_error', '2024-03-06 11:17', 1, 'no such account');
-- nothing was written by the failed corrections
SELECT count(*) AS corrections FROM usage_corrections WHERE account_id = 6103;
-- A correction takes any age: a count meter with the default 35-day late
-- window is corrected in 2024, and a bucket can go down to exactly 0.
SELECT correct_usage(6103, 'rr_count', '2024-03-08 00:00', 3, 'requests lost by a collector');
SELECT correct_usage(6103, 'rr_count', '2024-03-08 00:00', -3, 'they were counted after all');
SELECT quantity FROM usage(6103, '2024-03-08', '2024-03-09', NULL, 'rr_count');
-- rerate needs a range (22023 when empty or reversed) and non-null arguments
SELECT * FROM rerate('2024-02-01', '2024-02-01');
SELECT * FROM rerate('2024-02-01', '2024-01-01');
SELECT * FROM rerate(NULL, '2024-01-01');
SELECT * FROM rerate('2024-01-01', '2024-02-01', 6101, NULL);

-- 10. Everything above, all accounts at once: nothing left to re-rate; for
-- every finalized invoice of 2024 the billed lines plus their adjustments
-- are the lines a fresh rating of the period gives, and verify_invoices
-- finds nothing wrong.
SELECT count(*) AS rerate_all FROM rerate('2024-01-01', '2025-01-01');
SELECT count(*) AS invoices,
       count(*) FILTER (WHERE NOT ok) AS not_billed_correctly
  FROM (SELECT i.account_id, i.invoice_id,
               NOT EXISTS (
                   SELECT kind, meter, sum(amount) FROM (
                       SELECT l.kind, l.meter, l.description, l.amount
                         FROM invoice_lines l
                        WHERE l.account_id = i.account_id AND l.invoice_id = i.invoice_id
                          AND l.kind <> 'adjustment'
                       UNION ALL
                       SELECT a.line_kind, a.meter, a.description, a.delta
                         FROM adjustments a
                        WHERE a.account_id = i.account_id AND a.invoice_id = i.invoice_id
                       UNION ALL
                       SELECT r.kind, r.meter, r.description, -r.amount
                         FROM subscriptions s JOIN plans p USING (plan),
                              _rate_period(i.account_id, i.plan, i.currency, s.spend_cap, i.period_start,
                                           LEAST(i.period_end, s.ends_at)) r
                        WHERE s.account_id = i.account_id AND s.starts_at <= i.period_start
                          AND i.period_start < coalesce(s.ends_at, 'infinity')) x
                    GROUP BY kind, meter, CASE WHEN kind = 'fixed' THEN description END
                   HAVING sum(amount) <> 0) AS ok
          FROM invoices i
         WHERE i.account_id BETWEEN 6101 AND 6199) v;
SELECT * FROM verify_invoices() WHERE account_id BETWEEN 6101 AND 6199;
