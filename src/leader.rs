//! The leader's scheduling loop, and the endpoint executors report to.
//!
//! The loop runs only while this node is the committed leader: openraft's
//! `on_leader_change` starts it and stops it, and every write it makes is
//! fenced to its own leadership (`write().with_leader(..)`). Each round it
//! promotes delayed tasks that are due, re-queues attempts whose executors'
//! leases ran out, places ready tasks on executors with free slots, and now
//! and then purges finished tasks past their retention or their count. Between rounds it
//! sleeps until the earliest of: a change to the state, a heartbeat, the next
//! run-at time, the next lease expiry, the next purge. It never polls.
//!
//! Executors reach the leader through [`LeaderService::handle`]: heartbeats
//! renew their leases in the loop's [`LeaseTable`]; start and completion
//! reports are committed through Raft, where `apply` fences them by token.
//! One report writer per leadership commits them: the requests of every
//! node's executor that arrive while one entry is being written go into the
//! next entry together, so a busy cluster writes one report entry per commit
//! rather than one per node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use openraft::Instant as _;
use openraft::impls::ProgressResponder;
use openraft::type_config::async_runtime::WatchReceiver as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::ExecutionConfig;
use crate::executor::protocol::{
    ExecutorReply, ExecutorRequest, Heartbeat, REPORTS_PER_REQUEST_MAX, report_size_bytes,
};
use crate::platform::Clock;
use crate::raft::network::PeerAcks;
use crate::raft::{NodeId, Raft, TypeConfig};
use crate::scheduler::command::Placement;
use crate::scheduler::lease::LeaseTable;
use crate::scheduler::policy::{ExecutorCapacity, PlacementCursor, plan};
use crate::scheduler::{Command, Response};
use crate::storage::StateMachineStore;

type LeaderId = openraft::alias::LeaderIdOf<TypeConfig>;

/// The leader's latest view of its live executors, for submissions to carry
/// ([`Command::SubmitAndPlace`]): the scheduling loop renews it every round
/// and clears it when it stops; the API reads it. A view is used for one
/// executor heartbeat interval at most: the loop renews it at least that
/// often while it runs, since every heartbeat starts a round.
#[derive(Clone, Default)]
pub struct PlacementView(Arc<Mutex<Option<PublishedView>>>);

struct PublishedView {
    placement: Placement,
    until: Instant,
}

impl PlacementView {
    /// The view to propose a submission with, if this node leads and its
    /// loop renewed the view recently.
    pub fn current(&self) -> Option<Placement> {
        let view = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        view.as_ref()
            .filter(|view| Instant::now() < view.until && !view.placement.executors.is_empty())
            .map(|view| view.placement.clone())
    }

    fn publish(&self, view: Option<PublishedView>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = view;
    }
}

/// Starts and stops the loop, and answers executors.
pub struct LeaderService {
    node_id: NodeId,
    raft: Raft,
    state_machine: StateMachineStore,
    config: ExecutionConfig,
    request_timeout: Duration,
    /// A leader renews leases only if a majority acknowledged it recently.
    quorum: QuorumWatch,
    clock: Arc<dyn Clock>,
    current: Mutex<Option<RunningLoop>>,
    placement_view: PlacementView,
    /// The limit on tasks not yet terminal that fires of periodic tasks keep to.
    queued_tasks_max: u64,
}

struct RunningLoop {
    leader_id: LeaderId,
    heartbeats: mpsc::Sender<(Heartbeat, Instant)>,
    reports: mpsc::Sender<QueuedReports>,
    cancel: CancellationToken,
}

/// How the leader tells that a majority still follows it: the peers'
/// acknowledgements, and how recent a majority's must be.
pub struct QuorumWatch {
    pub acks: PeerAcks,
    pub fresh: Duration,
}

impl QuorumWatch {
    /// Whether node `me` may count itself acknowledged by a majority at
    /// `now`: the peer clients' record ([`PeerAcks`], over every config in
    /// `configs`) and openraft's `last_quorum_acked` (`openraft_acked_ago`,
    /// `None` if it has none) must both be within `fresh`.
    fn is_fresh(
        &self,
        me: NodeId,
        now: Instant,
        openraft_acked_ago: Option<Duration>,
        configs: &[BTreeSet<NodeId>],
    ) -> bool {
        let openraft_agrees = openraft_acked_ago.is_some_and(|ago| ago <= self.fresh);
        let acked_at = self.acks.quorum_acked_at(me, now, configs);
        openraft_agrees && acked_at.is_some_and(|acked| now.duration_since(acked) <= self.fresh)
    }
}

