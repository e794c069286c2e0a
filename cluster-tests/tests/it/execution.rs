//! Execution on a live cluster: tasks run where the leader put them, once;
//! lost tasks run again; stale attempts do not count; delayed tasks wait.
//!
//! Tasks here record their own `exec-start` and `exec-end` in a Jepsen-style
//! history, with the variables taskraft gives them; the tests record their
//! submissions, faults and a final read, and the checker judges the whole.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster_tests::history::{self, Event, HistoryWriter, now_ns};
use cluster_tests::witness::ExitWitness;
use cluster_tests::workload::{
    assert_history_valid, record_final_read, submit_batch, submit_recorded, wait_until_all_finished,
};
use cluster_tests::{TestCluster, get, submit};
use taskraft::client::Client;
use taskraft::executor::protocol::{ExecutorReply, ExecutorRequest};
use taskraft::proto::taskraft_v1 as pb;
use taskraft::scheduler::{AttemptReport, Command, Outcome, RejectionKind, Response, TaskId};

/// The lease the cluster runs with (the default) and the promise on top of it.
const LEASE: Duration = Duration::from_secs(3);
const RERUN_BOUND: Duration = Duration::from_secs(3 + 2);
/// How long the processes of finished tasks may take to be gone.
pub(crate) const WITNESS_WAIT: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A task that records its start and its end in the history at `history`,
/// with what taskraft told it, and sleeps in between.
pub(crate) fn logged_task(
    history: &Path,
    witness: &ExitWitness,
    key: &str,
    sleep_s: f64,
) -> pb::TaskSpec {
    let event = |kind: &str| {
        format!(
            r#"printf '{{"type":"{kind}","task_id":"%s","attempt":%s,"token":%s,"node":%s,"time_ns":%s}}\n' "$TASKRAFT_TASK_ID" "$TASKRAFT_ATTEMPT" "$TASKRAFT_FENCING_TOKEN" "$TASKRAFT_NODE_ID" "$(date +%s%N)" >> {}"#,
            history.display()
        )
    };
    // Longer tasks tick every 0.1 s, so that a killed one shows when it died.
    let body = if sleep_s > 1.0 {
        let n_ticks = (sleep_s * 10.0) as u32;
        format!(
            "i=0; while [ $i -lt {n_ticks} ]; do sleep 0.1; {}; i=$((i+1)); done",
            event("exec-alive")
        )
    } else {
        format!("sleep {sleep_s}")
    };
    // The hold comes first, so that every logged start has a witness.
    let script = format!(
        "{}; {}; {body}; {}",
        witness.hold_script(),
        event("exec-start"),
        event("exec-end")
    );
    pb::TaskSpec {
        command: Some(pb::Command {
            program: "sh".into(),
            args: vec!["-c".into(), script],
            ..Default::default()
        }),
        max_attempts: 5,
        // Retries come quickly, so the re-run bound measures the lease, not the backoff.
        backoff: Some(pb::Backoff { initial_ms: 100, max_ms: 200, multiplier_milli: 1_000 }),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_short_tasks_all_succeed_with_one_attempt_each() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, &[]).await?;
    let mut client = cluster.client()?;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let specs = (0..100).map(|_| cluster_tests::spec("true", &[], None)).collect();
        ids.extend(submit_batch(&mut client, specs).await?);
    }
    let tasks = wait_until_all_finished(&mut client, &ids, Duration::from_secs(120)).await?;
    let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
    for task in &tasks {
        assert_eq!(task.state, pb::TaskState::Succeeded as i32, "task {}", task.id);
        assert_eq!(task.attempts.len(), 1, "task {} ran once", task.id);
        *per_node.entry(task.attempts[0].node_id).or_default() += 1;
    }
    assert_eq!(per_node.len(), 3, "every node's executor ran tasks: {per_node:?}");
    // Nothing was stopped: an attempt whose own completion made it no longer
    // current is not reported as stopped.
    for id in 1..=3 {
        let log = cluster.log(id);
        let n_stopped = log.matches("stopping an attempt that is no longer current").count();
        assert_eq!(n_stopped, 0, "node {id} logged attempts as stopped that had ended");
        // A log written to a file is plain text, without terminal colours.
        assert!(!log.contains('\u{1b}'), "node {id}'s log file holds escape codes");
    }
    Ok(())
}

