-- contracts_remaining: credits do not change remaining (SPEC 10.2: the cap
-- bounds usage before credits), whether they pay every line or only the
-- capped meter, while invoice_preview shows them live.
BEGIN;
SELECT plan(6);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;

INSERT INTO billing.meters (meter, late_window) VALUES ('kr_api', '100 years');
INSERT INTO billing.plans (plan) VALUES ('kr_plan');
INSERT INTO billing.charges (plan, meter, price) VALUES ('kr_plan', 'kr_api', 'unit 0.01');
INSERT INTO billing.accounts (account_id) VALUES (9961);
INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap)
VALUES (9961, 'kr_plan', '2025-01-01', 50);
-- 30.00 of the cap of 50 used: 2000 units left
SELECT billing.record(9961, 'kr_api', 3000, '2025-01-10') \gset

SELECT is(billing.remaining(9961, 'kr_api', '2025-01-20'), 2000::numeric,
          'without credits: 2000 units left under the cap');
SELECT billing.grant_credit(9961, 100, '2025-01-01', reason => 'every line') AS g1,
       billing.grant_credit(9961, 25, '2025-01-01', applies_to => '{kr_api}', reason => 'the capped meter') AS g2 \gset
SELECT results_eq(
    $$SELECT kind, amount FROM billing.invoice_preview(9961, '2025-01-20') ORDER BY line_no$$,
    $$VALUES ('usage'::text, 30.00::numeric), ('credit', -25.00), ('credit', -5.00)$$,
    'the preview shows the credits paying the usage');
SELECT is(billing.remaining(9961, 'kr_api', '2025-01-20'), 2000::numeric,
          'with credits paying every line and the capped meter: still 2000 units');
SELECT billing.void_credit(9961, :g2, 'gone', '2025-01-15') \gset
SELECT is(billing.remaining(9961, 'kr_api', '2025-01-20'), 2000::numeric,
          'after a void: still 2000 units');

-- a plan change inside a bucket: the bucket holding `at` started before
-- the change, so it is billed by the old plan, and remaining prices it so
INSERT INTO billing.meters (meter, bucket_width, late_window) VALUES ('kr_hr', '1 hour', '100 years');
INSERT INTO billing.plans (plan) VALUES ('kr_exp'), ('kr_cheap');
INSERT INTO billing.charges (plan, meter, price) VALUES ('kr_exp', 'kr_hr', 'unit 10'),
    ('kr_cheap', 'kr_hr', 'unit 1');
INSERT INTO billing.accounts (account_id) VALUES (9962);
INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap)
VALUES (9962, 'kr_exp', '2025-01-01', 100);
SELECT billing.change_plan(9962, 'kr_cheap', '2025-01-10 12:30');
SELECT is(billing.remaining(9962, 'kr_hr', '2025-01-10 12:45'), 10::numeric,
          'in the bucket of the plan change (12:00, the old plan''s): 100 / 10 = 10 units');
SELECT is(billing.remaining(9962, 'kr_hr', '2025-01-10 13:05'), 100::numeric,
          'in the next bucket (the new plan''s): 100 / 1 = 100 units');

SELECT * FROM finish();
ROLLBACK;
