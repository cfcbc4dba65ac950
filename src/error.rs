//! What can go wrong, for a node starting and for a message being sent.

use hybrid_cluster_core::{
    BrokerError, ConnectionId, GroupName, NodeId, RegistryError, Target, UserId,
};
use hybrid_cluster_discovery::DiscoveryError;
use hybrid_cluster_routing::ForwardError;

/// A node could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The registry (Redis) could not be reached or refused.
    #[error("cannot use the registry")]
    Registry(#[from] RegistryError),
    /// The broker (RabbitMQ) could not be reached or refused.
    #[error("cannot use the broker")]
    Broker(#[from] BrokerError),
    /// Discovery could not start or leave.
    #[error("discovery failed")]
    Discovery(#[from] DiscoveryError),
    /// A step of a shutdown did not finish within the shutdown grace period.
    #[error("{0} did not finish within the shutdown grace period")]
    TimedOut(&'static str),
}

/// A message was not delivered, or its delivery is not known.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The target connection does not exist: it closed, or it belonged to a previous run of
    /// its node. Nothing was delivered.
    #[error("connection {connection} does not exist")]
    NotFound {
        /// The target.
        connection: ConnectionId,
    },
    /// The target's node is gone, or the broker could not take the message. For
    /// [`ForwardError::Broker`] as the source, whether it was delivered is unknown.
    #[error("node {node} cannot be reached")]
    Unreachable {
        /// The node.
        node: NodeId,
        /// Why, when the broker said.
        #[source]
        source: Option<ForwardError>,
    },
    /// The broker refused the message for a group or broadcast, or all nodes could not be
    /// reached. Some connections (those on this node at least) may have it.
    #[error("the message could not be sent to the cluster")]
    Broadcast(#[source] ForwardError),
    /// The message cannot travel: too large, or not of its declared kind.
    #[error("the message is invalid")]
    Invalid(#[source] ForwardError),
    /// The node's queue could not be bound to or unbound from a group's key.
    #[error("the group membership could not be changed")]
    Group(#[source] BrokerError),
    /// The connection sending is not registered on this node any more.
    #[error("connection {connection} is not registered here")]
    NotRegistered {
        /// The connection.
        connection: ConnectionId,
    },
    /// Joining or leaving a group needs a connection: this handle sends as the node.
    #[error("only a connection's handle can join or leave a group")]
    NoConnection,
    /// The user has no connection anywhere in the cluster. Nothing was delivered.
    #[error("user {user} has no connection")]
    UserNotFound {
        /// The user.
        user: UserId,
    },
    /// The group is one the cluster keeps for itself (its name starts with `~`): no handle
    /// joins or leaves it, no client sends to it.
    #[error("group {group} is reserved for the cluster")]
    ReservedGroup {
        /// The group.
        group: GroupName,
    },
    /// Presence is off on this cluster ([`ClusterConfig::presence`](crate::ClusterConfig)).
    #[error("presence is off on this cluster")]
    PresenceOff,
    /// The presence store (Redis) did not answer, or not in time.
    #[error("the presence store cannot be reached")]
    Presence(#[source] RegistryError),
    /// Messages cannot be sent to this kind of target (a node as such takes none yet).
    #[error("messages cannot be sent to {target}")]
    UnsupportedTarget {
        /// The target.
        target: Target,
    },
}

impl SendError {
    /// A short, stable code for clients: `not_found`, `unreachable` or `bad_request`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } | Self::NotRegistered { .. } | Self::UserNotFound { .. } => {
                "not_found"
            }
            Self::Unreachable { .. } | Self::Broadcast(_) | Self::Group(_) | Self::Presence(_) => {
                "unreachable"
            }
            Self::Invalid(_)
            | Self::NoConnection
            | Self::UnsupportedTarget { .. }
            | Self::ReservedGroup { .. }
            | Self::PresenceOff => "bad_request",
        }
    }
}

pub use hybrid_cluster_core::error::error_chain;
