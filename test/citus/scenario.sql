-- One realistic billing scenario, run by test/citus/run.sh once on a single
-- node and once on a Citus cluster (through the coordinator); the two
-- outputs must be identical.  Variables: t0 (a fixed hour, the same in both
-- runs), csv (a file of metered rows), citus (true on the cluster).
--
-- Every result is printed in a canonical order, with the values that
-- legitimately differ between the runs (invoice and adjustment numbers
-- from sequences, wall-clock stamps) replaced by what they identify.
\set ON_ERROR_STOP 1
\pset footer off
SET TimeZone = 'UTC';

CREATE EXTENSION billing;
\if :citus
SELECT count(*) > 0 AS distributed FROM billing.distribute() \gset
\endif

-- reference data: 4 meters, 2 daily plans, 60 accounts
INSERT INTO billing.meters (meter, aggregation) VALUES
    ('error', 'sum'), ('span', 'sum'), ('replay', 'count'), ('seats', 'max');
INSERT INTO billing.plans (plan, period) VALUES ('team', '1 day'), ('business', '1 day');
INSERT INTO billing.charges (plan, meter, price, valid_from, description) VALUES
    ('team', NULL, 'flat 29', '-infinity', 'base fee'),
    ('team', 'error', 'graduated 50 @ 0 | 1000 @ 0.0029 | inf @ 0.0019', '-infinity', NULL),
    ('team', 'span', 'package 100 @ 0.5', '-infinity', NULL),
    ('team', 'replay', 'unit 0.003', '-infinity', NULL),
    ('business', NULL, 'flat 89', '-infinity', 'base fee'),
    ('business', 'error', 'volume 500 @ 0.002 | inf @ 0.0015', '-infinity', NULL),
    ('business', 'seats', 'unit 12 min 24', '-infinity', NULL);
INSERT INTO billing.accounts (account_id, name)
    SELECT a, 'org ' || a FROM generate_series(1, 60) a;
INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap)
    SELECT a, CASE WHEN a % 3 = 0 THEN 'business' ELSE 'team' END,
           date_trunc('day', :'t0'::timestamptz) - interval '3 days',
           CASE WHEN a % 7 = 0 THEN 2 END
      FROM generate_series(1, 60) a;

-- 1. metered COPY: raw events kept, duplicates dropped
CREATE TABLE events (account_id bigint NOT NULL, meter text NOT NULL, quantity numeric NOT NULL,
                     ts timestamptz NOT NULL, event_id text);
\if :citus
SELECT create_distributed_table('events', 'account_id', colocate_with => 'billing.accounts') \gset
\endif
SELECT billing.meter_table('events', 'account_id', 'meter', 'quantity', 'ts', 'event_id');
\set copy_events '\\copy events FROM ' :'csv' ' WITH (FORMAT csv)'
-- (quietly: on Citus the COPY tag counts the rows sent to the shards, not
-- the rows stored; the count below is what both runs must agree on)
\set QUIET on
:copy_events
-- the same file again: every row is a duplicate
:copy_events
\set QUIET off
SELECT count(*) AS stored_events, count(DISTINCT (account_id, meter, event_id)) AS distinct_ids
  FROM events;

-- 2. record() with duplicates, one call per statement (pushed down on Citus)
SELECT billing.record(5, 'error', 3, :'t0'::timestamptz - interval '30 hours', 'r-1') AS counted;
SELECT billing.record(5, 'error', 3, :'t0'::timestamptz - interval '30 hours', 'r-1') AS counted;
SELECT billing.record(6, 'seats', 4, :'t0'::timestamptz - interval '40 hours') AS counted;
SELECT billing.record(6, 'seats', 2, :'t0'::timestamptz - interval '40 hours') AS counted;
-- and inside one transaction (run on the coordinator on Citus)
BEGIN;
SELECT count(*) FILTER (WHERE billing.record(a % 60 + 1, 'replay', 1,
                                             :'t0'::timestamptz - interval '1 hour' * (a % 50),
                                             'rep-' || (a % 300))) AS counted
  FROM generate_series(1, 1000) a;
COMMIT;

