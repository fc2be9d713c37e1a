-- test/upgrade/history_1.sql: the first part of the history the upgrade
-- test feeds, January to March 2026, through the public API of billing 1.0
-- only (tables of SPEC section 2 and the functions of sections 3 to 7).
-- It runs once on a database where 1.0 was installed from the frozen
-- script (before ALTER EXTENSION billing UPDATE) and once on a fresh 1.1
-- install; history_2.sql continues it.  Every timestamp is fixed (meters
-- have a 100-year late window) so nothing depends on the day it runs.
--
-- What it leaves behind: usage from every ingest path (record with and
-- without event ids and dimensions, repeated ids; ingest batches on two
-- partitions, a batch replayed, ids repeated across batches;
-- report_cumulative from two collectors, repeated and out of order;
-- metered tables keeping rows or not, with and without event ids and
-- dimensions, INSERT and COPY), part of it compacted and part not;
-- finalized invoices of monthly and weekly plans in three currencies, with
-- a spend cap and a plan change; a late event, a correction, a retroactive
-- price version and a changed spend cap re-rated into adjustments, some
-- carried by a later invoice and some still pending; reference data
-- changed (audit rows in every chain); a reconciliation source.
--
-- Roles: up_admin (in billing_admin) and up_writer (in billing_writer)
-- exist; the caller is a superuser.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET TimeZone = 'UTC';

-- users' tables: metered tables owned by the admin, fed by the writer, and
-- an export to reconcile against
CREATE TABLE public.up_keep (org bigint, category text, quantity numeric, received timestamptz,
                             event_id text);
CREATE TABLE public.up_drop (org bigint, category text, quantity bigint, received timestamptz,
                             event_id text, region text);
CREATE TABLE public.up_plain (org integer, category varchar, quantity integer, received timestamptz);
CREATE TABLE public.up_dim (org bigint, category text, quantity numeric, received timestamptz,
                            region text);
ALTER TABLE public.up_keep OWNER TO up_admin;
ALTER TABLE public.up_drop OWNER TO up_admin;
ALTER TABLE public.up_plain OWNER TO up_admin;
ALTER TABLE public.up_dim OWNER TO up_admin;
GRANT INSERT ON public.up_keep, public.up_drop, public.up_plain, public.up_dim TO up_writer;

SET ROLE up_admin;
INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window, dedupe_window, unit) VALUES
    ('m_events', 'sum',   '1 minute', '100 years', '100 years', 'events'),
    ('m_calls',  'count', '1 minute', '100 years', '100 years', NULL),
    ('m_peak',   'max',   '1 hour',   '100 years', '100 years', 'cores'),
    ('m_seats',  'last',  '1 minute', '100 years', '100 years', 'seats'),
    ('m_bytes',  'sum',   '1 hour',   '100 years', '100 years', 'bytes'),
    ('m_spans',  'sum',   '1 day',    '100 years', '100 years', 'spans');
INSERT INTO billing.accounts (account_id, currency, name) VALUES
    (1, 'USD', 'Acme'), (2, 'USD', 'Globex, capped'), (3, 'EUR', 'Vier'),
    (4, 'USD', 'Weekly'), (5, 'JPY', 'Yen'), (6, 'USD', 'Switcher'), (7, 'USD', 'No plan');
INSERT INTO billing.plans (plan, period, currency) VALUES
    ('p_month', '1 month', 'USD'), ('p_week', '7 days', 'USD'),
    ('p_eur', '1 month', 'EUR'), ('p_jpy', '1 month', 'JPY');
