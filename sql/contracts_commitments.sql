-- contracts_commitments: prepaid and minimum commitments (SPEC §10.2).
-- A prepaid commitment is a credit grant per window (commit_period repeats
-- the window), invoiced in installments on the window's first periods
-- (installment i = round(A*i/n) - round(A*(i-1)/n)), with rollover_fraction
-- of what is left carried into a grant for the next window; a minimum
-- commitment bills a true_up line when a window's eligible spend (usage,
-- fixed and cap lines, restricted to applies_to) falls short.
-- Accounts 17201-17299, meters and plans prefixed cm_, periods in 2025.
SET search_path = billing, public;
\set SHOW_CONTEXT never
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET intervalstyle = 'postgres';
-- ids from 2001 (the sequences are shared by every test)
SELECT setval('billing.credit_grant_id_seq', 2000) > 0 AND setval('billing.commitment_id_seq', 2000) > 0
       AS ids_from_2001;

CREATE FUNCTION pg_temp.error_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
CREATE FUNCTION pg_temp.finalize(as_of timestamptz)
    RETURNS TABLE (account_id bigint, period_start date, total numeric)
    LANGUAGE sql AS $$
    SELECT f.account_id, f.period_start::date, f.total
      FROM billing.finalize_invoices(as_of) f
     WHERE f.account_id BETWEEN 17201 AND 17299
     ORDER BY 1, 2
$$;
CREATE FUNCTION pg_temp.lines(acc bigint)
    RETURNS TABLE (period date, line_no int, kind text, meter text, description text,
                   quantity numeric, amount numeric)
    LANGUAGE sql AS $$
    SELECT i.period_start::date, l.line_no, l.kind, l.meter, l.description, l.quantity, l.amount
      FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
     WHERE i.account_id = acc ORDER BY i.period_start, l.line_no
$$;

INSERT INTO meters (meter, late_window) VALUES ('cm_api', '100 years'), ('cm_gpu', '100 years');
INSERT INTO plans (plan) VALUES ('cm_usage');
INSERT INTO plans (plan, period) VALUES ('cm_weekly', '7 days');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('cm_usage', NULL, 'flat 50', 'Platform fee'),
    ('cm_usage', 'cm_api', 'unit 0.01', 'API calls'),
    ('cm_usage', 'cm_gpu', 'unit 2', 'GPU hours'),
    ('cm_weekly', 'cm_api', 'unit 0.01', 'API calls');
INSERT INTO accounts (account_id, name) VALUES (17201, 'annual commit'), (17202, 'quarterly minimum'),
    (17203, 'installments'), (17204, 'errors');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES
    (17201, 'cm_usage', '2025-01-01'), (17202, 'cm_usage', '2025-01-01'),
    (17203, 'cm_usage', '2025-01-01'), (17204, 'cm_usage', '2025-01-01');

-- 1. an annual commit of 12,000 billed monthly: 12 monthly windows of 1,000,
-- each a grant on its month, invoiced on it; half of what is left rolls over
SELECT add_commitment(17201, 'prepaid', 12000, '2025-01-01', '2026-01-01',
                      commit_period => '1 month', rollover_fraction => 0.5) AS annual;
SELECT window_no, starts_at::date, ends_at::date, amount
  FROM commitment_windows WHERE account_id = 17201 ORDER BY window_no LIMIT 3;
SELECT count(*) AS windows, sum(amount) AS total FROM commitment_windows WHERE account_id = 17201;
SELECT grant_id, amount, effective_at::date, expires_at::date, source, reason
  FROM credit_grants WHERE account_id = 17201 ORDER BY grant_id LIMIT 3;
-- January uses 600 (API 400, GPU 150, fee 50), February 1,400: the
-- January grant pays 600 and 200 is carried into February (half of 400);
-- February's 1,000 + 200 pay its 1,400 but 200
SELECT count(record(17201, m, q, t)) AS recorded
  FROM (VALUES ('cm_api', 40000, '2025-01-10'::timestamptz), ('cm_gpu', 75, '2025-01-11'),
               ('cm_api', 100000, '2025-02-10'), ('cm_gpu', 175, '2025-02-11')) v(m, q, t);
SELECT line_no, kind, description, amount FROM invoice_preview(17201, '2025-01-20');

-- 2. a minimum of 2,000 on API calls over two quarters: 1,000 a quarter;
-- and installments ---------------------------------------------------------------------------
SELECT add_commitment(17202, 'minimum', 2000, '2025-01-01', '2025-07-01', '3 months',
                      applies_to => '{cm_api}') AS minimum;
SELECT window_no, starts_at::date, ends_at::date, amount
  FROM commitment_windows WHERE account_id = 17202 ORDER BY window_no;
