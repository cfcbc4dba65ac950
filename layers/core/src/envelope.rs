//! The envelope: one message between nodes, and the MAC that authenticates it.
//!
//! An [`Envelope`] is a payload, carried as bytes, with its routing metadata beside it. Its
//! wire form for the broker lives with the publisher, in `hybrid-cluster-routing`
//! (`EnvelopeCodec`); what the MAC covers is defined here, because every node must compute
//! it the same way whatever carries the envelope.
//!
//! # What the MAC covers
//!
//! [`Envelope::sign`] computes HMAC-SHA256, keyed with the cluster secret, over a sequence of
//! fields, each written as its length in bytes (8 bytes, big-endian) followed by its bytes:
//!
//! 1. the domain `hybrid-cluster envelope v1`;
//! 2. the message id (32 lowercase hex digits), the origin, the target (its text form, see
//!    [`Target`]), the sender (empty when none), the kind (`text` or `binary`), the send time
//!    (decimal milliseconds since the Unix epoch, [`Envelope::sent_at_millis`]);
//! 3. the number of extension headers (8 bytes, big-endian), then each header's name and
//!    value, in name order;
//! 4. the payload.
//!
//! Any change to any of them makes [`Envelope::verify`] fail.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::auth::{AuthError, ClusterSecret, MacInput, Signature};
use crate::broker::RoutingKey;
use crate::ids::{ConnectionId, InvalidGroupName, InvalidMessageId, MessageId, NodeId};
use crate::node::now_millis;
use crate::target::Target;

/// The domain of envelope MACs.
const ENVELOPE_DOMAIN: &str = "hybrid-cluster envelope v1";
/// Prefix of the header names the cluster reserves for itself; extension headers may not use
/// it.
pub const RESERVED_HEADER_PREFIX: &str = "hc-";

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
    /// The kind's name as the MAC covers it: `text` or `binary`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Binary => "binary",
        }
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
            sent_at: now_millis(),
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
        let sent_at = UNIX_EPOCH + Duration::from_millis(self.sent_at_millis());
        match now.duration_since(sent_at) {
            Ok(age) if age > window => Err(AuthError::Stale { age }),
            Ok(_) => Ok(()),
            Err(ahead) if ahead.duration() > window => Err(AuthError::FromTheFuture {
                ahead: ahead.duration(),
            }),
            Err(_) => Ok(()),
        }
    }

    fn mac(&self, secret: &ClusterSecret) -> MacInput {
        let mut mac = secret.mac(ENVELOPE_DOMAIN);
        mac.field(self.id.to_string().as_bytes());
        mac.field(self.origin.as_str().as_bytes());
        mac.field(self.target.to_string().as_bytes());
        match &self.sender {
            Some(sender) => mac.field(sender.to_string().as_bytes()),
            None => mac.field(b""),
        }
        mac.field(self.kind.as_str().as_bytes());
        mac.field(self.sent_at_millis().to_string().as_bytes());
        mac.count(self.headers.len());
        for (name, value) in &self.headers {
            mac.field(name.as_bytes());
            mac.field(value.as_bytes());
        }
        mac.field(&self.payload);
        mac
    }

    /// The send time as the MAC covers it and the wire carries it: whole milliseconds since
    /// the Unix epoch.
    pub fn sent_at_millis(&self) -> u64 {
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

impl From<InvalidMessageId> for EnvelopeError {
    fn from(_: InvalidMessageId) -> Self {
        Self::InvalidMessageId
    }
}

impl From<InvalidGroupName> for EnvelopeError {
    fn from(error: InvalidGroupName) -> Self {
        Self::InvalidGroupName {
            reason: error.reason(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Incarnation;

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
}
