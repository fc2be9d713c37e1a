/*
 * Scaling out on Citus (issue 8).
 *
 * billing.distribute(), run once by an admin on the coordinator after
 * CREATE EXTENSION citus (every node) and CREATE EXTENSION billing, turns
 * the schema into a distributed one:
 *
 *   - every table with an account_id column is distributed by account_id,
 *     co-located with billing.accounts (so one account's rows of every
 *     table live on one node);
 *   - every other table of the schema (meters, plans, charges,
 *     ingest_offsets, ...) becomes a reference table, copied to every
 *     node, except billing.metered_tables (regclass values are per node;
 *     only meter_table/unmeter_table on the coordinator read it);
 *   - the per-account functions are registered with
 *     create_distributed_function on their account_id argument, so that a
 *     call runs on the node that holds the account.
 *
 * The schema keeps the rules this needs (the pgTAP test citus_rules.sql
 * checks them without Citus): every primary or unique key of a table with
 * account_id starts with account_id, and such a table has foreign keys only
 * to reference tables or to a co-located table on (account_id, ...).
 */

/*
 * _citus_table_kind: 'distributed', 'reference' or NULL (not a Citus
 * table, or Citus missing).  Reads the catalog dynamically so that the
 * extension installs without Citus.
 */
CREATE FUNCTION billing._citus_table_kind(rel regclass) RETURNS text
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    method "char";
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE 'SELECT partmethod FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1'
        INTO method USING rel;
    RETURN CASE WHEN method IS NULL THEN NULL WHEN method = 'h' THEN 'distributed'
                WHEN method = 'n' THEN 'reference' ELSE 'other' END;
END
$$;
COMMENT ON FUNCTION billing._citus_table_kind(regclass) IS
    'Internal: how Citus holds a table (distributed, reference) or NULL when it does not';

/*
 * _exists_here: does a row of tbl that this node holds satisfy cond?  cond
 * is a condition over the row (alias x) with one parameter, $1 (val),
 * written by the guards below, never taken from a user.  The rows this
 * node holds: those of tbl itself, unless Citus distributes tbl, then those
 * of the placements of its shards on this node, found in Citus's catalog
 * (pg_dist_shard, pg_dist_placement, pg_dist_local_group), which no setting
 * of a session changes.
 *
 * The guards of reference tables (meters, plans, charges) need rows of
 * distributed tables.  Citus changes every node's copy of a reference
 * table in one distributed transaction and fires the guard on each copy:
 * each copy checks the rows its node holds, reading its shards directly
 * (a trigger on a shard may not start a distributed query), and together
 * the copies check every row, whichever node the statement came from.  No
 * guard is skipped anywhere: on one node, the one copy checks every row.
 */
CREATE FUNCTION billing._exists_here(tbl regclass, cond text, val anyelement) RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    rels regclass[] := ARRAY[tbl];
    found boolean;
BEGIN
    IF billing._citus_table_kind(tbl) = 'distributed' THEN
        EXECUTE $q$
            SELECT coalesce(array_agg(shard_name(s.logicalrelid, s.shardid)::regclass
                                      ORDER BY s.shardid), '{}')
              FROM pg_dist_shard s JOIN pg_dist_placement p ON p.shardid = s.shardid
             WHERE s.logicalrelid = $1
               AND p.groupid = (SELECT l.groupid FROM pg_dist_local_group l)
            $q$ INTO rels USING tbl;
        IF cardinality(rels) = 0 THEN
            RETURN false;
        END IF;
    END IF;
    EXECUTE format('SELECT EXISTS (%s)',
                   (SELECT string_agg(format('SELECT 1 FROM %s x WHERE %s', r, cond), ' UNION ALL ')
                      FROM unnest(rels) r))
       INTO found USING val;
    RETURN found;
END
$$;
COMMENT ON FUNCTION billing._exists_here(regclass, text, anyelement) IS
    'Internal: whether a row of tbl held by this node (its shards on this node, on Citus) satisfies cond (alias x, parameter $1)';

