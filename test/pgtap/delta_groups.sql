-- delta_groups: group rows of billing.usage_deltas (src/cells.h).  On one
-- node a flush writes the cells of the accounts of one block of 64 ids
-- into one row under the block's key; an account alone in its row keeps
-- a row of its own.  Every reader (usage, the usage_cells view, the C
-- totals of previews and invoices, unique counts, the last rule,
-- compaction) reads an account's cells and only its cells, compared here
-- with the events sent, before compaction, after it, and mixed.  The
-- byte format of a group row is pinned; corrupt ones raise XX001.
BEGIN;
SELECT plan(34);
\ir ../helpers.sql
SET LOCAL timezone = 'UTC';

INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('dg_sum', 'sum', '100 years'), ('dg_last', 'last', '100 years'),
    ('dg_max', 'max', '100 years'), ('dg_cnt', 'count', '100 years'),
    ('dg_uq', 'unique', '100 years');
-- accounts on both sides of block edges (64 ids a block): 7680 = 120 * 64
INSERT INTO billing.accounts (account_id) SELECT 7600 + a FROM generate_series(0, 250) a;

-- the events: seeded, every account, the boundary accounts most
SELECT setseed(0.42);
CREATE TEMP TABLE ev AS
SELECT n, acct AS account_id,
       (ARRAY['dg_sum', 'dg_last', 'dg_max', 'dg_cnt', 'dg_uq'])[1 + n % 5] AS meter,
       round((random() * 100)::numeric, 2) AS q,
       timestamptz '2025-03-12 08:00+00' + (random() * 180)::int * interval '1 minute' AS ts,
       'd' || (random() * 6)::int AS dim,
       (n / 2000) + 1 AS batch
  FROM generate_series(0, 5999) n,
       LATERAL (SELECT CASE WHEN n % 3 = 0
                            THEN (ARRAY[7600, 7615, 7616, 7663, 7679, 7680, 7681, 7743, 7744, 7850])[1 + n % 10]
                            ELSE 7600 + (n * 7919) % 251 END AS acct) a;
-- last meters: ties of timestamps go to the later arrival, across batches
UPDATE ev SET ts = timestamptz '2025-03-12 09:00+00' WHERE meter = 'dg_last' AND n % 4 = 0;

CREATE FUNCTION pg_temp.send(b int) RETURNS bigint LANGUAGE sql AS $$
    SELECT accepted::bigint FROM billing.ingest('dg', 1, b,
        (SELECT array_agg(account_id ORDER BY n) FROM ev WHERE batch = b),
        (SELECT array_agg(meter ORDER BY n) FROM ev WHERE batch = b),
        (SELECT array_agg(q ORDER BY n) FROM ev WHERE batch = b),
        (SELECT array_agg(ts ORDER BY n) FROM ev WHERE batch = b),
        NULL,
        (SELECT array_agg(CASE WHEN meter = 'dg_uq' THEN dim ELSE '' END ORDER BY n) FROM ev WHERE batch = b))
$$;

-- what the events sent add up to, per account and meter, over all time and
-- per hour (the last rule: the greatest ts, then the latest arrival)
CREATE FUNCTION pg_temp.expected(upto int) RETURNS TABLE (account_id bigint, meter text, hour timestamptz, q numeric)
    LANGUAGE sql AS $$
    SELECT account_id, meter, date_trunc('hour', ts),
           CASE meter WHEN 'dg_sum' THEN sum(q) WHEN 'dg_max' THEN max(q)
                      WHEN 'dg_cnt' THEN count(*) WHEN 'dg_uq' THEN count(DISTINCT dim)
                      ELSE (array_agg(q ORDER BY ts DESC, n DESC))[1] END
      FROM ev WHERE batch <= upto
     GROUP BY 1, 2, 3
$$;
-- what the readers say: usage() per hour (through _cells_in)
CREATE FUNCTION pg_temp.by_usage() RETURNS TABLE (account_id bigint, meter text, hour timestamptz, q numeric)
    LANGUAGE sql AS $$
    SELECT a.account_id, u.meter, u.bucket_start, u.quantity
      FROM billing.accounts a,
           billing.usage(a.account_id, '2025-03-12 07:00+00', '2025-03-12 12:00+00', '1 hour') u
     WHERE a.account_id BETWEEN 7600 AND 7850
