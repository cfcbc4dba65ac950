//! [`Broker`] for [`RabbitBroker`]: topology operations, publishing and consuming.

use std::future::{Future, ready};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use futures_core::future::BoxFuture;
use hybrid_cluster_core::{
    Broker, BrokerError, BrokerMessage, ConsumeOptions, ConsumerState, Deliveries, Durability,
    NodeId, PublishError, QueueOptions, RoutingKey,
};
use lapin::Channel;
use lapin::options::QueueDeleteOptions;
use lapin::types::{FieldTable, ShortString};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::attempt::Attempt;
use super::shared::{self, ConsumerEntry, Flow, Link, Pending, Shared};
use super::{RabbitBroker, RabbitError, consumer, link, wire};

impl RabbitBroker {
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
            // Never closed: a place always comes, in the order asked.
            let _slot = shared.topology_slots.acquire().await;
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
        let (quorum, bound) = {
            let mut state = self.shared.state.lock();
            state.consumers.remove(node);
            let quorum = state
                .queues
                .get(node)
                .is_some_and(|options| options.durability == Durability::Replicated);
            let bound: Vec<ShortString> = state
                .bindings
                .iter()
                .filter(|(bound_node, _)| bound_node == node)
                .filter_map(|(_, key)| wire::short(key.to_string()).ok())
                .collect();
            (quorum, bound)
        };
        let emptied = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let outcome = Arc::clone(&emptied);
        let deleting = self.topology(
            node,
            move |shared, channel| {
                let queue = queue.clone();
                let emptied = Arc::clone(&emptied);
                let bound = bound.clone();
                async move {
                    if quorum {
                        let exchange = shared.names.exchange.clone();
                        return delete_quorum_queue_if_empty(
                            &channel, queue, exchange, bound, &emptied,
                        )
                        .await;
                    }
                    delete_classic_queue_if_empty(&channel, queue, &emptied).await
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
            start_consumer(shared, node, queue, prefetch).await
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

/// Starts a consumer of `node`'s queue on the current connection (on the next one when it
/// changes meanwhile), registers it so that it is resumed on every new connection, and
/// returns its stream.
async fn start_consumer(
    shared: Arc<Shared>,
    node: NodeId,
    queue: ShortString,
    prefetch: u16,
) -> Result<Deliveries, BrokerError> {
    let (sender, receiver) = mpsc::channel(usize::from(prefetch));
    let id = shared.next_consumer.fetch_add(1, Ordering::Relaxed);
    let mut attempt = Attempt::new(&shared);
    loop {
        let link = attempt.link().await?;
        let (channel, lapin_consumer) = match consumer::start(&link, &queue, prefetch).await {
            Ok(started) => started,
            Err(error) => {
                attempt.failed(error, &link, &node, true)?;
                continue;
            }
        };
        let entry = ConsumerEntry {
            id,
            prefetch,
            deliveries: sender.clone(),
            state: tokio::sync::watch::Sender::new(ConsumerState::Consuming),
        };
        match register_consumer(&shared, &link, &node, entry) {
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
}

/// Records `entry` as `node`'s consumer on `link`: `Some(false)` when the node has one
/// already, `None` when the connection changed meanwhile.
fn register_consumer(
    shared: &Shared,
    link: &Link,
    node: &NodeId,
    entry: ConsumerEntry,
) -> Option<bool> {
    shared.commit(link.generation, |state| {
        if state.consumers.contains_key(node) {
            return false;
        }
        state.consumers.insert(node.clone(), entry);
        true
    })
}

/// Deletes a classic queue only if it holds no message (RabbitMQ's `if-empty`); `emptied`
/// is cleared when it held some.
async fn delete_classic_queue_if_empty(
    channel: &Channel,
    queue: ShortString,
    emptied: &std::sync::atomic::AtomicBool,
) -> lapin::Result<()> {
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

/// Deletes a quorum queue only if it holds no message (used for a queue this broker declared
/// `replicated`, as a node's own is). RabbitMQ before 3.13 refuses `if-empty`
/// on quorum queues (and closes the connection for it), so the queue is unbound from every
/// key it was bound to, then its depth read, then it is deleted if that was 0: nothing can
/// enter between the count and the deletion. A queue left with messages stays, unbound, for
/// a peer to take over.
async fn delete_quorum_queue_if_empty(
    channel: &Channel,
    queue: ShortString,
    exchange: ShortString,
    bound: Vec<ShortString>,
    emptied: &std::sync::atomic::AtomicBool,
) -> lapin::Result<()> {
    // Unbound first, so that no message can enter between the count and the deletion: a
    // publish from then on is unroutable, and its sender told so, never lost unheard.
    for key in bound {
        let unbinding =
            channel.queue_unbind(queue.clone(), exchange.clone(), key, FieldTable::default());
        match unbinding.await {
            Err(error) if wire::is_queue_not_found(&error) => return Ok(()),
            other => other?,
        }
    }
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..lapin::options::QueueDeclareOptions::default()
    };
    let declared = match channel
        .queue_declare(queue.clone(), passive, FieldTable::default())
        .await
    {
        Err(error) if wire::is_queue_not_found(&error) => return Ok(()),
        other => other?,
    };
    if declared.message_count() > 0 {
        emptied.store(false, Ordering::Relaxed);
        return Ok(());
    }
    match channel
        .queue_delete(queue, QueueDeleteOptions::default())
        .await
    {
        Err(error) if wire::is_queue_not_found(&error) => Ok(()),
        other => other.map(drop),
    }
}
