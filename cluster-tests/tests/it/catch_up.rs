//! A node that was down while the leader snapshotted and purged its log
//! catches up through a snapshot; a node stopped with SIGTERM exits cleanly;
//! a log that grows by bytes is snapshotted and purged by its bytes, and a killed
//! node restores from it.

use std::time::Duration;

use cluster_tests::workload::submit_batch;
use cluster_tests::{TestCluster, spec, submit, unplaceable};

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
        submit_batch(&mut client, specs).await?;
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

/// Batches whose bytes pass `--snapshot-after-log-bytes` (1 MiB) in a few
/// entries, far fewer than `--snapshot-after-entries`.
const N_BIG_BATCHES: usize = 4;
const TASKS_PER_BIG_BATCH: usize = 100;
const BIG_ARG_BYTES: usize = 4 * 1024;

/// A log that grows by bytes rather than entries is snapshotted on every
/// node, and purged behind the snapshot by its bytes (`--snapshot-keep-bytes-max`)
/// where the entries' count alone (1,000 kept) would purge nothing; a follower
/// killed with -9 comes back from its snapshot plus the log after it (the
/// state machine is memory only).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_log_past_its_byte_threshold_is_snapshotted_and_purged_and_a_killed_node_restores_from_it()
-> anyhow::Result<()> {
    let mut cluster = TestCluster::start(
        3,
        &[
            "--snapshot-after-entries",
            "1000000",
            "--snapshot-after-log-bytes",
            "1048576",
            "--snapshot-keep-entries",
            "1000",
            "--snapshot-keep-bytes-max",
            "0",
        ],
    )
    .await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(5)).await?;
    let mut client = cluster.node_client(leader, Duration::from_secs(10))?;
    let big_arg = "x".repeat(BIG_ARG_BYTES);
    for batch_idx in 0..N_BIG_BATCHES {
        let specs = (0..TASKS_PER_BIG_BATCH)
            .map(|idx| unplaceable(spec("echo", &[&format!("{batch_idx}-{idx}"), &big_arg], None)))
            .collect::<Vec<_>>();
        submit_batch(&mut client, specs).await?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for id in 1..=3 {
        loop {
            let info = cluster.local_status(id).await?;
            if info.snapshot_index > 0 && info.purged_index > 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {id} built no snapshot, or purged no entry behind it: {info:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // One more entry after the snapshots, which a restart must re-apply.
    submit(&mut client, unplaceable(spec("true", &[], Some("after".into())))).await?;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.kill(follower)?;
    cluster.restart(follower)?;
    let commit_index = cluster.local_status(leader).await?.commit_index;
    cluster.wait_for_applied(follower, commit_index, Duration::from_secs(30)).await?;
    let local = cluster.local_tasks(follower).await?;
    assert_eq!(local.len(), N_BIG_BATCHES * TASKS_PER_BIG_BATCH + 1);
    assert!(local.values().any(|task| task.spec.as_ref().unwrap().idempotency_key == "after"));
    Ok(())
}
