//! The in-memory [`Broker`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::future::ready;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_core::Stream;
use futures_core::future::BoxFuture;
use hybrid_cluster_core::broker::{Acker, Acknowledge, ConsumeOptions, Deliveries, Settlement};
use hybrid_cluster_core::{
    Broker, BrokerError, BrokerMessage, Delivery, NodeId, PublishError, QueueOptions, RoutingKey,
};
use parking_lot::Mutex;
use tokio::time::Instant;

/// Dead letters kept at most; past it the oldest are discarded (and counted).
pub const DEAD_LETTER_CAPACITY: usize = 1024;

/// A [`Broker`] kept in memory and shared by its clones: one exchange, one queue per node.
///
/// Queues expire lazily: a queue unused for its [`QueueOptions::expires`] is deleted the next
/// time the broker is used, before that use is served.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    hub: Arc<Mutex<Hub>>,
}

/// A message that was dead-lettered, kept for inspection.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The node whose queue it was taken from.
    pub node: NodeId,
    /// The message as it was delivered.
    pub message: BrokerMessage,
}

#[derive(Default)]
struct Hub {
    queues: HashMap<NodeId, Queue>,
    bindings: BTreeMap<RoutingKey, BTreeSet<NodeId>>,
    dead_letters: VecDeque<DeadLetter>,
    dead_letters_discarded: u64,
    next_consumer: u64,
}

struct Queue {
    options: QueueOptions,
    ready: VecDeque<Queued>,
    unacked: BTreeMap<u64, Queued>,
    next_tag: u64,
    consumer: Option<ConsumerSlot>,
    unused_since: Instant,
}

struct ConsumerSlot {
    id: u64,
    prefetch: usize,
    waker: Option<Waker>,
}

#[derive(Clone)]
struct Queued {
    message: BrokerMessage,
    redelivered: bool,
}

impl Queue {
    fn len(&self) -> usize {
        self.ready.len() + self.unacked.len()
    }

    fn take_waker(&mut self) -> Option<Waker> {
        self.consumer.as_mut().and_then(|c| c.waker.take())
    }
}

impl Hub {
    fn expire_queues(&mut self) -> Vec<Waker> {
        let now = Instant::now();
        let expired: Vec<NodeId> = self
            .queues
            .iter()
            .filter(|(_, q)| {
                q.consumer.is_none()
                    && q.options
                        .expires
                        .is_some_and(|expires| q.unused_since + expires <= now)
            })
            .map(|(node, _)| node.clone())
            .collect();
        expired
            .iter()
            .filter_map(|node| self.delete_queue(node))
            .collect()
    }

    /// Deletes a queue and its bindings; returns its consumer's waker so the consumer sees it
    /// is cancelled.
    fn delete_queue(&mut self, node: &NodeId) -> Option<Waker> {
        let mut queue = self.queues.remove(node)?;
        self.bindings.retain(|_, nodes| {
            nodes.remove(node);
            !nodes.is_empty()
        });
        queue.take_waker()
    }

    fn dead_letter(&mut self, node: &NodeId, message: BrokerMessage) {
        if self.dead_letters.len() == DEAD_LETTER_CAPACITY {
            self.dead_letters.pop_front();
            self.dead_letters_discarded += 1;
        }
        self.dead_letters.push_back(DeadLetter {
            node: node.clone(),
            message,
        });
    }
}

fn wake_all(wakers: impl IntoIterator<Item = Waker>) {
    for waker in wakers {
        waker.wake();
    }
}

fn done<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(ready(value))
}

impl MemoryBroker {
    /// A new broker with no queues.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on the hub after expiring unused queues, waking consumers after the lock is
    /// released.
    fn with_hub<T>(&self, f: impl FnOnce(&mut Hub, &mut Vec<Waker>) -> T) -> T {
        let mut wakers = Vec::new();
        let result = {
            let mut hub = self.hub.lock();
            wakers.extend(hub.expire_queues());
            f(&mut hub, &mut wakers)
        };
        wake_all(wakers);
        result
    }

    /// The nodes that have a queue, in id order.
    pub fn queues(&self) -> Vec<NodeId> {
        let mut queues: Vec<NodeId> = self.with_hub(|hub, _| hub.queues.keys().cloned().collect());
        queues.sort();
        queues
    }

