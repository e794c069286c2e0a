//! The read side of the API on a live cluster: watch with resume, list with
//! filters and pages, `taskraft wait`, gRPC health and server reflection.

use std::collections::BTreeMap;
use std::time::Duration;

use cluster_tests::{TestCluster, spec, submit};
use futures::StreamExt;
use taskraft::client::WatchCursor;
use taskraft::proto::taskraft_v1 as pb;
use taskraft::proto::taskraft_v1::tasks_client::TasksClient;
use tonic::transport::Channel;

async fn watch(
    channel: Channel,
    task_id: &str,
    after_revision: u64,
    n_events: usize,
) -> anyhow::Result<Vec<pb::TaskEvent>> {
    let request = pb::WatchTasksRequest { task_id: task_id.into(), after_revision };
    let mut stream = TasksClient::new(channel).watch_tasks(request).await?.into_inner();
    let mut events = Vec::new();
    while events.len() < n_events {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next()).await?;
        events.push(event.ok_or_else(|| anyhow::anyhow!("the watch ended early"))??);
    }
    Ok(events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_list_wait_health_and_reflection() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, &[]).await?;

    // A live watch on node 2 sees submissions made through node 3.
    let live = tokio::spawn(watch(cluster.api_channel(2).await?, "", 0, 10));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut client = cluster.node_client(3, Duration::from_secs(10))?;
    let mut submitted = Vec::new();
    for idx in 0..10 {
        // Tasks nobody can run, so that each changes once: when submitted.
        let mut task_spec = cluster_tests::unplaceable(spec("echo", &[&idx.to_string()], None));
        task_spec.queue = if idx % 2 == 0 { "even".into() } else { "odd".into() };
        if idx >= 8 {
            task_spec.schedule = Some(pb::task_spec::Schedule::DelayMs(3_600_000));
        }
        submitted.push(submit(&mut client, task_spec).await?.task.unwrap());
    }
    let events = live.await??;
    let ids: Vec<&str> =
        events.iter().map(|event| event.task.as_ref().unwrap().id.as_str()).collect();
    assert_eq!(ids, submitted.iter().map(|task| task.id.as_str()).collect::<Vec<_>>());
    assert!(events.windows(2).all(|pair| pair[0].revision < pair[1].revision));

    // Resuming after the fifth event replays the other five.
    let resumed = watch(cluster.api_channel(1).await?, "", events[4].revision, 5).await?;
    assert_eq!(resumed, events[5..].to_vec());
    // A watch of one task sees only that task.
    let one =
        watch(cluster.api_channel(3).await?, &submitted[3].id, events[0].revision - 1, 1).await?;
    assert_eq!(one[0].task.as_ref().unwrap().id, submitted[3].id);

    // Lists filter by state and queue, and page.
    let mut pages = 0;
    let mut listed = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListTasksRequest {
            states: vec![pb::TaskState::Ready as i32],
            queue: "even".into(),
            page_size: 2,
            page_token: page_token.clone(),
            stale: false,
        };
        let page =
            TasksClient::new(cluster.api_channel(2).await?).list_tasks(request).await?.into_inner();
        pages += 1;
        for task in page.tasks {
            listed.insert(task.id.clone(), task);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let expected: Vec<&String> = submitted
        .iter()
        .filter(|task| {
            task.spec.as_ref().unwrap().queue == "even" && task.state == pb::TaskState::Ready as i32
        })
        .map(|task| &task.id)
        .collect();
    assert_eq!(listed.keys().collect::<Vec<_>>(), expected);
    assert_eq!(pages, 2, "four tasks in pages of two");

    // `taskraft wait` returns when the task ends: exit 3 unless it succeeded.
    let pending = submitted[8].id.clone();
    let (code, _, stderr) = cluster.cli(&["wait", &pending, "--for", "1s"])?;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("did not finish within 1s"), "{stderr}");
    let binary = cluster_tests::binary()?;
    let endpoints = cluster.endpoints().join(",");
    let waited_id = pending.clone();
    let waiter = tokio::task::spawn_blocking(move || {
        std::process::Command::new(binary)
            .args([
                "--endpoints",
                &endpoints,
                "--output",
                "json",
                "wait",
                &waited_id,
                "--for",
                "30s",
            ])
            .output()
    });
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let (code, _, stderr) = cluster.cli(&["cancel", &pending])?;
    assert_eq!(code, 0, "{stderr}");
    let output = waiter.await??;
    assert_eq!(output.status.code(), Some(3), "{}", String::from_utf8_lossy(&output.stderr));
    let waited: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(waited["state"], "CANCELLED");

    // Standard gRPC health and reflection, for generic clients such as grpcurl.
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(cluster.api_channel(1).await?);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest { service: "taskraft.v1.Tasks".into() })
        .await?
        .into_inner();
    assert_eq!(
        reply.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(cluster.api_channel(1).await?)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    let reply = replies.next().await.ok_or_else(|| anyhow::anyhow!("no reflection reply"))??;
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        anyhow::bail!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|service| service.name).collect();
    for expected in ["taskraft.v1.Tasks", "taskraft.v1.Cluster", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|name| name == expected), "{expected} missing from {names:?}");
    }
    assert!(
        !names.iter().any(|name| name.contains("peer")),
        "the peer service is not served here: {names:?}"
    );
    Ok(())
}

