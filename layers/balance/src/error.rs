//! The balancer's own errors. Errors of the services it routes to pass through boxed
//! ([`BoxError`]), as tower's balancer does.

use std::error::Error;
use std::fmt;

pub use hybrid_cluster_core::BoxError;

/// No node can be chosen: every known node is excluded, or none is known.
///
/// The counts say why. A node counts once, under the first reason that applies in the order
/// draining, degraded, offline, full, not ready.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NoAvailableNode {
    /// Nodes known to the balancer.
    pub known: usize,
    /// Nodes left out because they are [`Draining`](hybrid_cluster_core::NodeStatus::Draining).
    pub draining: usize,
    /// Nodes left out because they are [`Offline`](hybrid_cluster_core::NodeStatus::Offline).
    pub offline: usize,
    /// Active nodes left out because they are at their `max_connections`.
    pub full: usize,
    /// Active nodes with room whose service is not ready (inside the balancer only).
    pub not_ready: usize,
    /// Nodes left out because they are [`Degraded`](hybrid_cluster_core::NodeStatus::Degraded).
    pub degraded: usize,
}

impl fmt::Display for NoAvailableNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.known == 0 {
            return f.write_str("no node available: none known");
        }
        write!(
            f,
            "no node available: {} known ({} draining, {} degraded, {} offline, {} full, {} not ready)",
            self.known, self.draining, self.degraded, self.offline, self.full, self.not_ready
        )
    }
}

impl Error for NoAvailableNode {}

/// The discovery stream feeding the balancer failed. The balancer fails with it: a
/// discovery that can recover should not report the error through its stream.
#[derive(Debug)]
pub struct DiscoverError {
    source: BoxError,
}

impl DiscoverError {
    pub(crate) fn new(source: BoxError) -> Self {
        Self { source }
    }
}

impl fmt::Display for DiscoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("service discovery failed")
    }
}

impl Error for DiscoverError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.source)
    }
}

/// The balancer was called without a successful `poll_ready` just before.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NotReady;

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the balancer was called before it was polled ready")
    }
}

impl Error for NotReady {}
