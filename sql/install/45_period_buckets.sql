/*
 * The buckets of a billing period (issue 13, SPEC section 10.5): which
 * buckets each period bills, so that every bucket inside a subscription's
 * span is billed exactly once, and the rule that a plan's period is a whole
 * multiple of the bucket width of every meter it charges.  The rule itself
 * is C (src/periods.c); billing._rate_periods, through which every path
 * that computes a period's usage goes (invoice_preview, finalize_invoices,
 * rerate, remaining, on one node and on Citus), asks the usage store for
 * the buckets starting in [_period_first_bucket(...), period end) of each
 * period and meter.
 */

CREATE FUNCTION billing._period_first_bucket(period_start timestamptz, usage_from timestamptz,
                                             bucket_width interval)
    RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'billing_period_first_bucket'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._period_first_bucket(timestamptz, timestamptz, interval) IS
    'Internal: the first bucket start a billing period bills for a meter of this bucket width: the start of the bucket holding period_start when that is at or after usage_from, else period_start (src/periods.c)';

CREATE FUNCTION billing._period_fits_width(period interval, bucket_width interval)
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_period_fits_width'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._period_fits_width(interval, interval) IS
    'Internal: is a plan''s period a whole multiple of a bucket width (a period of months: the width divides a day)?';

/*
 * _period_usage_from: for each (account, period start) given, how far back
 * the period may reach for usage (the usage_from of src/periods.c): the
 * period start itself, unless the period is the first of a subscription
 * (it starts at the subscription's starts_at); then the end of the
 * account's previous subscription, or -infinity when there is none, so
 * that the first period bills the bucket straddling the subscription's
 * start unless the previous subscription's last period holds that
 * bucket's start.  PL/pgSQL: on Citus one router query per period.
 */
