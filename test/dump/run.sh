#!/usr/bin/env bash
# pg_dump round trip (make test, section 4): a database with billing data
# -- meters, accounts, plans, usage through every ingest path, finalized
# invoices, a correction, a retroactive price change re-rated into
# adjustments carried by a later invoice, a table of the user's audited per
# account (billing.audit_table), and their audit rows -- is dumped
# (plain and custom format) and restored into fresh databases, where
# CREATE EXTENSION runs from the dump.  The restored databases must hold
# the same usage, invoices, adjustments and audit log, verify, and go on
# working (dedupe, offsets, metered tables, the audited table, the audit
# chains).
# Prints one TAP line per check; runs against the cluster of
# test/run_tests.sh (PGHOST, PGPORT set).
set -uo pipefail
cd "$(dirname "$0")/../.."
. test/lib.sh

SRC=billing_dump_src
work=$(mktemp -d /tmp/billing-dump.XXXXXX)
chmod 755 "$work"
n=0
fails=0
trap 'rm -rf "$work"' EXIT

check() {   # check DESCRIPTION EXPECTED ACTUAL
    n=$((n + 1))
    if [ "$2" = "$3" ]; then
        echo "ok $n - $1"
    else
        echo "not ok $n - $1"
        diff <(echo "$2") <(echo "$3") | head -20 | sed 's/^/#   /'
        fails=$((fails + 1))
    fi
}

q() { local db=$1; shift; timeout 120 psql -X -q -At -v ON_ERROR_STOP=1 -d "$db" "$@"; }

recreate() {
    psql -X -q -d postgres -c "SET client_min_messages = warning" \
        -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >/dev/null
}

recreate $SRC
q $SRC >"$work/scenario.log" 2>&1 <<'SQL'
SET client_min_messages = warning;
CREATE EXTENSION billing;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dump_admin') THEN
        CREATE ROLE dump_admin NOLOGIN IN ROLE billing_admin;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dump_writer') THEN
        CREATE ROLE dump_writer NOLOGIN IN ROLE billing_writer;
    END IF;
END $$;
-- fixed dates (the meters accept reports 100 years late): what is finalized
-- does not depend on the time of day
CREATE TABLE d0 AS SELECT timestamptz '2025-03-09 00:00+00' AS d0;
GRANT SELECT ON d0 TO PUBLIC;
CREATE TABLE public.d_outcomes (org bigint, category text, quantity numeric, received timestamptz,
                                event_id text);
ALTER TABLE public.d_outcomes OWNER TO dump_admin;
CREATE TABLE public.d_contracts (account_id bigint NOT NULL, contract_id bigint NOT NULL,
                                 amount numeric NOT NULL, PRIMARY KEY (account_id, contract_id));
ALTER TABLE public.d_contracts OWNER TO dump_admin;

SET ROLE dump_admin;
INSERT INTO billing.meters (meter, aggregation, late_window) VALUES
    ('d_events', 'sum', '100 years'), ('d_peak', 'max', '100 years'), ('d_last', 'last', '100 years'),
    ('d_calls', 'count', '100 years');
INSERT INTO billing.accounts (account_id, currency, name) VALUES
    (1, 'USD', 'one'), (2, 'USD', 'two'), (3, 'USD', 'three'), (4, 'EUR', 'vier');
INSERT INTO billing.plans (plan, period, currency) VALUES
    ('d_daily', '1 day', 'USD'), ('d_eur', '1 day', 'EUR');
INSERT INTO billing.charges (plan, meter, price, description) VALUES
    ('d_daily', 'd_events', 'graduated 10 @ 0 | 100 @ 0.5 | inf @ 0.25', NULL),
    ('d_daily', 'd_peak', 'unit 1.5', NULL),
    ('d_daily', 'd_last', 'unit 0.1', NULL),
    ('d_daily', 'd_calls', 'package 10 @ 1', NULL),
    ('d_daily', NULL, 'flat 5', 'platform fee'),
    ('d_eur', 'd_events', 'unit 0.3333', NULL);
