#!/usr/bin/env bash
# Fault tests (make test, section 5): crashes, concurrency, timeouts and
# cancels never lose or double a count.  Runs against the throwaway cluster
# of test/run_tests.sh (PGHOST, PGPORT and CLUSTER_DIR set), which it kills
# and restarts; prints one TAP line per check ("ok N - ..." / "not ok N").
#
#  1. kill -9 of the backend running a large metered COPY (the postmaster
#     then resets every backend and recovers); retry: totals exact
#  2. kill -9 of the whole server (postmaster and every child) in the middle
#     of a stream of record() calls; restart; retry the stream: exact
#  3. 8 concurrent sessions sending overlapping event ids and the same
#     ingest batches: exact
#  4. statement_timeout and pg_cancel_backend in the middle of metered
#     INSERTs and ingest batches leave nothing behind, and the session
#     counts correctly afterwards
#
# Bounded: every client runs under timeout(1); the whole script takes
# about half a minute.
set -uo pipefail
cd "$(dirname "$0")/../.."
. test/lib.sh
: "${CLUSTER_DIR:?run from test/run_tests.sh (CLUSTER_DIR unset)}"

DB=billing_fault
N_COPY=${N_COPY:-300000}       # rows of the metered COPY (1 in 10 a repeat)
N_REC=${N_REC:-6000}           # record() calls of the stream
N_CONC=${N_CONC:-400}          # event ids each concurrent session sends
work=$(mktemp -d /tmp/billing-fault.XXXXXX)
chmod 755 "$work"
n=0
fails=0
trap 'rm -rf "$work"' EXIT

check() {   # check DESCRIPTION EXPECTED ACTUAL
    n=$((n + 1))
    if [ "$2" = "$3" ]; then
        echo "ok $n - $1"
    else
        echo "not ok $n - $1"
        echo "#   expected: $2"
        echo "#   got:      $3"
        fails=$((fails + 1))
    fi
}

q() { timeout 60 psql -X -q -At -v ON_ERROR_STOP=1 -d "$DB" "$@"; }

wait_ready() {   # wait until the server accepts connections (max 60 s)
    for _ in $(seq 1 120); do
        psql -X -At -d postgres -c 'SELECT 1' >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    return 1
}

wait_for() {     # wait_for SQL: poll until SQL returns t (max 30 s); false on timeout
    for _ in $(seq 1 300); do
        [ "$(psql -X -At -d "$DB" -c "$1" 2>/dev/null)" = t ] && return 0
        sleep 0.1
    done
    return 1
}

postmaster_pid() { head -1 "$CLUSTER_DIR/data/postmaster.pid"; }

kill_server() {  # kill -9 the postmaster and all its children, by pid
    local pm children
    pm=$(postmaster_pid)
    children=$(ps -o pid= --ppid "$pm" | tr -d ' ')
    kill -9 "$pm" $children 2>/dev/null
    for _ in $(seq 1 100); do
        kill -0 "$pm" 2>/dev/null || break
        sleep 0.1
    done
    for p in $children; do
        while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
    done
}

start_server() {
    as_pg "$PGBIN/pg_ctl" -D "$CLUSTER_DIR/data" -l "$CLUSTER_DIR/server.log" -w -t 60 start \
        >/dev/null 2>&1
}

psql -X -q -d postgres -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $DB" \
    -c "CREATE DATABASE $DB" >/dev/null
q <<'SQL'
CREATE EXTENSION billing;
INSERT INTO billing.meters (meter) VALUES ('f_copy'), ('f_rec'), ('f_conc'), ('f_batch'), ('f_cancel');
INSERT INTO billing.accounts (account_id) SELECT g FROM generate_series(1, 50) g;
CREATE TABLE f_copy (account bigint, meter text, quantity bigint, ts timestamptz, id text);
SELECT billing.meter_table('f_copy', 'account', 'meter', 'quantity', 'ts', 'id', keep_rows => false);
CREATE TABLE f_kept (account bigint, meter text, quantity bigint, ts timestamptz, id text);
SELECT billing.meter_table('f_kept', 'account', 'meter', 'quantity', 'ts', 'id', keep_rows => true);
CREATE TABLE f_stage (account bigint, meter text, quantity bigint, ts timestamptz, id text);
CREATE FUNCTION total(m text) RETURNS numeric LANGUAGE sql AS
    $$ SELECT coalesce(sum(quantity), 0) FROM billing.usage_cells WHERE meter = m $$;
SQL

# 1. kill -9 of the backend in the middle of a large metered COPY ---------------------------
echo "# 1. kill -9 of the backend of a metered COPY"
# every tenth row repeats the row nine rows before it (same account and event id)
q -c "\\copy (SELECT 1 + h % 50, 'f_copy', 1 + h % 7, now() - (h % 1440) * interval '1 minute', 'c-' || h FROM generate_series(1, $N_COPY) g, LATERAL (SELECT CASE WHEN g % 10 = 9 THEN g - 9 ELSE g END AS h) x) TO '$work/copy.csv' WITH (FORMAT csv)"
q -c "\\copy f_stage FROM '$work/copy.csv' WITH (FORMAT csv)"
expect_copy=$(q -c "SELECT sum(quantity) FROM (SELECT DISTINCT ON (account, id) quantity FROM f_stage ORDER BY account, id) d")

