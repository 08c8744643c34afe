#!/usr/bin/env bash
# The local stack: real servers on loopback for Ballast's integration and e2e tests.
#
#   stack.sh up       install what is missing, start what is not running, wait until healthy
#   stack.sh down     stop what `up` started (by its pid files, never by process name)
#   stack.sh status   one health line per server and the node; exit 1 if any is unhealthy
#   stack.sh stop|pause|resume SERVER   failure injection for tests: stop, freeze (SIGSTOP), thaw
#   stack.sh member-topology   DC A's member MySQL the master and DC B's its replica again
#   stack.sh clean    delete the indices earlier test runs left in the Elasticsearch clusters
#
# Caches (builds, downloads) live in $BALLAST_CACHE (~/.cache/ballast), outside
# any clone, so a second `up` takes seconds. Running state (data, logs, pids,
# certificates, kubeconfig, stack.env) lives in $BALLAST_STATE_DIR.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=ports.env
source "$here/ports.env"

: "${BALLAST_CACHE:=$HOME/.cache/ballast}"
: "${BALLAST_STATE_DIR:=$BALLAST_CACHE/stack}"
export BALLAST_CACHE
state=$BALLAST_STATE_DIR
bin=$BALLAST_CACHE/bin
logs=$state/logs
pids=$state/pids
pki=$state/pki
host=127.0.0.1
# shellcheck source=node/node.sh
source "$here/node/node.sh"

# Heaps of the JVM servers, sized so the whole stack stays near 5 GiB.
: "${BALLAST_KAFKA_HEAP:=512m}"
: "${BALLAST_ES_HEAP:=384m}"

die() { echo "stack: $*" >&2; exit 1; }
say() { echo "stack: $*"; }

# --- installation -----------------------------------------------------------

need_tool() { # tool, what it is for
  command -v "$1" >/dev/null 2>&1 || die "missing tool '$1' ($2): install it first"
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else need_tool sudo "installing Debian packages"; sudo "$@"; fi
}

# Debian packages the stack runs or the build needs, keyed by a file they install.
apt_packages=(
  /usr/sbin/mariadbd:mariadb-server
  /usr/bin/mariadb-install-db:mariadb-server
  /usr/bin/mariadb:mariadb-client
  /usr/bin/mariadb-admin:mariadb-client
  /usr/bin/redis-server:redis-server
  /usr/bin/redis-cli:redis-tools
  /usr/bin/etcd:etcd-server
  /usr/bin/protoc:protobuf-compiler
  /usr/bin/openssl:openssl
  /usr/bin/curl:curl
  /usr/bin/promtool:prometheus
  # `stack.sh pause` checks which process listens on a server's port.
  /usr/bin/ss:iproute2
  # The merchant page's test drives a real browser (headless) over WebDriver.
  /usr/bin/chromium:chromium
  /usr/bin/chromedriver:chromium-driver
  # The real node (node/node.sh): the container runtime, the pod network, the pause image.
  /usr/bin/containerd:containerd
  /usr/sbin/runc:runc
  /usr/lib/cni/bridge:containernetworking-plugins
  /usr/sbin/iptables:iptables
  /usr/bin/umoci:umoci
  /usr/bin/skopeo:skopeo
)

