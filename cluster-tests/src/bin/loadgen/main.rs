//! The load generator of `scripts/bench.sh`: drives a taskraft cluster
//! (SubmitTask, or SubmitTasks in batches) or an etcd cluster (Put) with the
//! same settings, and prints one JSON line of results.
//!
//! - Closed loop (`--clients N`): N requests in flight, each sent when the
//!   one before it answered; for throughput.
//! - Open loop (`--rate R`): requests sent at R per second whatever the
//!   answers, latency counted from when each was due, so that a stall cannot
//!   hide behind requests never sent (no coordinated omission).
//!
//! Requests go to the leader only, over `--connections` HTTP/2 connections.
//! Latencies go into an HDR histogram, after `--warmup`. CPU seconds of the
//! servers (`--server-pids`) and of the generator come from `/proc`.
//! Submitted tasks are scheduled a day ahead, so that submissions are
//! measured, not executions; each spec is about `--payload-bytes` long, like
//! the etcd value.
//!
//! `--failover` runs one failover trial instead: it writes once at a time
//! through a follower, kills the leader with SIGKILL (`--server-pids` in
//! the order of `--endpoints`), and reports how long until a write sent
//! after the kill commits and how many sent after it failed first; for
//! taskraft also until the next task starts, and whether every acknowledged
//! submission is still there.
//!
//! `--to-start`, `--exec N` and `--spawn` measure execution instead (see
//! [`execution`]); `--fill N`, `--snapshot`, `--await-read` and
//! `--await-commit` measure scale (see [`scale`]).

mod execution;
mod scale;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use prost::Message;
use taskraft::proto::taskraft_v1 as pb;
use taskraft::proto::taskraft_v1::cluster_client::ClusterClient;
use taskraft::proto::taskraft_v1::tasks_client::TasksClient;
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// The longest one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The most requests an open-loop run keeps in flight.
const OPEN_LOOP_IN_FLIGHT_MAX: usize = 4_096;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Target {
    Taskraft,
    Etcd,
}

#[derive(Debug, Clone, Parser)]
#[command(about = "Drives taskraft or etcd with the same load; prints one JSON line")]
struct Args {
    #[arg(long, value_enum)]
    target: Target,
    /// Client addresses of the cluster's members, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Closed loop: requests in flight. Open loop: the most in flight.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// HTTP/2 connections to the leader.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Open loop at this many requests per second (closed loop when absent).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    warmup: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    duration: Duration,
    /// The etcd value size, and about the size of each task spec.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// taskraft only: tasks per SubmitTasks call (1: SubmitTask).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// PIDs of the server processes, for their CPU time.
    #[arg(long, value_delimiter = ',')]
    server_pids: Vec<u32>,
    /// Run one failover trial (see the module docs).
    #[arg(long)]
    failover: bool,
    /// Only write once through each endpoint; fail if one cannot commit.
    #[arg(long)]
    ready: bool,
    /// Submit-to-start latency of runnable tasks at `--rate`.
    #[arg(long, requires = "rate")]
    to_start: bool,
    /// Run this many queued no-op tasks and report the execution rate.
    #[arg(long)]
    exec: Option<usize>,
    /// The machine's raw spawn rate of `true`, `--clients` at a time.
    #[arg(long)]
    spawn: bool,
    /// Write this many items in batches of `--batch`, then a marker.
    #[arg(long)]
    fill: Option<u64>,
    /// Have the leader build a snapshot; report its size and build time.
    #[arg(long)]
    snapshot: bool,
    /// Wait until the first endpoint serves this marker in a local read.
    #[arg(long, requires = "since_unix_ms")]
    await_read: Option<String>,
    /// Wait until a write through any endpoint commits.
    #[arg(long, requires = "since_unix_ms")]
    await_commit: bool,
    /// The moment `--await-read` and `--await-commit` measure from.
    #[arg(long)]
    since_unix_ms: Option<u64>,
}

/// The deadline of one write while the leader may be dead.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// The longest a failover trial waits for writes, or a task, to go through.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);

/// One way to send one request.
#[derive(Clone)]
enum Driver {
    Taskraft { clients: Vec<TasksClient<Channel>>, spec: Box<pb::TaskSpec>, batch: usize },
    Etcd { clients: Vec<etcd::kv_client::KvClient<Channel>>, value: Vec<u8> },
}

