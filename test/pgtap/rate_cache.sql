-- rate_cache: rate() with a different price on every row (issue 13,
-- defect 1).  rate() keeps the decoded price of its argument in fn_extra;
-- a hit must mean equal bytes, never an equal address: casts, JSON, joins
-- and detoasted (compressed) prices build each row's price where the last
-- one was.  Every query rates many rows in one statement and compares with
-- an independent computation.  Then an invoice with four large prices of
-- the same length (400 tiers, stored compressed): finalize writes what the
-- preview shows, and verify_invoices (which rates with billing._rate_check,
-- sharing no cache and no fast path with rate) finds a line made wrong.
BEGIN;
SELECT plan(22);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;

-- 1. Casts: prices of the same length built per row.
SELECT is((SELECT count(*) FILTER (WHERE billing.rate(('unit ' || g)::billing.price, 1) <> g)
             FROM generate_series(1, 9) g, generate_series(1, 1000) r),
          0::bigint, 'rate of a per-row cast: unit 1..9, 1000 times each, every one right');
SELECT is((SELECT count(*) FILTER (WHERE billing.rate(('unit ' || g)::billing.price, 1) <> g)
             FROM generate_series(1, 1000) r, generate_series(1, 9) g),
          0::bigint, 'the same with the prices alternating row by row');
SELECT is((SELECT count(*) FILTER (WHERE billing.rate(('graduated 10 @ ' || g || ' | inf @ ' || h)::billing.price, 20)
                                          <> 10 * g + 10 * h)
             FROM generate_series(1, 9) g, generate_series(1, 9) h, generate_series(1, 50) r),
          0::bigint, 'tiered prices of one length, varied per row');
SELECT is((SELECT count(*) FILTER (WHERE billing._rate_numeric(('unit ' || g)::billing.price, 3) <> 3 * g
                                      OR billing._rate_fast(('unit ' || g)::billing.price, 3) <> 3 * g
                                      OR billing._rate_check(('unit ' || g)::billing.price, 3) <> 3 * g)
             FROM generate_series(1, 1000) r, generate_series(1, 9) g),
          0::bigint, '_rate_numeric, _rate_fast and _rate_check on per-row casts');
SELECT is((SELECT count(*) FILTER (WHERE (SELECT sum(t.amount)
                                            FROM billing.rate_tiers(('volume 5 @ ' || g || ' | inf @ 1')::billing.price, 4) t)
                                          <> 4 * g)
             FROM generate_series(1, 200) r, generate_series(1, 9) g),
          0::bigint, 'rate_tiers on per-row casts');

-- 2. JSON: price_from_jsonb per row.
SELECT is((SELECT count(*) FILTER (WHERE billing.rate(billing.price_from_jsonb(
                                             jsonb_build_object('model', 'unit', 'unit_amount', g::text)), 7) <> 7 * g)
             FROM generate_series(1, 9) g, generate_series(1, 1000) r),
          0::bigint, 'rate of prices read from JSON per row');
SELECT is((SELECT count(*) FILTER (WHERE billing.price_to_jsonb(('package ' || g || ' @ 1')::billing.price)
                                          ->> 'package_size' <> g::text)
             FROM generate_series(1, 9) g, generate_series(1, 500) r),
          0::bigint, 'price_to_jsonb of per-row casts');

-- 3. A join with a table of prices, in several orders.
CREATE TEMP TABLE rc_prices (id int PRIMARY KEY, p billing.price, unit numeric);
INSERT INTO rc_prices
SELECT g, ('unit ' || u)::billing.price, u
  FROM generate_series(1, 2000) g, LATERAL (SELECT (g % 97 + 1)::numeric / 8 AS u) x;
CREATE TEMP TABLE rc_qty (id int, q numeric);
INSERT INTO rc_qty SELECT g % 2000 + 1, g % 13 FROM generate_series(1, 20000) g;
ANALYZE rc_prices;
ANALYZE rc_qty;
SELECT is((SELECT count(*) FILTER (WHERE billing.rate(p.p, x.q) <> p.unit * x.q)
             FROM rc_qty x JOIN rc_prices p USING (id)),
          0::bigint, 'rate over a join with a prices table');
SELECT is((SELECT count(*) FILTER (WHERE billing.rate(p.p, x.q) <> p.unit * x.q)
             FROM (SELECT * FROM rc_qty ORDER BY q, id) x JOIN rc_prices p USING (id)),
          0::bigint, 'rate over the join in another order');
SELECT is((SELECT sum(billing.rate(p.p, x.q)) FROM rc_qty x JOIN rc_prices p USING (id)),
          (SELECT sum(p.unit * x.q) FROM rc_qty x JOIN rc_prices p USING (id)),
          'sum of rate over the join = sum of unit * q');

-- 4. Compressed prices: 400-tier graduated prices of the same length,
-- TOASTed, detoasted per row.
CREATE FUNCTION pg_temp.big_price(k int) RETURNS billing.price LANGUAGE sql AS $$
    SELECT ('graduated ' || string_agg(b || ' @ 0', ' | ' ORDER BY b) || ' | inf @ ' || k)::billing.price
      FROM generate_series(2, 400) b
