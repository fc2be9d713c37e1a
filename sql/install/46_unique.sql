/*
 * Unique meters (issue 18 part 3, SPEC 10.1): the quantity of a period is
 * the number of distinct dimension values with at least one report in it
 * (monthly active users, seats), exact for any period and at any grain.
 *
 * The usage store keeps a unique meter's cells per (bucket, dimension) as
 * for a count meter (a cell counts its reports).  Counting the distinct
 * dimensions of a month of cells at read time costs a scan of them (100,000
 * users are 100,000+ cells), so compaction keeps, apart from the cell
 * store, for each billing period of an account's subscriptions in which a
 * unique meter has usage:
 *
 *   unique_periods  (account_id, meter, period_start) -> period_end and the
 *                   number of distinct values seen in [period_start,
 *                   period_end);
 *   unique_values   (account_id, meter, period_start, dimension) -> the
 *                   first bucket of the period in which the value was
 *                   reported.
 *
 * Invariant: for every unique_periods row P, the unique_values rows of P
 * are the values with a counted cell in [P.period_start, P.period_end)
 * that compaction has seen (every compacted cell, and possibly some not yet
 * compacted), each with the earliest such cell's bucket; P.distinct_count
 * is their number.  It does not depend on subscriptions: a row kept for a
 * period that a later change of the subscription no longer bills stays
 * true (and is kept up to date); it is merely not read.
 *
 * The distinct count over [s, e) (billing._unique_counts) is then: with a
 * row P starting at s and ending at or after e, the values of P first seen
 * before e (P.distinct_count itself when e is P's end: one index lookup),
 * plus the values reported in the deltas not yet compacted in [s, e) that
 * P does not hold with a first bucket before e; without such a row, the
 * distinct values of the cells in [s, e) (billing._unique_scan).  Both
 * are exact; the first costs what a preview may cost.
 *
 * billing._unique_fold(account, meters, dimensions, buckets) keeps the
 * rows: compact_usage() (src/compact.c) calls it once per account with
 * the cells of unique meters it folds, as arrays, after writing them.
 * This file reads the cell store only through billing.usage_cells and
 * billing._cells_in (36_reads.sql).  It
 * adds the cells to every row P they fall in, then starts a row for each
 * billing period of the account's subscriptions that holds one of the
 * cells and has none (or one ending earlier), from every cell of the
 * period counted so far.  Everything is keyed by account_id and runs as
 * router queries of one account (Citus).
 */

CREATE TABLE billing.unique_periods (
    account_id      bigint NOT NULL,
    meter           text COLLATE "C" NOT NULL,
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    distinct_count  bigint NOT NULL,
    PRIMARY KEY (account_id, meter, period_start)
);
COMMENT ON TABLE billing.unique_periods IS
    'Unique meters: per account, meter and billing period, the number of distinct dimension values compaction has seen in [period_start, period_end) (kept by compact_usage)';

CREATE TABLE billing.unique_values (
    account_id      bigint NOT NULL,
    meter           text COLLATE "C" NOT NULL,
    period_start    timestamptz NOT NULL,
    dimension       text COLLATE "C" NOT NULL,
    first_bucket    timestamptz NOT NULL,
    PRIMARY KEY (account_id, meter, period_start, dimension)
);
COMMENT ON TABLE billing.unique_values IS
    'Unique meters: the distinct dimension values of each unique_periods row, with the first bucket of the period in which each was reported';

/*
 * _unique_periods_of: the billing periods of an account's subscriptions
 * that overlap [p_lo, p_hi], on each subscription's grid (from its
 * period_anchor, issue 17), cut at the subscription's start and not at its
 * end: a plan segment that starts a period's second plan (change_plan) has
 * a row of its own, the first plan's segment is a prefix of the period's
 * row, and so is a period cut short.
 */
