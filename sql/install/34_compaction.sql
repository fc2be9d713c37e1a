/*
 * Compaction: compact_usage() folds the appended deltas into the packed
 * store billing.usage_days (src/compact.c, src/store.c).
 */

-- the one rule by which values of a counter cell combine (src/agg.c, SPEC
-- section 2): sum and count add, max keeps the larger, last the value of the
-- greater (last_ts, last_seq), a NULL counting as the earliest, and on equal
-- (last_ts, last_seq) the greater quantity, so that the order of folding
-- never matters
CREATE FUNCTION billing._combine(aggregation text, q1 numeric, ts1 timestamptz, seq1 bigint,
                                 q2 numeric, ts2 timestamptz, seq2 bigint)
    RETURNS numeric
    AS 'MODULE_PATHNAME', 'billing_combine'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._combine(text, numeric, timestamptz, bigint, numeric, timestamptz, bigint) IS
    'Internal: combines two values of a counter cell by the one rule of src/agg.c (sum/count add, max keeps the larger, last the later by (last_ts, last_seq))';

CREATE FUNCTION billing._last_later(ts1 timestamptz, seq1 bigint, ts2 timestamptz, seq2 bigint)
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_last_later_sql'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._last_later(timestamptz, bigint, timestamptz, bigint) IS
    'Internal: whether a last value stamped ts1 that arrived as seq1 is later than one stamped ts2 that arrived as seq2 (NULL: the earliest)';

CREATE FUNCTION billing._cell_agg_step(state internal, aggregation text, quantity numeric,
                                       last_ts timestamptz, last_seq bigint)
    RETURNS internal
    AS 'MODULE_PATHNAME', 'billing_cell_agg_step'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._cell_agg_step(internal, text, numeric, timestamptz, bigint) IS
    'Internal: transition of billing._cell_agg';

CREATE FUNCTION billing._cell_agg_final(state internal) RETURNS numeric
    AS 'MODULE_PATHNAME', 'billing_cell_agg_final'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._cell_agg_final(internal) IS
    'Internal: result of billing._cell_agg';

CREATE FUNCTION billing._cell_agg_last_ts(state internal) RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'billing_cell_agg_last_ts'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._cell_agg_last_ts(internal) IS
    'Internal: result of billing._cell_last_ts';

CREATE FUNCTION billing._cell_agg_last_seq(state internal) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_cell_agg_last_seq'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._cell_agg_last_seq(internal) IS
    'Internal: result of billing._cell_last_seq';

CREATE AGGREGATE billing._cell_agg(aggregation text, quantity numeric, last_ts timestamptz,
                                   last_seq bigint) (
    SFUNC = billing._cell_agg_step, STYPE = internal, FINALFUNC = billing._cell_agg_final
);
COMMENT ON AGGREGATE billing._cell_agg(text, numeric, timestamptz, bigint) IS
    'Internal: the value of a meter over counter cells, by the one rule of src/agg.c';

CREATE AGGREGATE billing._cell_last_ts(aggregation text, quantity numeric, last_ts timestamptz,
                                       last_seq bigint) (
    SFUNC = billing._cell_agg_step, STYPE = internal, FINALFUNC = billing._cell_agg_last_ts
);
COMMENT ON AGGREGATE billing._cell_last_ts(text, numeric, timestamptz, bigint) IS
    'Internal: the last_ts of the value billing._cell_agg gives';

CREATE AGGREGATE billing._cell_last_seq(aggregation text, quantity numeric, last_ts timestamptz,
                                        last_seq bigint) (
    SFUNC = billing._cell_agg_step, STYPE = internal, FINALFUNC = billing._cell_agg_last_seq
);
COMMENT ON AGGREGATE billing._cell_last_seq(text, numeric, timestamptz, bigint) IS
    'Internal: the last_seq of the value billing._cell_agg gives';

-- compaction in C (src/compact.c): takes the deltas out, sorts and combines
-- their cells by the one rule, merges them per (account, meter, UTC day,
-- dimension) into the packed rows of usage_days, and hands the cells of
-- unique meters to billing._unique_fold (46_unique.sql); through SPI, so on
-- Citus too
CREATE FUNCTION billing.compact_usage() RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_compact_usage'
    LANGUAGE C
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles its plans for longer than they run
    SET jit = off
    SET client_min_messages = warning;

