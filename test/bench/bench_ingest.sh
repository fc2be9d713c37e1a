#!/usr/bin/env bash
# bench_ingest.sh: the ingest benchmark of issue 3 and issue 16 (DESIGN.md
# goal tables, 1.0 and "Goals added for 1.1").
#
# Loads the same generated file (1M usage rows, 10k Zipf-skewed accounts,
# 6 meters, one hour: ~690k minute buckets, ~60k hour buckets) through
#   peers  (1) plain COPY, (2) statement trigger + ordered upsert,
#          (3) the same claiming event ids first, (4) upsert per call,
#          (5) a one-row INSERT per transaction into an unindexed table
#   ours   billing.meter_table (keep_rows false / true / event_id dedupe /
#          replay of the same file), billing.ingest() batches of 10k rows
#          sent by a client (psql, the arrays as SQL literals; and, for
#          context, ingest_client.c: libpq, binary parameters, as a driver
#          sends them), and billing.record from 8 pgbench clients
# and prints one table per bucket width (minute, hour) with the ratios and
# goals, sanity checks that every path produced the same buckets, and the
# peak backend memory of a 10M-row metered COPY against a 1M-row one.
#
# End to end (1.1): our metered COPY plus the compact_usage() that makes
# reads fast, against (2), whose buckets need no maintenance; on a first
# load, and on a second load of a second file (the same hour, another seed:
# its buckets partly merge into the first's) on top of the first; each load
# the best of BENCH_REPEAT runs from a fresh state, as (2)'s are.  After
# the first load (minute buckets) the compacted storage per minute cell is
# measured: every billing table named usage_* but usage_deltas (whatever
# holds compacted usage), heap, TOAST and indexes, against (2)'s
# peer_buckets.
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
#   BENCH_REPEAT=1          runs per COPY path (and end to end, ours and
#                           the peers'); the fastest is reported
#   BENCH_UNITS="minute hour"
#   BENCH_INGEST_BATCH=10000 rows per ingest() call
#
# Rows marked "(info)" are context, not goals: ingest() batches sent as
# binary parameters (psql's literals cost their lexing and array_in, about
# 1.3 s per 1M rows here before ingest() runs at all), our ingest plus the
# deferred compact_usage(), record() without waiting for the WAL flush, and
# record() on one hot bucket.  Timings on a shared 2-core machine move by 10-30%
# between runs; BENCH_REPEAT=2 steadies the COPY rows (about +2 minutes).
#
#   PGBIN=/opt/pgC/usr/lib/postgresql/15/bin BENCH_ONLY=ingest make bench
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/goals.sh"
DB=bench_ingest
ROWS=${BENCH_ROWS:-1000000}
BIG_ROWS=${BENCH_BIG_ROWS:-10000000}
PGBENCH_T=${BENCH_PGBENCH_T:-15}
REPEAT=${BENCH_REPEAT:-1}
UNITS=${BENCH_UNITS:-minute hour}
TMP=${BENCH_TMP:?BENCH_TMP must be a directory the server can write (see run.sh)}
DATA=$TMP/usage_${ROWS}.tsv            # server-side files (COPY TO/FROM)
DATA2=$TMP/usage_${ROWS}_2.tsv         # the second load (another seed)
INGEST_BATCH=${BENCH_INGEST_BATCH:-10000}
INGEST_SQL=$TMP/ingest_batches.sql     # the ingest() calls a client sends
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

# lesser A B: the smaller of A and B (B empty: A), for best-of-REPEAT.
lesser() { awk -v a="$1" -v b="$2" 'BEGIN { print (b == "" || a < b) ? a : b }'; }

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
    elif [ "$goal" = info ]; then
        TABLE+=("$path|$ms|$peer|$pms|-|(info)|-")
    elif [[ $ms =~ ^[0-9.]+$ ]] && [[ $pms =~ ^[0-9.]+$ ]]; then
        r=$(ratio "$pms" "$ms"); m=$(met "$r" "$goal")
        TABLE+=("$path|$ms|$peer|$pms|${r}x|>= ${goal}x|$m")
    else
        TABLE+=("$path|$ms|$peer|$pms|-|>= ${goal}x|n/a")
    fi
}

