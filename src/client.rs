//! A client of the taskraft API that tries the given endpoints in turn and
//! follows the leader, used by the CLI and the tests.
//!
//! A call that fails with `UNAVAILABLE` (node down, no leader yet, not the
//! leader), passes its deadline, or loses its connection (the node died under
//! it) is retried on the leader named in the error, else on the next
//! endpoint, with a short backoff, until the client's deadline. Every other
//! status is final. Each attempt carries the per-call timeout.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::api::WATCH_AFTER_REVISION_KEY;
use crate::api::error::LEADER_HINT_KEY;
use crate::platform::{Network, Tcp};

/// The default endpoints: the local cluster that `scripts/cluster.sh` starts.
pub const ENDPOINTS_DEFAULT: &str = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";
/// The largest message the client sends or accepts.
pub const MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// How often an HTTP/2 ping checks that a node still answers.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the connection is dropped.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MS_MIN: u64 = 50;
const BACKOFF_MS_MAX: u64 = 200;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoints given")]
    NoEndpoints,
    #[error("bad endpoint {endpoint:?}: {message}")]
    BadEndpoint { endpoint: String, message: String },
}

pub struct Client {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    current: usize,
    /// How long one call may keep retrying across endpoints.
    retry_for: Duration,
    /// The deadline of one attempt.
    attempt_timeout: Duration,
    network: Arc<dyn Network>,
}

impl Client {
    pub fn new(
        endpoints: &[String],
        retry_for: Duration,
        attempt_timeout: Duration,
    ) -> Result<Client, ClientError> {
        Client::on_network(endpoints, retry_for, attempt_timeout, Arc::new(Tcp))
    }

    /// A client that connects through `network` (a simulation's, say).
    pub fn on_network(
        endpoints: &[String],
        retry_for: Duration,
        attempt_timeout: Duration,
        network: Arc<dyn Network>,
    ) -> Result<Client, ClientError> {
        let mut client = Client {
            endpoints: Vec::new(),
            channels: Vec::new(),
            current: 0,
            retry_for,
            attempt_timeout,
            network,
        };
        for endpoint in endpoints.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            client.add_endpoint(endpoint)?;
        }
        if client.endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        Ok(client)
    }

    fn add_endpoint(&mut self, endpoint: &str) -> Result<usize, ClientError> {
        if let Some(idx) = self.endpoints.iter().position(|known| known == endpoint) {
            return Ok(idx);
        }
        let url = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("http://{endpoint}")
        };
        let settings = Endpoint::from_shared(url)
            .map_err(|err| ClientError::BadEndpoint {
                endpoint: endpoint.into(),
                message: err.to_string(),
            })?
            .connect_timeout(Duration::from_millis(500))
            // A node that is stopped keeps its connections open and answers
            // nothing; unanswered pings close them, so that calls move on.
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = self.network.channel(settings);
        self.endpoints.push(endpoint.to_owned());
        self.channels.push(channel);
        Ok(self.endpoints.len() - 1)
    }

    /// The endpoint the next call goes to first.
    pub fn current_endpoint(&self) -> &str {
        &self.endpoints[self.current]
    }

    pub fn attempt_timeout(&self) -> Duration {
        self.attempt_timeout
    }

    /// Calls `call` on a channel, retrying `UNAVAILABLE` as described above.
    pub async fn call<T, F, Fut>(&mut self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + self.retry_for;
        let mut backoff_ms = BACKOFF_MS_MIN;
        loop {
            let attempt = call(self.channels[self.current].clone(), self.attempt_timeout);
            let deadline_passed = || {
                tonic::Status::deadline_exceeded(format!(
                    "{} did not answer within {:?}",
                    self.current_endpoint(),
                    self.attempt_timeout
                ))
            };
            let status = match tokio::time::timeout(self.attempt_timeout, attempt).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(status)) if crate::api::is_own_deadline(&status) => deadline_passed(),
                Ok(Err(status)) if !is_retryable(&status) => return Err(status),
                Ok(Err(status)) => status,
                Err(_) => deadline_passed(),
            };
            let hint = status
                .metadata()
                .get(LEADER_HINT_KEY)
                .and_then(|value| value.to_str().ok())
                .map(String::from);
            match hint.map(|leader| self.add_endpoint(&leader)) {
                Some(Ok(leader_idx)) if leader_idx != self.current => self.current = leader_idx,
                _ => self.current = (self.current + 1) % self.endpoints.len(),
            }
            if Instant::now() + Duration::from_millis(backoff_ms) > deadline {
                return Err(status);
            }
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = (backoff_ms * 2).min(BACKOFF_MS_MAX);
        }
    }
}

