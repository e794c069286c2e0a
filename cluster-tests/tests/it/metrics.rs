//! The metrics endpoint on a live cluster: each node's Raft role and
//! progress, its applied view of the tasks, and what its own executor ran,
//! checked against what the API says; requests for anything else get a
//! status with a message, and the endpoint goes on serving.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cluster_tests::workload::{submit_batch, wait_until_all_finished};
use cluster_tests::{TestCluster, get, spec, submit, unplaceable};
use taskraft::proto::taskraft_v1 as pb;

/// The value of `sample` (a name with its labels) in `metrics`.
fn value(metrics: &BTreeMap<String, f64>, sample: &str) -> anyhow::Result<f64> {
    metrics.get(sample).copied().ok_or_else(|| anyhow::anyhow!("no sample {sample}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_node_s_metrics_show_its_role_the_tasks_and_what_it_ran() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, &["--slots", "2"]).await?;
    let mut client = cluster.client()?;
    // Six that succeed, two that fail for good, one that waits for a label
    // no node has.
    let succeeding = (0..6).map(|_| spec("true", &[], None));
    let failing =
        (0..2).map(|_| pb::TaskSpec { max_attempts: 1, ..spec("sh", &["-c", "exit 3"], None) });
    let ids = submit_batch(&mut client, succeeding.chain(failing).collect()).await?;
    let parked = pb::TaskSpec { queue: "parked".into(), ..unplaceable(spec("true", &[], None)) };
    submit(&mut client, parked).await?;
    let tasks = wait_until_all_finished(&mut client, &ids, Duration::from_secs(60)).await?;

    // What each node's executor must have counted, by the tasks' attempts.
    let mut ran: BTreeMap<(u64, &str), f64> = BTreeMap::new();
    for attempt in tasks.iter().flat_map(|task| &task.attempts) {
        let outcome = match attempt.outcome.as_str() {
            "exited 0" => "succeeded",
            "exited 3" => "exited",
            other => anyhow::bail!("an attempt ended otherwise than planned: {other}"),
        };
        *ran.entry((attempt.node_id, outcome)).or_default() += 1.0;
    }
    assert_eq!(ran.values().sum::<f64>(), 8.0, "one attempt each: {ran:?}");

    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let commit_index = cluster.local_status(leader).await?.commit_index;
    for id in 1..=3 {
        cluster.wait_for_applied(id, commit_index, Duration::from_secs(10)).await?;
        // An executor takes its first lease with a heartbeat the leader
        // answers once a majority has acknowledged it: a test this quick
        // (0.4 s) can scrape a node before that. Within a lease of starting,
        // every executor holds one.
        let deadline = Instant::now() + Duration::from_secs(3);
        while value(&cluster.metrics(id).await?, "taskraft_executor_lease_held")? != 1.0
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for id in 1..=3 {
        let metrics = cluster.metrics(id).await?;
        let is_leader = value(&metrics, "taskraft_raft_role{role=\"leader\"}")?;
        assert_eq!(is_leader, f64::from(u8::from(id == leader)), "node {id}");
        assert_eq!(value(&metrics, "taskraft_raft_leader_id")?, leader as f64, "node {id}");
        assert_eq!(value(&metrics, "taskraft_raft_voters")?, 3.0);
        assert!(value(&metrics, "taskraft_raft_applied_index")? >= commit_index as f64);
        assert!(metrics.contains_key(&format!(
            "taskraft_node_info{{node_id=\"{id}\",version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )));
        // Every node has applied the same tasks.
        let tasks_in =
            |state: &str| value(&metrics, &format!("taskraft_tasks{{state=\"{state}\"}}"));
        assert_eq!(tasks_in("SUCCEEDED")?, 6.0, "node {id}");
        assert_eq!(tasks_in("FAILED")?, 2.0, "node {id}");
        assert_eq!(tasks_in("READY")?, 1.0, "node {id}");
        for state in ["PENDING", "ASSIGNED", "RUNNING", "CANCELLED"] {
            assert_eq!(tasks_in(state)?, 0.0, "node {id}, {state}");
        }
        assert_eq!(value(&metrics, "taskraft_ready_tasks{queue=\"parked\"}")?, 1.0);
        assert_eq!(value(&metrics, "taskraft_ready_queues_omitted")?, 0.0);
        // Its own executor: what it ran, as the attempts say.
        assert_eq!(value(&metrics, "taskraft_executor_slots")?, 2.0);
        assert_eq!(value(&metrics, "taskraft_executor_attempts_active")?, 0.0);
        assert_eq!(value(&metrics, "taskraft_executor_lease_held")?, 1.0, "node {id}");
        let ran_here = |outcome: &str| ran.get(&(id, outcome)).copied().unwrap_or(0.0);
        let ended = |outcome: &str| {
            value(
                &metrics,
                &format!("taskraft_executor_attempts_ended_total{{outcome=\"{outcome}\"}}"),
            )
        };
        assert_eq!(ended("succeeded")?, ran_here("succeeded"), "node {id}");
        assert_eq!(ended("exited")?, ran_here("exited"), "node {id}");
        for outcome in ["signalled", "timed_out", "cancelled", "lost", "start_failed"] {
            assert_eq!(ended(outcome)?, 0.0, "node {id}, {outcome}");
        }
        assert_eq!(
            value(&metrics, "taskraft_executor_attempts_started_total")?,
            ran_here("succeeded") + ran_here("exited"),
            "node {id}"
        );
        // Replication as the leader sees it, and this node's log on disk.
        for node_id in 1..=3 {
            let matched =
                metrics.get(&format!("taskraft_raft_matched_index{{node_id=\"{node_id}\"}}"));
            match id == leader {
                true => {
                    assert!(matched.is_some_and(|index| *index >= 1.0), "{node_id} on the leader")
                }
                false => assert_eq!(matched, None, "a follower knows no replication"),
            }
        }
        let quorum_ack_age = metrics.get("taskraft_raft_quorum_ack_age_seconds");
        assert_eq!(quorum_ack_age.is_some(), id == leader, "node {id}");
        let n_flushes = value(&metrics, "taskraft_raft_log_flush_seconds_count")?;
        assert!(n_flushes >= 1.0, "node {id} flushed its log");
        assert_eq!(
            value(&metrics, "taskraft_raft_log_flush_seconds_bucket{le=\"+Inf\"}")?,
            n_flushes
        );
        assert!(value(&metrics, "taskraft_raft_log_appended_bytes_total")? > 0.0);
        assert!(value(&metrics, "process_resident_memory_bytes")? > 0.0);
        assert!(value(&metrics, "process_cpu_seconds_total")? > 0.0);
    }

    // The client API's calls, by method and code: two refused reads on node 1.
    let mut node_1 = cluster.node_client(1, Duration::from_secs(5))?;
    let not_found = get(&mut node_1, "999999", true).await.expect_err("no such task");
    assert_eq!(not_found.code(), tonic::Code::NotFound);
    let invalid = get(&mut node_1, "not-an-id", true).await.expect_err("not an id");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    let metrics = cluster.metrics(1).await?;
    let get_task = "method=\"taskraft.v1.Tasks/GetTask\"";
    for code in ["NOT_FOUND", "INVALID_ARGUMENT"] {
        let sample = format!("taskraft_api_requests_total{{{get_task},code=\"{code}\"}}");
        assert_eq!(value(&metrics, &sample)?, 1.0, "{sample}");
    }
    let n_get_task: f64 = metrics
        .iter()
        .filter(|(sample, _)| {
            sample.starts_with(&format!("taskraft_api_requests_total{{{get_task},"))
        })
        .map(|(_, n_calls)| n_calls)
        .sum();
    let get_task_count = format!("taskraft_api_request_seconds_count{{{get_task}}}");
    assert_eq!(value(&metrics, &get_task_count)?, n_get_task, "one duration per call");
    let submit_tasks_ok =
        "taskraft_api_requests_total{method=\"taskraft.v1.Tasks/SubmitTasks\",code=\"OK\"}";
    let mut n_submitted = 0.0;
    for id in 1..=3 {
        n_submitted += cluster.metrics(id).await?.get(submit_tasks_ok).copied().unwrap_or(0.0);
    }
    assert!(n_submitted >= 1.0, "the batch was answered OK by the node it reached");

    // Anything but GET or HEAD of /metrics is answered with a status and a
    // message, and the endpoint serves on.
    let head = |request_line: &str| format!("{request_line}\r\nHost: test");
    let (code, body) = cluster.metrics_http(1, &head("GET /other HTTP/1.1")).await?;
    assert_eq!(code, 404);
    assert!(body.contains("/metrics"), "{body}");
    let (code, body) = cluster.metrics_http(1, &head("POST /metrics HTTP/1.1")).await?;
    assert_eq!(code, 405);
    assert!(body.contains("GET"), "{body}");
    let oversized =
        format!("{}\r\nX-Padding: {}", head("GET /metrics HTTP/1.1"), "a".repeat(64 * 1024));
    let refused = cluster.metrics_http(1, &oversized).await;
    assert!(
        matches!(refused, Ok((431, _)) | Err(_)),
        "a request head over the limit is refused: {refused:?}"
    );
    let (code, _) = cluster.metrics_http(1, &head("this is not HTTP")).await?;
    assert_eq!(code, 400);
    assert_eq!(value(&cluster.metrics(1).await?, "taskraft_raft_voters")?, 3.0);

    // After the leader dies, a new one says so, in a later term.
    let term = value(&cluster.metrics(leader).await?, "taskraft_raft_term")?;
    cluster.kill(leader)?;
    let new_leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let metrics = cluster.metrics(new_leader).await?;
    assert_eq!(value(&metrics, "taskraft_raft_role{role=\"leader\"}")?, 1.0);
    assert!(value(&metrics, "taskraft_raft_term")? > term);
    Ok(())
}
