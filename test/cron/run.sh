#!/usr/bin/env bash
# make test, section "pg_cron": the maintenance recipe for servers that
# cannot preload billing (doc/billing.md, "Maintenance with pg_cron"),
# run as documented on a cluster of its own that preloads pg_cron and not
# billing (billing's own maintenance worker needs billing preloaded, so it
# cannot run here: the two stay independent).
#
# pg_cron lives in database postgres (cron.database_name); billing in
# database billing_cron.  A role in billing_admin (billing_maint) runs
# billing.compact_usage() and billing.purge_dedupe() every minute through
# cron.schedule_in_database, and a role outside it fails to.  The test
# waits for the next minute boundary (at most about a minute; make test
# runs this section in the background, beside the others), then checks in
# cron.job_run_details that the jobs ran and succeeded, and that their
# effect shows through the public API: nothing is left to compact, usage
# reads the same, and an expired event id counts again once purged.
#
# Prints one TAP line per check.  Needs postgresql-15-cron (make test
# installs it; when PG_CONFIG is a private copy of PostgreSQL, its files
# are copied into the copy).
set -uo pipefail
cd "$(dirname "$0")/../.."
. test/lib.sh

n=0
fails=0
check() {   # check DESCRIPTION EXPECTED ACTUAL
    if [ "$2" = "$3" ]; then
        ok "$1"
    else
        not_ok "$1"
        diff <(echo "$2") <(echo "$3") | head -20 | sed 's/^/#   /'
    fi
}
q() { local db=$1; shift; timeout 120 psql -X -q -At -v ON_ERROR_STOP=1 -d "$db" "$@"; }

copy_package_into_pg postgresql-$PGVER-cron
if [ ! -f "$("$PG_CONFIG" --pkglibdir)/pg_cron.so" ]; then
    not_ok "pg_cron is installed (postgresql-$PGVER-cron)"
    exit 1
fi

# a cluster of its own: pg_cron preloaded, jobs in background workers (no
# connection settings needed), billing not preloaded
CLUSTER_OPTS="shared_preload_libraries = 'pg_cron'
cron.database_name = 'postgres'
cron.use_background_workers = on
max_worker_processes = 16
log_min_messages = warning" start_cluster || { not_ok "a cluster with pg_cron preloaded starts"; exit 1; }
trap stop_cluster EXIT
start=$(date +%s)

q postgres >/dev/null 2>&1 <<'SQL'
SET client_min_messages = warning;
DROP DATABASE IF EXISTS billing_cron;
CREATE DATABASE billing_cron;
SQL
out=$(q billing_cron 2>&1 <<'SQL'
SET client_min_messages = warning;
CREATE EXTENSION billing;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'billing_maint') THEN
        CREATE ROLE billing_maint LOGIN IN ROLE billing_admin;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cron_outsider') THEN
        CREATE ROLE cron_outsider LOGIN;
    END IF;
END $$;
-- reports are accepted and event ids kept 1 second on this meter, so that
-- purging shows at once
INSERT INTO billing.meters (meter, late_window, dedupe_window) VALUES ('c_events', '1 second', '1 second');
INSERT INTO billing.accounts (account_id) VALUES (1);
SELECT count(*) FILTER (WHERE billing.record(1, 'c_events', 2, now(), 'e-' || g))
  FROM generate_series(1, 50) g;
SELECT billing.record(1, 'c_events', 2, now(), 'e-1');                 -- a duplicate
SQL
)
check "billing in a database of its own: 50 reports counted, a repeated id not" "$(printf '50\nf')" "$out"
usage_before=$(q billing_cron -c "SELECT quantity, events FROM billing.usage(1, now() - interval '1 day', now() + interval '1 day', '1 day')")
check "usage reads 100 units from 50 reports" "100|50" "$usage_before"
sleep 2     # the ids' dedupe window (1 second) ends before any job runs
# an id is also kept until no report with its timestamp can be accepted (the
# late window, 1 second, plus the 5 minutes a report may be stamped ahead):
# the claims are made to look 6 minutes old, so that the first run purges them
q billing_cron -c "UPDATE billing.dedupe_keys SET expires_at = expires_at - interval '6 minutes'" >/dev/null

out=$(q postgres 2>&1 <<'SQL'
SET client_min_messages = warning;
CREATE EXTENSION pg_cron;
-- the recipe (doc/billing.md): as a superuser, in the database of pg_cron
SELECT cron.schedule_in_database('billing-compact', '* * * * *',
                                 'SELECT billing.compact_usage()', 'billing_cron', 'billing_maint') > 0;
SELECT cron.schedule_in_database('billing-purge-dedupe', '* * * * *',
                                 'SELECT billing.purge_dedupe()', 'billing_cron', 'billing_maint') > 0;
-- the same job as a role outside billing_admin must fail
SELECT cron.schedule_in_database('outsider-compact', '* * * * *',
                                 'SELECT billing.compact_usage()', 'billing_cron', 'cron_outsider') > 0;
SQL
)
check "pg_cron schedules compaction and purging in the billing database under billing_maint" \
    "$(printf 't\nt\nt')" "$out"

# wait for the jobs' first run (the next minute boundary)
done_jobs=0
for _ in $(seq 1 150); do
    done_jobs=$(q postgres -c "SELECT count(DISTINCT jobid) FROM cron.job_run_details WHERE status IN ('succeeded', 'failed')" 2>/dev/null)
    [ "${done_jobs:-0}" -ge 3 ] && break
    sleep 1
done
echo "# waited $(( $(date +%s) - start )) s for the jobs' first run (the next minute boundary)"

check "both jobs ran in billing_cron as billing_maint and succeeded" \
    "$(printf 'billing-compact|billing_cron|billing_maint|succeeded\nbilling-purge-dedupe|billing_cron|billing_maint|succeeded')" \
    "$(q postgres -c "SELECT DISTINCT ON (j.jobname) j.jobname, d.database, d.username, d.status FROM cron.job j JOIN cron.job_run_details d USING (jobid) WHERE j.jobname LIKE 'billing-%' ORDER BY j.jobname, d.start_time")"
check "the job of a role outside billing_admin failed: permission denied" "failed|t" \
    "$(q postgres -c "SELECT d.status, d.return_message LIKE '%permission denied%' FROM cron.job j JOIN cron.job_run_details d USING (jobid) WHERE j.jobname = 'outsider-compact' ORDER BY d.start_time LIMIT 1")"
check "compaction ran: nothing is left to compact, and usage reads the same" "0
$usage_before" \
    "$(q billing_cron -c "SELECT billing.compact_usage()" -c "SELECT quantity, events FROM billing.usage(1, now() - interval '1 day', now() + interval '1 day', '1 day')")"
check "purging ran: the expired id e-1 counts again, and purging by hand finds nothing more" "t
0" \
    "$(q billing_cron -c "SELECT billing.record(1, 'c_events', 2, now(), 'e-1')" -c "SELECT billing.purge_dedupe(now() - interval '1 minute')")"

q postgres -c "SELECT count(cron.unschedule(jobid)) FROM cron.job" >/dev/null 2>&1
echo "# pg_cron: $((n - fails)) passed, $fails failed ($(( $(date +%s) - start )) s)"
[ "$fails" -eq 0 ]
