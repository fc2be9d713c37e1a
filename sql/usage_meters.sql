-- usage_meters: meters and accounts are ordinary tables (SPEC section 2).
-- Shows their defaults, the CHECK constraints that keep them sane, that a
-- change to a meter takes effect at once, and the guard that refuses (55000)
-- to change a meter's name, aggregation or bucket width, or to delete it,
-- once usage was counted against it: that would reinterpret counted usage.

-- usage is stamped relative to t0, a fixed whole hour (the meters accept
-- reports 100 years late), so that no output depends on the clock
SELECT timestamptz '2025-03-12 09:00+00' AS t0 \gset

-- defaults: sum per minute, 35 days late window and dedupe window, no unit
INSERT INTO billing.meters (meter) VALUES ('mt_default');
SELECT meter, aggregation, bucket_width, late_window, dedupe_window, unit
  FROM billing.meters WHERE meter = 'mt_default';
INSERT INTO billing.meters (meter, aggregation, bucket_width, unit, late_window) VALUES
    ('mt_errors', 'sum', '1 minute', 'errors', '100 years'),
    ('mt_seats', 'max', '1 hour', 'seats', '100 years'),
    ('mt_plan', 'last', '1 day', NULL, '100 years'),
    ('mt_calls', 'count', '5 minutes', 'calls', '100 years');
SELECT meter, aggregation, bucket_width, unit
  FROM billing.meters WHERE meter LIKE 'mt\_%' ORDER BY meter;

-- meter names: not empty, shorter than 64 bytes, unique
INSERT INTO billing.meters (meter) VALUES ('');
INSERT INTO billing.meters (meter) VALUES (repeat('m', 64));
INSERT INTO billing.meters (meter) VALUES (repeat('m', 63));
INSERT INTO billing.meters (meter) VALUES ('mt_errors');
DELETE FROM billing.meters WHERE meter = repeat('m', 63);
-- the four aggregations only
INSERT INTO billing.meters (meter, aggregation) VALUES ('mt_bad', 'avg');
INSERT INTO billing.meters (meter, aggregation) VALUES ('mt_bad', NULL);
-- a positive bucket width without months or years (months vary in length)
INSERT INTO billing.meters (meter, bucket_width) VALUES ('mt_bad', '0');
INSERT INTO billing.meters (meter, bucket_width) VALUES ('mt_bad', '-1 minute');
INSERT INTO billing.meters (meter, bucket_width) VALUES ('mt_bad', '1 month');
INSERT INTO billing.meters (meter, bucket_width) VALUES ('mt_bad', '1 year');
-- windows may be zero, never negative
INSERT INTO billing.meters (meter, late_window) VALUES ('mt_bad', '-1 day');
INSERT INTO billing.meters (meter, dedupe_window) VALUES ('mt_bad', '-1 second');
INSERT INTO billing.meters (meter, late_window, dedupe_window) VALUES ('mt_zero', '0', '0');
SELECT meter, late_window, dedupe_window FROM billing.meters WHERE meter = 'mt_zero';
SELECT count(*) AS bad_meters FROM billing.meters WHERE meter = 'mt_bad';

-- accounts: positive ids (0 is the catalog audit chain), ISO currency codes
INSERT INTO billing.accounts (account_id, name) VALUES (101, 'Acme');
SELECT account_id, currency, name FROM billing.accounts WHERE account_id = 101;
INSERT INTO billing.accounts (account_id, currency) VALUES (102, 'EUR');
INSERT INTO billing.accounts (account_id) VALUES (0);
INSERT INTO billing.accounts (account_id) VALUES (-5);
INSERT INTO billing.accounts (account_id, currency) VALUES (103, 'eur');
INSERT INTO billing.accounts (account_id, currency) VALUES (103, 'EURO');
INSERT INTO billing.accounts (account_id) VALUES (101);
INSERT INTO billing.accounts (account_id) VALUES (NULL);

-- a meter without usage can be changed freely ...
UPDATE billing.meters SET aggregation = 'max', bucket_width = '1 hour' WHERE meter = 'mt_default';
UPDATE billing.meters SET meter = 'mt_renamed' WHERE meter = 'mt_default';
DELETE FROM billing.meters WHERE meter = 'mt_renamed';
-- ... and the change is used at once: mt_errors becomes a max meter
UPDATE billing.meters SET aggregation = 'max' WHERE meter = 'mt_errors';
SELECT billing.record(101, 'mt_errors', 3, :'t0');
SELECT billing.record(101, 'mt_errors', 7, :'t0');
SELECT billing.record(101, 'mt_errors', 5, :'t0');
SELECT meter, bucket_start - :'t0'::timestamptz AS bucket, quantity, events
  FROM billing.usage(101, :'t0', :'t0'::timestamptz + interval '1 day', meter => 'mt_errors');

-- once it has usage, the name, aggregation and bucket width are fixed
UPDATE billing.meters SET aggregation = 'sum' WHERE meter = 'mt_errors';
UPDATE billing.meters SET bucket_width = '1 hour' WHERE meter = 'mt_errors';
UPDATE billing.meters SET meter = 'mt_errors2' WHERE meter = 'mt_errors';
DELETE FROM billing.meters WHERE meter = 'mt_errors';
DELETE FROM billing.meters WHERE meter LIKE 'mt\_%';
-- a statement that refuses changes nothing: every mt_ meter is still there
SELECT meter, aggregation, bucket_width FROM billing.meters
 WHERE meter LIKE 'mt\_%' ORDER BY meter;
-- TRUNCATE deletes every meter at once: it is refused as well
BEGIN;
-- (plainly because charges reference meters: 0A000; with CASCADE, by the guard: 55000)
SELECT test.sqlstate_of('TRUNCATE billing.meters') AS truncate_meters;
SELECT test.sqlstate_of('TRUNCATE billing.meters CASCADE') AS truncate_meters_cascade;
ROLLBACK;
SELECT count(*) AS mt_meters FROM billing.meters WHERE meter LIKE 'mt\_%';
-- the unit, the late window and the dedupe window may change at any time
UPDATE billing.meters SET unit = 'exceptions', late_window = '1 hour', dedupe_window = '1 day'
 WHERE meter = 'mt_errors';
SELECT meter, aggregation, bucket_width, late_window, dedupe_window, unit
  FROM billing.meters WHERE meter = 'mt_errors';
-- and a new late window applies at once: t0 is more than an hour ago
SELECT test.sqlstate_of(format('SELECT billing.record(101, %L, 1, %L)', 'mt_errors', :'t0'))
       AS too_late;
-- setting the same aggregation again is not a change
UPDATE billing.meters SET aggregation = 'max', bucket_width = '1 minute' WHERE meter = 'mt_errors';

-- the guard still holds after the usage was compacted into the bucket table
SELECT billing.compact_usage() >= 0 AS compacted;
DELETE FROM billing.meters WHERE meter = 'mt_errors';
SELECT meter, bucket_start - :'t0'::timestamptz AS bucket, quantity, events
  FROM billing.usage(101, :'t0', :'t0'::timestamptz + interval '1 day', meter => 'mt_errors');
