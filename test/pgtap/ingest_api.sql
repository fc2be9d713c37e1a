-- ingest_api: the ingest and read functions of SPEC sections 3 and 4 exist
-- with their pinned signatures, argument names and result columns, and
-- every bad input raises its SQLSTATE.  It uses now(): record's default
-- timestamp and the late-window edges are relative to the clock; every
-- report is stamped at now() (one minute, one day: the transaction keeps
-- now() fixed), so every result is the same at any time of day.
BEGIN;
SELECT plan(117);

-- signatures ---------------------------------------------------------------
SELECT has_function('billing', 'record',
    ARRAY['bigint', 'text', 'numeric', 'timestamp with time zone', 'text', 'text'],
    'record(account_id, meter, quantity, ts, event_id, dimension)');
SELECT function_returns('billing', 'record',
    ARRAY['bigint', 'text', 'numeric', 'timestamp with time zone', 'text', 'text'], 'boolean');
SELECT has_function('billing', 'meter_table',
    ARRAY['regclass', 'name', 'name', 'name', 'name', 'name', 'name', 'boolean'],
    'meter_table(tbl, account_column, meter_column, quantity_column, ts_column, event_id_column, dimension_column, keep_rows)');
SELECT function_returns('billing', 'meter_table',
    ARRAY['regclass', 'name', 'name', 'name', 'name', 'name', 'name', 'boolean'], 'void');
SELECT has_function('billing', 'unmeter_table', ARRAY['regclass'], 'unmeter_table(tbl)');
SELECT function_returns('billing', 'unmeter_table', ARRAY['regclass'], 'void');
SELECT has_function('billing', 'ingest',
    ARRAY['text', 'integer', 'bigint', 'bigint[]', 'text[]', 'numeric[]',
          'timestamp with time zone[]', 'text[]', 'text[]'],
    'ingest(source, partition, batch_offset, account_ids, meters, quantities, ts, event_ids, dimensions)');
SELECT function_returns('billing', 'ingest',
    ARRAY['text', 'integer', 'bigint', 'bigint[]', 'text[]', 'numeric[]',
          'timestamp with time zone[]', 'text[]', 'text[]'], 'setof record');
SELECT has_function('billing', 'report_cumulative',
    ARRAY['text', 'bigint', 'text', 'timestamp with time zone', 'numeric', 'text'],
    'report_cumulative(source, account_id, meter, bucket_start, total, dimension)');
SELECT function_returns('billing', 'report_cumulative',
    ARRAY['text', 'bigint', 'text', 'timestamp with time zone', 'numeric', 'text'], 'void');
SELECT has_function('billing', 'usage',
    ARRAY['bigint', 'timestamp with time zone', 'timestamp with time zone', 'interval', 'text'],
    'usage(account_id, from_ts, to_ts, grain, meter)');
SELECT function_returns('billing', 'usage',
    ARRAY['bigint', 'timestamp with time zone', 'timestamp with time zone', 'interval', 'text'],
    'setof record');
SELECT has_function('billing', 'purge_dedupe', ARRAY['timestamp with time zone'], 'purge_dedupe(as_of)');
SELECT has_function('billing', 'compact_usage', ARRAY[]::text[], 'compact_usage()');
-- argument names (named notation is part of the contract) and result columns
SELECT is(proargnames, ARRAY['account_id', 'meter', 'quantity', 'ts', 'event_id', 'dimension'],
          'record argument names')
  FROM pg_proc WHERE oid = 'billing.record(bigint, text, numeric, timestamptz, text, text)'::regprocedure;
SELECT is(proargnames, ARRAY['tbl', 'account_column', 'meter_column', 'quantity_column', 'ts_column',
                             'event_id_column', 'dimension_column', 'keep_rows'],
          'meter_table argument names')
  FROM pg_proc WHERE oid = 'billing.meter_table(regclass, name, name, name, name, name, name, boolean)'::regprocedure;
