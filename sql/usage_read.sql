-- usage_read: billing.usage() reads the counters (SPEC section 4): the
-- stored buckets (grain NULL) or roll-ups to any grain aligned to UTC, where
-- max meters roll up by the max and last meters by the latest value.
-- Shows raw buckets, hour/day/month roll-ups, the meter filter and the
-- half-open time range, that compact_usage() changes nothing visible, the
-- usage_cells view, purge_dedupe() and the dedupe window, and the errors.

-- usage is stamped relative to fixed times, whatever the clock says: t0, a
-- whole hour, and d0, a UTC midnight three days before (for the day
-- roll-ups); the meters have a late window of 100 years to accept them
SELECT timestamptz '2025-03-12 09:00+00' AS t0 \gset
SELECT timestamptz '2025-03-09 00:00+00' AS d0 \gset

INSERT INTO billing.accounts (account_id) VALUES (601), (602), (603);
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('rd_spans', 'sum', '100 years'), ('rd_calls', 'count', '100 years'),
    ('rd_seats', 'max', '100 years'), ('rd_plan', 'last', '100 years');
INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window)
VALUES ('rd_gb', 'sum', '15 minutes', '100 years');

-- usage over two hours: minutes 0, 1 and 59 of the first hour, minute 5 of
-- the second, one dimension
SELECT count(*) FILTER (WHERE counted) AS counted FROM (
    SELECT billing.record(601, m, q, :'t0'::timestamptz + at, NULL, dim) AS counted
      FROM (VALUES
        ('rd_spans', 3, interval '0 s', ''),
        ('rd_spans', 4, interval '30 s', ''),
        ('rd_spans', 5, interval '1 min', ''),
        ('rd_spans', 6, interval '59 min 59 s', ''),
        ('rd_spans', 7, interval '1 h 5 min', ''),
        ('rd_spans', 100, interval '1 h 5 min', 'eu'),
        ('rd_calls', 9, interval '0 s', ''),
        ('rd_calls', 9, interval '1 min', ''),
        ('rd_calls', 9, interval '1 h', ''),
        ('rd_seats', 10, interval '0 s', ''),
        ('rd_seats', 12, interval '1 min', ''),
        ('rd_seats', 11, interval '2 min', ''),
        ('rd_seats', 4, interval '1 h 1 min', ''),
        ('rd_gb', 1.5, interval '14 min', ''),
        ('rd_gb', 2.5, interval '15 min', ''),
        ('rd_gb', 3.5, interval '59 min', '')) AS r(m, q, at, dim)) x;
-- last: arrival order differs from time order on purpose: the value of the
-- latest timestamp wins, within a bucket and in a roll-up
SELECT billing.record(601, 'rd_plan', 1, :'t0'::timestamptz + interval '10 min');
SELECT billing.record(601, 'rd_plan', 2, :'t0'::timestamptz + interval '40 min');
SELECT billing.record(601, 'rd_plan', 3, :'t0'::timestamptz + interval '20 min');
SELECT billing.record(601, 'rd_plan', 5, :'t0'::timestamptz + interval '40 min 30 s');
SELECT billing.record(601, 'rd_plan', 4, :'t0'::timestamptz + interval '40 min 10 s');
SELECT billing.record(601, 'rd_plan', 6, :'t0'::timestamptz + interval '1 h 30 min');
SELECT billing.record(601, 'rd_plan', 7, :'t0'::timestamptz + interval '1 h 10 min');