# print_table TITLE SECTION: print the result table, and add its goal rows
# (all but "(info)") to the closing table of make bench as "ingest, SECTION".
print_table() {
    local r p o pe pm ra go me
    echo
    echo "$1"
    { echo "path|ms|peer|peer ms|ratio|goal|met?"
      printf '%s\n' "${TABLE[@]}"; } | column -t -s '|' -o ' | '
    for r in "${TABLE[@]}"; do
        IFS='|' read -r p o pe pm ra go me <<<"$r"
        [[ $go == "(info"* ]] && continue
        [[ $o =~ ^[0-9.]+$ ]] && o="$o ms"
        [[ $pm =~ ^[0-9.]+$ ]] && pm="$pm ms"
        [ "$me" = - ] && me=n/a
        goal_add "ingest, $2" "$p" "$o" "$pe" "$pm" "$ra" "$go" "$me"
    done
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

# make_truth UNIT [SOURCE [NAME]]: the reference buckets NAME (truth), a
# plain GROUP BY over the raw rows of SOURCE (raw).
make_truth() {
    local name=${3:-truth}
    q -c "DROP TABLE IF EXISTS $name" \
      -c "CREATE TABLE $name AS
          SELECT account_id, meter COLLATE \"C\" AS meter,
                 date_trunc('$1', ts) AS bucket_start,
                 sum(quantity) AS quantity, count(*) AS events
          FROM ${2:-raw} r GROUP BY 1, 2, 3" \
      -c "ANALYZE $name"
}

# compare LABEL SQL: compare the buckets SQL returns (account_id, meter,
# bucket_start, quantity, events) with truth (the table named TRUTH when
# set), bucket by bucket, and add a sanity line with the totals and
# OK/MISMATCH.
compare() {
    local label=$1 sql=$2 res truth=${TRUTH:-truth}
    if ! res=$(qv "
        WITH b AS MATERIALIZED ($sql),
        diff AS (
            SELECT count(*) AS n FROM (
                (SELECT * FROM $truth EXCEPT ALL
                 SELECT account_id, meter, bucket_start, quantity, events FROM b)
                UNION ALL
                (SELECT account_id, meter, bucket_start, quantity, events FROM b
                 EXCEPT ALL SELECT * FROM $truth)) d)
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
# instead; with SECOND=1 the second file after the first, timed instead).
# Prints the best ms over REPEAT runs.
peer_copy() {
    local unit=$1 trig=$2 best= ms i
    for ((i = 0; i < REPEAT; i++)); do
        reset_peers "$unit"
        if [ "$trig" != none ]; then
            q -c "CREATE TRIGGER $trig AFTER INSERT ON t
                  REFERENCING NEW TABLE AS new_rows
                  FOR EACH STATEMENT EXECUTE FUNCTION $trig()"
        fi
        if [ "${REPLAY:-0}" = 1 ] || [ "${SECOND:-0}" = 1 ]; then q -c "COPY t FROM '$DATA'"; fi
        q -c "CHECKPOINT"
        if [ "${SECOND:-0}" = 1 ]; then ms=$(timed_ms "COPY t FROM '$DATA2'")
        else ms=$(timed_ms "COPY t FROM '$DATA'"); fi
        best=$(lesser "$ms" "$best")
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
        best=$(lesser "$ms" "$best")
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

# check_total LABEL TOTAL: a sanity line: TOTAL (quantity/events counted,
# or rows) must be PROCESSED/PROCESSED (or PROCESSED) with no failed
# transaction.  Returns 1 on a mismatch.
check_total() {
    if { [ "$2" = "$PROCESSED/$PROCESSED" ] || [ "$2" = "$PROCESSED" ]; } && [ "$FAILED" = 0 ]; then
        SANITY+=("$1: $PROCESSED transactions, counted $2 -> OK")
    else
        SANITY+=("$1: $PROCESSED transactions ($FAILED failed), counted $2 -> MISMATCH")
        return 1
    fi
}

# insert_peer_bench: peer (5), a one-row INSERT per transaction into the
# unindexed peer_events from 8 clients; sets P5 (tps, or a message) and
# P5_OK (yes when every row is there).  record_bench runs it just before
# and just after each of our main record() runs: both pay one WAL flush
# per transaction, and this disk's flush latency drifts within minutes, so
# a peer measured once, minutes away, moved the ratio by a quarter.
insert_peer_bench() {
    reset_peers minute
    P5_OK=yes
    if pgbench_run "INSERT INTO peer_events (account_id, meter, quantity) VALUES (:aid, $CALL_METER, 1);"; then
        P5=$TPS
        check_total "record() 8 clients peer (5) one-row INSERT" \
            "$(qv "SELECT count(*) FROM peer_events")" || P5_OK=no
    else
        P5="error (pgbench, see $LOG)"; P5_OK=no
    fi
}

# record_bench UNIT LABEL [PGOPTIONS] [MODE]: ours then peer (4); result rows
# (tps instead of ms, ratio = our tps / peer tps) and the exact-total checks.
# MODE: main (against (4) for context, the 1.0 goal of 5x being replaced,
# and against (5), the mean of insert_peer_bench run just before and just
# after ours: >= 0.8x), info (against (4),
# context), hot (one hot bucket against (4): >= 3x).  Every goal includes
# exact totals.
record_bench() {
    local unit=$1 label=$2 opts=${3:-} mode=${4:-main} ours= peer total ok=yes pok=yes r m
    local p5a= p5a_ok=
    # peer (5) just before ours (main)
    if [ "$mode" = main ]; then
        insert_peer_bench
        p5a=$P5; p5a_ok=$P5_OK
    fi
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
        check_total "$label ours" "$total" || ok=no
    fi
    # peer (5) just after ours (main): P5 is the mean of the two runs
    if [ "$mode" = main ]; then
        insert_peer_bench
        echo "$label: peer (5) $p5a tps before ours, $P5 tps after" >>"$LOG"
        if [[ $p5a =~ ^[0-9]+$ ]] && [[ $P5 =~ ^[0-9]+$ ]]; then
            P5_RUNS="$p5a, $P5"
            P5=$(( (p5a + P5 + 1) / 2 ))
        else
            P5_RUNS=; [[ $p5a =~ ^[0-9]+$ ]] || P5=$p5a
        fi
        [ "$p5a_ok" = yes ] || P5_OK=no
    fi
    # peer (4)
    reset_peers "$unit"
    if pgbench_run "SELECT record_peer(:aid, $CALL_METER, 1);" "$opts"; then
        peer=$TPS
        check_total "$label peer (4)" \
            "$(qv "SELECT coalesce(sum(quantity), 0) || '/' || coalesce(sum(events), 0) FROM peer_buckets")" \
            || pok=no
    else
        peer="error (pgbench, see $LOG)"; pok=no
    fi
    # rows
    if [[ $ours =~ ^[0-9]+$ ]] && [[ $peer =~ ^[0-9]+$ ]]; then
        r=$(ratio "$ours" "$peer")
        case $mode in
        hot)
            m=$(met "$r" 3)
            [ "$ok" = no ] && m="NO (totals)"
            [ "$pok" = no ] && m="n/a (peer totals)"
            TABLE+=("$label|$ours tps|(4) record_peer|$peer tps|${r}x|>= 3x, exact|$m") ;;
        *)
            m=-; [ "$ok" = no ] && m="NO (totals)"
            if [ "$mode" = main ]; then
                TABLE+=("$label|$ours tps|(4) record_peer|$peer tps|${r}x|(info; 1.0's >= 5x, replaced by (5)), exact|$m")
            else
                TABLE+=("$label|$ours tps|(4) record_peer|$peer tps|${r}x|(info), exact|$m")
            fi ;;
        esac
    else
        case $mode in
        hot) TABLE+=("$label|$ours|(4) record_peer|$peer tps|-|>= 3x, exact|n/a") ;;
        *)   TABLE+=("$label|$ours|(4) record_peer|$peer tps|-|(info)|-") ;;
        esac
    fi
    if [ "$mode" = main ]; then
        if [[ $ours =~ ^[0-9]+$ ]] && [[ $P5 =~ ^[0-9]+$ ]]; then
            r=$(ratio "$ours" "$P5"); m=$(met "$r" 0.8)
            [ "$ok" = no ] && m="NO (totals)"
            [ "$P5_OK" = no ] && m="n/a (peer totals)"
            TABLE+=("$label|$ours tps|(5) one-row INSERT, mean of runs before and after ours ($P5_RUNS)|$P5 tps|${r}x|>= 0.8x, exact|$m")
        else
            TABLE+=("$label|$ours|(5) one-row INSERT|$P5|-|>= 0.8x, exact|n/a")
        fi
    fi
}

