# Shared shell functions for make test, make demo and make bench: install the
# build and test dependencies, build and install the extension, and run a
# throwaway PostgreSQL cluster on a private socket directory and port.
#
# Postgres refuses to run as root, so when these scripts run as root (as CI
# does) the server runs as the "postgres" user through runuser; clients
# connect over the private socket as the "postgres" role.

PGVER=${PGVER:-15}
PGBIN=${PGBIN:-/usr/lib/postgresql/$PGVER/bin}
export PATH="$PGBIN:$PATH"
export PG_CONFIG="$PGBIN/pg_config"

# as_root CMD...: run a command with root rights (sudo when not root).
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# as_pg CMD...: run a command as the OS user that owns the server, with the
# extra environment in CLUSTER_ENV (e.g. libfaketime and TZ, set by
# test/clock_check.sh for the servers only).
as_pg() {
    # shellcheck disable=SC2086
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- env ${CLUSTER_ENV:-} "$@"; else env ${CLUSTER_ENV:-} "$@"; fi
}

# ensure_packages PKG...: apt-get install the packages that are missing.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# copy_package_into_pg PKG: when PG_CONFIG belongs to a private copy of
# PostgreSQL (not the system one apt installs into), copy the extension
# files of Debian package PKG (its .so and its extension/ scripts) from the
# system PostgreSQL into that copy.
copy_package_into_pg() {
    local pkg=$1 lib share f
    lib=$("$PG_CONFIG" --pkglibdir)
    share=$("$PG_CONFIG" --sharedir)
    [ "$lib" = "/usr/lib/postgresql/$PGVER/lib" ] && return 0
    dpkg -L "$pkg" 2>/dev/null | while IFS= read -r f; do
        case $f in
            /usr/lib/postgresql/$PGVER/lib/*.so)
                cmp -s "$f" "$lib/${f##*/}" || as_root cp -f "$f" "$lib/" ;;
            /usr/share/postgresql/$PGVER/extension/*)
                cmp -s "$f" "$share/extension/${f##*/}" || as_root cp -f "$f" "$share/extension/" ;;
        esac
    done
}

# build_install [make args...]: build warning-free and install.
build_install() {
    make -s WERROR=1 "$@" >/dev/null || return 1
    as_root make -s install "$@" >/dev/null
}

# start_cluster: initdb and start a private cluster; sets PGHOST, PGPORT,
# PGUSER and CLUSTER_DIR.  Extra server settings come from CLUSTER_OPTS.
#
# The cluster preloads billing, so the maintenance worker is on: its
# launcher starts with the server, its shared state and its hook on DROP
# DATABASE are live in every backend.  billing.maintenance_interval is
# MAINTENANCE_INTERVAL, by default 1h, set for the whole cluster: the suites
# count compaction results, delta rows and expired event ids, and a worker
# compacting or purging between two of their statements would change what
# they see.  With 1h the launcher's next pass over the databases (the first
# is at server start, before the suites create theirs) and a worker's first
# run (an interval after it starts, e.g. in the databases that exist when
# the fault tests restart the server) both come long after make test ends.
# test/worker/run.sh tests the worker itself on a cluster of its own
# (MAINTENANCE_INTERVAL=1s).  CLUSTER_PRELOAD='' starts a cluster without it.
start_cluster() {
    CLUSTER_DIR=$(mktemp -d /tmp/billing-cluster.XXXXXX)
    chmod 755 "$CLUSTER_DIR"
    [ "$(id -u)" = 0 ] && chown postgres: "$CLUSTER_DIR"
    export PGHOST="$CLUSTER_DIR/sock"
    export PGPORT=${PGPORT_TEST:-$((54000 + RANDOM % 1000))}
    export PGUSER=postgres
    as_pg mkdir -p "$CLUSTER_DIR/sock"
    as_pg "$PGBIN/initdb" -D "$CLUSTER_DIR/data" -U postgres --auth=trust \
        --no-sync -E UTF8 --locale=C.UTF-8 >"$CLUSTER_DIR/initdb.log" 2>&1 \
        || { cat "$CLUSTER_DIR/initdb.log"; return 1; }
    cat >>"$CLUSTER_DIR/data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$PGHOST'
port = $PGPORT
max_connections = 60
max_prepared_transactions = 10
fsync = ${CLUSTER_FSYNC:-off}
log_min_messages = warning
shared_preload_libraries = '${CLUSTER_PRELOAD-billing}'
billing.maintenance_interval = '${MAINTENANCE_INTERVAL:-1h}'
${CLUSTER_OPTS:-}
CONF
    as_pg "$PGBIN/pg_ctl" -D "$CLUSTER_DIR/data" -l "$CLUSTER_DIR/server.log" \
        -w -t 60 start >/dev/null || { cat "$CLUSTER_DIR/server.log"; return 1; }
}

# stop_cluster: stop the cluster started by start_cluster and remove it.
stop_cluster() {
    [ -n "${CLUSTER_DIR:-}" ] && [ -d "$CLUSTER_DIR" ] || return 0
    as_pg "$PGBIN/pg_ctl" -D "$CLUSTER_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$CLUSTER_DIR"
    CLUSTER_DIR=
}

# ok DESCRIPTION / not_ok DESCRIPTION: one TAP line of a shell section,
# counted into n (and fails), which the section sets to 0 before its checks.
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); fails=$((fails + 1)); echo "not ok $n - $1"; }
