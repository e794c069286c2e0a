//! The configuration of a node: its identity, addresses, Raft timings and
//! every named limit, with one `validate`.
//!
//! Sources, later ones winning: built-in defaults, an optional TOML file,
//! `TASKRAFT_*` environment variables, then command-line flags (the last two
//! are merged by clap in `main.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::raft::{NodeId, PeerNode};
use crate::scheduler::Limits;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The most `execution.prefetch_per_slot` may be: queued attempts are
/// memory on the node and work another node cannot take.
pub const PREFETCH_PER_SLOT_MAX: u32 = 64;

/// The most `worker_threads` may be.
pub const WORKER_THREADS_MAX: u32 = 1_024;

/// Everything a node needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's id, unique in the cluster and never reused. Required.
    pub node_id: NodeId,
    /// The client API address this node listens on and advertises.
    pub api_addr: String,
    /// The peer (Raft) address this node listens on and advertises.
    pub raft_addr: String,
    /// Where this node serves its Prometheus metrics over HTTP, at
    /// `/metrics`; empty serves none.
    pub metrics_addr: String,
    pub data_dir: PathBuf,
    /// The members to start a new cluster with, as `ID=API_ADDR/RAFT_ADDR`
    /// separated by commas. The lowest id initializes the cluster when its
    /// storage is empty; a node with data ignores this.
    pub initial_cluster: String,
    /// Executor slots of this node (used by the scheduler); 0 means the number of CPUs.
    pub slots: u32,
    /// Worker threads of this node's async runtime; 0 means the number of
    /// CPUs. Nodes that share a machine may do better with fewer: an idle
    /// worker is parked and woken again for each message, which for three
    /// nodes of two workers each on two CPUs was about a fifth of a no-op
    /// task's node CPU. One worker each ran no-op tasks 3 to 9 % faster
    /// there, but committed single submissions at 64 clients 6 to 11 %
    /// slower against etcd in the same runs (the leader's work no longer
    /// spreads over two threads), so the default stays. At most
    /// [`WORKER_THREADS_MAX`].
    pub worker_threads: u32,
    /// Labels of this node, which tasks may require.
    pub labels: BTreeMap<String, String>,
    pub raft: RaftTimings,
    pub execution: ExecutionConfig,
    pub limits: Limits,
    pub server: ServerLimits,
}

/// The least `raft.snapshot_after_log_bytes`: below it a busy node would do
/// little but build snapshots.
pub const SNAPSHOT_AFTER_LOG_BYTES_MIN: u64 = 1024 * 1024;

/// Raft timings and log compaction. Defaults suit a loopback cluster or a
/// LAN and give failover in under half a second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTimings {
    /// How often the leader sends heartbeats to followers.
    pub heartbeat_interval_ms: u64,
    /// The election timeout, meant as etcd's `--election-timeout`: a node
    /// that has heard from a leader refuses to elect another for this long
    /// (the leader lease), and a follower that hears nothing from its leader
    /// campaigns after a random silence of 1.5 to 2 times this.
    pub election_timeout_ms: u64,
    /// Build a snapshot after this many log entries since the last one
    /// (etcd's `--snapshot-count` default). A snapshot writes the whole
    /// state: every 5,000 entries it cost about 6 % of the 64-client submit
    /// rate and doubled its p99.
    pub snapshot_after_entries: u64,
    /// Build a snapshot once this many bytes of entries were appended since
    /// the last one, whatever their number, or as many as the last snapshot
    /// holds if that is more: the log after the snapshot is what a restarted
    /// node re-applies, and what sled caches.
    pub snapshot_after_log_bytes: u64,
    /// Log entries kept behind a snapshot for followers that lag a little.
    pub snapshot_keep_entries: u64,
    /// The most bytes of log entries kept behind a snapshot, whatever
    /// `snapshot_keep_entries` says: the kept entries are memory (sled
    /// caches the log), and a batch entry can hold 1,000 tasks. A follower
    /// further behind gets the snapshot.
    pub snapshot_keep_bytes_max: u64,
    /// The longest one snapshot transfer may take.
    pub snapshot_send_timeout_ms: u64,
    /// The longest a follower may take to answer an AppendEntries that
    /// carries entries, or only a commit index: it must receive, write and
    /// fsync them first, or wait for an fsync under way. openraft
    /// would allow only a heartbeat interval, which a batch of large entries
    /// on a busy machine outlasts; retried, it outlasts it again, and with
    /// one follower down nothing commits. Heartbeats keep their own, shorter
    /// deadline.
    pub append_timeout_ms: u64,
    /// How long a leader may go without a majority acknowledging it before
    /// it refuses writes and linearizable reads at once with UNAVAILABLE,
    /// rather than letting them wait out their timeout. Acknowledgements
    /// come after the followers' fsyncs, so a busy, healthy cluster lags by
    /// hundreds of milliseconds (525 ms seen under the batch benchmark);
    /// this must stay above that and below `server.request_timeout_ms`.
    pub quorum_silence_ms_max: u64,
    /// The longest a leader waits before it tries again to replicate to a
    /// follower it could not reach. The waits start at one heartbeat
    /// interval and double up to this; a follower that comes back is caught
    /// up within it. (openraft's own default grows to 1 s, which a restarted
    /// follower waited out before its first entry.)
    pub replication_retry_ms_max: u64,
}

