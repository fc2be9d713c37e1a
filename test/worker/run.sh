#!/usr/bin/env bash
# The maintenance worker (make test, its own section; issue 16 part 4), on a
# cluster of its own that preloads billing with billing.maintenance_interval
# = 1s.  Prints one TAP line per check ("ok N - ..." / "not ok N - ...").
#
#   - a database created after the server started, and CREATE EXTENSION
#     there later, get a worker; it compacts, purges expired event ids, and
#     (billing.auto_finalize on for that database) finalizes invoices as the
#     extension's owner; billing.maintenance_status shows each job
#   - a failing run is logged with its job and database, retried every
#     interval, shown in the view, and the server stays up
#   - concurrency: a compaction the worker starts while a session holds the
#     compaction lock waits for it; ingest, compact_usage() by hand and the
#     worker together count every event exactly once
#   - SIGTERM stops a worker (the launcher starts another); kill -9 restarts
#     the server and the worker comes back; DROP EXTENSION stops it, CREATE
#     EXTENSION brings it back; interval 0 per database or for the server
#     turns it off
#   - DROP DATABASE (plain and WITH (FORCE)), ALTER DATABASE RENAME and
#     CREATE DATABASE ... TEMPLATE of a database whose worker is connected
#     succeed at once
#   - a fast shutdown is not held up; without shared_preload_libraries
#     nothing runs and the functions work by hand
set -uo pipefail
cd "$(dirname "$0")/../.."
. test/lib.sh

n=0
fails=0
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

# the cluster: ports apart from make test's own (54000-54999) and Citus's
export PGPORT_TEST=$((52000 + RANDOM % 900))
# (up to 7 databases with workers at once, plus the launchers of billing and
# of logical replication: more than the default 8 background workers)
MAINTENANCE_INTERVAL=1s CLUSTER_OPTS="max_worker_processes = 16" start_cluster \
    || { echo "not ok 1 - the cluster started"; exit 1; }
trap stop_cluster EXIT
LOG=$CLUSTER_DIR/server.log

q() { local db=$1; shift; timeout 60 psql -X -q -At -v ON_ERROR_STOP=1 -d "$db" "$@" 2>&1; }
wait_for() {   # wait_for DB SQL [SECONDS]: poll until SQL returns t
    local i
    for i in $(seq 1 $((${3:-20} * 10))); do
        [ "$(timeout 10 psql -X -At -d "$1" -c "$2" 2>/dev/null)" = t ] && return 0
        sleep 0.1
    done
    return 1
}
wait_ready() {   # the server accepts connections again (after a crash)
    local i
    for i in $(seq 1 300); do
        psql -X -At -d postgres -c 'SELECT 1' >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}
