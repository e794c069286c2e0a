//! The executor of one node: runs the attempts the leader assigned to this
//! node, once their assignment is committed and applied here.
//!
//! Its loop watches the local state machine for assignments to this node,
//! cancellations and re-assignments of what it runs; heartbeats the leader
//! every `heartbeat_interval_ms` with its slots, labels and running attempts,
//! and at once when it learns of a new leader, which places nothing on an
//! executor it has not heard from; and kills its attempts when its lease
//! runs out (self-fencing). The lease runs from the moment it *sent* its
//! last heartbeat that the leader accepted.
//!
//! It runs at most `slots` programs at a time; attempts assigned beyond
//! that (its prefetch) wait on the node, in the order they were assigned,
//! and start the moment a slot frees. How many it takes beyond its slots
//! follows how long its attempts run ([`prefetch_for`]): enough to keep its
//! slots busy for `execution.prefetch_window_ms`, at most
//! `execution.prefetch_per_slot` per slot, so short tasks queue deep and
//! long ones do not queue on a busy node.
//!
//! A program starts only while this executor's lease holds. The lease is
//! the fence: once it has run out the leader may hand the task to another
//! node, and until then it may not (see `ARCHITECTURE.md`). So an attempt
//! assigned while the present lease held has its start recorded through the
//! leader while the program runs, not before it, and a Raft commit is not
//! on the path to its start. Its start is recorded once the program has
//! run for `execution.start_report_delay_ms`: a program that ends sooner,
//! or before its start record commits, needs no separate record, because
//! its completion carries the start time. An attempt assigned before the
//! present lease began (this node was down or cut off, and is applying its
//! backlog) may have been judged lost in the gap: its start is committed
//! before its program runs, and a refusal means it does not run. The
//! completion is reported after the program ends, and every report is
//! retried until it commits or is refused (for example as stale), so a lost
//! answer never loses a result.
//! Attempts that were active on this node when it (re)started cannot be
//! running anymore (their processes died with the node), so they are
//! reported lost at once rather than after a lease period.
//!
//! A node that cannot act, because it is stopped, is fenced from outside:
//! its [`warden`] kills its tasks when the lease it last reported runs out.
//!
//! - [`process`]: running one program with its timeout and output capture.
//! - [`programs`]: finding the program a task names on `PATH`.
//! - [`protocol`]: the messages between executors and the leader.
//! - [`warden`]: the process that enforces the lease when the node cannot.

pub mod launch;
pub mod process;
pub mod programs;
pub mod protocol;
pub mod warden;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use openraft::type_config::async_runtime::WatchReceiver as _;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::ExecutionConfig;
use crate::executor::process::{AttemptEnv, RunRequest, StopReason, TaskRunner};
use crate::executor::protocol::{ExecutorReply, ExecutorRequest, Heartbeat, report_size_bytes};
use crate::executor::warden::WardenHandle;
use crate::leader::LeaderService;
use crate::platform::Clock;
use crate::proto::peer_v1::RaftMessage;
use crate::proto::peer_v1::raft_peer_client::RaftPeerClient;
use crate::raft::codec;
use crate::raft::network::PeerNetwork;
use crate::raft::{NodeId, Raft};
use crate::scheduler::{
    AttemptReport, Command, Outcome, OutcomeKind, RejectionKind, Response, Task, TaskId, TaskState,
};
use crate::storage::StateMachineStore;

/// Everything an executor needs; shared by its attempts.
pub struct Executor {
    pub node_id: NodeId,
    pub slots: u32,
    pub labels: BTreeMap<String, String>,
    pub config: ExecutionConfig,
    pub raft: Raft,
    pub state_machine: StateMachineStore,
    pub leader_service: Arc<LeaderService>,
    pub peers: PeerNetwork,
    pub rpc_timeout: Duration,
    pub shutdown: CancellationToken,
    pub clock: Arc<dyn Clock>,
    pub runner: Arc<dyn TaskRunner>,
    /// The lease from the heartbeats the leader accepted; `None` before the first.
    pub lease: std::sync::Mutex<Option<HeldLease>>,
    /// How long this executor's programs ran, lately: a moving mean in
    /// milliseconds; `None` before the first ended.
    pub run_ms_mean: std::sync::Mutex<Option<f64>>,
    pub reporter: Reporter,
    /// What this executor's attempts did since the node started, for metrics.
    pub counters: AttemptCounters,
}

/// How many attempts this executor started, and how they ended, since the
/// node started: counters that only grow, read by [`crate::metrics`].
#[derive(Debug, Default)]
pub struct AttemptCounters {
    started: AtomicU64,
    /// By `OutcomeKind as usize`.
    ended: [AtomicU64; OutcomeKind::ALL.len()],
}

