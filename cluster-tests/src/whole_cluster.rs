//! Submissions under load and a kill of every node at once, for the tests
//! that restart a whole cluster (after a SIGKILL, or a power cut) and then
//! look for every task whose submission was acknowledged.
//!
//! [`Acknowledged`] is what the submitters learned: idempotency key to task
//! id, recorded only for acks. A failed call may or may not have committed,
//! so it counts for nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::{TestCluster, list_all, spec, submit};

/// Idempotency key to task id, for every acknowledged submission.
pub type Acknowledged = Arc<Mutex<BTreeMap<String, String>>>;

/// Starts `n_submitters` clients that submit `true` tasks without pause,
/// keyed `{prefix}-s{submitter}-{n}`, and record each ack in `acked`. They
/// run until aborted.
pub fn spawn_submitters(
    cluster: &TestCluster,
    n_submitters: usize,
    prefix: &str,
    acked: &Acknowledged,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut submitters = Vec::with_capacity(n_submitters);
    for submitter_idx in 0..n_submitters {
        let mut client = cluster.client()?;
        let acked = acked.clone();
        let prefix = format!("{prefix}-s{submitter_idx}");
        submitters.push(tokio::spawn(async move {
            for n_submitted in 0.. {
                let key = format!("{prefix}-{n_submitted}");
                let Ok(reply) = submit(&mut client, spec("true", &[&key], Some(key.clone()))).await
                else {
                    continue;
                };
                let id = reply.task.expect("an acknowledged submission names its task").id;
                acked.lock().await.insert(key, id);
            }
        }));
    }
    Ok(submitters)
}

/// Waits until `n_more` submissions beyond those already in `acked` are
/// acknowledged, then kills every node at once (SIGKILL) while submissions
/// are still in flight, and stops the submitters.
pub async fn kill_all_once_acknowledged(
    cluster: &mut TestCluster,
    submitters: Vec<JoinHandle<()>>,
    acked: &Acknowledged,
    n_more: usize,
) -> anyhow::Result<()> {
    let n_acked_before = acked.lock().await.len();
    while acked.lock().await.len() < n_acked_before + n_more {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed = cluster.kill_all();
    for submitter in &submitters {
        submitter.abort();
    }
    for submitter in submitters {
        let _ = submitter.await;
    }
    killed
}

/// Reads every task linearizably (the first read is the one that matters
/// after a restart) and names each acknowledged submission that is missing
/// or whose task holds another key.
pub async fn missing_acknowledged(
    cluster: &TestCluster,
    acked: &Acknowledged,
) -> anyhow::Result<Vec<String>> {
    let mut client = cluster.client()?;
    let present: BTreeMap<String, String> = list_all(&mut client, false)
        .await?
        .into_iter()
        .map(|task| (task.id.clone(), task.spec.unwrap_or_default().idempotency_key))
        .collect();
    let acked = acked.lock().await;
    let missing = acked
        .iter()
        .filter_map(|(key, id)| match present.get(id) {
            None => Some(format!("{key} (task {id}) is gone")),
            Some(held) if held != key => Some(format!("task {id} holds {held}, not {key}")),
            Some(_) => None,
        })
        .collect();
    Ok(missing)
}
