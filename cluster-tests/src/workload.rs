//! The client side of a checked run, shared by the fault suite and the
//! simulation: submissions recorded as invoke and ok or info, waiting for
//! every acknowledged task, the final linearizable read, and the verdict.

use std::path::Path;
use std::time::Duration;

use taskraft::client::Client;
use taskraft::proto::taskraft_v1 as pb;
use taskraft::proto::taskraft_v1::tasks_client::TasksClient;
use tokio::time::Instant;

use crate::checker::{CheckerConfig, Report, check};
use crate::get;
use crate::history::{self, Event, FinalAttempt, HistoryWriter};

/// Submits `specs` as one batch, recording the operation in the history.
pub async fn submit_recorded(
    client: &mut Client,
    history: &HistoryWriter,
    process: u64,
    specs: Vec<pb::TaskSpec>,
) -> anyhow::Result<Vec<String>> {
    let keys: Vec<String> = specs.iter().map(|spec| spec.idempotency_key.clone()).collect();
    for key in &keys {
        history.record(&Event::Invoke {
            process,
            f: history::SUBMIT.into(),
            key: key.clone(),
            time_ns: history.now_ns(),
        });
    }
    match submit_batch(client, specs).await {
        Ok(ids) => {
            for (key, id) in keys.iter().zip(&ids) {
                let ok = Event::Ok {
                    process,
                    f: history::SUBMIT.into(),
                    key: key.clone(),
                    task_id: Some(id.clone()),
                    time_ns: history.now_ns(),
                };
                history.record(&ok);
            }
            Ok(ids)
        }
        Err(err) => {
            // A timeout or a lost answer: it may have happened.
            for key in &keys {
                let info = Event::Info {
                    process,
                    f: history::SUBMIT.into(),
                    key: key.clone(),
                    error: err.to_string(),
                    time_ns: history.now_ns(),
                };
                history.record(&info);
            }
            Err(err)
        }
    }
}

/// Puts a periodic task, recording the put (its key is the prefix of the
/// keys of the tasks it fires), so the checker expects what it fires.
pub async fn put_periodic_recorded(
    client: &mut Client,
    history: &HistoryWriter,
    process: u64,
    periodic: pb::PeriodicTask,
) -> anyhow::Result<pb::PeriodicTask> {
    let key = format!("periodic/{}/", periodic.name);
    let f = history::PUT_PERIODIC.to_owned();
    history.record(&Event::Invoke {
        process,
        f: f.clone(),
        key: key.clone(),
        time_ns: history.now_ns(),
    });
    let reply = client
        .call(|channel, timeout| {
            let message = pb::PutPeriodicRequest { periodic: Some(periodic.clone()) };
            async move {
                TasksClient::new(channel)
                    .put_periodic(taskraft::client::request(message, timeout))
                    .await
            }
        })
        .await;
    match reply {
        Ok(reply) => {
            history.record(&Event::Ok {
                process,
                f,
                key,
                task_id: None,
                time_ns: history.now_ns(),
            });
            Ok(reply.into_inner().periodic.unwrap_or_default())
        }
        Err(status) => {
            let error = status.to_string();
            history.record(&Event::Info { process, f, key, error, time_ns: history.now_ns() });
            Err(status.into())
        }
    }
}

/// Deletes a periodic task; `None` if there was none of that name.
pub async fn delete_periodic(
    client: &mut Client,
    name: &str,
) -> anyhow::Result<Option<pb::PeriodicTask>> {
    let reply = client
        .call(|channel, timeout| {
            let message = pb::DeletePeriodicRequest { name: name.to_owned() };
            async move {
                TasksClient::new(channel)
                    .delete_periodic(taskraft::client::request(message, timeout))
                    .await
            }
        })
        .await;
    match reply {
        Ok(reply) => Ok(reply.into_inner().periodic),
        Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
        Err(status) => Err(status.into()),
    }
}

/// Reads one task linearizably, recording the read: `ok` with the task's id
/// when it is there, `ok` without one when the cluster says there is no such
/// task, `info` when the read failed. Whether the cluster answered.
pub async fn read_recorded(
    client: &mut Client,
    history: &HistoryWriter,
    process: u64,
    task_id: &str,
) -> bool {
    let (f, key) = ("read".to_owned(), task_id.to_owned());
    history.record(&Event::Invoke {
        process,
        f: f.clone(),
        key: key.clone(),
        time_ns: history.now_ns(),
    });
    let read = get(client, task_id, false).await;
    let answered = read.is_ok() || read.as_ref().is_err_and(|s| s.code() == tonic::Code::NotFound);
    let event = match read {
        Ok(task) => {
            Event::Ok { process, f, key, task_id: Some(task.id), time_ns: history.now_ns() }
        }
        Err(status) if status.code() == tonic::Code::NotFound => {
            Event::Ok { process, f, key, task_id: None, time_ns: history.now_ns() }
        }
        Err(status) => {
            Event::Info { process, f, key, error: status.to_string(), time_ns: history.now_ns() }
        }
    };
    history.record(&event);
    answered
}

