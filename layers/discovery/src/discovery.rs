//! Registration and view together: what one node runs.

use std::sync::Arc;

use hybrid_cluster_core::{NodeId, NodeInfo, NodeStatus, Registry};

use crate::config::DiscoveryConfig;
use crate::discover::NodeDiscover;
use crate::error::DiscoveryError;
use crate::registrar::Registrar;
use crate::stats::ConnectionCounter;
use crate::view::ClusterView;

/// One node's discovery: it registers this node ([`Registrar`]) and follows every node of the
/// cluster ([`ClusterView`]), this one included.
#[derive(Debug)]
pub struct Discovery {
    registrar: Registrar,
    view: ClusterView,
}

impl Discovery {
    /// Registers `local` in `registry`, starts its heartbeat, and starts following the
    /// cluster; returns once this node is registered and the registry was listed once.
    ///
    /// Fails when the configuration or `local` is invalid, or when the registry cannot be
    /// reached: a node that cannot join says so at start-up.
    pub async fn start(
        registry: Arc<dyn Registry>,
        local: NodeInfo,
        config: DiscoveryConfig,
    ) -> Result<Self, DiscoveryError> {
        let registrar = Registrar::start(Arc::clone(&registry), local, config.clone()).await?;
        let view = ClusterView::start(registry, &config);
        view.ready().await;
        Ok(Self { registrar, view })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.registrar.info().node_id
    }

    /// This node's registration.
    pub fn registrar(&self) -> &Registrar {
        &self.registrar
    }

    /// The cluster as this node sees it.
    pub fn view(&self) -> &ClusterView {
        &self.view
    }

    /// The counter published as this node's connection count.
    pub fn connections(&self) -> &ConnectionCounter {
        self.registrar.connections()
    }

    /// Every node's current info, this one included, in id order.
    pub fn nodes(&self) -> Vec<Arc<NodeInfo>> {
        self.view.nodes()
    }

    /// A tower `Discover` of the cluster's nodes (see [`ClusterView::discover`]).
    pub fn discover<F, S>(&self, make_service: F) -> NodeDiscover<F, S>
    where
        F: FnMut(&NodeInfo) -> S,
    {
        self.view.discover(make_service)
    }

    /// Pushes new info for this node at once (see [`Registrar::update_node_info`]).
    pub async fn update_node_info(&self, info: NodeInfo) -> Result<NodeInfo, DiscoveryError> {
        self.registrar.update_node_info(info).await
    }

    /// Sets this node Draining: peers still see it, balancers stop choosing it.
    pub async fn drain(&self) -> Result<NodeInfo, DiscoveryError> {
        self.registrar.set_status(NodeStatus::Draining).await
    }

    /// Leaves the cluster at once (graceful leave); peers drop this node in well under a
    /// second.
    pub async fn leave(self) -> Result<(), DiscoveryError> {
        self.registrar.leave().await
    }
}
