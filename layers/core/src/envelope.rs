//! The envelope: one message between nodes.
//!
//! On the wire (see [`Envelope::to_message`]) the payload is the message body, bytes as they
//! are; everything else travels beside it, in as few headers as possible (a broker pays for
//! each header of each message):
//!
//! | header | value |
//! |---|---|
//! | message id | the [`MessageId`], 32 hex digits (AMQP's `message_id` property) |
//! | `hc-meta` | `1 {kind} {sent at} {origin} {sender} {target}`, separated by single spaces: the format version `1`; `t` (text: the payload is UTF-8) or `b` (binary); when it was sent, milliseconds since the Unix epoch by the sender's clock; the sending node's id; the sending connection's id, or `-` when no connection sent it; and last (a group name may hold spaces) the target: `connection:{connection id}`, `node:{node id}`, `broadcast` or `group:{group}` |
//! | `hc-mac` | when the cluster has a [`ClusterSecret`]: the HMAC-SHA256 of the envelope, 64 lowercase hex digits |
//! | anything else | extension headers (trace context), carried as they are |
//!
//! For example `1 t 1796024644123 node-a node-a:5f0c6a3e9b1d2c47:42 connection:node-b:00000000000000a1:7`.
//!
//! # What the MAC covers
//!
//! [`Envelope::sign`] computes HMAC-SHA256, keyed with the cluster secret, over a sequence of
//! fields, each written as its length in bytes (8 bytes, big-endian) followed by its bytes:
//!
//! 1. the domain `hybrid-cluster envelope v1`;
//! 2. the message id (32 lowercase hex digits), the origin, the target (as in `hc-meta`),
//!    the sender (empty when none), the kind (`text` or `binary`), the send time (decimal
//!    milliseconds, as in `hc-meta`);
//! 3. the number of extension headers (8 bytes, big-endian), then each header's name and
//!    value, in name order (`hc-mac` is not among them);
//! 4. the payload.
//!
//! Any change to any of them makes [`Envelope::verify`] fail.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::auth::{AuthError, ClusterSecret, Signature};
use crate::broker::{BrokerMessage, RoutingKey};
use crate::connection::ConnectionId;
use crate::node::NodeId;

/// Header with the envelope's routing metadata (see the [module docs](self)).
pub const HEADER_META: &str = "hc-meta";
/// The version of the `hc-meta` format this crate writes and reads.
const META_VERSION: &str = "1";
/// Header with the envelope's MAC (64 hex digits), when it is signed.
pub const HEADER_MAC: &str = "hc-mac";

/// The domain of envelope MACs.
const ENVELOPE_DOMAIN: &str = "hybrid-cluster envelope v1";
/// Prefix of the headers this crate reserves; extension headers may not use it.
pub const RESERVED_HEADER_PREFIX: &str = "hc-";

/// The unique id of one envelope: 128 random bits, written as 32 hex digits.
///
/// Receivers use it to recognise a message delivered twice (after a reconnect).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(u128);

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
}

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

impl FromStr for MessageId {
    type Err = EnvelopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || EnvelopeError::InvalidMessageId;
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        u128::from_str_radix(s, 16).map(Self).map_err(|_| invalid())
    }
}

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The longest group name accepted, in bytes.
pub const MAX_GROUP_NAME_LEN: usize = 128;

/// The name of a group (a room): 1 to 128 bytes of printable text, no control characters.
///
/// A group message reaches the group's members on every node that has some. Cloning is cheap.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupName(Arc<str>);

impl GroupName {
    /// Checks `name` and makes a group name of it.
    pub fn new(name: impl AsRef<str>) -> Result<Self, EnvelopeError> {
        let name = name.as_ref();
        let invalid = |reason| EnvelopeError::InvalidGroupName { reason };
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

impl FromStr for GroupName {
    type Err = EnvelopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for GroupName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for GroupName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::new(&*s).map_err(serde::de::Error::custom)
    }
}

/// Whether a payload is text (valid UTF-8, sent to clients as a text frame) or binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    /// UTF-8 text.
    Text,
    /// Arbitrary bytes.
    Binary,
}

impl PayloadKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Binary => "binary",
        }
    }
}

/// Where an envelope goes.
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

impl Target {
    /// The routing key that takes an envelope for this target to the right node queues.
    pub fn routing_key(&self) -> RoutingKey {
        match self {
            Self::Connection(id) => RoutingKey::Node(id.node().clone()),
            Self::Node(node) => RoutingKey::Node(node.clone()),
            Self::Broadcast => RoutingKey::Broadcast,
            Self::Group(group) => RoutingKey::Group(group.clone()),
        }
    }

