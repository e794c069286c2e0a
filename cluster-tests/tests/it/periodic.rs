//! Periodic tasks on three real nodes: one put to fire every second fires
//! on its ticks before and after the leader is killed, never twice for one
//! tick, and stops when deleted; the CLI shows it; bad puts are refused with
//! INVALID_ARGUMENT and change nothing.

use std::time::{Duration, Instant};

use cluster_tests::{TestCluster, list_all, spec};
use taskraft::client::{Client, request};
use taskraft::proto::taskraft_v1 as pb;
use taskraft::proto::taskraft_v1::tasks_client::TasksClient;

const PERIOD_MS: u64 = 1_000;

async fn put(
    client: &mut Client,
    periodic: pb::PeriodicTask,
) -> Result<pb::PeriodicTask, tonic::Status> {
    let reply = client
        .call(|channel, timeout| {
            let message = pb::PutPeriodicRequest { periodic: Some(periodic.clone()) };
            async move { TasksClient::new(channel).put_periodic(request(message, timeout)).await }
        })
        .await?;
    reply.into_inner().periodic.ok_or_else(|| tonic::Status::internal("no periodic task"))
}

async fn list_periodic(client: &mut Client) -> anyhow::Result<Vec<pb::PeriodicTask>> {
    let reply = client
        .call(|channel, timeout| {
            let message = pb::ListPeriodicRequest::default();
            async move { TasksClient::new(channel).list_periodic(request(message, timeout)).await }
        })
        .await?;
    Ok(reply.into_inner().periodics)
}

fn every_second(name: &str, spec: pb::TaskSpec) -> pb::PeriodicTask {
    pb::PeriodicTask {
        name: name.into(),
        cadence: Some(pb::periodic_task::Cadence::EveryMs(PERIOD_MS)),
        spec: Some(spec),
        ..Default::default()
    }
}

/// The fire time of each task `name` fired, by the task's idempotency key,
/// in task id order.
async fn fired(client: &mut Client, name: &str) -> anyhow::Result<Vec<(u64, pb::Task)>> {
    let prefix = format!("periodic/{name}/");
    let mut fired = Vec::new();
    for task in list_all(client, false).await? {
        let key = &task.spec.as_ref().expect("a task has a spec").idempotency_key;
        if let Some(fire_ms) = key.strip_prefix(&prefix) {
            fired.push((fire_ms.parse()?, task));
        }
    }
    fired.sort_by_key(|(_, task)| task.id.parse::<u64>().unwrap_or(u64::MAX));
    Ok(fired)
}

