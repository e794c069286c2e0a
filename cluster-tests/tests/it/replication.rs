//! Submissions through several nodes are committed once and readable from
//! every node, both linearizably and from each node's own state.

use std::collections::BTreeMap;
use std::time::Duration;

use cluster_tests::{TestCluster, get, spec, submit};

const N_TASKS: usize = 1_000;
const N_SUBMITTERS: usize = 48;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_submissions_are_readable_from_every_node() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, &[]).await?;
    let mut submitters = Vec::new();
    for submitter_idx in 0..N_SUBMITTERS {
        // Each submitter talks to one node first, so followers forward too.
        let node_id = (submitter_idx % 3) as u64 + 1;
        let mut client = cluster.node_client(node_id, Duration::from_secs(30))?;
        submitters.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for task_idx in (submitter_idx..N_TASKS).step_by(N_SUBMITTERS) {
                let arg = format!("task-{task_idx}");
                let reply =
                    submit(&mut client, spec("echo", &[&arg], Some(format!("key-{task_idx}"))))
                        .await?;
                let task = reply.task.expect("a task in the reply");
                assert!(!reply.already_existed);
                acked.push((task.id, arg));
            }
            Ok::<_, tonic::Status>(acked)
        }));
    }
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    for submitter in submitters {
        for (id, arg) in submitter.await?? {
            assert!(acked.insert(id.clone(), arg).is_none(), "task id {id} acknowledged twice");
        }
    }
    assert_eq!(acked.len(), N_TASKS);

    let leader = cluster.wait_for_leader(Duration::from_secs(5)).await?;
    let commit_index = cluster.local_status(leader).await?.commit_index;
    for node_id in 1..=3 {
        // Each node's own copy.
        cluster.wait_for_applied(node_id, commit_index, Duration::from_secs(10)).await?;
        let local = cluster.local_tasks(node_id).await?;
        assert_eq!(local.len(), N_TASKS, "node {node_id} holds every task");
        for (id, arg) in &acked {
            let task = &local[id];
            assert_eq!(
                task.spec.as_ref().unwrap().command.as_ref().unwrap().args,
                vec![arg.clone()],
                "task {id}"
            );
        }
        // Linearizable reads through this node.
        let mut client = cluster.node_client(node_id, Duration::from_secs(10))?;
        for (id, arg) in &acked {
            let task = get(&mut client, id, false).await?;
            assert_eq!(&task.spec.unwrap().command.unwrap().args[0], arg);
        }
    }
    Ok(())
}

/// Tasks of a batch, and batches in flight at once, in the test below: each
/// Raft entry carries about 150 KB, several go to a follower in one request.
const BATCH_TASKS: usize = 500;
const N_BATCH_SUBMITTERS: usize = 8;

/// Submits `n_batches` batches from each of `N_BATCH_SUBMITTERS` clients at
/// once, all through `node_id`, and returns how many tasks were acknowledged.
/// Every task has an idempotency key starting with `phase`, so a batch the
/// client retries after a timeout cannot add its tasks twice.
async fn submit_batches(
    cluster: &TestCluster,
    node_id: u64,
    phase: &'static str,
    n_batches: usize,
) -> anyhow::Result<usize> {
    let mut submitters = Vec::new();
    for submitter_idx in 0..N_BATCH_SUBMITTERS {
        let mut client = cluster.node_client(node_id, Duration::from_secs(20))?;
        submitters.push(tokio::spawn(async move {
            let mut n_acked = 0;
            for batch_idx in 0..n_batches {
                let payload = "x".repeat(256);
                let specs = (0..BATCH_TASKS)
                    .map(|task_idx| {
                        let key = format!("{phase}-{submitter_idx}-{batch_idx}-{task_idx}");
                        cluster_tests::unplaceable(spec("echo", &[&payload], Some(key)))
                    })
                    .collect();
                n_acked += cluster_tests::workload::submit_batch(&mut client, specs).await?.len();
            }
            Ok::<_, anyhow::Error>(n_acked)
        }));
    }
    let mut n_acked = 0;
    for submitter in submitters {
        n_acked += submitter.await??;
    }
    Ok(n_acked)
}

/// With one follower down, every write needs the other one, so each
/// AppendEntries to it must get through. openraft gives every AppendEntries
/// one heartbeat interval, though the follower must write and fsync the
/// entries before it answers; one carrying several batches of large tasks
/// can outlast it, and its retry, larger still, again: nothing committed
/// until the follower came back (found by the `restart_1m` benchmark, with
/// the default 50 ms heartbeat). A 5 ms heartbeat makes that certain here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_batches_commit_with_one_follower_down() -> anyhow::Result<()> {
    let timings = ["--heartbeat-interval-ms", "5", "--election-timeout-ms", "100"];
    let mut cluster = TestCluster::start(3, &timings).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(5)).await?;
    let n_before = submit_batches(&cluster, leader, "before", 4).await?;
    assert_eq!(n_before, 4 * N_BATCH_SUBMITTERS * BATCH_TASKS);

    let down = (1..=3).find(|id| *id != leader).unwrap();
    let up = (1..=3).find(|id| *id != leader && *id != down).unwrap();
    cluster.kill(down)?;
    let n_after = submit_batches(&cluster, leader, "after", 3).await?;
    assert_eq!(n_after, 3 * N_BATCH_SUBMITTERS * BATCH_TASKS, "every batch committed");

    let commit_index = cluster.local_status(leader).await?.commit_index;
    cluster.wait_for_applied(up, commit_index, Duration::from_secs(30)).await?;
    assert_eq!(cluster.local_tasks(up).await?.len(), n_before + n_after);
    Ok(())
}