/// The leader proposes a submission with its view of the executors, so the
/// submission's own entry assigns the task: the answer already names a node,
/// and successive tasks on an idle cluster take turns over the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_submitted_to_an_idle_cluster_is_assigned_by_its_own_entry() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, &[]).await?;
    let mut client = cluster.client()?;
    let state_of = |answer: &pb::SubmitTaskResponse| {
        let task = answer.task.clone().unwrap_or_default();
        (task.state, task.attempts.first().map(|attempt| attempt.node_id), task.id)
    };
    // Until the leader has heard a heartbeat it has no view to propose with.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = submit(&mut client, cluster_tests::spec("true", &[], None)).await?;
        let (state, _, id) = state_of(&answer);
        wait_until_all_finished(&mut client, std::slice::from_ref(&id), Duration::from_secs(20))
            .await?;
        if state == pb::TaskState::Assigned as i32 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no submission was assigned by its own entry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every executor has heartbeated by now (300 ms apart).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
    for _ in 0..9 {
        let answer = submit(&mut client, cluster_tests::spec("true", &[], None)).await?;
        let (state, node, id) = state_of(&answer);
        assert_eq!(state, pb::TaskState::Assigned as i32, "task {id}: {answer:?}");
        *per_node.entry(node.unwrap_or_default()).or_default() += 1;
        let tasks = wait_until_all_finished(
            &mut client,
            std::slice::from_ref(&id),
            Duration::from_secs(20),
        )
        .await?;
        assert_eq!(tasks[0].state, pb::TaskState::Succeeded as i32, "task {id}");
    }
    assert_eq!(per_node, BTreeMap::from([(1, 3), (2, 3), (3, 3)]));
    Ok(())
}

