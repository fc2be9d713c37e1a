-- audit_table: billing.audit_table() gives a table of the user's the audit
-- log the extension keeps for itself (SPEC section 10.4): every INSERT,
-- UPDATE and DELETE appends a row to billing.audit_log, in the hash chain
-- of the row's account, in the same transaction as the change.
-- Shows a sales team's contracts audited per account; what a row holds; an
-- UPDATE that changes nothing, one that moves a contract to another
-- account, a rolled-back change; TRUNCATE refused; a partitioned table, a
-- table without a primary key, a column added later; the errors; a change
-- of an audit row refused, and one made behind the triggers found by
-- verify_audit_log(); unaudit_table.
\set SHOW_CONTEXT never

-- the audit rows of the tables audited here, without their time and hashes
CREATE FUNCTION pg_temp.log(chain bigint)
    RETURNS TABLE (seq bigint, actor text, action text, object text, details jsonb)
    LANGUAGE sql AS $$
    SELECT a.seq, a.actor, a.action, a.object, a.details FROM billing.audit_log a
     WHERE a.account_id = chain ORDER BY a.seq
$$;
-- the rows of chain 0 (the catalog chain) written after a mark
CREATE TEMP TABLE mark AS
    SELECT coalesce(max(seq), 0) AS seq0 FROM billing.audit_log WHERE account_id = 0;
CREATE FUNCTION pg_temp.log0()
    RETURNS TABLE (seq bigint, action text, object text, details jsonb)
    LANGUAGE sql AS $$
    SELECT a.seq - m.seq0, a.action, a.object, a.details FROM billing.audit_log a, mark m
     WHERE a.account_id = 0 AND a.seq > m.seq0 ORDER BY a.seq
$$;

-- a sales team's contracts, one account per customer ------------------------
INSERT INTO billing.accounts (account_id, name) VALUES (9101, 'Acme Corp'), (9102, 'Globex');
CREATE TABLE contracts (
    contract_id  bigint PRIMARY KEY,
    account_id   bigint NOT NULL,
    plan         text NOT NULL,
    seats        int NOT NULL,
    amount       numeric(12, 2) NOT NULL,
    signed_at    timestamptz
);
SELECT billing.audit_table('contracts', 'account_id');
SELECT * FROM billing.audited_tables;

-- the sales application writes with no right on the billing schema: the
-- audit trigger appends with the extension's rights, and names the role
CREATE ROLE regress_audit_sales NOLOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON contracts TO regress_audit_sales;
SET ROLE regress_audit_sales;
INSERT INTO contracts VALUES
    (1, 9101, 'team', 10, 2900.00, '2025-03-01 09:30:00+01'),
    (2, 9101, 'business', 25, 8900.00, '2025-03-02 14:00:00+01'),
    (3, 9102, 'team', 5, 1450.00, NULL);
UPDATE contracts SET seats = 12, amount = 3480.00 WHERE contract_id = 1;
DELETE FROM contracts WHERE contract_id = 3;
RESET ROLE;

-- each change is one row in the chain of its account: the old and the new
-- row (timestamps in UTC), and the primary key
SELECT * FROM pg_temp.log(9101);
SELECT * FROM pg_temp.log(9102);

-- an UPDATE that changes nothing writes nothing; one that moves a contract
-- to another account writes the change in both chains
UPDATE contracts SET seats = seats WHERE contract_id = 2;
UPDATE contracts SET account_id = 9102 WHERE contract_id = 2;
SELECT account_id, seq, action, details -> 'old' ->> 'account_id' AS old_account,
       details -> 'new' ->> 'account_id' AS new_account
  FROM billing.audit_log
 WHERE object = 'public.contracts' AND details -> 'key' ->> 'contract_id' = '2'
 ORDER BY account_id, seq;

-- a change rolled back leaves no audit row, nor a gap in the chain
BEGIN;
INSERT INTO contracts VALUES (4, 9101, 'team', 3, 870.00, NULL);
ROLLBACK;
BEGIN;
INSERT INTO contracts VALUES (5, 9101, 'team', 3, 870.00, NULL);
SAVEPOINT s;
INSERT INTO contracts VALUES (6, 9101, 'team', 1, 290.00, NULL);
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT seq, action, details -> 'key' AS key FROM pg_temp.log(9101);

