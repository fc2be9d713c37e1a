-- sql/billing--1.0.sql: assembled by make from the parts in sql/install; edit those.
\echo Use "CREATE EXTENSION billing" to load this file. \quit

-- ---- sql/install/10_reference.sql ----
/*
 * Reference data: meters and accounts (SPEC section 2).
 */

CREATE TABLE billing.meters (
    meter          text COLLATE "C" PRIMARY KEY
                   CHECK (meter <> '' AND pg_catalog.octet_length(meter) < 64),
    aggregation    text NOT NULL DEFAULT 'sum'
                   CHECK (aggregation IN ('sum', 'count', 'max', 'last')),
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

CREATE TABLE billing.accounts (
    account_id  bigint PRIMARY KEY CHECK (account_id > 0),
    currency    text NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
    name        text
);
COMMENT ON TABLE billing.accounts IS
    'Billed accounts; account_id 0 is reserved for the catalog audit chain';

SELECT pg_catalog.pg_extension_config_dump('billing.meters', '');
SELECT pg_catalog.pg_extension_config_dump('billing.accounts', '');

-- ---- sql/install/20_price.sql ----
/*
 * The billing.price type and the rating engine (SPEC section 1).
 */

CREATE TYPE billing.price;

CREATE FUNCTION billing.price_in(pg_catalog.cstring) RETURNS billing.price
    AS 'MODULE_PATHNAME', 'billing_price_in'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION billing.price_out(billing.price) RETURNS pg_catalog.cstring
    AS 'MODULE_PATHNAME', 'billing_price_out'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION billing.price_recv(pg_catalog.internal) RETURNS billing.price
    AS 'MODULE_PATHNAME', 'billing_price_recv'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION billing.price_send(billing.price) RETURNS pg_catalog.bytea
    AS 'MODULE_PATHNAME', 'billing_price_send'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE TYPE billing.price (
    INPUT = billing.price_in,
    OUTPUT = billing.price_out,
    RECEIVE = billing.price_recv,
    SEND = billing.price_send,
    INTERNALLENGTH = VARIABLE,
    STORAGE = extended
);
COMMENT ON TYPE billing.price IS
    'A pricing rule: unit, package, graduated, volume, flat or percent, with optional free/min/max; e.g. ''graduated 5000 @ 0 | inf @ 0.0002 + 10 min 25''';
COMMENT ON FUNCTION billing.price_in(pg_catalog.cstring) IS
    'Text input of billing.price (grammar in doc/billing.md); bad text raises 22P02';
COMMENT ON FUNCTION billing.price_out(billing.price) IS
    'Canonical text output of billing.price';
COMMENT ON FUNCTION billing.price_recv(pg_catalog.internal) IS
    'Binary input of billing.price: format version byte 1, then the text form; bad bytes raise 22P02';
COMMENT ON FUNCTION billing.price_send(billing.price) IS
    'Binary output of billing.price: format version byte 1, then the canonical text';

CREATE FUNCTION billing._price_recv(pg_catalog.bytea) RETURNS billing.price
    AS 'MODULE_PATHNAME', 'billing_price_recv_bytea'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._price_recv(pg_catalog.bytea) IS
    'Internal, for tests: price_recv applied to the bytes of a bytea (the inverse of price_send)';

-- Equality and hashing: on the canonical form.
CREATE FUNCTION billing.price_eq(billing.price, billing.price) RETURNS pg_catalog.bool
    AS 'MODULE_PATHNAME', 'billing_price_eq'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;
CREATE FUNCTION billing.price_ne(billing.price, billing.price) RETURNS pg_catalog.bool
    AS 'MODULE_PATHNAME', 'billing_price_ne'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;
CREATE FUNCTION billing.price_hash(billing.price) RETURNS pg_catalog.int4
    AS 'MODULE_PATHNAME', 'billing_price_hash'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION billing.price_hash_extended(billing.price, pg_catalog.int8) RETURNS pg_catalog.int8
    AS 'MODULE_PATHNAME', 'billing_price_hash_extended'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing.price_eq(billing.price, billing.price) IS
    'True when two prices have the same canonical form';
COMMENT ON FUNCTION billing.price_ne(billing.price, billing.price) IS
    'True when two prices differ in canonical form';
COMMENT ON FUNCTION billing.price_hash(billing.price) IS
    'Hash of the canonical form (hash opclass support)';
COMMENT ON FUNCTION billing.price_hash_extended(billing.price, pg_catalog.int8) IS
    'Seeded 64-bit hash of the canonical form (hash opclass support)';

CREATE OPERATOR billing.= (
    LEFTARG = billing.price,
    RIGHTARG = billing.price,
    FUNCTION = billing.price_eq,
    COMMUTATOR = OPERATOR(billing.=),
    NEGATOR = OPERATOR(billing.<>),
    RESTRICT = pg_catalog.eqsel,
    JOIN = pg_catalog.eqjoinsel,
    HASHES
);
CREATE OPERATOR billing.<> (
    LEFTARG = billing.price,
    RIGHTARG = billing.price,
    FUNCTION = billing.price_ne,
    COMMUTATOR = OPERATOR(billing.<>),
    NEGATOR = OPERATOR(billing.=),
    RESTRICT = pg_catalog.neqsel,
    JOIN = pg_catalog.neqjoinsel
);
COMMENT ON OPERATOR billing.= (billing.price, billing.price) IS
    'Prices with the same canonical form';
COMMENT ON OPERATOR billing.<> (billing.price, billing.price) IS
    'Prices with different canonical forms';

CREATE OPERATOR CLASS billing.price_hash_ops
    DEFAULT FOR TYPE billing.price USING hash AS
        OPERATOR 1 billing.= (billing.price, billing.price),
        FUNCTION 1 billing.price_hash(billing.price),
        FUNCTION 2 billing.price_hash_extended(billing.price, pg_catalog.int8);

-- Rating.
CREATE FUNCTION billing.rate(p billing.price, quantity pg_catalog.numeric)
    RETURNS pg_catalog.numeric
    AS 'MODULE_PATHNAME', 'billing_rate'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing.rate(billing.price, pg_catalog.numeric) IS
    'Exact amount of price p for quantity (>= 0; negative, NaN or infinite raise 22023), unrounded';

CREATE FUNCTION billing.rate_tiers(p billing.price, quantity pg_catalog.numeric,
    OUT tier pg_catalog.int4, OUT first_unit pg_catalog.numeric,
    OUT last_unit pg_catalog.numeric, OUT quantity pg_catalog.numeric,
    OUT unit_amount pg_catalog.numeric, OUT flat_amount pg_catalog.numeric,
    OUT amount pg_catalog.numeric)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'billing_rate_tiers'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE ROWS 4;
COMMENT ON FUNCTION billing.rate_tiers(billing.price, pg_catalog.numeric) IS
    'How rate(p, quantity) is made up: one row per tier that received units (tier 0: min/max adjustment); sum(amount) = rate';

CREATE FUNCTION billing._rate_numeric(p billing.price, quantity pg_catalog.numeric)
    RETURNS pg_catalog.numeric
    AS 'MODULE_PATHNAME', 'billing_rate_numeric'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._rate_numeric(billing.price, pg_catalog.numeric) IS
    'Internal, for tests: rate() computed on the numeric path only';
CREATE FUNCTION billing._rate_fast(p billing.price, quantity pg_catalog.numeric)
    RETURNS pg_catalog.numeric
    AS 'MODULE_PATHNAME', 'billing_rate_fast'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._rate_fast(billing.price, pg_catalog.numeric) IS
    'Internal, for tests: rate() computed on the 128-bit fixed-point path only; NULL when the values do not fit';

-- JSON.
CREATE FUNCTION billing.price_to_jsonb(p billing.price) RETURNS pg_catalog.jsonb
    AS 'MODULE_PATHNAME', 'billing_price_to_jsonb'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing.price_to_jsonb(billing.price) IS
    'The price as a JSON object (numbers as strings); inverse of price_from_jsonb';
CREATE FUNCTION billing.price_from_jsonb(j pg_catalog.jsonb) RETURNS billing.price
    AS 'MODULE_PATHNAME', 'billing_price_from_jsonb'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing.price_from_jsonb(pg_catalog.jsonb) IS
    'The price described by a JSON object of price_to_jsonb''s shape; bad objects raise 22P02';
CREATE FUNCTION billing.price_from_stripe(stripe_price pg_catalog.jsonb) RETURNS billing.price
    AS 'MODULE_PATHNAME', 'billing_price_from_stripe'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing.price_from_stripe(pg_catalog.jsonb) IS
    'The price of a Stripe Price object (per_unit, transform_quantity, tiered graduated/volume), minor units converted to major; bad objects raise 22023';

-- Money.
CREATE FUNCTION billing.round_money(amount pg_catalog.numeric, currency pg_catalog.text)
    RETURNS pg_catalog.numeric
    AS 'MODULE_PATHNAME', 'billing_round_money_sql'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;  -- STABLE: reads billing.rounding
COMMENT ON FUNCTION billing.round_money(pg_catalog.numeric, pg_catalog.text) IS
    'Amount rounded to the currency''s ISO 4217 minor unit with the mode of billing.rounding; unknown currency raises 22023';
CREATE FUNCTION billing.currency_exponent(currency pg_catalog.text)
    RETURNS pg_catalog.int4
    AS 'MODULE_PATHNAME', 'billing_currency_exponent_sql'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing.currency_exponent(pg_catalog.text) IS
    'ISO 4217 minor-unit exponent of a currency code (USD 2, JPY 0, KWD 3), NULL when unknown';

-- ---- sql/install/30_usage.sql ----
/*
 * Usage counters and ingest (SPEC sections 3 and 4).
 *
 * Ingest never updates a counter row: every statement appends its
 * per-bucket totals to usage_deltas, and compact_usage() folds them into
 * usage_buckets.  Readers combine both.
 */

CREATE TABLE billing.usage_buckets (
    account_id    bigint NOT NULL,
    meter         text COLLATE "C" NOT NULL,
    dimension     text COLLATE "C" NOT NULL DEFAULT '',
    bucket_start  timestamptz NOT NULL,
    quantity      numeric NOT NULL,
    events        bigint NOT NULL,
    last_ts       timestamptz,          -- last meters: timestamp of quantity
    last_seq      bigint,               -- last meters: arrival order
    PRIMARY KEY (account_id, meter, bucket_start, dimension)
);
COMMENT ON TABLE billing.usage_buckets IS
    'Compacted usage counters, one row per (account, meter, bucket, dimension); add usage_deltas to read';

CREATE TABLE billing.usage_deltas (
    account_id  bigint NOT NULL,
    seq         bigint,         -- arrival order, when cells holds a last meter
    cells       bytea NOT NULL  -- packed cells: read with billing._delta_cells(cells)
);
CREATE INDEX usage_deltas_account ON billing.usage_deltas (account_id);
COMMENT ON TABLE billing.usage_deltas IS
    'Usage counted since the last compact_usage(): per flush of an ingest statement, one row per account with the cells it touched, packed; appended, never updated';

CREATE TYPE billing.delta_cell AS (
    meter         text COLLATE "C",
    dimension     text COLLATE "C",
    bucket_start  timestamptz,
    quantity      numeric,
    events        bigint,
    last_ts       timestamptz           -- last meters only
);
COMMENT ON TYPE billing.delta_cell IS 'Internal: one counter cell of usage_deltas, as billing._delta_cells returns it';

CREATE FUNCTION billing._delta_cells(cells bytea) RETURNS SETOF billing.delta_cell
    AS 'MODULE_PATHNAME', 'billing_delta_cells'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE ROWS 8;
COMMENT ON FUNCTION billing._delta_cells(bytea) IS
    'Internal: the counter cells packed in usage_deltas.cells (last_ts is NULL but for last meters)';

CREATE FUNCTION billing._delta_pack(meters text[], dimensions text[], bucket_starts timestamptz[],
                                    quantities numeric[], events bigint[], last_ts timestamptz[])
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'billing_delta_pack'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._delta_pack(text[], text[], timestamptz[], numeric[], bigint[], timestamptz[]) IS
    'Internal: pack parallel arrays of counter cells for usage_deltas.cells (a cell with a last_ts is of a last meter)';

CREATE VIEW billing.usage_cells AS
    SELECT b.account_id, b.meter, b.dimension, b.bucket_start, b.quantity, b.events,
           b.last_ts, b.last_seq
      FROM billing.usage_buckets b
    UNION ALL
    SELECT d.account_id, c.meter, c.dimension, c.bucket_start,
           c.quantity, c.events, c.last_ts,
           CASE WHEN c.last_ts IS NOT NULL THEN d.seq END
      FROM billing.usage_deltas d, billing._delta_cells(d.cells) c;
COMMENT ON VIEW billing.usage_cells IS
    'Every counter cell, compacted or not: combine cells of one key by the meter''s aggregation';

CREATE SEQUENCE billing.usage_seq;
COMMENT ON SEQUENCE billing.usage_seq IS
    'Arrival order of values of last meters (ties of timestamps go to the later arrival)';

CREATE TABLE billing.dedupe_keys (
    account_id  bigint NOT NULL,
    meter       text COLLATE "C" NOT NULL,
    event_id    text COLLATE "C" NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (account_id, meter, event_id)
);
CREATE INDEX dedupe_keys_expires ON billing.dedupe_keys (expires_at);
COMMENT ON TABLE billing.dedupe_keys IS
    'Event ids already counted, per (account, meter); kept at least dedupe_window, removed by purge_dedupe()';

CREATE TABLE billing.ingest_offsets (
    source       text COLLATE "C" NOT NULL,
    partition    integer NOT NULL,
    last_offset  bigint NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (source, partition)
);
COMMENT ON TABLE billing.ingest_offsets IS
    'Last batch offset applied by billing.ingest() per (source, partition)';

CREATE TABLE billing.cumulative_reports (
    account_id    bigint NOT NULL,
    meter         text COLLATE "C" NOT NULL,
    dimension     text COLLATE "C" NOT NULL DEFAULT '',
    bucket_start  timestamptz NOT NULL,
    source        text COLLATE "C" NOT NULL,
    total         numeric NOT NULL,
    PRIMARY KEY (account_id, meter, bucket_start, dimension, source)
);
COMMENT ON TABLE billing.cumulative_reports IS
    'Greatest running total each source reported for a bucket (billing.report_cumulative)';

CREATE TABLE billing.metered_tables (
    tbl               regclass PRIMARY KEY,
    account_column    name NOT NULL,
    meter_column      name NOT NULL,
    quantity_column   name NOT NULL,
    ts_column         name NOT NULL,
    event_id_column   name,
    dimension_column  name,
    keep_rows         boolean NOT NULL
);
COMMENT ON TABLE billing.metered_tables IS
    'Tables whose INSERT and COPY count usage (billing.meter_table)';

SELECT pg_catalog.pg_extension_config_dump('billing.usage_buckets', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_deltas', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.dedupe_keys', '');
SELECT pg_catalog.pg_extension_config_dump('billing.ingest_offsets', '');
SELECT pg_catalog.pg_extension_config_dump('billing.cumulative_reports', '');
SELECT pg_catalog.pg_extension_config_dump('billing.metered_tables', '');

-- Meter definitions are cached per backend; changes invalidate the caches.
CREATE FUNCTION billing._meters_changed() RETURNS trigger
    LANGUAGE C AS 'MODULE_PATHNAME', 'billing_meters_changed';
COMMENT ON FUNCTION billing._meters_changed() IS
    'Internal: invalidates the meter caches of all backends';
CREATE TRIGGER meters_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON billing.meters
    FOR EACH STATEMENT EXECUTE FUNCTION billing._meters_changed();

-- A meter's aggregation and bucket width cannot change once it has usage.
CREATE FUNCTION billing._meters_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN IF billing._in_citus_task() THEN RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END; END IF;  -- Citus: see _in_citus_task
    IF (TG_OP = 'DELETE' OR NEW.aggregation IS DISTINCT FROM OLD.aggregation
        OR NEW.bucket_width IS DISTINCT FROM OLD.bucket_width
        OR NEW.meter IS DISTINCT FROM OLD.meter)
       AND EXISTS (SELECT 1 FROM billing.usage_cells WHERE meter = OLD.meter) THEN
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
    IF EXISTS (SELECT 1 FROM billing.usage_cells) THEN
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

-- record -----------------------------------------------------------------

CREATE FUNCTION billing.record(account_id bigint, meter text, quantity numeric,
                               ts timestamptz DEFAULT pg_catalog.now(),
                               event_id text DEFAULT NULL,
                               dimension text DEFAULT '')
    RETURNS boolean
    LANGUAGE C VOLATILE AS 'MODULE_PATHNAME', 'billing_record';
COMMENT ON FUNCTION billing.record(bigint, text, numeric, timestamptz, text, text) IS
    'Counts one usage report; false when event_id was already counted for (account, meter)';

-- metered tables -----------------------------------------------------------

CREATE FUNCTION billing._meter_row() RETURNS trigger
    LANGUAGE C AS 'MODULE_PATHNAME', 'billing_meter_row';
COMMENT ON FUNCTION billing._meter_row() IS
    'Internal: BEFORE INSERT row trigger of metered tables; counts the row';
CREATE FUNCTION billing._meter_after_rows() RETURNS trigger
    LANGUAGE C AS 'MODULE_PATHNAME', 'billing_meter_after_rows';
COMMENT ON FUNCTION billing._meter_after_rows() IS
    'Internal: AFTER INSERT statement trigger of metered tables that keep their rows: counts the rows stored (from the transition table)';
CREATE FUNCTION billing._meter_flush() RETURNS trigger
    LANGUAGE C AS 'MODULE_PATHNAME', 'billing_meter_flush';
COMMENT ON FUNCTION billing._meter_flush() IS
    'Internal: AFTER INSERT statement trigger of metered tables; writes the counters';

CREATE FUNCTION billing.meter_table(tbl regclass, account_column name, meter_column name,
                                    quantity_column name, ts_column name,
                                    event_id_column name DEFAULT NULL,
                                    dimension_column name DEFAULT NULL,
                                    keep_rows boolean DEFAULT true)
    RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    col  name;
    typ  regtype;
    kind text;
    allowed regtype[];
BEGIN
    IF tbl IS NULL OR account_column IS NULL OR meter_column IS NULL
       OR quantity_column IS NULL OR ts_column IS NULL OR keep_rows IS NULL THEN
        RAISE EXCEPTION 'meter_table: table, account, meter, quantity and ts columns and keep_rows must not be null'
            USING ERRCODE = '22004';
    END IF;
    IF (SELECT c.relkind <> 'r' OR c.relispartition FROM pg_class c WHERE c.oid = tbl) THEN
        RAISE EXCEPTION '"%" is not an ordinary table', tbl
            USING ERRCODE = '42809',
                  HINT = 'Only ordinary tables can be metered, not partitioned tables or their partitions.';
    END IF;
    FOR col, kind, allowed IN
        SELECT * FROM (VALUES
            (account_column, 'account', ARRAY['bigint', 'integer', 'smallint']::regtype[]),
            (meter_column, 'meter', ARRAY['text', 'character varying']::regtype[]),
            (quantity_column, 'quantity', ARRAY['numeric', 'bigint', 'integer', 'smallint']::regtype[]),
            (ts_column, 'timestamp', ARRAY['timestamp with time zone']::regtype[]),
            (event_id_column, 'event id', ARRAY['text', 'character varying']::regtype[]),
            (dimension_column, 'dimension', ARRAY['text', 'character varying']::regtype[])) v
    LOOP
        CONTINUE WHEN col IS NULL;
        SELECT a.atttypid::regtype INTO typ FROM pg_attribute a
         WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'column "%" of table "%" does not exist', col, tbl
                USING ERRCODE = '42703';
        END IF;
        IF NOT typ = ANY (allowed) THEN
            RAISE EXCEPTION '% column "%" of table "%" has type %', kind, col, tbl, typ
                USING ERRCODE = '42804',
                      DETAIL = format('The %s column must be of type %s.', kind, array_to_string(allowed, ' or '));
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM billing.metered_tables m WHERE m.tbl = meter_table.tbl) THEN
        PERFORM billing.unmeter_table(tbl);
    END IF;
    PERFORM billing._meter_table_citus(tbl, account_column);    -- on Citus: co-located, triggers allowed
    INSERT INTO billing.metered_tables VALUES (tbl, account_column, meter_column, quantity_column,
        ts_column, event_id_column, dimension_column, keep_rows);
    -- a row trigger only where rows are dropped (keep_rows false) or
    -- duplicates must be (event ids): a BEFORE ROW trigger makes COPY
    -- insert one row at a time instead of in batches
    IF NOT keep_rows OR event_id_column IS NOT NULL THEN
        EXECUTE format('CREATE TRIGGER billing_meter_row BEFORE INSERT ON %s FOR EACH ROW '
                       'EXECUTE FUNCTION billing._meter_row(%L, %L, %L, %L, %L, %L, %L)',
                       tbl, account_column, meter_column, quantity_column, ts_column,
                       coalesce(event_id_column, ''), coalesce(dimension_column, ''),
                       CASE WHEN keep_rows THEN 't' ELSE 'f' END);
    END IF;
    IF keep_rows THEN
        -- the rows stored, counted at the end of the statement (before
        -- billing_meter_flush: statement triggers fire in name order)
        EXECUTE format('CREATE TRIGGER billing_meter_after_rows AFTER INSERT ON %s '
                       'REFERENCING NEW TABLE AS billing_new_rows FOR EACH STATEMENT '
                       'EXECUTE FUNCTION billing._meter_after_rows(%L, %L, %L, %L, %L, %L, %L)',
                       tbl, account_column, meter_column, quantity_column, ts_column,
                       coalesce(event_id_column, ''), coalesce(dimension_column, ''), 't');
    END IF;
    EXECUTE format('CREATE TRIGGER billing_meter_flush AFTER INSERT ON %s FOR EACH STATEMENT '
                   'EXECUTE FUNCTION billing._meter_flush()', tbl);
