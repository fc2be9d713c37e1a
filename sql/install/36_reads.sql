/*
 * Reading usage: billing.usage, and the totals per meter of many periods
 * that invoices rate.
 */

-- reading ----------------------------------------------------------------------

-- the one bin function for intervals (src/bin.c): buckets, roll-ups, checks
CREATE FUNCTION billing._bin(grain interval, ts timestamptz) RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'billing_bin'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._bin(interval, timestamptz) IS
    'Internal: start of the UTC-aligned bin of width grain that holds ts (days and time: date_bin from 1970-01-01 UTC; whole months: from January 1970)';

CREATE FUNCTION billing._usage_args_ok(account_id bigint, from_ts timestamptz,
                                      to_ts timestamptz, grain interval)
    RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF account_id IS NULL OR from_ts IS NULL OR to_ts IS NULL THEN
        RAISE EXCEPTION 'usage: account_id, from_ts and to_ts must not be null'
            USING ERRCODE = '22004';
    END IF;
    IF grain IS NOT NULL AND (grain <= interval '0'
        OR ((date_part('month', grain) <> 0 OR date_part('year', grain) <> 0)
            AND (date_part('day', grain) <> 0 OR date_trunc('day', grain) <> grain))) THEN
        RAISE EXCEPTION 'invalid usage grain "%"', grain
            USING ERRCODE = '22023',
                  HINT = 'Use a positive interval of days and time (''1 hour'', ''1 day'') or of whole months (''1 month'').';
    END IF;
    RETURN true;
END
$$;
COMMENT ON FUNCTION billing._usage_args_ok(bigint, timestamptz, timestamptz, interval) IS
    'Internal: validates the arguments of billing.usage';

/*
 * _cells_in: the counter cells of one account (and meter, NULL: every
 * meter) with a bucket in [p_from, p_to), compacted or not: the cells of
 * billing.usage_cells, but only the rows of usage_days whose UTC day meets
 * the range are decoded (one index range), so a short range of a long
 * history costs what the range holds.  PL/pgSQL: Citus routes its query by
 * p_account's value.
 */
CREATE FUNCTION billing._cells_in(p_account bigint, p_from timestamptz, p_to timestamptz,
                                  p_meter text)
    RETURNS TABLE (meter text, dimension text, bucket_start timestamptz, quantity numeric,
                   events bigint, last_ts timestamptz, last_seq bigint)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    keys bigint[] := ARRAY[p_account, billing._delta_key(p_account)];
BEGIN
    RETURN QUERY
    SELECT s.meter::text, s.dimension::text, c.bucket_start, c.quantity, c.events,
           c.last_ts, c.last_seq
      FROM billing.usage_days s, billing._day_cells(s.day, s.cells) c
     WHERE s.account_id = p_account AND (p_meter IS NULL OR s.meter = p_meter)
       AND s.day > p_from - interval '24 hours' AND s.day < p_to
       AND c.bucket_start >= p_from AND c.bucket_start < p_to
    UNION ALL
    SELECT x.meter::text, x.dimension::text, x.bucket_start, x.quantity, x.events, x.last_ts,
           CASE WHEN x.last_ts IS NOT NULL THEN x.seq END
      FROM billing.usage_deltas d, billing._delta_rows(d.account_id, d.seq, d.cells, p_account) x
     WHERE d.account_id = ANY (keys) AND (p_meter IS NULL OR x.meter = p_meter)
       AND x.bucket_start >= p_from AND x.bucket_start < p_to;
END
$$;
COMMENT ON FUNCTION billing._cells_in(bigint, timestamptz, timestamptz, text) IS
    'Internal: the counter cells of an account (and meter) in [from, to), compacted or not, reading only the days of usage_days the range meets';

-- PL/pgSQL: its plans get the argument values, which Citus needs to route
-- the query to the account's shards (it cannot plan an SQL function's query)
CREATE FUNCTION billing._usage(p_account bigint, p_from timestamptz, p_to timestamptz,
                               p_grain interval, p_meter text)
    RETURNS TABLE (r_meter text, r_dimension text, r_bucket_start timestamptz,
                   r_quantity numeric, r_events bigint)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN QUERY
    WITH cells AS (
        SELECT u.meter COLLATE "C" AS meter, u.dimension COLLATE "C" AS dimension,
               u.bucket_start, u.quantity, u.events, u.last_ts, u.last_seq
          FROM billing._cells_in(p_account, p_from, p_to, p_meter) u
    )
    -- a unique meter: one row per bucket (dimension NULL), its quantity the
    -- number of distinct dimension values reported in the bucket
    SELECT c.meter::text,
           CASE WHEN m.aggregation <> 'unique' THEN c.dimension::text END,
           CASE WHEN p_grain IS NULL THEN c.bucket_start ELSE billing._bin(p_grain, c.bucket_start) END,
           CASE WHEN m.aggregation = 'unique' THEN count(DISTINCT c.dimension)
                ELSE billing._cell_agg(m.aggregation, c.quantity, c.last_ts, c.last_seq) END,
           sum(c.events)::bigint
      FROM cells c JOIN billing.meters m ON m.meter = c.meter
     GROUP BY c.meter, 2, 3, m.aggregation
     ORDER BY c.meter, 2, 3;
