/*
 * Plans, charges and subscriptions (SPEC section 2), with the triggers that
 * guard them, and billing periods.
 */

CREATE TABLE billing.plans (
    plan      text COLLATE "C" PRIMARY KEY CHECK (plan <> ''),
    period    interval NOT NULL DEFAULT '1 month'
              CHECK (period > interval '0'
                     AND (pg_catalog.date_part('month', period) = 0
                          AND pg_catalog.date_part('year', period) = 0
                          OR pg_catalog.date_part('day', period) = 0
                             AND pg_catalog.date_trunc('day', period) = period)),
    currency  text NOT NULL DEFAULT 'USD'
              CHECK (currency ~ '^[A-Z]{3}$' AND COALESCE(billing.currency_exponent(currency), -1) >= 0)
);
COMMENT ON TABLE billing.plans IS
    'Price plans: a billing period (whole months, or days and time) and a currency';

CREATE FUNCTION billing._plans_check() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    -- on Citus each node's copy checks the subscriptions of that node (_exists_here)
    IF (NEW.currency IS DISTINCT FROM OLD.currency OR NEW.period IS DISTINCT FROM OLD.period)
       AND billing._exists_here('billing.subscriptions', 'x.plan = $1', OLD.plan::text) THEN
        RAISE EXCEPTION 'plan "%" has subscriptions', OLD.plan
            USING ERRCODE = '55000',
                  DETAIL = 'Its currency and period cannot change; create a new plan instead.';
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION billing._plans_check() IS
    'Internal: a plan in use keeps its currency and period';
CREATE TRIGGER plans_check BEFORE UPDATE ON billing.plans
    FOR EACH ROW EXECUTE FUNCTION billing._plans_check();

CREATE TABLE billing.charges (
    charge_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    plan         text COLLATE "C" NOT NULL REFERENCES billing.plans ON UPDATE CASCADE,
    meter        text COLLATE "C" NULL REFERENCES billing.meters,
    price        billing.price NOT NULL,
    valid_from   timestamptz NOT NULL DEFAULT '-infinity',
    description  text,
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- matrix pricing (issue 18): a charge with a dimension rates only the
    -- usage of its meter with that dimension; NULL rates the dimensions no
    -- other charge of the (plan, meter) names.  A fixed fee has none.
    dimension    text COLLATE "C" NULL,
    CONSTRAINT charges_dimension_check
        CHECK (dimension IS NULL OR (meter IS NOT NULL AND pg_catalog.octet_length(dimension) <= 256))
);
-- a usage charge is identified by (plan, meter, dimension), NULL being one
-- value (the rest), a fixed fee by (plan, description)
CREATE UNIQUE INDEX charges_usage_version ON billing.charges (plan, meter, dimension, valid_from)
    NULLS NOT DISTINCT WHERE meter IS NOT NULL;
CREATE UNIQUE INDEX charges_fixed_version
    ON billing.charges (plan, (COALESCE(description, '')), valid_from)
    WHERE meter IS NULL;
COMMENT ON TABLE billing.charges IS
    'Charges of a plan, versioned by valid_from per (plan, meter, dimension): the version in force at a period''s start rates the whole period; a NULL meter is a fixed fee per period (rated with quantity 0); a dimension rates only that dimension''s usage of the meter, NULL the dimensions no other charge names';

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

CREATE TABLE billing.subscriptions (
    account_id  bigint NOT NULL REFERENCES billing.accounts,
    plan        text COLLATE "C" NOT NULL REFERENCES billing.plans ON UPDATE CASCADE,
    starts_at   timestamptz NOT NULL CHECK (pg_catalog.isfinite(starts_at)),
    ends_at     timestamptz NULL,
    spend_cap   numeric NULL CHECK (spend_cap >= 0 AND spend_cap < 'Infinity'),
    PRIMARY KEY (account_id, starts_at),
    CHECK (ends_at > starts_at)
);
COMMENT ON TABLE billing.subscriptions IS
    'An account on a plan from starts_at to ends_at; periods run [starts_at + n*period, starts_at + (n+1)*period) cut at ends_at; spend_cap caps the usage lines of each period';

CREATE FUNCTION billing._subscriptions_check() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    acc_currency text;
    plan_currency text;
    per interval;
    anchor timestamptz;
    n integer;
    gs timestamptz;
    k integer;