/*
 * _citus_chain_is_local: does this node hold the shard of audit chain
 * p_chain?  True when the audit log is not distributed.  A trigger on a
 * reference table fires on every node's copy in one distributed
 * transaction; only the node holding the chain writes the audit row.
 */
CREATE FUNCTION billing._citus_chain_is_local(p_chain bigint) RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF billing._citus_table_kind('billing.audit_log') IS DISTINCT FROM 'distributed' THEN
        RETURN true;
    END IF;
    RETURN EXISTS (SELECT 1 FROM pg_dist_placement p
                    WHERE p.shardid = get_shard_id_for_distribution_column('billing.audit_log', p_chain)
                      AND p.groupid = (SELECT l.groupid FROM pg_dist_local_group l));
END
$$;
COMMENT ON FUNCTION billing._citus_chain_is_local(bigint) IS
    'Internal: true when this node holds the audit chain (always, without Citus)';

/*
 * The per-account functions and the argument that names the account.  A
 * call whose account argument is a constant, outside an explicit
 * transaction block, is run on the node holding that account.
 */
CREATE FUNCTION billing._distributed_functions()
    RETURNS TABLE (fn regprocedure, account_arg text)
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    VALUES ('billing.record(bigint,text,numeric,timestamptz,text,text)'::regprocedure, '$1'),
           ('billing.report_cumulative(text,bigint,text,timestamptz,numeric,text)', '$2'),
           ('billing.usage(bigint,timestamptz,timestamptz,interval,text)', '$1'),
           ('billing.remaining(bigint,text,timestamptz,text)', '$1'),
           ('billing.invoice_preview(bigint,timestamptz)', '$1'),
           ('billing.credit_balance(bigint,timestamptz)', '$1'),
           ('billing.correct_usage(bigint,text,timestamptz,numeric,text,text)', '$1')
$$;
COMMENT ON FUNCTION billing._distributed_functions() IS
    'Internal: the per-account functions billing.distribute() registers with Citus, with their account argument';

/*
 * _meter_table_citus: meter_table's check on Citus.  When billing is
 * distributed and the metered table is a Citus table, its rows are counted
 * by triggers firing on its shards, which may write only co-located shards:
 * the table must be distributed by its account column with
 * billing.accounts.  Allows the triggers (citus.enable_unsafe_triggers) for
 * the rest of the transaction.  A plain table on the coordinator needs
 * nothing: its triggers run there and Citus routes their writes.
 */
CREATE FUNCTION billing._meter_table_citus(tbl regclass, account_column name) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    kind text := billing._citus_table_kind(tbl);
BEGIN
    IF kind IS NULL OR billing._citus_table_kind('billing.accounts') IS NULL THEN
        RETURN;
    END IF;
    IF kind <> 'distributed' OR NOT EXISTS (
        SELECT 1 FROM pg_dist_partition p, pg_dist_partition a
         WHERE p.logicalrelid = tbl AND a.logicalrelid = 'billing.accounts'::regclass
           AND p.colocationid = a.colocationid
           AND column_to_column_name(p.logicalrelid, p.partkey) = account_column) THEN
        RAISE EXCEPTION 'metered table % must be distributed by its account column with billing.accounts', tbl
            USING ERRCODE = '55000',
                  DETAIL = 'Its triggers count each row on the node of the row''s shard, which must also hold the account''s counters.',
                  HINT = format('SELECT create_distributed_table(%L, %L, colocate_with => %L)',
                                tbl::text, account_column, 'billing.accounts');
    END IF;
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
END
$$;
COMMENT ON FUNCTION billing._meter_table_citus(regclass, name) IS
    'Internal: on Citus, a metered Citus table must be co-located with billing.accounts by its account column';

/*
 * _compact_into_citus: billing._compact_into on Citus, which refuses its
 * UPDATE ... FROM plus INSERT ... WHERE NOT EXISTS over the cells.  The same
 * fold as one upsert per aggregation (Citus takes ON CONFLICT DO UPDATE with
 * immutable functions only, and the aggregation is not a column of the
 * target, so it is a constant of each statement).
 */
