#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on loopback, from the system's rabbitmq-server package, beside (not
# instead of) a RabbitMQ on 5672: nodes hc1@localhost, hc2@localhost, hc3@localhost, AMQP on
# 127.0.0.1:5681-5683, Erlang distribution on 25681-25683, no plugins, data and logs under
# $RABBITMQ_CLUSTER_DIR (default: $TMPDIR/hybrid-cluster-rabbitmq), with a cookie of its own.
#
#   ./scripts/rabbitmq-cluster.sh start          # idempotent: starts what is not running
#   ./scripts/rabbitmq-cluster.sh status         # exit 0 when all three run as one cluster
#   ./scripts/rabbitmq-cluster.sh urls           # the AMQP URLs, comma-separated
#   ./scripts/rabbitmq-cluster.sh ctl hc2 stop_app   # rabbitmqctl against one node
#   ./scripts/rabbitmq-cluster.sh stop           # stops the three nodes, removes their data
set -euo pipefail

NODES=(hc1 hc2 hc3)
AMQP_PORTS=(5681 5682 5683)
DIST_PORTS=(25681 25682 25683)
BASE="${RABBITMQ_CLUSTER_DIR:-${TMPDIR:-/tmp}/hybrid-cluster-rabbitmq}"

say() { printf '==> %s\n' "$*" >&2; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The package's /usr/sbin wrappers switch to the rabbitmq user and its cookie; the scripts
# behind them run as whoever calls them, which keeps this cluster's cookie and files ours.
bin() {
  if [[ -x /usr/lib/rabbitmq/bin/$1 ]]; then echo "/usr/lib/rabbitmq/bin/$1"
  elif command -v "$1" >/dev/null; then command -v "$1"
  else fail "$1 is missing: install the rabbitmq-server package"
  fi
}

node_env() { # index: the environment of one node, for the server and for rabbitmqctl
  local i=$1 name=${NODES[$1]} dir="$BASE/${NODES[$1]}"
  echo HOME="$BASE" \
    RABBITMQ_CONF_ENV_FILE="$BASE/rabbitmq-env.conf" \
    RABBITMQ_NODENAME="$name@localhost" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="${AMQP_PORTS[$i]}" \
    RABBITMQ_DIST_PORT="${DIST_PORTS[$i]}" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$BASE/enabled_plugins" \
    RABBITMQ_CONFIG_FILE="$BASE/rabbitmq.conf" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid"
}

index_of() { # node name -> index
  local i
  for i in "${!NODES[@]}"; do [[ ${NODES[$i]} == "$1" ]] && { echo "$i"; return; }; done
  fail "unknown node $1 (one of ${NODES[*]})"
}

ctl() { # index args...
  local i=$1; shift
  # shellcheck disable=SC2046 # node_env prints NAME=value words without spaces
  env $(node_env "$i") "$(bin rabbitmqctl)" -q -n "${NODES[$i]}@localhost" "$@"
}

running() { ctl "$1" await_startup --timeout 1 >/dev/null 2>&1; }

prepare() {
  mkdir -p "$BASE"
  local i
  for i in "${!NODES[@]}"; do mkdir -p "$BASE/${NODES[$i]}/mnesia" "$BASE/${NODES[$i]}/log"; done
  [[ -f $BASE/.erlang.cookie ]] || {
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$BASE/.erlang.cookie")
  }
  chmod 400 "$BASE/.erlang.cookie"
  : >"$BASE/rabbitmq-env.conf"
  echo '[].' >"$BASE/enabled_plugins"
  printf '%s\n' 'loopback_users.guest = true' 'log.console = false' >"$BASE/rabbitmq.conf"
}

start_node() { # index
  local i=$1
  running "$i" && return 0
  say "starting ${NODES[$i]}@localhost (AMQP 127.0.0.1:${AMQP_PORTS[$i]})"
  # shellcheck disable=SC2046
  env $(node_env "$i") "$(bin rabbitmq-server)" -detached >/dev/null 2>&1 ||
    fail "${NODES[$i]}@localhost did not start; see $BASE/${NODES[$i]}/log"
}

await_node() { # index
  # `rabbitmq-server -detached` returns before the node registers with epmd, and
  # await_startup gives up at once on a node not registered yet: first wait for it to answer.
  local tries
  for ((tries = 0; tries < 600; tries++)); do
    ctl "$1" ping >/dev/null 2>&1 && break
    sleep 0.2
  done
  ctl "$1" await_startup --timeout 120 >/dev/null ||
    fail "${NODES[$1]}@localhost did not finish starting; see $BASE/${NODES[$1]}/log"
}

member() { # index: whether the node is among hc1's running nodes
  ctl 0 cluster_status --formatter json 2>/dev/null | grep -q "\"${NODES[$1]}@localhost\""
}

join() { # index
  member "$1" && return 0
  say "joining ${NODES[$1]}@localhost to ${NODES[0]}@localhost"
  ctl "$1" stop_app >/dev/null
  ctl "$1" join_cluster "${NODES[0]}@localhost" >/dev/null
  ctl "$1" start_app >/dev/null
  await_node "$1"
}

start() {
  local began=$SECONDS i
  if [[ -d $BASE ]] && status >/dev/null; then say "RabbitMQ cluster already running: $(urls)"; return 0; fi
  prepare
  for i in "${!NODES[@]}"; do start_node "$i"; done
  for i in "${!NODES[@]}"; do await_node "$i"; done
  for i in 1 2; do join "$i"; done
  status >/dev/null || fail "the cluster did not form; see $BASE/*/log"
  say "RabbitMQ cluster up in $((SECONDS - began))s: $(urls)"
}

status() { # one rabbitmqctl call: the nodes hc1 sees running in its cluster
  local i ok=0 running_nodes
  running_nodes=$(ctl 0 cluster_status --formatter json 2>/dev/null | grep -o '"running_nodes":\[[^]]*\]' || true)
  for i in "${!NODES[@]}"; do
    if [[ $running_nodes == *"\"${NODES[$i]}@localhost\""* ]]; then echo "${NODES[$i]}@localhost running (127.0.0.1:${AMQP_PORTS[$i]})"
    else echo "${NODES[$i]}@localhost not running in the cluster"; ok=1
    fi
  done
  return $ok
}

stop() {
  local i
  [[ -d $BASE ]] || { say "no cluster under $BASE"; return 0; }
  for i in "${!NODES[@]}"; do
    if running "$i"; then say "stopping ${NODES[$i]}@localhost"; ctl "$i" stop >/dev/null || true; fi
  done
  # A node that never finished starting does not answer rabbitmqctl: its Erlang VM, started
  # with this directory in its environment, goes too, or it would keep its ports (and an old
  # cookie) from the next start.
  pkill -f -- "$BASE" 2>/dev/null || true
  rm -rf "$BASE"
}

urls() {
  local port out=""
  for port in "${AMQP_PORTS[@]}"; do out+="${out:+,}amqp://guest:guest@127.0.0.1:$port/%2f"; done
  echo "$out"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) [[ -d $BASE ]] || { echo "not started"; exit 1; }; status ;;
  urls) urls ;;
  ctl) [[ $# -ge 3 ]] || fail "usage: $0 ctl NODE COMMAND..."; i=$(index_of "$2"); shift 2; ctl "$i" "$@" ;;
  *) fail "usage: $0 start|stop|status|urls|ctl NODE COMMAND..." ;;
esac
