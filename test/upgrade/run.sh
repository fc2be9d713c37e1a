#!/usr/bin/env bash
# The upgrade test (make test, section "upgrade"): billing 1.0, installed
# from the frozen sql/billing--1.0.sql, then ALTER EXTENSION billing UPDATE,
# must be what a fresh install of the current version is, in its catalog
# and in its data.  Prints one TAP line per check.
#
#   bash test/upgrade/run.sh            the schema check and the data check
#   bash test/upgrade/run.sh --schema   the schema check only (a few seconds):
#                                       run it after writing your section of
#                                       sql/billing--1.0--1.1.sql
#   make check-upgrade                  build, install, then --schema on a
#                                       throwaway cluster
#
# It runs against the cluster of PGHOST/PGPORT/PGUSER when one answers there
# (make test's), else starts a throwaway one (test/lib.sh); either way the
# extension must be installed into the PostgreSQL of PG_CONFIG/PGBIN.  With
# UPGRADE_KEEP=1 (and a cluster of your own) the databases it made are kept
# for a look: billing_up_walk/_fresh (schema check), billing_up_a (1.0, then
# updated), _b (fresh), _c and _d (restored), _check (the reads, table snap).
#
# 1. Schema check.  A database where 1.0 was created and updated, and one
#    where the current version was created fresh, are described by
#    test/upgrade/catalog.sql (every function with all its attributes,
#    tables, columns, constraints, indexes, triggers, types, operators,
#    views, sequences, ACLs, comments, the extension's members,
#    pg_extension_config_dump registrations, initial privileges); any
#    difference fails, shown as a unified diff of those descriptions
#    ("-" what the upgrade gives, "+" what a fresh install has).  In the
#    full run the check is shown to catch a change of each kind first.
# 2. Data check.  test/upgrade/history_1.sql (public 1.0 API, fixed
#    timestamps) is fed to a 1.0 database; every read (reads.sql) is taken,
#    the extension updated, every read taken again: each must give what it
#    gave before (a column the new version adds is not a difference), the
#    audit log must verify and keep its old rows byte for byte.  Then
#    history_2.sql continues the history, on the updated database and on a
#    fresh install fed the whole history: both must read the same (but for
#    wall-clock columns).  pg_dump of the updated database restores into a
#    fresh one that reads the same and verifies, and so does a dump taken on
#    1.0 (restored into the current version, it reads as 1.0 did).
# 3. A 1.0 database holding a plan whose period is not a whole multiple of
#    a bucket width it bills (refused from 1.1 on, issue 13) updates, with
#    a WARNING naming it; the plan goes on billing, no one new subscribes.
#
# The internal usage store (STORE_READS) is not read row by row: the upgrade
# may migrate it into another store; usage(), invoice_preview(),
# remaining(), rerate() and reconcile() read through it.  A new store's
# tables and sequences go into STORE_READS too (its content may differ
# between an updated database and a fresh one that compacted differently).
set -uo pipefail
cd "$(dirname "$0")/../.."
. test/lib.sh

STORE_READS='table billing.usage_buckets|table billing.usage_deltas|table billing.usage_hourly|table billing.usage_daily|table billing.usage_days|sequence billing.usage_seq|table billing.unique_periods|table billing.unique_values'
# Reads that a fix of the new version changes on purpose for this history
# ('|'-separated read names as the TAP lines give them, e.g. 'remaining',
# each with its issue in a comment): they are not compared before and after
# the update, only between the updated database and a fresh install.
# invoice_preview (#16): a preview builds the account's earlier periods
# without an invoice first, as finalize does, so pending adjustments go on
# the earliest of them, not on the previewed period (1.0 showed them there)
CHANGED_READS='invoice_preview'
# wall-clock columns, and the audit hashes made from them
CLOCK_KEYS='finalized_at|created_at|corrected_at|applied_at|expires_at|at|prev_hash|hash'
# sha256 of the frozen 1.0 install script: it never changes
FROZEN_10=45bb075bd08ec4044fc625eeb7019ed50ca31be21126ab4b459da0002fc088db

