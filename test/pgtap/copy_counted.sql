-- copy_counted: COPY FROM into a metered table that keeps no rows is counted
-- by billing's COPY hook (src/ingest_copy.c) without firing the table's
-- triggers, and writes exactly what the triggers write.  A WHERE clause
-- leaves a COPY to PostgreSQL and the triggers, so `WHERE true` is the same
-- COPY through the triggers: each comparison loads the same rows both
-- ways, in savepoints, and compares the delta cells, account by account
-- (a group row's bytes hold its parts' seqs).  The
-- trigger calls (track_functions) tell which way a COPY went.  The hook is
-- not taken when another trigger, session_replication_role, a read-only
-- transaction or the user's rights would make the result differ; those
-- cases give what the triggers and PostgreSQL give.
BEGIN;
SELECT plan(26);

SET LOCAL track_functions = 'all';
INSERT INTO billing.accounts (account_id) SELECT 7400 + a FROM generate_series(1, 40) a;
INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window) VALUES
    ('cc_sum', 'sum', '1 minute', '100 years'),
    ('cc_max', 'max', '1 hour', '100 years'),
    ('cc_last', 'last', '1 minute', '100 years'),
    ('cc_count', 'count', '1 hour', '100 years');
CREATE TABLE pg_temp.cc_t (account_id bigint, meter text, quantity numeric,
                           ts timestamptz DEFAULT '2025-03-12 10:30+00', event_id text, region text);
SELECT billing.meter_table('pg_temp.cc_t', 'account_id', 'meter', 'quantity', 'ts',
                           dimension_column => 'region', keep_rows => false);

-- calls of the row trigger's function in this transaction so far
CREATE FUNCTION pg_temp.row_calls() RETURNS bigint LANGUAGE sql AS
$$SELECT coalesce(pg_stat_get_xact_function_calls('billing._meter_row'::regproc), 0)$$;
CREATE FUNCTION pg_temp.flush_calls() RETURNS bigint LANGUAGE sql AS
$$SELECT coalesce(pg_stat_get_xact_function_calls('billing._meter_flush'::regproc), 0)$$;
-- the delta cells of the test's accounts, as one value (without seq, taken
-- from a sequence, which a rolled back COPY does not give back)
CREATE FUNCTION pg_temp.deltas() RETURNS text LANGUAGE sql AS
$$SELECT coalesce(md5(string_agg(format('%s/%s/%s/%s/%s/%s/%s/%s', c.account_id, c.seq IS NULL, c.meter,
                                        c.dimension, c.bucket_start, c.quantity, c.events, c.last_ts), ';'
                                 ORDER BY c.account_id, c.meter, c.dimension, c.bucket_start,
                                          c.quantity, c.events, c.last_ts, c.seq IS NULL)), 'none')
    FROM billing.usage_deltas d, billing._delta_rows(d.account_id, d.seq, d.cells, NULL) c
   WHERE c.account_id BETWEEN 7401 AND 7440$$;
-- the usage of the test's accounts, as one value
CREATE FUNCTION pg_temp.usage() RETURNS text LANGUAGE sql AS
$$SELECT coalesce(string_agg(format('%s %s %s %s %s %s', a.account_id, u.meter, u.dimension,
                                    u.bucket_start, u.quantity, u.events), E'\n'
                             ORDER BY a.account_id, u.meter, u.dimension, u.bucket_start), 'none')
    FROM generate_series(7401, 7440) a(account_id),
         billing.usage(a.account_id, '2025-03-12', '2025-03-13') u$$;

-- 20,000 generated rows: 40 accounts, 4 meters, 3 regions, one hour of
-- minutes; sum quantities with up to 3 decimals, the event id of a row
-- every 7th a repeat
CREATE FUNCTION pg_temp.gen() RETURNS text LANGUAGE sql AS $f$SELECT $p$awk 'BEGIN { for (i = 0; i < 20000; i++) printf "%d\t%s\t%d.%03d\t2025-03-12 09:%02d:%02d+00\te%d\t%s\n", 7401 + (i * 7) % 40, (i % 4 == 0) ? "cc_sum" : (i % 4 == 1) ? "cc_max" : (i % 4 == 2) ? "cc_last" : "cc_count", i % 13, (i * 37) % 1000, (i * 11) % 60, i % 60, (i % 7 == 0) ? 0 : i, (i % 3 == 0) ? "eu" : (i % 3 == 1) ? "us" : "" }'$p$$f$;