impl LeaderService {
    pub fn new(
        node_id: NodeId,
        raft: Raft,
        state_machine: StateMachineStore,
        config: ExecutionConfig,
        request_timeout: Duration,
        quorum: QuorumWatch,
        clock: Arc<dyn Clock>,
    ) -> LeaderService {
        LeaderService {
            node_id,
            raft,
            state_machine,
            config,
            request_timeout,
            quorum,
            clock,
            current: Mutex::new(None),
            placement_view: PlacementView::default(),
            queued_tasks_max: crate::scheduler::Limits::default().queued_tasks_max,
        }
    }

    /// Sets the node's limit on tasks not yet terminal, which the fires of
    /// periodic tasks keep to as submissions do.
    pub fn with_queued_tasks_max(mut self, queued_tasks_max: u64) -> LeaderService {
        self.queued_tasks_max = queued_tasks_max;
        self
    }

    /// The view the API proposes submissions with.
    pub fn placement_view(&self) -> PlacementView {
        self.placement_view.clone()
    }

    /// Whether a majority acknowledged this leader within `quorum_fresh`. An
    /// isolated leader keeps believing it leads until it hears of a newer
    /// term; it must not keep its own executor's lease alive meanwhile, or
    /// that executor would never fence itself while the majority's new leader
    /// re-runs its attempts.
    ///
    /// The acknowledgements are the peer clients' own ([`PeerAcks`]), each
    /// dated by the send time of the request it answered; openraft's
    /// `last_quorum_acked` must agree as well.
    fn quorum_is_fresh(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        let openraft_acked_ago = metrics.last_quorum_acked.as_ref().map(|acked| acked.elapsed());
        let configs = metrics.membership_config.membership().get_joint_config();
        self.quorum.is_fresh(self.node_id, Instant::now(), openraft_acked_ago, configs)
    }

    /// Called when this node becomes the committed leader `leader_id`.
    pub fn start(self: &Arc<Self>, leader_id: LeaderId) {
        let mut current = self.current.lock().expect("leader loop lock poisoned");
        if let Some(previous) = current.take() {
            previous.cancel.cancel();
        }
        let (heartbeats, heartbeat_rx) = mpsc::channel(self.config.leader_heartbeats_queued_max);
        let cancel = CancellationToken::new();
        info!(%leader_id, "starting the scheduling loop");
        let scheduling = SchedulingLoop {
            service: self.clone(),
            leader_id,
            leases: LeaseTable::new(0, self.config.lease_ms, self.config.lease_grace_ms),
            executors: BTreeMap::new(),
            cursor: PlacementCursor::default(),
            started_at: Instant::now(),
            next_purge_at: Instant::now(),
        };
        let span = info_span!("scheduling_loop", node_id = self.node_id);
        tokio::spawn(scheduling.run(heartbeat_rx, cancel.clone()).instrument(span));
        let (reports, report_rx) = mpsc::channel(self.config.leader_report_requests_queued_max);
        let span = info_span!("report_writer", node_id = self.node_id);
        let writer = write_reports(self.clone(), leader_id, report_rx, cancel.clone());
        tokio::spawn(writer.instrument(span));
        *current = Some(RunningLoop { leader_id, heartbeats, reports, cancel });
    }

    /// Called when this node stops being the leader `leader_id`.
    pub fn stop(&self, leader_id: LeaderId) {
        let mut current = self.current.lock().expect("leader loop lock poisoned");
        if current.as_ref().is_some_and(|running| running.leader_id == leader_id) {
            info!(%leader_id, "stopping the scheduling loop");
            if let Some(running) = current.take() {
                running.cancel.cancel();
            }
            self.placement_view.publish(None);
        }
    }

    pub fn shutdown(&self) {
        if let Some(running) = self.current.lock().expect("leader loop lock poisoned").take() {
            running.cancel.cancel();
        }
        self.placement_view.publish(None);
    }

