-- last_rule: one rule for combining the values of a counter cell (SPEC
-- section 2, src/agg.c), on every read path.  A last meter keeps the value
-- with the latest timestamp; on a tie of timestamps the later arrival wins,
-- whichever is greater; a later arrival with an earlier timestamp does not.
-- Pinned on raw and rolled-up usage, the period totals, invoice_preview,
-- before and after compaction and with compacted and uncompacted cells
-- mixed, in rerate, and in the C aggregate itself (any order of folding,
-- NULL the earliest, _combine and _cell_agg agreeing).  The Citus test runs
-- the same scenario on the cluster (test/citus).  Also: billing._bin, the
-- one bin function, equals date_bin for days and time and counts whole
-- months from January 1970.
BEGIN;
SELECT plan(32);
SET LOCAL timezone = 'America/New_York';   -- bins are UTC whatever the session says
SET LOCAL client_min_messages = warning;

INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('lr_last', 'last', '100 years'), ('lr_max', 'max', '100 years');
INSERT INTO billing.plans (plan, currency) VALUES ('lr_plan', 'USD');
INSERT INTO billing.charges (plan, meter, price, valid_from, description) VALUES
    ('lr_plan', 'lr_last', 'unit 1', '-infinity', 'Seats');
INSERT INTO billing.accounts (account_id, currency) VALUES (7401, 'USD');
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
    VALUES (7401, 'lr_plan', '2024-01-01 00:00+00');

-- every read path's value of lr_last in January 2024 (one minute bucket)
CREATE FUNCTION pg_temp.reads() RETURNS TABLE (path text, quantity numeric)
LANGUAGE sql AS $$
    SELECT 'usage raw', u.quantity
      FROM billing.usage(7401, '2024-01-10 00:00+00', '2024-01-11 00:00+00', NULL, 'lr_last') u
    UNION ALL
    SELECT 'usage ' || g, u.quantity
      FROM unnest(ARRAY[interval '1 hour', '1 day', '1 month']) g,
           billing.usage(7401, '2024-01-01 00:00+00', '2024-02-01 00:00+00', g, 'lr_last') u
    UNION ALL
    SELECT 'period totals ' || x.i, t.quantity
      FROM (VALUES (1, timestamptz '2024-01-01 00:00+00', timestamptz '2024-02-01 00:00+00'),
                   (2, '2024-01-10 10:00+00', '2024-01-10 10:01+00'),
                   (3, '2024-01-10 09:30+00', '2024-01-10 10:30+00')) x(i, s, e),
           billing._usage_totals_many(ARRAY[7401::bigint], ARRAY[x.s], ARRAY[x.e]) t
     WHERE t.meter = 'lr_last'
    UNION ALL
    SELECT 'preview', p.quantity
      FROM billing.invoice_preview(7401, '2024-01-20 00:00+00') p
     WHERE p.kind = 'usage' AND p.meter = 'lr_last'
$$;
CREATE FUNCTION pg_temp.all_read(v numeric) RETURNS TABLE (path text, quantity numeric)
LANGUAGE sql AS $$
    SELECT p, v FROM unnest(ARRAY['usage raw', 'usage 01:00:00', 'usage 1 day', 'usage 1 mon',
                                  'period totals 1', 'period totals 2', 'period totals 3',
                                  'preview']) p
$$;

-- 1. one statement: two reports with the same timestamp, the later one wins
SELECT * FROM billing.ingest('lr', 0, 1, ARRAY[7401, 7401]::bigint[], ARRAY['lr_last', 'lr_last'],
                             ARRAY[5, 3]::numeric[],
                             ARRAY['2024-01-10 10:00:30+00', '2024-01-10 10:00:30+00']::timestamptz[]);
SELECT set_eq('SELECT * FROM pg_temp.reads()', 'SELECT * FROM pg_temp.all_read(3)',
              'one statement, a tie of timestamps: every path reads the later report (3, not 5)');

-- 2. a later statement, same timestamp: it wins, also when smaller
SELECT billing.record(7401, 'lr_last', 2, '2024-01-10 10:00:30+00');
SELECT set_eq('SELECT * FROM pg_temp.reads()', 'SELECT * FROM pg_temp.all_read(2)',
              'uncompacted, a tie across statements: every path reads the later arrival (2)');
-- an earlier timestamp that arrives later does not win
SELECT billing.record(7401, 'lr_last', 100, '2024-01-10 10:00:10+00');
SELECT set_eq('SELECT * FROM pg_temp.reads()', 'SELECT * FROM pg_temp.all_read(2)',
              'uncompacted: a later arrival with an earlier timestamp does not win');

-- 3. compaction keeps the same value
SELECT ok(billing.compact_usage() > 0, 'compaction merged the deltas');
SELECT is((SELECT count(*) FROM billing.usage_deltas), 0::bigint, 'no deltas left');
SELECT set_eq('SELECT * FROM pg_temp.reads()', 'SELECT * FROM pg_temp.all_read(2)',
              'compacted: every path reads the same value');
