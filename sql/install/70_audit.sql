/*
 * The audit log (SPEC section 7).  The triggers that keep what it records
 * immutable (SPEC section 5) are next to their tables.
 *
 * One hash chain per account (account_id of the account concerned) and one
 * for catalog changes (account_id 0), so the log shards with the accounts.
 * A chain's head (last seq and hash) lives in billing.audit_heads; an
 * append locks that one row (SELECT ... FOR UPDATE) until the transaction
 * ends, so appends to one chain are serialized, seq stays gap-free, and
 * writers of different chains never wait for each other.  Appending is C
 * (_audit_append, src/audit.c), the same for these tables and for the
 * users' tables audited with billing.audit_table (75_audit_table.sql).
 * A row trigger hashes its row into the chain at once
 * (_audit_append_deferred); the table's statement trigger
 * (_audit_statement) writes the statement's rows and the heads they moved
 * once, at the end of the statement.
 *
 * What writes a row (action, chain, object):
 *   meters, plans, charges, metered_tables   insert/update/delete, chain 0
 *   accounts, subscriptions                   insert/update/delete, the account
 *   TRUNCATE of any of those tables           truncate, chain 0
 *   invoices (finalize_invoices)              finalize, the account
 *   credit_ledger (55_contracts.sql)          the entry's kind, the account
 *   adjustments (rerate)                      adjust, the account
 *   usage_corrections (correct_usage)         correct, the account
 *   a rerate run (not a dry run)              rerate, chain 0
 *   audit_table, unaudit_table (75_audit_table.sql)  insert/delete, chain 0
 * The hash and its canonical encoding are in src/audit_encode.c.
 */

CREATE TABLE billing.audit_log (
    account_id  bigint NOT NULL CHECK (account_id >= 0),
    seq         bigint NOT NULL CHECK (seq >= 1),
    at          timestamptz NOT NULL CHECK (pg_catalog.isfinite(at)),
    actor       text NOT NULL,
    action      text NOT NULL,
    object      text NOT NULL,
    details     jsonb NOT NULL,
    prev_hash   bytea,
    hash        bytea NOT NULL,
    PRIMARY KEY (account_id, seq)
);
COMMENT ON TABLE billing.audit_log IS
    'Append-only audit trail: one SHA-256 hash chain per account (account_id 0: catalog changes); hash = sha256(prev_hash || canonical row)';

CREATE TABLE billing.audit_heads (
    account_id  bigint PRIMARY KEY CHECK (account_id >= 0),
    seq         bigint NOT NULL CHECK (seq >= 0),
    hash        bytea
);
COMMENT ON TABLE billing.audit_heads IS
    'Last seq and hash of each audit chain; an append locks its chain''s row. Copy it elsewhere to anchor the chains';

-- the C half ---------------------------------------------------------------------------

CREATE FUNCTION billing._audit_encode(account_id bigint, seq bigint, at timestamptz,
                                      actor text, action text, object text, details jsonb)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'billing_audit_encode'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._audit_encode(bigint, bigint, timestamptz, text, text, text, jsonb) IS
    'Internal: canonical encoding (version 1) of an audit row, the input of its hash (doc/billing.md, Guarantees)';

CREATE FUNCTION billing._audit_hash(prev_hash bytea, account_id bigint, seq bigint,
                                    at timestamptz, actor text, action text, object text,
                                    details jsonb)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'billing_audit_hash'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._audit_hash(bytea, bigint, bigint, timestamptz, text, text, text, jsonb) IS
    'Internal: sha256(prev_hash || canonical encoding of the row); a NULL prev_hash counts as no bytes';

CREATE FUNCTION billing._audit_chain_step(state bytea, head_hash bytea, account_id bigint,
                                          seq bigint, at timestamptz, actor text, action text,
                                          object text, details jsonb)
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'billing_audit_chain_step'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._audit_chain_step(bytea, bytea, bigint, bigint, timestamptz, text, text, text, jsonb) IS
    'Internal: transition function of billing._audit_chain';