    fn encode(&self) -> String {
        match self {
            Self::Connection(id) => format!("connection:{id}"),
            Self::Node(node) => format!("node:{node}"),
            Self::Broadcast => "broadcast".to_owned(),
            Self::Group(group) => format!("group:{group}"),
        }
    }

    fn decode(value: &str) -> Result<Self, EnvelopeError> {
        let invalid = |reason| EnvelopeError::InvalidHeader {
            name: HEADER_META,
            reason,
        };
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

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

/// One message between nodes.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique id, for duplicate suppression.
    pub id: MessageId,
    /// The node that sent it.
    pub origin: NodeId,
    /// The connection that sent it, if a connection did.
    pub sender: Option<ConnectionId>,
    /// Where it goes.
    pub target: Target,
    /// Text or binary payload.
    pub kind: PayloadKind,
    /// When it was sent, by the sender's clock (millisecond precision on the wire).
    pub sent_at: SystemTime,
    /// Extension headers (trace context). Names may not start with `hc-`.
    pub headers: BTreeMap<String, String>,
    /// The payload, carried as it is.
    pub payload: Bytes,
    /// The MAC made with the cluster secret ([`Envelope::sign`]), if it is signed. Any change
    /// to the other fields after signing makes it fail to verify.
    pub signature: Option<Signature>,
}

impl fmt::Debug for Envelope {
    // The payload is the user's data: never print it, only its size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("origin", &self.origin)
            .field("sender", &self.sender)
            .field("target", &self.target)
            .field("kind", &self.kind)
            .field("sent_at", &self.sent_at)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("payload_len", &self.payload.len())
            .field("signed", &self.signature.is_some())
            .finish()
    }
}

impl Envelope {
    /// A new envelope from `origin` to `target`, with a fresh id, sent now.
    pub fn new(
        origin: NodeId,
        target: Target,
        kind: PayloadKind,
        payload: impl Into<Bytes>,
    ) -> Self {
        Self {
            id: MessageId::random(),
            origin,
            sender: None,
            target,
            kind,
            sent_at: crate::node::now_millis(),
            headers: BTreeMap::new(),
            payload: payload.into(),
            signature: None,
        }
    }

    /// A new text envelope (see [`Envelope::new`]).
    pub fn text(origin: NodeId, target: Target, text: impl Into<String>) -> Self {
        Self::new(origin, target, PayloadKind::Text, text.into())
    }

    /// A new binary envelope (see [`Envelope::new`]).
    pub fn binary(origin: NodeId, target: Target, payload: impl Into<Bytes>) -> Self {
        Self::new(origin, target, PayloadKind::Binary, payload)
    }

    /// Sets the sending connection.
    pub fn with_sender(mut self, sender: ConnectionId) -> Self {
        self.sender = Some(sender);
        self
    }

    /// Signs the envelope with the cluster secret: sets its [`signature`](Envelope::signature)
    /// to the MAC of its current fields (see the [module docs](self)). Sign last, after every
    /// other change.
    pub fn sign(&mut self, secret: &ClusterSecret) {
        self.signature = Some(self.mac(secret).finish());
    }

    /// Checks that the envelope was signed with `secret` and is unchanged since, then that it
    /// was sent within `window` of `now` (either way: the sender's clock may be ahead).
    ///
    /// The MAC is checked first (in constant time), so a forged envelope is reported as
    /// [`AuthError::BadSignature`] whatever time it claims. Duplicates are not this method's
    /// business: a receiver remembers the ids it handled.
    pub fn verify(
        &self,
        secret: &ClusterSecret,
        now: SystemTime,
        window: Duration,
    ) -> Result<(), AuthError> {
        let signature = self.signature.as_ref().ok_or(AuthError::Unsigned)?;
        self.mac(secret).verify(signature)?;
        let sent_at = UNIX_EPOCH + Duration::from_millis(self.sent_at_ms());
        match now.duration_since(sent_at) {
            Ok(age) if age > window => Err(AuthError::Stale { age }),
            Ok(_) => Ok(()),
            Err(ahead) if ahead.duration() > window => Err(AuthError::FromTheFuture {
                ahead: ahead.duration(),
            }),
            Err(_) => Ok(()),
        }
    }