impl Driver {
    /// Sends request `seq` of worker `worker`; returns the items it committed.
    async fn send(&self, worker: usize, seq: u64) -> Result<u64, tonic::Status> {
        match self {
            Driver::Taskraft { clients, spec, batch } => {
                let mut client = clients[worker % clients.len()].clone();
                if *batch <= 1 {
                    let request = taskraft::client::request(
                        pb::SubmitTaskRequest { spec: Some((**spec).clone()) },
                        REQUEST_TIMEOUT,
                    );
                    client.submit_task(request).await?;
                    Ok(1)
                } else {
                    let specs = vec![(**spec).clone(); *batch];
                    let request = taskraft::client::request(
                        pb::SubmitTasksRequest { specs },
                        REQUEST_TIMEOUT,
                    );
                    let reply = client.submit_tasks(request).await?.into_inner();
                    Ok(reply.results.len() as u64)
                }
            }
            Driver::Etcd { clients, value } => {
                let mut client = clients[worker % clients.len()].clone();
                let key = format!("k{worker:05}{seq:010}").into_bytes();
                let request = taskraft::client::request(
                    etcd::PutRequest { key, value: value.clone(), ..Default::default() },
                    REQUEST_TIMEOUT,
                );
                client.put(request).await?;
                Ok(1)
            }
        }
    }
}

/// `true` with a padding argument, about `payload_bytes` encoded (no
/// padding for 0); a day ahead when `delayed`, so that it waits, unrun.
fn task_spec(payload_bytes: usize, delayed: bool) -> pb::TaskSpec {
    let mut spec = pb::TaskSpec {
        command: Some(pb::Command { program: "true".into(), ..Default::default() }),
        schedule: delayed.then_some(pb::task_spec::Schedule::DelayMs(24 * 3600 * 1000)),
        ..Default::default()
    };
    let pad = payload_bytes.saturating_sub(spec.encoded_len() + 4);
    if pad > 0
        && let Some(command) = spec.command.as_mut()
    {
        command.args.push("x".repeat(pad));
    }
    spec
}

fn tasks_client(channel: Channel) -> TasksClient<Channel> {
    TasksClient::new(channel)
        .max_encoding_message_size(taskraft::client::MESSAGE_BYTES_MAX)
        .max_decoding_message_size(taskraft::client::MESSAGE_BYTES_MAX)
}

