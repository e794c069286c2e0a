#!/usr/bin/env bash
# Benchmarks taskraft side by side with etcd 3.4 (Debian's etcd-server), three
# members each on loopback, fsync on, driven by the same load generator
# (cluster-tests/src/bin/loadgen/) with the same settings. Each scenario
# runs on a fresh cluster of each system, interleaved A/B/A/B; the report
# gives the absolute numbers and the median of the per-pair ratios.
#
#   scripts/bench.sh [--quick] [--scenario NAME] [--pairs N] [--out DIR]
#
# Scenarios (more to come, see issue 5): submit_c1, submit_c16, submit_c64
# (committed submissions per second against etcd puts per second at 1, 16
# and 64 clients; cpu_per_commit comes from submit_c64), submit_batch
# (SubmitTasks of 100, against submit_c64) and failover (kill -9 of the
# leader, 20 trials each: taskraft and etcd with matched timeouts, heartbeat
# 50 ms and election timeout 300 ms, then taskraft at its defaults; the time
# until a write sent after the kill commits, and for taskraft until the next
# task starts; a trial that loses an acknowledged task fails the run),
# submit_to_start (runnable tasks in open loop at 100/s and at half the etcd
# c16 rate measured in the same pair: p50 and p99 from submit to process
# start) and exec_rate (no-op tasks run per second by the cluster against
# the machine's raw spawn rate of `true` with as many processes at a time as
# the cluster has slots), and restart_1m, mem_1m and snapshot_1m, which share
# one fill per pair and system: 1,000,000 pending tasks against 1,000,000 etcd
# keys of the same payload; then each node's resident memory growth, a
# snapshot built on the leader (size, build time), a follower killed with
# -9 while 10,000 more are written (time from its restart until it serves
# the last of them in a local read), and the whole cluster killed with -9
# (time from its restart until a write commits).
# --quick: one pair, 2 s warm-up, 5 s runs, 3 failover trials, 1,000 tasks
# for exec_rate, 100,000 items for the scale scenarios. The full run: 3
# pairs, 5 s + 20 s, 5,000 tasks, 1,000,000 items.
# Results: <DIR>/<date>-<host>[-<scenario>].json and .md, DIR being docs/bench/results
# unless --out says otherwise. Each measurement (one system's run in one
# pair, or one system's failover trials) runs on its own: when it fails,
# its clusters' logs go to <DIR>/<date>-<host>[-<scenario>]-failed-logs/<name>/,
# the run goes on without it, and the report, then named -partial, lists
# it; the script then exits 1. A run stopped by a signal reports what
# finished and names the measurement it stopped in. Every process and directory the script makes
# is removed at the end, processes by PID.
set -euo pipefail
# A command that fails under set -e says where, so a failure is never silent.
trap 'echo "bench.sh: line $LINENO: a command exited with status $?" >&2' ERR

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=scripts/lib/processes.sh
source scripts/lib/processes.sh
quick=0
only=""
pairs=""
out_dir="$root/docs/bench/results"
usage() { echo "usage: scripts/bench.sh [--quick] [--scenario NAME] [--pairs N] [--out DIR]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --scenario) [ $# -ge 2 ] || usage; only=$2; shift 2 ;;
    --pairs) [ $# -ge 2 ] || usage; pairs=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || usage; out_dir=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "bench.sh: unknown argument $1" >&2; usage ;;
  esac
done
if [ "$quick" = 1 ]; then
  warmup=2s; duration=5s; pairs=${pairs:-1}; trials=3; exec_tasks=1000; scale_items=100000
else
  warmup=3s; duration=15s; pairs=${pairs:-3}; trials=20; exec_tasks=5000; scale_items=1000000
fi
# Items written while a follower is down, in the restart_1m scenario.
catch_up_items=10000
[[ "$pairs" =~ ^[1-9][0-9]*$ ]] || { echo "bench.sh: --pairs takes a positive number" >&2; usage; }

all_scenarios=(submit_c1 submit_c16 submit_c64 submit_batch submit_to_start exec_rate failover restart_1m mem_1m snapshot_1m)
if [ -n "$only" ]; then
  printf '%s\n' "${all_scenarios[@]}" | grep -qx "$only" || { echo "bench.sh: no scenario $only (${all_scenarios[*]})" >&2; exit 2; }
  scenarios=("$only")
else
  scenarios=("${all_scenarios[@]}")
fi

# Waits until every PID given has exited.
wait_gone() {
  local pid
  for pid in "$@"; do
    while alive "$pid"; do sleep 0.01; done
  done
}
step() { printf '\n==> %s\n' "$*" >&2; }
work=$(mktemp -d /tmp/taskraft-bench.XXXXXX)
etcd_pids=()
report_written=0
# The measurement running now, and where its logs go if it does not finish.
measuring=""
measuring_logs=""
# Measurements that did not finish (see measure), a line each: what, where
# its logs are, and "stopped" for the one a signal stopped.
failed="$work/failed.txt"
: > "$failed"
# Copies the logs of the clusters running now into DIR: the taskraft nodes'
# and the etcd members'.
keep_logs() {  # keep_logs DIR
  local log kept=0
  mkdir -p "$1"
  for log in "$work"/taskraft/node*/node.log; do
    [ -e "$log" ] || continue
    cp "$log" "$1/taskraft-$(basename "$(dirname "$log")").log"
    kept=1
  done
  for log in "$work"/etcd/n*.log; do
    [ -e "$log" ] || continue
    cp "$log" "$1/etcd-$(basename "$log")"
    kept=1
  done
  [ "$kept" = 1 ] || rmdir "$1"
}
cleanup() {
  # A measurement still running (the script was stopped by a signal): its
  # children (the load generator, etcd members) and then itself, by PID; its
  # own exit stops the clusters it started.
  if [ -s "$work/measure.pid" ]; then
    local measure_pid
    measure_pid=$(cat "$work/measure.pid")
    pkill -TERM -P "$measure_pid" 2> /dev/null || true
    kill -TERM "$measure_pid" 2> /dev/null || true
    wait_gone "$measure_pid"
    # Its exit kept its clusters' logs; the report names it and them.
    [ -d "$measuring_logs" ] || measuring_logs=""
    printf '%s\t%s\tstopped\n' "$measuring" "$measuring_logs" >> "$failed"
    echo "bench.sh: stopped in $measuring${measuring_logs:+; its logs are in $measuring_logs}" >&2
  fi
  # A failed scenario still leaves the report of those that finished.
  if [ "$report_written" = 0 ] && [ -s "${results:-}" ] && declare -F write_report > /dev/null; then
    echo "bench.sh: stopped before the end; writing the report of what finished" >&2
    report_written=1
    write_report "-partial" stopped || true
  fi
  # Stopped in the middle of a run: the logs of its clusters say why.
  if [ "$report_written" != "done" ] && { compgen -G "$work/taskraft/node*/node.log" || compgen -G "$work/etcd/n*.log"; } > /dev/null; then
    local logs
    logs="$out_dir/$(date -u +%Y-%m-%d)-$(hostname -s)${only:+-$only}-partial-logs"
    keep_logs "$logs"
    echo "bench.sh: the clusters' logs are in $logs" >&2
  fi
  # Defined further down: an exit before that point has no etcd to stop.
  if declare -F stop_etcd > /dev/null; then stop_etcd; fi
  TASKRAFT_CLUSTER_DIR="$work/taskraft" TASKRAFT_API_PORT_BASE=19000 TASKRAFT_RAFT_PORT_BASE=19100 TASKRAFT_METRICS_PORT_BASE=19200 \
    scripts/cluster.sh down > /dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

step "building taskraft and the load generator (release, statically linked)"
scripts/build-static.sh
taskraft_bin="$root/target/x86_64-unknown-linux-gnu/release/taskraft"
loadgen="$root/target/x86_64-unknown-linux-gnu/release/loadgen"
if ! command -v etcd > /dev/null; then
  step "installing etcd (Debian's etcd-server)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server > /dev/null
fi
# Read to the end: `| head -n1` closes the pipe early, and under pipefail the
# etcd killed by SIGPIPE failed the script about once in 300 runs.
etcd_version=$(etcd --version | sed -n 1p)

# Settings of the next taskraft cluster started (variables of its nodes'
# environment), and etcd's Raft timings: empty for the defaults.
taskraft_env=()
etcd_timing=()
start_taskraft() {
  rm -rf "$work/taskraft"
  up_taskraft
}
# Starts the nodes that are not running, on their data.
up_taskraft() {
  env "${taskraft_env[@]}" TASKRAFT_CLUSTER_DIR="$work/taskraft" TASKRAFT_API_PORT_BASE=19000 TASKRAFT_RAFT_PORT_BASE=19100 TASKRAFT_METRICS_PORT_BASE=19200 \
    TASKRAFT_SKIP_BUILD=1 TASKRAFT_BIN="$taskraft_bin" scripts/cluster.sh up > "$work/cluster.out" 2>&1 ||
    { cat "$work/cluster.out" >&2; exit 1; }
  taskraft_pids=$(cat "$work"/taskraft/node{1,2,3}/pid | paste -sd,)
}
stop_taskraft() {
  TASKRAFT_CLUSTER_DIR="$work/taskraft" TASKRAFT_API_PORT_BASE=19000 TASKRAFT_RAFT_PORT_BASE=19100 TASKRAFT_METRICS_PORT_BASE=19200 \
    scripts/cluster.sh down > /dev/null 2>&1
  rm -rf "$work/taskraft"
}
# Waits until the ports of etcd members N... are free: a member killed with
# -9 holds them for a while after its PID is gone (see wait_ports_free), as
# `scripts/cluster.sh kill` waits for a taskraft node's.
wait_etcd_ports_free() {  # wait_etcd_ports_free N...
  local n
  for n in "$@"; do wait_ports_free 30 "2379$n" "2380$n" || exit 1; done
}
# Starts etcd member N (1-3) on its data directory; its PID goes to etcd_pids[N-1].
start_etcd_member() {
  local n=$1 cluster=n1=http://127.0.0.1:23801,n2=http://127.0.0.1:23802,n3=http://127.0.0.1:23803
  wait_etcd_ports_free "$n"
  etcd --name "n$n" --data-dir "$work/etcd/n$n" --initial-cluster "$cluster" \
    --initial-cluster-token bench --initial-cluster-state new "${etcd_timing[@]}" \
    --listen-client-urls "http://127.0.0.1:2379$n" --advertise-client-urls "http://127.0.0.1:2379$n" \
    --listen-peer-urls "http://127.0.0.1:2380$n" --initial-advertise-peer-urls "http://127.0.0.1:2380$n" \
    >> "$work/etcd/n$n.log" 2>&1 &
  etcd_pids[n - 1]=$!
  # Not a job of this shell, which would print "Killed" for every member a
  # failover trial kills; wait_gone, not wait, then sees it end.
  disown "${etcd_pids[n - 1]}"
}
start_etcd() {
  local n
  rm -rf "$work/etcd"
  mkdir -p "$work/etcd"
  etcd_pids=()
  for n in 1 2 3; do start_etcd_member "$n"; done
  # Ready when the load generator can find a leader.
  local deadline=$((SECONDS + 30))
  until "$loadgen" --target etcd --endpoints "$etcd_endpoints" --warmup 0s --duration 1ms > /dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { tail -n 20 "$work"/etcd/n*.log >&2; echo "etcd did not elect a leader" >&2; exit 1; }
    etcd_members_alive
    sleep 0.3
  done
  # Two members elect a leader: the third may have exited all the same.
  etcd_members_alive
}
etcd_members_alive() {
  local n
  for n in 1 2 3; do
    alive "${etcd_pids[n - 1]}" || { tail -n 20 "$work/etcd/n$n.log" >&2; echo "etcd member n$n exited at its start" >&2; exit 1; }
  done
}
stop_etcd() {
  local pid
  for pid in "${etcd_pids[@]}"; do kill "$pid" 2> /dev/null || true; done
  wait_gone "${etcd_pids[@]}"
  etcd_pids=()
  rm -rf "$work/etcd"
}
etcd_endpoints=127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793
taskraft_endpoints=127.0.0.1:19001,127.0.0.1:19002,127.0.0.1:19003

# The load of each scenario: clients connections batch.
load_of() {
  case "$1" in
    submit_c1) echo "1 1 1" ;;
    submit_c16) echo "16 4 1" ;;
    submit_c64 | submit_batch) echo "64 8 1" ;;
  esac
}

