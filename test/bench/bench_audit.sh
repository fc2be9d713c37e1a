#!/usr/bin/env bash
# bench_audit.sh: the cost of billing.audit_table (issue 19), against its
# peers in the same run:
#
#   (a) INSERT of ROWS rows into a table without any audit     the limit
#   (b) the same INSERT into a table audited by billing.audit_table
#       (per account: ACCOUNTS hash chains, each row hashed and chained)
#   (c) the same INSERT into a table with the usual PL/pgSQL audit trigger
#       a user would write: AFTER ROW, one row per change into a log table
#       (identity key, table, operation, time, user, to_jsonb(OLD),
#       to_jsonb(NEW)), no chain                                  the peer
#
# and, for (b) and (c), an UPDATE of every row (old and new images).
# Goal: (b) >= 1.0x the speed of (c) on the INSERT, while keeping the chain.
#
# Every run uses fresh tables (a DROP and CREATE, then audit_table); the
# logs themselves keep growing, by the same number of rows for (b) and (c).
# Each statement is its own transaction (the commit included).  Reported:
# the best wall time of RUNS runs (psql \timing) and the CPU time of the
# backend for that statement (log_statement_stats: user + system), which a
# loaded machine disturbs less.  The audit log must verify at the end.
#
# Needs a running server with the billing extension installed, reachable
# through PGHOST/PGPORT/PGUSER; creates (and drops) its own database.
# Called by test/bench/run.sh (BENCH_ONLY=audit make bench); BENCH_ROWS,
# BENCH_ACCOUNTS and BENCH_RUNS override the sizes.
set -euo pipefail
. "$(dirname "$0")/goals.sh"

DB=${BENCH_DB:-billing_bench_audit}
ROWS=${BENCH_ROWS:-100000}
ACCOUNTS=${BENCH_ACCOUNTS:-1000}
RUNS=${BENCH_RUNS:-5}
PSQL=(psql -X -q -v ON_ERROR_STOP=1)

"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
trap '"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true' EXIT

"${PSQL[@]}" -d "$DB" >/dev/null <<'SQL'
CREATE EXTENSION billing;
-- the peer: what a user writes without the extension
CREATE TABLE peer_log (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tbl      text NOT NULL,
    op       text NOT NULL,
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text NOT NULL DEFAULT current_user,
    old_row  jsonb,
    new_row  jsonb
);
CREATE FUNCTION peer_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO peer_log (tbl, op, old_row, new_row)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_OP,
            CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
            CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END);
    RETURN NULL;