CREATE AGGREGATE billing._audit_chain(head_hash bytea, account_id bigint, seq bigint,
                                      at timestamptz, actor text, action text, object text,
                                      details jsonb) (
    SFUNC = billing._audit_chain_step,
    STYPE = bytea
);
COMMENT ON AGGREGATE billing._audit_chain(bytea, bigint, bigint, timestamptz, text, text, text, jsonb) IS
    'Internal: as a window aggregate over one chain''s new rows in seq order, the hash of each row (starting from the chain head''s hash)';

CREATE FUNCTION billing._audit_actor() RETURNS text
    AS 'MODULE_PATHNAME', 'billing_audit_actor'
    LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION billing._audit_actor() IS
    'Internal: the role the client acts as (session user or SET ROLE), unchanged by SECURITY DEFINER functions';

CREATE FUNCTION billing._audit_suspended() RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_audit_suspended'
    LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION billing._audit_suspended() IS
    'Internal: true in a superuser session with check_function_bodies off (a pg_dump restore reloading audited tables)';

-- appending -----------------------------------------------------------------------------

/*
 * _audit_append: add a row to the chain of p_chain and bring its head row
 * up to date; returns its seq.  The one definition of an append (C,
 * src/audit_chain.c), shared with the triggers of audited user tables: the
 * chain's head row is locked on the transaction's first append to the
 * chain and stays locked to its end.  Under REPEATABLE READ or
 * SERIALIZABLE a concurrent append to the same chain makes this raise
 * 40001 (retry the transaction).  The caller needs INSERT on audit_log and
 * UPDATE on audit_heads (42501).
 */
CREATE FUNCTION billing._audit_append(p_chain bigint, p_action text, p_object text,
                                      p_details jsonb, p_on_placement boolean DEFAULT false)
    RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_audit_append'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION billing._audit_append(bigint, text, text, jsonb, boolean) IS
    'Internal: appends a row to one audit chain (serialized per chain by its head row); returns its seq, or NULL when a Citus placement leaves it to another node';

/*
 * _audit_append_many: _audit_append for many rows at once (one statement
 * writing adjustments or usage corrections), each chain's in the order of
 * p_keys (the adjustment or correction ids).  Locks the chains' heads in
 * account order, appends with one time stamp for the batch and writes each
 * head once.  On one node only: on a Citus shard _audit_insert_rows appends
 * one row at a time.
 */
CREATE FUNCTION billing._audit_append_many(p_chains bigint[], p_keys bigint[], p_action text,
                                           p_objects text[], p_details jsonb[])
    RETURNS void
    AS 'MODULE_PATHNAME', 'billing_audit_append_many'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION billing._audit_append_many(bigint[], bigint[], text, text[], jsonb[]) IS
    'Internal: appends many rows to their audit chains in one go (the statement-level audit of adjustments and usage corrections)';

/*
 * _audit_append_deferred: _audit_append for the row triggers of a table
 * that also has the statement trigger billing._audit_statement() (below):
 * the row is hashed into its chain at once, and written with the
 * statement's other rows, and each moved head once, by that trigger at the
 * end of the statement (or by the commit, for a row trigger deferred to
 * it).  Writing once per statement instead of once per row is what makes
 * a finalize of many invoices or a bulk load of accounts cheap; the
 * chain, its order and every row are the same.  Where appends go through
 * SQL (Citus) the row is written at once, as by _audit_append.
 */
CREATE FUNCTION billing._audit_append_deferred(p_chain bigint, p_action text, p_object text,
                                               p_details jsonb, p_on_placement boolean DEFAULT false)
    RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_audit_append_deferred'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION billing._audit_append_deferred(bigint, text, text, jsonb, boolean) IS
    'Internal: _audit_append for a row trigger; the row is written by the table''s statement trigger billing._audit_statement() or at commit';

