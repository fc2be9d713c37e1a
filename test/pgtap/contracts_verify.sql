-- contracts_verify: verify_invoices checks credit lines against the credit
-- ledger (SPEC 10.2, issue 17 point 5).  A clean account verifies; then,
-- each time behind the triggers (as a superuser with them disabled) and
-- rolled back: a credit line that differs from its draw, a draw removed
-- from the ledger, a draw forged in the ledger, and credits that take a
-- total below 0 are each found, with the problem verify_invoices names.
BEGIN;
SELECT plan(6);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;

INSERT INTO billing.meters (meter, late_window) VALUES ('kv_api', '100 years');
INSERT INTO billing.plans (plan) VALUES ('kv_plan');
INSERT INTO billing.charges (plan, meter, price, description) VALUES
    ('kv_plan', NULL, 'flat 20', 'Platform fee'),
    ('kv_plan', 'kv_api', 'unit 0.01', 'API calls');
INSERT INTO billing.accounts (account_id) VALUES (9951);
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9951, 'kv_plan', '2025-01-01');
-- January: 20 fixed + 30 API = 50; grant a pays 30 of it, grant b 20, grant c nothing
SELECT billing.record(9951, 'kv_api', 3000, '2025-01-10') \gset
SELECT billing.grant_credit(9951, 30, '2025-01-01', priority => 10, reason => 'a') AS ga,
       billing.grant_credit(9951, 100, '2025-01-01', priority => 20, reason => 'b') AS gb,
       billing.grant_credit(9951, 10, '2025-01-01', priority => 30, reason => 'c: draws 0, no line') AS gc \gset
SELECT invoice_id AS inv FROM billing.finalize_invoices('2025-02-01 01:00') WHERE account_id = 9951 \gset

SELECT results_eq(
    $$SELECT l.grant_id, l.amount, i.total FROM billing.invoice_lines l
        JOIN billing.invoices i USING (account_id, invoice_id)
       WHERE l.account_id = 9951 AND l.kind = 'credit' ORDER BY l.line_no$$,
    format($$VALUES (%s::bigint, -30.00::numeric, 0.00::numeric), (%s, -20.00, 0.00)$$, :ga, :gb),
    'the invoice has a credit line per grant drawn and a total of 0');
SELECT is_empty($$SELECT * FROM billing.verify_invoices(9951)$$, 'verify_invoices finds nothing wrong with it');

ALTER TABLE billing.invoice_lines DISABLE TRIGGER ALL;
ALTER TABLE billing.invoices DISABLE TRIGGER ALL;
ALTER TABLE billing.credit_ledger DISABLE TRIGGER ALL;
-- each tampering is rolled back to t; what verify_invoices says of it is
-- kept in a psql variable and checked after the tampering is undone
SAVEPOINT t;

-- a credit line that is not its draw (the total moved with it)
UPDATE billing.invoice_lines SET amount = -15.00 WHERE account_id = 9951 AND grant_id = :gb;
UPDATE billing.invoices SET total = 5.00 WHERE account_id = 9951;
SELECT string_agg(format('%s|%s|%s', invoice_id, line_no, problem), E'\n' ORDER BY line_no NULLS LAST, problem) AS p_line
  FROM billing.verify_invoices(9951) \gset
ROLLBACK TO SAVEPOINT t;

-- a draw removed from the ledger
DELETE FROM billing.credit_ledger WHERE account_id = 9951 AND grant_id = :ga AND kind = 'draw';
SELECT string_agg(format('%s|%s|%s', invoice_id, line_no, problem), E'\n' ORDER BY line_no NULLS LAST, problem) AS p_removed
  FROM billing.verify_invoices(9951) \gset
ROLLBACK TO SAVEPOINT t;

-- draws forged in the ledger: one of a grant with a credit line, one of a
-- grant without
INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at, invoice_id)
SELECT account_id, max(seq) + g.n, g.grant_id, 'draw', -7, '2025-02-01', :inv
  FROM billing.credit_ledger, (VALUES (1, :gb), (2, :gc)) g(n, grant_id)
 WHERE account_id = 9951 GROUP BY account_id, g.n, g.grant_id;
SELECT string_agg(format('%s|%s|%s', invoice_id, line_no, problem), E'\n' ORDER BY line_no NULLS LAST, problem) AS p_forged
  FROM billing.verify_invoices(9951) \gset
ROLLBACK TO SAVEPOINT t;

-- credits that take the total below 0 (line, draw and total agree)
UPDATE billing.invoice_lines SET amount = -70.00 WHERE account_id = 9951 AND grant_id = :gb;
UPDATE billing.credit_ledger SET amount = -70.00 WHERE account_id = 9951 AND grant_id = :gb AND kind = 'draw';
UPDATE billing.invoices SET total = -50.00 WHERE account_id = 9951;
SELECT string_agg(format('%s|%s|%s', invoice_id, line_no, problem), E'\n' ORDER BY line_no NULLS LAST, problem) AS p_below
  FROM billing.verify_invoices(9951) \gset
ROLLBACK TO SAVEPOINT t;

SELECT line_no AS ln_b FROM billing.invoice_lines WHERE account_id = 9951 AND grant_id = :gb \gset
SELECT line_no AS ln_a FROM billing.invoice_lines WHERE account_id = 9951 AND grant_id = :ga \gset
SELECT is(:'p_line', format('%s|%s|credit line of grant %s is -15.00, the credit ledger draws -20.00', :inv, :ln_b, :gb),
          'a credit line that differs from the ledger''s draw is found');
SELECT is(:'p_removed', format('%s|%s|credit line of grant %s has no draw in the credit ledger', :inv, :ln_a, :ga),
          'a credit line whose draw is missing from the ledger is found');
SELECT is(:'p_forged', format(E'%s|%s|credit line of grant %s is -20.00, the credit ledger draws -27.00\n'
                              '%s||the credit ledger draws -7 from grant %s but no credit line shows it',
                              :inv, :ln_b, :gb, :inv, :gc),
          'draws forged in the ledger are found');
SELECT is(:'p_below', format('%s||credits take the total to -50.00, below 0', :inv),
          'credits that take an invoice below 0 are found');

SELECT * FROM finish();
ROLLBACK;