impl Default for RaftTimings {
    fn default() -> Self {
        RaftTimings {
            heartbeat_interval_ms: 50,
            election_timeout_ms: 250,
            snapshot_after_entries: 100_000,
            snapshot_after_log_bytes: 64 * 1024 * 1024,
            snapshot_keep_entries: 1_000,
            snapshot_keep_bytes_max: 16 * 1024 * 1024,
            snapshot_send_timeout_ms: 60_000,
            append_timeout_ms: 5_000,
            quorum_silence_ms_max: 1_000,
            replication_retry_ms_max: 250,
        }
    }
}

impl RaftTimings {
    /// How long a leader that has lost its majority goes on renewing
    /// executor leases: one election timeout. No other node can be elected
    /// before 1.5 election timeouts have passed (its lease, then at least
    /// half a timeout more), so renewals stop first.
    pub fn quorum_fresh_ms(&self) -> u64 {
        self.election_timeout_ms
    }

    /// openraft's replication backoff, as its series syntax: one heartbeat
    /// interval, then doubling, capped at `replication_retry_ms_max`.
    pub fn replication_backoff(&self) -> String {
        let first_ms = self.heartbeat_interval_ms;
        let second_ms = first_ms.saturating_mul(2).min(self.replication_retry_ms_max);
        format!("{first_ms}ms {second_ms}ms ...{}ms", self.replication_retry_ms_max)
    }
}

