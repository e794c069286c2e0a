//! A node's metrics in Prometheus's text format, served over HTTP at
//! `/metrics` on `metrics_addr` when one is configured, as etcd, Nomad and
//! Consul serve theirs.
//!
//! Everything is read when scraped, from what the node keeps anyway: its
//! Raft metrics, the counts its applied state keeps by task state and by
//! ready queue (no task is visited), its executor's counters and lease, and
//! the process's CPU time and memory. The task counts are this node's
//! applied view, so a follower may lag the leader by what it has not yet
//! applied. [`render`] is pure; [`serve`] is the HTTP edge, bounded in
//! connections, in the size of a request's head and in time.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use openraft::Instant as _;
use openraft::type_config::async_runtime::WatchReceiver as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use crate::api::requests::{MethodSnapshot, RequestCounts};
use crate::executor::Executor;
use crate::platform::Incoming;
use crate::raft::{NodeId, Raft};
use crate::scheduler::{OutcomeKind, State, TaskState};
use crate::storage::{AppendedBytes, StateMachineStore};

/// The largest request head (request line and headers) the metrics server
/// reads; hyper's floor is 8 KiB.
pub const REQUEST_HEAD_BYTES_MAX: usize = 16 * 1024;

/// The bounds of the metrics server (`server.metrics_*`).
#[derive(Debug, Clone, Copy)]
pub struct MetricsLimits {
    /// Connections served at once; more are closed as they come.
    pub connections_max: usize,
    /// The longest one connection may take, from accept to close.
    pub connection_timeout: Duration,
    /// Ready queues listed by name, the first in name order; the rest are
    /// counted in `taskraft_ready_queues_omitted`.
    pub queues_max: usize,
}

/// The upper bounds of [`DurationHistogram`]'s buckets, in seconds: 0.5 ms
/// doubling to about 8 s, the range etcd gives its WAL fsyncs.
pub const DURATION_BUCKETS_SECONDS: [f64; 15] = [
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
    4.096, 8.192,
];

/// Durations counted into the fixed buckets of [`DURATION_BUCKETS_SECONDS`],
/// as a Prometheus histogram: lock-free, so the code it times never waits
/// for a scrape.
#[derive(Debug, Default)]
pub struct DurationHistogram {
    /// One count per bucket, not cumulative; the last is over the largest bound.
    counts: [AtomicU64; DURATION_BUCKETS_SECONDS.len() + 1],
    sum_micros: AtomicU64,
}