    /// The keys `node`'s queue is bound to, in order.
    pub fn bindings(&self, node: &NodeId) -> Vec<RoutingKey> {
        self.with_hub(|hub, _| {
            hub.bindings
                .iter()
                .filter(|(_, nodes)| nodes.contains(node))
                .map(|(key, _)| key.clone())
                .collect()
        })
    }

    /// Messages in `node`'s queue, ready and unacknowledged, if it has a queue.
    pub fn queue_len(&self, node: &NodeId) -> Option<usize> {
        self.with_hub(|hub, _| hub.queues.get(node).map(Queue::len))
    }

    /// The dead-lettered messages kept, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.with_hub(|hub, _| hub.dead_letters.iter().cloned().collect())
    }

    /// Dead letters discarded because more than [`DEAD_LETTER_CAPACITY`] were kept.
    pub fn dead_letters_discarded(&self) -> u64 {
        self.with_hub(|hub, _| hub.dead_letters_discarded)
    }
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("queues", &self.queues())
            .finish()
    }
}

impl Broker for MemoryBroker {
    fn declare_queue(
        &self,
        node: &NodeId,
        options: &QueueOptions,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        let result = self.with_hub(|hub, _| match hub.queues.get_mut(node) {
            Some(queue) if queue.options != *options => Err(BrokerError::Backend {
                source: format!(
                    "the queue of node {node} exists with other options: {:?}",
                    queue.options
                )
                .into(),
            }),
            Some(queue) => {
                queue.unused_since = Instant::now();
                Ok(())
            }
            None => {
                hub.queues.insert(
                    node.clone(),
                    Queue {
                        options: options.clone(),
                        ready: VecDeque::new(),
                        unacked: BTreeMap::new(),
                        next_tag: 1,
                        consumer: None,
                        unused_since: Instant::now(),
                    },
                );
                Ok(())
            }
        });
        done(result)
    }

    fn delete_queue(&self, node: &NodeId) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.with_hub(|hub, wakers| wakers.extend(hub.delete_queue(node)));
        done(Ok(()))
    }

    fn delete_queue_if_empty(
        &self,
        node: &NodeId,
    ) -> BoxFuture<'static, Result<bool, BrokerError>> {
        let deleted = self.with_hub(|hub, wakers| {
            if hub.queues.get(node).is_some_and(|queue| queue.len() > 0) {
                return false;
            }
            wakers.extend(hub.delete_queue(node));
            true
        });
        done(Ok(deleted))
    }

    fn bind(&self, node: &NodeId, key: &RoutingKey) -> BoxFuture<'static, Result<(), BrokerError>> {
        let result = self.with_hub(|hub, _| {
            if !hub.queues.contains_key(node) {
                return Err(BrokerError::QueueNotFound { node: node.clone() });
            }
            hub.bindings
                .entry(key.clone())
                .or_default()
                .insert(node.clone());
            Ok(())
        });
        done(result)
    }

    fn unbind(
        &self,
        node: &NodeId,
        key: &RoutingKey,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.with_hub(|hub, _| {
            if let Some(nodes) = hub.bindings.get_mut(key) {
                nodes.remove(node);
                if nodes.is_empty() {
                    hub.bindings.remove(key);
                }
            }
        });
        done(Ok(()))
    }

    fn publish(
        &self,
        key: &RoutingKey,
        message: BrokerMessage,
    ) -> BoxFuture<'static, Result<(), PublishError>> {
        let result = self.with_hub(|hub, wakers| {
            let Some(nodes) = hub.bindings.get(key) else {
                return Err(PublishError::Unroutable { key: key.clone() });
            };
            let mut rejected = false;
            for node in nodes {
                let Some(queue) = hub.queues.get_mut(node) else {
                    continue;
                };
                let full = queue
                    .options
                    .max_length
                    .is_some_and(|max| queue.len() >= max as usize);
                if full {
                    rejected = true;
                    continue;
                }
                queue.ready.push_back(Queued {
                    message: message.clone(),
                    redelivered: false,
                });
                wakers.extend(queue.take_waker());
            }
            if rejected {
                Err(PublishError::Rejected { key: key.clone() })
            } else {
                Ok(())
            }
        });
        done(result)
    }

    fn consume(
        &self,
        node: &NodeId,
        options: &ConsumeOptions,
    ) -> BoxFuture<'static, Result<Deliveries, BrokerError>> {
        let result = self.with_hub(|hub, _| {
            let id = hub.next_consumer;
            let Some(queue) = hub.queues.get_mut(node) else {
                return Err(BrokerError::QueueNotFound { node: node.clone() });
            };
            if queue.consumer.is_some() {
                return Err(BrokerError::QueueInUse { node: node.clone() });
            }
            queue.consumer = Some(ConsumerSlot {
                id,
                prefetch: usize::from(options.prefetch.max(1)),
                waker: None,
            });
            hub.next_consumer += 1;
            Ok(Box::pin(Consumer {
                hub: Arc::clone(&self.hub),
                node: node.clone(),
                id,
            }) as Deliveries)
        });
        done(result)
    }
}

