//! Membership through the CLI: add a node (learner, then voter), hand it
//! leadership, remove a follower and then the leader; the cluster keeps
//! serving and the new node holds every task.

use std::time::Duration;

use cluster_tests::{TestCluster, spec, submit};

fn voters(status_json: &str) -> anyhow::Result<Vec<u64>> {
    let status: serde_json::Value = serde_json::from_str(status_json.trim())?;
    let mut voters: Vec<u64> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|node| node["voter"] == true)
        .map(|node| node["node_id"].as_u64().unwrap())
        .collect();
    voters.sort();
    Ok(voters)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_join_take_over_and_leave() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let mut client = cluster.client()?;
    let before = submit(&mut client, spec("echo", &["before"], None)).await?.task.unwrap();

    let new_id = cluster.spawn_joining_node()?;
    let new_node = cluster.node(new_id);
    let (code, stdout, stderr) = cluster.cli(&[
        "--output",
        "json",
        "cluster",
        "add-node",
        &new_id.to_string(),
        "--api-addr",
        &new_node.api_addr,
        "--raft-addr",
        &new_node.raft_addr,
    ])?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(voters(&stdout)?, vec![1, 2, 3, 4]);

    let mut client = cluster.client()?;
    let after = submit(&mut client, spec("echo", &["after"], None)).await?.task.unwrap();
    let commit_index = cluster
        .local_status(cluster.wait_for_leader(Duration::from_secs(5)).await?)
        .await?
        .commit_index;
    cluster.wait_for_applied(new_id, commit_index, Duration::from_secs(10)).await?;
    let local = cluster.local_tasks(new_id).await?;
    assert!(
        local.contains_key(&before.id) && local.contains_key(&after.id),
        "node {new_id} holds both tasks"
    );

    let (code, stdout, stderr) =
        cluster.cli(&["--output", "json", "cluster", "transfer-leader", &new_id.to_string()])?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&format!("\"leader_id\":{new_id}")), "{stdout}");
    assert_eq!(cluster.wait_for_leader(Duration::from_secs(5)).await?, new_id);

    // Remove a follower, then the leader itself.
    let (code, stdout, stderr) =
        cluster.cli(&["--output", "json", "cluster", "remove-node", "1"])?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(voters(&stdout)?, vec![2, 3, 4]);
    cluster.kill(1)?;
    let (code, stdout, stderr) =
        cluster.cli(&["--output", "json", "cluster", "remove-node", &new_id.to_string()])?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(voters(&stdout)?, vec![2, 3]);
    cluster.kill(new_id)?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    assert!([2, 3].contains(&leader), "leader {leader}");
    let mut client = cluster.client()?;
    submit(&mut client, spec("echo", &["two voters"], None)).await?;
    Ok(())
}