SELECT is((SELECT c.quantity FROM billing.usage_days b, billing._day_cells(b.day, b.cells) c
            WHERE b.account_id = 7401 AND b.meter = 'lr_last'), 2::numeric,
          'the compacted cell holds the later arrival');
SELECT is((SELECT u.quantity FROM billing.usage(7401, '2024-01-10', '2024-01-11', '1 hour', 'lr_last') u),
          2::numeric, 'the hour read from the store holds the later arrival');
SELECT is((SELECT b.quantity FROM billing.usage_days b
            WHERE b.account_id = 7401 AND b.meter = 'lr_last'), 2::numeric,
          'the day total holds the later arrival');

-- 4. mixed: a tie arriving after compaction wins over the compacted value
SELECT billing.record(7401, 'lr_last', 7, '2024-01-10 10:00:30+00');
SELECT set_eq('SELECT * FROM pg_temp.reads()', 'SELECT * FROM pg_temp.all_read(7)',
              'mixed: a tie in the deltas wins over the compacted cell (every path)');
SELECT billing.record(7401, 'lr_last', 1000, '2024-01-10 10:00:29+00');
SELECT set_eq('SELECT * FROM pg_temp.reads()', 'SELECT * FROM pg_temp.all_read(7)',
              'mixed: an earlier timestamp in the deltas does not win');
SELECT billing.compact_usage();
SELECT set_eq('SELECT * FROM pg_temp.reads()', 'SELECT * FROM pg_temp.all_read(7)',
              'compacted into a compacted cell: the same value');
SELECT is((SELECT array_agg(b.quantity ORDER BY b.quantity) FROM (
               SELECT c.quantity FROM billing.usage_days d, billing._day_cells(d.day, d.cells) c
                WHERE d.account_id = 7401 AND d.meter = 'lr_last'
               UNION ALL SELECT u.quantity FROM billing.usage(7401, '2024-01-10', '2024-01-11', '1 hour', 'lr_last') u
               UNION ALL SELECT quantity FROM billing.usage_days WHERE account_id = 7401 AND meter = 'lr_last') b),
          ARRAY[7, 7, 7]::numeric[], 'cell, hour and day total hold the same value');

-- 5. rerate: finalize January with 7, then a tie arrives later with 4
SELECT is((SELECT sum(total) FROM billing.finalize_invoices('2024-02-02 00:00+00')
            WHERE account_id = 7401), 7::numeric, 'January is billed 7');
SELECT billing.record(7401, 'lr_last', 4, '2024-01-10 10:00:30+00');
SELECT results_eq($$SELECT r.billed_quantity, r.correct_quantity, r.delta
                      FROM billing.rerate('2024-01-01 00:00+00', '2024-02-01 00:00+00', 7401, true) r
                     WHERE r.meter = 'lr_last'$$,
                  $$VALUES (7::numeric, 4::numeric, -3::numeric)$$,
                  'rerate: the later arrival of a tie is the correct quantity (uncompacted)');
SELECT billing.compact_usage();
SELECT results_eq($$SELECT r.billed_quantity, r.correct_quantity, r.delta
                      FROM billing.rerate('2024-01-01 00:00+00', '2024-02-01 00:00+00', 7401, true) r
                     WHERE r.meter = 'lr_last'$$,
                  $$VALUES (7::numeric, 4::numeric, -3::numeric)$$,
                  'rerate: the same after compaction');

-- 6. max meters: the larger value, however the cells are compacted
SELECT billing.record(7401, 'lr_max', 5, '2024-01-10 10:00:30+00');
SELECT billing.compact_usage();
SELECT billing.record(7401, 'lr_max', 9, '2024-01-10 10:00:01+00');
SELECT billing.record(7401, 'lr_max', 3, '2024-01-10 10:00:59+00');
SELECT is((SELECT quantity FROM billing.usage(7401, '2024-01-10 00:00+00', '2024-01-11 00:00+00', '1 day', 'lr_max')),
          9::numeric, 'max: the larger value, compacted and uncompacted mixed');

-- 7. the aggregate itself: any order, NULL the earliest, a full tie takes the greater
CREATE TEMP TABLE cells (q numeric, ts timestamptz, seq bigint);
INSERT INTO cells VALUES
    (1, '2024-01-01 00:00+00', 5), (2, '2024-01-01 00:01+00', 1), (3, '2024-01-01 00:01+00', 2),
    (4, NULL, 9), (5, '2024-01-01 00:01+00', NULL), (6, '2023-12-31 00:00+00', 99);
SELECT is((SELECT count(DISTINCT v) FROM (
               SELECT billing._cell_agg('last', q, ts, seq ORDER BY o) AS v
                 FROM (SELECT c.*, g, random() AS o FROM cells c, generate_series(1, 50) g) x
                GROUP BY g) y), 1::bigint, 'last: the same value in any order of folding');