INSERT INTO billing.charges (plan, meter, price, description) VALUES
    ('p_month', NULL,       'flat 20',                                        'base fee'),
    ('p_month', 'm_events', 'graduated 1000 @ 0 | 10000 @ 0.002 | inf @ 0.001', 'events'),
    ('p_month', 'm_calls',  'package 100 @ 0.5',                              'calls'),
    ('p_month', 'm_peak',   'unit 1.5',                                       'peak cores'),
    ('p_month', 'm_seats',  'volume 5 @ 10 | inf @ 8',                        'seats'),
    ('p_month', 'm_bytes',  'unit 0.0000001 free 1000000',                    'bytes'),
    ('p_month', 'm_spans',  'graduated 500 @ 0 | inf @ 0.01 + 5',             'spans'),
    ('p_week',  NULL,       'flat 3',                                         'weekly fee'),
    ('p_week',  'm_events', 'unit 0.001',                                     'events'),
    ('p_week',  'm_calls',  'unit 0.01 max 5',                                'calls'),
    ('p_eur',   NULL,       'flat 9.99',                                      'Grundgebuehr'),
    ('p_eur',   'm_events', 'unit 0.0015 min 1',                              'events'),
    ('p_eur',   'm_bytes',  'package 1000000 @ 0.02 round down',              'bytes'),
    ('p_jpy',   NULL,       'flat 1000',                                      'kihon'),
    ('p_jpy',   'm_events', 'unit 0.37',                                      'events');
INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at, spend_cap) VALUES
    (1, 'p_month', '2026-01-01', NULL, NULL),
    (2, 'p_month', '2026-01-01', NULL, 40),
    (3, 'p_eur',   '2026-01-01', NULL, NULL),
    (4, 'p_week',  '2026-01-01', NULL, NULL),
    (5, 'p_jpy',   '2026-01-01', NULL, NULL),
    (6, 'p_week',  '2026-01-01', '2026-02-05', NULL),
    (6, 'p_month', '2026-02-05', NULL, 100);
SELECT billing.meter_table('public.up_keep', 'org', 'category', 'quantity', 'received',
                           event_id_column => 'event_id');
SELECT billing.meter_table('public.up_drop', 'org', 'category', 'quantity', 'received',
                           event_id_column => 'event_id', dimension_column => 'region',
                           keep_rows => false);
SELECT billing.meter_table('public.up_plain', 'org', 'category', 'quantity', 'received');
SELECT billing.meter_table('public.up_dim', 'org', 'category', 'quantity', 'received',
                           dimension_column => 'region', keep_rows => false);
RESET ROLE;

-- January and February: every ingest path ---------------------------------------------------
SET ROLE up_writer;
-- record: every meter, half with event ids, dimensions on bytes
SELECT count(*) FILTER (WHERE counted) AS counted, count(*) AS sent FROM (
    SELECT billing.record(1 + g % 7,
                          (ARRAY['m_events', 'm_calls', 'm_peak', 'm_seats', 'm_bytes', 'm_spans'])[1 + g % 6],
                          CASE WHEN g % 6 = 4 THEN (g * 7919) % 500000 ELSE (g * 7) % 23 END,
                          timestamptz '2026-01-01' + ((g * 37) % (59 * 1440)) * interval '1 minute',
                          CASE WHEN g % 2 = 0 THEN 'r-' || g END,
                          CASE WHEN g % 6 = 4 THEN (ARRAY['eu', 'us', 'ap'])[1 + g % 3] ELSE '' END) AS counted
      FROM generate_series(1, 1500) g) s;
-- the same ids again: duplicates, not counted
SELECT count(*) FILTER (WHERE counted) AS counted FROM (
    SELECT billing.record(1 + g % 7,
                          (ARRAY['m_events', 'm_calls', 'm_peak', 'm_seats', 'm_bytes', 'm_spans'])[1 + g % 6],
                          1, timestamptz '2026-01-01' + ((g * 37) % (59 * 1440)) * interval '1 minute',
                          'r-' || g) AS counted
      FROM generate_series(2, 400, 2) g) s;
-- ingest: batches on two partitions; ids repeated within and across batches
SELECT * FROM billing.ingest('kafka', 0, 1,
    ARRAY[1, 1, 2, 3, 4, 5, 6]::bigint[],
    ARRAY['m_events', 'm_events', 'm_calls', 'm_events', 'm_events', 'm_events', 'm_seats'],
    ARRAY[10, 11, 1, 12, 13, 14, 4]::numeric[],
    ARRAY['2026-01-03 10:00', '2026-01-03 10:00:30', '2026-01-04 11:00', '2026-01-05 12:00',
          '2026-01-06 13:00', '2026-01-07 14:00', '2026-01-08 15:00']::timestamptz[],
    ARRAY['k-1', 'k-2', 'k-3', 'k-4', 'k-5', 'k-6', 'k-7'],
    ARRAY['', '', '', '', '', '', '']);
