/*
 * The audit log for any table (SPEC section 10.4, issue 19).
 *
 * billing.audit_table(tbl, account_column) gives a user's table the audit
 * log the extension keeps for itself: every INSERT, UPDATE and DELETE
 * appends a row to billing.audit_log, in the chain of the row's account
 * (chain 0 without an account column), in the same transaction, hashed
 * and verified like every other row (70_audit.sql, src/audit_chain.c).  It
 * creates, on the table:
 *
 *   billing_audit           AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW
 *                           billing._audit_row(account_column): one audit row
 *                           per change (src/audit_table.c); a partitioned
 *                           table's partitions, now and later, get clones
 *   billing_audit_flush     AFTER INSERT OR UPDATE OR DELETE FOR EACH STATEMENT
 *                           billing._audit_statement(): writes the statement's
 *                           audit rows and chain heads, once per statement
 *   billing_audit_truncate  BEFORE TRUNCATE FOR EACH STATEMENT
 *                           billing._audit_statement(): refuses it (55000)
 *
 * The two statement triggers also go on every partition (statement
 * triggers are not cloned): audit_table puts them on the partitions that
 * exist, the event trigger billing_audit_ddl on those created or attached
 * later.  The triggers are the whole registration: pg_dump keeps them with
 * the table, and the view billing.audited_tables lists them.  audit_table
 * and unaudit_table each leave a row in chain 0 ('insert' / 'delete' of
 * 'audited_table:<table>').
 *
 * An ALTER TABLE that would disable the audit triggers, or drop, rename or
 * retype the account column, is refused (55000) by billing_audit_ddl.
 *
 * On Citus an audited Citus table must be distributed by its account column
 * with billing.accounts: its row trigger fires on the shard, on the node
 * that holds the account's audit chain.
 */

-- the triggers (C) -----------------------------------------------------------------------

CREATE FUNCTION billing._audit_row() RETURNS trigger
    AS 'MODULE_PATHNAME', 'billing_audit_row'
    LANGUAGE C;
COMMENT ON FUNCTION billing._audit_row() IS
    'Internal: AFTER ROW trigger of an audited table (argument: the account column, empty for chain 0); appends each change to the audit log';

-- billing._audit_statement(), the statement trigger, is in 70_audit.sql (the
-- extension's own audited tables carry it too)

/*
 * audited_tables: the audited tables (those carrying the row trigger of
 * audit_table, not as a partition's clone) and their account column (NULL:
 * chain 0).
 */
CREATE VIEW billing.audited_tables AS
SELECT g.tgrelid::regclass AS tbl,
       NULLIF(pg_catalog.convert_from(
           pg_catalog.substring(g.tgargs, 1, pg_catalog.position(g.tgargs, '\x00'::bytea) - 1),
           pg_catalog.getdatabaseencoding()), '')::name AS account_column
  FROM pg_catalog.pg_trigger g
 WHERE g.tgfoid OPERATOR(pg_catalog.=) 'billing._audit_row()'::regprocedure
   AND g.tgparentid OPERATOR(pg_catalog.=) 0;
COMMENT ON VIEW billing.audited_tables IS
    'Tables whose changes are appended to the audit log (billing.audit_table), with their account column (NULL: the catalog chain 0)';

/*
 * _audit_table_note: the row in chain 0 that says a table is audited (or
 * no longer is), written by audit_table and unaudit_table.  It records the
 * state the table is in -- 'insert' of the table and its account column
 * when it is audited, 'delete' when it is not -- so that calling it by
 * hand can only record what is true.
 */
CREATE FUNCTION billing._audit_table_note(tbl regclass) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    col name;
BEGIN
    IF tbl IS NULL THEN
        RETURN;
    END IF;
    SELECT a.account_column INTO col FROM billing.audited_tables a WHERE a.tbl = $1;
    IF FOUND THEN
        PERFORM billing._audit_append(0, 'insert', format('audited_table:%s', tbl),
            jsonb_build_object('new', jsonb_build_object('tbl', tbl::text, 'account_column', col)));
    ELSE
        PERFORM billing._audit_append(0, 'delete', format('audited_table:%s', tbl),
            jsonb_build_object('old', jsonb_build_object('tbl', tbl::text)));
    END IF;
END
$$;
COMMENT ON FUNCTION billing._audit_table_note(regclass) IS
    'Internal: writes the catalog-chain row saying whether a table is audited (by audit_table and unaudit_table)';

/*
 * _audit_statement_triggers: put the two statement triggers on one table
 * (an audited table or one of its partitions) unless it has them.
 */
CREATE FUNCTION billing._audit_statement_triggers(tbl regclass) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger t
                    WHERE t.tgrelid = tbl AND t.tgname = 'billing_audit_flush') THEN
        EXECUTE format('CREATE TRIGGER billing_audit_flush AFTER INSERT OR UPDATE OR DELETE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement()', tbl);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger t
                    WHERE t.tgrelid = tbl AND t.tgname = 'billing_audit_truncate') THEN
        EXECUTE format('CREATE TRIGGER billing_audit_truncate BEFORE TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement()', tbl);
    END IF;