results="$work/results.jsonl"
: > "$results"
run() {  # run SCENARIO LABEL TARGET PAIR CLIENTS CONNECTIONS BATCH
  local scenario=$1 system=$2 target=$3 pair=$4 clients=$5 connections=$6 batch=$7 out
  printf '  %-13s %-8s pair %d/%d: ' "$scenario" "$system" "$pair" "$pairs" >&2
  if [ "$target" = taskraft ]; then
    start_taskraft
    out=$("$loadgen" --target taskraft --endpoints "$taskraft_endpoints" --server-pids "$taskraft_pids" \
      --clients "$clients" --connections "$connections" --batch "$batch" --warmup "$warmup" --duration "$duration" 2> "$work/loadgen.err") ||
      { cat "$work/loadgen.err" >&2; exit 1; }
    stop_taskraft
  else
    start_etcd
    out=$("$loadgen" --target etcd --endpoints "$etcd_endpoints" --server-pids "$(IFS=,; echo "${etcd_pids[*]}")" \
      --clients "$clients" --connections "$connections" --warmup "$warmup" --duration "$duration" 2> "$work/loadgen.err") ||
      { cat "$work/loadgen.err" >&2; exit 1; }
    stop_etcd
  fi
  echo "$out" | python3 -c 'import json, sys; r = json.load(sys.stdin); print("%9.0f/s  p50 %.2f ms  p99 %.2f ms  cpu %.0f us/item  errors %d" % (r["items_per_s"], r["p50_us"] / 1000, r["p99_us"] / 1000, r["cpu_us_per_item"], r["errors"]) + "".join("\n      %d x %s, the first: %s" % (k["count"], code, k["first"]) for code, k in r.get("error_kinds", {}).items()))' >&2
  echo "{\"scenario\":\"$scenario\",\"system\":\"$system\",\"pair\":$pair,\"result\":$out}" >> "$results"
}

