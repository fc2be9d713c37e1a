/*
 * Re-rating, usage corrections and reconciliation (SPEC section 6).
 */

CREATE SEQUENCE billing.correction_id_seq;
CREATE TABLE billing.usage_corrections (
    account_id     bigint NOT NULL,
    correction_id  bigint NOT NULL DEFAULT pg_catalog.nextval('billing.correction_id_seq'),
    meter          text COLLATE "C" NOT NULL,
    dimension      text COLLATE "C" NOT NULL,
    bucket_start   timestamptz NOT NULL,
    delta          numeric NOT NULL,
    reason         text NOT NULL,
    actor          text NOT NULL DEFAULT CURRENT_USER,
    corrected_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (account_id, correction_id)
);
COMMENT ON TABLE billing.usage_corrections IS
    'Explicit corrections of counted usage (billing.correct_usage), with who, when and why';

CREATE FUNCTION billing._check_quantity(quantity numeric, meter text, account_id bigint)
    RETURNS void
    LANGUAGE C IMMUTABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'billing_check_quantity_sql';
COMMENT ON FUNCTION billing._check_quantity(numeric, text, bigint) IS
    'Internal: raises 22023 for a usage quantity outside the limit every ingest path applies (|q| < 10^1000, at most 1000 fraction digits)';
CREATE TRIGGER usage_corrections_append_only BEFORE UPDATE OR DELETE ON billing.usage_corrections
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change('usage_corrections is append-only.');
CREATE TRIGGER usage_corrections_no_truncate BEFORE TRUNCATE ON billing.usage_corrections
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('usage_corrections is append-only.');

CREATE FUNCTION billing.correct_usage(account_id bigint, meter text, bucket_start timestamptz,
                                      delta numeric, reason text, dimension text DEFAULT '')
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    m record;
    cur numeric;
BEGIN
    IF account_id IS NULL OR meter IS NULL OR bucket_start IS NULL OR delta IS NULL THEN
        RAISE EXCEPTION 'correct_usage: account_id, meter, bucket_start and delta must not be null'
            USING ERRCODE = '22004';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'a usage correction needs a reason' USING ERRCODE = '22004';
    END IF;
    dimension := coalesce(dimension, '');
    IF octet_length(dimension) > 256 THEN
        RAISE EXCEPTION 'usage dimension is too long'
            USING ERRCODE = '22023', DETAIL = 'A dimension has at most 256 bytes.';
    END IF;
    SELECT * INTO m FROM billing.meters x WHERE x.meter = correct_usage.meter;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'meter "%" does not exist', correct_usage.meter USING ERRCODE = '23503';
    END IF;
    -- the account's row, locked: corrections of one account one at a time
    -- (ingest only adds, so a bucket cannot race below zero), on a lock only
    -- roles that may update accounts can take
    PERFORM 1 FROM billing.accounts a WHERE a.account_id = correct_usage.account_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account % does not exist', correct_usage.account_id USING ERRCODE = '23503';
    END IF;
    IF m.aggregation NOT IN ('sum', 'count') THEN
        RAISE EXCEPTION 'meter "%" has aggregation %', m.meter, m.aggregation
            USING ERRCODE = '22023', DETAIL = 'Only sum and count meters take corrections.';
    END IF;
    IF delta IN ('NaN', 'Infinity', '-Infinity') OR NOT isfinite(bucket_start)
       OR billing._bin(m.bucket_width, bucket_start) <> bucket_start THEN
        RAISE EXCEPTION 'invalid usage correction'
            USING ERRCODE = '22023',
                  DETAIL = format('delta must be a number and bucket_start the start of a %s bucket.', m.bucket_width);
    END IF;
    PERFORM billing._check_quantity(delta, correct_usage.meter, correct_usage.account_id);
    SELECT coalesce(billing._cell_agg(m.aggregation, u.quantity, u.last_ts, u.last_seq), 0) INTO cur
      FROM billing._cells_in(correct_usage.account_id, correct_usage.bucket_start,
                             correct_usage.bucket_start + interval '1 microsecond',
                             correct_usage.meter) u
     WHERE u.dimension = correct_usage.dimension;
    IF cur + delta < 0 THEN
        RAISE EXCEPTION 'correction would make the bucket negative'
            USING ERRCODE = '22023',
                  DETAIL = format('The bucket holds %s; the correction is %s.', cur, delta);
    END IF;
    INSERT INTO billing.usage_deltas (account_id, seq, cells)
    VALUES (correct_usage.account_id, NULL,
            billing._delta_pack(ARRAY[correct_usage.meter], ARRAY[correct_usage.dimension],
                                ARRAY[bucket_start], ARRAY[delta], ARRAY[0::bigint], NULL));
    INSERT INTO billing.usage_corrections (account_id, meter, dimension, bucket_start, delta, reason)
    VALUES (correct_usage.account_id, correct_usage.meter, correct_usage.dimension, bucket_start,
            delta, reason);
