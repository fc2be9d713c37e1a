-- The billing demo: an hour of usage for a Sentry-like product.
\pset footer off
\set QUIET on
CREATE EXTENSION billing;

\echo
\echo '== 1. What we meter'
INSERT INTO billing.meters (meter, aggregation, unit) VALUES
    ('error',      'sum', 'events'),
    ('span',       'sum', 'spans'),
    ('replay',     'sum', 'replays'),
    ('attachment', 'sum', 'bytes');
INSERT INTO billing.accounts (account_id, currency, name) VALUES
    (1, 'USD', 'Acme Corp'),
    (2, 'USD', 'Globex'),
    (3, 'EUR', 'Initech');
SELECT meter, aggregation, bucket_width, late_window, dedupe_window, unit FROM billing.meters;

-- all usage is stamped in the last two hours
SELECT date_trunc('hour', now()) - interval '2 hours' AS t0 \gset

\echo
\echo '== 2. Usage reported one event at a time (billing.record); a retried event counts once'
SELECT billing.record(1, 'error', 1, :'t0'::timestamptz + interval '5 min', 'evt-1001') AS counted
UNION ALL
SELECT billing.record(1, 'error', 1, :'t0'::timestamptz + interval '5 min', 'evt-1001')
UNION ALL
SELECT billing.record(1, 'replay', 1, :'t0'::timestamptz + interval '7 min', 'rpl-7');

\echo
\echo '== 3. An SDK outcome table, metered: every COPY counts usage (raw rows not kept)'
CREATE TABLE outcomes (org_id bigint, category text, quantity bigint,
                       received timestamptz, event_id text);
SELECT billing.meter_table('outcomes', 'org_id', 'category', 'quantity', 'received',
                           event_id_column => 'event_id', keep_rows => false) \g /dev/null
INSERT INTO outcomes
SELECT 1 + (g % 3),
       (ARRAY['error', 'span', 'span', 'span', 'attachment'])[1 + g % 5],
       CASE WHEN g % 5 = 4 THEN 250000 + (g * 7919) % 750000 ELSE 1 END,
       :'t0'::timestamptz + (g % 7200) * interval '1 second',
       'sdk-' || g
  FROM generate_series(1, 50000) AS g;
-- the SDK retries a chunk of the same events: nothing is counted twice
INSERT INTO outcomes
SELECT 1 + (g % 3),
       (ARRAY['error', 'span', 'span', 'span', 'attachment'])[1 + g % 5],
       CASE WHEN g % 5 = 4 THEN 250000 + (g * 7919) % 750000 ELSE 1 END,
       :'t0'::timestamptz + (g % 7200) * interval '1 second',
       'sdk-' || g
  FROM generate_series(40001, 50000) AS g;
SELECT count(*) AS raw_rows_kept FROM outcomes;

\echo
\echo '== 4. A batch from a queue consumer (billing.ingest), applied exactly once per offset'
SELECT * FROM billing.ingest('relay', 0, 41,
    ARRAY[2, 2, 3], ARRAY['span', 'replay', 'error'], ARRAY[1200, 3, 17],
    ARRAY[:'t0'::timestamptz + interval '61 min', :'t0'::timestamptz + interval '62 min',
          :'t0'::timestamptz + interval '63 min']);
\echo 'the consumer crashes before committing its own offset and redelivers the batch:'
SELECT * FROM billing.ingest('relay', 0, 41,
    ARRAY[2, 2, 3], ARRAY['span', 'replay', 'error'], ARRAY[1200, 3, 17],
    ARRAY[:'t0'::timestamptz + interval '61 min', :'t0'::timestamptz + interval '62 min',
          :'t0'::timestamptz + interval '63 min']);

\echo
\echo '== 5. Usage per account, rolled up by hour (billing.usage)'
SELECT a.name AS account, u.meter, u.bucket_start, u.quantity, u.events
  FROM billing.accounts a,
       billing.usage(a.account_id, :'t0', :'t0'::timestamptz + interval '2 hours', '1 hour') u
 ORDER BY a.account_id, u.meter, u.bucket_start;

\echo
\echo '== 6. The same usage, one minute bucket at a time (first five for Acme errors)'
SELECT bucket_start, quantity, events
  FROM billing.usage(1, :'t0', :'t0'::timestamptz + interval '2 hours', meter => 'error')
 LIMIT 5;