# Runs the load generator with ARGS... against a fresh taskraft cluster and
# records its result under SCENARIO LABEL PAIR; prints SUMMARY (a Python
# format over the result) as the progress line.
run_taskraft_mode() {  # run_taskraft_mode SCENARIO LABEL PAIR SUMMARY ARGS...
  local scenario=$1 system=$2 pair=$3 summary=$4 out
  shift 4
  printf '  %-15s %-11s pair %d/%d: ' "$scenario" "$system" "$pair" "$pairs" >&2
  start_taskraft
  out=$("$loadgen" --target taskraft --endpoints "$taskraft_endpoints" --server-pids "$taskraft_pids" "$@" 2> "$work/loadgen.err") ||
    { cat "$work/loadgen.err" >&2; exit 1; }
  stop_taskraft
  echo "$out" | python3 -c "import json, sys; r = json.load(sys.stdin); print($summary)" >&2
  echo "{\"scenario\":\"$scenario\",\"system\":\"$system\",\"pair\":$pair,\"result\":$out}" >> "$results"
}
latency_summary='"%7.0f tasks/s  p50 %.2f ms  p99 %.2f ms  errors %d" % (r["items_per_s"], r["p50_us"] / 1000, r["p99_us"] / 1000, r["errors"]) + ("  not started after 10 s: %d (percentiles are lower bounds)" % r["not_started"] if r.get("not_started") else "")'

submit_to_start_pair() {  # submit_to_start_pair PAIR
  local pair=$1 etcd_rate c16
  # etcd's c16 rate of this pair: from submit_c16 when it ran, else measured here.
  c16=$(grep -F "\"scenario\":\"submit_c16\",\"system\":\"etcd\",\"pair\":$pair," "$results" | tail -n 1 || true)
  if [ -z "$c16" ]; then
    run submit_to_start etcd_c16 etcd "$pair" 16 4 1
    c16=$(tail -n 1 "$results")
  fi
  etcd_rate=$(echo "$c16" | python3 -c 'import json, sys; print("%.0f" % (json.load(sys.stdin)["result"]["items_per_s"] / 2))')
  run_taskraft_mode submit_to_start at_100 "$pair" "$latency_summary" \
    --to-start --rate 100 --clients 64 --warmup "$warmup" --duration "$duration"
  run_taskraft_mode submit_to_start at_half_etcd "$pair" "$latency_summary" \
    --to-start --rate "$etcd_rate" --clients 256 --warmup "$warmup" --duration "$duration"
}