SELECT is(proargnames, ARRAY['tbl'], 'unmeter_table argument names')
  FROM pg_proc WHERE oid = 'billing.unmeter_table(regclass)'::regprocedure;
SELECT is(proargnames, ARRAY['source', 'partition', 'batch_offset', 'account_ids', 'meters', 'quantities',
                             'ts', 'event_ids', 'dimensions', 'accepted', 'duplicates', 'already_applied'],
          'ingest argument names and result columns')
  FROM pg_proc WHERE oid = 'billing.ingest(text, int, bigint, bigint[], text[], numeric[], timestamptz[], text[], text[])'::regprocedure;
SELECT is(pg_get_function_result('billing.ingest(text, int, bigint, bigint[], text[], numeric[], timestamptz[], text[], text[])'::regprocedure),
          'TABLE(accepted integer, duplicates integer, already_applied boolean)', 'ingest result types');
SELECT is(proargnames, ARRAY['source', 'account_id', 'meter', 'bucket_start', 'total', 'dimension'],
          'report_cumulative argument names')
  FROM pg_proc WHERE oid = 'billing.report_cumulative(text, bigint, text, timestamptz, numeric, text)'::regprocedure;
SELECT is(proargnames, ARRAY['account_id', 'from_ts', 'to_ts', 'grain', 'meter',
                             'meter', 'dimension', 'bucket_start', 'quantity', 'events'],
          'usage argument names and result columns')
  FROM pg_proc WHERE oid = 'billing.usage(bigint, timestamptz, timestamptz, interval, text)'::regprocedure;
SELECT is(pg_get_function_result('billing.usage(bigint, timestamptz, timestamptz, interval, text)'::regprocedure),
          'TABLE(meter text, dimension text, bucket_start timestamp with time zone, quantity numeric, events bigint)',
          'usage result types');
-- defaults: record(account, meter, quantity) and usage(account, from, to) suffice
SELECT is(pronargdefaults::int, 3, 'record: ts, event_id and dimension have defaults')
  FROM pg_proc WHERE oid = 'billing.record(bigint, text, numeric, timestamptz, text, text)'::regprocedure;
SELECT is(pronargdefaults::int, 3, 'meter_table: event_id_column, dimension_column and keep_rows have defaults')
  FROM pg_proc WHERE oid = 'billing.meter_table(regclass, name, name, name, name, name, name, boolean)'::regprocedure;
SELECT is(pronargdefaults::int, 2, 'ingest: event_ids and dimensions have defaults')
  FROM pg_proc WHERE oid = 'billing.ingest(text, int, bigint, bigint[], text[], numeric[], timestamptz[], text[], text[])'::regprocedure;
SELECT is(pronargdefaults::int, 1, 'report_cumulative: dimension has a default')
  FROM pg_proc WHERE oid = 'billing.report_cumulative(text, bigint, text, timestamptz, numeric, text)'::regprocedure;
SELECT is(pronargdefaults::int, 2, 'usage: grain and meter have defaults')
  FROM pg_proc WHERE oid = 'billing.usage(bigint, timestamptz, timestamptz, interval, text)'::regprocedure;

-- fixtures ------------------------------------------------------------------
INSERT INTO billing.accounts (account_id) VALUES (7001);
INSERT INTO billing.meters (meter, aggregation) VALUES
    ('api_sum', 'sum'), ('api_count', 'count'), ('api_max', 'max'), ('api_last', 'last');
CREATE TABLE api_rows (account_id bigint, meter text, qty numeric, ts timestamptz,
                       event_id text, note text, plain timestamp, f float8);
SELECT billing.meter_table('api_rows', 'account_id', 'meter', 'qty', 'ts', 'event_id');

SELECT lives_ok($$SELECT billing.record(7001, 'api_sum', 1)$$, 'record with its defaults');
SELECT lives_ok($$SELECT billing.record(account_id => 7001, meter => 'api_sum', quantity => 1,
                                        event_id => 'named', dimension => 'eu')$$,
                'record in named notation');
