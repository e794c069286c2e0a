//! The state machine store: the scheduler's [`State`] in memory, mirrored in
//! the tree `sm` of the key-value layer, with snapshots in files and a
//! stream of task events.
//!
//! Each call to `apply` writes every task it changed, the new `last_applied`,
//! the membership and the meta in one batch, which is atomic, so
//! `last_applied` never runs ahead of the state it covers. The batch is not
//! flushed: the Raft log is, and on restart anything lost is re-applied from
//! it. If the `sm` tree is behind the current snapshot file (the log behind a
//! snapshot may be purged), `open` loads the snapshot instead.

use std::collections::VecDeque;
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use futures::TryStreamExt;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::raft::codec;
use crate::raft::{LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};
use crate::scheduler::{Response, State, StateMeta, Task, TaskId};
use crate::storage::kv::{self, Batch, Db, Tree};
use crate::storage::snapshot::{self, SnapshotFile};

const KEY_LAST_APPLIED: &[u8] = b"m:last_applied";
const KEY_MEMBERSHIP: &[u8] = b"m:membership";
const KEY_STATE_META: &[u8] = b"m:meta";
const TASK_PREFIX: &[u8] = b"t:";

/// One change to one task, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEvent {
    /// The Raft log index of the change.
    pub revision: u64,
    pub task: Task,
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
    db: Db,
    tree: Tree,
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
    /// Opens the `sm` tree of `db` and loads the state, from the current
    /// snapshot in `snapshot_dir` if the tree is behind it.
    pub fn open(
        db: &Db,
        snapshot_dir: &Path,
        limits: EventLimits,
    ) -> io::Result<StateMachineStore> {
        std::fs::create_dir_all(snapshot_dir)?;
        remove_temporary_files(snapshot_dir)?;
        let tree = db.open_tree("sm")?;
        let mut applied = load_tree(&tree)?;
        if let Some(mut file) = snapshot::open_current(snapshot_dir)? {
            let meta = snapshot::read_meta(&mut file.file)?;
            if meta.last_log_id > applied.last_applied {
                info!(snapshot = ?meta.last_log_id, applied = ?applied.last_applied, "state behind the snapshot; loading it");
                let (meta, state) = snapshot::read_all(&mut file.file)?;
                applied = Applied {
                    state,
                    last_applied: meta.last_log_id,
                    membership: meta.last_membership,
                };
                write_whole_tree(&tree, &applied)?;
                db.flush_blocking()?;
            }
        }
        info!(last_applied = ?applied.last_applied, n_tasks = applied.state.n_tasks(), "state machine loaded");
        let (events, _) = broadcast::channel(limits.channel_events_max);
        let shared = Shared {
            db: db.clone(),
            tree,
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
                .tasks()
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

fn load_tree(tree: &Tree) -> io::Result<Applied> {
    let last_applied: Option<LogId> =
        read_value(tree, KEY_LAST_APPLIED, "stored last applied log id")?.flatten();
    let membership: StoredMembership =
        read_value(tree, KEY_MEMBERSHIP, "stored membership")?.unwrap_or_default();
    let meta: StateMeta = read_value(tree, KEY_STATE_META, "stored meta")?.unwrap_or_default();
    let mut tasks = Vec::new();
    for item in tree.scan_prefix(TASK_PREFIX)? {
        let (_, bytes) = item?;
        tasks.push(codec::decode::<Task>("stored task", &bytes).map_err(io::Error::other)?);
    }
    let state = State::from_parts(meta, tasks).map_err(|err| {
        io::Error::new(io::ErrorKind::InvalidData, format!("stored state is inconsistent: {err}"))
    })?;
    Ok(Applied { state, last_applied, membership })
}

fn read_value<T: serde::de::DeserializeOwned>(
    tree: &Tree,
    key: &[u8],
    what: &'static str,
) -> io::Result<Option<T>> {
    match tree.get(key)? {
        None => Ok(None),
        Some(bytes) => codec::decode(what, &bytes).map(Some).map_err(io::Error::other),
    }
}

/// Replaces the whole `sm` tree with `applied`, in one atomic batch.
fn write_whole_tree(tree: &Tree, applied: &Applied) -> io::Result<()> {
    let mut batch = Batch::default();
    for item in tree.range(Bound::Unbounded, Bound::Unbounded)? {
        batch.remove(item?.0);
    }
    for task in applied.state.tasks() {
        batch.insert(task_key(task.id).to_vec(), codec::encode(task));
    }
    put_meta(&mut batch, applied);
    tree.apply_batch(batch)
}

fn put_meta(batch: &mut Batch, applied: &Applied) {
    batch.insert(KEY_LAST_APPLIED, codec::encode(&applied.last_applied));
    batch.insert(KEY_MEMBERSHIP, codec::encode(&applied.membership));
    batch.insert(KEY_STATE_META, codec::encode(applied.state.meta()));
}

fn task_key(id: TaskId) -> [u8; 10] {
    let mut key = [0u8; 10];
    key[..2].copy_from_slice(TASK_PREFIX);
    key[2..].copy_from_slice(&id.0.to_be_bytes());
    key
}

fn remove_temporary_files(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "tmp" || ext == "incoming") {
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
            let mut batch = Batch::default();
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
                        for id in result.changed {
                            match applied.state.task(id) {
                                Some(task) => {
                                    batch.insert(task_key(id).to_vec(), codec::encode(task));
                                    events.push(TaskEvent { revision: index, task: task.clone() });
                                }
                                // Purged by retention.
                                None => batch.remove(task_key(id).to_vec()),
                            }
                        }
                        result.response
                    }
                };
                applied.last_applied = Some(entry.log_id);
                responses.push((responder, response));
            }
            put_meta(&mut batch, &applied);
            self.shared.tree.apply_batch(batch)?;
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
            write_whole_tree(&self.shared.tree, &applied)?;
            for task in applied.state.tasks().filter(|task| task.revision > previous_index) {
                events.push(TaskEvent { revision: task.revision, task: task.clone() });
            }
        }
        self.shared.db.flush().await?;
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
        // is encoded, and no runtime thread is taken by the encoding.
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
        let file = kv::blocking(move || {
            let bytes = snapshot::encode(&file_meta, &frozen);
            snapshot::write_file(&dir, snapshot::CURRENT_FILE_NAME, &bytes)
        })
        .await?;
        info!(snapshot = ?meta.last_log_id, "built a snapshot");
        Ok(Snapshot { meta, snapshot: file })
    }
}
