//! The Raft log and Raft metadata in the key-value layer ([`super::kv`]:
//! sled, or a simulated disk), with group commit.
//!
//! The log tree holds one value per append, a run of consecutive entries
//! keyed by the index of its first (`log_run` says why), so an
//! append is one sled insert. `append` writes it at once, so its entries are
//! readable on return, and hands openraft's completion callback to a single
//! flusher loop. The loop drains every callback queued so far, calls
//! `Db::flush` once (sled writes its whole page cache and [`super::durable`]
//! fsyncs it, so one flush covers every tree), and only then completes the
//! callbacks in order. So no
//! callback fires before its entries are on disk, and concurrent appends share
//! one fsync. `save_vote` and `purge` flush inline before they return.
//!
//! Over sled the loop is a thread of its own that calls the blocking flush.
//! sled's `flush_async` hands each flush to sled's thread pool, whose queue
//! wakes all of its seven idle threads for every job, and then wakes the
//! runtime again to complete the callbacks: three processes doing that for
//! every commit cost measurable CPU at one client. Over the simulation's
//! disk the loop stays a task, so that the simulation stays deterministic.
//!
//! `purge` records its purge point durably before it deletes entries, and
//! `open` finishes a purge that a crash interrupted. A purge may go past the
//! last entry (a follower installing a snapshot ahead of its log), so the
//! last log id is the later of the last entry and the purge point.
//!
//! Over sled the deletion itself is a thread's own, one run at a time:
//! openraft waits for `purge` in the Raft core, and deleting 100,000 entries
//! at once (a snapshot every 100,000 entries) held a follower's core, and
//! with it every answer to the leader, heartbeats included, for a second:
//! the leader saw no majority and refused writes. One run at a time and not
//! in sled batches, because a sled batch holds sled's process-wide write
//! lock, which stops every read and write of every tree until it ends: a
//! batch removing 621 runs of big entries held it for 920 ms on a leader in
//! the middle of a fill, the leader appended and sent nothing, and its
//! followers elected another. openraft allows this: purged entries need not
//! vanish at once, and none at or below the purge point is read again. A
//! run that holds the purge point stays whole until a later purge passes
//! its end; reads skip the entries of it at or below the purge point.
//!
//! Stores of earlier versions kept one entry per key in the tree
//! `raft_log`; `open` converts them (see `convert_legacy_log`).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, error, info, warn};

use crate::metrics::DurationHistogram;
use crate::raft::codec;
use crate::raft::{Entry, LogId, TypeConfig, Vote};
use crate::storage::kv::{Batch, Db, IVec, Tree};
use crate::storage::log_run;

/// The tree of runs of log entries.
const LOG_TREE: &str = "raft_log_runs";
/// The tree in which earlier versions kept one log entry per key.
const LEGACY_LOG_TREE: &str = "raft_log";

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
/// Present once the entries of [`LEGACY_LOG_TREE`] are durable as runs.
const KEY_LEGACY_LOG_COPIED: &[u8] = b"legacy_log_copied";

/// The encoded bytes one run holds at most, unless one entry alone is
/// larger. sled writes a value larger than a quarter of a segment (about
/// 128 KiB) to a file of its own, which costs a file create and an fsync of
/// its own; a run stays below that. An append longer than this is several
/// runs in one sled batch: with batches of 100 tasks (about 30 KiB an
/// entry), 96 KiB gave 10 % more tasks per second than 32 KiB.
const LOG_RUN_BYTES_MAX: usize = 96 * 1024;

/// The Raft log store. Cheap to clone: clones share the trees and the flusher.
#[derive(Clone)]
pub struct LogStore {
    db: Db,
    log: Tree,
    meta: Tree,
    flush_tx: mpsc::Sender<IOFlushed<TypeConfig>>,
    /// Purge points for the remover thread; `None` over the simulation's
    /// disk, where purges delete inline to stay deterministic.
    purges_tx: Option<std::sync::mpsc::SyncSender<u64>>,
    appended: AppendedBytes,
    /// How long each flush took, for the metrics.
    flush_durations: Arc<DurationHistogram>,
    /// The first index after the purge point (0 before any purge): reads
    /// start there, whatever the runs still hold before it.
    unpurged_from: Arc<AtomicU64>,
}

/// Keys one batch of [`remove_all`] deletes, at open, before anything else
/// reads or writes.
const REMOVE_ALL_CHUNK_KEYS: usize = 1_000;

