-- meter_security: the triggers of metered tables are not SECURITY DEFINER
-- (SPEC section 8, issue 13 defect 4).  They run as the role that inserts;
-- their C code switches to the extension owner, with search_path pinned to
-- pg_catalog, billing, pg_temp, around the work that needs the extension's
-- rights only.  Checked here:
--   - the three trigger functions are SECURITY INVOKER without a SET clause;
--   - a billing_writer whose search_path starts with its own schema, holding
--     a shadowing = for the types billing compares and functions named like
--     built-ins that record every call, meters a COPY into three kinds of
--     metered tables and calls record, ingest and report_cumulative: none of
--     its functions runs, and every count is exact;
--   - its own triggers on the metered tables still run as itself, with its
--     own search_path (before and after billing's triggers);
--   - a role with no right in schema billing at all still meters an INSERT
--     (the owner switch works for reading meters and accounts, claiming
--     event ids and writing deltas), and after an error inside billing's
--     work (an unknown account) it is itself again, with its search_path.
BEGIN;
SELECT plan(18);
\ir ../helpers.sql
SET LOCAL timezone = 'UTC';

SELECT is((SELECT array_agg(p.proname::text || ':' || p.prosecdef || ':' || coalesce(p.proconfig::text, '-')
                            ORDER BY p.proname)
             FROM pg_proc p
            WHERE p.pronamespace = 'billing'::regnamespace
              AND p.proname IN ('_meter_row', '_meter_after_rows', '_meter_flush')),
          ARRAY['_meter_after_rows:false:-', '_meter_flush:false:-', '_meter_row:false:-'],
          'the triggers of metered tables are SECURITY INVOKER, without a SET clause');

INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('ms_calls', 'sum', '100 years'), ('ms_peak', 'max', '100 years');
INSERT INTO billing.accounts (account_id) VALUES (8301), (8302), (8303);

CREATE ROLE ms_writer NOLOGIN IN ROLE billing_writer;
CREATE ROLE ms_nobody NOLOGIN;

-- what runs records itself here: (what, as whom, with which search_path)
CREATE SCHEMA ms_evil AUTHORIZATION ms_writer;
CREATE TABLE ms_evil.calls (what text, who text, path text);
ALTER TABLE ms_evil.calls OWNER TO ms_writer;
GRANT INSERT ON ms_evil.calls TO PUBLIC;
GRANT USAGE ON SCHEMA ms_evil TO PUBLIC;

SET ROLE ms_writer;
CREATE FUNCTION ms_evil.note(what text) RETURNS void LANGUAGE sql AS
    $$ INSERT INTO ms_evil.calls VALUES (what, current_user, pg_catalog.current_setting('search_path')) $$;
-- a shadowing = for every type billing's statements compare
CREATE FUNCTION ms_evil.eq_int8(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('= bigint'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE FUNCTION ms_evil.eq_text(text, text) RETURNS boolean LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('= text'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE FUNCTION ms_evil.eq_ts(timestamptz, timestamptz) RETURNS boolean LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('= timestamptz'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE FUNCTION ms_evil.eq_num(numeric, numeric) RETURNS boolean LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('= numeric'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE FUNCTION ms_evil.eq_int4(integer, integer) RETURNS boolean LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('= integer'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE FUNCTION ms_evil.lt_int8(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('< bigint'); RETURN $1 OPERATOR(pg_catalog.<) $2; END $$;
CREATE OPERATOR ms_evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = ms_evil.eq_int8);
CREATE OPERATOR ms_evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = ms_evil.eq_text);
CREATE OPERATOR ms_evil.= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = ms_evil.eq_ts);
CREATE OPERATOR ms_evil.= (LEFTARG = numeric, RIGHTARG = numeric, FUNCTION = ms_evil.eq_num);
CREATE OPERATOR ms_evil.= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = ms_evil.eq_int4);
CREATE OPERATOR ms_evil.< (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = ms_evil.lt_int8);
-- functions named like the built-ins billing calls
CREATE FUNCTION ms_evil.now() RETURNS timestamptz LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('now'); RETURN pg_catalog.now(); END $$;
CREATE FUNCTION ms_evil.lower(text) RETURNS text LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('lower'); RETURN pg_catalog.lower($1); END $$;
CREATE FUNCTION ms_evil.numeric_add(numeric, numeric) RETURNS numeric LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('numeric_add'); RETURN pg_catalog.numeric_add($1, $2); END $$;
CREATE FUNCTION ms_evil.numeric_cmp(numeric, numeric) RETURNS integer LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('numeric_cmp'); RETURN pg_catalog.numeric_cmp($1, $2); END $$;
CREATE FUNCTION ms_evil.unnest(anyarray) RETURNS SETOF anyelement LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('unnest'); RETURN QUERY SELECT pg_catalog.unnest($1); END $$;
CREATE FUNCTION ms_evil.nextval(regclass) RETURNS bigint LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('nextval'); RETURN pg_catalog.nextval($1); END $$;
CREATE FUNCTION ms_evil.date_bin(interval, timestamptz, timestamptz) RETURNS timestamptz LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('date_bin'); RETURN pg_catalog.date_bin($1, $2, $3); END $$;
CREATE FUNCTION ms_evil.date_trunc(text, timestamptz) RETURNS timestamptz LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('date_trunc'); RETURN pg_catalog.date_trunc($1, $2); END $$;
CREATE FUNCTION ms_evil.greatest_num(numeric, numeric) RETURNS numeric LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('numeric_larger'); RETURN pg_catalog.numeric_larger($1, $2); END $$;
CREATE FUNCTION ms_evil.length(text) RETURNS integer LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('length'); RETURN pg_catalog.length($1); END $$;
CREATE FUNCTION ms_evil.int8(numeric) RETURNS bigint LANGUAGE plpgsql AS
    $$ BEGIN PERFORM ms_evil.note('int8'); RETURN pg_catalog.int8($1); END $$;

-- the writer's metered tables, each with its own triggers around billing's:
-- "a_mine" fires before billing_meter_row, "c_mine" after it (on rows that
-- are kept), "z_mine" after billing_meter_flush
CREATE TABLE ms_evil.stream (account bigint, meter text, quantity numeric, ts timestamptz, id text);
CREATE TABLE ms_evil.kept (account bigint, meter text, quantity numeric, ts timestamptz, id text);
CREATE TABLE ms_evil.batch (account bigint, meter text, quantity numeric, ts timestamptz, dim text);
CREATE FUNCTION ms_evil.mine() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ms_evil.note(TG_NAME || ' on ' || TG_TABLE_NAME);
    RETURN NEW;
END
$$;
CREATE TRIGGER a_mine BEFORE INSERT ON ms_evil.stream FOR EACH ROW EXECUTE FUNCTION ms_evil.mine();
CREATE TRIGGER z_mine AFTER INSERT ON ms_evil.stream FOR EACH STATEMENT EXECUTE FUNCTION ms_evil.mine();
CREATE TRIGGER a_mine BEFORE INSERT ON ms_evil.kept FOR EACH ROW EXECUTE FUNCTION ms_evil.mine();
CREATE TRIGGER c_mine BEFORE INSERT ON ms_evil.kept FOR EACH ROW EXECUTE FUNCTION ms_evil.mine();
CREATE TRIGGER z_mine AFTER INSERT ON ms_evil.kept FOR EACH STATEMENT EXECUTE FUNCTION ms_evil.mine();
CREATE TRIGGER z_mine AFTER INSERT ON ms_evil.batch FOR EACH STATEMENT EXECUTE FUNCTION ms_evil.mine();
RESET ROLE;

SELECT billing.meter_table('ms_evil.stream', 'account', 'meter', 'quantity', 'ts', 'id', keep_rows => false);
SELECT billing.meter_table('ms_evil.kept', 'account', 'meter', 'quantity', 'ts', 'id', keep_rows => true);
SELECT billing.meter_table('ms_evil.batch', 'account', 'meter', 'quantity', 'ts', dimension_column => 'dim',
                           keep_rows => true);
GRANT INSERT ON ms_evil.stream TO ms_nobody;
GRANT INSERT ON ms_evil.kept TO ms_nobody;

-- as the writer, with its schema first (nothing below may call pgTAP, whose
-- functions would resolve through this search_path too)
SET ROLE ms_writer;
SET search_path = ms_evil, pg_catalog, pg_temp;
COPY ms_evil.stream FROM STDIN (FORMAT csv);
8301,ms_calls,1.5,2025-06-01 10:00:00+00,s1
8301,ms_calls,2,2025-06-01 10:00:30+00,s2
8301,ms_calls,2,2025-06-01 10:00:30+00,s2
8302,ms_calls,4,2025-06-01 10:01:00+00,s3
8302,ms_peak,7,2025-06-01 10:01:00+00,s4
8302,ms_peak,3,2025-06-01 10:01:10+00,s5
\.
COPY ms_evil.kept FROM STDIN (FORMAT csv);
8301,ms_calls,10,2025-06-01 10:00:00+00,k1
8301,ms_calls,10,2025-06-01 10:00:00+00,k1
8302,ms_calls,20,2025-06-01 10:01:00+00,k2
\.
COPY ms_evil.batch FROM STDIN (FORMAT csv);
8301,ms_calls,100,2025-06-01 10:00:00+00,eu
8302,ms_calls,200,2025-06-01 10:01:00+00,eu
8302,ms_calls,300,2025-06-01 10:01:00+00,us
\.
SELECT billing.record(8301, 'ms_calls', 1000, '2025-06-01 10:00:00+00', 'r1');
SELECT billing.record(8301, 'ms_calls', 1000, '2025-06-01 10:00:00+00', 'r1');
SELECT * FROM billing.ingest('ms', 0, 1, '{8301,8302}', '{ms_calls,ms_calls}', '{10000,20000}',
                             '{2025-06-01 10:00:00+00,2025-06-01 10:01:00+00}', '{i1,i2}');
SELECT billing.report_cumulative('c1', 8302, 'ms_calls', '2025-06-01 10:01:00+00', 5);
SELECT billing.report_cumulative('c1', 8302, 'ms_calls', '2025-06-01 10:01:00+00', 50000);
SELECT billing.report_cumulative('c1', 8302, 'ms_calls', '2025-06-01 10:01:00+00', 40000);
RESET search_path;
RESET ROLE;

SELECT is_empty($$SELECT * FROM ms_evil.calls WHERE what NOT LIKE '%mine on %'$$,
                'none of the writer''s operators and functions ran (COPY into three metered tables, record, ingest, report_cumulative)');
SELECT results_eq(
    $$SELECT what, who, path, count(*) FROM ms_evil.calls GROUP BY 1, 2, 3 ORDER BY 1$$,
    $$VALUES ('a_mine on kept', 'ms_writer', 'ms_evil, pg_catalog, pg_temp', 3::bigint),
             ('a_mine on stream', 'ms_writer', 'ms_evil, pg_catalog, pg_temp', 6::bigint),
             ('c_mine on kept', 'ms_writer', 'ms_evil, pg_catalog, pg_temp', 2::bigint),
             ('z_mine on batch', 'ms_writer', 'ms_evil, pg_catalog, pg_temp', 1::bigint),
             ('z_mine on kept', 'ms_writer', 'ms_evil, pg_catalog, pg_temp', 1::bigint),
             ('z_mine on stream', 'ms_writer', 'ms_evil, pg_catalog, pg_temp', 1::bigint)$$,
    'the writer''s own triggers ran as the writer, with its search_path, before and after billing''s');
SELECT results_eq(
    $$SELECT a, u.meter, u.dimension, u.quantity, u.events
        FROM unnest(ARRAY[8301, 8302]::bigint[]) a,
             billing.usage(a, '2025-06-01', '2025-06-02', '1 day') u
       ORDER BY 1, 2, 3$$,
    $$VALUES (8301::bigint, 'ms_calls', '', 1.5 + 2 + 10 + 1000 + 10000, 5::bigint),
             (8301, 'ms_calls', 'eu', 100::numeric, 1::bigint),
             (8302, 'ms_calls', '', 4 + 20 + 20000 + 50000::numeric, 4::bigint),
             (8302, 'ms_calls', 'eu', 200::numeric, 1::bigint),
             (8302, 'ms_calls', 'us', 300::numeric, 1::bigint),
             (8302, 'ms_peak', '', 7::numeric, 2::bigint)$$,
    'and every count is exact');
SELECT is((SELECT count(*) FROM ms_evil.kept), 2::bigint, 'the kept table stored one row per event id');

-- a role with no right in schema billing meters an INSERT: the meter cache is
-- reloaded (a new meter), event ids are claimed now (kept) and in a batch
-- (stream), the account checked and the deltas written as the owner
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES ('ms_new', 'sum', '100 years');
SET ROLE ms_nobody;
SET search_path = ms_evil, pg_catalog, pg_temp;
INSERT INTO ms_evil.kept VALUES (8303, 'ms_new', 3, '2025-06-01 10:00:00+00', 'n1'),
                                (8303, 'ms_new', 3, '2025-06-01 10:00:00+00', 'n1'),
                                (8303, 'ms_new', 4, '2025-06-01 10:00:00+00', 'n2');
INSERT INTO ms_evil.stream VALUES (8303, 'ms_new', 5, '2025-06-01 10:00:00+00', 'n3'),
                                  (8303, 'ms_new', 5, '2025-06-01 10:00:00+00', 'n3');
RESET search_path;
SELECT is(test.sqlstate_of($$SELECT count(*) FROM billing.usage_cells$$), '42501',
          'the role cannot read billing''s tables itself');
SELECT is(test.sqlstate_of($$INSERT INTO ms_evil.stream VALUES (424242, 'ms_new', 1, '2025-06-01 10:00:00+00', 'n4')$$),
          '23503', 'an unknown account is refused from inside the flush');
SELECT is(current_user::text, 'ms_nobody', 'after that error the role is itself again');
-- (read under the role's own search_path without calling pgTAP, then checked)
SET search_path = ms_evil, pg_catalog, pg_temp;
SELECT test.sqlstate_of($$INSERT INTO ms_evil.stream VALUES (424242, 'ms_new', 1, '2025-06-01 10:00:00+00', 'n4')$$) AS err1,
       current_user AS who1, pg_catalog.current_setting('search_path') AS path1 \gset
SELECT test.sqlstate_of($$INSERT INTO ms_evil.kept VALUES (8303, 'ms_nope', 1, '2025-06-01 10:00:00+00', 'n5')$$) AS err2,
       current_user AS who2, pg_catalog.current_setting('search_path') AS path2 \gset
RESET search_path;
RESET ROLE;
SELECT is(:'err1' || ' ' || :'who1' || ' / ' || :'path1', '23503 ms_nobody / ms_evil, pg_catalog, pg_temp',
          'with its own search_path too: after the error the role and its search_path are its own');
SELECT is(:'err2' || ' ' || :'who2' || ' / ' || :'path2', '23503 ms_nobody / ms_evil, pg_catalog, pg_temp',
          'the same after an unknown meter, refused from the row trigger');
SELECT is((SELECT quantity FROM billing.usage(8303, '2025-06-01', '2025-06-02', '1 day', 'ms_new')),
          3 + 4 + 5::numeric, 'the role''s rows were counted exactly');
SELECT is_empty($$SELECT * FROM ms_evil.calls WHERE what NOT LIKE '%mine on %'$$,
                'and none of the writer''s functions ran for it either');

-- the owner of a metered table retypes a metered column: the triggers refuse
-- its rows (42804) instead of reading the new type's bytes as the old one's
-- (a crash of the server for an event id retyped to bigint), and a role
-- with no right in schema billing drops its own tables, metered or not
CREATE ROLE ms_owner NOLOGIN;
GRANT CREATE ON SCHEMA public TO ms_owner;
SET LOCAL ROLE ms_owner;
CREATE TABLE public.ms_retyped (acc bigint, meter text, qty numeric, ts timestamptz, eid text);
CREATE TABLE public.ms_plain (a int);
RESET ROLE;
SELECT billing.meter_table('public.ms_retyped', 'acc', 'meter', 'qty', 'ts', 'eid');
SET LOCAL ROLE ms_owner;
ALTER TABLE public.ms_retyped ALTER COLUMN eid TYPE bigint USING 1;
SELECT throws_ok($$INSERT INTO public.ms_retyped VALUES (1, 'x', 1, now(), 12345678)$$, '42804', NULL,
                 'an event id column retyped to bigint: 42804, nothing read');
ALTER TABLE public.ms_retyped ALTER COLUMN eid TYPE text, ALTER COLUMN qty TYPE float8;
SELECT throws_ok($$INSERT INTO public.ms_retyped VALUES (1, 'x', 1.5, now(), 'e1')$$, '42804', NULL,
                 'a quantity column retyped to float8: 42804');
SELECT lives_ok($$DROP TABLE public.ms_plain$$, 'a role with no right in schema billing drops its table');
SELECT lives_ok($$DROP TABLE public.ms_retyped$$, 'and its metered table');
RESET ROLE;
SELECT is((SELECT count(*) FROM billing.metered_tables WHERE tbl::text LIKE '%ms_retyped%'), 0::bigint,
          'which billing forgets');

-- a metered table never becomes a partition (rows routed through the
-- parent would not be counted)
CREATE TABLE public.ms_parent (acc bigint, meter text, qty numeric, ts timestamptz) PARTITION BY LIST (meter);
CREATE TABLE public.ms_part (acc bigint, meter text, qty numeric, ts timestamptz);
SELECT billing.meter_table('public.ms_part', 'acc', 'meter', 'qty', 'ts', keep_rows => true);
SELECT throws_ok($$ALTER TABLE public.ms_parent ATTACH PARTITION public.ms_part FOR VALUES IN ('x')$$,
                 '55000', NULL, 'attaching a metered table as a partition: 55000');

SELECT * FROM finish();
ROLLBACK;
