//! Deterministic simulation: a three-node taskraft cluster in one process
//! under turmoil, with simulated time and network, seeded faults, and the
//! same history and checker as the fault suite on real processes.
//!
//! The nodes run the real code (`taskraft::node::run_on`): Raft, the
//! scheduler, the leader loop, the executor, and tonic over turmoil's TCP.
//! Only their [`Platform`] is simulated:
//! - the network is turmoil's ([`TurmoilNet`]), so partitions, holds and
//!   latency reach the real gRPC stack;
//! - the wall clock is simulated time plus a per-node skew ([`SkewedClock`]);
//! - the disk is a [`MemoryDisk`] created outside the node, so it survives
//!   a crash, and loses on a crash exactly what was not flushed;
//! - tasks are futures ([`SimRunner`]) that record `exec-start` and
//!   `exec-end` in the history; a crash drops them, as a killed node's
//!   processes die with it.
//!
//! Everything is derived from one seed: the workload, the fault schedule,
//! turmoil's message latencies and openraft's election timeouts. One seed
//! runs per process (`sim --seed N`), because some libraries keep random
//! state per thread.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use futures::stream::StreamExt;
use hyper_util::rt::TokioIo;
use taskraft::config::NodeConfig;
use taskraft::executor::process::{ProcessResult, RunRequest, StopReason, TaskRunner};
use taskraft::platform::{Clock, Connection, Incoming, Network, Platform};
use taskraft::proto::taskraft_v1 as pb;
use taskraft::proto::taskraft_v1::tasks_client::TasksClient;
use taskraft::scheduler::Outcome;
use taskraft::storage::{Disk, MemoryDisk};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::checker::{CheckerConfig, Report, check};
use crate::history::{self, Event, HistoryWriter};
use crate::seeded::SplitMix64;
use crate::workload::{
    delete_periodic, put_periodic_recorded, read_recorded, record_final_read, submit_recorded,
    wait_until_all_finished,
};

/// Simulated time starts here (2026-01-01T00:00:00Z), so that times in the
/// history look like times.
const EPOCH_MS: u64 = 1_767_225_600_000;
const NODE_IDS: [u64; 3] = [1, 2, 3];
const API_PORT: u16 = 7001;
const RAFT_PORT: u16 = 7101;
/// The program a simulated task names; its first argument is how long it
/// runs in milliseconds.
pub const SIM_PROGRAM: &str = "sim-task";
/// The largest clock skew the faults give a node.
const SKEW_MS_MAX: i64 = 2_000;

/// How one seed's run is shaped.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Faults are struck during this much simulated time from the start.
    pub fault_phase: Duration,
    /// After the heal, every acknowledged task must end within this long.
    pub liveness_deadline: Duration,
    /// Where the history is written.
    pub dir: PathBuf,
}

/// What one seed's run found.
pub struct SimOutcome {
    pub report: Report,
    pub history_path: PathBuf,
    pub faults: Vec<String>,
    pub simulated: Duration,
}

fn node_ip(id: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, id as u8))
}

/// The simulated time, as the history and the clocks see it.
fn sim_now_ms() -> u64 {
    EPOCH_MS + turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64
}

fn sim_now_ns() -> u64 {
    EPOCH_MS * 1_000_000 + turmoil::sim_elapsed().unwrap_or_default().as_nanos() as u64
}

/// turmoil's network: listeners on the host's own address, channels that
/// dial through turmoil's TCP.
pub struct TurmoilNet;

impl Network for TurmoilNet {
    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, std::io::Result<Incoming>> {
        Box::pin(async move {
            let addr: std::net::SocketAddr = addr.parse().map_err(std::io::Error::other)?;
            let listener =
                turmoil::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, addr.port())).await?;
            let accepted = futures::stream::unfold(listener, |listener| async move {
                let accepted = listener.accept().await.map(|(stream, _)| Connection::new(stream));
                Some((accepted, listener))
            });
            Ok(accepted.boxed())
        })
    }

    fn channel(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(tower::service_fn(|uri: Uri| async move {
            let host = uri.host().unwrap_or_default().to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }))
    }
}

/// Simulated wall time plus a skew the faults set.
#[derive(Clone, Default)]
pub struct SkewedClock {
    skew_ms: Arc<AtomicI64>,
}