worker_of() {   # the pid of the worker of database $1 (empty: none)
    timeout 10 psql -X -At -d postgres -c "SELECT string_agg(pid::text, ',') FROM pg_stat_activity
        WHERE backend_type = 'billing maintenance worker' AND datname = '$1'" 2>/dev/null
}
has_worker() {   # SQL: database $1 has a worker (whose pid is not $2) that stays: one
                 # that started 1.5 seconds ago and still runs (a worker that finds no
                 # extension, or interval 0, exits as soon as it has looked)
    echo "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE backend_type = 'billing maintenance worker'
                          AND datname = '$1' AND pid::text <> '${2:-0}'
                          AND backend_start < now() - interval '1.5 s')"
}
no_worker() { echo "SELECT NOT ($(has_worker "$1"))"; }
lingering() {   # workers of database $1 that stayed more than 2 seconds (a worker that
                # finds no extension, or interval 0, exits as soon as it has looked)
    q postgres -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'billing maintenance worker'
                     AND datname = '$1' AND backend_start < now() - interval '2 s'"
}
settled() {   # settled DB SQL: SQL's answer once no job of it is running (the worker
              # runs every second; a read may catch a run in progress)
    local r i
    for i in $(seq 1 100); do
        r=$(q "$1" -c "$2")
        case "$r" in ""|running*|*"|running"*) sleep 0.1 ;; *) break ;; esac
    done
    echo "$r"
}
status() {   # one job's row of the view: result|runs>0|failures>0
    settled "$1" "SELECT last_result || '|' || (runs > 0) || '|' || (failures > 0)
                    FROM billing.maintenance_status WHERE job = '$2'"
}
setup_usage() {   # meters, accounts and a monthly plan in database $1
    q "$1" <<'SQL'
INSERT INTO billing.meters (meter, aggregation, late_window, dedupe_window)
VALUES ('w_events', 'sum', '36500 days', '36500 days');
INSERT INTO billing.accounts (account_id) SELECT g FROM generate_series(1, 4) g;
INSERT INTO billing.plans (plan, period) VALUES ('w_monthly', '1 month');
INSERT INTO billing.charges (plan, meter, price) VALUES ('w_monthly', 'w_events', 'unit 0.5');
INSERT INTO billing.subscriptions (account_id, plan, starts_at)
VALUES (1, 'w_monthly', '2025-01-01 00:00:00+00');
SQL
}
record() {   # record DB FROM TO: events FROM..TO, one per minute from 2025-06-01
    q "$1" -c "SELECT count(*) FILTER (WHERE billing.record(1 + g % 4, 'w_events', 1 + g % 3,
                   timestamptz '2025-06-01 00:00:00+00' + g * interval '1 minute', 'e-' || g))
                 FROM generate_series($2, $3) g"
}
expected() {   # what usage() must say after events 1..N, and what it says
    echo "SELECT (SELECT string_agg(a || ':' || s, ' ' ORDER BY a) FROM (
                    SELECT 1 + g % 4 AS a, sum(1 + g % 3) AS s FROM generate_series(1, $1) g GROUP BY 1) x)
               = (SELECT string_agg(a || ':' || s, ' ' ORDER BY a) FROM (
                    SELECT a, sum(u.quantity) AS s FROM generate_series(1, 4) a,
                           billing.usage(a, '2025-01-01', '2026-01-01') u GROUP BY a) y)"
}

# 1. the launcher, and a database created after the start ----------------------------------
check "the launcher runs" 1 \
    "$(q postgres -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'billing maintenance launcher'")"
q postgres -c "CREATE ROLE w_owner SUPERUSER NOLOGIN" >/dev/null
q postgres -c "CREATE DATABASE w_late" >/dev/null
sleep 4
check "a database without billing keeps no worker" 0 "$(lingering w_late)"
q w_late -c "SET ROLE w_owner" -c "CREATE EXTENSION billing" >/dev/null
wait_for w_late "$(has_worker w_late)"
check "CREATE EXTENSION in a database created after the start: a worker comes" t "$(q w_late -c "$(has_worker w_late)")"
wait_for w_late "SELECT runs > 0 FROM billing.maintenance_status WHERE job = 'purge_dedupe'"
check "the view: compact_usage ran, ok" "ok|true|false" "$(status w_late compact_usage)"
check "the view: purge_dedupe ran, ok" "ok|true|false" "$(status w_late purge_dedupe)"
check "the view: finalize_invoices is off (billing.auto_finalize off)" "off|false|false" \
    "$(status w_late finalize_invoices)"
check "the view shows the worker's pid" "$(worker_of w_late)" \
    "$(q w_late -c "SELECT DISTINCT worker_pid FROM billing.maintenance_status")"

# 2. what the jobs do ------------------------------------------------------------------------
setup_usage w_late
record w_late 1 3000 >/dev/null
wait_for w_late "SELECT NOT EXISTS (SELECT 1 FROM billing.usage_deltas)"
check "the worker compacted the deltas" "0|true" \
    "$(q w_late -c "SELECT count(*) || '|' || (SELECT count(*) > 0 FROM billing.usage_days) FROM billing.usage_deltas")"
