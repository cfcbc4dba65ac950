//! One connection's requests: started in the order they came, each as soon as it can be, and
//! answered in the order they were started.
//!
//! A request that goes through the broker (a unicast to another node, a broadcast, a group
//! message) waits for a place of the node's bound on unconfirmed messages, and reserves it
//! only when it is at the head of the line, so that it is spent at once: a connection never
//! holds a place while it has nothing to send. A request settled on this node (a unicast to
//! a local connection, a join, a leave, a bad request) needs no place; it starts at once,
//! even ahead of earlier requests that wait for one, unless one of those could reach the
//! same connections (then the sender's order comes first).

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use hybrid_cluster_core::{ConnectionId, GroupName, MessageId, Target, UserId};
use serde_json::value::RawValue;

use super::tracking::{InFlight, InFlightGuard, SentIds};
use crate::error::SendError;
use crate::handle::{ClusterHandle, OrderedSender, Payload};
use crate::limit::{RateDecision, RateLimiter};
use crate::local::Undeliverable;
use crate::protocol::{ClientOp, ServerMessage};

/// The replies to one request, as JSON text frames, in order.
pub(super) type Replies = Vec<String>;

/// A started request, once settled: its replies, and the message it sent when it was a
/// unicast (a notice of it not delivered goes out after these replies, never before).
struct Settled {
    replies: Replies,
    unicast: Option<MessageId>,
}

impl From<Replies> for Settled {
    fn from(replies: Replies) -> Self {
        Self {
            replies,
            unicast: None,
        }
    }
}

/// A request that was read and checked, not started yet.
enum Request {
    Send {
        /// A connection ([`Target::Connection`]).
        to: Target,
        data: Box<RawValue>,
        id: Option<Box<RawValue>>,
    },
    Broadcast {
        data: Box<RawValue>,
        id: Option<Box<RawValue>>,
    },
    Group {
        group: GroupName,
        data: Box<RawValue>,
        id: Option<Box<RawValue>>,
    },
    SendUser {
        user: UserId,
        data: Box<RawValue>,
        id: Option<Box<RawValue>>,
    },
    Membership {
        join: bool,
        group: GroupName,
        id: Option<Box<RawValue>>,
    },
    Presence {
        group: GroupName,
        id: Option<Box<RawValue>>,
    },
}

impl Request {
    /// Reads a frame: a request, or the replies of a bad one.
    fn parse(text: &str) -> Result<Self, Replies> {
        let bad = |id: Option<Box<RawValue>>, message: String| {
            vec![error_reply(id.as_deref(), "bad_request", &message)]
        };
        let op = ClientOp::parse(text).map_err(|b| bad(b.id, b.message))?;
        Ok(match op {
            ClientOp::Send { to, data, id } => match to.parse::<ConnectionId>() {
                Ok(to) => Self::Send {
                    to: Target::Connection(to),
                    data,
                    id,
                },
                Err(e) => return Err(bad(id, e.to_string())),
            },
            ClientOp::Broadcast { data, id } => Self::Broadcast { data, id },
            ClientOp::Group { group, data, id } => match client_group(&group) {
                Ok(group) => Self::Group { group, data, id },
                Err(e) => return Err(bad(id, e)),
            },
            ClientOp::SendUser { user, data, id } => match UserId::new(&user) {
                Ok(user) => Self::SendUser { user, data, id },
                Err(e) => return Err(bad(id, e.to_string())),
            },
            ClientOp::Presence { group, id } => match client_group(&group) {
                Ok(group) => Self::Presence { group, id },
                Err(e) => return Err(bad(id, e)),
            },
            ClientOp::Join { group, id } => Self::membership(true, &group, id)?,
            ClientOp::Leave { group, id } => Self::membership(false, &group, id)?,
        })
    }