async fn connect(addr: &str) -> anyhow::Result<Channel> {
    let url = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

/// The client address of the current leader.
async fn leader_addr(target: Target, endpoints: &[String]) -> anyhow::Result<String> {
    match target {
        Target::Taskraft => {
            for endpoint in endpoints {
                let Ok(channel) = connect(endpoint).await else { continue };
                let Ok(reply) = ClusterClient::new(channel)
                    .status(pb::StatusRequest { local_only: false })
                    .await
                else {
                    continue;
                };
                let status = reply.into_inner();
                if let Some(node) =
                    status.nodes.iter().find(|node| node.node_id == status.leader_id)
                {
                    return Ok(node.api_addr.clone());
                }
            }
            bail!("no taskraft node named a leader: {endpoints:?}")
        }
        Target::Etcd => {
            for endpoint in endpoints {
                let Ok(channel) = connect(endpoint).await else { continue };
                let client = &mut etcd::maintenance_client::MaintenanceClient::new(channel);
                let Ok(reply) = client.status(etcd::StatusRequest {}).await else { continue };
                let status = reply.into_inner();
                let member = status.header.map_or(0, |header| header.member_id);
                if status.leader != 0 && status.leader == member {
                    return Ok(endpoint.clone());
                }
            }
            bail!("no etcd member says it leads: {endpoints:?}")
        }
    }
}

/// CPU seconds (user + system) that process `pid` has used.
fn cpu_seconds(pid: u32, clock_ticks: f64) -> Option<f64> {
    // utime and stime are fields 14 and 15 of /proc/PID/stat (1-based).
    stat_user_and_system_seconds(pid, 14, clock_ticks)
}

/// CPU seconds (user + system) of the children of `pid` that it has reaped:
/// for a taskraft node, of the task processes that have ended.
fn reaped_children_cpu_seconds(pid: u32, clock_ticks: f64) -> Option<f64> {
    // cutime and cstime are fields 16 and 17.
    stat_user_and_system_seconds(pid, 16, clock_ticks)
}

/// The sum of the user time at field `user_field` (1-based) of
/// /proc/PID/stat and the system time that follows it, in seconds.
fn stat_user_and_system_seconds(pid: u32, user_field: usize, clock_ticks: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) may hold spaces: count from the ')' that ends
    // it, after which field 3 comes first.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let user: f64 = fields.get(user_field - 3)?.parse().ok()?;
    let system: f64 = fields.get(user_field - 2)?.parse().ok()?;
    Some((user + system) / clock_ticks)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

struct Counters {
    items: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    /// Per gRPC code: how many failed so, and the first message.
    error_kinds: std::sync::Mutex<BTreeMap<String, (u64, String)>>,
    measuring: AtomicBool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.clients > 0 && args.connections > 0,
        "clients and connections must be positive"
    );
    anyhow::ensure!(args.batch > 0, "batch must be positive");
    if args.target == Target::Etcd && args.batch > 1 && args.fill.is_none() {
        bail!("--batch applies to taskraft only, or to --fill");
    }
    if args.failover {
        return failover_trial(&args).await;
    }
    if args.to_start {
        return execution::to_start(&args).await;
    }
    if let Some(n_tasks) = args.exec {
        return execution::exec(&args, n_tasks).await;
    }
    if args.spawn {
        return execution::spawn(&args).await;
    }
    if let Some(n_items) = args.fill {
        return scale::fill(&args, n_items).await;
    }
    if args.snapshot {
        return scale::snapshot(&args).await;
    }
    if let Some(marker) = &args.await_read {
        return scale::await_read(&args, marker).await;
    }
    if args.await_commit {
        return scale::await_commit(&args).await;
    }
    if args.ready {
        for endpoint in &args.endpoints {
            probe_write(args.target, &connect(endpoint).await?, 0)
                .await
                .with_context(|| format!("a write through {endpoint} did not commit"))?;
        }
        return Ok(());
    }
    let leader = leader_addr(args.target, &args.endpoints).await?;
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(connect(&leader).await?);
    }
    let driver = match args.target {
        Target::Taskraft => {
            let spec = task_spec(args.payload_bytes, true);
            let clients = channels.into_iter().map(tasks_client).collect();
            Driver::Taskraft { clients, spec: Box::new(spec), batch: args.batch }
        }
        Target::Etcd => Driver::Etcd {
            clients: channels.into_iter().map(etcd::kv_client::KvClient::new).collect(),
            value: vec![b'v'; args.payload_bytes],
        },
    };
    let item_bytes = match &driver {
        Driver::Taskraft { spec, .. } => spec.encoded_len(),
        Driver::Etcd { value, .. } => value.len(),
    };

    let counters = Arc::new(Counters {
        items: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        error_kinds: std::sync::Mutex::default(),
        measuring: AtomicBool::new(false),
    });
    // Microseconds, from 1 µs to a minute, to three significant figures.
    let histogram =
        Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let started = Instant::now();
    let measure_from = started + args.warmup;
    let end = measure_from + args.duration;
    let record = {
        let (counters, histogram) = (counters.clone(), histogram.clone());
        move |due: Instant, result: Result<u64, tonic::Status>| {
            if !counters.measuring.load(Ordering::Relaxed) || Instant::now() > end {
                return;
            }
            match result {
                Ok(items) => {
                    counters.items.fetch_add(items, Ordering::Relaxed);
                    counters.requests.fetch_add(1, Ordering::Relaxed);
                    let micros = due.elapsed().as_micros() as u64;
                    histogram.lock().expect("histogram lock").saturating_record(micros.max(1));
                }
                Err(status) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    let mut kinds = counters.error_kinds.lock().expect("error kinds lock");
                    let kind = kinds
                        .entry(format!("{:?}", status.code()))
                        .or_insert_with(|| (0, status.message().to_owned()));
                    kind.0 += 1;
                }
            }
        }
    };

    let mut workers = Vec::new();
    match args.rate {
        None => {
            for worker in 0..args.clients {
                let (driver, record) = (driver.clone(), record.clone());
                workers.push(tokio::spawn(async move {
                    let mut seq = 0;
                    while Instant::now() < end {
                        let due = Instant::now();
                        let result = driver.send(worker, seq).await;
                        record(due, result);
                        seq += 1;
                    }
                }));
            }
        }
        Some(rate) => {
            anyhow::ensure!(rate > 0.0, "--rate must be positive");
            let in_flight = Arc::new(Semaphore::new(args.clients.min(OPEN_LOOP_IN_FLIGHT_MAX)));
            let (driver, record) = (driver.clone(), record.clone());
            workers.push(tokio::spawn(async move {
                let interval = Duration::from_secs_f64(1.0 / rate);
                let mut seq: u64 = 0;
                loop {
                    let due = started + interval.mul_f64(seq as f64);
                    if due >= end {
                        break;
                    }
                    tokio::time::sleep_until(due.into()).await;
                    let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                    let (driver, record) = (driver.clone(), record.clone());
                    tokio::spawn(async move {
                        let result = driver.send(seq as usize, seq).await;
                        record(due, result);
                        drop(permit);
                    });
                    seq += 1;
                }
            }));
        }
    }

    let ticks = clock_ticks();
    let server_cpu =
        |pids: &[u32]| pids.iter().filter_map(|pid| cpu_seconds(*pid, ticks)).sum::<f64>();
    let own_pid = std::process::id();
    tokio::time::sleep_until(measure_from.into()).await;
    counters.measuring.store(true, Ordering::Relaxed);
    let (server_cpu_from, own_cpu_from) =
        (server_cpu(&args.server_pids), cpu_seconds(own_pid, ticks).unwrap_or(0.0));
    let measured_at = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(5).min(end - Instant::now())).await;
        let elapsed = measured_at.elapsed().as_secs_f64();
        eprintln!(
            "  {:>5.1} s: {:>9.0} items/s, {} errors",
            elapsed,
            counters.items.load(Ordering::Relaxed) as f64 / elapsed,
            counters.errors.load(Ordering::Relaxed)
        );
    }
    let elapsed = measured_at.elapsed().as_secs_f64();
    let (server_cpu_to, own_cpu_to) =
        (server_cpu(&args.server_pids), cpu_seconds(own_pid, ticks).unwrap_or(0.0));
    counters.measuring.store(false, Ordering::Relaxed);
    for worker in workers {
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, worker).await;
    }

    let histogram = histogram.lock().expect("histogram lock").clone();
    let items = counters.items.load(Ordering::Relaxed);
    let server_cpu_s = server_cpu_to - server_cpu_from;
    let loadgen_cpu_s = own_cpu_to - own_cpu_from;
    let result = serde_json::json!({
        "target": match args.target { Target::Taskraft => "taskraft", Target::Etcd => "etcd" },
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "clients": args.clients,
        "connections": args.connections,
        "rate": args.rate,
        "batch": args.batch,
        "item_bytes": item_bytes,
        "seconds": elapsed,
        "items": items,
        "requests": counters.requests.load(Ordering::Relaxed),
        "errors": counters.errors.load(Ordering::Relaxed),
        "error_kinds": counters.error_kinds.lock().expect("error kinds lock").iter()
            .map(|(code, (count, first))| (code.clone(), serde_json::json!({ "count": count, "first": first })))
            .collect::<serde_json::Map<_, _>>(),
        "items_per_s": items as f64 / elapsed,
        "p50_us": histogram.value_at_quantile(0.50),
        "p99_us": histogram.value_at_quantile(0.99),
        "max_us": histogram.max(),
        "server_cpu_s": server_cpu_s,
        "loadgen_cpu_s": loadgen_cpu_s,
        "cpu_us_per_item": if items > 0 { (server_cpu_s + loadgen_cpu_s) * 1e6 / items as f64 } else { 0.0 },
    });
    println!("{result}");
    Ok(())
}

