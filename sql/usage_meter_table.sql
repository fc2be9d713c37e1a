-- usage_meter_table: billing.meter_table() makes every INSERT and COPY into an
-- ordinary table count usage (SPEC section 3), through C triggers.
-- Shows INSERT and COPY FROM STDIN with keep_rows true (rows stored) and
-- false (counters only), that duplicates are never stored, that event ids
-- are deduped within one COPY and across statements and paths, that a
-- rolled-back COPY leaves nothing and a rolled-back savepoint drops only its
-- rows, the errors meter_table raises at once for missing or mistyped
-- columns, unmeter_table, and that one bad row makes a whole COPY count nothing.

-- usage is stamped relative to t0, a fixed whole hour (the meters accept
-- reports 100 years late), so that no output depends on the clock.  The
-- COPYs below leave ts out, and the column default stamps the rows with t0
SELECT timestamptz '2025-03-12 09:00+00' AS t0 \gset
SELECT set_config('usage_test.t0', :'t0', false) IS NOT NULL AS t0_set;

INSERT INTO billing.accounts (account_id) VALUES (301), (302), (303), (304);
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('mtab_bytes', 'sum', '100 years'), ('mtab_calls', 'count', '100 years'),
    ('mtab_peak', 'max', '100 years');

-- events: every row is stored (keep_rows true is the default)
CREATE TABLE events (
    account_id bigint,
    meter      text,
    qty        numeric,
    ts         timestamptz DEFAULT current_setting('usage_test.t0')::timestamptz,
    event_id   text,
    region     text,
    note       text
);
SELECT billing.meter_table('events', 'account_id', 'meter', 'qty', 'ts', 'event_id', 'region');
SELECT tbl, account_column, meter_column, quantity_column, ts_column, event_id_column,
       dimension_column, keep_rows
  FROM billing.metered_tables;

-- INSERT: each row counts into the bucket of its ts, per dimension
INSERT INTO events VALUES
    (301, 'mtab_bytes', 100, :'t0', 'a1', 'eu', 'first'),
    (301, 'mtab_bytes', 250, :'t0'::timestamptz + interval '30 seconds', 'a2', 'eu', 'second'),
    (301, 'mtab_bytes', 7, :'t0'::timestamptz + interval '1 minute', 'a3', 'us', 'third'),
    (301, 'mtab_calls', 99, :'t0', 'c1', '', 'a call'),
    (301, 'mtab_peak', 5, :'t0', NULL, '', 'peak 5'),
    (301, 'mtab_peak', 9, :'t0', NULL, '', 'peak 9');
SELECT * FROM test.show(301, :'t0');
-- a duplicate event id in the same statement and across statements is
-- neither counted nor stored; a row without event id always is
INSERT INTO events VALUES
    (301, 'mtab_bytes', 1000, :'t0', 'a1', 'eu', 'repeat of a1'),
    (301, 'mtab_bytes', 1, :'t0', 'a4', 'eu', 'new a4'),
    (301, 'mtab_bytes', 2000, :'t0', 'a4', 'eu', 'repeat of a4'),
    (301, 'mtab_bytes', 3, :'t0', NULL, 'eu', 'no id'),
    (301, 'mtab_bytes', 3, :'t0', NULL, 'eu', 'no id again');
SELECT account_id, meter, qty, ts - :'t0'::timestamptz AS at, event_id, region, note
  FROM events ORDER BY note;
SELECT * FROM test.show(301, :'t0') WHERE meter = 'mtab_bytes';
-- dedupe is shared with the other paths: an id counted by record() is a
-- duplicate here, and the other way round
SELECT billing.record(301, 'mtab_bytes', 10, :'t0', 'r1');
INSERT INTO events VALUES (301, 'mtab_bytes', 10, :'t0', 'r1', 'eu', 'r1 again');
SELECT billing.record(301, 'mtab_bytes', 10, :'t0', 'a2');
SELECT count(*) AS stored_r1 FROM events WHERE event_id = 'r1';

-- COPY FROM STDIN counts the same way: 5 rows, one repeat within the COPY
-- (b1) and one of an earlier INSERT (a3); 3 rows are stored
COPY events (account_id, meter, qty, event_id, region, note) FROM STDIN;
302	mtab_bytes	40	b1	eu	copy 1
302	mtab_bytes	41	b2	eu	copy 2
302	mtab_bytes	42	b1	eu	copy 3, repeat of b1
301	mtab_bytes	43	a3	us	copy 4, repeat of a3
302	mtab_bytes	44	\N	us	copy 5
\.
SELECT account_id, meter, qty, event_id, region, note FROM events
 WHERE note LIKE 'copy%' ORDER BY note;
SELECT * FROM test.show(302, :'t0');

-- keep_rows false: counters only, nothing is stored
CREATE TABLE stream (
    account_id integer,
    meter      varchar(40),
    qty        bigint,
    ts         timestamptz DEFAULT current_setting('usage_test.t0')::timestamptz,
    event_id   varchar
);
SELECT billing.meter_table('stream', 'account_id', 'meter', 'qty', 'ts', 'event_id',
                           keep_rows => false);
