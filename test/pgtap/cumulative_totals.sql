-- cumulative_totals: report_cumulative with the largest totals the
-- quantity limit lets through (999 digits before the point and 1000 after,
-- stored as ~1 kB numerics) from many sources, and the totals past it.
-- report_cumulative read a source's previous total from SPI's memory after
-- SPI_finish had freed it (issue 13, defect 2): with totals over ~8 kB the
-- bucket came out wrong or a corrupt delta was stored.  The increase is now
-- computed before SPI_finish; every bucket must hold exactly the sum over
-- sources of each source's greatest total, before and after compaction.
-- Totals of 10^10000 and 10^30000 (the issue's) are past the limit of
-- 10^1000 and refused with 22023, leaving nothing behind.
BEGIN;
SELECT plan(11);
\ir ../helpers.sql
SET LOCAL timezone = 'UTC';

INSERT INTO billing.meters (meter, aggregation, late_window) VALUES ('ct_sum', 'sum', '100 years');
INSERT INTO billing.accounts (account_id) VALUES (9701), (9702);

-- b: 999 digits before the point and 1000 after, no run a compressor likes
CREATE TEMP TABLE ct_base AS
SELECT (string_agg(((g * 7919 + g / 7) % 10)::text, '' ORDER BY g) FILTER (WHERE g <= 999)
        || '.' ||
        string_agg(((g * 104729 + g / 3) % 10)::text, '' ORDER BY g) FILTER (WHERE g > 999))::numeric AS b
  FROM generate_series(1, 1999) g;
SELECT ok(length((SELECT b FROM ct_base)::text) = 2000 AND (SELECT b FROM ct_base) < 1e999,
          'the base total has 999 + 1000 digits');

-- 20 sources, each 30 reports of b/25 + k, then 30 of 3b/25 + 7k, in rounds
-- (every report but a source's first reads a ~1 kB old total back), and a
-- stale total and a repeat of each source at the end
CREATE TEMP TABLE ct_reports AS
SELECT s, n, CASE WHEN n <= 30 THEN b / 25 + n ELSE 3 * b / 25 + 7 * (n - 30) END AS total
  FROM ct_base, generate_series(1, 20) s, generate_series(1, 60) n;
SELECT count(billing.report_cumulative('src-' || s, 9701, 'ct_sum', '2025-06-01 10:00', total))
  FROM (SELECT s, n, total FROM ct_reports ORDER BY n, s) r;
SELECT count(billing.report_cumulative('src-' || s, 9701, 'ct_sum', '2025-06-01 10:00', total))
  FROM (SELECT s, total FROM ct_reports WHERE n IN (1, 60) ORDER BY s, n DESC) r;

SELECT is((SELECT quantity FROM billing.usage(9701, '2025-06-01', '2025-06-02', meter => 'ct_sum')),
          (SELECT 20 * (3 * b / 25 + 210) FROM ct_base),
          'the bucket holds the sum over 20 sources of each one''s greatest total, exactly');
SELECT is((SELECT events FROM billing.usage(9701, '2025-06-01', '2025-06-02', meter => 'ct_sum')),
          20::bigint, 'one event per source');
SELECT is((SELECT count(*) FROM billing.cumulative_reports r, ct_base
            WHERE r.account_id = 9701 AND r.total = 3 * b / 25 + 210),
          20::bigint, 'every source keeps its greatest total');

-- the same totals in the opposite order on another account: the first report
-- of each source is its greatest, every later one is stale
SELECT count(billing.report_cumulative('src-' || s, 9702, 'ct_sum', '2025-06-01 10:00', total))
  FROM (SELECT s, n, total FROM ct_reports ORDER BY n DESC, s) r;
SELECT is((SELECT quantity FROM billing.usage(9702, '2025-06-01', '2025-06-02', meter => 'ct_sum')),
          (SELECT 20 * (3 * b / 25 + 210) FROM ct_base),
          'stale totals arriving later add nothing');

SELECT cmp_ok(billing.compact_usage(), '>=', 1::bigint, 'compaction folds the deltas');
SELECT is((SELECT array_agg(quantity ORDER BY account_id)
             FROM (SELECT 9701 AS account_id, quantity
                     FROM billing.usage(9701, '2025-06-01', '2025-06-02', meter => 'ct_sum')
                   UNION ALL
                   SELECT 9702, quantity
                     FROM billing.usage(9702, '2025-06-01', '2025-06-02', meter => 'ct_sum')) u),
          (SELECT ARRAY[20 * (3 * b / 25 + 210), 20 * (3 * b / 25 + 210)] FROM ct_base),
          'and the totals are the same after compaction');

-- past the limit: refused with 22023, nothing stored
SELECT is(test.sqlstate_of($$SELECT billing.report_cumulative('huge', 9701, 'ct_sum', '2025-06-01 10:00', 1e10000 + 1)$$),
          '22023', 'a total of 10^10000 + 1 is refused with 22023');
SELECT is(test.sqlstate_of($$SELECT billing.report_cumulative('src-1', 9701, 'ct_sum', '2025-06-01 10:00', 3e10000 + 7)$$),
          '22023', 'so is 3 * 10^10000 + 7 from a source that reported before');
SELECT is(test.sqlstate_of($$SELECT billing.report_cumulative('huge', 9701, 'ct_sum', '2025-06-01 10:00', 1e30000)$$),
          '22023', 'and 10^30000');
SELECT is((SELECT quantity FROM billing.usage(9701, '2025-06-01', '2025-06-02', meter => 'ct_sum')),
          (SELECT 20 * (3 * b / 25 + 210) FROM ct_base),
          'they changed nothing');

SELECT * FROM finish();
ROLLBACK;