$$;
-- the view, combined by each meter's rule
CREATE FUNCTION pg_temp.by_view() RETURNS TABLE (account_id bigint, meter text, hour timestamptz, q numeric)
    LANGUAGE sql AS $$
    SELECT c.account_id, c.meter, date_trunc('hour', c.bucket_start),
           billing._cell_agg(m.aggregation, c.quantity, c.last_ts, c.last_seq)
      FROM billing.usage_cells c JOIN billing.meters m USING (meter)
     WHERE c.account_id BETWEEN 7600 AND 7850 AND m.aggregation <> 'unique'
     GROUP BY 1, 2, 3, m.aggregation
$$;
-- the C totals of previews and invoices, for every account's hours
CREATE FUNCTION pg_temp.by_totals() RETURNS TABLE (account_id bigint, meter text, hour timestamptz, q numeric)
    LANGUAGE sql AS $$
    WITH p AS (
        SELECT row_number() OVER (ORDER BY a, h) AS i, a, h
          FROM generate_series(7600, 7850) a,
               generate_series(timestamptz '2025-03-12 07:00+00', '2025-03-12 11:00+00', '1 hour') h
    )
    SELECT p.a::bigint, t.meter, p.h, t.quantity
      FROM billing._rollup_totals(
               (SELECT array_agg(a::bigint ORDER BY i) FROM p),
               (SELECT array_agg(h ORDER BY i) FROM p),
               (SELECT array_agg(h + interval '1 hour' ORDER BY i) FROM p),
               ARRAY['dg_sum', 'dg_last', 'dg_max', 'dg_cnt'],
               ARRAY['sum', 'last', 'max', 'count']) t
      JOIN p ON p.i = t.idx
$$;
-- unique counts per hour (deltas and compacted values)
CREATE FUNCTION pg_temp.by_unique() RETURNS TABLE (account_id bigint, meter text, hour timestamptz, q numeric)
    LANGUAGE sql AS $$
    SELECT a::bigint, 'dg_uq', h, sum(c.quantity)
      FROM generate_series(7600, 7850) a,
           generate_series(timestamptz '2025-03-12 07:00+00', '2025-03-12 11:00+00', '1 hour') h,
           billing._unique_counts(a, h, h + interval '1 hour', ARRAY['dg_uq']) c
     GROUP BY 1, 2, 3 HAVING sum(c.quantity) > 0
$$;
-- rows in one set and not the other, both ways
CREATE FUNCTION pg_temp.diff(reader text, upto int) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE n bigint;
BEGIN
    EXECUTE format($q$
        WITH e AS (SELECT * FROM pg_temp.expected(%s) WHERE %s),
             r AS (SELECT * FROM pg_temp.%s())
        SELECT count(*) FROM ((TABLE e EXCEPT ALL TABLE r) UNION ALL (TABLE r EXCEPT ALL TABLE e)) x$q$,
        upto, CASE WHEN reader = 'by_unique' THEN 'meter = ''dg_uq'''
                   WHEN reader = 'by_usage' THEN 'true'
                   ELSE 'meter <> ''dg_uq''' END, reader) INTO n;
    RETURN n;
END
$$;

-- batch 1: one call over 251 accounts
SELECT is(pg_temp.send(1), 2000::bigint, 'batch 1 accepted');
SELECT cmp_ok((SELECT count(*) FROM billing.usage_deltas), '<', 100::bigint,
              'a call over 251 accounts writes far fewer rows than accounts');
SELECT ok((SELECT count(*) FROM billing.usage_deltas WHERE get_byte(cells, 0) = 3) > 0
          AND (SELECT bool_and(account_id % 64 = 0) FROM billing.usage_deltas WHERE get_byte(cells, 0) = 3),
          'group rows are keyed by their block''s first id');
SELECT is((SELECT count(DISTINCT c.account_id) FROM billing.usage_deltas d,
                  billing._delta_rows(d.account_id, d.seq, d.cells, NULL) c), 251::bigint,
          'every account is in the rows');
SELECT is(pg_temp.diff('by_usage', 1), 0::bigint, 'uncompacted: usage() of every account and hour is what was sent');
SELECT is(pg_temp.diff('by_view', 1), 0::bigint, 'uncompacted: usage_cells combined is what was sent');
SELECT is(pg_temp.diff('by_totals', 1), 0::bigint, 'uncompacted: the C totals are what was sent');
SELECT is(pg_temp.diff('by_unique', 1), 0::bigint, 'uncompacted: unique counts are what was sent');

