# Shell functions for a loopback Citus cluster: a coordinator and N workers
# on 127.0.0.1, each a throwaway data directory, run as the "postgres" OS
# user (through runuser when root).  Source after test/lib.sh.  Every node
# preloads citus (first, as it requires) and billing, whose maintenance
# worker runs on every node with the interval of start_cluster (1h unless
# MAINTENANCE_INTERVAL says otherwise; see test/lib.sh).
#
#   citus_start N     start a coordinator and N workers; sets CITUS_DIR,
#                     CITUS_COORD_PORT and CITUS_WORKER_PORTS
#   citus_db DB       make database DB (created unless postgres) a Citus
#                     database on every node
#   citus_psql PORT   psql to one node (extra args follow)
#   citus_stop        stop every node and remove the directories

CITUS_DIR=
CITUS_COORD_PORT=
CITUS_WORKER_PORTS=()

# citus_node NAME PORT: initdb and start one node
citus_node() {
    local name=$1 port=$2 d=$CITUS_DIR/$1
    as_pg "$PGBIN/initdb" -D "$d" -U postgres --auth=trust --no-sync -E UTF8 \
        --locale=C.UTF-8 >"$CITUS_DIR/$name.initdb.log" 2>&1 \
        || { cat "$CITUS_DIR/$name.initdb.log"; return 1; }
    cat >>"$d/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$CITUS_DIR/sock'
port = $port
shared_preload_libraries = 'citus,billing'
billing.maintenance_interval = '${MAINTENANCE_INTERVAL:-1h}'
max_connections = 100
max_prepared_transactions = 100
# a Citus maintenance daemon per Citus database and a billing maintenance
# worker per billing database (8, the default, runs out with a few databases)
max_worker_processes = 32
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 128MB
log_min_messages = warning
citus.log_remote_commands = off
${CITUS_OPTS:-}
CONF
    as_pg "$PGBIN/pg_ctl" -D "$d" -l "$CITUS_DIR/$name.log" -w -t 60 start >/dev/null \
        || { cat "$CITUS_DIR/$name.log"; return 1; }
}

citus_psql() {
    local port=$1; shift
    psql -X -v ON_ERROR_STOP=1 -h "$CITUS_DIR/sock" -p "$port" -U postgres "$@"
}

# citus_start N [DB]: a coordinator and N workers, and database DB
# (default postgres) made a Citus database (citus_db)
citus_start() {
    local n=$1 db=${2:-postgres} base i
    CITUS_DIR=$(mktemp -d /tmp/billing-citus.XXXXXX)
    chmod 755 "$CITUS_DIR"
    [ "$(id -u)" = 0 ] && chown postgres: "$CITUS_DIR"
    as_pg mkdir -p "$CITUS_DIR/sock"
    base=${CITUS_BASE_PORT:-$((55000 + (RANDOM % 200) * 4))}
    CITUS_COORD_PORT=$base
    CITUS_WORKER_PORTS=()
    citus_node coord "$base" || return 1
    for i in $(seq 1 "$n"); do
        CITUS_WORKER_PORTS+=($((base + i)))
        citus_node "worker$i" $((base + i)) || return 1
    done
    citus_db "$db"
}

# citus_db DB: make DB a Citus database on every node (created first unless
# it is postgres): CREATE EXTENSION citus on each node (before
# citus_add_node), the coordinator and the workers added
citus_db() {
    local db=$1 p
    for p in "$CITUS_COORD_PORT" "${CITUS_WORKER_PORTS[@]}"; do
        [ "$db" = postgres ] || citus_psql "$p" -qc "CREATE DATABASE $db" >/dev/null 2>&1 || return 1
        citus_psql "$p" -d "$db" -qc "CREATE EXTENSION citus" >/dev/null || return 1
    done
    citus_psql "$CITUS_COORD_PORT" -d "$db" -qc \
        "SELECT citus_set_coordinator_host('127.0.0.1', $CITUS_COORD_PORT)" >/dev/null || return 1
    for p in "${CITUS_WORKER_PORTS[@]}"; do
        citus_psql "$CITUS_COORD_PORT" -d "$db" -qc \
            "SELECT citus_add_node('127.0.0.1', $p)" >/dev/null || return 1
    done
}

citus_stop() {
    [ -n "${CITUS_DIR:-}" ] && [ -d "$CITUS_DIR" ] || return 0
    local d
    for d in "$CITUS_DIR"/coord "$CITUS_DIR"/worker*; do
        [ -f "$d/postmaster.pid" ] && { as_pg "$PGBIN/pg_ctl" -D "$d" -m fast -w stop >/dev/null 2>&1 || true; }
    done
    rm -rf "$CITUS_DIR"
    CITUS_DIR=
}
