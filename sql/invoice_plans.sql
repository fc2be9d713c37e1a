-- invoice_plans: plans, effective-dated charges and subscriptions (SPEC §2).
-- A plan has a billing period and a currency; its charges have versions by
-- valid_from (a usage charge is identified by (plan, meter), a fixed fee,
-- meter NULL, by (plan, description)); the version in force at a period's
-- start rates the whole period.  A subscription puts an account on a plan
-- from starts_at to ends_at; its periods are [starts_at + n*period, ...)
-- cut at ends_at, with month arithmetic in UTC.  Subscriptions of one
-- account never overlap (23P01); a plan must bill in the account's
-- currency (22023); what was invoiced cannot be rewritten (55000).
-- Accounts 5101-5199, meters and plans prefixed pl_, periods in 2025.
SET search_path = billing, public;
\set SHOW_CONTEXT never
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SET intervalstyle = 'postgres';

INSERT INTO meters (meter, late_window, unit) VALUES
    ('pl_error', '100 years', 'event'),
    ('pl_span', '100 years', 'span');
INSERT INTO accounts (account_id, currency, name) VALUES
    (5101, 'USD', 'acme'), (5102, 'EUR', 'euro gmbh'), (5103, 'JPY', 'nihon kk'),
    (5104, 'USD', 'weekly inc'), (5105, 'USD', 'nyc llc'), (5106, 'USD', 'no plan yet');

-- Plans: a period of whole months, or of days and time; a known currency.
INSERT INTO plans (plan, period, currency) VALUES
    ('pl_team', '1 month', 'USD'),
    ('pl_team_eur', '1 month', 'EUR'),
    ('pl_weekly', '7 days', 'USD'),
    ('pl_quarter', '3 months', 'USD');
INSERT INTO charges (plan, meter, price, description) VALUES
    ('pl_weekly', NULL, 'flat 5', 'Weekly fee'),
    ('pl_quarter', NULL, 'flat 70', 'Quarterly fee');
SELECT plan, period, currency FROM plans WHERE plan LIKE 'pl\_%' ORDER BY plan;
-- defaults: one month, USD
INSERT INTO plans (plan) VALUES ('pl_default') RETURNING plan, period, currency;
-- a period mixing months and days has no clear arithmetic: refused
INSERT INTO plans (plan, period) VALUES ('pl_bad', '1 month 2 days');
INSERT INTO plans (plan, period) VALUES ('pl_bad', '0 days');
-- a currency must be an upper-case ISO 4217 code that round_money knows
-- (an unknown one would make every invoice of the plan fail to round)
INSERT INTO plans (plan, currency) VALUES ('pl_bad', 'usd');
SELECT test.sqlstate_of($$INSERT INTO billing.plans (plan, currency) VALUES ('pl_bad', 'ABC')$$)
       AS plan_in_unknown_currency,
       test.sqlstate_of($$INSERT INTO billing.accounts (account_id, currency) VALUES (5198, 'ABC')$$)
       AS account_in_unknown_currency;
SELECT count(*) AS unknown_currencies_stored
  FROM (SELECT currency FROM plans UNION ALL SELECT currency FROM accounts) c
 WHERE currency_exponent(currency) IS NULL;

-- Charges: two fixed fees (told apart by description) and two usage charges.
INSERT INTO charges (plan, meter, price, description) VALUES
    ('pl_team', NULL, 'flat 26', 'Team plan'),
    ('pl_team', NULL, 'flat 10', 'Support'),
    ('pl_team', 'pl_error', 'graduated 50000 @ 0 | inf @ 0.00029', 'Errors'),
    ('pl_team', 'pl_span', 'unit 0.000002', 'Spans');
-- A new version of the error charge from 2025-03-01, and of the support fee
-- from 2025-04-01.
INSERT INTO charges (plan, meter, price, valid_from, description) VALUES
    ('pl_team', 'pl_error', 'graduated 50000 @ 0 | inf @ 0.00025', '2025-03-01', 'Errors'),
    ('pl_team', NULL, 'flat 12', '2025-04-01', 'Support');
SELECT meter, description, price, valid_from FROM charges WHERE plan = 'pl_team'
 ORDER BY meter NULLS FIRST, description, valid_from;
-- one version per (plan, meter, valid_from) ...
INSERT INTO charges (plan, meter, price, valid_from) VALUES
    ('pl_team', 'pl_error', 'unit 1', '2025-03-01');
-- ... and per (plan, description, valid_from) for fixed fees
INSERT INTO charges (plan, meter, price, description) VALUES
    ('pl_team', NULL, 'flat 1', 'Support');
-- a charge needs a known plan and meter, and a price
INSERT INTO charges (plan, meter, price) VALUES ('pl_nope', 'pl_error', 'unit 1');
INSERT INTO charges (plan, meter, price) VALUES ('pl_team', 'pl_nope', 'unit 1');
\set VERBOSITY terse
INSERT INTO charges (plan, meter, price) VALUES ('pl_team', 'pl_span', NULL);
\set VERBOSITY default

