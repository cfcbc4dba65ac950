//! [`RabbitBroker`]: the [`Broker`] over RabbitMQ (`lapin`).
//!
//! # Topology
//!
//! Every name starts with the cluster prefix (`websocket:cluster` by default), so several
//! clusters share one RabbitMQ and a user can find theirs in the management UI:
//!
//! | what | name | kind |
//! |---|---|---|
//! | the cluster's exchange | `{prefix}` | direct, durable |
//! | a node's queue | `{prefix}:node:{node id}` | `x-expires` from [`QueueOptions::expires`], `x-max-length` + `x-overflow: reject-publish` from `max_length`, `x-dead-letter-exchange` when `dead_letter` |
//! | dead letters | `{prefix}:dead-letter` | a fanout exchange and a durable queue bound to it |
//!
//! Routing keys are [`RoutingKey`]'s text form: `node.{id}`, `broadcast`, `group.{name}`.
//!
//! # Publishing
//!
//! A publish is queued when [`publish`](Broker::publish) is called (so messages are ordered at
//! the call, as the trait requires) and a publisher task puts queued messages on one channel
//! with publisher confirms, keeping up to [`RabbitConfig::max_in_flight`] unconfirmed. Every
//! message is published `mandatory`: a message no queue takes comes back and fails with
//! [`PublishError::Unroutable`]; a nack (a full queue refusing it) fails with
//! [`PublishError::Rejected`]. Payloads travel as the AMQP body, bytes as they are; the
//! message id and headers travel as AMQP properties.
//!
//! **Batches.** When several messages for the same routing key wait together (the
//! destination is busy), the publisher sends a run of them (up to 64 messages, 128 KiB of
//! bodies) as one AMQP message, which RabbitMQ routes, confirms and refuses as one: a broker's
//! cost is per AMQP message, so a busy destination gets many more messages per second. A
//! message that waits alone goes alone, so latency never waits for a batch to fill. Only runs
//! for one key are grouped, so every queue receives its messages in call order. A batch
//! carries the header `hc-batch` (how many) and, in its body, each message's id, headers and
//! body, length-prefixed; the consumer hands its messages on one by one, and acknowledges the
//! batch once every one of them was settled (see [`RabbitBroker::batched_messages`]).
//! RabbitMQ counts a batch as one message: a queue's `max_length` and a consumer's prefetch
//! bound AMQP messages, so up to 64 times as many envelopes; and a batch one of whose
//! messages is dead-lettered goes to the dead-letter queue whole (the others were handed over
//! already).
//!
//! [`poll_flow`](Broker::poll_flow) is pending while the connection is being restored,
//! while RabbitMQ blocks publishing (a resource alarm), and while
//! [`RabbitConfig::max_pending`] publishes wait for confirmation; it fails once the outage
//! has lasted longer than [`RabbitConfig::outage_timeout`].
//!
//! # Connection loss
//!
//! The broker keeps one connection and watches it. When it is lost (closed by the server,
//! an I/O error, a missed heartbeat, a channel failing), it connects again, at once and then
//! with exponential backoff ([`RabbitConfig::reconnect_delay`] up to
//! [`RabbitConfig::max_reconnect_delay`]), declares the exchanges, every queue and every
//! binding made through it again, and resumes its consumers. Meanwhile:
//!
//! - **publishes** wait: those sent and not confirmed when the connection dropped are sent
//!   again first, in their order, then the ones queued meanwhile. A publish that cannot be
//!   sent within [`RabbitConfig::outage_timeout`] of the outage's start fails with
//!   [`BrokerError::Unavailable`] (whose source is [`RabbitError::Outage`]); after that, calls
//!   fail at once until the connection is back. Nothing is dropped silently: a message sent
//!   twice (it reached its queue, but its confirmation was lost) is dropped by the receiver by
//!   its id;
//! - **declarations and bindings** wait within the same bound;
//! - a **[`Deliveries`] stream survives**: it yields nothing while the connection is down,
//!   then goes on with the new consumer. Messages delivered and not acknowledged on the old
//!   connection come again, marked redelivered; settling them through their old [`Acker`]
//!   fails with [`BrokerError::StaleDelivery`]. The stream ends when the node's queue is
//!   deleted or the broker is closed.
//!
//! Between nodes, delivery is therefore **at least once**, and at most once per
//! [`Receiver`](crate::Receiver)'s dedupe window.
//!
//! [`Acker`]: hybrid_cluster_core::Acker

mod consumer;
mod error;
mod link;
mod publisher;
mod shared;
mod wire;

