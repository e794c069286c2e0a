//! The commands that go through the Raft log, and the answers `apply` gives.
//!
//! A command carries every input `apply` needs, the time included, so that
//! every node applying the same log reaches the same state. A refused command
//! is a deterministic [`Response::Rejected`], never a storage error.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::scheduler::periodic::{Cadence, Overlap, Periodic};
use crate::scheduler::policy::ExecutorCapacity;
use crate::scheduler::task::{NodeId, Outcome, Task, TaskId, TaskSpec, TaskState};

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
    /// The leader's placement of ready tasks on nodes. Each assignment opens
    /// an attempt whose fencing token is this entry's log index.
    Assign { now_ms: u64, assignments: Vec<Assignment> },
    /// An executor started the attempt with this token.
    StartAttempt { now_ms: u64, task: TaskId, token: u64 },
    /// An executor's attempt with this token ended.
    CompleteAttempt { now_ms: u64, task: TaskId, token: u64, report: AttemptReport },
    /// Executor reports, `StartAttempt` and `CompleteAttempt` only, applied
    /// in order and each on its own: a refused one changes nothing, and the
    /// others apply all the same. One entry carries what one executor had
    /// to say while its previous batch was on its way.
    Reports { reports: Vec<Command> },
    /// The leader found these attempts lost: their executors' leases expired.
    RequeueLost { now_ms: u64, lost: Vec<LostAttempt> },
    /// Stops (or resumes) new assignments to a node.
    SetDraining { node: NodeId, draining: bool },
    /// Removes at most `tasks_max` tasks that finished `retention_ms` or more before `now_ms`.
    PurgeFinished { now_ms: u64, retention_ms: u64, tasks_max: u32 },
    /// A submission the leader proposed with its view of the live
    /// executors: it submits as `SubmitTasks` does, then places ready tasks
    /// as the leader's next `Assign` would, so a task submitted to a cluster
    /// with free slots is assigned by its own entry, one commit instead of
    /// two. Each assignment's fencing token is this entry's log index. (Last
    /// of the variants, so the log's older entries decode as they did.)
    SubmitAndPlace {
        now_ms: u64,
        queued_tasks_max: u64,
        specs: Vec<TaskSpec>,
        placement: Placement,
    },
    /// Creates the periodic task `name`, or replaces it: its cadence counts
    /// from `now_ms` again, and what it fired before stays counted. (The
    /// periodic variants come last too.)
    PutPeriodic {
        now_ms: u64,
        /// The proposer's limit on periodic tasks.
        periodic_tasks_max: u64,
        name: String,
        cadence: Cadence,
        overlap: Overlap,
        spec: TaskSpec,
    },
    /// Removes the periodic task `name`; the tasks it fired stay.
    DeletePeriodic { name: String },
    /// Fires the periodic tasks whose next fire time is at or before
    /// `now_ms`, at most [`FIRES_PER_ENTRY_MAX`] of them.
    FirePeriodic {
        now_ms: u64,
        /// The proposer's limit on tasks not yet terminal.
        queued_tasks_max: u64,
    },
    /// Sets the most tasks of `queue` that may be ASSIGNED or RUNNING at
    /// once (0 pauses the queue), or with `None` lifts the limit.
    SetQueueLimit { queue: String, running_max: Option<u32> },
    /// Submits tasks as `SubmitTasks` does, each after the tasks its entry
    /// of `after` names (parallel to `specs`): a task whose dependencies
    /// have not all succeeded waits for them.
    SubmitAfter {
        now_ms: u64,
        queued_tasks_max: u64,
        specs: Vec<TaskSpec>,
        after: Vec<Vec<Awaited>>,
    },
}

/// A task a submitted task is to run after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Awaited {
    /// A task that exists already.
    Task(TaskId),
    /// The task of an earlier spec of the same batch, by its index: a whole
    /// graph of tasks goes in with one submission.
    InBatch(u32),
}

impl fmt::Display for Awaited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Awaited::Task(id) => write!(f, "task {id}"),
            Awaited::InBatch(idx) => write!(f, "task {idx} of the batch"),
        }
    }
}

/// The most periodic tasks one `FirePeriodic` entry fires; the leader
/// proposes another for the rest.
pub const FIRES_PER_ENTRY_MAX: usize = 1_000;

/// The leader's view of its live executors when it proposed a submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub executors: Vec<ExecutorCapacity>,
    /// The queue that went first in the leader's last plan.
    pub last_first_queue: Option<String>,
    /// At most this many assignments.
    pub assignments_max: u32,
}

