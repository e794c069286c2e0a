//! The commands that go through the Raft log, and the answers `apply` gives.
//!
//! A command carries every input `apply` needs, the time included, so that
//! every node applying the same log reaches the same state. A refused command
//! is a deterministic [`Response::Rejected`], never a storage error.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::scheduler::task::{Task, TaskId, TaskSpec};

/// A change to the task state, as stored in one Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Submits one or more tasks, all or none.
    SubmitTasks {
        /// The proposer's clock when it proposed the command.
        now_ms: u64,
        /// The proposer's limit on tasks not yet terminal.
        queued_tasks_max: u64,
        specs: Vec<TaskSpec>,
    },
    /// Cancels a task that has not finished.
    CancelTask { now_ms: u64, id: TaskId },
    /// Moves every pending task whose run-at time is at or before `now_ms` to ready.
    PromoteDue { now_ms: u64 },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::SubmitTasks { specs, .. } => write!(f, "SubmitTasks(n={})", specs.len()),
            Command::CancelTask { id, .. } => write!(f, "CancelTask({id})"),
            Command::PromoteDue { now_ms } => write!(f, "PromoteDue(now_ms={now_ms})"),
        }
    }
}

/// The answer of `apply` to one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Response {
    /// The answer to entries that carry no command (blank and membership entries).
    #[default]
    Empty,
    /// One result per submitted spec, in order.
    Submitted(Vec<Submitted>),
    Cancelled(Box<Task>),
    Promoted(Vec<TaskId>),
    Rejected(Rejection),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    pub task: Task,
    /// True when the idempotency key named a task that existed already.
    pub already_existed: bool,
}

/// Why `apply` refused a command. The command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    pub kind: RejectionKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectionKind {
    InvalidArgument,
    NotFound,
    /// The transition is not legal from the task's current state.
    FailedPrecondition,
    /// A limit such as the queued-task limit would be exceeded.
    ResourceExhausted,
}

impl Rejection {
    pub fn new(kind: RejectionKind, message: impl Into<String>) -> Rejection {
        Rejection { kind, message: message.into() }
    }
}
