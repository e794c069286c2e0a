//! The key-value layer under the stores: sled on disk in production, or an
//! in-memory disk for simulation, behind one small API of trees, atomic
//! batches and flushes.
//!
//! [`MemoryDisk`] models a disk that loses what was not flushed: writes go
//! to a live copy at once and are journaled; a flush makes the journal
//! durable; [`MemoryDisk::open`] (a restart) throws away the live copy and
//! everything unflushed, as a crash would. It lives outside the node, so it
//! survives the node's restarts, and a handle from before a reopen refuses
//! to write, as a dead process cannot.
//!
//! Blocking work (snapshot files) goes through [`blocking`], which runs it
//! inline on a current-thread runtime: such a runtime has no other thread
//! to keep going meanwhile, and a simulation stays deterministic.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use sled::IVec;

use super::durable::{SledSync, Synced};

/// One key and its value.
pub type KeyValue = (IVec, IVec);

/// A database: a set of named trees that flush together.
#[derive(Clone)]
pub enum Db {
    Sled(SledDb),
    Memory(MemoryHandle),
}

/// sled, and what completes its flushes ([`super::durable`]).
#[derive(Clone)]
pub struct SledDb {
    db: sled::Db,
    sync: Arc<SledSync>,
}

impl SledDb {
    pub fn new(db: sled::Db, sync: SledSync) -> SledDb {
        SledDb { db, sync: Arc::new(sync) }
    }

    /// sled's flush, then ours: every write so far is on disk.
    pub fn flush(&self) -> io::Result<Synced> {
        self.db.flush().map_err(sled_err)?;
        self.sync.sync()
    }
}

/// One named tree of a [`Db`].
#[derive(Clone)]
pub enum Tree {
    Sled(sled::Tree),
    Memory { handle: MemoryHandle, name: Arc<str> },
}

/// Writes in order: a value to insert, or `None` to remove the key.
type Ops = Vec<(IVec, Option<IVec>)>;

/// Writes applied to one tree atomically.
#[derive(Default)]
pub struct Batch {
    ops: Ops,
}

impl Batch {
    pub fn insert(&mut self, key: impl Into<IVec>, value: impl Into<IVec>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    pub fn remove(&mut self, key: impl Into<IVec>) {
        self.ops.push((key.into(), None));
    }
}

fn sled_err(err: sled::Error) -> io::Error {
    io::Error::other(format!("sled: {err}"))
}

impl Db {
    pub fn open_tree(&self, name: &str) -> io::Result<Tree> {
        match self {
            Db::Sled(sled) => sled.db.open_tree(name).map(Tree::Sled).map_err(sled_err),
            Db::Memory(handle) => {
                handle.lock()?.live.entry(name.to_owned()).or_default();
                Ok(Tree::Memory { handle: handle.clone(), name: name.into() })
            }
        }
    }

    /// Makes every write so far durable, without blocking the runtime.
    pub async fn flush(&self) -> io::Result<()> {
        match self {
            Db::Sled(sled) => {
                let sled = sled.clone();
                blocking(move || sled.flush().map(|_| ())).await
            }
            Db::Memory(handle) => handle.flush().await,
        }
    }

    /// Makes every write so far durable; blocks. For start-up and for the
    /// log flusher thread, never on a runtime thread.
    pub fn flush_blocking(&self) -> io::Result<()> {
        match self {
            Db::Sled(sled) => sled.flush().map(|_| ()),
            Db::Memory(handle) => {
                let mut state = handle.lock()?;
                let upto = state.next_seq;
                state.sync_before(upto);
                Ok(())
            }
        }
    }
}

/// The entries of a tree in a key range, in key order.
pub enum RangeIter {
    Sled(Box<sled::Iter>),
    Memory(std::vec::IntoIter<KeyValue>),
}

impl Iterator for RangeIter {
    type Item = io::Result<KeyValue>;

    fn next(&mut self) -> Option<io::Result<KeyValue>> {
        match self {
            RangeIter::Sled(iter) => iter.next().map(|item| item.map_err(sled_err)),
            RangeIter::Memory(iter) => iter.next().map(Ok),
        }
    }
}

impl DoubleEndedIterator for RangeIter {
    fn next_back(&mut self) -> Option<io::Result<KeyValue>> {
        match self {
            RangeIter::Sled(iter) => iter.next_back().map(|item| item.map_err(sled_err)),
            RangeIter::Memory(iter) => iter.next_back().map(Ok),
        }
    }
}

impl Tree {
    pub fn get(&self, key: &[u8]) -> io::Result<Option<IVec>> {
        match self {
            Tree::Sled(tree) => tree.get(key).map_err(sled_err),
            Tree::Memory { handle, name } => {
                Ok(handle.lock()?.live.get(&**name).and_then(|tree| tree.get(key)).cloned())
            }
        }
    }

