-- audit: billing.audit_log as SPEC section 7 pins it; a row for every
-- audited change, in the right chain, gap-free and hash-chained; the
-- canonical encoding is the documented one; the log is append-only; and
-- verify_audit_log() finds rows altered, removed or inserted even by a
-- superuser with the triggers disabled.
BEGIN;
SELECT plan(80);

-- the table as pinned ----------------------------------------------------------------
SELECT has_table('billing', 'audit_log', 'audit_log exists');
SELECT columns_are('billing', 'audit_log',
    ARRAY['account_id', 'seq', 'at', 'actor', 'action', 'object', 'details', 'prev_hash', 'hash'],
    'audit_log has the pinned columns');
SELECT col_type_is('billing', 'audit_log', 'account_id', 'bigint', 'account_id bigint');
SELECT col_type_is('billing', 'audit_log', 'seq', 'bigint', 'seq bigint');
SELECT col_type_is('billing', 'audit_log', 'at', 'timestamp with time zone', 'at timestamptz');
SELECT col_type_is('billing', 'audit_log', 'actor', 'text', 'actor text');
SELECT col_type_is('billing', 'audit_log', 'action', 'text', 'action text');
SELECT col_type_is('billing', 'audit_log', 'object', 'text', 'object text');
SELECT col_type_is('billing', 'audit_log', 'details', 'jsonb', 'details jsonb');
SELECT col_type_is('billing', 'audit_log', 'prev_hash', 'bytea', 'prev_hash bytea');
SELECT col_type_is('billing', 'audit_log', 'hash', 'bytea', 'hash bytea');
SELECT col_is_pk('billing', 'audit_log', ARRAY['account_id', 'seq'], 'primary key (account_id, seq)');
SELECT has_function('billing', 'verify_audit_log', ARRAY[]::text[], 'verify_audit_log()');
SELECT is(pg_get_function_result('billing.verify_audit_log()'::regprocedure),
          'TABLE(account_id bigint, seq bigint, problem text)', 'verify_audit_log result columns');

-- a realistic history: catalog, accounts, usage, invoices, a correction, a rerate ---
CREATE ROLE audit_test_admin NOLOGIN IN ROLE billing_admin;
CREATE ROLE audit_test_writer NOLOGIN IN ROLE billing_writer;
-- fixed dates (the meter accepts reports 100 years late), so that the
-- invoices finalized do not depend on the time of day, and UTC days
SET LOCAL timezone = 'UTC';
SELECT timestamptz '2025-06-09 00:00+00' AS d0 \gset
CREATE TEMP TABLE t0 AS SELECT :'d0'::timestamptz AS d0;
GRANT SELECT ON t0 TO PUBLIC;

SET ROLE audit_test_admin;
INSERT INTO billing.meters (meter, late_window) VALUES ('au_events', '100 years'), ('au_spare', '100 years');
INSERT INTO billing.accounts (account_id, name) VALUES (7101, 'one'), (7102, 'two');
INSERT INTO billing.plans (plan, period) VALUES ('au_daily', '1 day');
INSERT INTO billing.charges (plan, meter, price) VALUES ('au_daily', 'au_events', 'unit 0.5');
INSERT INTO billing.charges (plan, meter, price, description) VALUES ('au_daily', NULL, 'flat 1', 'base');
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
    VALUES (7101, 'au_daily', :'d0'), (7102, 'au_daily', :'d0');
UPDATE billing.accounts SET name = 'one, renamed' WHERE account_id = 7101;
UPDATE billing.accounts SET name = name WHERE account_id = 7102;   -- changes nothing
DELETE FROM billing.meters WHERE meter = 'au_spare';
RESET ROLE;

SET ROLE audit_test_writer;
SELECT billing.record(7101, 'au_events', 4, :'d0'::timestamptz + interval '1 day 1 hour');
SELECT billing.record(7102, 'au_events', 2, :'d0'::timestamptz + interval '1 day 2 hours');
RESET ROLE;

