//! The routing layer on a 3-node RabbitMQ cluster (`scripts/rabbitmq-cluster.sh`: nodes
//! `hc1@localhost`..`hc3@localhost`, AMQP on 127.0.0.1:5681-5683). `RABBITMQ_CLUSTER_URLS`
//! (comma-separated AMQP URLs of the script's nodes, in its order: through a proxy, say)
//! overrides the addresses it connects to; nodes are stopped and started through the script.
//! When the loopback cluster is not running (and the variable is not set), the test starts it
//! with the script and stops it at the end.
//!
//! The test stops a broker node, so it runs alone (see `.config/nextest.toml`) and starts the
//! node again before it ends, leaving the cluster as it found it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hybrid_cluster_core::{
    AmqpUrl, Broker, ClusterPrefix, ConsumeOptions, Durability, Envelope, NodeId, QueueOptions,
    RoutingKey, Target,
};
use hybrid_cluster_routing::{EnvelopeCodec, RabbitBroker, RabbitConfig};
use hybrid_cluster_test_support::servers::unique_prefix;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The script's nodes, in the order of its AMQP ports.
const NODES: [&str; 3] = ["hc1", "hc2", "hc3"];
const DEFAULT_URLS: &str = "amqp://guest:guest@127.0.0.1:5681/%2f,\
                            amqp://guest:guest@127.0.0.1:5682/%2f,\
                            amqp://guest:guest@127.0.0.1:5683/%2f";
/// The longest the stream and then the wait for its last messages may take.
const WAIT: Duration = Duration::from_secs(30);

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/rabbitmq-cluster.sh")
}

/// Runs the cluster script; its standard output, or an error with its standard error.
async fn cluster_script(args: &[&str]) -> Result<String, String> {
    let output = tokio::process::Command::new(script())
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run the cluster script: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "rabbitmq-cluster.sh {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn urls() -> Vec<AmqpUrl> {
    std::env::var("RABBITMQ_CLUSTER_URLS")
        .unwrap_or_else(|_| DEFAULT_URLS.to_owned())
        .split(',')
        .map(|url| url.trim().parse().expect("a valid AMQP URL"))
        .collect()
}

/// Starts the loopback cluster unless it runs already (or `RABBITMQ_CLUSTER_URLS` names the
/// addresses to use): whether this test started it.
async fn ensure_cluster() -> bool {
    if std::env::var("RABBITMQ_CLUSTER_URLS").is_ok() || cluster_script(&["status"]).await.is_ok() {
        return false;
    }
    cluster_script(&["start"]).await.unwrap();
    true
}

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn config(name: &str) -> RabbitConfig {
    RabbitConfig {
        connection_name: Some(name.to_owned()),
        dead_letter_expires: Some(Duration::from_secs(120)),
        // Fail over quickly: a stopped node refuses connections at once.
        reconnect_delay: Duration::from_millis(50),
        max_reconnect_delay: Duration::from_millis(500),
        outage_timeout: Duration::from_secs(20),
        persistent: true,
        ..RabbitConfig::default()
    }
}

/// The script's name of the node behind `url` (found by its place in the list).
fn node_behind(urls: &[AmqpUrl], url: &str) -> &'static str {
    let index = urls
        .iter()
        .position(|candidate| candidate.to_string() == url)
        .unwrap_or_else(|| panic!("{url} is not one of the cluster's URLs"));
    NODES[index]
}

/// Receives node `b`'s messages, acknowledging each, and reports their numbers.
fn receive(mut deliveries: hybrid_cluster_core::Deliveries) -> mpsc::UnboundedReceiver<u64> {
    let (numbers, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(delivery) = deliveries.next().await {
            let Ok(delivery) = delivery else { continue };
            let envelope = Envelope::from_message(delivery.message).unwrap();
            let number = envelope.payload_text().unwrap().parse().unwrap();
            let _ = delivery.acker.ack().await;
            if numbers.send(number).is_err() {
                return;
            }
        }
    });
    received
}

