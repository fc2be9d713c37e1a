#!/usr/bin/env bash
# make test, Citus section: the same billing scenario (test/citus/scenario.sql:
# metered COPY, record with duplicates, ingest batches, finalize, a late
# event, a correction, a retroactive price change and rerate, the audit
# log) on one node and on a loopback Citus
# cluster (a coordinator and two workers); usage, invoices, lines,
# adjustments, the audit rows and the whole output must be identical, and
# the audit log must verify on the cluster.
#
# Builds Citus from ../shared/vendor into a cache outside the repository the
# first time (about 3 minutes), then reuses it.  Prints one TAP line per check
# ("ok N - ..." / "not ok N - ..."); run_tests.sh counts them.  Expects the
# billing extension built and installed into the PostgreSQL of PG_CONFIG
# (run_tests.sh does that).  BILLING_SKIP_CITUS=1 skips the section.
set -uo pipefail
cd "$(dirname "$0")/../.."
. test/lib.sh
. test/citus/cluster.sh

if [ -n "${BILLING_SKIP_CITUS:-}" ]; then
    echo "# citus: skipped (BILLING_SKIP_CITUS is set)"
    exit 0
fi

n=0
failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); failed=$((failed + 1)); echo "not ok $n - $1"; }
check() {   # check NAME COMMAND...: one test line from a command's status
    local name=$1; shift
    if "$@"; then ok "$name"; else not_ok "$name"; fi
}

WORK=$(mktemp -d /tmp/billing-citus-run.XXXXXX)
chmod 755 "$WORK"
cleanup() { citus_stop; stop_cluster; rm -rf "$WORK"; }
trap cleanup EXIT

# 1. Citus, built once into the cache
if PG_CONFIG="$PG_CONFIG" bash test/citus/build_citus.sh >"$WORK/build.log" 2>&1; then
    ok "citus built and installed ($(tail -1 "$WORK/build.log"))"
else
    cat "$WORK/build.log"
    not_ok "citus built and installed"
    exit 1
fi

# 2. the nodes: one plain node, and a coordinator with two workers
start=$(date +%s)
# ports apart from make test's own node (54000-54999) and the cluster (55000-55802)
export PGPORT_TEST=$((53000 + RANDOM % 900))
if start_cluster >"$WORK/single.log" 2>&1 && citus_start 2 >"$WORK/cluster.log" 2>&1; then
    ok "one node and a cluster of a coordinator and 2 workers started"
else
    cat "$WORK/single.log" "$WORK/cluster.log"
    not_ok "one node and a cluster of a coordinator and 2 workers started"
    exit 1
fi

# the same input for both runs: a fixed hour and a file of metered rows
t0=$(date -u +'%Y-%m-%d %H:00:00+00')
csv=$WORK/events.csv
psql -qX -d postgres -c "\\copy (SELECT 1 + (i * 7919) % 60, (ARRAY['error','span','replay','error'])[1 + i % 4], (i % 17) + 1, timestamptz '$t0' - interval '1 minute' * ((i * 37) % 4000), 'ev-' || (i % 18000) FROM generate_series(1, 20000) i) TO '$csv' WITH (FORMAT csv)"
chmod 644 "$csv"

run_scenario() {   # run_scenario OUT citus-bool psql-args...
    local out=$1 citus=$2; shift 2
    psql -X "$@" -v t0="$t0" -v csv="$csv" -v citus="$citus" \
        -f test/citus/scenario.sql >"$out" 2>&1
}
run_scenario "$WORK/single.out" false -d postgres
rc=$?
[ $rc -eq 0 ] || tail -20 "$WORK/single.out" | sed 's/^/# /'
check "scenario runs on one node" [ $rc -eq 0 ]
run_scenario "$WORK/citus.out" true -h "$CITUS_DIR/sock" -p "$CITUS_COORD_PORT" -U postgres -d postgres
rc=$?
[ $rc -eq 0 ] || grep -B2 -A8 'ERROR' "$WORK/citus.out" | grep -v 'account 999' | head -30 | sed 's/^/# /'
check "scenario runs on the Citus cluster" [ $rc -eq 0 ]

# 3. what both runs must agree on, check by check, then the whole output
for c in usage usage_compacted invoices invoice_lines adjustments verify_invoices audit audit_rows; do
    a=$(grep -E "^ check:$c +\|" "$WORK/single.out")
    b=$(grep -E "^ check:$c +\|" "$WORK/citus.out")
    if [ -n "$a" ] && [ "$a" = "$b" ]; then
        ok "$c identical on the cluster:$(echo "$a" | cut -d'|' -f2- | tr -s ' ')"
    else
        echo "# one node: $a"
        echo "# cluster:  $b"
        not_ok "$c identical on the cluster"
    fi