exec_rate_pair() {  # exec_rate_pair PAIR
  local pair=$1 slots
  slots=$((3 * $(nproc)))
  printf '  %-15s %-11s pair %d/%d: ' exec_rate spawn "$pair" "$pairs" >&2
  out=$("$loadgen" --target taskraft --endpoints "$taskraft_endpoints" --spawn --clients "$slots" --warmup "$warmup" --duration "$duration" 2> "$work/loadgen.err") ||
    { cat "$work/loadgen.err" >&2; exit 1; }
  echo "$out" | python3 -c 'import json, sys; r = json.load(sys.stdin); print("%7.0f spawns/s of true, %d at a time" % (r["items_per_s"], r["clients"]))' >&2
  echo "{\"scenario\":\"exec_rate\",\"system\":\"spawn\",\"pair\":$pair,\"result\":$out}" >> "$results"
  run_taskraft_mode exec_rate taskraft "$pair" '"%7.0f tasks/s (%d tasks over %.1f s, on %d nodes; CPU per task: nodes %.0f us, process %.0f us)" % (r["items_per_s"], r["items"], r["seconds"], r["nodes"], r["node_cpu_us_per_task"], r["task_cpu_us_per_task"])' \
    --exec "$exec_tasks" --batch 100 --clients 4
}

json_field() {  # json_field FIELD < JSON
  python3 -c "import json, sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"
}

# The scale scenarios on one fresh cluster of TARGET (see the top).
scale_run() {  # scale_run TARGET PAIR
  local target=$1 pair=$2 endpoints pids batch fill snapshot leader marker follower=0 n t0 await_pid catch_up commit
  local -a pid_list endpoint_list
  IFS=, read -r -a endpoint_list <<< "$([ "$target" = taskraft ] && echo "$taskraft_endpoints" || echo "$etcd_endpoints")"
  if [ "$target" = taskraft ]; then start_taskraft; pids=$taskraft_pids; batch=500; else start_etcd; pids=$(IFS=,; echo "${etcd_pids[*]}"); batch=128; fi
  endpoints=$(IFS=,; echo "${endpoint_list[*]}")
  IFS=, read -r -a pid_list <<< "$pids"
  printf '  scale         %-8s pair %d/%d: filling %d items\n' "$target" "$pair" "$pairs" "$scale_items" >&2
  fill=$("$loadgen" --target "$target" --endpoints "$endpoints" --server-pids "$pids" --fill "$scale_items" \
    --batch "$batch" --clients 8 --connections 4 2> >(sed 's/^/  /' >&2))
  echo "$fill" | python3 -c 'import json, sys; r = json.load(sys.stdin); print("    filled at %.0f items/s; resident memory grew %.0f MiB per node; %d retries of refused batches" % (r["items_per_s"], r["rss_growth_mib_per_node"], r["retried_refused"] + r["retried_uncertain"]))' >&2
  snapshot=$("$loadgen" --target "$target" --endpoints "$endpoints" --snapshot 2> "$work/loadgen.err") ||
    { cat "$work/loadgen.err" >&2; exit 1; }
  echo "$snapshot" | python3 -c 'import json, sys; r = json.load(sys.stdin); print("    snapshot of %.1f MiB in %.0f ms" % (r["bytes"] / 2**20, r["build_ms"]))' >&2
  leader=$(echo "$fill" | json_field leader)
  for n in 1 2 3; do
    if [ "${endpoint_list[n - 1]}" != "$leader" ]; then follower=$n; break; fi
  done
  # A follower killed with -9 misses $catch_up_items writes, then restarts.
  if [ "$target" = taskraft ]; then
    TASKRAFT_CLUSTER_DIR="$work/taskraft" scripts/cluster.sh kill "$follower" > /dev/null
  else
    kill -9 "${etcd_pids[follower - 1]}"
  fi
  wait_gone "${pid_list[follower - 1]}"
  if [ "$target" = etcd ]; then wait_etcd_ports_free "$follower"; fi
  marker=$("$loadgen" --target "$target" --endpoints "$endpoints" --fill "$catch_up_items" --batch "$batch" --clients 8 2> "$work/loadgen.err" | json_field marker) ||
    { cat "$work/loadgen.err" >&2; exit 1; }
  t0=$(date +%s%3N)
  "$loadgen" --target "$target" --endpoints "${endpoint_list[follower - 1]}" --await-read "$marker" --since-unix-ms "$t0" > "$work/await.json" 2> "$work/loadgen.err" &
  await_pid=$!
  if [ "$target" = taskraft ]; then up_taskraft; else start_etcd_member "$follower"; fi
  await_servers "$target" "$await_pid" "$follower"
  catch_up=$(json_field ms < "$work/await.json")
  printf '    a follower killed with -9 served the last of %d missed writes %d ms after its restart\n' "$catch_up_items" "$catch_up" >&2
  # The whole cluster killed with -9, then restarted.
  if [ "$target" = taskraft ]; then
    IFS=, read -r -a pid_list <<< "$taskraft_pids"
    for n in 1 2 3; do TASKRAFT_CLUSTER_DIR="$work/taskraft" scripts/cluster.sh kill "$n" > /dev/null; done
  else
    pid_list=("${etcd_pids[@]}")
    kill -9 "${etcd_pids[@]}"
  fi
  wait_gone "${pid_list[@]}"
  if [ "$target" = etcd ]; then wait_etcd_ports_free 1 2 3; fi
  t0=$(date +%s%3N)
  "$loadgen" --target "$target" --endpoints "$endpoints" --await-commit --since-unix-ms "$t0" > "$work/await.json" 2> "$work/loadgen.err" &
  await_pid=$!
  if [ "$target" = taskraft ]; then up_taskraft; else for n in 1 2 3; do start_etcd_member "$n"; done; fi
  await_servers "$target" "$await_pid" 1 2 3
  commit=$(json_field ms < "$work/await.json")
  printf '    the whole cluster killed with -9 committed a write %d ms after its restart\n' "$commit" >&2
  if [ "$target" = taskraft ]; then stop_taskraft; else stop_etcd; fi
  echo "{\"scenario\":\"scale_1m\",\"system\":\"$target\",\"pair\":$pair,\"result\":{\"fill\":$fill,\"snapshot\":$snapshot,\"catch_up_ms\":$catch_up,\"first_commit_ms\":$commit}}" >> "$results"
}