CREATE FUNCTION billing._compact_into_citus(target text, grain interval) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    agg text;
BEGIN
    FOREACH agg IN ARRAY ARRAY['sum', 'count', 'max', 'last', 'unique'] LOOP
        EXECUTE format($q$
            INSERT INTO billing.%I AS b (account_id, meter, dimension, bucket_start, quantity,
                                         events, last_ts, last_seq)
            SELECT account_id, meter, dimension, %s,
                   billing._cell_agg(aggregation, quantity, last_ts, last_seq),
                   sum(events)::bigint,
                   billing._cell_last_ts(aggregation, quantity, last_ts, last_seq),
                   billing._cell_last_seq(aggregation, quantity, last_ts, last_seq)
              FROM billing_compact_cells
             WHERE aggregation = %L
             GROUP BY 1, 2, 3, 4
            ON CONFLICT (account_id, meter, bucket_start, dimension) DO UPDATE
               SET quantity = billing._combine(%L, b.quantity, b.last_ts, b.last_seq,
                                               excluded.quantity, excluded.last_ts, excluded.last_seq),
                   events = b.events + excluded.events,
                   last_ts = CASE WHEN billing._last_later(excluded.last_ts, excluded.last_seq,
                                                           b.last_ts, b.last_seq)
                                  THEN excluded.last_ts ELSE b.last_ts END,
                   last_seq = CASE WHEN billing._last_later(excluded.last_ts, excluded.last_seq,
                                                            b.last_ts, b.last_seq)
                                   THEN excluded.last_seq ELSE b.last_seq END
            $q$,
            target,
            CASE WHEN grain IS NULL THEN 'bucket_start'
                 ELSE format('billing._bin(%L, bucket_start)', grain) END,
            agg, agg);
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._compact_into_citus(text, interval) IS
    'Internal: _compact_into on Citus, one upsert per aggregation';

/*
 * _finalize_citus: the body of finalize_invoices on Citus, for the periods
 * ended by cutoff.  The single-node body writes every invoice in one
 * statement over _invoice_build, which reads the shards itself; Citus
 * refuses that inside a query over distributed tables.  Here: each
 * account's due periods in order (under the account's row lock), each
 * built by the same _invoice_build in a query over functions only, then
 * written with one statement per table (the rollover grants it creates get
 * their ids before the next period is built, which may draw from them).
 * The account's pending adjustments go on its earliest new invoice, as on
 * one node.
 */
CREATE FUNCTION billing._finalize_citus(cutoff timestamptz)
    RETURNS TABLE (r_invoice_id bigint, r_account_id bigint, r_period_start timestamptz,
                   r_period_end timestamptz, r_total numeric)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    acc bigint;
    per record;
    first boolean;
    inv bigint;
    b billing._invoice_line[];
    ids bigint[];
    l_total numeric;
    seq0 bigint;