use std::fmt;
use std::future::{Future, ready};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::future::BoxFuture;
use hybrid_cluster_core::{
    AmqpUrl, Broker, BrokerError, BrokerMessage, ClusterPrefix, ConsumeOptions, ConsumerState,
    Deliveries, NodeId, PublishError, QueueOptions, RoutingKey,
};
use lapin::Channel;
use lapin::options::QueueDeleteOptions;
use lapin::types::FieldTable;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub use self::error::RabbitError;
use self::shared::{ConsumerEntry, Flow, Link, Pending, Shared};

/// How a [`RabbitBroker`] connects and behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RabbitConfig {
    /// The connection's name, shown by RabbitMQ (`rabbitmqctl list_connections
    /// user_provided_name`, the management UI).
    pub connection_name: Option<String>,
    /// Publishes sent and not yet confirmed, at most. At least 1.
    pub max_in_flight: usize,
    /// Publishes queued or in flight, at most: past it [`Broker::poll_flow`] is pending and
    /// a publish fails at once with [`BrokerError::Unavailable`].
    pub max_pending: usize,
    /// How long publishes and declarations wait through an outage (connection lost, or
    /// publishing blocked) before failing with [`BrokerError::Unavailable`].
    pub outage_timeout: Duration,
    /// How long making a connection may take.
    pub connect_timeout: Duration,
    /// The delay before the second reconnection attempt (the first is made at once); it
    /// doubles at each failure.
    pub reconnect_delay: Duration,
    /// The longest delay between reconnection attempts.
    pub max_reconnect_delay: Duration,
    /// The largest message body published; larger ones fail with [`BrokerError::Backend`]
    /// before being sent (RabbitMQ would close the channel on them).
    pub max_body_len: usize,
    /// How many times a message is sent, each time its connection dropping before the
    /// confirmation, before it fails with [`BrokerError::Unavailable`].
    pub publish_attempts: u32,
    /// Dead letters kept at most in `{prefix}:dead-letter`, oldest dropped first.
    pub dead_letter_max_length: Option<u32>,
    /// The dead-letter queue is deleted after going unused this long (`None`: kept).
    pub dead_letter_expires: Option<Duration>,
    /// Whether messages are published persistent (AMQP delivery mode 2), so that RabbitMQ
    /// confirms them once they are on disk and they survive a restart in a durable or
    /// quorum queue. A cluster sets it from its [`Durability`](hybrid_cluster_core::Durability).
    pub persistent: bool,
}

impl Default for RabbitConfig {
    /// 256 in flight, 4,096 pending, a 10 s outage bound, 10 s to connect, reconnection
    /// delays from 100 ms to 5 s, bodies up to 16 MiB, 3 attempts per message, 10,000 dead
    /// letters kept, persistent messages.
    fn default() -> Self {
        Self {
            connection_name: None,
            max_in_flight: 256,
            max_pending: 4096,
            outage_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            reconnect_delay: Duration::from_millis(100),
            max_reconnect_delay: Duration::from_secs(5),
            max_body_len: 16 * 1024 * 1024,
            publish_attempts: 3,
            dead_letter_max_length: Some(10_000),
            dead_letter_expires: None,
            persistent: true,
        }
    }
}

/// Shuts the broker's tasks down when the last handle is dropped.
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.set_closed();
    }
}

/// The [`Broker`] over RabbitMQ. See the [module docs](self).
///
/// Cheap to clone; clones share the connection. When the last clone is dropped (or
/// [`close`](RabbitBroker::close) is called) the connection is closed, waiting publishes
/// fail with [`BrokerError::Closed`] and consumers' streams end. It needs a tokio runtime.
#[derive(Clone)]
pub struct RabbitBroker {
    shared: Arc<Shared>,
    _handle: Arc<Handle>,
}

impl RabbitBroker {
    /// Connects to `url`, declares the cluster's exchanges (named from `prefix`), and starts
    /// the tasks that publish and keep the connection.
    ///
    /// A server that cannot be reached, or that refuses the credentials or the virtual host,
    /// is an error naming the URL (with its password hidden): [`BrokerError::Unavailable`]
    /// with a [`RabbitError::Connect`] or [`RabbitError::ConnectTimeout`] source.
    pub async fn connect(
        url: &AmqpUrl,
        prefix: &ClusterPrefix,
        config: RabbitConfig,
    ) -> Result<Self, BrokerError> {
        let names = wire::Names::new(prefix).map_err(|e| BrokerError::Backend {
            source: Box::new(e),
        })?;
        let shared = Arc::new(Shared::new(
            names,
            config,
            url.to_connection_string(),
            url.to_string(),
        ));
        // A new broker has no consumers yet: none to heal.
        let (link, events, _) =
            link::establish(&shared)
                .await
                .map_err(|e| BrokerError::Unavailable {
                    source: Box::new(e),
                })?;
        shared.set_up(link.clone());
        tokio::spawn(link::supervise(Arc::clone(&shared), link, events));
        tokio::spawn(publisher::run(Arc::clone(&shared)));
        Ok(Self {
            _handle: Arc::new(Handle(Arc::clone(&shared))),
            shared,
        })
    }

