-- contracts_change_plan: change_plan(account, plan, at) (SPEC §10.2) ends
-- the current subscription at `at` and starts the new plan there on the
-- same period grid: the period holding `at` is one invoice with both plans'
-- lines, fixed fees prorated by the seconds each plan covers, usage rated
-- per plan segment (tiers restart), the spend cap over the whole period; no
-- usage is dropped at the switch.  A change inside a finalized period is
-- refused (55000).
-- Accounts 17301-17399, meters and plans prefixed cp_, periods in 2025.
SET search_path = billing, public;
\set SHOW_CONTEXT never
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET intervalstyle = 'postgres';

CREATE FUNCTION pg_temp.error_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
CREATE FUNCTION pg_temp.finalize(as_of timestamptz)
    RETURNS TABLE (account_id bigint, period_start date, period_end date, total numeric)
    LANGUAGE sql AS $$
    SELECT f.account_id, f.period_start::date, f.period_end::date, f.total
      FROM billing.finalize_invoices(as_of) f
     WHERE f.account_id BETWEEN 17301 AND 17399
     ORDER BY 1, 2
$$;

INSERT INTO meters (meter, late_window) VALUES ('cp_api', '100 years');
INSERT INTO accounts (account_id, currency, name) VALUES (17301, 'EUR', 'upgrade'),
    (17302, 'EUR', 'to usage-based'), (17303, 'EUR', 'errors'), (17304, 'USD', 'dollars'),
    (17305, 'EUR', 'cancelled');
INSERT INTO plans (plan, currency) VALUES ('cp_eur100', 'EUR'), ('cp_eur200', 'EUR'),
    ('cp_usage', 'EUR'), ('cp_usd', 'USD');
INSERT INTO plans (plan, period, currency) VALUES ('cp_weekly', '7 days', 'EUR');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('cp_eur100', NULL, 'flat 100', 'Subscription'),
    ('cp_eur200', NULL, 'flat 200', 'Subscription'),
    ('cp_usage', 'cp_api', 'graduated 1000 @ 0 | inf @ 0.01', 'API calls');
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap) VALUES
    (17301, 'cp_eur100', '2025-01-01', NULL), (17302, 'cp_eur100', '2025-01-01', 80),
    (17303, 'cp_eur100', '2025-01-01', NULL), (17304, 'cp_usd', '2025-01-01', NULL);
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at) VALUES
    (17305, 'cp_eur100', '2025-01-01', '2025-01-20');

-- 1. EUR 100/month, changed to EUR 200/month on January 15 00:00: in a
-- 31-day January, 14 days of the first and 17 of the second
SELECT change_plan(17301, 'cp_eur200', '2025-01-15 00:00');
SELECT plan, starts_at, ends_at, period_anchor FROM subscriptions WHERE account_id = 17301 ORDER BY starts_at;
SELECT line_no, kind, description, amount FROM invoice_preview(17301, '2025-01-20');
-- the same plan again changes nothing
SELECT change_plan(17301, 'cp_eur200', '2025-01-20');
SELECT count(*) AS subscriptions FROM subscriptions WHERE account_id = 17301;

-- 2. from a subscription plan to usage-based pricing mid-month: the usage
-- after the switch is rated by the new plan, whose free tier starts over;
-- the spend cap of 80 caps the period's usage, before and after the switch
SELECT change_plan(17302, 'cp_usage', '2025-01-10 12:00');
SELECT count(record(17302, 'cp_api', q, t)) AS recorded
  FROM (VALUES (500, '2025-01-05'::timestamptz),                 -- before: not billed by cp_eur100
               (2500, '2025-01-10 11:59:59'), (1500, '2025-01-10 12:00'),   -- at the switch
               (9000, '2025-01-25')) v(q, t);
SELECT line_no, kind, meter, description, quantity, amount FROM invoice_preview(17302, '2025-01-20');
-- every unit recorded from the switch on is on a line: none dropped
SELECT sum(quantity) AS units_billed FROM invoice_preview(17302, '2025-01-20') WHERE kind = 'usage';
SELECT sum(quantity) AS units_since_switch FROM usage(17302, '2025-01-10 12:00', '2025-02-01');
-- remaining: the cap bounds the usage lines of both segments
SELECT remaining(17302, 'cp_api', '2025-01-20');
-- February is on the new plan alone
SELECT line_no, kind, description, amount FROM invoice_preview(17302, '2025-02-10');

