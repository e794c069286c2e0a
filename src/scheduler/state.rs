//! The replicated task state and its `apply` function.
//!
//! [`State`] holds every task plus the indexes the scheduler needs: ready
//! tasks per queue in run order, pending tasks by run-at time, the active
//! attempts of each node, finished tasks by time, the idempotency keys, and
//! the waiting tasks by each task they wait for.
//! [`State::apply`] is the only way to change it. It is deterministic: it
//! reads no clock and does no I/O, so replaying the same log gives the same
//! state on every node.
//!
//! Fencing: an assignment opens an attempt whose token is the log index of
//! the `Assign` entry, so tokens grow with every attempt. A start or a
//! completion carrying any other token than the task's current attempt's is
//! refused as [`RejectionKind::Stale`], identically on every node.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::scheduler::backoff::retry_delay_ms;
use crate::scheduler::command::FIRES_PER_ENTRY_MAX;
use crate::scheduler::command::{
    Assignment, AttemptReport, Awaited, Command, LostAttempt, Placement, Recorded, Rejection,
    RejectionKind, Response, Submitted,
};
use crate::scheduler::limits::{Limits, OUTPUT_TAIL_BYTES_CEILING};
use crate::scheduler::periodic::{self, Cadence, Overlap, Periodic};
use crate::scheduler::policy::{PlacementCursor, plan};
use crate::scheduler::task::{
    Attempt, NodeId, Outcome, Schedule, Task, TaskId, TaskIds, TaskSpec, TaskState,
};

/// The order of ready tasks within a queue: higher priority first, then
/// earlier run-at time, then earlier submission (lower id).
pub type ReadyKey = (Reverse<i32>, u64, TaskId);

/// The part of the state that is persisted; the indexes are derived from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMeta {
    pub next_task_id: u64,
    /// Nodes that get no new assignments.
    pub draining_nodes: BTreeSet<NodeId>,
}

#[derive(Debug, Default)]
pub struct State {
    meta: StateMeta,
    /// Shared with [`FrozenState`]s taken for snapshots: a change to a task
    /// they hold copies it first.
    tasks: BTreeMap<TaskId, Arc<Task>>,
    ready_by_queue: BTreeMap<Arc<str>, BTreeSet<ReadyKey>>,
    pending_by_run_at: BTreeSet<(u64, TaskId)>,
    task_by_idempotency_key: HashMap<Box<str>, TaskId>,
    /// Tasks ASSIGNED or RUNNING, by the node of their current attempt.
    active_by_node: BTreeMap<NodeId, BTreeSet<TaskId>>,
    /// Finished tasks by the time they finished, for retention.
    finished_by_time: BTreeSet<(u64, TaskId)>,
    n_tasks_queued: u64,
    /// How many tasks are in each state, by `TaskState as usize`.
    n_tasks_by_state: [u64; TaskState::ALL.len()],
    /// Queue names and programs, each kept once however many tasks share it.
    interner: Interner,
    /// Periodic tasks by name.
    periodics: BTreeMap<Arc<str>, Arc<Periodic>>,
    /// Periodic tasks that will fire, by their next fire time.
    periodic_by_next_fire: BTreeSet<(u64, Arc<str>)>,
    /// The most tasks of a queue ASSIGNED or RUNNING at once, for the
    /// queues that have a limit (0 pauses a queue).
    running_max_by_queue: BTreeMap<Arc<str>, u32>,
    /// Tasks ASSIGNED or RUNNING, by queue; queues with none are absent.
    n_active_by_queue: BTreeMap<Arc<str>, u64>,
    /// WAITING tasks by each task of their `after` that has not succeeded
    /// (and is still kept); tasks nobody waits for are absent.
    waiting_by_dependency: BTreeMap<TaskId, BTreeSet<TaskId>>,
    /// Tasks that ended during the command being applied while others
    /// waited for them: `apply` releases or cancels those before it answers.
    ended_awaited: Vec<TaskId>,
}

/// How many distinct strings the state shares between tasks; past it, a
/// new one is kept by its own tasks alone.
const INTERNED_STRINGS_MAX: usize = 4_096;

/// Strings that many tasks hold alike (queue names, programs), kept once:
/// a million tasks of one queue running one program hold two strings, not
/// two million. Only memory changes; every task reads the same. Bounded by
/// [`INTERNED_STRINGS_MAX`]: when full, the strings no task holds any more
/// are let go, at most once per that many new strings.
#[derive(Debug, Default)]
struct Interner {
    strings: HashSet<Arc<str>>,
    misses_since_sweep: usize,
}

impl Interner {
    /// Points `string` at the shared copy, or shares it from now on.
    fn intern(&mut self, string: &mut Arc<str>) {
        if let Some(shared) = self.strings.get(&**string) {
            *string = shared.clone();
            return;
        }
        if self.strings.len() >= INTERNED_STRINGS_MAX {
            self.misses_since_sweep += 1;
            if self.misses_since_sweep < INTERNED_STRINGS_MAX {
                return;
            }
            self.misses_since_sweep = 0;
            self.strings.retain(|shared| Arc::strong_count(shared) > 1);
            if self.strings.len() >= INTERNED_STRINGS_MAX {
                return;
            }
        }
        self.strings.insert(string.clone());
    }

    fn intern_spec(&mut self, spec: &mut TaskSpec) {
        self.intern(&mut spec.queue);
        self.intern(&mut spec.command.program);
    }
}

/// The meta and the tasks of a [`State`] at one moment, for a snapshot.
#[derive(Debug, Clone)]
pub struct FrozenState {
    meta: StateMeta,
    tasks: BTreeMap<TaskId, Arc<Task>>,
    periodics: BTreeMap<Arc<str>, Arc<Periodic>>,
    running_max_by_queue: BTreeMap<Arc<str>, u32>,
}

impl FrozenState {
    pub fn meta(&self) -> &StateMeta {
        &self.meta
    }

    /// Every task in id order.
    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values().map(|task| &**task)
    }

    /// Task `id` as the state holds it: cloning the `Arc` copies nothing,
    /// and a later change to the task copies it first, leaving this one be.
    pub fn task_shared(&self, id: TaskId) -> Option<&Arc<Task>> {
        self.tasks.get(&id)
    }

    /// Every task as the state holds it, in id order (see [`State::task_shared`]).
    pub fn tasks_shared(&self) -> impl Iterator<Item = &Arc<Task>> {
        self.tasks.values()
    }

    pub fn n_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Every periodic task in name order.
    pub fn periodics(&self) -> impl ExactSizeIterator<Item = &Periodic> {
        self.periodics.values().map(|periodic| &**periodic)
    }

    /// Every queue limit, by queue name.
    pub fn queue_limits(&self) -> impl ExactSizeIterator<Item = (&str, u32)> {
        self.running_max_by_queue.iter().map(|(queue, running_max)| (&**queue, *running_max))
    }
}

