#!/usr/bin/env bash
# The documentation as a test (make test, its own section; issue 20): every
# ```sql example of README.md and doc/billing.md runs, top to bottom, on a
# fresh database of a cluster of its own (it preloads billing, as make
# test's clusters do, with the maintenance worker's interval at 1h, so no
# worker runs during it), and its output must be the output block the doc
# shows under it.  test/doc/doctest.pl says how a file is read.  Prints one
# TAP line per example.
#
#   bash test/doc/run.sh                 # after make install
#   DOCTEST_ACCEPT=1 bash test/doc/run.sh   # also write README.md.out, doc/billing.md.out
set -uo pipefail
cd "$(dirname "$0")/../.."
. test/lib.sh

export PGPORT_TEST=$((51000 + RANDOM % 900))
start_cluster || { echo "not ok 1 - the cluster started"; exit 1; }
trap stop_cluster EXIT

perl test/doc/doctest.pl ${DOCTEST_ACCEPT:+--accept} README.md=quickstart --cover doc/billing.md=shop
