-- deltas: the packed cells of billing.usage_deltas (src/cells.c).  What
-- billing._delta_pack packs, billing._delta_cells reads back exactly; the
-- byte format is pinned, and version 1 and the earlier form of version 2
-- (a u32 cell count, seconds, fixed-point quantities) still read (dumps
-- and existing deltas must keep reading); whole quantities and bucket
-- starts in whole hours, minutes or seconds take their short forms;
-- corrupt values raise XX001 and never crash; an account with many cells
-- in one flush is split into rows that stay out of TOAST, and its usage
-- reads back as sent.
BEGIN;
SELECT plan(35);
\ir ../helpers.sql
SET LOCAL timezone = 'UTC';

CREATE TEMP TABLE packed AS
SELECT billing._delta_pack(
           ARRAY['m1', 'm1', 'm2'], ARRAY['', '', 'eu'],
           ARRAY['2026-01-01 00:00+00', '2026-01-01 00:01+00', '2026-01-01 00:00+00']::timestamptz[],
           ARRAY[1.5, 1e-25, -3]::numeric[], ARRAY[2, 1, 1]::bigint[],
           ARRAY[NULL, NULL, '2026-01-01 00:00:30+00']::timestamptz[]) AS v;

SELECT results_eq(
    $$SELECT meter COLLATE "default", dimension COLLATE "default", bucket_start, quantity, events, last_ts
        FROM packed, billing._delta_cells(v)$$,
    $$VALUES ('m1'::text, ''::text, '2026-01-01 00:00+00'::timestamptz, 1.5::numeric, 2::bigint, NULL::timestamptz),
             ('m1', '', '2026-01-01 00:01+00', 1e-25, 1, NULL),
             ('m2', 'eu', '2026-01-01 00:00+00', -3, 1, '2026-01-01 00:00:30+00')$$,
    'cells read back as packed: series, a quantity past fixed point, a negative one, a last meter');

SELECT is((SELECT v FROM packed),
          '\x02026d3100000202a9b0e91b0400009814440dab210880c2b2850d021b00302e30303030303030303030303030303030303030303030303031026d32020065750301e1b0e91b02fd808e91cbe191f502'::bytea,
          'the byte format is pinned (version 2: varints, a varint cell count, bucket starts in hours or minutes, quantities in as few bytes as they need, -3 as the integer)');
SELECT results_eq(
    $$SELECT meter COLLATE "default", dimension COLLATE "default", bucket_start, quantity, events, last_ts
        FROM billing._delta_cells('\x02026d31000000020000002980d6c38e060400009814440dab210820f8d6c38e06021b00302e30303030303030303030303030303030303030303030303031026d320200657501010000002980d6c38e06020000d0d677e5a9bcef808e91cbe191f502'::bytea)$$,
    $$SELECT meter COLLATE "default", dimension COLLATE "default", bucket_start, quantity, events, last_ts
        FROM packed, billing._delta_cells(v)$$,
    'the earlier form of version 2 (a u32 cell count, seconds, fixed point only) still reads, the same cells');
SELECT is(length(billing._delta_pack(ARRAY['m'], ARRAY[''], ARRAY['2026-01-01 00:00+00']::timestamptz[],
                                     ARRAY[1]::numeric[], ARRAY[1]::bigint[], NULL)), 13,
          'one cell of quantity 1 in an hour bucket: 13 bytes (version, 6 of series header, 6 of cell)');
SELECT results_eq(
    $$SELECT meter COLLATE "default", dimension COLLATE "default", bucket_start, quantity, events, last_ts
        FROM billing._delta_cells('\x01026d31000000020000000060e80a47ea020002000000000000000000009814440dab21080000000000000000e77b0e47ea02000100000000000000011b00302e30303030303030303030303030303030303030303030303031026d320200657501010000000060e80a47ea02000100000000000000000000d0d677e5a9bcefffffffffffffff8023b20c47ea0200'::bytea)$$,
    $$SELECT meter COLLATE "default", dimension COLLATE "default", bucket_start, quantity, events, last_ts
        FROM packed, billing._delta_cells(v)$$,
    'a value of version 1 (fixed-size cells) still reads, the same cells');

-- whole quantities: their integer while fixed point holds them (below
-- 10^18, 38 digits with the 20 fraction digits); beyond, the text
SELECT results_eq(
    $$SELECT quantity FROM billing._delta_cells(billing._delta_pack(
          ARRAY['m', 'm', 'm', 'm', 'm', 'm', 'm', 'm'], ARRAY['', '', '', '', '', '', '', ''],
          ARRAY[now(), now(), now(), now(), now(), now(), now(), now()],
          ARRAY[1, -1, 255, 1e17, 999999999999999999, -999999999999999999,
                1000000000000000000, 1701411834604692318]::numeric[],
          ARRAY[1, 1, 1, 1, 1, 1, 1, 1]::bigint[], NULL))$$,
    $$VALUES (1::numeric), (-1), (255), (1e17), (999999999999999999), (-999999999999999999),
             (1000000000000000000), (1701411834604692318)$$,
    'whole quantities read back exactly, up to the edge of fixed point and past it');