-- Subscriptions.  The plan must bill in the account's currency.
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5102, 'pl_team', '2025-01-01');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5101, 'pl_team_eur', '2025-01-01');
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5102, 'pl_team_eur', '2025-01-01');
-- ... also when a subscription moves to another plan
UPDATE subscriptions SET plan = 'pl_team' WHERE account_id = 5102;

-- The version in force at a period's start rates the whole period: the
-- fixed lines and the price of the error line, period by period.
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap)
VALUES (5101, 'pl_team', '2025-01-01', 500);
SELECT billing.record(5101, 'pl_error', 60000, '2025-02-10 12:00');
SELECT billing.record(5101, 'pl_error', 60000, '2025-03-10 12:00');
SELECT billing.record(5101, 'pl_error', 60000, '2025-04-10 12:00');
-- Jan: 26 + 10 + 0 (no errors); Feb: 10000 over 50000 at 0.00029 = 2.90;
-- Mar: 10000 at 0.00025 = 2.50; Apr: support is 12.
SELECT to_char(period_start, 'YYYY-MM-DD') AS period, line_no, kind, meter, description,
       quantity, amount
  FROM unnest('{2025-01-15,2025-02-15,2025-03-15,2025-04-15}'::timestamptz[]) AS at,
       invoice_preview(5101, at)
 ORDER BY at, line_no;

-- Periods: [starts_at + n*period, starts_at + (n+1)*period), the month
-- arithmetic anchored at starts_at (a subscription from Jan 31 bills Jan 31 -
-- Feb 28, Feb 28 - Mar 31, Mar 31 - Apr 30, ...: no drift to the 28th).
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at)
VALUES (5103, 'pl_team', '2025-01-31', NULL);   -- JPY account, USD plan: refused
INSERT INTO plans (plan, currency) VALUES ('pl_team_jpy', 'JPY');
INSERT INTO charges (plan, meter, price, description) VALUES ('pl_team_jpy', NULL, 'flat 3000', 'Team plan');
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at)
VALUES (5103, 'pl_team_jpy', '2025-01-31', '2025-06-15');
SELECT at, p.period_start, p.period_end
  FROM unnest('{2025-01-31, 2025-02-27 23:59:59.999999, 2025-02-28, 2025-03-30 23:59,
                2025-03-31, 2025-04-30, 2025-05-30, 2025-05-31, 2025-06-14 23:59:59.999999}'::timestamptz[]) AS at,
       LATERAL (SELECT DISTINCT period_start, period_end FROM invoice_preview(5103, at)) p
 ORDER BY at;
-- before the start and from ends_at on, there is no period (no lines)
SELECT count(*) FROM invoice_preview(5103, '2025-01-30 23:59:59.999999');
SELECT count(*) FROM invoice_preview(5103, '2025-06-15');

-- Day periods: a 7-day plan.
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5104, 'pl_weekly', '2025-01-01 06:00');
SELECT at, p.period_start, p.period_end
  FROM unnest('{2025-01-01 06:00, 2025-01-08 05:59:59, 2025-01-08 06:00, 2025-03-01}'::timestamptz[]) AS at,
       LATERAL (SELECT DISTINCT period_start, period_end FROM invoice_preview(5104, at)) p
 ORDER BY at;

-- Month arithmetic is done in UTC whatever the session's time zone: a
-- quarter from 2025-01-01 00:00 UTC ends 2025-04-01 00:00 UTC, across the
-- US daylight saving change, also when the session runs in New York.
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5105, 'pl_quarter', '2025-01-01 00:00+00');
SET timezone = 'America/New_York';
SELECT DISTINCT period_start, period_end FROM invoice_preview(5105, '2025-03-20 12:00+00');
SELECT DISTINCT period_start AT TIME ZONE 'UTC' AS start_utc, period_end AT TIME ZONE 'UTC' AS end_utc
  FROM invoice_preview(5105, '2025-04-01 00:00+00');
SET timezone = 'UTC';

-- Subscriptions of one account never overlap (23P01) ...
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5101, 'pl_team', '2025-06-01');
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at)
VALUES (5101, 'pl_team', '2024-12-01', '2025-01-01 00:00:00.000001');
-- ... a subscription ending where the next one starts does not overlap
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at)
VALUES (5101, 'pl_team', '2024-12-01', '2025-01-01');
UPDATE subscriptions SET ends_at = '2025-06-01' WHERE account_id = 5101 AND starts_at = '2025-01-01';
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5101, 'pl_team', '2025-06-01');
-- ... also when an UPDATE would make them overlap
UPDATE subscriptions SET ends_at = '2025-06-02' WHERE account_id = 5101 AND starts_at = '2025-01-01';
UPDATE subscriptions SET starts_at = '2025-05-31' WHERE account_id = 5101 AND starts_at = '2025-06-01';
SELECT account_id, plan, starts_at, ends_at, spend_cap FROM subscriptions
 WHERE account_id = 5101 ORDER BY starts_at;

