//! The client API (`taskraft.v1`): the `Tasks` and `Cluster` gRPC services.
//!
//! Every node serves it. A write reaching a follower is forwarded once to the
//! leader's API address, marked so that it is never forwarded again. During
//! a failover such a request is held, for at most `server.leader_hold_ms`,
//! while the node knows no leader or cannot connect to the one it knows, and
//! then routed to the new leader ([`Context::to_leader`]). Reads
//! are linearizable by default: the leader confirms its leadership with a
//! read-index round trip before reading; a follower forwards them. Stale
//! reads and watches are served from the local state.
//!
//! - [`convert`]: protobuf ↔ scheduler types; the only place they meet.
//! - [`error`]: `ApiError` and its conversion into `tonic::Status`.
//! - [`tasks`], [`cluster`]: the two services.
//! - [`requests`]: counting the calls answered, for the metrics.

pub mod cluster;
pub mod convert;
pub mod error;
pub mod requests;
pub mod tasks;

use std::collections::HashMap;
use std::error::Error as _;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::Instant as _;
use openraft::ReadPolicy;
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::type_config::async_runtime::WatchReceiver;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::api::error::{ApiError, WRITE_MAY_STILL_COMMIT};
use crate::config::NodeConfig;
use crate::leader::PlacementView;
use crate::platform::{Clock, Network};
use crate::raft::network::{PEER_KEEP_ALIVE_INTERVAL, PEER_KEEP_ALIVE_TIMEOUT};
use crate::raft::{LEASE_LAPSE_RETRY_INTERVAL, NodeId, PeerNode, Raft, is_lease_lapse};
use crate::scheduler::{Command, Response};
use crate::storage::StateMachineStore;

/// How often a pending write checks that its leader still hears a majority.
const QUORUM_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// The metadata key that marks a request forwarded by another node.
pub const FORWARDED_KEY: &str = "x-taskraft-forwarded-by";

/// The metadata key of a `WatchTasks` response that names the revision its
/// stream starts after: the request's `after_revision`, or for a watch of new
/// changes only (0) the revision at which the node subscribed it.
pub const WATCH_AFTER_REVISION_KEY: &str = "x-taskraft-after-revision";

/// What the services of one node share.
pub struct Context {
    pub node_id: NodeId,
    pub raft: Raft,
    pub state_machine: StateMachineStore,
    pub config: Arc<NodeConfig>,
    /// Ends open watch streams when the node shuts down.
    pub shutdown: CancellationToken,
    /// One permit per open watch stream.
    pub watchers: Arc<Semaphore>,
    /// The wall clock: only the edges read it; the state machine gets times
    /// inside commands.
    pub clock: Arc<dyn Clock>,
    /// The leader's view of its executors, which submissions carry while
    /// this node leads.
    pub placement_view: PlacementView,
    network: Arc<dyn Network>,
    /// One lazily connected channel per other node's API address.
    channels: Mutex<HashMap<String, Channel>>,
}

/// Where a leader-only request went ([`Context::to_leader`]).
pub enum Routed<Req, Resp> {
    /// This node leads: the request, to serve here.
    Local(tonic::Request<Req>),
    /// The leader's answer to the forwarded request.
    Forwarded(Resp),
}

/// Where a request is served.
pub enum Route {
    Local,
    /// Forward to the leader at this API address.
    Leader(String),
}

