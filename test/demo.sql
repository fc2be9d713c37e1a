-- The billing demo: a month of Sentry-like usage, priced, invoiced and re-rated.
\pset footer off
\set QUIET on
SET timezone = 'UTC';
CREATE EXTENSION billing;
SET search_path = billing, public;

-- last month is the month we bill; this month is the one in progress
SELECT date_trunc('month', now()) - interval '1 month' AS m0,
       date_trunc('month', now()) AS m1 \gset

\echo
\echo '== 1. What we meter (late events accepted for 70 days)'
INSERT INTO meters (meter, aggregation, unit, late_window) VALUES
    ('error',      'sum', 'events',  '70 days'),
    ('span',       'sum', 'spans',   '70 days'),
    ('replay',     'sum', 'replays', '70 days'),
    ('attachment', 'sum', 'bytes',   '70 days');
SELECT meter, aggregation, bucket_width, late_window, dedupe_window, unit FROM meters;

\echo
\echo '== 2. The Team plan: reserved volume at a fixed fee, pay-as-you-go above it'
INSERT INTO plans (plan, period, currency) VALUES ('team', '1 month', 'USD');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('team', NULL,         'flat 26',                                   'Team plan, base'),
    ('team', NULL,         'flat 24',                                   'Reserved: 100k errors, 10M spans, 500 replays'),
    ('team', 'error',      'graduated 100000 @ 0 | inf @ 0.00029',      'Errors above 100k'),
    ('team', 'span',       'graduated 10000000 @ 0 | inf @ 0.0000016',  'Spans above 10M'),
    ('team', 'replay',     'graduated 500 @ 0 | inf @ 0.003',           'Replays above 500'),
    ('team', 'attachment', 'unit 0.00000000025',                        'Attachments, $0.25 per GB');
SELECT plan, coalesce(meter, '(fixed)') AS meter, price, description FROM charges ORDER BY charge_id;

INSERT INTO accounts (account_id, currency, name) VALUES
    (1, 'USD', 'Acme Corp'), (2, 'USD', 'Globex'), (3, 'USD', 'Initech');
-- Globex has a $50 pay-as-you-go budget: usage beyond it is not billed
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap) VALUES
    (1, 'team', :'m0', NULL), (2, 'team', :'m0', 50), (3, 'team', :'m0', NULL);

\echo
\echo '== 3. A month of usage arrives: SDK outcomes COPYed into a metered table'
CREATE TABLE outcomes (org_id bigint, category text, quantity bigint,
                       received timestamptz, event_id text);
SELECT meter_table('outcomes', 'org_id', 'category', 'quantity', 'received',
                   event_id_column => 'event_id', keep_rows => false) \g /dev/null
-- one report per account, category and hour, from last month's start until now
INSERT INTO outcomes
SELECT a, c,
       CASE c WHEN 'error'      THEN (40 + 60 * a) * (1 + h % 3)
              WHEN 'span'       THEN 9000 * a * a + (h % 7) * 1000
              WHEN 'replay'     THEN a * (h % 2)
              ELSE                   (5 + 10 * a) * 1048576 END,
       :'m0'::timestamptz + h * interval '1 hour' + interval '17 min',
       format('%s-%s-%s', a, c, h)
  FROM generate_series(1, 3) a,
       unnest(ARRAY['error', 'span', 'replay', 'attachment']) c,
       generate_series(0, (extract(epoch FROM now() - :'m0'::timestamptz) / 3600)::int - 1) h
 WHERE :'m0'::timestamptz + h * interval '1 hour' + interval '17 min' < now();
-- the SDK retries the last day's reports: nothing is counted twice
INSERT INTO outcomes
SELECT a, 'error', (40 + 60 * a) * (1 + h % 3),
       :'m0'::timestamptz + h * interval '1 hour' + interval '17 min',
       format('%s-%s-%s', a, 'error', h)
  FROM generate_series(1, 3) a,
       generate_series((extract(epoch FROM :'m1'::timestamptz - :'m0'::timestamptz) / 3600)::int - 24,
                       (extract(epoch FROM :'m1'::timestamptz - :'m0'::timestamptz) / 3600)::int - 1) h;
