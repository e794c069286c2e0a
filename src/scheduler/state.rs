//! The replicated task state and its `apply` function.
//!
//! [`State`] holds every task plus the indexes the scheduler needs: ready
//! tasks per queue in run order, pending tasks by run-at time, and the
//! idempotency keys. [`State::apply`] is the only way to change it. It is
//! deterministic: it reads no clock and does no I/O, so replaying the same
//! log gives the same state on every node.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::scheduler::command::{Command, Rejection, RejectionKind, Response, Submitted};
use crate::scheduler::limits::Limits;
use crate::scheduler::task::{Schedule, Task, TaskId, TaskSpec, TaskState};

/// The order of ready tasks within a queue: higher priority first, then
/// earlier run-at time, then earlier submission (lower id).
pub type ReadyKey = (Reverse<i32>, u64, TaskId);

/// The part of the state that is persisted; the indexes are derived from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub next_task_id: u64,
}

#[derive(Debug, Default)]
pub struct State {
    counters: Counters,
    tasks: BTreeMap<TaskId, Task>,
    ready_by_queue: BTreeMap<String, BTreeSet<ReadyKey>>,
    pending_by_run_at: BTreeSet<(u64, TaskId)>,
    task_by_idempotency_key: HashMap<String, TaskId>,
    n_tasks_queued: u64,
}

/// What one `apply` did: its answer and the tasks it changed.
#[derive(Debug)]
pub struct Applied {
    pub response: Response,
    /// Ids of the tasks this command changed, in order, without repeats.
    pub changed: Vec<TaskId>,
}

