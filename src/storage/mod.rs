//! Durable storage of one node in one database: the Raft log and Raft
//! metadata ([`log_store`]), the state machine ([`state_machine`]), and
//! snapshot files beside them ([`snapshot`]). The database is sled, or in a
//! simulation an in-memory disk; [`kv`] hides which.
//!
//! **Durability invariant:** openraft's IO callbacks fire only after the data
//! they cover is fsynced, and `save_vote` returns only after its flush. sled's
//! own flush is not an fsync; [`durable`] completes it.

pub mod durable;
pub mod kv;
mod log_run;
pub mod log_store;
pub mod snapshot;
pub mod state_machine;

use std::io;
use std::path::Path;

pub use kv::{Db, MemoryDisk};
pub use log_store::{AppendedBytes, LogStore};
pub use snapshot::SnapshotFile;
pub use state_machine::{EventLimits, StateMachineStore, TaskEvent, TooFarBehind};

/// Where a node keeps its log and state.
#[derive(Clone)]
pub enum Disk {
    /// sled, in the node's data directory.
    Sled,
    /// A simulated disk that outlives the node (see [`kv::MemoryDisk`]).
    Memory(MemoryDisk),
}

impl Disk {
    /// Opens the database of a node whose files live under `data_dir`.
    pub fn open(&self, data_dir: &Path, cache_bytes_max: u64) -> io::Result<Db> {
        match self {
            Disk::Sled => open_db(data_dir, cache_bytes_max),
            Disk::Memory(disk) => Ok(disk.open()),
        }
    }
}

/// Opens (or creates) the sled database of a node under `data_dir`, with its
/// page cache bounded by `cache_bytes_max`.
pub fn open_db(data_dir: &Path, cache_bytes_max: u64) -> io::Result<Db> {
    std::fs::create_dir_all(data_dir)?;
    let sled_dir = data_dir.join("db");
    let db = sled::Config::new()
        .path(&sled_dir)
        .cache_capacity(cache_bytes_max)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|err| {
            io::Error::other(format!("cannot open the database in {}: {err}", data_dir.display()))
        })?;
    Ok(Db::Sled(kv::SledDb::new(db, durable::SledSync::open(&sled_dir)?)))
}

#[cfg(test)]
mod tests;