/// One write through the probe endpoint: the id of the task it submitted
/// (taskraft) or of the key it put (etcd).
async fn probe_write(target: Target, channel: &Channel, seq: u64) -> anyhow::Result<String> {
    let write = async {
        match target {
            Target::Taskraft => {
                let spec = pb::TaskSpec {
                    command: Some(pb::Command { program: "true".into(), ..Default::default() }),
                    schedule: Some(pb::task_spec::Schedule::DelayMs(24 * 3600 * 1000)),
                    ..Default::default()
                };
                let request = taskraft::client::request(
                    pb::SubmitTaskRequest { spec: Some(spec) },
                    PROBE_TIMEOUT,
                );
                let reply = TasksClient::new(channel.clone()).submit_task(request).await?;
                Ok(reply.into_inner().task.map(|task| task.id).unwrap_or_default())
            }
            Target::Etcd => {
                let key = format!("failover{seq:010}").into_bytes();
                let request = taskraft::client::request(
                    etcd::PutRequest { key, value: b"v".to_vec(), ..Default::default() },
                    PROBE_TIMEOUT,
                );
                etcd::kv_client::KvClient::new(channel.clone()).put(request).await?;
                Ok(format!("failover{seq:010}"))
            }
        }
    };
    match tokio::time::timeout(PROBE_TIMEOUT, write).await {
        Ok(result) => result,
        Err(_) => bail!("no answer within {PROBE_TIMEOUT:?}"),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// Kills the leader and measures how long the cluster is blind.
async fn failover_trial(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.server_pids.len() == args.endpoints.len(),
        "--failover needs one --server-pids entry per endpoint, in the same order"
    );
    let leader = leader_addr(args.target, &args.endpoints).await?;
    let leader_idx = args
        .endpoints
        .iter()
        .position(|endpoint| *endpoint == leader)
        .with_context(|| format!("the leader {leader} is not among {:?}", args.endpoints))?;
    let probe_addr = &args.endpoints[(leader_idx + 1) % args.endpoints.len()];
    let probe = connect(probe_addr).await?;
    let mut acknowledged = Vec::new();
    let mut seq = 0;
    // A second of writes through the follower first: the path works. A write
    // that fails or is not answered within PROBE_TIMEOUT (a stall of the
    // host's disk can take that long) was never acknowledged, so it is
    // retried, not fatal; the trial needs one acknowledged write.
    let warm_until = Instant::now() + Duration::from_secs(1);
    let mut warm_error = None;
    while Instant::now() < warm_until || acknowledged.is_empty() {
        anyhow::ensure!(
            Instant::now() < warm_until + FAILOVER_DEADLINE,
            "no write through {probe_addr} was acknowledged before the kill: {warm_error:?}"
        );
        match probe_write(args.target, &probe, seq).await {
            Ok(id) => acknowledged.push(id),
            Err(err) => {
                warm_error = Some(err.to_string());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        seq += 1;
    }
    let pid = args.server_pids[leader_idx];
    let killed_at = Instant::now();
    let killed_at_unix_ms = unix_ms();
    let status = std::process::Command::new("kill").arg("-9").arg(pid.to_string()).status()?;
    anyhow::ensure!(status.success(), "kill -9 {pid} failed");
    // Writes sent after the kill that failed (refused, or not answered in
    // time) before one committed: what a client that does not retry sees.
    let mut n_refused = 0u64;
    let commit_gap = loop {
        anyhow::ensure!(
            killed_at.elapsed() < FAILOVER_DEADLINE,
            "no write committed within {FAILOVER_DEADLINE:?} of the kill"
        );
        let sent_at = Instant::now();
        match probe_write(args.target, &probe, seq).await {
            Ok(id) => {
                acknowledged.push(id);
                if sent_at >= killed_at {
                    break killed_at.elapsed();
                }
            }
            Err(_) => {
                n_refused += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        seq += 1;
    };
    let mut result = serde_json::json!({
        "target": match args.target { Target::Taskraft => "taskraft", Target::Etcd => "etcd" },
        "killed": leader,
        "probe": probe_addr,
        "commit_gap_ms": commit_gap.as_secs_f64() * 1e3,
        "refused_writes": n_refused,
    });
    if args.target == Target::Taskraft {
        let (start_gap_ms, n_lost) =
            task_start_and_losses(&probe, killed_at_unix_ms, &acknowledged).await?;
        result["start_gap_ms"] = serde_json::json!(start_gap_ms);
        result["acknowledged"] = serde_json::json!(acknowledged.len());
        result["lost"] = serde_json::json!(n_lost);
    }
    println!("{result}");
    Ok(())
}

/// Submits a task that runs at once and waits for its start: milliseconds
/// from the kill to that start. Then reads back every acknowledged task:
/// how many are missing.
async fn task_start_and_losses(
    probe: &Channel,
    killed_at_unix_ms: u64,
    acknowledged: &[String],
) -> anyhow::Result<(u64, usize)> {
    let deadline = Instant::now() + FAILOVER_DEADLINE;
    let mut tasks = TasksClient::new(probe.clone());
    let spec = pb::TaskSpec {
        command: Some(pb::Command { program: "true".into(), ..Default::default() }),
        ..Default::default()
    };
    let submitted = tasks
        .submit_task(taskraft::client::request(
            pb::SubmitTaskRequest { spec: Some(spec) },
            REQUEST_TIMEOUT,
        ))
        .await?
        .into_inner();
    let id = submitted.task.map(|task| task.id).unwrap_or_default();
    let started_at_ms = loop {
        anyhow::ensure!(Instant::now() < deadline, "task {id} did not start in time");
        let request = taskraft::client::request(
            pb::GetTaskRequest { id: id.clone(), stale: false },
            REQUEST_TIMEOUT,
        );
        if let Ok(reply) = tasks.get_task(request).await
            && let Some(started) = reply
                .into_inner()
                .task
                .and_then(|task| task.attempts.first().map(|a| a.started_at_unix_ms))
                .filter(|started| *started > 0)
        {
            break started;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let mut n_lost = 0;
    for id in acknowledged {
        let request = taskraft::client::request(
            pb::GetTaskRequest { id: id.clone(), stale: false },
            REQUEST_TIMEOUT,
        );
        match tasks.get_task(request).await {
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::NotFound => n_lost += 1,
            Err(status) => bail!("cannot read back task {id}: {status}"),
        }
    }
    Ok((started_at_ms.saturating_sub(killed_at_unix_ms), n_lost))
}