BEGIN
    FOR acc IN SELECT DISTINCT d.account_id FROM billing._due_periods(cutoff) d ORDER BY 1 LOOP
        PERFORM 1 FROM billing.accounts a WHERE a.account_id = acc FOR NO KEY UPDATE;
        first := true;
        -- the account's due periods, looked up again under its lock
        FOR per IN
            SELECT d.plan, d.currency, d.spend_cap, d.period_start, d.period_end,
                   array_agg(d.segment_plan ORDER BY d.segment_start) AS plans,
                   array_agg(d.segment_start ORDER BY d.segment_start) AS starts,
                   array_agg(d.segment_end ORDER BY d.segment_start) AS ends
              FROM billing._due_periods(cutoff) d
             WHERE d.account_id = acc
             GROUP BY 1, 2, 3, 4, 5
             ORDER BY d.period_start
        LOOP
            inv := nextval('billing.invoice_id_seq');
            b := ARRAY(SELECT x FROM billing._invoice_build(
                           ARRAY[acc], ARRAY[per.currency], ARRAY[per.spend_cap],
                           ARRAY[per.period_start], ARRAY[per.period_end], ARRAY[first],
                           array_fill(1, ARRAY[cardinality(per.plans)]), per.plans, per.starts,
                           per.ends, false, true) x);
            first := false;
            -- ids of the rollover grants (named -1, -2, ... by the build)
            ids := ARRAY(SELECT nextval('billing.credit_grant_id_seq')
                           FROM unnest(b) x WHERE x.kind = 'grant' ORDER BY x.grant_id DESC);
            SELECT coalesce(sum(x.amount), 0) INTO l_total FROM unnest(b) x
             WHERE x.kind IN ('usage', 'fixed', 'cap', 'true_up', 'commitment', 'adjustment', 'credit');
            INSERT INTO billing.invoices (account_id, invoice_id, plan, period_start, period_end,
                                          currency, total)
            VALUES (acc, inv, per.plan, per.period_start, per.period_end, per.currency, l_total);
            INSERT INTO billing.invoice_lines (account_id, invoice_id, line_no, kind, meter,
                                              description, quantity, amount, unrounded_amount,
                                              charge_id, price, adjustment_id, segment_start,
                                              segment_end, proration, commitment_id, grant_id,
                                              dimension)
            SELECT acc, inv, (row_number() OVER (ORDER BY x.ord))::integer, x.kind, x.meter,
                   x.description, x.quantity, x.amount, x.unrounded_amount, x.charge_id, x.price,
                   x.adjustment_id, x.segment_start, x.segment_end, x.proration, x.commitment_id,
                   CASE WHEN x.grant_id < 0 THEN ids[-x.grant_id] ELSE x.grant_id END, x.dimension
              FROM unnest(b) x
             WHERE x.kind IN ('usage', 'fixed', 'cap', 'true_up', 'commitment', 'adjustment', 'credit');
            INSERT INTO billing.credit_grants (account_id, grant_id, amount, effective_at, expires_at,
                                               priority, applies_to, source, reason, commitment_id,
                                               window_no, rolled_from)
            SELECT acc, ids[-x.grant_id], x.amount, x.effective_at, x.expires_at, g.priority,
                   g.applies_to, 'rollover', format('rollover of grant %s', g.grant_id),
                   g.commitment_id, g.window_no + 1, g.grant_id
              FROM unnest(b) x
                   JOIN billing.credit_grants g ON g.account_id = acc AND g.grant_id = x.source_grant
             WHERE x.kind = 'grant';
            seq0 := billing._ledger_next_seq(acc) - 1;
            INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at,
                                               invoice_id)
            SELECT acc, seq0 + row_number() OVER (ORDER BY x.ord),
                   CASE WHEN x.grant_id < 0 THEN ids[-x.grant_id] ELSE x.grant_id END,
                   CASE WHEN x.kind = 'credit' THEN 'draw' ELSE x.kind END, x.amount, x.effective_at,
                   CASE WHEN x.kind = 'credit' THEN inv END
              FROM unnest(b) x
             WHERE x.kind IN ('credit', 'expire', 'rollover', 'grant');
            UPDATE billing.adjustments a SET billed_invoice_id = inv
             WHERE a.account_id = acc
               AND a.adjustment_id = ANY (ARRAY(SELECT x.adjustment_id FROM unnest(b) x
                                                 WHERE x.adjustment_id IS NOT NULL));
            r_invoice_id := inv;
            r_account_id := acc;
            r_period_start := per.period_start;
            r_period_end := per.period_end;
            r_total := l_total;
            RETURN NEXT;
        END LOOP;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._finalize_citus(timestamptz) IS
    'Internal: finalize_invoices on Citus, one period at a time';

/*
 * _usage_totals_citus: the quantity per meter of one account over [from_ts,
 * to_ts) on Citus, from the minute buckets at the edges, hour and day
 * roll-ups, and the deltas: one router query to the account's shards (the
 * set-based _usage_totals_many joins many accounts with arrays, which Citus
 * cannot plan).  _usage_totals_many calls it once per account.  The
 * dimensions s_dims[j] of meters s_meters[j] are totalled apart (matrix
 * charges, issue 18), the rest of a meter has dimension NULL.
 */
