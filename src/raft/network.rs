//! Client side of the peer network: openraft's `RaftNetworkV2` over gRPC.
//!
//! There is one tonic `Channel` per peer address, created lazily and reused
//! by every client openraft asks for. Every RPC is bounded by the deadline
//! openraft passes in its `RPCOption`. A peer that cannot be reached maps to
//! `Unreachable`, so openraft backs off; any other failure to `NetworkError`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use tonic::transport::{Channel, Endpoint};
use tracing::debug;

use crate::platform::Network;
use crate::proto::peer_v1::raft_peer_client::RaftPeerClient;
use crate::proto::peer_v1::{RaftMessage, SnapshotChunk};
use crate::raft::codec;
use crate::raft::{NodeId, PeerNode, Snapshot, TypeConfig, Vote};
use crate::storage::{SnapshotFile, kv};

/// How often an HTTP/2 ping checks that a peer still answers.
pub const PEER_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the connection is dropped.
pub const PEER_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// Settings of the peer clients.
#[derive(Debug, Clone)]
pub struct PeerClientConfig {
    pub connect_timeout_ms: u64,
    /// The largest peer message sent or accepted.
    pub message_bytes_max: usize,
    /// The size of one chunk of a snapshot sent to a peer.
    pub snapshot_chunk_bytes: usize,
    /// The longest a whole snapshot transfer may take.
    pub snapshot_send_timeout_ms: u64,
    /// The deadline of an AppendEntries that carries entries (see
    /// `RaftTimings::append_timeout_ms`); never shorter than openraft's.
    pub append_timeout_ms: u64,
}

