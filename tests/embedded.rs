//! The embedded backends working together as several nodes of one cluster would use them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::StreamExt;
use hybrid_cluster::routing::EnvelopeCodec;
use hybrid_cluster::{
    Broker, BrokerMessage, ConnectionIds, Envelope, GroupName, Incarnation, MemoryBroker,
    MemoryRegistry, NodeId, NodeInfo, PublishError, QueueOptions, Registry, RoutingKey, Target,
};
use hybrid_cluster::{ConsumeOptions, Deliveries};
use hybrid_cluster::{RegistryEvent, RemovalCause};

struct Node {
    info: NodeInfo,
    ids: ConnectionIds,
    deliveries: Deliveries,
}

async fn join(
    registry: &MemoryRegistry,
    broker: &MemoryBroker,
    name: &str,
    lease: Duration,
) -> Node {
    let id = NodeId::new(name).unwrap();
    let incarnation = Incarnation::random();
    let info = NodeInfo::new(id.clone(), incarnation, "127.0.0.1", 5000);
    broker
        .declare_queue(&id, &QueueOptions::default())
        .await
        .unwrap();
    broker
        .bind(&id, &RoutingKey::Node(id.clone()))
        .await
        .unwrap();
    broker.bind(&id, &RoutingKey::Broadcast).await.unwrap();
    let deliveries = broker
        .consume(&id, &ConsumeOptions::default())
        .await
        .unwrap();
    registry
        .put_node(&id, info.to_json().unwrap().into(), lease)
        .await
        .unwrap();
    Node {
        ids: ConnectionIds::new(id, incarnation),
        info,
        deliveries,
    }
}

/// Takes the next envelope from a node's queue and acknowledges it.
async fn receive(node: &mut Node) -> Envelope {
    let delivery = tokio::time::timeout(Duration::from_secs(5), node.deliveries.next())
        .await
        .expect("an envelope in time")
        .expect("a live consumer")
        .expect("no consumer error");
    let envelope = Envelope::from_message(delivery.message).expect("a well-formed envelope");
    delivery.acker.ack().await.unwrap();
    envelope
}

fn is_empty(node: &mut Node) -> bool {
    use futures_util::FutureExt;
    node.deliveries.next().now_or_never().is_none()
}

async fn send(broker: &MemoryBroker, envelope: &Envelope) -> Result<(), PublishError> {
    broker
        .publish(&envelope.routing_key(), envelope.to_message().unwrap())
        .await
}

#[tokio::test(start_paused = true)]
async fn three_nodes_exchange_unicast_broadcast_and_group_messages() {
    let registry = MemoryRegistry::new();
    let broker = MemoryBroker::new();
    let lease = Duration::from_secs(15);
    let mut a = join(&registry, &broker, "a", lease).await;
    let mut b = join(&registry, &broker, "b", lease).await;
    let mut c = join(&registry, &broker, "c", lease).await;

    let peers: Vec<NodeInfo> = registry
        .nodes()
        .await
        .unwrap()
        .iter()
        .map(|record| NodeInfo::from_json(&record.value).unwrap())
        .collect();
    assert_eq!(peers, vec![a.info.clone(), b.info.clone(), c.info.clone()]);

    // Unicast: the connection id alone routes it to b.
    let from = a.ids.next_id();
    let to = b.ids.next_id();
    let payload = vec![0u8, 1, 2, 255];
    let envelope = Envelope::binary(
        a.info.node_id.clone(),
        Target::Connection(to.clone()),
        payload.clone(),
    )
    .with_sender(from.clone());
    send(&broker, &envelope).await.unwrap();
    let got = receive(&mut b).await;
    assert_eq!(got, envelope);
    assert_eq!(&got.payload[..], &payload[..]);
    assert!(is_empty(&mut a) && is_empty(&mut c));

    // Broadcast: every node exactly once, the sender's included.
    let envelope = Envelope::text(c.info.node_id.clone(), Target::Broadcast, "all");
    send(&broker, &envelope).await.unwrap();
    for node in [&mut a, &mut b, &mut c] {
        assert_eq!(receive(node).await.id, envelope.id);
        assert!(is_empty(node));
    }

    // Group: only the nodes bound to it.
    let group = GroupName::new("lobby").unwrap();
    broker
        .bind(&c.info.node_id, &RoutingKey::Group(group.clone()))
        .await
        .unwrap();
    let envelope = Envelope::text(a.info.node_id.clone(), Target::Group(group), "members only");
    send(&broker, &envelope).await.unwrap();
    assert_eq!(receive(&mut c).await.id, envelope.id);
    assert!(is_empty(&mut a) && is_empty(&mut b));
}

