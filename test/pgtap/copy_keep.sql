-- copy_keep: COPY FROM into a metered table that keeps its rows and has no
-- event ids (its INSERT triggers: billing_meter_after_rows, which counts
-- the statement's transition table, and billing_meter_flush) is run by
-- billing's COPY hook itself (src/ingest_copy.c, billing_meter_copy_keep in
-- src/ingest_trigger.c): each row checked, counted and stored with its
-- index entries, in batches, without the transition table.  A WHERE clause
-- leaves a COPY to PostgreSQL and the triggers, so `WHERE true` is the same
-- COPY the way PostgreSQL runs it: each comparison loads the same file both
-- ways, in savepoints, and compares the rows stored (every column, TOASTed
-- values included), the cells, the command tag and the errors.  The calls
-- of the statement trigger's function (track_functions) tell which way a
-- COPY went.  A volatile default or a generated column leaves the COPY to
-- PostgreSQL's CopyFrom.
BEGIN;
SELECT plan(29);
\ir ../helpers.sql

SET LOCAL track_functions = 'all';
SET LOCAL client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS amcheck;
INSERT INTO billing.accounts (account_id) SELECT 7700 + a FROM generate_series(1, 50) a;
INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window) VALUES
    ('kk_sum', 'sum', '1 minute', '100 years'),
    ('kk_max', 'max', '1 hour', '100 years'),
    ('kk_last', 'last', '1 minute', '100 years');
CREATE TABLE pg_temp.kk_t (id bigint PRIMARY KEY, account_id bigint NOT NULL, meter text NOT NULL,
                           quantity numeric CHECK (quantity < 1000000), ts timestamptz NOT NULL,
                           region text, note text DEFAULT 'none', big text);
CREATE INDEX ON pg_temp.kk_t (account_id, ts);
SELECT billing.meter_table('pg_temp.kk_t', 'account_id', 'meter', 'quantity', 'ts',
                           dimension_column => 'region', keep_rows => true);

-- 2,500 rows: 50 accounts, 3 meters, 3 regions, an hour of minutes;
-- quantities with up to 3 decimals; every 10th row a value of 3,200
-- characters that does not compress (stored out of line), so that the
-- batches also end on their size
CREATE TEMP TABLE kk_rows AS
SELECT i AS id, 7701 + (i * 7) % 50 AS account_id,
       (ARRAY['kk_sum', 'kk_max', 'kk_last'])[1 + i % 3] AS meter,
       ((i % 13) || '.' || lpad(((i * 37) % 1000)::text, 3, '0'))::numeric AS quantity,
       timestamptz '2025-04-02 09:00+00' + ((i * 11) % 60) * interval '1 minute' + (i % 60) * interval '1 second' AS ts,
       (ARRAY['eu', 'us', ''])[1 + i % 3] AS region,
       CASE WHEN i % 10 = 0 THEN (SELECT string_agg(md5(i::text || k::text), '') FROM generate_series(1, 100) k) END AS big
  FROM generate_series(1, 2500) i;
SELECT format('/tmp/billing_copy_keep_%s.tsv', pg_backend_pid()) AS copy_file \gset
SELECT format('COPY (SELECT id, account_id, meter, quantity, ts, region, big FROM kk_rows) TO %L',
              :'copy_file') AS out_sql \gset
:out_sql;
SELECT format('COPY pg_temp.kk_t (id, account_id, meter, quantity, ts, region, big) FROM %L',
              :'copy_file') AS hook_sql \gset
SELECT :'hook_sql' || ' WHERE true' AS pg_sql \gset

CREATE FUNCTION pg_temp.rows_calls() RETURNS bigint LANGUAGE sql AS
$$SELECT coalesce(pg_stat_get_xact_function_calls('billing._meter_after_rows'::regproc), 0)$$;
-- every row stored, every column, as one value
CREATE FUNCTION pg_temp.kept() RETURNS text LANGUAGE sql AS
$$SELECT coalesce(md5(string_agg(format('%s|%s|%s|%s|%s|%s|%s|%s', id, account_id, meter, quantity, ts,
                                        region, note, md5(big)), ';' ORDER BY id)), 'none')
    FROM pg_temp.kk_t$$;