/// Hands out peer clients that share one channel per peer address.
#[derive(Clone)]
pub struct PeerNetwork {
    config: Arc<PeerClientConfig>,
    network: Arc<dyn Network>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl PeerNetwork {
    pub fn new(config: PeerClientConfig, network: Arc<dyn Network>) -> PeerNetwork {
        PeerNetwork { config: Arc::new(config), network, channels: Arc::default() }
    }

    /// The shared channel to the peer at `raft_addr`, created on first use.
    pub fn channel(&self, raft_addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().expect("channel map lock poisoned");
        if let Some(channel) = channels.get(raft_addr) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{raft_addr}"))
            .map_err(|err| format!("bad peer address {raft_addr:?}: {err}"))?
            .connect_timeout(Duration::from_millis(self.config.connect_timeout_ms))
            // A peer that stopped answering on an open connection (its host
            // froze or vanished without a reset, or bytes were lost) is
            // dropped within two seconds, so the next call reconnects
            // instead of timing out on the dead connection again.
            .http2_keep_alive_interval(PEER_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(PEER_KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = self.network.channel(endpoint);
        channels.insert(raft_addr.to_owned(), channel.clone());
        Ok(channel)
    }
}

/// A client for one peer.
pub struct PeerClient {
    target: NodeId,
    client: Result<RaftPeerClient<Channel>, String>,
    config: Arc<PeerClientConfig>,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> PeerClient {
        let client = self.channel(&node.raft_addr).map(|channel| {
            RaftPeerClient::new(channel)
                .max_decoding_message_size(self.config.message_bytes_max)
                .max_encoding_message_size(self.config.message_bytes_max)
        });
        PeerClient { target, client, config: self.config.clone() }
    }
}

fn status_to_rpc_error(status: tonic::Status) -> RPCError<TypeConfig> {
    match status.code() {
        tonic::Code::Unavailable => {
            RPCError::Unreachable(Unreachable::from_string(status.message()))
        }
        _ => RPCError::Network(NetworkError::from_string(format!(
            "{:?}: {}",
            status.code(),
            status.message()
        ))),
    }
}

fn decode_reply<T: serde::de::DeserializeOwned>(
    what: &'static str,
    reply: Result<tonic::Response<RaftMessage>, tonic::Status>,
) -> Result<T, RPCError<TypeConfig>> {
    let message = reply.map_err(status_to_rpc_error)?.into_inner();
    codec::decode(what, &message.data).map_err(|err| RPCError::Network(NetworkError::new(&err)))
}

impl PeerClient {
    fn client(&self) -> Result<RaftPeerClient<Channel>, RPCError<TypeConfig>> {
        self.client.clone().map_err(|err| RPCError::Unreachable(Unreachable::from_string(err)))
    }

    /// Sends one unary RPC that must be answered within `deadline`.
    async fn unary<Req, Resp, F, Fut>(
        &self,
        what: &'static str,
        request: &Req,
        deadline: Duration,
        call: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        F: FnOnce(RaftPeerClient<Channel>, tonic::Request<RaftMessage>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftMessage>, tonic::Status>>,
    {
        let client = self.client()?;
        let mut grpc_request = tonic::Request::new(RaftMessage { data: codec::encode(request) });
        grpc_request.set_timeout(deadline);
        match tokio::time::timeout(deadline, call(client, grpc_request)).await {
            Ok(reply) => decode_reply(what, reply),
            Err(_) => Err(RPCError::Network(NetworkError::from_string(format!(
                "{what} to node {} timed out after {deadline:?}",
                self.target
            )))),
        }
    }
}

/// How long the follower may take to answer an AppendEntries: at least
/// `append_timeout_ms`, where openraft allows one heartbeat interval.
///
/// A follower answers only once its log is on disk up to the entries it
/// matched, so even an append without entries (one that only advances the
/// commit index) waits for an fsync already under way. On a saturated
/// machine that outlasts one heartbeat interval; the replication stream then
/// fails, restarts and falls further behind. openraft's heartbeat worker
/// puts its own timeout of one interval around each heartbeat, so heartbeats
/// keep their short deadline whatever this returns.
fn append_deadline(option: &RPCOption, append_timeout_ms: u64) -> Duration {
    option.hard_ttl().max(Duration::from_millis(append_timeout_ms))
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let deadline = append_deadline(&option, self.config.append_timeout_ms);
        self.unary("append entries reply", &rpc, deadline, |mut client, request| async move {
            client.append_entries(request).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary("vote reply", &rpc, option.hard_ttl(), |mut client, request| async move {
            client.vote(request).await
        })
        .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary("pre-vote reply", &rpc, option.hard_ttl(), |mut client, request| async move {
            client.pre_vote(request).await
        })
        .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(
            "transfer leader reply",
            &req,
            option.hard_ttl(),
            |mut client, request| async move { client.transfer_leader(request).await },
        )
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client().map_err(|err| match err {
            RPCError::Unreachable(err) => StreamingError::Unreachable(err),
            other => StreamingError::Network(NetworkError::new(&other)),
        })?;
        let header = codec::encode(&(vote, snapshot.meta.clone()));
        let chunk_bytes = self.config.snapshot_chunk_bytes;
        let file = snapshot.snapshot;
        let chunks = kv::blocking(move || snapshot_chunks(header, file, chunk_bytes))
            .await
            .map_err(|err| StreamingError::Network(NetworkError::new(&err)))?;
        let deadline = Duration::from_millis(self.config.snapshot_send_timeout_ms);
        let mut request = tonic::Request::new(futures::stream::iter(chunks));
        request.set_timeout(deadline);
        debug!(target_node = self.target, snapshot = ?snapshot.meta.last_log_id, "sending a snapshot");
        let send = tokio::time::timeout(deadline, client.install_snapshot(request));
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            reply = send => match reply {
                Err(_) => Err(StreamingError::Network(NetworkError::from_string(format!(
                    "snapshot to node {} took longer than {deadline:?}", self.target
                )))),
                Ok(reply) => decode_reply("snapshot reply", reply).map_err(|err| match err {
                    RPCError::Unreachable(err) => StreamingError::Unreachable(err),
                    other => StreamingError::Network(NetworkError::new(&other)),
                }),
            },
        }
    }
}

/// Reads a snapshot file into chunks: the header first, then the bytes.
fn snapshot_chunks(
    header: Vec<u8>,
    mut snapshot: SnapshotFile,
    chunk_bytes: usize,
) -> std::io::Result<Vec<SnapshotChunk>> {
    use std::io::{Read, Seek, SeekFrom};
    snapshot.file.seek(SeekFrom::Start(0))?;
    let mut chunks = vec![SnapshotChunk { header, data: Vec::new() }];
    loop {
        let mut data = Vec::with_capacity(chunk_bytes);
        let n_read = (&mut snapshot.file).take(chunk_bytes as u64).read_to_end(&mut data)?;
        if n_read == 0 {
            return Ok(chunks);
        }
        chunks.push(SnapshotChunk { header: Vec::new(), data });
    }
}
