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

SELECT pg_catalog.pg_extension_config_dump('billing.invoices', '');
SELECT pg_catalog.pg_extension_config_dump('billing.invoice_lines', '');
SELECT pg_catalog.pg_extension_config_dump('billing.adjustments', '');
SELECT pg_catalog.pg_extension_config_dump('billing.invoice_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.adjustment_id_seq', '');

-- immutability ----------------------------------------------------------------------

CREATE FUNCTION billing._immutable() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RAISE EXCEPTION '% of % is not allowed', lower(TG_OP), TG_TABLE_NAME
        USING ERRCODE = '55000',
              DETAIL = 'Finalized invoices and their lines never change.',
              HINT = 'Corrections are billed as adjustments on a later invoice (billing.rerate).';
END
$$;
COMMENT ON FUNCTION billing._immutable() IS
    'Internal: refuses UPDATE, DELETE and TRUNCATE of finalized invoices';
CREATE TRIGGER invoices_immutable BEFORE UPDATE OR DELETE ON billing.invoices
    FOR EACH ROW EXECUTE FUNCTION billing._immutable();
CREATE TRIGGER invoices_no_truncate BEFORE TRUNCATE ON billing.invoices
    FOR EACH STATEMENT EXECUTE FUNCTION billing._immutable();
CREATE TRIGGER invoice_lines_immutable BEFORE UPDATE OR DELETE ON billing.invoice_lines
    FOR EACH ROW EXECUTE FUNCTION billing._immutable();
CREATE TRIGGER invoice_lines_no_truncate BEFORE TRUNCATE ON billing.invoice_lines
    FOR EACH STATEMENT EXECUTE FUNCTION billing._immutable();

CREATE FUNCTION billing._charges_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN IF billing._in_citus_task() THEN RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END; END IF;  -- Citus: see _in_citus_task
    IF EXISTS (SELECT 1 FROM billing.invoice_lines l WHERE l.charge_id = OLD.charge_id) THEN
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
 * _rate_period: the lines of one billing period of an account on a plan, in
 * invoice order (fixed fees, usage by meter, the spend cap), amounts rounded
 * per line to the currency's minor unit.
 */
CREATE FUNCTION billing._rate_period(p_account bigint, p_plan text, p_currency text,
                                     p_cap numeric, p_start timestamptz, p_end timestamptz)
    RETURNS TABLE (ord integer, kind text, meter text, description text, quantity numeric,
                   amount numeric, unrounded_amount numeric, charge_id bigint,
                   price billing.price)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN QUERY
    WITH versions AS (
        SELECT DISTINCT ON (c.meter, CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END)
               c.charge_id, c.meter, c.description, c.price
          FROM billing.charges c
         WHERE c.plan = p_plan AND c.valid_from <= p_start
         ORDER BY c.meter, CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END,
                  c.valid_from DESC
    ), totals AS (
        SELECT t.meter, t.quantity FROM billing._usage_totals(p_account, p_start, p_end) t
    ), rated AS (
        SELECT CASE WHEN v.meter IS NULL THEN 1 ELSE 2 END AS grp,
               CASE WHEN v.meter IS NULL THEN 'fixed' ELSE 'usage' END AS kind,
               v.meter::text AS meter,
               coalesce(v.description, v.meter) AS description,
               CASE WHEN v.meter IS NULL THEN NULL ELSE coalesce(t.quantity, 0) END AS quantity,
               billing.rate(v.price, CASE WHEN v.meter IS NULL THEN 0 ELSE coalesce(t.quantity, 0) END)
                   AS unrounded_amount,
               v.charge_id, v.price
          FROM versions v LEFT JOIN totals t ON t.meter = v.meter
    ), lines AS (
        SELECT r.*, billing.round_money(r.unrounded_amount, p_currency) AS amount FROM rated r
    ), capped AS (
        SELECT 3 AS grp, 'cap'::text AS kind, NULL::text AS meter, 'spend cap'::text AS description,
               NULL::numeric AS quantity, NULL::numeric AS unrounded_amount, NULL::bigint AS charge_id,
               NULL::billing.price AS price,
               billing.round_money(p_cap, p_currency) - sum(l.amount) AS amount
          FROM lines l
         WHERE l.kind = 'usage' AND p_cap IS NOT NULL
        HAVING sum(l.amount) > billing.round_money(p_cap, p_currency)
    )
    SELECT (row_number() OVER (ORDER BY x.grp, x.description, x.meter))::integer, x.kind, x.meter,
           x.description, x.quantity, x.amount, x.unrounded_amount, x.charge_id, x.price
      FROM (SELECT l.grp, l.kind, l.meter, l.description, l.quantity, l.amount, l.unrounded_amount,
                   l.charge_id, l.price
              FROM lines l
            UNION ALL
            SELECT c.grp, c.kind, c.meter, c.description, c.quantity, c.amount, c.unrounded_amount,
                   c.charge_id, c.price
              FROM capped c) x;
