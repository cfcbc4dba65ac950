//! Consumers: a node's deliveries, kept flowing across reconnects.
//!
//! Each consumer has its own channel (its prefetch is the channel's `basic.qos`) and an
//! exclusive `basic.consume` on the node's queue. A forwarding task moves lapin's deliveries
//! into a channel bounded by the prefetch, read by the owner's [`Deliveries`] stream. On a
//! new connection the supervisor starts the consumer again and a new forwarding task feeds
//! the same stream, so the stream survives reconnects.
//!
//! A consumer lost while the connection stays up (RabbitMQ cancelled it because its queue
//! was deleted or the broker node holding it failed, or its channel closed on an error) is
//! **healed**: the queue is declared again with every binding made through this broker for
//! it, and the consumer started again, with backoff, until it works or the connection is
//! replaced (the supervisor then does it). Meanwhile its state says why it is not consuming.
//! Only a queue deleted through this broker ([`Broker::delete_queue`]) ends the stream.
//!
//! [`Broker::delete_queue`]: hybrid_cluster_core::Broker::delete_queue

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use futures_core::future::BoxFuture;
use futures_util::StreamExt;
use hybrid_cluster_core::{
    Acker, Acknowledge, BrokerError, ConsumerState, Delivery, NodeId, QueueOptions, RoutingKey,
    Settlement,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Consumer};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tower::retry::backoff::Backoff;
use tracing::{debug, error, info, warn};

use super::shared::{Link, Shared};
use super::wire;

/// The owner's end of a consumer.
pub(crate) struct DeliveryStream {
    pub(crate) deliveries: mpsc::Receiver<Result<Delivery, BrokerError>>,
}

impl Stream for DeliveryStream {
    type Item = Result<Delivery, BrokerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.deliveries.poll_recv(cx)
    }
}

/// Opens a channel with the prefetch bound and starts an exclusive consumer on `queue`.
pub(crate) async fn start(
    link: &Link,
    queue: &ShortString,
    prefetch: u16,
) -> lapin::Result<(Channel, Consumer)> {
    let channel = link.connection.create_channel().await?;
    channel
        .basic_qos(prefetch.max(1), BasicQosOptions::default())
        .await?;
    let options = BasicConsumeOptions {
        exclusive: true,
        ..BasicConsumeOptions::default()
    };
    let consumer = channel
        .basic_consume(queue.clone(), "".into(), options, FieldTable::default())
        .await?;
    Ok((channel, consumer))
}

/// Moves one connection's deliveries to the owner's stream until the owner drops it, the
/// consumer is cancelled by RabbitMQ (its queue was deleted), or the connection is lost.
pub(crate) async fn forward(
    shared: Arc<Shared>,
    link: Link,
    node: NodeId,
    id: u64,
    channel: Channel,
    mut consumer: Consumer,
    deliveries: mpsc::Sender<Result<Delivery, BrokerError>>,
) {
    loop {
        let next = tokio::select! {
            () = deliveries.closed() => None,
            next = consumer.next() => Some(next),
        };
        let next = match next {
            // The owner dropped the stream: stop consuming; the channel's unacknowledged
            // messages go back to the queue when it closes.
            None => break,
            Some(next) => next,
        };
        match next {
            Some(Ok(delivery)) => {
                tracing::trace!(name: "hybrid_cluster.stage.consumed", "lapin delivered");
                if !hand_on(&node, delivery, &deliveries).await {
                    break;
                }
            }
            Some(Err(error)) => {
                lost(&shared, link, node, id, deliveries, error.to_string());
                return;
            }
            None => {
                let reason = "RabbitMQ cancelled it (its queue was deleted, or the broker node \
                              holding the queue is down)";
                lost(&shared, link, node, id, deliveries, reason.to_owned());
                return;
            }
        }
    }
    remove(&shared, &node, id);
    let _ = channel.close(200, "consumer dropped".into()).await;
}

/// The owner's end of a consumer's deliveries.
type Owner = mpsc::Sender<Result<Delivery, BrokerError>>;

/// Hands one AMQP delivery on to the owner (each message of a batch on its own). Returns
/// whether the owner still takes deliveries.
async fn hand_on(node: &NodeId, mut delivery: lapin::message::Delivery, owner: &Owner) -> bool {
    let redelivered = delivery.redelivered;
    let Some(messages) = split_batch(node, &mut delivery) else {
        let message = wire::decode(&delivery.properties, delivery.data);
        let delivery = Delivery {
            message,
            redelivered,
            acker: Acker::new(RabbitAcker(delivery.acker)),
        };
        return owner.send(Ok(delivery)).await.is_ok();
    };
    // The batch is acknowledged once every one of its messages was settled.
    let acker = Arc::new(Mutex::new(BatchState {
        acker: Some(delivery.acker),
        remaining: messages.len(),
        settlement: Settlement::Ack,
    }));
    for message in messages {
        let delivery = Delivery {
            message,
            redelivered,
            acker: Acker::new(BatchPart(Arc::clone(&acker))),
        };
        if owner.send(Ok(delivery)).await.is_err() {
            return false;
        }
    }
    true
}

