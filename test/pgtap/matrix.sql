-- matrix: charges with a dimension (issue 18 part 2, SPEC 10.1).  A charge
-- with a dimension rates only its meter's usage of that dimension; one
-- with a NULL dimension the dimensions no other charge of the (plan, meter)
-- in force names.  (1) Random seeded usage of sum, count, max and last
-- meters over six dimension values, on plans with named dimensions and a
-- rest, named dimensions only, and no dimensions: every usage line of the
-- preview equals a brute-force aggregation of the period's cells (deltas
-- only, compacted, compacted plus new deltas), and the finalized lines
-- equal the preview.  (2) Versions per (plan, meter, dimension).  (3) A
-- retroactive price change of one dimension, and a dimension named
-- retroactively, re-rated line by line.  (4) The spend cap and remaining
-- per dimension.  (5) Keys, checks and guards.
BEGIN;
SELECT plan(26);
SELECT setseed(0.1842);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;

INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('mx_sum', 'sum', '100 years'), ('mx_cnt', 'count', '100 years'),
    ('mx_max', 'max', '100 years'), ('mx_last', 'last', '100 years');
INSERT INTO billing.plans (plan) VALUES ('mx_a'), ('mx_b'), ('mx_c');
-- mx_a: eu and us apart, the rest together; mx_b: '' and ap only (no
-- rest: other dimensions are not billed); mx_c: one line per meter
INSERT INTO billing.charges (plan, meter, dimension, price)
SELECT 'mx_a', m, d, ('unit ' || p)::billing.price
  FROM unnest('{mx_sum,mx_cnt,mx_max,mx_last}'::text[]) m,
       (VALUES (NULL, 1), ('eu', 2), ('us', 3)) AS x(d, p)
UNION ALL
SELECT 'mx_b', m, d, ('unit ' || p)::billing.price
  FROM unnest('{mx_sum,mx_cnt,mx_max,mx_last}'::text[]) m, (VALUES ('', 4), ('ap', 5)) AS x(d, p)
UNION ALL
SELECT 'mx_c', m, NULL, 'unit 1' FROM unnest('{mx_sum,mx_cnt,mx_max,mx_last}'::text[]) m;
INSERT INTO billing.charges (plan, meter, price, description) VALUES ('mx_a', NULL, 'flat 7', 'Base');
INSERT INTO billing.accounts (account_id) SELECT generate_series(9401, 9412);
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
SELECT a, (ARRAY['mx_a', 'mx_b', 'mx_c'])[1 + a % 3], '2025-03-01 00:00' FROM generate_series(9401, 9412) a;

-- n random reports in March and April 2025 (the last meter gets ties of
-- timestamps on purpose: minute steps)
CREATE FUNCTION pg_temp.send(n integer) RETURNS void LANGUAGE sql AS $$
    SELECT count(billing.record(9401 + floor(random() * 12)::int,
                                (ARRAY['mx_sum', 'mx_cnt', 'mx_max', 'mx_last'])[1 + floor(random() * 4)::int],
                                round((random() * 1000)::numeric, 2),
                                timestamptz '2025-03-01' + interval '1 minute' * floor(random() * 86400),
                                NULL,
                                (ARRAY['', 'eu', 'us', 'ap', 'sa', 'af'])[1 + floor(random() * 6)::int]))
      FROM generate_series(1, n)
$$;

-- the usage lines of the previews at two instants, and the brute force: per
-- line, the cells of the period with the line's dimension, or (dimension
-- NULL) with none of the dimensions the plan names for the meter
CREATE FUNCTION pg_temp.lines() RETURNS TABLE (account_id bigint, at timestamptz, meter text,
                                              dimension text, quantity numeric)
LANGUAGE sql AS $$
    SELECT a, at, p.meter, p.dimension, p.quantity
      FROM generate_series(9401::bigint, 9412) a,
           unnest('{2025-03-20,2025-04-10}'::timestamptz[]) at, billing.invoice_preview(a, at) p
     WHERE p.kind = 'usage'
$$;
CREATE FUNCTION pg_temp.brute() RETURNS TABLE (account_id bigint, at timestamptz, meter text,
                                              dimension text, quantity numeric)
