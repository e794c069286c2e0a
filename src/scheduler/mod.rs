//! The scheduler's pure core: the task model, the commands of the Raft log,
//! the replicated state and its deterministic `apply`.
//!
//! **Architecture invariant:** nothing in this module does I/O, reads a clock,
//! draws a random number, spawns a tokio task or knows about protobuf. Every
//! input arrives inside a [`Command`], so applying the same log on every node
//! gives the same [`State`]. That is what makes the state machine replicable
//! and what makes this module testable without a cluster.
//!
//! - [`task`]: `TaskSpec`, `Task`, `TaskState` and attempts.
//! - [`command`]: `Command` (a log entry's payload) and `Response`.
//! - [`limits`]: named limits on specs and their validation.
//! - [`state`]: `State` with its indexes and `apply`, fencing included.
//! - [`periodic`]: periodic tasks, their cron expressions and intervals.
//! - [`backoff`]: retry delays with deterministic jitter.
//! - [`policy`]: where ready tasks go: fair queues, labels, least loaded.
//! - [`lease`]: the leader's executor leases and what counts as lost.

pub mod backoff;
pub mod command;
pub mod lease;
pub mod limits;
pub mod periodic;
pub mod policy;
pub mod state;
pub mod task;

pub use command::{
    Assignment, AttemptReport, Awaited, Command, LostAttempt, Recorded, Rejection, RejectionKind,
    Response, Submitted,
};
pub use limits::Limits;
pub use periodic::{Cadence, CronExpr, Overlap, Periodic};
pub use state::{Applied, FrozenState, State, StateMeta, TaskPage};
pub use task::{
    Attempt, Backoff, CommandSpec, NodeId, Outcome, OutcomeKind, Schedule, StringMap, Task, TaskId,
    TaskIds, TaskSpec, TaskState,
};

#[cfg(test)]
mod scheduling_tests;
#[cfg(test)]
mod tests;
