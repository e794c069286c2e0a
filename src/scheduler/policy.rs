//! Where ready tasks go: the leader's placement policy, as a pure function of
//! the state, the executors' capacities and a round-robin cursor.
//!
//! - Queues take turns, one task each per turn, starting after the queue that
//!   went first last time, so a busy queue cannot starve another.
//! - Within a queue, tasks go in run order: priority, run-at time, submission.
//!   A task no free executor can run (labels, or every match is full) is
//!   passed over, without blocking the tasks behind it.
//! - A task goes to the least loaded executor (active attempts per slot) whose
//!   labels include the task's; ties go round-robin by node id.
//! - An executor takes as many attempts as it has slots, plus its prefetch:
//!   attempts it queues to start the moment a slot frees. Because the least
//!   loaded executor goes first, attempts queue only once every executor
//!   that can run them has its slots full.
//! - Draining nodes and full nodes get nothing, and neither does a queue
//!   whose tasks ASSIGNED or RUNNING have reached its limit.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::scheduler::command::Assignment;
use crate::scheduler::state::State;
use crate::scheduler::task::{NodeId, Task};

/// What the leader knows of one executor, from its heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorCapacity {
    pub node_id: NodeId,
    pub slots: u32,
    /// Attempts it takes beyond its slots, queued until a slot frees.
    pub prefetch: u32,
    pub labels: BTreeMap<String, String>,
}

/// Where the round-robin turns of the last plan stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementCursor {
    /// The queue that went first last time; the next plan starts after it.
    pub last_first_queue: Option<String>,
    /// The node that won the last tie; the next tie goes to a node after it.
    pub last_tie_node: Option<NodeId>,
}

struct Candidate<'a> {
    capacity: &'a ExecutorCapacity,
    n_active: u32,
}

impl Candidate<'_> {
    fn has_room(&self) -> bool {
        self.n_active < self.capacity.slots.saturating_add(self.capacity.prefetch)
    }

    fn can_run(&self, task: &Task) -> bool {
        task.spec.labels.iter().all(|(key, value)| self.capacity.labels.get(key) == Some(value))
    }

    /// Compares loads `n_active / slots` without division.
    fn load_cmp(&self, other: &Candidate<'_>) -> Ordering {
        (u64::from(self.n_active) * u64::from(other.capacity.slots))
            .cmp(&(u64::from(other.n_active) * u64::from(self.capacity.slots)))
    }
}

/// Plans at most `assignments_max` assignments of ready tasks.
pub fn plan(
    state: &State,
    executors: &[ExecutorCapacity],
    assignments_max: usize,
    cursor: &mut PlacementCursor,
) -> Vec<Assignment> {
    let mut candidates: Vec<Candidate<'_>> = executors
        .iter()
        .filter(|capacity| capacity.slots > 0 && !state.is_draining(capacity.node_id))
        .map(|capacity| Candidate {
            capacity,
            n_active: state.n_active_on(capacity.node_id) as u32,
        })
        .collect();
    candidates.sort_by_key(|candidate| candidate.capacity.node_id);

    // Queues in turn order: those after the last first queue, then the rest.
    let mut queues: Vec<&str> = state.ready_queues().collect();
    if let Some(last) = &cursor.last_first_queue {
        let split = queues.partition_point(|queue| *queue <= last.as_str());
        queues.rotate_left(split);
    }
    // Each queue with its room under its limit, if it has one.
    type Turns<'a> = Vec<(&'a str, Option<u64>, Box<dyn Iterator<Item = &'a Task> + 'a>)>;
    let mut iterators: Turns<'_> = queues
        .iter()
        .map(|queue| {
            let room = state.queue_running_max(queue).map(|running_max| {
                u64::from(running_max).saturating_sub(state.n_active_in_queue(queue))
            });
            let tasks = Box::new(state.ready_in_queue(queue)) as Box<dyn Iterator<Item = &Task>>;
            (*queue, room, tasks)
        })
        .collect();
    if let Some((first, _, _)) = iterators.first() {
        cursor.last_first_queue = Some(first.to_string());
    }

    let mut assignments = Vec::new();
    while assignments.len() < assignments_max && !iterators.is_empty() {
        if !candidates.iter().any(Candidate::has_room) {
            break;
        }
        // One turn: each queue places at most one task.
        let mut exhausted = Vec::new();
        for (queue_idx, (_, room, tasks)) in iterators.iter_mut().enumerate() {
            if assignments.len() == assignments_max {
                break;
            }
            if *room == Some(0) {
                exhausted.push(queue_idx);
                continue;
            }
            let placed = tasks.find_map(|task| {
                pick(&candidates, task, cursor.last_tie_node)
                    .map(|candidate_idx| (task, candidate_idx))
            });
            match placed {
                Some((task, candidate_idx)) => {
                    let candidate = &mut candidates[candidate_idx];
                    candidate.n_active += 1;
                    if let Some(room) = room {
                        *room -= 1;
                    }
                    cursor.last_tie_node = Some(candidate.capacity.node_id);
                    assignments
                        .push(Assignment { task: task.id, node: candidate.capacity.node_id });
                }
                None => exhausted.push(queue_idx),
            }
        }
        for queue_idx in exhausted.into_iter().rev() {
            drop(iterators.remove(queue_idx));
        }
    }
    assignments
}

/// The least loaded candidate with room that can run `task`; among equals,
/// the first node after `last_tie_node` in id order.
fn pick(candidates: &[Candidate<'_>], task: &Task, last_tie_node: Option<NodeId>) -> Option<usize> {
    let eligible = candidates
        .iter()
        .enumerate()
        .filter(|(_, candidate)| candidate.has_room() && candidate.can_run(task));
    let least = eligible.clone().map(|(_, candidate)| candidate).min_by(|a, b| a.load_cmp(b))?;
    let tied: Vec<(usize, NodeId)> = eligible
        .filter(|(_, candidate)| candidate.load_cmp(least) == Ordering::Equal)
        .map(|(idx, candidate)| (idx, candidate.capacity.node_id))
        .collect();
    let after_last = last_tie_node.and_then(|last| tied.iter().find(|(_, node)| *node > last));
    after_last.or(tied.first()).map(|(idx, _)| *idx)
}
