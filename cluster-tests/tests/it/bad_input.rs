//! Bad input through gRPC (the client API and the peer port) and through
//! the CLI gets a clear error and changes nothing; a full queue is
//! RESOURCE_EXHAUSTED.

use cluster_tests::{TestCluster, spec, submit, unplaceable};
use taskraft::proto::taskraft_v1 as pb;
use taskraft::proto::taskraft_v1::tasks_client::TasksClient;

const QUEUED_TASKS_MAX: usize = 5;

async fn grpc_errors(cluster: &TestCluster) -> anyhow::Result<()> {
    let mut client = cluster.client()?;
    let cases: Vec<(pb::TaskSpec, tonic::Code, &str)> = vec![
        (pb::TaskSpec::default(), tonic::Code::InvalidArgument, "no command"),
        (spec("", &[], None), tonic::Code::InvalidArgument, "no program"),
        (
            pb::TaskSpec { queue: "a b".into(), ..spec("true", &[], None) },
            tonic::Code::InvalidArgument,
            "queue name",
        ),
        (
            pb::TaskSpec { max_attempts: 1_000_000, ..spec("true", &[], None) },
            tonic::Code::InvalidArgument,
            "max attempts",
        ),
        (
            pb::TaskSpec {
                schedule: Some(pb::task_spec::Schedule::DelayMs(u64::MAX)),
                ..spec("true", &[], None)
            },
            tonic::Code::InvalidArgument,
            "delay",
        ),
        (spec("true", &["x"; 300], None), tonic::Code::InvalidArgument, "300 arguments"),
    ];
    for (bad, code, text) in cases {
        let err = submit(&mut client, bad).await.unwrap_err();
        assert_eq!(err.code(), code, "{text}: {err:?}");
        assert!(err.message().contains(text), "expected {text:?} in {:?}", err.message());
    }
    // A message above the node's 4 MiB limit.
    let huge = "x".repeat(5 * 1024 * 1024);
    let err = submit(&mut client, spec("echo", &[&huge], None)).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument
        ),
        "{err:?}"
    );
    // Unknown task ids and bad ids.
    for (id, code) in
        [("12345", tonic::Code::NotFound), ("not-a-number", tonic::Code::InvalidArgument)]
    {
        let err = cluster_tests::get(&mut client, id, false).await.unwrap_err();
        assert_eq!(err.code(), code, "{id}");
    }
    let err = client
        .call(|channel, timeout| {
            let message = pb::ListTasksRequest { states: vec![42], ..Default::default() };
            async move {
                TasksClient::new(channel)
                    .list_tasks(taskraft::client::request(message, timeout))
                    .await
            }
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    Ok(())
}

/// A message on a follower's append stream that is not an AppendEntries.
async fn peer_errors(cluster: &TestCluster) -> anyhow::Result<()> {
    use taskraft::proto::peer_v1::{RaftMessage, raft_peer_client::RaftPeerClient};
    let leader = cluster.wait_for_leader(std::time::Duration::from_secs(10)).await?;
    let follower = if leader == 1 { 2 } else { 1 };
    let channel = cluster.raft_channel(follower).await?;
    let garbage = RaftMessage { data: vec![0xff; 7] };
    let mut request = tonic::Request::new(futures::stream::iter([garbage]));
    request.set_timeout(std::time::Duration::from_secs(5));
    let mut answers = RaftPeerClient::new(channel).stream_append(request).await?.into_inner();
    let err = answers.message().await.expect_err("garbage was answered");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("append entries request"), "{}", err.message());
    Ok(())
}

fn cli(cluster: &TestCluster, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    cluster.cli(args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() -> anyhow::Result<()> {
    let cluster =
        TestCluster::start(3, &["--queued-tasks-max", &QUEUED_TASKS_MAX.to_string()]).await?;
    grpc_errors(&cluster).await?;
    peer_errors(&cluster).await?;

    let cli_cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["submit", "--env", "NOEQUALS", "--", "true"], 2, "not KEY=VALUE"),
        (vec!["submit", "--delay", "soon", "--", "true"], 2, "not a duration"),
        (vec!["submit", "--at", "yesterday-ish", "--", "true"], 2, "neither RFC 3339"),
        (vec!["submit", "--queue", "bad queue", "--", "true"], 2, "queue name"),
        (vec!["submit", "--", ""], 2, "no program"),
        (vec!["get", "999"], 4, "does not exist"),
        (vec!["get", "abc"], 2, "not a number"),
        (vec!["list", "--state", "SLEEPING"], 2, "not a task state"),
        (vec!["cancel", "999"], 4, "does not exist"),
        (vec!["cluster", "remove-node", "42"], 4, "not a member"),
        (vec!["cluster", "transfer-leader", "42"], 2, "not a voter"),
        // A node refuses a bad configuration before it starts anything. Its
        // address is one no interface here has, so a node that went on
        // anyway would fail to open its data or to listen (exit 1), not
        // run on.
        (
            vec![
                "node",
                "--id",
                "9",
                "--api-addr",
                "192.0.2.9:7001",
                "--raft-addr",
                "192.0.2.9:7101",
                "--data-dir",
                "/dev/null/taskraft-bad-input",
                "--worker-threads",
                "5000",
            ],
            2,
            "worker_threads must be at most",
        ),
    ];
    for (args, code, text) in cli_cases {
        let (exit_code, _, stderr) = cli(&cluster, &args)?;
        assert_eq!(exit_code, code, "{args:?}: {stderr}");
        assert!(stderr.contains(text), "{args:?}: expected {text:?} in {stderr:?}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // Nothing above created a task.
    assert!(cluster.local_tasks(1).await?.is_empty());

    // The queue limit: five fit, the sixth is refused, a cancel frees a place.
    // They are tasks nobody can run, so they stay queued.
    let mut client = cluster.client()?;
    for _ in 0..QUEUED_TASKS_MAX {
        submit(&mut client, unplaceable(spec("true", &[], None))).await?;
    }
    let err = submit(&mut client, unplaceable(spec("true", &[], None))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("queue is full"), "{}", err.message());
    let (exit_code, _, stderr) =
        cli(&cluster, &["submit", "--label", "pool=nowhere", "--", "true"])?;
    assert_eq!(exit_code, 1, "{stderr}");
    assert!(stderr.contains("resource exhausted"), "{stderr}");
    let (exit_code, stdout, _) = cli(&cluster, &["--output", "json", "cancel", "0"])?;
    assert_eq!(exit_code, 0);
    let cancelled: serde_json::Value = serde_json::from_str(stdout.trim())?;
    assert_eq!(
        (cancelled["id"].as_str(), cancelled["state"].as_str()),
        (Some("0"), Some("CANCELLED"))
    );
    submit(&mut client, unplaceable(spec("true", &[], None))).await?;
    let (exit_code, stdout, _) = cli(&cluster, &["--output", "json", "list"])?;
    assert_eq!(exit_code, 0);
    assert_eq!(stdout.lines().count(), QUEUED_TASKS_MAX + 1);
    Ok(())
}
