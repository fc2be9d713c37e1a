/*
 * The billing.price type and the rating engine (SPEC section 1).
 */

CREATE TYPE billing.price;

CREATE FUNCTION billing.price_in(pg_catalog.cstring) RETURNS billing.price
    AS 'MODULE_PATHNAME', 'billing_price_in'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION billing.price_out(billing.price) RETURNS pg_catalog.cstring
    AS 'MODULE_PATHNAME', 'billing_price_out'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION billing.price_recv(pg_catalog.internal) RETURNS billing.price
    AS 'MODULE_PATHNAME', 'billing_price_recv'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION billing.price_send(billing.price) RETURNS pg_catalog.bytea
    AS 'MODULE_PATHNAME', 'billing_price_send'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE TYPE billing.price (
    INPUT = billing.price_in,
    OUTPUT = billing.price_out,
    RECEIVE = billing.price_recv,
    SEND = billing.price_send,
    INTERNALLENGTH = VARIABLE,
    STORAGE = extended
);
COMMENT ON TYPE billing.price IS
    'A pricing rule: unit, package, graduated, volume, flat or percent, with optional free/min/max/per; e.g. ''graduated 5000 @ 0 | inf @ 0.0002 + 10 min 25'', ''unit 0.25 per 1000000000''';
COMMENT ON FUNCTION billing.price_in(pg_catalog.cstring) IS
    'Text input of billing.price (grammar in doc/billing.md); bad text raises 22P02';
COMMENT ON FUNCTION billing.price_out(billing.price) IS
    'Canonical text output of billing.price';
COMMENT ON FUNCTION billing.price_recv(pg_catalog.internal) IS
    'Binary input of billing.price: format version byte 1 (no per modifier) or 2, then the text form; bad bytes raise 22P03';
COMMENT ON FUNCTION billing.price_send(billing.price) IS
    'Binary output of billing.price: format version byte 1 (2 for a price with a per modifier), then the canonical text';

CREATE FUNCTION billing._price_recv(pg_catalog.bytea) RETURNS billing.price
    AS 'MODULE_PATHNAME', 'billing_price_recv_bytea'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._price_recv(pg_catalog.bytea) IS
    'Internal, for tests: price_recv applied to the bytes of a bytea (the inverse of price_send)';

-- Equality and hashing: on the canonical form.
CREATE FUNCTION billing.price_eq(billing.price, billing.price) RETURNS pg_catalog.bool
    AS 'MODULE_PATHNAME', 'billing_price_eq'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;
CREATE FUNCTION billing.price_ne(billing.price, billing.price) RETURNS pg_catalog.bool
    AS 'MODULE_PATHNAME', 'billing_price_ne'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE LEAKPROOF;
CREATE FUNCTION billing.price_hash(billing.price) RETURNS pg_catalog.int4
    AS 'MODULE_PATHNAME', 'billing_price_hash'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION billing.price_hash_extended(billing.price, pg_catalog.int8) RETURNS pg_catalog.int8
    AS 'MODULE_PATHNAME', 'billing_price_hash_extended'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing.price_eq(billing.price, billing.price) IS
    'True when two prices have the same canonical form';
COMMENT ON FUNCTION billing.price_ne(billing.price, billing.price) IS
    'True when two prices differ in canonical form';
COMMENT ON FUNCTION billing.price_hash(billing.price) IS
    'Hash of the canonical form (hash opclass support)';
COMMENT ON FUNCTION billing.price_hash_extended(billing.price, pg_catalog.int8) IS
    'Seeded 64-bit hash of the canonical form (hash opclass support)';

CREATE OPERATOR billing.= (
    LEFTARG = billing.price,
    RIGHTARG = billing.price,
    FUNCTION = billing.price_eq,
    COMMUTATOR = OPERATOR(billing.=),
    NEGATOR = OPERATOR(billing.<>),
    RESTRICT = pg_catalog.eqsel,
    JOIN = pg_catalog.eqjoinsel,
    HASHES
);
CREATE OPERATOR billing.<> (
    LEFTARG = billing.price,
    RIGHTARG = billing.price,
    FUNCTION = billing.price_ne,
    COMMUTATOR = OPERATOR(billing.<>),
    NEGATOR = OPERATOR(billing.=),
    RESTRICT = pg_catalog.neqsel,
    JOIN = pg_catalog.neqjoinsel
);
COMMENT ON OPERATOR billing.= (billing.price, billing.price) IS
    'Prices with the same canonical form';
COMMENT ON OPERATOR billing.<> (billing.price, billing.price) IS
    'Prices with different canonical forms';

