//! Named limits on what a task spec may contain, and the validation of a spec
//! against them.
//!
//! There are two sets. [`Limits::CEILING`] is compiled in and is what `apply`
//! checks, so every node decides alike whatever its configuration says. The
//! configurable [`Limits`] of a node are checked at the API edge before a
//! command is proposed; they may only be tighter than the ceiling, which
//! `Limits::validate` enforces.

use serde::{Deserialize, Serialize};

use crate::scheduler::command::Awaited;
use crate::scheduler::task::{Schedule, TaskSpec};

/// The most output of one stream kept for one attempt in the replicated
/// state; executors keep less (their own configured tail).
pub const OUTPUT_TAIL_BYTES_CEILING: usize = 1024 * 1024;

/// Limits on one task spec and on the queue as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub program_bytes_max: usize,
    pub args_max: usize,
    /// The sum of the lengths of all arguments.
    pub args_bytes_max: usize,
    pub env_entries_max: usize,
    /// The sum of the lengths of all names and values.
    pub env_bytes_max: usize,
    pub working_dir_bytes_max: usize,
    pub queue_name_bytes_max: usize,
    pub idempotency_key_bytes_max: usize,
    pub labels_max: usize,
    /// The length of one label name or value.
    pub label_bytes_max: usize,
    pub timeout_ms_max: u64,
    pub max_attempts_max: u32,
    /// How far ahead a task may be scheduled.
    pub schedule_ahead_ms_max: u64,
    pub backoff_ms_max: u64,
    /// Tasks not yet in a terminal state, across all queues.
    pub queued_tasks_max: u64,
    /// Tasks in one `SubmitTasks` call.
    pub batch_tasks_max: usize,
    /// Periodic tasks the cluster keeps.
    pub periodic_tasks_max: u64,
    /// The tasks one task may run after.
    pub after_tasks_max: usize,
    /// Queues with a limit on their active tasks.
    pub queue_limits_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            program_bytes_max: 4 * 1024,
            args_max: 256,
            args_bytes_max: 64 * 1024,
            env_entries_max: 128,
            env_bytes_max: 64 * 1024,
            working_dir_bytes_max: 4 * 1024,
            queue_name_bytes_max: 128,
            idempotency_key_bytes_max: 256,
            labels_max: 32,
            label_bytes_max: 256,
            timeout_ms_max: 7 * 24 * 3600 * 1000,
            max_attempts_max: 100,
            schedule_ahead_ms_max: 366 * 24 * 3600 * 1000,
            backoff_ms_max: 24 * 3600 * 1000,
            queued_tasks_max: 1 << 20,
            batch_tasks_max: 1_000,
            periodic_tasks_max: 1_000,
            after_tasks_max: 64,
            queue_limits_max: 1_000,
        }
    }
}

/// Why a spec or a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LimitError(pub String);

macro_rules! refuse {
    ($($arg:tt)*) => { return Err(LimitError(format!($($arg)*))) };
}

impl Limits {
    /// The hard ceiling `apply` enforces. A node's configured limits must not exceed it.
    pub const CEILING: Limits = Limits {
        program_bytes_max: 64 * 1024,
        args_max: 4_096,
        args_bytes_max: 1024 * 1024,
        env_entries_max: 4_096,
        env_bytes_max: 1024 * 1024,
        working_dir_bytes_max: 64 * 1024,
        queue_name_bytes_max: 1_024,
        idempotency_key_bytes_max: 4_096,
        labels_max: 1_024,
        label_bytes_max: 4_096,
        timeout_ms_max: 365 * 24 * 3600 * 1000,
        max_attempts_max: 10_000,
        schedule_ahead_ms_max: 10 * 366 * 24 * 3600 * 1000,
        backoff_ms_max: 30 * 24 * 3600 * 1000,
        queued_tasks_max: 1 << 26,
        batch_tasks_max: 100_000,
        periodic_tasks_max: 100_000,
        after_tasks_max: 4_096,
        queue_limits_max: 100_000,
    };

