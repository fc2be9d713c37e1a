-- price_jsonb_stripe: prices as JSON (exact inverses, numbers as strings)
-- and prices from Stripe Price objects.
SET search_path = billing, public;

-- One JSON object per model; modifiers as "free", "min", "max".
SELECT p, price_to_jsonb(p)
FROM unnest(ARRAY['unit 0.00029', 'package 100 @ 5 round down', 'flat 49', 'percent 2.9 min 0.3',
                  'graduated 5000 @ 0 | 100000 @ 0.00029 | inf @ 0.0002 + 10 min 25',
                  'volume 100 @ 1 | inf @ 0.5 + 20 free 10 max 1000']::price[]) AS p;

-- price_from_jsonb is the inverse; JSON numbers are accepted too, and a
-- missing "round" or "flat_amount" means up / 0.
SELECT bool_and(price_from_jsonb(price_to_jsonb(p)) = p) AS round_trip
FROM unnest(ARRAY['unit 0.00029', 'package 100 @ 5 round down', 'package 0.5 @ 1', 'flat 0',
                  'percent 2.9 min 0.3', 'unit 99999999999999999999999999999999999999',
                  'unit 0.00000000000000000001 free 0.00000000000000000001',
                  'graduated 5000 @ 0 | 100000 @ 0.00029 | inf @ 0.0002 + 10 min 25',
                  'volume 100 @ 1 | inf @ 0.5 + 20 free 10 max 1000']::price[]) AS p;
SELECT price_from_jsonb('{"model": "package", "package_size": 100, "amount": 5.50}');
SELECT price_from_jsonb('{"model": "volume", "tiers": [{"up_to": 10, "unit_amount": 1},
                          {"up_to": "inf", "unit_amount": "0.5", "flat_amount": 2}], "min": 1}');

-- Bad JSON prices raise 22P02.
SELECT price_from_jsonb('[]');
SELECT price_from_jsonb('{"unit_amount": "1"}');
SELECT price_from_jsonb('{"model": "tiered"}');
SELECT price_from_jsonb('{"model": "unit", "unit_amount": "1", "colour": "red"}');
SELECT price_from_jsonb('{"model": "unit", "unit_amount": -1}');
SELECT price_from_jsonb('{"model": "unit", "unit_amount": "1e3"}');
SELECT price_from_jsonb('{"model": "unit", "unit_amount": true}');
SELECT price_from_jsonb('{"model": "unit"}');
SELECT price_from_jsonb('{"model": "graduated", "tiers": []}');
SELECT price_from_jsonb('{"model": "graduated", "tiers": [{"up_to": 10, "unit_amount": 1}]}');
SELECT price_from_jsonb('{"model": "graduated", "tiers": [{"up_to": 10, "unit_amount": 1},
                          {"up_to": 5, "unit_amount": 1}, {"up_to": "inf", "unit_amount": 1}]}');
SELECT price_from_jsonb('{"model": "unit", "unit_amount": "1", "min": "5", "max": "4"}');

-- Stripe: per_unit, amounts in minor units (cents), converted to major
-- units with the currency's ISO 4217 exponent.
SELECT price_from_stripe('{"object": "price", "id": "price_1", "currency": "usd",
    "billing_scheme": "per_unit", "unit_amount": 1000, "unit_amount_decimal": "1000",
    "recurring": {"interval": "month", "usage_type": "metered"}}') AS usd;
SELECT price_from_stripe('{"currency": "USD", "billing_scheme": "per_unit",
    "unit_amount": null, "unit_amount_decimal": "0.029"}') AS decimal_cents;
SELECT price_from_stripe('{"currency": "jpy", "unit_amount": 500}') AS jpy,
       price_from_stripe('{"currency": "kwd", "unit_amount": 1250}') AS kwd,
       price_from_stripe('{"currency": "clf", "unit_amount": 1}') AS clf;
-- transform_quantity: a per modifier (1.0 made it a package price, which
-- rates the same).
SELECT price_from_stripe('{"currency": "eur", "unit_amount": 500,
    "transform_quantity": {"divide_by": 1000, "round": "up"}}') AS round_up,
       price_from_stripe('{"currency": "eur", "unit_amount": 500,
    "transform_quantity": {"divide_by": 1000, "round": "down"}}') AS round_down;
-- tiered: graduated and volume; the last up_to is null (as Stripe returns
-- it) or "inf" (as Stripe accepts it).
SELECT price_from_stripe('{"object": "price", "currency": "usd", "billing_scheme": "tiered",
    "tiers_mode": "graduated", "unit_amount": null, "tiers": [
      {"up_to": 5000, "unit_amount": 0, "unit_amount_decimal": "0", "flat_amount": null, "flat_amount_decimal": null},
      {"up_to": 100000, "unit_amount": null, "unit_amount_decimal": "0.029", "flat_amount": null},
      {"up_to": null, "unit_amount_decimal": "0.02", "flat_amount": 1000, "flat_amount_decimal": "1000"}]}') AS graduated;
SELECT price_from_stripe('{"currency": "USD", "billing_scheme": "tiered", "tiers_mode": "volume",
    "tiers": [{"up_to": 100, "unit_amount": 100}, {"up_to": "inf", "unit_amount": 50, "flat_amount": 2000}]}') AS volume;

-- Bad Stripe objects raise 22023.
SELECT price_from_stripe('"price_1"');
SELECT price_from_stripe('{"unit_amount": 100}');
SELECT price_from_stripe('{"currency": "xyz", "unit_amount": 100}');
SELECT price_from_stripe('{"currency": "usd"}');
SELECT price_from_stripe('{"currency": "usd", "unit_amount": 1.5}');
SELECT price_from_stripe('{"currency": "usd", "unit_amount": -100}');
SELECT price_from_stripe('{"currency": "usd", "billing_scheme": "tiered", "tiers_mode": "stairs", "tiers": []}');
SELECT price_from_stripe('{"currency": "usd", "billing_scheme": "tiered", "tiers_mode": "volume"}');
SELECT price_from_stripe('{"currency": "usd", "billing_scheme": "tiered", "tiers_mode": "volume",
    "tiers": [{"up_to": 10, "unit_amount": 1}, {"up_to": 10, "unit_amount": 1}, {"up_to": null, "unit_amount": 1}]}');
SELECT price_from_stripe('{"currency": "usd", "billing_scheme": "tiered", "tiers_mode": "volume",
    "tiers": [{"up_to": 10, "unit_amount": 1}]}');
SELECT price_from_stripe('{"currency": "usd", "unit_amount": 100, "transform_quantity": {"divide_by": 0, "round": "up"}}');
SELECT price_from_stripe('{"object": "plan", "currency": "usd", "amount": 100}');
SELECT price_from_stripe('{"currency": "usd", "custom_unit_amount": {"minimum": 100}}');
SELECT price_from_stripe('{"currency": "usd", "unit_amount_decimal": "0.000000000000000001"}') AS smallest;
SELECT price_from_stripe('{"currency": "usd", "unit_amount_decimal": "0.0000000000000000001"}');
