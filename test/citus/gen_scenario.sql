-- A seeded random billing scenario (issue 13, defect 5).  test/citus/run.sh
-- runs this generator once per seed on the plain node (psql -v seed=N); it
-- prints an SQL script, which run.sh then runs on one node and on the Citus
-- cluster (psql -v citus=false|true) before comparing every table
-- (test/citus/compare.sql) and the whole output.
--
-- The scenario: meters of every aggregation and several bucket widths
-- (always a unique meter, whose dimensions are users);
-- plans in USD, EUR and JPY with daily, multi-day and monthly periods; fixed
-- fees and usage charges with several versions each, matrix charges (a
-- dimension apart, with versions of its own); accounts whose
-- subscriptions start at odd moments, some ending mid-period and followed
-- by another plan, some with a spend cap; usage through every ingest path
-- (record one call at a time and in bulk, a metered table through INSERT
-- and COPY, ingest() batches with a replay, report_cumulative) with
-- repeated event ids and dimensions; compaction at random points; a table
-- audited per account (billing.audit_table), changed now and then.  Then
-- finalize, and the past changes: late usage, corrections up and down,
-- retroactive prices, a usage charge and a fixed fee added for the past
-- (lines missing on the billed side), a subscription cut short (lines
-- missing on today's side), spend caps changed; rerate (a dry run, the
-- real one, and again: nothing), a second finalize carrying the
-- adjustments, more changes, rerate twice more.
--
-- Every timestamp is fixed (the meters keep a 100-year late window), so the
-- scenario does not depend on the time of day.  The generator reads no
-- billing object: it needs only setseed() and random(), which give the
-- same sequence for the same seed.
\set ON_ERROR_STOP 1
\set QUIET on
\o /dev/null
SET client_min_messages = warning;
SET TimeZone = 'UTC';
SELECT setseed(((:seed)::bigint % 1000003) / 1000003.0 * 2 - 1);

CREATE TEMP TABLE out (n serial, line text);
CREATE FUNCTION pg_temp.emit(t text) RETURNS void LANGUAGE sql AS $$ INSERT INTO out (line) VALUES (t) $$;
-- an integer in [lo, hi]
CREATE FUNCTION pg_temp.ri(lo int, hi int) RETURNS int LANGUAGE sql AS $$
    SELECT lo + floor(random() * (hi - lo + 1))::int $$;
CREATE FUNCTION pg_temp.pick(a text[]) RETURNS text LANGUAGE sql AS $$
    SELECT a[1 + floor(random() * cardinality(a))::int] $$;
CREATE FUNCTION pg_temp.chance(p float8) RETURNS boolean LANGUAGE sql AS $$ SELECT random() < p $$;
-- a decimal in [0, hi) with up to `scale` digits after the point
CREATE FUNCTION pg_temp.rd(hi numeric, scale int) RETURNS numeric LANGUAGE sql AS $$
    SELECT trunc((random() * hi)::numeric, scale) $$;
