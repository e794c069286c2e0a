//! The errors of the client API, and the one place they become a
//! `tonic::Status`.

use tonic::Status;

use crate::scheduler::{Rejection, RejectionKind};
use crate::storage::TooFarBehind;

/// The gRPC metadata key that carries the leader's API address when a node
/// answers `UNAVAILABLE` because it is not the leader.
pub const LEADER_HINT_KEY: &str = "x-taskraft-leader";

/// The words that end an `UNAVAILABLE` message when a write was proposed
/// and may yet commit (no quorum answered in time), as opposed to one the
/// node refused before proposing it: a client that retries without an
/// idempotency key may then write twice.
pub const WRITE_MAY_STILL_COMMIT: &str = "may still commit later";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// A watch resumes from a revision too old to catch up from.
    #[error("{0}")]
    OutOfRange(String),
    /// No quorum, no known leader, or this node is not the leader.
    #[error("{message}")]
    Unavailable { message: String, leader_api_addr: Option<String> },
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Internal(String),
    /// A status returned by the leader this request was forwarded to.
    #[error("{}", .0.message())]
    Forwarded(Status),
}

impl ApiError {
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::Unavailable { message: message.into(), leader_api_addr: None }
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> ApiError {
        match rejection.kind {
            RejectionKind::InvalidArgument => ApiError::InvalidArgument(rejection.message),
            RejectionKind::NotFound => ApiError::NotFound(rejection.message),
            RejectionKind::FailedPrecondition | RejectionKind::Stale => {
                ApiError::FailedPrecondition(rejection.message)
            }
            RejectionKind::ResourceExhausted => ApiError::ResourceExhausted(rejection.message),
        }
    }
}

impl From<TooFarBehind> for ApiError {
    fn from(err: TooFarBehind) -> ApiError {
        ApiError::OutOfRange(err.to_string())
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        match err {
            ApiError::InvalidArgument(message) => Status::invalid_argument(message),
            ApiError::NotFound(message) => Status::not_found(message),
            ApiError::FailedPrecondition(message) => Status::failed_precondition(message),
            ApiError::ResourceExhausted(message) => Status::resource_exhausted(message),
            ApiError::OutOfRange(message) => Status::out_of_range(message),
            ApiError::Unavailable { message, leader_api_addr } => {
                let mut status = Status::unavailable(message);
                if let Some(addr) = leader_api_addr
                    && let Ok(value) = addr.parse()
                {
                    status.metadata_mut().insert(LEADER_HINT_KEY, value);
                }
                status
            }
            ApiError::DeadlineExceeded(message) => Status::deadline_exceeded(message),
            ApiError::Internal(message) => Status::internal(message),
            ApiError::Forwarded(status) => status,
        }
    }
}
