//! The [`Balance`] service: routes each request to the node a [`Strategy`] chooses among
//! those a [`Discover`] yields.
//!
//! # How it works
//! - **Services** are kept in a [`ReadyCache`] keyed by the discovery key, which drives the
//!   pending ones to readiness (as `tower::balance::p2c` does).
//! - **Node info** is kept in a [`NodeSet`] under the same keys: each service's
//!   [`LiveNodeInfo`] (through [`HasNodeInfo`]), indexed by load, resource usage and join
//!   order, over the nodes whose service is ready. Every `poll_ready` calls
//!   [`NodeSet::refresh`], so the view follows heartbeats, not only inserts and removals;
//!   with [`with_shared_epoch`](Balance::with_shared_epoch) that costs one atomic load when
//!   nothing changed.
//! - **Reserve in `poll_ready`, spend in `call`.** `poll_ready` picks a node, polls its
//!   service ready and reserves it *by key*. `call` sends to the reserved key, and only if
//!   its service is still in the ready set. A `poll_ready` again before `call` (which is the
//!   only way a `Change::Remove` can be applied in between) checks the reserved node again
//!   by key: still known, available and ready, it keeps it; otherwise it picks anew.
//!
//! # Why not `tower::balance::p2c::Balance`
//! tower's p2c remembers its choice as a *position* in the ready set (tower-rs/tower#856). A
//! `Change::Remove` applied by a second `poll_ready` swap-removes an entry, moving the last
//! ready service into the remembered position, and the request goes to that service, which
//! nobody chose (even a node the strategy would never pick). Reserving by key, as here,
//! cannot misroute; the integration tests show both behaviours side by side. tower's p2c also
//! cannot exclude draining or full nodes, only rank them by a `Load`; for users who want it
//! anyway, [`ConnectionLoad`](crate::ConnectionLoad) gives it our live-connection load.
//!
//! # Readiness and errors
//! - No node known: `Pending` until the discovery yields one.
//! - Nodes known, some available by their info but not ready: `Pending` until one is ready.
//! - Nodes known, none available by their info (all draining, offline or full), or the
//!   discovery ended with no node: `Ready`, and the next `call` fails at once with
//!   [`NoAvailableNode`]. Failing the call rather than `poll_ready` keeps the balancer usable
//!   behind a [`Buffer`], which treats a `poll_ready` error as fatal.
//! - A service that fails its `poll_ready` is dropped (with its node) until the discovery
//!   inserts it again, as in tower's balancer.
//! - An insert for a known key replaces the node's service at once: unlike tower's
//!   balancer, the old service is never called again, even before the new one is ready.
//! - A discovery error fails `poll_ready` with [`DiscoverError`].
//!
//! # Sharing
//! `Balance` is not `Clone`. Put it behind a [`Buffer`] ([`Balance::buffered`], or
//! [`tower::buffer::BufferLayer`] over a [`BalanceLayer`]): one worker task owns it and the
//! discovery, callers hold cheap clones of the buffer handle.
//!
//! [`ReadyCache`]: tower::ready_cache::ReadyCache
//! [`Buffer`]: tower::buffer::Buffer
//! [`LiveNodeInfo`]: hybrid_cluster_core::LiveNodeInfo

mod future;
mod layer;

use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};

use hybrid_cluster_core::{Epoch, HasNodeInfo};
use tower::buffer::Buffer;
use tower::discover::{Change, Discover};
use tower::ready_cache::ReadyCache;
use tower::ready_cache::error::Failed;
use tower_service::Service;
use tracing::{debug, trace};

pub use self::future::ResponseFuture;
pub use self::layer::BalanceLayer;
use crate::error::{BoxError, DiscoverError, NoAvailableNode, NotReady};
use crate::nodes::NodeSet;
use crate::strategy::{Selector, Strategy};

/// What `poll_ready` set aside for the next `call`.
#[derive(Debug)]
enum Reserved<K> {
    /// This node's service was polled ready.
    Node(K),
    /// No node can be chosen: the call fails with this.
    Unavailable(NoAvailableNode),
}

