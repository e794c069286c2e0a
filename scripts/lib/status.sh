# shellcheck shell=bash
# Sourced by the scripts (not run): reads the output of `taskraft cluster
# status` (its human form) on stdin. The first line is "leader: node L ...",
# the second a header, then one row per member, "N ROLE ...".
#
# The cluster's leader, not one member's view of it: the JSON form lists a
# leader_id for the cluster and one per member, and a greedy match of it
# once read the last member's view (0 while that member was down).

# Prints the leader's node id: the leader the answering node names, when
# that node's own row says it leads. Else 0 (none yet, or a stale view of a
# leader just gone: its row says unreachable), and nothing when the status
# could not be read.
status_leader() {
  awk '
    NR == 1 && $1 == "leader:" { named = $3; read = 1 }
    NR > 2 && $1 == named && $2 == "leader" { confirmed = 1 }
    END { if (read) print (confirmed ? named : 0) }
  '
}

# Prints, space-separated, those of nodes N... that the status lists as
# unreachable. A node no longer a member (removed) is not listed, and not
# printed.
status_unreachable() {  # status_unreachable N...
  awk -v nodes="$*" '
    BEGIN { count = split(nodes, list, " "); for (i = 1; i <= count; i++) wanted[list[i]] = 1 }
    NR > 2 && ($1 in wanted) && $2 == "unreachable" { printf "%s%s", separator, $1; separator = " " }
  '
}