# ------------------------------------------------------ 1.1: end to end

# ours_storage: "bytes|tables" of our compacted usage: every billing table
# named usage_* except usage_deltas, with its partitions, heap, TOAST and
# indexes (pg_total_relation_size), and the list of the tables counted.
ours_storage() {
    qv "SELECT coalesce(sum(s), 0)::bigint || '|'
               || coalesce(string_agg(relname || ' ' || pg_size_pretty(s), ', ' ORDER BY relname), 'none')
          FROM (SELECT c.relname,
                       sum(pg_total_relation_size(coalesce(pt.relid, c.oid::regclass)))::bigint AS s
                  FROM pg_class c
                  JOIN pg_namespace n ON n.oid = c.relnamespace
                  LEFT JOIN LATERAL pg_partition_tree(c.oid) pt ON true
                 WHERE n.nspname = 'billing' AND c.relname LIKE 'usage\_%'
                   AND c.relname <> 'usage_deltas'
                   AND c.relkind IN ('r', 'p') AND NOT c.relispartition
                 GROUP BY c.relname) x"
}

# storage_row: the storage goal row, ours (after the first load and its
# compaction, minute buckets) against (2)'s peer_buckets (PEER_BYTES over
# PEER_CELLS); the cells are the minute buckets of truth.
storage_row() {
    local st bytes tables cells per pper deltas
    cells=$(qv "SELECT count(*) FROM truth")
    st=$(ours_storage 2>>"$LOG") || st="error|"
    IFS='|' read -r bytes tables <<<"$st"
    deltas=$(qv "SELECT count(*) || ' rows, ' || pg_size_pretty(pg_total_relation_size('billing.usage_deltas'))
                 FROM billing.usage_deltas" 2>>"$LOG") || deltas="n/a"
    pper=$(awk -v b="$PEER_BYTES" -v c="$PEER_CELLS" 'BEGIN { printf "%.1f", b / c }')
    echo "compacted storage: $tables (deltas, not counted: $deltas); $cells minute cells"
    echo "peer (2) peer_buckets: $(awk -v b="$PEER_BYTES" 'BEGIN { printf "%.1f MB", b / 1048576 }'), $PEER_CELLS cells"
    SANITY+=("storage counted: $tables; usage_deltas after compact_usage(): $deltas")
    if [[ $bytes =~ ^[0-9]+$ ]] && [ "$bytes" -gt 0 ]; then
        per=$(awk -v b="$bytes" -v c="$cells" 'BEGIN { printf "%.1f", b / c }')
        TABLE+=("compacted storage per minute cell, heap + indexes|$per B|(2) peer_buckets|$pper B|$(ratio "$pper" "$per")x|<= 40 B|$(goal_met "$per" "<=" 40)")
    else
        TABLE+=("compacted storage per minute cell, heap + indexes|n/a|(2) peer_buckets|$pper B|-|<= 40 B|n/a")
    fi
}

# ours_e2e UNIT: end to end, as (2) is timed (the best of REPEAT runs, each
# on a fresh state).  A run: fresh extension, meter t (keep_rows false),
# COPY of the file plus compact_usage() (the first load), then COPY of the
# second file on top plus compact_usage(), merging into the first's buckets
# (the second load).  Sets E1 and E2 to the best ms of each load over the
# runs (or to a message) and E0 to the best first COPY alone (empty without
# compact_usage()), prints each run's times, and checks the buckets of the
# last run after each load against truth and truth2, then those of one more
# COPY alone, untimed (not in a subshell: it adds sanity lines and the
# storage row).
ours_e2e() {
    local unit=$1 b0= b1= b2= i o c o2 c2 err
    E1="n/a (no compact_usage)"; E2=$E1; E0=
    for ((i = 0; i < REPEAT; i++)); do
        err=
        if ! reset_ours "$unit" 2>>"$LOG"; then err="error (CREATE EXTENSION)"
        # (known once the extension exists: the peers' runs drop it)
        elif [ "$i" = 0 ] && ! has_fn compact_usage; then return 0
        elif ! q -c "SELECT billing.meter_table('t', 'account_id', 'meter', 'quantity', 'ts',
                                                keep_rows => false)" >/dev/null 2>>"$LOG"; then
            err="error (meter_table)"
        fi
        [ -n "$err" ] && { E1=$err; E2=$err; return 0; }
        q -c "CHECKPOINT"
        o=$(timed_ms "COPY t FROM '$DATA'" 2>>"$LOG") || o=
        [[ $o =~ ^[0-9.]+$ ]] &&
            b0=$(awk -v a="$o" -v m="$b0" 'BEGIN { printf "%.3f", (m == "" || a < m) ? a : m }')
        c=; [[ $o =~ ^[0-9.]+$ ]] && { c=$(timed_ms "SELECT billing.compact_usage()" 2>>"$LOG") || c=; }
        [[ $c =~ ^[0-9.]+$ ]] || { E1="error (first load)"; E2=$E1; return 0; }
        if [ "$i" = $((REPEAT - 1)) ]; then
            compare "$unit ours keep_rows=false after compact_usage()" "$OURS_BUCKETS"
            [ "$unit" = minute ] && storage_row
        fi
        q -c "CHECKPOINT"
        o2=$(timed_ms "COPY t FROM '$DATA2'" 2>>"$LOG") || o2=
        c2=; [[ $o2 =~ ^[0-9.]+$ ]] && { c2=$(timed_ms "SELECT billing.compact_usage()" 2>>"$LOG") || c2=; }
        echo "ours e2e run $((i + 1)): first load COPY $o + compact_usage() $c ms;" \
             "second load COPY $o2 + compact_usage() $c2 ms"
        [[ $c2 =~ ^[0-9.]+$ ]] || { E1=$b1; E2="error (second load)"; return 0; }
        if [ "$i" = $((REPEAT - 1)) ]; then
            TRUTH=truth2 compare "$unit ours keep_rows=false, both loads, compacted" "$OURS_BUCKETS"
        fi
        b1=$(awk -v a="$o" -v b="$c" -v m="$b1" 'BEGIN { s = a + b; printf "%.3f", (m == "" || s < m) ? s : m }')
        b2=$(awk -v a="$o2" -v b="$c2" -v m="$b2" 'BEGIN { s = a + b; printf "%.3f", (m == "" || s < m) ? s : m }')
    done
    E0=$b0; E1=$b1; E2=$b2
    # the counts of the COPY alone, checked on one more (untimed) run: a
    # check inside the timed runs would read the deltas before compaction
    reset_ours "$unit" 2>>"$LOG" &&
        q -c "SELECT billing.meter_table('t', 'account_id', 'meter', 'quantity', 'ts',
                                         keep_rows => false)" >/dev/null 2>>"$LOG" &&
        q -c "COPY t FROM '$DATA'" >/dev/null 2>>"$LOG" &&
        check_ours "$unit ours keep_rows=false" 0
}

