//! Server side of the peer network: the `RaftPeer` gRPC service, which hands
//! each decoded request to the local openraft instance.
//!
//! It is meant for the nodes of one cluster only and listens on its own
//! address, apart from the client API. A request that does not decode gets
//! `INVALID_ARGUMENT` and changes nothing. A snapshot is received into a
//! temporary file, bounded in size, fsynced, and only then installed.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::BoxStream;

use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::proto::peer_v1::raft_peer_server::RaftPeer;
use crate::proto::peer_v1::{RaftMessage, SnapshotChunk};
use crate::raft::codec;
use crate::raft::{Raft, Snapshot, SnapshotMeta, TypeConfig, Vote};
use crate::storage::snapshot::{INCOMING_EXTENSION, PacedFile};
use crate::storage::{SnapshotFile, kv};

pub struct PeerService {
    raft: Raft,
    leader_service: std::sync::Arc<crate::leader::LeaderService>,
    snapshot_dir: PathBuf,
    /// The largest snapshot this node accepts from a peer.
    snapshot_bytes_max: u64,
    /// Cancelled when the node shuts down: append streams end then, or the
    /// server would wait for the leader to end them.
    shutdown: CancellationToken,
}

impl PeerService {
    pub fn new(
        raft: Raft,
        leader_service: std::sync::Arc<crate::leader::LeaderService>,
        snapshot_dir: PathBuf,
        snapshot_bytes_max: u64,
        shutdown: CancellationToken,
    ) -> PeerService {
        PeerService { raft, leader_service, snapshot_dir, snapshot_bytes_max, shutdown }
    }
}

fn decode_request<T: serde::de::DeserializeOwned>(
    what: &'static str,
    request: Request<RaftMessage>,
) -> Result<T, Status> {
    codec::decode(what, &request.into_inner().data)
        .map_err(|err| Status::invalid_argument(err.to_string()))
}

fn reply<T: serde::Serialize, E: std::fmt::Display>(
    result: Result<T, E>,
) -> Result<Response<RaftMessage>, Status> {
    match result {
        Ok(value) => Ok(Response::new(RaftMessage { data: codec::encode(&value) })),
        // The local Raft is shutting down or failed: the peer should treat us as gone.
        Err(err) => Err(Status::unavailable(format!("raft on this node is not running: {err}"))),
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> =
            decode_request("append entries request", request)?;
        reply(self.raft.append_entries(rpc).await)
    }

    type StreamAppendStream = BoxStream<'static, Result<RaftMessage, Status>>;

    /// Hands each AppendEntries to openraft as it arrives and answers each
    /// once its entries are on disk, in order. A request that cannot be read
    /// or decoded ends the input; its status follows the answers to the
    /// requests before it, and it is never applied.
    async fn stream_append(
        &self,
        request: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let failure: Arc<Mutex<Option<Status>>> = Arc::default();
        let input_failure = failure.clone();
        let requests = futures::stream::unfold(request.into_inner(), move |mut incoming| {
            let failure = input_failure.clone();
            async move {
                let decoded = match incoming.message().await {
                    Ok(None) => return None,
                    Ok(Some(message)) => codec::decode::<AppendEntriesRequest<TypeConfig>>(
                        "append entries request",
                        &message.data,
                    )
                    .map_err(|err| Status::invalid_argument(err.to_string())),
                    Err(status) => Err(status),
                };
                match decoded {
                    Ok(rpc) => Some((rpc, incoming)),
                    Err(status) => {
                        *failure.lock().expect("stream failure lock poisoned") = Some(status);
                        None
                    }
                }
            }
        });
        let answers = self.raft.stream_append(requests).map(|answer| match answer {
            Ok(result) => Ok(RaftMessage { data: codec::encode(&result) }),
            Err(fatal) => {
                Err(Status::unavailable(format!("raft on this node is not running: {fatal}")))
            }
        });
        let input_failed = futures::stream::once(async move {
            failure.lock().expect("stream failure lock poisoned").take()
        })
        .filter_map(|failure| async move { failure.map(Err) });
        let answers =
            answers.chain(input_failed).take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(answers)))
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<TypeConfig> = decode_request("vote request", request)?;
        reply(self.raft.vote(rpc).await)
    }

    async fn pre_vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<TypeConfig> = decode_request("pre-vote request", request)?;
        reply(self.raft.pre_vote(rpc).await)
    }

    async fn transfer_leader(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: TransferLeaderRequest<TypeConfig> =
            decode_request("transfer leader request", request)?;
        reply(self.raft.handle_transfer_leader(rpc).await)
    }

    async fn executor(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let request: crate::executor::protocol::ExecutorRequest =
            decode_request("executor request", request)?;
        let reply = self.leader_service.handle(request).await;
        Ok(Response::new(RaftMessage { data: codec::encode(&reply) }))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let mut chunks = request.into_inner();
        let first = chunks
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let (vote, meta): (Vote, SnapshotMeta) = codec::decode("snapshot header", &first.header)
            .map_err(|err| Status::invalid_argument(err.to_string()))?;
        let path =
            self.snapshot_dir.join(format!("{}.{INCOMING_EXTENSION}", rand::random::<u64>()));
        let file = std::fs::File::create(&path).map_err(|err| internal_io("create", &err))?;
        // Paced as the snapshots this node builds are (see `snapshot.rs`):
        // a few hundred MiB left for one final fsync held up this node's
        // log flushes, and with them its answers to the leader. The writes
        // wait on the disk, so they run off the runtime's threads.
        let mut file = PacedFile::new(file);
        let mut n_bytes: u64 = 0;
        let received = async {
            while let Some(chunk) = chunks.message().await? {
                n_bytes += chunk.data.len() as u64;
                if n_bytes > self.snapshot_bytes_max {
                    return Err(Status::resource_exhausted(format!(
                        "snapshot is larger than the limit of {} bytes",
                        self.snapshot_bytes_max
                    )));
                }
                file = kv::blocking(move || {
                    file.write_all(&chunk.data)?;
                    Ok(file)
                })
                .await
                .map_err(|err| internal_io("write", &err))?;
            }
            kv::blocking(move || file.into_inner().sync_all())
                .await
                .map_err(|err| internal_io("sync", &err))?;
            Ok(())
        }
        .await;
        if let Err(status) = received {
            warn!(cause = %status.message(), "receiving a snapshot failed");
            let _ = std::fs::remove_file(&path);
            return Err(status);
        }
        info!(snapshot = ?meta.last_log_id, n_bytes, "received a snapshot");
        let file = std::fs::File::open(&path).map_err(|err| internal_io("reopen", &err))?;
        let snapshot = Snapshot { meta, snapshot: SnapshotFile { path, file } };
        reply(self.raft.install_full_snapshot(vote, snapshot).await)
    }
}

fn internal_io(verb: &str, err: &std::io::Error) -> Status {
    Status::internal(format!("cannot {verb} the incoming snapshot file: {err}"))
}
