-- The schema rules that let billing.distribute() shard billing on Citus
-- (issue 8), checked on the catalog without Citus: a new table, key or
-- foreign key that breaks them fails here, long before the multi-node test.
--
--   * a per-account table is one with an account_id column; it is distributed
--     by account_id, so every primary key, unique constraint and unique index
--     of it starts with account_id (Citus enforces uniqueness per shard),
--     except invoices_invoice_id_key, which billing.distribute() drops;
--   * any other table becomes a reference table (copied to every node);
--   * a foreign key of a per-account table points to a reference table, or to
--     a per-account table through account_id (both are co-located);
--   * a reference table has no foreign key to a per-account table.
BEGIN;
SELECT plan(10);

CREATE TEMP VIEW billing_tables AS
SELECT c.oid, c.relname,
       EXISTS (SELECT 1 FROM pg_attribute a
                WHERE a.attrelid = c.oid AND a.attname = 'account_id'
                  AND a.attnum > 0 AND NOT a.attisdropped) AS per_account
  FROM pg_class c
 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'p');

SELECT matches(
    (SELECT prosrc FROM pg_proc WHERE oid = 'billing.distribute()'::regprocedure),
    'DROP INDEX billing\.invoices_invoice_id_key',
    'the one unique index that does not start with account_id is dropped by distribute()');

SELECT is_empty($$
    SELECT t.relname, i.indexrelid::regclass
      FROM billing_tables t JOIN pg_index i ON i.indrelid = t.oid
     WHERE t.per_account AND i.indisunique
       AND i.indexrelid <> 'billing.invoices_invoice_id_key'::regclass
       AND (i.indkey[0] = 0
            OR (SELECT a.attname FROM pg_attribute a
                 WHERE a.attrelid = t.oid AND a.attnum = i.indkey[0]) <> 'account_id')
$$, 'every primary key, unique constraint and unique index of a per-account table starts with account_id');

SELECT is_empty($$
    SELECT t.relname, a.atttypid::regtype, a.attnotnull
      FROM billing_tables t JOIN pg_attribute a ON a.attrelid = t.oid AND a.attname = 'account_id'
     WHERE a.atttypid <> 'bigint'::regtype OR NOT a.attnotnull
$$, 'account_id is bigint NOT NULL wherever it appears (one distribution column type)');

SELECT is_empty($$
    SELECT t.relname, k.conname, k.confrelid::regclass
      FROM billing_tables t JOIN pg_constraint k ON k.conrelid = t.oid AND k.contype = 'f'
           JOIN billing_tables r ON r.oid = k.confrelid
     WHERE t.per_account AND r.per_account
       AND NOT EXISTS (
           SELECT 1 FROM unnest(k.conkey, k.confkey) AS m(col, refcol)
                    JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = m.col
                    JOIN pg_attribute b ON b.attrelid = k.confrelid AND b.attnum = m.refcol
            WHERE a.attname = 'account_id' AND b.attname = 'account_id')
$$, 'a foreign key between per-account tables maps account_id to account_id (co-located)');

SELECT is_empty($$
    SELECT t.relname, k.conname, k.confrelid::regclass
      FROM billing_tables t JOIN pg_constraint k ON k.conrelid = t.oid AND k.contype = 'f'
     WHERE k.confrelid NOT IN (SELECT oid FROM billing_tables)
$$, 'foreign keys point only to billing tables (reference or co-located)');

SELECT is_empty($$
    SELECT t.relname, k.conname, k.confrelid::regclass
      FROM billing_tables t JOIN pg_constraint k ON k.conrelid = t.oid AND k.contype = 'f'
           JOIN billing_tables r ON r.oid = k.confrelid
     WHERE NOT t.per_account AND r.per_account
$$, 'no reference table has a foreign key to a per-account table');

SELECT is_empty($$
    SELECT relname FROM billing_tables WHERE oid IN (SELECT inhrelid FROM pg_inherits)
       OR oid IN (SELECT partrelid FROM pg_partitioned_table)
$$, 'no partitioned or inheriting tables (distribute() handles plain tables)');

SELECT is_empty($$
    SELECT t.relname, a.attname
      FROM billing_tables t JOIN pg_attribute a ON a.attrelid = t.oid
     WHERE NOT t.per_account AND t.relname <> 'metered_tables'
       AND a.attnum > 0 AND NOT a.attisdropped
       AND a.atttypid IN ('regclass'::regtype, 'oid'::regtype, 'regproc'::regtype,
                          'regprocedure'::regtype, 'regtype'::regtype)
$$, 'reference tables hold no OIDs (they differ per node; only metered_tables, kept on the coordinator, may)');

SELECT is_empty($$
    SELECT f.fn, f.account_arg
      FROM billing._distributed_functions() f
           JOIN pg_proc p ON p.oid = f.fn
     WHERE p.proargtypes[substr(f.account_arg, 2)::int - 1] <> 'bigint'::regtype
        OR p.proargnames[substr(f.account_arg, 2)::int] <> 'account_id'
$$, 'the functions distribute() pushes down take the account as a bigint account_id argument');

SELECT throws_ok('SELECT * FROM billing.distribute()', '55000', 'citus is not installed',
                 'distribute() without Citus refuses with 55000');

SELECT * FROM finish();
ROLLBACK;
