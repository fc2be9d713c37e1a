#!/usr/bin/env bash
# make test, section "dist": the PGXN distribution.
#   - META.json validates against the PGXN Meta Spec 1.0.x
#     (test/dist/check_meta.pl, which is shown to reject broken copies);
#   - its versions agree with billing.control and its files exist;
#   - make dist writes billing-<version>.zip, every entry under
#     billing-<version>/, holding what PGXN and a build need;
#   - unzipped into an empty directory, it builds warning-free with make and
#     installs with make install (into a staging DESTDIR, so the build the
#     other sections test stays installed) the files a server needs.
# Prints one TAP line per check.  Needs git (the archive is HEAD).
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
work=$(mktemp -d /tmp/billing-dist.XXXXXX)
trap 'rm -rf "$work"' EXIT

# 1. META.json
out=$(perl test/dist/check_meta.pl --self-test META.json 2>&1)
rc=$?
while IFS= read -r line; do
    case $line in
        "ok "*) ok "${line#ok [0-9]* - }" ;;
        "not ok "*) not_ok "${line#not ok [0-9]* - }" ;;
        *) echo "$line" ;;
    esac
done <<<"$out"
[ $rc -eq 0 ] || [ "$fails" -gt 0 ] || not_ok "check_meta.pl ran"

meta() { perl -MJSON::PP -e 'local $/; open my $f, "<", "META.json" or die; my $m = JSON::PP->new->decode(<$f>); print eval "\$m->$ARGV[0]"' "$1"; }
control=$(sed -n "s/^default_version[[:space:]]*=[[:space:]]*'\([^']*\)'.*/\1/p" billing.control)
version=$(meta '{version}')
check "META.json's version, its extension's version and billing.control's default_version agree" \
    "$control.0|$control.0|sql/billing--$control.sql|billing" \
    "$version|$(meta '{provides}{billing}{version}')|$(meta '{provides}{billing}{file}')|$(meta '{name}')"

# 2. make dist
if ! git rev-parse --verify -q HEAD >/dev/null 2>&1; then
    echo "# dist: not a git checkout, make dist skipped"
    echo "# dist: $((n - fails)) passed, $fails failed"
    [ "$fails" -eq 0 ]
    exit
fi
zip="billing-$version.zip"
make -s dist >"$work/dist.log" 2>&1
rc=$?
[ -f "$zip" ] && mv "$zip" "$work/"
check "make dist writes $zip" "0|yes" "$rc|$([ -f "$work/$zip" ] && echo yes)"
[ $rc -eq 0 ] || sed 's/^/#   /' "$work/dist.log"
unzip -Z1 "$work/$zip" >"$work/entries" 2>/dev/null
check "every entry of the archive is under billing-$version/" "" \
    "$(grep -v "^billing-$version/" "$work/entries")"
missing=
for f in META.json README.md CHANGELOG.md Makefile billing.control "$(meta '{provides}{billing}{file}')" \
         "$(meta '{provides}{billing}{docfile}')" sql/billing--1.0.sql "sql/billing--1.0--$control.sql" \
         sql/setup.sql expected/setup.out; do
    grep -qx "billing-$version/$f" "$work/entries" || missing="$missing $f"
done
check "the archive holds META.json, the README, the changelog, the build files, every install and upgrade script, the docs and the regression tests" \
    "" "${missing# }"
check "the archive holds nothing git does not track but the assembled install script, and no CI files" "" \
    "$(git ls-files | sed "s|^|billing-$version/|" | sort >"$work/tracked"; sed '/\/$/d' "$work/entries" | sort | comm -23 - "$work/tracked" | grep -v "^billing-$version/sql/billing--$control.sql$"; grep "^billing-$version/.ci/" "$work/entries")"

# 3. it builds and installs from an empty directory
mkdir "$work/empty" "$work/stage"
(cd "$work/empty" && unzip -q "$work/$zip") || not_ok "unzip"
s=$(date +%s)
(cd "$work/empty/billing-$version" && nice make -s -j2 WERROR=1 PG_CONFIG="$PG_CONFIG") >"$work/build.log" 2>&1
check "unzipped into an empty directory, it builds warning-free with make" "0" "$?"
[ -s "$work/build.log" ] && sed 's/^/#   /' "$work/build.log" | head -30
(cd "$work/empty/billing-$version" && make -s install DESTDIR="$work/stage" PG_CONFIG="$PG_CONFIG") >"$work/install.log" 2>&1
check "make install installs it" "0" "$?"
[ -s "$work/install.log" ] && sed 's/^/#   /' "$work/install.log" | head -30
echo "# building and installing the archive: $(( $(date +%s) - s )) s"
ext="$work/stage$("$PG_CONFIG" --sharedir)/extension"
lib="$work/stage$("$PG_CONFIG" --pkglibdir)"
doc="$work/stage$("$PG_CONFIG" --docdir)/extension"
check "it installs billing.so, the control file, every script and the reference" \
    "billing--1.0--$control.sql billing--1.0.sql billing--$control.sql billing.control billing.so billing.md" \
    "$(echo $(cd "$ext" 2>/dev/null && LC_ALL=C ls billing*; cd "$lib" 2>/dev/null && ls billing.so; cd "$doc" 2>/dev/null && ls billing.md))"
check "the installed 1.0 script is the frozen one and the upgrade script is HEAD's" "same|same" \
    "$(cmp -s "$ext/billing--1.0.sql" <(git show HEAD:sql/billing--1.0.sql) && echo same)|$(cmp -s "$ext/billing--1.0--$control.sql" <(git show "HEAD:sql/billing--1.0--$control.sql") && echo same)"

echo "# dist: $((n - fails)) passed, $fails failed"
[ "$fails" -eq 0 ]
