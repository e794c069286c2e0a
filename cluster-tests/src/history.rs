//! A Jepsen-style history of a test run, one JSON object per line.
//!
//! - Client operations are recorded as an `invoke`, then exactly one of `ok`,
//!   `fail` (it certainly did not happen) or `info` (unknown: a timeout).
//! - Tasks record their own `exec-start` and `exec-end`, with the task id,
//!   attempt, fencing token and node they got from taskraft; long tasks also
//!   `exec-alive` every tick, which bounds when a killed one really died.
//!   The harness records `exec-gone` when it saw the last process of an
//!   attempt end, killed or not ([`crate::witness`]).
//! - The nemesis records what it broke and when it healed.
//! - At the end, a `final` record per task, read linearizably after the heal,
//!   and one `scan` marking when that read was done.
//!
//! Times are nanoseconds since the Unix epoch, from one machine's clock.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Event {
    /// A client asked for `f` (for a submission: the idempotency key).
    Invoke { process: u64, f: String, key: String, time_ns: u64 },
    /// It happened; for a submission, with the task's id.
    Ok { process: u64, f: String, key: String, task_id: Option<String>, time_ns: u64 },
    /// It certainly did not happen.
    Fail { process: u64, f: String, key: String, error: String, time_ns: u64 },
    /// It may or may not have happened.
    Info { process: u64, f: String, key: String, error: String, time_ns: u64 },
    /// A task's process started, as the process itself saw it.
    ExecStart { task_id: String, attempt: u32, token: u64, node: u64, time_ns: u64 },
    /// A task's process is still running (long tasks say so every tick).
    ExecAlive { task_id: String, attempt: u32, token: u64, node: u64, time_ns: u64 },
    /// A task's process reached its end.
    ExecEnd { task_id: String, attempt: u32, token: u64, node: u64, time_ns: u64 },
    /// No process of the attempt is left, as the harness saw from outside
    /// ([`crate::witness`]): never before its last process ended.
    ExecGone { task_id: String, token: u64, node: u64, time_ns: u64 },
    /// A fault: `f` is its kind (`kill`, `pause`, `partition`, ...), aimed at `nodes`.
    Nemesis { f: String, nodes: Vec<u64>, leader: bool, time_ns: u64 },
    /// Every fault was undone.
    Heal { time_ns: u64 },
    /// A task as the cluster holds it at the end.
    Final {
        task_id: String,
        key: String,
        state: String,
        attempts: Vec<FinalAttempt>,
        /// Its queue; empty in histories from before queues were recorded.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        queue: String,
        /// The tasks it runs after, by id.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        after: Vec<String>,
    },
    /// A client set a queue's limit on its active tasks, and it was acknowledged.
    QueueLimit { queue: String, running_max: u32, time_ns: u64 },
    /// When the final read was done.
    Scan { time_ns: u64 },
}

/// One attempt of a task in its final record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalAttempt {
    pub token: u64,
    pub node: u64,
    /// When the leader assigned it.
    pub assigned_at_ns: u64,
    /// When it ended as the cluster recorded it; 0 if it never did.
    pub ended_at_ns: u64,
    /// `exited 0`, `lost`, `timed out`, ...; empty while unfinished.
    pub outcome: String,
}

/// Appends events to a JSONL file; shareable between the test's tasks.
#[derive(Clone)]
pub struct HistoryWriter {
    file: Arc<Mutex<std::fs::File>>,
    clock: fn() -> u64,
}

impl HistoryWriter {
    /// A history stamped by the machine's clock ([`now_ns`]).
    pub fn create(path: &Path) -> std::io::Result<HistoryWriter> {
        HistoryWriter::with_clock(path, now_ns)
    }

    /// A history stamped by `clock` (a simulation's, say), in nanoseconds.
    pub fn with_clock(path: &Path, clock: fn() -> u64) -> std::io::Result<HistoryWriter> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(HistoryWriter { file: Arc::new(Mutex::new(file)), clock })
    }

    /// The time by this history's clock.
    pub fn now_ns(&self) -> u64 {
        (self.clock)()
    }

    pub fn record(&self, event: &Event) {
        let mut line = serde_json::to_string(event).expect("history events serialize");
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        file.write_all(line.as_bytes()).expect("the history file is writable");
    }
}

/// Reads a history file. Lines that are not events are errors, with their number.
pub fn read(path: &Path) -> anyhow::Result<Vec<Event>> {
    let file = std::fs::File::open(path)?;
    let mut events = Vec::new();
    for (line_idx, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let event = serde_json::from_str(&line).map_err(|err| {
            anyhow::anyhow!("{}:{}: not a history event: {err}", path.display(), line_idx + 1)
        })?;
        events.push(event);
    }
    Ok(events)
}

/// The `f` of a submission.
pub const SUBMIT: &str = "submit";

/// The `f` of a periodic task's put; its `key` is the prefix of the
/// idempotency keys of the tasks it fires (`periodic/<name>/`).
pub const PUT_PERIODIC: &str = "put-periodic";

/// The ids of the tasks whose submission was acknowledged, in order.
pub fn acknowledged(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::Ok { f, task_id, .. } if f == SUBMIT => task_id.clone(),
            _ => None,
        })
        .collect()
}

/// The current time in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64)
}
