/*
 * Helpers the later parts call: how Citus holds a table, whether a table is
 * co-located with the accounts, whether a row this node holds satisfies a
 * guard's condition, whether this node holds an audit chain (each answers
 * for one node when Citus is absent), the one trigger function that
 * refuses changes to immutable and append-only tables, and the one way
 * upgrade scripts change a table an earlier version created (on Citus too).
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
 * _citus_colocated: is tbl distributed by account_column and co-located
 * with billing.accounts?  Then one account's rows of tbl sit on the node of
 * its rows of every billing table, where a trigger firing on tbl's shard
 * may write them.  False when either table is not a distributed one (or
 * Citus is missing); the one check of distribute(), meter_table and
 * audit_table.
 */
CREATE FUNCTION billing._citus_colocated(tbl regclass, account_column name) RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF billing._citus_table_kind(tbl) IS DISTINCT FROM 'distributed'
       OR billing._citus_table_kind('billing.accounts') IS DISTINCT FROM 'distributed' THEN
        RETURN false;
    END IF;
    RETURN EXISTS (SELECT 1 FROM pg_dist_partition p, pg_dist_partition a
                    WHERE p.logicalrelid = tbl AND a.logicalrelid = 'billing.accounts'::regclass
                      AND p.colocationid = a.colocationid
                      AND column_to_column_name(p.logicalrelid, p.partkey) = account_column);
END
$$;
COMMENT ON FUNCTION billing._citus_colocated(regclass, name) IS
    'Internal: whether tbl is distributed by account_column, co-located with billing.accounts (false without Citus)';

/*
 * _update_ddl: for the upgrade scripts (sql/billing--1.0--1.1.sql and
 * later ones), DDL on a table an earlier version created: runs each of
 * cmds on the table and, when Citus holds the table, on the shard
 * placements this node holds, with Citus's propagation off.  Citus would
 * pass such a statement on with the whole upgrade script as its text, and
 * the workers' copies would name functions the workers do not have yet;
 * Citus runs ALTER EXTENSION ... UPDATE on the coordinator and then on
 * each worker, so each node changes its own copy of the table and its own
 * shards.  A COMMENT stays on the table.
 */
CREATE FUNCTION billing._update_ddl(tbl regclass, cmds text[]) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    c text;
    shard bigint;
    shards bigint[] := '{}';
    propagation text := current_setting('citus.enable_ddl_propagation', true);
BEGIN
    IF billing._citus_table_kind(tbl) IS NOT NULL THEN
        EXECUTE 'SELECT coalesce(array_agg(s.shardid ORDER BY s.shardid), ''{}'')
                   FROM pg_dist_shard s JOIN pg_dist_placement p ON p.shardid = s.shardid
                  WHERE s.logicalrelid = $1
                    AND p.groupid = (SELECT l.groupid FROM pg_dist_local_group l)'
           INTO shards USING tbl;
        PERFORM set_config('citus.enable_ddl_propagation', 'off', true);
    END IF;
    FOREACH c IN ARRAY cmds LOOP
        EXECUTE c;
        FOREACH shard IN ARRAY shards LOOP
            CONTINUE WHEN c ~* '^\s*COMMENT';     -- comments stay on the table
            PERFORM worker_apply_shard_ddl_command(shard, 'billing', c);
        END LOOP;
    END LOOP;
    IF billing._citus_table_kind(tbl) IS NOT NULL THEN
        PERFORM set_config('citus.enable_ddl_propagation', propagation, true);
    END IF;
END
$$;
COMMENT ON FUNCTION billing._update_ddl(regclass, text[]) IS
    'Internal, for upgrade scripts: DDL on a table and, on Citus, on the shard placements this node holds';

/*
 * _exists_here: does a row of tbl that this node holds satisfy cond?  cond
 * is a condition over the row (alias x) with one parameter, $1 (val),
 * written by the guards below, never taken from a user.  The rows this
 * node holds: those of tbl itself, unless Citus distributes tbl, then those
 * of the placements of its shards on this node, found in Citus's catalog
 * (pg_dist_shard, pg_dist_placement, pg_dist_local_group), which no setting
 * of a session changes.
 *
 * The guards of reference tables (meters, plans, charges) need rows of
 * distributed tables.  Citus changes every node's copy of a reference
 * table in one distributed transaction and fires the guard on each copy:
 * each copy checks the rows its node holds, reading its shards directly
 * (a trigger on a shard may not start a distributed query), and together
 * the copies check every row, whichever node the statement came from.  No
 * guard is skipped anywhere: on one node, the one copy checks every row.
 */
