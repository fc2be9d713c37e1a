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
 *
 * The triggers are the same on one node and on Citus, as CREATE EXTENSION
 * installs them (one schema shape, issue 15): their functions tell a shard
 * from a plain table when they run, the invoices' audit trigger is deferred
 * to the commit (billing._finalize sets it IMMEDIATE on one node).
 * distribute() changes one thing only: it drops the unique index on
 * invoice_id alone, which Citus cannot enforce across shards (the one
 * sequence keeps invoice numbers apart).
 */

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
           ('billing.remaining(bigint,text,timestamptz,text)', '$1'),
           ('billing.invoice_preview(bigint,timestamptz)', '$1'),
           ('billing.credit_balance(bigint,timestamptz)', '$1'),
           ('billing.correct_usage(bigint,text,timestamptz,numeric,text,text)', '$1')
$$;
COMMENT ON FUNCTION billing._distributed_functions() IS
    'Internal: the per-account functions billing.distribute() registers with Citus, with their account argument';

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

    -- Citus enforces unique keys per shard only, so they must hold the
    -- distribution column: invoice numbers stay unique through their sequence
    IF to_regclass('billing.invoices_invoice_id_key') IS NOT NULL THEN
        DROP INDEX billing.invoices_invoice_id_key;
    END IF;

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

    -- group rows of usage_deltas hold the cells of several accounts (one
    -- node only, cells.h): split them into one row per account, which
    -- Citus places on the account's shard
    IF billing._citus_table_kind('billing.usage_deltas') IS NULL THEN
        -- no session writes another group row before the table is
        -- distributed (ingest waits, then writes through Citus)
        LOCK TABLE billing.usage_deltas IN EXCLUSIVE MODE;
        WITH grp AS (
            DELETE FROM billing.usage_deltas d
             WHERE get_byte(d.cells, 0) = 3
            RETURNING d.ctid AS row_id, d.account_id, d.seq, d.cells
        )
        INSERT INTO billing.usage_deltas (account_id, seq, cells)
        SELECT c.account_id, c.seq,
               billing._delta_pack(array_agg(c.meter ORDER BY c.meter, c.dimension, c.bucket_start),
                                   array_agg(c.dimension ORDER BY c.meter, c.dimension, c.bucket_start),
                                   array_agg(c.bucket_start ORDER BY c.meter, c.dimension, c.bucket_start),
                                   array_agg(c.quantity ORDER BY c.meter, c.dimension, c.bucket_start),
                                   array_agg(c.events ORDER BY c.meter, c.dimension, c.bucket_start),
                                   array_agg(c.last_ts ORDER BY c.meter, c.dimension, c.bucket_start))
          FROM grp g, billing._delta_rows(g.account_id, g.seq, g.cells, NULL) c
         GROUP BY g.row_id, c.account_id, c.seq;
    END IF;

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
            -- metered_tables holds regclass values, which differ per node
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
        ELSIF t.per_account AND NOT billing._citus_colocated(t.rel, 'account_id') THEN
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
