#!/usr/bin/env bash
# make check-valgrind: run the core paths of billing (install script,
# record, ingest, cumulative reports, metered INSERTs with and without
# kept rows, compaction, usage, previews, finalize, corrections, rerate,
# the audit chain, rating and the price type's text/JSON/binary forms,
# audited tables, and contracts: credit grants of every drawdown key,
# prepaid commitments with rollover and installments, minimums, plan
# changes, previews, finalizing with draws and expiries, a void, rerate)
# in one single-user backend under valgrind memcheck, and fail on any
# error valgrind reports (test/valgrind/postgres.supp only hides the
# padding the server writes to disk on purpose).  About 2 minutes.
#
#   PGBIN=... bash test/valgrind/run.sh        (or: make check-valgrind)
#
# Builds the extension first (with -DUSE_ASSERT_CHECKING, so its Asserts
# run too) and installs it into $PGBIN's tree.
set -uo pipefail
cd "$(dirname "$0")/../.."
. test/lib.sh

ensure_packages valgrind || exit 1
make -s clean >/dev/null 2>&1
build_install PG_CPPFLAGS="-DUSE_ASSERT_CHECKING -g -O1" || { echo "build failed"; exit 1; }

dir=$(mktemp -d /tmp/billing-valgrind.XXXXXX)
chmod 755 "$dir"
[ "$(id -u)" = 0 ] && chown postgres: "$dir"
[ -n "${KEEP:-}" ] || trap 'rm -rf "$dir"' EXIT
as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync -E UTF8 \
    --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log"; exit 1; }
cp test/valgrind/core.sql test/valgrind/postgres.supp "$dir/"
chmod 644 "$dir/core.sql" "$dir/postgres.supp"

as_pg valgrind --quiet --error-exitcode=99 --leak-check=no --track-origins=yes \
    --num-callers=30 --suppressions="$dir/postgres.supp" \
    --log-file="$dir/valgrind.log" \
    "$PGBIN/postgres" --single -D "$dir/data" -F -c fsync=off -c max_stack_depth=2MB \
    postgres <"$dir/core.sql" >"$dir/out.log" 2>&1
rc=$?
errors=$(grep -cE '^==[0-9]+== (Invalid|Conditional|Use of uninit|Syscall param|Mismatched|Source and dest|Argument|Process terminating)' "$dir/valgrind.log")
sql_errors=$(grep -c 'ERROR:' "$dir/out.log")
echo "single-user backend exit code: $rc; valgrind error lines: $errors; SQL errors: $sql_errors"
if [ "$errors" -gt 0 ]; then
    sed -n '1,200p' "$dir/valgrind.log"
fi
[ "$sql_errors" -gt 0 ] && grep -B2 'ERROR:' "$dir/out.log" | head -40
if [ $rc -eq 0 ] && [ "$errors" -eq 0 ] && [ "$sql_errors" -eq 0 ]; then
    echo "valgrind: no errors"
else
    echo "valgrind: errors found"
    exit 1
fi
