//! The scale scenarios of the load generator (`restart_1m`, `mem_1m`,
//! `snapshot_1m` in `scripts/bench.sh`), for taskraft and etcd alike:
//!
//! - `--fill N`: writes N items as fast as `--clients` batches of `--batch`
//!   allow (taskraft: tasks a day ahead in `SubmitTasks`; etcd: keys in a
//!   `Txn` of puts), then one marker write after all of them. Reports the
//!   servers' resident memory before and after, and the marker. A batch the
//!   cluster refuses (a leader stepped down, an election is under way) is
//!   sent again to the leader found anew, for up to `FILL_RETRY_FOR`;
//!   retries are counted in the report, those whose first try may have
//!   committed after all (a passed deadline, a broken connection, a write
//!   the node says may still commit) apart from those it refused outright.
//!   Such a batch of tasks may then be in the state twice (etcd puts the
//!   same keys again).
//! - `--snapshot`: has the leader build a snapshot (taskraft: `Snapshot`;
//!   etcd: the `Snapshot` stream, read to its end) and reports its size and
//!   the time it took.
//! - `--await-read MARKER`: reads MARKER locally (a stale read; etcd: a
//!   serializable range) through the first of `--endpoints` until it is
//!   there: the member has caught up and serves. Reports the milliseconds
//!   since `--since-unix-ms`.
//! - `--await-commit`: writes through each endpoint in turn until a write
//!   commits; reports the milliseconds since `--since-unix-ms`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use taskraft::proto::taskraft_v1 as pb;
use taskraft::proto::taskraft_v1::cluster_client::ClusterClient;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::{Args, REQUEST_TIMEOUT, Target, connect, etcd, leader_addr, task_spec, tasks_client};

/// The longest a snapshot, a restart or a catch-up may take.
const SCALE_DEADLINE: Duration = Duration::from_secs(300);
/// The longest one probe may take while a member is (re)starting.
const PROBE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a waiting probe tries again.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// The most puts etcd takes in one Txn (its --max-txn-ops default).
const ETCD_TXN_OPS_MAX: usize = 128;
/// How long the fill keeps sending a refused batch again, through
/// elections, before it gives up.
const FILL_RETRY_FOR: Duration = Duration::from_secs(60);
/// The pause before a refused batch is sent again.
const FILL_RETRY_BACKOFF: Duration = Duration::from_millis(100);

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// Writes items `first..first + n` in one request.
async fn write_batch(
    target: Target,
    channel: Channel,
    payload_bytes: usize,
    first: u64,
    n: usize,
) -> anyhow::Result<()> {
    match target {
        Target::Taskraft => {
            let specs = vec![task_spec(payload_bytes, true); n];
            let request =
                taskraft::client::request(pb::SubmitTasksRequest { specs }, REQUEST_TIMEOUT);
            let reply = tasks_client(channel).submit_tasks(request).await?.into_inner();
            anyhow::ensure!(
                reply.results.len() == n,
                "{} of {n} tasks came back",
                reply.results.len()
            );
        }
        Target::Etcd => {
            let success = (first..first + n as u64)
                .map(|seq| etcd::RequestOp {
                    request: Some(etcd::request_op::Request::RequestPut(etcd::PutRequest {
                        key: format!("fill{seq:010}").into_bytes(),
                        value: vec![b'v'; payload_bytes],
                        ..Default::default()
                    })),
                })
                .collect();
            let request = taskraft::client::request(
                etcd::TxnRequest { success, failure: Vec::new() },
                REQUEST_TIMEOUT,
            );
            etcd::kv_client::KvClient::new(channel).txn(request).await?;
        }
    }
    Ok(())
}

/// Where the fill writes: the leader it last found and connections to it.
/// `epoch` counts the times it was found, so that of many writes refused by
/// one leader change only the first looks for the new leader.
struct FillRoute {
    addr: String,
    channels: Vec<Channel>,
    epoch: u64,
}

impl FillRoute {
    async fn to_leader(args: &Args) -> anyhow::Result<FillRoute> {
        let addr = leader_addr(args.target, &args.endpoints).await?;
        let mut channels = Vec::new();
        for _ in 0..args.connections.max(1) {
            channels.push(connect(&addr).await?);
        }
        Ok(FillRoute { addr, channels, epoch: 0 })
    }
}

/// Times the fill sent a batch again, by whether the try before may have
/// committed.
#[derive(Default)]
struct FillRetries {
    /// The cluster refused the write: it did not commit.
    refused: AtomicU64,
    /// The write may have committed before the failure.
    uncertain: AtomicU64,
}

/// Whether a failed write may have committed: the node says so, its
/// deadline passed, or the connection broke under it.
fn may_have_committed(status: &tonic::Status) -> bool {
    status.code() != tonic::Code::Unavailable
        || status.message().contains(taskraft::api::error::WRITE_MAY_STILL_COMMIT)
        || taskraft::api::is_connection_failure(status)
}

