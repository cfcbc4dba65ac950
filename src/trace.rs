//! Trace context across nodes: one message's life as one trace.
//!
//! A message's trace id travels with it: the sending node records a `hybrid_cluster.send` span
//! and the receiving node a `hybrid_cluster.deliver` span, both with the field `trace_id`, so
//! one trace id finds the send on node A and the delivery on node B in the logs (or in any
//! tracing backend that reads span fields).
//!
//! A new message starts a trace whose id is its message id, which every node reads from the
//! message itself: nothing more travels. A message that continues another trace carries it in
//! a W3C `traceparent` header (`00-{trace id}-{span id}-01`), which wins.

use std::fmt;

use hybrid_cluster_core::{Envelope, MessageId};

/// The extension header carrying the trace context.
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// A W3C trace context: which trace, and which span in it sent the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace, 128 bits.
    pub trace_id: u128,
    /// The sending span, 64 bits.
    pub span_id: u64,
}

impl TraceContext {
    /// The context of a new trace started by the message `id`.
    pub fn start(id: MessageId) -> Self {
        Self {
            trace_id: id.as_u128(),
            span_id: rand_span_id(id),
        }
    }

    /// Reads a `traceparent` value; `None` unless it is of the W3C form.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.split('-');
        let (Some(version), Some(trace), Some(span), Some(flags), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(version, 2) || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return None;
        }
        Some(Self {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            span_id: u64::from_str_radix(span, 16).ok()?,
        })
    }

    /// The context of an envelope: its `traceparent` header when it has a valid one, else
    /// the trace its message id started.
    pub fn of(envelope: &Envelope) -> Self {
        envelope
            .headers
            .get(HEADER_TRACEPARENT)
            .and_then(|value| Self::parse(value))
            .unwrap_or_else(|| Self::start(envelope.id))
    }

    /// Puts this context on an envelope.
    pub fn inject(&self, envelope: &mut Envelope) {
        envelope
            .headers
            .insert(HEADER_TRACEPARENT.to_owned(), self.to_string());
    }

    /// The trace id as 32 hex digits.
    pub fn trace_id_hex(&self) -> String {
        self.trace_id().to_string()
    }

    /// The trace id, displayed as 32 hex digits when (and only when) something formats it:
    /// span fields cost nothing while no subscriber records them.
    pub fn trace_id(&self) -> TraceId {
        TraceId(self.trace_id)
    }
}

/// A trace id, displayed as 32 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceId(pub u128);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-01", self.trace_id, self.span_id)
    }
}

/// A span id for the sending span, derived from the message id (never zero, as W3C asks).
fn rand_span_id(id: MessageId) -> u64 {
    let folded = (id.as_u128() >> 64) as u64 ^ id.as_u128() as u64;
    folded.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_the_w3c_form() {
        let context = TraceContext::start(MessageId::from_u128(0xabc));
        let text = context.to_string();
        assert_eq!(
            text,
            "00-00000000000000000000000000000abc-0000000000000abc-01"
        );
        assert_eq!(TraceContext::parse(&text), Some(context));
        for bad in [
            "",
            "00-abc-def-01",
            "00-00000000000000000000000000000abc-0000000000000abc",
            "zz-00000000000000000000000000000abc-0000000000000abc-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
    }
}