    /// Checks that these limits are usable and within [`Limits::CEILING`].
    pub fn validate(&self) -> Result<(), LimitError> {
        let c = &Limits::CEILING;
        let pairs: [(&str, u64, u64); 19] = [
            ("program_bytes_max", self.program_bytes_max as u64, c.program_bytes_max as u64),
            ("args_max", self.args_max as u64, c.args_max as u64),
            ("args_bytes_max", self.args_bytes_max as u64, c.args_bytes_max as u64),
            ("env_entries_max", self.env_entries_max as u64, c.env_entries_max as u64),
            ("env_bytes_max", self.env_bytes_max as u64, c.env_bytes_max as u64),
            (
                "working_dir_bytes_max",
                self.working_dir_bytes_max as u64,
                c.working_dir_bytes_max as u64,
            ),
            (
                "queue_name_bytes_max",
                self.queue_name_bytes_max as u64,
                c.queue_name_bytes_max as u64,
            ),
            (
                "idempotency_key_bytes_max",
                self.idempotency_key_bytes_max as u64,
                c.idempotency_key_bytes_max as u64,
            ),
            ("labels_max", self.labels_max as u64, c.labels_max as u64),
            ("label_bytes_max", self.label_bytes_max as u64, c.label_bytes_max as u64),
            ("timeout_ms_max", self.timeout_ms_max, c.timeout_ms_max),
            ("max_attempts_max", self.max_attempts_max as u64, c.max_attempts_max as u64),
            ("schedule_ahead_ms_max", self.schedule_ahead_ms_max, c.schedule_ahead_ms_max),
            ("backoff_ms_max", self.backoff_ms_max, c.backoff_ms_max),
            ("queued_tasks_max", self.queued_tasks_max, c.queued_tasks_max),
            ("batch_tasks_max", self.batch_tasks_max as u64, c.batch_tasks_max as u64),
            ("periodic_tasks_max", self.periodic_tasks_max, c.periodic_tasks_max),
            ("after_tasks_max", self.after_tasks_max as u64, c.after_tasks_max as u64),
            ("queue_limits_max", self.queue_limits_max, c.queue_limits_max),
        ];
        for (name, value, ceiling) in pairs {
            if value == 0 {
                refuse!("limit {name} must be at least 1");
            }
            if value > ceiling {
                refuse!("limit {name} is {value}, above its ceiling of {ceiling}");
            }
        }
        Ok(())
    }

