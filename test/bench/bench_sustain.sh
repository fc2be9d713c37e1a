#!/usr/bin/env bash
# bench_sustain.sh: sustained ingest with the maintenance worker on (issue
# 16, DESIGN.md "Goals added for 1.1": preview p95 <= 2 ms throughout, the
# uncompacted backlog does not grow with time).
#
# For BENCH_SUSTAIN_S seconds, at the same time:
#   - a COPY client: metered COPY batches (keep_rows => false, minute
#     buckets) of BENCH_SUSTAIN_COPY_ROWS rows into a metered table whose ts
#     defaults to now(), one psql per batch, back to back;
#   - an ingest() client: billing.ingest() batches of
#     BENCH_SUSTAIN_INGEST_ROWS events sent as array literals (timestamps
#     now()), one psql per batch, back to back;
#   - a preview client: billing.invoice_preview() of account 1 (the hottest
#     account of both streams, on a plan with 7 charges, holding 29 days of
#     compacted minute buckets on 6 meters) every ~100 ms, timed on the
#     server (clock_timestamp around the call);
#   - a sampler: every BENCH_SUSTAIN_SAMPLE_S seconds the uncompacted
#     backlog, count(*) of billing.usage_deltas, and the worker's last run.
# The maintenance worker runs compact_usage() and purge_dedupe() every
# BENCH_SUSTAIN_INTERVAL seconds; nothing else compacts.
#
# The bench cluster (run.sh) preloads billing with the worker off
# (billing.maintenance_interval = 0, so no other benchmark is compacted
# behind its back); this script turns it on for its run with ALTER SYSTEM
# (autovacuum too, as in production: compaction deletes delta rows), and
# resets both on exit.
#
# Results: preview p50/p95/max per minute and overall; the backlog per
# minute; goals: p95 <= 2 ms in every minute and overall, and the mean
# backlog of the last third of the samples (after a warm-up of two
# intervals) at most 1.2x the mean of the first third.
#
# Knobs (environment):
#   BENCH_SUSTAIN_S=600             seconds of sustained load
#   BENCH_SUSTAIN_INTERVAL=10       billing.maintenance_interval, seconds
#   BENCH_SUSTAIN_COPY_ROWS=50000   rows per metered COPY batch
#   BENCH_SUSTAIN_INGEST_ROWS=10000 events per ingest() batch
#   BENCH_SUSTAIN_PAUSE=0           seconds each ingest client sleeps
#                                   between batches (0: flat out)
#   BENCH_SUSTAIN_SAMPLE_S=5        seconds between backlog samples
#   BENCH_SUSTAIN_CONTROL_S=30      seconds of each control phase (0: none)
#
# Control phases (info rows, before the load, worker still off): the same
# preview loop for BENCH_SUSTAIN_CONTROL_S seconds on an idle server, then
# while one backend per core ($(nproc)) burns CPU and does nothing else.
# They separate what the machine's scheduler adds to a preview's latency
# when every core is busy from what billing's own load adds.
#
#   BENCH_ONLY=sustain BENCH_SUSTAIN_S=60 make bench
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/goals.sh"
DB=bench_sustain
DUR=${BENCH_SUSTAIN_S:-600}
INTERVAL=${BENCH_SUSTAIN_INTERVAL:-10}
COPY_ROWS=${BENCH_SUSTAIN_COPY_ROWS:-50000}
INGEST_ROWS=${BENCH_SUSTAIN_INGEST_ROWS:-10000}
PAUSE=${BENCH_SUSTAIN_PAUSE:-0}
CONTROL_S=${BENCH_SUSTAIN_CONTROL_S:-30}
SAMPLE_S=${BENCH_SUSTAIN_SAMPLE_S:-5}
TMP=${BENCH_TMP:?BENCH_TMP must be a directory the server can write (see run.sh)}
COPY_FILE=$TMP/sustain_copy.tsv
INGEST_FILE=$TMP/sustain_ingest.sql
LOG=$TMP/bench_sustain.log
METERS="'error', 'span', 'replay', 'attachment', 'profile', 'monitor'"

q() { psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }
qv() { q -At -c "$1"; }
has_fn() {
    [ "$(qv "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'billing' AND p.proname = '$1'")" != 0 ]
}
na_goals() {  # REASON: every goal of this benchmark, not measured
    goal_add sustain "invoice_preview p95, every minute" "$1" "-" "-" "-" "<= 2 ms" "n/a"
    goal_add sustain "invoice_preview p95, overall" "$1" "-" "-" "-" "<= 2 ms" "n/a"
    goal_add sustain "uncompacted backlog, last third / first third" "$1" "-" "-" "-" "<= 1.2x" "n/a"
}

CHILDREN=()
cleanup() {
    local p
    for p in "${CHILDREN[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    psql -X -q -d postgres -c "ALTER SYSTEM RESET billing.maintenance_interval" \
        -c "ALTER SYSTEM RESET autovacuum" -c "SELECT pg_reload_conf()" >/dev/null 2>&1 || true
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
    rm -f "$COPY_FILE" "$INGEST_FILE"
}
trap cleanup EXIT
: >"$LOG"

psql -X -q -v ON_ERROR_STOP=1 -d postgres -c "SET client_min_messages = warning" \
    -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
q -c "ALTER DATABASE $DB SET timezone = 'UTC'" \
  -c "ALTER DATABASE $DB SET client_min_messages = warning"

if [ "$(psql -X -At -d postgres -c "SELECT 'billing' = ANY (string_to_array(current_setting('shared_preload_libraries'), ','))")" != t ] \
   || [ -z "$(psql -X -At -d postgres -c "SELECT 1 FROM pg_settings WHERE name = 'billing.maintenance_interval'")" ]; then
    echo "billing is not preloaded (shared_preload_libraries), no maintenance worker: n/a"
    na_goals "n/a (no worker)"; exit 0
fi
q -c "CREATE EXTENSION billing"
for f in ingest meter_table invoice_preview compact_usage; do
    has_fn "$f" || { echo "billing.$f does not exist: n/a"; na_goals "n/a (no $f)"; exit 0; }
done

# ------------------------------------------------------------------ setup

echo "setup: 10k accounts, 6 meters, account 1 on a plan with 29 days of compacted minute buckets"
q <<SQL
SET search_path = billing, public;
INSERT INTO meters (meter, aggregation, bucket_width, late_window)
SELECT m, 'sum', interval '1 minute', interval '400 days' FROM unnest(ARRAY[$METERS]) m;
INSERT INTO accounts (account_id) SELECT generate_series(1, 10000);
INSERT INTO plans VALUES ('team', '1 month', 'USD');
INSERT INTO charges (plan, meter, price, valid_from, description)
SELECT 'team', m, 'graduated 50000 @ 0 | 500000 @ 0.0003 | 5000000 @ 0.0002 | inf @ 0.0001',
       '-infinity', m
  FROM unnest(ARRAY[$METERS]) m;
INSERT INTO charges (plan, meter, price, description) VALUES ('team', NULL, 'flat 26', 'base');
-- the period of account 1 started 29 days ago: it holds 29 days of minute
-- buckets on every meter when the load starts (one ingest() per day)
CREATE TABLE public.bench_start AS SELECT date_trunc('minute', now()) - interval '29 days' AS t0;
INSERT INTO subscriptions SELECT 1, 'team', t0, NULL, NULL FROM public.bench_start;
SELECT count(*) AS prefill_batches FROM (
    SELECT billing.ingest('prefill', d, 1, array_agg(1::bigint), array_agg(m), array_agg(1 + (k % 37)::numeric),
                          array_agg(s.t0 + k * interval '1 minute'))
      FROM public.bench_start s, unnest(ARRAY[$METERS]) m,
           generate_series(0, 29 * 1440 - 11) k,
           LATERAL (SELECT k / 1440 AS d) d
     GROUP BY d) x;