    /// The cluster's exchange.
    pub fn exchange_name(&self) -> &str {
        self.shared.names.exchange.as_str()
    }

    /// The dead-letter exchange and queue.
    pub fn dead_letter_name(&self) -> &str {
        self.shared.names.dead_letter.as_str()
    }

    /// The name of `node`'s queue.
    pub fn queue_name(&self, node: &NodeId) -> String {
        self.shared
            .names
            .queue(node)
            .map(String::from)
            .unwrap_or_default()
    }

    /// Whether the broker is connected now.
    pub fn is_connected(&self) -> bool {
        self.shared.state.lock().connected
    }

    /// Messages sent inside batches so far: when several messages for one queue wait
    /// together, they travel as one AMQP message, which costs RabbitMQ one message's work.
    pub fn batched_messages(&self) -> u64 {
        self.shared
            .batched
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many times the connection was made again after a loss.
    pub fn reconnections(&self) -> u64 {
        self.shared.state.lock().generation.saturating_sub(1)
    }

    /// Closes the broker: waiting publishes fail with [`BrokerError::Closed`], consumers'
    /// streams end, and the connection is closed. Every clone is closed.
    pub async fn close(&self) {
        let link = self.shared.link.borrow().clone();
        self.shared.set_closed();
        if let Some(link) = link {
            link::close(&link).await;
        }
    }

    /// Runs a topology operation on a channel of its own, waiting through an outage within
    /// the bound; `commit` records it (it is done again on each new connection), or it is
    /// done again when the connection changed meanwhile.
    fn topology<F, Fut>(
        &self,
        node: &NodeId,
        op: F,
        commit: impl Fn(&mut shared::State) + Send + 'static,
    ) -> BoxFuture<'static, Result<(), BrokerError>>
    where
        F: Fn(Arc<Shared>, Channel) -> Fut + Send + 'static,
        Fut: Future<Output = lapin::Result<()>> + Send,
    {
        let shared = Arc::clone(&self.shared);
        let node = node.clone();
        Box::pin(async move {
            let mut attempt = Attempt::new(&shared);
            loop {
                let link = attempt.link().await?;
                let result = match link.connection.create_channel().await {
                    Ok(channel) => op(Arc::clone(&shared), channel).await,
                    Err(error) => Err(error),
                };
                match result {
                    Ok(()) => {
                        if shared.commit(link.generation, &commit).is_some() {
                            return Ok(());
                        }
                        attempt.min_generation = link.generation + 1;
                    }
                    Err(error) => attempt.failed(error, &link, &node, false)?,
                }
            }
        })
    }
}

/// One operation's tries across connections.
struct Attempt<'a> {
    shared: &'a Shared,
    deadline: Instant,
    min_generation: u64,
}

impl<'a> Attempt<'a> {
    fn new(shared: &'a Shared) -> Self {
        Self {
            shared,
            deadline: Instant::now() + shared.config.outage_timeout,
            min_generation: 0,
        }
    }

    async fn link(&self) -> Result<Link, BrokerError> {
        self.shared
            .wait_link(self.min_generation, self.deadline)
            .await
    }

    /// Whether to try again on the next connection (the error was the connection's), or the
    /// error to return.
    fn failed(
        &mut self,
        error: lapin::Error,
        link: &Link,
        node: &NodeId,
        consuming: bool,
    ) -> Result<(), BrokerError> {
        if wire::is_connection_error(&error) && !link.connection.status().connected() {
            self.shared.report_broken(link.generation);
            self.min_generation = link.generation + 1;
            return Ok(());
        }
        Err(wire::broker_error(error, node, consuming))
    }
}

fn done<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(ready(value))
}

fn invalid(error: RabbitError) -> BrokerError {
    BrokerError::Backend {
        source: Box::new(error),
    }
}