INSERT INTO billing.subscriptions (account_id, plan, starts_at, spend_cap)
SELECT a, CASE WHEN a = 4 THEN 'd_eur' ELSE 'd_daily' END, d0, CASE WHEN a = 3 THEN 20 END
  FROM generate_series(1, 4) a, d0;
UPDATE billing.accounts SET name = 'one, renamed' WHERE account_id = 1;
-- a metered table owned by the admin, fed by the writer
SELECT billing.meter_table('public.d_outcomes', 'org', 'category', 'quantity', 'received', 'event_id');
GRANT INSERT ON public.d_outcomes TO dump_writer;
-- a table of the user's, audited per account
SELECT billing.audit_table('public.d_contracts', 'account_id');
GRANT SELECT, INSERT, UPDATE, DELETE ON public.d_contracts TO dump_writer;
RESET ROLE;

SET ROLE dump_writer;
SELECT count(billing.record(1 + g % 4, (ARRAY['d_events', 'd_peak', 'd_last', 'd_calls'])[1 + g % 4],
                            g % 17, d0 + (g % 4000) * interval '1 minute', 'r-' || g))
  FROM generate_series(1, 3000) g, d0;
SELECT count(billing.record(1 + g % 4, 'd_events', 1, d0 + (g % 4000) * interval '1 minute', 'r-' || g))
  FROM generate_series(1, 500) g, d0;                                -- repeats
SELECT * FROM billing.ingest('d_src', 0, 1, ARRAY[1, 2, 3, 4]::bigint[],
                             ARRAY['d_events', 'd_events', 'd_events', 'd_events'],
                             ARRAY[7, 8, 9, 10]::numeric[],
                             (SELECT array_fill(d0 + interval '1 day 1 hour', ARRAY[4]) FROM d0));
SELECT billing.report_cumulative('d_collector', 2, 'd_events', d0 + interval '2 days', 40) FROM d0;
INSERT INTO public.d_outcomes
SELECT 1 + g % 4, 'd_events', 2, d0 + (g % 3000) * interval '1 minute', 'o-' || g
  FROM generate_series(1, 2000) g, d0;
INSERT INTO public.d_contracts SELECT 1 + g % 4, g, g * 10 FROM generate_series(1, 40) g;
UPDATE public.d_contracts SET amount = amount + 1 WHERE contract_id % 5 = 0;
DELETE FROM public.d_contracts WHERE contract_id = 40;
RESET ROLE;

SET ROLE dump_admin;
SELECT billing.compact_usage();
RESET ROLE;
SET ROLE dump_writer;
SELECT count(billing.record(2, 'd_events', 3, d0 + interval '2 hours', 'late-' || g))
  FROM generate_series(1, 20) g, d0;                                 -- deltas left uncompacted
RESET ROLE;

SET ROLE dump_admin;
SELECT count(*) FROM d0, billing.finalize_invoices(d0 + interval '3 days 1 hour');
SELECT billing.correct_usage(1, 'd_events', d0 + interval '1 hour', 25, 'missed batch') FROM d0;
INSERT INTO billing.charges (plan, meter, price, valid_from)
SELECT 'd_daily', 'd_events', 'graduated 10 @ 0 | 100 @ 0.4 | inf @ 0.2', d0 FROM d0;
SELECT count(*) FROM d0, billing.rerate(d0, d0 + interval '3 days', reason => 'price cut, backdated');
SELECT count(*) FROM d0, billing.finalize_invoices(d0 + interval '4 days 2 hours');
RESET ROLE;
SQL
[ $? -eq 0 ] || { echo "not ok 1 - the scenario ran"; sed 's/^/#   /' "$work/scenario.log"; exit 1; }

check "the scenario finalized invoices, re-rated into adjustments and carried them" "t|t|t" \
    "$(q $SRC -c "SELECT (SELECT count(*) FROM billing.invoices) >= 12, (SELECT count(*) FROM billing.adjustments) > 0, (SELECT bool_and(billed_invoice_id IS NOT NULL) FROM billing.adjustments)")"
