-- audit_upgrade: the audit log a 1.0 database wrote still verifies after
-- ALTER EXTENSION billing UPDATE, and its chains go on from their heads:
-- 1.1 appends in C (one definition for the extension's own tables and for
-- tables audited with billing.audit_table) with the same hash, encoding and
-- verify_audit_log.  In a database of its own, which starts on 1.0.
SELECT current_database() AS regression_db \gset
CREATE DATABASE billing_audit_upgrade;
\c billing_audit_upgrade
SET client_min_messages = warning;
SET billing.grace_period = 0;     -- the invoices of the last 3 days, at any time of day
CREATE EXTENSION billing VERSION '1.0';
SELECT date_trunc('day', now()) - interval '3 days' AS d0 \gset

-- a 1.0 history: catalog changes, accounts, usage, finalized invoices, a
-- usage correction and a rerate whose adjustments are appended in a batch
INSERT INTO billing.meters (meter) VALUES ('up_events'), ('up_spare');
INSERT INTO billing.accounts (account_id, name) VALUES (1, 'one'), (2, 'two');
INSERT INTO billing.plans (plan, period) VALUES ('up_daily', '1 day');
INSERT INTO billing.charges (plan, meter, price) VALUES ('up_daily', 'up_events', 'unit 0.5');
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
    VALUES (1, 'up_daily', :'d0'), (2, 'up_daily', :'d0');
UPDATE billing.accounts SET name = 'one, renamed' WHERE account_id = 1;
DELETE FROM billing.meters WHERE meter = 'up_spare';
SELECT count(billing.record(1 + g % 2, 'up_events', g, :'d0'::timestamptz + g * interval '1 hour'))
  FROM generate_series(1, 60) g;
SELECT count(*) AS invoices FROM billing.finalize_invoices(now());
SELECT billing.correct_usage(1, 'up_events', :'d0'::timestamptz + interval '1 hour', 4, 'late batch');
SELECT count(*) AS adjustments FROM billing.rerate(:'d0', :'d0'::timestamptz + interval '3 days');
SELECT account_id, count(*) AS rows_of_1_0 FROM billing.audit_log GROUP BY 1 ORDER BY 1;

ALTER EXTENSION billing UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'billing';
-- the rows of 1.0, checked by 1.1
SELECT * FROM billing.verify_audit_log();

-- the chains go on: the extension's own changes, a batch of adjustments,
-- and a table audited per account, in the same chains
UPDATE billing.accounts SET name = 'two, renamed' WHERE account_id = 2;
SELECT billing.correct_usage(2, 'up_events', :'d0'::timestamptz + interval '2 hours', 3, 'restated');
SELECT count(*) AS adjustments FROM billing.rerate(:'d0', :'d0'::timestamptz + interval '3 days');
CREATE TABLE contracts (contract_id int PRIMARY KEY, account_id bigint NOT NULL, amount numeric);
SELECT billing.audit_table('contracts', 'account_id');
INSERT INTO contracts VALUES (1, 1, 100), (2, 2, 200);
UPDATE contracts SET amount = amount * 2;
SELECT * FROM billing.verify_audit_log();
SELECT l.account_id, count(*) AS rows, max(l.seq) = h.seq AS head_is_last_row,
       count(*) FILTER (WHERE l.object = 'public.contracts') AS contract_rows
  FROM billing.audit_log l JOIN billing.audit_heads h ON h.account_id = l.account_id
 GROUP BY l.account_id, h.seq ORDER BY 1;

\c :regression_db
DROP DATABASE billing_audit_upgrade;