END
$$;
COMMENT ON FUNCTION billing.meter_table(regclass, name, name, name, name, name, name, boolean) IS
    'Makes every INSERT and COPY into an ordinary table count usage';

CREATE FUNCTION billing.unmeter_table(tbl regclass) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    SET client_min_messages = warning AS $$
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'unmeter_table: table must not be null' USING ERRCODE = '22004';
    END IF;
    DELETE FROM billing.metered_tables m WHERE m.tbl = unmeter_table.tbl;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table "%" is not metered', tbl USING ERRCODE = '42704';
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS billing_meter_row ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS billing_meter_after_rows ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS billing_meter_flush ON %s', tbl);
END
$$;
COMMENT ON FUNCTION billing.unmeter_table(regclass) IS
    'Stops counting usage from a table metered by billing.meter_table';

-- a dropped metered table leaves no configuration behind
CREATE FUNCTION billing._metered_table_dropped() RETURNS event_trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    DELETE FROM billing.metered_tables m
     WHERE m.tbl::oid IN (SELECT d.objid FROM pg_event_trigger_dropped_objects() d
                           WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0);
END
$$;
COMMENT ON FUNCTION billing._metered_table_dropped() IS
    'Internal: forgets metered tables when they are dropped';
CREATE EVENT TRIGGER billing_metered_table_dropped ON sql_drop
    WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
    EXECUTE FUNCTION billing._metered_table_dropped();

-- batches ------------------------------------------------------------------

CREATE FUNCTION billing.ingest(source text, partition int, batch_offset bigint,
                               account_ids bigint[], meters text[], quantities numeric[],
                               ts timestamptz[], event_ids text[] DEFAULT NULL,
                               dimensions text[] DEFAULT NULL)
    RETURNS TABLE (accepted int, duplicates int, already_applied boolean)
    LANGUAGE C VOLATILE AS 'MODULE_PATHNAME', 'billing_ingest';
COMMENT ON FUNCTION billing.ingest(text, int, bigint, bigint[], text[], numeric[], timestamptz[], text[], text[]) IS
    'Applies a batch of usage exactly once per (source, partition, batch_offset)';

CREATE FUNCTION billing.report_cumulative(source text, account_id bigint, meter text,
                                          bucket_start timestamptz, total numeric,
                                          dimension text DEFAULT '')
    RETURNS void
    LANGUAGE C VOLATILE AS 'MODULE_PATHNAME', 'billing_report_cumulative';
COMMENT ON FUNCTION billing.report_cumulative(text, bigint, text, timestamptz, numeric, text) IS
    'Records a running total for a bucket from one source; the bucket counts the sum over sources of their greatest totals';

-- maintenance ----------------------------------------------------------------

CREATE FUNCTION billing.purge_dedupe(as_of timestamptz DEFAULT pg_catalog.now())
    RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    -- PL/pgSQL, not SQL: Citus plans the delete only with as_of's value
    DELETE FROM billing.dedupe_keys WHERE expires_at <= as_of;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION billing.purge_dedupe(timestamptz) IS
    'Removes event ids whose dedupe window ended by as_of (an index range delete); returns how many';

CREATE TABLE billing.usage_hourly (
    account_id    bigint NOT NULL,
    meter         text COLLATE "C" NOT NULL,
    dimension     text COLLATE "C" NOT NULL DEFAULT '',
    bucket_start  timestamptz NOT NULL,     -- hour (UTC) holding the buckets
    quantity      numeric NOT NULL,
    events        bigint NOT NULL,
    last_ts       timestamptz,
    last_seq      bigint,
    PRIMARY KEY (account_id, meter, bucket_start, dimension)
);
COMMENT ON TABLE billing.usage_hourly IS
    'Compacted usage rolled up by hour (kept by compact_usage with usage_buckets)';

CREATE TABLE billing.usage_daily (LIKE billing.usage_hourly INCLUDING ALL);
COMMENT ON TABLE billing.usage_daily IS
    'Compacted usage rolled up by UTC day (kept by compact_usage with usage_buckets)';

SELECT pg_catalog.pg_extension_config_dump('billing.usage_hourly', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_daily', '');

-- combine two values of one counter cell by the meter's aggregation
CREATE FUNCTION billing._combine(aggregation text, q1 numeric, ts1 timestamptz, seq1 bigint,
                                 q2 numeric, ts2 timestamptz, seq2 bigint)
    RETURNS numeric
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE aggregation
        WHEN 'max' THEN GREATEST(q1, q2)
        WHEN 'last' THEN CASE WHEN (ts2, seq2) OPERATOR(pg_catalog.>) (ts1, seq1) THEN q2 ELSE q1 END
        ELSE q1 OPERATOR(pg_catalog.+) q2 END
$$;
COMMENT ON FUNCTION billing._combine(text, numeric, timestamptz, bigint, numeric, timestamptz, bigint) IS
    'Internal: combines two values of a counter cell (sum/count add, max keeps the larger, last the later)';

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

    -- 1. take the deltas out, one cell per key
    WITH moved AS (
        DELETE FROM billing.usage_deltas RETURNING *
    )
    INSERT INTO billing_compact_cells
    -- a last meter's value: the greatest [epoch of last_ts, seq, quantity],
    -- an array order that is ORDER BY last_ts DESC, seq DESC with NULLs
    -- first, without a sort per cell
    SELECT d.account_id, c.meter, c.dimension, c.bucket_start,
           CASE m.aggregation
               WHEN 'max' THEN max(c.quantity)
               WHEN 'last' THEN (max(ARRAY[extract(epoch FROM c.last_ts), d.seq, c.quantity])
                                     FILTER (WHERE m.aggregation = 'last'))[3]
               ELSE sum(c.quantity) END,
           sum(c.events)::bigint,
           max(c.last_ts),
           ((max(ARRAY[extract(epoch FROM c.last_ts), d.seq, c.quantity])
                 FILTER (WHERE m.aggregation = 'last'))[2])::bigint,
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
    TRUNCATE billing_compact_cells;
    RETURN n;
END
$$;

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
                   CASE aggregation
                       WHEN 'max' THEN max(quantity)
                       WHEN 'last' THEN (max(ARRAY[extract(epoch FROM last_ts), last_seq, quantity])
                                             FILTER (WHERE aggregation = 'last'))[3]
                       ELSE sum(quantity) END AS quantity,
                   sum(events)::bigint AS events,
                   max(last_ts) AS last_ts,
                   ((max(ARRAY[extract(epoch FROM last_ts), last_seq, quantity])
                         FILTER (WHERE aggregation = 'last'))[2])::bigint AS last_seq,
                   aggregation
              FROM billing_compact_cells
             GROUP BY 1, 2, 3, 4, aggregation
        ), updated AS (
            UPDATE billing.%I AS b
               SET quantity = billing._combine(c.aggregation, b.quantity, b.last_ts, b.last_seq,
                                               c.quantity, c.last_ts, c.last_seq),
                   events = b.events + c.events,
                   last_ts = CASE WHEN (c.last_ts, c.last_seq) > (b.last_ts, b.last_seq)
                                  THEN c.last_ts ELSE b.last_ts END,
                   last_seq = CASE WHEN (c.last_ts, c.last_seq) > (b.last_ts, b.last_seq)
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
             ELSE format('date_bin(%L, bucket_start, timestamptz %L)', grain, '1970-01-01 00:00:00+00') END,
        target, target, target);
