//! The execution scenarios of the load generator, taskraft only:
//!
//! - `--to-start`: runnable tasks (`true`) submitted in open loop at
//!   `--rate`; afterwards each task measured in the window is read back, and
//!   the time from when its submission was due to when its executor started
//!   the process goes into the histogram. Start times are stored in whole
//!   milliseconds, so each sample is the middle of its millisecond (±0.5 ms).
//! - `--exec N`: N no-op tasks submitted at once in `SubmitTasks` batches;
//!   the rate at which the cluster runs them, from the first start to the
//!   last end. While they run the generator only asks, ten times a second,
//!   whether any task is unfinished; it reads the tasks back afterwards.
//! - `--spawn`: the machine's raw rate of fork and exec of `true`, with
//!   `--clients` processes at a time: the physical limit of `--exec`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use taskraft::proto::taskraft_v1 as pb;
use taskraft::proto::taskraft_v1::tasks_client::TasksClient;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::{
    Args, OPEN_LOOP_IN_FLIGHT_MAX, REQUEST_TIMEOUT, Target, clock_ticks, connect, cpu_seconds,
    leader_addr, reaped_children_cpu_seconds, task_spec, tasks_client,
};

/// The longest `--exec` waits for its tasks to end.
const SETTLE_DEADLINE: Duration = Duration::from_secs(120);
/// The longest `--to-start` waits, after its last submission, for the
/// measured tasks to start. An offered rate above what the cluster can run
/// builds a queue; a task still waiting then goes into the histogram with
/// its wait so far (a lower bound) and is counted as not started.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How often `--exec` asks whether any task is still unfinished.
const UNFINISHED_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Read-back requests in flight at once.
const READ_BACK_IN_FLIGHT_MAX: usize = 16;

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64)
}

