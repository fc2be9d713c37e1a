-- bad_input: every public function called with NULLs, empty strings,
-- negative and huge numbers, NaN and Infinity, wrong currencies and
-- out-of-range timestamps answers with its documented SQLSTATE (or a
-- documented result; 'ok': it runs), never XX000 and never a crash.  The SQLSTATEs are
-- listed in doc/billing.md ("Bad input").  One test per call; the
-- last tests check that no call raised XX000 and the backend survived.
-- Times are relative to now() where the window of accepted reports is the
-- point; only SQLSTATEs are checked, the same at any time of day.
BEGIN;
SELECT plan(275);
\ir ../helpers.sql

-- fixtures
INSERT INTO billing.meters (meter, aggregation) VALUES
    ('bx_sum', 'sum'), ('bx_max', 'max'), ('bx_last', 'last'), ('bx_count', 'count');
INSERT INTO billing.accounts (account_id, currency) VALUES (9001, 'USD'), (9002, 'EUR'), (9003, 'JPY');
INSERT INTO billing.plans (plan, period, currency) VALUES ('bx_usd', '1 month', 'USD'), ('bx_eur', '1 month', 'EUR');
INSERT INTO billing.charges (plan, meter, price) VALUES ('bx_usd', 'bx_sum', 'unit 0.01');
INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap)
    VALUES (9001, 'bx_usd', date_trunc('month', now()) - interval '2 months', 100);
CREATE TABLE pg_temp.bx_t (a bigint, m text, q numeric, ts timestamptz, e text, d text);