SELECT is(length(billing._delta_pack(ARRAY['m'], ARRAY[''], ARRAY['2026-01-01 00:00+00']::timestamptz[],
                                     ARRAY[999999999999999999]::numeric[], ARRAY[1]::bigint[], NULL)), 20,
          'the largest whole quantity fixed point holds takes 8 bytes');
-- bucket starts in each unit, before and after 2000
SELECT results_eq(
    $$SELECT bucket_start FROM billing._delta_cells(billing._delta_pack(
          ARRAY['m', 'm', 'm', 'm', 'm', 'm', 'm', 'm'], ARRAY['', '', '', '', '', '', '', ''],
          ARRAY['1999-12-31 23:00+00', '1999-12-31 23:59+00', '1999-12-31 23:59:59+00',
                '1999-12-31 23:59:59.5+00', '2000-01-01 00:00+00', '2026-12-07 16:00+00',
                '2026-12-07 16:01+00', '2026-12-07 16:01:01+00']::timestamptz[],
          ARRAY[1, 1, 1, 1, 1, 1, 1, 1]::numeric[], ARRAY[1, 1, 1, 1, 1, 1, 1, 1]::bigint[], NULL))$$,
    $$VALUES ('1999-12-31 23:00+00'::timestamptz), ('1999-12-31 23:59+00'), ('1999-12-31 23:59:59+00'),
             ('1999-12-31 23:59:59.5+00'), ('2000-01-01 00:00+00'), ('2026-12-07 16:00+00'),
             ('2026-12-07 16:01+00'), ('2026-12-07 16:01:01+00')$$,
    'bucket starts in hours, minutes, seconds and microseconds, before and after 2000, read back exactly');

-- quantities at the edges of the fixed-point range keep every digit
SELECT results_eq(
    $$SELECT quantity FROM billing._delta_cells(billing._delta_pack(
          ARRAY['m', 'm', 'm', 'm'], ARRAY['', '', '', ''],
          ARRAY[now(), now(), now(), now()], ARRAY[0, 123456789012345678.12345678901234567890,
                                                   1e40, -0.00000000000000000001]::numeric[],
          ARRAY[0, 0, 0, 0]::bigint[], NULL))$$,
    $$VALUES (0::numeric), (123456789012345678.12345678901234567890), (1e40), (-0.00000000000000000001)$$,
    'zero, 38 digits, 1e40 and the smallest fixed-point step read back exactly');

-- timestamps before 2000, off whole seconds, and the extremes of events
SELECT results_eq(
    $$SELECT bucket_start, events, last_ts FROM billing._delta_cells(billing._delta_pack(
          ARRAY['m', 'm', 'm', 'm'], ARRAY['', '', '', ''],
          ARRAY['1999-12-31 23:59:59.999999+00', '2026-01-01 00:00:00.5+00', '1970-01-01 00:00+00',
                '2262-01-01 00:00+00']::timestamptz[],
          ARRAY[1, 2, 3, 4]::numeric[], ARRAY[0, 9223372036854775807, -5, 1]::bigint[],
          ARRAY['1999-12-31 23:59:59.999999+00', '2026-01-01 00:00:00.5+00', '1970-01-01 00:00:00.000001+00',
                '2262-01-01 00:00+00']::timestamptz[]))$$,
    $$VALUES ('1999-12-31 23:59:59.999999+00'::timestamptz, 0::bigint, '1999-12-31 23:59:59.999999+00'::timestamptz),
             ('2026-01-01 00:00:00.5+00', 9223372036854775807, '2026-01-01 00:00:00.5+00'),
             ('1970-01-01 00:00+00', -5, '1970-01-01 00:00:00.000001+00'),
             ('2262-01-01 00:00+00', 1, '2262-01-01 00:00+00')$$,
    'timestamps before 2000 and off whole seconds, and events at the extremes, read back exactly');

SELECT is((SELECT count(*) FROM billing._delta_cells(billing._delta_pack(
              '{}'::text[], '{}', '{}', '{}', '{}', NULL)))::int, 0, 'no cells: no rows');

-- bad input to the packer
SELECT throws_ok($$SELECT billing._delta_pack(ARRAY['m'], ARRAY['', ''], ARRAY[now()], ARRAY[1], ARRAY[1::bigint], NULL)$$,
                 '2202E', NULL, 'arrays of different lengths');
