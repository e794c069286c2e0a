//! Tasks that run after others, on three real nodes: a task waits (WAITING)
//! until every task it names has succeeded, through the leader's death, and
//! only then is assigned; a failure cancels the tasks after it and theirs;
//! submissions naming unknown, failed or malformed tasks are refused with
//! the gRPC code and the CLI exit code that say why.

use std::time::Duration;

use cluster_tests::workload::{submit_batch, wait_until_all_finished};
use cluster_tests::{TestCluster, get, spec, submit};
use taskraft::proto::taskraft_v1 as pb;

fn after(mut spec: pb::TaskSpec, ids: &[&str]) -> pb::TaskSpec {
    spec.after = ids.iter().map(|id| id.to_string()).collect();
    spec
}

fn id_of(reply: pb::SubmitTaskResponse) -> (String, i32) {
    let task = reply.task.expect("a submitted task");
    (task.id, task.state)
}

/// When the task's last attempt ended: it succeeded then.
fn ended_ms(task: &pb::Task) -> u64 {
    task.attempts.last().expect("a finished task has an attempt").ended_at_unix_ms
}

/// When the task was first assigned.
fn first_assigned_ms(task: &pb::Task) -> u64 {
    task.attempts.first().expect("a task that ran has an attempt").assigned_at_unix_ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_runs_only_after_its_tasks_succeed_and_is_cancelled_when_one_fails()
-> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let mut client = cluster.client()?;
    let waiting = pb::TaskState::Waiting as i32;

    let (first, _) = id_of(submit(&mut client, spec("sleep", &["1.5"], None)).await?);
    let (second, _) = id_of(submit(&mut client, spec("sleep", &["0.5"], None)).await?);
    let failing =
        pb::TaskSpec { max_attempts: 1, ..spec("sh", &["-c", "sleep 1.5; exit 3"], None) };
    let (failing, _) = id_of(submit(&mut client, failing).await?);
    let (then, then_state) =
        id_of(submit(&mut client, after(spec("true", &[], None), &[&first, &second])).await?);
    let (doomed, doomed_state) =
        id_of(submit(&mut client, after(spec("true", &[], None), &[&failing])).await?);
    let (doomed_too, _) =
        id_of(submit(&mut client, after(spec("true", &[], None), &[&doomed])).await?);
    assert_eq!((then_state, doomed_state), (waiting, waiting));
    let read = get(&mut client, &then, false).await?;
    assert_eq!(read.state, waiting);
    assert_eq!(read.spec.expect("a spec").after, [first.clone(), second.clone()]);

    // The waiting tasks and their lists survive the leader's death.
    let leader = cluster.wait_for_leader(Duration::from_secs(5)).await?;
    cluster.kill(leader)?;
    cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let mut client = cluster.client()?;

    let (code, stdout, stderr) =
        cluster.cli(&["submit", "--quiet", "--after", &then, "--", "true"])?;
    assert_eq!(code, 0, "{stderr}");
    let last = stdout.trim().to_owned();

    let ids = [&first, &second, &then, &doomed, &doomed_too, &last].map(|id| id.to_string());
    let tasks = wait_until_all_finished(&mut client, &ids, Duration::from_secs(60)).await?;
    let [first, second, then, doomed, doomed_too, last] =
        <[pb::Task; 6]>::try_from(tasks).map_err(|_| anyhow::anyhow!("six tasks"))?;
    let succeeded = pb::TaskState::Succeeded as i32;
    for task in [&first, &second, &then, &last] {
        assert_eq!(task.state, succeeded, "task {}: {task:?}", task.id);
    }
    assert!(
        first_assigned_ms(&then) >= ended_ms(&first).max(ended_ms(&second)),
        "assigned at {} before its tasks ended at {} and {}",
        first_assigned_ms(&then),
        ended_ms(&first),
        ended_ms(&second)
    );
    assert!(first_assigned_ms(&last) >= ended_ms(&then), "the CLI's task ran before its task");
    let failed = get(&mut client, &failing, false).await?;
    assert_eq!(failed.state, pb::TaskState::Failed as i32);
    for task in [&doomed, &doomed_too] {
        assert_eq!(task.state, pb::TaskState::Cancelled as i32, "task {}: {task:?}", task.id);
        assert!(task.attempts.is_empty(), "a cancelled waiting task never ran: {task:?}");
    }

    // Refused, with nothing created: an unknown task, a failed one, a
    // malformed id, the same task twice.
    let before = cluster_tests::list_all(&mut client, false).await?.len();
    let refusals = [
        (vec!["999999"], tonic::Code::NotFound, "does not exist"),
        (vec![failing.as_str()], tonic::Code::FailedPrecondition, "is FAILED"),
        (vec!["x1"], tonic::Code::InvalidArgument, "is not a number"),
        (vec![then.id.as_str(), then.id.as_str()], tonic::Code::InvalidArgument, "twice"),
    ];
    for (ids, code, message) in refusals {
        let status = submit(&mut client, after(spec("true", &[], None), &ids))
            .await
            .expect_err("a submission after a task that cannot be waited for");
        assert_eq!(status.code(), code, "{ids:?}: {status:?}");
        assert!(status.message().contains(message), "{ids:?}: {}", status.message());
    }
    assert_eq!(cluster_tests::list_all(&mut client, false).await?.len(), before);
    let (code, _, stderr) = cluster.cli(&["submit", "--after", "999999", "--", "true"])?;
    assert_eq!(code, 4, "{stderr}");
    let (code, _, stderr) = cluster.cli(&["submit", "--after", "nope", "--", "true"])?;
    assert_eq!(code, 2, "{stderr}");
    Ok(())
}