/*
 * _audit_statement: the statement trigger that writes the rows the row
 * triggers appended with _audit_append_deferred (and audit_table's
 * _audit_row, 75_audit_table.sql), and the chain heads they moved, once
 * per statement; before TRUNCATE (audited user tables) it refuses the
 * statement.
 */
CREATE FUNCTION billing._audit_statement() RETURNS trigger
    AS 'MODULE_PATHNAME', 'billing_audit_statement'
    LANGUAGE C;
COMMENT ON FUNCTION billing._audit_statement() IS
    'Internal: statement trigger of an audited table and its partitions; writes the audit chain heads after INSERT, UPDATE or DELETE, refuses TRUNCATE';

-- triggers ------------------------------------------------------------------------------

/*
 * _audit_change: AFTER ROW trigger of the audited reference tables, and
 * BEFORE/AFTER TRUNCATE statement trigger.  Arguments: the object kind
 * ('meter', 'account', ...), the chain ('catalog': 0, 'account': the row's
 * account_id), then the key columns naming the object.  Details: the row
 * images ({"new": ...}, {"old": ..., "new": ...}, {"old": ...}), rendered
 * in UTC.  An UPDATE that changes nothing writes nothing.
 */
CREATE FUNCTION billing._audit_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    o jsonb;
    n jsonb;
    r jsonb;
    k text;
    key text := '';
    chains bigint[];
    c bigint;
    -- on Citus the trigger fires on a shard or a reference table's copy,
    -- named after the table with the shard's number
    on_placement boolean := TG_TABLE_NAME ~ '_[0-9]+$';
    tbl text := regexp_replace(TG_TABLE_NAME, '_[0-9]+$', '');
BEGIN
    IF billing._audit_suspended() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM billing._audit_append(0, 'truncate', format('table:%s', tbl),
                                      jsonb_build_object('table', format('%I.%I', TG_TABLE_SCHEMA, tbl)),
                                      on_placement);
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        o := to_jsonb(OLD);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        n := to_jsonb(NEW);
    END IF;
    IF TG_OP = 'UPDATE' AND o = n THEN
        RETURN NULL;
    END IF;
    r := coalesce(n, o);
    FOR i IN 2 .. TG_NARGS - 1 LOOP
        k := r ->> TG_ARGV[i];
        key := key || CASE WHEN i > 2 THEN '/' ELSE '' END || coalesce(k, '');
    END LOOP;
    IF TG_ARGV[1] = 'catalog' THEN
        chains := ARRAY[0::bigint];
    ELSE
        chains := ARRAY(SELECT DISTINCT x FROM unnest(ARRAY[(o ->> 'account_id')::bigint,
                                                           (n ->> 'account_id')::bigint]) x
                         WHERE x IS NOT NULL ORDER BY x);
    END IF;
    FOREACH c IN ARRAY chains LOOP
        PERFORM billing._audit_append_deferred(c, lower(TG_OP), format('%s:%s', TG_ARGV[0], key),
                                      CASE TG_OP WHEN 'INSERT' THEN jsonb_build_object('new', n)
                                                 WHEN 'DELETE' THEN jsonb_build_object('old', o)
                                                 ELSE jsonb_build_object('old', o, 'new', n) END,
                                               on_placement);
    END LOOP;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing._audit_change() IS
    'Internal: audit trigger of meters, accounts, plans, charges, subscriptions and metered_tables';

CREATE TRIGGER meters_audit AFTER INSERT OR UPDATE OR DELETE ON billing.meters
    FOR EACH ROW EXECUTE FUNCTION billing._audit_change('meter', 'catalog', 'meter');
CREATE TRIGGER plans_audit AFTER INSERT OR UPDATE OR DELETE ON billing.plans
    FOR EACH ROW EXECUTE FUNCTION billing._audit_change('plan', 'catalog', 'plan');
CREATE TRIGGER charges_audit AFTER INSERT OR UPDATE OR DELETE ON billing.charges
    FOR EACH ROW EXECUTE FUNCTION billing._audit_change('charge', 'catalog', 'charge_id');