LANGUAGE sql AS $$
    SELECT s.account_id, at, c.meter, c.dimension,
           coalesce((SELECT CASE m.aggregation
                                WHEN 'max' THEN max(u.quantity)
                                WHEN 'last' THEN (array_agg(u.quantity ORDER BY u.last_ts DESC,
                                                            u.last_seq DESC, u.quantity DESC))[1]
                                ELSE sum(u.quantity) END
                       FROM billing.usage_cells u
                      WHERE u.account_id = s.account_id AND u.meter = c.meter
                        AND u.bucket_start >= date_trunc('month', at)
                        AND u.bucket_start < date_trunc('month', at) + interval '1 month'
                        AND CASE WHEN c.dimension IS NOT NULL THEN u.dimension = c.dimension
                                 ELSE u.dimension <> ALL (SELECT o.dimension FROM billing.charges o
                                                           WHERE o.plan = c.plan AND o.meter = c.meter
                                                             AND o.dimension IS NOT NULL) END), 0)
      FROM billing.subscriptions s
           CROSS JOIN unnest('{2025-03-20,2025-04-10}'::timestamptz[]) at
           JOIN billing.charges c ON c.plan = s.plan AND c.meter IS NOT NULL
           JOIN billing.meters m ON m.meter = c.meter
     WHERE s.account_id BETWEEN 9401 AND 9412
$$;

-- (1) ---------------------------------------------------------------------------------------
SELECT pg_temp.send(3000);
SELECT ok((SELECT count(*) FILTER (WHERE dimension IS NOT NULL) >= 100
              AND count(*) FILTER (WHERE dimension IS NULL) >= 50
              AND count(*) FILTER (WHERE quantity > 0) >= 150 FROM pg_temp.brute()),
          'usage on named dimensions and on the rest, in both months');
SELECT set_eq('SELECT * FROM pg_temp.lines()', 'SELECT * FROM pg_temp.brute()',
              'deltas only: every matrix line equals the brute force');
SELECT ok(billing.compact_usage() > 0, 'compacted into buckets and roll-ups');
SELECT set_eq('SELECT * FROM pg_temp.lines()', 'SELECT * FROM pg_temp.brute()',
              'compacted: every matrix line equals the brute force');
SELECT pg_temp.send(800);
SELECT set_eq('SELECT * FROM pg_temp.lines()', 'SELECT * FROM pg_temp.brute()',
              'compacted plus new deltas: every matrix line equals the brute force');
SELECT is((SELECT count(*) FROM pg_temp.lines() l JOIN billing.subscriptions s USING (account_id)
            WHERE s.plan = 'mx_b' AND l.dimension IS NULL), 0::bigint,
          'a plan without a NULL-dimension charge bills no rest');
-- the rest takes what the named lines do not: for sum meters they add up
SELECT is((SELECT count(*) FROM (
              SELECT l.account_id, l.at, sum(l.quantity) AS q
                FROM pg_temp.lines() l JOIN billing.subscriptions s USING (account_id)
               WHERE s.plan = 'mx_a' AND l.meter = 'mx_sum' GROUP BY 1, 2) x
            WHERE x.q IS DISTINCT FROM (SELECT coalesce(sum(u.quantity), 0) FROM billing.usage_cells u
                                         WHERE u.account_id = x.account_id AND u.meter = 'mx_sum'
                                           AND u.bucket_start >= date_trunc('month', x.at)
                                           AND u.bucket_start < date_trunc('month', x.at) + interval '1 month')),
          0::bigint, 'named lines plus the rest bill every unit of a sum meter once');
SELECT results_eq($$SELECT description, dimension FROM billing.invoice_preview(9402, '2025-03-20')
                     WHERE meter = 'mx_sum' ORDER BY line_no$$,
                  $$VALUES ('mx_sum'::text, NULL::text), ('mx_sum (eu)', 'eu'), ('mx_sum (us)', 'us')$$,
                  'lines in order: the rest, then each dimension, named after it');

SELECT ok((SELECT count(*) FROM billing.finalize_invoices('2025-05-01 02:00') f
            WHERE f.account_id BETWEEN 9401 AND 9412) = 24, 'finalize: March and April for 12 accounts');
SELECT set_eq($$SELECT i.account_id, l.meter::text, l.dimension::text, l.quantity, l.amount
                  FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
                 WHERE i.account_id BETWEEN 9401 AND 9412 AND i.period_start = '2025-03-01'
                   AND l.kind = 'usage'$$,
              $$SELECT a, p.meter, p.dimension, p.quantity, p.amount
                  FROM generate_series(9401::bigint, 9412) a, billing.invoice_preview(a, '2025-03-20') p
                 WHERE p.kind = 'usage'$$,
              'finalized lines carry the dimension and equal the preview');
SELECT is_empty($$SELECT * FROM billing.verify_invoices() WHERE account_id BETWEEN 9401 AND 9412$$,
                'verify_invoices finds nothing wrong');
