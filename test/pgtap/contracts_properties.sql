-- contracts_properties: random seeded contract scenarios (issue 17, SPEC
-- 10.2).  30 accounts on one plan get random usage over four months,
-- random grants (amount, priority, applies_to, effective and expiry
-- dates), some a prepaid commitment with rollover, some a minimum
-- commitment, some a plan change in the middle of a month, some grants
-- voided on the way; January and February are finalized in one run, March
-- and April in another.  Each account has a twin with the same usage and
-- the same grants inserted in the reverse order.  Then:
--   - for every grant: granted = used + expired + voided + rolled_over +
--     remaining, remaining >= 0 (and = 0 once expired, voided or rolled);
--   - the credit lines of the invoices are the ledger's draws, one line per
--     (invoice, grant), and the ledger books nothing else on invoices;
--   - no invoice total is below 0 (there are no negative adjustments here);
--   - credits pay only what they apply to: no grant with applies_to pays
--     more on an invoice than its meters' usage lines;
--   - the drawdown does not depend on the order grants were inserted in:
--     each twin's invoices and each grant's draws are the same;
--   - the preview of a period just before it is finalized shows the lines
--     the invoice gets;
--   - finalizing again creates nothing and books nothing;
--   - verify_invoices and verify_audit_log find nothing; every ledger entry
--     has its audit row;
--   - the first run, made one account per statement (rolled back), writes
--     the same invoices, lines, ledger entries and rollover grants, and
--     returns them in the same order, as the run in one statement.
BEGIN;
SELECT plan(17);
SELECT setseed(0.1717);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;
\o /dev/null
\ir ../helpers.sql

INSERT INTO billing.meters (meter, late_window) VALUES
    ('kp_api', '100 years'), ('kp_gpu', '100 years'), ('kp_gb', '100 years');
INSERT INTO billing.plans (plan) VALUES ('kp_team'), ('kp_usage');
INSERT INTO billing.charges (plan, meter, price, description) VALUES
    ('kp_team', NULL, 'flat 49', 'Team'),
    ('kp_team', 'kp_api', 'graduated 10000 @ 0 | inf @ 0.002', 'API calls'),
    ('kp_team', 'kp_gpu', 'unit 1.7', 'GPU hours'),
    ('kp_team', 'kp_gb', 'unit 0.023', 'Storage'),
    ('kp_usage', NULL, 'flat 5', 'Usage plan'),
    ('kp_usage', 'kp_api', 'unit 0.0015', 'API calls'),
    ('kp_usage', 'kp_gpu', 'unit 1.5', 'GPU hours'),
    ('kp_usage', 'kp_gb', 'unit 0.02', 'Storage');

-- accounts 9701-9730 and their twins 9801-9830
CREATE TEMP TABLE acc AS
SELECT a AS account_id, a + 100 AS twin, random() < 0.3 AS capped, random() < 0.3 AS plan_change,
       CASE WHEN random() < 0.25 THEN 'prepaid' WHEN random() < 0.4 THEN 'minimum' END AS commitment
  FROM generate_series(9701, 9730) a;
INSERT INTO billing.accounts (account_id)
SELECT account_id FROM acc UNION ALL SELECT twin FROM acc;
INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap)
SELECT x, 'kp_team', '2025-01-01', CASE WHEN capped THEN 400 END
  FROM acc, LATERAL (VALUES (account_id), (twin)) v(x);
SELECT count(billing.change_plan(x, 'kp_usage', '2025-02-01'::timestamptz + (d || ' hours')::interval))
  FROM (SELECT account_id, twin, (random() * 600)::int AS d FROM acc WHERE plan_change) p,
       LATERAL (VALUES (account_id), (twin)) v(x);

-- usage: a few reports per meter and month
CREATE TEMP TABLE use AS
SELECT account_id, twin, m, '2025-01-01'::timestamptz + (random() * 119 * 86400) * interval '1 second' AS t,
       CASE m WHEN 'kp_api' THEN (random() * 200000)::int WHEN 'kp_gpu' THEN (random() * 90)::int
              ELSE (random() * 5000)::int END AS q
  FROM acc, unnest(ARRAY['kp_api', 'kp_gpu', 'kp_gb']) m, generate_series(1, 6);
SELECT count(billing.record(x, m, q, t)) FROM use, LATERAL (VALUES (account_id), (twin)) v(x);