-- a timestamp literal
CREATE FUNCTION pg_temp.lit(t timestamptz) RETURNS text LANGUAGE sql AS $$
    SELECT quote_literal(to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00') $$;

-- what the generator made, to draw later steps from
CREATE TEMP TABLE g_meters (meter text, aggregation text, width interval);
CREATE TEMP TABLE g_plans (plan text, period interval, currency text);
CREATE TEMP TABLE g_charges (plan text, meter text, valid_from timestamptz, dimension text);
CREATE TEMP TABLE g_accounts (account_id bigint, currency text);
CREATE TEMP TABLE g_subs (account_id bigint, plan text, starts_at timestamptz, ends_at timestamptz);
-- usage sent through record() without an event id (each one counted)
CREATE TEMP TABLE g_sent (account_id bigint, meter text, ts timestamptz, quantity numeric, dimension text);
CREATE TEMP TABLE g_state (key text PRIMARY KEY, n int);
INSERT INTO g_state VALUES ('offset0', 0), ('offset1', 0), ('event', 0), ('retro', 0), ('report', 0),
                           ('contract', 0);

-- t0 and the usage window [t0 - 5 days, t0 + 6 days)
CREATE FUNCTION pg_temp.t0() RETURNS timestamptz LANGUAGE sql AS $$ SELECT timestamptz '2024-03-04 00:00:00+00' $$;
CREATE FUNCTION pg_temp.ts_in(lo interval, hi interval) RETURNS timestamptz LANGUAGE sql AS $$
    SELECT pg_temp.t0() + lo + (hi - lo) * random() $$;
CREATE FUNCTION pg_temp.next(k text) RETURNS int LANGUAGE sql AS $$
    UPDATE g_state SET n = n + 1 WHERE key = k RETURNING n $$;

-- a random price of a usage charge, with modifiers now and then
CREATE FUNCTION pg_temp.price() RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    p text := pg_temp.pick('{unit,unit,package,graduated,volume,flat}');
BEGIN
    p := CASE p
        WHEN 'unit' THEN 'unit ' || pg_temp.rd(3, 4)
        WHEN 'package' THEN format('package %s @ %s%s', pg_temp.ri(5, 200), pg_temp.rd(5, 2),
                                  CASE WHEN pg_temp.chance(0.3) THEN ' round down' ELSE '' END)
        WHEN 'graduated' THEN format('graduated %s @ 0 | %s @ %s | inf @ %s + %s',
                                     pg_temp.ri(1, 20), pg_temp.ri(30, 300), pg_temp.rd(1, 4),
                                     pg_temp.rd(1, 4), pg_temp.rd(3, 1))
        WHEN 'volume' THEN format('volume %s @ %s | inf @ %s', pg_temp.ri(10, 200),
                                  pg_temp.rd(2, 3), pg_temp.rd(1, 3))
        ELSE 'flat ' || pg_temp.rd(20, 2) END;
    IF pg_temp.chance(0.2) THEN p := p || ' free ' || pg_temp.ri(1, 30); END IF;
    IF pg_temp.chance(0.15) THEN p := p || ' min ' || pg_temp.ri(1, 5); END IF;
    IF pg_temp.chance(0.15) THEN p := p || ' max ' || pg_temp.ri(40, 400); END IF;
    RETURN p;
END $$;

-- one usage report: an account (mostly subscribed ones), a meter, a
-- quantity fitting the meter, a timestamp in [t0 + lo, t0 + hi), an event
-- id (now and then a repeat of a recent one) and a dimension
CREATE FUNCTION pg_temp.report(lo interval, hi interval, with_ids boolean,
                               OUT account_id bigint, OUT meter text, OUT quantity numeric,
                               OUT ts timestamptz, OUT event_id text, OUT dimension text)
    LANGUAGE plpgsql AS $$
DECLARE
    e int;
BEGIN
    SELECT a.account_id INTO account_id FROM g_accounts a ORDER BY random() LIMIT 1;
    SELECT m.meter INTO meter FROM g_meters m ORDER BY random() LIMIT 1;
    quantity := CASE WHEN pg_temp.chance(0.2) THEN pg_temp.rd(10, 3) ELSE pg_temp.ri(0, 40) END;
    -- a microsecond of its own: no two reports tie on their timestamp (on a
    -- tie of a last meter the later arrival wins, and on Citus arrival is
    -- numbered by each node on its own: see compare.sql)
    ts := date_trunc('second', pg_temp.ts_in(lo, hi)) + interval '1 microsecond' * pg_temp.next('report');
    IF with_ids AND pg_temp.chance(0.8) THEN
        e := pg_temp.next('event');
        -- one in eight repeats an id sent before (a duplicate, not counted)
        IF e > 10 AND pg_temp.chance(0.125) THEN e := e - pg_temp.ri(1, 10); END IF;
        event_id := 'e' || e;
    END IF;
    dimension := CASE WHEN meter = 'm3' AND pg_temp.chance(0.9) THEN 'user' || pg_temp.ri(1, 25)
                      ELSE pg_temp.pick('{"","","",eu,us}') END;
END $$;

-- a statement of n reports through record(), one query (run on the
-- coordinator on Citus); reports without an id are remembered
CREATE FUNCTION pg_temp.record_bulk(n int, lo interval, hi interval) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v text[] := '{}';
BEGIN
    FOR i IN 1..n LOOP
        r := pg_temp.report(lo, hi, true);
        v := v || format('(%s, %L, %s, %s::timestamptz, %L, %L)', r.account_id, r.meter, r.quantity,
                         pg_temp.lit(r.ts), r.event_id, r.dimension);
        IF r.event_id IS NULL THEN
            INSERT INTO g_sent VALUES (r.account_id, r.meter, r.ts, r.quantity, r.dimension);
        END IF;
    END LOOP;
    PERFORM pg_temp.emit(format(
        'SELECT count(*) FILTER (WHERE billing.record(v.a, v.m, v.q, v.ts, v.e, v.d)) AS counted FROM (VALUES %s) v(a, m, q, ts, e, d);',
        array_to_string(v, ', ')));
END $$;

-- n calls of record() each in its own statement (pushed down to the
-- account's node on Citus)
CREATE FUNCTION pg_temp.record_each(n int, lo interval, hi interval) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR i IN 1..n LOOP
        r := pg_temp.report(lo, hi, true);
        PERFORM pg_temp.emit(format('SELECT billing.record(%s, %L, %s, %s, %L, %L) AS counted;',
                                    r.account_id, r.meter, r.quantity, pg_temp.lit(r.ts),
                                    r.event_id, r.dimension));
        IF r.event_id IS NULL THEN
            INSERT INTO g_sent VALUES (r.account_id, r.meter, r.ts, r.quantity, r.dimension);
        END IF;
    END LOOP;
END $$;

-- the metered table: an INSERT of n rows, or a COPY of them, sent twice
-- with probability replay (what has an event id is then a duplicate)
CREATE FUNCTION pg_temp.metered(n int, lo interval, hi interval, copy boolean, replay float8 DEFAULT 0.4)
    RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v text[] := '{}';
BEGIN
    IF copy THEN
        -- (quietly: on Citus the COPY tag counts the rows sent to the shards,
        -- not the rows stored; stored_events below is what both must agree on)
        PERFORM pg_temp.emit('\set QUIET on');
        PERFORM pg_temp.emit('COPY ev (account_id, meter, quantity, ts, event_id, dim) FROM STDIN WITH (FORMAT csv);');
    END IF;
    FOR i IN 1..n LOOP
        r := pg_temp.report(lo, hi, true);
        IF copy THEN
            PERFORM pg_temp.emit(format('%s,%s,%s,%s,%s,%s', r.account_id, r.meter, r.quantity,
                                        to_char(r.ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US+00'),
                                        coalesce(r.event_id, ''), '"' || r.dimension || '"'));
        ELSE
            v := v || format('(%s, %L, %s, %s, %L, %L)', r.account_id, r.meter, r.quantity,
                             pg_temp.lit(r.ts), r.event_id, r.dimension);
        END IF;
    END LOOP;
    IF copy THEN
        PERFORM pg_temp.emit('\.');
        IF pg_temp.chance(replay) THEN
            PERFORM pg_temp.emit(o.line) FROM out o
             WHERE o.n >= (SELECT max(o2.n) FROM out o2 WHERE o2.line LIKE 'COPY ev %')
             ORDER BY o.n;
        END IF;
        PERFORM pg_temp.emit('\set QUIET off');
    ELSE
        PERFORM pg_temp.emit(format('INSERT INTO ev (account_id, meter, quantity, ts, event_id, dim) VALUES %s;',
                                    array_to_string(v, ', ')));
    END IF;
END $$;

-- an ingest() batch of n reports at the next offset of a partition, and
-- now and then a replay of an offset applied before (changes nothing)
CREATE FUNCTION pg_temp.ingest(n int, lo interval, hi interval) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    r record;
    a text[] := '{}'; m text[] := '{}'; q text[] := '{}'; t text[] := '{}';
    e text[] := '{}'; d text[] := '{}';
    part int := pg_temp.ri(0, 1);
    off int := pg_temp.next('offset' || part);
BEGIN
    FOR i IN 1..n LOOP
        r := pg_temp.report(lo, hi, true);
        a := a || r.account_id::text; m := m || r.meter; q := q || r.quantity::text;
        t := t || pg_temp.lit(r.ts); e := e || coalesce(quote_literal(r.event_id), 'NULL');
        d := d || quote_literal(r.dimension);
    END LOOP;
    PERFORM pg_temp.emit(format(
        'SELECT * FROM billing.ingest(%L, %s, %s, ARRAY[%s]::bigint[], ARRAY[%s]::text[], ARRAY[%s]::numeric[], ARRAY[%s]::timestamptz[], ARRAY[%s]::text[], ARRAY[%s]::text[]);',
        'kafka', part, off, array_to_string(a, ','), (SELECT string_agg(quote_literal(x), ',') FROM unnest(m) x),
        array_to_string(q, ','), array_to_string(t, ','), array_to_string(e, ','), array_to_string(d, ',')));
    IF pg_temp.chance(0.5) THEN
        PERFORM pg_temp.emit(format(
            'SELECT * FROM billing.ingest(%L, %s, %s, ARRAY[%s]::bigint[], ARRAY[%L]::text[], ARRAY[1000]::numeric[], ARRAY[%s]::timestamptz[]);',
            'kafka', part, pg_temp.ri(1, off), a[1], m[1], t[1]));
    END IF;
END $$;

-- report_cumulative: two collectors report running totals of a few buckets
-- of a sum meter, repeated and out of order
CREATE FUNCTION pg_temp.cumulative(n int, lo interval, hi interval) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    acc bigint;
    mt text;
    b timestamptz;
    tot int;
BEGIN
    FOR i IN 1..n LOOP
        SELECT a.account_id INTO acc FROM g_accounts a ORDER BY random() LIMIT 1;
        SELECT m.meter INTO mt FROM g_meters m WHERE m.aggregation = 'sum' ORDER BY random() LIMIT 1;
        b := date_trunc('second', pg_temp.ts_in(lo, hi));
        tot := pg_temp.ri(1, 50);
        FOR j IN 1..pg_temp.ri(1, 4) LOOP
            PERFORM pg_temp.emit(format('SELECT billing.report_cumulative(%L, %s, %L, %s, %s);',
                                        pg_temp.pick('{c1,c2}'), acc, mt, pg_temp.lit(b),
                                        greatest(0, tot + pg_temp.ri(-10, 20))));
        END LOOP;
    END LOOP;
END $$;

-- corrections of sum and count meters: up anywhere, down by 1 in a bucket
-- that record() filled without an event id (so it cannot go below 0)
CREATE FUNCTION pg_temp.corrections(n int) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR i IN 1..n LOOP
        IF pg_temp.chance(0.5) THEN
            SELECT s.account_id, s.meter, s.dimension,
                   date_bin(m.width, s.ts, timestamptz '1970-01-01 00:00:00+00') AS b
              INTO r
              FROM g_sent s JOIN g_meters m ON m.meter = s.meter
             WHERE m.aggregation IN ('sum', 'count') AND s.quantity >= 1
             ORDER BY random() LIMIT 1;
            IF FOUND THEN
                PERFORM pg_temp.emit(format(
                    'SELECT billing.correct_usage(%s, %L, %s, -1, %L, %L);', r.account_id, r.meter,
                    pg_temp.lit(r.b), 'double count', r.dimension));
                -- once per bucket
                DELETE FROM g_sent s WHERE s.account_id = r.account_id AND s.meter = r.meter;
                CONTINUE;
            END IF;
        END IF;
        SELECT a.account_id, m.meter,
               date_bin(m.width, pg_temp.ts_in('-4 days', '2 days'), timestamptz '1970-01-01 00:00:00+00') AS b
          INTO r
          FROM g_accounts a, g_meters m
         WHERE m.aggregation IN ('sum', 'count')
         ORDER BY random() LIMIT 1;
        PERFORM pg_temp.emit(format('SELECT billing.correct_usage(%s, %L, %s, %s, %L);',
                                    r.account_id, r.meter, pg_temp.lit(r.b), pg_temp.ri(1, 30),
                                    'collector outage, restated'));
    END LOOP;
END $$;

-- a retroactive price: a new version of a usage charge in force from a past moment
CREATE FUNCTION pg_temp.retro_price(back interval) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    c record;
BEGIN
    SELECT DISTINCT ON (x.plan, x.meter) x.plan, x.meter INTO c
      FROM g_charges x WHERE x.meter IS NOT NULL ORDER BY x.plan, x.meter, random();
    SELECT x.plan, x.meter, x.dimension INTO c FROM g_charges x WHERE x.meter IS NOT NULL ORDER BY random() LIMIT 1;
    IF FOUND THEN
        -- an odd minute, different each time (valid_from is unique per charge)
        PERFORM pg_temp.emit(format(
            'INSERT INTO billing.charges (plan, meter, dimension, price, valid_from) VALUES (%L, %L, %L, %L, %s);',
            c.plan, c.meter, c.dimension, pg_temp.price(),
            pg_temp.lit(pg_temp.t0() - back + interval '1 minute' * (7 * pg_temp.next('retro')))));
    END IF;
END $$;

-- results both runs must print alike: invoices by account and period
-- (invoice numbers come from a sequence), rerate rows the same way
CREATE FUNCTION pg_temp.finalize(as_of interval) RETURNS void LANGUAGE sql AS $$
    SELECT pg_temp.emit(format(
        'SELECT count(*) AS invoices, sum(total) AS total FROM billing.finalize_invoices(%s);',
        pg_temp.lit(pg_temp.t0() + as_of)))
$$;
CREATE FUNCTION pg_temp.rerate(lo interval, hi interval, dry boolean) RETURNS void LANGUAGE sql AS $$
    SELECT pg_temp.emit(format(
        'SELECT count(*) AS %s, sum(delta) AS delta, sum(billed_quantity) AS billed_quantity, sum(correct_quantity) AS correct_quantity FROM billing.rerate(%s, %s, dry_run => %s);',
        CASE WHEN dry THEN 'dry_run_rows' ELSE 'rerated' END,
        pg_temp.lit(pg_temp.t0() + lo), pg_temp.lit(pg_temp.t0() + hi), dry::text))
$$;
-- changes to the audited table contracts (billing.audit_table, issue 19):
-- inserts of new contracts, updates of some accounts' contracts, deletes,
-- an update that changes nothing; in one transaction with a change of the
-- account itself now and then (one chain for both); a change rolled back.
-- (Not a move to another account: Citus does not update the distribution
-- column; pgTAP audit_table.sql covers it on one node.)
CREATE FUNCTION pg_temp.contracts(n int) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v text[] := '{}';
    a bigint;
    b bigint;
BEGIN
    FOR i IN 1..n LOOP
        v := v || format('(%s, %s, %L, %s)', (SELECT account_id FROM g_accounts ORDER BY random() LIMIT 1),
                         pg_temp.next('contract'), pg_temp.pick('{team,business,enterprise}'), pg_temp.rd(5000, 2));
    END LOOP;
    PERFORM pg_temp.emit(format('INSERT INTO contracts (account_id, contract_id, plan, amount) VALUES %s;',
                                array_to_string(v, ', ')));
    SELECT account_id INTO a FROM g_accounts ORDER BY random() LIMIT 1;
    SELECT account_id INTO b FROM g_accounts ORDER BY random() LIMIT 1;
    PERFORM pg_temp.emit(format('UPDATE contracts SET amount = amount + %s WHERE account_id IN (%s, %s);',
                                pg_temp.rd(100, 2), a, b));
    PERFORM pg_temp.emit(format('UPDATE contracts SET plan = plan WHERE account_id = %s;', a));
    IF pg_temp.chance(0.5) THEN
        PERFORM pg_temp.emit('BEGIN;');
        PERFORM pg_temp.emit(format('UPDATE contracts SET plan = %L WHERE account_id = %s;',
                                    pg_temp.pick('{team,business}'), b));
        PERFORM pg_temp.emit(format('UPDATE billing.accounts SET name = %L WHERE account_id = %s;',
                                    'org ' || b || ', renamed ' || pg_temp.next('contract'), b));
        PERFORM pg_temp.emit('COMMIT;');
    END IF;
    PERFORM pg_temp.emit('BEGIN;');
    PERFORM pg_temp.emit(format('DELETE FROM contracts WHERE account_id = %s;', a));
    PERFORM pg_temp.emit('ROLLBACK;');
    PERFORM pg_temp.emit(format('DELETE FROM contracts WHERE contract_id %% 7 = %s;', pg_temp.ri(0, 6)));
END $$;
CREATE FUNCTION pg_temp.maybe_compact() RETURNS void LANGUAGE sql AS $$
    SELECT pg_temp.emit('SELECT billing.compact_usage() >= 0 AS compacted;') WHERE pg_temp.chance(0.35)
$$;

-- the scenario -------------------------------------------------------------------------

SELECT pg_temp.emit('-- billing scenario of seed ' || :'seed' || ' (test/citus/gen_scenario.sql)');
SELECT pg_temp.emit(x) FROM unnest(ARRAY[
    '\set ON_ERROR_STOP 1',
    '\pset footer off',
    'SET TimeZone = ''UTC'';',
    'CREATE EXTENSION billing;',
    '\if :citus',
    -- 4 shards per table (2 per worker) keep distribute() quick; the paths are the same
    'SELECT set_config(''citus.shard_count'', ''4'', false) \gset',
    'SELECT count(*) > 0 AS distributed FROM billing.distribute() \gset',
    '\endif']) x;

-- meters: the first two sum meters, the third a unique meter (issue 18),
-- the others of any aggregation
INSERT INTO g_meters
SELECT 'm' || i, CASE WHEN i <= 2 THEN 'sum' WHEN i = 3 THEN 'unique'
                      ELSE pg_temp.pick('{sum,count,max,last}') END,
       pg_temp.pick('{1 minute,1 minute,5 minutes,1 hour}')::interval
  FROM generate_series(1, pg_temp.ri(3, 5)) i;
SELECT pg_temp.emit(format(
    'INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window, dedupe_window) VALUES (%L, %L, %L, %L, %L);',
    meter, aggregation, width, '100 years', '100 years'))
  FROM g_meters ORDER BY meter;

-- plans, their fixed fees and usage charges (one to three versions each)
INSERT INTO g_plans
SELECT 'p' || i, pg_temp.pick('{1 day,1 day,2 days,3 days,1 mon}')::interval,
       CASE WHEN i = 1 THEN 'USD' ELSE pg_temp.pick('{USD,USD,EUR,JPY}') END
  FROM generate_series(1, pg_temp.ri(2, 4)) i;
SELECT pg_temp.emit(format('INSERT INTO billing.plans (plan, period, currency) VALUES (%L, %L, %L);',
                           plan, period, currency))
  FROM g_plans ORDER BY plan;
DO $$
DECLARE
    p record;
    m record;
BEGIN
    FOR p IN SELECT * FROM g_plans ORDER BY plan LOOP
        FOR j IN 1..pg_temp.ri(0, 2) LOOP
            PERFORM pg_temp.emit(format(
                'INSERT INTO billing.charges (plan, meter, price, valid_from, description) VALUES (%L, NULL, %L, %L, %L);',
                p.plan, 'flat ' || pg_temp.rd(50, 2), '-infinity', (ARRAY['base', 'support'])[j]));
        END LOOP;
        FOR m IN SELECT * FROM g_meters ORDER BY meter LOOP
            CONTINUE WHEN NOT pg_temp.chance(0.7);
            FOR j IN 1..pg_temp.ri(1, 3) LOOP
                INSERT INTO g_charges VALUES (p.plan, m.meter,
                    CASE j WHEN 1 THEN '-infinity'
                           WHEN 2 THEN pg_temp.t0() + interval '1 hour' * pg_temp.ri(-100, 40)
                           ELSE pg_temp.t0() + interval '1 hour' * pg_temp.ri(41, 150) END);
                PERFORM pg_temp.emit(format(
                    'INSERT INTO billing.charges (plan, meter, price, valid_from) VALUES (%L, %L, %L, %L);',
                    p.plan, m.meter, pg_temp.price(),
                    (SELECT CASE WHEN isfinite(valid_from) THEN to_char(valid_from AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS+00')
                                 ELSE '-infinity' END
                       FROM g_charges ORDER BY ctid DESC LIMIT 1)));
            END LOOP;
            -- a matrix charge: the eu dimension apart (issue 18), one or two versions
            IF pg_temp.chance(0.4) THEN
                FOR j IN 1..pg_temp.ri(1, 2) LOOP
                    INSERT INTO g_charges VALUES (p.plan, m.meter,
                        CASE j WHEN 1 THEN '-infinity'
                               ELSE pg_temp.t0() + interval '1 hour' * pg_temp.ri(-100, 40) END, 'eu');
                    PERFORM pg_temp.emit(format(
                        'INSERT INTO billing.charges (plan, meter, dimension, price, valid_from) VALUES (%L, %L, %L, %L, %L);',
                        p.plan, m.meter, 'eu', pg_temp.price(),
                        (SELECT CASE WHEN isfinite(valid_from) THEN to_char(valid_from AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS+00')
                                     ELSE '-infinity' END
                           FROM g_charges ORDER BY ctid DESC LIMIT 1)));
                END LOOP;
            END IF;
        END LOOP;
    END LOOP;
END $$;

-- accounts (spread over the shards), and their subscriptions: a start at an
-- odd second in the 5 days before t0; a third end mid-period, half of
-- those followed by another plan of the same currency; some with a cap
INSERT INTO g_accounts
SELECT a, NULL FROM (SELECT DISTINCT pg_temp.ri(1, 400) AS a FROM generate_series(1, pg_temp.ri(10, 16))) x;
DO $$
DECLARE
    a record;
    p record;
    q record;
    st timestamptz;
    en timestamptz;
BEGIN
    FOR a IN SELECT * FROM g_accounts ORDER BY account_id LOOP
        SELECT * INTO p FROM g_plans ORDER BY random() LIMIT 1;
        UPDATE g_accounts SET currency = p.currency WHERE account_id = a.account_id;
        PERFORM pg_temp.emit(format('INSERT INTO billing.accounts (account_id, currency, name) VALUES (%s, %L, %L);',
                                    a.account_id, p.currency, 'org ' || a.account_id));
        CONTINUE WHEN pg_temp.chance(0.1);          -- an account without a subscription
        -- (and a fraction of a second drawn from the account number, so
        -- that no random() call is added: the start falls inside a bucket
        -- of every width, and so does a plan change at its end)
        st := pg_temp.t0() - interval '1 second' * pg_temp.ri(0, 5 * 86400)
              + interval '1 microsecond' * (a.account_id * 7919 % 1000000);
        en := CASE WHEN pg_temp.chance(0.33) THEN st + interval '1 second' * pg_temp.ri(3600, 4 * 86400) END;
        INSERT INTO g_subs VALUES (a.account_id, p.plan, st, en);
        PERFORM pg_temp.emit(format(
            'INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at, spend_cap) VALUES (%s, %L, %s, %s, %s);',
            a.account_id, p.plan, pg_temp.lit(st), coalesce(pg_temp.lit(en), 'NULL'),
            CASE WHEN pg_temp.chance(0.3) THEN pg_temp.rd(30, 2)::text ELSE 'NULL' END));
        IF en IS NOT NULL AND pg_temp.chance(0.5) THEN
            SELECT * INTO q FROM g_plans WHERE currency = p.currency ORDER BY random() LIMIT 1;
            INSERT INTO g_subs VALUES (a.account_id, q.plan, en, NULL);
            PERFORM pg_temp.emit(format(
                'INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap) VALUES (%s, %L, %s, %s);',
                a.account_id, q.plan, pg_temp.lit(en),
                CASE WHEN pg_temp.chance(0.3) THEN pg_temp.rd(30, 2)::text ELSE 'NULL' END));
        END IF;
    END LOOP;
END $$;

-- a metered table (on Citus distributed with the accounts)
SELECT pg_temp.emit(x) FROM unnest(ARRAY[
    'CREATE TABLE ev (account_id bigint NOT NULL, meter text NOT NULL, quantity numeric NOT NULL, ts timestamptz NOT NULL, event_id text, dim text);',
    '\if :citus',
    'SELECT create_distributed_table(''ev'', ''account_id'', colocate_with => ''billing.accounts'') \gset',
    '\endif',
    format('SELECT billing.meter_table(''ev'', ''account_id'', ''meter'', ''quantity'', ''ts'', ''event_id'', ''dim'', keep_rows => %s);',
           CASE WHEN pg_temp.chance(0.5) THEN 'true' ELSE 'false' END)]) x;

-- an audited table (on Citus distributed with the accounts: its changes are
-- audited on the node of each account's chain); TRUNCATE is refused
SELECT pg_temp.emit(x) FROM unnest(ARRAY[
    'CREATE TABLE contracts (account_id bigint NOT NULL, contract_id bigint NOT NULL, plan text NOT NULL, amount numeric NOT NULL, PRIMARY KEY (account_id, contract_id));',
    '\if :citus',
    'SELECT create_distributed_table(''contracts'', ''account_id'', colocate_with => ''billing.accounts'') \gset',
    '\endif',
    'SELECT billing.audit_table(''contracts'', ''account_id'');',
    'DO $$ BEGIN TRUNCATE contracts; EXCEPTION WHEN object_not_in_prerequisite_state THEN RAISE NOTICE ''TRUNCATE of an audited table refused (%)'', SQLSTATE; END $$;']) x;
SELECT pg_temp.contracts(pg_temp.ri(30, 80));

-- 1. usage before the first finalize, through every path, in random order
DO $$
BEGIN
    FOR i IN 1..6 LOOP
        CASE pg_temp.ri(1, 5)
            WHEN 1 THEN PERFORM pg_temp.record_bulk(pg_temp.ri(50, 150), '-5 days', '6 days');
            WHEN 2 THEN PERFORM pg_temp.record_each(pg_temp.ri(2, 5), '-5 days', '6 days');
            WHEN 3 THEN PERFORM pg_temp.metered(pg_temp.ri(50, 200), '-5 days', '6 days', pg_temp.chance(0.5));
            WHEN 4 THEN PERFORM pg_temp.ingest(pg_temp.ri(20, 100), '-5 days', '6 days');
            ELSE PERFORM pg_temp.cumulative(pg_temp.ri(1, 4), '-5 days', '6 days');
        END CASE;
        PERFORM pg_temp.maybe_compact();
    END LOOP;
    -- every path at least once
    PERFORM pg_temp.record_bulk(100, '-5 days', '6 days');
    PERFORM pg_temp.metered(100, '-5 days', '6 days', true, 1);
    PERFORM pg_temp.ingest(50, '-5 days', '6 days');
END $$;
-- bad input changes nothing, not even the offset (errors shown by SQLSTATE:
-- their context differs on Citus)
SELECT pg_temp.emit(x) FROM unnest(ARRAY[
    '\set ON_ERROR_STOP 0',
    '\set VERBOSITY sqlstate',
    format('SELECT * FROM billing.ingest(''kafka'', 0, 1000, ARRAY[%s, 999999]::bigint[], ARRAY[''m1'', ''m1''], ARRAY[1, 1]::numeric[], ARRAY[%s, %s]::timestamptz[]);',
           (SELECT account_id FROM g_accounts ORDER BY random() LIMIT 1),
           pg_temp.lit(pg_temp.t0()), pg_temp.lit(pg_temp.t0())),
    format('SELECT billing.record(%s, ''no_such_meter'', 1, %s);',
           (SELECT account_id FROM g_accounts ORDER BY random() LIMIT 1), pg_temp.lit(pg_temp.t0())),
    format('SELECT billing.record(%s, ''m1'', -1, %s);',
           (SELECT account_id FROM g_accounts ORDER BY random() LIMIT 1), pg_temp.lit(pg_temp.t0())),
    -- a plan whose period is not a whole multiple of a bucket width it
    -- would bill (no period here is a multiple of 7 days): 22023
    'INSERT INTO billing.meters (meter, bucket_width, late_window) VALUES (''m_week'', ''7 days'', ''100 years'');',
    'INSERT INTO billing.charges (plan, meter, price) VALUES (''p1'', ''m_week'', ''unit 1'');',
    '\set VERBOSITY default',
    '\set ON_ERROR_STOP 1']) x;
SELECT pg_temp.emit('SELECT count(*) AS stored_events FROM ev;');
SELECT pg_temp.emit('SELECT source, partition, last_offset FROM billing.ingest_offsets ORDER BY 1, 2;');

-- 2. finalize the periods ended 2 days after t0 (twice: the second finds nothing)
SELECT pg_temp.finalize('2 days');
SELECT pg_temp.finalize('2 days');

-- 3. the past changes
DO $$
DECLARE
    c record;
    s record;
BEGIN
    PERFORM pg_temp.record_bulk(pg_temp.ri(20, 60), '-5 days', '1 day');     -- late usage
    PERFORM pg_temp.record_each(2, '-5 days', '1 day');
    PERFORM pg_temp.metered(pg_temp.ri(20, 60), '-5 days', '1 day', false);
    PERFORM pg_temp.corrections(pg_temp.ri(2, 5));
    PERFORM pg_temp.retro_price('4 days');
    PERFORM pg_temp.retro_price('3 days');
    -- a usage charge for a meter the plan did not charge, for ever (a line
    -- missing on the billed side)
    SELECT p.plan, m.meter INTO c FROM g_plans p, g_meters m
     WHERE NOT EXISTS (SELECT 1 FROM g_charges x WHERE x.plan = p.plan AND x.meter = m.meter)
     ORDER BY random() LIMIT 1;
    IF FOUND THEN
        INSERT INTO g_charges VALUES (c.plan, c.meter, '-infinity', NULL);
        PERFORM pg_temp.emit(format(
            'INSERT INTO billing.charges (plan, meter, price, valid_from) VALUES (%L, %L, %L, %L);',
            c.plan, c.meter, pg_temp.price(), '-infinity'));
    END IF;
    -- a new fixed fee for the past
    PERFORM pg_temp.emit(format(
        'INSERT INTO billing.charges (plan, meter, price, valid_from, description) VALUES (%L, NULL, %L, %L, %L);',
        (SELECT plan FROM g_plans ORDER BY random() LIMIT 1), 'flat ' || pg_temp.rd(20, 2),
        '-infinity', 'setup'));
    -- a subscription cut short after its first period (its later invoices:
    -- lines missing on today's side)
    SELECT x.*, x.starts_at + p.period AS cut INTO s FROM g_subs x JOIN g_plans p ON p.plan = x.plan
     WHERE x.ends_at IS NULL
       AND NOT EXISTS (SELECT 1 FROM g_subs y WHERE y.account_id = x.account_id AND y.starts_at > x.starts_at)
     ORDER BY random() LIMIT 1;
    IF FOUND THEN
        PERFORM pg_temp.emit(format(
            'UPDATE billing.subscriptions SET ends_at = %s WHERE account_id = %s AND starts_at = %s;',
            pg_temp.lit(s.cut), s.account_id, pg_temp.lit(s.starts_at)));
        UPDATE g_subs SET ends_at = 'infinity' WHERE account_id = s.account_id AND starts_at = s.starts_at;
    END IF;
    -- caps changed
    FOR s IN SELECT * FROM g_subs ORDER BY random() LIMIT 2 LOOP
        PERFORM pg_temp.emit(format(
            'UPDATE billing.subscriptions SET spend_cap = %s WHERE account_id = %s AND starts_at = %s;',
            CASE WHEN pg_temp.chance(0.3) THEN 'NULL' ELSE pg_temp.rd(20, 2)::text END,
            s.account_id, pg_temp.lit(s.starts_at)));
    END LOOP;
    PERFORM pg_temp.maybe_compact();
END $$;

-- 4. rerate: a dry run, the real one, again (nothing); the next finalize carries it
SELECT pg_temp.rerate('-6 days', '2 days', true);
SELECT pg_temp.rerate('-6 days', '2 days', false);
SELECT pg_temp.rerate('-6 days', '2 days', false);
SELECT pg_temp.finalize('4 days');

-- 5. more late usage, a correction, a price for the past; rerate twice
DO $$
BEGIN
    PERFORM pg_temp.ingest(pg_temp.ri(20, 60), '-5 days', '3 days');
    PERFORM pg_temp.record_bulk(pg_temp.ri(10, 40), '-5 days', '3 days');
    PERFORM pg_temp.corrections(2);
    PERFORM pg_temp.retro_price('2 days');
    PERFORM pg_temp.contracts(pg_temp.ri(10, 40));
    PERFORM pg_temp.maybe_compact();
END $$;
SELECT pg_temp.rerate('-6 days', '4 days', false);
SELECT pg_temp.rerate('-6 days', '4 days', false);
SELECT pg_temp.finalize('6 days');

-- what a user reads: previews, remaining, usage rolled up
SELECT pg_temp.emit(format(
    'SELECT line_no, kind, meter, dimension, regexp_replace(description, ''invoice [0-9]+'', ''invoice #'') AS description, period_start, period_end, quantity, amount FROM billing.invoice_preview(%s, %s);',
    account_id, pg_temp.lit(pg_temp.t0() + interval '5 days')))
  FROM (SELECT account_id FROM g_subs ORDER BY random() LIMIT 2) x;
SELECT pg_temp.emit(format('SELECT billing.remaining(%s, %L, %s) AS remaining;', s.account_id, m.meter,
                           pg_temp.lit(pg_temp.t0() + interval '5 days')))
  FROM (SELECT account_id FROM g_subs ORDER BY random() LIMIT 2) s,
       (SELECT meter FROM g_meters ORDER BY random() LIMIT 1) m;
SELECT pg_temp.emit(format(
    'SELECT meter, dimension, bucket_start, quantity, events FROM billing.usage(%s, %s, %s, ''1 day'') ORDER BY 1, 2, 3;',
    account_id, pg_temp.lit(pg_temp.t0() - interval '6 days'), pg_temp.lit(pg_temp.t0() + interval '7 days')))
  FROM (SELECT account_id FROM g_accounts ORDER BY random() LIMIT 2) x;
SELECT pg_temp.emit('SELECT count(*) AS contracts, sum(amount) AS amount FROM contracts;');
SELECT pg_temp.emit('SELECT count(*) AS invoice_problems FROM billing.verify_invoices();');
SELECT pg_temp.emit('SELECT count(*) AS audit_problems FROM billing.verify_audit_log();');

\o
\pset tuples_only on
\pset format unaligned
SELECT line FROM out ORDER BY n;
