-- compact_shards on one node and on the Citus cluster (test/citus/run.sh
-- runs it on both, in a database of its own, and the two outputs must be the
-- same): compaction on the workers, each over its own shards (issue 16 part
-- 3), keeps every read exact.  Meters of every aggregation (sum, max, last,
-- count, unique), three rounds of usage each compacted another way on the
-- cluster: by compact_usage() called on each worker node directly (its own
-- shards), by compact_usage() on the coordinator (every node over its own
-- shards, at once), and by compact_usage() in a transaction block on the
-- coordinator (SQL through the coordinator); the reads are printed
-- uncompacted, compacted and mixed.  One node compacts with compact_usage()
-- each time.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET timezone = 'UTC';
CREATE EXTENSION billing;
\if :citus
SELECT count(*) > 0 AS distributed FROM billing.distribute() \gset
\endif
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('cs_sum', 'sum', '100 years'), ('cs_max', 'max', '100 years'),
    ('cs_last', 'last', '100 years'), ('cs_count', 'count', '100 years'),
    ('cs_uniq', 'unique', '100 years');
INSERT INTO billing.plans (plan, currency) VALUES ('cs_plan', 'USD');
INSERT INTO billing.charges (plan, meter, price, valid_from, description)
SELECT 'cs_plan', m, 'unit 0.5', '-infinity', m
  FROM unnest(ARRAY['cs_sum', 'cs_max', 'cs_last', 'cs_count', 'cs_uniq']) m;
INSERT INTO billing.accounts (account_id, currency) SELECT a, 'USD' FROM generate_series(1, 40) a;
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
SELECT a, 'cs_plan', '2024-03-01 00:00+00' FROM generate_series(1, 40) a;

-- round R of usage: every account, every meter, minutes over two days (the
-- second round reaches into the days the first wrote, the third adds a day)
\set usage 'SELECT sum(n) AS accepted FROM (SELECT (billing.ingest(\'cs\', :round, 1, array_agg(a ORDER BY i), array_agg(m ORDER BY i), array_agg(q ORDER BY i), array_agg(t ORDER BY i), NULL, array_agg(d ORDER BY i))).accepted AS n FROM (SELECT row_number() OVER (ORDER BY a, k, m) AS i, a, m, ((a * 7 + k * 13 + :round) % 50 + 1)::numeric AS q, timestamptz \'2024-03-10 00:00+00\' + (:round - 1) * interval \'1 day\' + ((a * 31 + k * 17) % 2880) * interval \'1 minute\' AS t, CASE WHEN m = \'cs_uniq\' THEN \'user\' || ((a + k) % 9) ELSE \'\' END AS d FROM generate_series(1, 40) a, generate_series(1, 12) k, unnest(ARRAY[\'cs_sum\', \'cs_max\', \'cs_last\', \'cs_count\', \'cs_uniq\']) m) x) y'

-- the reads: usage at raw grain and rolled up, period totals and the
-- preview of every account; a digest per read and the totals per meter
\set reads 'SELECT \'raw\' AS read, md5(string_agg(u::text, \',\' ORDER BY a, u.meter, u.dimension, u.bucket_start)) FROM generate_series(1, 40) a, billing.usage(a, \'2024-03-01\', \'2024-04-01\') u UNION ALL SELECT \'hourly\', md5(string_agg(u::text, \',\' ORDER BY a, u.meter, u.dimension, u.bucket_start)) FROM generate_series(1, 40) a, billing.usage(a, \'2024-03-01\', \'2024-04-01\', \'1 hour\') u UNION ALL SELECT \'daily\', md5(string_agg(u::text, \',\' ORDER BY a, u.meter, u.dimension, u.bucket_start)) FROM generate_series(1, 40) a, billing.usage(a, \'2024-03-01\', \'2024-04-01\', \'1 day\') u UNION ALL SELECT \'totals\', md5(string_agg(t::text, \',\' ORDER BY t.idx, t.meter, t.dimension)) FROM billing._usage_totals_many(ARRAY(SELECT generate_series(1, 40)::bigint), array_fill(timestamptz \'2024-03-01\', ARRAY[40]), array_fill(timestamptz \'2024-04-01\', ARRAY[40])) t UNION ALL SELECT \'preview\', md5(string_agg(p::text, \',\' ORDER BY a, p.line_no)) FROM generate_series(1, 40) a, billing.invoice_preview(a, \'2024-03-20\') p'
\set per_meter 'SELECT u.meter, sum(u.quantity) AS quantity, sum(u.events) AS events FROM generate_series(1, 40) a, billing.usage(a, \'2024-03-01\', \'2024-04-01\', \'1 month\') u GROUP BY u.meter ORDER BY u.meter'
\set stored 'SELECT (SELECT count(*) FROM billing.usage_deltas d, billing._delta_cells(d.cells)) AS delta_cells, (SELECT count(*) FROM billing.usage_days d, billing._day_cells(d.day, d.cells)) AS stored_cells'

\echo round 1, uncompacted
\set round 1
:usage;
:reads;
:per_meter;
\echo compacted on each worker node over its own shards (one node: compact_usage)
\if :citus
SELECT sum(result::bigint) AS folded, bool_and(success) AS ok
  FROM run_command_on_workers('SELECT billing.compact_usage()');
\else
SELECT billing.compact_usage() AS folded, true AS ok;
\endif
:stored;
:reads;

\echo round 2 into the same days: compacted and uncompacted mixed
\set round 2
:usage;
:reads;
:per_meter;
\echo compacted from the coordinator, every node over its own shards at once
SELECT billing.compact_usage() AS folded;
:stored;
:reads;
:per_meter;

\echo round 3, mixed again; compacted in a transaction block (through the coordinator on Citus)
\set round 3
:usage;
:reads;
BEGIN;
SELECT billing.compact_usage() AS folded;
COMMIT;
:stored;
:reads;
:per_meter;
\echo nothing left to compact
SELECT billing.compact_usage() AS folded;