-- grants: 0 to 6 per account, no two alike in every key of the drawdown
-- order (each starts a minute later), labelled g1, g2, ...
CREATE TEMP TABLE gr AS
SELECT acc.account_id, acc.twin, k, round((random() * 300)::numeric, 2) AS amount,
       (ARRAY[10, 50, 50, 90])[1 + floor(random() * 4)::int] AS priority,
       (ARRAY[NULL, '{kp_api}', '{kp_gpu,kp_gb}', NULL])[1 + floor(random() * 4)::int]::text[] AS applies_to,
       '2025-01-01'::timestamptz + (random() * 45)::int * interval '1 day' + k * interval '1 minute' AS effective_at,
       CASE WHEN random() < 0.5 THEN '2025-02-10'::timestamptz + (random() * 60)::int * interval '1 day' END AS expires_at
  FROM acc, generate_series(1, 6) k
 WHERE random() < 0.6;
SELECT count(billing.grant_credit(account_id, amount, effective_at, expires_at, priority, applies_to,
                                  'g' || k))
  FROM gr;
-- the twins get them in the reverse order
SELECT count(billing.grant_credit(twin, amount, effective_at, expires_at, priority, applies_to, 'g' || k))
  FROM (SELECT * FROM gr ORDER BY account_id, k DESC) g;
SELECT count(billing.add_commitment(x, commitment, 100 * (1 + (account_id % 5)), '2025-01-01', '2025-05-01',
                                    CASE WHEN account_id % 2 = 0 THEN interval '1 month' ELSE interval '2 months' END,
                                    CASE WHEN account_id % 3 = 0 THEN '{kp_api}'::text[] END, 1, 0.5))
  FROM acc, LATERAL (VALUES (account_id), (twin)) v(x)
 WHERE commitment IS NOT NULL;

-- previews of January just before it is finalized, then the first run
CREATE TEMP TABLE pv AS
SELECT a.x::bigint AS account_id, p.*
  FROM (SELECT account_id AS x FROM acc UNION ALL SELECT twin FROM acc) a,
       LATERAL billing.invoice_preview(a.x, '2025-01-20') p;
-- the first run one account per statement (batches of 1), rolled back
SAVEPOINT batches;
CREATE TEMP TABLE run1_batched AS
SELECT * FROM billing._finalize('2025-03-01 01:00', 1)
         WITH ORDINALITY AS r(invoice_id, account_id, period_start, period_end, total, n);
SELECT test.finalized_digest(9701, 9830) AS digest_batched,
       (SELECT string_agg(concat_ws(' ', r.account_id, r.period_start, r.period_end, r.total), ','
                          ORDER BY r.n) FROM run1_batched r) AS out_batched \gset
ROLLBACK TO SAVEPOINT batches;
CREATE TEMP TABLE run1 AS SELECT * FROM billing.finalize_invoices('2025-03-01 01:00') WITH ORDINALITY AS r;
SELECT test.finalized_digest(9701, 9830) AS digest_one \gset
-- void a few grants between the runs (the same ones on the twins)
SELECT count(billing.void_credit(c.account_id, c.grant_id, 'churned', '2025-03-05'))
  FROM billing.credit_grants c JOIN gr ON gr.account_id = c.account_id AND c.reason = 'g' || gr.k
 WHERE gr.k = 2;
SELECT count(billing.void_credit(c.account_id, c.grant_id, 'churned', '2025-03-05'))
  FROM billing.credit_grants c JOIN gr ON gr.twin = c.account_id AND c.reason = 'g' || gr.k
 WHERE gr.k = 2;
INSERT INTO pv
SELECT a.x, p.*
  FROM (SELECT account_id AS x FROM acc UNION ALL SELECT twin FROM acc) a,
       LATERAL billing.invoice_preview(a.x, '2025-03-20') p;
CREATE TEMP TABLE run2 AS SELECT * FROM billing.finalize_invoices('2025-05-01 01:00');

\o
SELECT is((SELECT count(*) FROM run1), 120::bigint, 'the first run finalizes January and February of 60 accounts');
SELECT is(:'digest_one'::text, :'digest_batched'::text,
          'one account per statement, the first run writes the same invoices, lines, ledger entries and rollover grants');
