/*
 * Scaling out on Citus (issue 8).
 *
 * billing.distribute(), run once by an admin on the coordinator after
 * CREATE EXTENSION citus (every node) and CREATE EXTENSION billing, turns
 * the schema into a distributed one:
 *
 *   - every table with an account_id column is distributed by account_id,
 *     co-located with billing.accounts (so one account's rows of every
 *     table live on one node);
 *   - every other table of the schema (meters, plans, charges,
 *     ingest_offsets, ...) becomes a reference table, copied to every
 *     node, except billing.metered_tables (regclass values are per node;
 *     only meter_table/unmeter_table on the coordinator read it);
 *   - the per-account functions are registered with
 *     create_distributed_function on their account_id argument, so that a
 *     call runs on the node that holds the account.
 *
 * The schema keeps the rules this needs (the pgTAP test citus_rules.sql
 * checks them without Citus): every primary or unique key of a table with
 * account_id starts with account_id, and such a table has foreign keys only
 * to reference tables or to a co-located table on (account_id, ...).
 */

/*
 * _citus_table_kind: 'distributed', 'reference' or NULL (not a Citus
 * table, or Citus missing).  Reads the catalog dynamically so that the
 * extension installs without Citus.
 */
CREATE FUNCTION billing._citus_table_kind(rel regclass) RETURNS text
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    method "char";
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE 'SELECT partmethod FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1'
        INTO method USING rel;
    RETURN CASE WHEN method IS NULL THEN NULL WHEN method = 'h' THEN 'distributed'
                WHEN method = 'n' THEN 'reference' ELSE 'other' END;
END
$$;
COMMENT ON FUNCTION billing._citus_table_kind(regclass) IS
    'Internal: how Citus holds a table (distributed, reference) or NULL when it does not';

/*
 * _in_citus_task: is this backend running a statement that another Citus
 * node sent (a shard or reference placement task)?  Guards that read
 * every shard skip their check there: the node the client talks to has
 * run it already, and a task may not start distributed queries.
 */
CREATE FUNCTION billing._in_citus_task() RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_catalog.current_setting('application_name') LIKE 'citus\_internal gpid=%'
$$;
COMMENT ON FUNCTION billing._in_citus_task() IS
    'Internal: true in a backend executing a task sent by another Citus node';

/*
 * The per-account functions and the argument that names the account.  A
 * call whose account argument is a constant, outside an explicit
 * transaction block, is run on the node holding that account.
 */
CREATE FUNCTION billing._distributed_functions()
    RETURNS TABLE (fn regprocedure, account_arg text)
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    VALUES ('billing.record(bigint,text,numeric,timestamptz,text,text)'::regprocedure, '$1'),
           ('billing.report_cumulative(text,bigint,text,timestamptz,numeric,text)', '$2'),
           ('billing.usage(bigint,timestamptz,timestamptz,interval,text)', '$1'),
           ('billing.remaining(bigint,text,timestamptz)', '$1'),
           ('billing.invoice_preview(bigint,timestamptz)', '$1'),
           ('billing.correct_usage(bigint,text,timestamptz,numeric,text,text)', '$1')
$$;
COMMENT ON FUNCTION billing._distributed_functions() IS
    'Internal: the per-account functions billing.distribute() registers with Citus, with their account argument';

/*
 * _meter_table_citus: meter_table's check on Citus.  When billing is
 * distributed and the metered table is a Citus table, its rows are counted
 * by triggers firing on its shards, which may write only co-located shards:
 * the table must be distributed by its account column with
 * billing.accounts.  Allows the triggers (citus.enable_unsafe_triggers) for
 * the rest of the transaction.  A plain table on the coordinator needs
 * nothing: its triggers run there and Citus routes their writes.
 */
CREATE FUNCTION billing._meter_table_citus(tbl regclass, account_column name) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    kind text := billing._citus_table_kind(tbl);
BEGIN
    IF kind IS NULL OR billing._citus_table_kind('billing.accounts') IS NULL THEN
        RETURN;
    END IF;
    IF kind <> 'distributed' OR NOT EXISTS (
        SELECT 1 FROM pg_dist_partition p, pg_dist_partition a
         WHERE p.logicalrelid = tbl AND a.logicalrelid = 'billing.accounts'::regclass
           AND p.colocationid = a.colocationid
           AND column_to_column_name(p.logicalrelid, p.partkey) = account_column) THEN
        RAISE EXCEPTION 'metered table % must be distributed by its account column with billing.accounts', tbl
            USING ERRCODE = '55000',
                  DETAIL = 'Its triggers count each row on the node of the row''s shard, which must also hold the account''s counters.',
                  HINT = format('SELECT create_distributed_table(%L, %L, colocate_with => %L)',
                                tbl::text, account_column, 'billing.accounts');
    END IF;
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
END
$$;
COMMENT ON FUNCTION billing._meter_table_citus(regclass, name) IS
    'Internal: on Citus, a metered Citus table must be co-located with billing.accounts by its account column';