impl AttemptCounters {
    fn count_start(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    fn count_end(&self, kind: OutcomeKind) {
        self.ended[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Attempts whose program this executor set out to start.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Attempts whose program ended (or failed to start) as `kind`.
    pub fn ended(&self, kind: OutcomeKind) -> u64 {
        self.ended[kind as usize].load(Ordering::Relaxed)
    }
}

/// The queue between an executor's attempts and its reporter.
pub struct Reporter {
    queue: mpsc::Sender<PendingReport>,
    /// Taken by the executor's loop when it starts the reporter.
    receiver: std::sync::Mutex<Option<mpsc::Receiver<PendingReport>>>,
}

impl Reporter {
    /// A reporter whose queue holds at most `queue_max` reports; attempts
    /// wait for room beyond that.
    pub fn new(queue_max: usize) -> Reporter {
        let (queue, receiver) = mpsc::channel(queue_max);
        Reporter { queue, receiver: std::sync::Mutex::new(Some(receiver)) }
    }
}

/// A report waiting for the leader, with whoever waits for its answer.
struct PendingReport {
    command: Command,
    answer: oneshot::Sender<Response>,
}

impl PendingReport {
    fn size_bytes(&self) -> usize {
        report_size_bytes(&self.command)
    }
}

/// The lease an executor holds.
#[derive(Debug, Clone, Copy)]
pub struct HeldLease {
    /// When the last heartbeat the leader accepted was sent: the lease runs from here.
    pub from: Instant,
    /// The leader's last log index when it accepted the first heartbeat of
    /// this unbroken lease. No leader can judge an attempt lost while its
    /// executor's lease holds, so an attempt assigned above this index
    /// cannot have been judged lost. One at or below it may have been, in a
    /// gap before this lease (the node was down, say, and is applying its
    /// backlog), so its start is committed before its program runs.
    pub unbroken_since_index: u64,
    /// How many times, since this executor started, its lease ran out
    /// before the acceptance that renewed it arrived. For those moments the
    /// lease did not hold here, so this node's fence (its own, or its
    /// warden's) may have killed attempts, even when the late acceptance
    /// left the lease unbroken in the leader's eyes.
    pub lapses: u64,
}

impl HeldLease {
    /// The lease after the leader accepted a heartbeat sent at `sent_at`,
    /// when its last log index was `last_log_index`; the acceptance arrived
    /// here at `accepted_at`.
    fn renewed(
        previous: Option<HeldLease>,
        lease: Duration,
        sent_at: Instant,
        accepted_at: Instant,
        last_log_index: u64,
    ) -> HeldLease {
        // Sent before the lease it renews ran out: the lease is unbroken.
        let unbroken_since_index = match previous {
            Some(previous) if sent_at < previous.from + lease => previous.unbroken_since_index,
            _ => last_log_index,
        };
        let lapses = match previous {
            Some(previous) if accepted_at >= previous.from + lease => previous.lapses + 1,
            Some(previous) => previous.lapses,
            None => 0,
        };
        HeldLease { from: sent_at, unbroken_since_index, lapses }
    }
}

struct RunningAttempt {
    token: u64,
    stop: Option<oneshot::Sender<StopReason>>,
}

/// The executor loop's own bookkeeping.
struct Ledger {
    running: BTreeMap<TaskId, RunningAttempt>,
    /// Attempts this executor has handled since it started, so that one is
    /// never run twice while its completion is on its way.
    handled: BTreeSet<(TaskId, u64)>,
    /// Attempts with tokens up to this index were assigned before this
    /// executor started: their processes are gone.
    boot_index: u64,
    /// `None` where tasks are not processes (a simulation).
    warden: Option<WardenHandle>,
    /// One permit per slot: an attempt holds one while its program runs.
    slot_permits: Arc<Semaphore>,
}

impl Executor {
    /// Runs until `shutdown` fires; then stops every attempt. `warden` is
    /// this node's warden, started before the node serves.
    pub async fn run(self: Arc<Self>, warden: Option<WardenHandle>) {
        let boot_index = self.state_machine.read().last_applied.map_or(0, |log_id| log_id.index());
        let mut ledger = Ledger {
            running: BTreeMap::new(),
            handled: BTreeSet::new(),
            boot_index,
            warden,
            slot_permits: Arc::new(Semaphore::new(self.slots as usize)),
        };
        let mut changes = self.state_machine.live_events();
        let attempts_max = self.slots as usize + self.prefetch_max() as usize;
        let (done_tx, mut done_rx) = mpsc::channel::<(TaskId, u64)>(attempts_max + 64);
        let heartbeat_interval = Duration::from_millis(self.config.heartbeat_interval_ms);
        let mut tick = tokio::time::interval(heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A new leader knows no executor until it hears from it, and places
        // nothing on one it has not heard from: tell it at once rather than
        // at the next tick, trying again shortly while it is still starting.
        let mut server_metrics = self.raft.server_metrics();
        let mut known_leader = server_metrics.borrow_watched().current_leader;
        let mut prompt = PromptHeartbeat::default();
        let reports = self.reporter.receiver.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(reports) = reports else {
            warn!("the executor was started twice; this run does nothing");
            return;
        };
        tokio::spawn(self.clone().run_reporter(reports).in_current_span());
        info!(
            slots = self.slots,
            prefetch_max = self.prefetch_max(),
            boot_index,
            "executor started"
        );
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tick.tick() => {
                    if self.heartbeat(&mut ledger).await {
                        prompt = PromptHeartbeat::default();
                    }
                    self.self_fence(&mut ledger);
                    self.reconcile_all(&mut ledger, &done_tx);
                }
                changed = server_metrics.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let leader = server_metrics.borrow_watched().current_leader;
                    if leader != known_leader {
                        known_leader = leader;
                        prompt = match leader {
                            Some(_) => PromptHeartbeat::now(heartbeat_interval),
                            None => PromptHeartbeat::default(),
                        };
                    }
                }
                _ = prompt.wait() => {
                    let accepted = self.heartbeat(&mut ledger).await;
                    prompt = prompt.after(accepted);
                    if accepted {
                        tick.reset();
                    }
                }
                changed = changes.recv() => match changed {
                    Ok(event) => self.reconcile(&event.task, &mut ledger, &done_tx),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.reconcile_all(&mut ledger, &done_tx),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                Some((task, token)) = done_rx.recv() => {
                    if ledger.running.get(&task).is_some_and(|running| running.token == token) {
                        ledger.running.remove(&task);
                    }
                }
            }
        }
        for (_, mut running) in std::mem::take(&mut ledger.running) {
            if let Some(stop) = running.stop.take() {
                let _ = stop.send(StopReason::Shutdown);
            }
        }
        info!("executor stopped");
    }

    /// The most attempts this executor takes beyond its slots.
    fn prefetch_max(&self) -> u32 {
        self.slots.saturating_mul(self.config.prefetch_per_slot)
    }

    /// The attempts this executor takes beyond its slots now.
    fn prefetch(&self) -> u32 {
        let run_ms_mean = *self.run_ms_mean.lock().unwrap_or_else(PoisonError::into_inner);
        prefetch_for(
            self.slots,
            self.config.prefetch_per_slot,
            self.config.prefetch_window_ms,
            run_ms_mean,
        )
    }

    /// Counts a program that ran for `run_ms` in the moving mean.
    fn record_run_time(&self, run_ms: u64) {
        let mut mean = self.run_ms_mean.lock().unwrap_or_else(PoisonError::into_inner);
        *mean = Some(moving_mean(*mean, run_ms));
    }

    /// Sends one heartbeat; whether the leader accepted it.
    async fn heartbeat(&self, ledger: &mut Ledger) -> bool {
        let heartbeat = Heartbeat {
            node_id: self.node_id,
            slots: self.slots,
            prefetch: self.prefetch(),
            labels: self.labels.clone(),
            running: ledger.running.iter().map(|(task, running)| (*task, running.token)).collect(),
        };
        let sent_at = Instant::now();
        // Bounded by one interval, so a silent leader cannot hold up self-fencing.
        let timeout = Duration::from_millis(self.config.heartbeat_interval_ms);
        match self.send(ExecutorRequest::Heartbeat(heartbeat), timeout).await {
            Ok(ExecutorReply::HeartbeatAccepted { last_log_index }) => {
                self.renew_lease(sent_at, last_log_index);
                let remaining =
                    Duration::from_millis(self.config.lease_ms).saturating_sub(sent_at.elapsed());
                // The warden's deadline trails this node's by a quarter of
                // the grace: a renewal that arrived here in time reaches it in
                // time even if this node was slow to pass it on, so the
                // warden kills only after this node's lease has run out.
                let warden_lag = Duration::from_millis(self.config.lease_grace_ms / 4);
                self.renew_warden(ledger, remaining + warden_lag, timeout).await;
                true
            }
            Ok(reply) => {
                debug!(?reply, "heartbeat not accepted");
                false
            }
            Err(err) => {
                debug!(cause = %err, "heartbeat failed");
                false
            }
        }
    }

    fn renew_lease(&self, sent_at: Instant, last_log_index: u64) {
        let lease = Duration::from_millis(self.config.lease_ms);
        let mut held = self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        *held = Some(HeldLease::renewed(*held, lease, sent_at, Instant::now(), last_log_index));
    }

    /// Passes the lease on to the warden; starts a new warden if it died.
    async fn renew_warden(&self, ledger: &mut Ledger, remaining: Duration, timeout: Duration) {
        let Some(warden) = &mut ledger.warden else { return };
        if warden.has_exited() {
            warn!("the warden exited; starting a new one");
            match WardenHandle::spawn() {
                Ok(new_warden) => *warden = new_warden,
                Err(err) => warn!(cause = %err, "cannot start a new warden"),
            }
        }
        if let Err(err) = warden.renew(remaining, timeout).await {
            warn!(cause = %err, "cannot pass the lease to the warden");
        }
    }

    /// The lease, if it holds now.
    /// Whether this executor's lease holds now, and how many times it
    /// lapsed since the node started (see [`HeldLease::lapses`]).
    pub fn lease_status(&self) -> (bool, u64) {
        let held = *self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        (self.live_lease().is_some(), held.map_or(0, |held| held.lapses))
    }

    fn live_lease(&self) -> Option<HeldLease> {
        let lease = Duration::from_millis(self.config.lease_ms);
        let held = *self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        held.filter(|held| held.from.elapsed() < lease)
    }

    fn lease_expired(&self) -> bool {
        self.live_lease().is_none()
    }

    /// Whether this node's fence may have struck since `since`, a lease
    /// that held then: the lease has run out now, or ran out in between.
    fn fenced_since(&self, since: HeldLease) -> bool {
        let held = *self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        self.lease_expired() || held.is_none_or(|held| held.lapses != since.lapses)
    }

    /// Kills every attempt when the lease has run out.
    fn self_fence(&self, ledger: &mut Ledger) {
        if !self.lease_expired() || ledger.running.is_empty() {
            return;
        }
        warn!(n_attempts = ledger.running.len(), "lease expired; killing this node's attempts");
        for running in ledger.running.values_mut() {
            if let Some(stop) = running.stop.take() {
                let _ = stop.send(StopReason::Fenced);
            }
        }
    }

    fn reconcile_all(self: &Arc<Self>, ledger: &mut Ledger, done_tx: &mpsc::Sender<(TaskId, u64)>) {
        let tasks: Vec<Task> = {
            let applied = self.state_machine.read();
            let mut tasks: Vec<Task> = applied.state.active_on(self.node_id).cloned().collect();
            tasks.extend(ledger.running.keys().filter_map(|id| applied.state.task(*id).cloned()));
            ledger.handled.retain(|(id, token)| {
                applied.state.task(*id).is_some_and(|task| {
                    task.attempts.last().is_some_and(|attempt| {
                        attempt.fencing_token == *token && attempt.outcome.is_none()
                    })
                })
            });
            tasks
        };
        for task in &tasks {
            self.reconcile(task, ledger, done_tx);
        }
    }

    /// Brings what this executor runs of `task` in line with the state.
    fn reconcile(
        self: &Arc<Self>,
        task: &Task,
        ledger: &mut Ledger,
        done_tx: &mpsc::Sender<(TaskId, u64)>,
    ) {
        let current = task.attempts.last();
        if let Some(running) = ledger.running.get_mut(&task.id) {
            let still_current = current
                .is_some_and(|attempt| attempt.fencing_token == running.token)
                && matches!(task.state, TaskState::Assigned | TaskState::Running);
            if !still_current && let Some(stop) = running.stop.take() {
                let reason = if task.state == TaskState::Cancelled {
                    StopReason::Cancelled
                } else {
                    StopReason::Fenced
                };
                // The program may have ended already, its completion being
                // what made the attempt no longer current: then nobody
                // receives the stop, and nothing was stopped.
                if stop.send(reason).is_ok() {
                    info!(task_id = %task.id, ?reason, "stopping an attempt that is no longer current");
                }
            }
            return;
        }
        let Some(attempt) = current else { return };
        let mine = attempt.node_id == self.node_id && attempt.outcome.is_none();
        if !mine || !matches!(task.state, TaskState::Assigned | TaskState::Running) {
            return;
        }
        let key = (task.id, attempt.fencing_token);
        if !ledger.handled.insert(key) {
            return;
        }
        let executor = self.clone();
        let span = info_span!("attempt", task_id = %task.id, attempt = attempt.number, token = attempt.fencing_token);
        if attempt.fencing_token <= ledger.boot_index || task.state == TaskState::Running {
            // Its process died with this node's previous run.
            let command = lost_report(
                self.clock.unix_now_ms(),
                task.id,
                attempt.fencing_token,
                "the node restarted while this attempt was active",
            );
            tokio::spawn(async move { executor.report(command).await }.instrument(span));
            return;
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        ledger
            .running
            .insert(task.id, RunningAttempt { token: attempt.fencing_token, stop: Some(stop_tx) });
        let task = task.clone();
        let done_tx = done_tx.clone();
        let slot_permits = ledger.slot_permits.clone();
        tokio::spawn(
            async move {
                let token = task.attempts.last().map_or(0, |attempt| attempt.fencing_token);
                executor.run_attempt(&task, slot_permits, stop_rx).await;
                let _ = done_tx.send((task.id, token)).await;
            }
            .instrument(span),
        );
    }

    /// Waits for a slot, runs the program while recording its start, then
    /// records the end.
    ///
    /// The program starts only while this executor's lease holds, checked
    /// once the slot is free: once the lease has run out the leader may
    /// already have handed the task to another node, so the attempt is
    /// reported lost instead of run.
    async fn run_attempt(
        &self,
        task: &Task,
        slot_permits: Arc<Semaphore>,
        mut stop: oneshot::Receiver<StopReason>,
    ) {
        let attempt = task.attempts.last().expect("an assigned task has an attempt");
        let token = attempt.fencing_token;
        let slot = tokio::select! {
            slot = slot_permits.acquire_owned() => slot,
            reason = &mut stop => {
                // Stopped while queued: the program never ran. A node that
                // shuts down leaves the attempt to be judged lost.
                let reason = reason.unwrap_or(StopReason::Shutdown);
                if !matches!(reason, StopReason::Shutdown) {
                    info!(?reason, "the attempt was stopped before its program started");
                    let why = format!("stopped before the program started: {reason:?}");
                    self.report(lost_report(self.clock.unix_now_ms(), task.id, token, &why)).await;
                }
                return;
            }
        };
        let Ok(slot) = slot else {
            return; // The semaphore is never closed; nothing to run on.
        };
        let Some(lease) = self.live_lease() else {
            return self.report_expired_before_start(task.id, token).await;
        };
        let start_recorded_first = token <= lease.unbroken_since_index;
        if start_recorded_first {
            // Assigned before this lease began: it may have been judged lost
            // meanwhile, and only the start's commit can tell.
            let start =
                Command::StartAttempt { now_ms: self.clock.unix_now_ms(), task: task.id, token };
            match self.report(start).await {
                Some(Response::Attempt(_)) => {}
                Some(other) => {
                    info!(answer = ?other, "the attempt may not start");
                    return;
                }
                None => return,
            }
            if self.lease_expired() {
                return self.report_expired_before_start(task.id, token).await;
            }
        }
        let started_at_ms = self.clock.unix_now_ms();
        info!(program = %task.spec.command.program, "attempt started");
        self.counters.count_start();
        let env = AttemptEnv {
            task_id: task.id.0,
            attempt_number: attempt.number,
            fencing_token: token,
            node_id: self.node_id,
        };
        let request = RunRequest {
            command: task.spec.command.clone(),
            env,
            timeout: Duration::from_millis(task.spec.timeout_ms),
            output_tail_bytes_max: self.config.output_tail_bytes_max,
        };
        let run = self.runner.run(request, stop);
        // A program that ends within the delay is recorded once, by its
        // completion: short tasks cost one report, not two.
        let start_report_delay = Duration::from_millis(self.config.start_report_delay_ms);
        let start_record = async {
            if !start_report_delay.is_zero() {
                tokio::time::sleep(start_report_delay).await;
            }
            self.report(Command::StartAttempt { now_ms: started_at_ms, task: task.id, token }).await
        };
        tokio::pin!(run, start_record);
        let mut start_recorded = start_recorded_first;
        let result = loop {
            tokio::select! {
                biased;
                result = &mut run => break result,
                answer = &mut start_record, if !start_recorded => {
                    start_recorded = true;
                    match answer {
                        Some(Response::Attempt(_)) | None => {}
                        // The state moved on (cancelled, or re-assigned after
                        // a lease ran out): the executor's reconciliation
                        // stops the program when this node applies that.
                        Some(other) => info!(answer = ?other, "the start was not recorded"),
                    }
                }
            }
        };
        // A program that ended first needs no start record: dropping it
        // cancels its delay or stops its retries, and the completion
        // carries `started_at_ms`.
        drop(slot);
        let outcome = match result.outcome {
            // The warden killed it because the lease ran out while this node
            // could not act: the attempt is lost, not failed by a signal.
            // The lease may hold again by now (an acceptance that was on its
            // way when it ran out), so every lapse since the start counts.
            Outcome::Signalled { signal }
                if signal == libc_sigkill() && self.fenced_since(lease) =>
            {
                Outcome::Lost
            }
            outcome => outcome,
        };
        info!(?outcome, "attempt ended");
        self.counters.count_end(outcome.kind());
        let ended_at_ms = self.clock.unix_now_ms();
        self.record_run_time(ended_at_ms.saturating_sub(started_at_ms));
        let report = AttemptReport {
            started_at_ms: Some(started_at_ms),
            ended_at_ms,
            outcome,
            stdout_tail: result.stdout_tail,
            stderr_tail: result.stderr_tail,
        };
        self.report(Command::CompleteAttempt {
            now_ms: self.clock.unix_now_ms(),
            task: task.id,
            token,
            report,
        })
        .await;
    }

    async fn report_expired_before_start(&self, task: TaskId, token: u64) {
        warn!("the lease ran out before the program could start; reporting the attempt lost");
        let why = "the executor's lease ran out before the program started";
        self.report(lost_report(self.clock.unix_now_ms(), task, token, why)).await;
    }

    /// Queues a report for the reporter and waits until it is committed or
    /// refused; `None` on shutdown. Dropping the future withdraws the report
    /// if it has not been sent yet.
    async fn report(&self, command: Command) -> Option<Response> {
        let (answer, answered) = oneshot::channel();
        tokio::select! {
            queued = self.reporter.queue.send(PendingReport { command, answer }) => queued.ok()?,
            _ = self.shutdown.cancelled() => return None,
        }
        answered.await.ok()
    }

    /// Sends queued reports to the leader, as many at a time as have queued
    /// while the previous batch was on its way, up to the batch limits.
    async fn run_reporter(self: Arc<Self>, mut queue: mpsc::Receiver<PendingReport>) {
        loop {
            let first = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                first = queue.recv() => match first {
                    Some(first) => first,
                    None => return,
                },
            };
            let mut batch_bytes = first.size_bytes();
            let mut batch = vec![first];
            while batch.len() < self.config.report_batch_max
                && batch_bytes < self.config.report_batch_bytes_max
            {
                match queue.try_recv() {
                    Ok(pending) => {
                        batch_bytes += pending.size_bytes();
                        batch.push(pending);
                    }
                    Err(_) => break,
                }
            }
            self.send_reports(batch).await;
        }
    }

    /// Sends one batch until it is committed or refused, or on shutdown.
    async fn send_reports(&self, mut batch: Vec<PendingReport>) {
        let mut backoff_ms = 50;
        loop {
            // Nobody waits for a withdrawn report (the start record of a
            // program that has ended already): it is not sent.
            batch.retain(|pending| !pending.answer.is_closed());
            if batch.is_empty() {
                return;
            }
            let commands = batch.iter().map(|pending| pending.command.clone()).collect();
            match self.send(ExecutorRequest::Reports(commands), self.rpc_timeout).await {
                Ok(ExecutorReply::Applied(Response::Reports(answers)))
                    if answers.len() == batch.len() =>
                {
                    for (pending, answer) in batch.into_iter().zip(answers) {
                        if let Response::Rejected(rejection) = &answer
                            && let Some((task_id, token)) = pending.command.reported_attempt()
                        {
                            if rejection.kind == RejectionKind::Stale {
                                info!(%task_id, token, cause = %rejection, "report refused as stale");
                            } else {
                                warn!(%task_id, token, cause = %rejection, "report refused");
                            }
                        }
                        let _ = pending.answer.send(answer);
                    }
                    return;
                }
                Ok(reply) => debug!(?reply, n_reports = batch.len(), "reports not committed yet"),
                Err(err) => debug!(cause = %err, n_reports = batch.len(), "reports failed"),
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
            }
            backoff_ms = (backoff_ms * 2).min(1_000);
        }
    }

    /// Sends a request to the current leader, which may be this node.
    async fn send(
        &self,
        request: ExecutorRequest,
        timeout: Duration,
    ) -> Result<ExecutorReply, String> {
        let leader = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow_watched();
            let leader_id = metrics.current_leader.ok_or("no leader is known")?;
            let node = metrics.membership_config.membership().get_node(&leader_id).cloned();
            (leader_id, node)
        };
        if leader.0 == self.node_id {
            return tokio::time::timeout(timeout, self.leader_service.handle(request))
                .await
                .map_err(|_| "the local leader did not answer in time".to_owned());
        }
        let node = leader.1.ok_or("the leader is not in the membership")?;
        let channel = self.peers.channel(&node.raft_addr)?;
        let mut grpc_request = tonic::Request::new(RaftMessage { data: codec::encode(&request) });
        grpc_request.set_timeout(timeout);
        let reply =
            tokio::time::timeout(timeout, RaftPeerClient::new(channel).executor(grpc_request))
                .await
                .map_err(|_| format!("leader {} did not answer in time", leader.0))?
                .map_err(|status| status.message().to_owned())?;
        codec::decode("executor reply", &reply.into_inner().data).map_err(|err| err.to_string())
    }
}

/// How many times an executor tries a heartbeat promptly after it learns of
/// a new leader, before it leaves the rest to its regular tick.
const PROMPT_HEARTBEAT_TRIES_MAX: u32 = 8;

/// The heartbeats an executor sends outside its tick after the leader
/// changed: the first at once, then one every tenth of the heartbeat
/// interval until one is accepted or [`PROMPT_HEARTBEAT_TRIES_MAX`] were
/// sent (a new leader refuses heartbeats until its scheduling loop runs and
/// a majority has acknowledged it).
#[derive(Debug, Default)]
struct PromptHeartbeat {
    /// When to send the next one; `None` when none is due.
    at: Option<Instant>,
    tries_left: u32,
    retry_in: Duration,
}

impl PromptHeartbeat {
    fn now(heartbeat_interval: Duration) -> PromptHeartbeat {
        PromptHeartbeat {
            at: Some(Instant::now()),
            tries_left: PROMPT_HEARTBEAT_TRIES_MAX,
            retry_in: heartbeat_interval / 10,
        }
    }