-- single events go through billing.record; a retried event counts once
SELECT record(3, 'replay', 1, :'m0'::timestamptz + interval '3 days', 'replay-9f2') AS counted
UNION ALL
SELECT record(3, 'replay', 1, :'m0'::timestamptz + interval '3 days', 'replay-9f2');
SELECT compact_usage() > 0 AS compacted;

\echo
\echo '== 4. Last month''s usage per account (billing.usage rolled up by month)'
SELECT a.name AS account, u.meter, u.quantity, u.events
  FROM accounts a, usage(a.account_id, :'m0', :'m1', '1 month') u
 ORDER BY a.account_id, u.meter;

\echo
\echo '== 5. The invoice of the month in progress, in real time (Acme, billing.invoice_preview)'
SELECT line_no, kind, description, quantity, amount FROM invoice_preview(1);

\echo
\echo '== 6. Last month closes: finalize the invoices once the 1 hour grace period has passed'
SELECT invoice_id, a.name AS account, period_start::date, period_end::date, total
  FROM finalize_invoices() f JOIN accounts a USING (account_id)
 ORDER BY invoice_id;
\echo 'Globex, capped at its $50 pay-as-you-go budget:'
SELECT line_no, kind, description, quantity, amount
  FROM invoice_lines l JOIN invoices i USING (account_id, invoice_id)
 WHERE i.account_id = 2 AND i.period_start = :'m0'
 ORDER BY line_no;
\echo 'a second run finalizes nothing new:'
SELECT count(*) AS new_invoices FROM finalize_invoices();

\echo
\echo '== 7. The past changes: late errors for last month, and a retroactive span price cut'
SELECT * FROM ingest('relay', 0, 7,
    ARRAY[1, 1, 3], ARRAY['error', 'error', 'error'], ARRAY[25000, 15000, 90000],
    ARRAY[:'m1'::timestamptz - interval '3 days', :'m1'::timestamptz - interval '2 days',
          :'m1'::timestamptz - interval '1 day']);
INSERT INTO charges (plan, meter, price, valid_from, description) VALUES
    ('team', 'span', 'graduated 10000000 @ 0 | inf @ 0.0000012', :'m0', 'Spans above 10M (new price)');
\echo 'billing.rerate recomputes the finalized invoices and records the differences:'
SELECT a.name AS account, r.invoice_id, r.meter, r.billed_quantity, r.billed_amount,
       r.correct_quantity, r.correct_amount, r.delta
  FROM rerate(:'m0', :'m1', reason => 'late errors; span price cut') r
       JOIN accounts a USING (account_id)
 ORDER BY r.account_id, r.meter;
\echo 'the finalized invoices did not change; the deltas wait for the next invoice:'
SELECT line_no, kind, description, quantity, amount FROM invoice_preview(1);
\echo 'and a second re-rate finds nothing left to correct:'
SELECT count(*) AS deltas FROM rerate(:'m0', :'m1');
\echo 'every finalized invoice still adds up and rates its lines:'
SELECT count(*) AS problems FROM verify_invoices();

\echo
\echo '== 8. An enterprise contract: an annual commit billed monthly, a promotion that expires,'
\echo '      and a move from the Team subscription to usage-based pricing in the middle of last month'
INSERT INTO plans (plan, period, currency) VALUES ('usage', '1 month', 'USD');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('usage', 'error',      'unit 0.00025',      'Errors'),
    ('usage', 'span',       'unit 0.0000013',    'Spans'),
    ('usage', 'replay',     'unit 0.0025',       'Replays'),
    ('usage', 'attachment', 'unit 0.00000000025', 'Attachments, $0.25 per GB');
INSERT INTO accounts (account_id, currency, name) VALUES (4, 'USD', 'Hooli');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (4, 'team', :'m0');
\echo '$24,000 for the year, 12 monthly windows of $2,000, each invoiced on its month and drawn'
\echo 'down by that month''s usage; a quarter of what a month leaves rolls over to the next:'
SELECT add_commitment(4, 'prepaid', 24000, :'m0', :'m0'::timestamptz + interval '1 year', '1 month',
                      rollover_fraction => 0.25) AS commitment;