INSERT INTO stream VALUES
    (303, 'mtab_bytes', 5, :'t0', 's1'),
    (303, 'mtab_bytes', 6, :'t0', 's2'),
    (303, 'mtab_bytes', 500, :'t0', 's1'),
    (303, 'mtab_calls', 1, :'t0'::timestamptz + interval '2 minutes', 's1'),
    (303, 'mtab_calls', 1, :'t0'::timestamptz + interval '2 minutes', NULL);
COPY stream (account_id, meter, qty, event_id) FROM STDIN;
303	mtab_bytes	7	s3
303	mtab_bytes	700	s3
303	mtab_bytes	8	s2
303	mtab_bytes	9	\N
303	mtab_peak	4	\N
\.
SELECT count(*) AS stored FROM stream;
SELECT * FROM test.show(303, :'t0');
-- replaying the same COPY counts nothing more (only the row without id)
COPY stream (account_id, meter, qty, event_id) FROM STDIN;
303	mtab_bytes	7	s3
303	mtab_bytes	700	s3
303	mtab_bytes	8	s2
303	mtab_bytes	9	\N
\.
SELECT * FROM test.show(303, :'t0') WHERE meter = 'mtab_bytes';

-- a rolled-back COPY leaves nothing: not the counts, not the rows, not the
-- event ids, which count when sent again
BEGIN;
COPY events (account_id, meter, qty, event_id, region, note) FROM STDIN;
304	mtab_bytes	1	d1		rolled back 1
304	mtab_bytes	2	d2		rolled back 2
\.
COPY stream (account_id, meter, qty, event_id) FROM STDIN;
304	mtab_bytes	4	d3
\.
SELECT * FROM test.show(304, :'t0');
ROLLBACK;
SELECT * FROM test.show(304, :'t0');
SELECT count(*) AS stored FROM events WHERE account_id = 304;
INSERT INTO events (account_id, meter, qty, event_id, note) VALUES
    (304, 'mtab_bytes', 1, 'd1', 'sent again 1');
INSERT INTO stream (account_id, meter, qty, event_id) VALUES (304, 'mtab_bytes', 4, 'd3');
SELECT * FROM test.show(304, :'t0');

-- a savepoint rolled back inside a transaction drops only its own rows
BEGIN;
INSERT INTO events (account_id, meter, qty, event_id, note) VALUES
    (304, 'mtab_calls', 1, 'e1', 'before the savepoint');
SAVEPOINT s;
COPY events (account_id, meter, qty, event_id, region, note) FROM STDIN;
304	mtab_calls	1	e2		inside the savepoint
304	mtab_calls	1	e3		inside the savepoint
\.
INSERT INTO stream (account_id, meter, qty, event_id) VALUES (304, 'mtab_calls', 1, 'e4');
ROLLBACK TO SAVEPOINT s;
INSERT INTO events (account_id, meter, qty, event_id, note) VALUES
    (304, 'mtab_calls', 1, 'e3', 'after the savepoint'),
    (304, 'mtab_calls', 1, 'e1', 'after the savepoint, repeat of e1');
INSERT INTO stream (account_id, meter, qty, event_id) VALUES (304, 'mtab_calls', 1, 'e4');
COMMIT;
SELECT event_id, note FROM events WHERE meter = 'mtab_calls' AND account_id = 304 ORDER BY event_id;
SELECT * FROM test.show(304, :'t0') WHERE meter = 'mtab_calls';

-- one bad row makes the whole COPY (or INSERT) count nothing and store nothing
COPY stream (account_id, meter, qty, event_id) FROM STDIN;
304	mtab_bytes	1	f1
304	mtab_bytes	1	f2
304	mtab_nope	1	f3
304	mtab_bytes	1	f4
\.
COPY events (account_id, meter, qty, event_id, region, note) FROM STDIN;
304	mtab_bytes	1	f1		good
304	mtab_bytes	-1	f2		negative
\.
COPY events (account_id, meter, qty, event_id, region, note) FROM STDIN;
304	mtab_bytes	1	f1		good
399	mtab_bytes	1	f2		unknown account
\.
INSERT INTO stream (account_id, meter, qty, event_id) VALUES
    (304, 'mtab_bytes', 1, 'f1'),
    (304, NULL, 1, 'f2');
INSERT INTO events (account_id, meter, qty, event_id) VALUES
    (304, 'mtab_bytes', 1, 'f1'),
    (304, 'mtab_bytes', 'NaN', 'f2');
SELECT test.sqlstate_of(format(
    'INSERT INTO stream (account_id, meter, qty, ts, event_id) VALUES (304, %L, 1, %L, %L), (304, %L, 1, %L, %L)',
    'mtab_bytes', :'t0', 'f1', 'mtab_bytes', '1900-01-01 00:00+00', 'f2')) AS too_late,
       test.sqlstate_of(format(
    'INSERT INTO stream (account_id, meter, qty, ts, event_id) VALUES (304, %L, 1, %L, %L), (304, %L, 1, %L, %L)',
    'mtab_bytes', :'t0', 'f1', 'mtab_bytes', '2999-01-01 00:00+00', 'f2')) AS too_early;
