-- usage_record: billing.record() counts one usage report (SPEC section 3).
-- Shows a report counted into its bucket, a duplicate event id (false, not an
-- error), that dedupe is per (account, meter) and ignores the dimension, the
-- four aggregations (sum, count, max, last, with a timestamp tie won by the
-- later arrival), that a rolled-back record leaves no trace and its retry
-- counts once, and every error: bad input changes nothing.

-- usage is stamped relative to t0, a fixed whole hour (the meters accept
-- reports 100 years late), so that no output depends on the clock; only
-- the default timestamp and the late-window edges need now(), below
SELECT timestamptz '2025-03-12 09:00+00' AS t0 \gset

INSERT INTO billing.accounts (account_id, name) VALUES (201, 'first'), (202, 'second');
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('rec_sum', 'sum', '100 years'), ('rec_count', 'count', '100 years'),
    ('rec_max', 'max', '100 years'), ('rec_last', 'last', '100 years'),
    ('rec_other', 'sum', '100 years');
INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window)
VALUES ('rec_hourly', 'sum', '1 hour', '100 years');
INSERT INTO billing.meters (meter, late_window) VALUES ('rec_recent', '1 hour');
INSERT INTO billing.meters (meter) VALUES ('rec_default');

-- a report is counted into the bucket (minute) that holds its timestamp
SELECT billing.record(201, 'rec_sum', 2.5, :'t0'::timestamptz + interval '10 seconds');
SELECT billing.record(201, 'rec_sum', 0.5, :'t0'::timestamptz + interval '59.999999 seconds');
SELECT billing.record(201, 'rec_sum', 4, :'t0'::timestamptz + interval '1 minute');
-- fractions add exactly: 0.1 + 0.2 is 0.3; a 1 hour meter buckets by the hour
SELECT billing.record(201, 'rec_hourly', 0.1, :'t0'::timestamptz + interval '5 minutes');
SELECT billing.record(201, 'rec_hourly', 0.2, :'t0'::timestamptz + interval '59 minutes');
SELECT billing.record(201, 'rec_hourly', 7, :'t0'::timestamptz + interval '60 minutes');
SELECT * FROM test.show(201, :'t0');

-- ts defaults to now(): the report lands in the current minute (this needs
-- the clock; in a transaction, so that now() is the same in both
-- statements, and the output is the same at any time; rolled back)
BEGIN;
SELECT billing.record(202, 'rec_other', 1);
SELECT meter, bucket_start = date_bin('1 minute', now(), timestamptz '1970-01-01 00:00+00') AS this_minute,
       quantity, events
  FROM billing.usage(202, now() - interval '1 hour', now() + interval '1 hour');
ROLLBACK;

-- an event id counts once: a repeat returns false and changes nothing, even
-- with another quantity, timestamp or dimension
SELECT billing.record(202, 'rec_sum', 10, :'t0', 'evt-1');
SELECT billing.record(202, 'rec_sum', 10, :'t0', 'evt-1');
SELECT billing.record(202, 'rec_sum', 99, :'t0'::timestamptz + interval '5 minutes', 'evt-1');
SELECT billing.record(202, 'rec_sum', 99, :'t0', 'evt-1', 'eu');
-- ... once per (account, meter): the same id counts for another meter or account
SELECT billing.record(202, 'rec_other', 3, :'t0', 'evt-1');
SELECT billing.record(201, 'rec_other', 3, :'t0', 'evt-1');
-- event ids are compared exactly (case and spaces matter)
SELECT billing.record(202, 'rec_sum', 1, :'t0', 'EVT-1');
SELECT billing.record(202, 'rec_sum', 1, :'t0', 'evt-1 ');
-- a report without an event id always counts
SELECT billing.record(202, 'rec_sum', 1, :'t0', NULL);
SELECT billing.record(202, 'rec_sum', 1, :'t0', NULL);
SELECT * FROM test.show(202, :'t0');
SELECT * FROM test.show(201, :'t0') WHERE meter = 'rec_other';

