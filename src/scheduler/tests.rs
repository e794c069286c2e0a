//! Unit tests of the state machine: transitions, ordering, delays, dedupe,
//! limits and bad input. Each test drives `State::apply` with commands, as the
//! Raft log would, and checks the answers and the indexes.

use std::sync::Arc;

use crate::scheduler::{
    Cadence, Command, CronExpr, Limits, Overlap, RejectionKind, Response, Schedule, State,
    StateMeta, Task, TaskId, TaskSpec, TaskState,
};

const NOW_MS: u64 = 1_700_000_000_000;

fn spec(program: &str) -> TaskSpec {
    TaskSpec::for_test(program)
}

struct Harness {
    state: State,
    revision: u64,
}

impl Harness {
    fn new() -> Harness {
        Harness { state: State::default(), revision: 0 }
    }

    fn apply(&mut self, command: Command) -> Response {
        self.revision += 1;
        let applied = self.state.apply(self.revision, &command);
        self.state.check_invariants().expect("indexes match the tasks after every command");
        for id in &applied.changed {
            assert_eq!(
                self.state.task(*id).unwrap().revision,
                self.revision,
                "changed task carries the revision"
            );
        }
        applied.response
    }

    fn submit_at(&mut self, now_ms: u64, specs: Vec<TaskSpec>) -> Response {
        self.apply(Command::SubmitTasks {
            now_ms,
            queued_tasks_max: Limits::default().queued_tasks_max,
            specs,
        })
    }

    fn submit_one(&mut self, spec: TaskSpec) -> Task {
        match self.submit_at(NOW_MS, vec![spec]) {
            Response::Submitted(mut results) => {
                assert_eq!(results.len(), 1);
                Task::clone(&results.remove(0).task)
            }
            other => panic!("expected a submission, got {other:?}"),
        }
    }

