/*
 * The audit log for any table (SPEC section 10.4, issue 19).
 *
 * billing.audit_table(tbl, account_column) gives a user's table the audit
 * log the extension keeps for itself: every INSERT, UPDATE and DELETE
 * appends a row to billing.audit_log, in the chain of the row's account
 * (chain 0 without an account column), in the same transaction, hashed
 * and verified like every other row (70_audit.sql, src/audit.c).  It
 * creates, on the table:
 *
 *   billing_audit           AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW
 *                           billing._audit_row(account_column): one audit row
 *                           per change (src/audit_table.c); a partitioned
 *                           table's partitions, now and later, get clones
 *   billing_audit_flush     AFTER INSERT OR UPDATE OR DELETE FOR EACH STATEMENT
 *                           billing._audit_statement(): writes the chain heads
 *                           the statement moved, once per statement
 *   billing_audit_truncate  BEFORE TRUNCATE FOR EACH STATEMENT
 *                           billing._audit_statement(): refuses it (55000)
 *
 * The two statement triggers also go on every partition (statement
 * triggers are not cloned): audit_table puts them on the partitions that
 * exist, the event trigger billing_audit_ddl on those created or attached
 * later.  The table is recorded in billing.audited_tables, whose changes
 * are audited themselves (chain 0, object 'audited_table:<table>').
 *
 * The audit is switched off only by unaudit_table (or DROP TABLE), both of
 * which leave a row in chain 0: DDL that would disable or drop the audit
 * triggers, or drop or retype the account column, is refused (55000) by
 * the event triggers below.
 *
 * On Citus an audited Citus table must be distributed by its account column
 * with billing.accounts: its row trigger fires on the shard, on the node
 * that holds the account's audit chain.
 */

CREATE TABLE billing.audited_tables (
    tbl             regclass PRIMARY KEY,
    account_column  name
);
COMMENT ON TABLE billing.audited_tables IS
    'Tables whose changes are appended to the audit log (billing.audit_table); account_column NULL: the catalog chain 0';

SELECT pg_catalog.pg_extension_config_dump('billing.audited_tables', '');

CREATE TRIGGER audited_tables_audit AFTER INSERT OR UPDATE OR DELETE ON billing.audited_tables
    FOR EACH ROW EXECUTE FUNCTION billing._audit_change('audited_table', 'catalog', 'tbl');
CREATE TRIGGER audited_tables_audit_truncate AFTER TRUNCATE ON billing.audited_tables
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_change('audited_table', 'catalog');

-- the triggers (C) -----------------------------------------------------------------------

CREATE FUNCTION billing._audit_row() RETURNS trigger
    AS 'MODULE_PATHNAME', 'billing_audit_row'
    LANGUAGE C;
COMMENT ON FUNCTION billing._audit_row() IS
    'Internal: AFTER ROW trigger of an audited table (argument: the account column, empty for chain 0); appends each change to the audit log';

CREATE FUNCTION billing._audit_statement() RETURNS trigger
    AS 'MODULE_PATHNAME', 'billing_audit_statement'
    LANGUAGE C;
COMMENT ON FUNCTION billing._audit_statement() IS
    'Internal: statement trigger of an audited table and its partitions; writes the audit chain heads after INSERT, UPDATE or DELETE, refuses TRUNCATE';

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
       OR account_column IS NULL
       OR billing._citus_table_kind(tbl) <> 'distributed'
       OR NOT EXISTS (
           SELECT 1 FROM pg_dist_partition p, pg_dist_partition a
            WHERE p.logicalrelid = tbl AND a.logicalrelid = 'billing.accounts'::regclass
              AND p.colocationid = a.colocationid
              AND column_to_column_name(p.logicalrelid, p.partkey) = account_column) THEN
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
    IF other IS NULL THEN
        SELECT t.tgrelid INTO other FROM pg_trigger t
         WHERE t.tgrelid = tbl AND t.tgfoid = 'billing._audit_row()'::regprocedure;
    END IF;
    IF other IS NOT NULL THEN
        RAISE EXCEPTION 'table "%" is already audited', tbl
            USING ERRCODE = '42710',
                  DETAIL = CASE WHEN other <> tbl
                                THEN format('%s is audited, and a table is audited at most once, with its partitions.', other) END,
                  HINT = 'To change the account column, call billing.unaudit_table first.';
    END IF;
    PERFORM billing._audit_table_citus(tbl, account_column);    -- on Citus: co-located, triggers allowed
    INSERT INTO billing.audited_tables VALUES (tbl, account_column);
    EXECUTE format('CREATE TRIGGER billing_audit AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION billing._audit_row(%L)',
                   tbl, coalesce(account_column, ''));
    PERFORM billing._audit_statement_triggers(tbl);
    FOR part IN SELECT t.relid FROM pg_partition_tree(tbl) t JOIN pg_class c ON c.oid = t.relid
                 WHERE t.relid <> tbl AND c.relkind IN ('r', 'p') LOOP
        PERFORM billing._audit_statement_triggers(part);
    END LOOP;
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
    -- first out of the register: the event trigger then lets the triggers go
    DELETE FROM billing.audited_tables a WHERE a.tbl = unaudit_table.tbl;
    IF NOT FOUND THEN
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
END
$$;
COMMENT ON FUNCTION billing.unaudit_table(regclass) IS
    'Stops auditing a table audited by billing.audit_table';

