//! Storage tests: openraft's conformance suite on the stores, over sled and
//! over the simulation's memory disk, and reopening a store to check that
//! what was acknowledged is still there.

use std::io;

use openraft::storage::{
    IOFlushed, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine,
};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderId;
use openraft::{EntryPayload, StorageError};
use tempfile::TempDir;

use crate::raft::{Entry, LogId, TypeConfig, Vote};
use crate::scheduler::{Command, TaskId, TaskSpec};
use crate::storage::kv::{Db, Tree};
use crate::storage::state_machine::{Start, Subscription};
use crate::storage::{EventLimits, LogStore, MemoryDisk, SnapshotFile, StateMachineStore, open_db};

const EVENT_LIMITS: EventLimits = EventLimits {
    history_events_max: 64,
    channel_events_max: 64,
    catch_up_tasks_max: 1_000,
    catch_up_scanned_tasks_max: 1_000,
};

fn open_stores(dir: &std::path::Path) -> io::Result<(LogStore, StateMachineStore)> {
    open_stores_on(&open_db(dir, 16 * 1024 * 1024)?, dir)
}

fn open_stores_on(db: &Db, dir: &std::path::Path) -> io::Result<(LogStore, StateMachineStore)> {
    open_stores_with(db, dir, EVENT_LIMITS)
}

fn open_stores_with(
    db: &Db,
    dir: &std::path::Path,
    limits: EventLimits,
) -> io::Result<(LogStore, StateMachineStore)> {
    let log_store = LogStore::open(db, 128)?;
    let state_machine = StateMachineStore::open(db, &dir.join("snapshots"), limits)?;
    Ok((log_store, state_machine))
}

