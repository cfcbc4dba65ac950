//! The demo protocol the node program speaks to its WebSocket clients: JSON text frames.
//!
//! | client sends | effect |
//! |---|---|
//! | `{"op":"send","to":ID,"data":ANY}` | the connection `ID`, on any node, gets `{"type":"message","from":SENDER,"data":ANY}` |
//! | `{"op":"broadcast","data":ANY}` | every connection of the cluster, the sender included, gets `{"type":"broadcast","from":SENDER,"data":ANY}` once |
//! | `{"op":"join","group":G}` | the sender joins group `G` and gets `{"type":"joined","group":G}` |
//! | `{"op":"leave","group":G}` | the sender leaves `G` and gets `{"type":"left","group":G}` |
//! | `{"op":"group","group":G,"data":ANY}` | every member of `G`, on any node, gets `{"type":"group","group":G,"from":SENDER,"data":ANY}` |
//! | `{"op":"send_user","user":U,"data":ANY}` | every connection of user `U`, on any node, gets `{"type":"message","from":SENDER,"user":U,"data":ANY}` once |
//! | `{"op":"presence","group":G}` | the sender gets `{"type":"presence","group":G,"members":[{"user":U,"connections":N},…]}` (with `"id"` when the op had one, and `"unreachable":[NODE,…]` naming nodes gone whose members are left out) |
//!
//! Members of a group get `{"type":"presence_join","group":G,"user":U}` when the first
//! connection of user `U` joins it (on any node), and `{"type":"presence_leave",…}` when the
//! last one leaves it, closes, or goes with its node: once each. Only connections with a user
//! count.
//!
//! On open the server sends `{"type":"welcome","connection_id":ID,"node_id":NODE}`, with
//! `"user":U` when the upgrade said who the client is (a JWT, see
//! [`IdentityLayer`](crate::IdentityLayer)). Group names starting with `~` are the cluster's
//! own: joining, leaving or sending to one is a `bad_request`. Any op may
//! carry an `"id"` (any JSON value of at most 256 bytes); the server then answers `{"type":"ack","id":…}` once the
//! message is confirmed by the broker (or delivered locally), or
//! `{"type":"error","id":…,"code":…,"message":…}`; a send to a connection that closed on
//! another node is acked when the broker took it, then answered by that node with
//! `{"type":"error","id":…,"code":"not_found",…}`. Error codes: `bad_request` (malformed JSON,
//! an unknown op, a missing or invalid field: the connection stays open), `not_found` (no such
//! connection, or a user with no connection), `unreachable` (its node is gone or the broker refused), `internal`. A client
//! that sends faster than the broker confirms is slowed down: the server stops reading it.
//!
//! Requests start in the order sent, and replies come in the order requests started. A
//! request that goes through the broker (a send to another node's connection, a broadcast,
//! a group message) waits its turn for a place of the node's bound on unconfirmed messages;
//! one settled on the node (a send to a connection of the same node, a join, a leave, a bad
//! request) is not held behind it, and may be answered first, unless a message waiting
//! before it could reach the same connections.
//!
//! `data` travels between nodes as the bytes the client sent, never parsed again nor wrapped.

use hybrid_cluster_core::ConnectionId;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The longest correlation `id` a request may carry, in bytes of JSON: a server remembers
/// the ids of its latest sends, and this bounds what they cost.
pub const MAX_ID_LEN: usize = 256;

/// One request of a client, as parsed from a text frame.
#[derive(Debug)]
pub enum ClientOp {
    /// Send to one connection.
    Send {
        /// The target connection id, as text.
        to: String,
        /// The payload, as the client wrote it.
        data: Box<RawValue>,
        /// The client's correlation id.
        id: Option<Box<RawValue>>,
    },
    /// Send to every connection.
    Broadcast {
        /// The payload.
        data: Box<RawValue>,
        /// The client's correlation id.
        id: Option<Box<RawValue>>,
    },
    /// Join a group.
    Join {
        /// The group.
        group: String,
        /// The client's correlation id.
        id: Option<Box<RawValue>>,
    },
    /// Leave a group.
    Leave {
        /// The group.
        group: String,
        /// The client's correlation id.
        id: Option<Box<RawValue>>,
    },
    /// Send to every connection of a user.
    SendUser {
        /// The user.
        user: String,
        /// The payload.
        data: Box<RawValue>,
        /// The client's correlation id.
        id: Option<Box<RawValue>>,
    },
    /// Ask who is in a group.
    Presence {
        /// The group.
        group: String,
        /// The client's correlation id.
        id: Option<Box<RawValue>>,
    },
    /// Send to a group's members.
    Group {
        /// The group.
        group: String,
        /// The payload.
        data: Box<RawValue>,
        /// The client's correlation id.
        id: Option<Box<RawValue>>,
    },
}

