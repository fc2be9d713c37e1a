/*
 * Invoices (SPEC section 5), pending adjustments, remaining (section 4).
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
    dimension      text COLLATE "C", -- the dimension of a matrix charge's line (issue 18)
    PRIMARY KEY (account_id, invoice_id, line_no),
    FOREIGN KEY (account_id, invoice_id) REFERENCES billing.invoices
);
COMMENT ON TABLE billing.invoice_lines IS
    'Lines of finalized invoices, with the charge version, price and quantity that rated each; immutable';

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
    dimension         text COLLATE "C",      -- the corrected line's (a matrix charge's)
    PRIMARY KEY (account_id, adjustment_id),
    FOREIGN KEY (account_id, invoice_id) REFERENCES billing.invoices
);
COMMENT ON TABLE billing.adjustments IS
    'Corrections of finalized invoices (re-rating); the next invoice of the account carries each as an adjustment line';

SELECT pg_catalog.pg_extension_config_dump('billing.invoices', '');
SELECT pg_catalog.pg_extension_config_dump('billing.invoice_lines', '');
SELECT pg_catalog.pg_extension_config_dump('billing.adjustments', '');
SELECT pg_catalog.pg_extension_config_dump('billing.invoice_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.adjustment_id_seq', '');

-- immutability ----------------------------------------------------------------------

/*
 * _refuse_change: a BEFORE trigger that refuses the statement with 55000,
 * "<op> of <table> is not allowed".  Arguments: the DETAIL, then an
 * optional HINT.  Serves every table that is immutable or append-only.
 */
CREATE FUNCTION billing._refuse_change() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF TG_NARGS > 1 THEN
        RAISE EXCEPTION '% of % is not allowed', lower(TG_OP), TG_TABLE_NAME
            USING ERRCODE = '55000', DETAIL = TG_ARGV[0], HINT = TG_ARGV[1];
    END IF;
    RAISE EXCEPTION '% of % is not allowed', lower(TG_OP), TG_TABLE_NAME
        USING ERRCODE = '55000', DETAIL = TG_ARGV[0];
END
$$;
COMMENT ON FUNCTION billing._refuse_change() IS
    'Internal: refuses UPDATE, DELETE or TRUNCATE of immutable and append-only tables (arguments: detail, hint)';
CREATE TRIGGER invoices_immutable BEFORE UPDATE OR DELETE ON billing.invoices
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change(
        'Finalized invoices and their lines never change.',
        'Corrections are billed as adjustments on a later invoice (billing.rerate).');
CREATE TRIGGER invoices_no_truncate BEFORE TRUNCATE ON billing.invoices
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change(
        'Finalized invoices and their lines never change.',
        'Corrections are billed as adjustments on a later invoice (billing.rerate).');
CREATE TRIGGER invoice_lines_immutable BEFORE UPDATE OR DELETE ON billing.invoice_lines
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change(
        'Finalized invoices and their lines never change.',
        'Corrections are billed as adjustments on a later invoice (billing.rerate).');
CREATE TRIGGER invoice_lines_no_truncate BEFORE TRUNCATE ON billing.invoice_lines
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change(
        'Finalized invoices and their lines never change.',
        'Corrections are billed as adjustments on a later invoice (billing.rerate).');

CREATE FUNCTION billing._charges_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    -- on Citus each node's copy checks the lines of that node (_exists_here)
    IF billing._exists_here('billing.invoice_lines', 'x.charge_id = $1', OLD.charge_id) THEN
        RAISE EXCEPTION 'charge version % rated a finalized invoice', OLD.charge_id
            USING ERRCODE = '55000',
                  HINT = 'Insert a new version with a later (or, to re-rate the past, an earlier) valid_from.';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;
COMMENT ON FUNCTION billing._charges_guard() IS
    'Internal: a charge version that rated a finalized invoice cannot change';
CREATE TRIGGER charges_guard BEFORE UPDATE OR DELETE ON billing.charges
    FOR EACH ROW EXECUTE FUNCTION billing._charges_guard();
CREATE INDEX invoice_lines_charge ON billing.invoice_lines (charge_id) WHERE charge_id IS NOT NULL;

