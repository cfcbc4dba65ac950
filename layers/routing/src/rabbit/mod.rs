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
//! A publish is queued when [`publish`](hybrid_cluster_core::Broker::publish) is called (so messages are ordered at
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
//! [`poll_flow`](hybrid_cluster_core::Broker::poll_flow) is pending while the connection is being restored,
//! while RabbitMQ blocks publishing (a resource alarm), and while
//! [`RabbitConfig::max_pending`] publishes wait for confirmation; it fails once the outage
//! has lasted longer than [`RabbitConfig::outage_timeout`].
//!
//! # Connection loss
//!
//! The broker keeps one connection and watches it. When it is lost (closed by the server,
//! an I/O error, a missed heartbeat, a channel failing), it connects again, at once and then
//! with exponential backoff and jitter ([`RabbitConfig::reconnect_delay`] up to
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
//! [`Broker`]: hybrid_cluster_core::Broker
//! [`Deliveries`]: hybrid_cluster_core::Deliveries
//! [`PublishError`]: hybrid_cluster_core::PublishError
//! [`PublishError::Unroutable`]: hybrid_cluster_core::PublishError::Unroutable
//! [`PublishError::Rejected`]: hybrid_cluster_core::PublishError::Rejected
//! [`QueueOptions::expires`]: hybrid_cluster_core::QueueOptions::expires
//! [`RoutingKey`]: hybrid_cluster_core::RoutingKey

mod attempt;
mod broker;
mod config;
mod consumer;
mod error;
mod link;
mod publisher;
mod shared;
mod wire;

use std::fmt;
use std::sync::Arc;

use hybrid_cluster_core::{AmqpUrl, BrokerError, ClusterPrefix, NodeId};

pub use self::config::RabbitConfig;
pub use self::error::RabbitError;
use self::shared::{Address, Shared};

/// Shuts the broker's tasks down when the last handle is dropped.
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.set_closed();
    }
}

/// The [`Broker`](hybrid_cluster_core::Broker) over RabbitMQ. See the [module docs](self).
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
    /// the tasks that publish and keep the connection. With
    /// [`fallback_urls`](RabbitConfig::fallback_urls), it is
    /// [`connect_any`](Self::connect_any) with `url` first.
    ///
    /// A server that cannot be reached, or that refuses the credentials or the virtual host,
    /// is an error naming the URL (with its password hidden): [`BrokerError::Unavailable`]
    /// with a [`RabbitError::Connect`] or [`RabbitError::ConnectTimeout`] source.
    pub async fn connect(
        url: &AmqpUrl,
        prefix: &ClusterPrefix,
        config: RabbitConfig,
    ) -> Result<Self, BrokerError> {
        Self::connect_any(std::slice::from_ref(url), prefix, config).await
    }

    /// Connects to the first of `urls` that can be reached (the nodes of one RabbitMQ
    /// cluster), as [`connect`](Self::connect) does to one.
    ///
    /// When the connection is lost, the broker reconnects through the list, starting with
    /// the address after the lost one and ending with it, then waits (the
    /// [`reconnect_delay`](RabbitConfig::reconnect_delay) backoff) before the next round; as
    /// after any reconnection, it declares its topology again and resumes its consumers.
    /// Node queues should then be quorum queues
    /// ([`Durability::Replicated`](hybrid_cluster_core::Durability::Replicated)), so that
    /// they and their messages outlive the loss of one broker node.
    ///
    /// The [`fallback_urls`](RabbitConfig::fallback_urls) of `config` come after `urls`.
    /// When no address can be reached, the error is the last one's. No address at all is
    /// [`BrokerError::Backend`] with [`RabbitError::NoAddress`].
    pub async fn connect_any(
        urls: &[AmqpUrl],
        prefix: &ClusterPrefix,
        config: RabbitConfig,
    ) -> Result<Self, BrokerError> {
        if urls.is_empty() && config.fallback_urls.is_empty() {
            return Err(BrokerError::Backend {
                source: Box::new(RabbitError::NoAddress),
            });
        }
        let names = wire::Names::new(prefix).map_err(|e| BrokerError::Backend {
            source: Box::new(e),
        })?;
        let addresses = urls
            .iter()
            .chain(&config.fallback_urls)
            .map(|url| Address {
                uri: url.to_connection_string(),
                url: url.to_string(),
            })
            .collect();
        let shared = Arc::new(Shared::new(names, config, addresses));
        // A new broker has no consumers yet: none to heal.
        let (link, events, _) =
            link::establish(&shared, 0)
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

    /// The URL (password hidden) of the address the broker is connected to now, or was
    /// last, during an outage.
    pub fn connected_url(&self) -> &str {
        self.shared.url()
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
}

impl fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state.lock();
        f.debug_struct("RabbitBroker")
            .field("url", &self.shared.url())
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