-- API calls: 200 in January, 300 in February, 100 in March (the GPU hours
-- do not count); the second quarter spends 1,200
SELECT count(record(17202, m, q, t)) AS recorded
  FROM (VALUES ('cm_api', 20000, '2025-01-10'::timestamptz), ('cm_api', 30000, '2025-02-10'),
               ('cm_api', 10000, '2025-03-10'), ('cm_gpu', 500, '2025-03-11'),
               ('cm_api', 120000, '2025-05-10')) v(m, q, t);
-- 1,000 prepaid for the first quarter, invoiced in three installments
-- (333.33, 333.34, 333.33: they add up to 1,000)
SELECT add_commitment(17203, 'prepaid', 1000, '2025-01-01', '2025-04-01', installments => 3) AS q1;
SELECT * FROM pg_temp.finalize('2025-07-01 01:00');
SELECT * FROM pg_temp.lines(17201) WHERE period < '2025-04-01';
SELECT grant_id, effective_at::date, expires_at::date, granted, used, expired, rolled_over, remaining
  FROM credit_balance(17201, '2025-04-01') ORDER BY effective_at, grant_id;
-- the rollover grant carries its commitment's window and terms
SELECT grant_id, amount, effective_at::date, expires_at::date, source, window_no, rolled_from, reason
  FROM credit_grants WHERE account_id = 17201 AND source = 'rollover' ORDER BY grant_id;
SELECT seq, grant_id, kind, amount, effective_at::date FROM credit_ledger
 WHERE account_id = 17201 AND kind <> 'grant' AND effective_at < '2025-03-02' ORDER BY seq;
-- the true-up: the first quarter spent 600 on API calls (400 short, billed
-- on March's invoice), the second 1,200
SELECT period, kind, description, quantity, amount FROM pg_temp.lines(17202)
 WHERE kind IN ('usage', 'true_up') AND meter IS DISTINCT FROM 'cm_gpu';
SELECT period, kind, description, amount FROM pg_temp.lines(17203) WHERE kind IN ('commitment', 'credit');
SELECT sum(amount) AS installments FROM invoice_lines WHERE account_id = 17203 AND kind = 'commitment';
SELECT * FROM verify_invoices() WHERE account_id BETWEEN 17201 AND 17299;
SELECT * FROM verify_audit_log() WHERE account_id BETWEEN 17201 AND 17299;
SELECT action, object FROM audit_log WHERE account_id BETWEEN 17201 AND 17299 AND action = 'commit'
 ORDER BY account_id, seq;

-- 3. bad input --------------------------------------------------------------------------------
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17999, 'prepaid', 10, '2025-08-01', '2025-09-01')$$) AS unknown_account;
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17204, 'prepaid', 10, '2025-08-01', '2025-09-01', applies_to => '{cm_nope}')$$) AS unknown_meter;
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17204, 'postpaid', 10, '2025-08-01', '2025-09-01')$$) AS unknown_kind;
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17204, 'prepaid', -10, '2025-08-01', '2025-09-01')$$) AS negative;
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17204, 'prepaid', 'NaN', '2025-08-01', '2025-09-01')$$) AS nan;
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17204, 'prepaid', 10, '2025-09-01', '2025-08-01')$$) AS ends_before_start;
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17204, 'prepaid', 10, '2025-08-01', '2025-09-01', installments => 0)$$) AS no_installments;
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17204, 'prepaid', 10, '2025-08-01', '2025-09-01', installments => 2)$$) AS more_installments_than_periods;
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17204, 'prepaid', 10, '2025-08-01', '2025-09-01', rollover_fraction => 1.5)$$) AS rollover_above_1;
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17204, 'prepaid', 10, '2025-08-01', '2025-09-01', rollover_fraction => -0.1)$$) AS rollover_below_0;
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17204, 'prepaid', 10, '2025-08-15', '2025-09-01')$$) AS not_on_a_period_boundary;
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17204, 'prepaid', 10, '2025-08-01', '2025-12-01', '45 days')$$) AS window_off_the_grid;
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17204, 'prepaid', 10, '2025-01-01', '2025-09-01')$$) AS in_a_finalized_period;
SELECT pg_temp.error_of($$SELECT billing.add_commitment(17204, NULL, 10, '2025-08-01', '2025-09-01')$$) AS null_kind;
-- commitments and their windows never change
SELECT pg_temp.error_of($$UPDATE billing.commitments SET amount = 1 WHERE account_id = 17201$$) AS commitment_update;
SELECT pg_temp.error_of($$DELETE FROM billing.commitment_windows WHERE account_id = 17201$$) AS window_delete;
