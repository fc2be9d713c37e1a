-- price_per_invoices: prices with the per modifier on invoices and under a
-- spend cap.  (1) remaining() against a brute force over random volume,
-- graduated and unit prices with per N (round up, round down, exact) and
-- free units (and some without per), on 40 capped accounts: the answer is the first whole number
-- of units x from the period's usage q0 such that q0 + x + 1 would be over
-- the cap.  (2) An invoice of per prices: the finalized lines equal the
-- preview and an independent rating, and verify_invoices finds nothing.
BEGIN;
SELECT plan(6);
SELECT setseed(0.1818);
SET LOCAL timezone = 'UTC';
SET LOCAL client_min_messages = warning;

CREATE FUNCTION pg_temp.pick(a text[]) RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT a[1 + floor(random() * array_length(a, 1))::int]
$$;

-- a random price, mostly with a per modifier; volume prices get cheaper
-- past a bound, so the charge can drop as usage grows
CREATE FUNCTION pg_temp.gen_per_price() RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    b1 int := 1 + floor(random() * 20)::int;
    b2 int := b1 + 1 + floor(random() * 40)::int;
    model text := pg_temp.pick('{volume, volume, volume, graduated, unit}');
    s text;
BEGIN
    IF model = 'unit' THEN
        s := 'unit ' || pg_temp.pick('{0.1, 0.25, 1, 1.5}');
    ELSE
        s := model || ' ' || b1 || ' @ ' || pg_temp.pick('{1, 2, 0.75}') ||
             CASE WHEN random() < 0.3 THEN ' + ' || pg_temp.pick('{1, 2.5}') ELSE '' END ||
             ' | ' || b2 || ' @ ' || pg_temp.pick('{0.5, 0.3, 0.25}') ||
             CASE WHEN random() < 0.3 THEN ' + ' || pg_temp.pick('{0.5, 3}') ELSE '' END ||
             ' | inf @ ' || pg_temp.pick('{0.1, 0.2}');
    END IF;
    IF random() < 0.3 THEN
        s := s || ' free ' || pg_temp.pick('{1, 2.5, 5}');
    END IF;
    IF random() < 0.15 THEN
        RETURN s;                 -- without per, for comparison
    END IF;
    RETURN s || ' per ' ||
           CASE floor(random() * 3)::int
           WHEN 0 THEN pg_temp.pick('{2, 3, 7, 10, 0.5, 2.5}')
           WHEN 1 THEN pg_temp.pick('{2, 3, 7, 10, 0.5, 2.5}') || ' round down'
           ELSE pg_temp.pick('{2, 4, 10, 0.5, 2.5, 1.25}') || ' exact' END;
END $$;

-- (1) one plan, meter, account and cap per price
CREATE TEMP TABLE rp AS
SELECT 8500 + g AS account_id, 'pr_m' || g AS meter, 'pr_p' || g AS plan,
       pg_temp.gen_per_price()::billing.price AS price,
       (floor(random() * 60) / CASE WHEN random() < 0.3 THEN 2 ELSE 1 END)::numeric AS q0,
       (2 + floor(random() * 15))::numeric AS cap
  FROM generate_series(1, 40) g;
INSERT INTO billing.meters (meter, late_window) SELECT meter, '100 years' FROM rp;
INSERT INTO billing.plans (plan) SELECT plan FROM rp;
INSERT INTO billing.charges (plan, meter, price) SELECT plan, meter, price FROM rp;
INSERT INTO billing.accounts (account_id) SELECT account_id FROM rp;
INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap)
SELECT account_id, plan, '2025-06-01', cap FROM rp;
DO $$ BEGIN PERFORM billing.record(account_id, meter, q0, '2025-06-03') FROM rp WHERE q0 > 0; END $$;

-- brute force: the first x with q0 + x + 1 over the cap (0 when q0 already is)
CREATE TEMP TABLE rp_check AS
SELECT r.account_id, r.price, r.q0, r.cap,
       billing.remaining(r.account_id, r.meter, '2025-06-20') AS remaining,
       CASE WHEN NOT billing._fits(r.price, r.q0, 'USD', r.cap) THEN 0
            ELSE (SELECT min(x) FROM generate_series(0, 5000) x
                   WHERE NOT billing._fits(r.price, r.q0 + x + 1, 'USD', r.cap)) END AS brute
  FROM rp r;
