#!/usr/bin/env bash
# test/clock_check.sh: show that no test depends on the time of day.  Runs
# the whole of `make test` with the servers' clock and time zone moved
# (libfaketime, Debian package faketime, preloaded into every server that
# test/lib.sh starts, through CLUSTER_ENV; the clients keep the real clock):
#   1. far from UTC midnight: 12:00 UTC, TZ UTC;
#   2. near UTC midnight: 00:05 UTC on Jan 1, TZ UTC (the first hours of a
#      day, where usage_read used to fail, of a month and of a year);
#   3. (on request: bash test/clock_check.sh 3) across UTC midnight: from
#      23:58:30 UTC on Dec 31, TZ UTC: the run crosses a day, a month and a
#      year;
#   4. (on request) servers whose own time zone is not UTC: 00:20 UTC, TZ
#      Asia/Kolkata.
# The fake times are offsets from the real clock (the clock keeps running,
# and servers restarted by the fault tests keep the same fake time), always
# later than the real date, so that the tests' fixed dates stay in the past.
# Usage: bash test/clock_check.sh [N]  (N: run only scenario N; default 1 and 2)
set -uo pipefail
cd "$(dirname "$0")/.."
. test/lib.sh

ensure_packages faketime || exit 1
lib=$(dpkg -L libfaketime 2>/dev/null | grep '/libfaketime\.so\.1$' | head -1)
[ -n "$lib" ] || { echo "libfaketime not found"; exit 1; }

year=$(date -u +%Y)
scenarios=(
    "$(date -u -d 'tomorrow' +%F) 12:00:00|UTC"
    "$((year + 1))-01-01 00:05:00|UTC"
    "$year-12-31 23:58:30|UTC"
    "$((year + 1))-01-02 00:20:00|Asia/Kolkata"
)
rc=0
for i in "${!scenarios[@]}"; do
    if [ -n "${1:-}" ]; then [ "$1" = "$((i + 1))" ] || continue
    elif [ $i -ge 2 ]; then continue; fi
    at=${scenarios[$i]%|*}
    tz=${scenarios[$i]#*|}
    off=$(( $(date -u -d "$at UTC" +%s) - $(date -u +%s) ))
    export CLUSTER_ENV="LD_PRELOAD=$lib FAKETIME=+$off TZ=$tz"
    echo "== scenario $((i + 1)): servers start at $at UTC, TZ $tz"
    log=$(mktemp /tmp/billing-clock.XXXXXX)
    bash test/run_tests.sh >"$log" 2>&1
    r=$?
    grep -E '^(not ok|test .*FAILED)' "$log"
    tail -1 "$log"
    [ $r -eq 0 ] || { rc=1; echo "(log: $log)"; continue; }
    rm -f "$log"
done
exit $rc
