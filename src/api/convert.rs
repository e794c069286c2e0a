//! Conversions between protobuf messages and scheduler types, with the
//! defaults a spec gets when it leaves a field unset. All of them live here.

use crate::api::error::ApiError;
use crate::proto::taskraft_v1 as pb;
use crate::scheduler::periodic::check_name as check_periodic_name;
use crate::scheduler::task::{Attempt, Outcome, QUEUE_DEFAULT};
use crate::scheduler::{
    Awaited, Backoff, Cadence, CommandSpec, CronExpr, Limits, Overlap, Periodic, Schedule, State,
    Task, TaskId, TaskSpec, TaskState,
};

/// The per-attempt timeout of a spec that names none.
pub const TIMEOUT_MS_DEFAULT: u64 = 3_600_000;
/// Attempts of a spec that names none: a task lost with its executor runs again.
pub const MAX_ATTEMPTS_DEFAULT: u32 = 3;

/// Turns a submitted spec into a scheduler spec and checks it against the
/// node's configured limits, as judged at `now_ms`.
pub fn spec_from_pb(
    spec: pb::TaskSpec,
    limits: &Limits,
    now_ms: u64,
) -> Result<TaskSpec, ApiError> {
    let command = spec
        .command
        .ok_or_else(|| ApiError::InvalidArgument("the task spec has no command".into()))?;
    let schedule = match spec.schedule {
        None => Schedule::Now,
        Some(pb::task_spec::Schedule::RunAtUnixMs(at_ms)) => Schedule::AtUnixMs(at_ms),
        Some(pb::task_spec::Schedule::DelayMs(0)) => Schedule::Now,
        Some(pb::task_spec::Schedule::DelayMs(delay_ms)) => Schedule::DelayMs(delay_ms),
    };
    let backoff = match spec.backoff {
        None => Backoff::DEFAULT,
        Some(backoff) => Backoff {
            initial_ms: backoff.initial_ms,
            max_ms: backoff.max_ms,
            multiplier_milli: backoff.multiplier_milli,
        },
    };
    let spec = TaskSpec {
        queue: if spec.queue.is_empty() { QUEUE_DEFAULT.into() } else { spec.queue.into() },
        priority: spec.priority,
        schedule,
        command: CommandSpec {
            program: command.program.into(),
            args: command.args.into(),
            env: command.env.into_iter().collect(),
            working_dir: Some(command.working_dir).filter(|dir| !dir.is_empty()).map(Into::into),
        },
        timeout_ms: if spec.timeout_ms == 0 {
            TIMEOUT_MS_DEFAULT.min(limits.timeout_ms_max)
        } else {
            spec.timeout_ms
        },
        max_attempts: if spec.max_attempts == 0 { MAX_ATTEMPTS_DEFAULT } else { spec.max_attempts },
        backoff,
        idempotency_key: Some(spec.idempotency_key).filter(|key| !key.is_empty()).map(Into::into),
        labels: spec.labels.into_iter().collect(),
    };
    limits.check_spec(&spec, now_ms).map_err(|err| ApiError::InvalidArgument(err.0))?;
    Ok(spec)
}

/// The tasks the spec at `spec_idx` of a submission runs after, by id and
/// by index in the batch, checked against the node's configured limits.
pub fn after_from_pb(
    spec: &pb::TaskSpec,
    spec_idx: usize,
    limits: &Limits,
) -> Result<Vec<Awaited>, ApiError> {
    let mut after = spec
        .after
        .iter()
        .map(|id| parse_task_id(id).map(Awaited::Task))
        .collect::<Result<Vec<_>, _>>()?;
    for &idx in &spec.after_in_batch {
        if idx as usize >= spec_idx {
            return Err(ApiError::InvalidArgument(format!(
                "after_in_batch names task {idx} of the batch, which does not come before it"
            )));
        }
        after.push(Awaited::InBatch(idx));
    }
    limits.check_after(&after).map_err(|err| ApiError::InvalidArgument(err.0))?;
    Ok(after)
}

pub fn parse_task_id(id: &str) -> Result<TaskId, ApiError> {
    id.trim()
        .parse::<u64>()
        .map(TaskId)
        .map_err(|_| ApiError::InvalidArgument(format!("task id {id:?} is not a number")))
}

