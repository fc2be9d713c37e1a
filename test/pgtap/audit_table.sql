-- audit_table: billing.audit_table and billing.unaudit_table (SPEC section
-- 10.4).  Every error with its SQLSTATE; one audit row per change, in the
-- chain of the row's account, in the same (sub)transaction as the change;
-- row images equal to to_jsonb of the row; partitions; the same chains and
-- the same verify_audit_log as the extension's own tables, also when both
-- append to one chain in one statement; no right of the extension's owner
-- for the session's code; and tampering with user-table audit rows, done
-- by a superuser behind the triggers, found by verify_audit_log().
BEGIN;
SELECT plan(84);

-- the functions as pinned ----------------------------------------------------------------
SELECT has_function('billing', 'audit_table', ARRAY['regclass', 'name'], 'audit_table(regclass, name)');
SELECT has_function('billing', 'unaudit_table', ARRAY['regclass'], 'unaudit_table(regclass)');
SELECT function_returns('billing', 'audit_table', ARRAY['regclass', 'name'], 'void', 'audit_table returns void');
SELECT is((SELECT pg_get_function_arguments('billing.audit_table(regclass, name)'::regprocedure)),
          'tbl regclass, account_column name DEFAULT NULL::name', 'account_column defaults to NULL');
SELECT has_view('billing', 'audited_tables', 'the view audited_tables lists the audited tables');
-- the trigger functions on users' tables run as the user, with no SET clause
SELECT is((SELECT count(*) FROM pg_proc
            WHERE oid IN ('billing._audit_row()'::regprocedure, 'billing._audit_statement()'::regprocedure)
              AND (prosecdef OR proconfig IS NOT NULL)), 0::bigint,
          'the triggers of audited tables are not SECURITY DEFINER and set nothing');

-- a realistic setup ----------------------------------------------------------------------
CREATE ROLE at_app NOLOGIN;
CREATE ROLE at_admin NOLOGIN IN ROLE billing_admin;
CREATE TABLE at_contracts (contract_id bigint PRIMARY KEY, account_id bigint NOT NULL,
                           amount numeric(12, 2) NOT NULL, signed_at timestamptz);
ALTER TABLE at_contracts OWNER TO at_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON at_contracts TO at_app;
CREATE TABLE at_nokey (account_id int, note text);
CREATE TABLE at_leads (id int PRIMARY KEY, account text, small smallint);
CREATE VIEW at_view AS SELECT 1 AS x;
CREATE SEQUENCE at_seq;
CREATE TABLE at_parted (account_id bigint NOT NULL, id bigint NOT NULL, v text,
                        PRIMARY KEY (account_id, id)) PARTITION BY RANGE (account_id);
CREATE TABLE at_parted_a PARTITION OF at_parted FOR VALUES FROM (0) TO (7300);
CREATE TABLE at_parted_b PARTITION OF at_parted FOR VALUES FROM (7300) TO (8000)
    PARTITION BY RANGE (account_id);
CREATE TABLE at_parted_b1 PARTITION OF at_parted_b FOR VALUES FROM (7300) TO (7400);
CREATE TEMP TABLE at_mark AS SELECT coalesce((SELECT seq FROM billing.audit_heads WHERE account_id = 0), 0) AS seq0;

SET ROLE at_admin;
SELECT lives_ok($$SELECT billing.audit_table('at_contracts', 'account_id')$$,
                'a billing_admin owning the table audits it');
RESET ROLE;

-- errors ------------------------------------------------------------------------------------
SELECT throws_ok($$SELECT billing.audit_table('at_no_such_table', 'account_id')$$, '42P01',
                 NULL, 'an unknown table: 42P01');
SELECT throws_ok($$SELECT billing.audit_table(2147483000::oid::regclass)$$, '42P01',
                 NULL, 'a table OID that does not exist: 42P01');
SELECT throws_ok($$SELECT billing.audit_table('at_nokey', 'no_such_column')$$, '42703',
                 NULL, 'an unknown account column: 42703');