/// What a [`DurationHistogram`] held at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramCounts {
    /// Per bucket of [`DURATION_BUCKETS_SECONDS`], how many were at most its
    /// bound (cumulative, as the format has them).
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl DurationHistogram {
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let bucket = DURATION_BUCKETS_SECONDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(DURATION_BUCKETS_SECONDS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The counts now. The total is the sum of the buckets read, so it
    /// agrees with them even while durations are being observed.
    pub fn counts(&self) -> HistogramCounts {
        let mut cumulative = Vec::with_capacity(DURATION_BUCKETS_SECONDS.len());
        let mut count = 0;
        for (idx, bucket) in self.counts.iter().enumerate() {
            count += bucket.load(Ordering::Relaxed);
            if idx < DURATION_BUCKETS_SECONDS.len() {
                cumulative.push(count);
            }
        }
        let sum_seconds = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        HistogramCounts { cumulative, count, sum_seconds }
    }
}

/// What one scrape reports, gathered from the node at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeMetrics {
    pub node_id: NodeId,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: &'static str,
    pub term: u64,
    /// 0 when no leader is known.
    pub leader_id: NodeId,
    pub voters: u64,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    /// On the leader, each voter's and learner's last log index it knows
    /// to be replicated there, by node id; empty on the others.
    pub matched_index_by_node: Vec<(NodeId, u64)>,
    /// On the leader, how long since a majority last acknowledged it (what
    /// `raft.quorum_silence_ms_max` is judged by); `None` on the others.
    pub quorum_ack_age: Option<Duration>,
    /// How long the Raft log's flushes (its fsyncs) took since the node started.
    pub log_flush: HistogramCounts,
    /// Bytes of entries appended to the Raft log since the node started.
    pub log_appended_bytes: u64,
    /// The size of this node's current snapshot file; `None` if it could not be read.
    pub snapshot_bytes: Option<u64>,
    /// The calls its client API answered, by method.
    pub api_methods: Vec<MethodSnapshot>,
    /// Tasks in each state, in the order of `TaskState::ALL`.
    pub tasks_by_state: Vec<(TaskState, u64)>,
    /// Ready tasks by queue, in name order, at most `queues_max` of them.
    pub ready_by_queue: Vec<(String, u64)>,
    /// Queues with ready tasks that `ready_by_queue` leaves out.
    pub ready_queues_omitted: u64,
    /// Limited queues by name, at most `queues_max` of them: the limit and
    /// the tasks ASSIGNED or RUNNING.
    pub queue_limits: Vec<(String, u32, u64)>,
    /// Limited queues that `queue_limits` leaves out.
    pub queue_limits_omitted: u64,
    pub periodic_tasks: u64,
    /// The earliest next fire time of a periodic task, Unix milliseconds.
    pub periodic_next_fire_ms: Option<u64>,
    pub executor_slots: u32,
    /// Attempts assigned to this node and not yet finished, by its applied state.
    pub executor_attempts_active: u64,
    pub executor_lease_held: bool,
    pub executor_lease_lapses: u64,
    pub executor_attempts_started: u64,
    /// In the order of `OutcomeKind::ALL`.
    pub executor_attempts_ended: Vec<(OutcomeKind, u64)>,
    /// `None` where `/proc` could not be read.
    pub process_cpu_seconds: Option<f64>,
    pub process_resident_memory_bytes: Option<u64>,
}

/// Where a node's metrics come from.
pub struct MetricsSource {
    pub node_id: NodeId,
    pub raft: Raft,
    pub state_machine: StateMachineStore,
    pub executor: Arc<Executor>,
    pub log_flush: Arc<DurationHistogram>,
    pub log_appended_bytes: AppendedBytes,
    pub api_requests: Arc<RequestCounts>,
}

impl MetricsSource {
    /// Reads every metric, with at most `queues_max` ready queues by name.
    pub fn gather(&self, queues_max: usize) -> NodeMetrics {
        let raft = self.raft.metrics().borrow_watched().clone();
        let membership = raft.membership_config.membership();
        let voter = membership.voter_ids().any(|id| id == self.node_id);
        let role = crate::raft::role_name(raft.state, voter);
        let mut metrics = NodeMetrics {
            node_id: self.node_id,
            role,
            term: raft.current_term,
            leader_id: raft.current_leader.unwrap_or(0),
            voters: membership.voter_ids().count() as u64,
            last_log_index: raft.last_log_index.unwrap_or(0),
            commit_index: raft.local_committed.map_or(0, |log_id| log_id.index()),
            applied_index: raft.last_applied.map_or(0, |log_id| log_id.index()),
            snapshot_index: raft.snapshot.map_or(0, |log_id| log_id.index()),
            purged_index: raft.purged.map_or(0, |log_id| log_id.index()),
            matched_index_by_node: raft
                .replication
                .iter()
                .flatten()
                .map(|(node_id, matched)| (*node_id, matched.map_or(0, |log_id| log_id.index())))
                .collect(),
            quorum_ack_age: raft.last_quorum_acked.as_ref().map(|acked| acked.elapsed()),
            log_flush: self.log_flush.counts(),
            log_appended_bytes: self.log_appended_bytes.get(),
            snapshot_bytes: self.state_machine.snapshot_bytes().ok(),
            api_methods: self.api_requests.snapshot(),
            ..NodeMetrics::default()
        };
        metrics.read_tasks(&self.state_machine.read().state, queues_max);
        let executor = &self.executor;
        metrics.executor_slots = executor.slots;
        (metrics.executor_lease_held, metrics.executor_lease_lapses) = executor.lease_status();
        metrics.executor_attempts_started = executor.counters.started();
        metrics.executor_attempts_ended =
            OutcomeKind::ALL.iter().map(|&kind| (kind, executor.counters.ended(kind))).collect();
        metrics.process_cpu_seconds = process_cpu_seconds();
        metrics.process_resident_memory_bytes = process_resident_memory_bytes();
        metrics
    }
}

