-- quantity_limits: the one documented limit on usage quantities (SPEC
-- 10.5): less than 10^1000 in absolute value, at most 1000 digits after
-- the decimal point.  Every path that brings a quantity to the counters
-- (record, ingest, a metered table by INSERT and by COPY, with and without
-- kept rows and event ids, report_cumulative, correct_usage) refuses one
-- outside it with 22023 and changes nothing, also a quantity whose text is
-- longer than the 65,535 characters a packed cell holds (it raised 22003
-- from the storage before); the largest quantities inside are counted,
-- read back and rated exactly.
BEGIN;
SELECT plan(32);
\ir ../helpers.sql
SET LOCAL timezone = 'UTC';

INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('ql_sum', 'sum', '100 years'), ('ql_max', 'max', '100 years'), ('ql_last', 'last', '100 years');
INSERT INTO billing.accounts (account_id) VALUES (9801), (9802);
CREATE TEMP TABLE ql_rows (a bigint, m text, q numeric, ts timestamptz, e text);
CREATE TEMP TABLE ql_stream (a bigint, m text, q numeric, ts timestamptz);
CREATE TEMP TABLE ql_keyed (a bigint, m text, q numeric, ts timestamptz, e text);
SELECT billing.meter_table('ql_rows', 'a', 'm', 'q', 'ts');
SELECT billing.meter_table('ql_stream', 'a', 'm', 'q', 'ts', keep_rows => false);
SELECT billing.meter_table('ql_keyed', 'a', 'm', 'q', 'ts', event_id_column => 'e', keep_rows => false);

-- the values at and past the edges, as SQL literals
CREATE TEMP TABLE v (name text, lit text);
INSERT INTO v VALUES
    ('10^1000', '1e1000'),
    ('-10^1000', '-1e1000'),
    ('10^1000 + 0.5', '(1e1000 + 0.5)'),
    ('1001 fraction digits', '1e-1001'),
    ('70,000 characters', $$('1' || repeat('0', 69999))::numeric$$),
    ('10^-16383', '1e-16383');

CREATE TEMP TABLE cases (n serial, expect text, q text, got text);
INSERT INTO cases (expect, q)
SELECT '22023', format(t, v.lit)
  FROM v, (VALUES
    ($$SELECT billing.record(9801, 'ql_sum', %s, '2025-06-01')$$),
    ($$SELECT * FROM billing.ingest('ql', 0, 1, ARRAY[9801], ARRAY['ql_sum'], ARRAY[%s], ARRAY['2025-06-01'::timestamptz])$$),
    ($$SELECT billing.report_cumulative('ql', 9801, 'ql_sum', '2025-06-01', %s)$$),
    ($$SELECT billing.correct_usage(9801, 'ql_sum', '2025-06-01', %s, 'too big')$$),
    ($$INSERT INTO ql_rows VALUES (9801, 'ql_sum', %s, '2025-06-01')$$)) AS p(t)
 WHERE v.name IN ('10^1000', '1001 fraction digits', '70,000 characters', '10^-16383')
    OR (v.name = '10^1000 + 0.5' AND p.t LIKE '%record%');
INSERT INTO cases (expect, q) VALUES
    ('22023', $$SELECT billing.record(9801, 'ql_max', -1e1000, '2025-06-01')$$),
    ('22023', $$SELECT billing.record(9801, 'ql_last', 1e-1001, '2025-06-01')$$),
    ('22023', $$INSERT INTO ql_stream VALUES (9801, 'ql_sum', 1e1000, '2025-06-01')$$),
    ('22023', $$INSERT INTO ql_keyed VALUES (9801, 'ql_sum', 1e1000, '2025-06-01', 'k1')$$),
    ('22023', $$COPY ql_rows (a, m, q, ts) FROM PROGRAM 'echo 9801,ql_sum,1e1000,2025-06-01 00:00+00' (FORMAT csv)$$),
    ('22023', $$COPY ql_stream FROM PROGRAM 'echo 9801,ql_sum,1e-1001,2025-06-01 00:00+00' (FORMAT csv)$$),
    ('22023', $$COPY ql_keyed FROM PROGRAM 'echo 9801,ql_sum,-1e1000,2025-06-01 00:00+00,k2' (FORMAT csv)$$);
UPDATE cases SET got = test.sqlstate_of(q);
SELECT is(got, expect, format('%s  [%s]', q, expect)) FROM cases ORDER BY n;

SELECT is((SELECT count(*) FROM billing.usage_cells WHERE account_id = 9801), 0::bigint,
          'none of them changed anything');

-- inside the limit: counted, read back and rated exactly
SELECT billing.record(9802, 'ql_sum', 1e1000 - 1, '2025-06-01');
SELECT * FROM billing.ingest('ql', 0, 2, ARRAY[9802], ARRAY['ql_sum'], ARRAY[1e-1000], ARRAY['2025-06-01'::timestamptz]);
COPY ql_stream FROM PROGRAM 'echo 9802,ql_sum,1e999,2025-06-01 00:00+00' (FORMAT csv);
SELECT billing.record(9802, 'ql_max', -(1e1000 - 1), '2025-06-01');
SELECT is((SELECT quantity FROM billing.usage(9802, '2025-06-01', '2025-06-02', meter => 'ql_sum')),
          1e1000 - 1 + 1e-1000 + 1e999, 'the largest quantities add up exactly');
SELECT is((SELECT quantity FROM billing.usage(9802, '2025-06-01', '2025-06-02', meter => 'ql_max')),
          -(1e1000 - 1), 'a max meter takes the most negative one');
SELECT is(billing.rate('unit 0.00000000000000000001', 1e1000 - 1 + 1e-1000),
          (1e1000 - 1 + 1e-1000) * 0.00000000000000000001, 'and they are rated exactly');

SELECT * FROM finish();
ROLLBACK;