SELECT throws_ok($$SELECT billing.audit_table('at_contracts', 'account_id')$$, '42710',
                 NULL, 'a table audited twice: 42710');
SELECT throws_ok($$SELECT billing.audit_table('at_contracts')$$, '42710',
                 NULL, 'audited twice, with another account column: 42710');
SELECT throws_ok($$SELECT billing.audit_table('at_leads', 'account')$$, '42804',
                 NULL, 'an account column of type text: 42804');
SELECT throws_ok($$SELECT billing.audit_table('at_view')$$, '42809', NULL, 'a view: 42809');
SELECT throws_ok($$SELECT billing.audit_table('at_seq')$$, '42809', NULL, 'a sequence: 42809');
SELECT throws_ok($$SELECT billing.audit_table(NULL)$$, '22004', NULL, 'a NULL table: 22004');
SELECT throws_ok($$SELECT billing.unaudit_table(NULL)$$, '22004', NULL, 'unaudit_table(NULL): 22004');
SELECT throws_ok($$SELECT billing.unaudit_table('at_leads')$$, '42704', NULL,
                 'unaudit_table of a table that is not audited: 42704');
SELECT throws_ok($$SELECT billing.unaudit_table('at_no_such_table')$$, '42P01', NULL,
                 'unaudit_table of an unknown table: 42P01');
SELECT lives_ok($$SELECT billing.audit_table('at_parted_b', 'account_id')$$,
                'a partitioned partition can be audited on its own');
SELECT throws_ok($$SELECT billing.audit_table('at_parted', 'account_id')$$, '42710', NULL,
                 'not the partitioned table above an audited partition: 42710');
SELECT throws_ok($$SELECT billing.audit_table('at_parted_b1', 'account_id')$$, '42710', NULL,
                 'nor a partition below it: 42710');
SELECT lives_ok($$SELECT billing.unaudit_table('at_parted_b')$$, 'unaudit_table of the partition');
SELECT lives_ok($$SELECT billing.audit_table('at_parted', 'account_id')$$, 'then the whole tree');
SELECT throws_ok($$SELECT billing.audit_table('at_parted_a', 'account_id')$$, '42710', NULL,
                 'a partition of an audited table: 42710');
SELECT throws_ok($$TRUNCATE at_contracts$$, '55000', NULL, 'TRUNCATE of an audited table: 55000');
SELECT throws_ok($$TRUNCATE at_parted$$, '55000', NULL, 'TRUNCATE of an audited partitioned table: 55000');
SELECT throws_ok($$TRUNCATE at_parted_b1$$, '55000', NULL, 'TRUNCATE of one of its partitions: 55000');
SELECT throws_ok($$ALTER TABLE at_contracts DISABLE TRIGGER billing_audit$$, '55000', NULL,
                 'disabling the audit trigger: 55000');
SELECT throws_ok($$ALTER TABLE at_contracts DISABLE TRIGGER USER$$, '55000', NULL,
                 'disabling every user trigger: 55000');
SELECT throws_ok($$ALTER TABLE at_parted_b1 DISABLE TRIGGER ALL$$, '55000', NULL,
                 'disabling the triggers of a partition: 55000');
SELECT throws_ok($$ALTER TABLE at_contracts ENABLE REPLICA TRIGGER billing_audit$$, '55000', NULL,
                 'a trigger that fires only in replica mode: 55000');
SELECT throws_ok($$ALTER TABLE at_contracts DROP COLUMN account_id$$, '55000', NULL,
                 'dropping the account column: 55000');
SELECT throws_ok($$ALTER TABLE at_contracts RENAME COLUMN account_id TO acct$$, '55000', NULL,
                 'renaming the account column: 55000');
SELECT throws_ok($$ALTER TABLE at_contracts ALTER COLUMN account_id TYPE numeric$$, '55000', NULL,
                 'making the account column a numeric: 55000');
SELECT lives_ok($$ALTER TABLE at_contracts ALTER COLUMN account_id TYPE integer$$,
                'an account column retyped to another integer type is fine');