fn after_in_batch(mut spec: pb::TaskSpec, indexes: &[u32]) -> pb::TaskSpec {
    spec.after_in_batch = indexes.to_vec();
    spec
}

/// A whole graph in one `SubmitTasks` call: a diamond runs in its order,
/// and a chain below a task that fails is cancelled; a batch whose index
/// does not point back is refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_submits_a_graph_that_runs_in_its_order() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, &[]).await?;
    let mut client = cluster.client()?;
    let failing =
        pb::TaskSpec { max_attempts: 1, ..spec("sh", &["-c", "sleep 0.3; exit 3"], None) };
    let ids = submit_batch(
        &mut client,
        vec![
            spec("sleep", &["0.5"], None),
            after_in_batch(spec("sleep", &["0.3"], None), &[0]),
            after_in_batch(spec("sleep", &["0.6"], None), &[0]),
            after_in_batch(spec("true", &[], None), &[1, 2]),
            failing,
            after_in_batch(spec("true", &[], None), &[4]),
            after_in_batch(spec("true", &[], None), &[5, 3]),
        ],
    )
    .await?;
    let tasks = wait_until_all_finished(&mut client, &ids, Duration::from_secs(60)).await?;
    let states: Vec<i32> = tasks.iter().map(|task| task.state).collect();
    let (succeeded, failed, cancelled) = (
        pb::TaskState::Succeeded as i32,
        pb::TaskState::Failed as i32,
        pb::TaskState::Cancelled as i32,
    );
    assert_eq!(states, [succeeded, succeeded, succeeded, succeeded, failed, cancelled, cancelled]);
    let after_of = |idx: usize| tasks[idx].spec.as_ref().expect("a spec").after.clone();
    assert_eq!(after_of(3), [ids[1].clone(), ids[2].clone()], "read back as task ids");
    for (task, before) in [(1, &[0][..]), (2, &[0]), (3, &[1, 2])] {
        for before in before {
            assert!(
                first_assigned_ms(&tasks[task]) >= ended_ms(&tasks[*before]),
                "task {task} of the batch was assigned before task {before} ended: {tasks:?}"
            );
        }
    }
    assert!(tasks[5..].iter().all(|task| task.attempts.is_empty()), "cancelled tasks ran");

    let before = cluster_tests::list_all(&mut client, false).await?.len();
    let forward = submit_batch(
        &mut client,
        vec![after_in_batch(spec("true", &[], None), &[1]), spec("true", &[], None)],
    )
    .await
    .expect_err("an index that points forward");
    assert!(forward.to_string().contains("does not come before it"), "{forward:#}");
    assert_eq!(cluster_tests::list_all(&mut client, false).await?.len(), before);
    Ok(())
}