CREATE FUNCTION billing._usage_totals_citus(p_account bigint, from_ts timestamptz, to_ts timestamptz,
                                            s_meters text[] DEFAULT '{}', s_dims text[] DEFAULT '{}')
    RETURNS TABLE (meter text, quantity numeric, dimension text)
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    -- [from_ts, to_ts) = minutes [from_ts, h0) + hours [h0, d0) + days [d0, d1)
    --                  + hours [d1, h1) + minutes [h1, to_ts), with h0/h1 the
    -- first/last whole hour and d0/d1 the first/last whole UTC day inside
    h0 timestamptz := billing._bin('1 hour', from_ts - interval '1 microsecond') + interval '1 hour';
    h1 timestamptz := billing._bin('1 hour', to_ts);
    d0 timestamptz := billing._bin('1 day', from_ts - interval '1 microsecond') + interval '1 day';
    d1 timestamptz := billing._bin('1 day', to_ts);
    m_end timestamptz := LEAST(h0, to_ts);                 -- leading minutes end
    m_start timestamptz := GREATEST(h1, h0, from_ts);      -- trailing minutes start
    hh_end timestamptz := LEAST(d0, h1);                   -- leading hours end
    ht_start timestamptz := GREATEST(d1, d0, h0);          -- trailing hours start
    -- keys of the dimensions totalled apart: length of the meter, ':', the
    -- meter, the dimension (unambiguous, whatever the names hold)
    named text[] := ARRAY(SELECT format('%s:%s%s', length(x.m), x.m, x.d)
                            FROM unnest(s_meters, s_dims) AS x(m, d));
BEGIN
    -- one index range per meter and table: (account_id, meter, bucket_start)
    RETURN QUERY
    WITH cells AS (
        SELECT m.meter, c.dimension, c.quantity, c.last_ts, c.last_seq
          FROM billing.meters m   -- (unique meters: _usage_totals_unique)
               CROSS JOIN LATERAL (
                   SELECT u.dimension, u.quantity, u.last_ts, u.last_seq FROM billing.usage_buckets u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= from_ts AND u.bucket_start < m_end
                   UNION ALL
                   SELECT u.dimension, u.quantity, u.last_ts, u.last_seq FROM billing.usage_buckets u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= m_start AND u.bucket_start < to_ts
                   UNION ALL
                   SELECT u.dimension, u.quantity, u.last_ts, u.last_seq FROM billing.usage_hourly u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= h0 AND u.bucket_start < hh_end
                   UNION ALL
                   SELECT u.dimension, u.quantity, u.last_ts, u.last_seq FROM billing.usage_hourly u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= ht_start AND u.bucket_start < h1
                   UNION ALL
                   SELECT u.dimension, u.quantity, u.last_ts, u.last_seq FROM billing.usage_daily u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= d0 AND u.bucket_start < d1
               ) c
         WHERE m.aggregation <> 'unique'
        UNION ALL
        -- not yet compacted
        SELECT x.meter, x.dimension, x.quantity, x.last_ts,
               CASE WHEN x.last_ts IS NOT NULL THEN d.seq END
          FROM billing.usage_deltas d, billing._delta_cells(d.cells) x
         WHERE d.account_id = p_account AND x.bucket_start >= from_ts AND x.bucket_start < to_ts
    ), keyed AS (
        SELECT c.*, CASE WHEN format('%s:%s%s', length(c.meter), c.meter, c.dimension) = ANY (named)
                         THEN c.dimension END AS dim
          FROM cells c
    )
    SELECT c.meter::text,
           billing._cell_agg(m.aggregation, c.quantity, c.last_ts, c.last_seq),
           c.dim::text
      FROM keyed c JOIN billing.meters m ON m.meter = c.meter AND m.aggregation <> 'unique'
     GROUP BY c.meter, c.dim, m.aggregation;
END
$$;