SELECT is((SELECT count(*) FROM pg_trigger g
            WHERE g.tgrelid IN (SELECT c.oid FROM pg_class c WHERE c.relnamespace = 'billing'::regnamespace)
              AND g.tgfoid = 'billing._audit_statement()'::regprocedure), 8::bigint,
          'an ALTER TABLE of an audited table leaves the statement triggers of the extension''s own tables alone');
SELECT throws_ok($$INSERT INTO at_contracts VALUES (1, -5, 1, NULL)$$, '23514', NULL,
                 'a negative account: 23514, nothing written');
SELECT throws_ok($$UPDATE billing.audit_log SET actor = 'x' WHERE account_id = 0$$, '55000', NULL,
                 'an audit row cannot be updated: 55000');
SELECT throws_ok($$DELETE FROM billing.audit_log WHERE account_id = 0$$, '55000', NULL,
                 'nor deleted: 55000');
SET ROLE billing_reader;
SELECT throws_ok($$SELECT billing._audit_append(7001, 'insert', 'forged', '{}')$$, '42501', NULL,
                 'a reader cannot append through the internal function: 42501');
SELECT throws_ok($$SELECT billing._audit_append_many(ARRAY[7001::bigint], ARRAY[1::bigint], 'insert', ARRAY['forged'], ARRAY['{}'::jsonb])$$,
                 '42501', NULL, 'nor through the batch one: 42501');
RESET ROLE;
SET ROLE at_app;
SELECT throws_ok($$SELECT billing.audit_table('at_nokey')$$, '42501', NULL,
                 'a role without billing_admin cannot audit a table: 42501');
RESET ROLE;

-- one row per change, in its account's chain, by the role of the client ------------------------
SET ROLE at_app;
INSERT INTO at_contracts VALUES (1, 7001, 100.00, '2025-01-01 10:00:00+02'),
                                (2, 7001, 200.00, NULL), (3, 7002, 300.00, NULL);
UPDATE at_contracts SET amount = 150.00 WHERE contract_id = 1;
UPDATE at_contracts SET amount = amount WHERE contract_id = 2;           -- changes nothing
UPDATE at_contracts SET account_id = 7002 WHERE contract_id = 2;         -- moves to 7002
DELETE FROM at_contracts WHERE contract_id = 3;
RESET ROLE;
SELECT results_eq(
    $$SELECT account_id, seq, action, object, details -> 'key' FROM billing.audit_log
       WHERE object = 'public.at_contracts' ORDER BY account_id, seq$$,
    $$VALUES (7001::bigint, 1::bigint, 'insert', 'public.at_contracts', '{"contract_id": 1}'::jsonb),
             (7001, 2, 'insert', 'public.at_contracts', '{"contract_id": 2}'),
             (7001, 3, 'update', 'public.at_contracts', '{"contract_id": 1}'),
             (7001, 4, 'update', 'public.at_contracts', '{"contract_id": 2}'),
             (7002, 1, 'insert', 'public.at_contracts', '{"contract_id": 3}'),
             (7002, 2, 'update', 'public.at_contracts', '{"contract_id": 2}'),
             (7002, 3, 'delete', 'public.at_contracts', '{"contract_id": 3}')$$,
    'one row per change, in the chain of the row''s account (both chains when it moves), gap-free');
SELECT is((SELECT count(*) FROM billing.audit_log WHERE object = 'public.at_contracts' AND actor <> 'at_app'),
          0::bigint, 'the actor is the role that made the change');
SELECT is((SELECT details FROM billing.audit_log WHERE account_id = 7001 AND seq = 3),
          '{"key": {"contract_id": 1},
            "new": {"amount": 150.00, "signed_at": "2025-01-01T08:00:00+00:00", "account_id": 7001, "contract_id": 1},
            "old": {"amount": 100.00, "signed_at": "2025-01-01T08:00:00+00:00", "account_id": 7001, "contract_id": 1}}'::jsonb,
          'an update row holds the key, the old and the new row, times in UTC');
SELECT ok((SELECT details ? 'new' AND NOT details ? 'old' FROM billing.audit_log WHERE account_id = 7001 AND seq = 1),
          'an insert row holds the new row only');