END
$$;
COMMENT ON FUNCTION billing._compact_into(text, interval) IS
    'Internal: folds the cells being compacted into a bucket or roll-up table';

COMMENT ON FUNCTION billing.compact_usage() IS
    'Folds appended usage deltas into the bucket counters; returns the number of delta cells merged';

-- reading ----------------------------------------------------------------------

CREATE FUNCTION billing._bin(grain interval, ts timestamptz) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN date_part('month', grain) = 0 AND date_part('year', grain) = 0
            THEN date_bin(grain, ts, timestamptz '1970-01-01 00:00:00+00')
        -- whole months: count months since 1970-01 in UTC, with timestamp
        -- (not timestamptz) arithmetic so that TimeZone plays no part
        ELSE timezone('UTC', make_timestamp(1970, 1, 1, 0, 0, 0)
              + make_interval(months =>
                    ((extract(year from timezone('UTC', ts))::int - 1970) * 12
                     + extract(month from timezone('UTC', ts))::int - 1)
                    / (extract(year from grain)::int * 12 + extract(month from grain)::int)
                    * (extract(year from grain)::int * 12 + extract(month from grain)::int)))
        END
$$;
COMMENT ON FUNCTION billing._bin(interval, timestamptz) IS
    'Internal: start of the UTC-aligned roll-up bin of width grain that holds ts';

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
        SELECT u.meter, u.dimension, u.bucket_start, u.quantity, u.events, u.last_ts, u.last_seq
          FROM billing.usage_cells u
         WHERE u.account_id = p_account AND u.bucket_start >= p_from AND u.bucket_start < p_to
           AND (p_meter IS NULL OR u.meter = p_meter)
    )
    SELECT c.meter::text, c.dimension::text,
           CASE WHEN p_grain IS NULL THEN c.bucket_start ELSE billing._bin(p_grain, c.bucket_start) END,
           CASE m.aggregation
               WHEN 'max' THEN max(c.quantity)
               WHEN 'last' THEN (array_agg(c.quantity ORDER BY c.last_ts DESC, c.last_seq DESC))[1]
               ELSE sum(c.quantity) END,
           sum(c.events)::bigint
      FROM cells c JOIN billing.meters m ON m.meter = c.meter
     GROUP BY c.meter, c.dimension, 3, m.aggregation
     ORDER BY c.meter, c.dimension, 3;
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
    'Usage of an account: stored buckets (grain NULL) or UTC-aligned roll-ups; max/last meters roll up by max/latest';

-- ---- sql/install/40_plans.sql ----
/*
 * Plans, charges and subscriptions (SPEC section 2), billing periods, and
 * the period totals that invoices rate.
 */

ALTER TABLE billing.accounts
    ADD CONSTRAINT accounts_currency_known
        CHECK (COALESCE(billing.currency_exponent(currency), -1) >= 0);

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

CREATE TABLE billing.charges (
    charge_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    plan         text COLLATE "C" NOT NULL REFERENCES billing.plans ON UPDATE CASCADE,
    meter        text COLLATE "C" NULL REFERENCES billing.meters,
    price        billing.price NOT NULL,
    valid_from   timestamptz NOT NULL DEFAULT '-infinity',
    description  text,
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now()
);
-- a usage charge is identified by (plan, meter), a fixed fee by (plan, description)
CREATE UNIQUE INDEX charges_usage_version ON billing.charges (plan, meter, valid_from)
    WHERE meter IS NOT NULL;
CREATE UNIQUE INDEX charges_fixed_version
    ON billing.charges (plan, (COALESCE(description, '')), valid_from)
    WHERE meter IS NULL;
COMMENT ON TABLE billing.charges IS
    'Charges of a plan, versioned by valid_from: the version in force at a period''s start rates the whole period; a NULL meter is a fixed fee per period (rated with quantity 0)';

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

SELECT pg_catalog.pg_extension_config_dump('billing.plans', '');
SELECT pg_catalog.pg_extension_config_dump('billing.charges', '');
SELECT pg_catalog.pg_extension_config_dump('billing.subscriptions', '');

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

CREATE FUNCTION billing._rollup_totals(p_accounts bigint[], p_starts timestamptz[],
                                      p_ends timestamptz[], p_meters text[],
                                      p_aggregations text[])
    RETURNS TABLE (idx integer, meter text, quantity numeric, last_ts timestamptz,
                   last_seq bigint)
    AS 'MODULE_PATHNAME', 'billing_rollup_totals'
    LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._rollup_totals(bigint[], timestamptz[], timestamptz[], text[], text[]) IS
    'Internal: per period (1-based index) and meter, the aggregate of the buckets and roll-ups covering [start, end), with the latest cell''s last_ts and last_seq (src/totals.c)';

/*
 * _usage_totals_many: the quantity of each meter of each (account,
 * [from, to)) given, combined by the meter's aggregation.  Reads day roll-ups for whole
 * UTC days, hour roll-ups for whole hours, buckets for the minutes at the
 * edges, and the deltas not yet compacted, so a month costs a few hundred
 * rows, not tens of thousands of minute buckets.
 */
CREATE FUNCTION billing._usage_totals_many(p_accounts bigint[], p_starts timestamptz[],
                                           p_ends timestamptz[])
    RETURNS TABLE (idx integer, meter text, quantity numeric)
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
BEGIN
    -- on Citus: one router query per account (see 90_distribute.sql)
    IF billing._citus_table_kind('billing.usage_deltas') IS NOT NULL THEN
        RETURN QUERY
        SELECT x.i::integer, t.meter, t.quantity
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i),
               LATERAL billing._usage_totals_citus(x.a, x.s, x.e) t;
        RETURN;
    END IF;
    -- the roll-ups and buckets covering each period, each meter aggregated
    -- in C (billing._rollup_totals), plus the deltas not yet compacted; a
    -- last meter's latest value compared as [epoch of last_ts, last_seq,
    -- quantity], the array order being ORDER BY last_ts DESC, last_seq DESC
    -- with NULLs first
    RETURN QUERY
    WITH ms AS (
        SELECT array_agg(m.meter::text ORDER BY m.meter) AS meters,
               array_agg(m.aggregation::text ORDER BY m.meter) AS aggs
          FROM billing.meters m
    ), per AS (
        SELECT x.i::integer AS idx, x.a AS account_id, x.s AS ps, x.e AS pe
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i)
    ), folded AS (
        SELECT r.idx, r.meter COLLATE "C" AS meter, r.quantity,
               ARRAY[extract(epoch FROM r.last_ts), r.last_seq, r.quantity] AS w
          FROM ms, billing._rollup_totals(p_accounts, p_starts, p_ends, ms.meters, ms.aggs) r
        UNION ALL
        -- not yet compacted
        SELECT per.idx, x.meter, x.quantity,
               ARRAY[extract(epoch FROM x.last_ts), d.seq, x.quantity]
          FROM per JOIN billing.usage_deltas d ON d.account_id = per.account_id,
               billing._delta_cells(d.cells) x
         WHERE x.bucket_start >= per.ps AND x.bucket_start < per.pe
    )
    SELECT f.idx, f.meter::text,
           CASE m.aggregation
               WHEN 'max' THEN max(f.quantity)
               WHEN 'last' THEN (max(f.w))[3]
               ELSE sum(f.quantity) END
      FROM folded f JOIN billing.meters m ON m.meter = f.meter
     GROUP BY f.idx, f.meter, m.aggregation;
END
$$;
COMMENT ON FUNCTION billing._usage_totals_many(bigint[], timestamptz[], timestamptz[]) IS
    'Internal: quantity per meter of many (account, range) pairs, from roll-ups where whole hours and days allow';

-- guards ------------------------------------------------------------------------

CREATE FUNCTION billing._subscriptions_check() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    acc_currency text;
    plan_currency text;
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
                             OR NEW.account_id IS DISTINCT FROM OLD.account_id)
       AND EXISTS (SELECT 1 FROM billing.invoices i
                    WHERE i.account_id = OLD.account_id AND i.period_start >= OLD.starts_at
                      AND i.period_start < coalesce(OLD.ends_at, 'infinity')) THEN
        RAISE EXCEPTION 'subscription of account % from % has finalized invoices', OLD.account_id, OLD.starts_at
            USING ERRCODE = '55000',
                  DETAIL = 'Its plan and start cannot change; its end and spend cap can (re-rate to bill the effect).';
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION billing._subscriptions_check() IS
    'Internal: a subscription''s plan must bill in the account''s currency, and subscriptions of an account must not overlap';
CREATE TRIGGER subscriptions_check BEFORE INSERT OR UPDATE ON billing.subscriptions
    FOR EACH ROW EXECUTE FUNCTION billing._subscriptions_check();

CREATE FUNCTION billing._subscriptions_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM billing.invoices i
                WHERE i.account_id = OLD.account_id AND i.period_start >= OLD.starts_at
                  AND i.period_start < coalesce(OLD.ends_at, 'infinity')) THEN
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

CREATE FUNCTION billing._plans_check() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN IF billing._in_citus_task() THEN RETURN NEW; END IF;  -- Citus: see _in_citus_task
    IF (NEW.currency IS DISTINCT FROM OLD.currency OR NEW.period IS DISTINCT FROM OLD.period)
       AND EXISTS (SELECT 1 FROM billing.subscriptions s WHERE s.plan = OLD.plan) THEN
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

-- ---- sql/install/50_invoices.sql ----
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
 * _rate_periods: the lines of many billing periods at once (element i of
 * each array describes period i), in invoice order per period (fixed fees,
 * usage by meter, the spend cap), amounts rounded per line to the
 * currency's minor unit.  The version of each charge in force at a period's
 * start rates the whole period.  Set-based, so that finalizing or
 * re-rating ten thousand accounts is one query, not ten thousand.
 */
CREATE FUNCTION billing._rate_periods(p_accounts bigint[], p_plans text[], p_currencies text[],
                                      p_caps numeric[], p_starts timestamptz[],
                                      p_ends timestamptz[])
    RETURNS TABLE (idx integer, ord integer, kind text, meter text, description text,
                   quantity numeric, amount numeric, unrounded_amount numeric,
                   charge_id bigint, price billing.price)
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
        -- description, then usage by meter (the spend cap comes last)
        SELECT v.*, (row_number() OVER (PARTITION BY v.plan, v.ps
                                        ORDER BY v.grp, v.description, v.meter))::integer AS ord,
               (count(*) OVER (PARTITION BY v.plan, v.ps))::integer AS n_lines
          FROM (SELECT DISTINCT ON (k.plan, k.ps, c.meter,
                                    CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END)
                       k.plan, k.ps, c.charge_id, c.meter::text AS meter,
                       coalesce(c.description, c.meter) AS description, c.price,
                       CASE WHEN c.meter IS NULL THEN 1 ELSE 2 END AS grp
                  FROM (SELECT DISTINCT per.plan, per.ps FROM per) k
                       JOIN billing.charges c ON c.plan = k.plan AND c.valid_from <= k.ps
                 ORDER BY k.plan, k.ps, c.meter,
                          CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END,
                          c.valid_from DESC) v
    ), totals AS (
        SELECT t.idx, t.meter, t.quantity
          FROM billing._usage_totals_many(p_accounts, p_starts, p_ends) t
    ), rated AS (
        SELECT per.idx, per.currency, v.ord, v.n_lines, v.grp,
               CASE WHEN v.meter IS NULL THEN 'fixed' ELSE 'usage' END AS kind,
               v.meter, v.description,
               CASE WHEN v.meter IS NULL THEN NULL ELSE coalesce(t.quantity, 0) END AS quantity,
               billing.rate(v.price, CASE WHEN v.meter IS NULL THEN 0 ELSE coalesce(t.quantity, 0) END)
                   AS unrounded_amount,
               v.charge_id, v.price
          FROM per JOIN versions v ON v.plan = per.plan AND v.ps = per.ps
               LEFT JOIN totals t ON t.idx = per.idx AND t.meter = v.meter
    ), lines AS (
        SELECT r.*, billing.round_money(r.unrounded_amount, r.currency) AS amount FROM rated r
    ), capped AS (
        SELECT per.idx, max(l.n_lines) + 1 AS ord, 'cap'::text AS kind, NULL::text AS meter,
               'spend cap'::text AS description, NULL::numeric AS quantity,
               NULL::numeric AS unrounded_amount, NULL::bigint AS charge_id,
               NULL::billing.price AS price,
               billing.round_money(per.cap, per.currency) - sum(l.amount) AS amount
          FROM per JOIN lines l ON l.idx = per.idx AND l.kind = 'usage'
         WHERE per.cap IS NOT NULL
         GROUP BY per.idx, per.cap, per.currency
        HAVING sum(l.amount) > billing.round_money(per.cap, per.currency)
    )
    SELECT l.idx, l.ord, l.kind, l.meter, l.description, l.quantity, l.amount,
           l.unrounded_amount, l.charge_id, l.price
      FROM lines l
    UNION ALL
    SELECT c.idx, c.ord, c.kind, c.meter, c.description, c.quantity, c.amount,
           c.unrounded_amount, c.charge_id, c.price
      FROM capped c;
END
$$;
COMMENT ON FUNCTION billing._rate_periods(bigint[], text[], text[], numeric[], timestamptz[], timestamptz[]) IS
    'Internal: the rated lines (fixed fees, usage, spend cap) of many billing periods';

CREATE FUNCTION billing._rate_period(p_account bigint, p_plan text, p_currency text,
                                     p_cap numeric, p_start timestamptz, p_end timestamptz)
    RETURNS TABLE (ord integer, kind text, meter text, description text, quantity numeric,
                   amount numeric, unrounded_amount numeric, charge_id bigint,
                   price billing.price)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT r.ord, r.kind, r.meter, r.description, r.quantity, r.amount, r.unrounded_amount,
           r.charge_id, r.price
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
                   amount numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    -- PL/pgSQL, not SQL: Citus routes the query by p_account's value
    RETURN QUERY
    SELECT a.adjustment_id, a.meter::text,
           -- the row rebuilt as billing.adjustments (on Citus a is a shard's row)
           billing._adjustment_text(ROW(a.*)::billing.adjustments),
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
          FROM billing._rate_periods(ARRAY[p_account], ARRAY[p.plan], ARRAY[p.currency],
                                     ARRAY[p.spend_cap], ARRAY[p.period_start],
                                     ARRAY[p.period_end]) r
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
    cutoff := p_as_of - billing._grace_period();
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
               NULL::bigint AS adjustment_id
          FROM arrays a,
               LATERAL billing._rate_periods(a.accounts, a.plans, a.currencies, a.caps,
                                             a.starts, a.ends) r
               JOIN due ON due.k = r.idx
        UNION ALL
        SELECT due.account_id, due.invoice_id,
               1000000 + row_number() OVER (PARTITION BY adj.account_id ORDER BY adj.adjustment_id),
               'adjustment', adj.meter,
               billing._adjustment_text(adj),
               adj.new_quantity - adj.old_quantity, adj.delta, NULL, NULL, NULL, adj.adjustment_id
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
                                          charge_id, price, adjustment_id)
        SELECT n.account_id, n.invoice_id, n.line_no, n.kind, n.meter, n.description, n.quantity,
               n.amount, n.unrounded_amount, n.charge_id, n.price, n.adjustment_id
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