    fn not_leader(&self) -> ExecutorReply {
        ExecutorReply::NotLeader { leader_id: self.raft.metrics().borrow_watched().current_leader }
    }

    /// Answers one executor request.
    pub async fn handle(&self, request: ExecutorRequest) -> ExecutorReply {
        let leader = {
            let current = self.current.lock().expect("leader loop lock poisoned");
            current.as_ref().map(|running| (running.heartbeats.clone(), running.reports.clone()))
        };
        let Some((heartbeats, report_queue)) = leader else {
            return self.not_leader();
        };
        match request {
            ExecutorRequest::Heartbeat(_) if !self.quorum_is_fresh() => ExecutorReply::Unavailable(
                "the leader has not heard from a majority recently; the lease is not renewed"
                    .into(),
            ),
            ExecutorRequest::Heartbeat(heartbeat) => {
                match heartbeats.try_send((heartbeat, Instant::now())) {
                    Ok(()) => ExecutorReply::HeartbeatAccepted {
                        // Read after the heartbeat counts, so never too low.
                        last_log_index: self
                            .raft
                            .metrics()
                            .borrow_watched()
                            .last_log_index
                            .unwrap_or(0),
                    },
                    // Accepting a heartbeat the loop never sees would let the
                    // executor believe in a lease the leader does not know of.
                    Err(_) => ExecutorReply::Unavailable(
                        "the leader is busy; heartbeat not recorded".into(),
                    ),
                }
            }
            ExecutorRequest::Reports(reports) => {
                if let Err(refusal) = check_reports(&reports) {
                    return ExecutorReply::Unavailable(refusal);
                }
                let (answer, answered) = oneshot::channel();
                let queued = QueuedReports { reports, answer };
                match tokio::time::timeout(self.request_timeout, report_queue.send(queued)).await {
                    Ok(Ok(())) => {}
                    // The writer stopped with this leadership.
                    Ok(Err(_)) => return self.not_leader(),
                    Err(_) => {
                        return ExecutorReply::Unavailable(
                            "the leader's report queue stayed full".into(),
                        );
                    }
                }
                match answered.await {
                    Ok(Ok(answers)) => ExecutorReply::Applied(Response::Reports(answers)),
                    Ok(Err(WriteFailed::Other(message))) => ExecutorReply::Unavailable(message),
                    Ok(Err(WriteFailed::NotLeader)) | Err(_) => self.not_leader(),
                }
            }
        }
    }
}

/// One executor's request of reports, waiting for the report writer.
struct QueuedReports {
    reports: Vec<Command>,
    answer: oneshot::Sender<Result<Vec<Response>, WriteFailed>>,
}

/// The requests the report writer commits as one entry.
struct ReportBatch {
    requests: Vec<QueuedReports>,
    n_reports: usize,
    size_bytes: usize,
}

impl ReportBatch {
    fn new(first: QueuedReports) -> ReportBatch {
        let n_reports = first.reports.len();
        let size_bytes = first.reports.iter().map(report_size_bytes).sum();
        ReportBatch { requests: vec![first], n_reports, size_bytes }
    }

    /// Adds `next` if the batch then holds at most `reports_max` reports of
    /// at most `size_bytes_max`; gives it back if not. The first request is
    /// always taken, whatever its size: it was checked on its own.
    fn try_add(
        &mut self,
        next: QueuedReports,
        reports_max: usize,
        size_bytes_max: usize,
    ) -> Result<(), QueuedReports> {
        let size_bytes: usize = next.reports.iter().map(report_size_bytes).sum();
        if self.n_reports + next.reports.len() > reports_max
            || self.size_bytes + size_bytes > size_bytes_max
        {
            return Err(next);
        }
        self.n_reports += next.reports.len();
        self.size_bytes += size_bytes;
        self.requests.push(next);
        Ok(())
    }

    /// The reports of every request in order, and who waits for how many
    /// of their answers.
    fn into_entry(self) -> (Vec<Command>, AnswersTo) {
        let mut reports = Vec::with_capacity(self.n_reports);
        let mut answers_to = Vec::with_capacity(self.requests.len());
        for request in self.requests {
            answers_to.push((request.reports.len(), request.answer));
            reports.extend(request.reports);
        }
        (reports, answers_to)
    }
}