-- TRUNCATE would remove rows without a trace: refused
TRUNCATE contracts;
-- an audit row cannot be changed or removed
UPDATE billing.audit_log SET actor = 'nobody' WHERE account_id = 9101 AND seq = 1;
DELETE FROM billing.audit_log WHERE account_id = 9101;

-- a column added later appears in the rows written after it
ALTER TABLE contracts ADD COLUMN region text;
UPDATE contracts SET region = 'emea' WHERE contract_id = 1;
SELECT seq, action, details -> 'new' AS new_row FROM pg_temp.log(9101) ORDER BY seq DESC LIMIT 1;

-- a partitioned table: one chain per account, whatever the partition; a
-- partition created later is audited too
CREATE TABLE orders (account_id int NOT NULL, order_id bigint NOT NULL, total numeric NOT NULL,
                     PRIMARY KEY (account_id, order_id))
    PARTITION BY HASH (account_id);
CREATE TABLE orders_0 PARTITION OF orders FOR VALUES WITH (MODULUS 2, REMAINDER 0);
SELECT billing.audit_table('orders', 'account_id');
CREATE TABLE orders_1 PARTITION OF orders FOR VALUES WITH (MODULUS 2, REMAINDER 1);
INSERT INTO orders VALUES (9101, 1, 10), (9102, 1, 20), (9101, 2, 30);
UPDATE orders SET total = total + 1 WHERE order_id = 1;
SELECT account_id, seq, action, object, details -> 'key' AS key
  FROM billing.audit_log WHERE object = 'public.orders' ORDER BY account_id, seq;
TRUNCATE orders_1;

-- a table without a primary key, audited in the catalog chain (0): no "key"
CREATE TABLE price_notes (plan text, note text);
SELECT billing.audit_table('price_notes');
INSERT INTO price_notes VALUES ('team', 'discount for NGOs');
DELETE FROM price_notes;
SELECT * FROM pg_temp.log0();

-- errors -------------------------------------------------------------------
-- no such table: 42P01
SELECT billing.audit_table('no_such_table', 'account_id');
-- no such column: 42703
SELECT billing.audit_table('price_notes', 'account_id');
-- audited twice, or a partition of an audited table: 42710
SELECT billing.audit_table('contracts', 'account_id');
SELECT billing.audit_table('orders_0', 'account_id');
-- an account column that is not an integer: 42804
CREATE TABLE leads (id int, account text);
SELECT billing.audit_table('leads', 'account');
-- not a table: 42809
CREATE VIEW contract_view AS SELECT * FROM contracts;
SELECT billing.audit_table('contract_view');
DROP VIEW contract_view;
-- NULL: 22004
SELECT billing.audit_table(NULL);
-- unaudit_table of a table that is not audited: 42704
SELECT billing.unaudit_table('leads');
-- DDL cannot switch the audit off behind the log's back: 55000
ALTER TABLE contracts DISABLE TRIGGER ALL;
ALTER TABLE contracts DROP COLUMN account_id;
ALTER TABLE contracts ALTER COLUMN account_id TYPE text;

-- tampering: a superuser lowers the amount of contract 1 in its audit row,
-- behind the triggers
SELECT * FROM billing.verify_audit_log();
ALTER TABLE billing.audit_log DISABLE TRIGGER audit_log_append_only;
UPDATE billing.audit_log SET details = jsonb_set(details, '{new,amount}', '290.00')
 WHERE account_id = 9101 AND seq = 2;
SELECT * FROM billing.verify_audit_log();
-- putting it back makes the chain whole again
UPDATE billing.audit_log SET details = jsonb_set(details, '{new,amount}', '2900.00')
 WHERE account_id = 9101 AND seq = 2;
ALTER TABLE billing.audit_log ENABLE TRIGGER audit_log_append_only;
SELECT * FROM billing.verify_audit_log();

-- unaudit_table: the triggers go, chain 0 records it, changes are no longer logged
SELECT billing.unaudit_table('price_notes');
INSERT INTO price_notes VALUES ('team', 'not logged');
SELECT * FROM pg_temp.log0();
SELECT * FROM billing.audited_tables ORDER BY tbl::text;

DROP TABLE contracts, orders, price_notes, leads;
DROP ROLE regress_audit_sales;