CREATE TRIGGER metered_tables_audit AFTER INSERT OR UPDATE OR DELETE ON billing.metered_tables
    FOR EACH ROW EXECUTE FUNCTION billing._audit_change('metered_table', 'catalog', 'tbl');
CREATE TRIGGER accounts_audit AFTER INSERT OR UPDATE OR DELETE ON billing.accounts
    FOR EACH ROW EXECUTE FUNCTION billing._audit_change('account', 'account', 'account_id');
CREATE TRIGGER subscriptions_audit AFTER INSERT OR UPDATE OR DELETE ON billing.subscriptions
    FOR EACH ROW EXECUTE FUNCTION billing._audit_change('subscription', 'account', 'account_id', 'starts_at');

CREATE TRIGGER meters_audit_truncate AFTER TRUNCATE ON billing.meters
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_change('meter', 'catalog');
CREATE TRIGGER plans_audit_truncate AFTER TRUNCATE ON billing.plans
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_change('plan', 'catalog');
CREATE TRIGGER charges_audit_truncate AFTER TRUNCATE ON billing.charges
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_change('charge', 'catalog');
CREATE TRIGGER metered_tables_audit_truncate AFTER TRUNCATE ON billing.metered_tables
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_change('metered_table', 'catalog');
CREATE TRIGGER accounts_audit_truncate AFTER TRUNCATE ON billing.accounts
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_change('account', 'catalog');
CREATE TRIGGER subscriptions_audit_truncate AFTER TRUNCATE ON billing.subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_change('subscription', 'catalog');

/*
 * _audit_invoice: AFTER INSERT ROW trigger of invoices.  The row carries
 * the invoice and its lines, so verify_audit_log can tell when either
 * changed later.  It is a constraint trigger deferred to the commit, on one
 * node and on Citus alike (one trigger shape, issue 15): on Citus an
 * invoice and its lines are written by two statements (_finalize_citus).
 * On one node, where finalize writes both in one statement, billing._finalize
 * sets it IMMEDIATE for that statement, so the rows are written at its end,
 * as by an ordinary AFTER trigger (and seen by the rest of the transaction).
 */
CREATE FUNCTION billing._audit_invoice() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
BEGIN
    IF billing._audit_suspended() THEN
        RETURN NULL;
    END IF;
    PERFORM billing._audit_append_deferred(
        NEW.account_id, 'finalize', format('invoice:%s', NEW.invoice_id),
        jsonb_build_object(
            'invoice', to_jsonb(NEW),
            'lines', (SELECT coalesce(jsonb_agg(to_jsonb(l) ORDER BY l.line_no), '[]'::jsonb)
                        FROM billing.invoice_lines l
                       WHERE l.account_id = NEW.account_id AND l.invoice_id = NEW.invoice_id)));
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing._audit_invoice() IS
    'Internal: writes the audit row of a finalized invoice, with its lines';
CREATE CONSTRAINT TRIGGER invoices_audit AFTER INSERT ON billing.invoices
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION billing._audit_invoice();

/*
 * The statement triggers writing what the row triggers above (and the
 * credit ledger's, 55_contracts.sql) appended: one write of the audit rows
 * and of the chain heads per statement.  A row trigger fired after its
 * statement's own (invoices_audit deferred to the commit) is written at
 * the commit.
 */
CREATE TRIGGER meters_audit_flush AFTER INSERT OR UPDATE OR DELETE ON billing.meters
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement();
CREATE TRIGGER plans_audit_flush AFTER INSERT OR UPDATE OR DELETE ON billing.plans
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement();
CREATE TRIGGER charges_audit_flush AFTER INSERT OR UPDATE OR DELETE ON billing.charges
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement();
CREATE TRIGGER metered_tables_audit_flush AFTER INSERT OR UPDATE OR DELETE ON billing.metered_tables
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement();
CREATE TRIGGER accounts_audit_flush AFTER INSERT OR UPDATE OR DELETE ON billing.accounts
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement();
CREATE TRIGGER subscriptions_audit_flush AFTER INSERT OR UPDATE OR DELETE ON billing.subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement();
CREATE TRIGGER invoices_audit_flush AFTER INSERT ON billing.invoices
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement();
CREATE TRIGGER credit_ledger_audit_flush AFTER INSERT ON billing.credit_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement();