    fn mac(&self, secret: &ClusterSecret) -> crate::auth::MacInput {
        let mut mac = secret.mac(ENVELOPE_DOMAIN);
        mac.field(self.id.to_string().as_bytes());
        mac.field(self.origin.as_str().as_bytes());
        mac.field(self.target.encode().as_bytes());
        match &self.sender {
            Some(sender) => mac.field(sender.to_string().as_bytes()),
            None => mac.field(b""),
        }
        mac.field(self.kind.as_str().as_bytes());
        mac.field(self.sent_at_ms().to_string().as_bytes());
        mac.count(self.headers.len());
        for (name, value) in &self.headers {
            mac.field(name.as_bytes());
            mac.field(value.as_bytes());
        }
        mac.field(&self.payload);
        mac
    }

    /// The send time as carried on the wire: whole milliseconds since the Unix epoch.
    fn sent_at_ms(&self) -> u64 {
        let millis = self
            .sent_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        u64::try_from(millis).unwrap_or(u64::MAX)
    }

    /// The routing key of the envelope's target.
    pub fn routing_key(&self) -> RoutingKey {
        self.target.routing_key()
    }

    /// The payload as text, if it is a text payload.
    pub fn payload_text(&self) -> Option<&str> {
        match self.kind {
            PayloadKind::Text => std::str::from_utf8(&self.payload).ok(),
            PayloadKind::Binary => None,
        }
    }

    /// The broker message that carries this envelope: the payload as the body, the rest as
    /// headers (see the [module docs](self)).
    ///
    /// Fails when an extension header uses the reserved `hc-` prefix or an empty name, or when
    /// a text payload is not UTF-8.
    pub fn to_message(&self) -> Result<BrokerMessage, EnvelopeError> {
        if self.kind == PayloadKind::Text && std::str::from_utf8(&self.payload).is_err() {
            return Err(EnvelopeError::TextNotUtf8);
        }
        let mut headers = BTreeMap::new();
        for (name, value) in &self.headers {
            if name.is_empty() || name.starts_with(RESERVED_HEADER_PREFIX) {
                return Err(EnvelopeError::ReservedHeader { name: name.clone() });
            }
            headers.insert(name.clone(), value.clone());
        }
        let kind = match self.kind {
            PayloadKind::Text => "t",
            PayloadKind::Binary => "b",
        };
        let sender = self
            .sender
            .as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string);
        headers.insert(
            HEADER_META.to_owned(),
            format!(
                "{META_VERSION} {kind} {} {} {sender} {}",
                self.sent_at_ms(),
                self.origin,
                self.target.encode()
            ),
        );
        if let Some(signature) = &self.signature {
            headers.insert(HEADER_MAC.to_owned(), signature.to_string());
        }
        Ok(BrokerMessage {
            message_id: self.id.to_string(),
            headers,
            body: self.payload.clone(),
        })
    }

    /// Reads an envelope from a broker message, checking every header. The error names what
    /// was wrong and never contains the payload.
    pub fn from_message(message: BrokerMessage) -> Result<Self, EnvelopeError> {
        let BrokerMessage {
            message_id,
            mut headers,
            body,
        } = message;
        let id = message_id.parse()?;
        let meta = headers
            .remove(HEADER_META)
            .ok_or(EnvelopeError::MissingHeader { name: HEADER_META })?;
        let invalid = |reason| EnvelopeError::InvalidHeader {
            name: HEADER_META,
            reason,
        };
        let mut fields = meta.splitn(6, ' ');
        let mut field = |what| fields.next().ok_or(invalid(what));
        if field("the format version is missing")? != META_VERSION {
            return Err(invalid(
                "unknown format version (this node reads version 1)",
            ));
        }
        let kind = match field("the kind is missing")? {
            "t" => PayloadKind::Text,
            "b" => PayloadKind::Binary,
            _ => return Err(invalid("the kind is not t or b")),
        };
        let sent_at_ms: u64 = field("the send time is missing")?
            .parse()
            .map_err(|_| invalid("the send time is not milliseconds since the Unix epoch"))?;
        let origin = NodeId::new(field("the origin is missing")?)
            .map_err(|_| invalid("the origin node id is invalid"))?;
        let sender = match field("the sender is missing")? {
            "-" => None,
            sender => Some(
                sender
                    .parse()
                    .map_err(|_| invalid("the sender connection id is invalid"))?,
            ),
        };
        let target = Target::decode(field("the target is missing")?)?;
        let signature = match headers.remove(HEADER_MAC) {
            None => None,
            Some(mac) => Some(
                Signature::from_hex(&mac).ok_or(EnvelopeError::InvalidHeader {
                    name: HEADER_MAC,
                    reason: "expected 64 hex digits",
                })?,
            ),
        };
        if let Some(name) = headers
            .keys()
            .find(|name| name.starts_with(RESERVED_HEADER_PREFIX))
        {
            return Err(EnvelopeError::ReservedHeader { name: name.clone() });
        }
        if kind == PayloadKind::Text && std::str::from_utf8(&body).is_err() {
            return Err(EnvelopeError::TextNotUtf8);
        }
        Ok(Self {
            id,
            origin,
            sender,
            target,
            kind,
            sent_at: UNIX_EPOCH + Duration::from_millis(sent_at_ms),
            headers,
            payload: body,
            signature,
        })
    }
}

