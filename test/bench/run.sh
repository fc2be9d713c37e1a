#!/usr/bin/env bash
# make bench: build and install the extension, start a throwaway cluster
# tuned for benchmarking, then run every test/bench/bench_*.sh in sorted
# order.  The cluster is always stopped and removed on exit.
#
# Each bench_*.sh assumes PGHOST/PGPORT/PGUSER are set (they are exported
# by start_cluster), creates and drops its own database, and prints its own
# result table.  BENCH_TMP is a scratch directory the server (OS user
# postgres) can write, for COPY TO/FROM files.
#
# Honour PGBIN to use a private PostgreSQL, e.g.
#   PGBIN=/opt/pgC/usr/lib/postgresql/15/bin make bench
# Run one benchmark only:  BENCH_ONLY=ingest make bench
#
# Every benchmark records its goals (test/bench/goals.sh); the closing
# summary prints them in one table with met yes/NO.
#
# The cluster preloads billing (the maintenance worker's launcher runs) with
# billing.maintenance_interval = 0: no worker compacts behind a timed
# measurement.  bench_sustain.sh turns the worker on for its own run.
set -euo pipefail
cd "$(dirname "$0")/../.."
. test/lib.sh
. test/bench/goals.sh

ensure_packages postgresql-server-dev-$PGVER
build_install

# Benchmark settings: real commits (fsync on, synchronous_commit on) so the
# record() test pays for them; shared buffers large enough for the data; no
# checkpoint or autovacuum in the middle of a measurement.  work_mem stays
# at its default (4MB) unless a benchmark sets it.
export CLUSTER_FSYNC=on
export CLUSTER_PRELOAD=billing MAINTENANCE_INTERVAL=0
export CLUSTER_OPTS="
shared_buffers = 2GB
max_wal_size = 32GB
min_wal_size = 1GB
checkpoint_timeout = 1h
autovacuum = off
"

cleanup() {
    stop_cluster
    [ -n "${BENCH_TMP:-}" ] && rm -rf "$BENCH_TMP"
}
trap cleanup EXIT
start_cluster

BENCH_TMP=$(mktemp -d /tmp/billing-bench.XXXXXX)
chmod 755 "$BENCH_TMP"
[ "$(id -u)" = 0 ] && chown postgres: "$BENCH_TMP"
export BENCH_TMP
export BENCH_GOALS=$BENCH_TMP/goals
: >"$BENCH_GOALS"

echo "bench cluster: $("$PGBIN/postgres" --version), $(nproc) cores," \
     "shared_buffers=2GB fsync=on work_mem=4MB"
rc=0
failed=()
for b in $(ls test/bench/bench_*.sh | sort); do
    name=$(basename "$b" .sh)
    if [ -n "${BENCH_ONLY:-}" ] && [ "$name" != "bench_${BENCH_ONLY}" ]; then
        continue
    fi
    echo
    echo "=== $name"
    start=$(date +%s)
    bash "$b" || { echo "$name FAILED"; rc=1; failed+=("$name"); }
    echo "=== $name took $(( $(date +%s) - start )) s"
done
echo
echo "=== goals (every goal measured in this run; ratios against peers of the same run)"
goals_print
[ ${#failed[@]} = 0 ] || echo "benchmarks that FAILED (their goals may be missing above): ${failed[*]}"
exit $rc