CREATE OPERATOR CLASS billing.price_hash_ops
    DEFAULT FOR TYPE billing.price USING hash AS
        OPERATOR 1 billing.= (billing.price, billing.price),
        FUNCTION 1 billing.price_hash(billing.price),
        FUNCTION 2 billing.price_hash_extended(billing.price, pg_catalog.int8);

-- Rating.
CREATE FUNCTION billing.rate(p billing.price, quantity pg_catalog.numeric)
    RETURNS pg_catalog.numeric
    AS 'MODULE_PATHNAME', 'billing_rate'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing.rate(billing.price, pg_catalog.numeric) IS
    'Exact amount of price p for quantity (>= 0; negative, NaN or infinite raise 22023), unrounded';

CREATE FUNCTION billing.rate_tiers(p billing.price, quantity pg_catalog.numeric,
    OUT tier pg_catalog.int4, OUT first_unit pg_catalog.numeric,
    OUT last_unit pg_catalog.numeric, OUT quantity pg_catalog.numeric,
    OUT unit_amount pg_catalog.numeric, OUT flat_amount pg_catalog.numeric,
    OUT amount pg_catalog.numeric)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'billing_rate_tiers'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE ROWS 4;
COMMENT ON FUNCTION billing.rate_tiers(billing.price, pg_catalog.numeric) IS
    'How rate(p, quantity) is made up: one row per tier that received units (tier 0: min/max adjustment); sum(amount) = rate';

CREATE FUNCTION billing._rate_numeric(p billing.price, quantity pg_catalog.numeric)
    RETURNS pg_catalog.numeric
    AS 'MODULE_PATHNAME', 'billing_rate_numeric'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._rate_numeric(billing.price, pg_catalog.numeric) IS
    'Internal, for tests: rate() computed on the numeric path only';
CREATE FUNCTION billing._rate_fast(p billing.price, quantity pg_catalog.numeric)
    RETURNS pg_catalog.numeric
    AS 'MODULE_PATHNAME', 'billing_rate_fast'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._rate_fast(billing.price, pg_catalog.numeric) IS
    'Internal, for tests: rate() computed on the 128-bit fixed-point path only; NULL when the values do not fit';

CREATE FUNCTION billing._rate_check(p billing.price, quantity pg_catalog.numeric)
    RETURNS pg_catalog.numeric
    AS 'MODULE_PATHNAME', 'billing_rate_check'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing._rate_check(billing.price, pg_catalog.numeric) IS
    'Internal, for verify_invoices: rate() without any cache (the price decoded on every call) on the numeric path only';

-- JSON.
CREATE FUNCTION billing.price_to_jsonb(p billing.price) RETURNS pg_catalog.jsonb
    AS 'MODULE_PATHNAME', 'billing_price_to_jsonb'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing.price_to_jsonb(billing.price) IS
    'The price as a JSON object (numbers as strings); inverse of price_from_jsonb';
CREATE FUNCTION billing.price_from_jsonb(j pg_catalog.jsonb) RETURNS billing.price
    AS 'MODULE_PATHNAME', 'billing_price_from_jsonb'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing.price_from_jsonb(pg_catalog.jsonb) IS
    'The price described by a JSON object of price_to_jsonb''s shape; bad objects raise 22P02';
CREATE FUNCTION billing.price_from_stripe(stripe_price pg_catalog.jsonb) RETURNS billing.price
    AS 'MODULE_PATHNAME', 'billing_price_from_stripe'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing.price_from_stripe(pg_catalog.jsonb) IS
    'The price of a Stripe Price object (per_unit or tiered graduated/volume; transform_quantity becomes per), minor units converted to major; bad objects raise 22023';

-- Money.
CREATE FUNCTION billing.round_money(amount pg_catalog.numeric, currency pg_catalog.text)
    RETURNS pg_catalog.numeric
    AS 'MODULE_PATHNAME', 'billing_round_money_sql'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;  -- STABLE: reads billing.rounding
COMMENT ON FUNCTION billing.round_money(pg_catalog.numeric, pg_catalog.text) IS
    'Amount rounded to the currency''s ISO 4217 minor unit with the mode of billing.rounding; unknown currency raises 22023';
CREATE FUNCTION billing.currency_exponent(currency pg_catalog.text)
    RETURNS pg_catalog.int4
    AS 'MODULE_PATHNAME', 'billing_currency_exponent_sql'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION billing.currency_exponent(pg_catalog.text) IS
    'ISO 4217 minor-unit exponent of a currency code (USD 2, JPY 0, KWD 3), NULL when unknown';

-- an account bills in a currency whose minor unit is known (the check
-- needs currency_exponent, so it follows it rather than billing.accounts)
ALTER TABLE billing.accounts
    ADD CONSTRAINT accounts_currency_known
        CHECK (COALESCE(billing.currency_exponent(currency), -1) >= 0);