timeout 120 psql -X -q -d "$DB" -c "\\copy f_copy FROM '$work/copy.csv' WITH (FORMAT csv)" >"$work/copy1.log" 2>&1 &
client=$!
size=$(stat -c %s "$work/copy.csv")
if wait_for "SELECT coalesce(sum(bytes_processed) > $size / 4, false) FROM pg_stat_progress_copy"; then
    backend=$(psql -X -At -d "$DB" -c "SELECT pid FROM pg_stat_progress_copy LIMIT 1")
    kill -9 "$backend"
    killed=yes
else
    killed=no
fi
wait "$client"
check "the COPY was killed in the middle" yes "$killed"
wait_ready
check "after crash recovery nothing of the killed COPY is counted" 0 "$(q -c "SELECT total('f_copy')")"
check "and no event id of it is claimed" 0 "$(q -c "SELECT count(*) FROM billing.dedupe_keys WHERE meter = 'f_copy'")"
q -c "\\copy f_copy FROM '$work/copy.csv' WITH (FORMAT csv)"
check "the retried COPY counts every distinct event once" "$expect_copy" "$(q -c "SELECT total('f_copy')")"
q -c "\\copy f_copy FROM '$work/copy.csv' WITH (FORMAT csv)"
check "a second retry counts nothing more" "$expect_copy" "$(q -c "SELECT total('f_copy')")"
q -c "SELECT billing.compact_usage()" >/dev/null
check "and compaction keeps the total" "$expect_copy" "$(q -c "SELECT total('f_copy')")"

# 2. kill -9 of the whole server in the middle of a stream of record() calls -----------------
echo "# 2. kill -9 of the server during a stream of record() calls"
for i in $(seq 1 "$N_REC"); do
    echo "SELECT billing.record($((1 + i % 50)), 'f_rec', $((1 + i % 3)), now() - interval '$((i % 600)) seconds', 'r-$i');"
done >"$work/stream.sql"
expect_rec=$(awk -v n="$N_REC" 'BEGIN { s = 0; for (i = 1; i <= n; i++) s += 1 + i % 3; print s }')

timeout 120 psql -X -q -d "$DB" -f "$work/stream.sql" >"$work/stream1.log" 2>&1 &
client=$!
if wait_for "SELECT count(*) > $N_REC / 4 FROM billing.dedupe_keys WHERE meter = 'f_rec'"; then
    kill_server
    killed=yes
else
    killed=no
fi
wait "$client"
check "the server was killed in the middle of the stream" yes "$killed"
start_server && wait_ready
before=$(q -c "SELECT count(*) FROM billing.dedupe_keys WHERE meter = 'f_rec'")
check "some calls were committed before the kill, not all" yes \
    "$( [ "$before" -gt 0 ] && [ "$before" -lt "$N_REC" ] && echo yes || echo "no ($before)")"
check "what was committed is counted exactly (one event, one claim)" \
    "$(q -c "SELECT sum(1 + (substr(event_id, 3)::int % 3)) FROM billing.dedupe_keys WHERE meter = 'f_rec'")" \
    "$(q -c "SELECT total('f_rec')")"
timeout 120 psql -X -q -At -d "$DB" -f "$work/stream.sql" >"$work/stream2.log" 2>&1
check "the retried stream answers false exactly for the calls committed before the kill" \
    "$before" "$(grep -c '^f$' "$work/stream2.log")"
check "after the retry the total is exact" "$expect_rec" "$(q -c "SELECT total('f_rec')")"

# 3. 8 concurrent sessions: overlapping event ids, duplicate ingest batches -------------------
echo "# 3. 8 concurrent sessions with overlapping event ids and duplicate batches"
for s in $(seq 1 8); do
    {
        # every session sends the same N_CONC ids, starting at a different place
        for k in $(seq 0 $((N_CONC - 1))); do
            i=$(( (k + s * 37) % N_CONC ))
            echo "SELECT billing.record($((1 + i % 5)), 'f_conc', 2, now() - interval '1 minute', 'k-$i');"
            if [ $((k % 40)) -eq 0 ]; then
                # the same 10 batches (one partition each) from every session, in another order
                b=$(( (k / 40 + s) % 10 + 1 ))
                echo "SELECT 'batch ' || accepted FROM billing.ingest('f_src', $b, 1, ARRAY[$((b % 5 + 1)), $((b % 7 + 1))]::bigint[], ARRAY['f_batch', 'f_batch'], ARRAY[$b, 1]::numeric[], ARRAY[now(), now()]);"
            fi
        done
    } >"$work/conc$s.sql"
done
pids=()
for s in $(seq 1 8); do
    timeout 120 psql -X -q -At -v ON_ERROR_STOP=1 -d "$DB" -f "$work/conc$s.sql" >"$work/conc$s.log" 2>&1 &
    pids+=($!)
