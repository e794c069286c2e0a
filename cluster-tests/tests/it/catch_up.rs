//! A node that was down while the leader snapshotted and purged its log
//! catches up through a snapshot; a node stopped with SIGTERM exits cleanly.

use std::time::Duration;

use cluster_tests::{TestCluster, spec, submit};
use taskraft::proto::taskraft_v1 as pb;
use taskraft::proto::taskraft_v1::tasks_client::TasksClient;

/// Rounds of one batch of 4 tasks plus one single task: 200 log entries,
/// twice the snapshot threshold the cluster runs with.
const N_ROUNDS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_catches_up_through_a_snapshot_when_the_log_was_purged()
-> anyhow::Result<()> {
    let mut cluster = TestCluster::start(
        3,
        &["--snapshot-after-entries", "100", "--snapshot-keep-entries", "10"],
    )
    .await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(5)).await?;
    let lagger = (1..=3).find(|id| *id != leader).unwrap();
    let lagger_last_log = cluster.local_status(lagger).await?.last_log_index;
    let exit = cluster.terminate(lagger, Duration::from_secs(10))?;
    assert!(exit.success(), "SIGTERM should end node {lagger} cleanly, got {exit}");

    let mut client = cluster.node_client(leader, Duration::from_secs(10))?;
    for round_idx in 0..N_ROUNDS {
        let specs = (0..4)
            .map(|idx| spec("echo", &[&format!("{round_idx}-{idx}")], None))
            .collect::<Vec<_>>();
        client
            .call(|channel, timeout| {
                let message = pb::SubmitTasksRequest { specs: specs.clone() };
                async move {
                    TasksClient::new(channel)
                        .submit_tasks(taskraft::client::request(message, timeout))
                        .await
                }
            })
            .await?;
        // Single submissions too, so the log grows past the snapshot threshold.
        submit(&mut client, spec("true", &[], None)).await?;
    }
    let n_tasks = N_ROUNDS * 5;

    // Wait for the leader to snapshot and purge past where the lagger stopped,
    // so that the log alone can no longer bring it up to date.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let leader_info = loop {
        let info = cluster.local_status(leader).await?;
        if info.purged_index > lagger_last_log + 1 && info.snapshot_index > 0 {
            break info;
        }
        assert!(std::time::Instant::now() < deadline, "leader never purged its log: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    cluster.restart(lagger)?;
    cluster.wait_for_applied(lagger, leader_info.commit_index, Duration::from_secs(30)).await?;
    let lagger_info = cluster.local_status(lagger).await?;
    assert!(lagger_info.snapshot_index > 0, "the lagging node holds a snapshot: {lagger_info:?}");
    assert!(
        cluster.log(lagger).contains("installed a snapshot"),
        "the lagging node installed a snapshot"
    );
    let local = cluster.local_tasks(lagger).await?;
    assert_eq!(local.len(), n_tasks, "the lagging node holds every task");
    Ok(())
}