impl NodeMetrics {
    /// Reads the counts `state` keeps: tasks by state, ready tasks of the
    /// first `queues_max` queues by name (the rest only counted), and the
    /// attempts active on this node. Visits no task.
    fn read_tasks(&mut self, state: &State, queues_max: usize) {
        self.tasks_by_state = TaskState::ALL
            .iter()
            .map(|&task_state| (task_state, state.n_tasks_in(task_state)))
            .collect();
        let queues = state.ready_queue_depths();
        let n_queues = queues.len();
        self.ready_by_queue = queues
            .take(queues_max)
            .map(|(queue, depth)| (queue.to_owned(), depth as u64))
            .collect();
        self.ready_queues_omitted = (n_queues - self.ready_by_queue.len()) as u64;
        let limits = state.queue_limits();
        let n_limits = limits.len();
        self.queue_limits = limits
            .take(queues_max)
            .map(|(queue, running_max)| {
                (queue.to_owned(), running_max, state.n_active_in_queue(queue))
            })
            .collect();
        self.queue_limits_omitted = (n_limits - self.queue_limits.len()) as u64;
        self.executor_attempts_active = state.n_active_on(self.node_id) as u64;
        self.periodic_tasks = state.n_periodics() as u64;
        self.periodic_next_fire_ms = state.next_periodic_fire_ms();
    }
}

