-- copy_input: a COPY that billing counts itself (src/ingest_copy.c) reads
-- timestamptz in its ISO form and numeric integers with its own reader
-- (src/copy_input.c) and leaves any other text to PostgreSQL's input
-- functions.  billing._copy_timestamptz_fast and _copy_numeric_fast show
-- what the reader alone makes of a text (NULL: left to PostgreSQL).  Whatever it reads must be what
-- PostgreSQL reads, under any TimeZone or DateStyle; what it declines
-- includes everything PostgreSQL rejects.  A COPY with a WHERE clause goes
-- through the triggers and PostgreSQL's parsers, so the same rows loaded
-- both ways must give the same last_ts, to the microsecond.
BEGIN;
SELECT plan(21);
\ir ../helpers.sql

-- PostgreSQL's reading of s, or its SQLSTATE
CREATE FUNCTION pg_temp.pg_in(typ regtype, s text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    IF typ = 'timestamptz'::regtype THEN
        RETURN s::timestamptz::text;
    END IF;
    RETURN s::numeric::text;
EXCEPTION WHEN OTHERS THEN
    RETURN 'error ' || SQLSTATE;
END $$;
-- the fast reader's result, read back under the session's settings
CREATE FUNCTION pg_temp.fast_in(typ regtype, s text) RETURNS text LANGUAGE sql AS $$
    SELECT CASE WHEN typ = 'timestamptz'::regtype THEN billing._copy_timestamptz_fast(s)::text
                ELSE billing._copy_numeric_fast(s)::text END $$;

-- 20,000 timestamps over years 1 to 9999, printed by PostgreSQL (ISO) under
-- time zones with offsets of whole hours, half and quarter hours, and
-- fractions of 0 to 6 digits
SELECT setseed(0.31);
CREATE TEMP TABLE ts_src AS
SELECT i, ts,
       (ARRAY['UTC', 'America/Los_Angeles', 'Asia/Kolkata', 'Asia/Kathmandu', 'Pacific/Chatham',
              'America/St_Johns', 'Pacific/Kiritimati', 'Etc/GMT+12'])[1 + i % 8] AS zone
  FROM (SELECT i, timestamptz '0001-01-03 00:00+00'
                  + random() * (timestamptz '9999-12-29 00:00+00' - timestamptz '0001-01-03 00:00+00')
                  AS ts
          FROM generate_series(1, 20000) i) g;
UPDATE ts_src SET ts = date_trunc('second', ts) + (i % 7) * interval '100 milliseconds'
 WHERE i % 3 = 0;
CREATE TEMP TABLE ts_text (i int, s text);
DO $$
DECLARE z text;
BEGIN
    FOR z IN SELECT DISTINCT zone FROM ts_src LOOP
        PERFORM set_config('TimeZone', z, true);
        PERFORM set_config('DateStyle', 'ISO', true);
        INSERT INTO ts_text SELECT i, ts::text FROM ts_src WHERE zone = z;
    END LOOP;
END $$;
-- the same, with T between date and time
INSERT INTO ts_text SELECT i + 100000, replace(s, ' ', 'T') FROM ts_text WHERE i % 5 = 0;
RESET TimeZone;

SELECT is((SELECT count(*) FROM ts_text WHERE billing._copy_timestamptz_fast(s) IS NULL
              AND s NOT LIKE '%BC' AND s !~ ':\d\d:\d\d$'),
          0::bigint, 'the reader takes every timestamp PostgreSQL prints in ISO form (with an hour offset)');
SELECT is((SELECT count(*) FROM ts_text WHERE billing._copy_timestamptz_fast(s) IS NOT NULL),
          (SELECT count(*) FROM ts_text WHERE s NOT LIKE '%BC' AND s !~ ':\d\d:\d\d$'),
          'and no other');
SELECT is((SELECT count(*) FROM ts_text t JOIN ts_src USING (i)
            WHERE billing._copy_timestamptz_fast(s)::timestamptz <> ts),
          0::bigint, 'it reads each as the timestamp printed');
SELECT is((SELECT count(*) FROM ts_text
            WHERE billing._copy_timestamptz_fast(s) IS NOT NULL
              AND pg_temp.fast_in('timestamptz', s) IS DISTINCT FROM pg_temp.pg_in('timestamptz', s)),
          0::bigint, 'as timestamptz_in does');

-- edges and near misses: each is read as PostgreSQL reads it, or declined
CREATE TEMP TABLE ts_edge (s text);
INSERT INTO ts_edge VALUES
    ('2026-12-06 13:05:39.32505+00'), ('2026-12-06T13:05:39+05:30'), ('2024-02-29 00:00:00-15:59'),
    ('2000-02-29 23:59:59.999999+00'), ('1900-02-28 12:00:00+01'), ('0001-01-01 00:00:00+15'),
    ('9999-12-31 23:59:59.999999-15:59'), ('2026-01-31 00:00:00+00:00'), ('2026-12-06 13:05:39.5-00'),
    -- declined: PostgreSQL rejects these
    ('2023-02-29 00:00:00+00'), ('1900-02-29 00:00:00+00'), ('2026-04-31 00:00:00+00'),
    ('2026-13-01 00:00:00+00'), ('2026-00-10 00:00:00+00'), ('2026-12-00 00:00:00+00'),
    ('2026-12-06 13:60:00+00'), ('2026-12-06 13:05:39+16'), ('2026-12-06 13:05:39+05:60'),
    ('0000-01-01 00:00:00+00'), ('2026-12-06 13:05:39.+00'), ('2026-12-06 13:05:39+0'),
    -- declined: PostgreSQL reads these its own way
    ('2026-12-06 24:00:00+00'), ('2026-12-06 23:59:60+00'), ('2026-12-06 13:05:39.1234567+00'),
    ('2026-12-06 13:05:39 +00'), ('2026-12-06 13:05:39+0530'), ('2026-12-06 13:05:39Z'),
    ('2026-12-06 13:05:39 UTC'), ('2026-12-06 13:05:39'), ('2026-12-06 13:05+00'),
    (' 2026-12-06 13:05:39+00'), ('2026-12-06 13:05:39+00 '), ('2026-12-06t13:05:39+00'),
    ('2026-12-06 13:05:39+00 BC'), ('12026-12-06 13:05:39+00'), ('2026-12-06 13:05:39+05:30:15'),
    ('26-12-06 13:05:39+00'), ('2026/12/06 13:05:39+00'), ('2026-12-06 1:05:39+00'),
    ('2026-12-06 13:05:39-'), ('2026-12-06'), ('infinity'), ('now'), ('');
SELECT is((SELECT count(*) FROM ts_edge WHERE billing._copy_timestamptz_fast(s) IS NOT NULL),
          9::bigint, 'of 44 edge cases the reader takes the 9 in its form');
SELECT is((SELECT count(*) FROM ts_edge
            WHERE billing._copy_timestamptz_fast(s) IS NOT NULL
              AND pg_temp.fast_in('timestamptz', s) IS DISTINCT FROM pg_temp.pg_in('timestamptz', s)),
          0::bigint, 'and reads them as PostgreSQL does');
SELECT is((SELECT count(*) FROM ts_edge
            WHERE billing._copy_timestamptz_fast(s) IS NULL
              AND pg_temp.pg_in('timestamptz', s) NOT LIKE 'error%'),
          22::bigint, 'it declines 22 that PostgreSQL reads its own way');
SELECT is((SELECT count(*) FROM ts_edge
            WHERE billing._copy_timestamptz_fast(s) IS NULL
              AND pg_temp.pg_in('timestamptz', s) LIKE 'error%'),
          13::bigint, 'and the 13 that PostgreSQL rejects');

-- the session's settings do not change what the form means
SET LOCAL TimeZone = 'Asia/Kathmandu';
SET LOCAL DateStyle = 'SQL, DMY';
SET LOCAL timezone_abbreviations = 'India';
SELECT is((SELECT count(*) FROM ts_text t JOIN ts_src USING (i)
            WHERE billing._copy_timestamptz_fast(s)::timestamptz <> ts
               OR s::timestamptz <> ts),
          0::bigint, 'TimeZone, DateStyle and timezone_abbreviations change neither reading');
RESET TimeZone;
RESET DateStyle;
RESET timezone_abbreviations;

-- numeric: unsigned integers of 1 to 18 digits, and near misses
CREATE TEMP TABLE num_text (s text);
INSERT INTO num_text
SELECT lpad((floor(random() * 10 ^ (1 + i % 18)))::numeric::text, 1 + i % 20, '0')
  FROM generate_series(1, 5000) i;
INSERT INTO num_text VALUES ('0'), ('1'), ('999999999999999999'), ('1000000000000000000'),
    ('-1'), ('+1'), ('1.0'), ('1e3'), (' 1'), ('1 '), ('NaN'), ('Infinity'), (''), ('0x1F'), ('١٢'),
    ('10000'), ('100000000'), ('000010000'), ('120000'), ('999900000000'), ('100000000000000000');
SELECT is((SELECT count(*) FROM num_text
            WHERE billing._copy_numeric_fast(s) IS NOT NULL
              AND pg_temp.fast_in('numeric', s) IS DISTINCT FROM pg_temp.pg_in('numeric', s)),
          0::bigint, 'numeric: what the reader takes it reads as numeric_in does, scale included');
SELECT is((SELECT count(*) FROM num_text
            WHERE billing._copy_numeric_fast(s) IS NOT NULL
              AND (numeric_send(billing._copy_numeric_fast(s)) <> numeric_send(s::numeric)
                   OR pg_column_size(billing._copy_numeric_fast(s)) <> pg_column_size(s::numeric))),
          0::bigint, 'and builds the same value as numeric_in, digit for digit (weight, trailing zero digits)');
SELECT is((SELECT count(*) FROM num_text WHERE billing._copy_numeric_fast(s) IS NULL),
          (SELECT count(*) FROM num_text WHERE s !~ '^\d{1,18}$'),
          'it declines all but 1 to 18 digits');

-- through COPY: the hook and the triggers (WHERE true) give every row's
-- last_ts, to the microsecond; each row is its own cell (one account each)
INSERT INTO billing.accounts (account_id) SELECT 7600 + a FROM generate_series(1, 300) a;
INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window) VALUES
    ('ci_last', 'last', '1 minute', '100 years');