    fn rejection(&mut self, command: Command) -> (RejectionKind, String) {
        let n_tasks = self.state.n_tasks();
        let periodics: Vec<_> = self.state.periodics().cloned().collect();
        match self.apply(command) {
            Response::Rejected(rejection) => {
                assert_eq!(self.state.n_tasks(), n_tasks, "a rejection changes nothing");
                assert!(self.state.periodics().eq(periodics.iter()), "a rejection changes nothing");
                (rejection.kind, rejection.message)
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    fn ready_ids(&self, queue: &str) -> Vec<u64> {
        self.state.ready_in_queue(queue).map(|task| task.id.0).collect()
    }
}

#[test]
fn submitted_task_is_ready_with_sequential_ids() {
    let mut h = Harness::new();
    let first = h.submit_one(spec("true"));
    let second = h.submit_one(spec("true"));
    assert_eq!((first.id, second.id), (TaskId(0), TaskId(1)));
    assert_eq!(first.state, TaskState::Ready);
    assert_eq!(first.run_at_ms, NOW_MS);
    assert_eq!(first.created_at_ms, NOW_MS);
    assert_eq!(h.state.n_tasks_queued(), 2);
}

#[test]
fn ready_order_is_priority_then_run_at_then_submission() {
    let mut h = Harness::new();
    let mut low = spec("low");
    low.priority = -5;
    let mut high = spec("high");
    high.priority = 10;
    let mut early = spec("early");
    early.schedule = Schedule::AtUnixMs(NOW_MS - 1_000);
    h.submit_one(low); // 0
    h.submit_one(spec("plain-a")); // 1
    h.submit_one(high); // 2
    h.submit_one(spec("plain-b")); // 3
    h.submit_one(early); // 4: priority 0 like 1 and 3 but an earlier run-at time
    assert_eq!(h.ready_ids("default"), vec![2, 4, 1, 3, 0]);
}

#[test]
fn queues_are_indexed_separately() {
    let mut h = Harness::new();
    let mut mail = spec("send");
    mail.queue = "mail".into();
    h.submit_one(mail);
    h.submit_one(spec("true"));
    assert_eq!(h.state.ready_queues().collect::<Vec<_>>(), vec!["default", "mail"]);
    assert_eq!(h.ready_ids("mail"), vec![0]);
    assert_eq!(h.ready_ids("default"), vec![1]);
    assert_eq!(h.state.ready_queue_depths().collect::<Vec<_>>(), vec![("default", 1), ("mail", 1)]);
}

#[test]
fn delayed_task_is_pending_until_promoted_at_its_time() {
    let mut h = Harness::new();
    let mut delayed = spec("later");
    delayed.schedule = Schedule::DelayMs(5_000);
    let mut at = spec("at");
    at.schedule = Schedule::AtUnixMs(NOW_MS + 2_000);
    let delayed = h.submit_one(delayed);
    let at = h.submit_one(at);
    assert_eq!((delayed.state, delayed.run_at_ms), (TaskState::Pending, NOW_MS + 5_000));
    assert_eq!(at.state, TaskState::Pending);
    assert_eq!(h.state.next_pending_run_at_ms(), Some(NOW_MS + 2_000));
    assert!(h.ready_ids("default").is_empty());

    assert_eq!(h.apply(Command::PromoteDue { now_ms: NOW_MS + 1_999 }), Response::Promoted(vec![]));
    assert_eq!(
        h.apply(Command::PromoteDue { now_ms: NOW_MS + 2_000 }),
        Response::Promoted(vec![at.id])
    );
    assert_eq!(h.state.task(at.id).unwrap().state, TaskState::Ready);
    assert_eq!(h.state.task(delayed.id).unwrap().state, TaskState::Pending);
    assert_eq!(h.state.next_pending_run_at_ms(), Some(NOW_MS + 5_000));
    assert_eq!(
        h.apply(Command::PromoteDue { now_ms: NOW_MS + 60_000 }),
        Response::Promoted(vec![delayed.id])
    );
    assert_eq!(h.state.next_pending_run_at_ms(), None);
}

#[test]
fn run_at_in_the_past_is_ready_at_once() {
    let mut h = Harness::new();
    let mut past = spec("past");
    past.schedule = Schedule::AtUnixMs(NOW_MS - 60_000);
    assert_eq!(h.submit_one(past).state, TaskState::Ready);
}

#[test]
fn same_idempotency_key_returns_the_same_task() {
    let mut h = Harness::new();
    let mut keyed = spec("once");
    keyed.idempotency_key = Some("order-42".into());
    let first = h.submit_one(keyed.clone());
    match h.submit_at(NOW_MS + 10, vec![keyed.clone()]) {
        Response::Submitted(results) => {
            assert!(results[0].already_existed);
            assert_eq!(*results[0].task, first);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.state.n_tasks(), 1);
    // Also within one batch: the second spec with the key gets the first's task.
    let mut other = spec("twice");
    other.idempotency_key = Some("order-43".into());
    match h.submit_at(NOW_MS, vec![other.clone(), other]) {
        Response::Submitted(results) => {
            assert!(!results[0].already_existed);
            assert!(results[1].already_existed);
            assert_eq!(results[0].task.id, results[1].task.id);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.state.n_tasks(), 2);
}

#[test]
fn cancel_moves_a_live_task_to_cancelled_and_refuses_a_finished_one() {
    let mut h = Harness::new();
    let ready = h.submit_one(spec("a"));
    let mut delayed = spec("b");
    delayed.schedule = Schedule::DelayMs(1_000);
    let pending = h.submit_one(delayed);
    let counts = |h: &Harness| TaskState::ALL.map(|state| h.state.n_tasks_in(state));
    assert_eq!(counts(&h), [0, 1, 1, 0, 0, 0, 0, 0], "one pending, one ready");
    for id in [ready.id, pending.id] {
        match h.apply(Command::CancelTask { now_ms: NOW_MS + 1, id }) {
            Response::Cancelled(task) => assert_eq!(task.state, TaskState::Cancelled),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(h.state.n_tasks_queued(), 0);
    assert_eq!(counts(&h), [0, 0, 0, 0, 0, 0, 0, 2], "both cancelled");
    assert_eq!(h.state.ready_queue_depths().count(), 0);
    assert!(h.ready_ids("default").is_empty());
    assert_eq!(h.state.next_pending_run_at_ms(), None);

    let (kind, message) = h.rejection(Command::CancelTask { now_ms: NOW_MS, id: ready.id });
    assert_eq!(kind, RejectionKind::FailedPrecondition);
    assert!(message.contains("already CANCELLED"), "{message}");
    let (kind, _) = h.rejection(Command::CancelTask { now_ms: NOW_MS, id: TaskId(99) });
    assert_eq!(kind, RejectionKind::NotFound);
}

#[test]
fn full_queue_is_resource_exhausted_and_changes_nothing() {
    let mut h = Harness::new();
    let submit = |_: &mut Harness, n: usize| Command::SubmitTasks {
        now_ms: NOW_MS,
        queued_tasks_max: 3,
        specs: (0..n).map(|_| spec("x")).collect::<Vec<_>>(),
    };
    let command = submit(&mut h, 2);
    assert!(matches!(h.apply(command), Response::Submitted(_)));
    let command = submit(&mut h, 2);
    let (kind, message) = h.rejection(command);
    assert_eq!(kind, RejectionKind::ResourceExhausted);
    assert!(message.contains("queue is full"), "{message}");
    assert_eq!(h.state.n_tasks_queued(), 2);
    // Cancelling frees a place.
    h.apply(Command::CancelTask { now_ms: NOW_MS, id: TaskId(0) });
    let command = submit(&mut h, 2);
    assert!(matches!(h.apply(command), Response::Submitted(_)));
}

#[test]
fn invalid_spec_in_a_batch_rejects_the_whole_batch() {
    let mut h = Harness::new();
    let mut bad = spec("");
    bad.queue = "default".into();
    let (kind, message) = h.rejection(Command::SubmitTasks {
        now_ms: NOW_MS,
        queued_tasks_max: 10,
        specs: vec![spec("good"), bad],
    });
    assert_eq!(kind, RejectionKind::InvalidArgument);
    assert!(message.contains("task 1 of the batch") && message.contains("no program"), "{message}");
    assert_eq!(h.state.meta(), &StateMeta { next_task_id: 0, ..StateMeta::default() });
}

#[test]
fn bad_specs_are_refused_with_a_message() {
    type Mutation = Box<dyn Fn(&mut TaskSpec)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("no program", Box::new(|s| s.command.program = "".into())),
        ("queue name", Box::new(|s| s.queue = "bad queue!".into())),
        ("queue is empty", Box::new(|s| s.queue = "".into())),
        ("NUL", Box::new(|s| s.command.args = vec!["a\0b".into()].into())),
        ("timeout", Box::new(|s| s.timeout_ms = 0)),
        ("max attempts", Box::new(|s| s.max_attempts = 0)),
        ("backoff", Box::new(|s| s.backoff.initial_ms = s.backoff.max_ms + 1)),
        ("multiplier", Box::new(|s| s.backoff.multiplier_milli = 10)),
        ("NAME=VALUE", Box::new(|s| _ = s.command.env.insert("A=B".into(), "c".into()))),
        (
            "delay 18446744073709551615 ms is more than the limit",
            Box::new(|s| s.schedule = Schedule::DelayMs(u64::MAX)),
        ),
        ("ahead of now", Box::new(|s| s.schedule = Schedule::AtUnixMs(u64::MAX))),
        ("idempotency key is empty", Box::new(|s| s.idempotency_key = Some("".into()))),
        ("label name is empty", Box::new(|s| _ = s.labels.insert(String::new(), "v".into()))),
        (
            "arguments",
            Box::new(|s| s.command.args = vec![String::new(); Limits::CEILING.args_max + 1].into()),
        ),
    ];
    for (expected, mutate) in cases {
        let mut h = Harness::new();
        let mut bad = spec("true");
        mutate(&mut bad);
        let (kind, message) = h.rejection(Command::SubmitTasks {
            now_ms: NOW_MS,
            queued_tasks_max: 10,
            specs: vec![bad],
        });
        assert_eq!(kind, RejectionKind::InvalidArgument, "{expected}");
        assert!(message.contains(expected), "expected {expected:?} in {message:?}");
    }
}

#[test]
fn configured_limits_are_tighter_than_the_ceiling() {
    let limits = Limits { args_max: 2, labels_max: 1, ..Limits::default() };
    let mut s = spec("echo");
    s.command.args = vec!["a".into(), "b".into(), "c".into()].into();
    assert!(limits.check_spec(&s, NOW_MS).unwrap_err().0.contains("3 arguments"));
    s.command.args = vec!["a".into(), "b".into()].into();
    assert_eq!(limits.check_spec(&s, NOW_MS), Ok(()));
    s.labels.insert("zone".into(), "a".into());
    s.labels.insert("gpu".into(), "yes".into());
    assert!(limits.check_spec(&s, NOW_MS).unwrap_err().0.contains("2 labels"));
}

#[test]
fn empty_batch_is_refused() {
    let mut h = Harness::new();
    let (kind, _) =
        h.rejection(Command::SubmitTasks { now_ms: NOW_MS, queued_tasks_max: 10, specs: vec![] });
    assert_eq!(kind, RejectionKind::InvalidArgument);
}

#[test]
fn state_rebuilt_from_parts_has_the_same_indexes() {
    let mut h = Harness::new();
    for priority in [3, -1, 7] {
        let mut s = spec("x");
        s.priority = priority;
        h.submit_one(s);
    }
    let mut delayed = spec("later");
    delayed.schedule = Schedule::DelayMs(10);
    delayed.idempotency_key = Some("k".into());
    h.submit_one(delayed);
    let rebuilt = State::from_parts(h.state.meta().clone(), h.state.tasks().cloned()).unwrap();
    assert_eq!(
        rebuilt.ready_in_queue("default").map(|t| t.id.0).collect::<Vec<_>>(),
        vec![2, 0, 1]
    );
    assert_eq!(rebuilt.next_pending_run_at_ms(), Some(NOW_MS + 10));
    assert_eq!(rebuilt.n_tasks_queued(), 4);
}

#[test]
fn parts_no_command_could_produce_are_refused() {
    let mut h = Harness::new();
    let task = h.submit_one(spec("x"));
    let err = State::from_parts(
        StateMeta { next_task_id: 0, ..StateMeta::default() },
        vec![task.clone()],
    )
    .unwrap_err();
    assert!(err.contains("beyond the next task id"), "{err}");
    let err = State::from_parts(
        StateMeta { next_task_id: 5, ..StateMeta::default() },
        vec![task.clone(), task],
    )
    .unwrap_err();
    assert!(err.contains("twice"), "{err}");
}

#[test]
fn the_same_log_gives_the_same_state() {
    let commands: Vec<Command> = (0..50u64)
        .map(|i| match i % 5 {
            0 | 1 => Command::SubmitTasks {
                now_ms: NOW_MS + i,
                queued_tasks_max: 1_000,
                specs: vec![TaskSpec {
                    priority: (i % 7) as i32,
                    schedule: Schedule::DelayMs(i % 3 * 10),
                    ..spec("t")
                }],
            },
            2 => Command::PromoteDue { now_ms: NOW_MS + i * 3 },
            3 => Command::CancelTask { now_ms: NOW_MS + i, id: TaskId(i / 3) },
            _ => Command::CancelTask { now_ms: NOW_MS + i, id: TaskId(1_000) },
        })
        .collect();
    let run = || {
        let mut h = Harness::new();
        let responses: Vec<Response> = commands.iter().map(|c| h.apply(c.clone())).collect();
        (responses, h.state.tasks().cloned().collect::<Vec<_>>())
    };
    assert_eq!(run(), run());
}

#[test]
fn a_frozen_state_keeps_what_it_saw_while_commands_go_on() {
    let mut h = Harness::new();
    let first = h.submit_one(spec("x"));
    let frozen = h.state.frozen();
    h.apply(Command::CancelTask { now_ms: NOW_MS + 1, id: first.id });
    let second = h.submit_one(spec("y"));
    // The live state moved on; the frozen one is what it was, for the snapshot.
    assert_eq!(h.state.task(first.id).unwrap().state, TaskState::Cancelled);
    assert_eq!(frozen.tasks().cloned().collect::<Vec<_>>(), vec![first]);
    assert_eq!(frozen.meta().next_task_id, second.id.0);
    assert_eq!(h.state.meta().next_task_id, second.id.0 + 1);
}

#[test]
fn tasks_of_one_queue_and_program_share_those_strings_also_when_rebuilt() {
    let mut h = Harness::new();
    let first = h.submit_one(spec("true"));
    let second = h.submit_one(spec("true"));
    let shared = |state: &State| {
        let (a, b) = (state.task(first.id).unwrap(), state.task(second.id).unwrap());
        Arc::ptr_eq(&a.spec.queue, &b.spec.queue)
            && Arc::ptr_eq(&a.spec.command.program, &b.spec.command.program)
    };
    assert!(shared(&h.state));
    let tasks: Vec<Task> = h.state.tasks().cloned().collect();
    let rebuilt = State::from_parts(h.state.meta().clone(), tasks).unwrap();
    assert!(shared(&rebuilt), "a state loaded from a snapshot shares them too");
}

/// Follows a listing's pages to the end: every page, and each page's ids.
fn list_to_end(
    state: &State,
    page_size: usize,
    scanned_max: usize,
    matches: impl Fn(&Task) -> bool + Copy,
) -> Vec<Vec<u64>> {
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let n_looked_at = std::cell::Cell::new(0);
        let counted = |task: &Task| {
            n_looked_at.set(n_looked_at.get() + 1);
            matches(task)
        };
        let page = state.list_page(after, page_size, scanned_max, counted);
        let ids: Vec<u64> = page.tasks.iter().map(|task| task.id.0).collect();
        assert!(ids.len() <= page_size, "a page holds at most page_size tasks: {ids:?}");
        assert!(n_looked_at.get() <= scanned_max, "a page looked at {} tasks", n_looked_at.get());
        pages.push(ids);
        match page.resume_after {
            None => return pages,
            Some(resume_after) => {
                assert!(after < Some(resume_after), "a page that goes on moves past a task");
                after = Some(resume_after);
            }
        }
    }
}

#[test]
fn a_filtered_listing_looks_at_a_bounded_number_of_tasks_per_page_and_misses_none() {
    let mut h = Harness::new();
    // 40 tasks; the filter passes every seventh ("rare"), so long runs miss.
    let rare: Vec<u64> = (0..40)
        .map(|idx| h.submit_one(spec(if idx % 7 == 3 { "rare" } else { "common" })))
        .filter(|task| &*task.spec.command.program == "rare")
        .map(|task| task.id.0)
        .collect();
    assert_eq!(rare.len(), 6);
    let is_rare = |task: &Task| &*task.spec.command.program == "rare";

    for page_size in [1, 2, 4, 100] {
        for scanned_max in [1, 2, 5, 13, 40, 1_000] {
            let pages = list_to_end(&h.state, page_size, scanned_max, is_rare);
            let listed: Vec<u64> = pages.iter().flatten().copied().collect();
            assert_eq!(listed, rare, "page_size {page_size}, scanned_max {scanned_max}");
        }
    }

    // With room to look at every task, pages are full until the last, and
    // the last page says it is the last: the listing of before the bound.
    let pages = list_to_end(&h.state, 4, 1_000, is_rare);
    assert_eq!(pages, vec![rare[..4].to_vec(), rare[4..].to_vec()]);
    let pages = list_to_end(&h.state, 3, 1_000, is_rare);
    assert_eq!(pages.len(), 2, "six tasks in pages of three, nothing after: {pages:?}");

    // A bound of three finds nothing in the first three tasks and says where
    // to go on: an empty page is not the end.
    let first = h.state.list_page(None, 10, 3, is_rare);
    assert!(first.tasks.is_empty());
    assert_eq!(first.resume_after, Some(h.state.tasks().nth(2).unwrap().id));

    // Nothing matches: the listing ends, having looked at every task once.
    let pages = list_to_end(&h.state, 10, 8, |_| false);
    assert_eq!(pages.len(), 5, "forty tasks, eight per page");
    assert!(pages.iter().all(Vec::is_empty));
}

fn put_periodic(name: &str, cadence: Cadence, overlap: Overlap, now_ms: u64) -> Command {
    Command::PutPeriodic {
        now_ms,
        periodic_tasks_max: Limits::default().periodic_tasks_max,
        name: name.into(),
        cadence,
        overlap,
        spec: spec("report"),
    }
}

fn fire(h: &mut Harness, now_ms: u64) -> Vec<TaskId> {
    let queued_tasks_max = Limits::default().queued_tasks_max;
    match h.apply(Command::FirePeriodic { now_ms, queued_tasks_max }) {
        Response::Fired(ids) => ids,
        other => panic!("expected fired tasks, got {other:?}"),
    }
}

const EVERY_SECOND: Cadence = Cadence::Every { period_ms: 1_000 };

/// The cursor moves in the same entry that creates the task, so applying
/// the same fire again (a new leader that proposes what its predecessor
/// committed) creates nothing, and missed fire times fire once.
#[test]
fn a_periodic_task_fires_once_per_due_time_and_never_twice() {
    let mut h = Harness::new();
    assert!(matches!(
        h.apply(put_periodic("tick", EVERY_SECOND, Overlap::Allow, NOW_MS)),
        Response::Periodic(_)
    ));
    assert_eq!(h.state.next_periodic_fire_ms(), Some(NOW_MS + 1_000));
    assert_eq!(fire(&mut h, NOW_MS + 999), vec![]);
    let fired = fire(&mut h, NOW_MS + 1_000);
    assert_eq!(fired.len(), 1);
    let task = h.state.task(fired[0]).unwrap();
    assert_eq!(task.state, TaskState::Ready);
    assert_eq!(
        task.spec.idempotency_key.as_deref(),
        Some(&*format!("periodic/tick/{}", NOW_MS + 1_000))
    );
    assert_eq!(fire(&mut h, NOW_MS + 1_000), vec![], "the same time fires once");
    assert_eq!(fire(&mut h, NOW_MS + 1_999), vec![]);
    // Three fire times missed: one task, for the first of them, and the
    // cadence goes on from now.
    let fired = fire(&mut h, NOW_MS + 5_500);
    assert_eq!(fired.len(), 1);
    let key = h.state.task(fired[0]).unwrap().spec.idempotency_key.clone();
    assert_eq!(key.as_deref(), Some(&*format!("periodic/tick/{}", NOW_MS + 2_000)));
    let periodic = h.state.periodic("tick").unwrap();
    assert_eq!(periodic.next_fire_ms, Some(NOW_MS + 6_000));
    assert_eq!(periodic.last_fire_ms, Some(NOW_MS + 2_000));
    assert_eq!(periodic.last_task, Some(fired[0]));
    assert_eq!((periodic.fired_total, periodic.skipped_total), (2, 0));
}

#[test]
fn a_periodic_task_that_forbids_overlap_skips_while_its_last_task_is_going() {
    let mut h = Harness::new();
    h.apply(put_periodic("nightly", EVERY_SECOND, Overlap::Forbid, NOW_MS));
    let first = fire(&mut h, NOW_MS + 1_000);
    assert_eq!(first.len(), 1);
    assert_eq!(fire(&mut h, NOW_MS + 2_000), vec![], "the first task is still READY");
    assert_eq!(h.state.periodic("nightly").unwrap().skipped_total, 1);
    h.apply(Command::CancelTask { now_ms: NOW_MS + 2_100, id: first[0] });
    assert_eq!(fire(&mut h, NOW_MS + 3_000).len(), 1, "the last task has finished");
    // Overlap allowed: a task while the one before is still ready.
    h.apply(put_periodic("often", EVERY_SECOND, Overlap::Allow, NOW_MS + 3_000));
    let first_often = fire(&mut h, NOW_MS + 4_000);
    let second_often = fire(&mut h, NOW_MS + 5_000);
    assert_eq!((first_often.len(), second_often.len()), (1, 1), "nightly skips, often fires");
    assert_eq!(h.state.task(first_often[0]).unwrap().state, TaskState::Ready);
    let nightly = h.state.periodic("nightly").unwrap();
    assert_eq!((nightly.fired_total, nightly.skipped_total), (2, 3));
}

#[test]
fn a_full_queue_skips_a_fire_and_the_cadence_goes_on() {
    let mut h = Harness::new();
    h.apply(put_periodic("tick", EVERY_SECOND, Overlap::Allow, NOW_MS));
    h.submit_one(spec("true"));
    let full = Command::FirePeriodic { now_ms: NOW_MS + 1_000, queued_tasks_max: 1 };
    assert_eq!(h.apply(full), Response::Fired(vec![]));
    let periodic = h.state.periodic("tick").unwrap();
    assert_eq!((periodic.fired_total, periodic.skipped_total), (0, 1));
    assert_eq!(periodic.next_fire_ms, Some(NOW_MS + 2_000));
}

#[test]
fn a_bad_periodic_task_is_refused_and_changes_nothing() {
    let mut h = Harness::new();
    h.apply(put_periodic("kept", EVERY_SECOND, Overlap::Allow, NOW_MS));
    let mut delayed = spec("report");
    delayed.schedule = Schedule::DelayMs(5);
    let mut keyed = spec("report");
    keyed.idempotency_key = Some("k".into());
    let with_spec = |spec: TaskSpec| Command::PutPeriodic {
        now_ms: NOW_MS,
        periodic_tasks_max: 10,
        name: "p".into(),
        cadence: EVERY_SECOND,
        overlap: Overlap::Allow,
        spec,
    };
    let cases = [
        (put_periodic("a/b", EVERY_SECOND, Overlap::Allow, NOW_MS), "name may hold"),
        (put_periodic("p", Cadence::Every { period_ms: 10 }, Overlap::Allow, NOW_MS), "interval"),
        (with_spec(delayed), "no delay"),
        (with_spec(keyed), "no idempotency key"),
        (with_spec(spec("")), "no program"),
    ];
    for (command, expected) in cases {
        let (kind, message) = h.rejection(command);
        assert_eq!(kind, RejectionKind::InvalidArgument, "{message}");
        assert!(message.contains(expected), "{message}");
        assert_eq!(h.state.n_periodics(), 1);
    }
    let mut over = put_periodic("another", EVERY_SECOND, Overlap::Allow, NOW_MS);
    if let Command::PutPeriodic { periodic_tasks_max, .. } = &mut over {
        *periodic_tasks_max = 1;
    }
    let (kind, message) = h.rejection(over.clone());
    assert_eq!(kind, RejectionKind::ResourceExhausted, "{message}");
    // Replacing one that exists is no new periodic task.
    if let Command::PutPeriodic { name, .. } = &mut over {
        *name = "kept".into();
    }
    assert!(matches!(h.apply(over), Response::Periodic(_)));
    let (kind, _) = h.rejection(Command::DeletePeriodic { name: "missing".into() });
    assert_eq!(kind, RejectionKind::NotFound);
    assert_eq!(h.state.n_periodics(), 1);
}

#[test]
fn replacing_keeps_the_counts_and_restarts_the_cadence_and_deleting_stops_it() {
    let mut h = Harness::new();
    h.apply(put_periodic("tick", EVERY_SECOND, Overlap::Allow, NOW_MS));
    let fired = fire(&mut h, NOW_MS + 1_000);
    let hourly = Cadence::Cron(CronExpr::parse("@hourly").unwrap());
    let Response::Periodic(replaced) =
        h.apply(put_periodic("tick", hourly, Overlap::Forbid, NOW_MS + 1_500))
    else {
        panic!("expected the periodic task");
    };
    assert_eq!((replaced.fired_total, replaced.last_task), (1, Some(fired[0])));
    let next_hour = (NOW_MS + 1_500) / 3_600_000 * 3_600_000 + 3_600_000;
    assert_eq!(replaced.next_fire_ms, Some(next_hour));
    assert_eq!(h.state.next_periodic_fire_ms(), Some(next_hour));
    assert!(matches!(
        h.apply(Command::DeletePeriodic { name: "tick".into() }),
        Response::Periodic(_)
    ));
    assert_eq!(h.state.next_periodic_fire_ms(), None);
    assert_eq!(fire(&mut h, next_hour), vec![]);
    assert!(h.state.task(fired[0]).is_some(), "the tasks it fired stay");
}