/// Publishes numbered messages to `b`, 8 at a time, until `stopped` turns true and `after`
/// more were confirmed (or [`WAIT`] passes): the numbers confirmed, and how many failed.
async fn stream(
    broker: Arc<RabbitBroker>,
    mut stopped: watch::Receiver<bool>,
    after: usize,
    progress: Arc<AtomicUsize>,
) -> (BTreeSet<u64>, usize) {
    let b = node("b");
    let key = RoutingKey::Node(b.clone());
    let mut confirmed = BTreeSet::new();
    let mut failed = 0;
    let mut confirmed_after_stop = 0;
    let mut in_flight = FuturesUnordered::new();
    let started = Instant::now();
    let mut next = 0u64;
    loop {
        let stop_seen = *stopped.borrow_and_update();
        if stop_seen && confirmed_after_stop >= after || started.elapsed() > WAIT {
            break;
        }
        while in_flight.len() < 8 {
            let message = Envelope::text(node("a"), Target::Node(b.clone()), next.to_string())
                .to_message()
                .unwrap();
            let (broker, key, number) = (Arc::clone(&broker), key.clone(), next);
            in_flight.push(async move { (number, broker.publish(&key, message).await) });
            next += 1;
        }
        if let Some((number, result)) = in_flight.next().await {
            match result {
                Ok(()) => {
                    confirmed.insert(number);
                    progress.fetch_add(1, Ordering::Relaxed);
                    confirmed_after_stop += usize::from(stop_seen);
                }
                Err(_) => {
                    failed += 1;
                    // Through an outage longer than the bound, publishes fail at once.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    while let Some((number, result)) = in_flight.next().await {
        match result {
            Ok(()) => drop(confirmed.insert(number)),
            Err(_) => failed += 1,
        }
    }
    (confirmed, failed)
}

/// Deletes what the test declared.
async fn clean_up(prefix: &ClusterPrefix) {
    let connection = lapin::Connection::connect(
        &urls()[0].to_connection_string(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let dead_letter = format!("{prefix}:dead-letter");
    for queue in [format!("{prefix}:node:b"), dead_letter.clone()] {
        let _ = channel.queue_delete(queue.into(), Default::default()).await;
    }
    for exchange in [prefix.to_string(), dead_letter] {
        let _ = channel
            .exchange_delete(exchange.into(), Default::default())
            .await;
    }
    let _ = connection.close(200, "OK".into()).await;
}

/// Node `a` streams confirmed messages to node `b`'s quorum queue (`replicated`); mid-stream,
/// the broker node both are connected to stops. Both fail over to another node of the
/// cluster, and every message confirmed to `a` reaches `b` (duplicates, from resends of
/// messages whose confirmation was lost with the connection, are counted, not lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_node_stopped_mid_stream_loses_nothing_confirmed() {
    let started_cluster = ensure_cluster().await;
    let urls = urls();
    let prefix = ClusterPrefix::new(unique_prefix("hc-test:cluster")).unwrap();
    let receiver = RabbitBroker::connect_any(&urls, &prefix, config("b"))
        .await
        .unwrap();
    let options = QueueOptions {
        durability: Durability::Replicated,
        expires: Some(Duration::from_secs(120)),
        ..QueueOptions::default()
    };
    let b = node("b");
    receiver.declare_queue(&b, &options).await.unwrap();
    receiver
        .bind(&b, &RoutingKey::Node(b.clone()))
        .await
        .unwrap();
    let deliveries = receiver
        .consume(&b, &ConsumeOptions { prefetch: 64 })
        .await
        .unwrap();
    let mut received = receive(deliveries);
    let sender = Arc::new(
        RabbitBroker::connect_any(&urls, &prefix, config("a"))
            .await
            .unwrap(),
    );
    let stopped_url = sender.connected_url().to_owned();
    let stopped_node = node_behind(&urls, &stopped_url);

    let (stop, stopped) = watch::channel(false);
    let progress = Arc::new(AtomicUsize::new(0));
    let streaming = tokio::spawn(stream(
        Arc::clone(&sender),
        stopped,
        500,
        Arc::clone(&progress),
    ));
    // Mid-stream: once messages flow, stop the node the sender is connected to.
    let flowing = Instant::now() + WAIT;
    while progress.load(Ordering::Relaxed) < 300 && Instant::now() < flowing {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let began = Instant::now();
    cluster_script(&["ctl", stopped_node, "stop_app"])
        .await
        .unwrap();
    eprintln!("{stopped_node} stopped in {:?}", began.elapsed());
    stop.send_replace(true);
    let (confirmed, failed) = streaming.await.unwrap();
    eprintln!("streaming ended {:?} after the stop", began.elapsed());

    // Every confirmed message arrives; duplicates are counted.
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    let mut missing = confirmed.clone();
    let deadline = Instant::now() + WAIT;
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, received.recv()).await {
            Ok(Some(number)) => {
                missing.remove(&number);
                *counts.entry(number).or_default() += 1;
            }
            _ => break,
        }
    }
    eprintln!("received {:?} after the stop", began.elapsed());
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "{} confirmed, {failed} failed, {} received, {duplicates} duplicates; \
         sender moved from {stopped_url} to {}",
        confirmed.len(),
        counts.len(),
        sender.connected_url()
    );

    // Leave the cluster as found before asserting.
    let began = Instant::now();
    cluster_script(&["ctl", stopped_node, "start_app"])
        .await
        .unwrap();
    cluster_script(&["ctl", stopped_node, "await_startup", "--timeout", "120"])
        .await
        .unwrap();
    eprintln!("{stopped_node} back in {:?}", began.elapsed());
    sender.close().await;
    receiver.close().await;
    clean_up(&prefix).await;
    if started_cluster {
        cluster_script(&["stop"]).await.unwrap();
    }

    assert!(
        missing.is_empty(),
        "confirmed and never received: {missing:?}"
    );
    assert!(
        confirmed.len() > 500,
        "the stream went on through the outage"
    );
    assert!(
        sender.reconnections() >= 1,
        "the sender lost its connection"
    );
    assert_ne!(sender.connected_url(), stopped_url, "it failed over");
}