CREATE TABLE pg_temp.ci_t (account_id bigint, meter text, quantity numeric, ts timestamptz);
SELECT billing.meter_table('pg_temp.ci_t', 'account_id', 'meter', 'quantity', 'ts',
                           keep_rows => false);
-- 300 timestamps of 2025-2026 printed under the zones above, every fifth
-- with T; quantities integers but for a few
CREATE TEMP TABLE ci_src AS
SELECT 7600 + i AS account_id, timestamptz '2025-01-01 00:00+00' + random() * interval '700 days' AS ts,
       (ARRAY['UTC', 'America/Los_Angeles', 'Asia/Kolkata', 'Asia/Kathmandu', 'Pacific/Chatham',
              'America/St_Johns', 'Pacific/Kiritimati', 'Etc/GMT+12'])[1 + i % 8] AS zone
  FROM generate_series(1, 295) i;
CREATE TEMP TABLE ci_rows (account_id bigint, meter text, quantity text, ts text);
DO $$
DECLARE z text;
BEGIN
    FOR z IN SELECT DISTINCT zone FROM ci_src LOOP
        PERFORM set_config('TimeZone', z, true);
        INSERT INTO ci_rows
        SELECT account_id, 'ci_last', (account_id % 1000 * 7)::text,
               CASE WHEN account_id % 5 = 0 THEN replace(ts::text, ' ', 'T') ELSE ts::text END
          FROM ci_src WHERE zone = z;
    END LOOP;
