# The stack's real Kubernetes node: containerd, runc and the CNI plugins from Debian, the
# kubelet and kube-scheduler built from the stack's k8s.io/kubernetes. Sourced by stack.sh
# (it uses its variables and helpers: $state, $bin, $logs, $pki, start, stop, running, cert).
#
# The stand-in kubelet (e2e/src/kubelet) runs the fast scenarios as local processes; this
# node runs real pods from locally built images for the scenario that installs the chart
# (e2e/tests/real_node.rs). They never meet: the node's scheduler has its own name
# (ballast-real-node) and schedules only pods that ask for it, and the stand-in binds pods
# of its own namespace to its own Node.
#
# What this VM needs (found by tracing the failures, see README "Local stack"):
# - it drops CAP_SYS_RESOURCE, so runc cannot lower a container's oom_score_adj and fails
#   with "can't get final child's PID from pipe: EOF": containerd clamps it instead
#   (restrict_oom_score_adj);
# - no AppArmor in the kernel; cgroup v1 with the cgroupfs driver;
# - the disk is mostly full and nothing can be pulled: eviction and image GC thresholds are
#   lowered so that the kubelet never deletes the locally built images;
# - every stack server listens on loopback: pods on the node's bridge reach them at the
#   bridge's address (NODE_GATEWAY), which the node forwards to 127.0.0.1 for the stack's
#   ports only, and the `kubernetes` Service's address to the API server; Kafka has a
#   listener that advertises the bridge's address (kafka/run.sh).

node_name=localhost # it must resolve to the kubelet's loopback address: the API server dials it by name
node_dir=$state/node
node_sock=$node_dir/containerd.sock
node_bridge=ballast0
NODE_SUBNET=10.88.0.0/24
NODE_GATEWAY=10.88.0.1
# The first address of the API server's --service-cluster-ip-range: the `kubernetes` Service.
node_kubernetes_ip=10.96.0.1
node_scheduler=ballast-real-node
node_pause=registry.k8s.io/pause:3.10

node_ctr() { ctr -a "$node_sock" -n k8s.io "$@"; }