-- dimensions split a bucket; the empty dimension is the default
SELECT billing.record(201, 'rec_other', 1, :'t0'::timestamptz + interval '2 minutes', NULL, 'us');
SELECT billing.record(201, 'rec_other', 2, :'t0'::timestamptz + interval '2 minutes', NULL, 'eu');
SELECT billing.record(201, 'rec_other', 4, :'t0'::timestamptz + interval '2 minutes', NULL, 'eu');
SELECT billing.record(201, 'rec_other', 8, :'t0'::timestamptz + interval '2 minutes');
SELECT * FROM test.show(201, :'t0') WHERE meter = 'rec_other';

-- count: one per report, whatever the quantity (0 included)
SELECT billing.record(201, 'rec_count', 0, :'t0');
SELECT billing.record(201, 'rec_count', 5, :'t0');
SELECT billing.record(201, 'rec_count', 1000.5, :'t0');
SELECT billing.record(201, 'rec_count', 1000.5, :'t0', 'cnt-1');
SELECT billing.record(201, 'rec_count', 1000.5, :'t0', 'cnt-1');
-- max: the largest value; negative values are allowed
SELECT billing.record(201, 'rec_max', 3, :'t0');
SELECT billing.record(201, 'rec_max', 9, :'t0');
SELECT billing.record(201, 'rec_max', 4, :'t0');
SELECT billing.record(201, 'rec_max', -5, :'t0'::timestamptz + interval '1 minute');
SELECT billing.record(201, 'rec_max', -2, :'t0'::timestamptz + interval '1 minute');
SELECT billing.record(201, 'rec_max', -7, :'t0'::timestamptz + interval '1 minute');
-- last: the value with the latest timestamp, whatever the order of arrival
SELECT billing.record(201, 'rec_last', 1, :'t0'::timestamptz + interval '10 seconds');
SELECT billing.record(201, 'rec_last', 2, :'t0'::timestamptz + interval '30 seconds');
SELECT billing.record(201, 'rec_last', 3, :'t0'::timestamptz + interval '20 seconds');
SELECT * FROM test.show(201, :'t0') WHERE meter IN ('rec_count', 'rec_max', 'rec_last');
-- a tie on the timestamp: the later arrival wins (twice, to rule out luck)
SELECT billing.record(201, 'rec_last', 4, :'t0'::timestamptz + interval '30 seconds');
SELECT * FROM test.show(201, :'t0') WHERE meter = 'rec_last';
SELECT billing.record(201, 'rec_last', -6, :'t0'::timestamptz + interval '30 seconds');
SELECT * FROM test.show(201, :'t0') WHERE meter = 'rec_last';
-- ... also when both arrive in one statement
SELECT billing.record(201, 'rec_last', v, :'t0'::timestamptz + interval '1 minute')
  FROM (VALUES (1, 8), (2, 5), (3, 6)) AS r(n, v) ORDER BY n;
SELECT * FROM test.show(201, :'t0') WHERE meter = 'rec_last';

-- a rolled-back record leaves no trace: the retry counts, once
BEGIN;
SELECT billing.record(202, 'rec_other', 50, :'t0', 'retry-1');
SELECT * FROM test.show(202, :'t0') WHERE meter = 'rec_other';
ROLLBACK;
SELECT * FROM test.show(202, :'t0') WHERE meter = 'rec_other';
SELECT billing.record(202, 'rec_other', 50, :'t0', 'retry-1');
SELECT billing.record(202, 'rec_other', 50, :'t0', 'retry-1');
SELECT * FROM test.show(202, :'t0') WHERE meter = 'rec_other';
-- the same inside a transaction, with a savepoint
BEGIN;
SAVEPOINT attempt;
SELECT billing.record(202, 'rec_other', 60, :'t0', 'retry-2');
ROLLBACK TO SAVEPOINT attempt;
SELECT billing.record(202, 'rec_other', 60, :'t0', 'retry-2');
SELECT billing.record(202, 'rec_other', 60, :'t0', 'retry-2');
COMMIT;
SELECT * FROM test.show(202, :'t0') WHERE meter = 'rec_other';