SELECT is_empty($$SELECT * FROM billing.rerate('2025-03-01', '2025-05-01', dry_run => true)
                   WHERE account_id BETWEEN 9401 AND 9412$$,
                'nothing changed: rerate finds no difference on any matrix line');

-- (2) versions per (plan, meter, dimension) ------------------------------------------------
INSERT INTO billing.meters (meter, late_window) VALUES ('mx_tok', '100 years');
INSERT INTO billing.plans (plan) VALUES ('mx_v');
INSERT INTO billing.charges (plan, meter, dimension, price, valid_from) VALUES
    ('mx_v', 'mx_tok', NULL, 'unit 1', '-infinity'),
    ('mx_v', 'mx_tok', 'gpt', 'unit 2', '-infinity'),
    ('mx_v', 'mx_tok', 'gpt', 'unit 3', '2025-04-01'),     -- a new price for gpt from April
    ('mx_v', 'mx_tok', 'claude', 'unit 5', '2025-04-01');  -- claude priced apart from April
INSERT INTO billing.accounts (account_id) VALUES (9420);
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9420, 'mx_v', '2025-03-01');
SELECT billing.record(9420, 'mx_tok', q, t, NULL, d)
  FROM (VALUES (100, 'gpt'), (10, 'claude'), (1, 'llama')) AS x(q, d),
       unnest('{2025-03-05,2025-04-05}'::timestamptz[]) t;
SELECT results_eq($$SELECT to_char(period_start, 'YYYY-MM') AS month, dimension, quantity, amount
                      FROM unnest('{2025-03-10,2025-04-10}'::timestamptz[]) at,
                           billing.invoice_preview(9420, at)
                     ORDER BY 1, line_no$$,
                  $$VALUES ('2025-03', NULL::text, 11::numeric, 11.00::numeric),
                           ('2025-03', 'gpt', 100, 200.00),
                           ('2025-04', NULL, 1, 1.00),
                           ('2025-04', 'claude', 10, 50.00),
                           ('2025-04', 'gpt', 100, 300.00)$$,
                  'each dimension has its own versions; a dimension named from April leaves the rest then');

-- (3) re-rating a matrix charge -------------------------------------------------------------
SELECT is((SELECT count(*) FROM billing.finalize_invoices('2025-05-01 02:00') f WHERE f.account_id = 9420),
          2::bigint, 'March and April of the versions account finalized');
-- gpt costs 4 from March on (retroactive): the gpt line of March changes;
-- April keeps the gpt version of April
INSERT INTO billing.charges (plan, meter, dimension, price, valid_from)
VALUES ('mx_v', 'mx_tok', 'gpt', 'unit 4', '2025-03-01');
SELECT results_eq($$SELECT to_char(i.period_start, 'YYYY-MM'), r.meter, r.dimension, r.billed_amount,
                           r.correct_amount, r.delta
                      FROM billing.rerate('2025-03-01', '2025-05-01', 9420) r
                           JOIN billing.invoices i USING (account_id, invoice_id)
                     ORDER BY 1$$,
                  $$VALUES ('2025-03', 'mx_tok'::text, 'gpt'::text, 200.00::numeric, 400.00::numeric, 200.00::numeric)$$,
                  'rerate after a retroactive price change of one dimension: its lines alone');
SELECT is_empty($$SELECT * FROM billing.rerate('2025-03-01', '2025-05-01', 9420)$$,
                'a second rerate finds nothing');
SELECT results_eq($$SELECT dimension COLLATE "default", line_kind, old_quantity, new_quantity, delta
                      FROM billing.adjustments WHERE account_id = 9420 ORDER BY adjustment_id$$,
                  $$VALUES ('gpt'::text, 'usage'::text, 100::numeric, 100::numeric, 200.00::numeric)$$,
                  'the adjustments carry the dimension');
-- llama named retroactively from March: the rest shrinks, a llama line appears
INSERT INTO billing.charges (plan, meter, dimension, price, valid_from)
VALUES ('mx_v', 'mx_tok', 'llama', 'unit 7', '2025-03-01');
SELECT results_eq($$SELECT to_char(i.period_start, 'YYYY-MM'), r.dimension, r.billed_quantity,
                           r.correct_quantity, r.delta
                      FROM billing.rerate('2025-03-01', '2025-05-01', 9420) r
                           JOIN billing.invoices i USING (account_id, invoice_id)
                     ORDER BY 1, 2 NULLS FIRST$$,
                  $$VALUES ('2025-03', NULL::text, 11::numeric, 10::numeric, -1.00::numeric),
                           ('2025-03', 'llama', 0, 1, 7.00),
                           ('2025-04', NULL, 1, 0, -1.00),
                           ('2025-04', 'llama', 0, 1, 7.00)$$,
                  'a dimension named retroactively: the rest gives it up, its own line bills it');