/// A request's fields as read, before its op says which it needs.
///
/// `data` is kept as the raw text the client wrote, which serde's internally tagged enums
/// cannot do: the fields are read first, then the op.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Frame {
    op: String,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    id: Option<Box<RawValue>>,
}

impl Frame {
    /// Reads a text frame; when it is not a request, the error keeps its correlation id if
    /// one can be read from it (and is not too long to echo).
    fn read(text: &str) -> Result<Self, BadRequest> {
        serde_json::from_str(text).map_err(|error| {
            #[derive(Deserialize)]
            struct OnlyId {
                #[serde(default)]
                id: Option<Box<RawValue>>,
            }
            let id = serde_json::from_str::<OnlyId>(text)
                .ok()
                .and_then(|o| o.id)
                .filter(|id| id.get().len() <= MAX_ID_LEN);
            BadRequest {
                id,
                message: error.to_string(),
            }
        })
    }

    /// The request of these fields, when its op has the fields it needs.
    fn into_op(self) -> Result<ClientOp, BadRequest> {
        let Self {
            op,
            to,
            group,
            user,
            data,
            id,
        } = self;
        let missing = |field: &str, id| BadRequest {
            id,
            message: format!("op `{op}` needs the field `{field}`"),
        };
        Ok(match op.as_str() {
            "send" => match (to, data) {
                (Some(to), Some(data)) => ClientOp::Send { to, data, id },
                (None, _) => return Err(missing("to", id)),
                (_, None) => return Err(missing("data", id)),
            },
            "broadcast" => match data {
                Some(data) => ClientOp::Broadcast { data, id },
                None => return Err(missing("data", id)),
            },
            "join" | "leave" => match group {
                Some(group) if op == "join" => ClientOp::Join { group, id },
                Some(group) => ClientOp::Leave { group, id },
                None => return Err(missing("group", id)),
            },
            "group" => match (group, data) {
                (Some(group), Some(data)) => ClientOp::Group { group, data, id },
                (None, _) => return Err(missing("group", id)),
                (_, None) => return Err(missing("data", id)),
            },
            "presence" => match group {
                Some(group) => ClientOp::Presence { group, id },
                None => return Err(missing("group", id)),
            },
            "send_user" => match (user, data) {
                (Some(user), Some(data)) => ClientOp::SendUser { user, data, id },
                (None, _) => return Err(missing("user", id)),
                (_, None) => return Err(missing("data", id)),
            },
            other => {
                return Err(BadRequest {
                    message: format!(
                        "unknown op `{other}` (expected send, broadcast, join, leave, group, send_user or presence)"
                    ),
                    id,
                });
            }
        })
    }
}

impl ClientOp {
    /// Parses a text frame. On failure, the error message says what is wrong, and the
    /// correlation id is recovered when the frame is JSON with an `"id"`.
    pub fn parse(text: &str) -> Result<Self, BadRequest> {
        let frame = Frame::read(text)?;
        if frame
            .id
            .as_ref()
            .is_some_and(|id| id.get().len() > MAX_ID_LEN)
        {
            // Not echoed back: a reply must not cost what the client chose.
            return Err(BadRequest {
                id: None,
                message: format!("the `id` is longer than {MAX_ID_LEN} bytes of JSON"),
            });
        }
        frame.into_op()
    }

    /// The client's correlation id.
    pub fn id(&self) -> Option<&RawValue> {
        match self {
            Self::Send { id, .. }
            | Self::Broadcast { id, .. }
            | Self::Join { id, .. }
            | Self::Leave { id, .. }
            | Self::Group { id, .. }
            | Self::SendUser { id, .. }
            | Self::Presence { id, .. } => id.as_deref(),
        }
    }
}

/// A frame that is not a valid request.
#[derive(Debug)]
pub struct BadRequest {
    /// The correlation id, when one could be read.
    pub id: Option<Box<RawValue>>,
    /// What is wrong.
    pub message: String,
}