/// Reads every task linearizably and records it as the history's final state.
pub async fn record_final_read(client: &mut Client, history: &HistoryWriter) -> anyhow::Result<()> {
    for task in crate::list_all(client, false).await? {
        let attempts = task
            .attempts
            .iter()
            .map(|attempt| FinalAttempt {
                token: attempt.fencing_token,
                node: attempt.node_id,
                assigned_at_ns: attempt.assigned_at_unix_ms * 1_000_000,
                ended_at_ns: attempt.ended_at_unix_ms * 1_000_000,
                outcome: attempt.outcome.clone(),
            })
            .collect();
        let state = pb::TaskState::try_from(task.state).map_or("UNKNOWN".into(), |state| {
            state.as_str_name().trim_start_matches("TASK_STATE_").to_owned()
        });
        let (key, queue, after) = task
            .spec
            .map(|spec| (spec.idempotency_key, spec.queue, spec.after))
            .unwrap_or_default();
        history.record(&Event::Final { task_id: task.id, key, state, attempts, queue, after });
    }
    history.record(&Event::Scan { time_ns: history.now_ns() });
    Ok(())
}

/// Runs the checker on the history at `path`, prints its report, and fails
/// the test on any violation.
pub fn assert_history_valid(path: &Path) -> anyhow::Result<Report> {
    let report = check(&history::read(path)?, &CheckerConfig::default());
    println!("{report}");
    anyhow::ensure!(report.valid(), "the history violates taskraft's promises:\n{report}");
    Ok(report)
}

/// Waits until every task of `ids` is terminal, reading linearizably. A
/// read that fails (the cluster is still recovering) is tried again; only
/// the deadline ends the wait.
pub async fn wait_until_all_finished(
    client: &mut Client,
    ids: &[String],
    timeout: Duration,
) -> anyhow::Result<Vec<pb::Task>> {
    let deadline = Instant::now() + timeout;
    let finished = |task: &pb::Task| {
        [pb::TaskState::Succeeded, pb::TaskState::Failed, pb::TaskState::Cancelled]
            .map(|s| s as i32)
            .contains(&task.state)
    };
    let mut tasks: Vec<Option<pb::Task>> = vec![None; ids.len()];
    loop {
        let mut last_error = None;
        for (id, task) in ids.iter().zip(tasks.iter_mut()) {
            if task.as_ref().is_some_and(finished) {
                continue;
            }
            match get(client, id, false).await {
                Ok(read) => *task = Some(read),
                Err(status) => last_error = Some(status),
            }
        }
        let unfinished: Vec<String> = ids
            .iter()
            .zip(&tasks)
            .filter(|(_, task)| !task.as_ref().is_some_and(finished))
            .map(|(id, task)| match task {
                Some(task) => format!(
                    "{id} {} after {:?} attempts {:?}",
                    pb::TaskState::try_from(task.state)
                        .map_or("UNKNOWN", |state| state.as_str_name()),
                    task.spec.as_ref().map(|spec| &spec.after),
                    task.attempts.iter().map(|a| (a.fencing_token, &a.outcome)).collect::<Vec<_>>()
                ),
                None => format!("{id} never read"),
            })
            .collect();
        if unfinished.is_empty() {
            return Ok(tasks.into_iter().flatten().collect());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {} tasks unfinished after {timeout:?} (last read error: {last_error:?}); the first: {:?}",
            unfinished.len(),
            ids.len(),
            &unfinished[..unfinished.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Submits `specs` as one batch; specs without an idempotency key get one
/// ([`crate::with_key`]), so retries never create second tasks.
pub async fn submit_batch(
    client: &mut Client,
    specs: Vec<pb::TaskSpec>,
) -> anyhow::Result<Vec<String>> {
    let specs: Vec<pb::TaskSpec> = specs.into_iter().map(crate::with_key).collect();
    let reply = client
        .call(|channel, timeout| {
            let message = pb::SubmitTasksRequest { specs: specs.clone() };
            async move {
                TasksClient::new(channel)
                    .submit_tasks(taskraft::client::request(message, timeout))
                    .await
            }
        })
        .await?
        .into_inner();
    reply
        .results
        .into_iter()
        .enumerate()
        .map(|(idx, result)| {
            result.task.map(|task| task.id).ok_or_else(|| {
                anyhow::anyhow!("result {idx} of the batch came back without a task")
            })
        })
        .collect()
}
