-- Properties of billing.price over generated prices and quantities (with
-- the per modifier of 1.1 on about a third of them): text, binary and
-- jsonb round trips, equality and hashing of different spellings, rate
-- against an independent PL/pgSQL reference, the fast path against the
-- numeric path, and sum(rate_tiers) = rate.
BEGIN;
SELECT plan(14);
SELECT setseed(0.4242);

-- a random digit string of n digits
CREATE FUNCTION pg_temp.digits(n int) RETURNS text LANGUAGE sql AS $$
    SELECT string_agg(floor(random() * 10)::int::text, '') FROM generate_series(1, n)
$$ VOLATILE;

CREATE FUNCTION pg_temp.pick(a text[]) RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT a[1 + floor(random() * array_length(a, 1))::int]
$$;

-- a random plain decimal literal: mostly small, sometimes 20-digit
-- fractions, 38-digit integers or mixed 38-digit values
CREATE FUNCTION pg_temp.rnum() RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r float8 := random();
    k int;
BEGIN
    IF r < 0.55 THEN
        RETURN floor(random() * 1000)::text ||
               CASE WHEN random() < 0.5 THEN '.' || pg_temp.digits(1 + floor(random() * 5)::int) ELSE '' END;
    ELSIF r < 0.75 THEN
        RETURN '0.' || pg_temp.digits(1 + floor(random() * 20)::int);
    ELSIF r < 0.85 THEN
        RETURN pg_temp.digits(1 + floor(random() * 38)::int);
    ELSIF r < 0.95 THEN
        k := 1 + floor(random() * 18)::int;
        RETURN pg_temp.digits(k) || '.' || pg_temp.digits(least(20, 38 - k));
    ELSE
        RETURN '0';
    END IF;
END $$;

-- a random price text (may be invalid: callers keep the valid ones)
CREATE FUNCTION pg_temp.gen_price() RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    m int := floor(random() * 6)::int;
    s text;
    n int;
    b numeric := 0;
    lo numeric;
    hi numeric;
BEGIN
    CASE m
    WHEN 0 THEN s := 'unit ' || pg_temp.rnum();
    WHEN 1 THEN s := 'package ' || (1 + floor(random() * 1000))::text ||
                     CASE WHEN random() < 0.3 THEN '.' || pg_temp.digits(2) ELSE '' END ||
                     ' @ ' || pg_temp.rnum() ||
                     CASE WHEN random() < 0.4 THEN ' round down' WHEN random() < 0.3 THEN ' round up' ELSE '' END;
    WHEN 2, 3 THEN
        s := CASE m WHEN 2 THEN 'graduated ' ELSE 'volume ' END;
        n := floor(random() * 5)::int;
        FOR i IN 1 .. n LOOP
            b := b + CASE WHEN random() < 0.8 THEN (1 + floor(random() * 10000))::numeric
                          ELSE ('0.' || pg_temp.digits(3))::numeric + 0.001 END;
            s := s || b::text || ' @ ' || pg_temp.rnum() ||
                 CASE WHEN random() < 0.3 THEN ' + ' || pg_temp.rnum() ELSE '' END || ' | ';
        END LOOP;
        s := s || 'inf @ ' || pg_temp.rnum() ||
             CASE WHEN random() < 0.3 THEN ' + ' || pg_temp.rnum() ELSE '' END;
    WHEN 4 THEN s := 'flat ' || pg_temp.rnum();
    ELSE s := 'percent ' || pg_temp.rnum();
    END CASE;
    IF random() < 0.3 THEN s := s || ' free ' || pg_temp.rnum(); END IF;
    IF random() < 0.3 THEN
        lo := (floor(random() * 100))::numeric;
        hi := lo + floor(random() * 1000)::numeric;
        IF random() < 0.5 THEN s := s || ' max ' || hi || ' min ' || lo;
        ELSIF random() < 0.5 THEN s := s || ' min ' || lo;
        ELSE s := s || ' max ' || hi;
        END IF;
    END IF;
    IF random() < 0.35 THEN
        -- per N: mostly N made of 2s and 5s (valid with exact), sometimes any
        s := s || ' per ' ||
             CASE WHEN random() < 0.6
                  THEN pg_temp.pick('{1000, 1024, 0.25, 1000000000, 125, 2, 0.5, 3.2, 1280, 0.008}')
                  ELSE pg_temp.rnum() END ||
             pg_temp.pick('{"", "", " round up", " round down", " exact", " exact"}');
    END IF;
    RETURN s;
END $$;

-- the price if t is valid, else NULL
CREATE FUNCTION pg_temp.try_price(t text) RETURNS billing.price LANGUAGE plpgsql AS $$
BEGIN
    RETURN t::billing.price;