TAB=$'\t'
mode=all
case "${1:-}" in
    --schema) mode=schema ;;
    "") ;;
    *) echo "usage: $0 [--schema]" >&2; exit 2 ;;
esac

work=$(mktemp -d /tmp/billing-upgrade.XXXXXX)
chmod 755 "$work"
own_cluster=
if [ -z "${PGHOST:-}" ] || ! psql -X -q -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
    start_cluster || { echo "not ok 1 - a cluster to run on"; exit 1; }
    own_cluster=1
fi

WALK=billing_up_walk FRESH=billing_up_fresh A=billing_up_a B=billing_up_b C=billing_up_c
D=billing_up_d CHECK=billing_up_check
DBS="$WALK $FRESH $A $B $C $D $CHECK"

cleanup() {
    local db
    if [ -n "${UPGRADE_KEEP:-}" ] && [ -z "$own_cluster" ]; then
        echo "# UPGRADE_KEEP: databases $DBS and roles up_* kept; work files in $work"
        return
    fi
    for db in $DBS; do
        psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1
    done
    psql -X -q -d postgres -c "DROP ROLE IF EXISTS up_admin" -c "DROP ROLE IF EXISTS up_writer" \
        -c "DROP ROLE IF EXISTS up_reader" >/dev/null 2>&1
    rm -rf "$work"
    [ -n "$own_cluster" ] && stop_cluster
}
trap cleanup EXIT

n=0
fails=0
diag() { sed 's/^/#   /'; }
check() {   # check DESCRIPTION EXPECTED ACTUAL
    if [ "$2" = "$3" ]; then
        ok "$1"
    else
        not_ok "$1"
        diff <(echo "$2") <(echo "$3") | head -40 | diag
    fi
}
q() { local db=$1; shift; timeout 300 psql -X -q -At -v ON_ERROR_STOP=1 -d "$db" "$@"; }
recreate() {
    psql -X -q -d postgres -c "SET client_min_messages = warning" \
        -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >/dev/null
}
ms() { date +%s%3N; }
default_version=$(sed -n "s/^default_version[[:space:]]*=[[:space:]]*'\([^']*\)'.*/\1/p" billing.control)
t0=$(ms)

# ---- 1. schema check ----------------------------------------------------------------------------

check "sql/billing--1.0.sql is the frozen 1.0 release (sha256 unchanged)" "$FROZEN_10" \
    "$(sha256sum sql/billing--1.0.sql | cut -d' ' -f1)"
installed="$("$PG_CONFIG" --sharedir)/extension"
check "the installed billing--1.0.sql and billing--1.0--$default_version.sql are this tree's" "same" \
    "$(cmp -s sql/billing--1.0.sql "$installed/billing--1.0.sql" \
       && cmp -s "sql/billing--1.0--$default_version.sql" "$installed/billing--1.0--$default_version.sql" \
       && echo same)"

recreate $WALK
recreate $FRESH
check "an update path leads from 1.0 to $default_version" "1.0--$default_version" \
    "$(q $WALK -c "SELECT path FROM pg_extension_update_paths('billing') WHERE source = '1.0' AND target = '$default_version'")"
# CREATE FUNCTION ... LANGUAGE C looks each symbol up: 1.0 installs only
# while billing.so still has every C entry point 1.0 names
q $WALK -c "CREATE EXTENSION billing VERSION '1.0'" >"$work/walk.log" 2>&1
check "CREATE EXTENSION billing VERSION '1.0' from the frozen script (billing.so keeps 1.0's C entry points)" \
    "0" "$?"