impl Broker for RabbitBroker {
    fn declare_queue(
        &self,
        node: &NodeId,
        options: &QueueOptions,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        if let Err(e) = self.shared.names.queue(node) {
            return done(Err(invalid(e)));
        }
        let (op_node, op_options) = (node.clone(), options.clone());
        let (record_node, record_options) = (node.clone(), options.clone());
        self.topology(
            node,
            move |shared, channel| {
                let (node, options) = (op_node.clone(), op_options.clone());
                async move { link::declare_queue(&shared, &channel, &node, &options).await }
            },
            move |state| {
                state
                    .queues
                    .insert(record_node.clone(), record_options.clone());
            },
        )
    }

    fn delete_queue(&self, node: &NodeId) -> BoxFuture<'static, Result<(), BrokerError>> {
        let queue = match self.shared.names.queue(node) {
            Ok(queue) => queue,
            Err(e) => return done(Err(invalid(e))),
        };
        let record_node = node.clone();
        // Its consumer first: once RabbitMQ cancels it, its stream ends, rather than the
        // queue being declared again as after a deletion from outside.
        self.shared.state.lock().consumers.remove(node);
        self.topology(
            node,
            move |_, channel| {
                let queue = queue.clone();
                async move {
                    match channel
                        .queue_delete(queue, QueueDeleteOptions::default())
                        .await
                    {
                        Err(error) if wire::is_queue_not_found(&error) => Ok(()),
                        other => other.map(drop),
                    }
                }
            },
            move |state| {
                state.queues.remove(&record_node);
                state.bindings.retain(|(node, _)| *node != record_node);
                state.consumers.remove(&record_node);
            },
        )
    }

    fn delete_queue_if_empty(
        &self,
        node: &NodeId,
    ) -> BoxFuture<'static, Result<bool, BrokerError>> {
        let queue = match self.shared.names.queue(node) {
            Ok(queue) => queue,
            Err(e) => return done(Err(invalid(e))),
        };
        let record_node = node.clone();
        self.shared.state.lock().consumers.remove(node);
        let emptied = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let outcome = Arc::clone(&emptied);
        let deleting = self.topology(
            node,
            move |_, channel| {
                let queue = queue.clone();
                let emptied = Arc::clone(&emptied);
                async move {
                    let options = QueueDeleteOptions {
                        if_empty: true,
                        ..QueueDeleteOptions::default()
                    };
                    match channel.queue_delete(queue, options).await {
                        Err(error) if wire::is_queue_not_found(&error) => Ok(()),
                        Err(error) if wire::is_precondition_failed(&error) => {
                            emptied.store(false, Ordering::Relaxed);
                            Ok(())
                        }
                        other => other.map(drop),
                    }
                }
            },
            move |state| {
                state.queues.remove(&record_node);
                state.bindings.retain(|(node, _)| *node != record_node);
                state.consumers.remove(&record_node);
            },
        );
        Box::pin(async move {
            deleting.await?;
            Ok(outcome.load(Ordering::Relaxed))
        })
    }

    fn bind(&self, node: &NodeId, key: &RoutingKey) -> BoxFuture<'static, Result<(), BrokerError>> {
        if let Err(e) = self
            .shared
            .names
            .queue(node)
            .and_then(|_| wire::short(key.to_string()))
        {
            return done(Err(invalid(e)));
        }
        let (op_node, op_key) = (node.clone(), key.clone());
        let record = (node.clone(), key.clone());
        self.topology(
            node,
            move |shared, channel| {
                let (node, key) = (op_node.clone(), op_key.clone());
                async move { link::bind(&shared, &channel, &node, &key).await }
            },
            move |state| {
                state.bindings.insert(record.clone());
            },
        )
    }

    fn unbind(
        &self,
        node: &NodeId,
        key: &RoutingKey,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        let (queue, routing_key) = match self
            .shared
            .names
            .queue(node)
            .and_then(|queue| Ok((queue, wire::short(key.to_string())?)))
        {
            Ok(names) => names,
            Err(e) => return done(Err(invalid(e))),
        };
        let record = (node.clone(), key.clone());
        self.topology(
            node,
            move |shared, channel| {
                let (queue, routing_key) = (queue.clone(), routing_key.clone());
                async move {
                    let unbinding = channel.queue_unbind(
                        queue,
                        shared.names.exchange.clone(),
                        routing_key,
                        FieldTable::default(),
                    );
                    match unbinding.await {
                        Err(error) if wire::is_queue_not_found(&error) => Ok(()),
                        other => other,
                    }
                }
            },
            move |state| {
                state.bindings.remove(&record);
            },
        )
    }

    fn publish(
        &self,
        key: &RoutingKey,
        message: BrokerMessage,
    ) -> BoxFuture<'static, Result<(), PublishError>> {
        let max = self.shared.config.max_body_len;
        if message.body.len() > max {
            return done(Err(invalid(RabbitError::InvalidMessage {
                reason: format!("the body is {} bytes, more than {max}", message.body.len()),
            })
            .into()));
        }
        let prepared = wire::encode(&message)
            .and_then(|properties| Ok((properties, wire::short(key.to_string())?)));
        let (properties, routing_key) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => return done(Err(invalid(e).into())),
        };
        let (reply, confirmed) = oneshot::channel();
        let pending = Pending {
            key: key.clone(),
            routing_key,
            properties,
            message,
            enqueued_at: Instant::now(),
            attempts: 0,
            reply,
        };
        if let Err(e) = self.shared.enqueue(pending) {
            return done(Err(e));
        }
        Box::pin(async move {
            match confirmed.await {
                Ok(result) => result,
                Err(_) => Err(BrokerError::Closed.into()),
            }
        })
    }

    fn consume(
        &self,
        node: &NodeId,
        options: &ConsumeOptions,
    ) -> BoxFuture<'static, Result<Deliveries, BrokerError>> {
        let queue = match self.shared.names.queue(node) {
            Ok(queue) => queue,
            Err(e) => return done(Err(invalid(e))),
        };
        let shared = Arc::clone(&self.shared);
        let node = node.clone();
        let prefetch = options.prefetch.max(1);
        Box::pin(async move {
            if shared.state.lock().consumers.contains_key(&node) {
                return Err(BrokerError::QueueInUse { node });
            }
            let (sender, receiver) = mpsc::channel(usize::from(prefetch));
            let id = shared.next_consumer.fetch_add(1, Ordering::Relaxed);
            let mut attempt = Attempt::new(&shared);
            loop {
                let link = attempt.link().await?;
                let (channel, lapin_consumer) = match consumer::start(&link, &queue, prefetch).await
                {
                    Ok(started) => started,
                    Err(error) => {
                        attempt.failed(error, &link, &node, true)?;
                        continue;
                    }
                };
                let registered = shared.commit(link.generation, |state| {
                    if state.consumers.contains_key(&node) {
                        return false;
                    }
                    let entry = ConsumerEntry {
                        id,
                        prefetch,
                        deliveries: sender.clone(),
                        state: tokio::sync::watch::Sender::new(ConsumerState::Consuming),
                    };
                    state.consumers.insert(node.clone(), entry);
                    true
                });
                match registered {
                    Some(true) => {
                        tokio::spawn(consumer::forward(
                            Arc::clone(&shared),
                            link.clone(),
                            node,
                            id,
                            channel,
                            lapin_consumer,
                            sender,
                        ));
                        let stream = consumer::DeliveryStream {
                            deliveries: receiver,
                        };
                        return Ok(Box::pin(stream) as Deliveries);
                    }
                    Some(false) => {
                        let _ = channel.close(200, "queue in use".into()).await;
                        return Err(BrokerError::QueueInUse { node });
                    }
                    // The connection changed meanwhile: start it on the new one.
                    None => attempt.min_generation = link.generation + 1,
                }
            }
        })
    }

    fn consumer_state(&self, node: &NodeId) -> Option<tokio::sync::watch::Receiver<ConsumerState>> {
        let state = self.shared.state.lock();
        state
            .consumers
            .get(node)
            .map(|entry| entry.state.subscribe())
    }

    fn poll_flow(&self, cx: &mut Context<'_>) -> Poll<Result<(), BrokerError>> {
        match self.shared.flow(cx.waker()) {
            Flow::Ready => Poll::Ready(Ok(())),
            Flow::Wait => Poll::Pending,
            Flow::Down => Poll::Ready(Err(self.shared.outage_error())),
            Flow::Closed => Poll::Ready(Err(BrokerError::Closed)),
        }
    }
}

impl fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state.lock();
        f.debug_struct("RabbitBroker")
            .field("url", &self.shared.url)
            .field("exchange", &self.shared.names.exchange.as_str())
            .field("connected", &state.connected)
            .field("blocked", &state.blocked)
            .field("generation", &state.generation)
            .field("pending", &state.pending.len())
            .field("in_flight", &state.in_flight)
            .field("queues", &state.queues.len())
            .field("consumers", &state.consumers.len())
            .finish()
    }
}
