//! A disk that can lose power: a file system in memory, mounted with FUSE,
//! that keeps apart what was written and what was made durable, and at a
//! simulated power cut forgets everything that was not.
//!
//! A SIGKILL loses nothing a process wrote, since the kernel keeps the page
//! cache; only a power cut shows whether a program's fsyncs are where they
//! must be. This file system is the model of a disk that tests need for
//! that, in the spirit of LazyFS (Jepsen's), and it is as strict as POSIX
//! allows a file system to be about file contents:
//!
//! - A file's contents are durable up to its last `fsync` or `fdatasync`
//!   on it, and nothing written after that survives a cut: neither the
//!   bytes nor the growth of the file. A `sync_file_range` or a `syncfs`
//!   makes nothing durable (FUSE sends neither to the file system).
//! - Names (creation, rename, unlink, mkdir) are durable at the next
//!   `fsync` of any file or directory, as a journaling file system commits
//!   its metadata in order. A file whose name never became durable is lost
//!   with its contents.
//!
//! [`PowerCutDisk::power_cut`] unmounts the file system, restores every file
//! and directory to what was durable, and mounts it again at the same
//! place. Whoever calls it must first have ended every process that has
//! files open on it, as a power cut would.
//!
//! Everything lives in the test's memory: files may grow to
//! [`FILE_BYTES_MAX`] each, and a removed file stays until the next cut,
//! since a durable name may still lead to it. Meant for tests that write
//! megabytes, not gigabytes.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// The unit in which a file remembers what it held at its last sync.
const PAGE_BYTES: u64 = 4096;
/// The largest file: a write or truncation past it fails with `EFBIG`.
pub const FILE_BYTES_MAX: u64 = 1 << 30;

/// What a power cut took away.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Lost {
    /// Pages of files that survived, restored to what they held at their last sync.
    pub pages_restored: u64,
    /// Bytes cut from the ends of files that had grown since their last sync.
    pub bytes_truncated: u64,
    /// Files and directories whose names had not become durable.
    pub inodes_lost: u64,
}

impl Lost {
    /// True when the cut changed nothing.
    pub fn is_nothing(&self) -> bool {
        *self == Lost::default()
    }
}

/// A mounted [`PowerCutDisk`] file system. Unmounted when dropped.
pub struct PowerCutDisk {
    mount_dir: PathBuf,
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
}

impl PowerCutDisk {
    /// Mounts a new, empty file system on `mount_dir`, an existing empty
    /// directory. Needs `/dev/fuse` and the right to mount (root, or
    /// `fusermount3`).
    pub fn mount(mount_dir: &Path) -> anyhow::Result<PowerCutDisk> {
        let state = Arc::new(Mutex::new(State::new()));
        let session = mount_session(mount_dir, &state)?;
        Ok(PowerCutDisk { mount_dir: mount_dir.to_path_buf(), state, session: Some(session) })
    }

    /// Where the file system is mounted.
    pub fn path(&self) -> &Path {
        &self.mount_dir
    }

    /// Cuts the power: unmounts, forgets everything not made durable, and
    /// mounts again. Every process with files open here must have ended.
    pub fn power_cut(&mut self) -> anyhow::Result<Lost> {
        if let Some(session) = self.session.take() {
            session
                .umount_and_join()
                .with_context(|| format!("cannot unmount {}", self.mount_dir.display()))?;
        }
        let lost = lock(&self.state).power_cut();
        self.session = Some(mount_session(&self.mount_dir, &self.state)?);
        Ok(lost)
    }
}

impl Drop for PowerCutDisk {
    fn drop(&mut self) {
        if let Some(session) = self.session.take()
            && let Err(err) = session.umount_and_join()
        {
            eprintln!("cannot unmount {}: {err}", self.mount_dir.display());
        }
    }
}

fn mount_session(mount_dir: &Path, state: &Arc<Mutex<State>>) -> anyhow::Result<BackgroundSession> {
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("taskraft-power-cut".into())];
    fuser::spawn_mount(PowerCutFs { state: Arc::clone(state) }, mount_dir, &config)
        .with_context(|| {
            format!(
                "cannot mount a FUSE file system on {} (it needs /dev/fuse, and root or fusermount3)",
                mount_dir.display()
            )
        })
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The contents of a regular file, with what it held at its last sync.
#[derive(Default)]
struct Contents {
    data: Vec<u8>,
    /// The length at the last sync.
    synced_len: u64,
    /// The pages changed since the last sync that lie (partly) below
    /// `synced_len`, each with the bytes it held then, up to `synced_len`.
    synced_pages: BTreeMap<u64, Vec<u8>>,
}

