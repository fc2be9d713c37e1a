-- billing 1.0 -> 1.1 upgrade script, written by hand.
--
-- Every change to the SQL objects made after 1.0 is released goes here as
-- well as into the parts under sql/install/ (which assemble the fresh 1.1
-- script).  The upgrade test (test/upgrade/run.sh) installs the frozen
-- sql/billing--1.0.sql, feeds it a history, runs ALTER EXTENSION billing
-- UPDATE and compares the catalog and the data with a fresh 1.1 install.
-- After writing a section, run `make check-upgrade` (or, against a running
-- cluster, `bash test/upgrade/run.sh --schema`): it prints every difference
-- between 1.0 + this script and a fresh install, object by object.  What it
-- usually finds:
--   - a new function is executable by PUBLIC (the fresh install revokes
--     that in 99_roles.sql): REVOKE it here and GRANT what 99_roles grants;
--   - CREATE OR REPLACE FUNCTION resets SECURITY DEFINER and SET clauses
--     to what the statement says: repeat the ALTER FUNCTION of 99_roles;
--   - ALTER TABLE ADD COLUMN puts the column last: put it last in the
--     CREATE TABLE of sql/install too (column order is compared);
--   - a new table or sequence needs its pg_extension_config_dump, its
--     grants and its COMMENT here as in the fresh install.
-- DDL on a table 1.0 created (ALTER TABLE, CREATE/DROP TRIGGER or INDEX,
-- COMMENT) goes through billing._update_ddl (created below), so that the
-- update also runs on a database 1.0's distribute() spread over Citus
-- (test/citus/run.sh updates one); a query of the billing tables outside a
-- function body runs on the coordinator only (see the period-width WARNING
-- of issue 13, defect 8).
\echo Use "ALTER EXTENSION billing UPDATE TO '1.1'" to load this file. \quit

-- ---- DDL on the tables 1.0 created (issue 15: the update of a database on Citus) ---------
-- billing._update_ddl (sql/install/00_helpers.sql) runs DDL on a table
-- 1.0 created and, when Citus holds the table (1.0's distribute() ran), on
-- the shard placements this node holds, with Citus's propagation off:
-- Citus would pass the statement on with this whole script as its text,
-- and the workers' copies would name functions the workers do not have
-- yet.  Citus runs the update on the coordinator and then on each worker
-- (ALTER EXTENSION is passed on), so each node changes its own copy of
-- every Citus table and its own shards.  Used for every such statement
-- below.
CREATE FUNCTION billing._update_ddl(tbl regclass, cmds text[]) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    c text;
    shard bigint;
    shards bigint[] := '{}';
    propagation text := current_setting('citus.enable_ddl_propagation', true);
BEGIN
    IF billing._citus_table_kind(tbl) IS NOT NULL THEN
        EXECUTE 'SELECT coalesce(array_agg(s.shardid ORDER BY s.shardid), ''{}'')
                   FROM pg_dist_shard s JOIN pg_dist_placement p ON p.shardid = s.shardid
                  WHERE s.logicalrelid = $1
                    AND p.groupid = (SELECT l.groupid FROM pg_dist_local_group l)'
           INTO shards USING tbl;
        PERFORM set_config('citus.enable_ddl_propagation', 'off', true);
    END IF;
    FOREACH c IN ARRAY cmds LOOP
        EXECUTE c;
        FOREACH shard IN ARRAY shards LOOP
            CONTINUE WHEN c ~* '^\s*COMMENT';     -- comments stay on the table
            PERFORM worker_apply_shard_ddl_command(shard, 'billing', c);
        END LOOP;
    END LOOP;
    IF billing._citus_table_kind(tbl) IS NOT NULL THEN
        PERFORM set_config('citus.enable_ddl_propagation', propagation, true);
    END IF;
END
$$;
COMMENT ON FUNCTION billing._update_ddl(regclass, text[]) IS
    'Internal, for upgrade scripts: DDL on a table and, on Citus, on the shard placements this node holds';
REVOKE ALL ON FUNCTION billing._update_ddl(regclass, text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._update_ddl(regclass, text[]) TO billing_reader;

-- ---- issue 13, defect 1: verify_invoices rates lines on its own -------------------------
-- billing._rate_check: rate() without a cache and without the fast path,
-- for the checker; _verify_invoices calls it instead of billing.rate.
CREATE FUNCTION billing._rate_check(p billing.price, quantity pg_catalog.numeric)
    RETURNS pg_catalog.numeric
    AS 'MODULE_PATHNAME', 'billing_rate_check'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._rate_check(billing.price, pg_catalog.numeric) IS
    'Internal, for verify_invoices: rate() without any cache (the price decoded on every call) on the numeric path only';
REVOKE ALL ON FUNCTION billing._rate_check(billing.price, pg_catalog.numeric) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._rate_check(billing.price, pg_catalog.numeric) TO billing_reader;

CREATE OR REPLACE FUNCTION billing._verify_invoices(p_account bigint)
    RETURNS TABLE (r_account_id bigint, r_invoice_id bigint, r_line_no int, r_problem text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN QUERY
    SELECT i.account_id, i.invoice_id, NULL::int,
           format('total %s is not the sum of the lines (%s)', i.total, coalesce(l.s, 0))
      FROM billing.invoices i
           LEFT JOIN LATERAL (SELECT sum(x.amount) AS s FROM billing.invoice_lines x
                               WHERE x.account_id = i.account_id AND x.invoice_id = i.invoice_id) l ON true
     WHERE (p_account IS NULL OR i.account_id = p_account) AND i.total IS DISTINCT FROM coalesce(l.s, 0)
    UNION ALL
    SELECT x.account_id, x.invoice_id, x.line_no,
           format('%s line rates %s to %s, not %s', x.kind, coalesce(x.quantity, 0),
                  billing.round_money(billing._rate_check(x.price, coalesce(x.quantity, 0)), i.currency),
                  x.amount)
      FROM billing.invoice_lines x
           JOIN billing.invoices i ON i.account_id = x.account_id AND i.invoice_id = x.invoice_id
     WHERE (p_account IS NULL OR x.account_id = p_account) AND x.kind IN ('usage', 'fixed')
       AND (x.price IS NULL
            OR billing.round_money(billing._rate_check(x.price, coalesce(x.quantity, 0)), i.currency) <> x.amount)
    ORDER BY 1, 2, 3;
END
$$;

-- ---- issue 13, defect 7: error style (price binary input, _rollup_totals) ---------------
-- price_recv raises 22P03 (invalid binary representation); a set-returning
-- function is STRICT rather than returning a NULL row.
COMMENT ON FUNCTION billing.price_recv(pg_catalog.internal) IS
    'Binary input of billing.price: format version byte 1, then the text form; bad bytes raise 22P03';
ALTER FUNCTION billing._rollup_totals(bigint[], timestamptz[], timestamptz[], text[], text[]) STRICT;

-- ---- issue 18, part 1: the price modifier per N [round up | round down | exact] ---------
-- The type, its I/O functions and price_from_stripe are C (one billing.so):
-- only their comments change.  remaining() finds the stretches of a volume
-- price in raw units when a per modifier converts them, and bisects inside
-- the first stretch whose last whole unit breaks the budget.
COMMENT ON TYPE billing.price IS
    'A pricing rule: unit, package, graduated, volume, flat or percent, with optional free/min/max/per; e.g. ''graduated 5000 @ 0 | inf @ 0.0002 + 10 min 25'', ''unit 0.25 per 1000000000''';
COMMENT ON FUNCTION billing.price_recv(pg_catalog.internal) IS
    'Binary input of billing.price: format version byte 1 (no per modifier) or 2, then the text form; bad bytes raise 22P03';
COMMENT ON FUNCTION billing.price_send(billing.price) IS
    'Binary output of billing.price: format version byte 1 (2 for a price with a per modifier), then the canonical text';
COMMENT ON FUNCTION billing.price_from_stripe(pg_catalog.jsonb) IS
    'The price of a Stripe Price object (per_unit or tiered graduated/volume; transform_quantity becomes per), minor units converted to major; bad objects raise 22023';

CREATE OR REPLACE FUNCTION billing.remaining(account_id bigint, meter text,
                                  at timestamptz DEFAULT pg_catalog.now())
    RETURNS numeric
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    per record;
    line record;
    others numeric;
    budget numeric;
    q0 numeric;
    j jsonb;
    ends numeric[];
    seg_end numeric;
    lo numeric := 0;          -- largest x known to fit
    hi numeric;               -- smallest x known not to fit
    mid numeric;
BEGIN
    IF account_id IS NULL OR meter IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'remaining: account_id, meter and at must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.accounts a WHERE a.account_id = remaining.account_id) THEN
        RAISE EXCEPTION 'account % does not exist', remaining.account_id USING ERRCODE = '23503';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.meters m WHERE m.meter = remaining.meter) THEN
        RAISE EXCEPTION 'meter "%" does not exist', remaining.meter USING ERRCODE = '23503';
    END IF;
    SELECT * INTO per FROM billing._period_at(remaining.account_id, at);
    IF per.plan IS NULL THEN
        RETURN 0;                 -- no subscription: nothing can be billed
    END IF;
    IF per.spend_cap IS NULL THEN
        RETURN NULL;              -- no cap: unlimited
    END IF;

    SELECT l.quantity, l.price, l.amount INTO line
      FROM billing._rate_period(remaining.account_id, per.plan, per.currency, per.spend_cap,
                                per.period_start, per.period_end) l
     WHERE l.kind = 'usage' AND l.meter = remaining.meter;
    IF NOT FOUND THEN
        RETURN NULL;              -- the plan does not bill this meter
    END IF;
    SELECT coalesce(sum(l.amount), 0) INTO others
      FROM billing._rate_period(remaining.account_id, per.plan, per.currency, per.spend_cap,
                                per.period_start, per.period_end) l
     WHERE l.kind = 'usage' AND l.meter <> remaining.meter;
    budget := billing.round_money(per.spend_cap, per.currency) - others;
    q0 := line.quantity;
    IF NOT billing._fits(line.price, q0, per.currency, budget) THEN
        RETURN 0;
    END IF;

    -- stretches on which the charge cannot decrease: volume tiers, then the
    -- rest.  A tier ends where the quantity after per and free passes its
    -- bound b: at (b + free) * N for per N exact (or no per), at
    -- floor(b + free) * N for round up; for round down the stretch is open
    -- at (floor(b + free) + 1) * N, so it ends at the last whole unit from
    -- q0 before that.
    j := billing.price_to_jsonb(line.price);
    IF j ->> 'model' = 'volume' THEN
        SELECT array_agg(CASE WHEN NOT j ? 'per' OR j ->> 'per_round' = 'exact'
                                  THEN (b + f) * coalesce((j ->> 'per')::numeric, 1)
                              WHEN j ->> 'per_round' = 'up'
                                  THEN floor(b + f) * (j ->> 'per')::numeric
                              ELSE q0 + ceil((floor(b + f) + 1) * (j ->> 'per')::numeric - q0) - 1
                         END ORDER BY b)
          INTO ends
          FROM jsonb_array_elements(j -> 'tiers') t,
               LATERAL (SELECT (t ->> 'up_to')::numeric AS b,
                               coalesce((j ->> 'free')::numeric, 0) AS f) x
         WHERE t ->> 'up_to' <> 'inf';
    END IF;
    -- Whole units from q0 only: in each stretch, its last whole unit; when
    -- that is over the budget, the answer is in this stretch, where the
    -- charge cannot decrease, so bisect (lo, hi]; else go on to the next.
    FOREACH seg_end IN ARRAY coalesce(ends, '{}'::numeric[]) LOOP
        CONTINUE WHEN floor(seg_end - q0) <= lo;
        IF billing._fits(line.price, q0 + floor(seg_end - q0), per.currency, budget) THEN
            lo := floor(seg_end - q0);
        ELSE
            hi := floor(seg_end - q0);
            EXIT;
        END IF;
    END LOOP;
    IF hi IS NULL THEN
        -- open-ended: double until over the budget (or give up: never over it)
        hi := greatest(lo * 2, 1);
        WHILE billing._fits(line.price, q0 + hi, per.currency, budget) LOOP
            lo := hi;
            IF hi > 1e30 THEN
                RETURN NULL;      -- capped price: the budget is never exceeded
            END IF;
            hi := hi * 2;
        END LOOP;
    END IF;
    WHILE hi - lo > 1 LOOP
        mid := floor((lo + hi) / 2);
        IF billing._fits(line.price, q0 + mid, per.currency, budget) THEN
            lo := mid;
        ELSE
            hi := mid;
        END IF;
    END LOOP;
    RETURN lo;
END
$$;

-- ---- issue 16 part 4: the maintenance worker (sql/install/80_maintenance.sql) ----

CREATE FUNCTION billing._maintenance_status()
    RETURNS TABLE (job text, worker_pid integer, next_run timestamptz, last_run timestamptz,
                   last_duration interval, last_result text, last_value bigint,
                   last_error text, last_success timestamptz, runs bigint, failures bigint)
    AS 'MODULE_PATHNAME', 'billing_maintenance_status'
    LANGUAGE C VOLATILE STRICT ROWS 3;
COMMENT ON FUNCTION billing._maintenance_status() IS
    'Internal: what the maintenance worker of this database last did, per job (read through billing.maintenance_status)';

CREATE VIEW billing.maintenance_status AS
    SELECT s.job, s.worker_pid, s.next_run, s.last_run, s.last_duration, s.last_result,
           s.last_value, s.last_error, s.last_success, s.runs, s.failures
      FROM billing._maintenance_status() s;
COMMENT ON VIEW billing.maintenance_status IS
    'One row per maintenance job (compact_usage, purge_dedupe, finalize_invoices): the worker of this database, its next run, and the last run''s start, duration, result (ok, error, running, skipped, off), returned value and error; since the server started';

CREATE FUNCTION billing._maintenance_runs_here(job text) RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grp integer;
BEGIN
    IF billing._citus_table_kind('billing.usage_deltas') IS NULL THEN
        RETURN true;
    END IF;
    EXECUTE 'SELECT groupid FROM pg_catalog.pg_dist_local_group' INTO grp;
    RETURN grp = 0;
END
$$;
COMMENT ON FUNCTION billing._maintenance_runs_here(text) IS
    'Internal: whether the maintenance worker of this node runs job (on Citus: the coordinator only)';

-- the grants 99_roles.sql gives a fresh install: internal read-only helpers
-- and every view to billing_reader, nothing to PUBLIC
REVOKE ALL ON FUNCTION billing._maintenance_status() FROM PUBLIC;
REVOKE ALL ON FUNCTION billing._maintenance_runs_here(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._maintenance_status(), billing._maintenance_runs_here(text)
    TO billing_reader;
GRANT SELECT ON billing.maintenance_status TO billing_reader;

-- ---- issue 13, defect 3: no setting a session can change skips a guard ----
-- 1.0 skipped the guards of meters, plans and charges when application_name
-- looked like a Citus task (billing._in_citus_task), which any session can
-- SET.  The guards now always run; on Citus each node's copy of a reference
-- table checks the rows of its own node (billing._exists_here).
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
REVOKE ALL ON FUNCTION billing._exists_here(regclass, text, anyelement) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._exists_here(regclass, text, anyelement) TO billing_reader;

CREATE OR REPLACE FUNCTION billing._meters_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF (TG_OP = 'DELETE' OR NEW.aggregation IS DISTINCT FROM OLD.aggregation
        OR NEW.bucket_width IS DISTINCT FROM OLD.bucket_width
        OR NEW.meter IS DISTINCT FROM OLD.meter)
       AND (billing._exists_here('billing.usage_buckets', 'x.meter = $1', OLD.meter::text)
            OR billing._exists_here('billing.usage_deltas',
                   'EXISTS (SELECT 1 FROM billing._delta_cells(x.cells) c WHERE c.meter = $1)',
                   OLD.meter::text)) THEN
        RAISE EXCEPTION 'meter "%" has usage', OLD.meter
            USING ERRCODE = '55000',
                  DETAIL = 'Its name, aggregation and bucket width cannot change, nor can it be deleted, once usage was counted.',
                  HINT = 'Create a new meter instead.';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;

CREATE OR REPLACE FUNCTION billing._meters_truncate_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF billing._exists_here('billing.usage_buckets', 'true', NULL::text)
       OR billing._exists_here('billing.usage_deltas', 'true', NULL::text) THEN
        RAISE EXCEPTION 'meters have usage'
            USING ERRCODE = '55000',
                  DETAIL = 'billing.meters cannot be truncated once usage was counted.';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION billing._charges_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    -- on Citus each node's copy checks the lines of that node (_exists_here)
    IF billing._exists_here('billing.invoice_lines', 'x.charge_id = $1', OLD.charge_id) THEN
        RAISE EXCEPTION 'charge version % rated a finalized invoice', OLD.charge_id
            USING ERRCODE = '55000',
                  HINT = 'Insert a new version with a later (or, to re-rate the past, an earlier) valid_from.';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;

CREATE OR REPLACE FUNCTION billing._plans_check() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    -- on Citus each node's copy checks the subscriptions of that node (_exists_here)
    IF (NEW.currency IS DISTINCT FROM OLD.currency OR NEW.period IS DISTINCT FROM OLD.period)
       AND billing._exists_here('billing.subscriptions', 'x.plan = $1', OLD.plan::text) THEN
        RAISE EXCEPTION 'plan "%" has subscriptions', OLD.plan
            USING ERRCODE = '55000',
                  DETAIL = 'Its currency and period cannot change; create a new plan instead.';
    END IF;
    RETURN NEW;
END
$$;

DROP FUNCTION billing._in_citus_task();

-- ---- issue 13, defect 5: one _rerate_diff for one node and for Citus ----
-- _rerate_diff_citus had drifted from _rerate_diff (a usage line missing on
-- one side had a NULL quantity in adjustments where one node wrote 0); one
-- body now serves both.
/*
 * _rerate_diff: for each finalized invoice overlapping [from_ts, to_ts) (of
 * one account or all), what its lines should be today, what was billed
 * (the line plus the adjustments already recorded for it), and the
 * difference.  Lines are matched by kind and meter (usage), description
 * (fixed fees) or kind alone (the spend cap); a usage line missing on one
 * side counts 0 units there.
 *
 * One body for one node and for Citus (1.0 had a Citus twin, which
 * drifted): each step is its own statement, and the statements that rate
 * (_rate_periods, which reads distributed tables itself) and compare read
 * no table, as Citus requires.  The steps pass arrays, element k of each
 * describing line or invoice k.
 */
CREATE OR REPLACE FUNCTION billing._rerate_diff(from_ts timestamptz, to_ts timestamptz, p_account bigint)
    RETURNS TABLE (account_id bigint, invoice_id bigint, line_kind text, meter text,
                   description text, billed_quantity numeric, billed_amount numeric,
                   correct_quantity numeric, correct_amount numeric, delta numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
DECLARE
    inv record;     -- the invoices, and today's bounds of the periods still covered
    cor record;     -- today's lines
    bil record;     -- the lines billed
    adj record;     -- the adjustments made since
BEGIN
    -- 1. the invoices; a period the subscription no longer covers bills nothing
    SELECT array_agg(x.account_id ORDER BY x.account_id, x.invoice_id) AS accounts,
           array_agg(x.invoice_id ORDER BY x.account_id, x.invoice_id) AS invoices,
           array_agg(x.account_id ORDER BY x.account_id, x.invoice_id) FILTER (WHERE x.covered) AS c_accounts,
           array_agg(x.invoice_id ORDER BY x.account_id, x.invoice_id) FILTER (WHERE x.covered) AS c_invoices,
           array_agg(x.plan ORDER BY x.account_id, x.invoice_id) FILTER (WHERE x.covered) AS c_plans,
           array_agg(x.currency ORDER BY x.account_id, x.invoice_id) FILTER (WHERE x.covered) AS c_currencies,
           array_agg(x.spend_cap ORDER BY x.account_id, x.invoice_id) FILTER (WHERE x.covered) AS c_caps,
           array_agg(x.period_start ORDER BY x.account_id, x.invoice_id) FILTER (WHERE x.covered) AS c_starts,
           array_agg(x.pe ORDER BY x.account_id, x.invoice_id) FILTER (WHERE x.covered) AS c_ends
      INTO inv
      FROM (SELECT i.account_id, i.invoice_id, i.plan, i.currency, i.period_start, s.spend_cap,
                   s.starts_at IS NOT NULL AS covered,
                   LEAST(billing._add_periods(s.starts_at, p.period,
                             billing._period_index(s.starts_at, p.period, i.period_start) + 1),
                         s.ends_at) AS pe
              FROM billing.invoices i
                   JOIN billing.plans p ON p.plan = i.plan
                   LEFT JOIN billing.subscriptions s
                          ON s.account_id = i.account_id AND s.plan = i.plan
                         AND s.starts_at <= i.period_start
                         AND i.period_start < coalesce(s.ends_at, 'infinity')
             WHERE i.status = 'finalized'
               AND i.period_start < to_ts AND i.period_end > from_ts
               AND (p_account IS NULL OR i.account_id = p_account)) x;
    IF inv.accounts IS NULL THEN
        RETURN;
    END IF;
    -- 2. today's lines, all periods in one set-based rating
    SELECT array_agg(r.idx ORDER BY r.idx, r.ord) AS ks, array_agg(r.kind ORDER BY r.idx, r.ord) AS kinds,
           array_agg(r.meter ORDER BY r.idx, r.ord) AS meters,
           array_agg(r.description ORDER BY r.idx, r.ord) AS descriptions,
           array_agg(r.quantity ORDER BY r.idx, r.ord) AS quantities,
           array_agg(r.amount ORDER BY r.idx, r.ord) AS amounts
      INTO cor
      FROM billing._rate_periods(inv.c_accounts, inv.c_plans, inv.c_currencies, inv.c_caps,
                                 inv.c_starts, inv.c_ends) r;
    -- 3. what was billed: the lines, and the adjustments made since
    SELECT array_agg(l.account_id) AS accounts, array_agg(l.invoice_id) AS invoices,
           array_agg(l.kind) AS kinds, array_agg(l.meter::text) AS meters,
           array_agg(l.description) AS descriptions, array_agg(l.quantity) AS quantities,
           array_agg(l.amount) AS amounts
      INTO bil
      FROM unnest(inv.accounts, inv.invoices) v(account_id, invoice_id)
           JOIN billing.invoice_lines l
             ON l.account_id = v.account_id AND l.invoice_id = v.invoice_id
     WHERE l.kind <> 'adjustment';
    SELECT array_agg(a.account_id) AS accounts, array_agg(a.invoice_id) AS invoices,
           array_agg(a.line_kind) AS kinds, array_agg(a.meter::text) AS meters,
           array_agg(a.description) AS descriptions,
           array_agg(a.new_quantity - a.old_quantity) AS quantities, array_agg(a.delta) AS amounts
      INTO adj
      FROM unnest(inv.accounts, inv.invoices) v(account_id, invoice_id)
           JOIN billing.adjustments a
             ON a.account_id = v.account_id AND a.invoice_id = v.invoice_id;
    -- 4. compare (reads no table)
    RETURN QUERY
    WITH correct AS (
        SELECT inv.c_accounts[u.k] AS account_id, inv.c_invoices[u.k] AS invoice_id, u.kind,
               u.meter, u.description, u.quantity, u.amount
          FROM unnest(cor.ks, cor.kinds, cor.meters, cor.descriptions, cor.quantities, cor.amounts)
                   AS u(k, kind, meter, description, quantity, amount)
    ), billed AS (
        SELECT * FROM unnest(bil.accounts, bil.invoices, bil.kinds, bil.meters, bil.descriptions,
                             bil.quantities, bil.amounts)
                          AS b(account_id, invoice_id, kind, meter, description, quantity, amount)
        UNION ALL
        SELECT * FROM unnest(adj.accounts, adj.invoices, adj.kinds, adj.meters, adj.descriptions,
                             adj.quantities, adj.amounts)
                          AS b(account_id, invoice_id, kind, meter, description, quantity, amount)
    ), billed_sum AS (
        SELECT b.account_id, b.invoice_id, b.kind, b.meter,
               CASE WHEN b.kind = 'fixed' THEN b.description END AS fixed_key,
               max(b.description) AS description,
               sum(b.quantity) AS quantity, sum(b.amount) AS amount
          FROM billed b
         GROUP BY 1, 2, 3, 4, 5
    )
    SELECT coalesce(c.account_id, b.account_id), coalesce(c.invoice_id, b.invoice_id),
           coalesce(c.kind, b.kind), coalesce(c.meter, b.meter),
           coalesce(c.description, b.description),
           -- a usage line missing on either side billed or should bill 0 units
           CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(b.quantity, 0) ELSE b.quantity END,
           coalesce(b.amount, 0),
           CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(c.quantity, 0) ELSE c.quantity END,
           coalesce(c.amount, 0),
           coalesce(c.amount, 0) - coalesce(b.amount, 0)
      FROM correct c
           FULL JOIN billed_sum b
                  ON b.account_id = c.account_id AND b.invoice_id = c.invoice_id
                 AND b.kind = c.kind
                 AND b.meter IS NOT DISTINCT FROM c.meter
                 AND b.fixed_key IS NOT DISTINCT FROM CASE WHEN c.kind = 'fixed' THEN c.description END;
END
$$;

DROP FUNCTION billing._rerate_diff_citus(timestamptz, timestamptz, bigint);

-- ---------------------------------------------------------------------------
-- issue 13, defect 9: finalize_invoices never finalizes a period that ends
-- after now() - grace_period, whatever as_of says; remaining() returns the
-- number for caps of any size (NULL only when the cap can never bind); one
-- documented limit on usage quantities (|q| < 10^1000, at most 1000 digits
-- after the point, 22023), also for correct_usage.
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION billing._finalize(p_as_of timestamptz)
    RETURNS TABLE (r_invoice_id bigint, r_account_id bigint, r_period_start timestamptz,
                   r_period_end timestamptz, r_total numeric)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
DECLARE
    cutoff timestamptz;
BEGIN
    IF p_as_of IS NULL THEN
        RAISE EXCEPTION 'finalize_invoices: as_of must not be null' USING ERRCODE = '22004';
    END IF;
    -- never a period that ends after now() - grace, whatever as_of says
    -- (a future or infinite as_of would finalize periods still open)
    cutoff := LEAST(p_as_of, pg_catalog.now()) - billing._grace_period();
    -- on Citus these statements may not call functions that read the
    -- shards: the same invoices, one period at a time (90_distribute.sql)
    IF billing._citus_table_kind('billing.invoices') IS NOT NULL THEN
        RETURN QUERY SELECT * FROM billing._finalize_citus(cutoff);
        RETURN;
    END IF;
    PERFORM 1 FROM billing.accounts a
     WHERE a.account_id IN (SELECT d.account_id FROM billing._due_periods(cutoff) d)
     ORDER BY a.account_id
       FOR NO KEY UPDATE;

    RETURN QUERY
    WITH due AS (
        SELECT d.*, nextval('billing.invoice_id_seq') AS invoice_id,
               (row_number() OVER (ORDER BY d.account_id, d.period_start))::integer AS k,
               row_number() OVER (PARTITION BY d.account_id ORDER BY d.period_start) = 1 AS first_of_account
          FROM billing._due_periods(cutoff) d
    ), arrays AS (
        SELECT array_agg(account_id ORDER BY k) AS accounts, array_agg(plan ORDER BY k) AS plans,
               array_agg(currency ORDER BY k) AS currencies, array_agg(spend_cap ORDER BY k) AS caps,
               array_agg(period_start ORDER BY k) AS starts, array_agg(period_end ORDER BY k) AS ends
          FROM due
    ), rated AS (
        SELECT due.account_id, due.invoice_id, r.ord::bigint AS ord, r.kind, r.meter,
               r.description, r.quantity, r.amount, r.unrounded_amount, r.charge_id, r.price,
               NULL::bigint AS adjustment_id
          FROM arrays a,
               LATERAL billing._rate_periods(a.accounts, a.plans, a.currencies, a.caps,
                                             a.starts, a.ends) r
               JOIN due ON due.k = r.idx
        UNION ALL
        SELECT due.account_id, due.invoice_id,
               1000000 + row_number() OVER (PARTITION BY adj.account_id ORDER BY adj.adjustment_id),
               'adjustment', adj.meter,
               billing._adjustment_text(adj),
               adj.new_quantity - adj.old_quantity, adj.delta, NULL, NULL, NULL, adj.adjustment_id
          FROM due JOIN billing.adjustments adj
                 ON adj.account_id = due.account_id AND adj.billed_invoice_id IS NULL
         WHERE due.first_of_account
    ), numbered AS (
        SELECT r.*, (row_number() OVER (PARTITION BY r.invoice_id ORDER BY r.ord))::integer AS line_no
          FROM rated r
    ), totals AS (
        SELECT n.invoice_id, sum(n.amount) AS total FROM numbered n GROUP BY n.invoice_id
    ), invoices_written AS (
        INSERT INTO billing.invoices (account_id, invoice_id, plan, period_start, period_end,
                                      currency, total)
        SELECT due.account_id, due.invoice_id, due.plan, due.period_start, due.period_end,
               due.currency, coalesce(t.total, 0)
          FROM due LEFT JOIN totals t ON t.invoice_id = due.invoice_id
        RETURNING billing.invoices.invoice_id, billing.invoices.account_id,
                  billing.invoices.period_start, billing.invoices.period_end,
                  billing.invoices.total
    ), lines_written AS (
        INSERT INTO billing.invoice_lines (account_id, invoice_id, line_no, kind, meter,
                                          description, quantity, amount, unrounded_amount,
                                          charge_id, price, adjustment_id)
        SELECT n.account_id, n.invoice_id, n.line_no, n.kind, n.meter, n.description, n.quantity,
               n.amount, n.unrounded_amount, n.charge_id, n.price, n.adjustment_id
          FROM numbered n
        RETURNING billing.invoice_lines.account_id, billing.invoice_lines.invoice_id,
                  billing.invoice_lines.adjustment_id
    ), carried AS (
        UPDATE billing.adjustments adj SET billed_invoice_id = w.invoice_id
          FROM lines_written w
         WHERE w.adjustment_id IS NOT NULL AND adj.account_id = w.account_id
           AND adj.adjustment_id = w.adjustment_id
        RETURNING 1
    )
    SELECT w.invoice_id, w.account_id, w.period_start, w.period_end, w.total
      FROM invoices_written w
     ORDER BY w.account_id, w.period_start;
END
$$;
COMMENT ON FUNCTION billing._finalize(timestamptz) IS 'Internal: the body of finalize_invoices';

CREATE OR REPLACE FUNCTION billing.remaining(account_id bigint, meter text,
                                  at timestamptz DEFAULT pg_catalog.now())
    RETURNS numeric
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    per record;
    line record;
    others numeric;
    budget numeric;
    q0 numeric;
    j jsonb;
    ends numeric[];
    seg_end numeric;
    lo numeric := 0;          -- largest x known to fit
    hi numeric;               -- smallest x known not to fit
    mid numeric;
    tail numeric;             -- past it, the charge is affine in x
BEGIN
    IF account_id IS NULL OR meter IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'remaining: account_id, meter and at must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.accounts a WHERE a.account_id = remaining.account_id) THEN
        RAISE EXCEPTION 'account % does not exist', remaining.account_id USING ERRCODE = '23503';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.meters m WHERE m.meter = remaining.meter) THEN
        RAISE EXCEPTION 'meter "%" does not exist', remaining.meter USING ERRCODE = '23503';
    END IF;
    SELECT * INTO per FROM billing._period_at(remaining.account_id, at);
    IF per.plan IS NULL THEN
        RETURN 0;                 -- no subscription: nothing can be billed
    END IF;
    IF per.spend_cap IS NULL THEN
        RETURN NULL;              -- no cap: unlimited
    END IF;

    SELECT l.quantity, l.price, l.amount INTO line
      FROM billing._rate_period(remaining.account_id, per.plan, per.currency, per.spend_cap,
                                per.period_start, per.period_end) l
     WHERE l.kind = 'usage' AND l.meter = remaining.meter;
    IF NOT FOUND THEN
        RETURN NULL;              -- the plan does not bill this meter
    END IF;
    SELECT coalesce(sum(l.amount), 0) INTO others
      FROM billing._rate_period(remaining.account_id, per.plan, per.currency, per.spend_cap,
                                per.period_start, per.period_end) l
     WHERE l.kind = 'usage' AND l.meter <> remaining.meter;
    budget := billing.round_money(per.spend_cap, per.currency) - others;
    q0 := line.quantity;
    IF NOT billing._fits(line.price, q0, per.currency, budget) THEN
        RETURN 0;
    END IF;

    -- stretches on which the charge cannot decrease: volume tiers, then the
    -- rest.  A tier ends where the quantity after per and free passes its
    -- bound b: at (b + free) * N for per N exact (or no per), at
    -- floor(b + free) * N for round up; for round down the stretch is open
    -- at (floor(b + free) + 1) * N, so it ends at the last whole unit from
    -- q0 before that.
    j := billing.price_to_jsonb(line.price);
    IF j ->> 'model' = 'volume' THEN
        SELECT array_agg(CASE WHEN NOT j ? 'per' OR j ->> 'per_round' = 'exact'
                                  THEN (b + f) * coalesce((j ->> 'per')::numeric, 1)
                              WHEN j ->> 'per_round' = 'up'
                                  THEN floor(b + f) * (j ->> 'per')::numeric
                              ELSE q0 + ceil((floor(b + f) + 1) * (j ->> 'per')::numeric - q0) - 1
                         END ORDER BY b)
          INTO ends
          FROM jsonb_array_elements(j -> 'tiers') t,
               LATERAL (SELECT (t ->> 'up_to')::numeric AS b,
                               coalesce((j ->> 'free')::numeric, 0) AS f) x
         WHERE t ->> 'up_to' <> 'inf';
    END IF;
    -- Whole units from q0 only: in each stretch, its last whole unit; when
    -- that is over the budget, the answer is in this stretch, where the
    -- charge cannot decrease, so bisect (lo, hi]; else go on to the next.
    FOREACH seg_end IN ARRAY coalesce(ends, '{}'::numeric[]) LOOP
        CONTINUE WHEN floor(seg_end - q0) <= lo;
        IF billing._fits(line.price, q0 + floor(seg_end - q0), per.currency, budget) THEN
            lo := floor(seg_end - q0);
        ELSE
            hi := floor(seg_end - q0);
            EXIT;
        END IF;
    END LOOP;
    IF hi IS NULL THEN
        -- open-ended: double until over the budget, however large it is.
        -- Every point where the charge bends (a tier bound, the free units,
        -- a package size, where a minimum stops applying: at most the
        -- largest number K of the price over its smallest rate, 10^-22 a
        -- unit; times a quantity divisor) lies below tail.  Past it the
        -- charge is affine in the quantity (or a staircase of steps shorter
        -- than tail): the same at x and 2x there, it never grows again.
        SELECT (1 + coalesce(max(n[1]::numeric), 0)) ^ 2 * 1e24 INTO tail
          FROM regexp_matches(billing.price_to_jsonb(line.price)::text, '([0-9]+(\.[0-9]+)?)', 'g') AS n;
        hi := greatest(lo * 2, 1);
        WHILE billing._fits(line.price, q0 + hi, per.currency, budget) LOOP
            IF lo > tail AND billing.rate(line.price, q0 + hi) = billing.rate(line.price, q0 + lo) THEN
                RETURN NULL;      -- the charge stopped growing below the budget
            END IF;
            lo := hi;
            hi := hi * 2;
        END LOOP;
    END IF;
    WHILE hi - lo > 1 LOOP
        mid := floor((lo + hi) / 2);
        IF billing._fits(line.price, q0 + mid, per.currency, budget) THEN
            lo := mid;
        ELSE
            hi := mid;
        END IF;
    END LOOP;
    RETURN lo;
END
$$;
COMMENT ON FUNCTION billing.remaining(bigint, text, timestamptz) IS
    'Whole units of a meter that can still be used this period before the usage lines exceed the spend cap (NULL: unlimited)';

CREATE FUNCTION billing._check_quantity(quantity numeric, meter text, account_id bigint)
    RETURNS void
    LANGUAGE C IMMUTABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'billing_check_quantity_sql';
COMMENT ON FUNCTION billing._check_quantity(numeric, text, bigint) IS
    'Internal: raises 22023 for a usage quantity outside the limit every ingest path applies (|q| < 10^1000, at most 1000 fraction digits)';
REVOKE ALL ON FUNCTION billing._check_quantity(numeric, text, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._check_quantity(numeric, text, bigint) TO billing_reader;

CREATE OR REPLACE FUNCTION billing.correct_usage(account_id bigint, meter text, bucket_start timestamptz,
                                      delta numeric, reason text, dimension text DEFAULT '')
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    m record;
    cur numeric;
BEGIN
    IF account_id IS NULL OR meter IS NULL OR bucket_start IS NULL OR delta IS NULL THEN
        RAISE EXCEPTION 'correct_usage: account_id, meter, bucket_start and delta must not be null'
            USING ERRCODE = '22004';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'a usage correction needs a reason' USING ERRCODE = '22004';
    END IF;
    dimension := coalesce(dimension, '');
    IF octet_length(dimension) > 256 THEN
        RAISE EXCEPTION 'usage dimension is too long'
            USING ERRCODE = '22023', DETAIL = 'A dimension has at most 256 bytes.';
    END IF;
    SELECT * INTO m FROM billing.meters x WHERE x.meter = correct_usage.meter;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'meter "%" does not exist', correct_usage.meter USING ERRCODE = '23503';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.accounts a WHERE a.account_id = correct_usage.account_id) THEN
        RAISE EXCEPTION 'account % does not exist', correct_usage.account_id USING ERRCODE = '23503';
    END IF;
    IF m.aggregation NOT IN ('sum', 'count') THEN
        RAISE EXCEPTION 'meter "%" has aggregation %', m.meter, m.aggregation
            USING ERRCODE = '22023', DETAIL = 'Only sum and count meters take corrections.';
    END IF;
    IF delta IN ('NaN', 'Infinity', '-Infinity') OR NOT isfinite(bucket_start)
       OR date_bin(m.bucket_width, bucket_start, timestamptz '1970-01-01 00:00:00+00') <> bucket_start THEN
        RAISE EXCEPTION 'invalid usage correction'
            USING ERRCODE = '22023',
                  DETAIL = format('delta must be a number and bucket_start the start of a %s bucket.', m.bucket_width);
    END IF;
    PERFORM billing._check_quantity(delta, correct_usage.meter, correct_usage.account_id);
    -- corrections of one bucket one at a time (ingest only adds, so it cannot race below zero)
    PERFORM pg_advisory_xact_lock(1651074162,
        hashtext(format('%s/%s/%s/%s', account_id, meter, dimension, bucket_start)));
    SELECT coalesce(sum(u.quantity), 0) INTO cur
      FROM billing.usage_cells u
     WHERE u.account_id = correct_usage.account_id AND u.meter = correct_usage.meter
       AND u.dimension = correct_usage.dimension AND u.bucket_start = correct_usage.bucket_start;
    IF cur + delta < 0 THEN
        RAISE EXCEPTION 'correction would make the bucket negative'
            USING ERRCODE = '22023',
                  DETAIL = format('The bucket holds %s; the correction is %s.', cur, delta);
    END IF;
    INSERT INTO billing.usage_deltas (account_id, seq, cells)
    VALUES (correct_usage.account_id, NULL,
            billing._delta_pack(ARRAY[correct_usage.meter], ARRAY[correct_usage.dimension],
                                ARRAY[bucket_start], ARRAY[delta], ARRAY[0::bigint], NULL));
    INSERT INTO billing.usage_corrections (account_id, meter, dimension, bucket_start, delta, reason)
    VALUES (correct_usage.account_id, correct_usage.meter, correct_usage.dimension, bucket_start,
            delta, reason);
END
$$;
COMMENT ON FUNCTION billing.correct_usage(bigint, text, timestamptz, numeric, text, text) IS
    'Adds a signed correction to one bucket of a sum or count meter (any age), with a reason; the next rerate bills its effect';
ALTER FUNCTION billing.correct_usage(bigint, text, timestamptz, numeric, text, text) SECURITY DEFINER;

-- ---------------------------------------------------------------------------
-- issue 13, defect 10: purge_dedupe keeps an event id until no report with
-- its timestamp can be accepted any more (late_window + 5 minutes after the
-- claim), whatever dedupe_window says.  Ids claimed under 1.0 are covered
-- as they are (the rule is applied when purging, from the meter's windows).
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION billing.purge_dedupe(as_of timestamptz DEFAULT pg_catalog.now())
    RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    n bigint := 0;
    k bigint;
    m record;
BEGIN
    -- An id is kept until its dedupe window has passed (expires_at, set
    -- when it was claimed c: c + dedupe_window) and until no report with its
    -- timestamp can be accepted any more: a report is stamped at most 5
    -- minutes after c and is accepted until its timestamp + late_window.
    -- So an id goes once c + greatest(dedupe_window, late_window + 5 min)
    -- <= as_of, with the meter's windows as they are now.  One delete per
    -- meter (PL/pgSQL: Citus plans each with constants).
    FOR m IN
        SELECT x.meter,
               as_of - greatest(interval '0', x.late_window + interval '5 minutes' - x.dedupe_window) AS cutoff
          FROM billing.meters x
    LOOP
        DELETE FROM billing.dedupe_keys d WHERE d.meter = m.meter AND d.expires_at <= m.cutoff;
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION billing.purge_dedupe(timestamptz) IS
    'Removes event ids whose dedupe window ended by as_of and for which no report can be accepted any more (late_window + 5 minutes after the claim); returns how many';
ALTER FUNCTION billing.purge_dedupe(timestamptz) SECURITY DEFINER;
SELECT billing._update_ddl('billing.dedupe_keys', ARRAY[
    $ddl$COMMENT ON TABLE billing.dedupe_keys IS
        'Event ids already counted, per (account, meter); kept at least dedupe_window and late_window + 5 minutes, removed by purge_dedupe()'$ddl$
]);
-- ---- issue 19: the audit log for any table (audit_table, unaudit_table) ----------------
-- billing.audit_table and billing.unaudit_table, their triggers
-- (src/audit_table.c), the view billing.audited_tables and the event
-- trigger billing_audit_ddl (sql/install/75_audit_table.sql).  Appending
-- becomes one definition in C (src/audit.c), shared with the extension's
-- own audit triggers: the two append functions of 1.0 are replaced by it.
-- The hash, its encoding and verify_audit_log do not change, so the rows
-- written by 1.0 verify as before and the chains go on from their heads.

/*
 * _audit_append: add a row to the chain of p_chain and bring its head row
 * up to date; returns its seq.  The one definition of an append (C,
 * src/audit.c), shared with the triggers of audited user tables: the
 * chain's head row is locked on the transaction's first append to the
 * chain and stays locked to its end.  Under REPEATABLE READ or
 * SERIALIZABLE a concurrent append to the same chain makes this raise
 * 40001 (retry the transaction).  The caller needs INSERT on audit_log and
 * UPDATE on audit_heads (42501).
 */
CREATE OR REPLACE FUNCTION billing._audit_append(p_chain bigint, p_action text, p_object text,
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
 * head once.  Not on Citus (billing.distribute() puts the row-level
 * triggers back).
 */
CREATE OR REPLACE FUNCTION billing._audit_append_many(p_chains bigint[], p_keys bigint[], p_action text,
                                           p_objects text[], p_details jsonb[])
    RETURNS void
    AS 'MODULE_PATHNAME', 'billing_audit_append_many'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION billing._audit_append_many(bigint[], bigint[], text, text[], jsonb[]) IS
    'Internal: appends many rows to their audit chains in one go (the statement-level audit of adjustments and usage corrections)';

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
 * billing_audit_ddl (ddl_command_end of CREATE TABLE and ALTER TABLE): a
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
        -- partitions detached: their statement triggers go
        FOR d IN SELECT g.tgrelid::regclass AS rel, g.tgname FROM pg_trigger g
                  WHERE g.tgfoid = 'billing._audit_statement()'::regprocedure
                    AND billing._audited_ancestor(g.tgrelid) IS NULL LOOP
            EXECUTE format('DROP TRIGGER %I ON %s', d.tgname, d.rel);
        END LOOP;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._audit_ddl() IS
    'Internal: gives new partitions of audited tables their statement triggers and refuses an ALTER TABLE that switches an audit off';
CREATE EVENT TRIGGER billing_audit_ddl ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
    EXECUTE FUNCTION billing._audit_ddl();

-- privileges (as 99_roles.sql gives them on a fresh install)
REVOKE ALL ON billing.audited_tables FROM PUBLIC;
GRANT SELECT ON billing.audited_tables TO billing_reader;
REVOKE ALL ON FUNCTION
    billing._audit_row(),
    billing._audit_statement(),
    billing._audit_table_note(regclass),
    billing._audit_statement_triggers(regclass),
    billing._audited_ancestor(regclass),
    billing._audit_table_citus(regclass, name),
    billing.audit_table(regclass, name),
    billing.unaudit_table(regclass),
    billing._audit_ddl()
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    billing.audit_table(regclass, name),
    billing.unaudit_table(regclass),
    billing._audit_row(),
    billing._audit_statement(),
    billing._audit_table_note(regclass)
    TO billing_admin;
GRANT EXECUTE ON FUNCTION
    billing._audit_statement_triggers(regclass),
    billing._audited_ancestor(regclass),
    billing._audit_table_citus(regclass, name)
    TO billing_reader;

-- ---- issue 13, defect 8: the buckets of a billing period (sql/install/45_period_buckets.sql) ----
-- Every bucket inside a subscription's span is billed exactly once: the
-- bucket straddling a subscription's start goes to its first period (1.0
-- billed it to no period), every other one to the period holding its start.
-- _rate_periods asks the usage store for [lo, period end) per period and
-- meter (lo: _period_first_bucket).  A plan's period must be a whole
-- multiple of the bucket width of every meter it charges (22023, checked by
-- _period_width_check on charges, subscriptions, plans and meters).  Rows
-- 1.0 created against that rule are kept and go on billing (each bucket
-- once, in the period holding its start); the update names each such
-- (plan, meter) pair in a WARNING and does not fail.
CREATE FUNCTION billing._period_first_bucket(period_start timestamptz, usage_from timestamptz,
                                             bucket_width interval)
    RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'billing_period_first_bucket'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._period_first_bucket(timestamptz, timestamptz, interval) IS
    'Internal: the first bucket start a billing period bills for a meter of this bucket width: the start of the bucket holding period_start when that is at or after usage_from, else period_start (src/periods.c)';

CREATE FUNCTION billing._period_fits_width(period interval, bucket_width interval)
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_period_fits_width'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._period_fits_width(interval, interval) IS
    'Internal: is a plan''s period a whole multiple of a bucket width (a period of months: the width divides a day)?';

/*
 * _period_usage_from: for each (account, period start) given, how far back
 * the period may reach for usage (the usage_from of src/periods.c): the
 * period start itself, unless the period is the first of a subscription
 * (it starts at the subscription's starts_at); then the end of the
 * account's previous subscription, or -infinity when there is none, so
 * that the first period bills the bucket straddling the subscription's
 * start unless the previous subscription's last period holds that
 * bucket's start.  PL/pgSQL: on Citus one router query per period.
 */
CREATE FUNCTION billing._period_usage_from(p_accounts bigint[], p_starts timestamptz[])
    RETURNS TABLE (idx integer, usage_from timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
#variable_conflict use_column
DECLARE
    acc bigint;
    ps timestamptz;
BEGIN
    IF billing._citus_table_kind('billing.subscriptions') IS NOT NULL THEN
        FOR i IN 1 .. coalesce(array_length(p_accounts, 1), 0) LOOP
            acc := p_accounts[i];
            ps := p_starts[i];
            idx := i;
            SELECT CASE WHEN bool_or(s.starts_at = ps)
                        THEN coalesce(max(s.ends_at) FILTER (WHERE s.ends_at <= ps), '-infinity')
                        ELSE ps END
              INTO usage_from
              FROM billing.subscriptions s WHERE s.account_id = acc;
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    -- (two probes of the primary key, the second for first periods only)
    RETURN QUERY
    SELECT x.i::integer,
           CASE WHEN EXISTS (SELECT 1 FROM billing.subscriptions s
                              WHERE s.account_id = x.a AND s.starts_at = x.ps)
                THEN coalesce((SELECT max(s.ends_at) FROM billing.subscriptions s
                                WHERE s.account_id = x.a AND s.ends_at <= x.ps), '-infinity')
                ELSE x.ps END
      FROM unnest(p_accounts, p_starts) WITH ORDINALITY AS x(a, ps, i);
END
$$;
COMMENT ON FUNCTION billing._period_usage_from(bigint[], timestamptz[]) IS
    'Internal: per (account, period start), how far back the period bills usage: the start, or for a subscription''s first period the end of the previous subscription (-infinity: none)';

/*
 * _period_width_check: a plan's period must be a whole multiple of the
 * bucket width of every meter it charges (22023).  One trigger function
 * for the four tables whose changes could break that (its argument names
 * the table: on Citus it fires on shards, whose names differ): a charge of a new
 * (plan, meter) pair, a subscription to a plan (new, or another plan), a
 * plan's new period, a meter's new bucket width.  Pairs 1.0 created against
 * the rule stay (the update to 1.1 lists them): a new version of such a
 * charge is allowed, a new subscription to such a plan is not.  The reload
 * of a dump (billing._audit_suspended) brings rows that were checked when
 * first written, or came from 1.0, and is not checked again.
 */
CREATE FUNCTION billing._period_width_check() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    bad_plan text;
    bad_period interval;
    bad_meter text;
    bad_width interval;
BEGIN
    IF billing._audit_suspended() THEN
        RETURN NEW;
    END IF;
    IF TG_ARGV[0] = 'charges' THEN
        IF NEW.meter IS NULL
           OR (TG_OP = 'UPDATE' AND NEW.plan = OLD.plan AND NEW.meter IS NOT DISTINCT FROM OLD.meter) THEN
            RETURN NEW;
        END IF;
        SELECT p.plan, p.period, m.meter, m.bucket_width INTO bad_plan, bad_period, bad_meter, bad_width
          FROM billing.plans p, billing.meters m
         WHERE p.plan = NEW.plan AND m.meter = NEW.meter
           AND NOT billing._period_fits_width(p.period, m.bucket_width)
           AND NOT EXISTS (SELECT 1 FROM billing.charges c
                            WHERE c.plan = NEW.plan AND c.meter = NEW.meter
                              AND c.charge_id <> NEW.charge_id);
    ELSIF TG_ARGV[0] = 'subscriptions' THEN
        IF TG_OP = 'UPDATE' AND NEW.plan = OLD.plan THEN
            RETURN NEW;
        END IF;
        SELECT p.plan, p.period, m.meter, m.bucket_width INTO bad_plan, bad_period, bad_meter, bad_width
          FROM billing.plans p JOIN billing.charges c ON c.plan = p.plan
               JOIN billing.meters m ON m.meter = c.meter
         WHERE p.plan = NEW.plan AND NOT billing._period_fits_width(p.period, m.bucket_width)
         ORDER BY m.meter LIMIT 1;
    ELSIF TG_ARGV[0] = 'plans' THEN
        IF NEW.period = OLD.period THEN
            RETURN NEW;
        END IF;
        SELECT NEW.plan, NEW.period, m.meter, m.bucket_width INTO bad_plan, bad_period, bad_meter, bad_width
          FROM billing.charges c JOIN billing.meters m ON m.meter = c.meter
         WHERE c.plan = OLD.plan AND NOT billing._period_fits_width(NEW.period, m.bucket_width)
         ORDER BY m.meter LIMIT 1;
    ELSIF TG_ARGV[0] = 'meters' THEN
        IF NEW.bucket_width = OLD.bucket_width THEN
            RETURN NEW;
        END IF;
        SELECT p.plan, p.period, NEW.meter, NEW.bucket_width INTO bad_plan, bad_period, bad_meter, bad_width
          FROM billing.charges c JOIN billing.plans p ON p.plan = c.plan
         WHERE c.meter = OLD.meter AND NOT billing._period_fits_width(p.period, NEW.bucket_width)
         ORDER BY p.plan LIMIT 1;
    END IF;
    IF bad_plan IS NOT NULL THEN
        RAISE EXCEPTION 'the period "%" of plan "%" is not a whole multiple of the bucket width "%" of meter "%"',
              bad_period, bad_plan, bad_width, bad_meter
            USING ERRCODE = '22023',
                  DETAIL = 'A plan''s period must be a whole multiple of the bucket width of every meter it charges (a period of months: a bucket width that divides a day), so that each billing period starts at the same point of a bucket.',
                  HINT = 'Charge a meter with a narrower bucket width, or use a plan whose period is a multiple of it.';
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION billing._period_width_check() IS
    'Internal: refuses a charge, subscription, plan period or meter bucket width that would make a plan''s period not a whole multiple of the bucket width of a meter it charges (22023)';
SELECT billing._update_ddl('billing.charges', ARRAY[
    $ddl$CREATE TRIGGER charges_period_check BEFORE INSERT OR UPDATE ON billing.charges
        FOR EACH ROW EXECUTE FUNCTION billing._period_width_check('charges')$ddl$
]);
SELECT billing._update_ddl('billing.subscriptions', ARRAY[
    $ddl$CREATE TRIGGER subscriptions_period_check BEFORE INSERT OR UPDATE ON billing.subscriptions
        FOR EACH ROW EXECUTE FUNCTION billing._period_width_check('subscriptions')$ddl$
]);
SELECT billing._update_ddl('billing.plans', ARRAY[
    $ddl$CREATE TRIGGER plans_period_check BEFORE UPDATE ON billing.plans
        FOR EACH ROW EXECUTE FUNCTION billing._period_width_check('plans')$ddl$
]);
SELECT billing._update_ddl('billing.meters', ARRAY[
    $ddl$CREATE TRIGGER meters_period_check BEFORE UPDATE ON billing.meters
        FOR EACH ROW EXECUTE FUNCTION billing._period_width_check('meters')$ddl$
]);

CREATE OR REPLACE FUNCTION billing._rate_periods(p_accounts bigint[], p_plans text[], p_currencies text[],
                                      p_caps numeric[], p_starts timestamptz[],
                                      p_ends timestamptz[])
    RETURNS TABLE (idx integer, ord integer, kind text, meter text, description text,
                   quantity numeric, amount numeric, unrounded_amount numeric,
                   charge_id bigint, price billing.price)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
BEGIN
    RETURN QUERY
    WITH per AS (
        SELECT x.i::integer AS idx, x.pl AS plan, x.cur AS currency, x.cap, x.s AS ps
          FROM unnest(p_plans, p_currencies, p_caps, p_starts) WITH ORDINALITY AS x(pl, cur, cap, s, i)
    ), versions AS (
        -- the charge versions in force, once per (plan, period start) however
        -- many accounts share them, numbered in invoice order: fixed fees by
        -- description, then usage by meter (the spend cap comes last)
        SELECT v.*, (row_number() OVER (PARTITION BY v.plan, v.ps
                                        ORDER BY v.grp, v.description, v.meter))::integer AS ord,
               (count(*) OVER (PARTITION BY v.plan, v.ps))::integer AS n_lines
          FROM (SELECT DISTINCT ON (k.plan, k.ps, c.meter,
                                    CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END)
                       k.plan, k.ps, c.charge_id, c.meter::text AS meter,
                       coalesce(c.description, c.meter) AS description, c.price,
                       CASE WHEN c.meter IS NULL THEN 1 ELSE 2 END AS grp
                  FROM (SELECT DISTINCT per.plan, per.ps FROM per) k
                       JOIN billing.charges c ON c.plan = k.plan AND c.valid_from <= k.ps
                 ORDER BY k.plan, k.ps, c.meter,
                          CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END,
                          c.valid_from DESC) v
    ), widths AS (
        -- the bucket widths of the meters each (plan, period start) charges
        SELECT DISTINCT v.plan, v.ps, m.bucket_width
          FROM versions v JOIN billing.meters m ON m.meter = v.meter
    ), firsts AS (
        -- a metered charge of a period bills the buckets of its meter that
        -- start in [lo, period end), lo by the one rule of src/periods.c
        -- for the meter's bucket width: the bucket straddling a
        -- subscription's start goes to its first period, every other one
        -- to the period holding its start
        SELECT per.idx, w.bucket_width,
               billing._period_first_bucket(per.ps, uf.usage_from, w.bucket_width) AS lo
          FROM per JOIN widths w ON w.plan = per.plan AND w.ps = per.ps
               JOIN billing._period_usage_from(p_accounts, p_starts) uf ON uf.idx = per.idx
    ), reads AS (
        -- one read of the usage store per period and distinct lo (more than
        -- one only in a first period whose meters' buckets straddle its
        -- start at different points)
        SELECT r.idx, r.lo, (row_number() OVER (ORDER BY r.idx, r.lo))::integer AS j
          FROM (SELECT DISTINCT f.idx, f.lo FROM firsts f) r
    ), totals AS MATERIALIZED (
        -- (read once: inlined, the join below would read the store per line)
        -- each meter from the read whose lo is that of its bucket width
        SELECT rd.idx, t.meter, t.quantity
          FROM (SELECT array_agg(p_accounts[rd.idx] ORDER BY rd.j) AS accounts,
                       array_agg(rd.lo ORDER BY rd.j) AS starts,
                       array_agg(p_ends[rd.idx] ORDER BY rd.j) AS ends
                  FROM reads rd) a,
               LATERAL billing._usage_totals_many(a.accounts, a.starts, a.ends) t
               JOIN reads rd ON rd.j = t.idx
               JOIN billing.meters m ON m.meter = t.meter
               JOIN firsts f ON f.idx = rd.idx AND f.lo = rd.lo AND f.bucket_width = m.bucket_width
    ), rated AS (
        SELECT per.idx, per.currency, v.ord, v.n_lines, v.grp,
               CASE WHEN v.meter IS NULL THEN 'fixed' ELSE 'usage' END AS kind,
               v.meter, v.description,
               CASE WHEN v.meter IS NULL THEN NULL ELSE coalesce(t.quantity, 0) END AS quantity,
               billing.rate(v.price, CASE WHEN v.meter IS NULL THEN 0 ELSE coalesce(t.quantity, 0) END)
                   AS unrounded_amount,
               v.charge_id, v.price
          FROM per JOIN versions v ON v.plan = per.plan AND v.ps = per.ps
               LEFT JOIN totals t ON t.idx = per.idx AND t.meter = v.meter
    ), lines AS (
        SELECT r.*, billing.round_money(r.unrounded_amount, r.currency) AS amount FROM rated r
    ), capped AS (
        SELECT per.idx, max(l.n_lines) + 1 AS ord, 'cap'::text AS kind, NULL::text AS meter,
               'spend cap'::text AS description, NULL::numeric AS quantity,
               NULL::numeric AS unrounded_amount, NULL::bigint AS charge_id,
               NULL::billing.price AS price,
               billing.round_money(per.cap, per.currency) - sum(l.amount) AS amount
          FROM per JOIN lines l ON l.idx = per.idx AND l.kind = 'usage'
         WHERE per.cap IS NOT NULL
         GROUP BY per.idx, per.cap, per.currency
        HAVING sum(l.amount) > billing.round_money(per.cap, per.currency)
    )
    SELECT l.idx, l.ord, l.kind, l.meter, l.description, l.quantity, l.amount,
           l.unrounded_amount, l.charge_id, l.price
      FROM lines l
    UNION ALL
    SELECT c.idx, c.ord, c.kind, c.meter, c.description, c.quantity, c.amount,
           c.unrounded_amount, c.charge_id, c.price
      FROM capped c;
END
$$;

REVOKE ALL ON FUNCTION billing._period_first_bucket(timestamptz, timestamptz, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing._period_fits_width(interval, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing._period_usage_from(bigint[], timestamptz[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing._period_width_check() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._period_first_bucket(timestamptz, timestamptz, interval),
    billing._period_fits_width(interval, interval),
    billing._period_usage_from(bigint[], timestamptz[])
    TO billing_reader;

-- 1.0 data against the rule: kept, named (the update does not fail; on
-- Citus by the coordinator: a worker runs the update where Citus refuses
-- queries of its tables)
DO $$
DECLARE
    r record;
BEGIN
    IF billing._citus_table_kind('billing.charges') IS NOT NULL THEN
        IF NOT citus_is_coordinator() THEN
            RETURN;
        END IF;
    END IF;
    FOR r IN
        SELECT DISTINCT p.plan, p.period, m.meter, m.bucket_width
          FROM billing.charges c JOIN billing.plans p ON p.plan OPERATOR(pg_catalog.=) c.plan
               JOIN billing.meters m ON m.meter OPERATOR(pg_catalog.=) c.meter
         WHERE NOT billing._period_fits_width(p.period, m.bucket_width)
         ORDER BY p.plan, m.meter
    LOOP
        RAISE WARNING 'the period "%" of plan "%" is not a whole multiple of the bucket width "%" of meter "%"',
              r.period, r.plan, r.bucket_width, r.meter
            USING DETAIL = 'Kept as 1.0 created it: each bucket is billed once, in the period holding its start (the first period also bills the bucket straddling the subscription''s start). New subscriptions to this plan are refused (22023).',
                  HINT = 'Move its accounts to a plan whose period is a whole multiple of the bucket widths of its meters.';
    END LOOP;
END
$$;

-- ---------------------------------------------------------------------------
-- verify_audit_log on Citus workers whose server time zone is not UTC
-- (issue 13, Citus hardening): today's rows are rendered through
-- billing._audit_image, whose SET clauses apply wherever it runs.
-- ---------------------------------------------------------------------------

CREATE FUNCTION billing._audit_image(r anyelement)
    RETURNS jsonb
    LANGUAGE sql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
    SELECT pg_catalog.to_jsonb(r)
$$;

REVOKE ALL ON FUNCTION billing._audit_image(anyelement) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._audit_image(anyelement) TO billing_reader;

CREATE OR REPLACE FUNCTION billing.verify_audit_log()
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

-- ---- issue 13, defect 6: one rule for combining cells, one bin function -----------------
-- How values of a counter cell combine (sum/count add, max keeps the larger,
-- last the value of the greater (last_ts, last_seq), NULL the earliest, on a
-- tie of both the greater quantity) is defined once, in C (src/agg.c):
-- billing._combine and billing._last_later for two values, the aggregates
-- billing._cell_agg, _cell_last_ts and _cell_last_seq for many; every path
-- (compaction on one node and on Citus, usage, period totals, reconcile,
-- correct_usage) folds with them.  billing._bin is C (src/bin.c) and every
-- bin in SQL is computed by it.
CREATE FUNCTION billing._last_later(ts1 timestamptz, seq1 bigint, ts2 timestamptz, seq2 bigint)
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'billing_last_later_sql'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION billing._cell_agg_step(state internal, aggregation text, quantity numeric,
                                       last_ts timestamptz, last_seq bigint)
    RETURNS internal
    AS 'MODULE_PATHNAME', 'billing_cell_agg_step'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION billing._cell_agg_final(state internal) RETURNS numeric
    AS 'MODULE_PATHNAME', 'billing_cell_agg_final'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION billing._cell_agg_last_ts(state internal) RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'billing_cell_agg_last_ts'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE FUNCTION billing._cell_agg_last_seq(state internal) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_cell_agg_last_seq'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE AGGREGATE billing._cell_agg(aggregation text, quantity numeric, last_ts timestamptz,
                                   last_seq bigint) (
    SFUNC = billing._cell_agg_step, STYPE = internal, FINALFUNC = billing._cell_agg_final
);
CREATE AGGREGATE billing._cell_last_ts(aggregation text, quantity numeric, last_ts timestamptz,
                                       last_seq bigint) (
    SFUNC = billing._cell_agg_step, STYPE = internal, FINALFUNC = billing._cell_agg_last_ts
);
CREATE AGGREGATE billing._cell_last_seq(aggregation text, quantity numeric, last_ts timestamptz,
                                        last_seq bigint) (
    SFUNC = billing._cell_agg_step, STYPE = internal, FINALFUNC = billing._cell_agg_last_seq
);
COMMENT ON FUNCTION billing._last_later(timestamptz, bigint, timestamptz, bigint) IS
    'Internal: whether a last value stamped ts1 that arrived as seq1 is later than one stamped ts2 that arrived as seq2 (NULL: the earliest)';
COMMENT ON FUNCTION billing._cell_agg_step(internal, text, numeric, timestamptz, bigint) IS
    'Internal: transition of billing._cell_agg';
COMMENT ON FUNCTION billing._cell_agg_final(internal) IS
    'Internal: result of billing._cell_agg';
COMMENT ON FUNCTION billing._cell_agg_last_ts(internal) IS
    'Internal: result of billing._cell_last_ts';
COMMENT ON FUNCTION billing._cell_agg_last_seq(internal) IS
    'Internal: result of billing._cell_last_seq';
COMMENT ON AGGREGATE billing._cell_agg(text, numeric, timestamptz, bigint) IS
    'Internal: the value of a meter over counter cells, by the one rule of src/agg.c';
COMMENT ON AGGREGATE billing._cell_last_ts(text, numeric, timestamptz, bigint) IS
    'Internal: the last_ts of the value billing._cell_agg gives';
COMMENT ON AGGREGATE billing._cell_last_seq(text, numeric, timestamptz, bigint) IS
    'Internal: the last_seq of the value billing._cell_agg gives';
CREATE OR REPLACE FUNCTION billing._combine(aggregation text, q1 numeric, ts1 timestamptz, seq1 bigint,
                                 q2 numeric, ts2 timestamptz, seq2 bigint)
    RETURNS numeric
    AS 'MODULE_PATHNAME', 'billing_combine'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE OR REPLACE FUNCTION billing._bin(grain interval, ts timestamptz) RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'billing_bin'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._combine(text, numeric, timestamptz, bigint, numeric, timestamptz, bigint) IS
    'Internal: combines two values of a counter cell by the one rule of src/agg.c (sum/count add, max keeps the larger, last the later by (last_ts, last_seq))';
COMMENT ON FUNCTION billing._bin(interval, timestamptz) IS
    'Internal: start of the UTC-aligned bin of width grain that holds ts (days and time: date_bin from 1970-01-01 UTC; whole months: from January 1970)';
CREATE OR REPLACE FUNCTION billing.compact_usage() RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off
    SET client_min_messages = warning AS $$
DECLARE
    n bigint;
BEGIN
    -- one compaction at a time; concurrent ingest goes on (it only appends)
    PERFORM pg_advisory_xact_lock(1651074162, 1);
    IF to_regclass('pg_temp.billing_compact_cells') IS NOT NULL THEN  -- never a caller's table
        DROP TABLE pg_temp.billing_compact_cells;                     -- (SECURITY DEFINER)
    END IF;
    CREATE TEMP TABLE IF NOT EXISTS billing_compact_cells (
        account_id bigint, meter text COLLATE "C", dimension text COLLATE "C",
        bucket_start timestamptz, quantity numeric, events bigint,
        last_ts timestamptz, last_seq bigint, aggregation text, nrows bigint
    ) ON COMMIT DELETE ROWS;

    -- 1. take the deltas out, one cell per key, folded by the one rule
    WITH moved AS (
        DELETE FROM billing.usage_deltas RETURNING *
    )
    INSERT INTO billing_compact_cells
    SELECT d.account_id, c.meter, c.dimension, c.bucket_start,
           billing._cell_agg(m.aggregation, c.quantity, c.last_ts,
                             CASE WHEN c.last_ts IS NOT NULL THEN d.seq END),
           sum(c.events)::bigint,
           billing._cell_last_ts(m.aggregation, c.quantity, c.last_ts,
                                 CASE WHEN c.last_ts IS NOT NULL THEN d.seq END),
           billing._cell_last_seq(m.aggregation, c.quantity, c.last_ts,
                                  CASE WHEN c.last_ts IS NOT NULL THEN d.seq END),
           m.aggregation, count(*)
      FROM moved d
           CROSS JOIN LATERAL billing._delta_cells(d.cells) c
           JOIN billing.meters m ON m.meter = c.meter
     GROUP BY d.account_id, c.meter, c.dimension, c.bucket_start, m.aggregation;
    SELECT coalesce(sum(nrows), 0) INTO n FROM billing_compact_cells;
    IF n = 0 THEN
        RETURN 0;
    END IF;

    -- 2. fold them into the buckets and the hour and day roll-ups
    PERFORM billing._compact_into('usage_buckets', NULL);
    PERFORM billing._compact_into('usage_hourly', '1 hour');
    PERFORM billing._compact_into('usage_daily', '1 day');
    TRUNCATE billing_compact_cells;
    RETURN n;
END
$$;
CREATE OR REPLACE FUNCTION billing._compact_into(target text, grain interval) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
BEGIN
    IF billing._citus_table_kind('billing.usage_deltas') IS NOT NULL THEN
        PERFORM billing._compact_into_citus(target, grain);   -- see 90_distribute.sql
        RETURN;
    END IF;
    EXECUTE format($q$
        WITH cells AS (
            SELECT account_id, meter, dimension,
                   %s AS bucket_start,
                   billing._cell_agg(aggregation, quantity, last_ts, last_seq) AS quantity,
                   sum(events)::bigint AS events,
                   billing._cell_last_ts(aggregation, quantity, last_ts, last_seq) AS last_ts,
                   billing._cell_last_seq(aggregation, quantity, last_ts, last_seq) AS last_seq,
                   aggregation
              FROM billing_compact_cells
             GROUP BY 1, 2, 3, 4, aggregation
        ), updated AS (
            UPDATE billing.%I AS b
               SET quantity = billing._combine(c.aggregation, b.quantity, b.last_ts, b.last_seq,
                                               c.quantity, c.last_ts, c.last_seq),
                   events = b.events + c.events,
                   last_ts = CASE WHEN billing._last_later(c.last_ts, c.last_seq, b.last_ts, b.last_seq)
                                  THEN c.last_ts ELSE b.last_ts END,
                   last_seq = CASE WHEN billing._last_later(c.last_ts, c.last_seq, b.last_ts, b.last_seq)
                                   THEN c.last_seq ELSE b.last_seq END
              FROM cells c
             WHERE b.account_id = c.account_id AND b.meter = c.meter
               AND b.bucket_start = c.bucket_start AND b.dimension = c.dimension
        )
        INSERT INTO billing.%I (account_id, meter, dimension, bucket_start, quantity, events,
                                last_ts, last_seq)
        SELECT c.account_id, c.meter, c.dimension, c.bucket_start, c.quantity, c.events,
               c.last_ts, c.last_seq
          FROM cells c
         WHERE NOT EXISTS (SELECT 1 FROM billing.%I b
                            WHERE b.account_id = c.account_id AND b.meter = c.meter
                              AND b.bucket_start = c.bucket_start AND b.dimension = c.dimension)
         ORDER BY 1, 2, 4, 3
        $q$,
        CASE WHEN grain IS NULL THEN 'bucket_start'
             ELSE format('billing._bin(%L, bucket_start)', grain) END,
        target, target, target);
END
$$;
CREATE OR REPLACE FUNCTION billing._usage(p_account bigint, p_from timestamptz, p_to timestamptz,
                               p_grain interval, p_meter text)
    RETURNS TABLE (r_meter text, r_dimension text, r_bucket_start timestamptz,
                   r_quantity numeric, r_events bigint)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN QUERY
    WITH cells AS (
        SELECT u.meter, u.dimension, u.bucket_start, u.quantity, u.events, u.last_ts, u.last_seq
          FROM billing.usage_cells u
         WHERE u.account_id = p_account AND u.bucket_start >= p_from AND u.bucket_start < p_to
           AND (p_meter IS NULL OR u.meter = p_meter)
    )
    SELECT c.meter::text, c.dimension::text,
           CASE WHEN p_grain IS NULL THEN c.bucket_start ELSE billing._bin(p_grain, c.bucket_start) END,
           billing._cell_agg(m.aggregation, c.quantity, c.last_ts, c.last_seq),
           sum(c.events)::bigint
      FROM cells c JOIN billing.meters m ON m.meter = c.meter
     GROUP BY c.meter, c.dimension, 3, m.aggregation
     ORDER BY c.meter, c.dimension, 3;
END
$$;
CREATE OR REPLACE FUNCTION billing._usage_totals_many(p_accounts bigint[], p_starts timestamptz[],
                                           p_ends timestamptz[])
    RETURNS TABLE (idx integer, meter text, quantity numeric)
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
BEGIN
    -- on Citus: one router query per account (see 90_distribute.sql)
    IF billing._citus_table_kind('billing.usage_deltas') IS NOT NULL THEN
        RETURN QUERY
        SELECT x.i::integer, t.meter, t.quantity
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i),
               LATERAL billing._usage_totals_citus(x.a, x.s, x.e) t;
        RETURN;
    END IF;
    -- the roll-ups and buckets covering each period, each meter aggregated
    -- in C (billing._rollup_totals), plus the deltas not yet compacted,
    -- folded by the same rule (billing._cell_agg, src/agg.c)
    RETURN QUERY
    WITH ms AS (
        SELECT array_agg(m.meter::text ORDER BY m.meter) AS meters,
               array_agg(m.aggregation::text ORDER BY m.meter) AS aggs
          FROM billing.meters m
    ), per AS (
        SELECT x.i::integer AS idx, x.a AS account_id, x.s AS ps, x.e AS pe
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i)
    ), folded AS (
        SELECT r.idx, r.meter COLLATE "C" AS meter, r.quantity, r.last_ts, r.last_seq
          FROM ms, billing._rollup_totals(p_accounts, p_starts, p_ends, ms.meters, ms.aggs) r
        UNION ALL
        -- not yet compacted
        SELECT per.idx, x.meter, x.quantity, x.last_ts,
               CASE WHEN x.last_ts IS NOT NULL THEN d.seq END
          FROM per JOIN billing.usage_deltas d ON d.account_id = per.account_id,
               billing._delta_cells(d.cells) x
         WHERE x.bucket_start >= per.ps AND x.bucket_start < per.pe
    )
    SELECT f.idx, f.meter::text,
           billing._cell_agg(m.aggregation, f.quantity, f.last_ts, f.last_seq)
      FROM folded f JOIN billing.meters m ON m.meter = f.meter
     GROUP BY f.idx, f.meter, m.aggregation;
END
$$;
CREATE OR REPLACE FUNCTION billing.correct_usage(account_id bigint, meter text, bucket_start timestamptz,
                                      delta numeric, reason text, dimension text DEFAULT '')
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    m record;
    cur numeric;
BEGIN
    IF account_id IS NULL OR meter IS NULL OR bucket_start IS NULL OR delta IS NULL THEN
        RAISE EXCEPTION 'correct_usage: account_id, meter, bucket_start and delta must not be null'
            USING ERRCODE = '22004';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'a usage correction needs a reason' USING ERRCODE = '22004';
    END IF;
    dimension := coalesce(dimension, '');
    IF octet_length(dimension) > 256 THEN
        RAISE EXCEPTION 'usage dimension is too long'
            USING ERRCODE = '22023', DETAIL = 'A dimension has at most 256 bytes.';
    END IF;
    SELECT * INTO m FROM billing.meters x WHERE x.meter = correct_usage.meter;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'meter "%" does not exist', correct_usage.meter USING ERRCODE = '23503';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.accounts a WHERE a.account_id = correct_usage.account_id) THEN
        RAISE EXCEPTION 'account % does not exist', correct_usage.account_id USING ERRCODE = '23503';
    END IF;
    IF m.aggregation NOT IN ('sum', 'count') THEN
        RAISE EXCEPTION 'meter "%" has aggregation %', m.meter, m.aggregation
            USING ERRCODE = '22023', DETAIL = 'Only sum and count meters take corrections.';
    END IF;
    IF delta IN ('NaN', 'Infinity', '-Infinity') OR NOT isfinite(bucket_start)
       OR billing._bin(m.bucket_width, bucket_start) <> bucket_start THEN
        RAISE EXCEPTION 'invalid usage correction'
            USING ERRCODE = '22023',
                  DETAIL = format('delta must be a number and bucket_start the start of a %s bucket.', m.bucket_width);
    END IF;
    PERFORM billing._check_quantity(delta, correct_usage.meter, correct_usage.account_id);
    -- corrections of one bucket one at a time (ingest only adds, so it cannot race below zero)
    PERFORM pg_advisory_xact_lock(1651074162,
        hashtext(format('%s/%s/%s/%s', account_id, meter, dimension, bucket_start)));
    SELECT coalesce(billing._cell_agg(m.aggregation, u.quantity, u.last_ts, u.last_seq), 0) INTO cur
      FROM billing.usage_cells u
     WHERE u.account_id = correct_usage.account_id AND u.meter = correct_usage.meter
       AND u.dimension = correct_usage.dimension AND u.bucket_start = correct_usage.bucket_start;
    IF cur + delta < 0 THEN
        RAISE EXCEPTION 'correction would make the bucket negative'
            USING ERRCODE = '22023',
                  DETAIL = format('The bucket holds %s; the correction is %s.', cur, delta);
    END IF;
    INSERT INTO billing.usage_deltas (account_id, seq, cells)
    VALUES (correct_usage.account_id, NULL,
            billing._delta_pack(ARRAY[correct_usage.meter], ARRAY[correct_usage.dimension],
                                ARRAY[bucket_start], ARRAY[delta], ARRAY[0::bigint], NULL));
    INSERT INTO billing.usage_corrections (account_id, meter, dimension, bucket_start, delta, reason)
    VALUES (correct_usage.account_id, correct_usage.meter, correct_usage.dimension, bucket_start,
            delta, reason);
END
$$;
CREATE OR REPLACE FUNCTION billing.reconcile(source regclass, account_column name, meter_column name,
                                  quantity_column name, ts_column name,
                                  from_ts timestamptz, to_ts timestamptz)
    RETURNS TABLE (account_id bigint, meter text, bucket_start timestamptz,
                   source_quantity numeric, counted_quantity numeric, difference numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    col name;
BEGIN
    IF source IS NULL OR account_column IS NULL OR meter_column IS NULL OR quantity_column IS NULL
       OR ts_column IS NULL OR from_ts IS NULL OR to_ts IS NULL THEN
        RAISE EXCEPTION 'reconcile: no argument may be null' USING ERRCODE = '22004';
    END IF;
    FOREACH col IN ARRAY ARRAY[account_column, meter_column, quantity_column, ts_column] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = source AND a.attname = col
                          AND a.attnum > 0 AND NOT a.attisdropped) THEN
            RAISE EXCEPTION 'column "%" of relation "%" does not exist', col, source
                USING ERRCODE = '42703';
        END IF;
    END LOOP;
    -- a source row for a meter that does not exist cannot be compared: say so
    EXECUTE format($q$
        SELECT s.%1$I::text FROM %2$s s
         WHERE s.%3$I >= $1 AND s.%3$I < $2
           AND NOT EXISTS (SELECT 1 FROM billing.meters m WHERE m.meter = s.%1$I::text)
         LIMIT 1 $q$, meter_column, source, ts_column)
       INTO col USING from_ts, to_ts;
    IF col IS NOT NULL THEN
        RAISE EXCEPTION 'source "%" has usage of meter "%", which does not exist', source, col
            USING ERRCODE = '23503';
    END IF;
    -- both sides per (account, meter, bucket), combined by the meter's aggregation
    RETURN QUERY EXECUTE format($q$
        WITH src AS (
            -- a source row is one report: count counts it, the others fold
            -- its value by the cells' rule (src/agg.c); rows have no arrival
            -- order, so of two last values with the same timestamp the
            -- greater is taken
            SELECT s.%1$I::bigint AS account_id, s.%2$I::text AS meter,
                   billing._bin(m.bucket_width, s.%4$I) AS bucket_start,
                   billing._cell_agg(m.aggregation,
                                     CASE WHEN m.aggregation = 'count' THEN 1::numeric
                                          ELSE s.%3$I::numeric END,
                                     CASE WHEN m.aggregation = 'last' THEN s.%4$I END,
                                     NULL::bigint) AS quantity
              FROM %5$s s JOIN billing.meters m ON m.meter = s.%2$I::text
             WHERE s.%4$I >= $1 AND s.%4$I < $2
             GROUP BY 1, 2, 3, m.aggregation
        ), counted AS (
            SELECT u.account_id, u.meter::text AS meter, u.bucket_start,
                   billing._cell_agg(m.aggregation, u.quantity, u.last_ts, u.last_seq) AS quantity
              FROM billing.usage_cells u JOIN billing.meters m ON m.meter = u.meter
             WHERE u.bucket_start >= $1 AND u.bucket_start < $2
             GROUP BY 1, 2, 3, m.aggregation
        )
        SELECT coalesce(s.account_id, c.account_id), coalesce(s.meter, c.meter),
               coalesce(s.bucket_start, c.bucket_start),
               coalesce(s.quantity, 0), coalesce(c.quantity, 0),
               coalesce(s.quantity, 0) - coalesce(c.quantity, 0)
          FROM src s FULL JOIN counted c
            ON c.account_id = s.account_id AND c.meter = s.meter AND c.bucket_start = s.bucket_start
         WHERE coalesce(s.quantity, 0) <> coalesce(c.quantity, 0)
         ORDER BY 1, 2, 3
        $q$, account_column, meter_column, quantity_column, ts_column, source)
    USING from_ts, to_ts;
END
$$;
CREATE OR REPLACE FUNCTION billing._compact_into_citus(target text, grain interval) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    agg text;
BEGIN
    FOREACH agg IN ARRAY ARRAY['sum', 'count', 'max', 'last'] LOOP
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
CREATE OR REPLACE FUNCTION billing._usage_totals_citus(p_account bigint, from_ts timestamptz, to_ts timestamptz)
    RETURNS TABLE (meter text, quantity numeric)
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
BEGIN
    -- one index range per meter and table: (account_id, meter, bucket_start)
    RETURN QUERY
    WITH cells AS (
        SELECT m.meter, c.quantity, c.last_ts, c.last_seq
          FROM billing.meters m
               CROSS JOIN LATERAL (
                   SELECT u.quantity, u.last_ts, u.last_seq FROM billing.usage_buckets u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= from_ts AND u.bucket_start < m_end
                   UNION ALL
                   SELECT u.quantity, u.last_ts, u.last_seq FROM billing.usage_buckets u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= m_start AND u.bucket_start < to_ts
                   UNION ALL
                   SELECT u.quantity, u.last_ts, u.last_seq FROM billing.usage_hourly u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= h0 AND u.bucket_start < hh_end
                   UNION ALL
                   SELECT u.quantity, u.last_ts, u.last_seq FROM billing.usage_hourly u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= ht_start AND u.bucket_start < h1
                   UNION ALL
                   SELECT u.quantity, u.last_ts, u.last_seq FROM billing.usage_daily u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.bucket_start >= d0 AND u.bucket_start < d1
               ) c
        UNION ALL
        -- not yet compacted
        SELECT x.meter, x.quantity, x.last_ts, CASE WHEN x.last_ts IS NOT NULL THEN d.seq END
          FROM billing.usage_deltas d, billing._delta_cells(d.cells) x
         WHERE d.account_id = p_account AND x.bucket_start >= from_ts AND x.bucket_start < to_ts
    )
    SELECT c.meter::text,
           billing._cell_agg(m.aggregation, c.quantity, c.last_ts, c.last_seq)
      FROM cells c JOIN billing.meters m ON m.meter = c.meter
     GROUP BY c.meter, m.aggregation;
END
$$;
ALTER FUNCTION billing.compact_usage() SECURITY DEFINER;
ALTER FUNCTION billing.correct_usage(bigint, text, timestamptz, numeric, text, text) SECURITY DEFINER;
REVOKE ALL ON FUNCTION billing._last_later(timestamptz, bigint, timestamptz, bigint),
    billing._cell_agg_step(internal, text, numeric, timestamptz, bigint),
    billing._cell_agg_final(internal), billing._cell_agg_last_ts(internal),
    billing._cell_agg_last_seq(internal),
    billing._cell_agg(text, numeric, timestamptz, bigint),
    billing._cell_last_ts(text, numeric, timestamptz, bigint),
    billing._cell_last_seq(text, numeric, timestamptz, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._last_later(timestamptz, bigint, timestamptz, bigint),
    billing._cell_agg_step(internal, text, numeric, timestamptz, bigint),
    billing._cell_agg_final(internal), billing._cell_agg_last_ts(internal),
    billing._cell_agg_last_seq(internal),
    billing._cell_agg(text, numeric, timestamptz, bigint),
    billing._cell_last_ts(text, numeric, timestamptz, bigint),
    billing._cell_last_seq(text, numeric, timestamptz, bigint) TO billing_reader;


-- ---- issue 13, defect 4: the triggers of metered tables are not SECURITY DEFINER ---------
-- They fire on users' own tables and run as the user who inserts; their C
-- code switches to the extension owner and pins search_path around the work
-- that needs the extension's rights (SPEC section 8).  Users' triggers name
-- these functions: they are altered, never dropped.
ALTER FUNCTION billing._meter_row() SECURITY INVOKER;
ALTER FUNCTION billing._meter_after_rows() SECURITY INVOKER;
ALTER FUNCTION billing._meter_flush() SECURITY INVOKER RESET search_path;

-- ---- issue 17: contracts (credits, commitments, plan changes; SPEC 10.2) --------------
-- The objects of sql/install/55_contracts.sql (new), then the functions of
-- the other parts that build, finalize, preview and re-rate invoices with
-- plan segments, true-ups, installments and credits, and the grants.
-- _period_at and _pending_adjustments give way to _segments and
-- _invoice_build.
-- subscriptions: the grid their periods are cut from ----------------------------------

SELECT billing._update_ddl('billing.subscriptions', ARRAY[
    $ddl$ALTER TABLE billing.subscriptions ADD COLUMN period_anchor timestamptz NULL$ddl$,
    $ddl$ALTER TABLE billing.subscriptions ADD CONSTRAINT subscriptions_period_anchor_check
        CHECK (pg_catalog.isfinite(period_anchor) AND period_anchor <= starts_at)$ddl$,
    $ddl$COMMENT ON COLUMN billing.subscriptions.period_anchor IS
        'Where the grid of billing periods starts (NULL: starts_at); change_plan keeps the previous subscription''s grid'$ddl$
]);

-- provenance of the new line kinds ---------------------------------------------------------

SELECT billing._update_ddl('billing.invoice_lines', ARRAY[
    $ddl$ALTER TABLE billing.invoice_lines DROP CONSTRAINT invoice_lines_kind_check$ddl$,
    $ddl$ALTER TABLE billing.invoice_lines ADD CONSTRAINT invoice_lines_kind_check
        CHECK (kind IN ('usage', 'fixed', 'cap', 'true_up', 'commitment', 'adjustment', 'credit'))$ddl$,
    $ddl$ALTER TABLE billing.invoice_lines
        ADD COLUMN segment_start timestamptz,   -- a period with a plan change: the plan's segment
        ADD COLUMN segment_end timestamptz,
        ADD COLUMN proration numeric,           -- fixed fee of a segment: its share of the period
        ADD COLUMN commitment_id bigint,        -- commitment and true_up lines
        ADD COLUMN grant_id bigint              -- credit lines: the grant drawn
    $ddl$
]);
SELECT billing._update_ddl('billing.adjustments', ARRAY[
    $ddl$ALTER TABLE billing.adjustments ADD COLUMN segment_start timestamptz$ddl$,
    $ddl$COMMENT ON COLUMN billing.adjustments.segment_start IS
        'The plan segment of the corrected line (a period with a plan change); NULL: the period''s start'$ddl$
]);

-- tables -----------------------------------------------------------------------------------

CREATE SEQUENCE billing.commitment_id_seq;
COMMENT ON SEQUENCE billing.commitment_id_seq IS 'Commitment numbers, unique across accounts';
CREATE TABLE billing.commitments (
    account_id         bigint NOT NULL REFERENCES billing.accounts,
    commitment_id      bigint NOT NULL DEFAULT pg_catalog.nextval('billing.commitment_id_seq'),
    kind               text NOT NULL CHECK (kind IN ('prepaid', 'minimum')),
    amount             numeric NOT NULL CHECK (amount >= 0 AND amount < 'Infinity'),
    starts_at          timestamptz NOT NULL CHECK (pg_catalog.isfinite(starts_at)),
    ends_at            timestamptz NOT NULL CHECK (pg_catalog.isfinite(ends_at)),
    commit_period      interval NULL CHECK (commit_period > interval '0'),
    applies_to         text[] COLLATE "C" NULL,
    installments       integer NOT NULL DEFAULT 1 CHECK (installments >= 1),
    rollover_fraction  numeric NOT NULL DEFAULT 0 CHECK (rollover_fraction BETWEEN 0 AND 1),
    period             interval NOT NULL,      -- the billing period it is invoiced on
    actor              text NOT NULL DEFAULT CURRENT_USER,
    created_at         timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (account_id, commitment_id),
    CHECK (ends_at > starts_at)
);
COMMENT ON TABLE billing.commitments IS
    'Commitments of accounts (add_commitment): prepaid (a credit grant per window, invoiced in installments) or minimum (a true-up when a window''s spend falls short); immutable';

CREATE TABLE billing.commitment_windows (
    account_id     bigint NOT NULL,
    commitment_id  bigint NOT NULL,
    window_no      integer NOT NULL CHECK (window_no >= 1),
    starts_at      timestamptz NOT NULL,
    ends_at        timestamptz NOT NULL,
    amount         numeric NOT NULL,
    -- prepaid: where each installment is invoiced (the start of the
    -- window's i-th period) and its amount
    installment_due      timestamptz[] NULL,
    installment_amounts  numeric[] NULL,
    PRIMARY KEY (account_id, commitment_id, window_no),
    FOREIGN KEY (account_id, commitment_id) REFERENCES billing.commitments,
    CHECK (ends_at > starts_at)
);
COMMENT ON TABLE billing.commitment_windows IS
    'The windows of each commitment (commit_period repeats the window; NULL: one window, the whole term), the amount of each and, prepaid, its installments; immutable';

CREATE SEQUENCE billing.credit_grant_id_seq;
COMMENT ON SEQUENCE billing.credit_grant_id_seq IS 'Credit grant numbers, unique across accounts';
CREATE TABLE billing.credit_grants (
    account_id       bigint NOT NULL REFERENCES billing.accounts,
    grant_id         bigint NOT NULL DEFAULT pg_catalog.nextval('billing.credit_grant_id_seq'),
    amount           numeric NOT NULL CHECK (amount >= 0 AND amount < 'Infinity'),
    effective_at     timestamptz NOT NULL CHECK (pg_catalog.isfinite(effective_at)),
    expires_at       timestamptz NULL CHECK (pg_catalog.isfinite(expires_at)),
    priority         integer NOT NULL DEFAULT 50 CHECK (priority BETWEEN 0 AND 100),
    applies_to       text[] COLLATE "C" NULL,
    source           text NOT NULL CHECK (source IN ('manual', 'commitment', 'rollover')),
    voided_at        timestamptz NULL,
    reason           text,
    void_reason      text,
    idempotency_key  text NULL,
    commitment_id    bigint NULL,        -- commitment and rollover grants
    window_no        integer NULL,       -- the commitment window it pays
    rolled_from      bigint NULL,        -- rollover grants: the grant it carries over from
    actor            text NOT NULL DEFAULT CURRENT_USER,
    created_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (account_id, grant_id),
    FOREIGN KEY (account_id, commitment_id) REFERENCES billing.commitments,
    CHECK (expires_at > effective_at)
);
COMMENT ON TABLE billing.credit_grants IS
    'Credit grants (grant_credit, prepaid commitments, rollovers); immutable but for voided_at and void_reason, set once by void_credit';
CREATE UNIQUE INDEX credit_grants_idempotency_key
    ON billing.credit_grants (account_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE billing.credit_ledger (
    account_id    bigint NOT NULL,
    seq           bigint NOT NULL CHECK (seq >= 1),         -- gap-free per account
    grant_id      bigint NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('grant', 'draw', 'expire', 'void', 'rollover')),
    amount        numeric NOT NULL CHECK (CASE WHEN kind = 'grant' THEN amount >= 0 ELSE amount <= 0 END),
    effective_at  timestamptz NOT NULL,
    invoice_id    bigint NULL,              -- draws: the invoice whose credit line it is
    actor         text NOT NULL DEFAULT CURRENT_USER,
    booked_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (account_id, seq),
    FOREIGN KEY (account_id, grant_id) REFERENCES billing.credit_grants,
    FOREIGN KEY (account_id, invoice_id) REFERENCES billing.invoices
);
COMMENT ON TABLE billing.credit_ledger IS
    'Append-only ledger of credits: grant (+), draw, expire, void, rollover (-); a grant''s remaining amount is the sum of its entries';
CREATE INDEX credit_ledger_grant ON billing.credit_ledger (account_id, grant_id);

SELECT pg_catalog.pg_extension_config_dump('billing.commitments', '');
SELECT pg_catalog.pg_extension_config_dump('billing.commitment_windows', '');
SELECT pg_catalog.pg_extension_config_dump('billing.credit_grants', '');
SELECT pg_catalog.pg_extension_config_dump('billing.credit_ledger', '');
SELECT pg_catalog.pg_extension_config_dump('billing.commitment_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.credit_grant_id_seq', '');

-- immutability -----------------------------------------------------------------------------

CREATE TRIGGER credit_ledger_append_only BEFORE UPDATE OR DELETE ON billing.credit_ledger
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change('credit_ledger is append-only.',
        'Credit moves are new entries: void_credit, or finalize_invoices for draws and expiries.');
CREATE TRIGGER credit_ledger_no_truncate BEFORE TRUNCATE ON billing.credit_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('credit_ledger is append-only.');
CREATE TRIGGER commitments_immutable BEFORE UPDATE OR DELETE ON billing.commitments
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change('Commitments never change.',
        'Add another commitment (add_commitment) or credit (grant_credit).');
CREATE TRIGGER commitments_no_truncate BEFORE TRUNCATE ON billing.commitments
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('Commitments never change.');
CREATE TRIGGER commitment_windows_immutable BEFORE UPDATE OR DELETE ON billing.commitment_windows
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change('Commitments never change.');
CREATE TRIGGER commitment_windows_no_truncate BEFORE TRUNCATE ON billing.commitment_windows
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('Commitments never change.');

-- a grant is written once; void_credit only records when and why it was voided
CREATE FUNCTION billing._credit_grants_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.voided_at IS NULL AND NEW.voided_at IS NOT NULL
       AND (to_jsonb(NEW) - 'voided_at' - 'void_reason') = (to_jsonb(OLD) - 'voided_at' - 'void_reason') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% of credit_grants is not allowed', lower(TG_OP)
        USING ERRCODE = '55000',
              DETAIL = 'A credit grant never changes, except to record once that it was voided.',
              HINT = 'Void it with void_credit, or grant another credit.';
END
$$;
COMMENT ON FUNCTION billing._credit_grants_guard() IS
    'Internal: credit grants are immutable but for voided_at and void_reason, set once by void_credit';
CREATE TRIGGER credit_grants_guard BEFORE UPDATE OR DELETE ON billing.credit_grants
    FOR EACH ROW EXECUTE FUNCTION billing._credit_grants_guard();
CREATE TRIGGER credit_grants_no_truncate BEFORE TRUNCATE ON billing.credit_grants
    FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_change('credit_grants never change.');

-- audit: one row per ledger entry (grant, draw, expire, void, rollover) --------------------

/*
 * _audit_credit: AFTER INSERT ROW trigger of credit_ledger.  The action is
 * the entry's kind; a grant's row carries the grant, a void's its reason.
 * Row by row on one node and on Citus alike (a finalize books a few
 * entries per account).
 */
CREATE FUNCTION billing._audit_credit() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    d jsonb := to_jsonb(NEW);
BEGIN
    IF billing._audit_suspended() THEN
        RETURN NULL;
    END IF;
    IF NEW.kind IN ('grant', 'void') THEN
        d := d || jsonb_build_object('credit_grant',
                       (SELECT to_jsonb(g) FROM billing.credit_grants g
                         WHERE g.account_id = NEW.account_id AND g.grant_id = NEW.grant_id));
    END IF;
    PERFORM billing._audit_append(NEW.account_id, NEW.kind, format('credit_grant:%s', NEW.grant_id), d);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing._audit_credit() IS
    'Internal: writes the audit row of a credit ledger entry (action: its kind)';
CREATE TRIGGER credit_ledger_audit AFTER INSERT ON billing.credit_ledger
    FOR EACH ROW EXECUTE FUNCTION billing._audit_credit();

-- periods and plan segments ----------------------------------------------------------------

/*
 * _subscriptions_of: the subscriptions of some accounts (NULL: all), with
 * their plan's period and currency and the start of their grid; with
 * p_invoiced, also the start of the latest invoice whose period overlaps
 * them.  The one place the segment functions read subscriptions:
 * PL/pgSQL, so that Citus routes the query by the accounts' values (the
 * callers compose its rows in queries over functions only).
 */
CREATE FUNCTION billing._subscriptions_of(p_accounts bigint[], p_invoiced boolean DEFAULT false)
    RETURNS TABLE (account_id bigint, plan text, starts_at timestamptz, ends_at timestamptz,
                   spend_cap numeric, period interval, currency text, anchor timestamptz,
                   last_invoiced timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT s.account_id, s.plan::text, s.starts_at, s.ends_at, s.spend_cap, p.period, p.currency,
           coalesce(s.period_anchor, s.starts_at),
           CASE WHEN p_invoiced THEN
               (SELECT max(i.period_start) FROM billing.invoices i
                 WHERE i.account_id = s.account_id AND i.period_start < coalesce(s.ends_at, 'infinity')
                   AND i.period_end > s.starts_at) END
      FROM billing.subscriptions s JOIN billing.plans p ON p.plan = s.plan
     WHERE p_accounts IS NULL OR s.account_id = ANY (p_accounts);
END
$$;
COMMENT ON FUNCTION billing._subscriptions_of(bigint[], boolean) IS
    'Internal: subscriptions of some accounts (NULL: all) with period, currency, grid start and (p_invoiced) the latest overlapping invoice';

/*
 * _segments: for each (account, moment) given (i: its place in the
 * arrays), the plan segments of the billing period holding the moment, in
 * time order.  The subscription holding the moment gives the grid period
 * [grid_start, grid_end); its segments are the pieces of every
 * subscription of the account on the same grid period (same period
 * length, same grid start), each cut to its subscription's span.  The
 * invoice of the period runs from the first segment's start to the last
 * one's end; its spend cap and plan are those of the last segment.  No
 * subscription at the moment: no rows.
 */
CREATE FUNCTION billing._segments(p_accounts bigint[], p_ats timestamptz[])
    RETURNS TABLE (i integer, account_id bigint, grid_start timestamptz, grid_end timestamptz,
                   currency text, plan text, spend_cap numeric, segment_start timestamptz,
                   segment_end timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH subs AS MATERIALIZED (
        -- (Citus plans a materialized CTE on its own, routed by the accounts)
        SELECT s.account_id, s.plan::text AS plan, s.starts_at, s.ends_at, s.spend_cap, p.period,
               p.currency, coalesce(s.period_anchor, s.starts_at) AS anchor
          FROM billing.subscriptions s JOIN billing.plans p ON p.plan = s.plan
         WHERE s.account_id = ANY (p_accounts)
    ), grid AS (
        SELECT x.n::integer AS i, h.account_id, h.period, h.currency, g.gs, g.ge
          FROM unnest(p_accounts, p_ats) WITH ORDINALITY AS x(a, t, n)
               JOIN subs h ON h.account_id = x.a AND h.starts_at <= x.t
                          AND x.t < coalesce(h.ends_at, 'infinity'),
               LATERAL (SELECT billing._add_periods(h.anchor, h.period, n) AS gs,
                               billing._add_periods(h.anchor, h.period, n + 1) AS ge
                          FROM billing._period_index(h.anchor, h.period, x.t) n) g
    )
    SELECT grid.i, grid.account_id, grid.gs, grid.ge, grid.currency, s.plan, s.spend_cap,
           greatest(grid.gs, s.starts_at), least(grid.ge, s.ends_at)
      FROM grid JOIN subs s
        ON s.account_id = grid.account_id AND s.period = grid.period
       AND s.starts_at < grid.ge AND coalesce(s.ends_at, 'infinity') > grid.gs
       AND billing._add_periods(s.anchor, s.period,
               billing._period_index(s.anchor, s.period, greatest(grid.gs, s.starts_at))) = grid.gs
     ORDER BY grid.i, s.starts_at;
END
$$;
COMMENT ON FUNCTION billing._segments(bigint[], timestamptz[]) IS
    'Internal: the plan segments of the billing period holding each (account, moment)';

-- money helpers ----------------------------------------------------------------------------

-- part i of n of a total, rounded so that the parts add up to the total
CREATE FUNCTION billing._installment(total numeric, i integer, n integer, currency text)
    RETURNS numeric
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT billing.round_money(total * i / n, currency)
           - billing.round_money(total * (i - 1) / n, currency)
$$;
COMMENT ON FUNCTION billing._installment(numeric, integer, integer, text) IS
    'Internal: installment i of n of a total: round(total*i/n) - round(total*(i-1)/n), so the parts add up to the total';

/*
 * _eligible_spend: what one invoice's lines count towards a minimum
 * commitment: its usage, fixed and cap lines (after the cap, before
 * credits) for applies_to NULL; for a list of meters, the usage lines of
 * those meters, scaled down by the cap in the proportion it cut the
 * invoice's usage.  The lines are given as (kind, meter, amount), a
 * finalized invoice's lines plus the adjustments made to it since.
 */
CREATE FUNCTION billing._eligible_spend(applies_to text[], kinds text[], meters text[],
                                        amounts numeric[])
    RETURNS numeric
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT CASE
               WHEN applies_to IS NULL THEN
                   coalesce(sum(x.a) FILTER (WHERE x.k IN ('usage', 'fixed', 'cap')), 0)
               ELSE
                   coalesce(sum(x.a) FILTER (WHERE x.k = 'usage' AND x.m = ANY (applies_to)), 0)
                   * CASE WHEN coalesce(sum(x.a) FILTER (WHERE x.k = 'cap'), 0) <> 0
                               AND coalesce(sum(x.a) FILTER (WHERE x.k = 'usage'), 0) > 0
                          THEN greatest(sum(x.a) FILTER (WHERE x.k IN ('usage', 'cap')), 0)
                               / sum(x.a) FILTER (WHERE x.k = 'usage')
                          ELSE 1 END
           END
      FROM unnest(kinds, meters, amounts) AS x(k, m, a)
$$;
COMMENT ON FUNCTION billing._eligible_spend(text[], text[], text[], numeric[]) IS
    'Internal: the spend of one invoice that counts towards a minimum commitment (after the cap, before credits, restricted to applies_to)';

-- the state of a grant as drawing needs it
CREATE TYPE billing._credit_state AS (
    account_id         bigint,
    grant_id           bigint,
    priority           integer,
    effective_at       timestamptz,
    expires_at         timestamptz,
    applies_to         text[],
    source             text,
    remaining          numeric,
    rollover_fraction  numeric,       -- commitment grants: carried into the next window
    next_starts        timestamptz,   -- the next window of its commitment (NULL: none)
    next_ends          timestamptz,
    reason             text
);
COMMENT ON TYPE billing._credit_state IS
    'Internal: a credit grant with its remaining amount and rollover terms, as _credit_draws takes it';

-- building invoices --------------------------------------------------------------------------

-- a commitment window as building an invoice needs it
CREATE TYPE billing._window AS (
    account_id     bigint,
    commitment_id  bigint,
    window_no      integer,
    kind           text,
    starts_at      timestamptz,
    ends_at        timestamptz,
    amount         numeric,
    applies_to     text[],
    installments   integer,
    installment_due      timestamptz[],
    installment_amounts  numeric[]
);
COMMENT ON TYPE billing._window IS
    'Internal: a commitment window with its commitment''s terms, as _invoice_build takes it';

-- a line of an invoice being built (and the ledger entries it books)
CREATE TYPE billing._invoice_line AS (
    idx               integer,        -- the period (element of the arrays given)
    ord               bigint,         -- order on the invoice
    kind              text,           -- a line kind, or expire | rollover | grant (ledger only)
    meter             text,
    description       text,
    quantity          numeric,
    amount            numeric,
    unrounded_amount  numeric,
    charge_id         bigint,
    price             billing.price,
    adjustment_id     bigint,
    commitment_id     bigint,
    grant_id          bigint,         -- negative: a rollover grant created by this build
    segment_start     timestamptz,
    segment_end       timestamptz,
    proration         numeric,
    effective_at      timestamptz,    -- ledger entries
    expires_at        timestamptz,    -- new rollover grants
    source_grant      bigint          -- new rollover grants: the grant rolled over
);
COMMENT ON TYPE billing._invoice_line IS
    'Internal: a line of an invoice being built by _invoice_build, or a ledger entry it books';

/*
 * _segment_lines: the usage and fixed lines of periods rated segment by
 * segment (src/credits.c): in a period with more than one plan segment,
 * each line names its segment (plan, from, to) and carries it
 * (segment_start, segment_end), a fixed fee is prorated by the seconds of
 * its segment over those of the period (rounded once; proration: the
 * share); then each period's cap line over every segment's usage lines
 * (_cap_amount).
 */
CREATE FUNCTION billing._segment_lines(p_lines billing._invoice_line[], s_idx integer[],
                                       s_plans text[], s_starts timestamptz[],
                                       s_ends timestamptz[], p_currencies text[],
                                       p_caps numeric[], p_starts timestamptz[],
                                       p_ends timestamptz[])
    RETURNS SETOF billing._invoice_line
    AS 'MODULE_PATHNAME', 'billing_segment_lines'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION billing._segment_lines(billing._invoice_line[], integer[], text[], timestamptz[], timestamptz[], text[], numeric[], timestamptz[], timestamptz[]) IS
    'Internal: the lines of periods with plan segments as invoices show them (segment named, fixed fees prorated by seconds, the cap over every segment; src/credits.c)';

/*
 * _credit_draws: the drawdown (src/credits.c; pure, shared by finalize on
 * one node and on Citus and by invoice_preview).  Period i is
 * (p_accounts[i], p_starts[i], p_ends[i]); p_lines are the lines built for
 * the periods (idx: the period).  Each account's periods are paid, in time
 * order, by its grants overlapping them in the total drawdown order:
 * priority ascending, grants with applies_to before those without,
 * expires_at ascending (never last), effective_at, grant_id (a rollover
 * grant created here sorts after every existing grant, as its id will).  A
 * grant pays the positive part of the lines it applies to that earlier
 * grants left unpaid, in line order: usage, fixed, true_up and adjustment
 * lines (applies_to NULL), or the usage and adjustment lines of its meters;
 * never commitment or cap lines; at most what it has left and never more
 * than what takes the invoice's total to 0.  Each grant's draw on an
 * invoice, rounded once to the minor unit (exact: lines are rounded), is a
 * 'credit' row (negative); a grant that draws 0 gives none.  With p_book,
 * after a period's draws, every grant expired by its end with something
 * left is booked: round(f * left) of a commitment grant with a rollover
 * fraction f and a next window rolls over ('rollover' on it, 'grant' of a
 * new grant -1, -2, ... effective for the next window, which later periods
 * draw from), the rest 'expire'.
 */
CREATE FUNCTION billing._credit_draws(p_accounts bigint[], p_currencies text[],
                                      p_starts timestamptz[], p_ends timestamptz[],
                                      p_book boolean, p_lines billing._invoice_line[],
                                      p_grants billing._credit_state[])
    RETURNS SETOF billing._invoice_line
    AS 'MODULE_PATHNAME', 'billing_credit_draws'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION billing._credit_draws(bigint[], text[], timestamptz[], timestamptz[], boolean, billing._invoice_line[], billing._credit_state[]) IS
    'Internal: the credit lines (and, booking, the expiries and rollovers) of many periods, each account''s grants drawn in the total drawdown order (src/credits.c)';

/*
 * _invoice_build: the lines of many billing periods (element i of the
 * p_ arrays is period i; its plan segments are the elements of the s_
 * arrays whose s_idx is i, in time order), in invoice order, and the ledger
 * entries finalizing them books.  Periods of one account must be given in
 * time order; p_first marks the period that carries the account's pending
 * adjustments.  p_rated_only: only the usage, fixed and cap lines (rerate,
 * remaining).  p_book: book expiries and rollovers (finalize; the preview
 * does not).
 *
 * 1. Each segment is rated by _rate_periods from its start to its end with
 *    its plan (tiers restart at a plan change; the charge versions in force
 *    at the segment's start); with more than one segment a segment's fixed
 *    fees are prorated by its share of the period in seconds, and its lines
 *    name the segment.  The spend cap of the period caps the usage lines of
 *    every segment.
 * 2. What the accounts have: commitment windows overlapping the periods,
 *    pending adjustments, grants with something left (plain statements,
 *    routed by the accounts on Citus).  None: done.
 * 3. true_up lines (minimum windows ending in a period: the amount less the
 *    eligible spend of the finalized invoices inside the window and of the
 *    periods built here), commitment lines (each installment of a prepaid
 *    window on the period its schedule puts it in), adjustment lines (the
 *    account's first period), then the credit lines (and ledger entries) of
 *    _credit_draws.
 * Called from queries over functions only (Citus: see _subscriptions_of).
 */
CREATE FUNCTION billing._invoice_build(p_accounts bigint[], p_currencies text[], p_caps numeric[],
                                       p_starts timestamptz[], p_ends timestamptz[],
                                       p_first boolean[], s_idx integer[], s_plans text[],
                                       s_starts timestamptz[], s_ends timestamptz[],
                                       p_rated_only boolean DEFAULT false,
                                       p_book boolean DEFAULT false)
    RETURNS SETOF billing._invoice_line
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run; the plan
    -- cache mode is the default, and a level to change it on (see 2.)
    SET jit = off SET plan_cache_mode = auto AS $$
DECLARE
    accs bigint[];
    t_from timestamptz;
    t_to timestamptz;
    l billing._invoice_line[];
    wins billing._window[];
    grs billing._credit_state[];
    adjs billing._invoice_line[];   -- pending adjustments (grant_id: the account)
    sa record;
    sp record;
    has_true_ups boolean;
    has_installments boolean;
BEGIN
    IF coalesce(array_length(p_accounts, 1), 0) = 0 THEN
        RETURN;
    ELSIF cardinality(p_accounts) > 16 THEN
        -- many periods (finalize): plans that know the arrays' sizes (a
        -- generic plan takes each for 10 rows and may join them in loops)
        PERFORM set_config('plan_cache_mode', 'force_custom_plan', true);
    END IF;
    -- 1. usage and fixed lines of every segment (one set-based rating), the
    -- cap.  Each period one segment (no plan change): _rate_periods rates
    -- the periods, cap included, as they are.
    IF cardinality(s_idx) = cardinality(p_accounts) THEN
        SELECT array_agg(ROW(r.idx, r.ord, r.kind, r.meter, r.description, r.quantity, r.amount,
                             r.unrounded_amount, r.charge_id, r.price, NULL, NULL, NULL, NULL, NULL,
                             NULL, NULL, NULL, NULL)::billing._invoice_line ORDER BY r.idx, r.ord)
          INTO l
          FROM billing._rate_periods(p_accounts, s_plans, p_currencies, p_caps, s_starts, s_ends) r;
    ELSE
        -- a plan change: each segment rated on its own from its start to
        -- its end with its plan, then _segment_lines (a statement of its own:
        -- the rating's plans stay its own)
        SELECT array_agg(x.a ORDER BY y.n) AS accounts, array_agg(x.cur ORDER BY y.n) AS currencies
          INTO sa
          FROM unnest(s_idx) WITH ORDINALITY AS y(p, n)
               JOIN unnest(p_accounts, p_currencies) WITH ORDINALITY AS x(a, cur, k) ON x.k = y.p;
        l := ARRAY(SELECT ROW(r.idx, r.ord, r.kind, r.meter, r.description, r.quantity, r.amount,
                              r.unrounded_amount, r.charge_id, r.price, NULL, NULL, NULL, NULL,
                              NULL, NULL, NULL, NULL, NULL)::billing._invoice_line
                     FROM billing._rate_periods(sa.accounts, s_plans, sa.currencies,
                                                array_fill(NULL::numeric, ARRAY[cardinality(s_idx)]),
                                                s_starts, s_ends) r);
        l := ARRAY(SELECT x FROM billing._segment_lines(l, s_idx, s_plans, s_starts, s_ends,
                                                        p_currencies, p_caps, p_starts, p_ends) x
                    ORDER BY x.idx, x.ord);
    END IF;
    IF p_rated_only THEN
        RETURN QUERY SELECT * FROM unnest(l);
        RETURN;
    END IF;

    -- 2. what the accounts have (one statement; each subquery routed by the
    -- accounts on Citus).  From here on, for a few periods (a preview), one
    -- generic plan per statement and session: planning these statements
    -- anew costs more than running them.  (Not for many: a generic plan
    -- takes each array for 10 rows.  Not above: the callees of the rating
    -- keep their own plans.  Not with Citus loaded: it plans distributed
    -- statements with their parameters' values.)
    IF cardinality(p_accounts) <= 16 AND current_setting('citus.version', true) IS NULL THEN
        PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
    END IF;
    IF cardinality(p_accounts) = 1 THEN
        accs := p_accounts;
        t_from := p_starts[1];
        t_to := p_ends[1];
    ELSE
        SELECT array_agg(DISTINCT a), min(s), max(e) INTO accs, t_from, t_to
          FROM unnest(p_accounts, p_starts, p_ends) AS x(a, s, e);
    END IF;
    SELECT cw.wins, cw.has_true_ups, cw.has_installments,
           -- pending adjustments, as lines (the row rebuilt as
           -- billing.adjustments: on Citus a is a shard's row)
           (SELECT array_agg(ROW(NULL, a.adjustment_id, 'adjustment', a.meter,
                                 billing._adjustment_text(ROW(a.*)::billing.adjustments),
                                 a.new_quantity - a.old_quantity, a.delta, NULL, NULL, NULL,
                                 a.adjustment_id, NULL, a.account_id, NULL, NULL, NULL, NULL, NULL,
                                 NULL)::billing._invoice_line)
              FROM billing.adjustments a
             WHERE a.account_id = ANY (accs) AND a.billed_invoice_id IS NULL),
           -- grants with something left, effective before the last period
           -- ends, with the next window of their commitment (for a rollover)
           (SELECT array_agg(ROW(g.account_id, g.grant_id, g.priority, g.effective_at, g.expires_at,
                                 g.applies_to::text[], g.source, l.remaining,
                                 CASE WHEN g.source = 'commitment' THEN c.rollover_fraction ELSE 0 END,
                                 nw.starts_at, nw.ends_at,
                                 coalesce(g.reason, g.source))::billing._credit_state)
              FROM billing.credit_grants g
                   JOIN LATERAL (SELECT sum(x.amount) AS remaining FROM billing.credit_ledger x
                                  WHERE x.account_id = g.account_id AND x.grant_id = g.grant_id) l ON true
                   LEFT JOIN billing.commitments c
                          ON c.account_id = g.account_id AND c.commitment_id = g.commitment_id
                   LEFT JOIN billing.commitment_windows nw
                          ON nw.account_id = g.account_id AND nw.commitment_id = g.commitment_id
                         AND nw.window_no = g.window_no + 1
             WHERE g.account_id = ANY (accs) AND g.voided_at IS NULL AND g.effective_at < t_to
               AND l.remaining > 0)
      INTO wins, has_true_ups, has_installments, adjs, grs
      -- the commitment windows overlapping the periods; minimum ones ending
      -- in them (true-ups), prepaid ones (installments)
      FROM (SELECT array_agg(ROW(w.account_id, w.commitment_id, w.window_no, c.kind, w.starts_at,
                                 w.ends_at, w.amount, c.applies_to::text[], c.installments,
                                 w.installment_due, w.installment_amounts)::billing._window) AS wins,
                   coalesce(bool_or(c.kind = 'minimum' AND w.ends_at > t_from AND w.ends_at <= t_to),
                            false) AS has_true_ups,
                   coalesce(bool_or(c.kind = 'prepaid'), false) AS has_installments
              FROM billing.commitment_windows w
                   JOIN billing.commitments c
                     ON c.account_id = w.account_id AND c.commitment_id = w.commitment_id
             WHERE w.account_id = ANY (accs) AND w.starts_at < t_to AND w.ends_at > t_from) cw;
    IF wins IS NULL AND adjs IS NULL AND grs IS NULL THEN
        RETURN QUERY SELECT * FROM unnest(l);
        RETURN;
    END IF;
    -- 3. true_up lines: the minimum windows ending in a period, short of
    -- the eligible spend of the finalized invoices inside the window (each
    -- invoice's usage, fixed and cap lines plus the adjustments made to it
    -- since, billed or pending) and of the periods built here
    IF has_true_ups THEN
        SELECT array_agg(y.account_id) AS accounts, array_agg(y.commitment_id) AS commitments,
               array_agg(y.window_no) AS windows, array_agg(y.spend) AS spends
          INTO sp
          FROM (SELECT w.account_id, w.commitment_id, w.window_no,
                       sum(billing._eligible_spend(c.applies_to::text[], b.kinds, b.meters, b.amounts)) AS spend
                  FROM billing.commitment_windows w
                       JOIN billing.commitments c
                         ON c.account_id = w.account_id AND c.commitment_id = w.commitment_id
                       JOIN billing.invoices i
                         ON i.account_id = w.account_id AND i.status = 'finalized'
                        AND i.period_start >= w.starts_at AND i.period_end <= w.ends_at
                       CROSS JOIN LATERAL (
                           SELECT array_agg(z.kind) AS kinds, array_agg(z.meter) AS meters,
                                  array_agg(z.amount) AS amounts
                             FROM (SELECT x.kind, x.meter::text AS meter, x.amount
                                     FROM billing.invoice_lines x
                                    WHERE x.account_id = i.account_id AND x.invoice_id = i.invoice_id
                                      AND x.kind IN ('usage', 'fixed', 'cap')
                                   UNION ALL
                                   SELECT a.line_kind, a.meter::text, a.delta FROM billing.adjustments a
                                    WHERE a.account_id = i.account_id AND a.invoice_id = i.invoice_id) z) b
                 WHERE w.account_id = ANY (accs) AND c.kind = 'minimum'
                   AND w.ends_at > t_from AND w.ends_at <= t_to
                 GROUP BY w.account_id, w.commitment_id, w.window_no) y;
        l := l || ARRAY(
            WITH per AS (
                SELECT x.n::integer AS idx, x.a AS account_id, x.cur AS currency, x.s AS ps, x.e AS pe
                  FROM unnest(p_accounts, p_currencies, p_starts, p_ends)
                       WITH ORDINALITY AS x(a, cur, s, e, n)
            ), batch AS (
                -- the periods being built, as (kind, meter, amount) lists
                SELECT x.idx, array_agg(x.kind) AS kinds, array_agg(x.meter) AS meters,
                       array_agg(x.amount) AS amounts
                  FROM unnest(l) x GROUP BY x.idx
            ), t AS (
                SELECT per.idx, w.commitment_id, w.window_no, w.starts_at, w.ends_at, per.currency,
                       w.amount, w.amount
                       - coalesce((SELECT s.spend
                                     FROM unnest(sp.accounts, sp.commitments, sp.windows, sp.spends)
                                          AS s(account_id, commitment_id, window_no, spend)
                                    WHERE s.account_id = w.account_id AND s.commitment_id = w.commitment_id
                                      AND s.window_no = w.window_no), 0)
                       - coalesce((SELECT sum(billing._eligible_spend(w.applies_to, b.kinds, b.meters, b.amounts))
                                     FROM per p2 JOIN batch b ON b.idx = p2.idx
                                    WHERE p2.account_id = w.account_id
                                      AND p2.ps >= w.starts_at AND p2.pe <= w.ends_at), 0) AS short
                  FROM per JOIN unnest(wins) w
                         ON w.account_id = per.account_id AND w.kind = 'minimum'
                        AND w.ends_at > per.ps AND w.ends_at <= per.pe
            )
            SELECT ROW(t.idx, 2000000000 + row_number() OVER (PARTITION BY t.idx ORDER BY t.commitment_id, t.window_no),
                       'true_up', NULL,
                       format('minimum commitment %s, %s to %s: shortfall', t.commitment_id,
                              to_char(t.starts_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                              to_char(t.ends_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
                       -- quantity: the window's eligible spend
                       t.amount - t.short, billing.round_money(t.short, t.currency), t.short, NULL,
                       NULL, NULL, t.commitment_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::billing._invoice_line
              FROM t
             WHERE billing.round_money(t.short, t.currency) > 0);
    END IF;
    -- commitment lines: each installment of a prepaid window on the period
    -- its schedule puts it in
    IF has_installments THEN
        l := l || ARRAY(
            SELECT ROW(x.n, 3000000000 + row_number() OVER (PARTITION BY x.n ORDER BY w.commitment_id, w.window_no, i.j),
                       'commitment', NULL,
                       CASE WHEN w.installments = 1
                            THEN format('prepaid commitment %s, window %s', w.commitment_id, w.window_no)
                            ELSE format('prepaid commitment %s, window %s: installment %s of %s',
                                        w.commitment_id, w.window_no, i.j, w.installments) END,
                       NULL, i.amount, NULL, NULL, NULL, NULL, w.commitment_id, NULL, NULL, NULL, NULL,
                       NULL, NULL, NULL)::billing._invoice_line
              FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, n)
                   JOIN unnest(wins) w ON w.account_id = x.a AND w.kind = 'prepaid',
                   unnest(w.installment_due, w.installment_amounts) WITH ORDINALITY AS i(due, amount, j)
             WHERE i.due >= x.s AND i.due < x.e);
    END IF;
    -- adjustment lines: the account's pending adjustments, on its first period
    IF adjs IS NOT NULL THEN
        l := l || ARRAY(
            SELECT ROW(x.n, 4000000000 + row_number() OVER (PARTITION BY x.n ORDER BY a.adjustment_id),
                       'adjustment', a.meter, a.description, a.quantity, a.amount, NULL, NULL, NULL,
                       a.adjustment_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::billing._invoice_line
              FROM unnest(p_accounts, p_first) WITH ORDINALITY AS x(a, f, n)
                   JOIN unnest(adjs) a ON a.grant_id = x.a
             WHERE x.f);
    END IF;
    -- 4. the credits, after every line above (_credit_draws)
    IF grs IS NOT NULL THEN
        l := l || ARRAY(SELECT x FROM billing._credit_draws(p_accounts, p_currencies, p_starts,
                                                            p_ends, p_book, l, grs) x);
    END IF;
    IF cardinality(p_accounts) = 1 THEN
        RETURN QUERY SELECT * FROM unnest(l);     -- in order already
    ELSE
        RETURN QUERY SELECT * FROM unnest(l) x ORDER BY x.idx, x.ord;
    END IF;
END
$$;
COMMENT ON FUNCTION billing._invoice_build(bigint[], text[], numeric[], timestamptz[], timestamptz[], boolean[], integer[], text[], timestamptz[], timestamptz[], boolean, boolean) IS
    'Internal: the lines of many billing periods in invoice order (usage and fixed per plan segment, cap, true_up, commitment, adjustment, credit) and the ledger entries they book';

/*
 * _period_build: _invoice_build for the billing periods holding some
 * (account, moment) pairs (_segments), each period once; the account's
 * earliest of them carries its pending adjustments.  invoice_preview,
 * remaining and rerate read invoices through it.
 */
CREATE FUNCTION billing._period_build(p_accounts bigint[], p_ats timestamptz[],
                                      p_rated_only boolean DEFAULT false)
    RETURNS TABLE (account_id bigint, period_start timestamptz, period_end timestamptz,
                   currency text, spend_cap numeric, invoice_plan text, line billing._invoice_line)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
DECLARE
    v record;
BEGIN
    -- the periods (k = 1..) and their segments, as _invoice_build's arrays
    SELECT array_agg(x.account_id ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS accounts,
           array_agg(x.currency ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS currencies,
           array_agg(x.cap ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS caps,
           array_agg(x.period_start ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS starts,
           array_agg(x.period_end ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS ends,
           array_agg(x.first ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS firsts,
           array_agg(x.invoice_plan ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS plans,
           array_agg(x.k ORDER BY x.k, x.segment_start) AS s_idx,
           array_agg(x.plan ORDER BY x.k, x.segment_start) AS s_plans,
           array_agg(x.segment_start ORDER BY x.k, x.segment_start) AS s_starts,
           array_agg(x.segment_end ORDER BY x.k, x.segment_start) AS s_ends
      INTO v
      FROM (SELECT y.*, (dense_rank() OVER (ORDER BY y.account_id, y.grid_start))::integer AS k,
                   y.grid_start = min(y.grid_start) OVER (PARTITION BY y.account_id) AS first,
                   (row_number() OVER w)::integer AS segment_no,
                   first_value(y.segment_start) OVER w AS period_start,
                   last_value(y.segment_end) OVER w AS period_end,
                   last_value(y.spend_cap) OVER w AS cap,
                   last_value(y.plan) OVER w AS invoice_plan
              FROM (SELECT DISTINCT ON (s.account_id, s.grid_start, s.segment_start) s.*
                      FROM billing._segments(p_accounts, p_ats) s
                     ORDER BY s.account_id, s.grid_start, s.segment_start) y
            WINDOW w AS (PARTITION BY y.account_id, y.grid_start ORDER BY y.segment_start
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) x;
    IF v.accounts IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT v.accounts[b.idx], v.starts[b.idx], v.ends[b.idx], v.currencies[b.idx], v.caps[b.idx],
           v.plans[b.idx], b
      FROM billing._invoice_build(v.accounts, v.currencies, v.caps, v.starts, v.ends, v.firsts,
                                  v.s_idx, v.s_plans, v.s_starts, v.s_ends, p_rated_only, false) b;
END
$$;
COMMENT ON FUNCTION billing._period_build(bigint[], timestamptz[], boolean) IS
    'Internal: _invoice_build for the billing periods holding some (account, moment) pairs';

-- checks shared by the functions below ------------------------------------------------------

/*
 * _contract_account: the currency of an account that must exist (23503),
 * after locking its row (FOR NO KEY UPDATE): every function that books
 * credits, commitments or plan changes of an account takes this lock, as
 * finalize_invoices does, so they never interleave.
 */
CREATE FUNCTION billing._contract_account(p_account bigint) RETURNS text
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    cur text;
BEGIN
    SELECT a.currency INTO cur FROM billing.accounts a WHERE a.account_id = p_account
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account % does not exist', p_account USING ERRCODE = '23503';
    END IF;
    RETURN cur;
END
$$;
COMMENT ON FUNCTION billing._contract_account(bigint) IS
    'Internal: locks an account (23503 when unknown) and returns its currency';

-- an amount of money for a credit or commitment: finite, >= 0, in minor units
CREATE FUNCTION billing._check_money(p_amount numeric, p_currency text, p_what text) RETURNS void
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF p_amount IN ('NaN', 'Infinity', '-Infinity') OR p_amount < 0 THEN
        RAISE EXCEPTION 'invalid % amount: %', p_what, p_amount
            USING ERRCODE = '22023', DETAIL = 'An amount is a finite number >= 0.';
    END IF;
    IF billing.round_money(p_amount, p_currency) <> p_amount THEN
        RAISE EXCEPTION 'invalid % amount: %', p_what, p_amount
            USING ERRCODE = '22023',
                  DETAIL = format('Amounts are in the account''s currency, %s, to its minor unit (%s decimals).',
                                  p_currency, billing.currency_exponent(p_currency));
    END IF;
END
$$;
COMMENT ON FUNCTION billing._check_money(numeric, text, text) IS
    'Internal: 22023 unless an amount is finite, >= 0 and in the currency''s minor unit';

-- applies_to: NULL, or a non-empty list of meters that exist (sorted, once each)
CREATE FUNCTION billing._check_applies_to(p_applies_to text[]) RETURNS text[]
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    missing text;
BEGIN
    IF p_applies_to IS NULL THEN
        RETURN NULL;
    END IF;
    IF cardinality(p_applies_to) = 0 OR array_position(p_applies_to, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'invalid applies_to: %', p_applies_to
            USING ERRCODE = '22023', DETAIL = 'applies_to is NULL (every line) or a list of meters.';
    END IF;
    SELECT m INTO missing FROM unnest(p_applies_to) m
     WHERE NOT EXISTS (SELECT 1 FROM billing.meters x WHERE x.meter = m) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'meter "%" does not exist', missing USING ERRCODE = '23503';
    END IF;
    RETURN ARRAY(SELECT DISTINCT m COLLATE "C" FROM unnest(p_applies_to) m ORDER BY 1);
END
$$;
COMMENT ON FUNCTION billing._check_applies_to(text[]) IS
    'Internal: NULL or a sorted list of existing meters (23503 for an unknown one, 22023 for an empty list)';

-- the next ledger seq of an account (its row is locked by the caller)
CREATE FUNCTION billing._ledger_next_seq(p_account bigint) RETURNS bigint
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN (SELECT coalesce(max(l.seq), 0) + 1 FROM billing.credit_ledger l
             WHERE l.account_id = p_account);
END
$$;
COMMENT ON FUNCTION billing._ledger_next_seq(bigint) IS
    'Internal: the next seq of an account''s credit ledger';

-- credits ------------------------------------------------------------------------------------

CREATE FUNCTION billing.grant_credit(account_id bigint, amount numeric,
                                     effective_at timestamptz DEFAULT pg_catalog.now(),
                                     expires_at timestamptz DEFAULT NULL,
                                     priority integer DEFAULT 50, applies_to text[] DEFAULT NULL,
                                     reason text DEFAULT NULL, idempotency_key text DEFAULT NULL)
    RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    cur text;
    id bigint;
BEGIN
    IF account_id IS NULL OR amount IS NULL OR effective_at IS NULL OR priority IS NULL THEN
        RAISE EXCEPTION 'grant_credit: account_id, amount, effective_at and priority must not be null'
            USING ERRCODE = '22004';
    END IF;
    cur := billing._contract_account(grant_credit.account_id);
    IF idempotency_key IS NOT NULL THEN
        SELECT g.grant_id INTO id FROM billing.credit_grants g
         WHERE g.account_id = grant_credit.account_id
           AND g.idempotency_key = grant_credit.idempotency_key;
        IF FOUND THEN
            RETURN id;        -- a repeated key: the first grant
        END IF;
    END IF;
    PERFORM billing._check_money(amount, cur, 'credit');
    IF priority NOT BETWEEN 0 AND 100 THEN
        RAISE EXCEPTION 'invalid priority: %', priority
            USING ERRCODE = '22023', DETAIL = 'A priority is 0 to 100; lower is drawn first.';
    END IF;
    IF NOT isfinite(effective_at) OR NOT coalesce(isfinite(expires_at), true)
       OR expires_at <= effective_at THEN
        RAISE EXCEPTION 'invalid credit window: effective % to %', effective_at, coalesce(expires_at::text, 'never')
            USING ERRCODE = '22023', DETAIL = 'expires_at must be finite and after effective_at (or NULL: never).';
    END IF;
    applies_to := billing._check_applies_to(applies_to);
    INSERT INTO billing.credit_grants (account_id, amount, effective_at, expires_at, priority,
                                       applies_to, source, reason, idempotency_key)
    VALUES (grant_credit.account_id, billing.round_money(amount, cur), effective_at, expires_at,
            priority, applies_to, 'manual', reason, idempotency_key)
    RETURNING billing.credit_grants.grant_id INTO id;
    INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at)
    VALUES (grant_credit.account_id, billing._ledger_next_seq(grant_credit.account_id), id,
            'grant', billing.round_money(amount, cur), effective_at);
    RETURN id;
END
$$;
COMMENT ON FUNCTION billing.grant_credit(bigint, numeric, timestamptz, timestamptz, integer, text[], text, text) IS
    'Grants an account credit (prepaid or promotional) that invoices draw from; a repeated idempotency_key returns the first grant''s id';

CREATE FUNCTION billing.void_credit(account_id bigint, grant_id bigint, reason text,
                                    at timestamptz DEFAULT pg_catalog.now())
    RETURNS numeric
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    g billing.credit_grants;
    left_over numeric;
BEGIN
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'voiding a credit needs a reason' USING ERRCODE = '22004';
    END IF;
    IF account_id IS NULL OR grant_id IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'void_credit: account_id, grant_id and at must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT isfinite(at) THEN
        RAISE EXCEPTION 'void_credit: at must be finite' USING ERRCODE = '22023';
    END IF;
    PERFORM billing._contract_account(void_credit.account_id);
    SELECT * INTO g FROM billing.credit_grants x
     WHERE x.account_id = void_credit.account_id AND x.grant_id = void_credit.grant_id
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'credit grant % of account % does not exist', void_credit.grant_id,
              void_credit.account_id USING ERRCODE = '23503';
    END IF;
    IF g.voided_at IS NOT NULL THEN
        RETURN 0;             -- voided before: nothing left to forfeit
    END IF;
    SELECT coalesce(sum(l.amount), 0) INTO left_over FROM billing.credit_ledger l
     WHERE l.account_id = g.account_id AND l.grant_id = g.grant_id;
    UPDATE billing.credit_grants x SET voided_at = void_credit.at, void_reason = void_credit.reason
     WHERE x.account_id = g.account_id AND x.grant_id = g.grant_id;
    INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at)
    VALUES (g.account_id, billing._ledger_next_seq(g.account_id), g.grant_id, 'void', -left_over,
            greatest(at, g.effective_at));
    RETURN left_over;
END
$$;
COMMENT ON FUNCTION billing.void_credit(bigint, bigint, text, timestamptz) IS
    'Voids a credit grant: what is left of it is forfeited (returned) and booked as void; what was used stays used';

/*
 * credit_balance: every grant of the account effective at `at`, expired
 * and voided ones too, in the drawdown order, with the ledger's entries
 * effective by `at` summed by kind.
 */
CREATE FUNCTION billing.credit_balance(account_id bigint, at timestamptz DEFAULT pg_catalog.now())
    RETURNS TABLE (grant_id bigint, priority integer, effective_at timestamptz,
                   expires_at timestamptz, granted numeric, used numeric, expired numeric,
                   voided numeric, rolled_over numeric, remaining numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
#variable_conflict use_column
BEGIN
    IF credit_balance.account_id IS NULL OR credit_balance.at IS NULL THEN
        RAISE EXCEPTION 'credit_balance: account_id and at must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.accounts a WHERE a.account_id = credit_balance.account_id) THEN
        RAISE EXCEPTION 'account % does not exist', credit_balance.account_id USING ERRCODE = '23503';
    END IF;
    RETURN QUERY
    SELECT g.grant_id, g.priority, g.effective_at, g.expires_at,
           coalesce(sum(l.amount) FILTER (WHERE l.kind = 'grant'), 0),
           coalesce(-sum(l.amount) FILTER (WHERE l.kind = 'draw'), 0),
           coalesce(-sum(l.amount) FILTER (WHERE l.kind = 'expire'), 0),
           coalesce(-sum(l.amount) FILTER (WHERE l.kind = 'void'), 0),
           coalesce(-sum(l.amount) FILTER (WHERE l.kind = 'rollover'), 0),
           coalesce(sum(l.amount), 0)
      FROM billing.credit_grants g
           LEFT JOIN billing.credit_ledger l
                  ON l.account_id = g.account_id AND l.grant_id = g.grant_id
                 AND l.effective_at <= credit_balance.at
     WHERE g.account_id = credit_balance.account_id AND g.effective_at <= credit_balance.at
     GROUP BY g.grant_id, g.priority, g.effective_at, g.expires_at, g.applies_to
     ORDER BY g.priority, g.applies_to IS NULL, g.expires_at ASC NULLS LAST, g.effective_at,
              g.grant_id;
END
$$;
COMMENT ON FUNCTION billing.credit_balance(bigint, timestamptz) IS
    'The grants of an account effective at a moment, in drawdown order, with granted = used + expired + voided + rolled_over + remaining as booked by then';

-- commitments ----------------------------------------------------------------------------------

/*
 * _period_boundary: is ts a billing period boundary of the account (a
 * subscription's start or end, or a point of its period grid)?  Returns
 * the period length of the subscription it is a boundary of (NULL: none).
 */
CREATE FUNCTION billing._period_boundary(p_account bigint, p_ts timestamptz) RETURNS interval
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN (SELECT s.period FROM billing._subscriptions_of(ARRAY[p_account], false) s
             WHERE p_ts = s.starts_at OR p_ts = s.ends_at
                OR (s.starts_at < p_ts AND p_ts < coalesce(s.ends_at, 'infinity')
                    AND billing._add_periods(s.anchor, s.period,
                                             billing._period_index(s.anchor, s.period, p_ts)) = p_ts)
             ORDER BY s.starts_at DESC LIMIT 1);
END
$$;
COMMENT ON FUNCTION billing._period_boundary(bigint, timestamptz) IS
    'Internal: the period length of the subscription a moment is a period boundary of (NULL: not a boundary)';

CREATE FUNCTION billing.add_commitment(account_id bigint, kind text, amount numeric,
                                       starts_at timestamptz, ends_at timestamptz,
                                       commit_period interval DEFAULT NULL,
                                       applies_to text[] DEFAULT NULL,
                                       installments integer DEFAULT 1,
                                       rollover_fraction numeric DEFAULT 0)
    RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    cur text;
    per interval;
    id bigint;
    n_windows integer := 0;
    ws timestamptz;
    we timestamptz;
    w integer;
    w_amount numeric;
    gid bigint;
    bad timestamptz;
    details jsonb;
BEGIN
    IF account_id IS NULL OR kind IS NULL OR amount IS NULL OR starts_at IS NULL OR ends_at IS NULL
       OR installments IS NULL OR rollover_fraction IS NULL THEN
        RAISE EXCEPTION 'add_commitment: only commit_period and applies_to may be null'
            USING ERRCODE = '22004';
    END IF;
    cur := billing._contract_account(add_commitment.account_id);
    IF kind NOT IN ('prepaid', 'minimum') THEN
        RAISE EXCEPTION 'unknown commitment kind "%"', kind
            USING ERRCODE = '22023', DETAIL = 'A commitment is prepaid or minimum.';
    END IF;
    PERFORM billing._check_money(amount, cur, 'commitment');
    IF NOT isfinite(starts_at) OR NOT isfinite(ends_at) OR ends_at <= starts_at THEN
        RAISE EXCEPTION 'invalid commitment term: % to %', starts_at, ends_at
            USING ERRCODE = '22023', DETAIL = 'ends_at must be finite and after starts_at.';
    END IF;
    IF commit_period <= interval '0' THEN
        RAISE EXCEPTION 'invalid commit_period: %', commit_period USING ERRCODE = '22023';
    END IF;
    IF installments < 1 THEN
        RAISE EXCEPTION 'invalid installments: %', installments
            USING ERRCODE = '22023', DETAIL = 'A window is invoiced in 1 or more installments.';
    END IF;
    IF rollover_fraction = 'NaN' OR rollover_fraction NOT BETWEEN 0 AND 1 THEN
        RAISE EXCEPTION 'invalid rollover_fraction: %', rollover_fraction
            USING ERRCODE = '22023', DETAIL = 'A rollover fraction is 0 to 1.';
    END IF;
    applies_to := billing._check_applies_to(applies_to);
    IF EXISTS (SELECT 1 FROM billing.invoices i
                WHERE i.account_id = add_commitment.account_id AND i.period_end > starts_at) THEN
        RAISE EXCEPTION 'commitment of account % starts at %, inside an already finalized period',
              add_commitment.account_id, starts_at
            USING ERRCODE = '55000', HINT = 'Start it at or after the end of the last finalized period.';
    END IF;

    -- the windows: [starts_at + k * commit_period, ...) cut at ends_at, each
    -- on the account's period boundaries
    per := billing._period_boundary(add_commitment.account_id, starts_at);
    LOOP
        ws := CASE WHEN commit_period IS NULL THEN starts_at
                   ELSE billing._add_periods(starts_at, commit_period, n_windows) END;
        EXIT WHEN ws >= ends_at;
        we := CASE WHEN commit_period IS NULL THEN ends_at
                   ELSE least(billing._add_periods(starts_at, commit_period, n_windows + 1), ends_at) END;
        IF per IS NULL OR billing._period_boundary(add_commitment.account_id, ws) IS DISTINCT FROM per
           OR billing._period_boundary(add_commitment.account_id, we) IS DISTINCT FROM per THEN
            bad := CASE WHEN per IS NULL OR billing._period_boundary(add_commitment.account_id, ws)
                                             IS DISTINCT FROM per THEN ws ELSE we END;
            RAISE EXCEPTION 'commitment window boundary % is not a billing period boundary of account %',
                  bad, add_commitment.account_id
                USING ERRCODE = '22023',
                      DETAIL = 'Windows start and end where the account''s subscription periods do.';
        END IF;
        IF kind = 'prepaid' AND installments > billing._period_index(ws, per, we - interval '1 microsecond') + 1 THEN
            RAISE EXCEPTION 'commitment window % to % has % billing periods, fewer than % installments',
                  ws, we, billing._period_index(ws, per, we - interval '1 microsecond') + 1, installments
                USING ERRCODE = '22023', DETAIL = 'Each installment is invoiced on a period of its window.';
        END IF;
        n_windows := n_windows + 1;
        EXIT WHEN commit_period IS NULL;
    END LOOP;

    INSERT INTO billing.commitments (account_id, kind, amount, starts_at, ends_at, commit_period,
                                     applies_to, installments, rollover_fraction, period)
    VALUES (add_commitment.account_id, kind, amount, starts_at, ends_at, commit_period, applies_to,
            installments, rollover_fraction, per)
    RETURNING billing.commitments.commitment_id INTO id;
    FOR w IN 1 .. n_windows LOOP
        ws := CASE WHEN commit_period IS NULL THEN starts_at
                   ELSE billing._add_periods(starts_at, commit_period, w - 1) END;
        we := CASE WHEN commit_period IS NULL THEN ends_at
                   ELSE least(billing._add_periods(starts_at, commit_period, w), ends_at) END;
        w_amount := billing._installment(amount, w, n_windows, cur);
        INSERT INTO billing.commitment_windows (account_id, commitment_id, window_no, starts_at,
                                                ends_at, amount, installment_due,
                                                installment_amounts)
        SELECT add_commitment.account_id, id, w, ws, we, w_amount,
               CASE WHEN kind = 'prepaid'
                    THEN array_agg(billing._add_periods(ws, per, i - 1) ORDER BY i) END,
               CASE WHEN kind = 'prepaid'
                    THEN array_agg(billing._installment(w_amount, i, installments, cur) ORDER BY i) END
          FROM generate_series(1, installments) i;
        IF kind = 'prepaid' THEN
            INSERT INTO billing.credit_grants (account_id, amount, effective_at, expires_at,
                                               applies_to, source, reason, commitment_id, window_no)
            VALUES (add_commitment.account_id, w_amount, ws, we, applies_to, 'commitment',
                    format('prepaid commitment %s, window %s', id, w), id, w)
            RETURNING billing.credit_grants.grant_id INTO gid;
            INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at)
            VALUES (add_commitment.account_id, billing._ledger_next_seq(add_commitment.account_id),
                    gid, 'grant', w_amount, ws);
        END IF;
    END LOOP;
    -- the details first: on Citus a call with queries in its arguments
    -- would be pushed down to a shard
    SELECT to_jsonb(c) INTO details FROM billing.commitments c
     WHERE c.account_id = add_commitment.account_id AND c.commitment_id = id;
    SELECT details || jsonb_build_object('windows',
               jsonb_agg(jsonb_build_object('window_no', w2.window_no, 'starts_at', w2.starts_at,
                                            'ends_at', w2.ends_at, 'amount', w2.amount)
                         ORDER BY w2.window_no))
      INTO details
      FROM billing.commitment_windows w2
     WHERE w2.account_id = add_commitment.account_id AND w2.commitment_id = id;
    PERFORM billing._audit_append(add_commitment.account_id, 'commit', format('commitment:%s', id),
                                  details);
    RETURN id;
END
$$;
COMMENT ON FUNCTION billing.add_commitment(bigint, text, numeric, timestamptz, timestamptz, interval, text[], integer, numeric) IS
    'Adds a commitment: prepaid (a credit grant per window, invoiced in installments, with rollover) or minimum (a true-up line when a window''s eligible spend falls short)';

-- plan changes -----------------------------------------------------------------------------------

CREATE FUNCTION billing.change_plan(account_id bigint, plan text, at timestamptz DEFAULT pg_catalog.now())
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    s record;
    new_period interval;
    closed timestamptz;
BEGIN
    IF account_id IS NULL OR plan IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'change_plan: account_id, plan and at must not be null' USING ERRCODE = '22004';
    END IF;
    PERFORM billing._contract_account(change_plan.account_id);
    SELECT p.period INTO new_period FROM billing.plans p WHERE p.plan = change_plan.plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'plan "%" does not exist', change_plan.plan USING ERRCODE = '23503';
    END IF;
    IF NOT isfinite(at) THEN
        RAISE EXCEPTION 'change_plan: at must be finite' USING ERRCODE = '22023';
    END IF;
    SELECT max(i.period_end) INTO closed FROM billing.invoices i
     WHERE i.account_id = change_plan.account_id;
    IF closed > at THEN
        RAISE EXCEPTION 'account % is invoiced up to %: % is inside an already finalized period',
              change_plan.account_id, closed, at
            USING ERRCODE = '55000', HINT = 'Change the plan at or after the end of the last finalized period.';
    END IF;
    SELECT sub.*, p.period INTO s
      FROM billing.subscriptions sub JOIN billing.plans p ON p.plan = sub.plan
     WHERE sub.account_id = change_plan.account_id AND sub.starts_at <= at
       AND (sub.ends_at IS NULL OR at < sub.ends_at)
       FOR UPDATE OF sub;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account % has no subscription at %', change_plan.account_id, at
            USING ERRCODE = '55000', HINT = 'Subscribe the account (insert into billing.subscriptions).';
    END IF;
    IF s.plan = change_plan.plan THEN
        RETURN;               -- already on it
    END IF;
    IF new_period <> s.period THEN
        RAISE EXCEPTION 'plan "%" bills every %, plan "%" every %', change_plan.plan, new_period,
              s.plan, s.period
            USING ERRCODE = '22023', DETAIL = 'A plan change keeps the account''s billing periods.';
    END IF;
    IF s.starts_at = at THEN
        UPDATE billing.subscriptions sub SET plan = change_plan.plan
         WHERE sub.account_id = change_plan.account_id AND sub.starts_at = s.starts_at;
    ELSE
        UPDATE billing.subscriptions sub SET ends_at = at
         WHERE sub.account_id = change_plan.account_id AND sub.starts_at = s.starts_at;
        INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at, spend_cap, period_anchor)
        VALUES (change_plan.account_id, change_plan.plan, at, s.ends_at, s.spend_cap,
                coalesce(s.period_anchor, s.starts_at));
    END IF;
    PERFORM billing._audit_append(change_plan.account_id, 'change_plan',
        format('subscription:%s/%s', change_plan.account_id, at),
        jsonb_build_object('account_id', change_plan.account_id, 'from_plan', s.plan,
                           'to_plan', change_plan.plan, 'at', at));
END
$$;
COMMENT ON FUNCTION billing.change_plan(bigint, text, timestamptz) IS
    'Moves an account to another plan at a moment: the current subscription ends there and the new one starts there, on the same period grid; the period holding it is one invoice with both plans'' lines';

-- periods, preview, finalize, remaining (50_invoices.sql), subscriptions (40_plans.sql)
CREATE OR REPLACE FUNCTION billing._subscriptions_check() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    acc_currency text;
    plan_currency text;
    per interval;
    anchor timestamptz;
    n integer;
    gs timestamptz;
BEGIN
    SELECT a.currency INTO acc_currency FROM billing.accounts a WHERE a.account_id = NEW.account_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account % does not exist', NEW.account_id USING ERRCODE = '23503';
    END IF;
    SELECT p.currency INTO plan_currency FROM billing.plans p WHERE p.plan = NEW.plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'plan "%" does not exist', NEW.plan USING ERRCODE = '23503';
    END IF;
    IF acc_currency IS DISTINCT FROM plan_currency THEN
        RAISE EXCEPTION 'plan "%" bills in %, account % in %', NEW.plan, plan_currency,
              NEW.account_id, acc_currency
            USING ERRCODE = '22023',
                  HINT = 'Subscribe the account to a plan in its own currency.';
    END IF;
    -- changes to an account's subscriptions one at a time (a row lock: no
    -- lock table entry, however many accounts one statement touches)
    PERFORM 1 FROM billing.accounts a WHERE a.account_id = NEW.account_id FOR NO KEY UPDATE;
    IF EXISTS (SELECT 1 FROM billing.subscriptions s
                WHERE s.account_id = NEW.account_id
                  AND (TG_OP = 'INSERT' OR s.starts_at <> OLD.starts_at)
                  AND s.starts_at < coalesce(NEW.ends_at, 'infinity')
                  AND NEW.starts_at < coalesce(s.ends_at, 'infinity')) THEN
        RAISE EXCEPTION 'subscription of account % from % overlaps another', NEW.account_id, NEW.starts_at
            USING ERRCODE = '23P01',
                  HINT = 'End the current subscription (ends_at) where the next one starts.';
    END IF;
    IF TG_OP = 'UPDATE' AND (NEW.plan IS DISTINCT FROM OLD.plan OR NEW.starts_at IS DISTINCT FROM OLD.starts_at
                             OR NEW.account_id IS DISTINCT FROM OLD.account_id
                             OR NEW.period_anchor IS DISTINCT FROM OLD.period_anchor)
       AND EXISTS (SELECT 1 FROM billing.invoices i
                    WHERE i.account_id = OLD.account_id AND i.period_start < coalesce(OLD.ends_at, 'infinity')
                      AND i.period_end > OLD.starts_at) THEN
        RAISE EXCEPTION 'subscription of account % from % has finalized invoices', OLD.account_id, OLD.starts_at
            USING ERRCODE = '55000',
                  DETAIL = 'Its plan and start cannot change; its end and spend cap can (re-rate to bill the effect).';
    END IF;
    -- a new start must not add a plan segment to a finalized period: the
    -- grid period holding it (on its own grid) may not be the grid period of
    -- an invoiced subscription (change_plan's pieces of one period share it)
    IF (TG_OP = 'INSERT' OR NEW.starts_at IS DISTINCT FROM OLD.starts_at
        OR NEW.period_anchor IS DISTINCT FROM OLD.period_anchor)
       AND isfinite(NEW.starts_at) AND coalesce(isfinite(NEW.period_anchor), true)
       AND coalesce(NEW.period_anchor <= NEW.starts_at, true) THEN
        SELECT p.period INTO per FROM billing.plans p WHERE p.plan = NEW.plan;
        anchor := coalesce(NEW.period_anchor, NEW.starts_at);
        n := billing._period_index(anchor, per, NEW.starts_at);
        gs := billing._add_periods(anchor, per, n);
        IF EXISTS (SELECT 1 FROM billing.invoices i
                        JOIN billing.subscriptions s
                          ON s.account_id = i.account_id AND s.starts_at <= i.period_start
                         AND i.period_start < coalesce(s.ends_at, 'infinity')
                        JOIN billing.plans p ON p.plan = s.plan
                    WHERE i.account_id = NEW.account_id AND i.status = 'finalized'
                      AND i.period_start < billing._add_periods(anchor, per, n + 1)
                      AND i.period_end > gs AND p.period = per
                      AND billing._add_periods(coalesce(s.period_anchor, s.starts_at), per,
                              billing._period_index(coalesce(s.period_anchor, s.starts_at), per,
                                                    i.period_start)) = gs) THEN
            RAISE EXCEPTION 'the billing period of account % from % is already finalized', NEW.account_id, gs
                USING ERRCODE = '55000',
                      DETAIL = 'A subscription starting there would add a plan segment to a finalized invoice.';
        END IF;
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION billing._subscriptions_check() IS
    'Internal: a subscription''s plan must bill in the account''s currency, subscriptions of an account must not overlap, and none may add a plan segment to a finalized period';

CREATE OR REPLACE FUNCTION billing._subscriptions_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM billing.invoices i
                WHERE i.account_id = OLD.account_id AND i.period_start < coalesce(OLD.ends_at, 'infinity')
                  AND i.period_end > OLD.starts_at) THEN
        RAISE EXCEPTION 'subscription of account % from % has finalized invoices', OLD.account_id, OLD.starts_at
            USING ERRCODE = '55000', HINT = 'Set ends_at instead of deleting it.';
    END IF;
    RETURN OLD;
END
$$;
COMMENT ON FUNCTION billing._subscriptions_guard() IS
    'Internal: a subscription that was invoiced cannot be deleted';

CREATE FUNCTION billing._cap_amount(cap numeric, currency text, usage numeric) RETURNS numeric
    AS 'MODULE_PATHNAME', 'billing_cap_amount'
    LANGUAGE C STABLE STRICT;
COMMENT ON FUNCTION billing._cap_amount(numeric, text, numeric) IS
    'Internal: the amount of the spend cap line of a period whose usage lines add up to usage (NULL: not capped)';

CREATE OR REPLACE FUNCTION billing._rate_periods(p_accounts bigint[], p_plans text[], p_currencies text[],
                                      p_caps numeric[], p_starts timestamptz[],
                                      p_ends timestamptz[])
    RETURNS TABLE (idx integer, ord integer, kind text, meter text, description text,
                   quantity numeric, amount numeric, unrounded_amount numeric,
                   charge_id bigint, price billing.price)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
BEGIN
    RETURN QUERY
    WITH per AS (
        SELECT x.i::integer AS idx, x.pl AS plan, x.cur AS currency, x.cap, x.s AS ps
          FROM unnest(p_plans, p_currencies, p_caps, p_starts) WITH ORDINALITY AS x(pl, cur, cap, s, i)
    ), versions AS (
        -- the charge versions in force, once per (plan, period start) however
        -- many accounts share them, numbered in invoice order: fixed fees by
        -- description, then usage by meter (the spend cap comes last)
        SELECT v.*, (row_number() OVER (PARTITION BY v.plan, v.ps
                                        ORDER BY v.grp, v.description, v.meter))::integer AS ord,
               (count(*) OVER (PARTITION BY v.plan, v.ps))::integer AS n_lines
          FROM (SELECT DISTINCT ON (k.plan, k.ps, c.meter,
                                    CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END)
                       k.plan, k.ps, c.charge_id, c.meter::text AS meter,
                       coalesce(c.description, c.meter) AS description, c.price,
                       CASE WHEN c.meter IS NULL THEN 1 ELSE 2 END AS grp
                  FROM (SELECT DISTINCT per.plan, per.ps FROM per) k
                       JOIN billing.charges c ON c.plan = k.plan AND c.valid_from <= k.ps
                 ORDER BY k.plan, k.ps, c.meter,
                          CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END,
                          c.valid_from DESC) v
    ), widths AS (
        -- the bucket widths of the meters each (plan, period start) charges
        SELECT DISTINCT v.plan, v.ps, m.bucket_width
          FROM versions v JOIN billing.meters m ON m.meter = v.meter
    ), firsts AS (
        -- a metered charge of a period bills the buckets of its meter that
        -- start in [lo, period end), lo by the one rule of src/periods.c
        -- for the meter's bucket width: the bucket straddling a
        -- subscription's start goes to its first period, every other one
        -- to the period holding its start
        SELECT per.idx, w.bucket_width,
               billing._period_first_bucket(per.ps, uf.usage_from, w.bucket_width) AS lo
          FROM per JOIN widths w ON w.plan = per.plan AND w.ps = per.ps
               JOIN billing._period_usage_from(p_accounts, p_starts) uf ON uf.idx = per.idx
    ), reads AS (
        -- one read of the usage store per period and distinct lo (more than
        -- one only in a first period whose meters' buckets straddle its
        -- start at different points)
        SELECT r.idx, r.lo, (row_number() OVER (ORDER BY r.idx, r.lo))::integer AS j
          FROM (SELECT DISTINCT f.idx, f.lo FROM firsts f) r
    ), totals AS MATERIALIZED (
        -- (read once: inlined, the join below would read the store per line)
        -- each meter from the read whose lo is that of its bucket width
        SELECT rd.idx, t.meter, t.quantity
          FROM (SELECT array_agg(p_accounts[rd.idx] ORDER BY rd.j) AS accounts,
                       array_agg(rd.lo ORDER BY rd.j) AS starts,
                       array_agg(p_ends[rd.idx] ORDER BY rd.j) AS ends
                  FROM reads rd) a,
               LATERAL billing._usage_totals_many(a.accounts, a.starts, a.ends) t
               JOIN reads rd ON rd.j = t.idx
               JOIN billing.meters m ON m.meter = t.meter
               JOIN firsts f ON f.idx = rd.idx AND f.lo = rd.lo AND f.bucket_width = m.bucket_width
    ), rated AS (
        SELECT per.idx, per.currency, v.ord, v.n_lines, v.grp,
               CASE WHEN v.meter IS NULL THEN 'fixed' ELSE 'usage' END AS kind,
               v.meter, v.description,
               CASE WHEN v.meter IS NULL THEN NULL ELSE coalesce(t.quantity, 0) END AS quantity,
               billing.rate(v.price, CASE WHEN v.meter IS NULL THEN 0 ELSE coalesce(t.quantity, 0) END)
                   AS unrounded_amount,
               v.charge_id, v.price
          FROM per JOIN versions v ON v.plan = per.plan AND v.ps = per.ps
               LEFT JOIN totals t ON t.idx = per.idx AND t.meter = v.meter
    ), lines AS (
        SELECT r.*, billing.round_money(r.unrounded_amount, r.currency) AS amount FROM rated r
    ), capped AS (
        SELECT per.idx, max(l.n_lines) + 1 AS ord, 'cap'::text AS kind, NULL::text AS meter,
               'spend cap'::text AS description, NULL::numeric AS quantity,
               NULL::numeric AS unrounded_amount, NULL::bigint AS charge_id,
               NULL::billing.price AS price,
               billing._cap_amount(per.cap, per.currency, sum(l.amount)) AS amount
          FROM per JOIN lines l ON l.idx = per.idx AND l.kind = 'usage'
         WHERE per.cap IS NOT NULL
         GROUP BY per.idx, per.cap, per.currency
        HAVING billing._cap_amount(per.cap, per.currency, sum(l.amount)) IS NOT NULL
    )
    SELECT l.idx, l.ord, l.kind, l.meter, l.description, l.quantity, l.amount,
           l.unrounded_amount, l.charge_id, l.price
      FROM lines l
    UNION ALL
    SELECT c.idx, c.ord, c.kind, c.meter, c.description, c.quantity, c.amount,
           c.unrounded_amount, c.charge_id, c.price
      FROM capped c;
END
$$;
COMMENT ON FUNCTION billing._rate_periods(bigint[], text[], text[], numeric[], timestamptz[], timestamptz[]) IS
    'Internal: the rated lines (fixed fees, usage, spend cap) of many billing periods';

DROP FUNCTION billing._period_at(bigint, timestamptz);
DROP FUNCTION billing._pending_adjustments(bigint);
DROP FUNCTION billing._due_periods(timestamptz);
CREATE FUNCTION billing._due_periods(cutoff timestamptz)
    RETURNS TABLE (account_id bigint, plan text, currency text, spend_cap numeric,
                   period_start timestamptz, period_end timestamptz, segment_plan text,
                   segment_start timestamptz, segment_end timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
DECLARE
    accs bigint[];
    ats timestamptz[];
BEGIN
    WITH subs AS (
        SELECT * FROM billing._subscriptions_of(NULL, true)
    ), walk AS (
        SELECT s.*, billing._period_index(s.anchor, s.period, s.starts_at) AS n_first,
               billing._period_index(s.anchor, s.period, s.last_invoiced) + 1 AS n_next,
               billing._period_index(s.anchor, s.period,
                   least(coalesce(s.ends_at, 'infinity') - interval '1 microsecond', cutoff)) AS n_last
          FROM subs s
    )
    SELECT array_agg(w.account_id ORDER BY w.account_id, n), 
           array_agg(greatest(billing._add_periods(w.anchor, w.period, n), w.starts_at)
                     ORDER BY w.account_id, n)
      INTO accs, ats
      FROM walk w, generate_series(greatest(w.n_first, coalesce(w.n_next, w.n_first)), w.n_last) n
     WHERE billing._add_periods(w.anchor, w.period, w.n_first) < cutoff;
    IF accs IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT y.account_id, y.invoice_plan, y.currency, y.cap, y.period_start, y.period_end,
           y.plan, y.segment_start, y.segment_end
      FROM (SELECT x.*, first_value(x.segment_start) OVER w AS period_start,
                   last_value(x.segment_end) OVER w AS period_end,
                   last_value(x.spend_cap) OVER w AS cap, last_value(x.plan) OVER w AS invoice_plan
              FROM (SELECT DISTINCT ON (s.account_id, s.grid_start, s.segment_start) s.*
                      FROM billing._segments(accs, ats) s
                     ORDER BY s.account_id, s.grid_start, s.segment_start) x
            WINDOW w AS (PARTITION BY x.account_id, x.grid_start ORDER BY x.segment_start
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) y
     WHERE y.period_end <= cutoff
     ORDER BY y.account_id, y.period_start, y.segment_start;
END
$$;
COMMENT ON FUNCTION billing._due_periods(timestamptz) IS
    'Internal: billing periods ended by a cutoff that have no invoice yet, one row per plan segment';

CREATE OR REPLACE FUNCTION billing._invoice_preview(p_account bigint, p_at timestamptz)
    RETURNS TABLE (r_line_no int, r_kind text, r_meter text, r_description text,
                   r_period_start timestamptz, r_period_end timestamptz,
                   r_quantity numeric, r_amount numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    p record;
BEGIN
    -- the period's segments (its spend cap: the last one's)
    SELECT min(s.segment_start) AS ps, max(s.segment_end) AS pe, min(s.currency) AS currency,
           (array_agg(s.spend_cap ORDER BY s.segment_start DESC))[1] AS cap,
           array_agg(s.plan ORDER BY s.segment_start) AS plans,
           array_agg(s.segment_start ORDER BY s.segment_start) AS starts,
           array_agg(s.segment_end ORDER BY s.segment_start) AS ends
      INTO p
      FROM billing._segments(ARRAY[p_account], ARRAY[p_at]) s;
    IF p.plans IS NULL THEN
        RETURN;               -- no subscription at p_at
    END IF;
    -- the build's rows come in invoice order; without booking, all are lines
    RETURN QUERY
    SELECT b.n::integer, b.kind, b.meter, b.description, p.ps, p.pe, b.quantity, b.amount
      FROM billing._invoice_build(ARRAY[p_account], ARRAY[p.currency], ARRAY[p.cap], ARRAY[p.ps],
                                  ARRAY[p.pe], ARRAY[true], array_fill(1, ARRAY[cardinality(p.plans)]),
                                  p.plans, p.starts, p.ends)
               WITH ORDINALITY AS b(idx, ord, kind, meter, description, quantity, amount,
                                    unrounded_amount, charge_id, price, adjustment_id,
                                    commitment_id, grant_id, segment_start, segment_end,
                                    proration, effective_at, expires_at, source_grant, n);
END
$$;
COMMENT ON FUNCTION billing._invoice_preview(bigint, timestamptz) IS 'Internal: the body of invoice_preview';

CREATE OR REPLACE FUNCTION billing._finalize(p_as_of timestamptz)
    RETURNS TABLE (r_invoice_id bigint, r_account_id bigint, r_period_start timestamptz,
                   r_period_end timestamptz, r_total numeric)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
DECLARE
    cutoff timestamptz;
BEGIN
    IF p_as_of IS NULL THEN
        RAISE EXCEPTION 'finalize_invoices: as_of must not be null' USING ERRCODE = '22004';
    END IF;
    -- never a period that ends after now() - grace, whatever as_of says
    -- (a future or infinite as_of would finalize periods still open)
    cutoff := LEAST(p_as_of, pg_catalog.now()) - billing._grace_period();
    -- on Citus these statements may not call functions that read the
    -- shards: the same invoices, one period at a time (90_distribute.sql)
    IF billing._citus_table_kind('billing.invoices') IS NOT NULL THEN
        RETURN QUERY SELECT * FROM billing._finalize_citus(cutoff);
        RETURN;
    END IF;
    PERFORM 1 FROM billing.accounts a
     WHERE a.account_id IN (SELECT d.account_id FROM billing._due_periods(cutoff) d)
     ORDER BY a.account_id
       FOR NO KEY UPDATE;

    RETURN QUERY
    WITH d AS MATERIALIZED (
        SELECT * FROM billing._due_periods(cutoff)
    ), due AS (
        SELECT p.*, nextval('billing.invoice_id_seq') AS invoice_id,
               (row_number() OVER (ORDER BY p.account_id, p.period_start))::integer AS k,
               row_number() OVER (PARTITION BY p.account_id ORDER BY p.period_start) = 1 AS first_of_account
          FROM (SELECT DISTINCT d.account_id, d.plan, d.currency, d.spend_cap, d.period_start,
                       d.period_end FROM d) p
    ), pa AS (
        SELECT array_agg(due.account_id ORDER BY due.k) AS accounts,
               array_agg(due.currency ORDER BY due.k) AS currencies,
               array_agg(due.spend_cap ORDER BY due.k) AS caps,
               array_agg(due.period_start ORDER BY due.k) AS starts,
               array_agg(due.period_end ORDER BY due.k) AS ends,
               array_agg(due.first_of_account ORDER BY due.k) AS firsts
          FROM due
    ), sa AS (
        SELECT array_agg(due.k ORDER BY due.k, d.segment_start) AS idx,
               array_agg(d.segment_plan ORDER BY due.k, d.segment_start) AS plans,
               array_agg(d.segment_start ORDER BY due.k, d.segment_start) AS starts,
               array_agg(d.segment_end ORDER BY due.k, d.segment_start) AS ends
          FROM d JOIN due ON due.account_id = d.account_id AND due.period_start = d.period_start
    ), built AS MATERIALIZED (
        SELECT due.account_id, due.invoice_id, x.*
          FROM pa, sa,
               LATERAL billing._invoice_build(pa.accounts, pa.currencies, pa.caps, pa.starts, pa.ends,
                                              pa.firsts, sa.idx, sa.plans, sa.starts, sa.ends,
                                              false, true) x
               JOIN due ON due.k = x.idx
    ), new_grants AS MATERIALIZED (
        SELECT b.account_id, b.grant_id AS placeholder,
               nextval('billing.credit_grant_id_seq') AS grant_id, b.amount, b.effective_at,
               b.expires_at, b.source_grant
          FROM built b WHERE b.kind = 'grant'
    ), mapped AS (
        SELECT b.*, coalesce(ng.grant_id, b.grant_id) AS real_grant_id
          FROM built b LEFT JOIN new_grants ng
                 ON ng.account_id = b.account_id AND ng.placeholder = b.grant_id
    ), numbered AS (
        SELECT m.*, (row_number() OVER (PARTITION BY m.invoice_id ORDER BY m.ord))::integer AS line_no
          FROM mapped m
         WHERE m.kind IN ('usage', 'fixed', 'cap', 'true_up', 'commitment', 'adjustment', 'credit')
    ), totals AS (
        SELECT n.invoice_id, sum(n.amount) AS total FROM numbered n GROUP BY n.invoice_id
    ), invoices_written AS (
        INSERT INTO billing.invoices (account_id, invoice_id, plan, period_start, period_end,
                                      currency, total)
        SELECT due.account_id, due.invoice_id, due.plan, due.period_start, due.period_end,
               due.currency, coalesce(t.total, 0)
          FROM due LEFT JOIN totals t ON t.invoice_id = due.invoice_id
        RETURNING billing.invoices.invoice_id, billing.invoices.account_id,
                  billing.invoices.period_start, billing.invoices.period_end,
                  billing.invoices.total
    ), lines_written AS (
        INSERT INTO billing.invoice_lines (account_id, invoice_id, line_no, kind, meter,
                                          description, quantity, amount, unrounded_amount,
                                          charge_id, price, adjustment_id, segment_start,
                                          segment_end, proration, commitment_id, grant_id)
        SELECT n.account_id, n.invoice_id, n.line_no, n.kind, n.meter, n.description, n.quantity,
               n.amount, n.unrounded_amount, n.charge_id, n.price, n.adjustment_id,
               n.segment_start, n.segment_end, n.proration, n.commitment_id, n.real_grant_id
          FROM numbered n
        RETURNING billing.invoice_lines.account_id, billing.invoice_lines.invoice_id,
                  billing.invoice_lines.adjustment_id
    ), grants_written AS (
        INSERT INTO billing.credit_grants (account_id, grant_id, amount, effective_at, expires_at,
                                           priority, applies_to, source, reason, commitment_id,
                                           window_no, rolled_from)
        SELECT ng.account_id, ng.grant_id, ng.amount, ng.effective_at, ng.expires_at, g.priority,
               g.applies_to, 'rollover', format('rollover of grant %s', g.grant_id),
               g.commitment_id, g.window_no + 1, g.grant_id
          FROM new_grants ng
               JOIN billing.credit_grants g
                 ON g.account_id = ng.account_id AND g.grant_id = ng.source_grant
        RETURNING 1
    ), ledger_written AS (
        INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at,
                                           invoice_id)
        SELECT m.account_id,
               h.seq + row_number() OVER (PARTITION BY m.account_id ORDER BY m.idx, m.ord),
               m.real_grant_id, CASE WHEN m.kind = 'credit' THEN 'draw' ELSE m.kind END, m.amount,
               m.effective_at, CASE WHEN m.kind = 'credit' THEN m.invoice_id END
          FROM mapped m
               CROSS JOIN LATERAL (SELECT coalesce(max(x.seq), 0) AS seq FROM billing.credit_ledger x
                                    WHERE x.account_id = m.account_id) h
         WHERE m.kind IN ('credit', 'expire', 'rollover', 'grant')
        RETURNING 1
    ), carried AS (
        UPDATE billing.adjustments adj SET billed_invoice_id = w.invoice_id
          FROM lines_written w
         WHERE w.adjustment_id IS NOT NULL AND adj.account_id = w.account_id
           AND adj.adjustment_id = w.adjustment_id
        RETURNING 1
    )
    SELECT w.invoice_id, w.account_id, w.period_start, w.period_end, w.total
      FROM invoices_written w
     ORDER BY w.account_id, w.period_start;
END
$$;
COMMENT ON FUNCTION billing._finalize(timestamptz) IS 'Internal: the body of finalize_invoices';

CREATE OR REPLACE FUNCTION billing.remaining(account_id bigint, meter text,
                                  at timestamptz DEFAULT pg_catalog.now())
    RETURNS numeric
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    per record;
    line record;
    lines billing._invoice_line[];
    others numeric;
    budget numeric;
    q0 numeric;
    j jsonb;
    ends numeric[];
    seg_end numeric;
    lo numeric := 0;          -- largest x known to fit
    hi numeric;               -- smallest x known not to fit
    mid numeric;
    tail numeric;             -- past it, the charge is affine in x
BEGIN
    IF account_id IS NULL OR meter IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'remaining: account_id, meter and at must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.accounts a WHERE a.account_id = remaining.account_id) THEN
        RAISE EXCEPTION 'account % does not exist', remaining.account_id USING ERRCODE = '23503';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.meters m WHERE m.meter = remaining.meter) THEN
        RAISE EXCEPTION 'meter "%" does not exist', remaining.meter USING ERRCODE = '23503';
    END IF;
    -- the period holding at, whose spend cap bounds the usage lines of
    -- every plan segment (credits do not count: the cap bounds usage before)
    SELECT s.spend_cap, s.currency INTO per
      FROM billing._segments(ARRAY[remaining.account_id], ARRAY[at]) s
     ORDER BY s.segment_start DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN 0;                 -- no subscription: nothing can be billed
    END IF;
    IF per.spend_cap IS NULL THEN
        RETURN NULL;              -- no cap: unlimited
    END IF;
    lines := ARRAY(SELECT b.line
                     FROM billing._period_build(ARRAY[remaining.account_id], ARRAY[at], true) b
                    WHERE (b.line).kind = 'usage');
    -- the meter's line in the plan segment holding at
    SELECT x.quantity, x.price, x.ord INTO line
      FROM unnest(lines) x
     WHERE x.meter = remaining.meter
       AND (x.segment_start IS NULL OR (x.segment_start <= at AND at < x.segment_end));
    IF NOT FOUND THEN
        RETURN NULL;              -- the plan does not bill this meter
    END IF;
    SELECT coalesce(sum(x.amount), 0) INTO others FROM unnest(lines) x WHERE x.ord <> line.ord;
    budget := billing.round_money(per.spend_cap, per.currency) - others;
    q0 := line.quantity;
    IF NOT billing._fits(line.price, q0, per.currency, budget) THEN
        RETURN 0;
    END IF;

    -- stretches on which the charge cannot decrease: volume tiers, then the
    -- rest.  A tier ends where the quantity after per and free passes its
    -- bound b: at (b + free) * N for per N exact (or no per), at
    -- floor(b + free) * N for round up; for round down the stretch is open
    -- at (floor(b + free) + 1) * N, so it ends at the last whole unit from
    -- q0 before that.
    j := billing.price_to_jsonb(line.price);
    IF j ->> 'model' = 'volume' THEN
        SELECT array_agg(CASE WHEN NOT j ? 'per' OR j ->> 'per_round' = 'exact'
                                  THEN (b + f) * coalesce((j ->> 'per')::numeric, 1)
                              WHEN j ->> 'per_round' = 'up'
                                  THEN floor(b + f) * (j ->> 'per')::numeric
                              ELSE q0 + ceil((floor(b + f) + 1) * (j ->> 'per')::numeric - q0) - 1
                         END ORDER BY b)
          INTO ends
          FROM jsonb_array_elements(j -> 'tiers') t,
               LATERAL (SELECT (t ->> 'up_to')::numeric AS b,
                               coalesce((j ->> 'free')::numeric, 0) AS f) x
         WHERE t ->> 'up_to' <> 'inf';
    END IF;
    -- Whole units from q0 only: in each stretch, its last whole unit; when
    -- that is over the budget, the answer is in this stretch, where the
    -- charge cannot decrease, so bisect (lo, hi]; else go on to the next.
    FOREACH seg_end IN ARRAY coalesce(ends, '{}'::numeric[]) LOOP
        CONTINUE WHEN floor(seg_end - q0) <= lo;
        IF billing._fits(line.price, q0 + floor(seg_end - q0), per.currency, budget) THEN
            lo := floor(seg_end - q0);
        ELSE
            hi := floor(seg_end - q0);
            EXIT;
        END IF;
    END LOOP;
    IF hi IS NULL THEN
        -- open-ended: double until over the budget, however large it is.
        -- Every point where the charge bends (a tier bound, the free units,
        -- a package size, where a minimum stops applying: at most the
        -- largest number K of the price over its smallest rate, 10^-22 a
        -- unit; times a quantity divisor) lies below tail.  Past it the
        -- charge is affine in the quantity (or a staircase of steps shorter
        -- than tail): the same at x and 2x there, it never grows again.
        SELECT (1 + coalesce(max(n[1]::numeric), 0)) ^ 2 * 1e24 INTO tail
          FROM regexp_matches(billing.price_to_jsonb(line.price)::text, '([0-9]+(\.[0-9]+)?)', 'g') AS n;
        hi := greatest(lo * 2, 1);
        WHILE billing._fits(line.price, q0 + hi, per.currency, budget) LOOP
            IF lo > tail AND billing.rate(line.price, q0 + hi) = billing.rate(line.price, q0 + lo) THEN
                RETURN NULL;      -- the charge stopped growing below the budget
            END IF;
            lo := hi;
            hi := hi * 2;
        END LOOP;
    END IF;
    WHILE hi - lo > 1 LOOP
        mid := floor((lo + hi) / 2);
        IF billing._fits(line.price, q0 + mid, per.currency, budget) THEN
            lo := mid;
        ELSE
            hi := mid;
        END IF;
    END LOOP;
    RETURN lo;
END
$$;
COMMENT ON FUNCTION billing.remaining(bigint, text, timestamptz) IS
    'Whole units of a meter that can still be used this period before the usage lines (of every plan segment) exceed the spend cap (NULL: unlimited)';

COMMENT ON FUNCTION billing.invoice_preview(bigint, timestamptz) IS
    'The bill of the period holding at, as it stands: every line rounded to the currency''s minor unit, the spend cap, true-ups, commitment installments, pending adjustments and credits';

-- re-rating and verification (60_rerate.sql), the Citus twin of finalize (90_distribute.sql)
DROP FUNCTION billing._rerate_diff(timestamptz, timestamptz, bigint);
CREATE FUNCTION billing._rerate_diff(from_ts timestamptz, to_ts timestamptz, p_account bigint)
    RETURNS TABLE (account_id bigint, invoice_id bigint, line_kind text, meter text,
                   description text, billed_quantity numeric, billed_amount numeric,
                   correct_quantity numeric, correct_amount numeric, delta numeric,
                   segment_start timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
DECLARE
    inv record;     -- the invoices
    cor billing._invoice_line[];    -- today's lines (idx: the invoice's place in inv)
    bil record;     -- the lines billed, and the adjustments made since
BEGIN
    -- 1. the invoices
    SELECT array_agg(i.account_id ORDER BY i.account_id, i.invoice_id) AS accounts,
           array_agg(i.invoice_id ORDER BY i.account_id, i.invoice_id) AS invoices,
           array_agg(i.period_start ORDER BY i.account_id, i.invoice_id) AS starts
      INTO inv
      FROM billing.invoices i
     WHERE i.status = 'finalized'
       AND i.period_start < to_ts AND i.period_end > from_ts
       AND (p_account IS NULL OR i.account_id = p_account);
    IF inv.accounts IS NULL THEN
        RETURN;
    END IF;
    -- 2. today's lines of each invoice's period (every plan segment, the
    -- cap); a period no subscription covers any more bills nothing
    SELECT array_agg(ROW(k.n, (b.line).ord, (b.line).kind, (b.line).meter, (b.line).description,
                         (b.line).quantity, (b.line).amount, NULL, NULL, NULL, NULL, NULL, NULL,
                         (b.line).segment_start, NULL, NULL, NULL, NULL, NULL)::billing._invoice_line)
      INTO cor
      FROM billing._period_build(inv.accounts, inv.starts, true) b
           JOIN unnest(inv.accounts, inv.starts) WITH ORDINALITY AS k(a, s, n)
             ON k.a = b.account_id AND k.s = b.period_start;
    -- 3. what was billed: the rated lines, and the adjustments made since
    SELECT array_agg(y.account_id) AS accounts, array_agg(y.invoice_id) AS invoices,
           array_agg(y.kind) AS kinds, array_agg(y.meter) AS meters,
           array_agg(y.description) AS descriptions, array_agg(y.quantity) AS quantities,
           array_agg(y.amount) AS amounts, array_agg(y.segment_start) AS segments
      INTO bil
      FROM (SELECT l.account_id, l.invoice_id, l.kind, l.meter::text AS meter, l.description,
                   l.quantity, l.amount, l.segment_start
              FROM unnest(inv.accounts, inv.invoices) v(account_id, invoice_id)
                   JOIN billing.invoice_lines l
                     ON l.account_id = v.account_id AND l.invoice_id = v.invoice_id
             WHERE l.kind IN ('usage', 'fixed', 'cap')
            UNION ALL
            SELECT a.account_id, a.invoice_id, a.line_kind, a.meter::text, a.description,
                   a.new_quantity - a.old_quantity, a.delta, a.segment_start
              FROM unnest(inv.accounts, inv.invoices) v(account_id, invoice_id)
                   JOIN billing.adjustments a
                     ON a.account_id = v.account_id AND a.invoice_id = v.invoice_id) y;
    -- 4. compare (reads no table)
    RETURN QUERY
    WITH invs AS (
        SELECT k.n::integer AS n, k.a AS account_id, k.i AS invoice_id, k.s AS period_start
          FROM unnest(inv.accounts, inv.invoices, inv.starts) WITH ORDINALITY AS k(a, i, s, n)
    ), correct AS (
        SELECT invs.account_id, invs.invoice_id, c.kind, c.meter, c.description, c.quantity,
               c.amount, c.segment_start, coalesce(c.segment_start, invs.period_start) AS seg
          FROM unnest(cor) c JOIN invs ON invs.n = c.idx
    ), billed_sum AS (
        SELECT b.account_id, b.invoice_id, b.kind, b.meter,
               CASE WHEN b.kind = 'fixed' THEN b.description END AS fixed_key,
               coalesce(b.segment_start, invs.period_start) AS seg,
               max(b.segment_start) AS segment_start, max(b.description) AS description,
               sum(b.quantity) AS quantity, sum(b.amount) AS amount
          FROM unnest(bil.accounts, bil.invoices, bil.kinds, bil.meters, bil.descriptions,
                      bil.quantities, bil.amounts, bil.segments)
                   AS b(account_id, invoice_id, kind, meter, description, quantity, amount,
                        segment_start)
               JOIN invs ON invs.account_id = b.account_id AND invs.invoice_id = b.invoice_id
         GROUP BY 1, 2, 3, 4, 5, 6
    )
    SELECT coalesce(c.account_id, b.account_id), coalesce(c.invoice_id, b.invoice_id),
           coalesce(c.kind, b.kind), coalesce(c.meter, b.meter),
           coalesce(c.description, b.description),
           -- a usage line missing on either side billed or should bill 0 units
           CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(b.quantity, 0) ELSE b.quantity END,
           coalesce(b.amount, 0),
           CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(c.quantity, 0) ELSE c.quantity END,
           coalesce(c.amount, 0),
           coalesce(c.amount, 0) - coalesce(b.amount, 0),
           coalesce(c.segment_start, b.segment_start)
      FROM correct c
           FULL JOIN billed_sum b
                  ON b.account_id = c.account_id AND b.invoice_id = c.invoice_id
                 AND b.seg = c.seg AND b.kind = c.kind
                 AND b.meter IS NOT DISTINCT FROM c.meter
                 AND b.fixed_key IS NOT DISTINCT FROM CASE WHEN c.kind = 'fixed' THEN c.description END;
END
$$;
COMMENT ON FUNCTION billing._rerate_diff(timestamptz, timestamptz, bigint) IS
    'Internal: billed versus correct lines of the finalized invoices overlapping a range';

CREATE OR REPLACE FUNCTION billing._rerate(from_ts timestamptz, to_ts timestamptz, p_account bigint,
                                dry_run boolean, p_reason text)
    RETURNS TABLE (r_account bigint, r_invoice bigint, r_meter text,
                   r_billed_quantity numeric, r_billed_amount numeric,
                   r_correct_quantity numeric, r_correct_amount numeric, r_delta numeric)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
DECLARE
    n_written bigint;
BEGIN
    IF from_ts IS NULL OR to_ts IS NULL OR dry_run IS NULL THEN
        RAISE EXCEPTION 'rerate: from_ts, to_ts and dry_run must not be null' USING ERRCODE = '22004';
    END IF;
    IF from_ts >= to_ts THEN
        RAISE EXCEPTION 'rerate: from_ts must be before to_ts' USING ERRCODE = '22023';
    END IF;
    IF dry_run THEN
        RETURN QUERY
        SELECT d.account_id, d.invoice_id, d.meter, d.billed_quantity, d.billed_amount,
               d.correct_quantity, d.correct_amount, d.delta
          FROM billing._rerate_diff(from_ts, to_ts, p_account) d
         WHERE d.delta <> 0
         ORDER BY 1, 2, 3;
        RETURN;
    END IF;
    -- one re-rate at a time: a second run waits, then finds the first one's adjustments
    PERFORM pg_advisory_xact_lock(1651074162, 3);
    RETURN QUERY
    WITH d AS (
        SELECT * FROM billing._rerate_diff(from_ts, to_ts, p_account) x
         WHERE x.delta <> 0
    ), written AS (
        INSERT INTO billing.adjustments (account_id, invoice_id, line_kind, meter, description,
                                         old_quantity, new_quantity, old_amount, new_amount, delta,
                                         reason, segment_start)
        SELECT d.account_id, d.invoice_id, d.line_kind, d.meter, d.description,
               d.billed_quantity, d.correct_quantity, d.billed_amount, d.correct_amount, d.delta,
               coalesce(p_reason, 're-rate'), d.segment_start
          FROM d
         -- adjustment ids in invoice line order (plan segments; fixed fees,
         -- usage, the cap)
         ORDER BY d.account_id, d.invoice_id, d.segment_start NULLS LAST,
                  CASE d.line_kind WHEN 'fixed' THEN 1 WHEN 'usage' THEN 2 ELSE 3 END,
                  d.description, d.meter
    )
    SELECT d.account_id, d.invoice_id, d.meter, d.billed_quantity, d.billed_amount,
           d.correct_quantity, d.correct_amount, d.delta
      FROM d
     ORDER BY 1, 2, 3;
    GET DIAGNOSTICS n_written = ROW_COUNT;
    PERFORM billing._audit_rerate(from_ts, to_ts, p_account, coalesce(p_reason, 're-rate'), n_written);
END
$$;
COMMENT ON FUNCTION billing._rerate(timestamptz, timestamptz, bigint, boolean, text) IS
    'Internal: the body of billing.rerate';

CREATE OR REPLACE FUNCTION billing._verify_invoices(p_account bigint)
    RETURNS TABLE (r_account_id bigint, r_invoice_id bigint, r_line_no int, r_problem text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN QUERY
    SELECT i.account_id, i.invoice_id, NULL::int,
           format('total %s is not the sum of the lines (%s)', i.total, coalesce(l.s, 0))
      FROM billing.invoices i
           LEFT JOIN LATERAL (SELECT sum(x.amount) AS s FROM billing.invoice_lines x
                               WHERE x.account_id = i.account_id AND x.invoice_id = i.invoice_id) l ON true
     WHERE (p_account IS NULL OR i.account_id = p_account) AND i.total IS DISTINCT FROM coalesce(l.s, 0)
    UNION ALL
    SELECT x.account_id, x.invoice_id, x.line_no,
           format('%s line rates %s to %s, not %s', x.kind, coalesce(x.quantity, 0),
                  billing.round_money(billing._rate_check(x.price, coalesce(x.quantity, 0)), i.currency),
                  x.amount)
      FROM billing.invoice_lines x
           JOIN billing.invoices i ON i.account_id = x.account_id AND i.invoice_id = x.invoice_id
     WHERE (p_account IS NULL OR x.account_id = p_account) AND x.kind IN ('usage', 'fixed')
       AND x.proration IS NULL
       AND (x.price IS NULL
            OR billing.round_money(billing._rate_check(x.price, coalesce(x.quantity, 0)), i.currency) <> x.amount)
    UNION ALL
    -- a fixed fee of a plan segment: its share of the period, in seconds
    SELECT x.account_id, x.invoice_id, x.line_no,
           format('fixed line of %s of the period rates to %s, not %s',
                  extract(epoch FROM x.segment_end - x.segment_start) / extract(epoch FROM i.period_end - i.period_start),
                  billing.round_money(billing._rate_check(x.price, 0)
                                      * extract(epoch FROM x.segment_end - x.segment_start)
                                      / extract(epoch FROM i.period_end - i.period_start), i.currency),
                  x.amount)
      FROM billing.invoice_lines x
           JOIN billing.invoices i ON i.account_id = x.account_id AND i.invoice_id = x.invoice_id
     WHERE (p_account IS NULL OR x.account_id = p_account) AND x.kind = 'fixed'
       AND x.proration IS NOT NULL
       AND (x.price IS NULL OR x.segment_start IS NULL OR x.segment_end IS NULL
            OR billing.round_money(billing._rate_check(x.price, 0)
                                   * extract(epoch FROM x.segment_end - x.segment_start)
                                   / extract(epoch FROM i.period_end - i.period_start), i.currency) <> x.amount)
    UNION ALL
    -- each credit line is the credit ledger's draw of its grant on its
    -- invoice, and each draw is a credit line
    SELECT coalesce(c.account_id, d.account_id), coalesce(c.invoice_id, d.invoice_id), c.line_no,
           CASE WHEN c.line_no IS NULL
                THEN format('the credit ledger draws %s from grant %s but no credit line shows it',
                            d.amount, d.grant_id)
                WHEN d.amount IS NULL
                THEN format('credit line of grant %s has no draw in the credit ledger', c.grant_id)
                ELSE format('credit line of grant %s is %s, the credit ledger draws %s', c.grant_id,
                            c.amount, d.amount) END
      FROM (SELECT l.account_id, l.invoice_id, l.line_no, l.grant_id, l.amount
              FROM billing.invoice_lines l
             WHERE l.kind = 'credit' AND (p_account IS NULL OR l.account_id = p_account)) c
           FULL JOIN (SELECT g.account_id, g.invoice_id, g.grant_id, sum(g.amount) AS amount
                        FROM billing.credit_ledger g
                       WHERE g.kind = 'draw' AND (p_account IS NULL OR g.account_id = p_account)
                       GROUP BY 1, 2, 3) d
                  ON d.account_id = c.account_id AND d.invoice_id = c.invoice_id
                 AND d.grant_id = c.grant_id
     WHERE c.amount IS DISTINCT FROM d.amount
    UNION ALL
    -- credits never take an invoice below 0
    SELECT i.account_id, i.invoice_id, NULL::int,
           format('credits take the total to %s, below 0', i.total)
      FROM billing.invoices i
     WHERE (p_account IS NULL OR i.account_id = p_account) AND i.total < 0
       AND EXISTS (SELECT 1 FROM billing.invoice_lines l
                    WHERE l.account_id = i.account_id AND l.invoice_id = i.invoice_id
                      AND l.kind = 'credit')
    ORDER BY 1, 2, 3;
END
$$;
COMMENT ON FUNCTION billing._verify_invoices(bigint) IS 'Internal: the body of verify_invoices';

CREATE OR REPLACE FUNCTION billing._finalize_citus(cutoff timestamptz)
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
                                              segment_end, proration, commitment_id, grant_id)
            SELECT acc, inv, (row_number() OVER (ORDER BY x.ord))::integer, x.kind, x.meter,
                   x.description, x.quantity, x.amount, x.unrounded_amount, x.charge_id, x.price,
                   x.adjustment_id, x.segment_start, x.segment_end, x.proration, x.commitment_id,
                   CASE WHEN x.grant_id < 0 THEN ids[-x.grant_id] ELSE x.grant_id END
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

CREATE OR REPLACE FUNCTION billing._distributed_functions()
    RETURNS TABLE (fn regprocedure, account_arg text)
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    VALUES ('billing.record(bigint,text,numeric,timestamptz,text,text)'::regprocedure, '$1'),
           ('billing.report_cumulative(text,bigint,text,timestamptz,numeric,text)', '$2'),
           ('billing.usage(bigint,timestamptz,timestamptz,interval,text)', '$1'),
           ('billing.remaining(bigint,text,timestamptz)', '$1'),
           ('billing.invoice_preview(bigint,timestamptz)', '$1'),
           ('billing.credit_balance(bigint,timestamptz)', '$1'),
           ('billing.correct_usage(bigint,text,timestamptz,numeric,text,text)', '$1')
$$;
COMMENT ON FUNCTION billing._distributed_functions() IS
    'Internal: the per-account functions billing.distribute() registers with Citus, with their account argument';

COMMENT ON FUNCTION billing.verify_invoices(bigint) IS
    'Checks finalized invoices: each total is the sum of its lines, each usage and fixed line is the rounded rating of its quantity with the price that rated it (a plan segment''s fixed fee prorated by seconds), each credit line is the credit ledger''s draw and credits take no total below 0';

-- roles (99_roles.sql)
REVOKE ALL ON ALL TABLES IN SCHEMA billing FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA billing FROM PUBLIC;
REVOKE ALL ON FUNCTION
    billing._credit_grants_guard(),
    billing._audit_credit(),
    billing._subscriptions_of(bigint[], boolean),
    billing._segments(bigint[], timestamptz[]),
    billing._installment(numeric, integer, integer, text),
    billing._eligible_spend(text[], text[], text[], numeric[]),
    billing._segment_lines(billing._invoice_line[], integer[], text[], timestamptz[], timestamptz[], text[], numeric[], timestamptz[], timestamptz[]),
    billing._credit_draws(bigint[], text[], timestamptz[], timestamptz[], boolean, billing._invoice_line[], billing._credit_state[]),
    billing._invoice_build(bigint[], text[], numeric[], timestamptz[], timestamptz[], boolean[], integer[], text[], timestamptz[], timestamptz[], boolean, boolean),
    billing._period_build(bigint[], timestamptz[], boolean),
    billing._contract_account(bigint),
    billing._check_money(numeric, text, text),
    billing._check_applies_to(text[]),
    billing._ledger_next_seq(bigint),
    billing._period_boundary(bigint, timestamptz),
    billing._due_periods(timestamptz),
    billing._rerate_diff(timestamptz, timestamptz, bigint),
    billing._cap_amount(numeric, text, numeric),
    billing.credit_balance(bigint, timestamptz),
    billing.grant_credit(bigint, numeric, timestamptz, timestamptz, integer, text[], text, text),
    billing.void_credit(bigint, bigint, text, timestamptz),
    billing.add_commitment(bigint, text, numeric, timestamptz, timestamptz, interval, text[], integer, numeric),
    billing.change_plan(bigint, text, timestamptz)
    FROM PUBLIC;
ALTER FUNCTION billing.grant_credit(bigint, numeric, timestamptz, timestamptz, integer, text[], text, text) SECURITY DEFINER;
ALTER FUNCTION billing.void_credit(bigint, bigint, text, timestamptz) SECURITY DEFINER;
ALTER FUNCTION billing.add_commitment(bigint, text, numeric, timestamptz, timestamptz, interval, text[], integer, numeric) SECURITY DEFINER;
ALTER FUNCTION billing.change_plan(bigint, text, timestamptz) SECURITY DEFINER;
GRANT SELECT ON billing.commitments, billing.commitment_windows, billing.credit_grants,
    billing.credit_ledger TO billing_reader;
GRANT EXECUTE ON FUNCTION
    billing.credit_balance(bigint, timestamptz),
    billing._subscriptions_of(bigint[], boolean),
    billing._segments(bigint[], timestamptz[]),
    billing._installment(numeric, integer, integer, text),
    billing._eligible_spend(text[], text[], text[], numeric[]),
    billing._segment_lines(billing._invoice_line[], integer[], text[], timestamptz[], timestamptz[], text[], numeric[], timestamptz[], timestamptz[]),
    billing._credit_draws(bigint[], text[], timestamptz[], timestamptz[], boolean, billing._invoice_line[], billing._credit_state[]),
    billing._invoice_build(bigint[], text[], numeric[], timestamptz[], timestamptz[], boolean[], integer[], text[], timestamptz[], timestamptz[], boolean, boolean),
    billing._period_build(bigint[], timestamptz[], boolean),
    billing._contract_account(bigint),
    billing._check_money(numeric, text, text),
    billing._check_applies_to(text[]),
    billing._ledger_next_seq(bigint),
    billing._period_boundary(bigint, timestamptz),
    billing._due_periods(timestamptz),
    billing._rerate_diff(timestamptz, timestamptz, bigint),
    billing._cap_amount(numeric, text, numeric)
    TO billing_reader;
GRANT EXECUTE ON FUNCTION
    billing.grant_credit(bigint, numeric, timestamptz, timestamptz, integer, text[], text, text),
    billing.void_credit(bigint, bigint, text, timestamptz),
    billing.add_commitment(bigint, text, numeric, timestamptz, timestamptz, interval, text[], integer, numeric),
    billing.change_plan(bigint, text, timestamptz)
    TO billing_admin;
-- ---- end of issue 17 ----

-- ---- issue 18, part 2: matrix charges (charges.dimension) -------------------------------
-- A charge with a dimension rates only its meter's usage of that dimension;
-- a NULL dimension (every 1.0 charge) rates the dimensions no other charge
-- of the (plan, meter) names, so 1.0 charges keep their meaning.  Versions
-- are per (plan, meter, dimension).  Invoice lines and adjustments carry
-- the dimension (NULL on 1.0's rows); invoice_preview and rerate return it
-- as a last column; remaining takes the dimension of the units asked for.
-- Functions whose arguments or result columns change are dropped and
-- created again (on a Citus coordinator, run billing.distribute() after
-- the update: it registers invoice_preview and remaining again).
SELECT billing._update_ddl('billing.charges', ARRAY[
    $ddl$ALTER TABLE billing.charges ADD COLUMN dimension text COLLATE "C" NULL$ddl$,
    $ddl$ALTER TABLE billing.charges ADD CONSTRAINT charges_dimension_check
        CHECK (dimension IS NULL OR (meter IS NOT NULL AND pg_catalog.octet_length(dimension) <= 256))$ddl$,
    $ddl$DROP INDEX billing.charges_usage_version$ddl$,
    $ddl$CREATE UNIQUE INDEX charges_usage_version ON billing.charges (plan, meter, dimension, valid_from)
        NULLS NOT DISTINCT WHERE meter IS NOT NULL$ddl$,
    $ddl$COMMENT ON TABLE billing.charges IS
        'Charges of a plan, versioned by valid_from per (plan, meter, dimension): the version in force at a period''s start rates the whole period; a NULL meter is a fixed fee per period (rated with quantity 0); a dimension rates only that dimension''s usage of the meter, NULL the dimensions no other charge names'$ddl$
]);
SELECT billing._update_ddl('billing.invoice_lines', ARRAY[
    $ddl$ALTER TABLE billing.invoice_lines ADD COLUMN dimension text COLLATE "C"$ddl$
]);
SELECT billing._update_ddl('billing.adjustments', ARRAY[
    $ddl$ALTER TABLE billing.adjustments ADD COLUMN dimension text COLLATE "C"$ddl$
]);
ALTER TYPE billing._invoice_line ADD ATTRIBUTE dimension text;
-- the lines of an invoice being built carry the dimension (55_contracts.sql)
CREATE OR REPLACE FUNCTION billing._invoice_build(p_accounts bigint[], p_currencies text[], p_caps numeric[],
                                       p_starts timestamptz[], p_ends timestamptz[],
                                       p_first boolean[], s_idx integer[], s_plans text[],
                                       s_starts timestamptz[], s_ends timestamptz[],
                                       p_rated_only boolean DEFAULT false,
                                       p_book boolean DEFAULT false)
    RETURNS SETOF billing._invoice_line
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run; the plan
    -- cache mode is the default, and a level to change it on (see 2.)
    SET jit = off SET plan_cache_mode = auto AS $$
DECLARE
    accs bigint[];
    t_from timestamptz;
    t_to timestamptz;
    l billing._invoice_line[];
    wins billing._window[];
    grs billing._credit_state[];
    adjs billing._invoice_line[];   -- pending adjustments (grant_id: the account)
    sa record;
    sp record;
    has_true_ups boolean;
    has_installments boolean;
BEGIN
    IF coalesce(array_length(p_accounts, 1), 0) = 0 THEN
        RETURN;
    ELSIF cardinality(p_accounts) > 16 THEN
        -- many periods (finalize): plans that know the arrays' sizes (a
        -- generic plan takes each for 10 rows and may join them in loops)
        PERFORM set_config('plan_cache_mode', 'force_custom_plan', true);
    END IF;
    -- 1. usage and fixed lines of every segment (one set-based rating), the
    -- cap.  Each period one segment (no plan change): _rate_periods rates
    -- the periods, cap included, as they are.
    IF cardinality(s_idx) = cardinality(p_accounts) THEN
        SELECT array_agg(ROW(r.idx, r.ord, r.kind, r.meter, r.description, r.quantity, r.amount,
                             r.unrounded_amount, r.charge_id, r.price, NULL, NULL, NULL, NULL, NULL,
                             NULL, NULL, NULL, NULL, r.dimension)::billing._invoice_line
                         ORDER BY r.idx, r.ord)
          INTO l
          FROM billing._rate_periods(p_accounts, s_plans, p_currencies, p_caps, s_starts, s_ends) r;
    ELSE
        -- a plan change: each segment rated on its own from its start to
        -- its end with its plan, then _segment_lines (a statement of its own:
        -- the rating's plans stay its own)
        SELECT array_agg(x.a ORDER BY y.n) AS accounts, array_agg(x.cur ORDER BY y.n) AS currencies
          INTO sa
          FROM unnest(s_idx) WITH ORDINALITY AS y(p, n)
               JOIN unnest(p_accounts, p_currencies) WITH ORDINALITY AS x(a, cur, k) ON x.k = y.p;
        l := ARRAY(SELECT ROW(r.idx, r.ord, r.kind, r.meter, r.description, r.quantity, r.amount,
                              r.unrounded_amount, r.charge_id, r.price, NULL, NULL, NULL, NULL,
                              NULL, NULL, NULL, NULL, NULL, r.dimension)::billing._invoice_line
                     FROM billing._rate_periods(sa.accounts, s_plans, sa.currencies,
                                                array_fill(NULL::numeric, ARRAY[cardinality(s_idx)]),
                                                s_starts, s_ends) r);
        l := ARRAY(SELECT x FROM billing._segment_lines(l, s_idx, s_plans, s_starts, s_ends,
                                                        p_currencies, p_caps, p_starts, p_ends) x
                    ORDER BY x.idx, x.ord);
    END IF;
    IF p_rated_only THEN
        RETURN QUERY SELECT * FROM unnest(l);
        RETURN;
    END IF;

    -- 2. what the accounts have (one statement; each subquery routed by the
    -- accounts on Citus).  From here on, for a few periods (a preview), one
    -- generic plan per statement and session: planning these statements
    -- anew costs more than running them.  (Not for many: a generic plan
    -- takes each array for 10 rows.  Not above: the callees of the rating
    -- keep their own plans.  Not with Citus loaded: it plans distributed
    -- statements with their parameters' values.)
    IF cardinality(p_accounts) <= 16 AND current_setting('citus.version', true) IS NULL THEN
        PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
    END IF;
    IF cardinality(p_accounts) = 1 THEN
        accs := p_accounts;
        t_from := p_starts[1];
        t_to := p_ends[1];
    ELSE
        SELECT array_agg(DISTINCT a), min(s), max(e) INTO accs, t_from, t_to
          FROM unnest(p_accounts, p_starts, p_ends) AS x(a, s, e);
    END IF;
    SELECT cw.wins, cw.has_true_ups, cw.has_installments,
           -- pending adjustments, as lines (the row rebuilt as
           -- billing.adjustments: on Citus a is a shard's row)
           (SELECT array_agg(ROW(NULL, a.adjustment_id, 'adjustment', a.meter,
                                 billing._adjustment_text(ROW(a.*)::billing.adjustments),
                                 a.new_quantity - a.old_quantity, a.delta, NULL, NULL, NULL,
                                 a.adjustment_id, NULL, a.account_id, NULL, NULL, NULL, NULL, NULL,
                                 NULL, a.dimension)::billing._invoice_line)
              FROM billing.adjustments a
             WHERE a.account_id = ANY (accs) AND a.billed_invoice_id IS NULL),
           -- grants with something left, effective before the last period
           -- ends, with the next window of their commitment (for a rollover)
           (SELECT array_agg(ROW(g.account_id, g.grant_id, g.priority, g.effective_at, g.expires_at,
                                 g.applies_to::text[], g.source, l.remaining,
                                 CASE WHEN g.source = 'commitment' THEN c.rollover_fraction ELSE 0 END,
                                 nw.starts_at, nw.ends_at,
                                 coalesce(g.reason, g.source))::billing._credit_state)
              FROM billing.credit_grants g
                   JOIN LATERAL (SELECT sum(x.amount) AS remaining FROM billing.credit_ledger x
                                  WHERE x.account_id = g.account_id AND x.grant_id = g.grant_id) l ON true
                   LEFT JOIN billing.commitments c
                          ON c.account_id = g.account_id AND c.commitment_id = g.commitment_id
                   LEFT JOIN billing.commitment_windows nw
                          ON nw.account_id = g.account_id AND nw.commitment_id = g.commitment_id
                         AND nw.window_no = g.window_no + 1
             WHERE g.account_id = ANY (accs) AND g.voided_at IS NULL AND g.effective_at < t_to
               AND l.remaining > 0)
      INTO wins, has_true_ups, has_installments, adjs, grs
      -- the commitment windows overlapping the periods; minimum ones ending
      -- in them (true-ups), prepaid ones (installments)
      FROM (SELECT array_agg(ROW(w.account_id, w.commitment_id, w.window_no, c.kind, w.starts_at,
                                 w.ends_at, w.amount, c.applies_to::text[], c.installments,
                                 w.installment_due, w.installment_amounts)::billing._window) AS wins,
                   coalesce(bool_or(c.kind = 'minimum' AND w.ends_at > t_from AND w.ends_at <= t_to),
                            false) AS has_true_ups,
                   coalesce(bool_or(c.kind = 'prepaid'), false) AS has_installments
              FROM billing.commitment_windows w
                   JOIN billing.commitments c
                     ON c.account_id = w.account_id AND c.commitment_id = w.commitment_id
             WHERE w.account_id = ANY (accs) AND w.starts_at < t_to AND w.ends_at > t_from) cw;
    IF wins IS NULL AND adjs IS NULL AND grs IS NULL THEN
        RETURN QUERY SELECT * FROM unnest(l);
        RETURN;
    END IF;
    -- 3. true_up lines: the minimum windows ending in a period, short of
    -- the eligible spend of the finalized invoices inside the window (each
    -- invoice's usage, fixed and cap lines plus the adjustments made to it
    -- since, billed or pending) and of the periods built here
    IF has_true_ups THEN
        SELECT array_agg(y.account_id) AS accounts, array_agg(y.commitment_id) AS commitments,
               array_agg(y.window_no) AS windows, array_agg(y.spend) AS spends
          INTO sp
          FROM (SELECT w.account_id, w.commitment_id, w.window_no,
                       sum(billing._eligible_spend(c.applies_to::text[], b.kinds, b.meters, b.amounts)) AS spend
                  FROM billing.commitment_windows w
                       JOIN billing.commitments c
                         ON c.account_id = w.account_id AND c.commitment_id = w.commitment_id
                       JOIN billing.invoices i
                         ON i.account_id = w.account_id AND i.status = 'finalized'
                        AND i.period_start >= w.starts_at AND i.period_end <= w.ends_at
                       CROSS JOIN LATERAL (
                           SELECT array_agg(z.kind) AS kinds, array_agg(z.meter) AS meters,
                                  array_agg(z.amount) AS amounts
                             FROM (SELECT x.kind, x.meter::text AS meter, x.amount
                                     FROM billing.invoice_lines x
                                    WHERE x.account_id = i.account_id AND x.invoice_id = i.invoice_id
                                      AND x.kind IN ('usage', 'fixed', 'cap')
                                   UNION ALL
                                   SELECT a.line_kind, a.meter::text, a.delta FROM billing.adjustments a
                                    WHERE a.account_id = i.account_id AND a.invoice_id = i.invoice_id) z) b
                 WHERE w.account_id = ANY (accs) AND c.kind = 'minimum'
                   AND w.ends_at > t_from AND w.ends_at <= t_to
                 GROUP BY w.account_id, w.commitment_id, w.window_no) y;
        l := l || ARRAY(
            WITH per AS (
                SELECT x.n::integer AS idx, x.a AS account_id, x.cur AS currency, x.s AS ps, x.e AS pe
                  FROM unnest(p_accounts, p_currencies, p_starts, p_ends)
                       WITH ORDINALITY AS x(a, cur, s, e, n)
            ), batch AS (
                -- the periods being built, as (kind, meter, amount) lists
                SELECT x.idx, array_agg(x.kind) AS kinds, array_agg(x.meter) AS meters,
                       array_agg(x.amount) AS amounts
                  FROM unnest(l) x GROUP BY x.idx
            ), t AS (
                SELECT per.idx, w.commitment_id, w.window_no, w.starts_at, w.ends_at, per.currency,
                       w.amount, w.amount
                       - coalesce((SELECT s.spend
                                     FROM unnest(sp.accounts, sp.commitments, sp.windows, sp.spends)
                                          AS s(account_id, commitment_id, window_no, spend)
                                    WHERE s.account_id = w.account_id AND s.commitment_id = w.commitment_id
                                      AND s.window_no = w.window_no), 0)
                       - coalesce((SELECT sum(billing._eligible_spend(w.applies_to, b.kinds, b.meters, b.amounts))
                                     FROM per p2 JOIN batch b ON b.idx = p2.idx
                                    WHERE p2.account_id = w.account_id
                                      AND p2.ps >= w.starts_at AND p2.pe <= w.ends_at), 0) AS short
                  FROM per JOIN unnest(wins) w
                         ON w.account_id = per.account_id AND w.kind = 'minimum'
                        AND w.ends_at > per.ps AND w.ends_at <= per.pe
            )
            SELECT ROW(t.idx, 2000000000 + row_number() OVER (PARTITION BY t.idx ORDER BY t.commitment_id, t.window_no),
                       'true_up', NULL,
                       format('minimum commitment %s, %s to %s: shortfall', t.commitment_id,
                              to_char(t.starts_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                              to_char(t.ends_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
                       -- quantity: the window's eligible spend
                       t.amount - t.short, billing.round_money(t.short, t.currency), t.short, NULL,
                       NULL, NULL, t.commitment_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                       NULL)::billing._invoice_line
              FROM t
             WHERE billing.round_money(t.short, t.currency) > 0);
    END IF;
    -- commitment lines: each installment of a prepaid window on the period
    -- its schedule puts it in
    IF has_installments THEN
        l := l || ARRAY(
            SELECT ROW(x.n, 3000000000 + row_number() OVER (PARTITION BY x.n ORDER BY w.commitment_id, w.window_no, i.j),
                       'commitment', NULL,
                       CASE WHEN w.installments = 1
                            THEN format('prepaid commitment %s, window %s', w.commitment_id, w.window_no)
                            ELSE format('prepaid commitment %s, window %s: installment %s of %s',
                                        w.commitment_id, w.window_no, i.j, w.installments) END,
                       NULL, i.amount, NULL, NULL, NULL, NULL, w.commitment_id, NULL, NULL, NULL, NULL,
                       NULL, NULL, NULL, NULL)::billing._invoice_line
              FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, n)
                   JOIN unnest(wins) w ON w.account_id = x.a AND w.kind = 'prepaid',
                   unnest(w.installment_due, w.installment_amounts) WITH ORDINALITY AS i(due, amount, j)
             WHERE i.due >= x.s AND i.due < x.e);
    END IF;
    -- adjustment lines: the account's pending adjustments, on its first period
    IF adjs IS NOT NULL THEN
        l := l || ARRAY(
            SELECT ROW(x.n, 4000000000 + row_number() OVER (PARTITION BY x.n ORDER BY a.adjustment_id),
                       'adjustment', a.meter, a.description, a.quantity, a.amount, NULL, NULL, NULL,
                       a.adjustment_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                       a.dimension)::billing._invoice_line
              FROM unnest(p_accounts, p_first) WITH ORDINALITY AS x(a, f, n)
                   JOIN unnest(adjs) a ON a.grant_id = x.a
             WHERE x.f);
    END IF;
    -- 4. the credits, after every line above (_credit_draws)
    IF grs IS NOT NULL THEN
        l := l || ARRAY(SELECT x FROM billing._credit_draws(p_accounts, p_currencies, p_starts,
                                                            p_ends, p_book, l, grs) x);
    END IF;
    IF cardinality(p_accounts) = 1 THEN
        RETURN QUERY SELECT * FROM unnest(l);     -- in order already
    ELSE
        RETURN QUERY SELECT * FROM unnest(l) x ORDER BY x.idx, x.ord;
    END IF;
END
$$;
COMMENT ON FUNCTION billing._invoice_build(bigint[], text[], numeric[], timestamptz[], timestamptz[], boolean[], integer[], text[], timestamptz[], timestamptz[], boolean, boolean) IS
    'Internal: the lines of many billing periods in invoice order (usage and fixed per plan segment, cap, true_up, commitment, adjustment, credit) and the ledger entries they book';

DROP FUNCTION billing._rollup_totals(bigint[], timestamptz[], timestamptz[], text[], text[]);
DROP FUNCTION billing._usage_totals_many(bigint[], timestamptz[], timestamptz[]);
DROP FUNCTION billing._usage_totals_citus(bigint, timestamptz, timestamptz);
DROP FUNCTION billing._rate_period(bigint, text, text, numeric, timestamptz, timestamptz);
DROP FUNCTION billing._rate_periods(bigint[], text[], text[], numeric[], timestamptz[], timestamptz[]);
DROP FUNCTION billing.invoice_preview(bigint, timestamptz);
DROP FUNCTION billing._invoice_preview(bigint, timestamptz);
DROP FUNCTION billing.remaining(bigint, text, timestamptz);
DROP FUNCTION billing.rerate(timestamptz, timestamptz, bigint, boolean, text);
DROP FUNCTION billing._rerate(timestamptz, timestamptz, bigint, boolean, text);
DROP FUNCTION billing._rerate_diff(timestamptz, timestamptz, bigint);

CREATE FUNCTION billing._rollup_totals(p_accounts bigint[], p_starts timestamptz[],
                                      p_ends timestamptz[], p_meters text[],
                                      p_aggregations text[],
                                      s_idx integer[] DEFAULT '{}', s_meters text[] DEFAULT '{}',
                                      s_dims text[] DEFAULT '{}')
    RETURNS TABLE (idx integer, meter text, quantity numeric, last_ts timestamptz,
                   last_seq bigint, dimension text)
    AS 'MODULE_PATHNAME', 'billing_rollup_totals'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._rollup_totals(bigint[], timestamptz[], timestamptz[], text[], text[], integer[], text[], text[]) IS
    'Internal: per period (1-based index) and meter, the aggregate of the buckets and roll-ups covering [start, end), with the latest cell''s last_ts and last_seq; the dimensions named for a period and meter (s_idx, s_meters, s_dims) apart, the rest with dimension NULL (src/totals.c)';

/*
 * _usage_totals_many: the quantity of each meter of each (account,
 * [from, to)) given, combined by the meter's aggregation.  Reads day roll-ups for whole
 * UTC days, hour roll-ups for whole hours, buckets for the minutes at the
 * edges, and the deltas not yet compacted, so a month costs a few hundred
 * rows, not tens of thousands of minute buckets.
 *
 * Matrix charges (issue 18): c_idx, c_meters and c_dims list the usage
 * charges rated in each period (element j: period c_idx[j] rates meter
 * c_meters[j], dimension c_dims[j] alone, or with c_dims[j] NULL the
 * dimensions no other charge of the period names).  A dimension named for
 * a period and meter gets a row of its own; dimension NULL is the rest of
 * the meter (all of it when none is named).
 */
CREATE FUNCTION billing._usage_totals_many(p_accounts bigint[], p_starts timestamptz[],
                                           p_ends timestamptz[], c_idx integer[] DEFAULT NULL,
                                           c_meters text[] DEFAULT NULL, c_dims text[] DEFAULT NULL)
    RETURNS TABLE (idx integer, meter text, quantity numeric, dimension text)
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
BEGIN
    -- on Citus: one router query per account (see 90_distribute.sql)
    IF billing._citus_table_kind('billing.usage_deltas') IS NOT NULL THEN
        RETURN QUERY
        SELECT x.i::integer, t.meter, t.quantity, t.dimension
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i),
               LATERAL billing._usage_totals_citus(
                   x.a, x.s, x.e,
                   ARRAY(SELECT c.m FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
                          WHERE c.i = x.i AND c.d IS NOT NULL ORDER BY c.m, c.d),
                   ARRAY(SELECT c.d FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
                          WHERE c.i = x.i AND c.d IS NOT NULL ORDER BY c.m, c.d)) t
        UNION ALL
        SELECT u.idx, u.meter, u.quantity, u.dimension
          FROM billing._usage_totals_unique(p_accounts, p_starts, p_ends, c_idx, c_meters, c_dims) u;
        RETURN;
    END IF;
    -- the roll-ups and buckets covering each period, each meter aggregated
    -- in C (billing._rollup_totals), plus the deltas not yet compacted,
    -- folded by the same rule (billing._cell_agg, src/agg.c)
    RETURN QUERY
    WITH ms AS (
        SELECT coalesce(array_agg(m.meter::text ORDER BY m.meter), '{}') AS meters,
               coalesce(array_agg(m.aggregation::text ORDER BY m.meter), '{}') AS aggs
          FROM billing.meters m
         WHERE m.aggregation <> 'unique'
    ), named AS (
        -- the dimensions charged apart, per period and meter
        SELECT DISTINCT c.i AS idx, c.m COLLATE "C" AS meter, c.d COLLATE "C" AS dim
          FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
         WHERE c.i IS NOT NULL AND c.m IS NOT NULL AND c.d IS NOT NULL
    ), na AS (
        SELECT coalesce(array_agg(n.idx), '{}') AS i, coalesce(array_agg(n.meter::text), '{}') AS m,
               coalesce(array_agg(n.dim::text), '{}') AS d
          FROM named n
    ), per AS (
        SELECT x.i::integer AS idx, x.a AS account_id, x.s AS ps, x.e AS pe
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i)
    ), folded AS (
        SELECT r.idx, r.meter COLLATE "C" AS meter, r.dimension COLLATE "C" AS dim, r.quantity,
               r.last_ts, r.last_seq
          FROM ms, na,
               billing._rollup_totals(p_accounts, p_starts, p_ends, ms.meters, ms.aggs,
                                      na.i, na.m, na.d) r
        UNION ALL
        -- not yet compacted
        SELECT per.idx, x.meter, n.dim, x.quantity, x.last_ts,
               CASE WHEN x.last_ts IS NOT NULL THEN d.seq END
          FROM per JOIN billing.usage_deltas d ON d.account_id = per.account_id
               CROSS JOIN LATERAL billing._delta_cells(d.cells) x
               LEFT JOIN named n ON n.idx = per.idx AND n.meter = x.meter AND n.dim = x.dimension
         WHERE x.bucket_start >= per.ps AND x.bucket_start < per.pe
    )
    SELECT f.idx, f.meter::text,
           billing._cell_agg(m.aggregation, f.quantity, f.last_ts, f.last_seq),
           f.dim::text
      FROM folded f JOIN billing.meters m ON m.meter = f.meter AND m.aggregation <> 'unique'
     GROUP BY f.idx, f.meter, f.dim, m.aggregation
    UNION ALL
    SELECT u.idx, u.meter, u.quantity, u.dimension
      FROM billing._usage_totals_unique(p_accounts, p_starts, p_ends, c_idx, c_meters, c_dims) u;
END
$$;
COMMENT ON FUNCTION billing._usage_totals_many(bigint[], timestamptz[], timestamptz[], integer[], text[], text[]) IS
    'Internal: quantity per meter (and per dimension charged apart) of many (account, range) pairs, from roll-ups where whole hours and days allow';

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

/*
 * _rate_periods: the lines of many billing periods at once (element i of
 * each array describes period i), in invoice order per period (fixed fees,
 * usage by description, meter and dimension, the spend cap), amounts
 * rounded per line to the currency's minor unit.  The version of each
 * charge (plan, meter, dimension) in force at a period's start rates the
 * whole period; a charge with a dimension rates that dimension's usage of
 * its meter, one with none the dimensions no other charge in force names.
 * Set-based, so that finalizing or re-rating ten thousand accounts is one
 * query, not ten thousand.
 */
CREATE FUNCTION billing._rate_periods(p_accounts bigint[], p_plans text[], p_currencies text[],
                                      p_caps numeric[], p_starts timestamptz[],
                                      p_ends timestamptz[])
    RETURNS TABLE (idx integer, ord integer, kind text, meter text, description text,
                   quantity numeric, amount numeric, unrounded_amount numeric,
                   charge_id bigint, price billing.price, dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
BEGIN
    RETURN QUERY
    WITH per AS (
        SELECT x.i::integer AS idx, x.pl AS plan, x.cur AS currency, x.cap, x.s AS ps
          FROM unnest(p_plans, p_currencies, p_caps, p_starts) WITH ORDINALITY AS x(pl, cur, cap, s, i)
    ), versions AS (
        -- the charge versions in force, once per (plan, period start) however
        -- many accounts share them, numbered in invoice order: fixed fees by
        -- description, then usage by description, meter and dimension (the
        -- spend cap comes last)
        SELECT v.*, (row_number() OVER (PARTITION BY v.plan, v.ps
                                        ORDER BY v.grp, v.description, v.meter,
                                                 v.dimension NULLS FIRST))::integer AS ord,
               (count(*) OVER (PARTITION BY v.plan, v.ps))::integer AS n_lines
          FROM (SELECT DISTINCT ON (k.plan, k.ps, c.meter, c.dimension,
                                    CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END)
                       k.plan, k.ps, c.charge_id, c.meter::text AS meter,
                       c.dimension::text AS dimension,
                       coalesce(c.description,
                                CASE WHEN c.dimension IS NULL THEN c.meter::text
                                     ELSE format('%s (%s)', c.meter, c.dimension) END) AS description,
                       c.price,
                       CASE WHEN c.meter IS NULL THEN 1 ELSE 2 END AS grp
                  FROM (SELECT DISTINCT per.plan, per.ps FROM per) k
                       JOIN billing.charges c ON c.plan = k.plan AND c.valid_from <= k.ps
                 ORDER BY k.plan, k.ps, c.meter, c.dimension,
                          CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END,
                          c.valid_from DESC) v
    ), widths AS (
        -- the bucket widths of the meters each (plan, period start) charges
        SELECT DISTINCT v.plan, v.ps, m.bucket_width
          FROM versions v JOIN billing.meters m ON m.meter = v.meter
    ), firsts AS (
        -- a metered charge of a period bills the buckets of its meter that
        -- start in [lo, period end), lo by the one rule of src/periods.c
        -- for the meter's bucket width: the bucket straddling a
        -- subscription's start goes to its first period, every other one
        -- to the period holding its start
        SELECT per.idx, w.bucket_width,
               billing._period_first_bucket(per.ps, uf.usage_from, w.bucket_width) AS lo
          FROM per JOIN widths w ON w.plan = per.plan AND w.ps = per.ps
               JOIN billing._period_usage_from(p_accounts, p_starts) uf ON uf.idx = per.idx
    ), reads AS (
        -- one read of the usage store per period and distinct lo (more than
        -- one only in a first period whose meters' buckets straddle its
        -- start at different points)
        SELECT r.idx, r.lo, (row_number() OVER (ORDER BY r.idx, r.lo))::integer AS j
          FROM (SELECT DISTINCT f.idx, f.lo FROM firsts f) r
    ), charged AS (
        -- the usage charges of each read (those of its period whose
        -- meter's bucket width gives its lo), for the totals: a matrix
        -- charge's dimension is totalled apart
        SELECT array_agg(rd.j) AS i, array_agg(v.meter) AS m, array_agg(v.dimension) AS d
          FROM reads rd JOIN per ON per.idx = rd.idx
               JOIN versions v ON v.plan = per.plan AND v.ps = per.ps AND v.meter IS NOT NULL
               JOIN billing.meters m ON m.meter = v.meter
               JOIN firsts f ON f.idx = rd.idx AND f.lo = rd.lo AND f.bucket_width = m.bucket_width
    ), totals AS MATERIALIZED (
        -- (read once: inlined, the join below would read the store per line)
        -- each meter from the read whose lo is that of its bucket width
        SELECT rd.idx, t.meter, t.dimension, t.quantity
          FROM (SELECT array_agg(p_accounts[rd.idx] ORDER BY rd.j) AS accounts,
                       array_agg(rd.lo ORDER BY rd.j) AS starts,
                       array_agg(p_ends[rd.idx] ORDER BY rd.j) AS ends
                  FROM reads rd) a, charged c,
               LATERAL billing._usage_totals_many(a.accounts, a.starts, a.ends, c.i, c.m, c.d) t
               JOIN reads rd ON rd.j = t.idx
               JOIN billing.meters m ON m.meter = t.meter
               JOIN firsts f ON f.idx = rd.idx AND f.lo = rd.lo AND f.bucket_width = m.bucket_width
    ), rated AS (
        SELECT per.idx, per.currency, v.ord, v.n_lines, v.grp,
               CASE WHEN v.meter IS NULL THEN 'fixed' ELSE 'usage' END AS kind,
               v.meter, v.description,
               CASE WHEN v.meter IS NULL THEN NULL ELSE coalesce(t.quantity, 0) END AS quantity,
               billing.rate(v.price, CASE WHEN v.meter IS NULL THEN 0 ELSE coalesce(t.quantity, 0) END)
                   AS unrounded_amount,
               v.charge_id, v.price, v.dimension
          FROM per JOIN versions v ON v.plan = per.plan AND v.ps = per.ps
               LEFT JOIN totals t ON t.idx = per.idx AND t.meter = v.meter
                                 AND t.dimension IS NOT DISTINCT FROM v.dimension
    ), lines AS (
        SELECT r.*, billing.round_money(r.unrounded_amount, r.currency) AS amount FROM rated r
    ), capped AS (
        SELECT per.idx, max(l.n_lines) + 1 AS ord, 'cap'::text AS kind, NULL::text AS meter,
               'spend cap'::text AS description, NULL::numeric AS quantity,
               NULL::numeric AS unrounded_amount, NULL::bigint AS charge_id,
               NULL::billing.price AS price, NULL::text AS dimension,
               billing._cap_amount(per.cap, per.currency, sum(l.amount)) AS amount
          FROM per JOIN lines l ON l.idx = per.idx AND l.kind = 'usage'
         WHERE per.cap IS NOT NULL
         GROUP BY per.idx, per.cap, per.currency
        HAVING billing._cap_amount(per.cap, per.currency, sum(l.amount)) IS NOT NULL
    )
    SELECT l.idx, l.ord, l.kind, l.meter, l.description, l.quantity, l.amount,
           l.unrounded_amount, l.charge_id, l.price, l.dimension
      FROM lines l
    UNION ALL
    SELECT c.idx, c.ord, c.kind, c.meter, c.description, c.quantity, c.amount,
           c.unrounded_amount, c.charge_id, c.price, c.dimension
      FROM capped c;
END
$$;
COMMENT ON FUNCTION billing._rate_periods(bigint[], text[], text[], numeric[], timestamptz[], timestamptz[]) IS
    'Internal: the rated lines (fixed fees, usage per meter and dimension, spend cap) of many billing periods';

CREATE FUNCTION billing._rate_period(p_account bigint, p_plan text, p_currency text,
                                     p_cap numeric, p_start timestamptz, p_end timestamptz)
    RETURNS TABLE (ord integer, kind text, meter text, description text, quantity numeric,
                   amount numeric, unrounded_amount numeric, charge_id bigint,
                   price billing.price, dimension text)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT r.ord, r.kind, r.meter, r.description, r.quantity, r.amount, r.unrounded_amount,
           r.charge_id, r.price, r.dimension
      FROM billing._rate_periods(ARRAY[p_account], ARRAY[p_plan], ARRAY[p_currency],
                                 ARRAY[p_cap], ARRAY[p_start], ARRAY[p_end]) r
     ORDER BY r.ord
$$;
COMMENT ON FUNCTION billing._rate_period(bigint, text, text, numeric, timestamptz, timestamptz) IS
    'Internal: the rated lines of one billing period';

CREATE FUNCTION billing._invoice_preview(p_account bigint, p_at timestamptz)
    RETURNS TABLE (r_line_no int, r_kind text, r_meter text, r_description text,
                   r_period_start timestamptz, r_period_end timestamptz,
                   r_quantity numeric, r_amount numeric, r_dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    p record;
BEGIN
    -- the period's segments (its spend cap: the last one's)
    SELECT min(s.segment_start) AS ps, max(s.segment_end) AS pe, min(s.currency) AS currency,
           (array_agg(s.spend_cap ORDER BY s.segment_start DESC))[1] AS cap,
           array_agg(s.plan ORDER BY s.segment_start) AS plans,
           array_agg(s.segment_start ORDER BY s.segment_start) AS starts,
           array_agg(s.segment_end ORDER BY s.segment_start) AS ends
      INTO p
      FROM billing._segments(ARRAY[p_account], ARRAY[p_at]) s;
    IF p.plans IS NULL THEN
        RETURN;               -- no subscription at p_at
    END IF;
    -- the build's rows come in invoice order; without booking, all are lines
    RETURN QUERY
    SELECT b.n::integer, b.kind, b.meter, b.description, p.ps, p.pe, b.quantity, b.amount,
           b.dimension
      FROM billing._invoice_build(ARRAY[p_account], ARRAY[p.currency], ARRAY[p.cap], ARRAY[p.ps],
                                  ARRAY[p.pe], ARRAY[true], array_fill(1, ARRAY[cardinality(p.plans)]),
                                  p.plans, p.starts, p.ends)
               WITH ORDINALITY AS b(idx, ord, kind, meter, description, quantity, amount,
                                    unrounded_amount, charge_id, price, adjustment_id,
                                    commitment_id, grant_id, segment_start, segment_end,
                                    proration, effective_at, expires_at, source_grant, dimension, n);
END
$$;
COMMENT ON FUNCTION billing._invoice_preview(bigint, timestamptz) IS 'Internal: the body of invoice_preview';

CREATE FUNCTION billing.invoice_preview(account_id bigint, at timestamptz DEFAULT pg_catalog.now())
    RETURNS TABLE (line_no int, kind text, meter text, description text,
                   period_start timestamptz, period_end timestamptz,
                   quantity numeric, amount numeric,
                   dimension text)   -- issue 18: last, so that positional clients keep working
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT * FROM billing._invoice_preview($1, $2)
$$;
COMMENT ON FUNCTION billing.invoice_preview(bigint, timestamptz) IS
    'The bill of the period holding at, as it stands: every line rounded to the currency''s minor unit, the spend cap, true-ups, commitment installments, pending adjustments and credits; a matrix charge''s line carries its dimension';

CREATE FUNCTION billing.remaining(account_id bigint, meter text,
                                  at timestamptz DEFAULT pg_catalog.now(),
                                  dimension text DEFAULT '')
    RETURNS numeric
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    per record;
    line record;
    lines billing._invoice_line[];
    others numeric;
    budget numeric;
    q0 numeric;
    j jsonb;
    ends numeric[];
    seg_end numeric;
    lo numeric := 0;          -- largest x known to fit
    hi numeric;               -- smallest x known not to fit
    mid numeric;
    tail numeric;             -- past it, the charge is affine in x
BEGIN
    IF account_id IS NULL OR meter IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'remaining: account_id, meter and at must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.accounts a WHERE a.account_id = remaining.account_id) THEN
        RAISE EXCEPTION 'account % does not exist', remaining.account_id USING ERRCODE = '23503';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.meters m WHERE m.meter = remaining.meter) THEN
        RAISE EXCEPTION 'meter "%" does not exist', remaining.meter USING ERRCODE = '23503';
    END IF;
    -- the period holding at, whose spend cap bounds the usage lines of
    -- every plan segment (credits do not count: the cap bounds usage before)
    SELECT s.spend_cap, s.currency INTO per
      FROM billing._segments(ARRAY[remaining.account_id], ARRAY[at]) s
     ORDER BY s.segment_start DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN 0;                 -- no subscription: nothing can be billed
    END IF;
    IF per.spend_cap IS NULL THEN
        RETURN NULL;              -- no cap: unlimited
    END IF;
    lines := ARRAY(SELECT b.line
                     FROM billing._period_build(ARRAY[remaining.account_id], ARRAY[at], true) b
                    WHERE (b.line).kind = 'usage');
    -- the line rating the dimension in the plan segment holding at (the
    -- charge naming it, else the rest of the meter)
    SELECT x.quantity, x.price, x.ord INTO line
      FROM unnest(lines) x
     WHERE x.meter = remaining.meter
       AND (x.dimension = coalesce(remaining.dimension, '') OR x.dimension IS NULL)
       AND (x.segment_start IS NULL OR (x.segment_start <= at AND at < x.segment_end))
     ORDER BY x.dimension IS NULL
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;              -- the plan does not bill this meter (or dimension)
    END IF;
    SELECT coalesce(sum(x.amount), 0) INTO others FROM unnest(lines) x WHERE x.ord <> line.ord;
    budget := billing.round_money(per.spend_cap, per.currency) - others;
    q0 := line.quantity;
    IF NOT billing._fits(line.price, q0, per.currency, budget) THEN
        RETURN 0;
    END IF;

    -- stretches on which the charge cannot decrease: volume tiers, then the
    -- rest.  A tier ends where the quantity after per and free passes its
    -- bound b: at (b + free) * N for per N exact (or no per), at
    -- floor(b + free) * N for round up; for round down the stretch is open
    -- at (floor(b + free) + 1) * N, so it ends at the last whole unit from
    -- q0 before that.
    j := billing.price_to_jsonb(line.price);
    IF j ->> 'model' = 'volume' THEN
        SELECT array_agg(CASE WHEN NOT j ? 'per' OR j ->> 'per_round' = 'exact'
                                  THEN (b + f) * coalesce((j ->> 'per')::numeric, 1)
                              WHEN j ->> 'per_round' = 'up'
                                  THEN floor(b + f) * (j ->> 'per')::numeric
                              ELSE q0 + ceil((floor(b + f) + 1) * (j ->> 'per')::numeric - q0) - 1
                         END ORDER BY b)
          INTO ends
          FROM jsonb_array_elements(j -> 'tiers') t,
               LATERAL (SELECT (t ->> 'up_to')::numeric AS b,
                               coalesce((j ->> 'free')::numeric, 0) AS f) x
         WHERE t ->> 'up_to' <> 'inf';
    END IF;
    -- Whole units from q0 only: in each stretch, its last whole unit; when
    -- that is over the budget, the answer is in this stretch, where the
    -- charge cannot decrease, so bisect (lo, hi]; else go on to the next.
    FOREACH seg_end IN ARRAY coalesce(ends, '{}'::numeric[]) LOOP
        CONTINUE WHEN floor(seg_end - q0) <= lo;
        IF billing._fits(line.price, q0 + floor(seg_end - q0), per.currency, budget) THEN
            lo := floor(seg_end - q0);
        ELSE
            hi := floor(seg_end - q0);
            EXIT;
        END IF;
    END LOOP;
    IF hi IS NULL THEN
        -- open-ended: double until over the budget, however large it is.
        -- Every point where the charge bends (a tier bound, the free units,
        -- a package size, where a minimum stops applying: at most the
        -- largest number K of the price over its smallest rate, 10^-22 a
        -- unit; times a quantity divisor) lies below tail.  Past it the
        -- charge is affine in the quantity (or a staircase of steps shorter
        -- than tail): the same at x and 2x there, it never grows again.
        SELECT (1 + coalesce(max(n[1]::numeric), 0)) ^ 2 * 1e24 INTO tail
          FROM regexp_matches(billing.price_to_jsonb(line.price)::text, '([0-9]+(\.[0-9]+)?)', 'g') AS n;
        hi := greatest(lo * 2, 1);
        WHILE billing._fits(line.price, q0 + hi, per.currency, budget) LOOP
            IF lo > tail AND billing.rate(line.price, q0 + hi) = billing.rate(line.price, q0 + lo) THEN
                RETURN NULL;      -- the charge stopped growing below the budget
            END IF;
            lo := hi;
            hi := hi * 2;
        END LOOP;
    END IF;
    WHILE hi - lo > 1 LOOP
        mid := floor((lo + hi) / 2);
        IF billing._fits(line.price, q0 + mid, per.currency, budget) THEN
            lo := mid;
        ELSE
            hi := mid;
        END IF;
    END LOOP;
    RETURN lo;
END
$$;
COMMENT ON FUNCTION billing.remaining(bigint, text, timestamptz, text) IS
    'Whole units of a meter (of one dimension, by default '''') that can still be used this period before the usage lines (of every plan segment) exceed the spend cap (NULL: unlimited)';

/*
 * _rerate_diff: for each finalized invoice overlapping [from_ts, to_ts) (of
 * one account or all), what its lines should be today, what was billed
 * (the line plus the adjustments already recorded for it), and the
 * difference.  Lines are matched by kind, meter and dimension (usage),
 * description (fixed fees) or kind alone (the spend cap); a usage line
 * missing on one side counts 0 units there.
 *
 * One body for one node and for Citus (1.0 had a Citus twin, which
 * drifted): each step is its own statement, and the statements that rate
 * (_rate_periods, which reads distributed tables itself) and compare read
 * no table, as Citus requires.  The steps pass arrays, element k of each
 * describing line or invoice k.
 */
CREATE FUNCTION billing._rerate_diff(from_ts timestamptz, to_ts timestamptz, p_account bigint)
    RETURNS TABLE (account_id bigint, invoice_id bigint, line_kind text, meter text,
                   description text, billed_quantity numeric, billed_amount numeric,
                   correct_quantity numeric, correct_amount numeric, delta numeric,
                   segment_start timestamptz, dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
DECLARE
    inv record;     -- the invoices
    cor billing._invoice_line[];    -- today's lines (idx: the invoice's place in inv)
    bil record;     -- the lines billed, and the adjustments made since
BEGIN
    -- 1. the invoices
    SELECT array_agg(i.account_id ORDER BY i.account_id, i.invoice_id) AS accounts,
           array_agg(i.invoice_id ORDER BY i.account_id, i.invoice_id) AS invoices,
           array_agg(i.period_start ORDER BY i.account_id, i.invoice_id) AS starts
      INTO inv
      FROM billing.invoices i
     WHERE i.status = 'finalized'
       AND i.period_start < to_ts AND i.period_end > from_ts
       AND (p_account IS NULL OR i.account_id = p_account);
    IF inv.accounts IS NULL THEN
        RETURN;
    END IF;
    -- 2. today's lines of each invoice's period (every plan segment, the
    -- cap); a period no subscription covers any more bills nothing
    SELECT array_agg(ROW(k.n, (b.line).ord, (b.line).kind, (b.line).meter, (b.line).description,
                         (b.line).quantity, (b.line).amount, NULL, NULL, NULL, NULL, NULL, NULL,
                         (b.line).segment_start, NULL, NULL, NULL, NULL, NULL,
                         (b.line).dimension)::billing._invoice_line)
      INTO cor
      FROM billing._period_build(inv.accounts, inv.starts, true) b
           JOIN unnest(inv.accounts, inv.starts) WITH ORDINALITY AS k(a, s, n)
             ON k.a = b.account_id AND k.s = b.period_start;
    -- 3. what was billed: the rated lines, and the adjustments made since
    SELECT array_agg(y.account_id) AS accounts, array_agg(y.invoice_id) AS invoices,
           array_agg(y.kind) AS kinds, array_agg(y.meter) AS meters,
           array_agg(y.description) AS descriptions, array_agg(y.quantity) AS quantities,
           array_agg(y.amount) AS amounts, array_agg(y.segment_start) AS segments,
           array_agg(y.dimension) AS dimensions
      INTO bil
      FROM (SELECT l.account_id, l.invoice_id, l.kind, l.meter::text AS meter, l.description,
                   l.quantity, l.amount, l.segment_start, l.dimension::text AS dimension
              FROM unnest(inv.accounts, inv.invoices) v(account_id, invoice_id)
                   JOIN billing.invoice_lines l
                     ON l.account_id = v.account_id AND l.invoice_id = v.invoice_id
             WHERE l.kind IN ('usage', 'fixed', 'cap')
            UNION ALL
            SELECT a.account_id, a.invoice_id, a.line_kind, a.meter::text, a.description,
                   a.new_quantity - a.old_quantity, a.delta, a.segment_start, a.dimension::text
              FROM unnest(inv.accounts, inv.invoices) v(account_id, invoice_id)
                   JOIN billing.adjustments a
                     ON a.account_id = v.account_id AND a.invoice_id = v.invoice_id) y;
    -- 4. compare (reads no table)
    RETURN QUERY
    WITH invs AS (
        SELECT k.n::integer AS n, k.a AS account_id, k.i AS invoice_id, k.s AS period_start
          FROM unnest(inv.accounts, inv.invoices, inv.starts) WITH ORDINALITY AS k(a, i, s, n)
    ), correct AS (
        SELECT invs.account_id, invs.invoice_id, c.kind, c.meter, c.description, c.quantity,
               c.amount, c.segment_start, coalesce(c.segment_start, invs.period_start) AS seg,
               c.dimension
          FROM unnest(cor) c JOIN invs ON invs.n = c.idx
    ), billed_sum AS (
        SELECT b.account_id, b.invoice_id, b.kind, b.meter, b.dimension::text AS dimension,
               CASE WHEN b.kind = 'fixed' THEN b.description END AS fixed_key,
               coalesce(b.segment_start, invs.period_start) AS seg,
               max(b.segment_start) AS segment_start, max(b.description) AS description,
               sum(b.quantity) AS quantity, sum(b.amount) AS amount
          FROM unnest(bil.accounts, bil.invoices, bil.kinds, bil.meters, bil.descriptions,
                      bil.quantities, bil.amounts, bil.segments, bil.dimensions)
                   AS b(account_id, invoice_id, kind, meter, description, quantity, amount,
                        segment_start, dimension)
               JOIN invs ON invs.account_id = b.account_id AND invs.invoice_id = b.invoice_id
         GROUP BY 1, 2, 3, 4, 5, 6, 7
    )
    SELECT coalesce(c.account_id, b.account_id), coalesce(c.invoice_id, b.invoice_id),
           coalesce(c.kind, b.kind), coalesce(c.meter, b.meter),
           coalesce(c.description, b.description),
           -- a usage line missing on either side billed or should bill 0 units
           CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(b.quantity, 0) ELSE b.quantity END,
           coalesce(b.amount, 0),
           CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(c.quantity, 0) ELSE c.quantity END,
           coalesce(c.amount, 0),
           coalesce(c.amount, 0) - coalesce(b.amount, 0),
           coalesce(c.segment_start, b.segment_start), coalesce(c.dimension, b.dimension)
      FROM correct c
           FULL JOIN billed_sum b
                  ON b.account_id = c.account_id AND b.invoice_id = c.invoice_id
                 AND b.seg = c.seg AND b.kind = c.kind
                 AND b.meter IS NOT DISTINCT FROM c.meter
                 AND b.dimension IS NOT DISTINCT FROM c.dimension
                 AND b.fixed_key IS NOT DISTINCT FROM CASE WHEN c.kind = 'fixed' THEN c.description END;
END
$$;
COMMENT ON FUNCTION billing._rerate_diff(timestamptz, timestamptz, bigint) IS
    'Internal: billed versus correct lines of the finalized invoices overlapping a range';

CREATE FUNCTION billing._rerate(from_ts timestamptz, to_ts timestamptz, p_account bigint,
                                dry_run boolean, p_reason text)
    RETURNS TABLE (r_account bigint, r_invoice bigint, r_meter text,
                   r_billed_quantity numeric, r_billed_amount numeric,
                   r_correct_quantity numeric, r_correct_amount numeric, r_delta numeric,
                   r_dimension text)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
DECLARE
    n_written bigint;
BEGIN
    IF from_ts IS NULL OR to_ts IS NULL OR dry_run IS NULL THEN
        RAISE EXCEPTION 'rerate: from_ts, to_ts and dry_run must not be null' USING ERRCODE = '22004';
    END IF;
    IF from_ts >= to_ts THEN
        RAISE EXCEPTION 'rerate: from_ts must be before to_ts' USING ERRCODE = '22023';
    END IF;
    IF dry_run THEN
        RETURN QUERY
        SELECT d.account_id, d.invoice_id, d.meter, d.billed_quantity, d.billed_amount,
               d.correct_quantity, d.correct_amount, d.delta, d.dimension
          FROM billing._rerate_diff(from_ts, to_ts, p_account) d
         WHERE d.delta <> 0
         ORDER BY 1, 2, 3, 9 NULLS FIRST;
        RETURN;
    END IF;
    -- one re-rate at a time: a second run waits, then finds the first one's adjustments
    PERFORM pg_advisory_xact_lock(1651074162, 3);
    RETURN QUERY
    WITH d AS (
        SELECT * FROM billing._rerate_diff(from_ts, to_ts, p_account) x
         WHERE x.delta <> 0
    ), written AS (
        INSERT INTO billing.adjustments (account_id, invoice_id, line_kind, meter, description,
                                         old_quantity, new_quantity, old_amount, new_amount, delta,
                                         reason, segment_start, dimension)
        SELECT d.account_id, d.invoice_id, d.line_kind, d.meter, d.description,
               d.billed_quantity, d.correct_quantity, d.billed_amount, d.correct_amount, d.delta,
               coalesce(p_reason, 're-rate'), d.segment_start, d.dimension
          FROM d
         -- adjustment ids in invoice line order (plan segments; fixed fees,
         -- usage, the cap)
         ORDER BY d.account_id, d.invoice_id, d.segment_start NULLS LAST,
                  CASE d.line_kind WHEN 'fixed' THEN 1 WHEN 'usage' THEN 2 ELSE 3 END,
                  d.description, d.meter, d.dimension NULLS FIRST
    )
    SELECT d.account_id, d.invoice_id, d.meter, d.billed_quantity, d.billed_amount,
           d.correct_quantity, d.correct_amount, d.delta, d.dimension
      FROM d
     ORDER BY 1, 2, 3, 9 NULLS FIRST;
    GET DIAGNOSTICS n_written = ROW_COUNT;
    PERFORM billing._audit_rerate(from_ts, to_ts, p_account, coalesce(p_reason, 're-rate'), n_written);
END
$$;
COMMENT ON FUNCTION billing._rerate(timestamptz, timestamptz, bigint, boolean, text) IS
    'Internal: the body of billing.rerate';

CREATE FUNCTION billing.rerate(from_ts timestamptz, to_ts timestamptz, account_id bigint DEFAULT NULL,
                               dry_run boolean DEFAULT false, reason text DEFAULT 're-rate')
    RETURNS TABLE (account_id bigint, invoice_id bigint, meter text,
                   billed_quantity numeric, billed_amount numeric,
                   correct_quantity numeric, correct_amount numeric, delta numeric,
                   dimension text)   -- issue 18: last, so that positional clients keep working
    LANGUAGE sql
    SET search_path = pg_catalog, billing, pg_temp AS $$
    SELECT * FROM billing._rerate($1, $2, $3, $4, $5)
$$;
COMMENT ON FUNCTION billing.rerate(timestamptz, timestamptz, bigint, boolean, text) IS
    'Recomputes the finalized invoices overlapping [from_ts, to_ts) from today''s usage and charge versions and records the differences as adjustments for the next invoice';


/*
 * finalize_invoices: lock the accounts with due periods (row locks, in
 * account order), look the due periods up again under the locks (a
 * concurrent finalizer may have written some), then write every invoice,
 * its lines and the adjustments it carries in one set-based statement.
 * Each account's pending adjustments go on its earliest new invoice.
 */
CREATE OR REPLACE FUNCTION billing._finalize(p_as_of timestamptz)
    RETURNS TABLE (r_invoice_id bigint, r_account_id bigint, r_period_start timestamptz,
                   r_period_end timestamptz, r_total numeric)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
DECLARE
    cutoff timestamptz;
BEGIN
    IF p_as_of IS NULL THEN
        RAISE EXCEPTION 'finalize_invoices: as_of must not be null' USING ERRCODE = '22004';
    END IF;
    -- never a period that ends after now() - grace, whatever as_of says
    -- (a future or infinite as_of would finalize periods still open)
    cutoff := LEAST(p_as_of, pg_catalog.now()) - billing._grace_period();
    -- on Citus these statements may not call functions that read the
    -- shards: the same invoices, one period at a time (90_distribute.sql)
    IF billing._citus_table_kind('billing.invoices') IS NOT NULL THEN
        RETURN QUERY SELECT * FROM billing._finalize_citus(cutoff);
        RETURN;
    END IF;
    PERFORM 1 FROM billing.accounts a
     WHERE a.account_id IN (SELECT d.account_id FROM billing._due_periods(cutoff) d)
     ORDER BY a.account_id
       FOR NO KEY UPDATE;

    RETURN QUERY
    WITH d AS MATERIALIZED (
        SELECT * FROM billing._due_periods(cutoff)
    ), due AS (
        SELECT p.*, nextval('billing.invoice_id_seq') AS invoice_id,
               (row_number() OVER (ORDER BY p.account_id, p.period_start))::integer AS k,
               row_number() OVER (PARTITION BY p.account_id ORDER BY p.period_start) = 1 AS first_of_account
          FROM (SELECT DISTINCT d.account_id, d.plan, d.currency, d.spend_cap, d.period_start,
                       d.period_end FROM d) p
    ), pa AS (
        SELECT array_agg(due.account_id ORDER BY due.k) AS accounts,
               array_agg(due.currency ORDER BY due.k) AS currencies,
               array_agg(due.spend_cap ORDER BY due.k) AS caps,
               array_agg(due.period_start ORDER BY due.k) AS starts,
               array_agg(due.period_end ORDER BY due.k) AS ends,
               array_agg(due.first_of_account ORDER BY due.k) AS firsts
          FROM due
    ), sa AS (
        SELECT array_agg(due.k ORDER BY due.k, d.segment_start) AS idx,
               array_agg(d.segment_plan ORDER BY due.k, d.segment_start) AS plans,
               array_agg(d.segment_start ORDER BY due.k, d.segment_start) AS starts,
               array_agg(d.segment_end ORDER BY due.k, d.segment_start) AS ends
          FROM d JOIN due ON due.account_id = d.account_id AND due.period_start = d.period_start
    ), built AS MATERIALIZED (
        SELECT due.account_id, due.invoice_id, x.*
          FROM pa, sa,
               LATERAL billing._invoice_build(pa.accounts, pa.currencies, pa.caps, pa.starts, pa.ends,
                                              pa.firsts, sa.idx, sa.plans, sa.starts, sa.ends,
                                              false, true) x
               JOIN due ON due.k = x.idx
    ), new_grants AS MATERIALIZED (
        SELECT b.account_id, b.grant_id AS placeholder,
               nextval('billing.credit_grant_id_seq') AS grant_id, b.amount, b.effective_at,
               b.expires_at, b.source_grant
          FROM built b WHERE b.kind = 'grant'
    ), mapped AS (
        SELECT b.*, coalesce(ng.grant_id, b.grant_id) AS real_grant_id
          FROM built b LEFT JOIN new_grants ng
                 ON ng.account_id = b.account_id AND ng.placeholder = b.grant_id
    ), numbered AS (
        SELECT m.*, (row_number() OVER (PARTITION BY m.invoice_id ORDER BY m.ord))::integer AS line_no
          FROM mapped m
         WHERE m.kind IN ('usage', 'fixed', 'cap', 'true_up', 'commitment', 'adjustment', 'credit')
    ), totals AS (
        SELECT n.invoice_id, sum(n.amount) AS total FROM numbered n GROUP BY n.invoice_id
    ), invoices_written AS (
        INSERT INTO billing.invoices (account_id, invoice_id, plan, period_start, period_end,
                                      currency, total)
        SELECT due.account_id, due.invoice_id, due.plan, due.period_start, due.period_end,
               due.currency, coalesce(t.total, 0)
          FROM due LEFT JOIN totals t ON t.invoice_id = due.invoice_id
        RETURNING billing.invoices.invoice_id, billing.invoices.account_id,
                  billing.invoices.period_start, billing.invoices.period_end,
                  billing.invoices.total
    ), lines_written AS (
        INSERT INTO billing.invoice_lines (account_id, invoice_id, line_no, kind, meter,
                                          description, quantity, amount, unrounded_amount,
                                          charge_id, price, adjustment_id, segment_start,
                                          segment_end, proration, commitment_id, grant_id, dimension)
        SELECT n.account_id, n.invoice_id, n.line_no, n.kind, n.meter, n.description, n.quantity,
               n.amount, n.unrounded_amount, n.charge_id, n.price, n.adjustment_id,
               n.segment_start, n.segment_end, n.proration, n.commitment_id, n.real_grant_id,
               n.dimension
          FROM numbered n
        RETURNING billing.invoice_lines.account_id, billing.invoice_lines.invoice_id,
                  billing.invoice_lines.adjustment_id
    ), grants_written AS (
        INSERT INTO billing.credit_grants (account_id, grant_id, amount, effective_at, expires_at,
                                           priority, applies_to, source, reason, commitment_id,
                                           window_no, rolled_from)
        SELECT ng.account_id, ng.grant_id, ng.amount, ng.effective_at, ng.expires_at, g.priority,
               g.applies_to, 'rollover', format('rollover of grant %s', g.grant_id),
               g.commitment_id, g.window_no + 1, g.grant_id
          FROM new_grants ng
               JOIN billing.credit_grants g
                 ON g.account_id = ng.account_id AND g.grant_id = ng.source_grant
        RETURNING 1
    ), ledger_written AS (
        INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at,
                                           invoice_id)
        SELECT m.account_id,
               h.seq + row_number() OVER (PARTITION BY m.account_id ORDER BY m.idx, m.ord),
               m.real_grant_id, CASE WHEN m.kind = 'credit' THEN 'draw' ELSE m.kind END, m.amount,
               m.effective_at, CASE WHEN m.kind = 'credit' THEN m.invoice_id END
          FROM mapped m
               CROSS JOIN LATERAL (SELECT coalesce(max(x.seq), 0) AS seq FROM billing.credit_ledger x
                                    WHERE x.account_id = m.account_id) h
         WHERE m.kind IN ('credit', 'expire', 'rollover', 'grant')
        RETURNING 1
    ), carried AS (
        UPDATE billing.adjustments adj SET billed_invoice_id = w.invoice_id
          FROM lines_written w
         WHERE w.adjustment_id IS NOT NULL AND adj.account_id = w.account_id
           AND adj.adjustment_id = w.adjustment_id
        RETURNING 1
    )
    SELECT w.invoice_id, w.account_id, w.period_start, w.period_end, w.total
      FROM invoices_written w
     ORDER BY w.account_id, w.period_start;
END
$$;
COMMENT ON FUNCTION billing._finalize(timestamptz) IS 'Internal: the body of finalize_invoices';

/*
 * _finalize_citus: the body of finalize_invoices on Citus, for the periods
 * ended by cutoff.  The single-node body writes every invoice in one
 * statement that rates periods inside a query over distributed tables,
 * which Citus refuses.  Here: each subscription's due periods in order
 * (under the account's row lock), each rated by a query over functions
 * only, then written with one statement per table.  The account's pending
 * adjustments go on its earliest new invoice, as on one node.
 */
CREATE OR REPLACE FUNCTION billing._finalize_citus(cutoff timestamptz)
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
 * The per-account functions and the argument that names the account.  A
 * call whose account argument is a constant, outside an explicit
 * transaction block, is run on the node holding that account.
 */
CREATE OR REPLACE FUNCTION billing._distributed_functions()
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


REVOKE ALL ON FUNCTION
    billing._rollup_totals(bigint[], timestamptz[], timestamptz[], text[], text[], integer[], text[], text[]),
    billing._usage_totals_many(bigint[], timestamptz[], timestamptz[], integer[], text[], text[]),
    billing._usage_totals_citus(bigint, timestamptz, timestamptz, text[], text[]),
    billing._rate_periods(bigint[], text[], text[], numeric[], timestamptz[], timestamptz[]),
    billing._rate_period(bigint, text, text, numeric, timestamptz, timestamptz),
    billing._invoice_preview(bigint, timestamptz),
    billing.invoice_preview(bigint, timestamptz),
    billing.remaining(bigint, text, timestamptz, text),
    billing._rerate_diff(timestamptz, timestamptz, bigint),
    billing._rerate(timestamptz, timestamptz, bigint, boolean, text),
    billing.rerate(timestamptz, timestamptz, bigint, boolean, text)
    FROM PUBLIC;
ALTER FUNCTION billing.rerate(timestamptz, timestamptz, bigint, boolean, text) SECURITY DEFINER;
GRANT EXECUTE ON FUNCTION
    billing._rollup_totals(bigint[], timestamptz[], timestamptz[], text[], text[], integer[], text[], text[]),
    billing._usage_totals_many(bigint[], timestamptz[], timestamptz[], integer[], text[], text[]),
    billing._usage_totals_citus(bigint, timestamptz, timestamptz, text[], text[]),
    billing._rate_periods(bigint[], text[], text[], numeric[], timestamptz[], timestamptz[]),
    billing._rate_period(bigint, text, text, numeric, timestamptz, timestamptz),
    billing._invoice_preview(bigint, timestamptz),
    billing.invoice_preview(bigint, timestamptz),
    billing.remaining(bigint, text, timestamptz, text),
    billing._rerate_diff(timestamptz, timestamptz, bigint),
    billing._rerate(timestamptz, timestamptz, bigint, boolean, text)
    TO billing_reader;
GRANT EXECUTE ON FUNCTION billing.rerate(timestamptz, timestamptz, bigint, boolean, text) TO billing_admin;

-- ---- issue 18, part 3: unique meters (aggregation 'unique', 45_unique.sql) ---------------
-- A unique meter's quantity is the number of distinct dimension values
-- reported in the period.  Its cells are counted as a count meter's; the
-- update adds the aggregation, the per-period tables compaction keeps
-- (unique_periods, unique_values: empty, 1.0 has no unique meter), their
-- functions, and the step compact_usage() runs for them.  usage() counts
-- the distinct values per bucket, reconcile() compares a unique meter's
-- reports as a count meter's, and on Citus the compaction folds unique
-- cells too.
SELECT billing._update_ddl('billing.meters', ARRAY[
    $ddl$ALTER TABLE billing.meters DROP CONSTRAINT meters_aggregation_check$ddl$,
    $ddl$ALTER TABLE billing.meters ADD CONSTRAINT meters_aggregation_check
        CHECK (aggregation IN ('sum', 'count', 'max', 'last', 'unique'))$ddl$
]);

CREATE TABLE billing.unique_periods (
    account_id      bigint NOT NULL,
    meter           text COLLATE "C" NOT NULL,
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    distinct_count  bigint NOT NULL,
    PRIMARY KEY (account_id, meter, period_start)
);
COMMENT ON TABLE billing.unique_periods IS
    'Unique meters: per account, meter and billing period, the number of distinct dimension values compaction has seen in [period_start, period_end) (kept by compact_usage)';

CREATE TABLE billing.unique_values (
    account_id      bigint NOT NULL,
    meter           text COLLATE "C" NOT NULL,
    period_start    timestamptz NOT NULL,
    dimension       text COLLATE "C" NOT NULL,
    first_bucket    timestamptz NOT NULL,
    PRIMARY KEY (account_id, meter, period_start, dimension)
);
COMMENT ON TABLE billing.unique_values IS
    'Unique meters: the distinct dimension values of each unique_periods row, with the first bucket of the period in which each was reported';

SELECT pg_catalog.pg_extension_config_dump('billing.unique_periods', '');
SELECT pg_catalog.pg_extension_config_dump('billing.unique_values', '');

/*
 * _unique_periods_of: the billing periods of an account's subscriptions
 * that overlap [p_lo, p_hi], on each subscription's grid (from its
 * period_anchor, issue 17), cut at the subscription's start and not at its
 * end: a plan segment that starts a period's second plan (change_plan) has
 * a row of its own, the first plan's segment is a prefix of the period's
 * row, and so is a period cut short.
 */
CREATE FUNCTION billing._unique_periods_of(p_account bigint, p_lo timestamptz, p_hi timestamptz)
    RETURNS TABLE (period_start timestamptz, period_end timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    -- PL/pgSQL: Citus routes the query by p_account's value
    RETURN QUERY
    SELECT DISTINCT greatest(billing._add_periods(g.anchor, p.period, n), s.starts_at),
           billing._add_periods(g.anchor, p.period, n + 1)
      FROM billing.subscriptions s JOIN billing.plans p ON p.plan = s.plan,
           LATERAL (SELECT coalesce(s.period_anchor, s.starts_at) AS anchor) g,
           generate_series(billing._period_index(g.anchor, p.period, greatest(p_lo, s.starts_at)),
                           billing._period_index(g.anchor, p.period,
                               least(p_hi, coalesce(s.ends_at, 'infinity') - interval '1 microsecond'))) n
     WHERE s.account_id = p_account AND s.starts_at <= p_hi
       AND coalesce(s.ends_at, 'infinity') > p_lo;
END
$$;
COMMENT ON FUNCTION billing._unique_periods_of(bigint, timestamptz, timestamptz) IS
    'Internal: the whole billing periods of an account''s subscriptions overlapping [lo, hi]';

/*
 * _unique_fold: keep unique_periods and unique_values for cells of unique
 * meters of one account that compaction has just folded (element i of the
 * arrays is a cell: meter, dimension, bucket start).  See the top of the
 * file.
 */
CREATE FUNCTION billing._unique_fold(p_account bigint, p_meters text[], p_dims text[],
                                     p_buckets timestamptz[])
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    lo timestamptz;
    hi timestamptz;
    per record;
    cd text[];
    cfb timestamptz[];
    n bigint;
BEGIN
    SELECT min(b), max(b) INTO lo, hi FROM unnest(p_buckets) b;
    IF lo IS NULL THEN
        RETURN;
    END IF;
    -- 1. the rows the cells fall in: new values counted, earlier first buckets kept
    FOR per IN
        SELECT p.meter, p.period_start, p.period_end
          FROM billing.unique_periods p
         WHERE p.account_id = p_account AND p.meter = ANY (p_meters)
           AND p.period_start <= hi AND p.period_end > lo
    LOOP
        SELECT array_agg(y.d), array_agg(y.fb) INTO cd, cfb
          FROM (SELECT x.d, min(x.b) AS fb
                  FROM unnest(p_meters, p_dims, p_buckets) AS x(m, d, b)
                 WHERE x.m = per.meter AND x.b >= per.period_start AND x.b < per.period_end
                 GROUP BY x.d) y;
        CONTINUE WHEN cd IS NULL;
        WITH added AS (
            INSERT INTO billing.unique_values (account_id, meter, period_start, dimension, first_bucket)
            SELECT p_account, per.meter, per.period_start, u.d, u.fb FROM unnest(cd, cfb) AS u(d, fb)
            ON CONFLICT DO NOTHING
            RETURNING 1
        )
        SELECT count(*) INTO n FROM added;
        UPDATE billing.unique_values v SET first_bucket = u.fb
          FROM unnest(cd, cfb) AS u(d, fb)
         WHERE v.account_id = p_account AND v.meter = per.meter
           AND v.period_start = per.period_start AND v.dimension = u.d AND u.fb < v.first_bucket;
        IF n > 0 THEN
            UPDATE billing.unique_periods p SET distinct_count = p.distinct_count + n
             WHERE p.account_id = p_account AND p.meter = per.meter
               AND p.period_start = per.period_start;
        END IF;
    END LOOP;

    -- 2. a row for each billing period holding cells that has none (or one
    -- ending earlier), from every cell of the period counted so far
    FOR per IN
        SELECT m.meter, w.period_start, w.period_end
          FROM (SELECT DISTINCT x.m AS meter FROM unnest(p_meters) AS x(m)) m,
               billing._unique_periods_of(p_account, lo, hi) w
         WHERE EXISTS (SELECT 1 FROM unnest(p_meters, p_buckets) AS x(m, b)
                        WHERE x.m = m.meter AND x.b >= w.period_start AND x.b < w.period_end)
    LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM billing.unique_periods p
                               WHERE p.account_id = p_account AND p.meter = per.meter
                                 AND p.period_start = per.period_start
                                 AND p.period_end >= per.period_end);
        DELETE FROM billing.unique_values v
         WHERE v.account_id = p_account AND v.meter = per.meter AND v.period_start = per.period_start;
        DELETE FROM billing.unique_periods p
         WHERE p.account_id = p_account AND p.meter = per.meter AND p.period_start = per.period_start;
        INSERT INTO billing.unique_values (account_id, meter, period_start, dimension, first_bucket)
        SELECT p_account, per.meter, per.period_start, c.dimension, min(c.bucket_start)
          FROM billing.usage_cells c
         WHERE c.account_id = p_account AND c.meter = per.meter
           AND c.bucket_start >= per.period_start AND c.bucket_start < per.period_end
         GROUP BY c.dimension;
        GET DIAGNOSTICS n = ROW_COUNT;
        INSERT INTO billing.unique_periods (account_id, meter, period_start, period_end, distinct_count)
        VALUES (p_account, per.meter, per.period_start, per.period_end, n);
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._unique_fold(bigint, text[], text[], timestamptz[]) IS
    'Internal: keeps unique_periods and unique_values for cells of unique meters of one account just compacted';

/*
 * _unique_compact: the step of compact_usage() for unique meters: calls
 * _unique_fold for each account with unique cells among the cells being
 * compacted (pg_temp.billing_compact_cells).
 */
CREATE FUNCTION billing._unique_compact() RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    acc record;
BEGIN
    FOR acc IN
        SELECT c.account_id, array_agg(c.meter::text) AS meters, array_agg(c.dimension::text) AS dims,
               array_agg(c.bucket_start) AS buckets
          FROM pg_temp.billing_compact_cells c
         WHERE c.aggregation = 'unique'
         GROUP BY c.account_id
         ORDER BY c.account_id
    LOOP
        PERFORM billing._unique_fold(acc.account_id, acc.meters, acc.dims, acc.buckets);
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._unique_compact() IS
    'Internal: the unique-meter step of compact_usage (keeps unique_periods and unique_values)';

/*
 * _unique_scan: the distinct dimension values of a meter with a counted
 * cell in [p_from, p_to), read through billing.usage_cells (every cell,
 * compacted or not), so that it does not depend on how the cell store
 * keeps them.  Only ranges that no unique_periods row answers come here.
 */
CREATE FUNCTION billing._unique_scan(p_account bigint, p_meter text, p_from timestamptz,
                                     p_to timestamptz)
    RETURNS SETOF text
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    -- PL/pgSQL: Citus routes the query by p_account's value
    RETURN QUERY
    SELECT DISTINCT c.dimension::text FROM billing.usage_cells c
     WHERE c.account_id = p_account AND c.meter = p_meter
       AND c.bucket_start >= p_from AND c.bucket_start < p_to;
END
$$;
COMMENT ON FUNCTION billing._unique_scan(bigint, text, timestamptz, timestamptz) IS
    'Internal: the distinct dimension values of a meter with a counted cell in [from, to) (through usage_cells)';

/*
 * _unique_counts: for each unique meter of p_meters, the number of distinct
 * dimension values reported in [p_from, p_to) by one account, as rows
 * (meter, dimension, quantity): one row with quantity 1 for each dimension
 * s_dims[j] named for meter s_meters[j] (a matrix charge) that was
 * reported, and one with dimension NULL counting the other values.  See the
 * top of the file.
 */
CREATE FUNCTION billing._unique_counts(p_account bigint, p_from timestamptz, p_to timestamptz,
                                       p_meters text[], s_meters text[] DEFAULT '{}',
                                       s_dims text[] DEFAULT '{}')
    RETURNS TABLE (meter text, dimension text, quantity numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
#variable_conflict use_column
DECLARE
    mtr text;
    reg record;
    total bigint;
    delta_dims text[];
    seen text[];
    named text[];
    present text[];
BEGIN
    IF p_from >= p_to THEN
        RETURN;
    END IF;
    FOREACH mtr IN ARRAY p_meters LOOP
        named := ARRAY(SELECT DISTINCT x.d FROM unnest(s_meters, s_dims) AS x(m, d)
                        WHERE x.m = mtr AND x.d IS NOT NULL);
        SELECT p.period_end, p.distinct_count INTO reg
          FROM billing.unique_periods p
         WHERE p.account_id = p_account AND p.meter = mtr AND p.period_start = p_from
           AND p.period_end >= p_to;
        IF FOUND THEN
            -- the values compaction has seen, and those only in the deltas
            IF reg.period_end = p_to THEN
                total := reg.distinct_count;
            ELSE
                SELECT count(*) INTO total FROM billing.unique_values v
                 WHERE v.account_id = p_account AND v.meter = mtr AND v.period_start = p_from
                   AND v.first_bucket < p_to;
            END IF;
            delta_dims := ARRAY(SELECT DISTINCT x.dimension::text
                                  FROM billing.usage_deltas d, billing._delta_cells(d.cells) x
                                 WHERE d.account_id = p_account AND x.meter = mtr
                                   AND x.bucket_start >= p_from AND x.bucket_start < p_to);
            IF cardinality(delta_dims) > 0 THEN
                total := total + (SELECT count(*) FROM unnest(delta_dims) AS x(d)
                                   WHERE NOT EXISTS (SELECT 1 FROM billing.unique_values v
                                                      WHERE v.account_id = p_account AND v.meter = mtr
                                                        AND v.period_start = p_from
                                                        AND v.dimension = x.d
                                                        AND v.first_bucket < p_to));
            END IF;
            present := ARRAY(SELECT x.d FROM unnest(named) AS x(d)
                              WHERE x.d = ANY (delta_dims)
                                 OR EXISTS (SELECT 1 FROM billing.unique_values v
                                             WHERE v.account_id = p_account AND v.meter = mtr
                                               AND v.period_start = p_from AND v.dimension = x.d
                                               AND v.first_bucket < p_to));
        ELSE
            -- no row for this period: the cells themselves
            seen := ARRAY(SELECT s FROM billing._unique_scan(p_account, mtr, p_from, p_to) s);
            total := cardinality(seen);
            present := ARRAY(SELECT x.d FROM unnest(named) AS x(d) WHERE x.d = ANY (seen));
        END IF;
        CONTINUE WHEN total = 0;
        RETURN QUERY
        SELECT mtr, x.d, 1::numeric FROM unnest(present) AS x(d)
        UNION ALL
        SELECT mtr, NULL::text, (total - cardinality(present))::numeric
         WHERE total > cardinality(present);
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._unique_counts(bigint, timestamptz, timestamptz, text[], text[], text[]) IS
    'Internal: distinct dimension values of unique meters reported in [from, to) by one account (named dimensions apart)';

/*
 * _usage_totals_unique: the part of _usage_totals_many for unique meters
 * (same arguments, same rows): for each period (account, [start, end)),
 * _unique_counts of the unique meters its charges rate (c_idx, c_meters,
 * c_dims as for _usage_totals_many; every unique meter when c_idx is NULL).
 */
CREATE FUNCTION billing._usage_totals_unique(p_accounts bigint[], p_starts timestamptz[],
                                             p_ends timestamptz[], c_idx integer[],
                                             c_meters text[], c_dims text[])
    RETURNS TABLE (idx integer, meter text, quantity numeric, dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    uniq text[];
    ms text[];
    sm text[] := '{}';
    sd text[] := '{}';
BEGIN
    -- the unique meters, read first (a reference table on Citus)
    uniq := ARRAY(SELECT m.meter::text FROM billing.meters m WHERE m.aggregation = 'unique');
    IF cardinality(uniq) = 0 OR (c_idx IS NOT NULL AND NOT c_meters && uniq) THEN
        RETURN;                   -- no unique meter (charged)
    END IF;
    IF cardinality(p_accounts) = 1 THEN
        -- one period (a preview, remaining): its charges as they are, without
        -- the statement below, whose planning costs more than its work here
        IF c_idx IS NULL THEN
            ms := uniq;
        ELSE
            SELECT coalesce(array_agg(DISTINCT x.m), '{}'),
                   coalesce(array_agg(x.m ORDER BY x.m, x.d) FILTER (WHERE x.d IS NOT NULL), '{}'),
                   coalesce(array_agg(x.d ORDER BY x.m, x.d) FILTER (WHERE x.d IS NOT NULL), '{}')
              INTO ms, sm, sd
              FROM unnest(c_meters, c_dims) AS x(m, d)
             WHERE x.m = ANY (uniq);
        END IF;
        RETURN QUERY
        SELECT 1, u.meter, u.quantity, u.dimension
          FROM billing._unique_counts(p_accounts[1], p_starts[1], p_ends[1], ms, sm, sd) u;
        RETURN;
    END IF;
    RETURN QUERY
    WITH per AS (
        SELECT x.i::integer AS idx, x.a AS account_id, x.s AS ps, x.e AS pe
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i)
    ), charged AS (
        SELECT c.i AS idx, c.m AS meter, c.d AS dim
          FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
         WHERE c.m = ANY (uniq)
    ), req AS (
        SELECT per.*,
               CASE WHEN c_idx IS NULL THEN uniq
                    ELSE ARRAY(SELECT DISTINCT c.meter FROM charged c WHERE c.idx = per.idx) END AS meters,
               ARRAY(SELECT c.meter FROM charged c WHERE c.idx = per.idx AND c.dim IS NOT NULL
                      ORDER BY c.meter, c.dim) AS s_meters,
               ARRAY(SELECT c.dim FROM charged c WHERE c.idx = per.idx AND c.dim IS NOT NULL
                      ORDER BY c.meter, c.dim) AS s_dims
          FROM per
    )
    SELECT r.idx, u.meter, u.quantity, u.dimension
      FROM req r,
           LATERAL billing._unique_counts(r.account_id, r.ps, r.pe, r.meters, r.s_meters, r.s_dims) u
     WHERE cardinality(r.meters) > 0;
END
$$;
COMMENT ON FUNCTION billing._usage_totals_unique(bigint[], timestamptz[], timestamptz[], integer[], text[], text[]) IS
    'Internal: the unique-meter part of _usage_totals_many (distinct dimension values per period)';


CREATE OR REPLACE FUNCTION billing.compact_usage() RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off
    SET client_min_messages = warning AS $$
DECLARE
    n bigint;
BEGIN
    -- one compaction at a time; concurrent ingest goes on (it only appends)
    PERFORM pg_advisory_xact_lock(1651074162, 1);
    IF to_regclass('pg_temp.billing_compact_cells') IS NOT NULL THEN  -- never a caller's table
        DROP TABLE pg_temp.billing_compact_cells;                     -- (SECURITY DEFINER)
    END IF;
    CREATE TEMP TABLE IF NOT EXISTS billing_compact_cells (
        account_id bigint, meter text COLLATE "C", dimension text COLLATE "C",
        bucket_start timestamptz, quantity numeric, events bigint,
        last_ts timestamptz, last_seq bigint, aggregation text, nrows bigint
    ) ON COMMIT DELETE ROWS;

    -- 1. take the deltas out, one cell per key, folded by the one rule
    WITH moved AS (
        DELETE FROM billing.usage_deltas RETURNING *
    )
    INSERT INTO billing_compact_cells
    SELECT d.account_id, c.meter, c.dimension, c.bucket_start,
           billing._cell_agg(m.aggregation, c.quantity, c.last_ts,
                             CASE WHEN c.last_ts IS NOT NULL THEN d.seq END),
           sum(c.events)::bigint,
           billing._cell_last_ts(m.aggregation, c.quantity, c.last_ts,
                                 CASE WHEN c.last_ts IS NOT NULL THEN d.seq END),
           billing._cell_last_seq(m.aggregation, c.quantity, c.last_ts,
                                  CASE WHEN c.last_ts IS NOT NULL THEN d.seq END),
           m.aggregation, count(*)
      FROM moved d
           CROSS JOIN LATERAL billing._delta_cells(d.cells) c
           JOIN billing.meters m ON m.meter = c.meter
     GROUP BY d.account_id, c.meter, c.dimension, c.bucket_start, m.aggregation;
    SELECT coalesce(sum(nrows), 0) INTO n FROM billing_compact_cells;
    IF n = 0 THEN
        RETURN 0;
    END IF;

    -- 2. fold them into the buckets and the hour and day roll-ups
    PERFORM billing._compact_into('usage_buckets', NULL);
    PERFORM billing._compact_into('usage_hourly', '1 hour');
    PERFORM billing._compact_into('usage_daily', '1 day');
    -- 3. the distinct values of unique meters per billing period (45_unique.sql)
    PERFORM billing._unique_compact();
    TRUNCATE billing_compact_cells;
    RETURN n;
END
$$;


-- PL/pgSQL: its plans get the argument values, which Citus needs to route
-- the query to the account's shards (it cannot plan an SQL function's query)
CREATE OR REPLACE FUNCTION billing._usage(p_account bigint, p_from timestamptz, p_to timestamptz,
                               p_grain interval, p_meter text)
    RETURNS TABLE (r_meter text, r_dimension text, r_bucket_start timestamptz,
                   r_quantity numeric, r_events bigint)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN QUERY
    WITH cells AS (
        SELECT u.meter, u.dimension, u.bucket_start, u.quantity, u.events, u.last_ts, u.last_seq
          FROM billing.usage_cells u
         WHERE u.account_id = p_account AND u.bucket_start >= p_from AND u.bucket_start < p_to
           AND (p_meter IS NULL OR u.meter = p_meter)
    )
    -- a unique meter: one row per bucket (dimension NULL), its quantity the
    -- number of distinct dimension values reported in the bucket
    SELECT c.meter::text,
           CASE WHEN m.aggregation <> 'unique' THEN c.dimension::text END,
           CASE WHEN p_grain IS NULL THEN c.bucket_start ELSE billing._bin(p_grain, c.bucket_start) END,
           CASE WHEN m.aggregation = 'unique' THEN count(DISTINCT c.dimension)
                ELSE billing._cell_agg(m.aggregation, c.quantity, c.last_ts, c.last_seq) END,
           sum(c.events)::bigint
      FROM cells c JOIN billing.meters m ON m.meter = c.meter
     GROUP BY c.meter, 2, 3, m.aggregation
     ORDER BY c.meter, 2, 3;
END
$$;
COMMENT ON FUNCTION billing._usage(bigint, timestamptz, timestamptz, interval, text) IS
    'Internal: the body of billing.usage';

CREATE OR REPLACE FUNCTION billing.usage(account_id bigint, from_ts timestamptz, to_ts timestamptz,
                              grain interval DEFAULT NULL, meter text DEFAULT NULL)
    RETURNS TABLE (meter text, dimension text, bucket_start timestamptz,
                   quantity numeric, events bigint)
    LANGUAGE sql STABLE SET search_path = pg_catalog, billing, pg_temp AS $$
    -- the arguments are checked by a statement of its own: always, whatever the plan
    SELECT billing._usage_args_ok($1, $2, $3, $4);
    SELECT * FROM billing._usage($1, $2, $3, $4, $5)
$$;
COMMENT ON FUNCTION billing.usage(bigint, timestamptz, timestamptz, interval, text) IS
    'Usage of an account: stored buckets (grain NULL) or UTC-aligned roll-ups; max/last meters roll up by max/latest, unique meters count the distinct dimensions of each bucket';

/*
 * _usage_totals_many: the quantity of each meter of each (account,
 * [from, to)) given, combined by the meter's aggregation.  Reads day roll-ups for whole
 * UTC days, hour roll-ups for whole hours, buckets for the minutes at the
 * edges, and the deltas not yet compacted, so a month costs a few hundred
 * rows, not tens of thousands of minute buckets.
 *
 * Matrix charges (issue 18): c_idx, c_meters and c_dims list the usage
 * charges rated in each period (element j: period c_idx[j] rates meter
 * c_meters[j], dimension c_dims[j] alone, or with c_dims[j] NULL the
 * dimensions no other charge of the period names).  A dimension named for
 * a period and meter gets a row of its own; dimension NULL is the rest of
 * the meter (all of it when none is named).
 *
 * Unique meters (45_unique.sql): the distinct dimension values of the
 * period, from billing._unique_counts, for the unique meters charged in
 * the period (every unique meter when c_idx is NULL).
 */
CREATE OR REPLACE FUNCTION billing._usage_totals_many(p_accounts bigint[], p_starts timestamptz[],
                                           p_ends timestamptz[], c_idx integer[] DEFAULT NULL,
                                           c_meters text[] DEFAULT NULL, c_dims text[] DEFAULT NULL)
    RETURNS TABLE (idx integer, meter text, quantity numeric, dimension text)
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
BEGIN
    -- on Citus: one router query per account (see 90_distribute.sql)
    IF billing._citus_table_kind('billing.usage_deltas') IS NOT NULL THEN
        RETURN QUERY
        SELECT x.i::integer, t.meter, t.quantity, t.dimension
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i),
               LATERAL billing._usage_totals_citus(
                   x.a, x.s, x.e,
                   ARRAY(SELECT c.m FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
                          WHERE c.i = x.i AND c.d IS NOT NULL ORDER BY c.m, c.d),
                   ARRAY(SELECT c.d FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
                          WHERE c.i = x.i AND c.d IS NOT NULL ORDER BY c.m, c.d)) t
        UNION ALL
        SELECT u.idx, u.meter, u.quantity, u.dimension
          FROM billing._usage_totals_unique(p_accounts, p_starts, p_ends, c_idx, c_meters, c_dims) u;
        RETURN;
    END IF;
    -- the roll-ups and buckets covering each period, each meter aggregated
    -- in C (billing._rollup_totals), plus the deltas not yet compacted,
    -- folded by the same rule (billing._cell_agg, src/agg.c)
    RETURN QUERY
    WITH ms AS (
        SELECT coalesce(array_agg(m.meter::text ORDER BY m.meter), '{}') AS meters,
               coalesce(array_agg(m.aggregation::text ORDER BY m.meter), '{}') AS aggs
          FROM billing.meters m
         WHERE m.aggregation <> 'unique'
    ), named AS (
        -- the dimensions charged apart, per period and meter
        SELECT DISTINCT c.i AS idx, c.m COLLATE "C" AS meter, c.d COLLATE "C" AS dim
          FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
         WHERE c.i IS NOT NULL AND c.m IS NOT NULL AND c.d IS NOT NULL
    ), na AS (
        SELECT coalesce(array_agg(n.idx), '{}') AS i, coalesce(array_agg(n.meter::text), '{}') AS m,
               coalesce(array_agg(n.dim::text), '{}') AS d
          FROM named n
    ), per AS (
        SELECT x.i::integer AS idx, x.a AS account_id, x.s AS ps, x.e AS pe
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i)
    ), folded AS (
        SELECT r.idx, r.meter COLLATE "C" AS meter, r.dimension COLLATE "C" AS dim, r.quantity,
               r.last_ts, r.last_seq
          FROM ms, na,
               billing._rollup_totals(p_accounts, p_starts, p_ends, ms.meters, ms.aggs,
                                      na.i, na.m, na.d) r
        UNION ALL
        -- not yet compacted
        SELECT per.idx, x.meter, n.dim, x.quantity, x.last_ts,
               CASE WHEN x.last_ts IS NOT NULL THEN d.seq END
          FROM per JOIN billing.usage_deltas d ON d.account_id = per.account_id
               CROSS JOIN LATERAL billing._delta_cells(d.cells) x
               LEFT JOIN named n ON n.idx = per.idx AND n.meter = x.meter AND n.dim = x.dimension
         WHERE x.bucket_start >= per.ps AND x.bucket_start < per.pe
    )
    SELECT f.idx, f.meter::text,
           billing._cell_agg(m.aggregation, f.quantity, f.last_ts, f.last_seq),
           f.dim::text
      FROM folded f JOIN billing.meters m ON m.meter = f.meter AND m.aggregation <> 'unique'
     GROUP BY f.idx, f.meter, f.dim, m.aggregation
    UNION ALL
    SELECT u.idx, u.meter, u.quantity, u.dimension
      FROM billing._usage_totals_unique(p_accounts, p_starts, p_ends, c_idx, c_meters, c_dims) u;
END
$$;
COMMENT ON FUNCTION billing._usage_totals_many(bigint[], timestamptz[], timestamptz[], integer[], text[], text[]) IS
    'Internal: quantity per meter (and per dimension charged apart) of many (account, range) pairs, from roll-ups where whole hours and days allow';

/*
 * _usage_totals_citus: the quantity per meter of one account over [from_ts,
 * to_ts) on Citus, from the minute buckets at the edges, hour and day
 * roll-ups, and the deltas: one router query to the account's shards (the
 * set-based _usage_totals_many joins many accounts with arrays, which Citus
 * cannot plan).  _usage_totals_many calls it once per account.  The
 * dimensions s_dims[j] of meters s_meters[j] are totalled apart (matrix
 * charges, issue 18), the rest of a meter has dimension NULL.
 */
CREATE OR REPLACE FUNCTION billing._usage_totals_citus(p_account bigint, from_ts timestamptz, to_ts timestamptz,
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

CREATE OR REPLACE FUNCTION billing.reconcile(source regclass, account_column name, meter_column name,
                                  quantity_column name, ts_column name,
                                  from_ts timestamptz, to_ts timestamptz)
    RETURNS TABLE (account_id bigint, meter text, bucket_start timestamptz,
                   source_quantity numeric, counted_quantity numeric, difference numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    col name;
BEGIN
    IF source IS NULL OR account_column IS NULL OR meter_column IS NULL OR quantity_column IS NULL
       OR ts_column IS NULL OR from_ts IS NULL OR to_ts IS NULL THEN
        RAISE EXCEPTION 'reconcile: no argument may be null' USING ERRCODE = '22004';
    END IF;
    FOREACH col IN ARRAY ARRAY[account_column, meter_column, quantity_column, ts_column] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = source AND a.attname = col
                          AND a.attnum > 0 AND NOT a.attisdropped) THEN
            RAISE EXCEPTION 'column "%" of relation "%" does not exist', col, source
                USING ERRCODE = '42703';
        END IF;
    END LOOP;
    -- a source row for a meter that does not exist cannot be compared: say so
    EXECUTE format($q$
        SELECT s.%1$I::text FROM %2$s s
         WHERE s.%3$I >= $1 AND s.%3$I < $2
           AND NOT EXISTS (SELECT 1 FROM billing.meters m WHERE m.meter = s.%1$I::text)
         LIMIT 1 $q$, meter_column, source, ts_column)
       INTO col USING from_ts, to_ts;
    IF col IS NOT NULL THEN
        RAISE EXCEPTION 'source "%" has usage of meter "%", which does not exist', source, col
            USING ERRCODE = '23503';
    END IF;
    -- both sides per (account, meter, bucket), combined by the meter's aggregation
    RETURN QUERY EXECUTE format($q$
        WITH src AS (
            -- a source row is one report: count and unique count it, the others fold
            -- its value by the cells' rule (src/agg.c); rows have no arrival
            -- order, so of two last values with the same timestamp the
            -- greater is taken
            SELECT s.%1$I::bigint AS account_id, s.%2$I::text AS meter,
                   billing._bin(m.bucket_width, s.%4$I) AS bucket_start,
                   billing._cell_agg(m.aggregation,
                                     -- a unique meter's cells count reports, as count's
                                     CASE WHEN m.aggregation IN ('count', 'unique') THEN 1::numeric
                                          ELSE s.%3$I::numeric END,
                                     CASE WHEN m.aggregation = 'last' THEN s.%4$I END,
                                     NULL::bigint) AS quantity
              FROM %5$s s JOIN billing.meters m ON m.meter = s.%2$I::text
             WHERE s.%4$I >= $1 AND s.%4$I < $2
             GROUP BY 1, 2, 3, m.aggregation
        ), counted AS (
            SELECT u.account_id, u.meter::text AS meter, u.bucket_start,
                   billing._cell_agg(m.aggregation, u.quantity, u.last_ts, u.last_seq) AS quantity
              FROM billing.usage_cells u JOIN billing.meters m ON m.meter = u.meter
             WHERE u.bucket_start >= $1 AND u.bucket_start < $2
             GROUP BY 1, 2, 3, m.aggregation
        )
        SELECT coalesce(s.account_id, c.account_id), coalesce(s.meter, c.meter),
               coalesce(s.bucket_start, c.bucket_start),
               coalesce(s.quantity, 0), coalesce(c.quantity, 0),
               coalesce(s.quantity, 0) - coalesce(c.quantity, 0)
          FROM src s FULL JOIN counted c
            ON c.account_id = s.account_id AND c.meter = s.meter AND c.bucket_start = s.bucket_start
         WHERE coalesce(s.quantity, 0) <> coalesce(c.quantity, 0)
         ORDER BY 1, 2, 3
        $q$, account_column, meter_column, quantity_column, ts_column, source)
    USING from_ts, to_ts;
END
$$;
COMMENT ON FUNCTION billing.reconcile(regclass, name, name, name, name, timestamptz, timestamptz) IS
    'Compares an independent record of usage with the counters bucket by bucket over a range; returns only the buckets that differ';

/*
 * _compact_into_citus: billing._compact_into on Citus, which refuses its
 * UPDATE ... FROM plus INSERT ... WHERE NOT EXISTS over the cells.  The same
 * fold as one upsert per aggregation (Citus takes ON CONFLICT DO UPDATE with
 * immutable functions only, and the aggregation is not a column of the
 * target, so it is a constant of each statement).
 */
CREATE OR REPLACE FUNCTION billing._compact_into_citus(target text, grain interval) RETURNS void
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


ALTER FUNCTION billing.compact_usage() SECURITY DEFINER;
GRANT SELECT ON billing.unique_periods, billing.unique_values TO billing_reader;
REVOKE ALL ON FUNCTION
    billing._unique_periods_of(bigint, timestamptz, timestamptz),
    billing._unique_fold(bigint, text[], text[], timestamptz[]),
    billing._unique_compact(),
    billing._unique_scan(bigint, text, timestamptz, timestamptz),
    billing._unique_counts(bigint, timestamptz, timestamptz, text[], text[], text[]),
    billing._usage_totals_unique(bigint[], timestamptz[], timestamptz[], integer[], text[], text[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    billing._unique_periods_of(bigint, timestamptz, timestamptz),
    billing._unique_fold(bigint, text[], text[], timestamptz[]),
    billing._unique_compact(),
    billing._unique_scan(bigint, text, timestamptz, timestamptz),
    billing._unique_counts(bigint, timestamptz, timestamptz, text[], text[], text[]),
    billing._usage_totals_unique(bigint[], timestamptz[], timestamptz[], integer[], text[], text[])
    TO billing_reader;

-- ---- issue 15, SQL half: one trigger shape on one node and on Citus ----------------------
-- 1.0's billing.distribute() rewrote triggers when it distributed the
-- tables: invoices_audit became a constraint trigger deferred to the
-- commit, and the statement-level audit triggers of adjustments and
-- usage_corrections became row-level ones (billing._audit_insert).  1.1's
-- CREATE EXTENSION installs one shape for both (sql/install/70_audit.sql):
-- invoices_audit deferred (billing._finalize sets it IMMEDIATE for its
-- statement on one node, so its audit rows come by the statement's end as
-- before), the statement-level audit triggers (_audit_insert_rows appends
-- row by row when it fires on a Citus shard), and distribute() changes no
-- trigger.  A 1.0 database, distributed or not, is brought to that shape
-- below; _audit_insert, which no trigger names any more, goes.  The Citus
-- twins share their pieces: one co-location check (_citus_colocated) for
-- distribute(), meter_table and audit_table.  One guard for what is set
-- once: _refuse_change takes the columns an UPDATE may set once, and
-- serves adjustments and credit_grants instead of _adjustments_guard and
-- _credit_grants_guard.  _finalize and _finalize_citus share which rows of
-- _invoice_build are lines and ledger entries (_is_invoice_line,
-- _ledger_kind).  The function bodies are those of the parts named.

-- sql/install/00_helpers.sql
CREATE OR REPLACE FUNCTION billing._refuse_change() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    once text[];
    tbl text := regexp_replace(TG_TABLE_NAME, '_[0-9]+$', '');
BEGIN
    IF TG_OP = 'UPDATE' AND TG_NARGS > 2 THEN
        once := TG_ARGV[2:TG_NARGS - 1];
        IF to_jsonb(OLD) ->> once[1] IS NULL AND to_jsonb(NEW) ->> once[1] IS NOT NULL
           AND (to_jsonb(NEW) - once) = (to_jsonb(OLD) - once) THEN
            RETURN NEW;
        END IF;
    END IF;
    IF TG_NARGS > 1 THEN
        RAISE EXCEPTION '% of % is not allowed', lower(TG_OP), tbl
            USING ERRCODE = '55000', DETAIL = TG_ARGV[0], HINT = TG_ARGV[1];
    END IF;
    RAISE EXCEPTION '% of % is not allowed', lower(TG_OP), tbl
        USING ERRCODE = '55000', DETAIL = TG_ARGV[0];
END
$$;
COMMENT ON FUNCTION billing._refuse_change() IS
    'Internal: refuses UPDATE, DELETE or TRUNCATE of immutable and append-only tables (arguments: detail, hint, columns an UPDATE may set once)';

CREATE FUNCTION billing._citus_colocated(tbl regclass, account_column name) RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF billing._citus_table_kind(tbl) IS DISTINCT FROM 'distributed'
       OR billing._citus_table_kind('billing.accounts') IS DISTINCT FROM 'distributed' THEN
        RETURN false;
    END IF;
    RETURN EXISTS (SELECT 1 FROM pg_dist_partition p, pg_dist_partition a
                    WHERE p.logicalrelid = tbl AND a.logicalrelid = 'billing.accounts'::regclass
                      AND p.colocationid = a.colocationid
                      AND column_to_column_name(p.logicalrelid, p.partkey) = account_column);
END
$$;
COMMENT ON FUNCTION billing._citus_colocated(regclass, name) IS
    'Internal: whether tbl is distributed by account_column, co-located with billing.accounts (false without Citus)';

REVOKE ALL ON FUNCTION billing._citus_colocated(regclass, name) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._citus_colocated(regclass, name) TO billing_reader;

-- sql/install/32_ingest.sql, 75_audit_table.sql
CREATE OR REPLACE FUNCTION billing._meter_table_citus(tbl regclass, account_column name) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    kind text := billing._citus_table_kind(tbl);
BEGIN
    IF kind IS NULL OR billing._citus_table_kind('billing.accounts') IS NULL THEN
        RETURN;
    END IF;
    IF NOT billing._citus_colocated(tbl, account_column) THEN
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

CREATE OR REPLACE FUNCTION billing._audit_table_citus(tbl regclass, account_column name) RETURNS void
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

-- sql/install/70_audit.sql
CREATE OR REPLACE FUNCTION billing._audit_invoice() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
BEGIN
    IF billing._audit_suspended() THEN
        RETURN NULL;
    END IF;
    PERFORM billing._audit_append(
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

CREATE OR REPLACE FUNCTION billing._audit_insert_rows() RETURNS trigger
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

COMMENT ON FUNCTION billing._audit_append_many(bigint[], bigint[], text, text[], jsonb[]) IS
    'Internal: appends many rows to their audit chains in one go (the statement-level audit of adjustments and usage corrections)';

-- sql/install/50_invoices.sql
CREATE FUNCTION billing._is_invoice_line(kind text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT kind OPERATOR(pg_catalog.=) ANY (ARRAY['usage', 'fixed', 'cap', 'true_up', 'commitment',
                                                  'adjustment', 'credit'])
$$;
COMMENT ON FUNCTION billing._is_invoice_line(text) IS
    'Internal: whether a row of _invoice_build of this kind is a line of the invoice';

CREATE FUNCTION billing._ledger_kind(kind text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN kind OPERATOR(pg_catalog.=) 'credit' THEN 'draw'
                WHEN kind OPERATOR(pg_catalog.=) ANY (ARRAY['expire', 'rollover', 'grant']) THEN kind END
$$;
COMMENT ON FUNCTION billing._ledger_kind(text) IS
    'Internal: the credit ledger kind of a row of _invoice_build of this kind (NULL: not booked in the ledger)';

REVOKE ALL ON FUNCTION billing._is_invoice_line(text), billing._ledger_kind(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._is_invoice_line(text), billing._ledger_kind(text) TO billing_reader;

CREATE OR REPLACE FUNCTION billing._finalize(p_as_of timestamptz)
    RETURNS TABLE (r_invoice_id bigint, r_account_id bigint, r_period_start timestamptz,
                   r_period_end timestamptz, r_total numeric)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
DECLARE
    cutoff timestamptz;
BEGIN
    IF p_as_of IS NULL THEN
        RAISE EXCEPTION 'finalize_invoices: as_of must not be null' USING ERRCODE = '22004';
    END IF;
    -- never a period that ends after now() - grace, whatever as_of says
    -- (a future or infinite as_of would finalize periods still open)
    cutoff := LEAST(p_as_of, pg_catalog.now()) - billing._grace_period();
    -- on Citus these statements may not call functions that read the
    -- shards: the same invoices, one period at a time (_finalize_citus)
    IF billing._citus_table_kind('billing.invoices') IS NOT NULL THEN
        RETURN QUERY SELECT * FROM billing._finalize_citus(cutoff);
        RETURN;
    END IF;
    PERFORM 1 FROM billing.accounts a
     WHERE a.account_id IN (SELECT d.account_id FROM billing._due_periods(cutoff) d)
     ORDER BY a.account_id
       FOR NO KEY UPDATE;

    -- the invoices' audit rows (a trigger deferred to the commit, for
    -- Citus: 70_audit.sql) written at the end of the one statement that
    -- writes the invoices and their lines
    SET CONSTRAINTS billing.invoices_audit IMMEDIATE;
    RETURN QUERY
    WITH d AS MATERIALIZED (
        SELECT * FROM billing._due_periods(cutoff)
    ), due AS (
        SELECT p.*, nextval('billing.invoice_id_seq') AS invoice_id,
               (row_number() OVER (ORDER BY p.account_id, p.period_start))::integer AS k,
               row_number() OVER (PARTITION BY p.account_id ORDER BY p.period_start) = 1 AS first_of_account
          FROM (SELECT DISTINCT d.account_id, d.plan, d.currency, d.spend_cap, d.period_start,
                       d.period_end FROM d) p
    ), pa AS (
        SELECT array_agg(due.account_id ORDER BY due.k) AS accounts,
               array_agg(due.currency ORDER BY due.k) AS currencies,
               array_agg(due.spend_cap ORDER BY due.k) AS caps,
               array_agg(due.period_start ORDER BY due.k) AS starts,
               array_agg(due.period_end ORDER BY due.k) AS ends,
               array_agg(due.first_of_account ORDER BY due.k) AS firsts
          FROM due
    ), sa AS (
        SELECT array_agg(due.k ORDER BY due.k, d.segment_start) AS idx,
               array_agg(d.segment_plan ORDER BY due.k, d.segment_start) AS plans,
               array_agg(d.segment_start ORDER BY due.k, d.segment_start) AS starts,
               array_agg(d.segment_end ORDER BY due.k, d.segment_start) AS ends
          FROM d JOIN due ON due.account_id = d.account_id AND due.period_start = d.period_start
    ), built AS MATERIALIZED (
        SELECT due.account_id, due.invoice_id, x.*
          FROM pa, sa,
               LATERAL billing._invoice_build(pa.accounts, pa.currencies, pa.caps, pa.starts, pa.ends,
                                              pa.firsts, sa.idx, sa.plans, sa.starts, sa.ends,
                                              false, true) x
               JOIN due ON due.k = x.idx
    ), new_grants AS MATERIALIZED (
        SELECT b.account_id, b.grant_id AS placeholder,
               nextval('billing.credit_grant_id_seq') AS grant_id, b.amount, b.effective_at,
               b.expires_at, b.source_grant
          FROM built b WHERE b.kind = 'grant'
    ), mapped AS (
        SELECT b.*, coalesce(ng.grant_id, b.grant_id) AS real_grant_id
          FROM built b LEFT JOIN new_grants ng
                 ON ng.account_id = b.account_id AND ng.placeholder = b.grant_id
    ), numbered AS (
        SELECT m.*, (row_number() OVER (PARTITION BY m.invoice_id ORDER BY m.ord))::integer AS line_no
          FROM mapped m
         WHERE billing._is_invoice_line(m.kind)
    ), totals AS (
        SELECT n.invoice_id, sum(n.amount) AS total FROM numbered n GROUP BY n.invoice_id
    ), invoices_written AS (
        INSERT INTO billing.invoices (account_id, invoice_id, plan, period_start, period_end,
                                      currency, total)
        SELECT due.account_id, due.invoice_id, due.plan, due.period_start, due.period_end,
               due.currency, coalesce(t.total, 0)
          FROM due LEFT JOIN totals t ON t.invoice_id = due.invoice_id
        RETURNING billing.invoices.invoice_id, billing.invoices.account_id,
                  billing.invoices.period_start, billing.invoices.period_end,
                  billing.invoices.total
    ), lines_written AS (
        INSERT INTO billing.invoice_lines (account_id, invoice_id, line_no, kind, meter,
                                          description, quantity, amount, unrounded_amount,
                                          charge_id, price, adjustment_id, segment_start,
                                          segment_end, proration, commitment_id, grant_id, dimension)
        SELECT n.account_id, n.invoice_id, n.line_no, n.kind, n.meter, n.description, n.quantity,
               n.amount, n.unrounded_amount, n.charge_id, n.price, n.adjustment_id,
               n.segment_start, n.segment_end, n.proration, n.commitment_id, n.real_grant_id,
               n.dimension
          FROM numbered n
        RETURNING billing.invoice_lines.account_id, billing.invoice_lines.invoice_id,
                  billing.invoice_lines.adjustment_id
    ), grants_written AS (
        INSERT INTO billing.credit_grants (account_id, grant_id, amount, effective_at, expires_at,
                                           priority, applies_to, source, reason, commitment_id,
                                           window_no, rolled_from)
        SELECT ng.account_id, ng.grant_id, ng.amount, ng.effective_at, ng.expires_at, g.priority,
               g.applies_to, 'rollover', format('rollover of grant %s', g.grant_id),
               g.commitment_id, g.window_no + 1, g.grant_id
          FROM new_grants ng
               JOIN billing.credit_grants g
                 ON g.account_id = ng.account_id AND g.grant_id = ng.source_grant
        RETURNING 1
    ), ledger_written AS (
        INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at,
                                           invoice_id)
        SELECT m.account_id,
               h.seq + row_number() OVER (PARTITION BY m.account_id ORDER BY m.idx, m.ord),
               m.real_grant_id, billing._ledger_kind(m.kind), m.amount,
               m.effective_at, CASE WHEN m.kind = 'credit' THEN m.invoice_id END
          FROM mapped m
               CROSS JOIN LATERAL (SELECT coalesce(max(x.seq), 0) AS seq FROM billing.credit_ledger x
                                    WHERE x.account_id = m.account_id) h
         WHERE billing._ledger_kind(m.kind) IS NOT NULL
        RETURNING 1
    ), carried AS (
        UPDATE billing.adjustments adj SET billed_invoice_id = w.invoice_id
          FROM lines_written w
         WHERE w.adjustment_id IS NOT NULL AND adj.account_id = w.account_id
           AND adj.adjustment_id = w.adjustment_id
        RETURNING 1
    )
    SELECT w.invoice_id, w.account_id, w.period_start, w.period_end, w.total
      FROM invoices_written w
     ORDER BY w.account_id, w.period_start;
    SET CONSTRAINTS billing.invoices_audit DEFERRED;
END
$$;
COMMENT ON FUNCTION billing._finalize(timestamptz) IS 'Internal: the body of finalize_invoices';

CREATE OR REPLACE FUNCTION billing._finalize_citus(cutoff timestamptz)
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
             WHERE billing._is_invoice_line(x.kind);
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
             WHERE billing._is_invoice_line(x.kind);
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
                   billing._ledger_kind(x.kind), x.amount, x.effective_at,
                   CASE WHEN x.kind = 'credit' THEN inv END
              FROM unnest(b) x
             WHERE billing._ledger_kind(x.kind) IS NOT NULL;
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

-- sql/install/85_distribute.sql
CREATE OR REPLACE FUNCTION billing.distribute()
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
        ELSIF t.per_account AND NOT billing._citus_colocated(t.rel, 'account_id') THEN
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

-- the triggers, on a single node (1.0's shape) or on a Citus cluster that
-- 1.0's distribute() converted (each node changes its copy of the tables
-- and its shards, whose triggers 1.0's distribute() had changed while the
-- workers' copies kept one node's)
SELECT billing._update_ddl('billing.invoices', ARRAY[
    $ddl$DROP TRIGGER invoices_audit ON billing.invoices$ddl$,
    $ddl$CREATE CONSTRAINT TRIGGER invoices_audit AFTER INSERT ON billing.invoices
        DEFERRABLE INITIALLY DEFERRED
        FOR EACH ROW EXECUTE FUNCTION billing._audit_invoice()$ddl$
]);
SELECT billing._update_ddl('billing.adjustments', ARRAY[
    $ddl$DROP TRIGGER adjustments_audit ON billing.adjustments$ddl$,
    $ddl$CREATE TRIGGER adjustments_audit AFTER INSERT ON billing.adjustments
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_insert_rows('adjust', 'adjustment', 'adjustment_id')$ddl$
]);
SELECT billing._update_ddl('billing.usage_corrections', ARRAY[
    $ddl$DROP TRIGGER usage_corrections_audit ON billing.usage_corrections$ddl$,
    $ddl$CREATE TRIGGER usage_corrections_audit AFTER INSERT ON billing.usage_corrections
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_insert_rows('correct', 'usage_correction', 'correction_id')$ddl$
]);
DROP FUNCTION billing._audit_insert();

-- one guard for what is set once
SELECT billing._update_ddl('billing.adjustments', ARRAY[
    $ddl$DROP TRIGGER adjustments_guard ON billing.adjustments$ddl$,
    $ddl$CREATE TRIGGER adjustments_guard BEFORE UPDATE OR DELETE ON billing.adjustments
        FOR EACH ROW EXECUTE FUNCTION billing._refuse_change(
            'An adjustment never changes, except to record once the invoice that carried it.',
            'Correct an adjustment with a later rerate, which writes a new one.',
            'billed_invoice_id')$ddl$
]);
DROP TRIGGER credit_grants_guard ON billing.credit_grants;
CREATE TRIGGER credit_grants_guard BEFORE UPDATE OR DELETE ON billing.credit_grants
    FOR EACH ROW EXECUTE FUNCTION billing._refuse_change(
        'A credit grant never changes, except to record once that it was voided.',
        'Void it with void_credit, or grant another credit.',
        'voided_at', 'void_reason');
DROP FUNCTION billing._adjustments_guard();
DROP FUNCTION billing._credit_grants_guard();

-- ---- issue 16, packed store: compaction in C into billing.usage_days ---------------------
-- The compacted usage moves from usage_buckets/usage_hourly/usage_daily (one
-- heap row and index entry per cell, per table) into usage_days: one row per
-- (account, meter, UTC day, dimension) with the day's cells packed and its
-- total (src/store.c).  compact_usage() is C (src/compact.c).  The three 1.0
-- tables stay, empty, as landing tables: a 1.0 dump restores its buckets
-- through them into usage_deltas.  The 1.0 buckets move into usage_deltas
-- here and are compacted into usage_days at the end of the section.

CREATE TABLE billing.usage_days (
    account_id    bigint NOT NULL,
    meter         text COLLATE "C" NOT NULL,
    day           timestamptz NOT NULL,   -- UTC day holding the cells' buckets
    dimension     text COLLATE "C" NOT NULL DEFAULT '',
    quantity      numeric NOT NULL,       -- the day's total by the meter's aggregation
    events        bigint NOT NULL,
    last_ts       timestamptz,            -- last meters: timestamp of quantity
    last_seq      bigint,                 -- last meters: arrival order
    cells         bytea NOT NULL,         -- the day's cells, packed: billing._day_cells(day, cells)
    PRIMARY KEY (account_id, meter, day, dimension)
)
-- half of each page free: compaction rewrites a row in place whenever new
-- cells reach its day (the worker every few seconds, a backfill every row
-- of a page), and a new version that fits on its page is heap-only, with
-- no new index entry (a compaction that rewrites every row takes about 30%
-- fewer instructions; storage is about 27 bytes a minute cell, not 16)
WITH (fillfactor = 50);
COMMENT ON TABLE billing.usage_days IS
    'Compacted usage, one row per (account, meter, UTC day, dimension): the day''s cells packed and its total; add usage_deltas to read';
SELECT pg_catalog.pg_extension_config_dump('billing.usage_days', '');
GRANT SELECT ON billing.usage_days TO billing_reader;

CREATE FUNCTION billing._day_cells(day timestamptz, cells bytea)
    RETURNS TABLE (bucket_start timestamptz, quantity numeric, events bigint,
                   last_ts timestamptz, last_seq bigint)
    AS 'MODULE_PATHNAME', 'billing_day_cells'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE ROWS 60;
COMMENT ON FUNCTION billing._day_cells(timestamptz, bytea) IS
    'Internal: the counter cells packed in a row of usage_days (src/store.c; last_ts and last_seq NULL but for last meters)';
REVOKE ALL ON FUNCTION billing._day_cells(timestamptz, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._day_cells(timestamptz, bytea) TO billing_reader;

CREATE OR REPLACE VIEW billing.usage_cells AS
    SELECT s.account_id, s.meter, s.dimension, c.bucket_start, c.quantity, c.events,
           c.last_ts, c.last_seq
      FROM billing.usage_days s, billing._day_cells(s.day, s.cells) c
    UNION ALL
    SELECT d.account_id, c.meter, c.dimension, c.bucket_start,
           c.quantity, c.events, c.last_ts,
           CASE WHEN c.last_ts IS NOT NULL THEN d.seq END
      FROM billing.usage_deltas d, billing._delta_cells(d.cells) c;

CREATE OR REPLACE FUNCTION billing.compact_usage() RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_compact_usage'
    LANGUAGE C
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles its plans for longer than they run
    SET jit = off
    SET client_min_messages = warning;
ALTER FUNCTION billing.compact_usage() SECURITY DEFINER;
COMMENT ON FUNCTION billing.compact_usage() IS
    'Folds appended usage deltas into the bucket counters; returns the number of delta cells merged';

-- 1.0's compaction in SQL, and issue 18's step of it for unique meters
-- (compact_usage() calls billing._unique_fold itself)
DROP FUNCTION billing._compact_into(text, interval);
DROP FUNCTION billing._compact_into_citus(text, interval);
DROP FUNCTION billing._unique_compact();

CREATE FUNCTION billing._cells_in(p_account bigint, p_from timestamptz, p_to timestamptz,
                                  p_meter text)
    RETURNS TABLE (meter text, dimension text, bucket_start timestamptz, quantity numeric,
                   events bigint, last_ts timestamptz, last_seq bigint)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN QUERY
    SELECT s.meter::text, s.dimension::text, c.bucket_start, c.quantity, c.events,
           c.last_ts, c.last_seq
      FROM billing.usage_days s, billing._day_cells(s.day, s.cells) c
     WHERE s.account_id = p_account AND (p_meter IS NULL OR s.meter = p_meter)
       AND s.day > p_from - interval '24 hours' AND s.day < p_to
       AND c.bucket_start >= p_from AND c.bucket_start < p_to
    UNION ALL
    SELECT x.meter::text, x.dimension::text, x.bucket_start, x.quantity, x.events, x.last_ts,
           CASE WHEN x.last_ts IS NOT NULL THEN d.seq END
      FROM billing.usage_deltas d, billing._delta_cells(d.cells) x
     WHERE d.account_id = p_account AND (p_meter IS NULL OR x.meter = p_meter)
       AND x.bucket_start >= p_from AND x.bucket_start < p_to;
END
$$;
COMMENT ON FUNCTION billing._cells_in(bigint, timestamptz, timestamptz, text) IS
    'Internal: the counter cells of an account (and meter) in [from, to), compacted or not, reading only the days of usage_days the range meets';
REVOKE ALL ON FUNCTION billing._cells_in(bigint, timestamptz, timestamptz, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._cells_in(bigint, timestamptz, timestamptz, text) TO billing_reader;

CREATE OR REPLACE FUNCTION billing._meters_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF (TG_OP = 'DELETE' OR NEW.aggregation IS DISTINCT FROM OLD.aggregation
        OR NEW.bucket_width IS DISTINCT FROM OLD.bucket_width
        OR NEW.meter IS DISTINCT FROM OLD.meter)
       AND (billing._exists_here('billing.usage_days', 'x.meter = $1', OLD.meter::text)
            OR billing._exists_here('billing.usage_deltas',
                   'EXISTS (SELECT 1 FROM billing._delta_cells(x.cells) c WHERE c.meter = $1)',
                   OLD.meter::text)) THEN
        RAISE EXCEPTION 'meter "%" has usage', OLD.meter
            USING ERRCODE = '55000',
                  DETAIL = 'Its name, aggregation and bucket width cannot change, nor can it be deleted, once usage was counted.',
                  HINT = 'Create a new meter instead.';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;

CREATE OR REPLACE FUNCTION billing._meters_truncate_guard() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF billing._exists_here('billing.usage_days', 'true', NULL::text)
       OR billing._exists_here('billing.usage_deltas', 'true', NULL::text) THEN
        RAISE EXCEPTION 'meters have usage'
            USING ERRCODE = '55000',
                  DETAIL = 'billing.meters cannot be truncated once usage was counted.';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION billing._usage_totals_many(p_accounts bigint[], p_starts timestamptz[],
                                           p_ends timestamptz[], c_idx integer[] DEFAULT NULL,
                                           c_meters text[] DEFAULT NULL, c_dims text[] DEFAULT NULL)
    RETURNS TABLE (idx integer, meter text, quantity numeric, dimension text)
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
BEGIN
    -- on Citus: one router query per account (see 90_distribute.sql)
    IF billing._citus_table_kind('billing.usage_deltas') IS NOT NULL THEN
        RETURN QUERY
        SELECT x.i::integer, t.meter, t.quantity, t.dimension
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i),
               LATERAL billing._usage_totals_citus(
                   x.a, x.s, x.e,
                   ARRAY(SELECT c.m FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
                          WHERE c.i = x.i AND c.d IS NOT NULL ORDER BY c.m, c.d),
                   ARRAY(SELECT c.d FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
                          WHERE c.i = x.i AND c.d IS NOT NULL ORDER BY c.m, c.d)) t
        UNION ALL
        SELECT u.idx, u.meter, u.quantity, u.dimension
          FROM billing._usage_totals_unique(p_accounts, p_starts, p_ends, c_idx, c_meters, c_dims) u;
        RETURN;
    END IF;
    -- the day totals and edge cells covering each period, each meter aggregated
    -- in C (billing._rollup_totals), plus the deltas not yet compacted,
    -- folded by the same rule (billing._cell_agg, src/agg.c)
    RETURN QUERY
    WITH ms AS (
        SELECT coalesce(array_agg(m.meter::text ORDER BY m.meter), '{}') AS meters,
               coalesce(array_agg(m.aggregation::text ORDER BY m.meter), '{}') AS aggs
          FROM billing.meters m
         WHERE m.aggregation <> 'unique'
    ), named AS (
        -- the dimensions charged apart, per period and meter
        SELECT DISTINCT c.i AS idx, c.m COLLATE "C" AS meter, c.d COLLATE "C" AS dim
          FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
         WHERE c.i IS NOT NULL AND c.m IS NOT NULL AND c.d IS NOT NULL
    ), na AS (
        SELECT coalesce(array_agg(n.idx), '{}') AS i, coalesce(array_agg(n.meter::text), '{}') AS m,
               coalesce(array_agg(n.dim::text), '{}') AS d
          FROM named n
    ), per AS (
        SELECT x.i::integer AS idx, x.a AS account_id, x.s AS ps, x.e AS pe
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i)
    ), folded AS (
        SELECT r.idx, r.meter COLLATE "C" AS meter, r.dimension COLLATE "C" AS dim, r.quantity,
               r.last_ts, r.last_seq
          FROM ms, na,
               billing._rollup_totals(p_accounts, p_starts, p_ends, ms.meters, ms.aggs,
                                      na.i, na.m, na.d) r
        UNION ALL
        -- not yet compacted
        SELECT per.idx, x.meter, n.dim, x.quantity, x.last_ts,
               CASE WHEN x.last_ts IS NOT NULL THEN d.seq END
          FROM per JOIN billing.usage_deltas d ON d.account_id = per.account_id
               CROSS JOIN LATERAL billing._delta_cells(d.cells) x
               LEFT JOIN named n ON n.idx = per.idx AND n.meter = x.meter AND n.dim = x.dimension
         WHERE x.bucket_start >= per.ps AND x.bucket_start < per.pe
    )
    SELECT f.idx, f.meter::text,
           billing._cell_agg(m.aggregation, f.quantity, f.last_ts, f.last_seq),
           f.dim::text
      FROM folded f JOIN billing.meters m ON m.meter = f.meter AND m.aggregation <> 'unique'
     GROUP BY f.idx, f.meter, f.dim, m.aggregation
    UNION ALL
    SELECT u.idx, u.meter, u.quantity, u.dimension
      FROM billing._usage_totals_unique(p_accounts, p_starts, p_ends, c_idx, c_meters, c_dims) u;
END
$$;

CREATE OR REPLACE FUNCTION billing._usage_totals_citus(p_account bigint, from_ts timestamptz, to_ts timestamptz,
                                            s_meters text[] DEFAULT '{}', s_dims text[] DEFAULT '{}')
    RETURNS TABLE (meter text, quantity numeric, dimension text)
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    -- [from_ts, to_ts) = cells of day fd in [from_ts, d0) + days [d0, d1)
    --                  + cells of day d1 in [d1, to_ts), with d0/d1 the
    -- first/last whole UTC day inside and fd the day holding from_ts
    fd timestamptz := billing._bin('1 day', from_ts);
    d0 timestamptz := billing._bin('1 day', from_ts - interval '1 microsecond') + interval '1 day';
    d1 timestamptz := billing._bin('1 day', to_ts);
    -- keys of the dimensions totalled apart: length of the meter, ':', the
    -- meter, the dimension (unambiguous, whatever the names hold)
    named text[] := ARRAY(SELECT format('%s:%s%s', length(x.m), x.m, x.d)
                            FROM unnest(s_meters, s_dims) AS x(m, d));
BEGIN
    -- index ranges per meter: (account_id, meter, day)
    RETURN QUERY
    WITH cells AS (
        SELECT m.meter, c.dimension, c.quantity, c.last_ts, c.last_seq
          FROM billing.meters m   -- (unique meters: _usage_totals_unique)
               CROSS JOIN LATERAL (
                   -- whole days: their totals
                   SELECT u.dimension, u.quantity, u.last_ts, u.last_seq FROM billing.usage_days u
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND u.day >= d0 AND u.day < d1
                   UNION ALL
                   -- the days at the edges: their cells inside [from_ts, to_ts)
                   SELECT u.dimension, x.quantity, x.last_ts, x.last_seq
                     FROM billing.usage_days u, billing._day_cells(u.day, u.cells) x
                    WHERE u.account_id = p_account AND u.meter = m.meter
                      AND ((u.day = fd AND fd < d0) OR (u.day = d1 AND d1 >= d0 AND d1 < to_ts))
                      AND x.bucket_start >= from_ts AND x.bucket_start < to_ts
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

CREATE OR REPLACE FUNCTION billing._usage(p_account bigint, p_from timestamptz, p_to timestamptz,
                               p_grain interval, p_meter text)
    RETURNS TABLE (r_meter text, r_dimension text, r_bucket_start timestamptz,
                   r_quantity numeric, r_events bigint)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN QUERY
    WITH cells AS (
        SELECT u.meter COLLATE "C" AS meter, u.dimension COLLATE "C" AS dimension,
               u.bucket_start, u.quantity, u.events, u.last_ts, u.last_seq
          FROM billing._cells_in(p_account, p_from, p_to, p_meter) u
    )
    -- a unique meter: one row per bucket (dimension NULL), its quantity the
    -- number of distinct dimension values reported in the bucket
    SELECT c.meter::text,
           CASE WHEN m.aggregation <> 'unique' THEN c.dimension::text END,
           CASE WHEN p_grain IS NULL THEN c.bucket_start ELSE billing._bin(p_grain, c.bucket_start) END,
           CASE WHEN m.aggregation = 'unique' THEN count(DISTINCT c.dimension)
                ELSE billing._cell_agg(m.aggregation, c.quantity, c.last_ts, c.last_seq) END,
           sum(c.events)::bigint
      FROM cells c JOIN billing.meters m ON m.meter = c.meter
     GROUP BY c.meter, 2, 3, m.aggregation
     ORDER BY c.meter, 2, 3;
END
$$;

CREATE OR REPLACE FUNCTION billing._unique_scan(p_account bigint, p_meter text, p_from timestamptz,
                                     p_to timestamptz)
    RETURNS SETOF text
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    -- PL/pgSQL: Citus routes the query by p_account's value
    RETURN QUERY
    SELECT DISTINCT c.dimension::text FROM billing._cells_in(p_account, p_from, p_to, p_meter) c;
END
$$;

CREATE OR REPLACE FUNCTION billing.correct_usage(account_id bigint, meter text, bucket_start timestamptz,
                                      delta numeric, reason text, dimension text DEFAULT '')
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    m record;
    cur numeric;
BEGIN
    IF account_id IS NULL OR meter IS NULL OR bucket_start IS NULL OR delta IS NULL THEN
        RAISE EXCEPTION 'correct_usage: account_id, meter, bucket_start and delta must not be null'
            USING ERRCODE = '22004';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'a usage correction needs a reason' USING ERRCODE = '22004';
    END IF;
    dimension := coalesce(dimension, '');
    IF octet_length(dimension) > 256 THEN
        RAISE EXCEPTION 'usage dimension is too long'
            USING ERRCODE = '22023', DETAIL = 'A dimension has at most 256 bytes.';
    END IF;
    SELECT * INTO m FROM billing.meters x WHERE x.meter = correct_usage.meter;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'meter "%" does not exist', correct_usage.meter USING ERRCODE = '23503';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.accounts a WHERE a.account_id = correct_usage.account_id) THEN
        RAISE EXCEPTION 'account % does not exist', correct_usage.account_id USING ERRCODE = '23503';
    END IF;
    IF m.aggregation NOT IN ('sum', 'count') THEN
        RAISE EXCEPTION 'meter "%" has aggregation %', m.meter, m.aggregation
            USING ERRCODE = '22023', DETAIL = 'Only sum and count meters take corrections.';
    END IF;
    IF delta IN ('NaN', 'Infinity', '-Infinity') OR NOT isfinite(bucket_start)
       OR billing._bin(m.bucket_width, bucket_start) <> bucket_start THEN
        RAISE EXCEPTION 'invalid usage correction'
            USING ERRCODE = '22023',
                  DETAIL = format('delta must be a number and bucket_start the start of a %s bucket.', m.bucket_width);
    END IF;
    PERFORM billing._check_quantity(delta, correct_usage.meter, correct_usage.account_id);
    -- corrections of one bucket one at a time (ingest only adds, so it cannot race below zero)
    PERFORM pg_advisory_xact_lock(1651074162,
        hashtext(format('%s/%s/%s/%s', account_id, meter, dimension, bucket_start)));
    SELECT coalesce(billing._cell_agg(m.aggregation, u.quantity, u.last_ts, u.last_seq), 0) INTO cur
      FROM billing._cells_in(correct_usage.account_id, correct_usage.bucket_start,
                             correct_usage.bucket_start + interval '1 microsecond',
                             correct_usage.meter) u
     WHERE u.dimension = correct_usage.dimension;
    IF cur + delta < 0 THEN
        RAISE EXCEPTION 'correction would make the bucket negative'
            USING ERRCODE = '22023',
                  DETAIL = format('The bucket holds %s; the correction is %s.', cur, delta);
    END IF;
    INSERT INTO billing.usage_deltas (account_id, seq, cells)
    VALUES (correct_usage.account_id, NULL,
            billing._delta_pack(ARRAY[correct_usage.meter], ARRAY[correct_usage.dimension],
                                ARRAY[bucket_start], ARRAY[delta], ARRAY[0::bigint], NULL));
    INSERT INTO billing.usage_corrections (account_id, meter, dimension, bucket_start, delta, reason)
    VALUES (correct_usage.account_id, correct_usage.meter, correct_usage.dimension, bucket_start,
            delta, reason);
END
$$;

ALTER FUNCTION billing.correct_usage(bigint, text, timestamptz, numeric, text, text) SECURITY DEFINER;
COMMENT ON FUNCTION billing._unique_scan(bigint, text, timestamptz, timestamptz) IS
    'Internal: the distinct dimension values of a meter with a counted cell in [from, to) (through _cells_in)';
-- the 1.0 tables become landing tables (on Citus each node changes its copy
-- and its shards: billing._update_ddl)
CREATE FUNCTION billing._usage_landing() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    IF TG_TABLE_NAME = 'usage_buckets' THEN
        INSERT INTO billing.usage_deltas (account_id, seq, cells)
        VALUES (NEW.account_id, NEW.last_seq,
                billing._delta_pack(ARRAY[NEW.meter::text], ARRAY[NEW.dimension::text],
                                    ARRAY[NEW.bucket_start], ARRAY[NEW.quantity],
                                    ARRAY[NEW.events], ARRAY[NEW.last_ts]));
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing._usage_landing() IS
    'Internal: moves a row inserted into usage_buckets (a 1.0 dump) into usage_deltas; drops rows of usage_hourly and usage_daily';
REVOKE ALL ON FUNCTION billing._usage_landing() FROM PUBLIC;
SELECT billing._update_ddl('billing.usage_buckets', ARRAY[
    $ddl$COMMENT ON TABLE billing.usage_buckets IS
    'Always empty: the compacted buckets of release 1.0; rows inserted (a 1.0 dump) move into usage_deltas'$ddl$,
    $ddl$CREATE TRIGGER usage_buckets_landing BEFORE INSERT ON billing.usage_buckets
    FOR EACH ROW EXECUTE FUNCTION billing._usage_landing()$ddl$
]);
SELECT billing._update_ddl('billing.usage_hourly', ARRAY[
    $ddl$COMMENT ON TABLE billing.usage_hourly IS
    'Always empty: the hour roll-up of release 1.0; rows inserted (a 1.0 dump) are dropped (usage_days keeps the cells)'$ddl$,
    $ddl$CREATE TRIGGER usage_hourly_landing BEFORE INSERT ON billing.usage_hourly
    FOR EACH ROW EXECUTE FUNCTION billing._usage_landing()$ddl$
]);
SELECT billing._update_ddl('billing.usage_daily', ARRAY[
    $ddl$COMMENT ON TABLE billing.usage_daily IS
    'Always empty: the day roll-up of release 1.0; rows inserted (a 1.0 dump) are dropped (usage_days keeps day totals)'$ddl$,
    $ddl$CREATE TRIGGER usage_daily_landing BEFORE INSERT ON billing.usage_daily
    FOR EACH ROW EXECUTE FUNCTION billing._usage_landing()$ddl$
]);

-- the data: every compacted bucket of 1.0 becomes a delta cell (one delta row
-- per account, arrival number, meter and UTC day), the roll-ups go (the store
-- derives them), and on one node compaction folds the deltas into usage_days
-- at once.  On Citus (1.0's distribute() ran) the coordinator moves the
-- buckets (a worker runs the update where Citus refuses queries of its
-- tables); the deltas are compacted by the first compact_usage() after
-- billing.distribute() has distributed usage_days.
DO $$
BEGIN
    IF billing._citus_table_kind('billing.usage_buckets') IS NOT NULL THEN
        IF NOT citus_is_coordinator() THEN
            RETURN;
        END IF;
    END IF;
    INSERT INTO billing.usage_deltas (account_id, seq, cells)
    SELECT b.account_id, b.last_seq,
           billing._delta_pack(array_agg(b.meter::text ORDER BY b.dimension, b.bucket_start),
                               array_agg(b.dimension::text ORDER BY b.dimension, b.bucket_start),
                               array_agg(b.bucket_start ORDER BY b.dimension, b.bucket_start),
                               array_agg(b.quantity ORDER BY b.dimension, b.bucket_start),
                               array_agg(b.events ORDER BY b.dimension, b.bucket_start),
                               array_agg(b.last_ts ORDER BY b.dimension, b.bucket_start))
      FROM billing.usage_buckets b
     GROUP BY b.account_id, b.last_seq, b.meter,
              (b.bucket_start AT TIME ZONE 'UTC')::date;
    TRUNCATE billing.usage_buckets, billing.usage_hourly, billing.usage_daily;
    IF billing._citus_table_kind('billing.usage_deltas') IS NULL THEN
        PERFORM billing.compact_usage();
    END IF;
END
$$;
-- ---- end of issue 16, packed store ----


-- ---- issue 16, sustained preview: the deltas read in C, through their index -------------
-- billing._rollup_totals (src/totals.c) now folds the deltas not yet
-- compacted of each period's account as well, read through
-- usage_deltas_account: _usage_totals_many's SQL join of usage_deltas,
-- which the planner turned into a scan of the whole backlog when the
-- table's statistics were stale, is gone.
COMMENT ON FUNCTION billing._rollup_totals(bigint[], timestamptz[], timestamptz[], text[], text[], integer[], text[], text[]) IS
    'Internal: per period (1-based index) and meter, the aggregate of the cells in [start, end), compacted (day totals, edge days) or not (usage_deltas), with the latest cell''s last_ts and last_seq; the dimensions named for a period and meter (s_idx, s_meters, s_dims) apart, the rest with dimension NULL (src/totals.c)';

CREATE OR REPLACE FUNCTION billing._usage_totals_many(p_accounts bigint[], p_starts timestamptz[],
                                           p_ends timestamptz[], c_idx integer[] DEFAULT NULL,
                                           c_meters text[] DEFAULT NULL, c_dims text[] DEFAULT NULL)
    RETURNS TABLE (idx integer, meter text, quantity numeric, dimension text)
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
BEGIN
    -- on Citus: one router query per account (see 90_distribute.sql)
    IF billing._citus_table_kind('billing.usage_deltas') IS NOT NULL THEN
        RETURN QUERY
        SELECT x.i::integer, t.meter, t.quantity, t.dimension
          FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, i),
               LATERAL billing._usage_totals_citus(
                   x.a, x.s, x.e,
                   ARRAY(SELECT c.m FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
                          WHERE c.i = x.i AND c.d IS NOT NULL ORDER BY c.m, c.d),
                   ARRAY(SELECT c.d FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
                          WHERE c.i = x.i AND c.d IS NOT NULL ORDER BY c.m, c.d)) t
        UNION ALL
        SELECT u.idx, u.meter, u.quantity, u.dimension
          FROM billing._usage_totals_unique(p_accounts, p_starts, p_ends, c_idx, c_meters, c_dims) u;
        RETURN;
    END IF;
    -- the day totals, the edge cells and the deltas not yet compacted of each
    -- period, each meter aggregated in C (billing._rollup_totals, src/totals.c,
    -- by the one rule of src/agg.c); the deltas are read through their index
    -- on account_id whatever the table's statistics say
    RETURN QUERY
    WITH ms AS (
        SELECT coalesce(array_agg(m.meter::text ORDER BY m.meter), '{}') AS meters,
               coalesce(array_agg(m.aggregation::text ORDER BY m.meter), '{}') AS aggs
          FROM billing.meters m
         WHERE m.aggregation <> 'unique'
    ), na AS (
        -- the dimensions charged apart, per period and meter
        SELECT coalesce(array_agg(n.i), '{}') AS i, coalesce(array_agg(n.m), '{}') AS m,
               coalesce(array_agg(n.d), '{}') AS d
          FROM (SELECT DISTINCT c.i, c.m::text AS m, c.d::text AS d
                  FROM unnest(c_idx, c_meters, c_dims) AS c(i, m, d)
                 WHERE c.i IS NOT NULL AND c.m IS NOT NULL AND c.d IS NOT NULL) n
    )
    SELECT r.idx, r.meter, r.quantity, r.dimension
      FROM ms, na,
           billing._rollup_totals(p_accounts, p_starts, p_ends, ms.meters, ms.aggs,
                                  na.i, na.m, na.d) r
    UNION ALL
    SELECT u.idx, u.meter, u.quantity, u.dimension
      FROM billing._usage_totals_unique(p_accounts, p_starts, p_ends, c_idx, c_meters, c_dims) u;
END
$$;
COMMENT ON FUNCTION billing._usage_totals_many(bigint[], timestamptz[], timestamptz[], integer[], text[], text[]) IS
    'Internal: quantity per meter (and per dimension charged apart) of many (account, range) pairs, from roll-ups where whole hours and days allow';
-- _period_usage_from kept one plan: a custom plan always looked cheaper,
-- so every invoice preview planned its query again
ALTER FUNCTION billing._period_usage_from(bigint[], timestamptz[])
    SET plan_cache_mode = force_generic_plan;
-- _period_build joins each line to its period by number: subscripts of its
-- arrays of text walked them from the start once per line (rerate of
-- 10,000 accounts spent 1.8 s there)
CREATE OR REPLACE FUNCTION billing._period_build(p_accounts bigint[], p_ats timestamptz[],
                                      p_rated_only boolean DEFAULT false)
    RETURNS TABLE (account_id bigint, period_start timestamptz, period_end timestamptz,
                   currency text, spend_cap numeric, invoice_plan text, line billing._invoice_line)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
DECLARE
    v_accounts bigint[];
    v_currencies text[];
    v_caps numeric[];
    v_starts timestamptz[];
    v_ends timestamptz[];
    v_firsts boolean[];
    v_plans text[];
    v_s_idx integer[];
    v_s_plans text[];
    v_s_starts timestamptz[];
    v_s_ends timestamptz[];
BEGIN
    -- the periods (k = 1..) and their segments, as _invoice_build's arrays
    SELECT array_agg(x.account_id ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS accounts,
           array_agg(x.currency ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS currencies,
           array_agg(x.cap ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS caps,
           array_agg(x.period_start ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS starts,
           array_agg(x.period_end ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS ends,
           array_agg(x.first ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS firsts,
           array_agg(x.invoice_plan ORDER BY x.k) FILTER (WHERE x.segment_no = 1) AS plans,
           array_agg(x.k ORDER BY x.k, x.segment_start) AS s_idx,
           array_agg(x.plan ORDER BY x.k, x.segment_start) AS s_plans,
           array_agg(x.segment_start ORDER BY x.k, x.segment_start) AS s_starts,
           array_agg(x.segment_end ORDER BY x.k, x.segment_start) AS s_ends
      INTO v_accounts, v_currencies, v_caps, v_starts, v_ends, v_firsts, v_plans,
           v_s_idx, v_s_plans, v_s_starts, v_s_ends
      FROM (SELECT y.*, (dense_rank() OVER (ORDER BY y.account_id, y.grid_start))::integer AS k,
                   y.grid_start = min(y.grid_start) OVER (PARTITION BY y.account_id) AS first,
                   (row_number() OVER w)::integer AS segment_no,
                   first_value(y.segment_start) OVER w AS period_start,
                   last_value(y.segment_end) OVER w AS period_end,
                   last_value(y.spend_cap) OVER w AS cap,
                   last_value(y.plan) OVER w AS invoice_plan
              FROM (SELECT DISTINCT ON (s.account_id, s.grid_start, s.segment_start) s.*
                      FROM billing._segments(p_accounts, p_ats) s
                     ORDER BY s.account_id, s.grid_start, s.segment_start) y
            WINDOW w AS (PARTITION BY y.account_id, y.grid_start ORDER BY y.segment_start
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) x;
    IF v_accounts IS NULL THEN
        RETURN;
    END IF;
    -- each line with its period, joined by the period's number: not by
    -- subscripts (v_currencies[b.idx]), which walk an array of text, or
    -- of numerics with NULLs, from its start, once per line
    RETURN QUERY
    SELECT p.a, p.s, p.e, p.cur, p.cap, p.pl, b.line
      FROM (SELECT x AS line, row_number() OVER () AS n
              FROM billing._invoice_build(v_accounts, v_currencies, v_caps, v_starts, v_ends,
                                          v_firsts, v_s_idx, v_s_plans, v_s_starts, v_s_ends,
                                          p_rated_only, false) x) b
           JOIN unnest(v_accounts, v_starts, v_ends, v_currencies, v_caps, v_plans)
                WITH ORDINALITY AS p(a, s, e, cur, cap, pl, i) ON p.i = (b.line).idx
     ORDER BY b.n;
END
$$;
-- ---- end of issue 16, sustained preview ----

-- ---- issue 16 part 3: on Citus, compaction runs on the workers, each over its own shards ----
-- compact_usage() (src/compact.c) calls billing._compact_citus on Citus;
-- the maintenance worker of every worker node now runs compact_usage

-- one shard of usage_deltas into the co-located shard of usage_days, through
-- their heaps (src/compact.c); billing._compact_shard checks and locks first
CREATE FUNCTION billing._compact_pair(deltas regclass, days regclass) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_compact_pair'
    LANGUAGE C STRICT
    SET search_path = pg_catalog, billing, pg_temp
    SET jit = off
    SET client_min_messages = warning;
COMMENT ON FUNCTION billing._compact_pair(regclass, regclass) IS
    'Internal: compacts one shard of usage_deltas into the co-located shard of usage_days, on the node that holds them (billing._compact_shard calls it)';

-- a pair of co-located shards (by shard id), on this node: checked in
-- Citus's metadata, locked as Citus locks a shard it writes (a shard move
-- takes that lock exclusively before it switches the placements), then
-- compacted if this node still holds both (after a move, the node it went
-- to compacts it: 0 here)
CREATE FUNCTION billing._compact_shard(deltas_shard bigint, days_shard bigint) RETURNS bigint
    LANGUAGE plpgsql STRICT
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    paired boolean;
    here boolean;
    d regclass;
    u regclass;
BEGIN
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_dist_shard d JOIN pg_dist_shard u
                              ON u.shardminvalue = d.shardminvalue AND u.shardmaxvalue = d.shardmaxvalue
                             WHERE d.shardid = $1 AND d.logicalrelid = ''billing.usage_deltas''::regclass
                               AND u.shardid = $2 AND u.logicalrelid = ''billing.usage_days''::regclass)'
        INTO paired USING deltas_shard, days_shard;
    IF NOT paired THEN
        RAISE EXCEPTION 'shards % and % are not co-located shards of billing.usage_deltas and billing.usage_days',
            deltas_shard, days_shard USING ERRCODE = '22023';
    END IF;
    -- ShareLock (5), as Citus's own writes take it; in shard id order
    EXECUTE 'SELECT lock_shard_metadata(5, ARRAY[least($1, $2), greatest($1, $2)])'
        USING deltas_shard, days_shard;
    EXECUTE 'SELECT count(*) = 2 FROM pg_dist_placement p
              WHERE p.shardid IN ($1, $2) AND p.shardstate = 1
                AND p.groupid = (SELECT groupid FROM pg_dist_local_group)'
        INTO here USING deltas_shard, days_shard;
    IF NOT here THEN
        RETURN 0;
    END IF;
    EXECUTE 'SELECT to_regclass(shard_name(''billing.usage_deltas''::regclass, $1)),
                    to_regclass(shard_name(''billing.usage_days''::regclass, $2))'
        INTO d, u USING deltas_shard, days_shard;
    IF d IS NULL OR u IS NULL THEN
        RETURN 0;
    END IF;
    RETURN billing._compact_pair(d, u);
END
$$;
COMMENT ON FUNCTION billing._compact_shard(bigint, bigint) IS
    'Internal: compacts a co-located pair of shards of usage_deltas and usage_days (by shard id) if this node holds them; returns the delta cells folded';

-- the pairs of co-located shards given, on this node, one after the other
CREATE FUNCTION billing._compact_shards(deltas_shards bigint[], days_shards bigint[])
    RETURNS bigint
    LANGUAGE sql STRICT
    SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(sum(billing._compact_shard(d, u)), 0)::bigint
      FROM unnest(deltas_shards, days_shards) AS p(d, u)
$$;
COMMENT ON FUNCTION billing._compact_shards(bigint[], bigint[]) IS
    'Internal: billing._compact_shard on each pair of co-located shards given, on this node, in one transaction; returns the delta cells folded';

-- from the coordinator: every node that holds shards compacts them
-- (billing._compact_shards, one connection and transaction per node, all
-- nodes at once), with what each returned
CREATE FUNCTION billing._compact_placements()
    RETURNS TABLE (nodename text, nodeport integer, shard_groups integer, success boolean,
                   result text)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    names text[];
    ports integer[];
    counts integer[];
    cmds text[];
BEGIN
    EXECUTE 'SELECT array_agg(nodename ORDER BY nodename, nodeport),
                    array_agg(nodeport ORDER BY nodename, nodeport),
                    array_agg(n ORDER BY nodename, nodeport),
                    array_agg(format(''SELECT billing._compact_shards(%L, %L)'', ds, us)
                              ORDER BY nodename, nodeport)
               FROM (SELECT p.nodename, p.nodeport, count(*)::int AS n,
                            array_agg(d.shardid ORDER BY d.shardid) AS ds,
                            array_agg(u.shardid ORDER BY d.shardid) AS us
                       FROM pg_dist_shard d
                       JOIN pg_dist_shard u ON u.logicalrelid = ''billing.usage_days''::regclass
                                           AND u.shardminvalue = d.shardminvalue
                                           AND u.shardmaxvalue = d.shardmaxvalue
                       JOIN pg_dist_shard_placement p ON p.shardid = d.shardid AND p.shardstate = 1
                       JOIN pg_dist_shard_placement q ON q.shardid = u.shardid AND q.shardstate = 1
                                                     AND q.nodename = p.nodename
                                                     AND q.nodeport = p.nodeport
                      WHERE d.logicalrelid = ''billing.usage_deltas''::regclass
                      GROUP BY p.nodename, p.nodeport) x'
        INTO names, ports, counts, cmds;
    IF names IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE
        'SELECT w.node_name, w.node_port, $3[w.i]::integer, w.success, w.result
           FROM master_run_on_worker($1, $2, $4, true)
                WITH ORDINALITY AS w(node_name, node_port, success, result, i)'
        USING names, ports, counts, cmds;
END
$$;
COMMENT ON FUNCTION billing._compact_placements() IS
    'Internal: on a Citus coordinator, has every node compact its placements of usage_deltas into their co-located usage_days shards, all nodes at once; one row per node with its result';

-- compact_usage() on Citus: from the coordinator every node's placements
-- (an error names the first node that failed; the others are compacted
-- all the same), from a worker node the shards it holds
CREATE FUNCTION billing._compact_citus() RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    folded bigint := 0;
    failed bigint;
    err text;
    ds bigint[];
    us bigint[];
BEGIN
    IF citus_is_coordinator() THEN
        SELECT coalesce(sum(p.result::bigint) FILTER (WHERE p.success), 0),
               count(*) FILTER (WHERE NOT p.success),
               min(format('%s:%s: %s', p.nodename, p.nodeport, p.result)) FILTER (WHERE NOT p.success)
          INTO folded, failed, err
          FROM billing._compact_placements() p;
        IF failed > 0 THEN
            RAISE EXCEPTION 'compaction failed on % of the nodes holding billing.usage_deltas', failed
                USING ERRCODE = '58000', DETAIL = err;
        END IF;
        RETURN folded;
    END IF;
    EXECUTE 'SELECT array_agg(d.shardid ORDER BY d.shardid), array_agg(u.shardid ORDER BY d.shardid)
               FROM pg_dist_shard d
               JOIN pg_dist_shard u ON u.logicalrelid = ''billing.usage_days''::regclass
                                   AND u.shardminvalue = d.shardminvalue
                                   AND u.shardmaxvalue = d.shardmaxvalue
              WHERE d.logicalrelid = ''billing.usage_deltas''::regclass
                AND EXISTS (SELECT 1 FROM pg_dist_placement p
                             WHERE p.shardid = d.shardid AND p.shardstate = 1
                               AND p.groupid = (SELECT groupid FROM pg_dist_local_group))'
        INTO ds, us;
    RETURN coalesce(billing._compact_shards(ds, us), 0);
END
$$;
COMMENT ON FUNCTION billing._compact_citus() IS
    'Internal: compact_usage() on Citus: from the coordinator every node over the shards it holds, all nodes at once; from a worker node the shards it holds';

CREATE OR REPLACE FUNCTION billing._maintenance_runs_here(job text) RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grp integer;
    res boolean;
BEGIN
    IF billing._citus_table_kind('billing.usage_deltas') IS NULL THEN
        RETURN true;
    END IF;
    EXECUTE 'SELECT groupid FROM pg_catalog.pg_dist_local_group' INTO grp;
    IF job <> 'compact_usage' THEN
        RETURN grp = 0;
    END IF;
    IF grp <> 0 THEN
        RETURN true;
    END IF;
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_shard s
                              JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid
                              JOIN pg_catalog.pg_dist_node n ON n.groupid = p.groupid
                             WHERE s.logicalrelid = ''billing.usage_deltas''::regclass
                               AND (p.groupid = 0 OR NOT n.hasmetadata))'
        INTO res;
    RETURN res;
END
$$;
COMMENT ON FUNCTION billing._maintenance_runs_here(text) IS
    'Internal: whether the maintenance worker of this node runs job (on Citus: compact_usage on the nodes that hold shards, the other jobs on the coordinator)';

REVOKE ALL ON FUNCTION billing._compact_pair(regclass, regclass), billing._compact_shard(bigint, bigint),
    billing._compact_shards(bigint[], bigint[]), billing._compact_placements(),
    billing._compact_citus() FROM PUBLIC;
-- internal helpers are the readers' (99_roles.sql); _compact_pair checks the
-- rights on the shards it writes
GRANT EXECUTE ON FUNCTION billing._compact_pair(regclass, regclass), billing._compact_shard(bigint, bigint),
    billing._compact_shards(bigint[], bigint[]), billing._compact_placements(),
    billing._compact_citus() TO billing_reader;
-- ---- end of issue 16 part 3 ----

-- ---- issue 16, ingest() batches: the account cache (sql/install/10_reference.sql) ----
-- Backends keep the accounts they found across transactions; the trigger
-- accounts_changed keeps that cache exact (src/ingest_accounts.c).  On a
-- database 1.0's distribute() spread over Citus the trigger goes on the
-- shards too (where it does nothing) but is enabled always on the table
-- only; no cache is kept on Citus.
CREATE FUNCTION billing._accounts_changed() RETURNS trigger
    LANGUAGE C AS 'MODULE_PATHNAME', 'billing_accounts_changed';
COMMENT ON FUNCTION billing._accounts_changed() IS
    'Internal: invalidates the account caches of all backends';
REVOKE ALL ON FUNCTION billing._accounts_changed() FROM PUBLIC;
SELECT billing._update_ddl('billing.accounts', ARRAY[
    $ddl$CREATE TRIGGER accounts_changed
        AFTER UPDATE OR DELETE OR TRUNCATE ON billing.accounts
        FOR EACH STATEMENT EXECUTE FUNCTION billing._accounts_changed()$ddl$
]);
SELECT billing._update_ddl('billing.accounts', ARRAY[
    $ddl$ALTER TABLE billing.accounts ENABLE ALWAYS TRIGGER accounts_changed$ddl$
]) WHERE billing._citus_table_kind('billing.accounts') IS NULL;
DO $$
DECLARE
    propagation text := current_setting('citus.enable_ddl_propagation', true);
BEGIN
    IF billing._citus_table_kind('billing.accounts') IS NOT NULL THEN
        PERFORM set_config('citus.enable_ddl_propagation', 'off', true);
        ALTER TABLE billing.accounts ENABLE ALWAYS TRIGGER accounts_changed;
        PERFORM set_config('citus.enable_ddl_propagation', propagation, true);
    END IF;
END
$$;
-- ---- end of issue 16, ingest() batches ----

-- ---- issue 16, COPY reads timestamps and counts itself ----------------------
-- A COPY the hook counts (src/ingest_copy.c) reads timestamptz in its ISO
-- form and numeric integers without PostgreSQL's general parsers
-- (src/copy_input.c); the two functions show the reader's result (tests).
CREATE FUNCTION billing._copy_timestamptz_fast(value text) RETURNS timestamptz
    LANGUAGE C IMMUTABLE STRICT AS 'MODULE_PATHNAME', 'billing_copy_timestamptz_fast';
COMMENT ON FUNCTION billing._copy_timestamptz_fast(text) IS
    'Internal: what the COPY hook''s own reader makes of value (src/copy_input.c); NULL when it leaves value to timestamptz_in';
CREATE FUNCTION billing._copy_numeric_fast(value text) RETURNS numeric
    LANGUAGE C IMMUTABLE STRICT AS 'MODULE_PATHNAME', 'billing_copy_numeric_fast';
COMMENT ON FUNCTION billing._copy_numeric_fast(text) IS
    'Internal: what the COPY hook''s own reader makes of value (src/copy_input.c); NULL when it leaves value to numeric_in';
REVOKE ALL ON FUNCTION billing._copy_timestamptz_fast(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing._copy_numeric_fast(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._copy_timestamptz_fast(text) TO billing_reader;
GRANT EXECUTE ON FUNCTION billing._copy_numeric_fast(text) TO billing_reader;
-- ---- end of issue 16, COPY input ----

-- ---- issue 16, preview: one generic plan for a few periods -----------------
-- _rate_periods (for at most 16 periods), _unique_counts and _invoice_build
-- (from its step 2, for at most 16) keep one generic plan per statement and
-- session instead of planning each call; the rule is _plan_cache_for's
-- (sql/install/00_helpers.sql), which every rating path calls.
CREATE FUNCTION billing._plan_cache_for(p_periods integer, p_generic boolean DEFAULT true)
    RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    IF p_periods > 16 THEN
        PERFORM pg_catalog.set_config('plan_cache_mode', 'force_custom_plan', true);
    ELSIF p_generic AND pg_catalog.current_setting('citus.version', true) IS NULL THEN
        PERFORM pg_catalog.set_config('plan_cache_mode', 'force_generic_plan', true);
    END IF;
END
$$;
COMMENT ON FUNCTION billing._plan_cache_for(integer, boolean) IS
    'Internal: sets plan_cache_mode for the rest of the caller''s call, from the number of periods it rates';
REVOKE ALL ON FUNCTION billing._plan_cache_for(integer, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._plan_cache_for(integer, boolean) TO billing_reader;
CREATE OR REPLACE FUNCTION billing._rate_periods(p_accounts bigint[], p_plans text[], p_currencies text[],
                                      p_caps numeric[], p_starts timestamptz[],
                                      p_ends timestamptz[])
    RETURNS TABLE (idx integer, ord integer, kind text, meter text, description text,
                   quantity numeric, amount numeric, unrounded_amount numeric,
                   charge_id bigint, price billing.price, dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run; the plan
    -- cache mode is a level to change it on, for this call only
    SET jit = off SET plan_cache_mode = auto AS $$
BEGIN
    -- A few periods (a preview): one generic plan per session (for one
    -- account a custom plan, the arrays' lengths known, always looked
    -- cheaper, and planning it took longer than running it).  Many
    -- (finalize, rerate): custom plans.  See _plan_cache_for.
    PERFORM billing._plan_cache_for(cardinality(p_accounts));
    RETURN QUERY
    WITH per AS (
        SELECT x.i::integer AS idx, x.pl AS plan, x.cur AS currency, x.cap, x.s AS ps
          FROM unnest(p_plans, p_currencies, p_caps, p_starts) WITH ORDINALITY AS x(pl, cur, cap, s, i)
    ), versions AS (
        -- the charge versions in force, once per (plan, period start) however
        -- many accounts share them, numbered in invoice order: fixed fees by
        -- description, then usage by description, meter and dimension (the
        -- spend cap comes last)
        SELECT v.*, (row_number() OVER (PARTITION BY v.plan, v.ps
                                        ORDER BY v.grp, v.description, v.meter,
                                                 v.dimension NULLS FIRST))::integer AS ord,
               (count(*) OVER (PARTITION BY v.plan, v.ps))::integer AS n_lines
          FROM (SELECT DISTINCT ON (k.plan, k.ps, c.meter, c.dimension,
                                    CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END)
                       k.plan, k.ps, c.charge_id, c.meter::text AS meter,
                       c.dimension::text AS dimension,
                       coalesce(c.description,
                                CASE WHEN c.dimension IS NULL THEN c.meter::text
                                     ELSE format('%s (%s)', c.meter, c.dimension) END) AS description,
                       c.price,
                       CASE WHEN c.meter IS NULL THEN 1 ELSE 2 END AS grp
                  FROM (SELECT DISTINCT per.plan, per.ps FROM per) k
                       JOIN billing.charges c ON c.plan = k.plan AND c.valid_from <= k.ps
                 ORDER BY k.plan, k.ps, c.meter, c.dimension,
                          CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END,
                          c.valid_from DESC) v
    ), widths AS (
        -- the bucket widths of the meters each (plan, period start) charges
        SELECT DISTINCT v.plan, v.ps, m.bucket_width
          FROM versions v JOIN billing.meters m ON m.meter = v.meter
    ), firsts AS (
        -- a metered charge of a period bills the buckets of its meter that
        -- start in [lo, period end), lo by the one rule of src/periods.c
        -- for the meter's bucket width: the bucket straddling a
        -- subscription's start goes to its first period, every other one
        -- to the period holding its start
        SELECT per.idx, w.bucket_width,
               billing._period_first_bucket(per.ps, uf.usage_from, w.bucket_width) AS lo
          FROM per JOIN widths w ON w.plan = per.plan AND w.ps = per.ps
               JOIN billing._period_usage_from(p_accounts, p_starts) uf ON uf.idx = per.idx
    ), reads AS (
        -- one read of the usage store per period and distinct lo (more than
        -- one only in a first period whose meters' buckets straddle its
        -- start at different points)
        SELECT r.idx, r.lo, (row_number() OVER (ORDER BY r.idx, r.lo))::integer AS j
          FROM (SELECT DISTINCT f.idx, f.lo FROM firsts f) r
    ), charged AS (
        -- the usage charges of each read (those of its period whose
        -- meter's bucket width gives its lo), for the totals: a matrix
        -- charge's dimension is totalled apart
        SELECT array_agg(rd.j) AS i, array_agg(v.meter) AS m, array_agg(v.dimension) AS d
          FROM reads rd JOIN per ON per.idx = rd.idx
               JOIN versions v ON v.plan = per.plan AND v.ps = per.ps AND v.meter IS NOT NULL
               JOIN billing.meters m ON m.meter = v.meter
               JOIN firsts f ON f.idx = rd.idx AND f.lo = rd.lo AND f.bucket_width = m.bucket_width
    ), totals AS MATERIALIZED (
        -- (read once: inlined, the join below would read the store per line)
        -- each meter from the read whose lo is that of its bucket width
        SELECT rd.idx, t.meter, t.dimension, t.quantity
          FROM (SELECT array_agg(p_accounts[rd.idx] ORDER BY rd.j) AS accounts,
                       array_agg(rd.lo ORDER BY rd.j) AS starts,
                       array_agg(p_ends[rd.idx] ORDER BY rd.j) AS ends
                  FROM reads rd) a, charged c,
               LATERAL billing._usage_totals_many(a.accounts, a.starts, a.ends, c.i, c.m, c.d) t
               JOIN reads rd ON rd.j = t.idx
               JOIN billing.meters m ON m.meter = t.meter
               JOIN firsts f ON f.idx = rd.idx AND f.lo = rd.lo AND f.bucket_width = m.bucket_width
    ), rated AS (
        SELECT per.idx, per.currency, v.ord, v.n_lines, v.grp,
               CASE WHEN v.meter IS NULL THEN 'fixed' ELSE 'usage' END AS kind,
               v.meter, v.description,
               CASE WHEN v.meter IS NULL THEN NULL ELSE coalesce(t.quantity, 0) END AS quantity,
               billing.rate(v.price, CASE WHEN v.meter IS NULL THEN 0 ELSE coalesce(t.quantity, 0) END)
                   AS unrounded_amount,
               v.charge_id, v.price, v.dimension
          FROM per JOIN versions v ON v.plan = per.plan AND v.ps = per.ps
               LEFT JOIN totals t ON t.idx = per.idx AND t.meter = v.meter
                                 AND t.dimension IS NOT DISTINCT FROM v.dimension
    ), lines AS (
        SELECT r.*, billing.round_money(r.unrounded_amount, r.currency) AS amount FROM rated r
    ), capped AS (
        SELECT per.idx, max(l.n_lines) + 1 AS ord, 'cap'::text AS kind, NULL::text AS meter,
               'spend cap'::text AS description, NULL::numeric AS quantity,
               NULL::numeric AS unrounded_amount, NULL::bigint AS charge_id,
               NULL::billing.price AS price, NULL::text AS dimension,
               billing._cap_amount(per.cap, per.currency, sum(l.amount)) AS amount
          FROM per JOIN lines l ON l.idx = per.idx AND l.kind = 'usage'
         WHERE per.cap IS NOT NULL
         GROUP BY per.idx, per.cap, per.currency
        HAVING billing._cap_amount(per.cap, per.currency, sum(l.amount)) IS NOT NULL
    )
    SELECT l.idx, l.ord, l.kind, l.meter, l.description, l.quantity, l.amount,
           l.unrounded_amount, l.charge_id, l.price, l.dimension
      FROM lines l
    UNION ALL
    SELECT c.idx, c.ord, c.kind, c.meter, c.description, c.quantity, c.amount,
           c.unrounded_amount, c.charge_id, c.price, c.dimension
      FROM capped c;
END
$$;
CREATE OR REPLACE FUNCTION billing._unique_counts(p_account bigint, p_from timestamptz, p_to timestamptz,
                                       p_meters text[], s_meters text[] DEFAULT '{}',
                                       s_dims text[] DEFAULT '{}')
    RETURNS TABLE (meter text, dimension text, quantity numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- the plan cache mode: a level to change it on, for this call only
    SET plan_cache_mode = auto AS $$
#variable_conflict use_column
DECLARE
    mtr text;
    reg record;
    total bigint;
    delta_dims text[];
    seen text[];
    named text[];
    present text[];
BEGIN
    IF p_from >= p_to THEN
        RETURN;
    END IF;
    -- one account: one generic plan per statement and session (a custom
    -- plan for each call planned the statements anew, which took longer
    -- than running them); see _plan_cache_for
    PERFORM billing._plan_cache_for(1);
    FOREACH mtr IN ARRAY p_meters LOOP
        named := ARRAY(SELECT DISTINCT x.d FROM unnest(s_meters, s_dims) AS x(m, d)
                        WHERE x.m = mtr AND x.d IS NOT NULL);
        SELECT p.period_end, p.distinct_count INTO reg
          FROM billing.unique_periods p
         WHERE p.account_id = p_account AND p.meter = mtr AND p.period_start = p_from
           AND p.period_end >= p_to;
        IF FOUND THEN
            -- the values compaction has seen, and those only in the deltas
            IF reg.period_end = p_to THEN
                total := reg.distinct_count;
            ELSE
                SELECT count(*) INTO total FROM billing.unique_values v
                 WHERE v.account_id = p_account AND v.meter = mtr AND v.period_start = p_from
                   AND v.first_bucket < p_to;
            END IF;
            delta_dims := ARRAY(SELECT DISTINCT x.dimension::text
                                  FROM billing.usage_deltas d, billing._delta_cells(d.cells) x
                                 WHERE d.account_id = p_account AND x.meter = mtr
                                   AND x.bucket_start >= p_from AND x.bucket_start < p_to);
            IF cardinality(delta_dims) > 0 THEN
                total := total + (SELECT count(*) FROM unnest(delta_dims) AS x(d)
                                   WHERE NOT EXISTS (SELECT 1 FROM billing.unique_values v
                                                      WHERE v.account_id = p_account AND v.meter = mtr
                                                        AND v.period_start = p_from
                                                        AND v.dimension = x.d
                                                        AND v.first_bucket < p_to));
            END IF;
            present := ARRAY(SELECT x.d FROM unnest(named) AS x(d)
                              WHERE x.d = ANY (delta_dims)
                                 OR EXISTS (SELECT 1 FROM billing.unique_values v
                                             WHERE v.account_id = p_account AND v.meter = mtr
                                               AND v.period_start = p_from AND v.dimension = x.d
                                               AND v.first_bucket < p_to));
        ELSE
            -- no row for this period: the cells themselves
            seen := ARRAY(SELECT s FROM billing._unique_scan(p_account, mtr, p_from, p_to) s);
            total := cardinality(seen);
            present := ARRAY(SELECT x.d FROM unnest(named) AS x(d) WHERE x.d = ANY (seen));
        END IF;
        CONTINUE WHEN total = 0;
        RETURN QUERY
        SELECT mtr, x.d, 1::numeric FROM unnest(present) AS x(d)
        UNION ALL
        SELECT mtr, NULL::text, (total - cardinality(present))::numeric
         WHERE total > cardinality(present);
    END LOOP;
END
$$;
CREATE OR REPLACE FUNCTION billing._invoice_build(p_accounts bigint[], p_currencies text[], p_caps numeric[],
                                       p_starts timestamptz[], p_ends timestamptz[],
                                       p_first boolean[], s_idx integer[], s_plans text[],
                                       s_starts timestamptz[], s_ends timestamptz[],
                                       p_rated_only boolean DEFAULT false,
                                       p_book boolean DEFAULT false)
    RETURNS SETOF billing._invoice_line
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run; the plan
    -- cache mode is the default, and a level to change it on (see 2.)
    SET jit = off SET plan_cache_mode = auto AS $$
DECLARE
    accs bigint[];
    t_from timestamptz;
    t_to timestamptz;
    l billing._invoice_line[];
    wins billing._window[];
    grs billing._credit_state[];
    adjs billing._invoice_line[];   -- pending adjustments (grant_id: the account)
    sa record;
    sp record;
    has_true_ups boolean;
    has_installments boolean;
BEGIN
    IF coalesce(array_length(p_accounts, 1), 0) = 0 THEN
        RETURN;
    END IF;
    -- many periods (finalize, rerate): custom plans from here on; a few
    -- keep the caller's mode until 2. (_plan_cache_for)
    PERFORM billing._plan_cache_for(cardinality(p_accounts), false);
    -- 1. usage and fixed lines of every segment (one set-based rating), the
    -- cap.  Each period one segment (no plan change): _rate_periods rates
    -- the periods, cap included, as they are.
    IF cardinality(s_idx) = cardinality(p_accounts) THEN
        SELECT array_agg(ROW(r.idx, r.ord, r.kind, r.meter, r.description, r.quantity, r.amount,
                             r.unrounded_amount, r.charge_id, r.price, NULL, NULL, NULL, NULL, NULL,
                             NULL, NULL, NULL, NULL, r.dimension)::billing._invoice_line
                         ORDER BY r.idx, r.ord)
          INTO l
          FROM billing._rate_periods(p_accounts, s_plans, p_currencies, p_caps, s_starts, s_ends) r;
    ELSE
        -- a plan change: each segment rated on its own from its start to
        -- its end with its plan, then _segment_lines (a statement of its own:
        -- the rating's plans stay its own)
        SELECT array_agg(x.a ORDER BY y.n) AS accounts, array_agg(x.cur ORDER BY y.n) AS currencies
          INTO sa
          FROM unnest(s_idx) WITH ORDINALITY AS y(p, n)
               JOIN unnest(p_accounts, p_currencies) WITH ORDINALITY AS x(a, cur, k) ON x.k = y.p;
        l := ARRAY(SELECT ROW(r.idx, r.ord, r.kind, r.meter, r.description, r.quantity, r.amount,
                              r.unrounded_amount, r.charge_id, r.price, NULL, NULL, NULL, NULL,
                              NULL, NULL, NULL, NULL, NULL, r.dimension)::billing._invoice_line
                     FROM billing._rate_periods(sa.accounts, s_plans, sa.currencies,
                                                array_fill(NULL::numeric, ARRAY[cardinality(s_idx)]),
                                                s_starts, s_ends) r);
        l := ARRAY(SELECT x FROM billing._segment_lines(l, s_idx, s_plans, s_starts, s_ends,
                                                        p_currencies, p_caps, p_starts, p_ends) x
                    ORDER BY x.idx, x.ord);
    END IF;
    IF p_rated_only THEN
        RETURN QUERY SELECT * FROM unnest(l);
        RETURN;
    END IF;

    -- 2. what the accounts have (one statement; each subquery routed by the
    -- accounts on Citus).  From here on, for a few periods (a preview), one
    -- generic plan per statement and session: planning these statements
    -- anew costs more than running them.  (Not above: the rating's
    -- statements here and in the callees that set no mode of their own,
    -- such as _segment_lines, keep the caller's.)  See _plan_cache_for.
    PERFORM billing._plan_cache_for(cardinality(p_accounts));
    IF cardinality(p_accounts) = 1 THEN
        accs := p_accounts;
        t_from := p_starts[1];
        t_to := p_ends[1];
    ELSE
        SELECT array_agg(DISTINCT a), min(s), max(e) INTO accs, t_from, t_to
          FROM unnest(p_accounts, p_starts, p_ends) AS x(a, s, e);
    END IF;
    SELECT cw.wins, cw.has_true_ups, cw.has_installments,
           -- pending adjustments, as lines (the row rebuilt as
           -- billing.adjustments: on Citus a is a shard's row)
           (SELECT array_agg(ROW(NULL, a.adjustment_id, 'adjustment', a.meter,
                                 billing._adjustment_text(ROW(a.*)::billing.adjustments),
                                 a.new_quantity - a.old_quantity, a.delta, NULL, NULL, NULL,
                                 a.adjustment_id, NULL, a.account_id, NULL, NULL, NULL, NULL, NULL,
                                 NULL, a.dimension)::billing._invoice_line)
              FROM billing.adjustments a
             WHERE a.account_id = ANY (accs) AND a.billed_invoice_id IS NULL),
           -- grants with something left, effective before the last period
           -- ends, with the next window of their commitment (for a rollover)
           (SELECT array_agg(ROW(g.account_id, g.grant_id, g.priority, g.effective_at, g.expires_at,
                                 g.applies_to::text[], g.source, l.remaining,
                                 CASE WHEN g.source = 'commitment' THEN c.rollover_fraction ELSE 0 END,
                                 nw.starts_at, nw.ends_at,
                                 coalesce(g.reason, g.source))::billing._credit_state)
              FROM billing.credit_grants g
                   JOIN LATERAL (SELECT sum(x.amount) AS remaining FROM billing.credit_ledger x
                                  WHERE x.account_id = g.account_id AND x.grant_id = g.grant_id) l ON true
                   LEFT JOIN billing.commitments c
                          ON c.account_id = g.account_id AND c.commitment_id = g.commitment_id
                   LEFT JOIN billing.commitment_windows nw
                          ON nw.account_id = g.account_id AND nw.commitment_id = g.commitment_id
                         AND nw.window_no = g.window_no + 1
             WHERE g.account_id = ANY (accs) AND g.voided_at IS NULL AND g.effective_at < t_to
               AND l.remaining > 0)
      INTO wins, has_true_ups, has_installments, adjs, grs
      -- the commitment windows overlapping the periods; minimum ones ending
      -- in them (true-ups), prepaid ones (installments)
      FROM (SELECT array_agg(ROW(w.account_id, w.commitment_id, w.window_no, c.kind, w.starts_at,
                                 w.ends_at, w.amount, c.applies_to::text[], c.installments,
                                 w.installment_due, w.installment_amounts)::billing._window) AS wins,
                   coalesce(bool_or(c.kind = 'minimum' AND w.ends_at > t_from AND w.ends_at <= t_to),
                            false) AS has_true_ups,
                   coalesce(bool_or(c.kind = 'prepaid'), false) AS has_installments
              FROM billing.commitment_windows w
                   JOIN billing.commitments c
                     ON c.account_id = w.account_id AND c.commitment_id = w.commitment_id
             WHERE w.account_id = ANY (accs) AND w.starts_at < t_to AND w.ends_at > t_from) cw;
    IF wins IS NULL AND adjs IS NULL AND grs IS NULL THEN
        RETURN QUERY SELECT * FROM unnest(l);
        RETURN;
    END IF;
    -- 3. true_up lines: the minimum windows ending in a period, short of
    -- the eligible spend of the finalized invoices inside the window (each
    -- invoice's usage, fixed and cap lines plus the adjustments made to it
    -- since, billed or pending) and of the periods built here
    IF has_true_ups THEN
        SELECT array_agg(y.account_id) AS accounts, array_agg(y.commitment_id) AS commitments,
               array_agg(y.window_no) AS windows, array_agg(y.spend) AS spends
          INTO sp
          FROM (SELECT w.account_id, w.commitment_id, w.window_no,
                       sum(billing._eligible_spend(c.applies_to::text[], b.kinds, b.meters, b.amounts)) AS spend
                  FROM billing.commitment_windows w
                       JOIN billing.commitments c
                         ON c.account_id = w.account_id AND c.commitment_id = w.commitment_id
                       JOIN billing.invoices i
                         ON i.account_id = w.account_id AND i.status = 'finalized'
                        AND i.period_start >= w.starts_at AND i.period_end <= w.ends_at
                       CROSS JOIN LATERAL (
                           SELECT array_agg(z.kind) AS kinds, array_agg(z.meter) AS meters,
                                  array_agg(z.amount) AS amounts
                             FROM (SELECT x.kind, x.meter::text AS meter, x.amount
                                     FROM billing.invoice_lines x
                                    WHERE x.account_id = i.account_id AND x.invoice_id = i.invoice_id
                                      AND x.kind IN ('usage', 'fixed', 'cap')
                                   UNION ALL
                                   SELECT a.line_kind, a.meter::text, a.delta FROM billing.adjustments a
                                    WHERE a.account_id = i.account_id AND a.invoice_id = i.invoice_id) z) b
                 WHERE w.account_id = ANY (accs) AND c.kind = 'minimum'
                   AND w.ends_at > t_from AND w.ends_at <= t_to
                 GROUP BY w.account_id, w.commitment_id, w.window_no) y;
        l := l || ARRAY(
            WITH per AS (
                SELECT x.n::integer AS idx, x.a AS account_id, x.cur AS currency, x.s AS ps, x.e AS pe
                  FROM unnest(p_accounts, p_currencies, p_starts, p_ends)
                       WITH ORDINALITY AS x(a, cur, s, e, n)
            ), batch AS (
                -- the periods being built, as (kind, meter, amount) lists
                SELECT x.idx, array_agg(x.kind) AS kinds, array_agg(x.meter) AS meters,
                       array_agg(x.amount) AS amounts
                  FROM unnest(l) x GROUP BY x.idx
            ), t AS (
                SELECT per.idx, w.commitment_id, w.window_no, w.starts_at, w.ends_at, per.currency,
                       w.amount, w.amount
                       - coalesce((SELECT s.spend
                                     FROM unnest(sp.accounts, sp.commitments, sp.windows, sp.spends)
                                          AS s(account_id, commitment_id, window_no, spend)
                                    WHERE s.account_id = w.account_id AND s.commitment_id = w.commitment_id
                                      AND s.window_no = w.window_no), 0)
                       - coalesce((SELECT sum(billing._eligible_spend(w.applies_to, b.kinds, b.meters, b.amounts))
                                     FROM per p2 JOIN batch b ON b.idx = p2.idx
                                    WHERE p2.account_id = w.account_id
                                      AND p2.ps >= w.starts_at AND p2.pe <= w.ends_at), 0) AS short
                  FROM per JOIN unnest(wins) w
                         ON w.account_id = per.account_id AND w.kind = 'minimum'
                        AND w.ends_at > per.ps AND w.ends_at <= per.pe
            )
            SELECT ROW(t.idx, 2000000000 + row_number() OVER (PARTITION BY t.idx ORDER BY t.commitment_id, t.window_no),
                       'true_up', NULL,
                       format('minimum commitment %s, %s to %s: shortfall', t.commitment_id,
                              to_char(t.starts_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                              to_char(t.ends_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
                       -- quantity: the window's eligible spend
                       t.amount - t.short, billing.round_money(t.short, t.currency), t.short, NULL,
                       NULL, NULL, t.commitment_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                       NULL)::billing._invoice_line
              FROM t
             WHERE billing.round_money(t.short, t.currency) > 0);
    END IF;
    -- commitment lines: each installment of a prepaid window on the period
    -- its schedule puts it in
    IF has_installments THEN
        l := l || ARRAY(
            SELECT ROW(x.n, 3000000000 + row_number() OVER (PARTITION BY x.n ORDER BY w.commitment_id, w.window_no, i.j),
                       'commitment', NULL,
                       CASE WHEN w.installments = 1
                            THEN format('prepaid commitment %s, window %s', w.commitment_id, w.window_no)
                            ELSE format('prepaid commitment %s, window %s: installment %s of %s',
                                        w.commitment_id, w.window_no, i.j, w.installments) END,
                       NULL, i.amount, NULL, NULL, NULL, NULL, w.commitment_id, NULL, NULL, NULL, NULL,
                       NULL, NULL, NULL, NULL)::billing._invoice_line
              FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, n)
                   JOIN unnest(wins) w ON w.account_id = x.a AND w.kind = 'prepaid',
                   unnest(w.installment_due, w.installment_amounts) WITH ORDINALITY AS i(due, amount, j)
             WHERE i.due >= x.s AND i.due < x.e);
    END IF;
    -- adjustment lines: the account's pending adjustments, on its first period
    IF adjs IS NOT NULL THEN
        l := l || ARRAY(
            SELECT ROW(x.n, 4000000000 + row_number() OVER (PARTITION BY x.n ORDER BY a.adjustment_id),
                       'adjustment', a.meter, a.description, a.quantity, a.amount, NULL, NULL, NULL,
                       a.adjustment_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                       a.dimension)::billing._invoice_line
              FROM unnest(p_accounts, p_first) WITH ORDINALITY AS x(a, f, n)
                   JOIN unnest(adjs) a ON a.grant_id = x.a
             WHERE x.f);
    END IF;
    -- 4. the credits, after every line above (_credit_draws)
    IF grs IS NOT NULL THEN
        l := l || ARRAY(SELECT x FROM billing._credit_draws(p_accounts, p_currencies, p_starts,
                                                            p_ends, p_book, l, grs) x);
    END IF;
    IF cardinality(p_accounts) = 1 THEN
        RETURN QUERY SELECT * FROM unnest(l);     -- in order already
    ELSE
        RETURN QUERY SELECT * FROM unnest(l) x ORDER BY x.idx, x.ord;
    END IF;
END
$$;
-- ---- end of issue 16, preview plans ----

-- ---- issue 16, preview: invoice_preview in PL/pgSQL (sql/install/50_invoices.sql) ----
CREATE OR REPLACE FUNCTION billing.invoice_preview(account_id bigint, at timestamptz DEFAULT pg_catalog.now())
    RETURNS TABLE (line_no int, kind text, meter text, description text,
                   period_start timestamptz, period_end timestamptz,
                   quantity numeric, amount numeric,
                   dimension text)   -- issue 18: last, so that positional clients keep working
    -- PL/pgSQL, not SQL: a SQL function with a SET clause is not inlined,
    -- and is parsed and planned again at each call (about 6% of a preview)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN QUERY SELECT * FROM billing._invoice_preview($1, $2);
END
$$;
-- ---- end of issue 16, preview in PL/pgSQL ----

-- ---- issue 16, rerate: today's lines streamed into the comparison (sql/install/60_rerate.sql) ----
CREATE OR REPLACE FUNCTION billing._rerate_diff(from_ts timestamptz, to_ts timestamptz, p_account bigint)
    RETURNS TABLE (account_id bigint, invoice_id bigint, line_kind text, meter text,
                   description text, billed_quantity numeric, billed_amount numeric,
                   correct_quantity numeric, correct_amount numeric, delta numeric,
                   segment_start timestamptz, dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
DECLARE
    inv record;     -- the invoices
    bil record;     -- the lines billed, and the adjustments made since
BEGIN
    -- 1. the invoices
    SELECT array_agg(i.account_id ORDER BY i.account_id, i.invoice_id) AS accounts,
           array_agg(i.invoice_id ORDER BY i.account_id, i.invoice_id) AS invoices,
           array_agg(i.period_start ORDER BY i.account_id, i.invoice_id) AS starts
      INTO inv
      FROM billing.invoices i
     WHERE i.status = 'finalized'
       AND i.period_start < to_ts AND i.period_end > from_ts
       AND (p_account IS NULL OR i.account_id = p_account);
    IF inv.accounts IS NULL THEN
        RETURN;
    END IF;
    -- 2. what was billed: the rated lines, and the adjustments made since
    SELECT array_agg(y.account_id) AS accounts, array_agg(y.invoice_id) AS invoices,
           array_agg(y.kind) AS kinds, array_agg(y.meter) AS meters,
           array_agg(y.description) AS descriptions, array_agg(y.quantity) AS quantities,
           array_agg(y.amount) AS amounts, array_agg(y.segment_start) AS segments,
           array_agg(y.dimension) AS dimensions
      INTO bil
      FROM (SELECT l.account_id, l.invoice_id, l.kind, l.meter::text AS meter, l.description,
                   l.quantity, l.amount, l.segment_start, l.dimension::text AS dimension
              FROM unnest(inv.accounts, inv.invoices) v(account_id, invoice_id)
                   JOIN billing.invoice_lines l
                     ON l.account_id = v.account_id AND l.invoice_id = v.invoice_id
             WHERE l.kind IN ('usage', 'fixed', 'cap')
            UNION ALL
            SELECT a.account_id, a.invoice_id, a.line_kind, a.meter::text, a.description,
                   a.new_quantity - a.old_quantity, a.delta, a.segment_start, a.dimension::text
              FROM unnest(inv.accounts, inv.invoices) v(account_id, invoice_id)
                   JOIN billing.adjustments a
                     ON a.account_id = v.account_id AND a.invoice_id = v.invoice_id) y;
    -- 3. compare today's lines of each invoice's period (every plan segment,
    -- the cap; a period no subscription covers any more bills nothing) with
    -- them: in one statement, the lines streamed from _period_build (an
    -- array of them, built and read back, cost 7% of a rerate); it reads
    -- no table
    RETURN QUERY
    WITH invs AS (
        SELECT k.a AS account_id, k.i AS invoice_id, k.s AS period_start
          FROM unnest(inv.accounts, inv.invoices, inv.starts) AS k(a, i, s)
    ), correct AS (
        SELECT invs.account_id, invs.invoice_id, (b.line).kind, (b.line).meter,
               (b.line).description, (b.line).quantity, (b.line).amount,
               (b.line).segment_start, coalesce((b.line).segment_start, invs.period_start) AS seg,
               (b.line).dimension
          FROM billing._period_build(inv.accounts, inv.starts, true) b
               JOIN invs ON invs.account_id = b.account_id AND invs.period_start = b.period_start
    ), billed_sum AS (
        SELECT b.account_id, b.invoice_id, b.kind, b.meter, b.dimension::text AS dimension,
               CASE WHEN b.kind = 'fixed' THEN b.description END AS fixed_key,
               coalesce(b.segment_start, invs.period_start) AS seg,
               max(b.segment_start) AS segment_start, max(b.description) AS description,
               sum(b.quantity) AS quantity, sum(b.amount) AS amount
          FROM unnest(bil.accounts, bil.invoices, bil.kinds, bil.meters, bil.descriptions,
                      bil.quantities, bil.amounts, bil.segments, bil.dimensions)
                   AS b(account_id, invoice_id, kind, meter, description, quantity, amount,
                        segment_start, dimension)
               JOIN invs ON invs.account_id = b.account_id AND invs.invoice_id = b.invoice_id
         GROUP BY 1, 2, 3, 4, 5, 6, 7
    )
    SELECT coalesce(c.account_id, b.account_id), coalesce(c.invoice_id, b.invoice_id),
           coalesce(c.kind, b.kind), coalesce(c.meter, b.meter),
           coalesce(c.description, b.description),
           -- a usage line missing on either side billed or should bill 0 units
           CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(b.quantity, 0) ELSE b.quantity END,
           coalesce(b.amount, 0),
           CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(c.quantity, 0) ELSE c.quantity END,
           coalesce(c.amount, 0),
           coalesce(c.amount, 0) - coalesce(b.amount, 0),
           coalesce(c.segment_start, b.segment_start), coalesce(c.dimension, b.dimension)
      FROM correct c
           FULL JOIN billed_sum b
                  ON b.account_id = c.account_id AND b.invoice_id = c.invoice_id
                 AND b.seg = c.seg AND b.kind = c.kind
                 AND b.meter IS NOT DISTINCT FROM c.meter
                 AND b.dimension IS NOT DISTINCT FROM c.dimension
                 AND b.fixed_key IS NOT DISTINCT FROM CASE WHEN c.kind = 'fixed' THEN c.description END;
END
$$;
-- ---- end of issue 16, rerate comparison ----

-- ---- finalize_invoices and rerate in batches of accounts (sql/install/00_helpers.sql,
-- 50_invoices.sql, 60_rerate.sql) ----
-- One statement over every due period (finalize) or finalized invoice
-- (rerate) held the lines of every account in memory at once: about 4 kB
-- (finalize) and 9 kB (rerate) per account, so gigabytes for a million
-- accounts in one backend, the maintenance worker's with auto_finalize.
-- Both now run p_chunk accounts (1000) per statement.  On Citus,
-- _finalize_citus looked every account's due periods up for each account
-- (quadratic); it now looks up the account's own.  _subscriptions_of is
-- planned with its arguments' values: its generic plan read every
-- subscription for a batch (or one account).  _rate_periods joins
-- without nested loops when it rates more than 16 periods: with meters and
-- charges analyzed, the planner expected a handful of rows per CTE and
-- joined them in nested loops, quadratic in the periods.
/*
 * _chunk_ends: the batches of a job over many accounts (finalize_invoices,
 * rerate), so that its memory is that of a batch, not of every account.
 * Given the accounts of the job's rows in account order, the index of the
 * last row of each run of p_per accounts (at least one): a batch never
 * splits an account's rows.
 */
CREATE FUNCTION billing._chunk_ends(p_accounts bigint[], p_per integer) RETURNS integer[]
    LANGUAGE sql IMMUTABLE STRICT
    SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(y.e ORDER BY y.e), '{}')
      FROM (SELECT max(z.k)::integer AS e
              FROM (SELECT u.k, dense_rank() OVER (ORDER BY u.a) AS r
                      FROM unnest(p_accounts) WITH ORDINALITY AS u(a, k)) z
             GROUP BY (z.r - 1) / greatest(p_per, 1)) y
$$;
COMMENT ON FUNCTION billing._chunk_ends(bigint[], integer) IS
    'Internal: the last index of each run of p_per accounts in an account-ordered array (the batches of finalize_invoices and rerate)';

/*
 * _subscriptions_of: the subscriptions of some accounts (NULL: all), with
 * their plan's period and currency and the start of their grid; with
 * p_invoiced, also the start of the latest invoice whose period overlaps
 * them.  PL/pgSQL, so that Citus routes the query by the accounts' values
 * (the callers compose its rows in queries over functions only).  Always
 * planned with the arguments' values: a generic plan of "p_accounts IS
 * NULL OR account_id = ANY (p_accounts)" reads every subscription, and
 * compares each with every account given.
 */
CREATE OR REPLACE FUNCTION billing._subscriptions_of(p_accounts bigint[], p_invoiced boolean DEFAULT false)
    RETURNS TABLE (account_id bigint, plan text, starts_at timestamptz, ends_at timestamptz,
                   spend_cap numeric, period interval, currency text, anchor timestamptz,
                   last_invoiced timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT s.account_id, s.plan::text, s.starts_at, s.ends_at, s.spend_cap, p.period, p.currency,
           coalesce(s.period_anchor, s.starts_at),
           CASE WHEN p_invoiced THEN
               (SELECT max(i.period_start) FROM billing.invoices i
                 WHERE i.account_id = s.account_id AND i.period_start < coalesce(s.ends_at, 'infinity')
                   AND i.period_end > s.starts_at) END
      FROM billing.subscriptions s JOIN billing.plans p ON p.plan = s.plan
     WHERE p_accounts IS NULL OR s.account_id = ANY (p_accounts);
END
$$;
COMMENT ON FUNCTION billing._subscriptions_of(bigint[], boolean) IS
    'Internal: subscriptions of some accounts (NULL: all) with period, currency, grid start and (p_invoiced) the latest overlapping invoice';

CREATE OR REPLACE FUNCTION billing._rate_periods(p_accounts bigint[], p_plans text[], p_currencies text[],
                                      p_caps numeric[], p_starts timestamptz[],
                                      p_ends timestamptz[])
    RETURNS TABLE (idx integer, ord integer, kind text, meter text, description text,
                   quantity numeric, amount numeric, unrounded_amount numeric,
                   charge_id bigint, price billing.price, dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run; the plan
    -- cache mode and enable_nestloop are levels to change them on, for
    -- this call only
    SET jit = off SET plan_cache_mode = auto SET enable_nestloop = on AS $$
BEGIN
    -- A few periods (a preview): one generic plan per session (for one
    -- account a custom plan, the arrays' lengths known, always looked
    -- cheaper, and planning it took longer than running it).  Many
    -- (finalize, rerate): custom plans.  See _plan_cache_for.
    PERFORM billing._plan_cache_for(cardinality(p_accounts));
    -- Many periods: no nested loops.  Once ANALYZE has seen the few rows of
    -- meters and charges, the planner expects a handful of rows from the
    -- CTEs below that hold one or more per period, and joins them in nested
    -- loops: quadratic in the periods (re-rating 10,000 accounts took 62 s
    -- in one statement, 9 s in batches of 1,000, and 1.3 s without them).
    IF cardinality(p_accounts) > 16 THEN
        PERFORM pg_catalog.set_config('enable_nestloop', 'off', true);
    END IF;
    RETURN QUERY
    WITH per AS (
        SELECT x.i::integer AS idx, x.pl AS plan, x.cur AS currency, x.cap, x.s AS ps
          FROM unnest(p_plans, p_currencies, p_caps, p_starts) WITH ORDINALITY AS x(pl, cur, cap, s, i)
    ), versions AS (
        -- the charge versions in force, once per (plan, period start) however
        -- many accounts share them, numbered in invoice order: fixed fees by
        -- description, then usage by description, meter and dimension (the
        -- spend cap comes last)
        SELECT v.*, (row_number() OVER (PARTITION BY v.plan, v.ps
                                        ORDER BY v.grp, v.description, v.meter,
                                                 v.dimension NULLS FIRST))::integer AS ord,
               (count(*) OVER (PARTITION BY v.plan, v.ps))::integer AS n_lines
          FROM (SELECT DISTINCT ON (k.plan, k.ps, c.meter, c.dimension,
                                    CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END)
                       k.plan, k.ps, c.charge_id, c.meter::text AS meter,
                       c.dimension::text AS dimension,
                       coalesce(c.description,
                                CASE WHEN c.dimension IS NULL THEN c.meter::text
                                     ELSE format('%s (%s)', c.meter, c.dimension) END) AS description,
                       c.price,
                       CASE WHEN c.meter IS NULL THEN 1 ELSE 2 END AS grp
                  FROM (SELECT DISTINCT per.plan, per.ps FROM per) k
                       JOIN billing.charges c ON c.plan = k.plan AND c.valid_from <= k.ps
                 ORDER BY k.plan, k.ps, c.meter, c.dimension,
                          CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END,
                          c.valid_from DESC) v
    ), widths AS (
        -- the bucket widths of the meters each (plan, period start) charges
        SELECT DISTINCT v.plan, v.ps, m.bucket_width
          FROM versions v JOIN billing.meters m ON m.meter = v.meter
    ), firsts AS (
        -- a metered charge of a period bills the buckets of its meter that
        -- start in [lo, period end), lo by the one rule of src/periods.c
        -- for the meter's bucket width: the bucket straddling a
        -- subscription's start goes to its first period, every other one
        -- to the period holding its start
        SELECT per.idx, w.bucket_width,
               billing._period_first_bucket(per.ps, uf.usage_from, w.bucket_width) AS lo
          FROM per JOIN widths w ON w.plan = per.plan AND w.ps = per.ps
               JOIN billing._period_usage_from(p_accounts, p_starts) uf ON uf.idx = per.idx
    ), reads AS (
        -- one read of the usage store per period and distinct lo (more than
        -- one only in a first period whose meters' buckets straddle its
        -- start at different points)
        SELECT r.idx, r.lo, (row_number() OVER (ORDER BY r.idx, r.lo))::integer AS j
          FROM (SELECT DISTINCT f.idx, f.lo FROM firsts f) r
    ), charged AS (
        -- the usage charges of each read (those of its period whose
        -- meter's bucket width gives its lo), for the totals: a matrix
        -- charge's dimension is totalled apart
        SELECT array_agg(rd.j) AS i, array_agg(v.meter) AS m, array_agg(v.dimension) AS d
          FROM reads rd JOIN per ON per.idx = rd.idx
               JOIN versions v ON v.plan = per.plan AND v.ps = per.ps AND v.meter IS NOT NULL
               JOIN billing.meters m ON m.meter = v.meter
               JOIN firsts f ON f.idx = rd.idx AND f.lo = rd.lo AND f.bucket_width = m.bucket_width
    ), totals AS MATERIALIZED (
        -- (read once: inlined, the join below would read the store per line)
        -- each meter from the read whose lo is that of its bucket width
        SELECT rd.idx, t.meter, t.dimension, t.quantity
          FROM (SELECT array_agg(p_accounts[rd.idx] ORDER BY rd.j) AS accounts,
                       array_agg(rd.lo ORDER BY rd.j) AS starts,
                       array_agg(p_ends[rd.idx] ORDER BY rd.j) AS ends
                  FROM reads rd) a, charged c,
               LATERAL billing._usage_totals_many(a.accounts, a.starts, a.ends, c.i, c.m, c.d) t
               JOIN reads rd ON rd.j = t.idx
               JOIN billing.meters m ON m.meter = t.meter
               JOIN firsts f ON f.idx = rd.idx AND f.lo = rd.lo AND f.bucket_width = m.bucket_width
    ), rated AS (
        SELECT per.idx, per.currency, v.ord, v.n_lines, v.grp,
               CASE WHEN v.meter IS NULL THEN 'fixed' ELSE 'usage' END AS kind,
               v.meter, v.description,
               CASE WHEN v.meter IS NULL THEN NULL ELSE coalesce(t.quantity, 0) END AS quantity,
               billing.rate(v.price, CASE WHEN v.meter IS NULL THEN 0 ELSE coalesce(t.quantity, 0) END)
                   AS unrounded_amount,
               v.charge_id, v.price, v.dimension
          FROM per JOIN versions v ON v.plan = per.plan AND v.ps = per.ps
               LEFT JOIN totals t ON t.idx = per.idx AND t.meter = v.meter
                                 AND t.dimension IS NOT DISTINCT FROM v.dimension
    ), lines AS (
        SELECT r.*, billing.round_money(r.unrounded_amount, r.currency) AS amount FROM rated r
    ), capped AS (
        SELECT per.idx, max(l.n_lines) + 1 AS ord, 'cap'::text AS kind, NULL::text AS meter,
               'spend cap'::text AS description, NULL::numeric AS quantity,
               NULL::numeric AS unrounded_amount, NULL::bigint AS charge_id,
               NULL::billing.price AS price, NULL::text AS dimension,
               billing._cap_amount(per.cap, per.currency, sum(l.amount)) AS amount
          FROM per JOIN lines l ON l.idx = per.idx AND l.kind = 'usage'
         WHERE per.cap IS NOT NULL
         GROUP BY per.idx, per.cap, per.currency
        HAVING billing._cap_amount(per.cap, per.currency, sum(l.amount)) IS NOT NULL
    )
    SELECT l.idx, l.ord, l.kind, l.meter, l.description, l.quantity, l.amount,
           l.unrounded_amount, l.charge_id, l.price, l.dimension
      FROM lines l
    UNION ALL
    SELECT c.idx, c.ord, c.kind, c.meter, c.description, c.quantity, c.amount,
           c.unrounded_amount, c.charge_id, c.price, c.dimension
      FROM capped c;
END
$$;
COMMENT ON FUNCTION billing._rate_periods(bigint[], text[], text[], numeric[], timestamptz[], timestamptz[]) IS
    'Internal: the rated lines (fixed fees, usage per meter and dimension, spend cap) of many billing periods';

DROP FUNCTION billing._due_periods(timestamptz);
/*
 * _due_periods: the billing periods that ended at or before cutoff and have
 * no invoice, one row per plan segment (_segments: a period with a plan
 * change has two), of some accounts (NULL: every account).  Each
 * subscription is walked from the period after the latest invoice
 * overlapping it, up to the one holding cutoff, so that a period one of
 * whose segments has not ended is seen whole and is not due.  PL/pgSQL:
 * Citus plans the queries with cutoff's value.
 */
CREATE FUNCTION billing._due_periods(cutoff timestamptz, p_accounts bigint[] DEFAULT NULL)
    RETURNS TABLE (account_id bigint, plan text, currency text, spend_cap numeric,
                   period_start timestamptz, period_end timestamptz, segment_plan text,
                   segment_start timestamptz, segment_end timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
DECLARE
    accs bigint[];
    ats timestamptz[];
BEGIN
    WITH subs AS (
        SELECT * FROM billing._subscriptions_of(p_accounts, true)
    ), walk AS (
        SELECT s.*, billing._period_index(s.anchor, s.period, s.starts_at) AS n_first,
               billing._period_index(s.anchor, s.period, s.last_invoiced) + 1 AS n_next,
               billing._period_index(s.anchor, s.period,
                   least(coalesce(s.ends_at, 'infinity') - interval '1 microsecond', cutoff)) AS n_last
          FROM subs s
    )
    SELECT array_agg(w.account_id ORDER BY w.account_id, n), 
           array_agg(greatest(billing._add_periods(w.anchor, w.period, n), w.starts_at)
                     ORDER BY w.account_id, n)
      INTO accs, ats
      FROM walk w, generate_series(greatest(w.n_first, coalesce(w.n_next, w.n_first)), w.n_last) n
     WHERE billing._add_periods(w.anchor, w.period, w.n_first) < cutoff;
    IF accs IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT y.account_id, y.invoice_plan, y.currency, y.cap, y.period_start, y.period_end,
           y.plan, y.segment_start, y.segment_end
      FROM (SELECT x.*, first_value(x.segment_start) OVER w AS period_start,
                   last_value(x.segment_end) OVER w AS period_end,
                   last_value(x.spend_cap) OVER w AS cap, last_value(x.plan) OVER w AS invoice_plan
              FROM (SELECT DISTINCT ON (s.account_id, s.grid_start, s.segment_start) s.*
                      FROM billing._segments(accs, ats) s
                     ORDER BY s.account_id, s.grid_start, s.segment_start) x
            WINDOW w AS (PARTITION BY x.account_id, x.grid_start ORDER BY x.segment_start
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) y
     WHERE y.period_end <= cutoff
     ORDER BY y.account_id, y.period_start, y.segment_start;
END
$$;
COMMENT ON FUNCTION billing._due_periods(timestamptz, bigint[]) IS
    'Internal: billing periods ended by a cutoff that have no invoice yet, one row per plan segment, of some accounts (NULL: all)';

DROP FUNCTION billing._finalize(timestamptz);
/*
 * finalize_invoices: the accounts with a subscription, p_chunk at a time in
 * account order: lock those with due periods (row locks, in account order),
 * look their due periods up again under the locks (a concurrent finalizer
 * may have written some), then write every invoice, its lines, the
 * adjustments it carries, the credit ledger's draws, expiries and
 * rollovers and the rollover grants in one set-based statement over
 * _invoice_build (which on Citus _finalize_citus calls one period at a
 * time).  A batch's memory is freed before the next one: a run over a
 * million accounts needs the memory of p_chunk of them (and 8 bytes per
 * account for the list), not of a million.  Each account's pending
 * adjustments go on its earliest new invoice.  Rollover grants get their
 * ids here (the build names them -1, -2, ...); ledger seqs continue each
 * account's.
 */
CREATE FUNCTION billing._finalize(p_as_of timestamptz, p_chunk integer DEFAULT 1000)
    RETURNS TABLE (r_invoice_id bigint, r_account_id bigint, r_period_start timestamptz,
                   r_period_end timestamptz, r_total numeric)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
DECLARE
    cutoff timestamptz;
    accs bigint[];      -- the accounts with a subscription, in order
    batch bigint[];     -- p_chunk of them
    chunk bigint[];     -- those of the batch with due periods, locked
    lo integer := 1;
    hi integer;
BEGIN
    IF p_as_of IS NULL THEN
        RAISE EXCEPTION 'finalize_invoices: as_of must not be null' USING ERRCODE = '22004';
    END IF;
    -- never a period that ends after now() - grace, whatever as_of says
    -- (a future or infinite as_of would finalize periods still open)
    cutoff := LEAST(p_as_of, pg_catalog.now()) - billing._grace_period();
    -- on Citus these statements may not call functions that read the
    -- shards: the same invoices, one period at a time (_finalize_citus)
    IF billing._citus_table_kind('billing.invoices') IS NOT NULL THEN
        RETURN QUERY SELECT * FROM billing._finalize_citus(cutoff);
        RETURN;
    END IF;
    SELECT array_agg(DISTINCT s.account_id ORDER BY s.account_id) INTO accs
      FROM billing.subscriptions s;
    IF accs IS NULL THEN
        RETURN;
    END IF;

    -- the invoices' audit rows (a trigger deferred to the commit, for
    -- Citus: 70_audit.sql) written at the end of each statement that
    -- writes invoices and their lines
    SET CONSTRAINTS billing.invoices_audit IMMEDIATE;
    FOREACH hi IN ARRAY billing._chunk_ends(accs, p_chunk) LOOP
        batch := accs[lo:hi];
        lo := hi + 1;
        SELECT array_agg(l.account_id ORDER BY l.account_id) INTO chunk
          FROM (SELECT a.account_id FROM billing.accounts a
                 WHERE a.account_id IN (SELECT d.account_id FROM billing._due_periods(cutoff, batch) d)
                 ORDER BY a.account_id
                   FOR NO KEY UPDATE) l;
        CONTINUE WHEN chunk IS NULL;
        RETURN QUERY
        WITH d AS MATERIALIZED (
            SELECT * FROM billing._due_periods(cutoff, chunk)
        ), due AS (
            SELECT p.*, nextval('billing.invoice_id_seq') AS invoice_id,
                   (row_number() OVER (ORDER BY p.account_id, p.period_start))::integer AS k,
                   row_number() OVER (PARTITION BY p.account_id ORDER BY p.period_start) = 1 AS first_of_account
              FROM (SELECT DISTINCT d.account_id, d.plan, d.currency, d.spend_cap, d.period_start,
                           d.period_end FROM d) p
        ), pa AS (
            SELECT array_agg(due.account_id ORDER BY due.k) AS accounts,
                   array_agg(due.currency ORDER BY due.k) AS currencies,
                   array_agg(due.spend_cap ORDER BY due.k) AS caps,
                   array_agg(due.period_start ORDER BY due.k) AS starts,
                   array_agg(due.period_end ORDER BY due.k) AS ends,
                   array_agg(due.first_of_account ORDER BY due.k) AS firsts
              FROM due
        ), sa AS (
            SELECT array_agg(due.k ORDER BY due.k, d.segment_start) AS idx,
                   array_agg(d.segment_plan ORDER BY due.k, d.segment_start) AS plans,
                   array_agg(d.segment_start ORDER BY due.k, d.segment_start) AS starts,
                   array_agg(d.segment_end ORDER BY due.k, d.segment_start) AS ends
              FROM d JOIN due ON due.account_id = d.account_id AND due.period_start = d.period_start
        ), built AS MATERIALIZED (
            SELECT due.account_id, due.invoice_id, x.*
              FROM pa, sa,
                   LATERAL billing._invoice_build(pa.accounts, pa.currencies, pa.caps, pa.starts, pa.ends,
                                                  pa.firsts, sa.idx, sa.plans, sa.starts, sa.ends,
                                                  false, true) x
                   JOIN due ON due.k = x.idx
        ), new_grants AS MATERIALIZED (
            SELECT b.account_id, b.grant_id AS placeholder,
                   nextval('billing.credit_grant_id_seq') AS grant_id, b.amount, b.effective_at,
                   b.expires_at, b.source_grant
              FROM built b WHERE b.kind = 'grant'
        ), mapped AS (
            SELECT b.*, coalesce(ng.grant_id, b.grant_id) AS real_grant_id
              FROM built b LEFT JOIN new_grants ng
                     ON ng.account_id = b.account_id AND ng.placeholder = b.grant_id
        ), numbered AS (
            SELECT m.*, (row_number() OVER (PARTITION BY m.invoice_id ORDER BY m.ord))::integer AS line_no
              FROM mapped m
             WHERE billing._is_invoice_line(m.kind)
        ), totals AS (
            SELECT n.invoice_id, sum(n.amount) AS total FROM numbered n GROUP BY n.invoice_id
        ), invoices_written AS (
            INSERT INTO billing.invoices (account_id, invoice_id, plan, period_start, period_end,
                                          currency, total)
            SELECT due.account_id, due.invoice_id, due.plan, due.period_start, due.period_end,
                   due.currency, coalesce(t.total, 0)
              FROM due LEFT JOIN totals t ON t.invoice_id = due.invoice_id
            RETURNING billing.invoices.invoice_id, billing.invoices.account_id,
                      billing.invoices.period_start, billing.invoices.period_end,
                      billing.invoices.total
        ), lines_written AS (
            INSERT INTO billing.invoice_lines (account_id, invoice_id, line_no, kind, meter,
                                              description, quantity, amount, unrounded_amount,
                                              charge_id, price, adjustment_id, segment_start,
                                              segment_end, proration, commitment_id, grant_id, dimension)
            SELECT n.account_id, n.invoice_id, n.line_no, n.kind, n.meter, n.description, n.quantity,
                   n.amount, n.unrounded_amount, n.charge_id, n.price, n.adjustment_id,
                   n.segment_start, n.segment_end, n.proration, n.commitment_id, n.real_grant_id,
                   n.dimension
              FROM numbered n
            RETURNING billing.invoice_lines.account_id, billing.invoice_lines.invoice_id,
                      billing.invoice_lines.adjustment_id
        ), grants_written AS (
            INSERT INTO billing.credit_grants (account_id, grant_id, amount, effective_at, expires_at,
                                               priority, applies_to, source, reason, commitment_id,
                                               window_no, rolled_from)
            SELECT ng.account_id, ng.grant_id, ng.amount, ng.effective_at, ng.expires_at, g.priority,
                   g.applies_to, 'rollover', format('rollover of grant %s', g.grant_id),
                   g.commitment_id, g.window_no + 1, g.grant_id
              FROM new_grants ng
                   JOIN billing.credit_grants g
                     ON g.account_id = ng.account_id AND g.grant_id = ng.source_grant
            RETURNING 1
        ), ledger_written AS (
            INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at,
                                               invoice_id)
            SELECT m.account_id,
                   h.seq + row_number() OVER (PARTITION BY m.account_id ORDER BY m.idx, m.ord),
                   m.real_grant_id, billing._ledger_kind(m.kind), m.amount,
                   m.effective_at, CASE WHEN m.kind = 'credit' THEN m.invoice_id END
              FROM mapped m
                   CROSS JOIN LATERAL (SELECT coalesce(max(x.seq), 0) AS seq FROM billing.credit_ledger x
                                        WHERE x.account_id = m.account_id) h
             WHERE billing._ledger_kind(m.kind) IS NOT NULL
            RETURNING 1
        ), carried AS (
            UPDATE billing.adjustments adj SET billed_invoice_id = w.invoice_id
              FROM lines_written w
             WHERE w.adjustment_id IS NOT NULL AND adj.account_id = w.account_id
               AND adj.adjustment_id = w.adjustment_id
            RETURNING 1
        )
        SELECT w.invoice_id, w.account_id, w.period_start, w.period_end, w.total
          FROM invoices_written w
         ORDER BY w.account_id, w.period_start;
    END LOOP;
    SET CONSTRAINTS billing.invoices_audit DEFERRED;
END
$$;
COMMENT ON FUNCTION billing._finalize(timestamptz, integer) IS
    'Internal: the body of finalize_invoices, p_chunk accounts per statement';

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
CREATE OR REPLACE FUNCTION billing._finalize_citus(cutoff timestamptz)
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
              FROM billing._due_periods(cutoff, ARRAY[acc]) d
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
             WHERE billing._is_invoice_line(x.kind);
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
             WHERE billing._is_invoice_line(x.kind);
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
                   billing._ledger_kind(x.kind), x.amount, x.effective_at,
                   CASE WHEN x.kind = 'credit' THEN inv END
              FROM unnest(b) x
             WHERE billing._ledger_kind(x.kind) IS NOT NULL;
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

DROP FUNCTION billing._rerate_diff(timestamptz, timestamptz, bigint);
/*
 * _rerate_diff: for each finalized invoice overlapping [from_ts, to_ts) (of
 * one account or all), what its lines should be today, what was billed
 * (the line plus the adjustments already recorded for it), and the
 * difference.  Lines are matched by plan segment (a period with a plan
 * change has two; NULL: the whole period) and kind, meter and dimension
 * (usage), description (fixed fees) or kind alone (the spend cap); a usage
 * line missing on one side counts 0 units there.  Commitment, true-up and
 * credit lines are never re-rated.  One body on one node and on Citus: the
 * tables are read by plain statements (routed by the accounts on Citus),
 * today's lines by _period_build (functions only), and the comparison
 * reads no table.  The invoices are compared p_chunk accounts at a time:
 * a re-rate of every account needs the memory of p_chunk of them.
 */
CREATE FUNCTION billing._rerate_diff(from_ts timestamptz, to_ts timestamptz, p_account bigint,
                                     p_chunk integer DEFAULT 1000)
    RETURNS TABLE (account_id bigint, invoice_id bigint, line_kind text, meter text,
                   description text, billed_quantity numeric, billed_amount numeric,
                   correct_quantity numeric, correct_amount numeric, delta numeric,
                   segment_start timestamptz, dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
DECLARE
    inv record;     -- the invoices
    bil record;     -- the lines billed, and the adjustments made since
    c_accounts bigint[];        -- the invoices of a batch of accounts
    c_invoices bigint[];
    c_starts timestamptz[];
    lo integer := 1;
    hi integer;
BEGIN
    -- 1. the invoices
    SELECT array_agg(i.account_id ORDER BY i.account_id, i.invoice_id) AS accounts,
           array_agg(i.invoice_id ORDER BY i.account_id, i.invoice_id) AS invoices,
           array_agg(i.period_start ORDER BY i.account_id, i.invoice_id) AS starts
      INTO inv
      FROM billing.invoices i
     WHERE i.status = 'finalized'
       AND i.period_start < to_ts AND i.period_end > from_ts
       AND (p_account IS NULL OR i.account_id = p_account);
    IF inv.accounts IS NULL THEN
        RETURN;
    END IF;
    FOREACH hi IN ARRAY billing._chunk_ends(inv.accounts, p_chunk) LOOP
        c_accounts := inv.accounts[lo:hi];
        c_invoices := inv.invoices[lo:hi];
        c_starts := inv.starts[lo:hi];
        lo := hi + 1;
        -- 2. what was billed: the rated lines, and the adjustments made since
        SELECT array_agg(y.account_id) AS accounts, array_agg(y.invoice_id) AS invoices,
               array_agg(y.kind) AS kinds, array_agg(y.meter) AS meters,
               array_agg(y.description) AS descriptions, array_agg(y.quantity) AS quantities,
               array_agg(y.amount) AS amounts, array_agg(y.segment_start) AS segments,
               array_agg(y.dimension) AS dimensions
          INTO bil
          FROM (SELECT l.account_id, l.invoice_id, l.kind, l.meter::text AS meter, l.description,
                       l.quantity, l.amount, l.segment_start, l.dimension::text AS dimension
                  FROM unnest(c_accounts, c_invoices) v(account_id, invoice_id)
                       JOIN billing.invoice_lines l
                         ON l.account_id = v.account_id AND l.invoice_id = v.invoice_id
                 WHERE l.kind IN ('usage', 'fixed', 'cap')
                UNION ALL
                SELECT a.account_id, a.invoice_id, a.line_kind, a.meter::text, a.description,
                       a.new_quantity - a.old_quantity, a.delta, a.segment_start, a.dimension::text
                  FROM unnest(c_accounts, c_invoices) v(account_id, invoice_id)
                       JOIN billing.adjustments a
                         ON a.account_id = v.account_id AND a.invoice_id = v.invoice_id) y;
        -- 3. compare today's lines of each invoice's period (every plan segment,
        -- the cap; a period no subscription covers any more bills nothing) with
        -- them: in one statement, the lines streamed from _period_build (an
        -- array of them, built and read back, cost 7% of a rerate); it reads
        -- no table
        RETURN QUERY
        WITH invs AS (
            SELECT k.a AS account_id, k.i AS invoice_id, k.s AS period_start
              FROM unnest(c_accounts, c_invoices, c_starts) AS k(a, i, s)
        ), correct AS (
            SELECT invs.account_id, invs.invoice_id, (b.line).kind, (b.line).meter,
                   (b.line).description, (b.line).quantity, (b.line).amount,
                   (b.line).segment_start, coalesce((b.line).segment_start, invs.period_start) AS seg,
                   (b.line).dimension
              FROM billing._period_build(c_accounts, c_starts, true) b
                   JOIN invs ON invs.account_id = b.account_id AND invs.period_start = b.period_start
        ), billed_sum AS (
            SELECT b.account_id, b.invoice_id, b.kind, b.meter, b.dimension::text AS dimension,
                   CASE WHEN b.kind = 'fixed' THEN b.description END AS fixed_key,
                   coalesce(b.segment_start, invs.period_start) AS seg,
                   max(b.segment_start) AS segment_start, max(b.description) AS description,
                   sum(b.quantity) AS quantity, sum(b.amount) AS amount
              FROM unnest(bil.accounts, bil.invoices, bil.kinds, bil.meters, bil.descriptions,
                          bil.quantities, bil.amounts, bil.segments, bil.dimensions)
                       AS b(account_id, invoice_id, kind, meter, description, quantity, amount,
                            segment_start, dimension)
                   JOIN invs ON invs.account_id = b.account_id AND invs.invoice_id = b.invoice_id
             GROUP BY 1, 2, 3, 4, 5, 6, 7
        )
        SELECT coalesce(c.account_id, b.account_id), coalesce(c.invoice_id, b.invoice_id),
               coalesce(c.kind, b.kind), coalesce(c.meter, b.meter),
               coalesce(c.description, b.description),
               -- a usage line missing on either side billed or should bill 0 units
               CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(b.quantity, 0) ELSE b.quantity END,
               coalesce(b.amount, 0),
               CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(c.quantity, 0) ELSE c.quantity END,
               coalesce(c.amount, 0),
               coalesce(c.amount, 0) - coalesce(b.amount, 0),
               coalesce(c.segment_start, b.segment_start), coalesce(c.dimension, b.dimension)
          FROM correct c
               FULL JOIN billed_sum b
                      ON b.account_id = c.account_id AND b.invoice_id = c.invoice_id
                     AND b.seg = c.seg AND b.kind = c.kind
                     AND b.meter IS NOT DISTINCT FROM c.meter
                     AND b.dimension IS NOT DISTINCT FROM c.dimension
                     AND b.fixed_key IS NOT DISTINCT FROM CASE WHEN c.kind = 'fixed' THEN c.description END;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._rerate_diff(timestamptz, timestamptz, bigint, integer) IS
    'Internal: billed versus correct lines of the finalized invoices overlapping a range, p_chunk accounts at a time';

REVOKE ALL ON FUNCTION
    billing._chunk_ends(bigint[], integer),
    billing._due_periods(timestamptz, bigint[]),
    billing._finalize(timestamptz, integer),
    billing._rerate_diff(timestamptz, timestamptz, bigint, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    billing._chunk_ends(bigint[], integer),
    billing._due_periods(timestamptz, bigint[]),
    billing._finalize(timestamptz, integer),
    billing._rerate_diff(timestamptz, timestamptz, bigint, integer)
    TO billing_reader;
-- ---- end of batches of accounts ----

-- ---- audit rows of row triggers written once per statement (sql/install/70_audit.sql,
-- 55_contracts.sql) ----
-- The row triggers of invoices, the credit ledger and the audited catalog
-- tables wrote their audit row and the chain's head once per row (a
-- statement of its own for each head).  They now hash the row into its
-- chain at once and leave the writing to a statement trigger on the table,
-- as the triggers of audited user tables (audit_table) always did.
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

REVOKE ALL ON FUNCTION billing._audit_append_deferred(bigint, text, text, jsonb, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._audit_append_deferred(bigint, text, text, jsonb, boolean) TO billing_reader;
CREATE OR REPLACE FUNCTION billing._audit_change() RETURNS trigger
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

CREATE OR REPLACE FUNCTION billing._audit_invoice() RETURNS trigger
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

CREATE OR REPLACE FUNCTION billing._audit_credit() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    d jsonb := to_jsonb(NEW);
BEGIN
    IF billing._audit_suspended() THEN
        RETURN NULL;
    END IF;
    IF NEW.kind IN ('grant', 'void') THEN
        d := d || jsonb_build_object('credit_grant',
                       (SELECT to_jsonb(g) FROM billing.credit_grants g
                         WHERE g.account_id = NEW.account_id AND g.grant_id = NEW.grant_id));
    END IF;
    PERFORM billing._audit_append_deferred(NEW.account_id, NEW.kind, format('credit_grant:%s', NEW.grant_id),
                                           d);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION billing._audit_credit() IS
    'Internal: writes the audit row of a credit ledger entry (action: its kind)';

-- _audit_ddl dropped every _audit_statement trigger on a table outside an
-- audited table's partition tree: now only those audit_table made
CREATE OR REPLACE FUNCTION billing._audit_ddl() RETURNS event_trigger
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

SELECT billing._update_ddl('billing.meters', ARRAY[
    $ddl$CREATE TRIGGER meters_audit_flush AFTER INSERT OR UPDATE OR DELETE ON billing.meters
        FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement()$ddl$
]);
SELECT billing._update_ddl('billing.plans', ARRAY[
    $ddl$CREATE TRIGGER plans_audit_flush AFTER INSERT OR UPDATE OR DELETE ON billing.plans
        FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement()$ddl$
]);
SELECT billing._update_ddl('billing.charges', ARRAY[
    $ddl$CREATE TRIGGER charges_audit_flush AFTER INSERT OR UPDATE OR DELETE ON billing.charges
        FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement()$ddl$
]);
SELECT billing._update_ddl('billing.metered_tables', ARRAY[
    $ddl$CREATE TRIGGER metered_tables_audit_flush AFTER INSERT OR UPDATE OR DELETE ON billing.metered_tables
        FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement()$ddl$
]);
SELECT billing._update_ddl('billing.accounts', ARRAY[
    $ddl$CREATE TRIGGER accounts_audit_flush AFTER INSERT OR UPDATE OR DELETE ON billing.accounts
        FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement()$ddl$
]);
SELECT billing._update_ddl('billing.subscriptions', ARRAY[
    $ddl$CREATE TRIGGER subscriptions_audit_flush AFTER INSERT OR UPDATE OR DELETE ON billing.subscriptions
        FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement()$ddl$
]);
SELECT billing._update_ddl('billing.invoices', ARRAY[
    $ddl$CREATE TRIGGER invoices_audit_flush AFTER INSERT ON billing.invoices
        FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement()$ddl$
]);
SELECT billing._update_ddl('billing.credit_ledger', ARRAY[
    $ddl$CREATE TRIGGER credit_ledger_audit_flush AFTER INSERT ON billing.credit_ledger
        FOR EACH STATEMENT EXECUTE FUNCTION billing._audit_statement()$ddl$
]);
-- ---- end of audit rows written once per statement ----

-- ---- one definition of "many periods" (sql/install/00_helpers.sql, 50_invoices.sql) ----
-- _rate_periods turned nested loops off by its own count of periods, beside
-- _plan_cache_for's: _plan_cache_for now sets both (p_hash_joins).
DROP FUNCTION billing._plan_cache_for(integer, boolean);
/*
 * _plan_cache_for: the planner settings for the statements that rate or
 * build p_periods billing periods, set with set_config(..., true) at the
 * caller's level: the caller declares SET plan_cache_mode = auto (and SET
 * enable_nestloop = on with p_hash_joins), so the settings end with its
 * call.  (This function has no SET clause of its own, which would end them
 * with this call.)  The one rule for every rating path, and the one place
 * that says what "many periods" is:
 *   - more than 16 periods (finalize, rerate): custom plans, which know
 *     the arrays' sizes (a generic plan takes each array for 10 rows and
 *     may join them in loops); and with p_hash_joins no nested loops
 *     (_rate_periods: once ANALYZE has seen the few rows of meters and
 *     charges, the planner expects a handful of rows from CTEs that hold
 *     one or more per period and joins them in nested loops, quadratic in
 *     the periods);
 *   - at most 16 (a preview, remaining), without Citus and with p_generic:
 *     one generic plan per statement and session (planning the statements
 *     anew took longer than running them for one account);
 *   - otherwise the caller's mode: with Citus loaded, which plans
 *     distributed statements with their parameters' values.
 */
CREATE FUNCTION billing._plan_cache_for(p_periods integer, p_generic boolean DEFAULT true,
                                        p_hash_joins boolean DEFAULT false)
    RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    IF p_periods > 16 THEN
        PERFORM pg_catalog.set_config('plan_cache_mode', 'force_custom_plan', true);
        IF p_hash_joins THEN
            PERFORM pg_catalog.set_config('enable_nestloop', 'off', true);
        END IF;
    ELSIF p_generic AND pg_catalog.current_setting('citus.version', true) IS NULL THEN
        PERFORM pg_catalog.set_config('plan_cache_mode', 'force_generic_plan', true);
    END IF;
END
$$;
COMMENT ON FUNCTION billing._plan_cache_for(integer, boolean, boolean) IS
    'Internal: sets plan_cache_mode (and enable_nestloop) for the rest of the caller''s call, from the number of periods it rates';

REVOKE ALL ON FUNCTION billing._plan_cache_for(integer, boolean, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._plan_cache_for(integer, boolean, boolean) TO billing_reader;
CREATE OR REPLACE FUNCTION billing._rate_periods(p_accounts bigint[], p_plans text[], p_currencies text[],
                                      p_caps numeric[], p_starts timestamptz[],
                                      p_ends timestamptz[])
    RETURNS TABLE (idx integer, ord integer, kind text, meter text, description text,
                   quantity numeric, amount numeric, unrounded_amount numeric,
                   charge_id bigint, price billing.price, dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run; the plan
    -- cache mode and enable_nestloop are levels to change them on, for
    -- this call only
    SET jit = off SET plan_cache_mode = auto SET enable_nestloop = on AS $$
BEGIN
    -- A few periods (a preview): one generic plan per session (for one
    -- account a custom plan, the arrays' lengths known, always looked
    -- cheaper, and planning it took longer than running it).  Many
    -- (finalize, rerate): custom plans, and no nested loops: with meters
    -- and charges analyzed the planner expects a handful of rows from the
    -- CTEs below, which hold one or more per period, and joined them in
    -- nested loops, quadratic in the periods (re-rating 10,000 accounts
    -- took 62 s in one statement, 9 s in batches of 1,000, and 1.3 s
    -- without them).  See _plan_cache_for.
    PERFORM billing._plan_cache_for(cardinality(p_accounts), p_hash_joins => true);
    RETURN QUERY
    WITH per AS (
        SELECT x.i::integer AS idx, x.pl AS plan, x.cur AS currency, x.cap, x.s AS ps
          FROM unnest(p_plans, p_currencies, p_caps, p_starts) WITH ORDINALITY AS x(pl, cur, cap, s, i)
    ), versions AS (
        -- the charge versions in force, once per (plan, period start) however
        -- many accounts share them, numbered in invoice order: fixed fees by
        -- description, then usage by description, meter and dimension (the
        -- spend cap comes last)
        SELECT v.*, (row_number() OVER (PARTITION BY v.plan, v.ps
                                        ORDER BY v.grp, v.description, v.meter,
                                                 v.dimension NULLS FIRST))::integer AS ord,
               (count(*) OVER (PARTITION BY v.plan, v.ps))::integer AS n_lines
          FROM (SELECT DISTINCT ON (k.plan, k.ps, c.meter, c.dimension,
                                    CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END)
                       k.plan, k.ps, c.charge_id, c.meter::text AS meter,
                       c.dimension::text AS dimension,
                       coalesce(c.description,
                                CASE WHEN c.dimension IS NULL THEN c.meter::text
                                     ELSE format('%s (%s)', c.meter, c.dimension) END) AS description,
                       c.price,
                       CASE WHEN c.meter IS NULL THEN 1 ELSE 2 END AS grp
                  FROM (SELECT DISTINCT per.plan, per.ps FROM per) k
                       JOIN billing.charges c ON c.plan = k.plan AND c.valid_from <= k.ps
                 ORDER BY k.plan, k.ps, c.meter, c.dimension,
                          CASE WHEN c.meter IS NULL THEN coalesce(c.description, '') END,
                          c.valid_from DESC) v
    ), widths AS (
        -- the bucket widths of the meters each (plan, period start) charges
        SELECT DISTINCT v.plan, v.ps, m.bucket_width
          FROM versions v JOIN billing.meters m ON m.meter = v.meter
    ), firsts AS (
        -- a metered charge of a period bills the buckets of its meter that
        -- start in [lo, period end), lo by the one rule of src/periods.c
        -- for the meter's bucket width: the bucket straddling a
        -- subscription's start goes to its first period, every other one
        -- to the period holding its start
        SELECT per.idx, w.bucket_width,
               billing._period_first_bucket(per.ps, uf.usage_from, w.bucket_width) AS lo
          FROM per JOIN widths w ON w.plan = per.plan AND w.ps = per.ps
               JOIN billing._period_usage_from(p_accounts, p_starts) uf ON uf.idx = per.idx
    ), reads AS (
        -- one read of the usage store per period and distinct lo (more than
        -- one only in a first period whose meters' buckets straddle its
        -- start at different points)
        SELECT r.idx, r.lo, (row_number() OVER (ORDER BY r.idx, r.lo))::integer AS j
          FROM (SELECT DISTINCT f.idx, f.lo FROM firsts f) r
    ), charged AS (
        -- the usage charges of each read (those of its period whose
        -- meter's bucket width gives its lo), for the totals: a matrix
        -- charge's dimension is totalled apart
        SELECT array_agg(rd.j) AS i, array_agg(v.meter) AS m, array_agg(v.dimension) AS d
          FROM reads rd JOIN per ON per.idx = rd.idx
               JOIN versions v ON v.plan = per.plan AND v.ps = per.ps AND v.meter IS NOT NULL
               JOIN billing.meters m ON m.meter = v.meter
               JOIN firsts f ON f.idx = rd.idx AND f.lo = rd.lo AND f.bucket_width = m.bucket_width
    ), totals AS MATERIALIZED (
        -- (read once: inlined, the join below would read the store per line)
        -- each meter from the read whose lo is that of its bucket width
        SELECT rd.idx, t.meter, t.dimension, t.quantity
          FROM (SELECT array_agg(p_accounts[rd.idx] ORDER BY rd.j) AS accounts,
                       array_agg(rd.lo ORDER BY rd.j) AS starts,
                       array_agg(p_ends[rd.idx] ORDER BY rd.j) AS ends
                  FROM reads rd) a, charged c,
               LATERAL billing._usage_totals_many(a.accounts, a.starts, a.ends, c.i, c.m, c.d) t
               JOIN reads rd ON rd.j = t.idx
               JOIN billing.meters m ON m.meter = t.meter
               JOIN firsts f ON f.idx = rd.idx AND f.lo = rd.lo AND f.bucket_width = m.bucket_width
    ), rated AS (
        SELECT per.idx, per.currency, v.ord, v.n_lines, v.grp,
               CASE WHEN v.meter IS NULL THEN 'fixed' ELSE 'usage' END AS kind,
               v.meter, v.description,
               CASE WHEN v.meter IS NULL THEN NULL ELSE coalesce(t.quantity, 0) END AS quantity,
               billing.rate(v.price, CASE WHEN v.meter IS NULL THEN 0 ELSE coalesce(t.quantity, 0) END)
                   AS unrounded_amount,
               v.charge_id, v.price, v.dimension
          FROM per JOIN versions v ON v.plan = per.plan AND v.ps = per.ps
               LEFT JOIN totals t ON t.idx = per.idx AND t.meter = v.meter
                                 AND t.dimension IS NOT DISTINCT FROM v.dimension
    ), lines AS (
        SELECT r.*, billing.round_money(r.unrounded_amount, r.currency) AS amount FROM rated r
    ), capped AS (
        SELECT per.idx, max(l.n_lines) + 1 AS ord, 'cap'::text AS kind, NULL::text AS meter,
               'spend cap'::text AS description, NULL::numeric AS quantity,
               NULL::numeric AS unrounded_amount, NULL::bigint AS charge_id,
               NULL::billing.price AS price, NULL::text AS dimension,
               billing._cap_amount(per.cap, per.currency, sum(l.amount)) AS amount
          FROM per JOIN lines l ON l.idx = per.idx AND l.kind = 'usage'
         WHERE per.cap IS NOT NULL
         GROUP BY per.idx, per.cap, per.currency
        HAVING billing._cap_amount(per.cap, per.currency, sum(l.amount)) IS NOT NULL
    )
    SELECT l.idx, l.ord, l.kind, l.meter, l.description, l.quantity, l.amount,
           l.unrounded_amount, l.charge_id, l.price, l.dimension
      FROM lines l
    UNION ALL
    SELECT c.idx, c.ord, c.kind, c.meter, c.description, c.quantity, c.amount,
           c.unrounded_amount, c.charge_id, c.price, c.dimension
      FROM capped c;
END
$$;
COMMENT ON FUNCTION billing._rate_periods(bigint[], text[], text[], numeric[], timestamptz[], timestamptz[]) IS
    'Internal: the rated lines (fixed fees, usage per meter and dimension, spend cap) of many billing periods';

-- ---- end of one definition of "many periods" ----

-- ---- defects found by attack (sql/install/32_ingest.sql, 55_contracts.sql, 70_audit.sql,
-- 75_audit_table.sql; the C fixes need no SQL) ----
-- void_credit refused while a period of the grant's window that ends by
-- `at` is not finalized (it voided what those periods would have drawn).
CREATE OR REPLACE FUNCTION billing.void_credit(account_id bigint, grant_id bigint, reason text,
                                    at timestamptz DEFAULT pg_catalog.now())
    RETURNS numeric
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    g billing.credit_grants;
    left_over numeric;
BEGIN
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'voiding a credit needs a reason' USING ERRCODE = '22004';
    END IF;
    IF account_id IS NULL OR grant_id IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'void_credit: account_id, grant_id and at must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT isfinite(at) THEN
        RAISE EXCEPTION 'void_credit: at must be finite' USING ERRCODE = '22023';
    END IF;
    PERFORM billing._contract_account(void_credit.account_id);
    SELECT * INTO g FROM billing.credit_grants x
     WHERE x.account_id = void_credit.account_id AND x.grant_id = void_credit.grant_id
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'credit grant % of account % does not exist', void_credit.grant_id,
              void_credit.account_id USING ERRCODE = '23503';
    END IF;
    IF g.voided_at IS NOT NULL THEN
        RETURN 0;             -- voided before: nothing left to forfeit
    END IF;
    -- what is left at `at` is known once every period of the grant's window
    -- that ends by then is finalized: those periods draw from it first
    IF EXISTS (SELECT 1 FROM billing._due_periods(void_credit.at, ARRAY[g.account_id]) d
                WHERE d.period_end > g.effective_at
                  AND (g.expires_at IS NULL OR d.period_start < g.expires_at)) THEN
        RAISE EXCEPTION 'credit grant % of account % would still pay periods that end by %',
              g.grant_id, g.account_id, void_credit.at
            USING ERRCODE = '55000',
                  DETAIL = 'void_credit forfeits what is left of a grant at "at"; periods of its window that end by then and are not finalized yet draw from it first.',
                  HINT = 'Finalize those invoices first (finalize_invoices), or void the grant at an earlier time.';
    END IF;
    SELECT coalesce(sum(l.amount), 0) INTO left_over FROM billing.credit_ledger l
     WHERE l.account_id = g.account_id AND l.grant_id = g.grant_id;
    UPDATE billing.credit_grants x SET voided_at = void_credit.at, void_reason = void_credit.reason
     WHERE x.account_id = g.account_id AND x.grant_id = g.grant_id;
    INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at)
    VALUES (g.account_id, billing._ledger_next_seq(g.account_id), g.grant_id, 'void', -left_over,
            greatest(at, g.effective_at));
    RETURN left_over;
END
$$;
COMMENT ON FUNCTION billing.void_credit(bigint, bigint, text, timestamptz) IS
    'Voids a credit grant: what is left of it is forfeited (returned) and booked as void; what was used stays used';

-- the event trigger run by every DROP TABLE/SCHEMA/OWNED in the database
-- failed for roles without rights on billing's tables: SECURITY DEFINER.
CREATE OR REPLACE FUNCTION billing._metered_table_dropped() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    DELETE FROM billing.metered_tables m
     WHERE m.tbl::oid IN (SELECT d.objid FROM pg_event_trigger_dropped_objects() d
                           WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0);
END
$$;
COMMENT ON FUNCTION billing._metered_table_dropped() IS
    'Internal: forgets metered tables when they are dropped';

-- purge_dedupe never purges past now() (a future as_of forgot ids that
-- still dedupe: usage counted twice).
CREATE OR REPLACE FUNCTION billing.purge_dedupe(as_of timestamptz DEFAULT pg_catalog.now())
    RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    n bigint := 0;
    k bigint;
    m record;
BEGIN
    -- An id is kept until its dedupe window has passed (expires_at, set
    -- when it was claimed c: c + dedupe_window) and until no report with its
    -- timestamp can be accepted any more: a report is stamped at most 5
    -- minutes after c and is accepted until its timestamp + late_window.
    -- So an id goes once c + greatest(dedupe_window, late_window + 5 min)
    -- <= as_of, with the meter's windows as they are now.  One delete per
    -- meter (PL/pgSQL: Citus plans each with constants).  Never past now():
    -- an as_of in the future would forget ids that still dedupe.
    IF as_of IS NULL THEN
        RETURN 0;       -- (as 1.0: NULL purges nothing)
    END IF;
    as_of := LEAST(as_of, pg_catalog.now());
    FOR m IN
        SELECT x.meter,
               as_of - greatest(interval '0', x.late_window + interval '5 minutes' - x.dedupe_window) AS cutoff
          FROM billing.meters x
    LOOP
        DELETE FROM billing.dedupe_keys d WHERE d.meter = m.meter AND d.expires_at <= m.cutoff;
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION billing.purge_dedupe(timestamptz) IS
    'Removes event ids whose dedupe window ended by as_of (at most now()) and for which no report can be accepted any more (late_window + 5 minutes after the claim); returns how many';

-- (CREATE OR REPLACE made them SECURITY INVOKER: as 99_roles.sql has them)
ALTER FUNCTION billing.purge_dedupe(timestamptz) SECURITY DEFINER;
ALTER FUNCTION billing.void_credit(bigint, bigint, text, timestamptz) SECURITY DEFINER;
-- credit grants, ledger entries and commitments name the client's role,
-- not the extension's owner (they are written by SECURITY DEFINER functions)
SELECT billing._update_ddl('billing.credit_grants', ARRAY[
    $ddl$ALTER TABLE billing.credit_grants ALTER COLUMN actor SET DEFAULT billing._audit_actor()$ddl$
]);
SELECT billing._update_ddl('billing.credit_ledger', ARRAY[
    $ddl$ALTER TABLE billing.credit_ledger ALTER COLUMN actor SET DEFAULT billing._audit_actor()$ddl$
]);
SELECT billing._update_ddl('billing.commitments', ARRAY[
    $ddl$ALTER TABLE billing.commitments ALTER COLUMN actor SET DEFAULT billing._audit_actor()$ddl$
]);
-- a partition made by CREATE SCHEMA ... CREATE TABLE gets the statement
-- triggers of its audited table too
DROP EVENT TRIGGER billing_audit_ddl;
CREATE EVENT TRIGGER billing_audit_ddl ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE SCHEMA')
    EXECUTE FUNCTION billing._audit_ddl();
-- ---- end of defects found by attack ----




-- ---- a grant's expiry booked when the account's subscriptions end before it
-- (sql/install/55_contracts.sql, src/credits.c) ----
-- What is left of a grant is booked 'expire' by the finalize of the
-- account's last period overlapping its window; when the subscriptions all
-- ended before the grant's expiry no period reached it, and nothing was
-- ever booked.  The drawdown now gets the end of the account's last period.
ALTER TYPE billing._credit_state ADD ATTRIBUTE last_end timestamptz;
CREATE OR REPLACE FUNCTION billing._invoice_build(p_accounts bigint[], p_currencies text[], p_caps numeric[],
                                       p_starts timestamptz[], p_ends timestamptz[],
                                       p_first boolean[], s_idx integer[], s_plans text[],
                                       s_starts timestamptz[], s_ends timestamptz[],
                                       p_rated_only boolean DEFAULT false,
                                       p_book boolean DEFAULT false)
    RETURNS SETOF billing._invoice_line
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run; the plan
    -- cache mode is the default, and a level to change it on (see 2.)
    SET jit = off SET plan_cache_mode = auto AS $$
DECLARE
    accs bigint[];
    t_from timestamptz;
    t_to timestamptz;
    l billing._invoice_line[];
    wins billing._window[];
    grs billing._credit_state[];
    le_accounts bigint[];   -- with p_book: accounts whose subscriptions all end,
    le_ends timestamptz[];  -- and the end of their last period
    adjs billing._invoice_line[];   -- pending adjustments (grant_id: the account)
    sa record;
    sp record;
    has_true_ups boolean;
    has_installments boolean;
BEGIN
    IF coalesce(array_length(p_accounts, 1), 0) = 0 THEN
        RETURN;
    END IF;
    -- many periods (finalize, rerate): custom plans from here on; a few
    -- keep the caller's mode until 2. (_plan_cache_for)
    PERFORM billing._plan_cache_for(cardinality(p_accounts), false);
    -- 1. usage and fixed lines of every segment (one set-based rating), the
    -- cap.  Each period one segment (no plan change): _rate_periods rates
    -- the periods, cap included, as they are.
    IF cardinality(s_idx) = cardinality(p_accounts) THEN
        SELECT array_agg(ROW(r.idx, r.ord, r.kind, r.meter, r.description, r.quantity, r.amount,
                             r.unrounded_amount, r.charge_id, r.price, NULL, NULL, NULL, NULL, NULL,
                             NULL, NULL, NULL, NULL, r.dimension)::billing._invoice_line
                         ORDER BY r.idx, r.ord)
          INTO l
          FROM billing._rate_periods(p_accounts, s_plans, p_currencies, p_caps, s_starts, s_ends) r;
    ELSE
        -- a plan change: each segment rated on its own from its start to
        -- its end with its plan, then _segment_lines (a statement of its own:
        -- the rating's plans stay its own)
        SELECT array_agg(x.a ORDER BY y.n) AS accounts, array_agg(x.cur ORDER BY y.n) AS currencies
          INTO sa
          FROM unnest(s_idx) WITH ORDINALITY AS y(p, n)
               JOIN unnest(p_accounts, p_currencies) WITH ORDINALITY AS x(a, cur, k) ON x.k = y.p;
        l := ARRAY(SELECT ROW(r.idx, r.ord, r.kind, r.meter, r.description, r.quantity, r.amount,
                              r.unrounded_amount, r.charge_id, r.price, NULL, NULL, NULL, NULL,
                              NULL, NULL, NULL, NULL, NULL, r.dimension)::billing._invoice_line
                     FROM billing._rate_periods(sa.accounts, s_plans, sa.currencies,
                                                array_fill(NULL::numeric, ARRAY[cardinality(s_idx)]),
                                                s_starts, s_ends) r);
        l := ARRAY(SELECT x FROM billing._segment_lines(l, s_idx, s_plans, s_starts, s_ends,
                                                        p_currencies, p_caps, p_starts, p_ends) x
                    ORDER BY x.idx, x.ord);
    END IF;
    IF p_rated_only THEN
        RETURN QUERY SELECT * FROM unnest(l);
        RETURN;
    END IF;

    -- 2. what the accounts have (one statement; each subquery routed by the
    -- accounts on Citus).  From here on, for a few periods (a preview), one
    -- generic plan per statement and session: planning these statements
    -- anew costs more than running them.  (Not above: the rating's
    -- statements here and in the callees that set no mode of their own,
    -- such as _segment_lines, keep the caller's.)  See _plan_cache_for.
    PERFORM billing._plan_cache_for(cardinality(p_accounts));
    IF cardinality(p_accounts) = 1 THEN
        accs := p_accounts;
        t_from := p_starts[1];
        t_to := p_ends[1];
    ELSE
        SELECT array_agg(DISTINCT a), min(s), max(e) INTO accs, t_from, t_to
          FROM unnest(p_accounts, p_starts, p_ends) AS x(a, s, e);
    END IF;
    -- booking: the end of the last period of the accounts whose
    -- subscriptions all end (a grant expiring after it is booked by the
    -- finalize of that period); a statement of its own, so that no query
    -- joins subscriptions with tables Citus may hold apart
    IF p_book THEN
        SELECT array_agg(x.account_id), array_agg(x.last_end) INTO le_accounts, le_ends
          FROM (SELECT s.account_id,
                       CASE WHEN bool_and(s.ends_at IS NOT NULL) THEN max(s.ends_at) END AS last_end
                  FROM billing.subscriptions s
                 WHERE s.account_id = ANY (accs)
                 GROUP BY s.account_id) x;
    END IF;
    SELECT cw.wins, cw.has_true_ups, cw.has_installments,
           -- pending adjustments, as lines (the row rebuilt as
           -- billing.adjustments: on Citus a is a shard's row)
           (SELECT array_agg(ROW(NULL, a.adjustment_id, 'adjustment', a.meter,
                                 billing._adjustment_text(ROW(a.*)::billing.adjustments),
                                 a.new_quantity - a.old_quantity, a.delta, NULL, NULL, NULL,
                                 a.adjustment_id, NULL, a.account_id, NULL, NULL, NULL, NULL, NULL,
                                 NULL, a.dimension)::billing._invoice_line)
              FROM billing.adjustments a
             WHERE a.account_id = ANY (accs) AND a.billed_invoice_id IS NULL),
           -- grants with something left, effective before the last period
           -- ends, with the next window of their commitment (for a rollover)
           (SELECT array_agg(ROW(g.account_id, g.grant_id, g.priority, g.effective_at, g.expires_at,
                                 g.applies_to::text[], g.source, l.remaining,
                                 CASE WHEN g.source = 'commitment' THEN c.rollover_fraction ELSE 0 END,
                                 nw.starts_at, nw.ends_at,
                                 coalesce(g.reason, g.source),
                                 -- (an expression, not a join: the preview's
                                 -- generic plan of this query stays as it was)
                                 le_ends[array_position(le_accounts, g.account_id)])::billing._credit_state)
              FROM billing.credit_grants g
                   JOIN LATERAL (SELECT sum(x.amount) AS remaining FROM billing.credit_ledger x
                                  WHERE x.account_id = g.account_id AND x.grant_id = g.grant_id) l ON true
                   LEFT JOIN billing.commitments c
                          ON c.account_id = g.account_id AND c.commitment_id = g.commitment_id
                   LEFT JOIN billing.commitment_windows nw
                          ON nw.account_id = g.account_id AND nw.commitment_id = g.commitment_id
                         AND nw.window_no = g.window_no + 1
             WHERE g.account_id = ANY (accs) AND g.voided_at IS NULL AND g.effective_at < t_to
               AND l.remaining > 0)
      INTO wins, has_true_ups, has_installments, adjs, grs
      -- the commitment windows overlapping the periods; minimum ones ending
      -- in them (true-ups), prepaid ones (installments)
      FROM (SELECT array_agg(ROW(w.account_id, w.commitment_id, w.window_no, c.kind, w.starts_at,
                                 w.ends_at, w.amount, c.applies_to::text[], c.installments,
                                 w.installment_due, w.installment_amounts)::billing._window) AS wins,
                   coalesce(bool_or(c.kind = 'minimum' AND w.ends_at > t_from AND w.ends_at <= t_to),
                            false) AS has_true_ups,
                   coalesce(bool_or(c.kind = 'prepaid'), false) AS has_installments
              FROM billing.commitment_windows w
                   JOIN billing.commitments c
                     ON c.account_id = w.account_id AND c.commitment_id = w.commitment_id
             WHERE w.account_id = ANY (accs) AND w.starts_at < t_to AND w.ends_at > t_from) cw;
    IF wins IS NULL AND adjs IS NULL AND grs IS NULL THEN
        RETURN QUERY SELECT * FROM unnest(l);
        RETURN;
    END IF;
    -- 3. true_up lines: the minimum windows ending in a period, short of
    -- the eligible spend of the finalized invoices inside the window (each
    -- invoice's usage, fixed and cap lines plus the adjustments made to it
    -- since, billed or pending) and of the periods built here
    IF has_true_ups THEN
        SELECT array_agg(y.account_id) AS accounts, array_agg(y.commitment_id) AS commitments,
               array_agg(y.window_no) AS windows, array_agg(y.spend) AS spends
          INTO sp
          FROM (SELECT w.account_id, w.commitment_id, w.window_no,
                       sum(billing._eligible_spend(c.applies_to::text[], b.kinds, b.meters, b.amounts)) AS spend
                  FROM billing.commitment_windows w
                       JOIN billing.commitments c
                         ON c.account_id = w.account_id AND c.commitment_id = w.commitment_id
                       JOIN billing.invoices i
                         ON i.account_id = w.account_id AND i.status = 'finalized'
                        AND i.period_start >= w.starts_at AND i.period_end <= w.ends_at
                       CROSS JOIN LATERAL (
                           SELECT array_agg(z.kind) AS kinds, array_agg(z.meter) AS meters,
                                  array_agg(z.amount) AS amounts
                             FROM (SELECT x.kind, x.meter::text AS meter, x.amount
                                     FROM billing.invoice_lines x
                                    WHERE x.account_id = i.account_id AND x.invoice_id = i.invoice_id
                                      AND x.kind IN ('usage', 'fixed', 'cap')
                                   UNION ALL
                                   SELECT a.line_kind, a.meter::text, a.delta FROM billing.adjustments a
                                    WHERE a.account_id = i.account_id AND a.invoice_id = i.invoice_id) z) b
                 WHERE w.account_id = ANY (accs) AND c.kind = 'minimum'
                   AND w.ends_at > t_from AND w.ends_at <= t_to
                 GROUP BY w.account_id, w.commitment_id, w.window_no) y;
        l := l || ARRAY(
            WITH per AS (
                SELECT x.n::integer AS idx, x.a AS account_id, x.cur AS currency, x.s AS ps, x.e AS pe
                  FROM unnest(p_accounts, p_currencies, p_starts, p_ends)
                       WITH ORDINALITY AS x(a, cur, s, e, n)
            ), batch AS (
                -- the periods being built, as (kind, meter, amount) lists
                SELECT x.idx, array_agg(x.kind) AS kinds, array_agg(x.meter) AS meters,
                       array_agg(x.amount) AS amounts
                  FROM unnest(l) x GROUP BY x.idx
            ), t AS (
                SELECT per.idx, w.commitment_id, w.window_no, w.starts_at, w.ends_at, per.currency,
                       w.amount, w.amount
                       - coalesce((SELECT s.spend
                                     FROM unnest(sp.accounts, sp.commitments, sp.windows, sp.spends)
                                          AS s(account_id, commitment_id, window_no, spend)
                                    WHERE s.account_id = w.account_id AND s.commitment_id = w.commitment_id
                                      AND s.window_no = w.window_no), 0)
                       - coalesce((SELECT sum(billing._eligible_spend(w.applies_to, b.kinds, b.meters, b.amounts))
                                     FROM per p2 JOIN batch b ON b.idx = p2.idx
                                    WHERE p2.account_id = w.account_id
                                      AND p2.ps >= w.starts_at AND p2.pe <= w.ends_at), 0) AS short
                  FROM per JOIN unnest(wins) w
                         ON w.account_id = per.account_id AND w.kind = 'minimum'
                        AND w.ends_at > per.ps AND w.ends_at <= per.pe
            )
            SELECT ROW(t.idx, 2000000000 + row_number() OVER (PARTITION BY t.idx ORDER BY t.commitment_id, t.window_no),
                       'true_up', NULL,
                       format('minimum commitment %s, %s to %s: shortfall', t.commitment_id,
                              to_char(t.starts_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                              to_char(t.ends_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
                       -- quantity: the window's eligible spend
                       t.amount - t.short, billing.round_money(t.short, t.currency), t.short, NULL,
                       NULL, NULL, t.commitment_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                       NULL)::billing._invoice_line
              FROM t
             WHERE billing.round_money(t.short, t.currency) > 0);
    END IF;
    -- commitment lines: each installment of a prepaid window on the period
    -- its schedule puts it in
    IF has_installments THEN
        l := l || ARRAY(
            SELECT ROW(x.n, 3000000000 + row_number() OVER (PARTITION BY x.n ORDER BY w.commitment_id, w.window_no, i.j),
                       'commitment', NULL,
                       CASE WHEN w.installments = 1
                            THEN format('prepaid commitment %s, window %s', w.commitment_id, w.window_no)
                            ELSE format('prepaid commitment %s, window %s: installment %s of %s',
                                        w.commitment_id, w.window_no, i.j, w.installments) END,
                       NULL, i.amount, NULL, NULL, NULL, NULL, w.commitment_id, NULL, NULL, NULL, NULL,
                       NULL, NULL, NULL, NULL)::billing._invoice_line
              FROM unnest(p_accounts, p_starts, p_ends) WITH ORDINALITY AS x(a, s, e, n)
                   JOIN unnest(wins) w ON w.account_id = x.a AND w.kind = 'prepaid',
                   unnest(w.installment_due, w.installment_amounts) WITH ORDINALITY AS i(due, amount, j)
             WHERE i.due >= x.s AND i.due < x.e);
    END IF;
    -- adjustment lines: the account's pending adjustments, on its first period
    IF adjs IS NOT NULL THEN
        l := l || ARRAY(
            SELECT ROW(x.n, 4000000000 + row_number() OVER (PARTITION BY x.n ORDER BY a.adjustment_id),
                       'adjustment', a.meter, a.description, a.quantity, a.amount, NULL, NULL, NULL,
                       a.adjustment_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                       a.dimension)::billing._invoice_line
              FROM unnest(p_accounts, p_first) WITH ORDINALITY AS x(a, f, n)
                   JOIN unnest(adjs) a ON a.grant_id = x.a
             WHERE x.f);
    END IF;
    -- 4. the credits, after every line above (_credit_draws)
    IF grs IS NOT NULL THEN
        l := l || ARRAY(SELECT x FROM billing._credit_draws(p_accounts, p_currencies, p_starts,
                                                            p_ends, p_book, l, grs) x);
    END IF;
    IF cardinality(p_accounts) = 1 THEN
        RETURN QUERY SELECT * FROM unnest(l);     -- in order already
    ELSE
        RETURN QUERY SELECT * FROM unnest(l) x ORDER BY x.idx, x.ord;
    END IF;
END
$$;
COMMENT ON FUNCTION billing._invoice_build(bigint[], text[], numeric[], timestamptz[], timestamptz[], boolean[], integer[], text[], timestamptz[], timestamptz[], boolean, boolean) IS
    'Internal: the lines of many billing periods in invoice order (usage and fixed per plan segment, cap, true_up, commitment, adjustment, credit) and the ledger entries they book';

-- Commitment windows: a plan change inside a period is not a period
-- boundary; installments and the count of a window's periods follow the
-- account's grid (from its anchor), so a month-end anchor keeps month ends.
/*
 * _period_boundary: is ts a billing period boundary of the account: a
 * point of the period grid of a subscription that holds it (the start of
 * the first one is; a plan change inside a period is not: the period runs
 * on), or the end of its last subscription, where its last period is cut?
 * Returns the period length of that subscription (NULL: not a boundary).
 */
CREATE OR REPLACE FUNCTION billing._period_boundary(p_account bigint, p_ts timestamptz) RETURNS interval
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
BEGIN
    RETURN (SELECT s.period
              FROM (SELECT x.*, bool_or(x.starts_at = p_ts) OVER () AS one_starts_there
                      FROM billing._subscriptions_of(ARRAY[p_account], false) x) s
             WHERE (s.starts_at <= p_ts AND p_ts <= coalesce(s.ends_at, 'infinity')
                    AND billing._add_periods(s.anchor, s.period,
                                             billing._period_index(s.anchor, s.period, p_ts)) = p_ts)
                OR (p_ts = s.ends_at AND NOT s.one_starts_there)
             ORDER BY s.starts_at DESC LIMIT 1);
END
$$;
COMMENT ON FUNCTION billing._period_boundary(bigint, timestamptz) IS
    'Internal: the period length of the subscription a moment is a period boundary of (NULL: not a boundary)';

CREATE OR REPLACE FUNCTION billing.add_commitment(account_id bigint, kind text, amount numeric,
                                       starts_at timestamptz, ends_at timestamptz,
                                       commit_period interval DEFAULT NULL,
                                       applies_to text[] DEFAULT NULL,
                                       installments integer DEFAULT 1,
                                       rollover_fraction numeric DEFAULT 0)
    RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    cur text;
    per interval;
    id bigint;
    n_windows integer := 0;
    ws timestamptz;
    we timestamptz;
    w integer;
    w_amount numeric;
    gid bigint;
    bad timestamptz;
    details jsonb;
    anc timestamptz;    -- the account's period grid starts here
BEGIN
    IF account_id IS NULL OR kind IS NULL OR amount IS NULL OR starts_at IS NULL OR ends_at IS NULL
       OR installments IS NULL OR rollover_fraction IS NULL THEN
        RAISE EXCEPTION 'add_commitment: only commit_period and applies_to may be null'
            USING ERRCODE = '22004';
    END IF;
    cur := billing._contract_account(add_commitment.account_id);
    IF kind NOT IN ('prepaid', 'minimum') THEN
        RAISE EXCEPTION 'unknown commitment kind "%"', kind
            USING ERRCODE = '22023', DETAIL = 'A commitment is prepaid or minimum.';
    END IF;
    PERFORM billing._check_money(amount, cur, 'commitment');
    IF NOT isfinite(starts_at) OR NOT isfinite(ends_at) OR ends_at <= starts_at THEN
        RAISE EXCEPTION 'invalid commitment term: % to %', starts_at, ends_at
            USING ERRCODE = '22023', DETAIL = 'ends_at must be finite and after starts_at.';
    END IF;
    IF commit_period <= interval '0' THEN
        RAISE EXCEPTION 'invalid commit_period: %', commit_period USING ERRCODE = '22023';
    END IF;
    IF installments < 1 THEN
        RAISE EXCEPTION 'invalid installments: %', installments
            USING ERRCODE = '22023', DETAIL = 'A window is invoiced in 1 or more installments.';
    END IF;
    IF rollover_fraction = 'NaN' OR rollover_fraction NOT BETWEEN 0 AND 1 THEN
        RAISE EXCEPTION 'invalid rollover_fraction: %', rollover_fraction
            USING ERRCODE = '22023', DETAIL = 'A rollover fraction is 0 to 1.';
    END IF;
    applies_to := billing._check_applies_to(applies_to);
    IF EXISTS (SELECT 1 FROM billing.invoices i
                WHERE i.account_id = add_commitment.account_id AND i.period_end > starts_at) THEN
        RAISE EXCEPTION 'commitment of account % starts at %, inside an already finalized period',
              add_commitment.account_id, starts_at
            USING ERRCODE = '55000', HINT = 'Start it at or after the end of the last finalized period.';
    END IF;

    -- the windows: [starts_at + k * commit_period, ...) cut at ends_at, each
    -- on the account's period boundaries; its periods and installments on
    -- the account's grid (anc: a month-end anchor keeps month ends)
    per := billing._period_boundary(add_commitment.account_id, starts_at);
    SELECT s.anchor INTO anc FROM billing._subscriptions_of(ARRAY[add_commitment.account_id], false) s
     WHERE s.starts_at <= add_commitment.starts_at ORDER BY s.starts_at DESC LIMIT 1;
    LOOP
        ws := CASE WHEN commit_period IS NULL THEN starts_at
                   ELSE billing._add_periods(starts_at, commit_period, n_windows) END;
        EXIT WHEN ws >= ends_at;
        we := CASE WHEN commit_period IS NULL THEN ends_at
                   ELSE least(billing._add_periods(starts_at, commit_period, n_windows + 1), ends_at) END;
        IF per IS NULL OR billing._period_boundary(add_commitment.account_id, ws) IS DISTINCT FROM per
           OR billing._period_boundary(add_commitment.account_id, we) IS DISTINCT FROM per THEN
            bad := CASE WHEN per IS NULL OR billing._period_boundary(add_commitment.account_id, ws)
                                             IS DISTINCT FROM per THEN ws ELSE we END;
            RAISE EXCEPTION 'commitment window boundary % is not a billing period boundary of account %',
                  bad, add_commitment.account_id
                USING ERRCODE = '22023',
                      DETAIL = 'Windows start and end where the account''s subscription periods do.';
        END IF;
        IF kind = 'prepaid' AND installments > billing._period_index(anc, per, we - interval '1 microsecond')
                                               - billing._period_index(anc, per, ws) + 1 THEN
            RAISE EXCEPTION 'commitment window % to % has % billing periods, fewer than % installments',
                  ws, we, billing._period_index(anc, per, we - interval '1 microsecond')
                          - billing._period_index(anc, per, ws) + 1, installments
                USING ERRCODE = '22023', DETAIL = 'Each installment is invoiced on a period of its window.';
        END IF;
        n_windows := n_windows + 1;
        EXIT WHEN commit_period IS NULL;
    END LOOP;

    INSERT INTO billing.commitments (account_id, kind, amount, starts_at, ends_at, commit_period,
                                     applies_to, installments, rollover_fraction, period)
    VALUES (add_commitment.account_id, kind, amount, starts_at, ends_at, commit_period, applies_to,
            installments, rollover_fraction, per)
    RETURNING billing.commitments.commitment_id INTO id;
    FOR w IN 1 .. n_windows LOOP
        ws := CASE WHEN commit_period IS NULL THEN starts_at
                   ELSE billing._add_periods(starts_at, commit_period, w - 1) END;
        we := CASE WHEN commit_period IS NULL THEN ends_at
                   ELSE least(billing._add_periods(starts_at, commit_period, w), ends_at) END;
        w_amount := billing._installment(amount, w, n_windows, cur);
        INSERT INTO billing.commitment_windows (account_id, commitment_id, window_no, starts_at,
                                                ends_at, amount, installment_due,
                                                installment_amounts)
        SELECT add_commitment.account_id, id, w, ws, we, w_amount,
               CASE WHEN kind = 'prepaid'
                    THEN array_agg(billing._add_periods(anc, per, billing._period_index(anc, per, ws) + i - 1)
                                   ORDER BY i) END,
               CASE WHEN kind = 'prepaid'
                    THEN array_agg(billing._installment(w_amount, i, installments, cur) ORDER BY i) END
          FROM generate_series(1, installments) i;
        IF kind = 'prepaid' THEN
            INSERT INTO billing.credit_grants (account_id, amount, effective_at, expires_at,
                                               applies_to, source, reason, commitment_id, window_no)
            VALUES (add_commitment.account_id, w_amount, ws, we, applies_to, 'commitment',
                    format('prepaid commitment %s, window %s', id, w), id, w)
            RETURNING billing.credit_grants.grant_id INTO gid;
            INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at)
            VALUES (add_commitment.account_id, billing._ledger_next_seq(add_commitment.account_id),
                    gid, 'grant', w_amount, ws);
        END IF;
    END LOOP;
    -- the details first: on Citus a call with queries in its arguments
    -- would be pushed down to a shard
    SELECT to_jsonb(c) INTO details FROM billing.commitments c
     WHERE c.account_id = add_commitment.account_id AND c.commitment_id = id;
    SELECT details || jsonb_build_object('windows',
               jsonb_agg(jsonb_build_object('window_no', w2.window_no, 'starts_at', w2.starts_at,
                                            'ends_at', w2.ends_at, 'amount', w2.amount)
                         ORDER BY w2.window_no))
      INTO details
      FROM billing.commitment_windows w2
     WHERE w2.account_id = add_commitment.account_id AND w2.commitment_id = id;
    PERFORM billing._audit_append(add_commitment.account_id, 'commit', format('commitment:%s', id),
                                  details);
    RETURN id;
END
$$;
COMMENT ON FUNCTION billing.add_commitment(bigint, text, numeric, timestamptz, timestamptz, interval, text[], integer, numeric) IS
    'Adds a commitment: prepaid (a credit grant per window, invoiced in installments, with rollover) or minimum (a true-up line when a window''s eligible spend falls short)';

ALTER FUNCTION billing.add_commitment(bigint, text, numeric, timestamptz, timestamptz, interval, text[], integer, numeric)
    SECURITY DEFINER;
-- ---- end of expiry after the last period ----

-- ---- remaining prices the bucket holding `at` with the plan that bills it
-- (sql/install/50_invoices.sql) ----
-- At a plan change inside a bucket, remaining priced at the new plan while
-- the bucket (started before the change) is billed at the old one.
CREATE OR REPLACE FUNCTION billing.remaining(account_id bigint, meter text,
                                  at timestamptz DEFAULT pg_catalog.now(),
                                  dimension text DEFAULT '')
    RETURNS numeric
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    per record;
    line record;
    lines billing._invoice_line[];
    others numeric;
    budget numeric;
    q0 numeric;
    j jsonb;
    ends numeric[];
    seg_end numeric;
    lo numeric := 0;          -- largest x known to fit
    hi numeric;               -- smallest x known not to fit
    mid numeric;
    tail numeric;             -- past it, the charge is affine in x
    b_at timestamptz;         -- the start of the meter's bucket holding at
BEGIN
    IF account_id IS NULL OR meter IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'remaining: account_id, meter and at must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM billing.accounts a WHERE a.account_id = remaining.account_id) THEN
        RAISE EXCEPTION 'account % does not exist', remaining.account_id USING ERRCODE = '23503';
    END IF;
    -- the start of the meter's bucket holding at (used below)
    SELECT billing._bin(m.bucket_width, at) INTO b_at FROM billing.meters m
     WHERE m.meter = remaining.meter;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'meter "%" does not exist', remaining.meter USING ERRCODE = '23503';
    END IF;
    -- the period holding at, whose spend cap bounds the usage lines of
    -- every plan segment (credits do not count: the cap bounds usage before)
    SELECT s.spend_cap, s.currency INTO per
      FROM billing._segments(ARRAY[remaining.account_id], ARRAY[at]) s
     ORDER BY s.segment_start DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN 0;                 -- no subscription: nothing can be billed
    END IF;
    IF per.spend_cap IS NULL THEN
        RETURN NULL;              -- no cap: unlimited
    END IF;
    lines := ARRAY(SELECT b.line
                     FROM billing._period_build(ARRAY[remaining.account_id], ARRAY[at], true) b
                    WHERE (b.line).kind = 'usage');
    -- the line rating the dimension in the plan segment that bills the
    -- bucket holding at (the charge naming it, else the rest of the
    -- meter): a bucket starting before a plan change is the old plan's
    SELECT x.quantity, x.price, x.ord INTO line
      FROM unnest(lines) x
     WHERE x.meter = remaining.meter
       AND (x.dimension = coalesce(remaining.dimension, '') OR x.dimension IS NULL)
       AND (x.segment_start IS NULL OR (x.segment_start <= b_at AND b_at < x.segment_end))
     ORDER BY x.dimension IS NULL
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;              -- the plan does not bill this meter (or dimension)
    END IF;
    SELECT coalesce(sum(x.amount), 0) INTO others FROM unnest(lines) x WHERE x.ord <> line.ord;
    budget := billing.round_money(per.spend_cap, per.currency) - others;
    q0 := line.quantity;
    IF NOT billing._fits(line.price, q0, per.currency, budget) THEN
        RETURN 0;
    END IF;

    -- stretches on which the charge cannot decrease: volume tiers, then the
    -- rest.  A tier ends where the quantity after per and free passes its
    -- bound b: at (b + free) * N for per N exact (or no per), at
    -- floor(b + free) * N for round up; for round down the stretch is open
    -- at (floor(b + free) + 1) * N, so it ends at the last whole unit from
    -- q0 before that.
    j := billing.price_to_jsonb(line.price);
    IF j ->> 'model' = 'volume' THEN
        SELECT array_agg(CASE WHEN NOT j ? 'per' OR j ->> 'per_round' = 'exact'
                                  THEN (b + f) * coalesce((j ->> 'per')::numeric, 1)
                              WHEN j ->> 'per_round' = 'up'
                                  THEN floor(b + f) * (j ->> 'per')::numeric
                              ELSE q0 + ceil((floor(b + f) + 1) * (j ->> 'per')::numeric - q0) - 1
                         END ORDER BY b)
          INTO ends
          FROM jsonb_array_elements(j -> 'tiers') t,
               LATERAL (SELECT (t ->> 'up_to')::numeric AS b,
                               coalesce((j ->> 'free')::numeric, 0) AS f) x
         WHERE t ->> 'up_to' <> 'inf';
    END IF;
    -- Whole units from q0 only: in each stretch, its last whole unit; when
    -- that is over the budget, the answer is in this stretch, where the
    -- charge cannot decrease, so bisect (lo, hi]; else go on to the next.
    FOREACH seg_end IN ARRAY coalesce(ends, '{}'::numeric[]) LOOP
        CONTINUE WHEN floor(seg_end - q0) <= lo;
        IF billing._fits(line.price, q0 + floor(seg_end - q0), per.currency, budget) THEN
            lo := floor(seg_end - q0);
        ELSE
            hi := floor(seg_end - q0);
            EXIT;
        END IF;
    END LOOP;
    IF hi IS NULL THEN
        -- open-ended: double until over the budget, however large it is.
        -- Every point where the charge bends (a tier bound, the free units,
        -- a package size, where a minimum stops applying: at most the
        -- largest number K of the price over its smallest rate, 10^-22 a
        -- unit; times a quantity divisor) lies below tail.  Past it the
        -- charge is affine in the quantity (or a staircase of steps shorter
        -- than tail): the same at x and 2x there, it never grows again.
        SELECT (1 + coalesce(max(n[1]::numeric), 0)) ^ 2 * 1e24 INTO tail
          FROM regexp_matches(billing.price_to_jsonb(line.price)::text, '([0-9]+(\.[0-9]+)?)', 'g') AS n;
        hi := greatest(lo * 2, 1);
        WHILE billing._fits(line.price, q0 + hi, per.currency, budget) LOOP
            IF lo > tail AND billing.rate(line.price, q0 + hi) = billing.rate(line.price, q0 + lo) THEN
                RETURN NULL;      -- the charge stopped growing below the budget
            END IF;
            lo := hi;
            hi := hi * 2;
        END LOOP;
    END IF;
    WHILE hi - lo > 1 LOOP
        mid := floor((lo + hi) / 2);
        IF billing._fits(line.price, q0 + mid, per.currency, budget) THEN
            lo := mid;
        ELSE
            hi := mid;
        END IF;
    END LOOP;
    RETURN lo;
END
$$;
COMMENT ON FUNCTION billing.remaining(bigint, text, timestamptz, text) IS
    'Whole units of a meter (of one dimension, by default '''') that can still be used this period before the usage lines (of every plan segment) exceed the spend cap (NULL: unlimited)';

-- ---- end of remaining at a plan change ----

-- ---- metered tables never become partitions (sql/install/32_ingest.sql) ----
-- a metered table never becomes a partition: rows inserted through its
-- parent would not fire the statement triggers that count them (meter_table
-- refuses partitions; ATTACH PARTITION is refused here, 55000)
CREATE FUNCTION billing._metered_table_attached() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    t regclass;
BEGIN
    SELECT m.tbl INTO t
      FROM billing.metered_tables m
           JOIN pg_inherits i ON i.inhrelid = m.tbl::oid
     WHERE i.inhparent IN (SELECT d.objid FROM pg_event_trigger_ddl_commands() d
                            WHERE d.classid = 'pg_class'::regclass)
     LIMIT 1;
    IF t IS NOT NULL THEN
        RAISE EXCEPTION 'metered table % cannot become a partition', t
            USING ERRCODE = '55000',
                  DETAIL = 'Rows inserted through the partitioned table would not fire the statement triggers that count them.',
                  HINT = 'Stop metering it first with billing.unmeter_table.';
    END IF;
END
$$;
COMMENT ON FUNCTION billing._metered_table_attached() IS
    'Internal: refuses to make a metered table a partition (ATTACH PARTITION, 55000)';
CREATE EVENT TRIGGER billing_metered_table_attached ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION billing._metered_table_attached();
REVOKE ALL ON FUNCTION billing._metered_table_attached() FROM PUBLIC;
-- ---- end of metered tables never become partitions ----

-- ---- change_plan back to the plan before, at the same moment (sql/install/55_contracts.sql) ----
-- A to B and back to A at one moment left two subscriptions of A meeting
-- there, so the tiers of A restarted; the two are one again.
CREATE OR REPLACE FUNCTION billing.change_plan(account_id bigint, plan text, at timestamptz DEFAULT pg_catalog.now())
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    SET TimeZone = 'UTC' SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, YMD' AS $$
DECLARE
    s record;
    new_period interval;
    closed timestamptz;
    prev_start timestamptz;
BEGIN
    IF account_id IS NULL OR plan IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'change_plan: account_id, plan and at must not be null' USING ERRCODE = '22004';
    END IF;
    PERFORM billing._contract_account(change_plan.account_id);
    SELECT p.period INTO new_period FROM billing.plans p WHERE p.plan = change_plan.plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'plan "%" does not exist', change_plan.plan USING ERRCODE = '23503';
    END IF;
    IF NOT isfinite(at) THEN
        RAISE EXCEPTION 'change_plan: at must be finite' USING ERRCODE = '22023';
    END IF;
    SELECT max(i.period_end) INTO closed FROM billing.invoices i
     WHERE i.account_id = change_plan.account_id;
    IF closed > at THEN
        RAISE EXCEPTION 'account % is invoiced up to %: % is inside an already finalized period',
              change_plan.account_id, closed, at
            USING ERRCODE = '55000', HINT = 'Change the plan at or after the end of the last finalized period.';
    END IF;
    SELECT sub.*, p.period INTO s
      FROM billing.subscriptions sub JOIN billing.plans p ON p.plan = sub.plan
     WHERE sub.account_id = change_plan.account_id AND sub.starts_at <= at
       AND (sub.ends_at IS NULL OR at < sub.ends_at)
       FOR UPDATE OF sub;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account % has no subscription at %', change_plan.account_id, at
            USING ERRCODE = '55000', HINT = 'Subscribe the account (insert into billing.subscriptions).';
    END IF;
    IF s.plan = change_plan.plan THEN
        RETURN;               -- already on it
    END IF;
    IF new_period <> s.period THEN
        RAISE EXCEPTION 'plan "%" bills every %, plan "%" every %', change_plan.plan, new_period,
              s.plan, s.period
            USING ERRCODE = '22023', DETAIL = 'A plan change keeps the account''s billing periods.';
    END IF;
    IF s.starts_at = at THEN
        -- a second change at the same moment: back to the plan the account
        -- had before it, the two subscriptions are one again (nothing
        -- changes at `at`: tiers do not restart there); else the one
        -- starting at `at` takes the plan
        SELECT prev.starts_at INTO prev_start FROM billing.subscriptions prev
         WHERE prev.account_id = change_plan.account_id AND prev.ends_at = at
           AND prev.plan = change_plan.plan
           AND prev.spend_cap IS NOT DISTINCT FROM s.spend_cap
           FOR UPDATE;
        IF FOUND THEN
            DELETE FROM billing.subscriptions sub
             WHERE sub.account_id = change_plan.account_id AND sub.starts_at = s.starts_at;
            UPDATE billing.subscriptions sub SET ends_at = s.ends_at
             WHERE sub.account_id = change_plan.account_id AND sub.starts_at = prev_start;
        ELSE
            UPDATE billing.subscriptions sub SET plan = change_plan.plan
             WHERE sub.account_id = change_plan.account_id AND sub.starts_at = s.starts_at;
        END IF;
    ELSE
        UPDATE billing.subscriptions sub SET ends_at = at
         WHERE sub.account_id = change_plan.account_id AND sub.starts_at = s.starts_at;
        INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at, spend_cap, period_anchor)
        VALUES (change_plan.account_id, change_plan.plan, at, s.ends_at, s.spend_cap,
                coalesce(s.period_anchor, s.starts_at));
    END IF;
    PERFORM billing._audit_append(change_plan.account_id, 'change_plan',
        format('subscription:%s/%s', change_plan.account_id, at),
        jsonb_build_object('account_id', change_plan.account_id, 'from_plan', s.plan,
                           'to_plan', change_plan.plan, 'at', at));
END
$$;
COMMENT ON FUNCTION billing.change_plan(bigint, text, timestamptz) IS
    'Moves an account to another plan at a moment: the current subscription ends there and the new one starts there, on the same period grid; the period holding it is one invoice with both plans'' lines';

ALTER FUNCTION billing.change_plan(bigint, text, timestamptz) SECURITY DEFINER;
-- ---- end of change_plan back at the same moment ----

-- ---- group rows of usage_deltas (src/cells.h, src/ingest_deltas.c) ----
-- On one node a flush writes the cells of the accounts of one block of 64
-- ids into one row: readers look under the account's id and its block's
-- key (billing._delta_key) and read rows through billing._delta_rows.
COMMENT ON TABLE billing.usage_deltas IS
    'Usage counted since the last compact_usage(): per flush of an ingest statement, one row per account with the cells it touched, packed, or on one node one group row for the accounts of a block of 64 ids; appended, never updated';
COMMENT ON FUNCTION billing._delta_cells(bytea) IS
    'Internal: the counter cells packed in usage_deltas.cells, of every account of a group row (last_ts is NULL but for last meters)';
CREATE TYPE billing.delta_row_cell AS (
    account_id    bigint,
    meter         text COLLATE "C",
    dimension     text COLLATE "C",
    bucket_start  timestamptz,
    quantity      numeric,
    events        bigint,
    last_ts       timestamptz,          -- last meters only
    seq           bigint                -- arrival order of the account's part of the row
);
COMMENT ON TYPE billing.delta_row_cell IS 'Internal: one counter cell of a row of usage_deltas and its account, as billing._delta_rows returns it';

CREATE FUNCTION billing._delta_rows(row_account bigint, row_seq bigint, cells bytea, p_account bigint)
    RETURNS SETOF billing.delta_row_cell
    AS 'MODULE_PATHNAME', 'billing_delta_rows'
    LANGUAGE C IMMUTABLE PARALLEL SAFE ROWS 8;
COMMENT ON FUNCTION billing._delta_rows(bigint, bigint, bytea, bigint) IS
    'Internal: the counter cells of a row of usage_deltas (its account_id, seq and cells) with their accounts and seqs, only p_account''s unless it is NULL (a group row holds several accounts)';

CREATE FUNCTION billing._delta_key(account_id bigint) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_delta_key'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._delta_key(bigint) IS
    'Internal: the account_id of the group rows of usage_deltas that may hold an account''s cells (the account''s own where billing is distributed: no group rows there); read rows with account_id = ANY (ARRAY[account, key]) through billing._delta_rows';

REVOKE ALL ON FUNCTION billing._delta_rows(bigint, bigint, bytea, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._delta_rows(bigint, bigint, bytea, bigint) TO billing_reader;
REVOKE ALL ON FUNCTION billing._delta_key(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._delta_key(bigint) TO billing_reader;
CREATE OR REPLACE VIEW billing.usage_cells AS
    SELECT s.account_id, s.meter, s.dimension, c.bucket_start, c.quantity, c.events,
           c.last_ts, c.last_seq
      FROM billing.usage_days s, billing._day_cells(s.day, s.cells) c
    UNION ALL
    SELECT c.account_id, c.meter, c.dimension, c.bucket_start,
           c.quantity, c.events, c.last_ts,
           CASE WHEN c.last_ts IS NOT NULL THEN c.seq END
      FROM billing.usage_deltas d, billing._delta_rows(d.account_id, d.seq, d.cells, NULL) c;

CREATE OR REPLACE FUNCTION billing._cells_in(p_account bigint, p_from timestamptz, p_to timestamptz,
                                  p_meter text)
    RETURNS TABLE (meter text, dimension text, bucket_start timestamptz, quantity numeric,
                   events bigint, last_ts timestamptz, last_seq bigint)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    keys bigint[] := ARRAY[p_account, billing._delta_key(p_account)];
BEGIN
    RETURN QUERY
    SELECT s.meter::text, s.dimension::text, c.bucket_start, c.quantity, c.events,
           c.last_ts, c.last_seq
      FROM billing.usage_days s, billing._day_cells(s.day, s.cells) c
     WHERE s.account_id = p_account AND (p_meter IS NULL OR s.meter = p_meter)
       AND s.day > p_from - interval '24 hours' AND s.day < p_to
       AND c.bucket_start >= p_from AND c.bucket_start < p_to
    UNION ALL
    SELECT x.meter::text, x.dimension::text, x.bucket_start, x.quantity, x.events, x.last_ts,
           CASE WHEN x.last_ts IS NOT NULL THEN x.seq END
      FROM billing.usage_deltas d, billing._delta_rows(d.account_id, d.seq, d.cells, p_account) x
     WHERE d.account_id = ANY (keys) AND (p_meter IS NULL OR x.meter = p_meter)
       AND x.bucket_start >= p_from AND x.bucket_start < p_to;
END
$$;
COMMENT ON FUNCTION billing._cells_in(bigint, timestamptz, timestamptz, text) IS
    'Internal: the counter cells of an account (and meter) in [from, to), compacted or not, reading only the days of usage_days the range meets';

CREATE OR REPLACE FUNCTION billing._unique_fold(p_account bigint, p_meters text[], p_dims text[],
                                     p_buckets timestamptz[])
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    lo timestamptz;
    hi timestamptz;
    per record;
    cd text[];
    cfb timestamptz[];
    n bigint;
BEGIN
    SELECT min(b), max(b) INTO lo, hi FROM unnest(p_buckets) b;
    IF lo IS NULL THEN
        RETURN;
    END IF;
    -- 1. the rows the cells fall in: new values counted, earlier first buckets kept
    FOR per IN
        SELECT p.meter, p.period_start, p.period_end
          FROM billing.unique_periods p
         WHERE p.account_id = p_account AND p.meter = ANY (p_meters)
           AND p.period_start <= hi AND p.period_end > lo
    LOOP
        SELECT array_agg(y.d), array_agg(y.fb) INTO cd, cfb
          FROM (SELECT x.d, min(x.b) AS fb
                  FROM unnest(p_meters, p_dims, p_buckets) AS x(m, d, b)
                 WHERE x.m = per.meter AND x.b >= per.period_start AND x.b < per.period_end
                 GROUP BY x.d) y;
        CONTINUE WHEN cd IS NULL;
        WITH added AS (
            INSERT INTO billing.unique_values (account_id, meter, period_start, dimension, first_bucket)
            SELECT p_account, per.meter, per.period_start, u.d, u.fb FROM unnest(cd, cfb) AS u(d, fb)
            ON CONFLICT DO NOTHING
            RETURNING 1
        )
        SELECT count(*) INTO n FROM added;
        UPDATE billing.unique_values v SET first_bucket = u.fb
          FROM unnest(cd, cfb) AS u(d, fb)
         WHERE v.account_id = p_account AND v.meter = per.meter
           AND v.period_start = per.period_start AND v.dimension = u.d AND u.fb < v.first_bucket;
        IF n > 0 THEN
            UPDATE billing.unique_periods p SET distinct_count = p.distinct_count + n
             WHERE p.account_id = p_account AND p.meter = per.meter
               AND p.period_start = per.period_start;
        END IF;
    END LOOP;

    -- 2. a row for each billing period holding cells that has none (or one
    -- ending earlier), from every cell of the period counted so far
    FOR per IN
        SELECT m.meter, w.period_start, w.period_end
          FROM (SELECT DISTINCT x.m AS meter FROM unnest(p_meters) AS x(m)) m,
               billing._unique_periods_of(p_account, lo, hi) w
         WHERE EXISTS (SELECT 1 FROM unnest(p_meters, p_buckets) AS x(m, b)
                        WHERE x.m = m.meter AND x.b >= w.period_start AND x.b < w.period_end)
    LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM billing.unique_periods p
                               WHERE p.account_id = p_account AND p.meter = per.meter
                                 AND p.period_start = per.period_start
                                 AND p.period_end >= per.period_end);
        DELETE FROM billing.unique_values v
         WHERE v.account_id = p_account AND v.meter = per.meter AND v.period_start = per.period_start;
        DELETE FROM billing.unique_periods p
         WHERE p.account_id = p_account AND p.meter = per.meter AND p.period_start = per.period_start;
        INSERT INTO billing.unique_values (account_id, meter, period_start, dimension, first_bucket)
        SELECT p_account, per.meter, per.period_start, c.dimension, min(c.bucket_start)
          FROM billing._cells_in(p_account, per.period_start, per.period_end, per.meter) c
         GROUP BY c.dimension;
        GET DIAGNOSTICS n = ROW_COUNT;
        INSERT INTO billing.unique_periods (account_id, meter, period_start, period_end, distinct_count)
        VALUES (p_account, per.meter, per.period_start, per.period_end, n);
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._unique_fold(bigint, text[], text[], timestamptz[]) IS
    'Internal: keeps unique_periods and unique_values for cells of unique meters of one account just compacted';

CREATE OR REPLACE FUNCTION billing._unique_counts(p_account bigint, p_from timestamptz, p_to timestamptz,
                                       p_meters text[], s_meters text[] DEFAULT '{}',
                                       s_dims text[] DEFAULT '{}')
    RETURNS TABLE (meter text, dimension text, quantity numeric)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- the plan cache mode: a level to change it on, for this call only
    SET plan_cache_mode = auto AS $$
#variable_conflict use_column
DECLARE
    mtr text;
    keys bigint[] := ARRAY[p_account, billing._delta_key(p_account)];
    reg record;
    total bigint;
    delta_dims text[];
    seen text[];
    named text[];
    present text[];
BEGIN
    IF p_from >= p_to THEN
        RETURN;
    END IF;
    -- one account: one generic plan per statement and session (a custom
    -- plan for each call planned the statements anew, which took longer
    -- than running them); see _plan_cache_for
    PERFORM billing._plan_cache_for(1);
    FOREACH mtr IN ARRAY p_meters LOOP
        named := ARRAY(SELECT DISTINCT x.d FROM unnest(s_meters, s_dims) AS x(m, d)
                        WHERE x.m = mtr AND x.d IS NOT NULL);
        SELECT p.period_end, p.distinct_count INTO reg
          FROM billing.unique_periods p
         WHERE p.account_id = p_account AND p.meter = mtr AND p.period_start = p_from
           AND p.period_end >= p_to;
        IF FOUND THEN
            -- the values compaction has seen, and those only in the deltas
            IF reg.period_end = p_to THEN
                total := reg.distinct_count;
            ELSE
                SELECT count(*) INTO total FROM billing.unique_values v
                 WHERE v.account_id = p_account AND v.meter = mtr AND v.period_start = p_from
                   AND v.first_bucket < p_to;
            END IF;
            delta_dims := ARRAY(SELECT DISTINCT x.dimension::text
                                  FROM billing.usage_deltas d,
                                       billing._delta_rows(d.account_id, d.seq, d.cells, p_account) x
                                 WHERE d.account_id = ANY (keys) AND x.meter = mtr
                                   AND x.bucket_start >= p_from AND x.bucket_start < p_to);
            IF cardinality(delta_dims) > 0 THEN
                total := total + (SELECT count(*) FROM unnest(delta_dims) AS x(d)
                                   WHERE NOT EXISTS (SELECT 1 FROM billing.unique_values v
                                                      WHERE v.account_id = p_account AND v.meter = mtr
                                                        AND v.period_start = p_from
                                                        AND v.dimension = x.d
                                                        AND v.first_bucket < p_to));
            END IF;
            present := ARRAY(SELECT x.d FROM unnest(named) AS x(d)
                              WHERE x.d = ANY (delta_dims)
                                 OR EXISTS (SELECT 1 FROM billing.unique_values v
                                             WHERE v.account_id = p_account AND v.meter = mtr
                                               AND v.period_start = p_from AND v.dimension = x.d
                                               AND v.first_bucket < p_to));
        ELSE
            -- no row for this period: the cells themselves
            seen := ARRAY(SELECT s FROM billing._unique_scan(p_account, mtr, p_from, p_to) s);
            total := cardinality(seen);
            present := ARRAY(SELECT x.d FROM unnest(named) AS x(d) WHERE x.d = ANY (seen));
        END IF;
        CONTINUE WHEN total = 0;
        RETURN QUERY
        SELECT mtr, x.d, 1::numeric FROM unnest(present) AS x(d)
        UNION ALL
        SELECT mtr, NULL::text, (total - cardinality(present))::numeric
         WHERE total > cardinality(present);
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._unique_counts(bigint, timestamptz, timestamptz, text[], text[], text[]) IS
    'Internal: distinct dimension values of unique meters reported in [from, to) by one account (named dimensions apart)';

CREATE OR REPLACE FUNCTION billing.distribute()
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

    -- group rows of usage_deltas hold the cells of several accounts (one
    -- node only, cells.h): split them into one row per account, which
    -- Citus places on the account's shard
    IF billing._citus_table_kind('billing.usage_deltas') IS NULL THEN
        -- no session writes another group row before the table is
        -- distributed (ingest waits, then writes through Citus)
        LOCK TABLE billing.usage_deltas IN EXCLUSIVE MODE;
        WITH grp AS (
            DELETE FROM billing.usage_deltas d
             WHERE get_byte(d.cells, 0) = 3
            RETURNING d.ctid AS row_id, d.account_id, d.seq, d.cells
        )
        INSERT INTO billing.usage_deltas (account_id, seq, cells)
        SELECT c.account_id, c.seq,
               billing._delta_pack(array_agg(c.meter ORDER BY c.meter, c.dimension, c.bucket_start),
                                   array_agg(c.dimension ORDER BY c.meter, c.dimension, c.bucket_start),
                                   array_agg(c.bucket_start ORDER BY c.meter, c.dimension, c.bucket_start),
                                   array_agg(c.quantity ORDER BY c.meter, c.dimension, c.bucket_start),
                                   array_agg(c.events ORDER BY c.meter, c.dimension, c.bucket_start),
                                   array_agg(c.last_ts ORDER BY c.meter, c.dimension, c.bucket_start))
          FROM grp g, billing._delta_rows(g.account_id, g.seq, g.cells, NULL) c
         GROUP BY g.row_id, c.account_id, c.seq;
    END IF;

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
        ELSIF t.per_account AND NOT billing._citus_colocated(t.rel, 'account_id') THEN
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

-- ---- end of group rows of usage_deltas ----

-- ---- invoice_preview with earlier periods not finalized (sql/install/50_invoices.sql) ----
-- The earlier periods finalize will build first draw credits, count toward
-- minimum windows and take pending adjustments: the preview builds them too.
CREATE OR REPLACE FUNCTION billing._invoice_preview(p_account bigint, p_at timestamptz)
    RETURNS TABLE (r_line_no int, r_kind text, r_meter text, r_description text,
                   r_period_start timestamptz, r_period_end timestamptz,
                   r_quantity numeric, r_amount numeric, r_dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    p record;
    last_end timestamptz;
BEGIN
    -- the period's segments (its spend cap: the last one's)
    SELECT min(s.segment_start) AS ps, max(s.segment_end) AS pe, min(s.currency) AS currency,
           (array_agg(s.spend_cap ORDER BY s.segment_start DESC))[1] AS cap,
           array_agg(s.plan ORDER BY s.segment_start) AS plans,
           array_agg(s.segment_start ORDER BY s.segment_start) AS starts,
           array_agg(s.segment_end ORDER BY s.segment_start) AS ends
      INTO p
      FROM billing._segments(ARRAY[p_account], ARRAY[p_at]) s;
    IF p.plans IS NULL THEN
        RETURN;               -- no subscription at p_at
    END IF;
    -- earlier periods without an invoice: only if the latest invoice before
    -- the period does not end at its start, and a subscription started before
    SELECT i.period_end INTO last_end
      FROM billing.invoices i
     WHERE i.account_id = p_account AND i.period_start < p.ps
     ORDER BY i.period_start DESC LIMIT 1;
    IF last_end IS NOT DISTINCT FROM p.ps
       OR NOT EXISTS (SELECT 1 FROM billing.subscriptions s
                       WHERE s.account_id = p_account AND s.starts_at < p.ps) THEN
        -- the build's rows come in invoice order; without booking, all are lines
        RETURN QUERY
        SELECT b.n::integer, b.kind, b.meter, b.description, p.ps, p.pe, b.quantity, b.amount,
               b.dimension
          FROM billing._invoice_build(ARRAY[p_account], ARRAY[p.currency], ARRAY[p.cap], ARRAY[p.ps],
                                      ARRAY[p.pe], ARRAY[true], array_fill(1, ARRAY[cardinality(p.plans)]),
                                      p.plans, p.starts, p.ends)
                   WITH ORDINALITY AS b(idx, ord, kind, meter, description, quantity, amount,
                                        unrounded_amount, charge_id, price, adjustment_id,
                                        commitment_id, grant_id, segment_start, segment_end,
                                        proration, effective_at, expires_at, source_grant, dimension, n);
        RETURN;
    END IF;
    -- the earlier periods (as finalize_invoices groups them), then this one
    RETURN QUERY
    WITH d AS MATERIALIZED (
        SELECT * FROM billing._due_periods(p.ps, ARRAY[p_account])
    ), per AS (
        -- the earlier periods, then this one (k: its index in the build)
        SELECT y.*, (row_number() OVER (ORDER BY y.period_start))::integer AS k
          FROM (SELECT DISTINCT d.currency, d.spend_cap, d.period_start, d.period_end FROM d
                UNION ALL
                SELECT p.currency, p.cap, p.ps, p.pe) y
    ), seg AS (
        SELECT per.k, d.segment_plan AS plan, d.segment_start, d.segment_end
          FROM d JOIN per ON per.period_start = d.period_start
        UNION ALL
        SELECT per.k, x.plan, x.s, x.e
          FROM per, unnest(p.plans, p.starts, p.ends) AS x(plan, s, e)
         WHERE per.period_start = p.ps
    ), pa AS (
        SELECT array_agg(p_account ORDER BY per.k) AS accounts,
               array_agg(per.currency ORDER BY per.k) AS currencies,
               array_agg(per.spend_cap ORDER BY per.k) AS caps,
               array_agg(per.period_start ORDER BY per.k) AS starts,
               array_agg(per.period_end ORDER BY per.k) AS ends,
               array_agg(per.k = 1 ORDER BY per.k) AS firsts,
               max(per.k) AS this_k
          FROM per
    ), sa AS (
        SELECT array_agg(seg.k ORDER BY seg.k, seg.segment_start) AS idx,
               array_agg(seg.plan ORDER BY seg.k, seg.segment_start) AS plans,
               array_agg(seg.segment_start ORDER BY seg.k, seg.segment_start) AS starts,
               array_agg(seg.segment_end ORDER BY seg.k, seg.segment_start) AS ends
          FROM seg
    )
    SELECT (row_number() OVER (ORDER BY b.n))::integer, b.kind, b.meter, b.description, p.ps, p.pe,
           b.quantity, b.amount, b.dimension
      FROM pa, sa,
           LATERAL billing._invoice_build(pa.accounts, pa.currencies, pa.caps, pa.starts, pa.ends,
                                          pa.firsts, sa.idx, sa.plans, sa.starts, sa.ends)
               WITH ORDINALITY AS b(idx, ord, kind, meter, description, quantity, amount,
                                    unrounded_amount, charge_id, price, adjustment_id,
                                    commitment_id, grant_id, segment_start, segment_end,
                                    proration, effective_at, expires_at, source_grant, dimension, n)
     WHERE b.idx = pa.this_k
     ORDER BY b.n;
END
$$;
COMMENT ON FUNCTION billing._invoice_preview(bigint, timestamptz) IS 'Internal: the body of invoice_preview';

-- ---- end of invoice_preview with earlier periods not finalized ----

-- ---- locks no session outside billing can hold (src/compact.c, src/catalog.c) ----
-- compact_usage, rerate and correct_usage serialized on advisory locks,
-- which any role may take: now on locks of billing's tables.
CREATE FUNCTION billing._lock_table(rel regclass) RETURNS void
    AS 'MODULE_PATHNAME', 'billing_lock_table'
    LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION billing._lock_table(regclass) IS
    'Internal: SHARE UPDATE EXCLUSIVE on a table, on this node, to the end of the transaction, for a role that may UPDATE, DELETE or TRUNCATE it (42501 otherwise): one holder at a time, rows still read and written';

REVOKE ALL ON FUNCTION billing._lock_table(regclass) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._lock_table(regclass) TO billing_reader;
CREATE OR REPLACE FUNCTION billing.correct_usage(account_id bigint, meter text, bucket_start timestamptz,
                                      delta numeric, reason text, dimension text DEFAULT '')
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    m record;
    cur numeric;
BEGIN
    IF account_id IS NULL OR meter IS NULL OR bucket_start IS NULL OR delta IS NULL THEN
        RAISE EXCEPTION 'correct_usage: account_id, meter, bucket_start and delta must not be null'
            USING ERRCODE = '22004';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'a usage correction needs a reason' USING ERRCODE = '22004';
    END IF;
    dimension := coalesce(dimension, '');
    IF octet_length(dimension) > 256 THEN
        RAISE EXCEPTION 'usage dimension is too long'
            USING ERRCODE = '22023', DETAIL = 'A dimension has at most 256 bytes.';
    END IF;
    SELECT * INTO m FROM billing.meters x WHERE x.meter = correct_usage.meter;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'meter "%" does not exist', correct_usage.meter USING ERRCODE = '23503';
    END IF;
    -- the account's row, locked: corrections of one account one at a time
    -- (ingest only adds, so a bucket cannot race below zero), on a lock only
    -- roles that may update accounts can take
    PERFORM 1 FROM billing.accounts a WHERE a.account_id = correct_usage.account_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account % does not exist', correct_usage.account_id USING ERRCODE = '23503';
    END IF;
    IF m.aggregation NOT IN ('sum', 'count') THEN
        RAISE EXCEPTION 'meter "%" has aggregation %', m.meter, m.aggregation
            USING ERRCODE = '22023', DETAIL = 'Only sum and count meters take corrections.';
    END IF;
    IF delta IN ('NaN', 'Infinity', '-Infinity') OR NOT isfinite(bucket_start)
       OR billing._bin(m.bucket_width, bucket_start) <> bucket_start THEN
        RAISE EXCEPTION 'invalid usage correction'
            USING ERRCODE = '22023',
                  DETAIL = format('delta must be a number and bucket_start the start of a %s bucket.', m.bucket_width);
    END IF;
    PERFORM billing._check_quantity(delta, correct_usage.meter, correct_usage.account_id);
    SELECT coalesce(billing._cell_agg(m.aggregation, u.quantity, u.last_ts, u.last_seq), 0) INTO cur
      FROM billing._cells_in(correct_usage.account_id, correct_usage.bucket_start,
                             correct_usage.bucket_start + interval '1 microsecond',
                             correct_usage.meter) u
     WHERE u.dimension = correct_usage.dimension;
    IF cur + delta < 0 THEN
        RAISE EXCEPTION 'correction would make the bucket negative'
            USING ERRCODE = '22023',
                  DETAIL = format('The bucket holds %s; the correction is %s.', cur, delta);
    END IF;
    INSERT INTO billing.usage_deltas (account_id, seq, cells)
    VALUES (correct_usage.account_id, NULL,
            billing._delta_pack(ARRAY[correct_usage.meter], ARRAY[correct_usage.dimension],
                                ARRAY[bucket_start], ARRAY[delta], ARRAY[0::bigint], NULL));
    INSERT INTO billing.usage_corrections (account_id, meter, dimension, bucket_start, delta, reason)
    VALUES (correct_usage.account_id, correct_usage.meter, correct_usage.dimension, bucket_start,
            delta, reason);
END
$$;
COMMENT ON FUNCTION billing.correct_usage(bigint, text, timestamptz, numeric, text, text) IS
    'Adds a signed correction to one bucket of a sum or count meter (any age), with a reason; the next rerate bills its effect';

ALTER FUNCTION billing.correct_usage(bigint, text, timestamptz, numeric, text, text) SECURITY DEFINER;
CREATE OR REPLACE FUNCTION billing._rerate(from_ts timestamptz, to_ts timestamptz, p_account bigint,
                                dry_run boolean, p_reason text)
    RETURNS TABLE (r_account bigint, r_invoice bigint, r_meter text,
                   r_billed_quantity numeric, r_billed_amount numeric,
                   r_correct_quantity numeric, r_correct_amount numeric, r_delta numeric,
                   r_dimension text)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
DECLARE
    n_written bigint;
BEGIN
    IF from_ts IS NULL OR to_ts IS NULL OR dry_run IS NULL THEN
        RAISE EXCEPTION 'rerate: from_ts, to_ts and dry_run must not be null' USING ERRCODE = '22004';
    END IF;
    IF from_ts >= to_ts THEN
        RAISE EXCEPTION 'rerate: from_ts must be before to_ts' USING ERRCODE = '22023';
    END IF;
    IF dry_run THEN
        RETURN QUERY
        SELECT d.account_id, d.invoice_id, d.meter, d.billed_quantity, d.billed_amount,
               d.correct_quantity, d.correct_amount, d.delta, d.dimension
          FROM billing._rerate_diff(from_ts, to_ts, p_account) d
         WHERE d.delta <> 0
         ORDER BY 1, 2, 3, 9 NULLS FIRST;
        RETURN;
    END IF;
    -- one re-rate at a time: a second run waits, then finds the first one's
    -- adjustments (a table lock only roles that may write adjustments take)
    PERFORM billing._lock_table('billing.adjustments');
    RETURN QUERY
    WITH d AS (
        SELECT * FROM billing._rerate_diff(from_ts, to_ts, p_account) x
         WHERE x.delta <> 0
    ), written AS (
        INSERT INTO billing.adjustments (account_id, invoice_id, line_kind, meter, description,
                                         old_quantity, new_quantity, old_amount, new_amount, delta,
                                         reason, segment_start, dimension)
        SELECT d.account_id, d.invoice_id, d.line_kind, d.meter, d.description,
               d.billed_quantity, d.correct_quantity, d.billed_amount, d.correct_amount, d.delta,
               coalesce(p_reason, 're-rate'), d.segment_start, d.dimension
          FROM d
         -- adjustment ids in invoice line order (plan segments; fixed fees,
         -- usage, the cap)
         ORDER BY d.account_id, d.invoice_id, d.segment_start NULLS LAST,
                  CASE d.line_kind WHEN 'fixed' THEN 1 WHEN 'usage' THEN 2 ELSE 3 END,
                  d.description, d.meter, d.dimension NULLS FIRST
    )
    SELECT d.account_id, d.invoice_id, d.meter, d.billed_quantity, d.billed_amount,
           d.correct_quantity, d.correct_amount, d.delta, d.dimension
      FROM d
     ORDER BY 1, 2, 3, 9 NULLS FIRST;
    GET DIAGNOSTICS n_written = ROW_COUNT;
    PERFORM billing._audit_rerate(from_ts, to_ts, p_account, coalesce(p_reason, 're-rate'), n_written);
END
$$;
COMMENT ON FUNCTION billing._rerate(timestamptz, timestamptz, bigint, boolean, text) IS
    'Internal: the body of billing.rerate';

-- ---- end of locks no session outside billing can hold ----

-- ---- the account range of each delta row in its index (src/cells.c, src/totals.c) ----
-- The index of usage_deltas keeps the least and the greatest account with
-- cells in each row (billing._delta_first, _delta_last), so that a reader
-- of one account skips, in the index, the group rows of its block that do
-- not hold it.  On Citus (no group rows there) the index stays on
-- account_id alone, which the readers handle as before.
CREATE FUNCTION billing._delta_first(account_id bigint, cells bytea) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_delta_first'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._delta_first(bigint, bytea) IS
    'Internal: the least account with cells in a row of usage_deltas (its account_id and cells): the row''s own account, or the least of a group row''s';
CREATE FUNCTION billing._delta_last(account_id bigint, cells bytea) RETURNS bigint
    AS 'MODULE_PATHNAME', 'billing_delta_last'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._delta_last(bigint, bytea) IS
    'Internal: the greatest account with cells in a row of usage_deltas (its account_id and cells): the row''s own account, or the greatest of a group row''s';
REVOKE ALL ON FUNCTION billing._delta_first(bigint, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._delta_first(bigint, bytea) TO billing_reader;
REVOKE ALL ON FUNCTION billing._delta_last(bigint, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._delta_last(bigint, bytea) TO billing_reader;
DO $$
BEGIN
    IF billing._citus_table_kind('billing.usage_deltas') IS NULL THEN
        DROP INDEX billing.usage_deltas_account;
        CREATE INDEX usage_deltas_account ON billing.usage_deltas
            (account_id, billing._delta_first(account_id, cells), billing._delta_last(account_id, cells));
    END IF;
END
$$;
-- ---- end of the account range of each delta row in its index ----


-- ---- _unique_counts keeps nested loops on (sql/install/46_unique.sql) ----
-- Rating more than 16 periods turns nested loops off; _unique_counts, which
-- reads one account's rows by index lookups, inherited that, and the
-- disabled loops' cost made the planner read each period's cells in
-- parallel workers.
ALTER FUNCTION billing._unique_counts(bigint, timestamptz, timestamptz, text[], text[], text[])
    SET enable_nestloop = on;
-- ---- end of _unique_counts keeps nested loops on ----

-- ---- invoice_preview: earlier periods booked as finalize books them, and found behind a later invoice (sql/install/50_invoices.sql) ----
-- The earlier periods a preview builds first are booked (a window ending in
-- one rolls its rest over into a grant the previewed period draws from), a
-- period with no invoice is found by _due_periods' walk of each
-- subscription's own grid, and a period already finalized previews as its
-- invoice.
CREATE OR REPLACE FUNCTION billing._invoice_preview(p_account bigint, p_at timestamptz)
    RETURNS TABLE (r_line_no int, r_kind text, r_meter text, r_description text,
                   r_period_start timestamptz, r_period_end timestamptz,
                   r_quantity numeric, r_amount numeric, r_dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    p record;
BEGIN
    -- the period's segments (its spend cap: the last one's)
    SELECT min(s.segment_start) AS ps, max(s.segment_end) AS pe, min(s.currency) AS currency,
           (array_agg(s.spend_cap ORDER BY s.segment_start DESC))[1] AS cap,
           array_agg(s.plan ORDER BY s.segment_start) AS plans,
           array_agg(s.segment_start ORDER BY s.segment_start) AS starts,
           array_agg(s.segment_end ORDER BY s.segment_start) AS ends
      INTO p
      FROM billing._segments(ARRAY[p_account], ARRAY[p_at]) s;
    IF p.plans IS NULL THEN
        RETURN;               -- no subscription at p_at
    END IF;
    -- a period already finalized stands as its invoice: rebuilt, it would
    -- show today's rating and the pending adjustments that correct it
    -- (which go on the next invoice), and draw credits a second time
    IF EXISTS (SELECT 1 FROM billing.invoices i
                WHERE i.account_id = p_account AND i.period_start = p.ps AND i.status = 'finalized') THEN
        RETURN QUERY
        SELECT l.line_no, l.kind, l.meter::text, l.description, i.period_start, i.period_end,
               l.quantity, l.amount, l.dimension::text
          FROM billing.invoices i
               JOIN billing.invoice_lines l ON l.account_id = i.account_id AND l.invoice_id = i.invoice_id
         WHERE i.account_id = p_account AND i.period_start = p.ps AND i.status = 'finalized'
         ORDER BY l.line_no;
        RETURN;
    END IF;
    -- earlier periods without an invoice, by _due_periods' walk: a
    -- subscription that started before the period, whose next period on its
    -- own grid (after the one holding the latest invoice overlapping it, or
    -- its first) ends by the period's start and starts before its own end.
    -- One index probe per subscription of the account; it may say yes when
    -- there is none (the path below then builds this period alone), never
    -- no when there is one.
    IF NOT EXISTS (
        SELECT 1
          FROM billing.subscriptions s
               JOIN billing.plans pl ON pl.plan = s.plan,
               LATERAL (SELECT coalesce(s.period_anchor, s.starts_at) AS anchor) g,
               LATERAL (SELECT max(i.period_start) AS li FROM billing.invoices i
                         WHERE i.account_id = p_account
                           AND i.period_start < coalesce(s.ends_at, 'infinity')
                           AND i.period_end > s.starts_at) l
         WHERE s.account_id = p_account AND s.starts_at < p.ps
           AND greatest(billing._period_index(g.anchor, pl.period, s.starts_at),
                        billing._period_index(g.anchor, pl.period, l.li) + 1)
               <= billing._period_index(g.anchor, pl.period,
                                        least(coalesce(s.ends_at, 'infinity'), p.ps) - interval '1 microsecond')) THEN
        -- the build's rows come in invoice order; without booking, all are lines
        RETURN QUERY
        SELECT b.n::integer, b.kind, b.meter, b.description, p.ps, p.pe, b.quantity, b.amount,
               b.dimension
          FROM billing._invoice_build(ARRAY[p_account], ARRAY[p.currency], ARRAY[p.cap], ARRAY[p.ps],
                                      ARRAY[p.pe], ARRAY[true], array_fill(1, ARRAY[cardinality(p.plans)]),
                                      p.plans, p.starts, p.ends)
                   WITH ORDINALITY AS b(idx, ord, kind, meter, description, quantity, amount,
                                        unrounded_amount, charge_id, price, adjustment_id,
                                        commitment_id, grant_id, segment_start, segment_end,
                                        proration, effective_at, expires_at, source_grant, dimension, n);
        RETURN;
    END IF;
    -- the earlier periods (as finalize_invoices groups them), then this one,
    -- booked as finalize books them: a window ending in an earlier period
    -- rolls its rest over into a grant this period may draw from.  Of this
    -- period's rows only its invoice lines are shown (its own expiries and
    -- rollovers come after its draws).
    RETURN QUERY
    WITH d AS MATERIALIZED (
        SELECT * FROM billing._due_periods(p.ps, ARRAY[p_account])
    ), per AS (
        -- the earlier periods, then this one (k: its index in the build)
        SELECT y.*, (row_number() OVER (ORDER BY y.period_start))::integer AS k
          FROM (SELECT DISTINCT d.currency, d.spend_cap, d.period_start, d.period_end FROM d
                UNION ALL
                SELECT p.currency, p.cap, p.ps, p.pe) y
    ), seg AS (
        SELECT per.k, d.segment_plan AS plan, d.segment_start, d.segment_end
          FROM d JOIN per ON per.period_start = d.period_start
        UNION ALL
        SELECT per.k, x.plan, x.s, x.e
          FROM per, unnest(p.plans, p.starts, p.ends) AS x(plan, s, e)
         WHERE per.period_start = p.ps
    ), pa AS (
        SELECT array_agg(p_account ORDER BY per.k) AS accounts,
               array_agg(per.currency ORDER BY per.k) AS currencies,
               array_agg(per.spend_cap ORDER BY per.k) AS caps,
               array_agg(per.period_start ORDER BY per.k) AS starts,
               array_agg(per.period_end ORDER BY per.k) AS ends,
               array_agg(per.k = 1 ORDER BY per.k) AS firsts,
               max(per.k) AS this_k
          FROM per
    ), sa AS (
        SELECT array_agg(seg.k ORDER BY seg.k, seg.segment_start) AS idx,
               array_agg(seg.plan ORDER BY seg.k, seg.segment_start) AS plans,
               array_agg(seg.segment_start ORDER BY seg.k, seg.segment_start) AS starts,
               array_agg(seg.segment_end ORDER BY seg.k, seg.segment_start) AS ends
          FROM seg
    )
    SELECT (row_number() OVER (ORDER BY b.n))::integer, b.kind, b.meter, b.description, p.ps, p.pe,
           b.quantity, b.amount, b.dimension
      FROM pa, sa,
           LATERAL billing._invoice_build(pa.accounts, pa.currencies, pa.caps, pa.starts, pa.ends,
                                          pa.firsts, sa.idx, sa.plans, sa.starts, sa.ends,
                                          false, true)
               WITH ORDINALITY AS b(idx, ord, kind, meter, description, quantity, amount,
                                    unrounded_amount, charge_id, price, adjustment_id,
                                    commitment_id, grant_id, segment_start, segment_end,
                                    proration, effective_at, expires_at, source_grant, dimension, n)
     WHERE b.idx = pa.this_k AND billing._is_invoice_line(b.kind)
     ORDER BY b.n;
END
$$;
-- ---- end of invoice_preview: earlier periods booked, and found behind a later invoice ----


-- ---- a subscription may not end inside a finalized period of another one (sql/install/40_plans.sql) ----
-- The grid period holding a new end (as the one holding a new start) may
-- not be the grid period of another invoiced subscription: finalize would
-- write a second invoice for it.
CREATE OR REPLACE FUNCTION billing._subscriptions_check() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    acc_currency text;
    plan_currency text;
    per interval;
    anchor timestamptz;
    n integer;
    gs timestamptz;
    k integer;
BEGIN
    SELECT a.currency INTO acc_currency FROM billing.accounts a WHERE a.account_id = NEW.account_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account % does not exist', NEW.account_id USING ERRCODE = '23503';
    END IF;
    SELECT p.currency INTO plan_currency FROM billing.plans p WHERE p.plan = NEW.plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'plan "%" does not exist', NEW.plan USING ERRCODE = '23503';
    END IF;
    IF acc_currency IS DISTINCT FROM plan_currency THEN
        RAISE EXCEPTION 'plan "%" bills in %, account % in %', NEW.plan, plan_currency,
              NEW.account_id, acc_currency
            USING ERRCODE = '22023',
                  HINT = 'Subscribe the account to a plan in its own currency.';
    END IF;
    -- changes to an account's subscriptions one at a time (a row lock: no
    -- lock table entry, however many accounts one statement touches)
    PERFORM 1 FROM billing.accounts a WHERE a.account_id = NEW.account_id FOR NO KEY UPDATE;
    IF EXISTS (SELECT 1 FROM billing.subscriptions s
                WHERE s.account_id = NEW.account_id
                  AND (TG_OP = 'INSERT' OR s.starts_at <> OLD.starts_at)
                  AND s.starts_at < coalesce(NEW.ends_at, 'infinity')
                  AND NEW.starts_at < coalesce(s.ends_at, 'infinity')) THEN
        RAISE EXCEPTION 'subscription of account % from % overlaps another', NEW.account_id, NEW.starts_at
            USING ERRCODE = '23P01',
                  HINT = 'End the current subscription (ends_at) where the next one starts.';
    END IF;
    IF TG_OP = 'UPDATE' AND (NEW.plan IS DISTINCT FROM OLD.plan OR NEW.starts_at IS DISTINCT FROM OLD.starts_at
                             OR NEW.account_id IS DISTINCT FROM OLD.account_id
                             OR NEW.period_anchor IS DISTINCT FROM OLD.period_anchor)
       AND EXISTS (SELECT 1 FROM billing.invoices i
                    WHERE i.account_id = OLD.account_id AND i.period_start < coalesce(OLD.ends_at, 'infinity')
                      AND i.period_end > OLD.starts_at) THEN
        RAISE EXCEPTION 'subscription of account % from % has finalized invoices', OLD.account_id, OLD.starts_at
            USING ERRCODE = '55000',
                  DETAIL = 'Its plan and start cannot change; its end and spend cap can (re-rate to bill the effect).';
    END IF;
    -- a new start, or a new end, must not add a plan segment to a finalized
    -- period: the grid period holding it (on its own grid) may not be the
    -- grid period of an invoiced subscription (change_plan's pieces of one
    -- period share it).  For an end: of another subscription, and only an
    -- end that reaches into a later grid period than before (a
    -- subscription's own end can move back after invoicing: re-rate to
    -- bill the effect).
    IF isfinite(NEW.starts_at) AND coalesce(isfinite(NEW.period_anchor), true)
       AND coalesce(NEW.period_anchor <= NEW.starts_at, true) THEN
        SELECT p.period INTO per FROM billing.plans p WHERE p.plan = NEW.plan;
        anchor := coalesce(NEW.period_anchor, NEW.starts_at);
        FOR k IN 1..2 LOOP
            IF k = 1 THEN
                CONTINUE WHEN NOT (TG_OP = 'INSERT' OR NEW.starts_at IS DISTINCT FROM OLD.starts_at
                                   OR NEW.period_anchor IS DISTINCT FROM OLD.period_anchor);
                n := billing._period_index(anchor, per, NEW.starts_at);
            ELSE
                -- (an end moved earlier, or within its grid period, adds no segment)
                CONTINUE WHEN NEW.ends_at IS NULL OR NOT isfinite(NEW.ends_at)
                           OR NEW.ends_at <= NEW.starts_at;
                n := billing._period_index(anchor, per, NEW.ends_at - interval '1 microsecond');
                CONTINUE WHEN TG_OP = 'UPDATE'
                          AND (OLD.ends_at IS NULL OR NOT isfinite(OLD.ends_at) OR NEW.ends_at <= OLD.ends_at
                               OR n <= billing._period_index(anchor, per, OLD.ends_at - interval '1 microsecond'));
            END IF;
            gs := billing._add_periods(anchor, per, n);
            IF EXISTS (SELECT 1 FROM billing.invoices i
                            JOIN billing.subscriptions s
                              ON s.account_id = i.account_id AND s.starts_at <= i.period_start
                             AND i.period_start < coalesce(s.ends_at, 'infinity')
                            JOIN billing.plans p ON p.plan = s.plan
                        WHERE i.account_id = NEW.account_id AND i.status = 'finalized'
                          AND i.period_start < billing._add_periods(anchor, per, n + 1)
                          AND i.period_end > gs AND p.period = per
                          AND (k = 1 OR TG_OP = 'INSERT' OR s.starts_at <> OLD.starts_at)
                          AND billing._add_periods(coalesce(s.period_anchor, s.starts_at), per,
                                  billing._period_index(coalesce(s.period_anchor, s.starts_at), per,
                                                        i.period_start)) = gs) THEN
                RAISE EXCEPTION 'the billing period of account % from % is already finalized', NEW.account_id, gs
                    USING ERRCODE = '55000',
                          DETAIL = CASE WHEN k = 1
                                        THEN 'A subscription starting there would add a plan segment to a finalized invoice.'
                                        ELSE 'A subscription ending there would add a plan segment to a finalized invoice.' END;
            END IF;
        END LOOP;
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION billing._subscriptions_check() IS
    'Internal: a subscription''s plan must bill in the account''s currency, subscriptions of an account must not overlap, and none may add a plan segment to a finalized period';
-- ---- end of a subscription may not end inside a finalized period of another one ----

-- ---- rerate reads each batch's invoice lines and adjustments as a range of accounts ----
-- (the batch's accounts are in order: a range of the primary key instead of a scan of
-- every account's lines per batch of 1,000)
/*
 * _rerate_diff: for each finalized invoice overlapping [from_ts, to_ts) (of
 * one account or all), what its lines should be today, what was billed
 * (the line plus the adjustments already recorded for it), and the
 * difference.  Lines are matched by plan segment (a period with a plan
 * change has two; NULL: the whole period) and kind, meter and dimension
 * (usage), description (fixed fees) or kind alone (the spend cap); a usage
 * line missing on one side counts 0 units there.  Commitment, true-up and
 * credit lines are never re-rated.  One body on one node and on Citus: the
 * tables are read by plain statements (routed by the accounts on Citus),
 * today's lines by _period_build (functions only), and the comparison
 * reads no table.  The invoices are compared p_chunk accounts at a time:
 * a re-rate of every account needs the memory of p_chunk of them.
 */
CREATE OR REPLACE FUNCTION billing._rerate_diff(from_ts timestamptz, to_ts timestamptz, p_account bigint,
                                     p_chunk integer DEFAULT 1000)
    RETURNS TABLE (account_id bigint, invoice_id bigint, line_kind text, meter text,
                   description text, billed_quantity numeric, billed_amount numeric,
                   correct_quantity numeric, correct_amount numeric, delta numeric,
                   segment_start timestamptz, dimension text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
#variable_conflict use_column
DECLARE
    inv record;     -- the invoices
    bil record;     -- the lines billed, and the adjustments made since
    c_accounts bigint[];        -- the invoices of a batch of accounts
    c_invoices bigint[];
    c_starts timestamptz[];
    lo integer := 1;
    hi integer;
BEGIN
    -- 1. the invoices
    SELECT array_agg(i.account_id ORDER BY i.account_id, i.invoice_id) AS accounts,
           array_agg(i.invoice_id ORDER BY i.account_id, i.invoice_id) AS invoices,
           array_agg(i.period_start ORDER BY i.account_id, i.invoice_id) AS starts
      INTO inv
      FROM billing.invoices i
     WHERE i.status = 'finalized'
       AND i.period_start < to_ts AND i.period_end > from_ts
       AND (p_account IS NULL OR i.account_id = p_account);
    IF inv.accounts IS NULL THEN
        RETURN;
    END IF;
    FOREACH hi IN ARRAY billing._chunk_ends(inv.accounts, p_chunk) LOOP
        c_accounts := inv.accounts[lo:hi];
        c_invoices := inv.invoices[lo:hi];
        c_starts := inv.starts[lo:hi];
        lo := hi + 1;
        -- 2. what was billed: the rated lines, and the adjustments made since
        SELECT array_agg(y.account_id) AS accounts, array_agg(y.invoice_id) AS invoices,
               array_agg(y.kind) AS kinds, array_agg(y.meter) AS meters,
               array_agg(y.description) AS descriptions, array_agg(y.quantity) AS quantities,
               array_agg(y.amount) AS amounts, array_agg(y.segment_start) AS segments,
               array_agg(y.dimension) AS dimensions
          INTO bil
          FROM (SELECT l.account_id, l.invoice_id, l.kind, l.meter::text AS meter, l.description,
                       l.quantity, l.amount, l.segment_start, l.dimension::text AS dimension
                  FROM unnest(c_accounts, c_invoices) v(account_id, invoice_id)
                       JOIN billing.invoice_lines l
                         ON l.account_id = v.account_id AND l.invoice_id = v.invoice_id
                 WHERE l.kind IN ('usage', 'fixed', 'cap')
                   -- the batch's accounts are in order: a range of the primary
                   -- key, not a scan of every account's lines per batch
                   AND l.account_id BETWEEN c_accounts[1] AND c_accounts[cardinality(c_accounts)]
                UNION ALL
                SELECT a.account_id, a.invoice_id, a.line_kind, a.meter::text, a.description,
                       a.new_quantity - a.old_quantity, a.delta, a.segment_start, a.dimension::text
                  FROM unnest(c_accounts, c_invoices) v(account_id, invoice_id)
                       JOIN billing.adjustments a
                         ON a.account_id = v.account_id AND a.invoice_id = v.invoice_id
                 WHERE a.account_id BETWEEN c_accounts[1] AND c_accounts[cardinality(c_accounts)]) y;
        -- 3. compare today's lines of each invoice's period (every plan segment,
        -- the cap; a period no subscription covers any more bills nothing) with
        -- them: in one statement, the lines streamed from _period_build (an
        -- array of them, built and read back, cost 7% of a rerate); it reads
        -- no table
        RETURN QUERY
        WITH invs AS (
            SELECT k.a AS account_id, k.i AS invoice_id, k.s AS period_start
              FROM unnest(c_accounts, c_invoices, c_starts) AS k(a, i, s)
        ), correct AS (
            SELECT invs.account_id, invs.invoice_id, (b.line).kind, (b.line).meter,
                   (b.line).description, (b.line).quantity, (b.line).amount,
                   (b.line).segment_start, coalesce((b.line).segment_start, invs.period_start) AS seg,
                   (b.line).dimension
              FROM billing._period_build(c_accounts, c_starts, true) b
                   JOIN invs ON invs.account_id = b.account_id AND invs.period_start = b.period_start
        ), billed_sum AS (
            SELECT b.account_id, b.invoice_id, b.kind, b.meter, b.dimension::text AS dimension,
                   CASE WHEN b.kind = 'fixed' THEN b.description END AS fixed_key,
                   coalesce(b.segment_start, invs.period_start) AS seg,
                   max(b.segment_start) AS segment_start, max(b.description) AS description,
                   sum(b.quantity) AS quantity, sum(b.amount) AS amount
              FROM unnest(bil.accounts, bil.invoices, bil.kinds, bil.meters, bil.descriptions,
                          bil.quantities, bil.amounts, bil.segments, bil.dimensions)
                       AS b(account_id, invoice_id, kind, meter, description, quantity, amount,
                            segment_start, dimension)
                   JOIN invs ON invs.account_id = b.account_id AND invs.invoice_id = b.invoice_id
             GROUP BY 1, 2, 3, 4, 5, 6, 7
        )
        SELECT coalesce(c.account_id, b.account_id), coalesce(c.invoice_id, b.invoice_id),
               coalesce(c.kind, b.kind), coalesce(c.meter, b.meter),
               coalesce(c.description, b.description),
               -- a usage line missing on either side billed or should bill 0 units
               CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(b.quantity, 0) ELSE b.quantity END,
               coalesce(b.amount, 0),
               CASE WHEN coalesce(c.kind, b.kind) = 'usage' THEN coalesce(c.quantity, 0) ELSE c.quantity END,
               coalesce(c.amount, 0),
               coalesce(c.amount, 0) - coalesce(b.amount, 0),
               coalesce(c.segment_start, b.segment_start), coalesce(c.dimension, b.dimension)
          FROM correct c
               FULL JOIN billed_sum b
                      ON b.account_id = c.account_id AND b.invoice_id = c.invoice_id
                     AND b.seg = c.seg AND b.kind = c.kind
                     AND b.meter IS NOT DISTINCT FROM c.meter
                     AND b.dimension IS NOT DISTINCT FROM c.dimension
                     AND b.fixed_key IS NOT DISTINCT FROM CASE WHEN c.kind = 'fixed' THEN c.description END;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing._rerate_diff(timestamptz, timestamptz, bigint, integer) IS
    'Internal: billed versus correct lines of the finalized invoices overlapping a range, p_chunk accounts at a time';

-- ---- purge_dedupe keeps an event id while a transaction open since before its cutoff ----
-- could still accept a report with it (it judges lateness by its own now()): the cutoff
-- is at most the start of the oldest transaction still open in the database
CREATE FUNCTION billing._oldest_xact_start() RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'billing_oldest_xact_start'
    LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION billing._oldest_xact_start() IS
    'Internal: the earliest start of a transaction still open in this database (client backends and background workers, this one included; src/ingest_claim.c)';

CREATE OR REPLACE FUNCTION billing.purge_dedupe(as_of timestamptz DEFAULT pg_catalog.now())
    RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    n bigint := 0;
    k bigint;
    m record;
BEGIN
    -- An id is kept until its dedupe window has passed (expires_at, set
    -- when it was claimed c: c + dedupe_window) and until no report with its
    -- timestamp can be accepted any more: a report is stamped at most 5
    -- minutes after c and is accepted until its timestamp + late_window.
    -- So an id goes once c + greatest(dedupe_window, late_window + 5 min)
    -- <= as_of, with the meter's windows as they are now.  One delete per
    -- meter (PL/pgSQL: Citus plans each with constants).  Never past now():
    -- an as_of in the future would forget ids that still dedupe.  Nor past
    -- the start of the oldest transaction still open in the database: it
    -- judges lateness by its own now(), so it may still accept a report
    -- whose id a cutoff at this now() would forget.
    IF as_of IS NULL THEN
        RETURN 0;       -- (as 1.0: NULL purges nothing)
    END IF;
    as_of := LEAST(as_of, pg_catalog.now(), billing._oldest_xact_start());
    FOR m IN
        SELECT x.meter,
               as_of - greatest(interval '0', x.late_window + interval '5 minutes' - x.dedupe_window) AS cutoff
          FROM billing.meters x
    LOOP
        DELETE FROM billing.dedupe_keys d WHERE d.meter = m.meter AND d.expires_at <= m.cutoff;
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION billing.purge_dedupe(timestamptz) IS
    'Removes event ids whose dedupe window ended by as_of (at most now(), and at most the start of the oldest transaction still open in the database) and for which no report can be accepted any more (late_window + 5 minutes after the claim); returns how many';
REVOKE ALL ON FUNCTION billing._oldest_xact_start() FROM PUBLIC;
-- (CREATE OR REPLACE made it SECURITY INVOKER: as 99_roles.sql has it)
ALTER FUNCTION billing.purge_dedupe(timestamptz) SECURITY DEFINER;

-- ---- writers that lock, then read what they must not write twice, raise 40001 under ----
-- REPEATABLE READ or SERIALIZABLE when a concurrent transaction committed those rows first
-- (finalize_invoices, grant_credit with an idempotency key, void_credit): 23505 before
CREATE FUNCTION billing._retry_if_snapshot(p_what text) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    -- (READ UNCOMMITTED runs as READ COMMITTED: a violation there is real too)
    IF pg_catalog.current_setting('transaction_isolation') IN ('repeatable read', 'serializable') THEN
        RAISE EXCEPTION '%: a concurrent transaction wrote rows this transaction''s snapshot does not show', p_what
            USING ERRCODE = '40001', HINT = 'Retry the transaction.';
    END IF;
END
$$;
COMMENT ON FUNCTION billing._retry_if_snapshot(text) IS
    'Internal: after a unique violation of a writer that locked first, raises 40001 under REPEATABLE READ or SERIALIZABLE (its snapshot predates the lock); returns under READ COMMITTED (and READ UNCOMMITTED, which runs as it)';

REVOKE ALL ON FUNCTION billing._retry_if_snapshot(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing._retry_if_snapshot(text) TO billing_reader;

CREATE OR REPLACE FUNCTION billing._finalize(p_as_of timestamptz, p_chunk integer DEFAULT 1000)
    RETURNS TABLE (r_invoice_id bigint, r_account_id bigint, r_period_start timestamptz,
                   r_period_end timestamptz, r_total numeric)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp
    -- JIT compiles these large plans for longer than they run
    SET jit = off AS $$
DECLARE
    cutoff timestamptz;
    accs bigint[];      -- the accounts with a subscription, in order
    batch bigint[];     -- p_chunk of them
    chunk bigint[];     -- those of the batch with due periods, locked
    lo integer := 1;
    hi integer;
BEGIN
    IF p_as_of IS NULL THEN
        RAISE EXCEPTION 'finalize_invoices: as_of must not be null' USING ERRCODE = '22004';
    END IF;
    -- never a period that ends after now() - grace, whatever as_of says
    -- (a future or infinite as_of would finalize periods still open)
    cutoff := LEAST(p_as_of, pg_catalog.now()) - billing._grace_period();
    -- on Citus these statements may not call functions that read the
    -- shards: the same invoices, one period at a time (_finalize_citus)
    IF billing._citus_table_kind('billing.invoices') IS NOT NULL THEN
        RETURN QUERY SELECT * FROM billing._finalize_citus(cutoff);
        RETURN;
    END IF;
    SELECT array_agg(DISTINCT s.account_id ORDER BY s.account_id) INTO accs
      FROM billing.subscriptions s;
    IF accs IS NULL THEN
        RETURN;
    END IF;

    -- the invoices' audit rows (a trigger deferred to the commit, for
    -- Citus: 70_audit.sql) written at the end of each statement that
    -- writes invoices and their lines
    SET CONSTRAINTS billing.invoices_audit IMMEDIATE;
    FOREACH hi IN ARRAY billing._chunk_ends(accs, p_chunk) LOOP
        batch := accs[lo:hi];
        lo := hi + 1;
        SELECT array_agg(l.account_id ORDER BY l.account_id) INTO chunk
          FROM (SELECT a.account_id FROM billing.accounts a
                 WHERE a.account_id IN (SELECT d.account_id FROM billing._due_periods(cutoff, batch) d)
                 ORDER BY a.account_id
                   FOR NO KEY UPDATE) l;
        CONTINUE WHEN chunk IS NULL;
        -- (a unique violation: under REPEATABLE READ, a concurrent finalize
        -- committed invoices of the chunk that this snapshot does not show)
        BEGIN
        RETURN QUERY
        WITH d AS MATERIALIZED (
            SELECT * FROM billing._due_periods(cutoff, chunk)
        ), due AS (
            SELECT p.*, nextval('billing.invoice_id_seq') AS invoice_id,
                   (row_number() OVER (ORDER BY p.account_id, p.period_start))::integer AS k,
                   row_number() OVER (PARTITION BY p.account_id ORDER BY p.period_start) = 1 AS first_of_account
              FROM (SELECT DISTINCT d.account_id, d.plan, d.currency, d.spend_cap, d.period_start,
                           d.period_end FROM d) p
        ), pa AS (
            SELECT array_agg(due.account_id ORDER BY due.k) AS accounts,
                   array_agg(due.currency ORDER BY due.k) AS currencies,
                   array_agg(due.spend_cap ORDER BY due.k) AS caps,
                   array_agg(due.period_start ORDER BY due.k) AS starts,
                   array_agg(due.period_end ORDER BY due.k) AS ends,
                   array_agg(due.first_of_account ORDER BY due.k) AS firsts
              FROM due
        ), sa AS (
            SELECT array_agg(due.k ORDER BY due.k, d.segment_start) AS idx,
                   array_agg(d.segment_plan ORDER BY due.k, d.segment_start) AS plans,
                   array_agg(d.segment_start ORDER BY due.k, d.segment_start) AS starts,
                   array_agg(d.segment_end ORDER BY due.k, d.segment_start) AS ends
              FROM d JOIN due ON due.account_id = d.account_id AND due.period_start = d.period_start
        ), built AS MATERIALIZED (
            SELECT due.account_id, due.invoice_id, x.*
              FROM pa, sa,
                   LATERAL billing._invoice_build(pa.accounts, pa.currencies, pa.caps, pa.starts, pa.ends,
                                                  pa.firsts, sa.idx, sa.plans, sa.starts, sa.ends,
                                                  false, true) x
                   JOIN due ON due.k = x.idx
        ), new_grants AS MATERIALIZED (
            SELECT b.account_id, b.grant_id AS placeholder,
                   nextval('billing.credit_grant_id_seq') AS grant_id, b.amount, b.effective_at,
                   b.expires_at, b.source_grant
              FROM built b WHERE b.kind = 'grant'
        ), mapped AS (
            SELECT b.*, coalesce(ng.grant_id, b.grant_id) AS real_grant_id
              FROM built b LEFT JOIN new_grants ng
                     ON ng.account_id = b.account_id AND ng.placeholder = b.grant_id
        ), numbered AS (
            SELECT m.*, (row_number() OVER (PARTITION BY m.invoice_id ORDER BY m.ord))::integer AS line_no
              FROM mapped m
             WHERE billing._is_invoice_line(m.kind)
        ), totals AS (
            SELECT n.invoice_id, sum(n.amount) AS total FROM numbered n GROUP BY n.invoice_id
        ), invoices_written AS (
            INSERT INTO billing.invoices (account_id, invoice_id, plan, period_start, period_end,
                                          currency, total)
            SELECT due.account_id, due.invoice_id, due.plan, due.period_start, due.period_end,
                   due.currency, coalesce(t.total, 0)
              FROM due LEFT JOIN totals t ON t.invoice_id = due.invoice_id
            RETURNING billing.invoices.invoice_id, billing.invoices.account_id,
                      billing.invoices.period_start, billing.invoices.period_end,
                      billing.invoices.total
        ), lines_written AS (
            INSERT INTO billing.invoice_lines (account_id, invoice_id, line_no, kind, meter,
                                              description, quantity, amount, unrounded_amount,
                                              charge_id, price, adjustment_id, segment_start,
                                              segment_end, proration, commitment_id, grant_id, dimension)
            SELECT n.account_id, n.invoice_id, n.line_no, n.kind, n.meter, n.description, n.quantity,
                   n.amount, n.unrounded_amount, n.charge_id, n.price, n.adjustment_id,
                   n.segment_start, n.segment_end, n.proration, n.commitment_id, n.real_grant_id,
                   n.dimension
              FROM numbered n
            RETURNING billing.invoice_lines.account_id, billing.invoice_lines.invoice_id,
                      billing.invoice_lines.adjustment_id
        ), grants_written AS (
            INSERT INTO billing.credit_grants (account_id, grant_id, amount, effective_at, expires_at,
                                               priority, applies_to, source, reason, commitment_id,
                                               window_no, rolled_from)
            SELECT ng.account_id, ng.grant_id, ng.amount, ng.effective_at, ng.expires_at, g.priority,
                   g.applies_to, 'rollover', format('rollover of grant %s', g.grant_id),
                   g.commitment_id, g.window_no + 1, g.grant_id
              FROM new_grants ng
                   JOIN billing.credit_grants g
                     ON g.account_id = ng.account_id AND g.grant_id = ng.source_grant
            RETURNING 1
        ), ledger_written AS (
            INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at,
                                               invoice_id)
            SELECT m.account_id,
                   h.seq + row_number() OVER (PARTITION BY m.account_id ORDER BY m.idx, m.ord),
                   m.real_grant_id, billing._ledger_kind(m.kind), m.amount,
                   m.effective_at, CASE WHEN m.kind = 'credit' THEN m.invoice_id END
              FROM mapped m
                   CROSS JOIN LATERAL (SELECT coalesce(max(x.seq), 0) AS seq FROM billing.credit_ledger x
                                        WHERE x.account_id = m.account_id) h
             WHERE billing._ledger_kind(m.kind) IS NOT NULL
            RETURNING 1
        ), carried AS (
            UPDATE billing.adjustments adj SET billed_invoice_id = w.invoice_id
              FROM lines_written w
             WHERE w.adjustment_id IS NOT NULL AND adj.account_id = w.account_id
               AND adj.adjustment_id = w.adjustment_id
            RETURNING 1
        )
        SELECT w.invoice_id, w.account_id, w.period_start, w.period_end, w.total
          FROM invoices_written w
         ORDER BY w.account_id, w.period_start;
        EXCEPTION WHEN unique_violation THEN
            PERFORM billing._retry_if_snapshot('finalize_invoices');
            RAISE;
        END;
    END LOOP;
    SET CONSTRAINTS billing.invoices_audit DEFERRED;
END
$$;
COMMENT ON FUNCTION billing._finalize(timestamptz, integer) IS
    'Internal: the body of finalize_invoices, p_chunk accounts per statement';


CREATE OR REPLACE FUNCTION billing.grant_credit(account_id bigint, amount numeric,
                                     effective_at timestamptz DEFAULT pg_catalog.now(),
                                     expires_at timestamptz DEFAULT NULL,
                                     priority integer DEFAULT 50, applies_to text[] DEFAULT NULL,
                                     reason text DEFAULT NULL, idempotency_key text DEFAULT NULL)
    RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    cur text;
    id bigint;
BEGIN
    IF account_id IS NULL OR amount IS NULL OR effective_at IS NULL OR priority IS NULL THEN
        RAISE EXCEPTION 'grant_credit: account_id, amount, effective_at and priority must not be null'
            USING ERRCODE = '22004';
    END IF;
    cur := billing._contract_account(grant_credit.account_id);
    IF idempotency_key IS NOT NULL THEN
        SELECT g.grant_id INTO id FROM billing.credit_grants g
         WHERE g.account_id = grant_credit.account_id
           AND g.idempotency_key = grant_credit.idempotency_key;
        IF FOUND THEN
            RETURN id;        -- a repeated key: the first grant
        END IF;
    END IF;
    PERFORM billing._check_money(amount, cur, 'credit');
    IF priority NOT BETWEEN 0 AND 100 THEN
        RAISE EXCEPTION 'invalid priority: %', priority
            USING ERRCODE = '22023', DETAIL = 'A priority is 0 to 100; lower is drawn first.';
    END IF;
    IF NOT isfinite(effective_at) OR NOT coalesce(isfinite(expires_at), true)
       OR expires_at <= effective_at THEN
        RAISE EXCEPTION 'invalid credit window: effective % to %', effective_at, coalesce(expires_at::text, 'never')
            USING ERRCODE = '22023', DETAIL = 'expires_at must be finite and after effective_at (or NULL: never).';
    END IF;
    applies_to := billing._check_applies_to(applies_to);
    BEGIN
        INSERT INTO billing.credit_grants (account_id, amount, effective_at, expires_at, priority,
                                           applies_to, source, reason, idempotency_key)
        VALUES (grant_credit.account_id, billing.round_money(amount, cur), effective_at, expires_at,
                priority, applies_to, 'manual', reason, idempotency_key)
        RETURNING billing.credit_grants.grant_id INTO id;
        INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at)
        VALUES (grant_credit.account_id, billing._ledger_next_seq(grant_credit.account_id), id,
                'grant', billing.round_money(amount, cur), effective_at);
    EXCEPTION WHEN unique_violation THEN
        -- under REPEATABLE READ: the key or a ledger entry of a concurrent
        -- transaction, which this snapshot does not show
        PERFORM billing._retry_if_snapshot('grant_credit');
        RAISE;
    END;
    RETURN id;
END
$$;
COMMENT ON FUNCTION billing.grant_credit(bigint, numeric, timestamptz, timestamptz, integer, text[], text, text) IS
    'Grants an account credit (prepaid or promotional) that invoices draw from; a repeated idempotency_key returns the first grant''s id';


CREATE OR REPLACE FUNCTION billing.void_credit(account_id bigint, grant_id bigint, reason text,
                                    at timestamptz DEFAULT pg_catalog.now())
    RETURNS numeric
    LANGUAGE plpgsql
    SET search_path = pg_catalog, billing, pg_temp AS $$
DECLARE
    g billing.credit_grants;
    left_over numeric;
BEGIN
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'voiding a credit needs a reason' USING ERRCODE = '22004';
    END IF;
    IF account_id IS NULL OR grant_id IS NULL OR at IS NULL THEN
        RAISE EXCEPTION 'void_credit: account_id, grant_id and at must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT isfinite(at) THEN
        RAISE EXCEPTION 'void_credit: at must be finite' USING ERRCODE = '22023';
    END IF;
    PERFORM billing._contract_account(void_credit.account_id);
    SELECT * INTO g FROM billing.credit_grants x
     WHERE x.account_id = void_credit.account_id AND x.grant_id = void_credit.grant_id
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'credit grant % of account % does not exist', void_credit.grant_id,
              void_credit.account_id USING ERRCODE = '23503';
    END IF;
    IF g.voided_at IS NOT NULL THEN
        RETURN 0;             -- voided before: nothing left to forfeit
    END IF;
    -- what is left at `at` is known once every period of the grant's window
    -- that ends by then is finalized: those periods draw from it first
    IF EXISTS (SELECT 1 FROM billing._due_periods(void_credit.at, ARRAY[g.account_id]) d
                WHERE d.period_end > g.effective_at
                  AND (g.expires_at IS NULL OR d.period_start < g.expires_at)) THEN
        RAISE EXCEPTION 'credit grant % of account % would still pay periods that end by %',
              g.grant_id, g.account_id, void_credit.at
            USING ERRCODE = '55000',
                  DETAIL = 'void_credit forfeits what is left of a grant at "at"; periods of its window that end by then and are not finalized yet draw from it first.',
                  HINT = 'Finalize those invoices first (finalize_invoices), or void the grant at an earlier time.';
    END IF;
    SELECT coalesce(sum(l.amount), 0) INTO left_over FROM billing.credit_ledger l
     WHERE l.account_id = g.account_id AND l.grant_id = g.grant_id;
    BEGIN
        UPDATE billing.credit_grants x SET voided_at = void_credit.at, void_reason = void_credit.reason
         WHERE x.account_id = g.account_id AND x.grant_id = g.grant_id;
        INSERT INTO billing.credit_ledger (account_id, seq, grant_id, kind, amount, effective_at)
        VALUES (g.account_id, billing._ledger_next_seq(g.account_id), g.grant_id, 'void', -left_over,
                greatest(at, g.effective_at));
    EXCEPTION WHEN unique_violation THEN
        -- under REPEATABLE READ: a concurrent finalize's ledger entries (its
        -- draws of this grant too), which this snapshot does not show
        PERFORM billing._retry_if_snapshot('void_credit');
        RAISE;
    END;
    RETURN left_over;
END
$$;
COMMENT ON FUNCTION billing.void_credit(bigint, bigint, text, timestamptz) IS
    'Voids a credit grant: what is left of it is forfeited (returned) and booked as void; what was used stays used';

-- (CREATE OR REPLACE made them SECURITY INVOKER: as 99_roles.sql has them)
ALTER FUNCTION billing.grant_credit(bigint, numeric, timestamptz, timestamptz, integer, text[], text, text)
    SECURITY DEFINER;
ALTER FUNCTION billing.void_credit(bigint, bigint, text, timestamptz) SECURITY DEFINER;
