#!/usr/bin/env bash
# A Redis Cluster on loopback for the cluster tests and for trying the node program against
# one: 3 masters and 3 replicas on 127.0.0.1:7000-7005 (cluster bus on 17000-17005), no
# persistence, its files in one directory of its own.
#
#   ./scripts/redis-cluster.sh start    # start it (does nothing when it is already up)
#   ./scripts/redis-cluster.sh status   # say whether it is up; exit 0 when it is
#   ./scripts/redis-cluster.sh stop     # stop the servers this script started
#
# redis-server comes from the system's packages (installed when missing, as scripts/test.sh
# does). REDIS_CLUSTER_DIR moves its directory (default: $TMPDIR/hybrid-cluster-redis-cluster).
set -euo pipefail

PORTS=(7000 7001 7002 7003 7004 7005)
DIR="${REDIS_CLUSTER_DIR:-${TMPDIR:-/tmp}/hybrid-cluster-redis-cluster}"

say() { printf '==> %s\n' "$*" >&2; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else return 1
  fi
}

ensure_redis_server() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  command -v apt-get >/dev/null || fail "redis-server is missing and this system has no apt-get: install it yourself"
  say "installing redis-server from the system's packages"
  as_root apt-get update -qq || fail "cannot run apt-get as root to install redis-server"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null ||
    fail "installing redis-server failed: install it yourself"
}

cluster_ok() { # port
  redis-cli -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

# Every node answers and sees the cluster whole.
all_ok() {
  local port
  for port in "${PORTS[@]}"; do cluster_ok "$port" || return 1; done
}

status() {
  if all_ok; then
    say "the Redis Cluster is up on 127.0.0.1:${PORTS[0]}-${PORTS[-1]}"
  else
    say "the Redis Cluster is not up on 127.0.0.1:${PORTS[0]}-${PORTS[-1]}"
    return 1
  fi
}

start() {
  all_ok && { say "the Redis Cluster is already up on 127.0.0.1:${PORTS[0]}-${PORTS[-1]}"; return; }
  ensure_redis_server
  local port
  for port in "${PORTS[@]}"; do
    port_open "$port" && fail "127.0.0.1:$port is taken by something that is not a healthy Redis Cluster node: stop it first ($0 stop stops what this script started)"
  done
  mkdir -p "$DIR"
  for port in "${PORTS[@]}"; do
    # A fresh nodes.conf each time: an old one names a cluster that is gone.
    rm -f "$DIR/nodes-$port.conf"
    redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
      --cluster-enabled yes --cluster-config-file "nodes-$port.conf" --cluster-node-timeout 5000 \
      --dir "$DIR" --pidfile "$DIR/redis-$port.pid" --logfile "$DIR/redis-$port.log" \
      --save "" --appendonly no >/dev/null
  done
  local i
  for port in "${PORTS[@]}"; do
    for ((i = 0; i < 100; i++)); do port_open "$port" && break; sleep 0.1; done
    port_open "$port" || fail "redis-server did not start on 127.0.0.1:$port (see $DIR/redis-$port.log)"
  done
  say "creating the Redis Cluster (3 masters, 3 replicas)"
  redis-cli --cluster create $(printf '127.0.0.1:%s ' "${PORTS[@]}") \
    --cluster-replicas 1 --cluster-yes >"$DIR/create.log" 2>&1 ||
    fail "redis-cli --cluster create failed (see $DIR/create.log)"
  for ((i = 0; i < 300; i++)); do all_ok && break; sleep 0.1; done
  all_ok || fail "the Redis Cluster did not reach cluster_state:ok within 30s"
  # The replicas must be in sync before a failover can be asked of them.
  for ((i = 0; i < 300; i++)); do
    [[ $(redis-cli -p "${PORTS[0]}" cluster nodes | grep -c ' slave .* connected') -eq 3 ]] && break
    sleep 0.1
  done
  say "the Redis Cluster is up on 127.0.0.1:${PORTS[0]}-${PORTS[-1]}"
}

stop() {
  local port pid stopped=0
  for port in "${PORTS[@]}"; do
    [[ -f $DIR/redis-$port.pid ]] || continue
    pid=$(<"$DIR/redis-$port.pid")
    # Only a server this script started: its pid file names a live redis-server.
    if [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server* ]]; then
      redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
      stopped=$((stopped + 1))
    fi
    rm -f "$DIR/redis-$port.pid"
  done
  for port in "${PORTS[@]}"; do
    for ((i = 0; i < 50; i++)); do port_open "$port" || break; sleep 0.1; done
  done
  say "stopped $stopped Redis Cluster node(s)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) fail "usage: $0 start|stop|status" ;;
esac