SELECT results_eq($$SELECT kind, meter, dimension, amount FROM billing.invoice_preview(9420, '2025-05-10')
                     WHERE kind = 'adjustment' ORDER BY line_no$$,
                  $$VALUES ('adjustment'::text, 'mx_tok'::text, 'gpt'::text, 200.00::numeric),
                           ('adjustment', 'mx_tok', NULL, -1.00),
                           ('adjustment', 'mx_tok', 'llama', 7.00),
                           ('adjustment', 'mx_tok', NULL, -1.00),
                           ('adjustment', 'mx_tok', 'llama', 7.00)$$,
                  'the next invoice carries the adjustments with their dimension');

-- (4) the spend cap and remaining per dimension ----------------------------------------------
INSERT INTO billing.plans (plan) VALUES ('mx_cap');
INSERT INTO billing.charges (plan, meter, dimension, price) VALUES
    ('mx_cap', 'mx_tok', NULL, 'unit 1'), ('mx_cap', 'mx_tok', 'gpt', 'unit 2'),
    ('mx_cap', 'mx_sum', 'eu', 'unit 0.5');
INSERT INTO billing.accounts (account_id) VALUES (9430), (9431);
INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap) VALUES
    (9430, 'mx_cap', '2025-06-01', 100), (9431, 'mx_cap', '2025-06-01', 10);
SELECT billing.record(9430, 'mx_tok', 20, '2025-06-02', NULL, 'gpt'),
       billing.record(9430, 'mx_tok', 10, '2025-06-02', NULL, 'x'),
       billing.record(9430, 'mx_sum', 20, '2025-06-02', NULL, 'eu'),
       billing.record(9431, 'mx_tok', 10, '2025-06-02', NULL, 'gpt');
-- 9430: 40 (gpt) + 10 (rest) + 10 (eu) = 60 of 100
SELECT is(ARRAY[billing.remaining(9430, 'mx_tok', '2025-06-10', 'gpt'),
                billing.remaining(9430, 'mx_tok', '2025-06-10'),
                billing.remaining(9430, 'mx_tok', '2025-06-10', 'other'),
                billing.remaining(9430, 'mx_sum', '2025-06-10', 'eu'),
                billing.remaining(9430, 'mx_sum', '2025-06-10', 'us')],
          ARRAY[20, 40, 40, 80, NULL]::numeric[],
          'remaining per dimension: its own line, else the rest (NULL: no line bills it)');
SELECT results_eq($$SELECT kind, dimension, amount FROM billing.invoice_preview(9431, '2025-06-10') ORDER BY line_no$$,
                  $$VALUES ('usage'::text, 'eu'::text, 0.00::numeric), ('usage', NULL, 0.00),
                           ('usage', 'gpt', 20.00), ('cap', NULL, -10.00)$$,
                  'the spend cap caps the lines of every dimension together');

-- (5) keys, checks and guards ------------------------------------------------------------------
SELECT throws_ok($$INSERT INTO billing.charges (plan, meter, dimension, price) VALUES ('mx_v', 'mx_tok', 'gpt', 'unit 9')$$,
                 '23505', NULL, 'one version per (plan, meter, dimension, valid_from)');
SELECT throws_ok($$INSERT INTO billing.charges (plan, meter, dimension, price) VALUES ('mx_v', 'mx_tok', NULL, 'unit 9')$$,
                 '23505', NULL, 'the rest (NULL) is one dimension for the key too');
SELECT lives_ok($$INSERT INTO billing.charges (plan, meter, dimension, price) VALUES ('mx_v', 'mx_tok', '', 'unit 9')$$,
                'the dimension '''' (reports that name none) is a dimension of its own');
SELECT throws_ok($$INSERT INTO billing.charges (plan, meter, dimension, price) VALUES ('mx_v', NULL, 'eu', 'flat 9')$$,
                 '23514', NULL, 'a fixed fee has no dimension');
SELECT throws_ok($$UPDATE billing.charges SET price = 'unit 1'
                    WHERE plan = 'mx_v' AND dimension = 'claude'$$,
                 '55000', NULL, 'a dimension''s version that rated a finalized invoice cannot change');

SELECT * FROM finish();
ROLLBACK;
