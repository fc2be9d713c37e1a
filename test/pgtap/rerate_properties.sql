-- rerate_properties: 20 accounts (USD and JPY, some capped, some starting
-- mid-month, some ending mid-period) with random usage are finalized; then
-- random late events, corrections, backdated prices, a fee added in the
-- past, changed caps and a moved end; rerate; more of the same after a
-- compaction and a finalize that carries the adjustments; rerate again.
-- After each step, for every finalized invoice and line: what was billed
-- plus every adjustment recorded for it equals an independent rating of the
-- period (the charge version in force at the period start, the quantity
-- read through billing.usage(), rounded per line, the cap line), to the
-- minor unit; a second rerate returns nothing; each adjustment is carried
-- once.
BEGIN;
SELECT plan(27);
SELECT setseed(0.0606);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;
\ir ../helpers.sql

INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('pp_err', 'sum', '100 years'), ('pp_gb', 'sum', '100 years'), ('pp_seat', 'max', '100 years');
INSERT INTO billing.plans (plan, currency) VALUES ('pp_usd', 'USD'), ('pp_jpy', 'JPY');
INSERT INTO billing.charges (plan, meter, price, valid_from, description) VALUES
    ('pp_usd', NULL, 'flat 10', '-infinity', 'Base'),
    ('pp_usd', 'pp_err', 'graduated 1000 @ 0 | 5000 @ 0.0033 | inf @ 0.0021', '-infinity', 'Errors'),
    ('pp_usd', 'pp_gb', 'unit 0.125', '-infinity', 'Storage'),
    ('pp_usd', 'pp_seat', 'volume 5 @ 2 | inf @ 1.5', '-infinity', 'Seats'),
    ('pp_jpy', NULL, 'flat 1000', '-infinity', 'Base'),
    ('pp_jpy', 'pp_err', 'unit 0.35', '-infinity', 'Errors'),
    ('pp_jpy', 'pp_gb', 'unit 12.5', '-infinity', 'Storage');
INSERT INTO billing.accounts (account_id, currency)
SELECT a, CASE WHEN a <= 7215 THEN 'USD' ELSE 'JPY' END FROM generate_series(7201, 7220) AS a;
-- every 4th starts on the 10th at noon, every 7th ends Mar 15, every 3rd is capped
INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at, spend_cap)
SELECT a, CASE WHEN a <= 7215 THEN 'pp_usd' ELSE 'pp_jpy' END,
       CASE WHEN a % 4 = 0 THEN timestamptz '2024-01-10 12:00' ELSE timestamptz '2024-01-01' END,
       CASE WHEN a % 7 = 0 THEN timestamptz '2024-03-15' END,
       CASE WHEN a % 3 = 0 THEN CASE WHEN a <= 7215 THEN round((5 + random() * 20)::numeric, 2)
                                     ELSE round((1100 + random() * 1500)::numeric) END END
  FROM generate_series(7201, 7220) AS a;

-- n random usage reports between lo and hi
CREATE FUNCTION pg_temp.random_usage(n int, lo timestamptz, hi timestamptz) RETURNS int
    LANGUAGE plpgsql AS $$
DECLARE
    m text;
BEGIN
    FOR i IN 1..n LOOP
        m := (ARRAY['pp_err', 'pp_err', 'pp_gb', 'pp_seat'])[1 + floor(random() * 4)::int];
        PERFORM billing.record(7201 + floor(random() * 20)::int, m,
                               CASE m WHEN 'pp_err' THEN floor(random() * 800)::numeric
                                      WHEN 'pp_gb' THEN round(random()::numeric * 3, 3)
                                      ELSE floor(random() * 9)::numeric END,
                               lo + random() * (hi - lo));
    END LOOP;
    RETURN n;
END $$;