/// The one consumer of a queue. Dropping it puts its unacknowledged messages back at the head
/// of the queue, marked redelivered.
struct Consumer {
    hub: Arc<Mutex<Hub>>,
    node: NodeId,
    id: u64,
}

impl Stream for Consumer {
    type Item = Result<Delivery, BrokerError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut hub = self.hub.lock();
        let Some(queue) = hub.queues.get_mut(&self.node) else {
            return Poll::Ready(None);
        };
        let Some(consumer) = queue.consumer.as_mut().filter(|c| c.id == self.id) else {
            return Poll::Ready(None);
        };
        if queue.unacked.len() >= consumer.prefetch || queue.ready.is_empty() {
            consumer.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let Some(queued) = queue.ready.pop_front() else {
            return Poll::Pending;
        };
        let tag = queue.next_tag;
        queue.next_tag += 1;
        queue.unacked.insert(tag, queued.clone());
        let acker = MemoryAcker {
            hub: Arc::clone(&self.hub),
            node: self.node.clone(),
            consumer: self.id,
            tag,
        };
        Poll::Ready(Some(Ok(Delivery {
            message: queued.message,
            redelivered: queued.redelivered,
            acker: Acker::new(acker),
        })))
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let mut hub = self.hub.lock();
        let Some(queue) = hub.queues.get_mut(&self.node) else {
            return;
        };
        if queue.consumer.as_ref().is_none_or(|c| c.id != self.id) {
            return;
        }
        queue.consumer = None;
        queue.unused_since = Instant::now();
        let unacked = std::mem::take(&mut queue.unacked);
        for (_, mut queued) in unacked.into_iter().rev() {
            queued.redelivered = true;
            queue.ready.push_front(queued);
        }
    }
}

struct MemoryAcker {
    hub: Arc<Mutex<Hub>>,
    node: NodeId,
    consumer: u64,
    tag: u64,
}

impl Acknowledge for MemoryAcker {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        let mut waker = None;
        let result = (|| {
            let mut hub = self.hub.lock();
            let hub = &mut *hub;
            let queue = hub
                .queues
                .get_mut(&self.node)
                .filter(|q| q.consumer.as_ref().is_some_and(|c| c.id == self.consumer))
                .ok_or(BrokerError::StaleDelivery)?;
            let mut queued = queue
                .unacked
                .remove(&self.tag)
                .ok_or(BrokerError::StaleDelivery)?;
            let dead = match settlement {
                Settlement::Ack => None,
                Settlement::Requeue => {
                    queued.redelivered = true;
                    queue.ready.push_front(queued);
                    None
                }
                Settlement::DeadLetter => queue.options.dead_letter.then_some(queued.message),
            };
            // Settling freed a prefetch slot (or requeued a message): the consumer may go on.
            waker = queue.take_waker();
            if let Some(message) = dead {
                hub.dead_letter(&self.node, message);
            }
            Ok(())
        })();
        wake_all(waker);
        done(result)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::{FutureExt, StreamExt};

    use super::*;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn message(n: u32) -> BrokerMessage {
        BrokerMessage {
            message_id: format!("m{n}"),
            headers: BTreeMap::new(),
            body: n.to_be_bytes().to_vec().into(),
        }
    }

    async fn node_queue(broker: &MemoryBroker, id: &str) -> NodeId {
        let id = node(id);
        broker
            .declare_queue(&id, &QueueOptions::default())
            .await
            .unwrap();
        broker
            .bind(&id, &RoutingKey::Node(id.clone()))
            .await
            .unwrap();
        broker.bind(&id, &RoutingKey::Broadcast).await.unwrap();
        id
    }

    async fn next(deliveries: &mut Deliveries) -> Delivery {
        tokio::time::timeout(Duration::from_secs(5), deliveries.next())
            .await
            .expect("a delivery")
            .expect("the consumer is live")
            .expect("no consumer error")
    }

