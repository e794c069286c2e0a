#!/usr/bin/env bash
# The main job: bring up a local three-node cluster, submit tasks through
# different nodes, watch them, kill the leader with SIGKILL, show the new
# leader and that every acknowledged task survived, then bring the old
# leader back. The cluster keeps running afterwards for you to explore.
#
# Task execution (executors, leases, retries) is not built yet, so tasks stay
# READY or PENDING here; this demo shows the replicated, durable task log.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${TASKRAFT_BIN:-$root/target/release/taskraft}
cluster=("$root/scripts/cluster.sh")
api_port_base=${TASKRAFT_API_PORT_BASE:-7000}
endpoints="127.0.0.1:$((api_port_base + 1)),127.0.0.1:$((api_port_base + 2)),127.0.0.1:$((api_port_base + 3))"
export TASKRAFT_ENDPOINTS=$endpoints
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
node_endpoint() { echo "127.0.0.1:$((api_port_base + $1))"; }
leader_id() { "$bin" --output json cluster status | sed -n 's/.*"leader_id":\([0-9]*\).*/\1/p' | head -n1; }

step "bringing up the local cluster"
"${cluster[@]}" up
"$bin" cluster status

watch_log=$(mktemp)
step "watching every task change in the background (log: $watch_log)"
"$bin" watch > "$watch_log" 2>&1 &
watch_pid=$!
trap 'kill "$watch_pid" 2>/dev/null || true' EXIT
sleep 0.5

step "submitting tasks through each node (followers forward to the leader)"
ids=()
ids+=("$("$bin" --endpoints "$(node_endpoint 1)" submit --quiet --priority 10 -- echo "urgent report")")
ids+=("$("$bin" --endpoints "$(node_endpoint 2)" submit --quiet --priority 0 -- echo "routine cleanup")")
ids+=("$("$bin" --endpoints "$(node_endpoint 3)" submit --quiet --priority -5 --queue batch -- sh -c "sleep 1; echo done")")
ids+=("$("$bin" submit --quiet --delay 10m --label zone=eu -- echo "delayed ten minutes")")
ids+=("$("$bin" submit --quiet --key order-42 -- echo "charge order 42")")
again=$("$bin" submit --key order-42 -- echo "charge order 42")
echo "submitted tasks ${ids[*]}"
echo "submitting order-42 again: $again"
cancelled=$("$bin" submit --quiet --delay 1h -- echo "never mind")
"$bin" cancel "$cancelled" > /dev/null
ids+=("$cancelled")
echo "cancelled task $cancelled"
"$bin" list

old_leader=$(leader_id)
step "killing the leader, node $old_leader, with SIGKILL"
"${cluster[@]}" kill "$old_leader"
started=$(date +%s%N)
after=$("$bin" submit --quiet -- echo "submitted after the failover")
elapsed_ms=$((($(date +%s%N) - started) / 1000000))
ids+=("$after")
new_leader=$(leader_id)
echo "node $new_leader leads now; the next submission (task $after) committed ${elapsed_ms} ms after the kill"
"$bin" cluster status

step "every acknowledged task is still there (linearizable reads)"
for id in "${ids[@]}"; do
  "$bin" --output json get "$id" | sed -n 's/.*"id":"\([0-9]*\)".*"state":"\([A-Z]*\)".*/  task \1: \2/p'
done

step "bringing node $old_leader back; it catches up from the others"
"${cluster[@]}" start "$old_leader"
sleep 2
"$bin" cluster status

step "what the watcher saw"
kill "$watch_pid" 2>/dev/null || true
wait "$watch_pid" 2>/dev/null || true
cat "$watch_log"
rm -f "$watch_log"

cat <<EOF

The cluster is still running (endpoints $endpoints). Try:
  $bin submit -- echo hello
  $bin list
  $bin watch
  scripts/cluster.sh status | kill N | start N | pause N | resume N | logs N
Stop it with: scripts/cluster.sh down
EOF