/// Routes each request to the node a [`Strategy`] chooses among those a [`Discover`] yields.
///
/// See the [module docs](self) for the model. The services must implement [`HasNodeInfo`];
/// the discovery must be [`Unpin`] (wrap it in `Box::pin` otherwise).
pub struct Balance<D, Req>
where
    D: Discover,
    D::Key: Hash,
{
    discover: D,
    discover_ended: bool,
    services: ReadyCache<D::Key, D::Service, Req>,
    nodes: NodeSet<D::Key>,
    selector: Selector,
    reserved: Option<Reserved<D::Key>>,
    /// The node last called: the cache moved its service to pending, and the node set learns
    /// whether it is still not ready at the next `poll_ready` (no pick happens before), so a
    /// service that is ready again at once never leaves and re-enters the indexes.
    called: Option<D::Key>,
}

impl<D, Req> fmt::Debug for Balance<D, Req>
where
    D: Discover,
    D::Key: Hash + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("strategy", &self.selector.strategy())
            .field("nodes", &self.nodes)
            .field("ready", &self.services.ready_len())
            .field("pending", &self.services.pending_len())
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl<D, Req> Balance<D, Req>
where
    D: Discover,
    D::Key: Hash + Clone,
    D::Service: Service<Req>,
{
    /// A balancer choosing by least connections, with a generator seeded from the OS.
    pub fn new(discover: D) -> Self {
        Self::with_selector(discover, Selector::default())
    }

    /// A balancer choosing by `strategy`, with a generator seeded from the OS.
    pub fn with_strategy(discover: D, strategy: Strategy) -> Self {
        Self::with_selector(discover, Selector::new(strategy))
    }

    /// A balancer choosing with `selector` (e.g. [`Selector::seeded`] in tests).
    pub fn with_selector(discover: D, selector: Selector) -> Self {
        Self {
            discover,
            discover_ended: false,
            services: ReadyCache::default(),
            nodes: NodeSet::new(),
            selector,
            reserved: None,
            called: None,
        }
    }

    /// Follows `epoch` to notice node-info changes: one atomic load per `poll_ready` while
    /// nothing changed, instead of one per node. Every service's cell must bump `epoch`
    /// (the cells of one `hybrid-cluster-discovery` share one); call this before the first
    /// `poll_ready`.
    pub fn with_shared_epoch(mut self, epoch: Epoch) -> Self {
        self.nodes = NodeSet::with_shared_epoch(epoch);
        self
    }
}

impl<D, Req> Balance<D, Req>
where
    D: Discover,
    D::Key: Hash,
{
    /// The nodes known, with their info as of the last `poll_ready`.
    pub fn nodes(&self) -> &NodeSet<D::Key> {
        &self.nodes
    }

    /// The strategy applied.
    pub fn strategy(&self) -> Strategy {
        self.selector.strategy()
    }
}

impl<D, Req> Balance<D, Req>
where
    D: Discover + Unpin + Send + 'static,
    D::Key: Hash + Clone + Send,
    D::Error: Into<BoxError>,
    D::Service: Service<Req> + HasNodeInfo + Send,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    <D::Service as Service<Req>>::Future: Send,
    Req: Send + 'static,
{
    /// Puts the balancer behind a [`Buffer`] of `bound` requests, whose worker is spawned on
    /// the current tokio runtime: the returned handle is `Clone`, and every clone routes
    /// through this one balancer.
    ///
    /// # Panics
    /// Outside a tokio runtime (as [`Buffer::new`] does); use [`Buffer::pair`] to spawn
    /// the worker yourself.
    pub fn buffered(self, bound: usize) -> BufferedBalance<D, Req> {
        Buffer::new(self, bound)
    }
}

/// A [`Balance`] behind a [`Buffer`]: cloneable, each clone sending through one balancer.
pub type BufferedBalance<D, Req> =
    Buffer<Req, ResponseFuture<<<D as Discover>::Service as Service<Req>>::Future>>;

