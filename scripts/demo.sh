#!/usr/bin/env bash
# The main job: a local three-node cluster running real tasks through a
# leader crash.
#
# It brings the cluster up and submits a mix of tasks: priorities, a delayed
# task, a task that fails twice and then succeeds, a task that times out, a
# task cancelled while it runs, and a batch of longer tasks spread over every
# node. Midway it kills the leader with SIGKILL and shows the new leader.
# Then it waits for every task, prints a summary (each task's final state and
# the nodes its attempts ran on) with the failover time it observed, and
# checks that every task reached the state it should. The cluster keeps
# running afterwards for you to explore.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${TASKRAFT_BIN:-$root/target/release/taskraft}
cluster=("$root/scripts/cluster.sh")
api_port_base=${TASKRAFT_API_PORT_BASE:-7000}
metrics_port_base=${TASKRAFT_METRICS_PORT_BASE:-7200}
endpoints="127.0.0.1:$((api_port_base + 1)),127.0.0.1:$((api_port_base + 2)),127.0.0.1:$((api_port_base + 3))"
export TASKRAFT_ENDPOINTS=$endpoints
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
# shellcheck source=scripts/lib/status.sh
source "$root/scripts/lib/status.sh"
leader_id() { "$bin" cluster status | status_leader; }
state_of() { "$bin" --output json get "$1" | sed -n 's/.*"state":"\([A-Z]*\)".*/\1/p'; }
# Node N's Prometheus metrics, fetched with bash alone (no curl needed).
metrics_of() {
  local fd
  exec {fd}<>"/dev/tcp/127.0.0.1/$((metrics_port_base + $1))"
  printf 'GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&"$fd"
  timeout 5 cat <&"$fd"
  exec {fd}<&-
}
# One line from node N's metrics: its role and term, the tasks by state in
# its applied state, and the attempts its executor started.
metrics_line() {
  metrics_of "$1" | tr -d '\r' | awk -v n="$1" '
    /^taskraft_raft_role\{/ && $2 == 1 { split($1, parts, "\""); role = parts[2] }
    /^taskraft_raft_term / { term = $2 }
    /^taskraft_tasks\{/ && $2 > 0 { split($1, parts, "\""); tasks = tasks sep $2 " " parts[2]; sep = ", " }
    /^taskraft_executor_attempts_started_total / { started = $2 }
    END { printf "  node %s: %s in term %s; tasks: %s; its executor started %d attempts since the node started\n", n, role, term, tasks, started }'
}

step "bringing up the local cluster"
"${cluster[@]}" up
"$bin" cluster status

watch_log=$(mktemp)
step "watching every task change in the background (log: $watch_log)"
"$bin" watch > "$watch_log" 2>&1 &
watch_pid=$!
trap 'kill "$watch_pid" 2>/dev/null || true' EXIT

declare -A expected name
submit() {  # submit EXPECTED_STATE NAME [submit args...]
  local want=$1 label=$2 id
  shift 2
  id=$("$bin" submit --quiet "$@")
  expected[$id]=$want
  name[$id]=$label
  echo "  task $id: $label"
}

step "submitting tasks (through every node; followers forward to the leader)"
submit SUCCEEDED "urgent report (priority 10)" --priority 10 -- echo "urgent report"
submit SUCCEEDED "routine cleanup (priority -5)" --priority -5 -- echo "routine cleanup"
submit SUCCEEDED "delayed by 5 s" --delay 5s -- sh -c 'echo "ran at $(date +%T)"'
submit SUCCEEDED "fails twice, then succeeds" --max-attempts 5 -- \
  sh -c '[ "$TASKRAFT_ATTEMPT" -ge 3 ] || { echo "attempt $TASKRAFT_ATTEMPT fails" >&2; exit 1; }; echo "attempt $TASKRAFT_ATTEMPT works"'
submit FAILED "times out after 1 s" --task-timeout 1s --max-attempts 1 -- sleep 30
for n in 1 2 3 4 5 6; do
  submit SUCCEEDED "long task $n (4 s)" -- sh -c "sleep 4; echo done on node \$TASKRAFT_NODE_ID"
done
last_id() { printf '%s\n' "${!name[@]}" | sort -n | tail -n1; }
long_id=$(last_id)
submit FAILED "fails after 2 s (exit 3)" --max-attempts 1 -- sh -c 'sleep 2; exit 3'
failing_id=$(last_id)
submit SUCCEEDED "runs after long task 6" --after "$long_id" -- echo "long task $long_id is done"
echo "    $(state_of "$(last_id)") until task $long_id has succeeded"
submit CANCELLED "runs after the task that fails" --after "$failing_id" -- echo "never printed"
submit CANCELLED "runs after that one" --after "$(last_id)" -- echo "never printed"
submit CANCELLED "cancelled while it runs" -- sleep 60
cancel_id=$(last_id)

step "putting a periodic task: every second, it submits a task of its own"
"$bin" periodic put demo-tick --every 1s -- sh -c 'echo "tick on node $TASKRAFT_NODE_ID"'

step "cancelling task $cancel_id once it runs"
until [ "$(state_of "$cancel_id")" = RUNNING ]; do sleep 0.2; done
"$bin" cancel "$cancel_id" > /dev/null
echo "  task $cancel_id: $(state_of "$cancel_id")"

step "the long tasks are running on every node"
"$bin" list --state RUNNING

old_leader=$(leader_id)
step "killing the leader, node $old_leader, with SIGKILL"
"${cluster[@]}" kill "$old_leader"
started=$(date +%s%N)
killed_at_ms=$((started / 1000000))
after=$("$bin" submit --quiet -- echo "submitted after the failover")
failover_ms=$((($(date +%s%N) - started) / 1000000))
expected[$after]=SUCCEEDED
name[$after]="submitted after the failover"
new_leader=$(leader_id)
echo "node $new_leader leads now; the next submission (task $after) committed ${failover_ms} ms after the kill"
echo "attempts that were running on node $old_leader are re-run elsewhere once their lease runs out"

step "waiting for every task to finish"
for id in $(printf '%s\n' "${!name[@]}" | sort -n); do
  "$bin" wait "$id" --for 120s > /dev/null || true
done

step "the periodic task kept firing through the failover; deleting it"
deleted=$("$bin" --output json periodic delete demo-tick)
fired_total=$(sed -n 's/.*"fired_total":\([0-9]*\).*/\1/p' <<< "$deleted")
skipped_total=$(sed -n 's/.*"skipped_total":\([0-9]*\).*/\1/p' <<< "$deleted")
# Each fired task's key is periodic/demo-tick/<fire time in Unix ms>.
fire_times=$("$bin" --output json list --all | grep -o '"idempotency_key":"periodic/demo-tick/[0-9]*"' | grep -o '[0-9]*' || true)
n_listed=$(grep -c . <<< "$fire_times" || true)
n_after_kill=$(awk -v killed="$killed_at_ms" '$1 > killed' <<< "$fire_times" | grep -c . || true)
echo "  demo-tick fired $fired_total tasks ($n_listed listed), $n_after_kill of them after the kill, skipped $skipped_total"
periodic_failures=0
if [ "$n_after_kill" -eq 0 ] || [ "$fired_total" != "$n_listed" ] || [ "$skipped_total" != 0 ]; then
  echo "  WRONG: a periodic task should fire after the failover, once per tick" >&2
  periodic_failures=1
fi

step "summary"
"$bin" list --all
echo
failures=$periodic_failures
for id in $(printf '%s\n' "${!name[@]}" | sort -n); do
  state=$(state_of "$id")
  mark=ok
  if [ "$state" != "${expected[$id]}" ]; then mark="WRONG (expected ${expected[$id]})"; failures=$((failures + 1)); fi
  printf '  task %-4s %-32s %-10s %s\n' "$id" "${name[$id]}" "$state" "$mark"
done
echo
echo "failover: a submission committed ${failover_ms} ms after the leader (node $old_leader) was killed"

step "bringing node $old_leader back; it catches up from the others"
"${cluster[@]}" start "$old_leader"
sleep 2
"$bin" cluster status

step "what each node's metrics say (http://127.0.0.1:$((metrics_port_base + 1))/metrics and so on)"
for n in 1 2 3; do metrics_line "$n"; done

kill "$watch_pid" 2>/dev/null || true
wait "$watch_pid" 2>/dev/null || true
echo
echo "the watcher saw $(wc -l < "$watch_log") task changes; see $watch_log"

cat <<EOF

The cluster is still running (endpoints $endpoints). Try:
  $bin submit -- echo hello
  $bin get $after
  $bin list
  $bin watch
  scripts/cluster.sh status | kill N | start N | pause N | resume N | logs N
  curl -s http://127.0.0.1:$((metrics_port_base + 1))/metrics   # node 1's Prometheus metrics
Stop it with: scripts/cluster.sh down
EOF
if [ "$failures" -gt 0 ]; then
  echo "demo: $failures task(s) did not reach the state they should" >&2
  exit 1
fi
