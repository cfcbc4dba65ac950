//! Hostile and careless input against node programs (each a process of its own) on the real
//! Redis and RabbitMQ: no payload in any log line, whatever path a message takes; an
//! oversized frame closed with 1009 without costing the node its memory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hybrid_cluster::discovery::{RedisOptions, RedisRegistry};
use hybrid_cluster::routing::EnvelopeCodec;
use hybrid_cluster::routing::{RabbitBroker, RabbitConfig};
use hybrid_cluster::{
    AmqpUrl, Broker, BrokerMessage, ClusterPrefix, Envelope, Incarnation, NodeId, NodeInfo,
    RedisUrl, Registry, RoutingKey, Target,
};
use hybrid_cluster_test_support::client::Client;
use hybrid_cluster_test_support::node::NodeCluster;
use hybrid_cluster_test_support::servers::{amqp_url, redis_url};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

/// Every way `token` could be written into a log: as text, as the byte array lapin's `Debug`
/// prints, in hex either case, and in base64 at each of its three alignments (the part of the
/// encoding that depends on the token alone).
fn encodings(token: &str) -> Vec<String> {
    let bytes = token.as_bytes();
    let decimal = bytes
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut found = vec![token.to_owned(), decimal, hex.clone(), hex.to_uppercase()];
    for shift in 0..3 {
        let mut shifted = vec![b'.'; shift];
        shifted.extend_from_slice(bytes);
        let encoded = base64(&shifted);
        // Skip the characters that mix in the leading bytes and the trailing partial group.
        let start = (shift * 4).div_ceil(3) + 1;
        let end = encoded.len().saturating_sub(4);
        if start < end {
            found.push(encoded[start..end].to_owned());
        }
    }
    found
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Every path that makes a node warn, each carrying `token` in its payload, in a cluster with
/// a secret: a group message no node is bound to and a unicast to a node with no queue (both
/// returned by RabbitMQ), a malformed message and an unsigned envelope in a node's queue
/// (dead-lettered), a bad request, and an oversized frame. No log line of either node holds the token, in any
/// encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_payload_reaches_any_log() {
    let token = format!("PAYLOAD-{:016x}", rand::random::<u64>());
    let mut cluster = NodeCluster::new("hardening-logs");
    let mut options = cluster.options();
    // Our own crates at debug too: nothing of a message at any of their levels. (The node
    // program keeps lapin's returned-message warning off whatever RUST_LOG says.)
    options.log_filter = "info,hybrid_cluster=debug,hybrid_cluster_routing=debug,\
                          hybrid_cluster_discovery=debug"
        .to_owned();
    let secret = "the secret of the hardening cluster";
    options
        .env
        .push(("HYBRID_CLUSTER_SECRET".to_owned(), secret.to_owned()));
    let secret = hybrid_cluster::ClusterSecret::new(secret).unwrap();
    let a = cluster.start("logs-a", &options).await;
    let b = cluster.start("logs-b", &options).await;
    cluster.wait_for_nodes(2, WAIT).await;
    let prefix = ClusterPrefix::new(cluster.prefix.clone()).unwrap();
    let mut client = Client::connect(&cluster.nodes[a].ws_url()).await.unwrap();

    // A node that is registered but has no queue: a unicast to it comes back from RabbitMQ.
    let redis: RedisUrl = redis_url().parse().unwrap();
    let registry = RedisRegistry::connect(&redis, &prefix, RedisOptions::default())
        .await
        .unwrap();
    let ghost = NodeId::new("logs-queueless").unwrap();
    let incarnation = Incarnation::random();
    let mut info = NodeInfo::new(ghost.clone(), incarnation, "127.0.0.1", 1);
    info.lease_ms = Some(60_000);
    registry
        .put_node(
            &ghost,
            info.to_signed_json(&secret).unwrap().into(),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    cluster.wait_for_nodes(3, WAIT).await;
    let to_ghost = format!("{ghost}:{incarnation}:1");

    let ops = [
        json!({"op":"group","group":"nobody","data":token,"id":"group"}),
        json!({"op":"send","to":to_ghost,"data":token,"id":"unicast"}),
        json!({"op":"fly","data":token,"id":"bad"}),
    ];
    client.send_all(&ops).await.unwrap();
    let mut answered = 0;
    while answered < 3 {
        let frame = client.next_json(WAIT).await.unwrap().unwrap();
        if frame["type"] == "ack" || frame["type"] == "error" {
            answered += 1;
        }
    }

    // Garbage and an unsigned envelope straight into node b's queue.
    let amqp: AmqpUrl = amqp_url().parse().unwrap();
    let outsider = RabbitBroker::connect(&amqp, &prefix, RabbitConfig::default())
        .await
        .unwrap();
    let key = RoutingKey::Node(NodeId::new(&cluster.nodes[b].id).unwrap());
    let garbage = BrokerMessage {
        message_id: "not-an-id".to_owned(),
        headers: [("hc-meta".to_owned(), token.clone())].into(),
        body: token.clone().into_bytes().into(),
    };
    outsider.publish(&key, garbage).await.unwrap();
    let unsigned = Envelope::text(
        NodeId::new("outsider").unwrap(),
        Target::Broadcast,
        token.clone(),
    );
    let _ = outsider.publish(&key, unsigned.to_message().unwrap()).await;
    outsider.close().await;

    // An oversized frame (the token over 64 KiB).
    let mut big = Client::connect(&cluster.nodes[a].ws_url()).await.unwrap();
    let huge = token.repeat(80 * 1024 / token.len());
    big.send(&json!({"op":"broadcast","data":huge}))
        .await
        .unwrap();
    let _ = big.next_json(WAIT).await;

    // A marker through both nodes: what came before it has been handled.
    let mut other = Client::connect(&cluster.nodes[b].ws_url()).await.unwrap();
    client
        .send(&json!({"op":"send","to":other.id,"data":"marker","id":"marker"}))
        .await
        .unwrap();
    loop {
        let frame = other.next_json(WAIT).await.unwrap().unwrap();
        if frame["data"] == "marker" {
            break;
        }
    }
    let all = encodings(&token);
    for node in &cluster.nodes {
        let log = node.log();
        assert!(log.len() > 100, "the node logged: {log}");
        for line in log.lines() {
            for encoded in &all {
                assert!(
                    !line.contains(encoded.as_str()),
                    "{} logged the payload ({encoded}): {line}",
                    node.id
                );
            }
        }
    }
}

/// A 4 MiB frame is refused from its header: the client gets a close with 1009 and a reason,
/// the node's memory hardly moves, and it serves new clients as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_closed_with_1009_and_costs_the_node_nothing() {
    let mut cluster = NodeCluster::new("hardening-frame");
    let options = cluster.options();
    let node = cluster.start("frame-a", &options).await;
    let url = cluster.nodes[node].ws_url();
    let before = cluster.nodes[node].rss_kib().unwrap();

    for _ in 0..5 {
        let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let _welcome = socket.next().await;
        let frame = "x".repeat(4 * 1024 * 1024);
        // The node may close before it has all of it: a failed send is fine.
        let _ = socket.send(Message::text(frame)).await;
        let close = loop {
            match tokio::time::timeout(WAIT, socket.next()).await.unwrap() {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        let close = close.expect("a close frame with a code");
        assert_eq!(u16::from(close.code), 1009);
        assert!(close.reason.contains("too big"), "{}", close.reason);
    }
    let after = cluster.nodes[node].rss_kib().unwrap();
    assert!(
        after < before + 8 * 1024,
        "the node grew from {before} KiB to {after} KiB"
    );
    let mut client = Client::connect(&url).await.unwrap();
    client
        .send(&json!({"op":"broadcast","data":"still here","id":1}))
        .await
        .unwrap();
    let frame = client.next_json(WAIT).await.unwrap().unwrap();
    assert!(
        frame["type"] == "broadcast" || frame["type"] == "ack",
        "{frame}"
    );
}
