/*
 * Compaction: compact_usage() folds the appended deltas into the buckets and
 * their hour and day roll-ups.
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

CREATE FUNCTION billing.compact_usage() RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off
    SET client_min_messages = warning AS $$
DECLARE
    n bigint;
BEGIN
    -- one compaction at a time; concurrent ingest goes on (it only appends)
    PERFORM pg_advisory_xact_lock(1651074162, 1);
    IF to_regclass('pg_temp.billing_compact_cells') IS NOT NULL THEN  -- never a caller's table
        DROP TABLE pg_temp.billing_compact_cells;                     -- (SECURITY DEFINER)
    END IF;
    CREATE TEMP TABLE IF NOT EXISTS billing_compact_cells (
        account_id bigint, meter text COLLATE "C", dimension text COLLATE "C",
        bucket_start timestamptz, quantity numeric, events bigint,
        last_ts timestamptz, last_seq bigint, aggregation text, nrows bigint
    ) ON COMMIT DELETE ROWS;

    -- 1. take the deltas out, one cell per key, folded by the one rule
    WITH moved AS (
        DELETE FROM billing.usage_deltas RETURNING *
    )
    INSERT INTO billing_compact_cells
    SELECT d.account_id, c.meter, c.dimension, c.bucket_start,
           billing._cell_agg(m.aggregation, c.quantity, c.last_ts,
                             CASE WHEN c.last_ts IS NOT NULL THEN d.seq END),
           sum(c.events)::bigint,
           billing._cell_last_ts(m.aggregation, c.quantity, c.last_ts,
                                 CASE WHEN c.last_ts IS NOT NULL THEN d.seq END),
           billing._cell_last_seq(m.aggregation, c.quantity, c.last_ts,
                                  CASE WHEN c.last_ts IS NOT NULL THEN d.seq END),
           m.aggregation, count(*)
      FROM moved d
           CROSS JOIN LATERAL billing._delta_cells(d.cells) c
           JOIN billing.meters m ON m.meter = c.meter
     GROUP BY d.account_id, c.meter, c.dimension, c.bucket_start, m.aggregation;
    SELECT coalesce(sum(nrows), 0) INTO n FROM billing_compact_cells;
    IF n = 0 THEN
        RETURN 0;
    END IF;

    -- 2. fold them into the buckets and the hour and day roll-ups
    PERFORM billing._compact_into('usage_buckets', NULL);
    PERFORM billing._compact_into('usage_hourly', '1 hour');
    PERFORM billing._compact_into('usage_daily', '1 day');
    -- 3. the distinct values of unique meters per billing period (45_unique.sql)
    PERFORM billing._unique_compact();
    TRUNCATE billing_compact_cells;
    RETURN n;
END
$$;

COMMENT ON FUNCTION billing.compact_usage() IS
    'Folds appended usage deltas into the bucket counters; returns the number of delta cells merged';

CREATE FUNCTION billing._compact_into(target text, grain interval) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
BEGIN
    IF billing._citus_table_kind('billing.usage_deltas') IS NOT NULL THEN
        PERFORM billing._compact_into_citus(target, grain);   -- see 90_distribute.sql
        RETURN;
    END IF;
    EXECUTE format($q$
        WITH cells AS (
            SELECT account_id, meter, dimension,
                   %s AS bucket_start,
                   billing._cell_agg(aggregation, quantity, last_ts, last_seq) AS quantity,
                   sum(events)::bigint AS events,
                   billing._cell_last_ts(aggregation, quantity, last_ts, last_seq) AS last_ts,
                   billing._cell_last_seq(aggregation, quantity, last_ts, last_seq) AS last_seq,
                   aggregation
              FROM billing_compact_cells
             GROUP BY 1, 2, 3, 4, aggregation
        ), updated AS (
            UPDATE billing.%I AS b
               SET quantity = billing._combine(c.aggregation, b.quantity, b.last_ts, b.last_seq,
                                               c.quantity, c.last_ts, c.last_seq),
                   events = b.events + c.events,
                   last_ts = CASE WHEN billing._last_later(c.last_ts, c.last_seq, b.last_ts, b.last_seq)
                                  THEN c.last_ts ELSE b.last_ts END,
                   last_seq = CASE WHEN billing._last_later(c.last_ts, c.last_seq, b.last_ts, b.last_seq)
                                   THEN c.last_seq ELSE b.last_seq END
              FROM cells c
             WHERE b.account_id = c.account_id AND b.meter = c.meter
               AND b.bucket_start = c.bucket_start AND b.dimension = c.dimension
        )
        INSERT INTO billing.%I (account_id, meter, dimension, bucket_start, quantity, events,
                                last_ts, last_seq)
        SELECT c.account_id, c.meter, c.dimension, c.bucket_start, c.quantity, c.events,
               c.last_ts, c.last_seq
          FROM cells c
         WHERE NOT EXISTS (SELECT 1 FROM billing.%I b
                            WHERE b.account_id = c.account_id AND b.meter = c.meter
                              AND b.bucket_start = c.bucket_start AND b.dimension = c.dimension)
         ORDER BY 1, 2, 4, 3
        $q$,
        CASE WHEN grain IS NULL THEN 'bucket_start'
             ELSE format('billing._bin(%L, bucket_start)', grain) END,
        target, target, target);
END
$$;
COMMENT ON FUNCTION billing._compact_into(text, interval) IS
    'Internal: folds the cells being compacted into a bucket or roll-up table';

/*
 * _compact_into_citus: billing._compact_into on Citus, which refuses its
 * UPDATE ... FROM plus INSERT ... WHERE NOT EXISTS over the cells.  The same
 * fold as one upsert per aggregation (Citus takes ON CONFLICT DO UPDATE with
 * immutable functions only, and the aggregation is not a column of the
 * target, so it is a constant of each statement).
 */
CREATE FUNCTION billing._compact_into_citus(target text, grain interval) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    agg text;
BEGIN
    FOREACH agg IN ARRAY ARRAY['sum', 'count', 'max', 'last', 'unique'] LOOP
        EXECUTE format($q$
            INSERT INTO billing.%I AS b (account_id, meter, dimension, bucket_start, quantity,
                                         events, last_ts, last_seq)
            SELECT account_id, meter, dimension, %s,
                   billing._cell_agg(aggregation, quantity, last_ts, last_seq),
                   sum(events)::bigint,
                   billing._cell_last_ts(aggregation, quantity, last_ts, last_seq),
                   billing._cell_last_seq(aggregation, quantity, last_ts, last_seq)
              FROM billing_compact_cells
             WHERE aggregation = %L
             GROUP BY 1, 2, 3, 4
            ON CONFLICT (account_id, meter, bucket_start, dimension) DO UPDATE
               SET quantity = billing._combine(%L, b.quantity, b.last_ts, b.last_seq,
                                               excluded.quantity, excluded.last_ts, excluded.last_seq),
                   events = b.events + excluded.events,
                   last_ts = CASE WHEN billing._last_later(excluded.last_ts, excluded.last_seq,
                                                           b.last_ts, b.last_seq)
                                  THEN excluded.last_ts ELSE b.last_ts END,
                   last_seq = CASE WHEN billing._last_later(excluded.last_ts, excluded.last_seq,
                                                            b.last_ts, b.last_seq)
                                   THEN excluded.last_seq ELSE b.last_seq END
            $q$,
            target,
            CASE WHEN grain IS NULL THEN 'bucket_start'
                 ELSE format('billing._bin(%L, bucket_start)', grain) END,
            agg, agg);
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._compact_into_citus(text, interval) IS
    'Internal: _compact_into on Citus, one upsert per aggregation';