CREATE FUNCTION billing._exists_here(tbl regclass, cond text, val anyelement) RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    rels regclass[] := ARRAY[tbl];
    found boolean;
BEGIN
    IF billing._citus_table_kind(tbl) = 'distributed' THEN
        EXECUTE $q$
            SELECT coalesce(array_agg(shard_name(s.logicalrelid, s.shardid)::regclass
                                      ORDER BY s.shardid), '{}')
              FROM pg_dist_shard s JOIN pg_dist_placement p ON p.shardid = s.shardid
             WHERE s.logicalrelid = $1
               AND p.groupid = (SELECT l.groupid FROM pg_dist_local_group l)
            $q$ INTO rels USING tbl;
        IF cardinality(rels) = 0 THEN
            RETURN false;
        END IF;
    END IF;
    EXECUTE format('SELECT EXISTS (%s)',
                   (SELECT string_agg(format('SELECT 1 FROM %s x WHERE %s', r, cond), ' UNION ALL ')
                      FROM unnest(rels) r))
       INTO found USING val;
    RETURN found;
END
$$;
COMMENT ON FUNCTION billing._exists_here(regclass, text, anyelement) IS
    'Internal: whether a row of tbl held by this node (its shards on this node, on Citus) satisfies cond (alias x, parameter $1)';

/*
 * _citus_chain_is_local: does this node hold the shard of audit chain
 * p_chain?  True when the audit log is not distributed.  A trigger on a
 * reference table fires on every node's copy in one distributed
 * transaction; only the node holding the chain writes the audit row.
 */
CREATE FUNCTION billing._citus_chain_is_local(p_chain bigint) RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF billing._citus_table_kind('billing.audit_log') IS DISTINCT FROM 'distributed' THEN
        RETURN true;
    END IF;
    RETURN EXISTS (SELECT 1 FROM pg_dist_placement p
                    WHERE p.shardid = get_shard_id_for_distribution_column('billing.audit_log', p_chain)
                      AND p.groupid = (SELECT l.groupid FROM pg_dist_local_group l));
END
$$;
COMMENT ON FUNCTION billing._citus_chain_is_local(bigint) IS
    'Internal: true when this node holds the audit chain (always, without Citus)';

/*
 * _refuse_change: a BEFORE trigger that refuses the statement with 55000,
 * "<op> of <table> is not allowed".  Arguments: the DETAIL, then an
 * optional HINT, then the columns an UPDATE may set once (optional): an
 * UPDATE that sets the first of them from NULL to a value and changes
 * nothing but those columns passes.  Serves every table that is immutable
 * or append-only, and those that record one thing once (adjustments: the
 * invoice that carried them; credit grants: their void).  On Citus it
 * fires on a shard, named after its table with the shard's number: the
 * error names the table.
 */
CREATE FUNCTION billing._refuse_change() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    once text[];
    tbl text := regexp_replace(TG_TABLE_NAME, '_[0-9]+$', '');
BEGIN
    IF TG_OP = 'UPDATE' AND TG_NARGS > 2 THEN
        once := TG_ARGV[2:TG_NARGS - 1];
        IF to_jsonb(OLD) ->> once[1] IS NULL AND to_jsonb(NEW) ->> once[1] IS NOT NULL
           AND (to_jsonb(NEW) - once) = (to_jsonb(OLD) - once) THEN
            RETURN NEW;
        END IF;
    END IF;
    IF TG_NARGS > 1 THEN
        RAISE EXCEPTION '% of % is not allowed', lower(TG_OP), tbl
            USING ERRCODE = '55000', DETAIL = TG_ARGV[0], HINT = TG_ARGV[1];
    END IF;
    RAISE EXCEPTION '% of % is not allowed', lower(TG_OP), tbl
        USING ERRCODE = '55000', DETAIL = TG_ARGV[0];
END
$$;
COMMENT ON FUNCTION billing._refuse_change() IS
    'Internal: refuses UPDATE, DELETE or TRUNCATE of immutable and append-only tables (arguments: detail, hint, columns an UPDATE may set once)';

