#!/usr/bin/env bash
# bench_rate.sh: rating speed of billing.rate() over 1M quantities, against
# its peers in the same run (DESIGN.md, performance goals):
#
#   (a) SELECT sum(q)                       the limit: a plain scan and sum
#   (b) SELECT sum(billing.rate(p, q))      4-tier graduated constant price
#   (c) the same with a PL/pgSQL tier loop  the peer a competent user writes
#   (d) volume and package prices, each against a plain SQL expression
#   (e) the graduated price in thousands (per 1000, 1.1) against the same
#       PL/pgSQL tier loop on ceil(q / 1000)
#
# Goals: (b) >= 10x faster than (c); (b) >= 0.5x the speed of (a), i.e. at
# most twice its time; the same for (e) against its loop and (a).  Every timing is the best of 3 runs (psql \timing,
# server-side execution plus one result row); all sums are checked equal.
# Parallel query is off (max_parallel_workers_per_gather = 0) so every path
# runs on one core.
#
# Needs a running server with the billing extension installed, reachable
# through PGHOST/PGPORT/PGUSER; creates (and drops) its own database.
# Called by test/bench/run.sh; BENCH_ROWS overrides the row count.
set -euo pipefail
. "$(dirname "$0")/goals.sh"

DB=${BENCH_DB:-billing_bench_rate}
ROWS=${BENCH_ROWS:-1000000}
RUNS=${BENCH_RUNS:-3}
export PGOPTIONS="${PGOPTIONS:-} -c max_parallel_workers_per_gather=0"

GRADUATED='graduated 5000 @ 0 | 100000 @ 0.00029 | 1000000 @ 0.0002 | inf @ 0.0001 + 10'
VOLUME='volume 5000 @ 0.0004 | 100000 @ 0.0003 + 1 | 1000000 @ 0.0002 + 5 | inf @ 0.0001 + 50'
PACKAGE='package 1000 @ 0.25'
GRADUATED_PER='graduated 5 @ 0 | 100 @ 0.29 | 1000 @ 0.2 | inf @ 0.1 + 10 per 1000'

psql -X -q -d postgres -v ON_ERROR_STOP=1 \
    -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null

echo "bench_rate: loading $ROWS quantities"
psql -X -q -d "$DB" -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE EXTENSION billing;
-- Quantities spread log-uniformly over 1 .. 5,000,000 (every tier gets
-- rows), 2% zeros, 10% with three decimals (GB-like meters).
CREATE TABLE usage_q AS
SELECT CASE WHEN random() < 0.02 THEN 0::numeric
            WHEN random() < 0.10 THEN round(exp(random() * ln(5000000))::numeric, 3)
            ELSE floor(exp(random() * ln(5000000)))::numeric END AS q
FROM generate_series(1, $ROWS);
VACUUM ANALYZE usage_q;

-- The peer: the graduated price as a PL/pgSQL tier loop.
CREATE FUNCTION peer_graduated(q numeric) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS \$\$
DECLARE
    bounds numeric[] := '{5000, 100000, 1000000, NULL}';
    units  numeric[] := '{0, 0.00029, 0.0002, 0.0001}';
    fees   numeric[] := '{0, 0, 0, 10}';
    prev   numeric := 0;
    amt    numeric := 0;
    hi     numeric;
BEGIN
    FOR i IN 1 .. 4 LOOP
        EXIT WHEN q <= prev;
        hi := CASE WHEN bounds[i] IS NULL THEN q ELSE least(q, bounds[i]) END;
        amt := amt + (hi - prev) * units[i] + fees[i];
        EXIT WHEN bounds[i] IS NULL;
        prev := bounds[i];
    END LOOP;
    RETURN amt;
END \$\$;

-- The peer of the per price: thousands started, then the same tier loop.
CREATE FUNCTION peer_graduated_per(q numeric) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS \$\$
DECLARE
    bounds numeric[] := '{5, 100, 1000, NULL}';
    units  numeric[] := '{0, 0.29, 0.2, 0.1}';
    fees   numeric[] := '{0, 0, 0, 10}';
    k      numeric := ceil(q / 1000);
    prev   numeric := 0;
    amt    numeric := 0;
    hi     numeric;
