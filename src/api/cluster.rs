//! The `Cluster` service: status, membership changes and leader transfer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::ChangeMembers;
use openraft::type_config::async_runtime::WatchReceiver;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::api::error::ApiError;
use crate::api::{Context, Routed};
use crate::proto::taskraft_v1 as pb;
use crate::proto::taskraft_v1::cluster_client::ClusterClient;
use crate::proto::taskraft_v1::cluster_server::Cluster;
use crate::raft::{NodeId, PeerNode};

pub struct ClusterService {
    ctx: Arc<Context>,
}

impl ClusterService {
    pub fn new(ctx: Arc<Context>) -> ClusterService {
        ClusterService { ctx }
    }

    /// This node's own view of itself.
    fn local_info(&self) -> pb::NodeInfo {
        let metrics = self.ctx.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        let voter = membership.voter_ids().any(|id| id == self.ctx.node_id);
        let role = crate::raft::role_name(metrics.state, voter);
        pb::NodeInfo {
            node_id: self.ctx.node_id,
            api_addr: self.ctx.config.api_addr.clone(),
            raft_addr: self.ctx.config.raft_addr.clone(),
            role: role.into(),
            voter,
            term: metrics.current_term,
            leader_id: metrics.current_leader.unwrap_or(0),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            commit_index: metrics.local_committed.map_or(0, |log_id| log_id.index()),
            applied_index: metrics.last_applied.map_or(0, |log_id| log_id.index()),
            executor_slots: self.ctx.config.executor_slots(),
            error: String::new(),
            snapshot_index: metrics.snapshot.map_or(0, |log_id| log_id.index()),
            purged_index: metrics.purged.map_or(0, |log_id| log_id.index()),
        }
    }

    fn members(&self) -> (BTreeMap<NodeId, PeerNode>, BTreeSet<NodeId>) {
        let metrics = self.ctx.raft.metrics();
        let metrics = metrics.borrow_watched();
        let membership = metrics.membership_config.membership();
        let nodes = membership.nodes().map(|(id, node)| (*id, node.clone())).collect();
        (nodes, membership.voter_ids().collect())
    }

    /// Has openraft build a snapshot and waits, within the snapshot timeout,
    /// until one that covers everything applied at the request is on disk.
    async fn build_snapshot(&self) -> Result<pb::SnapshotResponse, ApiError> {
        let started = tokio::time::Instant::now();
        let applied = self.ctx.raft.metrics().borrow_watched().last_applied;
        let Some(applied) = applied else {
            return Err(ApiError::FailedPrecondition("nothing is applied yet".into()));
        };
        self.ctx
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|fatal| ApiError::unavailable(format!("raft has stopped: {fatal}")))?;
        let timeout_ms = self.ctx.config.raft.snapshot_send_timeout_ms;
        let covered = |metrics: &openraft::RaftMetrics<crate::raft::TypeConfig>| {
            metrics.snapshot.as_ref().is_some_and(|snapshot| snapshot.index() >= applied.index())
        };
        let metrics = self
            .ctx
            .raft
            .wait(Some(Duration::from_millis(timeout_ms)))
            .metrics(covered, "a snapshot covering the applied log")
            .await
            .map_err(|err| {
                ApiError::DeadlineExceeded(format!("no snapshot within {timeout_ms} ms: {err}"))
            })?;
        let build_ms = started.elapsed().as_millis() as u64;
        let bytes =
            self.ctx.state_machine.snapshot_bytes().map_err(|err| {
                ApiError::Internal(format!("cannot read the snapshot's size: {err}"))
            })?;
        let index = metrics.snapshot.map_or(0, |snapshot| snapshot.index());
        info!(index, bytes, build_ms, "snapshot built on request");
        Ok(pb::SnapshotResponse { node_id: self.ctx.node_id, index, bytes, build_ms })
    }

    /// Every member's own view, asked of it directly, concurrently and with a deadline.
    async fn status(&self) -> pb::StatusResponse {
        let local = self.local_info();
        let (nodes, voters) = self.members();
        let asks = nodes.into_iter().map(|(node_id, node)| {
            let local = local.clone();
            let voter = voters.contains(&node_id);
            async move {
                if node_id == self.ctx.node_id {
                    return local;
                }
                let request = pb::StatusRequest { local_only: true };
                let timeout = Duration::from_millis(self.ctx.config.server.status_timeout_ms);
                let reply = self
                    .ctx
                    .forward_within(&node.api_addr, request, timeout, |channel, req| async move {
                        ClusterClient::new(channel).status(req).await
                    })
                    .await;
                let own = match reply {
                    // Membership as this node knows it: a node that has just
                    // joined may not have applied its own promotion yet.
                    Ok(status) => status
                        .nodes
                        .into_iter()
                        .find(|info| info.node_id == node_id)
                        .map(|info| pb::NodeInfo { voter, ..info })
                        .ok_or_else(|| format!("{} answered without its own entry", node.api_addr)),
                    Err(err) => Err(err.to_string()),
                };
                own.unwrap_or_else(|error| pb::NodeInfo {
                    node_id,
                    api_addr: node.api_addr.clone(),
                    raft_addr: node.raft_addr.clone(),
                    role: "unreachable".into(),
                    voter,
                    error,
                    ..pb::NodeInfo::default()
                })
            }
        });
        let infos = futures::future::join_all(asks).await;
        pb::StatusResponse { leader_id: local.leader_id, term: local.term, nodes: infos }
    }

    async fn wait_for_leader(&self, expected: NodeId) -> Result<(), ApiError> {
        let mut metrics = self.ctx.raft.metrics();
        let wait = async {
            loop {
                if metrics.borrow_and_update().current_leader == Some(expected) {
                    return Ok(());
                }
                if metrics.changed().await.is_err() {
                    return Err(ApiError::unavailable("raft has stopped"));
                }
            }
        };
        tokio::time::timeout(self.ctx.request_timeout(), wait).await.map_err(|_| {
            ApiError::unavailable(format!(
                "node {expected} did not become leader within {} ms",
                self.ctx.config.server.request_timeout_ms
            ))
        })?
    }
}

