-- contracts_credits: prepaid and promotional credits (SPEC §10.2).
-- grant_credit books a grant in the append-only credit_ledger (idempotent by
-- key); finalize_invoices draws credits in one total order (priority, grants
-- with applies_to first, earliest expiry, effective_at, grant_id), a grant
-- paying only the lines it applies to, never the commitment or cap lines,
-- never taking an invoice below 0; a grant that draws 0 writes no line;
-- what is left at expiry is booked 'expire' by the run that finalizes the
-- last period overlapping the grant; void_credit forfeits what is left.
-- Accounts 17101-17199, meters and plans prefixed cc_, periods in 2025.
SET search_path = billing, public;
\set SHOW_CONTEXT never
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET intervalstyle = 'postgres';
-- grant ids from 1001 (the sequence is shared by every test)
SELECT setval('billing.credit_grant_id_seq', 1000) > 0 AS ids_from_1001;

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
     WHERE f.account_id BETWEEN 17101 AND 17199
     ORDER BY 1, 2
$$;
CREATE FUNCTION pg_temp.lines(acc bigint)
    RETURNS TABLE (period date, line_no int, kind text, meter text, description text,
                   amount numeric, grant_id bigint)
    LANGUAGE sql AS $$
    SELECT i.period_start::date, l.line_no, l.kind, l.meter, l.description, l.amount, l.grant_id
      FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
     WHERE i.account_id = acc ORDER BY i.period_start, l.line_no
$$;
CREATE FUNCTION pg_temp.ledger(acc bigint)
    RETURNS TABLE (seq bigint, grant_id bigint, kind text, amount numeric, effective_at date,
                   invoice_period date)
    LANGUAGE sql AS $$
    SELECT c.seq, c.grant_id, c.kind, c.amount, c.effective_at::date, i.period_start::date
      FROM billing.credit_ledger c LEFT JOIN billing.invoices i USING (account_id, invoice_id)
     WHERE c.account_id = acc ORDER BY c.seq
$$;

INSERT INTO meters (meter, late_window) VALUES ('cc_api', '100 years'), ('cc_storage', '100 years');
INSERT INTO plans (plan) VALUES ('cc_usage');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('cc_usage', NULL, 'flat 20', 'Platform fee'),
    ('cc_usage', 'cc_api', 'unit 0.01', 'API calls'),
    ('cc_usage', 'cc_storage', 'unit 1', 'Storage GB');
INSERT INTO accounts (account_id, name) VALUES (17101, 'drawdown'), (17102, 'expiry and void'),
    (17103, 'more credit than owed'), (17104, 'errors');
INSERT INTO subscriptions (account_id, plan, starts_at)
SELECT a, 'cc_usage', '2025-01-01' FROM generate_series(17101, 17104) a;

-- 1. grants and the drawdown order ------------------------------------------------------
-- January: 20 fixed + 300 API + 50 storage = 370
SELECT count(record(17101, m, q, '2025-01-10')) AS recorded
  FROM (VALUES ('cc_api', 30000), ('cc_storage', 50)) v(m, q);
-- inserted in an order unlike the drawdown order
SELECT grant_credit(17101, 100, '2025-01-01', reason => 'no expiry') AS g_a,
       grant_credit(17101, 60, '2025-01-01', '2025-03-01', reason => 'expires in March') AS g_b,
       grant_credit(17101, 250, '2025-01-01', applies_to => '{cc_api}', reason => 'API only') AS g_c,
       grant_credit(17101, 40, '2025-01-15', '2025-03-01', priority => 10, reason => 'first: priority 10') AS g_d,
       grant_credit(17101, 60, '2025-01-01', '2025-03-01', reason => 'same as g_b, later id') AS g_e;
-- a repeated idempotency key returns the first grant, whatever else is passed
SELECT grant_credit(17101, 5, '2025-01-01', reason => 'goodwill', idempotency_key => 'ticket-7') AS first,
       grant_credit(17101, 500, '2025-01-01', reason => 'retry', idempotency_key => 'ticket-7') AS again;
SELECT grant_id, amount, effective_at::date, expires_at::date, priority, applies_to, source, reason
  FROM credit_grants WHERE account_id = 17101 ORDER BY grant_id;