/// How tasks are run: leases, heartbeats, output capture, retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutionConfig {
    /// An executor that cannot renew its lease for this long kills its
    /// attempts, and the leader re-queues them.
    pub lease_ms: u64,
    /// Extra time the leader waits past a lease before re-queueing; covers
    /// the executor's own check interval and clock-rate differences.
    pub lease_grace_ms: u64,
    /// How often executors heartbeat the leader.
    pub heartbeat_interval_ms: u64,
    /// The tail of stdout and of stderr kept for each attempt.
    pub output_tail_bytes_max: usize,
    /// The most attempts an executor takes per slot beyond its slots,
    /// queued on the node to start the moment a slot frees (like Celery's
    /// prefetch). It hides the assignment round trip from short tasks; with
    /// long tasks a queued attempt waits for its node even when another node
    /// frees up first. 0 turns it off.
    pub prefetch_per_slot: u32,
    /// How much work an executor queues beyond its slots: as many attempts
    /// as its slots would run in this long, judged by how long its recent
    /// attempts ran, up to `prefetch_per_slot` per slot. So short tasks get
    /// a deep queue and tasks that run this long or longer get none, and
    /// cannot wait on a busy node while another is free. Until its first
    /// attempt ends an executor queues nothing. 0 queues
    /// `prefetch_per_slot` per slot whatever the tasks.
    pub prefetch_window_ms: u64,
    /// How long a program runs before its executor records its start
    /// (RUNNING) through the leader. A program that ends sooner is recorded
    /// once, by its completion, which carries its start time: a short task
    /// costs one report instead of two. Until then the task shows ASSIGNED.
    /// Nothing else depends on the start record (an ASSIGNED attempt is
    /// fenced, re-run and cancelled like a RUNNING one). 0 records every
    /// start at once.
    pub start_report_delay_ms: u64,
    /// Reports an executor holds for the leader; its attempts wait beyond.
    pub report_queue_max: usize,
    /// Executors' report requests waiting on the leader for its report
    /// writer; more wait for room, within their request's timeout.
    pub leader_report_requests_queued_max: usize,
    /// Heartbeats waiting on the leader for its scheduling loop; more are
    /// refused, and the executor's next heartbeat tries again.
    pub leader_heartbeats_queued_max: usize,
    /// Reports one executor sends in one request, committed as one entry.
    pub report_batch_max: usize,
    /// Output tails one such request carries, about (a report always fits).
    pub report_batch_bytes_max: usize,
    /// Assignments in one Raft write.
    pub assign_batch_max: usize,
    /// How long finished tasks are kept before they are purged.
    pub retention_ms: u64,
    /// The most finished tasks kept: beyond it the oldest are purged before
    /// their retention ends (within about a purge batch).
    pub finished_tasks_max: u64,
    pub purge_interval_ms: u64,
    /// Tasks purged in one Raft write.
    pub purge_batch_max: u32,
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            lease_ms: 3_000,
            lease_grace_ms: 1_000,
            heartbeat_interval_ms: 300,
            output_tail_bytes_max: 64 * 1024,
            prefetch_per_slot: 16,
            prefetch_window_ms: 50,
            start_report_delay_ms: 100,
            report_queue_max: 4_096,
            leader_report_requests_queued_max: 256,
            leader_heartbeats_queued_max: 1_024,
            report_batch_max: 256,
            report_batch_bytes_max: 4 * 1024 * 1024,
            assign_batch_max: 256,
            retention_ms: 7 * 24 * 3600 * 1000,
            finished_tasks_max: 1 << 20,
            purge_interval_ms: 60_000,
            purge_batch_max: 1_000,
        }
    }
}

