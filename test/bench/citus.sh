#!/usr/bin/env bash
# make bench-citus: the same three ingest and read paths on one node and on a
# loopback Citus cluster (a coordinator and two workers on this machine), to
# show what distribution costs per path.  On one machine a cluster is not
# faster: every statement crosses a connection (coordinator to worker) and
# multi-shard writes commit with two-phase commit.
#
#  1. metered COPY of 1M rows (10k Zipf-skewed accounts, 6 meters, one hour;
#     keep_rows = false) into a table distributed by account with billing,
#     then compact_usage() of that load (on the cluster every worker node
#     compacts its own shards, issue 16)
#  2. 10k record() calls from 8 pgbench clients on 100 hot accounts, then a
#     check that none was lost or doubled
#  3. invoice_preview latency (p50, p95) for the hottest account
set -euo pipefail
cd "$(dirname "$0")/../.."
. test/lib.sh
. test/citus/cluster.sh

ensure_packages postgresql-server-dev-$PGVER >/dev/null
build_install
bash test/citus/build_citus.sh

WORK=$(mktemp -d /tmp/billing-bench-citus.XXXXXX)
chmod 755 "$WORK"
trap 'citus_stop; stop_cluster; rm -rf "$WORK"' EXIT
CLUSTER_OPTS="shared_buffers = 256MB
work_mem = 64MB
synchronous_commit = off" start_cluster
CITUS_OPTS="work_mem = 64MB" citus_start 2

SINGLE=(-h "$PGHOST" -p "$PGPORT" -U postgres -d postgres)
CLUSTER=(-h "$CITUS_DIR/sock" -p "$CITUS_COORD_PORT" -U postgres -d postgres)
now=$(date -u +'%Y-%m-%d %H:%M:00+00')

# 1M rows, generated once: accounts Zipf-like (1 + 10000 * u^3), 6 meters
psql -qX "${SINGLE[@]}" -c "SELECT setseed(0.42)" -c "\\copy (SELECT 1 + floor(10000 * pow(random(), 3))::int, (ARRAY['error','span','replay','attachment','profile','monitor'])[1 + floor(random() * 6)::int], 1 + floor(random() * 5)::int, timestamptz '$now' - interval '1 second' * floor(random() * 3600) FROM generate_series(1, 1000000)) TO '$WORK/rows.csv' WITH (FORMAT csv)"
chmod 644 "$WORK/rows.csv"

setup() {   # setup citus-bool psql-args...
    local citus=$1; shift
    psql -qX -v ON_ERROR_STOP=1 "$@" <<SQL >/dev/null
CREATE EXTENSION billing;
$( [ "$citus" = true ] && echo "SELECT count(*) FROM billing.distribute();" )
INSERT INTO billing.meters (meter) VALUES ('error'), ('span'), ('replay'), ('attachment'), ('profile'), ('monitor');
INSERT INTO billing.plans VALUES ('team', '1 month', 'USD');
INSERT INTO billing.charges (plan, meter, price)
SELECT 'team', m, 'graduated 50000 @ 0 | 500000 @ 0.0003 | inf @ 0.0001'
  FROM unnest(ARRAY['error', 'span', 'replay', 'attachment', 'profile', 'monitor']) m;
INSERT INTO billing.charges (plan, meter, price, description) VALUES ('team', NULL, 'flat 26', 'base');
INSERT INTO billing.accounts (account_id) SELECT generate_series(1, 10000);
INSERT INTO billing.subscriptions SELECT a, 'team', date_trunc('month', now()), NULL, NULL
  FROM generate_series(1, 10000) a;
CREATE TABLE events (account_id bigint NOT NULL, meter text NOT NULL, quantity bigint NOT NULL,
                     ts timestamptz NOT NULL);
$( [ "$citus" = true ] && echo "SELECT create_distributed_table('events', 'account_id', colocate_with => 'billing.accounts');" )
SELECT billing.meter_table('events', 'account_id', 'meter', 'quantity', 'ts', keep_rows => false);
-- the same rows into an unmetered table: what COPY itself costs
CREATE TABLE events_plain (LIKE events);
$( [ "$citus" = true ] && echo "SELECT create_distributed_table('events_plain', 'account_id', colocate_with => 'billing.accounts');" )
SQL
}
setup false "${SINGLE[@]}"
setup true "${CLUSTER[@]}"

secs() { python3 -c "import sys; print('%.2f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$@"; }