/*
 * _audit_insert_rows: AFTER INSERT statement trigger of adjustments and
 * usage_corrections (one set-based append per statement: a rerate writes
 * thousands of adjustments).  Arguments: action, object kind, key column;
 * each chain's rows in key order.  The same trigger on one node and on
 * Citus (issue 15; 1.0's distribute() made it a row-level one there): on
 * Citus it fires on each shard the statement wrote (a table named after
 * its table with the shard's number), where it appends the rows one at a
 * time, each through the same _audit_append as the other triggers, in the
 * same order.
 */
CREATE FUNCTION billing._audit_insert_rows() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    chains bigint[];
    keys bigint[];
    objects text[];
    details jsonb[];
BEGIN
    IF billing._audit_suspended() THEN
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT array_agg(n.account_id), array_agg(n.%1$I), array_agg(%2$L || n.%1$I),
                           array_agg(to_jsonb(n))
                      FROM new_rows n', TG_ARGV[2], TG_ARGV[1] || ':')
       INTO chains, keys, objects, details;
    IF chains IS NULL THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME ~ '_[0-9]+$' THEN
        PERFORM billing._audit_append(x.chain, TG_ARGV[0], x.object, x.details)
           FROM unnest(chains, keys, objects, details) AS x(chain, k, object, details)
          ORDER BY x.chain, x.k;
    ELSE
        PERFORM billing._audit_append_many(chains, keys, TG_ARGV[0], objects, details);
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing._audit_insert_rows() IS
    'Internal: writes the audit rows of the adjustments or usage corrections one statement inserted';
CREATE TRIGGER adjustments_audit AFTER INSERT ON billing.adjustments
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_insert_rows('adjust', 'adjustment', 'adjustment_id');
CREATE TRIGGER usage_corrections_audit AFTER INSERT ON billing.usage_corrections
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_insert_rows('correct', 'usage_correction', 'correction_id');

/*
 * _audit_rerate: the row of one rerate run (called by billing._rerate after
 * it wrote its adjustments; dry runs change nothing and write nothing).
 * In the catalog chain: a run may span every account.  Each adjustment
 * also has its own row in its account's chain.
 */
CREATE FUNCTION billing._audit_rerate(from_ts timestamptz, to_ts timestamptz, p_account bigint,
                                      p_reason text, p_adjustments bigint)
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
BEGIN
    IF billing._audit_suspended() THEN
        RETURN;
    END IF;
    PERFORM billing._audit_append(0, 'rerate', 'rerate',
        jsonb_build_object('from_ts', from_ts, 'to_ts', to_ts, 'account_id', p_account,
                           'reason', p_reason, 'adjustments', p_adjustments));
END
$$;
COMMENT ON FUNCTION billing._audit_rerate(timestamptz, timestamptz, bigint, text, bigint) IS
    'Internal: writes the audit row of a rerate run (range, account filter, reason, adjustments written)';

-- the actor of adjustments and corrections: the client's role, also inside SECURITY DEFINER
ALTER TABLE billing.adjustments ALTER COLUMN actor SET DEFAULT billing._audit_actor();
ALTER TABLE billing.usage_corrections ALTER COLUMN actor SET DEFAULT billing._audit_actor();
-- and of credit grants, ledger entries and commitments (55_contracts.sql),
-- which SECURITY DEFINER functions write: CURRENT_USER there is the owner
ALTER TABLE billing.credit_grants ALTER COLUMN actor SET DEFAULT billing._audit_actor();
ALTER TABLE billing.credit_ledger ALTER COLUMN actor SET DEFAULT billing._audit_actor();
ALTER TABLE billing.commitments ALTER COLUMN actor SET DEFAULT billing._audit_actor();

