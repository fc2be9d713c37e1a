-- guards_settings: SPEC section 8, no setting a session can change may skip
-- a guard (issue 13, defect 3).  1.0 skipped the guards of meters, charges
-- and plans when application_name looked like a Citus task
-- ('citus_internal gpid=...'), so any billing_admin could SET it and then
-- rewrite a charge version that rated a finalized invoice, reinterpret or
-- delete a meter with usage, or change the period and currency of a plan in
-- use.  Here every one of those attacks runs as a billing_admin with that
-- application_name and must raise 55000; changes the guards allow still
-- pass.  (test/citus/run.sh runs the same attacks on a Citus cluster.)
BEGIN;
SELECT plan(21);

CREATE ROLE g_admin NOLOGIN IN ROLE billing_admin;

-- fixtures, as the superuser: a plan with a fixed fee and a usage charge,
-- one finalized daily invoice, usage compacted (g_ev) and not yet compacted
-- (g_ev2, a meter no charge names)
INSERT INTO billing.meters (meter, late_window, dedupe_window)
    VALUES ('g_ev', '100 years', '100 years'), ('g_ev2', '100 years', '100 years'),
           ('g_unused', '100 years', '100 years');
INSERT INTO billing.accounts (account_id) VALUES (9301);
INSERT INTO billing.plans (plan, period) VALUES ('g_daily', '1 day'), ('g_spare', '1 day');
INSERT INTO billing.charges (plan, meter, price, description)
    VALUES ('g_daily', NULL, 'flat 5', 'base'), ('g_daily', 'g_ev', 'unit 2', NULL);
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
    VALUES (9301, 'g_daily', '2024-01-01 00:00:00+00');
SELECT billing.record(9301, 'g_ev', 3, '2024-01-01 10:00:00+00');
SELECT billing.compact_usage();
SELECT billing.record(9301, 'g_ev2', 4, '2024-01-01 11:00:00+00');
SELECT billing.finalize_invoices('2024-01-02 02:00:00+00');
CREATE TEMP TABLE g AS
SELECT (SELECT charge_id FROM billing.charges WHERE plan = 'g_daily' AND meter = 'g_ev') AS usage_charge,
       (SELECT charge_id FROM billing.charges WHERE plan = 'g_daily' AND meter IS NULL) AS fixed_charge;
GRANT SELECT ON g TO PUBLIC;
SELECT is((SELECT count(*) FROM billing.invoice_lines l, g
            WHERE l.account_id = 9301 AND l.charge_id IN (g.usage_charge, g.fixed_charge)),
          2::bigint, 'fixture: both charge versions rated the finalized invoice');

-- the session claims to be a Citus task
SET ROLE g_admin;
SET application_name = 'citus_internal gpid=1';
SELECT is(current_setting('application_name'), 'citus_internal gpid=1',
          'a billing_admin session set application_name to what Citus tasks use');

-- a charge version that rated a finalized invoice
SELECT throws_ok($$UPDATE billing.charges SET price = 'unit 1'
                    WHERE charge_id = (SELECT usage_charge FROM g)$$,
                 '55000', NULL, 'its price cannot be updated');
SELECT throws_ok($$UPDATE billing.charges SET valid_from = '2025-01-01'
                    WHERE charge_id = (SELECT usage_charge FROM g)$$,
                 '55000', NULL, 'its valid_from cannot be updated');
SELECT throws_ok($$DELETE FROM billing.charges WHERE charge_id = (SELECT usage_charge FROM g)$$,
                 '55000', NULL, 'a usage charge version that rated an invoice cannot be deleted');
SELECT throws_ok($$DELETE FROM billing.charges WHERE charge_id = (SELECT fixed_charge FROM g)$$,
                 '55000', NULL, 'a fixed fee version that rated an invoice cannot be deleted');

-- a meter with usage (compacted, and in deltas not yet compacted)
SELECT throws_ok($$UPDATE billing.meters SET aggregation = 'max' WHERE meter = 'g_ev'$$,
                 '55000', NULL, 'the aggregation of a meter with compacted usage cannot change');
SELECT throws_ok($$UPDATE billing.meters SET bucket_width = '1 hour' WHERE meter = 'g_ev'$$,
                 '55000', NULL, 'the bucket width of a meter with compacted usage cannot change');
SELECT throws_ok($$UPDATE billing.meters SET aggregation = 'last' WHERE meter = 'g_ev2'$$,
                 '55000', NULL, 'the aggregation of a meter with uncompacted usage cannot change');
SELECT throws_ok($$UPDATE billing.meters SET bucket_width = '1 hour' WHERE meter = 'g_ev2'$$,
                 '55000', NULL, 'the bucket width of a meter with uncompacted usage cannot change');
SELECT throws_ok($$UPDATE billing.meters SET meter = 'g_renamed' WHERE meter = 'g_ev2'$$,
                 '55000', NULL, 'a meter with usage cannot be renamed');
SELECT throws_ok($$DELETE FROM billing.meters WHERE meter = 'g_ev2'$$,
                 '55000', NULL, 'a meter with usage cannot be deleted');

-- a plan with subscriptions and invoices
SELECT throws_ok($$UPDATE billing.plans SET period = '2 days' WHERE plan = 'g_daily'$$,
                 '55000', NULL, 'the period of a plan with invoices cannot change');
SELECT throws_ok($$UPDATE billing.plans SET currency = 'EUR' WHERE plan = 'g_daily'$$,
                 '55000', NULL, 'the currency of a plan with invoices cannot change');

-- what the guards allow still passes under the same setting
SELECT lives_ok($$UPDATE billing.meters SET unit = 'events' WHERE meter = 'g_ev'$$,
                'the unit of a meter with usage can change');
SELECT lives_ok($$UPDATE billing.meters SET aggregation = 'max' WHERE meter = 'g_unused'$$,
                'a meter without usage can change its aggregation');
SELECT lives_ok($$UPDATE billing.plans SET period = '2 days' WHERE plan = 'g_spare'$$,
                'a plan without subscriptions can change its period');
SELECT lives_ok($$INSERT INTO billing.charges (plan, meter, price, valid_from)
                  VALUES ('g_daily', 'g_ev', 'unit 1', '2024-06-01')$$,
                'a new charge version can be added');
RESET application_name;
RESET ROLE;

SELECT is((SELECT count(*) FROM billing.verify_invoices(9301)), 0::bigint,
          'the finalized invoice still verifies');

-- no guard reads a setting: the skip of 1.0 is gone, and no function of the
-- extension looks at application_name; no trigger function reads a setting
SELECT hasnt_function('billing', '_in_citus_task', 'billing._in_citus_task() is gone');
SELECT is_empty($$
    SELECT p.oid::regprocedure FROM pg_proc p
     WHERE p.pronamespace = 'billing'::regnamespace
       AND p.prolang <> (SELECT oid FROM pg_language WHERE lanname = 'c')
       AND (p.prosrc ~* 'application_name'
            OR p.prorettype = 'trigger'::regtype
               AND p.prosrc ~* 'current_setting|pg_settings|set_config|citus_internal')
$$, 'no function reads application_name, and no trigger function reads a setting');

SELECT * FROM finish();
ROLLBACK;
