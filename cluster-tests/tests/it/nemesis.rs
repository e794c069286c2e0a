//! The fault suite on real processes in network namespaces: each scenario
//! runs a workload, cuts the network in one named way, heals, waits for
//! every task, reads the final state linearizably, and has the checker judge
//! the whole history. Needs root and iptables (`Netns::create` says so).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cluster_tests::history::{self, Event, HistoryWriter, now_ns};
use cluster_tests::netns::Netns;
use cluster_tests::{TestCluster, get};
use taskraft::client::Client;
use taskraft::proto::taskraft_v1 as pb;

use crate::execution::{
    assert_history_valid, logged_task, record_final_read, submit_recorded, wait_until_all_finished,
};

/// How long a fault lasts: past an election and a whole lease plus grace.
const FAULT: Duration = Duration::from_secs(8);
/// A task that outlives a lease (3 s) plus its grace (1 s).
const LONG_TASK_S: f64 = 6.0;

/// Waits until task `id` runs on `node`.
async fn wait_until_running_on(client: &mut Client, id: &str, node: u64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let task = get(client, id, false).await?;
        let on = task.attempts.last().map(|attempt| attempt.node_id);
        if task.state == pb::TaskState::Running as i32 && on == Some(node) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "task {id} never ran on node {node}: {task:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs one scenario: `fault` cuts the network given the leader; it is healed after `FAULT`.
async fn scenario(
    name: &str,
    fault: impl FnOnce(&Netns, u64) -> anyhow::Result<(Vec<u64>, bool)>,
) -> anyhow::Result<()> {
    let cluster = TestCluster::start_in_netns(3, &[]).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("history.jsonl");
    let history = HistoryWriter::create(&path)?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for process in 0..3u64 {
        let mut client = cluster.client()?;
        let (history, stop, path) = (history.clone(), stop.clone(), path.clone());
        workers.push(tokio::spawn(async move {
            let mut n_submitted = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("{process}-{n_submitted}");
                n_submitted += 1;
                // Mostly short tasks, and some longer than a lease plus its
                // grace, so that a fault catches attempts mid-run. Failures
                // are recorded as info or fail; only acks count.
                let sleep_s = if n_submitted % 8 == 1 { LONG_TASK_S } else { 0.3 };
                let task = logged_task(&path, &key, sleep_s);
                let _ = submit_recorded(&mut client, &history, process, vec![task]).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A top-priority task that outlives the fault's lease, running on the
    // leader: the followers are drained while it is placed. The fault then
    // surely cuts off an attempt mid-run, and the majority can re-run it.
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let followers: Vec<u64> = (1..=3).filter(|node| *node != leader).collect();
    for follower in &followers {
        let (code, _, stderr) = cluster.cli(&["cluster", "drain", &follower.to_string()])?;
        anyhow::ensure!(code == 0, "drain failed: {stderr}");
    }
    let mut client = cluster.client()?;
    let long = pb::TaskSpec { priority: 100, ..logged_task(&path, "long-on-leader", 20.0) };
    let long_ids = submit_recorded(&mut client, &history, 9, vec![long]).await?;
    wait_until_running_on(&mut client, &long_ids[0], leader).await?;
    for follower in &followers {
        let (code, _, stderr) = cluster.cli(&["cluster", "undrain", &follower.to_string()])?;
        anyhow::ensure!(code == 0, "undrain failed: {stderr}");
    }
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let netns = cluster.netns.as_ref().expect("started in namespaces");
    let (nodes, on_leader) = fault(netns, leader)?;
    history.record(&Event::Nemesis { f: name.into(), nodes, leader: on_leader, time_ns: now_ns() });
    tokio::time::sleep(FAULT).await;
    netns.heal()?;
    history.record(&Event::Heal { time_ns: now_ns() });
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await?;
    }

    cluster.wait_for_leader(Duration::from_secs(20)).await?;
    let acknowledged: Vec<String> = history::read(&path)?
        .into_iter()
        .filter_map(|event| match event {
            Event::Ok { task_id, .. } => task_id,
            _ => None,
        })
        .collect();
    anyhow::ensure!(
        acknowledged.len() > 20,
        "the workload made too little progress: {} acks",
        acknowledged.len()
    );
    let mut client = cluster.client()?;
    wait_until_all_finished(&mut client, &acknowledged, Duration::from_secs(90)).await?;
    record_final_read(&mut client, &history).await?;
    println!("scenario {name}:");
    // Keep the history for `check-history` when asked to.
    if let Ok(keep_dir) = std::env::var("TASKRAFT_KEEP_HISTORY") {
        std::fs::create_dir_all(&keep_dir)?;
        std::fs::copy(&path, std::path::Path::new(&keep_dir).join(format!("{name}.jsonl")))?;
    }
    assert_history_valid(&path)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_isolating_the_leader() -> anyhow::Result<()> {
    scenario("partition-leader", |netns, leader| {
        for other in (1..=3).filter(|node| *node != leader) {
            netns.cut(leader, other)?;
        }
        Ok((vec![leader], true))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_way_partition_the_leader_hears_nobody() -> anyhow::Result<()> {
    scenario("partition-one-way", |netns, leader| {
        for other in (1..=3).filter(|node| *node != leader) {
            netns.cut_one_way(other, leader)?;
        }
        Ok((vec![leader], true))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bridge_partition_n1_and_n3_cut_apart() -> anyhow::Result<()> {
    scenario("partition-bridge", |netns, leader| {
        netns.cut(1, 3)?;
        Ok((vec![1, 3], leader == 1 || leader == 3))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn packet_loss_on_every_node() -> anyhow::Result<()> {
    scenario("packet-loss-30", |netns, _| {
        for node in 1..=3 {
            netns.lose(node, 30)?;
        }
        Ok((vec![1, 2, 3], false))
    })
    .await
}