/// Purge points that may wait for the remover thread. One that finds the
/// queue full is left to the next purge, which deletes from the first entry
/// left, or to the next start.
const PURGE_QUEUE_MAX: usize = 16;

/// The bytes of encoded entries appended to a log store since it was
/// opened; read by the snapshot trigger (`raft.snapshot_after_log_bytes`).
#[derive(Debug, Clone, Default)]
pub struct AppendedBytes(Arc<AtomicU64>);

impl AppendedBytes {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, n_bytes: u64) {
        self.0.fetch_add(n_bytes, Ordering::Relaxed);
    }
}

impl LogStore {
    /// Opens the log trees of `db` and starts the flusher loop. At most
    /// `flush_queue_max` appends wait for a flush at once; more wait to queue.
    pub fn open(db: &Db, flush_queue_max: usize) -> io::Result<LogStore> {
        let log = db.open_tree(LOG_TREE)?;
        let meta = db.open_tree("raft_meta")?;
        convert_legacy_log(db, &log, &meta)?;
        let (flush_tx, flush_rx) = mpsc::channel(flush_queue_max);
        let flush_durations = Arc::new(DurationHistogram::default());
        let purges_tx = match db {
            Db::Sled(_) => {
                let db = db.clone();
                let span = tracing::Span::current();
                let durations = flush_durations.clone();
                std::thread::Builder::new()
                    .name("log-flusher".into())
                    .spawn(move || span.in_scope(|| flush_thread(db, flush_rx, &durations)))?;
                let (purges_tx, purges_rx) = std::sync::mpsc::sync_channel(PURGE_QUEUE_MAX);
                let log = log.clone();
                let span = tracing::Span::current();
                std::thread::Builder::new()
                    .name("log-remover".into())
                    .spawn(move || span.in_scope(|| remover_thread(log, purges_rx)))?;
                Some(purges_tx)
            }
            Db::Memory(_) => {
                let durations = flush_durations.clone();
                tokio::spawn(flush_loop(db.clone(), flush_rx, durations).in_current_span());
                None
            }
        };
        let store = LogStore {
            db: db.clone(),
            log,
            meta,
            flush_tx,
            purges_tx,
            appended: AppendedBytes::default(),
            flush_durations,
            unpurged_from: Arc::default(),
        };
        if let Some(purged) = store.read_meta::<LogId>(KEY_LAST_PURGED)? {
            store.unpurged_from.store(purged.index() + 1, Ordering::Relaxed);
            let n_removed = remove_up_to(&store.log, purged.index())?;
            if n_removed > 0 {
                info!(%purged, n_removed, "finished a purge a crash had interrupted");
            }
        }
        Ok(store)
    }

    /// A handle on the count of bytes appended, which outlives the store's
    /// move into openraft.
    /// How long each flush of the log took since it was opened.
    pub fn flush_durations(&self) -> Arc<DurationHistogram> {
        self.flush_durations.clone()
    }

    pub fn appended_bytes(&self) -> AppendedBytes {
        self.appended.clone()
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &'static [u8],
    ) -> io::Result<Option<T>> {
        let what = match key {
            KEY_VOTE => "stored vote",
            KEY_COMMITTED => "stored committed log id",
            _ => "stored last purged log id",
        };
        match self.meta.get(key)? {
            None => Ok(None),
            Some(bytes) => codec::decode(what, &bytes).map(Some).map_err(io::Error::other),
        }
    }

    fn last_entry_log_id(&self) -> io::Result<Option<LogId>> {
        match self.log.last()? {
            None => Ok(None),
            Some((key, run)) => {
                let first = key_index(&key)?;
                let entries = log_run::entries(&run)?;
                let last = first + entries.len() as u64 - 1;
                let bytes = entries.last().expect("log_run::entries refuses an empty run");
                Ok(Some(decode_entry_at(last, bytes)?.log_id))
            }
        }
    }

    /// The index of the last entry stored, purged or not.
    fn last_stored_index(&self) -> io::Result<Option<u64>> {
        match self.log.last()? {
            None => Ok(None),
            Some((key, run)) => Ok(Some(key_index(&key)? + log_run::len(&run)? - 1)),
        }
    }

