//! A power cut of the whole cluster: every node killed at once while
//! submissions flow, and its disk then losing whatever was not fsynced
//! ([`PowerCutDisk`]). After a restart, every task whose submission was
//! acknowledged is there. A SIGKILL alone cannot show a missing fsync,
//! since the kernel keeps the page cache; this test can.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use cluster_tests::power_cut::{Lost, PowerCutDisk};
use cluster_tests::{TestCluster, list_all, spec, submit};
use tokio::sync::Mutex;

const N_SUBMITTERS: usize = 8;
const N_CUTS: usize = 3;
/// Acknowledged submissions in each round before the power is cut.
const ACKED_PER_ROUND: usize = 300;
/// How long a cluster may take to elect a leader after a cut. Generous: a
/// node recovers sled's log and its snapshot first.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_tasks_survive_power_cuts_of_every_node() -> anyhow::Result<()> {
    let mount_dir = tempfile::Builder::new().prefix("taskraft-power-cut-").tempdir()?;
    let mut disk = PowerCutDisk::mount(mount_dir.path())?;
    // Snapshots (files renamed into place) and log purges every 200 entries,
    // so that the cuts meet them.
    let (_config_dir, config) =
        cluster_tests::config_file("[raft]\nsnapshot_after_entries = 200\n")?;
    let mut cluster =
        TestCluster::start_with_data_in(3, &["--config", &config], disk.path()).await?;

    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let mut lost = Lost::default();
    for cut in 0..N_CUTS {
        let n_acked_before = acked.lock().await.len();
        let mut submitters = Vec::new();
        for submitter_idx in 0..N_SUBMITTERS {
            let mut client = cluster.client()?;
            let acked = acked.clone();
            submitters.push(tokio::spawn(async move {
                for n_submitted in 0.. {
                    let key = format!("c{cut}-s{submitter_idx}-{n_submitted}");
                    // A failed call may or may not have committed; only acks count.
                    if let Ok(reply) =
                        submit(&mut client, spec("true", &[&key], Some(key.clone()))).await
                    {
                        let id = reply.task.expect("an acknowledged submission names its task").id;
                        acked.lock().await.insert(key, id);
                    }
                }
            }));
        }
        while acked.lock().await.len() < n_acked_before + ACKED_PER_ROUND {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The power fails while the submissions are in flight.
        cluster.kill_all()?;
        for submitter in &submitters {
            submitter.abort();
        }
        for submitter in submitters {
            let _ = submitter.await;
        }
        let lost_now = disk.power_cut()?;
        eprintln!("cut {cut}: {lost_now:?}, {} acknowledged so far", acked.lock().await.len());
        lost.pages_restored += lost_now.pages_restored;
        lost.bytes_truncated += lost_now.bytes_truncated;
        lost.inodes_lost += lost_now.inodes_lost;

        for id in 1..=3 {
            cluster.restart(id)?;
        }
        cluster.wait_for_leader(RECOVERY_TIMEOUT).await?;
        let mut client = cluster.client()?;
        let present: BTreeMap<String, String> = list_all(&mut client, false)
            .await?
            .into_iter()
            .map(|task| (task.id.clone(), task.spec.unwrap_or_default().idempotency_key))
            .collect();
        let acked = acked.lock().await;
        let missing: BTreeSet<&String> =
            acked.values().filter(|id| !present.contains_key(*id)).collect();
        assert!(
            missing.is_empty(),
            "after cut {cut}, {} of {} acknowledged tasks are gone: {missing:?}",
            missing.len(),
            acked.len()
        );
        for (key, id) in acked.iter() {
            assert_eq!(&present[id], key, "task {id} holds another submission");
        }
    }
    // Cuts that took nothing away would prove nothing about fsyncs.
    assert!(!lost.is_nothing(), "the power cuts lost no unsynced write: {lost:?}");
    Ok(())
}