SELECT is((SELECT billing._cell_agg('last', q, ts, seq) FROM cells), 3::numeric,
          'last: the latest timestamp, then the later arrival; NULLs are the earliest');
SELECT is((SELECT billing._cell_last_ts('last', q, ts, seq) FROM cells),
          '2024-01-01 00:01+00'::timestamptz, '_cell_last_ts: the timestamp of that value');
SELECT is((SELECT billing._cell_last_seq('last', q, ts, seq) FROM cells), 2::bigint,
          '_cell_last_seq: the arrival of that value');
SELECT is((SELECT billing._cell_agg('last', q, ts, seq)
             FROM (VALUES (4::numeric, timestamptz '2024-01-01', 1::bigint),
                          (8, '2024-01-01', 1), (6, '2024-01-01', 1)) v(q, ts, seq)),
          8::numeric, 'last: equal timestamp and arrival take the greater value');
SELECT is((SELECT billing._cell_agg('last', q, ts, seq) FROM cells WHERE ts IS NULL OR seq IS NULL),
          5::numeric, 'last: a timestamp without an arrival is later than no timestamp');
SELECT results_eq($$SELECT a, billing._cell_agg(a, q, ts, seq) FROM cells,
                           unnest(ARRAY['count', 'max', 'sum']) a GROUP BY a ORDER BY a$$,
                  $$VALUES ('count', 21::numeric), ('max', 6), ('sum', 21)$$,
                  'sum and count add, max keeps the larger');
SELECT is((SELECT count(*) FROM cells a, cells b, unnest(ARRAY['sum', 'count', 'max', 'last']) g
            WHERE billing._combine(g, a.q, a.ts, a.seq, b.q, b.ts, b.seq)
                  IS DISTINCT FROM (SELECT billing._cell_agg(g, v.q, v.ts, v.seq)
                                      FROM (VALUES (a.q, a.ts, a.seq), (b.q, b.ts, b.seq)) v(q, ts, seq))),
          0::bigint, '_combine and _cell_agg agree on every pair');
SELECT is((SELECT count(*) FROM cells a, cells b
            WHERE billing._combine('last', a.q, a.ts, a.seq, b.q, b.ts, b.seq)
                  <> CASE WHEN billing._last_later(a.ts, a.seq, b.ts, b.seq) THEN a.q
                          WHEN billing._last_later(b.ts, b.seq, a.ts, a.seq) THEN b.q
                          ELSE GREATEST(a.q, b.q) END),
          0::bigint, '_last_later says which value _combine keeps');
SELECT is(billing._cell_agg('last', q, ts, seq), NULL, 'no cells: NULL') FROM cells WHERE false;

-- 8. billing._bin, the one bin function
SELECT is((SELECT count(*) FROM generate_series(1, 500) i,
                  LATERAL (SELECT timestamptz '1969-06-01 00:00+00' + random() * interval '80 years' AS ts,
                                  (ARRAY[interval '1 minute', '5 minutes', '1 hour', '90 minutes', '1 day',
                                         '7 days', '1 day 1 hour', '1 second'])[1 + (i % 8)] AS w) x
            WHERE billing._bin(x.w, x.ts) <> date_bin(x.w, x.ts, timestamptz '1970-01-01 00:00+00')),
          0::bigint, '_bin equals date_bin from 1970-01-01 UTC for days and time');
SELECT results_eq($$SELECT billing._bin(g, ts) FROM (VALUES
                      (interval '1 month', timestamptz '2024-03-31 23:59:59+00'),
                      ('3 months', '2024-03-31 23:59:59+00'), ('3 months', '2024-04-01 00:00+00'),
                      ('1 year', '2024-07-01 00:00+00'), ('5 months', '1969-12-31 23:59:59+00'),
                      ('1 month', 'infinity')) v(g, ts)$$,
                  $$VALUES (timestamptz '2024-03-01 00:00+00'), ('2024-01-01 00:00+00'),
                           ('2024-04-01 00:00+00'), ('2024-01-01 00:00+00'),
                           ('1969-08-01 00:00+00'), ('infinity')$$,
                  '_bin: whole months since January 1970, in UTC');
SELECT throws_ok($$SELECT billing._bin('1 month 1 day', now())$$, '22023', NULL,
                 '_bin: months mixed with days raise 22023');
SELECT throws_ok($$SELECT billing._bin('-1 hour', now())$$, '22023', NULL,
                 '_bin: a width that is not positive raises 22023');
SELECT throws_ok($$SELECT billing._bin('1 minute', '294276-12-31 00:00:00+00')$$, '22008', NULL,
                 '_bin: a time too far from 1970 raises 22008, as date_bin does');

SELECT * FROM finish();
ROLLBACK;
