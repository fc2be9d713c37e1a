-- contracts_errors: every error of SPEC 10.2, the append-only ledger and
-- the immutable grants and commitments (55000), and who may call what.
BEGIN;
SELECT plan(48);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;

INSERT INTO billing.meters (meter, late_window) VALUES ('ke_api', '100 years');
INSERT INTO billing.plans (plan) VALUES ('ke_a'), ('ke_b');
INSERT INTO billing.plans (plan, period) VALUES ('ke_week', '7 days');
INSERT INTO billing.plans (plan, currency) VALUES ('ke_eur', 'EUR');
INSERT INTO billing.charges (plan, meter, price) VALUES ('ke_a', 'ke_api', 'unit 0.01'),
    ('ke_b', 'ke_api', 'unit 0.02');
INSERT INTO billing.accounts (account_id) VALUES (9901), (9902);
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9901, 'ke_a', '2025-01-01');
SELECT billing.grant_credit(9901, 10, '2025-01-01', reason => 'k') AS g \gset
SELECT billing.add_commitment(9901, 'prepaid', 100, '2025-03-01', '2025-04-01') AS c \gset

-- 23503: unknown account, grant or meter in applies_to
SELECT throws_ok($$SELECT billing.grant_credit(9999, 10)$$, '23503', NULL, 'grant_credit: unknown account');
SELECT throws_ok($$SELECT billing.grant_credit(9901, 10, applies_to => '{ke_nope}')$$, '23503', NULL,
                 'grant_credit: unknown meter in applies_to');
SELECT throws_ok($$SELECT billing.void_credit(9901, -1, 'x')$$, '23503', NULL, 'void_credit: unknown grant');
SELECT throws_ok(format($$SELECT billing.void_credit(9902, %s, 'x')$$, :g), '23503', NULL,
                 'void_credit: a grant of another account');
SELECT throws_ok($$SELECT billing.void_credit(9999, 1, 'x')$$, '23503', NULL, 'void_credit: unknown account');
SELECT throws_ok($$SELECT * FROM billing.credit_balance(9999)$$, '23503', NULL, 'credit_balance: unknown account');
SELECT throws_ok($$SELECT billing.add_commitment(9999, 'prepaid', 1, '2025-05-01', '2025-06-01')$$, '23503', NULL,
                 'add_commitment: unknown account');
SELECT throws_ok($$SELECT billing.add_commitment(9901, 'prepaid', 1, '2025-05-01', '2025-06-01', applies_to => '{ke_nope}')$$,
                 '23503', NULL, 'add_commitment: unknown meter in applies_to');
SELECT throws_ok($$SELECT billing.change_plan(9999, 'ke_b', '2025-02-10')$$, '23503', NULL, 'change_plan: unknown account');
SELECT throws_ok($$SELECT billing.change_plan(9901, 'ke_nope', '2025-02-10')$$, '23503', NULL, 'change_plan: unknown plan');

-- 22023: amounts, priority, expiry, rollover fraction, installments, kind
SELECT throws_ok($$SELECT billing.grant_credit(9901, -0.01)$$, '22023', NULL, 'grant_credit: negative amount');
SELECT throws_ok($$SELECT billing.grant_credit(9901, 'NaN')$$, '22023', NULL, 'grant_credit: NaN amount');
SELECT throws_ok($$SELECT billing.grant_credit(9901, 10, priority => 101)$$, '22023', NULL, 'grant_credit: priority 101');
SELECT throws_ok($$SELECT billing.grant_credit(9901, 10, priority => -1)$$, '22023', NULL, 'grant_credit: priority -1');
SELECT throws_ok($$SELECT billing.grant_credit(9901, 10, '2025-02-01', '2025-02-01')$$, '22023', NULL,
                 'grant_credit: expires_at = effective_at');
SELECT throws_ok($$SELECT billing.grant_credit(9901, 10, '2025-02-01', '2025-01-01')$$, '22023', NULL,
                 'grant_credit: expires_at before effective_at');
SELECT throws_ok($$SELECT billing.add_commitment(9901, 'prepaid', -1, '2025-05-01', '2025-06-01')$$, '22023', NULL,
                 'add_commitment: negative amount');
SELECT throws_ok($$SELECT billing.add_commitment(9901, 'prepaid', 'NaN', '2025-05-01', '2025-06-01')$$, '22023', NULL,
                 'add_commitment: NaN amount');