-- 3. ingest batches exactly once per offset, spanning accounts and shards
SELECT * FROM billing.ingest('kafka', 0, 1,
    (SELECT array_agg(a % 60 + 1 ORDER BY a) FROM generate_series(1, 500) a),
    (SELECT array_agg(CASE WHEN a % 2 = 0 THEN 'error' ELSE 'span' END ORDER BY a) FROM generate_series(1, 500) a),
    (SELECT array_agg((a % 13)::numeric ORDER BY a) FROM generate_series(1, 500) a),
    (SELECT array_agg(:'t0'::timestamptz - interval '7 minutes' * a ORDER BY a) FROM generate_series(1, 500) a),
    (SELECT array_agg('k0-' || (a % 300) ORDER BY a) FROM generate_series(1, 500) a));
-- a replayed batch changes nothing
SELECT * FROM billing.ingest('kafka', 0, 1, ARRAY[1::bigint], ARRAY['error'], ARRAY[100::numeric],
                             ARRAY[:'t0'::timestamptz - interval '1 hour']);
SELECT * FROM billing.ingest('kafka', 1, 7,
    (SELECT array_agg(a % 60 + 1 ORDER BY a) FROM generate_series(1, 300) a),
    (SELECT array_agg('seats'::text ORDER BY a) FROM generate_series(1, 300) a),
    (SELECT array_agg((a % 11)::numeric ORDER BY a) FROM generate_series(1, 300) a),
    (SELECT array_agg(:'t0'::timestamptz - interval '13 minutes' * a ORDER BY a) FROM generate_series(1, 300) a));
-- a bad batch (unknown account) changes nothing, not even the offset
\set ON_ERROR_STOP 0
SELECT * FROM billing.ingest('kafka', 0, 2, ARRAY[1::bigint, 999], ARRAY['error', 'error'],
                             ARRAY[1::numeric, 1], ARRAY[:'t0'::timestamptz, :'t0'::timestamptz]);
\set ON_ERROR_STOP 1
SELECT source, partition, last_offset FROM billing.ingest_offsets ORDER BY 1, 2;

-- usage as counted so far
SELECT 'check:usage' AS check, sum(quantity) AS quantity, sum(events) AS events,
       md5(string_agg(format('%s/%s/%s/%s/%s', a, meter, bucket_start, quantity, events),
                      ',' ORDER BY a, meter, bucket_start)) AS digest
  FROM generate_series(1, 60) a,
       LATERAL billing.usage(a, :'t0'::timestamptz - interval '4 days',
                             :'t0'::timestamptz + interval '1 hour', '1 hour') u;
SELECT * FROM billing.usage(7, :'t0'::timestamptz - interval '4 days',
                            :'t0'::timestamptz + interval '1 hour', '1 day');

-- compaction folds the deltas into buckets and hour and day roll-ups;
-- usage reads the same afterwards
SELECT billing.compact_usage() > 0 AS compacted;
SELECT count(*) AS deltas_left FROM billing.usage_deltas;
SELECT 'check:usage_compacted' AS check, sum(quantity) AS quantity, sum(events) AS events,
       md5(string_agg(format('%s/%s/%s/%s/%s', a, meter, bucket_start, quantity, events),
                      ',' ORDER BY a, meter, bucket_start)) AS digest
  FROM generate_series(1, 60) a,
       LATERAL billing.usage(a, :'t0'::timestamptz - interval '4 days',
                             :'t0'::timestamptz + interval '1 hour', '1 hour') u;

-- 4. finalize the closed days (twice: idempotent)
SELECT count(*) AS invoices, sum(total) AS total
  FROM billing.finalize_invoices(:'t0'::timestamptz);
SELECT count(*) AS invoices_again FROM billing.finalize_invoices(:'t0'::timestamptz);
SELECT line_no, kind, meter, regexp_replace(description, 'invoice [0-9]+', 'invoice #') AS description,
       period_start, period_end, quantity, amount
  FROM billing.invoice_preview(9, :'t0'::timestamptz);

-- 5. the past changes: late usage, a correction, a retroactive price
SELECT billing.record(9, 'error', 2500, date_trunc('day', :'t0'::timestamptz) - interval '20 hours',
                      'late-1') AS counted;
SELECT billing.correct_usage(10, 'error',
                             date_trunc('day', :'t0'::timestamptz) - interval '30 hours',
                             5, 'collector outage, restated');
