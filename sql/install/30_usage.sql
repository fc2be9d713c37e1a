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
    'Event ids already counted, per (account, meter); kept at least dedupe_window and late_window + 5 minutes, removed by purge_dedupe()';

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

-- A meter's aggregation and bucket width cannot change once it has usage
-- (on Citus each node's copy checks the usage of that node: _exists_here).
CREATE FUNCTION billing._meters_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF (TG_OP = 'DELETE' OR NEW.aggregation IS DISTINCT FROM OLD.aggregation
        OR NEW.bucket_width IS DISTINCT FROM OLD.bucket_width
        OR NEW.meter IS DISTINCT FROM OLD.meter)
       AND (billing._exists_here('billing.usage_buckets', 'x.meter = $1', OLD.meter::text)
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
    IF billing._exists_here('billing.usage_buckets', 'true', NULL::text)
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
    n bigint := 0;
    k bigint;
    m record;
BEGIN
    -- An id is kept until its dedupe window has passed (expires_at, set
    -- when it was claimed c: c + dedupe_window) and until no report with its
    -- timestamp can be accepted any more: a report is stamped at most 5
    -- minutes after c and is accepted until its timestamp + late_window.
    -- So an id goes once c + greatest(dedupe_window, late_window + 5 min)
    -- <= as_of, with the meter's windows as they are now.  One delete per
    -- meter (PL/pgSQL: Citus plans each with constants).
    FOR m IN
        SELECT x.meter,
               as_of - greatest(interval '0', x.late_window + interval '5 minutes' - x.dedupe_window) AS cutoff
          FROM billing.meters x
    LOOP
        DELETE FROM billing.dedupe_keys d WHERE d.meter = m.meter AND d.expires_at <= m.cutoff;
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION billing.purge_dedupe(timestamptz) IS
    'Removes event ids whose dedupe window ended by as_of and for which no report can be accepted any more (late_window + 5 minutes after the claim); returns how many';

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

-- the one rule by which values of a counter cell combine (src/agg.c, SPEC
-- section 2): sum and count add, max keeps the larger, last the value of the
-- greater (last_ts, last_seq), a NULL counting as the earliest, and on equal
-- (last_ts, last_seq) the greater quantity, so that the order of folding
-- never matters
CREATE FUNCTION billing._combine(aggregation text, q1 numeric, ts1 timestamptz, seq1 bigint,
                                 q2 numeric, ts2 timestamptz, seq2 bigint)
    RETURNS numeric
    AS 'MODULE_PATHNAME', 'billing_combine'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._combine(text, numeric, timestamptz, bigint, numeric, timestamptz, bigint) IS
    'Internal: combines two values of a counter cell by the one rule of src/agg.c (sum/count add, max keeps the larger, last the later by (last_ts, last_seq))';

CREATE FUNCTION billing._last_later(ts1 timestamptz, seq1 bigint, ts2 timestamptz, seq2 bigint)
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_last_later_sql'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._last_later(timestamptz, bigint, timestamptz, bigint) IS
    'Internal: whether a last value stamped ts1 that arrived as seq1 is later than one stamped ts2 that arrived as seq2 (NULL: the earliest)';

CREATE FUNCTION billing._cell_agg_step(state internal, aggregation text, quantity numeric,
                                       last_ts timestamptz, last_seq bigint)
    RETURNS internal
    AS 'MODULE_PATHNAME', 'billing_cell_agg_step'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._cell_agg_step(internal, text, numeric, timestamptz, bigint) IS
    'Internal: transition of billing._cell_agg';

CREATE FUNCTION billing._cell_agg_final(state internal) RETURNS numeric
    AS 'MODULE_PATHNAME', 'billing_cell_agg_final'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._cell_agg_final(internal) IS
    'Internal: result of billing._cell_agg';

CREATE FUNCTION billing._cell_agg_last_ts(state internal) RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'billing_cell_agg_last_ts'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._cell_agg_last_ts(internal) IS
    'Internal: result of billing._cell_last_ts';

CREATE FUNCTION billing._cell_agg_last_seq(state internal) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_cell_agg_last_seq'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._cell_agg_last_seq(internal) IS
    'Internal: result of billing._cell_last_seq';

CREATE AGGREGATE billing._cell_agg(aggregation text, quantity numeric, last_ts timestamptz,
                                   last_seq bigint) (
    SFUNC = billing._cell_agg_step, STYPE = internal, FINALFUNC = billing._cell_agg_final
);
COMMENT ON AGGREGATE billing._cell_agg(text, numeric, timestamptz, bigint) IS
    'Internal: the value of a meter over counter cells, by the one rule of src/agg.c';

CREATE AGGREGATE billing._cell_last_ts(aggregation text, quantity numeric, last_ts timestamptz,
                                       last_seq bigint) (
    SFUNC = billing._cell_agg_step, STYPE = internal, FINALFUNC = billing._cell_agg_last_ts
);
COMMENT ON AGGREGATE billing._cell_last_ts(text, numeric, timestamptz, bigint) IS
    'Internal: the last_ts of the value billing._cell_agg gives';

CREATE AGGREGATE billing._cell_last_seq(aggregation text, quantity numeric, last_ts timestamptz,
                                        last_seq bigint) (
    SFUNC = billing._cell_agg_step, STYPE = internal, FINALFUNC = billing._cell_agg_last_seq
);
COMMENT ON AGGREGATE billing._cell_last_seq(text, numeric, timestamptz, bigint) IS
    'Internal: the last_seq of the value billing._cell_agg gives';

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

    -- 1. take the deltas out, one cell per key, folded by the one rule
    WITH moved AS (
        DELETE FROM billing.usage_deltas RETURNING *
    )
    INSERT INTO billing_compact_cells
    SELECT d.account_id, c.meter, c.dimension, c.bucket_start,
           billing._cell_agg(m.aggregation, c.quantity, c.last_ts,
                             CASE WHEN c.last_ts IS NOT NULL THEN d.seq END),
           sum(c.events)::bigint,
           billing._cell_last_ts(m.aggregation, c.quantity, c.last_ts,
                                 CASE WHEN c.last_ts IS NOT NULL THEN d.seq END),
           billing._cell_last_seq(m.aggregation, c.quantity, c.last_ts,
                                  CASE WHEN c.last_ts IS NOT NULL THEN d.seq END),
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
    -- 3. the distinct values of unique meters per billing period (45_unique.sql)
    PERFORM billing._unique_compact();
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
                   billing._cell_agg(aggregation, quantity, last_ts, last_seq) AS quantity,
                   sum(events)::bigint AS events,
                   billing._cell_last_ts(aggregation, quantity, last_ts, last_seq) AS last_ts,
                   billing._cell_last_seq(aggregation, quantity, last_ts, last_seq) AS last_seq,
                   aggregation
              FROM billing_compact_cells
             GROUP BY 1, 2, 3, 4, aggregation
        ), updated AS (
            UPDATE billing.%I AS b
               SET quantity = billing._combine(c.aggregation, b.quantity, b.last_ts, b.last_seq,
                                               c.quantity, c.last_ts, c.last_seq),
                   events = b.events + c.events,
                   last_ts = CASE WHEN billing._last_later(c.last_ts, c.last_seq, b.last_ts, b.last_seq)
                                  THEN c.last_ts ELSE b.last_ts END,
                   last_seq = CASE WHEN billing._last_later(c.last_ts, c.last_seq, b.last_ts, b.last_seq)
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
             ELSE format('billing._bin(%L, bucket_start)', grain) END,
        target, target, target);
END
$$;
COMMENT ON FUNCTION billing._compact_into(text, interval) IS
    'Internal: folds the cells being compacted into a bucket or roll-up table';

COMMENT ON FUNCTION billing.compact_usage() IS
    'Folds appended usage deltas into the bucket counters; returns the number of delta cells merged';

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
