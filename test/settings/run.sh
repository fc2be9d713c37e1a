#!/usr/bin/env bash
# billing.grace_period set before the billing library is loaded (make test,
# its own section; issue 13 defect 11).  A session that sets it as its first
# statement, postgresql.conf and ALTER DATABASE ... SET hand the value over
# before the library can check it; the test clusters of make test preload
# billing, so this runs on a cluster of its own that does not (and, for
# postgresql.conf, restarts it preloading billing).  Prints one TAP line
# per check ("ok N - ..." / "not ok N - ...").
#
#   - interval syntax ('2 hours', '90 min') as well as units ('1h') are read
#   - a value that cannot be read makes finalize_invoices fail with 22023,
#     never run with the default of 1 hour (1.0 warned and went on), and
#     nothing is written; a good value SET afterwards applies
set -uo pipefail
cd "$(dirname "$0")/../.."
. test/lib.sh

n=0
fails=0
check() {   # check DESCRIPTION EXPECTED ACTUAL
    n=$((n + 1))
    if [ "$2" = "$3" ]; then
        echo "ok $n - $1"
    else
        echo "not ok $n - $1"
        echo "#   expected: $2"
        echo "#   got:      $3"
        fails=$((fails + 1))
    fi
}
# q SQL: a new connection, tuples only, errors as "ERROR <sqlstate>"
q() {
    psql -qXAt -v ON_ERROR_STOP=1 -v VERBOSITY=sqlstate -d settings_test -c "$1" 2>&1 \
        | sed -E 's/^psql:[^:]*:[0-9]+: //; s/^ERROR:  /ERROR /'
}
# qs STATEMENT...: several statements in one new connection, in order
qs() {
    local args=() s
    for s in "$@"; do args+=(-c "$s"); done
    psql -qXAt -v ON_ERROR_STOP=1 -v VERBOSITY=sqlstate -d settings_test "${args[@]}" 2>&1 \
        | sed -E 's/^ERROR:  /ERROR /'
}

trap stop_cluster EXIT
CLUSTER_PRELOAD='' start_cluster || { echo "not ok 1 - a cluster without preloaded billing started"; exit 1; }
psql -qX -d postgres -c "CREATE DATABASE settings_test" >/dev/null
# a daily plan from 2025-01-01: the day ending 2025-01-02 00:00 is final
# from 01:00 with the default grace period, from 02:00 with 2 hours
psql -qX -v ON_ERROR_STOP=1 -d settings_test >/dev/null <<'SQL' || { echo "not ok 1 - fixtures"; exit 1; }
CREATE EXTENSION billing;
INSERT INTO billing.plans (plan, period) VALUES ('daily', '1 day');
INSERT INTO billing.charges (plan, meter, price) VALUES ('daily', NULL, 'flat 1');
INSERT INTO billing.accounts (account_id) VALUES (1);
INSERT INTO billing.subscriptions (account_id, plan, starts_at) VALUES (1, 'daily', '2025-01-01 00:00+00');
SQL

check "a new session does not have the library loaded (so SET cannot check billing.grace_period)" "f" \
    "$(q "SELECT count(*) > 0 FROM pg_catalog.pg_settings WHERE name = 'billing.rounding'")"
check "'2 hours' set first: finalize_invoices uses 2 hours (nothing at 01:59, 1.0 used 1 hour)" "0|2 hours" \
    "$(qs "SET billing.grace_period = '2 hours'" \
          "SELECT count(*) FROM billing.finalize_invoices('2025-01-02 01:59:59+00')" \
          "SHOW billing.grace_period" | paste -sd'|')"
check "'90 min' set first: 1 hour 30 minutes" "01:30:00" \
    "$(qs "SET billing.grace_period = '90 min'" "SELECT billing._grace_period()")"
check "'1h' set first: 1 hour" "01:00:00" \
    "$(qs "SET billing.grace_period = '1h'" "SELECT billing._grace_period()")"
check "'two hours' set first: finalize_invoices fails with 22023 instead of using 1 hour" "ERROR 22023" \
    "$(qs "SET billing.grace_period = 'two hours'" \
          "SELECT count(*) FROM billing.finalize_invoices('2025-01-02 01:30+00')")"
check "'-40d' set first: finalize_invoices fails with 22023" "ERROR 22023" \
    "$(qs "SET billing.grace_period = '-40d'" \
          "SELECT count(*) FROM billing.finalize_invoices('2025-01-02 01:30+00')")"
check "and nothing was finalized" "0" "$(q "SELECT count(*) FROM billing.invoices")"
check "once the library is loaded, SET refuses the bad value itself" "ERROR 22023" \
    "$(qs "SELECT billing.round_money(1, 'USD')" "SET billing.grace_period = 'two hours'" | tail -1)"
check "a good value SET after a bad one applies" "1" \
    "$(psql -qXAt -d settings_test -c "SET billing.grace_period = 'two hours'" \
            -c "SELECT count(*) FROM billing.finalize_invoices('2025-01-02 01:30+00')" \
            -c "SET billing.grace_period = '90 min'" \
            -c "SELECT count(*) FROM billing.finalize_invoices('2025-01-02 01:30+00')" 2>/dev/null | tail -1)"
psql -qX -d postgres -c "ALTER DATABASE settings_test SET billing.grace_period = 'soon'" >/dev/null 2>&1
check "ALTER DATABASE ... SET a bad value: finalize_invoices fails with 22023" "ERROR 22023" \
    "$(q "SELECT count(*) FROM billing.finalize_invoices('2025-01-03 01:30+00')")"
psql -qX -d postgres -c "ALTER DATABASE settings_test RESET billing.grace_period" >/dev/null

# postgresql.conf, read when the server preloads the library at start
cat >>"$CLUSTER_DIR/data/postgresql.conf" <<CONF
shared_preload_libraries = 'billing'
billing.maintenance_interval = '1h'
billing.grace_period = 'two hours'
CONF
as_pg "$PGBIN/pg_ctl" -D "$CLUSTER_DIR/data" -l "$CLUSTER_DIR/server.log" -w -t 60 restart >/dev/null \
    || { cat "$CLUSTER_DIR/server.log"; echo "not ok $((n + 1)) - the server restarted preloading billing"; exit 1; }
check "postgresql.conf with a bad value, billing preloaded: finalize_invoices fails with 22023" "ERROR 22023" \
    "$(q "SELECT count(*) FROM billing.finalize_invoices('2025-01-03 01:30+00')")"
check "and a good value SET in the session applies" "1" \
    "$(qs "SET billing.grace_period = '1h'" \
          "SELECT count(*) FROM billing.finalize_invoices('2025-01-03 01:30+00')" | tail -1)"

echo "# settings checks: $((n - fails)) passed, $fails failed"
[ "$fails" -eq 0 ]