/// `metrics` in Prometheus's text exposition format (version 0.0.4).
pub fn render(metrics: &NodeMetrics) -> String {
    let mut out = Exposition::default();
    let node = metrics.node_id.to_string();
    out.family("taskraft_node_info", "gauge", "This node's id and version; always 1.");
    out.sample(
        "taskraft_node_info",
        &[("node_id", &node), ("version", env!("CARGO_PKG_VERSION"))],
        1,
    );

    out.family("taskraft_raft_role", "gauge", "1 for this node's Raft role, 0 for the others.");
    for role in ["leader", "follower", "candidate", "learner", "shutdown"] {
        out.sample("taskraft_raft_role", &[("role", role)], u64::from(metrics.role == role));
    }
    let raft = [
        ("taskraft_raft_term", "The Raft term this node is in.", metrics.term),
        ("taskraft_raft_leader_id", "The leader this node knows; 0 for none.", metrics.leader_id),
        ("taskraft_raft_voters", "Voters in the membership this node knows.", metrics.voters),
        (
            "taskraft_raft_last_log_index",
            "The last index in this node's log.",
            metrics.last_log_index,
        ),
        (
            "taskraft_raft_commit_index",
            "The last index this node knows committed.",
            metrics.commit_index,
        ),
        ("taskraft_raft_applied_index", "The last index this node applied.", metrics.applied_index),
        (
            "taskraft_raft_snapshot_index",
            "The last index this node's snapshot covers.",
            metrics.snapshot_index,
        ),
        (
            "taskraft_raft_purged_index",
            "The last index purged from this node's log.",
            metrics.purged_index,
        ),
    ];
    for (name, help, value) in raft {
        out.single(name, "gauge", help, value);
    }
    out.family(
        "taskraft_raft_matched_index",
        "gauge",
        "On the leader: the last log index known replicated on each node.",
    );
    for (node_id, matched_index) in &metrics.matched_index_by_node {
        out.sample(
            "taskraft_raft_matched_index",
            &[("node_id", &node_id.to_string())],
            *matched_index,
        );
    }
    if let Some(age) = metrics.quorum_ack_age {
        out.family(
            "taskraft_raft_quorum_ack_age_seconds",
            "gauge",
            "On the leader: the time since a majority last acknowledged it.",
        );
        out.sample_f64("taskraft_raft_quorum_ack_age_seconds", age.as_secs_f64());
    }
    out.histogram(
        "taskraft_raft_log_flush_seconds",
        "How long each flush of the Raft log to disk took (fsync included); an append is acknowledged only after one.",
        &metrics.log_flush,
    );
    out.single(
        "taskraft_raft_log_appended_bytes_total",
        "counter",
        "Bytes of entries appended to this node's Raft log.",
        metrics.log_appended_bytes,
    );
    if let Some(bytes) = metrics.snapshot_bytes {
        out.single(
            "taskraft_snapshot_bytes",
            "gauge",
            "The size of this node's current snapshot.",
            bytes,
        );
    }

    out.family(
        "taskraft_api_requests_total",
        "counter",
        "Calls this node's client API answered, by method and status code (a stream when it starts).",
    );
    for method in &metrics.api_methods {
        for (code, n_calls) in &method.by_code {
            out.sample(
                "taskraft_api_requests_total",
                &[("method", &method.method), ("code", code)],
                *n_calls,
            );
        }
    }
    out.family(
        "taskraft_api_request_seconds",
        "histogram",
        "How long this node took to answer each call of its client API, by method (a stream: to its first answer).",
    );
    for method in &metrics.api_methods {
        out.histogram_samples(
            "taskraft_api_request_seconds",
            &[("method", &method.method)],
            &method.durations,
        );
    }

    out.family("taskraft_tasks", "gauge", "Tasks by state, in this node's applied state.");
    for (state, n_tasks) in &metrics.tasks_by_state {
        out.sample("taskraft_tasks", &[("state", state.name())], *n_tasks);
    }
    out.family("taskraft_ready_tasks", "gauge", "READY tasks by queue, the first queues by name.");
    for (queue, n_tasks) in &metrics.ready_by_queue {
        out.sample("taskraft_ready_tasks", &[("queue", queue)], *n_tasks);
    }
    out.single(
        "taskraft_ready_queues_omitted",
        "gauge",
        "Queues with READY tasks left out of taskraft_ready_tasks (server.metrics_queues_max).",
        metrics.ready_queues_omitted,
    );
    out.family(
        "taskraft_queue_running_max",
        "gauge",
        "The limit on ASSIGNED and RUNNING tasks of each limited queue (0: paused), the first by name.",
    );
    for (queue, running_max, _) in &metrics.queue_limits {
        out.sample("taskraft_queue_running_max", &[("queue", queue)], u64::from(*running_max));
    }
    out.family(
        "taskraft_queue_active_tasks",
        "gauge",
        "ASSIGNED and RUNNING tasks of each limited queue, as taskraft_queue_running_max names them.",
    );
    for (queue, _, n_active) in &metrics.queue_limits {
        out.sample("taskraft_queue_active_tasks", &[("queue", queue)], *n_active);
    }
    out.single(
        "taskraft_queue_limits_omitted",
        "gauge",
        "Limited queues left out of taskraft_queue_running_max (server.metrics_queues_max).",
        metrics.queue_limits_omitted,
    );

    out.single(
        "taskraft_periodic_tasks",
        "gauge",
        "Periodic tasks, in this node's applied state.",
        metrics.periodic_tasks,
    );
    if let Some(next_fire_ms) = metrics.periodic_next_fire_ms {
        out.family(
            "taskraft_periodic_next_fire_timestamp_seconds",
            "gauge",
            "When the next periodic task is due to fire, Unix seconds; long past means no leader fires it.",
        );
        out.sample_f64(
            "taskraft_periodic_next_fire_timestamp_seconds",
            next_fire_ms as f64 / 1_000.0,
        );
    }

    let executor = [
        (
            "taskraft_executor_slots",
            "gauge",
            "Programs this node's executor runs at once.",
            u64::from(metrics.executor_slots),
        ),
        (
            "taskraft_executor_attempts_active",
            "gauge",
            "Attempts ASSIGNED to or RUNNING on this node, in its applied state (prefetched ones included).",
            metrics.executor_attempts_active,
        ),
        (
            "taskraft_executor_lease_held",
            "gauge",
            "1 while this executor's lease holds.",
            u64::from(metrics.executor_lease_held),
        ),
        (
            "taskraft_executor_lease_lapses_total",
            "counter",
            "Times this executor's lease ran out before a renewal arrived.",
            metrics.executor_lease_lapses,
        ),
        (
            "taskraft_executor_attempts_started_total",
            "counter",
            "Attempts whose program this executor set out to start.",
            metrics.executor_attempts_started,
        ),
    ];
    for (name, kind, help, value) in executor {
        out.single(name, kind, help, value);
    }
    out.family(
        "taskraft_executor_attempts_ended_total",
        "counter",
        "Attempts whose program ended here, by outcome (succeeded: exit 0; exited: any other code).",
    );
    for (kind, n_attempts) in &metrics.executor_attempts_ended {
        out.sample(
            "taskraft_executor_attempts_ended_total",
            &[("outcome", kind.name())],
            *n_attempts,
        );
    }

    if let Some(seconds) = metrics.process_cpu_seconds {
        out.family(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time of this node.",
        );
        out.sample_f64("process_cpu_seconds_total", seconds);
    }
    if let Some(bytes) = metrics.process_resident_memory_bytes {
        out.single(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of this node.",
            bytes,
        );
    }
    out.text
}