COMMENT ON FUNCTION billing.compact_usage() IS
    'Folds appended usage deltas into the bucket counters; returns the number of delta cells merged';

/*
 * Compaction on Citus (issue 16 part 3): each node compacts its own shards.
 * usage_deltas and usage_days are co-located, so the deltas of a shard of
 * usage_deltas fold into the usage_days shard of the same shard group, on
 * the node that holds both, with the heap path of one node
 * (billing._compact_pair).  compact_usage() on the coordinator has every
 * node compact the shards it holds, all nodes at once, one connection each
 * (billing._compact_placements), and sums what they folded; on a worker
 * node it compacts the shards that node holds.  One connection per node,
 * not per placement: measured on one machine (2 cores, 32 shards, 1M rows),
 * a connection per placement took twice as long as the coordinator's SQL,
 * one per node under a third of it.
 */

-- one shard of usage_deltas into the co-located shard of usage_days, through
-- their heaps (src/compact.c); billing._compact_shard checks and locks first
CREATE FUNCTION billing._compact_pair(deltas regclass, days regclass) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_compact_pair'
    LANGUAGE C STRICT
    SET search_path = pg_catalog, billing, pg_temp
    SET jit = off
    SET client_min_messages = warning;
COMMENT ON FUNCTION billing._compact_pair(regclass, regclass) IS
    'Internal: compacts one shard of usage_deltas into the co-located shard of usage_days, on the node that holds them (billing._compact_shard calls it)';

-- a pair of co-located shards (by shard id), on this node: checked in
-- Citus's metadata, locked as Citus locks a shard it writes (a shard move
-- takes that lock exclusively before it switches the placements), then
-- compacted if this node still holds both (after a move, the node it went
-- to compacts it: 0 here)
CREATE FUNCTION billing._compact_shard(deltas_shard bigint, days_shard bigint) RETURNS bigint
    LANGUAGE plpgsql STRICT
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    paired boolean;
    here boolean;
    d regclass;
    u regclass;
BEGIN
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_dist_shard d JOIN pg_dist_shard u
                              ON u.shardminvalue = d.shardminvalue AND u.shardmaxvalue = d.shardmaxvalue
                             WHERE d.shardid = $1 AND d.logicalrelid = ''billing.usage_deltas''::regclass
                               AND u.shardid = $2 AND u.logicalrelid = ''billing.usage_days''::regclass)'
        INTO paired USING deltas_shard, days_shard;
    IF NOT paired THEN
        RAISE EXCEPTION 'shards % and % are not co-located shards of billing.usage_deltas and billing.usage_days',
            deltas_shard, days_shard USING ERRCODE = '22023';
    END IF;
    -- ShareLock (5), as Citus's own writes take it; in shard id order
    EXECUTE 'SELECT lock_shard_metadata(5, ARRAY[least($1, $2), greatest($1, $2)])'
        USING deltas_shard, days_shard;
    EXECUTE 'SELECT count(*) = 2 FROM pg_dist_placement p
              WHERE p.shardid IN ($1, $2) AND p.shardstate = 1
                AND p.groupid = (SELECT groupid FROM pg_dist_local_group)'
        INTO here USING deltas_shard, days_shard;
    IF NOT here THEN
        RETURN 0;
    END IF;
    EXECUTE 'SELECT to_regclass(shard_name(''billing.usage_deltas''::regclass, $1)),
                    to_regclass(shard_name(''billing.usage_days''::regclass, $2))'
        INTO d, u USING deltas_shard, days_shard;
    IF d IS NULL OR u IS NULL THEN
        RETURN 0;
    END IF;
    RETURN billing._compact_pair(d, u);
END
$$;
COMMENT ON FUNCTION billing._compact_shard(bigint, bigint) IS
    'Internal: compacts a co-located pair of shards of usage_deltas and usage_days (by shard id) if this node holds them; returns the delta cells folded';

-- the pairs of co-located shards given, on this node, one after the other
CREATE FUNCTION billing._compact_shards(deltas_shards bigint[], days_shards bigint[])
    RETURNS bigint
    LANGUAGE sql STRICT
    SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(sum(billing._compact_shard(d, u)), 0)::bigint
      FROM unnest(deltas_shards, days_shards) AS p(d, u)
$$;
COMMENT ON FUNCTION billing._compact_shards(bigint[], bigint[]) IS
    'Internal: billing._compact_shard on each pair of co-located shards given, on this node, in one transaction; returns the delta cells folded';

