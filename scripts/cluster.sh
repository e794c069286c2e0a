#!/usr/bin/env bash
# A local three-node taskraft cluster on 127.0.0.1.
#
#   scripts/cluster.sh up            build (release), start nodes 1-3, wait for a leader
#                                    and for each node started to answer
#   scripts/cluster.sh down          stop every node (SIGTERM, then SIGKILL after 10 s)
#   scripts/cluster.sh status        process state of each node, then the cluster's view
#   scripts/cluster.sh logs N [-f]   the log of node N (-f follows it)
#   scripts/cluster.sh kill N        SIGKILL node N; returns once its ports are free
#   scripts/cluster.sh stop N        SIGTERM node N and wait for it
#   scripts/cluster.sh start N       start node N on its existing data, wait until it answers
#   scripts/cluster.sh pause N       SIGSTOP node N
#   scripts/cluster.sh resume N      SIGCONT node N
#
# Data and logs live under $TASKRAFT_CLUSTER_DIR (default .cluster/). Running
# `up` again restarts stopped nodes on their data. Node N serves the client
# API on port $TASKRAFT_API_PORT_BASE+N (7000+N) and Raft on
# $TASKRAFT_RAFT_PORT_BASE+N (7100+N), and Prometheus metrics at /metrics on
# $TASKRAFT_METRICS_PORT_BASE+N (7200+N). The script signals only the processes
# whose PIDs it recorded, after checking that each PID is still that node.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/processes.sh
source "$root/scripts/lib/processes.sh"
# shellcheck source=scripts/lib/status.sh
source "$root/scripts/lib/status.sh"
cluster_dir=${TASKRAFT_CLUSTER_DIR:-$root/.cluster}
bin=${TASKRAFT_BIN:-$root/target/release/taskraft}
api_port_base=${TASKRAFT_API_PORT_BASE:-7000}
raft_port_base=${TASKRAFT_RAFT_PORT_BASE:-7100}
metrics_port_base=${TASKRAFT_METRICS_PORT_BASE:-7200}
nodes=(1 2 3)

api_addr() { echo "127.0.0.1:$((api_port_base + $1))"; }
raft_addr() { echo "127.0.0.1:$((raft_port_base + $1))"; }
metrics_addr() { echo "127.0.0.1:$((metrics_port_base + $1))"; }
endpoints() { local n list=(); for n in "${nodes[@]}"; do list+=("$(api_addr "$n")"); done; (IFS=,; echo "${list[*]}"); }
initial_cluster() {
  local n list=()
  for n in "${nodes[@]}"; do list+=("$n=$(api_addr "$n")/$(raft_addr "$n")"); done
  (IFS=,; echo "${list[*]}")
}
node_dir() { echo "$cluster_dir/node$1"; }
pid_file() { echo "$(node_dir "$1")/pid"; }

die() { echo "cluster.sh: $*" >&2; exit 1; }

