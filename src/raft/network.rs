//! Client side of the peer network: openraft's `RaftNetworkV2` over gRPC.
//!
//! There is one tonic `Channel` per peer address, created lazily and reused
//! by every client openraft asks for. Every RPC is bounded by the deadline
//! openraft passes in its `RPCOption`. A peer that cannot be reached maps to
//! `Unreachable`, so openraft backs off; any other failure to `NetworkError`.
//!
//! Replication to a follower is a pipeline on one gRPC stream
//! (`StreamAppend`): each AppendEntries goes out without waiting for the
//! answers to those before it, so the follower's fsync of one batch overlaps
//! the sending of the next, and no request pays for a stream of its own. At
//! most `appends_in_flight_max` go unanswered, and an answer overdue by the
//! append deadline fails the stream. A peer that does not know the method (an
//! older version during an upgrade) is sent one request at a time instead.
//!
//! [`PeerAcks`] keeps, per peer, when it last acknowledged this node as
//! leader: the send time of the newest append or heartbeat it answered.
//! Executor leases are renewed only while a majority's is recent (see
//! `leader.rs`). openraft's own `last_quorum_acked` is not exact on a
//! pipeline: an answer is credited with the send time of every later request
//! that ends at the same log id (an entry-less one that carries a commit), so
//! a slow follower's old answer can look younger than it is.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream, StreamExt};

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2, stream_append_sequential};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendError,
    StreamAppendResult, TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

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
    /// AppendEntries sent to one follower and not yet answered.
    pub appends_in_flight_max: usize,
}

/// When each peer last acknowledged this node as leader: the send time of
/// the newest AppendEntries (entries or a heartbeat) that it answered with
/// anything but a higher vote. Shared by every peer client of a node.
#[derive(Debug, Clone, Default)]
pub struct PeerAcks {
    acked_at: Arc<Mutex<HashMap<NodeId, Instant>>>,
}

impl PeerAcks {
    /// `peer` answered a request sent at `sent_at` without refusing our vote.
    pub fn record(&self, peer: NodeId, sent_at: Instant) {
        let mut acked_at = self.acked_at.lock().expect("peer acks lock poisoned");
        let newest = acked_at.entry(peer).or_insert(sent_at);
        *newest = (*newest).max(sent_at);
    }

    /// The latest moment by which a majority of every config in `configs`
    /// (one, or two while membership changes) had acknowledged `me`, which
    /// counts as acknowledging itself at `now`; `None` while some config has
    /// no acknowledged majority.
    pub fn quorum_acked_at(
        &self,
        me: NodeId,
        now: Instant,
        configs: &[BTreeSet<NodeId>],
    ) -> Option<Instant> {
        let acked_at = self.acked_at.lock().expect("peer acks lock poisoned");
        let mut oldest: Option<Instant> = None;
        for voters in configs {
            let mut times: Vec<Instant> = voters
                .iter()
                .filter_map(
                    |voter| if *voter == me { Some(now) } else { acked_at.get(voter).copied() },
                )
                .collect();
            let majority = voters.len() / 2 + 1;
            if times.len() < majority {
                return None;
            }
            times.sort_unstable_by(|a, b| b.cmp(a));
            let acked = times[majority - 1];
            oldest = Some(oldest.map_or(acked, |oldest| oldest.min(acked)));
        }
        oldest
    }
}

/// Hands out peer clients that share one channel per peer address.
#[derive(Clone)]
pub struct PeerNetwork {
    config: Arc<PeerClientConfig>,
    network: Arc<dyn Network>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    acks: PeerAcks,
}

