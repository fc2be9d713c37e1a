-- roles: SPEC section 8.  billing_admin, billing_writer and billing_reader
-- can each do what they must and nothing more; PUBLIC can do nothing;
-- SECURITY DEFINER functions pin search_path and cannot be turned against
-- their owner.  Every check runs under SET ROLE.  (Usage and invoices are
-- at fixed dates; the calls that still pass now() are privilege checks,
-- the same at any time of day.)
BEGIN;
SELECT plan(87);

CREATE ROLE r_admin NOLOGIN IN ROLE billing_admin;
CREATE ROLE r_writer NOLOGIN IN ROLE billing_writer;
CREATE ROLE r_reader NOLOGIN IN ROLE billing_reader;
CREATE ROLE r_nobody NOLOGIN;
CREATE ROLE r_app NOLOGIN;

-- shared fixtures, as the superuser
-- (fixed dates, the meter accepts reports 100 years late: what is finalized
-- does not depend on the time of day)
INSERT INTO billing.meters (meter, late_window) VALUES ('ro_events', '100 years');
INSERT INTO billing.accounts (account_id) VALUES (8101), (8102);
INSERT INTO billing.plans (plan, period) VALUES ('ro_daily', '1 day');
INSERT INTO billing.charges (plan, meter, price) VALUES ('ro_daily', 'ro_events', 'unit 1');
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
    VALUES (8101, 'ro_daily', '2025-06-09 00:00+00');
CREATE TEMP TABLE ro AS SELECT timestamptz '2025-06-09 00:00+00' AS d0,
                               timestamptz '2025-06-10 12:34+00' AS t;
GRANT SELECT ON ro TO PUBLIC;
CREATE TEMP TABLE ro_src (account bigint, meter text, quantity numeric, ts timestamptz);
INSERT INTO ro_src SELECT 8101, 'ro_events', 2, t FROM ro;
GRANT SELECT ON ro_src TO PUBLIC;

-- the roles ----------------------------------------------------------------------------
SELECT has_role('billing_admin', 'billing_admin exists');
SELECT has_role('billing_writer', 'billing_writer exists');
SELECT has_role('billing_reader', 'billing_reader exists');
SELECT is((SELECT count(*) FROM pg_roles WHERE rolname LIKE 'billing\_%' AND (rolcanlogin OR rolsuper)),
          0::bigint, 'the billing roles cannot log in and are not superusers');
SELECT is_member_of('billing_reader', 'billing_admin', 'billing_admin is a billing_reader');
SELECT isnt_member_of('billing_writer', 'billing_admin', 'billing_admin is not a billing_writer');
SELECT isnt_member_of('billing_writer', 'billing_reader', 'billing_reader is not a billing_writer');

-- PUBLIC gets nothing ----------------------------------------------------------------------
SELECT ok(NOT has_schema_privilege('public', 'billing', 'USAGE'), 'PUBLIC has no USAGE on schema billing');
SELECT is((SELECT count(*) FROM pg_proc
            WHERE pronamespace = 'billing'::regnamespace
              AND has_function_privilege('public', oid, 'EXECUTE')),
          0::bigint, 'PUBLIC can execute no function of billing');
SELECT is((SELECT count(*) FROM pg_class c, aclexplode(c.relacl) a
            WHERE c.relnamespace = 'billing'::regnamespace AND a.grantee = 0),
          0::bigint, 'PUBLIC has no privilege on any table, view or sequence of billing');
SELECT is((SELECT count(*) FROM pg_class c
            WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'v', 'S')
              AND c.relacl IS NULL),
          0::bigint, 'no relation is left with default (owner-only but unreviewed) privileges');
SET ROLE r_nobody;
SELECT throws_ok($$SELECT billing.record(8101, 'ro_events', 1)$$, '42501', NULL,
                 'a role without billing roles cannot record');
SELECT throws_ok($$SELECT * FROM billing.usage(8101, now() - interval '1 day', now())$$, '42501', NULL,
                 'nor read usage');
SELECT throws_ok($$SELECT * FROM billing.meters$$, '42501', NULL, 'nor read a table');
SELECT throws_ok($$SELECT billing.rate('unit 1', 1)$$, '42501', NULL, 'nor call a pure function');
RESET ROLE;

-- billing_writer: ingest only -----------------------------------------------------------------
SET ROLE r_writer;
SELECT is(billing.record(8101, 'ro_events', 2, (SELECT t FROM ro), 'ro-1'), true, 'writer: record');
SELECT is((SELECT accepted FROM billing.ingest('ro_src', 0, 1, ARRAY[8101, 8102]::bigint[],
                                               ARRAY['ro_events', 'ro_events'], ARRAY[3, 4]::numeric[],
                                               ARRAY[(SELECT t FROM ro), (SELECT t FROM ro)])),
          2, 'writer: ingest');
