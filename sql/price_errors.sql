-- price_errors: bad text raises 22P02 "invalid input syntax for type price"
-- with a detail naming the position (in characters, from 1) and what was
-- expected.  A bad quantity raises 22023.
SET search_path = billing, public;

-- The SQLSTATE of each error (the messages follow below).
SELECT t, test.sqlstate_of(format('SELECT %L::billing.price', t)) AS sqlstate_of
FROM unnest(ARRAY['', 'unit', 'unit -1', 'unit +1', 'unit 1e3', 'unit 1E-3', 'unit NaN',
                  'unit inf', 'unit Infinity', 'unit 1.2.3', 'unit .', 'unit 1 1',
                  'units 1', 'package 0 @ 1', 'graduated 10 @ 1', 'graduated inf @ 1 | 10 @ 2',
                  'graduated 10 @ 1 | 5 @ 1 | inf @ 1', 'graduated 0 @ 1 | inf @ 1',
                  'unit 1 min 2 max 1', 'unit 1 min 1 min 1', 'unit 1 free',
                  'unit 0.000000000000000000001', 'unit 1234567890123456789012345678901234567890',
                  'unit 1 €', 'unit 1 @', 'graduated 10 @ 1 + | inf @ 2',
                  'graduated 10 @ 1 inf @ 2']) AS t;

-- Models and tokens.
SELECT ''::price;
SELECT 'units 1'::price;
SELECT 'unit'::price;
SELECT 'unit 1 1'::price;
SELECT 'unit 1 €'::price;
SELECT 'graduated 10 1 | inf @ 2'::price;
SELECT 'graduated 10 @ 1 inf @ 2'::price;
SELECT 'graduated 10 @ 1 + | inf @ 2'::price;

-- Numbers: no sign, no exponent, no NaN or infinity, plain decimals only.
SELECT 'unit -1'::price;
SELECT 'unit +1'::price;
SELECT 'unit 1e3'::price;
SELECT 'unit 1E-3'::price;
SELECT 'unit NaN'::price;
SELECT 'unit inf'::price;
SELECT 'unit Infinity'::price;
SELECT 'unit 1.2.3'::price;
SELECT 'unit .'::price;
SELECT 'graduated 10 @ -1 | inf @ 2'::price;

-- Too many digits: more than 20 after the point, more than 38 in all.
SELECT 'unit 0.000000000000000000001'::price;
SELECT 'unit 1234567890123456789012345678901234567890'::price;
SELECT 'unit 1234567890123456789.12345678901234567891'::price;
-- (38 digits in all is fine)
SELECT 'unit 1234567890123456789.1234567890123456789'::price;

-- Tiers: bounds > 0 and strictly increasing, inf last and only last.
SELECT 'graduated 0 @ 1 | inf @ 1'::price;
SELECT 'graduated 10 @ 1 | 5 @ 1 | inf @ 1'::price;
SELECT 'volume 10 @ 1 | 10.0 @ 1 | inf @ 1'::price;
SELECT 'graduated 10 @ 1'::price;
SELECT 'graduated inf @ 1 | 10 @ 2'::price;
SELECT 'volume 10 @ 1 | inf @ 2 | inf @ 3'::price;

-- Modifiers: each at most once, min not above max, a number after each.
SELECT 'unit 1 min 2 max 1'::price;
SELECT 'unit 1 min 1 min 1'::price;
SELECT 'unit 1 free'::price;
SELECT 'unit 1 round down'::price;


-- Quantities must be finite and not negative (22023).
CREATE FUNCTION pg_temp.rate_sqlstate(q numeric) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM billing.rate('unit 1', q);
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END $$;
SELECT q, pg_temp.rate_sqlstate(q)
FROM unnest('{-1, -0.0001, NaN, Infinity, -Infinity, 0}'::numeric[]) AS q;
SELECT rate('graduated 10 @ 1 | inf @ 2', -0.0001);
SELECT _rate_numeric('unit 1', 'NaN');

-- Binary input: a version byte 1, then printable ASCII text; anything else
-- is 22P03 (invalid binary representation), text that does not parse too.
CREATE FUNCTION pg_temp.recv_sqlstate(b bytea) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM billing._price_recv(b);
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END $$;
SELECT b, pg_temp.recv_sqlstate(b)
FROM unnest(ARRAY['\x', '\x03756e69742031', '\x01756e69742031ff', '\x01756e6974203100',
                  '\x01756e6974', '\x01756e69742031']::bytea[]) AS b;
SELECT _price_recv('\x'::bytea);
SELECT _price_recv('\x03756e69742031'::bytea);
SELECT _price_recv('\x01756e69742031ff'::bytea);
SELECT _price_recv('\x01756e6974203100'::bytea);
SELECT _price_recv('\x01756e6974'::bytea);
SELECT _price_recv('\x01756e69742031'::bytea) AS ok;