END
$$;
COMMENT ON FUNCTION billing._audit_statement_triggers(regclass) IS
    'Internal: creates the statement triggers of an audited table (or partition) that it lacks';

/*
 * _audited_ancestor: the audited table tbl belongs to -- itself, or the
 * partitioned table it is a partition of -- or NULL.
 */
CREATE FUNCTION billing._audited_ancestor(tbl regclass) RETURNS regclass
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT a.tbl FROM billing.audited_tables a
     WHERE a.tbl = $1 OR a.tbl IN (SELECT pg_partition_ancestors($1))
     LIMIT 1
$$;
COMMENT ON FUNCTION billing._audited_ancestor(regclass) IS
    'Internal: the audited table a table is or belongs to as a partition, or NULL';

/*
 * _audit_table_citus: audit_table's check on Citus.  When the table is a
 * Citus table, its row trigger fires on its shards, which may write only
 * co-located shards: the audit log must be distributed (billing.distribute())
 * and the table distributed by its account column with billing.accounts.
 * Allows the triggers (citus.enable_unsafe_triggers) for the rest of the
 * transaction.  A plain table on the coordinator needs nothing: its
 * triggers run there and Citus routes their writes.
 */
CREATE FUNCTION billing._audit_table_citus(tbl regclass, account_column name) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF billing._citus_table_kind(tbl) IS NULL THEN
        RETURN;
    END IF;
    IF billing._citus_table_kind('billing.audit_log') IS DISTINCT FROM 'distributed'
       OR NOT billing._citus_colocated(tbl, account_column) THEN
        RAISE EXCEPTION 'audited table % must be distributed by its account column with billing.accounts', tbl
            USING ERRCODE = '55000',
                  DETAIL = 'Its triggers append each change on the node of the row''s shard, which must also hold the account''s audit chain (run billing.distribute() first).',
                  HINT = format('SELECT create_distributed_table(%L, %L, colocate_with => %L)',
                                tbl::text, coalesce(account_column, 'account_id'), 'billing.accounts');
    END IF;
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
END
$$;
COMMENT ON FUNCTION billing._audit_table_citus(regclass, name) IS
    'Internal: on Citus, an audited Citus table must be co-located with billing.accounts by its account column';

-- audit_table and unaudit_table ------------------------------------------------------------

