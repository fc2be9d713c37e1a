-- usage_ingest: billing.ingest() applies a batch of usage exactly once per
-- (source, partition, batch_offset) (SPEC section 3), the Kafka-consumer
-- pattern: the offset is stored in the same transaction as the counts.
-- Shows a batch applied once, a repeated or lower offset reported as
-- already_applied and changing nothing, partitions and sources independent,
-- duplicate event ids inside a batch and against record(), exact sums of
-- large and long quantities, and the errors: a failing batch changes
-- nothing, not even its offset.

-- usage is stamped relative to t0, a fixed whole hour (the meters accept
-- reports 100 years late), so that no output depends on the clock
SELECT timestamptz '2025-03-12 09:00+00' AS t0 \gset

INSERT INTO billing.accounts (account_id) VALUES (401), (402), (403);
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('ing_spans', 'sum', '100 years'), ('ing_calls', 'count', '100 years'),
    ('ing_peak', 'max', '100 years'), ('ing_plan', 'last', '100 years');

-- a batch: parallel arrays, one element per report
SELECT * FROM billing.ingest('kafka', 0, 10,
    ARRAY[401, 401, 402, 401]::bigint[],
    ARRAY['ing_spans', 'ing_spans', 'ing_spans', 'ing_calls'],
    ARRAY[5, 7, 11, 3]::numeric[],
    ARRAY[:'t0', :'t0'::timestamptz + interval '1 minute', :'t0', :'t0']::timestamptz[]);
SELECT * FROM test.show(401, :'t0');
SELECT * FROM test.show(402, :'t0');
SELECT source, partition, last_offset FROM billing.ingest_offsets ORDER BY 1, 2;

-- the same offset again (a consumer that restarted): nothing changes
SELECT * FROM billing.ingest('kafka', 0, 10,
    ARRAY[401, 401, 402, 401]::bigint[],
    ARRAY['ing_spans', 'ing_spans', 'ing_spans', 'ing_calls'],
    ARRAY[5, 7, 11, 3]::numeric[],
    ARRAY[:'t0', :'t0'::timestamptz + interval '1 minute', :'t0', :'t0']::timestamptz[]);
-- a lower offset, whatever it holds: nothing changes
SELECT * FROM billing.ingest('kafka', 0, 9, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[1000]::numeric[], ARRAY[:'t0']::timestamptz[]);
SELECT * FROM billing.ingest('kafka', 0, -1, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[1000]::numeric[], ARRAY[:'t0']::timestamptz[]);
SELECT * FROM test.show(401, :'t0');
-- a higher offset applies, and offsets may skip
SELECT * FROM billing.ingest('kafka', 0, 15, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[100]::numeric[], ARRAY[:'t0']::timestamptz[]);
SELECT * FROM billing.ingest('kafka', 0, 11, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[1000]::numeric[], ARRAY[:'t0']::timestamptz[]);
-- partitions and sources are independent
SELECT * FROM billing.ingest('kafka', 1, 1, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[20]::numeric[], ARRAY[:'t0']::timestamptz[]);
SELECT * FROM billing.ingest('kinesis', 0, 1, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[30]::numeric[], ARRAY[:'t0']::timestamptz[]);
SELECT * FROM billing.ingest('kafka', 1, 1, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[20]::numeric[], ARRAY[:'t0']::timestamptz[]);
SELECT * FROM test.show(401, :'t0');
SELECT source, partition, last_offset FROM billing.ingest_offsets ORDER BY 1, 2;
-- an empty batch is applied (it moves the offset) and counts nothing
SELECT * FROM billing.ingest('kafka', 2, 1, '{}'::bigint[], '{}'::text[], '{}'::numeric[],
    '{}'::timestamptz[]);
SELECT * FROM billing.ingest('kafka', 2, 1, '{}'::bigint[], '{}'::text[], '{}'::numeric[],
    '{}'::timestamptz[]);

-- event ids: a repeat inside the batch counts once (the first to arrive);
-- reports without id always count; dimensions are their own buckets but
-- share the dedupe key of (account, meter)
SELECT * FROM billing.ingest('dedupe', 0, 1,
    ARRAY[403, 403, 403, 403, 403, 403, 403]::bigint[],
    ARRAY['ing_spans', 'ing_spans', 'ing_spans', 'ing_spans', 'ing_spans', 'ing_spans', 'ing_calls'],
    ARRAY[1, 100, 2, 4, 4, 1000, 1]::numeric[],
    ARRAY[:'t0', :'t0', :'t0', :'t0', :'t0', :'t0', :'t0']::timestamptz[],
    ARRAY['x1', 'x1', 'x2', NULL, NULL, 'x2', 'x1'],
    ARRAY['', '', 'eu', 'eu', 'eu', 'us', '']);