-- immutability ----------------------------------------------------------------------------

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON billing.audit_log
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change('audit_log is append-only.');
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON billing.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('audit_log is append-only.');

-- a chain head only moves forward and is never removed (the condition is
-- checked without a function call on every append)
CREATE TRIGGER audit_heads_guard BEFORE UPDATE ON billing.audit_heads
    FOR EACH ROW WHEN (NOT (NEW.account_id = OLD.account_id AND NEW.seq > OLD.seq))
    EXECUTE FUNCTION billing._refuse_change(
        'An audit chain head only moves forward, with the rows appended to its chain.');
CREATE TRIGGER audit_heads_no_delete BEFORE DELETE ON billing.audit_heads
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change(
        'An audit chain head only moves forward, with the rows appended to its chain.');
CREATE TRIGGER audit_heads_no_truncate BEFORE TRUNCATE ON billing.audit_heads
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('audit_heads is append-only.');

-- verification ----------------------------------------------------------------------------

/*
 * _audit_image(row): the row as jsonb, rendered as the audit triggers render
 * it (TimeZone UTC, ISO dates, postgres intervals), whatever the settings of
 * the session that evaluates it.  verify_audit_log compares today's rows
 * with their audit rows through it: its own SET clauses do not reach the
 * workers of a Citus cluster, whose connections render timestamps in the
 * server's time zone, and a zone other than UTC made every invoice differ
 * from its audit row there.
 */
CREATE FUNCTION billing._audit_image(r anyelement)
    RETURNS jsonb
    LANGUAGE sql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
    SELECT pg_catalog.to_jsonb(r)
$$;

/*
 * verify_audit_log: every row of every chain, checked on its own, so one
 * problem is reported where it is and not at every later row:
 *   - seq must follow the previous row's seq by one (1 for the first row):
 *     rows were removed or inserted;
 *   - prev_hash must be the previous row's hash: a row was removed, or the
 *     previous row's hash was rewritten;
 *   - hash must be sha256(prev_hash || canonical row): the row was altered;
 *   - the last row must be the chain head of billing.audit_heads: rows
 *     were removed at or appended past the end;
 * and what the log records must still be so: each finalized invoice (and
 * its lines), adjustment and usage correction must have its audit row and
 * still match it (billed_invoice_id of adjustments excepted, set later).
 * A rewrite of a whole chain from some row up to its head, head included,
 * is only detected against a copy of audit_heads kept elsewhere.
 */
