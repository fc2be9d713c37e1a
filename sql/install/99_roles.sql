/*
 * Roles and privileges (SPEC section 8).  This part runs last, so that it
 * covers every function and table of the parts before it.  An upgrade
 * script that adds a function or table must add its grants the same way
 * (new functions are executable by PUBLIC until revoked).
 *
 *   billing_reader  read every table; usage, remaining, invoice_preview,
 *                   credit_balance, verify_invoices, verify_audit_log,
 *                   reconcile, the price functions
 *   billing_writer  ingest only: record, ingest, report_cumulative
 *   billing_admin   everything billing_reader has; writes the reference
 *                   data (meters, accounts, plans, charges, subscriptions);
 *                   finalize_invoices, rerate, correct_usage, compact_usage,
 *                   purge_dedupe, meter_table, unmeter_table, audit_table,
 *                   unaudit_table; grant_credit, void_credit, add_commitment,
 *                   change_plan
 *   PUBLIC          nothing
 *
 * Functions that write tables their callers cannot write run as the
 * extension owner (SECURITY DEFINER) with search_path pinned to
 * pg_catalog, billing, pg_temp.  Not the triggers of metered tables
 * (_meter_row, _meter_after_rows, _meter_flush): they fire on users' own
 * tables, next to the users' triggers, and run as the user who inserts.
 * Their C code switches to the extension owner and pins search_path to
 * pg_catalog, billing, pg_temp itself, around the work that needs the
 * extension's rights only (reading meters and accounts, claiming event
 * ids, writing deltas), as PostgreSQL's referential-integrity triggers
 * switch to a table's owner (issue 13, defect 4).
 *
 * Who may insert into a metered table is the table owner's business: its
 * triggers count usage for anyone the owner lets INSERT.  Creating those
 * triggers (meter_table) needs billing_admin and the TRIGGER privilege on
 * the table.  The same holds for audited tables (audit_table), whose
 * triggers are not SECURITY DEFINER: they switch to the owner in C around
 * the append only (src/audit.c).
 */

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['billing_reader', 'billing_writer', 'billing_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) r) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                    WHERE m.roleid OPERATOR(pg_catalog.=) 'billing_reader'::pg_catalog.regrole
                      AND m.member OPERATOR(pg_catalog.=) 'billing_admin'::pg_catalog.regrole) THEN
        GRANT billing_reader TO billing_admin;
    END IF;
END
$$;

-- PUBLIC gets nothing ------------------------------------------------------------------------

REVOKE ALL ON SCHEMA billing FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA billing FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA billing FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA billing FROM PUBLIC;
GRANT USAGE ON SCHEMA billing TO billing_reader, billing_writer, billing_admin;

-- functions that write what their callers cannot ---------------------------------------------

