//! The mapping between the core model and AMQP: names, messages, queue arguments, errors.

use std::collections::BTreeMap;

use bytes::Bytes;
use hybrid_cluster_core::{
    BrokerError, BrokerMessage, ClusterPrefix, Durability, NodeId, QueueOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, ErrorKind};

use super::error::RabbitError;

/// The names a cluster uses in RabbitMQ, all starting with its prefix.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    prefix: String,
    /// The cluster's direct exchange: `{prefix}`.
    pub(crate) exchange: ShortString,
    /// The dead-letter exchange (fanout) and queue: `{prefix}:dead-letter`.
    pub(crate) dead_letter: ShortString,
}

impl Names {
    pub(crate) fn new(prefix: &ClusterPrefix) -> Result<Self, RabbitError> {
        let prefix = prefix.as_str().to_owned();
        Ok(Self {
            exchange: short(prefix.clone())?,
            dead_letter: short(format!("{prefix}:dead-letter"))?,
            prefix,
        })
    }

    /// A node's queue: `{prefix}:node:{node id}`.
    pub(crate) fn queue(&self, node: &NodeId) -> Result<ShortString, RabbitError> {
        short(format!("{}:node:{node}", self.prefix))
    }
}

pub(crate) fn short(value: String) -> Result<ShortString, RabbitError> {
    ShortString::try_new(value).map_err(|e| RabbitError::InvalidMessage {
        reason: e.to_string(),
    })
}

/// The AMQP properties carrying a message's id and headers. Header values travel as long
/// strings.
pub(crate) fn encode(message: &BrokerMessage) -> Result<BasicProperties, RabbitError> {
    let invalid = |what: &str, len: usize| RabbitError::InvalidMessage {
        reason: format!("{what} is {len} bytes long, more than AMQP's 255"),
    };
    let message_id = ShortString::try_new(message.message_id.clone())
        .map_err(|_| invalid("the message id", message.message_id.len()))?;
    let mut headers = FieldTable::default();
    for (name, value) in &message.headers {
        let key =
            ShortString::try_new(name.clone()).map_err(|_| invalid("a header name", name.len()))?;
        headers.insert(
            key,
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    Ok(BasicProperties::default()
        .with_message_id(message_id)
        .with_headers(headers))
}

/// The message a delivery carries. A missing message id reads as empty (and fails the
/// envelope check); string headers are taken as they are (invalid UTF-8 replaced), numbers
/// and booleans in their text form, and headers of other types are left out.
pub(crate) fn decode(properties: &BasicProperties, body: Vec<u8>) -> BrokerMessage {
    let message_id = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .unwrap_or_default();
    let mut headers = BTreeMap::new();
    if let Some(table) = properties.headers() {
        for (name, value) in table.inner() {
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                AMQPValue::Boolean(b) => b.to_string(),
                AMQPValue::ShortShortInt(n) => n.to_string(),
                AMQPValue::ShortShortUInt(n) => n.to_string(),
                AMQPValue::ShortInt(n) => n.to_string(),
                AMQPValue::ShortUInt(n) => n.to_string(),
                AMQPValue::LongInt(n) => n.to_string(),
                AMQPValue::LongUInt(n) => n.to_string(),
                AMQPValue::LongLongInt(n) => n.to_string(),
                AMQPValue::Timestamp(n) => n.to_string(),
                _ => continue,
            };
            headers.insert(name.as_str().to_owned(), text);
        }
    }
    BrokerMessage {
        message_id,
        headers,
        body: Bytes::from(body),
    }
}

/// The header marking an AMQP message that carries several messages (a batch); its value is
/// how many.
pub(crate) const HEADER_BATCH: &str = "hc-batch";

/// Messages one batch carries at most.
pub(crate) const MAX_BATCH: usize = 64;

/// Bytes of message bodies one batch carries at most.
pub(crate) const MAX_BATCH_BYTES: usize = 128 * 1024;

/// One message of a batch, as queued: its id, its headers and its body.
pub(crate) struct Part<'a> {
    pub(crate) message_id: &'a str,
    pub(crate) headers: &'a BTreeMap<String, String>,
    pub(crate) body: &'a [u8],
}

