//! One running node of the cluster: discovery, placement, routing and its connections, wired.

mod tasks;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hybrid_cluster_balance::{Placement, Placer, Selector};
use hybrid_cluster_core::{
    Broker, ConnectionIds, ConsumeOptions, ConsumerState, Envelope, Incarnation, LiveNodeInfo,
    NodeId, NodeInfo, NodeStatus, Registry, Target,
};
use hybrid_cluster_discovery::{ConnectionCounter, Discovery, RedisOptions, RedisRegistry};
use hybrid_cluster_routing::{Forward, NodeTopology, RabbitBroker};
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

use crate::config::{Backends, ClusterConfig};
use crate::error::{ClusterError, error_chain};
use crate::handle::{ClusterConnection, ClusterHandle};
use crate::hybrid::HybridClusterLayer;
use crate::local::{CloseFrame, InboxItem, LocalConnections};
use crate::metrics::Metrics;
use crate::shutdown::close_reason;
use crate::trace::TraceContext;

/// The registry and broker of `backends`, connected.
async fn connect_backends(
    config: &ClusterConfig,
    backends: Backends,
) -> Result<(Arc<dyn Registry>, Arc<dyn Broker>), ClusterError> {
    Ok(match backends {
        Backends::Embedded { registry, broker } => (Arc::new(registry), Arc::new(broker)),
        Backends::Custom { registry, broker } => (registry, broker),
        Backends::Servers { redis, amqp } => {
            if tracing::enabled!(target: "lapin::returned_messages", tracing::Level::WARN) {
                tracing::warn!(
                    "lapin logs each message RabbitMQ returns (a group with no member elsewhere, a node \
                     gone) whole, payload included, at WARN under the target \
                     `lapin::returned_messages`: filter it out (`lapin::returned_messages=error`) to \
                     keep payloads out of the logs"
                );
            }
            let registry =
                RedisRegistry::connect(&redis, &config.prefix, RedisOptions::default()).await?;
            let mut rabbit = config.rabbitmq.clone();
            rabbit
                .connection_name
                .get_or_insert_with(|| format!("hybrid-cluster {}", config.node_id));
            let broker = RabbitBroker::connect(&amqp, &config.prefix, rabbit).await?;
            (Arc::new(registry), Arc::new(broker))
        }
    })
}

/// A message in this node's queue whose target is another node's: see
/// [`Node::deliver_incoming`].
#[derive(Debug, thiserror::Error)]
#[error("its target is not on this node: it was republished here, not routed")]
pub(crate) struct Misrouted;

/// A step of a shutdown, cut short (and named in the log) at `deadline`.
async fn within(
    deadline: Instant,
    step: &'static str,
    doing: impl std::future::Future<Output = Result<(), ClusterError>>,
) -> Result<(), ClusterError> {
    match tokio::time::timeout_at(deadline, doing).await {
        Ok(done) => done,
        Err(_) => {
            tracing::warn!(
                step,
                "a shutdown step took too long: cut short (peers drop this node when its lease runs out; its queue expires on its own)"
            );
            Err(ClusterError::TimedOut(step))
        }
    }
}

