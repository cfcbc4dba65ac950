//! One running node of the cluster: discovery, placement, routing and its connections, wired.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use hybrid_cluster_balance::{Placement, Placer, Selector};
use hybrid_cluster_core::{
    Broker, ConnectionId, ConnectionIds, Envelope, Incarnation, LiveNodeInfo, NodeId, NodeInfo,
    NodeStatus, PayloadKind, Registry, Target,
};
use hybrid_cluster_discovery::{ConnectionCounter, Discovery, RedisOptions, RedisRegistry};
use hybrid_cluster_routing::{Forward, NodeTopology, RabbitBroker, ReceiveConfig, Receiver};
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

use crate::config::{Backends, ClusterConfig};
use crate::error::{ClusterError, error_chain};
use crate::handle::{ClusterConnection, ClusterHandle};
use crate::hybrid::HybridClusterLayer;
use crate::local::{CloseFrame, InboxItem, LocalConnections, Undeliverable};
use crate::metrics::Metrics;
use crate::shutdown::close_reason;
use crate::trace::TraceContext;

/// The extension header of an undeliverable notice: the id of the message not delivered.
const HEADER_UNDELIVERABLE: &str = "undeliverable";
/// The extension header of an undeliverable notice: the connection that was gone.
const HEADER_UNDELIVERABLE_TO: &str = "undeliverable-to";

/// Reads an undeliverable notice, if `envelope` is one.
fn undeliverable_notice(envelope: &Envelope) -> Option<Undeliverable> {
    let message_id = envelope.headers.get(HEADER_UNDELIVERABLE)?.parse().ok()?;
    let to = envelope
        .headers
        .get(HEADER_UNDELIVERABLE_TO)?
        .parse()
        .ok()?;
    Some(Undeliverable { message_id, to })
}

/// The WebSocket close code sent to clients when their node shuts down: 1012, service restart.
pub const CLOSE_SERVICE_RESTART: u16 = 1012;

/// What the cluster layer decided for one upgrade request.
pub(crate) enum Admission {
    /// Serve it here, as this connection.
    Accept(ClusterConnection),
    /// Send the client to this URL.
    Redirect(String),
    /// No node has room.
    Unavailable,
}

pub(crate) struct Node {
    pub(crate) id: NodeId,
    pub(crate) incarnation: Incarnation,
    pub(crate) config: ClusterConfig,
    pub(crate) local: Arc<LocalConnections>,
    pub(crate) topology: NodeTopology<dyn Broker>,
    pub(crate) forward: Forward<dyn Broker>,
    pub(crate) discovery: Discovery,
    placer: Placer,
    ids: ConnectionIds,
    /// This node's cell in the view, so that draining shows in placement at once.
    local_info: LiveNodeInfo,
    draining: AtomicBool,
    stopped: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) metrics: Metrics,
}

impl Drop for Node {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().drain(..) {
            task.abort();
        }
    }
}

