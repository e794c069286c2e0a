//! A running node: opens the storage, starts Raft, serves the client API and
//! the peer service on their own listeners, and shuts down in order.
//!
//! `run` takes its shutdown signal as a future, so `main` passes Ctrl-C or
//! SIGTERM and tests pass whatever they like; [`run_on`] also takes the
//! [`Platform`] (network, clock, disk, task runner), which a simulation
//! replaces. Shutdown order: stop serving clients and peers, stop Raft,
//! flush the database.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::SnapshotPolicy;
use openraft::type_config::async_runtime::WatchReceiver as _;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::api::Context;
use crate::api::cluster::ClusterService;
use crate::api::requests::{CountRequestsLayer, RequestCounts};
use crate::api::tasks::TasksService;
use crate::config::{ConfigError, NodeConfig};
use crate::executor::warden::WardenHandle;
use crate::executor::{AttemptCounters, Executor, Reporter};
use crate::leader::{LeaderService, QuorumWatch};
use crate::metrics::{self, MetricsLimits, MetricsSource};
use crate::platform::{Incoming, Platform};
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::peer_v1::raft_peer_server::RaftPeerServer;
use crate::proto::taskraft_v1::cluster_server::ClusterServer;
use crate::proto::taskraft_v1::tasks_server::TasksServer;
use crate::raft::Raft;
use crate::raft::network::{PeerAcks, PeerClientConfig, PeerNetwork};
use crate::raft::service::PeerService;
use crate::storage::{AppendedBytes, EventLimits, LogStore, StateMachineStore, kv};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("raft: {0}")]
    Raft(String),
    #[error("{what} server failed: {source}")]
    Serve { what: &'static str, source: tonic::transport::Error },
    #[error("cannot start the warden that fences this node's tasks: {0}")]
    Warden(std::io::Error),
}

/// Runs a node on the real platform until `shutdown` completes.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    run_on(config, Platform::production(), shutdown).await
}

/// Runs a node on `platform` until `shutdown` completes.
pub async fn run_on(
    config: NodeConfig,
    platform: Platform,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    config.validate()?;
    let span = info_span!("node", node_id = config.node_id);
    run_validated(Arc::new(config), platform, shutdown).instrument(span).await
}

fn raft_config(config: &NodeConfig) -> Result<openraft::Config, NodeError> {
    let timings = &config.raft;
    let raft_config = openraft::Config {
        cluster_name: "taskraft".into(),
        heartbeat_interval: timings.heartbeat_interval_ms,
        // openraft fixes the leader lease at `election_timeout_max` and lets a
        // follower campaign only after the lease *and then* a timeout sampled
        // from [min, max) have passed (`utime.rs`). With max at our election
        // timeout T and min at T/2, the lease is T, as in etcd, and a silent
        // leader is replaced after 1.5 T to 2 T (etcd: T to 2 T).
        election_timeout_min: timings.election_timeout_ms / 2,
        election_timeout_max: timings.election_timeout_ms,
        install_snapshot_timeout: timings.snapshot_send_timeout_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(timings.snapshot_after_entries),
        max_in_snapshot_log_to_keep: timings.snapshot_keep_entries,
        enable_pre_vote: Some(true),
        // A leader that restarts must win an election in a new term, not take
        // up its old term again (openraft's default). Restored in its old
        // term, it reads at the commit index it had persisted, which lags
        // what it had acknowledged, so a linearizable read just after a
        // restart of the whole cluster missed acknowledged tasks; and an
        // entry it had sent but lost in a power cut could be replaced by a
        // new one with the same log id, which a follower that kept the old
        // one would never truncate. A new term's blank entry fixes both.
        enable_leader_restore: Some(false),
        backoff: timings.replication_backoff(),
        ..openraft::Config::default()
    };
    raft_config.validate().map_err(|err| NodeError::Raft(format!("invalid Raft timings: {err}")))
}