    pub fn insert(&self, key: &[u8], value: impl Into<IVec>) -> io::Result<()> {
        let mut batch = Batch::default();
        batch.insert(key, value);
        self.apply_batch(batch)
    }

    pub fn remove(&self, key: &[u8]) -> io::Result<()> {
        let mut batch = Batch::default();
        batch.remove(key);
        self.apply_batch(batch)
    }

    /// Applies every write of `batch`, or none of them.
    ///
    /// Over sled a batch of one write is written alone, which is atomic by
    /// itself: a sled batch seals and writes out sled's current buffer when
    /// it begins and again for its manifest (`pin_log`), two more disk
    /// writes, each waking every idle thread of sled's pool, for every
    /// append and every Raft metadata write.
    pub fn apply_batch(&self, mut batch: Batch) -> io::Result<()> {
        match self {
            Tree::Sled(tree) if batch.ops.len() == 1 => {
                let (key, value) = batch.ops.remove(0);
                match value {
                    Some(value) => tree.insert(key, value).map(|_| ()),
                    None => tree.remove(key).map(|_| ()),
                }
                .map_err(sled_err)
            }
            Tree::Sled(tree) => {
                let mut sled_batch = sled::Batch::default();
                for (key, value) in batch.ops {
                    match value {
                        Some(value) => sled_batch.insert(key, value),
                        None => sled_batch.remove(key),
                    }
                }
                tree.apply_batch(sled_batch).map_err(sled_err)
            }
            Tree::Memory { handle, name } => handle.writable()?.write(name, batch.ops),
        }
    }

    /// The entries with keys in `(start, end)`.
    pub fn range(&self, start: Bound<&[u8]>, end: Bound<&[u8]>) -> io::Result<RangeIter> {
        match self {
            Tree::Sled(tree) => Ok(RangeIter::Sled(Box::new(tree.range::<&[u8], _>((start, end))))),
            Tree::Memory { handle, name } => {
                let state = handle.lock()?;
                let entries: Vec<KeyValue> = match state.live.get(&**name) {
                    Some(tree) => tree
                        .range::<[u8], _>((start, end))
                        .map(|(key, value)| (IVec::from(key.as_slice()), value.clone()))
                        .collect(),
                    None => Vec::new(),
                };
                Ok(RangeIter::Memory(entries.into_iter()))
            }
        }
    }

    /// The entries whose keys start with `prefix`.
    pub fn scan_prefix(&self, prefix: &[u8]) -> io::Result<RangeIter> {
        match self {
            Tree::Sled(tree) => Ok(RangeIter::Sled(Box::new(tree.scan_prefix(prefix)))),
            Tree::Memory { .. } => {
                let entries: Vec<KeyValue> = self
                    .range(Bound::Included(prefix), Bound::Unbounded)?
                    .take_while(|item| item.as_ref().is_ok_and(|(key, _)| key.starts_with(prefix)))
                    .collect::<io::Result<_>>()?;
                Ok(RangeIter::Memory(entries.into_iter()))
            }
        }
    }

    /// The entry with the greatest key at or before `key`.
    pub fn last_at_or_before(&self, key: &[u8]) -> io::Result<Option<KeyValue>> {
        match self {
            Tree::Sled(tree) => tree.range(..=key).next_back().transpose().map_err(sled_err),
            Tree::Memory { handle, name } => {
                Ok(handle.lock()?.live.get(&**name).and_then(|tree| {
                    tree.range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
                        .next_back()
                        .map(|(key, value)| (IVec::from(key.as_slice()), value.clone()))
                }))
            }
        }
    }

    /// The entry with the greatest key.
    pub fn last(&self) -> io::Result<Option<KeyValue>> {
        match self {
            Tree::Sled(tree) => tree.last().map_err(sled_err),
            Tree::Memory { handle, name } => {
                Ok(handle.lock()?.live.get(&**name).and_then(|tree| {
                    tree.last_key_value()
                        .map(|(key, value)| (IVec::from(key.as_slice()), value.clone()))
                }))
            }
        }
    }
}

type Trees = BTreeMap<String, BTreeMap<Vec<u8>, IVec>>;

/// A disk held in memory that survives the restarts of the node using it.
/// Cheap to clone: clones are the same disk.
#[derive(Clone, Default)]
pub struct MemoryDisk {
    state: Arc<Mutex<MemoryState>>,
    /// How long a flush takes, in the runtime's (possibly simulated) time.
    fsync_latency: Duration,
}

#[derive(Default)]
struct MemoryState {
    /// What the running node reads: the durable state plus unflushed writes.
    live: Trees,
    /// What survives a crash.
    durable: Trees,
    /// Writes not yet flushed, oldest first, each batch whole, with its
    /// sequence number.
    unsynced: VecDeque<(u64, Arc<str>, Ops)>,
    /// The sequence number of the next batch written.
    next_seq: u64,
    /// Bumped by every `open`; handles of earlier generations are dead.
    generation: u64,
}

impl MemoryState {
    /// Makes the batches written before sequence number `upto` durable, and
    /// only those: a flush covers what was written before it began, so a
    /// later write never rides along on an earlier flush.
    fn sync_before(&mut self, upto: u64) {
        while self.unsynced.front().is_some_and(|(seq, _, _)| *seq < upto) {
            let (_, name, ops) = self.unsynced.pop_front().expect("checked above");
            let tree = self.durable.entry(name.to_string()).or_default();
            apply_ops(tree, ops);
        }
    }