/// [`write_batch`], sent again to the leader found anew while the cluster
/// refuses it for a reason that passes (see the module docs).
async fn write_batch_retrying(
    args: &Args,
    route: &tokio::sync::Mutex<FillRoute>,
    retries: &FillRetries,
    first: u64,
    n: usize,
) -> anyhow::Result<()> {
    let give_up_at = Instant::now() + FILL_RETRY_FOR;
    let batch_number = first / args.batch.max(1) as u64;
    loop {
        let (channel, epoch) = {
            let route = route.lock().await;
            (route.channels[batch_number as usize % route.channels.len()].clone(), route.epoch)
        };
        let err = match write_batch(args.target, channel, args.payload_bytes, first, n).await {
            Ok(()) => return Ok(()),
            Err(err) => err,
        };
        let Some(status) = err.downcast_ref::<tonic::Status>() else { return Err(err) };
        if !taskraft::client::is_retryable(status) || Instant::now() >= give_up_at {
            return Err(err);
        }
        let counter =
            if may_have_committed(status) { &retries.uncertain } else { &retries.refused };
        counter.fetch_add(1, Ordering::Relaxed);
        eprintln!("  items {first}.. sent again: {:?}: {}", status.code(), status.message());
        tokio::time::sleep(FILL_RETRY_BACKOFF).await;
        let mut route = route.lock().await;
        if route.epoch == epoch {
            match FillRoute::to_leader(args).await {
                Ok(found) => *route = FillRoute { epoch: epoch + 1, ..found },
                Err(err) => eprintln!("  no leader yet: {err:#}"),
            }
        }
    }
}

/// One write after everything before it: a task id or an etcd key.
async fn marker_write(
    target: Target,
    channel: Channel,
    timeout: Duration,
) -> anyhow::Result<String> {
    match target {
        Target::Taskraft => {
            let request = taskraft::client::request(
                pb::SubmitTaskRequest { spec: Some(task_spec(0, true)) },
                timeout,
            );
            let reply = tasks_client(channel).submit_task(request).await?.into_inner();
            reply.task.map(|task| task.id).context("SubmitTask answered without a task")
        }
        Target::Etcd => {
            let key = format!("marker{}", unix_ms());
            let request = taskraft::client::request(
                etcd::PutRequest {
                    key: key.clone().into_bytes(),
                    value: b"m".to_vec(),
                    ..Default::default()
                },
                timeout,
            );
            etcd::kv_client::KvClient::new(channel).put(request).await?;
            Ok(key)
        }
    }
}