    /// The index up to which to purge so that the entries kept at or
    /// before `upto` (the last index a snapshot holds) take at most
    /// `keep_bytes`, counted in whole runs back from `upto`; `None` if they
    /// take no more. A run that reaches past `upto` counts whole: it stays
    /// until a later purge passes its end.
    pub fn purge_point_keeping_bytes(&self, upto: u64, keep_bytes: u64) -> io::Result<Option<u64>> {
        let end = index_key(upto);
        let mut kept_bytes = 0u64;
        for item in self.log.range(Bound::Unbounded, Bound::Included(&end))?.rev() {
            let (key, run) = item?;
            kept_bytes = kept_bytes.saturating_add(run.len() as u64);
            if kept_bytes > keep_bytes {
                let last = key_index(&key)? + log_run::len(&run)? - 1;
                return Ok(Some(last.min(upto)));
            }
        }
        Ok(None)
    }

    /// The bytes of the run whose first entry has index `first`.
    #[cfg(test)]
    pub(crate) fn run_bytes(&self, first: u64) -> io::Result<Option<u64>> {
        Ok(self.log.get(&index_key(first))?.map(|run| run.len() as u64))
    }

    /// The first and last index of every run stored, in order.
    #[cfg(test)]
    pub(crate) fn stored_runs(&self) -> io::Result<Vec<(u64, u64)>> {
        let mut runs = Vec::new();
        for item in self.log.range(Bound::Unbounded, Bound::Unbounded)? {
            let (key, run) = item?;
            let first = key_index(&key)?;
            runs.push((first, first + log_run::len(&run)? - 1));
        }
        Ok(runs)
    }
}

/// Removes every run of `log` whose entries all have indexes up to `index`,
/// one run at a time (not in a batch: see the module docs), oldest first, so
/// no hole is ever left; returns how many entries. A run that holds `index`
/// and entries after it stays.
fn remove_up_to(log: &Tree, index: u64) -> io::Result<u64> {
    let mut n_removed = 0;
    for item in log.range(Bound::Unbounded, Bound::Included(&index_key(index)))? {
        let (key, run) = item?;
        let first = key_index(&key)?;
        let last = first + log_run::len(&run)? - 1;
        if last > index {
            break;
        }
        log.remove(&key)?;
        n_removed += last - first + 1;
    }
    Ok(n_removed)
}

/// Removes every key of `tree`, [`REMOVE_ALL_CHUNK_KEYS`] keys at a time.
fn remove_all(tree: &Tree) -> io::Result<()> {
    loop {
        let mut batch = Batch::default();
        let mut n_keys = 0;
        for item in tree.range(Bound::Unbounded, Bound::Unbounded)?.take(REMOVE_ALL_CHUNK_KEYS) {
            batch.remove(item?.0);
            n_keys += 1;
        }
        if n_keys == 0 {
            return Ok(());
        }
        tree.apply_batch(batch)?;
    }
}

/// Converts the log of a store of an earlier version, one entry per key in
/// [`LEGACY_LOG_TREE`], into runs in `log`. The copy is made durable and
/// recorded as done ([`KEY_LEGACY_LOG_COPIED`]) before the old tree is
/// emptied, so a crash at any point leaves a store whose next open either
/// copies again from the start or finishes emptying the old tree.
fn convert_legacy_log(db: &Db, log: &Tree, meta: &Tree) -> io::Result<()> {
    let legacy = db.open_tree(LEGACY_LOG_TREE)?;
    if legacy.range(Bound::Unbounded, Bound::Unbounded)?.next().is_none() {
        return Ok(());
    }
    if meta.get(KEY_LEGACY_LOG_COPIED)?.is_none() {
        // Whatever an interrupted copy left.
        remove_all(log)?;
        let mut run: Vec<IVec> = Vec::new();
        let mut run_first = 0;
        let mut run_bytes = 0;
        let mut n_entries = 0u64;
        for item in legacy.range(Bound::Unbounded, Bound::Unbounded)? {
            let (key, bytes) = item?;
            let index = key_index(&key)?;
            decode_entry_at(index, &bytes)?;
            let follows = index == run_first + run.len() as u64;
            if !run.is_empty() && (!follows || run_bytes + bytes.len() > LOG_RUN_BYTES_MAX) {
                log.insert(&index_key(run_first), log_run::encode(&run))?;
                run.clear();
            }
            if run.is_empty() {
                run_first = index;
                run_bytes = 0;
            }
            run_bytes += bytes.len();
            run.push(bytes);
            n_entries += 1;
        }
        if !run.is_empty() {
            log.insert(&index_key(run_first), log_run::encode(&run))?;
        }
        db.flush_blocking()?;
        meta.insert(KEY_LEGACY_LOG_COPIED, vec![1u8])?;
        db.flush_blocking()?;
        info!(n_entries, "copied the Raft log of an earlier version into runs");
    }
    remove_all(&legacy)?;
    db.flush_blocking()?;
    Ok(())
}