fn membership_error<E: std::fmt::Display>(
    err: openraft::error::RaftError<crate::raft::TypeConfig, E>,
) -> ApiError {
    ApiError::FailedPrecondition(format!("membership change failed: {err}"))
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let message = request.get_ref();
        let (node_id, draining) = (message.node_id, message.draining);
        if !self.members().0.contains_key(&node_id) {
            return Err(ApiError::NotFound(format!("node {node_id} is not a member")).into());
        }
        if let Routed::Forwarded(reply) = self
            .ctx
            .to_leader(request, |channel, req| async move {
                ClusterClient::new(channel).drain(req).await
            })
            .await?
        {
            return Ok(Response::new(reply));
        }
        match self
            .ctx
            .write(crate::scheduler::Command::SetDraining { node: node_id, draining })
            .await?
        {
            crate::scheduler::Response::Rejected(rejection) => {
                Err(ApiError::from(rejection).into())
            }
            _ => {
                info!(node_id, draining, "drain changed");
                Ok(Response::new(pb::DrainResponse { node_id, draining }))
            }
        }
    }

    async fn snapshot(
        &self,
        _request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        Ok(Response::new(self.build_snapshot().await?))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        if request.get_ref().local_only {
            let local = self.local_info();
            return Ok(Response::new(pb::StatusResponse {
                leader_id: local.leader_id,
                term: local.term,
                nodes: vec![local],
            }));
        }
        Ok(Response::new(self.status().await))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::AddNodeResponse>, Status> {
        let message = request.get_ref();
        if message.node_id == 0 {
            return Err(ApiError::InvalidArgument("node ids start at 1".into()).into());
        }
        for addr in [&message.api_addr, &message.raft_addr] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(ApiError::InvalidArgument(format!(
                    "{addr:?} is not an IP:PORT address"
                ))
                .into());
            }
        }
        let request = match self
            .ctx
            .to_leader(request, |channel, req| async move {
                ClusterClient::new(channel).add_node(req).await
            })
            .await?
        {
            Routed::Local(request) => request,
            Routed::Forwarded(reply) => return Ok(Response::new(reply)),
        };
        let message = request.into_inner();
        let node = PeerNode { api_addr: message.api_addr, raft_addr: message.raft_addr };
        info!(node_id = message.node_id, %node, "adding a node as a learner");
        let timeout = self.ctx.request_timeout();
        tokio::time::timeout(timeout, self.ctx.raft.add_learner(message.node_id, node, true))
            .await
            .map_err(|_| {
                ApiError::unavailable("the new node did not catch up in time; it stays a learner")
            })?
            .map_err(membership_error)?;
        info!(node_id = message.node_id, "promoting the node to a voter");
        let ids = BTreeSet::from([message.node_id]);
        tokio::time::timeout(
            timeout,
            self.ctx.raft.change_membership(ChangeMembers::AddVoterIds(ids), false),
        )
        .await
        .map_err(|_| ApiError::unavailable("the promotion did not commit in time"))?
        .map_err(membership_error)?;
        Ok(Response::new(pb::AddNodeResponse { status: Some(self.status().await) }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let node_id = request.get_ref().node_id;
        if !self.members().0.contains_key(&node_id) {
            return Err(ApiError::NotFound(format!("node {node_id} is not a member")).into());
        }
        if let Routed::Forwarded(reply) = self
            .ctx
            .to_leader(request, |channel, req| async move {
                ClusterClient::new(channel).remove_node(req).await
            })
            .await?
        {
            return Ok(Response::new(reply));
        }
        info!(node_id, "removing a node");
        let (_, voters) = self.members();
        let change = if voters.contains(&node_id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
        };
        tokio::time::timeout(
            self.ctx.request_timeout(),
            self.ctx.raft.change_membership(change, false),
        )
        .await
        .map_err(|_| ApiError::unavailable("the removal did not commit in time"))?
        .map_err(membership_error)?;
        Ok(Response::new(pb::RemoveNodeResponse { status: Some(self.status().await) }))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let to = request.get_ref().to_node_id;
        if !self.members().1.contains(&to) {
            return Err(ApiError::InvalidArgument(format!("node {to} is not a voter")).into());
        }
        if let Routed::Forwarded(reply) = self
            .ctx
            .to_leader(request, |channel, req| async move {
                ClusterClient::new(channel).transfer_leader(req).await
            })
            .await?
        {
            return Ok(Response::new(reply));
        }
        if to != self.ctx.node_id {
            info!(to, "transferring leadership");
            self.ctx
                .raft
                .trigger()
                .transfer_leader(to)
                .await
                .map_err(|err| ApiError::unavailable(format!("raft has stopped: {err}")))?;
            self.wait_for_leader(to).await?;
        }
        Ok(Response::new(pb::TransferLeaderResponse { leader_id: to }))
    }
}