-- grain NULL: the stored buckets, each of its meter's width
SELECT * FROM test.show(601, :'t0');
-- hourly roll-ups: sum adds, count counts, max takes the max, last the value
-- with the latest timestamp; events always add
SELECT * FROM test.show(601, :'t0', '1 hour');
-- one meter only
SELECT * FROM test.show(601, :'t0', '1 hour', 'rd_plan');
SELECT * FROM test.show(601, :'t0', NULL, 'rd_seats');
SELECT * FROM test.show(601, :'t0', NULL, 'rd_nope');
-- another grain: 30 minutes
SELECT * FROM test.show(601, :'t0', '30 minutes', 'rd_spans');
-- the range is half open on stored bucket starts: [from_ts, to_ts)
SELECT meter, bucket_start - :'t0'::timestamptz AS bucket, quantity
  FROM billing.usage(601, :'t0'::timestamptz + interval '1 minute', :'t0'::timestamptz + interval '59 minutes',
                     meter => 'rd_spans');
SELECT count(*) AS other_account FROM billing.usage(602, :'t0'::timestamptz - interval '1 day', :'t0'::timestamptz + interval '1 day');

-- day roll-ups are UTC days: d0 is a UTC midnight
SELECT billing.record(602, 'rd_spans', 1, :'d0'::timestamptz + interval '1 hour');
SELECT billing.record(602, 'rd_spans', 2, :'d0'::timestamptz + interval '23 hours 59 minutes');
SELECT billing.record(602, 'rd_spans', 4, :'d0'::timestamptz + interval '24 hours');
SELECT billing.record(602, 'rd_spans', 8, :'d0'::timestamptz - interval '1 minute');
SELECT billing.record(602, 'rd_seats', 8, :'d0'::timestamptz + interval '1 hour');
SELECT billing.record(602, 'rd_seats', 3, :'d0'::timestamptz + interval '2 hours');
SELECT billing.record(602, 'rd_plan', 8, :'d0'::timestamptz + interval '23 hours');
SELECT billing.record(602, 'rd_plan', 3, :'d0'::timestamptz + interval '2 hours');
SELECT meter, bucket_start - :'d0'::timestamptz AS day, quantity, events
  FROM billing.usage(602, :'d0'::timestamptz - interval '2 days', :'d0'::timestamptz + interval '2 days', '1 day');
-- ... in any session time zone
SET timezone = 'Asia/Kolkata';
SELECT meter, bucket_start - :'d0'::timestamptz AS day, quantity, events
  FROM billing.usage(602, :'d0'::timestamptz - interval '2 days', :'d0'::timestamptz + interval '2 days', '1 day');
RESET timezone;
-- grains are aligned to UTC (1970-01-01 00:00), not to the first bucket:
-- 2 hours and 90 minutes from d0
SELECT meter, bucket_start - :'d0'::timestamptz AS bin, quantity, events
  FROM billing.usage(602, :'d0'::timestamptz, :'d0'::timestamptz + interval '1 day', '2 hours', 'rd_seats');
SELECT meter, bucket_start - :'d0'::timestamptz AS bin, quantity, events
  FROM billing.usage(602, :'d0'::timestamptz, :'d0'::timestamptz + interval '1 day', '90 minutes', 'rd_seats');

-- month roll-ups start at UTC midnight of the 1st, in any session time
-- zone, summer time or not.  rd_archive has a late window of 10 years, so
-- that fixed dates can be used.
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES ('rd_archive', 'sum', '10 years');
SELECT billing.record(603, 'rd_archive', q, ts)
  FROM (VALUES (1, '2025-01-31 23:59:59+00'::timestamptz), (2, '2025-02-01 00:00+00'),
               (4, '2025-03-31 23:30+00'), (8, '2025-04-01 00:00+00'),
               (16, '2025-07-15 12:00+00'), (32, '2025-12-31 23:59+00')) r(q, ts);
SHOW timezone;
SELECT bucket_start AT TIME ZONE 'UTC' AS month_utc, quantity, events
  FROM billing.usage(603, '2024-12-01', '2026-02-01', '1 month');
SET timezone = 'Europe/Berlin';
SELECT bucket_start AT TIME ZONE 'UTC' AS month_utc, quantity, events
  FROM billing.usage(603, '2024-12-01', '2026-02-01', '1 month');
