#!/bin/bash
# callgrind_paths.sh: instructions (callgrind Ir) the backend spends on each
# main path of billing, for one or more installed builds, so that a change
# that must not slow anything down (a refactoring, a split) can be checked
# on a shared, loaded machine where wall-clock timings move by 10-30%.
#
#   bash test/bench/callgrind_paths.sh BINDIR [BINDIR...]
#
# Each BINDIR is the bin directory of a PostgreSQL 15 installation with the
# billing build to measure installed (e.g. private copies made with
# `make install` under different PG_CONFIGs).  For each one it initdbs a
# cluster in /tmp, loads 50k generated usage rows (minute buckets, 2,000
# accounts, 6 meters, a graduated plan) and then runs every path in its own
# single-user backend under valgrind --tool=callgrind, on a copy of the same
# data directory: metered COPY (keep_rows false), COPY with event-id dedupe,
# 40 invoice previews, 2,000 record() calls, rate() over 200k quantities, an
# ingest() batch of 20k events, 4 ingest() batches of 5k events without
# event ids, finalize_invoices for 2,000 accounts, the
# same followed by a past price change and rerate, and a second COPY with
# compact_usage().  It prints one CSV line per path and build: the
# instructions of the session minus those of a session running SELECT 1.
# CG_ONLY="path ..." measures only the paths named.  Run as root (the
# clusters run as postgres).  Not part of make test.
set -uo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "valgrind is needed" >&2; exit 1; }