CREATE FUNCTION billing.verify_audit_log()
    RETURNS TABLE (account_id bigint, seq bigint, problem text)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
    WITH chain AS (
        SELECT a.*, lag(a.seq) OVER w AS p_seq, lag(a.hash) OVER w AS p_hash,
               lead(a.seq) OVER w IS NULL AS is_last
          FROM billing.audit_log a
        WINDOW w AS (PARTITION BY a.account_id ORDER BY a.seq)
    ), row_problems AS (
        SELECT c.account_id, c.seq,
               CASE
                   WHEN c.seq <> coalesce(c.p_seq, 0) + 1 THEN
                       format('seq %s follows %s: rows were removed or inserted',
                              c.seq, coalesce(c.p_seq::text, 'the start of the chain'))
                   WHEN c.prev_hash IS DISTINCT FROM c.p_hash THEN
                       'prev_hash is not the hash of the previous row'
                   WHEN c.hash IS DISTINCT FROM
                        billing._audit_hash(c.prev_hash, c.account_id, c.seq, c.at, c.actor,
                                            c.action, c.object, c.details) THEN
                       'hash does not match the row: the row was altered'
               END AS problem
          FROM chain c
    ), head_problems AS (
        SELECT coalesce(h.account_id, c.account_id) AS account_id,
               coalesce(c.seq, h.seq) AS seq,
               CASE
                   WHEN h.account_id IS NULL THEN 'no chain head for this chain'
                   WHEN c.account_id IS NULL AND h.seq > 0 THEN
                       format('chain head is at seq %s but the chain has no rows', h.seq)
                   WHEN c.seq <> h.seq THEN
                       format('last row is seq %s but the chain head is at seq %s', c.seq, h.seq)
                   WHEN c.hash IS DISTINCT FROM h.hash THEN
                       'last row''s hash is not the chain head''s hash'
               END AS problem
          FROM (SELECT * FROM chain WHERE is_last) c
               FULL JOIN billing.audit_heads h ON h.account_id = c.account_id
    ), recorded AS (
        SELECT a.account_id, a.seq, a.action, a.object, a.details
          FROM billing.audit_log a
         WHERE a.action IN ('finalize', 'adjust', 'correct')
    ), invoice_problems AS (
        -- lines compared in line_no order, each recorded line contained in
        -- today's line at the same place (one lateral per invoice: Citus
        -- pushes it down to the shards)
        SELECT i.account_id, r.seq,
               CASE
                   WHEN r.seq IS NULL THEN format('invoice %s has no audit row', i.invoice_id)
                   WHEN NOT billing._audit_image(i) @> (r.details -> 'invoice')
                        OR jsonb_array_length(r.details -> 'lines') <> jsonb_array_length(l.lines)
                        OR EXISTS (SELECT 1
                                     FROM generate_series(0, jsonb_array_length(l.lines) - 1) k
                                    WHERE NOT (l.lines -> k) @> (r.details -> 'lines' -> k)) THEN
                       format('invoice %s differs from its audit row', i.invoice_id)
               END AS problem
          FROM billing.invoices i
               LEFT JOIN recorded r
                      ON r.account_id = i.account_id AND r.action = 'finalize'
                     AND r.object = format('invoice:%s', i.invoice_id)
               LEFT JOIN LATERAL (SELECT coalesce(jsonb_agg(billing._audit_image(x) ORDER BY x.line_no),
                                                  '[]'::jsonb) AS lines
                                    FROM billing.invoice_lines x
                                   WHERE x.account_id = i.account_id
                                     AND x.invoice_id = i.invoice_id) l ON true
    ), adjustment_problems AS (
        SELECT j.account_id, r.seq,
               CASE
                   WHEN r.seq IS NULL THEN format('adjustment %s has no audit row', j.adjustment_id)
                   WHEN NOT (billing._audit_image(j) - 'billed_invoice_id') @> (r.details - 'billed_invoice_id') THEN
                       format('adjustment %s differs from its audit row', j.adjustment_id)
               END AS problem
          FROM billing.adjustments j
               LEFT JOIN recorded r
                      ON r.account_id = j.account_id AND r.action = 'adjust'
                     AND r.object = format('adjustment:%s', j.adjustment_id)
    ), correction_problems AS (
        SELECT u.account_id, r.seq,
               CASE
                   WHEN r.seq IS NULL THEN format('usage correction %s has no audit row', u.correction_id)
                   WHEN NOT billing._audit_image(u) @> r.details THEN
                       format('usage correction %s differs from its audit row', u.correction_id)
               END AS problem
          FROM billing.usage_corrections u
               LEFT JOIN recorded r
                      ON r.account_id = u.account_id AND r.action = 'correct'
                     AND r.object = format('usage_correction:%s', u.correction_id)
    )
    SELECT p.account_id, p.seq, p.problem
      FROM (SELECT * FROM row_problems
            UNION ALL SELECT * FROM head_problems
            UNION ALL SELECT * FROM invoice_problems
            UNION ALL SELECT * FROM adjustment_problems
            UNION ALL SELECT * FROM correction_problems) p
     WHERE p.problem IS NOT NULL
     ORDER BY 1, 2, 3
$$;
COMMENT ON FUNCTION billing.verify_audit_log() IS
    'Checks every audit chain (seq, prev_hash, hash, head) and that finalized invoices, adjustments and usage corrections still match their audit rows; returns nothing when all is intact';