/// Why an envelope, or a part of one, is malformed.
///
/// The messages name the header or field at fault and never quote the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// A required header is missing.
    #[error("envelope header `{name}` is missing")]
    MissingHeader {
        /// The header's name.
        name: &'static str,
    },
    /// A header's value is not of its form.
    #[error("envelope header `{name}` is invalid: {reason}")]
    InvalidHeader {
        /// The header's name.
        name: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An unknown header uses the reserved `hc-` prefix, or an extension header has no name.
    #[error("envelope header {name:?} is reserved or unnamed")]
    ReservedHeader {
        /// The header's name.
        name: String,
    },
    /// The message id is not 32 hex digits.
    #[error("envelope message id is not 32 hex digits")]
    InvalidMessageId,
    /// A text payload is not valid UTF-8.
    #[error("envelope payload is marked text but is not valid UTF-8")]
    TextNotUtf8,
    /// A group name is not of its form.
    #[error("invalid group name: {reason}")]
    InvalidGroupName {
        /// What is wrong with it.
        reason: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::Incarnation;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn sample() -> Envelope {
        let sender = ConnectionId::new(node("a"), Incarnation::from_u64(1), 9);
        let to = ConnectionId::new(node("b"), Incarnation::from_u64(2), 3);
        let mut envelope =
            Envelope::binary(node("a"), Target::Connection(to), vec![0u8, 159, 146, 150])
                .with_sender(sender);
        envelope
            .headers
            .insert("traceparent".into(), "00-abc-def-01".into());
        envelope.sent_at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        envelope
    }

    #[test]
    fn payload_travels_as_the_body_unchanged() {
        let envelope = sample();
        let message = envelope.to_message().unwrap();
        assert_eq!(&message.body[..], &[0u8, 159, 146, 150]);
        assert_eq!(
            message.headers[HEADER_META],
            "1 b 1700000000123 a a:0000000000000001:9 connection:b:0000000000000002:3"
        );
        // The metadata and one extension header: nothing else rides along.
        assert_eq!(message.headers.len(), 2);
        assert_eq!(message.message_id.len(), 32);
        assert_eq!(Envelope::from_message(message).unwrap(), envelope);
    }

    #[test]
    fn every_target_round_trips() {
        for target in [
            Target::Node(node("n1")),
            Target::Broadcast,
            Target::Group(GroupName::new("room: lobby/1").unwrap()),
        ] {
            let envelope = Envelope::text(node("a"), target.clone(), "hello");
            let back = Envelope::from_message(envelope.to_message().unwrap()).unwrap();
            assert_eq!(back.target, target);
            assert_eq!(back.payload_text(), Some("hello"));
        }
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
    fn malformed_messages_name_what_is_wrong() {
        let good = sample().to_message().unwrap();
        let broken = |edit: &dyn Fn(&mut BrokerMessage)| {
            let mut message = good.clone();
            edit(&mut message);
            Envelope::from_message(message).unwrap_err()
        };
        assert_eq!(
            broken(&|m| {
                m.headers.remove(HEADER_META);
            }),
            EnvelopeError::MissingHeader { name: HEADER_META }
        );
        let meta = good.headers[HEADER_META].clone();
        let with_meta = |value: String| {
            move |m: &mut BrokerMessage| {
                m.headers.insert(HEADER_META.into(), value.clone());
            }
        };
        for (bad, reason) in [
            (meta.replacen("1 ", "2 ", 1), "unknown format version"),
            (meta.replacen(" b ", " x ", 1), "kind"),
            (meta.replacen("1700000000123", "yesterday", 1), "send time"),
            (meta.replacen(" a ", " bad:id ", 1), "origin"),
            (
                meta.replacen(" a:0000000000000001:9 ", " nobody ", 1),
                "sender",
            ),
            (
                meta.replacen("connection:", "planet:", 1),
                "expected connection:",
            ),
            ("1 b 1700000000123".to_owned(), "missing"),
        ] {
            match broken(&with_meta(bad.clone())) {
                EnvelopeError::InvalidHeader {
                    name: HEADER_META,
                    reason: said,
                } => assert!(said.contains(reason), "{bad:?}: {said}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert_eq!(
            broken(&|m| m.message_id = "42".into()),
            EnvelopeError::InvalidMessageId
        );
        assert_eq!(
            broken(&with_meta(meta.replacen(" b ", " t ", 1))),
            EnvelopeError::TextNotUtf8
        );
        assert!(matches!(
            broken(&|m| {
                m.headers.insert("hc-unknown".into(), "x".into());
            }),
            EnvelopeError::ReservedHeader { .. }
        ));
    }

    #[test]
    fn error_messages_never_quote_the_payload() {
        let mut message = Envelope::text(node("a"), Target::Broadcast, "secret-payload")
            .to_message()
            .unwrap();
        message.headers.remove(HEADER_META);
        let err = Envelope::from_message(message).unwrap_err();
        assert!(!err.to_string().contains("secret"));
        let envelope = Envelope::text(node("a"), Target::Broadcast, "secret-payload");
        assert!(!format!("{envelope:?}").contains("secret"));
    }

    #[test]
    fn reserved_extension_headers_are_refused_on_send() {
        let mut envelope = Envelope::text(node("a"), Target::Broadcast, "x");
        envelope
            .headers
            .insert("hc-target".into(), "node:evil".into());
        assert!(matches!(
            envelope.to_message(),
            Err(EnvelopeError::ReservedHeader { .. })
        ));
    }

    fn secret() -> ClusterSecret {
        ClusterSecret::new("the cluster secret of these tests").unwrap()
    }

    const WINDOW: Duration = Duration::from_secs(60);

    fn signed() -> (Envelope, SystemTime) {
        let mut envelope = sample();
        envelope.sign(&secret());
        (envelope.clone(), envelope.sent_at + Duration::from_secs(1))
    }

    #[test]
    fn a_signed_envelope_verifies_and_its_signature_travels() {
        let (envelope, now) = signed();
        assert_eq!(envelope.verify(&secret(), now, WINDOW), Ok(()));
        let message = envelope.to_message().unwrap();
        let mac = &message.headers[HEADER_MAC];
        assert_eq!(mac.len(), 64);
        assert!(
            mac.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let back = Envelope::from_message(message).unwrap();
        assert_eq!(back, envelope);
        assert_eq!(back.verify(&secret(), now, WINDOW), Ok(()));
        // The MAC is no extension header: it is not part of what it covers.
        assert!(!back.headers.contains_key(HEADER_MAC));
    }

    #[test]
    fn any_change_after_signing_is_a_bad_signature() {
        let (envelope, now) = signed();
        let node_c = node("c");
        type Change = Box<dyn Fn(&mut Envelope)>;
        let changes: Vec<(&str, Change)> = vec![
            ("id", Box::new(|e| e.id = MessageId::random())),
            ("origin", Box::new(move |e| e.origin = node_c.clone())),
            ("target", Box::new(|e| e.target = Target::Broadcast)),
            ("sender", Box::new(|e| e.sender = None)),
            ("kind", Box::new(|e| e.kind = PayloadKind::Text)),
            (
                "sent_at",
                Box::new(|e| e.sent_at += Duration::from_millis(1)),
            ),
            (
                "header value",
                Box::new(|e| {
                    e.headers
                        .insert("traceparent".into(), "00-abc-xyz-01".into());
                }),
            ),
            (
                "header added",
                Box::new(|e| {
                    e.headers.insert("x".into(), String::new());
                }),
            ),
            (
                "header removed",
                Box::new(|e| {
                    e.headers.clear();
                }),
            ),
            (
                "payload",
                Box::new(|e| e.payload = Bytes::from_static(&[0, 159, 146, 151])),
            ),
        ];
        for (what, change) in changes {
            let mut changed = envelope.clone();
            change(&mut changed);
            assert_eq!(
                changed.verify(&secret(), now, WINDOW),
                Err(AuthError::BadSignature),
                "{what}"
            );
        }
        // Moving bytes between the header name and value is a change too.
        let mut a = Envelope::text(node("a"), Target::Broadcast, "x");
        a.headers.insert("ab".into(), "c".into());
        a.sign(&secret());
        let mut b = a.clone();
        b.headers.clear();
        b.headers.insert("a".into(), "bc".into());
        assert_eq!(
            b.verify(&secret(), SystemTime::now(), WINDOW),
            Err(AuthError::BadSignature)
        );
        // Another cluster's secret.
        let other = ClusterSecret::new("another cluster's secret, as long").unwrap();
        assert_eq!(
            envelope.verify(&other, now, WINDOW),
            Err(AuthError::BadSignature)
        );
        // A mangled MAC header is malformed, not a valid envelope.
        let mut message = envelope.to_message().unwrap();
        message.headers.insert(HEADER_MAC.into(), "not hex".into());
        assert!(matches!(
            Envelope::from_message(message),
            Err(EnvelopeError::InvalidHeader {
                name: HEADER_MAC,
                ..
            })
        ));
    }

    #[test]
    fn unsigned_stale_and_future_envelopes_are_refused() {
        let (envelope, now) = signed();
        let mut unsigned = envelope.clone();
        unsigned.signature = None;
        assert_eq!(
            unsigned.verify(&secret(), now, WINDOW),
            Err(AuthError::Unsigned)
        );
        let sent = envelope.sent_at;
        assert_eq!(envelope.verify(&secret(), sent + WINDOW, WINDOW), Ok(()));
        assert_eq!(envelope.verify(&secret(), sent - WINDOW, WINDOW), Ok(()));
        let late = Duration::from_millis(60_001);
        assert_eq!(
            envelope.verify(&secret(), sent + late, WINDOW),
            Err(AuthError::Stale { age: late })
        );
        assert_eq!(
            envelope.verify(&secret(), sent - late, WINDOW),
            Err(AuthError::FromTheFuture { ahead: late })
        );
        // A forged envelope is reported forged, whatever time it claims.
        let mut forged = envelope.clone();
        forged.payload = Bytes::from_static(b"injected");
        assert_eq!(
            forged.verify(&secret(), sent + late, WINDOW),
            Err(AuthError::BadSignature)
        );
        for error in [
            AuthError::Unsigned,
            AuthError::BadSignature,
            AuthError::Stale { age: late },
        ] {
            assert!(!error.to_string().contains("injected"));
        }
    }

    #[test]
    fn group_names_are_checked() {
        assert!(GroupName::new("lobby").is_ok());
        assert!(GroupName::new("").is_err());
        assert!(GroupName::new("a\nb").is_err());
        assert!(GroupName::new("g".repeat(129)).is_err());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;
        use crate::broker::BrokerMessage;

        fn header_value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                // Near the real metadata, to reach deeper into the decoder.
                "1 [tb] [0-9]{1,14} [a-z0-9-]{1,8} [-a-z0-9:]{1,30} [a-z.:0-9-]{1,40}",
            ]
        }

        proptest! {
            /// Whatever a broker hands over, reading it as an envelope fails with an error or
            /// succeeds: it never panics.
            #[test]
            fn any_message_reads_to_an_envelope_or_an_error(
                message_id in any::<String>(),
                headers in proptest::collection::btree_map(
                    prop_oneof![Just("hc-meta".to_owned()), Just("hc-mac".to_owned()), any::<String>()],
                    header_value(),
                    0..4,
                ),
                body in proptest::collection::vec(any::<u8>(), 0..64),
            ) {
                let _ = Envelope::from_message(BrokerMessage {
                    message_id,
                    headers,
                    body: body.into(),
                });
            }

            /// An envelope written as a message reads back the same.
            #[test]
            fn envelopes_round_trip(text in any::<String>(), group in "[a-z][a-z0-9_.-]{0,20}") {
                let origin = NodeId::new("a").unwrap();
                for target in [
                    Target::Broadcast,
                    Target::Group(GroupName::new(&group).unwrap()),
                    Target::Node(NodeId::new("b").unwrap()),
                ] {
                    let envelope = Envelope::text(origin.clone(), target, text.clone());
                    let read = Envelope::from_message(envelope.to_message().unwrap()).unwrap();
                    prop_assert_eq!(read.id, envelope.id);
                    prop_assert_eq!(read.payload, envelope.payload);
                    prop_assert_eq!(read.target, envelope.target);
                }
            }
        }
    }
}
