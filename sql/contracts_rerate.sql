-- contracts_rerate: re-rating meets credits and commitments (SPEC §10.2).
-- The credit, commitment and true-up lines of a finalized invoice never
-- change; rerate writes the deltas of its usage, fixed and cap lines as
-- adjustments, which the next invoice carries and which the credits live
-- in that period can pay.  A late event after a credit was drawn is paid by
-- what is left of the credits when the adjustment is invoiced.
-- Accounts 17401-17499, meters and plans prefixed cr_, periods in 2025.
SET search_path = billing, public;
\set SHOW_CONTEXT never
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET intervalstyle = 'postgres';
SELECT setval('billing.credit_grant_id_seq', 4000) > 0 AND setval('billing.commitment_id_seq', 4000) > 0
       AS ids_from_4001;

CREATE FUNCTION pg_temp.finalize(as_of timestamptz)
    RETURNS TABLE (account_id bigint, period_start date, total numeric)
    LANGUAGE sql AS $$
    SELECT f.account_id, f.period_start::date, f.total
      FROM billing.finalize_invoices(as_of) f
     WHERE f.account_id BETWEEN 17401 AND 17499
     ORDER BY 1, 2
$$;
-- lines, with invoice numbers (from a shared sequence) left out
CREATE FUNCTION pg_temp.lines(acc bigint)
    RETURNS TABLE (period date, line_no int, kind text, meter text, description text,
                   quantity numeric, amount numeric)
    LANGUAGE sql AS $$
    SELECT i.period_start::date, l.line_no, l.kind, l.meter,
           regexp_replace(l.description, '\(invoice [0-9]+\)', '(invoice N)'), l.quantity, l.amount
      FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
     WHERE i.account_id = acc ORDER BY i.period_start, l.line_no
$$;

INSERT INTO meters (meter, late_window) VALUES ('cr_api', '100 years');
INSERT INTO plans (plan) VALUES ('cr_usage');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('cr_usage', NULL, 'flat 20', 'Platform fee'),
    ('cr_usage', 'cr_api', 'unit 0.01', 'API calls');
INSERT INTO accounts (account_id, name) VALUES (17401, 'late event'), (17402, 'minimum'),
    (17403, 'correction');
INSERT INTO subscriptions (account_id, plan, starts_at)
SELECT a, 'cr_usage', '2025-01-01' FROM generate_series(17401, 17403) a;

-- 17401: a credit of 100; January costs 80 (the credit pays it, 20 left)
SELECT grant_credit(17401, 100, '2025-01-01', reason => 'prepaid credit') AS credit;
SELECT record(17401, 'cr_api', 6000, '2025-01-10');
-- 17402: a minimum of 100 for January, which spends 50 (a true-up of 50)
SELECT add_commitment(17402, 'minimum', 100, '2025-01-01', '2025-02-01') AS minimum;
SELECT record(17402, 'cr_api', 3000, '2025-01-10');
-- 17403: a credit of 500 pays January's 120; a correction then takes 5000
-- calls off January
SELECT grant_credit(17403, 500, '2025-01-01', reason => 'prepaid credit') AS credit;
SELECT record(17403, 'cr_api', 10000, '2025-01-10');
SELECT * FROM pg_temp.finalize('2025-02-01 01:00');
SELECT * FROM pg_temp.lines(17401);
SELECT * FROM pg_temp.lines(17402);

-- a late event: 5000 more calls in January, after its invoice; and the correction
SELECT record(17401, 'cr_api', 5000, '2025-01-30');
SELECT record(17402, 'cr_api', 4000, '2025-01-30');
SELECT correct_usage(17403, 'cr_api', '2025-01-10', -5000, 'test traffic');
SELECT account_id, meter, billed_quantity, billed_amount, correct_quantity, correct_amount, delta
  FROM rerate('2025-01-01', '2025-02-01') WHERE account_id BETWEEN 17401 AND 17499
 ORDER BY account_id, meter;
-- a second run finds nothing: the credit, commitment and true-up lines are
-- not re-rated (17402's true-up stays 50 though January now spends 90)
SELECT count(*) AS again FROM rerate('2025-01-01', '2025-02-01') WHERE account_id BETWEEN 17401 AND 17499;

-- February: 1000 calls (10) and the fee; the adjustment of +50 rides along,
-- and the credit's 20 left pays part of it
SELECT line_no, kind, regexp_replace(description, '\(invoice [0-9]+\)', '(invoice N)') AS description, amount
  FROM invoice_preview(17401, '2025-02-10');
SELECT record(17401, 'cr_api', 1000, '2025-02-10');
SELECT * FROM pg_temp.finalize('2025-03-01 01:00');
SELECT * FROM pg_temp.lines(17401) WHERE period = '2025-02-01';
SELECT * FROM pg_temp.lines(17403) WHERE period = '2025-02-01';
-- January's invoices are as they were
SELECT * FROM pg_temp.lines(17401) WHERE period = '2025-01-01';
SELECT grant_id, granted, used, remaining FROM credit_balance(17401, '2025-03-01');
-- the negative adjustment takes 17403's February to -30: credits do not
-- pay a negative line, and what the credit paid in January stays paid
SELECT grant_id, granted, used, remaining FROM credit_balance(17403, '2025-03-01');
SELECT * FROM verify_invoices() WHERE account_id BETWEEN 17401 AND 17499;
SELECT * FROM verify_audit_log() WHERE account_id BETWEEN 17401 AND 17499;