/// A filtered list looks at no more than `list_scanned_tasks_max` tasks per
/// call: a filter that few tasks pass gets short pages, even an empty one,
/// each with a token to go on, and following the tokens lists every match
/// once. `taskraft list` fills the page the user asked for across such
/// calls, and `--all` lists every match.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_filtered_list_looks_at_a_bounded_number_of_tasks_per_call() -> anyhow::Result<()> {
    let (_config_dir, config_arg) = cluster_tests::config_file(
        "[server]\nlist_page_size_default = 2\nlist_page_size_max = 4\nlist_scanned_tasks_max = 4\n",
    )?;
    let cluster = TestCluster::start(3, &["--config", &config_arg]).await?;
    let mut client = cluster.node_client(1, Duration::from_secs(10))?;
    // Twelve tasks; three of them, in places 1, 9 and 10, in queue "rare".
    let mut ids = Vec::new();
    for idx in 0..12 {
        let mut task_spec = cluster_tests::unplaceable(spec("echo", &[&idx.to_string()], None));
        task_spec.queue = if [1, 9, 10].contains(&idx) { "rare".into() } else { "common".into() };
        ids.push(submit(&mut client, task_spec).await?.task.unwrap().id);
    }
    let rare = [ids[1].clone(), ids[9].clone(), ids[10].clone()];

    let list = |queue: &str, page_size: u32, page_token: String| pb::ListTasksRequest {
        queue: queue.into(),
        page_size,
        page_token,
        ..Default::default()
    };
    let mut pages: Vec<Vec<String>> = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = TasksClient::new(cluster.api_channel(2).await?)
            .list_tasks(list("rare", 4, page_token.clone()))
            .await?
            .into_inner();
        pages.push(page.tasks.into_iter().map(|task| task.id).collect());
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    // Places 0-3 hold one match, 4-7 none (an empty page that is not the
    // end), 8-11 two, and nothing is after them.
    assert_eq!(pages, vec![vec![rare[0].clone()], vec![], rare[1..].to_vec()]);

    // Without a filter every page is full: the bound is at least the page size.
    let page = TasksClient::new(cluster.api_channel(3).await?)
        .list_tasks(list("", 4, String::new()))
        .await?
        .into_inner();
    assert_eq!(page.tasks.len(), 4);
    assert_eq!(page.next_page_token, ids[3]);
    // A page larger than the limit is cut to it, not refused.
    let page = TasksClient::new(cluster.api_channel(1).await?)
        .list_tasks(list("", 50, String::new()))
        .await?
        .into_inner();
    assert_eq!(page.tasks.len(), 4);
    assert_eq!(page.next_page_token, ids[3]);

    // The CLI asks on until the page of two is full, and says where to go on.
    let (code, stdout, stderr) =
        cluster.cli(&["--output", "json", "list", "--queue", "rare", "--page-size", "2"])?;
    assert_eq!(code, 0, "{stderr}");
    let listed: Vec<String> = stdout
        .lines()
        .map(|line| {
            let task: serde_json::Value = serde_json::from_str(line)?;
            task["id"].as_str().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("no id: {line}"))
        })
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(listed, rare[..2].to_vec(), "{stdout}");
    let (code, _, stderr) = cluster.cli(&["list", "--queue", "rare", "--page-size", "2"])?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains(&format!("more: --page-token {}", rare[1])), "{stderr}");
    let (code, stdout, stderr) = cluster.cli(&[
        "--output",
        "json",
        "list",
        "--queue",
        "rare",
        "--page-size",
        "4",
        "--all",
    ])?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    // The CLI's default page (100) is more than this cluster's limit of 4:
    // it is filled across calls.
    let (code, stdout, stderr) = cluster.cli(&["--output", "json", "list", "--queue", "common"])?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 9, "{stdout}");
    Ok(())
}