/// `--fill N`.
pub async fn fill(args: &Args, n_items: u64) -> anyhow::Result<()> {
    let batch = match args.target {
        Target::Taskraft => args.batch,
        Target::Etcd => args.batch.min(ETCD_TXN_OPS_MAX),
    };
    let route = Arc::new(tokio::sync::Mutex::new(FillRoute::to_leader(args).await?));
    let retries = Arc::new(FillRetries::default());
    let rss_before: Vec<Option<u64>> = args.server_pids.iter().map(|pid| rss_kib(*pid)).collect();
    let started = Instant::now();
    let n_written = Arc::new(AtomicU64::new(0));
    let permits = Arc::new(Semaphore::new(args.clients));
    let mut writes = JoinSet::new();
    let mut next_progress = started + Duration::from_secs(5);
    let mut first = 0;
    while first < n_items {
        let n = (batch as u64).min(n_items - first) as usize;
        let permit = permits.clone().acquire_owned().await?;
        let (args, route, retries, counter) =
            (args.clone(), route.clone(), retries.clone(), n_written.clone());
        writes.spawn(async move {
            let written = write_batch_retrying(&args, &route, &retries, first, n).await;
            if written.is_ok() {
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            drop(permit);
            written
        });
        while let Some(done) = writes.try_join_next() {
            done??;
        }
        if Instant::now() >= next_progress {
            let n = n_written.load(Ordering::Relaxed);
            eprintln!(
                "  filled {n} of {n_items} ({:.0}/s)",
                n as f64 / started.elapsed().as_secs_f64()
            );
            next_progress += Duration::from_secs(5);
        }
        first += n as u64;
    }
    while let Some(done) = writes.join_next().await {
        done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (leader, channel) = {
        let route = route.lock().await;
        (route.addr.clone(), route.channels[0].clone())
    };
    let marker = marker_write(args.target, channel, REQUEST_TIMEOUT).await?;
    // Let background work (apply, compaction) settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after: Vec<Option<u64>> = args.server_pids.iter().map(|pid| rss_kib(*pid)).collect();
    let growths: Vec<f64> = rss_before
        .iter()
        .zip(&rss_after)
        .filter_map(|(before, after)| {
            Some((after.as_ref()?.saturating_sub(*before.as_ref()?)) as f64 / 1024.0)
        })
        .collect();
    let result = serde_json::json!({
        "target": match args.target { Target::Taskraft => "taskraft", Target::Etcd => "etcd" },
        "mode": "fill",
        "leader": leader,
        "items": n_items,
        "batch": batch,
        "seconds": seconds,
        "items_per_s": n_items as f64 / seconds,
        "marker": marker,
        "retried_refused": retries.refused.load(Ordering::Relaxed),
        "retried_uncertain": retries.uncertain.load(Ordering::Relaxed),
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_growth_mib_per_node": if growths.is_empty() { 0.0 } else { growths.iter().sum::<f64>() / growths.len() as f64 },
    });
    println!("{result}");
    Ok(())
}

/// `--snapshot`.
pub async fn snapshot(args: &Args) -> anyhow::Result<()> {
    let leader = leader_addr(args.target, &args.endpoints).await?;
    let channel = connect(&leader).await?;
    let started = Instant::now();
    let (bytes, build_ms) = match args.target {
        Target::Taskraft => {
            let request = taskraft::client::request(pb::SnapshotRequest {}, SCALE_DEADLINE);
            let reply = ClusterClient::new(channel).snapshot(request).await?.into_inner();
            (reply.bytes, reply.build_ms as f64)
        }
        Target::Etcd => {
            let request = taskraft::client::request(etcd::SnapshotRequest {}, SCALE_DEADLINE);
            let mut stream = etcd::maintenance_client::MaintenanceClient::new(channel)
                .max_decoding_message_size(64 * 1024 * 1024)
                .snapshot(request)
                .await?
                .into_inner();
            let mut bytes = 0;
            while let Some(chunk) = stream.message().await? {
                bytes += chunk.blob.len() as u64;
            }
            (bytes, started.elapsed().as_secs_f64() * 1e3)
        }
    };
    let result = serde_json::json!({
        "target": match args.target { Target::Taskraft => "taskraft", Target::Etcd => "etcd" },
        "mode": "snapshot",
        "leader": leader,
        "bytes": bytes,
        "build_ms": build_ms,
    });
    println!("{result}");
    Ok(())
}

/// Whether `marker` is there in a local read through `channel`.
async fn has_marker(target: Target, channel: Channel, marker: &str) -> anyhow::Result<bool> {
    match target {
        Target::Taskraft => {
            let request = taskraft::client::request(
                pb::GetTaskRequest { id: marker.to_owned(), stale: true },
                PROBE_ATTEMPT_TIMEOUT,
            );
            match tasks_client(channel).get_task(request).await {
                Ok(_) => Ok(true),
                Err(status) if status.code() == tonic::Code::NotFound => Ok(false),
                Err(status) => Err(status.into()),
            }
        }
        Target::Etcd => {
            let request = taskraft::client::request(
                etcd::RangeRequest {
                    key: marker.as_bytes().to_vec(),
                    serializable: true,
                    count_only: true,
                    ..Default::default()
                },
                PROBE_ATTEMPT_TIMEOUT,
            );
            let reply = etcd::kv_client::KvClient::new(channel).range(request).await?;
            Ok(reply.into_inner().count > 0)
        }
    }
}

fn since_ms(args: &Args) -> anyhow::Result<u64> {
    let since =
        args.since_unix_ms.context("--await-read and --await-commit need --since-unix-ms")?;
    Ok(unix_ms().saturating_sub(since))
}

/// `--await-read MARKER`.
pub async fn await_read(args: &Args, marker: &str) -> anyhow::Result<()> {
    let endpoint = args.endpoints.first().context("--await-read needs an endpoint")?;
    let deadline = Instant::now() + SCALE_DEADLINE;
    loop {
        let probe = async { has_marker(args.target, connect(endpoint).await?, marker).await };
        if let Ok(Ok(true)) = tokio::time::timeout(PROBE_ATTEMPT_TIMEOUT, probe).await {
            break;
        }
        if Instant::now() >= deadline {
            bail!("{endpoint} did not serve {marker} within {SCALE_DEADLINE:?}");
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
    println!(
        "{}",
        serde_json::json!({ "mode": "await_read", "endpoint": endpoint, "ms": since_ms(args)? })
    );
    Ok(())
}

/// `--await-commit`.
pub async fn await_commit(args: &Args) -> anyhow::Result<()> {
    let deadline = Instant::now() + SCALE_DEADLINE;
    for endpoint in args.endpoints.iter().cycle() {
        let write = async {
            marker_write(args.target, connect(endpoint).await?, PROBE_ATTEMPT_TIMEOUT).await
        };
        if let Ok(Ok(_)) = tokio::time::timeout(PROBE_ATTEMPT_TIMEOUT, write).await {
            println!(
                "{}",
                serde_json::json!({ "mode": "await_commit", "endpoint": endpoint, "ms": since_ms(args)? })
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("no write committed within {SCALE_DEADLINE:?}");
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
    bail!("no endpoints")
}
