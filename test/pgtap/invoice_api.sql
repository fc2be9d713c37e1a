-- invoice_api: the plan, invoice and re-rating functions of SPEC sections
-- 2, 4, 5 and 6 exist with their pinned signatures, argument names, defaults
-- and result columns; the pinned tables have their columns and keys; every
-- error raises its SQLSTATE.
BEGIN;
SELECT plan(112);

-- signatures ---------------------------------------------------------------
SELECT has_function('billing', 'invoice_preview', ARRAY['bigint', 'timestamp with time zone'],
                    'invoice_preview(account_id, at)');
SELECT function_returns('billing', 'invoice_preview', ARRAY['bigint', 'timestamp with time zone'], 'setof record');
-- SPEC 10.1: each line carries the charge's dimension, a column after the
-- pinned ones (so that clients reading them by position keep working)
SELECT is(proargnames, ARRAY['account_id', 'at', 'line_no', 'kind', 'meter', 'description',
                             'period_start', 'period_end', 'quantity', 'amount', 'dimension'],
          'invoice_preview argument names and result columns (dimension last)')
  FROM pg_proc WHERE oid = 'billing.invoice_preview(bigint, timestamptz)'::regprocedure;
SELECT is(pg_get_function_result('billing.invoice_preview(bigint, timestamptz)'::regprocedure),
          'TABLE(line_no integer, kind text, meter text, description text, period_start timestamp with time zone, period_end timestamp with time zone, quantity numeric, amount numeric, dimension text)',
          'invoice_preview result types');
SELECT is(pronargdefaults::int, 1, 'invoice_preview: at has a default')
  FROM pg_proc WHERE oid = 'billing.invoice_preview(bigint, timestamptz)'::regprocedure;

SELECT has_function('billing', 'finalize_invoices', ARRAY['timestamp with time zone'], 'finalize_invoices(as_of)');
SELECT function_returns('billing', 'finalize_invoices', ARRAY['timestamp with time zone'], 'setof record');
SELECT is(proargnames, ARRAY['as_of', 'invoice_id', 'account_id', 'period_start', 'period_end', 'total'],
          'finalize_invoices argument names and result columns')
  FROM pg_proc WHERE oid = 'billing.finalize_invoices(timestamptz)'::regprocedure;
SELECT is(pg_get_function_result('billing.finalize_invoices(timestamptz)'::regprocedure),
          'TABLE(invoice_id bigint, account_id bigint, period_start timestamp with time zone, period_end timestamp with time zone, total numeric)',
          'finalize_invoices result types');
SELECT is(pronargdefaults::int, 1, 'finalize_invoices: as_of has a default')
  FROM pg_proc WHERE oid = 'billing.finalize_invoices(timestamptz)'::regprocedure;

-- the pinned arguments lead; issue 18 adds an optional dimension (matrix charges)
SELECT has_function('billing', 'remaining', ARRAY['bigint', 'text', 'timestamp with time zone', 'text'],
                    'remaining(account_id, meter, at, dimension)');
SELECT function_returns('billing', 'remaining', ARRAY['bigint', 'text', 'timestamp with time zone', 'text'], 'numeric');
SELECT is(proargnames, ARRAY['account_id', 'meter', 'at', 'dimension'], 'remaining argument names')
  FROM pg_proc WHERE oid = 'billing.remaining(bigint, text, timestamptz, text)'::regprocedure;
SELECT is(pronargdefaults::int, 2, 'remaining: at and dimension have defaults')
  FROM pg_proc WHERE oid = 'billing.remaining(bigint, text, timestamptz, text)'::regprocedure;

-- rerate: the SPEC arguments lead; the implementation may add optional
-- arguments after them (SPEC: "extra optional arguments with defaults")
SELECT is((SELECT count(*)::int FROM pg_proc
            WHERE pronamespace = 'billing'::regnamespace AND proname = 'rerate'), 1, 'one rerate function');
SELECT is((proargtypes::regtype[])[0:3],
          ARRAY['timestamp with time zone', 'timestamp with time zone', 'bigint', 'boolean']::regtype[],
          'rerate(from_ts timestamptz, to_ts timestamptz, account_id bigint, dry_run boolean, ...)')
  FROM pg_proc WHERE pronamespace = 'billing'::regnamespace AND proname = 'rerate';
SELECT is(proargnames[1:4], ARRAY['from_ts', 'to_ts', 'account_id', 'dry_run'], 'rerate argument names')
  FROM pg_proc WHERE pronamespace = 'billing'::regnamespace AND proname = 'rerate';