-- rating a period -----------------------------------------------------------------------

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
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
BEGIN
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
               billing.round_money(per.cap, per.currency) - sum(l.amount) AS amount
          FROM per JOIN lines l ON l.idx = per.idx AND l.kind = 'usage'
         WHERE per.cap IS NOT NULL
         GROUP BY per.idx, per.cap, per.currency
        HAVING sum(l.amount) > billing.round_money(per.cap, per.currency)
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

-- the subscription and period of an account holding a moment
CREATE FUNCTION billing._period_at(p_account bigint, p_at timestamptz,
                                   OUT plan text, OUT currency text, OUT spend_cap numeric,
                                   OUT period_start timestamptz, OUT period_end timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    s record;
    n integer;
BEGIN
    SELECT sub.plan, sub.starts_at, sub.ends_at, sub.spend_cap, p.period, p.currency
      INTO s
      FROM billing.subscriptions sub JOIN billing.plans p ON p.plan = sub.plan
     WHERE sub.account_id = p_account AND sub.starts_at <= p_at
       AND (sub.ends_at IS NULL OR p_at < sub.ends_at);
    IF NOT FOUND THEN
        RETURN;
    END IF;
    n := billing._period_index(s.starts_at, s.period, p_at);
    plan := s.plan;
    currency := s.currency;
    spend_cap := s.spend_cap;
    period_start := billing._add_periods(s.starts_at, s.period, n);
    period_end := LEAST(billing._add_periods(s.starts_at, s.period, n + 1), s.ends_at);
END
$$;
COMMENT ON FUNCTION billing._period_at(bigint, timestamptz) IS
    'Internal: plan, currency, spend cap and period bounds of the subscription holding a moment';

-- how an adjustment reads on the invoice that carries it
CREATE FUNCTION billing._adjustment_text(a billing.adjustments) RETURNS text
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT format('%s (invoice %s): %s', coalesce(a.description, a.line_kind), a.invoice_id, a.reason)
$$;
COMMENT ON FUNCTION billing._adjustment_text(billing.adjustments) IS
    'Internal: the description of an adjustment line';

-- pending adjustments of an account, as invoice lines
CREATE FUNCTION billing._pending_adjustments(p_account bigint)
    RETURNS TABLE (adjustment_id bigint, meter text, description text, quantity numeric,
                   amount numeric, dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    -- PL/pgSQL, not SQL: Citus routes the query by p_account's value
    RETURN QUERY
    SELECT a.adjustment_id, a.meter::text,
           -- the row rebuilt as billing.adjustments (on Citus a is a shard's row)
           billing._adjustment_text(ROW(a.*)::billing.adjustments),
           a.new_quantity - a.old_quantity, a.delta, a.dimension::text
      FROM billing.adjustments a
     WHERE a.account_id = p_account AND a.billed_invoice_id IS NULL
     ORDER BY a.adjustment_id;
END
$$;
COMMENT ON FUNCTION billing._pending_adjustments(bigint) IS
    'Internal: adjustments of an account not yet carried by an invoice';

CREATE FUNCTION billing._invoice_preview(p_account bigint, p_at timestamptz)
    RETURNS TABLE (r_line_no int, r_kind text, r_meter text, r_description text,
                   r_period_start timestamptz, r_period_end timestamptz,
                   r_quantity numeric, r_amount numeric, r_dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    p record;
BEGIN
    SELECT * INTO p FROM billing._period_at(p_account, p_at);
    IF p.plan IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH lines AS (
        SELECT r.ord::bigint AS ord, r.kind, r.meter, r.description, r.quantity, r.amount,
               r.dimension
          FROM billing._rate_periods(ARRAY[p_account], ARRAY[p.plan], ARRAY[p.currency],
                                     ARRAY[p.spend_cap], ARRAY[p.period_start],
                                     ARRAY[p.period_end]) r
        UNION ALL
        SELECT 1000000 + row_number() OVER (ORDER BY a.adjustment_id), 'adjustment', a.meter,
               a.description, a.quantity, a.amount, a.dimension
          FROM billing._pending_adjustments(p_account) a
    )
    SELECT (row_number() OVER (ORDER BY l.ord))::integer, l.kind, l.meter, l.description,
           p.period_start, p.period_end, l.quantity, l.amount, l.dimension
      FROM lines l
     ORDER BY l.ord;
END
$$;
COMMENT ON FUNCTION billing._invoice_preview(bigint, timestamptz) IS 'Internal: the body of invoice_preview';

CREATE FUNCTION billing.invoice_preview(account_id bigint, at timestamptz DEFAULT pg_catalog.now())
    RETURNS TABLE (line_no int, kind text, meter text, description text,
                   period_start timestamptz, period_end timestamptz,
                   quantity numeric, amount numeric,
                   dimension text)   -- issue 18: last, so that positional clients keep working
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT * FROM billing._invoice_preview($1, $2)
$$;
COMMENT ON FUNCTION billing.invoice_preview(bigint, timestamptz) IS
    'The bill of the period holding at, as it stands: every line rounded to the currency''s minor unit, the spend cap, pending adjustments; a matrix charge''s line carries its dimension';

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
 * _due_periods: the billing periods that ended at or before cutoff and have
 * no invoice, for the accounts given (NULL: all).  Each subscription is
 * walked from the period after its latest invoice.
 */
CREATE FUNCTION billing._due_periods(cutoff timestamptz)
    RETURNS TABLE (account_id bigint, plan text, currency text, spend_cap numeric,
                   period_start timestamptz, period_end timestamptz)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
    WITH subs AS (
        SELECT s.account_id, s.plan, s.starts_at, s.ends_at, s.spend_cap, p.period, p.currency,
               CASE WHEN s.ends_at IS NOT NULL AND s.ends_at <= cutoff
                    THEN billing._period_index(s.starts_at, p.period, s.ends_at - interval '1 microsecond')
                    ELSE billing._period_index(s.starts_at, p.period, cutoff) - 1 END AS last_n,
               (SELECT max(i.period_start) FROM billing.invoices i
                 WHERE i.account_id = s.account_id AND i.period_start >= s.starts_at
                   AND i.period_start < coalesce(s.ends_at, 'infinity')) AS last_invoiced
          FROM billing.subscriptions s JOIN billing.plans p ON p.plan = s.plan
         WHERE s.starts_at < cutoff
    ), periods AS (
        SELECT s.account_id, s.plan, s.currency, s.spend_cap,
               billing._add_periods(s.starts_at, s.period, n) AS ps,
               LEAST(billing._add_periods(s.starts_at, s.period, n + 1), s.ends_at) AS pe
          FROM subs s,
               generate_series(CASE WHEN s.last_invoiced IS NULL THEN 0
                                    ELSE billing._period_index(s.starts_at, s.period, s.last_invoiced) + 1 END,
                               s.last_n) AS n
    )
    SELECT p.account_id, p.plan::text, p.currency, p.spend_cap, p.ps, p.pe
      FROM periods p
     WHERE p.pe <= cutoff
       AND NOT EXISTS (SELECT 1 FROM billing.invoices i
                        WHERE i.account_id = p.account_id AND i.period_start = p.ps)
$$;
COMMENT ON FUNCTION billing._due_periods(timestamptz) IS
    'Internal: billing periods ended by a cutoff that have no invoice yet';

/*
 * finalize_invoices: lock the accounts with due periods (row locks, in
 * account order), look the due periods up again under the locks (a
 * concurrent finalizer may have written some), then write every invoice,
 * its lines and the adjustments it carries in one set-based statement.
 * Each account's pending adjustments go on its earliest new invoice.
 */
CREATE FUNCTION billing._finalize(p_as_of timestamptz)
    RETURNS TABLE (r_invoice_id bigint, r_account_id bigint, r_period_start timestamptz,
                   r_period_end timestamptz, r_total numeric)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
DECLARE
    cutoff timestamptz;
BEGIN
    IF p_as_of IS NULL THEN
        RAISE EXCEPTION 'finalize_invoices: as_of must not be null' USING ERRCODE = '22004';
    END IF;
    -- never a period that ends after now() - grace, whatever as_of says
    -- (a future or infinite as_of would finalize periods still open)
    cutoff := LEAST(p_as_of, pg_catalog.now()) - billing._grace_period();
    -- on Citus these statements may not call functions that read the
    -- shards: the same invoices, one period at a time (90_distribute.sql)
    IF billing._citus_table_kind('billing.invoices') IS NOT NULL THEN
        RETURN QUERY SELECT * FROM billing._finalize_citus(cutoff);
        RETURN;
    END IF;
    PERFORM 1 FROM billing.accounts a
     WHERE a.account_id IN (SELECT d.account_id FROM billing._due_periods(cutoff) d)
     ORDER BY a.account_id
       FOR NO KEY UPDATE;

    RETURN QUERY
    WITH due AS (
        SELECT d.*, nextval('billing.invoice_id_seq') AS invoice_id,
               (row_number() OVER (ORDER BY d.account_id, d.period_start))::integer AS k,
               row_number() OVER (PARTITION BY d.account_id ORDER BY d.period_start) = 1 AS first_of_account
          FROM billing._due_periods(cutoff) d
    ), arrays AS (
        SELECT array_agg(account_id ORDER BY k) AS accounts, array_agg(plan ORDER BY k) AS plans,
               array_agg(currency ORDER BY k) AS currencies, array_agg(spend_cap ORDER BY k) AS caps,
               array_agg(period_start ORDER BY k) AS starts, array_agg(period_end ORDER BY k) AS ends
          FROM due
    ), rated AS (
        SELECT due.account_id, due.invoice_id, r.ord::bigint AS ord, r.kind, r.meter,
               r.description, r.quantity, r.amount, r.unrounded_amount, r.charge_id, r.price,
               NULL::bigint AS adjustment_id, r.dimension
          FROM arrays a,
               LATERAL billing._rate_periods(a.accounts, a.plans, a.currencies, a.caps,
                                             a.starts, a.ends) r
               JOIN due ON due.k = r.idx
        UNION ALL
        SELECT due.account_id, due.invoice_id,
               1000000 + row_number() OVER (PARTITION BY adj.account_id ORDER BY adj.adjustment_id),
               'adjustment', adj.meter,
               billing._adjustment_text(adj),
               adj.new_quantity - adj.old_quantity, adj.delta, NULL, NULL, NULL, adj.adjustment_id,
               adj.dimension::text
          FROM due JOIN billing.adjustments adj
                 ON adj.account_id = due.account_id AND adj.billed_invoice_id IS NULL
         WHERE due.first_of_account
    ), numbered AS (
        SELECT r.*, (row_number() OVER (PARTITION BY r.invoice_id ORDER BY r.ord))::integer AS line_no
          FROM rated r
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
                                          charge_id, price, adjustment_id, dimension)
        SELECT n.account_id, n.invoice_id, n.line_no, n.kind, n.meter, n.description, n.quantity,
               n.amount, n.unrounded_amount, n.charge_id, n.price, n.adjustment_id, n.dimension
          FROM numbered n
        RETURNING billing.invoice_lines.account_id, billing.invoice_lines.invoice_id,
                  billing.invoice_lines.adjustment_id
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
END
$$;
COMMENT ON FUNCTION billing._finalize(timestamptz) IS 'Internal: the body of finalize_invoices';

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
BEGIN
    IF account_id IS NULL OR meter IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'remaining: account_id, meter and at must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.accounts a WHERE a.account_id = remaining.account_id) THEN
        RAISE EXCEPTION 'account % does not exist', remaining.account_id USING ERRCODE = '23503';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.meters m WHERE m.meter = remaining.meter) THEN
        RAISE EXCEPTION 'meter "%" does not exist', remaining.meter USING ERRCODE = '23503';
    END IF;
    SELECT * INTO per FROM billing._period_at(remaining.account_id, at);
    IF per.plan IS NULL THEN
        RETURN 0;                 -- no subscription: nothing can be billed
    END IF;
    IF per.spend_cap IS NULL THEN
        RETURN NULL;              -- no cap: unlimited
    END IF;

    -- the line rating the dimension (the charge naming it, else the rest
    -- of the meter), and the sum of the other usage lines
    SELECT x.quantity, x.price, x.others INTO line
      FROM (SELECT l.meter, l.dimension, l.quantity, l.price,
                   sum(l.amount) OVER () - l.amount AS others
              FROM billing._rate_period(remaining.account_id, per.plan, per.currency,
                                        per.spend_cap, per.period_start, per.period_end) l
             WHERE l.kind = 'usage') x
     WHERE x.meter = remaining.meter
       AND (x.dimension = coalesce(remaining.dimension, '') OR x.dimension IS NULL)
     ORDER BY x.dimension IS NULL
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;              -- the plan does not bill this meter (or dimension)
    END IF;
    others := line.others;
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
    'Whole units of a meter (of one dimension, by default '''') that can still be used this period before the usage lines exceed the spend cap (NULL: unlimited)';
