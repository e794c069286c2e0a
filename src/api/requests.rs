//! Counting the calls this node's client API answers, by method and status
//! code, with how long each took: a tower layer around the gRPC server, read
//! by [`crate::metrics`].
//!
//! The code is the one in the answer's headers: an error answered at once
//! carries it there, and an answer without one is counted as `OK`. So a
//! stream (`WatchTasks`) is counted, with the time to its first answer, when
//! it starts, whatever ends it later. Every call this node answers counts,
//! a forwarded one included, so a call that goes through a follower counts
//! on the follower and on the leader. At most [`METHODS_MAX`] distinct
//! methods are kept apart; calls of any further path (no such method exists,
//! so they are answered `UNIMPLEMENTED`) count under `other`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::{Request, Response};
use tonic::Code;

use crate::metrics::{DurationHistogram, HistogramCounts};

/// The most methods counted apart; the API and the standard services have
/// about twenty.
pub const METHODS_MAX: usize = 64;

/// The counts of one method.
#[derive(Debug, Default)]
struct MethodCounts {
    by_code: BTreeMap<&'static str, u64>,
    durations: Arc<DurationHistogram>,
}

/// What the client API answered, by method.
#[derive(Debug, Default)]
pub struct RequestCounts {
    methods: Mutex<BTreeMap<String, MethodCounts>>,
}

/// One method's counts at one moment, for the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodSnapshot {
    /// The full gRPC method, as `taskraft.v1.Tasks/SubmitTask`, or `other`.
    pub method: String,
    /// Calls by the name of their status code (`OK`, `UNAVAILABLE`, ...).
    pub by_code: Vec<(&'static str, u64)>,
    pub durations: HistogramCounts,
}

impl RequestCounts {
    /// Counts one answered call of the method at `path` (`/package.Service/Method`).
    pub fn record(&self, path: &str, code: Code, elapsed: std::time::Duration) {
        let method = path.strip_prefix('/').unwrap_or(path);
        let durations = {
            let mut methods = self.methods.lock().unwrap_or_else(PoisonError::into_inner);
            let kept_apart = methods.contains_key(method) || methods.len() < METHODS_MAX;
            let method = if kept_apart { method } else { "other" };
            let counts = methods.entry(method.to_owned()).or_default();
            *counts.by_code.entry(code_name(code)).or_default() += 1;
            counts.durations.clone()
        };
        durations.observe(elapsed);
    }

    /// Every method's counts, in name order.
    pub fn snapshot(&self) -> Vec<MethodSnapshot> {
        let methods = self.methods.lock().unwrap_or_else(PoisonError::into_inner);
        methods
            .iter()
            .map(|(method, counts)| MethodSnapshot {
                method: method.clone(),
                by_code: counts.by_code.iter().map(|(code, n)| (*code, *n)).collect(),
                durations: counts.durations.counts(),
            })
            .collect()
    }
}

/// The canonical name of a status code, as the API's documentation and
/// other gRPC servers' metrics write it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The tower layer that counts every call of the service it wraps into a
/// [`RequestCounts`].
#[derive(Debug, Clone)]
pub struct CountRequestsLayer(pub Arc<RequestCounts>);

impl<S> tower_layer::Layer<S> for CountRequestsLayer {
    type Service = CountRequests<S>;

    fn layer(&self, inner: S) -> CountRequests<S> {
        CountRequests { inner, counts: self.0.clone() }
    }
}

/// A service that counts the calls of `inner`.
#[derive(Debug, Clone)]
pub struct CountRequests<S> {
    inner: S,
    counts: Arc<RequestCounts>,
}

impl<S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>> for CountRequests<S>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Response<ResBody>, S::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let counts = self.counts.clone();
        let started = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            let code = match &answer {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse::<i32>().ok())
                    .map_or(Code::Ok, Code::from),
                // The server could not answer at all.
                Err(_) => Code::Unknown,
            };
            counts.record(&path, code, started.elapsed());
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn calls_are_counted_by_method_and_code() {
        let counts = RequestCounts::default();
        let path = "/taskraft.v1.Tasks/SubmitTask";
        counts.record(path, Code::Ok, Duration::from_micros(800));
        counts.record(path, Code::Ok, Duration::from_millis(3));
        counts.record(path, Code::Unavailable, Duration::from_millis(2));
        counts.record("/taskraft.v1.Tasks/GetTask", Code::NotFound, Duration::from_micros(100));
        let snapshot = counts.snapshot();
        assert_eq!(snapshot.len(), 2);
        assert_eq!(snapshot[0].method, "taskraft.v1.Tasks/GetTask");
        assert_eq!(snapshot[0].by_code, vec![("NOT_FOUND", 1)]);
        assert_eq!(snapshot[1].method, "taskraft.v1.Tasks/SubmitTask");
        assert_eq!(snapshot[1].by_code, vec![("OK", 2), ("UNAVAILABLE", 1)]);
        assert_eq!(snapshot[1].durations.count, 3);
    }

    #[test]
    fn methods_past_the_limit_count_as_other() {
        let counts = RequestCounts::default();
        for idx in 0..METHODS_MAX + 10 {
            counts.record(&format!("/no.Such/Method{idx}"), Code::Unimplemented, Duration::ZERO);
        }
        // A method already counted keeps its own line.
        counts.record("/no.Such/Method0", Code::Unimplemented, Duration::ZERO);
        let snapshot = counts.snapshot();
        assert_eq!(snapshot.len(), METHODS_MAX + 1);
        let other = snapshot.iter().find(|method| method.method == "other").unwrap();
        assert_eq!(other.by_code, vec![("UNIMPLEMENTED", 10)]);
        let first = snapshot.iter().find(|method| method.method == "no.Such/Method0").unwrap();
        assert_eq!(first.by_code, vec![("UNIMPLEMENTED", 2)]);
    }
}
