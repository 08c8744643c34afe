#!/usr/bin/env bash
# Build the e2e Kafka runtime: copy every runtime jar named by pom.xml (Kafka
# broker + KRaft storage tool + CLI tools + log4j2 backend) from Maven Central
# into ${BALLAST_CACHE:-$HOME/.cache/ballast}/kafka/lib/, and the log4j2 config
# into .../kafka/config/. Idempotent: a stamp file in lib/ holds the hash of
# pom.xml and log4j2.properties; when it matches, this does nothing.
#
# Usage: e2e/stack/kafka/build.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="${BALLAST_CACHE:-$HOME/.cache/ballast}/kafka"
lib="$root/lib"
conf="$root/config"
stamp="$lib/.ballast-stamp"
logfile="$root/build.log"

want="$(cd "$here" && sha256sum pom.xml log4j2.properties | sha256sum | cut -d' ' -f1)"

up_to_date() {
  [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f "$conf/log4j2.properties" ]] &&
    compgen -G "$lib/kafka_2.13-*.jar" >/dev/null
}

if up_to_date; then
  exit 0
fi

mkdir -p "$root"
# Serialize concurrent builds (e.g. two test runs starting at once).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$root/.build.lock"
  flock 9
  if up_to_date; then
    exit 0
  fi
fi

tmp="$root/lib.tmp.$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT

if ! mvn -q -B -f "$here/pom.xml" \
      dependency:copy-dependencies \
      -DincludeScope=runtime \
      -DoutputDirectory="$tmp" >"$logfile" 2>&1 ||
   ! compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null; then
  echo "stack: kafka: maven dependency copy failed (see $logfile)" >&2
  exit 1
fi

mkdir -p "$conf"
cp "$here/log4j2.properties" "$conf/log4j2.properties.tmp"
mv -f "$conf/log4j2.properties.tmp" "$conf/log4j2.properties"

# Swap the new lib/ in whole, so no stale jar of an older version survives.
rm -rf "$lib.old"
if [[ -d "$lib" ]]; then
  mv "$lib" "$lib.old"
fi
mv "$tmp" "$lib"
rm -rf "$lib.old"
echo "$want" >"$stamp"