CREATE FUNCTION billing._unique_periods_of(p_account bigint, p_lo timestamptz, p_hi timestamptz)
    RETURNS TABLE (period_start timestamptz, period_end timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    -- PL/pgSQL: Citus routes the query by p_account's value
    RETURN QUERY
    SELECT DISTINCT greatest(billing._add_periods(g.anchor, p.period, n), s.starts_at),
           billing._add_periods(g.anchor, p.period, n + 1)
      FROM billing.subscriptions s JOIN billing.plans p ON p.plan = s.plan,
           LATERAL (SELECT coalesce(s.period_anchor, s.starts_at) AS anchor) g,
           generate_series(billing._period_index(g.anchor, p.period, greatest(p_lo, s.starts_at)),
                           billing._period_index(g.anchor, p.period,
                               least(p_hi, coalesce(s.ends_at, 'infinity') - interval '1 microsecond'))) n
     WHERE s.account_id = p_account AND s.starts_at <= p_hi
       AND coalesce(s.ends_at, 'infinity') > p_lo;
END
$$;
COMMENT ON FUNCTION billing._unique_periods_of(bigint, timestamptz, timestamptz) IS
    'Internal: the whole billing periods of an account''s subscriptions overlapping [lo, hi]';

/*
 * _unique_fold: keep unique_periods and unique_values for cells of unique
 * meters of one account that compaction has just folded (element i of the
 * arrays is a cell: meter, dimension, bucket start).  See the top of the
 * file.
 */
CREATE FUNCTION billing._unique_fold(p_account bigint, p_meters text[], p_dims text[],
                                     p_buckets timestamptz[])
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    lo timestamptz;
    hi timestamptz;
    per record;
    cd text[];
    cfb timestamptz[];
    n bigint;
BEGIN
    SELECT min(b), max(b) INTO lo, hi FROM unnest(p_buckets) b;
    IF lo IS NULL THEN
        RETURN;
    END IF;
    -- 1. the rows the cells fall in: new values counted, earlier first buckets kept
    FOR per IN
        SELECT p.meter, p.period_start, p.period_end
          FROM billing.unique_periods p
         WHERE p.account_id = p_account AND p.meter = ANY (p_meters)
           AND p.period_start <= hi AND p.period_end > lo
    LOOP
        SELECT array_agg(y.d), array_agg(y.fb) INTO cd, cfb
          FROM (SELECT x.d, min(x.b) AS fb
                  FROM unnest(p_meters, p_dims, p_buckets) AS x(m, d, b)
                 WHERE x.m = per.meter AND x.b >= per.period_start AND x.b < per.period_end
                 GROUP BY x.d) y;
        CONTINUE WHEN cd IS NULL;
        WITH added AS (
            INSERT INTO billing.unique_values (account_id, meter, period_start, dimension, first_bucket)
            SELECT p_account, per.meter, per.period_start, u.d, u.fb FROM unnest(cd, cfb) AS u(d, fb)
            ON CONFLICT DO NOTHING
            RETURNING 1
        )
        SELECT count(*) INTO n FROM added;
        UPDATE billing.unique_values v SET first_bucket = u.fb
          FROM unnest(cd, cfb) AS u(d, fb)
         WHERE v.account_id = p_account AND v.meter = per.meter
           AND v.period_start = per.period_start AND v.dimension = u.d AND u.fb < v.first_bucket;
        IF n > 0 THEN
            UPDATE billing.unique_periods p SET distinct_count = p.distinct_count + n
             WHERE p.account_id = p_account AND p.meter = per.meter
               AND p.period_start = per.period_start;
        END IF;
    END LOOP;

    -- 2. a row for each billing period holding cells that has none (or one
    -- ending earlier), from every cell of the period counted so far
    FOR per IN
        SELECT m.meter, w.period_start, w.period_end
          FROM (SELECT DISTINCT x.m AS meter FROM unnest(p_meters) AS x(m)) m,
               billing._unique_periods_of(p_account, lo, hi) w
         WHERE EXISTS (SELECT 1 FROM unnest(p_meters, p_buckets) AS x(m, b)
                        WHERE x.m = m.meter AND x.b >= w.period_start AND x.b < w.period_end)
    LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM billing.unique_periods p
                               WHERE p.account_id = p_account AND p.meter = per.meter
                                 AND p.period_start = per.period_start
                                 AND p.period_end >= per.period_end);
        DELETE FROM billing.unique_values v
         WHERE v.account_id = p_account AND v.meter = per.meter AND v.period_start = per.period_start;
        DELETE FROM billing.unique_periods p
         WHERE p.account_id = p_account AND p.meter = per.meter AND p.period_start = per.period_start;
        INSERT INTO billing.unique_values (account_id, meter, period_start, dimension, first_bucket)
        SELECT p_account, per.meter, per.period_start, c.dimension, min(c.bucket_start)
          FROM billing._cells_in(p_account, per.period_start, per.period_end, per.meter) c
         GROUP BY c.dimension;
        GET DIAGNOSTICS n = ROW_COUNT;
        INSERT INTO billing.unique_periods (account_id, meter, period_start, period_end, distinct_count)
        VALUES (p_account, per.meter, per.period_start, per.period_end, n);
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._unique_fold(bigint, text[], text[], timestamptz[]) IS
    'Internal: keeps unique_periods and unique_values for cells of unique meters of one account just compacted';