impl Context {
    pub fn new(
        raft: Raft,
        state_machine: StateMachineStore,
        config: Arc<NodeConfig>,
        shutdown: CancellationToken,
        clock: Arc<dyn Clock>,
        placement_view: PlacementView,
        network: Arc<dyn Network>,
    ) -> Context {
        Context {
            node_id: config.node_id,
            raft,
            state_machine,
            watchers: Arc::new(Semaphore::new(config.server.watchers_max)),
            config,
            shutdown,
            clock,
            placement_view,
            network,
            channels: Mutex::default(),
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.config.server.request_timeout_ms)
    }

    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.config.server.rpc_timeout_ms)
    }

    /// The current leader as this node sees it.
    pub fn leader(&self) -> Option<(NodeId, Option<PeerNode>)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        let leader_id = metrics.current_leader?;
        let node = metrics.membership_config.membership().get_node(&leader_id).cloned();
        Some((leader_id, node))
    }

    /// Decides whether this node serves a leader-only request or forwards it.
    pub fn route<T>(&self, request: &tonic::Request<T>) -> Result<Route, ApiError> {
        match self.leader() {
            Some((leader_id, _)) if leader_id == self.node_id => Ok(Route::Local),
            Some((leader_id, node)) => {
                let Some(node) = node else {
                    return Err(ApiError::unavailable(format!(
                        "leader {leader_id} is not in the membership yet"
                    )));
                };
                if let Some(by) = request.metadata().get(FORWARDED_KEY) {
                    return Err(ApiError::Unavailable {
                        message: format!(
                            "node {} is not the leader either (forwarded by {}); leader is {leader_id}",
                            self.node_id,
                            by.to_str().unwrap_or("?")
                        ),
                        leader_api_addr: Some(node.api_addr),
                    });
                }
                Ok(Route::Leader(node.api_addr))
            }
            None => Err(ApiError::unavailable(format!(
                "node {} knows no leader: an election may be in progress or there is no quorum",
                self.node_id
            ))),
        }
    }

    /// A channel to another node's client API.
    pub fn channel(&self, api_addr: &str) -> Result<Channel, ApiError> {
        let mut channels = self.channels.lock().expect("channel map lock poisoned");
        if let Some(channel) = channels.get(api_addr) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{api_addr}"))
            .map_err(|err| ApiError::Internal(format!("bad node address {api_addr:?}: {err}")))?
            .connect_timeout(Duration::from_millis(self.config.server.connect_timeout_ms))
            .http2_keep_alive_interval(PEER_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(PEER_KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = self.network.channel(endpoint);
        channels.insert(api_addr.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Serves a leader-only request: hands it back if this node leads, and
    /// otherwise forwards it to the leader with `call`, marked as forwarded
    /// and bounded by the RPC timeout, and returns the leader's answer.
    ///
    /// During a failover the request is held rather than refused at once,
    /// as Consul's and Nomad's servers hold theirs: while this node knows no
    /// leader, and when it cannot connect to the leader it knows (so the
    /// request provably never reached it), it waits for a new leader and
    /// routes the request again. It holds for at most `server.leader_hold_ms`
    /// and at most half the deadline the client gave the call, so that the
    /// client still hears `UNAVAILABLE` in time to try another node. A
    /// request that reached the leader is never sent twice.
    pub async fn to_leader<Req, Resp, F, Fut>(
        &self,
        request: tonic::Request<Req>,
        call: F,
    ) -> Result<Routed<Req, Resp>, ApiError>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let hold_until = tokio::time::Instant::now() + self.leader_hold(&request);
        loop {
            let holding = tokio::time::Instant::now() < hold_until;
            let api_addr = match self.route(&request) {
                Ok(Route::Local) => return Ok(Routed::Local(request)),
                Ok(Route::Leader(api_addr)) => api_addr,
                Err(_) if holding && self.leader().is_none() => {
                    tracing::debug!("no leader known: holding the request");
                    self.await_leader_other_than(None, hold_until).await;
                    continue;
                }
                Err(err) => return Err(err),
            };
            let timeout = self.rpc_timeout();
            let answer = self.send_forwarded(&api_addr, request.get_ref().clone(), timeout, &call);
            match answer.await {
                Ok(Err(status)) if holding && is_connect_failure(&status) => {
                    tracing::debug!(leader = %api_addr, error = %status.message(),
                        "the leader cannot be connected to: holding the request");
                    self.await_leader_other_than(Some(&api_addr), hold_until).await;
                }
                answer => {
                    return answer_of_forwarded(&api_addr, timeout, answer).map(Routed::Forwarded);
                }
            }
        }
    }

    /// How long [`Context::to_leader`] may hold `request`: `leader_hold_ms`,
    /// and at most half the deadline the client set (`grpc-timeout`).
    fn leader_hold<T>(&self, request: &tonic::Request<T>) -> Duration {
        let hold = Duration::from_millis(self.config.server.leader_hold_ms);
        match client_deadline(request) {
            Some(deadline) => hold.min(deadline / 2),
            None => hold,
        }
    }

    /// Waits until this node knows a leader whose API address is not
    /// `stale` (any leader, if `stale` is `None`), or until `until`.
    async fn await_leader_other_than(&self, stale: Option<&str>, until: tokio::time::Instant) {
        self.await_metrics(until, |metrics| {
            let leader = metrics
                .current_leader
                .and_then(|leader_id| metrics.membership_config.membership().get_node(&leader_id));
            leader.is_some_and(|node| Some(node.api_addr.as_str()) != stale)
        })
        .await;
    }

    /// Sends `message` to another node with `call`, marked as forwarded and
    /// with a deadline of `timeout`. The other node's answer is passed on as
    /// is (`answer_of_forwarded`).
    pub async fn forward_within<Req, Resp, F, Fut>(
        &self,
        api_addr: &str,
        message: Req,
        timeout: Duration,
        call: F,
    ) -> Result<Resp, ApiError>
    where
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let answer = self.send_forwarded(api_addr, message, timeout, &call).await;
        answer_of_forwarded(api_addr, timeout, answer)
    }

    /// Sends `message` to the node at `api_addr` with `call`, marked as
    /// forwarded, with a deadline of `timeout`: its answer as it came.
    async fn send_forwarded<Req, Resp, F, Fut>(
        &self,
        api_addr: &str,
        message: Req,
        timeout: Duration,
        call: &F,
    ) -> ForwardedAnswer<Resp>
    where
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let channel = match self.channel(api_addr) {
            Ok(channel) => channel,
            Err(err) => return Ok(Err(tonic::Status::from(err))),
        };
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        if let Ok(value) = self.node_id.to_string().parse() {
            request.metadata_mut().insert(FORWARDED_KEY, value);
        }
        let answer = tokio::time::timeout(timeout, call(channel, request)).await;
        answer.map(|answer| answer.map(tonic::Response::into_inner))
    }

    /// Refuses at once when this node leads but no majority has acknowledged
    /// anything it sent for `quorum_silence_ms_max`: a write or a read index
    /// would only wait for a quorum that is not there.
    fn check_quorum(&self) -> Result<(), ApiError> {
        let silence_ms_max = self.config.raft.quorum_silence_ms_max;
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        if metrics.state != openraft::ServerState::Leader {
            return Ok(());
        }
        let silent_ms =
            metrics.last_quorum_acked.as_ref().map(|acked| acked.elapsed().as_millis() as u64);
        match silent_ms {
            Some(silent_ms) if silent_ms <= silence_ms_max => Ok(()),
            Some(silent_ms) => Err(ApiError::unavailable(format!(
                "no quorum: leader {} has not heard from a majority for {silent_ms} ms",
                self.node_id
            ))),
            None => Err(ApiError::unavailable(format!(
                "no quorum: leader {} is not acknowledged yet",
                self.node_id
            ))),
        }
    }

    /// Waits, for at most `quorum_silence_ms_max`, until a leader elected a
    /// moment ago has heard a majority acknowledge it once. It won a
    /// majority's votes, so a write or read index that reaches it first (one
    /// held through the failover, say) waits for that rather than being
    /// refused by [`Context::check_quorum`] as "not acknowledged yet".
    async fn await_first_acknowledgement(&self) {
        let silence_ms_max = self.config.raft.quorum_silence_ms_max;
        let until = tokio::time::Instant::now() + Duration::from_millis(silence_ms_max);
        self.await_metrics(until, |metrics| {
            metrics.state != openraft::ServerState::Leader || metrics.last_quorum_acked.is_some()
        })
        .await;
    }

    /// Waits until `done` holds for this node's Raft metrics, or until
    /// `until`, or until Raft stops.
    async fn await_metrics(
        &self,
        until: tokio::time::Instant,
        done: impl Fn(&openraft::RaftMetrics<crate::raft::TypeConfig>) -> bool,
    ) {
        let mut metrics = self.raft.metrics();
        loop {
            if done(&metrics.borrow_watched()) {
                return;
            }
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() {
                    return;
                },
                () = tokio::time::sleep_until(until) => return,
            }
        }
    }

    /// Proposes a command and waits until it is committed and applied here.
    pub async fn write(&self, command: Command) -> Result<Response, ApiError> {
        self.await_first_acknowledgement().await;
        self.check_quorum()?;
        let timeout_ms = self.config.server.request_timeout_ms;
        let write = async {
            loop {
                match self.raft.client_write(command.clone()).await {
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))
                        if is_lease_lapse(&forward) =>
                    {
                        tokio::time::sleep(LEASE_LAPSE_RETRY_INTERVAL).await;
                    }
                    result => return result,
                }
            }
        };
        let write = tokio::time::timeout(self.request_timeout(), write);
        // A leader cut off from its majority answers as soon as it knows,
        // rather than holding the client until the timeout.
        let quorum_lost = async {
            loop {
                tokio::time::sleep(QUORUM_CHECK_INTERVAL).await;
                if let Err(err) = self.check_quorum() {
                    return err;
                }
            }
        };
        let result = tokio::select! {
            result = write => result,
            err = quorum_lost => {
                return Err(ApiError::unavailable(format!("{err}; the write {WRITE_MAY_STILL_COMMIT}")));
            }
        };
        match result {
            Ok(Ok(written)) => Ok(written.data),
            Ok(Err(RaftError::APIError(err))) => Err(self.write_error(err)),
            Ok(Err(RaftError::Fatal(fatal))) => {
                Err(ApiError::unavailable(format!("raft has stopped: {fatal}")))
            }
            Err(_) => Err(ApiError::unavailable(format!(
                "no quorum: the write did not commit within {timeout_ms} ms; it {WRITE_MAY_STILL_COMMIT}"
            ))),
        }
    }

    fn write_error(&self, err: ClientWriteError<crate::raft::TypeConfig>) -> ApiError {
        match err {
            ClientWriteError::ForwardToLeader(forward) => ApiError::Unavailable {
                message: match forward.leader_id {
                    Some(leader_id) => {
                        format!("node {} is not the leader; node {leader_id} is", self.node_id)
                    }
                    None => {
                        format!("node {} cannot reach a quorum and knows no leader", self.node_id)
                    }
                },
                leader_api_addr: forward.leader_node.map(|node| node.api_addr),
            },
            ClientWriteError::LogEntryDiscarded(_) => ApiError::unavailable(
                "leadership changed before the write committed; it did not take effect, retry it",
            ),
            ClientWriteError::ChangeMembershipError(err) => {
                ApiError::FailedPrecondition(err.to_string())
            }
            ClientWriteError::PreconditionFailed(err) => ApiError::unavailable(err.to_string()),
        }
    }

    /// Makes the following local read linearizable: confirms leadership with
    /// a quorum and waits until the state machine has applied that far.
    pub async fn read_index(&self) -> Result<(), ApiError> {
        self.await_first_acknowledgement().await;
        self.check_quorum()?;
        let timeout_ms = self.config.server.request_timeout_ms;
        // openraft waits one leader lease for a heartbeat round to be
        // acknowledged; a busy majority may answer later than that. Ask
        // again until the quorum check gives up on it or the time is out.
        let read = async {
            loop {
                match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
                    Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(_))) => {
                        self.check_quorum()?;
                        tokio::time::sleep(LEASE_LAPSE_RETRY_INTERVAL).await;
                    }
                    result => return Ok::<_, ApiError>(result),
                }
            }
        };
        let result = match tokio::time::timeout(self.request_timeout(), read).await {
            Ok(answer) => Ok(answer?),
            Err(elapsed) => Err(elapsed),
        };
        match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(forward)))) => {
                Err(ApiError::Unavailable {
                    message: format!("node {} is not the leader", self.node_id),
                    leader_api_addr: forward.leader_node.map(|node| node.api_addr),
                })
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(err)))) => {
                Err(ApiError::unavailable(format!("no quorum for a linearizable read: {err}")))
            }
            Ok(Err(RaftError::Fatal(fatal))) => {
                Err(ApiError::unavailable(format!("raft has stopped: {fatal}")))
            }
            Err(_) => Err(ApiError::unavailable(format!(
                "no quorum confirmed leadership within {timeout_ms} ms"
            ))),
        }
    }
}