check_node() {
  [[ "${1:-}" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "${#nodes[@]}" ] || die "no node '${1:-}'; nodes are ${nodes[*]}"
}

# Prints the PID of node N if the recorded process is still that node.
node_pid() {
  local file pid
  file=$(pid_file "$1")
  [ -f "$file" ] || return 1
  pid=$(cat "$file")
  [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" || return 1
  # Guard against PID reuse: the process must be our node with this id.
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "node --id $1 " || return 1
  echo "$pid"
}

build() {
  if [ "${TASKRAFT_SKIP_BUILD:-0}" != 1 ]; then
    echo "building taskraft (release)..."
    (cd "$root" && cargo build --release --quiet --bin taskraft)
  fi
  [ -x "$bin" ] || die "no binary at $bin"
}

# Waits until node N's ports are free (see wait_ports_free): a node started
# while a killed one still holds them cannot listen and exits.
wait_node_ports_free() {
  wait_ports_free 30 $((api_port_base + $1)) $((raft_port_base + $1)) $((metrics_port_base + $1)) || die "node $1 cannot start yet"
}

start_node() {
  local n=$1 dir pid
  dir=$(node_dir "$n")
  if pid=$(node_pid "$n"); then
    echo "node $n is already running (pid $pid)"
    return
  fi
  wait_node_ports_free "$n"
  mkdir -p "$dir"
  "$bin" node --id "$n" --api-addr "$(api_addr "$n")" --raft-addr "$(raft_addr "$n")" \
    --metrics-addr "$(metrics_addr "$n")" --data-dir "$dir/data" --initial-cluster "$(initial_cluster)" ${TASKRAFT_NODE_ARGS:-} \
    >> "$dir/node.log" 2>&1 < /dev/null &
  echo $! > "$(pid_file "$n")"
  started_nodes+=("$n")
  echo "node $n started (pid $!): api $(api_addr "$n"), raft $(raft_addr "$n"), metrics http://$(metrics_addr "$n")/metrics, log $dir/node.log"
}

signal_node() {
  local n=$1 signal=$2 pid
  pid=$(node_pid "$n") || die "node $n is not running"
  kill "-$signal" "$pid"
  echo "sent SIG$signal to node $n (pid $pid)"
}

stop_node() {
  local n=$1 pid waited=0
  pid=$(node_pid "$n") || { echo "node $n is not running"; return; }
  kill -CONT "$pid" 2>/dev/null || true
  kill -TERM "$pid"
  while alive "$pid"; do
    if [ "$waited" -ge 500 ]; then
      echo "node $n did not stop within 10 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.02
    waited=$((waited + 1))
  done
  rm -f "$(pid_file "$n")"
  echo "node $n stopped"
}

# A node that exited (a bad setting, a data directory it cannot open) says
# why at the end of its log; waiting on would not help. Its PID, not
# node_pid: a node just started may not have exec'd yet.
die_if_exited() {  # die_if_exited WHAT N...
  local what=$1 n
  shift
  for n in "$@"; do
    if ! alive "$(cat "$(pid_file "$n")" 2> /dev/null)"; then
      echo
      tail -n 5 "$(node_dir "$n")/node.log" >&2
      die "node $n exited before $what; its log is $(node_dir "$n")/node.log"
    fi
  done
}

# Waits until node N answers on its client API (no leader needed: it may
# be the only node running).
wait_for_answer() {  # wait_for_answer N
  local deadline=$((SECONDS + 60))
  echo -n "waiting for node $1 to answer"
  while [ "$SECONDS" -lt "$deadline" ]; do
    if "$bin" --endpoints "$(api_addr "$1")" --timeout 2s cluster status > /dev/null 2>&1; then
      echo " - it does"
      return
    fi
    die_if_exited "it answered" "$1"
    echo -n "."
    sleep 0.5
  done
  echo
  die "node $1 did not answer within 60 s; its log is $(node_dir "$1")/node.log"
}

# Waits until the cluster has a leader and each node N... (those this `up`
# started) answers for itself: a node that exited at its start is then
# caught even when the others already have a leader.
wait_for_ready() {  # wait_for_ready N...
  local deadline=$((SECONDS + 60)) status leader silent=""
  echo -n "waiting for a leader"
  while [ "$SECONDS" -lt "$deadline" ]; do
    status=$("$bin" --endpoints "$(endpoints)" --timeout 2s cluster status 2>/dev/null || true)
    leader=$(status_leader <<< "$status")
    silent=$(status_unreachable "$@" <<< "$status")
    if [ -n "$leader" ] && [ "$leader" != 0 ] && [ -z "$silent" ]; then
      echo " - node $leader leads"
      return
    fi
    die_if_exited "the cluster was up" "${nodes[@]}"
    echo -n "."
    sleep 0.5
  done
  echo
  if [ -n "$silent" ]; then die "node(s) $silent did not answer within 60 s; see the logs under $cluster_dir"; fi
  die "no leader after 60 s; see the logs under $cluster_dir"
}

command=${1:-}
case "$command" in
  up)
    build
    mkdir -p "$cluster_dir"
    started_nodes=()
    for n in "${nodes[@]}"; do start_node "$n"; done
    wait_for_ready "${started_nodes[@]}"
    echo
    echo "cluster is up. endpoints: $(endpoints)"
    echo "try:   $bin submit -- echo hello"
    echo "       $bin cluster status"
    echo "stop:  scripts/cluster.sh down"
    ;;
  down)
    for n in "${nodes[@]}"; do stop_node "$n"; done
    ;;
  status)
    n_running=0
    for n in "${nodes[@]}"; do
      if pid=$(node_pid "$n"); then
        state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo "?")
        echo "node $n: running (pid $pid, state $state)"
        n_running=$((n_running + 1))
      else
        echo "node $n: not running"
      fi
    done
    if [ "$n_running" -gt 0 ] && [ -x "$bin" ]; then
      "$bin" --endpoints "$(endpoints)" --timeout 3s cluster status || true
    fi
    ;;
  logs)
    check_node "${2:-}"
    if [ "${3:-}" = "-f" ]; then tail -n 100 -f "$(node_dir "$2")/node.log"; else tail -n 200 "$(node_dir "$2")/node.log"; fi
    ;;
  kill) check_node "${2:-}"; signal_node "$2" KILL; rm -f "$(pid_file "$2")"; wait_node_ports_free "$2" ;;
  stop) check_node "${2:-}"; stop_node "$2" ;;
  start)
    check_node "${2:-}"
    [ -x "$bin" ] || build
    started_nodes=()
    start_node "$2"
    if [ "${#started_nodes[@]}" -gt 0 ]; then wait_for_answer "$2"; fi
    ;;
  pause) check_node "${2:-}"; signal_node "$2" STOP ;;
  resume) check_node "${2:-}"; signal_node "$2" CONT ;;
  *)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    [ -z "$command" ] && exit 0
    die "unknown command '$command'"
    ;;
esac
