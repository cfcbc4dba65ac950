#!/usr/bin/env bash
# Runs the whole test suite: starts Redis and RabbitMQ on loopback when they are not running
# (installing them from the system's packages when they are missing, as it installs Chromium
# for the status-page test), then runs every test of the workspace, doc tests included.
#
#   ./scripts/test.sh            # everything
#   ./scripts/test.sh -E 'test(lease)'   # extra arguments go to cargo-nextest (or cargo test)
#
# REDIS_URL and AMQP_URL point the tests at other servers; the defaults are the loopback ones
# this script starts. REDIS_CLUSTER_URLS (comma-separated seeds) does the same for the Redis
# Cluster tests; by default the script starts scripts/redis-cluster.sh's loopback cluster when
# it is not running, and stops it at the end. RABBITMQ_CLUSTER_URLS (comma-separated) points
# the RabbitMQ-cluster test at a cluster run by scripts/rabbitmq-cluster.sh elsewhere; by
# default this script starts it when it is not running, and stops it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export REDIS_CLUSTER_URLS="${REDIS_CLUSTER_URLS:-redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002}"

say() { printf '==> %s\n' "$*" >&2; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() { # port seconds name
  local port=$1 seconds=$2 name=$3 i
  for ((i = 0; i < seconds * 10; i++)); do
    port_open "$port" && return 0
    sleep 0.1
  done
  fail "$name did not start listening on 127.0.0.1:$port within ${seconds}s"
}

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else return 1
  fi
}

apt_updated=""
install_package() { # command package
  command -v "$1" >/dev/null && return 0
  command -v apt-get >/dev/null ||
    fail "$1 is missing and this system has no apt-get: install $2 yourself, or set REDIS_URL / AMQP_URL to running servers"
  say "installing $2 from the system's packages"
  if [[ -z $apt_updated ]]; then
    as_root apt-get update -qq || fail "cannot run apt-get as root to install $2: install it yourself, or set REDIS_URL / AMQP_URL to running servers"
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null ||
    fail "installing $2 failed: install it yourself, or set REDIS_URL / AMQP_URL to running servers"
}

is_loopback() { [[ $1 == *"127.0.0.1"* || $1 == *"localhost"* || $1 == *"[::1]"* ]]; }

ensure_redis() {
  is_loopback "$REDIS_URL" || { say "using Redis at REDIS_URL (not loopback): not starting one"; return; }
  port_open 6379 && { say "Redis is running on 127.0.0.1:6379"; return; }
  install_package redis-server redis-server
  say "starting Redis on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no >/dev/null
  wait_for_port 6379 20 Redis
}

ensure_rabbitmq() {
  is_loopback "$AMQP_URL" || { say "using RabbitMQ at AMQP_URL (not loopback): not starting one"; return; }
  port_open 5672 && { say "RabbitMQ is running on 127.0.0.1:5672"; return; }
  install_package rabbitmq-server rabbitmq-server
  say "starting RabbitMQ on 127.0.0.1:5672"
  # The Debian package may have started it already when installed.
  port_open 5672 || as_root rabbitmq-server -detached >/dev/null 2>&1 || rabbitmq-server -detached >/dev/null
  wait_for_port 5672 120 RabbitMQ
}

redis_cluster_started=""
ensure_redis_cluster() {
  is_loopback "$REDIS_CLUSTER_URLS" || { say "using the Redis Cluster at REDIS_CLUSTER_URLS (not loopback): not starting one"; return; }
  ./scripts/redis-cluster.sh status 2>/dev/null && return
  install_package redis-server redis-server
  ./scripts/redis-cluster.sh start
  redis_cluster_started=1
}

# Only what this run started is stopped.
stop_redis_cluster() {
  if [[ -n $redis_cluster_started ]]; then ./scripts/redis-cluster.sh stop || true; fi
}

# The RabbitMQ-cluster test (layers/routing/tests/rabbitmq_cluster.rs) runs on a 3-node cluster
# on loopback: started here when absent, and stopped at the end only if this run started it.
rabbitmq_cluster_started=""
ensure_rabbitmq_cluster() {
  if [[ -n ${RABBITMQ_CLUSTER_URLS:-} ]]; then say "using the RabbitMQ cluster at RABBITMQ_CLUSTER_URLS"; return; fi
  install_package rabbitmq-server rabbitmq-server
  if ./scripts/rabbitmq-cluster.sh status >/dev/null 2>&1; then say "the RabbitMQ cluster is running"; return; fi
  ./scripts/rabbitmq-cluster.sh start
  rabbitmq_cluster_started=1
}

# Only what this run started is stopped.
stop_clusters() {
  stop_redis_cluster
  if [[ -n $rabbitmq_cluster_started ]]; then ./scripts/rabbitmq-cluster.sh stop || true; fi
}

ensure_chromium() {
  # The status page is tested in a real headless browser.
  if [[ -n ${CHROMIUM:-} ]]; then say "using Chromium at CHROMIUM=$CHROMIUM"; return; fi
  command -v chromium >/dev/null && { say "Chromium is installed"; return; }
  install_package chromium chromium
}

ensure_redis
ensure_rabbitmq
trap stop_clusters EXIT
ensure_redis_cluster
ensure_rabbitmq_cluster
ensure_chromium

if cargo nextest --version >/dev/null 2>&1; then
  say "running the test suite (cargo-nextest)"
  cargo nextest run --workspace --no-fail-fast "$@"
else
  say "running the test suite (cargo test; install cargo-nextest for a faster run)"
  cargo test --workspace --no-fail-fast "$@"
fi
say "running the doc tests"
cargo test --workspace --doc --no-fail-fast