$$;
CREATE TEMP TABLE rc_big (id int, k int, p billing.price);
INSERT INTO rc_big SELECT g, 1 + g % 9, pg_temp.big_price(1 + g % 9) FROM generate_series(1, 300) g;
SELECT ok((SELECT bool_and(pg_column_compression(p) IS NOT NULL) FROM rc_big),
          'the large prices are stored compressed');
SELECT is((SELECT count(DISTINCT octet_length(p::text)) FROM rc_big), 1::bigint,
          'the large prices all have the same length');
SELECT is((SELECT count(*) FILTER (WHERE billing.rate(p, 1000) <> 600 * k) FROM rc_big, generate_series(1, 5)),
          0::bigint, 'rate of compressed prices detoasted per row');
SELECT is((SELECT count(*) FILTER (WHERE billing._rate_check(p, 1000) <> 600 * k) FROM rc_big),
          0::bigint, '_rate_check of compressed prices');

-- 5. An invoice with several large prices of the same length.
INSERT INTO billing.meters (meter, late_window) VALUES
    ('rc_m1', '100 years'), ('rc_m2', '100 years'), ('rc_m3', '100 years'), ('rc_m4', '100 years');
INSERT INTO billing.plans (plan) VALUES ('rc_big');
INSERT INTO billing.charges (plan, meter, price, description) VALUES
    ('rc_big', 'rc_m1', pg_temp.big_price(1), 'm1'),
    ('rc_big', 'rc_m2', pg_temp.big_price(1), 'm2'),
    ('rc_big', 'rc_m3', pg_temp.big_price(2), 'm3'),
    ('rc_big', 'rc_m4', pg_temp.big_price(3), 'm4');
SELECT ok((SELECT bool_and(pg_column_compression(price) IS NOT NULL) FROM billing.charges WHERE plan = 'rc_big'),
          'the charges'' prices are stored compressed');
INSERT INTO billing.accounts (account_id) SELECT a FROM generate_series(8401, 8420) a;
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
SELECT a, 'rc_big', '2025-03-01' FROM generate_series(8401, 8420) a;
SELECT count(billing.record(a, m, 1000, '2025-03-10'))
  FROM generate_series(8401, 8420) a, unnest('{rc_m1,rc_m2,rc_m3,rc_m4}'::text[]) m;

CREATE TEMP TABLE rc_preview AS
SELECT a AS account_id, p.meter, p.amount
  FROM generate_series(8401, 8420) a, billing.invoice_preview(a, '2025-03-15') p;
SELECT is((SELECT string_agg(amount::text, '/' ORDER BY meter) FROM rc_preview WHERE account_id = 8401),
          '600.00/600.00/1200.00/1800.00', 'the preview: 600 / 600 / 1200 / 1800');
SELECT is((SELECT count(*) FROM billing.finalize_invoices('2025-04-01 01:00') f
            WHERE f.account_id BETWEEN 8401 AND 8420 AND f.total = 4200),
          20::bigint, 'finalize: 20 invoices of 4200');
SELECT set_eq($$SELECT i.account_id, l.meter::text, l.amount
                  FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
                 WHERE i.account_id BETWEEN 8401 AND 8420$$,
              $$SELECT account_id, meter, amount FROM rc_preview$$,
              'every finalized line equals the preview');
SELECT ok((SELECT bool_and(pg_column_compression(l.price) IS NOT NULL)
             FROM billing.invoice_lines l WHERE l.account_id BETWEEN 8401 AND 8420),
          'the lines'' prices are stored compressed');
SELECT is_empty($$SELECT * FROM billing.verify_invoices() WHERE account_id BETWEEN 8401 AND 8420$$,
                'verify_invoices finds nothing wrong');

-- A line billed wrong (as the cache bug wrote it: 600 for the 1800 line),
-- with the total made to match, written past the immutability triggers.
SET LOCAL session_replication_role = replica;
UPDATE billing.invoice_lines SET amount = 600.00, unrounded_amount = 600
 WHERE account_id = 8407 AND meter = 'rc_m4';
UPDATE billing.invoices SET total = total - 1200 WHERE account_id = 8407;
SET LOCAL session_replication_role = origin;
SELECT results_eq($$SELECT account_id, problem FROM billing.verify_invoices()
                     WHERE account_id BETWEEN 8401 AND 8420$$,
                  $$VALUES (8407::bigint, 'usage line rates 1000 to 1800.00, not 600.00')$$,
                  'verify_invoices finds the wrong line (and only it)');
SELECT results_eq($$SELECT account_id, billed_amount, correct_amount, delta
                      FROM billing.rerate('2025-03-01', '2025-04-01', dry_run => true)
                     WHERE account_id BETWEEN 8401 AND 8420$$,
                  $$VALUES (8407::bigint, 600::numeric, 1800::numeric, 1200::numeric)$$,
                  'rerate (dry run) finds it too');

SELECT * FROM finish();
ROLLBACK;
