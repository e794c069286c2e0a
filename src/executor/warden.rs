//! The warden: a small process beside each node that enforces the
//! executor's lease even when the node itself cannot.
//!
//! Self-fencing inside the node fails exactly when it matters most: a node
//! that is stopped (SIGSTOP, a debugger, a stalled runtime) cannot kill its
//! attempts when its lease runs out, yet the leader re-runs them once the
//! lease and its grace have passed. The warden is our own binary started
//! once per node (`taskraft __warden`, one exec per node lifetime, none per
//! task), in a process group of its own. The node tells it on a pipe each
//! time the leader accepts a heartbeat how much lease remains; when that
//! runs out without a renewal, the warden kills every task process group of
//! the node (the node's children that lead their own group). When the pipe
//! closes because the node died, it kills the groups it last saw, which also
//! reaches grandchildren that `PR_SET_PDEATHSIG` cannot, and exits.
//!
//! The warden's deadline trails the node's own by a quarter of
//! `lease_grace_ms` (plus the pipe's latency), so it kills only once the
//! node's lease has run out, and the node records what it killed as lost;
//! and it is always well before the leader's (`lease_grace_ms` later), so a
//! re-run never overlaps an attempt the warden should have killed.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin};

/// The first argument that makes the `taskraft` binary run as a warden.
pub const WARDEN_ARG: &str = "__warden";

/// Lines the node may queue before the warden reads them.
const WARDEN_LINES_MAX: usize = 64;

/// A message from the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WardenMessage {
    /// The lease runs for this much longer.
    Lease { remaining_ms: u64 },
}

impl WardenMessage {
    fn encode(&self) -> String {
        match self {
            WardenMessage::Lease { remaining_ms } => format!("lease {remaining_ms}\n"),
        }
    }

    fn parse(line: &str) -> Result<WardenMessage, String> {
        match line.trim().split_once(' ') {
            Some(("lease", ms)) => ms
                .parse()
                .map(|remaining_ms| WardenMessage::Lease { remaining_ms })
                .map_err(|err| format!("bad lease {ms:?}: {err}")),
            _ => Err(format!("unknown message {line:?}")),
        }
    }
}

/// The node's end of its warden.
pub struct WardenHandle {
    stdin: ChildStdin,
    child: Child,
}

impl WardenHandle {
    /// Starts the warden from this node's own binary.
    pub fn spawn() -> std::io::Result<WardenHandle> {
        let binary = std::env::current_exe()?;
        let mut child = tokio::process::Command::new(binary)
            .arg(WARDEN_ARG)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            // Its rare messages go to the node's log.
            .stderr(std::process::Stdio::inherit())
            // Its own group: a signal to the node's group (Ctrl-C) must not
            // end it before it has cleaned up.
            .process_group(0)
            .spawn()?;
        let stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("no stdin pipe"))?;
        Ok(WardenHandle { stdin, child })
    }

    /// Tells the warden how much longer the lease runs.
    pub async fn renew(&mut self, remaining: Duration, timeout: Duration) -> std::io::Result<()> {
        let line = WardenMessage::Lease { remaining_ms: remaining.as_millis() as u64 }.encode();
        tokio::time::timeout(timeout, self.stdin.write_all(line.as_bytes()))
            .await
            .map_err(|_| std::io::Error::other("the warden did not read in time"))?
    }

    /// Whether the warden process has exited.
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

/// The warden's main: returns when the node is gone.
pub fn run() -> std::process::ExitCode {
    let node = nix::unistd::getppid();
    let own_pid = std::process::id() as i32;
    let (lines_tx, lines_rx) = mpsc::sync_channel::<String>(WARDEN_LINES_MAX);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
        // Dropping the sender tells the main loop the node is gone.
    });
    let mut deadline: Option<Instant> = None;
    let mut known_groups: BTreeSet<i32> = BTreeSet::new();
    loop {
        let received = match deadline {
            Some(deadline) => {
                lines_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            }
            None => lines_rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(line) => match WardenMessage::parse(&line) {
                Ok(WardenMessage::Lease { remaining_ms }) => {
                    deadline = Some(Instant::now() + Duration::from_millis(remaining_ms));
                    known_groups = task_groups(node.as_raw(), own_pid);
                }
                Err(err) => warn(&format!("ignoring a message from the node: {err}")),
            },
            Err(RecvTimeoutError::Timeout) => {
                let groups: BTreeSet<i32> =
                    task_groups(node.as_raw(), own_pid).union(&known_groups).copied().collect();
                if !groups.is_empty() {
                    warn(&format!(
                        "the node's lease ran out without a renewal; killing {} task process group(s)",
                        groups.len()
                    ));
                }
                kill_groups(&groups);
                deadline = None;
            }
            Err(RecvTimeoutError::Disconnected) => {
                // The node is gone: what it ran must not outlive it.
                kill_groups(&known_groups);
                return std::process::ExitCode::SUCCESS;
            }
        }
    }
}

fn warn(message: &str) {
    let _ = writeln!(std::io::stderr(), "taskraft warden: {message}");
}

fn kill_groups(groups: &BTreeSet<i32>) {
    for group in groups {
        let _ = killpg(Pid::from_raw(*group), Signal::SIGKILL);
    }
}

/// The process groups led by children of `node`, other than the warden's.
fn task_groups(node: i32, own_pid: i32) -> BTreeSet<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return BTreeSet::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != own_pid)
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (parent, group) = parent_and_group(&stat)?;
            (parent == node && group == pid).then_some(pid)
        })
        .collect()
}

/// The parent PID and process group in a `/proc/<pid>/stat` line. The
/// command name may hold spaces and parentheses, so fields are counted from
/// the last `)`.
fn parent_and_group(stat: &str) -> Option<(i32, i32)> {
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let _state = fields.next()?;
    let parent = fields.next()?.parse().ok()?;
    let group = fields.next()?.parse().ok()?;
    Some((parent, group))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_ones_are_refused() {
        let message = WardenMessage::Lease { remaining_ms: 2_700 };
        assert_eq!(WardenMessage::parse(&message.encode()), Ok(message));
        assert!(WardenMessage::parse("lease soon").is_err());
        assert!(WardenMessage::parse("reboot").is_err());
    }

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        assert_eq!(parent_and_group("4242 (sh) S 17 4242 4242 0 -1"), Some((17, 4242)));
        assert_eq!(parent_and_group("99 (a) (b c) R 1 5 5 0"), Some((1, 5)));
        assert_eq!(parent_and_group("garbage"), None);
    }

    #[test]
    fn the_children_that_lead_their_own_group_are_found() {
        let mut child = std::process::Command::new("sleep");
        use std::os::unix::process::CommandExt;
        let mut grouped = child.arg("30").process_group(0).spawn().unwrap();
        let mut plain = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let groups = task_groups(std::process::id() as i32, 0);
        assert!(groups.contains(&(grouped.id() as i32)), "{groups:?}");
        assert!(!groups.contains(&(plain.id() as i32)), "{groups:?}");
        grouped.kill().unwrap();
        plain.kill().unwrap();
        let _ = (grouped.wait(), plain.wait());
    }
}
