-- One schema shape on one node and on Citus (issue 15), checked without
-- Citus: CREATE EXTENSION installs the triggers Citus needs, so that
-- billing.distribute() changes none of them and an upgrade has one shape
-- to handle.  Their functions tell a shard from a plain table when they
-- run: on one node they behave as before, and on a table named like a
-- shard as they must on Citus.  And the pieces the Citus twins share with
-- their single-node bodies: the co-location check, the one trigger
-- function of immutable tables (also for what is set once).
BEGIN;
SELECT plan(20);

-- the shape ---------------------------------------------------------------------------
SELECT is((SELECT ARRAY[t.tgconstraint <> 0, t.tgdeferrable, t.tginitdeferred]
             FROM pg_trigger t
            WHERE t.tgrelid = 'billing.invoices'::regclass AND t.tgname = 'invoices_audit'),
          ARRAY[true, true, true],
          'invoices_audit is a constraint trigger deferred to the commit (on Citus an invoice and its lines are two statements)');
SELECT results_eq(
    $$SELECT t.tgrelid::regclass::text, t.tgfoid::regproc::text, t.tgnewtable = 'new_rows',
             (t.tgtype & 1) = 0
        FROM pg_trigger t
       WHERE t.tgname IN ('adjustments_audit', 'usage_corrections_audit') ORDER BY 1$$,
    $$VALUES ('billing.adjustments', 'billing._audit_insert_rows', true, true),
             ('billing.usage_corrections', 'billing._audit_insert_rows', true, true)$$,
    'adjustments and usage corrections are audited by statement triggers over the new rows');
SELECT doesnt_imatch(
    (SELECT prosrc FROM pg_proc WHERE oid = 'billing.distribute()'::regprocedure),
    '(CREATE|DROP)\s+(CONSTRAINT\s+)?TRIGGER',
    'distribute() creates and drops no trigger');

SELECT hasnt_function('billing', '_audit_insert', 'the row-level audit trigger function of 1.0''s Citus shape is gone');
-- the one co-location check of distribute(), meter_table and audit_table:
-- without Citus no table is co-located with the accounts
SELECT is(billing._citus_colocated('billing.invoices', 'account_id'), false,
          '_citus_colocated is false without Citus');

-- finalize_invoices on one node: the audit rows by the end of its statement ------------
INSERT INTO billing.meters (meter, late_window) VALUES ('sh_events', '100 years');
INSERT INTO billing.plans (plan, period) VALUES ('sh_daily', '1 day');
INSERT INTO billing.charges (plan, meter, price) VALUES ('sh_daily', 'sh_events', 'unit 0.5');
INSERT INTO billing.accounts (account_id) VALUES (7301), (7302);
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
    VALUES (7301, 'sh_daily', '2024-01-01 00:00+00'), (7302, 'sh_daily', '2024-01-01 00:00+00');
SELECT ok(billing.record(7301, 'sh_events', 4, '2024-01-01 10:00+00'), 'usage counted');

SELECT is((SELECT count(*) FROM billing.finalize_invoices('2024-01-03 12:00+00')), 4::bigint,
          'finalize_invoices writes two days of two accounts');
SELECT is((SELECT count(*) FROM billing.audit_log
            WHERE account_id IN (7301, 7302) AND action = 'finalize'), 4::bigint,
          'their audit rows are written by the end of its statement, in the same transaction');
SELECT is((SELECT (details -> 'lines' -> 0 ->> 'quantity')::numeric FROM billing.audit_log
            WHERE account_id = 7301 AND action = 'finalize' ORDER BY seq LIMIT 1), 4::numeric,
          'each with the lines the same statement wrote');

-- afterwards the trigger is deferred again
INSERT INTO billing.invoices (account_id, plan, period_start, period_end, currency, total)
    VALUES (7302, 'sh_daily', '2024-02-01 00:00+00', '2024-02-02 00:00+00', 'USD', 0);
SELECT is((SELECT count(*) FROM billing.audit_log
            WHERE account_id = 7302 AND action = 'finalize'), 2::bigint,
          'after finalize_invoices the trigger is deferred again: an invoice inserted by hand has no audit row yet');
-- when the trigger fires (at the commit, or here when it is set IMMEDIATE)
-- the row is hashed into its chain; it is written at the commit or at the
-- end of the next statement that writes audit rows (70_audit.sql)
SET CONSTRAINTS billing.invoices_audit IMMEDIATE;
INSERT INTO billing.meters (meter) VALUES ('sh_next');
SELECT is((SELECT count(*) FROM billing.audit_log
            WHERE account_id = 7302 AND action = 'finalize'), 3::bigint,
          'and gets it when the trigger fires, written by the next statement that writes audit rows');