    fn nothing_ready(deliveries: &mut Deliveries) -> bool {
        deliveries.next().now_or_never().is_none()
    }

    #[tokio::test]
    async fn messages_for_an_unknown_node_are_refused() {
        let broker = MemoryBroker::new();
        node_queue(&broker, "a").await;
        let err = broker
            .publish(&RoutingKey::Node(node("ghost")), message(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, PublishError::Unroutable { key } if key == RoutingKey::Node(node("ghost")))
        );
    }

    #[tokio::test]
    async fn unicast_broadcast_and_group_reach() {
        let broker = MemoryBroker::new();
        let a = node_queue(&broker, "a").await;
        let b = node_queue(&broker, "b").await;
        let c = node_queue(&broker, "c").await;
        let room = RoutingKey::Group("room".parse().unwrap());
        broker.bind(&a, &room).await.unwrap();
        broker.bind(&c, &room).await.unwrap();

        broker
            .publish(&RoutingKey::Node(b.clone()), message(1))
            .await
            .unwrap();
        broker
            .publish(&RoutingKey::Broadcast, message(2))
            .await
            .unwrap();
        broker.publish(&room, message(3)).await.unwrap();

        let mut got = BTreeMap::new();
        for id in [&a, &b, &c] {
            let mut deliveries = broker
                .consume(id, &ConsumeOptions::default())
                .await
                .unwrap();
            let mut ids = Vec::new();
            while let Some(Some(Ok(delivery))) = deliveries.next().now_or_never() {
                ids.push(delivery.message.message_id.clone());
                delivery.acker.ack().await.unwrap();
            }
            got.insert(id.to_string(), ids);
        }
        assert_eq!(got["a"], ["m2", "m3"]);
        assert_eq!(got["b"], ["m1", "m2"]);
        assert_eq!(got["c"], ["m2", "m3"]);

        // Once the last member leaves, the group is unroutable: no node gets it.
        broker.unbind(&a, &room).await.unwrap();
        broker.unbind(&c, &room).await.unwrap();
        assert!(matches!(
            broker.publish(&room, message(4)).await,
            Err(PublishError::Unroutable { .. })
        ));
        assert_eq!(
            broker.bindings(&a),
            [RoutingKey::Node(a.clone()), RoutingKey::Broadcast]
        );
    }

    #[tokio::test]
    async fn prefetch_bounds_unacknowledged_deliveries() {
        let broker = MemoryBroker::new();
        let a = node_queue(&broker, "a").await;
        for n in 0..5 {
            broker
                .publish(&RoutingKey::Node(a.clone()), message(n))
                .await
                .unwrap();
        }
        let mut deliveries = broker
            .consume(&a, &ConsumeOptions { prefetch: 2 })
            .await
            .unwrap();
        let first = next(&mut deliveries).await;
        let second = next(&mut deliveries).await;
        assert!(
            nothing_ready(&mut deliveries),
            "a third delivery past prefetch 2"
        );
        first.acker.ack().await.unwrap();
        let third = next(&mut deliveries).await;
        assert_eq!(third.message.message_id, "m2");
        drop((second, third));
    }

    #[tokio::test]
    async fn a_consumer_is_woken_by_a_publish() {
        let broker = MemoryBroker::new();
        let a = node_queue(&broker, "a").await;
        let mut deliveries = broker
            .consume(&a, &ConsumeOptions::default())
            .await
            .unwrap();
        let waiter = tokio::spawn(async move { next(&mut deliveries).await.message.message_id });
        tokio::task::yield_now().await;
        broker
            .publish(&RoutingKey::Node(a), message(9))
            .await
            .unwrap();
        assert_eq!(waiter.await.unwrap(), "m9");
    }