/// The messages of `delivery` when it is a batch that can be read; `None` when it is one
/// message (or a batch that cannot be read, left as it came).
fn split_batch(
    node: &NodeId,
    delivery: &mut lapin::message::Delivery,
) -> Option<Vec<hybrid_cluster_core::BrokerMessage>> {
    let count = wire::batch_count(&delivery.properties)?;
    // The messages' bodies are slices of the batch's, not copies.
    let data = Bytes::from(std::mem::take(&mut delivery.data));
    match wire::decode_batch(&data, count) {
        Ok(messages) => Some(messages),
        Err(reason) => {
            // Handed on as it is: the receiver dead-letters it as malformed.
            warn!(%node, reason, "a batch that cannot be read");
            delivery.data = Vec::from(data);
            None
        }
    }
}

/// A consumer stopped: on a live connection it is healed here; on a lost one the supervisor
/// starts it again with the next connection. Its stream ends only when it is not the node's
/// consumer any more (its queue was deleted through this broker).
fn lost(
    shared: &Arc<Shared>,
    link: Link,
    node: NodeId,
    id: u64,
    deliveries: mpsc::Sender<Result<Delivery, BrokerError>>,
    reason: String,
) {
    // The connection itself went (or was replaced): its supervisor starts the consumer again
    // on the next one. Whether it is published yet does not matter.
    if !is_current(shared, &link) {
        debug!(%node, %reason, "consumer interrupted; it resumes on the next connection");
        return;
    }
    if !shared.state.lock().queues.contains_key(&node) {
        // A queue this broker did not declare (another node's, taken over): nothing to
        // restore; the stream ends.
        debug!(%node, %reason, "a consumer of a queue declared elsewhere ended");
        remove(shared, &node, id);
        return;
    }
    let interrupted = ConsumerState::Interrupted {
        reason: reason.clone(),
    };
    if !shared.set_consumer_state(&node, id, interrupted) {
        // Deleted through this broker: the stream ends with this task.
        debug!(%node, "consumer cancelled: its queue was deleted");
        return;
    }
    error!(%node, %reason, "the node's consumer is lost: declaring its queue and bindings again and consuming again");
    tokio::spawn(heal(Arc::clone(shared), link, node, id, deliveries));
}

/// Declares `node`'s queue and its bindings again and starts its consumer again, with
/// backoff, until it works, the connection is replaced (the supervisor restores it then), or
/// the consumer is not wanted any more.
pub(crate) async fn heal(
    shared: Arc<Shared>,
    link: Link,
    node: NodeId,
    id: u64,
    deliveries: mpsc::Sender<Result<Delivery, BrokerError>>,
) {
    let mut backoff = shared.config.reconnect_backoff();
    let mut wait = backoff.next_backoff();
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            () = super::shared::shut_down(&mut shutdown) => return,
            () = wait => {}
        }
        if deliveries.is_closed() {
            remove(&shared, &node, id);
            return;
        }
        let Some(plan) = plan(&shared, &link, &node, id) else {
            return;
        };
        match restore(&shared, &node, &plan).await {
            Ok((channel, consumer)) => {
                if !shared.set_consumer_state(&node, id, ConsumerState::Consuming) {
                    // Deleted through this broker while it was declared again: undo.
                    let _ = channel.close(200, "consumer not wanted".into()).await;
                    undo_stale(&shared, &link, &node, &plan).await;
                    return;
                }
                undo_stale(&shared, &link, &node, &plan).await;
                info!(%node, bindings = plan.keys.len(), "the node's consumer is restored");
                tokio::spawn(forward(
                    Arc::clone(&shared),
                    link,
                    node,
                    id,
                    channel,
                    consumer,
                    deliveries,
                ));
                return;
            }
            Err(error) => {
                wait = backoff.next_backoff();
                let retry_in = super::config::until(&wait);
                warn!(%node, %error, ?retry_in, "restoring the node's consumer failed");
            }
        }
    }
}

/// What restoring a consumer takes: its connection, its queue with its options and bindings,
/// its prefetch.
struct Plan {
    link: Link,
    queue: ShortString,
    options: QueueOptions,
    keys: Vec<RoutingKey>,
    prefetch: u16,
}

/// What restoring consumer `id` of `node` on `link` takes; `None` when it is not to be done
/// here (not the node's consumer any more, a newer connection whose supervisor restores it,
/// or a queue this broker never declared, whose stream then ends).
fn plan(shared: &Shared, link: &Link, node: &NodeId, id: u64) -> Option<Plan> {
    if !is_current(shared, link) {
        return None;
    }
    let state = shared.state.lock();
    let entry = state.consumers.get(node).filter(|entry| entry.id == id)?;
    let keys = state
        .bindings
        .iter()
        .filter(|(bound, _)| bound == node)
        .map(|(_, key)| key.clone())
        .collect();
    let prefetch = entry.prefetch;
    let (Some(options), Ok(queue)) = (state.queues.get(node).cloned(), shared.names.queue(node))
    else {
        drop(state);
        remove(shared, node, id);
        return None;
    };
    Some(Plan {
        link: link.clone(),
        queue,
        options,
        keys,
        prefetch,
    })
}