EXCEPTION WHEN invalid_text_representation THEN
    RETURN NULL;
END $$;

-- An independent reference for rate(), from the JSON form, in plain SQL
-- numeric arithmetic (per N exact: an integer division at scale 200,
-- checked to leave no remainder).
CREATE FUNCTION pg_temp.ref_rate(p billing.price, q numeric) RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    j jsonb := billing.price_to_jsonb(p);
    amt numeric := 0;
    prev numeric := 0;
    t jsonb;
    b numeric;
    n numeric;
BEGIN
    IF j ? 'per' THEN
        n := (j->>'per')::numeric;
        IF j->>'per_round' = 'exact' THEN
            IF mod(q * 1e200, n) <> 0 THEN
                RAISE EXCEPTION 'per % exact: % does not divide', n, q;
            END IF;
            q := div(q * 1e200, n) * 1e-200;
        ELSE
            q := div(q, n) + CASE WHEN j->>'per_round' = 'up' AND mod(q, n) <> 0 THEN 1 ELSE 0 END;
        END IF;
    END IF;
    IF j ? 'free' THEN q := greatest(q - (j->>'free')::numeric, 0); END IF;
    CASE j->>'model'
    WHEN 'unit' THEN amt := q * (j->>'unit_amount')::numeric;
    WHEN 'flat' THEN amt := (j->>'amount')::numeric;
    WHEN 'percent' THEN amt := q * (j->>'percent')::numeric * 0.01;
    WHEN 'package' THEN
        n := (j->>'package_size')::numeric;
        amt := (div(q, n) + CASE WHEN j->>'round' = 'up' AND mod(q, n) <> 0 THEN 1 ELSE 0 END)
               * (j->>'amount')::numeric;
    WHEN 'graduated' THEN
        FOR t IN SELECT * FROM jsonb_array_elements(j->'tiers') LOOP
            EXIT WHEN q <= prev;
            b := CASE WHEN t->>'up_to' = 'inf' THEN NULL ELSE (t->>'up_to')::numeric END;
            amt := amt + (CASE WHEN b IS NULL THEN q ELSE least(q, b) END - prev)
                         * (t->>'unit_amount')::numeric + (t->>'flat_amount')::numeric;
            EXIT WHEN b IS NULL;
            prev := b;
        END LOOP;
    WHEN 'volume' THEN
        IF q > 0 THEN
            FOR t IN SELECT * FROM jsonb_array_elements(j->'tiers') LOOP
                b := CASE WHEN t->>'up_to' = 'inf' THEN NULL ELSE (t->>'up_to')::numeric END;
                IF b IS NULL OR q <= b THEN
                    amt := q * (t->>'unit_amount')::numeric + (t->>'flat_amount')::numeric;
                    EXIT;
                END IF;
            END LOOP;
        END IF;
    END CASE;
    IF j ? 'max' THEN amt := least(amt, (j->>'max')::numeric); END IF;
    IF j ? 'min' THEN amt := greatest(amt, (j->>'min')::numeric); END IF;
    RETURN amt;
END $$;

CREATE TEMP TABLE gen AS
SELECT g AS id, t, pg_temp.try_price(t) AS p
FROM (SELECT g, pg_temp.gen_price() AS t FROM generate_series(1, 1500) AS g) AS s;
DELETE FROM gen WHERE p IS NULL;

SELECT cmp_ok((SELECT count(*) FROM gen), '>=', 1000::bigint,
              'at least 1000 valid generated prices');
SELECT cmp_ok((SELECT count(*) FROM gen WHERE p::text LIKE '% per %'), '>=', 250::bigint,
              'at least 250 of them with a per modifier, of each rounding');
SELECT ok((SELECT count(*) FILTER (WHERE p::text LIKE '% exact') >= 50
              AND count(*) FILTER (WHERE p::text LIKE '% per % round down') >= 50
              AND count(*) FILTER (WHERE p::text ~ ' per [0-9.]+$') >= 50 FROM gen),
          'per exact, round down and round up (printed without "round up") all occur');

SELECT is((SELECT count(*) FROM gen
           WHERE NOT ((p::text)::billing.price OPERATOR(billing.=) p
                      AND ((p::text)::billing.price)::text = p::text)),
          0::bigint, 'text round trip: price_in(price_out(p)) = p, output is stable');

SELECT is((SELECT count(*) FROM gen
           WHERE NOT billing._price_recv(billing.price_send(p)) OPERATOR(billing.=) p),
          0::bigint, 'binary round trip: price_recv(price_send(p)) = p');

