//! Executor leases, as the leader keeps them: in memory, from heartbeats,
//! measured on the leader's monotonic clock (passed in, never read here).
//!
//! An executor's lease runs `lease_ms` from its last heartbeat. A new leader
//! knows no heartbeats yet, so it gives every node a full lease from the
//! moment it took over before anything it finds running counts as lost.
//! Leases are not replicated: losing them with the leader costs at most one
//! lease period of waiting, never a wrong decision, because the decision
//! itself (`RequeueLost`) goes through the log and is fenced by token.
//!
//! The executor's side of the protocol: it counts its own lease from the
//! moment it *sent* its last acknowledged heartbeat, which is no later than
//! the moment the leader received it, and kills its attempts when that lease
//! runs out. So a partitioned executor stops its attempts no later than the
//! leader declares them lost; `grace_ms` covers clock-rate differences.

use std::collections::BTreeMap;

use crate::scheduler::command::LostAttempt;
use crate::scheduler::state::State;
use crate::scheduler::task::{NodeId, TaskState};

#[derive(Debug, Clone)]
pub struct LeaseTable {
    lease_ms: u64,
    grace_ms: u64,
    /// When this node became leader.
    leader_since_ms: u64,
    /// The last heartbeat of each node.
    renewed_at_ms: BTreeMap<NodeId, u64>,
}

impl LeaseTable {
    pub fn new(leader_since_ms: u64, lease_ms: u64, grace_ms: u64) -> LeaseTable {
        LeaseTable { lease_ms, grace_ms, leader_since_ms, renewed_at_ms: BTreeMap::new() }
    }

    pub fn renew(&mut self, node: NodeId, now_ms: u64) {
        let renewed_at_ms = self.renewed_at_ms.entry(node).or_insert(now_ms);
        *renewed_at_ms = (*renewed_at_ms).max(now_ms);
    }

    /// When the lease of `node` runs out, grace included.
    pub fn expires_at_ms(&self, node: NodeId) -> u64 {
        let since_ms =
            self.renewed_at_ms.get(&node).copied().unwrap_or(0).max(self.leader_since_ms);
        since_ms.saturating_add(self.lease_ms).saturating_add(self.grace_ms)
    }

    pub fn is_live(&self, node: NodeId, now_ms: u64) -> bool {
        now_ms < self.expires_at_ms(node)
    }

    /// The active attempts whose executors' leases have run out, with the
    /// tokens and revisions to fence `RequeueLost` by.
    pub fn lost_attempts(&self, state: &State, now_ms: u64) -> Vec<LostAttempt> {
        state
            .active()
            .filter(|(node, _)| !self.is_live(*node, now_ms))
            .filter(|(_, task)| matches!(task.state, TaskState::Assigned | TaskState::Running))
            .filter_map(|(_, task)| {
                task.attempts.last().map(|attempt| LostAttempt {
                    task: task.id,
                    token: attempt.fencing_token,
                    revision: task.revision,
                })
            })
            .collect()
    }

    /// The earliest moment a lease of a node with active attempts runs out.
    pub fn next_expiry_ms(&self, state: &State) -> Option<u64> {
        state.active().map(|(node, _)| self.expires_at_ms(node)).min()
    }
}