pub fn state_to_pb(state: TaskState) -> pb::TaskState {
    match state {
        TaskState::Waiting => pb::TaskState::Waiting,
        TaskState::Pending => pb::TaskState::Pending,
        TaskState::Ready => pb::TaskState::Ready,
        TaskState::Assigned => pb::TaskState::Assigned,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Succeeded => pb::TaskState::Succeeded,
        TaskState::Failed => pb::TaskState::Failed,
        TaskState::Cancelled => pb::TaskState::Cancelled,
    }
}

pub fn state_from_pb(value: i32) -> Result<TaskState, ApiError> {
    match pb::TaskState::try_from(value) {
        Ok(pb::TaskState::Waiting) => Ok(TaskState::Waiting),
        Ok(pb::TaskState::Pending) => Ok(TaskState::Pending),
        Ok(pb::TaskState::Ready) => Ok(TaskState::Ready),
        Ok(pb::TaskState::Assigned) => Ok(TaskState::Assigned),
        Ok(pb::TaskState::Running) => Ok(TaskState::Running),
        Ok(pb::TaskState::Succeeded) => Ok(TaskState::Succeeded),
        Ok(pb::TaskState::Failed) => Ok(TaskState::Failed),
        Ok(pb::TaskState::Cancelled) => Ok(TaskState::Cancelled),
        Ok(pb::TaskState::Unspecified) | Err(_) => {
            Err(ApiError::InvalidArgument(format!("{value} is not a task state")))
        }
    }
}

pub fn task_to_pb(task: &Task) -> pb::Task {
    pb::Task {
        id: task.id.to_string(),
        state: state_to_pb(task.state) as i32,
        spec: Some(pb::TaskSpec {
            after: task.after.iter().map(TaskId::to_string).collect(),
            ..spec_to_pb(&task.spec)
        }),
        run_at_unix_ms: task.run_at_ms,
        created_at_unix_ms: task.created_at_ms,
        updated_at_unix_ms: task.updated_at_ms,
        revision: task.revision,
        attempts: task.attempts.iter().map(attempt_to_pb).collect(),
    }
}

fn spec_to_pb(spec: &TaskSpec) -> pb::TaskSpec {
    let schedule = match spec.schedule {
        Schedule::Now => None,
        Schedule::AtUnixMs(at_ms) => Some(pb::task_spec::Schedule::RunAtUnixMs(at_ms)),
        Schedule::DelayMs(delay_ms) => Some(pb::task_spec::Schedule::DelayMs(delay_ms)),
    };
    pb::TaskSpec {
        queue: spec.queue.to_string(),
        priority: spec.priority,
        schedule,
        command: Some(pb::Command {
            program: spec.command.program.to_string(),
            args: spec.command.args.to_vec(),
            env: spec.command.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            working_dir: spec.command.working_dir.as_deref().unwrap_or_default().to_owned(),
        }),
        timeout_ms: spec.timeout_ms,
        max_attempts: spec.max_attempts,
        backoff: Some(pb::Backoff {
            initial_ms: spec.backoff.initial_ms,
            max_ms: spec.backoff.max_ms,
            multiplier_milli: spec.backoff.multiplier_milli,
        }),
        idempotency_key: spec.idempotency_key.as_deref().unwrap_or_default().to_owned(),
        labels: spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        after: Vec::new(),
        after_in_batch: Vec::new(),
    }
}

/// A periodic task as put: its name, cadence, overlap and spec, the spec
/// checked against the node's limits like a submitted one.
pub struct PeriodicPut {
    pub name: String,
    pub cadence: Cadence,
    pub overlap: Overlap,
    pub spec: TaskSpec,
}

