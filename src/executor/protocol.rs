//! What executors and the leader say to each other, over the peer port.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::scheduler::{Command, NodeId, Response, TaskId};

/// The most reports one request may carry; the leader refuses more. The
/// leader also commits at most this many in one entry.
pub const REPORTS_PER_REQUEST_MAX: usize = 1_024;

/// About what a report adds to a batch of reports: its output tails, and
/// the rest.
pub fn report_size_bytes(report: &Command) -> usize {
    const FIXED_BYTES: usize = 128;
    match report {
        Command::CompleteAttempt { report, .. } => {
            FIXED_BYTES + report.stdout_tail.len() + report.stderr_tail.len()
        }
        _ => FIXED_BYTES,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecutorRequest {
    Heartbeat(Heartbeat),
    /// `StartAttempt` and `CompleteAttempt` commands, to be committed by the
    /// leader in one `Reports` entry; answered with `Response::Reports`.
    Reports(Vec<Command>),
}

/// An executor's renewal of its lease, with what it can take and what it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: NodeId,
    pub slots: u32,
    /// Attempts it takes beyond its slots, queued until a slot frees.
    pub prefetch: u32,
    pub labels: BTreeMap<String, String>,
    /// The attempts it runs, by task and fencing token.
    pub running: Vec<(TaskId, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecutorReply {
    /// The leader recorded the heartbeat: the lease is renewed from the
    /// moment the executor sent it. `last_log_index` is the leader's last
    /// log index when it did: every entry committed before then is at or
    /// below it.
    HeartbeatAccepted {
        last_log_index: u64,
    },
    /// The report was committed (or refused deterministically, as `Rejected`).
    Applied(Response),
    NotLeader {
        leader_id: Option<NodeId>,
    },
    /// Try again later.
    Unavailable(String),
}
