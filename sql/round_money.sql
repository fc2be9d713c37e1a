-- round_money: round to the currency's minor unit (ISO 4217 exponent) with
-- the mode of GUC billing.rounding; negative amounts round symmetrically.
SET search_path = billing, public;

-- Exponents: USD 2, JPY 0, KWD 3, CLF 4; codes are case-insensitive.
SELECT c, currency_exponent(c) AS exponent, round_money(1234.56789, c) AS rounded
FROM unnest('{USD, eur, JPY, KRW, KWD, BHD, JOD, OMR, TND, CLF, UYW, CHF}'::text[]) AS c;

-- The GUC billing.rounding (defined once the library is loaded) picks the mode.
SHOW billing.rounding;

-- Each mode on ties, near-ties and negatives (the result keeps the
-- currency's number of decimals).
CREATE TEMP TABLE amounts AS
SELECT a FROM unnest('{2.345, 2.355, -2.345, -2.355, 2.3449999, 2.3450001, 2.34, -2.34, 0, 0.005, -0.005}'::numeric[]) AS a;
SET billing.rounding = half_up;
SELECT a, round_money(a, 'USD') AS half_up FROM amounts;
SET billing.rounding = half_even;
SELECT a, round_money(a, 'USD') AS half_even FROM amounts;
SET billing.rounding = up;
SELECT a, round_money(a, 'USD') AS up FROM amounts;
SET billing.rounding = down;
SELECT a, round_money(a, 'USD') AS down FROM amounts;

-- Zero-decimal and three-decimal currencies.
SET billing.rounding = half_even;
SELECT round_money(2.5, 'JPY') AS jpy_2_5, round_money(3.5, 'JPY') AS jpy_3_5,
       round_money(-2.5, 'JPY') AS jpy_minus_2_5, round_money(1.0005, 'KWD') AS kwd;
RESET billing.rounding;
SELECT round_money(2.5, 'JPY') AS jpy_half_up, round_money(-2.345, 'USD') AS spec_example;

-- Very long amounts are exact.
SELECT round_money(123456789012345678901234567890.004999999999999999999, 'USD') AS long;

-- Errors: an unknown currency or a non-finite amount raises 22023; a bad
-- mode is refused by the GUC.
SELECT round_money(1, 'XYZ');
SELECT round_money(1, 'US');
SELECT round_money('NaN', 'USD');
SET billing.rounding = bankers;
