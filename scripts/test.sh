#!/usr/bin/env bash
# Every test of taskraft, and the gates: formatting, clippy, the unit and
# storage tests, the cluster tests on real processes, and a smoke run of the
# README's main command (scripts/demo.sh) on its own ports.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
step() { printf '\n==> %s\n' "$*"; }
# shellcheck source=scripts/lib/processes.sh
source scripts/lib/processes.sh
# shellcheck source=scripts/lib/status.sh
source scripts/lib/status.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

# One release build serves the cluster tests, the smoke runs and the Docker
# image: statically linked, as a FROM-scratch image needs.
step "building the release binary the cluster tests run (statically linked)"
scripts/build-static.sh
export TASKRAFT_BIN="$root/target/x86_64-unknown-linux-gnu/release/taskraft"

step "unit, storage and cluster tests"
# A fault scenario that fails keeps its history and whole node logs here.
export TASKRAFT_KEEP_HISTORY="${TASKRAFT_KEEP_HISTORY:-$root/target/nemesis-kept}"
cargo test --workspace --locked

# Each seed is a three-node cluster under turmoil with seeded faults, in a
# process of its own; a failure prints the command that replays it.
sim_seeds=${TASKRAFT_SIM_SEEDS:-100}
step "deterministic simulation: $sim_seeds seeds, each judged by the checker"
sim_dir="$root/target/sim"
rm -rf "$sim_dir"
"$root/target/x86_64-unknown-linux-gnu/release/sim" --seeds "$sim_seeds" --jobs 2 --dir "$sim_dir"

step "smoke run of scripts/demo.sh on a throwaway cluster"
smoke_dir=$(mktemp -d)
cleanup() {
  TASKRAFT_CLUSTER_DIR="$smoke_dir" TASKRAFT_API_PORT_BASE=17000 TASKRAFT_RAFT_PORT_BASE=17100 TASKRAFT_METRICS_PORT_BASE=17200 \
    scripts/cluster.sh down > /dev/null 2>&1 || true
  rm -rf "$smoke_dir"
}
trap cleanup EXIT
TASKRAFT_CLUSTER_DIR="$smoke_dir" TASKRAFT_API_PORT_BASE=17000 TASKRAFT_RAFT_PORT_BASE=17100 TASKRAFT_METRICS_PORT_BASE=17200 TASKRAFT_SKIP_BUILD=1 \
  scripts/demo.sh > "$smoke_dir/demo.out" 2>&1 || { cat "$smoke_dir/demo.out"; echo "demo.sh failed"; exit 1; }
grep -q "failover: a submission committed" "$smoke_dir/demo.out"
grep -q "demo-tick fired [0-9]* tasks ([0-9]* listed), [1-9][0-9]* of them after the kill, skipped 0" "$smoke_dir/demo.out" ||
  { grep -A2 "kept firing" "$smoke_dir/demo.out"; echo "demo.sh's periodic task did not fire through the failover"; exit 1; }
# It names the leader it killed and the one that took over, a different node.
killed=$(sed -n 's/.*killing the leader, node \([0-9]*\),.*/\1/p' "$smoke_dir/demo.out")
took_over=$(sed -n 's/^node \([0-9]*\) leads now.*/\1/p' "$smoke_dir/demo.out")
if [[ ! "$killed" =~ ^[123]$ ]] || [[ ! "$took_over" =~ ^[123]$ ]] || [ "$killed" = "$took_over" ]; then
  grep -E "killing the leader|leads now" "$smoke_dir/demo.out"; echo "demo.sh named no new leader"; exit 1
fi
# Every node's metrics answered, and one of them leads.
[ "$(grep -c '^  node [123]: [a-z]* in term' "$smoke_dir/demo.out")" = 3 ] && grep -q '^  node [123]: leader in term' "$smoke_dir/demo.out" ||
  { grep -A3 "metrics say" "$smoke_dir/demo.out"; echo "demo.sh did not show every node's metrics"; exit 1; }
