//! Connection ids: which node a WebSocket connection lives on, and which one it is there.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::node::{Incarnation, NodeId};

/// The cluster-wide id of one WebSocket connection.
///
/// It carries the node the connection lives on and that node's [`Incarnation`], so a message
/// for it is routed straight to that node with no lookup, and a connection id left over from a
/// node's previous run is recognised as gone. Its text form is
/// `{node_id}:{incarnation}:{sequence}`, e.g. `node-1:5f0c6a3e9b1d2c47:42`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionId {
    node: NodeId,
    incarnation: Incarnation,
    sequence: u64,
}

impl ConnectionId {
    /// The id of connection number `sequence` of `node`'s run `incarnation`.
    pub fn new(node: NodeId, incarnation: Incarnation, sequence: u64) -> Self {
        Self {
            node,
            incarnation,
            sequence,
        }
    }

    /// The node the connection lives on.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The run of the node that accepted the connection.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// The connection's number on its node.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.node, self.incarnation, self.sequence)
    }
}

impl fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectionId({self})")
    }
}

/// The error returned for a string that is not a [`ConnectionId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid connection id {id:?}: {reason}")]
pub struct ConnectionIdError {
    id: String,
    reason: &'static str,
}

impl FromStr for ConnectionId {
    type Err = ConnectionIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| ConnectionIdError {
            id: s.chars().take(128).collect(),
            reason,
        };
        let mut parts = s.rsplitn(3, ':');
        let (Some(sequence), Some(incarnation), Some(node)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("expected NODE:INCARNATION:SEQUENCE"));
        };
        let node = NodeId::new(node).map_err(|_| invalid("the node id is invalid"))?;
        let incarnation = incarnation
            .parse()
            .map_err(|_| invalid("the incarnation is not 1 to 16 hex digits"))?;
        if sequence.is_empty() || !sequence.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("the sequence is not a decimal number"));
        }
        let sequence = sequence
            .parse()
            .map_err(|_| invalid("the sequence is out of range"))?;
        Ok(Self::new(node, incarnation, sequence))
    }
}

impl Serialize for ConnectionId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConnectionId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hands out the connection ids of one node run, never the same one twice.
#[derive(Debug)]
pub struct ConnectionIds {
    node: NodeId,
    incarnation: Incarnation,
    next: AtomicU64,
}

impl ConnectionIds {
    /// Ids for connections of `node` in its run `incarnation`, numbered from 1.
    pub fn new(node: NodeId, incarnation: Incarnation) -> Self {
        Self {
            node,
            incarnation,
            next: AtomicU64::new(1),
        }
    }

    /// The next unused id.
    pub fn next_id(&self) -> ConnectionId {
        let sequence = self.next.fetch_add(1, Ordering::Relaxed);
        ConnectionId::new(self.node.clone(), self.incarnation, sequence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips() {
        let ids = ConnectionIds::new(
            NodeId::new("eu.node-1").unwrap(),
            Incarnation::from_u64(0xa1),
        );
        let first = ids.next_id();
        let second = ids.next_id();
        assert_ne!(first, second);
        assert_eq!(first.to_string(), "eu.node-1:00000000000000a1:1");
        assert_eq!(first.to_string().parse::<ConnectionId>().unwrap(), first);
        let json = serde_json::to_string(&second).unwrap();
        assert_eq!(json, "\"eu.node-1:00000000000000a1:2\"");
        assert_eq!(serde_json::from_str::<ConnectionId>(&json).unwrap(), second);
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "",
            "node-1",
            "node-1:a1",
            ":a1:1",
            "node 1:a1:1",
            "node-1:xyz:1",
            "node-1::1",
            "node-1:a1:",
            "node-1:a1:-1",
            "node-1:a1:+1",
            "node-1:a1:99999999999999999999999",
            "node-1:11111111111111111:1",
        ] {
            assert!(bad.parse::<ConnectionId>().is_err(), "{bad:?} was accepted");
        }
    }
}
