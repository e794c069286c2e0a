//! Checks a history (see [`crate::history`]) against taskraft's promises and
//! reports each invariant:
//!
//! - **lost**: acknowledged submissions whose task is missing from the final
//!   read, or never reached a terminal state. Must be empty.
//! - **unexpected**: tasks that executed although no client ever invoked
//!   their submission, or the put of the periodic task that fired them.
//!   Must be empty.
//! - **periodic fires out of order**: a periodic task's fired tasks whose
//!   fire times (in their idempotency keys) do not grow with their ids: a
//!   tick fired twice, or fired after a later one. Must be empty.
//! - **duplicated executions**: tasks that executed more than once. Counted;
//!   allowed only where the earlier attempt was lost (its lease expired).
//! - **overlapping attempts**: two attempts of one task running at the same
//!   time, beyond a tolerance. Must be empty. An attempt that did not log
//!   its end ended when the harness saw its last process gone (`exec-gone`),
//!   or else within one tick of its last `exec-alive`.
//! - **queue limits exceeded**: more executions of a limited queue's tasks
//!   running at once than its limit, not counting attempts the cluster
//!   judged lost (their place is freed when they are re-queued). Must be
//!   empty.
//! - **ran before the tasks it runs after**: a task that executed before
//!   every task it names had succeeded (its execution began before the
//!   successful attempt of one of them logged its end), that succeeded while
//!   one of them did not, or that was not cancelled when one of them failed
//!   or was cancelled. Must be empty.
//! - **accepted stale completions**: a result the cluster recorded for an
//!   attempt that ended after a newer attempt had been assigned. Must be empty.
//! - **missed reads**: linearizable reads that found no task where a
//!   submission acknowledged before the read began had made one. Must be
//!   empty.
//! - **failover gaps**: from each fault aimed at the leader to the next
//!   acknowledged operation: p50, p99 and max.
//! - **liveness after heal**: every task terminal by the final read, and
//!   that read within a deadline of the heal.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::history::{Event, FinalAttempt, PUT_PERIODIC, SUBMIT};

#[derive(Debug, Clone)]
pub struct CheckerConfig {
    /// Overlaps shorter than this are not counted (clock reads, one executor tick).
    pub overlap_tolerance: Duration,
    /// How often ticking tasks write `exec-alive`: a run that stopped ticking
    /// without an `exec-end` died within this long of its last tick.
    pub alive_interval: Duration,
    /// The longest the final read may come after the heal.
    pub liveness_deadline: Duration,
    /// How far the cluster's clocks (which stamp attempts) may be from the
    /// history's clock. Zero when both are one machine's clock; a
    /// simulation that skews node clocks sets its largest skew.
    pub clock_skew_tolerance: Duration,
}

