-- ingest_peers.sql: the peers of the ingest benchmark, i.e. what a competent
-- user would write without the extension (issue 3, DESIGN.md goal table).
-- Run on a fresh database state; psql variable `unit` is the bucket width
-- as a date_trunc unit ('minute' or 'hour').
--
--   (1) plain COPY into an unindexed table: usage_raw-like table t, no trigger
--   (2) peer_agg: AFTER INSERT FOR EACH STATEMENT trigger with a transition
--       table; GROUP BY ordered by the bucket key, then one
--       INSERT ... ON CONFLICT DO UPDATE into peer_buckets
--   (3) peer_dedupe: the same, but first claims the event ids with
--       INSERT INTO peer_keys ... ON CONFLICT DO NOTHING RETURNING and
--       aggregates only the claimed rows
--   (4) record_peer(): one upsert per call
--   (5) peer_events: a one-row INSERT per transaction into an unindexed
--       table, what record() from many clients is measured against (both
--       pay one commit per call)
--
-- The peers are given the same advantages our implementation gets: meter
-- keys in COLLATE "C" (no locale comparisons in the index) and batches
-- sorted by key before the upsert.

SET client_min_messages = warning;
DROP TABLE IF EXISTS t, peer_buckets, peer_keys, peer_events;
DROP FUNCTION IF EXISTS peer_agg(), peer_dedupe(), record_peer(bigint, text, numeric, timestamptz);

-- The user's usage table: the same DDL for every path, peers and ours.
CREATE TABLE t (
    account_id  bigint NOT NULL,
    meter       text NOT NULL,
    quantity    numeric NOT NULL,
    ts          timestamptz NOT NULL,
    event_id    text
);

-- Bucket counters of the peers.
CREATE TABLE peer_buckets (
    account_id    bigint,
    meter         text COLLATE "C",
    bucket_start  timestamptz,
    quantity      numeric NOT NULL,
    events        bigint NOT NULL,
    PRIMARY KEY (account_id, meter, bucket_start)
);

-- Claimed event ids of peer (3); ts is what a purge of expired keys needs.
CREATE TABLE peer_keys (
    account_id  bigint,
    meter       text COLLATE "C",
    event_id    text COLLATE "C",
    ts          timestamptz NOT NULL,
    PRIMARY KEY (account_id, meter, event_id)
);

-- (5) one row per reported usage, no index.
CREATE TABLE peer_events (
    account_id  bigint NOT NULL,
    meter       text NOT NULL,
    quantity    numeric NOT NULL,
    ts          timestamptz NOT NULL DEFAULT now()
);

-- The bucket unit is baked into the function bodies as a literal, as a
-- user who knows their bucket width would write it.
SELECT set_config('bench.unit', :'unit', false) \g /dev/null

DO $do$
DECLARE
    unit text := current_setting('bench.unit');
BEGIN
    -- (2) statement trigger: aggregate the statement's rows, upsert once.
    EXECUTE format($f$
        CREATE FUNCTION peer_agg() RETURNS trigger LANGUAGE plpgsql AS $body$
        BEGIN
            INSERT INTO peer_buckets AS b
                   (account_id, meter, bucket_start, quantity, events)
            SELECT n.account_id, n.meter COLLATE "C", date_trunc(%1$L, n.ts),
                   sum(n.quantity), count(*)
            FROM new_rows n
            GROUP BY 1, 2, 3
            ORDER BY 1, 2, 3
            ON CONFLICT (account_id, meter, bucket_start) DO UPDATE
                SET quantity = b.quantity + excluded.quantity,
                    events = b.events + excluded.events;
            RETURN NULL;
        END
        $body$ $f$, unit);

    -- (3) the same, counting only rows whose event id this statement
    -- claimed.  (The generated file has unique event ids; two rows with the
    -- same id inside one statement would both join the claimed key.)
    EXECUTE format($f$
        CREATE FUNCTION peer_dedupe() RETURNS trigger LANGUAGE plpgsql AS $body$
        BEGIN
            WITH claimed AS (
                INSERT INTO peer_keys AS k (account_id, meter, event_id, ts)
                SELECT n.account_id, n.meter, n.event_id, n.ts
                FROM new_rows n
                ON CONFLICT DO NOTHING
                RETURNING k.account_id, k.meter, k.event_id
            )
            INSERT INTO peer_buckets AS b
                   (account_id, meter, bucket_start, quantity, events)
            SELECT n.account_id, n.meter COLLATE "C", date_trunc(%1$L, n.ts),
                   sum(n.quantity), count(*)
            FROM new_rows n
            JOIN claimed c ON c.account_id = n.account_id
                          AND c.meter = n.meter COLLATE "C"
                          AND c.event_id = n.event_id COLLATE "C"
            GROUP BY 1, 2, 3
            ORDER BY 1, 2, 3
            ON CONFLICT (account_id, meter, bucket_start) DO UPDATE
                SET quantity = b.quantity + excluded.quantity,
                    events = b.events + excluded.events;
            RETURN NULL;
        END
        $body$ $f$, unit);

    -- (4) one upsert per reported usage.
    EXECUTE format($f$
        CREATE FUNCTION record_peer(p_account bigint, p_meter text,
                                    p_quantity numeric,
                                    p_ts timestamptz DEFAULT now())
        RETURNS void LANGUAGE plpgsql AS $body$
        BEGIN
            INSERT INTO peer_buckets AS b
                   (account_id, meter, bucket_start, quantity, events)
            VALUES (p_account, p_meter, date_trunc(%1$L, p_ts), p_quantity, 1)
            ON CONFLICT (account_id, meter, bucket_start) DO UPDATE
                SET quantity = b.quantity + excluded.quantity,
                    events = b.events + 1;
        END
        $body$ $f$, unit);
END
$do$;
