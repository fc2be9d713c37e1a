-- price_volume: the first tier with q <= bi prices every unit:
-- amount = q × ui + fi; q = 0 gives 0.
SET search_path = billing, public;

SELECT 'volume 100 @ 1 | 1000 @ 0.8 + 5 | inf @ 0.5 + 20'::price AS price;

-- Edges: 0, 1, each bound, bound + 1, fractions.
SELECT q, rate('volume 100 @ 1 | 1000 @ 0.8 + 5 | inf @ 0.5 + 20', q) AS amount
FROM unnest('{0, 0.5, 1, 100, 100.5, 101, 1000, 1001, 1000000}'::numeric[]) AS q;

-- One row: the tier that priced all units.
SELECT * FROM rate_tiers('volume 100 @ 1 | 1000 @ 0.8 + 5 | inf @ 0.5 + 20', 100);
SELECT * FROM rate_tiers('volume 100 @ 1 | 1000 @ 0.8 + 5 | inf @ 0.5 + 20', 101);
SELECT * FROM rate_tiers('volume 100 @ 1 | 1000 @ 0.8 + 5 | inf @ 0.5 + 20', 5000);
SELECT count(*) AS rows_at_0 FROM rate_tiers('volume 100 @ 1 | inf @ 0.5', 0);

-- A flat fee in the first tier is not charged at q = 0.
SELECT rate('volume 10 @ 0 + 9 | inf @ 1', 0) AS at_0, rate('volume 10 @ 0 + 9 | inf @ 1', 0.001) AS just_above;

-- Exact with 38-digit values.
SELECT rate('volume 1 @ 99999999999999999999999999999999999999 | inf @ 0.00000000000000000001',
            12345678901234567890.5) AS amount;

-- The same price parsed as graduated and as volume are different prices.
SELECT 'volume 10 @ 1 | inf @ 2'::price = 'graduated 10 @ 1 | inf @ 2'::price AS same;