impl State {
    /// Rebuilds a state, indexes included, from persisted parts. Refuses
    /// parts that no sequence of commands could have produced.
    pub fn from_parts(
        counters: Counters,
        tasks: impl IntoIterator<Item = Task>,
    ) -> Result<State, String> {
        let mut state = State { counters, ..State::default() };
        for task in tasks {
            if task.id.0 >= state.counters.next_task_id {
                return Err(format!(
                    "task {} is at or beyond the next task id {}",
                    task.id, state.counters.next_task_id
                ));
            }
            if state.tasks.contains_key(&task.id) {
                return Err(format!("task {} appears twice", task.id));
            }
            state.index_insert(&task);
            state.tasks.insert(task.id, task);
        }
        Ok(state)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id)
    }

    /// Every task in id order.
    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values()
    }

    /// Tasks with an id greater than `after`, in id order.
    pub fn tasks_after(&self, after: Option<TaskId>) -> impl Iterator<Item = &Task> {
        let start = after.map_or(0, |id| id.0.saturating_add(1));
        self.tasks.range(TaskId(start)..).map(|(_, task)| task)
    }

    pub fn n_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Tasks not yet in a terminal state.
    pub fn n_tasks_queued(&self) -> u64 {
        self.n_tasks_queued
    }

    /// Ready tasks of one queue in the order they should run.
    pub fn ready_in_queue<'a>(&'a self, queue: &str) -> impl Iterator<Item = &'a Task> + 'a {
        self.ready_by_queue.get(queue).into_iter().flatten().map(|(_, _, id)| &self.tasks[id])
    }

    /// The queues that have ready tasks, in name order.
    pub fn ready_queues(&self) -> impl Iterator<Item = &str> {
        self.ready_by_queue.keys().map(String::as_str)
    }

    /// The earliest run-at time among pending tasks.
    pub fn next_pending_run_at_ms(&self) -> Option<u64> {
        self.pending_by_run_at.first().map(|(run_at_ms, _)| *run_at_ms)
    }

    /// Applies one command at log index `revision`.
    pub fn apply(&mut self, revision: u64, command: &Command) -> Applied {
        let mut changed = Vec::new();
        let result = match command {
            Command::SubmitTasks { now_ms, queued_tasks_max, specs } => self
                .submit(revision, *now_ms, *queued_tasks_max, specs, &mut changed)
                .map(Response::Submitted),
            Command::CancelTask { now_ms, id } => self
                .cancel(revision, *now_ms, *id, &mut changed)
                .map(|task| Response::Cancelled(Box::new(task))),
            Command::PromoteDue { now_ms } => {
                Ok(Response::Promoted(self.promote_due(revision, *now_ms, &mut changed)))
            }
        };
        let response = result.unwrap_or_else(|rejection| {
            assert!(changed.is_empty(), "a rejected command changed tasks");
            Response::Rejected(rejection)
        });
        Applied { response, changed }
    }

    fn submit(
        &mut self,
        revision: u64,
        now_ms: u64,
        queued_tasks_max: u64,
        specs: &[TaskSpec],
        changed: &mut Vec<TaskId>,
    ) -> Result<Vec<Submitted>, Rejection> {
        let ceiling = &Limits::CEILING;
        if specs.is_empty() {
            return Err(Rejection::new(RejectionKind::InvalidArgument, "the batch holds no tasks"));
        }
        if specs.len() > ceiling.batch_tasks_max {
            return Err(Rejection::new(
                RejectionKind::InvalidArgument,
                format!(
                    "the batch holds {} tasks, more than {}",
                    specs.len(),
                    ceiling.batch_tasks_max
                ),
            ));
        }
        // Check everything before changing anything: the batch is all or none.
        let mut n_new: u64 = 0;
        let mut keys_in_batch = BTreeSet::new();
        for (spec_idx, spec) in specs.iter().enumerate() {
            if let Err(err) = ceiling.check_spec(spec, now_ms) {
                let message = if specs.len() == 1 {
                    err.0
                } else {
                    format!("task {spec_idx} of the batch: {}", err.0)
                };
                return Err(Rejection::new(RejectionKind::InvalidArgument, message));
            }
            let is_new = match &spec.idempotency_key {
                Some(key) => {
                    !self.task_by_idempotency_key.contains_key(key)
                        && keys_in_batch.insert(key.as_str())
                }
                None => true,
            };
            n_new += u64::from(is_new);
        }
        let queued_tasks_max = queued_tasks_max.min(ceiling.queued_tasks_max);
        if self.n_tasks_queued + n_new > queued_tasks_max {
            return Err(Rejection::new(
                RejectionKind::ResourceExhausted,
                format!(
                    "the queue is full: {} tasks are queued, the limit is {queued_tasks_max}, and this adds {n_new}",
                    self.n_tasks_queued
                ),
            ));
        }

        let mut results = Vec::with_capacity(specs.len());
        for spec in specs {
            if let Some(existing) =
                spec.idempotency_key.as_ref().and_then(|key| self.task_by_idempotency_key.get(key))
            {
                results
                    .push(Submitted { task: self.tasks[existing].clone(), already_existed: true });
                continue;
            }
            let id = TaskId(self.counters.next_task_id);
            self.counters.next_task_id += 1;
            let run_at_ms = match spec.schedule {
                Schedule::Now => now_ms,
                Schedule::AtUnixMs(at_ms) => at_ms,
                Schedule::DelayMs(delay_ms) => now_ms.saturating_add(delay_ms),
            };
            let state = if run_at_ms > now_ms { TaskState::Pending } else { TaskState::Ready };
            let task = Task {
                id,
                spec: spec.clone(),
                state,
                run_at_ms,
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
                revision,
                attempts: Vec::new(),
            };
            self.index_insert(&task);
            self.tasks.insert(id, task.clone());
            changed.push(id);
            results.push(Submitted { task, already_existed: false });
        }
        Ok(results)
    }

    fn cancel(
        &mut self,
        revision: u64,
        now_ms: u64,
        id: TaskId,
        changed: &mut Vec<TaskId>,
    ) -> Result<Task, Rejection> {
        let Some(task) = self.tasks.get(&id) else {
            return Err(Rejection::new(
                RejectionKind::NotFound,
                format!("task {id} does not exist"),
            ));
        };
        if task.state.is_terminal() {
            return Err(Rejection::new(
                RejectionKind::FailedPrecondition,
                format!("task {id} is already {} and cannot be cancelled", task.state),
            ));
        }
        let task = self.transition(id, TaskState::Cancelled, revision, now_ms);
        changed.push(id);
        Ok(task.clone())
    }

    fn promote_due(
        &mut self,
        revision: u64,
        now_ms: u64,
        changed: &mut Vec<TaskId>,
    ) -> Vec<TaskId> {
        let due: Vec<TaskId> = self
            .pending_by_run_at
            .range(..=(now_ms, TaskId(u64::MAX)))
            .map(|(_, id)| *id)
            .collect();
        for id in &due {
            self.transition(*id, TaskState::Ready, revision, now_ms);
            changed.push(*id);
        }
        due
    }

    /// Moves a task to a new state, keeping the indexes in step.
    fn transition(&mut self, id: TaskId, to: TaskState, revision: u64, now_ms: u64) -> &Task {
        let mut task = self.tasks.remove(&id).expect("transition of a task that exists");
        assert!(!task.state.is_terminal(), "task {id} leaves terminal state {}", task.state);
        self.index_remove(&task);
        task.state = to;
        task.revision = revision;
        task.updated_at_ms = task.updated_at_ms.max(now_ms);
        self.index_insert(&task);
        self.tasks.entry(id).or_insert(task)
    }

    fn index_insert(&mut self, task: &Task) {
        match task.state {
            TaskState::Pending => {
                self.pending_by_run_at.insert((task.run_at_ms, task.id));
            }
            TaskState::Ready => {
                let key = (Reverse(task.spec.priority), task.run_at_ms, task.id);
                self.ready_by_queue.entry(task.spec.queue.clone()).or_default().insert(key);
            }
            TaskState::Assigned | TaskState::Running => {}
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled => {}
        }
        if !task.state.is_terminal() {
            self.n_tasks_queued += 1;
        }
        if let Some(key) = &task.spec.idempotency_key {
            self.task_by_idempotency_key.insert(key.clone(), task.id);
        }
    }

    fn index_remove(&mut self, task: &Task) {
        match task.state {
            TaskState::Pending => {
                assert!(
                    self.pending_by_run_at.remove(&(task.run_at_ms, task.id)),
                    "pending index out of step"
                );
            }
            TaskState::Ready => {
                let queue =
                    self.ready_by_queue.get_mut(&task.spec.queue).expect("ready queue exists");
                assert!(
                    queue.remove(&(Reverse(task.spec.priority), task.run_at_ms, task.id)),
                    "ready index out of step"
                );
                if queue.is_empty() {
                    self.ready_by_queue.remove(&task.spec.queue);
                }
            }
            TaskState::Assigned | TaskState::Running => {}
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled => {}
        }
        if !task.state.is_terminal() {
            self.n_tasks_queued -= 1;
        }
    }

    /// Recomputes every index from the tasks and compares. For tests and
    /// for checking a state loaded from disk.
    pub fn check_invariants(&self) -> Result<(), String> {
        let rebuilt = State::from_parts(self.counters.clone(), self.tasks.values().cloned())?;
        if rebuilt.ready_by_queue != self.ready_by_queue {
            return Err("ready index differs from the tasks".into());
        }
        if rebuilt.pending_by_run_at != self.pending_by_run_at {
            return Err("pending index differs from the tasks".into());
        }
        if rebuilt.n_tasks_queued != self.n_tasks_queued {
            return Err(format!(
                "queued count {} but tasks say {}",
                self.n_tasks_queued, rebuilt.n_tasks_queued
            ));
        }
        if rebuilt.task_by_idempotency_key != self.task_by_idempotency_key {
            return Err("idempotency index differs from the tasks".into());
        }
        Ok(())
    }
}