SELECT lives_ok($$SELECT billing.record(7001, 'api_max', -5)$$, 'negative quantity on a max meter');
SELECT lives_ok($$SELECT billing.record(7001, 'api_last', -5)$$, 'negative quantity on a last meter');
SELECT lives_ok($$SELECT billing.record(7001, 'api_max', 0)$$, 'zero quantity on a max meter');
SELECT lives_ok($$SELECT billing.record(7001, 'api_sum', 0)$$, 'zero quantity on a sum meter');

-- record ----------------------------------------------------------------------
SELECT throws_ok($$SELECT billing.record(7001, 'api_nope', 1)$$, '23503', NULL, 'record: unknown meter');
SELECT throws_ok($$SELECT billing.record(7999, 'api_sum', 1)$$, '23503', NULL, 'record: unknown account');
SELECT throws_ok($$SELECT billing.record(7999, 'api_sum', 1, now(), 'e-unknown')$$, '23503', NULL,
                 'record: unknown account with an event id');
SELECT throws_ok($$SELECT billing.record(7001, 'api_sum', -1)$$, '22023', NULL, 'record: negative on sum');
SELECT throws_ok($$SELECT billing.record(7001, 'api_count', -1)$$, '22023', NULL, 'record: negative on count');
SELECT throws_ok($$SELECT billing.record(7001, 'api_sum', 'NaN')$$, '22023', NULL, 'record: NaN on sum');
SELECT throws_ok($$SELECT billing.record(7001, 'api_sum', 'Infinity')$$, '22023', NULL, 'record: Infinity on sum');
SELECT throws_ok($$SELECT billing.record(7001, 'api_max', 'NaN')$$, '22023', NULL, 'record: NaN on max');
SELECT throws_ok($$SELECT billing.record(7001, 'api_max', 'Infinity')$$, '22023', NULL, 'record: Infinity on max');
SELECT throws_ok($$SELECT billing.record(7001, 'api_last', '-Infinity')$$, '22023', NULL, 'record: -Infinity on last');
SELECT throws_ok($$SELECT billing.record(7001, 'api_sum', 1, now() - interval '35 days 1 second')$$, '22007', NULL,
                 'record: older than the late window');
SELECT throws_ok($$SELECT billing.record(7001, 'api_sum', 1, now() + interval '5 minutes 1 second')$$, '22007', NULL,
                 'record: more than 5 minutes ahead');
SELECT throws_ok($$SELECT billing.record(NULL, 'api_sum', 1)$$, '22004', NULL, 'record: NULL account');
SELECT throws_ok($$SELECT billing.record(7001, NULL, 1)$$, '22004', NULL, 'record: NULL meter');
SELECT throws_ok($$SELECT billing.record(7001, 'api_sum', NULL)$$, '22004', NULL, 'record: NULL quantity');
SELECT throws_ok($$SELECT billing.record(7001, 'api_sum', 1, NULL)$$, '22004', NULL, 'record: NULL ts');

-- metered tables ----------------------------------------------------------------
SELECT throws_ok($$SELECT billing.meter_table('api_rows', 'account_id', 'meter', 'qty', 'nope')$$, '42703', NULL,
                 'meter_table: missing column');
SELECT throws_ok($$SELECT billing.meter_table('api_rows', 'account_id', 'meter', 'qty', 'ts', 'nope')$$, '42703', NULL,
                 'meter_table: missing event id column');
SELECT throws_ok($$SELECT billing.meter_table('api_rows', 'note', 'meter', 'qty', 'ts')$$, '42804', NULL,
                 'meter_table: account column of type text');
SELECT throws_ok($$SELECT billing.meter_table('api_rows', 'account_id', 'ts', 'qty', 'ts')$$, '42804', NULL,
                 'meter_table: meter column of type timestamptz');
SELECT throws_ok($$SELECT billing.meter_table('api_rows', 'account_id', 'meter', 'f', 'ts')$$, '42804', NULL,
                 'meter_table: quantity column of type float8');