SELECT count(*) AS stored FROM events WHERE event_id LIKE 'f%';
SELECT * FROM test.show(304, :'t0') WHERE meter = 'mtab_bytes';
-- the good rows' event ids were not claimed: they count now
COPY stream (account_id, meter, qty, event_id) FROM STDIN;
304	mtab_bytes	1	f1
304	mtab_bytes	1	f2
\.
SELECT * FROM test.show(304, :'t0') WHERE meter = 'mtab_bytes';

-- meter_table checks the table and its columns at once --------------------
CREATE TABLE raw (acct bigint, m text, q numeric, t timestamptz, e text, d text,
                  acct_text text, m_int int, q_float float8, t_plain timestamp,
                  e_int int, d_json jsonb);
-- a column that does not exist: 42703
SELECT billing.meter_table('raw', 'acct', 'm', 'q', 'nope');
SELECT billing.meter_table('raw', 'acct', 'm', 'q', 't', event_id_column => 'nope');
SELECT billing.meter_table('raw', 'acct', 'm', 'q', 't', dimension_column => 'nope');
-- a column of the wrong type: 42804
SELECT billing.meter_table('raw', 'acct_text', 'm', 'q', 't');
SELECT billing.meter_table('raw', 'acct', 'm_int', 'q', 't');
SELECT billing.meter_table('raw', 'acct', 'm', 'q_float', 't');
SELECT billing.meter_table('raw', 'acct', 'm', 'q', 't_plain');
SELECT billing.meter_table('raw', 'acct', 'm', 'q', 't', event_id_column => 'e_int');
SELECT billing.meter_table('raw', 'acct', 'm', 'q', 't', dimension_column => 'd_json');
-- NULL where a value is required: 22004
SELECT billing.meter_table(NULL, 'acct', 'm', 'q', 't');
SELECT billing.meter_table('raw', NULL, 'm', 'q', 't');
SELECT billing.meter_table('raw', 'acct', 'm', 'q', NULL);
SELECT billing.meter_table('raw', 'acct', 'm', 'q', 't', keep_rows => NULL);
-- only ordinary tables
CREATE VIEW raw_view AS SELECT * FROM raw;
SELECT billing.meter_table('raw_view', 'acct', 'm', 'q', 't');
SELECT billing.meter_table('no_such_table', 'acct', 'm', 'q', 't');
-- none of these metered the table: its rows count nothing
INSERT INTO raw (acct, m, q, t) VALUES (304, 'mtab_bytes', 1000, :'t0');
SELECT count(*) AS metered FROM billing.metered_tables WHERE tbl = 'raw'::regclass;
SELECT tgname FROM pg_trigger WHERE tgrelid = 'raw'::regclass;

-- unmeter_table: the table becomes ordinary again -------------------------
SELECT billing.unmeter_table('stream');
INSERT INTO stream (account_id, meter, qty, event_id) VALUES (303, 'mtab_bytes', 1, 's9');
SELECT count(*) AS stored FROM stream;
SELECT * FROM test.show(303, :'t0') WHERE meter = 'mtab_bytes';
SELECT tbl FROM billing.metered_tables ORDER BY tbl::text;
SELECT tgname FROM pg_trigger WHERE tgrelid = 'stream'::regclass;
-- a table that is not metered: 42704; NULL: 22004
SELECT billing.unmeter_table('stream');
SELECT billing.unmeter_table('raw');
SELECT billing.unmeter_table(NULL);
-- metering again with other settings replaces the old ones
SELECT billing.meter_table('events', 'account_id', 'meter', 'qty', 'ts', keep_rows => false);
SELECT tbl, event_id_column, dimension_column, keep_rows FROM billing.metered_tables;
INSERT INTO events (account_id, meter, qty, event_id, region) VALUES
    (302, 'mtab_peak', 3, 'b1', 'eu'), (302, 'mtab_peak', 3, 'b1', 'eu');
SELECT count(*) AS stored FROM events WHERE meter = 'mtab_peak' AND account_id = 302;
SELECT * FROM test.show(302, :'t0') WHERE meter = 'mtab_peak';
SELECT billing.unmeter_table('events');
SELECT count(*) AS metered_tables FROM billing.metered_tables;
DROP VIEW raw_view;
DROP TABLE events, stream, raw;
-- dropping a metered table forgets it: nothing is left in billing.metered_tables
CREATE TABLE doomed (account_id bigint, meter text, qty numeric, ts timestamptz);
SELECT billing.meter_table('doomed', 'account_id', 'meter', 'qty', 'ts');
DROP TABLE doomed;
SELECT count(*) AS metered_tables FROM billing.metered_tables;
