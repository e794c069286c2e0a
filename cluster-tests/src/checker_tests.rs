//! The checker on hand-made histories: a good one passes, and each kind of
//! violation is caught by the invariant meant to catch it, and only by it.

use std::time::Duration;

use crate::checker::{CheckerConfig, Report, check};
use crate::history::{Event, FinalAttempt};

const MS: u64 = 1_000_000;

fn invoke(key: &str, at_ms: u64) -> Event {
    Event::Invoke { process: 0, f: "submit".into(), key: key.into(), time_ns: at_ms * MS }
}
fn ok(key: &str, task: &str, at_ms: u64) -> Event {
    Event::Ok {
        process: 0,
        f: "submit".into(),
        key: key.into(),
        task_id: Some(task.into()),
        time_ns: at_ms * MS,
    }
}
fn read_invoke(task: &str, at_ms: u64) -> Event {
    Event::Invoke { process: 1, f: "read".into(), key: task.into(), time_ns: at_ms * MS }
}
/// A read of `task` that found it or not.
fn read_ok(task: &str, found: bool, at_ms: u64) -> Event {
    let task_id = found.then(|| task.to_owned());
    Event::Ok { process: 1, f: "read".into(), key: task.into(), task_id, time_ns: at_ms * MS }
}
fn start(task: &str, token: u64, node: u64, at_ms: u64) -> Event {
    Event::ExecStart { task_id: task.into(), attempt: 1, token, node, time_ns: at_ms * MS }
}
fn end(task: &str, token: u64, node: u64, at_ms: u64) -> Event {
    Event::ExecEnd { task_id: task.into(), attempt: 1, token, node, time_ns: at_ms * MS }
}
fn attempt(token: u64, node: u64, assigned_ms: u64, ended_ms: u64, outcome: &str) -> FinalAttempt {
    FinalAttempt {
        token,
        node,
        assigned_at_ns: assigned_ms * MS,
        ended_at_ns: ended_ms * MS,
        outcome: outcome.into(),
    }
}
fn final_record(task: &str, key: &str, state: &str, attempts: Vec<FinalAttempt>) -> Event {
    Event::Final {
        task_id: task.into(),
        key: key.into(),
        state: state.into(),
        attempts,
        queue: String::new(),
        after: Vec::new(),
    }
}

/// Two tasks; the leader (node 1) is killed while task 2 runs on it, and
/// task 2 runs again on node 2 after its lease ran out.
fn good() -> Vec<Event> {
    vec![
        invoke("a", 0),
        ok("a", "1", 10),
        invoke("b", 11),
        ok("b", "2", 20),
        start("1", 5, 3, 30),
        end("1", 5, 3, 40),
        start("2", 6, 1, 31),
        Event::Nemesis { f: "kill".into(), nodes: vec![1], leader: true, time_ns: 100 * MS },
        invoke("c", 150),
        // Task 3 is not acknowledged yet when this read begins: nothing to find.
        read_invoke("3", 160),
        read_ok("3", false, 170),
        read_invoke("1", 180),
        read_ok("1", true, 190),
        ok("c", "3", 900),
        start("2", 9, 2, 4_200),
        end("2", 9, 2, 4_300),
        start("3", 10, 2, 4_210),
        end("3", 10, 2, 4_220),
        Event::Heal { time_ns: 5_000 * MS },
        final_record("1", "a", "SUCCEEDED", vec![attempt(5, 3, 25, 41, "exited 0")]),
        final_record(
            "2",
            "b",
            "SUCCEEDED",
            vec![attempt(6, 1, 25, 4_100, "lost"), attempt(9, 2, 4_150, 4_301, "exited 0")],
        ),
        final_record("3", "c", "SUCCEEDED", vec![attempt(10, 2, 4_150, 4_221, "exited 0")]),
        Event::Scan { time_ns: 6_000 * MS },
    ]
}

fn run(events: &[Event]) -> Report {
    check(
        events,
        &CheckerConfig {
            overlap_tolerance: Duration::from_millis(5),
            alive_interval: Duration::from_millis(100),
            liveness_deadline: Duration::from_secs(10),
            clock_skew_tolerance: Duration::ZERO,
        },
    )
}

/// Only the named invariant fails.
fn only(report: &Report, violated: &str) {
    let checks = [
        ("lost", report.lost.is_empty()),
        ("unexpected", report.unexpected.is_empty()),
        ("duplicated", report.unexplained_duplicates().is_empty()),
        ("overlapping", report.overlapping.is_empty()),
        ("stale", report.stale_accepted.is_empty()),
        ("periodic", report.periodic_out_of_order.is_empty()),
        ("queue", report.queue_limit_exceeded.is_empty()),
        ("after", report.ran_before_after.is_empty()),
        ("missed", report.missed_reads.is_empty()),
        ("liveness", report.liveness_ok()),
    ];
    for (name, holds) in checks {
        assert_eq!(holds, name != violated, "{name} in:\n{report}");
    }
    assert!(!report.valid());
}

