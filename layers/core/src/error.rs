//! The errors the backend traits report.
//!
//! Each is a small enum a caller can match on; the backend's own error, where there is one,
//! is kept as the [`source`](std::error::Error::source), never as the only way to tell
//! failures apart.

use crate::ids::NodeId;

/// A boxed error from a backend or an inner service.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A failure of a [`Registry`](crate::Registry).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The registry cannot be reached now (connection refused or lost, timed out). The same
    /// call may succeed later.
    #[error("the registry is unreachable")]
    Unavailable {
        /// The backend's error.
        #[source]
        source: BoxError,
    },
    /// A stored value is not of the expected form; `key` names where it is.
    #[error("malformed value at registry key {key:?}: {reason}")]
    Malformed {
        /// The backend's key of the value.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An argument was refused before reaching the backend.
    #[error("invalid registry argument: {reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: &'static str,
    },
    /// The registry handle was shut down.
    #[error("the registry was closed")]
    Closed,
    /// Any other failure of the backend.
    #[error("the registry failed")]
    Backend {
        /// The backend's error.
        #[source]
        source: BoxError,
    },
}

impl RegistryError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// A failure of a [`Broker`](crate::Broker) other than a refused publish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker cannot be reached now (connection or channel refused or lost, timed out).
    /// The same call may succeed later.
    #[error("the broker is unreachable")]
    Unavailable {
        /// The backend's error.
        #[source]
        source: BoxError,
    },
    /// The broker pushes back: too many publishes wait for confirmation already. Nothing was
    /// sent; the same call may succeed once earlier publishes are confirmed (callers that
    /// respect [`Broker::poll_flow`](crate::Broker::poll_flow) never see it).
    #[error("the broker is overloaded: too many publishes are waiting for confirmation")]
    Overloaded {
        /// The backend's explanation.
        #[source]
        source: BoxError,
    },
    /// The node's queue does not exist (never declared, deleted, or expired).
    #[error("the queue of node {node} does not exist")]
    QueueNotFound {
        /// The node whose queue is missing.
        node: NodeId,
    },
    /// The node's queue already has a consumer; a queue has one consumer at a time.
    #[error("the queue of node {node} already has a consumer")]
    QueueInUse {
        /// The node whose queue is taken.
        node: NodeId,
    },
    /// The delivery was settled already, or its consumer is gone; an unacknowledged message is
    /// delivered again to the queue's next consumer.
    #[error("the delivery can no longer be acknowledged: its consumer is gone")]
    StaleDelivery,
    /// The broker handle was shut down.
    #[error("the broker was closed")]
    Closed,
    /// Any other failure of the backend.
    #[error("the broker failed")]
    Backend {
        /// The backend's error.
        #[source]
        source: BoxError,
    },
}

impl BrokerError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Overloaded { .. })
    }
}

/// An error with all its sources, joined by `": "`, for one line of a log or a reply.
///
/// ```
/// use hybrid_cluster_core::error::error_chain;
/// use hybrid_cluster_core::RegistryError;
///
/// let error = RegistryError::Unavailable { source: "connection refused".into() };
/// assert_eq!(error_chain(&error), "the registry is unreachable: connection refused");
/// ```
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