END $$;
RESET TimeZone;
-- forms PostgreSQL reads its own way, in the same COPY
INSERT INTO ci_rows VALUES (7896, 'ci_last', '1.50', '2026-12-06 13:05:39'),
    (7897, 'ci_last', '2', '2026-12-06 13:05:39 UTC'), (7898, 'ci_last', '3', 'Dec 6 2026 13:05:39.25+01'),
    (7899, 'ci_last', '4', '2026-12-06 13:05:39.1234567+00'), (7900, 'ci_last', ' 5', '2026-12-06 13:05:39+0530');
CREATE FUNCTION pg_temp.last_ts() RETURNS text LANGUAGE sql AS
$$SELECT md5(string_agg(format('%s %s %s', account_id, quantity, last_ts), ';' ORDER BY account_id))
    FROM billing.usage_cells WHERE meter = 'ci_last'$$;
SELECT format('/tmp/billing_copy_input_%s.tsv', pg_backend_pid()) AS copy_file \gset
SELECT format('COPY ci_rows TO %L', :'copy_file') AS out_sql \gset
:out_sql;
SAVEPOINT s;
SELECT format('COPY pg_temp.ci_t FROM %L', :'copy_file') AS in_sql \gset
:in_sql;
SELECT pg_temp.last_ts() AS hook_last \gset
SELECT is((SELECT count(*) FROM billing.usage_cells u JOIN ci_rows r USING (account_id)
            WHERE u.meter = 'ci_last' AND u.last_ts = r.ts::timestamptz
              AND u.quantity = r.quantity::numeric),
          (SELECT count(*) FROM ci_rows), 'COPY through the hook: each row''s timestamp and quantity as written');
