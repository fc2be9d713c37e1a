-- usage_cumulative: billing.report_cumulative() lets N collectors each
-- report a running total for a bucket (SPEC section 3); the bucket counts
-- the sum over sources of the greatest total each reported.
-- Shows two sources adding up, that repeats and stale (reordered) totals
-- change nothing, that the order of arrival does not matter, dimensions,
-- mixing with record(), and the errors.

-- usage is stamped relative to t0, a fixed whole hour (the meters accept
-- reports 100 years late), so that no output depends on the clock
SELECT timestamptz '2025-03-12 09:00+00' AS t0 \gset

-- the usage of one meter of one account: quantities only (the events of a
-- cumulative bucket are not pinned by the contract)
CREATE FUNCTION pg_temp.totals(acct bigint, m text, t0 timestamptz)
    RETURNS TABLE (dimension text, bucket interval, quantity numeric)
    LANGUAGE sql AS $$
    SELECT u.dimension, u.bucket_start - t0, u.quantity
      FROM billing.usage(acct, t0 - interval '1 day', t0 + interval '1 day', meter => m) u
$$;

INSERT INTO billing.accounts (account_id) VALUES (501), (502), (503);
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('cum_spans', 'sum', '100 years'), ('cum_peak', 'max', '100 years'),
    ('cum_plan', 'last', '100 years'), ('cum_calls', 'count', '100 years');
INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window)
VALUES ('cum_hourly', 'sum', '1 hour', '100 years');

-- collector A reports 10, then its running total grows to 25; collector B
-- reports 7: the bucket holds 25 + 7
SELECT billing.report_cumulative('A', 501, 'cum_spans', :'t0', 10);
SELECT * FROM pg_temp.totals(501, 'cum_spans', :'t0');
SELECT billing.report_cumulative('A', 501, 'cum_spans', :'t0', 25);
SELECT billing.report_cumulative('B', 501, 'cum_spans', :'t0', 7);
SELECT * FROM pg_temp.totals(501, 'cum_spans', :'t0');
-- repeats change nothing, and neither does a stale total arriving late
SELECT billing.report_cumulative('A', 501, 'cum_spans', :'t0', 25);
SELECT billing.report_cumulative('B', 501, 'cum_spans', :'t0', 7);
SELECT billing.report_cumulative('A', 501, 'cum_spans', :'t0', 10);
SELECT billing.report_cumulative('B', 501, 'cum_spans', :'t0', 0);
SELECT * FROM pg_temp.totals(501, 'cum_spans', :'t0');
-- the greatest total per source is kept
SELECT source, bucket_start - :'t0'::timestamptz AS bucket, total
  FROM billing.cumulative_reports WHERE account_id = 501 ORDER BY source;

-- order of arrival does not matter: the same reports in three orders give
-- the same bucket (minutes 1, 2 and 3 of account 502)
SELECT billing.report_cumulative(src, 502, 'cum_spans', :'t0'::timestamptz + interval '1 minute', total)
  FROM (VALUES (1, 'A', 5), (2, 'A', 9), (3, 'B', 3), (4, 'B', 4), (5, 'A', 9.5)) r(n, src, total) ORDER BY n;
SELECT billing.report_cumulative(src, 502, 'cum_spans', :'t0'::timestamptz + interval '2 minutes', total)
  FROM (VALUES (1, 'A', 9.5), (2, 'B', 4), (3, 'A', 9), (4, 'B', 3), (5, 'A', 5)) r(n, src, total) ORDER BY n;
SELECT billing.report_cumulative(src, 502, 'cum_spans', :'t0'::timestamptz + interval '3 minutes', total)
  FROM (VALUES (1, 'B', 3), (2, 'A', 9), (3, 'A', 9.5), (4, 'A', 5), (5, 'B', 4)) r(n, src, total) ORDER BY n;
SELECT * FROM pg_temp.totals(502, 'cum_spans', :'t0');

