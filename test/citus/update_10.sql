-- The update of a 1.0 database (issue 15), run by test/citus/run.sh on one
-- node and on the Citus cluster (psql -v citus=false|true): billing 1.0,
-- distributed by 1.0's distribute() on the cluster, with a little history
-- (usage, also through a metered table, compaction, invoices, a usage
-- correction and its rerate).  The
-- update follows (ALTER EXTENSION billing UPDATE), then
-- test/citus/update_after.sql.
\set ON_ERROR_STOP 1
SET TimeZone = 'UTC';
CREATE EXTENSION billing VERSION '1.0';
\if :citus
SELECT set_config('citus.shard_count', '4', false) \gset
SELECT count(*) > 0 AS distributed FROM billing.distribute() \gset
\endif
INSERT INTO billing.meters (meter, late_window) VALUES ('api_calls', '100 years'), ('storage', '100 years');
UPDATE billing.meters SET aggregation = 'max' WHERE meter = 'storage';
INSERT INTO billing.plans (plan, period) VALUES ('daily', '1 day');
INSERT INTO billing.charges (plan, meter, price) VALUES ('daily', 'api_calls', 'unit 0.5'), ('daily', 'storage', 'unit 2');
INSERT INTO billing.charges (plan, price, description) VALUES ('daily', 'flat 3', 'base fee');
INSERT INTO billing.accounts (account_id) SELECT g FROM generate_series(1, 6) g;
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
SELECT g, 'daily', '2024-01-01 00:00+00' FROM generate_series(1, 6) g;
SELECT count(*) AS recorded
  FROM (SELECT billing.record(a, 'api_calls', a * 10 + h, '2024-01-01 00:00+00'::timestamptz + h * interval '1 hour',
                              'e' || a || '-' || h)
          FROM generate_series(1, 6) a, generate_series(0, 40) h) x;
SELECT count(*) AS recorded
  FROM (SELECT billing.record(a, 'storage', a + h, '2024-01-01 00:00+00'::timestamptz + h * interval '1 hour')
          FROM generate_series(1, 6) a, generate_series(0, 40) h) x;
-- a metered table (on the cluster distributed with the accounts)
CREATE TABLE ev (account_id bigint NOT NULL, meter text NOT NULL, quantity numeric NOT NULL,
                 ts timestamptz NOT NULL, event_id text);
\if :citus
SELECT create_distributed_table('ev', 'account_id', colocate_with => 'billing.accounts') \gset
\endif
SELECT billing.meter_table('ev', 'account_id', 'meter', 'quantity', 'ts', 'event_id');
INSERT INTO ev SELECT a, 'api_calls', 100, '2024-01-01 12:30+00', 'ev' || a FROM generate_series(1, 6) a;
SELECT billing.compact_usage() > 0 AS compacted;
SELECT count(*) AS invoices FROM billing.finalize_invoices('2024-01-02 12:00+00');
SELECT billing.correct_usage(2, 'api_calls', '2024-01-01 05:00+00', 7, 'late fix');
SELECT count(*) AS adjustments FROM billing.rerate('2024-01-01', '2024-01-02', reason => 'fix');
