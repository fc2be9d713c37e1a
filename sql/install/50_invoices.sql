/*
 * Invoices, their lines and adjustments (SPEC section 5) with the triggers
 * that keep them immutable, rating a period, preview, finalization,
 * pending adjustments, remaining (section 4).
 */

CREATE SEQUENCE billing.invoice_id_seq;
COMMENT ON SEQUENCE billing.invoice_id_seq IS 'Invoice numbers, unique across accounts';

CREATE TABLE billing.invoices (
    account_id    bigint NOT NULL,
    invoice_id    bigint NOT NULL DEFAULT pg_catalog.nextval('billing.invoice_id_seq'),
    plan          text COLLATE "C" NOT NULL,
    period_start  timestamptz NOT NULL,
    period_end    timestamptz NOT NULL,
    currency      text NOT NULL,
    total         numeric NOT NULL,
    status        text NOT NULL DEFAULT 'finalized' CHECK (status IN ('finalized', 'void')),
    finalized_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (account_id, invoice_id),
    UNIQUE (account_id, period_start)
);
COMMENT ON TABLE billing.invoices IS
    'Finalized invoices, one per account and billing period; immutable';
-- an invoice number is unique on its own too (SPEC section 5); on Citus,
-- which enforces uniqueness per shard only, billing.distribute() drops this
-- index and the one sequence keeps the numbers apart
CREATE UNIQUE INDEX invoices_invoice_id_key ON billing.invoices (invoice_id);
CREATE TRIGGER invoices_immutable BEFORE UPDATE OR DELETE ON billing.invoices
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change(
        'Finalized invoices and their lines never change.',
        'Corrections are billed as adjustments on a later invoice (billing.rerate).');
CREATE TRIGGER invoices_no_truncate BEFORE TRUNCATE ON billing.invoices
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change(
        'Finalized invoices and their lines never change.',
        'Corrections are billed as adjustments on a later invoice (billing.rerate).');

CREATE TABLE billing.invoice_lines (
    account_id     bigint NOT NULL,
    invoice_id     bigint NOT NULL,
    line_no        integer NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('usage', 'fixed', 'cap', 'adjustment')),
    meter          text COLLATE "C",
    description    text,
    quantity       numeric,
    amount         numeric NOT NULL,
    -- provenance: what rated the line
    unrounded_amount numeric,
    charge_id      bigint,           -- the charge version used
    price          billing.price,    -- its price, as it was
    adjustment_id  bigint,           -- adjustment lines: the adjustment carried
    PRIMARY KEY (account_id, invoice_id, line_no),
    FOREIGN KEY (account_id, invoice_id) REFERENCES billing.invoices
);
COMMENT ON TABLE billing.invoice_lines IS
    'Lines of finalized invoices, with the charge version, price and quantity that rated each; immutable';
CREATE INDEX invoice_lines_charge ON billing.invoice_lines (charge_id) WHERE charge_id IS NOT NULL;

-- rating a period -----------------------------------------------------------------------

-- the spend cap line: what takes the usage lines of a period down to the
-- rounded cap, when they exceed it (NULL: they do not); in C
-- (src/credits.c), where the invoice of a period with a plan change caps
-- its segments' usage lines too
CREATE FUNCTION billing._cap_amount(cap numeric, currency text, usage numeric) RETURNS numeric
    AS 'MODULE_PATHNAME', 'billing_cap_amount'
    LANGUAGE C STABLE STRICT;
COMMENT ON FUNCTION billing._cap_amount(numeric, text, numeric) IS
    'Internal: the amount of the spend cap line of a period whose usage lines add up to usage (NULL: not capped)';
CREATE TRIGGER invoice_lines_immutable BEFORE UPDATE OR DELETE ON billing.invoice_lines
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change(
        'Finalized invoices and their lines never change.',
        'Corrections are billed as adjustments on a later invoice (billing.rerate).');
CREATE TRIGGER invoice_lines_no_truncate BEFORE TRUNCATE ON billing.invoice_lines
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change(
        'Finalized invoices and their lines never change.',
        'Corrections are billed as adjustments on a later invoice (billing.rerate).');

CREATE SEQUENCE billing.adjustment_id_seq;
CREATE TABLE billing.adjustments (
    account_id        bigint NOT NULL,
    adjustment_id     bigint NOT NULL DEFAULT pg_catalog.nextval('billing.adjustment_id_seq'),
    invoice_id        bigint NOT NULL,       -- the finalized invoice corrected
    line_kind         text NOT NULL,         -- usage | fixed | cap
    meter             text COLLATE "C",
    description       text,
    old_quantity      numeric,
    new_quantity      numeric,
    old_amount        numeric NOT NULL,
    new_amount        numeric NOT NULL,
    delta             numeric NOT NULL,
    reason            text NOT NULL,
    actor             text NOT NULL DEFAULT CURRENT_USER,
    created_at        timestamptz NOT NULL DEFAULT pg_catalog.now(),
    billed_invoice_id bigint,                -- the invoice that carried it (NULL: pending)
    PRIMARY KEY (account_id, adjustment_id),
    FOREIGN KEY (account_id, invoice_id) REFERENCES billing.invoices
);
COMMENT ON TABLE billing.adjustments IS
    'Corrections of finalized invoices (re-rating); the next invoice of the account carries each as an adjustment line';

-- an adjustment is written once; finalization only records the invoice that carried it
CREATE TRIGGER adjustments_guard BEFORE UPDATE OR DELETE ON billing.adjustments
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change(
        'An adjustment never changes, except to record once the invoice that carried it.',
        'Correct an adjustment with a later rerate, which writes a new one.',
        'billed_invoice_id');
CREATE TRIGGER adjustments_no_truncate BEFORE TRUNCATE ON billing.adjustments
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('adjustments is append-only.');

/*
 * _rate_periods: the lines of many billing periods at once (element i of
 * each array describes period i), in invoice order per period (fixed fees,
 * usage by description, meter and dimension, the spend cap), amounts
 * rounded per line to the currency's minor unit.  The version of each
 * charge (plan, meter, dimension) in force at a period's start rates the
 * whole period; a charge with a dimension rates that dimension's usage of
 * its meter, one with none the dimensions no other charge in force names.
 * Set-based, so that finalizing or re-rating ten thousand accounts is one
 * query, not ten thousand.  Each metered charge bills the buckets of its
 * meter that start in [lo, period end), lo as 45_period_buckets.sql says:
 * every path that bills a period comes through here, so each bucket of a
 * subscription is billed once.
 */