BEGIN
    SELECT a.currency INTO acc_currency FROM billing.accounts a WHERE a.account_id = NEW.account_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account % does not exist', NEW.account_id USING ERRCODE = '23503';
    END IF;
    SELECT p.currency INTO plan_currency FROM billing.plans p WHERE p.plan = NEW.plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'plan "%" does not exist', NEW.plan USING ERRCODE = '23503';
    END IF;
    IF acc_currency IS DISTINCT FROM plan_currency THEN
        RAISE EXCEPTION 'plan "%" bills in %, account % in %', NEW.plan, plan_currency,
              NEW.account_id, acc_currency
            USING ERRCODE = '22023',
                  HINT = 'Subscribe the account to a plan in its own currency.';
    END IF;
    -- changes to an account's subscriptions one at a time (a row lock: no
    -- lock table entry, however many accounts one statement touches)
    PERFORM 1 FROM billing.accounts a WHERE a.account_id = NEW.account_id FOR NO KEY UPDATE;
    IF EXISTS (SELECT 1 FROM billing.subscriptions s
                WHERE s.account_id = NEW.account_id
                  AND (TG_OP = 'INSERT' OR s.starts_at <> OLD.starts_at)
                  AND s.starts_at < coalesce(NEW.ends_at, 'infinity')
                  AND NEW.starts_at < coalesce(s.ends_at, 'infinity')) THEN
        RAISE EXCEPTION 'subscription of account % from % overlaps another', NEW.account_id, NEW.starts_at
            USING ERRCODE = '23P01',
                  HINT = 'End the current subscription (ends_at) where the next one starts.';
    END IF;
    IF TG_OP = 'UPDATE' AND (NEW.plan IS DISTINCT FROM OLD.plan OR NEW.starts_at IS DISTINCT FROM OLD.starts_at
                             OR NEW.account_id IS DISTINCT FROM OLD.account_id
                             OR NEW.period_anchor IS DISTINCT FROM OLD.period_anchor)
       AND EXISTS (SELECT 1 FROM billing.invoices i
                    WHERE i.account_id = OLD.account_id AND i.period_start < coalesce(OLD.ends_at, 'infinity')
                      AND i.period_end > OLD.starts_at) THEN
        RAISE EXCEPTION 'subscription of account % from % has finalized invoices', OLD.account_id, OLD.starts_at
            USING ERRCODE = '55000',
                  DETAIL = 'Its plan and start cannot change; its end and spend cap can (re-rate to bill the effect).';
    END IF;
    -- a new start, or a new end, must not add a plan segment to a finalized
    -- period: the grid period holding it (on its own grid) may not be the
    -- grid period of an invoiced subscription (change_plan's pieces of one
    -- period share it).  For an end: of another subscription, and only an
    -- end that reaches into a later grid period than before (a
    -- subscription's own end can move back after invoicing: re-rate to
    -- bill the effect).
    IF isfinite(NEW.starts_at) AND coalesce(isfinite(NEW.period_anchor), true)
       AND coalesce(NEW.period_anchor <= NEW.starts_at, true) THEN
        SELECT p.period INTO per FROM billing.plans p WHERE p.plan = NEW.plan;
        anchor := coalesce(NEW.period_anchor, NEW.starts_at);
        FOR k IN 1..2 LOOP
            IF k = 1 THEN
                CONTINUE WHEN NOT (TG_OP = 'INSERT' OR NEW.starts_at IS DISTINCT FROM OLD.starts_at
                                   OR NEW.period_anchor IS DISTINCT FROM OLD.period_anchor);
                n := billing._period_index(anchor, per, NEW.starts_at);
            ELSE
                -- (an end moved earlier, or within its grid period, adds no segment)
                CONTINUE WHEN NEW.ends_at IS NULL OR NOT isfinite(NEW.ends_at)
                           OR NEW.ends_at <= NEW.starts_at;
                n := billing._period_index(anchor, per, NEW.ends_at - interval '1 microsecond');
                CONTINUE WHEN TG_OP = 'UPDATE'
                          AND (OLD.ends_at IS NULL OR NOT isfinite(OLD.ends_at) OR NEW.ends_at <= OLD.ends_at
                               OR n <= billing._period_index(anchor, per, OLD.ends_at - interval '1 microsecond'));
            END IF;
            gs := billing._add_periods(anchor, per, n);
            IF EXISTS (SELECT 1 FROM billing.invoices i
                            JOIN billing.subscriptions s
                              ON s.account_id = i.account_id AND s.starts_at <= i.period_start
                             AND i.period_start < coalesce(s.ends_at, 'infinity')
                            JOIN billing.plans p ON p.plan = s.plan
                        WHERE i.account_id = NEW.account_id AND i.status = 'finalized'
                          AND i.period_start < billing._add_periods(anchor, per, n + 1)
                          AND i.period_end > gs AND p.period = per
                          AND (k = 1 OR TG_OP = 'INSERT' OR s.starts_at <> OLD.starts_at)
                          AND billing._add_periods(coalesce(s.period_anchor, s.starts_at), per,
                                  billing._period_index(coalesce(s.period_anchor, s.starts_at), per,
                                                        i.period_start)) = gs) THEN
                RAISE EXCEPTION 'the billing period of account % from % is already finalized', NEW.account_id, gs
                    USING ERRCODE = '55000',
                          DETAIL = CASE WHEN k = 1
                                        THEN 'A subscription starting there would add a plan segment to a finalized invoice.'
                                        ELSE 'A subscription ending there would add a plan segment to a finalized invoice.' END;
            END IF;
        END LOOP;
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION billing._subscriptions_check() IS
    'Internal: a subscription''s plan must bill in the account''s currency, subscriptions of an account must not overlap, and none may add a plan segment to a finalized period';
