#!/usr/bin/env bash
# make demo: build and install billing, start a throwaway cluster, run the
# usage-billing scenario in test/demo.sql and print what it shows, then stop
# the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
. test/lib.sh

ensure_packages postgresql-server-dev-$PGVER
build_install
trap stop_cluster EXIT
start_cluster
psql -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE billing_demo" >/dev/null
psql -X -q -v ON_ERROR_STOP=1 -d billing_demo -f test/demo.sql