check "usage is exact after the worker's compaction" t "$(q w_late -c "$(expected 3000)")"
q w_late -c "INSERT INTO billing.dedupe_keys VALUES (1, 'w_events', 'expired', '2020-01-01')" >/dev/null
wait_for w_late "SELECT NOT EXISTS (SELECT 1 FROM billing.dedupe_keys WHERE event_id = 'expired')"
check "the worker purged an expired event id, kept the live ones" "0|3000" \
    "$(q w_late -c "SELECT count(*) FILTER (WHERE event_id = 'expired') || '|' || count(*) FROM billing.dedupe_keys")"
check "no invoice while billing.auto_finalize is off" 0 "$(q w_late -c "SELECT count(*) FROM billing.invoices")"
pid=$(worker_of w_late)
q w_late -c "ALTER DATABASE w_late SET billing.auto_finalize = on" >/dev/null
wait_for w_late "SELECT EXISTS (SELECT 1 FROM billing.invoices)"
# the new worker may finalize within its first 1.5 s: wait until it has stayed that long
if wait_for w_late "$(has_worker w_late "$pid")"; then r=t; else r=f; fi
check "ALTER DATABASE ... SET billing.auto_finalize = on: the worker restarts with it" t "$r"
wait_for w_late "SELECT last_result = 'ok' FROM billing.maintenance_status WHERE job = 'finalize_invoices'"
check "the worker finalized the due periods (what finalize_invoices(now()) would)" "0" \
    "$(q w_late -c "SELECT count(*) FROM billing.finalize_invoices(now())")"
check "as the extension's owner (the audit rows name it)" "w_owner" \
    "$(q w_late -c "SELECT string_agg(DISTINCT actor, ',') FROM billing.audit_log WHERE action = 'finalize'")"
check "the view: finalize_invoices ok" "ok|true|false" "$(status w_late finalize_invoices)"

# 3. a failing run ---------------------------------------------------------------------------
q w_late -c "INSERT INTO billing.usage_deltas (account_id, cells) VALUES (1, '\\x01ff')" >/dev/null
wait_for w_late "SELECT failures >= 3 FROM billing.maintenance_status WHERE job = 'compact_usage'"
check "a failing compaction is retried every interval and shown in the view" \
    "error|XX001: packed usage cells are corrupt" \
    "$(settled w_late "SELECT last_result || '|' || last_error FROM billing.maintenance_status WHERE job = 'compact_usage'")"
check "the other jobs go on" "ok|ok" \
    "$(settled w_late "SELECT string_agg(last_result, '|' ORDER BY job) FROM billing.maintenance_status WHERE job <> 'compact_usage'")"
check "the error is in the server log, with the job and the database" "t|t" \
    "$(grep -q 'ERROR:  packed usage cells are corrupt' "$LOG" && echo t)|$(grep -q 'billing maintenance job compact_usage in database "w_late"' "$LOG" && echo t)"
check "the server stayed up, the worker too" t "$(q w_late -c "$(has_worker w_late)")"
q w_late -c "DELETE FROM billing.usage_deltas WHERE cells = '\\x01ff'" >/dev/null
wait_for w_late "SELECT last_result = 'ok' FROM billing.maintenance_status WHERE job = 'compact_usage'"
check "once the bad row is gone the next run succeeds" "ok|" \
    "$(settled w_late "SELECT last_result || '|' || coalesce(last_error, '') FROM billing.maintenance_status WHERE job = 'compact_usage'")"

# 4. concurrency -----------------------------------------------------------------------------
# a session holds the compaction lock (compact_usage() in an open transaction)
record w_late 3001 3500 >/dev/null
fifo=$CLUSTER_DIR/hold.fifo
mkfifo "$fifo"
( timeout 60 psql -X -q -At -d w_late <"$fifo" >"$CLUSTER_DIR/hold.out" 2>&1 ) &
hold=$!
exec 7>"$fifo"
echo "BEGIN; SELECT 'manual', billing.compact_usage();" >&7
if wait_for w_late "SELECT EXISTS (SELECT 1 FROM pg_stat_activity a, billing.maintenance_status s
                   WHERE a.pid = s.worker_pid AND s.job = 'compact_usage' AND s.last_result = 'running'
                     AND a.wait_event_type = 'Lock' AND a.wait_event = 'relation')"; then r=t; else r=f; fi