SELECT throws_ok($$SELECT billing.meter_table('api_rows', 'account_id', 'meter', 'qty', 'plain')$$, '42804', NULL,
                 'meter_table: ts column of type timestamp');
SELECT throws_ok($$SELECT billing.meter_table('api_rows', 'account_id', 'meter', 'qty', 'ts', 'f')$$, '42804', NULL,
                 'meter_table: event id column of type float8');
SELECT throws_ok($$SELECT billing.meter_table('api_rows', 'account_id', 'meter', 'qty', 'ts', NULL, 'qty')$$, '42804', NULL,
                 'meter_table: dimension column of type numeric');
SELECT throws_ok($$SELECT billing.meter_table(NULL, 'account_id', 'meter', 'qty', 'ts')$$, '22004', NULL,
                 'meter_table: NULL table');
SELECT throws_ok($$SELECT billing.meter_table('api_rows', 'account_id', NULL, 'qty', 'ts')$$, '22004', NULL,
                 'meter_table: NULL meter column');
SELECT throws_ok($$SELECT billing.unmeter_table('pg_catalog.pg_class')$$, '42704', NULL,
                 'unmeter_table: a table that is not metered');
SELECT throws_ok($$INSERT INTO api_rows (account_id, meter, qty, ts) VALUES (7001, 'api_nope', 1, now())$$, '23503', NULL,
                 'metered INSERT: unknown meter');
SELECT throws_ok($$INSERT INTO api_rows (account_id, meter, qty, ts) VALUES (7999, 'api_sum', 1, now())$$, '23503', NULL,
                 'metered INSERT: unknown account');
SELECT throws_ok($$INSERT INTO api_rows (account_id, meter, qty, ts) VALUES (7001, 'api_sum', -1, now())$$, '22023', NULL,
                 'metered INSERT: negative quantity');
SELECT throws_ok($$INSERT INTO api_rows (account_id, meter, qty, ts) VALUES (7001, 'api_max', 'NaN', now())$$, '22023', NULL,
                 'metered INSERT: NaN quantity');
SELECT throws_ok($$INSERT INTO api_rows (account_id, meter, qty, ts) VALUES (7001, 'api_sum', 1, now() - interval '40 days')$$, '22007', NULL,
                 'metered INSERT: too late');
SELECT throws_ok($$INSERT INTO api_rows (account_id, meter, qty, ts) VALUES (7001, 'api_sum', 1, now() + interval '1 hour')$$, '22007', NULL,
                 'metered INSERT: too early');
SELECT throws_ok($$INSERT INTO api_rows (account_id, meter, qty, ts) VALUES (7001, 'api_sum', NULL, now())$$, '22004', NULL,
                 'metered INSERT: NULL quantity');

-- metered tables and the ways rows reach them ----------------------------------
-- A partition is an ordinary table: either meter_table refuses it, or rows
-- that reach it through the partitioned parent are counted like any other.
-- (Tried in a subtransaction that is always rolled back.)
INSERT INTO billing.meters (meter) VALUES ('api_part'), ('api_conflict');
CREATE TABLE api_parent (account_id bigint, meter text, qty numeric, ts timestamptz) PARTITION BY LIST (meter);
CREATE TABLE api_part PARTITION OF api_parent FOR VALUES IN ('api_part');
CREATE FUNCTION pg_temp.partition_outcome() RETURNS text
    LANGUAGE plpgsql AS $$
DECLARE
    outcome text;
BEGIN
    BEGIN
        BEGIN
            PERFORM billing.meter_table('api_part', 'account_id', 'meter', 'qty', 'ts', keep_rows => false);
        EXCEPTION WHEN wrong_object_type THEN
            outcome := 'refused by meter_table';
        END;
        IF outcome IS NULL THEN
            INSERT INTO api_parent VALUES (7001, 'api_part', 3, now());
            SELECT CASE WHEN coalesce(sum(quantity), 0) = 3 THEN 'counted' ELSE 'not counted' END
              INTO outcome FROM billing.usage_cells WHERE account_id = 7001 AND meter = 'api_part';
        END IF;
        RAISE EXCEPTION 'undo';
    EXCEPTION WHEN raise_exception THEN
        NULL;
    END;
    RETURN outcome;