/// One message of the server to a client.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage<'a> {
    /// Sent once, on open.
    Welcome {
        /// The client's connection id.
        connection_id: &'a str,
        /// The node it is connected to.
        node_id: &'a str,
        /// The token the client resumes its session with (sessions on).
        #[serde(skip_serializing_if = "Option::is_none")]
        session: Option<&'a str>,
        /// The user the client is, when its upgrade said.
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
    },
    /// What became of the resume the client asked for, right after the welcome; the
    /// `missed` messages follow, in order.
    Resumed {
        /// Whether nothing was missed: `false` starts a new session.
        recovered: bool,
        /// How many messages follow that the client missed (when recovered).
        #[serde(skip_serializing_if = "Option::is_none")]
        missed: Option<usize>,
    },
    /// A message sent to this connection, or to its user.
    Message {
        /// The sending connection, if a connection sent it.
        from: Option<&'a ConnectionId>,
        /// The user it was sent to (a `send_user`).
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
        /// The payload, as its sender wrote it.
        data: &'a RawValue,
        /// Its number in the session (sessions on).
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// A broadcast.
    Broadcast {
        /// The sending connection.
        from: Option<&'a ConnectionId>,
        /// The payload.
        data: &'a RawValue,
        /// Its number in the session (sessions on).
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// A group message.
    Group {
        /// The group.
        group: &'a str,
        /// The sending connection.
        from: Option<&'a ConnectionId>,
        /// The payload.
        data: &'a RawValue,
        /// Its number in the session (sessions on).
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// Who is in a group, across the cluster: the answer to a `presence` op.
    Presence {
        /// The op's correlation id, if it had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        /// The group.
        group: &'a str,
        /// Its members.
        members: &'a [crate::PresenceMember],
        /// Nodes gone (not reaped yet) whose members are left out.
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        unreachable: &'a [hybrid_cluster_core::NodeId],
    },
    /// A user's first connection joined a group this connection is a member of.
    #[serde(rename = "presence_join")]
    PresenceJoin {
        /// The group.
        group: &'a str,
        /// The user.
        user: &'a str,
        /// Its number in the session (sessions on).
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// A user's last connection left a group this connection is a member of.
    #[serde(rename = "presence_leave")]
    PresenceLeave {
        /// The group.
        group: &'a str,
        /// The user.
        user: &'a str,
        /// Its number in the session (sessions on).
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// The connection joined a group.
    Joined {
        /// The group.
        group: &'a str,
    },
    /// The connection left a group.
    Left {
        /// The group.
        group: &'a str,
    },
    /// A request was carried out.
    Ack {
        /// The request's correlation id.
        id: &'a RawValue,
    },
    /// A request failed.
    Error {
        /// The request's correlation id, if it had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        /// A stable code: `bad_request`, `not_found`, `unreachable`, `rate_limited`,
        /// `internal`.
        code: &'a str,
        /// A human-readable explanation.
        message: &'a str,
    },
}

impl ServerMessage<'_> {
    /// The message as a JSON text frame.
    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail: every field is a string or valid raw JSON.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal","message":"could not encode a reply"}"#.to_owned()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_keep_data_as_written() {
        let op = ClientOp::parse(r#"{"op":"send","to":"n:1:2","data":{"b": [1, 2.50]},"id":7}"#)
            .unwrap();
        let ClientOp::Send { to, data, id } = op else {
            panic!("expected a send");
        };
        assert_eq!(to, "n:1:2");
        assert_eq!(data.get(), r#"{"b": [1, 2.50]}"#);
        assert_eq!(id.unwrap().get(), "7");
        assert!(matches!(
            ClientOp::parse(r#"{"op":"join","group":"lobby"}"#).unwrap(),
            ClientOp::Join { .. }
        ));
        let op = ClientOp::parse(r#"{"op":"send_user","user":"alice","data":"hi"}"#).unwrap();
        let ClientOp::SendUser { user, data, .. } = op else {
            panic!("expected a send_user");
        };
        assert_eq!((user.as_str(), data.get()), ("alice", r#""hi""#));
        let bad = ClientOp::parse(r#"{"op":"send_user","data":1}"#).unwrap_err();
        assert!(bad.message.contains("user"), "{}", bad.message);
    }

    #[test]
    fn an_id_longer_than_the_bound_is_refused_and_not_echoed() {
        let long = "x".repeat(MAX_ID_LEN);
        let bad = ClientOp::parse(&format!(r#"{{"op":"broadcast","data":1,"id":"{long}"}}"#))
            .unwrap_err();
        assert!(bad.id.is_none());
        assert!(bad.message.contains("256"), "{}", bad.message);
        let fits = "x".repeat(MAX_ID_LEN - 2);
        assert!(
            ClientOp::parse(&format!(r#"{{"op":"broadcast","data":1,"id":"{fits}"}}"#)).is_ok()
        );
    }

    #[test]
    fn bad_requests_say_why_and_keep_the_id() {
        let bad = ClientOp::parse(r#"{"op":"fly","id":"x1"}"#).unwrap_err();
        assert_eq!(bad.id.unwrap().get(), r#""x1""#);
        assert!(bad.message.contains("fly"), "{}", bad.message);
        let bad = ClientOp::parse("not json").unwrap_err();
        assert!(bad.id.is_none());
        let bad = ClientOp::parse(r#"{"op":"send","data":1}"#).unwrap_err();
        assert!(bad.message.contains("to"), "{}", bad.message);
    }

    #[test]
    fn replies_are_the_documented_json() {
        let data = RawValue::from_string(r#"{"x":1}"#.to_owned()).unwrap();
        let from: ConnectionId = "a:1:1".parse().unwrap();
        assert_eq!(
            ServerMessage::Message {
                from: Some(&from),
                user: None,
                data: &data,
                seq: None,
            }
            .to_json(),
            r#"{"type":"message","from":"a:0000000000000001:1","data":{"x":1}}"#
        );
        assert_eq!(
            ServerMessage::Message {
                from: Some(&from),
                user: Some("alice"),
                data: &data,
                seq: None,
            }
            .to_json(),
            r#"{"type":"message","from":"a:0000000000000001:1","user":"alice","data":{"x":1}}"#
        );
        assert_eq!(
            ServerMessage::Group {
                group: "g",
                from: Some(&from),
                data: &data,
                seq: Some(7),
            }
            .to_json(),
            r#"{"type":"group","group":"g","from":"a:0000000000000001:1","data":{"x":1},"seq":7}"#
        );
        let members = [crate::PresenceMember {
            user: "alice".parse().unwrap(),
            connections: 2,
        }];
        assert_eq!(
            ServerMessage::Presence {
                id: None,
                group: "g",
                members: &members,
                unreachable: &[],
            }
            .to_json(),
            r#"{"type":"presence","group":"g","members":[{"user":"alice","connections":2}]}"#
        );
        assert_eq!(
            ServerMessage::PresenceLeave {
                group: "g",
                user: "bob",
                seq: None,
            }
            .to_json(),
            r#"{"type":"presence_leave","group":"g","user":"bob"}"#
        );
        assert_eq!(
            ServerMessage::Resumed {
                recovered: true,
                missed: Some(3)
            }
            .to_json(),
            r#"{"type":"resumed","recovered":true,"missed":3}"#
        );
        assert_eq!(
            ServerMessage::Resumed {
                recovered: false,
                missed: None
            }
            .to_json(),
            r#"{"type":"resumed","recovered":false}"#
        );
        assert_eq!(
            ServerMessage::Error {
                id: None,
                code: "bad_request",
                message: "no"
            }
            .to_json(),
            r#"{"type":"error","code":"bad_request","message":"no"}"#
        );
        assert_eq!(
            ServerMessage::Welcome {
                connection_id: "a:1:1",
                node_id: "a",
                session: None,
                user: None,
            }
            .to_json(),
            r#"{"type":"welcome","connection_id":"a:1:1","node_id":"a"}"#
        );
        assert_eq!(
            ServerMessage::Welcome {
                connection_id: "a:1:1",
                node_id: "a",
                session: Some("s1.x"),
                user: Some("bob"),
            }
            .to_json(),
            r#"{"type":"welcome","connection_id":"a:1:1","node_id":"a","session":"s1.x","user":"bob"}"#
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Any text frame reads to a request or a bad request, whose id (when kept) is
            /// within the bound.
            #[test]
            fn any_frame_reads_to_a_request_or_a_bad_request(
                text in prop_oneof![
                    any::<String>(),
                    r#"\{"op":"(send|broadcast|join|leave|group|send_user|presence|x)"(,"(to|group|user|data|id)":("[^"]{0,300}"|[0-9]{1,30}|null|\[\]|\{\}))*\}"#,
                ],
            ) {
                match ClientOp::parse(&text) {
                    Ok(op) => prop_assert!(op.id().is_none_or(|id| id.get().len() <= MAX_ID_LEN)),
                    Err(bad) => prop_assert!(bad.id.is_none_or(|id| id.get().len() <= MAX_ID_LEN)),
                }
            }
        }
    }
}