# Waits for the load generator AWAIT_PID, which waits for the restarted
# members N... of TARGET to serve again. A member that exits meanwhile ends
# the wait at once, with the end of its log, rather than after the load
# generator's deadline of five minutes.
await_servers() {  # await_servers TARGET AWAIT_PID N...
  local target=$1 await_pid=$2 n i=0
  local -a server_pids=() server_logs=()
  shift 2
  for n in "$@"; do
    if [ "$target" = taskraft ]; then
      server_pids+=("$(cat "$work/taskraft/node$n/pid")")
      server_logs+=("$work/taskraft/node$n/node.log")
    else
      server_pids+=("${etcd_pids[n - 1]}")
      server_logs+=("$work/etcd/n$n.log")
    fi
  done
  wait_while_alive "$await_pid" "${server_pids[@]}" && return
  cat "$work/loadgen.err" >&2
  for n in "$@"; do
    if ! alive "${server_pids[i]}"; then
      echo "the end of $target member $n's log:" >&2
      tail -n 20 "${server_logs[i]}" >&2
    fi
    i=$((i + 1))
  done
  exit 1
}

# Waits until a write through the member at ENDPOINT commits again.
wait_rejoined() {  # wait_rejoined TARGET ENDPOINT
  local deadline=$((SECONDS + 30))
  until "$loadgen" --target "$1" --endpoints "$2" --ready > /dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "the restarted member $2 did not rejoin" >&2; exit 1; }
    sleep 0.2
  done
}

failover_trials() {  # failover_trials LABEL TARGET
  local system=$1 target=$2 trial out killed
  if [ "$target" = taskraft ]; then start_taskraft; else start_etcd; fi
  for trial in $(seq 1 "$trials"); do
    printf '  failover      %-16s trial %2d/%d: ' "$system" "$trial" "$trials" >&2
    if [ "$target" = taskraft ]; then
      out=$("$loadgen" --target taskraft --endpoints "$taskraft_endpoints" --server-pids "$taskraft_pids" --failover 2> "$work/loadgen.err") ||
        { cat "$work/loadgen.err" >&2; exit 1; }
      up_taskraft
    else
      out=$("$loadgen" --target etcd --endpoints "$etcd_endpoints" --server-pids "$(IFS=,; echo "${etcd_pids[*]}")" --failover 2> "$work/loadgen.err") ||
        { cat "$work/loadgen.err" >&2; exit 1; }
      killed=$(echo "$out" | python3 -c 'import json, sys; print(json.load(sys.stdin)["killed"][-1])')
      wait_gone "${etcd_pids[killed - 1]}"
      start_etcd_member "$killed"
    fi
    echo "$out" | python3 -c 'import json, sys; r = json.load(sys.stdin); print("commit after %.0f ms (%d writes failed first)" % (r["commit_gap_ms"], r.get("refused_writes", 0)) + ("; task started after %d ms; %d of %d acknowledged lost" % (r["start_gap_ms"], r["lost"], r["acknowledged"]) if "lost" in r else ""))' >&2
    echo "{\"scenario\":\"failover\",\"system\":\"$system\",\"pair\":$trial,\"result\":$out}" >> "$results"
    echo "$out" | python3 -c 'import json, sys; r = json.load(sys.stdin); sys.exit(1 if r.get("lost", 0) else 0)' ||
      { echo "bench.sh: a failover trial lost acknowledged tasks" >&2; exit 1; }
    killed=$(echo "$out" | python3 -c 'import json, sys; print(json.load(sys.stdin)["killed"])')
    wait_rejoined "$target" "$killed"
    sleep 1
  done
  if [ "$target" = taskraft ]; then stop_taskraft; else stop_etcd; fi
}

