#!/usr/bin/env bash
# bench_ingest.sh: the ingest benchmark of issue 3 (DESIGN.md goal table).
#
# Loads the same generated file (1M usage rows, 10k Zipf-skewed accounts,
# 6 meters, one hour: ~690k minute buckets, ~60k hour buckets) through
#   peers  (1) plain COPY, (2) statement trigger + ordered upsert,
#          (3) the same claiming event ids first, (4) upsert per call
#   ours   billing.meter_table (keep_rows false / true / event_id dedupe /
#          replay of the same file) and billing.record from 8 pgbench clients
# and prints one table per bucket width (minute, hour) with the ratios and
# goals, sanity checks that every path produced the same buckets, and the
# peak backend memory of a 10M-row metered COPY against a 1M-row one.
#
# Called by test/bench/run.sh (make bench) with PGHOST/PGPORT/PGUSER set
# and BENCH_TMP a directory the server can write.  Every measured path runs
# on a fresh state: the peers' tables are recreated, and for ours the
# extension is dropped and created again.  Parts of our API that do not
# exist yet are reported as "n/a (not implemented)"; an error in our code is
# reported in its row, it does not stop the benchmark.
#
# Knobs (environment):
#   BENCH_ROWS=1000000      rows of the main file
#   BENCH_BIG_ROWS=10000000 rows of the memory test file (0 to skip)
#   BENCH_PGBENCH_T=15      seconds per pgbench run
#   BENCH_REPEAT=1          runs per COPY path; the fastest is reported
#   BENCH_UNITS="minute hour"
#
# Rows marked "(info)" are context, not goals: our ingest plus the deferred
# compact_usage(), record() without waiting for the WAL flush, and record()
# on one hot bucket.  Timings on a shared 2-core machine move by 10-30%
# between runs; BENCH_REPEAT=2 steadies the COPY rows (about +2 minutes).
#
#   PGBIN=/opt/pgC/usr/lib/postgresql/15/bin BENCH_ONLY=ingest make bench
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DB=bench_ingest
ROWS=${BENCH_ROWS:-1000000}
BIG_ROWS=${BENCH_BIG_ROWS:-10000000}
PGBENCH_T=${BENCH_PGBENCH_T:-15}
REPEAT=${BENCH_REPEAT:-1}
UNITS=${BENCH_UNITS:-minute hour}
TMP=${BENCH_TMP:?BENCH_TMP must be a directory the server can write (see run.sh)}
DATA=$TMP/usage_${ROWS}.tsv            # server-side files (COPY TO/FROM)
BIG_DATA=$TMP/usage_${BIG_ROWS}.tsv
LOG=$TMP/bench_ingest.log              # errors of our paths end up here
METERS="'error', 'span', 'replay', 'attachment', 'profile', 'monitor'"
HOT_ACCOUNTS=20                        # record(): 20 accounts x 6 meters
HOT_METERS=6

# ---------------------------------------------------------------- helpers

# q ARGS...: psql on the benchmark database, quiet, stop on error.
q() { psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }

# qv SQL: the single value returned by SQL.
qv() { q -At -c "$1"; }

# timed_ms SQL: run SQL (one statement, its own transaction, so the time
# includes the commit and any work deferred to it) and print its ms.
timed_ms() {
    q -c '\timing on' -c "$1" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1
}

# has_fn NAME: does billing.NAME exist (in the currently installed version)?
has_fn() {
    [ "$(qv "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'billing' AND p.proname = '$1'")" != 0 ]
}

# ratio A B: A / B with 2 decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

# met RATIO GOAL: "yes" when RATIO >= GOAL.
met() { awk -v r="$1" -v g="$2" 'BEGIN { print (r >= g) ? "yes" : "NO" }'; }

TABLE=()       # rows of the result table: path|ms|peer|peer ms|ratio|goal|met?
SANITY=()      # lines of the sanity checks

