//! Sending into the cluster: [`ClusterHandle`], and the per-connection [`ClusterConnection`].

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use hybrid_cluster_core::Broker;
use hybrid_cluster_core::{
    ConnectionId, Envelope, GroupName, MessageId, NodeId, NodeInfo, PayloadKind, Target,
};
use hybrid_cluster_routing::{Forward, ForwardError};
use parking_lot::Mutex;
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use crate::error::SendError;
use crate::local::{Inbox, InboxItem};
use crate::node::Node;
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

    /// Sends `payload` to the connection `to`, wherever it is, and returns the message's id.
    ///
    /// On another node, a connection that closed before the message arrived cannot be known
    /// here in advance: that node answers with a notice, which reaches this handle's
    /// connection as [`InboxItem::Undeliverable`] naming the message id.
    ///
    /// Fails with [`SendError::NotFound`] when the connection does not exist (on this node,
    /// checked at once; on another node, when the id belongs to a previous run of it), and
    /// with [`SendError::Unreachable`] when its node is gone or the broker refused.
    ///
    /// Sends awaited one after another arrive in that order; to keep several in flight and
    /// still in order, use [`ClusterHandle::ordered`].
    pub async fn send(
        &self,
        to: &ConnectionId,
        kind: PayloadKind,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, SendError> {
        let mut sender = self.ordered();
        // A send settled on this node needs no place of the bound on unconfirmed messages:
        // it never waits behind the broker.
        if sender.needs_place(to) {
            sender.ready().await?;
        }
        sender.send(to, kind, payload).await
    }

    /// Sends a text message to the connection `to` (see [`ClusterHandle::send`]).
    pub async fn send_text(
        &self,
        to: &ConnectionId,
        text: impl Into<String>,
    ) -> Result<MessageId, SendError> {
        self.send(to, PayloadKind::Text, text.into()).await
    }

    /// Sends `payload` to every connection of the cluster, this handle's own included, once.
    ///
    /// Local connections get it at once; other nodes through the broker. An error means the
    /// broker did not take it: this node's connections have it, the others' may not.
    pub async fn broadcast(
        &self,
        kind: PayloadKind,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, SendError> {
        let mut sender = self.ordered();
        sender.ready().await?;
        sender.broadcast(kind, payload).await
    }

    /// Broadcasts a text message (see [`ClusterHandle::broadcast`]).
    pub async fn broadcast_text(&self, text: impl Into<String>) -> Result<MessageId, SendError> {
        self.broadcast(PayloadKind::Text, text.into()).await
    }

    /// Sends `payload` to every member of `group`, on every node that has some. A group with
    /// no member anywhere is not an error: nobody gets it.
    pub async fn send_to_group(
        &self,
        group: &GroupName,
        kind: PayloadKind,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, SendError> {
        let mut sender = self.ordered();
        sender.ready().await?;
        sender.send_to_group(group, kind, payload).await
    }

    /// Sends a text message to a group (see [`ClusterHandle::send_to_group`]).
    pub async fn send_group_text(
        &self,
        group: &GroupName,
        text: impl Into<String>,
    ) -> Result<MessageId, SendError> {
        self.send_to_group(group, PayloadKind::Text, text.into())
            .await
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

    /// Adds this handle's connection to `group`. The node's queue is bound to the group while
    /// it has members, so group messages reach exactly the nodes with members. Joining twice
    /// is not an error.
    pub async fn join(&self, group: &GroupName) -> Result<(), SendError> {
        let id = self.sender()?;
        let not_registered = |_| SendError::NotRegistered {
            connection: id.clone(),
        };
        if !self.node.local.join(id, group).map_err(not_registered)? {
            return Ok(());
        }
        if let Err(error) = self.change_membership(group, true).await {
            let _ = self.node.local.leave(id, group);
            return Err(error);
        }
        Ok(())
    }

    /// Binds or unbinds the node's queue for `group` in a task of its own, so that a caller
    /// that gives up (a client closing mid-join) cannot leave a binding without its count.
    async fn change_membership(&self, group: &GroupName, join: bool) -> Result<(), SendError> {
        let node = Arc::clone(&self.node);
        let group = group.clone();
        let change = tokio::spawn(async move {
            if join {
                node.topology.add_member(&group).await
            } else {
                node.topology.remove_member(&group).await
            }
        });
        match change.await {
            Ok(result) => result.map(|_| ()).map_err(SendError::Group),
            Err(_) => Err(SendError::Group(hybrid_cluster_core::BrokerError::Closed)),
        }
    }

    /// Removes this handle's connection from `group`. Leaving a group one is not in is not an
    /// error.
    pub async fn leave(&self, group: &GroupName) -> Result<(), SendError> {
        let id = self.sender()?;
        let not_registered = |_| SendError::NotRegistered {
            connection: id.clone(),
        };
        if !self.node.local.leave(id, group).map_err(not_registered)? {
            return Ok(());
        }
        self.change_membership(group, false).await
    }
}

/// A send that was started: resolves once the message is in its local inboxes and confirmed
/// by the broker, or with the reason it failed.
#[must_use = "a confirmation holds a place of the node's bound on unconfirmed messages until it is polled to the end"]
pub struct Confirmation {
    id: MessageId,
    outcome: BoxFuture<'static, Result<MessageId, SendError>>,
}

impl Confirmation {
    /// The id of the message, known as soon as it is started.
    pub fn message_id(&self) -> MessageId {
        self.id
    }
}

impl fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Confirmation")
            .field("message_id", &self.id)
            .finish_non_exhaustive()
    }
}

impl std::future::Future for Confirmation {
    type Output = Result<MessageId, SendError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.outcome.as_mut().poll(cx)
    }
}

