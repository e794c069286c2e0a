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
//! - [`state`]: `State` with its indexes and `apply`.

pub mod command;
pub mod limits;
pub mod state;
pub mod task;

pub use command::{Command, Rejection, RejectionKind, Response, Submitted};
pub use limits::Limits;
pub use state::{Applied, Counters, State};
pub use task::{Backoff, CommandSpec, Schedule, Task, TaskId, TaskSpec, TaskState};

#[cfg(test)]
mod tests;