check "every table and sequence of the extension is registered with pg_extension_config_dump" "" \
    "$(q $SRC -c "SELECT c.oid::regclass FROM pg_depend d JOIN pg_class c ON c.oid = d.objid AND d.classid = 'pg_class'::regclass JOIN pg_extension e ON e.oid = d.refobjid WHERE e.extname = 'billing' AND d.deptype = 'e' AND c.relkind IN ('r', 'p', 'S') AND NOT c.oid = ANY (e.extconfig) ORDER BY 1")"

# what must survive, as text
snapshot() {
    q "$1" <<'SQL'
SET TimeZone = 'UTC';
SELECT 'usage', a.account_id, u.* FROM billing.accounts a, d0,
       billing.usage(a.account_id, d0 - interval '1 day', now() + interval '1 day') u ORDER BY 2, 3, 4, 5;
SELECT 'usage/day', a.account_id, u.* FROM billing.accounts a, d0,
       billing.usage(a.account_id, d0 - interval '1 day', now() + interval '1 day', '1 day') u ORDER BY 2, 3, 4, 5;
SELECT 'invoice', i.* FROM billing.invoices i ORDER BY account_id, invoice_id;
SELECT 'line', l.* FROM billing.invoice_lines l ORDER BY account_id, invoice_id, line_no;
SELECT 'adjustment', j.* FROM billing.adjustments j ORDER BY account_id, adjustment_id;
SELECT 'correction', c.* FROM billing.usage_corrections c ORDER BY account_id, correction_id;
SELECT 'preview', a.account_id, p.* FROM billing.accounts a, billing.invoice_preview(a.account_id) p ORDER BY 2, 3;
SELECT 'audit', l.* FROM billing.audit_log l ORDER BY account_id, seq;
SELECT 'head', h.* FROM billing.audit_heads h ORDER BY account_id;
SELECT 'charge', c.* FROM billing.charges c ORDER BY charge_id;
SELECT 'subscription', s.* FROM billing.subscriptions s ORDER BY account_id, starts_at;
SELECT 'keys', count(*), md5(string_agg(account_id || meter || event_id || expires_at, ',' ORDER BY account_id, meter, event_id)) FROM billing.dedupe_keys;
SELECT 'offsets', o.source, o.partition, o.last_offset FROM billing.ingest_offsets o ORDER BY 2, 3;
SELECT 'cumulative', c.* FROM billing.cumulative_reports c ORDER BY 2, 3, 4, 5, 6;
SELECT 'metered', m.* FROM billing.metered_tables m ORDER BY 2;
SELECT 'outcomes', count(*) FROM public.d_outcomes;
SELECT 'audited', a.tbl, a.account_column FROM billing.audited_tables a ORDER BY 2;
SELECT 'contracts', count(*), sum(amount) FROM public.d_contracts;
SELECT 'seq', s.relname, pg_sequence_last_value(s.oid) FROM pg_class s
 WHERE s.relnamespace = 'billing'::regnamespace AND s.relkind = 'S' ORDER BY 2;
SQL
}
snapshot $SRC >"$work/src.txt" || echo "# snapshot of $SRC failed"
check "the snapshot covers usage, invoices, adjustments, the audited table and the audit log" "t" \
    "$(awk -F'|' '{k[$1]++} END {print (k["usage"] > 0 && k["invoice"] >= 12 && k["line"] > 0 && k["adjustment"] > 0 && k["audit"] > 0 && k["preview"] > 0 && k["audited"] == 1) ? "t" : "f"}' "$work/src.txt")"
check "the audited table's changes are in the audit log" "t" \
    "$(grep -c '^audit|.*|public.d_contracts|' "$work/src.txt" | awk '{print ($1 == 49) ? "t" : "f"}')"

pg_dump -d $SRC -f "$work/plain.sql" && pg_dump -d $SRC -Fc -f "$work/custom.dump"
check "pg_dump (plain and custom format)" 0 $?

