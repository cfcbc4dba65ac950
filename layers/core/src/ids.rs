//! The ids of the cluster: nodes, node runs, connections, messages and groups.
//!
//! Every id is a newtype made the same way: its constructor checks the text (or draws a random
//! value), `Display` writes the one text form, and [`FromStr`], `TryFrom<String>` and
//! `From<id> for String` are derived from those two, so serde reads and writes every id as that
//! same string (`#[serde(try_from = "String", into = "String")]`) and refuses a malformed one
//! with the id's own error.
//!
//! ```
//! use hybrid_cluster_core::{ConnectionId, GroupName, NodeId};
//!
//! let node: NodeId = "node-1".parse()?;
//! let id: ConnectionId = serde_json::from_str("\"node-1:00000000000000a1:7\"")?;
//! assert_eq!(id.node(), &node);
//! assert!(serde_json::from_str::<GroupName>("\"\"").is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Derives an id's conversions from its checking constructor and its `Display`: [`FromStr`],
/// `TryFrom<String>` (what serde reads through) and `From<id> for String` (what it writes).
macro_rules! text_form {
    ($id:ident, $error:ty, $parse:expr) => {
        impl FromStr for $id {
            type Err = $error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $parse(s)
            }
        }

        impl TryFrom<String> for $id {
            type Error = $error;

            fn try_from(s: String) -> Result<Self, Self::Error> {
                $parse(&s)
            }
        }

        impl From<$id> for String {
            fn from(id: $id) -> Self {
                id.to_string()
            }
        }
    };
}

