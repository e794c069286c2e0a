#!/usr/bin/env bash
# The soak run: the seeded random nemesis schedule (partitions, packet loss,
# kill -9, SIGSTOP, restarts, a membership change) against a three-node
# cluster in network namespaces, under a concurrent workload, for as long as
# asked; it ends with the checker's report on the whole history.
#
#   scripts/chaos.sh [--duration 10m] [--seed N]
#
# The seed is printed at the start; the same seed and duration replay the
# same schedule. The history is kept in target/chaos/ for `check-history`.
# Needs root, ip and iptables (installed when missing, as in .ci/run).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
duration=10m
seed=""
usage() { echo "usage: scripts/chaos.sh [--duration 10m|600s|1h] [--seed N]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) [ $# -ge 2 ] || usage; duration=$2; shift 2 ;;
    --seed) [ $# -ge 2 ] || usage; seed=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "chaos.sh: unknown argument $1" >&2; usage ;;
  esac
done
case "$duration" in
  *h) seconds=$((${duration%h} * 3600)) ;;
  *m) seconds=$((${duration%m} * 60)) ;;
  *s) seconds=${duration%s} ;;
  *[!0-9]*|"") echo "chaos.sh: bad duration $duration" >&2; usage ;;
  *) seconds=$duration ;;
esac
[[ "$seconds" =~ ^[0-9]+$ ]] && [ "$seconds" -gt 0 ] || { echo "chaos.sh: bad duration $duration" >&2; usage; }
[ -z "$seed" ] && seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
[[ "$seed" =~ ^[0-9]+$ ]] || { echo "chaos.sh: the seed must be a number" >&2; usage; }

if ! command -v iptables > /dev/null || ! command -v ip > /dev/null; then
  echo "installing iptables and iproute2"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables iproute2 > /dev/null
fi
echo "==> building the release binary"
cargo build --release --locked --bin taskraft
export TASKRAFT_BIN="$root/target/release/taskraft"
export TASKRAFT_KEEP_HISTORY="$root/target/chaos"
echo "==> SEED=$seed, for ${seconds} s of faults (replay: scripts/chaos.sh --duration ${seconds}s --seed $seed)"
SEED=$seed TASKRAFT_CHAOS_DURATION_S=$seconds \
  cargo test --locked -p cluster-tests --test it -- nemesis::random_schedule --exact --nocapture
echo "==> the history: $TASKRAFT_KEEP_HISTORY/random-$seed.jsonl"
echo "    (judge it again with: cargo run -p cluster-tests --bin check-history -- $TASKRAFT_KEEP_HISTORY/random-$seed.jsonl)"
