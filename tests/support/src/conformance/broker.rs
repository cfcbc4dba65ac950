//! The contract of [`Broker`]: node queues, bindings, confirmed and mandatory publishing,
//! consuming with prefetch and settlement.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use hybrid_cluster_core::{
    Broker, BrokerError, BrokerMessage, ConsumeOptions, Deliveries, Delivery, GroupName, NodeId,
    PublishError, QueueOptions, RoutingKey,
};

use super::within;

/// The nodes whose queues the cases use: what a cleanup removes.
pub const NODES: [&str; 3] = ["a", "b", "c"];

/// How long a case watches for a delivery that must not come.
const QUIET: Duration = Duration::from_millis(300);

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn key(name: &str) -> RoutingKey {
    RoutingKey::Node(node(name))
}

fn group(name: &str) -> RoutingKey {
    RoutingKey::Group(GroupName::new(name).unwrap())
}

fn message(id: &str) -> BrokerMessage {
    let mut headers = BTreeMap::new();
    headers.insert("x-case".to_owned(), format!("header of {id}"));
    BrokerMessage {
        message_id: id.to_owned(),
        headers,
        body: Bytes::from(format!("body of {id}")),
    }
}

fn options() -> QueueOptions {
    QueueOptions::default()
}

/// Declares `name`'s queue with `options`, bound to its own key.
async fn queue_with(broker: &Arc<dyn Broker>, name: &str, options: &QueueOptions) {
    broker.declare_queue(&node(name), options).await.unwrap();
    broker.bind(&node(name), &key(name)).await.unwrap();
}

async fn queue(broker: &Arc<dyn Broker>, name: &str) {
    queue_with(broker, name, &options()).await;
}

async fn consume(broker: &Arc<dyn Broker>, name: &str, prefetch: u16) -> Deliveries {
    broker
        .consume(&node(name), &ConsumeOptions { prefetch })
        .await
        .unwrap()
}

async fn publish(broker: &Arc<dyn Broker>, to: &RoutingKey, id: &str) {
    broker.publish(to, message(id)).await.unwrap();
}