/// Deletes purged entries for [`LogStore::purge`], off the Raft core; a
/// thread that ends with the last store.
fn remover_thread(log: Tree, purges_rx: std::sync::mpsc::Receiver<u64>) {
    while let Ok(mut up_to) = purges_rx.recv() {
        while let Ok(later) = purges_rx.try_recv() {
            up_to = up_to.max(later);
        }
        let started = std::time::Instant::now();
        match remove_up_to(&log, up_to) {
            Ok(n_entries) => {
                let remove_ms = started.elapsed().as_millis() as u64;
                info!(n_entries, up_to, remove_ms, "removed purged log entries");
            }
            // They stay until a later purge or the next start removes them.
            Err(err) => error!(cause = %err, up_to, "cannot remove purged log entries"),
        }
    }
    info!("log remover stopped");
}

/// Completes append callbacks only after a flush that covers them; a task.
async fn flush_loop(
    db: Db,
    mut flush_rx: mpsc::Receiver<IOFlushed<TypeConfig>>,
    durations: Arc<DurationHistogram>,
) {
    let mut waiting = Vec::new();
    while let Some(callback) = flush_rx.recv().await {
        waiting.push(callback);
        while let Ok(callback) = flush_rx.try_recv() {
            waiting.push(callback);
        }
        let started = tokio::time::Instant::now();
        let result = db.flush().await;
        durations.observe(started.elapsed());
        complete(&mut waiting, result);
    }
    info!("log flusher stopped");
}

/// [`flush_loop`] on a thread of its own, with sled's blocking flush.
fn flush_thread(
    db: Db,
    mut flush_rx: mpsc::Receiver<IOFlushed<TypeConfig>>,
    durations: &DurationHistogram,
) {
    let mut waiting = Vec::new();
    while let Some(callback) = flush_rx.blocking_recv() {
        waiting.push(callback);
        while let Ok(callback) = flush_rx.try_recv() {
            waiting.push(callback);
        }
        let started = std::time::Instant::now();
        let result = db.flush_blocking();
        let elapsed = started.elapsed();
        durations.observe(elapsed);
        let flush_ms = elapsed.as_millis() as u64;
        if flush_ms >= SLOW_FLUSH_MS {
            warn!(flush_ms, n_appends = waiting.len(), "a slow flush of the Raft log");
        }
        complete(&mut waiting, result);
    }
    info!("log flusher stopped");
}

/// A flush at least this long is logged: until it ends, this node
/// acknowledges nothing it was sent, heartbeats included, so a leader's
/// majority may fall silent (`raft.quorum_silence_ms_max`).
const SLOW_FLUSH_MS: u64 = 200;