    fn write(&mut self, name: &Arc<str>, ops: Ops) -> io::Result<()> {
        apply_ops(self.live.entry(name.to_string()).or_default(), ops.clone());
        self.unsynced.push_back((self.next_seq, name.clone(), ops));
        self.next_seq += 1;
        Ok(())
    }
}

fn apply_ops(tree: &mut BTreeMap<Vec<u8>, IVec>, ops: Ops) {
    for (key, value) in ops {
        match value {
            Some(value) => tree.insert(key.to_vec(), value),
            None => tree.remove(key.as_ref()),
        };
    }
}

impl MemoryDisk {
    /// A disk whose flushes take `fsync_latency`.
    pub fn with_fsync_latency(fsync_latency: Duration) -> MemoryDisk {
        MemoryDisk { fsync_latency, ..MemoryDisk::default() }
    }

    /// Opens the disk for a node starting: what was never flushed is gone,
    /// and every handle from before stops working.
    pub fn open(&self) -> Db {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.live = state.durable.clone();
        state.unsynced.clear();
        state.generation += 1;
        Db::Memory(MemoryHandle { disk: self.clone(), generation: state.generation })
    }

    /// The number of unflushed batches, for tests.
    pub fn n_unsynced(&self) -> usize {
        self.state.lock().map_or(0, |state| state.unsynced.len())
    }
}

/// One opening of a [`MemoryDisk`].
#[derive(Clone)]
pub struct MemoryHandle {
    disk: MemoryDisk,
    generation: u64,
}

impl MemoryHandle {
    fn lock(&self) -> io::Result<MutexGuard<'_, MemoryState>> {
        self.disk.state.lock().map_err(|_| io::Error::other("the memory disk lock is poisoned"))
    }

    /// The state, if this handle is still the current opening.
    fn writable(&self) -> io::Result<MutexGuard<'_, MemoryState>> {
        let state = self.lock()?;
        if state.generation != self.generation {
            return Err(io::Error::other("the memory disk was reopened by a newer node"));
        }
        Ok(state)
    }

    async fn flush(&self) -> io::Result<()> {
        let upto = self.writable()?.next_seq;
        if !self.disk.fsync_latency.is_zero() {
            tokio::time::sleep(self.disk.fsync_latency).await;
        }
        self.writable()?.sync_before(upto);
        Ok(())
    }
}

/// Whether the caller runs on a current-thread runtime (the simulation's),
/// where work is done inline instead of on another thread, so that a seed
/// replays the same way every time.
fn on_current_thread_runtime() -> bool {
    tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::CurrentThread
}

/// Runs blocking `work` off the runtime's threads, or inline on a
/// current-thread runtime (see the module docs).
pub async fn blocking<T, F>(work: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    if on_current_thread_runtime() {
        return work();
    }
    tokio::task::spawn_blocking(work).await.map_err(io::Error::other)?
}

/// How much lower than the node's other threads a background thread's
/// scheduling priority is (a `nice` increment; 10 gives it about a tenth of
/// the CPU share of a thread at the default when both want the CPU).
const BACKGROUND_NICE: i32 = 10;

/// Runs long, CPU-heavy `work` (building a snapshot) on a thread of its own
/// at a lower scheduling priority, or inline on a current-thread runtime.
/// On a saturated machine the node's Raft and network threads then keep
/// the CPU they need to answer heartbeats: three nodes on two cores each
/// building a snapshot at once starved a follower past its election
/// timeout, and it campaigned in the middle of a fill.
pub async fn background<T, F>(name: &str, work: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    if on_current_thread_runtime() {
        return work();
    }
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        if let Err(err) = lower_this_threads_priority() {
            tracing::debug!(cause = %err, "cannot lower a background thread's priority");
        }
        let _ = done.send(work());
    })?;
    result.await.map_err(|_| io::Error::other("a background thread ended without an answer"))?
}