/// A watch that resumes from a revision older than the events a node keeps
/// catches up with the current version of every task changed since, in
/// revision order, up to `watch_catch_up_tasks_max` tasks; further behind,
/// it is refused with OUT_OF_RANGE and the revision to watch from after
/// listing. A watch of one task is never refused: it looks the task up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_too_far_behind_is_told_to_list_and_resume() -> anyhow::Result<()> {
    let (_config_dir, config_arg) = cluster_tests::config_file(
        "[server]\nwatch_history_events_max = 2\nwatch_catch_up_tasks_max = 4\nwatch_catch_up_scanned_tasks_max = 3\n",
    )?;
    let cluster = TestCluster::start(3, &["--config", &config_arg]).await?;
    let mut client = cluster.node_client(1, Duration::from_secs(10))?;
    let mut tasks = Vec::new();
    for idx in 0..8 {
        // Tasks nobody can run, so that each changes once: when submitted.
        let task_spec = cluster_tests::unplaceable(spec("echo", &[&idx.to_string()], None));
        tasks.push(submit(&mut client, task_spec).await?.task.unwrap());
    }
    // Node 2 has published the last submission: its history reaches it.
    let last = watch(cluster.api_channel(2).await?, "", tasks[7].revision - 1, 1).await?;
    assert_eq!(last[0].task.as_ref().unwrap().id, tasks[7].id);

    // Four tasks changed after the fourth submission: as many as allowed.
    let caught_up = watch(cluster.api_channel(2).await?, "", tasks[3].revision, 4).await?;
    let ids: Vec<&str> =
        caught_up.iter().map(|event| event.task.as_ref().unwrap().id.as_str()).collect();
    assert_eq!(ids, tasks[4..].iter().map(|task| task.id.as_str()).collect::<Vec<_>>());
    assert!(caught_up.windows(2).all(|pair| pair[0].revision < pair[1].revision));

    // Five: refused, with where to resume.
    let request =
        pb::WatchTasksRequest { task_id: String::new(), after_revision: tasks[2].revision };
    let status = TasksClient::new(cluster.api_channel(2).await?)
        .watch_tasks(request)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a watch five tasks behind was accepted"))?;
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    let resume_revision: u64 = status
        .message()
        .rsplit_once("after_revision=")
        .and_then(|(_, revision)| revision.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no revision to resume from: {}", status.message()))?;
    assert!(resume_revision >= tasks[7].revision, "{}", status.message());
    assert!(status.message().contains("list the tasks"), "{}", status.message());

    // Resuming from there streams what comes next.
    let next = tokio::spawn(watch(cluster.api_channel(2).await?, "", resume_revision, 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let task_spec = cluster_tests::unplaceable(spec("echo", &["next"], None));
    let submitted = submit(&mut client, task_spec).await?.task.unwrap();
    assert_eq!(next.await??[0].task.as_ref().unwrap().id, submitted.id);

    // One task, however old the revision: looked up, not refused.
    let one = watch(cluster.api_channel(3).await?, &tasks[0].id, tasks[0].revision - 1, 1).await?;
    assert_eq!(one[0].task.as_ref().unwrap().id, tasks[0].id);

    // The CLI says why and exits 1.
    let after = tasks[2].revision.to_string();
    let (code, _, stderr) = cluster.cli(&["watch", "--after-revision", &after])?;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("out of range") && stderr.contains("list the tasks"), "{stderr}");
    Ok(())
}

/// The tasks of one batch share a revision. A watcher that falls behind in
/// the middle of them is told to resume after the revision before, never
/// after the batch's own, so resuming as told loses none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_behind_within_a_batch_resumes_before_it() -> anyhow::Result<()> {
    let (_config_dir, config_arg) =
        cluster_tests::config_file("[server]\nwatch_channel_events_max = 2\n")?;
    let cluster = TestCluster::start(3, &["--config", &config_arg]).await?;
    let mut client = cluster.node_client(1, Duration::from_secs(10))?;
    submit(&mut client, cluster_tests::unplaceable(spec("echo", &["first"], None))).await?;
    let request = pb::WatchTasksRequest { task_id: String::new(), after_revision: 0 };
    let mut stream =
        TasksClient::new(cluster.api_channel(2).await?).watch_tasks(request).await?.into_inner();
    // A batch far larger than the watch can buffer while nobody reads it.
    let specs: Vec<pb::TaskSpec> = (0..1_000)
        .map(|idx| cluster_tests::unplaceable(spec("echo", &[&idx.to_string()], None)))
        .collect();
    let reply = TasksClient::new(cluster.api_channel(1).await?)
        .submit_tasks(pb::SubmitTasksRequest { specs })
        .await?
        .into_inner();
    let batch: Vec<pb::Task> =
        reply.results.into_iter().map(|result| result.task.unwrap()).collect();
    let batch_revision = batch[0].revision;
    assert!(batch.iter().all(|task| task.revision == batch_revision));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut n_received = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await? {
            Some(Ok(event)) => {
                assert_eq!(event.revision, batch_revision);
                n_received += 1;
            }
            Some(Err(status)) => break status,
            None => anyhow::bail!("the watch ended without falling behind"),
        }
    };
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(n_received < batch.len(), "{n_received} events and then {status:?}");
    let resume_revision: u64 = status
        .message()
        .rsplit_once("after_revision=")
        .and_then(|(_, revision)| revision.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no revision to resume from: {}", status.message()))?;
    assert!(resume_revision < batch_revision, "{}", status.message());
    let resumed = watch(cluster.api_channel(2).await?, "", resume_revision, batch.len()).await?;
    let resumed_ids: Vec<&str> =
        resumed.iter().map(|event| event.task.as_ref().unwrap().id.as_str()).collect();
    assert_eq!(resumed_ids, batch.iter().map(|task| task.id.as_str()).collect::<Vec<_>>());
    Ok(())
}