END
$$;
COMMENT ON FUNCTION billing.correct_usage(bigint, text, timestamptz, numeric, text, text) IS
    'Adds a signed correction to one bucket of a sum or count meter (any age), with a reason; the next rerate bills its effect';

/*
 * _rerate_diff: for each finalized invoice overlapping [from_ts, to_ts) (of
 * one account or all), what its lines should be today, what was billed
 * (the line plus the adjustments already recorded for it), and the
 * difference.  Lines are matched by plan segment (a period with a plan
 * change has two; NULL: the whole period) and kind, meter and dimension
 * (usage), description (fixed fees) or kind alone (the spend cap); a usage
 * line missing on one side counts 0 units there.  Commitment, true-up and
 * credit lines are never re-rated.  One body on one node and on Citus: the
 * tables are read by plain statements (routed by the accounts on Citus),
 * today's lines by _period_build (functions only), and the comparison
 * reads no table.  The invoices are compared p_chunk accounts at a time:
 * a re-rate of every account needs the memory of p_chunk of them.
 */
CREATE FUNCTION billing._rerate_diff(from_ts timestamptz, to_ts timestamptz, p_account bigint,
                                     p_chunk integer DEFAULT 1000)
    RETURNS TABLE (account_id bigint, invoice_id bigint, line_kind text, meter text,
                   description text, billed_quantity numeric, billed_amount numeric,
                   correct_quantity numeric, correct_amount numeric, delta numeric,
                   segment_start timestamptz, dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
DECLARE
    inv record;     -- the invoices
    bil record;     -- the lines billed, and the adjustments made since
    c_accounts bigint[];        -- the invoices of a batch of accounts
    c_invoices bigint[];
    c_starts timestamptz[];
    lo integer := 1;
    hi integer;
BEGIN
    -- 1. the invoices
    SELECT array_agg(i.account_id ORDER BY i.account_id, i.invoice_id) AS accounts,
           array_agg(i.invoice_id ORDER BY i.account_id, i.invoice_id) AS invoices,
           array_agg(i.period_start ORDER BY i.account_id, i.invoice_id) AS starts
      INTO inv
      FROM billing.invoices i
     WHERE i.status = 'finalized'
       AND i.period_start < to_ts AND i.period_end > from_ts
       AND (p_account IS NULL OR i.account_id = p_account);
    IF inv.accounts IS NULL THEN
        RETURN;
    END IF;
    FOREACH hi IN ARRAY billing._chunk_ends(inv.accounts, p_chunk) LOOP
        c_accounts := inv.accounts[lo:hi];
        c_invoices := inv.invoices[lo:hi];
        c_starts := inv.starts[lo:hi];
        lo := hi + 1;
        -- 2. what was billed: the rated lines, and the adjustments made since
        SELECT array_agg(y.account_id) AS accounts, array_agg(y.invoice_id) AS invoices,
               array_agg(y.kind) AS kinds, array_agg(y.meter) AS meters,
               array_agg(y.description) AS descriptions, array_agg(y.quantity) AS quantities,
               array_agg(y.amount) AS amounts, array_agg(y.segment_start) AS segments,
               array_agg(y.dimension) AS dimensions
          INTO bil
          FROM (SELECT l.account_id, l.invoice_id, l.kind, l.meter::text AS meter, l.description,
                       l.quantity, l.amount, l.segment_start, l.dimension::text AS dimension
                  FROM unnest(c_accounts, c_invoices) v(account_id, invoice_id)
                       JOIN billing.invoice_lines l
                         ON l.account_id = v.account_id AND l.invoice_id = v.invoice_id
                 WHERE l.kind IN ('usage', 'fixed', 'cap')
                   -- the batch's accounts are in order: a range of the primary
                   -- key, not a scan of every account's lines per batch
                   AND l.account_id BETWEEN c_accounts[1] AND c_accounts[cardinality(c_accounts)]
                UNION ALL
                SELECT a.account_id, a.invoice_id, a.line_kind, a.meter::text, a.description,
                       a.new_quantity - a.old_quantity, a.delta, a.segment_start, a.dimension::text
                  FROM unnest(c_accounts, c_invoices) v(account_id, invoice_id)
                       JOIN billing.adjustments a
                         ON a.account_id = v.account_id AND a.invoice_id = v.invoice_id
                 WHERE a.account_id BETWEEN c_accounts[1] AND c_accounts[cardinality(c_accounts)]) y;
        -- 3. compare today's lines of each invoice's period (every plan segment,
        -- the cap; a period no subscription covers any more bills nothing) with
        -- them: in one statement, the lines streamed from _period_build (an
        -- array of them, built and read back, cost 7% of a rerate); it reads
        -- no table
        RETURN QUERY
        WITH invs AS (
            SELECT k.a AS account_id, k.i AS invoice_id, k.s AS period_start
              FROM unnest(c_accounts, c_invoices, c_starts) AS k(a, i, s)
        ), correct AS (
            SELECT invs.account_id, invs.invoice_id, (b.line).kind, (b.line).meter,
                   (b.line).description, (b.line).quantity, (b.line).amount,
                   (b.line).segment_start, coalesce((b.line).segment_start, invs.period_start) AS seg,
                   (b.line).dimension
              FROM billing._period_build(c_accounts, c_starts, true) b
                   JOIN invs ON invs.account_id = b.account_id AND invs.period_start = b.period_start
        ), billed_sum AS (
            SELECT b.account_id, b.invoice_id, b.kind, b.meter, b.dimension::text AS dimension,
                   CASE WHEN b.kind = 'fixed' THEN b.description END AS fixed_key,
                   coalesce(b.segment_start, invs.period_start) AS seg,
                   max(b.segment_start) AS segment_start, max(b.description) AS description,
                   sum(b.quantity) AS quantity, sum(b.amount) AS amount
              FROM unnest(bil.accounts, bil.invoices, bil.kinds, bil.meters, bil.descriptions,
                          bil.quantities, bil.amounts, bil.segments, bil.dimensions)
                       AS b(account_id, invoice_id, kind, meter, description, quantity, amount,
                            segment_start, dimension)
                   JOIN invs ON invs.account_id = b.account_id AND invs.invoice_id = b.invoice_id
             GROUP BY 1, 2, 3, 4, 5, 6, 7
        )
        SELECT coalesce(c.account_id, b.account_id), coalesce(c.invoice_id, b.invoice_id),
               coalesce(c.kind, b.kind), coalesce(c.meter, b.meter),
               coalesce(c.description, b.description),
               -- a usage line missing on either side billed or should bill 0 units
               CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(b.quantity, 0) ELSE b.quantity END,
               coalesce(b.amount, 0),
               CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(c.quantity, 0) ELSE c.quantity END,
               coalesce(c.amount, 0),
               coalesce(c.amount, 0) - coalesce(b.amount, 0),
               coalesce(c.segment_start, b.segment_start), coalesce(c.dimension, b.dimension)
          FROM correct c
               FULL JOIN billed_sum b
                      ON b.account_id = c.account_id AND b.invoice_id = c.invoice_id
                     AND b.seg = c.seg AND b.kind = c.kind
                     AND b.meter IS NOT DISTINCT FROM c.meter
                     AND b.dimension IS NOT DISTINCT FROM c.dimension
                     AND b.fixed_key IS NOT DISTINCT FROM CASE WHEN c.kind = 'fixed' THEN c.description END;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._rerate_diff(timestamptz, timestamptz, bigint, integer) IS
    'Internal: billed versus correct lines of the finalized invoices overlapping a range, p_chunk accounts at a time';

CREATE FUNCTION billing._rerate(from_ts timestamptz, to_ts timestamptz, p_account bigint,
                                dry_run boolean, p_reason text)
    RETURNS TABLE (r_account bigint, r_invoice bigint, r_meter text,
                   r_billed_quantity numeric, r_billed_amount numeric,
                   r_correct_quantity numeric, r_correct_amount numeric, r_delta numeric,
                   r_dimension text)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
DECLARE
    n_written bigint;
BEGIN
    IF from_ts IS NULL OR to_ts IS NULL OR dry_run IS NULL THEN
        RAISE EXCEPTION 'rerate: from_ts, to_ts and dry_run must not be null' USING ERRCODE = '22004';
    END IF;
    IF from_ts >= to_ts THEN
        RAISE EXCEPTION 'rerate: from_ts must be before to_ts' USING ERRCODE = '22023';
    END IF;
    IF dry_run THEN
        RETURN QUERY
        SELECT d.account_id, d.invoice_id, d.meter, d.billed_quantity, d.billed_amount,
               d.correct_quantity, d.correct_amount, d.delta, d.dimension
          FROM billing._rerate_diff(from_ts, to_ts, p_account) d
         WHERE d.delta <> 0
         ORDER BY 1, 2, 3, 9 NULLS FIRST;
        RETURN;
    END IF;
    -- one re-rate at a time: a second run waits, then finds the first one's
    -- adjustments (a table lock only roles that may write adjustments take)
    PERFORM billing._lock_table('billing.adjustments');
    RETURN QUERY
    WITH d AS (
        SELECT * FROM billing._rerate_diff(from_ts, to_ts, p_account) x
         WHERE x.delta <> 0
    ), written AS (
        INSERT INTO billing.adjustments (account_id, invoice_id, line_kind, meter, description,
                                         old_quantity, new_quantity, old_amount, new_amount, delta,
                                         reason, segment_start, dimension)
        SELECT d.account_id, d.invoice_id, d.line_kind, d.meter, d.description,
               d.billed_quantity, d.correct_quantity, d.billed_amount, d.correct_amount, d.delta,
               coalesce(p_reason, 're-rate'), d.segment_start, d.dimension
          FROM d
         -- adjustment ids in invoice line order (plan segments; fixed fees,
         -- usage, the cap)
         ORDER BY d.account_id, d.invoice_id, d.segment_start NULLS LAST,
                  CASE d.line_kind WHEN 'fixed' THEN 1 WHEN 'usage' THEN 2 ELSE 3 END,
                  d.description, d.meter, d.dimension NULLS FIRST
    )
    SELECT d.account_id, d.invoice_id, d.meter, d.billed_quantity, d.billed_amount,
           d.correct_quantity, d.correct_amount, d.delta, d.dimension
      FROM d
     ORDER BY 1, 2, 3, 9 NULLS FIRST;
    GET DIAGNOSTICS n_written = ROW_COUNT;
    PERFORM billing._audit_rerate(from_ts, to_ts, p_account, coalesce(p_reason, 're-rate'), n_written);
END
$$;
COMMENT ON FUNCTION billing._rerate(timestamptz, timestamptz, bigint, boolean, text) IS
    'Internal: the body of billing.rerate';

CREATE FUNCTION billing.rerate(from_ts timestamptz, to_ts timestamptz, account_id bigint DEFAULT NULL,
                               dry_run boolean DEFAULT false, reason text DEFAULT 're-rate')
    RETURNS TABLE (account_id bigint, invoice_id bigint, meter text,
                   billed_quantity numeric, billed_amount numeric,
                   correct_quantity numeric, correct_amount numeric, delta numeric,
                   dimension text)   -- issue 18: last, so that positional clients keep working
    LANGUAGE sql
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT * FROM billing._rerate($1, $2, $3, $4, $5)
$$;
COMMENT ON FUNCTION billing.rerate(timestamptz, timestamptz, bigint, boolean, text) IS
    'Recomputes the finalized invoices overlapping [from_ts, to_ts) from today''s usage and charge versions and records the differences as adjustments for the next invoice';

-- reconciliation ------------------------------------------------------------------------------

CREATE FUNCTION billing.reconcile(source regclass, account_column name, meter_column name,
                                  quantity_column name, ts_column name,
                                  from_ts timestamptz, to_ts timestamptz)
    RETURNS TABLE (account_id bigint, meter text, bucket_start timestamptz,
                   source_quantity numeric, counted_quantity numeric, difference numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    col name;
BEGIN
    IF source IS NULL OR account_column IS NULL OR meter_column IS NULL OR quantity_column IS NULL
       OR ts_column IS NULL OR from_ts IS NULL OR to_ts IS NULL THEN
        RAISE EXCEPTION 'reconcile: no argument may be null' USING ERRCODE = '22004';
    END IF;
    FOREACH col IN ARRAY ARRAY[account_column, meter_column, quantity_column, ts_column] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = source AND a.attname = col
                          AND a.attnum > 0 AND NOT a.attisdropped) THEN
            RAISE EXCEPTION 'column "%" of relation "%" does not exist', col, source
                USING ERRCODE = '42703';
        END IF;
    END LOOP;
    -- a source row for a meter that does not exist cannot be compared: say so
    EXECUTE format($q$
        SELECT s.%1$I::text FROM %2$s s
         WHERE s.%3$I >= $1 AND s.%3$I < $2
           AND NOT EXISTS (SELECT 1 FROM billing.meters m WHERE m.meter = s.%1$I::text)
         LIMIT 1 $q$, meter_column, source, ts_column)
       INTO col USING from_ts, to_ts;
    IF col IS NOT NULL THEN
        RAISE EXCEPTION 'source "%" has usage of meter "%", which does not exist', source, col
            USING ERRCODE = '23503';
    END IF;
    -- both sides per (account, meter, bucket), combined by the meter's aggregation
    RETURN QUERY EXECUTE format($q$
        WITH src AS (
            -- a source row is one report: count and unique count it, the others fold
            -- its value by the cells' rule (src/agg.c); rows have no arrival
            -- order, so of two last values with the same timestamp the
            -- greater is taken
            SELECT s.%1$I::bigint AS account_id, s.%2$I::text AS meter,
                   billing._bin(m.bucket_width, s.%4$I) AS bucket_start,
                   billing._cell_agg(m.aggregation,
                                     -- a unique meter's cells count reports, as count's
                                     CASE WHEN m.aggregation IN ('count', 'unique') THEN 1::numeric
                                          ELSE s.%3$I::numeric END,
                                     CASE WHEN m.aggregation = 'last' THEN s.%4$I END,
                                     NULL::bigint) AS quantity
              FROM %5$s s JOIN billing.meters m ON m.meter = s.%2$I::text
             WHERE s.%4$I >= $1 AND s.%4$I < $2
             GROUP BY 1, 2, 3, m.aggregation
        ), counted AS (
            SELECT u.account_id, u.meter::text AS meter, u.bucket_start,
                   billing._cell_agg(m.aggregation, u.quantity, u.last_ts, u.last_seq) AS quantity
              FROM billing.usage_cells u JOIN billing.meters m ON m.meter = u.meter
             WHERE u.bucket_start >= $1 AND u.bucket_start < $2
             GROUP BY 1, 2, 3, m.aggregation
        )
        SELECT coalesce(s.account_id, c.account_id), coalesce(s.meter, c.meter),
               coalesce(s.bucket_start, c.bucket_start),
               coalesce(s.quantity, 0), coalesce(c.quantity, 0),
               coalesce(s.quantity, 0) - coalesce(c.quantity, 0)
          FROM src s FULL JOIN counted c
            ON c.account_id = s.account_id AND c.meter = s.meter AND c.bucket_start = s.bucket_start
         WHERE coalesce(s.quantity, 0) <> coalesce(c.quantity, 0)
         ORDER BY 1, 2, 3
        $q$, account_column, meter_column, quantity_column, ts_column, source)
    USING from_ts, to_ts;
END
$$;
COMMENT ON FUNCTION billing.reconcile(regclass, name, name, name, name, timestamptz, timestamptz) IS
    'Compares an independent record of usage with the counters bucket by bucket over a range; returns only the buckets that differ';

-- PL/pgSQL: Citus plans its queries only with the argument's value.  Lines
-- are re-rated with billing._rate_check, which shares no cache and no fast
-- path with billing.rate (what finalize_invoices wrote them with).
CREATE FUNCTION billing._verify_invoices(p_account bigint)
    RETURNS TABLE (r_account_id bigint, r_invoice_id bigint, r_line_no int, r_problem text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN QUERY
    SELECT i.account_id, i.invoice_id, NULL::int,
           format('total %s is not the sum of the lines (%s)', i.total, coalesce(l.s, 0))
      FROM billing.invoices i
           LEFT JOIN LATERAL (SELECT sum(x.amount) AS s FROM billing.invoice_lines x
                               WHERE x.account_id = i.account_id AND x.invoice_id = i.invoice_id) l ON true
     WHERE (p_account IS NULL OR i.account_id = p_account) AND i.total IS DISTINCT FROM coalesce(l.s, 0)
    UNION ALL
    SELECT x.account_id, x.invoice_id, x.line_no,
           format('%s line rates %s to %s, not %s', x.kind, coalesce(x.quantity, 0),
                  billing.round_money(billing._rate_check(x.price, coalesce(x.quantity, 0)), i.currency),
                  x.amount)
      FROM billing.invoice_lines x
           JOIN billing.invoices i ON i.account_id = x.account_id AND i.invoice_id = x.invoice_id
     WHERE (p_account IS NULL OR x.account_id = p_account) AND x.kind IN ('usage', 'fixed')
       AND x.proration IS NULL
       AND (x.price IS NULL
            OR billing.round_money(billing._rate_check(x.price, coalesce(x.quantity, 0)), i.currency) <> x.amount)
    UNION ALL
    -- a fixed fee of a plan segment: its share of the period, in seconds
    SELECT x.account_id, x.invoice_id, x.line_no,
           format('fixed line of %s of the period rates to %s, not %s',
                  extract(epoch FROM x.segment_end - x.segment_start) / extract(epoch FROM i.period_end - i.period_start),
                  billing.round_money(billing._rate_check(x.price, 0)
                                      * extract(epoch FROM x.segment_end - x.segment_start)
                                      / extract(epoch FROM i.period_end - i.period_start), i.currency),
                  x.amount)
      FROM billing.invoice_lines x
           JOIN billing.invoices i ON i.account_id = x.account_id AND i.invoice_id = x.invoice_id
     WHERE (p_account IS NULL OR x.account_id = p_account) AND x.kind = 'fixed'
       AND x.proration IS NOT NULL
       AND (x.price IS NULL OR x.segment_start IS NULL OR x.segment_end IS NULL
            OR billing.round_money(billing._rate_check(x.price, 0)
                                   * extract(epoch FROM x.segment_end - x.segment_start)
                                   / extract(epoch FROM i.period_end - i.period_start), i.currency) <> x.amount)
    UNION ALL
    -- each credit line is the credit ledger's draw of its grant on its
    -- invoice, and each draw is a credit line
    SELECT coalesce(c.account_id, d.account_id), coalesce(c.invoice_id, d.invoice_id), c.line_no,
           CASE WHEN c.line_no IS NULL
                THEN format('the credit ledger draws %s from grant %s but no credit line shows it',
                            d.amount, d.grant_id)
                WHEN d.amount IS NULL
                THEN format('credit line of grant %s has no draw in the credit ledger', c.grant_id)
                ELSE format('credit line of grant %s is %s, the credit ledger draws %s', c.grant_id,
                            c.amount, d.amount) END
      FROM (SELECT l.account_id, l.invoice_id, l.line_no, l.grant_id, l.amount
              FROM billing.invoice_lines l
             WHERE l.kind = 'credit' AND (p_account IS NULL OR l.account_id = p_account)) c
           FULL JOIN (SELECT g.account_id, g.invoice_id, g.grant_id, sum(g.amount) AS amount
                        FROM billing.credit_ledger g
                       WHERE g.kind = 'draw' AND (p_account IS NULL OR g.account_id = p_account)
                       GROUP BY 1, 2, 3) d
                  ON d.account_id = c.account_id AND d.invoice_id = c.invoice_id
                 AND d.grant_id = c.grant_id
     WHERE c.amount IS DISTINCT FROM d.amount
    UNION ALL
    -- credits never take an invoice below 0
    SELECT i.account_id, i.invoice_id, NULL::int,
           format('credits take the total to %s, below 0', i.total)
      FROM billing.invoices i
     WHERE (p_account IS NULL OR i.account_id = p_account) AND i.total < 0
       AND EXISTS (SELECT 1 FROM billing.invoice_lines l
                    WHERE l.account_id = i.account_id AND l.invoice_id = i.invoice_id
                      AND l.kind = 'credit')
    ORDER BY 1, 2, 3;
END
$$;
COMMENT ON FUNCTION billing._verify_invoices(bigint) IS 'Internal: the body of verify_invoices';

CREATE FUNCTION billing.verify_invoices(account_id bigint DEFAULT NULL)
    RETURNS TABLE (account_id bigint, invoice_id bigint, line_no int, problem text)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT * FROM billing._verify_invoices($1)
$$;
COMMENT ON FUNCTION billing.verify_invoices(bigint) IS
    'Checks finalized invoices: each total is the sum of its lines, each usage and fixed line is the rounded rating of its quantity with the price that rated it (a plan segment''s fixed fee prorated by seconds), each credit line is the credit ledger''s draw and credits take no total below 0';