#[test]
fn a_good_history_passes() {
    let report = run(&good());
    assert!(report.valid(), "{report}");
    assert_eq!((report.n_acknowledged, report.n_executed), (3, 3));
    assert_eq!(report.duplicated.len(), 1, "task 2 ran twice, explained by its lost attempt");
    assert_eq!(report.failover_gaps_ms, vec![800]);
    assert_eq!(report.heal_to_scan_ms, Some(1_000));
}

#[test]
fn a_lost_task_is_caught() {
    let mut events = good();
    events.retain(|event| !matches!(event, Event::Final { task_id, .. } if task_id == "3"));
    let report = run(&events);
    assert_eq!(report.lost, vec!["3"]);
    only(&report, "lost");
}

#[test]
fn an_unsubmitted_execution_is_caught() {
    let mut events = good();
    events.push(start("77", 50, 3, 4_500));
    events.push(end("77", 50, 3, 4_600));
    let report = run(&events);
    assert_eq!(report.unexpected, vec!["77"]);
    only(&report, "unexpected");
}

/// Tasks 10 and 11 fired by a periodic task a client put: expected, though
/// no client submitted them, as long as their fire times grow with their ids.
fn with_fired(fire_times_ms: [u64; 2]) -> Vec<Event> {
    let mut events = good();
    events.insert(
        0,
        Event::Invoke {
            process: 0,
            f: "put-periodic".into(),
            key: "periodic/tick/".into(),
            time_ns: 0,
        },
    );
    for (task, fire_ms) in ["10", "11"].into_iter().zip(fire_times_ms) {
        events.push(start(task, 20 + fire_ms, 3, fire_ms + 10));
        events.push(end(task, 20 + fire_ms, 3, fire_ms + 20));
        let key = format!("periodic/tick/{fire_ms}");
        let attempts = vec![attempt(20 + fire_ms, 3, fire_ms + 5, fire_ms + 21, "exited 0")];
        events.push(final_record(task, &key, "SUCCEEDED", attempts));
    }
    events
}

#[test]
fn fired_tasks_are_expected_and_their_fire_times_must_grow() {
    let report = run(&with_fired([1_000, 2_000]));
    assert!(report.valid(), "{report}");
    let report = run(&with_fired([2_000, 2_000]));
    assert_eq!(report.periodic_out_of_order, vec!["11"]);
    only(&report, "periodic");
    let report = run(&with_fired([2_000, 1_000]));
    assert_eq!(report.periodic_out_of_order, vec!["11"]);
    // Without the put, the same tasks are unexpected.
    let mut events = with_fired([1_000, 2_000]);
    events.remove(0);
    let report = run(&events);
    assert_eq!(report.unexpected, vec!["10", "11"]);
    only(&report, "unexpected");
}

/// `good()` with the tasks named in `queued` in queue `serial`, limited to
/// `running_max`.
fn with_limited_queue(running_max: u32, queued: &[&str]) -> Vec<Event> {
    let mut events = good();
    for event in &mut events {
        if let Event::Final { task_id, queue, .. } = event
            && queued.contains(&task_id.as_str())
        {
            *queue = "serial".into();
        }
    }
    events.insert(0, Event::QueueLimit { queue: "serial".into(), running_max, time_ns: 0 });
    events
}

#[test]
fn a_limited_queue_running_more_than_its_limit_is_caught() {
    // Tasks 2 (its second run, 4,200-4,300 ms) and 3 (4,210-4,220 ms) ran
    // together: two at once.
    let report = run(&with_limited_queue(1, &["2", "3"]));
    assert_eq!(report.queue_limit_exceeded, vec!["serial: 2 running at 4210 ms"]);
    only(&report, "queue");
    assert!(run(&with_limited_queue(2, &["2", "3"])).valid());
    // Task 2's lost first run overlapped task 1; a lost attempt's place is
    // freed when it is re-queued, so it does not count.
    assert!(run(&with_limited_queue(1, &["1", "2"])).valid());
}

/// [`good`] with task 3 running after `after`, and task 1 ending `state_1`.
fn with_after(after: &[&str], state_1: &str) -> Vec<Event> {
    let mut events = good();
    for event in &mut events {
        match event {
            Event::Final { task_id, after: list, .. } if task_id == "3" => {
                *list = after.iter().map(|id| id.to_string()).collect();
            }
            Event::Final { task_id, state, .. } if task_id == "1" => *state = state_1.into(),
            _ => {}
        }
    }
    events
}