node_write_configs() {
  mkdir -p "$node_dir"/{containerd,kubelet/root,kubelet/certs,kubelet/pod-logs,kubelet/volume-plugins,cni/net.d,cni/ipam}
  cat >"$node_dir/containerd.toml" <<EOF
version = 2
root = "$node_dir/containerd/root"
state = "$node_dir/containerd/state"
[grpc]
  address = "$node_sock"
[ttrpc]
  address = "$node_sock.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$node_pause"
  disable_apparmor = true
  restrict_oom_score_adj = true
  stream_server_address = "$host"
  stream_server_port = "$BALLAST_PORT_CONTAINERD_STREAM"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$node_dir/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node_dir/cni/net.d"
    max_conf_num = 1
EOF
  cat >"$node_dir/cni/net.d/10-ballast.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "ballast-node",
  "plugins": [
    {
      "type": "bridge", "bridge": "$node_bridge", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$node_dir/cni/ipam",
        "ranges": [[{"subnet": "$NODE_SUBNET", "gateway": "$NODE_GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat >"$node_dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $host
port: $BALLAST_PORT_KUBELET
readOnlyPort: 0
healthzBindAddress: $host
healthzPort: $BALLAST_PORT_KUBELET_HEALTHZ
# Only the API server (its kubelet client certificate, signed by the stack's CA) is served.
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$node_sock
imageServiceEndpoint: unix://$node_sock
cgroupDriver: cgroupfs
cgroupsPerQOS: true
enforceNodeAllocatable: []
failCgroupV1: false
failSwapOn: false
podLogsDir: $node_dir/kubelet/pod-logs
volumePluginDir: $node_dir/kubelet/volume-plugins
staticPodPath: ""
maxPods: 40
registerNode: true
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
imageMinimumGCAge: 876000h
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
rotateCertificates: false
serverTLSBootstrap: false
EOF
  cat >"$node_dir/scheduler.yaml" <<EOF
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection: {kubeconfig: $state/kube/scheduler.kubeconfig}
leaderElection: {leaderElect: false}
profiles:
- schedulerName: $node_scheduler
EOF
}

# The sandbox image cannot be pulled: a static Go pause, packed with umoci, imported once.
node_pause_image() {
  node_ctr images ls -q | grep -qxF "$node_pause" && return 0
  local work=$node_dir/pause
  rm -rf "$work" && mkdir -p "$work/rootfs"
  (cd "$here/node/pause" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -ldflags='-s -w' \
    -o "$work/rootfs/pause" .) >>"$logs/node-pause.log" 2>&1 || die "building the pause image failed (see $logs/node-pause.log)"
  {
    umoci init --layout "$work/oci"
    umoci new --image "$work/oci:3.10"
    umoci insert --rootless --image "$work/oci:3.10" "$work/rootfs/pause" /pause
    umoci config --image "$work/oci:3.10" --config.entrypoint /pause --config.user 65535:65535 \
      --os linux --architecture amd64 --clear=config.cmd
    # An oci-archive carries the image's name, which ctr needs.
    skopeo copy "oci:$work/oci:3.10" "oci-archive:$work/pause.oci.tar:$node_pause"
    node_ctr images import "$work/pause.oci.tar"
    # The kubelet's image GC must never remove it.
    node_ctr images label "$node_pause" io.cri-containerd.pinned=pinned
  } >>"$logs/node-pause.log" 2>&1 || die "packing the pause image failed (see $logs/node-pause.log)"
}

# Pods reach the loopback servers at the bridge's address: the node DNATs the stack's
# ports (27000-27999) there to 127.0.0.1 (route_localnet lets the kernel route to
# loopback from the bridge), and the `kubernetes` Service's address to the API server.
node_network_rule() { # -A|-D rule...
  local op=$1
  shift
  if [ "$op" = -A ]; then iptables -t nat -C "$@" 2>/dev/null && return 0; fi
  iptables -t nat "$op" "$@" 2>/dev/null
}

node_network() { # up|down
  local op=-A comment=(-m comment --comment "ballast stack node")
  if [ "$1" = up ]; then
    ip link show "$node_bridge" >/dev/null 2>&1 || {
      ip link add "$node_bridge" type bridge
      ip addr add "$NODE_GATEWAY/${NODE_SUBNET#*/}" dev "$node_bridge"
    }
    ip link set "$node_bridge" up
    sysctl -qw "net.ipv4.conf.$node_bridge.route_localnet=1"
    [ -f "$node_dir/ip_forward.before" ] || sysctl -n net.ipv4.ip_forward >"$node_dir/ip_forward.before"
    sysctl -qw net.ipv4.ip_forward=1
  else
    op=-D
  fi
  node_network_rule "$op" PREROUTING -i "$node_bridge" -d "$NODE_GATEWAY" -p tcp --dport 27000:27999 \
    "${comment[@]}" -j DNAT --to-destination "$host" || [ "$op" = -D ]
  node_network_rule "$op" PREROUTING -i "$node_bridge" -d "$node_kubernetes_ip" -p tcp --dport 443 \
    "${comment[@]}" -j DNAT --to-destination "$host:$BALLAST_PORT_APISERVER" || [ "$op" = -D ]
  # ... and they see the pods as local clients, as the rest of the stack (MariaDB grants
  # its user on 127.0.0.1 only). A packet forwarded to a local address takes INPUT, not
  # POSTROUTING.
  node_network_rule "$op" INPUT -s "$NODE_SUBNET" -d "$host" "${comment[@]}" -j SNAT --to-source "$host" ||
    [ "$op" = -D ]
  if [ "$1" = down ]; then
    ip link del "$node_bridge" 2>/dev/null || true
    if [ -f "$node_dir/ip_forward.before" ]; then
      sysctl -qw net.ipv4.ip_forward="$(cat "$node_dir/ip_forward.before")"
      rm -f "$node_dir/ip_forward.before"
    fi
  fi
}

node_pki() {
  # The node's identity (group system:nodes) and the scheduler's; the API server's client
  # certificate for the kubelet (logs, exec) is made with the API server's.
  cert "node-$node_name" "/O=system:nodes/CN=system:node:$node_name"
  cert kube-scheduler "/CN=system:kube-scheduler"
  kubeconfig "$state/kube/node.kubeconfig" "node-$node_name"
  kubeconfig "$state/kube/scheduler.kubeconfig" kube-scheduler
}

# The kubelet answers on its own, and the API server says the node is Ready (a Node
# object outlives a stopped kubelet, Ready, until the lifecycle controller notices).
node_ready() {
  curl -sf "http://$host:$BALLAST_PORT_KUBELET_HEALTHZ/healthz" >/dev/null &&
    "$bin/kubectl" --kubeconfig "$state/kube/admin.kubeconfig" get node "$node_name" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True
}

node_up() {
  [ "$(id -u)" -eq 0 ] || die "the real node needs root (containerd, runc, iptables)"
  node_write_configs
  node_pki
  # RBAC only (no Node authorizer): the built-in system:node role for the system:nodes
  # group, and the scheduler's role for its user.
  "$bin/kubectl" --kubeconfig "$state/kube/admin.kubeconfig" apply -f "$here/node/rbac.yaml" \
    >>"$logs/node.log" 2>&1 || die "granting the node's roles failed (see $logs/node.log)"
  node_network up
  start containerd "$BALLAST_PORT_CONTAINERD_STREAM" containerd --config "$node_dir/containerd.toml"
  wait_for containerd 30 node_ctr version
  node_pause_image
  start kubelet "$BALLAST_PORT_KUBELET" "$bin/kubelet" --config "$node_dir/kubelet.yaml" \
    --kubeconfig "$state/kube/node.kubeconfig" --root-dir "$node_dir/kubelet/root" \
    --cert-dir "$node_dir/kubelet/certs" --hostname-override "$node_name" \
    --node-ip "$(ip -4 route get 1.1.1.1 | awk '{for (i = 1; i < NF; i++) if ($i == "src") print $(i + 1)}')" \
    --node-labels ballast.dev/real-node=true
  start kube-scheduler "$BALLAST_PORT_SCHEDULER" "$bin/kube-scheduler" --config "$node_dir/scheduler.yaml" \
    --bind-address "$host" --secure-port "$BALLAST_PORT_SCHEDULER"
}

node_wait() {
  wait_for kubelet 60 node_ready
  wait_for kube-scheduler 30 curl -skf "https://$host:$BALLAST_PORT_SCHEDULER/healthz"
}

# Leaves nothing on the host: containers, mounts, cgroups, the bridge, the NAT rules and
# the kubelet's own chains. The Node and its pods stay in the API server, as after a reboot.
node_down() {
  [ -d "$node_dir" ] || return 0
  stop kube-scheduler
  stop kubelet
  if running containerd; then
    local t c
    # Shims outlive containerd: kill the tasks first.
    for t in $(node_ctr tasks ls -q 2>/dev/null); do node_ctr tasks kill -s SIGKILL "$t" 2>/dev/null || true; done
    sleep 1
    for t in $(node_ctr tasks ls -q 2>/dev/null); do node_ctr tasks delete -f "$t" >/dev/null 2>&1 || true; done
    for c in $(node_ctr containers ls -q 2>/dev/null); do node_ctr containers rm "$c" >/dev/null 2>&1 || true; done
  fi
  stop containerd
  grep -E " $node_dir/" /proc/self/mounts | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m"; done
  local d
  for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/k8s.io; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  # Addresses of pods that are gone.
  rm -rf "$node_dir/cni/ipam"
  node_network down
  # The kubelet adds these at start and never removes them.
  local ipt tc
  for ipt in iptables ip6tables; do
    $ipt -t filter -D INPUT -j KUBE-FIREWALL 2>/dev/null || true
    $ipt -t filter -D OUTPUT -j KUBE-FIREWALL 2>/dev/null || true
    for tc in filter/KUBE-FIREWALL filter/KUBE-KUBELET-CANARY nat/KUBE-KUBELET-CANARY \
      mangle/KUBE-KUBELET-CANARY mangle/KUBE-IPTABLES-HINT; do
      $ipt -t "${tc%/*}" -F "${tc#*/}" 2>/dev/null || true
      $ipt -t "${tc%/*}" -X "${tc#*/}" 2>/dev/null || true
    done
  done
  # Paths the kubelet uses whatever its root dir: the device-plugin socket, the log links.
  find /var/log/containers -maxdepth 1 -lname "$node_dir/*" -delete 2>/dev/null || true
  rm -f /var/lib/kubelet/device-plugins/kubelet.sock
  rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet /var/log/containers 2>/dev/null || true
  find /run/containerd -depth -type d -empty -delete 2>/dev/null || true
}