-- the usage of the test's accounts, as one value
CREATE FUNCTION pg_temp.usage() RETURNS text LANGUAGE sql AS
$$SELECT coalesce(md5(string_agg(format('%s %s %s %s %s %s', a.account_id, u.meter, u.dimension,
                                        u.bucket_start, u.quantity, u.events), E'\n'
                                 ORDER BY a.account_id, u.meter, u.dimension, u.bucket_start)), 'none')
    FROM generate_series(7701, 7750) a(account_id),
         billing.usage(a.account_id, '2025-04-02', '2025-04-03') u$$;

-- ---------------------------------------------------------------- the hook
SAVEPOINT s;
SELECT pg_temp.rows_calls() AS calls0 \gset
SELECT is(test.row_count_of(:'hook_sql'), 2500::bigint, 'the hook stores the 2,500 rows: COPY 2500');
SELECT is(pg_temp.rows_calls(), :calls0::bigint,
          'without the statement trigger and its transition table');
SELECT is((SELECT count(*) FROM pg_temp.kk_t k JOIN kk_rows r USING (id)
            WHERE (k.account_id, k.meter, k.quantity, k.ts, k.region, k.note) = (r.account_id, r.meter, r.quantity, r.ts, r.region, 'none')
              AND k.big IS NOT DISTINCT FROM r.big),
          2500::bigint, 'each row as it was written, the default of the column not copied included');
SELECT is((SELECT sum(u.events) || ' ' || sum(u.quantity) FROM generate_series(7701, 7750) a,
                  billing.usage(a, '2025-04-02', '2025-04-03') u WHERE u.meter = 'kk_sum'),
          (SELECT count(*) || ' ' || sum(quantity) FROM kk_rows WHERE meter = 'kk_sum'),
          'the sum meter counts every row and quantity');
SELECT lives_ok(format('SELECT bt_index_check(%s, true)', i.indexrelid),
                'amcheck: index ' || (row_number() OVER (ORDER BY i.indisprimary DESC)) || ' of 2 holds every row')
  FROM pg_index i WHERE i.indrelid = 'pg_temp.kk_t'::regclass ORDER BY i.indisprimary DESC;
SET LOCAL enable_seqscan = off;
SELECT is((SELECT count(*) FROM pg_temp.kk_t k WHERE k.id = ANY (ARRAY(SELECT id FROM kk_rows))),
          2500::bigint, 'the primary key finds every row');
SELECT is((SELECT count(*) FROM kk_rows r
            WHERE EXISTS (SELECT 1 FROM pg_temp.kk_t k WHERE k.account_id = r.account_id AND k.ts = r.ts)),
          2500::bigint, 'and so does the other index');
RESET enable_seqscan;
SELECT pg_temp.kept() AS hook_kept, pg_temp.usage() AS hook_usage \gset
ROLLBACK TO SAVEPOINT s;

-- ------------------------------------------------- PostgreSQL's COPY, same file
SELECT is(test.row_count_of(:'pg_sql'), 2500::bigint, 'PostgreSQL''s COPY (WHERE true): COPY 2500');
SELECT is(pg_temp.rows_calls(), :calls0::bigint + 1, 'through the statement trigger');
SELECT is(pg_temp.kept(), :'hook_kept', 'the same rows stored, every column');
SELECT is(pg_temp.usage(), :'hook_usage', 'the same cells');
ROLLBACK TO SAVEPOINT s;

-- counted in several flushes (a small work_mem): the same cells
SET LOCAL work_mem = '64kB';
SELECT test.row_count_of(:'hook_sql') AS n \gset
SELECT is(pg_temp.usage(), :'hook_usage', 'with work_mem at 64kB (counts flushed during the COPY): the same cells');
RESET work_mem;
ROLLBACK TO SAVEPOINT s;