impl SkewedClock {
    pub fn set_skew_ms(&self, skew_ms: i64) {
        self.skew_ms.store(skew_ms, Ordering::Relaxed);
    }
}

impl Clock for SkewedClock {
    fn unix_now_ms(&self) -> u64 {
        sim_now_ms().saturating_add_signed(self.skew_ms.load(Ordering::Relaxed))
    }
}

/// Runs `sim-task <ms>` by waiting that long, and records the run.
pub struct SimRunner {
    history: HistoryWriter,
}

/// Records `exec-end` however the run ends, a crash included.
struct RunRecord {
    history: HistoryWriter,
    task_id: String,
    attempt: u32,
    token: u64,
    node: u64,
}

impl Drop for RunRecord {
    fn drop(&mut self) {
        self.history.record(&Event::ExecEnd {
            task_id: self.task_id.clone(),
            attempt: self.attempt,
            token: self.token,
            node: self.node,
            time_ns: sim_now_ns(),
        });
    }
}

impl TaskRunner for SimRunner {
    fn run(
        &self,
        request: RunRequest,
        stop: oneshot::Receiver<StopReason>,
    ) -> BoxFuture<'static, ProcessResult> {
        let history = self.history.clone();
        Box::pin(async move {
            let result = |outcome| ProcessResult {
                outcome,
                stdout_tail: String::new(),
                stderr_tail: String::new(),
            };
            let duration_ms = match (&*request.command.program, request.command.args.first()) {
                (SIM_PROGRAM, Some(ms)) => ms.parse::<u64>().ok(),
                _ => None,
            };
            let Some(duration_ms) = duration_ms else {
                let message = format!("not a simulated task: {:?}", request.command);
                return result(Outcome::StartFailed { message });
            };
            let env = &request.env;
            history.record(&Event::ExecStart {
                task_id: env.task_id.to_string(),
                attempt: env.attempt_number,
                token: env.fencing_token,
                node: env.node_id,
                time_ns: sim_now_ns(),
            });
            let _record = RunRecord {
                history: history.clone(),
                task_id: env.task_id.to_string(),
                attempt: env.attempt_number,
                token: env.fencing_token,
                node: env.node_id,
            };
            let outcome = tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(duration_ms).min(request.timeout)) => {
                    if duration_ms > request.timeout.as_millis() as u64 {
                        Outcome::TimedOut
                    } else {
                        Outcome::Exited { code: 0 }
                    }
                }
                reason = stop => match reason {
                    Ok(StopReason::Cancelled) => Outcome::Cancelled,
                    Ok(StopReason::Fenced | StopReason::Shutdown) | Err(_) => Outcome::Lost,
                },
            };
            result(outcome)
        })
    }
}