    fn membership(join: bool, group: &str, id: Option<Box<RawValue>>) -> Result<Self, Replies> {
        match client_group(group) {
            Ok(group) => Ok(Self::Membership { join, group, id }),
            Err(e) => Err(vec![error_reply(id.as_deref(), "bad_request", &e)]),
        }
    }

    /// The client's correlation id.
    fn id(&self) -> Option<&RawValue> {
        match self {
            Self::Send { id, .. }
            | Self::Broadcast { id, .. }
            | Self::Group { id, .. }
            | Self::SendUser { id, .. }
            | Self::Membership { id, .. }
            | Self::Presence { id, .. } => id.as_deref(),
        }
    }
}

/// A group a client names: valid, and not one of the cluster's own.
fn client_group(name: &str) -> Result<GroupName, String> {
    let group = GroupName::new(name).map_err(|e| e.to_string())?;
    if group.is_reserved() {
        return Err(SendError::ReservedGroup { group }.to_string());
    }
    Ok(group)
}

/// What a waiting request means for the ones behind it.
#[derive(Default)]
struct Ahead<'a> {
    /// A broadcast or group message waits: any local connection may get it.
    fanout: bool,
    /// Groups with a message waiting.
    groups: Vec<&'a GroupName>,
    /// A request settled locally waits (it could not start either).
    local: bool,
}

impl<'a> Ahead<'a> {
    /// Whether `request`, behind everything noted so far, may start before it.
    fn lets_through(&self, request: &Request, needs_place: bool) -> bool {
        if needs_place || self.local {
            return false;
        }
        match request {
            // A local unicast must not overtake a message that may reach the same connection.
            Request::Send { .. } => !self.fanout,
            // Membership decides who gets a group message: not before one already sent.
            // Not ahead of a waiting request; once started, it waits for the joins and leaves
            // under way.
            Request::Membership { group, .. } => !self.groups.contains(&group),
            Request::Presence { .. } => false,
            Request::Broadcast { .. } | Request::Group { .. } | Request::SendUser { .. } => false,
        }
    }

    fn note(&mut self, request: &'a Request, needs_place: bool) {
        match request {
            // A user's connections may be any of this node's.
            Request::Broadcast { .. } | Request::SendUser { .. } => self.fanout = true,
            Request::Group { group, .. } => {
                self.fanout = true;
                self.groups.push(group);
            }
            Request::Send { .. } if needs_place => {}
            Request::Send { .. } | Request::Membership { .. } | Request::Presence { .. } => {
                self.local = true
            }
        }
    }
}

/// One connection's requests: see the [module docs](self).
pub(super) struct Requests {
    /// Starts what goes through the broker, in order, in the places it reserves.
    sender: OrderedSender,
    /// Makes a sender for each unicast within this node (see [`Requests::start_one`]); an
    /// idle connection keeps no second sender.
    handle: ClusterHandle,
    sent: SentIds,
    /// Read, not started, in the order they came.
    waiting: VecDeque<Request>,
    /// Whether a waiting request behind the head may be able to start now.
    rescan: bool,
    /// Started, their replies in the order they were started.
    started: FuturesOrdered<BoxFuture<'static, Settled>>,
    /// Unicasts started and not answered yet, with the notices that came back for them
    /// before their answer (held: a client hears "sent" before "not delivered").
    unanswered: Vec<(MessageId, Replies)>,
    /// The client closed with 1000: it ends its session rather than going away.
    pub(super) goodbye: bool,
    /// The connection's rate limit, when the cluster has one.
    limiter: Option<RateLimiter>,
    /// Joins and leaves under way: a presence query waits for them, so that it sees the
    /// memberships asked before it.
    memberships: Arc<InFlight>,
}

impl Requests {
    pub(super) fn new(handle: ClusterHandle) -> Self {
        Self {
            sender: handle.ordered(),
            sent: SentIds::default(),
            waiting: VecDeque::new(),
            rescan: false,
            started: FuturesOrdered::new(),
            unanswered: Vec::new(),
            goodbye: false,
            limiter: handle.rate_limiter(),
            memberships: Arc::default(),
            handle,
        }
    }

