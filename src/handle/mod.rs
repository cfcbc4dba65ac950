//! Sending into the cluster: [`ClusterHandle`] and its [`OrderedSender`], what a send takes
//! ([`Payload`]) and gives ([`Confirmation`]), and the per-connection [`ClusterConnection`].

mod confirmation;
mod connection;
mod groups;
mod payload;
mod session;
#[cfg(test)]
mod tests;
mod user;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hybrid_cluster_core::Broker;
use hybrid_cluster_core::{
    ConnectionId, Envelope, GroupName, MessageId, NodeId, NodeInfo, PayloadKind, Target, UserId,
};
use hybrid_cluster_routing::{Forward, ForwardError};
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

pub use self::confirmation::Confirmation;
pub use self::connection::{ClusterConnection, ConnectionSlot};
pub use self::payload::Payload;
pub use self::session::{OpenedSession, ResumeRequest, Resumed, SessionError};
use crate::error::SendError;
use crate::local::InboxItem;
use crate::node::Node;
use crate::session::Kept;
use crate::trace::TraceContext;

/// Sends messages into the cluster: to one connection anywhere, to every connection, to a
/// group's members; joins and leaves groups. Cheap to clone.
///
/// A handle from [`ClusterConnection::handle`] sends *as* its connection (receivers see it as
/// the sender) and can join groups; one from [`Cluster::handle`](crate::Cluster::handle) sends
/// as the node.
///
/// Sending to a connection on this node never touches the broker. Sending to another node
/// costs no registry lookup: the connection id names the node, and the node's liveness and
/// incarnation are read from this node's view of the cluster. A send resolves once the
/// message is in the target's inbox (same node) or confirmed by the broker (another node).
#[derive(Clone)]
pub struct ClusterHandle {
    node: Arc<Node>,
    sender: Option<ConnectionId>,
}

impl fmt::Debug for ClusterHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterHandle")
            .field("node", &self.node.id)
            .field("sender", &self.sender)
            .finish()
    }
}

impl ClusterHandle {
    pub(crate) fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Whether the cluster gives connections sessions ([`ClusterConfig::sessions`](crate::ClusterConfig)).
    pub fn has_sessions(&self) -> bool {
        self.node.sessions.is_some()
    }

    pub(crate) fn new(node: Arc<Node>, sender: Option<ConnectionId>) -> Self {
        Self { node, sender }
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.node.id
    }

    /// The connection this handle sends as, if any.
    pub fn connection_id(&self) -> Option<&ConnectionId> {
        self.sender.as_ref()
    }

    /// Every node of the cluster as this node sees it, this one included.
    pub fn nodes(&self) -> Vec<Arc<NodeInfo>> {
        self.node.discovery.nodes()
    }

    /// Live connections on this node.
    pub fn local_connections(&self) -> usize {
        self.node.local.len()
    }

    /// Members of `group` on this node.
    pub fn local_members(&self, group: &GroupName) -> usize {
        self.node.local.members(group)
    }

    fn envelope(&self, target: Target, kind: PayloadKind, payload: Bytes) -> Envelope {
        let mut envelope = Envelope::new(self.node.id.clone(), target, kind, payload);
        envelope.sender = self.sender.clone();
        envelope
    }

    /// The span of one send, carrying the trace id the receiving node's span will carry too.
    fn span(&self, kind: &'static str, envelope: &Envelope) -> tracing::Span {
        let trace_id = TraceContext::of(envelope).trace_id();
        tracing::info_span!(
            "hybrid_cluster.send",
            node = %self.node.id,
            kind,
            message_id = %envelope.id,
            trace_id = %trace_id,
        )
    }

    /// A sender that keeps this handle's messages in order while several are in flight: see
    /// [`OrderedSender`].
    pub fn ordered(&self) -> OrderedSender {
        OrderedSender {
            forward: self.node.forward.clone(),
            handle: self.clone(),
        }
    }