END
$$;
COMMENT ON FUNCTION billing._rate_period(bigint, text, text, numeric, timestamptz, timestamptz) IS
    'Internal: the rated lines of one billing period (fixed fees, usage, spend cap)';

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

-- pending adjustments of an account, as invoice lines
CREATE FUNCTION billing._pending_adjustments(p_account bigint)
    RETURNS TABLE (adjustment_id bigint, meter text, description text, quantity numeric,
                   amount numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    -- PL/pgSQL, not SQL: Citus routes the query by p_account's value
    RETURN QUERY
    SELECT a.adjustment_id, a.meter::text,
           format('%s (invoice %s): %s', coalesce(a.description, a.line_kind), a.invoice_id,
                  a.reason),
           a.new_quantity - a.old_quantity, a.delta
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
                   r_quantity numeric, r_amount numeric)
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
        SELECT r.ord::bigint AS ord, r.kind, r.meter, r.description, r.quantity, r.amount
          FROM billing._rate_period(p_account, p.plan, p.currency, p.spend_cap,
                                    p.period_start, p.period_end) r
        UNION ALL
        SELECT 1000000 + row_number() OVER (ORDER BY a.adjustment_id), 'adjustment', a.meter,
               a.description, a.quantity, a.amount
          FROM billing._pending_adjustments(p_account) a
    )
    SELECT (row_number() OVER (ORDER BY l.ord))::integer, l.kind, l.meter, l.description,
           p.period_start, p.period_end, l.quantity, l.amount
      FROM lines l
     ORDER BY l.ord;
END
$$;
COMMENT ON FUNCTION billing._invoice_preview(bigint, timestamptz) IS 'Internal: the body of invoice_preview';

CREATE FUNCTION billing.invoice_preview(account_id bigint, at timestamptz DEFAULT pg_catalog.now())
    RETURNS TABLE (line_no int, kind text, meter text, description text,
                   period_start timestamptz, period_end timestamptz,
                   quantity numeric, amount numeric)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT * FROM billing._invoice_preview($1, $2)
$$;
COMMENT ON FUNCTION billing.invoice_preview(bigint, timestamptz) IS
    'The bill of the period holding at, as it stands: every line rounded to the currency''s minor unit, the spend cap, pending adjustments';

-- finalization ----------------------------------------------------------------------------

CREATE FUNCTION billing._grace_period() RETURNS interval
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(nullif(current_setting('billing.grace_period', true), ''), '1h')::interval
$$;
COMMENT ON FUNCTION billing._grace_period() IS 'Internal: the billing.grace_period GUC as an interval';

/*
 * _finalize_period: write the invoice of one period of an account, unless
 * it exists.  The caller holds the account's finalization lock.
 */
CREATE FUNCTION billing._finalize_period(p_account bigint, p_plan text, p_currency text,
                                         p_cap numeric, p_start timestamptz, p_end timestamptz)
    RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    inv bigint;
    l_no integer[];
    l_kind text[];
    l_meter text[];
    l_description text[];
    l_quantity numeric[];
    l_amount numeric[];
    l_unrounded numeric[];
    l_charge bigint[];
    l_price billing.price[];
    l_adjustment bigint[];
    l_total numeric;
