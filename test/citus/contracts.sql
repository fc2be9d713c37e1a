-- Contracts on one node and on a Citus cluster (issue 17), run by
-- test/citus/run.sh after the seeded scenarios, in a database of its own on
-- each (psql -v citus=false|true); the outputs must be identical.  Credits with every key of the drawdown order, an expiring
-- promotion, a void, a prepaid commitment billed monthly with rollover, a
-- minimum with a true-up, plan changes in the middle of a month, a late
-- event re-rated onto the next invoice.  finalize_invoices goes through
-- _finalize_citus on the cluster and the set-based statement on one node;
-- invoice_preview and credit_balance run on the account's worker there.
-- Fixed times (2025); invoice and adjustment numbers masked.
\set ON_ERROR_STOP 1
\pset footer off
SET TimeZone = 'UTC';
CREATE EXTENSION billing;
\if :citus
SELECT set_config('citus.shard_count', '4', false) \gset
SELECT count(*) > 0 AS distributed FROM billing.distribute() \gset
\endif
SET search_path = billing, public;

INSERT INTO meters (meter, late_window) VALUES ('k_api', '100 years'), ('k_gb', '100 years');
INSERT INTO plans (plan) VALUES ('k_flat'), ('k_usage');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('k_flat', NULL, 'flat 100', 'Subscription'),
    ('k_usage', NULL, 'flat 10', 'Platform'),
    ('k_usage', 'k_api', 'graduated 1000 @ 0 | inf @ 0.01', 'API calls'),
    ('k_usage', 'k_gb', 'unit 0.5', 'Storage');
INSERT INTO accounts (account_id, name) SELECT a, 'contract ' || a FROM generate_series(101, 108) a;
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap)
SELECT a, CASE WHEN a % 2 = 0 THEN 'k_flat' ELSE 'k_usage' END, '2025-01-01',
       CASE WHEN a = 105 THEN 150 END
  FROM generate_series(101, 108) a;
SELECT count(record(a, m, (a * 1300 + k * 170) % 9000, '2025-01-01'::timestamptz + (k * 4 + a % 7) * interval '1 day'))
  FROM generate_series(101, 108) a, unnest(ARRAY['k_api', 'k_gb']) m, generate_series(0, 28) k;

-- plan changes mid-month: subscription to usage-based, and back
SELECT change_plan(102, 'k_usage', '2025-01-15 00:00'), change_plan(104, 'k_usage', '2025-02-10 12:00'),
       change_plan(103, 'k_flat', '2025-03-20 06:00');
-- credits: priorities, applies_to, expiries; an idempotent retry
SELECT grant_credit(a, 40 + a % 7, '2025-01-01', '2025-02-15', priority => 10, reason => 'promo') AS promo,
       grant_credit(a, 120, '2025-01-01', applies_to => '{k_api}', reason => 'api') AS api,
       grant_credit(a, 75, '2025-01-10', reason => 'goodwill', idempotency_key => 'gw-' || a) AS goodwill,
       grant_credit(a, 75, '2025-01-10', reason => 'goodwill', idempotency_key => 'gw-' || a) AS retry
  FROM generate_series(101, 108) a ORDER BY a;
-- an annual commit billed monthly with rollover; a quarterly minimum
SELECT add_commitment(106, 'prepaid', 2400, '2025-01-01', '2026-01-01', '1 month', rollover_fraction => 0.5) AS prepaid,
       add_commitment(107, 'minimum', 900, '2025-01-01', '2025-04-01') AS minimum;

-- previews (on the account's worker on Citus), then January and February
SELECT line_no, kind, meter, description, quantity, amount FROM invoice_preview(102, '2025-01-20');
SELECT line_no, kind, meter, description, quantity, amount FROM invoice_preview(106, '2025-01-20');
SELECT account_id, period_start::date, total FROM finalize_invoices('2025-03-01 01:00') ORDER BY 1, 2;
SELECT count(*) AS again FROM finalize_invoices('2025-03-01 01:00');
-- (a function that writes the shards is not called from a query over them)
SELECT grant_id AS goodwill_108 FROM credit_grants WHERE account_id = 108 AND reason = 'goodwill' \gset
SELECT void_credit(108, :goodwill_108, 'account closed', '2025-03-02') AS forfeited;
-- a late event in February, re-rated onto March; March and April
SELECT record(101, 'k_api', 25000, '2025-02-20');
SELECT account_id, meter, billed_amount, correct_amount, delta
  FROM rerate('2025-02-01', '2025-03-01') ORDER BY 1, 2;
SELECT count(*) AS rerated_again FROM rerate('2025-02-01', '2025-03-01');
SELECT account_id, period_start::date, total FROM finalize_invoices('2025-05-01 01:00') ORDER BY 1, 2;
SELECT * FROM credit_balance(106, '2025-05-01');
SELECT * FROM credit_balance(108, '2025-05-01');

SELECT l.account_id, (i.period_start AT TIME ZONE 'UTC')::date AS period_start, l.line_no, l.kind, l.meter,
       regexp_replace(l.description, 'invoice [0-9]+', 'invoice #') AS description, l.quantity, l.amount,
       l.grant_id, l.segment_start, l.proration
  FROM invoice_lines l JOIN invoices i ON i.account_id = l.account_id AND i.invoice_id = l.invoice_id
 WHERE l.account_id BETWEEN 101 AND 108
 ORDER BY 1, 2, 3;
SELECT c.account_id, c.seq, c.grant_id, c.kind, c.amount, c.effective_at, (i.period_start AT TIME ZONE 'UTC')::date AS invoice
  FROM credit_ledger c LEFT JOIN invoices i ON i.account_id = c.account_id AND i.invoice_id = c.invoice_id
 WHERE c.account_id BETWEEN 101 AND 108
 ORDER BY 1, 2;
SELECT account_id, grant_id, amount, effective_at, expires_at, priority, applies_to, source, voided_at,
       reason, commitment_id, window_no, rolled_from
  FROM credit_grants WHERE account_id BETWEEN 101 AND 108 ORDER BY 1, 2;
SELECT 'check:contracts_verify' AS check, count(*) AS problems FROM verify_invoices();
SELECT 'check:contracts_audit' AS check, count(*) AS problems FROM verify_audit_log();
-- the same audit rows per account (their order within a chain may differ:
-- on Citus an invoice's audit row is written at commit)
SELECT 'check:contracts_audit_rows' AS check, count(*) AS rows,
       md5(string_agg(format('%s/%s/%s', account_id, action, regexp_replace(object, 'invoice:[0-9]+', 'invoice:#')),
                      ',' ORDER BY account_id, action, regexp_replace(object, 'invoice:[0-9]+', 'invoice:#'))) AS digest
  FROM audit_log WHERE account_id BETWEEN 101 AND 108;