CREATE FUNCTION billing._period_usage_from(p_accounts bigint[], p_starts timestamptz[])
    RETURNS TABLE (idx integer, usage_from timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- one plan for every call: a custom plan (the arrays' lengths known)
    -- always looked cheaper, so each invoice preview planned it again
    SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    acc bigint;
    ps timestamptz;
BEGIN
    IF billing._citus_table_kind('billing.subscriptions') IS NOT NULL THEN
        FOR i IN 1 .. coalesce(array_length(p_accounts, 1), 0) LOOP
            acc := p_accounts[i];
            ps := p_starts[i];
            idx := i;
            SELECT CASE WHEN bool_or(s.starts_at = ps)
                        THEN coalesce(max(s.ends_at) FILTER (WHERE s.ends_at <= ps), '-infinity')
                        ELSE ps END
              INTO usage_from
              FROM billing.subscriptions s WHERE s.account_id = acc;
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    -- (two probes of the primary key, the second for first periods only)
    RETURN QUERY
    SELECT x.i::integer,
           CASE WHEN EXISTS (SELECT 1 FROM billing.subscriptions s
                              WHERE s.account_id = x.a AND s.starts_at = x.ps)
                THEN coalesce((SELECT max(s.ends_at) FROM billing.subscriptions s
                                WHERE s.account_id = x.a AND s.ends_at <= x.ps), '-infinity')
                ELSE x.ps END
      FROM unnest(p_accounts, p_starts) WITH ORDINALITY AS x(a, ps, i);
END
$$;
COMMENT ON FUNCTION billing._period_usage_from(bigint[], timestamptz[]) IS
    'Internal: per (account, period start), how far back the period bills usage: the start, or for a subscription''s first period the end of the previous subscription (-infinity: none)';

/*
 * _period_width_check: a plan's period must be a whole multiple of the
 * bucket width of every meter it charges (22023).  One trigger function
 * for the four tables whose changes could break that (its argument names
 * the table: on Citus it fires on shards, whose names differ): a charge of a new
 * (plan, meter) pair, a subscription to a plan (new, or another plan), a
 * plan's new period, a meter's new bucket width.  Pairs 1.0 created against
 * the rule stay (the update to 1.1 lists them): a new version of such a
 * charge is allowed, a new subscription to such a plan is not.  The reload
 * of a dump (billing._audit_suspended) brings rows that were checked when
 * first written, or came from 1.0, and is not checked again.
 */
CREATE FUNCTION billing._period_width_check() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    bad_plan text;
    bad_period interval;
    bad_meter text;
    bad_width interval;
BEGIN
    IF billing._audit_suspended() THEN
        RETURN NEW;
    END IF;
    IF TG_ARGV[0] = 'charges' THEN
        IF NEW.meter IS NULL
           OR (TG_OP = 'UPDATE' AND NEW.plan = OLD.plan AND NEW.meter IS NOT DISTINCT FROM OLD.meter) THEN
            RETURN NEW;
        END IF;
        SELECT p.plan, p.period, m.meter, m.bucket_width INTO bad_plan, bad_period, bad_meter, bad_width
          FROM billing.plans p, billing.meters m
         WHERE p.plan = NEW.plan AND m.meter = NEW.meter
           AND NOT billing._period_fits_width(p.period, m.bucket_width)
           AND NOT EXISTS (SELECT 1 FROM billing.charges c
                            WHERE c.plan = NEW.plan AND c.meter = NEW.meter
                              AND c.charge_id <> NEW.charge_id);
    ELSIF TG_ARGV[0] = 'subscriptions' THEN
        IF TG_OP = 'UPDATE' AND NEW.plan = OLD.plan THEN
            RETURN NEW;
        END IF;
        SELECT p.plan, p.period, m.meter, m.bucket_width INTO bad_plan, bad_period, bad_meter, bad_width
          FROM billing.plans p JOIN billing.charges c ON c.plan = p.plan
               JOIN billing.meters m ON m.meter = c.meter
         WHERE p.plan = NEW.plan AND NOT billing._period_fits_width(p.period, m.bucket_width)
         ORDER BY m.meter LIMIT 1;
    ELSIF TG_ARGV[0] = 'plans' THEN
        IF NEW.period = OLD.period THEN
            RETURN NEW;
        END IF;
        SELECT NEW.plan, NEW.period, m.meter, m.bucket_width INTO bad_plan, bad_period, bad_meter, bad_width
          FROM billing.charges c JOIN billing.meters m ON m.meter = c.meter
         WHERE c.plan = OLD.plan AND NOT billing._period_fits_width(NEW.period, m.bucket_width)
         ORDER BY m.meter LIMIT 1;
    ELSIF TG_ARGV[0] = 'meters' THEN
        IF NEW.bucket_width = OLD.bucket_width THEN
            RETURN NEW;
        END IF;
        SELECT p.plan, p.period, NEW.meter, NEW.bucket_width INTO bad_plan, bad_period, bad_meter, bad_width
          FROM billing.charges c JOIN billing.plans p ON p.plan = c.plan
         WHERE c.meter = OLD.meter AND NOT billing._period_fits_width(p.period, NEW.bucket_width)
         ORDER BY p.plan LIMIT 1;
    END IF;
    IF bad_plan IS NOT NULL THEN
        RAISE EXCEPTION 'the period "%" of plan "%" is not a whole multiple of the bucket width "%" of meter "%"',
              bad_period, bad_plan, bad_width, bad_meter
            USING ERRCODE = '22023',
                  DETAIL = 'A plan''s period must be a whole multiple of the bucket width of every meter it charges (a period of months: a bucket width that divides a day), so that each billing period starts at the same point of a bucket.',
                  HINT = 'Charge a meter with a narrower bucket width, or use a plan whose period is a multiple of it.';
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION billing._period_width_check() IS
    'Internal: refuses a charge, subscription, plan period or meter bucket width that would make a plan''s period not a whole multiple of the bucket width of a meter it charges (22023)';
CREATE TRIGGER charges_period_check BEFORE INSERT OR UPDATE ON billing.charges
    FOR EACH ROW EXECUTE FUNCTION billing._period_width_check('charges');
CREATE TRIGGER subscriptions_period_check BEFORE INSERT OR UPDATE ON billing.subscriptions
    FOR EACH ROW EXECUTE FUNCTION billing._period_width_check('subscriptions');
CREATE TRIGGER plans_period_check BEFORE UPDATE ON billing.plans
    FOR EACH ROW EXECUTE FUNCTION billing._period_width_check('plans');
CREATE TRIGGER meters_period_check BEFORE UPDATE ON billing.meters
    FOR EACH ROW EXECUTE FUNCTION billing._period_width_check('meters');
