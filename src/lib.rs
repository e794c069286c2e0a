//! taskraft: a highly available task scheduler. Tasks are submitted over gRPC
//! to any node, replicated with Raft (openraft) and kept in sled.
//!
//! # Layout
//! - [`scheduler`]: the pure core: task model, commands, state and `apply`.
//! - [`storage`]: sled log store, state machine store and snapshot files.
//! - [`raft`]: openraft types, the codec and the peer network over gRPC.
//! - [`api`]: the client gRPC services, forwarding and error mapping.
//! - [`executor`]: runs the attempts assigned to this node.
//! - [`leader`]: the leader's scheduling loop and the endpoint executors report to.
//! - [`metrics`]: the node's Prometheus metrics over HTTP.
//! - [`node`]: wiring one node together and shutting it down.
//! - [`platform`]: what a node takes by injection: network, clock, disk, task runner.
//! - [`config`]: the node configuration and its limits.
//! - [`client`]: the client used by the CLI and the tests.
//! - [`proto`]: generated protobuf code, used only at the edges.

pub mod api;
pub mod client;
pub mod config;
pub mod executor;
pub mod leader;
pub mod metrics;
pub mod node;
pub mod platform;
pub mod proto;
pub mod raft;
pub mod scheduler;
pub mod storage;
#[cfg(test)]
mod test_nodes;
