#!/usr/bin/env bash
# make test, Citus section: seeded random billing scenarios
# (test/citus/gen_scenario.sql: every ingest path, subscriptions ending
# mid-period, spend caps, finalize, late usage, corrections, retroactive
# prices, lines missing on either side, rerate twice) run on one node and on
# a loopback Citus cluster (a coordinator and two workers); every table must
# be identical row by row (test/citus/compare.sql, which lists the columns
# left out and why), the whole output too, and the audit log and the
# invoices must verify.  Then the guards on the cluster: a billing_admin
# that claims to be a Citus task (application_name 'citus_internal gpid=1')
# is refused every change the guards forbid, from the coordinator and from a
# worker (issue 13, defect 3).  Then the tie rule of last meters on every
# read path (test/citus/last_rule.sql, issue 13, defect 6).  Then the
# cluster itself (also: the table the scenario audits with
# billing.audit_table is audited on the node of each account's chain).
# Then the contracts scenario (test/citus/contracts.sql: credits,
# commitments, plan changes) the same way.  Then the update of a 1.0
# database that 1.0's distribute() spread over the cluster
# (test/citus/update_*.sql, issue 15).  And the one trigger shape (issue
# 15): distribute() changes no trigger, the shards carry their tables'
# triggers.
#
# Seeds: BILLING_CITUS_SEEDS (default: the fixed list below); each seed is
# printed, and a failure is replayed with BILLING_CITUS_SEEDS=N bash
# test/citus/run.sh (BILLING_CITUS_KEEP=DIR keeps the scenarios, outputs and
# tables there).
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

# seeds 3 and 5 make rerate bill a usage line missing on one side (1.0's
# _rerate_diff_citus wrote a NULL quantity there, one node 0)
SEEDS=${BILLING_CITUS_SEEDS:-"3 5 8"}

n=0
failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); failed=$((failed + 1)); echo "not ok $n - $1"; }
check() {   # check NAME COMMAND...: one test line from a command's status
    local name=$1; shift
    if "$@"; then ok "$name"; else not_ok "$name"; fi
}
# expect_both EXPECTED PREFIX NAME: one test line per side, that
# $WORK/PREFIX_single.out and $WORK/PREFIX_citus.out each print EXPECTED
expect_both() {
    local side
    for side in single citus; do
        if diff -u "$1" "$WORK/$2_$side.out" >"$WORK/diff" 2>&1; then
            ok "$3 ($side)"
        else
            sed 's/^/# /' "$WORK/diff" | cut -c1-240 | head -30
            not_ok "$3 ($side)"
        fi
    done
}

WORK=$(mktemp -d /tmp/billing-citus-run.XXXXXX)
chmod 755 "$WORK"
cleanup() {
    citus_stop; stop_cluster
    if [ -n "${BILLING_CITUS_KEEP:-}" ]; then
        mkdir -p "$BILLING_CITUS_KEEP" && cp -r "$WORK"/. "$BILLING_CITUS_KEEP"/
    fi
    rm -rf "$WORK"
}
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
# the cluster's servers run in a time zone other than UTC (and with a half-hour
# offset), the single node in UTC: the scenario sets TimeZone in its own
# session, but the coordinator's connections to the workers run with the
# server's, and no result may depend on it (verify_audit_log found every
# invoice altered there, issue 13)
export CITUS_OPTS="timezone = 'America/St_Johns'"
if start_cluster >"$WORK/single.log" 2>&1 && citus_start 2 >"$WORK/cluster.log" 2>&1; then
    ok "one node and a cluster of a coordinator and 2 workers started ($(( $(date +%s) - start ))s)"
else
    cat "$WORK/single.log" "$WORK/cluster.log"
    not_ok "one node and a cluster of a coordinator and 2 workers started"
    exit 1
fi
cq() { citus_psql "$CITUS_COORD_PORT" -qAt -d "$DB" -c "$1" 2>&1; }
# the triggers of billing's tables but TRUNCATE ones (Citus fires those on
# the coordinator), one line per table; of the shards, with the shard
# numbers taken out (pg_trigger, not pg_class: Citus hides shards from
# queries of pg_class)
trig_sql="SELECT string_agg(r || ': ' || d, E'\n' ORDER BY r || ': ' || d)
            FROM (SELECT t.tgrelid::regclass::text AS r,
                         string_agg(pg_get_triggerdef(t.oid), '; ' ORDER BY t.tgname) AS d
                    FROM pg_trigger t
                   WHERE NOT t.tgisinternal AND t.tgtype & 32 = 0
                     AND t.tgrelid::regclass::text ~ '^billing[.]' AND t.tgrelid::regclass::text !~ '_[0-9]{6,}\$'
                   GROUP BY 1) x"
shard_trig_sql="SELECT string_agg(l, E'\n' ORDER BY l)
      FROM (SELECT DISTINCT regexp_replace(r, '_[0-9]{6,}\$', '') || ': '
                            || regexp_replace(d, '_[0-9]{6,}', '', 'g') AS l
              FROM (SELECT t.tgrelid::regclass::text AS r,
                           string_agg(pg_get_triggerdef(t.oid), '; ' ORDER BY t.tgname) AS d
                      FROM pg_trigger t
                     WHERE NOT t.tgisinternal AND t.tgtype & 32 = 0
                       AND t.tgrelid::regclass::text ~ '^billing[.].*_[0-9]{6,}\$'
                     GROUP BY 1) x) y"