SELECT billing.compact_usage() AS prefill_compacted;
-- the metered table of the COPY client; ts is the time of the batch
CREATE TABLE public.t (account_id bigint NOT NULL, meter text NOT NULL,
                       quantity numeric NOT NULL, ts timestamptz NOT NULL DEFAULT now());
SELECT billing.meter_table('public.t', 'account_id', 'meter', 'quantity', 'ts', keep_rows => false) \g /dev/null
-- wait_ms: of ms, the time the preview's backend was ready to run but
-- waited for a CPU (the kernel's run_delay, /proc/self/schedstat; NULL
-- where the kernel does not keep it)
CREATE TABLE public.preview_lat (at timestamptz, ms float8, wait_ms float8);
CREATE FUNCTION public.run_delay_ns() RETURNS bigint LANGUAGE sql AS
    \$\$ SELECT split_part(pg_read_file('/proc/self/schedstat', 0, 200, true), ' ', 2)::bigint \$\$;
CREATE TABLE public.backlog (at timestamptz, deltas bigint, deltas_bytes bigint,
                             compact_runs bigint, compact_ms float8, compact_result text);
-- the preview client: one preview of account 1 every p_every seconds until
-- p_until, each in a transaction of its own, timed on the server
CREATE PROCEDURE public.preview_loop(p_until timestamptz, p_every float8)
LANGUAGE plpgsql AS \$\$
DECLARE
    t0 timestamptz;
    n int;
    w0 bigint;
BEGIN
    WHILE clock_timestamp() < p_until LOOP
        w0 := public.run_delay_ns();
        t0 := clock_timestamp();
        SELECT count(*) INTO n FROM billing.invoice_preview(1, t0);
        INSERT INTO public.preview_lat
        VALUES (t0, extract(epoch FROM clock_timestamp() - t0) * 1000,
                (public.run_delay_ns() - w0) / 1e6);
        COMMIT;
        PERFORM pg_sleep(greatest(0, p_every - extract(epoch FROM clock_timestamp() - t0)));
    END LOOP;
END
\$\$;
VACUUM ANALYZE;
SQL

# Zipf-skewed accounts as in ingest_gen.sql (account 1 the hottest), 6
# meters, quantity 1 for 90% of rows
ZIPF="least(10000, greatest(1, floor(power((power(10201::float8, -0.1) - power(201::float8, -0.1))
          * random() + power(201::float8, -0.1), -10.0)) - 200))::bigint"
ROWGEN="SELECT $ZIPF AS a, (ARRAY[$METERS])[1 + floor(random() * 6)::int] AS m,
               CASE WHEN random() < 0.9 THEN 1 ELSE 1 + floor(random() * 1000) END::numeric AS qty
          FROM generate_series(1, %s)"
q -o /dev/null -c "SELECT setseed(0.5)" -c "COPY ($(printf "$ROWGEN" "$COPY_ROWS")) TO '$COPY_FILE'"
q -At -c "SELECT setseed(0.6)" -c "
    SELECT format('SELECT accepted FROM billing.ingest(%L, 1, :off, %L::bigint[], %L::text[], %L::numeric[], array_fill(now(), ARRAY[%s]));',
                  'sustain', array_agg(a), array_agg(m), array_agg(qty), count(*))
      FROM ($(printf "$ROWGEN" "$INGEST_ROWS")) x" | tail -1 >"$INGEST_FILE"

# ------------------------------------------------------- control phases