/// A forwarded call's answer as it came: `Err` if its deadline passed.
type ForwardedAnswer<Resp> = Result<Result<Resp, tonic::Status>, tokio::time::error::Elapsed>;

/// What a client gets for a call forwarded to the node at `api_addr` with
/// a deadline of `timeout` (`Err` if it passed): the node's own answer as
/// it is; a call it never answered (the deadline passed, or the connection
/// broke because it died) is `UNAVAILABLE`, which clients retry elsewhere.
fn answer_of_forwarded<Resp>(
    api_addr: &str,
    timeout: Duration,
    answer: ForwardedAnswer<Resp>,
) -> Result<Resp, ApiError> {
    match answer {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(status)) if is_own_deadline(&status) => {
            Err(ApiError::unavailable(format!("node {api_addr} did not answer within {timeout:?}")))
        }
        Ok(Err(status)) if is_connect_failure(&status) => Err(ApiError::unavailable(format!(
            "cannot connect to node {api_addr}: {}",
            status.message()
        ))),
        Ok(Err(status)) if is_connection_failure(&status) => Err(ApiError::unavailable(format!(
            "the connection to node {api_addr} broke under the call: {}",
            status.message()
        ))),
        Ok(Err(status)) => Err(ApiError::Forwarded(status)),
        Err(_) => {
            Err(ApiError::unavailable(format!("node {api_addr} did not answer within {timeout:?}")))
        }
    }
}