/// Text in the exposition format, a family at a time.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// A family of one sample without labels.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.name_and_labels(name, labels);
        let _ = writeln!(self.text, " {value}");
    }

    fn sample_f64(&mut self, name: &str, value: f64) {
        self.sample_labelled_f64(name, &[], value);
    }

    fn sample_labelled_f64(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.name_and_labels(name, labels);
        let _ = writeln!(self.text, " {value}");
    }

    fn name_and_labels(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (idx, (label, label_value)) in labels.iter().enumerate() {
                if idx > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape_label_value(label_value));
            }
            self.text.push('}');
        }
    }

    fn histogram(&mut self, name: &str, help: &str, counts: &HistogramCounts) {
        self.family(name, "histogram", help);
        self.histogram_samples(name, &[], counts);
    }

    /// The samples of one histogram of the family `name`, with `labels`.
    fn histogram_samples(&mut self, name: &str, labels: &[(&str, &str)], counts: &HistogramCounts) {
        let bucket = format!("{name}_bucket");
        for (bound, n_at_most) in DURATION_BUCKETS_SECONDS.iter().zip(&counts.cumulative) {
            let bound = bound.to_string();
            self.sample(&bucket, &[labels, &[("le", &bound)]].concat(), *n_at_most);
        }
        self.sample(&bucket, &[labels, &[("le", "+Inf")]].concat(), counts.count);
        self.sample_labelled_f64(&format!("{name}_sum"), labels, counts.sum_seconds);
        self.sample(&format!("{name}_count"), labels, counts.count);
    }
}

/// A label value as the format wants it: backslash, double quote and line
/// feed escaped. Queue names come from users and may hold any of them.
fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// The user and system CPU time this process has used.
fn process_cpu_seconds() -> Option<f64> {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).ok()?;
    let seconds =
        |time: nix::sys::time::TimeVal| time.tv_sec() as f64 + time.tv_usec() as f64 / 1e6;
    Some(seconds(usage.user_time()) + seconds(usage.system_time()))
}

/// This process's resident memory, from `VmRSS` in `/proc/self/status`.
fn process_resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 =
        line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Serves `GET /metrics` on the connections of `incoming` until `shutdown`.
/// One request per connection; a connection past `limits.connections_max`
/// is closed unanswered, and one that takes longer than
/// `limits.connection_timeout` is dropped.
pub async fn serve(
    mut incoming: Incoming,
    source: Arc<MetricsSource>,
    limits: MetricsLimits,
    shutdown: CancellationToken,
) {
    let connections = Arc::new(Semaphore::new(limits.connections_max));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = incoming.next() => accepted,
        };
        let connection = match accepted {
            None => return,
            Some(Ok(connection)) => connection,
            Some(Err(err)) => {
                // Out of descriptors, say: wait a moment rather than spin.
                warn!(error = %err, "cannot accept a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            debug!("too many metrics connections: closing a new one");
            continue;
        };
        let source = source.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let service = service_fn(move |request| {
                    let answer = respond(&request, &source, limits.queues_max);
                    async move { Ok::<_, Infallible>(answer) }
                });
                let served = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.connection_timeout)
                    .max_buf_size(REQUEST_HEAD_BYTES_MAX)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(connection), service);
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    served = tokio::time::timeout(limits.connection_timeout, served) => match served {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => debug!(error = %err, "a metrics connection failed"),
                        Err(_) => debug!("a metrics connection timed out"),
                    },
                }
            }
            .in_current_span(),
        );
    }
}