-- 3. finalize: one invoice per period, both plans on it -----------------------------------
SELECT * FROM pg_temp.finalize('2025-02-01 01:00');
-- the invoice's plan is the one in force at its end
SELECT account_id, plan, period_start::date FROM invoices WHERE account_id IN (17301, 17302);
SELECT i.period_start::date, l.line_no, l.kind, l.description, l.amount, l.proration::numeric(8,6),
       l.segment_start, l.segment_end
  FROM invoices i JOIN invoice_lines l USING (account_id, invoice_id)
 WHERE i.account_id = 17301 ORDER BY l.line_no;
SELECT * FROM verify_invoices() WHERE account_id BETWEEN 17301 AND 17399;
-- late usage is billed by the plan of the segment it falls in: before the
-- switch the subscription plan bills none, after it the usage plan does
SELECT record(17302, 'cp_api', 200, '2025-01-08');
SELECT record(17302, 'cp_api', 300, '2025-01-28');
SELECT account_id, meter, billed_quantity, billed_amount, correct_quantity, correct_amount, delta
  FROM rerate('2025-01-01', '2025-02-01', 17302) ORDER BY meter NULLS LAST, billed_quantity;
SELECT segment_start, line_kind, meter, delta FROM adjustments WHERE account_id = 17302 ORDER BY adjustment_id;
-- a second rerate finds nothing more to do
SELECT count(*) AS again FROM rerate('2025-01-01', '2025-02-01', 17302);
SELECT * FROM verify_audit_log() WHERE account_id BETWEEN 17301 AND 17399;
SELECT action, details ->> 'from_plan' AS from_plan, details ->> 'to_plan' AS to_plan, details ->> 'at' AS at
  FROM audit_log WHERE account_id BETWEEN 17301 AND 17399 AND action = 'change_plan'
 ORDER BY account_id, seq;

-- 4. a change at a period boundary does not split a period; one inside a
-- finalized period is refused ------------------------------------------------------------
SELECT change_plan(17301, 'cp_eur100', '2025-02-01');
SELECT line_no, kind, description, amount FROM invoice_preview(17301, '2025-02-10');
SELECT pg_temp.error_of($$SELECT billing.change_plan(17301, 'cp_eur200', '2025-01-20')$$) AS in_a_finalized_period;
SELECT pg_temp.error_of($$SELECT billing.change_plan(17301, 'cp_eur200', '2025-01-31 23:59')$$) AS end_of_a_finalized_period;

-- 5. bad input -------------------------------------------------------------------------------
SELECT pg_temp.error_of($$SELECT billing.change_plan(17999, 'cp_eur200', '2025-03-01')$$) AS unknown_account;
SELECT pg_temp.error_of($$SELECT billing.change_plan(17303, 'cp_nope', '2025-03-01')$$) AS unknown_plan;
SELECT pg_temp.error_of($$SELECT billing.change_plan(17303, 'cp_usd', '2025-03-01')$$) AS other_currency;
SELECT pg_temp.error_of($$SELECT billing.change_plan(17303, 'cp_weekly', '2025-03-10')$$) AS other_period;
SELECT pg_temp.error_of($$SELECT billing.change_plan(17303, 'cp_eur200', '2024-06-01')$$) AS no_subscription;
SELECT pg_temp.error_of($$SELECT billing.change_plan(17303, 'cp_eur200', NULL)$$) AS null_at;
SELECT pg_temp.error_of($$SELECT billing.change_plan(17303, NULL, '2025-03-01')$$) AS null_plan;
-- no subscription may add a segment to a finalized period: 17305's
-- January was invoiced when its subscription ended on the 20th; another one
-- on the same grid from the 25th would put a second plan on that invoice
SELECT pg_temp.error_of($$INSERT INTO billing.subscriptions (account_id, plan, starts_at, period_anchor)
                          VALUES (17305, 'cp_eur200', '2025-01-25', '2025-01-01')$$) AS segment_of_a_finalized_period;
-- on a grid of its own it starts its own periods (as in 1.0)
SELECT pg_temp.error_of($$INSERT INTO billing.subscriptions (account_id, plan, starts_at)
                          VALUES (17305, 'cp_eur200', '2025-01-25')$$) AS own_grid;
SELECT pg_temp.error_of($$UPDATE billing.subscriptions SET period_anchor = '2024-12-15'
                           WHERE account_id = 17301 AND plan = 'cp_eur200'$$) AS grid_of_invoiced;