# row PATH MS PEER PEER_MS GOAL: add a result row; MS is a number or a
# message (n/a, error); the ratio is PEER_MS / MS (speed-up over the peer).
# GOAL "info" marks a row that is shown for context, not judged.
row() {
    local path=$1 ms=$2 peer=$3 pms=$4 goal=$5 r m
    if [ "$goal" = info ] && [[ $ms =~ ^[0-9.]+$ ]]; then
        TABLE+=("$path|$ms|$peer|$pms|$(ratio "$pms" "$ms")x|(info)|-")
    elif [[ $ms =~ ^[0-9.]+$ ]]; then
        r=$(ratio "$pms" "$ms"); m=$(met "$r" "$goal")
        TABLE+=("$path|$ms|$peer|$pms|${r}x|>= ${goal}x|$m")
    else
        TABLE+=("$path|$ms|$peer|$pms|-|>= ${goal}x|-")
    fi
}

print_table() {
    echo
    echo "$1"
    { echo "path|ms|peer|peer ms|ratio|goal|met?"
      printf '%s\n' "${TABLE[@]}"; } | column -t -s '|' -o ' | '
    TABLE=()
}

# ------------------------------------------------------------ fresh states

# reset_peers UNIT: drop and create t and the peers' tables and functions.
reset_peers() { q -v unit="$1" -f "$HERE/ingest_peers.sql"; }

# reset_ours UNIT: drop and create the extension (empty counters), the
# meters with the bucket width of UNIT, the 10k accounts, and t (no peer
# trigger).  Fails when the extension cannot be created.
reset_ours() {
    q -v unit="$1" -f "$HERE/ingest_peers.sql"
    q -c "SET client_min_messages = warning" \
      -c "DROP EXTENSION IF EXISTS billing CASCADE" \
      -c "CREATE EXTENSION billing" \
      -c "INSERT INTO billing.meters (meter, aggregation, bucket_width)
          SELECT m, 'sum', interval '1 $1' FROM unnest(ARRAY[$METERS]) m" \
      -c "INSERT INTO billing.accounts (account_id) SELECT generate_series(1, 10000)"
}

# ------------------------------------------------------------ sanity checks

# make_truth UNIT: the reference buckets, a plain GROUP BY over the raw rows.
make_truth() {
    q -c "DROP TABLE IF EXISTS truth" \
      -c "CREATE TABLE truth AS
          SELECT account_id, meter COLLATE \"C\" AS meter,
                 date_trunc('$1', ts) AS bucket_start,
                 sum(quantity) AS quantity, count(*) AS events
          FROM raw GROUP BY 1, 2, 3" \
      -c "ANALYZE truth"
}