SELECT * FROM billing.ingest('kafka', 0, 2,
    ARRAY[1, 1, 1, 2]::bigint[], ARRAY['m_events', 'm_events', 'm_events', 'm_bytes'],
    ARRAY[100, 100, 7, 123456]::numeric[],
    ARRAY['2026-01-20 08:00', '2026-01-20 08:00', '2026-01-03 10:00', '2026-01-21 09:00']::timestamptz[],
    ARRAY['k-8', 'k-8', 'k-1', 'k-9'], ARRAY['', '', '', 'eu']);
SELECT * FROM billing.ingest('kafka', 0, 2,                          -- redelivered: applied once
    ARRAY[1]::bigint[], ARRAY['m_events'], ARRAY[100]::numeric[],
    ARRAY['2026-01-20 08:00']::timestamptz[], ARRAY['k-8']);
SELECT * FROM billing.ingest('kafka', 1, 1,
    ARRAY(SELECT 1 + g % 6 FROM generate_series(1, 300) g)::bigint[],
    ARRAY(SELECT (ARRAY['m_events', 'm_calls', 'm_spans'])[1 + g % 3] FROM generate_series(1, 300) g),
    ARRAY(SELECT (g % 13)::numeric FROM generate_series(1, 300) g),
    ARRAY(SELECT timestamptz '2026-02-01' + g * interval '97 minutes' FROM generate_series(1, 300) g));
-- report_cumulative: two collectors, repeats, an older total, out of order
SELECT billing.report_cumulative(src, acct, 'm_events', b, total)
  FROM (VALUES ('c1', 1, timestamptz '2026-01-10 10:00', 50), ('c2', 1, '2026-01-10 10:00', 20),
               ('c1', 1, '2026-01-10 10:00', 40), ('c1', 1, '2026-01-10 10:00', 65),
               ('c2', 2, '2026-01-11 11:00', 30), ('c1', 2, '2026-01-11 11:00', 45),
               ('c2', 2, '2026-01-11 11:00', 30), ('c1', 3, '2026-02-12 12:00', 1000),
               ('c1', 2, '2026-01-11 12:00', 5)) v(src, acct, b, total);
-- metered tables: INSERT and COPY; repeated ids are dropped
INSERT INTO public.up_keep
SELECT 1 + g % 6, (ARRAY['m_events', 'm_calls', 'm_spans'])[1 + g % 3], g % 17,
       timestamptz '2026-01-01' + g * interval '101 minutes', 'u-' || (g % 900)
  FROM generate_series(1, 1000) g;
COPY public.up_keep FROM STDIN;
1	m_events	5	2026-01-15 10:00:00+00	u-copy-1
1	m_events	6	2026-01-15 10:00:00+00	u-copy-1
2	m_seats	9	2026-01-15 10:01:00+00	u-copy-2
2	m_seats	3	2026-01-15 10:01:30+00	u-copy-3
\.
INSERT INTO public.up_drop
SELECT 1 + g % 6, (ARRAY['m_events', 'm_bytes'])[1 + g % 2], g * 101,
       timestamptz '2026-01-01 00:30' + g * interval '79 minutes', 'd-' || (g % 800),
       (ARRAY['eu', 'us'])[1 + g % 2]
  FROM generate_series(1, 1000) g;
INSERT INTO public.up_plain
SELECT 1 + g % 6, (ARRAY['m_events', 'm_peak', 'm_calls'])[1 + g % 3], g % 9,
       timestamptz '2026-01-02' + g * interval '113 minutes'
  FROM generate_series(1, 500) g;