/*
 * _unique_scan: the distinct dimension values of a meter with a counted
 * cell in [p_from, p_to), read through billing._cells_in (every cell,
 * compacted or not, as billing.usage_cells has them), so that it does not
 * depend on how the cell store keeps them.  Only ranges that no unique_periods row answers come here.
 */
CREATE FUNCTION billing._unique_scan(p_account bigint, p_meter text, p_from timestamptz,
                                     p_to timestamptz)
    RETURNS SETOF text
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    -- PL/pgSQL: Citus routes the query by p_account's value
    RETURN QUERY
    SELECT DISTINCT c.dimension::text FROM billing._cells_in(p_account, p_from, p_to, p_meter) c;
END
$$;
COMMENT ON FUNCTION billing._unique_scan(bigint, text, timestamptz, timestamptz) IS
    'Internal: the distinct dimension values of a meter with a counted cell in [from, to) (through _cells_in)';

/*
 * _unique_counts: for each unique meter of p_meters, the number of distinct
 * dimension values reported in [p_from, p_to) by one account, as rows
 * (meter, dimension, quantity): one row with quantity 1 for each dimension
 * s_dims[j] named for meter s_meters[j] (a matrix charge) that was
 * reported, and one with dimension NULL counting the other values.  See the
 * top of the file.
 */