END
$$;
COMMENT ON FUNCTION billing._usage(bigint, timestamptz, timestamptz, interval, text) IS
    'Internal: the body of billing.usage';

CREATE FUNCTION billing.usage(account_id bigint, from_ts timestamptz, to_ts timestamptz,
                              grain interval DEFAULT NULL, meter text DEFAULT NULL)
    RETURNS TABLE (meter text, dimension text, bucket_start timestamptz,
                   quantity numeric, events bigint)
    LANGUAGE sql STABLE SET search_path = pg_catalog, billing, pg_temp AS $$
    -- the arguments are checked by a statement of its own: always, whatever the plan
    SELECT billing._usage_args_ok($1, $2, $3, $4);
    SELECT * FROM billing._usage($1, $2, $3, $4, $5)
$$;
COMMENT ON FUNCTION billing.usage(bigint, timestamptz, timestamptz, interval, text) IS
    'Usage of an account: stored buckets (grain NULL) or UTC-aligned roll-ups; max/last meters roll up by max/latest, unique meters count the distinct dimensions of each bucket';

CREATE FUNCTION billing._rollup_totals(p_accounts bigint[], p_starts timestamptz[],
                                      p_ends timestamptz[], p_meters text[],
                                      p_aggregations text[],
                                      s_idx integer[] DEFAULT '{}', s_meters text[] DEFAULT '{}',
                                      s_dims text[] DEFAULT '{}')
    RETURNS TABLE (idx integer, meter text, quantity numeric, last_ts timestamptz,
                   last_seq bigint, dimension text)
    AS 'MODULE_PATHNAME', 'billing_rollup_totals'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._rollup_totals(bigint[], timestamptz[], timestamptz[], text[], text[], integer[], text[], text[]) IS
    'Internal: per period (1-based index) and meter, the aggregate of the cells in [start, end), compacted (day totals, edge days) or not (usage_deltas), with the latest cell''s last_ts and last_seq; the dimensions named for a period and meter (s_idx, s_meters, s_dims) apart, the rest with dimension NULL (src/totals.c)';

/*
 * _usage_totals_many: the quantity of each meter of each (account,
 * [from, to)) given, combined by the meter's aggregation.  Reads the day
 * totals of usage_days for whole UTC days, the packed cells of the days at
 * the edges, and the deltas not yet compacted, so a month costs a few dozen
 * rows, not tens of thousands of minute buckets.
 *
 * Matrix charges (issue 18): c_idx, c_meters and c_dims list the usage
 * charges rated in each period (element j: period c_idx[j] rates meter
 * c_meters[j], dimension c_dims[j] alone, or with c_dims[j] NULL the
 * dimensions no other charge of the period names).  A dimension named for
 * a period and meter gets a row of its own; dimension NULL is the rest of
 * the meter (all of it when none is named).
 *
 * Unique meters (46_unique.sql): the distinct dimension values of the
 * period, from billing._unique_counts, for the unique meters charged in
 * the period (every unique meter when c_idx is NULL).
 */
CREATE FUNCTION billing._usage_totals_many(p_accounts bigint[], p_starts timestamptz[],
                                           p_ends timestamptz[], c_idx integer[] DEFAULT NULL,
                                           c_meters text[] DEFAULT NULL, c_dims text[] DEFAULT NULL)
    RETURNS TABLE (idx integer, meter text, quantity numeric, dimension text)
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
BEGIN
    -- on Citus: one router query per account (see 90_distribute.sql)
    IF billing._citus_table_kind('billing.usage_deltas') IS NOT NULL THEN
        RETURN QUERY
        SELECT x.i::integer, t.meter, t.quantity, t.dimension
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i),
               LATERAL billing._usage_totals_citus(
                   x.a, x.s, x.e,
                   ARRAY(SELECT c.m FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
                          WHERE c.i = x.i AND c.d IS NOT NULL ORDER BY c.m, c.d),
                   ARRAY(SELECT c.d FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
                          WHERE c.i = x.i AND c.d IS NOT NULL ORDER BY c.m, c.d)) t
        UNION ALL
        SELECT u.idx, u.meter, u.quantity, u.dimension
          FROM billing._usage_totals_unique(p_accounts, p_starts, p_ends, c_idx, c_meters, c_dims) u;
        RETURN;
    END IF;
    -- the day totals, the edge cells and the deltas not yet compacted of each
    -- period, each meter aggregated in C (billing._rollup_totals, src/totals.c,
    -- by the one rule of src/agg.c); the deltas are read through their index
    -- on account_id whatever the table's statistics say
    RETURN QUERY
    WITH ms AS (
        SELECT coalesce(array_agg(m.meter::text ORDER BY m.meter), '{}') AS meters,
               coalesce(array_agg(m.aggregation::text ORDER BY m.meter), '{}') AS aggs
          FROM billing.meters m
         WHERE m.aggregation <> 'unique'
    ), na AS (
        -- the dimensions charged apart, per period and meter
        SELECT coalesce(array_agg(n.i), '{}') AS i, coalesce(array_agg(n.m), '{}') AS m,
               coalesce(array_agg(n.d), '{}') AS d
          FROM (SELECT DISTINCT c.i, c.m::text AS m, c.d::text AS d
                  FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
                 WHERE c.i IS NOT NULL AND c.m IS NOT NULL AND c.d IS NOT NULL) n
    )
    SELECT r.idx, r.meter, r.quantity, r.dimension
      FROM ms, na,
           billing._rollup_totals(p_accounts, p_starts, p_ends, ms.meters, ms.aggs,
                                  na.i, na.m, na.d) r
    UNION ALL
    SELECT u.idx, u.meter, u.quantity, u.dimension
      FROM billing._usage_totals_unique(p_accounts, p_starts, p_ends, c_idx, c_meters, c_dims) u;