COPY public.up_dim FROM STDIN;
1	m_bytes	1000000	2026-01-05 05:00:00+00	eu
1	m_bytes	2500000	2026-01-05 05:10:00+00	us
3	m_bytes	7000000	2026-02-05 05:00:00+00	eu
6	m_spans	700	2026-02-10 00:00:00+00	
\.
RESET ROLE;

-- compacted up to here; what follows stays in the deltas until later ------------------------
SET ROLE up_admin;
SELECT billing.compact_usage() > 0 AS compacted;
RESET ROLE;

SET ROLE up_writer;
SELECT count(*) FILTER (WHERE counted) AS counted FROM (
    SELECT billing.record(1 + g % 6, 'm_events', g % 5,
                          timestamptz '2026-02-15' + g * interval '7 minutes', 'late-' || g) AS counted
      FROM generate_series(1, 400) g) s;
RESET ROLE;

-- January is billed; then late usage, a correction and a price cut re-rate it ----------------
SET ROLE up_admin;
SELECT count(*) AS january_invoices FROM billing.finalize_invoices('2026-02-01 01:00');
RESET ROLE;
SET ROLE up_writer;
SELECT billing.record(1, 'm_events', 2500, '2026-01-31 23:59', 'late-january');
INSERT INTO public.up_keep VALUES (4, 'm_events', 900, '2026-01-20 10:00', 'late-keep');
RESET ROLE;
SET ROLE up_admin;
SELECT billing.correct_usage(2, 'm_events', '2026-01-11 11:00', -10, 'collector c1 double counted');
INSERT INTO billing.charges (plan, meter, price, valid_from, description) VALUES
    ('p_month', 'm_events', 'graduated 1000 @ 0 | 10000 @ 0.0015 | inf @ 0.001', '2026-01-01',
     'events (price cut)');
SELECT count(*) AS adjustments
  FROM billing.rerate('2026-01-01', '2026-02-01', reason => 'late usage, correction, price cut');

-- February is billed and carries January's adjustments
SELECT count(*) AS february_invoices FROM billing.finalize_invoices('2026-03-01 01:00');

-- reference data changes (catalog and account audit chains)
UPDATE billing.accounts SET name = 'Acme Corp' WHERE account_id = 1;
UPDATE billing.meters SET unit = 'events (sum)' WHERE meter = 'm_events';
UPDATE billing.subscriptions SET spend_cap = 35 WHERE account_id = 2 AND starts_at = '2026-01-01';
-- re-rated: adjustments left pending for March's invoice
SELECT count(*) AS adjustments
  FROM billing.rerate('2026-02-01', '2026-03-01', reason => 'cap lowered');
RESET ROLE;

-- March, partly: usage not compacted, and changes a dry run would re-rate --------------------
SET ROLE up_writer;
SELECT count(*) FILTER (WHERE counted) AS counted FROM (
    SELECT billing.record(1 + g % 7,
                          (ARRAY['m_events', 'm_calls', 'm_peak', 'm_seats', 'm_bytes', 'm_spans'])[1 + g % 6],
                          (g * 3) % 11, timestamptz '2026-03-01' + g * interval '13 minutes',
                          'march-' || g) AS counted
      FROM generate_series(1, 800) g) s;
SELECT billing.record(3, 'm_events', 77, '2026-02-27 12:00', 'late-february');
-- two values of a last meter at the same instant: the later arrival wins
SELECT billing.record(3, 'm_seats', 4, '2026-02-25 10:00'), billing.record(3, 'm_seats', 2, '2026-02-25 10:00');
RESET ROLE;
SET ROLE up_admin;
SELECT billing.correct_usage(1, 'm_events', '2026-02-16 00:07', 3, 'missed batch');
RESET ROLE;

-- an independent record to reconcile with: the kept rows, one lost, one extra
CREATE TABLE public.up_export AS
SELECT org, category, quantity, received FROM public.up_keep WHERE event_id <> 'u-7';
INSERT INTO public.up_export VALUES (1, 'm_events', 12, '2026-01-09 09:00');
GRANT SELECT ON public.up_export TO PUBLIC;