[ -s "$work/walk.log" ] && diag <"$work/walk.log"
s=$(ms)
q $WALK -c "ALTER EXTENSION billing UPDATE" >"$work/update.log" 2>&1
check "ALTER EXTENSION billing UPDATE on an empty 1.0 database" "0" "$?"
[ -s "$work/update.log" ] && diag <"$work/update.log"
echo "# ALTER EXTENSION billing UPDATE (no data): $(( $(ms) - s )) ms"
q $FRESH -c "CREATE EXTENSION billing" >"$work/fresh.log" 2>&1 || diag <"$work/fresh.log"
check "both databases are at version $default_version" "$default_version|$default_version" \
    "$(q $WALK -c "SELECT extversion FROM pg_extension WHERE extname = 'billing'")|$(q $FRESH -c "SELECT extversion FROM pg_extension WHERE extname = 'billing'")"

q $WALK -f test/upgrade/catalog.sql >"$work/walk.catalog" 2>&1
q $FRESH -f test/upgrade/catalog.sql >"$work/fresh.catalog" 2>&1
diff -U1 --label "1.0 + ALTER EXTENSION billing UPDATE" --label "CREATE EXTENSION billing (fresh $default_version)" \
    "$work/walk.catalog" "$work/fresh.catalog" >"$work/schema.diff"
if [ $? -eq 0 ] && [ "$(grep -c '^function billing\.' "$work/fresh.catalog")" -gt 100 ]; then
    ok "schema check: 1.0 + upgrade has exactly the objects of a fresh $default_version install ($(wc -l <"$work/fresh.catalog") catalog lines compared)"
else
    not_ok "schema check: 1.0 + upgrade has exactly the objects of a fresh $default_version install"
    echo "#   what differs ('-' after the upgrade, '+' in a fresh install; 'object | attribute'):"
    diag <"$work/schema.diff"
fi