check "the worker's compaction waits while a session's compaction holds the lock" t "$r"
record w_late 3501 4000 >/dev/null
echo "COMMIT;" >&7
exec 7>&-
wait "$hold"
wait_for w_late "SELECT NOT EXISTS (SELECT 1 FROM billing.usage_deltas)
                   AND (SELECT last_result = 'ok' FROM billing.maintenance_status WHERE job = 'compact_usage')"
check "then it merges what was left; usage exact" t "$(q w_late -c "$(expected 4000)")"

# writers with repeated ids, compact_usage() by hand and the worker, all at once
pids=()
for w in 0 1 2 3; do
    ( for r in 1 2 3; do record w_late $((4001 + w * 500)) $((4000 + (w + 1) * 500 + 250)) >/dev/null; done ) &
    pids+=($!)
done
( for r in $(seq 1 15); do q w_late -c "SELECT billing.compact_usage()" >/dev/null; sleep 0.2; done ) &
pids+=($!)
wait "${pids[@]}"
q w_late -c "SELECT billing.compact_usage()" >/dev/null
check "writers, compact_usage() by hand and the worker together: every event counted once" t \
    "$(q w_late -c "$(expected 6250)")"
check "and no event id claimed twice" "6250|6250" \
    "$(q w_late -c "SELECT count(*) || '|' || count(DISTINCT event_id) FROM billing.dedupe_keys")"

# 5. stopping and restarting -----------------------------------------------------------------
pid=$(worker_of w_late)
kill -TERM "$pid"
wait_for postgres "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $pid)" 10
check "SIGTERM: the worker exits" t "$(q postgres -c "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $pid)")"
wait_for w_late "$(has_worker w_late "$pid")"
check "and the launcher starts another" t "$(q w_late -c "$(has_worker w_late "$pid")")"

pid=$(worker_of w_late)
kill -9 "$pid"
sleep 1
wait_ready
wait_for w_late "$(has_worker w_late "$pid")" 30
check "kill -9 of the worker: the server restarts and the worker comes back" t \
    "$(q w_late -c "$(has_worker w_late "$pid")")"
wait_for w_late "SELECT runs > 0 FROM billing.maintenance_status WHERE job = 'compact_usage'" 30
check "and runs again" "ok|true|false" "$(status w_late compact_usage)"

q w_late -c "DROP EXTENSION billing" >/dev/null
wait_for w_late "$(no_worker w_late)"
check "DROP EXTENSION: the worker exits" t "$(q w_late -c "$(no_worker w_late)")"
sleep 4
check "and no worker stays while billing is not installed" 0 "$(lingering w_late)"
q w_late -c "SET ROLE w_owner" -c "CREATE EXTENSION billing" >/dev/null
wait_for w_late "$(has_worker w_late)"
check "CREATE EXTENSION again: the worker comes back" t "$(q w_late -c "$(has_worker w_late)")"

q w_late -c "ALTER DATABASE w_late SET billing.maintenance_interval = 0" >/dev/null
wait_for w_late "$(no_worker w_late)"
sleep 4
check "billing.maintenance_interval = 0 for a database: no worker stays there" 0 "$(lingering w_late)"
q w_late -c "ALTER DATABASE w_late RESET billing.maintenance_interval" >/dev/null
wait_for w_late "$(has_worker w_late)"
check "RESET: the worker is back" t "$(q w_late -c "$(has_worker w_late)")"

q postgres -c "ALTER SYSTEM SET billing.maintenance_interval = 0" -c "SELECT pg_reload_conf()" >/dev/null
wait_for w_late "$(no_worker w_late)"
check "billing.maintenance_interval = 0 for the server: workers exit, the launcher stays" "|1" \
    "$(worker_of w_late)|$(q postgres -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'billing maintenance launcher'")"