BEGIN
    IF EXISTS (SELECT 1 FROM billing.invoices i
                WHERE i.account_id = p_account AND i.period_start = p_start) THEN
        RETURN NULL;
    END IF;
    inv := nextval('billing.invoice_id_seq');
    -- the lines first, into arrays; then the invoice with its total, its
    -- lines and the adjustments carried, one statement each (on Citus a
    -- statement that writes distributed tables may not also call functions
    -- that read them, nor hold a subquery in VALUES)
    SELECT coalesce(array_agg(n.line_no ORDER BY n.line_no), '{}'),
           array_agg(n.kind ORDER BY n.line_no), array_agg(n.meter ORDER BY n.line_no),
           array_agg(n.description ORDER BY n.line_no), array_agg(n.quantity ORDER BY n.line_no),
           array_agg(n.amount ORDER BY n.line_no), array_agg(n.unrounded_amount ORDER BY n.line_no),
           array_agg(n.charge_id ORDER BY n.line_no), array_agg(n.price ORDER BY n.line_no),
           array_agg(n.adjustment_id ORDER BY n.line_no), coalesce(sum(n.amount), 0)
      INTO l_no, l_kind, l_meter, l_description, l_quantity, l_amount, l_unrounded,
           l_charge, l_price, l_adjustment, l_total
      FROM (SELECT (row_number() OVER (ORDER BY x.ord))::integer AS line_no, x.*
              FROM (SELECT r.ord::bigint AS ord, r.kind, r.meter, r.description, r.quantity,
                           r.amount, r.unrounded_amount, r.charge_id, r.price,
                           NULL::bigint AS adjustment_id
                      FROM billing._rate_period(p_account, p_plan, p_currency, p_cap, p_start, p_end) r
                    UNION ALL
                    SELECT 1000000 + row_number() OVER (ORDER BY a.adjustment_id), 'adjustment',
                           a.meter, a.description, a.quantity, a.amount, NULL, NULL, NULL,
                           a.adjustment_id
                      FROM billing._pending_adjustments(p_account) a) x) n;
    INSERT INTO billing.invoices (account_id, invoice_id, plan, period_start, period_end,
                                  currency, total)
    VALUES (p_account, inv, p_plan, p_start, p_end, p_currency, l_total);
    INSERT INTO billing.invoice_lines (account_id, invoice_id, line_no, kind, meter,
                                      description, quantity, amount, unrounded_amount,
                                      charge_id, price, adjustment_id)
    SELECT p_account, inv, u.*
      FROM unnest(l_no, l_kind, l_meter, l_description, l_quantity, l_amount, l_unrounded,
                  l_charge, l_price, l_adjustment) u;
    UPDATE billing.adjustments a SET billed_invoice_id = inv
     WHERE a.account_id = p_account AND a.adjustment_id = ANY (l_adjustment);
    RETURN inv;
END
$$;
COMMENT ON FUNCTION billing._finalize_period(bigint, text, text, numeric, timestamptz, timestamptz) IS
    'Internal: writes the invoice and lines of one period (with pending adjustments) unless it exists';

CREATE FUNCTION billing.finalize_invoices(as_of timestamptz DEFAULT pg_catalog.now())
    RETURNS TABLE (invoice_id bigint, account_id bigint, period_start timestamptz,
                   period_end timestamptz, total numeric)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    cutoff timestamptz;
    s record;
    per record;
    inv bigint;
BEGIN
    IF as_of IS NULL THEN
        RAISE EXCEPTION 'finalize_invoices: as_of must not be null' USING ERRCODE = '22004';
    END IF;
    cutoff := as_of - billing._grace_period();
    FOR s IN
        SELECT sub.account_id, sub.plan, sub.starts_at, sub.ends_at, sub.spend_cap,
               p.period, p.currency
          FROM billing.subscriptions sub JOIN billing.plans p ON p.plan = sub.plan
         WHERE sub.starts_at < cutoff
         ORDER BY sub.account_id, sub.starts_at
    LOOP
        FOR per IN
            SELECT ps, pe
              FROM generate_series(0,
                       CASE WHEN s.ends_at IS NOT NULL AND s.ends_at <= cutoff
                            THEN billing._period_index(s.starts_at, s.period, s.ends_at - interval '1 microsecond')
                            ELSE billing._period_index(s.starts_at, s.period, cutoff) - 1 END) AS n,
                   LATERAL (SELECT billing._add_periods(s.starts_at, s.period, n) AS ps,
                                   LEAST(billing._add_periods(s.starts_at, s.period, n + 1), s.ends_at) AS pe) b
             WHERE pe <= cutoff
               AND NOT EXISTS (SELECT 1 FROM billing.invoices i
                                WHERE i.account_id = s.account_id AND i.period_start = b.ps)
             ORDER BY n
        LOOP
            -- one finalizer per account at a time, re-checked under the lock
            -- (a row lock: no lock table entry per account)
            PERFORM 1 FROM billing.accounts a WHERE a.account_id = s.account_id FOR NO KEY UPDATE;
            inv := billing._finalize_period(s.account_id, s.plan, s.currency, s.spend_cap,
                                            per.ps, per.pe);
            IF inv IS NOT NULL THEN
                invoice_id := inv;
                account_id := s.account_id;
                period_start := per.ps;
                period_end := per.pe;
                SELECT i.total INTO total FROM billing.invoices i
                 WHERE i.account_id = s.account_id AND i.invoice_id = inv;
                RETURN NEXT;
            END IF;
        END LOOP;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing.finalize_invoices(timestamptz) IS
    'Finalizes every billing period that ended at or before as_of - billing.grace_period and has no invoice; idempotent';