    /// The handle the requests are sent with.
    pub(super) fn handle(&self) -> &ClusterHandle {
        &self.handle
    }

    /// The error frame for a message this connection sent that was not delivered, naming the
    /// request that sent it if it is one of the latest: now, or, while that request is not
    /// answered yet, right after its answer (from [`Requests::poll_replies`]).
    pub(super) fn undeliverable(&mut self, notice: &Undeliverable) -> Option<String> {
        let id = self.sent.client_id(notice.message_id);
        let message = format!(
            "message {} was not delivered: connection {} is gone",
            notice.message_id, notice.to
        );
        let frame = error_reply(id.as_deref(), "not_found", &message);
        match self
            .unanswered
            .iter_mut()
            .find(|(sent, _)| *sent == notice.message_id)
        {
            Some((_, held)) => {
                held.push(frame);
                None
            }
            None => Some(frame),
        }
    }

    /// Requests read and not answered yet.
    pub(super) fn len(&self) -> usize {
        self.waiting.len() + self.started.len()
    }

    /// Whether every request read was answered.
    pub(super) fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.started.is_empty()
    }

    /// Takes a frame the client sent, and starts what can start; a frame over the
    /// connection's rate limit is refused (`rate_limited`, answered in turn) or, once too
    /// often, closes the connection: then `Close` is returned.
    pub(super) fn push(&mut self, text: &str, cx: &mut Context<'_>) -> RateDecision {
        let decision = self.check_rate(text.len());
        match decision {
            RateDecision::Allow => self.push_allowed(text, cx),
            RateDecision::Refuse => {
                let id = match ClientOp::parse(text) {
                    Ok(op) => op.id().map(ToOwned::to_owned),
                    Err(bad) => bad.id,
                };
                self.refuse(id.as_deref());
            }
            RateDecision::Close => {}
        }
        decision
    }

    /// Takes a frame that is not a request (binary): answered `bad_request` at once, or
    /// refused like a request over the rate limit, which it counts against as one.
    pub(super) fn push_binary(&mut self, len: usize) -> RateDecision {
        let decision = self.check_rate(len);
        match decision {
            RateDecision::Allow => {
                let bad = error_reply(
                    None,
                    "bad_request",
                    "binary frames are not part of the protocol: send JSON text",
                );
                self.started
                    .push_back(Box::pin(std::future::ready(vec![bad].into())));
            }
            RateDecision::Refuse => self.refuse(None),
            RateDecision::Close => {}
        }
        decision
    }

    /// What the connection's rate limit says of a frame of `len` bytes (counted in metrics).
    fn check_rate(&mut self, len: usize) -> RateDecision {
        let Some(limiter) = self.limiter.as_mut() else {
            return RateDecision::Allow;
        };
        let decision = limiter.check(len);
        match decision {
            RateDecision::Allow => {}
            RateDecision::Refuse => self.handle.node().metrics.rate_limited("refused"),
            RateDecision::Close => self.handle.node().metrics.rate_limited("closed"),
        }
        decision
    }

    /// Answers the request of correlation id `id` (if any) `rate_limited`, at once (ahead of
    /// requests still waiting for a place).
    fn refuse(&mut self, id: Option<&RawValue>) {
        let refused = error_reply(
            id,
            "rate_limited",
            "over this connection's rate limit: the request was not carried out",
        );
        self.started
            .push_back(Box::pin(std::future::ready(vec![refused].into())));
    }

    fn push_allowed(&mut self, text: &str, cx: &mut Context<'_>) {
        match Request::parse(text) {
            Ok(request) => {
                self.waiting.push_back(request);
                self.rescan = true;
            }
            Err(replies) => self
                .started
                .push_back(Box::pin(std::future::ready(replies.into()))),
        }
        self.start(cx);
    }

    /// Starts what can start, then gives the replies of the oldest started request once it
    /// is settled.
    pub(super) fn poll_replies(&mut self, cx: &mut Context<'_>) -> Poll<Replies> {
        self.start(cx);
        match self.started.poll_next_unpin(cx) {
            Poll::Ready(Some(Settled {
                mut replies,
                unicast,
            })) => {
                let answered = unicast.and_then(|message_id| {
                    let at = self.unanswered.iter().position(|(m, _)| *m == message_id)?;
                    Some(self.unanswered.swap_remove(at))
                });
                if let Some((_, held)) = answered {
                    replies.extend(held);
                }
                Poll::Ready(replies)
            }
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    fn needs_place(&self, request: &Request) -> bool {
        match request {
            Request::Send { to, .. } => self.sender.needs_place(to),
            Request::Broadcast { .. } | Request::Group { .. } | Request::SendUser { .. } => true,
            Request::Membership { .. } | Request::Presence { .. } => false,
        }
    }

    /// Starts the head of the line while it can start, then what may overtake it.
    fn start(&mut self, cx: &mut Context<'_>) {
        while let Some(head) = self.waiting.front() {
            if self.needs_place(head) {
                match self.sender.poll_ready(cx) {
                    // In line for a place (the sender keeps its turn while it waits).
                    Poll::Pending => break,
                    Poll::Ready(Err(error)) => {
                        let Some(request) = self.waiting.pop_front() else {
                            break;
                        };
                        let replies = vec![send_error_reply(request.id(), &error)];
                        self.started
                            .push_back(Box::pin(std::future::ready(replies.into())));
                        continue;
                    }
                    Poll::Ready(Ok(())) => {}
                }
            }
            let Some(request) = self.waiting.pop_front() else {
                break;
            };
            let started = self.start_one(request);
            self.started.push_back(started);
            self.rescan = true;
        }
        if self.rescan && self.waiting.len() > 1 {
            self.start_overtaking();
        }
        self.rescan = false;
    }

    /// Starts, ahead of the head that waits for a place, the requests settled locally that no
    /// earlier waiting request could reach.
    fn start_overtaking(&mut self) {
        let mut can_start = Vec::new();
        {
            let mut ahead = Ahead::default();
            for (i, request) in self.waiting.iter().enumerate() {
                let needs_place = self.needs_place(request);
                if i > 0 && ahead.lets_through(request, needs_place) {
                    can_start.push(i);
                } else {
                    ahead.note(request, needs_place);
                }
            }
        }
        let mut overtaking = Vec::with_capacity(can_start.len());
        // Removed from the back, so that the earlier indexes stay valid.
        for i in can_start.into_iter().rev() {
            overtaking.extend(self.waiting.remove(i));
        }
        for request in overtaking.into_iter().rev() {
            let started = self.start_one(request);
            self.started.push_back(started);
        }
    }

    /// Starts one request: a send is placed in the broker's order now (the sender is ready
    /// when it needs to be); the future resolves to its replies once it is settled.
    fn start_one(&mut self, request: Request) -> BoxFuture<'static, Settled> {
        match request {
            Request::Send { to, data, id } => {
                // A unicast within this node goes through a sender of its own, never readied, so
                // that starting it never gives back a place `sender` holds for the request at
                // the head of the line.
                let mut local;
                let sender = if self.sender.needs_place(&to) {
                    &mut self.sender
                } else {
                    local = self.handle.ordered();
                    &mut local
                };
                let confirmation = sender.send(to, Payload::text(data.get()));
                let message_id = confirmation.message_id();
                if let Some(id) = &id {
                    // A notice may come back for it (from its node, or this one when its
                    // connection here goes before it reads it): remember whose it was.
                    self.sent.remember(message_id, id.clone());
                }
                self.unanswered.push((message_id, Vec::new()));
                Box::pin(async move {
                    Settled {
                        replies: sent_replies(confirmation.await, id.as_deref()),
                        unicast: Some(message_id),
                    }
                })
            }
            Request::Broadcast { data, id } => {
                let confirmation = self
                    .sender
                    .send(Target::Broadcast, Payload::text(data.get()));
                Box::pin(async move { sent_replies(confirmation.await, id.as_deref()).into() })
            }
            Request::Group { group, data, id } => {
                let confirmation = self.sender.send(group, Payload::text(data.get()));
                Box::pin(async move { sent_replies(confirmation.await, id.as_deref()).into() })
            }
            Request::SendUser { user, data, id } => {
                let confirmation = self.sender.send_user(&user, Payload::text(data.get()));
                Box::pin(async move { sent_replies(confirmation.await, id.as_deref()).into() })
            }
            Request::Presence { group, id } => {
                let (handle, memberships) = (self.handle.clone(), Arc::clone(&self.memberships));
                Box::pin(async move {
                    memberships.idle().await;
                    presence_replies(handle, group, id).await
                })
            }
            Request::Membership { join, group, id } => {
                let under_way = self.memberships.enter();
                Box::pin(membership(self.handle.clone(), join, group, id, under_way))
            }
        }
    }
}

