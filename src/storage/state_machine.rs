//! The state machine store: the scheduler's [`State`] in memory, made
//! durable by snapshot files, with a stream of task events.
//!
//! `apply` changes only memory. What makes applied state durable is the Raft
//! log, which is fsynced before anything is acknowledged, and the snapshot
//! files, which are fsynced before they become current. On start the state
//! is the current snapshot; openraft then re-applies the committed log after
//! it (`RaftLogStorage::save_committed` keeps that point), and the log is
//! never purged past the current snapshot. Mirroring every changed task into
//! sled as well doubled the bytes each commit wrote and fsynced, and the
//! copy in sled's page cache a third of the memory of a large queue.
//!
//! Stores written by earlier versions keep that mirror in a tree `sm`;
//! `open` empties it.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use futures::TryStreamExt;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::raft::{LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};
use crate::scheduler::{Response, State, Task, TaskId};
use crate::storage::kv::{self, Batch, Db};
use crate::storage::snapshot::{self, SnapshotFile};

/// The tree in which earlier versions mirrored the state.
const LEGACY_MIRROR_TREE: &str = "sm";

/// One change to one task, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEvent {
    /// The Raft log index of the change.
    pub revision: u64,
    /// Shared with the state as it was at the change: events copy no task.
    pub task: Arc<Task>,
}

/// What the state machine holds, readable through [`StateMachineStore::read`].
#[derive(Debug, Default)]
pub struct Applied {
    pub state: State,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// Limits of the task event stream.
#[derive(Debug, Clone, Copy)]
pub struct EventLimits {
    /// Events kept for watchers that resume from a revision.
    pub history_events_max: usize,
    /// Events a live watcher may fall behind by before it is dropped.
    pub channel_events_max: usize,
    /// The most tasks a watcher's catch-up (see [`StateMachineStore::subscribe`])
    /// may hold: a watcher further behind than that is told to list instead.
    pub catch_up_tasks_max: usize,
    /// The most tasks one step of a catch-up looks at while it holds the
    /// state, which `apply` waits for.
    pub catch_up_scanned_tasks_max: usize,
}

/// The state machine. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

struct Shared {
    snapshot_dir: PathBuf,
    applied: RwLock<Applied>,
    /// Locked after `applied` when both are.
    history: Mutex<History>,
    events: broadcast::Sender<Arc<TaskEvent>>,
    limits: EventLimits,
}

/// The events published so far.
struct History {
    /// Recent events, oldest first.
    events: VecDeque<Arc<TaskEvent>>,
    /// The revision up to which every change has been published: a task
    /// whose revision is at most this one has had its event (or came with
    /// the state loaded at start), and a greater one's event is still to
    /// come on the live channel.
    published_revision: u64,
}

/// Where a watcher starts: the events it missed, then the live channel,
/// which carries every event after them and none before.
pub struct Subscription {
    /// The revision up to which events had been published when the live
    /// channel was subscribed to: it carries every event after it.
    pub published_revision: u64,
    pub backlog: Vec<Arc<TaskEvent>>,
    pub live: broadcast::Receiver<Arc<TaskEvent>>,
}

/// A watcher resumes from a revision so old that more tasks changed since
/// than a catch-up may hold ([`EventLimits::catch_up_tasks_max`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "more than {tasks_max} tasks changed after revision {after_revision}, which is older than the \
     events this node keeps; list the tasks, then watch with after_revision={resume_revision}"
)]
pub struct TooFarBehind {
    pub after_revision: u64,
    pub tasks_max: usize,
    /// A revision to watch from after listing: every change after it will
    /// be streamed, so a listing made after this answer misses nothing.
    pub resume_revision: u64,
}

/// A watcher's catch-up from a revision older than the history: the
/// current version of every task changed after `after_revision` and up to
/// `up_to_revision`, gathered in steps that each hold the state for a
/// bounded walk. Later changes come on the live channel: a task changed
/// again between steps is left to it, so nothing comes twice or out of
/// order.
pub(crate) struct CatchUp {
    after_revision: u64,
    up_to_revision: u64,
    resume_after: Option<TaskId>,
    events: Vec<Arc<TaskEvent>>,
}

/// What [`StateMachineStore::start_subscription`] found.
pub(crate) enum Start {
    Ready(Subscription),
    CatchUp(CatchUp, broadcast::Receiver<Arc<TaskEvent>>),
}

