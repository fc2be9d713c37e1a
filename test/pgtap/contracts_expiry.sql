-- contracts_expiry: what is left of a grant at its expiry is booked
-- 'expire' by the finalize_invoices run that finalizes the account's last
-- period overlapping its window (SPEC 10.2), also when the account's
-- subscriptions all end before the grant expires: then that is the
-- account's last period.  A grant that never expires is never booked.
BEGIN;
SELECT plan(7);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;

INSERT INTO billing.meters (meter, late_window) VALUES ('ex_api', '100 years');
INSERT INTO billing.plans (plan) VALUES ('ex_usage');
INSERT INTO billing.charges (plan, meter, price) VALUES ('ex_usage', 'ex_api', 'unit 0.01');
INSERT INTO billing.accounts (account_id) VALUES (9821), (9822), (9823);
-- 9821: subscribed January and February only; a grant to June
INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at)
    VALUES (9821, 'ex_usage', '2025-01-01', '2025-03-01');
SELECT billing.grant_credit(9821, 500, '2025-01-01', '2025-06-01', reason => 'to June');
-- 9822: still subscribed: the expiry is booked by the period holding June 1
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9822, 'ex_usage', '2025-01-01');
SELECT billing.grant_credit(9822, 500, '2025-01-01', '2025-06-01', reason => 'to June');
-- 9823: subscribed January and February; a grant that never expires
INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at)
    VALUES (9823, 'ex_usage', '2025-01-01', '2025-03-01');
SELECT billing.grant_credit(9823, 500, '2025-01-01', reason => 'forever');
SELECT billing.record(a, 'ex_api', 4000, '2025-01-10') FROM unnest(ARRAY[9821, 9822, 9823]) a;

SELECT is((SELECT count(*) FROM billing.finalize_invoices('2025-02-01 01:00+00')
            WHERE account_id BETWEEN 9821 AND 9823), 3::bigint, 'January finalized');
SELECT is((SELECT count(*) FROM billing.credit_ledger WHERE account_id BETWEEN 9821 AND 9823
            AND kind = 'expire'), 0::bigint, 'nothing expires in January');
SELECT is((SELECT count(*) FROM billing.finalize_invoices('2025-07-01 01:00+00')
            WHERE account_id BETWEEN 9821 AND 9823), 7::bigint,
          'February for 9821 and 9823, February to June for 9822');
SELECT results_eq(
    $$SELECT account_id, amount, effective_at FROM billing.credit_ledger
       WHERE account_id BETWEEN 9821 AND 9823 AND kind = 'expire' ORDER BY account_id$$,
    $$VALUES (9821::bigint, -460.00, '2025-06-01 00:00+00'::timestamptz),
             (9822, -460.00, '2025-06-01 00:00+00')$$,
    'the grant of the account whose subscription ended in March expires (dated at its expiry), as the one still subscribed; the grant that never expires does not');
SELECT is((SELECT ARRAY[used, expired, remaining] FROM billing.credit_balance(9821, '2025-12-01')),
          ARRAY[40.00, 460.00, 0.00], 'its balance after the expiry: 40 used, 460 expired, nothing left');
SELECT is((SELECT remaining FROM billing.credit_balance(9823, '2025-12-01')), 460.00,
          'the grant that never expires keeps what is left');

-- a prepaid window with a rollover ending at the account's last period:
-- nothing rolls over into a grant no period could draw; all of it expires
INSERT INTO billing.plans (plan) VALUES ('ex_flat');
INSERT INTO billing.charges (plan, meter, price) VALUES ('ex_flat', NULL, 'flat 10');
INSERT INTO billing.accounts (account_id) VALUES (9824);
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9824, 'ex_flat', '2025-01-01');
SELECT billing.add_commitment(9824, 'prepaid', 200, '2025-01-01', '2025-03-01', commit_period => '1 month',
                              rollover_fraction => 0.5);
UPDATE billing.subscriptions SET ends_at = '2025-02-01' WHERE account_id = 9824;
SELECT count(*) FROM billing.finalize_invoices('2025-07-01 01:00+00') WHERE account_id = 9824;
SELECT results_eq(
    $$SELECT l.kind, l.amount FROM billing.credit_ledger l
        JOIN billing.credit_grants g USING (account_id, grant_id)
       WHERE l.account_id = 9824 AND g.window_no = 1 ORDER BY l.seq$$,
    $$VALUES ('grant'::text, 100.00), ('draw', -10.00), ('expire', -90.00)$$,
    'the first window''s grant pays January and expires whole: no rollover after the last period');

SELECT * FROM finish();
ROLLBACK;
