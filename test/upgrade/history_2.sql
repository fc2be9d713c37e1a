-- test/upgrade/history_2.sql: the rest of the history of history_1.sql,
-- March to May 2026, fed after ALTER EXTENSION billing UPDATE (and, on the
-- fresh install it is compared with, right after history_1.sql).  Public
-- 1.0 API only, so it reads the same on either side.  It repeats event ids,
-- an ingest offset and a cumulative bucket of the first part (which the
-- update must keep deduplicating), inserts into the tables metered by 1.0's
-- meter_table (their triggers were created before the update), meters one
-- table anew, re-meters and unmeters others, compacts, bills March and
-- April (March carries the adjustments left pending), re-rates, and
-- changes reference data.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET TimeZone = 'UTC';

CREATE TABLE public.up_new (org bigint, category text, quantity numeric, received timestamptz,
                            event_id text);
ALTER TABLE public.up_new OWNER TO up_admin;
GRANT INSERT ON public.up_new TO up_writer;

SET ROLE up_admin;
SELECT billing.meter_table('public.up_new', 'org', 'category', 'quantity', 'received',
                           event_id_column => 'event_id', keep_rows => false);
SELECT billing.meter_table('public.up_plain', 'org', 'category', 'quantity', 'received',
                           keep_rows => false);                       -- replaces its configuration
SELECT billing.unmeter_table('public.up_dim');
INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window, dedupe_window, unit) VALUES
    ('m_tokens', 'sum', '1 minute', '100 years', '100 years', 'tokens');
INSERT INTO billing.charges (plan, meter, price, valid_from, description) VALUES
    ('p_month', 'm_tokens', 'unit 0.00002', '2026-03-01', 'tokens');
INSERT INTO billing.accounts (account_id, currency, name) VALUES (8, 'USD', 'Newcomer');
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (8, 'p_month', '2026-03-15');
RESET ROLE;

SET ROLE up_writer;
-- ids of the first part: duplicates; new ids: counted
SELECT count(*) FILTER (WHERE counted) AS counted, count(*) AS sent FROM (
    SELECT billing.record(1 + g % 7,
                          (ARRAY['m_events', 'm_calls', 'm_peak', 'm_seats', 'm_bytes', 'm_spans'])[1 + g % 6],
                          5, timestamptz '2026-01-01' + ((g * 37) % (59 * 1440)) * interval '1 minute',
                          'r-' || g) AS counted
      FROM generate_series(2, 400, 2) g) s;
SELECT count(*) FILTER (WHERE counted) AS counted, count(*) AS sent FROM (
    SELECT billing.record(1 + g % 8,
                          (ARRAY['m_events', 'm_calls', 'm_peak', 'm_seats', 'm_bytes', 'm_spans', 'm_tokens'])[1 + g % 7],
                          (g * 5) % 19, timestamptz '2026-03-10' + g * interval '11 minutes',
                          CASE WHEN g % 3 <> 0 THEN 'p2-' || g END,
                          CASE WHEN g % 7 = 4 THEN (ARRAY['eu', 'us', 'ap'])[1 + g % 3] ELSE '' END) AS counted
      FROM generate_series(1, 1000) g) s;
-- ingest: an offset applied before the update is still applied; ids of the
-- first part are duplicates; the partitions go on
SELECT * FROM billing.ingest('kafka', 0, 2,
    ARRAY[1]::bigint[], ARRAY['m_events'], ARRAY[100]::numeric[],
    ARRAY['2026-01-20 08:00']::timestamptz[], ARRAY['k-8']);
SELECT * FROM billing.ingest('kafka', 0, 3,
    ARRAY[1, 1, 2, 8]::bigint[], ARRAY['m_events', 'm_events', 'm_calls', 'm_tokens'],
    ARRAY[10, 20, 1, 5000]::numeric[],
    ARRAY['2026-01-03 10:00', '2026-03-20 10:00', '2026-03-21 10:00', '2026-03-22 10:00']::timestamptz[],
    ARRAY['k-1', 'k-10', 'k-11', 'k-12']);