END
$$;
SELECT ok(outcome IN ('refused by meter_table', 'counted'),
          'a metered partition: refused by meter_table, or rows inserted through its parent count (' || outcome || ')')
  FROM pg_temp.partition_outcome() outcome;
-- keep_rows true: the table holds what was counted, so a row that INSERT ...
-- ON CONFLICT DO NOTHING skips is not counted either
CREATE TABLE api_unique (account_id bigint, meter text, qty numeric, ts timestamptz, event_id text,
                         order_no int UNIQUE);
SELECT billing.meter_table('api_unique', 'account_id', 'meter', 'qty', 'ts', 'event_id');
INSERT INTO api_unique VALUES (7001, 'api_conflict', 100, now(), 'o1', 1);
INSERT INTO api_unique VALUES (7001, 'api_conflict', 200, now(), 'o2', 1) ON CONFLICT DO NOTHING;
SELECT is((SELECT sum(quantity) FROM billing.usage_cells WHERE account_id = 7001 AND meter = 'api_conflict'),
          (SELECT sum(qty) FROM api_unique), 'keep_rows true: a row skipped by ON CONFLICT is not counted');

-- ingest --------------------------------------------------------------------------
SELECT throws_ok($$SELECT * FROM billing.ingest('api', 0, 1, ARRAY[7001, 7001]::bigint[], ARRAY['api_sum'],
                   ARRAY[1, 1]::numeric[], ARRAY[now(), now()])$$, '22023', NULL, 'ingest: arrays of different lengths');
SELECT throws_ok($$SELECT * FROM billing.ingest('api', 0, 1, ARRAY[7001]::bigint[], ARRAY['api_sum'],
                   ARRAY[1]::numeric[], ARRAY[now()], ARRAY['a', 'b'])$$, '22023', NULL, 'ingest: event_ids of another length');
SELECT throws_ok($$SELECT * FROM billing.ingest(NULL, 0, 1, ARRAY[7001]::bigint[], ARRAY['api_sum'],
                   ARRAY[1]::numeric[], ARRAY[now()])$$, '22004', NULL, 'ingest: NULL source');
SELECT throws_ok($$SELECT * FROM billing.ingest('api', 0, NULL, ARRAY[7001]::bigint[], ARRAY['api_sum'],
                   ARRAY[1]::numeric[], ARRAY[now()])$$, '22004', NULL, 'ingest: NULL batch_offset');
SELECT throws_ok($$SELECT * FROM billing.ingest('api', 0, 1, ARRAY[7001]::bigint[], ARRAY['api_sum'],
                   NULL, ARRAY[now()])$$, '22004', NULL, 'ingest: NULL quantities');
SELECT throws_ok($$SELECT * FROM billing.ingest('api', 0, 1, ARRAY[7001]::bigint[], ARRAY['api_sum'],
                   ARRAY[NULL]::numeric[], ARRAY[now()])$$, '22004', NULL, 'ingest: a NULL quantity');
SELECT throws_ok($$SELECT * FROM billing.ingest('api', 0, 1, ARRAY[7001]::bigint[], ARRAY['api_nope'],
                   ARRAY[1]::numeric[], ARRAY[now()])$$, '23503', NULL, 'ingest: unknown meter');
SELECT throws_ok($$SELECT * FROM billing.ingest('api', 0, 1, ARRAY[7999]::bigint[], ARRAY['api_sum'],
                   ARRAY[1]::numeric[], ARRAY[now()])$$, '23503', NULL, 'ingest: unknown account');
