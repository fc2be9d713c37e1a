#!/usr/bin/env bash
# make test: install what is missing, build with -Werror, install, start a
# throwaway cluster, run pg_regress, the isolation specs, pgTAP, the Citus,
# maintenance worker, doc examples, pg_dump and fault sections, stop the
# cluster, and print one closing line "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
. test/lib.sh

ensure_packages postgresql-server-dev-$PGVER postgresql-$PGVER-pgtap \
    libtap-parser-sourcehandler-pgtap-perl postgresql-$PGVER-cron || exit 1
make -s clean >/dev/null 2>&1
build_install || { echo "build failed"; echo "0 passed, 1 failed"; exit 1; }

trap stop_cluster EXIT
start_cluster || { echo "0 passed, 1 failed"; exit 1; }

passed=0
failed=0
out=$(mktemp -d /tmp/billing-test.XXXXXX)

# 0. pg_cron: on a cluster of its own, it waits for pg_cron's next minute
# boundary, so it runs in the background beside the other sections; its
# results are counted at the end.
bash test/cron/run.sh >"$out/cron.log" 2>&1 &
cron_pid=$!

# 1. pg_regress: the documented examples and error messages.
echo "== pg_regress"
rm -f regression.diffs regression.out
make -s installcheck >"$out/regress.log" 2>&1
rc=$?
cat "$out/regress.log"
ok=$(grep -Ec '\.\.\. ok|^ok [0-9]+' "$out/regress.log")
bad=$(grep -Ec '\.\.\. FAILED|^not ok [0-9]+' "$out/regress.log")
if [ $rc -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
passed=$((passed + ok)); failed=$((failed + bad))
if [ -s regression.diffs ]; then
    echo "== regression.diffs"
    cat regression.diffs
fi

# 2. isolation specs: real concurrent sessions.
ISO=$("$PG_CONFIG" --pgxs | sed 's|src/makefiles/pgxs.mk|src/test/isolation/pg_isolation_regress|')
specs=$(ls test/isolation/specs/*.spec 2>/dev/null | xargs -r -n1 basename | sed 's/\.spec$//')
if [ -n "$specs" ]; then
    echo "== isolation"
    "$ISO" --inputdir=test/isolation --outputdir="$out/iso" \
        --dbname=billing_isolation --load-extension=billing $specs >"$out/iso.log" 2>&1
    rc=$?
    cat "$out/iso.log"
    ok=$(grep -Ec '\.\.\. ok|^ok [0-9]+' "$out/iso.log")
    bad=$(grep -Ec '\.\.\. FAILED|^not ok [0-9]+' "$out/iso.log")
    if [ $rc -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
    passed=$((passed + ok)); failed=$((failed + bad))
    [ -s "$out/iso/regression.diffs" ] && { echo "== isolation regression.diffs"; cat "$out/iso/regression.diffs"; }
fi

# 3. pgTAP: properties, privileges and schema.
echo "== pgTAP"
psql -qX -d postgres -c "DROP DATABASE IF EXISTS billing_tap" -c "CREATE DATABASE billing_tap" >/dev/null
psql -qX -d billing_tap -c "CREATE EXTENSION pgtap" -c "CREATE EXTENSION billing" >/dev/null
pg_prove --verbose --ext .sql -d billing_tap -U postgres test/pgtap/ >"$out/tap.log" 2>&1
rc=$?
grep -vE '^ok [0-9]+' "$out/tap.log"
ok=$(grep -Ec '^ *ok [0-9]+' "$out/tap.log")
bad=$(grep -Ec '^ *not ok [0-9]+' "$out/tap.log")
if [ $rc -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
passed=$((passed + ok)); failed=$((failed + bad))

# 4. Citus: the same scenario on a coordinator and two workers as on one node.
echo "== citus"
bash test/citus/run.sh >"$out/citus.log" 2>&1
rc=$?
grep -vE '^ok [0-9]+' "$out/citus.log"
ok=$(grep -Ec '^ok [0-9]+' "$out/citus.log")
bad=$(grep -Ec '^not ok [0-9]+' "$out/citus.log")
if [ $rc -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
passed=$((passed + ok)); failed=$((failed + bad))

# 5. the maintenance worker, on a cluster of its own (interval 1s).
echo "== maintenance worker"
bash test/worker/run.sh >"$out/worker.log" 2>&1
rc=$?
grep -vE '^ok [0-9]+' "$out/worker.log"
ok=$(grep -Ec '^ok [0-9]+' "$out/worker.log")
bad=$(grep -Ec '^not ok [0-9]+' "$out/worker.log")
if [ $rc -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
passed=$((passed + ok)); failed=$((failed + bad))

# the documentation as a test: every ```sql example of README.md and
# doc/billing.md, top to bottom on a fresh database of a cluster of its own,
# its output compared with the doc's; one line per example.
echo "== doc examples"
bash test/doc/run.sh >"$out/doc.log" 2>&1
rc=$?
grep -vE '^ok [0-9]+' "$out/doc.log"
ok=$(grep -Ec '^ok [0-9]+' "$out/doc.log")
bad=$(grep -Ec '^not ok [0-9]+' "$out/doc.log")
if [ $rc -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
passed=$((passed + ok)); failed=$((failed + bad))

# billing.grace_period set before the library loads, on a cluster of its
# own that does not preload billing; one line per check.
echo "== settings set before the library loads"
bash test/settings/run.sh >"$out/settings.log" 2>&1
rc=$?
grep -vE '^ok [0-9]+' "$out/settings.log"
ok=$(grep -Ec '^ok [0-9]+' "$out/settings.log")
bad=$(grep -Ec '^not ok [0-9]+' "$out/settings.log")
if [ $rc -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
passed=$((passed + ok)); failed=$((failed + bad))

# 6. pg_dump round trip: one pass or fail.
echo "== pg_dump round trip"
bash test/dump/run.sh >"$out/dump.log" 2>&1
rc=$?
cat "$out/dump.log"
if [ $rc -eq 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
# 7. the upgrade: 1.0 from the frozen script + ALTER EXTENSION UPDATE against
# a fresh install, catalog (the schema check) and data; one line per check.
echo "== upgrade"
bash test/upgrade/run.sh >"$out/upgrade.log" 2>&1
rc=$?
cat "$out/upgrade.log"
ok=$(grep -Ec '^ok [0-9]+' "$out/upgrade.log")
bad=$(grep -Ec '^not ok [0-9]+' "$out/upgrade.log")
if [ $rc -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
passed=$((passed + ok)); failed=$((failed + bad))

# 8. the PGXN distribution: META.json, make dist, the archive builds and installs.
echo "== dist"
bash test/dist/run.sh >"$out/dist.log" 2>&1
rc=$?
cat "$out/dist.log"
ok=$(grep -Ec '^ok [0-9]+' "$out/dist.log")
bad=$(grep -Ec '^not ok [0-9]+' "$out/dist.log")
if [ $rc -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
passed=$((passed + ok)); failed=$((failed + bad))

# make demo's scenario, on a cluster of its own: one per check.
echo "== demo"
bash test/demo/run.sh >"$out/demo.log" 2>&1
rc=$?
cat "$out/demo.log"
ok=$(grep -Ec '^ok [0-9]+' "$out/demo.log")
bad=$(grep -Ec '^not ok [0-9]+' "$out/demo.log")
if [ $rc -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
passed=$((passed + ok)); failed=$((failed + bad))

# 9. faults (kills and restarts the cluster, so it runs last): one per check.
echo "== fault tests"
CLUSTER_DIR="$CLUSTER_DIR" bash test/fault/run.sh >"$out/fault.log" 2>&1
rc=$?
cat "$out/fault.log"
ok=$(grep -Ec '^ok [0-9]+' "$out/fault.log")
bad=$(grep -Ec '^not ok [0-9]+' "$out/fault.log")
if [ $rc -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
passed=$((passed + ok)); failed=$((failed + bad))

echo "== pg_cron"
wait $cron_pid
rc=$?
cat "$out/cron.log"
ok=$(grep -Ec '^ok [0-9]+' "$out/cron.log")
bad=$(grep -Ec '^not ok [0-9]+' "$out/cron.log")
if [ $rc -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
passed=$((passed + ok)); failed=$((failed + bad))

rm -rf "$out"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