/// Limits of the servers, clients and stores of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimits {
    /// The largest client API message, in either direction.
    pub api_message_bytes_max: usize,
    /// The largest peer message (an append of many entries).
    pub peer_message_bytes_max: usize,
    /// AppendEntries a leader sends one follower before the first of them
    /// is answered (replication is a pipeline).
    pub peer_appends_in_flight_max: usize,
    pub snapshot_chunk_bytes: usize,
    /// The largest snapshot accepted from a peer.
    pub snapshot_bytes_max: u64,
    /// Concurrent requests on one client connection.
    pub api_concurrency_per_connection_max: usize,
    /// The deadline of an RPC this node sends on behalf of a client
    /// (forwarding to the leader, asking peers for their status).
    pub rpc_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// How long `Status` waits for each other node's own view; a node that
    /// does not answer in time is shown as unreachable.
    pub status_timeout_ms: u64,
    /// The longest a client request waits for Raft (commit or read index).
    pub request_timeout_ms: u64,
    /// The longest a request for the leader is held during a failover, while
    /// this node knows no leader or cannot connect to the one it knows (and
    /// at most half the client's deadline); 0 answers `UNAVAILABLE` at once.
    pub leader_hold_ms: u64,
    /// sled's page cache.
    pub sled_cache_bytes_max: u64,
    /// Appends waiting for one group-commit flush.
    pub flush_queue_max: usize,
    /// Task events kept for watchers that resume from a revision.
    pub watch_history_events_max: usize,
    /// Task events a live watcher may lag by before it must resume.
    pub watch_channel_events_max: usize,
    /// Open watch streams on this node.
    pub watchers_max: usize,
    /// The most tasks a watch that resumes from a revision older than the
    /// kept events may catch up with (the current version of each task
    /// changed since); further behind, it is told to list and resume.
    pub watch_catch_up_tasks_max: usize,
    /// The most tasks one step of that catch-up looks at while it holds
    /// the state.
    pub watch_catch_up_scanned_tasks_max: usize,
    /// The page size of a `ListTasks` call that names none.
    pub list_page_size_default: u32,
    /// The largest page of one `ListTasks` call; a larger page asked for is
    /// cut to it.
    pub list_page_size_max: u32,
    /// The most tasks one `ListTasks` call looks at while it holds the
    /// state: a filter that few tasks pass returns a short (even empty)
    /// page with a token to go on, rather than walking every task.
    pub list_scanned_tasks_max: u32,
    /// Connections the metrics server serves at once; more are closed.
    pub metrics_connections_max: usize,
    /// The longest one metrics connection may take, request and answer.
    pub metrics_timeout_ms: u64,
    /// Ready queues the metrics list by name (the first in name order); the
    /// others are only counted, so a million queues make no million lines.
    pub metrics_queues_max: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            api_message_bytes_max: 4 * 1024 * 1024,
            peer_message_bytes_max: 64 * 1024 * 1024,
            peer_appends_in_flight_max: 64,
            snapshot_chunk_bytes: 1024 * 1024,
            snapshot_bytes_max: 8 * 1024 * 1024 * 1024,
            api_concurrency_per_connection_max: 1_024,
            rpc_timeout_ms: 6_000,
            connect_timeout_ms: 1_000,
            status_timeout_ms: 1_000,
            request_timeout_ms: 5_000,
            leader_hold_ms: 2_000,
            sled_cache_bytes_max: 128 * 1024 * 1024,
            flush_queue_max: 4_096,
            watch_history_events_max: 10_000,
            watch_channel_events_max: 4_096,
            watchers_max: 1_024,
            watch_catch_up_tasks_max: 100_000,
            watch_catch_up_scanned_tasks_max: 10_000,
            list_page_size_default: 100,
            list_page_size_max: 1_000,
            list_scanned_tasks_max: 10_000,
            metrics_connections_max: 16,
            metrics_timeout_ms: 5_000,
            metrics_queues_max: 100,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: 0,
            api_addr: "127.0.0.1:7001".into(),
            raft_addr: "127.0.0.1:7101".into(),
            metrics_addr: String::new(),
            data_dir: PathBuf::from("data"),
            initial_cluster: String::new(),
            slots: 0,
            worker_threads: 0,
            labels: BTreeMap::new(),
            raft: RaftTimings::default(),
            execution: ExecutionConfig::default(),
            limits: Limits::default(),
            server: ServerLimits::default(),
        }
    }
}

