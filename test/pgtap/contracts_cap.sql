-- contracts_cap: credits on an invoice whose spend cap cut its usage (SPEC
-- 10.2: a grant pays only the lines it applies to, never commitment or
-- cap lines).  Credits pay the usage lines after the cap, each scaled down
-- in the proportion the cap cut the period's usage, as a minimum's
-- eligible spend counts them (billing._eligible_spend): the two paths give
-- the same figure.  The preview shows what finalize writes.
BEGIN;
SELECT plan(10);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;

INSERT INTO billing.meters (meter, late_window) VALUES ('ca_api', '100 years'), ('ca_gpu', '100 years');
INSERT INTO billing.plans (plan) VALUES ('ca_usage');
INSERT INTO billing.charges (plan, meter, price, description) VALUES
    ('ca_usage', NULL, 'flat 20', 'Platform fee'),
    ('ca_usage', 'ca_api', 'unit 0.01', 'API calls'),
    ('ca_usage', 'ca_gpu', 'unit 2', 'GPU hours');
INSERT INTO billing.accounts (account_id) VALUES (9811), (9812), (9813);
INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap) VALUES
    (9811, 'ca_usage', '2025-01-01', 100), (9812, 'ca_usage', '2025-01-01', 100),
    (9813, 'ca_usage', '2025-01-01', 100);

-- 9811: fixed 20, usage 150, cap -50, a prepaid commitment's 100 line, and
-- two grants: credits may pay 20 + 150 - 50 = 120, not the commitment line
SELECT billing.add_commitment(9811, 'prepaid', 100, '2025-01-01', '2025-02-01');
SELECT billing.grant_credit(9811, 1000, '2025-01-01', reason => 'manual');
SELECT billing.record(9811, 'ca_api', 15000, '2025-01-10');
-- 9812: a grant for API calls only: the API line after the cap, 150 - 50
SELECT billing.grant_credit(9812, 1000, '2025-01-01', applies_to => '{ca_api}', reason => 'api only');
SELECT billing.record(9812, 'ca_api', 15000, '2025-01-10');
-- 9813: API 150 and GPU 50 cut by the cap to 100 together; the API grant
-- pays 150 * 100 / 200 = 75
SELECT billing.grant_credit(9813, 1000, '2025-01-01', applies_to => '{ca_api}', reason => 'api only');
SELECT billing.record(9813, 'ca_api', 15000, '2025-01-10');
SELECT billing.record(9813, 'ca_gpu', 25, '2025-01-11');

CREATE TEMP TABLE previews AS
SELECT a.account_id, p.*
  FROM unnest(ARRAY[9811, 9812, 9813]::bigint[]) a(account_id),
       LATERAL billing.invoice_preview(a.account_id, '2025-01-31 12:00+00') p;

SELECT is((SELECT count(*) FROM billing.finalize_invoices('2025-02-01 01:00+00')
            WHERE account_id BETWEEN 9811 AND 9813), 3::bigint, 'three January invoices');

SELECT is((SELECT array_agg(l.amount ORDER BY l.line_no) FROM billing.invoice_lines l
             JOIN billing.invoices i USING (account_id, invoice_id)
            WHERE i.account_id = 9811 AND l.kind = 'credit'), ARRAY[-100.00, -20.00]::numeric[],
          'commitment grant 100, then the manual grant 20: credits pay 120, the lines they may pay after the cap');
SELECT is((SELECT total FROM billing.invoices WHERE account_id = 9811), 100.00,
          'the commitment line stays to pay: total 100');
SELECT is((SELECT sum(l.amount) FROM billing.invoice_lines l WHERE l.account_id = 9812 AND l.kind = 'credit'),
          -100.00, 'a grant for API calls pays the API line after the cap (150 - 50), not the platform fee');
SELECT is((SELECT total FROM billing.invoices WHERE account_id = 9812), 20.00, 'total 20: the platform fee');
SELECT is((SELECT sum(l.amount) FROM billing.invoice_lines l WHERE l.account_id = 9813 AND l.kind = 'credit'),
          -75.00, 'API 150 of usage 200 cut to 100: the API grant pays 75');
SELECT is((SELECT -sum(l.amount) FROM billing.invoice_lines l WHERE l.account_id = 9813 AND l.kind = 'credit'),
          (SELECT billing.round_money(billing._eligible_spend('{ca_api}', array_agg(l.kind),
                                                              array_agg(l.meter::text), array_agg(l.amount)), 'USD')
             FROM billing.invoice_lines l WHERE l.account_id = 9813 AND l.kind <> 'credit'),
          'the same as the eligible spend of a minimum restricted to API calls (_eligible_spend)');
SELECT is_empty($$
    (SELECT account_id, kind, meter, amount FROM previews
     EXCEPT ALL
     SELECT l.account_id, l.kind, l.meter::text, l.amount FROM billing.invoice_lines l
      WHERE l.account_id BETWEEN 9811 AND 9813)
    UNION ALL
    (SELECT l.account_id, l.kind, l.meter::text, l.amount FROM billing.invoice_lines l
      WHERE l.account_id BETWEEN 9811 AND 9813
     EXCEPT ALL
     SELECT account_id, kind, meter, amount FROM previews)$$,
    'the previews of the last day showed exactly the lines finalize wrote');
SELECT is_empty($$SELECT * FROM billing.credit_balance(9811, '2025-03-01')
                   WHERE granted <> used + expired + voided + rolled_over + remaining$$,
                'the ledger adds up');

-- three usage lines of 1.00 capped at 1.00: each counts a third, which does
-- not come out exact; the credit is still 1.00 and the total 0.00
INSERT INTO billing.meters (meter, late_window) VALUES ('ca_x', '100 years');
INSERT INTO billing.plans (plan) VALUES ('ca_three');
INSERT INTO billing.charges (plan, meter, price) VALUES ('ca_three', 'ca_api', 'unit 1'),
    ('ca_three', 'ca_gpu', 'unit 1'), ('ca_three', 'ca_x', 'unit 1');
INSERT INTO billing.accounts (account_id) VALUES (9814);
INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap) VALUES (9814, 'ca_three', '2025-01-01', 1);
SELECT billing.record(9814, m, 1, '2025-01-10') FROM unnest(ARRAY['ca_api', 'ca_gpu', 'ca_x']) m;
SELECT billing.grant_credit(9814, 100, '2025-01-01', reason => 'thirds');
SELECT count(*) FROM billing.finalize_invoices('2025-02-01 01:00+00');
SELECT is((SELECT ARRAY[(SELECT amount FROM billing.invoice_lines l WHERE l.account_id = 9814 AND l.kind = 'credit'),
                        i.total]
             FROM billing.invoices i WHERE i.account_id = 9814),
          ARRAY[-1.00, 0.00], 'usage cut to 1.00 over three lines: a credit of 1.00, total 0.00, whole cents');

SELECT * FROM finish();
ROLLBACK;
