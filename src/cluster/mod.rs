//! One running node of the cluster, as its user holds it: [`Cluster`].
//!
//! The node itself ([`Node`](crate::node::Node)) is shared by the cluster, its handles and
//! its layer; this module starts it ([`start`]), runs its background tasks ([`tasks`]) and
//! stops it ([`Cluster::shutdown`]).

mod start;
mod stop;
mod tasks;

use std::fmt;
use std::sync::Arc;

use hybrid_cluster_balance::{Placement, Redirect};
use hybrid_cluster_core::{Incarnation, NodeId, NodeInfo};
use hybrid_cluster_discovery::Discovery;
use serde::Serialize;

use crate::config::{Backends, ClusterConfig};
use crate::error::ClusterError;
use crate::handle::ClusterHandle;
use crate::node::Node;

/// A running node of the cluster.
///
/// [`Cluster::start`] registers the node, declares its queue, starts receiving and follows
/// the other nodes. [`Cluster::layer`] gives the tower layer to stack onto the WebSocket
/// server; [`Cluster::handle`] sends from anywhere in the process; [`Cluster::shutdown`]
/// leaves gracefully. Cloning is cheap; the node stops when the last clone and the last
/// connection are dropped.
#[derive(Clone)]
pub struct Cluster {
    pub(crate) node: Arc<Node>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node.id)
            .field("incarnation", &self.node.incarnation)
            .field("connections", &self.node.local.len())
            .field("draining", &self.node.is_draining())
            .finish()
    }
}

/// The node a new client should connect to now: what [`Cluster::placement`] and the node
/// server's `GET /cluster/placement` answer. Its JSON form is `{"url":URL,"node_id":ID}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlacementAdvice {
    /// The node's WebSocket URL (its public URL when it has one).
    pub url: String,
    /// The node.
    pub node_id: NodeId,
}

/// Whether `node` can take a client the balancer placed on it: it is not draining, and is
/// below its connection limit. A node that cannot never names itself.
pub(crate) fn accepts_here(node: &Node) -> bool {
    !node.is_draining() && node.local.len() < node.config.max_connections as usize
}

impl Cluster {
    /// Starts this node: connects the backends, declares its queue, registers it, and starts
    /// receiving. Fails, naming the problem, when a backend cannot be reached.
    pub async fn start(config: ClusterConfig, backends: Backends) -> Result<Self, ClusterError> {
        let node = start::start(config, backends).await?;
        Ok(Self { node })
    }
    /// A handle that sends from this node (with no sending connection).
    pub fn handle(&self) -> ClusterHandle {
        ClusterHandle::new(Arc::clone(&self.node), None)
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.node.id
    }

    /// This run of the node.
    pub fn incarnation(&self) -> Incarnation {
        self.node.incarnation
    }

    /// Every node of the cluster as this node sees it, this one included.
    pub fn nodes(&self) -> Vec<Arc<NodeInfo>> {
        self.node.discovery.nodes()
    }

    /// This node's discovery (its registrar and its view of the cluster).
    pub fn discovery(&self) -> &Discovery {
        &self.node.discovery
    }

    /// Live connections on this node.
    pub fn local_connections(&self) -> usize {
        self.node.local.len()
    }

    /// The peers that key group messages otherwise than this node
    /// ([`ClusterConfig::group_keys`](crate::ClusterConfig::group_keys)): none in a cluster set
    /// up right. Group messages between this node and those are lost; each is logged as an
    /// error when it is seen, and counted in `hybrid_cluster_peers_with_other_group_keys`.
    pub fn peers_keying_groups_otherwise(&self) -> Vec<NodeId> {
        self.node.peers_keying_groups_otherwise()
    }

    /// Whether this node is draining or stopped.
    pub fn is_draining(&self) -> bool {
        self.node.is_draining()
    }

    /// Whether this node serves as it should: not draining, and receiving from the broker.
    /// Otherwise, why not, in words (what `/healthz` answers with its 503).
    pub fn health(&self) -> Result<(), String> {
        if self.node.is_draining() {
            return Err("draining".to_owned());
        }
        match self.node.not_receiving() {
            Some(reason) => Err(format!("not receiving from the broker: {reason}")),
            None => Ok(()),
        }
    }

    /// The node a new client should connect to now, as the balancer places it (this node
    /// when it would keep the client), or `None` when no node has room: the answer of the
    /// node server's `GET /cluster/placement`, for clients that ask before they connect.
    ///
    /// It is advice, and reserves nothing: the node named places the client again when it
    /// connects, and no answer counts against any node, so that asking (an anonymous route
    /// of the node server) cannot make nodes look full. A draining node, or one at its
    /// connection limit, never names itself.
    pub fn placement(&self) -> Option<PlacementAdvice> {
        let node = &self.node;
        let here = || PlacementAdvice {
            url: node.local_info.get().ws_url(),
            node_id: node.id.clone(),
        };
        let elsewhere = |redirect: Redirect| PlacementAdvice {
            url: redirect.ws_url(),
            node_id: redirect.node,
        };
        match node.placer.advise() {
            Placement::Accept if accepts_here(node) => Some(here()),
            Placement::Redirect(redirect) => Some(elsewhere(redirect)),
            Placement::Accept => node.placer.roomiest_peer().map(elsewhere),
            Placement::Refuse(_) => None,
        }
    }

    /// Sets this node Draining: it keeps serving its connections, but new clients are sent
    /// to other nodes, and peers' balancers stop choosing it.
    pub async fn drain(&self) -> Result<(), ClusterError> {
        self.node.drain().await
    }

    /// Leaves the cluster gracefully: drains, closes every local connection with close code
    /// 1012 and a reason naming a node to reconnect to (JSON, see [`close_reason`](crate::close_reason)), waits
    /// for them to go, then leaves discovery and removes the node's queue.
    ///
    /// It always ends within [`ClusterConfig::shutdown_grace`](crate::ClusterConfig), whatever
    /// the state of the connections and the servers: clients get most of the period to close
    /// (the last quarter, at most 2 s, is kept for leaving), and each step that does not
    /// finish in time is cut short and named in the log (connections still open, messages
    /// still awaiting the broker's confirmation, a registry or broker that did not answer).
    /// A node that could not leave is dropped by its peers when its lease runs out.
    ///
    /// Calling it again after it succeeded does nothing; after it failed, it tries again.
    pub async fn shutdown(&self) -> Result<(), ClusterError> {
        stop::shutdown(&self.node).await
    }
}