# make_ingest_sql: the ingest() calls of the file, INGEST_BATCH rows each in
# file order, as a client would send them (arrays as literals), into
# INGEST_SQL; each call returns its accepted count.
make_ingest_sql() {
    q -c "COPY (
            SELECT format('SELECT accepted FROM billing.ingest(%L, 1, %s, %L::bigint[], %L::text[], %L::numeric[], %L::timestamptz[]);',
                          'bench', b + 1, array_agg(account_id ORDER BY i), array_agg(meter ORDER BY i),
                          array_agg(quantity ORDER BY i), array_agg(ts ORDER BY i))
              FROM (SELECT r.*, i / $INGEST_BATCH AS b
                      FROM (SELECT r.*, row_number() OVER () - 1 AS i FROM raw r) r) x
             GROUP BY b ORDER BY b) TO '$INGEST_SQL'"
}

# send_psql: every ingest() call of INGEST_SQL from one psql client, the
# arrays as literals; prints "ACCEPTED MS" (the client's wall ms).
send_psql() {
    local t0 acc
    t0=$(date +%s%N)
    acc=$(q -At -f "$INGEST_SQL" 2>>"$LOG") || return
    echo "$(awk '{ s += $1 } END { print s + 0 }' <<<"$acc") $(( ($(date +%s%N) - t0) / 1000000 ))"
}