-- 17102: a 25 promo on API calls expiring mid-February, and a 500 credit.
-- January: the promo pays the 1.00 of API calls, the credit the fee;
-- February: no API calls, the credit pays the fee; what is left of the
-- promo (24) expires after February's draws, booked by the run that
-- finalizes February, the last period it overlaps
SELECT grant_credit(17102, 25, '2025-01-01', '2025-02-15', applies_to => '{cc_api}',
                    reason => 'launch promo') AS promo,
       grant_credit(17102, 500, '2025-01-01', reason => 'prepaid') AS prepaid;
SELECT count(record(17102, 'cc_api', 100, '2025-01-05')) AS recorded;   -- 1.00 of API calls
-- 17103 owes 20 a month (no usage): a 1000 credit draws 20 each month,
-- the second grant nothing (see 3.)
SELECT grant_credit(17103, 1000, '2025-01-01', reason => 'big credit') AS big,
       grant_credit(17103, 50, '2025-01-01', priority => 90, reason => 'drawn last') AS last;
-- the order credits are drawn in
SELECT * FROM credit_balance(17101, '2025-01-31');
-- the preview draws them live (the ledger is not touched)
SELECT line_no, kind, meter, description, quantity, amount
  FROM invoice_preview(17101, '2025-01-20');
SELECT count(*) AS ledger_rows_before FROM credit_ledger WHERE account_id = 17101;
SELECT * FROM pg_temp.finalize('2025-02-01 01:00');
SELECT * FROM pg_temp.lines(17101);
SELECT * FROM pg_temp.ledger(17101) WHERE kind <> 'grant';
-- finalizing again creates nothing and draws nothing
SELECT * FROM pg_temp.finalize('2025-02-01 01:00');
SELECT count(*) AS draws FROM credit_ledger WHERE account_id = 17101 AND kind = 'draw';
-- granted = used + expired + voided + rolled_over + remaining
SELECT grant_id, granted, used, expired, voided, rolled_over, remaining,
       granted = used + expired + voided + rolled_over + remaining AS adds_up
  FROM credit_balance(17101, '2025-02-01');

-- 2. expiry and void ------------------------------------------------------------------------
-- February (20 fixed + 50 API): what is left of g_e draws first (it
-- expires first), then g_a; nothing is left of g_d, g_c and g_b
SELECT count(record(17101, 'cc_api', 5000, '2025-02-10')) AS recorded;
SELECT * FROM pg_temp.finalize('2025-03-01 01:00');
SELECT * FROM pg_temp.lines(17101) WHERE period = '2025-02-01';
SELECT * FROM pg_temp.lines(17102);
SELECT * FROM pg_temp.ledger(17102);
SELECT grant_id, expires_at::date, granted, used, expired, voided, remaining
  FROM credit_balance(17102, '2025-03-01');
-- void: forfeits what is left (returned), used credit stays used; a second void forfeits nothing
SELECT void_credit(17102, 1008, 'customer churned', '2025-03-05') AS forfeited;
SELECT void_credit(17102, 1008, 'again', '2025-03-06') AS forfeited_again;
SELECT grant_id, voided_at::date, void_reason FROM credit_grants WHERE grant_id = 1008;
SELECT grant_id, granted, used, voided, remaining
  FROM credit_balance(17102, '2025-03-31') WHERE grant_id = 1008;
-- a voided grant draws nothing more
SELECT count(record(17102, 'cc_api', 1000, '2025-03-10')) AS recorded;
SELECT kind, amount FROM invoice_preview(17102, '2025-03-20') ORDER BY line_no;
-- the balance as it stood before the void
SELECT grant_id, used, voided, remaining FROM credit_balance(17102, '2025-03-01') WHERE grant_id = 1008;

-- 3. credits never take an invoice below 0 -------------------------------------------------
SELECT * FROM pg_temp.lines(17103);
-- the second grant drew 0 each month: no line, no ledger entry
SELECT kind, count(*) FROM credit_ledger WHERE account_id = 17103 GROUP BY kind ORDER BY kind;

