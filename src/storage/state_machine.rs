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
use crate::scheduler::{Response, State, Task};
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
}

/// The state machine. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

struct Shared {
    snapshot_dir: PathBuf,
    applied: RwLock<Applied>,
    /// Recent events, oldest first. Locked after `applied` when both are.
    history: Mutex<VecDeque<Arc<TaskEvent>>>,
    events: broadcast::Sender<Arc<TaskEvent>>,
    limits: EventLimits,
}

/// Where a watcher starts: the events it missed, then the live channel.
pub struct Subscription {
    pub backlog: Vec<Arc<TaskEvent>>,
    pub live: broadcast::Receiver<Arc<TaskEvent>>,
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
        let shared = Shared {
            snapshot_dir: snapshot_dir.to_owned(),
            applied: RwLock::new(applied),
            history: Mutex::new(VecDeque::with_capacity(limits.history_events_max)),
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

    /// Events with a revision greater than `after_revision`, then the live
    /// stream. With `after_revision` 0, only new events. When the history no
    /// longer reaches back far enough, the backlog is the current version of
    /// every task changed since then, in revision order.
    pub fn subscribe(&self, after_revision: u64) -> Subscription {
        let applied = self.read();
        let history = self.shared.history.lock().expect("history lock poisoned");
        let live = self.shared.events.subscribe();
        if after_revision == 0 {
            return Subscription { backlog: Vec::new(), live };
        }
        let applied_index = applied.last_applied.as_ref().map_or(0, |log_id| log_id.index());
        let history_reaches =
            history.front().is_some_and(|oldest| oldest.revision <= after_revision + 1);
        let backlog = if after_revision >= applied_index {
            Vec::new()
        } else if history_reaches {
            history.iter().filter(|event| event.revision > after_revision).cloned().collect()
        } else {
            let mut changed: Vec<Arc<TaskEvent>> = applied
                .state
                .tasks_shared()
                .filter(|task| task.revision > after_revision)
                .map(|task| Arc::new(TaskEvent { revision: task.revision, task: task.clone() }))
                .collect();
            changed.sort_by_key(|event| (event.revision, event.task.id));
            changed
        };
        Subscription { backlog, live }
    }

    fn publish(&self, events: Vec<TaskEvent>) {
        let mut history = self.shared.history.lock().expect("history lock poisoned");
        for event in events {
            let event = Arc::new(event);
            if history.len() == self.shared.limits.history_events_max {
                history.pop_front();
            }
            history.push_back(event.clone());
            // No receivers is fine: nobody is watching.
            let _ = self.shared.events.send(event);
        }
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
        }
        self.publish(events);
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
                events.push(TaskEvent { revision: task.revision, task: task.clone() });
            }
        }
        events.sort_by_key(|event| (event.revision, event.task.id));
        info!(snapshot = ?meta.last_log_id, previous_index, "installed a snapshot");
        self.publish(events);
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