ROLLBACK TO SAVEPOINT s;
SELECT format('COPY pg_temp.ci_t FROM %L WHERE true', :'copy_file') AS in_sql \gset
:in_sql;
SELECT is(pg_temp.last_ts(), :'hook_last', 'the same COPY through the triggers gives the same cells');
ROLLBACK TO SAVEPOINT s;

RELEASE SAVEPOINT s;
-- a metered table that keeps its rows (and drops duplicate event ids): the
-- hook runs PostgreSQL's CopyFrom with the faster readers, every trigger
-- fires; the rows stored, the counts and the command tag are the same as
-- through PostgreSQL's COPY (WHERE true)
CREATE TABLE pg_temp.ck_t (account_id bigint, meter text, quantity numeric, ts timestamptz,
                           event_id text);
SELECT billing.meter_table('pg_temp.ck_t', 'account_id', 'meter', 'quantity', 'ts',
                           event_id_column => 'event_id', keep_rows => true);
CREATE FUNCTION pg_temp.kept() RETURNS text LANGUAGE sql AS
$$SELECT md5(string_agg(format('%s %s %s %s', account_id, quantity, ts, event_id), ';'
                        ORDER BY account_id, ts, event_id)) FROM pg_temp.ck_t$$;
SELECT format('COPY (SELECT account_id, meter, quantity, ts, ''e'' || account_id %% 7 FROM ci_rows '
              'UNION ALL SELECT account_id, meter, quantity, ts, ''e'' || account_id %% 7 FROM ci_rows) TO %L',
              :'copy_file') AS out_sql \gset
:out_sql;
SAVEPOINT s;
SELECT test.row_count_of(format('COPY pg_temp.ck_t FROM %L', :'copy_file')) AS hook_n \gset
SELECT pg_temp.kept() AS hook_kept, pg_temp.last_ts() AS hook_last \gset
SELECT is(:hook_n::bigint, (SELECT count(*) FROM ci_rows),
          'keep_rows: COPY through the hook stores each row once (the repeats dropped), tag included');
SELECT is((SELECT count(*) FROM pg_temp.ck_t k JOIN ci_rows r USING (account_id)
            WHERE k.ts = r.ts::timestamptz AND k.quantity = r.quantity::numeric),
          (SELECT count(*) FROM ci_rows), 'each stored as PostgreSQL reads it');
ROLLBACK TO SAVEPOINT s;
SELECT is(test.row_count_of(format('COPY pg_temp.ck_t FROM %L WHERE true', :'copy_file')), :hook_n::bigint,
          'through PostgreSQL''s COPY: the same command tag');
SELECT is(pg_temp.kept() || ' ' || pg_temp.last_ts(), :'hook_kept' || ' ' || :'hook_last',
          'the same rows stored and the same cells');
ROLLBACK TO SAVEPOINT s;
SELECT format('COPY (SELECT) TO PROGRAM %L', 'rm -f ' || :'copy_file') AS rm_sql \gset
:rm_sql;

-- a typmod goes to PostgreSQL's input function, which applies it
CREATE TABLE pg_temp.ci_p (account_id bigint, meter text, quantity numeric(2, 0), ts timestamptz(0));
SELECT billing.meter_table('pg_temp.ci_p', 'account_id', 'meter', 'quantity', 'ts', keep_rows => false);
COPY pg_temp.ci_p FROM STDIN;
7601	ci_last	12	2026-12-06 13:05:39.6+00
\.
SELECT is((SELECT format('%s %s', quantity, last_ts AT TIME ZONE 'UTC') FROM billing.usage_cells
            WHERE meter = 'ci_last' AND account_id = 7601),
          '12 2026-12-06 13:05:40', 'a column with a typmod is read by PostgreSQL, which rounds the timestamp');
SELECT throws_ok($$COPY pg_temp.ci_p FROM PROGRAM 'printf "7601\tci_last\t123\t2026-12-06 13:05:39+00\n"'$$,
                 '22003', NULL, 'and raises 22003 for an integer its numeric(2, 0) cannot hold');
SELECT throws_ok($$COPY pg_temp.ci_t FROM PROGRAM 'printf "7602\tci_last\t1\t2023-02-29 00:00:00+00\n"'$$,
                 '22008', NULL, 'a date PostgreSQL rejects is rejected, with its SQLSTATE');

SELECT * FROM finish();
ROLLBACK;
