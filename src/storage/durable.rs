//! What sled's flush leaves undone for a write to survive a power cut.
//!
//! sled 0.34's `Db::flush` writes its buffers with `pwrite` and then calls
//! `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` on the range, not
//! `fsync`. That call writes no metadata (the file grows as sled appends, so
//! its new length may be lost) and does not flush the disk's volatile write
//! cache (its man page says so). A value, or a tree page, larger than a
//! quarter of a segment (about 128 KiB) goes to a file of its own under
//! `blobs/`, written with `write_all` and never synced at all; a batch of a
//! few hundred tasks is such a value, and so is a page of log entries of a
//! batch of a hundred. sled's own periodic `fsync` covers the main file only.
//! A process that crashes loses nothing of this, because the kernel keeps
//! the pages; a machine that loses power may lose what Raft acknowledged.
//! (sled's issues #1452 "Data is not written durably" and #1351, both open.)
//!
//! [`SledSync::sync`] completes a flush, after sled's, under one lock:
//! - it fsyncs every blob file that an inotify watch on `blobs/` saw
//!   written and closed since the last sync, then the directory itself;
//! - if the watch's queue overflowed, or the system gave no watch, it syncs
//!   the whole file system instead (`syncfs`), which covers whatever the
//!   events would have named;
//! - it `fdatasync`s sled's main file, which carries its length and flushes
//!   the disk's write cache.
//!
//! A blob that sled wrote before the flush began was closed before it, so
//! its event is queued by the time `sync` reads the queue. Two flushes that
//! overlap both wait on the lock, so neither returns before the files the
//! other took off the queue are synced. Opening a database syncs the whole
//! file system once, for files a previous run left unsynced.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tracing::{debug, warn};

/// sled's main file, inside its directory.
const SLED_MAIN_FILE: &str = "db";
/// sled's directory of values too large for its log.
const SLED_BLOB_DIR: &str = "blobs";

/// Completes sled's flushes of one database (see the module docs).
pub struct SledSync {
    main_file: File,
    main_path: PathBuf,
    blob_dir: PathBuf,
    /// Held for the whole of a sync; see the module docs.
    blob_watch: Mutex<BlobWatch>,
}

struct BlobWatch {
    /// `None` when the system would not give a watch (each user may hold
    /// only `fs.inotify.max_user_instances`): every sync is then `syncfs`.
    inotify: Option<Inotify>,
    blob_dir_handle: File,
}

/// What one [`SledSync::sync`] did beyond the main file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Blob files fsynced one by one.
    pub blob_files: usize,
    /// The watch's queue had overflowed, so the whole file system was synced.
    pub whole_file_system: bool,
}

fn context(err: impl std::fmt::Display, what: &str, path: &Path) -> io::Error {
    io::Error::other(format!("{what} {}: {err}", path.display()))
}

impl SledSync {
    /// Watches the sled database in `sled_dir`, which sled has opened, and
    /// syncs what a previous run may have left unsynced.
    pub fn open(sled_dir: &Path) -> io::Result<SledSync> {
        let main_path = sled_dir.join(SLED_MAIN_FILE);
        let main_file =
            File::open(&main_path).map_err(|err| context(err, "cannot open", &main_path))?;
        let blob_dir = sled_dir.join(SLED_BLOB_DIR);
        std::fs::create_dir_all(&blob_dir)
            .map_err(|err| context(err, "cannot create", &blob_dir))?;
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).and_then(|inotify| {
                let events = AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO;
                inotify.add_watch(&blob_dir, events).map(|_| inotify)
            });
        let inotify = match inotify {
            Ok(inotify) => Some(inotify),
            Err(err) => {
                warn!(
                    cause = %err,
                    "cannot watch sled's blob files; every flush will sync the whole file system"
                );
                None
            }
        };
        let blob_dir_handle =
            File::open(&blob_dir).map_err(|err| context(err, "cannot open", &blob_dir))?;
        // Whatever was written before the watch began.
        nix::unistd::syncfs(&main_file).map_err(|err| context(err, "cannot sync", sled_dir))?;
        Ok(SledSync {
            main_file,
            main_path,
            blob_dir,
            blob_watch: Mutex::new(BlobWatch { inotify, blob_dir_handle }),
        })
    }

    /// Makes durable what sled's flush, just returned, wrote.
    pub fn sync(&self) -> io::Result<Synced> {
        let watch = self
            .blob_watch
            .lock()
            .map_err(|_| io::Error::other("a previous sync panicked; the database is suspect"))?;
        let mut synced = Synced::default();
        let mut names = Vec::new();
        synced.whole_file_system = watch.inotify.is_none();
        while let Some(inotify) = &watch.inotify {
            match inotify.read_events() {
                Ok(events) => {
                    for event in events {
                        if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                            synced.whole_file_system = true;
                        } else if let Some(name) = event.name {
                            names.push(name);
                        }
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(err) => return Err(context(err, "cannot read the watch of", &self.blob_dir)),
            }
        }
        if synced.whole_file_system {
            if watch.inotify.is_some() {
                warn!("the watch of sled's blob files overflowed; syncing the whole file system");
            }
            nix::unistd::syncfs(&watch.blob_dir_handle)
                .map_err(|err| context(err, "cannot sync", &self.blob_dir))?;
        } else {
            for name in &names {
                let path = self.blob_dir.join(name);
                match File::open(&path) {
                    Ok(blob) => {
                        blob.sync_data().map_err(|err| context(err, "cannot sync", &path))?;
                        synced.blob_files += 1;
                    }
                    // Collected by sled since: nothing left to make durable.
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(context(err, "cannot open", &path)),
                }
            }
            if !names.is_empty() {
                watch
                    .blob_dir_handle
                    .sync_all()
                    .map_err(|err| context(err, "cannot sync", &self.blob_dir))?;
            }
        }
        self.main_file.sync_data().map_err(|err| context(err, "cannot sync", &self.main_path))?;
        if synced != Synced::default() {
            debug!(?synced, "synced what sled's flush left unsynced");
        }
        Ok(synced)
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::kv::Db;
    use crate::storage::open_db;

    #[test]
    fn a_flush_syncs_the_blob_files_that_sled_wrote_since_the_last_flush() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path(), 16 * 1024 * 1024).unwrap();
        let Db::Sled(sled) = &db else { unreachable!("open_db opens sled") };
        let tree = db.open_tree("values").unwrap();
        tree.insert(b"small", vec![1u8; 100]).unwrap();
        let synced = sled.flush().unwrap();
        assert_eq!(synced.blob_files, 0, "a small value stays in sled's main file");

        // Larger than a quarter of sled's 512 KiB segment: a blob file.
        tree.insert(b"large", vec![2u8; 1024 * 1024]).unwrap();
        let synced = sled.flush().unwrap();
        let blob_dir = dir.path().join("db").join("blobs");
        let n_blobs = std::fs::read_dir(&blob_dir).unwrap().count();
        assert!(n_blobs >= 1, "sled wrote no blob file; the test no longer tests blobs");
        assert!(synced.blob_files >= 1, "{synced:?}, with {n_blobs} blob files on disk");
        assert!(!synced.whole_file_system);

        let synced = sled.flush().unwrap();
        assert_eq!(synced.blob_files, 0, "each blob is synced once");
    }
}