impl StateMachineStore {
    /// Loads the state from the current snapshot in `snapshot_dir`, or
    /// starts empty; openraft re-applies the committed log after it.
    pub fn open(
        db: &Db,
        snapshot_dir: &Path,
        limits: EventLimits,
    ) -> io::Result<StateMachineStore> {
        std::fs::create_dir_all(snapshot_dir)?;
        remove_temporary_files(snapshot_dir)?;
        empty_legacy_mirror(db)?;
        let mut applied = Applied::default();
        let started = std::time::Instant::now();
        if let Some(mut file) = snapshot::open_current(snapshot_dir)? {
            let (meta, state) = snapshot::read_all(&mut file.file)?;
            applied =
                Applied { state, last_applied: meta.last_log_id, membership: meta.last_membership };
        }
        info!(
            last_applied = ?applied.last_applied,
            n_tasks = applied.state.n_tasks(),
            load_ms = started.elapsed().as_millis() as u64,
            "state machine loaded"
        );
        let (events, _) = broadcast::channel(limits.channel_events_max);
        let applied_index = applied.last_applied.as_ref().map_or(0, |log_id| log_id.index());
        let shared = Shared {
            snapshot_dir: snapshot_dir.to_owned(),
            applied: RwLock::new(applied),
            history: Mutex::new(History {
                events: VecDeque::with_capacity(limits.history_events_max),
                published_revision: applied_index,
            }),
            events,
            limits,
        };
        Ok(StateMachineStore { shared: Arc::new(shared) })
    }

    /// The size of the current snapshot file; 0 when there is none.
    pub fn snapshot_bytes(&self) -> io::Result<u64> {
        match std::fs::metadata(self.shared.snapshot_dir.join(snapshot::CURRENT_FILE_NAME)) {
            Ok(metadata) => Ok(metadata.len()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(err) => Err(err),
        }
    }

    /// Reads the applied state. Do not hold the guard across an await.
    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        self.shared.applied.read().expect("state lock poisoned")
    }

    /// Every event from now on.
    pub fn live_events(&self) -> broadcast::Receiver<Arc<TaskEvent>> {
        self.shared.events.subscribe()
    }

    /// Events with a revision greater than `after_revision`, of task `only`
    /// or of all, then the live stream. With `after_revision` 0, only new
    /// events. When the history no longer reaches back far enough, the
    /// backlog is the current version of every task changed since then, in
    /// revision order, gathered in bounded steps so that `apply` never
    /// waits long; a watcher so far behind that more than
    /// [`EventLimits::catch_up_tasks_max`] tasks changed is refused.
    pub async fn subscribe(
        &self,
        after_revision: u64,
        only: Option<TaskId>,
    ) -> Result<Subscription, TooFarBehind> {
        let (mut catch_up, live) = match self.start_subscription(after_revision, only) {
            Start::Ready(subscription) => return Ok(subscription),
            Start::CatchUp(catch_up, live) => (catch_up, live),
        };
        while !self.catch_up_step(&mut catch_up)? {
            tokio::task::yield_now().await;
        }
        let published_revision = catch_up.up_to_revision;
        Ok(Subscription { published_revision, backlog: catch_up.finish(), live })
    }

    /// Subscribes to the live channel and takes what the history or one
    /// task's lookup can give at once; otherwise a catch-up to walk.
    pub(crate) fn start_subscription(&self, after_revision: u64, only: Option<TaskId>) -> Start {
        let applied = self.read();
        let history = self.shared.history.lock().expect("history lock poisoned");
        let live = self.shared.events.subscribe();
        let up_to_revision = history.published_revision;
        let backlog = if after_revision == 0 || after_revision >= up_to_revision {
            Vec::new()
        } else if history.events.front().is_some_and(|oldest| oldest.revision <= after_revision + 1)
        {
            let missed = history.events.iter().filter(|event| {
                event.revision > after_revision && only.is_none_or(|id| event.task.id == id)
            });
            missed.cloned().collect()
        } else if let Some(id) = only {
            let changed = applied
                .state
                .task_shared(id)
                .filter(|task| (after_revision + 1..=up_to_revision).contains(&task.revision));
            changed.map(|task| Arc::new(TaskEvent::of(task))).into_iter().collect()
        } else {
            let catch_up =
                CatchUp { after_revision, up_to_revision, resume_after: None, events: Vec::new() };
            return Start::CatchUp(catch_up, live);
        };
        Start::Ready(Subscription { published_revision: up_to_revision, backlog, live })
    }

    /// One bounded step of a catch-up; true when it is complete.
    pub(crate) fn catch_up_step(&self, catch_up: &mut CatchUp) -> Result<bool, TooFarBehind> {
        let limits = &self.shared.limits;
        let applied = self.read();
        let revisions = catch_up.after_revision + 1..=catch_up.up_to_revision;
        let tasks = applied.state.tasks_shared_after(catch_up.resume_after);
        for (n_scanned, task) in tasks.enumerate() {
            if n_scanned == limits.catch_up_scanned_tasks_max.max(1) {
                return Ok(false);
            }
            catch_up.resume_after = Some(task.id);
            if !revisions.contains(&task.revision) {
                continue;
            }
            if catch_up.events.len() == limits.catch_up_tasks_max {
                return Err(TooFarBehind {
                    after_revision: catch_up.after_revision,
                    tasks_max: limits.catch_up_tasks_max,
                    resume_revision: catch_up.up_to_revision,
                });
            }
            catch_up.events.push(Arc::new(TaskEvent::of(task)));
        }
        Ok(true)
    }

