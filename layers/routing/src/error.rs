//! The errors of the forwarding service and of the receiving loop.
//!
//! Each is a small enum a caller can match on; a backend's own error is kept as the
//! [`source`](std::error::Error::source), never as the only way to tell failures apart.

use hybrid_cluster_core::{BoxError, BrokerError, EnvelopeError, PublishError, Target};

/// Why a [`Forward`](crate::Forward) send failed. The caller always learns of a message that
/// was not delivered: every variant but [`Broker`](ForwardError::Broker) says for sure that
/// it was not taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// No node takes messages for this target: its node is gone (its queue expired or was
    /// deleted), or no node has members of the group. Nothing was delivered.
    #[error("no node takes messages for {target}")]
    Unroutable {
        /// The envelope's target.
        target: Target,
    },
    /// The broker refused the message: a destination queue is full, or the broker nacked it.
    /// For a broadcast or a group some nodes may have taken it.
    #[error("the broker refused the message for {target}")]
    Rejected {
        /// The envelope's target.
        target: Target,
    },
    /// The envelope cannot be put on the wire (a reserved header, a text payload that is not
    /// UTF-8). Nothing was sent.
    #[error("the envelope cannot be encoded")]
    Encode(#[source] EnvelopeError),
    /// The payload is larger than the service's limit. Nothing was sent.
    #[error("the payload is {len} bytes, more than the limit of {max} bytes")]
    PayloadTooLarge {
        /// The payload's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// [`call`](tower_service::Service::call) was called without a successful `poll_ready`
    /// first (a bug in the caller). Nothing was sent.
    #[error("the forwarding service was called before it was ready")]
    NotReady,
    /// The broker failed before confirming the message (it is unreachable, or was closed).
    /// Whether the message was delivered is unknown; sending the same envelope again is safe,
    /// since receivers drop a message id they have already handled.
    #[error("the broker failed")]
    Broker(#[source] BrokerError),
}

impl ForwardError {
    /// Whether sending the same envelope again later may succeed: the broker was unreachable.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Broker(e) if e.is_transient())
    }

    pub(crate) fn from_publish(error: PublishError, target: Target) -> Self {
        match error {
            PublishError::Unroutable { .. } => Self::Unroutable { target },
            PublishError::Rejected { .. } => Self::Rejected { target },
            PublishError::Broker(e) => Self::Broker(e),
            // `PublishError` is non-exhaustive: keep whatever comes as the source.
            other => Self::Broker(BrokerError::Backend {
                source: Box::new(other),
            }),
        }
    }
}

/// Why a [`Receiver`](crate::Receiver) stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// The consumer reported a failure; consume the queue again to go on. Unsettled messages
    /// are delivered again to the next consumer.
    #[error("the consumer failed")]
    Broker(#[source] BrokerError),
    /// The local destination failed in `poll_ready`, so no more messages can be handed to it.
    /// The message being handled, if any, was not acknowledged and will be delivered again.
    #[error("the local destination failed")]
    Service(#[source] BoxError),
}
