-- price_unit: the billing.price text form and the unit model (rate = q × A).
SET search_path = billing, public;

-- Canonical output: lower-case keywords, single spaces, no trailing
-- fractional zeros, no leading zeros.  Keywords are case-insensitive and
-- any whitespace (or none) may separate tokens.
SELECT 'unit 0.5'::price AS a, 'UNIT   0.50'::price AS b,
       E'unit\t007.250\n'::price AS c, 'unit0.1'::price AS d,
       'unit .5'::price AS e, 'unit 5.'::price AS f, 'unit 0'::price AS g;

-- rate = quantity × amount, exact; no rounding anywhere.
SELECT q, rate('unit 0.00029', q) AS amount
FROM unnest('{0, 1, 2.5, 1000000, 0.0001, 123456789.123456789}'::numeric[]) AS q;

-- The largest numbers: 38 significant digits, 20 after the point.
SELECT 'unit 99999999999999999999999999999999999999'::price AS max_digits;
SELECT 'unit 0.00000000000000000001'::price AS max_fraction;
SELECT 'unit 123456789012345678.12345678901234567891'::price AS both;
-- Leading zeros and trailing fractional zeros do not count.
SELECT 'unit 000000000000000.10000000000000000000000000'::price AS zeros;

-- Exact results far beyond 128 bits (the engine falls back to numeric).
SELECT rate('unit 99999999999999999999999999999999999999',
            99999999999999999999999999999999999999) AS huge;
SELECT rate('unit 0.00000000000000000001', 0.00000000000000000001) AS tiny;
SELECT rate('unit 123456789012345678.12345678901234567891', 3) AS exact;
SELECT rate('unit 1', 1e-300) = 1e-300 AS tiny_quantity;

-- The 128-bit fast path and the numeric path give identical results;
-- _rate_fast is NULL where the fast path does not apply.
SELECT q, rate(p, q), _rate_numeric(p, q) AS numeric_path, _rate_fast(p, q) AS fast_path
FROM (VALUES ('unit 0.00029'::price), ('unit 99999999999999999999999999999999999999'),
             ('unit 0.00000000000000000001')) AS v(p),
     unnest('{0, 7, 2.5, 10000000000000000000}'::numeric[]) AS q
ORDER BY p::text, q;

-- Results carry no trailing fractional zeros, whatever the quantity's scale.
SELECT rate('unit 0.5', 3.000) AS amount;

-- rate_tiers: one row for the unit model.
SELECT * FROM rate_tiers('unit 0.5', 3);
SELECT * FROM rate_tiers('unit 0.5', 0);

-- Equality is on the canonical form; the hash opclass makes GROUP BY work.
SELECT 'unit 0.50'::price = 'unit 0.5'::price AS same,
       'unit 0.5'::price <> 'unit 0.6'::price AS differ;
SELECT p, count(*) FROM (VALUES ('unit 1'::price), ('unit 1.0'), ('UNIT 001'), ('unit 2')) AS v(p)
GROUP BY p ORDER BY p::text;

-- Binary form: a format version byte (1), then the canonical text.
SELECT price_send('UNIT 0.50') AS bytes, _price_recv(price_send('unit 0.50')) AS back;

-- A bad quantity raises 22023.
SELECT rate('unit 1', -1);
SELECT rate('unit 1', 'NaN');
SELECT rate('unit 1', 'Infinity');
SELECT * FROM rate_tiers('unit 1', -0.5);