/// Commits executors' reports while `leader_id` leads, one entry at a time,
/// each holding every request that queued while the one before was written
/// (within the batch limits). Each request gets its own reports' answers.
async fn write_reports(
    service: Arc<LeaderService>,
    leader_id: LeaderId,
    mut queue: mpsc::Receiver<QueuedReports>,
    cancel: CancellationToken,
) {
    let size_bytes_max = service.config.report_batch_bytes_max;
    let mut held_back: Option<QueuedReports> = None;
    loop {
        let first = match held_back.take() {
            Some(first) => first,
            None => tokio::select! {
                _ = cancel.cancelled() => return,
                first = queue.recv() => match first {
                    Some(first) => first,
                    None => return,
                },
            },
        };
        let mut batch = ReportBatch::new(first);
        while let Ok(next) = queue.try_recv() {
            if let Err(next) = batch.try_add(next, REPORTS_PER_REQUEST_MAX, size_bytes_max) {
                held_back = Some(next);
                break;
            }
        }
        let (reports, answers_to) = batch.into_entry();
        let n_reports = reports.len();
        let command = Command::Reports { reports };
        let timeout = service.request_timeout;
        let written = tokio::select! {
            // The requests' answer channels close: their executors retry.
            _ = cancel.cancelled() => return,
            written = fenced_write(&service.raft, leader_id, command, timeout) => written,
        };
        let answers = match written {
            Ok(Response::Reports(answers)) if answers.len() == n_reports => {
                let n_stale = answers
                    .iter()
                    .filter(|answer| {
                        matches!(answer, Response::Rejected(rejection)
                            if rejection.kind == crate::scheduler::RejectionKind::Stale)
                    })
                    .count();
                if n_stale > 0 {
                    info!(n_stale, n_reports, "refused reports from stale attempts");
                }
                Ok(answers)
            }
            Ok(other) => Err(WriteFailed::Other(format!(
                "the leader answered {n_reports} reports with {other:?}"
            ))),
            Err(failed) => Err(failed),
        };
        answer_each(answers, answers_to);
    }
}

/// Who waits for how many of an entry's answers, in the entry's order.
type AnswersTo = Vec<(usize, oneshot::Sender<Result<Vec<Response>, WriteFailed>>)>;

/// Gives each request its own answers, `answers` being in the order of the
/// requests' reports; or the same failure to each.
fn answer_each(answers: Result<Vec<Response>, WriteFailed>, answers_to: AnswersTo) {
    match answers {
        Ok(answers) => {
            let mut answers = answers.into_iter();
            for (n, answer) in answers_to {
                let _ = answer.send(Ok(answers.by_ref().take(n).collect()));
            }
        }
        Err(failed) => {
            for (_, answer) in answers_to {
                let _ = answer.send(Err(failed.clone()));
            }
        }
    }
}

/// Refuses a batch an executor may not send: empty, too large, or holding
/// anything but reports.
fn check_reports(reports: &[Command]) -> Result<(), String> {
    if reports.is_empty() || reports.len() > REPORTS_PER_REQUEST_MAX {
        return Err(format!(
            "a request carries 1 to {REPORTS_PER_REQUEST_MAX} reports, not {}",
            reports.len()
        ));
    }
    match reports.iter().find(|command| command.reported_attempt().is_none()) {
        Some(command) => Err(format!("executors may not propose {command}")),
        None => Ok(()),
    }
}

#[derive(Debug, Clone)]
enum WriteFailed {
    NotLeader,
    Other(String),
}

