# shellcheck shell=bash
# Sourced by the scripts (not run): whether a process runs, and whether a
# TCP port is taken, both read from /proc so that no tool need be installed.

# Whether process PID is alive. A process that has exited but that its
# parent has not reaped yet (a zombie: nodes outlive the shell that started
# them, and their new parent may reap late) counts as gone.
alive() {  # alive PID
  local state
  state=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2> /dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
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