SELECT ok(pronargdefaults >= pronargs - 2, 'rerate: account_id, dry_run and any extra arguments have defaults')
  FROM pg_proc WHERE pronamespace = 'billing'::regnamespace AND proname = 'rerate';
SELECT is(pg_get_function_result(oid),
          'TABLE(account_id bigint, invoice_id bigint, meter text, billed_quantity numeric, billed_amount numeric, correct_quantity numeric, correct_amount numeric, delta numeric, dimension text)',
          'rerate result columns (issue 18: the line''s dimension last)')
  FROM pg_proc WHERE pronamespace = 'billing'::regnamespace AND proname = 'rerate';
SELECT ok(proretset, 'rerate returns a set')
  FROM pg_proc WHERE pronamespace = 'billing'::regnamespace AND proname = 'rerate';

SELECT has_function('billing', 'correct_usage',
    ARRAY['bigint', 'text', 'timestamp with time zone', 'numeric', 'text', 'text'],
    'correct_usage(account_id, meter, bucket_start, delta, reason, dimension)');
SELECT function_returns('billing', 'correct_usage',
    ARRAY['bigint', 'text', 'timestamp with time zone', 'numeric', 'text', 'text'], 'void');
SELECT is(proargnames, ARRAY['account_id', 'meter', 'bucket_start', 'delta', 'reason', 'dimension'],
          'correct_usage argument names')
  FROM pg_proc WHERE oid = 'billing.correct_usage(bigint, text, timestamptz, numeric, text, text)'::regprocedure;
SELECT is(pronargdefaults::int, 1, 'correct_usage: dimension has a default')
  FROM pg_proc WHERE oid = 'billing.correct_usage(bigint, text, timestamptz, numeric, text, text)'::regprocedure;

SELECT has_function('billing', 'reconcile',
    ARRAY['regclass', 'name', 'name', 'name', 'name', 'timestamp with time zone', 'timestamp with time zone'],
    'reconcile(source, account_column, meter_column, quantity_column, ts_column, from_ts, to_ts)');
SELECT function_returns('billing', 'reconcile',
    ARRAY['regclass', 'name', 'name', 'name', 'name', 'timestamp with time zone', 'timestamp with time zone'],
    'setof record');
SELECT is(proargnames, ARRAY['source', 'account_column', 'meter_column', 'quantity_column', 'ts_column',
                             'from_ts', 'to_ts', 'account_id', 'meter', 'bucket_start',
                             'source_quantity', 'counted_quantity', 'difference'],
          'reconcile argument names and result columns')
  FROM pg_proc WHERE oid = 'billing.reconcile(regclass, name, name, name, name, timestamptz, timestamptz)'::regprocedure;
SELECT is(pg_get_function_result('billing.reconcile(regclass, name, name, name, name, timestamptz, timestamptz)'::regprocedure),
          'TABLE(account_id bigint, meter text, bucket_start timestamp with time zone, source_quantity numeric, counted_quantity numeric, difference numeric)',
          'reconcile result types');

-- GUCs (defined when the module is loaded: any C function loads it)
DO $$ BEGIN PERFORM billing.round_money(1, 'USD'); END $$;
SELECT is(current_setting('billing.grace_period'), '1h', 'billing.grace_period defaults to 1h');
SELECT is(current_setting('billing.rounding'), 'half_up', 'billing.rounding defaults to half_up');

-- tables ---------------------------------------------------------------------
SELECT columns_are('billing', 'plans', ARRAY['plan', 'period', 'currency'], 'plans columns');
SELECT col_is_pk('billing', 'plans', 'plan', 'plans keyed by plan');
SELECT col_default_is('billing', 'plans', 'period', '1 mon'::interval, 'a plan bills monthly by default');
SELECT col_default_is('billing', 'plans', 'currency', 'USD', 'a plan bills in USD by default');
SELECT col_type_is('billing', 'charges', 'price', 'billing', 'price', 'charges.price is a billing.price');
SELECT col_not_null('billing', 'charges', 'price', 'a charge has a price');
SELECT col_not_null('billing', 'charges', 'valid_from', 'a charge version has a valid_from');
SELECT col_default_is('billing', 'charges', 'valid_from', '-infinity'::timestamptz, 'valid_from defaults to -infinity');
SELECT col_is_null('billing', 'charges', 'meter', 'a charge''s meter may be NULL (a fixed fee)');
SELECT col_type_is('billing', 'subscriptions', 'starts_at', 'timestamp with time zone', 'subscriptions.starts_at');
SELECT col_not_null('billing', 'subscriptions', 'starts_at', 'a subscription starts');
SELECT col_is_null('billing', 'subscriptions', 'ends_at', 'a subscription may be open-ended');
SELECT col_type_is('billing', 'subscriptions', 'spend_cap', 'numeric', 'spend_cap is numeric');
SELECT col_is_pk('billing', 'invoices', ARRAY['account_id', 'invoice_id'], 'invoices keyed by (account_id, invoice_id)');
SELECT has_column('billing', 'invoices', c, 'invoices.' || c)
  FROM unnest(ARRAY['period_start', 'period_end', 'currency', 'total', 'status', 'finalized_at']) AS c;