END
$$;
COMMENT ON FUNCTION billing._usage_totals_many(bigint[], timestamptz[], timestamptz[], integer[], text[], text[]) IS
    'Internal: quantity per meter (and per dimension charged apart) of many (account, range) pairs, from roll-ups where whole hours and days allow';

/*
 * _usage_totals_citus: the quantity per meter of one account over [from_ts,
 * to_ts) on Citus, from the day totals of usage_days, the cells of the days
 * at the edges, and the deltas: one router query to the account's shards (the
 * set-based _usage_totals_many joins many accounts with arrays, which Citus
 * cannot plan).  _usage_totals_many calls it once per account.  The
 * dimensions s_dims[j] of meters s_meters[j] are totalled apart (matrix
 * charges, issue 18), the rest of a meter has dimension NULL.
 */
CREATE FUNCTION billing._usage_totals_citus(p_account bigint, from_ts timestamptz, to_ts timestamptz,
                                            s_meters text[] DEFAULT '{}', s_dims text[] DEFAULT '{}')
    RETURNS TABLE (meter text, quantity numeric, dimension text)
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    -- [from_ts, to_ts) = cells of day fd in [from_ts, d0) + days [d0, d1)
    --                  + cells of day d1 in [d1, to_ts), with d0/d1 the
    -- first/last whole UTC day inside and fd the day holding from_ts
    fd timestamptz := billing._bin('1 day', from_ts);
    d0 timestamptz := billing._bin('1 day', from_ts - interval '1 microsecond') + interval '1 day';
    d1 timestamptz := billing._bin('1 day', to_ts);
    -- keys of the dimensions totalled apart: length of the meter, ':', the
    -- meter, the dimension (unambiguous, whatever the names hold)
    named text[] := ARRAY(SELECT format('%s:%s%s', length(x.m), x.m, x.d)
                            FROM unnest(s_meters, s_dims) AS x(m, d));
BEGIN
    -- index ranges per meter: (account_id, meter, day)
    RETURN QUERY
    WITH cells AS (
        SELECT m.meter, c.dimension, c.quantity, c.last_ts, c.last_seq
          FROM billing.meters m   -- (unique meters: _usage_totals_unique)
               CROSS JOIN LATERAL (
                   -- whole days: their totals
                   SELECT u.dimension, u.quantity, u.last_ts, u.last_seq FROM billing.usage_days u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.day >= d0 AND u.day < d1
                   UNION ALL
                   -- the days at the edges: their cells inside [from_ts, to_ts)
                   SELECT u.dimension, x.quantity, x.last_ts, x.last_seq
                     FROM billing.usage_days u, billing._day_cells(u.day, u.cells) x
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND ((u.day = fd AND fd < d0) OR (u.day = d1 AND d1 >= d0 AND d1 < to_ts))
                      AND x.bucket_start >= from_ts AND x.bucket_start < to_ts
               ) c
         WHERE m.aggregation <> 'unique'
        UNION ALL
        -- not yet compacted
        SELECT x.meter, x.dimension, x.quantity, x.last_ts,
               CASE WHEN x.last_ts IS NOT NULL THEN d.seq END
          FROM billing.usage_deltas d, billing._delta_cells(d.cells) x
         WHERE d.account_id = p_account AND x.bucket_start >= from_ts AND x.bucket_start < to_ts
    ), keyed AS (
        SELECT c.*, CASE WHEN format('%s:%s%s', length(c.meter), c.meter, c.dimension) = ANY (named)
                         THEN c.dimension END AS dim
          FROM cells c
    )
    SELECT c.meter::text,
           billing._cell_agg(m.aggregation, c.quantity, c.last_ts, c.last_seq),
           c.dim::text
      FROM keyed c JOIN billing.meters m ON m.meter = c.meter AND m.aggregation <> 'unique'
     GROUP BY c.meter, c.dim, m.aggregation;
END
$$;

COMMENT ON FUNCTION billing._usage_totals_citus(bigint, timestamptz, timestamptz, text[], text[]) IS
    'Internal: usage totals of one account on Citus (a router query), named dimensions apart';