done
a=$(grep -E "^ check:audit +\|" "$WORK/citus.out" | cut -d'|' -f2 | tr -d ' ')
check "the audit log verifies on the cluster (${a:-?} problems)" [ "$a" = 0 ]
if diff -u "$WORK/single.out" "$WORK/citus.out" >"$WORK/diff" 2>&1; then
    ok "whole scenario output identical ($(wc -l <"$WORK/single.out") lines)"
else
    sed 's/^/# /' "$WORK/diff" | head -80
    not_ok "whole scenario output identical"
fi

# 4. the cluster itself
cq() { citus_psql "$CITUS_COORD_PORT" -qAt -d postgres -c "$1" 2>&1; }
r=$(cq "SELECT count(*) FROM billing.distribute() WHERE changed")
check "distribute() is idempotent (a second call changes nothing: $r)" [ "$r" = 0 ]
# tampering with an audit row on a worker (triggers off) is found from the coordinator
cq "SELECT run_command_on_placements('billing.audit_log',
      \$\$SET session_replication_role = replica; UPDATE %s SET actor = 'mallory' WHERE account_id = 5 AND seq = 2\$\$)" >/dev/null
r=$(cq "SELECT string_agg(account_id || ':' || seq || ' ' || problem, '; ') FROM billing.verify_audit_log()")
check "an audit row altered on a worker is reported by verify_audit_log on the coordinator ($r)" \
    [ "$r" = "5:2 hash does not match the row: the row was altered" ]
r=$(cq "SELECT string_agg(c.relname, ',' ORDER BY c.relname) FROM pg_class c
         WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r'
           AND c.relname <> 'metered_tables'
           AND billing._citus_table_kind(c.oid) IS DISTINCT FROM
               CASE WHEN EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                                  AND a.attname = 'account_id' AND NOT a.attisdropped)
                    THEN 'distributed' ELSE 'reference' END")
check "every table with account_id distributed, every other one a reference table${r:+ (wrong: $r)}" [ -z "$r" ]
r=$(cq "SELECT count(DISTINCT colocationid) FROM pg_dist_partition
         WHERE partmethod = 'h' AND logicalrelid::text LIKE 'billing.%'")
check "the per-account tables form one co-location group ($r)" [ "$r" = 1 ]
r=$(cq "SELECT string_agg(nodeport || ':' || n, ' ' ORDER BY nodeport) FROM (
          SELECT nodeport, sum(result::bigint) AS n
            FROM run_command_on_placements('billing.usage_buckets', 'SELECT count(*) FROM %s')
           GROUP BY nodeport) x WHERE n > 0")
check "usage buckets are spread over both workers ($r)" [ "$(echo "$r" | wc -w)" = 2 ]
# the C ingest must never write the shells (direct heap inserts would land there)
r=$(cq "SELECT pg_relation_size('billing.usage_deltas') + pg_relation_size('billing.dedupe_keys')")
w=$(cq "SELECT string_agg(result, ',') FROM run_command_on_workers(
          \$\$SELECT pg_relation_size('billing.usage_deltas') + pg_relation_size('billing.dedupe_keys')\$\$)")
check "the shells of usage_deltas and dedupe_keys stay empty on every node ($r,$w)" \
    test "$r" = 0 -a "$w" = "0,0"
r=$(cq "SELECT count(*) FROM pg_dist_object WHERE distribution_argument_index IS NOT NULL")
check "per-account functions run on the account's node ($r registered)" [ "$r" -ge 6 ]
# the maintenance worker: on every node; the jobs run from the coordinator
r=$(cq "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'billing maintenance launcher'")
w=$(cq "SELECT string_agg(result, ',') FROM run_command_on_workers(
          \$\$SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'billing maintenance launcher'\$\$)")
check "every node runs the maintenance launcher ($r,$w)" test "$r" = 1 -a "$w" = "1,1"
r=$(cq "SELECT billing._maintenance_runs_here('compact_usage')")
w=$(cq "SELECT string_agg(result, ',') FROM run_command_on_workers(
          \$\$SELECT billing._maintenance_runs_here('compact_usage')\$\$)")
check "maintenance jobs run on the coordinator, the workers skip them ($r,$w)" test "$r" = t -a "$w" = "f,f"
r=$(cq "SELECT billing.record(42, 'error', 1, now(), 'pushed-down')")
check "record() pushed down to the worker of account 42 counts" [ "$r" = t ]

echo "# citus section took $(( $(date +%s) - start ))s after the build"
exit $(( failed > 0 ))
