//! [`BalanceLayer`]: builds a [`Balance`] over a discovery.

use std::fmt;
use std::marker::PhantomData;

use hybrid_cluster_core::Epoch;
use tower::discover::Discover;
use tower_layer::Layer;
use tower_service::Service;

use super::Balance;
use crate::strategy::{Selector, Strategy};

/// Turns a [`Discover`] into a [`Balance`] choosing by a [`Selector`].
///
/// The balancer is not `Clone`; to share it, wrap the layer's output in
/// [`tower::buffer::BufferLayer`] (see the [crate docs](crate)).
pub struct BalanceLayer<Req> {
    selector: Selector,
    epoch: Option<Epoch>,
    _req: PhantomData<fn(Req)>,
}

impl<Req> BalanceLayer<Req> {
    /// A layer choosing by `strategy`, with a generator seeded from the operating system.
    pub fn new(strategy: Strategy) -> Self {
        Self::with_selector(Selector::new(strategy))
    }

    /// A layer whose balancers each start from a clone of `selector` (its strategy, its
    /// generator state).
    pub fn with_selector(selector: Selector) -> Self {
        Self {
            selector,
            epoch: None,
            _req: PhantomData,
        }
    }

    /// Balancers built follow `epoch`, the one every cell of the discovery bumps (see
    /// [`Balance::with_shared_epoch`]).
    pub fn with_shared_epoch(mut self, epoch: Epoch) -> Self {
        self.epoch = Some(epoch);
        self
    }
}

impl<Req> Default for BalanceLayer<Req> {
    fn default() -> Self {
        Self::new(Strategy::default())
    }
}

impl<Req> Clone for BalanceLayer<Req> {
    fn clone(&self) -> Self {
        Self {
            selector: self.selector.clone(),
            epoch: self.epoch.clone(),
            _req: PhantomData,
        }
    }
}

impl<Req> fmt::Debug for BalanceLayer<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceLayer")
            .field("strategy", &self.selector.strategy())
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl<D, Req> Layer<D> for BalanceLayer<Req>
where
    D: Discover,
    D::Key: std::hash::Hash + Clone,
    D::Service: Service<Req>,
{
    type Service = Balance<D, Req>;

    fn layer(&self, discover: D) -> Self::Service {
        let balance = Balance::with_selector(discover, self.selector.clone());
        match &self.epoch {
            Some(epoch) => balance.with_shared_epoch(epoch.clone()),
            None => balance,
        }
    }
}