/// A watch of new changes only that breaks before its first event resumes
/// after the revision at which the node subscribed it, named in the
/// response's metadata, so the changes made while it was broken still come.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_watch_broken_before_its_first_event_resumes_without_a_gap() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, &[]).await?;
    let mut client = cluster.node_client(1, Duration::from_secs(10))?;
    let before =
        submit(&mut client, cluster_tests::unplaceable(spec("echo", &["before"], None))).await?;
    let before = before.task.unwrap();
    cluster.wait_for_applied(2, before.revision, Duration::from_secs(10)).await?;

    let request = pb::WatchTasksRequest { task_id: String::new(), after_revision: 0 };
    let response = TasksClient::new(cluster.api_channel(2).await?).watch_tasks(request).await?;
    let mut cursor = WatchCursor::after(0);
    cursor.started(response.metadata());
    assert!(
        cursor.resume_after() >= before.revision,
        "subscribed after {} though task {} changed at {}",
        cursor.resume_after(),
        before.id,
        before.revision
    );
    // The stream breaks with no event received; a task comes meanwhile.
    drop(response);
    let during =
        submit(&mut client, cluster_tests::unplaceable(spec("echo", &["during"], None))).await?;
    let during = during.task.unwrap();

    let resumed = watch(cluster.api_channel(3).await?, "", cursor.resume_after(), 1).await?;
    let task = resumed[0].task.as_ref().unwrap();
    assert_eq!((resumed[0].revision, task.id.as_str()), (during.revision, during.id.as_str()));
    assert!(cursor.admit(resumed[0].revision, &task.id));
    Ok(())
}