-- value_of: the text of the first column of the first row ('<null>' for NULL)
CREATE FUNCTION pg_temp.value_of(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v text;
BEGIN
    EXECUTE q INTO v;
    RETURN coalesce(v, '<null>');
EXCEPTION WHEN OTHERS THEN
    RETURN 'error ' || SQLSTATE;
END
$$;

CREATE TEMP TABLE cases (n serial, expect text, q text, got text);
INSERT INTO cases (expect, q) VALUES
-- billing.price text input: 22P02, binary input: 22P03 ---------------------------------------------------
('22P02', $$SELECT ''::billing.price$$),
('22P02', $$SELECT '   '::billing.price$$),
('22P02', $$SELECT 'unit -1'::billing.price$$),
('22P02', $$SELECT 'unit NaN'::billing.price$$),
('22P02', $$SELECT 'unit Infinity'::billing.price$$),
('22P02', $$SELECT 'unit 1e5'::billing.price$$),
('22P02', $$SELECT 'unit 999999999999999999999999999999999999999'::billing.price$$),
('22P02', $$SELECT 'unit 0.000000000000000000001'::billing.price$$),
('22P02', $$SELECT 'package 0 @ 1'::billing.price$$),
('22P02', $$SELECT 'graduated 10 @ 1 | 5 @ 1 | inf @ 1'::billing.price$$),
('22P02', $$SELECT 'graduated inf @ 1 | 10 @ 1'::billing.price$$),
('22P02', $$SELECT 'unit 1 min 5 max 1'::billing.price$$),
('22P02', $$SELECT 'unit 1 free 1 free 2'::billing.price$$),
('22P02', $$SELECT E'unit 1\x01'::billing.price$$),
('22P03', $$SELECT billing._price_recv(''::bytea)$$),
('22P03', $$SELECT billing._price_recv('\x00'::bytea)$$),
('22P03', $$SELECT billing._price_recv('\x03756e69742031'::bytea)$$),
('22P03', $$SELECT billing._price_recv('\x01'::bytea)$$),
('22P03', $$SELECT billing._price_recv('\x01ff'::bytea)$$),
-- rate, rate_tiers: 22023 for negative, NaN or infinite quantities; huge ones are exact
('22023', $$SELECT billing.rate('unit 1', -1)$$),
('22023', $$SELECT billing.rate('unit 1', -0.000000000000000000000000001)$$),
('22023', $$SELECT billing.rate('unit 1', 'NaN')$$),
('22023', $$SELECT billing.rate('unit 1', 'Infinity')$$),
('22023', $$SELECT billing.rate('unit 1', '-Infinity')$$),
('ok', $$SELECT billing.rate('unit 1', 1e300)$$),
('ok', $$SELECT billing.rate('unit 99999999999999999999999999999999999999', 1e130000)$$),
('ok', $$SELECT billing.rate('graduated 10 @ 1 | inf @ 2 + 5', 1e-300)$$),
('22023', $$SELECT * FROM billing.rate_tiers('unit 1', -1)$$),
('22023', $$SELECT * FROM billing.rate_tiers('unit 1', 'NaN')$$),
('22023', $$SELECT * FROM billing.rate_tiers('unit 1', 'Infinity')$$),
('ok', $$SELECT * FROM billing.rate_tiers('graduated 10 @ 1 | inf @ 2', 1e300)$$),
-- price_from_jsonb: 22P02; price_from_stripe: 22023 (also for wrong currencies)
('22P02', $$SELECT billing.price_from_jsonb('{}')$$),
('22P02', $$SELECT billing.price_from_jsonb('null')$$),
('22P02', $$SELECT billing.price_from_jsonb('[]')$$),
('22P02', $$SELECT billing.price_from_jsonb('""')$$),
('22P02', $$SELECT billing.price_from_jsonb('{"model": "unit", "amount": "-1"}')$$),
('22P02', $$SELECT billing.price_from_jsonb('{"model": "unit", "amount": "NaN"}')$$),
('22P02', $$SELECT billing.price_from_jsonb('{"model": "unit", "amount": 1e400}')$$),
('22P02', $$SELECT billing.price_from_jsonb('{"model": "unit", "amount": null}')$$),
('22P02', $$SELECT billing.price_from_jsonb('{"model": "graduated", "tiers": []}')$$),
('22P02', $$SELECT billing.price_from_jsonb('{"model": "graduated", "tiers": [{}]}')$$),
('22P02', $$SELECT billing.price_from_jsonb('{"model": "graduated", "tiers": [1]}')$$),
('22023', $$SELECT billing.price_from_stripe('{}')$$),
('22023', $$SELECT billing.price_from_stripe('null')$$),
('22023', $$SELECT billing.price_from_stripe('{"billing_scheme": "per_unit", "unit_amount_decimal": "-5", "currency": "usd"}')$$),
('22023', $$SELECT billing.price_from_stripe('{"billing_scheme": "per_unit", "unit_amount_decimal": "NaN", "currency": "usd"}')$$),
('22023', $$SELECT billing.price_from_stripe('{"billing_scheme": "per_unit", "unit_amount": 1e400, "currency": "usd"}')$$),
('22023', $$SELECT billing.price_from_stripe('{"billing_scheme": "per_unit", "unit_amount_decimal": "5", "currency": "xxx"}')$$),
('22023', $$SELECT billing.price_from_stripe('{"billing_scheme": "per_unit", "unit_amount_decimal": "5", "currency": ""}')$$),
('22023', $$SELECT billing.price_from_stripe('{"billing_scheme": "per_unit", "unit_amount_decimal": "5"}')$$),
('22023', $$SELECT billing.price_from_stripe('{"billing_scheme": "per_unit", "unit_amount_decimal": "5", "currency": "usd", "transform_quantity": {"divide_by": 0, "round": "up"}}')$$),
('22023', $$SELECT billing.price_from_stripe('{"billing_scheme": "per_unit", "unit_amount_decimal": "5", "currency": "usd", "transform_quantity": {"divide_by": -3, "round": "up"}}')$$),
('22023', $$SELECT billing.price_from_stripe('{"billing_scheme": "tiered", "tiers_mode": "graduated", "currency": "usd", "tiers": []}')$$),
('22023', $$SELECT billing.price_from_stripe('{"billing_scheme": "tiered", "tiers_mode": "graduated", "currency": "usd", "tiers": [{"up_to": -1, "unit_amount_decimal": "1"}]}')$$),
-- round_money: 22023 for unknown currencies and non-finite amounts
('22023', $$SELECT billing.round_money(1.005, '')$$),
('22023', $$SELECT billing.round_money(1.005, 'XXX')$$),
('22023', $$SELECT billing.round_money(1.005, 'US')$$),
('22023', $$SELECT billing.round_money(1.005, 'USDX')$$),
('22023', $$SELECT billing.round_money('NaN', 'USD')$$),
('22023', $$SELECT billing.round_money('Infinity', 'USD')$$),
('22023', $$SELECT billing.round_money('-Infinity', 'USD')$$),
('ok', $$SELECT billing.round_money(-1e300, 'USD')$$),
('ok', $$SELECT billing.round_money(1e131071, 'JPY')$$),
-- record: 22004 NULL, 23503 unknown meter or account, 22023 quantity, 22007 timestamp, 22023 event id or dimension too long
('22004', $$SELECT billing.record(NULL, 'bx_sum', 1)$$),
('22004', $$SELECT billing.record(9001, NULL, 1)$$),
('22004', $$SELECT billing.record(9001, 'bx_sum', NULL)$$),
('22004', $$SELECT billing.record(9001, 'bx_sum', 1, NULL)$$),
('23503', $$SELECT billing.record(9001, '', 1)$$),
('23503', $$SELECT billing.record(9001, 'nosuch', 1)$$),
('23503', $$SELECT billing.record(9001, repeat('m', 1000), 1)$$),
('23503', $$SELECT billing.record(9001, E'bx_sum\x01', 1)$$),
('23503', $$SELECT billing.record(424242, 'bx_sum', 1)$$),
('23503', $$SELECT billing.record(0, 'bx_sum', 1)$$),
('23503', $$SELECT billing.record(-1, 'bx_sum', 1)$$),
('23503', $$SELECT billing.record(9223372036854775807, 'bx_sum', 1)$$),
('23503', $$SELECT billing.record(-9223372036854775808, 'bx_sum', 1)$$),
('22023', $$SELECT billing.record(9001, 'bx_sum', -1)$$),
('22023', $$SELECT billing.record(9001, 'bx_count', -1)$$),
('22023', $$SELECT billing.record(9001, 'bx_sum', -1e-30)$$),
('22023', $$SELECT billing.record(9001, 'bx_sum', 'NaN')$$),
('22023', $$SELECT billing.record(9001, 'bx_max', 'NaN')$$),
('22023', $$SELECT billing.record(9001, 'bx_sum', 'Infinity')$$),
('22023', $$SELECT billing.record(9001, 'bx_max', 'Infinity')$$),
('22023', $$SELECT billing.record(9001, 'bx_last', '-Infinity')$$),
('ok', $$SELECT billing.record(9001, 'bx_max', -1)$$),
('ok', $$SELECT billing.record(9001, 'bx_last', -1e300)$$),
('ok', $$SELECT billing.record(9001, 'bx_sum', 1e300)$$),
('ok', $$SELECT billing.record(9001, 'bx_sum', 0.000000000000000000000000000001)$$),
('22007', $$SELECT billing.record(9001, 'bx_sum', 1, 'infinity')$$),
('22007', $$SELECT billing.record(9001, 'bx_sum', 1, '-infinity')$$),
('22007', $$SELECT billing.record(9001, 'bx_sum', 1, '4713-01-01 00:00:00+00 BC')$$),
('22007', $$SELECT billing.record(9001, 'bx_sum', 1, '294276-12-31 00:00:00+00')$$),
('22007', $$SELECT billing.record(9001, 'bx_sum', 1, now() + interval '5 minutes 1 second')$$),
('22007', $$SELECT billing.record(9001, 'bx_sum', 1, now() - interval '35 days 1 second')$$),
('ok', $$SELECT billing.record(9001, 'bx_sum', 1, now(), NULL, NULL)$$),
('ok', $$SELECT billing.record(9001, 'bx_sum', 1, now(), '')$$),
('22023', $$SELECT billing.record(9001, 'bx_sum', 1, now(), (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 300) g))$$),
-- ingest: the same per report, 22004 NULL arrays or elements, 22023 bad arrays
('22004', $$SELECT * FROM billing.ingest(NULL, 0, 1, '{9001}', '{bx_sum}', '{1}', ARRAY[now()])$$),
('22004', $$SELECT * FROM billing.ingest('s', NULL, 1, '{9001}', '{bx_sum}', '{1}', ARRAY[now()])$$),
('22004', $$SELECT * FROM billing.ingest('s', 0, NULL, '{9001}', '{bx_sum}', '{1}', ARRAY[now()])$$),
('22004', $$SELECT * FROM billing.ingest('s', 0, 1, NULL, '{bx_sum}', '{1}', ARRAY[now()])$$),
('22004', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001}', NULL, '{1}', ARRAY[now()])$$),
('22004', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001}', '{bx_sum}', NULL, ARRAY[now()])$$),
('22004', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001}', '{bx_sum}', '{1}', NULL)$$),
('22004', $$SELECT * FROM billing.ingest('s', 0, 1, '{NULL}', '{bx_sum}', '{1}', ARRAY[now()])$$),
('22004', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001}', '{NULL}', '{1}', ARRAY[now()])$$),
('22004', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001}', '{bx_sum}', '{NULL}', ARRAY[now()])$$),
('22004', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001}', '{bx_sum}', '{1}', ARRAY[NULL::timestamptz])$$),
('22023', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001,9001}', '{bx_sum}', '{1}', ARRAY[now()])$$),
('22023', $$SELECT * FROM billing.ingest('s', 0, 1, '{{9001}}', '{{bx_sum}}', '{{1}}', ARRAY[[now()]])$$),
('22023', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001}', '{bx_sum}', '{NaN}', ARRAY[now()])$$),
('22023', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001}', '{bx_sum}', '{-1}', ARRAY[now()])$$),
('22023', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001}', '{bx_sum}', '{Infinity}', ARRAY[now()])$$),
('22007', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001}', '{bx_sum}', '{1}', ARRAY['infinity'::timestamptz])$$),
('22007', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001}', '{bx_sum}', '{1}', ARRAY['294276-01-01'::timestamptz])$$),
('23503', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001,424242}', '{bx_sum,bx_sum}', '{1,1}', ARRAY[now(), now()])$$),
('23503', $$SELECT * FROM billing.ingest('s', 0, 1, '{9001}', '{nosuch}', '{1}', ARRAY[now()])$$),
('ok', $$SELECT * FROM billing.ingest('s', 0, 1, '{}', '{}', '{}', '{}')$$),
('ok', $$SELECT * FROM billing.ingest('', -1, -1, '{9001}', '{bx_sum}', '{1}', ARRAY[now()], '{NULL}', '{NULL}')$$),
('ok', $$SELECT * FROM billing.ingest('s', 0, 9223372036854775807, '{9001}', '{bx_sum}', '{1}', ARRAY[now()])$$),
-- report_cumulative
('22004', $$SELECT billing.report_cumulative(NULL, 9001, 'bx_sum', now(), 1)$$),
('22004', $$SELECT billing.report_cumulative('c', NULL, 'bx_sum', now(), 1)$$),
('22004', $$SELECT billing.report_cumulative('c', 9001, NULL, now(), 1)$$),
('22004', $$SELECT billing.report_cumulative('c', 9001, 'bx_sum', NULL, 1)$$),
('22004', $$SELECT billing.report_cumulative('c', 9001, 'bx_sum', now(), NULL)$$),
('22023', $$SELECT billing.report_cumulative('c', 9001, 'bx_sum', now(), -1)$$),
('22023', $$SELECT billing.report_cumulative('c', 9001, 'bx_sum', now(), 'NaN')$$),
('22023', $$SELECT billing.report_cumulative('c', 9001, 'bx_sum', now(), 'Infinity')$$),
('22023', $$SELECT billing.report_cumulative('c', 9001, 'bx_max', now(), 1)$$),
('22007', $$SELECT billing.report_cumulative('c', 9001, 'bx_sum', 'infinity', 1)$$),
('22007', $$SELECT billing.report_cumulative('c', 9001, 'bx_sum', '4713-01-01 00:00:00+00 BC', 1)$$),
('23503', $$SELECT billing.report_cumulative('c', 424242, 'bx_sum', now(), 1)$$),
('23503', $$SELECT billing.report_cumulative('c', 9001, '', now(), 1)$$),
('ok', $$SELECT billing.report_cumulative('', 9001, 'bx_sum', now(), 1, NULL)$$),
-- meter_table, unmeter_table
('22004', $$SELECT billing.meter_table(NULL, 'a', 'm', 'q', 'ts')$$),
('22004', $$SELECT billing.meter_table('bx_t', NULL, 'm', 'q', 'ts')$$),
('22004', $$SELECT billing.meter_table('bx_t', 'a', 'm', 'q', 'ts', keep_rows => NULL)$$),
('42703', $$SELECT billing.meter_table('bx_t', '', 'm', 'q', 'ts')$$),
('42703', $$SELECT billing.meter_table('bx_t', 'nosuch', 'm', 'q', 'ts')$$),
('42804', $$SELECT billing.meter_table('bx_t', 'm', 'm', 'q', 'ts')$$),
('42804', $$SELECT billing.meter_table('bx_t', 'a', 'm', 'q', 'a')$$),
('42804', $$SELECT billing.meter_table('bx_t', 'a', 'm', 'e', 'ts')$$),
('42809', $$SELECT billing.meter_table('billing.usage_cells', 'account_id', 'meter', 'quantity', 'bucket_start')$$),
('42P01', $$SELECT billing.meter_table('no_such_table', 'a', 'm', 'q', 'ts')$$),
('22004', $$SELECT billing.unmeter_table(NULL)$$),
('42704', $$SELECT billing.unmeter_table('bx_t')$$),
-- usage: 22004 NULL, 22023 bad grain; a reversed or infinite range is just empty
('22023', $$SELECT * FROM billing.usage(9001, now() - interval '1 day', now(), '-1 hour')$$),
('22023', $$SELECT * FROM billing.usage(9001, now() - interval '1 day', now(), '0')$$),
('22023', $$SELECT * FROM billing.usage(9001, now() - interval '1 day', now(), '1 month 1 day')$$),
('ok', $$SELECT * FROM billing.usage(9001, now(), now() - interval '1 day')$$),
('ok', $$SELECT * FROM billing.usage(9001, '-infinity', 'infinity')$$),
('ok', $$SELECT * FROM billing.usage(9001, '-infinity', 'infinity', '1 day')$$),
('ok', $$SELECT * FROM billing.usage(9001, '-infinity', 'infinity', '1 month')$$),
('ok', $$SELECT * FROM billing.usage(9001, now() - interval '1 day', now(), '1000000 years')$$),
('ok', $$SELECT * FROM billing.usage(-1, now() - interval '1 day', now(), NULL, '')$$),
-- remaining: 22004 NULL, 23503 unknown account or meter, 22008 beyond the timestamp range
('22004', $$SELECT billing.remaining(NULL, 'bx_sum')$$),
('22004', $$SELECT billing.remaining(9001, NULL)$$),
('22004', $$SELECT billing.remaining(9001, 'bx_sum', NULL)$$),
('23503', $$SELECT billing.remaining(9001, '')$$),
('23503', $$SELECT billing.remaining(424242, 'bx_sum')$$),
('ok', $$SELECT billing.remaining(9001, 'bx_sum', 'infinity')$$),
('ok', $$SELECT billing.remaining(9001, 'bx_sum', '-infinity')$$),
('22008', $$SELECT billing.remaining(9001, 'bx_sum', '294276-12-31 00:00:00+00')$$),
-- invoice_preview: no account, no subscription, NULL or infinite time: no lines
('ok', $$SELECT * FROM billing.invoice_preview(NULL)$$),
('ok', $$SELECT * FROM billing.invoice_preview(9001, NULL)$$),
('ok', $$SELECT * FROM billing.invoice_preview(424242)$$),
('ok', $$SELECT * FROM billing.invoice_preview(9001, 'infinity')$$),
('ok', $$SELECT * FROM billing.invoice_preview(9001, '-infinity')$$),
('ok', $$SELECT * FROM billing.invoice_preview(9001, '4713-01-01 00:00:00+00 BC')$$),
('22008', $$SELECT * FROM billing.invoice_preview(9001, '294276-12-31 00:00:00+00')$$),
-- finalize_invoices: an as_of past now() finalizes what has ended by now() - grace
('22004', $$SELECT * FROM billing.finalize_invoices(NULL)$$),
('ok', $$SELECT * FROM billing.finalize_invoices('-infinity')$$),
('ok', $$SELECT * FROM billing.finalize_invoices('294276-12-31 00:00:00+00')$$),
('ok', $$SELECT * FROM billing.finalize_invoices('infinity')$$),
-- correct_usage: 22004 NULL or no reason, 23503 unknown, 22023 not a finite number / bucket start / negative result
('22004', $$SELECT billing.correct_usage(NULL, 'bx_sum', date_trunc('minute', now()), 1, 'r')$$),
('22004', $$SELECT billing.correct_usage(9001, NULL, date_trunc('minute', now()), 1, 'r')$$),
('22004', $$SELECT billing.correct_usage(9001, 'bx_sum', NULL, 1, 'r')$$),
('22004', $$SELECT billing.correct_usage(9001, 'bx_sum', date_trunc('minute', now()), NULL, 'r')$$),
('22004', $$SELECT billing.correct_usage(9001, 'bx_sum', date_trunc('minute', now()), 1, NULL)$$),
('22004', $$SELECT billing.correct_usage(9001, 'bx_sum', date_trunc('minute', now()), 1, '')$$),
('22004', $$SELECT billing.correct_usage(9001, 'bx_sum', date_trunc('minute', now()), 1, '   ')$$),
('23503', $$SELECT billing.correct_usage(9001, '', date_trunc('minute', now()), 1, 'r')$$),
('23503', $$SELECT billing.correct_usage(424242, 'bx_sum', date_trunc('minute', now()), 1, 'r')$$),
('22023', $$SELECT billing.correct_usage(9001, 'bx_max', date_trunc('minute', now()), 1, 'r')$$),
('22023', $$SELECT billing.correct_usage(9001, 'bx_sum', date_trunc('minute', now()), 'NaN', 'r')$$),
('22023', $$SELECT billing.correct_usage(9001, 'bx_sum', date_trunc('minute', now()), 'Infinity', 'r')$$),
('22023', $$SELECT billing.correct_usage(9001, 'bx_sum', date_trunc('minute', now()), '-Infinity', 'r')$$),
('22023', $$SELECT billing.correct_usage(9001, 'bx_sum', date_trunc('minute', now()) - interval '1 day', -1, 'r')$$),
('22023', $$SELECT billing.correct_usage(9001, 'bx_sum', 'infinity', 1, 'r')$$),
('22023', $$SELECT billing.correct_usage(9001, 'bx_sum', date_trunc('minute', now()) + interval '1 second', 1, 'r')$$),
('22008', $$SELECT billing.correct_usage(9001, 'bx_sum', '294276-12-31 00:00:00+00', 1, 'r')$$),
('ok', $$SELECT billing.correct_usage(9001, 'bx_sum', date_trunc('minute', now()), 1e300, 'r', NULL)$$),
-- rerate: 22004 NULL, 22023 empty or reversed range
('22004', $$SELECT * FROM billing.rerate(NULL, now())$$),
('22004', $$SELECT * FROM billing.rerate(now(), NULL)$$),
('22004', $$SELECT * FROM billing.rerate(now() - interval '1 day', now(), NULL, NULL)$$),
('22023', $$SELECT * FROM billing.rerate(now(), now())$$),
('22023', $$SELECT * FROM billing.rerate(now(), now() - interval '1 day')$$),
('ok', $$SELECT * FROM billing.rerate('-infinity', 'infinity')$$),
('ok', $$SELECT * FROM billing.rerate('4713-01-01 00:00:00+00 BC', '294276-12-31 00:00:00+00', -1, true, '')$$),
-- reconcile: 22004 NULL, 42703 no such column
('22004', $$SELECT * FROM billing.reconcile(NULL, 'a', 'm', 'q', 'ts', now() - interval '1 day', now())$$),
('22004', $$SELECT * FROM billing.reconcile('bx_t', NULL, 'm', 'q', 'ts', now() - interval '1 day', now())$$),
('22004', $$SELECT * FROM billing.reconcile('bx_t', 'a', 'm', 'q', 'ts', NULL, now())$$),
('42703', $$SELECT * FROM billing.reconcile('bx_t', 'nosuch', 'm', 'q', 'ts', now() - interval '1 day', now())$$),
('ok', $$SELECT * FROM billing.reconcile('bx_t', 'a', 'm', 'q', 'ts', '-infinity', 'infinity')$$),
-- verification, maintenance
('ok', $$SELECT * FROM billing.verify_invoices(NULL)$$),
('ok', $$SELECT * FROM billing.verify_invoices(-1)$$),
('ok', $$SELECT * FROM billing.verify_audit_log()$$),
('ok', $$SELECT billing.purge_dedupe('-infinity')$$),
('ok', $$SELECT billing.compact_usage()$$),
-- reference data: 23514 check, 23502 not null, 23503 foreign key, 23505 duplicate,
-- 22023 wrong currency, 23P01 overlap, 55000 immutable
('23514', $$INSERT INTO billing.accounts (account_id, currency) VALUES (9100, 'XXX')$$),
('23514', $$INSERT INTO billing.accounts (account_id, currency) VALUES (9100, 'usd')$$),
('23514', $$INSERT INTO billing.accounts (account_id, currency) VALUES (9100, '')$$),
('23514', $$INSERT INTO billing.accounts (account_id) VALUES (0)$$),
('23514', $$INSERT INTO billing.accounts (account_id) VALUES (-1)$$),
('23502', $$INSERT INTO billing.accounts (account_id, currency) VALUES (9100, NULL)$$),
('23502', $$INSERT INTO billing.accounts (account_id) VALUES (NULL)$$),
('23505', $$INSERT INTO billing.accounts (account_id) VALUES (9001)$$),
('23514', $$INSERT INTO billing.plans (plan, currency) VALUES ('bx_bad', 'XXX')$$),
('23514', $$INSERT INTO billing.plans (plan, period) VALUES ('bx_bad', '-1 month')$$),
('23514', $$INSERT INTO billing.plans (plan, period) VALUES ('bx_bad', '0')$$),
('23514', $$INSERT INTO billing.plans (plan, period) VALUES ('bx_bad', '1 month 1 day')$$),
('23514', $$INSERT INTO billing.plans (plan) VALUES ('')$$),
('23514', $$INSERT INTO billing.meters (meter) VALUES ('')$$),
('23514', $$INSERT INTO billing.meters (meter) VALUES (repeat('m', 64))$$),
('23514', $$INSERT INTO billing.meters (meter, aggregation) VALUES ('bx_bad', 'avg')$$),
('23514', $$INSERT INTO billing.meters (meter, bucket_width) VALUES ('bx_bad', '0')$$),
('23514', $$INSERT INTO billing.meters (meter, bucket_width) VALUES ('bx_bad', '-1 minute')$$),
('23514', $$INSERT INTO billing.meters (meter, bucket_width) VALUES ('bx_bad', '1 month')$$),
('23514', $$INSERT INTO billing.meters (meter, late_window) VALUES ('bx_bad', '-1 day')$$),
('23514', $$INSERT INTO billing.meters (meter, dedupe_window) VALUES ('bx_bad', '-1 day')$$),
('22P02', $$INSERT INTO billing.charges (plan, meter, price) VALUES ('bx_usd', 'bx_max', 'unit NaN')$$),
('23502', $$INSERT INTO billing.charges (plan, meter, price) VALUES ('bx_usd', 'bx_max', NULL)$$),
('23503', $$INSERT INTO billing.charges (plan, meter, price) VALUES ('bx_usd', 'nosuch', 'unit 1')$$),
('23503', $$INSERT INTO billing.charges (plan, meter, price) VALUES ('nosuch', 'bx_sum', 'unit 1')$$),
('23505', $$INSERT INTO billing.charges (plan, meter, price) VALUES ('bx_usd', 'bx_sum', 'unit 2')$$),
('22023', $$INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9002, 'bx_usd', now())$$),
('22023', $$INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9003, 'bx_eur', now())$$),
('23514', $$INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9002, 'bx_eur', 'infinity')$$),
('23514', $$INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9002, 'bx_eur', '-infinity')$$),
('23514', $$INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at) VALUES (9002, 'bx_eur', now(), now() - interval '1 day')$$),
('23514', $$INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap) VALUES (9002, 'bx_eur', now(), -1)$$),
('23514', $$INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap) VALUES (9002, 'bx_eur', now(), 'NaN')$$),
('23514', $$INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap) VALUES (9002, 'bx_eur', now(), 'Infinity')$$),
('23503', $$INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (424242, 'bx_usd', now())$$),
('23503', $$INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9002, 'nosuch', now())$$),
('23P01', $$INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9001, 'bx_usd', now())$$),
('23P01', $$INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (9001, 'bx_usd', '4713-01-01 00:00:00+00 BC')$$),
('55000', $$UPDATE billing.audit_log SET actor = 'x'$$),
('55000', $$DELETE FROM billing.audit_log$$),
('55000', $$TRUNCATE billing.audit_log$$);

