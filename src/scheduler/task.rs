//! The task model: what a user submits ([`TaskSpec`]), what the cluster keeps
//! ([`Task`]), and the states a task moves through ([`TaskState`]).
//!
//! These are plain serde types. They are stored in the Raft log, in the state
//! machine and in snapshots, so a change to them is a change to the on-disk
//! format. Protobuf types never appear here; `api/convert.rs` translates.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A task's id: assigned by the state machine in submission order, so ids
/// also order tasks by submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId(pub u64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A Raft node id.
pub type NodeId = u64;

/// The name of the queue a task goes to when the spec names none.
pub const QUEUE_DEFAULT: &str = "default";

/// When a task should first run, as the user asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Schedule {
    /// As soon as possible.
    Now,
    /// At an absolute time, milliseconds since the Unix epoch.
    AtUnixMs(u64),
    /// This long after the submission is applied.
    DelayMs(u64),
}

/// The program a task runs. No shell is involved unless `program` is one.
///
/// The fields are laid out for a million tasks in memory: the program is
/// shared between tasks that run the same one (the state interns it), and
/// what most tasks leave unset costs a pointer. On disk they are the plain
/// strings, lists and maps they stand for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandSpec {
    pub program: Arc<str>,
    pub args: Box<[String]>,
    pub env: StringMap,
    /// `None` runs in the executor's own working directory.
    pub working_dir: Option<Box<str>>,
}

/// A map of strings that most tasks leave empty, as their environment and
/// labels: one pointer when it is empty. Reads see the map (it derefs to
/// one); it is serialized as the plain map, so the encoding is that of a
/// `BTreeMap`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[expect(clippy::box_collection, reason = "one word per task when empty, not three")]
pub struct StringMap(Option<Box<BTreeMap<String, String>>>);

impl StringMap {
    const EMPTY: &BTreeMap<String, String> = &BTreeMap::new();

    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        self.0.get_or_insert_default().insert(key, value)
    }
}

impl Deref for StringMap {
    type Target = BTreeMap<String, String>;

    fn deref(&self) -> &BTreeMap<String, String> {
        self.0.as_deref().unwrap_or(StringMap::EMPTY)
    }
}

impl From<BTreeMap<String, String>> for StringMap {
    fn from(map: BTreeMap<String, String>) -> StringMap {
        StringMap((!map.is_empty()).then(|| Box::new(map)))
    }
}

impl FromIterator<(String, String)> for StringMap {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> StringMap {
        StringMap::from(pairs.into_iter().collect::<BTreeMap<_, _>>())
    }
}

impl Serialize for StringMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.deref().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for StringMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<StringMap, D::Error> {
        BTreeMap::deserialize(deserializer).map(StringMap::from)
    }
}

/// Task ids that most tasks have none of (the tasks a task runs after):
/// one pointer when empty. Reads see the slice; serialized as the plain
/// sequence, so the encoding is that of a `Vec<TaskId>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[expect(clippy::box_collection, reason = "one word per task when empty, not two")]
pub struct TaskIds(Option<Box<Vec<TaskId>>>);

impl Deref for TaskIds {
    type Target = [TaskId];

    fn deref(&self) -> &[TaskId] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl From<Vec<TaskId>> for TaskIds {
    fn from(ids: Vec<TaskId>) -> TaskIds {
        TaskIds((!ids.is_empty()).then(|| Box::new(ids)))
    }
}

impl Serialize for TaskIds {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.deref().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TaskIds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<TaskIds, D::Error> {
        Vec::deserialize(deserializer).map(TaskIds::from)
    }
}

/// Exponential backoff between attempts of one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
    /// The factor between consecutive delays, in thousandths (2000 doubles).
    pub multiplier_milli: u32,
}

impl Backoff {
    pub const DEFAULT: Backoff =
        Backoff { initial_ms: 1_000, max_ms: 60_000, multiplier_milli: 2_000 };
}

/// Everything a user says about a task when submitting it, after defaults
/// have been filled in by the API edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Shared between the tasks of one queue (the state interns it).
    pub queue: Arc<str>,
    /// Higher runs first.
    pub priority: i32,
    pub schedule: Schedule,
    pub command: CommandSpec,
    /// How long one attempt may run before it is killed.
    pub timeout_ms: u64,
    /// How many attempts in all, the first one included. At least 1.
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// A second submission with the same key returns the first task.
    pub idempotency_key: Option<Box<str>>,
    /// Labels a node must carry, with equal values, to run the task.
    pub labels: StringMap,
}

impl TaskSpec {
    /// A spec that runs `program` now, with defaults; for tests.
    #[cfg(test)]
    pub fn for_test(program: &str) -> TaskSpec {
        TaskSpec {
            queue: QUEUE_DEFAULT.into(),
            priority: 0,
            schedule: Schedule::Now,
            command: CommandSpec {
                program: program.into(),
                args: Box::default(),
                env: StringMap::default(),
                working_dir: None,
            },
            timeout_ms: 60_000,
            max_attempts: 3,
            backoff: Backoff::DEFAULT,
            idempotency_key: None,
            labels: StringMap::default(),
        }
    }
}

