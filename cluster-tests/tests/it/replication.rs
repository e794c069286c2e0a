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