q postgres -c "ALTER SYSTEM RESET billing.maintenance_interval" -c "SELECT pg_reload_conf()" >/dev/null
wait_for w_late "$(has_worker w_late)"
check "and on again" t "$(q w_late -c "$(has_worker w_late)")"

# 6. database commands that need the database to themselves ----------------------------------
for db in w_drop w_force w_rename w_tmpl; do
    q postgres -c "CREATE DATABASE $db" >/dev/null
    q "$db" -c "CREATE EXTENSION billing" >/dev/null
done
for db in w_drop w_force w_rename w_tmpl; do wait_for "$db" "$(has_worker "$db")"; done
fast() {   # run a command: "0:fast" when it succeeded within 4 s (waiting for a
           # connected session takes 5 s, then fails)
    local t0 t1 rc; t0=$(date +%s%N); "$@" >"$CLUSTER_DIR/cmd.out" 2>&1; rc=$?; t1=$(date +%s%N)
    [ $rc = 0 ] || sed 's/^/#   /' "$CLUSTER_DIR/cmd.out"
    echo "$rc:$( [ $(( (t1 - t0) / 1000000 )) -lt 4000 ] && echo fast || echo slow)"
}
check "DROP DATABASE while its worker is connected: done at once" "0:fast" \
    "$(fast psql -X -q -d postgres -v ON_ERROR_STOP=1 -c "DROP DATABASE w_drop")"
check "DROP DATABASE ... WITH (FORCE) too" "0:fast" \
    "$(fast psql -X -q -d postgres -v ON_ERROR_STOP=1 -c "DROP DATABASE w_force WITH (FORCE)")"
check "ALTER DATABASE ... RENAME TO too" "0:fast" \
    "$(fast psql -X -q -d postgres -v ON_ERROR_STOP=1 -c "ALTER DATABASE w_rename RENAME TO w_renamed")"
check "CREATE DATABASE ... TEMPLATE a database with a worker too" "0:fast" \
    "$(fast psql -X -q -d postgres -v ON_ERROR_STOP=1 -c "CREATE DATABASE w_copy TEMPLATE w_tmpl")"
wait_for w_renamed "$(has_worker w_renamed)"
wait_for w_tmpl "$(has_worker w_tmpl)"
wait_for w_copy "$(has_worker w_copy)"
check "the renamed database and both ends of the copy get their workers again" "true|true|true" \
    "$(q postgres -c "SELECT ($(has_worker w_renamed)) || '|' || ($(has_worker w_tmpl)) || '|' || ($(has_worker w_copy))")"
errors=$(grep -E 'ERROR|PANIC' "$LOG" | grep -v 'packed usage cells are corrupt')
[ -z "$errors" ] || grep -E -A6 'ERROR|PANIC' "$LOG" | head -40 | sed 's/^/#   /'
check "the server log has no error but the planted one" "" "$(echo "$errors" | head -3)"

# 7. shutdown, and no preload ----------------------------------------------------------------
check "a fast shutdown with workers running is not held up" "0:fast" \
    "$(fast as_pg "$PGBIN/pg_ctl" -D "$CLUSTER_DIR/data" -m fast -w stop)"
as_pg "$PGBIN/pg_ctl" -D "$CLUSTER_DIR/data" -l "$LOG" -o "-c shared_preload_libraries=''" \
    -w -t 60 start >/dev/null
setup_usage w_late >/dev/null
record w_late 1 10 >/dev/null
sleep 2.5
check "without shared_preload_libraries: no launcher, no worker" 0 \
    "$(q postgres -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'billing maintenance%'")"
check "the view shows no worker and no run" "3|0" \
    "$(q w_late -c "SELECT count(*) || '|' || count(worker_pid) + count(last_run) FROM billing.maintenance_status")"
check "compaction by hand works" "10|0" \
    "$(q w_late -c "SELECT billing.compact_usage()")|$(q w_late -c "SELECT count(*) FROM billing.usage_deltas")"

exit $(( fails > 0 ))
