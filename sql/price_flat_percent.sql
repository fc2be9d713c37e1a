-- price_flat_percent: flat A (whatever q is, also 0) and percent R
-- (q × R / 100, where q is itself a money amount).
SET search_path = billing, public;

SELECT 'flat 49.00'::price AS flat, 'percent 2.90'::price AS percent;

SELECT q, rate('flat 49', q) AS flat, rate('percent 2.9', q) AS percent
FROM unnest('{0, 0.01, 1, 100, 1234.56}'::numeric[]) AS q;

SELECT * FROM rate_tiers('flat 49', 0);
SELECT * FROM rate_tiers('percent 2.9', 1234.56);

-- Percent keeps every digit: 20 fraction digits in the rate and in q.
SELECT rate('percent 0.00000000000000000001', 0.00000000000000000001) AS tiny,
       rate('percent 99999999999999999999999999999999999999', 100) AS huge;

-- A fixed fee of a plan is a flat price rated with quantity 0.
SELECT rate('flat 0', 0) AS free_plan, rate('flat 29 max 10', 0) AS capped;