fn initial_cluster() -> String {
    NODE_IDS
        .iter()
        .map(|id| {
            let ip = node_ip(*id);
            format!("{id}={ip}:{API_PORT}/{ip}:{RAFT_PORT}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn node_config(id: u64, dir: &Path) -> NodeConfig {
    let ip = node_ip(id);
    let mut config = NodeConfig {
        node_id: id,
        api_addr: format!("{ip}:{API_PORT}"),
        raft_addr: format!("{ip}:{RAFT_PORT}"),
        data_dir: dir.join(format!("n{id}")),
        initial_cluster: initial_cluster(),
        slots: 4,
        ..NodeConfig::default()
    };
    // Snapshots and purges happen often, so crashes meet them.
    config.raft.snapshot_after_entries = 100;
    config.raft.snapshot_keep_entries = 10;
    config
}

/// One fault, struck at `at` and undone `lasting` later.
#[derive(Debug, Clone)]
pub struct Strike {
    pub at: Duration,
    pub lasting: Duration,
    pub fault: Fault,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Cut one node off from the other two.
    Isolate(u64),
    /// Messages from the first node to the second are dropped.
    OneWay(u64, u64),
    /// Cut two nodes apart; both still reach the third.
    Bridge(u64, u64),
    /// Messages between one node and the others are held, then released.
    Hold(u64),
    /// The node crashes, losing what it had not flushed, and restarts.
    Crash(u64),
    /// Every node crashes, then all restart.
    CrashAll,
    /// The node's wall clock jumps by the given milliseconds.
    Skew(u64, i64),
    /// Every message takes up to the given milliseconds.
    Latency(u64),
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Isolate(_) => "partition",
            Fault::OneWay(..) => "partition-one-way",
            Fault::Bridge(..) => "partition-bridge",
            Fault::Hold(_) => "hold",
            Fault::Crash(_) => "kill",
            Fault::CrashAll => "restart-all",
            Fault::Skew(..) => "clock-skew",
            Fault::Latency(_) => "latency",
        }
    }

    fn nodes(self) -> Vec<u64> {
        match self {
            Fault::Isolate(n) | Fault::Hold(n) | Fault::Crash(n) | Fault::Skew(n, _) => vec![n],
            Fault::OneWay(a, b) | Fault::Bridge(a, b) => vec![a, b],
            Fault::CrashAll | Fault::Latency(_) => NODE_IDS.to_vec(),
        }
    }
}

fn host(id: u64) -> IpAddr {
    node_ip(id)
}

fn others(id: u64) -> Vec<IpAddr> {
    NODE_IDS.iter().filter(|other| **other != id).map(|other| host(*other)).collect()
}

/// The faults of one seed: one after another through `fault_phase`.
pub fn schedule(seed: u64, fault_phase: Duration) -> Vec<Strike> {
    let mut rng = SplitMix64::new(seed ^ 0x5eed_fa17);
    let mut strikes = Vec::new();
    let mut at = Duration::from_millis(2_000 + rng.below(2_000));
    while at < fault_phase {
        let node = 1 + rng.below(3);
        let other = 1 + (node + rng.below(2)) % 3;
        let fault = match rng.below(9) {
            0 => Fault::Isolate(node),
            1 => Fault::OneWay(node, other),
            2 => Fault::Bridge(node, other),
            3 => Fault::Hold(node),
            4 | 5 => Fault::Crash(node),
            6 => Fault::CrashAll,
            7 => {
                let skew_ms = rng.below(2 * SKEW_MS_MAX as u64 + 1) as i64 - SKEW_MS_MAX;
                Fault::Skew(node, skew_ms)
            }
            _ => Fault::Latency(20 + rng.below(200)),
        };
        let lasting = Duration::from_millis(500 + rng.below(5_500));
        strikes.push(Strike { at, lasting, fault });
        at += lasting + Duration::from_millis(500 + rng.below(2_500));
    }
    strikes
}

/// Runs one seed to the end and judges its history.
pub fn run_seed(seed: u64, options: &SimOptions) -> anyhow::Result<SimOutcome> {
    std::fs::create_dir_all(&options.dir)?;
    // Every node runs on this thread: one seed covers their elections.
    taskraft::raft::runtime::seed_this_thread(seed);
    let history_path = options.dir.join(format!("sim-{seed}.jsonl"));
    let _ = std::fs::remove_file(&history_path);
    // The nodes' snapshot files: the one part of their data on a real disk.
    let nodes_dir = options.dir.join(format!("sim-{seed}-nodes"));
    if nodes_dir.exists() {
        std::fs::remove_dir_all(&nodes_dir)?;
    }
    let history = HistoryWriter::with_clock(&history_path, sim_now_ns)?;
    let disks: Vec<MemoryDisk> = NODE_IDS
        .iter()
        .map(|_| MemoryDisk::with_fsync_latency(Duration::from_micros(500)))
        .collect();
    let clocks: Vec<SkewedClock> = NODE_IDS.iter().map(|_| SkewedClock::default()).collect();
    let total = options.fault_phase + options.liveness_deadline + Duration::from_secs(60);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(total)
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(5))
        .tcp_capacity(65_536)
        .build();

    for (idx, id) in NODE_IDS.iter().copied().enumerate() {
        let config = node_config(id, &nodes_dir);
        let platform = Platform {
            network: Arc::new(TurmoilNet),
            clock: Arc::new(clocks[idx].clone()),
            disk: Disk::Memory(disks[idx].clone()),
            runner: Arc::new(SimRunner { history: history.clone() }),
            warden: false,
        };
        sim.host(host(id), move || {
            let config = config.clone();
            let platform = platform.clone();
            async move {
                taskraft::node::run_on(config, platform, std::future::pending()).await?;
                Ok(())
            }
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    let n_stopped = Arc::new(AtomicU64::new(0));
    let probe = Arc::new(Probe::default());
    for process in 0..N_CLIENTS {
        let run = ClientRun {
            process,
            seed: seed.wrapping_add(process),
            history: history.clone(),
            history_path: history_path.clone(),
            stop: stop.clone(),
            n_stopped: n_stopped.clone(),
            probe: probe.clone(),
            liveness_deadline: options.liveness_deadline,
        };
        sim.client(format!("client{process}"), async move {
            client(run).await.map_err(|err| {
                let message: Box<dyn std::error::Error> = format!("{err:#}").into();
                message
            })
        });
    }

    {
        let (history, stop, probe) = (history.clone(), stop.clone(), probe.clone());
        sim.client("prober", async move {
            prober(history, stop, probe).await.map_err(|err| {
                let message: Box<dyn std::error::Error> = format!("{err:#}").into();
                message
            })
        });
    }

    let strikes = schedule(seed, options.fault_phase);
    let mut faults = Vec::new();
    let mut pending: std::collections::VecDeque<Strike> = strikes.into_iter().collect();
    let mut active: Option<Strike> = None;
    let mut healed = false;
    let time_ns = |sim: &turmoil::Sim| EPOCH_MS * 1_000_000 + sim.elapsed().as_nanos() as u64;
    loop {
        let done = sim.step().map_err(|err| anyhow::anyhow!("the simulation failed: {err}"))?;
        if done {
            break;
        }
        let now = sim.elapsed();
        if let Some(strike) = &active
            && now >= strike.at + strike.lasting
        {
            undo(&mut sim, strike.fault, &clocks);
            if strike.fault == Fault::CrashAll {
                probe.restarts.fetch_add(1, Ordering::Relaxed);
            }
            active = None;
        }
        if !healed && active.is_none() && pending.front().is_some_and(|next| now >= next.at) {
            let strike = pending.pop_front().expect("checked above");
            faults.push(format!("{:?} at {:?} for {:?}", strike.fault, strike.at, strike.lasting));
            history.record(&Event::Nemesis {
                f: strike.fault.name().into(),
                nodes: strike.fault.nodes(),
                leader: false,
                time_ns: time_ns(&sim),
            });
            strike_fault(&mut sim, strike.fault, &clocks);
            active = Some(strike);
        }
        if !healed && now >= options.fault_phase && active.is_none() {
            heal_all(&mut sim, &clocks);
            history.record(&Event::Heal { time_ns: time_ns(&sim) });
            stop.store(true, Ordering::Relaxed);
            healed = true;
        }
    }
    let simulated = sim.elapsed();
    let events = history::read(&history_path)?;
    let config = CheckerConfig {
        liveness_deadline: options.liveness_deadline,
        clock_skew_tolerance: Duration::from_millis(SKEW_MS_MAX as u64),
        ..CheckerConfig::default()
    };
    let report = check(&events, &config);
    drop(sim);
    std::fs::remove_dir_all(&nodes_dir)?;
    Ok(SimOutcome { report, history_path, faults, simulated })
}

fn strike_fault(sim: &mut turmoil::Sim, fault: Fault, clocks: &[SkewedClock]) {
    match fault {
        Fault::Isolate(n) => others(n).into_iter().for_each(|o| sim.partition(host(n), o)),
        Fault::OneWay(a, b) => sim.partition_oneway(host(a), host(b)),
        Fault::Bridge(a, b) => sim.partition(host(a), host(b)),
        Fault::Hold(n) => others(n).into_iter().for_each(|o| sim.hold(host(n), o)),
        Fault::Crash(n) => sim.crash(host(n)),
        Fault::CrashAll => {
            for id in NODE_IDS {
                sim.crash(host(id));
            }
        }
        Fault::Skew(n, skew_ms) => clocks[n as usize - 1].set_skew_ms(skew_ms),
        Fault::Latency(ms) => sim.set_max_message_latency(Duration::from_millis(ms)),
    }
}

fn undo(sim: &mut turmoil::Sim, fault: Fault, clocks: &[SkewedClock]) {
    match fault {
        Fault::Isolate(n) => others(n).into_iter().for_each(|o| sim.repair(host(n), o)),
        Fault::OneWay(a, b) => sim.repair_oneway(host(a), host(b)),
        Fault::Bridge(a, b) => sim.repair(host(a), host(b)),
        Fault::Hold(n) => others(n).into_iter().for_each(|o| sim.release(host(n), o)),
        Fault::Crash(n) => sim.bounce(host(n)),
        Fault::CrashAll => {
            for id in NODE_IDS {
                sim.bounce(host(id));
            }
        }
        Fault::Skew(n, _) => clocks[n as usize - 1].set_skew_ms(0),
        Fault::Latency(_) => sim.set_max_message_latency(Duration::from_millis(5)),
    }
}

/// Undoes everything: the start of the liveness phase.
fn heal_all(sim: &mut turmoil::Sim, clocks: &[SkewedClock]) {
    for id in NODE_IDS {
        for other in others(id) {
            sim.repair(host(id), other);
            sim.release(host(id), other);
        }
        if !sim.is_host_running(host(id)) {
            sim.bounce(host(id));
        }
    }
    for clock in clocks {
        clock.set_skew_ms(0);
    }
    sim.set_max_message_latency(Duration::from_millis(5));
}

/// How many clients submit at once.
const N_CLIENTS: u64 = 2;

struct ClientRun {
    process: u64,
    seed: u64,
    history: HistoryWriter,
    history_path: PathBuf,
    /// Set at the heal: stop submitting.
    stop: Arc<AtomicBool>,
    /// How many clients have stopped submitting.
    n_stopped: Arc<AtomicU64>,
    probe: Arc<Probe>,
    liveness_deadline: Duration,
}

/// What the prober needs to read the moment the whole cluster is back.
#[derive(Default)]
struct Probe {
    /// How many times every node has restarted together.
    restarts: AtomicU64,
    /// The task of the last submission any client had acknowledged.
    last_acknowledged: std::sync::Mutex<Option<String>>,
}

/// Reads a cluster that restarts whole tries at most this often before one answers.
const PROBE_READS_MAX: u32 = 2_000;
/// The pause between the prober's tries.
const PROBE_PAUSE: Duration = Duration::from_millis(2);

/// The prober: each time every node has restarted together, it reads the
/// last acknowledged task linearizably, trying again every 2 ms (one
/// endpoint each time, following leader hints) until a read is answered.
/// That first answer is where a node that came back serving from what it
/// had persisted, rather than from what it had acknowledged, would show:
/// the client reads that come at their own pace are usually too late.
async fn prober(
    history: HistoryWriter,
    stop: Arc<AtomicBool>,
    probe: Arc<Probe>,
) -> anyhow::Result<()> {
    let endpoints: Vec<String> =
        NODE_IDS.iter().map(|id| format!("{}:{API_PORT}", node_ip(*id))).collect();
    // One try per call: the loop below is the retry.
    let mut client = taskraft::client::Client::on_network(
        &endpoints,
        Duration::ZERO,
        Duration::from_millis(500),
        Arc::new(TurmoilNet),
    )?;
    let mut restarts_seen = 0;
    while !stop.load(Ordering::Relaxed) {
        let restarts = probe.restarts.load(Ordering::Relaxed);
        let task_id = probe.last_acknowledged.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if restarts == restarts_seen {
            tokio::time::sleep(PROBE_PAUSE).await;
            continue;
        }
        restarts_seen = restarts;
        let Some(task_id) = task_id else { continue };
        for _ in 0..PROBE_READS_MAX {
            if read_recorded(&mut client, &history, PROBER_PROCESS, &task_id).await
                || probe.restarts.load(Ordering::Relaxed) != restarts_seen
            {
                break;
            }
            tokio::time::sleep(PROBE_PAUSE).await;
        }
    }
    Ok(())
}

/// The prober's process number in the history, after the clients'.
const PROBER_PROCESS: u64 = N_CLIENTS;

/// The periodic task client 0 puts first: it fires every second through
/// the faults, and its fires are checked for order, for their count and
/// for none made twice.
const SIM_PERIODIC: &str = "sim-tick";

/// A queue client 0 limits first: a sixth of the tasks go to it, at most
/// [`SIM_LIMITED_RUNNING_MAX`] of them active at once. Its tasks must all
/// finish like the others, and its count of active tasks end at zero.
const SIM_LIMITED_QUEUE: &str = "limited";
const SIM_LIMITED_RUNNING_MAX: u32 = 2;

/// One client: submits a mix of tasks until told to stop. Client 0 first
/// puts a periodic task, and in the end deletes it, waits for every task
/// any client had acknowledged or the periodic task fired, and records the
/// final read: the liveness phase.
async fn client(run: ClientRun) -> anyhow::Result<()> {
    let ClientRun { process, seed, history, .. } = &run;
    let (process, seed) = (*process, *seed);
    let mut endpoints: Vec<String> =
        NODE_IDS.iter().map(|id| format!("{}:{API_PORT}", node_ip(*id))).collect();
    endpoints.rotate_left(process as usize);
    let mut client = taskraft::client::Client::on_network(
        &endpoints,
        Duration::from_secs(5),
        Duration::from_secs(1),
        Arc::new(TurmoilNet),
    )?;
    let mut rng = SplitMix64::new(seed ^ 0x10ad);
    let mut n_submitted: u64 = 0;
    let mut last_acknowledged: Option<String> = None;
    if process == 0 {
        let periodic = pb::PeriodicTask {
            name: SIM_PERIODIC.into(),
            cadence: Some(pb::periodic_task::Cadence::EveryMs(1_000)),
            spec: Some(pb::TaskSpec {
                command: Some(pb::Command {
                    program: SIM_PROGRAM.into(),
                    args: vec!["50".into()],
                    ..Default::default()
                }),
                max_attempts: 10,
                backoff: Some(pb::Backoff {
                    initial_ms: 100,
                    max_ms: 200,
                    multiplier_milli: 1_000,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        while !run.stop.load(Ordering::Relaxed)
            && put_periodic_recorded(&mut client, history, process, periodic.clone()).await.is_err()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        while !run.stop.load(Ordering::Relaxed) {
            if set_limit(&mut client, Some(SIM_LIMITED_RUNNING_MAX)).await.is_ok() {
                history.record(&Event::QueueLimit {
                    queue: SIM_LIMITED_QUEUE.into(),
                    running_max: SIM_LIMITED_RUNNING_MAX,
                    time_ns: history.now_ns(),
                });
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    while !run.stop.load(Ordering::Relaxed) {
        // Half the time, first a linearizable read of the last task this
        // client had acknowledged: after a fault (every node crashing, say)
        // it is often the first call to reach the cluster.
        if let Some(task_id) = &last_acknowledged
            && rng.below(2) == 0
        {
            read_recorded(&mut client, history, process, task_id).await;
        }
        let key = format!("{process}-{n_submitted}");
        n_submitted += 1;
        // Some tasks outlive a lease (3 s) and its grace, so faults catch them.
        let duration_ms = if rng.below(8) == 0 { 4_500 } else { 20 + rng.below(600) };
        let mut spec = pb::TaskSpec {
            command: Some(pb::Command {
                program: SIM_PROGRAM.into(),
                args: vec![duration_ms.to_string()],
                ..Default::default()
            }),
            max_attempts: 10,
            backoff: Some(pb::Backoff { initial_ms: 100, max_ms: 200, multiplier_milli: 1_000 }),
            idempotency_key: key,
            priority: rng.below(3) as i32,
            ..Default::default()
        };
        if rng.below(5) == 0 {
            spec.schedule = Some(pb::task_spec::Schedule::DelayMs(200 + rng.below(2_000)));
        }
        if rng.below(6) == 0 {
            spec.queue = SIM_LIMITED_QUEUE.into();
        }
        // A sixth of the tasks run after the last task this client had
        // acknowledged: chains that the faults cut through.
        if let Some(task_id) = &last_acknowledged
            && rng.below(6) == 0
        {
            spec.after = vec![task_id.clone()];
        }
        // An eighth of the submissions are a chain of two in one batch, the
        // second after the first by its index: a short task in the default
        // queue, so the chains add little work to the backlog at the heal
        // (the limited queue's alone takes much of the liveness deadline).
        let mut specs = vec![spec];
        if rng.below(8) == 0 {
            let then = pb::TaskSpec {
                command: Some(pb::Command {
                    program: SIM_PROGRAM.into(),
                    args: vec!["50".into()],
                    ..Default::default()
                }),
                idempotency_key: format!("{}-then", specs[0].idempotency_key),
                after_in_batch: vec![0],
                max_attempts: 10,
                backoff: specs[0].backoff,
                ..Default::default()
            };
            specs.push(then);
        }
        // Failures are in the history as `info`; only acks count.
        if let Ok(ids) = submit_recorded(&mut client, history, process, specs).await {
            last_acknowledged = ids.last().cloned().or(last_acknowledged);
            let mut probed = run.probe.last_acknowledged.lock().unwrap_or_else(|p| p.into_inner());
            *probed = last_acknowledged.clone();
        }
        tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
    }
    run.n_stopped.fetch_add(1, Ordering::Relaxed);
    if process != 0 {
        return Ok(());
    }
    while run.n_stopped.load(Ordering::Relaxed) < N_CLIENTS {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut waited_for = history::acknowledged(&history::read(&run.history_path)?);
    waited_for.extend(stop_periodic(&mut client).await?);
    wait_until_all_finished(&mut client, &waited_for, run.liveness_deadline)
        .await
        .context("liveness: the healed cluster did not finish every acknowledged or fired task")?;
    record_final_read(&mut client, history).await?;
    // Every task has finished: the limited queue's count of active tasks,
    // kept through the faults, restarts and snapshots, must say so.
    let queue = set_limit(&mut client, None).await.context("lifting the queue limit")?;
    anyhow::ensure!(
        queue.active == 0 && queue.ready == 0,
        "the limited queue counts {} active and {} ready tasks after every task finished",
        queue.active,
        queue.ready
    );
    Ok(())
}

/// Sets (or with `None` lifts) the limit of [`SIM_LIMITED_QUEUE`]; the
/// queue as the leader then holds it.
async fn set_limit(
    client: &mut taskraft::client::Client,
    running_max: Option<u32>,
) -> anyhow::Result<pb::Queue> {
    let reply = client
        .call(|channel, timeout| {
            let message = pb::SetQueueLimitRequest { queue: SIM_LIMITED_QUEUE.into(), running_max };
            async move {
                TasksClient::new(channel)
                    .set_queue_limit(taskraft::client::request(message, timeout))
                    .await
            }
        })
        .await?;
    reply.into_inner().queue.context("a queue limit's answer without its queue")
}

/// Deletes the periodic task of the run, once the cluster is healed, and
/// returns the ids of the tasks it fired. Its counts, replicated with it,
/// must match them: one task per fire, and no fire refused as made already.
async fn stop_periodic(client: &mut taskraft::client::Client) -> anyhow::Result<Vec<String>> {
    let mut deleted = delete_periodic(client, SIM_PERIODIC).await;
    for _ in 0..5 {
        if deleted.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        deleted = delete_periodic(client, SIM_PERIODIC).await;
    }
    let deleted = deleted.context("deleting the periodic task after the heal")?;
    let prefix = format!("periodic/{SIM_PERIODIC}/");
    let fired: Vec<String> = crate::list_all(client, false)
        .await?
        .into_iter()
        .filter(|task| {
            task.spec.as_ref().is_some_and(|spec| spec.idempotency_key.starts_with(&prefix))
        })
        .map(|task| task.id)
        .collect();
    // Never put (the faults outlasted every try): it may have been, all the same.
    let Some(deleted) = deleted else {
        anyhow::ensure!(fired.is_empty(), "tasks fired by a periodic task that does not exist");
        return Ok(fired);
    };
    anyhow::ensure!(
        deleted.fired_total == fired.len() as u64 && deleted.skipped_total == 0,
        "the periodic task counts {} fired and {} skipped, but {} tasks carry its keys",
        deleted.fired_total,
        deleted.skipped_total,
        fired.len()
    );
    Ok(fired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_draw_every_fault_and_replay_from_their_seed() {
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 0..50 {
            for strike in schedule(seed, Duration::from_secs(30)) {
                kinds.insert(strike.fault.name());
            }
        }
        assert_eq!(kinds.len(), 8, "{kinds:?}");
        let describe = |seed| format!("{:?}", schedule(seed, Duration::from_secs(30)));
        assert_eq!(describe(7), describe(7));
        assert_ne!(describe(7), describe(8));
    }
}