# The report of every run in $results: tables in markdown, and JSON.
write_report() {  # write_report SUFFIX STOPPED: SUFFIX "-partial" when a measurement failed, STOPPED "stopped" when the run did not end
  local stamp
  step "report"
  mkdir -p "$out_dir"
  stamp="$(date -u +%Y-%m-%d)-$(hostname -s)${only:+-$only}$1"
  python3 - "$results" "$out_dir/$stamp.json" "$out_dir/$stamp.md" "$quick" "$pairs" "$etcd_version" "$2" "$failed" << 'EOF'
import json, platform, statistics, sys
results_path, json_path, md_path, quick, pairs, etcd_version, stopped, failed_path = sys.argv[1:]
unfinished = [dict(zip(("measurement", "logs", "ended"), line.rstrip("\n").split("\t"))) for line in open(failed_path) if line.strip()]
failed = [u for u in unfinished if u.get("ended") != "stopped"]
stopped_in = [u for u in unfinished if u.get("ended") == "stopped"]
logs_of = lambda u: f" (logs: `{u['logs']}`)" if u.get("logs") else ""
rows = [json.loads(line) for line in open(results_path)]
cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(" :\t") if "model name" in open("/proc/cpuinfo").read() else platform.processor()
machine = f"{cpu}, {len(open('/proc/cpuinfo').read().split('processor')) - 1} cores, Linux {platform.release()}"
by = {}
for row in rows:
    by.setdefault((row["scenario"], row["system"]), {})[row["pair"]] = row["result"]
report = {"machine": machine, "etcd": etcd_version, "quick": quick == "1", "pairs": int(pairs), "stopped": stopped == "stopped", "stopped_in": stopped_in, "failed": failed, "scenarios": {}, "runs": rows}
table = []
def pair_ratios_of(scenario, ours, theirs, key):
    a, b = by.get((scenario, ours), {}), by.get((scenario, theirs), {})
    return [a[p][key] / b[p][key] for p in sorted(a) if p in b and a[p][key] and b[p][key]]
def ratio_of(scenario, ours, theirs, key):
    ratios = pair_ratios_of(scenario, ours, theirs, key)
    return statistics.median(ratios) if ratios else None
# A ratio to three digits (a target such as 0.7 can be missed by less than 0.005), then each pair's.
def ratio_text(ratio, pairs):
    if ratio is None:
        return "n/a"
    return f"{ratio:.3f}×" + (f" (pairs {', '.join(format(r, '.3f') for r in pairs)})" if len(pairs) > 1 else "")
def median(scenario, system, key):
    values = [r[key] for r in by.get((scenario, system), {}).values()]
    return statistics.median(values) if values else None
# Microseconds to milliseconds; None (no run of that system finished) stays None.
def ms_of(us):
    return None if us is None else us / 1000
failover = {}
for row in rows:
    if row["scenario"] == "failover":
        failover.setdefault(row["system"], []).append(row["result"])
execution = [row for row in rows if row["scenario"] in ("submit_to_start", "exec_rate", "scale_1m")]
rows = [row for row in rows if row["scenario"] not in ("failover", "submit_to_start", "exec_rate", "scale_1m")]
def quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * len(values) + 0.5)) - 1))] if values else None
if failover:
    report["scenarios"]["failover"] = {
        system: {
            "trials": len(results),
            "commit_gap_p50_ms": quantile([r["commit_gap_ms"] for r in results], 0.50),
            "commit_gap_p99_ms": quantile([r["commit_gap_ms"] for r in results], 0.99),
            "start_gap_p50_ms": quantile([r["start_gap_ms"] for r in results if "start_gap_ms" in r], 0.50),
            "start_gap_p99_ms": quantile([r["start_gap_ms"] for r in results if "start_gap_ms" in r], 0.99),
            "lost": sum(r.get("lost", 0) for r in results),
            "refused_writes": sum(r.get("refused_writes", 0) for r in results),
        }
        for system, results in failover.items()
    }
for scenario in dict.fromkeys(row["scenario"] for row in rows):
    other = "c64" if scenario == "submit_batch" else "etcd"
    entry = {
        "taskraft_items_per_s": median(scenario, "taskraft", "items_per_s"),
        f"{other}_items_per_s": median(scenario, other, "items_per_s"),
        "taskraft_p50_ms": ms_of(median(scenario, "taskraft", "p50_us")),
        "taskraft_p99_ms": ms_of(median(scenario, "taskraft", "p99_us")),
        f"{other}_p50_ms": ms_of(median(scenario, other, "p50_us")),
        f"{other}_p99_ms": ms_of(median(scenario, other, "p99_us")),
        "ratio": ratio_of(scenario, "taskraft", other, "items_per_s"),
        "pair_ratios": pair_ratios_of(scenario, "taskraft", other, "items_per_s"),
    }
    report["scenarios"][scenario] = entry
    table.append((scenario, entry["taskraft_items_per_s"], entry[f"{other}_items_per_s"], other, ratio_text(entry["ratio"], entry["pair_ratios"]),
                  entry["taskraft_p50_ms"], entry[f"{other}_p50_ms"]))
    if scenario == "submit_c64":
        cpu_pairs = pair_ratios_of(scenario, "taskraft", "etcd", "cpu_us_per_item")
        cpu_ratio = statistics.median(cpu_pairs) if cpu_pairs else None
        entry_cpu = {"taskraft_cpu_us": median(scenario, "taskraft", "cpu_us_per_item"),
                     "etcd_cpu_us": median(scenario, "etcd", "cpu_us_per_item"), "ratio": cpu_ratio, "pair_ratios": cpu_pairs}
        report["scenarios"]["cpu_per_commit"] = entry_cpu
        table.append(("cpu_per_commit", entry_cpu["taskraft_cpu_us"], entry_cpu["etcd_cpu_us"], "etcd", ratio_text(cpu_ratio, cpu_pairs), None, None))
if any(row["scenario"] == "submit_to_start" for row in execution):
    entry = {}
    for system in ("at_100", "at_half_etcd"):
        entry[system] = {
            "rate": median("submit_to_start", system, "rate"),
            "p50_ms": ms_of(median("submit_to_start", system, "p50_us")),
            "p99_ms": ms_of(median("submit_to_start", system, "p99_us")),
            "errors": sum(r["errors"] for r in by.get(("submit_to_start", system), {}).values()),
            "not_started": sum(r.get("not_started", 0) for r in by.get(("submit_to_start", system), {}).values()),
        }
    # Measured for submit_to_start alone, or taken from submit_c16's etcd runs.
    entry["etcd_c16_items_per_s"] = median("submit_to_start", "etcd_c16", "items_per_s") or median("submit_c16", "etcd", "items_per_s")
    report["scenarios"]["submit_to_start"] = entry
if any(row["scenario"] == "exec_rate" for row in execution):
    report["scenarios"]["exec_rate"] = {
        "taskraft_tasks_per_s": median("exec_rate", "taskraft", "items_per_s"),
        "spawn_per_s": median("exec_rate", "spawn", "items_per_s"),
        "ratio": ratio_of("exec_rate", "taskraft", "spawn", "items_per_s"),
        "pair_ratios": pair_ratios_of("exec_rate", "taskraft", "spawn", "items_per_s"),
        "node_cpu_us_per_task": median("exec_rate", "taskraft", "node_cpu_us_per_task"),
        "task_cpu_us_per_task": median("exec_rate", "taskraft", "task_cpu_us_per_task"),
    }
