#!/usr/bin/env bash
# Every test of taskraft, and the gates: formatting, clippy, the unit and
# storage tests, the cluster tests on real processes, and a smoke run of the
# README's main command (scripts/demo.sh) on its own ports.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
step() { printf '\n==> %s\n' "$*"; }

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
  TASKRAFT_CLUSTER_DIR="$smoke_dir" TASKRAFT_API_PORT_BASE=17000 TASKRAFT_RAFT_PORT_BASE=17100 \
    scripts/cluster.sh down > /dev/null 2>&1 || true
  rm -rf "$smoke_dir"
}
trap cleanup EXIT
TASKRAFT_CLUSTER_DIR="$smoke_dir" TASKRAFT_API_PORT_BASE=17000 TASKRAFT_RAFT_PORT_BASE=17100 TASKRAFT_SKIP_BUILD=1 \
  scripts/demo.sh > "$smoke_dir/demo.out" 2>&1 || { cat "$smoke_dir/demo.out"; echo "demo.sh failed"; exit 1; }
grep -q "failover: a submission committed" "$smoke_dir/demo.out"
echo "demo.sh ran end to end: every task reached the state it should"

step "scripts/cluster.sh: pause, resume, stop, up again on the same data, down"
smoke_cluster() {
  TASKRAFT_CLUSTER_DIR="$smoke_dir" TASKRAFT_API_PORT_BASE=17000 TASKRAFT_RAFT_PORT_BASE=17100 TASKRAFT_SKIP_BUILD=1 \
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
smoke_cluster up > /dev/null
for n in 1 2 3; do expect_status "node $n: running"; done
tasks_after_restart=$("$TASKRAFT_BIN" --endpoints 127.0.0.1:17001,127.0.0.1:17002,127.0.0.1:17003 --output json list | wc -l)
[ "$tasks_after_restart" -ge 13 ] || { echo "the restarted cluster lost tasks: $tasks_after_restart"; exit 1; }
smoke_cluster down
for n in 1 2 3; do expect_status "node $n: not running"; done
echo "cluster.sh commands work"

step "Docker: the cluster as containers, through a kill -9 and a pause of the leader"
if docker info > /dev/null 2>&1; then
  scripts/docker.sh smoke
else
  echo "skipped: the Docker engine does not answer here (docker info fails)"
fi

step "benchmark smoke: scripts/bench.sh --quick on one scenario (proves the script, measures nothing)"
bench_dir=$(mktemp -d)
scripts/bench.sh --quick --scenario submit_c16 --out "$bench_dir" > "$bench_dir/bench.out" 2>&1 ||
  { cat "$bench_dir/bench.out"; echo "bench.sh failed"; exit 1; }
grep -q "| submit_c16 |" "$bench_dir/bench.out" || { cat "$bench_dir/bench.out"; echo "bench.sh printed no table"; exit 1; }
rm -rf "$bench_dir"
echo "bench.sh ran end to end"