struct SledStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for SledStoreBuilder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let dir = TempDir::new().expect("temporary directory");
        let (log_store, state_machine) = open_stores(dir.path())
            .map_err(|err| StorageError::write(TypeConfig::err_from_error(&err)))?;
        Ok((dir, log_store, state_machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_stores_pass_the_openraft_storage_suite() {
    Suite::test_all(SledStoreBuilder).await.expect("openraft storage suite");
}

/// The stores over the simulation's memory disk (snapshot files still go to
/// a directory).
struct MemoryStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for MemoryStoreBuilder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let dir = TempDir::new().expect("temporary directory");
        let (log_store, state_machine) = open_stores_on(&MemoryDisk::default().open(), dir.path())
            .map_err(|err| StorageError::write(TypeConfig::err_from_error(&err)))?;
        Ok((dir, log_store, state_machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stores_pass_the_openraft_storage_suite() {
    Suite::test_all(MemoryStoreBuilder).await.expect("openraft storage suite");
}

/// The simulated crash keeps exactly what the stores flushed: an
/// acknowledged append and a saved vote survive, and so does the state
/// (re-applied from the log if its own batch was not flushed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_disk_keeps_acknowledged_writes_across_a_restart() {
    let dir = TempDir::new().unwrap();
    let disk = MemoryDisk::default();
    {
        let (mut log_store, _) = open_stores_on(&disk.open(), dir.path()).unwrap();
        log_store.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        let entries: Vec<Entry> = (1..=3).map(|index| submit_entry(index, "true")).collect();
        append_and_wait(&mut log_store, entries).await;
        // Not acknowledged: written but never flushed.
        log_store.save_committed(Some(submit_entry(3, "true").log_id)).await.unwrap();
        assert!(disk.n_unsynced() > 0);
    }
    let (mut log_store, _) = open_stores_on(&disk.open(), dir.path()).unwrap();
    assert_eq!(log_store.read_vote().await.unwrap(), Some(Vote::new_committed(2, 1)));
    let state = log_store.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id.map(|log_id| log_id.index()), Some(3));
    assert_eq!(log_store.read_committed().await.unwrap(), None);
}

fn submit_entry(index: u64, program: &str) -> Entry {
    let spec = TaskSpec::for_test(program);
    Entry {
        log_id: LogId::new(openraft::impls::leader_id_adv::LeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::SubmitTasks {
            now_ms: 1,
            queued_tasks_max: 100,
            specs: vec![spec],
        }),
    }
}

fn cancel_entry(index: u64, id: TaskId) -> Entry {
    Entry {
        log_id: LogId::new(openraft::impls::leader_id_adv::LeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::CancelTask { now_ms: 2, id }),
    }
}

async fn apply_entries(state_machine: &mut StateMachineStore, entries: Vec<Entry>) {
    state_machine
        .apply(futures::stream::iter(entries.into_iter().map(|entry| Ok((entry, None)))))
        .await
        .unwrap();
}

/// The id of the task submitted at `revision`, where every entry from
/// revision 1 on submitted one task with [`submit_entry`]: ids follow
/// submission order.
fn task_at(state_machine: &StateMachineStore, revision: u64) -> TaskId {
    let applied = state_machine.read();
    let nth = usize::try_from(revision - 1).unwrap();
    applied.state.tasks().nth(nth).expect("a task submitted at that revision").id
}

async fn append_and_wait(log_store: &mut LogStore, entries: Vec<Entry>) {
    let (tx, rx) = TypeConfig::oneshot();
    log_store.append(entries, IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
}

/// The state machine is memory only: a reopened store has the log and the
/// vote as they were, and the state of the last snapshot; openraft
/// re-applies the committed log after it (the cluster tests restart nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopened_store_keeps_log_vote_and_the_snapshot_state() {
    let dir = TempDir::new().unwrap();
    {
        let (mut log_store, mut state_machine) = open_stores(dir.path()).unwrap();
        log_store.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        let entries: Vec<Entry> = (1..=4).map(|index| submit_entry(index, "true")).collect();
        append_and_wait(&mut log_store, entries.clone()).await;
        let mut entries = entries.into_iter();
        let apply = |entries: Vec<Entry>| {
            futures::stream::iter(entries.into_iter().map(|entry| Ok((entry, None))))
        };
        state_machine.apply(apply(entries.by_ref().take(3).collect())).await.unwrap();
        state_machine.build_snapshot().await.unwrap();
        state_machine.apply(apply(entries.collect())).await.unwrap();
        assert_eq!(state_machine.read().state.n_tasks(), 4);
    }
    // The flusher loop holds a clone of the Db until its channel closes.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (mut log_store, mut state_machine) = open_stores(dir.path()).unwrap();
    assert_eq!(log_store.read_vote().await.unwrap(), Some(Vote::new_committed(1, 1)));
    let state = log_store.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id.map(|log_id| log_id.index()), Some(4));
    assert_eq!(log_store.try_get_log_entries(1..5).await.unwrap().len(), 4);
    let (applied, _) = state_machine.applied_state().await.unwrap();
    assert_eq!(applied.map(|log_id| log_id.index()), Some(3));
    assert_eq!(state_machine.read().state.n_tasks(), 3);
}

/// Over sled a purge returns once its purge point is durable; a thread of
/// its own deletes the entries, a run at a time and oldest first, so no
/// hole ever opens, and leaves those after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_over_sled_deletes_its_entries_oldest_first_and_keeps_those_after_it() {
    let dir = TempDir::new().unwrap();
    let (mut log_store, _state_machine) = open_stores(dir.path()).unwrap();
    let entries: Vec<Entry> = (1..=2_500).map(|index| submit_entry(index, "true")).collect();
    append_and_wait(&mut log_store, entries).await;
    log_store.purge(submit_entry(2_400, "true").log_id).await.unwrap();
    let state = log_store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id.map(|log_id| log_id.index()), Some(2_400));
    assert_eq!(state.last_log_id.map(|log_id| log_id.index()), Some(2_500));
    assert!(log_store.try_get_log_entries(1..=2_400).await.unwrap().is_empty());
    // The runs wholly at or below the purge point go; the one that holds
    // it stays whole until a later purge passes its end.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let runs = log_store.stored_runs().unwrap();
        let contiguous = runs.windows(2).all(|pair| pair[0].1 + 1 == pair[1].0);
        let kept = runs[0].0 <= 2_401 && runs[runs.len() - 1].1 == 2_500 && contiguous;
        assert!(kept, "runs {runs:?} lost entries after the purge");
        if runs.iter().all(|&(_, last)| last > 2_400) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "purged runs are still there: {runs:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let kept = log_store.try_get_log_entries(2_401..=2_500).await.unwrap();
    assert_eq!(kept.first().map(|entry| entry.log_id.index()), Some(2_401));
    assert_eq!(kept.len(), 100);
}

