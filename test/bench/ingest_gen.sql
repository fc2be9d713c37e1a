-- ingest_gen.sql: write the generated usage rows of the ingest benchmark to a
-- server-side file with COPY TO, so every path loads the very same bytes.
--
-- psql variables:
--   rows      number of rows
--   file      server-side path of the output file
--   event_ids 'true' to write a 5th column event_id (unique per row)
--   seed      setseed() value (the data is reproducible, only the hour moves)
--
-- Shape (chosen to match DESIGN.md's measurements: ~690k minute buckets and
-- ~60k hour buckets for 1M rows):
--   account_id  1..10000, Zipf-Mandelbrot skewed, p(k) ~ (k + 200)^-1.1
--               (the top 1% of accounts send ~11% of rows, the top 10% ~48%;
--               a pure Zipf s=1.1 would collapse 1M rows into ~330k buckets)
--   meter       6 meters, uniform
--   quantity    numeric: 1 for 90% of rows, else 1..1000
--   ts          uniform over the whole hour that ends at the top of the hour
--               at least 3 minutes before now(): exactly 60 minute buckets
--               and one hour bucket per (account, meter)
--   event_id    md5 of the row number: 32 hex chars, unique, random order

-- One sequential stream, so setseed() makes random() reproducible.
SET max_parallel_workers_per_gather = 0;
SELECT setseed(:seed) \g /dev/null

-- The hour window is kept for the sanity checks and the other scripts.
CREATE TABLE IF NOT EXISTS bench_window AS
SELECT date_trunc('hour', now() - interval '3 minutes') - interval '1 hour' AS from_ts,
       date_trunc('hour', now() - interval '3 minutes') AS to_ts;

COPY (
    SELECT least(10000, greatest(1,
               floor(power((power(10201::float8, -0.1) - power(201::float8, -0.1))
                           * random() + power(201::float8, -0.1), -10.0)) - 200
           ))::bigint AS account_id,
           (ARRAY['error', 'span', 'replay', 'attachment', 'profile', 'monitor'])
               [1 + floor(random() * 6)::int] AS meter,
           CASE WHEN random() < 0.9 THEN 1::numeric
                ELSE (1 + floor(random() * 1000))::numeric END AS quantity,
           w.from_ts + random() * interval '1 hour' AS ts,
           CASE WHEN :'event_ids' THEN md5(i::text) END AS event_id
    FROM bench_window w, generate_series(1, :rows) AS i
) TO :'file';