/// A program that ends within `start_report_delay_ms` is recorded once, by
/// its completion, which carries its start time: the task goes from
/// ASSIGNED to SUCCEEDED without a RUNNING in between. One that runs longer
/// shows RUNNING while it runs. On an idle cluster a start recorded at once
/// would commit before a no-op's end, so each short task here would show
/// RUNNING without the delay. The delay is 1 s here rather than the default
/// 100 ms so that `true` ends within it even on a loaded host (the delay
/// must stay at most `lease_ms`, 3 s by default), and the long task sleeps
/// 3 s so that it outlives the delay by far.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_task_is_recorded_once_and_a_long_one_shows_running() -> anyhow::Result<()> {
    use futures::StreamExt;
    use taskraft::proto::taskraft_v1::tasks_client::TasksClient;

    let cluster = TestCluster::start(3, &["--start-report-delay-ms", "1000"]).await?;
    let mut client = cluster.client()?;
    let channel = cluster.api_channel(2).await?;
    let request = pb::WatchTasksRequest { task_id: String::new(), after_revision: 0 };
    let mut stream = TasksClient::new(channel).watch_tasks(request).await?.into_inner();
    let mut short_ids = Vec::new();
    for _ in 0..5 {
        let answer = submit(&mut client, cluster_tests::spec("true", &[], None)).await?;
        let id = answer.task.map(|task| task.id).unwrap_or_default();
        wait_until_all_finished(&mut client, std::slice::from_ref(&id), Duration::from_secs(20))
            .await?;
        short_ids.push(id);
    }
    let answer = submit(&mut client, cluster_tests::spec("sleep", &["3"], None)).await?;
    let long_id = answer.task.map(|task| task.id).unwrap_or_default();
    let finished = wait_until_all_finished(
        &mut client,
        std::slice::from_ref(&long_id),
        Duration::from_secs(20),
    )
    .await?;
    assert_eq!(finished[0].state, pb::TaskState::Succeeded as i32, "task {long_id}");

    let mut states: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    let mut finals: BTreeMap<String, pb::Task> = BTreeMap::new();
    while finals.len() < short_ids.len() + 1 {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the watch ended early"))??;
        let task = event.task.unwrap_or_default();
        states.entry(task.id.clone()).or_default().push(task.state);
        if task.state == pb::TaskState::Succeeded as i32 {
            finals.insert(task.id.clone(), task);
        }
    }
    for id in &short_ids {
        let seen = &states[id];
        assert!(
            !seen.contains(&(pb::TaskState::Running as i32)),
            "short task {id} went through RUNNING: {seen:?}"
        );
        let attempt = &finals[id].attempts[0];
        assert!(
            attempt.started_at_unix_ms > 0
                && attempt.started_at_unix_ms <= attempt.ended_at_unix_ms,
            "short task {id} has its start time from its completion: {attempt:?}"
        );
    }
    assert!(
        states[&long_id].contains(&(pb::TaskState::Running as i32)),
        "the long task showed RUNNING while it ran: {:?}",
        states[&long_id]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_while_tasks_run_loses_none_and_overlaps_none() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("history.jsonl");
    let history = HistoryWriter::create(&path)?;
    let witness = ExitWitness::start(&dir.path().join("held"), history.clone())?;
    let mut client = cluster.client()?;
    let specs =
        (0..30).map(|idx| logged_task(&path, &witness, &format!("before-{idx}"), 1.0)).collect();
    submit_recorded(&mut client, &history, 0, specs).await?;
    // Let attempts start everywhere, then kill the leader mid-run.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(5)).await?;
    cluster.kill(leader)?;
    history.record(&Event::Nemesis {
        f: "kill".into(),
        nodes: vec![leader],
        leader: true,
        time_ns: now_ns(),
    });
    let mut client = cluster.client()?;
    let more =
        (0..10).map(|idx| logged_task(&path, &witness, &format!("after-{idx}"), 0.2)).collect();
    submit_recorded(&mut client, &history, 1, more).await?;
    cluster.restart(leader)?;
    history.record(&Event::Heal { time_ns: now_ns() });

    let ids: Vec<String> = history::read(&path)?
        .into_iter()
        .filter_map(|event| match event {
            Event::Ok { task_id, .. } => task_id,
            _ => None,
        })
        .collect();
    let tasks = wait_until_all_finished(&mut client, &ids, Duration::from_secs(120)).await?;
    for task in &tasks {
        assert_eq!(
            task.state,
            pb::TaskState::Succeeded as i32,
            "task {}: {:?}",
            task.id,
            task.attempts
        );
    }
    record_final_read(&mut client, &history).await?;
    witness.finish(&path, WITNESS_WAIT)?;
    let report = assert_history_valid(&path)?;
    assert_eq!(report.n_acknowledged, 40);
    assert_eq!(report.failover_gaps_ms.len(), 1);
    Ok(())
}