SELECT lives_ok($$SELECT billing.report_cumulative('ro_collector', 8101, 'ro_events', (SELECT t FROM ro), 5)$$,
                'writer: report_cumulative');
SELECT throws_ok($$INSERT INTO billing.charges (plan, meter, price) VALUES ('ro_daily', 'ro_events', 'unit 0')$$,
                 '42501', NULL, 'writer cannot add a price');
SELECT throws_ok($$UPDATE billing.charges SET price = 'unit 0' WHERE plan = 'ro_daily'$$,
                 '42501', NULL, 'writer cannot change a price');
SELECT throws_ok($$INSERT INTO billing.meters (meter) VALUES ('ro_other')$$, '42501', NULL,
                 'writer cannot add a meter');
SELECT throws_ok($$INSERT INTO billing.accounts (account_id) VALUES (8199)$$, '42501', NULL,
                 'writer cannot add an account');
SELECT throws_ok($$SELECT * FROM billing.finalize_invoices()$$, '42501', NULL, 'writer cannot finalize');
SELECT throws_ok($$SELECT * FROM billing.rerate(now() - interval '1 day', now())$$, '42501', NULL,
                 'writer cannot rerate');
SELECT throws_ok($$SELECT billing.correct_usage(8101, 'ro_events', (SELECT t FROM ro), 1, 'x')$$,
                 '42501', NULL, 'writer cannot correct usage');
SELECT throws_ok($$SELECT billing.compact_usage()$$, '42501', NULL, 'writer cannot compact');
SELECT throws_ok($$SELECT * FROM billing.usage(8101, now() - interval '1 day', now())$$, '42501', NULL,
                 'writer cannot read usage');
SELECT throws_ok($$SELECT * FROM billing.invoice_preview(8101)$$, '42501', NULL,
                 'writer cannot preview invoices');
SELECT throws_ok($$SELECT * FROM billing.invoices$$, '42501', NULL, 'writer cannot read invoices');
SELECT throws_ok($$INSERT INTO billing.usage_deltas (account_id, cells)
                   VALUES (8101, billing._delta_pack(ARRAY['ro_events'], ARRAY[''], ARRAY[now()], ARRAY[1e6], ARRAY[1::bigint], NULL))$$,
                 '42501', NULL, 'writer cannot write counters directly');
SELECT throws_ok($$INSERT INTO billing.dedupe_keys VALUES (8101, 'ro_events', 'ro-2', 'infinity')$$,
                 '42501', NULL, 'writer cannot claim event ids directly');
SELECT throws_ok($$SELECT billing.meter_table('ro', 'd0', 'd0', 'd0', 'd0')$$, '42501', NULL,
                 'writer cannot meter a table');
RESET ROLE;

-- billing_reader: usage, previews, invoices, tables -----------------------------------------------
SET ROLE r_admin;
SELECT is((SELECT count(*) FROM billing.finalize_invoices((SELECT d0 FROM ro) + interval '2 days 1 hour')),
          2::bigint, 'admin: finalize_invoices');
RESET ROLE;
SET ROLE r_reader;
SELECT is((SELECT sum(quantity) FROM billing.usage(8101, (SELECT t FROM ro), (SELECT t FROM ro) + interval '1 minute')),
          10::numeric, 'reader: usage (2 + 3 + 5)');
SELECT ok((SELECT count(*) FROM billing.invoice_preview(8101)) > 0, 'reader: invoice_preview');
SELECT is(billing.remaining(8101, 'ro_events'), NULL::numeric, 'reader: remaining');
SELECT is_empty($$SELECT * FROM billing.verify_invoices()$$, 'reader: verify_invoices');
SELECT is_empty($$SELECT * FROM billing.verify_audit_log()$$, 'reader: verify_audit_log');
SELECT is((SELECT count(*) FROM billing.invoices WHERE account_id = 8101), 2::bigint, 'reader: read invoices');
SELECT ok((SELECT count(*) FROM billing.audit_log WHERE account_id = 8101) > 0, 'reader: read the audit log');
SELECT is(billing.round_money(billing.rate('unit 0.005', 3), 'USD'), 0.02, 'reader: the price functions');
SELECT results_eq($$SELECT account_id, source_quantity, counted_quantity
                      FROM billing.reconcile('ro_src', 'account', 'meter', 'quantity', 'ts',
                                             '2025-06-09 00:00+00', '2025-06-12 00:00+00')$$,
                  $$VALUES (8101::bigint, 2::numeric, 10::numeric), (8102, 0, 4)$$,
                  'reader: reconcile a table it can read');