/// The answer to one request: the metrics for `GET /metrics` (or `HEAD`),
/// and otherwise a status with a message that says what is served.
fn respond<B>(
    request: &Request<B>,
    source: &MetricsSource,
    queues_max: usize,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(&source.gather(queues_max)),
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD are served at /metrics\n".to_owned(),
        ),
        (_, path) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!("nothing at {path}: the metrics are at /metrics\n"),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{Command, Response, Schedule, TaskId, TaskSpec};

    fn sample_metrics() -> NodeMetrics {
        NodeMetrics {
            node_id: 2,
            role: "follower",
            term: 7,
            leader_id: 1,
            voters: 3,
            last_log_index: 120,
            commit_index: 119,
            applied_index: 118,
            snapshot_index: 100,
            purged_index: 90,
            matched_index_by_node: vec![(1, 120), (3, 0)],
            quorum_ack_age: Some(Duration::from_millis(25)),
            log_flush: {
                let histogram = DurationHistogram::default();
                histogram.observe(Duration::from_micros(700));
                histogram.observe(Duration::from_secs(60));
                histogram.counts()
            },
            log_appended_bytes: 123_456,
            snapshot_bytes: Some(2_048),
            api_methods: {
                let requests = RequestCounts::default();
                let submit = "/taskraft.v1.Tasks/SubmitTask";
                requests.record(submit, tonic::Code::Ok, Duration::from_millis(1));
                requests.record(submit, tonic::Code::Unavailable, Duration::from_millis(3));
                requests.snapshot()
            },
            tasks_by_state: TaskState::ALL.iter().zip(1..).map(|(state, n)| (*state, n)).collect(),
            ready_by_queue: vec![("default".into(), 4), ("odd \"q\"\\\nname".into(), 1)],
            ready_queues_omitted: 3,
            queue_limits: vec![("serial".into(), 1, 1), ("paused".into(), 0, 0)],
            queue_limits_omitted: 4,
            periodic_tasks: 2,
            periodic_next_fire_ms: Some(1_796_526_000_250),
            executor_slots: 2,
            executor_attempts_active: 5,
            executor_lease_held: true,
            executor_lease_lapses: 1,
            executor_attempts_started: 40,
            executor_attempts_ended: OutcomeKind::ALL.iter().map(|kind| (*kind, 5)).collect(),
            process_cpu_seconds: Some(1.5),
            process_resident_memory_bytes: Some(4096),
        }
    }

    /// Every sample line of `text` as (name with labels, value).
    fn samples(text: &str) -> Vec<(&str, &str)> {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| line.rsplit_once(' ').expect("a sample is a name and a value"))
            .collect()
    }

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let text = render(&sample_metrics());
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["gauge", "counter", "histogram"].contains(&kind), "{line}");
                declared.push(name.to_owned());
            } else if !line.starts_with("# HELP ") {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = declared.last().map(String::as_str).unwrap_or_default();
                let of_histogram = ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name.strip_suffix(suffix) == Some(family));
                assert!(name == family || of_histogram, "{line} after the family {family}");
            }
        }
        let mut unique = declared.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), declared.len(), "each family once");
    }

    #[test]
    fn values_are_the_node_s() {
        let text = render(&sample_metrics());
        let samples = samples(&text);
        let value = |name: &str| {
            samples.iter().find(|(sample, _)| *sample == name).map(|(_, value)| *value)
        };
        assert_eq!(value("taskraft_node_info{node_id=\"2\",version=\"0.1.0\"}"), Some("1"));
        assert_eq!(value("taskraft_raft_role{role=\"follower\"}"), Some("1"));
        assert_eq!(value("taskraft_raft_role{role=\"leader\"}"), Some("0"));
        assert_eq!(value("taskraft_raft_term"), Some("7"));
        assert_eq!(value("taskraft_raft_applied_index"), Some("118"));
        assert_eq!(value("taskraft_tasks{state=\"WAITING\"}"), Some("1"));
        assert_eq!(value("taskraft_tasks{state=\"PENDING\"}"), Some("2"));
        assert_eq!(value("taskraft_tasks{state=\"CANCELLED\"}"), Some("8"));
        assert_eq!(value("taskraft_ready_tasks{queue=\"default\"}"), Some("4"));
        assert_eq!(value("taskraft_ready_queues_omitted"), Some("3"));
        assert_eq!(value("taskraft_queue_running_max{queue=\"serial\"}"), Some("1"));
        assert_eq!(value("taskraft_queue_running_max{queue=\"paused\"}"), Some("0"));
        assert_eq!(value("taskraft_queue_active_tasks{queue=\"serial\"}"), Some("1"));
        assert_eq!(value("taskraft_queue_limits_omitted"), Some("4"));
        assert_eq!(value("taskraft_periodic_tasks"), Some("2"));
        assert_eq!(value("taskraft_periodic_next_fire_timestamp_seconds"), Some("1796526000.25"));
        assert_eq!(value("taskraft_executor_lease_held"), Some("1"));
        assert_eq!(
            value("taskraft_executor_attempts_ended_total{outcome=\"timed_out\"}"),
            Some("5")
        );
        assert_eq!(value("process_cpu_seconds_total"), Some("1.5"));
        assert_eq!(value("taskraft_raft_matched_index{node_id=\"1\"}"), Some("120"));
        assert_eq!(value("taskraft_raft_matched_index{node_id=\"3\"}"), Some("0"));
        assert_eq!(value("taskraft_raft_quorum_ack_age_seconds"), Some("0.025"));
        assert_eq!(value("taskraft_raft_log_flush_seconds_bucket{le=\"0.0005\"}"), Some("0"));
        assert_eq!(value("taskraft_raft_log_flush_seconds_bucket{le=\"0.001\"}"), Some("1"));
        assert_eq!(value("taskraft_raft_log_flush_seconds_bucket{le=\"8.192\"}"), Some("1"));
        assert_eq!(value("taskraft_raft_log_flush_seconds_bucket{le=\"+Inf\"}"), Some("2"));
        assert_eq!(value("taskraft_raft_log_flush_seconds_count"), Some("2"));
        assert_eq!(value("taskraft_raft_log_flush_seconds_sum"), Some("60.0007"));
        assert_eq!(value("taskraft_raft_log_appended_bytes_total"), Some("123456"));
        assert_eq!(value("taskraft_snapshot_bytes"), Some("2048"));
        let submit = "method=\"taskraft.v1.Tasks/SubmitTask\"";
        assert_eq!(
            value(&format!("taskraft_api_requests_total{{{submit},code=\"OK\"}}")),
            Some("1")
        );
        assert_eq!(
            value(&format!("taskraft_api_requests_total{{{submit},code=\"UNAVAILABLE\"}}")),
            Some("1")
        );
        assert_eq!(
            value(&format!("taskraft_api_request_seconds_bucket{{{submit},le=\"0.001\"}}")),
            Some("1")
        );
        assert_eq!(
            value(&format!("taskraft_api_request_seconds_bucket{{{submit},le=\"+Inf\"}}")),
            Some("2")
        );
        assert_eq!(value(&format!("taskraft_api_request_seconds_sum{{{submit}}}")), Some("0.004"));
        assert_eq!(value(&format!("taskraft_api_request_seconds_count{{{submit}}}")), Some("2"));
        let n_roles =
            samples.iter().filter(|(name, _)| name.starts_with("taskraft_raft_role{")).count();
        assert_eq!(n_roles, 5);
    }

    #[test]
    fn a_queue_name_cannot_break_the_format() {
        let text = render(&sample_metrics());
        assert!(
            text.contains("taskraft_ready_tasks{queue=\"odd \\\"q\\\"\\\\\\nname\"} 1\n"),
            "{text}"
        );
        assert!(text.lines().all(|line| line.starts_with('#')
            || line.starts_with("taskraft_")
            || line.starts_with("process_")));
    }

    #[test]
    fn the_first_queues_by_name_are_listed_and_the_rest_counted() {
        let mut state = State::default();
        let mut specs = Vec::new();
        for (queue, n_tasks) in [("c", 1), ("a", 3), ("d", 1), ("b", 2)] {
            for _ in 0..n_tasks {
                specs.push(TaskSpec { queue: queue.into(), ..TaskSpec::for_test("true") });
            }
        }
        let mut delayed = TaskSpec::for_test("later");
        delayed.schedule = Schedule::DelayMs(60_000);
        specs.push(delayed);
        let command = Command::SubmitTasks { now_ms: 1_000, queued_tasks_max: 100, specs };
        assert!(matches!(state.apply(1, &command).response, Response::Submitted(_)));

        let mut metrics = NodeMetrics { node_id: 1, ..NodeMetrics::default() };
        metrics.read_tasks(&state, 2);
        assert_eq!(metrics.ready_by_queue, vec![("a".to_owned(), 3), ("b".to_owned(), 2)]);
        assert_eq!(metrics.ready_queues_omitted, 2);
        let n_in = |wanted: TaskState| {
            metrics.tasks_by_state.iter().find(|(state, _)| *state == wanted).map(|(_, n)| *n)
        };
        assert_eq!(n_in(TaskState::Ready), Some(7));
        assert_eq!(n_in(TaskState::Pending), Some(1));
        assert_eq!(n_in(TaskState::Succeeded), Some(0));
        assert_eq!(metrics.executor_attempts_active, 0);

        metrics.read_tasks(&state, 0);
        assert!(metrics.ready_by_queue.is_empty());
        assert_eq!(metrics.ready_queues_omitted, 4);

        // Limited queues, with their active tasks: task 1 is of queue a.
        for (revision, queue) in [(2, "c"), (3, "a"), (4, "b")] {
            let limit = Command::SetQueueLimit { queue: queue.into(), running_max: Some(2) };
            state.apply(revision, &limit);
        }
        let assign = Command::Assign {
            now_ms: 1_000,
            assignments: vec![crate::scheduler::Assignment { task: TaskId(1), node: 1 }],
        };
        assert!(matches!(state.apply(5, &assign).response, Response::Assigned { .. }));
        metrics.read_tasks(&state, 2);
        assert_eq!(metrics.queue_limits, vec![("a".to_owned(), 2, 1), ("b".to_owned(), 2, 0)]);
        assert_eq!(metrics.queue_limits_omitted, 1);
        assert_eq!(metrics.executor_attempts_active, 1);
    }

    #[test]
    fn a_histogram_counts_each_duration_in_the_first_bucket_that_holds_it() {
        let histogram = DurationHistogram::default();
        for micros in [100, 500, 501, 1_000, 3_000, 20_000_000] {
            histogram.observe(Duration::from_micros(micros));
        }
        let counts = histogram.counts();
        assert_eq!(counts.count, 6);
        assert_eq!(counts.cumulative.len(), DURATION_BUCKETS_SECONDS.len());
        // At most 0.5 ms: two; 1 ms: four; 2 ms: four; 4 ms: five; then five to the end.
        assert_eq!(&counts.cumulative[..4], &[2, 4, 4, 5]);
        assert!(counts.cumulative[4..].iter().all(|n| *n == 5), "{counts:?}");
        assert!((counts.sum_seconds - 20.005101).abs() < 1e-9, "{counts:?}");
        assert!(counts.cumulative.windows(2).all(|pair| pair[0] <= pair[1]));
    }

    #[test]
    fn what_proc_gives_is_read() {
        assert!(process_cpu_seconds().is_some_and(|seconds| seconds >= 0.0));
        assert!(process_resident_memory_bytes().is_some_and(|bytes| bytes > 0));
    }
}