-- 4. every invoice checks out, the ledger matches the credit lines -------------------------
SELECT * FROM verify_invoices() WHERE account_id BETWEEN 17101 AND 17199;
SELECT * FROM verify_audit_log() WHERE account_id BETWEEN 17101 AND 17199;
-- every grant, draw, expiry and void has its audit row
SELECT action, count(*) FROM audit_log
 WHERE account_id BETWEEN 17101 AND 17199 AND object LIKE 'credit_grant:%'
 GROUP BY action ORDER BY action;
SELECT (SELECT count(*) FROM audit_log WHERE account_id BETWEEN 17101 AND 17199
          AND object LIKE 'credit_grant:%')
     = (SELECT count(*) FROM credit_ledger WHERE account_id BETWEEN 17101 AND 17199)
       AS one_audit_row_per_ledger_entry;

-- 5. bad input --------------------------------------------------------------------------------
SELECT pg_temp.error_of($$SELECT billing.grant_credit(17999, 10, '2025-01-01')$$) AS unknown_account;
SELECT pg_temp.error_of($$SELECT billing.grant_credit(17104, 10, '2025-01-01', applies_to => '{cc_nope}')$$) AS unknown_meter;
SELECT pg_temp.error_of($$SELECT billing.grant_credit(17104, -1, '2025-01-01')$$) AS negative;
SELECT pg_temp.error_of($$SELECT billing.grant_credit(17104, 'NaN', '2025-01-01')$$) AS nan;
SELECT pg_temp.error_of($$SELECT billing.grant_credit(17104, 'Infinity', '2025-01-01')$$) AS infinite;
SELECT pg_temp.error_of($$SELECT billing.grant_credit(17104, 10.001, '2025-01-01')$$) AS below_minor_unit;
SELECT pg_temp.error_of($$SELECT billing.grant_credit(17104, 10, '2025-01-01', priority => 101)$$) AS priority_101;
SELECT pg_temp.error_of($$SELECT billing.grant_credit(17104, 10, '2025-01-01', priority => -1)$$) AS priority_minus_1;
SELECT pg_temp.error_of($$SELECT billing.grant_credit(17104, 10, '2025-01-01', '2025-01-01')$$) AS expires_at_effective;
SELECT pg_temp.error_of($$SELECT billing.grant_credit(17104, 10, '2025-01-01', '2024-12-01')$$) AS expires_before;
SELECT pg_temp.error_of($$SELECT billing.grant_credit(17104, 10, '2025-01-01', applies_to => '{}')$$) AS empty_applies_to;
SELECT pg_temp.error_of($$SELECT billing.grant_credit(17104, NULL, '2025-01-01')$$) AS null_amount;
SELECT pg_temp.error_of($$SELECT billing.void_credit(17101, 1001, NULL)$$) AS void_no_reason;
SELECT pg_temp.error_of($$SELECT billing.void_credit(17101, 1001, ' ')$$) AS void_blank_reason;
SELECT pg_temp.error_of($$SELECT billing.void_credit(17101, 99999, 'x')$$) AS void_unknown_grant;
SELECT pg_temp.error_of($$SELECT billing.void_credit(17999, 1001, 'x')$$) AS void_unknown_account;
SELECT pg_temp.error_of($$SELECT billing.void_credit(17104, 1001, 'x')$$) AS void_other_accounts_grant;
SELECT pg_temp.error_of($$SELECT * FROM billing.credit_balance(17999)$$) AS balance_unknown_account;
-- the ledger is append-only, grants change only by void_credit
SELECT pg_temp.error_of($$UPDATE billing.credit_ledger SET amount = 0 WHERE account_id = 17101$$) AS ledger_update;
SELECT pg_temp.error_of($$DELETE FROM billing.credit_ledger WHERE account_id = 17101$$) AS ledger_delete;
SELECT pg_temp.error_of($$TRUNCATE billing.credit_ledger$$) AS ledger_truncate;
SELECT pg_temp.error_of($$UPDATE billing.credit_grants SET amount = 1 WHERE account_id = 17101$$) AS grant_update;
SELECT pg_temp.error_of($$DELETE FROM billing.credit_grants WHERE account_id = 17101$$) AS grant_delete;
