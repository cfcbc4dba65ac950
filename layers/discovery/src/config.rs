//! Discovery's settings.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_core::future::BoxFuture;
use hybrid_cluster_core::{ClusterSecret, NodeInfo};
use tower::retry::backoff::ExponentialBackoffMaker;
use tower::util::rng::HasherRng;

use crate::error::DiscoveryError;
use crate::stats::ConnectionCounter;

/// How much longer than its base a reconnection delay may be, at most: 25 %.
const RECONNECT_JITTER: f64 = 0.25;

/// A user's own source of node info, called on every heartbeat instead of the automatic one.
pub type NodeInfoProvider = Arc<dyn Fn() -> BoxFuture<'static, NodeInfo> + Send + Sync>;

/// How a node registers and follows its peers.
///
/// ```
/// use std::time::Duration;
/// use hybrid_cluster_discovery::DiscoveryConfig;
///
/// // Crashes seen within 3 s: a heartbeat every second, a lease of three.
/// let config = DiscoveryConfig::default().with_heartbeat(Duration::from_secs(1));
/// assert_eq!(config.lease, Duration::from_secs(3));
/// ```
#[derive(Clone)]
pub struct DiscoveryConfig {
    /// How often this node renews its record. Default 5 s (the seed's).
    pub heartbeat: Duration,
    /// How long the record lives without renewal: a crashed node is gone for its peers within
    /// this. Default 3 heartbeats.
    pub lease: Duration,
    /// How often the whole view is read again from the registry, as a safety net for missed
    /// events. Default 30 s.
    pub resync_interval: Duration,
    /// The first delay before reconnecting after the registry was lost. Default 100 ms.
    pub min_reconnect_delay: Duration,
    /// The longest delay between reconnection attempts. Default 5 s.
    pub max_reconnect_delay: Duration,
    /// The source of the connection count published on every heartbeat.
    pub connections: ConnectionCounter,
    /// The user's own node-info source, if any (see [`DiscoveryConfig::with_provider`]).
    pub provider: Option<NodeInfoProvider>,
    /// The cluster secret, if the cluster has one: this node's record is written signed
    /// ([`NodeInfo::to_signed_json`]), and the view skips records that are unsigned, forged or
    /// older than one already seen, and confirms a node's removal before acting on it (see
    /// [`ClusterView`](crate::ClusterView)). Default none.
    pub secret: Option<ClusterSecret>,
    /// How far apart the clocks of two nodes may be. A record whose lease (its
    /// `last_heartbeat` plus `lease_ms`, by its writer's clock) ended longer ago than this by
    /// the reader's clock is stale (left over, or replayed) and is not taken. Default 10 s.
    pub max_clock_skew: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        let heartbeat = Duration::from_secs(5);
        Self {
            heartbeat,
            lease: heartbeat * 3,
            resync_interval: Duration::from_secs(30),
            min_reconnect_delay: Duration::from_millis(100),
            max_reconnect_delay: Duration::from_secs(5),
            connections: ConnectionCounter::new(),
            provider: None,
            secret: None,
            max_clock_skew: Duration::from_secs(10),
        }
    }
}

impl DiscoveryConfig {
    /// Sets the heartbeat, and the lease to three heartbeats.
    pub fn with_heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self.lease = heartbeat * 3;
        self
    }

    /// Sets the lease alone.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Counts connections with `connections` (the cluster layer passes its own).
    pub fn with_connections(mut self, connections: ConnectionCounter) -> Self {
        self.connections = connections;
        self
    }

    /// Signs this node's record with `secret` and accepts only records signed with it.
    pub fn with_secret(mut self, secret: ClusterSecret) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Builds the node info of every heartbeat with `provider` instead of measuring it. The
    /// registrar still sets the node's identity (id, incarnation, registration time), its
    /// status and the heartbeat time, whatever the provider returns.
    pub fn with_provider<F, Fut>(mut self, provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = NodeInfo> + Send + 'static,
    {
        self.provider = Some(Arc::new(move || Box::pin(provider())));
        self
    }

    /// The backoff between reconnection attempts (tower's): delays that double from
    /// `min_reconnect_delay` up to `max_reconnect_delay`, with up to 25 % jitter so that nodes
    /// cut off together do not all come back at the same instant. Start again from the
    /// first delay after a success by making a new backoff.
    pub(crate) fn reconnect_backoff(&self) -> ExponentialBackoffMaker {
        // tower refuses a maximum below the minimum or of zero; the old backoff took the
        // larger of the two as the maximum, and so does this.
        let max = self
            .max_reconnect_delay
            .max(self.min_reconnect_delay)
            .max(Duration::from_millis(1));
        ExponentialBackoffMaker::new(
            self.min_reconnect_delay,
            max,
            RECONNECT_JITTER,
            HasherRng::default(),
        )
        // Cannot fail with a maximum above zero and not below the minimum, and this jitter.
        .unwrap_or_default()
    }

    pub(crate) fn check(&self) -> Result<(), DiscoveryError> {
        let invalid = |reason| Err(DiscoveryError::InvalidConfig { reason });
        if self.heartbeat.is_zero() {
            return invalid("the heartbeat must be longer than zero");
        }
        if self.lease <= self.heartbeat {
            return invalid("the lease must be longer than the heartbeat");
        }
        if self.resync_interval.is_zero() {
            return invalid("the resync interval must be longer than zero");
        }
        Ok(())
    }
}

impl fmt::Debug for DiscoveryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveryConfig")
            .field("heartbeat", &self.heartbeat)
            .field("lease", &self.lease)
            .field("resync_interval", &self.resync_interval)
            .field("min_reconnect_delay", &self.min_reconnect_delay)
            .field("max_reconnect_delay", &self.max_reconnect_delay)
            .field("connections", &self.connections)
            .field("provider", &self.provider.as_ref().map(|_| "custom"))
            .field("secret", &self.secret)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;
    use tower::retry::backoff::{Backoff, MakeBackoff};

    use super::*;

    /// The delay the backoff's next sleep waits for (time is paused, so it is exact).
    fn next_delay(backoff: &mut impl Backoff<Future = tokio::time::Sleep>) -> Duration {
        backoff.next_backoff().deadline() - Instant::now()
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_delays_double_up_to_the_cap_and_reset() {
        let config = DiscoveryConfig {
            min_reconnect_delay: Duration::from_millis(100),
            max_reconnect_delay: Duration::from_millis(350),
            ..DiscoveryConfig::default()
        };
        let mut reconnect = config.reconnect_backoff();
        let mut backoff = reconnect.make_backoff();
        let delays: Vec<Duration> = (0..4).map(|_| next_delay(&mut backoff)).collect();
        let bases = [100, 200, 350, 350];
        for (delay, base) in delays.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *delay >= base && *delay <= base.mul_f64(1.25),
                "{delay:?} vs {base:?}"
            );
        }
        // A new backoff after a success starts again from the first delay.
        let mut backoff = reconnect.make_backoff();
        assert!(next_delay(&mut backoff) <= Duration::from_millis(125));
    }
}
