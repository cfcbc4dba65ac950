//! The AMQP wire form of an envelope, next to the publisher that sends it.
//!
//! [`EnvelopeCodec`] writes an [`Envelope`] as a [`BrokerMessage`] and reads it back. The
//! payload is the message body, bytes as they are; everything else travels beside it, in as few
//! headers as possible (a broker pays for each header of each message):
//!
//! | header | value |
//! |---|---|
//! | message id | the [`MessageId`](hybrid_cluster_core::MessageId), 32 hex digits (AMQP's `message_id` property) |
//! | `hc-meta` | `1 {kind} {sent at} {origin} {sender} {target}`, separated by single spaces: the format version `1`; `t` (text: the payload is UTF-8) or `b` (binary); when it was sent, milliseconds since the Unix epoch by the sender's clock; the sending node's id; the sending connection's id, or `-` when no connection sent it; and last (a group name may hold spaces) the target: `connection:{connection id}`, `node:{node id}`, `broadcast` or `group:{group}` |
//! | `hc-mac` | when the cluster has a [`ClusterSecret`](hybrid_cluster_core::ClusterSecret): the HMAC-SHA256 of the envelope ([`Envelope::sign`]), 64 lowercase hex digits |
//! | anything else | extension headers (trace context), carried as they are |
//!
//! For example `1 t 1796024644123 node-a node-a:5f0c6a3e9b1d2c47:42 connection:node-b:00000000000000a1:7`.
//!
//! ```
//! use hybrid_cluster_core::{Envelope, NodeId, Target};
//! use hybrid_cluster_routing::EnvelopeCodec;
//!
//! let node = NodeId::new("node-a")?;
//! let envelope = Envelope::text(node.clone(), Target::Node(node), "hello");
//! let message = envelope.to_message()?;
//! assert_eq!(&message.body[..], b"hello");
//! assert_eq!(Envelope::from_message(message)?, envelope);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use hybrid_cluster_core::envelope::RESERVED_HEADER_PREFIX;
use hybrid_cluster_core::{
    BrokerMessage, ConnectionId, Envelope, EnvelopeError, NodeId, PayloadKind, Signature, Target,
};

/// Header with the envelope's routing metadata (see the [module docs](self)).
pub const HEADER_META: &str = "hc-meta";
/// Header with the envelope's MAC (64 hex digits), when it is signed.
pub const HEADER_MAC: &str = "hc-mac";
/// The version of the `hc-meta` format this crate writes and reads.
const META_VERSION: &str = "1";

/// Writes an [`Envelope`] as the broker message that carries it, and reads it back (see the
/// [module docs](self) for the form).
///
/// Bring it into scope to call `envelope.to_message()` and `Envelope::from_message(message)`.
pub trait EnvelopeCodec: Sized {
    /// The broker message that carries this envelope: the payload as the body, the rest as
    /// headers.
    ///
    /// Fails when an extension header uses the reserved `hc-` prefix or an empty name, or when
    /// a text payload is not UTF-8.
    fn to_message(&self) -> Result<BrokerMessage, EnvelopeError>;

    /// Reads an envelope from a broker message, checking every header. The error names what
    /// was wrong and never contains the payload.
    fn from_message(message: BrokerMessage) -> Result<Self, EnvelopeError>;
}

impl EnvelopeCodec for Envelope {
    fn to_message(&self) -> Result<BrokerMessage, EnvelopeError> {
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
        headers.insert(HEADER_META.to_owned(), Meta::of(self).to_string());
        if let Some(signature) = &self.signature {
            headers.insert(HEADER_MAC.to_owned(), signature.to_string());
        }
        Ok(BrokerMessage {
            message_id: self.id.to_string(),
            headers,
            body: self.payload.clone(),
        })
    }

    fn from_message(message: BrokerMessage) -> Result<Self, EnvelopeError> {
        let BrokerMessage {
            message_id,
            mut headers,
            body,
        } = message;
        let id = message_id.parse()?;
        let meta = headers
            .remove(HEADER_META)
            .ok_or(EnvelopeError::MissingHeader { name: HEADER_META })?;
        let meta = Meta::parse(&meta)?;
        let signature = read_signature(headers.remove(HEADER_MAC))?;
        if let Some(name) = headers
            .keys()
            .find(|name| name.starts_with(RESERVED_HEADER_PREFIX))
        {
            return Err(EnvelopeError::ReservedHeader { name: name.clone() });
        }
        if meta.kind == PayloadKind::Text && std::str::from_utf8(&body).is_err() {
            return Err(EnvelopeError::TextNotUtf8);
        }
        Ok(Self {
            id,
            origin: meta.origin,
            sender: meta.sender,
            target: meta.target,
            kind: meta.kind,
            sent_at: UNIX_EPOCH + Duration::from_millis(meta.sent_at_ms),
            headers,
            payload: body,
            signature,
        })
    }
}

/// The fields of the `hc-meta` header.
struct Meta {
    kind: PayloadKind,
    sent_at_ms: u64,
    origin: NodeId,
    sender: Option<ConnectionId>,
    target: Target,
}

impl Meta {
    fn of(envelope: &Envelope) -> Self {
        Self {
            kind: envelope.kind,
            sent_at_ms: envelope.sent_at_millis(),
            origin: envelope.origin.clone(),
            sender: envelope.sender.clone(),
            target: envelope.target.clone(),
        }
    }

    /// Reads the header's value; the error names the field at fault.
    fn parse(meta: &str) -> Result<Self, EnvelopeError> {
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
        let sent_at_ms = field("the send time is missing")?
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
        let target = field("the target is missing")?
            .parse()
            .map_err(|error: hybrid_cluster_core::InvalidTarget| invalid(error.reason()))?;
        Ok(Self {
            kind,
            sent_at_ms,
            origin,
            sender,
            target,
        })
    }
}

impl std::fmt::Display for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            PayloadKind::Text => "t",
            PayloadKind::Binary => "b",
        };
        write!(
            f,
            "{META_VERSION} {kind} {} {} ",
            self.sent_at_ms, self.origin
        )?;
        match &self.sender {
            Some(sender) => write!(f, "{sender}")?,
            None => f.write_str("-")?,
        }
        write!(f, " {}", self.target)
    }
}

/// Reads the `hc-mac` header, when there is one.
fn read_signature(mac: Option<String>) -> Result<Option<Signature>, EnvelopeError> {
    mac.map(|mac| {
        Signature::from_hex(&mac).ok_or(EnvelopeError::InvalidHeader {
            name: HEADER_MAC,
            reason: "expected 64 hex digits",
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use hybrid_cluster_core::{ClusterSecret, GroupName, Incarnation};

    use super::*;

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
    fn a_mangled_mac_header_is_malformed() {
        let (envelope, _) = signed();
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

    mod properties {
        use proptest::prelude::*;

        use super::*;

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