scale_metrics = {
    "mem_1m": ("resident memory growth per node, MiB", lambda r: r["fill"]["rss_growth_mib_per_node"]),
    "snapshot_1m size": ("snapshot size, MiB", lambda r: r["snapshot"]["bytes"] / 2**20),
    "snapshot_1m build": ("snapshot build, ms", lambda r: r["snapshot"]["build_ms"]),
    "restart_1m follower": ("killed follower serving again, ms", lambda r: r["catch_up_ms"]),
    "restart_1m cluster": ("whole cluster killed, first commit, ms", lambda r: r["first_commit_ms"]),
    "fill rate": ("fill, items/s", lambda r: r["fill"]["items_per_s"]),
}
if any(row["scenario"] == "scale_1m" for row in execution):
    ours, theirs = by.get(("scale_1m", "taskraft"), {}), by.get(("scale_1m", "etcd"), {})
    entry = {}
    for name, (label, get) in scale_metrics.items():
        pair_ratios = [get(ours[p]) / get(theirs[p]) for p in sorted(ours) if p in theirs and get(theirs[p])]
        entry[name] = {
            "what": label,
            "taskraft": statistics.median([get(r) for r in ours.values()]) if ours else None,
            "etcd": statistics.median([get(r) for r in theirs.values()]) if theirs else None,
            "ratio": statistics.median(pair_ratios) if pair_ratios else None,
            "pair_ratios": pair_ratios,
        }
    entry["items"] = next(iter(ours.values()))["fill"]["items"] if ours else None
    # Times a fill sent a refused batch again (older results lack the fields).
    entry["fill_retries"] = {system: sum(r["fill"].get("retried_refused", 0) + r["fill"].get("retried_uncertain", 0) for r in runs.values())
                             for system, runs in (("taskraft", ours), ("etcd", theirs))}
    report["scenarios"]["scale_1m"] = entry
json.dump(report, open(json_path, "w"), indent=2)
lines = [f"# Benchmark: taskraft against {etcd_version}", "", f"Machine: {machine}. Pairs: {pairs}{' (quick)' if quick == '1' else ''}."] + (["", "**Partial:** the run stopped; these are the measurements that finished before it." + "".join(f" It stopped in {u['measurement']}{logs_of(u)}." for u in stopped_in)] if stopped else []) \
    + (["", "**Partial:** these measurements failed, and the run went on without them (a ratio is the median of the pairs where both systems finished):", ""] + [f"- {f['measurement']}{logs_of(f)}" for f in failed] if failed else [])
if table:
    lines += ["", "| scenario | taskraft | anchor | anchor is | ratio (median of pairs) | taskraft p50 ms | anchor p50 ms |", "|---|---|---|---|---|---|---|"]
fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
for scenario, ours, theirs, other, ratio, p50, their_p50 in table:
    unit = " µs/commit" if scenario == "cpu_per_commit" else "/s"
    with_unit = lambda v: "n/a" if v is None else f"{v:,.0f}{unit}"
    lines.append(f"| {scenario} | {with_unit(ours)} | {with_unit(theirs)} | {'etcd' if other == 'etcd' else 'taskraft submit_c64'} | {ratio} | {fmt(p50, '.2f')} | {fmt(their_p50, '.2f')} |")
if "submit_to_start" in report["scenarios"]:
    entry = report["scenarios"]["submit_to_start"]
    lines += ["", "Submit to start (runnable `true` tasks in open loop; from when each submission was due to when its executor started the process; start times are whole milliseconds, so ±0.5 ms):", "",
              "| offered rate | tasks/s offered | p50 ms | p99 ms | submit errors | not started 10 s after the last submission (then p50 and p99 are lower bounds) |", "|---|---|---|---|---|---|"]
    for system, label in (("at_100", "100/s"), ("at_half_etcd", f"half of etcd c16 ({fmt(entry['etcd_c16_items_per_s'], ',.0f')}/s)")):
        lines.append(f"| {label} | {fmt(entry[system]['rate'], ',.0f')} | {fmt(entry[system]['p50_ms'], '.2f')} | {fmt(entry[system]['p99_ms'], '.2f')} | {entry[system]['errors']} | {entry[system]['not_started']} |")
if "exec_rate" in report["scenarios"]:
    entry = report["scenarios"]["exec_rate"]
    lines += ["", "Execution rate (queued no-op tasks, first start to last end) against the raw spawn rate of `true` with as many at a time as the cluster has slots:", "",
              "| taskraft tasks/s | raw spawns/s | ratio (median of pairs) | nodes' CPU per task, µs | the task process's CPU, µs |", "|---|---|---|---|---|",
              f"| {fmt(entry['taskraft_tasks_per_s'], ',.0f')} | {fmt(entry['spawn_per_s'], ',.0f')} | {ratio_text(entry['ratio'], entry['pair_ratios'])} | {fmt(entry['node_cpu_us_per_task'], ',.0f')} | {fmt(entry['task_cpu_us_per_task'], ',.0f')} |"]
if "scale_1m" in report["scenarios"]:
    entry = report["scenarios"]["scale_1m"]
    lines += ["", f"Scale ({fmt(entry['items'], ',')} pending tasks against as many etcd keys of the same payload):", "",
              "| scenario | measure | taskraft | etcd | ratio (median of pairs) |", "|---|---|---|---|---|"]
    for name in scale_metrics:
        e = entry[name]
        lines.append(f"| {name} | {e['what']} | {fmt(e['taskraft'], ',.0f')} | {fmt(e['etcd'], ',.0f')} | {ratio_text(e['ratio'], e['pair_ratios'])} |")
    retried = entry["fill_retries"]
    lines += ["", f"Times the fills sent a refused batch again (an election during the fill): taskraft {retried['taskraft']}, etcd {retried['etcd']}."]