/// A join or leave, and its answer; `under_way` counts it until it is settled.
async fn membership(
    handle: ClusterHandle,
    join: bool,
    group: GroupName,
    id: Option<Box<RawValue>>,
    under_way: InFlightGuard,
) -> Settled {
    let result = if join {
        handle.join(&group).await
    } else {
        handle.leave(&group).await
    };
    drop(under_way);
    membership_replies(join, &group, result, id.as_deref()).into()
}

/// The answer to a `presence` op: the group's members, or why not.
async fn presence_replies(
    handle: ClusterHandle,
    group: GroupName,
    id: Option<Box<RawValue>>,
) -> Settled {
    let reply = match handle.presence(&group).await {
        Ok(presence) => ServerMessage::Presence {
            id: id.as_deref(),
            group: group.as_str(),
            members: &presence.members,
            unreachable: &presence.unreachable,
        }
        .to_json(),
        Err(error) => send_error_reply(id.as_deref(), &error),
    };
    vec![reply].into()
}

fn sent_replies(outcome: Result<MessageId, SendError>, id: Option<&RawValue>) -> Replies {
    match outcome {
        Ok(_) => ack(id).into_iter().collect(),
        Err(error) => vec![send_error_reply(id, &error)],
    }
}

fn membership_replies(
    join: bool,
    group: &GroupName,
    result: Result<(), SendError>,
    id: Option<&RawValue>,
) -> Replies {
    if let Err(error) = result {
        return vec![send_error_reply(id, &error)];
    }
    let group = group.as_str();
    let done = if join {
        ServerMessage::Joined { group }
    } else {
        ServerMessage::Left { group }
    };
    std::iter::once(done.to_json()).chain(ack(id)).collect()
}

