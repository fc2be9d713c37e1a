#!/usr/bin/env bash
# Build Citus from the vendored release source (../shared/vendor beside the
# repository, or $CITUS_VENDOR) and install it into the PostgreSQL of
# $PG_CONFIG.  The built tree is cached outside the repository
# ($CITUS_CACHE, default /var/cache/billing-citus, else ~/.cache) and
# reused: a second run only re-installs, and does nothing when the same
# build is installed already.  Citus source and binaries never enter the
# repository.
set -euo pipefail
cd "$(dirname "$0")/../.."

CITUS_VERSION=13.2.2
PG_CONFIG=${PG_CONFIG:-pg_config}
VENDOR=${CITUS_VENDOR:-$(cd .. && pwd)/shared/vendor}
[ -d "$VENDOR" ] || VENDOR=/work/shared/vendor
TARBALL=$VENDOR/citus-$CITUS_VERSION.tar.gz
PATCH=$VENDOR/citus-$CITUS_VERSION-pg15.20.patch
[ -f "$TARBALL" ] || { echo "citus source not found: $TARBALL" >&2; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# apt build dependencies (the vendor README lists them)
deps="liblz4-dev libzstd-dev libcurl4-openssl-dev libkrb5-dev libssl-dev
      libselinux1-dev libxslt1-dev libpam0g-dev libreadline-dev zlib1g-dev"
# the server headers of the default PostgreSQL, unless PG_CONFIG has its own
[ -d "$("$PG_CONFIG" --includedir-server)" ] || deps="$deps postgresql-server-dev-15"
missing=()
for p in $deps; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "citus: installing build dependencies: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# one cached build per (Citus version, PostgreSQL installation)
CACHE=${CITUS_CACHE:-/var/cache/billing-citus}
mkdir -p "$CACHE" 2>/dev/null && [ -w "$CACHE" ] || CACHE=$HOME/.cache/billing-citus
mkdir -p "$CACHE"
key=$( { echo "$CITUS_VERSION"; sha256sum "$TARBALL" "$PATCH" | cut -d' ' -f1;
         "$PG_CONFIG" --version; "$PG_CONFIG" --pkglibdir; } | sha256sum | cut -c1-16)
SRC=$CACHE/citus-$CITUS_VERSION-$key
LIBDIR=$("$PG_CONFIG" --pkglibdir)
SHAREDIR=$("$PG_CONFIG" --sharedir)

# serialize concurrent builds of the same tree
exec 9>"$CACHE/.lock-$key"
flock 9

if [ ! -f "$SRC/.built" ]; then
    echo "citus: building $CITUS_VERSION for $("$PG_CONFIG" --version) in $SRC (about 3 minutes)"
    rm -rf "$SRC" "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xzf "$TARBALL" -C "$SRC.tmp" --strip-components=1
    (cd "$SRC.tmp" && patch -s -p1 <"$PATCH")
    mv "$SRC.tmp" "$SRC"
    (cd "$SRC" && nice -n 10 ./configure -q PG_CONFIG="$PG_CONFIG" >configure.log 2>&1 \
        || { tail -30 configure.log; exit 1; })
    (cd "$SRC" && nice -n 10 make -s -j"$(nproc)" >build.log 2>&1 \
        || { tail -30 build.log; exit 1; })
    touch "$SRC/.built"
fi

# install unless this very build is installed already
if ! cmp -s "$SRC/src/backend/distributed/citus.so" "$LIBDIR/citus.so" 2>/dev/null \
   || [ ! -f "$SHAREDIR/extension/citus.control" ]; then
    echo "citus: installing into $LIBDIR"
    (cd "$SRC" && as_root make -s install >install.log 2>&1 || { tail -30 install.log; exit 1; })
fi
echo "citus: $CITUS_VERSION ready for $PG_CONFIG"
