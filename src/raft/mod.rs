//! Raft wiring: the openraft type configuration, the codec for what crosses
//! the wire, and the peer network over gRPC (client side in [`network`],
//! server side in [`service`]).
//!
//! Log entries carry [`crate::scheduler::Command`] as plain serde data; the
//! peer protocol sends openraft's own messages encoded by [`codec`] inside a
//! `bytes` field, so protobuf never reaches the scheduler or the stores.

pub mod codec;
pub mod network;
pub mod runtime;
pub mod service;

use std::fmt;
use std::time::Duration;

use openraft::ServerState;
use openraft::error::{ForwardReason, ForwardToLeader};
use serde::{Deserialize, Serialize};

use crate::scheduler::{Command, Response};
use crate::storage::{SnapshotFile, StateMachineStore};

/// What the cluster knows about each member: where to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    /// The client API address, used to forward writes to the leader.
    pub api_addr: String,
    /// The peer (Raft) address.
    pub raft_addr: String,
}

impl fmt::Display for PeerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "api={} raft={}", self.api_addr, self.raft_addr)
    }
}

openraft::declare_raft_types!(
    /// The openraft type configuration of taskraft.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = PeerNode,
        AsyncRuntime = runtime::SeedableTokio,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig, StateMachineStore>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>;
pub type Membership = openraft::Membership<NodeId, PeerNode>;

/// How long a write that openraft refused for a lapsed leader lease waits
/// before it is proposed again.
pub const LEASE_LAPSE_RETRY_INTERVAL: Duration = Duration::from_millis(10);

/// The name of a node's role, as `Status` and the metrics give it:
/// `leader`, `follower`, `candidate`, `learner` (a follower that is no
/// voter) or `shutdown`.
pub fn role_name(state: ServerState, voter: bool) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Candidate => "candidate",
        ServerState::Follower if voter => "follower",
        ServerState::Follower | ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// Whether openraft refused a write only because this leader has not had an
/// acknowledgement from a majority within its lease (one election timeout).
///
/// The leader still leads and the write was never appended, so proposing it
/// again is safe. On a saturated machine the followers' acknowledgements,
/// which come after their fsyncs, lag by a few hundred milliseconds, and a
/// healthy, busy leader lapses briefly; its callers wait and retry, bounded
/// by their own deadline and by the quorum check, rather than fail the
/// client.
pub fn is_lease_lapse(forward: &ForwardToLeader<TypeConfig>) -> bool {
    matches!(forward.reason, ForwardReason::LeaseExpired)
}