-- n random corrections of error buckets, down (never below 0) or up
CREATE FUNCTION pg_temp.random_corrections(n int) RETURNS int
    LANGUAGE plpgsql AS $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT u.account_id, u.bucket_start, sum(u.quantity) AS q
               FROM billing.usage_cells u
              WHERE u.meter = 'pp_err' AND u.account_id BETWEEN 7201 AND 7220 AND u.dimension = ''
              GROUP BY 1, 2 HAVING sum(u.quantity) > 0
              ORDER BY random() LIMIT n LOOP
        PERFORM billing.correct_usage(c.account_id, 'pp_err', c.bucket_start,
                                      CASE WHEN random() < 0.7 THEN -floor(c.q * random()::numeric)
                                           ELSE floor(random() * 500)::numeric END,
                                      'property test');
    END LOOP;
    RETURN n;
END $$;

-- Independent rating of the period of an account's invoice that starts at
-- p_start, as today's data says it should be billed: per line key (kind,
-- meter, fixed fee description) the rounded amount.  Periods here are
-- whole months from the 1st or the 10th, cut at ends_at.
CREATE FUNCTION pg_temp.reference(acc bigint, p_start timestamptz)
    RETURNS TABLE (kind text, meter text, fkey text, amount numeric)
    LANGUAGE sql AS $$
    WITH s AS (
        SELECT s.spend_cap, p.plan, p.currency,
               LEAST(((p_start AT TIME ZONE 'UTC') + p.period) AT TIME ZONE 'UTC', s.ends_at) AS p_end
          FROM billing.subscriptions s JOIN billing.plans p USING (plan)
         WHERE s.account_id = acc AND s.starts_at <= p_start
           AND p_start < coalesce(s.ends_at, 'infinity')
    ), v AS (
        SELECT DISTINCT ON (c.meter, CASE WHEN c.meter IS NULL THEN c.description END)
               c.meter, c.description, c.price
          FROM billing.charges c, s
         WHERE c.plan = s.plan AND c.valid_from <= p_start
         ORDER BY c.meter, CASE WHEN c.meter IS NULL THEN c.description END, c.valid_from DESC
    ), q AS (
        SELECT u.meter, CASE WHEN max(m.aggregation) = 'max' THEN max(u.quantity) ELSE sum(u.quantity) END AS q
          FROM s, billing.usage(acc, p_start, s.p_end) u JOIN billing.meters m ON m.meter = u.meter
         GROUP BY u.meter
    ), lines AS (
        SELECT CASE WHEN v.meter IS NULL THEN 'fixed' ELSE 'usage' END AS kind, v.meter::text AS meter,
               CASE WHEN v.meter IS NULL THEN v.description END AS fkey,
               billing.round_money(billing.rate(v.price, CASE WHEN v.meter IS NULL THEN 0
                                                              ELSE coalesce(q.q, 0) END), s.currency) AS amount
          FROM v CROSS JOIN s LEFT JOIN q ON q.meter = v.meter
    )
    SELECT * FROM lines
    UNION ALL
    SELECT 'cap', NULL, NULL, billing.round_money(s.spend_cap, s.currency) - sum(l.amount)
      FROM lines l, s
     WHERE l.kind = 'usage' AND s.spend_cap IS NOT NULL
     GROUP BY s.spend_cap, s.currency
    HAVING sum(l.amount) > billing.round_money(s.spend_cap, s.currency)
$$;

-- what each finalized invoice billed per line key: its own lines plus
-- every adjustment recorded against it
CREATE FUNCTION pg_temp.billed(acc bigint, inv bigint)
    RETURNS TABLE (kind text, meter text, fkey text, amount numeric)
    LANGUAGE sql AS $$
    SELECT kind, meter, fkey, sum(amount)
      FROM (SELECT l.kind, l.meter::text AS meter, CASE WHEN l.kind = 'fixed' THEN l.description END AS fkey,
                   l.amount
              FROM billing.invoice_lines l
             WHERE l.account_id = acc AND l.invoice_id = inv AND l.kind <> 'adjustment'
            UNION ALL
            SELECT a.line_kind, a.meter::text, CASE WHEN a.line_kind = 'fixed' THEN a.description END, a.delta
              FROM billing.adjustments a
             WHERE a.account_id = acc AND a.invoice_id = inv) x
     GROUP BY 1, 2, 3