SELECT throws_ok($$SELECT billing._delta_pack(ARRAY['m'], ARRAY[NULL::text], ARRAY[now()], ARRAY[1], ARRAY[1::bigint], NULL)$$,
                 '22004', NULL, 'a NULL element');
SELECT throws_ok($$SELECT billing._delta_pack(ARRAY['m'], ARRAY[''], ARRAY[now()], ARRAY['NaN'::numeric], ARRAY[1::bigint], NULL)$$,
                 '22023', NULL, 'a NaN quantity');

-- corrupt values: every prefix of a valid value but the whole and the
-- version alone, a wrong version, a wrong kind byte
SELECT is((SELECT string_agg(n::text, ',')
             FROM packed, generate_series(2, length(v) - 1) n
            WHERE test.sqlstate_of(format('SELECT count(*) FROM billing._delta_cells(%L::bytea)',
                                          substr(v, 1, n))) <> 'XX001'),
          '57', 'every truncated value raises XX001 but the one ending after the first series');
SELECT throws_ok($$SELECT * FROM billing._delta_cells('\x04'::bytea)$$, 'XX001', NULL, 'an unknown version');
SELECT throws_ok($$SELECT * FROM billing._delta_cells(set_byte((SELECT v FROM packed), 8, 17))$$,
                 'XX001', NULL, 'a quantity of 17 bytes in a cell''s head byte');
SELECT throws_ok($$SELECT * FROM billing._delta_cells(set_byte((SELECT v FROM packed), 8, x'49'::int))$$,
                 'XX001', NULL, 'a whole quantity of 9 bytes');
SELECT throws_ok($$SELECT * FROM billing._delta_cells('\x02016d0000020140000000'::bytea)$$,
                 'XX001', NULL, 'a whole quantity of no bytes');
SELECT throws_ok($$SELECT * FROM billing._delta_cells('\x02016d00000201480000ffffffffffffff7f'::bytea)$$,
                 'XX001', NULL, 'a whole quantity whose fixed point does not fit');
SELECT throws_ok($$SELECT * FROM billing._delta_cells(set_byte((SELECT v FROM packed), 6, 6))$$,
                 'XX001', NULL, 'an unknown flag in a series header');
-- a bucket start or last_ts past the timestamp range is corrupt, whatever
-- reads it (not an error only when the timestamp is printed)
SELECT throws_ok($$SELECT count(*) FROM billing._delta_cells('\x02016d00000201e1ffffffff070201'::bytea)$$,
                 'XX001', NULL, 'a bucket start of 2^31 hours before 2000');
SELECT throws_ok($$SELECT count(*) FROM billing._delta_cells('\x02016d0000000100000001ffffffffffffffff7f0200'::bytea)$$,
                 'XX001', NULL, 'a bucket start past the timestamp range (the earlier form, microseconds)');
SELECT throws_ok($$SELECT count(*) FROM billing._delta_cells('\x02016d0000030101000201fcffffffffffffffff01'::bytea)$$,
                 'XX001', NULL, 'a last_ts past the timestamp range');
SELECT results_eq(
    $$SELECT bucket_start, last_ts FROM billing._delta_cells(billing._delta_pack(
          ARRAY['m', 'm'], ARRAY['', ''], ARRAY['-infinity', '294276-12-31 23:00+00']::timestamptz[],
          ARRAY[1, 1]::numeric[], ARRAY[1, 1]::bigint[], ARRAY['infinity', '4713-11-24 00:00+00 BC']::timestamptz[]))$$,
    $$VALUES ('-infinity'::timestamptz, 'infinity'::timestamptz),
             ('294276-12-31 23:00+00', '4713-11-24 00:00+00 BC')$$,
    'infinite timestamps and the ends of the range read back');
SELECT throws_ok($$SELECT * FROM billing._delta_cells(''::bytea)$$, 'XX001', NULL, 'an empty value');
-- a quantity kept as text ('0.000...1') with a letter in its digits, or
-- starting with one (NaN would parse): corrupt, not a numeric input error
SELECT throws_ok($$SELECT * FROM billing._delta_cells((SELECT set_byte(v, position('\x302e'::bytea IN v) + 1, 120) FROM packed))$$,
                 'XX001', NULL, 'a text quantity with a letter in its digits');
SELECT throws_ok($$SELECT * FROM billing._delta_cells((SELECT set_byte(v, position('\x302e'::bytea IN v) - 1, 78) FROM packed))$$,
                 'XX001', NULL, 'a text quantity starting with a letter');

