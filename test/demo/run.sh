#!/usr/bin/env bash
# make test, section "demo": test/demo.sql (make demo) runs to its end on a
# cluster of its own (it changes the worker's interval with ALTER SYSTEM),
# and what it shows holds.  Its output depends on the day it runs (it bills
# the month before now()), so the checks are of what is true on any day:
#   - every section runs and the worker's section finishes;
#   - section 8 prices AI tokens by model (matrix charges) and counts active
#     users with a unique meter: last month's usage has a row per model and
#     one for the active users; when last month's invoice of its account
#     exists (not in the grace hour after a month ends) it has one line per
#     charge, each with the charge's dimension, and the month in progress
#     has its active-user line.
# Prints one TAP line per check.  Expects the extension built and installed.
set -uo pipefail
cd "$(dirname "$0")/../.."
. test/lib.sh

n=0
fails=0
has() {     # has DESCRIPTION REGEX: a line of the demo's output matches
    if grep -Eq -- "$2" "$work/demo.out"; then ok "$1"; else not_ok "$1"; fi
}
work=$(mktemp -d /tmp/billing-demo.XXXXXX)
trap 'stop_cluster; rm -rf "$work"' EXIT
start_cluster >/dev/null || { not_ok "the demo's cluster starts"; exit 1; }

psql -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE billing_demo" >/dev/null
if psql -X -q -v ON_ERROR_STOP=1 -d billing_demo -f test/demo.sql >"$work/demo.out" 2>&1; then
    ok "make demo's scenario runs without an error"
else
    not_ok "make demo's scenario runs without an error"
    tail -20 "$work/demo.out" | sed 's/^/#   /'
fi
has "it reaches the maintenance worker's section, which compacts everything" \
    '^== [0-9]+\. Maintenance that runs itself'
has "section 8 shows the matrix charges of the Business plan" \
    '^ ai_token +\| large +\| unit 15 per 1000000 +\| Tokens, large model'
has "section 8: last month's tokens per model" '^ ai_token +\| mini +\| +[0-9]+ \| +[0-9]+$'
has "section 8: last month's active users, one row for every dimension" \
    '^ active_user \| \(all\) +\| +[0-9]+ \| +[0-9]+$'
if grep -Eq '^ +[0-9]+ \| Pied Piper ' "$work/demo.out"; then
    for l in '1 \| fixed \| +\| +\| Business plan, base' \
             '2 \| usage \| active_user \| +\| Active users above 25' \
             '3 \| usage \| ai_token +\| large +\| Tokens, large model' \
             '4 \| usage \| ai_token +\| +\| Tokens, other models' \
             '5 \| usage \| ai_token +\| small +\| Tokens, small model'; do
        has "Pied Piper's invoice has the line ${l//\\/}" "^ +$l"
    done
else
    ok "# SKIP last month's invoice is not due yet (the grace hour after a month's end)"
fi
has "the month in progress has Pied Piper's active-user line" \
    '^ +2 \| usage \| +\| Active users above 25: \$4 each \| +[0-9]+ \| +[0-9.]+$'
[ "$fails" -eq 0 ]