SELECT * FROM billing.ingest('kafka', 1, 2,
    ARRAY(SELECT 1 + g % 8 FROM generate_series(1, 300) g)::bigint[],
    ARRAY(SELECT (ARRAY['m_events', 'm_calls', 'm_tokens'])[1 + g % 3] FROM generate_series(1, 300) g),
    ARRAY(SELECT (g % 29)::numeric FROM generate_series(1, 300) g),
    ARRAY(SELECT timestamptz '2026-04-01' + g * interval '113 minutes' FROM generate_series(1, 300) g),
    ARRAY(SELECT 'k1-' || g FROM generate_series(1, 300) g));
-- report_cumulative: a bucket of the first part grows, an older total changes nothing
SELECT billing.report_cumulative(src, acct, 'm_events', b, total)
  FROM (VALUES ('c1', 1, timestamptz '2026-01-10 10:00', 80), ('c2', 1, '2026-01-10 10:00', 10),
               ('c3', 1, '2026-01-10 10:00', 4), ('c1', 1, '2026-03-10 10:00', 300),
               ('c2', 1, '2026-03-10 10:00', 200)) v(src, acct, b, total);
-- metered tables with triggers from before the update, and the new one
INSERT INTO public.up_keep
SELECT 1 + g % 6, (ARRAY['m_events', 'm_calls', 'm_spans'])[1 + g % 3], g % 13,
       timestamptz '2026-03-05' + g * interval '53 minutes', 'u-' || (g % 1000)
  FROM generate_series(1, 800) g;
INSERT INTO public.up_drop
SELECT 1 + g % 6, (ARRAY['m_events', 'm_bytes'])[1 + g % 2], g * 3,
       timestamptz '2026-03-03' + g * interval '59 minutes', 'd-' || (g % 1200),
       (ARRAY['eu', 'us', 'ap'])[1 + g % 3]
  FROM generate_series(1, 800) g;
INSERT INTO public.up_plain
SELECT 1 + g % 6, 'm_events', g % 4, timestamptz '2026-03-04' + g * interval '43 minutes'
  FROM generate_series(1, 500) g;
INSERT INTO public.up_dim VALUES (1, 'm_bytes', 999, '2026-03-06', 'eu');   -- no longer metered
COPY public.up_new FROM STDIN;
8	m_tokens	120000	2026-03-16 08:00:00+00	t-1
8	m_tokens	120000	2026-03-16 08:00:00+00	t-1
8	m_tokens	80000	2026-03-17 09:30:00+00	t-2
1	m_tokens	5000	2026-03-18 10:00:00+00	t-3
\.
RESET ROLE;

SET ROLE up_admin;
SELECT billing.compact_usage() > 0 AS compacted;
-- March is billed and carries the adjustments left pending before the update
SELECT count(*) AS march_invoices FROM billing.finalize_invoices('2026-04-01 01:00');
SELECT billing.correct_usage(4, 'm_events', '2026-03-12 00:00', 40, 'export found more');
INSERT INTO billing.charges (plan, meter, price, valid_from, description) VALUES
    ('p_week', 'm_events', 'unit 0.0008', '2026-03-01', 'events (new price)');
SELECT count(*) AS adjustments
  FROM billing.rerate('2026-02-01', '2026-04-01', reason => 'after the update');
SELECT count(*) AS adjustments
  FROM billing.rerate('2026-02-01', '2026-04-01', reason => 'twice: nothing');
UPDATE billing.accounts SET name = 'Weekly Ltd' WHERE account_id = 4;
UPDATE billing.subscriptions SET ends_at = '2026-05-01' WHERE account_id = 5;
RESET ROLE;

SET ROLE up_writer;
SELECT count(*) FILTER (WHERE counted) AS counted FROM (
    SELECT billing.record(1 + g % 8, (ARRAY['m_events', 'm_seats', 'm_tokens'])[1 + g % 3],
                          g % 7, timestamptz '2026-04-10' + g * interval '17 minutes', 'apr-' || g) AS counted
      FROM generate_series(1, 800) g) s;
RESET ROLE;

SET ROLE up_admin;
SELECT count(*) AS april_invoices FROM billing.finalize_invoices('2026-05-01 01:00');
RESET ROLE;

SET ROLE up_writer;
SELECT billing.record(2, 'm_events', 600, '2026-04-30 23:00', 'late-april');
SELECT count(*) FILTER (WHERE counted) AS counted FROM (
    SELECT billing.record(1 + g % 8, 'm_events', g % 9,
                          timestamptz '2026-05-02' + g * interval '23 minutes', 'may-' || g) AS counted
      FROM generate_series(1, 300) g) s;
RESET ROLE;