declare -A R
for target in single cluster; do
    if [ $target = single ]; then args=("${SINGLE[@]}"); else args=("${CLUSTER[@]}"); fi

    # 1. COPY without metering (the transport), then metered COPY
    t=$(date +%s.%N)
    psql -qX -v ON_ERROR_STOP=1 "${args[@]}" -c "\\copy events_plain FROM '$WORK/rows.csv' WITH (FORMAT csv)"
    R[$target.plain]=$(secs "$t" "$(date +%s.%N)")
    t=$(date +%s.%N)
    psql -qX -v ON_ERROR_STOP=1 "${args[@]}" -c "\\copy events FROM '$WORK/rows.csv' WITH (FORMAT csv)"
    R[$target.copy]=$(secs "$t" "$(date +%s.%N)")
    R[$target.copy_total]=$(psql -qXAt "${args[@]}" -c \
        "SELECT sum(quantity) FROM billing.usage_cells WHERE meter <> 'x'")
    # compaction of that load (on the cluster: every node over its own shards)
    t=$(date +%s.%N)
    psql -qX -v ON_ERROR_STOP=1 "${args[@]}" -c "SELECT billing.compact_usage()" >/dev/null
    R[$target.compact]=$(secs "$t" "$(date +%s.%N)")
    R[$target.compact_total]=$(psql -qXAt "${args[@]}" -c \
        "SELECT sum(quantity) FROM billing.usage_cells WHERE meter <> 'x'")

    # 2. record() from 8 clients, hot accounts
    cat >"$WORK/record.sql" <<'EOF'
\set acc random(1, 100)
SELECT billing.record(:acc, 'error', 1, now(), NULL, 'pgbench');
EOF
    pgbench -n "${args[@]}" -c 8 -j 2 -t 1250 -f "$WORK/record.sql" >"$WORK/$target.record" 2>&1
    R[$target.record_tps]=$(sed -n 's/^tps = \([0-9]*\).*/\1/p' "$WORK/$target.record" | head -1)
    R[$target.record_lat]=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$WORK/$target.record")
    R[$target.record_count]=$(psql -qXAt "${args[@]}" -c \
        "SELECT sum(quantity) FROM billing.usage_cells WHERE dimension = 'pgbench'")

    # 3. invoice_preview of the hottest account, one client
    echo "SELECT * FROM billing.invoice_preview(1);" >"$WORK/preview.sql"
    (cd "$WORK" && rm -f pgbench_log.* && pgbench -n "${args[@]}" -c 1 -t 330 -l -f preview.sql >/dev/null 2>&1)
    read -r p50 p95 < <(cat "$WORK"/pgbench_log.* | awk '{print $3}' | tail -n +31 | sort -n |
        awk '{a[NR]=$1} END {printf "%.3f %.3f\n", a[int(NR*0.5)]/1000, a[int(NR*0.95)]/1000}')
    R[$target.preview_p50]=$p50
    R[$target.preview_p95]=$p95
done

ratio() { python3 -c "import sys; print('%.1fx' % (float(sys.argv[1]) / float(sys.argv[2])))" "$@"; }
echo
echo "billing on one node vs a loopback Citus cluster (coordinator + 2 workers, one machine)"
printf '%-44s %14s %14s %10s\n' "path" "one node" "cluster" "overhead"
printf '%-44s %13ss %13ss %10s\n' "plain COPY, 1M rows, no metering (transport)" \
    "${R[single.plain]}" "${R[cluster.plain]}" "$(ratio "${R[cluster.plain]}" "${R[single.plain]}")"
printf '%-44s %13ss %13ss %10s\n' "metered COPY, 1M rows (keep_rows = false)" \
    "${R[single.copy]}" "${R[cluster.copy]}" "$(ratio "${R[cluster.copy]}" "${R[single.copy]}")"
printf '%-44s %13ss %13ss %10s\n' "compact_usage() of that load" \
    "${R[single.compact]}" "${R[cluster.compact]}" "$(ratio "${R[cluster.compact]}" "${R[single.compact]}")"
printf '%-44s %10s tps %10s tps %10s\n' "record(), 8 clients, 10k calls" \
    "${R[single.record_tps]}" "${R[cluster.record_tps]}" "$(ratio "${R[single.record_tps]}" "${R[cluster.record_tps]}")"
printf '%-44s %11s ms %11s ms %10s\n' "record() mean latency" \
    "${R[single.record_lat]}" "${R[cluster.record_lat]}" "$(ratio "${R[cluster.record_lat]}" "${R[single.record_lat]}")"
printf '%-44s %11s ms %11s ms %10s\n' "invoice_preview p50" \
    "${R[single.preview_p50]}" "${R[cluster.preview_p50]}" "$(ratio "${R[cluster.preview_p50]}" "${R[single.preview_p50]}")"
printf '%-44s %11s ms %11s ms %10s\n' "invoice_preview p95" \
    "${R[single.preview_p95]}" "${R[cluster.preview_p95]}" "$(ratio "${R[cluster.preview_p95]}" "${R[single.preview_p95]}")"
echo "counted: COPY ${R[single.copy_total]} / ${R[cluster.copy_total]} units, compacted ${R[single.compact_total]} / ${R[cluster.compact_total]};" \
     "record() ${R[single.record_count]} / ${R[cluster.record_count]} of 10000 (none lost or doubled when both are 10000)"
[ "${R[single.record_count]}" = 10000 ] && [ "${R[cluster.record_count]}" = 10000 ] \
    && [ "${R[single.copy_total]}" = "${R[cluster.copy_total]}" ] \
    && [ "${R[single.compact_total]}" = "${R[cluster.compact_total]}" ] \
    && [ "${R[single.compact_total]}" = "${R[single.copy_total]}" ]