# The schema check catches a change of every kind it claims to cover:
# these changes, made together to the fresh database in a transaction that
# is rolled back, must each show in the diff (pattern: a changed line).
mutations=(
    'volatility@@function billing\.rate\(billing\.price,numeric\) \| def:@@ALTER FUNCTION billing.rate(billing.price, numeric) VOLATILE'
    'strictness@@function billing\.rate_tiers\(billing\.price,numeric\) \| def:@@ALTER FUNCTION billing.rate_tiers(billing.price, numeric) CALLED ON NULL INPUT'
    'parallel safety@@function billing\.round_money\(numeric,text\) \| def:@@ALTER FUNCTION billing.round_money(numeric, text) PARALLEL UNSAFE'
    'security definer@@function billing\.usage\(.*\) \| def:@@ALTER FUNCTION billing.usage(bigint, timestamptz, timestamptz, interval, text) SECURITY DEFINER'
    'cost@@function billing\.price_from_jsonb\(jsonb\) \| def:@@ALTER FUNCTION billing.price_from_jsonb(jsonb) COST 1000'
    'SET clause@@function billing\.compact_usage\(\) \| set @@ALTER FUNCTION billing.compact_usage() SET work_mem = '"'1MB'"
    'body@@function billing\.purge_dedupe\(.*\) \| def:@@DO $$ BEGIN EXECUTE replace(pg_get_functiondef('"'billing.purge_dedupe(timestamptz)'"'::regprocedure), '"'RETURN n;'"', '"'RETURN n + 0;'"'); END $$'
    'C symbol@@function billing\.price_hash\(billing\.price\) \| def:@@CREATE OR REPLACE FUNCTION billing.price_hash(billing.price) RETURNS int4 AS '"'\$libdir/billing', 'billing_price_ne'"' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE'
    'function dropped@@function billing\._rate_fast\(@@ALTER EXTENSION billing DROP FUNCTION billing._rate_fast(billing.price, numeric); DROP FUNCTION billing._rate_fast(billing.price, numeric)'
    'function added outside the schema@@function public\.up_stray\(\)@@CREATE FUNCTION public.up_stray() RETURNS int LANGUAGE sql AS '"'SELECT 1'"
    'function owner@@function billing\.price_to_jsonb\(billing\.price\) \| owner@@ALTER FUNCTION billing.price_to_jsonb(billing.price) OWNER TO billing_admin'
    'function ACL@@function billing\.finalize_invoices\(.*\) \| owner .* acl@@GRANT EXECUTE ON FUNCTION billing.finalize_invoices(timestamptz) TO billing_writer'
    'aggregate@@aggregate billing\._audit_chain\(@@ALTER AGGREGATE billing._audit_chain(bytea, bigint, bigint, timestamptz, text, text, text, jsonb) OWNER TO billing_admin'
    'table ACL@@table billing\.invoices \| persistence@@GRANT SELECT ON billing.invoices TO billing_writer'
    'column ACL@@table billing\.accounts \| column 3 @@GRANT UPDATE (name) ON billing.accounts TO billing_writer'
    'sequence ACL@@sequence billing\.invoice_id_seq \| persistence@@GRANT USAGE ON SEQUENCE billing.invoice_id_seq TO billing_writer'
    'schema ACL@@schema billing \|@@GRANT CREATE ON SCHEMA billing TO billing_admin'
    'row security@@table billing\.charges \| persistence@@ALTER TABLE billing.charges ENABLE ROW LEVEL SECURITY'
    'storage parameter@@table billing\.dedupe_keys \| persistence@@ALTER TABLE billing.dedupe_keys SET (fillfactor = 50)'
    'column default@@table billing\.meters \| column 6 @@ALTER TABLE billing.meters ALTER COLUMN unit SET DEFAULT '"'x'"
    'NOT NULL@@table billing\.plans \| column 2 @@ALTER TABLE billing.plans ALTER COLUMN period DROP NOT NULL'
    'column type@@table billing\.cumulative_reports \| column 6 @@ALTER TABLE billing.cumulative_reports ALTER COLUMN total TYPE numeric(40,2)'
    'column added@@table billing\.invoices \| column 10 @@ALTER TABLE billing.invoices ADD COLUMN note text'
    'constraint@@table billing\.subscriptions \| constraint up_mut@@ALTER TABLE billing.subscriptions ADD CONSTRAINT up_mut CHECK (true)'
    'index@@table billing\.adjustments \| index @@CREATE INDEX up_mut_idx ON billing.adjustments (created_at)'
    'trigger disabled@@table billing\.invoice_lines \| trigger CREATE TRIGGER invoice_lines_immutable@@ALTER TABLE billing.invoice_lines DISABLE TRIGGER invoice_lines_immutable'
    'trigger added@@table billing\.usage_corrections \| trigger CREATE TRIGGER up_mut@@CREATE TRIGGER up_mut AFTER DELETE ON billing.usage_corrections FOR EACH ROW EXECUTE FUNCTION billing._refuse_change()'
    'composite type@@composite type billing\.delta_cell \| column 7 @@ALTER TYPE billing.delta_cell ADD ATTRIBUTE extra int'
    'operator@@operator billing\.<>\(@@ALTER OPERATOR billing.<> (billing.price, billing.price) SET (JOIN = NONE)'
    'operator family@@operator family billing\.price_hash_ops@@ALTER OPERATOR FAMILY billing.price_hash_ops USING hash DROP FUNCTION 2 (billing.price, billing.price)'
    'view definition@@view billing\.usage_cells \| view definition@@DO $$ BEGIN EXECUTE '"'CREATE OR REPLACE VIEW billing.usage_cells AS SELECT * FROM ('"' || rtrim(pg_get_viewdef('"'billing.usage_cells'"'::regclass), '"';'"') || '"') s WHERE s.events > 0'"'; END $$'
    'sequence parameters@@sequence billing\.correction_id_seq \| as @@ALTER SEQUENCE billing.correction_id_seq CACHE 10'
    'comment@@comment on table billing\.plans@@COMMENT ON TABLE billing.plans IS '"'changed'"
    'column comment@@comment on column unit of table billing\.meters@@COMMENT ON COLUMN billing.meters.unit IS '"'x'"
    'extension member@@extension billing \| member function billing\.currency_exponent@@ALTER EXTENSION billing DROP FUNCTION billing.currency_exponent(text)'
    'pg_extension_config_dump@@extension billing \| pg_extension_config_dump\(billing\.plans@@UPDATE pg_extension SET extconfig = array_remove(extconfig, '"'billing.plans'"'::regclass::oid), extcondition = extcondition[2:] WHERE extname = '"'billing'"
    'initial privileges@@initial privileges of function billing\.remaining\(@@DELETE FROM pg_init_privs WHERE objoid = '"'billing.remaining(bigint,text,timestamptz,text)'"'::regprocedure'
    'event trigger@@event trigger billing_metered_table_dropped@@ALTER EVENT TRIGGER billing_metered_table_dropped DISABLE'
)
if [ "$mode" = all ]; then
    {
        echo "SET client_min_messages = warning;"
        echo "BEGIN;"
        for m in "${mutations[@]}"; do echo "${m#*@@*@@};"; done
        echo "\\i test/upgrade/catalog.sql"
        echo "ROLLBACK;"
    } >"$work/mutate.sql"
    q $FRESH -f "$work/mutate.sql" >"$work/mutated.catalog" 2>"$work/mutate.log"
    rc=$?
    diff "$work/fresh.catalog" "$work/mutated.catalog" | grep -E '^[<>] ' | cut -c3- >"$work/mutated.diff"
    missed=
    for m in "${mutations[@]}"; do
        what=${m%%@@*}; rest=${m#*@@}; pattern=${rest%%@@*}
        grep -Eq "^$pattern" "$work/mutated.diff" || missed="$missed, $what"
    done
    if [ $rc -eq 0 ] && [ -z "$missed" ]; then
        ok "the schema check catches a change of each of ${#mutations[@]} kinds (volatility, strictness, parallel, security definer, SET, body, C symbol, owner, ACLs, columns, constraints, indexes, triggers, types, operators, views, sequences, comments, members, dump registrations, initial privileges, ...)"
    else
        not_ok "the schema check catches a change of each of ${#mutations[@]} kinds"
        [ $rc -ne 0 ] && diag <"$work/mutate.log"
        [ -n "$missed" ] && echo "#   not caught: ${missed#, }"
    fi
fi

if [ "$mode" = schema ]; then
    echo "# upgrade schema check: $((n - fails)) passed, $fails failed ($(( $(ms) - t0 )) ms)"
    [ "$fails" -eq 0 ]
    exit
fi
echo "# upgrade schema check: $(( $(ms) - t0 )) ms"
t1=$(ms)

# ---- 2. data check --------------------------------------------------------------------------------

recreate $A
recreate $B
recreate $CHECK
q $CHECK -f test/upgrade/compare.sql >"$work/check.log" 2>&1 || diag <"$work/check.log"
q $A -c "CREATE EXTENSION billing VERSION '1.0'" >/dev/null
q $B -c "CREATE EXTENSION billing" >/dev/null
q postgres >/dev/null <<'SQL'
SET client_min_messages = warning;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'up_admin') THEN
        CREATE ROLE up_admin NOLOGIN IN ROLE billing_admin;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'up_writer') THEN
        CREATE ROLE up_writer NOLOGIN IN ROLE billing_writer;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'up_reader') THEN
        CREATE ROLE up_reader NOLOGIN IN ROLE billing_reader;
    END IF;