SELECT * FROM test.show(403, :'t0');
-- ... and against earlier batches and record(), in both directions
SELECT billing.record(403, 'ing_spans', 8, :'t0', 'r1');
SELECT * FROM billing.ingest('dedupe', 0, 2,
    ARRAY[403, 403, 403]::bigint[], ARRAY['ing_spans', 'ing_spans', 'ing_spans'],
    ARRAY[50, 60, 16]::numeric[], ARRAY[:'t0', :'t0', :'t0']::timestamptz[],
    ARRAY['r1', 'x2', 'x3']);
SELECT billing.record(403, 'ing_spans', 70, :'t0', 'x3');
SELECT * FROM test.show(403, :'t0') WHERE meter = 'ing_spans';
-- a batch rolled back leaves no trace: its offset and its event ids are free
BEGIN;
SELECT * FROM billing.ingest('dedupe', 0, 3, ARRAY[403]::bigint[], ARRAY['ing_spans'],
    ARRAY[32]::numeric[], ARRAY[:'t0']::timestamptz[], ARRAY['x4']);
ROLLBACK;
SELECT * FROM billing.ingest('dedupe', 0, 3, ARRAY[403]::bigint[], ARRAY['ing_spans'],
    ARRAY[32]::numeric[], ARRAY[:'t0']::timestamptz[], ARRAY['x4']);
SELECT * FROM billing.ingest('dedupe', 0, 4, ARRAY[403]::bigint[], ARRAY['ing_spans'],
    ARRAY[32]::numeric[], ARRAY[:'t0']::timestamptz[], ARRAY['x4']);
SELECT * FROM test.show(403, :'t0') WHERE meter = 'ing_spans';

-- max and last in a batch; on last, a tie on the timestamp goes to the
-- later arrival, with or without event ids
SELECT * FROM billing.ingest('agg', 0, 1,
    ARRAY[402, 402, 402, 402, 402, 402]::bigint[],
    ARRAY['ing_peak', 'ing_peak', 'ing_peak', 'ing_plan', 'ing_plan', 'ing_plan'],
    ARRAY[-3, 8, 2, 1, 3, 2]::numeric[],
    ARRAY[:'t0', :'t0', :'t0', :'t0'::timestamptz + interval '10 s',
          :'t0'::timestamptz + interval '30 s', :'t0'::timestamptz + interval '20 s']::timestamptz[]);
SELECT * FROM billing.ingest('agg', 0, 2,
    ARRAY[402, 402]::bigint[], ARRAY['ing_plan', 'ing_plan'], ARRAY[5, 7]::numeric[],
    ARRAY[:'t0'::timestamptz + interval '1 minute', :'t0'::timestamptz + interval '1 minute']::timestamptz[]);
SELECT * FROM billing.ingest('agg', 0, 3,
    ARRAY[402, 402]::bigint[], ARRAY['ing_plan', 'ing_plan'], ARRAY[5, 7]::numeric[],
    ARRAY[:'t0'::timestamptz + interval '2 minutes', :'t0'::timestamptz + interval '2 minutes']::timestamptz[],
    ARRAY['b', 'a']);
SELECT * FROM billing.ingest('agg', 0, 4,
    ARRAY[402, 402]::bigint[], ARRAY['ing_plan', 'ing_plan'], ARRAY[8, 9]::numeric[],
    ARRAY[:'t0'::timestamptz + interval '3 minutes', :'t0'::timestamptz + interval '3 minutes']::timestamptz[],
    ARRAY['c', NULL]);
SELECT * FROM test.show(402, :'t0') WHERE meter IN ('ing_peak', 'ing_plan');

-- quantities are exact: beyond 64 bits and beyond 20 fraction digits
SELECT * FROM billing.ingest('big', 0, 1,
    ARRAY[402, 402, 402, 402]::bigint[],
    ARRAY['ing_spans', 'ing_spans', 'ing_spans', 'ing_spans'],
    ARRAY[1000000000000000000, 1000000000000000000, 0.00000000000000000001,
          99999999999999999999999999999999999999]::numeric[],
    ARRAY[:'t0'::timestamptz + interval '5 minutes', :'t0'::timestamptz + interval '5 minutes',
          :'t0'::timestamptz + interval '5 minutes', :'t0'::timestamptz + interval '6 minutes']::timestamptz[]);
SELECT * FROM billing.ingest('big', 0, 2,
    ARRAY[402, 402, 402]::bigint[], ARRAY['ing_spans', 'ing_spans', 'ing_spans'],
    ARRAY[0.000000000000000000001, 1, 99999999999999999999999999999999999999]::numeric[],
    ARRAY[:'t0'::timestamptz + interval '7 minutes', :'t0'::timestamptz + interval '7 minutes',
          :'t0'::timestamptz + interval '6 minutes']::timestamptz[]);