pub fn periodic_from_pb(
    periodic: pb::PeriodicTask,
    limits: &Limits,
    now_ms: u64,
) -> Result<PeriodicPut, ApiError> {
    let cadence = match periodic.cadence {
        None => {
            return Err(ApiError::InvalidArgument(
                "the periodic task has no cadence: give a cron expression or an interval".into(),
            ));
        }
        Some(pb::periodic_task::Cadence::Cron(text)) => {
            Cadence::Cron(CronExpr::parse(&text).map_err(ApiError::InvalidArgument)?)
        }
        Some(pb::periodic_task::Cadence::EveryMs(period_ms)) => Cadence::Every { period_ms },
    };
    cadence.check().map_err(ApiError::InvalidArgument)?;
    check_periodic_name(&periodic.name).map_err(ApiError::InvalidArgument)?;
    let overlap = match pb::Overlap::try_from(periodic.overlap) {
        Ok(pb::Overlap::Unspecified | pb::Overlap::Allow) => Overlap::Allow,
        Ok(pb::Overlap::Forbid) => Overlap::Forbid,
        Err(_) => {
            return Err(ApiError::InvalidArgument(format!(
                "{} is not an overlap policy",
                periodic.overlap
            )));
        }
    };
    let spec = periodic
        .spec
        .ok_or_else(|| ApiError::InvalidArgument("the periodic task has no task spec".into()))?;
    if !spec.after.is_empty() || !spec.after_in_batch.is_empty() {
        return Err(ApiError::InvalidArgument(
            "a periodic task's spec names no tasks to run after".into(),
        ));
    }
    let spec = spec_from_pb(spec, limits, now_ms)?;
    Ok(PeriodicPut { name: periodic.name, cadence, overlap, spec })
}

pub fn periodic_to_pb(periodic: &Periodic) -> pb::PeriodicTask {
    pb::PeriodicTask {
        name: periodic.name.clone(),
        cadence: Some(match &periodic.cadence {
            Cadence::Cron(cron) => pb::periodic_task::Cadence::Cron(cron.text().to_owned()),
            Cadence::Every { period_ms } => pb::periodic_task::Cadence::EveryMs(*period_ms),
        }),
        overlap: match periodic.overlap {
            Overlap::Allow => pb::Overlap::Allow,
            Overlap::Forbid => pb::Overlap::Forbid,
        } as i32,
        spec: Some(spec_to_pb(&periodic.spec)),
        next_fire_unix_ms: periodic.next_fire_ms.unwrap_or(0),
        last_task_id: periodic.last_task.map(|id| id.to_string()).unwrap_or_default(),
        last_fire_unix_ms: periodic.last_fire_ms.unwrap_or(0),
        fired_total: periodic.fired_total,
        skipped_total: periodic.skipped_total,
    }
}

fn attempt_to_pb(attempt: &Attempt) -> pb::Attempt {
    let (outcome, exit_code) = match &attempt.outcome {
        None => (String::new(), 0),
        Some(Outcome::Exited { code }) => (format!("exited {code}"), *code),
        Some(Outcome::Signalled { signal }) => (format!("killed by signal {signal}"), -1),
        Some(Outcome::TimedOut) => ("timed out".into(), -1),
        Some(Outcome::Cancelled) => ("cancelled".into(), -1),
        Some(Outcome::Lost) => ("lost".into(), -1),
        Some(Outcome::StartFailed { message }) => (format!("did not start: {message}"), -1),
    };
    pb::Attempt {
        number: attempt.number,
        node_id: attempt.node_id,
        fencing_token: attempt.fencing_token,
        assigned_at_unix_ms: attempt.assigned_at_ms,
        started_at_unix_ms: attempt.started_at_ms.unwrap_or_default(),
        ended_at_unix_ms: attempt.ended_at_ms.unwrap_or_default(),
        outcome,
        exit_code,
        stdout_tail: attempt.stdout_tail.clone(),
        stderr_tail: attempt.stderr_tail.clone(),
    }
}