install_packages() {
  local missing=() entry
  for entry in "${apt_packages[@]}"; do
    [ -e "${entry%%:*}" ] || missing+=("${entry#*:}")
  done
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | sed '/^$/d')
  [ ${#missing[@]} -eq 0 ] && return 0
  need_tool apt-get "installing ${missing[*]}"
  say "installing Debian packages: ${missing[*]}"
  mkdir -p "$logs"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$logs/apt.log" 2>&1 ||
    die "apt-get update failed (see $logs/apt.log)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >>"$logs/apt.log" 2>&1 ||
    die "apt-get install ${missing[*]} failed (see $logs/apt.log)"
  # `prometheus` is here for promtool (the alert-rule tests) only: its postinst
  # starts a server on :9090 and enables it at boot where an init system lets it.
  # Stop and disable the one just installed (never one that was there before).
  if [[ " ${missing[*]} " == *" prometheus "* ]]; then
    if [ -d /run/systemd/system ]; then
      as_root systemctl disable --now prometheus.service >>"$logs/apt.log" 2>&1 ||
        die "stopping the prometheus service failed (see $logs/apt.log)"
    else
      as_root /etc/init.d/prometheus stop >>"$logs/apt.log" 2>&1 || true
      # systemctl disables offline too (unit and SysV links) when systemd is installed but not running.
      if command -v systemctl >/dev/null 2>&1; then
        as_root systemctl disable prometheus.service >>"$logs/apt.log" 2>&1 || true
      else
        as_root update-rc.d prometheus disable >>"$logs/apt.log" 2>&1 || true
      fi
    fi
  fi
}

# A stamp holds the hash of a build's inputs; the build runs only when they change.
stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

build_kube() {
  local src=$here/kube stamp=$bin/.kube.stamp want
  want=$(stamp_of "$src/go.mod" "$src/go.sum" "$src/tools.go")
  if [ -x "$bin/kube-apiserver" ] && [ -x "$bin/kube-controller-manager" ] && [ -x "$bin/kubectl" ] &&
    [ -x "$bin/kubelet" ] && [ -x "$bin/kube-scheduler" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  need_tool go "building kube-apiserver from the Go module proxy"
  mkdir -p "$bin" "$logs"
  say "building kube-apiserver, kube-controller-manager, kubectl, kubelet, kube-scheduler (cold: ~15 min on 2 cores; cached after)"
  # The version the binaries report (kubectl version, /version) is stamped at link time.
  local version minor
  version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$src/go.mod")
  minor=$(echo "$version" | cut -d. -f2)
  local pkg=k8s.io/component-base/version
  local ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  # go.sum pins every module, so the checksum database is not needed.
  (cd "$src" && GOFLAGS=-mod=readonly GONOSUMDB='*' \
    go build -ldflags="$ldflags" -o "$bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-scheduler) >"$logs/kube-build.log" 2>&1 ||
    die "building kube-apiserver failed (see $logs/kube-build.log)"
  echo "$want" >"$stamp"
}

build_helm() {
  local src=$here/helm stamp=$bin/.helm.stamp want
  want=$(stamp_of "$src/go.mod" "$src/go.sum" "$src/tools.go")
  if [ -x "$bin/helm" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  need_tool go "building helm from the Go module proxy"
  mkdir -p "$bin" "$logs"
  say "building helm for the chart tests (cold: a few minutes on 2 cores; cached after)"
  (cd "$src" && GOFLAGS=-mod=readonly GONOSUMDB='*' \
    go build -ldflags="-s -w" -o "$bin/" helm.sh/helm/v3/cmd/helm) >"$logs/helm-build.log" 2>&1 ||
    die "building helm failed (see $logs/helm-build.log)"
  echo "$want" >"$stamp"
}

install_all() {
  need_tool java "running Kafka and Elasticsearch"
  need_tool mvn "fetching Kafka and Elasticsearch jars from Maven Central"
  install_packages
  build_kube
  build_helm
  "$here/kafka/build.sh"
  "$here/elasticsearch/build.sh"
}

# --- processes --------------------------------------------------------------

# A pid file holds "pid starttime port": the start time guards against a reused
# pid; the port is the one the server listens on (see `pause`).
proc_start_time() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null; }

running() { # name
  local f=$pids/$1.pid pid start
  [ -f "$f" ] || return 1
  read -r pid start _ <"$f" || return 1
  [ -n "$pid" ] && [ "$(proc_start_time "$pid")" = "$start" ]
}

port_busy() { (exec 3<>"/dev/tcp/$host/$1") 2>/dev/null; }

start() { # name port command...
  local name=$1 port=$2
  shift 2
  if running "$name"; then
    # Thaw one a killed test left paused (see `pause`).
    read -r pid _ <"$pids/$name.pid"; kill -CONT "$pid" 2>/dev/null || true
    return 0
  fi
  port_busy "$port" && die "port $port for $name is busy (another process listens there; see e2e/stack/ports.env)"
  mkdir -p "$logs" "$pids"
  # setsid: the server outlives the make or test run that started it.
  setsid "$@" >"$logs/$name.log" 2>&1 </dev/null &
  local pid=$!
  sleep 0.2
  echo "$pid $(proc_start_time "$pid") $port" >"$pids/$name.pid"
}

# Freezes a server (SIGSTOP) and returns once it is frozen: that pid the only
# one listening on its port, and every thread of it stopped (a thread's state
# follows the last ')' of its stat, since a thread's name may hold spaces). A
# test that froze another process than the one answering would see the server
# answer and fail for a reason that is not its own; this says so instead.
freeze() { # name
  local pid port holders deadline=$((SECONDS + 5)) threads
  read -r pid _ port <"$pids/$1.pid"
  if [ -n "$port" ]; then
    holders=$(ss -Hltnp "sport = :$port" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u | xargs)
    [ "$holders" = "$pid" ] ||
      die "pause: $1's port $port is held by pid(s) ${holders:-none}, not by its pid $pid (see $pids/$1.pid)"
  fi
  kill -STOP "$pid"
  until threads=$(sed 's/.*) //; s/ .*//' /proc/"$pid"/task/*/stat 2>/dev/null | sort -u | tr '\n' ' ') &&
    [ "$threads" = "T " ]; do
    [ $SECONDS -lt $deadline ] || { kill -CONT "$pid"; die "pause: $1 (pid $pid) did not stop: thread states $threads"; }
    sleep 0.05
  done
}

wait_for() { # name seconds check-command...
  local name=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    running "$name" || die "$name exited during start-up (see $logs/$name.log)"
    [ $SECONDS -lt $deadline ] || die "$name not healthy after ${seconds}s (see $logs/$name.log)"
    sleep 0.5
  done
}

stop() { # name
  local f=$pids/$1.pid pid start
  [ -f "$f" ] || return 0
  if running "$1"; then
    read -r pid start _ <"$f"
    kill -TERM "$pid" 2>/dev/null || true
    # A paused server (see `pause`) gets the TERM only once it runs again.
    kill -CONT "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do running "$1" || break; sleep 0.5; done
    if running "$1"; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$f"
}

# --- Kubernetes API server --------------------------------------------------

cert() { # name subject [san]
  local name=$1 subj=$2 san=${3:-}
  # Made again when its subject or names change (a server running it reloads it).
  [ -f "$pki/$name.crt" ] && [ "$(cat "$pki/$name.for" 2>/dev/null)" = "$subj $san" ] && return 0
  echo "$subj $san" >"$pki/$name.for"
  openssl genrsa -out "$pki/$name.key" 2048 2>/dev/null
  openssl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
  local ext=$pki/$name.ext
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=digitalSignature,keyEncipherment"
    if [ -n "$san" ]; then echo "extendedKeyUsage=serverAuth"; echo "subjectAltName=$san"; else echo "extendedKeyUsage=clientAuth"; fi
  } >"$ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -extfile "$ext" -out "$pki/$name.crt" 2>/dev/null
}

kubeconfig() { # file client-cert-name
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ballast-local
  cluster:
    server: https://$host:$BALLAST_PORT_APISERVER
    certificate-authority: $pki/ca.crt
users:
- name: $2
  user:
    client-certificate: $pki/$2.crt
    client-key: $pki/$2.key
contexts:
- name: ballast-local
  context: {cluster: ballast-local, user: $2}
current-context: ballast-local
EOF
}

pki_and_kubeconfigs() {
  mkdir -p "$pki" "$state/kube"
  if [ ! -f "$pki/ca.crt" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" \
      -days 3650 -subj "/CN=ballast-local-ca" 2>/dev/null
  fi
  # 10.96.0.1: the `kubernetes` Service, which the real node's pods dial (node/node.sh).
  cert apiserver "/CN=kube-apiserver" "IP:127.0.0.1,IP:$node_kubernetes_ip,DNS:localhost,DNS:kubernetes.default.svc"
  cert admin "/O=system:masters/CN=ballast-admin"
  # The API server's identity towards the kubelet (logs, exec, port-forward).
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  # A local test stack: the controller manager runs all controllers under one
  # privileged identity rather than one service account per controller.
  cert controller-manager "/O=system:masters/CN=system:kube-controller-manager"
  [ -f "$pki/sa.key" ] || openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  [ -f "$pki/sa.pub" ] || openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  kubeconfig "$state/kube/admin.kubeconfig" admin
  kubeconfig "$state/kube/controller-manager.kubeconfig" controller-manager
}

apiserver_ready() {
  curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://$host:$BALLAST_PORT_APISERVER/readyz" | grep -q ok
}

start_kubernetes() {
  pki_and_kubeconfigs
  start etcd "$BALLAST_PORT_ETCD" etcd --name ballast --data-dir "$state/etcd" \
    --listen-client-urls "http://$host:$BALLAST_PORT_ETCD" --advertise-client-urls "http://$host:$BALLAST_PORT_ETCD" \
    --listen-peer-urls "http://$host:$BALLAST_PORT_ETCD_PEER" \
    --initial-advertise-peer-urls "http://$host:$BALLAST_PORT_ETCD_PEER" \
    --initial-cluster "ballast=http://$host:$BALLAST_PORT_ETCD_PEER" --quota-backend-bytes 2147483648
  wait_for etcd 30 curl -sf "http://$host:$BALLAST_PORT_ETCD/health"
  # No endpoint reconciler: the `kubernetes` Service cannot point at a loopback
  # address, and nothing here reaches the API server through it.
  start kube-apiserver "$BALLAST_PORT_APISERVER" "$bin/kube-apiserver" \
    --etcd-servers "http://$host:$BALLAST_PORT_ETCD" \
    --bind-address "$host" --advertise-address "$host" --secure-port "$BALLAST_PORT_APISERVER" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
    --client-ca-file "$pki/ca.crt" \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-cluster-ip-range 10.96.0.0/16 --authorization-mode RBAC \
    --allow-privileged=true --profiling=false --cert-dir "$state/kube" \
    --endpoint-reconciler-type=none
  start kube-controller-manager "$BALLAST_PORT_CONTROLLER_MANAGER" "$bin/kube-controller-manager" \
    --kubeconfig "$state/kube/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$state/kube/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$state/kube/controller-manager.kubeconfig" \
    --bind-address "$host" --secure-port "$BALLAST_PORT_CONTROLLER_MANAGER" \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --leader-elect=false --use-service-account-credentials=false --profiling=false \
    --cert-dir "$state/kube/controller-manager-certs"
}

# --- MariaDB ----------------------------------------------------------------

mysql_root() { # name sql...
  mariadb --no-defaults --protocol=socket -S "$state/mysql/$1/mysqld.sock" -uroot -e "$2"
}

mysql_ping() { # port
  mariadb-admin --no-defaults --protocol=tcp -h "$host" -P "$1" -uballast -pballast ping
}

start_mysql() { # name port server-id
  local name=$1 port=$2 id=$3 dir=$state/mysql/$1
  running "mysql-$name" && return 0
  mkdir -p "$dir"
  cat >"$dir/my.cnf" <<EOF
[mariadbd]
datadir = $dir/data
socket = $dir/mysqld.sock
pid-file = $dir/mysqld.pid
port = $port
bind-address = $host
user = $(id -un)
server-id = $id
log-bin = binlog
binlog-format = ROW
binlog-row-image = FULL
# Column names in every table map event: the collector reads each row by the
# names it was written with, whatever ALTER TABLE came after.
binlog-row-metadata = FULL
log-slave-updates = ON
innodb-buffer-pool-size = 64M
performance-schema = OFF
skip-name-resolve
character-set-server = utf8mb4
EOF
  if [ ! -d "$dir/data/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$dir/data" --user="$(id -un)" \
      --auth-root-authentication-method=socket --skip-test-db >"$logs/mysql-$name-install.log" 2>&1 ||
      die "mariadb-install-db for $name failed (see $logs/mysql-$name-install.log)"
  fi
  start "mysql-$name" "$port" mariadbd --defaults-file="$dir/my.cnf"
}

# Users are created outside the binlog: a replica creates its own, so the
# primary's must not replicate onto it.
mysql_users_sql="SET sql_log_bin = 0;
CREATE USER IF NOT EXISTS 'ballast'@'127.0.0.1' IDENTIFIED BY 'ballast';
CREATE USER IF NOT EXISTS 'ballast'@'localhost' IDENTIFIED BY 'ballast';
GRANT ALL PRIVILEGES ON *.* TO 'ballast'@'127.0.0.1' WITH GRANT OPTION;
GRANT ALL PRIVILEGES ON *.* TO 'ballast'@'localhost' WITH GRANT OPTION;
SET sql_log_bin = 1;"

bootstrap_mysql() { # name port [primary-port]
  local name=$1 port=$2 primary=${3:-} dir=$state/mysql/$1
  wait_for "mysql-$name" 60 test -S "$dir/mysqld.sock"
  wait_for "mysql-$name" 60 mysql_root "$name" "SELECT 1"
  [ -f "$dir/bootstrapped" ] && return 0
  mysql_root "$name" "$mysql_users_sql" || die "creating the ballast user on mysql-$name failed"
  if [ -z "$primary" ]; then
    mysql_root "$name" "CREATE DATABASE IF NOT EXISTS ballast" || die "creating database on mysql-$name failed"
  else
    # The replica gets the database (and everything else) from the primary's binlog,
    # and reconnects within a second of a stopped primary's return (not 60 s).
    mysql_root "$name" "CHANGE MASTER TO MASTER_HOST='$host', MASTER_PORT=$primary,
      MASTER_USER='ballast', MASTER_PASSWORD='ballast', MASTER_USE_GTID=slave_pos,
      MASTER_CONNECT_RETRY=1; START SLAVE;" ||
      die "starting replication on mysql-$name from port $primary failed"
  fi
  touch "$dir/bootstrapped"
}

# The member servers' failover account (MemberStore spec.mysqlAdmin), and the
# member user without READ_ONLY ADMIN: the operator fences a demoted master
# with read_only, which that privilege passes through.
member_accounts() { # name
  mysql_root "$1" "SET sql_log_bin = 0;
CREATE USER IF NOT EXISTS 'ballast_admin'@'127.0.0.1' IDENTIFIED BY 'ballast-admin';
GRANT ALL PRIVILEGES ON *.* TO 'ballast_admin'@'127.0.0.1';
REVOKE READ_ONLY ADMIN ON *.* FROM 'ballast'@'127.0.0.1', 'ballast'@'localhost';
SET sql_log_bin = 1;" || die "setting the member accounts on mysql-$1 failed"
}

mysql_value() { # name sql
  mariadb --no-defaults --protocol=socket -S "$state/mysql/$1/mysqld.sock" -uroot -N -B -e "$2"
}

# A failover scenario stopped midway can leave DC B's MySQL the master: DC A
# is made the master again and DC B its replica (from DC B's own position).
member_topology() {
  local a=member-dc-a b=member-dc-b
  if [ -n "$(mysql_value $a 'SHOW SLAVE STATUS')" ] || [ "$(mysql_value $a 'SELECT @@read_only')" != 0 ]; then
    say "mysql-$a: made the member master again"
    mysql_root $a "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0;" ||
      die "reopening mysql-$a as the master failed"
  fi
  local source
  source=$(mysql_root $b 'SHOW SLAVE STATUS\G' | awk '/ Master_Port:/ {print $2}')
  if [ "$source" != "$BALLAST_PORT_MYSQL_MEMBER_DC_A" ]; then
    say "mysql-$b: made a replica of mysql-$a again"
    mysql_root $b "STOP SLAVE; CHANGE MASTER TO MASTER_HOST='$host', MASTER_PORT=$BALLAST_PORT_MYSQL_MEMBER_DC_A,
      MASTER_USER='ballast', MASTER_PASSWORD='ballast', MASTER_USE_GTID=current_pos,
      MASTER_CONNECT_RETRY=1; START SLAVE;" || die "re-pointing mysql-$b at mysql-$a failed"
  fi
}

# DC B's member MySQL replicates, unless a failover scenario running now has
# made it the master (it then has no source at all).
replica_settled() {
  [ -z "$(mysql_value member-dc-b 'SHOW SLAVE STATUS')" ] || replica_running
}

replica_running() {
  mariadb --no-defaults --protocol=tcp -h "$host" -P "$BALLAST_PORT_MYSQL_MEMBER_DC_B" -uballast -pballast \
    -e 'SHOW SLAVE STATUS\G' 2>/dev/null | grep -cE 'Slave_(IO|SQL)_Running: Yes' | grep -qx 2
}

# --- Redis, Kafka, Elasticsearch --------------------------------------------

start_redis() { # name port maxmemory policy
  local dir=$state/redis/$1
  mkdir -p "$dir"
  start "redis-$1" "$2" redis-server --bind "$host" --port "$2" --dir "$dir" \
    --save '' --appendonly no --daemonize no --maxmemory "$3" --maxmemory-policy "$4" \
    --protected-mode yes
}

redis_ping() { redis-cli -h "$host" -p "$1" ping | grep -q PONG; }

kafka_ready() { port_busy "$BALLAST_PORT_KAFKA"; }

es_health() { # port
  curl -sf "http://$host:$1/_cluster/health" | grep -qE '"status":"(green|yellow)"'
}

# Deletes every index but the system ones (`.`-prefixed) of the cluster on
# `port`, by name (Elasticsearch refuses wildcard deletes), some at a time so
# that a request line stays short. Each test run makes its own indices and
# nothing deletes them: left alone they reach the 1,000 shards a node holds.
es_clean() { # port
  local names
  # grep finding nothing (no index, or only system ones) is not a failure.
  names=$(curl -sf "http://$host:$1/_cat/indices?h=index" | { grep -v '^\.' || true; } | sort) || return 1
  [ -n "$names" ] || return 0
  echo "$names" | xargs -n 40 | tr ' ' ',' | while read -r batch; do
    curl -sf -X DELETE "http://$host:$1/$batch?ignore_unavailable=true" >/dev/null ||
      die "deleting indices on port $1 failed"
  done
}

start_es() { # name http-port transport-port
  start "es-$1" "$2" "$here/elasticsearch/run.sh" "ballast-es-$1" "$2" "$3" "$state/es/$1" "$BALLAST_ES_HEAP"
}

# --- commands ---------------------------------------------------------------

write_env() {
  local url="mysql://ballast:ballast@$host"
  cat >"$state/stack.env" <<EOF
# Written by e2e/stack/stack.sh up: where the local stack's servers are.
KUBECONFIG=$state/kube/admin.kubeconfig
BALLAST_HELM=$bin/helm
BALLAST_KUBECTL=$bin/kubectl
BALLAST_KAFKA_BOOTSTRAP=$host:$BALLAST_PORT_KAFKA
BALLAST_MYSQL_SOURCE_URL=$url:$BALLAST_PORT_MYSQL_SOURCE/ballast
BALLAST_MYSQL_HOT_URL=$url:$BALLAST_PORT_MYSQL_HOT/ballast
BALLAST_MYSQL_MEMBER_DC_A_URL=$url:$BALLAST_PORT_MYSQL_MEMBER_DC_A/ballast
BALLAST_MYSQL_MEMBER_DC_B_URL=$url:$BALLAST_PORT_MYSQL_MEMBER_DC_B/ballast
BALLAST_REDIS_KV_URL=redis://$host:$BALLAST_PORT_REDIS_KV
BALLAST_REDIS_CACHE_URL=redis://$host:$BALLAST_PORT_REDIS_CACHE
BALLAST_REDIS_MEMBER_DC_A_URL=redis://$host:$BALLAST_PORT_REDIS_MEMBER_DC_A
BALLAST_REDIS_MEMBER_DC_B_URL=redis://$host:$BALLAST_PORT_REDIS_MEMBER_DC_B
BALLAST_ES_DC_A_URL=http://$host:$BALLAST_PORT_ES_DC_A
BALLAST_ES_DC_B_URL=http://$host:$BALLAST_PORT_ES_DC_B
BALLAST_ES_COLD_URL=http://$host:$BALLAST_PORT_ES_COLD
# The real node: its name, its scheduler, its containerd, and the address its pods reach
# the servers above at (the same ports).
BALLAST_NODE_NAME=$node_name
BALLAST_NODE_SCHEDULER=$node_scheduler
BALLAST_NODE_CONTAINERD=$node_sock
BALLAST_NODE_GATEWAY=$NODE_GATEWAY
BALLAST_NODE_KAFKA_BOOTSTRAP=$NODE_GATEWAY:$BALLAST_PORT_KAFKA_NODE
EOF
}

up() {
  local t0=$SECONDS
  install_all
  mkdir -p "$state" "$logs" "$pids"
  # Slow starters first, so they boot while the rest is started and checked.
  start_es dc-a "$BALLAST_PORT_ES_DC_A" "$BALLAST_PORT_ES_DC_A_TRANSPORT"
  start_es dc-b "$BALLAST_PORT_ES_DC_B" "$BALLAST_PORT_ES_DC_B_TRANSPORT"
  start_es cold "$BALLAST_PORT_ES_COLD" "$BALLAST_PORT_ES_COLD_TRANSPORT"
  start kafka "$BALLAST_PORT_KAFKA" env BALLAST_KAFKA_NODE_LISTENER="$BALLAST_PORT_KAFKA_NODE@$NODE_GATEWAY" \
    "$here/kafka/run.sh" "$BALLAST_PORT_KAFKA" \
    "$BALLAST_PORT_KAFKA_CONTROLLER" "$state/kafka" "$BALLAST_KAFKA_HEAP"
  start_kubernetes
  start_mysql source "$BALLAST_PORT_MYSQL_SOURCE" 1
  start_mysql hot "$BALLAST_PORT_MYSQL_HOT" 2
  start_mysql member-dc-a "$BALLAST_PORT_MYSQL_MEMBER_DC_A" 3
  start_mysql member-dc-b "$BALLAST_PORT_MYSQL_MEMBER_DC_B" 4
  # The KV store holds events not yet computed: it must refuse writes when full
  # (the intake then reports a store failure), never evict. Sized for the
  # ingest bench's windows. The result cache is a cache: it evicts.
  start_redis kv "$BALLAST_PORT_REDIS_KV" 2gb noeviction
  start_redis cache "$BALLAST_PORT_REDIS_CACHE" 256mb allkeys-lru
  start_redis member-dc-a "$BALLAST_PORT_REDIS_MEMBER_DC_A" 256mb noeviction
  start_redis member-dc-b "$BALLAST_PORT_REDIS_MEMBER_DC_B" 256mb noeviction

  bootstrap_mysql source "$BALLAST_PORT_MYSQL_SOURCE"
  bootstrap_mysql hot "$BALLAST_PORT_MYSQL_HOT"
  bootstrap_mysql member-dc-a "$BALLAST_PORT_MYSQL_MEMBER_DC_A"
  bootstrap_mysql member-dc-b "$BALLAST_PORT_MYSQL_MEMBER_DC_B" "$BALLAST_PORT_MYSQL_MEMBER_DC_A"
  member_accounts member-dc-a
  member_accounts member-dc-b
  wait_for redis-kv 20 redis_ping "$BALLAST_PORT_REDIS_KV"
  wait_for redis-cache 20 redis_ping "$BALLAST_PORT_REDIS_CACHE"
  wait_for redis-member-dc-a 20 redis_ping "$BALLAST_PORT_REDIS_MEMBER_DC_A"
  wait_for redis-member-dc-b 20 redis_ping "$BALLAST_PORT_REDIS_MEMBER_DC_B"
  wait_for kube-apiserver 120 apiserver_ready
  wait_for kafka 120 kafka_ready
  wait_for es-dc-a 180 es_health "$BALLAST_PORT_ES_DC_A"
  wait_for es-dc-b 180 es_health "$BALLAST_PORT_ES_DC_B"
  wait_for es-cold 180 es_health "$BALLAST_PORT_ES_COLD"
  wait_for mysql-member-dc-b 60 replica_settled
  node_up
  node_wait
  write_env
  say "up in $((SECONDS - t0))s; endpoints in $state/stack.env"
}

# Reverse start order: clients of a server stop before it.
services=(kube-scheduler kubelet containerd kube-controller-manager kube-apiserver etcd
  mysql-source mysql-hot mysql-member-dc-b mysql-member-dc-a
  redis-kv redis-cache redis-member-dc-a redis-member-dc-b
  kafka es-dc-a es-dc-b es-cold)

down() {
  local s
  node_down
  for s in "${services[@]}"; do
    if running "$s"; then say "stopping $s"; fi
    stop "$s"
  done
}

status() {
  local bad=0
  line() { # name what check...
    local name=$1 what=$2 state_word
    shift 2
    if ! running "$name"; then
      state_word="DOWN (not running)"; bad=1
    elif "$@" >/dev/null 2>&1; then
      state_word="ok"
    else
      state_word="UNHEALTHY"; bad=1
    fi
    printf '%-24s %-44s %s\n' "$name" "$what" "$state_word"
  }
  line etcd "$host:$BALLAST_PORT_ETCD" curl -sf "http://$host:$BALLAST_PORT_ETCD/health"
  line kube-apiserver "https://$host:$BALLAST_PORT_APISERVER /readyz" apiserver_ready
  line kube-controller-manager "https://$host:$BALLAST_PORT_CONTROLLER_MANAGER /healthz" \
    curl -skf "https://$host:$BALLAST_PORT_CONTROLLER_MANAGER/healthz"
  line mysql-source "$host:$BALLAST_PORT_MYSQL_SOURCE (row binlog)" mysql_ping "$BALLAST_PORT_MYSQL_SOURCE"
  line mysql-hot "$host:$BALLAST_PORT_MYSQL_HOT" mysql_ping "$BALLAST_PORT_MYSQL_HOT"
  line mysql-member-dc-a "$host:$BALLAST_PORT_MYSQL_MEMBER_DC_A (primary)" mysql_ping "$BALLAST_PORT_MYSQL_MEMBER_DC_A"
  line mysql-member-dc-b "$host:$BALLAST_PORT_MYSQL_MEMBER_DC_B (replica, replicating)" replica_running
  line redis-kv "$host:$BALLAST_PORT_REDIS_KV" redis_ping "$BALLAST_PORT_REDIS_KV"
  line redis-cache "$host:$BALLAST_PORT_REDIS_CACHE" redis_ping "$BALLAST_PORT_REDIS_CACHE"
  line redis-member-dc-a "$host:$BALLAST_PORT_REDIS_MEMBER_DC_A" redis_ping "$BALLAST_PORT_REDIS_MEMBER_DC_A"
  line redis-member-dc-b "$host:$BALLAST_PORT_REDIS_MEMBER_DC_B" redis_ping "$BALLAST_PORT_REDIS_MEMBER_DC_B"
  line kafka "$host:$BALLAST_PORT_KAFKA (KRaft)" kafka_ready
  line es-dc-a "http://$host:$BALLAST_PORT_ES_DC_A" es_health "$BALLAST_PORT_ES_DC_A"
  line es-dc-b "http://$host:$BALLAST_PORT_ES_DC_B" es_health "$BALLAST_PORT_ES_DC_B"
  line es-cold "http://$host:$BALLAST_PORT_ES_COLD (cold + marketing)" es_health "$BALLAST_PORT_ES_COLD"
  line containerd "$node_sock" node_ctr version
  line kubelet "node $node_name (pods on $NODE_SUBNET)" node_ready
  line kube-scheduler "https://$host:$BALLAST_PORT_SCHEDULER /healthz" \
    curl -skf "https://$host:$BALLAST_PORT_SCHEDULER/healthz"
  return $bad
}

[ "${BASH_SOURCE[0]}" = "$0" ] || return 0 # sourced: functions only

# One invocation at a time changes the stack: two `up`s at once (two tests'
# guards) could both find a server down and start it twice, and its pid file
# then names the copy that never serves. `flock -o`: the servers an `up`
# starts do not hold the lock.
case "${1:-}" in
  up | down | install | member-topology | clean | stop | pause | resume)
    if [ -z "${BALLAST_STACK_LOCKED:-}" ]; then
      mkdir -p "$state"
      rc=0
      flock -o -E 75 -w 900 "$state/.lock" env BALLAST_STACK_LOCKED=1 bash "$0" "$@" || rc=$?
      [ $rc -ne 75 ] || die "another stack.sh has held $state/.lock for 15 minutes"
      exit $rc
    fi ;;
esac

case "${1:-}" in
  up) up ;;
  down) down ;;
  # Failure injection for tests: stop one server; `up` starts it again.
  stop)
    [[ " ${services[*]} " == *" ${2:-} "* ]] || die "stop: unknown server '${2:-}' (one of: ${services[*]})"
    stop "$2" ;;
  # Failure injection: freeze one server (SIGSTOP), so that it accepts
  # connections and never answers, as a hung server does; `resume` thaws it.
  pause|resume)
    [[ " ${services[*]} " == *" ${2:-} "* ]] || die "$1: unknown server '${2:-}' (one of: ${services[*]})"
    running "$2" || die "$1: $2 is not running"
    if [ "$1" = pause ]; then freeze "$2"; else read -r pid _ <"$pids/$2.pid"; kill -CONT "$pid"; fi ;;
  status) status ;;
  install) install_all ;;
  env) echo "$state/stack.env" ;;
  # After a MySQL failover scenario: DC A's member MySQL the master again.
  member-topology) member_topology ;;
  # Before a test run: the indices earlier runs left in the Elasticsearch clusters deleted.
  clean)
    for port in "$BALLAST_PORT_ES_DC_A" "$BALLAST_PORT_ES_DC_B" "$BALLAST_PORT_ES_COLD"; do
      es_clean "$port" || die "clean: the Elasticsearch on port $port does not answer"
    done ;;
  *) die "usage: stack.sh up|down|status|install|env|member-topology|clean|stop SERVER|pause SERVER|resume SERVER" ;;
esac