-- batch 2 on top, then compaction of both
SELECT is(pg_temp.send(2), 2000::bigint, 'batch 2 accepted');
SELECT is(pg_temp.diff('by_totals', 2), 0::bigint, 'two batches uncompacted: the C totals (last rule across calls)');
-- the index keeps each row's account range (_delta_first, _delta_last):
-- the C totals of an account take from the index only the rows under its
-- keys whose range holds it, not every group row of its block
CREATE TEMP TABLE range_rows AS
SELECT count(*) FILTER (WHERE billing._delta_first(d.account_id, d.cells) <= a
                          AND billing._delta_last(d.account_id, d.cells) >= a) AS in_range,
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM billing._delta_rows(d.account_id, d.seq, d.cells, a))) AS holding,
       count(*) AS under_keys
  FROM generate_series(7600::bigint, 7850) a
       JOIN billing.usage_deltas d ON d.account_id IN (a, a & ~63::bigint);
CREATE TEMP TABLE idx_before AS
SELECT pg_stat_get_xact_tuples_returned('billing.usage_deltas_account'::regclass) AS n;
SELECT count(*) FROM billing._rollup_totals(
    ARRAY(SELECT generate_series(7600::bigint, 7850)),
    array_fill('2025-03-12 00:00+00'::timestamptz, ARRAY[251]),
    array_fill('2025-03-13 00:00+00'::timestamptz, ARRAY[251]),
    ARRAY['dg_sum'], ARRAY['sum']);
SELECT is(pg_stat_get_xact_tuples_returned('billing.usage_deltas_account'::regclass) - (SELECT n FROM idx_before),
          (SELECT in_range FROM range_rows),
          'the C totals take from the index only the rows whose account range holds the account');
SELECT ok((SELECT holding <= in_range AND in_range < under_keys FROM range_rows),
          'which are every row holding it, and fewer than all the rows under its keys');
SELECT ok(billing.compact_usage() > 0, 'compaction folds the group rows');
SELECT is((SELECT count(*) FROM billing.usage_deltas), 0::bigint, 'and leaves no deltas');
SELECT is(pg_temp.diff('by_usage', 2), 0::bigint, 'compacted: usage()');
SELECT is(pg_temp.diff('by_totals', 2), 0::bigint, 'compacted: the C totals');
SELECT is(pg_temp.diff('by_unique', 2), 0::bigint, 'compacted: unique counts');

-- batch 3 on top of the compacted two: mixed
SELECT is(pg_temp.send(3), 2000::bigint, 'batch 3 accepted');
SELECT is(pg_temp.diff('by_usage', 3), 0::bigint, 'mixed: usage()');
SELECT is(pg_temp.diff('by_view', 3), 0::bigint, 'mixed: usage_cells');
SELECT is(pg_temp.diff('by_totals', 3), 0::bigint, 'mixed: the C totals');
SELECT is(pg_temp.diff('by_unique', 3), 0::bigint, 'mixed: unique counts');

-- one account in a flush: a row of its own, under its own id
SELECT billing.record(7690, 'dg_sum', 5, '2025-03-12 09:30+00');
SELECT is((SELECT count(*) FROM billing.usage_deltas WHERE account_id = 7690 AND get_byte(cells, 0) = 2),
          1::bigint, 'record() of one account writes a row of its own');

-- the byte format of a group row: version 3, then per account its id, a
-- flags byte (1: a seq follows), the length of its series (integers
-- little-endian), then the series; what ingest writes for two accounts of
-- a block with one cell each
CREATE FUNCTION pg_temp.le(v bigint, n int) RETURNS bytea LANGUAGE sql AS
$$SELECT decode(string_agg(lpad(to_hex((v >> (8 * i)) & 255), 2, '0'), '' ORDER BY i), 'hex')
    FROM generate_series(0, n - 1) i$$;
CREATE TEMP TABLE one AS
SELECT billing._delta_pack(ARRAY['dg_sum'], ARRAY[''], ARRAY['2025-03-12 09:00+00'::timestamptz],
                           ARRAY[2.5], ARRAY[1::bigint], NULL) AS v;
CREATE TEMP TABLE grp AS
SELECT '\x03'::bytea || pg_temp.le(7681, 8) || '\x00'::bytea || pg_temp.le(length(v) - 1, 4) || substr(v, 2)
       || pg_temp.le(7682, 8) || '\x00'::bytea || pg_temp.le(length(v) - 1, 4) || substr(v, 2) AS g,
       13 + length(v) AS first_end
  FROM one;