/// Lowers the calling thread's priority by [`BACKGROUND_NICE`]; on Linux a
/// thread id names one thread to `setpriority`.
#[allow(unsafe_code)]
fn lower_this_threads_priority() -> io::Result<()> {
    let thread_id = nix::unistd::gettid().as_raw() as libc::id_t;
    // SAFETY: setpriority reads only its three integer arguments and changes
    // only the scheduling priority of the thread they name, this one.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, thread_id, BACKGROUND_NICE) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of the calling thread, from /proc.
    fn this_threads_nice() -> io::Result<i32> {
        let thread_id = nix::unistd::gettid();
        let stat = std::fs::read_to_string(format!("/proc/self/task/{thread_id}/stat"))?;
        // Fields counted from the state, after the command name's ')': nice is the 17th.
        let after_name = &stat[stat.rfind(')').ok_or_else(|| io::Error::other("bad stat"))? + 2..];
        let nice = after_name.split(' ').nth(16).ok_or_else(|| io::Error::other("short stat"))?;
        nice.parse().map_err(io::Error::other)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_work_runs_on_a_thread_of_its_own_at_a_lower_priority() {
        let caller_nice = this_threads_nice().unwrap();
        let (name, nice) = background("test-background", || {
            Ok((std::thread::current().name().map(str::to_owned), this_threads_nice()?))
        })
        .await
        .unwrap();
        assert_eq!(name.as_deref(), Some("test-background"));
        assert_eq!(nice, (caller_nice + BACKGROUND_NICE).min(19));
        let failed: io::Result<()> =
            background("test-background", || Err(io::Error::other("no"))).await;
        assert_eq!(failed.unwrap_err().to_string(), "no", "the work's error comes back");
    }

    #[tokio::test]
    async fn a_reopened_memory_disk_keeps_what_was_flushed_and_loses_the_rest() {
        let disk = MemoryDisk::default();
        let db = disk.open();
        let tree = db.open_tree("t").unwrap();
        tree.insert(b"flushed", &b"1"[..]).unwrap();
        db.flush().await.unwrap();
        tree.insert(b"unflushed", &b"2"[..]).unwrap();
        assert_eq!(tree.get(b"unflushed").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(disk.n_unsynced(), 1);

        let reopened = disk.open();
        let tree_after = reopened.open_tree("t").unwrap();
        assert_eq!(tree_after.get(b"flushed").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(tree_after.get(b"unflushed").unwrap(), None);
        // The node from before the restart can no longer write.
        assert!(tree.insert(b"late", &b"3"[..]).is_err());
        assert!(db.flush().await.is_err());
    }

    /// A flush covers only what was written before it began.
    #[tokio::test]
    async fn a_flush_covers_only_the_writes_before_it() {
        let disk = MemoryDisk::with_fsync_latency(Duration::from_millis(10));
        let db = disk.open();
        let tree = db.open_tree("t").unwrap();
        tree.insert(b"first", &b"1"[..]).unwrap();
        let early = {
            let db = db.clone();
            tokio::spawn(async move { db.flush().await })
        };
        tokio::task::yield_now().await;
        tree.insert(b"second", &b"2"[..]).unwrap();
        early.await.unwrap().unwrap();
        assert_eq!(disk.n_unsynced(), 1, "the second write was not covered");
        let reopened = disk.open().open_tree("t").unwrap();
        assert!(reopened.get(b"first").unwrap().is_some());
        assert!(reopened.get(b"second").unwrap().is_none());
    }

    #[tokio::test]
    async fn memory_ranges_prefixes_and_last_follow_key_order() {
        let db = MemoryDisk::default().open();
        let tree = db.open_tree("t").unwrap();
        for key in [&b"a1"[..], b"a2", b"b1", b"c1"] {
            tree.insert(key, key).unwrap();
        }
        let keys = |iter: RangeIter| -> Vec<Vec<u8>> {
            iter.map(|item| item.unwrap().0.to_vec()).collect()
        };
        assert_eq!(keys(tree.scan_prefix(b"a").unwrap()), vec![b"a1".to_vec(), b"a2".to_vec()]);
        assert_eq!(
            keys(tree.range(Bound::Excluded(b"a2"), Bound::Included(b"b1")).unwrap()),
            vec![b"b1".to_vec()]
        );
        assert_eq!(tree.last().unwrap().unwrap().0.as_ref(), b"c1");
        let mut batch = Batch::default();
        batch.remove(&b"c1"[..]);
        batch.insert(&b"d1"[..], &b"x"[..]);
        tree.apply_batch(batch).unwrap();
        assert_eq!(tree.last().unwrap().unwrap().0.as_ref(), b"d1");
    }
}