impl Contents {
    /// Remembers the synced bytes of every page in `start..end` before they change.
    fn before_change(&mut self, start: u64, end: u64) {
        let end = end.min(self.synced_len);
        if start >= end {
            return;
        }
        for page in start / PAGE_BYTES..end.div_ceil(PAGE_BYTES) {
            self.synced_pages.entry(page).or_insert_with(|| {
                let from = page * PAGE_BYTES;
                let to = ((page + 1) * PAGE_BYTES).min(self.synced_len).min(self.data.len() as u64);
                self.data.get(from as usize..to as usize).unwrap_or_default().to_vec()
            });
        }
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<(), Errno> {
        let end = offset.checked_add(bytes.len() as u64).ok_or(Errno::EFBIG)?;
        if end > FILE_BYTES_MAX {
            return Err(Errno::EFBIG);
        }
        // A write past the end fills the gap with zeros: that changes it too.
        self.before_change(offset.min(self.data.len() as u64), end);
        if self.data.len() < end as usize {
            self.data.resize(end as usize, 0);
        }
        self.data[offset as usize..end as usize].copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> Result<(), Errno> {
        if len > FILE_BYTES_MAX {
            return Err(Errno::EFBIG);
        }
        let old_len = self.data.len() as u64;
        self.before_change(len.min(old_len), len.max(old_len));
        self.data.resize(len as usize, 0);
        Ok(())
    }

    fn sync(&mut self) {
        self.synced_pages.clear();
        self.synced_len = self.data.len() as u64;
    }

    fn power_cut(&mut self, lost: &mut Lost) {
        for (page, bytes) in std::mem::take(&mut self.synced_pages) {
            let from = (page * PAGE_BYTES) as usize;
            if self.data.len() < from + bytes.len() {
                self.data.resize(from + bytes.len(), 0);
            }
            self.data[from..from + bytes.len()].copy_from_slice(&bytes);
            lost.pages_restored += 1;
        }
        let len = self.data.len() as u64;
        if len > self.synced_len {
            lost.bytes_truncated += len - self.synced_len;
        }
        self.data.resize(self.synced_len as usize, 0);
    }
}

enum Kind {
    File(Contents),
    Dir(BTreeMap<OsString, u64>),
}

struct Inode {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
}

struct State {
    inodes: HashMap<u64, Inode>,
    /// Every directory's entries at the last sync of anything.
    durable_dirs: HashMap<u64, BTreeMap<OsString, u64>>,
    next_ino: u64,
}

const ROOT: u64 = INodeNo::ROOT.0;

impl State {
    fn new() -> State {
        let root = Inode {
            kind: Kind::Dir(BTreeMap::new()),
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: SystemTime::now(),
        };
        State {
            inodes: HashMap::from([(ROOT, root)]),
            durable_dirs: HashMap::from([(ROOT, BTreeMap::new())]),
            next_ino: ROOT + 1,
        }
    }

    /// Makes every directory's entries durable, as a journal commit does.
    fn commit_names(&mut self) {
        self.durable_dirs = self
            .inodes
            .iter()
            .filter_map(|(ino, inode)| match &inode.kind {
                Kind::Dir(entries) => Some((*ino, entries.clone())),
                Kind::File(_) => None,
            })
            .collect();
    }

    fn power_cut(&mut self) -> Lost {
        let mut lost = Lost::default();
        // What is reachable through durable names survives.
        let mut reachable = vec![ROOT];
        let mut survivors = std::collections::HashSet::new();
        while let Some(ino) = reachable.pop() {
            if !survivors.insert(ino) {
                continue;
            }
            if let Some(entries) = self.durable_dirs.get(&ino) {
                reachable.extend(entries.values().copied());
            }
        }
        let before = self.inodes.len() as u64;
        self.inodes.retain(|ino, _| survivors.contains(ino));
        lost.inodes_lost = before - self.inodes.len() as u64;
        for (ino, inode) in &mut self.inodes {
            match &mut inode.kind {
                Kind::File(contents) => contents.power_cut(&mut lost),
                Kind::Dir(entries) => {
                    // A directory made after the last commit but reachable is not possible:
                    // reachability went through durable entries only.
                    *entries = self.durable_dirs.get(ino).cloned().unwrap_or_default();
                }
            }
        }
        lost
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let inode = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        let (kind, size, nlink) = match &inode.kind {
            Kind::File(contents) => (FileType::RegularFile, contents.data.len() as u64, 1),
            Kind::Dir(entries) => (FileType::Directory, 0, 2 + entries.len() as u32),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: inode.mtime,
            mtime: inode.mtime,
            ctime: inode.mtime,
            crtime: inode.mtime,
            kind,
            perm: inode.perm,
            nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev: 0,
            blksize: PAGE_BYTES as u32,
            flags: 0,
        })
    }

    fn dir(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.inodes.get(&ino).ok_or(Errno::ENOENT)?.kind {
            Kind::Dir(entries) => Ok(entries),
            Kind::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?.kind {
            Kind::Dir(entries) => Ok(entries),
            Kind::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn contents_mut(&mut self, ino: u64) -> Result<&mut Contents, Errno> {
        let inode = self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        inode.mtime = SystemTime::now();
        match &mut inode.kind {
            Kind::File(contents) => Ok(contents),
            Kind::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    fn make(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        kind: Kind,
    ) -> Result<FileAttr, Errno> {
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let inode = Inode {
            kind,
            perm: (mode & 0o7777) as u16,
            uid: req.uid(),
            gid: req.gid(),
            mtime: SystemTime::now(),
        };
        self.inodes.insert(ino, inode);
        self.dir_mut(parent)?.insert(name.to_os_string(), ino);
        self.attr(ino)
    }

    fn remove(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        match (&self.inodes.get(&ino).ok_or(Errno::ENOENT)?.kind, want_dir) {
            (Kind::Dir(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            (Kind::Dir(_), false) => return Err(Errno::EISDIR),
            (Kind::File(_), true) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        // The inode stays: a durable name may still lead to it after a cut.
        self.dir_mut(parent)?.remove(name);
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        let ino = self.lookup(parent, name)?;
        if let Ok(existing) = self.lookup(new_parent, new_name) {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            let dir_is_empty = |ino| match self.inodes.get(&ino).map(|inode| &inode.kind) {
                Some(Kind::Dir(entries)) => Some(entries.is_empty()),
                _ => None,
            };
            match (dir_is_empty(ino), dir_is_empty(existing)) {
                (_, Some(false)) => return Err(Errno::ENOTEMPTY),
                (Some(_), None) => return Err(Errno::ENOTDIR),
                (None, Some(_)) => return Err(Errno::EISDIR),
                _ => {}
            }
        }
        self.dir_mut(parent)?.remove(name);
        self.dir_mut(new_parent)?.insert(new_name.to_os_string(), ino);
        Ok(())
    }
}

/// The FUSE side of [`PowerCutDisk`]: every request is answered from the
/// shared [`State`].
struct PowerCutFs {
    state: Arc<Mutex<State>>,
}

/// The kernel is told to cache nothing: every lookup and stat comes here.
const TTL: Duration = Duration::ZERO;

impl PowerCutFs {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn sync(&self, ino: INodeNo, reply: ReplyEmpty) {
        let mut state = self.state();
        if let Some(Inode { kind: Kind::File(contents), .. }) = state.inodes.get_mut(&ino.0) {
            contents.sync();
        }
        state.commit_names();
        reply.ok();
    }
}

impl Filesystem for PowerCutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let state = self.state();
        match state.lookup(parent.0, name).and_then(|ino| state.attr(ino)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.state();
        let result = (|| {
            if let Some(size) = size {
                state.contents_mut(ino.0)?.set_len(size)?;
            }
            let inode = state.inodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?;
            if let Some(mode) = mode {
                inode.perm = (mode & 0o7777) as u16;
            }
            if let Some(uid) = uid {
                inode.uid = uid;
            }
            if let Some(gid) = gid {
                inode.gid = gid;
            }
            state.attr(ino.0)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let dir = Kind::Dir(BTreeMap::new());
        match self.state().make(req, parent.0, name, mode & !umask, dir) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.state().rename(parent.0, name, newparent.0, newname, flags) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state().attr(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(errno) => reply.error(errno),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let state = self.state();
        match &state.inodes.get(&ino.0).map(|inode| &inode.kind) {
            Some(Kind::File(contents)) => {
                let len = contents.data.len() as u64;
                let from = offset.min(len) as usize;
                let to = offset.saturating_add(u64::from(size)).min(len) as usize;
                reply.data(&contents.data[from..to]);
            }
            Some(Kind::Dir(_)) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.state().contents_mut(ino.0) {
            Ok(contents) => match contents.write(offset, data) {
                Ok(()) => reply.written(data.len() as u32),
                Err(errno) => reply.error(errno),
            },
            Err(errno) => reply.error(errno),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let state = self.state();
        let entries = match state.dir(ino.0) {
            Ok(entries) => entries,
            Err(errno) => return reply.error(errno),
        };
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".")),
            (ino.0, FileType::Directory, OsStr::new("..")),
        ];
        let children = entries.iter().map(|(name, child)| {
            let kind = match state.inodes.get(child).map(|inode| &inode.kind) {
                Some(Kind::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            (*child, kind, name.as_os_str())
        });
        for (index, (child, kind, name)) in
            dots.into_iter().chain(children).enumerate().skip(offset as usize)
        {
            if reply.add(INodeNo(child), index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = 1 << 30;
        reply.statfs(
            blocks,
            blocks,
            blocks,
            1 << 20,
            1 << 20,
            PAGE_BYTES as u32,
            255,
            PAGE_BYTES as u32,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        match self.state().attr(ino.0) {
            Ok(_) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.state();
        let result = match state.lookup(parent.0, name) {
            Ok(_) if flags & libc::O_EXCL != 0 => Err(Errno::EEXIST),
            Ok(ino) => state.attr(ino),
            Err(_) => {
                state.make(req, parent.0, name, mode & !umask, Kind::File(Contents::default()))
            }
        };
        match result {
            Ok(attr) => {
                reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::empty())
            }
            Err(errno) => reply.error(errno),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        match self.state().contents_mut(ino.0) {
            Ok(contents) => {
                let end = offset.saturating_add(length);
                if (contents.data.len() as u64) < end
                    && let Err(errno) = contents.set_len(end)
                {
                    return reply.error(errno);
                }
                reply.ok();
            }
            Err(errno) => reply.error(errno),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(bytes: &[u8]) -> Contents {
        let mut contents = Contents::default();
        contents.write(0, bytes).unwrap();
        contents.sync();
        contents
    }

    #[test]
    fn a_cut_keeps_what_was_synced_and_forgets_the_rest() {
        let mut file = contents(&[1; 10_000]);
        file.write(5_000, &[2; 100]).unwrap();
        file.write(10_000, &[3; 5_000]).unwrap();
        let mut lost = Lost::default();
        file.power_cut(&mut lost);
        assert_eq!(file.data, vec![1; 10_000]);
        assert_eq!(lost, Lost { pages_restored: 1, bytes_truncated: 5_000, inodes_lost: 0 });
    }

    #[test]
    fn a_sync_makes_the_writes_before_it_durable_and_not_those_after() {
        let mut file = contents(b"");
        file.write(0, b"first").unwrap();
        file.sync();
        file.write(0, b"secnd").unwrap();
        file.write(8_190, b"across a page").unwrap();
        file.power_cut(&mut Lost::default());
        assert_eq!(file.data, b"first");
    }

    #[test]
    fn a_truncation_and_regrowth_are_undone_by_a_cut() {
        let mut file = contents(&[7; 9_000]);
        file.set_len(100).unwrap();
        file.write(200, &[8; 50]).unwrap();
        file.power_cut(&mut Lost::default());
        assert_eq!(file.data, vec![7; 9_000]);
    }

    #[test]
    fn a_file_cannot_grow_past_its_limit() {
        let mut file = contents(b"kept");
        assert_eq!(file.write(FILE_BYTES_MAX, b"x"), Err(Errno::EFBIG));
        assert_eq!(file.write(u64::MAX, b"x"), Err(Errno::EFBIG));
        assert_eq!(file.set_len(FILE_BYTES_MAX + 1), Err(Errno::EFBIG));
        assert_eq!(file.data, b"kept");
    }

    #[test]
    fn names_are_durable_only_after_a_sync_of_anything() {
        let mut state = State::new();
        let make = |state: &mut State, parent, name: &str, kind| {
            let ino = state.next_ino;
            state.next_ino += 1;
            let inode = Inode { kind, perm: 0o644, uid: 0, gid: 0, mtime: SystemTime::now() };
            state.inodes.insert(ino, inode);
            state.dir_mut(parent).unwrap().insert(name.into(), ino);
            ino
        };
        let dir = make(&mut state, ROOT, "dir", Kind::Dir(BTreeMap::new()));
        let kept = make(&mut state, dir, "kept", Kind::File(contents(b"kept")));
        state.commit_names();
        make(&mut state, dir, "new", Kind::File(contents(b"new")));
        state
            .rename(dir, OsStr::new("kept"), ROOT, OsStr::new("moved"), RenameFlags::empty())
            .unwrap();
        let lost = state.power_cut();
        assert_eq!(lost.inodes_lost, 1, "the file whose name was never committed");
        assert_eq!(state.lookup(dir, OsStr::new("kept")), Ok(kept), "the rename was not committed");
        assert_eq!(state.lookup(ROOT, OsStr::new("moved")), Err(Errno::ENOENT));
        assert_eq!(state.lookup(dir, OsStr::new("new")), Err(Errno::ENOENT));
    }
}