SET timezone = 'UTC';
SELECT bucket_start AT TIME ZONE 'UTC' AS month_utc, quantity, events
  FROM billing.usage(603, '2024-12-01', '2026-02-01', '1 month');
-- quarters and years
SELECT bucket_start AT TIME ZONE 'UTC' AS quarter_utc, quantity, events
  FROM billing.usage(603, '2024-12-01', '2026-02-01', '3 months');
SELECT bucket_start AT TIME ZONE 'UTC' AS year_utc, quantity, events
  FROM billing.usage(603, '2024-12-01', '2026-02-01', '1 year');
RESET timezone;

-- compact_usage() folds the appended deltas into the packed store (a row
-- per account, meter, UTC day and dimension): nothing visible changes, for
-- any grain
CREATE TEMP TABLE before_compact AS
SELECT g.grain, u.*
  FROM (VALUES (NULL::interval), ('1 hour'), ('1 day')) g(grain),
       LATERAL billing.usage(601, :'t0'::timestamptz - interval '1 day', :'t0'::timestamptz + interval '1 day', g.grain) u;
SELECT count(*) > 0 AS some_deltas FROM billing.usage_deltas WHERE account_id = 601;
SELECT billing.compact_usage() > 0 AS merged;
SELECT count(*) AS deltas_left FROM billing.usage_deltas WHERE account_id = 601;
SELECT count(*) AS stored_buckets
  FROM billing.usage_days d, billing._day_cells(d.day, d.cells) c WHERE d.account_id = 601;
CREATE TEMP TABLE after_compact AS
SELECT g.grain, u.*
  FROM (VALUES (NULL::interval), ('1 hour'), ('1 day')) g(grain),
       LATERAL billing.usage(601, :'t0'::timestamptz - interval '1 day', :'t0'::timestamptz + interval '1 day', g.grain) u;
SELECT (SELECT count(*) FROM before_compact) AS rows_before,
       (SELECT count(*) FROM (TABLE before_compact EXCEPT ALL TABLE after_compact) x) AS lost,
       (SELECT count(*) FROM (TABLE after_compact EXCEPT ALL TABLE before_compact) x) AS gained;
-- new usage after a compaction adds to the compacted buckets, and a second
-- compaction merges it: a last value with a later timestamp wins, one with
-- an earlier timestamp does not, a tie goes to the later arrival
SELECT billing.record(601, 'rd_spans', 10, :'t0');
SELECT billing.record(601, 'rd_seats', 20, :'t0');
SELECT billing.record(601, 'rd_plan', 9, :'t0'::timestamptz + interval '40 min 29 s');
SELECT billing.record(601, 'rd_plan', 8, :'t0'::timestamptz + interval '1 h 30 min');
SELECT * FROM test.show(601, :'t0') WHERE bucket IN ('00:00', '00:40', '01:30');
SELECT billing.compact_usage() AS merged;
SELECT billing.compact_usage() AS merged_again;
SELECT * FROM test.show(601, :'t0') WHERE bucket IN ('00:00', '00:40', '01:30');
SELECT * FROM test.show(601, :'t0', '1 hour');
-- usage_cells: every counter cell, compacted or not
SELECT billing.record(601, 'rd_spans', 1, :'t0');
SELECT meter, bucket_start - :'t0'::timestamptz AS bucket, quantity, events
  FROM billing.usage_cells WHERE account_id = 601 AND meter = 'rd_spans' AND bucket_start = :'t0'
 ORDER BY quantity;