    fn publish(&self, events: Vec<TaskEvent>, applied_index: u64) {
        let mut history = self.shared.history.lock().expect("history lock poisoned");
        for event in events {
            let event = Arc::new(event);
            if history.events.len() == self.shared.limits.history_events_max {
                history.events.pop_front();
            }
            history.events.push_back(event.clone());
            // No receivers is fine: nobody is watching.
            let _ = self.shared.events.send(event);
        }
        history.published_revision = history.published_revision.max(applied_index);
    }
}

impl TaskEvent {
    /// The task's latest change.
    fn of(task: &Arc<Task>) -> TaskEvent {
        TaskEvent { revision: task.revision, task: task.clone() }
    }
}

impl CatchUp {
    /// The events gathered, in revision order.
    pub(crate) fn finish(mut self) -> Vec<Arc<TaskEvent>> {
        self.events.sort_by_key(|event| (event.revision, event.task.id));
        self.events
    }
}

/// Removes what an earlier version mirrored in the tree `sm`: the snapshot
/// and the log hold all of it. Written once, then never again.
fn empty_legacy_mirror(db: &Db) -> io::Result<()> {
    let tree = db.open_tree(LEGACY_MIRROR_TREE)?;
    let mut batch = Batch::default();
    let mut n_keys = 0usize;
    for item in tree.range(std::ops::Bound::Unbounded, std::ops::Bound::Unbounded)? {
        batch.remove(item?.0);
        n_keys += 1;
    }
    if n_keys > 0 {
        info!(n_keys, "removing the state mirror of an earlier version");
        tree.apply_batch(batch)?;
        db.flush_blocking()?;
    }
    Ok(())
}

fn remove_temporary_files(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| {
            ext == snapshot::TEMPORARY_EXTENSION || ext == snapshot::INCOMING_EXTENSION
        }) {
            warn!(path = %path.display(), "removing a leftover temporary snapshot file");
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = self.read();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        let entries: Vec<EntryResponder<TypeConfig>> = entries.try_collect().await?;
        let mut responses = Vec::with_capacity(entries.len());
        let mut events = Vec::new();
        let applied_index;
        {
            let mut applied = self.shared.applied.write().expect("state lock poisoned");
            for (entry, responder) in entries {
                let index = entry.log_id.index();
                let response = match entry.payload {
                    EntryPayload::Blank => Response::Empty,
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                        Response::Empty
                    }
                    EntryPayload::Normal(command) => {
                        let result = applied.state.apply(index, &command);
                        // A task purged by retention has no event.
                        for id in result.changed {
                            if let Some(task) = applied.state.task_shared(id) {
                                events.push(TaskEvent { revision: index, task: task.clone() });
                            }
                        }
                        result.response
                    }
                };
                applied.last_applied = Some(entry.log_id);
                responses.push((responder, response));
            }
            applied_index = applied.last_applied.as_ref().map_or(0, |log_id| log_id.index());
        }
        self.publish(events, applied_index);
        for (responder, response) in responses {
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let dir = self.shared.snapshot_dir.clone();
        let (file_meta, state, current) = kv::blocking(move || {
            let mut snapshot = snapshot;
            let (file_meta, state) = snapshot::read_all(&mut snapshot.file)?;
            let current = snapshot::make_current(&dir, snapshot)?;
            Ok((file_meta, state, current))
        })
        .await?;
        drop(current);
        if &file_meta != meta {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "snapshot file does not match its metadata",
            ));
        }
        let previous_index;
        let mut events = Vec::new();
        {
            let mut applied = self.shared.applied.write().expect("state lock poisoned");
            previous_index = applied.last_applied.as_ref().map_or(0, |log_id| log_id.index());
            *applied = Applied {
                state,
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
            };
            for task in applied.state.tasks_shared().filter(|task| task.revision > previous_index) {
                events.push(TaskEvent::of(task));
            }
        }
        events.sort_by_key(|event| (event.revision, event.task.id));
        info!(snapshot = ?meta.last_log_id, previous_index, "installed a snapshot");
        self.publish(events, meta.last_log_id.as_ref().map_or(0, |log_id| log_id.index()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let dir = self.shared.snapshot_dir.clone();
        kv::blocking(move || {
            let Some(mut file) = snapshot::open_current(&dir)? else {
                return Ok(None);
            };
            let meta = snapshot::read_meta(&mut file.file)?;
            Ok(Some(Snapshot { meta, snapshot: file }))
        })
        .await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // Only the freeze holds the lock: apply goes on while the snapshot
        // is encoded, on a thread of its own at a lower priority.
        let (meta, frozen) = {
            let applied = self.read();
            let meta = SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.membership.clone(),
            };
            (meta, applied.state.frozen())
        };
        let dir = self.shared.snapshot_dir.clone();
        let file_meta = meta.clone();
        let file = kv::background("snapshot-build", move || {
            snapshot::write(&dir, snapshot::CURRENT_FILE_NAME, &file_meta, &frozen)
        })
        .await?;
        info!(snapshot = ?meta.last_log_id, "built a snapshot");
        Ok(Snapshot { meta, snapshot: file })
    }
}
