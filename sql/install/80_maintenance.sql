/*
 * The maintenance worker (SPEC 10.3, issue 16 part 4).  The worker itself
 * is C (src/worker.c): with billing in shared_preload_libraries it runs
 * compact_usage(), purge_dedupe(now()) and, with billing.auto_finalize on,
 * finalize_invoices(now()) every billing.maintenance_interval in every
 * database that has the extension.  What it did lives in shared memory
 * (nothing is written to the database); this view shows it.
 */

CREATE FUNCTION billing._maintenance_status()
    RETURNS TABLE (job text, worker_pid integer, next_run timestamptz, last_run timestamptz,
                   last_duration interval, last_result text, last_value bigint,
                   last_error text, last_success timestamptz, runs bigint, failures bigint)
    AS 'MODULE_PATHNAME', 'billing_maintenance_status'
    LANGUAGE C VOLATILE STRICT ROWS 3;
COMMENT ON FUNCTION billing._maintenance_status() IS
    'Internal: what the maintenance worker of this database last did, per job (read through billing.maintenance_status)';

CREATE VIEW billing.maintenance_status AS
    SELECT s.job, s.worker_pid, s.next_run, s.last_run, s.last_duration, s.last_result,
           s.last_value, s.last_error, s.last_success, s.runs, s.failures
      FROM billing._maintenance_status() s;
COMMENT ON VIEW billing.maintenance_status IS
    'One row per maintenance job (compact_usage, purge_dedupe, finalize_invoices): the worker of this database, its next run, and the last run''s start, duration, result (ok, error, running, skipped, off), returned value and error; since the server started';

/*
 * _maintenance_runs_here: does the worker of this node run job?  On one
 * node, every job.  On Citus, compact_usage runs on every worker node, each
 * over the shards it holds (issue 16 part 3); on the coordinator only when
 * it holds placements of usage_deltas itself, or a node holding some has no
 * copy of Citus's metadata (and so cannot find its own shards): the
 * coordinator's compact_usage() then compacts every placement, on its node
 * (a shard compacted from two nodes at once is compacted by one after the
 * other: the lock of billing._compact_pair).  The other jobs run on the
 * coordinator, from where their statements reach every shard; the workers
 * of the other nodes skip them (the view shows "skipped").
 */
CREATE FUNCTION billing._maintenance_runs_here(job text) RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grp integer;
    res boolean;
BEGIN
    IF billing._citus_table_kind('billing.usage_deltas') IS NULL THEN
        RETURN true;
    END IF;
    EXECUTE 'SELECT groupid FROM pg_catalog.pg_dist_local_group' INTO grp;
    IF job <> 'compact_usage' THEN
        RETURN grp = 0;
    END IF;
    IF grp <> 0 THEN
        RETURN true;
    END IF;
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_shard s
                              JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid
                              JOIN pg_catalog.pg_dist_node n ON n.groupid = p.groupid
                             WHERE s.logicalrelid = ''billing.usage_deltas''::regclass
                               AND (p.groupid = 0 OR NOT n.hasmetadata))'
        INTO res;
    RETURN res;
END
$$;
COMMENT ON FUNCTION billing._maintenance_runs_here(text) IS
    'Internal: whether the maintenance worker of this node runs job (on Citus: compact_usage on the nodes that hold shards, the other jobs on the coordinator)';