/// Picks a follower that runs `task_id`'s current attempt, moving leadership
/// away from it first if needed.
async fn runner_as_follower(
    cluster: &TestCluster,
    client: &mut Client,
    task_id: &str,
) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let task = get(client, task_id, false).await?;
        if task.state == pb::TaskState::Running as i32 {
            let attempt = task.attempts.last().unwrap();
            let leader = cluster.wait_for_leader(Duration::from_secs(5)).await?;
            if attempt.node_id != leader {
                return Ok((attempt.node_id, attempt.fencing_token));
            }
            let other = (1..=3).find(|id| *id != leader).unwrap();
            let (code, _, stderr) =
                cluster.cli(&["cluster", "transfer-leader", &other.to_string()])?;
            anyhow::ensure!(code == 0, "transfer failed: {stderr}");
            continue;
        }
        anyhow::ensure!(Instant::now() < deadline, "task {task_id} never ran: {task:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the history shows the process of attempt `token` started.
async fn wait_for_exec_start(path: &Path, token: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let started = history::read(path)?.iter().any(
            |event| matches!(event, Event::ExecStart { token: started, .. } if *started == token),
        );
        if started {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "attempt {token} never started its process");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_new_attempt(
    client: &mut Client,
    task_id: &str,
    old_token: u64,
    timeout: Duration,
) -> anyhow::Result<pb::Attempt> {
    let deadline = Instant::now() + timeout;
    loop {
        let task = get(client, task_id, false).await?;
        if let Some(attempt) = task.attempts.last()
            && attempt.fencing_token > old_token
            && attempt.started_at_unix_ms > 0
        {
            return Ok(attempt.clone());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no new attempt of {task_id} within {timeout:?}: {task:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_lost_with_its_node_runs_again_within_the_lease_and_its_old_report_is_refused()
-> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("history.jsonl");
    let history = HistoryWriter::create(&path)?;
    let witness = ExitWitness::start(&dir.path().join("held"), history.clone())?;
    let mut client = cluster.client()?;
    let task_id =
        submit_recorded(&mut client, &history, 0, vec![logged_task(&path, &witness, "long", 8.0)])
            .await?
            .remove(0);
    let (runner, old_token) = runner_as_follower(&cluster, &mut client, &task_id).await?;
    // RUNNING is committed just before the process starts: act only once the
    // process itself has said it runs.
    wait_for_exec_start(&path, old_token).await?;
    cluster.kill(runner)?;
    let killed_at = Instant::now();
    history.record(&Event::Nemesis {
        f: "kill".into(),
        nodes: vec![runner],
        leader: false,
        time_ns: now_ns(),
    });

    let mut client = cluster.client()?;
    let retry =
        wait_for_new_attempt(&mut client, &task_id, old_token, Duration::from_secs(20)).await?;
    let rerun_after = killed_at.elapsed();
    assert_ne!(retry.node_id, runner);
    assert!(
        rerun_after <= RERUN_BOUND,
        "the task ran again only {rerun_after:?} after its node died"
    );

    // A late report from the old attempt (as its process would send, had
    // it survived) is refused as stale by the leader.
    let late = ExecutorRequest::Reports(vec![Command::CompleteAttempt {
        now_ms: now_ms(),
        task: TaskId(task_id.parse()?),
        token: old_token,
        report: AttemptReport {
            started_at_ms: Some(now_ms() - 1_000),
            ended_at_ms: now_ms(),
            outcome: Outcome::Exited { code: 0 },
            stdout_tail: "late".into(),
            stderr_tail: String::new(),
        },
    }]);
    let leader = cluster.wait_for_leader(Duration::from_secs(5)).await?;
    match cluster.executor_request(leader, &late).await? {
        ExecutorReply::Applied(Response::Reports(answers)) => match &answers[..] {
            [Response::Rejected(rejection)] => {
                assert_eq!(rejection.kind, RejectionKind::Stale, "{rejection}")
            }
            other => panic!("a late report with token {old_token} was answered {other:?}"),
        },
        other => panic!("a late report with token {old_token} was not refused: {other:?}"),
    }

    // The node comes back and the task ends with exactly the attempts that count.
    cluster.restart(runner)?;
    history.record(&Event::Heal { time_ns: now_ns() });
    let finished = wait_until_all_finished(
        &mut client,
        std::slice::from_ref(&task_id),
        Duration::from_secs(60),
    )
    .await?;
    let task = &finished[0];
    assert_eq!(task.state, pb::TaskState::Succeeded as i32);
    assert_eq!(task.attempts.len(), 2, "{:?}", task.attempts);
    assert_eq!(task.attempts[0].outcome, "lost");
    assert_eq!(task.attempts[1].fencing_token, retry.fencing_token);
    record_final_read(&mut client, &history).await?;
    witness.finish(&path, WITNESS_WAIT)?;
    let report = assert_history_valid(&path)?;
    assert_eq!(report.duplicated.len(), 1, "the task ran twice, explained by its lost attempt");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_node_fences_itself_or_has_its_late_result_refused() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, &[]).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("history.jsonl");
    let history = HistoryWriter::create(&path)?;
    let witness = ExitWitness::start(&dir.path().join("held"), history.clone())?;
    let mut client = cluster.client()?;
    let task_id = submit_recorded(
        &mut client,
        &history,
        0,
        vec![logged_task(&path, &witness, "paused", 4.0)],
    )
    .await?
    .remove(0);
    let (runner, old_token) = runner_as_follower(&cluster, &mut client, &task_id).await?;
    // RUNNING is committed just before the process starts: act only once the
    // process itself has said it runs.
    wait_for_exec_start(&path, old_token).await?;
    cluster.signal(runner, "STOP")?;
    let retry =
        wait_for_new_attempt(&mut client, &task_id, old_token, Duration::from_secs(20)).await?;
    assert_ne!(retry.node_id, runner);
    // Keep it stopped past its lease, then let it go.
    tokio::time::sleep(LEASE).await;
    cluster.signal(runner, "CONT")?;

    let finished = wait_until_all_finished(
        &mut client,
        std::slice::from_ref(&task_id),
        Duration::from_secs(60),
    )
    .await?;
    let task = &finished[0];
    assert_eq!(task.state, pb::TaskState::Succeeded as i32);
    // Exactly one attempt counts: the first is recorded lost, never as the
    // paused node's late result.
    assert_eq!(task.attempts.len(), 2, "{:?}", task.attempts);
    assert_eq!(task.attempts[0].outcome, "lost");
    assert_eq!(task.attempts[1].fencing_token, retry.fencing_token);
    assert_eq!(task.attempts[1].outcome, "exited 0");
    // And the paused node's process (killed by its warden, or done) was
    // gone before the retry began, as the witness saw it.
    record_final_read(&mut client, &history).await?;
    witness.finish(&path, WITNESS_WAIT)?;
    let report = assert_history_valid(&path)?;
    assert_eq!(report.duplicated.len(), 1, "the task ran twice, explained by its lost attempt");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_with_a_run_at_time_does_not_start_before_it() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, &[]).await?;
    let dir = tempfile::tempdir()?;
    let marker = dir.path().join("started_at_ms");
    let mut client = cluster.client()?;
    let run_at_ms = now_ms() + 3_000;
    let script = format!("date +%s%3N > {}", marker.display());
    let spec = pb::TaskSpec {
        command: Some(pb::Command {
            program: "sh".into(),
            args: vec!["-c".into(), script],
            ..Default::default()
        }),
        schedule: Some(pb::task_spec::Schedule::RunAtUnixMs(run_at_ms)),
        ..Default::default()
    };
    let task = submit(&mut client, spec).await?.task.unwrap();
    assert_eq!(task.state, pb::TaskState::Pending as i32);
    let finished = wait_until_all_finished(
        &mut client,
        std::slice::from_ref(&task.id),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(finished[0].state, pb::TaskState::Succeeded as i32);
    let started_at_ms: u64 = std::fs::read_to_string(&marker)?.trim().parse()?;
    assert!(started_at_ms >= run_at_ms, "started at {started_at_ms}, before its time {run_at_ms}");
    assert!(finished[0].attempts[0].started_at_unix_ms >= run_at_ms);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_node_gets_no_tasks_and_cancelling_kills_the_process() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, &[]).await?;
    let (code, _, stderr) = cluster.cli(&["cluster", "drain", "2"])?;
    assert_eq!(code, 0, "{stderr}");
    let mut client = cluster.client()?;
    let specs = (0..12).map(|_| cluster_tests::spec("sleep", &["0.2"], None)).collect();
    let ids = submit_batch(&mut client, specs).await?;
    let tasks = wait_until_all_finished(&mut client, &ids, Duration::from_secs(60)).await?;
    for task in &tasks {
        assert_eq!(task.state, pb::TaskState::Succeeded as i32);
        assert_ne!(task.attempts[0].node_id, 2, "task {} ran on the drained node", task.id);
    }
    let (code, _, stderr) = cluster.cli(&["cluster", "undrain", "2"])?;
    assert_eq!(code, 0, "{stderr}");

    // Cancel a running task: its process is killed and it ends CANCELLED.
    let dir = tempfile::tempdir()?;
    let pid_file = dir.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 60", pid_file.display());
    let spec = pb::TaskSpec {
        command: Some(pb::Command {
            program: "sh".into(),
            args: vec!["-c".into(), script],
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = submit(&mut client, spec).await?.task.unwrap().id;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pid_file.exists() || std::fs::read_to_string(&pid_file)?.trim().is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "task {id} never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = std::fs::read_to_string(&pid_file)?.trim().to_owned();
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "the task's process runs");
    let (code, _, stderr) = cluster.cli(&["cancel", &id])?;
    assert_eq!(code, 0, "{stderr}");
    let finished =
        wait_until_all_finished(&mut client, std::slice::from_ref(&id), Duration::from_secs(20))
            .await?;
    assert_eq!(finished[0].state, pb::TaskState::Cancelled as i32);
    let deadline = Instant::now() + Duration::from_secs(10);
    while finished_attempt_outcome(&mut client, &id).await? != "cancelled" {
        anyhow::ensure!(Instant::now() < deadline, "the cancelled attempt never reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A killed process may linger a moment as a zombie before it is reaped.
    let gone = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |stat| stat.contains(") Z "))
    };
    assert!(gone(&pid), "the cancelled task's process {pid} still runs");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_executor_runs_one_attempt_per_slot_and_queues_its_prefetch() -> anyhow::Result<()> {
    // A fixed prefetch (window 0), whatever the tasks' run times.
    let cluster = TestCluster::start(
        3,
        &["--slots", "1", "--prefetch-per-slot", "1", "--prefetch-window-ms", "0"],
    )
    .await?;
    let mut client = cluster.client()?;
    let specs = (0..6).map(|_| cluster_tests::spec("sleep", &["1"], None)).collect();
    let ids = submit_batch(&mut client, specs).await?;
    let tasks = wait_until_all_finished(&mut client, &ids, Duration::from_secs(60)).await?;
    let mut per_node: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    let mut last_assigned_ms = 0;
    let mut first_ended_ms = u64::MAX;
    for task in &tasks {
        assert_eq!(task.state, pb::TaskState::Succeeded as i32, "task {}", task.id);
        let attempt = &task.attempts[0];
        last_assigned_ms = last_assigned_ms.max(attempt.assigned_at_unix_ms);
        first_ended_ms = first_ended_ms.min(attempt.ended_at_unix_ms);
        per_node
            .entry(attempt.node_id)
            .or_default()
            .push((attempt.started_at_unix_ms, attempt.ended_at_unix_ms));
    }
    // Three slots in all, yet all six were assigned while the first ran.
    assert!(
        last_assigned_ms < first_ended_ms,
        "the last assignment ({last_assigned_ms}) came after the first end ({first_ended_ms})"
    );
    // One slot a node: its second attempt started once its first ended.
    for (node, mut runs) in per_node {
        runs.sort();
        for pair in runs.windows(2) {
            let ((_, first_end), (second_start, _)) = (pair[0], pair[1]);
            assert!(
                second_start + 100 >= first_end,
                "node {node} ran two attempts at once with one slot: {runs:?}"
            );
        }
    }
    Ok(())
}

/// Prefetch follows run times: executors that have seen their tasks run
/// longer than the prefetch window queue none, so a long task never waits
/// behind another on a busy node while a slot elsewhere frees up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn executors_that_run_long_tasks_queue_none_beyond_their_slots() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, &["--slots", "1", "--prefetch-per-slot", "4"]).await?;
    let mut client = cluster.client()?;
    // Every executor has heartbeated by then (300 ms apart).
    tokio::time::sleep(Duration::from_secs(1)).await;
    // One 300 ms task on each node: each executor's run times say "long".
    let warm_up = (0..3).map(|_| cluster_tests::spec("sleep", &["0.3"], None)).collect();
    let warm_up_ids = submit_batch(&mut client, warm_up).await?;
    let warmed =
        wait_until_all_finished(&mut client, &warm_up_ids, Duration::from_secs(30)).await?;
    let nodes: std::collections::BTreeSet<u64> =
        warmed.iter().map(|task| task.attempts[0].node_id).collect();
    assert_eq!(nodes.len(), 3, "one warm-up task on each node");
    // The next heartbeat (300 ms) tells the leader.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let specs = (0..6).map(|_| cluster_tests::spec("sleep", &["1"], None)).collect();
    let ids = submit_batch(&mut client, specs).await?;
    let tasks = wait_until_all_finished(&mut client, &ids, Duration::from_secs(60)).await?;
    let mut assigned: Vec<u64> =
        tasks.iter().map(|task| task.attempts[0].assigned_at_unix_ms).collect();
    assigned.sort();
    let first_ended_ms = tasks.iter().map(|task| task.attempts[0].ended_at_unix_ms).min().unwrap();
    // Three slots in all: the other three were assigned only as slots freed.
    assert!(
        assigned[3] >= first_ended_ms,
        "a fourth long task was assigned ({}) before any slot freed ({first_ended_ms}): {assigned:?}",
        assigned[3]
    );
    Ok(())
}

async fn finished_attempt_outcome(client: &mut Client, id: &str) -> anyhow::Result<String> {
    let task = get(client, id, false).await?;
    Ok(task.attempts.last().map(|attempt| attempt.outcome.clone()).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_tasks_are_purged_after_their_retention() -> anyhow::Result<()> {
    let cluster =
        TestCluster::start(3, &["--retention-ms", "1000", "--purge-interval-ms", "300"]).await?;
    let mut client = cluster.client()?;
    let keyed =
        pb::TaskSpec { idempotency_key: "once".into(), ..cluster_tests::spec("true", &[], None) };
    let id = submit(&mut client, keyed.clone()).await?.task.unwrap().id;
    let pending =
        submit(&mut client, cluster_tests::unplaceable(cluster_tests::spec("true", &[], None)))
            .await?;
    wait_until_all_finished(&mut client, std::slice::from_ref(&id), Duration::from_secs(20))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match get(&mut client, &id, false).await {
            Err(status) if status.code() == tonic::Code::NotFound => break,
            Ok(_) => anyhow::ensure!(Instant::now() < deadline, "task {id} was never purged"),
            Err(status) => return Err(status.into()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Unfinished tasks stay, and the purged task's key is free again.
    let pending_id = pending.task.unwrap().id;
    assert_eq!(get(&mut client, &pending_id, false).await?.id, pending_id);
    let again = submit(&mut client, keyed).await?;
    assert!(!again.already_existed);
    assert_ne!(again.task.unwrap().id, id);
    Ok(())
}

/// Whether process `pid` is gone (a zombie counts as gone: it no longer runs).
fn process_is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => status.lines().any(|line| line.starts_with("State:") && line.contains('Z')),
        Err(_) => true,
    }
}

/// What starting a task must keep (`src/executor/launch.rs`): a task runs
/// in its working directory (a relative program is found from there), a
/// program that does not exist fails with a clear reason rather than an exit
/// code, and the process dies with its node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_runs_in_its_directory_a_missing_program_fails_and_the_process_dies_with_its_node()
-> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let mut client = cluster.client()?;
    let dir = tempfile::tempdir()?;
    let mut task_spec = cluster_tests::spec(
        "sh",
        &["-c", "pwd > where; echo $$ > pid.tmp; mv pid.tmp pid; exec sleep 60"],
        None,
    );
    task_spec.max_attempts = 1;
    if let Some(command) = task_spec.command.as_mut() {
        command.working_dir = dir.path().display().to_string();
    }
    let task_id = submit(&mut client, task_spec).await?.task.unwrap().id;
    let pid_path = dir.path().join("pid");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pid_path.exists() {
        assert!(Instant::now() < deadline, "the task never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid: u32 = std::fs::read_to_string(&pid_path)?.trim().parse()?;
    let ran_in = std::fs::read_to_string(dir.path().join("where"))?;
    assert_eq!(Path::new(ran_in.trim()).canonicalize()?, dir.path().canonicalize()?);
    let runner = get(&mut client, &task_id, false).await?.attempts[0].node_id;
    assert!(!process_is_gone(pid), "the task's process runs");
    cluster.kill(runner)?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while !process_is_gone(pid) {
        assert!(Instant::now() < deadline, "the task's process outlived its node by 2 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut client = cluster.client()?;
    // A relative program is found from the task's working directory.
    let script = dir.path().join("run.sh");
    std::fs::write(&script, "#!/bin/sh\necho ran > ran\n")?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut relative = cluster_tests::spec("./run.sh", &[], None);
    relative.max_attempts = 1;
    if let Some(command) = relative.command.as_mut() {
        command.working_dir = dir.path().display().to_string();
    }
    let relative_id = submit(&mut client, relative).await?.task.unwrap().id;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let task = get(&mut client, &relative_id, false).await?;
        if task.state == pb::TaskState::Succeeded as i32 {
            break;
        }
        assert!(task.state != pb::TaskState::Failed as i32, "./run.sh failed: {task:?}");
        assert!(Instant::now() < deadline, "./run.sh never finished: {task:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read_to_string(dir.path().join("ran"))?, "ran\n");

    let mut missing = cluster_tests::spec("no-such-program-taskraft", &[], None);
    missing.max_attempts = 1;
    let missing_id = submit(&mut client, missing).await?.task.unwrap().id;
    let deadline = Instant::now() + Duration::from_secs(20);
    let task = loop {
        let task = get(&mut client, &missing_id, false).await?;
        if task.state == pb::TaskState::Failed as i32 {
            break task;
        }
        assert!(Instant::now() < deadline, "the task never failed: {task:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let outcome = &task.attempts[0].outcome;
    assert!(
        outcome.contains("did not start") && outcome.contains("not found on PATH"),
        "{outcome}"
    );
    Ok(())
}

/// With `execution.finished_tasks_max` set low, the leader purges the
/// oldest finished tasks beyond it long before their retention ends, and
/// keeps the newest: the state stays bounded however fast tasks finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_tasks_beyond_their_count_are_purged_oldest_first() -> anyhow::Result<()> {
    let (_config_dir, config_arg) = cluster_tests::config_file(
        "[execution]\nfinished_tasks_max = 3\npurge_interval_ms = 200\n",
    )?;
    let cluster = TestCluster::start(3, &["--config", &config_arg]).await?;
    let mut client = cluster.client()?;
    let mut ids = Vec::new();
    for _ in 0..8 {
        let task =
            cluster_tests::submit(&mut client, cluster_tests::spec("true", &[], None)).await?;
        ids.push(task.task.expect("a submitted task").id);
    }
    cluster_tests::workload::wait_until_all_finished(
        &mut client,
        &ids[7..],
        Duration::from_secs(30),
    )
    .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let kept = loop {
        let kept: Vec<String> = cluster_tests::list_all(&mut client, false)
            .await?
            .into_iter()
            .map(|task| task.id)
            .collect();
        if kept.len() <= 3 || std::time::Instant::now() > deadline {
            break kept;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(kept, ids[5..], "the three newest finished tasks are kept");
    let purged = cluster_tests::get(&mut client, &ids[0], false).await.expect_err("purged");
    assert_eq!(purged.code(), tonic::Code::NotFound);
    Ok(())
}