    /// Checks a queue's name: not empty, within the limit, and only
    /// letters, digits, '-', '_' and '.'.
    pub fn check_queue(&self, queue: &str) -> Result<(), LimitError> {
        check_text("queue", queue, self.queue_name_bytes_max)?;
        if !queue.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            refuse!("queue name {queue:?} may hold only letters, digits, '-', '_' and '.'");
        }
        Ok(())
    }

    /// Checks the tasks one task is to run after: at most
    /// `after_tasks_max` of them, each once.
    pub fn check_after(&self, after: &[Awaited]) -> Result<(), LimitError> {
        if after.len() > self.after_tasks_max {
            refuse!(
                "the task runs after {} tasks, more than {}",
                after.len(),
                self.after_tasks_max
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(twice) = after.iter().find(|awaited| !seen.insert(**awaited)) {
            refuse!("the task runs after {twice} twice");
        }
        Ok(())
    }

    /// Checks one spec against these limits. `now_ms` is the time the
    /// submission is judged at, for `Schedule::AtUnixMs` and delays.
    pub fn check_spec(&self, spec: &TaskSpec, now_ms: u64) -> Result<(), LimitError> {
        self.check_queue(&spec.queue)?;
        let command = &spec.command;
        if command.program.is_empty() {
            refuse!("the command has no program");
        }
        check_text("program", &command.program, self.program_bytes_max)?;
        if command.args.len() > self.args_max {
            refuse!(
                "the command has {} arguments, more than the limit of {}",
                command.args.len(),
                self.args_max
            );
        }
        let args_bytes: usize = command.args.iter().map(String::len).sum();
        if args_bytes > self.args_bytes_max {
            refuse!(
                "the arguments take {args_bytes} bytes, more than the limit of {}",
                self.args_bytes_max
            );
        }
        if command.args.iter().any(|arg| arg.contains('\0')) {
            refuse!("an argument contains a NUL byte");
        }
        if command.env.len() > self.env_entries_max {
            refuse!(
                "the environment has {} entries, more than the limit of {}",
                command.env.len(),
                self.env_entries_max
            );
        }
        let env_bytes: usize =
            command.env.iter().map(|(name, value)| name.len() + value.len()).sum();
        if env_bytes > self.env_bytes_max {
            refuse!(
                "the environment takes {env_bytes} bytes, more than the limit of {}",
                self.env_bytes_max
            );
        }
        for (name, value) in command.env.iter() {
            if name.is_empty() || name.contains('=') || name.contains('\0') || value.contains('\0')
            {
                refuse!("environment variable {name:?} is not a valid NAME=VALUE pair");
            }
        }
        if let Some(dir) = &command.working_dir {
            check_text("working directory", dir, self.working_dir_bytes_max)?;
        }
        if spec.timeout_ms == 0 || spec.timeout_ms > self.timeout_ms_max {
            refuse!("timeout {} ms is outside 1..={} ms", spec.timeout_ms, self.timeout_ms_max);
        }
        if spec.max_attempts == 0 || spec.max_attempts > self.max_attempts_max {
            refuse!("max attempts {} is outside 1..={}", spec.max_attempts, self.max_attempts_max);
        }
        let backoff = &spec.backoff;
        if backoff.initial_ms > backoff.max_ms || backoff.max_ms > self.backoff_ms_max {
            refuse!(
                "backoff must have initial_ms <= max_ms <= {} ms, got {} and {}",
                self.backoff_ms_max,
                backoff.initial_ms,
                backoff.max_ms
            );
        }
        if !(1_000..=100_000).contains(&backoff.multiplier_milli) {
            refuse!(
                "backoff multiplier {} is outside 1000..=100000 thousandths",
                backoff.multiplier_milli
            );
        }
        match spec.schedule {
            Schedule::Now => {}
            Schedule::DelayMs(delay_ms) => {
                if delay_ms > self.schedule_ahead_ms_max {
                    refuse!(
                        "delay {delay_ms} ms is more than the limit of {} ms",
                        self.schedule_ahead_ms_max
                    );
                }
            }
            Schedule::AtUnixMs(at_ms) => {
                if at_ms.saturating_sub(now_ms) > self.schedule_ahead_ms_max {
                    refuse!(
                        "run-at time {at_ms} is more than {} ms ahead of now ({now_ms})",
                        self.schedule_ahead_ms_max
                    );
                }
            }
        }
        if let Some(key) = &spec.idempotency_key {
            check_text("idempotency key", key, self.idempotency_key_bytes_max)?;
        }
        if spec.labels.len() > self.labels_max {
            refuse!(
                "the task has {} labels, more than the limit of {}",
                spec.labels.len(),
                self.labels_max
            );
        }
        for (name, value) in spec.labels.iter() {
            check_text("label name", name, self.label_bytes_max)?;
            if value.len() > self.label_bytes_max {
                refuse!("label {name:?} has a value longer than {} bytes", self.label_bytes_max);
            }
        }
        Ok(())
    }
}

fn check_text(what: &str, text: &str, bytes_max: usize) -> Result<(), LimitError> {
    if text.is_empty() {
        refuse!("the {what} is empty");
    }
    if text.len() > bytes_max {
        refuse!("the {what} is {} bytes long, more than the limit of {bytes_max}", text.len());
    }
    if text.contains('\0') {
        refuse!("the {what} contains a NUL byte");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limits_are_within_the_ceiling() {
        assert_eq!(Limits::default().validate(), Ok(()));
        assert_eq!(Limits::CEILING.validate(), Ok(()));
    }

    #[test]
    fn limits_above_the_ceiling_are_refused() {
        let limits =
            Limits { queued_tasks_max: Limits::CEILING.queued_tasks_max + 1, ..Limits::default() };
        let err = limits.validate().unwrap_err();
        assert!(err.0.contains("queued_tasks_max"), "{err}");
        let limits = Limits { args_max: 0, ..Limits::default() };
        assert!(limits.validate().unwrap_err().0.contains("args_max"));
    }
}