# compare LABEL SQL: compare the buckets SQL returns (account_id, meter,
# bucket_start, quantity, events) with truth, bucket by bucket, and add a
# sanity line with the totals and OK/MISMATCH.
compare() {
    local label=$1 sql=$2 res
    if ! res=$(qv "
        WITH b AS MATERIALIZED ($sql),
        diff AS (
            SELECT count(*) AS n FROM (
                (SELECT * FROM truth EXCEPT ALL
                 SELECT account_id, meter, bucket_start, quantity, events FROM b)
                UNION ALL
                (SELECT account_id, meter, bucket_start, quantity, events FROM b
                 EXCEPT ALL SELECT * FROM truth)) d)
        SELECT format('%s buckets, quantity %s, events %s -> %s',
                      (SELECT count(*) FROM b), (SELECT sum(quantity) FROM b),
                      (SELECT sum(events) FROM b),
                      CASE WHEN diff.n = 0 THEN 'OK'
                           ELSE 'MISMATCH (' || diff.n || ' buckets differ)' END)
        FROM diff" 2>>"$LOG"); then
        res="MISMATCH (query failed, see $LOG)"
    fi
    SANITY+=("$label: $res")
}

# Our buckets, read through the public API (SPEC section 4), all accounts.
OURS_BUCKETS="SELECT a.account_id, u.meter COLLATE \"C\" AS meter, u.bucket_start,
                     sum(u.quantity) AS quantity, sum(u.events) AS events
              FROM billing.accounts a, bench_window w,
                   LATERAL billing.usage(a.account_id, w.from_ts - interval '1 day',
                                         w.to_ts + interval '1 day') u
              GROUP BY 1, 2, 3"
PEER_BUCKETS="SELECT account_id, meter, bucket_start, quantity, events FROM peer_buckets"

# -------------------------------------------------------------- COPY paths

# peer_copy UNIT TRIGGER: fresh peers, TRIGGER (none, peer_agg, peer_dedupe)
# on t, time one COPY of the file (and with REPLAY=1 a second one, timed
# instead).  Prints the best ms over REPEAT runs.
peer_copy() {
    local unit=$1 trig=$2 best= ms i
    for ((i = 0; i < REPEAT; i++)); do
        reset_peers "$unit"
        if [ "$trig" != none ]; then
            q -c "CREATE TRIGGER $trig AFTER INSERT ON t
                  REFERENCING NEW TABLE AS new_rows
                  FOR EACH STATEMENT EXECUTE FUNCTION $trig()"
        fi
        if [ "${REPLAY:-0}" = 1 ]; then q -c "COPY t FROM '$DATA'"; fi
        q -c "CHECKPOINT"
        ms=$(timed_ms "COPY t FROM '$DATA'")
        best=$(awk -v a="$ms" -v b="$best" 'BEGIN { print (b == "" || a < b) ? a : b }')
    done
    echo "$best"
}

# ours_copy UNIT ARGS: fresh extension, meter t with
# billing.meter_table('t', ..., ARGS), time one COPY of the file (with
# REPLAY=1 a second one, timed instead).  Prints the best ms over REPEAT
# runs, or "n/a (not implemented)" / "error (...)".  The state of the last
# run is left for the sanity check.
ours_copy() {
    local unit=$1 args=$2 best= ms i
    for ((i = 0; i < REPEAT; i++)); do
        if ! reset_ours "$unit" 2>>"$LOG"; then echo "error (CREATE EXTENSION)"; return; fi
        if ! has_fn meter_table; then echo "n/a (not implemented)"; return; fi
        if ! q -c "SELECT billing.meter_table('t', 'account_id', 'meter', 'quantity',
                                             'ts' $args)" >/dev/null 2>>"$LOG"; then
            echo "error (meter_table)"; return
        fi
        if [ "${REPLAY:-0}" = 1 ]; then
            q -c "COPY t FROM '$DATA'" 2>>"$LOG" || { echo "error (COPY)"; return; }
        fi
        q -c "CHECKPOINT"
        ms=$(timed_ms "COPY t FROM '$DATA'" 2>>"$LOG") || { echo "error (COPY)"; return; }
        best=$(awk -v a="$ms" -v b="$best" 'BEGIN { print (b == "" || a < b) ? a : b }')
    done
    echo "$best"
}

# check_ours LABEL KEPT: sanity of our last COPY path: buckets equal truth,
# and t holds KEPT rows.
check_ours() {
    local label=$1 kept=$2 n
    if ! has_fn usage; then SANITY+=("$label: n/a (billing.usage not implemented)"); return; fi
    compare "$label" "$OURS_BUCKETS"
    n=$(qv "SELECT count(*) FROM t")
    if [ "$n" = "$kept" ]; then SANITY[-1]+=", rows kept $n OK"
    else SANITY[-1]+=", rows kept $n (expected $kept) MISMATCH"; fi
}

# ---------------------------------------------------------------- record()

# pgbench_run SCRIPT_BODY [PGOPTIONS]: 8 clients, 2 threads, PGBENCH_T
# seconds, prepared statements; sets PROCESSED, FAILED and TPS.
pgbench_run() {
    local script=$TMP/record.pgb out
    { echo "\\set aid random(1, $HOT_ACCOUNTS)"
      echo "\\set m random(1, $HOT_METERS)"
      echo "$1"; } >"$script"
    out=$(PGOPTIONS=${2:-} pgbench -n -M prepared -c 8 -j 2 -T "$PGBENCH_T" \
          -f "$script" "$DB" 2>&1) || { echo "$out" >>"$LOG"; return 1; }
    echo "$out" >>"$LOG"
    PROCESSED=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    FAILED=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
    FAILED=${FAILED:-0}
    TPS=$(sed -n 's/^tps = \([0-9.]*\) (without.*/\1/p' <<<"$out")
    TPS=$(printf '%.0f' "$TPS")
}

CALL_METER="(ARRAY[$METERS])[:m]"