if failover:
    lines += ["", "Failover (kill -9 of the leader; a write through a follower until one sent after the kill commits; for taskraft, until the next task starts):", "",
              "| system | trials | commit p50 ms | commit p99 ms | task start p50 ms | task start p99 ms | lost acknowledged | writes failed after the kill, all trials |", "|---|---|---|---|---|---|---|---|"]
    for system, entry in report["scenarios"]["failover"].items():
        lines.append(f"| {system} | {entry['trials']} | {fmt(entry['commit_gap_p50_ms'], '.0f')} | {fmt(entry['commit_gap_p99_ms'], '.0f')} | {fmt(entry['start_gap_p50_ms'], '.0f')} | {fmt(entry['start_gap_p99_ms'], '.0f')} | {entry['lost']} | {entry['refused_writes']} |")
open(md_path, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo
echo "written: $out_dir/$stamp.json and .md"
}

# Runs one measurement, FUNCTION ARGS..., in a subshell of its own, so that
# a failure ends that measurement and not the run: its clusters' logs are
# kept in the results directory, its clusters are stopped, and the run goes
# on with the next. Its results are in $results only when it finished; the
# report names the measurements that failed, and the script then exits 1.
measure() {  # measure NAME FUNCTION ARGS...
  local name=$1 logs status
  shift
  logs="$out_dir/$(date -u +%Y-%m-%d)-$(hostname -s)${only:+-$only}-failed-logs/$name"
  measuring=$name
  measuring_logs=$logs
  set +e
  (
    set -eE
    trap 'echo "bench.sh: line $LINENO: a command exited with status $?" >&2' ERR
    # The directory bound now: a function that exits may have a local "logs".
    # shellcheck disable=SC2064
    trap "measure_exit \$? $(printf %q "$logs")" EXIT
    trap 'exit 143' TERM
    echo "$BASHPID" > "$work/measure.pid"
    "$@"
  )
  status=$?
  set -e
  rm -f "$work/measure.pid"
  measuring=""
  if [ "$status" != 0 ]; then
    [ -d "$logs" ] || logs=""
    echo "bench.sh: $name failed (exit status $status); the run goes on without it${logs:+; its logs are in $logs}" >&2
    printf '%s\t%s\n' "$name" "$logs" >> "$failed"
  fi
}
# The end of a measurement's subshell: after a failure, keeps the logs of the
# clusters it left running, then stops them (a measurement that finished has
# stopped its own).
measure_exit() {  # measure_exit STATUS LOGS
  # Every step runs even when one fails (a log it cannot copy): a step
  # skipped here would leave a cluster running, holding the next one's ports.
  # So does a SIGTERM arriving now (the script's own cleanup stops a
  # measurement that was already failing): its "exit 143" would end this
  # midway, leaving an empty log directory. Caught and let be, not ignored,
  # so that the commands run from here still die of a SIGTERM.
  trap : TERM
  trap - ERR
  set +e
  if [ "$1" != 0 ]; then keep_logs "$2"; fi
  stop_etcd
  stop_taskraft || true
  # Whatever else it started and left running, such as a load generator
  # waiting in the background for a commit: its children, by parent PID.
  pkill -TERM -P "$BASHPID" 2> /dev/null || true
}

step "running ${#scenarios[@]} scenario(s), $pairs pair(s) each, ${warmup} warm-up + ${duration}"
scaled=0
for scenario in "${scenarios[@]}"; do
  case "$scenario" in
    restart_1m | mem_1m | snapshot_1m)
      # One fill per pair and system serves all three.
      if [ "$scaled" = 0 ]; then
        for pair in $(seq 1 "$pairs"); do
          measure "scale_1m-taskraft-pair$pair" scale_run taskraft "$pair"
          measure "scale_1m-etcd-pair$pair" scale_run etcd "$pair"
        done
        scaled=1
      fi
      continue ;;
  esac
  if [ "$scenario" = failover ]; then
    taskraft_env=(TASKRAFT_HEARTBEAT_INTERVAL_MS=50 TASKRAFT_ELECTION_TIMEOUT_MS=300)
    etcd_timing=(--heartbeat-interval 50 --election-timeout 300)
    measure failover-taskraft-matched failover_trials taskraft-matched taskraft
    measure failover-etcd-matched failover_trials etcd-matched etcd
    taskraft_env=()
    etcd_timing=()
    measure failover-taskraft-default failover_trials taskraft-default taskraft
    continue
  fi
  read -r clients connections batch <<< "$(load_of "$scenario")"
  for pair in $(seq 1 "$pairs"); do
    if [ "$scenario" = submit_to_start ]; then
      measure "submit_to_start-pair$pair" submit_to_start_pair "$pair"
    elif [ "$scenario" = exec_rate ]; then
      measure "exec_rate-pair$pair" exec_rate_pair "$pair"
    elif [ "$scenario" = submit_batch ]; then
      # At 50,000 tasks a second the warm-up and the run queue about a
      # million tasks, the default limit, which would refuse the last
      # seconds' batches; the queue limit is not what this measures.
      taskraft_env=(TASKRAFT_QUEUED_TASKS_MAX=8388608)
      measure "submit_batch-taskraft-pair$pair" run "$scenario" taskraft taskraft "$pair" 16 4 100
      taskraft_env=()
      measure "submit_batch-c64-pair$pair" run "$scenario" c64 taskraft "$pair" "$clients" "$connections" 1
    else
      measure "$scenario-taskraft-pair$pair" run "$scenario" taskraft taskraft "$pair" "$clients" "$connections" "$batch"
      measure "$scenario-etcd-pair$pair" run "$scenario" etcd etcd "$pair" "$clients" "$connections" "$batch"
    fi
  done
done

if [ -s "$failed" ]; then
  write_report "-partial" ""
  report_written="done"
  echo "bench.sh: $(wc -l < "$failed") measurement(s) failed; the report names them" >&2
  exit 1
fi
write_report "" ""
report_written="done"