END $$;
SQL

# snapshot DB LABEL: every read of DB into the check database as LABEL
snapshot() {
    q "$1" -v label="$2" -v skip="^($STORE_READS)\$" -f test/upgrade/reads.sql >"$work/$2.tsv" 2>"$work/$2.err" \
        && q $CHECK -c "\\copy snap FROM '$work/$2.tsv'" >/dev/null 2>>"$work/$2.err"
}
# snapshots DB LABEL DB LABEL: two snapshots at once (the databases are independent)
snapshots() {
    snapshot "$1" "$2" & local pid=$!
    snapshot "$3" "$4" || diag <"$work/$4.err"
    wait $pid || diag <"$work/$2.err"
}
# run_both FILE DESCRIPTION_A DESCRIPTION_B: FILE on $A and $B at once, one
# TAP line for each
run_both() {
    local file=$1 db rc what
    for db in $A $B; do
        ( q $db -f "$file" >"$work/$(basename "$file").$db.log" 2>&1; echo $? >"$work/$db.rc" ) &
    done
    wait
    for db in $A $B; do
        rc=$(cat "$work/$db.rc")
        if [ "$db" = "$A" ]; then what=$2; else what=$3; fi
        if [ "$rc" = 0 ]; then ok "$what"; else not_ok "$what"; tail -30 "$work/$(basename "$file").$db.log" | diag; fi
    done
}
# compare DESCRIPTION OLD NEW PROJECT STRIP_KEYS SKIP_READS: one TAP line,
# the reads that differ and up to 6 rows of each side as diagnostics
compare() {
    local what=$1 old=$2 new=$3 project=$4 strip=$5 skip=$6 out
    out=$(q $CHECK -F ' ' <<SQL
CREATE TEMP TABLE d AS
SELECT * FROM diff('$old', '$new', $project, string_to_array('$strip', '|'), string_to_array('$skip', '|'));
SELECT format('%s: %s rows %s', read, count(*), side) FROM d GROUP BY read, side ORDER BY 1;
SELECT format('  %s, %s: %s', read, side, data) FROM (
    SELECT d.*, row_number() OVER (PARTITION BY read, side ORDER BY data) AS k FROM d) x
 WHERE k <= 6 ORDER BY read, side, k;
SQL
)
    if [ $? -eq 0 ] && [ -z "$out" ]; then
        ok "$what"
    else
        not_ok "$what"
        echo "$out" | head -120 | diag
    fi
}

