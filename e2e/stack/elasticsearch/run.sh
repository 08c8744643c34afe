#!/usr/bin/env bash
# Runs one real Elasticsearch node in the foreground (exec: the caller's $! is the java pid).
#   run.sh CLUSTER_NAME HTTP_PORT TRANSPORT_PORT DATA_DIR [HEAP]
# Loopback-only single-node cluster; home, data and logs all live under DATA_DIR.
# Needs ./build.sh to have installed the jars; extra ES settings: BALLAST_ES_OPTS="-Ekey=value ...",
# extra JVM flags: BALLAST_ES_JAVA_OPTS, log level: -Dballast.es.log.level=INFO in BALLAST_ES_JAVA_OPTS.
set -euo pipefail

if [[ $# -lt 4 || $# -gt 5 ]]; then
  echo "usage: $0 CLUSTER_NAME HTTP_PORT TRANSPORT_PORT DATA_DIR [HEAP]" >&2
  exit 2
fi
cluster="$1" http_port="$2" transport_port="$3" data_dir="$4" heap="${5:-384m}"

lib="${BALLAST_CACHE:-$HOME/.cache/ballast}/elasticsearch/lib"
if [[ ! -f "$lib/ballast-es-launcher.jar" ]]; then
  echo "stack: elasticsearch: launcher not built (run $(dirname "$0")/build.sh)" >&2
  exit 1
fi

mkdir -p "$data_dir/home" "$data_dir/data" "$data_dir/logs" "$data_dir/tmp"
data_dir="$(cd "$data_dir" && pwd)"

# JVM flags mirror what the 7.17 distribution adds (jvm.options + SystemJvmOptions), minus
# -XX:+AlwaysPreTouch (it would make RSS = the whole heap at once) and the heap-dump-on-OOM
# (a dump per crashed test node would fill the disk); a node that runs out of heap just exits.
# shellcheck disable=SC2086  # BALLAST_ES_JAVA_OPTS / BALLAST_ES_OPTS are word-split on purpose
exec java \
  -Xms"$heap" -Xmx"$heap" -Xss1m \
  -XX:+UseG1GC -XX:G1ReservePercent=25 -XX:InitiatingHeapOccupancyPercent=30 \
  -XX:-OmitStackTraceInFastThrow -XX:+ShowCodeDetailsInExceptionMessages -XX:+ExitOnOutOfMemoryError \
  -XX:ErrorFile="$data_dir/logs/hs_err_pid%p.log" \
  -Djava.io.tmpdir="$data_dir/tmp" \
  -Djava.awt.headless=true -Dfile.encoding=UTF-8 -Djna.nosys=true \
  -Djava.locale.providers=SPI,COMPAT \
  -Des.networkaddress.cache.ttl=60 -Des.networkaddress.cache.negative.ttl=10 \
  -Dio.netty.noUnsafe=true -Dio.netty.noKeySetOptimization=true \
  -Dio.netty.recycler.maxCapacityPerThread=0 -Dio.netty.allocator.numDirectArenas=0 \
  -Dlog4j.shutdownHookEnabled=false -Dlog4j2.disable.jmx=true -Dlog4j2.formatMsgNoLookups=true \
  ${BALLAST_ES_JAVA_OPTS:-} \
  -cp "$lib/*" dev.ballast.stack.EsNode \
  -Ecluster.name="$cluster" \
  -Enode.name="$cluster" \
  -Enetwork.host=127.0.0.1 \
  -Ehttp.port="$http_port" \
  -Etransport.port="$transport_port" \
  -Ediscovery.type=single-node \
  -Epath.home="$data_dir/home" \
  -Epath.data="$data_dir/data" \
  -Epath.logs="$data_dir/logs" \
  -Ecluster.routing.allocation.disk.threshold_enabled=false \
  -Eaction.destructive_requires_name=false \
  ${BALLAST_ES_OPTS:-}
