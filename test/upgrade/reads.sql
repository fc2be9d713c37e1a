-- test/upgrade/reads.sql: every read of a billing database, as rows
-- "label <tab> read <tab> row as jsonb", for test/upgrade/run.sh, which
-- loads them into its check database and compares them.  psql variable
-- :label names the snapshot (database and phase).
--
-- Generic where it can be: the reads are made for every account and meter
-- the database holds, and every table and sequence registered with
-- pg_extension_config_dump is read whole (so tables added in later
-- versions are covered without a change here), as are the users' tables
-- in schema public; but reads whose name matches the regular expression in
-- psql variable :skip (the internal usage store, whose content the reads
-- above cover).  The public functions are called as a role in
-- billing_reader (up_reader), so their grants are exercised too:
--   usage at the stored grain and rolled up by hour, day and month, of
--   every account, and of one account meter by meter; invoice_preview and remaining (every
--   account and meter) at fixed instants; verify_invoices,
--   verify_audit_log; reconcile against public.up_export (two months); a dry-run rerate
--   of the whole range.
-- Only 1.0's API is called, so the same reads run before and after the
-- update and on a fresh 1.1 install.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
SET extra_float_digits = 1;

CREATE FUNCTION pg_temp.api_reads(lo timestamptz, hi timestamptz, instants timestamptz[])
    RETURNS TABLE (read text, data jsonb)
    LANGUAGE plpgsql AS $$
DECLARE
    a bigint;
    m text;
    g interval;
    t timestamptz;
BEGIN
    FOR a IN SELECT x.account_id FROM billing.accounts x ORDER BY 1 LOOP
        FOREACH g IN ARRAY ARRAY[NULL, '1 hour', '1 day', '1 month']::interval[] LOOP
            RETURN QUERY
                SELECT 'usage grain ' || coalesce(g::text, 'stored'),
                       jsonb_build_object('account', a) || to_jsonb(u)
                  FROM billing.usage(a, lo, hi, g) u;
        END LOOP;
        FOR m IN SELECT x.meter FROM billing.meters x WHERE a = 1 ORDER BY 1 LOOP
            RETURN QUERY
                SELECT 'usage of one meter', jsonb_build_object('account', a, 'of_meter', m) || to_jsonb(u)
                  FROM billing.usage(a, lo, hi, NULL, m) u;
            RETURN QUERY
                SELECT 'usage of one meter by day',
                       jsonb_build_object('account', a, 'of_meter', m) || to_jsonb(u)
                  FROM billing.usage(a, lo, hi, '1 day', m) u;
        END LOOP;
        FOREACH t IN ARRAY instants LOOP
            RETURN QUERY
                SELECT 'invoice_preview', jsonb_build_object('account', a, 'instant', t) || to_jsonb(p)
                  FROM billing.invoice_preview(a, t) p;
            RETURN QUERY
                SELECT 'remaining',
                       jsonb_build_object('account', a, 'instant', t, 'meter', x.meter,
                                          'remaining', billing.remaining(a, x.meter, t))
                  FROM billing.meters x;
        END LOOP;
    END LOOP;
    RETURN QUERY SELECT 'verify_invoices', to_jsonb(v) FROM billing.verify_invoices() v;
    RETURN QUERY SELECT 'verify_audit_log', to_jsonb(v) FROM billing.verify_audit_log() v;
    IF to_regclass('public.up_export') IS NOT NULL THEN
        RETURN QUERY
            SELECT 'reconcile', to_jsonb(r)
              FROM billing.reconcile('public.up_export', 'org', 'category', 'quantity', 'received',
                                     lo, lo + interval '2 months') r;
    END IF;
END
$$;

-- tables and sequences: the extension's registered ones, and the users';
-- reads whose name matches skip are left out
CREATE FUNCTION pg_temp.table_reads(skip text) RETURNS TABLE (read text, data jsonb)
    LANGUAGE plpgsql AS $$
DECLARE
    rel regclass;
    kind "char";
BEGIN
    FOR rel, kind IN
        SELECT c.oid::regclass, c.relkind
          FROM pg_class c
         WHERE (c.oid IN (SELECT unnest(e.extconfig) FROM pg_extension e WHERE e.extname = 'billing')
                OR (c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'S')))
           AND (CASE WHEN c.relkind = 'S' THEN 'sequence ' ELSE 'table ' END || c.oid::regclass::text)
               !~ skip
         ORDER BY 1::text
    LOOP
        IF kind = 'S' THEN
            RETURN QUERY EXECUTE format(
                'SELECT %L, jsonb_build_object(''last_value'', last_value, ''is_called'', is_called) FROM %s',
                'sequence ' || rel::text, rel);
        ELSE
            RETURN QUERY EXECUTE format('SELECT %L, to_jsonb(t) FROM %s t', 'table ' || rel::text, rel);
        END IF;
    END LOOP;
END
$$;

-- the range and instants every read covers (fixed, as the history is)
SET ROLE up_reader;
COPY (SELECT :'label', r.read, r.data
        FROM pg_temp.api_reads('2025-12-01', '2026-07-01',
                               ARRAY['2026-01-15', '2026-02-05 00:00', '2026-02-20', '2026-03-10',
                                     '2026-03-31 23:59:59', '2026-04-15', '2026-05-15']::timestamptz[]) r)
    TO STDOUT;
-- a dry run writes nothing, but only billing_admin may call rerate
RESET ROLE;
SET ROLE up_admin;
COPY (SELECT :'label', 'rerate dry run', to_jsonb(r)
        FROM billing.rerate('2025-12-01', '2026-07-01', dry_run => true) r)
    TO STDOUT;
RESET ROLE;
COPY (SELECT :'label', r.read, r.data FROM pg_temp.table_reads(:'skip') r) TO STDOUT;