async fn wait_for_fires(client: &mut Client, name: &str, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while fired(client, name).await?.len() < n {
        anyhow::ensure!(Instant::now() < deadline, "{name} fired fewer than {n} tasks in 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_periodic_task_fires_on_its_ticks_across_a_leader_kill_and_never_twice()
-> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let mut client = cluster.client()?;
    let put_answer = put(&mut client, every_second("tick", spec("true", &[], None))).await?;
    let anchor_ms = put_answer.next_fire_unix_ms - PERIOD_MS;
    wait_for_fires(&mut client, "tick", 3).await?;

    let old_leader = cluster.wait_for_leader(Duration::from_secs(5)).await?;
    cluster.kill(old_leader)?;
    let killed_at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let killed_at_ms = killed_at_ms.as_millis() as u64;
    let mut client = cluster.client()?;
    let n_before_kill = fired(&mut client, "tick").await?.len();
    wait_for_fires(&mut client, "tick", n_before_kill + 3).await?;

    let (code, stdout, stderr) = cluster.cli(&["periodic", "list"])?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("tick") && stdout.contains("every 1s"), "{stdout}");
    let (code, stdout, stderr) =
        cluster.cli(&["--output", "json", "periodic", "delete", "tick"])?;
    assert_eq!(code, 0, "{stderr}");
    let deleted: serde_json::Value = serde_json::from_str(&stdout)?;
    let after_delete = fired(&mut client, "tick").await?;
    tokio::time::sleep(Duration::from_millis(3 * PERIOD_MS)).await;
    let fired_now = fired(&mut client, "tick").await?;
    assert_eq!(fired_now.len(), after_delete.len(), "a deleted periodic task fired");
    assert!(list_periodic(&mut client).await?.is_empty());

    // Every fire is on the cadence's grid, later than the one before, and
    // each task is a fire of its own; some fire came after the kill.
    let mut last_fire_ms = 0;
    for (fire_ms, task) in &fired_now {
        assert_eq!((fire_ms - anchor_ms) % PERIOD_MS, 0, "fire at {fire_ms} is off the grid");
        assert!(*fire_ms > last_fire_ms, "task {} fired for {fire_ms} again or late", task.id);
        last_fire_ms = *fire_ms;
    }
    assert!(fired_now.iter().filter(|(fire_ms, _)| *fire_ms > killed_at_ms).count() >= 3);
    // The periodic task's own counts, replicated with it, agree: each fire
    // made one task, and no fire was skipped as made already.
    assert_eq!(deleted["fired_total"], after_delete.len() as u64, "{deleted}");
    assert_eq!(deleted["skipped_total"], 0, "{deleted}");

    // Every task it fired runs and succeeds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tasks = fired(&mut client, "tick").await?;
        if tasks.iter().all(|(_, task)| task.state == pb::TaskState::Succeeded as i32) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "fired tasks did not all succeed: {tasks:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_counts_of_a_periodic_task_match_its_tasks_and_bad_puts_change_nothing()
-> anyhow::Result<()> {
    let cluster = TestCluster::start(3, &[]).await?;
    let mut client = cluster.client()?;
    put(&mut client, every_second("counted", spec("true", &[], None))).await?;
    wait_for_fires(&mut client, "counted", 3).await?;
    let periodic = list_periodic(&mut client).await?.pop().expect("one periodic task");
    let tasks = fired(&mut client, "counted").await?;
    // Tasks are listed after the periodic task: count those it had fired.
    let n_fired =
        tasks.iter().filter(|(fire_ms, _)| *fire_ms <= periodic.last_fire_unix_ms).count();
    assert_eq!(n_fired as u64, periodic.fired_total);
    assert_eq!(periodic.skipped_total, 0);
    assert_eq!(periodic.last_task_id, tasks[n_fired - 1].1.id);

    let mut delayed = spec("true", &[], None);
    delayed.schedule = Some(pb::task_spec::Schedule::DelayMs(5_000));
    let cases = [
        (
            pb::PeriodicTask { cadence: None, ..every_second("c", spec("true", &[], None)) },
            "no cadence",
        ),
        (
            pb::PeriodicTask {
                cadence: Some(pb::periodic_task::Cadence::Cron("61 * * * *".into())),
                ..every_second("c", spec("true", &[], None))
            },
            "outside 0-59",
        ),
        (
            pb::PeriodicTask {
                cadence: Some(pb::periodic_task::Cadence::EveryMs(10)),
                ..every_second("c", spec("true", &[], None))
            },
            "interval",
        ),
        (every_second("bad name", spec("true", &[], None)), "name may hold"),
        (every_second("c", delayed), "no delay"),
        (every_second("c", spec("true", &[], Some("k".into()))), "no idempotency key"),
        (pb::PeriodicTask { overlap: 7, ..every_second("c", spec("true", &[], None)) }, "overlap"),
        (
            pb::PeriodicTask { spec: None, ..every_second("c", spec("true", &[], None)) },
            "no task spec",
        ),
    ];
    for (periodic, expected) in cases {
        let status = put(&mut client, periodic).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(expected), "{expected}: {}", status.message());
    }
    let names: Vec<String> =
        list_periodic(&mut client).await?.into_iter().map(|periodic| periodic.name).collect();
    assert_eq!(names, ["counted"]);
    let (code, _, stderr) = cluster.cli(&["periodic", "delete", "missing"])?;
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    let (code, _, stderr) =
        cluster.cli(&["periodic", "put", "x", "--cron", "* * *", "--", "true"])?;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("5 fields"), "{stderr}");
    Ok(())
}
