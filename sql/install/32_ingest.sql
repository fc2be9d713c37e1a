/*
 * Ingest (SPEC section 4): record, metered tables, batches, cumulative
 * reports, and the purge of event ids.  The work is in C (src/ingest*.c,
 * behind src/ingest.h).
 */

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
CREATE FUNCTION billing._copy_timestamptz_fast(value text) RETURNS timestamptz
    LANGUAGE C IMMUTABLE STRICT AS 'MODULE_PATHNAME', 'billing_copy_timestamptz_fast';
COMMENT ON FUNCTION billing._copy_timestamptz_fast(text) IS
    'Internal: what the COPY hook''s own reader makes of value (src/copy_input.c); NULL when it leaves value to timestamptz_in';
CREATE FUNCTION billing._copy_numeric_fast(value text) RETURNS numeric
    LANGUAGE C IMMUTABLE STRICT AS 'MODULE_PATHNAME', 'billing_copy_numeric_fast';
COMMENT ON FUNCTION billing._copy_numeric_fast(text) IS
    'Internal: what the COPY hook''s own reader makes of value (src/copy_input.c); NULL when it leaves value to numeric_in';

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
    IF NOT billing._citus_colocated(tbl, account_column) THEN
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
-- (SECURITY DEFINER: it runs for every DROP TABLE, DROP SCHEMA and DROP
-- OWNED in the database, by roles that have no right on billing's tables)
CREATE FUNCTION billing._metered_table_dropped() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, billing, pg_temp AS $$
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

-- a metered table never becomes a partition: rows inserted through its
-- parent would not fire the statement triggers that count them (meter_table
-- refuses partitions; ATTACH PARTITION is refused here, 55000)
CREATE FUNCTION billing._metered_table_attached() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    t regclass;
BEGIN
    SELECT m.tbl INTO t
      FROM billing.metered_tables m
           JOIN pg_inherits i ON i.inhrelid = m.tbl::oid
     WHERE i.inhparent IN (SELECT d.objid FROM pg_event_trigger_ddl_commands() d
                            WHERE d.classid = 'pg_class'::regclass)
     LIMIT 1;
    IF t IS NOT NULL THEN
        RAISE EXCEPTION 'metered table % cannot become a partition', t
            USING ERRCODE = '55000',
                  DETAIL = 'Rows inserted through the partitioned table would not fire the statement triggers that count them.',
                  HINT = 'Stop metering it first with billing.unmeter_table.';
    END IF;
END
$$;
COMMENT ON FUNCTION billing._metered_table_attached() IS
    'Internal: refuses to make a metered table a partition (ATTACH PARTITION, 55000)';
CREATE EVENT TRIGGER billing_metered_table_attached ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION billing._metered_table_attached();

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

CREATE FUNCTION billing._oldest_xact_start() RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'billing_oldest_xact_start'
    LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION billing._oldest_xact_start() IS
    'Internal: the earliest start of a transaction still open in this database (client backends and background workers, this one included; src/ingest_claim.c)';

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
    -- meter (PL/pgSQL: Citus plans each with constants).  Never past now():
    -- an as_of in the future would forget ids that still dedupe.  Nor past
    -- the start of the oldest transaction still open in the database: it
    -- judges lateness by its own now(), so it may still accept a report
    -- whose id a cutoff at this now() would forget.
    IF as_of IS NULL THEN
        RETURN 0;       -- (as 1.0: NULL purges nothing)
    END IF;
    as_of := LEAST(as_of, pg_catalog.now(), billing._oldest_xact_start());
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
    'Removes event ids whose dedupe window ended by as_of (at most now(), and at most the start of the oldest transaction still open in the database) and for which no report can be accepted any more (late_window + 5 minutes after the claim); returns how many';