/*
 * Audited tables own their audit view of the world:
 *
 *   billing_audit_ddl (ddl_command_end of CREATE TABLE and ALTER TABLE):
 *   a new or attached partition of an audited table gets the statement
 *   triggers (its row trigger is cloned by PostgreSQL), a detached one
 *   loses them; and an ALTER TABLE that disabled or broke the audit of a
 *   table (its triggers disabled, its account column dropped, renamed or
 *   retyped) is refused.
 *
 *   billing_audit_dropped (sql_drop): a dropped audited table leaves the
 *   register (a row in chain 0 says so); dropping the triggers of a table
 *   still audited is refused.
 *
 * SECURITY DEFINER: whoever creates a partition of an audited table needs
 * no right on the trigger functions.  Both run fixed statements only.
 */
CREATE FUNCTION billing._audit_ddl() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    touched regclass[];
    r record;
    audited regclass;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM billing.audited_tables) THEN
        RETURN;
    END IF;
    SELECT array_agg(DISTINCT c.objid::regclass) INTO touched
      FROM pg_event_trigger_ddl_commands() c
     WHERE c.classid = 'pg_class'::regclass AND c.objsubid = 0
       AND EXISTS (SELECT 1 FROM pg_class k WHERE k.oid = c.objid AND k.relkind IN ('r', 'p'));
    IF touched IS NULL THEN
        RETURN;
    END IF;
    FOREACH audited IN ARRAY ARRAY(SELECT DISTINCT billing._audited_ancestor(t)
                                     FROM unnest(touched) t
                                    WHERE billing._audited_ancestor(t) IS NOT NULL) LOOP
        -- partitions created or attached: the statement triggers
        FOR r IN SELECT p.relid FROM pg_partition_tree(audited) p JOIN pg_class c ON c.oid = p.relid
                  WHERE c.relkind IN ('r', 'p') LOOP
            PERFORM billing._audit_statement_triggers(r.relid);
        END LOOP;
        -- partitions detached: their statement triggers go
        FOR r IN SELECT g.tgrelid::regclass AS rel, g.tgname FROM pg_trigger g
                  WHERE g.tgfoid = 'billing._audit_statement()'::regprocedure
                    AND billing._audited_ancestor(g.tgrelid) IS NULL LOOP
            EXECUTE format('DROP TRIGGER %I ON %s', r.tgname, r.rel);
        END LOOP;
    END LOOP;
    -- what an ALTER TABLE must not do to an audited table or its partitions
    FOR r IN SELECT t AS rel, billing._audited_ancestor(t) AS audited FROM unnest(touched) t
              WHERE billing._audited_ancestor(t) IS NOT NULL LOOP
        IF EXISTS (SELECT 1 FROM pg_trigger g
                    WHERE g.tgrelid = r.rel
                      AND g.tgfoid IN ('billing._audit_row()'::regprocedure,
                                       'billing._audit_statement()'::regprocedure)
                      AND g.tgenabled NOT IN ('O', 'A'))
           OR NOT EXISTS (SELECT 1 FROM pg_trigger g
                           WHERE g.tgrelid = r.rel AND g.tgfoid = 'billing._audit_row()'::regprocedure) THEN
            RAISE EXCEPTION 'the audit of table % cannot be switched off by ALTER TABLE', r.audited
                USING ERRCODE = '55000',
                      DETAIL = format('%s would lose or disable the triggers of billing.audit_table.', r.rel),
                      HINT = 'Stop auditing the table with billing.unaudit_table, which the audit log records.';
        END IF;
        IF r.rel = r.audited AND EXISTS (
            SELECT 1 FROM billing.audited_tables a
             WHERE a.tbl = r.rel AND a.account_column IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM pg_attribute x
                                WHERE x.attrelid = a.tbl AND x.attname = a.account_column
                                  AND x.attnum > 0 AND NOT x.attisdropped
                                  AND x.atttypid IN ('bigint'::regtype, 'integer'::regtype,
                                                     'smallint'::regtype))) THEN
            RAISE EXCEPTION 'the account column of audited table % cannot be dropped, renamed or retyped', r.rel
                USING ERRCODE = '55000',
                      DETAIL = format('Its changes are audited in the chain of column "%s", an integer.',
                                      (SELECT a.account_column FROM billing.audited_tables a WHERE a.tbl = r.rel)),
                      HINT = 'Stop auditing the table with billing.unaudit_table first, then audit it again.';
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._audit_ddl() IS
    'Internal: gives new partitions of audited tables their statement triggers and refuses ALTER TABLE that switches an audit off';
CREATE EVENT TRIGGER billing_audit_ddl ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
    EXECUTE FUNCTION billing._audit_ddl();

CREATE FUNCTION billing._audit_dropped() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    d record;
BEGIN
    DELETE FROM billing.audited_tables a
     WHERE a.tbl::oid IN (SELECT o.objid FROM pg_event_trigger_dropped_objects() o
                           WHERE o.classid = 'pg_class'::regclass AND o.objsubid = 0);
    FOR d IN SELECT o.address_names FROM pg_event_trigger_dropped_objects() o
              WHERE o.object_type = 'trigger'
                AND o.address_names[3] IN ('billing_audit', 'billing_audit_flush',
                                           'billing_audit_truncate') LOOP
        IF billing._audited_ancestor(to_regclass(format('%I.%I', d.address_names[1],
                                                        d.address_names[2]))) IS NOT NULL THEN
            RAISE EXCEPTION 'the audit of table %.% cannot be switched off by DROP TRIGGER',
                            quote_ident(d.address_names[1]), quote_ident(d.address_names[2])
                USING ERRCODE = '55000',
                      HINT = 'Stop auditing the table with billing.unaudit_table, which the audit log records.';
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._audit_dropped() IS
    'Internal: forgets audited tables when they are dropped; refuses dropping the audit triggers of a table still audited';
CREATE EVENT TRIGGER billing_audit_dropped ON sql_drop
    WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED', 'DROP TRIGGER')
    EXECUTE FUNCTION billing._audit_dropped();