SELECT col_is_pk('billing', 'invoice_lines', ARRAY['account_id', 'invoice_id', 'line_no'],
                 'invoice_lines keyed by (account_id, invoice_id, line_no)');
SELECT has_column('billing', 'invoice_lines', c, 'invoice_lines.' || c)
  FROM unnest(ARRAY['kind', 'meter', 'description', 'quantity', 'amount']) AS c;
SELECT is((SELECT array_agg(a.attname::text ORDER BY k.i)
             FROM pg_index x, unnest(x.indkey) WITH ORDINALITY AS k(attnum, i), pg_attribute a
            WHERE x.indrelid = t.oid AND x.indisprimary AND a.attrelid = t.oid AND a.attnum = k.attnum)
          [1], 'account_id', t.relname || ': the key leads with account_id')
  FROM pg_class t
 WHERE t.relnamespace = 'billing'::regnamespace
   AND t.relname IN ('subscriptions', 'invoices', 'invoice_lines', 'adjustments', 'usage_corrections');

-- fixtures ---------------------------------------------------------------------
SET LOCAL timezone = 'UTC';
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('api_err', 'sum', '100 years'), ('api_cnt', 'count', '100 years'), ('api_max', 'max', '100 years');
INSERT INTO billing.accounts (account_id, currency) VALUES
    (7101, 'USD'), (7102, 'EUR'), (7103, 'USD'), (7104, 'USD');
INSERT INTO billing.plans (plan, currency) VALUES ('api_usd', 'USD'), ('api_eur', 'EUR');
INSERT INTO billing.charges (plan, meter, price, description) VALUES
    ('api_usd', NULL, 'flat 10', 'Base'),
    ('api_usd', 'api_err', 'unit 0.01', 'Errors'),
    ('api_eur', NULL, 'flat 10', 'Base');
INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap) VALUES
    (7101, 'api_usd', '2024-01-01', 100),
    (7102, 'api_eur', '2024-01-01', NULL),
    (7104, 'api_usd', '2024-06-01', NULL);
DO $$
BEGIN
    PERFORM billing.record(7101, 'api_err', 100, '2024-01-10 10:00');
    PERFORM billing.record(7101, 'api_max', 3, '2024-01-10 10:00');
END $$;
SET LOCAL client_min_messages = warning;
CREATE TABLE api_events (account_id bigint, meter text, qty numeric, ts timestamptz);

SELECT lives_ok($$SELECT * FROM billing.invoice_preview(7101, '2024-01-20')$$, 'invoice_preview');
SELECT lives_ok($$SELECT * FROM billing.invoice_preview(account_id => 7101, at => '2024-01-20')$$,
                'invoice_preview in named notation');
SELECT lives_ok($$SELECT billing.remaining(account_id => 7101, meter => 'api_err', at => '2024-01-20')$$,
                'remaining in named notation');
SELECT is((SELECT count(*)::int FROM billing.finalize_invoices(as_of => '2024-02-01 01:00')
            WHERE account_id IN (7101, 7102)), 2, 'finalize_invoices in named notation');
SELECT lives_ok($$SELECT * FROM billing.rerate(from_ts => '2024-01-01', to_ts => '2024-02-01',
                                               account_id => 7101, dry_run => true)$$,
                'rerate in named notation');
SELECT lives_ok($$SELECT * FROM billing.rerate('2024-01-01', '2024-02-01')$$, 'rerate with its defaults');
SELECT lives_ok($$SELECT billing.correct_usage(account_id => 7101, meter => 'api_err',
                                               bucket_start => '2024-01-10 10:00', delta => 1,
                                               reason => 'named', dimension => '')$$,
                'correct_usage in named notation');
