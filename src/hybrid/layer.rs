//! The tower layer.

use tower_layer::Layer;

use crate::cluster::Cluster;
use crate::hybrid::HybridCluster;

/// Stacks the cluster onto a hyper or axum WebSocket service: every WebSocket upgrade that
/// goes through it is admitted (and given a [`ClusterConnection`](crate::ClusterConnection)),
/// redirected to another node, or refused. See [`HybridCluster`].
///
/// Doing no I/O, it can be built and cloned freely.
#[derive(Clone, Debug)]
pub struct HybridClusterLayer {
    cluster: Cluster,
}

impl HybridClusterLayer {
    /// The layer of a running node.
    pub fn new(cluster: Cluster) -> Self {
        Self { cluster }
    }
}

impl Cluster {
    /// The tower layer that makes a WebSocket server's connections part of this cluster.
    // Defined with the layer, so that the cluster's module does not depend on this one.
    pub fn layer(&self) -> HybridClusterLayer {
        HybridClusterLayer::new(self.clone())
    }
}

impl<S> Layer<S> for HybridClusterLayer {
    type Service = HybridCluster<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HybridCluster::new(inner, self.cluster.clone())
    }
}