$$;

-- (invoice, line key) pairs where billed + adjustments differ from the reference
CREATE FUNCTION pg_temp.mismatches()
    RETURNS TABLE (account_id bigint, period_start timestamptz, kind text, meter text, fkey text,
                   billed numeric, reference numeric)
    LANGUAGE sql AS $$
    SELECT i.account_id, i.period_start, coalesce(b.kind, r.kind), coalesce(b.meter, r.meter),
           coalesce(b.fkey, r.fkey), b.amount, r.amount
      FROM billing.invoices i,
           LATERAL (SELECT b.kind, b.meter, b.fkey, b.amount FROM pg_temp.billed(i.account_id, i.invoice_id) b) b
           FULL JOIN LATERAL (SELECT r.kind, r.meter, r.fkey, r.amount
                                FROM pg_temp.reference(i.account_id, i.period_start) r) r
                  ON r.kind = b.kind AND r.meter IS NOT DISTINCT FROM b.meter
                 AND r.fkey IS NOT DISTINCT FROM b.fkey
     WHERE i.account_id BETWEEN 7201 AND 7220
       AND coalesce(b.amount, 0) <> coalesce(r.amount, 0)
$$;

-- 1. random usage for January to March, finalize
DO $$ BEGIN PERFORM pg_temp.random_usage(600, '2024-01-01', '2024-04-01'); END $$;
SELECT cmp_ok((SELECT count(*)::int FROM billing.finalize_invoices('2024-04-01 01:00')
                WHERE account_id BETWEEN 7201 AND 7220), '>=', 45, 'finalized the periods of 20 accounts');
SELECT is_empty($$SELECT * FROM pg_temp.mismatches()$$,
                'finalized invoices match the independent rating');
SELECT ok((SELECT count(*) FROM billing.invoice_lines WHERE account_id BETWEEN 7201 AND 7220 AND kind = 'cap') > 0,
          'some invoices have a cap line');
SELECT is_empty($$SELECT * FROM billing.rerate('2024-01-01', '2024-05-01')$$, 'nothing to re-rate yet');

-- 2. late events, corrections, a backdated price, a fee added in the past,
--    changed caps and a moved end
DO $$ BEGIN PERFORM pg_temp.random_usage(150, '2024-01-01', '2024-04-01'); END $$;
DO $$ BEGIN PERFORM pg_temp.random_corrections(15); END $$;
INSERT INTO billing.charges (plan, meter, price, valid_from, description) VALUES
    ('pp_usd', 'pp_err', 'graduated 1000 @ 0 | 5000 @ 0.004 | inf @ 0.0025', '2024-02-01', 'Errors'),
    ('pp_usd', NULL, 'flat 3', '2024-02-15', 'Support');
UPDATE billing.subscriptions SET spend_cap = round((3 + random() * 10)::numeric, 2)
 WHERE account_id IN (7201, 7202, 7206, 7212);
UPDATE billing.subscriptions SET spend_cap = NULL WHERE account_id = 7209;
UPDATE billing.subscriptions SET ends_at = '2024-02-20' WHERE account_id = 7205;
SELECT isnt_empty($$SELECT * FROM pg_temp.mismatches()$$,
                  'the changes make finalized invoices stale (the reference sees them)');
-- batches end at the last row of every p_per-th account, never inside an account
SELECT is(ARRAY[billing._chunk_ends('{1,1,2,3,3,3,4}', 2)::text, billing._chunk_ends('{1,1,2,3,3,3,4}', 1)::text,
                billing._chunk_ends('{1,1,2,3,3,3,4}', 1000)::text, billing._chunk_ends('{5}', 0)::text,
                billing._chunk_ends('{7,7,7}', 1)::text],
          ARRAY['{3,7}', '{2,3,6,7}', '{7}', '{1}', '{3}'],
          '_chunk_ends: the last row of each run of p_per accounts');