impl Default for CheckerConfig {
    fn default() -> Self {
        CheckerConfig {
            overlap_tolerance: Duration::from_millis(50),
            alive_interval: Duration::from_millis(250),
            liveness_deadline: Duration::from_secs(60),
            clock_skew_tolerance: Duration::ZERO,
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    pub n_acknowledged: usize,
    pub n_executed: usize,
    pub lost: Vec<String>,
    pub unexpected: Vec<String>,
    /// Tasks executed more than once, with whether each is explained by a lost attempt.
    pub duplicated: BTreeMap<String, bool>,
    pub overlapping: Vec<String>,
    pub stale_accepted: Vec<String>,
    /// Fired tasks whose fire time is not later than that of the task
    /// fired before them by the same periodic task.
    pub periodic_out_of_order: Vec<String>,
    /// Limited queues that ran more executions at once than their limit,
    /// with when.
    pub queue_limit_exceeded: Vec<String>,
    /// Tasks that ran before the tasks they run after had succeeded, or
    /// ended otherwise than those tasks' ends allow, with why.
    pub ran_before_after: Vec<String>,
    /// Tasks a linearizable read did not find, although their submission
    /// had been acknowledged before the read was invoked.
    pub missed_reads: Vec<String>,
    /// Milliseconds from each fault on the leader to the next acknowledged operation.
    pub failover_gaps_ms: Vec<u64>,
    /// Tasks not terminal at the final read.
    pub unfinished: Vec<String>,
    /// From the heal to the final read; `None` without both.
    pub heal_to_scan_ms: Option<u64>,
    pub liveness_deadline_ms: u64,
}

impl Report {
    pub fn unexplained_duplicates(&self) -> Vec<&String> {
        self.duplicated.iter().filter(|(_, explained)| !**explained).map(|(task, _)| task).collect()
    }

    pub fn liveness_ok(&self) -> bool {
        self.unfinished.is_empty()
            && self.heal_to_scan_ms.is_none_or(|ms| ms <= self.liveness_deadline_ms)
    }

    /// True when every invariant holds.
    pub fn valid(&self) -> bool {
        self.lost.is_empty()
            && self.unexpected.is_empty()
            && self.unexplained_duplicates().is_empty()
            && self.overlapping.is_empty()
            && self.stale_accepted.is_empty()
            && self.periodic_out_of_order.is_empty()
            && self.queue_limit_exceeded.is_empty()
            && self.ran_before_after.is_empty()
            && self.missed_reads.is_empty()
            && self.liveness_ok()
    }

    pub fn failover_percentile_ms(&self, percentile: f64) -> Option<u64> {
        let mut gaps = self.failover_gaps_ms.clone();
        if gaps.is_empty() {
            return None;
        }
        gaps.sort_unstable();
        let rank = ((percentile / 100.0) * gaps.len() as f64).ceil() as usize;
        Some(gaps[rank.clamp(1, gaps.len()) - 1])
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = |ok: bool| if ok { "ok" } else { "VIOLATED" };
        writeln!(
            f,
            "acknowledged submissions: {}; tasks executed: {}",
            self.n_acknowledged, self.n_executed
        )?;
        writeln!(
            f,
            "lost:                      {} {:?}",
            verdict(self.lost.is_empty()),
            self.lost
        )?;
        writeln!(
            f,
            "unexpected:                {} {:?}",
            verdict(self.unexpected.is_empty()),
            self.unexpected
        )?;
        let unexplained = self.unexplained_duplicates();
        writeln!(
            f,
            "duplicated executions:     {} {} in all, unexplained {:?}",
            verdict(unexplained.is_empty()),
            self.duplicated.len(),
            unexplained
        )?;
        writeln!(
            f,
            "overlapping attempts:      {} {:?}",
            verdict(self.overlapping.is_empty()),
            self.overlapping
        )?;
        writeln!(
            f,
            "accepted stale completions: {} {:?}",
            verdict(self.stale_accepted.is_empty()),
            self.stale_accepted
        )?;
        writeln!(
            f,
            "queue limits exceeded:     {} {:?}",
            verdict(self.queue_limit_exceeded.is_empty()),
            self.queue_limit_exceeded
        )?;
        writeln!(
            f,
            "ran before their tasks:    {} {:?}",
            verdict(self.ran_before_after.is_empty()),
            self.ran_before_after
        )?;
        writeln!(
            f,
            "periodic fires out of order: {} {:?}",
            verdict(self.periodic_out_of_order.is_empty()),
            self.periodic_out_of_order
        )?;
        writeln!(
            f,
            "missed reads:              {} {:?}",
            verdict(self.missed_reads.is_empty()),
            self.missed_reads
        )?;
        match (self.failover_percentile_ms(50.0), self.failover_percentile_ms(99.0)) {
            (Some(p50), Some(p99)) => writeln!(
                f,
                "failover gaps:             p50 {p50} ms, p99 {p99} ms, max {} ms over {} faults",
                self.failover_gaps_ms.iter().max().unwrap_or(&0),
                self.failover_gaps_ms.len()
            )?,
            _ => writeln!(f, "failover gaps:             no fault on a leader")?,
        }
        write!(
            f,
            "liveness after heal:       {} unfinished {:?}, final read {} after the heal (deadline {} ms)",
            verdict(self.liveness_ok()),
            self.unfinished,
            self.heal_to_scan_ms.map_or("n/a".to_owned(), |ms| format!("{ms} ms")),
            self.liveness_deadline_ms
        )
    }
}

const TERMINAL: [&str; 3] = ["SUCCEEDED", "FAILED", "CANCELLED"];

#[derive(Debug, Default)]
struct Execution {
    node: u64,
    start_ns: u64,
    end_ns: Option<u64>,
    /// The last `exec-alive`, for tasks that tick.
    alive_ns: Option<u64>,
    /// When the harness saw its last process gone (`exec-gone`).
    gone_ns: Option<u64>,
}

/// The fired tasks, of each periodic task put, whose fire time is not later
/// than that of the task with the next lower id fired by the same one.
fn periodic_out_of_order(
    prefixes: &BTreeSet<String>,
    finals: &BTreeMap<String, (String, String, Vec<FinalAttempt>)>,
) -> Vec<String> {
    let mut out_of_order = Vec::new();
    for prefix in prefixes {
        let mut fired: Vec<(u64, u64, &String)> = finals
            .iter()
            .filter_map(|(task_id, (key, _, _))| {
                let fire_ms = key.strip_prefix(prefix.as_str())?.parse().ok()?;
                Some((task_id.parse().ok()?, fire_ms, task_id))
            })
            .collect();
        fired.sort();
        for pair in fired.windows(2) {
            let ((_, before_ms, _), (_, fire_ms, task_id)) = (pair[0], pair[1]);
            if fire_ms <= before_ms {
                out_of_order.push(task_id.clone());
            }
        }
    }
    out_of_order
}

/// Each limited queue that ran more executions at once than its limit,
/// with the first time it did, by a sweep over the executions' ends and
/// starts (an end before a start at the same instant). Only executions that
/// started after the limit was acknowledged count: one already running then
/// is not stopped by it.
fn queue_limit_exceeded(
    limits: &BTreeMap<String, (u32, u64)>,
    runs: &BTreeMap<String, Vec<(u64, u64, String)>>,
) -> Vec<String> {
    let mut exceeded = Vec::new();
    for (queue, runs) in runs {
        let Some((limit, set_ns)) = limits.get(queue) else { continue };
        let mut edges: Vec<(u64, i8)> = runs
            .iter()
            .filter(|(start, end, _)| end > start && start >= set_ns)
            .flat_map(|(start, end, _)| [(*start, 1), (*end, -1)])
            .collect();
        edges.sort();
        let mut running: i64 = 0;
        for (at_ns, step) in edges {
            running += i64::from(step);
            if running > i64::from(*limit) {
                exceeded.push(format!("{queue}: {running} running at {} ms", at_ns / 1_000_000));
                break;
            }
        }
    }
    exceeded
}

/// A task as the final read found it: its key, state and attempts.
type Final = (String, String, Vec<FinalAttempt>);

/// The tasks that broke the order of the tasks they run after, with why:
/// an execution that began before the successful run of a task it names
/// logged its end (that run by its token, the one the cluster recorded as
/// `exited 0`), a success while a task it names did not succeed, or an end
/// other than CANCELLED when one of them failed or was cancelled.
fn ran_before_after(
    after_of: &BTreeMap<String, Vec<String>>,
    finals: &BTreeMap<String, Final>,
    executions: &BTreeMap<String, BTreeMap<u64, Execution>>,
) -> Vec<String> {
    let mut broken = Vec::new();
    for (task_id, after) in after_of {
        let Some((_, state, _)) = finals.get(task_id) else { continue };
        let starts: Vec<u64> = executions
            .get(task_id)
            .map(|runs| runs.values().map(|run| run.start_ns).collect())
            .unwrap_or_default();
        for dependency in after {
            let Some((_, dependency_state, attempts)) = finals.get(dependency) else {
                broken.push(format!("{task_id}: runs after {dependency}, not in the final read"));
                continue;
            };
            if dependency_state != "SUCCEEDED" {
                if !starts.is_empty() || state != "CANCELLED" {
                    broken.push(format!(
                        "{task_id}: {state}, {} runs, after {dependency} {dependency_state}",
                        starts.len()
                    ));
                }
                continue;
            }
            let succeeded_token = attempts.iter().rev().find(|a| a.outcome == "exited 0");
            let succeeded_end = succeeded_token
                .and_then(|attempt| executions.get(dependency)?.get(&attempt.token)?.end_ns);
            match (succeeded_end, starts.iter().min()) {
                (_, None) => {}
                (None, Some(_)) => broken.push(format!(
                    "{task_id}: ran, but {dependency}'s successful run logged no end"
                )),
                (Some(end_ns), Some(start_ns)) if start_ns < &end_ns => broken.push(format!(
                    "{task_id}: started at {} ms, before {dependency} ended at {} ms",
                    start_ns / 1_000_000,
                    end_ns / 1_000_000
                )),
                _ => {}
            }
        }
    }
    broken
}

pub fn check(events: &[Event], config: &CheckerConfig) -> Report {
    let mut report = Report {
        liveness_deadline_ms: config.liveness_deadline.as_millis() as u64,
        ..Report::default()
    };
    let mut invoked_keys = BTreeSet::new();
    // Key prefixes of the periodic tasks a client put.
    let mut periodic_prefixes = BTreeSet::new();
    let mut queue_of: BTreeMap<String, String> = BTreeMap::new();
    // The tasks each task runs after, for those that name any.
    let mut after_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Each limited queue's limit and when it was acknowledged.
    let mut queue_limits: BTreeMap<String, (u32, u64)> = BTreeMap::new();
    // Each limited queue's executions that count: (start, end, task).
    let mut limited_runs: BTreeMap<String, Vec<(u64, u64, String)>> = BTreeMap::new();
    let mut acknowledged: BTreeMap<String, String> = BTreeMap::new();
    let mut executions: BTreeMap<String, BTreeMap<u64, Execution>> = BTreeMap::new();
    let mut finals: BTreeMap<String, (String, String, Vec<FinalAttempt>)> = BTreeMap::new();
    let mut kills: Vec<(u64, u64)> = Vec::new();
    let mut leader_faults = Vec::new();
    let mut ok_times = Vec::new();
    let (mut heal_ns, mut scan_ns) = (None, None);
    // When each submission was acknowledged, and each read invoked.
    let mut acknowledged_ns: BTreeMap<String, u64> = BTreeMap::new();
    let mut reads_invoked_ns: BTreeMap<(u64, String), u64> = BTreeMap::new();
    // Attempts the harness saw gone, by task and token.
    let mut gone_ns: BTreeMap<(String, u64), u64> = BTreeMap::new();

    for event in events {
        match event {
            Event::Invoke { process, f, key, time_ns } => {
                if f == SUBMIT {
                    invoked_keys.insert(key.clone());
                } else if f == PUT_PERIODIC {
                    periodic_prefixes.insert(key.clone());
                } else {
                    reads_invoked_ns.insert((*process, key.clone()), *time_ns);
                }
            }
            Event::Ok { f, key, task_id, time_ns, .. } if f == SUBMIT => {
                ok_times.push(*time_ns);
                if let Some(task_id) = task_id {
                    acknowledged.insert(task_id.clone(), key.clone());
                    acknowledged_ns.entry(task_id.clone()).or_insert(*time_ns);
                }
            }
            Event::Ok { process, key, task_id, .. } => {
                // A read of task `key`, which found nothing.
                let invoked_ns = reads_invoked_ns.get(&(*process, key.clone()));
                let acknowledged_before = acknowledged_ns
                    .get(key)
                    .is_some_and(|acked| invoked_ns.is_some_and(|invoked| acked < invoked));
                if task_id.is_none() && acknowledged_before {
                    report.missed_reads.push(key.clone());
                }
            }
            Event::Fail { .. } | Event::Info { .. } => {}
            Event::ExecStart { task_id, token, node, time_ns, .. } => {
                let runs = executions.entry(task_id.clone()).or_default();
                runs.entry(*token).or_default().node = *node;
                runs.get_mut(token).expect("just inserted").start_ns = *time_ns;
            }
            Event::ExecAlive { task_id, token, node, time_ns, .. } => {
                let run = executions.entry(task_id.clone()).or_default().entry(*token).or_default();
                run.node = *node;
                run.alive_ns = run.alive_ns.max(Some(*time_ns));
            }
            Event::ExecEnd { task_id, token, node, time_ns, .. } => {
                let run = executions.entry(task_id.clone()).or_default().entry(*token).or_default();
                run.node = *node;
                run.end_ns = Some(*time_ns);
            }
            Event::ExecGone { task_id, token, time_ns, .. } => {
                let gone = gone_ns.entry((task_id.clone(), *token)).or_insert(*time_ns);
                *gone = (*gone).min(*time_ns);
            }
            Event::Nemesis { f, nodes, leader, time_ns } => {
                // `kill`, `kill-leader`, `kill-task-node`, `restart-all`, ...
                if f.starts_with("kill") || f == "restart-all" {
                    kills.extend(nodes.iter().map(|node| (*node, *time_ns)));
                }
                if *leader {
                    leader_faults.push(*time_ns);
                }
            }
            Event::Heal { time_ns } => heal_ns = Some(*time_ns),
            Event::Final { task_id, key, state, attempts, queue, after } => {
                finals.insert(task_id.clone(), (key.clone(), state.clone(), attempts.clone()));
                queue_of.insert(task_id.clone(), queue.clone());
                if !after.is_empty() {
                    after_of.insert(task_id.clone(), after.clone());
                }
            }
            Event::Scan { time_ns } => scan_ns = Some(*time_ns),
            Event::QueueLimit { queue, running_max, time_ns } => {
                queue_limits.insert(queue.clone(), (*running_max, *time_ns));
            }
        }
    }
    // Only for runs that started: a process killed before it logged its
    // start left nothing to overlap with.
    for ((task_id, token), gone) in gone_ns {
        if let Some(run) = executions.get_mut(&task_id).and_then(|runs| runs.get_mut(&token)) {
            run.gone_ns = Some(gone);
        }
    }
    report.n_acknowledged = acknowledged.len();
    report.n_executed = executions.len();

    for task_id in acknowledged.keys() {
        match finals.get(task_id) {
            Some((_, state, _)) if TERMINAL.contains(&state.as_str()) => {}
            _ => report.lost.push(task_id.clone()),
        }
    }
    for (task_id, (_, state, _)) in &finals {
        if !TERMINAL.contains(&state.as_str()) {
            report.unfinished.push(task_id.clone());
        }
    }
    for task_id in executions.keys() {
        let key = finals.get(task_id).map(|(key, _, _)| key).or_else(|| acknowledged.get(task_id));
        let fired = |key: &String| periodic_prefixes.iter().any(|prefix| key.starts_with(prefix));
        if !key.is_some_and(|key| invoked_keys.contains(key) || fired(key)) {
            report.unexpected.push(task_id.clone());
        }
    }
    report.periodic_out_of_order = periodic_out_of_order(&periodic_prefixes, &finals);

    for (task_id, runs) in &executions {
        let attempts =
            finals.get(task_id).map(|(_, _, attempts)| attempts.as_slice()).unwrap_or_default();
        if runs.len() > 1 {
            // Every execution but the last must have been lost: re-run by design.
            let mut tokens: Vec<u64> = runs.keys().copied().collect();
            tokens.pop();
            let explained = tokens.iter().all(|token| {
                attempts.iter().any(|attempt| attempt.token == *token && attempt.outcome == "lost")
            });
            report.duplicated.insert(task_id.clone(), explained);
        }
        // The end of an execution that did not log one. The harness's
        // witness says best: it saw the last process go (and no tick can
        // come later). Without it, the task's own ticks: within one tick of
        // the last. Without ticks: when the cluster saw it end, or when its
        // node was killed, or never.
        let alive_ns = config.alive_interval.as_nanos() as u64;
        let end_of = |token: u64, run: &Execution| {
            run.end_ns
                .or(run.gone_ns.map(|gone| gone.max(run.alive_ns.unwrap_or(0))))
                .or(run.alive_ns.map(|last| last + alive_ns))
                .or_else(|| {
                    attempts
                        .iter()
                        .find(|attempt| attempt.token == token && attempt.ended_at_ns > 0)
                        .map(|a| a.ended_at_ns)
                })
                .or_else(|| {
                    kills
                        .iter()
                        .filter(|(node, at)| *node == run.node && *at >= run.start_ns)
                        .map(|(_, at)| *at)
                        .min()
                })
                .unwrap_or(u64::MAX)
        };
        let tolerance_ns = config.overlap_tolerance.as_nanos() as u64;
        let intervals: Vec<(u64, u64, u64)> =
            runs.iter().map(|(token, run)| (*token, run.start_ns, end_of(*token, run))).collect();
        'pairs: for (idx, a) in intervals.iter().enumerate() {
            for b in &intervals[idx + 1..] {
                let overlap_ns = a.2.min(b.2).saturating_sub(a.1.max(b.1));
                if overlap_ns > tolerance_ns {
                    report.overlapping.push(task_id.clone());
                    break 'pairs;
                }
            }
        }
        if let Some(queue) = queue_of.get(task_id).filter(|queue| queue_limits.contains_key(*queue))
        {
            let lost = |token: u64| {
                attempts.iter().any(|attempt| attempt.token == token && attempt.outcome == "lost")
            };
            let counted = intervals
                .iter()
                .filter(|(token, _, _)| !lost(*token))
                .map(|(_, start, end)| (*start, end.saturating_sub(tolerance_ns), task_id.clone()));
            limited_runs.entry(queue.clone()).or_default().extend(counted);
        }
        // A process outcome recorded for an attempt whose process ended after
        // the next attempt was assigned: the cluster took a stale result.
        for pair in attempts.windows(2) {
            let (older, newer) = (&pair[0], &pair[1]);
            let from_process = older.outcome.starts_with("exited")
                || older.outcome.starts_with("killed by signal");
            let skew_ns = config.clock_skew_tolerance.as_nanos() as u64;
            let ended_late = runs
                .get(&older.token)
                .and_then(|run| run.end_ns)
                .is_some_and(|end| end > newer.assigned_at_ns + skew_ns);
            if from_process && ended_late {
                report.stale_accepted.push(task_id.clone());
                break;
            }
        }
    }

    report.queue_limit_exceeded = queue_limit_exceeded(&queue_limits, &limited_runs);
    report.ran_before_after = ran_before_after(&after_of, &finals, &executions);

    ok_times.sort_unstable();
    for fault_ns in leader_faults {
        let next_ok = ok_times.iter().find(|ok| **ok > fault_ns);
        if let Some(next_ok) = next_ok {
            report.failover_gaps_ms.push((next_ok - fault_ns) / 1_000_000);
        }
    }
    if let (Some(heal), Some(scan)) = (heal_ns, scan_ns) {
        report.heal_to_scan_ms = Some(scan.saturating_sub(heal) / 1_000_000);
    }
    report
}