/// Checks that `s` is 1 to `max_digits` hex digits and reads it.
fn parse_hex(s: &str, max_digits: usize) -> Option<u128> {
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

/// The longest node id accepted, in bytes.
pub const MAX_NODE_ID_LEN: usize = 64;

/// The name of a node, unique within a cluster.
///
/// 1 to 64 characters from `A-Z a-z 0-9 _ - .`, so that it can appear unescaped in Redis keys,
/// AMQP queue names and routing keys, and inside a [`ConnectionId`] (which uses `:` as its
/// separator). Cloning is cheap.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(Arc<str>);

/// The error returned for a string that is not a valid [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node id {id:?}: {reason}")]
pub struct InvalidNodeId {
    id: String,
    reason: &'static str,
}

impl NodeId {
    /// Checks `id` and makes a node id of it.
    pub fn new(id: impl AsRef<str>) -> Result<Self, InvalidNodeId> {
        let id = id.as_ref();
        let invalid = |reason| InvalidNodeId {
            id: id.chars().take(MAX_NODE_ID_LEN + 8).collect(),
            reason,
        };
        if id.is_empty() {
            return Err(invalid("it is empty"));
        }
        if id.len() > MAX_NODE_ID_LEN {
            return Err(invalid("it is longer than 64 bytes"));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(invalid("only A-Z, a-z, 0-9, '_', '-' and '.' are allowed"));
        }
        Ok(Self(Arc::from(id)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

text_form!(NodeId, InvalidNodeId, NodeId::new);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// One run of a node: a random number drawn when the node process starts.
///
/// A node that restarts under the same [`NodeId`] gets a new incarnation, so connection ids
/// handed out by its previous run can be told apart from live ones. Written as 16 lowercase
/// hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Incarnation(u64);

/// The error returned for a string that is not an [`Incarnation`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid incarnation: expected 1 to 16 hex digits")]
pub struct InvalidIncarnation;

impl Incarnation {
    /// A fresh random incarnation.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// An incarnation with a chosen value (tests and tools).
    pub const fn from_u64(value: u64) -> Self {
        Self(value)
    }

    /// The incarnation's value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    fn parse(s: &str) -> Result<Self, InvalidIncarnation> {
        parse_hex(s, 16)
            .and_then(|value| u64::try_from(value).ok())
            .map(Self)
            .ok_or(InvalidIncarnation)
    }
}

text_form!(Incarnation, InvalidIncarnation, Incarnation::parse);

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Incarnation({self})")
    }
}

/// The cluster-wide id of one WebSocket connection.
///
/// It carries the node the connection lives on and that node's [`Incarnation`], so a message
/// for it is routed straight to that node with no lookup, and a connection id left over from a
/// node's previous run is recognised as gone. Its text form is
/// `{node_id}:{incarnation}:{sequence}`, e.g. `node-1:5f0c6a3e9b1d2c47:42`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ConnectionId {
    node: NodeId,
    incarnation: Incarnation,
    sequence: u64,
}

/// The error returned for a string that is not a [`ConnectionId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid connection id {id:?}: {reason}")]
pub struct ConnectionIdError {
    id: String,
    reason: &'static str,
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

    fn parse(s: &str) -> Result<Self, ConnectionIdError> {
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
        let incarnation = Incarnation::parse(incarnation)
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

text_form!(ConnectionId, ConnectionIdError, ConnectionId::parse);

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

/// The unique id of one envelope: 128 random bits, written as 32 hex digits.
///
/// Receivers use it to recognise a message delivered twice (after a reconnect).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MessageId(u128);

/// The error returned for a string that is not a [`MessageId`] (32 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("envelope message id is not 32 hex digits")]
pub struct InvalidMessageId;

impl MessageId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// An id with a chosen value (tests and tools).
    pub const fn from_u128(value: u128) -> Self {
        Self(value)
    }

    /// The id's value.
    pub const fn as_u128(self) -> u128 {
        self.0
    }

    fn parse(s: &str) -> Result<Self, InvalidMessageId> {
        if s.len() != 32 {
            return Err(InvalidMessageId);
        }
        parse_hex(s, 32).map(Self).ok_or(InvalidMessageId)
    }
}

text_form!(MessageId, InvalidMessageId, MessageId::parse);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// The longest group name accepted, in bytes.
pub const MAX_GROUP_NAME_LEN: usize = 128;

/// The name of a group (a room): 1 to 128 bytes of printable text, no control characters.
///
/// A group message reaches the group's members on every node that has some. Cloning is cheap.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GroupName(Arc<str>);

/// The error returned for a string that is not a valid [`GroupName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid group name: {reason}")]
pub struct InvalidGroupName {
    reason: &'static str,
}

impl InvalidGroupName {
    /// What is wrong with the name.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl GroupName {
    /// Checks `name` and makes a group name of it.
    pub fn new(name: impl AsRef<str>) -> Result<Self, InvalidGroupName> {
        let name = name.as_ref();
        let invalid = |reason| InvalidGroupName { reason };
        if name.is_empty() {
            return Err(invalid("it is empty"));
        }
        if name.len() > MAX_GROUP_NAME_LEN {
            return Err(invalid("it is longer than 128 bytes"));
        }
        if name.chars().any(char::is_control) {
            return Err(invalid("it contains control characters"));
        }
        Ok(Self(Arc::from(name)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

text_form!(GroupName, InvalidGroupName, GroupName::new);

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// The prefix of the groups the cluster keeps for itself: no handle joins or leaves one, and
/// the node server refuses a client's join, leave, group message or presence query naming
/// one.
pub const RESERVED_GROUP_PREFIX: char = '~';

/// The prefix of a user's own group (see [`GroupName::of_user`]): the user id follows.
pub const USER_GROUP_PREFIX: &str = "~user:";

impl GroupName {
    /// The group every connection of `user` is a member of, on every node: a message to it
    /// reaches each of the user's connections once. Reserved: see [`GroupName::is_reserved`].
    pub fn of_user(user: &UserId) -> Self {
        Self(Arc::from(format!("{USER_GROUP_PREFIX}{}", user.as_str())))
    }

    /// The user whose group this is ([`GroupName::of_user`]), if it is one.
    pub fn user(&self) -> Option<UserId> {
        self.0
            .strip_prefix(USER_GROUP_PREFIX)
            .and_then(|user| UserId::new(user).ok())
    }

    /// Whether the cluster keeps this group for itself (its name starts with `~`): a
    /// client's join or group message naming it is refused.
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with(RESERVED_GROUP_PREFIX)
    }
}

/// The longest user id accepted, in bytes (a user's group name must fit in
/// [`MAX_GROUP_NAME_LEN`]).
pub const MAX_USER_ID_LEN: usize = 120;
const _: () = assert!(USER_GROUP_PREFIX.len() + MAX_USER_ID_LEN <= MAX_GROUP_NAME_LEN);

/// Who a connection belongs to, as the application knows them (a JWT's `sub`, an account
/// id): 1 to 120 bytes of printable text, no control characters. Cloning is cheap.
///
/// A user may have any number of connections, on any nodes; a message to the user reaches
/// each of them once.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(Arc<str>);

/// The error returned for a string that is not a valid [`UserId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid user id: {reason}")]
pub struct InvalidUserId {
    reason: &'static str,
}

impl InvalidUserId {
    /// What is wrong with the id.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl UserId {
    /// Checks `id` and makes a user id of it.
    pub fn new(id: impl AsRef<str>) -> Result<Self, InvalidUserId> {
        let id = id.as_ref();
        let invalid = |reason| InvalidUserId { reason };
        if id.is_empty() {
            return Err(invalid("it is empty"));
        }
        if id.len() > MAX_USER_ID_LEN {
            return Err(invalid("it is longer than 120 bytes"));
        }
        if id.chars().any(char::is_control) {
            return Err(invalid("it contains control characters"));
        }
        Ok(Self(Arc::from(id)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

text_form!(UserId, InvalidUserId, UserId::new);

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_group_is_reserved_and_names_its_user() {
        let alice = UserId::new("alice@example.com").unwrap();
        let group = GroupName::of_user(&alice);
        assert!(group.is_reserved());
        assert_eq!(group.user(), Some(alice));
        assert!(!GroupName::new("lobby").unwrap().is_reserved());
        assert_eq!(GroupName::new("lobby").unwrap().user(), None);
        // The longest user id still makes a valid group name, as its wire form is read.
        let longest = UserId::new("u".repeat(MAX_USER_ID_LEN)).unwrap();
        let group = GroupName::of_user(&longest);
        assert_eq!(GroupName::new(group.as_str()).unwrap(), group);
        assert!(UserId::new("u".repeat(MAX_USER_ID_LEN + 1)).is_err());
        assert!(UserId::new("").is_err());
        assert!(UserId::new("a\nb").is_err());
    }

    #[test]
    fn node_ids_are_checked() {
        assert!(NodeId::new("node-1.eu_west").is_ok());
        assert!(NodeId::new("").is_err());
        assert!(NodeId::new("a:b").is_err());
        assert!(NodeId::new("a b").is_err());
        assert!(NodeId::new("x".repeat(65)).is_err());
        assert!(NodeId::new("x".repeat(64)).is_ok());
        let err = NodeId::new("no/slash").unwrap_err().to_string();
        assert!(err.contains("no/slash") && err.contains("allowed"), "{err}");
    }

    #[test]
    fn group_names_are_checked() {
        assert!(GroupName::new("lobby").is_ok());
        assert!(GroupName::new("").is_err());
        assert!(GroupName::new("a\nb").is_err());
        assert!(GroupName::new("g".repeat(129)).is_err());
    }

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

    #[test]
    fn every_id_reads_back_from_its_json_string() {
        let node = NodeId::new("n1").unwrap();
        let message = MessageId::from_u128(0xab);
        let group = GroupName::new("room 1").unwrap();
        let incarnation = Incarnation::from_u64(7);
        let json = serde_json::to_string(&(&node, message, &group, incarnation)).unwrap();
        assert_eq!(
            json,
            "[\"n1\",\"000000000000000000000000000000ab\",\"room 1\",\"0000000000000007\"]"
        );
        let back: (NodeId, MessageId, GroupName, Incarnation) =
            serde_json::from_str(&json).unwrap();
        assert_eq!(back, (node, message, group, incarnation));
        assert!(serde_json::from_str::<MessageId>("\"ab\"").is_err());
        assert!(serde_json::from_str::<Incarnation>("\"\"").is_err());
    }
}
