//! taskraft: a highly available task scheduler. Tasks are submitted over gRPC
//! to any node, replicated with Raft (openraft) and kept in sled.
//!
//! # Layout
//! - [`scheduler`]: the pure core: task model, commands, state and `apply`.
//! - [`storage`]: sled log store, state machine store and snapshot files.
//! - [`raft`]: openraft types, the codec and the peer network over gRPC.

pub mod raft;
pub mod scheduler;
pub mod storage;