run_both test/upgrade/history_1.sql \
    "history, part 1 (January to March 2026), fed to 1.0 through its public API" \
    "history, part 1, fed to a fresh $default_version install"
# what the 1.0 database holds before the update (1.0's own tables: they
# never change, so this reads them directly).  Nothing may compact the
# database meanwhile: a maintenance worker that runs compact_usage() in every
# database would leave no usage uncompacted at the update.
check "before the update: usage compacted and not, kept and dropped metered rows, all ingest paths, invoices with carried and pending adjustments, a correction, audit rows in the catalog chain and account chains" \
    "t|t|t|t|t|t|t|t|t|t" "$(q $A <<'SQL'
SELECT (SELECT count(*) FROM billing.usage_buckets) > 1000,
       (SELECT count(*) FROM billing.usage_deltas) > 0,
       (SELECT count(DISTINCT keep_rows) FROM billing.metered_tables) = 2,
       (SELECT count(*) FROM billing.cumulative_reports) > 0 AND (SELECT count(*) FROM billing.ingest_offsets) = 2,
       (SELECT count(*) FROM billing.invoices) >= 20 AND (SELECT count(DISTINCT currency) FROM billing.invoices) = 3,
       (SELECT count(*) FROM billing.adjustments WHERE billed_invoice_id IS NOT NULL) > 0,
       (SELECT count(*) FROM billing.adjustments WHERE billed_invoice_id IS NULL) > 0,
       (SELECT count(*) FROM billing.usage_corrections) > 0,
       (SELECT count(DISTINCT account_id) FROM billing.audit_log) > 3,
       (SELECT count(*) FROM billing.audit_log WHERE account_id = 0) > 0
SQL
)"

snapshot $A before || { diag <"$work/before.err"; }
check "every read taken before the update ($(wc -l <"$work/before.tsv") rows)" "t" \
    "$(q $CHECK -c "SELECT count(DISTINCT read) > 30 AND bool_and(n > 0) FROM (SELECT read, count(*) n FROM snap WHERE label = 'before' GROUP BY read) r WHERE read !~ '^verify'")"

pg_dump -Fc -d $A -f "$work/a10.dump" 2>"$work/dump10.log" || diag <"$work/dump10.log"