-- errors -------------------------------------------------------------------
-- unknown meter or account: 23503
SELECT billing.record(201, 'rec_nope', 1, :'t0');
SELECT billing.record(201, 'REC_SUM', 1, :'t0');
SELECT billing.record(201, '', 1, :'t0');
SELECT billing.record(209, 'rec_sum', 1, :'t0');
SELECT billing.record(0, 'rec_sum', 1, :'t0');
SELECT billing.record(-1, 'rec_sum', 1, :'t0');
-- negative quantity on sum and count meters: 22023
SELECT billing.record(201, 'rec_sum', -1, :'t0');
SELECT billing.record(201, 'rec_sum', -0.000000000000000000000001, :'t0');
SELECT billing.record(201, 'rec_count', -1, :'t0');
-- NaN and infinities on any meter: 22023
SELECT billing.record(201, 'rec_sum', 'NaN', :'t0');
SELECT billing.record(201, 'rec_sum', 'Infinity', :'t0');
SELECT billing.record(201, 'rec_count', 'NaN', :'t0');
SELECT billing.record(201, 'rec_max', 'NaN', :'t0');
SELECT billing.record(201, 'rec_max', '-Infinity', :'t0');
SELECT billing.record(201, 'rec_last', 'Infinity', :'t0');
SELECT billing.record(201, 'rec_last', 'NaN', :'t0');
-- NULL where a value is required: 22004 (event_id may be NULL)
SELECT billing.record(NULL, 'rec_sum', 1, :'t0');
SELECT billing.record(201, NULL, 1, :'t0');
SELECT billing.record(201, 'rec_sum', NULL, :'t0');
SELECT billing.record(201, 'rec_sum', 1, NULL);
-- a timestamp older than now() - late_window or more than 5 minutes ahead:
-- 22007 (the message shows the times, so only the SQLSTATE is shown here).
-- rec_recent has a late window of 1 hour; rec_default the default 35 days.
-- (These edges are relative to the clock, so they need now(); only the
-- SQLSTATEs are shown, the same at any time.  In a transaction that is
-- rolled back, so that the edges counted go away.)
BEGIN;
SELECT test.sqlstate_of($$SELECT billing.record(201, 'rec_recent', 1, now() - interval '1 hour')$$) AS at_late_edge,
       test.sqlstate_of($$SELECT billing.record(201, 'rec_recent', 1, now() - interval '1 hour 0.000001 s')$$) AS past_late_edge,
       test.sqlstate_of($$SELECT billing.record(201, 'rec_default', 1, now() - interval '35 days')$$) AS at_35_days,
       test.sqlstate_of($$SELECT billing.record(201, 'rec_default', 1, now() - interval '35 days 1 second')$$) AS past_35_days;
SELECT test.sqlstate_of($$SELECT billing.record(201, 'rec_recent', 1, now() + interval '5 minutes')$$) AS at_future_edge,
       test.sqlstate_of($$SELECT billing.record(201, 'rec_recent', 1, now() + interval '5 minutes 0.000001 s')$$) AS past_future_edge,
       test.sqlstate_of($$SELECT billing.record(201, 'rec_sum', 1, 'infinity')$$) AS infinity,
       test.sqlstate_of($$SELECT billing.record(201, 'rec_sum', 1, '-infinity')$$) AS minus_infinity;
-- the two edges accepted were counted
SELECT sum(events) AS recent_events FROM billing.usage_cells WHERE account_id = 201 AND meter = 'rec_recent';
ROLLBACK;

-- a failed record claimed nothing: the same event id counts afterwards
SELECT billing.record(201, 'rec_sum', -1, :'t0', 'fix-1');
SELECT billing.record(201, 'rec_sum', 1, :'t0', 'fix-1');
SELECT billing.record(203, 'rec_sum', 1, :'t0', 'fix-2');
INSERT INTO billing.accounts (account_id) VALUES (203);
SELECT billing.record(203, 'rec_sum', 1, :'t0', 'fix-2');
SELECT billing.record(203, 'rec_sum', 1, :'t0', 'fix-2');
-- and nothing else changed: 201's buckets hold only the good reports
SELECT * FROM test.show(201, :'t0');
SELECT * FROM test.show(203, :'t0');