COMMENT ON FUNCTION billing._usage_totals_citus(bigint, timestamptz, timestamptz, text[], text[]) IS
    'Internal: usage totals of one account on Citus (a router query), named dimensions apart';

CREATE FUNCTION billing.distribute()
    RETURNS TABLE (object text, distribution text, changed boolean)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    t record;
    f record;
    fk record;
    fks text[] := '{}';
    kind text;
    had_rows boolean;
    emptied regclass[] := '{}';
    rel regclass;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'citus is not installed'
            USING ERRCODE = '55000',
                  DETAIL = 'billing.distribute() shards the billing tables with Citus.',
                  HINT = 'Load citus (shared_preload_libraries), run CREATE EXTENSION citus on every node, add the workers, then call billing.distribute() on the coordinator.';
    END IF;
    IF NOT citus_is_coordinator() THEN
        RAISE EXCEPTION 'billing.distribute() must run on the coordinator'
            USING ERRCODE = '55000';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_dist_node WHERE groupid = 0) THEN
        RAISE EXCEPTION 'the coordinator is not in the Citus metadata'
            USING ERRCODE = '55000',
                  DETAIL = 'Reference tables need a copy on the coordinator, where guards on them run.',
                  HINT = 'Run SELECT citus_set_coordinator_host(''host'', port) first.';
    END IF;

    -- the billing triggers move with their tables (they write only the
    -- account's own, co-located rows); one connection per node keeps the
    -- foreign keys created in this transaction valid
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);

    -- Citus enforces unique keys per shard only, so they must hold the
    -- distribution column: invoice numbers stay unique through their sequence
    IF to_regclass('billing.invoices_invoice_id_key') IS NOT NULL THEN
        DROP INDEX billing.invoices_invoice_id_key;
    END IF;

    -- on Citus an invoice and its lines are written by two statements
    -- (_finalize_citus): its audit row, which carries the lines, is written
    -- at commit
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                    WHERE tgrelid = 'billing.invoices'::regclass AND tgname = 'invoices_audit'
                      AND tginitdeferred) THEN
        DROP TRIGGER invoices_audit ON billing.invoices;
        CREATE CONSTRAINT TRIGGER invoices_audit AFTER INSERT ON billing.invoices
            DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW EXECUTE FUNCTION billing._audit_invoice();
    END IF;
    -- adjustments and usage corrections: audited row by row on Citus (the
    -- set-based append of one node reads and writes many chains at once)
    IF EXISTS (SELECT 1 FROM pg_trigger
                WHERE tgrelid = 'billing.adjustments'::regclass AND tgname = 'adjustments_audit'
                  AND tgnewtable IS NOT NULL) THEN
        DROP TRIGGER adjustments_audit ON billing.adjustments;
        CREATE TRIGGER adjustments_audit AFTER INSERT ON billing.adjustments
            FOR EACH ROW EXECUTE FUNCTION billing._audit_insert('adjust', 'adjustment', 'adjustment_id');
        DROP TRIGGER usage_corrections_audit ON billing.usage_corrections;
        CREATE TRIGGER usage_corrections_audit AFTER INSERT ON billing.usage_corrections
            FOR EACH ROW EXECUTE FUNCTION billing._audit_insert('correct', 'usage_correction', 'correction_id');
    END IF;

    -- foreign keys between tables not yet converted: drop now, add back
    -- once both sides are Citus tables (Citus converts only whole graphs)
    FOR fk IN
        SELECT format('billing.%I', r.relname) AS rel, c.conname, pg_get_constraintdef(c.oid) AS def
          FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid
         WHERE c.contype = 'f' AND r.relnamespace = 'billing'::regnamespace
           AND (billing._citus_table_kind(c.conrelid) IS NULL
                OR billing._citus_table_kind(c.confrelid) IS NULL)
         ORDER BY r.relname, c.conname
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', fk.rel, fk.conname);
        -- the workers' copies of the extension's tables become the shells
        PERFORM run_command_on_workers(
            format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I', fk.rel, fk.conname));
        fks := fks || format('ALTER TABLE %s ADD CONSTRAINT %I %s', fk.rel, fk.conname, fk.def);
    END LOOP;

    -- tables: accounts first (the co-location group), reference tables next
    FOR t IN
        SELECT c.oid::regclass AS rel, c.relname,
               EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = c.oid AND a.attname = 'account_id'
                          AND a.attnum > 0 AND NOT a.attisdropped) AS per_account
          FROM pg_class c
         WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r'
           AND NOT c.relispartition
         ORDER BY c.relname <> 'accounts', 3, c.relname
    LOOP
        kind := billing._citus_table_kind(t.rel);
        IF t.relname = 'metered_tables' THEN
            -- metered_tables holds regclass values, which differ per node
            object := t.rel::text;
            distribution := 'local (coordinator)';
            changed := false;
            RETURN NEXT;
            CONTINUE;
        END IF;
        changed := kind IS NULL;
        IF kind IS NULL THEN
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', t.rel) INTO had_rows;
            IF t.per_account THEN
                PERFORM create_distributed_table(t.rel, 'account_id',
                    colocate_with => CASE WHEN t.relname = 'accounts' THEN 'default'
                                          ELSE 'billing.accounts' END);
            ELSE
                PERFORM create_reference_table(t.rel);
            END IF;
            IF had_rows THEN
                emptied := emptied || t.rel;
            END IF;
        ELSIF t.per_account AND (kind <> 'distributed'
              OR NOT EXISTS (SELECT 1 FROM pg_dist_partition p, pg_dist_partition a
                              WHERE p.logicalrelid = t.rel
                                AND a.logicalrelid = 'billing.accounts'::regclass
                                AND p.colocationid = a.colocationid
                                AND p.partkey IS NOT NULL
                                AND column_to_column_name(p.logicalrelid, p.partkey) = 'account_id')) THEN
            RAISE EXCEPTION 'table % is a Citus table, but not distributed by account_id with billing.accounts', t.rel
                USING ERRCODE = '55000',
                      HINT = 'Undistribute it (undistribute_table) and run billing.distribute() again.';
        ELSIF NOT t.per_account AND kind <> 'reference' THEN
            RAISE EXCEPTION 'table % is a Citus table, but not a reference table', t.rel
                USING ERRCODE = '55000',
                      HINT = 'Undistribute it (undistribute_table) and run billing.distribute() again.';
        END IF;
        object := t.rel::text;
        distribution := CASE WHEN t.per_account THEN 'distributed by account_id'
                             ELSE 'reference' END;
        RETURN NEXT;
    END LOOP;

    FOREACH object IN ARRAY fks LOOP
        EXECUTE object;
    END LOOP;

    -- the data now lives in the shards; empty the coordinator's copies
    -- (without firing the immutability triggers of invoices: nothing is
    -- deleted, only moved)
    IF array_length(emptied, 1) > 0 THEN
        PERFORM set_config('session_replication_role', 'replica', true);
        FOREACH rel IN ARRAY emptied LOOP
            PERFORM truncate_local_data_after_distributing_table(rel);
        END LOOP;
        PERFORM set_config('session_replication_role', 'origin', true);
    END IF;

    -- functions: a call runs where its account is
    FOR f IN SELECT * FROM billing._distributed_functions() LOOP
        changed := NOT EXISTS (SELECT 1 FROM pg_dist_object o
                                WHERE o.classid = 'pg_proc'::regclass AND o.objid = f.fn
                                  AND o.distribution_argument_index IS NOT NULL);
        IF changed THEN
            PERFORM create_distributed_function(f.fn, f.account_arg,
                                                colocate_with => 'billing.accounts');
        END IF;
        object := f.fn::text;
        distribution := format('runs on the node of account %s', f.account_arg);
        RETURN NEXT;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing.distribute() IS
    'On a Citus coordinator: distributes the per-account tables by account_id (co-located), makes the catalog tables reference tables and runs the per-account functions where their account is; idempotent';

REVOKE ALL ON FUNCTION billing.distribute() FROM PUBLIC;