    /// Sends `payload` to `to` and returns the message's id once it is delivered: to one
    /// connection, wherever it is (a [`ConnectionId`]), to every connection of the cluster,
    /// this handle's own included ([`Target::Broadcast`]), or to every member of a group, on
    /// every node that has some (a [`GroupName`]). The payload is text (`&str`, `String`) or
    /// bytes ([`Bytes`], `Vec<u8>`): see [`Payload`].
    ///
    /// - **A connection**: on this node, the message is in its inbox when this returns, and
    ///   the broker is not involved. On another node, a connection that closed before the
    ///   message arrived cannot be known here in advance: that node answers with a notice,
    ///   which reaches this handle's connection as [`InboxItem::Undeliverable`] naming the
    ///   message id. Fails with [`SendError::NotFound`] when the connection does not exist
    ///   (on this node, checked at once; on another node, when the id belongs to a previous
    ///   run of it), and with [`SendError::Unreachable`] when its node is gone or the broker
    ///   refused.
    /// - **Everyone, or a group**: local connections get it at once, other nodes through the
    ///   broker. An error means the broker did not take it: this node's connections have it,
    ///   the others' may not. A group with no member anywhere is not an error: nobody gets it.
    /// - **A node** as such ([`Target::Node`]) takes no messages yet:
    ///   [`SendError::UnsupportedTarget`].
    ///
    /// Sends awaited one after another arrive in that order; to keep several in flight and
    /// still in order, use [`ClusterHandle::ordered`].
    pub async fn send(
        &self,
        to: impl Into<Target>,
        payload: impl Into<Payload>,
    ) -> Result<MessageId, SendError> {
        let to = to.into();
        let mut sender = self.ordered();
        // A send settled on this node needs no place of the bound on unconfirmed messages:
        // it never waits behind the broker.
        if sender.needs_place(&to) {
            sender.ready().await?;
        }
        sender.send(to, payload).await
    }

    fn sender(&self) -> Result<&ConnectionId, SendError> {
        self.sender
            .as_ref()
            .ok_or(SendError::NoConnection)
            .and_then(|id| {
                if self.node.local.contains(id) {
                    Ok(id)
                } else {
                    Err(SendError::NotRegistered {
                        connection: id.clone(),
                    })
                }
            })
    }

    /// A fresh [`RateLimiter`](crate::RateLimiter) for one connection, when the cluster has a
    /// [`rate_limit`](crate::ClusterConfig::rate_limit).
    pub fn rate_limiter(&self) -> Option<crate::RateLimiter> {
        self.node.config.rate_limit.map(crate::RateLimiter::new)
    }

    /// The user this handle's connection belongs to, when its upgrade said.
    pub fn user(&self) -> Option<UserId> {
        self.node.local.user_of(self.sender.as_ref()?)
    }
}

/// Sends in order with several messages in flight.
///
/// A message is placed in the broker's order when it is *started* ([`send`] returns its
/// [`Confirmation`] at once), so messages started one after
/// another through one `OrderedSender` reach every connection in that order, however their
/// confirmations are awaited. A socket task pipelining a client's requests uses one.
///
/// # Places: the rule for callers
///
/// A start that goes through the broker takes one place of the node's bound on unconfirmed
/// messages ([`ForwardConfig::max_in_flight`](hybrid_cluster_routing::ForwardConfig), shared
/// by every sender of the node), and its [`Confirmation`] gives the place back when it
/// resolves or is dropped. So:
///
/// - wait for [`ready`](OrderedSender::ready) (or poll [`poll_ready`](OrderedSender::poll_ready))
///   **right before** a broadcast, a group message, or a unicast for which
///   [`needs_place`](OrderedSender::needs_place) is true, and start it at once;
/// - a unicast to a connection of this node needs no place and never waits; starting one
///   gives back a place this sender held, so a sender that goes idle after it holds none;
/// - a sender that was polled (ready, or pending in line) and will not start a message must
///   [`disarm`](OrderedSender::disarm): a place held while idle is taken from every other
///   connection of the node, and enough of them stop the node's sends altogether;
/// - keep polling the confirmations.
///
/// Senders waiting for a place are served in the order they asked, so none is starved.
///
/// [`send`]: OrderedSender::send
pub struct OrderedSender {
    handle: ClusterHandle,
    forward: Forward<dyn Broker>,
}

impl fmt::Debug for OrderedSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrderedSender")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

fn invalid_or(error: ForwardError, otherwise: impl FnOnce(ForwardError) -> SendError) -> SendError {
    match error {
        ForwardError::Encode(_) | ForwardError::PayloadTooLarge { .. } => SendError::Invalid(error),
        error => otherwise(error),
    }
}

