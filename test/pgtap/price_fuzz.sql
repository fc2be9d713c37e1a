-- Fuzz billing.price input: more than 10,000 malformed and random strings
-- (mutations of valid prices, random token soups, random characters) and
-- random byte strings to the binary input.  Each must either parse and
-- round-trip, or raise 22P02 (text) / 22P03 (binary): never another error,
-- never a crash.
BEGIN;
SELECT plan(6);
SELECT setseed(0.1717);

CREATE FUNCTION pg_temp.pick(a text[]) RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT a[1 + floor(random() * array_length(a, 1))::int]
$$;

-- a random string: a token soup, a mutated valid price, or random characters
CREATE FUNCTION pg_temp.fuzz_string() RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    tokens text[] := ARRAY['unit', 'package', 'graduated', 'volume', 'flat', 'percent',
        'free', 'min', 'max', 'round', 'up', 'down', 'inf', 'INF', 'nan', 'infinity', '@', '|',
        'per', 'PER', 'exact', 'per 1000', 'per 3 exact', 'per 1024 exact', 'round down',
        '+', '-', '.', '0', '1', '10', '0.5', '100', '1e5', '1.2.3', '00.100',
        '99999999999999999999999999999999999999', '999999999999999999999999999999999999999',
        '0.00000000000000000001', '0.000000000000000000001', ' ', E'\t', 'é', '€', ',', ''];
    valid text[] := ARRAY['unit 0.5', 'package 100 @ 5 round down', 'flat 10', 'percent 2.9',
        'graduated 5000 @ 0 | 100000 @ 0.00029 | inf @ 0.0002 + 10 min 25',
        'volume 100 @ 1 | 1000 @ 0.8 + 5 | inf @ 0.5 + 20 free 10 max 1000',
        'unit 0.25 per 1000000000', 'graduated 5 @ 0 | inf @ 1 per 1000 round down min 1',
        'package 10 @ 3 round down per 0.5 exact', 'flat 9 per 1024 exact free 2'];
    alphabet text := 'unitpackgrdvolmefsxy@|+-.0123456789 eE';   -- has the letters of per, exact
    r float8 := random();
    s text := '';
    n int;
    pos int;
BEGIN
    IF r < 0.4 THEN
        n := floor(random() * 12)::int;
        FOR i IN 1 .. n LOOP
            s := s || pg_temp.pick(tokens) || CASE WHEN random() < 0.8 THEN ' ' ELSE '' END;
        END LOOP;
    ELSIF r < 0.8 THEN
        s := pg_temp.pick(valid);
        n := 1 + floor(random() * 3)::int;
        FOR i IN 1 .. n LOOP
            pos := 1 + floor(random() * (length(s) + 1))::int;
            CASE floor(random() * 3)::int
            WHEN 0 THEN s := overlay(s placing '' from pos for 1);            -- delete
            WHEN 1 THEN s := overlay(s placing substr(alphabet, 1 + floor(random() * length(alphabet))::int, 1)
                                   from pos for 0);                          -- insert
            ELSE s := overlay(s placing substr(alphabet, 1 + floor(random() * length(alphabet))::int, 1)
                              from pos for 1);                               -- replace
            END CASE;
        END LOOP;
    ELSE
        n := floor(random() * 30)::int;
        FOR i IN 1 .. n LOOP
            s := s || chr(CASE WHEN random() < 0.9 THEN 32 + floor(random() * 95)::int
                               ELSE 160 + floor(random() * 400)::int END);
        END LOOP;
    END IF;
    RETURN s;
END $$;

CREATE TEMP TABLE outcome (kind text, input text, sqlstate text, message text);

DO $$
DECLARE
    s text;
    p billing.price;