-- ---------------------------------------------------------------- the hook
SAVEPOINT s;
SELECT format('COPY pg_temp.cc_t FROM PROGRAM %L', pg_temp.gen()) AS copy_sql \gset
:copy_sql;
SELECT is(pg_temp.row_calls(), 0::bigint, 'a COPY into a metered table that keeps no rows fires no row trigger');
SELECT is(pg_temp.flush_calls(), 0::bigint, 'nor the flush trigger');
SELECT is((SELECT count(*) FROM pg_temp.cc_t), 0::bigint, 'it keeps no rows');
SELECT is((SELECT sum(u.events) FROM generate_series(7401, 7440) a,
                  billing.usage(a, '2025-03-12', '2025-03-13') u), 20000::numeric,
          'it counts all 20,000 rows');
SELECT pg_temp.deltas() AS hook_deltas, pg_temp.usage() AS hook_usage \gset
ROLLBACK TO SAVEPOINT s;

SELECT format('COPY pg_temp.cc_t FROM PROGRAM %L WHERE true', pg_temp.gen()) AS copy_sql \gset
:copy_sql;
SELECT is(pg_temp.row_calls(), 20000::bigint, 'the same COPY with a WHERE clause fires the row trigger per row');
SELECT is(pg_temp.deltas(), :'hook_deltas', 'both write the same delta cells');
SELECT is(pg_temp.usage(), :'hook_usage', 'and read the same usage');
ROLLBACK TO SAVEPOINT s;

-- beyond work_mem: flushes in the middle of the statement, runs merged (set
-- outside the savepoint, which would undo it)
RELEASE SAVEPOINT s;
SET LOCAL work_mem = '64kB';
SAVEPOINT s;
SELECT format('COPY pg_temp.cc_t FROM PROGRAM %L', pg_temp.gen()) AS copy_sql \gset
:copy_sql;
SELECT pg_temp.deltas() AS hook_deltas, pg_temp.usage() AS hook_usage \gset
SELECT is(pg_temp.row_calls(), 20000::bigint, 'work_mem 64kB: the hook, no trigger call yet');
ROLLBACK TO SAVEPOINT s;
SELECT format('COPY pg_temp.cc_t FROM PROGRAM %L WHERE true', pg_temp.gen()) AS copy_sql \gset
:copy_sql;
SELECT is(pg_temp.deltas(), :'hook_deltas', 'work_mem 64kB: the same delta cells both ways');
SELECT is(pg_temp.usage(), :'hook_usage', 'work_mem 64kB: the same usage both ways');
ROLLBACK TO SAVEPOINT s;
RESET work_mem;

-- a column list: the default of ts; STDIN
COPY pg_temp.cc_t (account_id, meter, quantity, region) FROM STDIN;
7401	cc_sum	2.5	eu
7401	cc_sum	0.25	eu
7402	cc_count	9	\N
\.
SELECT is(pg_temp.usage(),
          E'7401 cc_sum eu 2025-03-12 10:30:00+00 2.75 2\n7402 cc_count  2025-03-12 10:00:00+00 1 1',
          'COPY FROM STDIN with a column list counts at the default timestamp');
SELECT is(pg_temp.row_calls(), 40000::bigint, 'through the hook');

-- errors are those of the triggers, with COPY's line
SELECT throws_ok($$COPY pg_temp.cc_t FROM PROGRAM 'printf "7401\tcc_sum\t1\t2025-03-12 09:00+00\t\\\\N\t\\\\N\n\\\\N\tcc_sum\t1\t2025-03-12 09:00+00\t\\\\N\t\\\\N\n"'$$,
                 '22004', 'account of a metered row must not be null', 'a null account: 22004');
SELECT throws_ok($$COPY pg_temp.cc_t FROM PROGRAM 'printf "7499\tcc_sum\t1\t2025-03-12 09:00+00\t\\\\N\t\\\\N\n"'$$,
                 '23503', 'account 7499 does not exist', 'an unknown account: 23503');