/// Reads `id` until `done` says its state is settled; `Err(id)` past `deadline`.
async fn read_until(
    client: &mut TasksClient<Channel>,
    id: String,
    deadline: Instant,
    done: impl Fn(&pb::Task) -> bool,
) -> Result<pb::Task, String> {
    loop {
        let request = taskraft::client::request(
            pb::GetTaskRequest { id: id.clone(), stale: false },
            REQUEST_TIMEOUT,
        );
        if let Ok(reply) = client.get_task(request).await
            && let Some(task) = reply.into_inner().task
            && done(&task)
        {
            return Ok(task);
        }
        if Instant::now() >= deadline {
            return Err(id);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the cluster lists no task that has not finished, asking
/// every `UNFINISHED_POLL_INTERVAL` for one page of one task; gives up
/// quietly at `deadline` (the read-back that follows names what is left).
/// An empty page with a token is not the end (the server looked at only so
/// many tasks): the next page follows at once. The tasks before the token
/// had all finished, and a finished task stays finished, so polls go on
/// from there.
async fn wait_until_none_unfinished(
    client: &TasksClient<Channel>,
    deadline: Instant,
) -> anyhow::Result<()> {
    let unfinished = [
        pb::TaskState::Pending,
        pb::TaskState::Ready,
        pb::TaskState::Assigned,
        pb::TaskState::Running,
    ];
    let mut client = client.clone();
    let mut page_token = String::new();
    while Instant::now() < deadline {
        let request = taskraft::client::request(
            pb::ListTasksRequest {
                states: unfinished.iter().map(|state| *state as i32).collect(),
                page_size: 1,
                page_token: page_token.clone(),
                stale: true,
                ..Default::default()
            },
            REQUEST_TIMEOUT,
        );
        if let Ok(reply) = client.list_tasks(request).await {
            let reply = reply.into_inner();
            match (reply.tasks.is_empty(), reply.next_page_token.is_empty()) {
                (true, true) => return Ok(()),
                (true, false) => {
                    page_token = reply.next_page_token;
                    continue;
                }
                (false, _) => {}
            }
        }
        tokio::time::sleep(UNFINISHED_POLL_INTERVAL).await;
    }
    Ok(())
}

/// What a read-back found: the tasks that settled, and the ids of those
/// that had not by the deadline.
struct ReadBack {
    settled: Vec<pb::Task>,
    unsettled: Vec<String>,
}

/// Reads every task of `ids` back once `done` holds for it, a few at a time,
/// until `deadline`.
async fn read_back(
    client: &TasksClient<Channel>,
    ids: Vec<String>,
    deadline: Instant,
    done: fn(&pb::Task) -> bool,
) -> anyhow::Result<ReadBack> {
    let permits = Arc::new(Semaphore::new(READ_BACK_IN_FLIGHT_MAX));
    let mut reads = JoinSet::new();
    for id in ids {
        let permit = permits.clone().acquire_owned().await?;
        let mut client = client.clone();
        reads.spawn(async move {
            let task = read_until(&mut client, id, deadline, done).await;
            drop(permit);
            task
        });
    }
    let mut found = ReadBack { settled: Vec::new(), unsettled: Vec::new() };
    while let Some(read) = reads.join_next().await {
        match read? {
            Ok(task) => found.settled.push(task),
            Err(id) => found.unsettled.push(id),
        }
    }
    Ok(found)
}

fn started_at_ms(task: &pb::Task) -> u64 {
    task.attempts.last().map_or(0, |attempt| attempt.started_at_unix_ms)
}

fn has_started(task: &pb::Task) -> bool {
    started_at_ms(task) > 0
}

fn has_ended(task: &pb::Task) -> bool {
    task.attempts.last().is_some_and(|attempt| attempt.ended_at_unix_ms > 0)
}

/// An offset for submission `seq` that steps evenly through a millisecond
/// (by the golden ratio). Start times are whole milliseconds and are read
/// as their middle, which is right on average only when the submissions
/// fall at every point of a millisecond; at a fixed rate they would all
/// fall at the same point, and every run would be off by its own amount.
fn phase_within_a_ms(seq: u64) -> Duration {
    const GOLDEN_RATIO_FRACTION: f64 = 0.618_033_988_749_895;
    Duration::from_secs_f64((seq as f64 * GOLDEN_RATIO_FRACTION).fract() / 1_000.0)
}

/// `--to-start`: submit-to-start latency at a fixed offered rate.
pub async fn to_start(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.target == Target::Taskraft, "--to-start applies to taskraft only");
    let rate = args.rate.context("--to-start needs --rate")?;
    anyhow::ensure!(rate > 0.0, "--rate must be positive");
    let leader = leader_addr(args.target, &args.endpoints).await?;
    let client = tasks_client(connect(&leader).await?);
    let spec = task_spec(args.payload_bytes, false);
    let started = Instant::now();
    let started_unix_us = unix_us();
    let measure_from = started + args.warmup;
    let end = measure_from + args.duration;
    let interval = Duration::from_secs_f64(1.0 / rate);
    // (task id, when its submission was due, in Unix microseconds).
    let sent = Arc::new(Mutex::new(Vec::new()));
    let n_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let in_flight = Arc::new(Semaphore::new(args.clients.min(OPEN_LOOP_IN_FLIGHT_MAX)));
    eprintln!("  submitting runnable tasks at {rate}/s for {:?}", end - started);
    // Submissions go out from a thread of their own that sleeps until each
    // is due: tokio's timer fires on whole milliseconds, up to one late,
    // which this measure would have charged to the cluster.
    let runtime = tokio::runtime::Handle::current();
    let (generator_in_flight, generator_client) = (in_flight.clone(), client.clone());
    let (generator_sent, generator_errors) = (sent.clone(), n_errors.clone());
    let generator = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let (in_flight, client) = (generator_in_flight, generator_client);
        let (sent, n_errors) = (generator_sent, generator_errors);
        let mut seq: u64 = 0;
        loop {
            let due = started + interval.mul_f64(seq as f64) + phase_within_a_ms(seq);
            if due >= end {
                return Ok(());
            }
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let permit = runtime.block_on(in_flight.clone().acquire_owned())?;
            let (mut client, spec, sent, n_errors) =
                (client.clone(), spec.clone(), sent.clone(), n_errors.clone());
            let due_unix_us = started_unix_us + (due - started).as_micros() as u64;
            let measured = due >= measure_from;
            runtime.spawn(async move {
                let request = taskraft::client::request(
                    pb::SubmitTaskRequest { spec: Some(spec) },
                    REQUEST_TIMEOUT,
                );
                match client.submit_task(request).await {
                    Ok(reply) if measured => {
                        let id = reply.into_inner().task.map(|task| task.id).unwrap_or_default();
                        sent.lock().expect("sent lock").push((id, due_unix_us));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        n_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                drop(permit);
            });
            seq += 1;
        }
    });
    generator.await??;
    // Every submission has answered once every permit is back.
    let _all = in_flight.acquire_many(args.clients.min(OPEN_LOOP_IN_FLIGHT_MAX) as u32).await?;
    let sent = std::mem::take(&mut *sent.lock().expect("sent lock"));
    eprintln!("  reading back when each of {} measured tasks started", sent.len());
    let due_by_id: std::collections::HashMap<String, u64> = sent.iter().cloned().collect();
    let deadline = Instant::now() + START_DEADLINE;
    let ids = sent.into_iter().map(|(id, _)| id).collect();
    let found = read_back(&client, ids, deadline, has_started).await?;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    // The same latencies by the node whose executor started the task: the
    // leader's executor sees an assignment as the leader applies it, a
    // follower's once it has learned of the commit.
    let mut by_node = std::collections::BTreeMap::<u64, Histogram<u64>>::new();
    for task in &found.settled {
        let due_us = due_by_id[&task.id];
        let start_us = started_at_ms(task) * 1_000 + 500;
        let latency_us = start_us.saturating_sub(due_us).max(1);
        histogram.saturating_record(latency_us);
        let node = task.attempts.last().map_or(0, |attempt| attempt.node_id);
        if let std::collections::btree_map::Entry::Vacant(entry) = by_node.entry(node) {
            entry.insert(Histogram::new_with_bounds(1, 600_000_000, 3)?);
        }
        by_node.get_mut(&node).expect("inserted above").saturating_record(latency_us);
    }
    let by_node: serde_json::Map<String, serde_json::Value> = by_node
        .iter()
        .map(|(node, h)| {
            let summary = serde_json::json!({
                "items": h.len(),
                "p50_us": h.value_at_quantile(0.50),
                "p99_us": h.value_at_quantile(0.99),
            });
            (node.to_string(), summary)
        })
        .collect();
    let gave_up_us = unix_us();
    for id in &found.unsettled {
        histogram.saturating_record(gave_up_us.saturating_sub(due_by_id[id]).max(1));
    }
    if !found.unsettled.is_empty() {
        eprintln!(
            "  {} of {} measured tasks had not started {START_DEADLINE:?} after the last submission: the offered rate is above what the cluster runs",
            found.unsettled.len(),
            due_by_id.len()
        );
    }
    let result = serde_json::json!({
        "target": "taskraft",
        "mode": "to_start",
        "rate": rate,
        "items": due_by_id.len(),
        "not_started": found.unsettled.len(),
        "start_deadline_s": START_DEADLINE.as_secs(),
        "errors": n_errors.load(std::sync::atomic::Ordering::Relaxed),
        "seconds": args.duration.as_secs_f64(),
        "items_per_s": due_by_id.len() as f64 / args.duration.as_secs_f64(),
        "p50_us": histogram.value_at_quantile(0.50),
        "p99_us": histogram.value_at_quantile(0.99),
        "max_us": histogram.max(),
        "resolution_us": 1_000,
        "leader": leader,
        "by_executor_node": by_node,
    });
    println!("{result}");
    Ok(())
}

/// `--exec N`: how fast the cluster runs N queued no-op tasks.
pub async fn exec(args: &Args, n_tasks: usize) -> anyhow::Result<()> {
    anyhow::ensure!(args.target == Target::Taskraft, "--exec applies to taskraft only");
    anyhow::ensure!(n_tasks > 0, "--exec needs at least one task");
    let leader = leader_addr(args.target, &args.endpoints).await?;
    let client = tasks_client(connect(&leader).await?);
    let spec = task_spec(0, false);
    // The nodes' own CPU and their tasks' over the whole run, submissions
    // included: what each task costs the node against what its process costs.
    let ticks = clock_ticks();
    let cpu = |read: fn(u32, f64) -> Option<f64>| {
        args.server_pids.iter().filter_map(|pid| read(*pid, ticks)).sum::<f64>()
    };
    let (node_cpu_from, task_cpu_from) = (cpu(cpu_seconds), cpu(reaped_children_cpu_seconds));
    eprintln!("  submitting {n_tasks} no-op tasks in batches of {}", args.batch);
    let mut submissions = JoinSet::new();
    let permits = Arc::new(Semaphore::new(args.clients));
    for first in (0..n_tasks).step_by(args.batch) {
        let n = args.batch.min(n_tasks - first);
        let permit = permits.clone().acquire_owned().await?;
        let (mut client, specs) = (client.clone(), vec![spec.clone(); n]);
        submissions.spawn(async move {
            let request =
                taskraft::client::request(pb::SubmitTasksRequest { specs }, REQUEST_TIMEOUT);
            let reply = client.submit_tasks(request).await;
            drop(permit);
            reply
        });
    }
    let mut ids = Vec::with_capacity(n_tasks);
    while let Some(reply) = submissions.join_next().await {
        let reply = reply?.context("a SubmitTasks call failed")?.into_inner();
        ids.extend(reply.results.into_iter().filter_map(|result| result.task.map(|task| task.id)));
    }
    anyhow::ensure!(ids.len() == n_tasks, "{} of {n_tasks} submissions came back", ids.len());
    eprintln!("  waiting for the {n_tasks} tasks to end");
    let deadline = Instant::now() + SETTLE_DEADLINE;
    // Polling each task while they run would load the servers the rate is
    // measured on; one small listing now and then does not. The read-back
    // afterwards checks every task, outside the measured window.
    wait_until_none_unfinished(&client, deadline).await?;
    let (node_cpu_s, task_cpu_s) =
        (cpu(cpu_seconds) - node_cpu_from, cpu(reaped_children_cpu_seconds) - task_cpu_from);
    let found = read_back(&client, ids, deadline, has_ended).await?;
    if let Some(id) = found.unsettled.first() {
        bail!(
            "{} of {n_tasks} tasks (task {id} among them) did not end within {SETTLE_DEADLINE:?}",
            found.unsettled.len()
        );
    }
    let tasks = found.settled;
    let n_failed =
        tasks.iter().filter(|task| task.state != pb::TaskState::Succeeded as i32).count();
    anyhow::ensure!(n_failed == 0, "{n_failed} of {n_tasks} no-op tasks did not succeed");
    let first_start_ms = tasks.iter().map(started_at_ms).min().unwrap_or(0);
    let last_end_ms = tasks
        .iter()
        .filter_map(|task| task.attempts.last().map(|attempt| attempt.ended_at_unix_ms))
        .max()
        .unwrap_or(0);
    let seconds = (last_end_ms.saturating_sub(first_start_ms)).max(1) as f64 / 1e3;
    let nodes: BTreeSet<u64> =
        tasks.iter().filter_map(|task| task.attempts.last().map(|a| a.node_id)).collect();
    let result = serde_json::json!({
        "target": "taskraft",
        "mode": "exec",
        "items": n_tasks,
        "seconds": seconds,
        "items_per_s": n_tasks as f64 / seconds,
        "nodes": nodes.len(),
        "node_cpu_us_per_task": node_cpu_s * 1e6 / n_tasks as f64,
        "task_cpu_us_per_task": task_cpu_s * 1e6 / n_tasks as f64,
    });
    println!("{result}");
    Ok(())
}

/// `--spawn`: fork and exec of `true`, `--clients` at a time, for
/// `--duration` after `--warmup`.
pub async fn spawn(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let measure_from = started + args.warmup;
    let end = measure_from + args.duration;
    let mut workers = JoinSet::new();
    for _ in 0..args.clients {
        workers.spawn(async move {
            let mut n_measured: u64 = 0;
            while Instant::now() < end {
                let status = tokio::process::Command::new("true")
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .await?;
                anyhow::ensure!(status.success(), "true exited with {status}");
                if Instant::now() >= measure_from {
                    n_measured += 1;
                }
            }
            anyhow::Ok(n_measured)
        });
    }
    let mut items = 0;
    while let Some(worker) = workers.join_next().await {
        items += worker??;
    }
    let seconds = args.duration.as_secs_f64();
    let result = serde_json::json!({
        "target": "machine",
        "mode": "spawn",
        "clients": args.clients,
        "items": items,
        "seconds": seconds,
        "items_per_s": items as f64 / seconds,
    });
    println!("{result}");
    Ok(())
}