SELECT window_no, starts_at::date, ends_at::date, amount FROM commitment_windows
 WHERE account_id = 4 ORDER BY window_no LIMIT 3;
\echo 'a launch promotion of $500 that expires 45 days in, drawn first (priority 10):'
SELECT grant_credit(4, 500, :'m0', :'m0'::timestamptz + interval '45 days', priority => 10,
                    reason => 'Launch promotion', idempotency_key => 'promo-hooli') AS promotion;
\echo 'half-way through last month Hooli moves to usage-based pricing:'
SELECT change_plan(4, 'usage', :'m0'::timestamptz + interval '14 days');
SELECT plan, starts_at::date, ends_at::date, period_anchor::date FROM subscriptions WHERE account_id = 4;
-- its usage: every hour since last month's start
SELECT count(record(4, c,
                    CASE c WHEN 'error' THEN 300 + (h % 5) * 100 WHEN 'span' THEN 250000 + (h % 11) * 10000
                           WHEN 'replay' THEN 1 + h % 5 ELSE 90 * 1048576 END,
                    :'m0'::timestamptz + h * interval '1 hour' + interval '23 min')) AS reports
  FROM unnest(ARRAY['error', 'span', 'replay', 'attachment']) c,
       generate_series(0, (extract(epoch FROM now() - :'m0'::timestamptz) / 3600)::int - 1) h
 WHERE :'m0'::timestamptz + h * interval '1 hour' + interval '23 min' < now();
SELECT invoice_id, a.name AS account, period_start::date, period_end::date, total
  FROM finalize_invoices() f JOIN accounts a USING (account_id);
\echo 'last month''s invoice: both plans, the Team fees prorated by the seconds each plan covered,'
\echo 'the commitment installment, then the credits drawn: the promotion first, which pays it all'
\echo '(the commitment''s grant draws nothing, so it has no line):'
SELECT line_no, kind, description, quantity, amount
  FROM invoice_lines l JOIN invoices i USING (account_id, invoice_id)
 WHERE i.account_id = 4 AND i.period_start = :'m0'
 ORDER BY line_no;
\echo 'the credit ledger (append-only): grants, draws, and at the month''s end the rollover'
\echo 'of a quarter of what the window left and the expiry of the rest:'
SELECT seq, grant_id, kind, amount, effective_at::date FROM credit_ledger
 WHERE account_id = 4 AND (kind <> 'grant' OR effective_at <= :'m1') ORDER BY seq;
\echo 'this month so far, in real time: what is left of the promotion pays it all (this month''s'
\echo 'window comes next, then the rollover grant: the same terms, a later id):'
SELECT line_no, kind, description, quantity, amount FROM invoice_preview(4);
SELECT grant_id, priority, expires_at::date, granted, used, expired, rolled_over, remaining
  FROM credit_balance(4) WHERE granted > 0 AND (expires_at IS NULL OR expires_at > :'m0') LIMIT 5;
\echo 'invoices and the ledger agree:'
SELECT count(*) AS problems FROM verify_invoices();

\echo
\echo '== 9. Matrix prices and active users: the Business plan'
\echo 'AI tokens priced by model (matrix charges: one charge per dimension, NULL the rest);'
\echo 'active users counted by a unique meter (the distinct users reported in a period):'
INSERT INTO meters (meter, aggregation, unit, late_window) VALUES
    ('ai_token',    'sum',    'tokens', '70 days'),
    ('active_user', 'unique', 'users',  '70 days');
INSERT INTO plans (plan, period, currency) VALUES ('business', '1 month', 'USD');
INSERT INTO charges (plan, meter, dimension, price, description) VALUES
    ('business', NULL,          NULL,    'flat 80',                    'Business plan, base'),
    ('business', 'ai_token',    'large', 'unit 15 per 1000000',        'Tokens, large model: $15 per 1M'),
    ('business', 'ai_token',    'small', 'unit 0.6 per 1000000',       'Tokens, small model: $0.60 per 1M'),
    ('business', 'ai_token',    NULL,    'unit 2 per 1000000',         'Tokens, other models: $2 per 1M'),
    ('business', 'active_user', NULL,    'graduated 25 @ 0 | inf @ 4', 'Active users above 25: $4 each');