CREATE FUNCTION billing.audit_table(tbl regclass, account_column name DEFAULT NULL)
    RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    kind "char";
    typ  regtype;
    other regclass;
    part regclass;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'audit_table: table must not be null' USING ERRCODE = '22004';
    END IF;
    SELECT c.relkind INTO kind FROM pg_class c WHERE c.oid = tbl;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'relation with OID % does not exist', tbl::oid USING ERRCODE = '42P01';
    END IF;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '"%" is not a table', tbl
            USING ERRCODE = '42809',
                  HINT = 'Only ordinary and partitioned tables can be audited.';
    END IF;
    IF account_column IS NOT NULL THEN
        SELECT a.atttypid::regtype INTO typ FROM pg_attribute a
         WHERE a.attrelid = tbl AND a.attname = account_column AND a.attnum > 0
           AND NOT a.attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'column "%" of table "%" does not exist', account_column, tbl
                USING ERRCODE = '42703';
        END IF;
        IF NOT typ = ANY (ARRAY['bigint', 'integer', 'smallint']::regtype[]) THEN
            RAISE EXCEPTION 'account column "%" of table "%" has type %', account_column, tbl, typ
                USING ERRCODE = '42804',
                      DETAIL = 'The account column must be of type bigint, integer or smallint.';
        END IF;
    END IF;
    -- once per table: not again, nor a partition of an audited table, nor
    -- a partitioned table one of whose partitions is audited
    SELECT a.tbl INTO other FROM billing.audited_tables a
     WHERE a.tbl = audit_table.tbl OR a.tbl IN (SELECT pg_partition_ancestors(audit_table.tbl))
        OR a.tbl IN (SELECT t.relid FROM pg_partition_tree(audit_table.tbl) t)
     LIMIT 1;
    IF other IS NOT NULL THEN
        RAISE EXCEPTION 'table "%" is already audited', tbl
            USING ERRCODE = '42710',
                  DETAIL = CASE WHEN other <> tbl
                                THEN format('%s is audited, and a table is audited at most once, with its partitions.', other)
                                ELSE 'A table is audited at most once.' END,
                  HINT = 'To change the account column, call billing.unaudit_table first.';
    END IF;
    PERFORM billing._audit_table_citus(tbl, account_column);    -- on Citus: co-located, triggers allowed
    EXECUTE format('CREATE TRIGGER billing_audit AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION billing._audit_row(%L)',
                   tbl, coalesce(account_column, ''));
    PERFORM billing._audit_statement_triggers(tbl);
    FOR part IN SELECT t.relid FROM pg_partition_tree(tbl) t JOIN pg_class c ON c.oid = t.relid
                 WHERE t.relid <> tbl AND c.relkind IN ('r', 'p') LOOP
        PERFORM billing._audit_statement_triggers(part);
    END LOOP;
    PERFORM billing._audit_table_note(tbl);
END
$$;
COMMENT ON FUNCTION billing.audit_table(regclass, name) IS
    'Appends every INSERT, UPDATE and DELETE of a table to the audit log, in the chain of the row''s account column (chain 0 without one); refuses TRUNCATE';

CREATE FUNCTION billing.unaudit_table(tbl regclass) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    SET client_min_messages = warning AS $$
DECLARE
    t record;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'unaudit_table: table must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.audited_tables a WHERE a.tbl = unaudit_table.tbl) THEN
        RAISE EXCEPTION 'table "%" is not audited', tbl USING ERRCODE = '42704';
    END IF;
    IF billing._citus_table_kind(tbl) IS NOT NULL THEN
        PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    END IF;
    FOR t IN SELECT g.tgrelid::regclass AS rel, g.tgname
               FROM pg_trigger g
              WHERE (g.tgrelid = tbl OR g.tgrelid IN (SELECT p.relid FROM pg_partition_tree(tbl) p))
                AND g.tgfoid IN ('billing._audit_row()'::regprocedure,
                                 'billing._audit_statement()'::regprocedure)
                AND NOT g.tgisinternal AND g.tgparentid = 0
              ORDER BY g.tgrelid <> tbl, 1, 2 LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
    PERFORM billing._audit_table_note(tbl);
END
$$;
COMMENT ON FUNCTION billing.unaudit_table(regclass) IS
    'Stops auditing a table audited by billing.audit_table';