CREATE FUNCTION billing._rate_periods(p_accounts bigint[], p_plans text[], p_currencies text[],
                                      p_caps numeric[], p_starts timestamptz[],
                                      p_ends timestamptz[])
    RETURNS TABLE (idx integer, ord integer, kind text, meter text, description text,
                   quantity numeric, amount numeric, unrounded_amount numeric,
                   charge_id bigint, price billing.price, dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run; the plan
    -- cache mode and enable_nestloop are levels to change them on, for
    -- this call only
    SET jit = off SET plan_cache_mode = auto SET enable_nestloop = on AS $$
BEGIN
    -- A few periods (a preview): one generic plan per session (for one
    -- account a custom plan, the arrays' lengths known, always looked
    -- cheaper, and planning it took longer than running it).  Many
    -- (finalize, rerate): custom plans, and no nested loops: with meters
    -- and charges analyzed the planner expects a handful of rows from the
    -- CTEs below, which hold one or more per period, and joined them in
    -- nested loops, quadratic in the periods (re-rating 10,000 accounts
    -- took 62 s in one statement, 9 s in batches of 1,000, and 1.3 s
    -- without them).  See _plan_cache_for.
    PERFORM billing._plan_cache_for(cardinality(p_accounts), p_hash_joins => true);
    RETURN QUERY
    WITH per AS (
        SELECT x.i::integer AS idx, x.pl AS plan, x.cur AS currency, x.cap, x.s AS ps
          FROM unnest(p_plans, p_currencies, p_caps, p_starts) WITH ORDINALITY AS x(pl, cur, cap, s, i)
    ), versions AS (
        -- the charge versions in force, once per (plan, period start) however
        -- many accounts share them, numbered in invoice order: fixed fees by
        -- description, then usage by description, meter and dimension (the
        -- spend cap comes last)
        SELECT v.*, (row_number() OVER (PARTITION BY v.plan, v.ps
                                        ORDER BY v.grp, v.description, v.meter,
                                                 v.dimension NULLS FIRST))::integer AS ord,
               (count(*) OVER (PARTITION BY v.plan, v.ps))::integer AS n_lines
          FROM (SELECT DISTINCT ON (k.plan, k.ps, c.meter, c.dimension,
                                    CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END)
                       k.plan, k.ps, c.charge_id, c.meter::text AS meter,
                       c.dimension::text AS dimension,
                       coalesce(c.description,
                                CASE WHEN c.dimension IS NULL THEN c.meter::text
                                     ELSE format('%s (%s)', c.meter, c.dimension) END) AS description,
                       c.price,
                       CASE WHEN c.meter IS NULL THEN 1 ELSE 2 END AS grp
                  FROM (SELECT DISTINCT per.plan, per.ps FROM per) k
                       JOIN billing.charges c ON c.plan = k.plan AND c.valid_from <= k.ps
                 ORDER BY k.plan, k.ps, c.meter, c.dimension,
                          CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END,
                          c.valid_from DESC) v
    ), widths AS (
        -- the bucket widths of the meters each (plan, period start) charges
        SELECT DISTINCT v.plan, v.ps, m.bucket_width
          FROM versions v JOIN billing.meters m ON m.meter = v.meter
    ), firsts AS (
        -- a metered charge of a period bills the buckets of its meter that
        -- start in [lo, period end), lo by the one rule of src/periods.c
        -- for the meter's bucket width: the bucket straddling a
        -- subscription's start goes to its first period, every other one
        -- to the period holding its start
        SELECT per.idx, w.bucket_width,
               billing._period_first_bucket(per.ps, uf.usage_from, w.bucket_width) AS lo
          FROM per JOIN widths w ON w.plan = per.plan AND w.ps = per.ps
               JOIN billing._period_usage_from(p_accounts, p_starts) uf ON uf.idx = per.idx
    ), reads AS (
        -- one read of the usage store per period and distinct lo (more than
        -- one only in a first period whose meters' buckets straddle its
        -- start at different points)
        SELECT r.idx, r.lo, (row_number() OVER (ORDER BY r.idx, r.lo))::integer AS j
          FROM (SELECT DISTINCT f.idx, f.lo FROM firsts f) r
    ), charged AS (
        -- the usage charges of each read (those of its period whose
        -- meter's bucket width gives its lo), for the totals: a matrix
        -- charge's dimension is totalled apart
        SELECT array_agg(rd.j) AS i, array_agg(v.meter) AS m, array_agg(v.dimension) AS d
          FROM reads rd JOIN per ON per.idx = rd.idx
               JOIN versions v ON v.plan = per.plan AND v.ps = per.ps AND v.meter IS NOT NULL
               JOIN billing.meters m ON m.meter = v.meter
               JOIN firsts f ON f.idx = rd.idx AND f.lo = rd.lo AND f.bucket_width = m.bucket_width
    ), totals AS MATERIALIZED (
        -- (read once: inlined, the join below would read the store per line)
        -- each meter from the read whose lo is that of its bucket width
        SELECT rd.idx, t.meter, t.dimension, t.quantity
          FROM (SELECT array_agg(p_accounts[rd.idx] ORDER BY rd.j) AS accounts,
                       array_agg(rd.lo ORDER BY rd.j) AS starts,
                       array_agg(p_ends[rd.idx] ORDER BY rd.j) AS ends
                  FROM reads rd) a, charged c,
               LATERAL billing._usage_totals_many(a.accounts, a.starts, a.ends, c.i, c.m, c.d) t
               JOIN reads rd ON rd.j = t.idx
               JOIN billing.meters m ON m.meter = t.meter
               JOIN firsts f ON f.idx = rd.idx AND f.lo = rd.lo AND f.bucket_width = m.bucket_width
    ), rated AS (
        SELECT per.idx, per.currency, v.ord, v.n_lines, v.grp,
               CASE WHEN v.meter IS NULL THEN 'fixed' ELSE 'usage' END AS kind,
               v.meter, v.description,
               CASE WHEN v.meter IS NULL THEN NULL ELSE coalesce(t.quantity, 0) END AS quantity,
               billing.rate(v.price, CASE WHEN v.meter IS NULL THEN 0 ELSE coalesce(t.quantity, 0) END)
                   AS unrounded_amount,
               v.charge_id, v.price, v.dimension
          FROM per JOIN versions v ON v.plan = per.plan AND v.ps = per.ps
               LEFT JOIN totals t ON t.idx = per.idx AND t.meter = v.meter
                                 AND t.dimension IS NOT DISTINCT FROM v.dimension
    ), lines AS (
        SELECT r.*, billing.round_money(r.unrounded_amount, r.currency) AS amount FROM rated r
    ), capped AS (
        SELECT per.idx, max(l.n_lines) + 1 AS ord, 'cap'::text AS kind, NULL::text AS meter,
               'spend cap'::text AS description, NULL::numeric AS quantity,
               NULL::numeric AS unrounded_amount, NULL::bigint AS charge_id,
               NULL::billing.price AS price, NULL::text AS dimension,
               billing._cap_amount(per.cap, per.currency, sum(l.amount)) AS amount
          FROM per JOIN lines l ON l.idx = per.idx AND l.kind = 'usage'
         WHERE per.cap IS NOT NULL
         GROUP BY per.idx, per.cap, per.currency
        HAVING billing._cap_amount(per.cap, per.currency, sum(l.amount)) IS NOT NULL
    )
    SELECT l.idx, l.ord, l.kind, l.meter, l.description, l.quantity, l.amount,
           l.unrounded_amount, l.charge_id, l.price, l.dimension
      FROM lines l
    UNION ALL
    SELECT c.idx, c.ord, c.kind, c.meter, c.description, c.quantity, c.amount,
           c.unrounded_amount, c.charge_id, c.price, c.dimension
      FROM capped c;
END
$$;
COMMENT ON FUNCTION billing._rate_periods(bigint[], text[], text[], numeric[], timestamptz[], timestamptz[]) IS
    'Internal: the rated lines (fixed fees, usage per meter and dimension, spend cap) of many billing periods';

CREATE FUNCTION billing._rate_period(p_account bigint, p_plan text, p_currency text,
                                     p_cap numeric, p_start timestamptz, p_end timestamptz)
    RETURNS TABLE (ord integer, kind text, meter text, description text, quantity numeric,
                   amount numeric, unrounded_amount numeric, charge_id bigint,
                   price billing.price, dimension text)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT r.ord, r.kind, r.meter, r.description, r.quantity, r.amount, r.unrounded_amount,
           r.charge_id, r.price, r.dimension
      FROM billing._rate_periods(ARRAY[p_account], ARRAY[p_plan], ARRAY[p_currency],
                                 ARRAY[p_cap], ARRAY[p_start], ARRAY[p_end]) r
     ORDER BY r.ord
$$;
COMMENT ON FUNCTION billing._rate_period(bigint, text, text, numeric, timestamptz, timestamptz) IS
    'Internal: the rated lines of one billing period';

-- how an adjustment reads on the invoice that carries it
CREATE FUNCTION billing._adjustment_text(a billing.adjustments) RETURNS text
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT format('%s (invoice %s): %s', coalesce(a.description, a.line_kind), a.invoice_id, a.reason)
$$;
COMMENT ON FUNCTION billing._adjustment_text(billing.adjustments) IS
    'Internal: the description of an adjustment line';

/*
 * _invoice_preview: the lines the invoice of the period holding p_at would
 * have now, built by _invoice_build as finalize_invoices builds them (every
 * plan segment, the cap, true-ups, installments, pending adjustments and
 * credits drawn from what is left of each grant), expiries not booked.
 * When earlier periods of the account have no invoice yet (the grace
 * period, or finalize lagging), finalize will build them first, and they
 * draw credits, count toward minimum windows and take the pending
 * adjustments before this one, and their windows' rollovers are booked
 * into grants it may draw from: they are built with it and booked, as
 * finalize will, and only this period's lines are returned.  An index
 * probe per subscription of the account tells whether there are any.  A
 * period already finalized returns its invoice's lines.
 */
CREATE FUNCTION billing._invoice_preview(p_account bigint, p_at timestamptz)
    RETURNS TABLE (r_line_no int, r_kind text, r_meter text, r_description text,
                   r_period_start timestamptz, r_period_end timestamptz,
                   r_quantity numeric, r_amount numeric, r_dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    p record;
BEGIN
    -- the period's segments (its spend cap: the last one's)
    SELECT min(s.segment_start) AS ps, max(s.segment_end) AS pe, min(s.currency) AS currency,
           (array_agg(s.spend_cap ORDER BY s.segment_start DESC))[1] AS cap,
           array_agg(s.plan ORDER BY s.segment_start) AS plans,
           array_agg(s.segment_start ORDER BY s.segment_start) AS starts,
           array_agg(s.segment_end ORDER BY s.segment_start) AS ends
      INTO p
      FROM billing._segments(ARRAY[p_account], ARRAY[p_at]) s;
    IF p.plans IS NULL THEN
        RETURN;               -- no subscription at p_at
    END IF;
    -- a period already finalized stands as its invoice: rebuilt, it would
    -- show today's rating and the pending adjustments that correct it
    -- (which go on the next invoice), and draw credits a second time
    IF EXISTS (SELECT 1 FROM billing.invoices i
                WHERE i.account_id = p_account AND i.period_start = p.ps AND i.status = 'finalized') THEN
        RETURN QUERY
        SELECT l.line_no, l.kind, l.meter::text, l.description, i.period_start, i.period_end,
               l.quantity, l.amount, l.dimension::text
          FROM billing.invoices i
               JOIN billing.invoice_lines l ON l.account_id = i.account_id AND l.invoice_id = i.invoice_id
         WHERE i.account_id = p_account AND i.period_start = p.ps AND i.status = 'finalized'
         ORDER BY l.line_no;
        RETURN;
    END IF;
    -- earlier periods without an invoice, by _due_periods' walk: a
    -- subscription that started before the period, whose next period on its
    -- own grid (after the one holding the latest invoice overlapping it, or
    -- its first) ends by the period's start and starts before its own end.
    -- One index probe per subscription of the account; it may say yes when
    -- there is none (the path below then builds this period alone), never
    -- no when there is one.
    IF NOT EXISTS (
        SELECT 1
          FROM billing.subscriptions s
               JOIN billing.plans pl ON pl.plan = s.plan,
               LATERAL (SELECT coalesce(s.period_anchor, s.starts_at) AS anchor) g,
               LATERAL (SELECT max(i.period_start) AS li FROM billing.invoices i
                         WHERE i.account_id = p_account
                           AND i.period_start < coalesce(s.ends_at, 'infinity')
                           AND i.period_end > s.starts_at) l
         WHERE s.account_id = p_account AND s.starts_at < p.ps
           AND greatest(billing._period_index(g.anchor, pl.period, s.starts_at),
                        billing._period_index(g.anchor, pl.period, l.li) + 1)
               <= billing._period_index(g.anchor, pl.period,
                                        least(coalesce(s.ends_at, 'infinity'), p.ps) - interval '1 microsecond')) THEN
        -- the build's rows come in invoice order; without booking, all are lines
        RETURN QUERY
        SELECT b.n::integer, b.kind, b.meter, b.description, p.ps, p.pe, b.quantity, b.amount,
               b.dimension
          FROM billing._invoice_build(ARRAY[p_account], ARRAY[p.currency], ARRAY[p.cap], ARRAY[p.ps],
                                      ARRAY[p.pe], ARRAY[true], array_fill(1, ARRAY[cardinality(p.plans)]),
                                      p.plans, p.starts, p.ends)
                   WITH ORDINALITY AS b(idx, ord, kind, meter, description, quantity, amount,
                                        unrounded_amount, charge_id, price, adjustment_id,
                                        commitment_id, grant_id, segment_start, segment_end,
                                        proration, effective_at, expires_at, source_grant, dimension, n);
        RETURN;
    END IF;
    -- the earlier periods (as finalize_invoices groups them), then this one,
    -- booked as finalize books them: a window ending in an earlier period
    -- rolls its rest over into a grant this period may draw from.  Of this
    -- period's rows only its invoice lines are shown (its own expiries and
    -- rollovers come after its draws).
    RETURN QUERY
    WITH d AS MATERIALIZED (
        SELECT * FROM billing._due_periods(p.ps, ARRAY[p_account])
    ), per AS (
        -- the earlier periods, then this one (k: its index in the build)
        SELECT y.*, (row_number() OVER (ORDER BY y.period_start))::integer AS k
          FROM (SELECT DISTINCT d.currency, d.spend_cap, d.period_start, d.period_end FROM d
                UNION ALL
                SELECT p.currency, p.cap, p.ps, p.pe) y
    ), seg AS (
        SELECT per.k, d.segment_plan AS plan, d.segment_start, d.segment_end
          FROM d JOIN per ON per.period_start = d.period_start
        UNION ALL
        SELECT per.k, x.plan, x.s, x.e
          FROM per, unnest(p.plans, p.starts, p.ends) AS x(plan, s, e)
         WHERE per.period_start = p.ps
    ), pa AS (
        SELECT array_agg(p_account ORDER BY per.k) AS accounts,
               array_agg(per.currency ORDER BY per.k) AS currencies,
               array_agg(per.spend_cap ORDER BY per.k) AS caps,
               array_agg(per.period_start ORDER BY per.k) AS starts,
               array_agg(per.period_end ORDER BY per.k) AS ends,
               array_agg(per.k = 1 ORDER BY per.k) AS firsts,
               max(per.k) AS this_k
          FROM per
    ), sa AS (
        SELECT array_agg(seg.k ORDER BY seg.k, seg.segment_start) AS idx,
               array_agg(seg.plan ORDER BY seg.k, seg.segment_start) AS plans,
               array_agg(seg.segment_start ORDER BY seg.k, seg.segment_start) AS starts,
               array_agg(seg.segment_end ORDER BY seg.k, seg.segment_start) AS ends
          FROM seg
    )
    SELECT (row_number() OVER (ORDER BY b.n))::integer, b.kind, b.meter, b.description, p.ps, p.pe,
           b.quantity, b.amount, b.dimension
      FROM pa, sa,
           LATERAL billing._invoice_build(pa.accounts, pa.currencies, pa.caps, pa.starts, pa.ends,
                                          pa.firsts, sa.idx, sa.plans, sa.starts, sa.ends,
                                          false, true)
               WITH ORDINALITY AS b(idx, ord, kind, meter, description, quantity, amount,
                                    unrounded_amount, charge_id, price, adjustment_id,
                                    commitment_id, grant_id, segment_start, segment_end,
                                    proration, effective_at, expires_at, source_grant, dimension, n)
     WHERE b.idx = pa.this_k AND billing._is_invoice_line(b.kind)
     ORDER BY b.n;
END
$$;
COMMENT ON FUNCTION billing._invoice_preview(bigint, timestamptz) IS 'Internal: the body of invoice_preview';

CREATE FUNCTION billing.invoice_preview(account_id bigint, at timestamptz DEFAULT pg_catalog.now())
    RETURNS TABLE (line_no int, kind text, meter text, description text,
                   period_start timestamptz, period_end timestamptz,
                   quantity numeric, amount numeric,
                   dimension text)   -- issue 18: last, so that positional clients keep working
    -- PL/pgSQL, not SQL: a SQL function with a SET clause is not inlined,
    -- and is parsed and planned again at each call (about 6% of a preview)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN QUERY SELECT * FROM billing._invoice_preview($1, $2);
END
$$;
COMMENT ON FUNCTION billing.invoice_preview(bigint, timestamptz) IS
    'The bill of the period holding at, as it stands: every line rounded to the currency''s minor unit, the spend cap, true-ups, commitment installments, pending adjustments and credits; a matrix charge''s line carries its dimension';

-- finalization ----------------------------------------------------------------------------

CREATE FUNCTION billing._grace_seconds() RETURNS integer
    LANGUAGE C STABLE AS 'MODULE_PATHNAME', 'billing_grace_seconds';
COMMENT ON FUNCTION billing._grace_seconds() IS
    'Internal: billing.grace_period in seconds, as validated by the module';
CREATE FUNCTION billing._grace_period() RETURNS interval
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
    -- exact seconds (a '24h' setting must not become a calendar day)
    SELECT make_interval(secs => billing._grace_seconds())
$$;
COMMENT ON FUNCTION billing._grace_period() IS 'Internal: the billing.grace_period GUC as an interval';

/*
 * What finalizing books of a row _invoice_build returns: an invoice line
 * (_is_invoice_line), an entry of the credit ledger (_ledger_kind: its kind
 * there, NULL when it is none; a credit line is also the ledger's draw),
 * or both.  The one rule of _finalize and its Citus twin _finalize_citus
 * (inlined: no SET clause, every operator qualified).
 */
CREATE FUNCTION billing._is_invoice_line(kind text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT kind OPERATOR(pg_catalog.=) ANY (ARRAY['usage', 'fixed', 'cap', 'true_up', 'commitment',
                                                  'adjustment', 'credit'])
$$;
COMMENT ON FUNCTION billing._is_invoice_line(text) IS
    'Internal: whether a row of _invoice_build of this kind is a line of the invoice';
CREATE FUNCTION billing._ledger_kind(kind text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN kind OPERATOR(pg_catalog.=) 'credit' THEN 'draw'
                WHEN kind OPERATOR(pg_catalog.=) ANY (ARRAY['expire', 'rollover', 'grant']) THEN kind END
$$;
COMMENT ON FUNCTION billing._ledger_kind(text) IS
    'Internal: the credit ledger kind of a row of _invoice_build of this kind (NULL: not booked in the ledger)';

/*
 * _due_periods: the billing periods that ended at or before cutoff and have
 * no invoice, one row per plan segment (_segments: a period with a plan
 * change has two), of some accounts (NULL: every account).  Each
 * subscription is walked from the period after the latest invoice
 * overlapping it, up to the one holding cutoff, so that a period one of
 * whose segments has not ended is seen whole and is not due.  PL/pgSQL:
 * Citus plans the queries with cutoff's value.
 */
CREATE FUNCTION billing._due_periods(cutoff timestamptz, p_accounts bigint[] DEFAULT NULL)
    RETURNS TABLE (account_id bigint, plan text, currency text, spend_cap numeric,
                   period_start timestamptz, period_end timestamptz, segment_plan text,
                   segment_start timestamptz, segment_end timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
DECLARE
    accs bigint[];
    ats timestamptz[];
BEGIN
    WITH subs AS (
        SELECT * FROM billing._subscriptions_of(p_accounts, true)
    ), walk AS (
        SELECT s.*, billing._period_index(s.anchor, s.period, s.starts_at) AS n_first,
               billing._period_index(s.anchor, s.period, s.last_invoiced) + 1 AS n_next,
               billing._period_index(s.anchor, s.period,
                   least(coalesce(s.ends_at, 'infinity') - interval '1 microsecond', cutoff)) AS n_last
          FROM subs s
    )
    SELECT array_agg(w.account_id ORDER BY w.account_id, n), 
           array_agg(greatest(billing._add_periods(w.anchor, w.period, n), w.starts_at)
                     ORDER BY w.account_id, n)
      INTO accs, ats
      FROM walk w, generate_series(greatest(w.n_first, coalesce(w.n_next, w.n_first)), w.n_last) n
     WHERE billing._add_periods(w.anchor, w.period, w.n_first) < cutoff;
    IF accs IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT y.account_id, y.invoice_plan, y.currency, y.cap, y.period_start, y.period_end,
           y.plan, y.segment_start, y.segment_end
      FROM (SELECT x.*, first_value(x.segment_start) OVER w AS period_start,
                   last_value(x.segment_end) OVER w AS period_end,
                   last_value(x.spend_cap) OVER w AS cap, last_value(x.plan) OVER w AS invoice_plan
              FROM (SELECT DISTINCT ON (s.account_id, s.grid_start, s.segment_start) s.*
                      FROM billing._segments(accs, ats) s
                     ORDER BY s.account_id, s.grid_start, s.segment_start) x
            WINDOW w AS (PARTITION BY x.account_id, x.grid_start ORDER BY x.segment_start
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) y
     WHERE y.period_end <= cutoff
     ORDER BY y.account_id, y.period_start, y.segment_start;
END
$$;
COMMENT ON FUNCTION billing._due_periods(timestamptz, bigint[]) IS
    'Internal: billing periods ended by a cutoff that have no invoice yet, one row per plan segment, of some accounts (NULL: all)';

/*
 * finalize_invoices: the accounts with a subscription, p_chunk at a time in
 * account order: lock those with due periods (row locks, in account order),
 * look their due periods up again under the locks (a concurrent finalizer
 * may have written some), then write every invoice, its lines, the
 * adjustments it carries, the credit ledger's draws, expiries and
 * rollovers and the rollover grants in one set-based statement over
 * _invoice_build (which on Citus _finalize_citus calls one period at a
 * time).  A batch's memory is freed before the next one: a run over a
 * million accounts needs the memory of p_chunk of them (and 8 bytes per
 * account for the list), not of a million.  Each account's pending
 * adjustments go on its earliest new invoice.  Rollover grants get their
 * ids here (the build names them -1, -2, ...); ledger seqs continue each
 * account's.
 */
CREATE FUNCTION billing._finalize(p_as_of timestamptz, p_chunk integer DEFAULT 1000)
    RETURNS TABLE (r_invoice_id bigint, r_account_id bigint, r_period_start timestamptz,
                   r_period_end timestamptz, r_total numeric)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
DECLARE
    cutoff timestamptz;
    accs bigint[];      -- the accounts with a subscription, in order
    batch bigint[];     -- p_chunk of them
    chunk bigint[];     -- those of the batch with due periods, locked
    lo integer := 1;
    hi integer;
BEGIN
    IF p_as_of IS NULL THEN
        RAISE EXCEPTION 'finalize_invoices: as_of must not be null' USING ERRCODE = '22004';
    END IF;
    -- never a period that ends after now() - grace, whatever as_of says
    -- (a future or infinite as_of would finalize periods still open)
    cutoff := LEAST(p_as_of, pg_catalog.now()) - billing._grace_period();
    -- on Citus these statements may not call functions that read the
    -- shards: the same invoices, one period at a time (_finalize_citus)
    IF billing._citus_table_kind('billing.invoices') IS NOT NULL THEN
        RETURN QUERY SELECT * FROM billing._finalize_citus(cutoff);
        RETURN;
    END IF;
    SELECT array_agg(DISTINCT s.account_id ORDER BY s.account_id) INTO accs
      FROM billing.subscriptions s;
    IF accs IS NULL THEN
        RETURN;
    END IF;

    -- the invoices' audit rows (a trigger deferred to the commit, for
    -- Citus: 70_audit.sql) written at the end of each statement that
    -- writes invoices and their lines
    SET CONSTRAINTS billing.invoices_audit IMMEDIATE;
    FOREACH hi IN ARRAY billing._chunk_ends(accs, p_chunk) LOOP
        batch := accs[lo:hi];
        lo := hi + 1;
        SELECT array_agg(l.account_id ORDER BY l.account_id) INTO chunk
          FROM (SELECT a.account_id FROM billing.accounts a
                 WHERE a.account_id IN (SELECT d.account_id FROM billing._due_periods(cutoff, batch) d)
                 ORDER BY a.account_id
                   FOR NO KEY UPDATE) l;
        CONTINUE WHEN chunk IS NULL;
        -- (a unique violation: under REPEATABLE READ, a concurrent finalize
        -- committed invoices of the chunk that this snapshot does not show)
        BEGIN
        RETURN QUERY
        WITH d AS MATERIALIZED (
            SELECT * FROM billing._due_periods(cutoff, chunk)
        ), due AS (
            SELECT p.*, nextval('billing.invoice_id_seq') AS invoice_id,
                   (row_number() OVER (ORDER BY p.account_id, p.period_start))::integer AS k,
                   row_number() OVER (PARTITION BY p.account_id ORDER BY p.period_start) = 1 AS first_of_account
              FROM (SELECT DISTINCT d.account_id, d.plan, d.currency, d.spend_cap, d.period_start,
                           d.period_end FROM d) p
        ), pa AS (
            SELECT array_agg(due.account_id ORDER BY due.k) AS accounts,
                   array_agg(due.currency ORDER BY due.k) AS currencies,
                   array_agg(due.spend_cap ORDER BY due.k) AS caps,
                   array_agg(due.period_start ORDER BY due.k) AS starts,
                   array_agg(due.period_end ORDER BY due.k) AS ends,
                   array_agg(due.first_of_account ORDER BY due.k) AS firsts
              FROM due
        ), sa AS (
            SELECT array_agg(due.k ORDER BY due.k, d.segment_start) AS idx,
                   array_agg(d.segment_plan ORDER BY due.k, d.segment_start) AS plans,
                   array_agg(d.segment_start ORDER BY due.k, d.segment_start) AS starts,
                   array_agg(d.segment_end ORDER BY due.k, d.segment_start) AS ends
              FROM d JOIN due ON due.account_id = d.account_id AND due.period_start = d.period_start
        ), built AS MATERIALIZED (
            SELECT due.account_id, due.invoice_id, x.*
              FROM pa, sa,
                   LATERAL billing._invoice_build(pa.accounts, pa.currencies, pa.caps, pa.starts, pa.ends,
                                                  pa.firsts, sa.idx, sa.plans, sa.starts, sa.ends,
                                                  false, true) x
                   JOIN due ON due.k = x.idx
        ), new_grants AS MATERIALIZED (
            SELECT b.account_id, b.grant_id AS placeholder,
                   nextval('billing.credit_grant_id_seq') AS grant_id, b.amount, b.effective_at,
                   b.expires_at, b.source_grant
              FROM built b WHERE b.kind = 'grant'
        ), mapped AS (
            SELECT b.*, coalesce(ng.grant_id, b.grant_id) AS real_grant_id
              FROM built b LEFT JOIN new_grants ng
                     ON ng.account_id = b.account_id AND ng.placeholder = b.grant_id
        ), numbered AS (
            SELECT m.*, (row_number() OVER (PARTITION BY m.invoice_id ORDER BY m.ord))::integer AS line_no
              FROM mapped m
             WHERE billing._is_invoice_line(m.kind)
        ), totals AS (
            SELECT n.invoice_id, sum(n.amount) AS total FROM numbered n GROUP BY n.invoice_id
        ), invoices_written AS (
            INSERT INTO billing.invoices (account_id, invoice_id, plan, period_start, period_end,
                                          currency, total)
            SELECT due.account_id, due.invoice_id, due.plan, due.period_start, due.period_end,
                   due.currency, coalesce(t.total, 0)
              FROM due LEFT JOIN totals t ON t.invoice_id = due.invoice_id
            RETURNING billing.invoices.invoice_id, billing.invoices.account_id,
                      billing.invoices.period_start, billing.invoices.period_end,
                      billing.invoices.total
        ), lines_written AS (
            INSERT INTO billing.invoice_lines (account_id, invoice_id, line_no, kind, meter,
                                              description, quantity, amount, unrounded_amount,
                                              charge_id, price, adjustment_id, segment_start,
                                              segment_end, proration, commitment_id, grant_id, dimension)
            SELECT n.account_id, n.invoice_id, n.line_no, n.kind, n.meter, n.description, n.quantity,
                   n.amount, n.unrounded_amount, n.charge_id, n.price, n.adjustment_id,
                   n.segment_start, n.segment_end, n.proration, n.commitment_id, n.real_grant_id,
                   n.dimension
              FROM numbered n
            RETURNING billing.invoice_lines.account_id, billing.invoice_lines.invoice_id,
                      billing.invoice_lines.adjustment_id
        ), grants_written AS (
            INSERT INTO billing.credit_grants (account_id, grant_id, amount, effective_at, expires_at,
                                               priority, applies_to, source, reason, commitment_id,
                                               window_no, rolled_from)
            SELECT ng.account_id, ng.grant_id, ng.amount, ng.effective_at, ng.expires_at, g.priority,
                   g.applies_to, 'rollover', format('rollover of grant %s', g.grant_id),
                   g.commitment_id, g.window_no + 1, g.grant_id
              FROM new_grants ng
                   JOIN billing.credit_grants g
                     ON g.account_id = ng.account_id AND g.grant_id = ng.source_grant
            RETURNING 1
        ), ledger_written AS (
            INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at,
                                               invoice_id)
            SELECT m.account_id,
                   h.seq + row_number() OVER (PARTITION BY m.account_id ORDER BY m.idx, m.ord),
                   m.real_grant_id, billing._ledger_kind(m.kind), m.amount,
                   m.effective_at, CASE WHEN m.kind = 'credit' THEN m.invoice_id END
              FROM mapped m
                   CROSS JOIN LATERAL (SELECT coalesce(max(x.seq), 0) AS seq FROM billing.credit_ledger x
                                        WHERE x.account_id = m.account_id) h
             WHERE billing._ledger_kind(m.kind) IS NOT NULL
            RETURNING 1
        ), carried AS (
            UPDATE billing.adjustments adj SET billed_invoice_id = w.invoice_id
              FROM lines_written w
             WHERE w.adjustment_id IS NOT NULL AND adj.account_id = w.account_id
               AND adj.adjustment_id = w.adjustment_id
            RETURNING 1
        )
        SELECT w.invoice_id, w.account_id, w.period_start, w.period_end, w.total
          FROM invoices_written w
         ORDER BY w.account_id, w.period_start;
        EXCEPTION WHEN unique_violation THEN
            PERFORM billing._retry_if_snapshot('finalize_invoices');
            RAISE;
        END;
    END LOOP;
    SET CONSTRAINTS billing.invoices_audit DEFERRED;
END
$$;
COMMENT ON FUNCTION billing._finalize(timestamptz, integer) IS
    'Internal: the body of finalize_invoices, p_chunk accounts per statement';

/*
 * _finalize_citus: the body of finalize_invoices on Citus, for the periods
 * ended by cutoff.  The single-node body writes every invoice in one
 * statement over _invoice_build, which reads the shards itself; Citus
 * refuses that inside a query over distributed tables.  Here: each
 * account's due periods in order (under the account's row lock), each
 * built by the same _invoice_build in a query over functions only, then
 * written with one statement per table (the rollover grants it creates get
 * their ids before the next period is built, which may draw from them).
 * The account's pending adjustments go on its earliest new invoice, as on
 * one node.
 */
CREATE FUNCTION billing._finalize_citus(cutoff timestamptz)
    RETURNS TABLE (r_invoice_id bigint, r_account_id bigint, r_period_start timestamptz,
                   r_period_end timestamptz, r_total numeric)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    acc bigint;
    per record;
    first boolean;
    inv bigint;
    b billing._invoice_line[];
    ids bigint[];
    l_total numeric;
    seq0 bigint;
BEGIN
    FOR acc IN SELECT DISTINCT d.account_id FROM billing._due_periods(cutoff) d ORDER BY 1 LOOP
        PERFORM 1 FROM billing.accounts a WHERE a.account_id = acc FOR NO KEY UPDATE;
        first := true;
        -- the account's due periods, looked up again under its lock
        FOR per IN
            SELECT d.plan, d.currency, d.spend_cap, d.period_start, d.period_end,
                   array_agg(d.segment_plan ORDER BY d.segment_start) AS plans,
                   array_agg(d.segment_start ORDER BY d.segment_start) AS starts,
                   array_agg(d.segment_end ORDER BY d.segment_start) AS ends
              FROM billing._due_periods(cutoff, ARRAY[acc]) d
             GROUP BY 1, 2, 3, 4, 5
             ORDER BY d.period_start
        LOOP
            inv := nextval('billing.invoice_id_seq');
            b := ARRAY(SELECT x FROM billing._invoice_build(
                           ARRAY[acc], ARRAY[per.currency], ARRAY[per.spend_cap],
                           ARRAY[per.period_start], ARRAY[per.period_end], ARRAY[first],
                           array_fill(1, ARRAY[cardinality(per.plans)]), per.plans, per.starts,
                           per.ends, false, true) x);
            first := false;
            -- ids of the rollover grants (named -1, -2, ... by the build)
            ids := ARRAY(SELECT nextval('billing.credit_grant_id_seq')
                           FROM unnest(b) x WHERE x.kind = 'grant' ORDER BY x.grant_id DESC);
            SELECT coalesce(sum(x.amount), 0) INTO l_total FROM unnest(b) x
             WHERE billing._is_invoice_line(x.kind);
            INSERT INTO billing.invoices (account_id, invoice_id, plan, period_start, period_end,
                                          currency, total)
            VALUES (acc, inv, per.plan, per.period_start, per.period_end, per.currency, l_total);
            INSERT INTO billing.invoice_lines (account_id, invoice_id, line_no, kind, meter,
                                              description, quantity, amount, unrounded_amount,
                                              charge_id, price, adjustment_id, segment_start,
                                              segment_end, proration, commitment_id, grant_id,
                                              dimension)
            SELECT acc, inv, (row_number() OVER (ORDER BY x.ord))::integer, x.kind, x.meter,
                   x.description, x.quantity, x.amount, x.unrounded_amount, x.charge_id, x.price,
                   x.adjustment_id, x.segment_start, x.segment_end, x.proration, x.commitment_id,
                   CASE WHEN x.grant_id < 0 THEN ids[-x.grant_id] ELSE x.grant_id END, x.dimension
              FROM unnest(b) x
             WHERE billing._is_invoice_line(x.kind);
            INSERT INTO billing.credit_grants (account_id, grant_id, amount, effective_at, expires_at,
                                               priority, applies_to, source, reason, commitment_id,
                                               window_no, rolled_from)
            SELECT acc, ids[-x.grant_id], x.amount, x.effective_at, x.expires_at, g.priority,
                   g.applies_to, 'rollover', format('rollover of grant %s', g.grant_id),
                   g.commitment_id, g.window_no + 1, g.grant_id
              FROM unnest(b) x
                   JOIN billing.credit_grants g ON g.account_id = acc AND g.grant_id = x.source_grant
             WHERE x.kind = 'grant';
            seq0 := billing._ledger_next_seq(acc) - 1;
            INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at,
                                               invoice_id)
            SELECT acc, seq0 + row_number() OVER (ORDER BY x.ord),
                   CASE WHEN x.grant_id < 0 THEN ids[-x.grant_id] ELSE x.grant_id END,
                   billing._ledger_kind(x.kind), x.amount, x.effective_at,
                   CASE WHEN x.kind = 'credit' THEN inv END
              FROM unnest(b) x
             WHERE billing._ledger_kind(x.kind) IS NOT NULL;
            UPDATE billing.adjustments a SET billed_invoice_id = inv
             WHERE a.account_id = acc
               AND a.adjustment_id = ANY (ARRAY(SELECT x.adjustment_id FROM unnest(b) x
                                                 WHERE x.adjustment_id IS NOT NULL));
            r_invoice_id := inv;
            r_account_id := acc;
            r_period_start := per.period_start;
            r_period_end := per.period_end;
            r_total := l_total;
            RETURN NEXT;
        END LOOP;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._finalize_citus(timestamptz) IS
    'Internal: finalize_invoices on Citus, one period at a time';

CREATE FUNCTION billing.finalize_invoices(as_of timestamptz DEFAULT pg_catalog.now())
    RETURNS TABLE (invoice_id bigint, account_id bigint, period_start timestamptz,
                   period_end timestamptz, total numeric)
    LANGUAGE sql
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT * FROM billing._finalize($1)
$$;
COMMENT ON FUNCTION billing.finalize_invoices(timestamptz) IS
    'Finalizes every billing period that ended at or before as_of - billing.grace_period and has no invoice; idempotent';

-- remaining -------------------------------------------------------------------------------

/*
 * remaining: whole units of a meter that can still be used in the current
 * period before the usage lines would exceed the subscription's spend cap.
 * The units are of one dimension (argument dimension, by default '', the
 * dimension of reports that name none): they are rated by the line of the
 * charge naming that dimension, else by the meter's line of dimension NULL
 * (matrix charges, issue 18; without them the meter has one line).
 * Rating is non-decreasing within each tier of a price (and across tiers,
 * except volume prices, which can get cheaper past a tier bound), so the
 * search walks the tier bounds in order (in raw units: a per modifier
 * moves them, see below) and bisects inside the first stretch whose last
 * whole unit breaks the budget: the answer is the first point where one
 * more unit would be over the cap.
 */
CREATE FUNCTION billing._fits(p billing.price, q numeric, currency text, budget numeric)
    RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT billing.round_money(billing.rate(p, q), currency) <= budget
$$;
COMMENT ON FUNCTION billing._fits(billing.price, numeric, text, numeric) IS
    'Internal: does the rounded charge for q stay within budget?';

CREATE FUNCTION billing.remaining(account_id bigint, meter text,
                                  at timestamptz DEFAULT pg_catalog.now(),
                                  dimension text DEFAULT '')
    RETURNS numeric
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    per record;
    line record;
    lines billing._invoice_line[];
    others numeric;
    budget numeric;
    q0 numeric;
    j jsonb;
    ends numeric[];
    seg_end numeric;
    lo numeric := 0;          -- largest x known to fit
    hi numeric;               -- smallest x known not to fit
    mid numeric;
    tail numeric;             -- past it, the charge is affine in x
    b_at timestamptz;         -- the start of the meter's bucket holding at
BEGIN
    IF account_id IS NULL OR meter IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'remaining: account_id, meter and at must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.accounts a WHERE a.account_id = remaining.account_id) THEN
        RAISE EXCEPTION 'account % does not exist', remaining.account_id USING ERRCODE = '23503';
    END IF;
    -- the start of the meter's bucket holding at (used below)
    SELECT billing._bin(m.bucket_width, at) INTO b_at FROM billing.meters m
     WHERE m.meter = remaining.meter;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'meter "%" does not exist', remaining.meter USING ERRCODE = '23503';
    END IF;
    -- the period holding at, whose spend cap bounds the usage lines of
    -- every plan segment (credits do not count: the cap bounds usage before)
    SELECT s.spend_cap, s.currency INTO per
      FROM billing._segments(ARRAY[remaining.account_id], ARRAY[at]) s
     ORDER BY s.segment_start DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN 0;                 -- no subscription: nothing can be billed
    END IF;
    IF per.spend_cap IS NULL THEN
        RETURN NULL;              -- no cap: unlimited
    END IF;
    lines := ARRAY(SELECT b.line
                     FROM billing._period_build(ARRAY[remaining.account_id], ARRAY[at], true) b
                    WHERE (b.line).kind = 'usage');
    -- the line rating the dimension in the plan segment that bills the
    -- bucket holding at (the charge naming it, else the rest of the
    -- meter): a bucket starting before a plan change is the old plan's
    SELECT x.quantity, x.price, x.ord INTO line
      FROM unnest(lines) x
     WHERE x.meter = remaining.meter
       AND (x.dimension = coalesce(remaining.dimension, '') OR x.dimension IS NULL)
       AND (x.segment_start IS NULL OR (x.segment_start <= b_at AND b_at < x.segment_end))
     ORDER BY x.dimension IS NULL
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;              -- the plan does not bill this meter (or dimension)
    END IF;
    SELECT coalesce(sum(x.amount), 0) INTO others FROM unnest(lines) x WHERE x.ord <> line.ord;
    budget := billing.round_money(per.spend_cap, per.currency) - others;
    q0 := line.quantity;
    IF NOT billing._fits(line.price, q0, per.currency, budget) THEN
        RETURN 0;
    END IF;

    -- stretches on which the charge cannot decrease: volume tiers, then the
    -- rest.  A tier ends where the quantity after per and free passes its
    -- bound b: at (b + free) * N for per N exact (or no per), at
    -- floor(b + free) * N for round up; for round down the stretch is open
    -- at (floor(b + free) + 1) * N, so it ends at the last whole unit from
    -- q0 before that.
    j := billing.price_to_jsonb(line.price);
    IF j ->> 'model' = 'volume' THEN
        SELECT array_agg(CASE WHEN NOT j ? 'per' OR j ->> 'per_round' = 'exact'
                                  THEN (b + f) * coalesce((j ->> 'per')::numeric, 1)
                              WHEN j ->> 'per_round' = 'up'
                                  THEN floor(b + f) * (j ->> 'per')::numeric
                              ELSE q0 + ceil((floor(b + f) + 1) * (j ->> 'per')::numeric - q0) - 1
                         END ORDER BY b)
          INTO ends
          FROM jsonb_array_elements(j -> 'tiers') t,
               LATERAL (SELECT (t ->> 'up_to')::numeric AS b,
                               coalesce((j ->> 'free')::numeric, 0) AS f) x
         WHERE t ->> 'up_to' <> 'inf';
    END IF;
    -- Whole units from q0 only: in each stretch, its last whole unit; when
    -- that is over the budget, the answer is in this stretch, where the
    -- charge cannot decrease, so bisect (lo, hi]; else go on to the next.
    FOREACH seg_end IN ARRAY coalesce(ends, '{}'::numeric[]) LOOP
        CONTINUE WHEN floor(seg_end - q0) <= lo;
        IF billing._fits(line.price, q0 + floor(seg_end - q0), per.currency, budget) THEN
            lo := floor(seg_end - q0);
        ELSE
            hi := floor(seg_end - q0);
            EXIT;
        END IF;
    END LOOP;
    IF hi IS NULL THEN
        -- open-ended: double until over the budget, however large it is.
        -- Every point where the charge bends (a tier bound, the free units,
        -- a package size, where a minimum stops applying: at most the
        -- largest number K of the price over its smallest rate, 10^-22 a
        -- unit; times a quantity divisor) lies below tail.  Past it the
        -- charge is affine in the quantity (or a staircase of steps shorter
        -- than tail): the same at x and 2x there, it never grows again.
        SELECT (1 + coalesce(max(n[1]::numeric), 0)) ^ 2 * 1e24 INTO tail
          FROM regexp_matches(billing.price_to_jsonb(line.price)::text, '([0-9]+(\.[0-9]+)?)', 'g') AS n;
        hi := greatest(lo * 2, 1);
        WHILE billing._fits(line.price, q0 + hi, per.currency, budget) LOOP
            IF lo > tail AND billing.rate(line.price, q0 + hi) = billing.rate(line.price, q0 + lo) THEN
                RETURN NULL;      -- the charge stopped growing below the budget
            END IF;
            lo := hi;
            hi := hi * 2;
        END LOOP;
    END IF;
    WHILE hi - lo > 1 LOOP
        mid := floor((lo + hi) / 2);
        IF billing._fits(line.price, q0 + mid, per.currency, budget) THEN
            lo := mid;
        ELSE
            hi := mid;
        END IF;
    END LOOP;
    RETURN lo;
END
$$;
COMMENT ON FUNCTION billing.remaining(bigint, text, timestamptz, text) IS
    'Whole units of a meter (of one dimension, by default '''') that can still be used this period before the usage lines (of every plan segment) exceed the spend cap (NULL: unlimited)';