impl Node {
    /// Places of the bound on unconfirmed messages in use: messages sent to the broker and not
    /// yet confirmed, and places reserved for a send about to start.
    pub(crate) fn in_flight(&self) -> usize {
        self.config
            .forward
            .max_in_flight
            .saturating_sub(self.forward.available_permits())
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Decides what becomes of a new WebSocket client.
    pub(crate) fn admit(self: &Arc<Self>) -> Admission {
        let placement = self.placer.place();
        match placement {
            Placement::Accept
                if !self.is_draining()
                    && self.local.len() < self.config.max_connections as usize =>
            {
                let id = self.ids.next_id();
                let inbox = self.local.register(id.clone());
                self.metrics.upgrade("accepted");
                tracing::debug!(connection = %id, "accepted a WebSocket client");
                Admission::Accept(ClusterConnection::new(
                    ClusterHandle::new(Arc::clone(self), Some(id)),
                    inbox,
                ))
            }
            Placement::Redirect(redirect) => {
                self.metrics.upgrade("redirected");
                tracing::debug!(to = %redirect.node, "redirecting a WebSocket client");
                Admission::Redirect(redirect.ws_url())
            }
            Placement::Accept | Placement::Refuse(_) => {
                self.metrics.upgrade("refused");
                Admission::Unavailable
            }
        }
    }

    /// Hands an envelope that came through the broker to the local connections it is for.
    fn deliver_incoming(self: &Arc<Self>, envelope: Envelope) {
        let trace_id = TraceContext::of(&envelope).trace_id();
        let span = tracing::info_span!(
            "hybrid_cluster.deliver",
            node = %self.id,
            from = %envelope.origin,
            message_id = %envelope.id,
            trace_id = %trace_id,
        );
        let _entered = span.enter();
        let envelope = Arc::new(envelope);
        match &envelope.target {
            Target::Connection(id) => {
                if let Some(notice) = undeliverable_notice(&envelope) {
                    // Best effort: the sender may have closed meanwhile too.
                    let _ = self.local.deliver_to(id, InboxItem::Undeliverable(notice));
                    return;
                }
                let delivered = id.node() == &self.id
                    && id.incarnation() == self.incarnation
                    && self
                        .local
                        .deliver_to(id, InboxItem::Message(Arc::clone(&envelope)))
                        .is_ok();
                if delivered {
                    self.metrics.received("unicast");
                } else {
                    self.metrics.dropped("connection_gone");
                    self.report_undeliverable(&envelope, id);
                }
            }
            // This node delivered its own broadcasts and group messages locally already.
            Target::Broadcast if envelope.origin != self.id => {
                self.metrics.received("broadcast");
                self.local.deliver_all(&envelope);
            }
            Target::Group(group) if envelope.origin != self.id => {
                self.metrics.received("group");
                self.local.deliver_group(group, &envelope);
            }
            Target::Broadcast | Target::Group(_) => {}
            Target::Node(_) => {
                tracing::debug!(from = %envelope.origin, "ignoring a node message: none is defined yet");
            }
        }
    }

    /// Tells the sender of a message for a connection that is gone: no message is lost
    /// without its sender learning of it.
    fn report_undeliverable(self: &Arc<Self>, envelope: &Envelope, to: &ConnectionId) {
        let Some(sender) = envelope.sender.clone() else {
            tracing::debug!(connection = %to, message = %envelope.id, "a message from a node handle found its connection gone");
            return;
        };
        tracing::debug!(connection = %to, message = %envelope.id, %sender, "telling the sender its message found the connection gone");
        let mut notice = Envelope::new(
            self.id.clone(),
            Target::Connection(sender),
            PayloadKind::Binary,
            bytes::Bytes::new(),
        );
        notice
            .headers
            .insert(HEADER_UNDELIVERABLE.to_owned(), envelope.id.to_string());
        notice
            .headers
            .insert(HEADER_UNDELIVERABLE_TO.to_owned(), to.to_string());
        // Boxed as `Send` here, where the lifetimes are concrete.
        let send: futures_util::future::BoxFuture<'static, _> =
            Box::pin(tower::ServiceExt::oneshot(self.forward.clone(), notice));
        tokio::spawn(async move {
            if let Err(error) = send.await {
                tracing::debug!(%error, "could not send an undeliverable notice");
            }
        });
    }

    /// Marks this node Draining, here at once and for its peers.
    async fn drain(&self) -> Result<(), ClusterError> {
        if self.draining.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut info = (*self.local_info.get()).clone();
        info.status = NodeStatus::Draining;
        self.local_info.update(info);
        self.discovery.drain().await?;
        Ok(())
    }
}

/// A running node of the cluster.
///
/// [`Cluster::start`] registers the node, declares its queue, starts receiving and follows
/// the other nodes. [`Cluster::layer`] gives the tower layer to stack onto the WebSocket
/// server; [`Cluster::handle`] sends from anywhere in the process; [`Cluster::shutdown`]
/// leaves gracefully. Cloning is cheap; the node stops when the last clone and the last
/// connection are dropped.
#[derive(Clone)]
pub struct Cluster {
    pub(crate) node: Arc<Node>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node.id)
            .field("incarnation", &self.node.incarnation)
            .field("connections", &self.node.local.len())
            .field("draining", &self.node.is_draining())
            .finish()
    }
}