/// One task placed on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub task: TaskId,
    pub node: NodeId,
}

/// What an executor tells about an attempt that ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptReport {
    /// `None` when the program never started.
    pub started_at_ms: Option<u64>,
    pub ended_at_ms: u64,
    pub outcome: Outcome,
    pub stdout_tail: String,
    pub stderr_tail: String,
}

/// An attempt the leader judged lost, with the task's revision it judged
/// from: if the task changed since (its executor recorded the start, say,
/// after a late heartbeat renewed its lease), the judgement is stale and the
/// attempt is left alone; the next round judges again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostAttempt {
    pub task: TaskId,
    pub token: u64,
    pub revision: u64,
}

impl Command {
    /// The attempt an executor report is about, by task and fencing token;
    /// `None` for a command that is not an executor report.
    pub fn reported_attempt(&self) -> Option<(TaskId, u64)> {
        match self {
            Command::StartAttempt { task, token, .. }
            | Command::CompleteAttempt { task, token, .. } => Some((*task, *token)),
            _ => None,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::SubmitTasks { specs, .. } => write!(f, "SubmitTasks(n={})", specs.len()),
            Command::CancelTask { id, .. } => write!(f, "CancelTask({id})"),
            Command::PromoteDue { now_ms } => write!(f, "PromoteDue(now_ms={now_ms})"),
            Command::Assign { assignments, .. } => write!(f, "Assign(n={})", assignments.len()),
            Command::StartAttempt { task, token, .. } => {
                write!(f, "StartAttempt({task}, token={token})")
            }
            Command::CompleteAttempt { task, token, report, .. } => {
                write!(f, "CompleteAttempt({task}, token={token}, {:?})", report.outcome)
            }
            Command::Reports { reports } => write!(f, "Reports(n={})", reports.len()),
            Command::RequeueLost { lost, .. } => write!(f, "RequeueLost(n={})", lost.len()),
            Command::SetDraining { node, draining } => write!(f, "SetDraining({node}, {draining})"),
            Command::PurgeFinished { tasks_max, .. } => write!(f, "PurgeFinished(max={tasks_max})"),
            Command::SubmitAndPlace { specs, placement, .. } => write!(
                f,
                "SubmitAndPlace(n={}, executors={})",
                specs.len(),
                placement.executors.len()
            ),
            Command::PutPeriodic { name, cadence, .. } => {
                write!(f, "PutPeriodic({name}, {cadence})")
            }
            Command::DeletePeriodic { name } => write!(f, "DeletePeriodic({name})"),
            Command::FirePeriodic { now_ms, .. } => write!(f, "FirePeriodic(now_ms={now_ms})"),
            Command::SetQueueLimit { queue, running_max } => {
                write!(f, "SetQueueLimit({queue}, {running_max:?})")
            }
            Command::SubmitAfter { specs, after, .. } => write!(
                f,
                "SubmitAfter(n={}, dependencies={})",
                specs.len(),
                after.iter().map(Vec::len).sum::<usize>()
            ),
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
    Cancelled(Arc<Task>),
    Promoted(Vec<TaskId>),
    /// Assignments that opened an attempt, with their fencing tokens, and the
    /// tasks that were no longer ready.
    Assigned {
        assigned: Vec<(Assignment, u64)>,
        skipped: Vec<TaskId>,
    },
    /// A start or a completion was recorded (or had been already). Only
    /// what the reporter needs: these answers travel back to executors on
    /// other nodes, one per report.
    Attempt(Recorded),
    /// One answer per report of a `Reports` command, in order.
    Reports(Vec<Response>),
    Requeued(Vec<TaskId>),
    Purged(Vec<TaskId>),
    Rejected(Rejection),
    /// A periodic task as put, or as it was when deleted.
    Periodic(Arc<Periodic>),
    /// The tasks a `FirePeriodic` created.
    Fired(Vec<TaskId>),
}

/// The task a report was about, and its state after the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub task: TaskId,
    pub state: TaskState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    /// Shared with the state: the answer costs no copy of the task.
    pub task: Arc<Task>,
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
    /// A report from an attempt that is not the task's current one: its
    /// fencing token is older. The executor should stop that attempt.
    Stale,
}

impl Rejection {
    pub fn new(kind: RejectionKind, message: impl Into<String>) -> Rejection {
        Rejection { kind, message: message.into() }
    }
}