impl NodeConfig {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text)
            .map_err(|err| ConfigError::Parse { path: path.to_owned(), message: err.to_string() })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if self.node_id == 0 {
            return invalid("node_id must be given and at least 1".into());
        }
        for (name, addr) in [("api_addr", &self.api_addr), ("raft_addr", &self.raft_addr)] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return invalid(format!("{name} {addr:?} is not an IP:PORT address"));
            }
        }
        if self.api_addr == self.raft_addr {
            return invalid("api_addr and raft_addr must differ".into());
        }
        if !self.metrics_addr.is_empty() {
            if self.metrics_addr.parse::<std::net::SocketAddr>().is_err() {
                return invalid(format!(
                    "metrics_addr {:?} is not an IP:PORT address (leave it empty for none)",
                    self.metrics_addr
                ));
            }
            if self.metrics_addr == self.api_addr || self.metrics_addr == self.raft_addr {
                return invalid("metrics_addr must differ from api_addr and raft_addr".into());
            }
        }
        let members = self.initial_members()?;
        if let Some(me) = members.get(&self.node_id)
            && (me.api_addr != self.api_addr || me.raft_addr != self.raft_addr)
        {
            return invalid(format!(
                "initial_cluster gives node {} the addresses {me}, but this node has api={} raft={}",
                self.node_id, self.api_addr, self.raft_addr
            ));
        }
        if !members.is_empty() && !members.contains_key(&self.node_id) {
            return invalid(format!("initial_cluster does not name this node ({})", self.node_id));
        }
        if self.worker_threads > WORKER_THREADS_MAX {
            return invalid(format!("worker_threads must be at most {WORKER_THREADS_MAX}"));
        }
        let raft = &self.raft;
        if raft.heartbeat_interval_ms == 0
            || raft.heartbeat_interval_ms.saturating_mul(4) > raft.election_timeout_ms
        {
            return invalid(
                "heartbeat_interval_ms must be at least 1 and at most a quarter of election_timeout_ms"
                    .into(),
            );
        }
        if raft.quorum_silence_ms_max < raft.election_timeout_ms
            || raft.quorum_silence_ms_max >= self.server.request_timeout_ms
        {
            return invalid(
                "quorum_silence_ms_max must be at least election_timeout_ms and less than request_timeout_ms"
                    .into(),
            );
        }
        if raft.append_timeout_ms < raft.heartbeat_interval_ms {
            return invalid("append_timeout_ms must be at least heartbeat_interval_ms".into());
        }
        if raft.replication_retry_ms_max < raft.heartbeat_interval_ms {
            return invalid(
                "replication_retry_ms_max must be at least heartbeat_interval_ms".into(),
            );
        }
        if raft.snapshot_after_entries == 0 {
            return invalid("snapshot_after_entries must be at least 1".into());
        }
        if raft.snapshot_after_log_bytes < SNAPSHOT_AFTER_LOG_BYTES_MIN {
            return invalid(format!(
                "snapshot_after_log_bytes must be at least {SNAPSHOT_AFTER_LOG_BYTES_MIN}"
            ));
        }
        let execution = &self.execution;
        if execution.heartbeat_interval_ms == 0
            || execution.heartbeat_interval_ms * 3 > execution.lease_ms
        {
            return invalid("execution.heartbeat_interval_ms must be at least 1 and at most a third of lease_ms".into());
        }
        if execution.lease_grace_ms < 2 * execution.heartbeat_interval_ms {
            return invalid(
                "execution.lease_grace_ms must be at least twice heartbeat_interval_ms".into(),
            );
        }
        if execution.output_tail_bytes_max == 0
            || execution.output_tail_bytes_max > crate::scheduler::limits::OUTPUT_TAIL_BYTES_CEILING
        {
            return invalid(format!(
                "execution.output_tail_bytes_max must be within 1..={}",
                crate::scheduler::limits::OUTPUT_TAIL_BYTES_CEILING
            ));
        }
        if execution.prefetch_per_slot > PREFETCH_PER_SLOT_MAX {
            return invalid(format!(
                "execution.prefetch_per_slot must be at most {PREFETCH_PER_SLOT_MAX}"
            ));
        }
        if execution.prefetch_window_ms > execution.lease_ms {
            return invalid("execution.prefetch_window_ms must be at most lease_ms".into());
        }
        if execution.start_report_delay_ms > execution.lease_ms {
            return invalid("execution.start_report_delay_ms must be at most lease_ms".into());
        }
        if execution.report_batch_max == 0
            || execution.report_batch_max > crate::executor::protocol::REPORTS_PER_REQUEST_MAX
        {
            return invalid(format!(
                "execution.report_batch_max must be within 1..={}",
                crate::executor::protocol::REPORTS_PER_REQUEST_MAX
            ));
        }
        if execution.report_batch_bytes_max + 1024 * 1024 > self.server.peer_message_bytes_max {
            return invalid(
                "execution.report_batch_bytes_max must leave a MiB of room within peer_message_bytes_max"
                    .into(),
            );
        }
        if execution.report_queue_max == 0
            || execution.leader_report_requests_queued_max == 0
            || execution.leader_heartbeats_queued_max == 0
            || execution.assign_batch_max == 0
            || execution.purge_batch_max == 0
            || execution.purge_interval_ms == 0
            || execution.finished_tasks_max == 0
        {
            return invalid(
                "execution queue and batch sizes, finished_tasks_max and the purge interval must be at least 1"
                    .into(),
            );
        }
        self.limits.validate().map_err(|err| ConfigError::Invalid(err.0))?;
        let server = &self.server;
        let positive = [
            ("api_message_bytes_max", server.api_message_bytes_max as u64),
            ("peer_message_bytes_max", server.peer_message_bytes_max as u64),
            ("peer_appends_in_flight_max", server.peer_appends_in_flight_max as u64),
            ("snapshot_chunk_bytes", server.snapshot_chunk_bytes as u64),
            ("snapshot_bytes_max", server.snapshot_bytes_max),
            (
                "api_concurrency_per_connection_max",
                server.api_concurrency_per_connection_max as u64,
            ),
            ("rpc_timeout_ms", server.rpc_timeout_ms),
            ("connect_timeout_ms", server.connect_timeout_ms),
            ("status_timeout_ms", server.status_timeout_ms),
            ("request_timeout_ms", server.request_timeout_ms),
            ("sled_cache_bytes_max", server.sled_cache_bytes_max),
            ("flush_queue_max", server.flush_queue_max as u64),
            ("watch_history_events_max", server.watch_history_events_max as u64),
            ("watch_channel_events_max", server.watch_channel_events_max as u64),
            ("watchers_max", server.watchers_max as u64),
            ("watch_catch_up_tasks_max", server.watch_catch_up_tasks_max as u64),
            ("watch_catch_up_scanned_tasks_max", server.watch_catch_up_scanned_tasks_max as u64),
            ("list_page_size_default", server.list_page_size_default as u64),
            ("list_page_size_max", server.list_page_size_max as u64),
            ("list_scanned_tasks_max", server.list_scanned_tasks_max as u64),
            ("metrics_connections_max", server.metrics_connections_max as u64),
            ("metrics_timeout_ms", server.metrics_timeout_ms),
        ];
        for (name, value) in positive {
            if value == 0 {
                return invalid(format!("{name} must be at least 1"));
            }
        }
        if server.snapshot_chunk_bytes + 1024 > server.peer_message_bytes_max {
            return invalid(
                "snapshot_chunk_bytes must leave room within peer_message_bytes_max".into(),
            );
        }
        if server.rpc_timeout_ms <= server.request_timeout_ms {
            return invalid("rpc_timeout_ms must exceed request_timeout_ms, so a forwarded request outlives the leader's wait".into());
        }
        if server.leader_hold_ms > server.request_timeout_ms {
            return invalid("leader_hold_ms must not exceed request_timeout_ms".into());
        }
        if server.list_page_size_default > server.list_page_size_max {
            return invalid("list_page_size_default must not exceed list_page_size_max".into());
        }
        if server.list_scanned_tasks_max < server.list_page_size_max {
            return invalid(
                "list_scanned_tasks_max must be at least list_page_size_max, so an unfiltered page is always full".into(),
            );
        }
        Ok(())
    }

    /// Parses `initial_cluster`.
    pub fn initial_members(&self) -> Result<BTreeMap<NodeId, PeerNode>, ConfigError> {
        parse_members(&self.initial_cluster).map_err(ConfigError::Invalid)
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.data_dir.join("snapshots")
    }

    pub fn executor_slots(&self) -> u32 {
        if self.slots > 0 {
            return self.slots;
        }
        cpus()
    }

    /// The worker threads the node's async runtime gets.
    pub fn runtime_worker_threads(&self) -> usize {
        if self.worker_threads > 0 {
            return self.worker_threads as usize;
        }
        cpus() as usize
    }
}

