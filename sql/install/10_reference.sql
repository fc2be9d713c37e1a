/*
 * Reference data: meters and accounts (SPEC section 2), with the triggers
 * that guard them.
 */

CREATE TABLE billing.meters (
    meter          text COLLATE "C" PRIMARY KEY
                   CHECK (meter <> '' AND pg_catalog.octet_length(meter) < 64),
    aggregation    text NOT NULL DEFAULT 'sum'
                   CHECK (aggregation IN ('sum', 'count', 'max', 'last', 'unique')),
    bucket_width   interval NOT NULL DEFAULT '1 minute'
                   CHECK (bucket_width > interval '0'
                          AND pg_catalog.date_part('month', bucket_width) = 0
                          AND pg_catalog.date_part('year', bucket_width) = 0),
    late_window    interval NOT NULL DEFAULT '35 days'
                   CHECK (late_window >= interval '0'),
    dedupe_window  interval NOT NULL DEFAULT '35 days'
                   CHECK (dedupe_window >= interval '0'),
    unit           text
);
COMMENT ON TABLE billing.meters IS
    'What is metered: one row per meter, with its aggregation, bucket width, late and dedupe windows';

-- Meter definitions are cached per backend; changes invalidate the caches.
CREATE FUNCTION billing._meters_changed() RETURNS trigger
    LANGUAGE C AS 'MODULE_PATHNAME', 'billing_meters_changed';
COMMENT ON FUNCTION billing._meters_changed() IS
    'Internal: invalidates the meter caches of all backends';
CREATE TRIGGER meters_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON billing.meters
    FOR EACH STATEMENT EXECUTE FUNCTION billing._meters_changed();

-- A meter's aggregation and bucket width cannot change once it has usage
-- (on Citus each node's copy checks the usage of that node: _exists_here).
CREATE FUNCTION billing._meters_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF (TG_OP = 'DELETE' OR NEW.aggregation IS DISTINCT FROM OLD.aggregation
        OR NEW.bucket_width IS DISTINCT FROM OLD.bucket_width
        OR NEW.meter IS DISTINCT FROM OLD.meter)
       AND (billing._exists_here('billing.usage_days', 'x.meter = $1', OLD.meter::text)
            OR billing._exists_here('billing.usage_deltas',
                   'EXISTS (SELECT 1 FROM billing._delta_cells(x.cells) c WHERE c.meter = $1)',
                   OLD.meter::text)) THEN
        RAISE EXCEPTION 'meter "%" has usage', OLD.meter
            USING ERRCODE = '55000',
                  DETAIL = 'Its name, aggregation and bucket width cannot change, nor can it be deleted, once usage was counted.',
                  HINT = 'Create a new meter instead.';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;
COMMENT ON FUNCTION billing._meters_guard() IS
    'Internal: refuses changes to a meter that would reinterpret counted usage';
CREATE TRIGGER meters_guard
    BEFORE UPDATE OR DELETE ON billing.meters
    FOR EACH ROW EXECUTE FUNCTION billing._meters_guard();

CREATE FUNCTION billing._meters_truncate_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF billing._exists_here('billing.usage_days', 'true', NULL::text)
       OR billing._exists_here('billing.usage_deltas', 'true', NULL::text) THEN
        RAISE EXCEPTION 'meters have usage'
            USING ERRCODE = '55000',
                  DETAIL = 'billing.meters cannot be truncated once usage was counted.';
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing._meters_truncate_guard() IS
    'Internal: refuses TRUNCATE of billing.meters once usage was counted';
CREATE TRIGGER meters_truncate_guard
    BEFORE TRUNCATE ON billing.meters
    FOR EACH STATEMENT EXECUTE FUNCTION billing._meters_truncate_guard();

CREATE TABLE billing.accounts (
    account_id  bigint PRIMARY KEY CHECK (account_id > 0),
    currency    text NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
    name        text
);
COMMENT ON TABLE billing.accounts IS
    'Billed accounts; account_id 0 is reserved for the catalog audit chain';

CREATE FUNCTION billing._accounts_currency_check() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF NEW.currency IS DISTINCT FROM OLD.currency
       AND EXISTS (SELECT 1 FROM billing.subscriptions s JOIN billing.plans p ON p.plan = s.plan
                    WHERE s.account_id = OLD.account_id AND p.currency <> NEW.currency) THEN
        RAISE EXCEPTION 'account % is subscribed to a plan in %', OLD.account_id, OLD.currency
            USING ERRCODE = '22023',
                  HINT = 'An account''s currency must match the plans it is subscribed to.';
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION billing._accounts_currency_check() IS
    'Internal: an account keeps the currency of the plans it is subscribed to';
CREATE TRIGGER accounts_currency_check BEFORE UPDATE OF currency ON billing.accounts
    FOR EACH ROW EXECUTE FUNCTION billing._accounts_currency_check();

-- Backends keep the accounts they found across transactions (the account
-- cache of src/ingest_accounts.c); any change that could remove one drops
-- every backend's cache and holds the cache's lock to the commit.  Enabled
-- ALWAYS: no session_replication_role skips it (the cache is used only
-- while this trigger is there and enabled always).
CREATE FUNCTION billing._accounts_changed() RETURNS trigger
    LANGUAGE C AS 'MODULE_PATHNAME', 'billing_accounts_changed';
COMMENT ON FUNCTION billing._accounts_changed() IS
    'Internal: invalidates the account caches of all backends';
CREATE TRIGGER accounts_changed
    AFTER UPDATE OR DELETE OR TRUNCATE ON billing.accounts
    FOR EACH STATEMENT EXECUTE FUNCTION billing._accounts_changed();
ALTER TABLE billing.accounts ENABLE ALWAYS TRIGGER accounts_changed;