/// A queue as `state` holds it: its limit and how many of its tasks are
/// ready and active.
pub fn queue_to_pb(state: &State, queue: &str) -> pb::Queue {
    pb::Queue {
        name: queue.to_owned(),
        running_max: state.queue_running_max(queue),
        ready: state.n_ready_in_queue(queue) as u64,
        active: state.n_active_in_queue(queue),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_spec(program: &str) -> pb::TaskSpec {
        pb::TaskSpec {
            command: Some(pb::Command { program: program.into(), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn unset_fields_get_defaults() {
        let spec = spec_from_pb(pb_spec("true"), &Limits::default(), 0).unwrap();
        assert_eq!(&*spec.queue, "default");
        assert_eq!(spec.timeout_ms, TIMEOUT_MS_DEFAULT);
        assert_eq!(spec.max_attempts, MAX_ATTEMPTS_DEFAULT);
        assert_eq!(spec.schedule, Schedule::Now);
        assert_eq!(spec.idempotency_key, None);
    }

    #[test]
    fn bad_specs_are_invalid_argument() {
        let no_command = pb::TaskSpec::default();
        assert!(matches!(
            spec_from_pb(no_command, &Limits::default(), 0),
            Err(ApiError::InvalidArgument(_))
        ));
        let limits = Limits { program_bytes_max: 4, ..Limits::default() };
        let err = spec_from_pb(pb_spec("too-long"), &limits, 0).unwrap_err();
        assert!(err.to_string().contains("limit of 4"), "{err}");
        assert!(matches!(parse_task_id("abc"), Err(ApiError::InvalidArgument(_))));
        assert!(matches!(state_from_pb(0), Err(ApiError::InvalidArgument(_))));
        assert!(matches!(state_from_pb(99), Err(ApiError::InvalidArgument(_))));
    }

    #[test]
    fn a_task_round_trips_its_spec() {
        let mut pb = pb_spec("echo");
        pb.priority = 5;
        pb.queue = "mail".into();
        pb.labels.insert("zone".into(), "a".into());
        pb.schedule = Some(pb::task_spec::Schedule::DelayMs(500));
        let spec = spec_from_pb(pb, &Limits::default(), 0).unwrap();
        let task = Task {
            id: TaskId(7),
            spec: spec.clone(),
            state: TaskState::Pending,
            run_at_ms: 500,
            created_at_ms: 0,
            updated_at_ms: 0,
            revision: 3,
            attempts: vec![],
            after: vec![TaskId(2), TaskId(5)].into(),
        };
        let back = task_to_pb(&task);
        assert_eq!((back.id.as_str(), back.state), ("7", pb::TaskState::Pending as i32));
        let back_spec = back.spec.unwrap();
        let after: Vec<Awaited> = task.after.iter().copied().map(Awaited::Task).collect();
        assert_eq!(after_from_pb(&back_spec, 0, &Limits::default()).unwrap(), after);
        assert_eq!(spec_from_pb(back_spec, &Limits::default(), 0).unwrap(), spec);
    }

    #[test]
    fn bad_lists_of_tasks_to_run_after_are_refused() {
        let limits = Limits { after_tasks_max: 2, ..Limits::default() };
        let ids = |ids: &[&str]| ids.iter().map(|id| id.to_string()).collect::<Vec<_>>();
        for (after, in_batch, expected) in [
            (ids(&["1", "x"]), vec![], "task id \"x\" is not a number"),
            (ids(&["1", "2", "3"]), vec![], "runs after 3 tasks, more than 2"),
            (ids(&["1"]), vec![0, 1], "runs after 3 tasks, more than 2"),
            (ids(&["4", "4"]), vec![], "runs after task 4 twice"),
            (vec![], vec![1, 1], "runs after task 1 of the batch twice"),
            (vec![], vec![2], "names task 2 of the batch, which does not come before it"),
        ] {
            let spec =
                pb::TaskSpec { after: after.clone(), after_in_batch: in_batch, ..pb_spec("x") };
            match after_from_pb(&spec, 2, &limits) {
                Err(ApiError::InvalidArgument(message)) => {
                    assert!(message.contains(expected), "{message}")
                }
                other => panic!("{after:?}: {other:?}"),
            }
        }
        let mut periodic = pb::PeriodicTask {
            name: "p".into(),
            cadence: Some(pb::periodic_task::Cadence::EveryMs(1_000)),
            spec: Some(pb_spec("true")),
            ..Default::default()
        };
        periodic.spec.as_mut().unwrap().after = ids(&["1"]);
        match periodic_from_pb(periodic, &limits, 0) {
            Err(err) => assert!(err.to_string().contains("names no tasks to run after"), "{err}"),
            Ok(_) => panic!("a periodic spec with tasks to run after was taken"),
        }
    }
}