CREATE FUNCTION billing._unique_counts(p_account bigint, p_from timestamptz, p_to timestamptz,
                                       p_meters text[], s_meters text[] DEFAULT '{}',
                                       s_dims text[] DEFAULT '{}')
    RETURNS TABLE (meter text, dimension text, quantity numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- the plan cache mode: a level to change it on, for this call only;
    -- and nested loops on, whatever the caller set: one account's rows are
    -- index lookups (rating many periods turns them off, and the disabled
    -- loops' cost made the planner run _cells_in's read in parallel
    -- workers, started anew for each period: 60 ms each)
    SET plan_cache_mode = auto SET enable_nestloop = on AS $$
#variable_conflict use_column
DECLARE
    mtr text;
    keys bigint[] := ARRAY[p_account, billing._delta_key(p_account)];
    reg record;
    total bigint;
    delta_dims text[];
    seen text[];
    named text[];
    present text[];
BEGIN
    IF p_from >= p_to THEN
        RETURN;
    END IF;
    -- one account: one generic plan per statement and session (a custom
    -- plan for each call planned the statements anew, which took longer
    -- than running them); see _plan_cache_for
    PERFORM billing._plan_cache_for(1);
    FOREACH mtr IN ARRAY p_meters LOOP
        named := ARRAY(SELECT DISTINCT x.d FROM unnest(s_meters, s_dims) AS x(m, d)
                        WHERE x.m = mtr AND x.d IS NOT NULL);
        SELECT p.period_end, p.distinct_count INTO reg
          FROM billing.unique_periods p
         WHERE p.account_id = p_account AND p.meter = mtr AND p.period_start = p_from
           AND p.period_end >= p_to;
        IF FOUND THEN
            -- the values compaction has seen, and those only in the deltas
            IF reg.period_end = p_to THEN
                total := reg.distinct_count;
            ELSE
                SELECT count(*) INTO total FROM billing.unique_values v
                 WHERE v.account_id = p_account AND v.meter = mtr AND v.period_start = p_from
                   AND v.first_bucket < p_to;
            END IF;
            delta_dims := ARRAY(SELECT DISTINCT x.dimension::text
                                  FROM billing.usage_deltas d,
                                       billing._delta_rows(d.account_id, d.seq, d.cells, p_account) x
                                 WHERE d.account_id = ANY (keys) AND x.meter = mtr
                                   AND x.bucket_start >= p_from AND x.bucket_start < p_to);
            IF cardinality(delta_dims) > 0 THEN
                total := total + (SELECT count(*) FROM unnest(delta_dims) AS x(d)
                                   WHERE NOT EXISTS (SELECT 1 FROM billing.unique_values v
                                                      WHERE v.account_id = p_account AND v.meter = mtr
                                                        AND v.period_start = p_from
                                                        AND v.dimension = x.d
                                                        AND v.first_bucket < p_to));
            END IF;
            present := ARRAY(SELECT x.d FROM unnest(named) AS x(d)
                              WHERE x.d = ANY (delta_dims)
                                 OR EXISTS (SELECT 1 FROM billing.unique_values v
                                             WHERE v.account_id = p_account AND v.meter = mtr
                                               AND v.period_start = p_from AND v.dimension = x.d
                                               AND v.first_bucket < p_to));
        ELSE
            -- no row for this period: the cells themselves
            seen := ARRAY(SELECT s FROM billing._unique_scan(p_account, mtr, p_from, p_to) s);
            total := cardinality(seen);
            present := ARRAY(SELECT x.d FROM unnest(named) AS x(d) WHERE x.d = ANY (seen));
        END IF;
        CONTINUE WHEN total = 0;
        RETURN QUERY
        SELECT mtr, x.d, 1::numeric FROM unnest(present) AS x(d)
        UNION ALL
        SELECT mtr, NULL::text, (total - cardinality(present))::numeric
         WHERE total > cardinality(present);
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._unique_counts(bigint, timestamptz, timestamptz, text[], text[], text[]) IS
    'Internal: distinct dimension values of unique meters reported in [from, to) by one account (named dimensions apart)';

/*
 * _usage_totals_unique: the part of _usage_totals_many for unique meters
 * (same arguments, same rows): for each period (account, [start, end)),
 * _unique_counts of the unique meters its charges rate (c_idx, c_meters,
 * c_dims as for _usage_totals_many; every unique meter when c_idx is NULL).
 */
CREATE FUNCTION billing._usage_totals_unique(p_accounts bigint[], p_starts timestamptz[],
                                             p_ends timestamptz[], c_idx integer[],
                                             c_meters text[], c_dims text[])
    RETURNS TABLE (idx integer, meter text, quantity numeric, dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    uniq text[];
    ms text[];
    sm text[] := '{}';
    sd text[] := '{}';
BEGIN
    -- the unique meters, read first (a reference table on Citus)
    uniq := ARRAY(SELECT m.meter::text FROM billing.meters m WHERE m.aggregation = 'unique');
    IF cardinality(uniq) = 0 OR (c_idx IS NOT NULL AND NOT c_meters && uniq) THEN
        RETURN;                   -- no unique meter (charged)
    END IF;
    IF cardinality(p_accounts) = 1 THEN
        -- one period (a preview, remaining): its charges as they are, without
        -- the statement below, whose planning costs more than its work here
        IF c_idx IS NULL THEN
            ms := uniq;
        ELSE
            SELECT coalesce(array_agg(DISTINCT x.m), '{}'),
                   coalesce(array_agg(x.m ORDER BY x.m, x.d) FILTER (WHERE x.d IS NOT NULL), '{}'),
                   coalesce(array_agg(x.d ORDER BY x.m, x.d) FILTER (WHERE x.d IS NOT NULL), '{}')
              INTO ms, sm, sd
              FROM unnest(c_meters, c_dims) AS x(m, d)
             WHERE x.m = ANY (uniq);
        END IF;
        RETURN QUERY
        SELECT 1, u.meter, u.quantity, u.dimension
          FROM billing._unique_counts(p_accounts[1], p_starts[1], p_ends[1], ms, sm, sd) u;
        RETURN;
    END IF;
    RETURN QUERY
    WITH per AS (
        SELECT x.i::integer AS idx, x.a AS account_id, x.s AS ps, x.e AS pe
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i)
    ), charged AS (
        SELECT c.i AS idx, c.m AS meter, c.d AS dim
          FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
         WHERE c.m = ANY (uniq)
    ), req AS (
        SELECT per.*,
               CASE WHEN c_idx IS NULL THEN uniq
                    ELSE ARRAY(SELECT DISTINCT c.meter FROM charged c WHERE c.idx = per.idx) END AS meters,
               ARRAY(SELECT c.meter FROM charged c WHERE c.idx = per.idx AND c.dim IS NOT NULL
                      ORDER BY c.meter, c.dim) AS s_meters,
               ARRAY(SELECT c.dim FROM charged c WHERE c.idx = per.idx AND c.dim IS NOT NULL
                      ORDER BY c.meter, c.dim) AS s_dims
          FROM per
    )
    SELECT r.idx, u.meter, u.quantity, u.dimension
      FROM req r,
           LATERAL billing._unique_counts(r.account_id, r.ps, r.pe, r.meters, r.s_meters, r.s_dims) u
     WHERE cardinality(r.meters) > 0;
END
$$;
COMMENT ON FUNCTION billing._usage_totals_unique(bigint[], timestamptz[], timestamptz[], integer[], text[], text[]) IS
    'Internal: the unique-meter part of _usage_totals_many (distinct dimension values per period)';