SET ROLE audit_test_admin;
SELECT count(*) AS invoices FROM billing.finalize_invoices(:'d0'::timestamptz + interval '3 days 1 hour') \gset
SELECT billing.correct_usage(7101, 'au_events', :'d0'::timestamptz + interval '1 day 1 hour', 6,
                             'late batch found in the warehouse');
SELECT count(*) AS adjusted FROM billing.rerate(:'d0', :'d0'::timestamptz + interval '3 days') \gset
SELECT count(*) FROM billing.rerate(:'d0', :'d0'::timestamptz + interval '3 days', dry_run => true);
RESET ROLE;

SELECT is(:invoices::bigint, 6::bigint, 'six daily invoices finalized (3 days x 2 accounts)');
SELECT is(:adjusted::bigint, 1::bigint, 'the correction re-rated into one adjustment');

-- one row per change, each in its chain ---------------------------------------------------
CREATE TEMP TABLE log AS
    SELECT a.* FROM billing.audit_log a
     WHERE a.account_id IN (7101, 7102)
        OR (a.account_id = 0 AND a.at >= now());   -- this transaction's catalog rows
SELECT results_eq(
    $$SELECT action, object FROM log WHERE account_id = 0 ORDER BY seq$$,
    $$VALUES ('insert', 'meter:au_events'), ('insert', 'meter:au_spare'), ('insert', 'plan:au_daily'),
             ('insert', 'charge:' || (SELECT charge_id FROM billing.charges WHERE plan = 'au_daily' AND meter IS NOT NULL)),
             ('insert', 'charge:' || (SELECT charge_id FROM billing.charges WHERE plan = 'au_daily' AND meter IS NULL)),
             ('delete', 'meter:au_spare'), ('rerate', 'rerate')$$,
    'catalog chain 0: meters, plans, charges, and the rerate run (not the dry run)');