SELECT * FROM test.show(402, :'t0') WHERE meter = 'ing_spans';

-- errors ---------------------------------------------------------------------
-- arrays of different lengths: 22023
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401, 401]::bigint[], ARRAY['ing_spans'],
    ARRAY[1, 1]::numeric[], ARRAY[:'t0', :'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[1, 1]::numeric[], ARRAY[:'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[1]::numeric[], '{}'::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[1]::numeric[], ARRAY[:'t0']::timestamptz[], ARRAY['a', 'b']);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[1]::numeric[], ARRAY[:'t0']::timestamptz[], NULL, ARRAY['eu', 'us']);
-- NULL arguments and NULL elements where a value is required: 22004
SELECT * FROM billing.ingest(NULL, 0, 1, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[1]::numeric[], ARRAY[:'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', NULL, 1, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[1]::numeric[], ARRAY[:'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, NULL, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[1]::numeric[], ARRAY[:'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, NULL, ARRAY['ing_spans'],
    ARRAY[1]::numeric[], ARRAY[:'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401]::bigint[], NULL,
    ARRAY[1]::numeric[], ARRAY[:'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    NULL, ARRAY[:'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401]::bigint[], ARRAY['ing_spans'],
    ARRAY[1]::numeric[], NULL);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401, NULL]::bigint[], ARRAY['ing_spans', 'ing_spans'],
    ARRAY[1, 1]::numeric[], ARRAY[:'t0', :'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401, 401]::bigint[], ARRAY['ing_spans', NULL],
    ARRAY[1, 1]::numeric[], ARRAY[:'t0', :'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401, 401]::bigint[], ARRAY['ing_spans', 'ing_spans'],
    ARRAY[1, NULL]::numeric[], ARRAY[:'t0', :'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401, 401]::bigint[], ARRAY['ing_spans', 'ing_spans'],
    ARRAY[1, 1]::numeric[], ARRAY[:'t0', NULL]::timestamptz[]);
-- unknown meter or account: 23503
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401, 401]::bigint[], ARRAY['ing_spans', 'ing_nope'],
    ARRAY[1, 1]::numeric[], ARRAY[:'t0', :'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401, 499]::bigint[], ARRAY['ing_spans', 'ing_spans'],
    ARRAY[1, 1]::numeric[], ARRAY[:'t0', :'t0']::timestamptz[], ARRAY['e1', 'e2']);
-- negative or not finite quantities: 22023 (negative is fine on max and last)
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401, 401]::bigint[], ARRAY['ing_spans', 'ing_spans'],
    ARRAY[1, -1]::numeric[], ARRAY[:'t0', :'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401, 401]::bigint[], ARRAY['ing_spans', 'ing_calls'],
    ARRAY[1, -1]::numeric[], ARRAY[:'t0', :'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401, 401]::bigint[], ARRAY['ing_spans', 'ing_peak'],
    ARRAY[1, 'NaN']::numeric[], ARRAY[:'t0', :'t0']::timestamptz[]);
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401, 401]::bigint[], ARRAY['ing_spans', 'ing_plan'],
    ARRAY[1, '-Infinity']::numeric[], ARRAY[:'t0', :'t0']::timestamptz[]);
-- a two-dimensional array: 22023
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[[401], [401]]::bigint[], ARRAY['ing_spans', 'ing_spans'],
    ARRAY[1, 1]::numeric[], ARRAY[:'t0', :'t0']::timestamptz[]);
-- a timestamp outside the window (more than 100 years late, or in the far
-- future): 22007
SELECT test.sqlstate_of(format(
    'SELECT billing.ingest(%L, 0, 1, %L::bigint[], %L::text[], %L::numeric[], ARRAY[%L, %L]::timestamptz[])',
    'err', '{401,401}', '{ing_spans,ing_spans}', '{1,1}', :'t0', '1900-01-01 00:00+00')) AS too_late,
       test.sqlstate_of(format(
    'SELECT billing.ingest(%L, 0, 1, %L::bigint[], %L::text[], %L::numeric[], ARRAY[%L, %L]::timestamptz[])',
    'err', '{401,401}', '{ing_spans,ing_spans}', '{1,1}', :'t0', '2999-01-01 00:00+00')) AS too_early;
-- none of these failing batches stored its offset, counted, or claimed an id
SELECT count(*) AS err_offsets FROM billing.ingest_offsets WHERE source = 'err';
SELECT * FROM test.show(401, :'t0');
SELECT * FROM billing.ingest('err', 0, 1, ARRAY[401, 401]::bigint[], ARRAY['ing_spans', 'ing_spans'],
    ARRAY[1, 1]::numeric[], ARRAY[:'t0', :'t0']::timestamptz[], ARRAY['e1', 'e2']);
SELECT * FROM test.show(401, :'t0');