pub(super) fn error_reply(id: Option<&RawValue>, code: &str, message: &str) -> String {
    ServerMessage::Error { id, code, message }.to_json()
}

fn send_error_reply(id: Option<&RawValue>, error: &SendError) -> String {
    let message = crate::error::error_chain(error);
    error_reply(id, error.code(), &message)
}

fn ack(id: Option<&RawValue>) -> Option<String> {
    id.map(|id| ServerMessage::Ack { id }.to_json())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::task::Waker;

    use super::*;
    use crate::cluster::Cluster;
    use crate::config::{Backends, ClusterConfig};
    use crate::handle::ClusterConnection;
    use crate::hybrid::{Admission, admit};
    use hybrid_cluster_core::NodeId;

    fn connect(cluster: &Cluster) -> ClusterConnection {
        match admit(&cluster.node, None) {
            Admission::Accept(connection) => connection,
            _ => panic!("the node admits"),
        }
    }

    fn waiting_ids(requests: &Requests) -> Vec<String> {
        requests
            .waiting
            .iter()
            .map(|r| r.id().map(|id| id.get().to_owned()).unwrap_or_default())
            .collect()
    }

    #[tokio::test]
    async fn local_requests_overtake_a_head_waiting_for_a_place_unless_it_could_reach_them() {
        let mut config = ClusterConfig::new(NodeId::new("overtake").unwrap(), "127.0.0.1", 1);
        config.forward.max_in_flight = 1;
        let cluster = Cluster::start(config, Backends::embedded()).await.unwrap();
        let me = connect(&cluster);
        let other = connect(&cluster);
        // Another sender holds the node's one place.
        let mut holder = other.handle().ordered();
        holder.ready().await.unwrap();

        let (handle, _inbox) = me.into_parts();
        let mut requests = Requests::new(handle);
        let mut cx = Context::from_waker(Waker::noop());
        let to = other.id().to_string();
        for frame in [
            r#"{"op":"group","group":"g","data":1,"id":"group-g"}"#,
            r#"{"op":"join","group":"h","id":"join-h"}"#,
            r#"{"op":"join","group":"g","id":"join-g"}"#,
            &format!(r#"{{"op":"send","to":"{to}","data":1,"id":"local"}}"#),
            r#"{"op":"leave","group":"h","id":"leave-h"}"#,
        ] {
            requests.push(frame, &mut cx);
        }
        // Joining another group needs no place and no message ahead reaches it; a join of
        // the group with a message waiting, and a local send behind a group message, wait,
        // and so does what comes after a local request that waits.
        assert_eq!(
            waiting_ids(&requests),
            [r#""group-g""#, r#""join-g""#, r#""local""#, r#""leave-h""#]
        );
        assert_eq!(requests.len(), 5);

        // The place comes back: everything starts, in order.
        assert!(holder.disarm());
        let mut replies = Vec::new();
        while !requests.is_empty() {
            let next = std::future::poll_fn(|cx| requests.poll_replies(cx));
            replies.extend(
                tokio::time::timeout(std::time::Duration::from_secs(5), next)
                    .await
                    .unwrap(),
            );
        }
        let acks: Vec<&String> = replies.iter().filter(|r| r.contains(r#""ack""#)).collect();
        assert_eq!(acks.len(), 5, "{replies:?}");
        assert!(
            acks[0].contains("join-h"),
            "the overtaking join is answered first: {acks:?}"
        );
        assert!(acks[1].contains("group-g"), "{acks:?}");
    }

    #[tokio::test]
    async fn a_notice_that_overtakes_its_ack_waits_for_it() {
        let config = ClusterConfig::new(NodeId::new("notice").unwrap(), "127.0.0.1", 1);
        let cluster = Cluster::start(config, Backends::embedded()).await.unwrap();
        let me = connect(&cluster);
        let other = connect(&cluster);
        let (handle, _inbox) = me.into_parts();
        let mut requests = Requests::new(handle);
        let mut cx = Context::from_waker(Waker::noop());
        let to = other.id().clone();
        requests.push(
            &format!(r#"{{"op":"send","to":"{to}","data":1,"id":7}}"#),
            &mut cx,
        );
        let message_id = requests.unanswered[0].0;
        let notice = Undeliverable { message_id, to };

        // Sent, not answered yet: the notice is held...
        assert_eq!(requests.undeliverable(&notice), None);
        // ...and goes out right after the ack.
        let replies = std::future::poll_fn(|cx| requests.poll_replies(cx)).await;
        assert_eq!(replies.len(), 2, "{replies:?}");
        assert_eq!(replies[0], r#"{"type":"ack","id":7}"#);
        assert!(replies[1].contains(r#""code":"not_found""#), "{replies:?}");
        assert!(replies[1].contains(r#""id":7"#), "{replies:?}");
        // Once answered, a notice goes out at once.
        assert!(
            requests
                .undeliverable(&notice)
                .unwrap()
                .contains(r#""id":7"#)
        );
        assert!(requests.unanswered.is_empty());
    }
}
