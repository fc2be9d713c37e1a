-- test/helpers.sql: the helper functions the test suites share, in schema
-- "test" (not part of the extension).  pg_regress creates them once, in its
-- "setup" test; a pgTAP file that uses them includes this file with
-- "\ir ../helpers.sql" inside its transaction, so they go away with it.
CREATE SCHEMA IF NOT EXISTS test;
GRANT USAGE ON SCHEMA test TO PUBLIC;

-- sqlstate_of(statement): runs it and returns 'ok', or the SQLSTATE it
-- raised (for errors whose message would hold the current time, or to show
-- many errors in one table)
CREATE OR REPLACE FUNCTION test.sqlstate_of(stmt text) RETURNS text
    LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END
$$;

-- row_count_of(statement): runs it and returns the number of rows it
-- processed (for a COPY, the n of its command tag COPY n)
CREATE OR REPLACE FUNCTION test.row_count_of(stmt text) RETURNS bigint
    LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE stmt;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- show(account, t0, grain, meter): billing.usage() from t0 - 1 day to
-- t0 + 1 day, with bucket starts as offsets from t0
CREATE OR REPLACE FUNCTION test.show(acct bigint, t0 timestamptz, grain interval DEFAULT NULL,
                                     m text DEFAULT NULL)
    RETURNS TABLE (meter text, dimension text, bucket interval, quantity numeric, events bigint)
    LANGUAGE sql AS $$
    SELECT u.meter, u.dimension, u.bucket_start - t0, u.quantity, u.events
      FROM billing.usage(acct, t0 - interval '1 day', t0 + interval '1 day', grain, m) u
$$;

-- finalized_digest(lo, hi): an md5 of what finalize_invoices wrote for the
-- accounts lo..hi, free of the ids sequences hand out (a run rolled back to
-- a savepoint keeps its nextval()s): each invoice by (account, period), its
-- lines, the ledger entries, the rollover grants and the adjustments it
-- carries, each naming an invoice by its period and a rollover grant by the
-- grant its chain of rollovers started from and the windows it went
-- through (a rollover of a rollover has no id that two runs share).  Two
-- runs that wrote the same invoices have the same digest.
CREATE OR REPLACE FUNCTION test.finalized_digest(lo bigint, hi bigint) RETURNS text
    LANGUAGE sql AS $$
    WITH RECURSIVE inv AS (
        SELECT i.account_id, i.invoice_id, i.period_start::text AS per
          FROM billing.invoices i WHERE i.account_id BETWEEN lo AND hi
    ), gr AS (
        SELECT g.account_id, g.grant_id, g.grant_id::text AS name
          FROM billing.credit_grants g
         WHERE g.account_id BETWEEN lo AND hi AND g.source <> 'rollover'
        UNION ALL
        SELECT g.account_id, g.grant_id, 'rollover of ' || r.name || ' into window ' || g.window_no
          FROM billing.credit_grants g
               JOIN gr r ON r.account_id = g.account_id AND r.grant_id = g.rolled_from
         WHERE g.source = 'rollover'
    )
    SELECT md5(concat_ws('|',
        (SELECT string_agg(concat_ws(' ', i.account_id, i.plan, i.period_start, i.period_end,
                                     i.currency, i.total, i.status), ',' ORDER BY i.account_id, i.period_start)
           FROM billing.invoices i WHERE i.account_id BETWEEN lo AND hi),
        (SELECT string_agg(concat_ws(' ', l.account_id, v.per, l.line_no, l.kind, l.meter, l.description,
                                     l.quantity, l.amount, l.unrounded_amount, l.charge_id,
                                     l.segment_start, l.segment_end, l.proration, l.commitment_id,
                                     g.name, l.dimension, l.adjustment_id),
                           ',' ORDER BY l.account_id, v.per, l.line_no)
           FROM billing.invoice_lines l JOIN inv v USING (account_id, invoice_id)
                LEFT JOIN gr g ON g.account_id = l.account_id AND g.grant_id = l.grant_id),
        (SELECT string_agg(concat_ws(' ', e.account_id, e.seq, g.name, e.kind, e.amount, e.effective_at,
                                     v.per), ',' ORDER BY e.account_id, e.seq)
           FROM billing.credit_ledger e LEFT JOIN gr g USING (account_id, grant_id)
                LEFT JOIN inv v USING (account_id, invoice_id)
          WHERE e.account_id BETWEEN lo AND hi),
        -- (not the reason: it names the rolled grant by its id)
        (SELECT string_agg(concat_ws(' ', c.account_id, g.name, c.amount, c.effective_at, c.expires_at,
                                     c.priority, c.applies_to, c.commitment_id, c.window_no),
                           ',' ORDER BY c.account_id, g.name)
           FROM billing.credit_grants c JOIN gr g USING (account_id, grant_id)
          WHERE c.source = 'rollover'),
        (SELECT string_agg(concat_ws(' ', a.account_id, a.adjustment_id, v.per), ','
                           ORDER BY a.account_id, a.adjustment_id)
           FROM billing.adjustments a LEFT JOIN inv v ON v.account_id = a.account_id
                                                    AND v.invoice_id = a.billed_invoice_id
          WHERE a.account_id BETWEEN lo AND hi)))
$$;

-- test.delta_parts(lo, hi): the parts of rows of billing.usage_deltas that
-- hold cells of accounts lo..hi: a row of one account is one part, a group
-- row (one node: the accounts of a block of 64 ids) one per account and
-- arrival number (seq) in it
CREATE OR REPLACE FUNCTION test.delta_parts(lo bigint, hi bigint) RETURNS bigint
    LANGUAGE sql AS $$
    SELECT count(*) FROM (
        SELECT DISTINCT d.ctid, c.account_id, c.seq
          FROM billing.usage_deltas d, billing._delta_rows(d.account_id, d.seq, d.cells, NULL) c
         WHERE c.account_id BETWEEN lo AND hi) p
$$;
