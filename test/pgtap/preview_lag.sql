-- preview_lag: invoice_preview of a period whose earlier periods have no
-- invoice yet (the grace period, or finalize_invoices lagging) shows the
-- invoice finalize will write: the earlier periods draw credits and count
-- toward a minimum window first, as they will when finalized.  The preview
-- is the same before and after the earlier period is finalized, and the
-- invoice finalized later has the preview's lines; a period already
-- finalized previews as its invoice.
BEGIN;
SELECT plan(22);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;

INSERT INTO billing.meters (meter, late_window) VALUES ('pl_api', '100 years');
INSERT INTO billing.plans (plan) VALUES ('pl_usage');
INSERT INTO billing.charges (plan, meter, price) VALUES ('pl_usage', 'pl_api', 'unit 1');
INSERT INTO billing.accounts (account_id) VALUES (9841), (9842), (9843), (9844);
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
SELECT a, 'pl_usage', '2025-01-01' FROM unnest(ARRAY[9841, 9842, 9843, 9844]) a;
-- 9841: a credit of 100; 9842: a minimum of 200 over January and February;
-- 9843: neither (the usual preview)
SELECT billing.grant_credit(9841, 100, '2025-01-01', reason => 'welcome');
SELECT billing.add_commitment(9842, 'minimum', 200, '2025-01-01', '2025-03-01');
-- 80 calls in January, 50 in February, 10 in March
SELECT billing.record(a, 'pl_api', 80, '2025-01-10') FROM unnest(ARRAY[9841, 9842, 9843]) a;
SELECT billing.record(a, 'pl_api', 50, '2025-02-10') FROM unnest(ARRAY[9841, 9842, 9843]) a;
SELECT billing.record(a, 'pl_api', 10, '2025-03-10') FROM unnest(ARRAY[9841, 9842, 9843]) a;
-- 9844: a prepaid commitment of 100 a month, the rest rolling over; 80
-- calls in January leave 20, which February draws after its own 100
SELECT billing.add_commitment(9844, 'prepaid', 200, '2025-01-01', '2025-03-01',
                              commit_period => '1 month', rollover_fraction => 1);
SELECT billing.record(9844, 'pl_api', 80, '2025-01-10');
SELECT billing.record(9844, 'pl_api', 130, '2025-02-10');

CREATE FUNCTION pg_temp.preview(a bigint) RETURNS text LANGUAGE sql AS
$$SELECT string_agg(format('%s %s %s %s', line_no, kind, quantity, amount), '; ' ORDER BY line_no)
    FROM billing.invoice_preview(a, '2025-02-15')$$;

-- January has no invoice yet
SELECT is(pg_temp.preview(9841), '1 usage 50 50.00; 2 credit  -20.00',
          'credit: January draws 80 of the 100 first, February the 20 left');
SELECT is(pg_temp.preview(9842), '1 usage 50 50.00; 2 true_up 130.00 70.00',
          'minimum: the shortfall counts January''s spend too');
SELECT is(pg_temp.preview(9843), '1 usage 50 50.00', 'neither: the usage');
SELECT is(pg_temp.preview(9844),
          '1 usage 130 130.00; 2 commitment  100.00; 3 credit  -100.00; 4 credit  -20.00',
          'rollover: January''s rest rolls over into a grant February draws (January booked as finalize books it)');
CREATE TEMP TABLE before_jan AS
SELECT a, pg_temp.preview(a) AS lines FROM unnest(ARRAY[9841, 9842, 9843, 9844]) a;
-- March, with January and February open: both draw first, nothing is left
SELECT is((SELECT string_agg(format('%s %s %s %s', line_no, kind, quantity, amount), '; ' ORDER BY line_no)
             FROM billing.invoice_preview(9841, '2025-03-15')),
          '1 usage 10 10.00', 'March: January and February drew the whole credit first');

-- January finalized: the previews do not change
SELECT is((SELECT count(*) FROM billing.finalize_invoices('2025-02-01 01:00+00')
            WHERE account_id BETWEEN 9841 AND 9844), 4::bigint, 'January finalized');
