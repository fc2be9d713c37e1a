-- price_per: the per N modifier (1.1, SPEC §10.1).  The quantity is divided
-- by N first, before free and the model: rounded up to a whole number
-- (the default), rounded down, or kept exact.  It works with every model;
-- tiers, free units and rate_tiers are in the converted units.
SET search_path = billing, public;

-- Bytes billed per started GB (10^9 bytes) at $0.25; round down bills
-- whole GB only; exact bills the fraction.
SELECT q AS bytes,
       rate('unit 0.25 per 1000000000', q) AS started_gb,
       rate('unit 0.25 per 1000000000 round down', q) AS whole_gb,
       rate('unit 0.25 per 1000000000 exact', q) AS exact
FROM unnest('{0, 1, 999999999, 1000000000, 1000000001, 2500000000}'::numeric[]) AS q;

-- Tiers in thousands of requests: the first 5 thousand free, then $1 per
-- started thousand.
SELECT q AS requests, rate('graduated 5 @ 0 | inf @ 1 per 1000', q) AS amount
FROM unnest('{0, 5000, 5001, 6000, 6001, 1234567}'::numeric[]) AS q;
SELECT * FROM rate_tiers('graduated 5 @ 0 | inf @ 1 per 1000', 1234567);
SELECT * FROM rate_tiers('volume 10 @ 2 | inf @ 1.5 + 5 per 40 exact', 900);

-- per comes first, then free (in converted units), then the model, then
-- max and min.
SELECT rate('unit 1 free 2 per 1000', 5500) AS free_2_of_6,
       rate('package 10 @ 3 per 100', 1001) AS eleven_then_two_packages,
       rate('unit 1 min 5 max 8 per 10', q) AS min_max
FROM unnest('{0, 61, 1000}'::numeric[]) AS q;
SELECT rate('percent 2.5 per 0.01', 10.005) AS cents_rounded_up;

-- Canonical text: per is printed after max, "round up" (the default) is
-- omitted, keywords in any case and order.
SELECT 'unit 1 PER 1000 Round Up max 5 free 2'::price AS canonical,
       'unit 1 per 1000.000 round down'::price AS round_down,
       'graduated 5 @ 0 | inf @ 1 per 1024 exact min 1'::price AS exact;
SELECT 'unit 1 per 1000'::price = 'unit 1 per 1000 round up'::price AS same,
       'unit 1 per 1000'::price = 'unit 1 per 1000 exact'::price AS different;

-- Errors (22P02): N must be > 0; exact needs an N that divides into finite
-- decimals; per once; round up or down.
SELECT 'unit 1 per 0'::price;
SELECT 'unit 1 per -1000'::price;
SELECT 'unit 1 per 3 exact'::price;
SELECT 'unit 1 per 1000 per 10'::price;
SELECT 'unit 1 per 1000 round'::price;
SELECT 'unit 1 per 1000 round sideways'::price;
SELECT 'unit 1 per 1000 downwards'::price;
SELECT 'unit 1 per'::price;
-- exact with any N made of 2s and 5s: 1024, 0.25, 1280
SELECT rate('unit 1 per 1024 exact', 1) AS per_1024, rate('unit 1 per 0.25 exact', 1) AS per_quarter,
       rate('unit 1 per 1280 exact', 1) AS per_1280;

-- The fast path and the numeric path agree digit for digit.
SELECT count(*) AS cases,
       count(*) FILTER (WHERE _rate_fast(p, q)::text <> _rate_numeric(p, q)::text) AS fast_differs,
       count(*) FILTER (WHERE _rate_fast(p, q) IS NULL) AS numeric_only,
       count(*) FILTER (WHERE rate(p, q)::text <> _rate_check(p, q)::text) AS check_differs
FROM unnest(ARRAY['unit 0.25 per 1000000000', 'unit 0.25 per 1000000000 round down',
                  'unit 0.25 per 1000000000 exact', 'graduated 5 @ 0 | inf @ 1 per 1000 min 1',
                  'volume 10 @ 2 | inf @ 1.5 + 5 free 1 per 40 exact', 'package 10 @ 3 per 0.3',
                  'unit 1 per 85070591730234615865843651857942052864 exact']::price[]) AS p,
     unnest('{0, 0.001, 1, 59, 60, 61, 1000, 1500000000, 123456789.123456789, 1e40}'::numeric[]) AS q;

-- Binary form: version byte 1 for a price without per (as 1.0 sends it;
-- a value sent by 1.0 still reads), 2 for a price with per.  Version 1
-- cannot carry per (22P03).
SELECT price_send('unit 0.25') AS v1, price_send('unit 0.25 per 1000') AS v2;
SELECT _price_recv('\x01756e697420302e3235'::bytea) AS from_1_0,
       _price_recv('\x02756e697420302e3235'::bytea) AS v2_without_per,
       _price_recv(price_send('graduated 5 @ 0 | inf @ 1 per 1000 round down')) AS round_trip;
SELECT _price_recv('\x01' || convert_to('unit 0.25 per 1000', 'UTF8'));

-- JSON: "per" and "per_round" (up, down or exact; missing means up).
SELECT price_to_jsonb('unit 0.25 per 1000000000') AS up,
       price_to_jsonb('graduated 5 @ 0 | inf @ 1 per 1000 exact') AS exact;
SELECT price_from_jsonb('{"model": "unit", "unit_amount": "0.25", "per": 1000}') AS default_up,
       price_from_jsonb('{"model": "flat", "amount": "9", "per": "10", "per_round": "down"}') AS down;
SELECT price_from_jsonb('{"model": "unit", "unit_amount": "1", "per_round": "down"}');
SELECT price_from_jsonb('{"model": "unit", "unit_amount": "1", "per": "3", "per_round": "exact"}');
SELECT price_from_jsonb('{"model": "unit", "unit_amount": "1", "per": "3", "per_round": "nearest"}');

-- Stripe: transform_quantity {divide_by, round} on per-unit and tiered
-- prices is a per modifier.
SELECT price_from_stripe('{"currency": "usd", "billing_scheme": "per_unit", "unit_amount": 25,
    "transform_quantity": {"divide_by": 1000000000, "round": "up"}}') AS per_unit,
       price_from_stripe('{"currency": "usd", "billing_scheme": "tiered", "tiers_mode": "graduated",
    "tiers": [{"up_to": 5, "unit_amount": 0}, {"up_to": null, "unit_amount": 100}],
    "transform_quantity": {"divide_by": 1000, "round": "down"}}') AS tiered;
SELECT price_from_stripe('{"currency": "usd", "billing_scheme": "tiered", "tiers_mode": "volume",
    "tiers": [{"up_to": null, "unit_amount": 100}],
    "transform_quantity": {"divide_by": 2.5, "round": "up"}}');