echo "demo.sh ran end to end: every task reached the state it should"

step "scripts/cluster.sh: pause, resume, stop, up again on the same data, down"
smoke_cluster() {
  TASKRAFT_CLUSTER_DIR="$smoke_dir" TASKRAFT_API_PORT_BASE=17000 TASKRAFT_RAFT_PORT_BASE=17100 TASKRAFT_METRICS_PORT_BASE=17200 TASKRAFT_SKIP_BUILD=1 \
    scripts/cluster.sh "$@"
}
# Capture, then grep: `grep -q` in a pipeline would end `status` early (SIGPIPE).
expect_status() {
  local status
  status=$(smoke_cluster status)
  grep -q "$1" <<< "$status" || { echo "expected '$1' in:"; echo "$status"; exit 1; }
}
smoke_cluster pause 2
expect_status "node 2: running (pid [0-9]*, state T)"
smoke_cluster resume 2
smoke_cluster stop 3
expect_status "node 3: not running"
# The status helpers read the cluster's leader, not the last row's view of
# it (node 3, down, sees none), and name the node that does not answer. If
# node 3 led, nodes 1 and 2 elect another; 20 s bounds that generously.
deadline=$((SECONDS + 20))
while :; do
  status_now=$("$TASKRAFT_BIN" --endpoints 127.0.0.1:17001,127.0.0.1:17002 cluster status)
  leader_now=$(status_leader <<< "$status_now")
  silent_now=$(status_unreachable 1 2 3 <<< "$status_now")
  if [[ "$leader_now" =~ ^[12]$ ]] && [ "$silent_now" = 3 ]; then break; fi
  if [ "$SECONDS" -ge "$deadline" ] || [[ ! "$leader_now" =~ ^[0-2]$ ]]; then
    echo "$status_now"; echo "status_leader gave '$leader_now', status_unreachable '$silent_now'"; exit 1
  fi
  sleep 0.2
done
# `start` waits for the node: one that exits at its start is reported, with
# its reason, and one that starts answers before `start` returns.
start_status=0
TASKRAFT_ELECTION_TIMEOUT_MS=soon smoke_cluster start 3 > "$smoke_dir/start.out" 2>&1 || start_status=$?
if [ "$start_status" = 0 ] || ! grep -q "node 3 exited before it answered" "$smoke_dir/start.out" ||
  ! grep -q "invalid value 'soon'" "$smoke_dir/start.out"; then
  cat "$smoke_dir/start.out"; echo "cluster.sh start did not report node 3, which exited (exit $start_status)"; exit 1
fi
smoke_cluster start 3 > /dev/null
"$TASKRAFT_BIN" --endpoints 127.0.0.1:17003 --timeout 2s cluster status > /dev/null ||
  { echo "node 3 did not answer once cluster.sh start returned"; exit 1; }
smoke_cluster up > /dev/null
for n in 1 2 3; do expect_status "node $n: running"; done
tasks_after_restart=$("$TASKRAFT_BIN" --endpoints 127.0.0.1:17001,127.0.0.1:17002,127.0.0.1:17003 --output json list | wc -l)
[ "$tasks_after_restart" -ge 13 ] || { echo "the restarted cluster lost tasks: $tasks_after_restart"; exit 1; }
smoke_cluster down
for n in 1 2 3; do expect_status "node $n: not running"; done
# A node that cannot start (here a bad setting) ends `up` with its reason,
# rather than a wait of a minute for a leader.
up_status=0
TASKRAFT_ELECTION_TIMEOUT_MS=soon smoke_cluster up > "$smoke_dir/up.out" 2>&1 || up_status=$?
if [ "$up_status" = 0 ] || ! grep -q "exited before the cluster was up" "$smoke_dir/up.out" ||
  ! grep -q "invalid value 'soon'" "$smoke_dir/up.out"; then
  cat "$smoke_dir/up.out"; echo "cluster.sh up did not report the node that exited (exit $up_status)"; exit 1