SELECT is((SELECT count(*) FROM gen
           WHERE NOT billing.price_from_jsonb(billing.price_to_jsonb(p)) OPERATOR(billing.=) p),
          0::bigint, 'jsonb round trip: price_from_jsonb(price_to_jsonb(p)) = p');

-- Other spellings of the same price: upper case, tabs, extra zeros.
SELECT is((SELECT count(*) FROM gen,
                  LATERAL (SELECT upper(replace(replace(t, ' @ ', E'\t@\t'), ' ', '  ')) AS t2,
                                  regexp_replace(t, '(^| )(\d+)( |$)', '\1000\2.000\3', 'g') AS t3) AS v
           WHERE NOT (t2::billing.price OPERATOR(billing.=) p AND t3::billing.price OPERATOR(billing.=) p
                      AND billing.price_hash(t2::billing.price) = billing.price_hash(p)
                      AND billing.price_hash_extended(t3::billing.price, 7) = billing.price_hash_extended(p, 7))),
          0::bigint, 'different spellings are equal and hash alike');

-- Quantities: 0, each tier bound and bound +- 1 and +- 0.001, random values
-- of several scales, and huge ones; with per N, also the raw quantities at
-- each tier bound (bound * N) and near multiples of N.
CREATE TEMP TABLE cases AS
SELECT id, p, q FROM gen,
LATERAL (
    SELECT 0::numeric AS q
    UNION ALL SELECT (e->>'up_to')::numeric + d
    FROM jsonb_array_elements(CASE WHEN billing.price_to_jsonb(p) ? 'tiers'
                                   THEN billing.price_to_jsonb(p)->'tiers' ELSE '[]' END) AS e,
         unnest('{-1, -0.001, 0, 0.001, 1}'::numeric[]) AS d
    WHERE e->>'up_to' <> 'inf' AND (e->>'up_to')::numeric + d >= 0
    UNION ALL SELECT round((random() * 100000)::numeric, (random() * 6)::int)
    UNION ALL SELECT floor(random() * 1000)::numeric
    UNION ALL SELECT ('0.' || pg_temp.digits(1 + (random() * 24)::int))::numeric
    UNION ALL SELECT (pg_temp.digits(1 + (random() * 40)::int))::numeric
    UNION ALL SELECT (e->>'up_to')::numeric * (billing.price_to_jsonb(p)->>'per')::numeric + d
    FROM jsonb_array_elements(CASE WHEN billing.price_to_jsonb(p) ?& '{tiers, per}'
                                   THEN billing.price_to_jsonb(p)->'tiers' ELSE '[]' END) AS e,
         unnest('{-1, -0.001, 0, 0.001, 1}'::numeric[]) AS d
    WHERE e->>'up_to' <> 'inf'
      AND (e->>'up_to')::numeric * (billing.price_to_jsonb(p)->>'per')::numeric + d >= 0
    UNION ALL SELECT (billing.price_to_jsonb(p)->>'per')::numeric * floor(random() * 100)::numeric + d
    FROM unnest('{0, 0.001, 1}'::numeric[]) AS d
    WHERE billing.price_to_jsonb(p) ? 'per'
) AS qs;

SELECT cmp_ok((SELECT count(*) FROM cases), '>=', 8000::bigint, 'at least 8000 (price, quantity) cases');

SELECT is((SELECT count(*) FROM cases WHERE billing.rate(p, q) <> pg_temp.ref_rate(p, q)),
          0::bigint, 'rate equals exact numeric arithmetic (independent reference)');

SELECT is((SELECT count(*) FROM cases
           WHERE billing._rate_numeric(p, q)::text <> billing.rate(p, q)::text),
          0::bigint, 'numeric path = rate, digit for digit');

SELECT is((SELECT count(*) FROM cases
           WHERE billing._rate_fast(p, q)::text <> billing._rate_numeric(p, q)::text),
          0::bigint, 'fast path = numeric path, digit for digit, wherever the fast path applies');

SELECT cmp_ok((SELECT count(*) FILTER (WHERE billing._rate_fast(p, q) IS NOT NULL)::numeric / count(*)
               FROM cases), '>', 0.5, 'the fast path handles most generated cases');
SELECT cmp_ok((SELECT count(*) FILTER (WHERE billing._rate_fast(p, q) IS NOT NULL)::numeric / count(*)
               FROM cases WHERE p::text LIKE '% per %'), '>', 0.5,
              'the fast path handles most generated cases with per too');

SELECT is((SELECT count(*) FROM cases
           WHERE (SELECT coalesce(sum(amount), 0) FROM billing.rate_tiers(p, q)) <> billing.rate(p, q)),
          0::bigint, 'sum(rate_tiers.amount) = rate');

SELECT * FROM finish();
ROLLBACK;