/// Whether a status is tonic's report that the caller's own deadline passed.
pub fn is_own_deadline(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired"
}

/// Whether a status is tonic's report that the connection broke under a call
/// (the node died, or reset it), rather than an answer from the node. Tonic
/// gives such a failure the code UNKNOWN ("transport error") or INTERNAL and
/// keeps the transport error as the status's source; a status the node sent
/// is decoded from its trailers and has no source.
pub fn is_connection_failure(status: &tonic::Status) -> bool {
    let mut source = status.source();
    while let Some(err) = source {
        if err.is::<tonic::transport::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Whether a call failed because no connection to the node could be made
/// (refused, or not made within the connect timeout), so that nothing of
/// it reached the node: tonic keeps its connector's error, a
/// `tonic::ConnectError`, in the status's source. A connection that broke
/// under the call is not such a failure: the node may have acted on it.
pub fn is_connect_failure(status: &tonic::Status) -> bool {
    let mut source = status.source();
    while let Some(err) = source {
        if err.is::<tonic::ConnectError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// The deadline the client gave a call (its `grpc-timeout`), if any.
fn client_deadline<T>(request: &tonic::Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let unit_at = value.len().checked_sub(1)?;
    let amount: u64 = value.get(..unit_at)?.parse().ok()?;
    match value.get(unit_at..)? {
        "H" => Some(Duration::from_secs(amount.saturating_mul(3_600))),
        "M" => Some(Duration::from_secs(amount.saturating_mul(60))),
        "S" => Some(Duration::from_secs(amount)),
        "m" => Some(Duration::from_millis(amount)),
        "u" => Some(Duration::from_micros(amount)),
        "n" => Some(Duration::from_nanos(amount)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::transport::{Channel, Endpoint};
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

    use super::{ForwardedAnswer, answer_of_forwarded, client_deadline, is_connect_failure};
    use crate::api::error::ApiError;
    use crate::test_nodes::{node_that_answers, node_that_dies_under_a_call};

    /// A health check sent to the node at `api_addr`, its answer as it came.
    async fn send_check(api_addr: &str) -> ForwardedAnswer<HealthCheckResponse> {
        let channel: Channel = Endpoint::from_shared(format!("http://{api_addr}"))
            .expect("a test address is a valid URI")
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        let timeout = Duration::from_secs(5);
        let message = HealthCheckRequest { service: "no.such.Service".into() };
        let mut client = HealthClient::new(channel);
        let call = client.check(crate::client::request(message, timeout));
        let answer = tokio::time::timeout(timeout, call).await;
        answer.map(|answer| answer.map(tonic::Response::into_inner))
    }

    /// A health check forwarded to the node at `api_addr`, as a client gets it.
    async fn forward_check(api_addr: &str) -> Result<HealthCheckResponse, ApiError> {
        answer_of_forwarded(api_addr, Duration::from_secs(5), send_check(api_addr).await)
    }

    /// The address of a port nothing listens on any more.
    fn closed_port() -> anyhow::Result<String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        Ok(listener.local_addr()?.to_string())
    }

    #[tokio::test]
    async fn only_a_call_that_found_no_connection_is_a_connect_failure() -> anyhow::Result<()> {
        let status = send_check(&closed_port()?).await?.unwrap_err();
        assert!(is_connect_failure(&status), "a refused connection: {status:?}");
        let closed = closed_port()?;
        let status = tonic::Status::from(forward_check(&closed).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().starts_with(&format!("cannot connect to node {closed}")),
            "{status:?}"
        );
        let status = send_check(&node_that_dies_under_a_call().await?).await?.unwrap_err();
        assert!(!is_connect_failure(&status), "a connection that broke under the call: {status:?}");
        let status = send_check(&node_that_answers().await?).await?.unwrap_err();
        assert!(!is_connect_failure(&status), "the node's own answer: {status:?}");
        Ok(())
    }

    #[test]
    fn a_clients_deadline_is_read_in_every_unit_and_a_bad_one_is_none() {
        let with = |value: &str| {
            let mut request = tonic::Request::new(());
            request.metadata_mut().insert("grpc-timeout", value.parse().unwrap());
            client_deadline(&request)
        };
        assert_eq!(with("2H"), Some(Duration::from_secs(7_200)));
        assert_eq!(with("3M"), Some(Duration::from_secs(180)));
        assert_eq!(with("4S"), Some(Duration::from_secs(4)));
        assert_eq!(with("1500m"), Some(Duration::from_millis(1_500)));
        assert_eq!(with("250u"), Some(Duration::from_micros(250)));
        assert_eq!(with("99n"), Some(Duration::from_nanos(99)));
        for bad in ["", "m", "12", "12x", "-1S", "1.5S", "99999999999999999999S"] {
            assert_eq!(with(bad), None, "{bad:?}");
        }
        let mut request = tonic::Request::new(());
        assert_eq!(client_deadline(&request), None);
        request.set_timeout(Duration::from_millis(8_000));
        assert_eq!(client_deadline(&request), Some(Duration::from_millis(8_000)));
    }

    #[tokio::test]
    async fn a_forwarded_call_whose_node_dies_under_it_is_unavailable() -> anyhow::Result<()> {
        let dying = node_that_dies_under_a_call().await?;
        let status = tonic::Status::from(forward_check(&dying).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains(&dying), "{status:?}");
        Ok(())
    }

    #[tokio::test]
    async fn a_forwarded_call_passes_on_the_nodes_own_answer() -> anyhow::Result<()> {
        let answering = node_that_answers().await?;
        // The health service does not know the service asked about.
        let status = tonic::Status::from(forward_check(&answering).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        Ok(())
    }
}