async fn next(deliveries: &mut Deliveries) -> Delivery {
    match within("a delivery", deliveries.next()).await {
        Some(Ok(delivery)) => delivery,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

/// The ids of the next `n` deliveries, each acknowledged.
async fn take(deliveries: &mut Deliveries, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let delivery = next(deliveries).await;
        ids.push(delivery.message.message_id.clone());
        delivery.acker.ack().await.unwrap();
    }
    ids
}

/// Fails if a delivery comes within [`QUIET`].
async fn nothing_more(deliveries: &mut Deliveries, what: &str) {
    if let Ok(Some(item)) = tokio::time::timeout(QUIET, deliveries.next()).await {
        let id = item.map(|d| d.message.message_id);
        panic!("{what}: got {id:?}");
    }
}

async fn delete_all(broker: &Arc<dyn Broker>) {
    for name in NODES {
        broker.delete_queue(&node(name)).await.unwrap();
    }
}

/// A message published to a node's key reaches its queue once, with its id, headers and body
/// as they were sent, not marked redelivered.
pub async fn a_message_reaches_the_queue_bound_to_its_key_as_it_was_sent(broker: Arc<dyn Broker>) {
    queue(&broker, "a").await;
    queue(&broker, "b").await;
    let mut a = consume(&broker, "a", 16).await;
    let mut b = consume(&broker, "b", 16).await;
    publish(&broker, &key("a"), "m1").await;
    let delivery = next(&mut a).await;
    assert_eq!(delivery.message, message("m1"));
    assert!(!delivery.redelivered);
    delivery.acker.ack().await.unwrap();
    nothing_more(&mut a, "one publish, one delivery").await;
    nothing_more(&mut b, "a queue not bound to the key").await;
    drop((a, b));
    delete_all(&broker).await;
}

/// A key no queue is bound to is refused as unroutable: nothing is dropped silently.
pub async fn a_key_no_queue_is_bound_to_is_unroutable(broker: Arc<dyn Broker>) {
    queue(&broker, "a").await;
    for to in [key("nobody"), group("empty")] {
        match broker.publish(&to, message("lost")).await {
            Err(PublishError::Unroutable { key }) => assert_eq!(key, to),
            other => panic!("publish to {to}: expected unroutable, got {other:?}"),
        }
    }
    delete_all(&broker).await;
}

/// A broadcast reaches every queue bound to the broadcast key, once each.
pub async fn a_broadcast_reaches_every_bound_queue_once(broker: Arc<dyn Broker>) {
    let mut consumers = Vec::new();
    for name in ["a", "b", "c"] {
        queue(&broker, name).await;
        broker
            .bind(&node(name), &RoutingKey::Broadcast)
            .await
            .unwrap();
        consumers.push(consume(&broker, name, 16).await);
    }
    publish(&broker, &RoutingKey::Broadcast, "all").await;
    for deliveries in &mut consumers {
        assert_eq!(take(deliveries, 1).await, ["all"]);
        nothing_more(deliveries, "a broadcast reaches a queue once").await;
    }
    drop(consumers);
    delete_all(&broker).await;
}

/// A group message reaches the queues bound to its key, and no other; once a queue is
/// unbound it gets no more, and with none bound the key is unroutable.
pub async fn a_group_reaches_the_queues_bound_to_it_until_unbound(broker: Arc<dyn Broker>) {
    for name in ["a", "b", "c"] {
        queue(&broker, name).await;
    }
    broker.bind(&node("a"), &group("room")).await.unwrap();
    broker.bind(&node("b"), &group("room")).await.unwrap();
    let mut a = consume(&broker, "a", 16).await;
    let mut b = consume(&broker, "b", 16).await;
    let mut c = consume(&broker, "c", 16).await;
    publish(&broker, &group("room"), "g1").await;
    assert_eq!(take(&mut a, 1).await, ["g1"]);
    assert_eq!(take(&mut b, 1).await, ["g1"]);
    nothing_more(&mut c, "a queue not bound to the group").await;

    broker.unbind(&node("a"), &group("room")).await.unwrap();
    publish(&broker, &group("room"), "g2").await;
    assert_eq!(take(&mut b, 1).await, ["g2"]);
    nothing_more(&mut a, "a queue unbound from the group").await;

    broker.unbind(&node("b"), &group("room")).await.unwrap();
    broker.unbind(&node("b"), &group("room")).await.unwrap();
    assert!(matches!(
        broker.publish(&group("room"), message("g3")).await,
        Err(PublishError::Unroutable { .. })
    ));
    drop((a, b, c));
    delete_all(&broker).await;
}

/// Messages reach a queue in the order they were published, even when the publishes are
/// started together and their confirmations awaited afterwards.
pub async fn messages_keep_the_order_they_were_published_in(broker: Arc<dyn Broker>) {
    queue(&broker, "a").await;
    let ids: Vec<String> = (0..200).map(|i| format!("m{i:03}")).collect();
    let publishes: Vec<_> = ids
        .iter()
        .map(|id| broker.publish(&key("a"), message(id)))
        .collect();
    for confirmed in futures_util::future::join_all(publishes).await {
        confirmed.unwrap();
    }
    let mut a = consume(&broker, "a", 64).await;
    assert_eq!(take(&mut a, ids.len()).await, ids);
    drop(a);
    delete_all(&broker).await;
}

/// The message is taken at the call: dropping the publish future does not withdraw it.
pub async fn a_dropped_publish_is_still_delivered(broker: Arc<dyn Broker>) {
    queue(&broker, "a").await;
    drop(broker.publish(&key("a"), message("dropped")));
    publish(&broker, &key("a"), "awaited").await;
    let mut a = consume(&broker, "a", 16).await;
    assert_eq!(take(&mut a, 2).await, ["dropped", "awaited"]);
    drop(a);
    delete_all(&broker).await;
}

/// A requeued message is delivered again, marked redelivered.
pub async fn a_requeued_message_comes_again_marked_redelivered(broker: Arc<dyn Broker>) {
    queue(&broker, "a").await;
    let mut a = consume(&broker, "a", 16).await;
    publish(&broker, &key("a"), "again").await;
    let first = next(&mut a).await;
    assert!(!first.redelivered);
    first.acker.requeue().await.unwrap();
    let second = next(&mut a).await;
    assert_eq!(second.message.message_id, "again");
    assert!(
        second.redelivered,
        "a requeued message is marked redelivered"
    );
    second.acker.ack().await.unwrap();
    nothing_more(&mut a, "an acknowledged message").await;
    drop(a);
    delete_all(&broker).await;
}

/// A dead-lettered message leaves its queue for good.
pub async fn a_dead_lettered_message_never_comes_again(broker: Arc<dyn Broker>) {
    queue(&broker, "a").await;
    let mut a = consume(&broker, "a", 16).await;
    publish(&broker, &key("a"), "refused").await;
    publish(&broker, &key("a"), "fine").await;
    let refused = next(&mut a).await;
    assert_eq!(refused.message.message_id, "refused");
    refused.acker.dead_letter().await.unwrap();
    assert_eq!(take(&mut a, 1).await, ["fine"]);
    nothing_more(&mut a, "a dead-lettered message").await;
    drop(a);
    delete_all(&broker).await;
}

/// What a consumer took and never settled goes, when the consumer closes, to the queue's
/// next consumer, in order, marked redelivered.
pub async fn what_a_closed_consumer_left_unsettled_goes_to_the_next_marked_redelivered(
    broker: Arc<dyn Broker>,
) {
    queue(&broker, "a").await;
    for id in ["u1", "u2", "u3"] {
        publish(&broker, &key("a"), id).await;
    }
    let mut first = consume(&broker, "a", 16).await;
    let acked = next(&mut first).await;
    acked.acker.ack().await.unwrap();
    let unsettled = [next(&mut first).await, next(&mut first).await];
    drop(unsettled);
    drop(first);
    let mut second = within("a consumer after the first closed", async {
        loop {
            match broker
                .consume(&node("a"), &ConsumeOptions { prefetch: 16 })
                .await
            {
                Ok(deliveries) => return deliveries,
                // The broker may not have seen the first consumer go yet.
                Err(BrokerError::QueueInUse { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(error) => panic!("consuming again: {error}"),
            }
        }
    })
    .await;
    let mut again = Vec::new();
    for _ in 0..2 {
        let delivery = next(&mut second).await;
        again.push((delivery.message.message_id.clone(), delivery.redelivered));
        delivery.acker.ack().await.unwrap();
    }
    assert_eq!(again, [("u2".to_owned(), true), ("u3".to_owned(), true)]);
    nothing_more(&mut second, "an acknowledged message").await;
    drop(second);
    delete_all(&broker).await;
}

/// A queue has one consumer at a time: a second is refused while the first lives.
pub async fn a_queue_has_one_consumer_at_a_time(broker: Arc<dyn Broker>) {
    queue(&broker, "a").await;
    let first = consume(&broker, "a", 16).await;
    match broker
        .consume(&node("a"), &ConsumeOptions { prefetch: 16 })
        .await
    {
        Err(BrokerError::QueueInUse { node: busy }) => assert_eq!(busy, node("a")),
        Ok(_) => panic!("a second consumer was let in"),
        Err(error) => panic!("expected the queue in use, got {error}"),
    }
    drop(first);
    delete_all(&broker).await;
}

/// A consumer gets at most `prefetch` deliveries it has not settled.
pub async fn prefetch_bounds_the_deliveries_not_settled(broker: Arc<dyn Broker>) {
    queue(&broker, "a").await;
    for i in 0..5 {
        publish(&broker, &key("a"), &format!("p{i}")).await;
    }
    let mut a = consume(&broker, "a", 2).await;
    let first = next(&mut a).await;
    let second = next(&mut a).await;
    nothing_more(&mut a, "a third delivery past prefetch 2").await;
    first.acker.ack().await.unwrap();
    let third = next(&mut a).await;
    assert_eq!(third.message.message_id, "p2");
    nothing_more(&mut a, "a fourth delivery past prefetch 2").await;
    second.acker.ack().await.unwrap();
    third.acker.ack().await.unwrap();
    assert_eq!(take(&mut a, 2).await, ["p3", "p4"]);
    drop(a);
    delete_all(&broker).await;
}

/// A queue at its length bound refuses a publish rather than dropping anything.
pub async fn a_full_queue_refuses_a_publish(broker: Arc<dyn Broker>) {
    let bounded = QueueOptions {
        max_length: Some(2),
        ..options()
    };
    queue_with(&broker, "a", &bounded).await;
    publish(&broker, &key("a"), "f1").await;
    publish(&broker, &key("a"), "f2").await;
    match broker.publish(&key("a"), message("f3")).await {
        Err(PublishError::Rejected { key: refused }) => assert_eq!(refused, key("a")),
        other => panic!("expected a rejection, got {other:?}"),
    }
    let mut a = consume(&broker, "a", 16).await;
    assert_eq!(take(&mut a, 2).await, ["f1", "f2"], "nothing was dropped");
    drop(a);
    delete_all(&broker).await;
}

/// Deleting a queue drops its messages and bindings; deleting a missing queue succeeds.
pub async fn a_deleted_queue_takes_its_messages_and_bindings_with_it(broker: Arc<dyn Broker>) {
    queue(&broker, "a").await;
    broker.bind(&node("a"), &group("room")).await.unwrap();
    publish(&broker, &key("a"), "old").await;
    broker.delete_queue(&node("a")).await.unwrap();
    for to in [key("a"), group("room")] {
        assert!(
            matches!(
                broker.publish(&to, message("late")).await,
                Err(PublishError::Unroutable { .. })
            ),
            "{to} after the queue's deletion"
        );
    }
    broker.delete_queue(&node("a")).await.unwrap();
    queue(&broker, "a").await;
    publish(&broker, &key("a"), "new").await;
    let mut a = consume(&broker, "a", 16).await;
    assert_eq!(
        take(&mut a, 1).await,
        ["new"],
        "the old message went with the queue"
    );
    nothing_more(&mut a, "a message of the deleted queue").await;
    drop(a);
    delete_all(&broker).await;
}

/// A queue still holding a message is not deleted if empty only; an empty one is.
pub async fn a_queue_is_deleted_if_empty_only(broker: Arc<dyn Broker>) {
    queue(&broker, "a").await;
    publish(&broker, &key("a"), "kept").await;
    assert!(!broker.delete_queue_if_empty(&node("a")).await.unwrap());
    let mut a = consume(&broker, "a", 16).await;
    assert_eq!(take(&mut a, 1).await, ["kept"]);
    drop(a);
    within("the queue emptied and deleted", async {
        while !broker.delete_queue_if_empty(&node("a")).await.unwrap() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(matches!(
        broker.publish(&key("a"), message("late")).await,
        Err(PublishError::Unroutable { .. })
    ));
    delete_all(&broker).await;
}

/// Declaring a queue and binding it again changes nothing: its messages and bindings stay,
/// and a message still arrives once.
pub async fn declaring_and_binding_again_changes_nothing(broker: Arc<dyn Broker>) {
    queue(&broker, "a").await;
    publish(&broker, &key("a"), "before").await;
    queue(&broker, "a").await;
    broker.bind(&node("a"), &key("a")).await.unwrap();
    publish(&broker, &key("a"), "after").await;
    let mut a = consume(&broker, "a", 16).await;
    assert_eq!(take(&mut a, 2).await, ["before", "after"]);
    nothing_more(&mut a, "a message bound twice").await;
    drop(a);
    delete_all(&broker).await;
}

/// A queue declared again with other options is refused, and keeps its own.
pub async fn a_queue_declared_again_with_other_options_is_refused(broker: Arc<dyn Broker>) {
    queue(&broker, "a").await;
    let other = QueueOptions {
        max_length: Some(5),
        ..options()
    };
    assert!(
        broker.declare_queue(&node("a"), &other).await.is_err(),
        "a queue declared again with other options"
    );
    queue(&broker, "a").await;
    publish(&broker, &key("a"), "still").await;
    let mut a = consume(&broker, "a", 16).await;
    assert_eq!(take(&mut a, 1).await, ["still"]);
    drop(a);
    delete_all(&broker).await;
}

/// A queue with no consumer for its expiry period is deleted by the broker, with its
/// bindings: its key is then unroutable.
pub async fn an_unused_queue_expires(broker: Arc<dyn Broker>) {
    let expiring = QueueOptions {
        expires: Some(Duration::from_secs(1)),
        ..options()
    };
    queue_with(&broker, "a", &expiring).await;
    publish(&broker, &key("a"), "waits").await;
    within("the queue's expiry", async {
        loop {
            match broker.publish(&key("a"), message("probe")).await {
                Err(PublishError::Unroutable { .. }) => return,
                Ok(()) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(error) => panic!("publishing to an expiring queue: {error}"),
            }
        }
    })
    .await;
    delete_all(&broker).await;
}
