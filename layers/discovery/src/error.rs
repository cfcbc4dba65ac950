//! Discovery's errors.

use hybrid_cluster_core::node::NodeRecordError;
use hybrid_cluster_core::{NodeId, RegistryError};

/// A failure of discovery that its caller must hear of: at start-up, or when pushing an update.
///
/// Failures while running (the registry going away, a malformed peer record) are not errors to
/// anyone: discovery logs them, keeps its last known view and recovers by itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The registry failed or could not be reached.
    #[error("the registry failed")]
    Registry(#[from] RegistryError),
    /// This node's info cannot be published as it is.
    #[error("this node's info is invalid")]
    InvalidNodeInfo(#[source] NodeRecordError),
    /// An update names another node than this one.
    #[error("node info for {found} cannot update node {expected}")]
    WrongNode {
        /// This node.
        expected: NodeId,
        /// The node the update named.
        found: NodeId,
    },
    /// The configuration cannot work.
    #[error("invalid discovery configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// The registrar has left the cluster: it publishes nothing more.
    #[error("this node has left the cluster")]
    Left,
}
