//! Cross-node throughput of the forwarding service next to raw lapin, in the same run, on
//! the same RabbitMQ (env `AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! `cargo bench -p hybrid-cluster-routing --bench throughput` (env `BENCH_MESSAGES`,
//! default 100,000; `BENCH_ROUNDS`, default 3, the median is reported).
//!
//! - raw (ack each / no ack): one connection publishes 128-byte messages with publisher confirms, 256 in flight,
//!   to a queue another connection consumes with a prefetch of 256, acknowledging each
//!   (pipelined) or with automatic acknowledgement (the ceiling).
//! - forward: node A's `Forward` (256 in flight) → RabbitMQ → node B's `Receiver` (prefetch
//!   256, dedupe on, acknowledging each after handing it to a counting destination); each
//!   node has its own connection.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{StreamExt, TryStreamExt, stream};
use hybrid_cluster_core::{
    AmqpUrl, ClusterPrefix, ConsumeOptions, Envelope, NodeId, QueueOptions, Target,
};
use hybrid_cluster_routing::EnvelopeCodec;
use hybrid_cluster_routing::{
    Forward, ForwardConfig, NodeTopology, RabbitBroker, RabbitConfig, Receiver,
};
use hybrid_cluster_test_support::servers::{amqp_url, unique_prefix};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::ServiceExt;

const SIZE: usize = 128;
const IN_FLIGHT: usize = 256;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn url() -> AmqpUrl {
    amqp_url().parse().unwrap()
}

async fn raw(n: usize, no_ack: bool) -> f64 {
    let uri = url().to_connection_string();
    let publisher = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .unwrap();
    let consumer_conn = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .unwrap();
    let queue = unique_prefix("hc-bench:raw");
    let pub_channel = publisher.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
    pub_channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            arguments,
        )
        .await
        .unwrap();
    pub_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    let sub_channel = consumer_conn.create_channel().await.unwrap();
    sub_channel
        .basic_qos(256, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = sub_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consuming = tokio::spawn(async move {
        // Acknowledgements are pipelined (started at once, not awaited one by one), as the
        // Receiver does.
        let mut acks = FuturesUnordered::new();
        let mut seen = 0;
        while seen < n {
            tokio::select! {
                biased;
                Some(()) = acks.next(), if !acks.is_empty() => continue,
                delivery = consumer.next() => {
                    let delivery = delivery.unwrap().unwrap();
                    seen += 1;
                    if no_ack {
                        continue;
                    }
                    let mut ack = Box::pin(async move {
                        delivery.ack(BasicAckOptions::default()).await.unwrap();
                    });
                    if std::future::poll_fn(|cx| std::task::Poll::Ready(ack.as_mut().poll(cx)))
                        .await
                        .is_pending()
                    {
                        acks.push(ack);
                    }
                }
            }
        }
        while acks.next().await.is_some() {}
    });

    let payload = vec![7u8; SIZE];
    // With BENCH_RAW_HEADERS=1, raw messages carry the same properties as an envelope (id and
    // five headers), to tell the cost of the metadata from the cost of the layer.
    let properties = if std::env::var("BENCH_RAW_HEADERS").is_ok_and(|v| v == "1") {
        let mut headers = FieldTable::default();
        let envelope = Envelope::binary(
            NodeId::new("a").unwrap(),
            Target::Node(NodeId::new("b").unwrap()),
            vec![7u8; SIZE],
        );
        let message = envelope.to_message().unwrap();
        for (name, value) in &message.headers {
            headers.insert(
                name.as_str().into(),
                AMQPValue::LongString(value.as_bytes().into()),
            );
        }
        BasicProperties::default()
            .with_message_id(message.message_id.as_str().into())
            .with_headers(headers)
    } else {
        BasicProperties::default()
    };
    let start = Instant::now();
    let mut confirms = FuturesUnordered::new();
    for _ in 0..n {
        if confirms.len() >= IN_FLIGHT {
            confirms.next().await.unwrap();
        }
        let channel = pub_channel.clone();
        let (queue, payload, properties) = (queue.clone(), payload.clone(), properties.clone());
        let mut publish = Box::pin(async move {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &payload,
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack());
        });
        // Poll once now so the publish is written in order, as the forwarding service does.
        if std::future::poll_fn(|cx| std::task::Poll::Ready(publish.as_mut().poll(cx)))
            .await
            .is_pending()
        {
            confirms.push(publish);
        }
    }
    while confirms.next().await.is_some() {}
    consuming.await.unwrap();
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = pub_channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    rate
}

