#!/usr/bin/env bash
# A three-node taskraft cluster as Docker containers: the second way to run
# a cluster (the first is scripts/cluster.sh).
#
#   scripts/docker.sh build    static binary, then the image taskraft:local (FROM scratch)
#   scripts/docker.sh up       build if needed, start the three containers, wait for a leader
#                              and for each container to answer
#   scripts/docker.sh status   the cluster's status, seen from the host
#   scripts/docker.sh down     stop and remove the containers, their network and volumes
#   scripts/docker.sh smoke    up, run tasks, kill -9 and pause the leader's container,
#                              check the promises, down (what CI runs where Docker runs)
#
# No image can be pulled on these machines, so the image has no base: the
# binary is linked statically (-C target-feature=+crt-static) and busybox
# (Debian's busybox-static, installed when missing) gives tasks a shell.
# The nodes listen on 172.28.56.11-13; the host reaches them directly.
# Everything is scoped to the compose project `taskraft`; nothing else is touched.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
docker_dir="$root/scripts/docker"
target=x86_64-unknown-linux-gnu
static_bin="$root/target/$target/release/taskraft"
image=taskraft:local
project=taskraft
endpoints=172.28.56.11:7001,172.28.56.12:7001,172.28.56.13:7001
export TASKRAFT_ENDPOINTS=$endpoints
# shellcheck source=scripts/lib/status.sh
source "$root/scripts/lib/status.sh"
compose() { docker-compose -p "$project" -f "$docker_dir/docker-compose.yml" "$@"; }
step() { printf '\n==> %s\n' "$*"; }
die() { echo "docker.sh: $*" >&2; exit 1; }

need_docker() {
  command -v docker > /dev/null || die "docker is not installed"
  command -v docker-compose > /dev/null || die "docker-compose is not installed"
  docker info > /dev/null 2>&1 || die "the Docker engine does not answer (docker info fails)"
}

build() {
  need_docker
  step "building taskraft statically linked (target/$target/release)"
  "$root/scripts/build-static.sh"
  file_out=$(file -b "$static_bin" 2> /dev/null || true)
  case "$file_out" in *dynamically*) die "the binary is not static: $file_out" ;; esac
  if [ ! -x /bin/busybox ]; then
    step "installing busybox-static, the shell the tasks in the image run with"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static > /dev/null
  fi
  step "staging the image contents"
  local stage="$docker_dir/stage"
  rm -rf "$stage"
  mkdir -p "$stage/bin" "$stage/tmp" "$stage/data" "$stage/etc"
  cp "$static_bin" "$stage/taskraft"
  cp /bin/busybox "$stage/bin/busybox"
  for tool in $("$stage/bin/busybox" --list); do
    [ "$tool" = busybox ] || ln -sf busybox "$stage/bin/$tool"
  done
  chmod 1777 "$stage/tmp"
  echo "root:x:0:0:root:/:/bin/sh" > "$stage/etc/passwd"
  step "building the image $image"
  docker build -q -t "$image" "$docker_dir"
  rm -rf "$stage"
}

# Waits until the cluster has a leader and all three containers answer (a
# container just started or restarted may not yet); prints the leader's id.
wait_for_ready() {
  local deadline=$((SECONDS + 60)) status leader silent=""
  while :; do
    status=$("$static_bin" --timeout 5s cluster status 2> /dev/null || true)
    leader=$(status_leader <<< "$status")
    silent=$(status_unreachable 1 2 3 <<< "$status")
    if [ -n "$leader" ] && [ "$leader" != 0 ] && [ -z "$silent" ]; then echo "$leader"; return 0; fi
    if [ $SECONDS -ge $deadline ]; then
      [ -z "$silent" ] || die "taskraft-n${silent// /, taskraft-n} did not answer within 60 s"
      die "no leader within 60 s"
    fi
    sleep 0.5
  done
}

up() {
  need_docker
  docker image inspect "$image" > /dev/null 2>&1 && [ -x "$static_bin" ] || build
  step "starting the containers"
  compose up -d
  echo "leader: node $(wait_for_ready)"
  "$static_bin" cluster status
  cat << EOF

The cluster runs in containers taskraft-n1..n3. Try:
  $static_bin --endpoints $endpoints submit -- echo hello
  $static_bin --endpoints $endpoints list
  docker logs taskraft-n1
Stop it with: scripts/docker.sh down
EOF
}

down() {
  need_docker
  compose down -v --remove-orphans
}

