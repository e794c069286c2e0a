//! Unit tests of scheduling: placement and fairness ([`policy`]), the attempt
//! lifecycle with fencing tokens, retries with backoff, lease expiry and
//! re-queueing ([`lease`]), draining and retention.
//!
//! [`policy`]: crate::scheduler::policy
//! [`lease`]: crate::scheduler::lease

use std::collections::{BTreeMap, BTreeSet};

use crate::scheduler::command::Placement;
use crate::scheduler::lease::LeaseTable;
use crate::scheduler::policy::{ExecutorCapacity, PlacementCursor, plan};
use crate::scheduler::{
    Assignment, AttemptReport, Awaited, Backoff, Command, LostAttempt, Outcome, RejectionKind,
    Response, Schedule, State, Task, TaskId, TaskSpec, TaskState,
};

const NOW_MS: u64 = 1_700_000_000_000;

struct Cluster {
    state: State,
    revision: u64,
    cursor: PlacementCursor,
    executors: Vec<ExecutorCapacity>,
}

fn executor(node_id: u64, slots: u32, labels: &[(&str, &str)]) -> ExecutorCapacity {
    ExecutorCapacity {
        node_id,
        slots,
        prefetch: 0,
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

impl Cluster {
    fn new(executors: Vec<ExecutorCapacity>) -> Cluster {
        Cluster {
            state: State::default(),
            revision: 0,
            cursor: PlacementCursor::default(),
            executors,
        }
    }

    fn apply(&mut self, command: Command) -> Response {
        self.revision += 1;
        let applied = self.state.apply(self.revision, &command);
        self.state.check_invariants().expect("indexes match the tasks after every command");
        applied.response
    }

    fn submit(&mut self, spec: TaskSpec) -> TaskId {
        let command =
            Command::SubmitTasks { now_ms: NOW_MS, queued_tasks_max: 1_000, specs: vec![spec] };
        match self.apply(command) {
            Response::Submitted(results) => results[0].task.id,
            other => panic!("{other:?}"),
        }
    }

    fn task(&self, id: TaskId) -> &Task {
        self.state.task(id).unwrap()
    }

    /// The leader's judgement that attempt `token` of `id` is lost, made
    /// from the task as it is now.
    fn lost(&self, id: TaskId, token: u64) -> LostAttempt {
        LostAttempt { task: id, token, revision: self.task(id).revision }
    }

    /// Plans and commits one round of assignments; returns them with tokens.
    fn schedule(&mut self, assignments_max: usize) -> Vec<(Assignment, u64)> {
        let assignments = plan(&self.state, &self.executors, assignments_max, &mut self.cursor);
        if assignments.is_empty() {
            return vec![];
        }
        match self.apply(Command::Assign { now_ms: NOW_MS, assignments }) {
            Response::Assigned { assigned, skipped } => {
                assert!(skipped.is_empty(), "a fresh plan skips nothing: {skipped:?}");
                assigned
            }
            other => panic!("{other:?}"),
        }
    }

    fn complete(&mut self, id: TaskId, token: u64, outcome: Outcome, now_ms: u64) -> Response {
        let report = AttemptReport {
            started_at_ms: Some(now_ms - 1),
            ended_at_ms: now_ms,
            outcome,
            stdout_tail: "out".into(),
            stderr_tail: String::new(),
        };
        self.apply(Command::CompleteAttempt { now_ms, task: id, token, report })
    }
}

fn spec_in(queue: &str, priority: i32) -> TaskSpec {
    TaskSpec { queue: queue.into(), priority, ..TaskSpec::for_test("true") }
}

fn rejection_kind(response: Response) -> RejectionKind {
    match response {
        Response::Rejected(rejection) => rejection.kind,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn placement_follows_priority_then_run_at_then_submission() {
    let mut cluster = Cluster::new(vec![executor(1, 1, &[])]);
    let low = cluster.submit(spec_in("q", 0));
    let high = cluster.submit(spec_in("q", 9));
    let early =
        cluster.submit(TaskSpec { schedule: Schedule::AtUnixMs(NOW_MS - 5), ..spec_in("q", 0) });
    let mut order = Vec::new();
    for _ in 0..3 {
        let assigned = cluster.schedule(10);
        assert_eq!(assigned.len(), 1, "one slot, one assignment at a time");
        let (assignment, token) = assigned[0];
        order.push(assignment.task);
        cluster.complete(assignment.task, token, Outcome::Exited { code: 0 }, NOW_MS + 1);
    }
    assert_eq!(order, vec![high, early, low]);
}

#[test]
fn queues_take_turns_so_a_busy_queue_cannot_starve_another() {
    let mut cluster = Cluster::new(vec![executor(1, 4, &[])]);
    for _ in 0..20 {
        cluster.submit(spec_in("busy", 100));
    }
    let quiet = [cluster.submit(spec_in("quiet", 0)), cluster.submit(spec_in("quiet", 0))];
    let assigned = cluster.schedule(4);
    let tasks: BTreeSet<TaskId> = assigned.iter().map(|(assignment, _)| assignment.task).collect();
    assert_eq!(assigned.len(), 4);
    assert!(quiet.iter().all(|id| tasks.contains(id)), "both quiet tasks are among {tasks:?}");
}

#[test]
fn the_first_queue_rotates_between_plans() {
    let mut cluster = Cluster::new(vec![executor(1, 1, &[])]);
    for queue in ["a", "b", "c"] {
        cluster.submit(spec_in(queue, 0));
        cluster.submit(spec_in(queue, 0));
    }
    let mut firsts = Vec::new();
    for _ in 0..3 {
        let (assignment, token) = cluster.schedule(1)[0];
        firsts.push(cluster.task(assignment.task).spec.queue.clone());
        cluster.complete(assignment.task, token, Outcome::Exited { code: 0 }, NOW_MS);
    }
    assert_eq!(firsts, vec!["a".into(), "b".into(), "c".into()] as Vec<std::sync::Arc<str>>);
}

#[test]
fn tasks_go_to_the_least_loaded_node_with_ties_round_robin() {
    let mut cluster =
        Cluster::new(vec![executor(1, 2, &[]), executor(2, 2, &[]), executor(3, 4, &[])]);
    for _ in 0..8 {
        cluster.submit(spec_in("q", 0));
    }
    let assigned = cluster.schedule(8);
    let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
    for (assignment, _) in &assigned {
        *per_node.entry(assignment.node).or_default() += 1;
    }
    // Eight tasks fill eight slots: 2 + 2 + 4, each node equally loaded at every step.
    assert_eq!(per_node, BTreeMap::from([(1, 2), (2, 2), (3, 4)]));
    let first_three: Vec<u64> =
        assigned.iter().take(3).map(|(assignment, _)| assignment.node).collect();
    assert_eq!(first_three, vec![1, 2, 3], "equal loads go round-robin");
    assert!(cluster.schedule(8).is_empty(), "full nodes get nothing");
}

#[test]
fn prefetch_queues_attempts_only_once_every_slot_is_full() {
    let prefetching =
        |node_id, slots, prefetch| ExecutorCapacity { prefetch, ..executor(node_id, slots, &[]) };
    let mut cluster = Cluster::new(vec![prefetching(1, 2, 2), prefetching(2, 2, 2)]);
    for _ in 0..10 {
        cluster.submit(spec_in("q", 0));
    }
    let nodes_in_order: Vec<u64> =
        cluster.schedule(10).iter().map(|(assignment, _)| assignment.node).collect();
    // Four slots fill first, two to a node; then each node queues two more.
    assert_eq!(nodes_in_order, vec![1, 2, 1, 2, 1, 2, 1, 2]);
    assert!(cluster.schedule(10).is_empty(), "slots and prefetch full: nothing more");
}

#[test]
fn labels_restrict_placement_without_blocking_other_tasks() {
    let mut cluster =
        Cluster::new(vec![executor(1, 2, &[("zone", "eu")]), executor(2, 2, &[("zone", "us")])]);
    let gpu = cluster.submit(TaskSpec {
        labels: BTreeMap::from([("gpu".into(), "yes".into())]).into(),
        ..spec_in("q", 10)
    });
    let eu = cluster.submit(TaskSpec {
        labels: BTreeMap::from([("zone".into(), "eu".into())]).into(),
        ..spec_in("q", 5)
    });
    let any = cluster.submit(spec_in("q", 0));
    let assigned = cluster.schedule(10);
    let placed: BTreeMap<TaskId, u64> =
        assigned.iter().map(|(assignment, _)| (assignment.task, assignment.node)).collect();
    assert_eq!(placed.get(&eu), Some(&1));
    assert!(placed.contains_key(&any));
    assert!(!placed.contains_key(&gpu), "no node has the gpu label");
    assert_eq!(cluster.task(gpu).state, TaskState::Ready);
}

#[test]
fn draining_nodes_get_no_new_assignments() {
    let mut cluster = Cluster::new(vec![executor(1, 4, &[]), executor(2, 4, &[])]);
    cluster.apply(Command::SetDraining { node: 1, draining: true });
    for _ in 0..3 {
        cluster.submit(spec_in("q", 0));
    }
    assert!(cluster.schedule(10).iter().all(|(assignment, _)| assignment.node == 2));
    // An assignment to a draining node that slipped through is skipped by apply.
    let late = cluster.submit(spec_in("q", 0));
    let response = cluster.apply(Command::Assign {
        now_ms: NOW_MS,
        assignments: vec![Assignment { task: late, node: 1 }],
    });
    assert_eq!(response, Response::Assigned { assigned: vec![], skipped: vec![late] });
    cluster.apply(Command::SetDraining { node: 1, draining: false });
    assert!(cluster.schedule(10).iter().any(|(assignment, _)| assignment.node == 1));
}

fn limit(queue: &str, running_max: Option<u32>) -> Command {
    Command::SetQueueLimit { queue: queue.into(), running_max }
}

fn queue_of(cluster: &Cluster, assigned: &[(Assignment, u64)]) -> Vec<String> {
    assigned
        .iter()
        .map(|(assignment, _)| cluster.task(assignment.task).spec.queue.to_string())
        .collect()
}

/// A queue with a limit gets no more tasks ASSIGNED or RUNNING than it
/// allows, by the plan and by apply alike, while other queues use the
/// free slots; 0 pauses a queue; lifting the limit lets it go on.
#[test]
fn a_queue_limit_caps_its_active_tasks_and_leaves_the_slots_to_others() {
    let mut cluster = Cluster::new(vec![executor(1, 4, &[]), executor(2, 4, &[])]);
    cluster.apply(limit("serial", Some(2)));
    let serial: Vec<TaskId> = (0..5).map(|_| cluster.submit(spec_in("serial", 5))).collect();
    for _ in 0..3 {
        cluster.submit(spec_in("other", 0));
    }
    let assigned = cluster.schedule(100);
    let queues = queue_of(&cluster, &assigned);
    assert_eq!(queues.iter().filter(|queue| *queue == "serial").count(), 2, "{queues:?}");
    assert_eq!(queues.iter().filter(|queue| *queue == "other").count(), 3, "{queues:?}");
    assert_eq!(cluster.state.n_active_in_queue("serial"), 2);
    assert!(cluster.schedule(100).is_empty(), "serial is at its limit, slots are free");
    // An assignment beyond the limit that slipped through is skipped by apply.
    let response = cluster.apply(Command::Assign {
        now_ms: NOW_MS,
        assignments: vec![Assignment { task: serial[4], node: 1 }],
    });
    assert_eq!(response, Response::Assigned { assigned: vec![], skipped: vec![serial[4]] });
    // One finishes: one more may go.
    let (done, token) = assigned
        .iter()
        .map(|(assignment, token)| (assignment.task, *token))
        .find(|(id, _)| cluster.task(*id).spec.queue.as_ref() == "serial")
        .unwrap();
    cluster.complete(done, token, Outcome::Exited { code: 0 }, NOW_MS + 10);
    let assigned = cluster.schedule(100);
    assert_eq!(queue_of(&cluster, &assigned), ["serial"]);
    // Paused: nothing more, though tasks are ready and slots free.
    cluster.apply(limit("serial", Some(0)));
    assert_eq!(cluster.state.queue_running_max("serial"), Some(0));
    let still_ready = cluster.state.ready_in_queue("serial").count();
    assert_eq!(still_ready, 2);
    assert!(cluster.schedule(100).is_empty());
    cluster.apply(limit("serial", None));
    let assigned = cluster.schedule(100);
    assert_eq!(queue_of(&cluster, &assigned), ["serial", "serial"]);
}

#[test]
fn a_queue_limit_on_a_bad_queue_name_is_refused() {
    let mut cluster = Cluster::new(vec![]);
    for queue in ["", "a b", &"q".repeat(2_000)] {
        let kind = rejection_kind(cluster.apply(limit(queue, Some(1))));
        assert_eq!(kind, RejectionKind::InvalidArgument, "{queue:?}");
    }
    assert_eq!(cluster.state.queue_limits().len(), 0);
}

#[test]
fn an_attempt_runs_and_succeeds_with_its_token() {
    let mut cluster = Cluster::new(vec![executor(7, 1, &[])]);
    let id = cluster.submit(spec_in("q", 0));
    let (assignment, token) = cluster.schedule(1)[0];
    assert_eq!((assignment.task, assignment.node), (id, 7));
    assert_eq!(token, cluster.revision, "the token is the log index of the assignment");
    assert_eq!(cluster.task(id).state, TaskState::Assigned);
    assert_eq!(cluster.state.n_active_on(7), 1);

    let started = cluster.apply(Command::StartAttempt { now_ms: NOW_MS + 5, task: id, token });
    assert!(matches!(started, Response::Attempt(ref task) if task.state == TaskState::Running));
    // Starting twice (a retried report) is harmless.
    assert!(matches!(
        cluster.apply(Command::StartAttempt { now_ms: NOW_MS + 6, task: id, token }),
        Response::Attempt(_)
    ));
    cluster.complete(id, token, Outcome::Exited { code: 0 }, NOW_MS + 10);
    let task = cluster.task(id);
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(task.attempts.len(), 1);
    let attempt = &task.attempts[0];
    assert_eq!((attempt.node_id, attempt.fencing_token), (7, token));
    assert_eq!((attempt.started_at_ms, attempt.ended_at_ms), (Some(NOW_MS + 5), Some(NOW_MS + 10)));
    assert_eq!(cluster.state.n_active_on(7), 0);
    // A repeated completion changes nothing.
    let revision = cluster.task(id).revision;
    assert!(matches!(
        cluster.complete(id, token, Outcome::Exited { code: 1 }, NOW_MS + 20),
        Response::Attempt(_)
    ));
    assert_eq!(cluster.task(id).state, TaskState::Succeeded);
    assert_eq!(cluster.task(id).revision, revision);
}

#[test]
fn a_failed_attempt_is_retried_after_backoff_then_fails_when_attempts_run_out() {
    let mut cluster = Cluster::new(vec![executor(1, 1, &[])]);
    let backoff = Backoff { initial_ms: 1_000, max_ms: 10_000, multiplier_milli: 2_000 };
    let id = cluster.submit(TaskSpec { max_attempts: 2, backoff, ..spec_in("q", 0) });
    let (_, token) = cluster.schedule(1)[0];
    cluster.complete(id, token, Outcome::Exited { code: 3 }, NOW_MS + 100);
    let task = cluster.task(id);
    assert_eq!(task.state, TaskState::Pending);
    let delay_ms = task.run_at_ms - (NOW_MS + 100);
    assert!((500..=1_000).contains(&delay_ms), "delay {delay_ms} is within the first backoff step");
    assert!(cluster.schedule(1).is_empty(), "not before its time");

    cluster.apply(Command::PromoteDue { now_ms: NOW_MS + 100 + delay_ms });
    let (assignment, second_token) = cluster.schedule(1)[0];
    assert!(second_token > token, "tokens grow with every attempt");
    assert_eq!(assignment.task, id);
    cluster.complete(id, second_token, Outcome::TimedOut, NOW_MS + 5_000);
    let task = cluster.task(id);
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.attempts.len(), 2);
    assert_eq!(task.attempts[1].outcome, Some(Outcome::TimedOut), "the last result is kept");
    assert_eq!(task.attempts[0].outcome, Some(Outcome::Exited { code: 3 }));
    assert!(task.attempts[0].stdout_tail.is_empty(), "only the current attempt keeps its output");
    assert_eq!(task.attempts[1].stdout_tail, "out");
}

#[test]
fn reports_from_a_stale_attempt_are_refused() {
    let mut cluster = Cluster::new(vec![executor(1, 1, &[]), executor(2, 1, &[])]);
    let id = cluster.submit(TaskSpec {
        max_attempts: 3,
        backoff: Backoff { initial_ms: 0, max_ms: 0, multiplier_milli: 1_000 },
        ..spec_in("q", 0)
    });
    let (first, old_token) = cluster.schedule(1)[0];
    cluster.apply(Command::StartAttempt { now_ms: NOW_MS, task: id, token: old_token });
    // The leader finds the first executor's lease expired and requeues.
    let response = cluster.apply(Command::RequeueLost {
        now_ms: NOW_MS + 1,
        lost: vec![cluster.lost(id, old_token)],
    });
    assert_eq!(response, Response::Requeued(vec![id]));
    assert_eq!(cluster.task(id).state, TaskState::Ready, "a zero backoff makes it ready at once");
    cluster.executors.retain(|capacity| capacity.node_id != first.node);
    let (_, new_token) = cluster.schedule(1)[0];
    assert!(new_token > old_token);

    let before = cluster.task(id).clone();
    assert_eq!(
        rejection_kind(cluster.apply(Command::StartAttempt {
            now_ms: NOW_MS + 2,
            task: id,
            token: old_token
        })),
        RejectionKind::Stale
    );
    assert_eq!(
        rejection_kind(cluster.complete(id, old_token, Outcome::Exited { code: 0 }, NOW_MS + 3)),
        RejectionKind::Stale
    );
    assert_eq!(cluster.task(id), &before, "stale reports change nothing");
    // Requeueing with the old token again does nothing either.
    let lost = vec![cluster.lost(id, old_token)];
    assert_eq!(
        cluster.apply(Command::RequeueLost { now_ms: NOW_MS + 4, lost }),
        Response::Requeued(vec![])
    );
    assert_eq!(cluster.task(id), &before);

    cluster.complete(id, new_token, Outcome::Exited { code: 0 }, NOW_MS + 5);
    let task = cluster.task(id);
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(task.attempts[0].outcome, Some(Outcome::Lost));
    assert_eq!(
        rejection_kind(cluster.apply(Command::StartAttempt {
            now_ms: NOW_MS,
            task: TaskId(99),
            token: 1
        })),
        RejectionKind::NotFound
    );
}

#[test]
fn a_batch_of_reports_applies_each_on_its_own_in_order() {
    let mut cluster = Cluster::new(vec![executor(1, 2, &[])]);
    let first = cluster.submit(spec_in("q", 0));
    let second = cluster.submit(spec_in("q", 0));
    let tokens: BTreeMap<TaskId, u64> = cluster
        .schedule(2)
        .into_iter()
        .map(|(assignment, token)| (assignment.task, token))
        .collect();
    let report = |outcome| AttemptReport {
        started_at_ms: Some(NOW_MS),
        ended_at_ms: NOW_MS + 1,
        outcome,
        stdout_tail: String::new(),
        stderr_tail: String::new(),
    };
    let before_second = cluster.task(second).clone();
    let reports = vec![
        Command::StartAttempt { now_ms: NOW_MS, task: first, token: tokens[&first] },
        // A stale token: refused, and the rest still applies.
        Command::CompleteAttempt {
            now_ms: NOW_MS + 1,
            task: second,
            token: tokens[&second] - 1,
            report: report(Outcome::Exited { code: 0 }),
        },
        Command::PromoteDue { now_ms: NOW_MS },
        Command::CompleteAttempt {
            now_ms: NOW_MS + 1,
            task: first,
            token: tokens[&first],
            report: report(Outcome::Exited { code: 0 }),
        },
    ];
    let Response::Reports(answers) = cluster.apply(Command::Reports { reports }) else {
        panic!("a batch is answered with one answer per report");
    };
    let kinds: Vec<Option<RejectionKind>> = answers
        .iter()
        .map(|answer| match answer {
            Response::Rejected(rejection) => Some(rejection.kind),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        vec![None, Some(RejectionKind::Stale), Some(RejectionKind::InvalidArgument), None]
    );
    assert_eq!(cluster.task(first).state, TaskState::Succeeded, "start then end, in order");
    assert_eq!(cluster.task(second), &before_second, "the refused report changed nothing");
}

#[test]
fn leases_expire_from_the_last_heartbeat_and_a_new_leader_waits_a_full_lease() {
    let mut cluster = Cluster::new(vec![executor(1, 2, &[]), executor(2, 2, &[])]);
    let ids = [cluster.submit(spec_in("q", 0)), cluster.submit(spec_in("q", 0))];
    let assigned = cluster.schedule(2);
    let on_node_1: Vec<LostAttempt> = assigned
        .iter()
        .filter(|(a, _)| a.node == 1)
        .map(|(a, token)| cluster.lost(a.task, *token))
        .collect();
    assert_eq!(on_node_1.len(), 1);

    // A leader that took over at t=10_000 with a 3 s lease and 0.5 s grace.
    let mut leases = LeaseTable::new(10_000, 3_000, 500);
    assert!(
        leases.lost_attempts(&cluster.state, 13_499).is_empty(),
        "everyone gets a full lease after a takeover"
    );
    leases.renew(1, 11_000);
    leases.renew(2, 12_000);
    assert_eq!(leases.next_expiry_ms(&cluster.state), Some(14_500));
    assert!(leases.lost_attempts(&cluster.state, 14_499).is_empty());
    assert_eq!(
        leases.lost_attempts(&cluster.state, 14_500),
        on_node_1,
        "node 1 missed its renewal"
    );
    leases.renew(1, 14_600);
    assert!(
        leases.lost_attempts(&cluster.state, 14_700).is_empty(),
        "a late heartbeat renews again"
    );
    assert!(leases.lost_attempts(&cluster.state, 15_500).len() == 1, "node 2 expires at 15 500");

    let response = cluster.apply(Command::RequeueLost { now_ms: NOW_MS, lost: on_node_1.clone() });
    assert_eq!(response, Response::Requeued(vec![on_node_1[0].task]));
    assert!(ids.contains(&on_node_1[0].task));
    assert_eq!(cluster.state.n_active_on(1), 0, "the lost attempt no longer takes a slot");
}

#[test]
fn a_lost_judgement_made_before_the_attempt_started_changes_nothing() {
    // The leader judged the attempt lost from a stale lease table; a late
    // heartbeat renewed the lease and the start got recorded first.
    let mut cluster = Cluster::new(vec![executor(1, 1, &[])]);
    let id = cluster.submit(spec_in("q", 0));
    let (_, token) = cluster.schedule(1)[0];
    let judged = cluster.lost(id, token);
    cluster.apply(Command::StartAttempt { now_ms: NOW_MS, task: id, token });
    let before = cluster.task(id).clone();
    assert_eq!(
        cluster.apply(Command::RequeueLost { now_ms: NOW_MS + 1, lost: vec![judged] }),
        Response::Requeued(vec![])
    );
    assert_eq!(cluster.task(id), &before, "the running attempt is left alone");
    // Judged again, from the task as it is now, it is requeued.
    let lost = vec![cluster.lost(id, token)];
    assert_eq!(
        cluster.apply(Command::RequeueLost { now_ms: NOW_MS + 2, lost }),
        Response::Requeued(vec![id])
    );
}

#[test]
fn a_lost_attempt_uses_up_an_attempt() {
    let mut cluster = Cluster::new(vec![executor(1, 1, &[])]);
    let id = cluster.submit(TaskSpec { max_attempts: 1, ..spec_in("q", 0) });
    let (_, token) = cluster.schedule(1)[0];
    cluster.apply(Command::RequeueLost { now_ms: NOW_MS, lost: vec![cluster.lost(id, token)] });
    assert_eq!(cluster.task(id).state, TaskState::Failed);
    assert_eq!(cluster.task(id).attempts[0].outcome, Some(Outcome::Lost));
}

#[test]
fn cancelling_a_running_task_keeps_it_cancelled_when_its_attempt_reports() {
    let mut cluster = Cluster::new(vec![executor(1, 1, &[])]);
    let id = cluster.submit(spec_in("q", 0));
    let (_, token) = cluster.schedule(1)[0];
    cluster.apply(Command::StartAttempt { now_ms: NOW_MS, task: id, token });
    cluster.apply(Command::CancelTask { now_ms: NOW_MS + 1, id });
    assert_eq!(cluster.state.n_active_on(1), 0);
    assert_eq!(
        rejection_kind(cluster.apply(Command::StartAttempt { now_ms: NOW_MS, task: id, token })),
        RejectionKind::Stale
    );
    cluster.complete(id, token, Outcome::Cancelled, NOW_MS + 2);
    let task = cluster.task(id);
    assert_eq!(task.state, TaskState::Cancelled);
    assert_eq!(task.attempts[0].outcome, Some(Outcome::Cancelled));
}

#[test]
fn oversized_output_in_a_report_is_refused() {
    let mut cluster = Cluster::new(vec![executor(1, 1, &[])]);
    let id = cluster.submit(spec_in("q", 0));
    let (_, token) = cluster.schedule(1)[0];
    let report = AttemptReport {
        started_at_ms: None,
        ended_at_ms: NOW_MS,
        outcome: Outcome::Exited { code: 0 },
        stdout_tail: "x".repeat(crate::scheduler::limits::OUTPUT_TAIL_BYTES_CEILING + 1),
        stderr_tail: String::new(),
    };
    let response =
        cluster.apply(Command::CompleteAttempt { now_ms: NOW_MS, task: id, token, report });
    assert_eq!(rejection_kind(response), RejectionKind::InvalidArgument);
    assert_eq!(cluster.task(id).state, TaskState::Assigned);
}

#[test]
fn finished_tasks_are_purged_after_retention_with_their_keys() {
    let mut cluster = Cluster::new(vec![executor(1, 4, &[])]);
    let keyed = cluster.submit(TaskSpec { idempotency_key: Some("k".into()), ..spec_in("q", 0) });
    let live =
        cluster.submit(TaskSpec { schedule: Schedule::DelayMs(1_000_000), ..spec_in("q", 0) });
    let (_, token) = cluster.schedule(1)[0];
    cluster.complete(keyed, token, Outcome::Exited { code: 0 }, NOW_MS + 10);
    let purge = |now_ms| Command::PurgeFinished { now_ms, retention_ms: 1_000, tasks_max: 100 };
    assert_eq!(cluster.apply(purge(NOW_MS + 500)), Response::Purged(vec![]));
    assert_eq!(cluster.apply(purge(NOW_MS + 1_010)), Response::Purged(vec![keyed]));
    assert!(cluster.state.task(keyed).is_none());
    assert!(cluster.state.task(live).is_some(), "unfinished tasks stay");
    // The key is free again.
    let again = cluster.submit(TaskSpec { idempotency_key: Some("k".into()), ..spec_in("q", 0) });
    assert_ne!(again, keyed);
}

impl Cluster {
    /// Submits `specs` in one entry that also places them (the leader's path).
    fn submit_and_place(&mut self, specs: Vec<TaskSpec>) -> Vec<Task> {
        let placement = Placement {
            executors: self.executors.clone(),
            last_first_queue: None,
            assignments_max: 256,
        };
        let command =
            Command::SubmitAndPlace { now_ms: NOW_MS, queued_tasks_max: 1_000, specs, placement };
        match self.apply(command) {
            Response::Submitted(results) => {
                results.into_iter().map(|result| Task::clone(&result.task)).collect()
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_submission_with_the_leaders_view_assigns_its_tasks_in_its_own_entry() {
    let mut cluster = Cluster::new(vec![executor(1, 1, &[]), executor(2, 1, &[])]);
    let tasks = cluster.submit_and_place(vec![spec_in("q", 0), spec_in("q", 0), spec_in("q", 0)]);
    let revision = cluster.revision;
    let placed: Vec<(TaskState, Option<u64>, Option<u64>)> = tasks
        .iter()
        .map(|task| {
            let attempt = task.attempts.last();
            (task.state, attempt.map(|a| a.node_id), attempt.map(|a| a.fencing_token))
        })
        .collect();
    // One slot each: two tasks placed with this entry's index as their
    // token, on different nodes; the third waits, ready.
    assert_eq!(placed[2], (TaskState::Ready, None, None));
    assert_eq!(placed[0].0, TaskState::Assigned);
    assert_eq!(placed[1].0, TaskState::Assigned);
    assert_eq!((placed[0].2, placed[1].2), (Some(revision), Some(revision)));
    assert_ne!(placed[0].1, placed[1].1, "{placed:?}");
    // The answer is the state's task, not the task as it was submitted.
    assert_eq!(&tasks[0], cluster.task(tasks[0].id));

    // Full executors: a later submission stays ready, and the leader's
    // loop places it when a slot frees, as before.
    let later = cluster.submit_and_place(vec![spec_in("q", 0)]);
    assert_eq!(later[0].state, TaskState::Ready);
}

#[test]
fn submissions_to_an_idle_cluster_spread_over_its_nodes() {
    let mut cluster =
        Cluster::new(vec![executor(1, 2, &[]), executor(2, 2, &[]), executor(3, 2, &[])]);
    // Between submissions each task adds its start and its end: the log
    // index steps by three, the node count, every time.
    let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
    for _ in 0..30 {
        let task = cluster.submit_and_place(vec![spec_in("q", 0)]).remove(0);
        let attempt = task.attempts.last().expect("an idle cluster places every task");
        *per_node.entry(attempt.node_id).or_default() += 1;
        let token = attempt.fencing_token;
        cluster.apply(Command::StartAttempt { now_ms: NOW_MS + 1, task: task.id, token });
        cluster.complete(task.id, token, Outcome::Exited { code: 0 }, NOW_MS + 10);
    }
    assert_eq!(per_node, BTreeMap::from([(1, 10), (2, 10), (3, 10)]));
}

#[test]
fn a_submission_places_by_the_same_rules_as_the_loop() {
    // Labels and draining nodes; an older ready task of higher priority
    // goes before the new one.
    let mut cluster = Cluster::new(vec![executor(1, 1, &[("gpu", "yes")]), executor(2, 1, &[])]);
    cluster.apply(Command::SetDraining { node: 2, draining: true });
    let older = cluster.submit(spec_in("q", 5));
    let mut gpu = spec_in("q", 9);
    gpu.labels = [("gpu".to_string(), "yes".to_string())].into_iter().collect();
    let placed = cluster.submit_and_place(vec![spec_in("q", 0), gpu]);
    assert_eq!(placed[0].state, TaskState::Ready, "node 2 drains; node 1 goes to priority 9");
    assert_eq!(placed[1].state, TaskState::Assigned);
    assert_eq!(placed[1].attempts[0].node_id, 1);
    assert_eq!(cluster.task(older).state, TaskState::Ready);

    // No executors in the view: a plain submission.
    cluster.executors.clear();
    let plain = cluster.submit_and_place(vec![spec_in("q", 0)]);
    assert_eq!(plain[0].state, TaskState::Ready);
}

impl Cluster {
    /// Submits one task to run after `after`; the answer as it came.
    fn submit_after(&mut self, spec: TaskSpec, after: &[TaskId]) -> Response {
        self.apply(Command::SubmitAfter {
            now_ms: NOW_MS,
            queued_tasks_max: 1_000,
            specs: vec![spec],
            after: vec![after.iter().copied().map(Awaited::Task).collect()],
        })
    }

    fn submit_after_ok(&mut self, spec: TaskSpec, after: &[TaskId]) -> TaskId {
        match self.submit_after(spec, after) {
            Response::Submitted(results) => results[0].task.id,
            other => panic!("{other:?}"),
        }
    }

    /// Assigns `id` to its node now, alone, and returns the attempt's token.
    fn assign_now(&mut self, id: TaskId) -> u64 {
        let assignments = vec![Assignment { task: id, node: self.executors[0].node_id }];
        match self.apply(Command::Assign { now_ms: NOW_MS, assignments }) {
            Response::Assigned { assigned, skipped } if skipped.is_empty() => assigned[0].1,
            other => panic!("{id} was not assigned: {other:?}"),
        }
    }

    fn state_of(&self, ids: &[TaskId]) -> Vec<TaskState> {
        ids.iter().map(|id| self.task(*id).state).collect()
    }
}

#[test]
fn a_task_after_others_waits_until_all_of_them_succeeded() {
    let mut cluster = Cluster::new(vec![executor(1, 4, &[])]);
    let (a, b) = (cluster.submit(spec_in("q", 0)), cluster.submit(spec_in("q", 0)));
    // Listed unsorted: kept sorted.
    let c = cluster.submit_after_ok(spec_in("q", 9), &[b, a]);
    assert_eq!(&*cluster.task(c).after, &[a, b]);
    assert_eq!(cluster.task(c).state, TaskState::Waiting);
    assert_eq!(cluster.state.n_tasks_in(TaskState::Waiting), 1);
    assert_eq!(cluster.state.n_tasks_queued(), 3, "a waiting task is queued");
    // The plan never places it, whatever its priority.
    let placed: Vec<TaskId> = cluster.schedule(10).iter().map(|(a, _)| a.task).collect();
    assert_eq!(placed, vec![a, b]);
    let (token_a, token_b) =
        (cluster.task(a).attempts[0].fencing_token, cluster.task(b).attempts[0].fencing_token);

    cluster.complete(a, token_a, Outcome::Exited { code: 0 }, NOW_MS + 10);
    assert_eq!(cluster.task(c).state, TaskState::Waiting, "b has not succeeded yet");
    let applied = cluster.state.apply(
        cluster.revision + 1,
        &Command::CompleteAttempt {
            now_ms: NOW_MS + 20,
            task: b,
            token: token_b,
            report: AttemptReport {
                started_at_ms: Some(NOW_MS + 19),
                ended_at_ms: NOW_MS + 20,
                outcome: Outcome::Exited { code: 0 },
                stdout_tail: String::new(),
                stderr_tail: String::new(),
            },
        },
    );
    cluster.revision += 1;
    cluster.state.check_invariants().unwrap();
    assert_eq!(applied.changed, vec![b, c], "the release is part of the entry that ended b");
    let released = cluster.task(c);
    assert_eq!((released.state, released.revision), (TaskState::Ready, cluster.revision));
    assert_eq!(released.updated_at_ms, NOW_MS + 20);
    let placed: Vec<TaskId> = cluster.schedule(10).iter().map(|(a, _)| a.task).collect();
    assert_eq!(placed, vec![c]);
}

#[test]
fn a_task_after_tasks_that_already_succeeded_is_ready_and_a_delayed_one_pending() {
    let mut cluster = Cluster::new(vec![executor(1, 4, &[])]);
    let a = cluster.submit(spec_in("q", 0));
    let token = cluster.assign_now(a);
    cluster.complete(a, token, Outcome::Exited { code: 0 }, NOW_MS + 10);
    let now = cluster.submit_after_ok(spec_in("q", 0), &[a]);
    assert_eq!(cluster.task(now).state, TaskState::Ready);

    // Released before its run-at time: PENDING until then.
    let b = cluster.submit(spec_in("q", 0));
    let later = TaskSpec { schedule: Schedule::DelayMs(60_000), ..spec_in("q", 0) };
    let later = cluster.submit_after_ok(later, &[b]);
    assert_eq!(cluster.task(later).state, TaskState::Waiting);
    let token = cluster.assign_now(b);
    cluster.complete(b, token, Outcome::Exited { code: 0 }, NOW_MS + 20);
    assert_eq!(cluster.task(later).state, TaskState::Pending);
    assert_eq!(cluster.task(later).run_at_ms, NOW_MS + 60_000);
    // A task purged after it succeeded is no longer there to name.
    cluster.apply(Command::PurgeFinished {
        now_ms: NOW_MS + 5_000,
        retention_ms: 1_000,
        tasks_max: 100,
    });
    assert!(cluster.state.task(a).is_none());
    let response = cluster.submit_after(spec_in("q", 0), &[a]);
    assert_eq!(rejection_kind(response), RejectionKind::NotFound);
}

#[test]
fn a_failure_or_a_cancel_cancels_the_tasks_after_it_and_theirs_in_the_same_entry() {
    let mut cluster = Cluster::new(vec![executor(1, 4, &[])]);
    let once = TaskSpec { max_attempts: 1, ..spec_in("q", 0) };
    let (a, other) = (cluster.submit(once), cluster.submit(spec_in("q", 0)));
    let b = cluster.submit_after_ok(spec_in("q", 0), &[a]);
    let c = cluster.submit_after_ok(spec_in("q", 0), &[b, other]);
    let d = cluster.submit_after_ok(spec_in("q", 0), &[other]);
    let token = cluster.assign_now(a);
    cluster.complete(a, token, Outcome::Exited { code: 3 }, NOW_MS + 10);
    assert_eq!(
        cluster.state_of(&[a, b, c, d]),
        [TaskState::Failed, TaskState::Cancelled, TaskState::Cancelled, TaskState::Waiting]
    );
    assert_eq!(cluster.task(c).revision, cluster.revision);
    assert!(cluster.task(c).attempts.is_empty());
    // A retry is not a failure: the tasks after it go on waiting.
    let twice = cluster.submit(spec_in("q", 0));
    let e = cluster.submit_after_ok(spec_in("q", 0), &[twice]);
    let token = cluster.assign_now(twice);
    cluster.complete(twice, token, Outcome::Exited { code: 1 }, NOW_MS + 10);
    assert_eq!(cluster.state_of(&[twice, e]), [TaskState::Pending, TaskState::Waiting]);
    // Cancelling an awaited task cancels the tasks after it.
    cluster.apply(Command::CancelTask { now_ms: NOW_MS + 30, id: other });
    assert_eq!(cluster.state_of(&[other, d]), [TaskState::Cancelled, TaskState::Cancelled]);
    // Cancelling a waiting task leaves the task it waits for alone.
    cluster.apply(Command::CancelTask { now_ms: NOW_MS + 40, id: e });
    assert_eq!(cluster.state_of(&[twice, e]), [TaskState::Pending, TaskState::Cancelled]);
}

#[test]
fn a_submission_after_tasks_that_cannot_succeed_or_are_unknown_is_refused() {
    let mut cluster = Cluster::new(vec![executor(1, 4, &[])]);
    let once = TaskSpec { max_attempts: 1, ..spec_in("q", 0) };
    let (failed, live) = (cluster.submit(once), cluster.submit(spec_in("q", 0)));
    let token = cluster.assign_now(failed);
    cluster.complete(failed, token, Outcome::Exited { code: 1 }, NOW_MS + 10);
    let n_tasks = cluster.state.n_tasks();
    let cases: [(&[TaskId], RejectionKind, &str); 4] = [
        (
            &[live, failed],
            RejectionKind::FailedPrecondition,
            "is FAILED, so this task would never run",
        ),
        (&[TaskId(99)], RejectionKind::NotFound, "task 99, to run after, does not exist"),
        (&[live, live], RejectionKind::InvalidArgument, "runs after task 1 twice"),
        (&[], RejectionKind::InvalidArgument, ""),
    ];
    for (after, kind, message) in cases.into_iter().take(3) {
        match cluster.submit_after(spec_in("q", 0), after) {
            Response::Rejected(rejection) => {
                assert_eq!(rejection.kind, kind);
                assert!(rejection.message.contains(message), "{}", rejection.message);
            }
            other => panic!("{after:?}: {other:?}"),
        }
    }
    let too_many: Vec<TaskId> = (0..5_000).map(TaskId).collect();
    let response = cluster.submit_after(spec_in("q", 0), &too_many);
    assert_eq!(rejection_kind(response), RejectionKind::InvalidArgument);
    // A batch with a list per task or none: anything else is refused.
    let mismatched = Command::SubmitAfter {
        now_ms: NOW_MS,
        queued_tasks_max: 1_000,
        specs: vec![spec_in("q", 0), spec_in("q", 0)],
        after: vec![vec![Awaited::Task(live)]],
    };
    assert_eq!(rejection_kind(cluster.apply(mismatched)), RejectionKind::InvalidArgument);
    // In a batch, one bad list refuses the whole batch.
    let batch = Command::SubmitAfter {
        now_ms: NOW_MS,
        queued_tasks_max: 1_000,
        specs: vec![spec_in("q", 0), spec_in("q", 0)],
        after: vec![vec![Awaited::Task(live)], vec![Awaited::Task(failed)]],
    };
    match cluster.apply(batch) {
        Response::Rejected(rejection) => {
            assert!(rejection.message.starts_with("task 1 of the batch: "), "{}", rejection.message)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(cluster.state.n_tasks(), n_tasks, "nothing was added");
}

#[test]
fn parts_with_an_after_no_command_could_produce_are_refused() {
    let mut cluster = Cluster::new(vec![executor(1, 4, &[])]);
    let a = cluster.submit(spec_in("q", 0));
    let b = cluster.submit_after_ok(spec_in("q", 0), &[a]);
    let tasks = |change: &dyn Fn(&mut Task)| {
        let mut waiting = cluster.task(b).clone();
        change(&mut waiting);
        vec![cluster.task(a).clone(), waiting]
    };
    let meta = cluster.state.meta().clone();
    let refusal = |tasks: Vec<Task>| State::from_parts(meta.clone(), tasks).unwrap_err();
    assert!(refusal(tasks(&|task| task.state = TaskState::Ready)).contains("READY before"));
    assert!(refusal(tasks(&|task| task.after = vec![b].into())).contains("not earlier tasks"));
    let mut failed = cluster.task(a).clone();
    failed.state = TaskState::Failed;
    let err = State::from_parts(meta.clone(), vec![failed, cluster.task(b).clone()]).unwrap_err();
    assert!(err.contains("failed or was cancelled"), "{err}");
    let mut succeeded = cluster.task(a).clone();
    succeeded.state = TaskState::Succeeded;
    let err =
        State::from_parts(meta.clone(), vec![succeeded, cluster.task(b).clone()]).unwrap_err();
    assert!(err.contains("all succeeded"), "{err}");
    // As they are, they rebuild.
    State::from_parts(meta, vec![cluster.task(a).clone(), cluster.task(b).clone()]).unwrap();
}

#[test]
fn a_batch_submits_a_graph_whose_tasks_run_after_earlier_ones_of_the_batch() {
    let mut cluster = Cluster::new(vec![executor(1, 4, &[])]);
    let before = cluster.submit(TaskSpec { idempotency_key: Some("k".into()), ..spec_in("q", 0) });
    // A diamond: 0, then 1 and 2 after it, then 3 after both; 4 names a
    // spec whose key names the task there was already, and that task.
    let keyed = TaskSpec { idempotency_key: Some("k".into()), ..spec_in("q", 0) };
    let specs = vec![
        spec_in("q", 0),
        spec_in("q", 0),
        spec_in("q", 0),
        spec_in("q", 0),
        keyed,
        spec_in("q", 0),
    ];
    let after = vec![
        vec![],
        vec![Awaited::InBatch(0)],
        vec![Awaited::InBatch(0)],
        vec![Awaited::InBatch(2), Awaited::InBatch(1)],
        vec![],
        vec![Awaited::InBatch(4), Awaited::Task(before)],
    ];
    let command = Command::SubmitAfter { now_ms: NOW_MS, queued_tasks_max: 1_000, specs, after };
    let ids: Vec<TaskId> = match cluster.apply(command) {
        Response::Submitted(results) => results.iter().map(|result| result.task.id).collect(),
        other => panic!("{other:?}"),
    };
    let [top, left, right, bottom, existing, twice] = ids[..] else { panic!("{ids:?}") };
    assert_eq!(existing, before, "the key named the task there was");
    assert_eq!(&*cluster.task(bottom).after, &[left, right]);
    assert_eq!(&*cluster.task(twice).after, &[before], "one task named twice is awaited once");
    assert_eq!(
        cluster.state_of(&[top, left, right, bottom]),
        [TaskState::Ready, TaskState::Waiting, TaskState::Waiting, TaskState::Waiting]
    );
    let token = cluster.assign_now(top);
    cluster.complete(top, token, Outcome::Exited { code: 0 }, NOW_MS + 10);
    assert_eq!(
        cluster.state_of(&[left, right, bottom]),
        [TaskState::Ready, TaskState::Ready, TaskState::Waiting]
    );
    for id in [left, right] {
        let token = cluster.assign_now(id);
        cluster.complete(id, token, Outcome::Exited { code: 0 }, NOW_MS + 20);
    }
    assert_eq!(cluster.task(bottom).state, TaskState::Ready);

    // An index that does not come before its spec is refused, whole.
    let n_tasks = cluster.state.n_tasks();
    for after in [vec![vec![], vec![Awaited::InBatch(1)]], vec![vec![Awaited::InBatch(0)], vec![]]]
    {
        let command = Command::SubmitAfter {
            now_ms: NOW_MS,
            queued_tasks_max: 1_000,
            specs: vec![spec_in("q", 0), spec_in("q", 0)],
            after,
        };
        match cluster.apply(command) {
            Response::Rejected(rejection) => {
                assert_eq!(rejection.kind, RejectionKind::InvalidArgument);
                assert!(
                    rejection.message.contains("does not come before it"),
                    "{}",
                    rejection.message
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(cluster.state.n_tasks(), n_tasks);
}

#[test]
fn queue_limits_are_bounded_by_the_ceiling_and_a_set_one_can_change() {
    let mut state = State::default();
    let ceiling = crate::scheduler::Limits::CEILING.queue_limits_max;
    let limit =
        |queue: String, running_max: Option<u32>| Command::SetQueueLimit { queue, running_max };
    for idx in 0..ceiling {
        let applied = state.apply(idx + 1, &limit(format!("q{idx}"), Some(1)));
        assert_eq!(applied.response, Response::Empty);
    }
    let refused = state.apply(ceiling + 1, &limit("one-more".into(), Some(1))).response;
    assert_eq!(rejection_kind(refused), RejectionKind::ResourceExhausted);
    assert_eq!(state.queue_limits().len() as u64, ceiling);
    // A queue that has a limit may change it; a lifted one frees a place.
    assert_eq!(state.apply(ceiling + 2, &limit("q0".into(), Some(5))).response, Response::Empty);
    assert_eq!(state.queue_running_max("q0"), Some(5));
    assert_eq!(state.apply(ceiling + 3, &limit("q1".into(), None)).response, Response::Empty);
    let taken = state.apply(ceiling + 4, &limit("one-more".into(), Some(1))).response;
    assert_eq!(taken, Response::Empty);
}

#[test]
fn finished_tasks_are_purged_past_retention_or_beyond_their_count_a_batch_at_a_time() {
    let mut cluster = Cluster::new(vec![executor(1, 8, &[])]);
    let mut ids = Vec::new();
    for ended_ms in [100, 200, 300, 400, 500] {
        let id = cluster.submit(spec_in("q", 0));
        let token = cluster.assign_now(id);
        cluster.complete(id, token, Outcome::Exited { code: 0 }, NOW_MS + ended_ms);
        ids.push(id);
    }
    let state = &cluster.state;
    assert_eq!(state.n_tasks_finished(), 5);
    let now_ms = NOW_MS + 1_000;
    // Nothing past a retention of 10 s, and fewer than the count: nothing.
    assert_eq!(state.purge_cutoff_ms(now_ms, 10_000, 5, 2, true), None);
    // Past a retention of 750 ms: those that ended by 250 ms, when the
    // timer is due, or at once when a whole batch (2) waits.
    assert_eq!(state.purge_cutoff_ms(now_ms, 750, 5, 3, true), Some(NOW_MS + 250));
    assert_eq!(state.purge_cutoff_ms(now_ms, 750, 5, 3, false), None);
    assert_eq!(state.purge_cutoff_ms(now_ms, 750, 5, 2, false), Some(NOW_MS + 250));
    // Beyond a count of 2: the 3 oldest, at most a batch of them at once.
    assert_eq!(state.purge_cutoff_ms(now_ms, 10_000, 2, 10, true), Some(NOW_MS + 300));
    assert_eq!(state.purge_cutoff_ms(now_ms, 10_000, 2, 2, false), Some(NOW_MS + 200));
    // Both: the later cutoff.
    assert_eq!(state.purge_cutoff_ms(now_ms, 650, 3, 10, true), Some(NOW_MS + 350));

    // The leader's purge at that cutoff keeps the newest ones.
    let cutoff_ms = state.purge_cutoff_ms(now_ms, 10_000, 2, 10, true).unwrap();
    let purge = Command::PurgeFinished { now_ms: cutoff_ms, retention_ms: 0, tasks_max: 10 };
    assert_eq!(cluster.apply(purge), Response::Purged(ids[..3].to_vec()));
    assert_eq!(cluster.state.n_tasks_finished(), 2);
    assert_eq!(cluster.state.purge_cutoff_ms(now_ms, 10_000, 2, 10, true), None);
}