SELECT ok((SELECT details ? 'old' AND NOT details ? 'new' FROM billing.audit_log WHERE account_id = 7002 AND seq = 3),
          'a delete row holds the old row only');
SELECT is((SELECT seq FROM billing.audit_heads WHERE account_id = 7001), 4::bigint,
          'the chain head follows the last row, within the transaction');
SELECT is_empty('SELECT * FROM billing.verify_audit_log()', 'verify_audit_log: nothing to report');

-- chain 0: a table without account column, and without primary key -------------------------------
SELECT billing.audit_table('at_nokey');
INSERT INTO at_nokey VALUES (7001, 'a'), (NULL, 'b');
SELECT results_eq(
    $$SELECT a.seq - m.seq0, a.action, a.object, a.details FROM billing.audit_log a, at_mark m
       WHERE a.account_id = 0 AND a.seq > m.seq0 ORDER BY a.seq$$,
    $$VALUES (1::bigint, 'insert', 'audited_table:public.at_contracts',
              '{"new": {"tbl": "public.at_contracts", "account_column": "account_id"}}'::jsonb),
             (2, 'insert', 'audited_table:public.at_parted_b',
              '{"new": {"tbl": "public.at_parted_b", "account_column": "account_id"}}'),
             (3, 'delete', 'audited_table:public.at_parted_b', '{"old": {"tbl": "public.at_parted_b"}}'),
             (4, 'insert', 'audited_table:public.at_parted',
              '{"new": {"tbl": "public.at_parted", "account_column": "account_id"}}'),
             (5, 'insert', 'audited_table:public.at_nokey',
              '{"new": {"tbl": "public.at_nokey", "account_column": null}}'),
             (6, 'insert', 'public.at_nokey', '{"new": {"note": "a", "account_id": 7001}}'),
             (7, 'insert', 'public.at_nokey', '{"new": {"note": "b", "account_id": null}}')$$,
    'chain 0: audit_table calls, then the rows of a table audited without account column, no "key" without a primary key');
SELECT results_eq(
    $$SELECT tbl::text, account_column::text COLLATE "default" FROM billing.audited_tables WHERE tbl::text LIKE 'at\_%' ORDER BY 1$$,
    $$VALUES ('at_contracts', 'account_id'), ('at_nokey', NULL), ('at_parted', 'account_id')$$,
    'audited_tables lists the audited tables and their account columns');

-- partitions: clones of the row trigger, the statement triggers on each, also later ones ----------
CREATE TABLE at_parted_c PARTITION OF at_parted FOR VALUES FROM (8000) TO (9000);
CREATE TABLE at_parted_d (LIKE at_parted);
ALTER TABLE at_parted ATTACH PARTITION at_parted_d FOR VALUES FROM (9000) TO (10000);
SELECT results_eq(
    $$SELECT c.relname::text COLLATE "default", count(*) FILTER (WHERE g.tgname = 'billing_audit'),
             count(*) FILTER (WHERE g.tgname = 'billing_audit_flush'),
             count(*) FILTER (WHERE g.tgname = 'billing_audit_truncate')
        FROM pg_partition_tree('at_parted') p JOIN pg_class c ON c.oid = p.relid
             LEFT JOIN pg_trigger g ON g.tgrelid = p.relid
       GROUP BY 1 ORDER BY 1$$,
    $$VALUES ('at_parted', 1::bigint, 1::bigint, 1::bigint), ('at_parted_a', 1, 1, 1), ('at_parted_b', 1, 1, 1),
             ('at_parted_b1', 1, 1, 1), ('at_parted_c', 1, 1, 1), ('at_parted_d', 1, 1, 1)$$,
    'every partition, created before or after, created or attached, carries the audit triggers');