-- purge_dedupe(as_of) removes the event ids whose dedupe window ended by
-- as_of and for which no report can be accepted any more (their late
-- window, plus the 5 minutes a report may be stamped ahead, has passed);
-- the id counts again afterwards.  (purge_dedupe never purges past now():
-- a future as_of would forget ids that still dedupe.  So the windows are
-- made to have passed by moving the claim back by them.)
SELECT billing.record(602, 'rd_calls', 1, :'t0', 'purge-me');
SELECT billing.record(602, 'rd_calls', 1, :'t0', 'purge-me');
SELECT billing.purge_dedupe(now()) >= 0 AS purged_now;
SELECT count(*) AS kept FROM billing.dedupe_keys WHERE account_id = 602 AND event_id = 'purge-me';
SELECT billing.record(602, 'rd_calls', 1, :'t0', 'purge-me');
SELECT billing.purge_dedupe(now() + interval '100 years') >= 0 AS purged_in_the_future;
SELECT count(*) AS still_kept FROM billing.dedupe_keys WHERE account_id = 602 AND event_id = 'purge-me';
UPDATE billing.dedupe_keys
   SET expires_at = expires_at - (SELECT greatest(dedupe_window, late_window + interval '5 minutes')
                                    FROM billing.meters WHERE meter = 'rd_calls') - interval '1 second'
 WHERE account_id = 602 AND event_id = 'purge-me';
SELECT billing.purge_dedupe(now()) > 0 AS purged_later;
SELECT count(*) AS kept FROM billing.dedupe_keys WHERE account_id = 602 AND event_id = 'purge-me';
SELECT billing.record(602, 'rd_calls', 1, :'t0', 'purge-me');
SELECT billing.record(602, 'rd_calls', 1, :'t0', 'purge-me');
SELECT * FROM test.show(602, :'t0', NULL, 'rd_calls');
-- a key is kept at least dedupe_window: expired but not yet purged, it
-- still dedupes (rd_once has a dedupe window of 0).  And purge_dedupe keeps
-- it while a report stamped t0 can still be accepted, whatever the dedupe
-- window says: rd_once accepts reports 100 years late, so a resend is
-- never counted twice.
INSERT INTO billing.meters (meter, dedupe_window, late_window) VALUES ('rd_once', '0', '100 years');
SELECT billing.record(602, 'rd_once', 1, :'t0', 'zero-1');
SELECT billing.record(602, 'rd_once', 1, :'t0', 'zero-1');
SELECT billing.purge_dedupe() >= 0 AS purged;
SELECT count(*) AS kept FROM billing.dedupe_keys WHERE account_id = 602 AND event_id = 'zero-1';
SELECT billing.record(602, 'rd_once', 1, :'t0', 'zero-1');
SELECT * FROM test.show(602, :'t0', NULL, 'rd_once');

-- errors ---------------------------------------------------------------------
-- a grain that is not a positive interval of days and time, or of whole
-- months: 22023; NULL account or range: 22004.  The arguments are checked
-- whether or not the range holds usage.
SELECT * FROM billing.usage(601, :'t0', :'t0'::timestamptz + interval '1 hour', '0');
SELECT * FROM billing.usage(601, :'t0', :'t0'::timestamptz + interval '1 hour', '-1 hour');
SELECT * FROM billing.usage(601, :'t0', :'t0'::timestamptz + interval '1 hour', '1 month 1 day');
SELECT * FROM billing.usage(601, :'t0', :'t0'::timestamptz + interval '1 hour', '1 month 1 hour');
-- (the message of these is shown above; here only the SQLSTATE)
SELECT test.sqlstate_of($$SELECT * FROM billing.usage(601, '2001-01-01', '2001-01-02', '-1 hour')$$) AS empty_range_negative,
       test.sqlstate_of($$SELECT * FROM billing.usage(601, '2001-01-01', '2001-01-02', '1 month 1 day')$$) AS empty_range_mixed,
       test.sqlstate_of($$SELECT * FROM billing.usage(999, '2001-01-01', '2001-01-02', '-1 day')$$) AS unknown_account;
SELECT test.sqlstate_of(format('SELECT * FROM billing.usage(NULL, %L, %L)', :'t0', :'d0')) AS null_account,
       test.sqlstate_of(format('SELECT * FROM billing.usage(601, NULL, %L)', :'t0')) AS null_from,
       test.sqlstate_of(format('SELECT * FROM billing.usage(601, %L, NULL)', :'t0')) AS null_to;
