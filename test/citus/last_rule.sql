-- last_rule on one node and on the Citus cluster (test/citus/run.sh runs it
-- on both after the scenarios; both outputs must equal last_rule.out): the
-- tie rule of last meters (SPEC section 2, src/agg.c) on every read path:
-- raw and rolled-up usage, period totals, invoice_preview, uncompacted,
-- compacted and mixed, and rerate.  The pgTAP test last_rule.sql pins the
-- same on one node.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET timezone = 'UTC';
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES ('lr_last', 'last', '100 years');
INSERT INTO billing.plans (plan, currency) VALUES ('lr_plan', 'USD');
INSERT INTO billing.charges (plan, meter, price, valid_from, description) VALUES
    ('lr_plan', 'lr_last', 'unit 1', '-infinity', 'Seats');
INSERT INTO billing.accounts (account_id, currency) VALUES (990001, 'USD');
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
    VALUES (990001, 'lr_plan', '2024-01-01 00:00+00');

\set reads 'SELECT string_agg(path || \'=\' || quantity, \' \' ORDER BY path) AS reads FROM (SELECT \'raw\' AS path, u.quantity FROM billing.usage(990001, \'2024-01-10\', \'2024-01-11\', NULL, \'lr_last\') u UNION ALL SELECT \'usage \' || g, u.quantity FROM unnest(ARRAY[interval \'1 hour\', \'1 day\', \'1 month\']) g, billing.usage(990001, \'2024-01-01\', \'2024-02-01\', g, \'lr_last\') u UNION ALL SELECT \'totals\', t.quantity FROM billing._usage_totals_many(ARRAY[990001::bigint], ARRAY[timestamptz \'2024-01-01\'], ARRAY[timestamptz \'2024-02-01\']) t WHERE t.meter = \'lr_last\' UNION ALL SELECT \'preview\', p.quantity FROM billing.invoice_preview(990001, \'2024-01-20\') p WHERE p.kind = \'usage\' AND p.meter = \'lr_last\') x'

\echo one statement, a tie: the later report (3)
SELECT accepted FROM billing.ingest('lr', 0, 1, ARRAY[990001, 990001]::bigint[], ARRAY['lr_last', 'lr_last'],
                                    ARRAY[5, 3]::numeric[],
                                    ARRAY['2024-01-10 10:00:30+00', '2024-01-10 10:00:30+00']::timestamptz[]);
:reads;
\echo a later statement, a tie: the later arrival (2); an earlier timestamp arriving later: not
SELECT billing.record(990001, 'lr_last', 2, '2024-01-10 10:00:30+00') IS NOT NULL AS recorded;
SELECT billing.record(990001, 'lr_last', 100, '2024-01-10 10:00:10+00') IS NOT NULL AS recorded;
:reads;
\echo compacted
SELECT billing.compact_usage() > 0 AS compacted;
:reads;
\echo mixed: a tie after compaction wins (7)
SELECT billing.record(990001, 'lr_last', 7, '2024-01-10 10:00:30+00') IS NOT NULL AS recorded;
:reads;
SELECT billing.compact_usage() > 0 AS compacted;
:reads;
\echo rerate: January billed 7, then a tie arrives with 4
SELECT total FROM billing.finalize_invoices('2024-02-02 00:00+00') WHERE account_id = 990001;
SELECT billing.record(990001, 'lr_last', 4, '2024-01-10 10:00:30+00') IS NOT NULL AS recorded;
SELECT r.billed_quantity, r.correct_quantity, r.delta
  FROM billing.rerate('2024-01-01', '2024-02-01', 990001, true) r WHERE r.meter = 'lr_last';
SELECT billing.compact_usage() > 0 AS compacted;
SELECT r.billed_quantity, r.correct_quantity, r.delta
  FROM billing.rerate('2024-01-01', '2024-02-01', 990001, true) r WHERE r.meter = 'lr_last';