INSERT INTO at_parted VALUES (7201, 1, 'a'), (7350, 1, 'b'), (8500, 1, 'c'), (9500, 1, 'd');
INSERT INTO at_parted_b1 VALUES (7350, 2, 'direct');
UPDATE at_parted SET v = v || '!' WHERE id = 1;
SELECT results_eq(
    $$SELECT account_id, count(*), min(object), max(object) FROM billing.audit_log
       WHERE account_id IN (7350, 8500, 9500) GROUP BY 1 ORDER BY 1$$,
    $$VALUES (7350::bigint, 3::bigint, 'public.at_parted', 'public.at_parted'),
             (8500, 2, 'public.at_parted', 'public.at_parted'), (9500, 2, 'public.at_parted', 'public.at_parted')$$,
    'rows of every partition, also written into a partition directly, name the audited table');
SELECT is_empty('SELECT * FROM billing.verify_audit_log()',
                'the heads moved by a statement on a partition are written by its statement trigger');
ALTER TABLE at_parted DETACH PARTITION at_parted_d;
SELECT is((SELECT count(*) FROM pg_trigger WHERE tgrelid = 'at_parted_d'::regclass), 0::bigint,
          'a detached partition keeps no audit trigger');
SELECT lives_ok($$TRUNCATE at_parted_d$$, 'and can be truncated');
SELECT lives_ok($$SELECT billing.unaudit_table('at_parted')$$, 'unaudit_table of the partitioned table');
SELECT is((SELECT count(*) FROM pg_trigger t JOIN pg_partition_tree('at_parted') p ON p.relid = t.tgrelid
            WHERE t.tgname LIKE 'billing\_audit%'), 0::bigint,
          'unaudit_table removes the triggers of every partition');
INSERT INTO at_parted VALUES (7001, 99, 'not audited');
SELECT is((SELECT count(*) FROM billing.audit_log WHERE details -> 'key' @> '{"id": 99}'), 0::bigint,
          'changes after unaudit_table are not logged');

-- in the same transaction as the change ------------------------------------------------------------
SAVEPOINT s1;
INSERT INTO at_contracts VALUES (10, 7001, 1, NULL);
ROLLBACK TO SAVEPOINT s1;
SELECT is((SELECT count(*) FROM billing.audit_log WHERE details -> 'key' @> '{"contract_id": 10}'), 0::bigint,
          'a change rolled back to a savepoint leaves no audit row');
SELECT is((SELECT seq FROM billing.audit_heads WHERE account_id = 7001), 4::bigint,
          'and its chain head is back where it was');
-- rows of an enclosing level wait in the buffer while an inner subtransaction
-- appends to the same chain and fails: one statement whose row trigger (after
-- the audit trigger: triggers fire in name order) runs an exception block
CREATE TABLE at_side (account_id bigint, n int);
SELECT billing.audit_table('at_side', 'account_id');
CREATE FUNCTION at_side_effect() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        INSERT INTO at_side VALUES (NEW.account_id, NEW.contract_id);
        IF NEW.contract_id % 2 = 0 THEN
            RAISE EXCEPTION 'no even contracts on the side';
        END IF;
    EXCEPTION WHEN raise_exception THEN
        NULL;
    END;
    RETURN NULL;
END
$$;
CREATE TRIGGER zz_side_effect AFTER INSERT ON at_contracts FOR EACH ROW EXECUTE FUNCTION at_side_effect();
INSERT INTO at_contracts SELECT g, 7001, g, NULL FROM generate_series(11, 16) g;
DROP TRIGGER zz_side_effect ON at_contracts;
SELECT results_eq(
    $$SELECT seq, object, coalesce(details -> 'key' ->> 'contract_id', details -> 'new' ->> 'n')
        FROM billing.audit_log WHERE account_id = 7001 AND seq > 4 ORDER BY seq$$,
    $$VALUES (5::bigint, 'public.at_contracts', '11'), (6, 'public.at_side', '11'),
             (7, 'public.at_contracts', '12'), (8, 'public.at_contracts', '13'),
             (9, 'public.at_side', '13'), (10, 'public.at_contracts', '14'),
             (11, 'public.at_contracts', '15'), (12, 'public.at_side', '15'),
             (13, 'public.at_contracts', '16')$$,
    'rows of failed subtransactions are gone, the others chained in order without gaps');
SELECT is_empty('SELECT * FROM billing.verify_audit_log()', 'and the chain verifies');

