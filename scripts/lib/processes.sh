# shellcheck shell=bash
# Sourced by the scripts (not run): whether a process runs, and whether a
# TCP port is taken, both read from /proc so that no tool need be installed.

# Whether process PID is alive. A process that has exited but that its
# parent has not reaped yet (a zombie: nodes outlive the shell that started
# them, and their new parent may reap late) counts as gone.
# Shell builtins only, since callers poll it often.
alive() {  # alive PID
  local key state _
  while read -r key state _; do
    if [ "$key" = State: ]; then
      [ "$state" != Z ] && [ "$state" != X ]
      return
    fi
  done 2> /dev/null < "/proc/$1/status"
  return 1
}

# Whether something listens on TCP port PORT.
port_listening() {  # port_listening PORT
  local hex
  hex=$(printf ':%04X' "$1")
  awk -v port="$hex" '$4 == "0A" && substr($2, length($2) - 4) == port { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 2> /dev/null
}

# Waits until nothing listens on any of PORTS, for at most SECONDS; otherwise
# says which port is taken and returns 1. A process killed with SIGKILL
# holds its ports until its last thread has exited, which for a large
# process is well after its PID shows it gone (its first thread is a zombie
# while the others still tear the process down); a server started on those
# ports before then cannot listen and exits.
wait_ports_free() {  # wait_ports_free SECONDS PORT...
  local seconds=$1 deadline=$((SECONDS + $1)) port
  shift
  for port in "$@"; do
    while port_listening "$port"; do
      [ "$SECONDS" -lt "$deadline" ] || { echo "port $port is still in use after $seconds s" >&2; return 1; }
      sleep 0.05
    done
  done
}

# Waits for WAITER_PID, a child of this shell that waits for the servers
# SERVER_PID... (a load generator waiting for a restarted cluster to serve
# again), and returns its exit status. When one of the servers exits first,
# the waiter would wait out its own deadline for nothing: it is stopped, the
# server named, and 1 returned.
wait_while_alive() {  # wait_while_alive WAITER_PID SERVER_PID...
  local waiter=$1 pid
  shift
  while alive "$waiter"; do
    for pid in "$@"; do
      if ! alive "$pid"; then
        kill -TERM "$waiter" 2> /dev/null || true
        wait "$waiter" 2> /dev/null || true
        echo "process $pid exited while process $waiter waited for it to serve" >&2
        return 1
      fi
    done
    sleep 0.1
  done
  wait "$waiter"
}