SELECT throws_ok($$SELECT billing.add_commitment(9901, 'credit', 1, '2025-05-01', '2025-06-01')$$, '22023', NULL,
                 'add_commitment: unknown kind');
SELECT throws_ok($$SELECT billing.add_commitment(9901, 'prepaid', 1, '2025-05-01', '2025-06-01', rollover_fraction => 1.01)$$,
                 '22023', NULL, 'add_commitment: rollover_fraction above 1');
SELECT throws_ok($$SELECT billing.add_commitment(9901, 'prepaid', 1, '2025-05-01', '2025-06-01', rollover_fraction => -0.01)$$,
                 '22023', NULL, 'add_commitment: rollover_fraction below 0');
SELECT throws_ok($$SELECT billing.add_commitment(9901, 'prepaid', 1, '2025-05-01', '2025-06-01', installments => 0)$$,
                 '22023', NULL, 'add_commitment: installments < 1');
SELECT throws_ok($$SELECT billing.add_commitment(9901, 'prepaid', 1, '2025-05-02', '2025-06-01')$$, '22023', NULL,
                 'add_commitment: a window starting off the period boundaries');
SELECT throws_ok($$SELECT billing.change_plan(9901, 'ke_week', '2025-02-10')$$, '22023', NULL,
                 'change_plan: a plan with another period');
SELECT throws_ok($$SELECT billing.change_plan(9901, 'ke_eur', '2025-02-10')$$, '22023', NULL,
                 'change_plan: a plan in another currency');

-- 22004: no reason
SELECT throws_ok(format($$SELECT billing.void_credit(9901, %s, NULL)$$, :g), '22004', NULL, 'void_credit: no reason');
SELECT throws_ok(format($$SELECT billing.void_credit(9901, %s, '')$$, :g), '22004', NULL, 'void_credit: empty reason');

-- 55000: a plan change inside a finalized period; what never changes
SELECT billing.record(9901, 'ke_api', 100, '2025-01-10') \gset
SELECT count(*) FROM billing.finalize_invoices('2025-02-01 01:00') \gset
SELECT throws_ok($$SELECT billing.change_plan(9901, 'ke_b', '2025-01-20')$$, '55000', NULL,
                 'change_plan: at inside an already finalized period');
SELECT lives_ok($$SELECT billing.change_plan(9901, 'ke_b', '2025-02-01')$$,
                'change_plan: at the end of the finalized period');
SELECT throws_ok($$UPDATE billing.credit_ledger SET amount = amount WHERE account_id = 9901$$, '55000', NULL,
                 'the credit ledger refuses UPDATE');
SELECT throws_ok($$DELETE FROM billing.credit_ledger WHERE account_id = 9901$$, '55000', NULL,
                 'the credit ledger refuses DELETE');
SELECT throws_ok($$TRUNCATE billing.credit_ledger$$, '55000', NULL, 'the credit ledger refuses TRUNCATE');
SELECT throws_ok($$UPDATE billing.credit_grants SET priority = 1 WHERE account_id = 9901$$, '55000', NULL,
                 'a grant changes only by void_credit');
SELECT throws_ok($$DELETE FROM billing.commitments WHERE account_id = 9901$$, '55000', NULL,
                 'a commitment never changes');

-- who may call what
CREATE ROLE ke_admin NOLOGIN IN ROLE billing_admin;
CREATE ROLE ke_reader NOLOGIN IN ROLE billing_reader;
SET LOCAL ROLE ke_admin;
SELECT lives_ok($$SELECT billing.grant_credit(9902, 5, '2025-01-01', reason => 'admin grant')$$,
                'billing_admin grants credit (SECURITY DEFINER writes the ledger and its audit row)');
RESET ROLE;
SELECT is((SELECT array_agg(DISTINCT x.actor) FROM
             (SELECT g.actor FROM billing.credit_grants g WHERE g.account_id = 9902 AND g.reason = 'admin grant'
              UNION ALL
              SELECT l.actor FROM billing.credit_ledger l
                JOIN billing.credit_grants g USING (account_id, grant_id)
               WHERE g.account_id = 9902 AND g.reason = 'admin grant') x),
          ARRAY['ke_admin']::text[], 'the grant and its ledger entry name the role that granted it, not the extension''s owner');
SET LOCAL ROLE ke_reader;
SELECT throws_ok($$SELECT billing.grant_credit(9902, 5, '2025-01-01')$$, '42501', NULL,
                 'billing_reader cannot grant credit');