-- one chain, the extension's own rows and a user table's, in one statement -------------------------
INSERT INTO billing.accounts (account_id, name) VALUES (7001, 'one');
WITH c AS (INSERT INTO at_contracts VALUES (20, 7001, 20, NULL), (21, 7001, 21, NULL) RETURNING account_id)
UPDATE billing.accounts a SET name = 'renamed' FROM (SELECT DISTINCT account_id FROM c) c
 WHERE a.account_id = c.account_id;
SELECT results_eq(
    $$SELECT object FROM billing.audit_log WHERE account_id = 7001 AND seq > 13 ORDER BY seq$$,
    $$VALUES ('account:7001'), ('public.at_contracts'), ('public.at_contracts'), ('account:7001')$$,
    'the extension''s own audit rows and a user table''s share one chain, in order');
SELECT is_empty('SELECT * FROM billing.verify_audit_log()', 'and it verifies');

-- a statement larger than work_mem writes its rows as it goes --------------------------------------
SET LOCAL work_mem = '64kB';
INSERT INTO at_contracts SELECT g, 7100 + g % 7, g, now() FROM generate_series(1000, 3999) g;
RESET work_mem;
SELECT is((SELECT count(*) FROM billing.audit_log WHERE account_id BETWEEN 7100 AND 7106), 3000::bigint,
          '3000 rows audited past work_mem');
SELECT is((SELECT count(DISTINCT account_id) FROM billing.audit_log WHERE account_id BETWEEN 7100 AND 7106),
          7::bigint, 'in their 7 chains');
SELECT is_empty('SELECT * FROM billing.verify_audit_log()', 'every chain verifies');

-- row images: to_jsonb of the row, rendered in UTC, whatever the session's settings -------------
CREATE TYPE at_mood AS ENUM ('sad', 'ok');
CREATE DOMAIN at_posint AS int CHECK (VALUE > 0);
CREATE TABLE at_types (id int PRIMARY KEY, i2 int2, i8 int8, n numeric, n2 numeric(10, 3), b bool,
                       t text, vc varchar(5), bc char(4), d date, ts timestamp, tstz timestamptz,
                       f8 float8, iv interval, arr int[], tsarr timestamptz[], j json, jb jsonb,
                       u uuid, m at_mood, di at_posint, r tstzrange, "odd name" text);