fi
smoke_cluster down > /dev/null
# So too when the other two already have a leader: `up` restarts node 2,
# which exits, and must not report the cluster up. (Node 2, a middle row of
# the status: an older `up` read the leader from the last row only.)
smoke_cluster up > /dev/null
smoke_cluster stop 2 > /dev/null
up_status=0
TASKRAFT_ELECTION_TIMEOUT_MS=soon smoke_cluster up > "$smoke_dir/up.out" 2>&1 || up_status=$?
if [ "$up_status" = 0 ] || ! grep -q "node 2 exited before the cluster was up" "$smoke_dir/up.out"; then
  cat "$smoke_dir/up.out"; echo "cluster.sh up did not report node 2, which exited beside a running leader (exit $up_status)"; exit 1
fi
smoke_cluster down > /dev/null
echo "cluster.sh commands work"

step "Docker: the cluster as containers, through a kill -9 and a pause of the leader"
if docker info > /dev/null 2>&1; then
  scripts/docker.sh smoke
else
  echo "skipped: the Docker engine does not answer here (docker info fails)"
fi

step "scripts/lib/processes.sh: a wait for a restarted server ends when the server exits"
# A waiter (a load generator waiting for a restarted cluster) is stopped as
# soon as a server it waits for exits; else its own exit status counts.
sleep 300 &
waiter=$!
sleep 0.5 &
server=$!
started=$SECONDS
status=0
wait_while_alive "$waiter" "$server" 2> /dev/null || status=$?
if [ "$status" != 1 ] || alive "$waiter" || [ $((SECONDS - started)) -gt 10 ]; then
  echo "wait_while_alive did not end with the server (status $status)"; exit 1
fi
(sleep 0.2; exit 7) &
waiter=$!
sleep 300 &
server=$!
status=0
wait_while_alive "$waiter" "$server" || status=$?
kill "$server"
[ "$status" = 7 ] || { echo "wait_while_alive did not return the waiter's status 7 (status $status)"; exit 1; }
echo "wait_while_alive follows both the waiter and the servers"

step "benchmark smoke: scripts/bench.sh --quick on one scenario (proves the script, measures nothing)"
bench_dir=$(mktemp -d)
scripts/bench.sh --quick --scenario submit_c16 --out "$bench_dir" > "$bench_dir/bench.out" 2>&1 ||
  { cat "$bench_dir/bench.out"; echo "bench.sh failed"; exit 1; }