END
$$;
-- the rows: contracts of ACCOUNTS accounts, in no particular account order
CREATE FUNCTION make_table(name text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP TABLE IF EXISTS %I', name);
    EXECUTE format('CREATE TABLE %I (contract_id bigint PRIMARY KEY, account_id bigint NOT NULL,
                                     customer text NOT NULL, plan text NOT NULL,
                                     amount numeric(12, 2) NOT NULL, starts_on date NOT NULL,
                                     signed_at timestamptz, status text NOT NULL)', name);
END
$$;
SQL

SOURCE="SELECT g, 1 + (g * 7919) % $ACCOUNTS, 'customer ' || g, (ARRAY['team', 'business', 'enterprise'])[1 + g % 3],
               round((g % 9973) * 1.37, 2), date '2025-01-01' + g % 365,
               timestamptz '2025-01-01 09:00:00+00' + g * interval '17 seconds', 'active'
          FROM generate_series(1, $ROWS) g"

# timed SQL: prints "wall_ms cpu_ms" of the one statement
timed() {
    "${PSQL[@]}" -d "$DB" -c '\timing on' -c "SET client_min_messages = log" \
        -c "SET log_statement_stats = on" -c "$1" 2>&1 |
        awk '/^Time:/ { wall = $2 }
             /s user, .* s system, .* s elapsed/ {
                 for (i = 1; i <= NF; i++) { if ($i == "user,") u = $(i - 2); if ($i == "system,") s = $(i - 2) }
                 cpu = (u + s) * 1000 }
             END { printf "%.1f %.1f\n", wall, cpu }'
}

# best NAME WALL CPU: keep the best wall time (and the CPU time of that run)
declare -A BEST_WALL BEST_CPU
best() {
    if [ -z "${BEST_WALL[$1]:-}" ] || awk -v a="$2" -v b="${BEST_WALL[$1]}" 'BEGIN { exit !(a < b) }'; then
        BEST_WALL[$1]=$2
        BEST_CPU[$1]=$3
    fi
}

echo "bench_audit: $ROWS rows over $ACCOUNTS accounts, best of $RUNS runs"
for run in $(seq "$RUNS"); do
    "${PSQL[@]}" -d "$DB" >/dev/null <<'SQL'
SELECT make_table('contracts_plain');
SELECT make_table('contracts_audited');
SELECT billing.audit_table('contracts_audited', 'account_id');
SELECT make_table('contracts_peer');
CREATE TRIGGER peer_audit AFTER INSERT OR UPDATE OR DELETE ON contracts_peer
    FOR EACH ROW EXECUTE FUNCTION peer_audit();
CHECKPOINT;
SQL
    # the order changes from run to run, so none always runs on a warmer cache
    for v in $( [ $((run % 2)) = 1 ] && echo "plain audited peer" || echo "peer audited plain"); do
        read -r w c < <(timed "INSERT INTO contracts_$v $SOURCE")
        best "insert_$v" "$w" "$c"
    done
    for v in $( [ $((run % 2)) = 1 ] && echo "plain audited peer" || echo "peer audited plain"); do
        read -r w c < <(timed "UPDATE contracts_$v SET amount = amount + 1, status = 'renewed'")
        best "update_$v" "$w" "$c"
    done
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
goal() { awk -v a="$1" -v g="$2" 'BEGIN { print (a >= g) ? "met" : "MISSED" }'; }

echo
printf '%-62s %10s %10s\n' "statement ($ROWS rows)" "wall ms" "cpu ms"
for op in insert update; do
    printf '%-62s %10s %10s\n' "(a) $op, no audit (the limit)" "${BEST_WALL[${op}_plain]}" "${BEST_CPU[${op}_plain]}"
    printf '%-62s %10s %10s\n' "(b) $op, billing.audit_table (hash chain per account)" "${BEST_WALL[${op}_audited]}" "${BEST_CPU[${op}_audited]}"
    printf '%-62s %10s %10s\n' "(c) $op, PL/pgSQL audit trigger, no chain (the peer)" "${BEST_WALL[${op}_peer]}" "${BEST_CPU[${op}_peer]}"
done
echo
x_ins=$(ratio "${BEST_WALL[insert_peer]}" "${BEST_WALL[insert_audited]}")
x_ins_cpu=$(ratio "${BEST_CPU[insert_peer]}" "${BEST_CPU[insert_audited]}")
echo "insert, audit_table vs the PL/pgSQL trigger: ${x_ins}x its speed (cpu ${x_ins_cpu}x) (goal >= 1.0x: $(goal "$x_ins" 1.0))"
goal_add audit "insert, audit_table, $ROWS rows" "${BEST_WALL[insert_audited]} ms" "(c) PL/pgSQL audit trigger" \
    "${BEST_WALL[insert_peer]} ms" "${x_ins}x" ">= 1.0x" "$(goal_met "$x_ins" ">=" 1.0)"
echo "insert, audit_table vs no audit:             $(ratio "${BEST_WALL[insert_plain]}" "${BEST_WALL[insert_audited]}")x its speed (cpu $(ratio "${BEST_CPU[insert_plain]}" "${BEST_CPU[insert_audited]}")x)"
echo "update, audit_table vs the PL/pgSQL trigger: $(ratio "${BEST_WALL[update_peer]}" "${BEST_WALL[update_audited]}")x its speed (cpu $(ratio "${BEST_CPU[update_peer]}" "${BEST_CPU[update_audited]}")x)"

# what was measured is right: one audit row per change, every chain intact
read -r n_rows n_chains n_bad <<<"$("${PSQL[@]}" -At -F ' ' -d "$DB" -c "
    SELECT (SELECT count(*) FROM billing.audit_log WHERE object = 'public.contracts_audited'),
           (SELECT count(DISTINCT account_id) FROM billing.audit_log WHERE object = 'public.contracts_audited'),
           (SELECT count(*) FROM billing.verify_audit_log())")"
echo "audit rows of the audited table: $n_rows (expected $((RUNS * ROWS * 2))), in $n_chains chains; verify_audit_log: $n_bad problems"
[ "$n_rows" = $((RUNS * ROWS * 2)) ] && [ "$n_bad" = 0 ]