fn indexes(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|entry| entry.log_id.index()).collect()
}

/// Whether `tree` holds no entry at all.
fn tree_is_empty(tree: &Tree) -> bool {
    tree.range(std::ops::Bound::Unbounded, std::ops::Bound::Unbounded).unwrap().next().is_none()
}

/// One append is one run, or several when its entries are large; reads,
/// truncation in the middle of a run, and appends after it see entries,
/// never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_read_truncated_and_appended_to_entry_by_entry() {
    let dir = TempDir::new().unwrap();
    let (mut log_store, _) = open_stores(dir.path()).unwrap();
    append_and_wait(&mut log_store, (1..=10).map(|index| submit_entry(index, "true")).collect())
        .await;
    // Entries of about 40 KiB: four of them make two runs.
    let large = "x".repeat(40 * 1024);
    append_and_wait(&mut log_store, (11..=14).map(|index| submit_entry(index, &large)).collect())
        .await;
    let runs = log_store.stored_runs().unwrap();
    assert_eq!(runs, vec![(1, 10), (11, 12), (13, 14)]);
    assert_eq!(
        indexes(&log_store.try_get_log_entries(4..12).await.unwrap()),
        (4..12).collect::<Vec<_>>()
    );
    assert_eq!(indexes(&log_store.try_get_log_entries(13..).await.unwrap()), vec![13, 14]);

    log_store.truncate_after(Some(submit_entry(6, "true").log_id)).await.unwrap();
    assert_eq!(log_store.stored_runs().unwrap(), vec![(1, 6)]);
    let state = log_store.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id.map(|log_id| log_id.index()), Some(6));

    let overlapping = vec![submit_entry(6, "false")];
    let (tx, _rx) = TypeConfig::oneshot();
    let refused = log_store.append(overlapping, IOFlushed::signal(tx)).await;
    assert!(refused.unwrap_err().to_string().contains("overlaps"));

    append_and_wait(&mut log_store, (7..=8).map(|index| submit_entry(index, "false")).collect())
        .await;
    let entries = log_store.try_get_log_entries(..).await.unwrap();
    assert_eq!(indexes(&entries), (1..=8).collect::<Vec<_>>());
    assert_eq!(entries[6], submit_entry(7, "false"));
    assert_eq!(log_store.stored_runs().unwrap(), vec![(1, 6), (7, 8)]);
}

/// Stores of earlier versions kept one entry per key in `raft_log`. Opening
/// one converts it, also after a crash in the middle of an earlier
/// conversion, and empties the old tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_of_one_entry_per_key_is_converted_into_runs_on_open() {
    let dir = TempDir::new().unwrap();
    {
        let db = open_db(dir.path(), 16 * 1024 * 1024).unwrap();
        let legacy = db.open_tree("raft_log").unwrap();
        for index in 1..=30 {
            let entry = submit_entry(index, "true");
            legacy.insert(&index.to_be_bytes(), crate::raft::codec::encode(&entry)).unwrap();
        }
        // What a conversion that crashed before it was done left behind.
        let runs = db.open_tree("raft_log_runs").unwrap();
        runs.insert(&1u64.to_be_bytes(), b"half a copy".to_vec()).unwrap();
        db.flush_blocking().unwrap();
    }
    let db = open_db(dir.path(), 16 * 1024 * 1024).unwrap();
    let (mut log_store, _) = open_stores_on(&db, dir.path()).unwrap();
    let entries = log_store.try_get_log_entries(..).await.unwrap();
    assert_eq!(entries, (1..=30).map(|index| submit_entry(index, "true")).collect::<Vec<_>>());
    let state = log_store.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id.map(|log_id| log_id.index()), Some(30));
    assert!(tree_is_empty(&db.open_tree("raft_log").unwrap()));
}