done
conc_rc=0
for p in "${pids[@]}"; do wait "$p" || conc_rc=1; done
check "all 8 sessions ran without error" 0 "$conc_rc"
check "each event id counted once across the 8 sessions" "$((N_CONC * 2))" "$(q -c "SELECT total('f_conc')")"
check "exactly one session got true per event id" "$N_CONC" "$(cat "$work"/conc*.log | grep -c '^t$')"
check "each of the 10 batches sent 8 times was applied by exactly one session" \
    "10 80" "$(cat "$work"/conc*.log | grep -c '^batch 2$') $(cat "$work"/conc*.log | grep -c '^batch ')"
check "and counted once (sum of b + 1 for b = 1..10)" 65 "$(q -c "SELECT total('f_batch')")"

# 4. timeouts and cancels mid-ingest leave nothing behind ------------------------------------
echo "# 4. statement_timeout and pg_cancel_backend mid-ingest"
out=$(q -c "SET statement_timeout = '300ms'" \
        -c "INSERT INTO f_copy SELECT 1 + g % 50, 'f_cancel', 1, now(), 'to-' || g FROM generate_series(1, 5000000) g" 2>&1)
check "a metered INSERT hits statement_timeout" yes "$(echo "$out" | grep -q 'statement timeout' && echo yes || echo "no: $out")"
check "and counts nothing" 0 "$(q -c "SELECT total('f_cancel')")"
check "and claims no event id" 0 "$(q -c "SELECT count(*) FROM billing.dedupe_keys WHERE meter = 'f_cancel'")"

# a canceled statement inside a session that goes on counting
cat >"$work/cancel.sql" <<'SQL'
SELECT billing.record(1, 'f_cancel', 5, now(), 'keep-1');
INSERT INTO f_kept SELECT 1 + g % 50, 'f_cancel', 1, now(), 'cx-' || g FROM generate_series(1, 5000000) g;
SELECT billing.record(1, 'f_cancel', 7, now(), 'keep-2');
INSERT INTO f_kept VALUES (2, 'f_cancel', 11, now(), 'keep-3');
SQL
timeout 120 psql -X -q -At -d "$DB" -f "$work/cancel.sql" >"$work/cancel.log" 2>&1 &
client=$!
if wait_for "SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE 'INSERT INTO f_kept SELECT%' AND state = 'active' AND now() - query_start > interval '200 ms'"; then
    canceled=$(psql -X -At -d "$DB" -c "SELECT bool_and(pg_cancel_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'INSERT INTO f_kept SELECT%' AND state = 'active'")
else
    canceled=no
fi
wait "$client"
check "pg_cancel_backend cancels a large INSERT into a keep_rows table" t "$canceled"
check "the client saw the cancel" yes "$(grep -q 'canceling statement due to user request' "$work/cancel.log" && echo yes || echo no)"
check "the canceled INSERT left no row, no count and no claim; the session then counted on" \
    "3|23|3|1" \
    "$(q -c "SELECT (SELECT count(*) FROM billing.dedupe_keys WHERE meter = 'f_cancel'), total('f_cancel'), (SELECT sum(events) FROM billing.usage_cells WHERE meter = 'f_cancel'), (SELECT count(*) FROM f_kept)")"

# an ingest batch canceled in the middle changes nothing, and applies on retry
big=${N_BATCH:-300000}
q -c "CREATE TABLE f_batch_args AS SELECT array_agg(1 + g % 50) AS a, array_agg('f_cancel'::text) AS m, array_agg(1::numeric) AS qty, array_agg(now()) AS ts, array_agg('b-' || g) AS ids FROM generate_series(1, $big) g"
cat >"$work/batch.sql" <<SQL
SELECT i.accepted FROM f_batch_args, billing.ingest('f_cancel_src', 0, 1, a, m, qty, ts, ids) i;
SQL
out=$(q -c "SET statement_timeout = '150ms'" -f "$work/batch.sql" 2>&1)
check "an ingest batch hits statement_timeout" yes "$(echo "$out" | grep -q 'statement timeout' && echo yes || echo "no: $out")"
check "and changes nothing: no count, no claim, no offset" "23|3|0" \
    "$(q -c "SELECT total('f_cancel'), (SELECT count(*) FROM billing.dedupe_keys WHERE meter = 'f_cancel'), (SELECT count(*) FROM billing.ingest_offsets WHERE source = 'f_cancel_src')")"
check "the retried batch applies once" "$big" "$(q -f "$work/batch.sql")"
check "and a second retry is already applied" "0" "$(q -f "$work/batch.sql")"
check "total after the retries" "$((23 + big))" "$(q -c "SELECT total('f_cancel')")"

check "the audit log verifies after all of it" "" "$(q -c "SELECT * FROM billing.verify_audit_log()")"

psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" >/dev/null
echo "# fault checks: $((n - fails)) passed, $fails failed"
[ "$fails" -eq 0 ]