SELECT throws_ok($$SELECT billing.record(8101, 'ro_events', 1)$$, '42501', NULL, 'reader cannot record');
SELECT throws_ok($$SELECT * FROM billing.ingest('ro_src', 0, 2, ARRAY[8101]::bigint[], ARRAY['ro_events'],
                                                ARRAY[1]::numeric[], ARRAY[now()])$$,
                 '42501', NULL, 'reader cannot ingest');
SELECT throws_ok($$SELECT billing.report_cumulative('ro_collector', 8101, 'ro_events', now(), 9)$$,
                 '42501', NULL, 'reader cannot report cumulative totals');
SELECT throws_ok($$INSERT INTO billing.meters (meter) VALUES ('ro_other')$$, '42501', NULL,
                 'reader cannot add a meter');
SELECT throws_ok($$UPDATE billing.charges SET price = 'unit 0'$$, '42501', NULL,
                 'reader cannot change a price');
SELECT throws_ok($$SELECT * FROM billing.finalize_invoices()$$, '42501', NULL, 'reader cannot finalize');
SELECT throws_ok($$SELECT * FROM billing.rerate(now() - interval '1 day', now())$$, '42501', NULL,
                 'reader cannot rerate');
SELECT throws_ok($$SELECT billing.correct_usage(8101, 'ro_events', (SELECT t FROM ro), 1, 'x')$$,
                 '42501', NULL, 'reader cannot correct usage');
SELECT throws_ok($$SELECT billing.purge_dedupe()$$, '42501', NULL, 'reader cannot purge event ids');
SELECT throws_ok($$UPDATE billing.audit_log SET actor = 'x'$$, '42501', NULL,
                 'reader cannot touch the audit log');
RESET ROLE;

-- billing_admin: reference data, finalize, rerate, corrections -----------------------------------
SET ROLE r_admin;
SELECT lives_ok($$INSERT INTO billing.meters (meter) VALUES ('ro_admin_meter')$$, 'admin: add a meter');
SELECT lives_ok($$UPDATE billing.meters SET unit = 'things' WHERE meter = 'ro_admin_meter'$$,
                'admin: change a meter');
SELECT lives_ok($$INSERT INTO billing.accounts (account_id, name) VALUES (8103, 'new')$$, 'admin: add an account');
SELECT lives_ok($$INSERT INTO billing.plans (plan) VALUES ('ro_monthly')$$, 'admin: add a plan');
SELECT lives_ok($$INSERT INTO billing.charges (plan, meter, price, valid_from)
                  VALUES ('ro_daily', 'ro_events', 'unit 2', (SELECT d0 FROM ro))$$,
                'admin: add a charge version (a retroactive price change)');
SELECT lives_ok($$INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (8103, 'ro_monthly', now())$$,
                'admin: subscribe an account');
SELECT lives_ok($$DELETE FROM billing.meters WHERE meter = 'ro_admin_meter'$$, 'admin: delete a meter');
SELECT lives_ok($$SELECT billing.correct_usage(8101, 'ro_events', (SELECT t FROM ro), 1, 'recount')$$,
                'admin: correct usage');
SELECT ok((SELECT count(*) FROM billing.rerate((SELECT d0 FROM ro), now() + interval '1 day')) >= 0,
          'admin: rerate');
SELECT lives_ok($$SELECT billing.compact_usage()$$, 'admin: compact_usage');
SELECT lives_ok($$SELECT billing.purge_dedupe(now() - interval '1 year')$$, 'admin: purge_dedupe');
SELECT ok((SELECT count(*) FROM billing.usage(8101, (SELECT d0 FROM ro), now())) > 0, 'admin reads like a reader');
SELECT is((SELECT actor FROM billing.usage_corrections WHERE account_id = 8101), 'r_admin',
          'a correction names the admin, not the function owner');
SELECT throws_ok($$SELECT billing.record(8101, 'ro_events', 1)$$, '42501', NULL, 'admin cannot record (not a writer)');
SELECT throws_ok($$INSERT INTO billing.invoices (account_id, plan, period_start, period_end, currency, total)
                   VALUES (8101, 'ro_daily', now(), now(), 'USD', 0)$$,
                 '42501', NULL, 'admin cannot write an invoice by hand');