SELECT is((SELECT string_agg(concat_ws(' ', account_id, period_start, period_end, total), ',' ORDER BY ordinality)
             FROM run1), :'out_batched',
          'and returns the same rows in the same order (account, period)');
SELECT is((SELECT count(*) FROM run2), 120::bigint, 'the second run finalizes March and April');

-- the scenario has something of everything
SELECT is((SELECT array_agg(x ORDER BY x) FROM (
             SELECT DISTINCT kind AS x FROM billing.credit_ledger WHERE account_id BETWEEN 9701 AND 9830
             UNION SELECT DISTINCT 'line:' || kind FROM billing.invoice_lines
                    WHERE account_id BETWEEN 9701 AND 9830
             UNION SELECT DISTINCT 'plan change' FROM billing.invoice_lines
                    WHERE account_id BETWEEN 9701 AND 9830 AND segment_start IS NOT NULL) y),
          ARRAY['draw', 'expire', 'grant', 'line:cap', 'line:commitment', 'line:credit', 'line:fixed',
                'line:true_up', 'line:usage', 'plan change', 'rollover', 'void'],
          'the scenario draws, expires, rolls over and voids credits, caps, trues up, bills installments and plan changes');

SELECT is_empty($$
    SELECT a.account_id, b.grant_id, b.granted, b.used, b.expired, b.voided, b.rolled_over, b.remaining
      FROM (SELECT DISTINCT account_id FROM billing.credit_grants WHERE account_id BETWEEN 9701 AND 9830) a,
           LATERAL billing.credit_balance(a.account_id, 'infinity') b
     WHERE b.granted <> b.used + b.expired + b.voided + b.rolled_over + b.remaining
        OR b.remaining < 0 OR b.used < 0 OR b.expired < 0 OR b.voided < 0 OR b.rolled_over < 0
$$, 'every grant: granted = used + expired + voided + rolled_over + remaining, none negative');

SELECT is_empty($$
    SELECT g.account_id, g.grant_id, b.remaining
      FROM billing.credit_grants g,
           LATERAL billing.credit_balance(g.account_id, 'infinity') b
     WHERE g.account_id BETWEEN 9701 AND 9830 AND b.grant_id = g.grant_id
       AND (g.voided_at IS NOT NULL OR g.expires_at <= '2025-05-01') AND b.remaining <> 0
$$, 'what is left of a voided grant, or one expired by the last period finalized, is booked');

SELECT is_empty($$
    SELECT coalesce(l.account_id, d.account_id), coalesce(l.invoice_id, d.invoice_id),
           coalesce(l.grant_id, d.grant_id), l.amount, d.amount
      FROM (SELECT account_id, invoice_id, grant_id, sum(amount) AS amount, count(*) AS n
              FROM billing.invoice_lines WHERE kind = 'credit' AND account_id BETWEEN 9701 AND 9830
             GROUP BY 1, 2, 3) l
           FULL JOIN (SELECT account_id, invoice_id, grant_id, sum(amount) AS amount
                        FROM billing.credit_ledger
                       WHERE account_id BETWEEN 9701 AND 9830 AND invoice_id IS NOT NULL
                       GROUP BY 1, 2, 3) d
             ON d.account_id = l.account_id AND d.invoice_id = l.invoice_id AND d.grant_id = l.grant_id
     WHERE l.amount IS DISTINCT FROM d.amount OR l.n > 1 OR l.amount >= 0
$$, 'the credit lines are the ledger''s draws: one negative line per invoice and grant drawn');

SELECT is((SELECT count(*) FROM billing.credit_ledger
            WHERE account_id BETWEEN 9701 AND 9830 AND (invoice_id IS NULL) = (kind = 'draw')),
          0::bigint, 'the ledger names an invoice on draws and on nothing else');

SELECT is_empty($$
    SELECT account_id, period_start, total FROM billing.invoices
     WHERE account_id BETWEEN 9701 AND 9830 AND total < 0
$$, 'no invoice total below 0');

