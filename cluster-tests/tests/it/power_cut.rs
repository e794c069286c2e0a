//! A power cut of the whole cluster: every node killed at once while
//! submissions flow, and its disk then losing whatever was not fsynced
//! ([`PowerCutDisk`]). After a restart, every task whose submission was
//! acknowledged is there. A SIGKILL alone cannot show a missing fsync,
//! since the kernel keeps the page cache; this test can.

use std::time::Duration;

use cluster_tests::TestCluster;
use cluster_tests::power_cut::{Lost, PowerCutDisk};
use cluster_tests::whole_cluster::{
    Acknowledged, kill_all_once_acknowledged, missing_acknowledged, spawn_submitters,
};

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

    let acked = Acknowledged::default();
    let mut lost = Lost::default();
    for cut in 0..N_CUTS {
        let submitters = spawn_submitters(&cluster, N_SUBMITTERS, &format!("c{cut}"), &acked)?;
        // The power fails while the submissions are in flight.
        kill_all_once_acknowledged(&mut cluster, submitters, &acked, ACKED_PER_ROUND).await?;
        let lost_now = disk.power_cut()?;
        eprintln!("cut {cut}: {lost_now:?}, {} acknowledged so far", acked.lock().await.len());
        lost.pages_restored += lost_now.pages_restored;
        lost.bytes_truncated += lost_now.bytes_truncated;
        lost.inodes_lost += lost_now.inodes_lost;

        for id in 1..=3 {
            cluster.restart(id)?;
        }
        cluster.wait_for_leader(RECOVERY_TIMEOUT).await?;
        let missing = missing_acknowledged(&cluster, &acked).await?;
        assert!(
            missing.is_empty(),
            "after cut {cut}, {} of {} acknowledged tasks are gone: {missing:?}",
            missing.len(),
            acked.lock().await.len()
        );
    }
    // Cuts that took nothing away would prove nothing about fsyncs.
    assert!(!lost.is_nothing(), "the power cuts lost no unsynced write: {lost:?}");
    Ok(())
}
