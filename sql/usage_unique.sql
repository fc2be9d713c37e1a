-- Unique meters (issue 18, SPEC 10.1): aggregation 'unique' counts the
-- distinct dimension values reported in a period (monthly active users,
-- seats), exactly, whatever the grain.  The reported quantity is not used.
SET search_path = billing, public;
SET timezone = 'UTC';

INSERT INTO meters (meter, aggregation, late_window, unit) VALUES
    ('uu_mau', 'unique', '100 years', 'active users');
INSERT INTO accounts (account_id, name) VALUES (5701, 'Unique Ltd');
INSERT INTO plans (plan) VALUES ('uu_plan');
-- the first 3 active users of a month are free, then 2.00 each
INSERT INTO charges (plan, meter, price) VALUES ('uu_plan', 'uu_mau', 'graduated 3 @ 0 | inf @ 2');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5701, 'uu_plan', '2025-07-01');

-- the user is the dimension; alice is active on three days
SELECT count(*) FILTER (WHERE counted) AS counted FROM (
    SELECT record(5701, 'uu_mau', 1, ts::timestamptz, NULL, who) AS counted
      FROM (VALUES ('2025-07-01 09:00', 'alice'), ('2025-07-01 09:05', 'alice'),
                   ('2025-07-02 10:00', 'bob'), ('2025-07-09 11:00', 'carol'),
                   ('2025-07-15 12:00', 'alice'), ('2025-07-20 13:00', 'dave'),
                   ('2025-08-02 14:00', 'alice'), ('2025-08-03 15:00', 'erin')) AS r(ts, who)) x;

-- usage rolled up to a grain: per bucket, the distinct users in it (the
-- dimension column is NULL: the row counts every dimension); events counts
-- the reports
SELECT bucket_start, dimension IS NULL AS all_dimensions, quantity, events
  FROM usage(5701, '2025-07-01', '2025-09-01', '1 month', 'uu_mau');
SELECT bucket_start, quantity, events
  FROM usage(5701, '2025-07-01', '2025-08-01', '7 days', 'uu_mau');   -- bins from 1970-01-01, a Thursday
SELECT bucket_start, quantity FROM usage(5701, '2025-07-01', '2025-07-02', '1 day', 'uu_mau');

-- the July invoice: 4 active users, 1 over the 3 free ones
SELECT kind, meter, quantity, amount FROM invoice_preview(5701, '2025-07-20');

-- compaction keeps the distinct count of each billed period with usage,
-- which the preview reads instead of the month's cells
SET client_min_messages = warning;
SELECT compact_usage() > 0 AS compacted;
RESET client_min_messages;
SELECT meter, period_start, period_end, distinct_count FROM unique_periods WHERE account_id = 5701
 ORDER BY period_start;
SELECT dimension, first_bucket FROM unique_values
 WHERE account_id = 5701 AND period_start = '2025-07-01' ORDER BY first_bucket;

-- a report after the compaction counts at once: a new user (frank) adds
-- one, a known one (bob) nothing
SELECT record(5701, 'uu_mau', 1, '2025-07-25', NULL, 'frank') AS frank,
       record(5701, 'uu_mau', 1, '2025-07-26', NULL, 'bob') AS bob;
SELECT kind, meter, quantity, amount FROM invoice_preview(5701, '2025-07-20');

-- finalized, then late: gina, active on July 31, is reported after the invoice
SELECT count(*) AS invoices FROM finalize_invoices('2025-08-01 02:00') WHERE account_id = 5701;
SELECT record(5701, 'uu_mau', 1, '2025-07-31 23:00', NULL, 'gina') AS late;
SELECT meter, billed_quantity, correct_quantity, delta FROM rerate('2025-07-01', '2025-08-01', 5701);

-- a unique meter takes no corrections (its quantity is a count of values)
SELECT correct_usage(5701, 'uu_mau', '2025-07-02 10:00', 1, 'restated', 'bob');
