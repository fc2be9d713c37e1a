# goals.sh: the closing goal table of make bench (sourced by run.sh and by
# every bench_*.sh).
#
# Each benchmark adds one line per goal it measured with goal_add; run.sh
# prints them all, in the order they were measured, after the last
# benchmark (goals_print).  The lines go to the file BENCH_GOALS, which
# run.sh creates in BENCH_TMP; a benchmark run by hand without it prints
# its own tables only.
#
# A line has 8 fields:
#   benchmark | path | ours | peer | peer's | ratio | goal | met
# "met" is yes or NO; n/a when our side could not be measured (a part of
# the API that does not exist yet, or an error, which the benchmark's own
# output explains).

# goal_add BENCH PATH OURS PEER PEERS RATIO GOAL MET: record one goal.
goal_add() {
    [ -n "${BENCH_GOALS:-}" ] || return 0
    local IFS='|'
    echo "$*" >>"$BENCH_GOALS"
}

# goal_met VALUE OP GOAL: yes when VALUE OP GOAL (OP is >= or <=), NO when
# not, n/a when VALUE is not a number.
goal_met() {
    [[ $1 =~ ^-?[0-9.]+$ ]] || { echo "n/a"; return; }
    awk -v v="$1" -v op="$2" -v g="$3" \
        'BEGIN { ok = (op == ">=") ? (v >= g) : (v <= g); print ok ? "yes" : "NO" }'
}

# goals_print: the table of every goal recorded, and a count.
goals_print() {
    [ -s "${BENCH_GOALS:-}" ] || { echo "(no goals recorded)"; return 0; }
    { echo "benchmark|path|ours|peer|peer's|ratio|goal|met"
      cat "$BENCH_GOALS"; } | column -t -s '|' -o ' | '
    awk -F'|' '$8 ~ /^yes/ { y++; next } $8 ~ /^NO/ { no++; next } { na++ }
        END { printf "goals: %d, met: %d, NOT met: %d, n/a: %d\n", NR, y, no, na }' "$BENCH_GOALS"
}