-- ---- sql/install/60_rerate.sql ----
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
SELECT pg_catalog.pg_extension_config_dump('billing.usage_corrections', '');
SELECT pg_catalog.pg_extension_config_dump('billing.correction_id_seq', '');

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
    IF NOT EXISTS (SELECT 1 FROM billing.accounts a WHERE a.account_id = correct_usage.account_id) THEN
        RAISE EXCEPTION 'account % does not exist', correct_usage.account_id USING ERRCODE = '23503';
    END IF;
    IF m.aggregation NOT IN ('sum', 'count') THEN
        RAISE EXCEPTION 'meter "%" has aggregation %', m.meter, m.aggregation
            USING ERRCODE = '22023', DETAIL = 'Only sum and count meters take corrections.';
    END IF;
    IF delta IN ('NaN', 'Infinity', '-Infinity') OR NOT isfinite(bucket_start)
       OR date_bin(m.bucket_width, bucket_start, timestamptz '1970-01-01 00:00:00+00') <> bucket_start THEN
        RAISE EXCEPTION 'invalid usage correction'
            USING ERRCODE = '22023',
                  DETAIL = format('delta must be a number and bucket_start the start of a %s bucket.', m.bucket_width);
    END IF;
    -- corrections of one bucket one at a time (ingest only adds, so it cannot race below zero)
    PERFORM pg_advisory_xact_lock(1651074162,
        hashtext(format('%s/%s/%s/%s', account_id, meter, dimension, bucket_start)));
    SELECT coalesce(sum(u.quantity), 0) INTO cur
      FROM billing.usage_cells u
     WHERE u.account_id = correct_usage.account_id AND u.meter = correct_usage.meter
       AND u.dimension = correct_usage.dimension AND u.bucket_start = correct_usage.bucket_start;
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
 * difference.  Lines are matched by kind and meter (usage), description
 * (fixed fees) or kind alone (the spend cap).
 */
CREATE FUNCTION billing._rerate_diff(from_ts timestamptz, to_ts timestamptz, p_account bigint)
    RETURNS TABLE (account_id bigint, invoice_id bigint, line_kind text, meter text,
                   description text, billed_quantity numeric, billed_amount numeric,
                   correct_quantity numeric, correct_amount numeric, delta numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
BEGIN
    -- on Citus, a query over the invoices may not call _rate_period (it reads
    -- distributed tables itself): the same diff, one invoice at a time
    IF billing._citus_table_kind('billing.invoices') IS NOT NULL THEN
        RETURN QUERY SELECT * FROM billing._rerate_diff_citus(from_ts, to_ts, p_account);
        RETURN;
    END IF;
    RETURN QUERY
    WITH inv AS (
        SELECT i.account_id, i.invoice_id, i.plan, i.currency, i.period_start, i.period_end,
               s.spend_cap, s.starts_at, s.ends_at, p.period
          FROM billing.invoices i
               JOIN billing.plans p ON p.plan = i.plan
               LEFT JOIN billing.subscriptions s
                      ON s.account_id = i.account_id AND s.plan = i.plan
                     AND s.starts_at <= i.period_start
                     AND i.period_start < coalesce(s.ends_at, 'infinity')
         WHERE i.status = 'finalized'
           AND i.period_start < to_ts AND i.period_end > from_ts
           AND (p_account IS NULL OR i.account_id = p_account)
    ), covered AS (
        -- today's period bounds; a period the subscription no longer covers bills nothing
        SELECT inv.*, (row_number() OVER (ORDER BY inv.account_id, inv.invoice_id))::integer AS k,
               LEAST(billing._add_periods(inv.starts_at, inv.period,
                         billing._period_index(inv.starts_at, inv.period, inv.period_start) + 1),
                     inv.ends_at) AS pe
          FROM inv
         WHERE inv.starts_at IS NOT NULL
    ), arrays AS (
        SELECT array_agg(account_id ORDER BY k) AS accounts, array_agg(plan ORDER BY k) AS plans,
               array_agg(currency ORDER BY k) AS currencies, array_agg(spend_cap ORDER BY k) AS caps,
               array_agg(period_start ORDER BY k) AS starts, array_agg(pe ORDER BY k) AS ends
          FROM covered
    ), correct AS (
        -- today's lines, all periods in one set-based rating
        SELECT cv.account_id, cv.invoice_id, r.kind, r.meter, r.description, r.quantity, r.amount
          FROM arrays a,
               LATERAL billing._rate_periods(a.accounts, a.plans, a.currencies, a.caps,
                                             a.starts, a.ends) r
               JOIN covered cv ON cv.k = r.idx
    ), billed AS (
        SELECT l.account_id, l.invoice_id, l.kind, l.meter, l.description, l.quantity, l.amount
          FROM inv JOIN billing.invoice_lines l
                 ON l.account_id = inv.account_id AND l.invoice_id = inv.invoice_id
         WHERE l.kind <> 'adjustment'
        UNION ALL
        SELECT a.account_id, a.invoice_id, a.line_kind, a.meter, a.description,
               a.new_quantity - a.old_quantity, a.delta
          FROM inv JOIN billing.adjustments a
                 ON a.account_id = inv.account_id AND a.invoice_id = inv.invoice_id
    ), billed_sum AS (
        SELECT b.account_id, b.invoice_id, b.kind, b.meter,
               CASE WHEN b.kind = 'fixed' THEN b.description END AS fixed_key,
               max(b.description) AS description,
               sum(b.quantity) AS quantity, sum(b.amount) AS amount
          FROM billed b
         GROUP BY 1, 2, 3, 4, 5
    )
    SELECT coalesce(c.account_id, b.account_id), coalesce(c.invoice_id, b.invoice_id),
           coalesce(c.kind, b.kind), coalesce(c.meter, b.meter),
           coalesce(c.description, b.description),
           -- a usage line missing on either side billed or should bill 0 units
           CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(b.quantity, 0) ELSE b.quantity END,
           coalesce(b.amount, 0),
           CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(c.quantity, 0) ELSE c.quantity END,
           coalesce(c.amount, 0),
           coalesce(c.amount, 0) - coalesce(b.amount, 0)
      FROM correct c
           FULL JOIN billed_sum b
                  ON b.account_id = c.account_id AND b.invoice_id = c.invoice_id
                 AND b.kind = c.kind
                 AND b.meter IS NOT DISTINCT FROM c.meter
                 AND b.fixed_key IS NOT DISTINCT FROM CASE WHEN c.kind = 'fixed' THEN c.description END;
END
$$;
COMMENT ON FUNCTION billing._rerate_diff(timestamptz, timestamptz, bigint) IS
    'Internal: billed versus correct lines of the finalized invoices overlapping a range';

CREATE FUNCTION billing._rerate(from_ts timestamptz, to_ts timestamptz, p_account bigint,
                                dry_run boolean, p_reason text)
    RETURNS TABLE (r_account bigint, r_invoice bigint, r_meter text,
                   r_billed_quantity numeric, r_billed_amount numeric,
                   r_correct_quantity numeric, r_correct_amount numeric, r_delta numeric)
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
               d.correct_quantity, d.correct_amount, d.delta
          FROM billing._rerate_diff(from_ts, to_ts, p_account) d
         WHERE d.delta <> 0
         ORDER BY 1, 2, 3;
        RETURN;
    END IF;
    -- one re-rate at a time: a second run waits, then finds the first one's adjustments
    PERFORM pg_advisory_xact_lock(1651074162, 3);
    RETURN QUERY
    WITH d AS (
        SELECT * FROM billing._rerate_diff(from_ts, to_ts, p_account) x
         WHERE x.delta <> 0
    ), written AS (
        INSERT INTO billing.adjustments (account_id, invoice_id, line_kind, meter, description,
                                         old_quantity, new_quantity, old_amount, new_amount, delta,
                                         reason)
        SELECT d.account_id, d.invoice_id, d.line_kind, d.meter, d.description,
               d.billed_quantity, d.correct_quantity, d.billed_amount, d.correct_amount, d.delta,
               coalesce(p_reason, 're-rate')
          FROM d
         -- adjustment ids in invoice line order (fixed fees, usage, the cap)
         ORDER BY d.account_id, d.invoice_id,
                  CASE d.line_kind WHEN 'fixed' THEN 1 WHEN 'usage' THEN 2 ELSE 3 END,
                  d.description, d.meter
    )
    SELECT d.account_id, d.invoice_id, d.meter, d.billed_quantity, d.billed_amount,
           d.correct_quantity, d.correct_amount, d.delta
      FROM d
     ORDER BY 1, 2, 3;
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
                   correct_quantity numeric, correct_amount numeric, delta numeric)
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
            SELECT s.%1$I::bigint AS account_id, s.%2$I::text AS meter,
                   date_bin(m.bucket_width, s.%4$I, timestamptz '1970-01-01 00:00:00+00') AS bucket_start,
                   CASE m.aggregation
                       WHEN 'count' THEN count(*)::numeric
                       WHEN 'max' THEN max(s.%3$I::numeric)
                       WHEN 'last' THEN (array_agg(s.%3$I::numeric ORDER BY s.%4$I DESC))[1]
                       ELSE sum(s.%3$I::numeric) END AS quantity
              FROM %5$s s JOIN billing.meters m ON m.meter = s.%2$I::text
             WHERE s.%4$I >= $1 AND s.%4$I < $2
             GROUP BY 1, 2, 3, m.aggregation
        ), counted AS (
            SELECT u.account_id, u.meter::text AS meter, u.bucket_start,
                   CASE m.aggregation
                       WHEN 'max' THEN max(u.quantity)
                       WHEN 'last' THEN (array_agg(u.quantity ORDER BY u.last_ts DESC, u.last_seq DESC))[1]
                       ELSE sum(u.quantity) END AS quantity
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

-- PL/pgSQL: Citus plans its queries only with the argument's value
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
                  billing.round_money(billing.rate(x.price, coalesce(x.quantity, 0)), i.currency),
                  x.amount)
      FROM billing.invoice_lines x
           JOIN billing.invoices i ON i.account_id = x.account_id AND i.invoice_id = x.invoice_id
     WHERE (p_account IS NULL OR x.account_id = p_account) AND x.kind IN ('usage', 'fixed')
       AND (x.price IS NULL
            OR billing.round_money(billing.rate(x.price, coalesce(x.quantity, 0)), i.currency) <> x.amount)
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
    'Checks finalized invoices: each total is the sum of its lines, and each usage and fixed line is the rounded rating of its quantity with the price that rated it';

-- ---- sql/install/70_audit.sql ----
/*
 * The audit log (SPEC section 7) and the immutability of what it records
 * (SPEC section 5).
 *
 * One hash chain per account (account_id of the account concerned) and one
 * for catalog changes (account_id 0), so the log shards with the accounts.
 * A chain's head (last seq and hash) lives in billing.audit_heads; an
 * append locks that one row (SELECT ... FOR UPDATE) until the transaction
 * ends, so appends to one chain are serialized, seq stays gap-free, and
 * writers of different chains never wait for each other.
 *
 * What writes a row (action, chain, object):
 *   meters, plans, charges, metered_tables   insert/update/delete, chain 0
 *   accounts, subscriptions                   insert/update/delete, the account
 *   TRUNCATE of any of those tables           truncate, chain 0
 *   invoices (finalize_invoices)              finalize, the account
 *   adjustments (rerate)                      adjust, the account
 *   usage_corrections (correct_usage)         correct, the account
 *   a rerate run (not a dry run)              rerate, chain 0
 * The hash and its canonical encoding are in src/audit.c.
 */

CREATE TABLE billing.audit_log (
    account_id  bigint NOT NULL CHECK (account_id >= 0),
    seq         bigint NOT NULL CHECK (seq >= 1),
    at          timestamptz NOT NULL CHECK (pg_catalog.isfinite(at)),
    actor       text NOT NULL,
    action      text NOT NULL,
    object      text NOT NULL,
    details     jsonb NOT NULL,
    prev_hash   bytea,
    hash        bytea NOT NULL,
    PRIMARY KEY (account_id, seq)
);
COMMENT ON TABLE billing.audit_log IS
    'Append-only audit trail: one SHA-256 hash chain per account (account_id 0: catalog changes); hash = sha256(prev_hash || canonical row)';

CREATE TABLE billing.audit_heads (
    account_id  bigint PRIMARY KEY CHECK (account_id >= 0),
    seq         bigint NOT NULL CHECK (seq >= 0),
    hash        bytea
);
COMMENT ON TABLE billing.audit_heads IS
    'Last seq and hash of each audit chain; an append locks its chain''s row. Copy it elsewhere to anchor the chains';