/// One page of a filtered listing ([`State::list_page`]).
#[derive(Debug)]
pub struct TaskPage<'a> {
    pub tasks: Vec<&'a Task>,
    /// The id the next page starts after; `None` when no task after this
    /// page matches.
    pub resume_after: Option<TaskId>,
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
        meta: StateMeta,
        tasks: impl IntoIterator<Item = Task>,
    ) -> Result<State, String> {
        let mut state = State { meta, ..State::default() };
        for mut task in tasks {
            if task.id.0 >= state.meta.next_task_id {
                return Err(format!(
                    "task {} is at or beyond the next task id {}",
                    task.id, state.meta.next_task_id
                ));
            }
            if state.tasks.contains_key(&task.id) {
                return Err(format!("task {} appears twice", task.id));
            }
            state.check_after(&task)?;
            state.interner.intern_spec(&mut task.spec);
            state.index_insert(&task);
            state.tasks.insert(task.id, Arc::new(task));
        }
        Ok(state)
    }

    /// Refuses a persisted task whose `after` no command could have
    /// produced, given the tasks before it: unsorted, not earlier tasks, a
    /// WAITING task that waits for nothing or for a task that failed or was
    /// cancelled, or a task set to run while one of its `after` has not
    /// succeeded.
    fn check_after(&self, task: &Task) -> Result<(), String> {
        let id = task.id;
        if !task.after.is_sorted_by(|a, b| a < b)
            || task.after.last().is_some_and(|last| *last >= id)
        {
            return Err(format!(
                "task {id} runs after tasks that are not earlier tasks, once each"
            ));
        }
        let unsucceeded: Vec<TaskState> =
            self.unsucceeded(&task.after).map(|dependency| self.tasks[&dependency].state).collect();
        match task.state {
            TaskState::Waiting if unsucceeded.is_empty() => {
                Err(format!("task {id} is WAITING for tasks that all succeeded"))
            }
            TaskState::Waiting
                if unsucceeded
                    .iter()
                    .any(|state| matches!(state, TaskState::Failed | TaskState::Cancelled)) =>
            {
                Err(format!("task {id} is WAITING for a task that failed or was cancelled"))
            }
            state
                if !state.is_terminal()
                    && state != TaskState::Waiting
                    && !unsucceeded.is_empty() =>
            {
                Err(format!("task {id} is {state} before the tasks it runs after succeeded"))
            }
            _ => Ok(()),
        }
    }

    /// Adds persisted periodic tasks to a state rebuilt by
    /// [`State::from_parts`]. Refuses what no command could have produced.
    pub fn with_periodics(
        mut self,
        periodics: impl IntoIterator<Item = Periodic>,
    ) -> Result<State, String> {
        for periodic in periodics {
            periodic::check_name(&periodic.name)?;
            let name: Arc<str> = periodic.name.as_str().into();
            if self.periodics.contains_key(&name) {
                return Err(format!("periodic task {name} appears twice"));
            }
            if let Some(fire_ms) = periodic.next_fire_ms {
                self.periodic_by_next_fire.insert((fire_ms, name.clone()));
            }
            self.periodics.insert(name, Arc::new(periodic));
        }
        Ok(self)
    }

    /// Adds persisted queue limits to a rebuilt state. Refuses what no
    /// command could have produced.
    pub fn with_queue_limits(
        mut self,
        limits: impl IntoIterator<Item = (String, u32)>,
    ) -> Result<State, String> {
        for (queue, running_max) in limits {
            check_queue_name(&queue)?;
            if self.running_max_by_queue.insert(queue.as_str().into(), running_max).is_some() {
                return Err(format!("queue {queue} has two limits"));
            }
        }
        Ok(self)
    }

    pub fn meta(&self) -> &StateMeta {
        &self.meta
    }

    /// The most tasks of `queue` that may be ASSIGNED or RUNNING at once;
    /// `None` for no limit.
    pub fn queue_running_max(&self, queue: &str) -> Option<u32> {
        self.running_max_by_queue.get(queue).copied()
    }

    /// Ready tasks of `queue`.
    pub fn n_ready_in_queue(&self, queue: &str) -> usize {
        self.ready_by_queue.get(queue).map_or(0, BTreeSet::len)
    }

    /// Tasks of `queue` ASSIGNED or RUNNING.
    pub fn n_active_in_queue(&self, queue: &str) -> u64 {
        self.n_active_by_queue.get(queue).copied().unwrap_or(0)
    }

    /// Every queue limit, by queue name.
    pub fn queue_limits(&self) -> impl ExactSizeIterator<Item = (&str, u32)> {
        self.running_max_by_queue.iter().map(|(queue, running_max)| (&**queue, *running_max))
    }

    /// The queues that have a limit, ready tasks or active tasks, in name
    /// order, after `after`.
    pub fn known_queues_after<'a>(
        &'a self,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = &'a str> + 'a {
        use std::ops::Bound;
        let range = || (after.map_or(Bound::Unbounded, Bound::Excluded), Bound::Unbounded);
        type Run<'a> = std::iter::Peekable<Box<dyn Iterator<Item = &'a str> + 'a>>;
        let run = |names: Box<dyn Iterator<Item = &'a str> + 'a>| -> Run<'a> { names.peekable() };
        // Three sorted runs merged; each is walked only as far as asked.
        let mut runs = [
            run(Box::new(self.running_max_by_queue.range::<str, _>(range()).map(|(q, _)| &**q))),
            run(Box::new(self.ready_by_queue.range::<str, _>(range()).map(|(q, _)| &**q))),
            run(Box::new(self.n_active_by_queue.range::<str, _>(range()).map(|(q, _)| &**q))),
        ];
        std::iter::from_fn(move || {
            let next = runs.iter_mut().filter_map(|run| run.peek().copied()).min()?;
            for run in &mut runs {
                if run.peek() == Some(&next) {
                    run.next();
                }
            }
            Some(next)
        })
    }

    /// The periodic task `name`.
    pub fn periodic(&self, name: &str) -> Option<&Periodic> {
        self.periodics.get(name).map(|periodic| &**periodic)
    }

    /// Periodic tasks whose names sort after `after`, in name order.
    pub fn periodics_after<'a>(
        &'a self,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Periodic> + 'a {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.periodics.range::<str, _>((start, Bound::Unbounded)).map(|(_, periodic)| &**periodic)
    }

    /// Every periodic task in name order.
    pub fn periodics(&self) -> impl ExactSizeIterator<Item = &Periodic> {
        self.periodics.values().map(|periodic| &**periodic)
    }

    pub fn n_periodics(&self) -> usize {
        self.periodics.len()
    }

    /// The earliest next fire time among periodic tasks.
    pub fn next_periodic_fire_ms(&self) -> Option<u64> {
        self.periodic_by_next_fire.first().map(|(fire_ms, _)| *fire_ms)
    }

    pub fn task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id).map(|task| &**task)
    }

    /// Every task in id order.
    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values().map(|task| &**task)
    }

    /// Task `id` as the state holds it: cloning the `Arc` copies nothing,
    /// and a later change to the task copies it first, leaving this one be.
    pub fn task_shared(&self, id: TaskId) -> Option<&Arc<Task>> {
        self.tasks.get(&id)
    }

    /// Every task as the state holds it, in id order (see [`State::task_shared`]).
    pub fn tasks_shared(&self) -> impl Iterator<Item = &Arc<Task>> {
        self.tasks.values()
    }

    /// The meta and the tasks as they are now, unchanged by later commands,
    /// for a snapshot. Cheap: the tasks are shared, not copied, until a
    /// command changes one.
    pub fn frozen(&self) -> FrozenState {
        FrozenState {
            meta: self.meta.clone(),
            tasks: self.tasks.clone(),
            periodics: self.periodics.clone(),
            running_max_by_queue: self.running_max_by_queue.clone(),
        }
    }

    /// Tasks with an id greater than `after`, in id order.
    pub fn tasks_after(&self, after: Option<TaskId>) -> impl Iterator<Item = &Task> {
        self.tasks_shared_after(after).map(|task| &**task)
    }

    /// Tasks with an id greater than `after`, in id order, as the state
    /// holds them (see [`State::task_shared`]).
    pub fn tasks_shared_after(&self, after: Option<TaskId>) -> impl Iterator<Item = &Arc<Task>> {
        let start = after.map_or(0, |id| id.0.saturating_add(1));
        self.tasks.range(TaskId(start)..).map(|(_, task)| task)
    }

    /// One page of a filtered listing: the tasks after `after` that
    /// `matches`, in id order, at most `page_size` of them, having looked
    /// at no more than `scanned_max` tasks. A filter that few tasks pass
    /// then costs one bounded walk per page, not a walk over every task
    /// while the state is held. So a page may hold fewer tasks than
    /// `page_size`, even none, and still name where the listing goes on;
    /// [`TaskPage::resume_after`] is `None` only at the end. Every page
    /// that goes on either holds a task or moves past at least one.
    pub fn list_page(
        &self,
        after: Option<TaskId>,
        page_size: usize,
        scanned_max: usize,
        matches: impl Fn(&Task) -> bool,
    ) -> TaskPage<'_> {
        let (page_size, scanned_max) = (page_size.max(1), scanned_max.max(1));
        let mut tasks: Vec<&Task> = Vec::new();
        let mut last_scanned = None;
        for (n_scanned, task) in self.tasks_after(after).enumerate() {
            if n_scanned == scanned_max {
                return TaskPage { tasks, resume_after: last_scanned };
            }
            if matches(task) {
                if tasks.len() == page_size {
                    // Another task matches: the next page starts with it.
                    let resume_after = tasks.last().map(|last| last.id);
                    return TaskPage { tasks, resume_after };
                }
                tasks.push(task);
            }
            last_scanned = Some(task.id);
        }
        TaskPage { tasks, resume_after: None }
    }

    pub fn n_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Tasks not yet in a terminal state.
    pub fn n_tasks_queued(&self) -> u64 {
        self.n_tasks_queued
    }

    /// How many tasks are in `state`.
    pub fn n_tasks_in(&self, state: TaskState) -> u64 {
        self.n_tasks_by_state[state as usize]
    }

    /// How many tasks are ready in each queue that has any, in name order.
    pub fn ready_queue_depths(&self) -> impl ExactSizeIterator<Item = (&str, usize)> {
        self.ready_by_queue.iter().map(|(queue, ready)| (&**queue, ready.len()))
    }

    /// Ready tasks of one queue in the order they should run.
    pub fn ready_in_queue<'a>(&'a self, queue: &str) -> impl Iterator<Item = &'a Task> + 'a {
        self.ready_by_queue.get(queue).into_iter().flatten().map(|(_, _, id)| &*self.tasks[id])
    }

    /// The queues that have ready tasks, in name order.
    pub fn ready_queues(&self) -> impl Iterator<Item = &str> {
        self.ready_by_queue.keys().map(|queue| &**queue)
    }

    /// Tasks ASSIGNED to or RUNNING on `node`.
    pub fn active_on(&self, node: NodeId) -> impl Iterator<Item = &Task> {
        self.active_by_node.get(&node).into_iter().flatten().map(|id| &*self.tasks[id])
    }

    pub fn n_active_on(&self, node: NodeId) -> usize {
        self.active_by_node.get(&node).map_or(0, BTreeSet::len)
    }

    /// Every ASSIGNED or RUNNING task, by node.
    pub fn active(&self) -> impl Iterator<Item = (NodeId, &Task)> {
        self.active_by_node
            .iter()
            .flat_map(|(node, ids)| ids.iter().map(|id| (*node, &*self.tasks[id])))
    }

    pub fn is_draining(&self, node: NodeId) -> bool {
        self.meta.draining_nodes.contains(&node)
    }

    /// The earliest run-at time among pending tasks.
    /// Tasks in a terminal state, kept until they are purged.
    pub fn n_tasks_finished(&self) -> usize {
        self.finished_by_time.len()
    }

    /// The finish time up to which finished tasks should be purged now, if
    /// any: those that finished `retention_ms` or more before `now_ms`, and
    /// the oldest beyond `finished_tasks_max`. One `PurgeFinished` removes
    /// at most `tasks_max` of them, so a purge is due at once only when a
    /// whole batch is waiting; less waits for `timer_due` (the purge
    /// interval), so that retention costs a write per interval, not one per
    /// task, however fast tasks finish.
    pub fn purge_cutoff_ms(
        &self,
        now_ms: u64,
        retention_ms: u64,
        finished_tasks_max: u64,
        tasks_max: u32,
        timer_due: bool,
    ) -> Option<u64> {
        let batch = (tasks_max as usize).max(1);
        let time_of = |rank: usize| self.finished_by_time.iter().nth(rank).map(|(ms, _)| *ms);
        let n_over = (self.finished_by_time.len() as u64).saturating_sub(finished_tasks_max);
        let over_cutoff_ms = match n_over {
            0 => None,
            n_over => time_of((n_over as usize).min(batch) - 1),
        };
        let cutoff_ms = now_ms.saturating_sub(retention_ms).max(over_cutoff_ms.unwrap_or(0));
        let is_due = |rank: usize| time_of(rank).is_some_and(|ms| ms <= cutoff_ms);
        (is_due(batch - 1) || (timer_due && is_due(0))).then_some(cutoff_ms)
    }

    pub fn next_pending_run_at_ms(&self) -> Option<u64> {
        self.pending_by_run_at.first().map(|(run_at_ms, _)| *run_at_ms)
    }

    /// Applies one command at log index `revision`.
    pub fn apply(&mut self, revision: u64, command: &Command) -> Applied {
        let mut changed = Vec::new();
        let result = match command {
            Command::SubmitTasks { now_ms, queued_tasks_max, specs } => self
                .submit(revision, *now_ms, *queued_tasks_max, specs, &[], &mut changed)
                .map(Response::Submitted),
            Command::SubmitAfter { now_ms, queued_tasks_max, specs, after } => self
                .submit(revision, *now_ms, *queued_tasks_max, specs, after, &mut changed)
                .map(Response::Submitted),
            Command::CancelTask { now_ms, id } => {
                self.cancel(revision, *now_ms, *id, &mut changed).map(Response::Cancelled)
            }
            Command::PromoteDue { now_ms } => {
                Ok(Response::Promoted(self.promote_due(revision, *now_ms, &mut changed)))
            }
            Command::Assign { now_ms, assignments } => {
                Ok(self.assign(revision, *now_ms, assignments, &mut changed))
            }
            Command::StartAttempt { .. } | Command::CompleteAttempt { .. } => {
                self.report(revision, command, &mut changed)
            }
            Command::Reports { reports } => Ok(Response::Reports(
                reports
                    .iter()
                    .map(|report| self.report_in_batch(revision, report, &mut changed))
                    .collect(),
            )),
            Command::RequeueLost { now_ms, lost } => {
                Ok(Response::Requeued(self.requeue_lost(revision, *now_ms, lost, &mut changed)))
            }
            Command::SetDraining { node, draining } => {
                if *draining {
                    self.meta.draining_nodes.insert(*node);
                } else {
                    self.meta.draining_nodes.remove(node);
                }
                Ok(Response::Empty)
            }
            Command::PurgeFinished { now_ms, retention_ms, tasks_max } => Ok(Response::Purged(
                self.purge_finished(*now_ms, *retention_ms, *tasks_max, &mut changed),
            )),
            Command::SubmitAndPlace { now_ms, queued_tasks_max, specs, placement } => self
                .submit(revision, *now_ms, *queued_tasks_max, specs, &[], &mut changed)
                .map(|submitted| {
                    let first_id = submitted.first().map_or(0, |answer| answer.task.id.0);
                    self.place(revision, *now_ms, placement, first_id, &mut changed);
                    Response::Submitted(self.as_they_are_now(submitted))
                }),
            Command::PutPeriodic { now_ms, periodic_tasks_max, name, cadence, overlap, spec } => {
                self.put_periodic(*now_ms, *periodic_tasks_max, name, cadence, *overlap, spec)
                    .map(Response::Periodic)
            }
            Command::DeletePeriodic { name } => self.delete_periodic(name).map(Response::Periodic),
            Command::FirePeriodic { now_ms, queued_tasks_max } => Ok(Response::Fired(
                self.fire_periodic(revision, *now_ms, *queued_tasks_max, &mut changed),
            )),
            Command::SetQueueLimit { queue, running_max } => {
                self.set_queue_limit(queue, *running_max).map(|()| Response::Empty)
            }
        };
        let response = match result {
            Ok(response) => {
                self.settle_awaited(revision, &mut changed);
                response
            }
            Err(rejection) => {
                assert!(changed.is_empty(), "a rejected command changed tasks");
                assert!(self.ended_awaited.is_empty(), "a rejected command ended tasks");
                Response::Rejected(rejection)
            }
        };
        Applied { response, changed }
    }

    /// Releases the tasks that waited for a task that succeeded in this
    /// command, once nothing else holds them back, and cancels those that
    /// waited for one that failed or was cancelled, and in turn the tasks
    /// waiting for those. At the time each awaited task ended.
    fn settle_awaited(&mut self, revision: u64, changed: &mut Vec<TaskId>) {
        while let Some(id) = self.ended_awaited.pop() {
            let ended = &self.tasks[&id];
            let (now_ms, succeeded) = (ended.updated_at_ms, ended.state == TaskState::Succeeded);
            if succeeded {
                let released = self.waiting_by_dependency.remove(&id).unwrap_or_default();
                for waiting in released {
                    if self.waits_for_any(waiting) {
                        continue;
                    }
                    let task = &self.tasks[&waiting];
                    let to =
                        if task.run_at_ms > now_ms { TaskState::Pending } else { TaskState::Ready };
                    self.transition(waiting, to, revision, now_ms);
                    changed.push(waiting);
                }
            } else {
                let doomed: Vec<TaskId> = self
                    .waiting_by_dependency
                    .get(&id)
                    .map(|waiting| waiting.iter().copied().collect())
                    .unwrap_or_default();
                for waiting in doomed {
                    self.transition(waiting, TaskState::Cancelled, revision, now_ms);
                    changed.push(waiting);
                }
                assert!(
                    !self.waiting_by_dependency.contains_key(&id),
                    "task {id} ended but tasks still wait for it"
                );
            }
        }
    }

    /// Whether a WAITING task still waits for any task.
    fn waits_for_any(&self, id: TaskId) -> bool {
        self.tasks[&id].after.iter().any(|dependency| {
            self.waiting_by_dependency.get(dependency).is_some_and(|waiting| waiting.contains(&id))
        })
    }

    /// The tasks of `after` that have not succeeded, among those still kept
    /// (a purged one had succeeded: one that failed or was cancelled
    /// cancelled the tasks waiting for it before it could be purged).
    fn unsucceeded<'a>(&'a self, after: &'a [TaskId]) -> impl Iterator<Item = TaskId> + 'a {
        after.iter().copied().filter(|dependency| {
            self.tasks.get(dependency).is_some_and(|task| task.state != TaskState::Succeeded)
        })
    }

    fn submit(
        &mut self,
        revision: u64,
        now_ms: u64,
        queued_tasks_max: u64,
        specs: &[TaskSpec],
        after: &[Vec<Awaited>],
        changed: &mut Vec<TaskId>,
    ) -> Result<Vec<Submitted>, Rejection> {
        let ceiling = &Limits::CEILING;
        if specs.is_empty() {
            return Err(Rejection::new(RejectionKind::InvalidArgument, "the batch holds no tasks"));
        }
        if !after.is_empty() && after.len() != specs.len() {
            return Err(Rejection::new(
                RejectionKind::InvalidArgument,
                format!("{} tasks but {} lists of tasks to run after", specs.len(), after.len()),
            ));
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
            let in_batch = |message: String| {
                if specs.len() == 1 {
                    message
                } else {
                    format!("task {spec_idx} of the batch: {message}")
                }
            };
            if let Err(err) = ceiling.check_spec(spec, now_ms) {
                return Err(Rejection::new(RejectionKind::InvalidArgument, in_batch(err.0)));
            }
            let spec_after = after.get(spec_idx).map_or(&[][..], Vec::as_slice);
            if let Err(err) = ceiling.check_after(spec_after) {
                return Err(Rejection::new(RejectionKind::InvalidArgument, in_batch(err.0)));
            }
            for awaited in spec_after {
                let dependency = match *awaited {
                    Awaited::Task(id) => id,
                    Awaited::InBatch(idx) if idx as usize >= spec_idx => {
                        return Err(Rejection::new(
                            RejectionKind::InvalidArgument,
                            in_batch(format!("{awaited}, to run after, does not come before it")),
                        ));
                    }
                    // A task of this batch is new, unless its key names a
                    // task there is already: then that one is awaited.
                    Awaited::InBatch(idx) => match specs[idx as usize]
                        .idempotency_key
                        .as_ref()
                        .and_then(|key| self.task_by_idempotency_key.get(key))
                    {
                        Some(existing) => *existing,
                        None => continue,
                    },
                };
                match self.tasks.get(&dependency).map(|task| task.state) {
                    None => {
                        return Err(Rejection::new(
                            RejectionKind::NotFound,
                            in_batch(format!(
                                "task {dependency}, to run after, does not exist (or was purged)"
                            )),
                        ));
                    }
                    Some(state @ (TaskState::Failed | TaskState::Cancelled)) => {
                        return Err(Rejection::new(
                            RejectionKind::FailedPrecondition,
                            in_batch(format!(
                                "task {dependency}, to run after, is {state}, so this task would never run"
                            )),
                        ));
                    }
                    Some(_) => {}
                }
            }
            let is_new = match &spec.idempotency_key {
                Some(key) => {
                    !self.task_by_idempotency_key.contains_key(key) && keys_in_batch.insert(&**key)
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

        let mut results: Vec<Submitted> = Vec::with_capacity(specs.len());
        for (spec_idx, spec) in specs.iter().enumerate() {
            if let Some(existing) =
                spec.idempotency_key.as_ref().and_then(|key| self.task_by_idempotency_key.get(key))
            {
                results
                    .push(Submitted { task: self.tasks[existing].clone(), already_existed: true });
                continue;
            }
            let mut spec_after: Vec<TaskId> = after
                .get(spec_idx)
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .map(|awaited| match *awaited {
                    Awaited::Task(id) => id,
                    Awaited::InBatch(idx) => results[idx as usize].task.id,
                })
                .collect();
            // Two entries may name one task (an id, and a spec whose key
            // named that task): it is awaited once.
            spec_after.sort_unstable();
            spec_after.dedup();
            let task = self.insert_task(revision, now_ms, spec.clone(), spec_after.into(), changed);
            results.push(Submitted { task, already_existed: false });
        }
        Ok(results)
    }

    /// Creates a task from a spec already checked, to run after the tasks
    /// of `after` (checked too, and sorted).
    fn insert_task(
        &mut self,
        revision: u64,
        now_ms: u64,
        mut spec: TaskSpec,
        after: TaskIds,
        changed: &mut Vec<TaskId>,
    ) -> Arc<Task> {
        let id = TaskId(self.meta.next_task_id);
        self.meta.next_task_id += 1;
        let run_at_ms = match spec.schedule {
            Schedule::Now => now_ms,
            Schedule::AtUnixMs(at_ms) => at_ms,
            Schedule::DelayMs(delay_ms) => now_ms.saturating_add(delay_ms),
        };
        let state = if self.unsucceeded(&after).next().is_some() {
            TaskState::Waiting
        } else if run_at_ms > now_ms {
            TaskState::Pending
        } else {
            TaskState::Ready
        };
        self.interner.intern_spec(&mut spec);
        let task = Task {
            id,
            spec,
            state,
            run_at_ms,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            revision,
            attempts: Vec::new(),
            after,
        };
        self.index_insert(&task);
        let task = Arc::new(task);
        self.tasks.insert(id, task.clone());
        changed.push(id);
        task
    }

    fn put_periodic(
        &mut self,
        now_ms: u64,
        periodic_tasks_max: u64,
        name: &str,
        cadence: &Cadence,
        overlap: Overlap,
        spec: &TaskSpec,
    ) -> Result<Arc<Periodic>, Rejection> {
        let invalid = |message: String| Rejection::new(RejectionKind::InvalidArgument, message);
        periodic::check_name(name).map_err(invalid)?;
        cadence.check().map_err(invalid)?;
        Limits::CEILING.check_spec(spec, now_ms).map_err(|err| invalid(err.0))?;
        if spec.schedule != Schedule::Now {
            return Err(invalid(
                "a periodic task's spec runs when it fires; it takes no delay or run-at time"
                    .into(),
            ));
        }
        if spec.idempotency_key.is_some() {
            return Err(invalid(
                "a periodic task's spec takes no idempotency key; each fire gets its own".into(),
            ));
        }
        let next_fire_ms = cadence.next_after(now_ms, now_ms);
        let previous = self.periodics.get(name).cloned();
        if previous.is_none() {
            let periodic_tasks_max = periodic_tasks_max.min(Limits::CEILING.periodic_tasks_max);
            if self.periodics.len() as u64 >= periodic_tasks_max {
                return Err(Rejection::new(
                    RejectionKind::ResourceExhausted,
                    format!(
                        "there are {} periodic tasks, the limit is {periodic_tasks_max}",
                        self.periodics.len()
                    ),
                ));
            }
        }
        let name: Arc<str> = name.into();
        let mut periodic = Periodic {
            name: name.to_string(),
            cadence: cadence.clone(),
            overlap,
            spec: spec.clone(),
            anchor_ms: now_ms,
            next_fire_ms,
            last_task: None,
            last_fire_ms: None,
            fired_total: 0,
            skipped_total: 0,
        };
        if let Some(previous) = previous {
            self.periodic_index_remove(&previous);
            periodic.last_task = previous.last_task;
            periodic.last_fire_ms = previous.last_fire_ms;
            periodic.fired_total = previous.fired_total;
            periodic.skipped_total = previous.skipped_total;
        }
        self.interner.intern_spec(&mut periodic.spec);
        let periodic = Arc::new(periodic);
        if let Some(fire_ms) = periodic.next_fire_ms {
            self.periodic_by_next_fire.insert((fire_ms, name.clone()));
        }
        self.periodics.insert(name, periodic.clone());
        Ok(periodic)
    }

    fn set_queue_limit(&mut self, queue: &str, running_max: Option<u32>) -> Result<(), Rejection> {
        check_queue_name(queue)
            .map_err(|message| Rejection::new(RejectionKind::InvalidArgument, message))?;
        match running_max {
            Some(running_max) => {
                let n_limits = self.running_max_by_queue.len() as u64;
                let ceiling = Limits::CEILING.queue_limits_max;
                if n_limits >= ceiling && !self.running_max_by_queue.contains_key(queue) {
                    return Err(Rejection::new(
                        RejectionKind::ResourceExhausted,
                        format!("{n_limits} queues have limits, the most there may be"),
                    ));
                }
                self.running_max_by_queue.insert(queue.into(), running_max);
            }
            None => {
                self.running_max_by_queue.remove(queue);
            }
        }
        Ok(())
    }

    fn delete_periodic(&mut self, name: &str) -> Result<Arc<Periodic>, Rejection> {
        let Some(periodic) = self.periodics.remove(name) else {
            return Err(Rejection::new(
                RejectionKind::NotFound,
                format!("periodic task {name} does not exist"),
            ));
        };
        self.periodic_index_remove(&periodic);
        Ok(periodic)
    }

    fn periodic_index_remove(&mut self, periodic: &Periodic) {
        if let Some(fire_ms) = periodic.next_fire_ms {
            let removed =
                self.periodic_by_next_fire.remove(&(fire_ms, periodic.name.as_str().into()));
            assert!(removed, "periodic task {} missing from the fire index", periodic.name);
        }
    }

    /// Fires what is due: each creates a task, unless its last task is
    /// still going and it forbids overlap, or the queue is full, and then
    /// moves on to its first fire time after `now_ms`. A periodic task that
    /// missed several fire times (the cluster had no leader, say) fires
    /// once for them.
    fn fire_periodic(
        &mut self,
        revision: u64,
        now_ms: u64,
        queued_tasks_max: u64,
        changed: &mut Vec<TaskId>,
    ) -> Vec<TaskId> {
        let queued_tasks_max = queued_tasks_max.min(Limits::CEILING.queued_tasks_max);
        let due: Vec<(u64, Arc<str>)> = self
            .periodic_by_next_fire
            .iter()
            .take_while(|(fire_ms, _)| *fire_ms <= now_ms)
            .take(FIRES_PER_ENTRY_MAX)
            .cloned()
            .collect();
        let mut fired = Vec::new();
        for entry in due {
            let (fire_ms, name) = &entry;
            self.periodic_by_next_fire.remove(&entry);
            let mut periodic =
                self.periodics.remove(name).expect("a periodic task in the fire index exists");
            let last_going = periodic
                .last_task
                .and_then(|id| self.tasks.get(&id))
                .is_some_and(|task| !task.state.is_terminal());
            let periodic_mut = Arc::make_mut(&mut periodic);
            let key = periodic_mut.fire_key(*fire_ms);
            let skip = (periodic_mut.overlap == Overlap::Forbid && last_going)
                || self.n_tasks_queued >= queued_tasks_max
                || self.task_by_idempotency_key.contains_key(key.as_str());
            if skip {
                periodic_mut.skipped_total += 1;
            } else {
                let mut spec = periodic_mut.spec.clone();
                spec.idempotency_key = Some(key.into_boxed_str());
                let task = self.insert_task(revision, now_ms, spec, TaskIds::default(), changed);
                periodic_mut.last_task = Some(task.id);
                periodic_mut.fired_total += 1;
                fired.push(task.id);
            }
            periodic_mut.last_fire_ms = Some(*fire_ms);
            periodic_mut.next_fire_ms =
                periodic_mut.cadence.next_after(periodic_mut.anchor_ms, now_ms.max(*fire_ms));
            if let Some(next_ms) = periodic_mut.next_fire_ms {
                self.periodic_by_next_fire.insert((next_ms, name.clone()));
            }
            self.periodics.insert(name.clone(), periodic);
        }
        fired
    }

    fn cancel(
        &mut self,
        revision: u64,
        now_ms: u64,
        id: TaskId,
        changed: &mut Vec<TaskId>,
    ) -> Result<Arc<Task>, Rejection> {
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
        self.transition(id, TaskState::Cancelled, revision, now_ms);
        changed.push(id);
        Ok(self.tasks[&id].clone())
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

    /// Changes a task through `change`, keeping the indexes in step and
    /// stamping the revision and the time.
    fn update<R>(
        &mut self,
        id: TaskId,
        revision: u64,
        now_ms: u64,
        change: impl FnOnce(&mut Task) -> R,
    ) -> R {
        let mut task = self.tasks.remove(&id).expect("update of a task that exists");
        self.index_remove(&task);
        // Copies the task only if something else still holds it: a frozen
        // state, an event, an answer.
        let was_terminal = task.state.is_terminal();
        let task_mut = Arc::make_mut(&mut task);
        let result = change(task_mut);
        task_mut.revision = revision;
        task_mut.updated_at_ms = task_mut.updated_at_ms.max(now_ms);
        if !was_terminal && task.state.is_terminal() && self.waiting_by_dependency.contains_key(&id)
        {
            self.ended_awaited.push(id);
        }
        self.index_insert(&task);
        self.tasks.insert(id, task);
        result
    }

    /// Moves a task that has not finished to a new state.
    fn transition(&mut self, id: TaskId, to: TaskState, revision: u64, now_ms: u64) -> &Task {
        self.update(id, revision, now_ms, |task| {
            assert!(!task.state.is_terminal(), "task {id} leaves terminal state {}", task.state);
            task.state = to;
        });
        &self.tasks[&id]
    }

    fn assign(
        &mut self,
        revision: u64,
        now_ms: u64,
        assignments: &[Assignment],
        changed: &mut Vec<TaskId>,
    ) -> Response {
        let mut assigned = Vec::new();
        let mut skipped = Vec::new();
        for assignment in assignments {
            let Some(task) =
                self.tasks.get(&assignment.task).filter(|task| task.state == TaskState::Ready)
            else {
                skipped.push(assignment.task);
                continue;
            };
            // A queue at its limit takes no more, whoever planned it: a
            // plan made before another entry filled the queue is cut here.
            let queue = &*task.spec.queue;
            let queue_full = self
                .queue_running_max(queue)
                .is_some_and(|running_max| self.n_active_in_queue(queue) >= u64::from(running_max));
            if queue_full || self.is_draining(assignment.node) {
                skipped.push(assignment.task);
                continue;
            }
            self.update(assignment.task, revision, now_ms, |task| {
                // Only the current attempt keeps its output; older ones keep their outcome.
                for older in &mut task.attempts {
                    older.stdout_tail.clear();
                    older.stderr_tail.clear();
                }
                task.attempts.push(Attempt {
                    number: task.attempts.len() as u32 + 1,
                    node_id: assignment.node,
                    fencing_token: revision,
                    assigned_at_ms: now_ms,
                    started_at_ms: None,
                    ended_at_ms: None,
                    outcome: None,
                    stdout_tail: String::new(),
                    stderr_tail: String::new(),
                });
                task.state = TaskState::Assigned;
            });
            changed.push(assignment.task);
            assigned.push((*assignment, revision));
        }
        Response::Assigned { assigned, skipped }
    }

    /// Places ready tasks on the executors of `placement`, as the leader's
    /// scheduling loop would (see [`Command::SubmitAndPlace`]). Ties between
    /// equally loaded executors rotate with `rotation`, the first submitted
    /// task's id: every replica breaks them alike, and successive
    /// submissions to an idle cluster take turns over its nodes. (The log
    /// index would not do: each task adds the same number of report entries
    /// between submissions, so it can step by a multiple of the node count.)
    fn place(
        &mut self,
        revision: u64,
        now_ms: u64,
        placement: &Placement,
        rotation: u64,
        changed: &mut Vec<TaskId>,
    ) {
        let mut nodes: Vec<NodeId> =
            placement.executors.iter().map(|executor| executor.node_id).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let Some(n_nodes) = u64::try_from(nodes.len()).ok().filter(|n| *n > 0) else {
            return;
        };
        let mut cursor = PlacementCursor {
            last_first_queue: placement.last_first_queue.clone(),
            last_tie_node: Some(nodes[(rotation % n_nodes) as usize]),
        };
        let assignments_max = placement.assignments_max as usize;
        let assignments = plan(self, &placement.executors, assignments_max, &mut cursor);
        if assignments.is_empty() {
            return;
        }
        let mut placed = Vec::new();
        self.assign(revision, now_ms, &assignments, &mut placed);
        let already: BTreeSet<TaskId> = changed.iter().copied().collect();
        changed.extend(placed.into_iter().filter(|id| !already.contains(id)));
    }

    /// The submitted tasks as the state holds them now.
    fn as_they_are_now(&self, submitted: Vec<Submitted>) -> Vec<Submitted> {
        submitted
            .into_iter()
            .map(|answer| Submitted {
                task: self.tasks.get(&answer.task.id).cloned().unwrap_or(answer.task),
                already_existed: answer.already_existed,
            })
            .collect()
    }

    /// Checks that `token` names the task's current, unfinished attempt.
    fn current_attempt(&self, id: TaskId, token: u64) -> Result<&Task, Rejection> {
        let Some(task) = self.tasks.get(&id) else {
            return Err(Rejection::new(
                RejectionKind::NotFound,
                format!("task {id} does not exist"),
            ));
        };
        match task.attempts.last() {
            Some(current) if current.fencing_token == token => Ok(task),
            Some(current) => Err(Rejection::new(
                RejectionKind::Stale,
                format!(
                    "attempt with token {token} of task {id} is stale; the current token is {}",
                    current.fencing_token
                ),
            )),
            None => Err(Rejection::new(
                RejectionKind::Stale,
                format!("task {id} has no attempt with token {token}"),
            )),
        }
    }

    /// Applies one executor report.
    fn report(
        &mut self,
        revision: u64,
        command: &Command,
        changed: &mut Vec<TaskId>,
    ) -> Result<Response, Rejection> {
        let task = match command {
            Command::StartAttempt { now_ms, task, token } => {
                self.start_attempt(revision, *now_ms, *task, *token, changed)
            }
            Command::CompleteAttempt { now_ms, task, token, report } => {
                self.complete_attempt(revision, *now_ms, *task, *token, report, changed)
            }
            other => Err(Rejection::new(
                RejectionKind::InvalidArgument,
                format!("{other} is not an executor report"),
            )),
        };
        task.map(Response::Attempt)
    }

    /// Applies one report of a batch: its refusal is its own answer, and
    /// changes nothing.
    fn report_in_batch(
        &mut self,
        revision: u64,
        command: &Command,
        changed: &mut Vec<TaskId>,
    ) -> Response {
        let mut changed_here = Vec::new();
        match self.report(revision, command, &mut changed_here) {
            Ok(response) => {
                for id in changed_here {
                    if !changed.contains(&id) {
                        changed.push(id);
                    }
                }
                response
            }
            Err(rejection) => {
                assert!(changed_here.is_empty(), "a rejected report changed tasks");
                Response::Rejected(rejection)
            }
        }
    }

    fn start_attempt(
        &mut self,
        revision: u64,
        now_ms: u64,
        id: TaskId,
        token: u64,
        changed: &mut Vec<TaskId>,
    ) -> Result<Recorded, Rejection> {
        let task = self.current_attempt(id, token)?;
        match task.state {
            // A repeated start (the executor retried) changes nothing.
            TaskState::Running => Ok(Recorded { task: id, state: task.state }),
            TaskState::Assigned => {
                self.update(id, revision, now_ms, |task| {
                    task.state = TaskState::Running;
                    let current =
                        task.attempts.last_mut().expect("an assigned task has an attempt");
                    current.started_at_ms = Some(now_ms);
                });
                changed.push(id);
                Ok(Recorded { task: id, state: self.tasks[&id].state })
            }
            TaskState::Cancelled => Err(Rejection::new(
                RejectionKind::Stale,
                format!("task {id} was cancelled; attempt {token} must not start"),
            )),
            other => Err(Rejection::new(
                RejectionKind::Stale,
                format!("task {id} is {other}; attempt {token} must not start"),
            )),
        }
    }

    fn complete_attempt(
        &mut self,
        revision: u64,
        now_ms: u64,
        id: TaskId,
        token: u64,
        report: &AttemptReport,
        changed: &mut Vec<TaskId>,
    ) -> Result<Recorded, Rejection> {
        for (name, tail) in [("stdout", &report.stdout_tail), ("stderr", &report.stderr_tail)] {
            if tail.len() > OUTPUT_TAIL_BYTES_CEILING {
                return Err(Rejection::new(
                    RejectionKind::InvalidArgument,
                    format!(
                        "the {name} tail holds {} bytes, more than {OUTPUT_TAIL_BYTES_CEILING}",
                        tail.len()
                    ),
                ));
            }
        }
        let task = self.current_attempt(id, token)?;
        let current = task.attempts.last().expect("current_attempt found one");
        if current.outcome.is_some() {
            // A repeated completion (the executor retried) changes nothing.
            return Ok(Recorded { task: id, state: task.state });
        }
        let state = task.state;
        if !matches!(state, TaskState::Assigned | TaskState::Running | TaskState::Cancelled) {
            return Err(Rejection::new(
                RejectionKind::Stale,
                format!("task {id} is {state}; attempt {token} is over"),
            ));
        }
        self.update(id, revision, now_ms, |task| {
            let current = task.attempts.last_mut().expect("checked above");
            current.started_at_ms = current.started_at_ms.or(report.started_at_ms);
            current.ended_at_ms = Some(report.ended_at_ms);
            current.outcome = Some(report.outcome.clone());
            current.stdout_tail = report.stdout_tail.clone();
            current.stderr_tail = report.stderr_tail.clone();
            if state == TaskState::Cancelled {
                return;
            }
            if report.outcome == (Outcome::Exited { code: 0 }) {
                task.state = TaskState::Succeeded;
            } else {
                retry_or_fail(task, now_ms);
            }
        });
        changed.push(id);
        Ok(Recorded { task: id, state: self.tasks[&id].state })
    }

    fn requeue_lost(
        &mut self,
        revision: u64,
        now_ms: u64,
        lost: &[LostAttempt],
        changed: &mut Vec<TaskId>,
    ) -> Vec<TaskId> {
        let mut requeued = Vec::new();
        for &LostAttempt { task: id, token, revision: judged_at } in lost {
            let still_current = self.current_attempt(id, token).is_ok_and(|task| {
                task.revision == judged_at
                    && matches!(task.state, TaskState::Assigned | TaskState::Running)
                    && task.attempts.last().is_some_and(|current| current.outcome.is_none())
            });
            if !still_current || changed.contains(&id) {
                continue;
            }
            self.update(id, revision, now_ms, |task| {
                let current = task.attempts.last_mut().expect("checked above");
                current.ended_at_ms = Some(now_ms);
                current.outcome = Some(Outcome::Lost);
                retry_or_fail(task, now_ms);
            });
            changed.push(id);
            requeued.push(id);
        }
        requeued
    }

    fn purge_finished(
        &mut self,
        now_ms: u64,
        retention_ms: u64,
        tasks_max: u32,
        changed: &mut Vec<TaskId>,
    ) -> Vec<TaskId> {
        let cutoff_ms = now_ms.saturating_sub(retention_ms);
        let expired: Vec<TaskId> = self
            .finished_by_time
            .iter()
            .take_while(|(finished_at_ms, _)| *finished_at_ms <= cutoff_ms)
            .take(tasks_max as usize)
            .map(|(_, id)| *id)
            .collect();
        for id in &expired {
            let task = self.tasks.remove(id).expect("indexed task exists");
            self.index_remove(&task);
            if let Some(key) = &task.spec.idempotency_key
                && self.task_by_idempotency_key.get(key) == Some(id)
            {
                self.task_by_idempotency_key.remove(key);
            }
            changed.push(*id);
        }
        expired
    }

    fn index_insert(&mut self, task: &Task) {
        match task.state {
            TaskState::Waiting => {
                let awaited: Vec<TaskId> = self.unsucceeded(&task.after).collect();
                assert!(!awaited.is_empty(), "task {} waits for nothing", task.id);
                for dependency in awaited {
                    self.waiting_by_dependency.entry(dependency).or_default().insert(task.id);
                }
            }
            TaskState::Pending => {
                self.pending_by_run_at.insert((task.run_at_ms, task.id));
            }
            TaskState::Ready => {
                let key = (Reverse(task.spec.priority), task.run_at_ms, task.id);
                self.ready_by_queue.entry(task.spec.queue.clone()).or_default().insert(key);
            }
            TaskState::Assigned | TaskState::Running => {
                let node = task.attempts.last().expect("an active task has an attempt").node_id;
                self.active_by_node.entry(node).or_default().insert(task.id);
                *self.n_active_by_queue.entry(task.spec.queue.clone()).or_default() += 1;
            }
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled => {
                self.finished_by_time.insert((task.updated_at_ms, task.id));
            }
        }
        if !task.state.is_terminal() {
            self.n_tasks_queued += 1;
        }
        self.n_tasks_by_state[task.state as usize] += 1;
        if let Some(key) = &task.spec.idempotency_key {
            self.task_by_idempotency_key.insert(key.clone(), task.id);
        }
    }

    fn index_remove(&mut self, task: &Task) {
        match task.state {
            TaskState::Waiting => {
                for dependency in task.after.iter() {
                    if let Some(waiting) = self.waiting_by_dependency.get_mut(dependency) {
                        waiting.remove(&task.id);
                        if waiting.is_empty() {
                            self.waiting_by_dependency.remove(dependency);
                        }
                    }
                }
            }
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
            TaskState::Assigned | TaskState::Running => {
                let node = task.attempts.last().expect("an active task has an attempt").node_id;
                let active = self.active_by_node.get_mut(&node).expect("active node exists");
                assert!(active.remove(&task.id), "active index out of step");
                if active.is_empty() {
                    self.active_by_node.remove(&node);
                }
                let in_queue = self
                    .n_active_by_queue
                    .get_mut(&task.spec.queue)
                    .expect("active queue count out of step");
                *in_queue -= 1;
                if *in_queue == 0 {
                    self.n_active_by_queue.remove(&task.spec.queue);
                }
            }
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled => {
                assert!(
                    self.finished_by_time.remove(&(task.updated_at_ms, task.id)),
                    "finished index out of step"
                );
            }
        }
        if !task.state.is_terminal() {
            self.n_tasks_queued -= 1;
        }
        let n_in_state = &mut self.n_tasks_by_state[task.state as usize];
        *n_in_state = n_in_state.checked_sub(1).expect("state count out of step");
    }

    /// Recomputes every index from the tasks and compares. For tests and
    /// for checking a state loaded from disk.
    pub fn check_invariants(&self) -> Result<(), String> {
        let rebuilt = State::from_parts(self.meta.clone(), self.tasks().cloned())?;
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
        if rebuilt.n_tasks_by_state != self.n_tasks_by_state {
            return Err(format!(
                "counts by state {:?} but tasks say {:?}",
                self.n_tasks_by_state, rebuilt.n_tasks_by_state
            ));
        }
        if rebuilt.task_by_idempotency_key != self.task_by_idempotency_key {
            return Err("idempotency index differs from the tasks".into());
        }
        if rebuilt.active_by_node != self.active_by_node {
            return Err("active index differs from the tasks".into());
        }
        if rebuilt.n_active_by_queue != self.n_active_by_queue {
            return Err("active counts by queue differ from the tasks".into());
        }
        if rebuilt.finished_by_time != self.finished_by_time {
            return Err("finished index differs from the tasks".into());
        }
        if rebuilt.waiting_by_dependency != self.waiting_by_dependency {
            return Err("waiting index differs from the tasks".into());
        }
        let rebuilt = rebuilt.with_periodics(self.periodics().cloned())?;
        if rebuilt.periodic_by_next_fire != self.periodic_by_next_fire {
            return Err("periodic fire index differs from the periodic tasks".into());
        }
        Ok(())
    }
}

/// Checks a queue name as a spec's is checked, against the ceiling.
fn check_queue_name(queue: &str) -> Result<(), String> {
    Limits::CEILING.check_queue(queue).map_err(|err| err.0)
}

/// After a failed or lost attempt: another attempt after the backoff delay
/// while attempts remain, else FAILED.
fn retry_or_fail(task: &mut Task, now_ms: u64) {
    let n_attempts = task.attempts.len() as u32;
    if n_attempts >= task.spec.max_attempts {
        task.state = TaskState::Failed;
        return;
    }
    task.run_at_ms = now_ms.saturating_add(retry_delay_ms(&task.spec.backoff, task.id, n_attempts));
    task.state = if task.run_at_ms > now_ms { TaskState::Pending } else { TaskState::Ready };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_are_shared_and_the_shared_set_stays_bounded() {
        let mut interner = Interner::default();
        let mut first: Arc<str> = "sh".into();
        let mut second: Arc<str> = "sh".into();
        interner.intern(&mut first);
        interner.intern(&mut second);
        assert!(Arc::ptr_eq(&first, &second), "one copy of a string many tasks hold");
        // Fill the set with strings no task holds any more.
        for idx in 0..2 * INTERNED_STRINGS_MAX {
            let mut fresh: Arc<str> = format!("program-{idx}").into();
            interner.intern(&mut fresh);
            assert!(interner.strings.len() <= INTERNED_STRINGS_MAX);
        }
        // A sweep has let the unheld ones go; the held one stays shared.
        assert!(interner.strings.len() < INTERNED_STRINGS_MAX, "{}", interner.strings.len());
        let mut third: Arc<str> = "sh".into();
        interner.intern(&mut third);
        assert!(Arc::ptr_eq(&first, &third));
    }
}
