-- Schema: the tables and columns SPEC.md pins exist with their types.
BEGIN;
SELECT plan(4);
SELECT has_schema('billing');
SELECT has_table('billing', 'meters', 'meters exists');
SELECT has_table('billing', 'accounts', 'accounts exists');
SELECT col_is_pk('billing', 'accounts', 'account_id', 'accounts keyed by account_id');
SELECT * FROM finish();
ROLLBACK;