s=$(ms)
q $A -c "ALTER EXTENSION billing UPDATE" >"$work/update_a.log" 2>&1
check "ALTER EXTENSION billing UPDATE of the 1.0 database holding the history" "0" "$?"
echo "# ALTER EXTENSION billing UPDATE with the history: $(( $(ms) - s )) ms"
[ -s "$work/update_a.log" ] && diag <"$work/update_a.log"
check "it is at version $default_version" "$default_version" \
    "$(q $A -c "SELECT extversion FROM pg_extension WHERE extname = 'billing'")"

snapshot $A after || { diag <"$work/after.err"; }
# one line per read: each gives what it gave before the update
skip="$STORE_READS|table billing.audit_heads|table billing.audit_log${CHANGED_READS:+|$CHANGED_READS}"
[ -n "$CHANGED_READS" ] && echo "# changed on purpose by this version, not compared with 1.0: $CHANGED_READS"
q $CHECK -F "$TAB" >"$work/upd.diff" <<SQL
SELECT read, side, data FROM diff('before', 'after', true, '{}', string_to_array('$skip', '|'))
SQL
while IFS= read -r read; do
    bad=$(awk -v r="$read" -F "$TAB" '$1 == r' "$work/upd.diff")
    if [ -z "$bad" ]; then
        ok "after the update, $read gives what it gave before"
    else
        not_ok "after the update, $read gives what it gave before"
        echo "$bad" | awk -F "$TAB" '{print $2 ": " $3}' | sort | head -12 | diag
    fi
done < <(q $CHECK -c "SELECT DISTINCT read FROM snap WHERE label = 'before' AND NOT read = ANY (string_to_array('$skip', '|')) ORDER BY 1")
q $CHECK -c "SELECT format('note: after the update %s has new columns: %s', read, keys) FROM new_keys('before', 'after') ORDER BY 1" | diag
check "after the update, verify_audit_log() returns nothing" "" \
    "$(q $A -c "SELECT * FROM billing.verify_audit_log()")"
check "after the update, every audit row of before is there byte for byte (hashes too)" "" \
    "$(q $CHECK -F ' ' -c "SELECT side, data FROM diff('before', 'after', false, '{}', '{}') WHERE read = 'table billing.audit_log' AND side = 'only in before' LIMIT 5")"

# a dump taken on 1.0 restores into the current version (CREATE EXTENSION
# installs the current version; 1.0's rows load into it)
recreate $D
pg_restore --exit-on-error -d $D "$work/a10.dump" >"$work/restore10.log" 2>&1
check "a pg_dump taken on 1.0 restores into a database of version $default_version" "0|$default_version" \
    "$?|$(q $D -c "SELECT extversion FROM pg_extension WHERE extname = 'billing'")"