SELECT results_eq(
    $$SELECT action, regexp_replace(object, '^(invoice|usage_correction|adjustment):[0-9]+$', '\1:N') FROM log WHERE account_id = 7101 ORDER BY seq$$,
    $$VALUES ('insert', 'account:7101'),
             ('insert', 'subscription:7101/' || to_char((SELECT d0 FROM t0) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS+00:00')),
             ('update', 'account:7101'),
             ('finalize', 'invoice:N'), ('finalize', 'invoice:N'), ('finalize', 'invoice:N'),
             ('correct', 'usage_correction:N'), ('adjust', 'adjustment:N')$$,
    'account chain 7101: account, subscription, update, three invoices, the correction, the adjustment');
SELECT results_eq(
    $$SELECT action FROM log WHERE account_id = 7102 ORDER BY seq$$,
    $$VALUES ('insert'), ('insert'), ('finalize'), ('finalize'), ('finalize')$$,
    'account chain 7102: an UPDATE that changes nothing writes nothing');
SELECT is((SELECT count(*) FROM log WHERE account_id IN (7101, 7102)
                 AND seq <> (SELECT count(*) FROM log l2 WHERE l2.account_id = log.account_id
                                                         AND l2.seq <= log.seq)),
          0::bigint, 'seq is gap-free from 1 in each account chain');
SELECT is((SELECT count(*) FROM log WHERE actor <> 'audit_test_admin'), 0::bigint,
          'actor is the role the client acts as, also inside SECURITY DEFINER functions (finalize, rerate)');
SELECT is((SELECT count(*) FROM log l JOIN log p ON p.account_id = l.account_id AND p.seq = l.seq - 1
            WHERE l.prev_hash IS DISTINCT FROM p.hash), 0::bigint, 'prev_hash is the previous row''s hash');
SELECT ok((SELECT bool_and(at >= now() AND at <= clock_timestamp()) FROM log),
          'at is the clock time of the change');
SELECT ok((SELECT bool_and(l.at >= p.at) FROM log l JOIN log p ON p.account_id = l.account_id AND p.seq = l.seq - 1),
          'at never goes back within a chain');
SELECT is((SELECT details -> 'new' ->> 'name' FROM log WHERE account_id = 7101 AND action = 'update'),
          'one, renamed', 'an update row holds the new image');
SELECT is((SELECT details -> 'old' ->> 'name' FROM log WHERE account_id = 7101 AND action = 'update'),
          'one', 'and the old image');
SELECT is((SELECT details -> 'old' ->> 'meter' FROM log WHERE object = 'meter:au_spare' AND action = 'delete'),
          'au_spare', 'a delete row holds the old image');
SELECT is((SELECT (details ->> 'adjustments')::int FROM log WHERE action = 'rerate'), 1,
          'the rerate row counts the adjustments it wrote');
SELECT is((SELECT details ->> 'reason' FROM log WHERE action = 'rerate'), 're-rate',
          'the rerate row holds its reason');
SELECT is((SELECT details ->> 'from_ts' FROM log WHERE action = 'rerate'),
          to_char(:'d0'::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS+00:00'),
          'the rerate row holds its range, in UTC');
SELECT is((SELECT jsonb_array_length(details -> 'lines') FROM log
            WHERE account_id = 7101 AND action = 'finalize' ORDER BY seq LIMIT 1
            OFFSET 1), 2, 'an invoice row holds the invoice''s lines');
SELECT is((SELECT (details -> 'invoice' ->> 'total')::numeric FROM log
            WHERE account_id = 7101 AND action = 'finalize' ORDER BY seq LIMIT 1 OFFSET 1),
          3.00, 'and its total (1 fixed + 4 x 0.5)');
SELECT is((SELECT details ->> 'reason' FROM log WHERE action = 'correct'),
          'late batch found in the warehouse', 'a correction row holds its reason');
SELECT is((SELECT (details ->> 'delta')::numeric FROM log WHERE action = 'adjust'), 3::numeric,
          'an adjustment row holds its delta (6 x 0.5)');
SELECT is((SELECT seq FROM billing.audit_heads WHERE account_id = 7101),
          (SELECT max(seq) FROM log WHERE account_id = 7101), 'the chain head is the last row');
SELECT is_empty('SELECT * FROM billing.verify_audit_log()', 'verify_audit_log: nothing when intact');

-- the canonical encoding is the documented one --------------------------------------------
CREATE FUNCTION pg_temp.field(s text) RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
    SELECT int4send(octet_length(convert_to(s, 'UTF8'))) || convert_to(s, 'UTF8')
$$;
CREATE FUNCTION pg_temp.encoding(a billing.audit_log) RETURNS bytea LANGUAGE sql STABLE AS $$
    SELECT pg_temp.field('billing.audit_log/1') || pg_temp.field(a.account_id::text)
        || pg_temp.field(a.seq::text)
        || pg_temp.field(to_char(a.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
        || pg_temp.field(a.actor) || pg_temp.field(a.action) || pg_temp.field(a.object)
        || pg_temp.field(a.details::text)
$$;
SELECT is((SELECT count(*) FROM billing.audit_log a
            WHERE billing._audit_encode(a.account_id, a.seq, a.at, a.actor, a.action, a.object, a.details)
                  IS DISTINCT FROM pg_temp.encoding(a)), 0::bigint,
          'the encoding is field(tag) field(account_id) field(seq) field(at UTC) field(actor) field(action) field(object) field(details), field = 4-byte big-endian length + UTF-8');
SELECT is((SELECT count(*) FROM billing.audit_log a
            WHERE a.hash IS DISTINCT FROM sha256(coalesce(a.prev_hash, '') || pg_temp.encoding(a))),
          0::bigint, 'hash = sha256(prev_hash || encoding), no prev_hash on a chain''s first row');
SELECT is((SELECT count(*) FROM billing.audit_log WHERE (seq = 1) <> (prev_hash IS NULL)), 0::bigint,
          'only the first row of a chain has no prev_hash');
SET LOCAL TimeZone = 'America/New_York';
SET LOCAL DateStyle = 'German';
SELECT is((SELECT count(*) FROM billing.audit_log a
            WHERE billing._audit_encode(a.account_id, a.seq, a.at, a.actor, a.action, a.object, a.details)
                  IS DISTINCT FROM pg_temp.encoding(a)), 0::bigint,
          'the encoding does not depend on TimeZone or DateStyle');
SELECT is_empty('SELECT * FROM billing.verify_audit_log()', 'nor does verification');
SET LOCAL TimeZone = 'UTC';
RESET DateStyle;
SELECT is(encode(billing._audit_encode(1, 2, '2024-01-02 03:04:05.678901+00', 'ünï', 'a', 'o', '{"b": 1, "a": [true]}'), 'hex'),
          '0000001362696c6c696e672e61756469745f6c6f672f31' || '0000000131' || '0000000132'
          || '0000001b323032342d30312d30325430333a30343a30352e3637383930315a'
          || '00000005c3bc6ec3af' || '0000000161' || '000000016f'
          || '000000157b2261223a205b747275655d2c202262223a20317d',
          'a worked example of the encoding, byte by byte');
SELECT throws_ok($$SELECT billing._audit_encode(1, 1, 'infinity', 'a', 'b', 'c', '{}')$$, '22008',
                 NULL, 'an infinite time cannot be encoded');
SELECT throws_ok($$SELECT billing._audit_hash(NULL, 1, 1, now(), NULL, 'b', 'c', '{}')$$, '22004',
                 NULL, 'no field of the encoding may be NULL');

-- append-only -------------------------------------------------------------------------
SELECT throws_ok($$UPDATE billing.audit_log SET actor = 'someone else' WHERE account_id = 7101$$,
                 '55000', NULL, 'UPDATE of audit_log raises 55000');
SELECT throws_ok($$DELETE FROM billing.audit_log WHERE account_id = 7101$$,
                 '55000', NULL, 'DELETE of audit_log raises 55000');
SELECT throws_ok($$TRUNCATE billing.audit_log$$, '55000', NULL, 'TRUNCATE of audit_log raises 55000');
SELECT throws_ok($$UPDATE billing.audit_heads SET seq = 1 WHERE account_id = 7101$$,
                 '55000', NULL, 'a chain head cannot be moved back');
SELECT throws_ok($$DELETE FROM billing.audit_heads WHERE account_id = 7101$$,
                 '55000', NULL, 'a chain head cannot be removed');
SELECT throws_ok($$UPDATE billing.adjustments SET delta = 0 WHERE account_id = 7101$$,
                 '55000', NULL, 'an adjustment cannot change');
SELECT throws_ok($$DELETE FROM billing.adjustments WHERE account_id = 7101$$,
                 '55000', NULL, 'an adjustment cannot be deleted');
SELECT throws_ok($$UPDATE billing.usage_corrections SET delta = 0 WHERE account_id = 7101$$,
                 '55000', NULL, 'a usage correction cannot change');
SELECT throws_ok($$DELETE FROM billing.usage_corrections WHERE account_id = 7101$$,
                 '55000', NULL, 'a usage correction cannot be deleted');
SELECT throws_ok($$UPDATE billing.invoices SET total = 0 WHERE account_id = 7101$$,
                 '55000', NULL, 'a finalized invoice cannot change');

-- tampering by a superuser with the triggers disabled is found ------------------------------
ALTER TABLE billing.audit_log DISABLE TRIGGER ALL;

SAVEPOINT t;
UPDATE billing.audit_log SET details = jsonb_set(details, '{new,name}', '"someone else"')
 WHERE account_id = 7101 AND seq = 3;
SELECT results_eq('SELECT account_id, seq, problem FROM billing.verify_audit_log()',
    $$VALUES (7101::bigint, 3::bigint, 'hash does not match the row: the row was altered')$$,
    'an altered details field is found at its row, and only there');
ROLLBACK TO SAVEPOINT t;

UPDATE billing.audit_log SET at = at + interval '1 microsecond' WHERE account_id = 7102 AND seq = 2;
SELECT results_eq('SELECT account_id, seq FROM billing.verify_audit_log()',
    $$VALUES (7102::bigint, 2::bigint)$$, 'a time moved by one microsecond is found');
ROLLBACK TO SAVEPOINT t;

UPDATE billing.audit_log SET actor = 'nobody', hash = billing._audit_hash(prev_hash, account_id, seq, at, 'nobody', action, object, details)
 WHERE account_id = 7101 AND seq = 2;
SELECT results_eq('SELECT account_id, seq, problem FROM billing.verify_audit_log()',
    $$VALUES (7101::bigint, 3::bigint, 'prev_hash is not the hash of the previous row')$$,
    'an altered row with a recomputed hash is found at the next row');
ROLLBACK TO SAVEPOINT t;

DELETE FROM billing.audit_log WHERE account_id = 7101 AND seq = 4;
SELECT results_eq('SELECT account_id, seq, problem FROM billing.verify_audit_log()',
    $$VALUES (7101::bigint, 5::bigint, 'seq 5 follows 3: rows were removed or inserted'),
             (7101::bigint, NULL::bigint, 'invoice ' || (SELECT min(invoice_id) FROM billing.invoices WHERE account_id = 7101) || ' has no audit row')$$,
    'a removed middle row is found (here an invoice''s, so that invoice has no audit row either)');
ROLLBACK TO SAVEPOINT t;

DELETE FROM billing.audit_log WHERE account_id = 7102 AND seq = 1;
SELECT results_eq('SELECT account_id, seq, problem FROM billing.verify_audit_log()',
    $$VALUES (7102::bigint, 2::bigint, 'seq 2 follows the start of the chain: rows were removed or inserted')$$,
    'a removed first row is found');
ROLLBACK TO SAVEPOINT t;

DELETE FROM billing.audit_log
 WHERE account_id = 7102 AND seq = (SELECT max(seq) FROM billing.audit_log WHERE account_id = 7102);
SELECT results_eq('SELECT account_id, seq, problem FROM billing.verify_audit_log()',
    $$VALUES (7102::bigint, 4::bigint, 'last row is seq 4 but the chain head is at seq 5'),
             (7102::bigint, NULL::bigint, 'invoice ' || (SELECT max(invoice_id) FROM billing.invoices WHERE account_id = 7102) || ' has no audit row')$$,
    'a removed last row is found against the chain head, and its invoice has no audit row');
ROLLBACK TO SAVEPOINT t;

-- (one timestamp for the row and its hash: the forger gets the hash right)
INSERT INTO billing.audit_log
SELECT 7102, 6, t.at, 'forger', 'insert', 'account:7102', '{}', h.hash,
       billing._audit_hash(h.hash, 7102, 6, t.at, 'forger', 'insert', 'account:7102', '{}')
  FROM billing.audit_heads h, (SELECT clock_timestamp() AS at) t WHERE h.account_id = 7102;
SELECT results_eq('SELECT account_id, seq FROM billing.verify_audit_log()',
    $$VALUES (7102::bigint, 6::bigint)$$,
    'a forged row appended with a correct hash is found against the chain head');
ROLLBACK TO SAVEPOINT t;

UPDATE billing.audit_log SET seq = seq + 1000 WHERE account_id = 7102 AND seq >= 3;
UPDATE billing.audit_log SET seq = seq - 999 WHERE account_id = 7102 AND seq > 1000;
INSERT INTO billing.audit_log
SELECT 7102, 3, at, actor, action, object, details, hash,
       billing._audit_hash(hash, 7102, 3, at, actor, action, object, details)
  FROM billing.audit_log WHERE account_id = 7102 AND seq = 2;
SELECT results_eq('SELECT account_id, seq FROM billing.verify_audit_log() LIMIT 1',
    $$VALUES (7102::bigint, 4::bigint)$$,
    'a forged row inserted in the middle is found at the row after it');
ROLLBACK TO SAVEPOINT t;

INSERT INTO billing.audit_log VALUES (7999, 1, now(), 'forger', 'insert', 'account:7999', '{}', NULL,
                                      billing._audit_hash(NULL, 7999, 1, now(), 'forger', 'insert', 'account:7999', '{}'));
SELECT results_eq('SELECT account_id, seq, problem FROM billing.verify_audit_log()',
    $$VALUES (7999::bigint, 1::bigint, 'no chain head for this chain')$$,
    'a forged chain is found: it has no head');
ROLLBACK TO SAVEPOINT t;
ALTER TABLE billing.audit_log ENABLE TRIGGER ALL;

-- ... and so is tampering with what the log records
ALTER TABLE billing.invoice_lines DISABLE TRIGGER ALL;
UPDATE billing.invoice_lines SET amount = amount + 1
 WHERE (account_id, invoice_id, line_no) =
       (SELECT account_id, invoice_id, line_no FROM billing.invoice_lines
         WHERE account_id = 7101 AND kind = 'usage' ORDER BY invoice_id LIMIT 1);
SELECT results_eq($$SELECT account_id, problem FROM billing.verify_audit_log()$$,
    $$SELECT 7101::bigint, format('invoice %s differs from its audit row', min(invoice_id))
        FROM billing.invoice_lines WHERE account_id = 7101 AND kind = 'usage'$$,
    'an invoice line changed behind the triggers is found');
ROLLBACK TO SAVEPOINT t;
ALTER TABLE billing.adjustments DISABLE TRIGGER ALL;
UPDATE billing.adjustments SET delta = 0 WHERE account_id = 7101;
SELECT is((SELECT problem FROM billing.verify_audit_log()),
          (SELECT format('adjustment %s differs from its audit row', adjustment_id)
             FROM billing.adjustments WHERE account_id = 7101),
          'an adjustment changed behind the triggers is found');
ROLLBACK TO SAVEPOINT t;
ALTER TABLE billing.usage_corrections DISABLE TRIGGER ALL;
DELETE FROM billing.usage_corrections WHERE account_id = 7101;
INSERT INTO billing.usage_corrections (account_id, meter, dimension, bucket_start, delta, reason)
VALUES (7101, 'au_events', '', :'d0', 100, 'unaudited');
SELECT is((SELECT count(*) FROM billing.verify_audit_log() WHERE problem LIKE 'usage correction % has no audit row'),
          1::bigint, 'a usage correction inserted behind the triggers is found');
ROLLBACK TO SAVEPOINT t;

-- a dump restore (superuser, check_function_bodies off) does not log the reloaded rows twice
SET LOCAL check_function_bodies = off;
INSERT INTO billing.accounts (account_id) VALUES (7103);
SELECT is((SELECT count(*) FROM billing.audit_log WHERE account_id = 7103), 0::bigint,
          'rows reloaded by a superuser restore session are not logged again');
SET LOCAL ROLE audit_test_admin;
INSERT INTO billing.accounts (account_id) VALUES (7104);
RESET ROLE;
SELECT is((SELECT count(*) FROM billing.audit_log WHERE account_id = 7104), 1::bigint,
          'a non-superuser cannot suspend the audit that way');
RESET check_function_bodies;
ROLLBACK TO SAVEPOINT t;

-- a statement's rows are written by the table's statement trigger, at its
-- end: seen by the next statement, gap-free, and gone with a rolled-back
-- savepoint
SELECT seq AS h0 FROM billing.audit_heads WHERE account_id = 0 \gset
INSERT INTO billing.meters (meter) VALUES ('au_s1'), ('au_s2'), ('au_s3');
SELECT is((SELECT array_agg(seq - :h0 ORDER BY seq) FROM billing.audit_log
            WHERE account_id = 0 AND seq > :h0), ARRAY[1, 2, 3]::bigint[],
          'a three-row INSERT leaves three catalog rows, seen by the next statement');
SELECT is((SELECT seq - :h0 FROM billing.audit_heads WHERE account_id = 0), 3::bigint,
          'and the chain head moved by three');
SAVEPOINT s2;
INSERT INTO billing.accounts (account_id) SELECT g FROM generate_series(7201, 7205) g;
UPDATE billing.accounts SET name = 'x' WHERE account_id BETWEEN 7201 AND 7205;
SELECT is((SELECT count(*) FROM billing.audit_log WHERE account_id BETWEEN 7201 AND 7205),
          10::bigint, 'five accounts inserted and updated: ten rows');
ROLLBACK TO SAVEPOINT s2;
SELECT is((SELECT count(*) FROM billing.audit_log WHERE account_id BETWEEN 7201 AND 7205)
          + (SELECT count(*) FROM billing.audit_heads WHERE account_id BETWEEN 7201 AND 7205),
          0::bigint, 'a rolled-back savepoint takes its rows and chain heads with it');
INSERT INTO billing.accounts (account_id) VALUES (7201), (7202);
SELECT is((SELECT array_agg(account_id || ':' || seq ORDER BY account_id, seq) FROM billing.audit_log
            WHERE account_id BETWEEN 7201 AND 7205), ARRAY['7201:1', '7202:1'],
          'the chains start again at seq 1 after it');
SELECT is_empty('SELECT * FROM billing.verify_audit_log()',
                'verify_audit_log finds every chain intact after statements and a rollback');
-- every table whose row trigger appends deferred rows has the statement
-- trigger that writes them (SECURITY DEFINER row triggers of 70_audit.sql,
-- 55_contracts.sql)
SELECT is_empty($$
    SELECT r.tgrelid::regclass
      FROM pg_trigger r JOIN pg_proc p ON p.oid = r.tgfoid
     WHERE p.pronamespace = 'billing'::regnamespace
       AND p.prosrc LIKE '%_audit_append_deferred%'
       AND NOT EXISTS (SELECT 1 FROM pg_trigger s
                        WHERE s.tgrelid = r.tgrelid AND s.tgfoid = 'billing._audit_statement()'::regprocedure
                          AND (s.tgtype & 1) = 0   -- FOR EACH STATEMENT
                          AND (s.tgtype & 2) = 0)  -- AFTER
$$, 'every table with a deferred-append row trigger has the statement trigger that writes its rows');

-- rows waiting in the buffer when audit_log changes under them (here an
-- index added in the same transaction; a session that commits one does the
-- same) are written through SQL, into every index; an invoice's row fired
-- by SET CONSTRAINTS waits with a later row of its chain written in a
-- savepoint, so the chain shows no gap
SAVEPOINT ix;
INSERT INTO billing.invoices (account_id, plan, period_start, period_end, currency, total)
    VALUES (7101, 'au_daily', '2030-01-01 00:00+00', '2030-01-02 00:00+00', 'USD', 0);
SET CONSTRAINTS billing.invoices_audit IMMEDIATE;
SAVEPOINT inner_sp;
UPDATE billing.accounts SET name = 'in a savepoint' WHERE account_id = 7101;
RELEASE SAVEPOINT inner_sp;
SELECT is_empty($$SELECT * FROM billing.verify_audit_log()
                   WHERE account_id = 7101 AND problem NOT LIKE 'invoice % has no audit row'$$,
                'a row written in a savepoint while an earlier row of its chain waits leaves no gap');
CREATE INDEX audit_log_at_test ON billing.audit_log (at);
UPDATE billing.accounts SET name = 'after the index' WHERE account_id = 7101;
SET CONSTRAINTS billing.invoices_audit DEFERRED;
SET LOCAL enable_seqscan = off;
SELECT is((SELECT count(*) FROM billing.audit_log WHERE at >= '-infinity'),
          (SELECT count(*) FROM billing.audit_log WHERE account_id >= 0),
          'rows buffered before an index was added to audit_log are in that index too');
RESET enable_seqscan;
SELECT is((SELECT array_agg(action || ' ' || split_part(object, ':', 1) ORDER BY seq) FROM billing.audit_log
            WHERE account_id = 7101 AND seq > (SELECT max(seq) - 3 FROM billing.audit_log WHERE account_id = 7101)),
          ARRAY['finalize invoice', 'update account', 'update account'],
          'the waiting invoice row and the two updates, in order');
SELECT is_empty('SELECT * FROM billing.verify_audit_log()', 'and every chain verifies');
ROLLBACK TO SAVEPOINT ix;

-- TRUNCATE of an audited table is logged in the catalog chain
TRUNCATE billing.metered_tables;
SELECT is((SELECT action || ' ' || object FROM billing.audit_log
            WHERE account_id = 0 ORDER BY seq DESC LIMIT 1), 'truncate table:metered_tables',
          'TRUNCATE of an audited table writes a catalog row');

SELECT * FROM finish();
ROLLBACK;