SELECT pg_catalog.pg_extension_config_dump('billing.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('billing.audit_heads', '');

-- the C half ---------------------------------------------------------------------------

CREATE FUNCTION billing._audit_encode(account_id bigint, seq bigint, at timestamptz,
                                      actor text, action text, object text, details jsonb)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'billing_audit_encode'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._audit_encode(bigint, bigint, timestamptz, text, text, text, jsonb) IS
    'Internal: canonical encoding (version 1) of an audit row, the input of its hash (doc/billing.md, Guarantees)';

CREATE FUNCTION billing._audit_hash(prev_hash bytea, account_id bigint, seq bigint,
                                    at timestamptz, actor text, action text, object text,
                                    details jsonb)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'billing_audit_hash'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._audit_hash(bytea, bigint, bigint, timestamptz, text, text, text, jsonb) IS
    'Internal: sha256(prev_hash || canonical encoding of the row); a NULL prev_hash counts as no bytes';

CREATE FUNCTION billing._audit_chain_step(state bytea, head_hash bytea, account_id bigint,
                                          seq bigint, at timestamptz, actor text, action text,
                                          object text, details jsonb)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'billing_audit_chain_step'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._audit_chain_step(bytea, bytea, bigint, bigint, timestamptz, text, text, text, jsonb) IS
    'Internal: transition function of billing._audit_chain';

CREATE AGGREGATE billing._audit_chain(head_hash bytea, account_id bigint, seq bigint,
                                      at timestamptz, actor text, action text, object text,
                                      details jsonb) (
    SFUNC = billing._audit_chain_step,
    STYPE = bytea
);
COMMENT ON AGGREGATE billing._audit_chain(bytea, bigint, bigint, timestamptz, text, text, text, jsonb) IS
    'Internal: as a window aggregate over one chain''s new rows in seq order, the hash of each row (starting from the chain head''s hash)';

CREATE FUNCTION billing._audit_actor() RETURNS text
    AS 'MODULE_PATHNAME', 'billing_audit_actor'
    LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._audit_actor() IS
    'Internal: the role the client acts as (session user or SET ROLE), unchanged by SECURITY DEFINER functions';

CREATE FUNCTION billing._audit_suspended() RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_audit_suspended'
    LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION billing._audit_suspended() IS
    'Internal: true in a superuser session with check_function_bodies off (a pg_dump restore reloading audited tables)';

-- appending -----------------------------------------------------------------------------

/*
 * _audit_append: add a row to the chain of p_chain.  Locks the chain's
 * head row to the end of the transaction.  Under REPEATABLE READ or
 * SERIALIZABLE a concurrent append to the same chain makes this raise
 * 40001 (retry the transaction).
 */
CREATE FUNCTION billing._audit_append(p_chain bigint, p_action text, p_object text,
                                      p_details jsonb, p_on_placement boolean DEFAULT false)
    RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    v_seq   bigint;
    v_prev  bytea;
    v_at    timestamptz;
    v_actor text := billing._audit_actor();
    v_hash  bytea;
BEGIN
    -- on Citus, a trigger on a reference table fires on every node's copy:
    -- only the node holding the chain's shard writes the row
    IF p_on_placement AND NOT billing._citus_chain_is_local(p_chain) THEN
        RETURN NULL;
    END IF;
    SELECT h.seq, h.hash INTO v_seq, v_prev
      FROM billing.audit_heads h WHERE h.account_id = p_chain FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO billing.audit_heads (account_id, seq, hash) VALUES (p_chain, 0, NULL)
            ON CONFLICT (account_id) DO NOTHING;
        SELECT h.seq, h.hash INTO v_seq, v_prev
          FROM billing.audit_heads h WHERE h.account_id = p_chain FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'audit chain % was created by a concurrent transaction', p_chain
                USING ERRCODE = '40001', HINT = 'Retry the transaction.';
        END IF;
    END IF;
    -- taken under the lock: at never goes back within a chain
    v_at := clock_timestamp();
    v_seq := v_seq + 1;
    v_hash := billing._audit_hash(v_prev, p_chain, v_seq, v_at, v_actor, p_action, p_object,
                                  p_details);
    INSERT INTO billing.audit_log (account_id, seq, at, actor, action, object, details,
                                   prev_hash, hash)
    VALUES (p_chain, v_seq, v_at, v_actor, p_action, p_object, p_details, v_prev, v_hash);
    UPDATE billing.audit_heads SET seq = v_seq, hash = v_hash WHERE account_id = p_chain;
    RETURN v_seq;
END
$$;
COMMENT ON FUNCTION billing._audit_append(bigint, text, text, jsonb, boolean) IS
    'Internal: appends a row to one audit chain (serialized per chain by its head row); returns its seq, or NULL when a Citus placement leaves it to another node';

/*
 * _audit_append_many: _audit_append for many rows at once (one statement
 * writing adjustments or usage corrections), each chain's in the order of
 * p_keys (the adjustment or correction ids).  Locks
 * the chains' heads in account order, numbers each chain's rows after its
 * head, hashes them in order with the window aggregate _audit_chain, and
 * advances each head once.  One time stamp for the whole batch.  Not on
 * Citus (billing.distribute() puts the row-level triggers back).
 */
CREATE FUNCTION billing._audit_append_many(p_chains bigint[], p_keys bigint[], p_action text,
                                           p_objects text[], p_details jsonb[])
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    v_actor text := billing._audit_actor();
    v_at    timestamptz;
    n_heads integer;
BEGIN
    INSERT INTO billing.audit_heads (account_id, seq, hash)
    SELECT DISTINCT c, 0, NULL::bytea FROM unnest(p_chains) c
    ON CONFLICT (account_id) DO NOTHING;
    PERFORM 1 FROM billing.audit_heads h
      WHERE h.account_id = ANY (p_chains) ORDER BY h.account_id FOR UPDATE;
    GET DIAGNOSTICS n_heads = ROW_COUNT;
    IF n_heads <> (SELECT count(DISTINCT c) FROM unnest(p_chains) c) THEN
        RAISE EXCEPTION 'an audit chain was created by a concurrent transaction'
            USING ERRCODE = '40001', HINT = 'Retry the transaction.';
    END IF;
    -- taken under the locks: at never goes back within a chain
    v_at := clock_timestamp();
    WITH numbered AS (
        SELECT x.chain, x.object, x.details, h.hash AS head_hash,
               h.seq + row_number() OVER (PARTITION BY x.chain ORDER BY x.k) AS seq
          FROM unnest(p_chains, p_keys, p_objects, p_details) AS x(chain, k, object, details)
               JOIN billing.audit_heads h ON h.account_id = x.chain
    ), hashed AS (
        SELECT n.*, billing._audit_chain(n.head_hash, n.chain, n.seq, v_at, v_actor, p_action,
                                         n.object, n.details)
                        OVER (PARTITION BY n.chain ORDER BY n.seq) AS hash
          FROM numbered n
    ), written AS (
        INSERT INTO billing.audit_log (account_id, seq, at, actor, action, object, details,
                                       prev_hash, hash)
        SELECT y.chain, y.seq, v_at, v_actor, p_action, y.object, y.details,
               coalesce(lag(y.hash) OVER (PARTITION BY y.chain ORDER BY y.seq), y.head_hash), y.hash
          FROM hashed y
        RETURNING billing.audit_log.account_id, billing.audit_log.seq, billing.audit_log.hash
    )
    UPDATE billing.audit_heads h SET seq = w.seq, hash = w.hash
      FROM (SELECT DISTINCT ON (w.account_id) w.account_id, w.seq, w.hash
              FROM written w ORDER BY w.account_id, w.seq DESC) w
     WHERE h.account_id = w.account_id;
END
$$;
COMMENT ON FUNCTION billing._audit_append_many(bigint[], bigint[], text, text[], jsonb[]) IS
    'Internal: appends many rows to their audit chains in one go (the statement-level audit of adjustments and usage corrections)';

-- triggers ------------------------------------------------------------------------------

/*
 * _audit_change: AFTER ROW trigger of the audited reference tables, and
 * BEFORE/AFTER TRUNCATE statement trigger.  Arguments: the object kind
 * ('meter', 'account', ...), the chain ('catalog': 0, 'account': the row's
 * account_id), then the key columns naming the object.  Details: the row
 * images ({"new": ...}, {"old": ..., "new": ...}, {"old": ...}), rendered
 * in UTC.  An UPDATE that changes nothing writes nothing.
 */
CREATE FUNCTION billing._audit_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    o jsonb;
    n jsonb;
    r jsonb;
    k text;
    key text := '';
    chains bigint[];
    c bigint;
    -- on Citus the trigger fires on a shard or a reference table's copy,
    -- named after the table with the shard's number
    on_placement boolean := TG_TABLE_NAME ~ '_[0-9]+$';
    tbl text := regexp_replace(TG_TABLE_NAME, '_[0-9]+$', '');
BEGIN
    IF billing._audit_suspended() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM billing._audit_append(0, 'truncate', format('table:%s', tbl),
                                      jsonb_build_object('table', format('%I.%I', TG_TABLE_SCHEMA, tbl)),
                                      on_placement);
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        o := to_jsonb(OLD);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        n := to_jsonb(NEW);
    END IF;
    IF TG_OP = 'UPDATE' AND o = n THEN
        RETURN NULL;
    END IF;
    r := coalesce(n, o);
    FOR i IN 2 .. TG_NARGS - 1 LOOP
        k := r ->> TG_ARGV[i];
        key := key || CASE WHEN i > 2 THEN '/' ELSE '' END || coalesce(k, '');
    END LOOP;
    IF TG_ARGV[1] = 'catalog' THEN
        chains := ARRAY[0::bigint];
    ELSE
        chains := ARRAY(SELECT DISTINCT x FROM unnest(ARRAY[(o ->> 'account_id')::bigint,
                                                           (n ->> 'account_id')::bigint]) x
                         WHERE x IS NOT NULL ORDER BY x);
    END IF;
    FOREACH c IN ARRAY chains LOOP
        PERFORM billing._audit_append(c, lower(TG_OP), format('%s:%s', TG_ARGV[0], key),
                                      CASE TG_OP WHEN 'INSERT' THEN jsonb_build_object('new', n)
                                                 WHEN 'DELETE' THEN jsonb_build_object('old', o)
                                                 ELSE jsonb_build_object('old', o, 'new', n) END,
                                      on_placement);
    END LOOP;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing._audit_change() IS
    'Internal: audit trigger of meters, accounts, plans, charges, subscriptions and metered_tables';

CREATE TRIGGER meters_audit AFTER INSERT OR UPDATE OR DELETE ON billing.meters
    FOR EACH ROW EXECUTE FUNCTION billing._audit_change('meter', 'catalog', 'meter');
CREATE TRIGGER plans_audit AFTER INSERT OR UPDATE OR DELETE ON billing.plans
    FOR EACH ROW EXECUTE FUNCTION billing._audit_change('plan', 'catalog', 'plan');
CREATE TRIGGER charges_audit AFTER INSERT OR UPDATE OR DELETE ON billing.charges
    FOR EACH ROW EXECUTE FUNCTION billing._audit_change('charge', 'catalog', 'charge_id');
CREATE TRIGGER metered_tables_audit AFTER INSERT OR UPDATE OR DELETE ON billing.metered_tables
    FOR EACH ROW EXECUTE FUNCTION billing._audit_change('metered_table', 'catalog', 'tbl');
CREATE TRIGGER accounts_audit AFTER INSERT OR UPDATE OR DELETE ON billing.accounts
    FOR EACH ROW EXECUTE FUNCTION billing._audit_change('account', 'account', 'account_id');
CREATE TRIGGER subscriptions_audit AFTER INSERT OR UPDATE OR DELETE ON billing.subscriptions
    FOR EACH ROW EXECUTE FUNCTION billing._audit_change('subscription', 'account', 'account_id', 'starts_at');

CREATE TRIGGER meters_audit_truncate AFTER TRUNCATE ON billing.meters
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_change('meter', 'catalog');
CREATE TRIGGER plans_audit_truncate AFTER TRUNCATE ON billing.plans
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_change('plan', 'catalog');
CREATE TRIGGER charges_audit_truncate AFTER TRUNCATE ON billing.charges
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_change('charge', 'catalog');
CREATE TRIGGER metered_tables_audit_truncate AFTER TRUNCATE ON billing.metered_tables
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_change('metered_table', 'catalog');
CREATE TRIGGER accounts_audit_truncate AFTER TRUNCATE ON billing.accounts
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_change('account', 'catalog');
CREATE TRIGGER subscriptions_audit_truncate AFTER TRUNCATE ON billing.subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_change('subscription', 'catalog');

/*
 * _audit_invoice: AFTER INSERT ROW trigger of invoices.  The row carries
 * the invoice and its lines as written by the same statement (finalize
 * writes both in one statement), so verify_audit_log can tell when either
 * changed later.  On Citus, where an invoice and its lines are written by
 * two statements, billing.distribute() makes it a deferred constraint
 * trigger: the row is written at commit.
 */
CREATE FUNCTION billing._audit_invoice() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
BEGIN
    IF billing._audit_suspended() THEN
        RETURN NULL;
    END IF;
    PERFORM billing._audit_append(
        NEW.account_id, 'finalize', format('invoice:%s', NEW.invoice_id),
        jsonb_build_object(
            'invoice', to_jsonb(NEW),
            'lines', (SELECT coalesce(jsonb_agg(to_jsonb(l) ORDER BY l.line_no), '[]'::jsonb)
                        FROM billing.invoice_lines l
                       WHERE l.account_id = NEW.account_id AND l.invoice_id = NEW.invoice_id)));
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing._audit_invoice() IS
    'Internal: writes the audit row of a finalized invoice, with its lines';
CREATE TRIGGER invoices_audit AFTER INSERT ON billing.invoices
    FOR EACH ROW EXECUTE FUNCTION billing._audit_invoice();

/*
 * _audit_insert: AFTER INSERT ROW trigger of adjustments and
 * usage_corrections.  Arguments: action, object kind, key column.
 */
CREATE FUNCTION billing._audit_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    n jsonb := to_jsonb(NEW);
BEGIN
    IF billing._audit_suspended() THEN
        RETURN NULL;
    END IF;
    PERFORM billing._audit_append((n ->> 'account_id')::bigint, TG_ARGV[0],
                                  format('%s:%s', TG_ARGV[1], n ->> TG_ARGV[2]), n);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing._audit_insert() IS
    'Internal: writes the audit row of an adjustment or a usage correction (the row-level trigger billing.distribute() installs on Citus)';

/*
 * _audit_insert_rows: the same as an AFTER INSERT statement trigger (one
 * set-based append per statement: a rerate writes thousands of
 * adjustments).  Arguments as _audit_insert's; each chain's rows in key
 * order.
 */
CREATE FUNCTION billing._audit_insert_rows() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    chains bigint[];
    keys bigint[];
    objects text[];
    details jsonb[];
BEGIN
    IF billing._audit_suspended() THEN
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT array_agg(n.account_id), array_agg(n.%1$I), array_agg(%2$L || n.%1$I),
                           array_agg(to_jsonb(n))
                      FROM new_rows n', TG_ARGV[2], TG_ARGV[1] || ':')
       INTO chains, keys, objects, details;
    IF chains IS NOT NULL THEN
        PERFORM billing._audit_append_many(chains, keys, TG_ARGV[0], objects, details);
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing._audit_insert_rows() IS
    'Internal: writes the audit rows of the adjustments or usage corrections one statement inserted';
CREATE TRIGGER adjustments_audit AFTER INSERT ON billing.adjustments
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_insert_rows('adjust', 'adjustment', 'adjustment_id');
CREATE TRIGGER usage_corrections_audit AFTER INSERT ON billing.usage_corrections
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_insert_rows('correct', 'usage_correction', 'correction_id');

/*
 * _audit_rerate: the row of one rerate run (called by billing._rerate after
 * it wrote its adjustments; dry runs change nothing and write nothing).
 * In the catalog chain: a run may span every account.  Each adjustment
 * also has its own row in its account's chain.
 */
CREATE FUNCTION billing._audit_rerate(from_ts timestamptz, to_ts timestamptz, p_account bigint,
                                      p_reason text, p_adjustments bigint)
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
BEGIN
    IF billing._audit_suspended() THEN
        RETURN;
    END IF;
    PERFORM billing._audit_append(0, 'rerate', 'rerate',
        jsonb_build_object('from_ts', from_ts, 'to_ts', to_ts, 'account_id', p_account,
                           'reason', p_reason, 'adjustments', p_adjustments));
END
$$;
COMMENT ON FUNCTION billing._audit_rerate(timestamptz, timestamptz, bigint, text, bigint) IS
    'Internal: writes the audit row of a rerate run (range, account filter, reason, adjustments written)';

-- the actor of adjustments and corrections: the client's role, also inside SECURITY DEFINER
ALTER TABLE billing.adjustments ALTER COLUMN actor SET DEFAULT billing._audit_actor();
ALTER TABLE billing.usage_corrections ALTER COLUMN actor SET DEFAULT billing._audit_actor();

-- immutability ----------------------------------------------------------------------------

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON billing.audit_log
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change('audit_log is append-only.');
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON billing.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('audit_log is append-only.');
CREATE TRIGGER usage_corrections_append_only BEFORE UPDATE OR DELETE ON billing.usage_corrections
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change('usage_corrections is append-only.');
CREATE TRIGGER usage_corrections_no_truncate BEFORE TRUNCATE ON billing.usage_corrections
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('usage_corrections is append-only.');

-- a chain head only moves forward and is never removed (the condition is
-- checked without a function call on every append)
CREATE TRIGGER audit_heads_guard BEFORE UPDATE ON billing.audit_heads
    FOR EACH ROW WHEN (NOT (NEW.account_id = OLD.account_id AND NEW.seq > OLD.seq))
    EXECUTE FUNCTION billing._refuse_change(
        'An audit chain head only moves forward, with the rows appended to its chain.');
CREATE TRIGGER audit_heads_no_delete BEFORE DELETE ON billing.audit_heads
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change(
        'An audit chain head only moves forward, with the rows appended to its chain.');
CREATE TRIGGER audit_heads_no_truncate BEFORE TRUNCATE ON billing.audit_heads
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('audit_heads is append-only.');

-- an adjustment is written once; finalization only records the invoice that carried it
CREATE FUNCTION billing._adjustments_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.billed_invoice_id IS NULL AND NEW.billed_invoice_id IS NOT NULL
       AND (to_jsonb(NEW) - 'billed_invoice_id') = (to_jsonb(OLD) - 'billed_invoice_id') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% of adjustments is not allowed', lower(TG_OP)
        USING ERRCODE = '55000',
              DETAIL = 'An adjustment never changes, except to record once the invoice that carried it.',
              HINT = 'Correct an adjustment with a later rerate, which writes a new one.';
END
$$;
COMMENT ON FUNCTION billing._adjustments_guard() IS
    'Internal: adjustments are immutable but for billed_invoice_id, set once by finalization';
CREATE TRIGGER adjustments_guard BEFORE UPDATE OR DELETE ON billing.adjustments
    FOR EACH ROW EXECUTE FUNCTION billing._adjustments_guard();
CREATE TRIGGER adjustments_no_truncate BEFORE TRUNCATE ON billing.adjustments
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('adjustments is append-only.');

-- verification ----------------------------------------------------------------------------

/*
 * verify_audit_log: every row of every chain, checked on its own, so one
 * problem is reported where it is and not at every later row:
 *   - seq must follow the previous row's seq by one (1 for the first row):
 *     rows were removed or inserted;
 *   - prev_hash must be the previous row's hash: a row was removed, or the
 *     previous row's hash was rewritten;
 *   - hash must be sha256(prev_hash || canonical row): the row was altered;
 *   - the last row must be the chain head of billing.audit_heads: rows
 *     were removed at or appended past the end;
 * and what the log records must still be so: each finalized invoice (and
 * its lines), adjustment and usage correction must have its audit row and
 * still match it (billed_invoice_id of adjustments excepted, set later).
 * A rewrite of a whole chain from some row up to its head, head included,
 * is only detected against a copy of audit_heads kept elsewhere.
 */
CREATE FUNCTION billing.verify_audit_log()
    RETURNS TABLE (account_id bigint, seq bigint, problem text)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
    WITH chain AS (
        SELECT a.*, lag(a.seq) OVER w AS p_seq, lag(a.hash) OVER w AS p_hash,
               lead(a.seq) OVER w IS NULL AS is_last
          FROM billing.audit_log a
        WINDOW w AS (PARTITION BY a.account_id ORDER BY a.seq)
    ), row_problems AS (
        SELECT c.account_id, c.seq,
               CASE
                   WHEN c.seq <> coalesce(c.p_seq, 0) + 1 THEN
                       format('seq %s follows %s: rows were removed or inserted',
                              c.seq, coalesce(c.p_seq::text, 'the start of the chain'))
                   WHEN c.prev_hash IS DISTINCT FROM c.p_hash THEN
                       'prev_hash is not the hash of the previous row'
                   WHEN c.hash IS DISTINCT FROM
                        billing._audit_hash(c.prev_hash, c.account_id, c.seq, c.at, c.actor,
                                            c.action, c.object, c.details) THEN
                       'hash does not match the row: the row was altered'
               END AS problem
          FROM chain c
    ), head_problems AS (
        SELECT coalesce(h.account_id, c.account_id) AS account_id,
               coalesce(c.seq, h.seq) AS seq,
               CASE
                   WHEN h.account_id IS NULL THEN 'no chain head for this chain'
                   WHEN c.account_id IS NULL AND h.seq > 0 THEN
                       format('chain head is at seq %s but the chain has no rows', h.seq)
                   WHEN c.seq <> h.seq THEN
                       format('last row is seq %s but the chain head is at seq %s', c.seq, h.seq)
                   WHEN c.hash IS DISTINCT FROM h.hash THEN
                       'last row''s hash is not the chain head''s hash'
               END AS problem
          FROM (SELECT * FROM chain WHERE is_last) c
               FULL JOIN billing.audit_heads h ON h.account_id = c.account_id
    ), recorded AS (
        SELECT a.account_id, a.seq, a.action, a.object, a.details
          FROM billing.audit_log a
         WHERE a.action IN ('finalize', 'adjust', 'correct')
    ), invoice_problems AS (
        -- lines compared in line_no order, each recorded line contained in
        -- today's line at the same place (one lateral per invoice: Citus
        -- pushes it down to the shards)
        SELECT i.account_id, r.seq,
               CASE
                   WHEN r.seq IS NULL THEN format('invoice %s has no audit row', i.invoice_id)
                   WHEN NOT to_jsonb(i) @> (r.details -> 'invoice')
                        OR jsonb_array_length(r.details -> 'lines') <> jsonb_array_length(l.lines)
                        OR EXISTS (SELECT 1
                                     FROM generate_series(0, jsonb_array_length(l.lines) - 1) k
                                    WHERE NOT (l.lines -> k) @> (r.details -> 'lines' -> k)) THEN
                       format('invoice %s differs from its audit row', i.invoice_id)
               END AS problem
          FROM billing.invoices i
               LEFT JOIN recorded r
                      ON r.account_id = i.account_id AND r.action = 'finalize'
                     AND r.object = format('invoice:%s', i.invoice_id)
               LEFT JOIN LATERAL (SELECT coalesce(jsonb_agg(to_jsonb(x) ORDER BY x.line_no),
                                                  '[]'::jsonb) AS lines
                                    FROM billing.invoice_lines x
                                   WHERE x.account_id = i.account_id
                                     AND x.invoice_id = i.invoice_id) l ON true
    ), adjustment_problems AS (
        SELECT j.account_id, r.seq,
               CASE
                   WHEN r.seq IS NULL THEN format('adjustment %s has no audit row', j.adjustment_id)
                   WHEN NOT (to_jsonb(j) - 'billed_invoice_id') @> (r.details - 'billed_invoice_id') THEN
                       format('adjustment %s differs from its audit row', j.adjustment_id)
               END AS problem
          FROM billing.adjustments j
               LEFT JOIN recorded r
                      ON r.account_id = j.account_id AND r.action = 'adjust'
                     AND r.object = format('adjustment:%s', j.adjustment_id)
    ), correction_problems AS (
        SELECT u.account_id, r.seq,
               CASE
                   WHEN r.seq IS NULL THEN format('usage correction %s has no audit row', u.correction_id)
                   WHEN NOT to_jsonb(u) @> r.details THEN
                       format('usage correction %s differs from its audit row', u.correction_id)
               END AS problem
          FROM billing.usage_corrections u
               LEFT JOIN recorded r
                      ON r.account_id = u.account_id AND r.action = 'correct'
                     AND r.object = format('usage_correction:%s', u.correction_id)
    )
    SELECT p.account_id, p.seq, p.problem
      FROM (SELECT * FROM row_problems
            UNION ALL SELECT * FROM head_problems
            UNION ALL SELECT * FROM invoice_problems
            UNION ALL SELECT * FROM adjustment_problems
            UNION ALL SELECT * FROM correction_problems) p
     WHERE p.problem IS NOT NULL
     ORDER BY 1, 2, 3