/// How often the log's growth since the last snapshot is checked.
const SNAPSHOT_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// Has openraft build a snapshot once the entries appended since the last
/// one reach [`snapshot_threshold_bytes`], and purge the log behind each new
/// snapshot down to `keep_bytes_max` ([`purge_to_kept_bytes`]). openraft's
/// own policies count entries only, and entries range from a few bytes to a
/// batch of 1,000 tasks.
async fn snapshot_by_log_bytes(
    raft: Raft,
    log_store: LogStore,
    appended: AppendedBytes,
    state_machine: StateMachineStore,
    after_log_bytes: u64,
    keep_bytes_max: u64,
    shutdown: CancellationToken,
) {
    let mut last_snapshot = raft.metrics().borrow_watched().snapshot;
    let mut appended_at_snapshot = appended.get();
    let mut threshold_bytes = snapshot_threshold_bytes(after_log_bytes, &state_machine);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SNAPSHOT_CHECK_INTERVAL) => {}
        }
        let snapshot = raft.metrics().borrow_watched().snapshot;
        if snapshot != last_snapshot {
            last_snapshot = snapshot;
            appended_at_snapshot = appended.get();
            threshold_bytes = snapshot_threshold_bytes(after_log_bytes, &state_machine);
            if let Some(snapshot) = snapshot {
                purge_to_kept_bytes(&raft, &log_store, snapshot.index(), keep_bytes_max).await;
            }
            continue;
        }
        let grown_bytes = appended.get() - appended_at_snapshot;
        if grown_bytes < threshold_bytes {
            continue;
        }
        info!(grown_bytes, threshold_bytes, "the log outgrew its threshold; building a snapshot");
        if let Err(fatal) = raft.trigger().snapshot().await {
            warn!(%fatal, "raft has stopped; no more snapshots");
            return;
        }
        // Counted again from here if the build fails; from its end if not.
        appended_at_snapshot = appended.get();
    }
}

/// Has openraft purge the entries a snapshot up to `snapshot_index` holds
/// beyond the last `keep_bytes_max` bytes of them, when that is more than
/// its own policy (`raft.snapshot_keep_entries` entries) purges. sled keeps
/// the runs of the log in memory until they are removed, so the entries kept
/// behind a snapshot are memory: 1,000 batches of 500 tasks kept about
/// 140 MiB on every node while a 1,000,000-task queue filled. A follower
/// further behind than what is kept gets the snapshot.
async fn purge_to_kept_bytes(
    raft: &Raft,
    log_store: &LogStore,
    snapshot_index: u64,
    keep_bytes_max: u64,
) {
    let store = log_store.clone();
    let point =
        kv::blocking(move || store.purge_point_keeping_bytes(snapshot_index, keep_bytes_max)).await;
    let purge_upto = match point {
        Ok(Some(index)) => index,
        Ok(None) => return,
        Err(err) => {
            warn!(cause = %err, "cannot read the log's size behind the snapshot; leaving it to openraft's policy");
            return;
        }
    };
    let keep_entries = raft.config().max_in_snapshot_log_to_keep;
    let policy_upto = (snapshot_index + 1).saturating_sub(keep_entries).checked_sub(1);
    if policy_upto.is_some_and(|policy_upto| policy_upto >= purge_upto) {
        return;
    }
    debug!(
        purge_upto,
        snapshot_index, keep_bytes_max, "purging the log behind the snapshot by its size"
    );
    if let Err(fatal) = raft.trigger().purge_log(purge_upto).await {
        warn!(%fatal, "raft has stopped; no purge");
    }
}

/// How many bytes of log to append before the next snapshot:
/// `after_log_bytes`, or the size of the current snapshot if that is more.
/// A snapshot costs as much as the state is big, so a fixed threshold would
/// make every appended byte dearer as the queue grows (snapshots of a
/// growing state every 64 MiB cost a quarter of the batch submit rate);
/// this way a snapshot is written at most once per as many bytes of log, and
/// the log a restarted node re-applies stays no bigger than its snapshot.
fn snapshot_threshold_bytes(after_log_bytes: u64, state_machine: &StateMachineStore) -> u64 {
    let snapshot_bytes = state_machine.snapshot_bytes().unwrap_or_else(|err| {
        warn!(cause = %err, "cannot read the snapshot's size; using snapshot_after_log_bytes");
        0
    });
    after_log_bytes.max(snapshot_bytes)
}

async fn bind(platform: &Platform, addr: &str) -> Result<Incoming, NodeError> {
    platform
        .network
        .listen(addr)
        .await
        .map_err(|source| NodeError::Listen { addr: addr.to_owned(), source })
}