SELECT throws_ok($$COPY pg_temp.cc_t FROM PROGRAM 'printf "7401\tcc_nope\t1\t2025-03-12 09:00+00\t\\\\N\t\\\\N\n"'$$,
                 '23503', NULL, 'an unknown meter: 23503');
SELECT is(pg_temp.row_calls(), 40000::bigint, 'those errors came from the hook');
SELECT throws_ok($$COPY pg_temp.cc_nosuch FROM PROGRAM 'true'$$, '42P01',
                 'relation "pg_temp.cc_nosuch" does not exist', 'a table that does not exist: PostgreSQL''s 42P01');

-- ------------------------------------------- when the hook stays out of it
-- session_replication_role = replica: the triggers (ENABLE) do not fire, the
-- rows are stored and not counted, as PostgreSQL does
SAVEPOINT s;
SET LOCAL session_replication_role = replica;
COPY pg_temp.cc_t (account_id, meter, quantity) FROM STDIN;
7403	cc_sum	5
\.
RESET session_replication_role;
SELECT is((SELECT count(*) FROM pg_temp.cc_t WHERE account_id = 7403), 1::bigint,
          'session_replication_role = replica: the row is stored, as the disabled triggers leave it');
SELECT is((SELECT count(*) FROM billing.usage_deltas WHERE account_id = 7403), 0::bigint,
          'and nothing is counted');
ROLLBACK TO SAVEPOINT s;

-- a trigger of the user's that changes the rows: the triggers count what it
-- leaves
CREATE FUNCTION pg_temp.cc_double() RETURNS trigger LANGUAGE plpgsql AS
$$BEGIN NEW.quantity := NEW.quantity * 2; RETURN NEW; END$$;
CREATE TRIGGER a_double BEFORE INSERT ON pg_temp.cc_t FOR EACH ROW EXECUTE FUNCTION pg_temp.cc_double();
COPY pg_temp.cc_t (account_id, meter, quantity) FROM STDIN;
7404	cc_sum	5
\.
SELECT is((SELECT sum(u.quantity) FROM billing.usage(7404, '2025-03-12', '2025-03-13') u), 10::numeric,
          'with a trigger of the user''s, the triggers count the row it changed');
SELECT is(pg_temp.row_calls(), 40001::bigint, 'through the row trigger');
ROLLBACK TO SAVEPOINT s;

-- the checks PostgreSQL makes come first, with its errors: INSERT on the
-- table, a transaction that may write
CREATE TABLE cc_p (account_id bigint, meter text, quantity numeric, ts timestamptz);
SELECT billing.meter_table('cc_p', 'account_id', 'meter', 'quantity', 'ts', keep_rows => false);
CREATE ROLE cc_copier;
GRANT pg_execute_server_program TO cc_copier;
GRANT USAGE ON SCHEMA billing TO cc_copier;
SET LOCAL ROLE cc_copier;
SELECT throws_ok($$COPY cc_p FROM PROGRAM 'printf "7406	cc_sum	1	2025-03-12 09:00+00
"'$$,
                 '42501', 'permission denied for table cc_p', 'without INSERT on the table: 42501');
RESET ROLE;
SET LOCAL transaction_read_only = on;
SELECT throws_ok($$COPY cc_p FROM PROGRAM 'printf "7406	cc_sum	1	2025-03-12 09:00+00
"'$$,
                 '25006', 'cannot execute COPY FROM in a read-only transaction',
                 'in a read-only transaction: 25006');
ROLLBACK TO SAVEPOINT s;
SELECT is((SELECT count(*) FROM billing.usage_deltas WHERE account_id = 7406), 0::bigint,
          'neither counted anything');

-- a subtransaction that rolls back drops what its COPY counted
SAVEPOINT inner_copy;
COPY pg_temp.cc_t (account_id, meter, quantity) FROM STDIN;
7405	cc_sum	5
\.
ROLLBACK TO SAVEPOINT inner_copy;
COPY pg_temp.cc_t (account_id, meter, quantity) FROM STDIN;
7405	cc_sum	7
\.
SELECT is((SELECT sum(u.quantity) FROM billing.usage(7405, '2025-03-12', '2025-03-13') u), 7::numeric,
          'a COPY rolled back to its savepoint counts nothing; the next one counts');
SELECT is(pg_temp.row_calls(), 40001::bigint, 'both through the hook');

SELECT * FROM finish();
ROLLBACK;