#[test]
fn a_task_that_ran_before_the_tasks_it_runs_after_succeeded_is_caught() {
    // Task 3 began (4,210 ms) after task 1 had ended (40 ms): in order.
    assert!(run(&with_after(&["1"], "SUCCEEDED")).valid());
    // Task 2's successful run (token 9) logged its end at 4,300 ms: task 3
    // began before it. Task 2's lost first run does not count as its end.
    let report = run(&with_after(&["1", "2"], "SUCCEEDED"));
    assert_eq!(report.ran_before_after, vec!["3: started at 4210 ms, before 2 ended at 4300 ms"]);
    only(&report, "after");
    // After a task that failed, a task must be cancelled and never run.
    let report = run(&with_after(&["1"], "FAILED"));
    assert_eq!(report.ran_before_after, vec!["3: SUCCEEDED, 1 runs, after 1 FAILED"]);
    only(&report, "after");
    let mut events = with_after(&["1"], "FAILED");
    events.retain(|event| {
        !matches!(event, Event::ExecStart { task_id, .. } | Event::ExecEnd { task_id, .. } if task_id == "3")
    });
    for event in &mut events {
        if let Event::Final { task_id, state, attempts, .. } = event
            && task_id == "3"
        {
            *state = "CANCELLED".into();
            attempts.clear();
        }
    }
    assert!(run(&events).valid(), "{}", run(&events));
}

#[test]
fn an_unexplained_second_execution_is_caught() {
    let mut events = good();
    // Task 1 ran twice though its first attempt succeeded.
    events.push(start("1", 12, 2, 4_400));
    events.push(end("1", 12, 2, 4_410));
    let report = run(&events);
    assert_eq!(report.unexplained_duplicates(), vec!["1"]);
    only(&report, "duplicated");
}

#[test]
fn overlapping_attempts_are_caught_beyond_the_tolerance() {
    let mut events = good();
    // Task 2's first attempt logs its end long after the second began.
    events.push(end("2", 6, 1, 4_250));
    let report = run(&events);
    assert_eq!(report.overlapping, vec!["2"]);
    only(&report, "overlapping");
    // Within the tolerance it is not counted.
    let mut events = good();
    events.push(end("2", 6, 1, 4_203));
    assert!(run(&events).overlapping.is_empty());
    // An execution with no end at all, on a node never killed, may still run.
    let mut events = good();
    events.push(start("2", 7, 3, 40));
    events.push(Event::Final {
        task_id: "9".into(),
        key: "a".into(),
        state: "SUCCEEDED".into(),
        attempts: vec![],
        queue: String::new(),
        after: Vec::new(),
    });
    assert_eq!(run(&events).overlapping, vec!["2"]);
}

#[test]
fn a_killed_run_that_kept_ticking_overlaps_even_if_the_cluster_says_it_ended() {
    // Task 2's first run left no end, but ticked until long after the
    // cluster gave up on it (4 100 ms) and the second run began (4 200 ms).
    let report = run(&ticking_until(4_600));
    assert_eq!(report.overlapping, vec!["2"]);
    only(&report, "overlapping");
    // Ticks that stop before the second run began are fine.
    assert!(run(&ticking_until(4_000)).valid());
    // A witness that saw it gone before its last tick cannot hide the tick.
    let mut events = ticking_until(4_600);
    events.push(gone("2", 6, 1, 4_150));
    assert_eq!(run(&events).overlapping, vec!["2"]);
}

fn alive(task: &str, token: u64, node: u64, at_ms: u64) -> Event {
    Event::ExecAlive { task_id: task.into(), attempt: 1, token, node, time_ns: at_ms * MS }
}
fn gone(task: &str, token: u64, node: u64, at_ms: u64) -> Event {
    Event::ExecGone { task_id: task.into(), token, node, time_ns: at_ms * MS }
}

/// The good history, with task 2's first run ticking every 100 ms until
/// `last_tick_ms`, from 1 000 ms on.
fn ticking_until(last_tick_ms: u64) -> Vec<Event> {
    let mut events = good();
    let ticks = (1_000..=last_tick_ms).rev().step_by(100);
    events.extend(ticks.map(|at_ms| alive("2", 6, 1, at_ms)));
    events
}

#[test]
fn a_run_seen_gone_just_after_its_last_tick_does_not_overlap_a_quick_retry() {
    // Task 2's first run was killed just after its tick at 4 150 ms, and
    // its retry began at 4 200 ms (an executor that fences an attempt
    // reports it lost at once). Ticks alone allow it to have lived until
    // 4 250 ms.
    let report = run(&ticking_until(4_150));
    assert_eq!(report.overlapping, vec!["2"], "ticks alone cannot rule it out");
    // The witness saw it gone at 4 160 ms: no overlap.
    let mut events = ticking_until(4_150);
    events.push(gone("2", 6, 1, 4_160));
    assert!(run(&events).valid(), "{}", run(&events));
}