$$;
COMMENT ON FUNCTION billing.verify_audit_log() IS
    'Checks every audit chain (seq, prev_hash, hash, head) and that finalized invoices, adjustments and usage corrections still match their audit rows; returns nothing when all is intact';

-- ---- sql/install/90_distribute.sql ----
/*
 * Scaling out on Citus (issue 8).
 *
 * billing.distribute(), run once by an admin on the coordinator after
 * CREATE EXTENSION citus (every node) and CREATE EXTENSION billing, turns
 * the schema into a distributed one:
 *
 *   - every table with an account_id column is distributed by account_id,
 *     co-located with billing.accounts (so one account's rows of every
 *     table live on one node);
 *   - every other table of the schema (meters, plans, charges,
 *     ingest_offsets, ...) becomes a reference table, copied to every
 *     node, except billing.metered_tables (regclass values are per node;
 *     only meter_table/unmeter_table on the coordinator read it);
 *   - the per-account functions are registered with
 *     create_distributed_function on their account_id argument, so that a
 *     call runs on the node that holds the account.
 *
 * The schema keeps the rules this needs (the pgTAP test citus_rules.sql
 * checks them without Citus): every primary or unique key of a table with
 * account_id starts with account_id, and such a table has foreign keys only
 * to reference tables or to a co-located table on (account_id, ...).
 */

/*
 * _citus_table_kind: 'distributed', 'reference' or NULL (not a Citus
 * table, or Citus missing).  Reads the catalog dynamically so that the
 * extension installs without Citus.
 */
CREATE FUNCTION billing._citus_table_kind(rel regclass) RETURNS text
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    method "char";
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE 'SELECT partmethod FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1'
        INTO method USING rel;
    RETURN CASE WHEN method IS NULL THEN NULL WHEN method = 'h' THEN 'distributed'
                WHEN method = 'n' THEN 'reference' ELSE 'other' END;
END
$$;
COMMENT ON FUNCTION billing._citus_table_kind(regclass) IS
    'Internal: how Citus holds a table (distributed, reference) or NULL when it does not';

/*
 * _in_citus_task: is this backend running a statement that another Citus
 * node sent (a shard or reference placement task)?  Guards that read
 * every shard skip their check there: the node the client talks to has
 * run it already, and a task may not start distributed queries.
 */
CREATE FUNCTION billing._in_citus_task() RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_catalog.current_setting('application_name') LIKE 'citus\_internal gpid=%'
$$;
COMMENT ON FUNCTION billing._in_citus_task() IS
    'Internal: true in a backend executing a task sent by another Citus node';

/*
 * _citus_chain_is_local: does this node hold the shard of audit chain
 * p_chain?  True when the audit log is not distributed.  A trigger on a
 * reference table fires on every node's copy in one distributed
 * transaction; only the node holding the chain writes the audit row.
 */
CREATE FUNCTION billing._citus_chain_is_local(p_chain bigint) RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF billing._citus_table_kind('billing.audit_log') IS DISTINCT FROM 'distributed' THEN
        RETURN true;
    END IF;
    RETURN EXISTS (SELECT 1 FROM pg_dist_placement p
                    WHERE p.shardid = get_shard_id_for_distribution_column('billing.audit_log', p_chain)
                      AND p.groupid = (SELECT l.groupid FROM pg_dist_local_group l));
END
$$;
COMMENT ON FUNCTION billing._citus_chain_is_local(bigint) IS
    'Internal: true when this node holds the audit chain (always, without Citus)';

/*
 * The per-account functions and the argument that names the account.  A
 * call whose account argument is a constant, outside an explicit
 * transaction block, is run on the node holding that account.
 */
CREATE FUNCTION billing._distributed_functions()
    RETURNS TABLE (fn regprocedure, account_arg text)
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    VALUES ('billing.record(bigint,text,numeric,timestamptz,text,text)'::regprocedure, '$1'),
           ('billing.report_cumulative(text,bigint,text,timestamptz,numeric,text)', '$2'),
           ('billing.usage(bigint,timestamptz,timestamptz,interval,text)', '$1'),
           ('billing.remaining(bigint,text,timestamptz)', '$1'),
           ('billing.invoice_preview(bigint,timestamptz)', '$1'),
           ('billing.correct_usage(bigint,text,timestamptz,numeric,text,text)', '$1')
$$;
COMMENT ON FUNCTION billing._distributed_functions() IS
    'Internal: the per-account functions billing.distribute() registers with Citus, with their account argument';

/*
 * _meter_table_citus: meter_table's check on Citus.  When billing is
 * distributed and the metered table is a Citus table, its rows are counted
 * by triggers firing on its shards, which may write only co-located shards:
 * the table must be distributed by its account column with
 * billing.accounts.  Allows the triggers (citus.enable_unsafe_triggers) for
 * the rest of the transaction.  A plain table on the coordinator needs
 * nothing: its triggers run there and Citus routes their writes.
 */
CREATE FUNCTION billing._meter_table_citus(tbl regclass, account_column name) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    kind text := billing._citus_table_kind(tbl);
BEGIN
    IF kind IS NULL OR billing._citus_table_kind('billing.accounts') IS NULL THEN
        RETURN;
    END IF;
    IF kind <> 'distributed' OR NOT EXISTS (
        SELECT 1 FROM pg_dist_partition p, pg_dist_partition a
         WHERE p.logicalrelid = tbl AND a.logicalrelid = 'billing.accounts'::regclass
           AND p.colocationid = a.colocationid
           AND column_to_column_name(p.logicalrelid, p.partkey) = account_column) THEN
        RAISE EXCEPTION 'metered table % must be distributed by its account column with billing.accounts', tbl
            USING ERRCODE = '55000',
                  DETAIL = 'Its triggers count each row on the node of the row''s shard, which must also hold the account''s counters.',
                  HINT = format('SELECT create_distributed_table(%L, %L, colocate_with => %L)',
                                tbl::text, account_column, 'billing.accounts');
    END IF;
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
END
$$;
COMMENT ON FUNCTION billing._meter_table_citus(regclass, name) IS
    'Internal: on Citus, a metered Citus table must be co-located with billing.accounts by its account column';