# send_binary: the same batches of the same file from ingest_client (one
# prepared statement, binary arrays converted before the clock starts);
# prints "ACCEPTED MS" (its sending loop's ms).
send_binary() {
    PGDATABASE=$DB "$INGEST_CLIENT" "$DATA" "$INGEST_BATCH" bench 2>>"$LOG"
}

# build_ingest_client: compile ingest_client.c (a libpq client sending the
# arrays as binary parameters) into TMP; sets INGEST_CLIENT, or leaves it
# empty when libpq's headers are missing.
build_ingest_client() {
    local pgc=${PG_CONFIG:-pg_config}
    INGEST_CLIENT=
    if "${CC:-cc}" -O2 -I"$("$pgc" --includedir)" -o "$TMP/ingest_client" \
           "$HERE/ingest_client.c" -L"$("$pgc" --libdir)" -lpq 2>>"$LOG"; then
        INGEST_CLIENT=$TMP/ingest_client
    fi
}

# ingest_run UNIT SENDER: fresh extension, SENDER (send_psql or
# send_binary) sends the ingest() calls; prints the best ms of REPEAT or a
# message.  Checks the accepted total, and leaves the state for check_ours.
ingest_run() {
    local unit=$1 sender=$2 best= out ms i acc
    if [ "$sender" = send_binary ] && [ -z "$INGEST_CLIENT" ]; then
        echo "n/a (ingest_client did not build, see $LOG)"; return
    fi
    for ((i = 0; i < REPEAT; i++)); do
        if ! reset_ours "$unit" 2>>"$LOG"; then echo "error (CREATE EXTENSION)"; return; fi
        if ! has_fn ingest; then echo "n/a (not implemented)"; return; fi
        q -c "CHECKPOINT"
        out=$("$sender") || { echo "error (ingest, $sender, see $LOG)"; return; }
        read -r acc ms <<<"$out"
        [ "$acc" = "$ROWS" ] || { echo "error (accepted $acc of $ROWS)"; return; }
        best=$(lesser "$ms" "$best")
    done
    echo "$best"
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
echo "generating the second load, $ROWS rows (the same hour, another seed) into $DATA2"
q -v rows="$ROWS" -v file="$DATA2" -v event_ids=false -v seed=0.47 -f "$HERE/ingest_gen.sql"
q -c "CREATE TABLE raw2 (LIKE raw)" -c "COPY raw2 FROM '$DATA2'"
echo "second file: $(qv "WITH a AS (SELECT DISTINCT account_id, meter, date_trunc('minute', ts) AS m FROM raw),
                              b AS (SELECT DISTINCT account_id, meter, date_trunc('minute', ts) AS m FROM raw2)
                         SELECT (SELECT count(*) FROM b) || ' minute buckets, of which '
                                || (SELECT count(*) FROM a JOIN b USING (account_id, meter, m))
                                || ' also in the first'")"
make_ingest_sql
build_ingest_client
P5=; P5_OK=; P5_RUNS=

for unit in $UNITS; do
    echo
    echo "--- $unit buckets"
    make_truth "$unit"
    make_truth "$unit" "(SELECT * FROM raw UNION ALL SELECT * FROM raw2)" truth2

    # peers
    p1=$(peer_copy "$unit" none)
    echo "(1) plain COPY: $p1 ms"
    p2=$(peer_copy "$unit" peer_agg)
    echo "(2) statement trigger: $p2 ms"
    compare "$unit (2) statement trigger" "$PEER_BUCKETS"
    if [ "$unit" = minute ]; then
        PEER_BYTES=$(qv "SELECT pg_total_relation_size('peer_buckets')")
        PEER_CELLS=$(qv "SELECT count(*) FROM peer_buckets")
    fi
    p2b=$(SECOND=1 peer_copy "$unit" peer_agg)
    echo "(2) statement trigger, second load merging into the first: $p2b ms"
    TRUTH=truth2 compare "$unit (2) statement trigger, both loads" "$PEER_BUCKETS"
    p3=$(peer_copy "$unit" peer_dedupe)
    echo "(3) dedupe trigger: $p3 ms"
    compare "$unit (3) dedupe trigger" "$PEER_BUCKETS"
    p3r=$(REPLAY=1 peer_copy "$unit" peer_dedupe)
    echo "(3) dedupe trigger, replay: $p3r ms"
    compare "$unit (3) dedupe trigger after replay" "$PEER_BUCKETS"

    # ours.  End to end: our ingest appends delta rows; compact_usage()
    # folds them into the compacted store, which makes reads fast
    # (ours_e2e).  Its first COPY of each run is the keep_rows=false COPY
    # (the best of the runs).
    ours_e2e "$unit"
    e1=$E1; e2=$E2; o=$E0
    if [ -z "$o" ]; then        # no compact_usage(): the COPY alone
        o=$(ours_copy "$unit" ", keep_rows => false")
        [[ $o =~ ^[0-9.]+$ ]] && check_ours "$unit ours keep_rows=false" 0
    fi
    echo "ours keep_rows=false: $o"
    row "meter_table keep_rows=false" "$o" "(2) stmt trigger" "$p2" 3
    row "meter_table keep_rows=false" "$o" "(1) plain COPY" "$p1" 0.5
    if [ "$unit" = hour ]; then
        row "meter_table keep_rows=false (1.1)" "$o" "(1) plain COPY" "$p1" 1.0
    fi
    o_copy=$o
    row "keep_rows=false + compact_usage(), first load" "$e1" "(2) stmt trigger" "$p2" 2
    row "keep_rows=false + compact_usage(), second load" "$e2" "(2) stmt trigger, 2nd" "$p2b" 2

    # ingest() batches sent by a client as drivers send them (one prepared
    # statement, binary parameters), against the metered COPY above
    o=$(ingest_run "$unit" send_binary)
    echo "ours ingest() batches of $INGEST_BATCH, binary parameters: $o"
    [[ $o =~ ^[0-9.]+$ ]] && check_ours "$unit ours ingest() batches, binary parameters" "0"
    if [[ $o =~ ^[0-9.]+$ ]] && [[ $o_copy =~ ^[0-9.]+$ ]]; then
        r=$(ratio "$o_copy" "$o")
        TABLE+=("ingest() batches of $INGEST_BATCH from a client (binary parameters)|$o|metered COPY keep_rows=false|$o_copy|${r}x|>= 0.7x|$(met "$r" 0.7)")
    else
        TABLE+=("ingest() batches of $INGEST_BATCH from a client (binary parameters)|$o|metered COPY keep_rows=false|$o_copy|-|>= 0.7x|n/a")
    fi
    # the same batches from psql, the arrays as literals: lexing the text and
    # array_in alone take most of the goal's budget (doc/billing.md, ingest)
    o=$(ingest_run "$unit" send_psql)
    echo "ours ingest() batches of $INGEST_BATCH: $o"
    [[ $o =~ ^[0-9.]+$ ]] && check_ours "$unit ours ingest() batches" "0"
    row "ingest() batches of $INGEST_BATCH, psql array literals" "$o" "metered COPY keep_rows=false" "$o_copy" info

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

    # record() from 8 clients on hot accounts, real commits, between two
    # runs of peer (5)
    record_bench "$unit" "record() 8 clients"
    if [ "$unit" = minute ]; then
        # the same without waiting for the WAL flush: CPU and locking only
        PGBENCH_T=$(( PGBENCH_T * 2 / 3 )) record_bench "$unit" \
            "record() 8 clients, sync_commit=off" "-c synchronous_commit=off" info
        # one hot bucket: the peer's row lock is held until its commit
        PGBENCH_T=$(( PGBENCH_T * 2 / 3 )) HOT_ACCOUNTS=1 HOT_METERS=1 \
            record_bench "$unit" "record() 8 clients, 1 hot bucket" "" hot
    fi
    print_table "ingest, $unit buckets, $ROWS rows (ratio = peer ms / our ms; tps: ours / peer)" "$unit buckets"
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
        if [ $(( (pk10 - b10) - (pk1 - b1) )) -le 4096 ]; then m=yes; else m=NO; fi
        echo "memory bounded (10M-row growth within 4MB of the 1M-row growth): $m"
        goal_add ingest "memory of a metered COPY, $BIG_ROWS rows" "+$(( (pk10 - b10) / 1024 )) MB" \
            "the same, $ROWS rows" "+$(( (pk1 - b1) / 1024 )) MB" "-" "growth within 4 MB" "$m"
    else
        goal_add ingest "memory of a metered COPY, $BIG_ROWS rows" "n/a" "the same, $ROWS rows" "n/a" \
            "-" "growth within 4 MB" "n/a"
    fi
    rm -f "$BIG_DATA"
fi

echo
echo "sanity checks (every path's buckets equal a plain GROUP BY of the file):"
printf '  %s\n' "${SANITY[@]}"
if printf '%s\n' "${SANITY[@]}" | grep -q MISMATCH; then
    echo "sanity: MISMATCH"; m=NO
else
    echo "sanity: OK"; m=yes
fi
goal_add ingest "counts of every path equal a GROUP BY of the rows" "${#SANITY[@]} checks" "-" "-" "-" "exact" "$m"
[ -s "$LOG" ] && grep -q ERROR "$LOG" && { echo "errors of our paths (from $LOG):"; grep ERROR "$LOG" | sort | uniq -c | head -20; }
rm -f "$DATA" "$DATA2" "$INGEST_SQL"
exit 0
