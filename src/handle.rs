//! Sending into the cluster: [`ClusterHandle`], and the per-connection [`ClusterConnection`].

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use hybrid_cluster_core::{
    ConnectionId, Envelope, GroupName, MessageId, NodeId, NodeInfo, PayloadKind, Target,
};
use hybrid_cluster_routing::ForwardError;
use parking_lot::Mutex;
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::Instrument;

use crate::cluster::Node;
use crate::error::SendError;
use crate::local::{Inbox, InboxItem};
use crate::trace::TraceContext;

/// Messages sent to the broker and not yet confirmed.
fn in_flight(node: &Node) -> usize {
    node.config
        .forward
        .max_in_flight
        .saturating_sub(node.forward.available_permits())
}

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
        let trace_id = TraceContext::of(envelope).trace_id_hex();
        tracing::info_span!(
            "hybrid_cluster.send",
            node = %self.node.id,
            kind,
            message_id = %envelope.id,
            trace_id = %trace_id,
        )
    }

    fn forward(&self, envelope: Envelope) -> BoxFuture<'static, Result<(), ForwardError>> {
        let node = Arc::clone(&self.node);
        // Boxed as `Send` first, where the lifetimes are concrete.
        let send: BoxFuture<'static, Result<(), ForwardError>> =
            Box::pin(self.node.forward.clone().oneshot(envelope));
        Box::pin(async move {
            let result = send.await;
            node.metrics.in_flight(in_flight(&node));
            result
        })
    }

    /// Records a send's outcome and duration.
    fn record<T, E>(&self, kind: &'static str, started: Instant, result: &Result<T, E>) {
        self.node
            .metrics
            .sent(kind, result.is_ok(), started.elapsed().as_secs_f64());
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
    pub async fn send(
        &self,
        to: &ConnectionId,
        kind: PayloadKind,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, SendError> {
        let started = Instant::now();
        let envelope = self.envelope(Target::Connection(to.clone()), kind, payload.into());
        let span = self.span("unicast", &envelope);
        let result = self.send_inner(to, envelope).instrument(span).await;
        self.record("unicast", started, &result);
        result
    }

    async fn send_inner(
        &self,
        to: &ConnectionId,
        envelope: Envelope,
    ) -> Result<MessageId, SendError> {
        let id = envelope.id;
        let not_found = || SendError::NotFound {
            connection: to.clone(),
        };
        if to.node() == &self.node.id {
            if to.incarnation() != self.node.incarnation {
                return Err(not_found());
            }
            return self
                .node
                .local
                .deliver_to(to, InboxItem::Message(Arc::new(envelope)))
                .map(|()| id)
                .map_err(|_| not_found());
        }
        match self.node.discovery.view().node(to.node()) {
            None => {
                return Err(SendError::Unreachable {
                    node: to.node().clone(),
                    source: None,
                });
            }
            Some(info) if info.incarnation != to.incarnation() => return Err(not_found()),
            Some(_) => {}
        }
        self.forward(envelope)
            .await
            .map(|()| id)
            .map_err(|error| match error {
                ForwardError::Encode(_) | ForwardError::PayloadTooLarge { .. } => {
                    SendError::Invalid(error)
                }
                _ => SendError::Unreachable {
                    node: to.node().clone(),
                    source: Some(error),
                },
            })
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
        let started = Instant::now();
        let envelope = self.envelope(Target::Broadcast, kind, payload.into());
        let id = envelope.id;
        let span = self.span("broadcast", &envelope);
        self.node.local.deliver_all(&Arc::new(envelope.clone()));
        let result = self
            .forward(envelope)
            .instrument(span)
            .await
            .map(|()| id)
            .map_err(|error| match error {
                ForwardError::Encode(_) | ForwardError::PayloadTooLarge { .. } => {
                    SendError::Invalid(error)
                }
                _ => SendError::Broadcast(error),
            });
        self.record("broadcast", started, &result);
        result
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
        let started = Instant::now();
        let envelope = self.envelope(Target::Group(group.clone()), kind, payload.into());
        let id = envelope.id;
        let span = self.span("group", &envelope);
        self.node
            .local
            .deliver_group(group, &Arc::new(envelope.clone()));
        let result = match self.forward(envelope).instrument(span).await {
            Ok(()) | Err(ForwardError::Unroutable { .. }) => Ok(id),
            Err(error @ (ForwardError::Encode(_) | ForwardError::PayloadTooLarge { .. })) => {
                Err(SendError::Invalid(error))
            }
            Err(error) => Err(SendError::Broadcast(error)),
        };
        self.record("group", started, &result);
        result
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