/// Proposes `command` only if `leader_id` still leads, and waits until applied.
async fn fenced_write(
    raft: &Raft,
    leader_id: LeaderId,
    command: Command,
    timeout: Duration,
) -> Result<Response, WriteFailed> {
    // A refusal for a lapsed leader lease is not retried here, unlike a
    // client's write: the loop's commands are judgements (an executor's
    // lease expired) that must be made again on fresh heartbeats, not
    // committed seconds after they were made.
    let (responder, applied) = ProgressResponder::complete_only();
    let write = async {
        raft.write(command)
            .with_leader(leader_id)
            .responder(responder)
            .await
            .map_err(|fatal| WriteFailed::Other(format!("raft has stopped: {fatal}")))?;
        match applied.await {
            Ok(Ok(written)) => Ok(written.data),
            Ok(Err(openraft::error::ClientWriteError::ForwardToLeader(forward))) => {
                debug!(%forward, "a fenced write found another leader or a lapsed lease");
                Err(WriteFailed::NotLeader)
            }
            Ok(Err(err)) => Err(WriteFailed::Other(err.to_string())),
            Err(_) => Err(WriteFailed::Other("the write was dropped".into())),
        }
    };
    tokio::time::timeout(timeout, write).await.unwrap_or_else(|_| {
        Err(WriteFailed::Other(format!("the write did not commit within {timeout:?}")))
    })
}

struct SchedulingLoop {
    service: Arc<LeaderService>,
    leader_id: LeaderId,
    leases: LeaseTable,
    /// What each executor said in its last heartbeat.
    executors: BTreeMap<NodeId, ExecutorCapacity>,
    cursor: PlacementCursor,
    /// The loop's monotonic clock starts here; leases are measured on it.
    started_at: Instant,
    next_purge_at: Instant,
}

/// What one round decided, from one consistent read of the state.
struct Round {
    commands: Vec<Command>,
    /// When the loop must look again even if nothing happens.
    wake_in: Duration,
}

impl SchedulingLoop {
    fn now_mono_ms(&self) -> u64 {
        self.started_at.elapsed().as_millis() as u64
    }

    fn record(&mut self, heartbeat: Heartbeat, received_at: Instant) {
        let received_ms = received_at.saturating_duration_since(self.started_at).as_millis() as u64;
        self.leases.renew(heartbeat.node_id, received_ms);
        let capacity = ExecutorCapacity {
            node_id: heartbeat.node_id,
            slots: heartbeat.slots,
            prefetch: heartbeat.prefetch,
            labels: heartbeat.labels,
        };
        self.executors.insert(heartbeat.node_id, capacity);
    }

    fn plan_round(&mut self) -> Round {
        let config = &self.service.config;
        let now_ms = self.service.clock.unix_now_ms();
        let now_mono_ms = self.now_mono_ms();
        let applied = self.service.state_machine.read();
        let state = &applied.state;
        let mut commands = Vec::new();
        // First, so that what fires is placed in this round.
        if state.next_periodic_fire_ms().is_some_and(|fire_ms| fire_ms <= now_ms) {
            commands.push(Command::FirePeriodic {
                now_ms,
                queued_tasks_max: self.service.queued_tasks_max,
            });
        }
        if state.next_pending_run_at_ms().is_some_and(|run_at_ms| run_at_ms <= now_ms) {
            commands.push(Command::PromoteDue { now_ms });
        }
        let lost = self.leases.lost_attempts(state, now_mono_ms);
        if !lost.is_empty() {
            warn!(n_lost = lost.len(), "executor leases ran out; re-queueing their attempts");
            commands.push(Command::RequeueLost { now_ms, lost });
        }
        let live: Vec<ExecutorCapacity> = self
            .executors
            .values()
            .filter(|capacity| self.leases.is_live(capacity.node_id, now_mono_ms))
            .cloned()
            .collect();
        let assignments = plan(state, &live, config.assign_batch_max, &mut self.cursor);
        if !assignments.is_empty() {
            commands.push(Command::Assign { now_ms, assignments });
        }
        self.service.placement_view.publish(Some(PublishedView {
            placement: Placement {
                executors: live,
                last_first_queue: self.cursor.last_first_queue.clone(),
                assignments_max: u32::try_from(config.assign_batch_max).unwrap_or(u32::MAX),
            },
            until: Instant::now() + Duration::from_millis(config.heartbeat_interval_ms),
        }));
        let purge_timer_due = Instant::now() >= self.next_purge_at;
        if purge_timer_due {
            self.next_purge_at = Instant::now() + Duration::from_millis(config.purge_interval_ms);
        }
        if let Some(cutoff_ms) = state.purge_cutoff_ms(
            now_ms,
            config.retention_ms,
            config.finished_tasks_max,
            config.purge_batch_max,
            purge_timer_due,
        ) {
            // Everything that finished at or before the cutoff, oldest first.
            commands.push(Command::PurgeFinished {
                now_ms: cutoff_ms,
                retention_ms: 0,
                tasks_max: config.purge_batch_max,
            });
        }
        let mut wake_in = self.next_purge_at.saturating_duration_since(Instant::now());
        for due_ms in
            [state.next_pending_run_at_ms(), state.next_periodic_fire_ms()].into_iter().flatten()
        {
            wake_in = wake_in.min(Duration::from_millis(due_ms.saturating_sub(now_ms)));
        }
        if let Some(expiry_ms) = self.leases.next_expiry_ms(state) {
            wake_in = wake_in.min(Duration::from_millis(expiry_ms.saturating_sub(now_mono_ms)));
        }
        Round { commands, wake_in }
    }