/// A watch sends only changes after the revision asked for, even from a
/// node that has not yet applied that far, as a node that a watcher resumes
/// on after seeing later changes elsewhere may not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_ahead_of_its_node_sends_only_later_changes() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, &[]).await?;
    let mut client = cluster.node_client(1, Duration::from_secs(10))?;
    let first =
        submit(&mut client, cluster_tests::unplaceable(spec("echo", &["first"], None))).await?;
    let after_revision = first.task.unwrap().revision + 3;
    let request = pb::WatchTasksRequest { task_id: String::new(), after_revision };
    let mut stream =
        TasksClient::new(cluster.api_channel(2).await?).watch_tasks(request).await?.into_inner();
    // Each submission commits at a revision of its own.
    let mut later = None;
    while later.is_none() {
        let task_spec = cluster_tests::unplaceable(spec("echo", &["next"], None));
        let task = submit(&mut client, task_spec).await?.task.unwrap();
        if task.revision > after_revision {
            later = Some(task);
        }
    }
    let later = later.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the watch ended early"))??;
    let task = event.task.unwrap();
    assert_eq!(
        (event.revision, task.id.as_str()),
        (later.revision, later.id.as_str()),
        "the first event of a watch after revision {after_revision}"
    );
    Ok(())
}

/// `Cluster/Snapshot` builds a snapshot on the node asked, covering all it
/// had applied, and answers once the file is on disk; the CLI does the same
/// through `taskraft cluster snapshot`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_snapshot_covers_everything_applied() -> anyhow::Result<()> {
    use taskraft::proto::taskraft_v1::cluster_client::ClusterClient;
    let cluster = TestCluster::start(3, &[]).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(5)).await?;
    let mut client = cluster.node_client(leader, Duration::from_secs(10))?;
    for idx in 0..20 {
        submit(&mut client, cluster_tests::unplaceable(spec("echo", &[&idx.to_string()], None)))
            .await?;
    }
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let commit_index = cluster.local_status(leader).await?.commit_index;
    cluster.wait_for_applied(follower, commit_index, Duration::from_secs(10)).await?;
    let before = cluster.local_status(follower).await?;
    assert!(before.snapshot_index < before.applied_index, "no snapshot yet: {before:?}");

    let reply = ClusterClient::new(cluster.api_channel(follower).await?)
        .snapshot(pb::SnapshotRequest {})
        .await?
        .into_inner();
    assert_eq!(reply.node_id, follower, "the node asked builds it, not the leader");
    assert!(reply.index >= before.applied_index, "{reply:?} covers {before:?}");
    assert!(reply.bytes > 0, "{reply:?}");
    let after = cluster.local_status(follower).await?;
    assert_eq!(after.snapshot_index, reply.index, "the node reports the snapshot it built");

    let (code, stdout, stderr) = cluster.cli(&["--output", "json", "cluster", "snapshot"])?;
    assert_eq!(code, 0, "{stderr}");
    let printed: serde_json::Value = serde_json::from_str(stdout.trim())?;
    assert!(printed["bytes"].as_u64().is_some_and(|bytes| bytes > 0), "{printed}");
    assert!(printed["index"].as_u64().is_some_and(|index| index >= commit_index), "{printed}");
    Ok(())
}