-- one account sending many cells in one statement: several delta rows,
-- each small enough to stay in the heap page
-- (fixed times: the meters accept reports 100 years late)
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('dl_sum', 'sum', '100 years'), ('dl_last', 'last', '100 years');
INSERT INTO billing.accounts (account_id) VALUES (7401);
CREATE TEMP TABLE sent AS
SELECT CASE WHEN n % 2 = 0 THEN 'dl_sum' ELSE 'dl_last' END AS meter,
       timestamptz '2025-03-12 09:00+00' - n * interval '1 minute' AS ts,
       (n % 97)::numeric / 8 AS q
  FROM generate_series(1, 3000) n;
SELECT count(billing.record(7401, meter, q, ts)) FROM sent;
CREATE TABLE dl_rows (account_id bigint, meter text, qty numeric, ts timestamptz);
SELECT billing.meter_table('dl_rows', 'account_id', 'meter', 'qty', 'ts', keep_rows => false);
CREATE TEMP TABLE before AS SELECT count(*) AS n FROM billing.usage_deltas WHERE account_id = 7401;
INSERT INTO dl_rows SELECT 7401, meter, q, ts FROM sent;
SELECT ok((SELECT count(*) FROM billing.usage_deltas WHERE account_id = 7401) - (SELECT n FROM before) > 20,
          'the statement of 3000 cells wrote its account as several rows');
SELECT ok((SELECT max(pg_column_size(cells)) FROM billing.usage_deltas WHERE account_id = 7401) < 2032,
          'no row reaches the TOAST threshold');
SELECT bag_eq(
    $$SELECT meter COLLATE "default", bucket_start, quantity, events FROM billing.usage_cells WHERE account_id = 7401$$,
    $$SELECT meter, ts, q, 1::bigint FROM sent UNION ALL SELECT meter, ts, q, 1::bigint FROM sent$$,
    'every cell reads back as sent');

-- a statement that flushes many times keeps its rows on tape and merges
-- them at its end: few rows per account, the same usage; a last meter's
-- rows keep their own arrival order, so of values sent at one timestamp
-- the one sent last wins
INSERT INTO billing.accounts (account_id) SELECT generate_series(7402, 7451);
CREATE TABLE dl_many (account_id bigint, meter text, qty numeric, ts timestamptz);
SELECT billing.meter_table('dl_many', 'account_id', 'meter', 'qty', 'ts', keep_rows => false);
CREATE TEMP TABLE many AS
SELECT n, 7402 + n % 50 AS account_id, CASE WHEN n % 3 = 0 THEN 'dl_last' ELSE 'dl_sum' END AS meter,
       CASE WHEN n % 3 = 0 THEN 100000 - n ELSE n END::numeric AS qty,  -- last: falling
       CASE WHEN n % 3 = 0 THEN timestamptz '2025-03-12 08:00+00'
            ELSE timestamptz '2025-03-12 09:00+00' - (n % 3000) * interval '1 minute' END AS ts
  FROM generate_series(1, 12000) n;
SET LOCAL work_mem = '64kB';
INSERT INTO dl_many SELECT account_id, meter, qty, ts FROM many ORDER BY n;
RESET work_mem;
SELECT ok((SELECT count(*) FROM (
               SELECT d.ctid, c.account_id, c.seq
                 FROM billing.usage_deltas d, billing._delta_rows(d.account_id, d.seq, d.cells, NULL) c
                WHERE c.account_id BETWEEN 7402 AND 7451
                GROUP BY 1, 2, 3 HAVING bool_and(c.meter <> 'dl_last')) p)
          < 4 * 50, 'the sum cells of 50 accounts over many flushes: under 4 rows (or parts of group rows) per account');
SELECT bag_eq(
    $$SELECT account_id, bucket_start, sum(quantity) AS q, sum(events)::bigint AS n
        FROM billing.usage_cells WHERE account_id BETWEEN 7402 AND 7451 AND meter = 'dl_sum'
       GROUP BY 1, 2$$,
    $$SELECT account_id, ts, sum(qty) AS q, count(*) AS n FROM many WHERE meter = 'dl_sum' GROUP BY 1, 2$$,
    'the sum meter reads back as sent');
SELECT is((SELECT count(DISTINCT c.seq) FROM billing.usage_deltas d,
                   billing._delta_rows(d.account_id, d.seq, d.cells, 7402) c
             WHERE c.meter = 'dl_last') > 1,
          true, 'the last meter was flushed several times, each part of a row with its own seq');
SELECT bag_eq(
    $$SELECT a::bigint, u.quantity
        FROM generate_series(7402, 7451) a,
             billing.usage(a, '2025-03-11 09:00+00', '2025-03-12 09:00+00', NULL, 'dl_last') u$$,
    $$SELECT DISTINCT ON (account_id) account_id::bigint, qty FROM many WHERE meter = 'dl_last'
       ORDER BY account_id, n DESC$$,
    'of values sent at one timestamp, the last sent wins');

SELECT * FROM finish();
ROLLBACK;