# lat_summary TABLE: previews, p50, p95, waited % and the p95 less the wait
lat_summary() {
    qv "SELECT count(*) || '|' || round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 3)
               || '|' || round(percentile_cont(0.95) WITHIN GROUP (ORDER BY ms)::numeric, 3)
               || '|' || coalesce(round(100.0 * count(*) FILTER (WHERE wait_ms > 0.5) / nullif(count(*), 0), 1)::text, '-')
               || '|' || coalesce(round((percentile_cont(0.95) WITHIN GROUP (ORDER BY ms - wait_ms))::numeric, 3)::text, '-')
          FROM $1"
}
if [ "$CONTROL_S" -gt 0 ]; then
    control() {  # LABEL BURNERS
        local burners=() i t
        q -c "TRUNCATE public.preview_lat"
        for ((i = 0; i < $2; i++)); do
            q -c "SET statement_timeout = '$((CONTROL_S + 5))s'" \
              -c "SELECT count(*) FROM generate_series(1, 1000000000000::bigint)" >/dev/null 2>&1 &
            burners+=($!)
        done
        [ "$2" = 0 ] || sleep 1
        t=$(( $(date +%s) + CONTROL_S ))
        q -c "CALL public.preview_loop(to_timestamp($t), 0.1)"
        for i in "${burners[@]}"; do kill "$i" 2>/dev/null || true; done
        psql -X -q -d postgres -c "SELECT pg_cancel_backend(pid) FROM pg_stat_activity
                                    WHERE datname = '$DB' AND query LIKE '%generate_series(1, 1000000000000%'
                                      AND pid <> pg_backend_pid()" >/dev/null
        wait "${burners[@]}" 2>/dev/null || true
        IFS='|' read -r cn c50 c95 cw c95w <<<"$(lat_summary public.preview_lat)"
        echo "control, $1: $cn previews, p50 $c50 ms, p95 $c95 ms, waited for a CPU $cw%, p95 less the wait $c95w ms"
    }
    echo "control phases ($CONTROL_S s each, worker off):"
    control "idle server" 0
    control "$(nproc) backends burning CPU, no billing load" "$(nproc)"
    q -c "TRUNCATE public.preview_lat"
fi

# ------------------------------------------------------- the worker, on

psql -X -q -v ON_ERROR_STOP=1 -d postgres \
    -c "ALTER SYSTEM SET billing.maintenance_interval = '${INTERVAL}s'" \
    -c "ALTER SYSTEM SET autovacuum = on" -c "SELECT pg_reload_conf()" >/dev/null
for i in $(seq 1 60); do
    [ "$(psql -X -At -d postgres -c "SELECT count(*) FROM pg_stat_activity
                                      WHERE datname = '$DB' AND backend_type = 'billing maintenance worker'")" != 0 ] && break
    sleep 0.5
done
echo "worker: $(psql -X -At -d postgres -c "SELECT coalesce(string_agg(backend_type || ' pid ' || pid, ', '), 'NONE')
                                            FROM pg_stat_activity WHERE datname = '$DB'
                                             AND backend_type LIKE 'billing maintenance%'"),"\
     "billing.maintenance_interval=$(psql -X -At -d postgres -c 'SHOW billing.maintenance_interval')"

# ------------------------------------------------------------------- load

echo "sustained load: $DUR s; COPY batches of $COPY_ROWS rows and ingest() batches of $INGEST_ROWS" \
     "events back to back (pause ${PAUSE}s), preview of account 1 every 100 ms"
START=$(date +%s)
END=$((START + DUR))