/// The AMQP properties and body of a batch: the header `hc-batch` with the count, the first
/// message's id, and a body of the messages one after another, each as its id, its headers
/// and its body, every string and body preceded by its length (2 bytes for ids, names and the
/// header count, 4 for values and bodies, big-endian).
pub(crate) fn encode_batch(parts: &[Part<'_>]) -> Result<(BasicProperties, Bytes), RabbitError> {
    let too_long = |what: &str| RabbitError::InvalidMessage {
        reason: format!("{what} is too long for a batch"),
    };
    let mut body = Vec::with_capacity(parts.iter().map(|p| p.body.len() + 64).sum());
    for part in parts {
        let id = part.message_id.as_bytes();
        body.extend_from_slice(
            &u16::try_from(id.len())
                .map_err(|_| too_long("a message id"))?
                .to_be_bytes(),
        );
        body.extend_from_slice(id);
        let count = u16::try_from(part.headers.len()).map_err(|_| too_long("a header table"))?;
        body.extend_from_slice(&count.to_be_bytes());
        for (name, value) in part.headers {
            body.extend_from_slice(
                &u16::try_from(name.len())
                    .map_err(|_| too_long("a header name"))?
                    .to_be_bytes(),
            );
            body.extend_from_slice(name.as_bytes());
            body.extend_from_slice(
                &u32::try_from(value.len())
                    .map_err(|_| too_long("a header value"))?
                    .to_be_bytes(),
            );
            body.extend_from_slice(value.as_bytes());
        }
        body.extend_from_slice(
            &u32::try_from(part.body.len())
                .map_err(|_| too_long("a body"))?
                .to_be_bytes(),
        );
        body.extend_from_slice(part.body);
    }
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(HEADER_BATCH),
        AMQPValue::LongString(LongString::from(parts.len().to_string().as_bytes())),
    );
    let first = parts.first().map(|p| p.message_id).unwrap_or_default();
    let properties = BasicProperties::default()
        .with_message_id(short(first.to_owned())?)
        .with_headers(headers);
    Ok((properties, Bytes::from(body)))
}

/// How many messages a delivery's batch carries, when it is a batch.
pub(crate) fn batch_count(properties: &BasicProperties) -> Option<usize> {
    let value = properties.headers().as_ref()?.inner().get(HEADER_BATCH)?;
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

/// The messages of a batch's body; the error says what is wrong with it.
pub(crate) fn decode_batch(body: &Bytes, count: usize) -> Result<Vec<BrokerMessage>, &'static str> {
    if count == 0 || count > MAX_BATCH {
        return Err("the batch count is out of range");
    }
    let mut reader = BatchReader { body, at: 0 };
    let messages = (0..count)
        .map(|_| reader.message())
        .collect::<Result<Vec<_>, _>>()?;
    if reader.at != body.len() {
        return Err("the batch body holds more than its count says");
    }
    Ok(messages)
}

/// Reads a batch's body from `at` on; message bodies are slices of it, not copies.
struct BatchReader<'a> {
    body: &'a Bytes,
    at: usize,
}

impl BatchReader<'_> {
    /// One message: its id, its headers, its body.
    fn message(&mut self) -> Result<BrokerMessage, &'static str> {
        let id_len = self.len16()?;
        let message_id = self.text(id_len)?;
        let header_count = self.len16()?;
        let mut headers = BTreeMap::new();
        for _ in 0..header_count {
            let name_len = self.len16()?;
            let name = self.text(name_len)?;
            let value_len = self.len32()?;
            let value = self.text(value_len)?;
            headers.insert(name, value);
        }
        let body_len = self.len32()?;
        let range = self.take(body_len)?;
        Ok(BrokerMessage {
            message_id,
            headers,
            body: self.body.slice(range),
        })
    }

    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>, &'static str> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.body.len())
            .ok_or("the batch body ends in the middle of a message")?;
        let range = self.at..end;
        self.at = end;
        Ok(range)
    }

    fn len16(&mut self) -> Result<usize, &'static str> {
        let range = self.take(2)?;
        let b = &self.body[range];
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn len32(&mut self) -> Result<usize, &'static str> {
        let range = self.take(4)?;
        let b = &self.body[range];
        usize::try_from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .map_err(|_| "a length in the batch is too large")
    }

    fn text(&mut self, len: usize) -> Result<String, &'static str> {
        let range = self.take(len)?;
        String::from_utf8(self.body[range].to_vec())
            .map_err(|_| "a string in the batch is not UTF-8")
    }
}