/// Starts consuming this node's queue. A peer may be reading it still (taking it over after
/// this node's previous run went without leaving, see [`takeover`](crate::takeover)): it lets
/// go within seconds, so a queue in use is tried again for a while.
async fn consume_own_queue(
    topology: &NodeTopology<dyn Broker>,
    options: &ConsumeOptions,
) -> Result<hybrid_cluster_core::Deliveries, ClusterError> {
    // Longer than a taker's round, so that the node gets its queue between two of them.
    let deadline = Instant::now() + crate::takeover::ROUND * 3;
    loop {
        match topology.consume(options).await {
            Err(hybrid_cluster_core::BrokerError::QueueInUse { .. })
                if Instant::now() < deadline =>
            {
                tracing::info!(
                    "this node's queue is read by a peer that took it over: waiting for it to let go"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            consumed => return Ok(consumed?),
        }
    }
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

    /// Why the node does not receive from the broker now; `None` while it does.
    not_receiving: Mutex<Option<String>>,
    /// Held while the node's status changes (drain, degraded, active again), so that the
    /// last change wins in the registry too.
    status_change: tokio::sync::Mutex<()>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The receiver's task, stopped first at shutdown.
    receiver: Mutex<Option<JoinHandle<()>>>,
    pub(crate) metrics: Metrics,
}

impl Drop for Node {
    fn drop(&mut self) {
        let receiver = self.receiver.get_mut().take();
        for task in self.tasks.get_mut().drain(..).chain(receiver) {
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
    ///
    /// A message whose target cannot be on this node (a unicast or notice for another node's
    /// connection, a node message for another node) was republished into this node's queue,
    /// not routed here: it is refused (and dead-lettered by the receiver), never answered, so
    /// that a captured message replayed elsewhere cannot make a node tell its real sender a
    /// false `not_found`.
    fn deliver_incoming(self: &Arc<Self>, envelope: Envelope) -> Result<(), Misrouted> {
        if !self.routes_here(&envelope.target) {
            return Err(Misrouted);
        }
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
                if let Some(notice) = crate::notice::read(&envelope) {
                    // Best effort: the sender may have closed meanwhile too.
                    let _ = self.local.deliver_to(id, InboxItem::Undeliverable(notice));
                    return Ok(());
                }
                let delivered = id.incarnation() == self.incarnation
                    && self
                        .local
                        .deliver_to(id, InboxItem::Message(Arc::clone(&envelope)))
                        .is_ok();
                if delivered {
                    self.metrics.received("unicast");
                } else {
                    self.metrics.dropped("connection_gone");
                    self.local.bounced.bounce_envelope(&envelope);
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
        Ok(())
    }

    /// Whether a message for `target` is routed to this node's queue.
    fn routes_here(&self, target: &Target) -> bool {
        match target {
            Target::Connection(id) => id.node() == &self.id,
            Target::Node(node) => node == &self.id,
            Target::Broadcast | Target::Group(_) => true,
        }
    }

    /// Marks this node Draining, here at once and for its peers.
    async fn drain(&self) -> Result<(), ClusterError> {
        let _changing = self.status_change.lock().await;
        if self.draining.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.set_local_status(NodeStatus::Draining);
        self.discovery.drain().await?;
        Ok(())
    }

    /// Takes over the queue of `gone`, a node that left this node's view, in a task of its
    /// own: see [`takeover`](crate::takeover).
    fn take_over_queue(self: &Arc<Self>, gone: NodeId) {
        if gone == self.id || self.is_draining() {
            return;
        }
        let broker = Arc::clone(self.topology.broker());
        let secret = self.config.secret.clone();
        let weak = Arc::downgrade(self);
        let bounced = Arc::clone(&self.local.bounced);
        let task = tokio::spawn(async move {
            let is_back = {
                let gone = gone.clone();
                move || {
                    weak.upgrade()
                        .is_none_or(|node| node.discovery.view().node(&gone).is_some())
                }
            };
            let bounce = move |envelope: &Envelope| bounced.bounce_envelope(envelope);
            crate::takeover::take_over(broker, gone, secret, is_back, bounce).await;
        });
        let mut tasks = self.tasks.lock();
        tasks.retain(|task| !task.is_finished());
        tasks.push(task);
    }

    /// Stops the receiver, and waits until the broker has let go of its consumer (so that
    /// what it had not settled is back in the queue).
    async fn stop_receiving(&self) {
        let consumer = self.topology.broker().consumer_state(&self.id);
        if let Some(receiver) = self.receiver.lock().take() {
            receiver.abort();
        }
        if let Some(mut consumer) = consumer {
            // The broker drops its end once the consumer is gone.
            while consumer.changed().await.is_ok() {}
        }
    }

    /// The first part of a shutdown: drains, and closes every client with 1012 and a reason
    /// naming a node to reconnect to; waits for them to go until `deadline`, then says in the
    /// log what it cut short.
    async fn close_clients(&self, deadline: Instant) {
        match tokio::time::timeout_at(deadline, self.drain()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = %error_chain(&error), "could not publish the drain; leaving anyway")
            }
            Err(_) => {
                tracing::warn!("publishing the drain took too long: cut short, leaving anyway")
            }
        }
        let redirect = match self.placer.place() {
            Placement::Redirect(redirect) => Some(redirect),
            Placement::Accept | Placement::Refuse(_) => None,
        };
        let frame = CloseFrame {
            code: CLOSE_SERVICE_RESTART,
            reason: close_reason(redirect.as_ref()),
        };
        self.local.close_all(&frame);
        if tokio::time::timeout_at(deadline, self.local.wait_empty())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = self.local.len(),
                awaiting_confirmation = self.in_flight(),
                grace_ms = self.config.shutdown_grace.as_millis() as u64,
                "shutdown grace period ran out: cutting short the connections still open (their clients were sent the close) and the messages still awaiting the broker's confirmation (their senders get no answer)"
            );
        }
    }

    /// This node's status in its own cell of the view, which placement reads at once.
    fn set_local_status(&self, status: NodeStatus) {
        let mut info = (*self.local_info.get()).clone();
        info.status = status;
        self.local_info.update(info);
    }

    /// Why the node does not receive from the broker now, if it does not.
    pub(crate) fn not_receiving(&self) -> Option<String> {
        self.not_receiving.lock().clone()
    }

    /// Follows the node's consumer: while it is not taking deliveries the node is Degraded
    /// (here, for placement, and in its record, for its peers) and not healthy, and says so
    /// in the log; once it takes them again, the node is Active again (unless it drains).
    async fn follow_consumer(&self, state: ConsumerState) {
        let _changing = self.status_change.lock().await;
        let status = match state {
            ConsumerState::Consuming => {
                if self.not_receiving.lock().take().is_none() {
                    return;
                }
                tracing::info!(node = %self.id, "receiving from the broker again: the node is active");
                NodeStatus::Active
            }
            ConsumerState::Interrupted { reason } => {
                tracing::error!(node = %self.id, %reason, "the node does not receive from the broker: it is degraded (no new clients, /healthz 503) until its consumer is restored");
                *self.not_receiving.lock() = Some(reason);
                NodeStatus::Degraded
            }
        };
        self.metrics.receiving(status == NodeStatus::Active);
        if self.is_draining() {
            return;
        }
        self.set_local_status(status);
        if let Err(error) = self.discovery.registrar().set_status(status).await {
            tracing::warn!(error = %error_chain(&error), %status, "could not publish the node's status");
        }
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
        config.queue.durability = config.durability;
        config.rabbitmq.persistent = config.durability.is_persistent();
        if let Some(secret) = &config.secret {
            config.forward.secret = Some(secret.clone());
            config.discovery = config.discovery.clone().with_secret(secret.clone());
        }
        let (registry, broker) = connect_backends(&config, backends).await?;
        let id = config.node_id.clone();
        let incarnation = Incarnation::random();

        let topology =
            NodeTopology::declare(Arc::clone(&broker), id.clone(), &config.queue).await?;
        let deliveries = consume_own_queue(&topology, &config.consume).await?;

        let counter = ConnectionCounter::new();
        let metrics = Metrics::new(id.as_str());
        let local = Arc::new(
            LocalConnections::new(
                counter.clone(),
                config.inbox_capacity,
                config.slow_client,
                metrics.clone(),
            )
            .with_byte_bound(config.inbox_bytes),
        );
        let mut info = NodeInfo::new(id.clone(), incarnation, config.address.clone(), config.port);
        info.endpoint = config.endpoint.clone();
        info.public_url = config.public_url.clone();
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
            not_receiving: Mutex::new(None),
            status_change: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            receiver: Mutex::new(None),
            discovery,
            metrics,
        });

        tasks::spawn_all(&node, deliveries);
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

    /// Whether this node serves as it should: not draining, and receiving from the broker.
    /// Otherwise, why not, in words (what `/healthz` answers with its 503).
    pub fn health(&self) -> Result<(), String> {
        if self.node.is_draining() {
            return Err("draining".to_owned());
        }
        match self.node.not_receiving() {
            Some(reason) => Err(format!("not receiving from the broker: {reason}")),
            None => Ok(()),
        }
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
        node.close_clients(deadline - leaving).await;
        // Every step is taken even when one fails; a failed shutdown can be called again.
        let deadline = deadline.max(Instant::now() + leaving / 2);
        let left = within(deadline, "leaving discovery", async {
            node.discovery
                .registrar()
                .leave()
                .await
                .map_err(ClusterError::from)
        })
        .await;
        // Receiving stops: what still waits in the queue stays there, for a peer to take
        // over and answer once it sees this node gone.
        let stopped = within(deadline, "stopping the receiver", async {
            node.stop_receiving().await;
            Ok(())
        })
        .await;
        // Messages that found their connection closed are answered before the tasks stop.
        let told = within(
            deadline,
            "telling senders of undeliverable messages",
            async {
                node.local.bounced.all_told().await;
                Ok(())
            },
        )
        .await;
        for task in node.tasks.lock().drain(..) {
            task.abort();
        }
        let deadline = deadline.max(Instant::now() + leaving / 2);
        let deleted = within(deadline, "deleting the node's queue", async {
            let deleting = node.topology.broker().delete_queue_if_empty(&node.id);
            if !deleting.await? {
                tracing::info!(node = %node.id, "the node's queue still holds messages: left for a peer to take over and answer");
            }
            Ok(())
        })
        .await;
        match left.and(stopped).and(told).and(deleted) {
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