# record_bench UNIT LABEL [PGOPTIONS]: ours then peer (4); one result row
# (tps instead of ms, ratio = our tps / peer tps) and the exact-total checks.
record_bench() {
    local unit=$1 label=$2 opts=${3:-} info=${4:-} ours= peer total ok=yes
    # ours
    if ! reset_ours "$unit" 2>>"$LOG"; then ours="error (CREATE EXTENSION)"
    elif ! has_fn record; then ours="n/a (not implemented)"
    elif ! pgbench_run "SELECT billing.record(:aid, $CALL_METER, 1);" "$opts"; then
        ours="error (pgbench, see $LOG)"
    else
        ours=$TPS
        if has_fn usage; then
            total=$(qv "SELECT coalesce(sum(u.quantity), 0) || '/' || coalesce(sum(u.events), 0)
                        FROM generate_series(1, $HOT_ACCOUNTS) a,
                             LATERAL billing.usage(a, now() - interval '1 day',
                                                   now() + interval '1 day') u")
        else
            total="(billing.usage n/a)"
        fi
        if [ "$total" = "$PROCESSED/$PROCESSED" ] && [ "$FAILED" = 0 ]; then
            SANITY+=("$label ours: $PROCESSED transactions, counted quantity/events $total -> OK")
        else
            ok=no
            SANITY+=("$label ours: $PROCESSED transactions ($FAILED failed), counted quantity/events $total -> MISMATCH")
        fi
    fi
    # peer (4)
    reset_peers "$unit"
    pgbench_run "SELECT record_peer(:aid, $CALL_METER, 1);" "$opts"
    peer=$TPS
    total=$(qv "SELECT coalesce(sum(quantity), 0) || '/' || coalesce(sum(events), 0) FROM peer_buckets")
    if [ "$total" = "$PROCESSED/$PROCESSED" ] && [ "$FAILED" = 0 ]; then
        SANITY+=("$label peer (4): $PROCESSED transactions, counted quantity/events $total -> OK")
    else
        SANITY+=("$label peer (4): $PROCESSED transactions ($FAILED failed), counted quantity/events $total -> MISMATCH")
    fi
    # the goal includes exact totals
    if [[ $ours =~ ^[0-9]+$ ]]; then
        local r; r=$(ratio "$ours" "$peer")
        local m; m=$(met "$r" 5)
        [ "$ok" = no ] && m="NO (totals)"
        if [ -n "$info" ]; then
            [ "$ok" = no ] && m="NO (totals)" || m="-"
            TABLE+=("$label|$ours tps|(4) record_peer|$peer tps|${r}x|(info), exact|$m")
        else
            TABLE+=("$label|$ours tps|(4) record_peer|$peer tps|${r}x|>= 5x, exact|$m")
        fi
    else
        TABLE+=("$label|$ours|(4) record_peer|$peer tps|-|>= 5x, exact|-")
    fi
}

# ------------------------------------------------------------ memory test

# mem_copy FILE ROWS: fresh extension, meter t with keep_rows => false, COPY
# FILE in a new backend while sampling its RssAnon (private memory) every
# ~20 ms; afterwards the backend reports its own VmHWM (peak resident set,
# which also counts the shared buffers it touched).  Prints
# "ms|VmHWM kB|RssAnon before kB|RssAnon peak kB", or a message.
mem_copy() {
    local file=$1 ms pid out peak=0 a sampler
    reset_ours minute 2>>"$LOG" || { echo "error (CREATE EXTENSION)"; return; }
    has_fn meter_table || { echo "n/a (not implemented)"; return; }
    q -c "SELECT billing.meter_table('t', 'account_id', 'meter', 'quantity', 'ts',
                                     keep_rows => false)" >/dev/null 2>>"$LOG" \
        || { echo "error (meter_table)"; return; }
    q -c "CHECKPOINT"
    # One session: report the pid and the private memory before, wait for the
    # sampler to attach, COPY, then read our own /proc status.
    rm -f "$TMP/mem.out"
    q -At >"$TMP/mem.out" 2>>"$LOG" <<SQL &
SELECT 'pid ' || pg_backend_pid();
SELECT 'before ' || substring(pg_read_file('/proc/self/status') FROM 'RssAnon:\s+(\d+)');
SELECT pg_sleep(0.5);
\timing on
COPY t FROM '$file';
\timing off
SELECT 'hwm ' || substring(pg_read_file('/proc/self/status') FROM 'VmHWM:\s+(\d+)');
SQL
    sampler=$!
    until pid=$(sed -n 's/^pid //p' "$TMP/mem.out" 2>/dev/null) && [ -n "$pid" ]; do
        kill -0 "$sampler" 2>/dev/null || break
        sleep 0.02
    done
    while kill -0 "$sampler" 2>/dev/null; do
        a=$(awk '/^RssAnon:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
        [ -n "$a" ] && [ "$a" -gt "$peak" ] && peak=$a
        sleep 0.02
    done
    wait "$sampler" || { echo "error (COPY)"; return; }
    out=$(cat "$TMP/mem.out")
    ms=$(sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' <<<"$out")
    echo "$ms|$(sed -n 's/^hwm //p' <<<"$out")|$(sed -n 's/^before //p' <<<"$out")|$peak"
}

# ------------------------------------------------------------------- main

: >"$LOG"
psql -X -q -d postgres -c "SET client_min_messages = warning" \
    -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
trap 'psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true' EXIT
q -c "ALTER DATABASE $DB SET timezone = 'UTC'" \
  -c "ALTER DATABASE $DB SET client_min_messages = warning"

echo "generating $ROWS rows into $DATA"
q -v rows="$ROWS" -v file="$DATA" -v event_ids=true -v seed=0.42 -f "$HERE/ingest_gen.sql"
q -c "CREATE TABLE raw (account_id bigint, meter text, quantity numeric,
                        ts timestamptz, event_id text)" \
  -c "COPY raw FROM '$DATA'"
echo "file: $(qv "SELECT count(*) || ' rows, ' || count(DISTINCT account_id) || ' accounts, '
                  || count(DISTINCT (account_id, meter, date_trunc('minute', ts)))
                  || ' minute buckets, ' || count(DISTINCT (account_id, meter))
                  || ' hour buckets, ' || pg_size_pretty((pg_stat_file('$DATA')).size)
                  || ', ' || min(ts) || ' .. ' || max(ts) FROM raw")"

for unit in $UNITS; do
    echo
    echo "--- $unit buckets"
    make_truth "$unit"

    # peers
    p1=$(peer_copy "$unit" none)
    echo "(1) plain COPY: $p1 ms"
    p2=$(peer_copy "$unit" peer_agg)
    echo "(2) statement trigger: $p2 ms"
    compare "$unit (2) statement trigger" "$PEER_BUCKETS"
    p3=$(peer_copy "$unit" peer_dedupe)
    echo "(3) dedupe trigger: $p3 ms"
    compare "$unit (3) dedupe trigger" "$PEER_BUCKETS"
    p3r=$(REPLAY=1 peer_copy "$unit" peer_dedupe)
    echo "(3) dedupe trigger, replay: $p3r ms"
    compare "$unit (3) dedupe trigger after replay" "$PEER_BUCKETS"

    # ours
    o=$(ours_copy "$unit" ", keep_rows => false")
    echo "ours keep_rows=false: $o"
    [[ $o =~ ^[0-9.]+$ ]] && check_ours "$unit ours keep_rows=false" 0
    row "meter_table keep_rows=false" "$o" "(2) stmt trigger" "$p2" 3
    row "meter_table keep_rows=false" "$o" "(1) plain COPY" "$p1" 0.5
    # Our ingest appends delta rows; compact_usage() folds them into the
    # bucket table later.  Show that deferred cost too, and check the
    # buckets again after it.
    if [[ $o =~ ^[0-9.]+$ ]] && has_fn compact_usage; then
        c=$(timed_ms "SELECT billing.compact_usage()" 2>>"$LOG") || c="error"
        echo "ours compact_usage() after keep_rows=false: $c"
        if [[ $c =~ ^[0-9.]+$ ]]; then
            compare "$unit ours keep_rows=false after compact_usage()" "$OURS_BUCKETS"
            row "keep_rows=false + compact_usage()" \
                "$(awk -v a="$o" -v b="$c" 'BEGIN { printf "%.3f", a + b }')" \
                "(2) stmt trigger" "$p2" info
        else
            row "keep_rows=false + compact_usage()" "error" "(2) stmt trigger" "$p2" info
        fi
    fi

    o=$(ours_copy "$unit" ", keep_rows => true")
    echo "ours keep_rows=true: $o"
    [[ $o =~ ^[0-9.]+$ ]] && check_ours "$unit ours keep_rows=true" "$ROWS"
    row "meter_table keep_rows=true" "$o" "(2) stmt trigger" "$p2" 2

    o=$(ours_copy "$unit" ", event_id_column => 'event_id', keep_rows => false")
    echo "ours event_id dedupe: $o"
    [[ $o =~ ^[0-9.]+$ ]] && check_ours "$unit ours event_id dedupe" 0
    row "meter_table event_id dedupe" "$o" "(3) dedupe trigger" "$p3" 2

    o=$(REPLAY=1 ours_copy "$unit" ", event_id_column => 'event_id', keep_rows => false")
    echo "ours replay (all duplicates): $o"
    [[ $o =~ ^[0-9.]+$ ]] && check_ours "$unit ours replay" 0
    row "replay, all duplicates" "$o" "(3) replay" "$p3r" 3

    # record() from 8 clients on hot accounts, real commits
    record_bench "$unit" "record() 8 clients"
    if [ "$unit" = minute ]; then
        # the same without waiting for the WAL flush: CPU and locking only
        PGBENCH_T=$(( PGBENCH_T * 2 / 3 )) record_bench "$unit" \
            "record() 8 clients, sync_commit=off" "-c synchronous_commit=off" info
        # one hot bucket: the peer's row lock is held until its commit
        PGBENCH_T=$(( PGBENCH_T * 2 / 3 )) HOT_ACCOUNTS=1 HOT_METERS=1 \
            record_bench "$unit" "record() 8 clients, 1 hot bucket" "" info
    fi
    print_table "ingest, $unit buckets, $ROWS rows (ratio = peer ms / our ms; tps: ours / peer)"
done

# peak memory of a metered COPY with keep_rows => false, 1M vs 10M rows
if [ "$BIG_ROWS" -gt 0 ]; then
    echo
    echo "generating $BIG_ROWS rows into $BIG_DATA"
    q -v rows="$BIG_ROWS" -v file="$BIG_DATA" -v event_ids=false -v seed=0.43 \
      -f "$HERE/ingest_gen.sql"
    m1=$(mem_copy "$DATA" "$ROWS")
    m10=$(mem_copy "$BIG_DATA" "$BIG_ROWS")
    echo
    echo "peak backend memory, metered COPY keep_rows=false, minute buckets, work_mem=$(qv 'SHOW work_mem')"
    mem_line() {  # LABEL RESULT
        local IFS='|'; set -- "$1" $2
        if [ $# -lt 5 ]; then echo "$1|$2||||"; return; fi
        echo "$1|$2|$(( $3 / 1024 ))|$(( $4 / 1024 ))|$(( $5 / 1024 ))|$(( ($5 - $4) / 1024 ))"
    }
    { echo "COPY|ms|VmHWM MB|RssAnon before MB|RssAnon peak MB|growth MB"
      mem_line "$ROWS rows" "$m1"
      mem_line "$BIG_ROWS rows" "$m10"; } | column -t -s '|' -o ' | '
    IFS='|' read -r _ _ b1 pk1 <<<"$m1" || true
    IFS='|' read -r _ _ b10 pk10 <<<"$m10" || true
    if [[ ${pk1:-} =~ ^[0-9]+$ && ${pk10:-} =~ ^[0-9]+$ ]]; then
        # bounded: the private memory a 10x larger COPY adds stays within
        # one work_mem (4MB) of what the 1M-row COPY added
        if [ $(( (pk10 - b10) - (pk1 - b1) )) -le 4096 ]; then
            echo "memory bounded (10M-row growth within 4MB of the 1M-row growth): yes"
        else
            echo "memory bounded (10M-row growth within 4MB of the 1M-row growth): NO"
        fi
    fi
    rm -f "$BIG_DATA"
fi

echo
echo "sanity checks (every path's buckets equal a plain GROUP BY of the file):"
printf '  %s\n' "${SANITY[@]}"
if printf '%s\n' "${SANITY[@]}" | grep -q MISMATCH; then
    echo "sanity: MISMATCH"
else
    echo "sanity: OK"
fi
[ -s "$LOG" ] && grep -q ERROR "$LOG" && { echo "errors of our paths (from $LOG):"; grep ERROR "$LOG" | sort | uniq -c | head -20; }
rm -f "$DATA"
exit 0