copy_client() {
    local n=0
    while [ "$(date +%s)" -lt "$END" ]; do
        q -c "COPY t (account_id, meter, quantity) FROM '$COPY_FILE'" 2>>"$LOG" || { echo "error" >"$TMP/sustain_copy.n"; return; }
        n=$((n + 1)); echo "$n" >"$TMP/sustain_copy.n"
        [ "$PAUSE" = 0 ] || sleep "$PAUSE"
    done
}
ingest_client() {
    local n=0
    while [ "$(date +%s)" -lt "$END" ]; do
        q -At -v off=$((n + 1)) -f "$INGEST_FILE" >/dev/null 2>>"$LOG" || { echo "error" >"$TMP/sustain_ingest.n"; return; }
        n=$((n + 1)); echo "$n" >"$TMP/sustain_ingest.n"
        [ "$PAUSE" = 0 ] || sleep "$PAUSE"
    done
}
sampler() {
    while [ "$(date +%s)" -lt "$END" ]; do
        q -c "INSERT INTO public.backlog
              SELECT clock_timestamp(), (SELECT count(*) FROM billing.usage_deltas),
                     pg_total_relation_size('billing.usage_deltas'),
                     s.runs, extract(epoch FROM s.last_duration) * 1000, s.last_result
                FROM (SELECT 1) x LEFT JOIN billing.maintenance_status s ON s.job = 'compact_usage'" 2>>"$LOG" || true
        sleep "$SAMPLE_S"
    done
}
echo 0 >"$TMP/sustain_copy.n"; echo 0 >"$TMP/sustain_ingest.n"
copy_client & CHILDREN+=($!)
ingest_client & CHILDREN+=($!)
sampler & CHILDREN+=($!)
q -c "CALL public.preview_loop(to_timestamp($END), 0.1)" 2>>"$LOG" & CHILDREN+=($!)
wait "${CHILDREN[@]}" || true
CHILDREN=()
ELAPSED=$(( $(date +%s) - START ))
NC=$(cat "$TMP/sustain_copy.n"); NI=$(cat "$TMP/sustain_ingest.n")

# ---------------------------------------------------------------- results

echo
if [[ $NC =~ ^[0-9]+$ ]]; then
    echo "COPY client: $NC batches, $((NC * COPY_ROWS)) rows, $((NC * COPY_ROWS / ELAPSED)) rows/s"
else
    echo "COPY client: error (see $LOG)"; NC=0
fi
if [[ $NI =~ ^[0-9]+$ ]]; then
    echo "ingest() client: $NI batches, $((NI * INGEST_ROWS)) events, $((NI * INGEST_ROWS / ELAPSED)) events/s"
else
    echo "ingest() client: error (see $LOG)"; NI=0
fi
echo
echo "per minute of the load: invoice_preview of account 1 (server ms) and the uncompacted backlog"
q -c "
    WITH s AS (SELECT to_timestamp($START) AS t0),
    p AS (SELECT floor(extract(epoch FROM l.at - s.t0) / 60)::int AS minute,
                 count(*) AS previews,
                 round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 3) AS p50_ms,
                 round(percentile_cont(0.95) WITHIN GROUP (ORDER BY ms)::numeric, 3) AS p95_ms,
                 round(max(ms)::numeric, 3) AS max_ms
            FROM public.preview_lat l, s GROUP BY 1),
    b AS (SELECT floor(extract(epoch FROM b.at - s.t0) / 60)::int AS minute,
                 round(avg(deltas)) AS backlog_mean, max(deltas) AS backlog_max,
                 pg_size_pretty(max(deltas_bytes)) AS deltas_size_max,
                 max(compact_runs) AS compact_runs,
                 round(max(compact_ms)::numeric) AS last_compact_ms
            FROM public.backlog b, s GROUP BY 1)
    SELECT * FROM p FULL JOIN b USING (minute) ORDER BY minute"
echo "maintenance worker, at the end:"
q -c "SELECT job, runs, failures, last_result, last_duration, last_value, last_error
        FROM billing.maintenance_status ORDER BY job"

IFS='|' read -r N P95 WORST WORSTMIN <<<"$(qv "
    WITH s AS (SELECT to_timestamp($START) AS t0),
    m AS (SELECT floor(extract(epoch FROM l.at - s.t0) / 60)::int AS minute,
                 percentile_cont(0.95) WITHIN GROUP (ORDER BY ms) AS p95
            FROM public.preview_lat l, s GROUP BY 1)
    SELECT (SELECT count(*) FROM public.preview_lat),
           (SELECT round(percentile_cont(0.95) WITHIN GROUP (ORDER BY ms)::numeric, 3) FROM public.preview_lat),
           (SELECT round(max(p95)::numeric, 3) FROM m),
           (SELECT minute FROM m ORDER BY p95 DESC LIMIT 1)")"