/// The lifecycle of a task.
///
/// `Waiting` → `Pending` or `Ready` when every task it runs after has
/// succeeded (→ `Cancelled` when one of them fails or is cancelled);
/// `Pending` → `Ready` when its run-at time has come; `Ready` → `Assigned`
/// when the leader places it; `Assigned` → `Running` when the executor starts
/// it; then one of the three terminal states.
///
/// Stored by variant index, so a new state goes last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TaskState {
    Pending,
    Ready,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Waits for the tasks it runs after ([`Task::after`]) to succeed.
    Waiting,
}

impl TaskState {
    /// In the order of the lifecycle.
    pub const ALL: [TaskState; 8] = [
        TaskState::Waiting,
        TaskState::Pending,
        TaskState::Ready,
        TaskState::Assigned,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled)
    }

    /// The upper-case name used by the API, the CLI and the docs.
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Waiting => "WAITING",
            TaskState::Pending => "PENDING",
            TaskState::Ready => "READY",
            TaskState::Assigned => "ASSIGNED",
            TaskState::Running => "RUNNING",
            TaskState::Succeeded => "SUCCEEDED",
            TaskState::Failed => "FAILED",
            TaskState::Cancelled => "CANCELLED",
        }
    }

    pub fn from_name(name: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|state| state.name().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Exited {
        code: i32,
    },
    Signalled {
        signal: i32,
    },
    TimedOut,
    Cancelled,
    /// The executor's lease expired, so the attempt counts as lost.
    Lost,
    /// The program could not be started.
    StartFailed {
        message: String,
    },
}

impl Outcome {
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Exited { code: 0 } => OutcomeKind::Succeeded,
            Outcome::Exited { .. } => OutcomeKind::Exited,
            Outcome::Signalled { .. } => OutcomeKind::Signalled,
            Outcome::TimedOut => OutcomeKind::TimedOut,
            Outcome::Cancelled => OutcomeKind::Cancelled,
            Outcome::Lost => OutcomeKind::Lost,
            Outcome::StartFailed { .. } => OutcomeKind::StartFailed,
        }
    }
}

/// What kind of [`Outcome`] an attempt had, without its details: for
/// counting attempts by how they ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeKind {
    /// Exited with code 0.
    Succeeded,
    /// Exited with any other code.
    Exited,
    Signalled,
    TimedOut,
    Cancelled,
    Lost,
    StartFailed,
}

impl OutcomeKind {
    pub const ALL: [OutcomeKind; 7] = [
        OutcomeKind::Succeeded,
        OutcomeKind::Exited,
        OutcomeKind::Signalled,
        OutcomeKind::TimedOut,
        OutcomeKind::Cancelled,
        OutcomeKind::Lost,
        OutcomeKind::StartFailed,
    ];

    /// The lower-case name metrics label it with.
    pub fn name(self) -> &'static str {
        match self {
            OutcomeKind::Succeeded => "succeeded",
            OutcomeKind::Exited => "exited",
            OutcomeKind::Signalled => "signalled",
            OutcomeKind::TimedOut => "timed_out",
            OutcomeKind::Cancelled => "cancelled",
            OutcomeKind::Lost => "lost",
            OutcomeKind::StartFailed => "start_failed",
        }
    }
}

/// One execution of a task on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    pub node_id: NodeId,
    /// The Raft log index of the assignment; grows with every attempt.
    pub fencing_token: u64,
    pub assigned_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub ended_at_ms: Option<u64>,
    pub outcome: Option<Outcome>,
    pub stdout_tail: String,
    pub stderr_tail: String,
}

/// A task as the cluster keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub spec: TaskSpec,
    pub state: TaskState,
    /// The resolved run-at time; the earliest time the next attempt may start.
    pub run_at_ms: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// The Raft log index of the last change to this task.
    pub revision: u64,
    pub attempts: Vec<Attempt>,
    /// The tasks that must succeed before this one may run, by id, sorted
    /// and each once; empty for most tasks. Set at submission, never changed.
    pub after: TaskIds,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_map_costs_one_pointer_and_reads_as_an_empty_map() {
        assert_eq!(std::mem::size_of::<StringMap>(), std::mem::size_of::<usize>());
        let mut map = StringMap::default();
        assert!(map.is_empty() && map.get("a").is_none());
        assert_eq!(map, StringMap::from(BTreeMap::new()), "an emptied map is the default");
        assert_eq!(map.insert("a".into(), "1".into()), None);
        assert_eq!(map.get("a").map(String::as_str), Some("1"));
        assert_eq!(map.iter().count(), 1);
    }

    /// A million pending tasks are mostly this struct (plus their payload),
    /// so it stays compact: 296 bytes before the compact layout, 224 before
    /// the tasks to run after (one pointer).
    #[test]
    fn a_task_stays_compact() {
        assert!(std::mem::size_of::<Task>() <= 232, "{}", std::mem::size_of::<Task>());
        assert_eq!(std::mem::size_of::<TaskIds>(), std::mem::size_of::<usize>());
    }
}