SELECT throws_ok($$SELECT * FROM billing.ingest('api', 0, 1, ARRAY[7001]::bigint[], ARRAY['api_sum'],
                   ARRAY[-1]::numeric[], ARRAY[now()])$$, '22023', NULL, 'ingest: negative quantity');
SELECT throws_ok($$SELECT * FROM billing.ingest('api', 0, 1, ARRAY[7001]::bigint[], ARRAY['api_last'],
                   ARRAY['NaN']::numeric[], ARRAY[now()])$$, '22023', NULL, 'ingest: NaN on last');
SELECT throws_ok($$SELECT * FROM billing.ingest('api', 0, 1, ARRAY[7001]::bigint[], ARRAY['api_sum'],
                   ARRAY[1]::numeric[], ARRAY[now() - interval '36 days'])$$, '22007', NULL, 'ingest: too late');
SELECT throws_ok($$SELECT * FROM billing.ingest('api', 0, 1, ARRAY[7001]::bigint[], ARRAY['api_sum'],
                   ARRAY[1]::numeric[], ARRAY[now() + interval '6 minutes'])$$, '22007', NULL, 'ingest: too early');
SELECT is((SELECT count(*) FROM billing.ingest_offsets WHERE source = 'api'), 0::bigint,
          'failed batches stored no offset');

-- report_cumulative -----------------------------------------------------------------
SELECT throws_ok($$SELECT billing.report_cumulative('c', 7001, 'api_max', now(), 1)$$, '22023', NULL,
                 'report_cumulative: max meter');
SELECT throws_ok($$SELECT billing.report_cumulative('c', 7001, 'api_count', now(), 1)$$, '22023', NULL,
                 'report_cumulative: count meter');
SELECT throws_ok($$SELECT billing.report_cumulative('c', 7001, 'api_nope', now(), 1)$$, '23503', NULL,
                 'report_cumulative: unknown meter');
SELECT throws_ok($$SELECT billing.report_cumulative('c', 7999, 'api_sum', now(), 1)$$, '23503', NULL,
                 'report_cumulative: unknown account');
SELECT throws_ok($$SELECT billing.report_cumulative('c', 7001, 'api_sum', now(), -1)$$, '22023', NULL,
                 'report_cumulative: negative total');
SELECT throws_ok($$SELECT billing.report_cumulative('c', 7001, 'api_sum', now(), 'NaN')$$, '22023', NULL,
                 'report_cumulative: NaN total');
SELECT throws_ok($$SELECT billing.report_cumulative('c', 7001, 'api_sum', now() - interval '36 days', 1)$$, '22007', NULL,
                 'report_cumulative: too late');
SELECT throws_ok($$SELECT billing.report_cumulative(NULL, 7001, 'api_sum', now(), 1)$$, '22004', NULL,
                 'report_cumulative: NULL source');
SELECT throws_ok($$SELECT billing.report_cumulative('c', 7001, 'api_sum', now(), NULL)$$, '22004', NULL,
                 'report_cumulative: NULL total');

-- usage ---------------------------------------------------------------------------------
SELECT throws_ok($$SELECT * FROM billing.usage(7001, now() - interval '1 hour', now() + interval '1 hour', '0')$$,
                 '22023', NULL, 'usage: grain 0');
SELECT throws_ok($$SELECT * FROM billing.usage(7001, now() - interval '1 hour', now() + interval '1 hour', '1 mon 1 day')$$,
                 '22023', NULL, 'usage: grain of months and days');
SELECT throws_ok($$SELECT * FROM billing.usage(7001, '2001-01-01', '2001-01-02', '-1 hour')$$,
                 '22023', NULL, 'usage: negative grain over a range without usage');
SELECT throws_ok($$SELECT * FROM billing.usage(NULL, now() - interval '1 hour', now() + interval '1 hour')$$,
                 '22004', NULL, 'usage: NULL account');
SELECT throws_ok($$SELECT * FROM billing.usage(7001, NULL, now())$$,
                 '22004', NULL, 'usage: NULL from_ts');