RESET ROLE;

-- 55000: a void while a period of the grant's window that ends by `at` is
-- not finalized (it would draw from the grant first)
SELECT billing.grant_credit(9902, 7, '2025-01-01', reason => 'to void') AS gv \gset
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9902, 'ke_a', '2025-01-01');
SELECT throws_ok(format($$SELECT billing.void_credit(9902, %s, 'churn')$$, :gv), '55000', NULL,
                 'void_credit now, with the periods since January not finalized: 55000');
SELECT throws_ok(format($$SELECT billing.void_credit(9902, %s, 'churn', '2025-02-15')$$, :gv), '55000', NULL,
                 'void_credit at a time after January ended, January not finalized: 55000');
SELECT is(billing.void_credit(9902, :gv, 'churn', '2025-01-20'), 7::numeric,
          'a void before the first period ends forfeits the whole grant');

-- 22023: commitment windows and installments on the account's period grid:
-- a plan change inside a period is not a boundary (the period runs on); a
-- month-end anchor keeps month ends (Feb 28, Mar 31, Apr 30)
INSERT INTO billing.plans (plan) VALUES ('ke_flat');
INSERT INTO billing.charges (plan, meter, price) VALUES ('ke_flat', NULL, 'flat 100');
INSERT INTO billing.accounts (account_id) VALUES (9931), (9932);
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9931, 'ke_a', '2025-01-01'),
    (9932, 'ke_flat', '2025-01-31');
SELECT billing.change_plan(9931, 'ke_b', '2025-01-15');
SELECT throws_ok($$SELECT billing.add_commitment(9931, 'minimum', 100, '2025-01-15', '2025-03-01')$$,
                 '22023', NULL, 'add_commitment: a window starting at a plan change inside a period: 22023');
SELECT throws_ok($$SELECT billing.add_commitment(9932, 'prepaid', 300, '2025-02-28', '2025-04-30', installments => 3)$$,
                 '22023', NULL, 'add_commitment: 3 installments in a window of 2 month-end periods: 22023');
SELECT billing.add_commitment(9932, 'prepaid', 200, '2025-02-28', '2025-04-30', installments => 2) AS c2 \gset
SELECT is((SELECT installment_due FROM billing.commitment_windows WHERE account_id = 9932),
          ARRAY['2025-02-28 00:00+00', '2025-03-31 00:00+00']::timestamptz[],
          'installments due on the periods of the window, month ends kept');
-- back to the first plan at the same moment: one subscription again (the
-- same plan again changes nothing: tiers do not restart there)
SELECT billing.change_plan(9931, 'ke_a', '2025-01-15');
SELECT is((SELECT array_agg(plan || ' from ' || starts_at::date || coalesce(' to ' || ends_at::date, ''))
             FROM billing.subscriptions WHERE account_id = 9931),
          ARRAY['ke_a from 2025-01-01'], 'A to B and back to A at one moment: the subscription of A, whole');

-- 55000: a subscription ending inside a finalized period of another one on
-- the same grid would add a plan segment to its invoice (finalize would
-- then write a second invoice for the month); its own end may still move
INSERT INTO billing.accounts (account_id) VALUES (9941);
INSERT INTO billing.subscriptions (account_id, plan, starts_at, period_anchor)
VALUES (9941, 'ke_b', '2025-01-15', '2025-01-01');
SELECT count(*) FROM billing.finalize_invoices('2025-02-01 01:00') \gset
SELECT throws_ok($$INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at)
                   VALUES (9941, 'ke_a', '2024-12-01', '2025-01-15')$$, '55000', NULL,
                 'a subscription ending inside the finalized January of another one: 55000');
SELECT lives_ok($$INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at)
                  VALUES (9941, 'ke_a', '2024-12-01', '2025-01-01')$$,
                'one ending where that period starts');
SELECT throws_ok($$UPDATE billing.subscriptions SET ends_at = '2025-01-10'
                   WHERE account_id = 9941 AND starts_at = '2024-12-01'$$, '55000', NULL,
                 'nor may its end move into that finalized January: 55000');
SELECT lives_ok($$UPDATE billing.subscriptions SET ends_at = '2024-12-20'
                  WHERE account_id = 9941 AND starts_at = '2024-12-01'$$,
                'its end may move back');

SELECT * FROM finish();
ROLLBACK;
