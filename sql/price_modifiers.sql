-- price_modifiers: free F (q := max(0, q - F) before the model), then the
-- model, then max M (caps the amount), then min M (raises it; a spending
-- minimum applies even at q = 0).
SET search_path = billing, public;

-- Modifiers in any order, printed as free, min, max; printed even as 0.
SELECT 'unit 1 max 100 free 10 min 5'::price AS reordered,
       'unit 1 FREE 0 MIN 0 MAX 0'::price AS zeros;

SELECT q, rate('unit 1 free 10', q) AS free_10,
       rate('unit 1 min 5', q) AS min_5,
       rate('unit 1 max 100', q) AS max_100,
       rate('unit 1 free 10 min 5 max 100', q) AS all_three
FROM unnest('{0, 5, 10, 12, 15, 16, 110, 1000}'::numeric[]) AS q;

-- free counts units before the model: tiers start after the free units.
SELECT q, rate('graduated 100 @ 1 | inf @ 0.5 free 50', q) AS amount
FROM unnest('{0, 50, 51, 150, 151}'::numeric[]) AS q;
SELECT * FROM rate_tiers('graduated 100 @ 1 | inf @ 0.5 free 50', 200);

-- Fractional free quantities; package counted after the free units.
SELECT rate('package 10 @ 1 free 0.5', 10.5) AS one_package,
       rate('package 10 @ 1 free 0.5', 10.51) AS two_packages;

-- The adjustment shows as a tier-0 row; sum(amount) = rate.
SELECT * FROM rate_tiers('graduated 5000 @ 0 | 100000 @ 0.00029 | inf @ 0.0002 + 10 min 25', 6000);
SELECT * FROM rate_tiers('unit 1 max 100', 250);
SELECT * FROM rate_tiers('unit 1 min 5', 0);
SELECT sum(amount) AS sum_of_rows, rate('unit 1 min 5 max 100', 250) AS rate
FROM rate_tiers('unit 1 min 5 max 100', 250);

-- min = max is allowed (a fixed amount); min above max is not.
SELECT rate('unit 1 min 7 max 7', q) FROM unnest('{0, 7, 100}'::numeric[]) AS q;
SELECT 'unit 1 min 8 max 7'::price;
SELECT 'unit 1 max 7 min 8'::price;
SELECT 'unit 1 free 1 free 2'::price;
SELECT 'unit 1 max 1 max 1'::price;

-- Zero usage (SPEC §10.1).  A first tier's flat fee is charged only once
-- some usage falls in the tier (q > 0, a fraction counts), never at q = 0,
-- graduated or volume; min charges something at zero; a flat price is
-- charged whatever q is.  (Other billing engines disagree on the first
-- tier's fee at zero: here it is 0.)
SELECT q, rate('graduated 1000 @ 0 + 20 | inf @ 0.01', q) AS first_tier_fee,
       rate('volume 1000 @ 0.02 + 5 | inf @ 0.01', q) AS volume_fee,
       rate('graduated 1000 @ 0 | inf @ 0.01 min 20', q) AS min_20,
       rate('flat 20', q) AS flat
FROM unnest('{0, 0.001, 1, 1000, 3000}'::numeric[]) AS q;
SELECT * FROM rate_tiers('graduated 1000 @ 0 + 20 | inf @ 0.01', 0);
SELECT * FROM rate_tiers('graduated 1000 @ 0 | inf @ 0.01 min 20', 0);