/*
 * _rerate_diff_citus: billing._rerate_diff on Citus.  The single-node query
 * calls _rate_period inside a query over the invoices; on Citus that query
 * runs on the shards, where a function may not start distributed queries of
 * its own.  Here the invoices are read first, then for each one today's
 * lines (a query over functions only, which runs on this node) and what was
 * billed (one router query), matched the same way.
 */
CREATE FUNCTION billing._rerate_diff_citus(from_ts timestamptz, to_ts timestamptz, p_account bigint)
    RETURNS TABLE (account_id bigint, invoice_id bigint, line_kind text, meter text,
                   description text, billed_quantity numeric, billed_amount numeric,
                   correct_quantity numeric, correct_amount numeric, delta numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
#variable_conflict use_column
DECLARE
    inv record;
    rc record;
    rb record;
BEGIN
    FOR inv IN
        SELECT i.account_id, i.invoice_id, i.plan, i.currency, i.period_start, i.period_end,
               s.spend_cap, s.starts_at, s.ends_at, p.period
          FROM billing.invoices i
               JOIN billing.plans p ON p.plan = i.plan
               LEFT JOIN billing.subscriptions s
                      ON s.account_id = i.account_id AND s.plan = i.plan
                     AND s.starts_at <= i.period_start
                     AND i.period_start < coalesce(s.ends_at, 'infinity')
         WHERE i.status = 'finalized'
           AND i.period_start < to_ts AND i.period_end > from_ts
           AND (p_account IS NULL OR i.account_id = p_account)
         ORDER BY i.account_id, i.invoice_id
    LOOP
        -- today's lines; a period the subscription no longer covers bills nothing
        SELECT array_agg(r.kind) AS kinds, array_agg(r.meter) AS meters,
               array_agg(r.description) AS descriptions, array_agg(r.quantity) AS quantities,
               array_agg(r.amount) AS amounts
          INTO rc
          FROM billing._rate_period(inv.account_id, inv.plan, inv.currency, inv.spend_cap,
                                    inv.period_start,
                                    LEAST(billing._add_periods(inv.starts_at, inv.period,
                                              billing._period_index(inv.starts_at, inv.period,
                                                                    inv.period_start) + 1),
                                          inv.ends_at)) r
         WHERE inv.starts_at IS NOT NULL;
        -- what was billed: the lines plus the adjustments made since
        SELECT array_agg(x.kind) AS kinds, array_agg(x.meter) AS meters,
               array_agg(x.fixed_key) AS fixed_keys, array_agg(x.description) AS descriptions,
               array_agg(x.quantity) AS quantities, array_agg(x.amount) AS amounts
          INTO rb
          FROM (SELECT y.kind, y.meter::text AS meter,
                       CASE WHEN y.kind = 'fixed' THEN y.description END AS fixed_key,
                       max(y.description) AS description, sum(y.quantity) AS quantity,
                       sum(y.amount) AS amount
                  FROM (SELECT l.kind, l.meter, l.description, l.quantity, l.amount
                          FROM billing.invoice_lines l
                         WHERE l.account_id = inv.account_id AND l.invoice_id = inv.invoice_id
                           AND l.kind <> 'adjustment'
                        UNION ALL
                        SELECT a.line_kind, a.meter, a.description,
                               a.new_quantity - a.old_quantity, a.delta
                          FROM billing.adjustments a
                         WHERE a.account_id = inv.account_id AND a.invoice_id = inv.invoice_id) y
                 GROUP BY 1, 2, 3) x;
        RETURN QUERY
        SELECT inv.account_id, inv.invoice_id, coalesce(c.kind, b.kind), coalesce(c.meter, b.meter),
               coalesce(c.description, b.description),
               b.quantity, coalesce(b.amount, 0), c.quantity, coalesce(c.amount, 0),
               coalesce(c.amount, 0) - coalesce(b.amount, 0)
          FROM unnest(rc.kinds, rc.meters, rc.descriptions, rc.quantities, rc.amounts)
                   AS c(kind, meter, description, quantity, amount)
               FULL JOIN unnest(rb.kinds, rb.meters, rb.fixed_keys, rb.descriptions,
                                rb.quantities, rb.amounts)
                   AS b(kind, meter, fixed_key, description, quantity, amount)
                  ON b.kind = c.kind
                 AND b.meter IS NOT DISTINCT FROM c.meter
                 AND b.fixed_key IS NOT DISTINCT FROM CASE WHEN c.kind = 'fixed' THEN c.description END;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._rerate_diff_citus(timestamptz, timestamptz, bigint) IS
    'Internal: _rerate_diff on Citus, one invoice at a time';

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
    FOREACH agg IN ARRAY ARRAY['sum', 'count', 'max', 'last'] LOOP
        EXECUTE format($q$
            INSERT INTO billing.%I AS b (account_id, meter, dimension, bucket_start, quantity,
                                         events, last_ts, last_seq)
            SELECT account_id, meter, dimension, %s,
                   %s, sum(events)::bigint, max(last_ts),
                   (array_agg(last_seq ORDER BY last_ts DESC, last_seq DESC))[1]
              FROM billing_compact_cells
             WHERE aggregation = %L
             GROUP BY 1, 2, 3, 4
            ON CONFLICT (account_id, meter, bucket_start, dimension) DO UPDATE
               SET quantity = billing._combine(%L, b.quantity, b.last_ts, b.last_seq,
                                               excluded.quantity, excluded.last_ts, excluded.last_seq),
                   events = b.events + excluded.events,
                   last_ts = CASE WHEN (excluded.last_ts, excluded.last_seq) > (b.last_ts, b.last_seq)
                                  THEN excluded.last_ts ELSE b.last_ts END,
                   last_seq = CASE WHEN (excluded.last_ts, excluded.last_seq) > (b.last_ts, b.last_seq)
                                   THEN excluded.last_seq ELSE b.last_seq END
            $q$,
            target,
            CASE WHEN grain IS NULL THEN 'bucket_start'
                 ELSE format('date_bin(%L, bucket_start, timestamptz %L)', grain, '1970-01-01 00:00:00+00') END,
            CASE agg WHEN 'max' THEN 'max(quantity)'
                     WHEN 'last' THEN '(array_agg(quantity ORDER BY last_ts DESC, last_seq DESC))[1]'
                     ELSE 'sum(quantity)' END,
            agg, agg);
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._compact_into_citus(text, interval) IS
    'Internal: _compact_into on Citus, one upsert per aggregation';

/*
 * _finalize_citus: the body of finalize_invoices on Citus, for the periods
 * ended by cutoff.  The single-node body writes every invoice in one
 * statement that rates periods inside a query over distributed tables,
 * which Citus refuses.  Here: each subscription's due periods in order
 * (under the account's row lock), each rated by a query over functions
 * only, then written with one statement per table.  The account's pending
 * adjustments go on its earliest new invoice, as on one node.
 */
CREATE FUNCTION billing._finalize_citus(cutoff timestamptz)
    RETURNS TABLE (r_invoice_id bigint, r_account_id bigint, r_period_start timestamptz,
                   r_period_end timestamptz, r_total numeric)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    s record;
    per record;
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
    FOR s IN
        SELECT sub.account_id, sub.plan, sub.starts_at, sub.ends_at, sub.spend_cap,
               p.period, p.currency
          FROM billing.subscriptions sub JOIN billing.plans p ON p.plan = sub.plan
         WHERE sub.starts_at < cutoff
         ORDER BY sub.account_id, sub.starts_at
    LOOP
        PERFORM 1 FROM billing.accounts a WHERE a.account_id = s.account_id FOR NO KEY UPDATE;
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
            inv := nextval('billing.invoice_id_seq');
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
                              FROM billing._rate_period(s.account_id, s.plan, s.currency, s.spend_cap,
                                                        per.ps, per.pe) r
                            UNION ALL
                            SELECT 1000000 + row_number() OVER (ORDER BY a.adjustment_id), 'adjustment',
                                   a.meter, a.description, a.quantity, a.amount, NULL, NULL, NULL,
                                   a.adjustment_id
                              FROM billing._pending_adjustments(s.account_id) a) x) n;
            INSERT INTO billing.invoices (account_id, invoice_id, plan, period_start, period_end,
                                          currency, total)
            VALUES (s.account_id, inv, s.plan, per.ps, per.pe, s.currency, l_total);
            INSERT INTO billing.invoice_lines (account_id, invoice_id, line_no, kind, meter,
                                              description, quantity, amount, unrounded_amount,
                                              charge_id, price, adjustment_id)
            SELECT s.account_id, inv, u.*
              FROM unnest(l_no, l_kind, l_meter, l_description, l_quantity, l_amount, l_unrounded,
                          l_charge, l_price, l_adjustment) u;
            UPDATE billing.adjustments a SET billed_invoice_id = inv
             WHERE a.account_id = s.account_id AND a.adjustment_id = ANY (l_adjustment);
            r_invoice_id := inv;
            r_account_id := s.account_id;
            r_period_start := per.ps;
            r_period_end := per.pe;
            r_total := l_total;
            RETURN NEXT;
        END LOOP;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._finalize_citus(timestamptz) IS
    'Internal: finalize_invoices on Citus, one period at a time';

/*
 * _usage_totals_citus: the quantity per meter of one account over [from_ts,
 * to_ts) on Citus, from the minute buckets at the edges, hour and day
 * roll-ups, and the deltas: one router query to the account's shards (the
 * set-based _usage_totals_many joins many accounts with arrays, which Citus
 * cannot plan).  _usage_totals_many calls it once per account.
 */
CREATE FUNCTION billing._usage_totals_citus(p_account bigint, from_ts timestamptz, to_ts timestamptz)
    RETURNS TABLE (meter text, quantity numeric)
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    -- [from_ts, to_ts) = minutes [from_ts, h0) + hours [h0, d0) + days [d0, d1)
    --                  + hours [d1, h1) + minutes [h1, to_ts), with h0/h1 the
    -- first/last whole hour and d0/d1 the first/last whole UTC day inside
    h0 timestamptz := (date_bin('1 hour', from_ts - interval '1 microsecond', timestamptz '1970-01-01 00:00:00+00') + interval '1 hour');
    h1 timestamptz := date_bin('1 hour', to_ts, timestamptz '1970-01-01 00:00:00+00');
    d0 timestamptz := (date_bin('1 day', from_ts - interval '1 microsecond', timestamptz '1970-01-01 00:00:00+00') + interval '1 day');
    d1 timestamptz := date_bin('1 day', to_ts, timestamptz '1970-01-01 00:00:00+00');
    m_end timestamptz := LEAST(h0, to_ts);                 -- leading minutes end
    m_start timestamptz := GREATEST(h1, h0, from_ts);      -- trailing minutes start
    hh_end timestamptz := LEAST(d0, h1);                   -- leading hours end
    ht_start timestamptz := GREATEST(d1, d0, h0);          -- trailing hours start
BEGIN
    -- one index range per meter and table: (account_id, meter, bucket_start)
    RETURN QUERY
    WITH cells AS (
        SELECT m.meter, c.quantity, c.last_ts, c.last_seq
          FROM billing.meters m
               CROSS JOIN LATERAL (
                   SELECT u.quantity, u.last_ts, u.last_seq FROM billing.usage_buckets u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= from_ts AND u.bucket_start < m_end
                   UNION ALL
                   SELECT u.quantity, u.last_ts, u.last_seq FROM billing.usage_buckets u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= m_start AND u.bucket_start < to_ts
                   UNION ALL
                   SELECT u.quantity, u.last_ts, u.last_seq FROM billing.usage_hourly u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= h0 AND u.bucket_start < hh_end
                   UNION ALL
                   SELECT u.quantity, u.last_ts, u.last_seq FROM billing.usage_hourly u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= ht_start AND u.bucket_start < h1
                   UNION ALL
                   SELECT u.quantity, u.last_ts, u.last_seq FROM billing.usage_daily u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= d0 AND u.bucket_start < d1
               ) c
        UNION ALL
        -- not yet compacted
        SELECT x.meter, x.quantity, x.last_ts, d.seq
          FROM billing.usage_deltas d, billing._delta_cells(d.cells) x
         WHERE d.account_id = p_account AND x.bucket_start >= from_ts AND x.bucket_start < to_ts
    )
    SELECT c.meter::text,
           CASE m.aggregation
               WHEN 'max' THEN max(c.quantity)
               WHEN 'last' THEN (array_agg(c.quantity ORDER BY c.last_ts DESC, c.last_seq DESC))[1]
               ELSE sum(c.quantity) END
      FROM cells c JOIN billing.meters m ON m.meter = c.meter
     GROUP BY c.meter, m.aggregation;
END
$$;

COMMENT ON FUNCTION billing._usage_totals_citus(bigint, timestamptz, timestamptz) IS
    'Internal: usage totals of one account on Citus (a router query)';