BEGIN
    FOR i IN 1 .. 4 LOOP
        EXIT WHEN k <= prev;
        hi := CASE WHEN bounds[i] IS NULL THEN k ELSE least(k, bounds[i]) END;
        amt := amt + (hi - prev) * units[i] + fees[i];
        EXIT WHEN bounds[i] IS NULL;
        prev := bounds[i];
    END LOOP;
    RETURN amt;
END \$\$;
SQL

# run_best SQL: run SQL $RUNS times; sets BEST_MS and RESULT
run_best() {
    local out ms
    BEST_MS=
    for _ in $(seq "$RUNS"); do
        out=$(psql -X -At -d "$DB" -v ON_ERROR_STOP=1 -c '\timing on' -c "$1")
        RESULT=$(printf '%s\n' "$out" | grep -v -e '^Timing is' -e '^Time:' | head -n 1)
        ms=$(printf '%s\n' "$out" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p')
        if [ -z "$BEST_MS" ] || awk -v a="$ms" -v b="$BEST_MS" 'BEGIN { exit !(a < b) }'; then
            BEST_MS=$ms
        fi
    done
}

# same_sum A B: are two decimal results equal as numerics?
same_sum() {
    [ "$(psql -X -At -d "$DB" -c "SELECT '$1'::numeric = '$2'::numeric")" = t ]
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

psql -X -At -d "$DB" -c "SELECT sum(q) FROM usage_q" >/dev/null   # warm the cache

run_best "SELECT sum(q) FROM usage_q";                                         t_sum=$BEST_MS
run_best "SELECT sum(billing.rate('$GRADUATED', q)) FROM usage_q";             t_grad=$BEST_MS;  r_grad=$RESULT
run_best "SELECT sum(peer_graduated(q)) FROM usage_q";                         t_peer=$BEST_MS;  r_peer=$RESULT
run_best "SELECT sum(billing._rate_numeric('$GRADUATED', q)) FROM usage_q";    t_num=$BEST_MS;   r_num=$RESULT
run_best "SELECT sum(billing.rate('$VOLUME', q)) FROM usage_q";                t_vol=$BEST_MS;   r_vol=$RESULT
run_best "SELECT sum(CASE WHEN q = 0 THEN 0
                          WHEN q <= 5000 THEN q * 0.0004
                          WHEN q <= 100000 THEN q * 0.0003 + 1
                          WHEN q <= 1000000 THEN q * 0.0002 + 5
                          ELSE q * 0.0001 + 50 END) FROM usage_q";             t_volp=$BEST_MS;  r_volp=$RESULT
run_best "SELECT sum(billing.rate('$PACKAGE', q)) FROM usage_q";               t_pkg=$BEST_MS;   r_pkg=$RESULT
run_best "SELECT sum(ceil(q / 1000) * 0.25) FROM usage_q";                     t_pkgp=$BEST_MS;  r_pkgp=$RESULT
run_best "SELECT sum(billing.rate('$GRADUATED_PER', q)) FROM usage_q";         t_per=$BEST_MS;   r_per=$RESULT
run_best "SELECT sum(peer_graduated_per(q)) FROM usage_q";                     t_perp=$BEST_MS;  r_perp=$RESULT
run_best "SELECT sum(billing._rate_numeric('$GRADUATED_PER', q)) FROM usage_q"; t_pern=$BEST_MS;  r_pern=$RESULT

ok=true
check() {
    if same_sum "$2" "$3"; then echo "  sums equal: $1 ($2)"; else echo "  SUMS DIFFER: $1: $2 vs $3"; ok=false; fi
}

echo
echo "bench_rate: $ROWS rows, best of $RUNS runs, parallel query off"
printf '%-48s %10s\n' "query" "ms"
printf '%-48s %10s\n' "(a) sum(q) (the limit)" "$t_sum"
printf '%-48s %10s\n' "(b) sum(rate(graduated 4 tiers, q))" "$t_grad"
printf '%-48s %10s\n' "(c) sum(PL/pgSQL tier loop) (the peer)" "$t_peer"
printf '%-48s %10s\n' "    sum(_rate_numeric(graduated)) (no fast path)" "$t_num"
printf '%-48s %10s\n' "(d) sum(rate(volume 4 tiers, q))" "$t_vol"
printf '%-48s %10s\n' "    sum(SQL CASE expression) (volume peer)" "$t_volp"
printf '%-48s %10s\n' "(d) sum(rate(package 1000 @ 0.25, q))" "$t_pkg"
printf '%-48s %10s\n' "    sum(ceil(q / 1000) * 0.25) (package peer)" "$t_pkgp"
printf '%-48s %10s\n' "(e) sum(rate(graduated 4 tiers per 1000, q))" "$t_per"
printf '%-48s %10s\n' "    sum(PL/pgSQL loop on ceil(q / 1000)) (peer)" "$t_perp"
printf '%-48s %10s\n' "    sum(_rate_numeric(per 1000)) (no fast path)" "$t_pern"
echo
x_peer=$(ratio "$t_peer" "$t_grad")
x_sum=$(ratio "$t_sum" "$t_grad")
x_num=$(ratio "$t_num" "$t_grad")
goal() { awk -v a="$1" -v g="$2" 'BEGIN { print (a >= g) ? "met" : "MISSED" }'; }
echo "rate vs PL/pgSQL tier loop: ${x_peer}x faster (goal >= 10x: $(goal "$x_peer" 10))"
echo "rate vs sum(q):             ${x_sum}x its speed (goal >= 0.5x: $(goal "$x_sum" 0.5))"
echo "fast path vs numeric path:  ${x_num}x"
echo "volume rate vs SQL CASE:    $(ratio "$t_volp" "$t_vol")x;  package rate vs SQL: $(ratio "$t_pkgp" "$t_pkg")x"
x_pperp=$(ratio "$t_perp" "$t_per")
x_psum=$(ratio "$t_sum" "$t_per")
echo "per 1000 rate vs its PL/pgSQL loop: ${x_pperp}x faster (goal >= 10x: $(goal "$x_pperp" 10))"
echo "per 1000 rate vs sum(q):            ${x_psum}x its speed (goal >= 0.5x: $(goal "$x_psum" 0.5))"
echo "per 1000 fast path vs numeric path: $(ratio "$t_pern" "$t_per")x"
echo
# the closing table of make bench; a goal whose sums differ is not met
g() {  # PATH OURS PEER PEERS RATIO GOAL
    local m; m=$(goal_met "$5" ">=" "$6")
    same_sum "$7" "$8" || m="NO (sums differ)"
    goal_add rate "$1" "$2 ms" "$3" "$4 ms" "${5}x" ">= ${6}x" "$m"
}
g "rate() graduated, $ROWS rows" "$t_grad" "(c) PL/pgSQL tier loop" "$t_peer" "$x_peer" 10 "$r_grad" "$r_peer"
g "rate() graduated, $ROWS rows" "$t_grad" "(a) sum(q)" "$t_sum" "$x_sum" 0.5 "$r_grad" "$r_grad"
g "rate() per 1000, $ROWS rows" "$t_per" "(e) PL/pgSQL loop" "$t_perp" "$x_pperp" 10 "$r_per" "$r_perp"
g "rate() per 1000, $ROWS rows" "$t_per" "(a) sum(q)" "$t_sum" "$x_psum" 0.5 "$r_per" "$r_per"
check "graduated rate = PL/pgSQL peer" "$r_grad" "$r_peer"
check "graduated rate = numeric path" "$r_grad" "$r_num"
check "volume rate = SQL CASE" "$r_vol" "$r_volp"
check "package rate = SQL ceil" "$r_pkg" "$r_pkgp"
check "per 1000 rate = PL/pgSQL peer" "$r_per" "$r_perp"
check "per 1000 rate = numeric path" "$r_per" "$r_pern"

psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" >/dev/null
$ok