/*
 * billing_audit_ddl (ddl_command_end of CREATE TABLE, ALTER TABLE and
 * CREATE SCHEMA, whose CREATE TABLE subcommands it reports too): a
 * new or attached partition of an audited table gets the statement
 * triggers (its row trigger is cloned by PostgreSQL), a detached one loses
 * them; and an ALTER TABLE that would switch off or break the audit of a
 * table -- disable its audit triggers, drop, rename or retype its account
 * column -- is refused (55000).  SECURITY DEFINER: whoever creates a
 * partition of an audited table needs no right on the trigger functions;
 * it runs fixed statements only.  Only tables the command touched are
 * looked at.
 */
CREATE FUNCTION billing._audit_ddl() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    r record;
    d record;
    audited regclass;
BEGIN
    FOR r IN SELECT DISTINCT c.objid::regclass AS rel,
                    billing._audited_ancestor(c.objid::regclass) AS audited
               FROM pg_event_trigger_ddl_commands() c
              WHERE c.classid = 'pg_class'::regclass      -- (a RENAME COLUMN names the column)
                AND EXISTS (SELECT 1 FROM pg_class k WHERE k.oid = c.objid AND k.relkind IN ('r', 'p'))
    LOOP
        CONTINUE WHEN r.audited IS NULL;
        -- partitions created or attached: the statement triggers
        FOR audited IN SELECT p.relid FROM pg_partition_tree(r.audited) p
                         JOIN pg_class c ON c.oid = p.relid
                        WHERE c.relkind IN ('r', 'p') LOOP
            PERFORM billing._audit_statement_triggers(audited);
        END LOOP;
        -- the audit switched off or broken
        IF EXISTS (SELECT 1 FROM pg_trigger g
                    WHERE g.tgrelid = r.rel
                      AND g.tgfoid IN ('billing._audit_row()'::regprocedure,
                                       'billing._audit_statement()'::regprocedure)
                      AND g.tgenabled NOT IN ('O', 'A')) THEN
            RAISE EXCEPTION 'the audit of table % cannot be disabled', r.audited
                USING ERRCODE = '55000',
                      DETAIL = format('ALTER TABLE would disable the triggers of billing.audit_table on %s.', r.rel),
                      HINT = 'Stop auditing the table with billing.unaudit_table, which the audit log records.';
        END IF;
        IF EXISTS (SELECT 1 FROM billing.audited_tables a
                    WHERE a.tbl = r.audited AND a.account_column IS NOT NULL
                      AND NOT EXISTS (SELECT 1 FROM pg_attribute x
                                       WHERE x.attrelid = r.rel AND x.attname = a.account_column
                                         AND x.attnum > 0 AND NOT x.attisdropped
                                         AND x.atttypid IN ('bigint'::regtype, 'integer'::regtype,
                                                            'smallint'::regtype))) THEN
            RAISE EXCEPTION 'the account column of audited table % cannot be dropped, renamed or retyped', r.audited
                USING ERRCODE = '55000',
                      DETAIL = format('Its changes are audited in the chain of its column "%s", an integer.',
                                      (SELECT a.account_column FROM billing.audited_tables a
                                        WHERE a.tbl = r.audited)),
                      HINT = 'Stop auditing the table with billing.unaudit_table first, then audit it again.';
        END IF;
        -- partitions detached: their statement triggers go (those
        -- _audit_statement_triggers made: the extension's own tables carry
        -- the same trigger function under other names, 70_audit.sql)
        FOR d IN SELECT g.tgrelid::regclass AS rel, g.tgname FROM pg_trigger g
                  WHERE g.tgfoid = 'billing._audit_statement()'::regprocedure
                    AND g.tgname IN ('billing_audit_flush', 'billing_audit_truncate')
                    AND billing._audited_ancestor(g.tgrelid) IS NULL LOOP
            EXECUTE format('DROP TRIGGER %I ON %s', d.tgname, d.rel);
        END LOOP;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._audit_ddl() IS
    'Internal: gives new partitions of audited tables their statement triggers and refuses an ALTER TABLE that switches an audit off';
CREATE EVENT TRIGGER billing_audit_ddl ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE SCHEMA')
    EXECUTE FUNCTION billing._audit_ddl();