grep -q "| submit_c16 |" "$bench_dir/bench.out" || { cat "$bench_dir/bench.out"; echo "bench.sh printed no table"; exit 1; }
echo "bench.sh ran end to end"
# A measurement that fails does not end the run: an etcd that exits at its
# start fails etcd's run; taskraft's still runs, the report names the
# failure, the member's log is kept, and the script exits 1.
mkdir -p "$bench_dir/fake-bin"
cat > "$bench_dir/fake-bin/etcd" << 'EOF'
#!/bin/sh
if [ "$1" = --version ]; then echo "etcd Version: 3.4.0 (a stand-in that exits at its start)"; exit 0; fi
echo "stand-in etcd: exiting at the start" >&2
exit 1
EOF
chmod +x "$bench_dir/fake-bin/etcd"
status=0
PATH="$bench_dir/fake-bin:$PATH" scripts/bench.sh --quick --scenario submit_c1 --out "$bench_dir/failing" > "$bench_dir/failing.out" 2>&1 || status=$?
report=$(ls "$bench_dir"/failing/*-partial.md 2> /dev/null || true)
if [ "$status" != 1 ] || [ -z "$report" ] || ! grep -q "^| submit_c1 | [0-9]" "$report" ||
  ! grep -q "^- submit_c1-etcd-pair1 (logs: " "$report" || ! grep -rqs "stand-in etcd: exiting" "$bench_dir"/failing/*-failed-logs/submit_c1-etcd-pair1/; then
  cat "$bench_dir/failing.out" "$report" 2> /dev/null; echo "bench.sh did not go on past a failed measurement (exit $status)"; exit 1
fi
echo "bench.sh went on past a failed measurement and named it"
# A restarted etcd member that exits while the load generator waits for it
# to serve ends that measurement at once, naming it, instead of after the
# load generator's deadline of 300 s. The stand-in runs the real etcd at
# each member's first start, and exits a second into any restart.
cat > "$bench_dir/fake-bin/etcd" << 'EOF'
#!/bin/sh
if [ "$1" = --version ]; then exec "$REAL_ETCD" --version; fi
if [ -e "$STARTED_DIR/$2" ]; then sleep 1; echo "stand-in etcd: $2 exits at its restart" >&2; exit 1; fi
touch "$STARTED_DIR/$2"
exec "$REAL_ETCD" "$@"
EOF
chmod +x "$bench_dir/fake-bin/etcd"
mkdir -p "$bench_dir/started"
# Found before PATH names the stand-in, which would otherwise run itself.
real_etcd=$(command -v etcd)
status=0
started=$SECONDS
PATH="$bench_dir/fake-bin:$PATH" REAL_ETCD=$real_etcd STARTED_DIR="$bench_dir/started" \
  scripts/bench.sh --quick --scenario restart_1m --out "$bench_dir/restart" > "$bench_dir/restart.out" 2>&1 || status=$?
report=$(ls "$bench_dir"/restart/*-partial.md 2> /dev/null || true)
if [ "$status" != 1 ] || [ $((SECONDS - started)) -ge 150 ] || [ -z "$report" ] || ! grep -q "^- scale_1m-etcd-pair1 (logs: " "$report" ||
  ! grep -q "exited while process [0-9]* waited for it to serve" "$bench_dir/restart.out" || ! grep -q "exits at its restart" "$bench_dir/restart.out"; then
  cat "$bench_dir/restart.out" "$report" 2> /dev/null
  echo "bench.sh did not end the wait for an etcd member that exited at its restart (exit $status after $((SECONDS - started)) s)"; exit 1
fi
echo "bench.sh ended the wait for a restarted member that exited, and named it"
# A run stopped by a signal in the middle of a measurement (etcd's, once its
# first member listens) stops every server it started, keeps their logs,
# and writes the report of what finished, naming where it stopped.
scripts/bench.sh --quick --scenario submit_c1 --out "$bench_dir/stopped" > "$bench_dir/stopped.out" 2>&1 &
bench_pid=$!
deadline=$((SECONDS + 300))
until port_listening 23791; do
  if [ $SECONDS -ge $deadline ] || ! alive "$bench_pid"; then
    cat "$bench_dir/stopped.out"; echo "bench.sh never started etcd"; exit 1
  fi
  sleep 0.05
done
kill -TERM "$bench_pid"
status=0
wait "$bench_pid" || status=$?
report=$(ls "$bench_dir"/stopped/*-partial.md 2> /dev/null || true)
left=""
wait_ports_free 10 19001 19002 19003 19101 19102 19103 19201 19202 19203 23791 23792 23793 23801 23802 23803 2> "$bench_dir/ports.err" ||
  left=$(cat "$bench_dir/ports.err")
if [ "$status" = 0 ] || [ -z "$report" ] || ! grep -q "^| submit_c1 | [0-9]" "$report" ||
  ! grep -q "It stopped in submit_c1-etcd-pair1 (logs: " "$report" || ! compgen -G "$bench_dir/stopped/*-failed-logs/submit_c1-etcd-pair1/etcd-n1.log" > /dev/null ||
  [ -n "$left" ]; then
  cat "$bench_dir/stopped.out" "$report" 2> /dev/null
  echo "bench.sh stopped by a signal (exit $status) did not report where, keep the logs, or free the ports (${left:-ports free})"; exit 1
fi
rm -rf "$bench_dir"
echo "bench.sh stopped by a signal stopped its servers, kept their logs and said where it stopped"