-- from the coordinator: every node that holds shards compacts them
-- (billing._compact_shards, one connection and transaction per node, all
-- nodes at once), with what each returned
CREATE FUNCTION billing._compact_placements()
    RETURNS TABLE (nodename text, nodeport integer, shard_groups integer, success boolean,
                   result text)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    names text[];
    ports integer[];
    counts integer[];
    cmds text[];
BEGIN
    EXECUTE 'SELECT array_agg(nodename ORDER BY nodename, nodeport),
                    array_agg(nodeport ORDER BY nodename, nodeport),
                    array_agg(n ORDER BY nodename, nodeport),
                    array_agg(format(''SELECT billing._compact_shards(%L, %L)'', ds, us)
                              ORDER BY nodename, nodeport)
               FROM (SELECT p.nodename, p.nodeport, count(*)::int AS n,
                            array_agg(d.shardid ORDER BY d.shardid) AS ds,
                            array_agg(u.shardid ORDER BY d.shardid) AS us
                       FROM pg_dist_shard d
                       JOIN pg_dist_shard u ON u.logicalrelid = ''billing.usage_days''::regclass
                                           AND u.shardminvalue = d.shardminvalue
                                           AND u.shardmaxvalue = d.shardmaxvalue
                       JOIN pg_dist_shard_placement p ON p.shardid = d.shardid AND p.shardstate = 1
                       JOIN pg_dist_shard_placement q ON q.shardid = u.shardid AND q.shardstate = 1
                                                     AND q.nodename = p.nodename
                                                     AND q.nodeport = p.nodeport
                      WHERE d.logicalrelid = ''billing.usage_deltas''::regclass
                      GROUP BY p.nodename, p.nodeport) x'
        INTO names, ports, counts, cmds;
    IF names IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE
        'SELECT w.node_name, w.node_port, $3[w.i]::integer, w.success, w.result
           FROM master_run_on_worker($1, $2, $4, true)
                WITH ORDINALITY AS w(node_name, node_port, success, result, i)'
        USING names, ports, counts, cmds;
END
$$;
COMMENT ON FUNCTION billing._compact_placements() IS
    'Internal: on a Citus coordinator, has every node compact its placements of usage_deltas into their co-located usage_days shards, all nodes at once; one row per node with its result';

-- compact_usage() on Citus: from the coordinator every node's placements
-- (an error names the first node that failed; the others are compacted
-- all the same), from a worker node the shards it holds
CREATE FUNCTION billing._compact_citus() RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    folded bigint := 0;
    failed bigint;
    err text;
    ds bigint[];
    us bigint[];
BEGIN
    IF citus_is_coordinator() THEN
        SELECT coalesce(sum(p.result::bigint) FILTER (WHERE p.success), 0),
               count(*) FILTER (WHERE NOT p.success),
               min(format('%s:%s: %s', p.nodename, p.nodeport, p.result)) FILTER (WHERE NOT p.success)
          INTO folded, failed, err
          FROM billing._compact_placements() p;
        IF failed > 0 THEN
            RAISE EXCEPTION 'compaction failed on % of the nodes holding billing.usage_deltas', failed
                USING ERRCODE = '58000', DETAIL = err;
        END IF;
        RETURN folded;
    END IF;
    EXECUTE 'SELECT array_agg(d.shardid ORDER BY d.shardid), array_agg(u.shardid ORDER BY d.shardid)
               FROM pg_dist_shard d
               JOIN pg_dist_shard u ON u.logicalrelid = ''billing.usage_days''::regclass
                                   AND u.shardminvalue = d.shardminvalue
                                   AND u.shardmaxvalue = d.shardmaxvalue
              WHERE d.logicalrelid = ''billing.usage_deltas''::regclass
                AND EXISTS (SELECT 1 FROM pg_dist_placement p
                             WHERE p.shardid = d.shardid AND p.shardstate = 1
                               AND p.groupid = (SELECT groupid FROM pg_dist_local_group))'
        INTO ds, us;
    RETURN coalesce(billing._compact_shards(ds, us), 0);
END
$$;
COMMENT ON FUNCTION billing._compact_citus() IS
    'Internal: compact_usage() on Citus: from the coordinator every node over the shards it holds, all nodes at once; from a worker node the shards it holds';