-- ---------------------------------------------------------------- errors
-- each bad file raises through the hook what it raises through PostgreSQL,
-- and leaves nothing stored or counted
CREATE FUNCTION pg_temp.bad(sql_rows text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    f text := format('/tmp/billing_copy_keep_bad_%s.tsv', pg_backend_pid());
    cols text := '(id, account_id, meter, quantity, ts, region, big)';
    hook text;
    pg text;
BEGIN
    EXECUTE format('COPY (%s) TO %L', sql_rows, f);
    hook := test.sqlstate_of(format('COPY pg_temp.kk_t %s FROM %L', cols, f));
    pg := test.sqlstate_of(format('COPY pg_temp.kk_t %s FROM %L WHERE true', cols, f));
    RETURN hook || ' ' || pg || ' ' || (SELECT count(*) FROM pg_temp.kk_t) || ' ' || pg_temp.usage();
END $$;
SELECT pg_temp.usage() AS none_usage \gset
SELECT is(pg_temp.bad('SELECT id, account_id, meter, quantity, ts, region, big FROM kk_rows
                       UNION ALL SELECT 7, 7701, ''kk_sum'', 1, ts, region, NULL FROM kk_rows WHERE id = 2400'),
          '23505 23505 0 ' || :'none_usage', 'a duplicate key late in the file: 23505 both ways, nothing kept or counted');
SELECT is(pg_temp.bad('SELECT id, account_id, meter, CASE WHEN id = 2000 THEN 1000000 ELSE quantity END, ts, region, big FROM kk_rows'),
          '23514 23514 0 ' || :'none_usage', 'a CHECK violation: 23514 both ways');
SELECT is(pg_temp.bad('SELECT id, CASE WHEN id = 1500 THEN NULL ELSE account_id END, meter, quantity, ts, region, big FROM kk_rows'),
          '23502 23502 0 ' || :'none_usage', 'a null in a NOT NULL column: 23502 both ways');
SELECT is(pg_temp.bad('SELECT id, account_id, meter, CASE WHEN id = 900 THEN -1 ELSE quantity END, ts, region, big FROM kk_rows'),
          '22023 22023 0 ' || :'none_usage', 'a negative quantity of a sum meter: 22023 both ways');
SELECT is(pg_temp.bad('SELECT id, account_id, CASE WHEN id = 1200 THEN ''kk_nope'' ELSE meter END, quantity, ts, region, big FROM kk_rows'),
          '23503 23503 0 ' || :'none_usage', 'an unknown meter: 23503 both ways');
SELECT is(pg_temp.bad('SELECT id, CASE WHEN id = 2222 THEN 99999 ELSE account_id END, meter, quantity, ts, region, big FROM kk_rows'),
          '23503 23503 0 ' || :'none_usage', 'an unknown account: 23503 both ways');

-- ------------------------------------------ left to PostgreSQL's CopyFrom
-- a volatile default: rows stored one at a time by PostgreSQL, every trigger
ALTER TABLE pg_temp.kk_t ALTER COLUMN note SET DEFAULT ('v' || (random() * 0)::int);
SELECT pg_temp.rows_calls() AS calls1 \gset
SELECT is(test.row_count_of(:'hook_sql'), 2500::bigint, 'a volatile default: COPY 2500');
SELECT is(pg_temp.rows_calls(), :calls1::bigint + 1, 'through the statement trigger');
SELECT is(pg_temp.usage(), :'hook_usage', 'the same cells');
ROLLBACK TO SAVEPOINT s;
ALTER TABLE pg_temp.kk_t ADD COLUMN q2 numeric GENERATED ALWAYS AS (quantity * 2) STORED;
SELECT pg_temp.rows_calls() AS calls1 \gset
SELECT is(test.row_count_of(:'hook_sql') || ' ' || pg_temp.rows_calls(),
          '2500 ' || (:calls1::bigint + 1), 'a generated column: COPY 2500, through the statement trigger');
SELECT is(pg_temp.usage(), :'hook_usage', 'the same cells');
ROLLBACK TO SAVEPOINT s;
-- a foreign key (its triggers): PostgreSQL's CopyFrom, every trigger
CREATE TABLE pg_temp.kk_accounts (account_id bigint PRIMARY KEY);
INSERT INTO pg_temp.kk_accounts SELECT 7700 + a FROM generate_series(1, 50) a;
ALTER TABLE pg_temp.kk_t ADD FOREIGN KEY (account_id) REFERENCES pg_temp.kk_accounts;
SELECT pg_temp.rows_calls() AS calls1 \gset
SELECT is(test.row_count_of(:'hook_sql') || ' ' || pg_temp.rows_calls() || ' ' || pg_temp.usage(),
          '2500 ' || (:calls1::bigint + 1) || ' ' || :'hook_usage',
          'a foreign key: COPY 2500 through the statement trigger, the same cells');
ROLLBACK TO SAVEPOINT s;
-- binary and CSV files: the same rows and cells as the text file
SELECT format('COPY (SELECT id::bigint, account_id::bigint, meter, quantity, ts, region, big FROM kk_rows) TO %L WITH (FORMAT binary)',
              :'copy_file') AS out_sql \gset
:out_sql;
SELECT pg_temp.rows_calls() AS calls1 \gset
SELECT is(test.row_count_of(:'hook_sql' || ' WITH (FORMAT binary)') || ' ' || pg_temp.rows_calls() || ' '
          || pg_temp.kept() || ' ' || pg_temp.usage(),
          '2500 ' || :calls1 || ' ' || :'hook_kept' || ' ' || :'hook_usage',
          'a binary file through the hook: the same rows and cells');
ROLLBACK TO SAVEPOINT s;
SELECT format('COPY (SELECT id, account_id, meter, quantity, ts, region, big FROM kk_rows) TO %L WITH (FORMAT csv, HEADER)',
              :'copy_file') AS out_sql \gset
:out_sql;
SELECT is(test.row_count_of(:'hook_sql' || ' WITH (FORMAT csv, HEADER)') || ' ' || pg_temp.rows_calls() || ' '
          || pg_temp.kept() || ' ' || pg_temp.usage(),
          '2500 ' || :calls1 || ' ' || :'hook_kept' || ' ' || :'hook_usage',
          'a CSV file with a header through the hook: the same rows and cells');
ROLLBACK TO SAVEPOINT s;
-- a metered table cannot be attached as a partition (meter_table refuses a
-- partition; rows routed through the parent would not be counted)
CREATE TABLE pg_temp.kk_parent (id bigint, account_id bigint, meter text, quantity numeric, ts timestamptz)
    PARTITION BY RANGE (id);
CREATE TABLE pg_temp.kk_part (id bigint, account_id bigint, meter text, quantity numeric, ts timestamptz);
SELECT billing.meter_table('pg_temp.kk_part', 'account_id', 'meter', 'quantity', 'ts', keep_rows => true);
SELECT throws_ok($$ALTER TABLE pg_temp.kk_parent ATTACH PARTITION pg_temp.kk_part FOR VALUES FROM (1) TO (2000)$$,
                 '55000', NULL, 'a metered table attached as a partition: 55000');
ROLLBACK TO SAVEPOINT s;
-- (a test after the last rollback: pgTAP keeps its count in a table)
SELECT is(pg_temp.kept() || ' ' || pg_temp.usage(), 'none none', 'each COPY above rolled back leaves nothing');

SELECT format('COPY (SELECT) TO PROGRAM %L', 'rm -f ' || :'copy_file' || ' /tmp/billing_copy_keep_bad_' || pg_backend_pid() || '.tsv') AS rm_sql \gset
:rm_sql;

SELECT * FROM finish();
ROLLBACK;
