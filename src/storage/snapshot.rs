//! Snapshot files: the whole task state at one log index, written durably
//! (temporary file, fsync, rename, fsync of the directory) and checked by a
//! CRC when read back.
//!
//! A snapshot is written out as it is encoded, `WRITEBACK_CHUNK_BYTES` at
//! a time ([`PacedFile`]). On ext4 (data=ordered) an `fdatasync` of the Raft
//! log commits the file system's journal, and a commit first writes every
//! dirty page of files whose blocks the journal already allocated: with a
//! snapshot of a few hundred MiB left for its final fsync, both followers'
//! log flushes once took 900 ms together, and their leader, having heard
//! from no majority for a second, refused writes.
//!
//! Layout: the magic `TRSNAP05`, a little-endian CRC-32 of everything after
//! it, the length of the metadata as a little-endian u64, the postcard-encoded
//! [`SnapshotMeta`], then the postcard-encoded body (meta, tasks, the
//! periodic tasks, then the queue limits). Each task is a `TaskRecord`, its
//! run-at and update times relative to its creation (absolute, each took 6
//! bytes, about 4 % of a pending task of 256 bytes), then the ids of the
//! tasks it runs after. Files of the formats before (`TRSNAP04`, with no
//! tasks to run after, `TRSNAP03`, with no queue limits either, `TRSNAP02`,
//! with no periodic tasks either, and `TRSNAP01`, each task with absolute
//! times) are still read; a node of an earlier version cannot read this one.

use std::borrow::Borrow;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::raft::SnapshotMeta;
use crate::raft::codec;
use crate::scheduler::{
    Attempt, FrozenState, Periodic, State, StateMeta, Task, TaskId, TaskIds, TaskSpec, TaskState,
};

/// The magic of the format written: each task a [`TaskRecord`] and the
/// tasks it runs after, then the periodic tasks, then the queue limits.
const MAGIC: &[u8; 8] = b"TRSNAP05";
/// The magic of the format before, still read: no tasks to run after.
const MAGIC_QUEUE_LIMITS: &[u8; 8] = b"TRSNAP04";
/// The magic of the format before, still read: no queue limits.
const MAGIC_PERIODICS: &[u8; 8] = b"TRSNAP03";
/// The magic of the format before, still read: no periodic tasks.
const MAGIC_TASK_RECORDS: &[u8; 8] = b"TRSNAP02";
/// The magic of the format before, still read: each task a [`TaskAbsolute`].
const MAGIC_TASKS_ABSOLUTE: &[u8; 8] = b"TRSNAP01";
const HEADER_BYTES: u64 = 8 + 4 + 8;
/// The metadata of a snapshot is small; anything larger is a corrupt file.
const META_BYTES_MAX: u64 = 64 * 1024 * 1024;
pub const CURRENT_FILE_NAME: &str = "current.snap";
/// The extension of a snapshot file being written, renamed when complete.
pub const TEMPORARY_EXTENSION: &str = "tmp";
/// The extension of a snapshot file being received from the leader.
pub const INCOMING_EXTENSION: &str = "incoming";

/// A snapshot on disk, held open so that a newer snapshot renamed over its
/// path cannot change what a reader of this one sees.
pub struct SnapshotFile {
    pub path: PathBuf,
    pub file: File,
}

impl fmt::Debug for SnapshotFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotFile({})", self.path.display())
    }
}

/// The buffer between the snapshot encoder and its file.
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// The bytes of a snapshot file that may be written but not yet on their
/// way to disk; see the module docs.
const WRITEBACK_CHUNK_BYTES: u64 = 8 * 1024 * 1024;

/// A file written from the start, whose pages go to disk as it grows: each
/// time a chunk fills, writeback of that chunk starts and the chunk before
/// it is waited for, so at most two chunks are dirty or in flight at once,
/// and the writer goes on while one is written. Snapshots we build and
/// snapshots we receive from the leader are both written through one.
/// Writes may block for as long as a chunk takes to reach the disk.
pub struct PacedFile<F> {
    file: F,
    written_bytes: u64,
    /// Where the chunk not yet handed to writeback starts.
    chunk_start: u64,
}

impl<F: Borrow<File>> PacedFile<F> {
    /// Paces writes to `file`, which must be empty and written from its start.
    pub fn new(file: F) -> PacedFile<F> {
        PacedFile { file, written_bytes: 0, chunk_start: 0 }
    }