impl PeerNetwork {
    pub fn new(config: PeerClientConfig, network: Arc<dyn Network>, acks: PeerAcks) -> PeerNetwork {
        PeerNetwork { config: Arc::new(config), network, channels: Arc::default(), acks }
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
    /// Cleared when the peer turns out not to know `StreamAppend`.
    peer_streams_appends: bool,
    acks: PeerAcks,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> PeerClient {
        let client = self.channel(&node.raft_addr).map(|channel| {
            RaftPeerClient::new(channel)
                .max_decoding_message_size(self.config.message_bytes_max)
                .max_encoding_message_size(self.config.message_bytes_max)
        });
        PeerClient {
            target,
            client,
            config: self.config.clone(),
            peer_streams_appends: true,
            acks: self.acks.clone(),
        }
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
        let sent_at = Instant::now();
        let answer: AppendEntriesResponse<TypeConfig> = self
            .unary("append entries reply", &rpc, deadline, |mut client, request| async move {
                client.append_entries(request).await
            })
            .await?;
        if !matches!(answer, AppendEntriesResponse::HigherVote(_)) {
            self.acks.record(self.target, sent_at);
        }
        Ok(answer)
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, AppendAnswer>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        if !self.peer_streams_appends {
            return stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            // openraft waits out its backoff after a failure inside the
            // request stream, so the first request is taken before the
            // stream opens: a peer that refuses connections is retried at
            // the backoff's pace, not in a loop of connects.
            let mut input = input;
            let Some(first) = input.next().await else {
                return Ok(futures::stream::empty().boxed());
            };
            let mut client = self.client()?;
            let deadline = append_deadline(&option, self.config.append_timeout_ms);
            let pipeline = Pipeline::new(self.config.appends_in_flight_max, self.acks.clone());
            let requests = pipeline.clone().requests(futures::stream::iter([first]).chain(input));
            match tokio::time::timeout(deadline, client.stream_append(requests)).await {
                Ok(Ok(answers)) => {
                    Ok(pipeline.answers(answers.into_inner(), deadline, self.target))
                }
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                    warn!(
                        target_node = self.target,
                        "the peer does not take streamed appends (an older version?); \
                         sending them one at a time"
                    );
                    self.peer_streams_appends = false;
                    Err(status_to_rpc_error(status))
                }
                Ok(Err(status)) => Err(status_to_rpc_error(status)),
                Err(_) => Err(RPCError::Network(NetworkError::from_string(format!(
                    "opening the append stream to node {} timed out after {deadline:?}",
                    self.target
                )))),
            }
        })
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

/// One answer on an append stream, or why the stream failed.
type AppendAnswer = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;

/// The AppendEntries of one stream that were sent and not yet answered.
#[derive(Clone)]
struct Pipeline {
    /// One permit for each request that may still go out unanswered.
    room: Arc<Semaphore>,
    /// When each unanswered request went out, oldest first.
    sent_at: Arc<Mutex<VecDeque<Instant>>>,
    /// Where an answer's send time is recorded.
    acks: PeerAcks,
}

impl Pipeline {
    fn new(in_flight_max: usize, acks: PeerAcks) -> Pipeline {
        Pipeline {
            room: Arc::new(Semaphore::new(in_flight_max)),
            sent_at: Arc::new(Mutex::new(VecDeque::with_capacity(in_flight_max))),
            acks,
        }
    }

    /// openraft's requests, encoded, each taken only when there is room.
    fn requests<S>(self, input: S) -> impl Stream<Item = RaftMessage> + Send + 'static
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        futures::stream::unfold((input, self), |(mut input, pipeline)| async move {
            let permit = pipeline.room.acquire().await.ok()?;
            let rpc = input.next().await?;
            permit.forget();
            pipeline.sent_at.lock().expect("pipeline lock poisoned").push_back(Instant::now());
            Some((RaftMessage { data: codec::encode(&rpc) }, (input, pipeline)))
        })
    }

