-- cell_table: the cell table of a statement holds work_mem / 64 bytes of
-- counter cells (src/ingest.h, BucketAcc), filled to about 90% before a
-- flush in the middle of the statement; a statement whose distinct cells
-- fit is written once, each cell in one delta row, however many rows
-- repeat them; one that does not fit is flushed in the middle and still
-- counts every row once.
BEGIN;
SELECT plan(5);

INSERT INTO billing.accounts (account_id) SELECT 7600 + a FROM generate_series(1, 100) a;
INSERT INTO billing.meters (meter, bucket_width, late_window) VALUES ('ct_m', '1 minute', '100 years');
CREATE TABLE pg_temp.ct_t (account_id bigint, meter text, quantity numeric, ts timestamptz);
SELECT billing.meter_table('pg_temp.ct_t', 'account_id', 'meter', 'quantity', 'ts', keep_rows => false);
-- the delta cells of the test's accounts
CREATE FUNCTION pg_temp.delta_cells() RETURNS bigint LANGUAGE sql AS
$$SELECT count(*) FROM billing.usage_deltas d, billing._delta_rows(d.account_id, d.seq, d.cells, NULL) c
   WHERE c.account_id BETWEEN 7601 AND 7700$$;

-- 12,000 distinct cells (100 accounts x 120 minutes), each reported 3
-- times, the 36,000 rows in a shuffled order; 1MB holds 16,384 cells
SET LOCAL work_mem = '1MB';
SAVEPOINT s;
INSERT INTO pg_temp.ct_t
SELECT 7601 + (k % 100), 'ct_m', 1, timestamptz '2025-03-12 08:00+00' + (k / 100) * interval '1 minute'
  FROM generate_series(0, 35999) i, LATERAL (SELECT i % 12000 AS k) x
 ORDER BY md5(i::text);
SELECT is(pg_temp.delta_cells(), 12000::bigint,
          '12,000 distinct cells fit in the cell table of 1MB: each is written once');
SELECT is((SELECT sum(events) FROM billing.usage_deltas d, billing._delta_rows(d.account_id, d.seq, d.cells, NULL) c
            WHERE c.account_id BETWEEN 7601 AND 7700), 36000::numeric, 'and the 36,000 rows counted once');
ROLLBACK TO SAVEPOINT s;

-- 30,000 distinct cells do not fit: a flush in the middle, every row once
INSERT INTO pg_temp.ct_t
SELECT 7601 + (k % 100), 'ct_m', 1, timestamptz '2025-03-12 08:00+00' + (k / 100) * interval '1 minute'
  FROM generate_series(0, 59999) i, LATERAL (SELECT i % 30000 AS k) x
 ORDER BY md5(i::text);
SELECT cmp_ok(pg_temp.delta_cells(), '>', 30000::bigint, '30,000 distinct cells do not fit: some are written twice');
SELECT is((SELECT sum(events) FROM billing.usage_deltas d, billing._delta_rows(d.account_id, d.seq, d.cells, NULL) c
            WHERE c.account_id BETWEEN 7601 AND 7700), 60000::numeric, 'and the 60,000 rows counted once');
SELECT is((SELECT sum(u.events) FROM generate_series(7601, 7700) a, billing.usage(a, '2025-03-12', '2025-03-13') u),
          60000::numeric, 'as usage() reads them');

SELECT * FROM finish();
ROLLBACK;