SET CONSTRAINTS billing.invoices_audit DEFERRED;

-- _audit_insert_rows where Citus runs it: on a shard, named after its table
-- with the shard's number, it appends one row at a time, each chain's in key order
CREATE TABLE pg_temp.adjustments_102008 (LIKE billing.adjustments);
CREATE TRIGGER adjustments_audit_102008 AFTER INSERT ON pg_temp.adjustments_102008
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_insert_rows('adjust', 'adjustment', 'adjustment_id');
INSERT INTO pg_temp.adjustments_102008 (account_id, adjustment_id, invoice_id, line_kind, old_amount,
                                        new_amount, delta, reason, actor, created_at)
VALUES (7302, 9003, 1, 'usage', 0, 1, 1, 'test', 'tester', '2024-01-05 00:00+00'),
       (7301, 9002, 1, 'usage', 0, 2, 2, 'test', 'tester', '2024-01-05 00:00+00'),
       (7301, 9001, 1, 'usage', 0, 3, 3, 'test', 'tester', '2024-01-05 00:00+00');
SELECT results_eq(
    $$SELECT account_id, object, (details ->> 'delta')::numeric FROM billing.audit_log
       WHERE account_id IN (7301, 7302) AND action = 'adjust' ORDER BY account_id, seq$$,
    $$VALUES (7301::bigint, 'adjustment:9001', 3::numeric), (7301, 'adjustment:9002', 2),
             (7302, 'adjustment:9003', 1)$$,
    'on a shard: one audit row per adjustment, in its account''s chain, in key order');
SELECT is((SELECT count(*) FROM billing.audit_heads h
            WHERE h.account_id IN (7301, 7302)
              AND h.seq = (SELECT max(a.seq) FROM billing.audit_log a WHERE a.account_id = h.account_id)),
          2::bigint, 'each chain head moved with its rows');
SELECT is_empty($$SELECT * FROM billing.verify_audit_log() WHERE account_id IN (7301, 7302)$$,
                'the chains verify');

-- one guard for what is set once (_refuse_change with columns): an
-- adjustment records once the invoice that carried it, and nothing else
-- changes
INSERT INTO billing.adjustments (account_id, invoice_id, line_kind, old_amount, new_amount, delta, reason)
SELECT 7301, min(invoice_id), 'usage', 0, 1, 1, 'guard test' FROM billing.invoices WHERE account_id = 7301;
SELECT throws_ok($$UPDATE billing.adjustments SET reason = 'other' WHERE reason = 'guard test'$$,
                 '55000', 'update of adjustments is not allowed',
                 'an adjustment never changes');
SELECT lives_ok($$UPDATE billing.adjustments SET billed_invoice_id = invoice_id WHERE reason = 'guard test'$$,
                'but records once the invoice that carried it');
SELECT throws_ok($$UPDATE billing.adjustments SET billed_invoice_id = billed_invoice_id + 1 WHERE reason = 'guard test'$$,
                 '55000', 'update of adjustments is not allowed',
                 'once only');
SELECT throws_ok($$DELETE FROM billing.adjustments WHERE reason = 'guard test'$$,
                 '55000', 'delete of adjustments is not allowed',
                 'and is never deleted');
SELECT is((SELECT ARRAY[tgfoid::regproc::text, pg_catalog.encode(tgargs, 'escape')] FROM pg_trigger
            WHERE tgrelid = 'billing.adjustments'::regclass AND tgname = 'adjustments_guard'),
          ARRAY['billing._refuse_change',
                E'An adjustment never changes, except to record once the invoice that carried it.\\000'
                'Correct an adjustment with a later rerate, which writes a new one.\\000billed_invoice_id\\000'],
          'the guard is the one trigger function of immutable tables, with the column set once');

-- where Citus runs it, on a shard named after its table with the shard's
-- number, the error names the table, as on one node
CREATE TABLE pg_temp.invoices_102008 (LIKE billing.invoices INCLUDING DEFAULTS);
INSERT INTO pg_temp.invoices_102008 (account_id, invoice_id, plan, period_start, period_end, currency, total)
VALUES (7301, 1, 'sh_daily', '2024-01-01 00:00+00', '2024-01-02 00:00+00', 'USD', 0);
CREATE TRIGGER invoices_immutable_102008 BEFORE UPDATE OR DELETE ON pg_temp.invoices_102008
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change('Finalized invoices and their lines never change.');
SELECT throws_ok($$DELETE FROM pg_temp.invoices_102008$$, '55000', 'delete of invoices is not allowed',
                 'on a shard the error of an immutable table names the table');

SELECT * FROM finish();
ROLLBACK;