async fn forward(n: usize) -> f64 {
    let prefix = ClusterPrefix::new(unique_prefix("hc-bench")).unwrap();
    let config = RabbitConfig {
        max_in_flight: IN_FLIGHT,
        dead_letter_expires: Some(Duration::from_secs(60)),
        ..RabbitConfig::default()
    };
    let broker_a = Arc::new(
        RabbitBroker::connect(&url(), &prefix, config.clone())
            .await
            .unwrap(),
    );
    let broker_b = Arc::new(
        RabbitBroker::connect(&url(), &prefix, config)
            .await
            .unwrap(),
    );
    let b = NodeId::new("b").unwrap();
    let options = QueueOptions {
        expires: Some(Duration::from_secs(60)),
        ..QueueOptions::default()
    };
    let node_b = NodeTopology::declare(broker_b.clone(), b.clone(), &options)
        .await
        .unwrap();
    let deliveries = node_b
        .consume(&ConsumeOptions { prefetch: 256 })
        .await
        .unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let local = {
        let (count, done) = (count.clone(), done.clone());
        tower::service_fn(move |_: Envelope| {
            if count.fetch_add(1, Ordering::Relaxed) + 1 == n {
                done.notify_one();
            }
            std::future::ready(Ok::<_, std::convert::Infallible>(()))
        })
    };
    let receiving = tokio::spawn(Receiver::new(deliveries).run(local));

    let a = NodeId::new("a").unwrap();
    let payload = bytes::Bytes::from(vec![7u8; SIZE]);
    let service = Forward::with_config(
        broker_a.clone(),
        ForwardConfig {
            max_in_flight: IN_FLIGHT,
            ..ForwardConfig::default()
        },
    );
    let envelopes =
        (0..n).map(|_| Envelope::binary(a.clone(), Target::Node(b.clone()), payload.clone()));
    let start = Instant::now();
    service
        .call_all(stream::iter(envelopes))
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
    done.notified().await;
    let rate = n as f64 / start.elapsed().as_secs_f64();

    receiving.abort();
    node_b.leave().await.unwrap();
    let uri = url().to_connection_string();
    let cleanup = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = cleanup.create_channel().await.unwrap();
    let dead = format!("{prefix}:dead-letter");
    let _ = channel
        .queue_delete(dead.as_str().into(), QueueDeleteOptions::default())
        .await;
    for exchange in [prefix.as_str(), dead.as_str()] {
        let _ = channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
    }
    rate
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let n = env_usize("BENCH_MESSAGES", 100_000);
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let (mut raw_no_acks, mut raws, mut forwards) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let r0 = raw(n, true).await;
        let r = raw(n, false).await;
        let f = forward(n).await;
        println!(
            "round {round}: raw no-ack {r0:>8.0} msg/s   raw ack {r:>8.0} msg/s   forward {f:>8.0} msg/s"
        );
        raw_no_acks.push(r0);
        raws.push(r);
        forwards.push(f);
    }
    let (r0, r, f) = (median(raw_no_acks), median(raws), median(forwards));
    println!();
    println!("{n} messages x {SIZE} B, {IN_FLIGHT} in flight, median of {rounds}");
    println!("| path | msg/s |");
    println!("|---|---|");
    println!("| raw lapin publish (confirms) -> consume (no ack) | {r0:.0} |");
    println!("| raw lapin publish (confirms) -> consume (ack each) | {r:.0} |");
    println!("| Forward (node A) -> RabbitMQ -> Receiver (node B) | {f:.0} |");
    println!("| ratio forward / raw (ack each) | {:.2} |", f / r);
    println!("| ratio forward / raw (no ack) | {:.2} |", f / r0);
}