SELECT throws_ok($$INSERT INTO billing.adjustments (account_id, invoice_id, line_kind, old_amount, new_amount, delta, reason)
                   SELECT 8101, invoice_id, 'usage', 0, -100, -100, 'gift' FROM billing.invoices WHERE account_id = 8101 LIMIT 1$$,
                 '42501', NULL, 'admin cannot write an adjustment by hand');
SELECT throws_ok($$INSERT INTO billing.usage_deltas (account_id, cells)
                   VALUES (8101, billing._delta_pack(ARRAY['ro_events'], ARRAY[''], ARRAY[now()], ARRAY[-5], ARRAY[0::bigint], NULL))$$,
                 '42501', NULL, 'admin cannot write counters by hand (corrections go through correct_usage)');
SELECT throws_ok($$DELETE FROM billing.audit_log$$, '42501', NULL, 'admin cannot delete the audit log');
SELECT throws_ok($$UPDATE billing.audit_heads SET seq = seq + 1$$, '42501', NULL, 'admin cannot move a chain head');
SELECT throws_ok($$TRUNCATE billing.charges$$, '42501', NULL, 'admin cannot truncate reference data');

-- metered tables: the admin meters a table, its owner decides who inserts
CREATE TABLE pg_temp.ro_outcomes (account bigint, meter text, quantity bigint, ts timestamptz);
SELECT lives_ok($$SELECT billing.meter_table('pg_temp.ro_outcomes', 'account', 'meter', 'quantity', 'ts',
                                              keep_rows => false)$$,
                'admin: meter a table it owns');
GRANT INSERT ON pg_temp.ro_outcomes TO r_app;
CREATE TABLE pg_temp.ro_kept (account bigint, meter text, quantity bigint, ts timestamptz, id text);
SELECT billing.meter_table('pg_temp.ro_kept', 'account', 'meter', 'quantity', 'ts', 'id');
GRANT INSERT ON pg_temp.ro_kept TO r_app;
RESET ROLE;
SET ROLE r_app;
SELECT lives_ok($$INSERT INTO pg_temp.ro_outcomes VALUES (8102, 'ro_events', 7, (SELECT t FROM ro))$$,
                'a role the table owner lets INSERT counts usage, without any billing role');
RESET ROLE;
SELECT is((SELECT sum(quantity) FROM billing.usage(8102, (SELECT t FROM ro), (SELECT t FROM ro) + interval '1 minute')),
          11::numeric, 'and its rows were counted (4 + 7)');
CREATE TABLE pg_temp.ro_mine (account bigint, meter text, quantity bigint, ts timestamptz);
ALTER TABLE pg_temp.ro_mine OWNER TO r_reader;
SET ROLE r_reader;
SELECT throws_ok($$CREATE TRIGGER t BEFORE INSERT ON pg_temp.ro_mine FOR EACH ROW
                   EXECUTE FUNCTION billing._meter_row('account', 'meter', 'quantity', 'ts', '', '', 'f')$$,
                 '42501', NULL, 'a non-admin cannot attach the metering trigger to its own table');
SELECT throws_ok($$SELECT billing.meter_table('pg_temp.ro_mine', 'account', 'meter', 'quantity', 'ts')$$,
                 '42501', NULL, 'nor call meter_table');
RESET ROLE;

-- SECURITY DEFINER functions -----------------------------------------------------------------
SELECT results_eq(
    $$SELECT p.oid::regprocedure::text FROM pg_proc p
       WHERE p.pronamespace = 'billing'::regnamespace AND p.prosecdef ORDER BY 1$$,
    $$VALUES ('billing._audit_change()'), ('billing._audit_credit()'), ('billing._audit_ddl()'),
             ('billing._audit_insert_rows()'), ('billing._audit_invoice()'),
             ('billing._audit_table_note(regclass)'), ('billing._metered_table_attached()'),
             ('billing._metered_table_dropped()'),
             ('billing.add_commitment(bigint,text,numeric,timestamp with time zone,timestamp with time zone,interval,text[],integer,numeric)'),
             ('billing.change_plan(bigint,text,timestamp with time zone)'),
             ('billing.compact_usage()'),
             ('billing.correct_usage(bigint,text,timestamp with time zone,numeric,text,text)'),
             ('billing.finalize_invoices(timestamp with time zone)'),
             ('billing.grant_credit(bigint,numeric,timestamp with time zone,timestamp with time zone,integer,text[],text,text)'),
             ('billing.ingest(text,integer,bigint,bigint[],text[],numeric[],timestamp with time zone[],text[],text[])'),
             ('billing.purge_dedupe(timestamp with time zone)'),
             ('billing.record(bigint,text,numeric,timestamp with time zone,text,text)'),
             ('billing.report_cumulative(text,bigint,text,timestamp with time zone,numeric,text)'),
             ('billing.rerate(timestamp with time zone,timestamp with time zone,bigint,boolean,text)'),
             ('billing.void_credit(bigint,bigint,text,timestamp with time zone)')$$,
    'exactly the functions that write what their callers cannot are SECURITY DEFINER (not the metering triggers, which switch in C: meter_security.sql)');