/// After a restore: what changed through the broker meanwhile is undone on RabbitMQ too. A
/// queue deleted is deleted again (the restore declared it), a key unbound is unbound again.
async fn undo_stale(shared: &Shared, link: &Link, node: &NodeId, plan: &Plan) {
    let (deleted, unbound): (bool, Vec<RoutingKey>) = {
        let state = shared.state.lock();
        let deleted = !state.queues.contains_key(node);
        let unbound = plan
            .keys
            .iter()
            .filter(|key| !state.bindings.contains(&(node.clone(), (*key).clone())))
            .cloned()
            .collect();
        (deleted, unbound)
    };
    if !deleted && unbound.is_empty() {
        return;
    }
    let Ok(channel) = link.connection.create_channel().await else {
        return;
    };
    if deleted {
        let _ = channel
            .queue_delete(
                plan.queue.clone(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    } else {
        for key in unbound {
            let Ok(routing_key) = super::wire::short(key.to_string()) else {
                continue;
            };
            let _ = channel
                .queue_unbind(
                    plan.queue.clone(),
                    shared.names.exchange.clone(),
                    routing_key,
                    FieldTable::default(),
                )
                .await;
        }
    }
    let _ = channel.close(200, "undone".into()).await;
}

/// Declares the queue and its bindings on a channel of its own, then starts the consumer.
async fn restore(
    shared: &Shared,
    node: &NodeId,
    plan: &Plan,
) -> lapin::Result<(Channel, Consumer)> {
    let channel = plan.link.connection.create_channel().await?;
    let declared = async {
        super::link::declare_queue(shared, &channel, node, &plan.options).await?;
        for key in &plan.keys {
            super::link::bind(shared, &channel, node, key).await?;
        }
        Ok::<_, lapin::Error>(())
    }
    .await;
    let _ = channel.close(200, "declared".into()).await;
    declared?;
    start(&plan.link, &plan.queue, plan.prefetch).await
}

/// Whether `link` is the broker's connection now (published or about to be) and up.
fn is_current(shared: &Shared, link: &Link) -> bool {
    let state = shared.state.lock();
    state.generation == link.generation && !state.closed && link.is_connected()
}

fn remove(shared: &Shared, node: &NodeId, id: u64) {
    let mut state = shared.state.lock();
    if state
        .consumers
        .get(node)
        .is_some_and(|entry| entry.id == id)
    {
        state.consumers.remove(node);
    }
}

/// Settles a delivery through lapin. An acknowledgement for a channel that is gone fails
/// with [`BrokerError::StaleDelivery`]: RabbitMQ delivers the message again.
struct RabbitAcker(lapin::Acker);

impl Acknowledge for RabbitAcker {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(settle(self.0, settlement))
    }
}

/// The messages of one batch share its AMQP delivery: it is settled once every message is.
/// Acknowledged when all were; dead-lettered whole when any was (the dead-letter queue then
/// holds the batch, its good messages included, which were handed over already); put back
/// whole when any was (the messages handed over come again and are dropped as duplicates).
/// A message dropped unsettled leaves the batch unacknowledged until its consumer closes,
/// as a lone delivery would be.
struct BatchState {
    acker: Option<lapin::Acker>,
    remaining: usize,
    settlement: Settlement,
}

struct BatchPart(Arc<Mutex<BatchState>>);

fn severity(settlement: Settlement) -> u8 {
    match settlement {
        Settlement::Ack => 0,
        Settlement::DeadLetter => 1,
        Settlement::Requeue => 2,
    }
}

impl Acknowledge for BatchPart {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        let last = {
            let mut state = self.0.lock();
            state.remaining = state.remaining.saturating_sub(1);
            if severity(settlement) > severity(state.settlement) {
                state.settlement = settlement;
            }
            if state.remaining == 0 {
                state.acker.take().map(|acker| (acker, state.settlement))
            } else {
                None
            }
        };
        match last {
            Some((acker, settlement)) => Box::pin(settle(acker, settlement)),
            None => Box::pin(std::future::ready(Ok(()))),
        }
    }
}

async fn settle(acker: lapin::Acker, settlement: Settlement) -> Result<(), BrokerError> {
    let done = match settlement {
        Settlement::Ack => acker.ack(BasicAckOptions::default()).await,
        // With the queue's dead-letter exchange set, RabbitMQ moves it there.
        Settlement::DeadLetter => acker.reject(BasicRejectOptions { requeue: false }).await,
        Settlement::Requeue => {
            acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
        }
    };
    match done {
        Ok(true) => Ok(()),
        Ok(false) | Err(_) => Err(BrokerError::StaleDelivery),
    }
}
