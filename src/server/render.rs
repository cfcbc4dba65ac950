//! The frames a client gets for what arrives in its inbox.

use hybrid_cluster_core::{Envelope, GroupName, PayloadKind, Target, USER_GROUP_PREFIX};
use serde_json::value::RawValue;

use super::requests::error_reply;
use crate::presence::{HEADER_PRESENCE, PresenceEvent};
use crate::protocol::ServerMessage;

/// The frame of a presence event for `group`.
fn render_presence(group: &GroupName, envelope: &Envelope, seq: Option<u64>) -> String {
    let group = group.as_str();
    match PresenceEvent::of(envelope) {
        Some(PresenceEvent::Join(user)) => ServerMessage::PresenceJoin {
            group,
            user: user.as_str(),
            seq,
        }
        .to_json(),
        Some(PresenceEvent::Leave(user)) => ServerMessage::PresenceLeave {
            group,
            user: user.as_str(),
            seq,
        }
        .to_json(),
        None => error_reply(None, "internal", "a malformed presence event arrived"),
    }
}

/// The frame a client gets for a message from its inbox, numbered `seq` in its session.
pub(super) fn render(envelope: &Envelope, seq: Option<u64>) -> String {
    let text = match envelope.kind {
        PayloadKind::Text => String::from_utf8_lossy(&envelope.payload),
        PayloadKind::Binary => std::borrow::Cow::Borrowed(""),
    };
    // Clients of this protocol send JSON `data`, which goes out as it came, borrowed; anything
    // else sent through the API arrives as a JSON string.
    let quoted;
    let data: &RawValue = match serde_json::from_str(&text) {
        Ok(raw) => raw,
        Err(_) => {
            match RawValue::from_string(serde_json::Value::String(text.to_string()).to_string()) {
                Ok(raw) => {
                    quoted = raw;
                    &quoted
                }
                Err(_) => {
                    return ServerMessage::Error {
                        id: None,
                        code: "internal",
                        message: "a message could not be encoded",
                    }
                    .to_json();
                }
            }
        }
    };
    let from = envelope.sender.as_ref();
    match &envelope.target {
        Target::Connection(_) | Target::Node(_) => ServerMessage::Message {
            from,
            user: None,
            data,
            seq,
        },
        Target::Broadcast => ServerMessage::Broadcast { from, data, seq },
        Target::Group(group) if envelope.headers.contains_key(HEADER_PRESENCE) => {
            return render_presence(group, envelope, seq);
        }
        Target::Group(group) if group.is_reserved() => ServerMessage::Message {
            from,
            user: group.as_str().strip_prefix(USER_GROUP_PREFIX),
            data,
            seq,
        },
        Target::Group(group) => ServerMessage::Group {
            group: group.as_str(),
            from,
            data,
            seq,
        },
    }
    .to_json()
}