SELECT is((SELECT count(*) FROM before_jan b WHERE b.lines IS DISTINCT FROM pg_temp.preview(b.a)),
          0::bigint, 'each preview is the same once January is finalized');

-- February finalized: its invoices have the preview's lines
SELECT is((SELECT count(*) FROM billing.finalize_invoices('2025-03-01 01:00+00')
            WHERE account_id BETWEEN 9841 AND 9844), 4::bigint, 'February finalized');
SELECT is((SELECT count(*) FROM before_jan b
            WHERE b.lines IS DISTINCT FROM
                  (SELECT string_agg(format('%s %s %s %s', l.line_no, l.kind, l.quantity, l.amount),
                                     '; ' ORDER BY l.line_no)
                     FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
                    WHERE i.account_id = b.a AND i.period_start = '2025-02-01')),
          0::bigint, 'each February invoice has the lines its preview showed while January was open');
SELECT is((SELECT string_agg(format('%s %s %s %s', line_no, kind, quantity, amount), '; ' ORDER BY line_no)
             FROM billing.invoice_preview(9841, '2025-03-15')),
          '1 usage 10 10.00', 'and the same with both finalized');

-- 9845: a period with no invoice behind a later one that has one.  January
-- and March are finalized; then the first subscription is extended over
-- February, which finalize will bill first: it draws 100 of the credit of
-- 150 before April does
INSERT INTO billing.accounts (account_id) VALUES (9845);
INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at) VALUES
    (9845, 'pl_usage', '2025-01-01', '2025-02-01'), (9845, 'pl_usage', '2025-03-01', NULL);
SELECT billing.record(9845, 'pl_api', 100, '2025-02-10');
SELECT billing.record(9845, 'pl_api', 100, '2025-04-10');
SELECT is((SELECT string_agg(to_char(period_start, 'MM'), ',' ORDER BY period_start)
             FROM billing.finalize_invoices('2025-04-01 01:00+00') WHERE account_id = 9845),
          '01,03', 'January and March finalized');
UPDATE billing.subscriptions SET ends_at = '2025-03-01' WHERE account_id = 9845 AND starts_at = '2025-01-01';
SELECT billing.grant_credit(9845, 150, '2025-01-01');
SELECT is((SELECT string_agg(format('%s %s %s %s', line_no, kind, quantity, amount), '; ' ORDER BY line_no)
             FROM billing.invoice_preview(9845, '2025-04-15')),
          '1 usage 100 100.00; 2 credit  -50.00',
          'a period with no invoice behind a finalized one draws first');
SELECT is((SELECT string_agg(to_char(period_start, 'MM'), ',' ORDER BY period_start)
             FROM billing.finalize_invoices('2025-05-01 01:00+00') WHERE account_id = 9845),
          '02,04', 'finalize bills February, then April');
SELECT is((SELECT string_agg(format('%s %s %s %s', l.line_no, l.kind, l.quantity, l.amount), '; ' ORDER BY l.line_no)
             FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
            WHERE i.account_id = 9845 AND i.period_start = '2025-04-01'),
          '1 usage 100 100.00; 2 credit  -50.00', 'with the lines the preview showed');

-- a period already finalized shows its invoice: a price changed back to
-- February leaves a correction pending for the next invoice, not on it
INSERT INTO billing.charges (plan, meter, price, valid_from) VALUES ('pl_usage', 'pl_api', 'unit 2', '2025-02-01');
SELECT is((SELECT count(*) FROM billing.rerate('2025-02-01', '2025-03-01', 9843)), 1::bigint,
          'a re-rate of February leaves one adjustment pending');
SELECT is((SELECT string_agg(format('%s %s %s %s', line_no, kind, quantity, amount), '; ' ORDER BY line_no)
             FROM billing.invoice_preview(9843, '2025-02-15')),
          '1 usage 50 50.00', 'the preview of finalized February is its invoice, without the pending correction');