/// Sends in order with several messages in flight.
///
/// A message is placed in the broker's order when it is *started* ([`send`], [`broadcast`],
/// [`send_to_group`] return its [`Confirmation`] at once), so messages started one after
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
/// [`broadcast`]: OrderedSender::broadcast
/// [`send_to_group`]: OrderedSender::send_to_group
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

    /// Whether a unicast to `to` goes through the broker, and so needs
    /// [`ready`](OrderedSender::ready) first: false for a connection of this node.
    pub fn needs_place(&self, to: &ConnectionId) -> bool {
        to.node() != &self.handle.node.id
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
    fn settled(&mut self, id: MessageId, outcome: Result<MessageId, SendError>) -> Confirmation {
        if self.forward.is_ready() {
            self.forward.disarm();
        }
        self.handle
            .node
            .metrics
            .sent("unicast", outcome.is_ok(), 0.0);
        Confirmation {
            id,
            outcome: Box::pin(std::future::ready(outcome)),
        }
    }

    /// Starts sending `payload` to the connection `to` (see [`ClusterHandle::send`]). On this
    /// node it is delivered at once, needs no place and gives back one held; to another, it
    /// is placed in the broker's order now, in the place [`ready`](OrderedSender::ready)
    /// reserved.
    pub fn send(
        &mut self,
        to: &ConnectionId,
        kind: PayloadKind,
        payload: impl Into<Bytes>,
    ) -> Confirmation {
        let node = Arc::clone(&self.handle.node);
        let envelope = self
            .handle
            .envelope(Target::Connection(to.clone()), kind, payload.into());
        let id = envelope.id;
        let not_found = || SendError::NotFound {
            connection: to.clone(),
        };
        if to.node() == &node.id {
            let outcome = if to.incarnation() != node.incarnation {
                Err(not_found())
            } else {
                let span = self.handle.span("unicast", &envelope);
                span.in_scope(|| {
                    node.local
                        .deliver_to(to, InboxItem::Message(Arc::new(envelope)))
                        .map(|()| id)
                        .map_err(|_| not_found())
                })
            };
            return self.settled(id, outcome);
        }
        match node.discovery.view().node(to.node()) {
            None => {
                let gone = SendError::Unreachable {
                    node: to.node().clone(),
                    source: None,
                };
                return self.settled(id, Err(gone));
            }
            Some(info) if info.incarnation != to.incarnation() => {
                return self.settled(id, Err(not_found()));
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

    /// Starts a broadcast (see [`ClusterHandle::broadcast`]): this node's connections get it
    /// at once, the others' through the broker.
    pub fn broadcast(&mut self, kind: PayloadKind, payload: impl Into<Bytes>) -> Confirmation {
        let envelope = self
            .handle
            .envelope(Target::Broadcast, kind, payload.into());
        self.handle
            .node
            .local
            .deliver_all(&Arc::new(envelope.clone()));
        self.publish("broadcast", envelope, |error| {
            Err(invalid_or(error, SendError::Broadcast))
        })
    }

    /// Starts a group message (see [`ClusterHandle::send_to_group`]): this node's members get
    /// it at once, the other nodes' through the broker.
    pub fn send_to_group(
        &mut self,
        group: &GroupName,
        kind: PayloadKind,
        payload: impl Into<Bytes>,
    ) -> Confirmation {
        let envelope = self
            .handle
            .envelope(Target::Group(group.clone()), kind, payload.into());
        self.handle
            .node
            .local
            .deliver_group(group, &Arc::new(envelope.clone()));
        self.publish("group", envelope, |error| match error {
            // No node bound to the group: nobody (else) to reach.
            ForwardError::Unroutable { .. } => Ok(()),
            error => Err(invalid_or(error, SendError::Broadcast)),
        })
    }
}

/// One WebSocket connection admitted by the cluster layer: its id, its [`Inbox`] of messages
/// from anywhere in the cluster, and a [`ClusterHandle`] that sends as it.
///
/// The layer puts it in the upgrade request's extensions; take it with
/// [`ClusterConnection::take`] (plain hyper) or as an axum extractor, and move it into the
/// socket task. Dropping it (or its inbox) removes the connection from the node.
#[derive(Debug)]
pub struct ClusterConnection {
    handle: ClusterHandle,
    inbox: Inbox,
}

impl ClusterConnection {
    pub(crate) fn new(handle: ClusterHandle, inbox: Inbox) -> Self {
        Self { handle, inbox }
    }

    /// Takes the connection the cluster layer put in a request's extensions.
    pub fn take(extensions: &mut http::Extensions) -> Option<Self> {
        extensions
            .get::<ConnectionSlot>()
            .and_then(ConnectionSlot::take)
    }

    /// The connection's cluster-wide id.
    pub fn id(&self) -> &ConnectionId {
        self.inbox.connection_id()
    }

    /// The handle that sends as this connection.
    pub fn handle(&self) -> &ClusterHandle {
        &self.handle
    }

    /// The connection's inbox.
    pub fn inbox(&mut self) -> &mut Inbox {
        &mut self.inbox
    }

    /// Splits into the sending handle and the inbox, for a socket task that reads and writes
    /// in separate halves. The connection lives as long as the inbox.
    pub fn into_parts(self) -> (ClusterHandle, Inbox) {
        (self.handle, self.inbox)
    }
}

/// The request extension holding an admitted connection until a handler takes it. Dropped
/// with the request when nobody takes it, which removes the connection.
#[derive(Clone)]
pub struct ConnectionSlot(Arc<Mutex<Option<ClusterConnection>>>);

impl ConnectionSlot {
    pub(crate) fn new(connection: ClusterConnection) -> Self {
        Self(Arc::new(Mutex::new(Some(connection))))
    }

    /// Takes the connection, once.
    pub fn take(&self) -> Option<ClusterConnection> {
        self.0.lock().take()
    }
}

impl fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnectionSlot")
            .field(&self.0.lock().as_ref().map(ClusterConnection::id))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;
    use crate::cluster::Cluster;
    use crate::config::{Backends, ClusterConfig};
    use crate::hybrid::{Admission, admit};

    async fn node(max_in_flight: usize) -> Cluster {
        let mut config = ClusterConfig::new(NodeId::new("places").unwrap(), "127.0.0.1", 1);
        config.forward.max_in_flight = max_in_flight;
        Cluster::start(config, Backends::embedded()).await.unwrap()
    }

    fn connect(cluster: &Cluster) -> ClusterConnection {
        match admit(&cluster.node) {
            Admission::Accept(connection) => connection,
            _ => panic!("the node admits"),
        }
    }

    async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), future)
            .await
            .expect("it does not hang")
    }

    #[tokio::test]
    async fn senders_idle_after_a_local_send_hold_no_place() {
        let cluster = node(4).await;
        let connections: Vec<ClusterConnection> = (0..20).map(|_| connect(&cluster)).collect();
        // Each readies its sender (as a socket task does before a request it has not read
        // yet), sends to itself on this node, then goes idle, its sender kept.
        let mut idle = Vec::new();
        for connection in &connections {
            let mut sender = connection.handle().ordered();
            within(sender.ready()).await.unwrap();
            within(sender.send(connection.id(), PayloadKind::Text, "to me"))
                .await
                .unwrap();
            idle.push(sender);
        }
        assert_eq!(
            cluster.node.in_flight(),
            0,
            "no place is held by an idle sender"
        );
        within(cluster.handle().broadcast_text("still flowing"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_local_send_never_waits_for_a_place_and_a_disarmed_sender_gives_its_back() {
        let cluster = node(2).await;
        let a = connect(&cluster);
        let b = connect(&cluster);
        let mut holders = [a.handle().ordered(), b.handle().ordered()];
        for holder in &mut holders {
            within(holder.ready()).await.unwrap();
        }
        // Every place is taken; a send within the node does not need one.
        within(a.handle().send_text(b.id(), "local")).await.unwrap();
        let mut waiting = a.handle().ordered();
        let mut ready = tokio_test::task::spawn(waiting.ready());
        assert!(ready.poll().is_pending());
        assert!(holders[0].disarm());
        assert!(ready.is_woken());
        assert!(ready.poll().is_ready());
    }
}