[ -s "$work/restore10.log" ] && diag <"$work/restore10.log"
snapshot $D restored-1.0 || { diag <"$work/restored-1.0.err"; }
# a sequence the new version adds (of a table 1.0 did not have) is read
# there, unused: it is no difference from 1.0 (a table the new version adds
# is empty, so it has no rows to read)
new_seqs=$(q $CHECK -c "SELECT string_agg(DISTINCT n.read, '|' ORDER BY n.read) FROM snap n
                         WHERE n.label = 'restored-1.0' AND n.read LIKE 'sequence %'
                           AND (n.data->>'is_called')::boolean IS FALSE
                           AND NOT EXISTS (SELECT 1 FROM snap o WHERE o.label = 'before' AND o.read = n.read)")
[ -n "$new_seqs" ] && echo "# new and unused in the restored 1.0 dump, not compared: $new_seqs"
compare "restored into $default_version, the 1.0 dump reads as 1.0 did (every read, every table but the usage store; new columns and new unused sequences aside)" \
    before restored-1.0 true "" "$STORE_READS${CHANGED_READS:+|$CHANGED_READS}${new_seqs:+|$new_seqs}"

run_both test/upgrade/history_2.sql \
    "history, part 2 (March to May 2026), fed to the updated database" \
    "history, part 2, fed to the fresh install"
snapshots $A updated $B fresh
compare "the updated database, fed the rest of the history, reads as a fresh $default_version install fed all of it (usage, previews, remaining, invoices, lines, adjustments, reconcile, rerate; wall-clock columns aside)" \
    updated fresh false "$CLOCK_KEYS" "$STORE_READS|table billing.audit_heads|table billing.audit_log"
check "after the rest of the history, verify_audit_log() and verify_invoices() return nothing in both" \
    "0|0|0|0" \
    "$(for db in $A $B; do q $db -c "SELECT count(*) FROM billing.verify_audit_log()" -c "SELECT count(*) FROM billing.verify_invoices()"; done | paste -sd'|')"

# pg_dump of the updated database restores into a fresh one
s=$(ms)
if pg_dump -Fc -d $A -f "$work/a.dump" 2>"$work/dump.log"; then
    recreate $C
    pg_restore --exit-on-error -d $C "$work/a.dump" >>"$work/dump.log" 2>&1
fi
check "pg_dump of the updated database restores into a fresh database" "0" "$?"
[ -s "$work/dump.log" ] && diag <"$work/dump.log"
echo "# pg_dump and pg_restore: $(( $(ms) - s )) ms"
check "the restored database is at version $default_version; verify_audit_log() and verify_invoices() return nothing" \
    "$default_version|0|0" \
    "$(q $C -c "SELECT extversion FROM pg_extension WHERE extname = 'billing'" -c "SELECT count(*) FROM billing.verify_audit_log()" -c "SELECT count(*) FROM billing.verify_invoices()" | paste -sd'|')"
snapshot $C restored || { diag <"$work/restored.err"; }
compare "the restored database reads exactly as the updated one (every read, every table but the usage store)" \
    updated restored false "" ""

echo "# upgrade data check: $(( $(ms) - t1 )) ms"

# ---- 3. a 1.0 plan against the period rule (issue 13) ----------------------------------------------
# 1.0 let a plan bill a meter whose bucket width does not divide its period;
# the update keeps it, names it in a WARNING and does not fail.
recreate $WALK
q $WALK -c "CREATE EXTENSION billing VERSION '1.0'" \
    -c "INSERT INTO billing.meters (meter, bucket_width, late_window) VALUES ('hourly', '1 hour', '100 years')" \
    -c "INSERT INTO billing.accounts (account_id) VALUES (1), (2)" \
    -c "INSERT INTO billing.plans (plan, period) VALUES ('ten', '10 minutes')" \
    -c "INSERT INTO billing.charges (plan, meter, price) VALUES ('ten', 'hourly', 'unit 1')" \
    -c "INSERT INTO billing.subscriptions (account_id, plan, starts_at, ends_at) VALUES (1, 'ten', '2026-01-01 00:00:30.5', '2026-01-01 00:30:30.5')" \
    -c "SELECT billing.record(1, 'hourly', 1, '2026-01-01 00:00:45')" >"$work/rule10.log" 2>&1 || diag <"$work/rule10.log"
q $WALK -c "ALTER EXTENSION billing UPDATE" >"$work/rule.log" 2>&1
rc=$?
check "ALTER EXTENSION billing UPDATE of a 1.0 database with a plan against the period rule succeeds and names it in a WARNING" \
    "0|1" "$rc|$(grep -c 'WARNING:  the period "00:10:00" of plan "ten" is not a whole multiple of the bucket width "01:00:00" of meter "hourly"' "$work/rule.log")"
check "that plan still bills (the bucket straddling the start, in the first period) and takes a new price version; a new subscription to it raises 22023" \
    "1|0|ERROR:  22023" \
    "$(q $WALK -c "SELECT quantity FROM billing.invoice_preview(1, '2026-01-01 00:01') WHERE kind = 'usage'")|$(q $WALK -c "INSERT INTO billing.charges (plan, meter, price, valid_from) VALUES ('ten', 'hourly', 'unit 2', '2026-06-01')" >/dev/null 2>&1; echo $?)|$(q $WALK -v VERBOSITY=sqlstate -c "INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (2, 'ten', '2026-01-01')" 2>&1)"
echo "# upgrade: $((n - fails)) passed, $fails failed"
[ "$fails" -eq 0 ]