# split FILE: the tables of compare.sql's output, one file per table (FILE.NAME)
split_tables() {
    awk -v f="$1" '/^== / { out = f "." $2; printf "" > out; next } out { print > out }' "$1"
}

# 3. the scenarios, seed by seed
DB=
for seed in $SEEDS; do
    t=$(date +%s)
    echo "# seed $seed (replay: BILLING_CITUS_SEEDS=$seed bash test/citus/run.sh)"
    sc=$WORK/scenario_$seed.sql
    if ! psql -X -d postgres -v seed="$seed" -f test/citus/gen_scenario.sql >"$sc" 2>"$WORK/gen_$seed.log"; then
        cat "$WORK/gen_$seed.log"
        not_ok "seed $seed: scenario generated"
        continue
    fi
    prev=$DB
    DB=seed_$seed
    psql -qX -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null 2>&1
    psql -X -d "$DB" -v citus=false -f "$sc" >"$WORK/single_$seed.out" 2>&1
    rc=$?
    [ $rc -eq 0 ] || tail -20 "$WORK/single_$seed.out" | sed 's/^/# /'
    check "seed $seed: the scenario ($(wc -l <"$sc") lines) runs on one node" [ $rc -eq 0 ]
    psql -X -d "$DB" -f test/citus/compare.sql >"$WORK/single_$seed.tables" 2>&1
    # one database per seed on the cluster too; the one before is dropped
    if [ -n "$prev" ]; then
        for p in "$CITUS_COORD_PORT" "${CITUS_WORKER_PORTS[@]}"; do
            citus_psql "$p" -qc "DROP DATABASE $prev WITH (FORCE)" >/dev/null 2>&1
        done
    fi
    if ! citus_db "$DB" >"$WORK/citus_db_$seed.log" 2>&1; then
        cat "$WORK/citus_db_$seed.log"
        not_ok "seed $seed: a Citus database on every node"
        continue
    fi
    citus_psql "$CITUS_COORD_PORT" -X -v ON_ERROR_STOP=0 -d "$DB" -v citus=true -f "$sc" \
        >"$WORK/citus_$seed.out" 2>&1
    rc=$?
    [ $rc -eq 0 ] || grep -B2 -A8 'ERROR' "$WORK/citus_$seed.out" | head -30 | sed 's/^/# /'
    check "seed $seed: the scenario runs on the Citus cluster" [ $rc -eq 0 ]
    citus_psql "$CITUS_COORD_PORT" -X -d "$DB" -f test/citus/compare.sql >"$WORK/citus_$seed.tables" 2>&1

    # every table, row by row
    split_tables "$WORK/single_$seed.tables"
    split_tables "$WORK/citus_$seed.tables"
    for f in "$WORK/single_$seed.tables".*; do
        tbl=${f##*.tables.}
        [ "$tbl" = "tables" ] && continue
        if diff -u "$f" "$WORK/citus_$seed.tables.$tbl" >"$WORK/diff" 2>&1; then
            ok "seed $seed: $tbl identical on the cluster ($(wc -l <"$f") rows)"
        else
            sed 's/^/# /' "$WORK/diff" | cut -c1-240 | head -24
            not_ok "seed $seed: $tbl identical on the cluster"
        fi
    done
    # every table of the schema is compared (compare.sql lists them)
    r=$(cat "$WORK/single_$seed.tables.tables")
    check "seed $seed: compare.sql covers every table of billing (${r})" \
        [ "$r" = "accounts adjustments audit_heads audit_log charges commitment_windows commitments credit_grants credit_ledger cumulative_reports dedupe_keys ingest_offsets invoice_lines invoices metered_tables meters plans subscriptions unique_periods unique_values usage_buckets usage_corrections usage_daily usage_days usage_deltas usage_hourly" ]
    r=$(grep -A2 -E '^ (invoice|audit)_problems' "$WORK/citus_$seed.out" | grep -E '^ +[0-9]+$' | tr -d ' ' | tr '\n' ' ')
    check "seed $seed: invoices and the audit log verify on the cluster (problems: $r)" [ "$r" = "0 0 " ]
    if diff -u "$WORK/single_$seed.out" "$WORK/citus_$seed.out" >"$WORK/diff" 2>&1; then
        ok "seed $seed: whole scenario output identical ($(wc -l <"$WORK/single_$seed.out") lines)"
    else
        sed 's/^/# /' "$WORK/diff" | cut -c1-240 | head -40
        not_ok "seed $seed: whole scenario output identical"
    fi
    echo "# seed $seed took $(( $(date +%s) - t ))s"
done
[ -n "$DB" ] || exit 1

# 3b. contracts (issue 17): credits, commitments and plan changes
# (test/citus/contracts.sql) on one node and on the cluster, in a database
# of their own on each; finalize goes through _finalize_citus on the
# cluster, invoice_preview and credit_balance run on the account's worker.
# The invoices, credit lines, ledger, grants and audit rows must be the
# same (the scenario prints them), and verify on both
t=$(date +%s)
psql -qX -d postgres -c "DROP DATABASE IF EXISTS contracts" -c "CREATE DATABASE contracts" >/dev/null 2>&1
psql -X -d contracts -v citus=false -f test/citus/contracts.sql >"$WORK/contracts_single.out" 2>&1
rc1=$?
[ $rc1 -eq 0 ] || tail -20 "$WORK/contracts_single.out" | sed 's/^/# /'
rc2=1
if citus_db contracts >"$WORK/citus_db_contracts.log" 2>&1; then
    citus_psql "$CITUS_COORD_PORT" -X -v ON_ERROR_STOP=0 -d contracts -v citus=true \
        -f test/citus/contracts.sql >"$WORK/contracts_citus.out" 2>&1
    rc2=$?
    [ $rc2 -eq 0 ] || grep -B2 -A8 'ERROR' "$WORK/contracts_citus.out" | head -30 | sed 's/^/# /'
else
    cat "$WORK/citus_db_contracts.log"
fi
check "contracts: the scenario runs on one node and on the cluster" [ $rc1 -eq 0 -a $rc2 -eq 0 ]
for c in contracts_verify contracts_audit; do
    a=$(grep -E "^ check:$c +\|" "$WORK/contracts_single.out" | cut -d'|' -f2 | tr -d ' ')
    b=$(grep -E "^ check:$c +\|" "$WORK/contracts_citus.out" | cut -d'|' -f2 | tr -d ' ')
    check "contracts: $c finds no problems on one node ($a) and on the cluster ($b)" [ "$a" = 0 -a "$b" = 0 ]
done
if diff -u "$WORK/contracts_single.out" "$WORK/contracts_citus.out" >"$WORK/diff" 2>&1; then
    ok "contracts: invoices, credit lines, ledger, grants and audit rows identical ($(wc -l <"$WORK/contracts_single.out") lines)"
else
    sed 's/^/# /' "$WORK/diff" | cut -c1-240 | head -40
    not_ok "contracts: invoices, credit lines, ledger, grants and audit rows identical"
fi
echo "# contracts took $(( $(date +%s) - t ))s"

# 3c. the update of a 1.0 database that 1.0's distribute() spread over the
# cluster (issue 15): 1.0 with a little history (test/citus/update_10.sql)
# on one node and on the cluster, ALTER EXTENSION billing UPDATE, the reads
# 1.0 gave (test/citus/update_reads.sql) unchanged, the history going on
# with 1.1 after distribute() again (test/citus/update_after.sql), the
# same on both, verified; every node's tables and shards with the triggers
# of one node
t=$(date +%s)
U=upd10
psql -qX -d postgres -c "DROP DATABASE IF EXISTS $U" -c "CREATE DATABASE $U" >/dev/null 2>&1
upd_run() {   # upd_run SIDE PSQL...: the update scenario on one side
    local side=$1; shift
    "$@" -X -d $U -v citus=$([ $side = citus ] && echo true || echo false) \
        -f test/citus/update_10.sql >"$WORK/upd_${side}_10.out" 2>&1 || return 1
    "$@" -X -d $U -f test/citus/update_reads.sql >"$WORK/upd_${side}_before.out" 2>&1
    "$@" -X -v ON_ERROR_STOP=1 -d $U -c "ALTER EXTENSION billing UPDATE" >"$WORK/upd_${side}_update.out" 2>&1 || return 2
    "$@" -X -d $U -f test/citus/update_reads.sql >"$WORK/upd_${side}_after.out" 2>&1
    "$@" -X -d $U -v citus=$([ $side = citus ] && echo true || echo false) \
        -f test/citus/update_after.sql >"$WORK/upd_${side}_more.out" 2>&1 || return 3
}
upd_run single psql; r1=$?
r2=9
if citus_db $U >"$WORK/citus_db_$U.log" 2>&1; then
    upd_run citus citus_psql "$CITUS_COORD_PORT"; r2=$?
else
    cat "$WORK/citus_db_$U.log"
fi
for side in single citus; do
    for f in 10 update more; do
        [ -f "$WORK/upd_${side}_$f.out" ] && grep -B2 -A6 'ERROR' "$WORK/upd_${side}_$f.out" | head -20 | sed "s/^/# $side $f: /"
    done
done
check "update of 1.0: the 1.0 history on one node and, distributed by 1.0's distribute(), on the cluster" \
    [ $r1 -ne 1 -a $r2 -ne 1 -a $r2 -ne 9 ]
check "update of 1.0: ALTER EXTENSION billing UPDATE on one node and on the cluster's coordinator" \
    [ $r1 -ne 2 -a $r2 -ne 2 -a $r1 -ne 1 -a $r2 -ne 1 ]
for side in single citus; do
    if [ -s "$WORK/upd_${side}_before.out" ] && diff -u "$WORK/upd_${side}_before.out" "$WORK/upd_${side}_after.out" >"$WORK/diff" 2>&1; then
        ok "update of 1.0 ($side): every read 1.0 gave is the same after the update ($(wc -l <"$WORK/upd_${side}_after.out") lines)"
    else
        sed 's/^/# /' "$WORK/diff" | cut -c1-240 | head -20
        not_ok "update of 1.0 ($side): every read 1.0 gave is the same after the update"
    fi
done
check "update of 1.0: the reads of one node and of the cluster are the same" \
    diff -q "$WORK/upd_single_after.out" "$WORK/upd_citus_after.out"
check "update of 1.0: the history goes on with 1.1 on one node and on the cluster" [ $r1 = 0 -a $r2 = 0 ]
if [ $r1 = 0 -a $r2 = 0 ] && diff -u "$WORK/upd_single_more.out" "$WORK/upd_citus_more.out" >"$WORK/diff" 2>&1; then
    ok "update of 1.0: invoices, rerate and audit rows after it the same on one node and on the cluster ($(wc -l <"$WORK/upd_citus_more.out") lines)"
else
    sed 's/^/# /' "$WORK/diff" | cut -c1-240 | head -30
    not_ok "update of 1.0: invoices, rerate and audit rows after it the same on one node and on the cluster"
fi
r=$(grep -A2 -E '^ (audit|invoice)_problems' "$WORK/upd_citus_more.out" | grep -E '^ +[0-9]+$' | tr -d ' ' | tr '\n' ' ')
check "update of 1.0: the audit log and the invoices verify on the cluster, after the update and after more history (problems: $r)" \
    [ "$r" = "0 0 0 0 " ]
# the triggers: the coordinator's those of the updated node, and on each
# worker its copies of the tables and its shards the same
a=$(psql -qAtX -d $U -c "$trig_sql")
b=$(citus_psql "$CITUS_COORD_PORT" -qAt -d $U -c "$trig_sql")
check "update of 1.0: the cluster's coordinator has the triggers of the updated node ($(echo "$b" | wc -l) tables)" \
    [ -n "$a" -a "$a" = "$b" ]
[ "$a" = "$b" ] || diff <(echo "$a") <(echo "$b") | sed 's/^/# /' | cut -c1-240
bs=$(echo "$b" | grep -v '^billing.metered_tables: ')
for wp in "${CITUS_WORKER_PORTS[@]}"; do
    w=$(citus_psql "$wp" -qAt -d $U -c "$shard_trig_sql")
    c=$(citus_psql "$wp" -qAt -d $U -c "$trig_sql")
    check "update of 1.0: worker $wp: its shards and its copies of the tables carry the triggers of one node" \
        [ -n "$w" -a "$w" = "$bs" -a "$c" = "$b" ]
    [ "$w" = "$bs" ] || diff <(echo "$bs") <(echo "$w") | sed 's/^/# /' | cut -c1-240
done
for p in "$CITUS_COORD_PORT" "${CITUS_WORKER_PORTS[@]}"; do
    citus_psql "$p" -qc "DROP DATABASE $U WITH (FORCE)" >/dev/null 2>&1
done
echo "# the update of 1.0 took $(( $(date +%s) - t ))s"

# 4. the guards on the cluster (issue 13, defect 3): a billing_admin claiming
# to be a Citus task (application_name, and the nested execution Citus then
# refuses allowed) tries every change the guards forbid, on the coordinator
# and on a worker (Citus runs a statement from any node); each must fail with
# 55000 and change nothing on any node
t=$(date +%s)
cq "CREATE ROLE mallory LOGIN IN ROLE billing_admin" >/dev/null
target=$(cq "SELECT l.charge_id || ' ' || i.plan FROM billing.invoice_lines l
               JOIN billing.invoices i ON i.account_id = l.account_id AND i.invoice_id = l.invoice_id
              WHERE l.kind = 'usage' ORDER BY l.account_id, l.line_no LIMIT 1")
charge=${target% *}
plan=${target#* }
meter=$(cq "SELECT meter FROM billing.usage_days ORDER BY account_id, meter LIMIT 1")
# and a meter no charge names (deleting one that is charged fails on the
# foreign key first), with usage on one worker only, not compacted
cq "INSERT INTO billing.meters (meter, late_window, dedupe_window) VALUES ('guarded', '100 years', '100 years')" >/dev/null
acct=$(cq "SELECT min(account_id) FROM billing.accounts")
cq "SELECT billing.record($acct, 'guarded', 1, '2024-03-04 00:00:00+00')" >/dev/null
refdigest() {   # the reference data on every node
    cq "SELECT string_agg(nodeport || ':' || result, ' ' ORDER BY nodeport, result)
          FROM run_command_on_placements('billing.meters', 'SELECT md5(string_agg(x::text, '','' ORDER BY x.meter)) FROM %s x')
        UNION ALL
        SELECT string_agg(nodeport || ':' || result, ' ' ORDER BY nodeport, result)
          FROM run_command_on_placements('billing.charges', 'SELECT md5(string_agg(x::text, '','' ORDER BY x.charge_id)) FROM %s x')
        UNION ALL
        SELECT string_agg(nodeport || ':' || result, ' ' ORDER BY nodeport, result)
          FROM run_command_on_placements('billing.plans', 'SELECT md5(string_agg(x::text, '','' ORDER BY x.plan)) FROM %s x')"
}
before=$(refdigest)
attacks=(
"price of charge version $charge, which rated a finalized invoice|UPDATE billing.charges SET price = 'unit 0.01' WHERE charge_id = $charge"
"delete of charge version $charge|DELETE FROM billing.charges WHERE charge_id = $charge"
"aggregation of meter $meter, which has usage|UPDATE billing.meters SET aggregation = 'max' WHERE meter = '$meter'"
"bucket width of meter $meter|UPDATE billing.meters SET bucket_width = '2 hours' WHERE meter = '$meter'"
"aggregation of meter guarded, with usage of account $acct not compacted|UPDATE billing.meters SET aggregation = 'last' WHERE meter = 'guarded'"
"bucket width of meter guarded|UPDATE billing.meters SET bucket_width = '1 hour' WHERE meter = 'guarded'"
"delete of meter guarded|DELETE FROM billing.meters WHERE meter = 'guarded'"
"period of plan $plan, which has invoices|UPDATE billing.plans SET period = '7 days' WHERE plan = '$plan'"
"currency of plan $plan|UPDATE billing.plans SET currency = 'CHF' WHERE plan = '$plan'"
"what the guards allow (the unit of meter $meter)|UPDATE billing.meters SET unit = 'u' WHERE meter = '$meter'")
for port in "$CITUS_COORD_PORT" "${CITUS_WORKER_PORTS[0]}"; do
    node=$([ "$port" = "$CITUS_COORD_PORT" ] && echo coordinator || echo worker)
    # one session of mallory, claiming to be a Citus task; each statement
    # in its own transaction, followed by the SQLSTATE it ended with
    args=(-c "SELECT 'application_name: ' || current_setting('application_name')")
    for i in "${!attacks[@]}"; do
        args+=(-c "${attacks[$i]#*|}" -c "\\echo attack $i :SQLSTATE")
    done
    PGAPPNAME='citus_internal gpid=1' PGOPTIONS='-c citus.allow_nested_distributed_execution=on' \
        psql -X -qAt -h "$CITUS_DIR/sock" -p "$port" -U mallory -d "$DB" \
             "${args[@]}" >"$WORK/attacks_$node" 2>"$WORK/attacks_$node.err"
    app=$(head -1 "$WORK/attacks_$node")
    for i in "${!attacks[@]}"; do
        r=$(sed -n "s/^attack $i //p" "$WORK/attacks_$node")
        if [ "$i" = $((${#attacks[@]} - 1)) ]; then
            check "guards on the cluster ($node, $app): ${attacks[$i]%%|*} passes ($r)" [ "$r" = 00000 ]
        else
            check "guards on the cluster ($node, $app): ${attacks[$i]%%|*} refused: ${r:-?}" [ "$r" = 55000 ]
        fi
    done
done
cq "UPDATE billing.meters SET unit = NULL" >/dev/null
after=$(refdigest)
check "the refused changes left meters, charges and plans alike on every node" [ -n "$before" -a "$before" = "$after" ]
r=$(cq "SELECT (SELECT count(*) FROM billing.verify_invoices()) || '/' || (SELECT count(*) FROM billing.verify_audit_log())")
check "invoices and the audit log still verify ($r problems)" [ "$r" = "0/0" ]

echo "# the guards on the cluster took $(( $(date +%s) - t ))s"

# 4b. the tie rule of last meters (issue 13, defect 6) on every read path,
# uncompacted, compacted and mixed, and in rerate: one node and the cluster
# print what test/citus/last_rule.out says
t=$(date +%s)
psql -X -d "$DB" -f test/citus/last_rule.sql >"$WORK/last_rule_single.out" 2>&1
citus_psql "$CITUS_COORD_PORT" -X -d "$DB" -f test/citus/last_rule.sql >"$WORK/last_rule_citus.out" 2>&1
expect_both test/citus/last_rule.out last_rule "last meters: every read path keeps the later arrival of a tie"
echo "# the tie rule took $(( $(date +%s) - t ))s"

# 4b'. group rows (issue 16): on one node a flush writes the cells of the
# accounts of a block of 64 ids in one row of usage_deltas; distribute()
# splits such rows into one row per account, so that each lands on its
# account's shard: the usage of every account reads the same before and
# after distribute(), and after compaction on the workers
t=$(date +%s)
G=groups
for p in "$CITUS_COORD_PORT" "${CITUS_WORKER_PORTS[@]}"; do
    citus_psql "$p" -qc "DROP DATABASE IF EXISTS $G WITH (FORCE)" >/dev/null 2>&1
done
if citus_db $G >"$WORK/citus_db_$G.log" 2>&1; then
    gq() { citus_psql "$CITUS_COORD_PORT" -qAt -d $G -c "$1" 2>&1; }
    gq "CREATE EXTENSION billing" >/dev/null
    gq "INSERT INTO billing.meters (meter, aggregation, late_window)
        VALUES ('g_sum', 'sum', '100 years'), ('g_last', 'last', '100 years')" >/dev/null
    gq "INSERT INTO billing.accounts (account_id) SELECT generate_series(1, 300)" >/dev/null
    for b in 1 2; do
        gq "SELECT accepted FROM billing.ingest('g', 1, $b,
                ARRAY(SELECT 1 + (i * 7919) % 300 FROM generate_series(1, 3000) i ORDER BY i)::bigint[],
                ARRAY(SELECT CASE WHEN i % 3 = 0 THEN 'g_last' ELSE 'g_sum' END FROM generate_series(1, 3000) i ORDER BY i),
                ARRAY(SELECT (i % 17 + $b)::numeric FROM generate_series(1, 3000) i ORDER BY i),
                ARRAY(SELECT timestamptz '2025-01-10 00:00+00' + (i % 50) * interval '1 minute'
                        FROM generate_series(1, 3000) i ORDER BY i))" >/dev/null
    done
    gusage="SELECT md5(string_agg(format('%s %s %s %s %s', a, u.meter, u.bucket_start, u.quantity, u.events), ','
                                  ORDER BY a, u.meter, u.bucket_start))
              FROM generate_series(1, 300) a, billing.usage(a, '2025-01-01', '2025-02-01') u"
    grows=$(gq "SELECT count(*) FROM billing.usage_deltas WHERE get_byte(cells, 0) = 3")
    gbefore=$(gq "$gusage")
    gq "SELECT count(*) FROM billing.distribute()" >/dev/null
    gafter=$(gq "$gusage")
    gleft=$(gq "SELECT coalesce(sum(result::int), -1) FROM run_command_on_placements('billing.usage_deltas',
                    'SELECT count(*) FROM %s WHERE get_byte(cells, 0) = 3')")
    gq "SELECT billing.compact_usage()" >/dev/null
    gcompacted=$(gq "$gusage")
    check "group rows: written on one node ($grows), split by distribute() (left on the shards: $gleft), every account's usage the same after it and after compaction ($gbefore)" \
        [ "${grows:-0}" -gt 0 -a "$gleft" = 0 -a -n "$gbefore" -a "$gbefore" = "$gafter" -a "$gbefore" = "$gcompacted" ]
else
    cat "$WORK/citus_db_$G.log"
    not_ok "group rows: a Citus database"
fi
echo "# group rows took $(( $(date +%s) - t ))s"

# 4c. compaction on the workers, each over its own shards (issue 16 part 3),
# in a database of its own: test/citus/compact_shards.sql on one node and
# on the cluster (meters of every aggregation, compacted from each worker
# node directly, from the coordinator, and in a transaction block; reads
# uncompacted, compacted and mixed) prints what compact_shards.out says on
# both.  Then on the cluster: what each node folded is what its own shards
# held, counted on the node; compact_usage() on a worker node compacts its
# shards only; the maintenance worker of a worker node compacts its shards;
# the coordinator and a worker node compacting at once fold every cell once;
# after a shard moves, it is compacted where it went, and not where it was
t=$(date +%s)
C=compact
psql -qX -d postgres -c "DROP DATABASE IF EXISTS $C" -c "CREATE DATABASE $C" >/dev/null 2>&1
for p in "$CITUS_COORD_PORT" "${CITUS_WORKER_PORTS[@]}"; do
    citus_psql "$p" -qc "DROP DATABASE IF EXISTS $C WITH (FORCE)" >/dev/null 2>&1
done
psql -X -d $C -v citus=false -f test/citus/compact_shards.sql >"$WORK/compact_single.out" 2>&1
rc1=$?
rc2=1
if citus_db $C >"$WORK/citus_db_$C.log" 2>&1; then
    citus_psql "$CITUS_COORD_PORT" -X -d $C -v citus=true -f test/citus/compact_shards.sql \
        >"$WORK/compact_citus.out" 2>&1
    rc2=$?
else
    cat "$WORK/citus_db_$C.log"
fi
check "compaction on the workers: the scenario runs on one node and on the cluster" [ $rc1 -eq 0 -a $rc2 -eq 0 ]
expect_both test/citus/compact_shards.out compact \
    "compaction on the workers: every read, uncompacted, compacted and mixed, as compact_shards.out says"
ccq() { citus_psql "$CITUS_COORD_PORT" -qAt -d $C -c "$1" 2>&1; }
wq() { citus_psql "$1" -qAt -d $C -c "$2" 2>&1; }
W1=${CITUS_WORKER_PORTS[0]}
W2=${CITUS_WORKER_PORTS[1]}
# per node (port:n), counted on the node over each of its shards of TABLE
per_node() {   # per_node TABLE QUERY-WITH-%s
    ccq "SELECT string_agg(nodeport || ':' || n, ' ' ORDER BY nodeport)
           FROM (SELECT nodeport, sum(result::bigint) AS n
                   FROM run_command_on_placements('$1', \$q\$$2\$q\$) GROUP BY nodeport) x"
}
deltas() { per_node billing.usage_deltas 'SELECT count(*) FROM %s d, billing._delta_cells(d.cells)'; }
days() { per_node billing.usage_days 'SELECT count(*) FROM %s'; }
usage_round() {   # usage_round N: a report of cs_sum for every account, on day N of March
    ccq "SELECT accepted FROM billing.ingest('cs', $1, 1, ARRAY(SELECT generate_series(1, 40)::bigint),
           array_fill('cs_sum'::text, ARRAY[40]), array_fill($1::numeric, ARRAY[40]),
           ARRAY(SELECT timestamptz '2024-03-01 10:00+00' + ($1 - 1) * interval '1 day'
                        + a * interval '1 minute' FROM generate_series(1, 40) a))"
}
total() { ccq "SELECT sum(u.quantity) FROM generate_series(1, 40) a, billing.usage(a, '2024-03-01', '2024-04-01', '1 month', 'cs_sum') u"; }
# "P1:n P2:m" with n and m above 0
held_on_both() { [[ "$1" =~ ^[0-9]+:[1-9][0-9]*\ [0-9]+:[1-9][0-9]*$ ]]; }
usage_round 14 >/dev/null
before=$(deltas)
d0=$(days)
groups=$(ccq "SELECT string_agg(nodeport || ':' || n, ' ' ORDER BY nodeport)
                FROM (SELECT nodeport, count(*) AS n FROM pg_dist_shard_placement JOIN pg_dist_shard USING (shardid)
                       WHERE logicalrelid = 'billing.usage_deltas'::regclass GROUP BY nodeport) x")
r=$(ccq "SELECT string_agg(nodeport || ':' || result, ' ' ORDER BY nodeport) FROM billing._compact_placements() WHERE success")
v=$(held_on_both "$before" && [ "$r" = "$before" ] && echo y)
check "from the coordinator each worker node compacted its own shards, all at once: each folded what its shards held ($r; held $before)" \
    [ "$v" = y ]
after=$(deltas)
d1=$(days)
grew=$(ccq "SELECT bool_and(split_part(b, ':', 2)::int > split_part(a, ':', 2)::int)
              FROM unnest(string_to_array('$d0', ' '), string_to_array('$d1', ' ')) x(a, b)")
check "and each node's shards of usage_deltas are empty, its shards of usage_days took the rows ($after; rows $d0 -> $d1; shard groups $groups)" \
    [ "$after" = "$W1:0 $W2:0" -a "$(echo "$d1" | wc -w)" = 2 -a "$grew" = t ]
usage_round 15 >/dev/null
before=$(deltas)
r=$(wq "$W1" "SELECT billing.compact_usage()")
after=$(deltas)
v=$(held_on_both "$before" && [ "$W1:$r" = "${before%% *}" -a "$after" = "$W1:0 ${before##* }" ] && echo y)
check "compact_usage() on worker node $W1 compacts its own shards only ($r of $before; after: $after)" \
    [ "$v" = y ]
# the maintenance worker of a worker node: its own shards, every second here
wq "$W2" "ALTER SYSTEM SET billing.maintenance_interval = '1s'" >/dev/null
wq "$W2" "SELECT pg_reload_conf()" >/dev/null
for i in $(seq 1 60); do
    r=$(wq "$W2" "SELECT last_result FROM billing.maintenance_status WHERE job = 'compact_usage'")
    [ "$r" = ok ] && break
    sleep 0.5
done
after=$(deltas)
wq "$W2" "ALTER SYSTEM RESET billing.maintenance_interval" >/dev/null
wq "$W2" "SELECT pg_reload_conf()" >/dev/null
check "the maintenance worker of worker node $W2 compacts its shards ($after, last run: $r)" \
    [ "$after" = "$W1:0 $W2:0" -a "$r" = ok ]
# the coordinator and a worker node at once: every cell folded once
usage_round 16 >/dev/null
want=$(total)
held=$(ccq "SELECT count(*) FROM billing.usage_deltas d, billing._delta_cells(d.cells)")
wq "$W1" "SELECT billing.compact_usage()" >"$WORK/compact_w1" 2>&1 &
a=$(ccq "SELECT billing.compact_usage()")
wait
b=$(cat "$WORK/compact_w1")
check "the coordinator and worker node $W1 compacting at once fold every cell once ($a + $b of $held; total $(total) = $want)" \
    [ "$held" -gt 0 -a "$(( a + b ))" = "$held" -a "$(deltas)" = "$W1:0 $W2:0" -a "$(total)" = "$want" ]
# a shard moves with deltas not yet compacted
usage_round 17 >/dev/null
want=$(total)
sh=$(ccq "SELECT shardid FROM run_command_on_placements('billing.usage_deltas', 'SELECT count(*) FROM %s')
           WHERE nodeport = $W1 AND result::bigint > 0 ORDER BY shardid LIMIT 1")
dsh=$(ccq "SELECT u.shardid FROM pg_dist_shard d JOIN pg_dist_shard u ON u.shardminvalue = d.shardminvalue
            WHERE d.shardid = $sh AND u.logicalrelid = 'billing.usage_days'::regclass")
m=$(ccq "SELECT citus_move_shard_placement($sh, '127.0.0.1', $W1, '127.0.0.1', $W2, shard_transfer_mode => 'block_writes')")
r=$(wq "$W1" "SELECT billing._compact_shard($sh, $dsh)")
held=$(ccq "SELECT count(*) FROM billing.usage_deltas d, billing._delta_cells(d.cells)")
a=$(ccq "SELECT billing.compact_usage()")
where=$(ccq "SELECT nodeport FROM pg_dist_shard_placement WHERE shardid = $dsh")
check "shard $sh moved to $W2 ($m): not compacted on $W1 where it was ($r), compacted where it went (folded $a of $held, $(deltas); total $(total) = $want)" \
    [ "$where" = "$W2" -a "$r" = 0 -a "$held" -gt 0 -a "$a" = "$held" -a "$(deltas)" = "$W1:0 $W2:0" -a "$(total)" = "$want" ]
for p in "$CITUS_COORD_PORT" "${CITUS_WORKER_PORTS[@]}"; do
    citus_psql "$p" -qc "DROP DATABASE $C WITH (FORCE)" >/dev/null 2>&1
done
echo "# compaction on the workers took $(( $(date +%s) - t ))s"

# 5. the cluster itself
t=$(date +%s)
r=$(cq "SELECT count(*) FROM billing.distribute() WHERE changed")
check "distribute() is idempotent (a second call changes nothing: $r)" [ "$r" = 0 ]
# tampering with an audit row on a worker (triggers off) is found from the coordinator
acct=$(cq "SELECT min(account_id) FROM billing.audit_log WHERE account_id > 0 AND seq = 2")
cq "SELECT run_command_on_placements('billing.audit_log',
      \$\$SET session_replication_role = replica; UPDATE %s SET actor = 'mallory' WHERE account_id = $acct AND seq = 2\$\$)" >/dev/null
r=$(cq "SELECT string_agg(account_id || ':' || seq || ' ' || problem, '; ') FROM billing.verify_audit_log()")
check "an audit row altered on a worker is reported by verify_audit_log on the coordinator ($r)" \
    [ "$r" = "$acct:2 hash does not match the row: the row was altered" ]
# the audited table of the scenario, distributed by its account: each
# account's contracts, their audit rows and the chain head live on one node,
# and a change routed to that node is audited there
r=$(cq "SELECT count(*) FROM (SELECT c.nodeport FROM pg_dist_shard_placement c
          JOIN pg_dist_shard s ON s.shardid = c.shardid
         WHERE s.logicalrelid IN ('contracts'::regclass, 'billing.audit_log'::regclass,
                                  'billing.audit_heads'::regclass, 'billing.accounts'::regclass)
         GROUP BY s.shardminvalue, c.nodeport) x")
w=$(cq "SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'contracts'::regclass")
check "the audited table's shards sit with their accounts' audit chains ($w shard groups, $r placements)" [ "$r" = "$w" ]
r=$(cq "SELECT sum(result::bigint) FROM run_command_on_placements('billing.audit_log',
          \$\$SELECT count(*) FROM %s WHERE object = 'public.contracts'\$\$)")
w=$(cq "SELECT count(*) FROM billing.audit_log WHERE object = 'public.contracts'")
check "the audited table's rows are in the shards of their chains ($r of $w)" [ -n "$w" -a "$r" = "$w" ]
a2=$(cq "SELECT min(account_id) FROM billing.accounts WHERE account_id <> $acct")
cq "INSERT INTO contracts VALUES ($a2, 1000000, 'team', 1)" >/dev/null
r=$(cq "SELECT count(*) || ' row, head ' || (max(seq) = (SELECT seq FROM billing.audit_heads WHERE account_id = $a2))
          FROM billing.audit_log WHERE account_id = $a2 AND details -> 'key' @> '{\"contract_id\": 1000000}'")
check "a change of the audited table routed to account $a2's node is audited there ($r)" [ "$r" = "1 row, head true" ]
r=$(cq "SELECT count(*) FROM billing.verify_audit_log() WHERE account_id <> $acct")
check "and the audit log verifies (but for the row altered above: $r problems)" [ "$r" = 0 ]
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
            FROM run_command_on_placements('billing.usage_days', 'SELECT count(*) FROM %s')
           GROUP BY nodeport) x WHERE n > 0")
check "compacted usage (usage_days) is spread over both workers ($r)" [ "$(echo "$r" | wc -w)" = 2 ]
# the C ingest must never write the shells (direct heap inserts would land there)
r=$(cq "SELECT pg_relation_size('billing.usage_deltas') + pg_relation_size('billing.dedupe_keys')")
w=$(cq "SELECT string_agg(result, ',') FROM run_command_on_workers(
          \$\$SELECT pg_relation_size('billing.usage_deltas') + pg_relation_size('billing.dedupe_keys')\$\$)")
check "the shells of usage_deltas and dedupe_keys stay empty on every node ($r,$w)" \
    test "$r" = 0 -a "$w" = "0,0"
r=$(cq "SELECT count(*) FROM pg_dist_object WHERE distribution_argument_index IS NOT NULL")
check "per-account functions run on the account's node ($r registered)" [ "$r" -ge 6 ]
# the maintenance worker: on every node; compaction on the worker nodes,
# each over its own shards, the other jobs from the coordinator
r=$(cq "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'billing maintenance launcher'")
w=$(cq "SELECT string_agg(result, ',') FROM run_command_on_workers(
          \$\$SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'billing maintenance launcher'\$\$)")
check "every node runs the maintenance launcher ($r,$w)" test "$r" = 1 -a "$w" = "1,1"
r=$(cq "SELECT billing._maintenance_runs_here('compact_usage') || '/' || billing._maintenance_runs_here('purge_dedupe')")
w=$(cq "SELECT string_agg(result, ',') FROM run_command_on_workers(
          \$\$SELECT billing._maintenance_runs_here('compact_usage') || '/' || billing._maintenance_runs_here('purge_dedupe')\$\$)")
check "maintenance: the worker nodes compact their own shards, the coordinator does not; the other jobs run on the coordinator only ($r,$w)" \
    test "$r" = false/true -a "$w" = "true/false,true/false"
acct=$(cq "SELECT max(account_id) FROM billing.accounts")
r=$(cq "SELECT billing.record($acct, '$meter', 1, now(), 'pushed-down')")
check "record() pushed down to the worker of account $acct counts" [ "$r" = t ]

# one trigger shape (issue 15): distribute() rewrote no trigger (the
# coordinator has those of the single node, which never ran it), and each
# shard carries its table's triggers (trig_sql, shard_trig_sql above)
a=$(psql -qAtX -d "$DB" -c "$trig_sql")
b=$(cq "$trig_sql")
check "distribute() rewrote no trigger: the coordinator's are those of one node ($(echo "$b" | wc -l) tables)" \
    [ -n "$a" -a "$a" = "$b" ]
[ "$a" = "$b" ] || diff <(echo "$a") <(echo "$b") | sed 's/^/# /' | cut -c1-240
w=$(citus_psql "${CITUS_WORKER_PORTS[0]}" -qAt -d "$DB" -c "$shard_trig_sql")
bs=$(echo "$b" | grep -v '^billing.metered_tables: ')
check "the shards on a worker carry the triggers of their tables" [ -n "$w" -a "$w" = "$bs" ]
[ "$w" = "$bs" ] || diff <(echo "$bs") <(echo "$w") | sed 's/^/# /' | cut -c1-240

# the trigger of immutable tables fires on their shards; its error names
# the table, as on one node (and a billed adjustment stays as it is)
r=$(for q in "UPDATE billing.invoices SET total = total" "DELETE FROM billing.invoice_lines" \
             "UPDATE billing.adjustments SET reason = 'x'" "DELETE FROM billing.audit_log"; do
        cq "$q" | sed -n 's/^ERROR: *//p'
    done | tr '\n' ';')
check "the errors of immutable tables name the table on the cluster ($r)" \
    [ "$r" = "update of invoices is not allowed;delete of invoice_lines is not allowed;update of adjustments is not allowed;delete of audit_log is not allowed;" ]

echo "# the checks of the cluster took $(( $(date +%s) - t ))s"
echo "# citus section took $(( $(date +%s) - start ))s after the build (seeds: $SEEDS)"
exit $(( failed > 0 ))
