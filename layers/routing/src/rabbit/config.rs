//! How a [`RabbitBroker`](super::RabbitBroker) connects and behaves.

use std::time::Duration;

use hybrid_cluster_core::AmqpUrl;

use tower::retry::backoff::{ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::util::rng::HasherRng;

/// The most, as a share of the delay, added at random to a delay between reconnection
/// attempts, so that nodes cut off together do not all come back at the same moment.
const RECONNECT_JITTER: f64 = 0.25;

/// How a [`RabbitBroker`](super::RabbitBroker) connects and behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RabbitConfig {
    /// The connection's name, shown by RabbitMQ (`rabbitmqctl list_connections
    /// user_provided_name`, the management UI).
    pub connection_name: Option<String>,
    /// Publishes sent and not yet confirmed, at most. At least 1.
    pub max_in_flight: usize,
    /// Publishes queued or in flight, at most: past it [`Broker::poll_flow`](hybrid_cluster_core::Broker::poll_flow) is pending and
    /// a publish fails at once with [`BrokerError::Unavailable`](hybrid_cluster_core::BrokerError::Unavailable).
    pub max_pending: usize,
    /// How long publishes and declarations wait through an outage (connection lost, or
    /// publishing blocked) before failing with [`BrokerError::Unavailable`](hybrid_cluster_core::BrokerError::Unavailable).
    pub outage_timeout: Duration,
    /// How long making a connection may take.
    pub connect_timeout: Duration,
    /// The delay before the second reconnection attempt (the first is made at once); it
    /// doubles at each failure, and up to a quarter more is added at random.
    pub reconnect_delay: Duration,
    /// The longest delay between reconnection attempts.
    pub max_reconnect_delay: Duration,
    /// The largest message body published; larger ones fail with [`BrokerError::Backend`](hybrid_cluster_core::BrokerError::Backend)
    /// before being sent (RabbitMQ would close the channel on them).
    pub max_body_len: usize,
    /// How many times a message is sent, each time its connection dropping before the
    /// confirmation, before it fails with [`BrokerError::Unavailable`](hybrid_cluster_core::BrokerError::Unavailable).
    pub publish_attempts: u32,
    /// Dead letters kept at most in `{prefix}:dead-letter`, oldest dropped first.
    pub dead_letter_max_length: Option<u32>,
    /// The dead-letter queue is deleted after going unused this long (`None`: kept).
    pub dead_letter_expires: Option<Duration>,
    /// Whether messages are published persistent (AMQP delivery mode 2), so that RabbitMQ
    /// confirms them once they are on disk and they survive a restart in a durable or
    /// quorum queue. A cluster sets it from its [`Durability`](hybrid_cluster_core::Durability).
    pub persistent: bool,
    /// Other addresses of the same RabbitMQ cluster, tried after the ones given to
    /// [`connect`](super::RabbitBroker::connect) or
    /// [`connect_any`](super::RabbitBroker::connect_any), on the first connection and on every
    /// reconnection (see `connect_any`). Empty by default. A facade that takes one AMQP URL
    /// takes the rest of a cluster's addresses here.
    pub fallback_urls: Vec<AmqpUrl>,
    /// Declarations, bindings and deletions in progress at once, at most; more wait their
    /// turn, in order. Each runs on a channel of its own, and a connection has at most 2,047:
    /// a burst of joins (every client of a restarted node joining its groups again) would
    /// otherwise run out of channels and fail. At least 1.
    pub max_topology_operations: usize,
}

impl Default for RabbitConfig {
    /// 256 in flight, 4,096 pending, a 10 s outage bound, 10 s to connect, reconnection
    /// delays from 100 ms to 5 s, bodies up to 16 MiB, 3 attempts per message, 10,000 dead
    /// letters kept, persistent messages, no fallback addresses, 64 topology operations at
    /// once.
    fn default() -> Self {
        Self {
            connection_name: None,
            max_in_flight: 256,
            max_pending: 4096,
            outage_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            reconnect_delay: Duration::from_millis(100),
            max_reconnect_delay: Duration::from_secs(5),
            max_body_len: 16 * 1024 * 1024,
            publish_attempts: 3,
            dead_letter_max_length: Some(10_000),
            dead_letter_expires: None,
            persistent: true,
            fallback_urls: Vec::new(),
            max_topology_operations: 64,
        }
    }
}

impl RabbitConfig {
    /// The delays between one outage's reconnection attempts: from
    /// [`reconnect_delay`](Self::reconnect_delay), doubling up to
    /// [`max_reconnect_delay`](Self::max_reconnect_delay), with jitter. A new outage starts
    /// again from the shortest.
    pub(crate) fn reconnect_backoff(&self) -> ExponentialBackoff {
        // Bounds tower accepts whatever the configuration says: a positive maximum, not below
        // the minimum.
        let max = self
            .max_reconnect_delay
            .max(self.reconnect_delay)
            .max(Duration::from_millis(1));
        let maker = ExponentialBackoffMaker::new(
            self.reconnect_delay,
            max,
            RECONNECT_JITTER,
            HasherRng::default(),
        );
        maker.unwrap_or_default().make_backoff()
    }
}

/// How long until `wait` ends (for logs).
pub(crate) fn until(wait: &tokio::time::Sleep) -> Duration {
    wait.deadline()
        .saturating_duration_since(tokio::time::Instant::now())
}

#[cfg(test)]
mod tests {
    use tower::retry::backoff::Backoff;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reconnection_delays_double_with_jitter_up_to_the_maximum() {
        let config = RabbitConfig {
            reconnect_delay: Duration::from_millis(100),
            max_reconnect_delay: Duration::from_millis(500),
            ..RabbitConfig::default()
        };
        let mut backoff = config.reconnect_backoff();
        for base in [100, 200, 400, 500, 500] {
            let delay = until(&backoff.next_backoff());
            let base = Duration::from_millis(base);
            assert!(delay >= base, "{delay:?} < {base:?}");
            assert!(delay <= base.mul_f64(1.25).min(Duration::from_millis(500)));
        }
        // A new outage starts from the shortest again.
        let delay = until(&config.reconnect_backoff().next_backoff());
        assert!(delay <= Duration::from_millis(125));

        // Bounds tower would refuse still make a backoff.
        let odd = RabbitConfig {
            reconnect_delay: Duration::from_secs(2),
            max_reconnect_delay: Duration::ZERO,
            ..RabbitConfig::default()
        };
        assert_eq!(
            until(&odd.reconnect_backoff().next_backoff()),
            Duration::from_secs(2)
        );
    }
}
