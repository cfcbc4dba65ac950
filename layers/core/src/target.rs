//! Where an envelope goes, and the routing key that takes it there.

use std::fmt;
use std::str::FromStr;

use crate::broker::RoutingKey;
use crate::ids::{ConnectionId, GroupName, NodeId};

/// Where an envelope goes.
///
/// Its text form (`Display`, [`FromStr`]) is `connection:{connection id}`, `node:{node id}`,
/// `broadcast` or `group:{group}`: what the envelope's MAC covers and what the wire carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// One connection, on the node its id names.
    Connection(ConnectionId),
    /// A node itself (node-to-node control traffic).
    Node(NodeId),
    /// Every connection on every node.
    Broadcast,
    /// The members of a group, on the nodes that have some.
    Group(GroupName),
}

/// The error returned for a string that is not the text form of a [`Target`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid target: {reason}")]
pub struct InvalidTarget {
    reason: &'static str,
}

impl InvalidTarget {
    /// What is wrong with the text.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl Target {
    /// The routing key that takes an envelope for this target to the right node queues, with
    /// one key per group ([`GroupKeys::PerGroup`](crate::GroupKeys::PerGroup)); a group's
    /// key under buckets is [`GroupKeys::key`](crate::GroupKeys::key).
    pub fn routing_key(&self) -> RoutingKey {
        match self {
            Self::Connection(id) => RoutingKey::Node(id.node().clone()),
            Self::Node(node) => RoutingKey::Node(node.clone()),
            Self::Broadcast => RoutingKey::Broadcast,
            Self::Group(group) => RoutingKey::Group(group.clone()),
        }
    }
}

impl FromStr for Target {
    type Err = InvalidTarget;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| InvalidTarget { reason };
        if value == "broadcast" {
            return Ok(Self::Broadcast);
        }
        let (kind, rest) = value
            .split_once(':')
            .ok_or_else(|| invalid("expected connection:, node:, group: or broadcast"))?;
        match kind {
            "connection" => rest
                .parse()
                .map(Self::Connection)
                .map_err(|_| invalid("the connection id is invalid")),
            "node" => NodeId::new(rest)
                .map(Self::Node)
                .map_err(|_| invalid("the node id is invalid")),
            "group" => GroupName::new(rest)
                .map(Self::Group)
                .map_err(|_| invalid("the group name is invalid")),
            _ => Err(invalid("expected connection:, node:, group: or broadcast")),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connection(id) => write!(f, "connection:{id}"),
            Self::Node(node) => write!(f, "node:{node}"),
            Self::Broadcast => f.write_str("broadcast"),
            Self::Group(group) => write!(f, "group:{group}"),
        }
    }
}

impl From<ConnectionId> for Target {
    fn from(id: ConnectionId) -> Self {
        Self::Connection(id)
    }
}

impl From<&ConnectionId> for Target {
    fn from(id: &ConnectionId) -> Self {
        Self::Connection(id.clone())
    }
}

impl From<GroupName> for Target {
    fn from(group: GroupName) -> Self {
        Self::Group(group)
    }
}

impl From<&GroupName> for Target {
    fn from(group: &GroupName) -> Self {
        Self::Group(group.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Incarnation;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    #[test]
    fn routing_keys_follow_targets() {
        let to = ConnectionId::new(node("b"), Incarnation::from_u64(2), 3);
        assert_eq!(
            Target::Connection(to).routing_key(),
            RoutingKey::Node(node("b"))
        );
        assert_eq!(Target::Broadcast.routing_key(), RoutingKey::Broadcast);
    }

    #[test]
    fn the_text_form_reads_back() {
        let to = ConnectionId::new(node("b"), Incarnation::from_u64(2), 3);
        for target in [
            Target::Connection(to),
            Target::Node(node("n1")),
            Target::Broadcast,
            Target::Group(GroupName::new("room: lobby/1").unwrap()),
        ] {
            assert_eq!(target.to_string().parse::<Target>().unwrap(), target);
        }
        let err = "planet:mars".parse::<Target>().unwrap_err();
        assert!(err.reason().contains("expected connection:"), "{err}");
    }
}