-- remaining -------------------------------------------------------------------------------

/*
 * remaining: whole units of a meter that can still be used in the current
 * period before the usage lines would exceed the subscription's spend cap.
 * Rating is non-decreasing within each tier of a price (and across tiers,
 * except volume prices, which can get cheaper past a tier bound), so the
 * search walks the tier bounds in order and bisects inside the first
 * stretch that breaks the budget: the answer is the first point where one
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
                                  at timestamptz DEFAULT pg_catalog.now())
    RETURNS numeric
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    per record;
    line record;
    others numeric;
    budget numeric;
    q0 numeric;
    ends numeric[];
    seg_end numeric;
    lo numeric := 0;          -- largest x known to fit
    hi numeric;               -- smallest x known not to fit
    mid numeric;
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

    SELECT l.quantity, l.price, l.amount INTO line
      FROM billing._rate_period(remaining.account_id, per.plan, per.currency, per.spend_cap,
                                per.period_start, per.period_end) l
     WHERE l.kind = 'usage' AND l.meter = remaining.meter;
    IF NOT FOUND THEN
        RETURN NULL;              -- the plan does not bill this meter
    END IF;
    SELECT coalesce(sum(l.amount), 0) INTO others
      FROM billing._rate_period(remaining.account_id, per.plan, per.currency, per.spend_cap,
                                per.period_start, per.period_end) l
     WHERE l.kind = 'usage' AND l.meter <> remaining.meter;
    budget := billing.round_money(per.spend_cap, per.currency) - others;
    q0 := line.quantity;
    IF NOT billing._fits(line.price, q0, per.currency, budget) THEN
        RETURN 0;
    END IF;

    -- stretches on which the charge cannot decrease: volume tiers, then the rest
    IF billing.price_to_jsonb(line.price) ->> 'model' = 'volume' THEN
        SELECT array_agg((t ->> 'up_to')::numeric
                         + coalesce((billing.price_to_jsonb(line.price) ->> 'free')::numeric, 0)
                         ORDER BY (t ->> 'up_to')::numeric)
          INTO ends
          FROM jsonb_array_elements(billing.price_to_jsonb(line.price) -> 'tiers') t
         WHERE t ->> 'up_to' <> 'inf';
    END IF;
    FOREACH seg_end IN ARRAY coalesce(ends, '{}'::numeric[]) LOOP
        CONTINUE WHEN seg_end <= q0 + lo;
        IF billing._fits(line.price, seg_end, per.currency, budget) THEN
            lo := floor(seg_end - q0);
        ELSE
            hi := ceil(seg_end - q0);
            IF billing._fits(line.price, q0 + hi, per.currency, budget) THEN
                lo := hi;         -- seg_end was fractional: the next whole unit still fits
                hi := NULL;
            END IF;
            EXIT;
        END IF;
    END LOOP;
    IF hi IS NULL THEN
        -- open-ended: double until over the budget (or give up: never over it)
        hi := greatest(lo * 2, 1);
        WHILE billing._fits(line.price, q0 + hi, per.currency, budget) LOOP
            lo := hi;
            IF hi > 1e30 THEN
                RETURN NULL;      -- capped price: the budget is never exceeded
            END IF;
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
COMMENT ON FUNCTION billing.remaining(bigint, text, timestamptz) IS
    'Whole units of a meter that can still be used this period before the usage lines exceed the spend cap (NULL: unlimited)';