async fn run_validated(
    config: Arc<NodeConfig>,
    platform: Platform,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let server = &config.server;
    // Bind first: a taken port is the commonest start-up failure, and it
    // should be reported before anything touches the data directory.
    let api_listener = bind(&platform, &config.api_addr).await?;
    let raft_listener = bind(&platform, &config.raft_addr).await?;
    let metrics_listener = match config.metrics_addr.as_str() {
        "" => None,
        metrics_addr => Some(bind(&platform, metrics_addr).await?),
    };

    let db = platform.disk.open(&config.data_dir, server.sled_cache_bytes_max)?;
    let log_store = LogStore::open(&db, server.flush_queue_max)?;
    let appended_bytes = log_store.appended_bytes();
    let (log_flush_durations, log_appended_bytes) =
        (log_store.flush_durations(), appended_bytes.clone());
    let log_store_handle = log_store.clone();
    let event_limits = EventLimits {
        history_events_max: server.watch_history_events_max,
        channel_events_max: server.watch_channel_events_max,
        catch_up_tasks_max: server.watch_catch_up_tasks_max,
        catch_up_scanned_tasks_max: server.watch_catch_up_scanned_tasks_max,
    };
    let state_machine = StateMachineStore::open(&db, &config.snapshot_dir(), event_limits)?;
    let peer_acks = PeerAcks::default();
    let peers = PeerNetwork::new(
        PeerClientConfig {
            connect_timeout_ms: server.connect_timeout_ms,
            message_bytes_max: server.peer_message_bytes_max,
            snapshot_chunk_bytes: server.snapshot_chunk_bytes,
            snapshot_send_timeout_ms: config.raft.snapshot_send_timeout_ms,
            append_timeout_ms: config.raft.append_timeout_ms,
            appends_in_flight_max: server.peer_appends_in_flight_max,
        },
        platform.network.clone(),
        peer_acks.clone(),
    );
    let raft_config = Arc::new(raft_config(&config)?);
    let raft =
        Raft::new(config.node_id, raft_config, peers.clone(), log_store, state_machine.clone())
            .await
            .map_err(|err| NodeError::Raft(err.to_string()))?;

    // The scheduling loop runs exactly while this node is the committed leader.
    let leader_service = Arc::new(
        LeaderService::new(
            config.node_id,
            raft.clone(),
            state_machine.clone(),
            config.execution.clone(),
            Duration::from_millis(server.request_timeout_ms),
            // Within the leader lease: by then a cut-off leader stops renewing
            // task leases, before any other node can have been elected.
            QuorumWatch {
                acks: peer_acks,
                fresh: Duration::from_millis(config.raft.quorum_fresh_ms()),
            },
            platform.clock.clone(),
        )
        .with_queued_tasks_max(config.limits.queued_tasks_max),
    );
    let leader_watch = {
        let on_start = leader_service.clone();
        let on_stop = leader_service.clone();
        raft.on_leader_change(
            move |leader_id| {
                let service = on_start.clone();
                async move { service.start(leader_id) }
            },
            move |leader_id| {
                let service = on_stop.clone();
                async move { service.stop(leader_id) }
            },
        )
    };
    initialize_if_first(&raft, &config).await?;

    let token = CancellationToken::new();
    tokio::spawn(
        snapshot_by_log_bytes(
            raft.clone(),
            log_store_handle,
            appended_bytes,
            state_machine.clone(),
            config.raft.snapshot_after_log_bytes,
            config.raft.snapshot_keep_bytes_max,
            token.clone(),
        )
        .in_current_span(),
    );
    let executor = Arc::new(Executor {
        node_id: config.node_id,
        slots: config.executor_slots(),
        labels: config.labels.clone(),
        config: config.execution.clone(),
        raft: raft.clone(),
        state_machine: state_machine.clone(),
        leader_service: leader_service.clone(),
        peers: peers.clone(),
        rpc_timeout: Duration::from_millis(server.rpc_timeout_ms),
        shutdown: token.clone(),
        clock: platform.clock.clone(),
        runner: platform.runner.clone(),
        lease: std::sync::Mutex::new(None),
        run_ms_mean: std::sync::Mutex::new(None),
        reporter: Reporter::new(config.execution.report_queue_max),
        counters: AttemptCounters::default(),
    });
    let warden = match platform.warden {
        true => Some(WardenHandle::spawn().map_err(NodeError::Warden)?),
        false => None,
    };
    let executor_task = tokio::spawn(executor.clone().run(warden).in_current_span());
    let api_requests = Arc::new(RequestCounts::default());
    if let Some(listener) = metrics_listener {
        let source = Arc::new(MetricsSource {
            node_id: config.node_id,
            raft: raft.clone(),
            state_machine: state_machine.clone(),
            executor: executor.clone(),
            log_flush: log_flush_durations,
            log_appended_bytes,
            api_requests: api_requests.clone(),
        });
        let limits = MetricsLimits {
            connections_max: server.metrics_connections_max,
            connection_timeout: Duration::from_millis(server.metrics_timeout_ms),
            queues_max: server.metrics_queues_max,
        };
        info!(metrics_addr = %config.metrics_addr, "serving metrics at /metrics");
        tokio::spawn(metrics::serve(listener, source, limits, token.clone()).in_current_span());
    }
    let ctx = Arc::new(Context::new(
        raft.clone(),
        state_machine,
        config.clone(),
        token.clone(),
        platform.clock.clone(),
        leader_service.placement_view(),
        platform.network.clone(),
    ));
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<TasksServer<TasksService>>().await;
    health_reporter.set_serving::<ClusterServer<ClusterService>>().await;
    // Advertise exactly what the client port serves; the peer service is
    // in the same descriptor set but listens elsewhere.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("taskraft.v1.Tasks")
        .with_service_name("taskraft.v1.Cluster")
        .with_service_name("grpc.health.v1.Health")
        .build_v1()
        .map_err(|err| NodeError::Raft(format!("cannot build the reflection service: {err}")))?;

    let api_bytes_max = server.api_message_bytes_max;
    let api_server = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(server.api_concurrency_per_connection_max)
        .layer(CountRequestsLayer(api_requests))
        .add_service(
            TasksServer::new(TasksService::new(ctx.clone()))
                .max_decoding_message_size(api_bytes_max)
                .max_encoding_message_size(api_bytes_max),
        )
        .add_service(
            ClusterServer::new(ClusterService::new(ctx.clone()))
                .max_decoding_message_size(api_bytes_max)
                .max_encoding_message_size(api_bytes_max),
        )
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(api_listener, token.clone().cancelled_owned());

    let peer_bytes_max = server.peer_message_bytes_max;
    let peer_service = PeerService::new(
        raft.clone(),
        leader_service.clone(),
        config.snapshot_dir(),
        server.snapshot_bytes_max,
        token.clone(),
    );
    let peer_server = tonic::transport::Server::builder()
        .add_service(
            RaftPeerServer::new(peer_service)
                .max_decoding_message_size(peer_bytes_max)
                .max_encoding_message_size(peer_bytes_max),
        )
        .serve_with_incoming_shutdown(raft_listener, token.clone().cancelled_owned());

    info!(api_addr = %config.api_addr, raft_addr = %config.raft_addr, "node serving");
    let mut api_task = tokio::spawn(api_server.in_current_span());
    let mut peer_task = tokio::spawn(peer_server.in_current_span());
    let failure = tokio::select! {
        _ = shutdown => { info!("shutdown requested"); None }
        joined = &mut api_task => Some(server_failure("client API", joined)),
        joined = &mut peer_task => Some(server_failure("peer", joined)),
    };
    health_reporter.set_not_serving::<TasksServer<TasksService>>().await;
    token.cancel();
    // The servers stop accepting at once; give in-flight requests a moment.
    let drain = Duration::from_millis(config.server.request_timeout_ms.min(5_000));
    if failure.is_none() {
        let stopped =
            tokio::time::timeout(drain, async { tokio::join!(&mut api_task, &mut peer_task) })
                .await;
        if stopped.is_err() {
            warn!("the servers did not stop within {drain:?}");
        }
    }
    // The executor stops its attempts; the scheduling loop ends.
    if tokio::time::timeout(drain, executor_task).await.is_err() {
        warn!("the executor did not stop within {drain:?}");
    }
    leader_service.shutdown();
    drop(leader_watch);
    if let Err(err) = raft.shutdown().await {
        error!(cause = %err, "raft did not shut down cleanly");
    }
    db.flush().await?;
    info!("node stopped");
    match failure {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

fn server_failure(
    what: &'static str,
    joined: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> NodeError {
    match joined {
        Ok(Ok(())) => NodeError::Raft(format!("the {what} server stopped by itself")),
        Ok(Err(source)) => NodeError::Serve { what, source },
        Err(join) => NodeError::Raft(format!("the {what} server task failed: {join}")),
    }
}

/// Starts a new cluster from `initial_cluster` when this node has the lowest
/// id there and has never been part of a cluster.
async fn initialize_if_first(raft: &Raft, config: &NodeConfig) -> Result<(), NodeError> {
    let members = config.initial_members()?;
    if members.keys().next() != Some(&config.node_id) {
        return Ok(());
    }
    if raft.is_initialized().await.map_err(|err| NodeError::Raft(err.to_string()))? {
        info!("storage holds a cluster already; not initializing");
        return Ok(());
    }
    info!(n_members = members.len(), "initializing a new cluster");
    match raft.initialize(members).await {
        Ok(()) => Ok(()),
        Err(openraft::error::RaftError::APIError(
            openraft::error::InitializeError::NotAllowed(err),
        )) => {
            info!(reason = %err, "cluster already initialized");
            Ok(())
        }
        Err(err) => Err(NodeError::Raft(format!("cannot initialize the cluster: {err}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn replication_retries_start_at_a_heartbeat_and_stay_under_their_maximum() {
        let mut config = NodeConfig::default();
        config.raft.heartbeat_interval_ms = 50;
        config.raft.replication_retry_ms_max = 250;
        let delays: Vec<Duration> = raft_config(&config).unwrap().build_backoff().take(6).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(delays, vec![ms(50), ms(100), ms(200), ms(250), ms(250), ms(250)]);

        config.raft.replication_retry_ms_max = 50;
        let delays: Vec<Duration> = raft_config(&config).unwrap().build_backoff().take(3).collect();
        assert_eq!(delays, vec![ms(50); 3]);
    }
}