SELECT billing.audit_table('at_types');
SET LOCAL TimeZone = 'Pacific/Chatham';
SET LOCAL DateStyle = 'SQL, DMY';
SET LOCAL IntervalStyle = 'iso_8601';
INSERT INTO at_types VALUES
    (1, -3, 9223372036854775807, 'NaN', 1.5, true, E'he"llo\n\\', 'ab', 'x', '2025-02-03',
     '2025-02-03 04:05:06.789', '2025-02-03 04:05:06+02', 0.1, '1 day 2 hours', '{1,2,NULL}',
     '{"2025-01-01 00:00+00"}', '{"a": [1, 2.50]}', '{"b": {"c": null}}',
     'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'ok', 7, '[2025-01-01 00:00+00, 2025-02-01 00:00+00)', 'é'),
    (2, NULL, NULL, 'Infinity', -0.000, false, '', NULL, NULL, 'infinity', '-infinity', 'infinity',
     '-Infinity', NULL, '{}', NULL, 'null', '1', NULL, NULL, NULL, 'empty', NULL),
    (3, 0, -1, '-Infinity', 1234567.123, NULL, repeat('é', 3), 'abcde', 'ab  ', '0001-01-01 BC',
     '2000-01-01', '1999-12-31 23:59:59.999999-08', 1e308, '-3 mons', '{{1,2},{3,4}}', '{NULL}',
     '[]', '"s"', NULL, 'sad', 1, NULL, NULL);
SET LOCAL TimeZone = 'UTC';
SET LOCAL DateStyle = 'ISO, YMD';
SET LOCAL IntervalStyle = 'postgres';
SELECT is((SELECT count(*) FROM billing.audit_log a JOIN at_types x ON x.id = (a.details -> 'key' ->> 'id')::int
            WHERE a.object = 'public.at_types' AND (a.details -> 'new')::text = to_jsonb(x)::text),
          3::bigint, 'the new row is to_jsonb of the row (in UTC), byte for byte, for every type');
ALTER TABLE at_types ADD COLUMN added_later text DEFAULT 'here';
UPDATE at_types SET b = NOT b WHERE id = 1;
SELECT is((SELECT details -> 'new' ->> 'added_later' FROM billing.audit_log
            WHERE object = 'public.at_types' AND action = 'update'), 'here',
          'a column added later appears in later rows');

-- the session's settings and code get no rights of the owner ---------------------------------------
CREATE SCHEMA at_evil;
CREATE TABLE at_evil.audit_log (LIKE billing.audit_log);
CREATE TABLE at_evil.audit_heads (LIKE billing.audit_heads);
CREATE TABLE at_evil.ran (who text);
GRANT ALL ON SCHEMA at_evil TO PUBLIC;
GRANT ALL ON ALL TABLES IN SCHEMA at_evil TO PUBLIC;
CREATE FUNCTION at_evil.unnest(anyarray) RETURNS SETOF anyelement LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO at_evil.ran VALUES (current_user);
    RETURN QUERY SELECT * FROM pg_catalog.unnest($1);
END
$$;
CREATE FUNCTION at_evil.to_jsonb(anyelement) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO at_evil.ran VALUES (current_user);
    RETURN '{}';
END
$$;
SET ROLE at_app;
SET LOCAL search_path = at_evil, pg_catalog, public;
SET LOCAL application_name = 'citus_internal gpid=10000000001';
INSERT INTO public.at_contracts VALUES (30, 7003, 30, NULL);
UPDATE public.at_contracts SET amount = 31 WHERE contract_id = 30;
RESET ROLE;
RESET search_path;
RESET application_name;
SELECT is((SELECT count(*) FROM billing.audit_log WHERE account_id = 7003), 2::bigint,
          'a hostile search_path and a Citus-like application_name skip nothing');
SELECT is((SELECT count(*) FROM at_evil.audit_log) + (SELECT count(*) FROM at_evil.audit_heads)
          + (SELECT count(*) FROM at_evil.ran), 0::bigint,
          'the session''s tables and functions of the same names are never used');
SELECT is((SELECT seq FROM billing.audit_heads WHERE account_id = 7003), 2::bigint,
          'the head of the new chain was created and moved');
-- the actor of a change made inside a SECURITY DEFINER function of the user
CREATE FUNCTION at_secdef() RETURNS void LANGUAGE sql SECURITY DEFINER AS $$
    INSERT INTO public.at_contracts VALUES (31, 7003, 1, NULL)
$$;
GRANT EXECUTE ON FUNCTION at_secdef() TO at_app;
SET ROLE at_app;
SELECT at_secdef();
RESET ROLE;
SELECT is((SELECT actor FROM billing.audit_log WHERE account_id = 7003 AND seq = 3), 'at_app',
          'inside a SECURITY DEFINER function the actor is still the client''s role');
-- a read-only transaction cannot append (an audited temp table could be written)
CREATE TEMP TABLE at_tmp (account_id int);
SELECT billing.audit_table('at_tmp', 'account_id');
SAVEPOINT ro;
SET TRANSACTION READ ONLY;
SELECT throws_ok($$INSERT INTO at_tmp VALUES (7004)$$, '25006', NULL,
                 'a change of an audited temp table in a read-only transaction: 25006');
ROLLBACK TO SAVEPOINT ro;

-- tampering with user-table rows, by a superuser behind the triggers ------------------------------
SELECT is_empty('SELECT * FROM billing.verify_audit_log()', 'intact before tampering');
ALTER TABLE billing.audit_log DISABLE TRIGGER audit_log_append_only;
UPDATE billing.audit_log SET details = jsonb_set(details, '{new,amount}', '1000.00')
 WHERE account_id = 7001 AND seq = 1;
SELECT results_eq('SELECT account_id, seq, problem FROM billing.verify_audit_log()',
    $$VALUES (7001::bigint, 1::bigint, 'hash does not match the row: the row was altered')$$,
    'a contract''s amount changed in its audit row');
UPDATE billing.audit_log SET details = jsonb_set(details, '{new,amount}', '100.00')
 WHERE account_id = 7001 AND seq = 1;
UPDATE billing.audit_log SET actor = 'someone else' WHERE account_id = 7002 AND seq = 2;
SELECT results_eq('SELECT account_id, seq, problem FROM billing.verify_audit_log()',
    $$VALUES (7002::bigint, 2::bigint, 'hash does not match the row: the row was altered')$$,
    'the actor of a user-table row changed');
UPDATE billing.audit_log SET actor = 'at_app' WHERE account_id = 7002 AND seq = 2;
CREATE TEMP TABLE at_saved AS SELECT * FROM billing.audit_log WHERE account_id = 7002 AND seq = 2;
DELETE FROM billing.audit_log WHERE account_id = 7002 AND seq = 2;
SELECT results_eq('SELECT account_id, seq, problem FROM billing.verify_audit_log()',
    $$VALUES (7002::bigint, 3::bigint, 'seq 3 follows 1: rows were removed or inserted')$$,
    'a user-table row removed from the middle of a chain');
INSERT INTO billing.audit_log SELECT * FROM at_saved;
DELETE FROM billing.audit_log WHERE account_id = 7002 AND seq = 3;
SELECT results_eq('SELECT account_id, seq, problem FROM billing.verify_audit_log()',
    $$VALUES (7002::bigint, 2::bigint, 'last row is seq 2 but the chain head is at seq 3')$$,
    'the last row of a chain removed');
INSERT INTO billing.audit_log
SELECT 7002, 3, at, actor, 'delete', object, '{"key": {"contract_id": 3}}', prev_hash, hash
  FROM at_saved;
SELECT results_eq('SELECT account_id, seq, problem FROM billing.verify_audit_log()',
    $$VALUES (7002::bigint, 3::bigint, 'last row''s hash is not the chain head''s hash'),
             (7002, 3, 'prev_hash is not the hash of the previous row')$$,
    'a forged last row, even with a copied hash');
ALTER TABLE billing.audit_log ENABLE TRIGGER audit_log_append_only;

-- a session's extra_float_digits does not round the row images: two floats
-- rendered alike would make an UPDATE look like no change
CREATE TABLE at_meas (id int PRIMARY KEY, account_id bigint, price float8);
SELECT billing.audit_table('at_meas', 'account_id');
INSERT INTO at_meas VALUES (1, 7003, 123.456);
SET LOCAL extra_float_digits = -15;
UPDATE at_meas SET price = 149.99 WHERE id = 1;
INSERT INTO at_meas VALUES (2, 7003, 987.654321);
RESET extra_float_digits;
SELECT is((SELECT array_agg(action || ' ' || coalesce(details -> 'new' ->> 'price', '-') ORDER BY seq)
             FROM billing.audit_log WHERE account_id = 7003 AND object = 'public.at_meas'),
          ARRAY['insert 123.456', 'update 149.99', 'insert 987.654321'],
          'with extra_float_digits = -15 the update is logged and each float exactly');

-- a partition created by CREATE SCHEMA ... CREATE TABLE gets the statement
-- triggers too: its TRUNCATE is refused
CREATE TABLE at_pc (account_id bigint NOT NULL, n int) PARTITION BY RANGE (account_id);
CREATE TABLE at_pc1 PARTITION OF at_pc FOR VALUES FROM (0) TO (100);
SELECT billing.audit_table('at_pc', 'account_id');
CREATE SCHEMA at_s2 CREATE TABLE pc2 PARTITION OF public.at_pc FOR VALUES FROM (100) TO (200);
SELECT throws_ok($$TRUNCATE at_s2.pc2$$, '55000', NULL,
                 'TRUNCATE of a partition made by CREATE SCHEMA ... CREATE TABLE: 55000');

SELECT * FROM finish();
ROLLBACK;