IFS='|' read -r NS FIRST LAST <<<"$(qv "
    WITH w AS (SELECT deltas, ntile(3) OVER (ORDER BY at) AS third
                 FROM public.backlog
                WHERE at >= to_timestamp($START) + make_interval(secs => 2 * $INTERVAL))
    SELECT count(*), round(avg(deltas) FILTER (WHERE third = 1), 1),
           round(avg(deltas) FILTER (WHERE third = 3), 1) FROM w")"
echo
echo "previews: $N, p95 overall $P95 ms, worst minute's p95 $WORST ms (minute $WORSTMIN)"
echo "backlog (usage_deltas rows), $NS samples after a warm-up of $((2 * INTERVAL)) s:" \
     "mean of the first third $FIRST, of the last third $LAST"
# where the tail comes from: the previews whose backend waited for a CPU
# (more than 0.5 ms of run_delay) against the others
echo "previews that waited for a CPU (run queue > 0.5 ms, /proc/self/schedstat):"
q -c "
    SELECT count(*) FILTER (WHERE wait_ms > 0.5) AS waited,
           round(100.0 * count(*) FILTER (WHERE wait_ms > 0.5) / nullif(count(*), 0), 1) AS waited_pct,
           round((percentile_cont(0.5) WITHIN GROUP (ORDER BY wait_ms)
                  FILTER (WHERE wait_ms > 0.5))::numeric, 3) AS their_wait_p50_ms,
           round((percentile_cont(0.95) WITHIN GROUP (ORDER BY ms)
                  FILTER (WHERE wait_ms <= 0.5))::numeric, 3) AS p95_ms_of_the_others,
           round((percentile_cont(0.95) WITHIN GROUP (ORDER BY ms - wait_ms))::numeric, 3)
               AS p95_ms_less_the_wait
      FROM public.preview_lat WHERE wait_ms IS NOT NULL"

if [ "${N:-0}" -gt 0 ] && [ "$NC" -gt 0 ] && [ "$NI" -gt 0 ]; then
    goal_add sustain "invoice_preview p95, every minute (worst: minute $WORSTMIN)" "$WORST ms" \
        "-" "-" "-" "<= 2 ms" "$(goal_met "$WORST" "<=" 2)"
    goal_add sustain "invoice_preview p95, overall ($N previews)" "$P95 ms" "-" "-" "-" "<= 2 ms" \
        "$(goal_met "$P95" "<=" 2)"
else
    echo "a client did not run (see $LOG): the preview goals are not judged"
    goal_add sustain "invoice_preview p95, every minute" "${WORST:-n/a}" "-" "-" "-" "<= 2 ms" "n/a"
    goal_add sustain "invoice_preview p95, overall" "${P95:-n/a}" "-" "-" "-" "<= 2 ms" "n/a"
fi
if [ "${NS:-0}" -ge 3 ] && [ -n "$FIRST" ] && [ -n "$LAST" ]; then
    if [ "$(awk -v f="$FIRST" 'BEGIN { print (f > 0) }')" = 1 ]; then
        br=$(awk -v f="$FIRST" -v l="$LAST" 'BEGIN { printf "%.2f", l / f }')
    else
        br=$(awk -v l="$LAST" 'BEGIN { print (l > 0) ? 999 : 0 }')
    fi
    goal_add sustain "uncompacted backlog (usage_deltas rows), mean of last third / first third" \
        "$LAST rows" "first third" "$FIRST rows" "${br}x" "<= 1.2x" "$(goal_met "$br" "<=" 1.2)"
else
    goal_add sustain "uncompacted backlog, last third / first third" "n/a ($NS samples)" "-" "-" "-" "<= 1.2x" "n/a"
fi
[ -s "$LOG" ] && { echo "errors (from $LOG):"; sort "$LOG" | uniq -c | head -20; }
exit 0