    async fn run(
        mut self,
        mut heartbeats: mpsc::Receiver<(Heartbeat, Instant)>,
        cancel: CancellationToken,
    ) {
        let mut changes = self.service.state_machine.live_events();
        loop {
            // Every heartbeat the service accepted counts before leases are
            // judged: the executor believes in the lease it renewed, so a
            // round must not find it expired while the renewal waits here.
            while let Ok((heartbeat, received_at)) = heartbeats.try_recv() {
                self.record(heartbeat, received_at);
            }
            let round = self.plan_round();
            let mut wrote = false;
            for command in round.commands {
                debug!(%command, "scheduling");
                let timeout = self.service.request_timeout;
                let written = tokio::select! {
                    _ = cancel.cancelled() => return,
                    written = fenced_write(&self.service.raft, self.leader_id, command, timeout) => written,
                };
                if let Ok(Response::Fired(ids)) = &written {
                    for id in ids {
                        info!(task_id = %id, "a periodic task fired");
                    }
                }
                match written {
                    Ok(Response::Rejected(rejection)) => {
                        warn!(cause = %rejection, "a scheduling command was refused")
                    }
                    // Only progress makes another round worth it at once; a
                    // round that changed nothing waits, or it would spin.
                    Ok(response) => wrote |= made_progress(&response),
                    // on_leader_change's stop ends this loop when leadership
                    // is really gone; until then a refusal is transient.
                    Err(WriteFailed::NotLeader) => {
                        info!(
                            "a fenced write was refused: leadership is changing; retrying shortly"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(WriteFailed::Other(message)) => {
                        warn!(cause = %message, "a scheduling write failed; retrying shortly");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            if wrote {
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                // The rest of the queue is drained at the top of the loop.
                Some((heartbeat, received_at)) = heartbeats.recv() => {
                    self.record(heartbeat, received_at);
                }
                changed = changes.recv() => {
                    if let Err(tokio::sync::broadcast::error::RecvError::Closed) = changed {
                        return;
                    }
                    // Drain what else is queued: one round covers them all.
                    while changes.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(round.wake_in) => {}
            }
        }
    }
}

fn made_progress(response: &Response) -> bool {
    match response {
        Response::Promoted(ids) | Response::Requeued(ids) | Response::Fired(ids) => !ids.is_empty(),
        Response::Assigned { assigned, .. } => !assigned.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::TaskId;

    #[test]
    fn executors_may_send_only_bounded_batches_of_reports() {
        let start = Command::StartAttempt { now_ms: 1, task: TaskId(1), token: 2 };
        assert_eq!(check_reports(std::slice::from_ref(&start)), Ok(()));
        let err = check_reports(&[]).unwrap_err();
        assert!(err.contains("not 0"), "{err}");
        let err = check_reports(&vec![start.clone(); REPORTS_PER_REQUEST_MAX + 1]).unwrap_err();
        assert!(err.contains("1 to 1024 reports"), "{err}");
        let err = check_reports(&[start, Command::PromoteDue { now_ms: 1 }]).unwrap_err();
        assert!(err.contains("may not propose PromoteDue"), "{err}");
    }

    type Answered = oneshot::Receiver<Result<Vec<Response>, WriteFailed>>;

    /// A request of start reports for the tasks `tasks`.
    fn queued(tasks: std::ops::Range<u64>) -> (QueuedReports, Answered) {
        let (answer, answered) = oneshot::channel();
        let reports = tasks
            .map(|task| Command::StartAttempt { now_ms: 1, task: TaskId(task), token: 1 })
            .collect();
        (QueuedReports { reports, answer }, answered)
    }

    fn recorded(task: u64) -> Response {
        Response::Attempt(crate::scheduler::command::Recorded {
            task: TaskId(task),
            state: crate::scheduler::TaskState::Running,
        })
    }

    /// Requests share an entry within the limits; each gets back exactly
    /// the answers to its own reports, in order.
    #[test]
    fn report_requests_share_an_entry_and_each_gets_its_own_answers() {
        let (first, mut first_answered) = queued(0..3);
        let (second, mut second_answered) = queued(3..5);
        let (too_many, _) = queued(5..9);
        let mut batch = ReportBatch::new(first);
        assert!(batch.try_add(second, 6, usize::MAX).is_ok());
        let held_back = batch.try_add(too_many, 6, usize::MAX).unwrap_err();
        assert_eq!(held_back.reports.len(), 4, "the request that does not fit is given back");
        let (reports, answers_to) = batch.into_entry();
        let tasks: Vec<u64> =
            reports.iter().filter_map(Command::reported_attempt).map(|(task, _)| task.0).collect();
        assert_eq!(tasks, [0, 1, 2, 3, 4]);
        answer_each(Ok((0..5).map(recorded).collect()), answers_to);
        assert_eq!(first_answered.try_recv().unwrap().unwrap(), [0, 1, 2].map(recorded));
        assert_eq!(second_answered.try_recv().unwrap().unwrap(), [3, 4].map(recorded));
    }

    /// A request that would take a batch past its byte limit waits for the
    /// next; a failed write fails every request of the entry alike.
    #[test]
    fn report_batches_keep_to_their_size_and_fail_together() {
        let (first, mut first_answered) = queued(0..3);
        let first_bytes: usize = first.reports.iter().map(report_size_bytes).sum();
        let mut batch = ReportBatch::new(first);
        let (next, mut next_answered) = queued(3..4);
        let next = batch.try_add(next, 100, first_bytes).unwrap_err();
        let next_bytes = report_size_bytes(&next.reports[0]);
        assert!(batch.try_add(next, 100, first_bytes + next_bytes).is_ok());
        let (_, answers_to) = batch.into_entry();
        answer_each(Err(WriteFailed::Other("lost".into())), answers_to);
        for answered in [&mut first_answered, &mut next_answered] {
            assert!(matches!(answered.try_recv(), Ok(Err(WriteFailed::Other(m))) if m == "lost"));
        }
    }

    /// The packet-loss overlap: openraft thought a majority acknowledged the
    /// leader just now while the followers' own answers were old. Leases are
    /// renewed only when both agree.
    #[test]
    fn a_leader_is_fresh_only_if_its_peers_answers_and_openraft_both_say_so() {
        let fresh = Duration::from_millis(300);
        let watch = QuorumWatch { acks: PeerAcks::default(), fresh };
        let voters = [BTreeSet::from([1, 2, 3])];
        let now = Instant::now() + Duration::from_secs(10);
        let just_now = Some(Duration::from_millis(10));
        assert!(!watch.is_fresh(1, now, just_now, &voters), "no peer has answered");
        watch.acks.record(2, now - Duration::from_secs(2));
        assert!(!watch.is_fresh(1, now, just_now, &voters), "the answers are stale");
        watch.acks.record(3, now - Duration::from_millis(100));
        assert!(watch.is_fresh(1, now, just_now, &voters));
        assert!(!watch.is_fresh(1, now, None, &voters), "openraft has no quorum");
        let long_ago = Some(Duration::from_secs(1));
        assert!(!watch.is_fresh(1, now, long_ago, &voters), "openraft's quorum is stale");
        // While membership changes, the new config needs its own majority.
        let joint = [BTreeSet::from([1, 2, 3]), BTreeSet::from([1, 4, 5])];
        assert!(!watch.is_fresh(1, now, just_now, &joint));
        watch.acks.record(5, now - Duration::from_millis(50));
        assert!(watch.is_fresh(1, now, just_now, &joint));
    }
}