/// A conversion that crashed after its copy was durable and recorded, but
/// before the old tree was empty, is finished on open from the copy: the
/// old tree's entries are not copied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversion_recorded_as_copied_only_empties_the_old_tree() {
    let dir = TempDir::new().unwrap();
    {
        let (mut log_store, _) = open_stores(dir.path()).unwrap();
        let entries = (1..=3).map(|index| submit_entry(index, "copied")).collect();
        append_and_wait(&mut log_store, entries).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    {
        let db = open_db(dir.path(), 16 * 1024 * 1024).unwrap();
        let legacy = db.open_tree("raft_log").unwrap();
        for index in 1..=3u64 {
            let entry = submit_entry(index, "old tree");
            legacy.insert(&index.to_be_bytes(), crate::raft::codec::encode(&entry)).unwrap();
        }
        db.open_tree("raft_meta").unwrap().insert(b"legacy_log_copied", vec![1u8]).unwrap();
        db.flush_blocking().unwrap();
    }
    let db = open_db(dir.path(), 16 * 1024 * 1024).unwrap();
    let (mut log_store, _) = open_stores_on(&db, dir.path()).unwrap();
    let entries = log_store.try_get_log_entries(..).await.unwrap();
    assert_eq!(entries, (1..=3).map(|index| submit_entry(index, "copied")).collect::<Vec<_>>());
    assert!(tree_is_empty(&db.open_tree("raft_log").unwrap()));
}

/// A run damaged on disk is an error from the read, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_run_is_a_read_error() {
    let dir = TempDir::new().unwrap();
    let db = open_db(dir.path(), 16 * 1024 * 1024).unwrap();
    let (mut log_store, _) = open_stores_on(&db, dir.path()).unwrap();
    append_and_wait(&mut log_store, (1..=3).map(|index| submit_entry(index, "true")).collect())
        .await;
    let runs = db.open_tree("raft_log_runs").unwrap();
    let run = runs.get(&1u64.to_be_bytes()).unwrap().unwrap();
    runs.insert(&1u64.to_be_bytes(), run[..run.len() - 1].to_vec()).unwrap();
    let err = log_store.try_get_log_entries(1..4).await.unwrap_err();
    assert!(err.to_string().contains("run of the Raft log"), "{err}");
    assert!(log_store.get_log_state().await.is_err());
}

/// Earlier versions mirrored the state in the tree `sm`; the snapshot and
/// the log hold all of it, so opening empties the mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_empties_the_state_mirror_of_an_earlier_version() {
    let dir = TempDir::new().unwrap();
    {
        let db = open_db(dir.path(), 16 * 1024 * 1024).unwrap();
        let mirror = db.open_tree("sm").unwrap();
        mirror.insert(b"t:0000000001", b"a task".to_vec()).unwrap();
        db.flush_blocking().unwrap();
    }
    let db = open_db(dir.path(), 16 * 1024 * 1024).unwrap();
    let (_, state_machine) = open_stores_on(&db, dir.path()).unwrap();
    assert_eq!(state_machine.read().state.n_tasks(), 0);
    assert!(tree_is_empty(&db.open_tree("sm").unwrap()));
}

