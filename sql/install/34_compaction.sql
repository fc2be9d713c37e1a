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
