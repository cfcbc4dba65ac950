//! The tower `Discover` of the cluster's nodes, and the service wrapper that gives balancers
//! each node's live load.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use hybrid_cluster_core::live::{HasNodeInfo, LiveNodeInfo};
use hybrid_cluster_core::{NodeId, NodeInfo};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tower::discover::Change;
use tower::load::Load;
use tower_service::Service;

use crate::membership::{MemberChange, Membership};

/// A node's service as discovery yields it: the service the user's factory built, with the
/// node's [`LiveNodeInfo`], kept current on every heartbeat.
///
/// Its [`Load`] is the node's live connections relative to its capacity (see
/// [`NodeInfo::load`]); a node that may take no new connections (Draining, or full) reports an
/// infinite load, so a load-based balancer such as `tower::balance::p2c` avoids it while
/// another node is available. A WebSocket costs tower's `PendingRequests` nothing after the
/// 101; live connections are the load that matters here.
pub struct NodeService<S> {
    inner: S,
    info: LiveNodeInfo,
}

impl<S> NodeService<S> {
    /// Wraps `inner`, the service of the node whose info is `info`.
    pub fn new(inner: S, info: LiveNodeInfo) -> Self {
        Self { inner, info }
    }

    /// The node's current info.
    pub fn node_info(&self) -> Arc<NodeInfo> {
        self.info.get()
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for NodeService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            info: self.info.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for NodeService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeService")
            .field("inner", &self.inner)
            .field("node", &self.info.get().node_id)
            .finish()
    }
}

impl<S, Request> Service<Request> for NodeService<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.inner.call(request)
    }
}

impl<S> Load for NodeService<S> {
    type Metric = f64;

    fn load(&self) -> f64 {
        self.info.get().balancing_load()
    }
}

impl<S> HasNodeInfo for NodeService<S> {
    fn live_node_info(&self) -> &LiveNodeInfo {
        &self.info
    }
}

/// The cluster's nodes as a tower [`Discover`](tower::discover::Discover): a stream of
/// `Change<NodeId, NodeService<S>>`.
///
/// It first inserts every node known at the time, then follows membership: `Insert` when a
/// node joins, `Remove` when it leaves, expires or goes Offline, and `Remove` then `Insert`
/// when a node restarts under a new incarnation. Services are built by the user's factory from
/// the node's info when the node is inserted; the factory must do no I/O (build lazy clients,
/// as tonic does). Changes of a node's figures do not replace its service: they update its
/// [`LiveNodeInfo`] in place, which the service's [`Load`] reads.
///
/// The stream never fails; it ends when the [`ClusterView`](crate::ClusterView) behind it
/// stops. See `ClusterView` for what happens when Redis goes away.
pub struct NodeDiscover<F, S> {
    members: WatchStream<Arc<Membership>>,
    /// The membership whose nodes are inserted.
    inserted: Arc<Membership>,
    pending: VecDeque<Change<NodeId, NodeService<S>>>,
    make_service: F,
}

impl<F, S> NodeDiscover<F, S>
where
    F: FnMut(&NodeInfo) -> S,
{
    pub(crate) fn new(members: watch::Receiver<Arc<Membership>>, make_service: F) -> Self {
        Self {
            members: WatchStream::new(members),
            inserted: Arc::default(),
            pending: VecDeque::new(),
            make_service,
        }
    }

    /// Queues the changes that take the nodes inserted so far to `membership`.
    /// A restarted node is removed, then inserted again with a new service.
    fn diff(&mut self, membership: Arc<Membership>) {
        let changes = membership.changes_since(&self.inserted);
        for change in &changes {
            if let MemberChange::Left(node) | MemberChange::Restarted(node) = change {
                self.pending.push_back(Change::Remove(node.clone()));
            }
        }
        for change in changes {
            if let MemberChange::Joined(node) | MemberChange::Restarted(node) = change
                && let Some(live) = membership.get(&node)
            {
                let service = (self.make_service)(&live.get());
                self.pending.push_back(Change::Insert(
                    node,
                    NodeService::new(service, live.clone()),
                ));
            }
        }
        self.inserted = membership;
    }
}

impl<F, S> Stream for NodeDiscover<F, S>
where
    F: FnMut(&NodeInfo) -> S,
{
    type Item = Result<Change<NodeId, NodeService<S>>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match Pin::new(&mut this.members).poll_next(cx) {
                Poll::Ready(Some(membership)) => this.diff(membership),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<F, S> Unpin for NodeDiscover<F, S> {}

impl<F, S> fmt::Debug for NodeDiscover<F, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeDiscover")
            .field("inserted", &self.inserted)
            .field("pending", &self.pending.len())
            .finish()
    }
}