    /// Waits until the next one is due; forever if none is.
    async fn wait(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// What follows a prompt heartbeat that was `accepted` or not.
    fn after(self, accepted: bool) -> PromptHeartbeat {
        let tries_left = self.tries_left.saturating_sub(1);
        if accepted || tries_left == 0 {
            return PromptHeartbeat::default();
        }
        PromptHeartbeat { at: Some(Instant::now() + self.retry_in), tries_left, ..self }
    }
}

/// The weight of the newest run time in [`moving_mean`]: a fifth, so a few
/// long runs after many short ones move the mean most of the way.
const RUN_TIME_WEIGHT: f64 = 0.2;

/// The moving mean of run times after one more run of `run_ms`.
fn moving_mean(mean_ms: Option<f64>, run_ms: u64) -> f64 {
    let run_ms = run_ms as f64;
    match mean_ms {
        None => run_ms,
        Some(mean_ms) => mean_ms + RUN_TIME_WEIGHT * (run_ms - mean_ms),
    }
}

/// The attempts an executor with `slots` slots takes beyond them: what its
/// slots would run in `window_ms` if each ran `run_ms_mean`, at most
/// `per_slot_max` per slot. With no run time yet it takes none; with a
/// window of 0, always the most. Run times under a millisecond count as one.
pub fn prefetch_for(
    slots: u32,
    per_slot_max: u32,
    window_ms: u64,
    run_ms_mean: Option<f64>,
) -> u32 {
    let most = slots.saturating_mul(per_slot_max);
    if window_ms == 0 {
        return most;
    }
    let Some(run_ms_mean) = run_ms_mean else { return 0 };
    let fits = (f64::from(slots) * window_ms as f64 / run_ms_mean.max(1.0)).floor();
    if fits >= f64::from(most) { most } else { fits as u32 }
}

fn libc_sigkill() -> i32 {
    nix::sys::signal::Signal::SIGKILL as i32
}

fn lost_report(now_ms: u64, task: TaskId, token: u64, why: &str) -> Command {
    let report = AttemptReport {
        started_at_ms: None,
        ended_at_ms: now_ms,
        outcome: Outcome::Lost,
        stdout_tail: String::new(),
        stderr_tail: why.into(),
    };
    Command::CompleteAttempt { now_ms, task, token, report }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_heartbeats_stop_at_the_first_accepted_or_after_the_most_tries() {
        let interval = Duration::from_millis(300);
        let accepted = PromptHeartbeat::now(interval).after(true);
        assert!(accepted.at.is_none(), "accepted at once: nothing more is due");

        let mut prompt = PromptHeartbeat::now(interval);
        let mut n_sent = 0;
        while let Some(at) = prompt.at {
            n_sent += 1;
            let before = Instant::now();
            prompt = prompt.after(false);
            if let Some(next) = prompt.at {
                let retry_in = next - before;
                assert!(next >= at && retry_in >= Duration::from_millis(30), "a tenth apart");
                assert!(retry_in < Duration::from_millis(300), "well before the tick");
            }
        }
        assert_eq!(n_sent, PROMPT_HEARTBEAT_TRIES_MAX, "then the regular tick takes over");
        assert!(PromptHeartbeat::default().at.is_none(), "none is due without a new leader");
    }

    #[test]
    fn prefetch_fills_the_window_by_recent_run_times_within_its_limit() {
        // Two slots, at most 16 each, a 50 ms window.
        let prefetch = |mean| prefetch_for(2, 16, 50, mean);
        assert_eq!(prefetch(None), 0, "nothing before the first run time");
        assert_eq!(prefetch(Some(0.3)), 32, "sub-millisecond runs count as 1 ms; capped");
        assert_eq!(prefetch(Some(5.0)), 20, "two slots run 20 tasks of 5 ms in 50 ms");
        assert_eq!(prefetch(Some(40.0)), 2);
        assert_eq!(prefetch(Some(100.0)), 1);
        assert_eq!(prefetch(Some(101.0)), 0, "long tasks are not queued on a busy node");
        assert_eq!(prefetch_for(2, 16, 0, None), 32, "a window of 0 always takes the most");
        assert_eq!(prefetch_for(2, 0, 50, Some(1.0)), 0, "0 per slot turns it off");
        assert_eq!(prefetch_for(u32::MAX, 64, 3_000, Some(1.0)), u32::MAX, "saturates");
    }

    #[test]
    fn the_run_time_mean_follows_a_change_within_a_few_runs() {
        let mut mean = None;
        for _ in 0..100 {
            mean = Some(moving_mean(mean, 1));
        }
        assert_eq!(mean, Some(1.0));
        // Ten-second tasks after a hundred of 1 ms: the first stops prefetch.
        let after_one_long = moving_mean(mean, 10_000);
        assert!(after_one_long > 1_000.0, "{after_one_long}");
        assert_eq!(prefetch_for(2, 16, 50, Some(after_one_long)), 0);
    }

    #[test]
    fn a_lease_stays_unbroken_only_while_each_heartbeat_is_sent_within_the_last_lease() {
        let lease = Duration::from_millis(3_000);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let first = HeldLease::renewed(None, lease, t0, t0 + ms(5), 10);
        assert_eq!(first.unbroken_since_index, 10, "the first lease starts at the leader's index");
        let renewed = HeldLease::renewed(Some(first), lease, t0 + ms(2_999), t0 + ms(2_999), 50);
        assert_eq!(renewed.unbroken_since_index, 10, "renewed in time: the same unbroken lease");
        assert_eq!(renewed.from, t0 + ms(2_999));
        let after_gap = HeldLease::renewed(
            Some(renewed),
            lease,
            renewed.from + lease,
            renewed.from + lease,
            90,
        );
        assert_eq!(after_gap.unbroken_since_index, 90, "renewed after it ran out: a new lease");
    }

    #[test]
    fn a_renewal_that_arrives_after_the_lease_ran_out_counts_a_lapse_though_the_lease_is_unbroken()
    {
        let lease = Duration::from_millis(3_000);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let first = HeldLease::renewed(None, lease, t0, t0 + ms(5), 10);
        assert_eq!(first.lapses, 0);
        let in_time = HeldLease::renewed(Some(first), lease, t0 + ms(300), t0 + ms(2_999), 20);
        assert_eq!(in_time.lapses, 0, "accepted before the lease ran out: no lapse");
        // Sent 2.9 s into the lease, accepted 0.4 s later: for 0.3 s the
        // lease did not hold here, and the fence may have struck.
        let sent_at = in_time.from + ms(2_900);
        let late = HeldLease::renewed(Some(in_time), lease, sent_at, sent_at + ms(400), 30);
        assert_eq!(late.unbroken_since_index, 10, "sent in time: unbroken for the leader");
        assert_eq!(late.lapses, 1, "accepted after it ran out: a lapse here");
        let after_gap =
            HeldLease::renewed(Some(late), lease, late.from + ms(5_000), late.from + ms(5_001), 40);
        assert_eq!(after_gap.lapses, 2, "a renewal after a gap is a lapse too");
    }
}
