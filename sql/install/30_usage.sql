/*
 * Usage counters (SPEC section 3): the tables ingest appends to, the
 * packed store of compacted cells, and what ingest keeps to count each
 * event once.
 *
 * Ingest never updates a counter row: every statement appends its
 * per-bucket totals to usage_deltas, and compact_usage() (src/compact.c)
 * folds them into usage_days, one row per account, meter, UTC day and
 * dimension holding the day's cells packed and the day's total.  Readers
 * combine both (billing.usage_cells, billing._rollup_totals).
 *
 * usage_buckets, usage_hourly and usage_daily, 1.0's compacted tables,
 * stay as empty landing tables: the rows a 1.0 dump restores into them are
 * moved into usage_deltas (buckets) or dropped (the roll-ups, which the
 * store derives), by _usage_landing.
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
    'Always empty: the compacted buckets of release 1.0; rows inserted (a 1.0 dump) move into usage_deltas';

CREATE TABLE billing.usage_days (
    account_id    bigint NOT NULL,
    meter         text COLLATE "C" NOT NULL,
    day           timestamptz NOT NULL,   -- UTC day holding the cells' buckets
    dimension     text COLLATE "C" NOT NULL DEFAULT '',
    quantity      numeric NOT NULL,       -- the day's total by the meter's aggregation
    events        bigint NOT NULL,
    last_ts       timestamptz,            -- last meters: timestamp of quantity
    last_seq      bigint,                 -- last meters: arrival order
    cells         bytea NOT NULL,         -- the day's cells, packed: billing._day_cells(day, cells)
    PRIMARY KEY (account_id, meter, day, dimension)
)
-- half of each page free: compaction rewrites a row in place whenever new
-- cells reach its day (the worker every few seconds, a backfill every row
-- of a page), and a new version that fits on its page is heap-only, with
-- no new index entry (a compaction that rewrites every row takes about 30%
-- fewer instructions; storage is about 27 bytes a minute cell, not 16)
WITH (fillfactor = 50);
COMMENT ON TABLE billing.usage_days IS
    'Compacted usage, one row per (account, meter, UTC day, dimension): the day''s cells packed and its total; add usage_deltas to read';

CREATE TABLE billing.usage_deltas (
    account_id  bigint NOT NULL,    -- or the key of a group row (billing._delta_key)
    seq         bigint,             -- arrival order, when cells holds a last meter
    cells       bytea NOT NULL      -- packed cells: read with billing._delta_rows
);
COMMENT ON TABLE billing.usage_deltas IS
    'Usage counted since the last compact_usage(): per flush of an ingest statement, one row per account with the cells it touched, packed, or on one node one group row for the accounts of a block of 64 ids; appended, never updated';

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
    'Internal: the counter cells packed in usage_deltas.cells, of every account of a group row (last_ts is NULL but for last meters)';

CREATE TYPE billing.delta_row_cell AS (
    account_id    bigint,
    meter         text COLLATE "C",
    dimension     text COLLATE "C",
    bucket_start  timestamptz,
    quantity      numeric,
    events        bigint,
    last_ts       timestamptz,          -- last meters only
    seq           bigint                -- arrival order of the account's part of the row
);
COMMENT ON TYPE billing.delta_row_cell IS 'Internal: one counter cell of a row of usage_deltas and its account, as billing._delta_rows returns it';

CREATE FUNCTION billing._delta_rows(row_account bigint, row_seq bigint, cells bytea, p_account bigint)
    RETURNS SETOF billing.delta_row_cell
    AS 'MODULE_PATHNAME', 'billing_delta_rows'
    LANGUAGE C IMMUTABLE PARALLEL SAFE ROWS 8;
COMMENT ON FUNCTION billing._delta_rows(bigint, bigint, bytea, bigint) IS
    'Internal: the counter cells of a row of usage_deltas (its account_id, seq and cells) with their accounts and seqs, only p_account''s unless it is NULL (a group row holds several accounts)';

CREATE FUNCTION billing._delta_key(account_id bigint) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_delta_key'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._delta_key(bigint) IS
    'Internal: the account_id of the group rows of usage_deltas that may hold an account''s cells (the account''s own where billing is distributed: no group rows there); read rows with account_id = ANY (ARRAY[account, key]) through billing._delta_rows';

CREATE FUNCTION billing._delta_first(account_id bigint, cells bytea) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_delta_first'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._delta_first(bigint, bytea) IS
    'Internal: the least account with cells in a row of usage_deltas (its account_id and cells): the row''s own account, or the least of a group row''s';
CREATE FUNCTION billing._delta_last(account_id bigint, cells bytea) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_delta_last'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._delta_last(bigint, bytea) IS
    'Internal: the greatest account with cells in a row of usage_deltas (its account_id and cells): the row''s own account, or the greatest of a group row''s';
-- the rows of an account: its own (account_id = it) and the group rows of
-- its block that hold it (account_id = billing._delta_key(it), first <= it
-- <= last).  The account range is in the index, so that a reader of one
-- account skips there the group rows of its block that do not hold it
-- (src/totals.c): a busy block has several group rows per flush.
CREATE INDEX usage_deltas_account ON billing.usage_deltas
    (account_id, billing._delta_first(account_id, cells), billing._delta_last(account_id, cells));

CREATE FUNCTION billing._delta_pack(meters text[], dimensions text[], bucket_starts timestamptz[],
                                    quantities numeric[], events bigint[], last_ts timestamptz[])
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'billing_delta_pack'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._delta_pack(text[], text[], timestamptz[], numeric[], bigint[], timestamptz[]) IS
    'Internal: pack parallel arrays of counter cells for usage_deltas.cells (a cell with a last_ts is of a last meter)';

CREATE FUNCTION billing._day_cells(day timestamptz, cells bytea)
    RETURNS TABLE (bucket_start timestamptz, quantity numeric, events bigint,
                   last_ts timestamptz, last_seq bigint)
    AS 'MODULE_PATHNAME', 'billing_day_cells'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE ROWS 60;
COMMENT ON FUNCTION billing._day_cells(timestamptz, bytea) IS
    'Internal: the counter cells packed in a row of usage_days (src/store.c; last_ts and last_seq NULL but for last meters)';

CREATE VIEW billing.usage_cells AS
    SELECT s.account_id, s.meter, s.dimension, c.bucket_start, c.quantity, c.events,
           c.last_ts, c.last_seq
      FROM billing.usage_days s, billing._day_cells(s.day, s.cells) c
    UNION ALL
    SELECT c.account_id, c.meter, c.dimension, c.bucket_start,
           c.quantity, c.events, c.last_ts,
           CASE WHEN c.last_ts IS NOT NULL THEN c.seq END
      FROM billing.usage_deltas d, billing._delta_rows(d.account_id, d.seq, d.cells, NULL) c;
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
    'Always empty: the hour roll-up of release 1.0; rows inserted (a 1.0 dump) are dropped (usage_days keeps the cells)';

CREATE TABLE billing.usage_daily (LIKE billing.usage_hourly INCLUDING ALL);
COMMENT ON TABLE billing.usage_daily IS
    'Always empty: the day roll-up of release 1.0; rows inserted (a 1.0 dump) are dropped (usage_days keeps day totals)';

-- a 1.0 dump restores its compacted buckets through these: into the deltas,
-- which compact_usage() folds into usage_days
CREATE FUNCTION billing._usage_landing() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF TG_TABLE_NAME = 'usage_buckets' THEN
        INSERT INTO billing.usage_deltas (account_id, seq, cells)
        VALUES (NEW.account_id, NEW.last_seq,
                billing._delta_pack(ARRAY[NEW.meter::text], ARRAY[NEW.dimension::text],
                                    ARRAY[NEW.bucket_start], ARRAY[NEW.quantity],
                                    ARRAY[NEW.events], ARRAY[NEW.last_ts]));
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing._usage_landing() IS
    'Internal: moves a row inserted into usage_buckets (a 1.0 dump) into usage_deltas; drops rows of usage_hourly and usage_daily';
CREATE TRIGGER usage_buckets_landing BEFORE INSERT ON billing.usage_buckets
    FOR EACH ROW EXECUTE FUNCTION billing._usage_landing();
CREATE TRIGGER usage_hourly_landing BEFORE INSERT ON billing.usage_hourly
    FOR EACH ROW EXECUTE FUNCTION billing._usage_landing();
CREATE TRIGGER usage_daily_landing BEFORE INSERT ON billing.usage_daily
    FOR EACH ROW EXECUTE FUNCTION billing._usage_landing();