-- the comparison runs in batches of accounts: one per statement, or 7,
-- finds what one statement over every account finds
SELECT is_empty($$(SELECT * FROM billing._rerate_diff('2024-01-01', '2024-05-01', NULL, 1)
                   EXCEPT ALL SELECT * FROM billing._rerate_diff('2024-01-01', '2024-05-01', NULL, 1000))
                  UNION ALL
                  (SELECT * FROM billing._rerate_diff('2024-01-01', '2024-05-01', NULL, 1000)
                   EXCEPT ALL SELECT * FROM billing._rerate_diff('2024-01-01', '2024-05-01', NULL, 1))$$,
                'rerate compares the same lines one account per statement as every account in one');
CREATE TEMP TABLE pp_round1 AS
SELECT * FROM billing.rerate('2024-01-01', '2024-05-01');
SELECT cmp_ok((SELECT count(*)::int FROM pp_round1), '>', 20, 're-rating round 1 found deltas');
SELECT ok((SELECT count(*) FROM pp_round1 WHERE meter IS NULL) > 0
          AND (SELECT count(*) FROM pp_round1 WHERE meter = 'pp_err') > 0,
          'round 1 has usage, fixed and cap deltas');
SELECT is((SELECT count(*)::int FROM pp_round1 WHERE delta = 0), 0, 'only non-zero deltas are returned');
SELECT is((SELECT count(*)::int FROM pp_round1),
          (SELECT count(*)::int FROM billing.adjustments WHERE account_id BETWEEN 7201 AND 7220),
          'one adjustment per returned row');
SELECT is_empty($$SELECT * FROM pg_temp.mismatches()$$,
                'after round 1: billed + adjustments = the independent rating, line by line');
SELECT is_empty($$SELECT * FROM billing.rerate('2024-01-01', '2024-05-01')$$, 'a second rerate returns nothing');
SELECT is_empty($$SELECT * FROM billing.rerate('2024-01-01', '2024-05-01', NULL, true)$$,
                'a dry run returns nothing either');
-- 7205's March invoice is no longer covered by its subscription: refunded in full
SELECT is((SELECT sum(b.amount) FROM billing.invoices i, pg_temp.billed(i.account_id, i.invoice_id) b
            WHERE i.account_id = 7205 AND i.period_start = '2024-03-01'), 0::numeric,
          'a period after a moved end is refunded in full');

-- 3. the April preview shows the pending adjustments; finalizing April
--    carries each of them once
SELECT is((SELECT coalesce(sum(p.amount), 0) FROM generate_series(7201, 7220) AS a,
                  billing.invoice_preview(a, '2024-04-15') p WHERE p.kind = 'adjustment'),
          (SELECT sum(a.delta) FROM billing.adjustments a
            WHERE a.account_id BETWEEN 7201 AND 7220 AND a.billed_invoice_id IS NULL
              AND EXISTS (SELECT 1 FROM billing.subscriptions s WHERE s.account_id = a.account_id
                             AND s.starts_at <= '2024-04-15' AND coalesce(s.ends_at, 'infinity') > '2024-04-15')
              -- (an account anchored on the 10th has March 10 - April 10 still
              -- open: finalize puts its adjustments there, and so does the preview)
              AND NOT EXISTS (SELECT 1 FROM billing._due_periods('2024-04-15', ARRAY[a.account_id]))),
          'previews show the pending adjustments of accounts with a current period and no earlier one open');
DO $$ BEGIN PERFORM billing.compact_usage(); END $$;
DO $$ BEGIN PERFORM pg_temp.random_usage(100, '2024-01-01', '2024-05-01'); END $$;
DO $$ BEGIN PERFORM pg_temp.random_corrections(10); END $$;
INSERT INTO billing.charges (plan, meter, price, valid_from, description) VALUES
    ('pp_jpy', 'pp_err', 'unit 0.4', '2024-01-01', 'Errors');