#[test]
fn a_run_seen_gone_after_the_retry_began_overlaps_though_its_ticks_stopped_early() {
    // The ticks stopped at 3 000 ms (a stalled process ticks no more), so
    // they say it died long before the retry at 4 200 ms...
    assert!(run(&ticking_until(3_000)).valid());
    // ... but its last process was seen gone only at 4 300 ms.
    let mut events = ticking_until(3_000);
    events.push(gone("2", 6, 1, 4_300));
    let report = run(&events);
    assert_eq!(report.overlapping, vec!["2"]);
    only(&report, "overlapping");
    // Gone in time, it is fine.
    let mut events = ticking_until(3_000);
    events.push(gone("2", 6, 1, 4_195));
    assert!(run(&events).valid());
}

#[test]
fn an_attempt_gone_before_it_logged_its_start_is_no_execution() {
    // A third attempt of task 2 killed before its first log line: nothing
    // ran as far as the checker knows, so nothing overlaps or repeats.
    let mut events = good();
    events.push(gone("2", 8, 3, 4_250));
    let report = run(&events);
    assert!(report.valid(), "{report}");
    assert_eq!(report.n_executed, 3);
}

/// The good history, but the cluster recorded task 2's first attempt as
/// exited, though that process ended after the second attempt was assigned.
fn with_a_stale_result_accepted() -> Vec<Event> {
    let mut events = good();
    for event in &mut events {
        if let Event::Final { task_id, attempts, .. } = event
            && task_id == "2"
        {
            attempts[0].outcome = "exited 0".into();
        }
    }
    events.push(end("2", 6, 1, 4_180));
    events
}

#[test]
fn an_accepted_stale_result_is_caught() {
    let report = run(&with_a_stale_result_accepted());
    assert_eq!(report.stale_accepted, vec!["2"]);
    // The first attempt is no longer "lost", so its second run is unexplained too.
    assert_eq!(report.unexplained_duplicates(), vec!["2"]);
    assert!(!report.valid());
}

/// With node clocks that may be off by the tolerance (a simulation skews
/// them), an end within it of the next assignment is not proof of staleness;
/// one beyond it still is.
#[test]
fn the_stale_check_allows_for_the_configured_clock_skew() {
    let events = with_a_stale_result_accepted();
    let config = |skew_ms: u64| CheckerConfig {
        overlap_tolerance: Duration::from_millis(5),
        alive_interval: Duration::from_millis(100),
        liveness_deadline: Duration::from_secs(10),
        clock_skew_tolerance: Duration::from_millis(skew_ms),
    };
    assert!(check(&events, &config(60_000)).stale_accepted.is_empty());
    assert_eq!(check(&events, &config(10)).stale_accepted, vec!["2"]);
}

#[test]
fn an_unfinished_task_or_a_late_final_read_fails_liveness() {
    let mut events = good();
    events.push(invoke("d", 4_000));
    events.push(Event::Info {
        process: 1,
        f: "submit".into(),
        key: "d".into(),
        error: "timeout".into(),
        time_ns: 4_900 * MS,
    });
    events.push(final_record("4", "d", "RUNNING", vec![attempt(20, 3, 4_950, 0, "")]));
    let report = run(&events);
    assert_eq!(report.unfinished, vec!["4"]);
    only(&report, "liveness");

    let mut events = good();
    events.push(Event::Scan { time_ns: 20_000 * MS });
    let report = run(&events);
    assert_eq!(report.heal_to_scan_ms, Some(15_000));
    only(&report, "liveness");
}

#[test]
fn a_read_that_misses_an_acknowledged_task_is_caught() {
    let mut events = good();
    events.extend([read_invoke("2", 950), read_ok("2", false, 960)]);
    let report = run(&events);
    assert_eq!(report.missed_reads, vec!["2"]);
    only(&report, "missed");
}

#[test]
fn failover_percentiles() {
    let report = Report { failover_gaps_ms: vec![900, 100, 500, 300, 700], ..Report::default() };
    assert_eq!(report.failover_percentile_ms(50.0), Some(500));
    assert_eq!(report.failover_percentile_ms(99.0), Some(900));
    assert_eq!(Report::default().failover_percentile_ms(50.0), None);
}

#[test]
fn histories_round_trip_through_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.jsonl");
    let writer = crate::history::HistoryWriter::create(&path).unwrap();
    for event in good() {
        writer.record(&event);
    }
    assert_eq!(crate::history::read(&path).unwrap(), good());
    std::fs::write(&path, "{\"type\":\"invoke\"}\n").unwrap();
    let err = crate::history::read(&path).unwrap_err().to_string();
    assert!(err.contains(":1: not a history event"), "{err}");
}