for fmt in plain custom; do
    dst=billing_dump_$fmt
    recreate $dst
    if [ $fmt = plain ]; then
        psql -X -q -v ON_ERROR_STOP=1 -d $dst -f "$work/plain.sql" >"$work/restore_$fmt.log" 2>&1
    else
        pg_restore --exit-on-error -d $dst "$work/custom.dump" >"$work/restore_$fmt.log" 2>&1
    fi
    rc=$?
    check "$fmt: the dump restores into a fresh database without an error" 0 "$rc"
    [ $rc -eq 0 ] || sed 's/^/#   /' "$work/restore_$fmt.log" | head -20
    snapshot $dst >"$work/$fmt.txt"
    for what in usage usage/day invoice line adjustment correction preview audit head charge \
                subscription keys offsets cumulative metered outcomes audited contracts seq; do
        check "$fmt: $what identical after the restore" \
            "$(grep "^$what|" "$work/src.txt")" "$(grep "^$what|" "$work/$fmt.txt")"
    done
    check "$fmt: verify_audit_log() returns nothing" "" "$(q $dst -c "SELECT * FROM billing.verify_audit_log()")"
    check "$fmt: verify_invoices() returns nothing" "" "$(q $dst -c "SELECT * FROM billing.verify_invoices()")"
    check "$fmt: the restore wrote no audit row of its own" \
        "$(grep -c '^audit|' "$work/src.txt")" "$(q $dst -c "SELECT count(*) FROM billing.audit_log")"

    # it goes on working: dedupe, offsets, metered tables, ids, the audit chains
    out=$(q $dst <<'SQL'
SET ROLE dump_writer;
SELECT billing.record(1, 'd_events', 1, d0 + interval '1 minute', 'r-4') FROM d0;
SELECT already_applied FROM billing.ingest('d_src', 0, 1, ARRAY[1]::bigint[], ARRAY['d_events'],
                                           ARRAY[1]::numeric[], ARRAY[now()]);
INSERT INTO public.d_outcomes VALUES (1, 'd_events', 2, now(), 'o-4'), (1, 'd_events', 5, now(), 'o-new');
INSERT INTO public.d_contracts VALUES (1, 100, 5);
RESET ROLE;
SELECT count(*) FROM billing.audit_log
 WHERE object = 'public.d_contracts' AND details -> 'key' @> '{"contract_id": 100}';
SELECT count(*) FROM public.d_outcomes WHERE event_id IN ('o-4', 'o-new');
SELECT sum(quantity) FROM billing.usage_cells WHERE account_id = 1 AND bucket_start >= date_trunc('minute', now()) - interval '1 minute';
SET ROLE dump_admin;
INSERT INTO billing.charges (plan, meter, price, valid_from) VALUES ('d_daily', 'd_peak', 'unit 2', now());
UPDATE billing.accounts SET name = 'two, renamed' WHERE account_id = 2;
RESET ROLE;
SELECT count(*) FROM billing.verify_audit_log();
SQL
)
    check "$fmt: after the restore a repeated event id is a duplicate, an applied offset is applied, the metered table counts new rows once, the audited table is audited, charge ids and the audit chains go on" \
        "$(printf 'f\nt\n1\n2\n5\n0')" "$out"
done

# CREATE EXTENSION by a non-superuser: refused (trusted = false, see doc/billing.md, Guarantees)
recreate billing_dump_owner
psql -X -q -d postgres -c "DROP ROLE IF EXISTS dump_dbowner" -c "CREATE ROLE dump_dbowner LOGIN" \
    -c "ALTER DATABASE billing_dump_owner OWNER TO dump_dbowner" >/dev/null 2>&1
check "a non-superuser database owner cannot CREATE EXTENSION billing (42501)" 42501 \
    "$(psql -X -q -At -U dump_dbowner -d billing_dump_owner -c '\set VERBOSITY sqlstate' -c 'CREATE EXTENSION billing' 2>&1 | grep -oE '[0-9A-Z]{5}$')"

for db in $SRC billing_dump_plain billing_dump_custom billing_dump_owner; do
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null
done
psql -X -q -d postgres -c "DROP ROLE IF EXISTS dump_dbowner" -c "DROP ROLE IF EXISTS dump_admin" \
    -c "DROP ROLE IF EXISTS dump_writer" >/dev/null
echo "# pg_dump round trip: $((n - fails)) passed, $fails failed"
[ "$fails" -eq 0 ]