-- Bad subscriptions (account 5106 has none yet).
INSERT INTO subscriptions (account_id, plan, starts_at, ends_at)
VALUES (5106, 'pl_weekly', '2026-01-01', '2026-01-01');     -- empty
INSERT INTO subscriptions (account_id, plan, starts_at) VALUES (5106, 'pl_weekly', '-infinity');
INSERT INTO subscriptions (account_id, plan, starts_at, spend_cap)
VALUES (5106, 'pl_weekly', '2026-01-01', -1);
-- an unknown account or plan is a foreign key violation (23503), not a
-- currency mismatch
SELECT test.sqlstate_of($$INSERT INTO billing.subscriptions (account_id, plan, starts_at)
                              VALUES (5199, 'pl_weekly', '2026-01-01')$$) AS unknown_account,
       test.sqlstate_of($$INSERT INTO billing.subscriptions (account_id, plan, starts_at)
                              VALUES (5106, 'pl_nope', '2026-01-01')$$) AS unknown_plan;

-- What was invoiced cannot be rewritten.  Finalize everything that ended by
-- 2025-03-01 00:00 (the grace period is one hour); account 5101 gets
-- December (26 + 10 = 36), January (36) and February (36 + 2.90 = 38.90,
-- as previewed above).
CREATE TEMP TABLE pl_finalized AS
SELECT account_id, period_start, period_end, total FROM finalize_invoices('2025-03-01 01:00');
SELECT account_id, period_start, period_end, total FROM pl_finalized
 WHERE account_id = 5101 ORDER BY period_start;
-- 5103 (JPY, Jan 31 - Feb 28): 3000 yen; 5104: the 8 weeks from Jan 1 06:00
-- that ended by Mar 1 (the last one Feb 19 06:00 - Feb 26 06:00), 5 each.
SELECT account_id, count(*), min(period_start), max(period_end), sum(total)
  FROM pl_finalized WHERE account_id BETWEEN 5102 AND 5199 GROUP BY account_id ORDER BY account_id;

-- A subscription with invoices cannot be deleted, change plan or start (55000) ...
DELETE FROM subscriptions WHERE account_id = 5101 AND starts_at = '2025-01-01';
UPDATE subscriptions SET plan = 'pl_default' WHERE account_id = 5101 AND starts_at = '2025-01-01';
UPDATE subscriptions SET starts_at = '2025-01-02' WHERE account_id = 5101 AND starts_at = '2025-01-01';
-- ... its end and spend cap can change (rerate bills the effect)
UPDATE subscriptions SET ends_at = '2025-05-15', spend_cap = 400
 WHERE account_id = 5101 AND starts_at = '2025-01-01';
-- a subscription without invoices can be deleted; the December one was invoiced
DELETE FROM subscriptions WHERE account_id = 5101 AND starts_at = '2025-06-01';
DELETE FROM subscriptions WHERE account_id = 5101 AND starts_at = '2024-12-01';

-- A plan in use keeps its currency and period (55000); its name can be
-- used as before.
UPDATE plans SET period = '2 months' WHERE plan = 'pl_team';
UPDATE plans SET currency = 'EUR' WHERE plan = 'pl_team';
UPDATE plans SET period = '2 months' WHERE plan = 'pl_default';   -- no subscriptions: fine

-- A charge version that rated a finalized invoice cannot change (55000)
-- (more in invoice_finalize); one that did not rate anything can.
SELECT test.sqlstate_of($$UPDATE billing.charges SET price = 'flat 27'
                              WHERE plan = 'pl_team' AND description = 'Team plan'$$) AS update_used_version;
UPDATE charges SET price = 'flat 13' WHERE plan = 'pl_team' AND description = 'Support'
   AND valid_from = '2025-04-01';
DELETE FROM charges WHERE plan = 'pl_team' AND description = 'Support' AND valid_from = '2025-04-01';

-- An account's currency cannot change under a subscription to a plan in
-- that currency either: the account would be billed in a currency not its own.
SELECT test.sqlstate_of($$UPDATE billing.accounts SET currency = 'EUR' WHERE account_id = 5104$$)
       AS change_currency_of_subscribed_account;
SELECT test.sqlstate_of($$UPDATE billing.accounts SET currency = 'EUR' WHERE account_id = 5106$$)
       AS change_currency_of_unsubscribed_account;
SELECT a.account_id, a.currency AS account_currency, p.currency AS plan_currency
  FROM subscriptions s JOIN accounts a USING (account_id) JOIN plans p USING (plan)
 WHERE s.account_id BETWEEN 5101 AND 5199 AND a.currency <> p.currency;