/// Whether another node, or the same one a moment later, may answer. A
/// deadline may have passed, or a connection broken, after a write
/// committed, so callers retry writes only with an idempotency key (the CLI
/// always sets one).
pub fn is_retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    ) || crate::api::is_connection_failure(status)
}

/// A new idempotency key, `<prefix>-<unix ns>-<random>`, for a submission
/// whose caller gave none: with it a retried submission that had committed
/// after all returns the first task instead of creating a second.
pub fn fresh_idempotency_key(prefix: &str) -> String {
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!("{prefix}-{now_ns:x}-{:016x}", rand::random::<u64>())
}

/// Where a watch resumes when its stream breaks, with no gap and no change
/// shown twice. The events of one command share a revision (the tasks of a
/// batch submission, for one), so a stream that broke partway through one
/// revision's events resumes after the revision before it, and the events
/// of that revision seen already are dropped when they come again. Holds
/// the ids of one revision's tasks: no more than one command changes.
#[derive(Debug, Clone, Default)]
pub struct WatchCursor {
    /// Every event up to this revision has been seen.
    complete_revision: u64,
    /// The revision of the latest event seen.
    current_revision: u64,
    /// The tasks seen at `current_revision`.
    seen_at_current: HashSet<String>,
}

impl WatchCursor {
    /// A watch of the events after `revision`.
    pub fn after(revision: u64) -> WatchCursor {
        WatchCursor {
            complete_revision: revision,
            current_revision: revision,
            seen_at_current: HashSet::new(),
        }
    }

    /// Records where a stream starts, from the metadata of the server's
    /// response (`x-taskraft-after-revision`). A watch of new changes only
    /// that breaks before its first event then resumes after the revision
    /// at which it was subscribed, instead of with 0 ("only new"), which
    /// would skip the changes made while it was broken. Changes nothing
    /// once an event was seen, nor when the value is missing or malformed.
    pub fn started(&mut self, metadata: &tonic::metadata::MetadataMap) {
        if self.current_revision != 0 {
            return;
        }
        let started_after = metadata
            .get(WATCH_AFTER_REVISION_KEY)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if let Some(revision) = started_after {
            self.complete_revision = revision;
            self.current_revision = revision;
        }
    }

    /// Records an event; false when it was seen before a resume.
    pub fn admit(&mut self, revision: u64, task_id: &str) -> bool {
        if revision < self.current_revision {
            // Seen: nothing lies between the last two revisions seen, so an
            // event before the current one is at or before the complete
            // revision. A resumed stream starts after that, though an older
            // server resumed on a node that lags could send them again.
            return false;
        }
        if revision > self.current_revision {
            // A watch of new events only (after 0) wants none before its
            // first one.
            self.complete_revision = match self.current_revision {
                0 => revision.saturating_sub(1),
                current_revision => current_revision,
            };
            self.current_revision = revision;
            self.seen_at_current.clear();
        }
        self.seen_at_current.insert(task_id.to_owned())
    }

    /// The `after_revision` to resume with.
    pub fn resume_after(&self) -> u64 {
        self.complete_revision
    }
}