/// Completes every waiting callback with the result of the flush after them.
fn complete(waiting: &mut Vec<IOFlushed<TypeConfig>>, result: io::Result<()>) {
    if let Err(err) = &result {
        error!(cause = %err, "flushing the Raft log failed");
    }
    for callback in waiting.drain(..) {
        callback.io_completed(
            result.as_ref().map(|_| ()).map_err(|err| io::Error::new(err.kind(), err.to_string())),
        );
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> io::Result<u64> {
    Ok(u64::from_be_bytes(key.try_into().map_err(|_| io::Error::other("bad log key"))?))
}

/// Decodes the entry stored as the one with index `index`, and checks that
/// it is.
fn decode_entry_at(index: u64, bytes: &[u8]) -> io::Result<Entry> {
    let entry: Entry = codec::decode("Raft log entry", bytes).map_err(io::Error::other)?;
    if entry.log_id.index() != index {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the log entry stored as index {index} has index {}", entry.log_id.index()),
        ));
    }
    Ok(entry)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(index) => *index,
            Bound::Excluded(index) => index.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let start = start.max(self.unpurged_from.load(Ordering::Relaxed));
        // The run that holds `start` begins at or before it.
        let from_key = match self.log.last_at_or_before(&index_key(start))? {
            Some((key, run)) if key_index(&key)? + log_run::len(&run)? > start => key_index(&key)?,
            _ => start,
        };
        let mut entries = Vec::new();
        let mut next_run_first = None;
        for item in self.log.range(Bound::Included(&index_key(from_key)), Bound::Unbounded)? {
            let (key, run) = item?;
            let first = key_index(&key)?;
            if next_run_first.is_some_and(|expected| expected != first) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the Raft log has a gap before index {first}"),
                ));
            }
            let run = log_run::entries(&run)?;
            for (offset, bytes) in run.iter().enumerate() {
                let index = first + offset as u64;
                if index < start {
                    continue;
                }
                if !range.contains(&index) {
                    return Ok(entries);
                }
                entries.push(decode_entry_at(index, bytes)?);
            }
            next_run_first = Some(first + run.len() as u64);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.read_meta(KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.read_meta(KEY_LAST_PURGED)?;
        let last_log_id = self.last_entry_log_id()?.max(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.meta.insert(KEY_VOTE, codec::encode(vote))?;
        self.db.flush().await?;
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not flushed on purpose: losing it only means re-applying from the
        // state machine's own last_applied, which is always safe.
        match committed {
            Some(log_id) => self.meta.insert(KEY_COMMITTED, codec::encode(&log_id))?,
            None => self.meta.remove(KEY_COMMITTED)?,
        };
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.read_meta(KEY_COMMITTED)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        let mut first_index = None;
        let mut n_bytes = 0u64;
        for entry in entries {
            if let EntryPayload::Membership(_) = &entry.payload {
                info!(log_id = %entry.log_id, "appending a membership entry");
            }
            let index = entry.log_id.index();
            let first = *first_index.get_or_insert(index);
            if index != first + encoded.len() as u64 {
                return Err(io::Error::other(format!(
                    "appended entries are not consecutive: index {index} after {first}"
                )));
            }
            let bytes = codec::encode(&entry);
            n_bytes += bytes.len() as u64;
            encoded.push(bytes);
        }
        if let Some(first) = first_index {
            // openraft truncates a conflicting tail before it appends.
            if let Some(last) = self.last_stored_index()?
                && first <= last
            {
                return Err(io::Error::other(format!(
                    "an append from index {first} overlaps the stored log, which ends at {last}"
                )));
            }
            let runs = log_run::split(&encoded, LOG_RUN_BYTES_MAX);
            if let [run] = runs[..] {
                self.log.insert(&index_key(first), log_run::encode(run))?;
            } else {
                // Rare (appends of more than LOG_RUN_BYTES_MAX): a sled batch,
                // all or nothing.
                let mut batch = Batch::default();
                let mut run_first = first;
                for run in runs {
                    batch.insert(&index_key(run_first)[..], log_run::encode(run));
                    run_first += run.len() as u64;
                }
                self.log.apply_batch(batch)?;
            }
        }
        self.appended.add(n_bytes);
        if self.flush_tx.send(callback).await.is_err() {
            return Err(io::Error::other("the log flusher has stopped"));
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |log_id| log_id.index() + 1);
        // Delete from the tail backwards so no hole is ever left: the runs
        // that start at `from` or later, then the tail of the run before.
        let keys: Vec<IVec> = self
            .log
            .range(Bound::Included(&index_key(from)), Bound::Unbounded)?
            .map(|item| item.map(|(key, _)| key))
            .collect::<io::Result<_>>()?;
        for key in keys.into_iter().rev() {
            self.log.remove(&key)?;
        }
        if let Some(kept_last) = from.checked_sub(1)
            && let Some((key, run)) = self.log.last_at_or_before(&index_key(kept_last))?
        {
            let first = key_index(&key)?;
            let run = log_run::entries(&run)?;
            let n_kept = (from - first) as usize;
            if n_kept < run.len() {
                self.log.insert(&key, log_run::encode(&run[..n_kept]))?;
            }
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Record the purge point first; `open` finishes the deletion if a
        // crash interrupts it.
        let started = std::time::Instant::now();
        self.meta.insert(KEY_LAST_PURGED, codec::encode(&log_id))?;
        self.db.flush().await?;
        let up_to = log_id.index();
        self.unpurged_from.fetch_max(up_to + 1, Ordering::Relaxed);
        let inline = match &self.purges_tx {
            None => true,
            Some(purges_tx) => match purges_tx.try_send(up_to) {
                Ok(()) => false,
                Err(std::sync::mpsc::TrySendError::Full(_)) => {
                    debug!(up_to, "the log remover is behind; a later purge removes these");
                    false
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => true,
            },
        };
        if inline {
            let n_entries = remove_up_to(&self.log, up_to)?;
            info!(n_entries, up_to, "removed purged log entries");
        }
        info!(up_to, purge_ms = started.elapsed().as_millis() as u64, "purged the log");
        Ok(())
    }
}
