-- price_package: ceil(q / N) × A, or floor with "round down".
SET search_path = billing, public;

SELECT 'package 100 @ 5'::price AS up, 'package 100 @ 5 round up'::price AS up_is_default,
       'package 100 @ 5 ROUND DOWN'::price AS down;

-- Edges of the package size: 0, 1, N - 1, N, N + 1, 2N, fractions.
SELECT q, rate('package 100 @ 5', q) AS round_up,
       rate('package 100 @ 5 round down', q) AS round_down
FROM unnest('{0, 1, 99, 99.99, 100, 100.01, 101, 200, 250.5}'::numeric[]) AS q;

-- Fractional package sizes and amounts.
SELECT q, rate('package 0.5 @ 0.25', q) AS amount
FROM unnest('{0, 0.1, 0.5, 0.51, 1, 1.25}'::numeric[]) AS q;

-- rate_tiers: quantity is the number of packages billed, unit_amount the
-- price of one package.
SELECT * FROM rate_tiers('package 100 @ 5', 250);
SELECT * FROM rate_tiers('package 100 @ 5 round down', 250);

-- 38-digit sizes: exact in the numeric fallback.
SELECT rate('package 99999999999999999999999999999999999999 @ 0.00000000000000000001',
            199999999999999999999999999999999999998) AS two_packages,
       rate('package 99999999999999999999999999999999999999 @ 0.00000000000000000001',
            199999999999999999999999999999999999999) AS three_packages;

-- The size must be greater than 0.
SELECT 'package 0 @ 5'::price;
SELECT 'package 0.000 @ 5'::price;
SELECT 'package 100 @ 5 round sideways'::price;
SELECT 'package 100 5'::price;