#[tokio::test(start_paused = true)]
async fn a_crashed_node_is_dropped_within_its_lease_and_then_unreachable() {
    let registry = MemoryRegistry::new();
    let broker = MemoryBroker::new();
    let mut events = registry.watch().await.unwrap();
    let lease = Duration::from_secs(3);
    let a = join(&registry, &broker, "a", lease).await;
    let b = join(&registry, &broker, "b", lease).await;
    for _ in 0..2 {
        assert!(matches!(
            events.next().await,
            Some(Ok(RegistryEvent::Updated(_)))
        ));
    }

    // b crashes: its consumer and heartbeat stop. a keeps its lease.
    let b_id = b.info.node_id.clone();
    let b_connection = b.ids.next_id();
    drop(b);
    let crashed = tokio::time::Instant::now();
    let renew = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            registry
                .put_node(&a.info.node_id, a.info.to_json().unwrap().into(), lease)
                .await
                .unwrap();
        }
    };
    let removed = async {
        loop {
            if let Some(Ok(RegistryEvent::Removed { node, cause })) = events.next().await {
                return (node, cause);
            }
        }
    };
    let (node, cause) = tokio::select! {
        removed = removed => removed,
        () = renew => unreachable!(),
    };
    assert_eq!((node, cause), (b_id.clone(), RemovalCause::Expired));
    assert!(crashed.elapsed() <= lease);

    // Its queue outlives it until the broker expires it; a sender's message meanwhile waits
    // there for a consumer that will never come, so the cluster layer must check discovery
    // first. Once the queue expires, the broker refuses outright.
    tokio::time::advance(QueueOptions::default().expires.unwrap()).await;
    let envelope = Envelope::text(
        a.info.node_id.clone(),
        Target::Connection(b_connection),
        "late",
    );
    assert!(matches!(
        send(&broker, &envelope).await,
        Err(PublishError::Unroutable { key }) if key == RoutingKey::Node(b_id)
    ));
}

#[tokio::test]
async fn a_malformed_message_is_dead_lettered_and_good_ones_keep_flowing() {
    let registry = MemoryRegistry::new();
    let broker = MemoryBroker::new();
    let mut a = join(&registry, &broker, "a", Duration::from_secs(15)).await;
    let key = RoutingKey::Node(a.info.node_id.clone());

    let garbage = BrokerMessage {
        message_id: "not-an-id".into(),
        body: "secret".into(),
        ..BrokerMessage::default()
    };
    broker.publish(&key, garbage).await.unwrap();
    let good = Envelope::text(
        a.info.node_id.clone(),
        Target::Node(a.info.node_id.clone()),
        "ok",
    );
    send(&broker, &good).await.unwrap();

    let delivery = a.deliveries.next().await.unwrap().unwrap();
    let err = Envelope::from_message(delivery.message.clone()).unwrap_err();
    assert!(!err.to_string().contains("secret"));
    delivery.acker.dead_letter().await.unwrap();
    assert_eq!(receive(&mut a).await.id, good.id);

    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.message_id, "not-an-id");
}

#[tokio::test]
async fn a_malformed_node_record_is_stored_but_does_not_parse() {
    let registry = MemoryRegistry::new();
    let good = NodeInfo::new(NodeId::new("good").unwrap(), Incarnation::random(), "h", 1);
    registry
        .put_node(
            &good.node_id,
            good.to_json().unwrap().into(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    registry
        .put_node(
            &NodeId::new("bad").unwrap(),
            "{not json".into(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let (parsed, malformed): (Vec<_>, Vec<_>) = registry
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|record| (record.key.clone(), NodeInfo::from_json(&record.value)))
        .partition(|(_, parsed)| parsed.is_ok());
    assert_eq!(parsed.len(), 1);
    assert_eq!(malformed.len(), 1);
    assert!(
        malformed[0].0.contains("bad"),
        "the key names the node: {}",
        malformed[0].0
    );
}
