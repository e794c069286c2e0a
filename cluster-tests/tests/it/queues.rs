//! Queue limits on three real nodes: a queue limited to one active task
//! runs its tasks one after another while another queue runs in parallel;
//! a limit of 0 pauses a queue until the limit is lifted; the CLI sets and
//! lists limits and refuses a bad queue name.

use std::time::Duration;

use cluster_tests::workload::wait_until_all_finished;
use cluster_tests::{TestCluster, get, spec, submit};
use taskraft::proto::taskraft_v1 as pb;

fn in_queue(queue: &str, program: &str, args: &[&str]) -> pb::TaskSpec {
    pb::TaskSpec { queue: queue.into(), ..spec(program, args, None) }
}

/// From assignment to end, as the cluster recorded the task's one attempt.
fn active_span(task: &pb::Task) -> (u64, u64) {
    let attempt = task.attempts.last().expect("a finished task has an attempt");
    (attempt.assigned_at_unix_ms, attempt.ended_at_unix_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_limited_queue_runs_one_task_at_a_time_and_a_paused_one_none() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, &[]).await?;
    let (code, stdout, stderr) =
        cluster.cli(&["queue", "limit", "serial", "--running-max", "1"])?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("serial"), "{stdout}");

    let mut client = cluster.client()?;
    let mut serial = Vec::new();
    let mut parallel = Vec::new();
    for _ in 0..4 {
        let task = submit(&mut client, in_queue("serial", "sleep", &["0.3"])).await?.task;
        serial.push(task.expect("a submitted task").id);
        let task = submit(&mut client, in_queue("other", "sleep", &["0.3"])).await?.task;
        parallel.push(task.expect("a submitted task").id);
    }
    let ids: Vec<String> = serial.iter().chain(&parallel).cloned().collect();
    let tasks = wait_until_all_finished(&mut client, &ids, Duration::from_secs(60)).await?;
    assert!(tasks.iter().all(|task| task.state == pb::TaskState::Succeeded as i32));

    // Each serial task was assigned only once the one before it had ended.
    let mut serial_spans: Vec<(u64, u64)> = tasks[..4].iter().map(active_span).collect();
    serial_spans.sort();
    for pair in serial_spans.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "serial tasks overlapped: {serial_spans:?}");
    }
    // The other queue had the free slots: some of its tasks ran together.
    let other_spans: Vec<(u64, u64)> = tasks[4..].iter().map(active_span).collect();
    let overlapping = other_spans
        .iter()
        .enumerate()
        .any(|(i, a)| other_spans[i + 1..].iter().any(|b| a.0 < b.1 && b.0 < a.1));
    assert!(overlapping, "the unlimited queue ran one at a time: {other_spans:?}");

    let (code, stdout, stderr) = cluster.cli(&["--output", "json", "queue", "list"])?;
    assert_eq!(code, 0, "{stderr}");
    let serial_row = stdout
        .lines()
        .map(serde_json::from_str::<serde_json::Value>)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|row| row["name"] == "serial")
        .ok_or_else(|| anyhow::anyhow!("no serial queue in {stdout}"))?;
    assert_eq!(serial_row["running_max"], 1, "{serial_row}");
    assert_eq!((serial_row["ready"].clone(), serial_row["active"].clone()), (0.into(), 0.into()));

    // Paused: a ready task waits, with free slots everywhere, until the
    // limit is lifted.
    let (code, _, stderr) = cluster.cli(&["queue", "limit", "serial", "--running-max", "0"])?;
    assert_eq!(code, 0, "{stderr}");
    let held = submit(&mut client, in_queue("serial", "true", &[])).await?.task.expect("a task").id;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(get(&mut client, &held, false).await?.state, pb::TaskState::Ready as i32);
    let (code, _, stderr) = cluster.cli(&["queue", "limit", "serial", "--unlimited"])?;
    assert_eq!(code, 0, "{stderr}");
    wait_until_all_finished(&mut client, &[held], Duration::from_secs(30)).await?;

    let (code, _, stderr) = cluster.cli(&["queue", "limit", "a b", "--running-max", "1"])?;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("may hold only"), "{stderr}");
    Ok(())
}

/// A node's `limits.queue_limits_max` bounds how many queues have a limit:
/// one more is RESOURCE_EXHAUSTED (CLI exit 1) and changes nothing, while a
/// queue that has one may change it, and a lifted one frees its place. Each
/// node's metrics show the limits it applied and the active tasks under them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_number_of_queue_limits_is_bounded_and_the_metrics_show_them() -> anyhow::Result<()> {
    let (_config_dir, config_arg) = cluster_tests::config_file("[limits]\nqueue_limits_max = 2\n")?;
    let cluster = TestCluster::start(3, &["--config", &config_arg]).await?;
    for (queue, running_max) in [("serial", "1"), ("paused", "0")] {
        let (code, _, stderr) =
            cluster.cli(&["queue", "limit", queue, "--running-max", running_max])?;
        assert_eq!(code, 0, "{stderr}");
    }
    let (code, _, stderr) = cluster.cli(&["queue", "limit", "third", "--running-max", "1"])?;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("2 queues have limits, the limit is 2"), "{stderr}");
    let (code, _, stderr) = cluster.cli(&["queue", "limit", "serial", "--running-max", "3"])?;
    assert_eq!(code, 0, "changing a limit that is set: {stderr}");

    // A task held in the paused queue is not active; one running in serial is.
    let mut client = cluster.client()?;
    let running =
        submit(&mut client, in_queue("serial", "sleep", &["30"])).await?.task.expect("a task");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get(&mut client, &running.id, false).await?.state != pb::TaskState::Running as i32 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the serial task never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for node in 1..=3 {
        let metrics_deadline = std::time::Instant::now() + Duration::from_secs(5);
        let metrics = loop {
            let metrics = cluster.metrics(node).await?;
            let active = metrics.get("taskraft_queue_active_tasks{queue=\"serial\"}").copied();
            if active == Some(1.0) || std::time::Instant::now() > metrics_deadline {
                break metrics;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let value = |name: &str| metrics.get(name).copied();
        assert_eq!(value("taskraft_queue_running_max{queue=\"serial\"}"), Some(3.0), "node {node}");
        assert_eq!(value("taskraft_queue_running_max{queue=\"paused\"}"), Some(0.0), "node {node}");
        assert_eq!(
            value("taskraft_queue_active_tasks{queue=\"serial\"}"),
            Some(1.0),
            "node {node}"
        );
        assert_eq!(
            value("taskraft_queue_active_tasks{queue=\"paused\"}"),
            Some(0.0),
            "node {node}"
        );
        assert_eq!(value("taskraft_queue_running_max{queue=\"third\"}"), None, "node {node}");
        assert_eq!(value("taskraft_queue_limits_omitted"), Some(0.0), "node {node}");
    }

    let (code, _, stderr) = cluster.cli(&["queue", "limit", "paused", "--unlimited"])?;
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = cluster.cli(&["queue", "limit", "third", "--running-max", "1"])?;
    assert_eq!(code, 0, "a lifted limit frees its place: {stderr}");
    Ok(())
}