impl OrderedSender {
    /// Whether a message can be started now: `Pending` while the node's bound on unconfirmed
    /// messages is reached or the broker pushes back.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        let node = &self.handle.node;
        self.forward
            .poll_ready(cx)
            .map_err(|error| SendError::Unreachable {
                node: node.id.clone(),
                source: Some(error),
            })
    }

    /// Waits until a message can be started.
    pub async fn ready(&mut self) -> Result<(), SendError> {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await
    }

    /// Gives back the place this sender holds (or waits for in line) and will not use.
    /// Returns whether there was one.
    pub fn disarm(&mut self) -> bool {
        self.forward.disarm()
    }

    /// Whether a message to `to` goes through the broker, and so needs
    /// [`ready`](OrderedSender::ready) first: false only for a connection of this node (and
    /// for a target no message is sent to).
    pub fn needs_place(&self, to: &Target) -> bool {
        match to {
            Target::Connection(id) => id.node() != &self.handle.node.id,
            Target::Broadcast | Target::Group(_) => true,
            Target::Node(_) => false,
        }
    }

    /// Starts sending `payload` to `to` (see [`ClusterHandle::send`]) and returns its
    /// [`Confirmation`] at once. To a connection of this node it is delivered at once, needs
    /// no place and gives back one held; anything else is placed in the broker's order now,
    /// in the place [`ready`](OrderedSender::ready) reserved.
    pub fn send(&mut self, to: impl Into<Target>, payload: impl Into<Payload>) -> Confirmation {
        let (kind, bytes) = payload.into().into_parts();
        match to.into() {
            Target::Connection(id) => self.unicast(&id, kind, bytes),
            Target::Broadcast => self.broadcast(kind, bytes),
            Target::Group(group) => self.group(&group, kind, bytes),
            Target::Node(node) => {
                let refused = Err(SendError::UnsupportedTarget {
                    target: Target::Node(node),
                });
                self.settled("unicast", MessageId::random(), refused)
            }
        }
    }

    /// Starts `envelope` through the broker; `ready` must have answered first.
    fn publish(
        &mut self,
        kind: &'static str,
        envelope: Envelope,
        map_error: impl FnOnce(ForwardError) -> Result<(), SendError> + Send + 'static,
    ) -> Confirmation {
        let handle = self.handle.clone();
        let id = envelope.id;
        let span = handle.span(kind, &envelope);
        let started = Instant::now();
        let publishing = span.in_scope(|| self.forward.call(envelope));
        handle.node.metrics.in_flight(handle.node.in_flight());
        let outcome = Box::pin(
            async move {
                let published = publishing.await;
                handle.node.metrics.in_flight(handle.node.in_flight());
                let result = match published {
                    Ok(()) => Ok(id),
                    Err(error) => map_error(error).map(|()| id),
                };
                handle
                    .node
                    .metrics
                    .sent(kind, result.is_ok(), started.elapsed().as_secs_f64());
                result
            }
            .instrument(span),
        );
        Confirmation { id, outcome }
    }

    /// A unicast settled here, without the broker: delivered to a local connection, or
    /// refused. A place reserved for it goes back at once: it would otherwise be held until
    /// this sender's next broker send, however long that takes.
    fn settled(
        &mut self,
        kind: &'static str,
        id: MessageId,
        outcome: Result<MessageId, SendError>,
    ) -> Confirmation {
        if self.forward.is_ready() {
            self.forward.disarm();
        }
        self.handle.node.metrics.sent(kind, outcome.is_ok(), 0.0);
        Confirmation {
            id,
            outcome: Box::pin(std::future::ready(outcome)),
        }
    }

    /// A unicast settled here once `kept` completes (the message kept in a session's log).
    fn settled_after(
        &mut self,
        kind: &'static str,
        id: MessageId,
        kept: futures_core::future::BoxFuture<'static, ()>,
    ) -> Confirmation {
        let mut confirmation = self.settled(kind, id, Ok(id));
        let outcome = confirmation.outcome;
        confirmation.outcome = Box::pin(async move {
            kept.await;
            outcome.await
        });
        confirmation
    }

    /// A unicast to `to`, whose node left, with sessions: into its queue while it exists
    /// (behind what it holds for a session of `to`, read by the peer that took it over), to
    /// the session wherever it is once the queue is gone.
    fn unicast_to_departed(&mut self, to: &ConnectionId, envelope: Envelope) -> Confirmation {
        let (node, to, copy) = (Arc::clone(&self.handle.node), to.clone(), envelope.clone());
        let target = to.node().clone();
        let mut confirmation = self.publish("unicast", envelope, move |error| {
            Err(invalid_or(error, |error| SendError::Unreachable {
                node: target,
                source: Some(error),
            }))
        });
        let published = confirmation.outcome;
        confirmation.outcome = Box::pin(async move {
            match published.await {
                Err(SendError::Unreachable {
                    source: Some(ForwardError::Unroutable { .. }),
                    ..
                }) => follow_session(node, to, copy).await,
                outcome => outcome,
            }
        });
        confirmation
    }

    /// A unicast to `to`: delivered here, or started through the broker.
    fn unicast(&mut self, to: &ConnectionId, kind: PayloadKind, payload: Bytes) -> Confirmation {
        let node = Arc::clone(&self.handle.node);
        let envelope = self
            .handle
            .envelope(Target::Connection(to.clone()), kind, payload);
        let id = envelope.id;
        let not_found = || SendError::NotFound {
            connection: to.clone(),
        };
        if to.node() == &node.id {
            if to.incarnation() != node.incarnation {
                return self.settled("unicast", id, Err(not_found()));
            }
            let span = self.handle.span("unicast", &envelope);
            let envelope = Arc::new(envelope);
            let pushed = span.in_scope(|| {
                node.local
                    .deliver_to(to, InboxItem::Message(Arc::clone(&envelope)))
            });
            return match pushed {
                Err(_) => self.settled("unicast", id, Err(not_found())),
                Ok(pushed) => match node.settle_pushed(to, pushed) {
                    None => self.settled("unicast", id, Ok(id)),
                    Some(kept) => self.settled_after("unicast", id, kept),
                },
            };
        }
        match node.discovery.view().node(to.node()) {
            None if node.sessions.is_some() => return self.unicast_to_departed(to, envelope),
            None => {
                let gone = SendError::Unreachable {
                    node: to.node().clone(),
                    source: None,
                };
                return self.settled("unicast", id, Err(gone));
            }
            Some(info) if info.incarnation != to.incarnation() => {
                return self.settled("unicast", id, Err(not_found()));
            }
            Some(_) => {}
        }
        let target = to.node().clone();
        self.publish("unicast", envelope, move |error| {
            Err(invalid_or(error, |error| SendError::Unreachable {
                node: target,
                source: Some(error),
            }))
        })
    }

    /// A broadcast: this node's connections get it at once, the others' through the broker.
    fn broadcast(&mut self, kind: PayloadKind, payload: Bytes) -> Confirmation {
        let envelope = self.handle.envelope(Target::Broadcast, kind, payload);
        let shared = Arc::new(envelope.clone());
        let node = &self.handle.node;
        let kept = node.settle_fanned(node.local.deliver_all(&shared));
        let confirmation = self.publish("broadcast", envelope, |error| {
            Err(invalid_or(error, SendError::Broadcast))
        });
        after_kept(confirmation, kept)
    }

    /// A group message: this node's members get it at once, the other nodes' through the
    /// broker.
    fn group(&mut self, group: &GroupName, kind: PayloadKind, payload: Bytes) -> Confirmation {
        self.group_with(group, kind, payload, std::collections::BTreeMap::new())
    }

    /// A group message carrying `headers` (a presence event, say).
    pub(crate) fn group_with(
        &mut self,
        group: &GroupName,
        kind: PayloadKind,
        payload: Bytes,
        headers: std::collections::BTreeMap<String, String>,
    ) -> Confirmation {
        let mut envelope = self
            .handle
            .envelope(Target::Group(group.clone()), kind, payload);
        envelope.headers = headers;
        let shared = Arc::new(envelope.clone());
        let node = &self.handle.node;
        let kept = node.settle_fanned(node.local.deliver_group(group, &shared));
        let confirmation = self.publish("group", envelope, |error| match error {
            // No node bound to the group: nobody (else) to reach.
            ForwardError::Unroutable { .. } => Ok(()),
            error => Err(invalid_or(error, SendError::Broadcast)),
        });
        after_kept(confirmation, kept)
    }
}