    #[tokio::test]
    async fn unacknowledged_messages_are_redelivered_in_order_to_the_next_consumer() {
        let broker = MemoryBroker::new();
        let a = node_queue(&broker, "a").await;
        for n in 0..4 {
            broker
                .publish(&RoutingKey::Node(a.clone()), message(n))
                .await
                .unwrap();
        }
        let mut deliveries = broker
            .consume(&a, &ConsumeOptions::default())
            .await
            .unwrap();
        let first = next(&mut deliveries).await;
        assert!(!first.redelivered);
        first.acker.ack().await.unwrap();
        let second = next(&mut deliveries).await;
        let third = next(&mut deliveries).await;
        assert!(matches!(
            broker.consume(&a, &ConsumeOptions::default()).await,
            Err(BrokerError::QueueInUse { .. })
        ));
        drop(deliveries);
        // The old consumer's deliveries can no longer be settled.
        assert!(matches!(
            second.acker.ack().await,
            Err(BrokerError::StaleDelivery)
        ));

        let mut again = broker
            .consume(&a, &ConsumeOptions::default())
            .await
            .unwrap();
        let ids: Vec<(String, bool)> = [
            next(&mut again).await,
            next(&mut again).await,
            next(&mut again).await,
        ]
        .into_iter()
        .map(|d| (d.message.message_id, d.redelivered))
        .collect();
        assert_eq!(
            ids,
            [
                ("m1".into(), true),
                ("m2".into(), true),
                ("m3".into(), false)
            ]
        );
        drop(third);
    }

    #[tokio::test]
    async fn rejected_messages_are_dead_lettered_and_requeued_ones_come_back() {
        let broker = MemoryBroker::new();
        let a = node_queue(&broker, "a").await;
        broker
            .publish(&RoutingKey::Node(a.clone()), message(1))
            .await
            .unwrap();
        broker
            .publish(&RoutingKey::Node(a.clone()), message(2))
            .await
            .unwrap();
        let mut deliveries = broker
            .consume(&a, &ConsumeOptions::default())
            .await
            .unwrap();
        let bad = next(&mut deliveries).await;
        bad.acker.dead_letter().await.unwrap();
        let later = next(&mut deliveries).await;
        later.acker.requeue().await.unwrap();
        let again = next(&mut deliveries).await;
        assert_eq!(
            (again.message.message_id.as_str(), again.redelivered),
            ("m2", true)
        );
        again.acker.ack().await.unwrap();

        let dead = broker.dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].node.as_str(), dead[0].message.message_id.as_str()),
            ("a", "m1")
        );
        assert_eq!(broker.queue_len(&a), Some(0));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_publishes_instead_of_dropping() {
        let broker = MemoryBroker::new();
        let a = node("a");
        let options = QueueOptions {
            max_length: Some(2),
            ..QueueOptions::default()
        };
        broker.declare_queue(&a, &options).await.unwrap();
        broker.bind(&a, &RoutingKey::Node(a.clone())).await.unwrap();
        let key = RoutingKey::Node(a.clone());
        broker.publish(&key, message(1)).await.unwrap();
        broker.publish(&key, message(2)).await.unwrap();
        assert!(matches!(
            broker.publish(&key, message(3)).await,
            Err(PublishError::Rejected { .. })
        ));
        assert_eq!(broker.queue_len(&a), Some(2));
        // Declaring again with other options is refused, as RabbitMQ refuses it.
        assert!(
            broker
                .declare_queue(&a, &QueueOptions::default())
                .await
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_queue_expires_and_its_node_becomes_unroutable() {
        let broker = MemoryBroker::new();
        let a = node_queue(&broker, "a").await;
        let deliveries = broker
            .consume(&a, &ConsumeOptions::default())
            .await
            .unwrap();
        // While consumed, the queue never expires.
        tokio::time::advance(Duration::from_secs(600)).await;
        broker
            .publish(&RoutingKey::Node(a.clone()), message(1))
            .await
            .unwrap();
        drop(deliveries);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(broker.queue_len(&a), Some(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(broker.queue_len(&a), None);
        assert!(broker.bindings(&a).is_empty());
        assert!(matches!(
            broker.publish(&RoutingKey::Node(a), message(2)).await,
            Err(PublishError::Unroutable { .. })
        ));
    }

    #[tokio::test]
    async fn deleting_a_queue_ends_its_consumer() {
        let broker = MemoryBroker::new();
        let a = node_queue(&broker, "a").await;
        let mut deliveries = broker
            .consume(&a, &ConsumeOptions::default())
            .await
            .unwrap();
        let waiter = tokio::spawn(async move { deliveries.next().await.is_none() });
        tokio::task::yield_now().await;
        broker.delete_queue(&a).await.unwrap();
        assert!(waiter.await.unwrap(), "the consumer should end");
        assert!(matches!(
            broker.bind(&a, &RoutingKey::Broadcast).await,
            Err(BrokerError::QueueNotFound { .. })
        ));
    }
}