-- the report may carry any time inside the bucket; each dimension is its own
SELECT billing.report_cumulative('A', 503, 'cum_hourly', :'t0'::timestamptz + interval '10 minutes', 4);
SELECT billing.report_cumulative('A', 503, 'cum_hourly', :'t0'::timestamptz + interval '50 minutes', 6);
SELECT billing.report_cumulative('A', 503, 'cum_hourly', :'t0', 6, 'eu');
SELECT billing.report_cumulative('B', 503, 'cum_hourly', :'t0'::timestamptz + interval '59 minutes', 2, 'eu');
SELECT billing.report_cumulative('A', 503, 'cum_hourly', :'t0'::timestamptz + interval '60 minutes', 1);
SELECT * FROM pg_temp.totals(503, 'cum_hourly', :'t0');
-- a first total of 0 is a report of nothing yet
SELECT billing.report_cumulative('C', 503, 'cum_spans', :'t0', 0);
SELECT * FROM pg_temp.totals(503, 'cum_spans', :'t0');
SELECT billing.report_cumulative('C', 503, 'cum_spans', :'t0', 0.5);
SELECT * FROM pg_temp.totals(503, 'cum_spans', :'t0');
-- reports of record() add to the same bucket
SELECT billing.record(503, 'cum_spans', 2, :'t0');
SELECT billing.report_cumulative('C', 503, 'cum_spans', :'t0', 0.75);
SELECT * FROM pg_temp.totals(503, 'cum_spans', :'t0');
-- a rolled-back report leaves nothing: the same total counts afterwards
BEGIN;
SELECT billing.report_cumulative('D', 503, 'cum_spans', :'t0', 100);
ROLLBACK;
SELECT * FROM pg_temp.totals(503, 'cum_spans', :'t0');
SELECT billing.report_cumulative('D', 503, 'cum_spans', :'t0', 100);
SELECT * FROM pg_temp.totals(503, 'cum_spans', :'t0');

-- errors ---------------------------------------------------------------------
-- a meter that does not add quantities: 22023
SELECT billing.report_cumulative('A', 501, 'cum_peak', :'t0', 1);
SELECT billing.report_cumulative('A', 501, 'cum_plan', :'t0', 1);
SELECT billing.report_cumulative('A', 501, 'cum_calls', :'t0', 1);
-- unknown meter or account: 23503
SELECT billing.report_cumulative('A', 501, 'cum_nope', :'t0', 1);
SELECT billing.report_cumulative('A', 599, 'cum_spans', :'t0', 1);
-- a negative or not finite total: 22023
SELECT billing.report_cumulative('A', 501, 'cum_spans', :'t0', -1);
SELECT billing.report_cumulative('A', 501, 'cum_spans', :'t0', 'NaN');
SELECT billing.report_cumulative('A', 501, 'cum_spans', :'t0', 'Infinity');
-- NULL where a value is required: 22004
SELECT billing.report_cumulative(NULL, 501, 'cum_spans', :'t0', 1);
SELECT billing.report_cumulative('A', NULL, 'cum_spans', :'t0', 1);
SELECT billing.report_cumulative('A', 501, NULL, :'t0', 1);
SELECT billing.report_cumulative('A', 501, 'cum_spans', NULL, 1);
SELECT billing.report_cumulative('A', 501, 'cum_spans', :'t0', NULL);
-- a bucket outside the window (more than 100 years late, or in the far
-- future): 22007
SELECT test.sqlstate_of($$SELECT billing.report_cumulative('A', 501, 'cum_spans', '1900-01-01 00:00+00', 1)$$) AS too_late,
       test.sqlstate_of($$SELECT billing.report_cumulative('A', 501, 'cum_spans', '2999-01-01 00:00+00', 1)$$) AS too_early;
-- none of them changed anything
SELECT * FROM pg_temp.totals(501, 'cum_spans', :'t0');
SELECT count(*) AS reports FROM billing.cumulative_reports WHERE account_id IN (501, 599);