fn millis(duration: std::time::Duration) -> AMQPValue {
    // RabbitMQ wants a positive whole number of milliseconds.
    let ms = i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .max(1);
    AMQPValue::LongLongInt(ms)
}

/// The arguments of a node's queue.
pub(crate) fn queue_arguments(options: &QueueOptions, names: &Names) -> FieldTable {
    let mut arguments = FieldTable::default();
    if let Some(expires) = options.expires {
        arguments.insert("x-expires".into(), millis(expires));
    }
    if let Some(max) = options.max_length {
        arguments.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(i64::from(max)),
        );
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    if options.dead_letter {
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(names.dead_letter.as_str().into()),
        );
    }
    if options.durability == Durability::Replicated {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    arguments
}

/// The arguments of the dead-letter queue.
pub(crate) fn dead_letter_arguments(
    max_length: Option<u32>,
    expires: Option<std::time::Duration>,
) -> FieldTable {
    let mut arguments = FieldTable::default();
    if let Some(max) = max_length {
        arguments.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(i64::from(max)),
        );
    }
    if let Some(expires) = expires {
        arguments.insert("x-expires".into(), millis(expires));
    }
    arguments
}

fn soft_error(error: &lapin::Error) -> Option<(AMQPSoftError, &str)> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some((soft.clone(), amqp.get_message().as_str())),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Whether RabbitMQ answered NOT_FOUND about a queue.
pub(crate) fn is_queue_not_found(error: &lapin::Error) -> bool {
    matches!(soft_error(error), Some((AMQPSoftError::NOTFOUND, text)) if !text.contains("no exchange"))
}

/// Whether RabbitMQ refused an operation's precondition (a conditional delete of a queue
/// that is not empty).
pub(crate) fn is_precondition_failed(error: &lapin::Error) -> bool {
    matches!(
        soft_error(error),
        Some((AMQPSoftError::PRECONDITIONFAILED, _))
    )
}

/// Whether the error is about the connection rather than the operation.
pub(crate) fn is_connection_error(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::IOError(_)
            | ErrorKind::InvalidConnectionState(_)
            | ErrorKind::InvalidChannelState(..)
            | ErrorKind::InvalidChannel(_)
            | ErrorKind::MissingHeartbeatError
            | ErrorKind::RuntimeShutdownError(_)
    ) || matches!(
        error.kind(),
        ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Hard(_))
    )
}