SELECT is_empty(
    $$SELECT p.oid::regprocedure::text FROM pg_proc p
       WHERE p.pronamespace = 'billing'::regnamespace AND p.prosecdef
         AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, billing, pg_temp'], false) ORDER BY 1$$,
    'each pins search_path = pg_catalog, billing, pg_temp');

-- compact_usage (SECURITY DEFINER) does not use a temp table the caller prepared
SELECT billing.record(8101, 'ro_events', 1, (SELECT t FROM ro));
DROP TABLE IF EXISTS pg_temp.billing_compact_cells;   -- as in a new session (1.0's work table)
SET ROLE r_admin;
CREATE TEMP TABLE pwned (who text);
CREATE TEMP TABLE billing_compact_cells (
    account_id bigint, meter text COLLATE "C", dimension text COLLATE "C",
    bucket_start timestamptz, quantity numeric, events bigint,
    last_ts timestamptz, last_seq bigint, aggregation text, nrows bigint);
CREATE FUNCTION pg_temp.pwn() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN INSERT INTO pg_temp.pwned VALUES (current_user); RETURN NEW; END $$;
CREATE TRIGGER pwn BEFORE INSERT ON pg_temp.billing_compact_cells
    FOR EACH ROW EXECUTE FUNCTION pg_temp.pwn();
SELECT ok(billing.compact_usage() > 0, 'compact_usage with a caller''s table named like its work table');
SELECT is_empty($$SELECT * FROM pg_temp.pwned$$, 'the caller''s trigger never ran as the function owner');
RESET ROLE;

-- the metering trigger runs whatever search_path the inserting session has
CREATE SCHEMA ro_evil;
CREATE TABLE ro_evil.calls (n int);
CREATE FUNCTION ro_evil.eq(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS
    $$ BEGIN INSERT INTO ro_evil.calls VALUES (1); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE OPERATOR ro_evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = ro_evil.eq);
CREATE FUNCTION ro_evil.unnest(anyarray) RETURNS SETOF anyelement LANGUAGE plpgsql AS
    $$ BEGIN INSERT INTO ro_evil.calls VALUES (2); RETURN QUERY SELECT pg_catalog.unnest($1); END $$;
GRANT USAGE ON SCHEMA ro_evil TO r_app;
SET ROLE r_app;
SET LOCAL search_path = ro_evil, pg_catalog, pg_temp;
INSERT INTO pg_temp.ro_outcomes VALUES (8101, 'ro_events', 1, (SELECT t FROM pg_temp.ro)),
                                       (8102, 'ro_events', 1, (SELECT t FROM pg_temp.ro));
INSERT INTO pg_temp.ro_kept VALUES (8101, 'ro_events', 1, (SELECT t FROM pg_temp.ro), 'k1'),
                                   (8102, 'ro_events', 1, (SELECT t FROM pg_temp.ro), 'k1'),
                                   (8102, 'ro_events', 1, (SELECT t FROM pg_temp.ro), 'k1');
RESET search_path;
RESET ROLE;
SELECT is_empty($$SELECT * FROM ro_evil.calls$$,
                'the metering triggers'' statements never resolve names through the caller''s search_path');
SELECT is((SELECT count(*) FROM pg_temp.ro_kept), 2::bigint, 'and they still dedupe (one row per event id and account)');

-- the locks compaction and rerate serialize on (#16): no role of billing's
-- but its owner takes them (a session outside billing took the advisory
-- locks of earlier versions; test/isolation/specs/lock_squat.spec)
SET ROLE r_admin;
SELECT throws_ok($$SELECT billing._lock_table('billing.adjustments')$$, '42501', NULL,
                 'admin: cannot take the rerate lock');
SELECT throws_ok($$LOCK TABLE billing.usage_days IN SHARE ROW EXCLUSIVE MODE$$, '42501', NULL,
                 'nor the compaction lock');
SELECT throws_ok($$LOCK TABLE billing.adjustments IN SHARE UPDATE EXCLUSIVE MODE$$, '42501', NULL,
                 'nor the rerate lock by LOCK TABLE');
RESET ROLE;
SELECT lives_ok($$SELECT billing._lock_table('billing.adjustments')$$, 'the owner takes it');

SELECT * FROM finish();
ROLLBACK;