SELECT lives_ok($$SELECT * FROM billing.reconcile(source => 'api_events', account_column => 'account_id',
                                                  meter_column => 'meter', quantity_column => 'qty',
                                                  ts_column => 'ts', from_ts => '2024-01-01', to_ts => '2024-02-01')$$,
                'reconcile in named notation');

-- plans and subscriptions ------------------------------------------------------
SELECT throws_ok($$INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (7103, 'api_eur', '2024-01-01')$$,
                 '22023', NULL, 'a plan in another currency than the account''s');
SELECT throws_ok($$UPDATE billing.subscriptions SET plan = 'api_usd' WHERE account_id = 7102$$,
                 '22023', NULL, 'moving a subscription to a plan in another currency');
SELECT throws_ok($$UPDATE billing.accounts SET currency = 'EUR' WHERE account_id = 7104$$,
                 '22023', NULL, 'changing the currency of an account subscribed in USD');
SELECT throws_ok($$INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (7101, 'api_usd', '2024-03-01')$$,
                 '23P01', NULL, 'overlapping subscriptions');
SELECT throws_ok($$INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at)
                   VALUES (7101, 'api_usd', '2023-12-01', '2024-01-01 00:00:01')$$,
                 '23P01', NULL, 'a subscription ending after the next one starts');
SELECT lives_ok($$INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at)
                  VALUES (7101, 'api_usd', '2023-12-01', '2024-01-01')$$,
                'a subscription ending where the next one starts');
SELECT throws_ok($$DELETE FROM billing.subscriptions WHERE account_id = 7101 AND starts_at = '2024-01-01'$$,
                 '55000', NULL, 'deleting an invoiced subscription');
SELECT throws_ok($$UPDATE billing.subscriptions SET starts_at = '2024-01-02' WHERE account_id = 7101 AND starts_at = '2024-01-01'$$,
                 '55000', NULL, 'moving the start of an invoiced subscription');
SELECT throws_ok($$UPDATE billing.plans SET period = '1 day' WHERE plan = 'api_usd'$$,
                 '55000', NULL, 'changing the period of a plan in use');
SELECT throws_ok($$UPDATE billing.plans SET currency = 'EUR' WHERE plan = 'api_usd'$$,
                 '55000', NULL, 'changing the currency of a plan in use');

-- invoices are immutable ---------------------------------------------------------
SELECT throws_ok($$UPDATE billing.invoices SET total = 0 WHERE account_id = 7101$$, '55000', NULL, 'UPDATE invoices');
SELECT throws_ok($$DELETE FROM billing.invoices WHERE account_id = 7101$$, '55000', NULL, 'DELETE invoices');
SELECT throws_ok($$TRUNCATE billing.invoices CASCADE$$, '55000', NULL, 'TRUNCATE invoices');
SELECT throws_ok($$UPDATE billing.invoice_lines SET amount = 0 WHERE account_id = 7101$$, '55000', NULL,
                 'UPDATE invoice_lines');
SELECT throws_ok($$DELETE FROM billing.invoice_lines WHERE account_id = 7101$$, '55000', NULL, 'DELETE invoice_lines');
SELECT throws_ok($$TRUNCATE billing.invoice_lines$$, '55000', NULL, 'TRUNCATE invoice_lines');
SELECT throws_ok($$UPDATE billing.charges SET price = 'unit 0.02' WHERE plan = 'api_usd' AND meter = 'api_err'$$,
                 '55000', NULL, 'UPDATE of a charge version that rated an invoice');
SELECT throws_ok($$DELETE FROM billing.charges WHERE plan = 'api_usd' AND meter = 'api_err'$$,
                 '55000', NULL, 'DELETE of a charge version that rated an invoice');
SELECT lives_ok($$INSERT INTO billing.charges (plan, meter, price, valid_from, description)
                  VALUES ('api_usd', 'api_err', 'unit 0.02', '2024-02-01', 'Errors')$$,
                'a new version of a charge that rated an invoice');
SELECT lives_ok($$UPDATE billing.charges SET price = 'unit 0.03' WHERE plan = 'api_usd' AND meter = 'api_err'
                                                           AND valid_from = '2024-02-01'$$,
                'a version that rated nothing can change');
SELECT throws_ok($$SELECT * FROM billing.finalize_invoices(NULL)$$, '22004', NULL, 'finalize_invoices(NULL)');