-- meters with usage --------------------------------------------------------------------
SELECT throws_ok($$UPDATE billing.meters SET aggregation = 'max' WHERE meter = 'api_sum'$$, '55000', NULL,
                 'meters: aggregation of a meter with usage');
SELECT throws_ok($$UPDATE billing.meters SET bucket_width = '1 hour' WHERE meter = 'api_sum'$$, '55000', NULL,
                 'meters: bucket width of a meter with usage');
SELECT throws_ok($$UPDATE billing.meters SET meter = 'api_sum2' WHERE meter = 'api_sum'$$, '55000', NULL,
                 'meters: name of a meter with usage');
SELECT throws_ok($$DELETE FROM billing.meters WHERE meter = 'api_sum'$$, '55000', NULL,
                 'meters: delete a meter with usage');
SELECT lives_ok($$UPDATE billing.meters SET aggregation = 'max' WHERE meter = 'api_count'$$,
                'meters: a meter without usage can change');

-- none of the failures counted anything
SELECT results_eq(
    $$SELECT meter, dimension, quantity, events
        FROM billing.usage(7001, now() - interval '1 day', now() + interval '1 day', '1 day')
       WHERE meter IN ('api_sum', 'api_count', 'api_max', 'api_last')
       ORDER BY meter, dimension$$,
    $$VALUES ('api_last'::text, ''::text, -5::numeric, 1::bigint), ('api_max', '', 0, 2),
             ('api_sum', '', 1, 2), ('api_sum', 'eu', 1, 1)$$,
    'only the good reports were counted');

-- the accounts one statement checked are checked again by the next one
INSERT INTO billing.accounts (account_id) SELECT generate_series(7101, 7110);
CREATE TABLE api_known (account_id bigint, meter text, quantity numeric, ts timestamptz);
SELECT billing.meter_table('api_known', 'account_id', 'meter', 'quantity', 'ts');
SELECT lives_ok($$INSERT INTO api_known SELECT 7101 + i % 10, 'api_sum', 1, now()
                    FROM generate_series(1, 100) i$$, 'a statement counting 10 accounts');
DELETE FROM billing.accounts WHERE account_id = 7110;
SELECT throws_ok($$INSERT INTO api_known SELECT 7101 + i % 10, 'api_sum', 1, now()
                     FROM generate_series(1, 100) i$$,
                 '23503', 'account 7110 does not exist',
                 'the next statement finds the account deleted in between');

-- keep_rows without event ids: no row trigger (COPY then inserts in
-- batches); the rows are checked and counted at the end of the statement,
-- and a bad row still undoes the whole statement
CREATE TABLE api_batch (account_id bigint, meter text, quantity numeric, ts timestamptz);
SELECT billing.meter_table('api_batch', 'account_id', 'meter', 'quantity', 'ts', keep_rows => true);
SELECT is((SELECT array_agg(tgname::text ORDER BY tgname) FROM pg_trigger
            WHERE tgrelid = 'api_batch'::regclass),
          ARRAY['billing_meter_after_rows', 'billing_meter_flush'],
          'keep_rows without event ids: statement triggers only');
SELECT lives_ok($$INSERT INTO api_batch SELECT 7101 + i % 3, 'api_sum', i, now()
                    FROM generate_series(1, 30) i$$, 'a kept batch');
SELECT throws_ok($$INSERT INTO api_batch SELECT 7101 + i % 3, 'api_sum', CASE WHEN i = 20 THEN -1 ELSE i END, now()
                     FROM generate_series(1, 30) i$$,
                 '22023', NULL, 'a negative quantity in row 20 of a kept batch');
SELECT is((SELECT count(*) FROM api_batch), 30::bigint, 'the failed statement kept no row');
SELECT is((SELECT sum(quantity) FROM billing.usage_cells WHERE account_id BETWEEN 7101 AND 7103
             AND meter = 'api_sum' AND bucket_start >= date_trunc('minute', now())),
          (SELECT sum(quantity) FROM api_batch)
            + (SELECT sum(quantity) FROM api_known WHERE account_id BETWEEN 7101 AND 7103),
          'and counted nothing: usage is what the two tables kept');