impl Cluster {
    /// Starts this node: connects the backends, declares its queue, registers it, and starts
    /// receiving. Fails, naming the problem, when a backend cannot be reached.
    pub async fn start(
        mut config: ClusterConfig,
        backends: Backends,
    ) -> Result<Self, ClusterError> {
        if let Some(secret) = &config.secret {
            config.forward.secret = Some(secret.clone());
            config.discovery = config.discovery.clone().with_secret(secret.clone());
        }
        let (registry, broker): (Arc<dyn Registry>, Arc<dyn Broker>) = match backends {
            Backends::Embedded { registry, broker } => (Arc::new(registry), Arc::new(broker)),
            Backends::Servers { redis, amqp } => {
                let registry =
                    RedisRegistry::connect(&redis, &config.prefix, RedisOptions::default()).await?;
                let mut rabbit = config.rabbitmq.clone();
                rabbit
                    .connection_name
                    .get_or_insert_with(|| format!("hybrid-cluster {}", config.node_id));
                let broker = RabbitBroker::connect(&amqp, &config.prefix, rabbit).await?;
                (Arc::new(registry), Arc::new(broker))
            }
        };
        let id = config.node_id.clone();
        let incarnation = Incarnation::random();

        let topology =
            NodeTopology::declare(Arc::clone(&broker), id.clone(), &config.queue).await?;
        let deliveries = topology.consume(&config.consume).await?;

        let counter = ConnectionCounter::new();
        let metrics = Metrics::new(id.as_str());
        let local = Arc::new(LocalConnections::new(
            counter.clone(),
            config.inbox_capacity,
            config.slow_client,
            metrics.clone(),
        ));
        let mut info = NodeInfo::new(id.clone(), incarnation, config.address.clone(), config.port);
        info.endpoint = config.endpoint.clone();
        info.max_connections = config.max_connections;
        let discovery = Discovery::start(
            registry,
            info,
            config.discovery.clone().with_connections(counter),
        )
        .await?;
        let local_info = discovery
            .view()
            .members()
            .get(&id)
            .cloned()
            .unwrap_or_else(|| LiveNodeInfo::new(discovery.registrar().info()));
        let placer = Placer::with(
            local_info.clone(),
            config.placement,
            Selector::new(config.strategy),
            Some(discovery.view().epoch().clone()),
        );
        let forward = Forward::with_config(broker, config.forward.clone());

        let node = Arc::new(Node {
            ids: ConnectionIds::new(id.clone(), incarnation),
            id,
            incarnation,
            config,
            local,
            topology,
            forward,
            placer,
            local_info,
            draining: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            discovery,
            metrics,
        });

        let receiving = {
            let receive = ReceiveConfig {
                secret: node.config.secret.clone(),
                replay_window: node.config.replay_window,
                ..ReceiveConfig::default()
            };
            let weak = Arc::downgrade(&node);
            let destination = tower::service_fn(move |envelope: Envelope| {
                let node = Weak::upgrade(&weak);
                async move {
                    match node {
                        Some(node) => {
                            node.deliver_incoming(envelope);
                            Ok(())
                        }
                        None => Err("the node stopped"),
                    }
                }
            });
            let node_id = node.id.clone();
            let receiver = Receiver::with_config(deliveries, receive);
            let stats = receiver.stats();
            let metrics = node.metrics.clone();
            let every = node.config.discovery.heartbeat;
            let reporting = tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    metrics.receiver(&stats.get());
                }
            });
            node.tasks.lock().push(reporting);
            tokio::spawn(async move {
                if let Err(error) = receiver.run(destination).await {
                    tracing::error!(node = %node_id, %error, "stopped receiving messages");
                }
            })
        };
        let placing = {
            let placer = node.placer.clone();
            let discover = node.discovery.discover(|_: &NodeInfo| ());
            tokio::spawn(async move {
                if let Err(error) = placer.follow(discover).await {
                    tracing::error!(%error, "placement stopped following discovery");
                }
            })
        };
        let unbinding = {
            let weak = Arc::downgrade(&node);
            let local = Arc::clone(&node.local);
            tokio::spawn(async move {
                loop {
                    let groups = local.departed_groups().await;
                    let Some(node) = weak.upgrade() else { return };
                    for group in groups {
                        if let Err(error) = node.topology.remove_member(&group).await {
                            tracing::warn!(%group, %error, "could not unbind a group its last member left");
                        }
                    }
                }
            })
        };
        let watching = {
            let metrics = node.metrics.clone();
            let mut members = node.discovery.view().subscribe();
            tokio::spawn(async move {
                let mut known: std::collections::BTreeSet<NodeId> =
                    std::collections::BTreeSet::new();
                loop {
                    let now: std::collections::BTreeSet<NodeId> = members
                        .borrow_and_update()
                        .iter()
                        .map(|(id, _)| id.clone())
                        .collect();
                    for _ in now.difference(&known) {
                        metrics.discovery_change("join");
                    }
                    for _ in known.difference(&now) {
                        metrics.discovery_change("leave");
                    }
                    metrics.nodes(now.len());
                    known = now;
                    if members.changed().await.is_err() {
                        return;
                    }
                }
            })
        };
        node.tasks
            .lock()
            .extend([receiving, placing, unbinding, watching]);
        tracing::info!(
            node = %node.id,
            incarnation = %node.incarnation,
            url = %node.local_info.get().ws_url(),
            "node started"
        );
        Ok(Self { node })
    }

    /// The tower layer that makes a WebSocket server's connections part of this cluster.
    pub fn layer(&self) -> HybridClusterLayer {
        HybridClusterLayer::new(self.clone())
    }

    /// A handle that sends from this node (with no sending connection).
    pub fn handle(&self) -> ClusterHandle {
        ClusterHandle::new(Arc::clone(&self.node), None)
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.node.id
    }

    /// This run of the node.
    pub fn incarnation(&self) -> Incarnation {
        self.node.incarnation
    }

    /// Every node of the cluster as this node sees it, this one included.
    pub fn nodes(&self) -> Vec<Arc<NodeInfo>> {
        self.node.discovery.nodes()
    }

    /// This node's discovery (its registrar and its view of the cluster).
    pub fn discovery(&self) -> &Discovery {
        &self.node.discovery
    }

    /// Live connections on this node.
    pub fn local_connections(&self) -> usize {
        self.node.local.len()
    }

    /// Whether this node is draining or stopped.
    pub fn is_draining(&self) -> bool {
        self.node.is_draining()
    }

    /// Sets this node Draining: it keeps serving its connections, but new clients are sent
    /// to other nodes, and peers' balancers stop choosing it.
    pub async fn drain(&self) -> Result<(), ClusterError> {
        self.node.drain().await
    }

    /// Leaves the cluster gracefully: drains, closes every local connection with close code
    /// 1012 and a reason naming a node to reconnect to (JSON, see [`close_reason`]), waits
    /// for them to go, then leaves discovery and removes the node's queue.
    ///
    /// It always ends within [`ClusterConfig::shutdown_grace`](crate::ClusterConfig), whatever
    /// the state of the connections and the servers: clients get most of the period to close
    /// (the last quarter, at most 2 s, is kept for leaving), and each step that does not
    /// finish in time is cut short and named in the log (connections still open, messages
    /// still awaiting the broker's confirmation, a registry or broker that did not answer).
    /// A node that could not leave is dropped by its peers when its lease runs out.
    ///
    /// Calling it again after it succeeded does nothing; after it failed, it tries again.
    pub async fn shutdown(&self) -> Result<(), ClusterError> {
        let node = &self.node;
        if node.stopped.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let grace = node.config.shutdown_grace;
        let deadline = Instant::now() + grace;
        let leaving = (grace / 4).min(Duration::from_secs(2));
        match tokio::time::timeout_at(deadline - leaving, node.drain()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = %error_chain(&error), "could not publish the drain; leaving anyway")
            }
            Err(_) => {
                tracing::warn!("publishing the drain took too long: cut short, leaving anyway")
            }
        }
        let redirect = match node.placer.place() {
            Placement::Redirect(redirect) => Some(redirect),
            Placement::Accept | Placement::Refuse(_) => None,
        };
        let frame = CloseFrame {
            code: CLOSE_SERVICE_RESTART,
            reason: close_reason(redirect.as_ref()),
        };
        node.local.close_all(&frame);
        if tokio::time::timeout_at(deadline - leaving, node.local.wait_empty())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = node.local.len(),
                awaiting_confirmation = node.in_flight(),
                grace_ms = grace.as_millis() as u64,
                "shutdown grace period ran out: cutting short the connections still open (their clients were sent the close) and the messages still awaiting the broker's confirmation (their senders get no answer)"
            );
        }
        // Every step is taken even when one fails; a failed shutdown can be called again.
        let deadline = deadline.max(Instant::now() + leaving / 2);
        let left = match tokio::time::timeout_at(deadline, node.discovery.registrar().leave()).await
        {
            Ok(left) => left.map_err(ClusterError::from),
            Err(_) => {
                tracing::warn!(
                    "leaving discovery took too long: cut short (peers drop this node when its lease runs out)"
                );
                Err(ClusterError::TimedOut("leaving discovery"))
            }
        };
        for task in node.tasks.lock().drain(..) {
            task.abort();
        }
        let deadline = deadline.max(Instant::now() + leaving / 2);
        let deleting = node.topology.broker().delete_queue(&node.id);
        let deleted = match tokio::time::timeout_at(deadline, deleting).await {
            Ok(deleted) => deleted.map_err(ClusterError::from),
            Err(_) => {
                tracing::warn!(
                    "deleting the node's queue took too long: cut short (it expires on its own)"
                );
                Err(ClusterError::TimedOut("deleting the node's queue"))
            }
        };
        match left.and(deleted) {
            Ok(()) => {
                tracing::info!(node = %node.id, "node left the cluster");
                Ok(())
            }
            Err(error) => {
                node.stopped.store(false, Ordering::Release);
                Err(error)
            }
        }
    }
}
