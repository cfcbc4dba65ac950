//! [`ConnectionLoad`]: live-connection load as a [`tower::load::Load`], for tower's own
//! balancers.
//!
//! tower's `PendingRequests` counts requests in flight, which a WebSocket leaves at zero once
//! upgraded. This wrapper reports instead the node's live connections relative to its limit,
//! read from its [`LiveNodeInfo`], so that `tower::balance::p2c::Balance` can be fed from our
//! discovery. Nodes that are not available (draining, offline, full) report an infinite load:
//! p2c ranks them last but, unlike [`Balance`](crate::Balance), cannot exclude them. Mind
//! tower-rs/tower#856 (see [`balance`](crate::balance)) before using p2c under churn.
//!
//! ```
//! use futures_util::{StreamExt, TryStreamExt};
//! use hybrid_cluster_balance::ConnectionLoad;
//! use hybrid_cluster_core::{Incarnation, LiveNodeInfo, NodeId, NodeInfo};
//! use tower::discover::Change;
//! use tower::load::Load;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut info = NodeInfo::new(NodeId::new("node-1")?, Incarnation::random(), "10.0.0.5", 5001);
//! info.connection_count = 250;
//! info.max_connections = 1000;
//! let live = LiveNodeInfo::new(info); // any service implementing HasNodeInfo
//!
//! // Wrap every service of a discovery, e.g. before `tower::balance::p2c::Balance::new`.
//! let discover = futures_util::stream::iter([Ok::<_, std::io::Error>(Change::Insert(
//!     NodeId::new("node-1")?,
//!     live,
//! ))]);
//! let mut discover = discover.map_ok(|change| match change {
//!     Change::Insert(key, service) => Change::Insert(key, ConnectionLoad::new(service)),
//!     Change::Remove(key) => Change::Remove(key),
//! });
//! let Some(Ok(Change::Insert(_, service))) = discover.next().await else { unreachable!() };
//! assert_eq!(service.load(), 0.25);
//! # Ok(())
//! # }
//! ```
//!
//! [`LiveNodeInfo`]: hybrid_cluster_core::LiveNodeInfo

use std::task::{Context, Poll};

use hybrid_cluster_core::{HasNodeInfo, LiveNodeInfo};
use tower::load::Load;
use tower_service::Service;

/// A service whose [`Load`] is its node's live connections relative to `max_connections`
/// (infinite when the node is not available).
#[derive(Clone, Debug)]
pub struct ConnectionLoad<S> {
    inner: S,
}

impl<S> ConnectionLoad<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: HasNodeInfo> HasNodeInfo for ConnectionLoad<S> {
    fn live_node_info(&self) -> &LiveNodeInfo {
        self.inner.live_node_info()
    }
}

impl<S: HasNodeInfo> Load for ConnectionLoad<S> {
    type Metric = f64;

    fn load(&self) -> f64 {
        self.inner.live_node_info().get().balancing_load()
    }
}

impl<S, Req> Service<Req> for ConnectionLoad<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        self.inner.call(request)
    }
}