/// The CPUs this process may use.
fn cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// Parses `1=127.0.0.1:7001/127.0.0.1:7101,2=...` into members.
pub fn parse_members(text: &str) -> Result<BTreeMap<NodeId, PeerNode>, String> {
    let mut members = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        let shape = || format!("initial cluster member {item:?} is not ID=API_ADDR/RAFT_ADDR");
        let (id, addrs) = item.split_once('=').ok_or_else(shape)?;
        let (api_addr, raft_addr) = addrs.split_once('/').ok_or_else(shape)?;
        let id: NodeId = id.trim().parse().map_err(|_| shape())?;
        for addr in [api_addr, raft_addr] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(format!("{}: {addr:?} is not an IP:PORT address", shape()));
            }
        }
        if id == 0 {
            return Err(format!("{}: node ids start at 1", shape()));
        }
        let node = PeerNode { api_addr: api_addr.into(), raft_addr: raft_addr.into() };
        if members.insert(id, node).is_some() {
            return Err(format!("initial cluster names node {id} twice"));
        }
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> NodeConfig {
        NodeConfig {
            node_id: 1,
            initial_cluster: "1=127.0.0.1:7001/127.0.0.1:7101, 2=127.0.0.1:7002/127.0.0.1:7102"
                .into(),
            ..NodeConfig::default()
        }
    }

    #[test]
    fn defaults_with_an_id_are_valid() {
        valid().validate().unwrap();
        assert_eq!(valid().initial_members().unwrap().len(), 2);
    }

    #[test]
    fn bad_configurations_are_refused_with_a_reason() {
        let cases: Vec<(&str, NodeConfig)> = vec![
            ("node_id", NodeConfig { node_id: 0, ..valid() }),
            ("IP:PORT", NodeConfig { api_addr: "nowhere".into(), ..valid() }),
            ("must differ", NodeConfig { raft_addr: "127.0.0.1:7001".into(), ..valid() }),
            (
                "not ID=API_ADDR/RAFT_ADDR",
                NodeConfig { initial_cluster: "1=127.0.0.1:7001".into(), ..valid() },
            ),
            (
                "twice",
                NodeConfig {
                    initial_cluster:
                        "1=127.0.0.1:7001/127.0.0.1:7101,1=127.0.0.1:7001/127.0.0.1:7101".into(),
                    ..valid()
                },
            ),
            (
                "does not name this node",
                NodeConfig {
                    node_id: 3,
                    api_addr: "127.0.0.1:7003".into(),
                    raft_addr: "127.0.0.1:7103".into(),
                    ..valid()
                },
            ),
            ("metrics_addr", NodeConfig { metrics_addr: "localhost".into(), ..valid() }),
            (
                "metrics_addr must differ",
                NodeConfig { metrics_addr: "127.0.0.1:7101".into(), ..valid() },
            ),
            ("gives node 1", NodeConfig { api_addr: "127.0.0.1:9999".into(), ..valid() }),
            (
                "worker_threads must be at most",
                NodeConfig { worker_threads: WORKER_THREADS_MAX + 1, ..valid() },
            ),
            (
                "a quarter of election",
                NodeConfig {
                    raft: RaftTimings { heartbeat_interval_ms: 63, ..RaftTimings::default() },
                    ..valid()
                },
            ),
            (
                "quorum_silence_ms_max must be at least election_timeout_ms",
                NodeConfig {
                    raft: RaftTimings { quorum_silence_ms_max: 249, ..RaftTimings::default() },
                    ..valid()
                },
            ),
            (
                "less than request_timeout_ms",
                NodeConfig {
                    raft: RaftTimings { quorum_silence_ms_max: 5_000, ..RaftTimings::default() },
                    ..valid()
                },
            ),
            (
                "append_timeout_ms must be at least heartbeat_interval_ms",
                NodeConfig {
                    raft: RaftTimings { append_timeout_ms: 49, ..RaftTimings::default() },
                    ..valid()
                },
            ),
            (
                "replication_retry_ms_max must be at least heartbeat_interval_ms",
                NodeConfig {
                    raft: RaftTimings { replication_retry_ms_max: 49, ..RaftTimings::default() },
                    ..valid()
                },
            ),
            (
                "prefetch_per_slot must be at most",
                NodeConfig {
                    execution: ExecutionConfig {
                        prefetch_per_slot: PREFETCH_PER_SLOT_MAX + 1,
                        ..ExecutionConfig::default()
                    },
                    ..valid()
                },
            ),
            (
                "prefetch_window_ms must be at most lease_ms",
                NodeConfig {
                    execution: ExecutionConfig {
                        prefetch_window_ms: 3_001,
                        ..ExecutionConfig::default()
                    },
                    ..valid()
                },
            ),
            (
                "start_report_delay_ms must be at most lease_ms",
                NodeConfig {
                    execution: ExecutionConfig {
                        start_report_delay_ms: 3_001,
                        ..ExecutionConfig::default()
                    },
                    ..valid()
                },
            ),
            (
                "execution queue and batch sizes",
                NodeConfig {
                    execution: ExecutionConfig {
                        leader_heartbeats_queued_max: 0,
                        ..ExecutionConfig::default()
                    },
                    ..valid()
                },
            ),
            (
                "execution queue and batch sizes",
                NodeConfig {
                    execution: ExecutionConfig {
                        leader_report_requests_queued_max: 0,
                        ..ExecutionConfig::default()
                    },
                    ..valid()
                },
            ),
            (
                "queued_tasks_max",
                NodeConfig {
                    limits: Limits { queued_tasks_max: 0, ..Limits::default() },
                    ..valid()
                },
            ),
            (
                "watchers_max",
                NodeConfig {
                    server: ServerLimits { watchers_max: 0, ..ServerLimits::default() },
                    ..valid()
                },
            ),
            (
                "leader_hold_ms must not exceed request_timeout_ms",
                NodeConfig {
                    server: ServerLimits { leader_hold_ms: 5_001, ..ServerLimits::default() },
                    ..valid()
                },
            ),
            (
                "list_scanned_tasks_max must be at least list_page_size_max",
                NodeConfig {
                    server: ServerLimits { list_scanned_tasks_max: 999, ..ServerLimits::default() },
                    ..valid()
                },
            ),
            (
                "list_scanned_tasks_max must be at least 1",
                NodeConfig {
                    server: ServerLimits { list_scanned_tasks_max: 0, ..ServerLimits::default() },
                    ..valid()
                },
            ),
            (
                "watch_catch_up_tasks_max must be at least 1",
                NodeConfig {
                    server: ServerLimits { watch_catch_up_tasks_max: 0, ..ServerLimits::default() },
                    ..valid()
                },
            ),
            (
                "watch_catch_up_scanned_tasks_max must be at least 1",
                NodeConfig {
                    server: ServerLimits {
                        watch_catch_up_scanned_tasks_max: 0,
                        ..ServerLimits::default()
                    },
                    ..valid()
                },
            ),
        ];
        for (expected, config) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }

    #[test]
    fn toml_file_overrides_defaults_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "node_id = 2\nslots = 3\n[raft]\nheartbeat_interval_ms = 50\n[limits]\nargs_max = 8\n",
        )
        .unwrap();
        let config = NodeConfig::from_file(&path).unwrap();
        assert_eq!((config.node_id, config.slots, config.raft.heartbeat_interval_ms), (2, 3, 50));
        assert_eq!(config.limits.args_max, 8);
        assert_eq!(config.raft.election_timeout_ms, RaftTimings::default().election_timeout_ms);
        assert_eq!(config.runtime_worker_threads(), cpus() as usize);
        std::fs::write(&path, "node_id = 2\nworker_threads = 1\n").unwrap();
        assert_eq!(NodeConfig::from_file(&path).unwrap().runtime_worker_threads(), 1);
        std::fs::write(&path, "node_id = 2\nslotz = 3\n").unwrap();
        let err = NodeConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("slotz"), "{err}");
    }

    /// The README's example file names only keys that exist, with values
    /// that pass validation, and its execution values are the defaults.
    #[test]
    fn the_readmes_example_file_is_a_valid_config() {
        let readme = include_str!("../README.md");
        let start = readme.find("```toml\n").expect("the README has a TOML example") + 8;
        let len = readme[start..].find("```").expect("the TOML example ends");
        let config: NodeConfig = toml::from_str(&readme[start..start + len]).unwrap();
        config.validate().unwrap();
        assert_eq!(config.execution, ExecutionConfig::default());
    }
}