/// The core error for a failed operation on `node`'s queue.
pub(crate) fn broker_error(error: lapin::Error, node: &NodeId, consuming: bool) -> BrokerError {
    if is_queue_not_found(&error) {
        return BrokerError::QueueNotFound { node: node.clone() };
    }
    if consuming
        && matches!(
            soft_error(&error),
            Some((
                AMQPSoftError::ACCESSREFUSED | AMQPSoftError::RESOURCELOCKED,
                _
            ))
        )
    {
        return BrokerError::QueueInUse { node: node.clone() };
    }
    if is_connection_error(&error) {
        BrokerError::Unavailable {
            source: Box::new(RabbitError::Amqp(error)),
        }
    } else {
        BrokerError::Backend {
            source: Box::new(RabbitError::Amqp(error)),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn batches_round_trip_and_bad_ones_are_refused() {
        let mut headers = BTreeMap::new();
        headers.insert("hc-meta".to_owned(), "1 t 1 a - broadcast".to_owned());
        let messages = [("m1", "one"), ("m2", ""), ("m3", "three \u{1F600}")];
        let parts: Vec<Part<'_>> = messages
            .iter()
            .map(|(id, body)| Part {
                message_id: id,
                headers: &headers,
                body: body.as_bytes(),
            })
            .collect();
        let (properties, body) = encode_batch(&parts).unwrap();
        assert_eq!(batch_count(&properties), Some(3));
        let back = decode_batch(&body, 3).unwrap();
        assert_eq!(back.len(), 3);
        for ((id, text), message) in messages.iter().zip(&back) {
            assert_eq!(message.message_id, *id);
            assert_eq!(&message.body[..], text.as_bytes());
            assert_eq!(message.headers, headers);
        }
        assert!(decode_batch(&body, 2).is_err(), "more than the count says");
        assert!(decode_batch(&body, 4).is_err(), "fewer than the count says");
        assert!(
            decode_batch(&body.slice(..body.len() - 1), 3).is_err(),
            "cut short"
        );
        assert!(decode_batch(&body, 0).is_err());
        assert!(decode_batch(&Bytes::from_static(b"\xff\xff"), 1).is_err());
        assert_eq!(batch_count(&BasicProperties::default()), None);
    }
    use super::*;

    #[test]
    fn messages_round_trip_through_properties() {
        let mut headers = BTreeMap::new();
        headers.insert("hc-origin".to_owned(), "node-a".to_owned());
        headers.insert("traceparent".to_owned(), "00-1-2-01".to_owned());
        let message = BrokerMessage {
            message_id: "0123456789abcdef0123456789abcdef".into(),
            headers,
            body: Bytes::from_static(&[0, 159, 146, 150]),
        };
        let properties = encode(&message).unwrap();
        let back = decode(&properties, message.body.to_vec());
        assert_eq!(back, message);
    }

    #[test]
    fn oversized_names_are_refused_not_panicking() {
        let mut message = BrokerMessage::default();
        message.headers.insert("h".repeat(300), "x".into());
        assert!(matches!(
            encode(&message),
            Err(RabbitError::InvalidMessage { .. })
        ));
        let message = BrokerMessage {
            message_id: "i".repeat(256),
            ..BrokerMessage::default()
        };
        assert!(encode(&message).is_err());
    }

    #[test]
    fn foreign_headers_are_read_as_text_or_left_out() {
        let mut table = FieldTable::default();
        table.insert("n".into(), AMQPValue::LongInt(-4));
        table.insert("b".into(), AMQPValue::Boolean(true));
        table.insert("t".into(), AMQPValue::FieldTable(FieldTable::default()));
        let properties = BasicProperties::default().with_headers(table);
        let message = decode(&properties, Vec::new());
        assert_eq!(message.message_id, "");
        assert_eq!(message.headers.get("n").map(String::as_str), Some("-4"));
        assert_eq!(message.headers.get("b").map(String::as_str), Some("true"));
        assert!(!message.headers.contains_key("t"));
    }

    #[test]
    fn names_start_with_the_prefix() {
        let names = Names::new(&"test:c1".parse().unwrap()).unwrap();
        assert_eq!(names.exchange.as_str(), "test:c1");
        assert_eq!(names.dead_letter.as_str(), "test:c1:dead-letter");
        let node = NodeId::new("dead-letter").unwrap();
        assert_eq!(
            names.queue(&node).unwrap().as_str(),
            "test:c1:node:dead-letter"
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Any body and any count read to messages or an error, never a panic, and never
            /// more messages than the batch bound.
            #[test]
            fn any_batch_reads_to_messages_or_an_error(
                body in proptest::collection::vec(any::<u8>(), 0..512),
                count in any::<usize>(),
            ) {
                if let Ok(messages) = decode_batch(&Bytes::from(body), count) {
                    prop_assert!(messages.len() <= MAX_BATCH);
                }
            }

            /// A batch written reads back as written.
            #[test]
            fn batches_round_trip(
                parts in proptest::collection::vec(
                    ("[a-z0-9-]{1,36}", proptest::collection::btree_map("[a-z-]{1,12}", any::<String>(), 0..3), proptest::collection::vec(any::<u8>(), 0..64)),
                    1..MAX_BATCH,
                ),
            ) {
                let written: Vec<Part<'_>> = parts
                    .iter()
                    .map(|(id, headers, body)| Part { message_id: id, headers, body })
                    .collect();
                let (properties, body) = encode_batch(&written).unwrap();
                let count = batch_count(&properties).unwrap();
                let read = decode_batch(&body, count).unwrap();
                prop_assert_eq!(read.len(), parts.len());
                for (message, (id, headers, body)) in read.iter().zip(&parts) {
                    prop_assert_eq!(&message.message_id, id);
                    prop_assert_eq!(&message.headers, headers);
                    prop_assert_eq!(&message.body[..], &body[..]);
                }
            }
        }
    }
}
