//! The routing layer while RabbitMQ raises a resource alarm: it blocks every connection that
//! publishes. This test disturbs the shared RabbitMQ, so it runs alone (nextest gives it all
//! of its slots, see `.config/nextest.toml`) and puts the memory watermark back as it was.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use hybrid_cluster_core::{
    AmqpUrl, Broker, BrokerError, ClusterPrefix, ConsumeOptions, Envelope, NodeId, PublishError,
    QueueOptions, RoutingKey, Target,
};
use hybrid_cluster_routing::EnvelopeCodec;
use hybrid_cluster_routing::{RabbitBroker, RabbitConfig, RabbitError};
use hybrid_cluster_test_support::rabbitmq::MemoryAlarm;
use hybrid_cluster_test_support::servers::{amqp_url, remove_cluster, unique_prefix};
use tokio::time::Instant;

fn url() -> AmqpUrl {
    amqp_url().parse().expect("a valid AMQP_URL")
}

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn message(n: usize) -> hybrid_cluster_core::BrokerMessage {
    Envelope::text(node("a"), Target::Node(node("b")), n.to_string())
        .to_message()
        .unwrap()
}

/// During a memory alarm, a node's consumer keeps draining its queue (its connection does not
/// publish, so RabbitMQ does not block it), and every publish fails with `Unavailable` within
/// the outage bound, whether it was waiting or already on the wire; after the alarm,
/// publishing works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_resource_alarm_consumers_drain_and_sends_fail_in_time() {
    let prefix = ClusterPrefix::new(unique_prefix("hc-test:alarm")).unwrap();
    let outage = Duration::from_secs(2);
    let config = RabbitConfig {
        outage_timeout: outage,
        dead_letter_expires: Some(Duration::from_secs(60)),
        ..RabbitConfig::default()
    };
    let broker = Arc::new(
        RabbitBroker::connect(&url(), &prefix, config)
            .await
            .unwrap(),
    );
    let b = node("b");
    broker
        .declare_queue(&b, &QueueOptions::default())
        .await
        .unwrap();
    let key = RoutingKey::Node(b.clone());
    broker.bind(&b, &key).await.unwrap();
    // 200 messages wait in the queue before the alarm.
    let queued = join_all((0..200).map(|n| broker.publish(&key, message(n)))).await;
    assert!(queued.iter().all(Result::is_ok));

    let alarm = MemoryAlarm::raise().await.unwrap();
    // Publishes during the alarm: each fails with Unavailable, within the bound (and a
    // margin for the machine).
    let started = Instant::now();
    let during = join_all((0..50).map(|n| broker.publish(&key, message(1_000 + n)))).await;
    let took = started.elapsed();
    assert!(
        took < outage * 2 + Duration::from_secs(3),
        "publishes failed after {took:?}"
    );
    for result in &during {
        match result {
            Err(PublishError::Broker(BrokerError::Unavailable { source })) => {
                let source = source.downcast_ref::<RabbitError>();
                assert!(
                    matches!(
                        source,
                        Some(RabbitError::Outage { .. } | RabbitError::Unconfirmed { .. })
                    ),
                    "{source:?}"
                );
            }
            // A publish that got on the wire before the block reached RabbitMQ.
            Ok(()) => {}
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    assert!(
        during.iter().filter(|r| r.is_err()).count() > 0,
        "the alarm blocked publishing"
    );

    // The consumer drains the queue meanwhile.
    let mut deliveries = broker
        .consume(&b, &ConsumeOptions { prefetch: 64 })
        .await
        .unwrap();
    let mut drained = 0;
    while drained < 200 {
        let delivery = tokio::time::timeout(Duration::from_secs(20), {
            use futures_util::StreamExt;
            deliveries.next()
        })
        .await
        .expect("deliveries flow during the alarm")
        .unwrap()
        .unwrap();
        delivery.acker.ack().await.unwrap();
        drained += 1;
    }

    drop(alarm);
    // Publishing works again once RabbitMQ lifts the alarm.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match broker.publish(&key, message(9_999)).await {
            Ok(()) => break,
            Err(error) => {
                assert!(Instant::now() < deadline, "still failing: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    drop(deliveries);
    broker.delete_queue(&b).await.unwrap();
    broker.close().await;
    remove_cluster(prefix.as_str(), &[]).await;
}