-- 9846: a daily plan with a unique meter, 20 days open: the preview rates
-- 21 periods (more than 16: hash joins, no nested loops), and each
-- period's distinct users are counted by _unique_counts, which keeps
-- nested loops on for its one account's lookups (with them off, the
-- planner ran each of its reads in parallel workers)
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES ('pl_users', 'unique', '100 years');
INSERT INTO billing.plans (plan, period) VALUES ('pl_daily', '1 day');
INSERT INTO billing.charges (plan, meter, price) VALUES ('pl_daily', 'pl_users', 'unit 1');
INSERT INTO billing.accounts (account_id) VALUES (9846);
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9846, 'pl_daily', '2025-06-01');
SELECT billing.grant_credit(9846, 50, '2025-06-01');
SELECT count(*) FROM (
    SELECT billing.record(9846, 'pl_users', 1, timestamptz '2025-06-01 10:00+00' + d * interval '1 day', dimension => 'u' || u)
      FROM generate_series(0, 20) d, generate_series(1, 3) u) x;
SELECT is((SELECT string_agg(format('%s %s %s %s', line_no, kind, quantity, amount), '; ' ORDER BY line_no)
             FROM billing.invoice_preview(9846, '2025-06-21 12:00')),
          '1 usage 3 3.00', 'day 21 of a daily plan: the 20 days before drew the whole credit of 50 first');
SELECT ok((SELECT 'enable_nestloop=on' = ANY (proconfig) FROM pg_proc
            WHERE oid = 'billing._unique_counts(bigint, timestamptz, timestamptz, text[], text[], text[])'::regprocedure),
          '_unique_counts keeps nested loops on whatever its caller set');
SELECT is((SELECT count(*) FROM billing.finalize_invoices('2025-06-22 01:00+00') WHERE account_id = 9846),
          21::bigint, 'finalize bills the 21 days');
SELECT is((SELECT string_agg(format('%s %s %s %s', l.line_no, l.kind, l.quantity, l.amount), '; ' ORDER BY l.line_no)
             FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
            WHERE i.account_id = 9846 AND i.period_start = '2025-06-21'),
          '1 usage 3 3.00', 'with day 21 as the preview showed it');

-- 9847: the latest invoice overlapping a subscription is on another grid
-- (a quarter, then months): the probe walks each subscription's own grid
-- from the period after the one holding that invoice's start, as
-- _due_periods does, so the preview of October sees August and September
-- open, and shows what finalize will write
INSERT INTO billing.plans (plan, period) VALUES ('pl_quarter', '3 months'), ('pl_month', '1 month');
INSERT INTO billing.charges (plan, meter, price, description) VALUES
    ('pl_quarter', NULL, 'flat 300', 'quarter'), ('pl_month', NULL, 'flat 100', 'month');
INSERT INTO billing.accounts (account_id) VALUES (9847);
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9847, 'pl_quarter', '2025-07-01');
SELECT is((SELECT count(*) FROM billing.finalize_invoices('2025-10-01 01:00+00') WHERE account_id = 9847),
          1::bigint, 'the third quarter finalized');
UPDATE billing.subscriptions SET ends_at = '2025-08-01' WHERE account_id = 9847;
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9847, 'pl_month', '2025-08-01');
SELECT billing.grant_credit(9847, 150, '2025-07-01');
CREATE TEMP TABLE oct_preview AS
SELECT string_agg(format('%s %s %s %s', line_no, kind, quantity, amount), '; ' ORDER BY line_no) AS lines
  FROM billing.invoice_preview(9847, '2025-10-15');
SELECT count(*) FROM billing.finalize_invoices('2025-11-01 01:00+00');
SELECT is((SELECT string_agg(format('%s %s %s %s', l.line_no, l.kind, l.quantity, l.amount), '; ' ORDER BY l.line_no)
             FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
            WHERE i.account_id = 9847 AND i.period_start = '2025-10-01'),
          (SELECT lines FROM oct_preview), 'October''s invoice has the lines its preview showed');

ROLLBACK;