/// Builds a request with the per-attempt deadline set.
pub fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

    use super::{Client, WATCH_AFTER_REVISION_KEY, WatchCursor, request};
    use crate::api::is_connection_failure;
    use crate::test_nodes::{node_that_answers, node_that_dies_under_a_call};

    async fn check(client: &mut Client) -> Result<HealthCheckResponse, tonic::Status> {
        client
            .call(|channel, timeout| async move {
                let message = HealthCheckRequest { service: String::new() };
                Ok(HealthClient::new(channel).check(request(message, timeout)).await?.into_inner())
            })
            .await
    }

    /// A stream broken partway through one revision's events resumes after
    /// the revision before it and shows each change once.
    #[test]
    fn a_watch_resumes_before_a_revision_it_may_have_seen_only_part_of() -> anyhow::Result<()> {
        let mut cursor = WatchCursor::after(10);
        assert_eq!(cursor.resume_after(), 10);
        assert!(cursor.admit(11, "a"));
        assert_eq!(cursor.resume_after(), 10);
        // Revision 12 is a batch of three; the stream breaks after two.
        assert!(cursor.admit(12, "b"));
        assert!(cursor.admit(12, "c"));
        assert_eq!(cursor.resume_after(), 11);
        // Resumed after 11: revision 12 comes again, whole.
        let replay = [(12, "b"), (12, "c"), (12, "d"), (13, "e")];
        let admitted: Vec<bool> =
            replay.iter().map(|(revision, id)| cursor.admit(*revision, id)).collect();
        assert_eq!(admitted, vec![false, false, true, true]);
        assert_eq!(cursor.resume_after(), 12);
        // A task changed again later is a new change.
        assert!(cursor.admit(14, "b"));
        // A change at or before a revision seen whole is a repeat.
        assert!(!cursor.admit(12, "d"));
        assert!(!cursor.admit(11, "a"));

        // A watch of new events only resumes before its first revision,
        // not with 0, which would skip what came in the meantime.
        let mut cursor = WatchCursor::after(0);
        assert!(cursor.admit(40, "x"));
        assert_eq!(cursor.resume_after(), 39);
        assert!(cursor.admit(41, "y"));
        assert_eq!(cursor.resume_after(), 40);

        // Broken before its first event, it resumes after the revision the
        // server subscribed it at, named in the response's metadata.
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(WATCH_AFTER_REVISION_KEY, 57.into());
        let mut cursor = WatchCursor::after(0);
        cursor.started(&metadata);
        assert_eq!(cursor.resume_after(), 57);
        assert!(cursor.admit(60, "z"));
        assert_eq!(cursor.resume_after(), 57);
        // The resumed stream's metadata moves nothing.
        metadata.insert(WATCH_AFTER_REVISION_KEY, 59.into());
        cursor.started(&metadata);
        assert_eq!(cursor.resume_after(), 57);
        assert!(!cursor.admit(60, "z"));

        // A missing or malformed value leaves a watch of new changes only.
        for value in [None, Some("-3"), Some("fifty")] {
            let mut metadata = tonic::metadata::MetadataMap::new();
            if let Some(value) = value {
                metadata.insert(WATCH_AFTER_REVISION_KEY, value.parse()?);
            }
            let mut cursor = WatchCursor::after(0);
            cursor.started(&metadata);
            assert_eq!(cursor.resume_after(), 0, "{value:?}");
            assert!(cursor.admit(40, "x"));
            assert_eq!(cursor.resume_after(), 39);
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_connection_broken_under_a_call_is_told_from_a_nodes_answer() -> anyhow::Result<()> {
        let dying = node_that_dies_under_a_call().await?;
        let mut client = Client::new(&[dying], Duration::ZERO, Duration::from_secs(5))?;
        let err = check(&mut client).await.unwrap_err();
        assert!(is_connection_failure(&err), "{err:?}");
        // What a node sends back is never taken for a broken connection.
        assert!(!is_connection_failure(&tonic::Status::unknown("transport error")));
        assert!(!is_connection_failure(&tonic::Status::internal("h2 protocol error")));
        Ok(())
    }

    #[tokio::test]
    async fn a_call_whose_node_dies_under_it_goes_on_to_the_next_node() -> anyhow::Result<()> {
        let endpoints = [node_that_dies_under_a_call().await?, node_that_answers().await?];
        let mut client = Client::new(&endpoints, Duration::from_secs(5), Duration::from_secs(5))?;
        let reply = check(&mut client).await?;
        assert_eq!(reply.status, ServingStatus::Serving as i32);
        assert_eq!(client.current_endpoint(), endpoints[1]);
        Ok(())
    }
}
