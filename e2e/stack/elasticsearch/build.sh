#!/usr/bin/env bash
# Builds the Elasticsearch launcher (pom.xml + src/) and installs it plus every runtime jar into
# ${BALLAST_CACHE:-$HOME/.cache/ballast}/elasticsearch/lib/, which run.sh puts on the classpath.
# Idempotent: a stamp holding the hash of pom.xml + src/ (+ this script) makes an unchanged rerun a no-op.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${BALLAST_CACHE:-$HOME/.cache/ballast}/elasticsearch"
lib="$dest/lib"
stamp="$lib/.ballast-build-stamp"
log="$dest/build.log"

fail() { echo "stack: elasticsearch: $*" >&2; exit 1; }

source_hash() {
  (cd "$here" && { sha256sum pom.xml build.sh; find src -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1)
}

hash="$(source_hash)"
up_to_date() { [[ -f "$lib/ballast-es-launcher.jar" && -f "$stamp" && "$(cat "$stamp")" == "$hash" ]]; }
up_to_date && exit 0

command -v mvn >/dev/null 2>&1 || fail "mvn not found (install Maven 3.8+ and a JDK 17+)"
command -v java >/dev/null 2>&1 || fail "java not found (install a JDK 17+)"

mkdir -p "$dest"
# Serialize concurrent builds (e.g. two stacks starting at once); the winner's result is reused.
exec 9>"$dest/.build.lock"
flock 9
up_to_date && exit 0

build="$dest/build"
rm -rf "$build" "$lib.new"
# -q -B: quiet, batch; the full output goes to the log, only a one-line summary on failure.
if ! mvn -q -B -f "$here/pom.xml" -Dballast.buildDir="$build" package >"$log" 2>&1; then
  fail "maven build failed (see $log)"
fi

mkdir -p "$lib.new"
cp "$build/ballast-es-launcher.jar" "$build"/lib/*.jar "$lib.new/" || fail "could not copy jars into $lib.new (see $log)"
echo "$hash" >"$lib.new/.ballast-build-stamp"
# Swap the whole directory so a running node never sees a half-populated lib/.
rm -rf "$lib.old"
[[ -d "$lib" ]] && mv "$lib" "$lib.old"
mv "$lib.new" "$lib"
rm -rf "$lib.old" "$build"