CREATE FUNCTION billing.distribute()
    RETURNS TABLE (object text, distribution text, changed boolean)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    t record;
    f record;
    fk record;
    fks text[] := '{}';
    kind text;
    had_rows boolean;
    emptied regclass[] := '{}';
    rel regclass;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'citus is not installed'
            USING ERRCODE = '55000',
                  DETAIL = 'billing.distribute() shards the billing tables with Citus.',
                  HINT = 'Load citus (shared_preload_libraries), run CREATE EXTENSION citus on every node, add the workers, then call billing.distribute() on the coordinator.';
    END IF;
    IF NOT citus_is_coordinator() THEN
        RAISE EXCEPTION 'billing.distribute() must run on the coordinator'
            USING ERRCODE = '55000';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_dist_node WHERE groupid = 0) THEN
        RAISE EXCEPTION 'the coordinator is not in the Citus metadata'
            USING ERRCODE = '55000',
                  DETAIL = 'Reference tables need a copy on the coordinator, where guards on them run.',
                  HINT = 'Run SELECT citus_set_coordinator_host(''host'', port) first.';
    END IF;

    -- the billing triggers move with their tables (they write only the
    -- account's own, co-located rows); one connection per node keeps the
    -- foreign keys created in this transaction valid
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);

    -- foreign keys between tables not yet converted: drop now, add back
    -- once both sides are Citus tables (Citus converts only whole graphs)
    FOR fk IN
        SELECT format('billing.%I', r.relname) AS rel, c.conname, pg_get_constraintdef(c.oid) AS def
          FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid
         WHERE c.contype = 'f' AND r.relnamespace = 'billing'::regnamespace
           AND (billing._citus_table_kind(c.conrelid) IS NULL
                OR billing._citus_table_kind(c.confrelid) IS NULL)
         ORDER BY r.relname, c.conname
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', fk.rel, fk.conname);
        -- the workers' copies of the extension's tables become the shells
        PERFORM run_command_on_workers(
            format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I', fk.rel, fk.conname));
        fks := fks || format('ALTER TABLE %s ADD CONSTRAINT %I %s', fk.rel, fk.conname, fk.def);
    END LOOP;

    -- tables: accounts first (the co-location group), reference tables next
    FOR t IN
        SELECT c.oid::regclass AS rel, c.relname,
               EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = c.oid AND a.attname = 'account_id'
                          AND a.attnum > 0 AND NOT a.attisdropped) AS per_account
          FROM pg_class c
         WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r'
           AND NOT c.relispartition
         ORDER BY c.relname <> 'accounts', 3, c.relname
    LOOP
        kind := billing._citus_table_kind(t.rel);
        IF t.relname = 'metered_tables' THEN
            object := t.rel::text;
            distribution := 'local (coordinator)';
            changed := false;
            RETURN NEXT;
            CONTINUE;
        END IF;
        changed := kind IS NULL;
        IF kind IS NULL THEN
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', t.rel) INTO had_rows;
            IF t.per_account THEN
                PERFORM create_distributed_table(t.rel, 'account_id',
                    colocate_with => CASE WHEN t.relname = 'accounts' THEN 'default'
                                          ELSE 'billing.accounts' END);
            ELSE
                PERFORM create_reference_table(t.rel);
            END IF;
            IF had_rows THEN
                emptied := emptied || t.rel;
            END IF;
        ELSIF t.per_account AND (kind <> 'distributed'
              OR NOT EXISTS (SELECT 1 FROM pg_dist_partition p, pg_dist_partition a
                              WHERE p.logicalrelid = t.rel
                                AND a.logicalrelid = 'billing.accounts'::regclass
                                AND p.colocationid = a.colocationid
                                AND p.partkey IS NOT NULL
                                AND column_to_column_name(p.logicalrelid, p.partkey) = 'account_id')) THEN
            RAISE EXCEPTION 'table % is a Citus table, but not distributed by account_id with billing.accounts', t.rel
                USING ERRCODE = '55000',
                      HINT = 'Undistribute it (undistribute_table) and run billing.distribute() again.';
        ELSIF NOT t.per_account AND kind <> 'reference' THEN
            RAISE EXCEPTION 'table % is a Citus table, but not a reference table', t.rel
                USING ERRCODE = '55000',
                      HINT = 'Undistribute it (undistribute_table) and run billing.distribute() again.';
        END IF;
        object := t.rel::text;
        distribution := CASE WHEN t.per_account THEN 'distributed by account_id'
                             ELSE 'reference' END;
        RETURN NEXT;
    END LOOP;

    FOREACH object IN ARRAY fks LOOP
        EXECUTE object;
    END LOOP;

    -- the data now lives in the shards; empty the coordinator's copies
    -- (without firing the immutability triggers of invoices: nothing is
    -- deleted, only moved)
    IF array_length(emptied, 1) > 0 THEN
        PERFORM set_config('session_replication_role', 'replica', true);
        FOREACH rel IN ARRAY emptied LOOP
            PERFORM truncate_local_data_after_distributing_table(rel);
        END LOOP;
        PERFORM set_config('session_replication_role', 'origin', true);
    END IF;

    -- functions: a call runs where its account is
    FOR f IN SELECT * FROM billing._distributed_functions() LOOP
        changed := NOT EXISTS (SELECT 1 FROM pg_dist_object o
                                WHERE o.classid = 'pg_proc'::regclass AND o.objid = f.fn
                                  AND o.distribution_argument_index IS NOT NULL);
        IF changed THEN
            PERFORM create_distributed_function(f.fn, f.account_arg,
                                                colocate_with => 'billing.accounts');
        END IF;
        object := f.fn::text;
        distribution := format('runs on the node of account %s', f.account_arg);
        RETURN NEXT;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing.distribute() IS
    'On a Citus coordinator: distributes the per-account tables by account_id (co-located), makes the catalog tables reference tables and runs the per-account functions where their account is; idempotent';

REVOKE ALL ON FUNCTION billing.distribute() FROM PUBLIC;