/*
 * _plan_cache_for: the planner settings for the statements that rate or
 * build p_periods billing periods, set with set_config(..., true) at the
 * caller's level: the caller declares SET plan_cache_mode = auto (and SET
 * enable_nestloop = on with p_hash_joins), so the settings end with its
 * call.  (This function has no SET clause of its own, which would end them
 * with this call.)  The one rule for every rating path, and the one place
 * that says what "many periods" is:
 *   - more than 16 periods (finalize, rerate): custom plans, which know
 *     the arrays' sizes (a generic plan takes each array for 10 rows and
 *     may join them in loops); and with p_hash_joins no nested loops
 *     (_rate_periods: once ANALYZE has seen the few rows of meters and
 *     charges, the planner expects a handful of rows from CTEs that hold
 *     one or more per period and joins them in nested loops, quadratic in
 *     the periods);
 *   - at most 16 (a preview, remaining), without Citus and with p_generic:
 *     one generic plan per statement and session (planning the statements
 *     anew took longer than running them for one account);
 *   - otherwise the caller's mode: with Citus loaded, which plans
 *     distributed statements with their parameters' values.
 */
CREATE FUNCTION billing._plan_cache_for(p_periods integer, p_generic boolean DEFAULT true,
                                        p_hash_joins boolean DEFAULT false)
    RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    IF p_periods > 16 THEN
        PERFORM pg_catalog.set_config('plan_cache_mode', 'force_custom_plan', true);
        IF p_hash_joins THEN
            PERFORM pg_catalog.set_config('enable_nestloop', 'off', true);
        END IF;
    ELSIF p_generic AND pg_catalog.current_setting('citus.version', true) IS NULL THEN
        PERFORM pg_catalog.set_config('plan_cache_mode', 'force_generic_plan', true);
    END IF;
END
$$;
COMMENT ON FUNCTION billing._plan_cache_for(integer, boolean, boolean) IS
    'Internal: sets plan_cache_mode (and enable_nestloop) for the rest of the caller''s call, from the number of periods it rates';

/*
 * _retry_if_snapshot: called by a writer that takes its locks and then
 * reads what it must not write twice (invoices, an idempotency key, the
 * next ledger seq) when a write fails with a unique violation.  Under
 * READ COMMITTED the reads after the lock see what a concurrent writer
 * committed, so the violation is a real one and the caller raises it
 * again.  Under REPEATABLE READ or SERIALIZABLE they read the snapshot
 * taken before the lock, which may miss a concurrent writer's rows: that
 * is a serialization failure (40001, retry the transaction), as a
 * concurrent update of a locked row is.  The one rule for every such
 * writer.
 */
CREATE FUNCTION billing._retry_if_snapshot(p_what text) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    -- (READ UNCOMMITTED runs as READ COMMITTED: a violation there is real too)
    IF pg_catalog.current_setting('transaction_isolation') IN ('repeatable read', 'serializable') THEN
        RAISE EXCEPTION '%: a concurrent transaction wrote rows this transaction''s snapshot does not show', p_what
            USING ERRCODE = '40001', HINT = 'Retry the transaction.';
    END IF;
END
$$;
COMMENT ON FUNCTION billing._retry_if_snapshot(text) IS
    'Internal: after a unique violation of a writer that locked first, raises 40001 under REPEATABLE READ or SERIALIZABLE (its snapshot predates the lock); returns under READ COMMITTED (and READ UNCOMMITTED, which runs as it)';

/*
 * _chunk_ends: the batches of a job over many accounts (finalize_invoices,
 * rerate), so that its memory is that of a batch, not of every account.
 * Given the accounts of the job's rows in account order, the index of the
 * last row of each run of p_per accounts (at least one): a batch never
 * splits an account's rows.
 */
CREATE FUNCTION billing._chunk_ends(p_accounts bigint[], p_per integer) RETURNS integer[]
    LANGUAGE sql IMMUTABLE STRICT
    SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(y.e ORDER BY y.e), '{}')
      FROM (SELECT max(z.k)::integer AS e
              FROM (SELECT u.k, dense_rank() OVER (ORDER BY u.a) AS r
                      FROM unnest(p_accounts) WITH ORDINALITY AS u(a, k)) z
             GROUP BY (z.r - 1) / greatest(p_per, 1)) y
$$;
COMMENT ON FUNCTION billing._chunk_ends(bigint[], integer) IS
    'Internal: the last index of each run of p_per accounts in an account-ordered array (the batches of finalize_invoices and rerate)';

CREATE FUNCTION billing._lock_table(rel regclass) RETURNS void
    AS 'MODULE_PATHNAME', 'billing_lock_table'
    LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION billing._lock_table(regclass) IS
    'Internal: SHARE UPDATE EXCLUSIVE on a table, on this node, to the end of the transaction, for a role that may UPDATE, DELETE or TRUNCATE it (42501 otherwise): one holder at a time, rows still read and written';