CREATE TRIGGER subscriptions_check BEFORE INSERT OR UPDATE ON billing.subscriptions
    FOR EACH ROW EXECUTE FUNCTION billing._subscriptions_check();

CREATE FUNCTION billing._subscriptions_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM billing.invoices i
                WHERE i.account_id = OLD.account_id AND i.period_start < coalesce(OLD.ends_at, 'infinity')
                  AND i.period_end > OLD.starts_at) THEN
        RAISE EXCEPTION 'subscription of account % from % has finalized invoices', OLD.account_id, OLD.starts_at
            USING ERRCODE = '55000', HINT = 'Set ends_at instead of deleting it.';
    END IF;
    RETURN OLD;
END
$$;
COMMENT ON FUNCTION billing._subscriptions_guard() IS
    'Internal: a subscription that was invoiced cannot be deleted';
CREATE TRIGGER subscriptions_guard BEFORE DELETE ON billing.subscriptions
    FOR EACH ROW EXECUTE FUNCTION billing._subscriptions_guard();

-- billing periods ---------------------------------------------------------------

-- ts + n periods, with month arithmetic in UTC (independent of TimeZone)
CREATE FUNCTION billing._add_periods(ts timestamptz, period interval, n integer)
    RETURNS timestamptz
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT pg_catalog.timezone('UTC', pg_catalog.timezone('UTC', ts) OPERATOR(pg_catalog.+)
                                      (period OPERATOR(pg_catalog.*) n::float8))
$$;
COMMENT ON FUNCTION billing._add_periods(timestamptz, interval, integer) IS
    'Internal: ts plus n billing periods, month arithmetic in UTC';

-- index n of the period [starts_at + n*period, starts_at + (n+1)*period) holding at
CREATE FUNCTION billing._period_index(starts_at timestamptz, period interval, at timestamptz)
    RETURNS integer
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    months integer := (date_part('year', period) * 12 + date_part('month', period))::integer;
    s timestamp := starts_at AT TIME ZONE 'UTC';
    a timestamp := at AT TIME ZONE 'UTC';
    n integer;
BEGIN
    IF months > 0 THEN
        n := floor(((date_part('year', a) - date_part('year', s)) * 12
                    + date_part('month', a) - date_part('month', s)) / months)::integer;
    ELSE
        n := floor(extract(epoch FROM a - s) / extract(epoch FROM period))::integer;
    END IF;
    WHILE billing._add_periods(starts_at, period, n) > at LOOP
        n := n - 1;
    END LOOP;
    WHILE billing._add_periods(starts_at, period, n + 1) <= at LOOP
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION billing._period_index(timestamptz, interval, timestamptz) IS
    'Internal: index of the billing period holding at';