/// A follower that installs a snapshot ahead of its log purges past its last
/// entry. A crash after the purge point is on disk but before the entries
/// are deleted must leave a store that opens consistent (a kill-mid-snapshot
/// nemesis found a node that could not restart: "last_log_id < last_purged").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_past_the_log_interrupted_by_a_crash_is_finished_on_open() {
    let dir = TempDir::new().unwrap();
    {
        let (mut log_store, _) = open_stores(dir.path()).unwrap();
        let entries: Vec<Entry> = (1..=5).map(|index| submit_entry(index, "true")).collect();
        append_and_wait(&mut log_store, entries).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    {
        // The crash: the purge point (index 9, past the last entry) is
        // durable, the deletion of entries 1..=5 never happened.
        let db = open_db(dir.path(), 16 * 1024 * 1024).unwrap();
        let purged = submit_entry(9, "true").log_id;
        let meta = db.open_tree("raft_meta").unwrap();
        meta.insert(b"last_purged", crate::raft::codec::encode(&purged)).unwrap();
        db.flush_blocking().unwrap();
    }
    let (mut log_store, _) = open_stores(dir.path()).unwrap();
    let state = log_store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id.map(|log_id| log_id.index()), Some(9));
    assert_eq!(state.last_log_id.map(|log_id| log_id.index()), Some(9));
    assert!(log_store.try_get_log_entries(0..10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installed_snapshot_is_the_state_after_a_restart() {
    let dir = TempDir::new().unwrap();
    let other = TempDir::new().unwrap();
    // Build a snapshot at index 2 elsewhere, then install it into a fresh store.
    let snapshot = {
        let (_, mut state_machine) = open_stores(other.path()).unwrap();
        let entries = vec![submit_entry(1, "a"), submit_entry(2, "b")];
        state_machine
            .apply(futures::stream::iter(entries.into_iter().map(|entry| Ok((entry, None)))))
            .await
            .unwrap();
        state_machine.build_snapshot().await.unwrap()
    };
    {
        let (_, mut state_machine) = open_stores(dir.path()).unwrap();
        // As the peer service leaves a received snapshot: a file beside the current one.
        let path = dir.path().join("snapshots").join("received.incoming");
        std::fs::copy(&snapshot.snapshot.path, &path).unwrap();
        let received = SnapshotFile { file: std::fs::File::open(&path).unwrap(), path };
        state_machine.install_snapshot(&snapshot.meta, received).await.unwrap();
        assert_eq!(state_machine.read().state.n_tasks(), 2);
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (_, state_machine) = open_stores(dir.path()).unwrap();
    let applied = state_machine.read();
    assert_eq!(applied.last_applied.as_ref().map(|log_id| log_id.index()), Some(2));
    assert_eq!(applied.state.n_tasks(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_resume_from_history_or_from_the_state() {
    let dir = TempDir::new().unwrap();
    let (_, mut state_machine) = open_stores(dir.path()).unwrap();
    apply_entries(&mut state_machine, (1..=100).map(|index| submit_entry(index, "x")).collect())
        .await;
    let revisions = |subscription: Subscription| {
        subscription.backlog.iter().map(|event| event.revision).collect::<Vec<_>>()
    };
    // History keeps the last 64 events: revisions 37..=100.
    let from_history = state_machine.subscribe(90, None).await.unwrap();
    assert_eq!(revisions(from_history), (91..=100).collect::<Vec<_>>());
    // Older than the history: the current state of every task changed since.
    let from_state = state_machine.subscribe(10, None).await.unwrap();
    assert_eq!(revisions(from_state), (11..=100).collect::<Vec<_>>());
    assert!(state_machine.subscribe(100, None).await.unwrap().backlog.is_empty());
    assert!(state_machine.subscribe(0, None).await.unwrap().backlog.is_empty());
    // One task: looked up, not walked for.
    let one = task_at(&state_machine, 20);
    let of_one = state_machine.subscribe(10, Some(one)).await.unwrap();
    assert_eq!(of_one.backlog.iter().map(|event| event.task.id).collect::<Vec<_>>(), vec![one]);
    assert!(state_machine.subscribe(20, Some(one)).await.unwrap().backlog.is_empty());
    let from_history_of_one = state_machine.subscribe(90, Some(task_at(&state_machine, 95)));
    assert_eq!(revisions(from_history_of_one.await.unwrap()), vec![95]);
}

/// A catch-up from before the history looks at no more than its bound of
/// tasks per step, and a task changed again between steps comes once, in
/// order: from the backlog if the walk had passed it, else from the live
/// stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_walks_in_bounded_steps_and_leaves_later_changes_to_the_live_stream() {
    let dir = TempDir::new().unwrap();
    let limits = EventLimits { catch_up_scanned_tasks_max: 7, ..EVENT_LIMITS };
    let db = open_db(dir.path(), 16 * 1024 * 1024).unwrap();
    let (_, mut state_machine) = open_stores_with(&db, dir.path(), limits).unwrap();
    apply_entries(&mut state_machine, (1..=100).map(|index| submit_entry(index, "x")).collect())
        .await;
    let (walked_early, walked_late) = (task_at(&state_machine, 5), task_at(&state_machine, 100));
    let Start::CatchUp(mut catch_up, mut live) = state_machine.start_subscription(2, None) else {
        panic!("revision 2 is older than the history");
    };
    // Task ids follow submission order: the first step looks at the tasks
    // of revisions 1..=7.
    assert!(!state_machine.catch_up_step(&mut catch_up).unwrap());
    apply_entries(&mut state_machine, vec![cancel_entry(101, walked_early)]).await;
    apply_entries(&mut state_machine, vec![cancel_entry(102, walked_late)]).await;
    let mut n_steps = 1;
    while !state_machine.catch_up_step(&mut catch_up).unwrap() {
        n_steps += 1;
    }
    n_steps += 1;
    assert_eq!(n_steps, 100_usize.div_ceil(7), "steps of 7 tasks over 100");
    let backlog = catch_up.finish();
    // The task changed after the walk passed it comes as it was, then again
    // live; the one changed before the walk reached it comes only live.
    assert_eq!(
        backlog.iter().map(|event| event.revision).collect::<Vec<_>>(),
        (3..=99).collect::<Vec<_>>()
    );
    assert!(backlog.iter().all(|event| event.task.id != walked_late));
    let live_events: Vec<(u64, TaskId)> = (0..2)
        .map(|_| live.try_recv().map(|event| (event.revision, event.task.id)).unwrap())
        .collect();
    assert_eq!(live_events, vec![(101, walked_early), (102, walked_late)]);
    assert!(live.try_recv().is_err());
}

/// A watcher so far behind that more tasks changed than a catch-up may hold
/// is refused with the revision to resume from after listing; one from
/// within the history, or of one task, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_too_far_behind_is_told_to_list_and_resume() {
    let dir = TempDir::new().unwrap();
    let limits = EventLimits {
        history_events_max: 10,
        catch_up_tasks_max: 30,
        catch_up_scanned_tasks_max: 8,
        ..EVENT_LIMITS
    };
    let db = open_db(dir.path(), 16 * 1024 * 1024).unwrap();
    let (_, mut state_machine) = open_stores_with(&db, dir.path(), limits).unwrap();
    apply_entries(&mut state_machine, (1..=100).map(|index| submit_entry(index, "x")).collect())
        .await;
    // The history keeps revisions 91..=100. Revisions 71..=100 are thirty
    // tasks: as many as a catch-up may hold.
    let caught_up = state_machine.subscribe(70, None).await.unwrap();
    assert_eq!(caught_up.backlog.len(), 30);
    let err = state_machine.subscribe(69, None).await.err().expect("31 changed tasks");
    assert_eq!((err.after_revision, err.tasks_max, err.resume_revision), (69, 30, 100));
    assert!(err.to_string().contains("then watch with after_revision=100"), "{err}");
    assert!(state_machine.subscribe(1, None).await.is_err());
    let within = state_machine.subscribe(90, None).await.unwrap();
    assert_eq!(within.backlog.len(), 10);
    let one = state_machine.subscribe(1, Some(task_at(&state_machine, 2))).await.unwrap();
    assert_eq!(one.backlog.len(), 1);
}

/// The purge point that keeps at most so many bytes behind a snapshot
/// counts whole runs back from the snapshot's last index, and purges the
/// run that would go over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_kept_behind_a_snapshot_is_bounded_in_bytes_by_whole_runs() {
    let dir = TempDir::new().unwrap();
    let (mut log_store, _state_machine) = open_stores(dir.path()).unwrap();
    // Four appends, each one run: 1..=10, 11..=20, 21..=30, 31..=40.
    for first in [1, 11, 21, 31] {
        let entries: Vec<Entry> =
            (first..first + 10).map(|index| submit_entry(index, "true")).collect();
        append_and_wait(&mut log_store, entries).await;
    }
    let runs = log_store.stored_runs().unwrap();
    assert_eq!(runs, vec![(1, 10), (11, 20), (21, 30), (31, 40)]);
    let run_bytes = log_store.run_bytes(1).unwrap().unwrap();
    for first in [11, 21, 31] {
        assert_eq!(log_store.run_bytes(first).unwrap(), Some(run_bytes), "runs of one size");
    }

    // A snapshot up to 30: the runs at or before it are 1..=30.
    let point = |keep_bytes| log_store.purge_point_keeping_bytes(30, keep_bytes).unwrap();
    assert_eq!(point(3 * run_bytes), None, "all three runs fit");
    assert_eq!(point(3 * run_bytes - 1), Some(10), "the oldest run goes");
    assert_eq!(point(2 * run_bytes), Some(10));
    assert_eq!(point(2 * run_bytes - 1), Some(20));
    assert_eq!(point(0), Some(30), "nothing kept");
    // A snapshot within a run: that run counts whole, and is not purged past the snapshot.
    assert_eq!(log_store.purge_point_keeping_bytes(25, 0).unwrap(), Some(25));
    assert_eq!(log_store.purge_point_keeping_bytes(25, run_bytes).unwrap(), Some(20));
}