-- remaining ---------------------------------------------------------------------
SELECT throws_ok($$SELECT billing.remaining(7199, 'api_err', '2024-01-20')$$, '23503', NULL, 'remaining: unknown account');
SELECT throws_ok($$SELECT billing.remaining(7101, 'api_nope', '2024-01-20')$$, '23503', NULL, 'remaining: unknown meter');
SELECT throws_ok($$SELECT billing.remaining(NULL, 'api_err', '2024-01-20')$$, '22004', NULL, 'remaining: NULL account');
SELECT throws_ok($$SELECT billing.remaining(7101, 'api_err', NULL)$$, '22004', NULL, 'remaining: NULL at');

-- correct_usage -------------------------------------------------------------------
SELECT throws_ok($$SELECT billing.correct_usage(7101, 'api_err', '2024-01-10 10:00', -1, NULL)$$,
                 '22004', NULL, 'correct_usage: no reason');
SELECT throws_ok($$SELECT billing.correct_usage(7101, 'api_err', '2024-01-10 10:00', -1, '')$$,
                 '22004', NULL, 'correct_usage: an empty reason');
SELECT throws_ok($$SELECT billing.correct_usage(7101, 'api_err', '2024-01-10 10:00', -102, 'too much')$$,
                 '22023', NULL, 'correct_usage: a bucket would go negative');
SELECT throws_ok($$SELECT billing.correct_usage(7101, 'api_max', '2024-01-10 10:00', 1, 'max meter')$$,
                 '22023', NULL, 'correct_usage: a max meter');
SELECT throws_ok($$SELECT billing.correct_usage(7101, 'api_err', '2024-01-10 10:00:30', 1, 'mid-bucket')$$,
                 '22023', NULL, 'correct_usage: not the start of a bucket');
SELECT throws_ok($$SELECT billing.correct_usage(7101, 'api_err', '2024-01-10 10:00', 'NaN', 'nan')$$,
                 '22023', NULL, 'correct_usage: a NaN delta');
SELECT throws_ok($$SELECT billing.correct_usage(7101, 'api_nope', '2024-01-10 10:00', 1, 'no meter')$$,
                 '23503', NULL, 'correct_usage: unknown meter');
SELECT throws_ok($$SELECT billing.correct_usage(7199, 'api_err', '2024-01-10 10:00', 1, 'no account')$$,
                 '23503', NULL, 'correct_usage: unknown account');
SELECT throws_ok($$SELECT billing.correct_usage(7101, 'api_err', '2024-01-10 10:00', NULL, 'no delta')$$,
                 '22004', NULL, 'correct_usage: NULL delta');
SELECT lives_ok($$SELECT billing.correct_usage(7101, 'api_cnt', '2024-01-10 10:00', 2, 'count meter')$$,
                'correct_usage: a count meter');
SELECT lives_ok($$SELECT billing.correct_usage(7101, 'api_err', '2024-01-10 10:00', -101, 'down to zero')$$,
                'correct_usage: down to exactly zero');

-- rerate and reconcile ------------------------------------------------------------
SELECT throws_ok($$SELECT * FROM billing.rerate('2024-02-01', '2024-01-01')$$, '22023', NULL, 'rerate: reversed range');
SELECT throws_ok($$SELECT * FROM billing.rerate('2024-01-01', '2024-01-01')$$, '22023', NULL, 'rerate: empty range');
SELECT throws_ok($$SELECT * FROM billing.rerate(NULL, '2024-01-01')$$, '22004', NULL, 'rerate: NULL from_ts');
SELECT throws_ok($$SELECT * FROM billing.rerate('2024-01-01', '2024-02-01', NULL, NULL)$$, '22004', NULL,
                 'rerate: NULL dry_run');
SELECT throws_ok($$SELECT * FROM billing.reconcile('api_events', 'account_id', 'meter', 'nope', 'ts',
                                                   '2024-01-01', '2024-02-01')$$,
                 '42703', NULL, 'reconcile: missing column');
SELECT throws_ok($$SELECT * FROM billing.reconcile('api_events', 'account_id', 'meter', 'qty', 'ts',
                                                   NULL, '2024-02-01')$$,
                 '22004', NULL, 'reconcile: NULL from_ts');

SELECT index_is_unique('billing', 'invoices', 'invoices_invoice_id_key',
                       'invoice_id is unique on its own too (SPEC section 5)');

SELECT * FROM finish();
ROLLBACK;