impl<D, Req> Balance<D, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone,
    D::Error: Into<BoxError>,
    D::Service: Service<Req> + HasNodeInfo,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
{
    /// Applies the discovery's changes until it has none ready.
    fn update_from_discover(&mut self, cx: &mut Context<'_>) -> Result<(), DiscoverError> {
        while !self.discover_ended {
            match Pin::new(&mut self.discover).poll_discover(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    debug!("discovery ended");
                    self.discover_ended = true;
                }
                Poll::Ready(Some(Err(error))) => return Err(DiscoverError::new(error.into())),
                Poll::Ready(Some(Ok(change))) => {
                    self.nodes.apply(&change, false);
                    match change {
                        Change::Insert(key, service) => {
                            trace!("insert");
                            // A replaced service is dropped at once (the cache would otherwise
                            // keep calling the old one until the new one is ready): a
                            // re-insert is a new service for the node, e.g. after a restart.
                            // The node then waits, like a new one, until its new service is
                            // ready (inserted not ready above).
                            self.services.evict(&key);
                            self.services.push(key, service);
                        }
                        Change::Remove(key) => {
                            trace!("remove");
                            self.services.evict(&key);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Drives pending services and marks the ones that became ready.
    fn promote_pending(&mut self, cx: &mut Context<'_>) {
        // The ready set only grows while pending services are polled, and a service that
        // becomes ready is appended (or replaces its key's older service in place): the
        // positions past `before` are exactly the keys that became ready.
        let before = self.services.ready_len();
        loop {
            match self.services.poll_pending(cx) {
                Poll::Ready(Ok(())) | Poll::Pending => break,
                Poll::Ready(Err(failed)) => self.drop_failed(failed),
            }
        }
        for index in before..self.services.ready_len() {
            if let Some((key, _)) = self.services.get_ready_index(index) {
                self.nodes.set_ready(key, true);
            }
        }
    }

    /// A service failed: forget its node, unless an older service of the same key is still
    /// ready (a replacement failed).
    fn drop_failed(&mut self, Failed(key, error): Failed<D::Key>) {
        debug!(%error, "dropping failed endpoint");
        if self.services.get_ready(&key).is_none() {
            self.nodes.remove(&key);
        }
    }

    /// Polls `key`'s service: whether it is ready to take the request now.
    fn check(&mut self, cx: &mut Context<'_>, key: &D::Key) -> bool {
        match self.services.check_ready(cx, key) {
            Ok(true) => true,
            Ok(false) => {
                self.nodes.set_ready(key, false);
                false
            }
            Err(failed) => {
                self.drop_failed(failed);
                false
            }
        }
    }
}

impl<D, Req> Service<Req> for Balance<D, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone,
    D::Error: Into<BoxError>,
    D::Service: Service<Req> + HasNodeInfo,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = BoxError;
    type Future = ResponseFuture<<D::Service as Service<Req>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.update_from_discover(cx)?;
        self.promote_pending(cx);
        if let Some(key) = self.called.take()
            && self.services.get_ready(&key).is_none()
        {
            self.nodes.set_ready(&key, false);
        }
        self.nodes.refresh();

        // A node reserved by an earlier poll_ready keeps its reservation only if it is still
        // known, available by its current info, and its service is still ready: checked by
        // key, so a removal of any node in between cannot redirect the request.
        if let Some(Reserved::Node(key)) = self.reserved.take() {
            if self.nodes.is_available(&key) && self.check(cx, &key) {
                self.reserved = Some(Reserved::Node(key));
                return Poll::Ready(Ok(()));
            }
            trace!("reserved node is gone or unavailable: choosing again");
        }

        loop {
            let key = match self.selector.pick(&self.nodes) {
                Ok(candidate) => candidate.key.clone(),
                Err(none) => {
                    let wait = none.not_ready > 0 || (none.known == 0 && !self.discover_ended);
                    if wait {
                        // Woken by the discovery or by a pending service.
                        return Poll::Pending;
                    }
                    debug!(%none, "no node available");
                    self.reserved = Some(Reserved::Unavailable(none));
                    return Poll::Ready(Ok(()));
                }
            };
            // Each failed check takes the node out of the available set: the loop ends.
            if self.check(cx, &key) {
                self.reserved = Some(Reserved::Node(key));
                return Poll::Ready(Ok(()));
            }
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.reserved.take() {
            Some(Reserved::Node(key)) if self.services.get_ready(&key).is_some() => {
                let future = self.services.call_ready(&key, request);
                self.called = Some(key);
                ResponseFuture::called(future)
            }
            Some(Reserved::Unavailable(none)) => ResponseFuture::failed(none),
            Some(Reserved::Node(_)) | None => ResponseFuture::failed(NotReady),
        }
    }
}