CREATE FUNCTION billing.distribute()
    RETURNS TABLE (object text, distribution text, changed boolean)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    t record;
    f record;
    fk record;
    fks text[] := '{}';
    kind text;
    had_rows boolean;
    emptied regclass[] := '{}';
    rel regclass;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'citus is not installed'
            USING ERRCODE = '55000',
                  DETAIL = 'billing.distribute() shards the billing tables with Citus.',
                  HINT = 'Load citus (shared_preload_libraries), run CREATE EXTENSION citus on every node, add the workers, then call billing.distribute() on the coordinator.';
    END IF;
    IF NOT citus_is_coordinator() THEN
        RAISE EXCEPTION 'billing.distribute() must run on the coordinator'
            USING ERRCODE = '55000';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_dist_node WHERE groupid = 0) THEN
        RAISE EXCEPTION 'the coordinator is not in the Citus metadata'
            USING ERRCODE = '55000',
                  DETAIL = 'Reference tables need a copy on the coordinator, where guards on them run.',
                  HINT = 'Run SELECT citus_set_coordinator_host(''host'', port) first.';
    END IF;

    -- the billing triggers move with their tables (they write only the
    -- account's own, co-located rows); one connection per node keeps the
    -- foreign keys created in this transaction valid
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);

    -- Citus enforces unique keys per shard only, so they must hold the
    -- distribution column: invoice numbers stay unique through their sequence
    IF to_regclass('billing.invoices_invoice_id_key') IS NOT NULL THEN
        DROP INDEX billing.invoices_invoice_id_key;
    END IF;

    -- on Citus an invoice and its lines are written by two statements
    -- (_finalize_citus): its audit row, which carries the lines, is written
    -- at commit
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                    WHERE tgrelid = 'billing.invoices'::regclass AND tgname = 'invoices_audit'
                      AND tginitdeferred) THEN
        DROP TRIGGER invoices_audit ON billing.invoices;
        CREATE CONSTRAINT TRIGGER invoices_audit AFTER INSERT ON billing.invoices
            DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW EXECUTE FUNCTION billing._audit_invoice();
    END IF;
    -- adjustments and usage corrections: audited row by row on Citus (the
    -- set-based append of one node reads and writes many chains at once)
    IF EXISTS (SELECT 1 FROM pg_trigger
                WHERE tgrelid = 'billing.adjustments'::regclass AND tgname = 'adjustments_audit'
                  AND tgnewtable IS NOT NULL) THEN
        DROP TRIGGER adjustments_audit ON billing.adjustments;
        CREATE TRIGGER adjustments_audit AFTER INSERT ON billing.adjustments
            FOR EACH ROW EXECUTE FUNCTION billing._audit_insert('adjust', 'adjustment', 'adjustment_id');
        DROP TRIGGER usage_corrections_audit ON billing.usage_corrections;
        CREATE TRIGGER usage_corrections_audit AFTER INSERT ON billing.usage_corrections
            FOR EACH ROW EXECUTE FUNCTION billing._audit_insert('correct', 'usage_correction', 'correction_id');
    END IF;

    -- foreign keys between tables not yet converted: drop now, add back
    -- once both sides are Citus tables (Citus converts only whole graphs)
    FOR fk IN
        SELECT format('billing.%I', r.relname) AS rel, c.conname, pg_get_constraintdef(c.oid) AS def
          FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid
         WHERE c.contype = 'f' AND r.relnamespace = 'billing'::regnamespace
           AND (billing._citus_table_kind(c.conrelid) IS NULL
                OR billing._citus_table_kind(c.confrelid) IS NULL)
         ORDER BY r.relname, c.conname
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', fk.rel, fk.conname);
        -- the workers' copies of the extension's tables become the shells
        PERFORM run_command_on_workers(
            format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I', fk.rel, fk.conname));
        fks := fks || format('ALTER TABLE %s ADD CONSTRAINT %I %s', fk.rel, fk.conname, fk.def);
    END LOOP;

    -- tables: accounts first (the co-location group), reference tables next
    FOR t IN
        SELECT c.oid::regclass AS rel, c.relname,
               EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = c.oid AND a.attname = 'account_id'
                          AND a.attnum > 0 AND NOT a.attisdropped) AS per_account
          FROM pg_class c
         WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r'
           AND NOT c.relispartition
         ORDER BY c.relname <> 'accounts', 3, c.relname
    LOOP
        kind := billing._citus_table_kind(t.rel);
        IF t.relname = 'metered_tables' THEN
            -- metered_tables holds regclass values, which differ per node
            object := t.rel::text;
            distribution := 'local (coordinator)';
            changed := false;
            RETURN NEXT;
            CONTINUE;
        END IF;
        changed := kind IS NULL;
        IF kind IS NULL THEN
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', t.rel) INTO had_rows;
            IF t.per_account THEN
                PERFORM create_distributed_table(t.rel, 'account_id',
                    colocate_with => CASE WHEN t.relname = 'accounts' THEN 'default'
                                          ELSE 'billing.accounts' END);
            ELSE
                PERFORM create_reference_table(t.rel);
            END IF;
            IF had_rows THEN
                emptied := emptied || t.rel;
            END IF;
        ELSIF t.per_account AND (kind <> 'distributed'
              OR NOT EXISTS (SELECT 1 FROM pg_dist_partition p, pg_dist_partition a
                              WHERE p.logicalrelid = t.rel
                                AND a.logicalrelid = 'billing.accounts'::regclass
                                AND p.colocationid = a.colocationid
                                AND p.partkey IS NOT NULL
                                AND column_to_column_name(p.logicalrelid, p.partkey) = 'account_id')) THEN
            RAISE EXCEPTION 'table % is a Citus table, but not distributed by account_id with billing.accounts', t.rel
                USING ERRCODE = '55000',
                      HINT = 'Undistribute it (undistribute_table) and run billing.distribute() again.';
        ELSIF NOT t.per_account AND kind <> 'reference' THEN
            RAISE EXCEPTION 'table % is a Citus table, but not a reference table', t.rel
                USING ERRCODE = '55000',
                      HINT = 'Undistribute it (undistribute_table) and run billing.distribute() again.';
        END IF;
        object := t.rel::text;
        distribution := CASE WHEN t.per_account THEN 'distributed by account_id'
                             ELSE 'reference' END;
        RETURN NEXT;
    END LOOP;

    FOREACH object IN ARRAY fks LOOP
        EXECUTE object;
    END LOOP;

    -- the data now lives in the shards; empty the coordinator's copies
    -- (without firing the immutability triggers of invoices: nothing is
    -- deleted, only moved)
    IF array_length(emptied, 1) > 0 THEN
        PERFORM set_config('session_replication_role', 'replica', true);
        FOREACH rel IN ARRAY emptied LOOP
            PERFORM truncate_local_data_after_distributing_table(rel);
        END LOOP;
        PERFORM set_config('session_replication_role', 'origin', true);
    END IF;

    -- functions: a call runs where its account is
    FOR f IN SELECT * FROM billing._distributed_functions() LOOP
        changed := NOT EXISTS (SELECT 1 FROM pg_dist_object o
                                WHERE o.classid = 'pg_proc'::regclass AND o.objid = f.fn
                                  AND o.distribution_argument_index IS NOT NULL);
        IF changed THEN
            PERFORM create_distributed_function(f.fn, f.account_arg,
                                                colocate_with => 'billing.accounts');
        END IF;
        object := f.fn::text;
        distribution := format('runs on the node of account %s', f.account_arg);
        RETURN NEXT;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing.distribute() IS
    'On a Citus coordinator: distributes the per-account tables by account_id (co-located), makes the catalog tables reference tables and runs the per-account functions where their account is; idempotent';

REVOKE ALL ON FUNCTION billing.distribute() FROM PUBLIC;

-- ---- sql/install/90_dump.sql ----
/*
 * pg_dump keeps the rows of extension tables and the values of extension
 * sequences only when they are registered with pg_extension_config_dump.
 * Every table and sequence of the parts before this one is registered
 * where it is created, except the identity sequence of charges: without
 * it a restored database would hand out charge ids that already exist.
 * (test/dump/run.sh checks that every table and sequence is registered.)
 */
SELECT pg_catalog.pg_extension_config_dump(
    pg_catalog.pg_get_serial_sequence('billing.charges', 'charge_id')::pg_catalog.regclass, '');

-- ---- sql/install/99_roles.sql ----
/*
 * Roles and privileges (SPEC section 8).  This part runs last, so that it
 * covers every function and table of the parts before it.  An upgrade
 * script that adds a function or table must add its grants the same way
 * (new functions are executable by PUBLIC until revoked).
 *
 *   billing_reader  read every table; usage, remaining, invoice_preview,
 *                   verify_invoices, verify_audit_log, reconcile, the
 *                   price functions
 *   billing_writer  ingest only: record, ingest, report_cumulative
 *   billing_admin   everything billing_reader has; writes the reference
 *                   data (meters, accounts, plans, charges, subscriptions);
 *                   finalize_invoices, rerate, correct_usage, compact_usage,
 *                   purge_dedupe, meter_table, unmeter_table
 *   PUBLIC          nothing
 *
 * Functions that write tables their callers cannot write run as the
 * extension owner (SECURITY DEFINER) with search_path pinned to
 * pg_catalog, billing, pg_temp.  One exception: the triggers of metered
 * tables that count rows (_meter_row per row, and _meter_after_rows over
 * the rows a statement stored, for tables that keep them) are SECURITY
 * DEFINER without a SET clause, because a SET clause costs ~0.75 us per
 * row (4x the trigger itself);
 * every statement its C code runs is schema- and operator-qualified, so
 * it does not depend on the caller's search_path.
 *
 * Who may insert into a metered table is the table owner's business: its
 * triggers count usage for anyone the owner lets INSERT.  Creating those
 * triggers (meter_table) needs billing_admin and the TRIGGER privilege on
 * the table.
 */

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['billing_reader', 'billing_writer', 'billing_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) r) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                    WHERE m.roleid OPERATOR(pg_catalog.=) 'billing_reader'::pg_catalog.regrole
                      AND m.member OPERATOR(pg_catalog.=) 'billing_admin'::pg_catalog.regrole) THEN
        GRANT billing_reader TO billing_admin;
    END IF;
END
$$;

-- PUBLIC gets nothing ------------------------------------------------------------------------

REVOKE ALL ON SCHEMA billing FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA billing FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA billing FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA billing FROM PUBLIC;
GRANT USAGE ON SCHEMA billing TO billing_reader, billing_writer, billing_admin;

-- functions that write what their callers cannot ---------------------------------------------

ALTER FUNCTION billing.record(bigint, text, numeric, timestamptz, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, billing, pg_temp;
ALTER FUNCTION billing.ingest(text, integer, bigint, bigint[], text[], numeric[], timestamptz[], text[], text[])
    SECURITY DEFINER SET search_path = pg_catalog, billing, pg_temp;
ALTER FUNCTION billing.report_cumulative(text, bigint, text, timestamptz, numeric, text)
    SECURITY DEFINER SET search_path = pg_catalog, billing, pg_temp;
ALTER FUNCTION billing._meter_row() SECURITY DEFINER;
ALTER FUNCTION billing._meter_after_rows() SECURITY DEFINER;
ALTER FUNCTION billing._meter_flush()
    SECURITY DEFINER SET search_path = pg_catalog, billing, pg_temp;
ALTER FUNCTION billing.finalize_invoices(timestamptz) SECURITY DEFINER;
ALTER FUNCTION billing.rerate(timestamptz, timestamptz, bigint, boolean, text) SECURITY DEFINER;
ALTER FUNCTION billing.correct_usage(bigint, text, timestamptz, numeric, text, text) SECURITY DEFINER;
ALTER FUNCTION billing.compact_usage() SECURITY DEFINER;
ALTER FUNCTION billing.purge_dedupe(timestamptz) SECURITY DEFINER;
-- (the audit triggers of 70_audit.sql are SECURITY DEFINER too)

-- billing_reader ---------------------------------------------------------------------------

GRANT SELECT ON ALL TABLES IN SCHEMA billing TO billing_reader;
GRANT EXECUTE ON FUNCTION
    billing.price_eq(billing.price, billing.price),
    billing.price_ne(billing.price, billing.price),
    billing.rate(billing.price, numeric),
    billing.rate_tiers(billing.price, numeric),
    billing.price_to_jsonb(billing.price),
    billing.price_from_jsonb(jsonb),
    billing.price_from_stripe(jsonb),
    billing.round_money(numeric, text),
    billing.currency_exponent(text),
    billing.usage(bigint, timestamptz, timestamptz, interval, text),
    billing.remaining(bigint, text, timestamptz),
    billing.invoice_preview(bigint, timestamptz),
    billing.verify_invoices(bigint),
    billing.verify_audit_log(),
    billing.reconcile(regclass, name, name, name, name, timestamptz, timestamptz),
    -- internal, read-only, called by the functions above with the caller's rights
    billing._bin(interval, timestamptz),
    billing._usage_args_ok(bigint, timestamptz, timestamptz, interval),
    billing._add_periods(timestamptz, interval, integer),
    billing._period_index(timestamptz, interval, timestamptz),
    billing._rate_period(bigint, text, text, numeric, timestamptz, timestamptz),
    billing._rate_periods(bigint[], text[], text[], numeric[], timestamptz[], timestamptz[]),
    billing._usage_totals_many(bigint[], timestamptz[], timestamptz[]),
    billing._invoice_preview(bigint, timestamptz),
    billing._adjustment_text(billing.adjustments),
    billing._period_at(bigint, timestamptz),
    billing._pending_adjustments(bigint),
    billing._fits(billing.price, numeric, text, numeric),
    billing._audit_hash(bytea, bigint, bigint, timestamptz, text, text, text, jsonb),
    billing._audit_encode(bigint, bigint, timestamptz, text, text, text, jsonb)
    TO billing_reader;

-- billing_writer ---------------------------------------------------------------------------

GRANT EXECUTE ON FUNCTION
    billing.record(bigint, text, numeric, timestamptz, text, text),
    billing.ingest(text, integer, bigint, bigint[], text[], numeric[], timestamptz[], text[], text[]),
    billing.report_cumulative(text, bigint, text, timestamptz, numeric, text)
    TO billing_writer;

-- billing_admin (also a billing_reader) ----------------------------------------------------

GRANT INSERT, UPDATE, DELETE ON billing.meters, billing.accounts, billing.plans,
    billing.charges, billing.subscriptions TO billing_admin;
GRANT INSERT, DELETE ON billing.metered_tables TO billing_admin;
GRANT EXECUTE ON FUNCTION
    billing.finalize_invoices(timestamptz),
    billing.rerate(timestamptz, timestamptz, bigint, boolean, text),
    billing.correct_usage(bigint, text, timestamptz, numeric, text, text),
    billing.compact_usage(),
    billing.purge_dedupe(timestamptz),
    billing.meter_table(regclass, name, name, name, name, name, name, boolean),
    billing.unmeter_table(regclass),
    -- CREATE TRIGGER (in meter_table) needs EXECUTE on the trigger functions
    billing._meter_row(),
    billing._meter_after_rows(),
    billing._meter_flush()
    TO billing_admin;

-- internal helpers --------------------------------------------------------------------------
-- The functions above call internal helpers (names starting with "_") with
-- the caller's rights.  Readers (and so admins) may execute the helpers
-- that are not SECURITY DEFINER and not triggers: they only read, or write
-- tables through SQL, where table privileges still apply.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
         WHERE p.pronamespace OPERATOR(pg_catalog.=) 'billing'::pg_catalog.regnamespace
           AND p.proname OPERATOR(pg_catalog.~~) '\_%'
           AND NOT p.prosecdef
           AND p.prorettype NOT IN ('pg_catalog.trigger'::pg_catalog.regtype,
                                    'pg_catalog.event_trigger'::pg_catalog.regtype)
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO billing_reader', f);
    END LOOP;
END
$$;