-- run every call, each in its own subtransaction
UPDATE cases SET got = test.sqlstate_of(q);
SELECT is(got, expect, format('%s  [%s]', q, expect)) FROM cases ORDER BY n;

-- STRICT functions: NULL in, NULL out (documented); no error
SELECT is(pg_temp.value_of($$SELECT billing.rate(NULL, 1)$$), '<null>', 'rate(NULL, q) is NULL');
SELECT is(pg_temp.value_of($$SELECT billing.rate('unit 1', NULL)$$), '<null>', 'rate(p, NULL) is NULL');
SELECT is(pg_temp.value_of($$SELECT count(*) FROM billing.rate_tiers(NULL, 1)$$), '0', 'rate_tiers(NULL, q) has no rows');
SELECT is(pg_temp.value_of($$SELECT billing.price_to_jsonb(NULL)$$), '<null>', 'price_to_jsonb(NULL) is NULL');
SELECT is(pg_temp.value_of($$SELECT billing.price_from_jsonb(NULL)$$), '<null>', 'price_from_jsonb(NULL) is NULL');
SELECT is(pg_temp.value_of($$SELECT billing.price_from_stripe(NULL)$$), '<null>', 'price_from_stripe(NULL) is NULL');
SELECT is(pg_temp.value_of($$SELECT billing.round_money(NULL, 'USD')$$), '<null>', 'round_money(NULL, c) is NULL');
SELECT is(pg_temp.value_of($$SELECT billing.round_money(1, NULL)$$), '<null>', 'round_money(a, NULL) is NULL');
SELECT is(pg_temp.value_of($$SELECT billing.currency_exponent(NULL)$$), '<null>', 'currency_exponent(NULL) is NULL');
SELECT is(pg_temp.value_of($$SELECT billing.currency_exponent('')$$), '<null>', 'currency_exponent('''') is NULL (unknown)');
SELECT is(pg_temp.value_of($$SELECT billing.currency_exponent('usd')$$), '2', 'currency_exponent is case-insensitive');
SELECT is(pg_temp.value_of($$SELECT billing.purge_dedupe(NULL)$$), '0', 'purge_dedupe(NULL) purges nothing');
SELECT ok(billing.record(9001, 'bx_max', 1, now() - interval '1 minute', 'pd-future'), 'an id claimed');
SELECT is(billing.purge_dedupe('infinity') >= 0, true, 'purge_dedupe(''infinity'') runs');
SELECT is(billing.record(9001, 'bx_max', 1, now() - interval '1 minute', 'pd-future'), false,
          'but purges as of now() at most: the id still dedupes');
-- documented results of odd but valid calls
SELECT is(pg_temp.value_of($$SELECT billing.record(9001, 'bx_max', -5, now(), 'neg')$$), 'true',
          'a max meter takes negative values');
SELECT is(pg_temp.value_of($$SELECT billing.rate('unit 2', 1e300)::text$$), '2' || repeat('0', 300),
          'a huge quantity is rated exactly');
SELECT is(pg_temp.value_of($$SELECT billing.round_money(-2.345, 'USD')$$), '-2.35',
          'negative amounts round symmetrically');
SELECT is(pg_temp.value_of($$SELECT count(*) FROM billing.invoice_preview(9001, NULL)$$), '0',
          'invoice_preview at NULL has no lines');
SELECT is(pg_temp.value_of($$SELECT count(*) FROM billing.usage(9001, now(), now() - interval '1 day')$$), '0',
          'usage over a reversed range is empty');
SELECT is(pg_temp.value_of($$SELECT already_applied FROM billing.ingest('s', 0, 9223372036854775807, '{9001}', '{bx_sum}', '{1}', ARRAY[now()])$$),
          'true', 'offset 2^63-1 was applied once and is the last');

-- never XX000, and the backend is alive
SELECT is((SELECT count(*) FROM cases WHERE got LIKE 'XX%' OR got LIKE '58%'), 0::bigint,
          'no call raised an internal error');
SELECT is((SELECT count(*) FROM cases WHERE got IS NULL), 0::bigint, 'every call returned');
SELECT ok(pg_backend_pid() > 0, 'the backend survived');
SELECT is_empty($$SELECT * FROM billing.verify_audit_log()$$, 'and the audit log still verifies');

SELECT * FROM finish();
ROLLBACK;
