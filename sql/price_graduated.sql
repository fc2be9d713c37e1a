-- price_graduated: each unit priced in its own tier; tier i covers
-- (b(i-1), bi], and its flat fee is charged when q > b(i-1).
SET search_path = billing, public;

SELECT 'graduated 5000 @ 0 | 100000 @ 0.00029 | inf @ 0.0002 + 10 min 25'::price AS spec_example;
SELECT 'graduated 5000@0|100000@0.000290|INF@0.0002+0'::price AS fee_0_omitted;

-- Tier edges: 0, 1, each bound - 1, bound, bound + 1 (the first unit of the
-- next tier, and of inf), fractions.
SELECT q, rate('graduated 5000 @ 0 | 100000 @ 0.00029 | inf @ 0.0002 + 10', q) AS amount
FROM unnest('{0, 0.5, 1, 4999, 5000, 5000.5, 5001, 99999, 100000, 100000.001,
              100001, 150000, 1000000000}'::numeric[]) AS q;

-- How an amount is made up: first_unit is the bound the tier starts after,
-- units (first_unit, last_unit] are in the tier.
SELECT * FROM rate_tiers('graduated 5000 @ 0 | 100000 @ 0.00029 | inf @ 0.0002 + 10', 150000);
SELECT * FROM rate_tiers('graduated 5000 @ 0 | 100000 @ 0.00029 | inf @ 0.0002 + 10', 100000);
SELECT * FROM rate_tiers('graduated 5000 @ 0 | 100000 @ 0.00029 | inf @ 0.0002 + 10', 100000.001);
-- q = 0: no tier received units, so no rows (and rate is 0).
SELECT count(*) AS rows_at_0 FROM rate_tiers('graduated 5000 @ 0 | inf @ 1', 0);

-- Flat fees per tier: charged once the tier is entered, even by a fraction.
SELECT q, rate('graduated 10 @ 1 + 100 | 20 @ 0.5 + 50 | inf @ 0.1 + 25', q) AS amount
FROM unnest('{0, 0.1, 10, 10.1, 20, 20.5, 30}'::numeric[]) AS q;
SELECT * FROM rate_tiers('graduated 10 @ 1 + 100 | 20 @ 0.5 + 50 | inf @ 0.1 + 25', 20.5);

-- A single inf tier is a unit price.
SELECT rate('graduated inf @ 0.25', 4) AS amount;

-- Fractional bounds.
SELECT q, rate('graduated 0.5 @ 10 | 1.5 @ 1 | inf @ 0.1', q) AS amount
FROM unnest('{0.25, 0.5, 1, 1.5, 2}'::numeric[]) AS q;

-- 38-digit bounds and 20-digit fractions, exactly.
SELECT rate('graduated 99999999999999999999999999999999999998 @ 0.00000000000000000001 | inf @ 1',
            99999999999999999999999999999999999999) AS amount;
SELECT rate('graduated 0.00000000000000000001 @ 99999999999999999999999999999999999999 | inf @ 0',
            1) AS amount;

-- Fast path and numeric path agree at every edge.
SELECT count(*) AS checked,
       count(*) FILTER (WHERE rate(p, q) = _rate_numeric(p, q)
                          AND rate(p, q)::text = _rate_numeric(p, q)::text) AS equal,
       count(_rate_fast(p, q)) AS on_fast_path
FROM (VALUES ('graduated 5000 @ 0 | 100000 @ 0.00029 | inf @ 0.0002 + 10'::price),
             ('graduated 10 @ 1 + 100 | 20 @ 0.5 + 50 | inf @ 0.1 + 25')) AS v(p),
     (SELECT b + d AS q FROM unnest('{0, 10, 20, 5000, 100000}'::numeric[]) AS b,
                             unnest('{0, 1, 0.5, 0.001}'::numeric[]) AS d) AS edges;