measure_build() {
B=$1
W=$(mktemp -d /tmp/billing-cg.XXXXXX); chown postgres: $W
D=$W/data
runuser -u postgres -- $B/initdb -D $D -U postgres --auth=trust --no-sync -E UTF8 --locale=C.UTF-8 >/dev/null
echo "fsync = off" >> $D/postgresql.conf
single() { runuser -u postgres -- $B/postgres --single -D $D -j bench; }
# setup: a database, the raw rows, then per measured path a fresh state from a template
echo "CREATE DATABASE bench;" | runuser -u postgres -- $B/postgres --single -D $D postgres >/dev/null 2>&1
single >/dev/null 2>&1 <<SQL
ALTER DATABASE bench SET timezone = 'UTC';
;
CREATE EXTENSION billing;
;
SELECT setseed(0.42);
;
CREATE TABLE raw AS SELECT (1 + floor(random() * 2000))::bigint AS account_id, (ARRAY['error','span','replay','attachment','profile','monitor'])[1 + floor(random() * 6)::int] AS meter, CASE WHEN random() < 0.9 THEN 1::numeric ELSE (1 + floor(random() * 1000))::numeric END AS quantity, timestamptz '2025-03-12 09:00 UTC' + random() * interval '1 hour' AS ts, md5(i::text) AS event_id FROM generate_series(1, 50000) i;
;
COPY raw TO '$W/raw.tsv';
;
COPY (SELECT account_id, meter, quantity, ts FROM raw) TO '$W/raw4.tsv';
;
INSERT INTO billing.meters (meter, aggregation, bucket_width, late_window) SELECT m, 'sum', interval '1 minute', interval '100 years' FROM unnest(ARRAY['error','span','replay','attachment','profile','monitor']) m;
;
INSERT INTO billing.accounts (account_id, currency) SELECT generate_series(1, 2000), 'USD';
;
INSERT INTO billing.plans VALUES ('team', '1 month', 'USD');
;
INSERT INTO billing.charges (plan, meter, price, valid_from, description) SELECT 'team', m, 'graduated 50000 @ 0 | 500000 @ 0.0003 | 5000000 @ 0.0002 | inf @ 0.0001', '-infinity', m FROM unnest(ARRAY['error','span','replay','attachment','profile','monitor']) m;
;
INSERT INTO billing.subscriptions (account_id, plan, starts_at) SELECT a, 'team', '2025-03-01' FROM generate_series(1, 2000) a;
;
CREATE TABLE t (account_id bigint, meter text, quantity numeric, ts timestamptz);
;
CREATE TABLE u (account_id bigint, meter text, quantity numeric, ts timestamptz, event_id text);
;
SELECT billing.meter_table('t', 'account_id', 'meter', 'quantity', 'ts', keep_rows => false);
;
SELECT billing.meter_table('u', 'account_id', 'meter', 'quantity', 'ts', event_id_column => 'event_id', keep_rows => false);
;
CREATE TABLE r AS SELECT * FROM raw LIMIT 20000;
;
SQL
# the state for the reads: one load compacted
single >/dev/null 2>&1 <<SQL
COPY t FROM '$W/raw4.tsv';
;
SELECT billing.compact_usage();
;
SQL
cp -a $D $W/base
# cg LABEL SQL: "LABEL,Ir" of a single-user session running SQL on a copy of base
# (path LABEL SQL: the same less the baseline session)
cg() {
  rm -rf $D; cp -a $W/base $D
  printf '%s\n;\n' "$2" | runuser -u postgres -- valgrind --tool=callgrind --callgrind-out-file=$W/cg.$1 $B/postgres --single -D $D -j bench >/dev/null 2>$W/vg.$1
  if grep -q 'ERROR:' $W/vg.$1; then
    echo "$1,error: $(grep -m1 'ERROR:' $W/vg.$1)" >&2; echo "$1,NaN"
  else
    echo "$1,$(grep -o 'refs: *[0-9,]*' $W/vg.$1 | tr -dc 0-9)"
  fi
}
base=$(cg baseline "SELECT 1;" | cut -d, -f2)
path() {
  [ -n "${CG_ONLY:-}" ] && [[ " $CG_ONLY " != *" $1 "* ]] && return
  cg "$@" | awk -F, -v b="$base" -v d="$B" '{ printf "%s,%s,%.0f\n", d, $1, $2 - b }'
}
path copy_keep_false "COPY t FROM '$W/raw4.tsv';"
path copy_dedupe "COPY u FROM '$W/raw.tsv';"
path preview "SELECT count(*) FROM generate_series(1, 40) i, LATERAL billing.invoice_preview(1 + i, '2025-03-20');"
path record_2000 "DO \$\$ BEGIN FOR i IN 1..2000 LOOP PERFORM billing.record(1 + i % 50, 'error', 1, timestamptz '2025-03-12 09:30 UTC'); END LOOP; END \$\$;"
path rate_200k "SELECT sum(billing.rate('graduated 5000 @ 0 | 100000 @ 0.00029 | 1000000 @ 0.0002 | inf @ 0.0001 + 10', (g % 2000000)::numeric)) FROM generate_series(1, 200000) g;"
path ingest_20k "SELECT * FROM billing.ingest('src', 0, 1, (SELECT array_agg(account_id) FROM r), (SELECT array_agg(meter) FROM r), (SELECT array_agg(quantity) FROM r), (SELECT array_agg(ts) FROM r), (SELECT array_agg(event_id) FROM r));"
# ingest_4x5k: what a client sending batches does: 4 ingest() calls of 5k
# events without event ids, each its own transaction, in one session
batch() { echo "SELECT * FROM billing.ingest('b', 0, $1, (SELECT array_agg(account_id) FROM (SELECT account_id FROM r LIMIT 5000 OFFSET $2) s), (SELECT array_agg(meter) FROM (SELECT meter FROM r LIMIT 5000 OFFSET $2) s), (SELECT array_agg(quantity) FROM (SELECT quantity FROM r LIMIT 5000 OFFSET $2) s), (SELECT array_agg(ts) FROM (SELECT ts FROM r LIMIT 5000 OFFSET $2) s));"; }
path ingest_4x5k "$(batch 1 0)
;

$(batch 2 5000)
;

$(batch 3 10000)
;

$(batch 4 15000)"
path finalize "SELECT billing.finalize_invoices('2025-04-02');"
path finalize_rerate "SELECT billing.finalize_invoices('2025-04-02'); INSERT INTO billing.charges (plan, meter, price, valid_from, description) VALUES ('team', 'error', 'unit 0.001', '2025-03-01', 'error'); SELECT count(*) FROM billing.rerate('2025-03-01', '2025-04-01');"
path compact "COPY t FROM '$W/raw4.tsv'; SELECT billing.compact_usage();"
rm -rf "$W"
}

echo "build,path,instructions"
for b in "$@"; do measure_build "$b"; done