ALTER FUNCTION billing.record(bigint, text, numeric, timestamptz, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, billing, pg_temp;
ALTER FUNCTION billing.ingest(text, integer, bigint, bigint[], text[], numeric[], timestamptz[], text[], text[])
    SECURITY DEFINER SET search_path = pg_catalog, billing, pg_temp;
ALTER FUNCTION billing.report_cumulative(text, bigint, text, timestamptz, numeric, text)
    SECURITY DEFINER SET search_path = pg_catalog, billing, pg_temp;
ALTER FUNCTION billing.finalize_invoices(timestamptz) SECURITY DEFINER;
ALTER FUNCTION billing.rerate(timestamptz, timestamptz, bigint, boolean, text) SECURITY DEFINER;
ALTER FUNCTION billing.correct_usage(bigint, text, timestamptz, numeric, text, text) SECURITY DEFINER;
ALTER FUNCTION billing.compact_usage() SECURITY DEFINER;
ALTER FUNCTION billing.purge_dedupe(timestamptz) SECURITY DEFINER;
ALTER FUNCTION billing.grant_credit(bigint, numeric, timestamptz, timestamptz, integer, text[], text, text)
    SECURITY DEFINER;
ALTER FUNCTION billing.void_credit(bigint, bigint, text, timestamptz) SECURITY DEFINER;
ALTER FUNCTION billing.add_commitment(bigint, text, numeric, timestamptz, timestamptz, interval, text[], integer, numeric)
    SECURITY DEFINER;
ALTER FUNCTION billing.change_plan(bigint, text, timestamptz) SECURITY DEFINER;
-- (the audit triggers of 70_audit.sql are SECURITY DEFINER too)

-- billing_reader ---------------------------------------------------------------------------

GRANT SELECT ON ALL TABLES IN SCHEMA billing TO billing_reader;

-- billing_writer ---------------------------------------------------------------------------

GRANT EXECUTE ON FUNCTION
    billing.record(bigint, text, numeric, timestamptz, text, text),
    billing.ingest(text, integer, bigint, bigint[], text[], numeric[], timestamptz[], text[], text[]),
    billing.report_cumulative(text, bigint, text, timestamptz, numeric, text)
    TO billing_writer;

-- billing_admin (also a billing_reader) ----------------------------------------------------

GRANT INSERT, UPDATE, DELETE ON billing.meters, billing.accounts, billing.plans,
    billing.charges, billing.subscriptions TO billing_admin;
GRANT INSERT, DELETE ON billing.metered_tables TO billing_admin;
GRANT EXECUTE ON FUNCTION
    billing.price_eq(billing.price, billing.price),
    billing.price_ne(billing.price, billing.price),
    billing.rate(billing.price, numeric),
    billing.rate_tiers(billing.price, numeric),
    billing.price_to_jsonb(billing.price),
    billing.price_from_jsonb(jsonb),
    billing.price_from_stripe(jsonb),
    billing.round_money(numeric, text),
    billing.currency_exponent(text),
    billing.usage(bigint, timestamptz, timestamptz, interval, text),
    billing.remaining(bigint, text, timestamptz, text),
    billing.invoice_preview(bigint, timestamptz),
    billing.credit_balance(bigint, timestamptz),
    billing.verify_invoices(bigint),
    billing.verify_audit_log(),
    billing.reconcile(regclass, name, name, name, name, timestamptz, timestamptz),
    -- internal, read-only, called by the functions above with the caller's rights
    billing._bin(interval, timestamptz),
    billing._usage_args_ok(bigint, timestamptz, timestamptz, interval),
    billing._add_periods(timestamptz, interval, integer),
    billing._period_index(timestamptz, interval, timestamptz),
    billing._rate_period(bigint, text, text, numeric, timestamptz, timestamptz),
    billing._rate_periods(bigint[], text[], text[], numeric[], timestamptz[], timestamptz[]),
    billing._usage_totals_many(bigint[], timestamptz[], timestamptz[], integer[], text[], text[]),
    billing._invoice_preview(bigint, timestamptz),
    billing._adjustment_text(billing.adjustments),
    billing._fits(billing.price, numeric, text, numeric),
    billing._audit_hash(bytea, bigint, bigint, timestamptz, text, text, text, jsonb),
    billing._audit_encode(bigint, bigint, timestamptz, text, text, text, jsonb),
    billing._audit_image(anyelement)
    TO billing_reader;
GRANT EXECUTE ON FUNCTION
    billing.finalize_invoices(timestamptz),
    billing.rerate(timestamptz, timestamptz, bigint, boolean, text),
    billing.correct_usage(bigint, text, timestamptz, numeric, text, text),
    billing.grant_credit(bigint, numeric, timestamptz, timestamptz, integer, text[], text, text),
    billing.void_credit(bigint, bigint, text, timestamptz),
    billing.add_commitment(bigint, text, numeric, timestamptz, timestamptz, interval, text[], integer, numeric),
    billing.change_plan(bigint, text, timestamptz),
    billing.compact_usage(),
    billing.purge_dedupe(timestamptz),
    billing.meter_table(regclass, name, name, name, name, name, name, boolean),
    billing.unmeter_table(regclass),
    billing.audit_table(regclass, name),
    billing.unaudit_table(regclass),
    -- CREATE TRIGGER (in meter_table, audit_table) needs EXECUTE on the trigger functions
    billing._meter_row(),
    billing._meter_after_rows(),
    billing._meter_flush(),
    billing._audit_row(),
    billing._audit_statement(),
    -- the catalog-chain row of audit_table and unaudit_table
    billing._audit_table_note(regclass)
    TO billing_admin;

-- internal helpers --------------------------------------------------------------------------
-- The functions above call internal helpers (names starting with "_") with
-- the caller's rights.  Readers (and so admins) may execute the helpers
-- that are not SECURITY DEFINER and not triggers: they only read, or write
-- tables through SQL, where table privileges still apply.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
         WHERE p.pronamespace OPERATOR(pg_catalog.=) 'billing'::pg_catalog.regnamespace
           AND p.proname OPERATOR(pg_catalog.~~) '\_%'
           AND NOT p.prosecdef
           AND p.prorettype NOT IN ('pg_catalog.trigger'::pg_catalog.regtype,
                                    'pg_catalog.event_trigger'::pg_catalog.regtype)
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO billing_reader', f);
    END LOOP;
END
$$;
-- except _oldest_xact_start: it reads every backend's transaction start,
-- which pg_stat_activity shows only to privileged roles; purge_dedupe
-- (SECURITY DEFINER) is its one caller
REVOKE EXECUTE ON FUNCTION billing._oldest_xact_start() FROM billing_reader;