BEGIN
    FOR i IN 1 .. 10000 LOOP
        s := pg_temp.fuzz_string();
        BEGIN
            p := s::billing.price;
            IF (p::text)::billing.price OPERATOR(billing.=) p
               AND ((p::text)::billing.price)::text = p::text
               AND billing._price_recv(billing.price_send(p)) OPERATOR(billing.=) p THEN
                INSERT INTO outcome VALUES ('text', s, 'parsed', NULL);
            ELSE
                INSERT INTO outcome VALUES ('text', s, 'no round trip', p::text);
            END IF;
        EXCEPTION
            WHEN invalid_text_representation THEN
                INSERT INTO outcome VALUES ('text', s, '22P02', NULL);
            WHEN OTHERS THEN
                INSERT INTO outcome VALUES ('text', s, SQLSTATE, SQLERRM);
        END;
    END LOOP;
END $$;

-- Random bytes to the binary input: mostly version byte 1 or 2 then
-- printable characters from the grammar, sometimes fully random bytes.
DO $$
DECLARE
    b bytea;
    p billing.price;
    n int;
BEGIN
    FOR i IN 1 .. 3000 LOOP
        n := floor(random() * 40)::int;
        IF random() < 0.5 THEN
            b := CASE WHEN random() < 0.5 THEN '\x01'::bytea ELSE '\x02'::bytea END
                 || convert_to(pg_temp.fuzz_string(), 'UTF8');
        ELSE
            SELECT decode(coalesce(string_agg(lpad(to_hex(CASE WHEN g = 1 AND random() < 0.7 THEN 1 + floor(random() * 2)::int
                                                            ELSE floor(random() * 256)::int END), 2, '0'), ''), ''), 'hex')
              INTO b FROM generate_series(1, n) AS g;
        END IF;
        BEGIN
            p := billing._price_recv(b);
            IF billing._price_recv(billing.price_send(p)) OPERATOR(billing.=) p
               AND (p::text)::billing.price OPERATOR(billing.=) p THEN
                INSERT INTO outcome VALUES ('binary', encode(b, 'hex'), 'parsed', NULL);
            ELSE
                INSERT INTO outcome VALUES ('binary', encode(b, 'hex'), 'no round trip', p::text);
            END IF;
        EXCEPTION
            WHEN invalid_binary_representation THEN
                INSERT INTO outcome VALUES ('binary', encode(b, 'hex'), '22P03', NULL);
            WHEN OTHERS THEN
                INSERT INTO outcome VALUES ('binary', encode(b, 'hex'), SQLSTATE, SQLERRM);
        END;
    END LOOP;
END $$;

SELECT cmp_ok((SELECT count(*) FROM outcome WHERE kind = 'text'), '>=', 10000::bigint,
              'at least 10,000 strings fed to price_in');
SELECT ok((SELECT count(*) FILTER (WHERE sqlstate = 'parsed') > 100
              AND count(*) FILTER (WHERE sqlstate = '22P02') > 100 FROM outcome WHERE kind = 'text'),
          'the fuzz hits both valid and invalid text input');
SELECT ok((SELECT count(*) FILTER (WHERE sqlstate = 'parsed' AND input ~* 'per') > 30
              AND count(*) FILTER (WHERE sqlstate = '22P02' AND input ~* 'per') > 100
              FROM outcome WHERE kind = 'text'),
          'the fuzz hits valid and invalid prices with per');
SELECT ok((SELECT count(*) FILTER (WHERE sqlstate = 'parsed') > 30
              AND count(*) FILTER (WHERE sqlstate = '22P03') > 100 FROM outcome WHERE kind = 'binary'),
          'the fuzz hits both valid and invalid binary input');
SELECT is((SELECT count(*) FROM outcome WHERE kind = 'text' AND sqlstate NOT IN ('parsed', '22P02')),
          0::bigint, 'every string parses and round-trips, or raises 22P02');
SELECT is((SELECT count(*) FROM outcome WHERE kind = 'binary' AND sqlstate NOT IN ('parsed', '22P03')),
          0::bigint, 'every byte string to price_recv parses and round-trips, or raises 22P03');

-- On failure, show what went wrong.
SELECT diag(kind || ' ' || sqlstate || ': ' || quote_literal(input) || ' ' || coalesce(message, ''))
FROM (SELECT * FROM outcome
       WHERE sqlstate NOT IN ('parsed', CASE kind WHEN 'text' THEN '22P02' ELSE '22P03' END)
       LIMIT 10) AS bad;

SELECT * FROM finish();
ROLLBACK;
