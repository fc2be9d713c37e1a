-- After the update of a 1.0 database (test/citus/update_10.sql): on the
-- cluster distribute() again (it distributes the tables 1.1 added and
-- registers the functions the update created again), then the history goes
-- on with 1.1 (usage, also through the metered table, a credit, finalize,
-- a correction and its rerate) and everything must verify.
-- test/citus/run.sh compares the output of one node and of the cluster.
\set ON_ERROR_STOP 1
SET TimeZone = 'UTC';
\if :citus
SELECT count(*) > 0 AS distributed FROM billing.distribute() \gset
\endif
SELECT count(*) AS audit_problems FROM billing.verify_audit_log();
SELECT count(*) AS invoice_problems FROM billing.verify_invoices();
SELECT count(*) AS recorded
  FROM (SELECT billing.record(a, 'api_calls', a + h, '2024-01-02 17:00+00'::timestamptz + h * interval '1 hour',
                              'f' || a || '-' || h)
          FROM generate_series(1, 6) a, generate_series(0, 20) h) x;
-- the metered table 1.0's meter_table set up counts on (a repeated event id
-- once; quiet: Citus reports the rows it sent, not those the trigger kept)
\set QUIET on
INSERT INTO ev SELECT a, 'api_calls', 1000, '2024-01-02 20:30+00', 'ev2-' || a FROM generate_series(1, 6) a;
INSERT INTO ev SELECT a, 'api_calls', 1000, '2024-01-02 20:30+00', 'ev2-' || a FROM generate_series(1, 2) a;
\set QUIET off
SELECT count(*) AS metered_rows FROM ev;
SELECT a, u.quantity FROM generate_series(1, 6) a,
       billing.usage(a, '2024-01-02 20:00+00', '2024-01-02 21:00+00', meter => 'api_calls') u
 ORDER BY 1;
SELECT billing.grant_credit(5, 40, '2024-01-01 00:00+00', reason => 'welcome') > 0 AS granted;
SELECT account_id, period_start, total FROM billing.finalize_invoices('2024-01-03 12:00+00') ORDER BY 1, 2;
SELECT billing.correct_usage(3, 'api_calls', '2024-01-02 18:00+00', 5, 'late fix');
SELECT account_id, invoice_id, meter, delta FROM billing.rerate('2024-01-02', '2024-01-03', reason => 'fix') ORDER BY 1, 2, 3;
SELECT account_id, invoice_id, line_no, kind, meter, description, quantity, amount
  FROM billing.invoice_lines WHERE invoice_id > 6 ORDER BY 1, 2, 3;
SELECT account_id, action, count(*) FROM billing.audit_log GROUP BY 1, 2 ORDER BY 1, 2;
SELECT count(*) AS audit_problems FROM billing.verify_audit_log();
SELECT count(*) AS invoice_problems FROM billing.verify_invoices();