INSERT INTO billing.charges (plan, meter, price, valid_from) VALUES
    ('team', 'error', 'graduated 50 @ 0 | 1000 @ 0.0025 | inf @ 0.0015',
     date_trunc('day', :'t0'::timestamptz) - interval '2 days');
SELECT count(*) AS dry_run_rows, sum(delta) AS dry_run_delta
  FROM billing.rerate(date_trunc('day', :'t0'::timestamptz) - interval '3 days', :'t0'::timestamptz,
                      dry_run => true);
SELECT count(*) AS rerated, sum(delta) AS delta
  FROM billing.rerate(date_trunc('day', :'t0'::timestamptz) - interval '3 days', :'t0'::timestamptz);
SELECT count(*) AS rerated_again
  FROM billing.rerate(date_trunc('day', :'t0'::timestamptz) - interval '3 days', :'t0'::timestamptz);
SELECT line_no, kind, meter, regexp_replace(description, 'invoice [0-9]+', 'invoice #') AS description,
       period_start, period_end, quantity, amount
  FROM billing.invoice_preview(9, :'t0'::timestamptz);
-- the next day carries the adjustments
SELECT count(*) AS invoices, sum(total) AS total
  FROM billing.finalize_invoices(date_trunc('day', :'t0'::timestamptz) + interval '1 day 2 hours');
SELECT billing.remaining(14, 'error', :'t0'::timestamptz) AS remaining_14;

-- what both runs must agree on
SELECT 'check:invoices' AS check, count(*) AS n, sum(total) AS total,
       md5(string_agg(format('%s/%s/%s/%s/%s/%s', account_id, period_start, period_end, currency,
                             total, status), ',' ORDER BY account_id, period_start)) AS digest
  FROM billing.invoices;
SELECT 'check:invoice_lines' AS check, count(*) AS n, sum(l.amount) AS amount,
       md5(string_agg(format('%s/%s/%s/%s/%s/%s/%s/%s', l.account_id, i.period_start, l.line_no,
                             l.kind, l.meter, regexp_replace(l.description, 'invoice [0-9]+', 'invoice #'),
                             l.quantity, l.amount),
                      ',' ORDER BY l.account_id, i.period_start, l.line_no)) AS digest
  FROM billing.invoice_lines l
       JOIN billing.invoices i ON i.account_id = l.account_id AND i.invoice_id = l.invoice_id;
SELECT 'check:adjustments' AS check, count(*) AS n, sum(a.delta) AS delta,
       md5(string_agg(format('%s/%s/%s/%s/%s/%s/%s/%s/%s', a.account_id, i.period_start, a.line_kind,
                             a.meter, a.old_quantity, a.new_quantity, a.old_amount, a.new_amount,
                             b.period_start),
                      ',' ORDER BY a.account_id, i.period_start, a.line_kind, a.meter)) AS digest
  FROM billing.adjustments a
       JOIN billing.invoices i ON i.account_id = a.account_id AND i.invoice_id = a.invoice_id
       LEFT JOIN billing.invoices b ON b.account_id = a.account_id AND b.invoice_id = a.billed_invoice_id;
SELECT l.account_id, i.period_start, l.line_no, l.kind, l.meter,
       regexp_replace(l.description, 'invoice [0-9]+', 'invoice #') AS description,
       l.quantity, l.amount
  FROM billing.invoice_lines l
       JOIN billing.invoices i ON i.account_id = l.account_id AND i.invoice_id = l.invoice_id
 WHERE l.account_id IN (9, 10, 21)
 ORDER BY 1, 2, 3;
SELECT 'check:verify_invoices' AS check, count(*) AS problems FROM billing.verify_invoices();

-- the audit log: every chain verifies, and the same rows were written
-- (actions and objects per chain, numbers from sequences replaced)
SELECT 'check:audit' AS check, count(*) AS problems FROM billing.verify_audit_log();
SELECT 'check:audit_rows' AS check, count(*) AS rows,
       md5(string_agg(format('%s/%s/%s/%s', a.account_id, a.seq, a.action,
                             regexp_replace(a.object, '[0-9]+$', '#')),
                      ',' ORDER BY a.account_id, a.seq)) AS digest
  FROM billing.audit_log a;