SELECT ok((SELECT count(*) FILTER (WHERE price::text LIKE 'volume%') >= 15
              AND count(*) FILTER (WHERE price::text LIKE '%round down%') >= 5
              AND count(*) FILTER (WHERE price::text LIKE '%exact%') >= 5
              AND count(*) FILTER (WHERE brute > 0) >= 20 FROM rp_check),
          'volume prices, every per rounding, and room left under most caps');
SELECT is((SELECT count(*) FROM rp_check WHERE remaining IS DISTINCT FROM brute), 0::bigint,
          'remaining = brute force on 40 accounts with per prices');
SELECT diag(format('%s %s q0=%s cap=%s remaining=%s brute=%s', account_id, price, q0, cap, remaining, brute))
  FROM rp_check WHERE remaining IS DISTINCT FROM brute LIMIT 5;

-- (2) an invoice of per prices
INSERT INTO billing.meters (meter, late_window) VALUES
    ('pr_bytes', '100 years'), ('pr_req', '100 years'), ('pr_sec', '100 years');
INSERT INTO billing.plans (plan) VALUES ('pr_team');
INSERT INTO billing.charges (plan, meter, price, description) VALUES
    ('pr_team', NULL, 'flat 20', 'Base'),
    ('pr_team', 'pr_bytes', 'unit 0.25 per 1000000000', 'Storage per started GB'),
    ('pr_team', 'pr_req', 'graduated 5 @ 0 | inf @ 1 per 1000 round down', 'Requests per thousand'),
    ('pr_team', 'pr_sec', 'volume 10 @ 0.02 | inf @ 0.01 per 0.5 exact', 'Compute per half second');
INSERT INTO billing.accounts (account_id) SELECT a FROM generate_series(8601, 8610) a;
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
SELECT a, 'pr_team', '2025-06-01' FROM generate_series(8601, 8610) a;
CREATE TEMP TABLE pr_usage AS
SELECT a AS account_id, m AS meter,
       CASE m WHEN 'pr_bytes' THEN floor(random() * 5e9)
              WHEN 'pr_req' THEN floor(random() * 20000)
              ELSE round((random() * 100)::numeric, 1) END::numeric AS q
  FROM generate_series(8601, 8610) a, unnest('{pr_bytes,pr_req,pr_sec}'::text[]) m;
DO $$ BEGIN PERFORM billing.record(account_id, meter, q, '2025-06-05') FROM pr_usage; END $$;

CREATE TEMP TABLE pr_preview AS
SELECT a AS account_id, p.kind, p.meter, p.quantity, p.amount
  FROM generate_series(8601, 8610) a, billing.invoice_preview(a, '2025-06-15') p;
-- independent: per N by hand, then the model
SELECT set_eq($$SELECT account_id, meter, amount FROM pr_preview WHERE kind = 'usage'$$,
              $$SELECT account_id, meter, billing.round_money(CASE meter
                    WHEN 'pr_bytes' THEN ceil(q / 1e9) * 0.25
                    WHEN 'pr_req' THEN greatest(floor(q / 1000) - 5, 0)
                    ELSE CASE WHEN q * 2 <= 10 THEN q * 2 * 0.02 ELSE q * 2 * 0.01 END END, 'USD')
                  FROM pr_usage$$,
              'the preview rates per prices as per N by hand does');
SELECT is((SELECT count(*) FROM billing.finalize_invoices('2025-07-01 01:00') f
            WHERE f.account_id BETWEEN 8601 AND 8610), 10::bigint, 'finalize: 10 invoices');
SELECT set_eq($$SELECT i.account_id, l.kind, l.meter::text, l.quantity, l.amount
                  FROM billing.invoices i JOIN billing.invoice_lines l USING (account_id, invoice_id)
                 WHERE i.account_id BETWEEN 8601 AND 8610$$,
              $$SELECT account_id, kind, meter, quantity, amount FROM pr_preview$$,
              'every finalized line equals the preview');
SELECT is_empty($$SELECT * FROM billing.verify_invoices() WHERE account_id BETWEEN 8601 AND 8610$$,
                'verify_invoices finds nothing wrong');

SELECT * FROM finish();
ROLLBACK;