SAVEPOINT fmt;
DELETE FROM billing.usage_deltas;
SELECT is((SELECT accepted FROM billing.ingest('dg', 2, 1, ARRAY[7681, 7682]::bigint[], ARRAY['dg_sum', 'dg_sum'],
                                               ARRAY[2.5, 2.5], ARRAY['2025-03-12 09:00+00', '2025-03-12 09:00+00']::timestamptz[])),
          2, 'two accounts of a block, one cell each');
SELECT is((SELECT array_agg(account_id::text || ':' || encode(cells, 'hex')) FROM billing.usage_deltas),
          (SELECT ARRAY['7680:' || encode(g, 'hex')] FROM grp),
          'the group row is pinned: one row under the block''s key, each account''s id, length and series');
ROLLBACK TO SAVEPOINT fmt;
SELECT results_eq(
    $$SELECT account_id, meter COLLATE "default", quantity, events
        FROM grp, billing._delta_rows(7680, NULL, g, NULL)$$,
    $$VALUES (7681::bigint, 'dg_sum'::text, 2.5::numeric, 1::bigint), (7682, 'dg_sum', 2.5, 1)$$,
    'a group row reads back with its accounts');
SELECT is((SELECT array_agg(account_id) FROM grp, billing._delta_rows(7680, NULL, g, 7682)), ARRAY[7682::bigint],
          'only the account asked for');
SELECT is((SELECT count(*) FROM grp, billing._delta_cells(g))::int, 2, '_delta_cells reads every account''s cells');
SELECT is((SELECT ARRAY[billing._delta_first(7680, g), billing._delta_last(7680, g)] FROM grp),
          ARRAY[7681, 7682]::bigint[], 'the account range of a group row: its least and greatest account');
SELECT is((SELECT ARRAY[billing._delta_first(7681, v), billing._delta_last(7681, v)] FROM one),
          ARRAY[7681, 7681]::bigint[], 'of a row of one account: its account');
-- a group row cut anywhere but at an account's end spans every account, so
-- that every reader of its key reads it and raises XX001
SELECT is((SELECT string_agg(n::text, ',')
             FROM grp, generate_series(1, length(g) - 1) n
            WHERE ARRAY[billing._delta_first(7680, substr(g, 1, n)), billing._delta_last(7680, substr(g, 1, n))]
                  <> ARRAY[-9223372036854775808, 9223372036854775807]::bigint[]),
          (SELECT first_end::text FROM grp), 'a truncated group row spans every account');
SELECT is((SELECT array_agg(billing._delta_first(7680, x) || ':' || billing._delta_last(7680, x) ORDER BY x)
             FROM grp, unnest(ARRAY[set_byte(g, 0, 4), set_byte(g, 0, 255), ''::bytea]) x),
          ARRAY['-9223372036854775808:9223372036854775807', '-9223372036854775808:9223372036854775807',
                '-9223372036854775808:9223372036854775807'],
          'so does a value whose version no reader knows, and an empty one');
-- and the C totals of an account of the block other than its first raise
-- XX001 on it, as the SQL readers do, instead of skipping it
SAVEPOINT damaged;
DELETE FROM billing.usage_deltas;
INSERT INTO billing.usage_deltas (account_id, seq, cells) SELECT 7680, NULL, set_byte(g, 0, 4) FROM grp;
SELECT is(test.sqlstate_of($$SELECT count(*) FROM billing._rollup_totals(ARRAY[7682::bigint],
              ARRAY['2025-03-12 00:00+00'::timestamptz], ARRAY['2025-03-13 00:00+00'::timestamptz],
              ARRAY['dg_sum'], ARRAY['sum'])$$),
          'XX001', 'a group row with a damaged version byte: the C totals of 7682 raise XX001');
ROLLBACK TO SAVEPOINT damaged;
-- corrupt: cut anywhere but at an account's end (the version alone too)
SELECT is((SELECT string_agg(n::text, ',')
             FROM grp, generate_series(1, length(g) - 1) n
            WHERE test.sqlstate_of(format('SELECT count(*) FROM billing._delta_rows(7680, NULL, %L::bytea, NULL)',
                                          substr(g, 1, n))) <> 'XX001'),
          (SELECT first_end::text FROM grp), 'every truncated group row raises XX001 but the one ending after the first account');

ROLLBACK;