-- claims of a batch of mostly new ids insert first and let the unique index
-- flag the duplicates: ids committed before, ids claimed earlier in this
-- transaction and ids repeated within the batch all count once
INSERT INTO billing.accounts (account_id) VALUES (7120);
CREATE TABLE api_ids (account_id bigint, meter text, quantity numeric, ts timestamptz, event_id text);
SELECT billing.meter_table('api_ids', 'account_id', 'meter', 'quantity', 'ts', 'event_id', keep_rows => false);
INSERT INTO api_ids SELECT 7120, 'api_sum', 1, now(), 'id-' || i FROM generate_series(1, 100) i;
INSERT INTO api_ids SELECT 7120, 'api_sum', 1, now(), 'id-' || (i % 200 + 50) FROM generate_series(1, 400) i;
SELECT is((SELECT sum(events) FROM billing.usage_cells WHERE account_id = 7120)::bigint, 249::bigint,
          'ids 1..249 counted once each, across and within batches');
SELECT is((SELECT count(*) FROM billing.dedupe_keys WHERE account_id = 7120), 249::bigint,
          'one live claim per id: the duplicate rows of the batch were deleted');
SET LOCAL work_mem = '64kB';
INSERT INTO api_ids SELECT 7120, 'api_sum', 1, now(), 'id-' || (i % 600) FROM generate_series(1, 3000) i;
RESET work_mem;
SELECT is((SELECT sum(events) FROM billing.usage_cells WHERE account_id = 7120)::bigint, 600::bigint,
          'a statement of many small batches, duplicates and new ids mixed (both ways of claiming)');
SELECT is((SELECT count(*) FROM billing.dedupe_keys WHERE account_id = 7120), 600::bigint,
          'one live claim per id after it');

-- a replay finds its ids in the run of claims its first sending wrote (a
-- walk of the dedupe_keys heap instead of an index probe per id); ids
-- purged since, and ids around the run, go through the index
INSERT INTO billing.accounts (account_id) VALUES (7121), (7122);
CREATE TABLE api_replay (account_id bigint, meter text, quantity numeric, ts timestamptz, event_id text);
SELECT billing.meter_table('api_replay', 'account_id', 'meter', 'quantity', 'ts', 'event_id', keep_rows => false);
CREATE TEMP TABLE replay_rows AS
SELECT 7121 + i % 2 AS account_id, 'api_sum'::text AS meter, 1 AS quantity, now() AS ts, 'r-' || i AS event_id
  FROM generate_series(1, 500) i;
INSERT INTO api_replay SELECT * FROM replay_rows;
INSERT INTO api_replay SELECT * FROM replay_rows;
SELECT is((SELECT sum(events) FROM billing.usage_cells WHERE account_id IN (7121, 7122))::bigint, 500::bigint,
          'a replay counts nothing');
DELETE FROM billing.dedupe_keys WHERE account_id = 7121 AND event_id IN ('r-100', 'r-102', 'r-104');
INSERT INTO api_replay SELECT * FROM replay_rows;
SELECT is((SELECT sum(events) FROM billing.usage_cells WHERE account_id IN (7121, 7122))::bigint, 503::bigint,
          'a replay after three claims were purged counts those three');
INSERT INTO api_replay SELECT 7121 + i % 2, 'api_sum', 1, now(), 'r-' || i FROM generate_series(250, 750) i;
SELECT is((SELECT sum(events) FROM billing.usage_cells WHERE account_id IN (7121, 7122))::bigint, 753::bigint,
          'a batch overlapping the run counts only its 250 new ids');
SELECT is((SELECT count(*) FROM billing.dedupe_keys WHERE account_id IN (7121, 7122)), 750::bigint,
          'one live claim per id');

SELECT * FROM finish();
ROLLBACK;