/// A unicast to `to`, whose node and queue are gone: when `to` had a session, the message
/// goes where the session is now (or to its log, for its next owner); otherwise `unreachable`.
async fn follow_session(
    node: Arc<Node>,
    to: ConnectionId,
    envelope: Envelope,
) -> Result<MessageId, SendError> {
    let id = envelope.id;
    let gone = || SendError::Unreachable {
        node: to.node().clone(),
        source: None,
    };
    let Some(sessions) = node.sessions.clone() else {
        return Err(gone());
    };
    let Some(session) = sessions.session_of(&to).await else {
        return Err(gone());
    };
    let envelope = Arc::new(envelope);
    match sessions.log_orphan(session, &to, &envelope).await {
        Kept::Logged(_) => Ok(id),
        Kept::Moved(next) => {
            node.send_on(Some(session), next, envelope, 0).await;
            Ok(id)
        }
        Kept::Unknown | Kept::Failed => Err(gone()),
    }
}

/// `confirmation`, resolved only once the sessions of this node that got the message keep it.
fn after_kept(
    mut confirmation: Confirmation,
    kept: Option<futures_core::future::BoxFuture<'static, ()>>,
) -> Confirmation {
    if let Some(kept) = kept {
        let outcome = confirmation.outcome;
        confirmation.outcome = Box::pin(async move {
            kept.await;
            outcome.await
        });
    }
    confirmation
}
