//! The RabbitMQ backend's own failures, kept as the `source` of a
//! [`BrokerError`](hybrid_cluster_core::BrokerError) so a caller can look deeper.

use std::time::Duration;

/// A failure of the RabbitMQ backend, found as the source of a
/// [`BrokerError`](hybrid_cluster_core::BrokerError).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RabbitError {
    /// The connection could not be made (refused, unknown host, wrong credentials or virtual
    /// host). The URL is shown with its password hidden.
    #[error("cannot connect to RabbitMQ at {url}")]
    Connect {
        /// The URL, password hidden.
        url: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The connection was not made within the configured time.
    #[error("connecting to RabbitMQ at {url} took longer than {after:?}")]
    ConnectTimeout {
        /// The URL, password hidden.
        url: String,
        /// The bound.
        after: Duration,
    },
    /// RabbitMQ has been unreachable (or has blocked publishing) for longer than the
    /// configured outage bound; calls fail at once until it is back.
    #[error("RabbitMQ has been unavailable for longer than {after:?}")]
    Outage {
        /// The bound.
        after: Duration,
    },
    /// Too many publishes are waiting for a confirmation already: the caller did not respect
    /// [`Broker::poll_flow`](hybrid_cluster_core::Broker::poll_flow).
    #[error("{max_pending} publishes are waiting for confirmation already")]
    Backpressure {
        /// The bound.
        max_pending: usize,
    },
    /// The message was put on the wire several times and each time its channel was lost
    /// before RabbitMQ confirmed it.
    #[error("the message was sent {attempts} times without a confirmation")]
    NoConfirmation {
        /// How many times it was sent.
        attempts: u32,
    },
    /// The message was put on the wire, and RabbitMQ did not confirm it within the outage
    /// bound (it blocked publishing, or stopped answering). It may still arrive.
    #[error("RabbitMQ did not confirm the message within {after:?}")]
    Unconfirmed {
        /// The bound.
        after: Duration,
    },
    /// The message cannot be carried (a header name or the message id longer than 255
    /// bytes, a body over the configured limit). Nothing was sent.
    #[error("the message cannot be sent: {reason}")]
    InvalidMessage {
        /// What is wrong with it.
        reason: String,
    },
    /// The broker was given no address to connect to.
    #[error("no RabbitMQ address was given")]
    NoAddress,
    /// An AMQP operation failed.
    #[error("an AMQP operation failed")]
    Amqp(#[source] lapin::Error),
}