SELECT is_empty($$
    SELECT c.account_id, c.invoice_id, c.grant_id
      FROM billing.invoice_lines c
           JOIN billing.credit_grants g ON g.account_id = c.account_id AND g.grant_id = c.grant_id
     WHERE c.kind = 'credit' AND c.account_id BETWEEN 9701 AND 9830 AND g.applies_to IS NOT NULL
       AND -c.amount > (SELECT coalesce(sum(u.amount), 0) FROM billing.invoice_lines u
                         WHERE u.account_id = c.account_id AND u.invoice_id = c.invoice_id
                           AND u.kind IN ('usage', 'adjustment') AND u.meter = ANY (g.applies_to))
$$, 'a grant with applies_to pays no more than its meters'' lines');

SELECT results_eq($$
    SELECT i.account_id, i.period_start, i.total,
           array_agg(l.kind || ':' || l.amount ORDER BY l.line_no)
      FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
     WHERE i.account_id BETWEEN 9701 AND 9730
     GROUP BY 1, 2, 3 ORDER BY 1, 2
$$, $$
    SELECT i.account_id - 100, i.period_start, i.total,
           array_agg(l.kind || ':' || l.amount ORDER BY l.line_no)
      FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
     WHERE i.account_id BETWEEN 9801 AND 9830
     GROUP BY 1, 2, 3 ORDER BY 1, 2
$$, 'each twin, its grants inserted in the reverse order, gets the same invoices');

SELECT results_eq($$
    SELECT g.account_id, regexp_replace(g.reason, '[0-9]+', 'N') AS reason, g.source, g.effective_at,
           b.used, b.expired, b.voided, b.rolled_over, b.remaining
      FROM billing.credit_grants g,
           LATERAL billing.credit_balance(g.account_id, 'infinity') b
     WHERE g.account_id BETWEEN 9701 AND 9730 AND b.grant_id = g.grant_id
     ORDER BY 1, 2, 3, 4
$$, $$
    SELECT g.account_id - 100, regexp_replace(g.reason, '[0-9]+', 'N') AS reason, g.source, g.effective_at,
           b.used, b.expired, b.voided, b.rolled_over, b.remaining
      FROM billing.credit_grants g,
           LATERAL billing.credit_balance(g.account_id, 'infinity') b
     WHERE g.account_id BETWEEN 9801 AND 9830 AND b.grant_id = g.grant_id
     ORDER BY 1, 2, 3, 4
$$, 'and each grant draws the same: the drawdown order does not depend on the insertion order');

SELECT results_eq($$
    SELECT p.account_id, p.period_start, p.line_no, p.kind, p.description, p.amount
      FROM pv p ORDER BY 1, 2, 3
$$, $$
    SELECT i.account_id, i.period_start, l.line_no, l.kind, l.description, l.amount
      FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
     WHERE i.account_id BETWEEN 9701 AND 9830 AND i.period_start IN ('2025-01-01', '2025-03-01')
     ORDER BY 1, 2, 3
$$, 'the preview of a period just before its finalization shows the invoice''s lines');

CREATE TEMP TABLE before_again AS
SELECT (SELECT count(*) FROM billing.invoices) AS invoices, (SELECT count(*) FROM billing.credit_ledger) AS ledger,
       (SELECT count(*) FROM billing.credit_grants) AS grants;
SELECT is((SELECT count(*) FROM billing.finalize_invoices('2025-05-01 01:00')), 0::bigint,
          'finalizing again creates no invoice');
SELECT is((SELECT (count(*), (SELECT count(*) FROM billing.credit_ledger), (SELECT count(*) FROM billing.credit_grants))::text
             FROM billing.invoices),
          (SELECT (invoices, ledger, grants)::text FROM before_again),
          'and books nothing: no draw, expiry, rollover or grant');

SELECT is_empty($$
    SELECT * FROM billing.verify_invoices() WHERE account_id BETWEEN 9701 AND 9830
    UNION ALL
    SELECT v.account_id, v.seq, NULL, v.problem FROM billing.verify_audit_log() v
     WHERE v.account_id BETWEEN 9701 AND 9830
    UNION ALL
    SELECT l.account_id, l.seq, NULL, 'no audit row' FROM billing.credit_ledger l
     WHERE l.account_id BETWEEN 9701 AND 9830
       AND NOT EXISTS (SELECT 1 FROM billing.audit_log a
                        WHERE a.account_id = l.account_id AND a.action = l.kind
                          AND (a.details ->> 'seq')::bigint = l.seq)
$$, 'verify_invoices and verify_audit_log find nothing, every ledger entry has its audit row');

SELECT * FROM finish();
ROLLBACK;