# The smoke test: tasks through a kill -9 and a pause of the leader's
# container; every acknowledged task must succeed, the tasks the killed
# container ran must run again elsewhere, and no stale attempt may count.
smoke() {
  need_docker
  build
  compose down -v --remove-orphans > /dev/null 2>&1 || true
  trap 'compose down -v --remove-orphans > /dev/null 2>&1 || true' EXIT
  up > /dev/null
  local ids=() id leader
  step "submitting 6 tasks of 6 s and 10 short ones"
  for n in 1 2 3 4 5 6; do
    ids+=("$("$static_bin" submit --quiet --max-attempts 5 -- sh -c "sleep 6; echo long $n on node \$TASKRAFT_NODE_ID")")
  done
  for n in $(seq 1 10); do
    ids+=("$("$static_bin" submit --quiet -- echo "short $n")")
  done
  sleep 2
  leader=$(wait_for_ready)
  step "kill -9 of the leader's container, taskraft-n$leader"
  docker kill -s KILL "taskraft-n$leader" > /dev/null
  local started=$SECONDS
  ids+=("$("$static_bin" submit --quiet --timeout 30s -- echo "after the kill")")
  echo "a submission committed within $((SECONDS - started)) s of the kill"
  docker start "taskraft-n$leader" > /dev/null
  leader=$(wait_for_ready)
  step "pausing the leader's container, taskraft-n$leader, for 6 s"
  for n in 1 2 3; do
    ids+=("$("$static_bin" submit --quiet --max-attempts 5 -- sh -c "sleep 5; echo paused $n")")
  done
  sleep 1
  docker pause "taskraft-n$leader" > /dev/null
  ids+=("$("$static_bin" submit --quiet --timeout 30s -- echo "during the pause")")
  sleep 5
  docker unpause "taskraft-n$leader" > /dev/null
  step "waiting for all ${#ids[@]} tasks"
  for id in "${ids[@]}"; do
    "$static_bin" wait "$id" --for 120s > /dev/null || die "task $id did not succeed: $("$static_bin" get "$id")"
  done
  step "checking the promises"
  "$static_bin" --output json list --all | python3 -c '
import json, sys
tasks = [json.loads(line) for line in sys.stdin if line.strip()]
acked = set(sys.argv[1:])
seen = {str(task["id"]): task for task in tasks}
missing = acked - set(seen)
assert not missing, f"acknowledged tasks lost: {sorted(missing)}"
rerun = 0
for task in tasks:
    attempts = task["attempts"]
    assert task["state"] == "SUCCEEDED", ("task did not succeed", task)
    # Exactly one attempt counts: the last; every earlier one was lost.
    assert attempts[-1]["outcome"] == "exited 0", task
    assert all(a["outcome"] == "lost" for a in attempts[:-1]), f"a stale attempt counted: {task}"
    rerun += len(attempts) > 1
assert rerun > 0, "no task ran again after its container was killed or paused"
print(f"{len(tasks)} tasks: all succeeded, none lost; {rerun} ran again after losing their node; no stale result counted")
' "${ids[@]}"
  step "checking each container's metrics"
  python3 -c '
import sys, time, urllib.request
n_tasks = int(sys.argv[1])
def scrape(n):
    with urllib.request.urlopen(f"http://172.28.56.1{n}:7201/metrics", timeout=5) as answer:
        lines = answer.read().decode().splitlines()
    return dict(line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))
deadline = time.monotonic() + 20
while True:
    metrics = {n: scrape(n) for n in (1, 2, 3)}
    leaders = [n for n, m in metrics.items() if m["taskraft_raft_role{role=\"leader\"}"] == "1"]
    succeeded = {n: int(m["taskraft_tasks{state=\"SUCCEEDED\"}"]) for n, m in metrics.items()}
    if len(leaders) == 1 and all(count == n_tasks for count in succeeded.values()):
        break
    assert time.monotonic() < deadline, f"leaders {leaders}, SUCCEEDED by node {succeeded}, want {n_tasks} each"
    time.sleep(0.5)
started = sum(float(m["taskraft_executor_attempts_started_total"]) for m in metrics.values())
print(f"node {leaders[0]} leads; every node counts {n_tasks} tasks SUCCEEDED; {started:.0f} attempts started since the containers last started")
' "${#ids[@]}"
  step "docker smoke test passed"
}

case "${1:-}" in
  build) build ;;
  up) up ;;
  status) "$static_bin" cluster status ;;
  down) down ;;
  smoke) smoke ;;
  *) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