SAVEPOINT batches;
CREATE TEMP TABLE april_batched AS SELECT * FROM billing._finalize('2024-05-01 01:00', 1);
SELECT test.finalized_digest(7201, 7220) AS digest_batched \gset
ROLLBACK TO SAVEPOINT batches;
SELECT cmp_ok((SELECT count(*)::int FROM billing.finalize_invoices('2024-05-01 01:00')
                WHERE account_id BETWEEN 7201 AND 7220), '>=', 15, 'April finalized');
SELECT is(test.finalized_digest(7201, 7220), :'digest_batched',
          'finalizing April one account per statement writes the same invoices and carries the same adjustments');
SELECT is((SELECT count(*)::int FROM billing.invoice_lines WHERE account_id BETWEEN 7201 AND 7220 AND kind = 'adjustment'),
          (SELECT count(DISTINCT adjustment_id)::int FROM billing.invoice_lines
            WHERE account_id BETWEEN 7201 AND 7220 AND kind = 'adjustment'),
          'no adjustment is on two lines');
SELECT is_empty($$SELECT a.adjustment_id
                    FROM billing.adjustments a
                    LEFT JOIN billing.invoice_lines l
                           ON l.account_id = a.account_id AND l.adjustment_id = a.adjustment_id
                   WHERE a.account_id BETWEEN 7201 AND 7220
                     AND (a.billed_invoice_id IS NOT NULL
                          AND (l.invoice_id IS DISTINCT FROM a.billed_invoice_id OR l.amount <> a.delta)
                          OR a.billed_invoice_id IS NULL
                             AND EXISTS (SELECT 1 FROM billing.invoices i
                                          WHERE i.account_id = a.account_id AND i.period_start >= '2024-04-01'))$$,
                'each adjustment is carried once, with its delta, by the account''s next invoice');

-- 4. re-rate everything again
SELECT isnt_empty($$SELECT * FROM pg_temp.mismatches()$$, 'round 2 changes make invoices stale again');
SELECT is_empty($$(SELECT * FROM billing._rerate_diff('2024-01-01', '2024-06-01', NULL, 7)
                   EXCEPT ALL SELECT * FROM billing._rerate_diff('2024-01-01', '2024-06-01', NULL, 1000))
                  UNION ALL
                  (SELECT * FROM billing._rerate_diff('2024-01-01', '2024-06-01', NULL, 1000)
                   EXCEPT ALL SELECT * FROM billing._rerate_diff('2024-01-01', '2024-06-01', NULL, 7))$$,
                'with adjustments recorded, batches of 7 accounts compare the same lines');
CREATE TEMP TABLE pp_round2 AS
SELECT * FROM billing.rerate('2024-01-01', '2024-06-01');
SELECT cmp_ok((SELECT count(*)::int FROM pp_round2), '>', 10, 're-rating round 2 found deltas');
SELECT is_empty($$SELECT * FROM pg_temp.mismatches()$$,
                'after round 2: billed + adjustments = the independent rating, line by line');
SELECT is_empty($$SELECT * FROM billing.rerate('2024-01-01', '2024-06-01')$$, 'a second rerate returns nothing');
SELECT is_empty($$SELECT i.account_id, i.invoice_id FROM billing.invoices i
                   WHERE i.account_id BETWEEN 7201 AND 7220
                     AND i.total <> (SELECT sum(l.amount) FROM billing.invoice_lines l
                                      WHERE l.account_id = i.account_id AND l.invoice_id = i.invoice_id)$$,
                'every total is the sum of its lines');
SELECT is_empty($$SELECT * FROM billing.verify_invoices() WHERE account_id BETWEEN 7201 AND 7220$$,
                'verify_invoices finds nothing');

SELECT * FROM finish();
ROLLBACK;