SELECT coalesce(meter, '(fixed)') AS meter, dimension, price, description
  FROM charges WHERE plan = 'business' ORDER BY charge_id;
INSERT INTO accounts (account_id, currency, name) VALUES (5, 'USD', 'Pied Piper');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5, 'business', :'m0');
-- the app reports both meters through one metered table; the dimension is
-- the model of a token count and the user of an activity report
CREATE TABLE app_events (org_id bigint, meter text, dim text, quantity bigint, at timestamptz);
SELECT meter_table('app_events', 'org_id', 'meter', 'quantity', 'at',
                   dimension_column => 'dim', keep_rows => false) \g /dev/null
-- every hour, tokens on three models ('mini' has no charge of its own); user
-- n joins on day n after last month's start and is active every other day
INSERT INTO app_events
SELECT 5, 'ai_token', m, (CASE m WHEN 'large' THEN 40000 WHEN 'small' THEN 250000 ELSE 90000 END)
                         * (1 + h % 4),
       :'m0'::timestamptz + h * interval '1 hour' + interval '5 min'
  FROM unnest(ARRAY['large', 'small', 'mini']) m,
       generate_series(0, (extract(epoch FROM now() - :'m0'::timestamptz) / 3600)::int - 1) h
 WHERE :'m0'::timestamptz + h * interval '1 hour' + interval '5 min' < now()
UNION ALL
SELECT 5, 'active_user', 'user-' || u, 1,
       :'m0'::timestamptz + d * interval '1 day' + u * interval '7 min'
  FROM generate_series(1, 60) u, generate_series(0, 70) d
 WHERE d >= u AND (d - u) % 2 = 0
   AND :'m0'::timestamptz + d * interval '1 day' + u * interval '7 min' < now();
\echo 'last month''s usage: tokens per model, and the distinct users of the month'
\echo '(a unique meter''s row counts every dimension: its dimension is NULL)'
SELECT meter, coalesce(dimension, '(all)') AS dimension, quantity, events
  FROM usage(5, :'m0', :'m1', '1 month')
 ORDER BY meter, dimension;
\echo 'its invoice: one line per charge, each with its dimension'
SELECT invoice_id, a.name AS account, total
  FROM finalize_invoices() f JOIN accounts a USING (account_id);
SELECT l.line_no, l.kind, l.meter, l.dimension, l.description, l.quantity, l.amount
  FROM invoice_lines l JOIN invoices i USING (account_id, invoice_id)
 WHERE i.account_id = 5 AND i.period_start = :'m0'
 ORDER BY l.line_no;
\echo 'the month in progress counts its own active users (those of this month only):'
SELECT line_no, kind, dimension, description, quantity, amount
  FROM invoice_preview(5) WHERE meter = 'active_user';

\echo
\echo '== 10. Maintenance that runs itself: the maintenance worker'
\echo 'billing is in shared_preload_libraries; the demo cluster runs the worker every hour,'
\echo 'from now on every second (sections 7 to 9 left their usage uncompacted):'
SELECT count(*) AS uncompacted_rows FROM usage_deltas;
ALTER SYSTEM SET billing.maintenance_interval = '1s';
SELECT pg_reload_conf() AS reloaded;
DO $$
BEGIN
    FOR i IN 1..100 LOOP    -- at most 10 s
        EXIT WHEN (SELECT runs > 0 FROM maintenance_status WHERE job = 'compact_usage');
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
\echo 'what it did (billing.maintenance_status; finalize_invoices runs with billing.auto_finalize on):'
SELECT job, worker_pid IS NOT NULL AS worker_runs, last_result, runs > 0 AS ran, last_error
  FROM maintenance_status;
SELECT count(*) AS uncompacted_rows FROM usage_deltas;