    /// The follower's answers, decoded. The stream fails when an answer is
    /// overdue by `deadline` (noticed within twice that), and ends when
    /// the follower ends it.
    fn answers(
        self,
        answers: Streaming<RaftMessage>,
        deadline: Duration,
        target: NodeId,
    ) -> BoxStream<'static, AppendAnswer> {
        let answers = futures::stream::unfold(Some((answers, self)), move |state| async move {
            let (mut answers, pipeline) = state?;
            match pipeline.next_answer(&mut answers, deadline, target).await {
                Ok(Some(answer)) => Some((Ok(answer), Some((answers, pipeline)))),
                Ok(None) => None,
                Err(err) => Some((Err(err), None)),
            }
        });
        Box::pin(answers)
    }

    async fn next_answer(
        &self,
        answers: &mut Streaming<RaftMessage>,
        deadline: Duration,
        target: NodeId,
    ) -> Result<Option<StreamAppendResult<TypeConfig>>, RPCError<TypeConfig>> {
        loop {
            let oldest = self.sent_at.lock().expect("pipeline lock poisoned").front().copied();
            let wait = oldest.map_or(deadline, |sent| {
                (sent + deadline).saturating_duration_since(Instant::now())
            });
            let message = match tokio::time::timeout(wait, answers.message()).await {
                Ok(Ok(Some(message))) => message,
                Ok(Ok(None)) => return Ok(None),
                Ok(Err(status)) => return Err(status_to_rpc_error(status)),
                // Nothing was awaited an answer: the stream is only idle.
                Err(_) if oldest.is_none() => continue,
                Err(_) => {
                    return Err(RPCError::Network(NetworkError::from_string(format!(
                        "an append to node {target} was not answered within {deadline:?}"
                    ))));
                }
            };
            let Some(sent_at) = self.sent_at.lock().expect("pipeline lock poisoned").pop_front()
            else {
                return Err(RPCError::Network(NetworkError::from_string(format!(
                    "node {target} answered an append that was never sent"
                ))));
            };
            self.room.add_permits(1);
            let answer: StreamAppendResult<TypeConfig> =
                codec::decode("append entries answer", &message.data)
                    .map_err(|err| RPCError::Network(NetworkError::new(&err)))?;
            // Answers come in the order the requests went out, so this one
            // answers the request sent at `sent_at`.
            if !matches!(answer, Err(StreamAppendError::HigherVote(_))) {
                self.acks.record(target, sent_at);
            }
            return Ok(Some(answer));
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use openraft::raft::AppendEntriesResponse;
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::platform::{Network, Tcp};
    use crate::proto::peer_v1::raft_peer_server::{RaftPeer, RaftPeerServer};

    /// A follower that counts what it is sent.
    #[derive(Clone, Default)]
    struct FakePeer {
        /// Answers unary appends and refuses `StreamAppend`, as a version
        /// from before it did; otherwise it takes streamed appends and
        /// never answers one, nor ends the stream.
        old_version: bool,
        /// Answers streamed appends in pairs: the first of two only once
        /// the second has arrived.
        answers_in_pairs: bool,
        streamed: Arc<AtomicUsize>,
        unary: Arc<AtomicUsize>,
    }

    fn unimplemented<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    #[tonic::async_trait]
    impl RaftPeer for FakePeer {
        type StreamAppendStream = BoxStream<'static, Result<RaftMessage, Status>>;

        async fn append_entries(
            &self,
            _: tonic::Request<RaftMessage>,
        ) -> Result<Response<RaftMessage>, Status> {
            self.unary.fetch_add(1, Ordering::SeqCst);
            let answer = AppendEntriesResponse::<TypeConfig>::Success;
            Ok(Response::new(RaftMessage { data: codec::encode(&answer) }))
        }

        async fn stream_append(
            &self,
            request: Request<tonic::Streaming<RaftMessage>>,
        ) -> Result<Response<Self::StreamAppendStream>, Status> {
            if self.old_version {
                return unimplemented();
            }
            let streamed = self.streamed.clone();
            let mut incoming = request.into_inner();
            if self.answers_in_pairs {
                let (answer_tx, answer_rx) = tokio::sync::mpsc::channel(8);
                tokio::spawn(async move {
                    let answer = StreamAppendResult::<TypeConfig>::Ok(None);
                    let answer = RaftMessage { data: codec::encode(&answer) };
                    let mut n_held = 0;
                    while let Ok(Some(_)) = incoming.message().await {
                        n_held += 1;
                        if n_held == 2 {
                            for _ in 0..n_held {
                                let _ = answer_tx.send(Ok(answer.clone())).await;
                            }
                            n_held = 0;
                        }
                    }
                });
                let answers = futures::stream::unfold(answer_rx, |mut answer_rx| async move {
                    answer_rx.recv().await.map(|answer| (answer, answer_rx))
                });
                return Ok(Response::new(answers.boxed()));
            }
            let never_answered = async_stream_of(async move {
                while let Ok(Some(_)) = incoming.message().await {
                    streamed.fetch_add(1, Ordering::SeqCst);
                }
                futures::future::pending::<()>().await;
            });
            Ok(Response::new(never_answered))
        }

        async fn vote(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            unimplemented()
        }

        async fn pre_vote(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            unimplemented()
        }

        async fn transfer_leader(
            &self,
            _: Request<RaftMessage>,
        ) -> Result<Response<RaftMessage>, Status> {
            unimplemented()
        }

        async fn install_snapshot(
            &self,
            _: Request<tonic::Streaming<SnapshotChunk>>,
        ) -> Result<Response<RaftMessage>, Status> {
            unimplemented()
        }

        async fn executor(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            unimplemented()
        }
    }

    /// A stream that runs `work` and then ends without an item.
    fn async_stream_of(
        work: impl Future<Output = ()> + Send + 'static,
    ) -> BoxStream<'static, Result<RaftMessage, Status>> {
        futures::stream::once(work).filter_map(|()| async { None }).boxed()
    }

    /// Serves `peer` on a free port; returns a client of it.
    async fn client_of(peer: FakePeer, append_timeout_ms: u64, in_flight_max: usize) -> PeerClient {
        client_with_acks(peer, append_timeout_ms, in_flight_max, PeerAcks::default()).await
    }

    async fn client_with_acks(
        peer: FakePeer,
        append_timeout_ms: u64,
        in_flight_max: usize,
        acks: PeerAcks,
    ) -> PeerClient {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let incoming = Tcp.listen(&addr).await.unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftPeerServer::new(peer))
                .serve_with_incoming(incoming),
        );
        let config = PeerClientConfig {
            connect_timeout_ms: 1_000,
            message_bytes_max: 1024 * 1024,
            snapshot_chunk_bytes: 1024,
            snapshot_send_timeout_ms: 1_000,
            append_timeout_ms,
            appends_in_flight_max: in_flight_max,
        };
        let mut network = PeerNetwork::new(config, Arc::new(Tcp), acks);
        let node = PeerNode { api_addr: String::new(), raft_addr: addr };
        network.new_client(2, &node).await
    }

    fn appends(n: usize) -> impl Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin {
        let append = AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: Vec::new(),
        };
        futures::stream::iter(vec![append; n])
    }

    fn option() -> RPCOption {
        RPCOption::new(Duration::from_millis(50))
    }

    #[tokio::test]
    async fn no_more_appends_than_the_limit_go_out_unanswered() {
        let peer = FakePeer::default();
        let mut client = client_of(peer.clone(), 10_000, 3).await;
        let answers = client.stream_append(appends(10), option()).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(500), answers.collect::<Vec<_>>());
        assert!(waited.await.is_err(), "no answer came");
        assert_eq!(peer.streamed.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_append_left_unanswered_fails_the_stream_within_twice_the_deadline() {
        let mut client = client_of(FakePeer::default(), 200, 8).await;
        let started = Instant::now();
        let mut answers = client.stream_append(appends(1), option()).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(3), answers.next()).await {
            Ok(Some(Err(RPCError::Network(err)))) => {
                assert!(err.to_string().contains("not answered within"), "{err}")
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(1_000), "{elapsed:?}");
    }

    #[tokio::test]
    async fn a_peer_without_streamed_appends_is_sent_them_one_at_a_time() {
        let peer = FakePeer { old_version: true, ..FakePeer::default() };
        let mut client = client_of(peer.clone(), 1_000, 8).await;
        let refused = client.stream_append(appends(2), option()).await.err();
        assert!(refused.is_some(), "the first stream fails on the unknown method");
        let answers = client.stream_append(appends(2), option()).await.unwrap();
        let answers: Vec<_> = answers.collect().await;
        assert_eq!(answers.len(), 2, "{answers:?}");
        assert!(answers.iter().all(|answer| matches!(answer, Ok(Ok(_)))), "{answers:?}");
        assert_eq!(peer.unary.load(Ordering::SeqCst), 2);
        assert_eq!(peer.streamed.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_answer_is_dated_by_the_send_time_of_the_append_it_answers() {
        let peer = FakePeer { answers_in_pairs: true, ..FakePeer::default() };
        let acks = PeerAcks::default();
        let mut client = client_with_acks(peer, 10_000, 8, acks.clone()).await;
        // The second append goes out 300 ms after the first; the follower
        // answers the first only after the second has arrived.
        let (append_tx, append_rx) = tokio::sync::mpsc::channel(2);
        let requests = futures::stream::unfold(append_rx, |mut append_rx| async move {
            append_rx.recv().await.map(|append| (append, append_rx))
        });
        let mut two = appends(2);
        let started = Instant::now();
        append_tx.send(two.next().await.unwrap()).await.unwrap();
        let mut answers = client.stream_append(Box::pin(requests), option()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        append_tx.send(two.next().await.unwrap()).await.unwrap();
        let voters = [BTreeSet::from([1, 2])];
        assert!(matches!(answers.next().await, Some(Ok(Ok(_)))));
        let now = Instant::now();
        let first = acks.quorum_acked_at(1, now, &voters).expect("node 2 acknowledged");
        assert!(first - started < Duration::from_millis(100), "{:?}", first - started);
        assert!(matches!(answers.next().await, Some(Ok(Ok(_)))));
        let second = acks.quorum_acked_at(1, Instant::now(), &voters).expect("node 2 acknowledged");
        assert!(second - started >= Duration::from_millis(300), "{:?}", second - started);
    }

    #[test]
    fn a_quorum_is_acknowledged_as_of_its_majority_th_newest_member() {
        let acks = PeerAcks::default();
        let now = Instant::now();
        let ago = |ms| now - Duration::from_millis(ms);
        let voters = BTreeSet::from([1, 2, 3]);
        assert_eq!(acks.quorum_acked_at(1, now, std::slice::from_ref(&voters)), None);
        acks.record(3, ago(500));
        assert_eq!(acks.quorum_acked_at(1, now, std::slice::from_ref(&voters)), Some(ago(500)));
        acks.record(2, ago(100));
        acks.record(2, ago(900)); // an older answer that arrived late changes nothing
        assert_eq!(acks.quorum_acked_at(1, now, std::slice::from_ref(&voters)), Some(ago(100)));
        // Not a voter itself (being removed): two of the three peers count.
        assert_eq!(acks.quorum_acked_at(4, now, std::slice::from_ref(&voters)), Some(ago(500)));
        acks.record(1, ago(300));
        assert_eq!(acks.quorum_acked_at(4, now, std::slice::from_ref(&voters)), Some(ago(300)));
        // A joint config needs a majority of each half.
        let joint = [voters, BTreeSet::from([1, 5, 6])];
        assert_eq!(acks.quorum_acked_at(1, now, &joint), None);
        acks.record(6, ago(700));
        assert_eq!(acks.quorum_acked_at(1, now, &joint), Some(ago(700)));
    }
}