    pub fn into_inner(self) -> F {
        self.file
    }

    #[allow(unsafe_code, reason = "sync_file_range(2) on a file this writer holds open")]
    fn sync_range(&self, start: u64, n_bytes: u64, flags: libc::c_uint) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on a descriptor that `self.file` keeps open.
        let rc = unsafe {
            libc::sync_file_range(
                self.file.borrow().as_raw_fd(),
                start as i64,
                n_bytes as i64,
                flags,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl<F: Borrow<File>> Write for PacedFile<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut file: &File = self.file.borrow();
        let n = file.write(buf)?;
        self.written_bytes += n as u64;
        if self.written_bytes - self.chunk_start >= WRITEBACK_CHUNK_BYTES {
            let chunk_bytes = self.written_bytes - self.chunk_start;
            self.sync_range(self.chunk_start, chunk_bytes, libc::SYNC_FILE_RANGE_WRITE)?;
            if let Some(previous) = self.chunk_start.checked_sub(WRITEBACK_CHUNK_BYTES) {
                let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                self.sync_range(previous, self.chunk_start - previous, wait)?;
            }
            self.chunk_start = self.written_bytes;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Passes bytes on to `inner` and keeps their CRC-32.
struct CrcWriter<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Which of the formats a file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Format {
    /// `TRSNAP01`: each task as a [`TaskAbsolute`].
    TasksAbsolute,
    /// `TRSNAP02`: each task as a [`TaskRecord`].
    TaskRecords,
    /// `TRSNAP03`: each task as a [`TaskRecord`], then the periodic tasks.
    TaskRecordsPeriodics,
    /// `TRSNAP04`: as `TRSNAP03`, then the queue limits.
    QueueLimits,
    /// `TRSNAP05`: as `TRSNAP04`, each task's record followed by the tasks
    /// it runs after.
    After,
}

/// A task as `TRSNAP01` holds it: a [`Task`] of the time, with absolute
/// times and no tasks to run after.
#[derive(Serialize, Deserialize)]
struct TaskAbsolute {
    id: TaskId,
    spec: TaskSpec,
    state: TaskState,
    run_at_ms: u64,
    created_at_ms: u64,
    updated_at_ms: u64,
    revision: u64,
    attempts: Vec<Attempt>,
}

impl From<TaskAbsolute> for Task {
    fn from(task: TaskAbsolute) -> Task {
        let TaskAbsolute {
            id,
            spec,
            state,
            run_at_ms,
            created_at_ms,
            updated_at_ms,
            revision,
            attempts,
        } = task;
        Task {
            id,
            spec,
            state,
            run_at_ms,
            created_at_ms,
            updated_at_ms,
            revision,
            attempts,
            after: TaskIds::default(),
        }
    }
}

/// A task as a snapshot holds it: a [`Task`] whose run-at and update times
/// are the wrapping differences from its creation time, which postcard
/// writes in a byte or a few where an absolute time takes 6. Any `u64`
/// times round-trip, in whatever order they are.
#[derive(Serialize)]
struct TaskRecordRef<'a> {
    id: TaskId,
    spec: &'a TaskSpec,
    state: TaskState,
    created_at_ms: u64,
    run_at_from_created_ms: i64,
    updated_at_from_created_ms: i64,
    revision: u64,
    attempts: &'a [Attempt],
}

/// [`TaskRecordRef`] as it decodes, field for field.
#[derive(Deserialize)]
struct TaskRecord {
    id: TaskId,
    spec: TaskSpec,
    state: TaskState,
    created_at_ms: u64,
    run_at_from_created_ms: i64,
    updated_at_from_created_ms: i64,
    revision: u64,
    attempts: Vec<Attempt>,
}

/// The wrapping difference `time_ms - base_ms`, as [`since_base`] undoes it.
fn from_base(time_ms: u64, base_ms: u64) -> i64 {
    time_ms.wrapping_sub(base_ms) as i64
}

fn since_base(difference_ms: i64, base_ms: u64) -> u64 {
    base_ms.wrapping_add(difference_ms as u64)
}

impl<'a> TaskRecordRef<'a> {
    fn of(task: &'a Task) -> TaskRecordRef<'a> {
        TaskRecordRef {
            id: task.id,
            spec: &task.spec,
            state: task.state,
            created_at_ms: task.created_at_ms,
            run_at_from_created_ms: from_base(task.run_at_ms, task.created_at_ms),
            updated_at_from_created_ms: from_base(task.updated_at_ms, task.created_at_ms),
            revision: task.revision,
            attempts: &task.attempts,
        }
    }
}

impl From<TaskRecord> for Task {
    fn from(record: TaskRecord) -> Task {
        Task {
            id: record.id,
            spec: record.spec,
            state: record.state,
            run_at_ms: since_base(record.run_at_from_created_ms, record.created_at_ms),
            created_at_ms: record.created_at_ms,
            updated_at_ms: since_base(record.updated_at_from_created_ms, record.created_at_ms),
            revision: record.revision,
            attempts: record.attempts,
            after: TaskIds::default(),
        }
    }
}

/// Writes everything after the CRC field (the metadata's length, the
/// metadata, then the body as postcard encodes a `Body`: the state's meta,
/// the number of tasks, each task) and returns its CRC-32. One task is
/// encoded at a time, so a million tasks never sit in memory as bytes.
fn write_after_crc<W: Write>(
    format: Format,
    meta: &SnapshotMeta,
    state: &FrozenState,
    out: W,
) -> io::Result<u32> {
    let mut out = CrcWriter { inner: out, hasher: crc32fast::Hasher::new() };
    let meta_bytes = codec::encode(meta);
    out.write_all(&(meta_bytes.len() as u64).to_le_bytes())?;
    out.write_all(&meta_bytes)?;
    out.write_all(&codec::encode(state.meta()))?;
    out.write_all(&codec::encode(&state.n_tasks()))?;
    let mut task_bytes = Vec::new();
    for task in state.tasks() {
        task_bytes.clear();
        match format {
            Format::TaskRecords | Format::TaskRecordsPeriodics | Format::QueueLimits => {
                codec::encode_into(&TaskRecordRef::of(task), &mut task_bytes)
            }
            Format::After => {
                codec::encode_into(&TaskRecordRef::of(task), &mut task_bytes);
                codec::encode_into(&task.after, &mut task_bytes);
            }
            Format::TasksAbsolute => codec::encode_into(
                &TaskAbsolute {
                    id: task.id,
                    spec: task.spec.clone(),
                    state: task.state,
                    run_at_ms: task.run_at_ms,
                    created_at_ms: task.created_at_ms,
                    updated_at_ms: task.updated_at_ms,
                    revision: task.revision,
                    attempts: task.attempts.clone(),
                },
                &mut task_bytes,
            ),
        }
        out.write_all(&task_bytes)?;
    }
    if format >= Format::TaskRecordsPeriodics {
        out.write_all(&codec::encode(&state.periodics().len()))?;
        for periodic in state.periodics() {
            out.write_all(&codec::encode(periodic))?;
        }
    }
    if format >= Format::QueueLimits {
        let limits: Vec<(&str, u32)> = state.queue_limits().collect();
        out.write_all(&codec::encode(&limits))?;
    }
    out.flush()?;
    Ok(out.hasher.finalize())
}

/// Encodes a snapshot of `state` into bytes, as [`write`] writes it; for
/// tests, which check the two agree.
#[cfg(test)]
pub fn encode(meta: &SnapshotMeta, state: &FrozenState) -> Vec<u8> {
    encode_in(Format::After, meta, state)
}

/// Encodes a snapshot in `format`; for tests.
#[cfg(test)]
fn encode_in(format: Format, meta: &SnapshotMeta, state: &FrozenState) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_BYTES as usize);
    bytes.extend_from_slice(match format {
        Format::After => MAGIC,
        Format::QueueLimits => MAGIC_QUEUE_LIMITS,
        Format::TaskRecordsPeriodics => MAGIC_PERIODICS,
        Format::TaskRecords => MAGIC_TASK_RECORDS,
        Format::TasksAbsolute => MAGIC_TASKS_ABSOLUTE,
    });
    bytes.extend_from_slice(&[0; 4]);
    let crc =
        write_after_crc(format, meta, state, &mut bytes).expect("writing to memory cannot fail");
    bytes[8..12].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// Writes a snapshot of `state` durably as `dir/name`, replacing any file of
/// that name, encoding as it goes: seconds of CPU for a million tasks, so
/// it runs on a blocking thread, from a [`FrozenState`] taken under the
/// state lock, not under the lock.
pub fn write(
    dir: &Path,
    name: &str,
    meta: &SnapshotMeta,
    state: &FrozenState,
) -> io::Result<SnapshotFile> {
    let path = dir.join(name);
    let tmp_path = dir.join(format!("{name}.{TEMPORARY_EXTENSION}"));
    {
        let tmp = File::create(&tmp_path)?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, PacedFile::new(&tmp));
        out.write_all(MAGIC)?;
        out.write_all(&[0; 4])?;
        let crc = write_after_crc(Format::After, meta, state, &mut out)?;
        out.flush()?;
        drop(out);
        tmp.write_all_at(&crc.to_le_bytes(), MAGIC.len() as u64)?;
        tmp.sync_all()?;
    }
    fs::rename(&tmp_path, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(SnapshotFile { file: File::open(&path)?, path })
}

/// Moves a received snapshot file into place as the current snapshot.
pub fn make_current(dir: &Path, received: SnapshotFile) -> io::Result<SnapshotFile> {
    let path = dir.join(CURRENT_FILE_NAME);
    if received.path != path {
        received.file.sync_all()?;
        fs::rename(&received.path, &path)?;
        File::open(dir)?.sync_all()?;
    }
    Ok(SnapshotFile { file: received.file, path })
}

/// Opens the current snapshot of `dir`, if there is one.
pub fn open_current(dir: &Path) -> io::Result<Option<SnapshotFile>> {
    let path = dir.join(CURRENT_FILE_NAME);
    match File::open(&path) {
        Ok(file) => Ok(Some(SnapshotFile { file, path })),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Reads only the metadata of a snapshot file.
pub fn read_meta(file: &mut File) -> io::Result<SnapshotMeta> {
    file.seek(SeekFrom::Start(0))?;
    let mut header = [0u8; HEADER_BYTES as usize];
    file.read_exact(&mut header).map_err(|err| corrupt(format!("short header: {err}")))?;
    let (_, meta_len) = check_header(&header, file.metadata()?.len())?;
    let mut meta_bytes = vec![0u8; meta_len as usize];
    file.read_exact(&mut meta_bytes)?;
    codec::decode("snapshot metadata", &meta_bytes).map_err(|err| corrupt(err.to_string()))
}

/// Reads and checks a whole snapshot file.
pub fn read_all(file: &mut File) -> io::Result<(SnapshotMeta, State)> {
    file.seek(SeekFrom::Start(0))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    decode(&bytes)
}

/// Checks and decodes the bytes of a snapshot file.
pub fn decode(bytes: &[u8]) -> io::Result<(SnapshotMeta, State)> {
    if bytes.len() < HEADER_BYTES as usize {
        return Err(corrupt(format!("{} bytes is shorter than the header", bytes.len())));
    }
    let (format, meta_len) = check_header(&bytes[..HEADER_BYTES as usize], bytes.len() as u64)?;
    let meta_len = meta_len as usize;
    let crc_stored = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let crc_actual = crc32fast::hash(&bytes[12..]);
    if crc_stored != crc_actual {
        return Err(corrupt(format!(
            "checksum {crc_actual:08x} does not match the stored {crc_stored:08x}"
        )));
    }
    let meta_end = HEADER_BYTES as usize + meta_len;
    let meta: SnapshotMeta =
        codec::decode("snapshot metadata", &bytes[HEADER_BYTES as usize..meta_end])
            .map_err(|err| corrupt(err.to_string()))?;
    let state = decode_body(format, &bytes[meta_end..])?;
    Ok((meta, state))
}

/// Decodes the body (the state's meta, the number of tasks, each task) one
/// task at a time straight into the state: a million tasks never sit in a
/// vector of their own on the way.
fn decode_body(format: Format, bytes: &[u8]) -> io::Result<State> {
    let bad = |err: codec::DecodeError| corrupt(err.to_string());
    let (state_meta, rest): (StateMeta, _) =
        codec::decode_prefix("snapshot state meta", bytes).map_err(bad)?;
    let (n_tasks, mut rest): (usize, _) =
        codec::decode_prefix("snapshot task count", rest).map_err(bad)?;
    let mut failure = None;
    let mut n_decoded = 0;
    let tasks = std::iter::from_fn(|| {
        if n_decoded == n_tasks || failure.is_some() {
            return None;
        }
        let decoded = match format {
            Format::TasksAbsolute => codec::decode_prefix::<TaskAbsolute>("snapshot task", rest)
                .map(|(task, after)| (Task::from(task), after)),
            Format::TaskRecords | Format::TaskRecordsPeriodics | Format::QueueLimits => {
                codec::decode_prefix::<TaskRecord>("snapshot task", rest)
                    .map(|(record, after)| (Task::from(record), after))
            }
            Format::After => codec::decode_prefix::<TaskRecord>("snapshot task", rest).and_then(
                |(record, rest)| {
                    let (after, rest): (TaskIds, _) =
                        codec::decode_prefix("snapshot task's after", rest)?;
                    Ok((Task { after, ..Task::from(record) }, rest))
                },
            ),
        };
        match decoded {
            Ok((task, after)) => {
                rest = after;
                n_decoded += 1;
                Some(task)
            }
            Err(err) => {
                failure = Some(bad(err));
                None
            }
        }
    });
    let state = State::from_parts(state_meta, tasks).map_err(corrupt);
    if let Some(failure) = failure {
        return Err(failure);
    }
    let mut state = state?;
    if format >= Format::TaskRecordsPeriodics {
        let (n_periodics, mut after): (usize, _) =
            codec::decode_prefix("snapshot periodic task count", rest).map_err(bad)?;
        let mut periodics = Vec::new();
        for _ in 0..n_periodics {
            let (periodic, next): (Periodic, _) =
                codec::decode_prefix("snapshot periodic task", after).map_err(bad)?;
            periodics.push(periodic);
            after = next;
        }
        state = state.with_periodics(periodics).map_err(corrupt)?;
        rest = after;
    }
    if format >= Format::QueueLimits {
        let (limits, after): (Vec<(String, u32)>, _) =
            codec::decode_prefix("snapshot queue limits", rest).map_err(bad)?;
        state = state.with_queue_limits(limits).map_err(corrupt)?;
        rest = after;
    }
    if !rest.is_empty() {
        return Err(corrupt(format!("{} bytes follow the last task", rest.len())));
    }
    Ok(state)
}

/// Checks a file's header against its length: its format and the length
/// of its metadata.
fn check_header(header: &[u8], file_len: u64) -> io::Result<(Format, u64)> {
    let format = match &header[..8] {
        magic if magic == MAGIC => Format::After,
        magic if magic == MAGIC_QUEUE_LIMITS => Format::QueueLimits,
        magic if magic == MAGIC_PERIODICS => Format::TaskRecordsPeriodics,
        magic if magic == MAGIC_TASK_RECORDS => Format::TaskRecords,
        magic if magic == MAGIC_TASKS_ABSOLUTE => Format::TasksAbsolute,
        _ => return Err(corrupt("it does not start with a snapshot magic".into())),
    };
    let meta_len = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
    if meta_len > META_BYTES_MAX || HEADER_BYTES + meta_len > file_len {
        return Err(corrupt(format!(
            "metadata length {meta_len} does not fit a file of {file_len} bytes"
        )));
    }
    Ok((format, meta_len))
}

fn corrupt(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("corrupt snapshot: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{Awaited, Command, Schedule, TaskSpec};

    /// A time of the kind a cluster stamps: milliseconds since 1970, in 2025.
    const NOW_MS: u64 = 1_750_000_000_000;

    /// A state with tasks in it, as a snapshot sees it.
    fn state_with_tasks(n_tasks: usize) -> State {
        let mut state = State::default();
        let specs = (0..n_tasks)
            .map(|idx| {
                let mut spec = TaskSpec::for_test("echo");
                spec.command.args = vec![format!("argument {idx}")].into();
                spec.schedule = Schedule::DelayMs(60_000);
                spec
            })
            .collect();
        let command = Command::SubmitTasks { now_ms: NOW_MS, queued_tasks_max: 1_000, specs };
        state.apply(1, &command);
        assert_eq!(state.n_tasks(), n_tasks);
        state
    }

    #[test]
    fn a_written_snapshot_is_the_encoding_and_decodes_to_the_same_state() {
        let dir = tempfile::TempDir::new().unwrap();
        let state = state_with_tasks(300);
        let meta = SnapshotMeta::default();
        let mut file = write(dir.path(), CURRENT_FILE_NAME, &meta, &state.frozen()).unwrap();
        let on_disk = std::fs::read(&file.path).unwrap();
        assert_eq!(on_disk, encode(&meta, &state.frozen()));
        let (read_meta, read_state) = read_all(&mut file.file).unwrap();
        assert_eq!(read_meta, meta);
        assert_eq!(
            read_state.frozen().tasks().collect::<Vec<_>>(),
            state.frozen().tasks().collect::<Vec<_>>()
        );
        assert_eq!(read_state.meta(), state.meta());
    }

    /// Tasks with every kind of time (run-at before creation, updates after
    /// it and before it, the largest times there are) come back exactly, from
    /// this format and from the one before; this one is the smaller by 8
    /// bytes a task pending for a minute (an absolute time takes 6 bytes).
    #[test]
    fn both_formats_decode_to_the_same_tasks_and_the_current_is_smaller() {
        let pending = state_with_tasks(200);
        let mut tasks: Vec<Task> = pending.frozen().tasks().cloned().collect();
        let times = [(0, 0, 0), (5, 1, 9), (u64::MAX, 0, u64::MAX), (7, u64::MAX, 3)];
        for (task, (run_at_ms, created_at_ms, updated_at_ms)) in tasks.iter_mut().zip(times) {
            task.run_at_ms = run_at_ms;
            task.created_at_ms = created_at_ms;
            task.updated_at_ms = updated_at_ms;
        }
        let state = State::from_parts(pending.meta().clone(), tasks.clone()).unwrap();
        let meta = SnapshotMeta::default();
        let current = encode_in(Format::TaskRecords, &meta, &state.frozen());
        let before = encode_in(Format::TasksAbsolute, &meta, &state.frozen());
        for bytes in [&current, &before] {
            let (_, decoded) = decode(bytes).unwrap();
            assert_eq!(decoded.frozen().tasks().cloned().collect::<Vec<_>>(), tasks);
            assert_eq!(decoded.meta(), state.meta());
        }
        let (_, pending_state) = decode(&encode(&meta, &pending.frozen())).unwrap();
        assert_eq!(
            pending_state.frozen().tasks().collect::<Vec<_>>(),
            pending.frozen().tasks().collect::<Vec<_>>()
        );
        let current = encode_in(Format::TaskRecords, &meta, &pending.frozen());
        let before = encode_in(Format::TasksAbsolute, &meta, &pending.frozen());
        assert!(
            current.len() + 8 * pending.n_tasks() <= before.len(),
            "{} bytes against {} for {} tasks",
            current.len(),
            before.len(),
            pending.n_tasks()
        );
    }

    /// Periodic tasks come back with their cursors and queue limits as they
    /// were, and files of the formats before, which lack them, still read.
    #[test]
    fn periodic_tasks_come_back_from_a_snapshot() {
        use crate::scheduler::{Cadence, CronExpr, Overlap};
        let mut state = state_with_tasks(3);
        for (idx, cadence) in [
            Cadence::Every { period_ms: 60_000 },
            Cadence::Cron(CronExpr::parse("*/5 9-17 * * MON-FRI").unwrap()),
        ]
        .into_iter()
        .enumerate()
        {
            let put = Command::PutPeriodic {
                now_ms: NOW_MS,
                periodic_tasks_max: 10,
                name: format!("p{idx}"),
                cadence,
                overlap: Overlap::Forbid,
                spec: TaskSpec::for_test("report"),
            };
            state.apply(2 + idx as u64, &put);
        }
        let fire = Command::FirePeriodic { now_ms: NOW_MS + 60_000, queued_tasks_max: 100 };
        state.apply(4, &fire);
        for (revision, queue, running_max) in [(5, "serial", 1), (6, "paused", 0)] {
            let limit =
                Command::SetQueueLimit { queue: queue.into(), running_max: Some(running_max) };
            state.apply(revision, &limit);
        }
        assert_eq!(state.n_tasks(), 4);
        let meta = SnapshotMeta::default();
        let (_, decoded) = decode(&encode(&meta, &state.frozen())).unwrap();
        assert!(decoded.periodics().eq(state.periodics()));
        assert_eq!(decoded.next_periodic_fire_ms(), state.next_periodic_fire_ms());
        assert_eq!(decoded.queue_limits().collect::<Vec<_>>(), [("paused", 0), ("serial", 1)]);
        decoded.check_invariants().unwrap();
        let (_, before) =
            decode(&encode_in(Format::TaskRecordsPeriodics, &meta, &state.frozen())).unwrap();
        assert!(before.periodics().eq(state.periodics()));
        assert_eq!(before.queue_limits().len(), 0);
        let (_, before) = decode(&encode_in(Format::TaskRecords, &meta, &state.frozen())).unwrap();
        assert_eq!(before.n_periodics(), 0);
        assert_eq!(before.n_tasks(), 4);
    }

    /// Tasks that run after others come back with their lists and WAITING
    /// state, their waiting index rebuilt; the format before, which has no
    /// such lists, still reads (tasks without them).
    #[test]
    fn tasks_to_run_after_come_back_from_a_snapshot() {
        let mut state = state_with_tasks(3);
        let after = Command::SubmitAfter {
            now_ms: NOW_MS,
            queued_tasks_max: 100,
            specs: vec![TaskSpec::for_test("then"), TaskSpec::for_test("finally")],
            after: vec![
                vec![Awaited::Task(TaskId(0)), Awaited::Task(TaskId(2))],
                vec![Awaited::Task(TaskId(1))],
            ],
        };
        state.apply(2, &after);
        assert_eq!(state.n_tasks_in(TaskState::Waiting), 2);
        let meta = SnapshotMeta::default();
        let (_, decoded) = decode(&encode(&meta, &state.frozen())).unwrap();
        decoded.check_invariants().unwrap();
        assert_eq!(
            decoded.frozen().tasks().collect::<Vec<_>>(),
            state.frozen().tasks().collect::<Vec<_>>()
        );
        assert_eq!(&*decoded.task(TaskId(3)).unwrap().after, &[TaskId(0), TaskId(2)]);
        // Cancelling what the rebuilt state waits for cancels the waiting
        // task there too: the index came back.
        let mut decoded = decoded;
        let applied = decoded.apply(3, &Command::CancelTask { now_ms: NOW_MS, id: TaskId(1) });
        assert_eq!(applied.changed, [TaskId(1), TaskId(4)]);
        let without = state_with_tasks(3);
        let (_, before) =
            decode(&encode_in(Format::QueueLimits, &meta, &without.frozen())).unwrap();
        assert_eq!(before.n_tasks(), 3);
    }

    /// Bytes written through a paced file past several chunks read back
    /// whole and in order.
    #[test]
    fn a_paced_file_holds_every_byte_written_through_it() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("paced");
        let file = File::create(&path).unwrap();
        let n_bytes = 3 * WRITEBACK_CHUNK_BYTES as usize + 12_345;
        let written: Vec<u8> = (0..n_bytes).map(|i| (i % 251) as u8).collect();
        let mut out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, PacedFile::new(&file));
        for piece in written.chunks(100_003) {
            out.write_all(piece).unwrap();
        }
        out.flush().unwrap();
        drop(out);
        assert_eq!(fs::read(&path).unwrap(), written);
    }

    #[test]
    fn corrupt_bytes_give_an_error_not_a_panic() {
        let meta = SnapshotMeta::default();
        let bytes = encode(&meta, &State::default().frozen());
        assert!(decode(&bytes).is_ok());
        for cut in [0, 5, 12, 19, bytes.len() - 1] {
            let err = decode(&bytes[..cut]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "cut at {cut}: {err}");
        }
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 0xff;
        assert!(decode(&flipped).unwrap_err().to_string().contains("checksum"));
        let mut bad_len = bytes;
        bad_len[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&bad_len).unwrap_err().to_string().contains("metadata length"));
    }

    /// A body that is wrong although its checksum is right (written by a
    /// broken node, say) is refused too: short, or with bytes to spare.
    #[test]
    fn a_body_with_a_right_checksum_and_wrong_tasks_is_refused() {
        let bytes = encode(&SnapshotMeta::default(), &state_with_tasks(3).frozen());
        let with_crc = |mut bytes: Vec<u8>| {
            let crc = crc32fast::hash(&bytes[12..]);
            bytes[8..12].copy_from_slice(&crc.to_le_bytes());
            bytes
        };
        assert!(decode(&with_crc(bytes.clone())).is_ok());
        for cut in [1, 10, 40] {
            let short = with_crc(bytes[..bytes.len() - cut].to_vec());
            let err = decode(&short).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "cut {cut}: {err}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode(&with_crc(long)).unwrap_err().to_string().contains("follow the last task"));
    }
}
