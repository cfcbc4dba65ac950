//! Faults, for real: node programs (each a process of its own) on the real Redis and
//! RabbitMQ, while RabbitMQ restarts, a node's queue is deleted from outside, or a node is
//! killed with messages waiting for it. Every message acked to a client must be delivered, or
//! its sender told.
//!
//! These tests disturb the shared RabbitMQ (or pause processes), so each runs alone: nextest
//! gives each all of its slots (`.config/nextest.toml`), under `cargo test` they take turns
//! on a lock, and each leaves RabbitMQ running as it found it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use hybrid_cluster_test_support::client::Client;
use hybrid_cluster_test_support::node::NodeCluster;
use hybrid_cluster_test_support::rabbitmq;
use serde_json::{Value, json};
use tokio::time::Instant;

/// The bound of every wait on frames or nodes.
const WAIT: Duration = Duration::from_secs(60);

/// Taken by every test for its whole run, so that tests of this binary never overlap.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts node `name` of `cluster` with a heartbeat of `heartbeat_ms` and `extra`
/// arguments; returns its index.
async fn start(
    cluster: &mut NodeCluster,
    name: &str,
    heartbeat_ms: u64,
    extra: &[(&str, &str)],
) -> usize {
    let mut options = cluster.options();
    options.heartbeat_ms = heartbeat_ms;
    for (flag, value) in extra {
        options = options.arg(flag, value);
    }
    cluster.start(name, &options).await
}

/// Reads `client`'s frames until `done` says so, within [`WAIT`]; returns them.
async fn frames_until(client: &mut Client, mut done: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    let mut frames = Vec::new();
    while !done(&frames) {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_json(left).await {
            Ok(Ok(frame)) => frames.push(frame),
            Ok(Err(ended)) => panic!("{}: the connection ended: {ended:?}", client.id),
            Err(error) => panic!("{error}; after {} frames", frames.len()),
        }
    }
    frames
}

/// Two nodes of a new cluster `faults-<name>` (`<name>-a`, `<name>-b`) with a 1 s heartbeat and
/// `extra` arguments, and a client on each, the one on `<name>-b` a member of `room`: the
/// cluster, the index of `<name>-b`, the client on `<name>-a`, the member.
async fn sender_and_member(
    name: &str,
    extra: &[(&str, &str)],
) -> (NodeCluster, usize, Client, Client) {
    let mut cluster = NodeCluster::new(&format!("faults-{name}"));
    let sending = start(&mut cluster, &format!("{name}-a"), 1_000, extra).await;
    let receiving = start(&mut cluster, &format!("{name}-b"), 1_000, extra).await;
    cluster.wait_for_nodes(2, WAIT).await;
    let sender = Client::connect(&cluster.nodes[sending].ws_url())
        .await
        .unwrap();
    let mut receiver = Client::connect(&cluster.nodes[receiving].ws_url())
        .await
        .unwrap();
    receiver
        .send(&json!({"op":"join","group":"room","id":"join"}))
        .await
        .unwrap();
    frames_until(&mut receiver, |frames| count(frames, "ack") == 1).await;
    (cluster, receiving, sender, receiver)
}

fn count(frames: &[Value], kind: &str) -> usize {
    frames.iter().filter(|f| f["type"] == kind).count()
}

/// Sends `count` messages numbered 0.. from `sender` to `to`, each with its number as id, and
/// waits until every one is acked.
async fn send_acked(sender: &mut Client, to: &str, count: u64) {
    let ops: Vec<Value> = (0..count)
        .map(|n| json!({"op":"send","to":to,"data":{"n":n},"id":n}))
        .collect();
    sender.send_all(&ops).await.unwrap();
    let frames = frames_until(sender, |frames| {
        frames.iter().filter(|f| f["type"] == "ack").count() == count as usize
            || frames.iter().any(|f| f["type"] == "error")
    })
    .await;
    assert_eq!(count_of(&frames, "ack"), count as usize, "{frames:?}");
}

fn count_of(frames: &[Value], kind: &str) -> usize {
    count(frames, kind)
}

/// The scenario users of every peer complain about: a node cannot consume for a while (here
/// it is paused), 500 messages for its client are sent and acked, and RabbitMQ restarts. In
/// the default (durable) mode every one of them arrives once the node is back, in order, and
/// none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_acknowledged_message_in_durable_mode() {
    let _alone = ALONE.lock().await;
    let mut cluster = NodeCluster::new("faults-restart");
    // A lease of 15 s outlasts the pause and the restart: the paused node stays a member.
    let sending = start(&mut cluster, "restart-a", 5_000, &[]).await;
    let receiving = start(&mut cluster, "restart-b", 5_000, &[]).await;
    cluster.wait_for_nodes(2, WAIT).await;
    let mut sender = Client::connect(&cluster.nodes[sending].ws_url())
        .await
        .unwrap();
    let mut receiver = Client::connect(&cluster.nodes[receiving].ws_url())
        .await
        .unwrap();

    cluster.nodes[receiving].signal("STOP").unwrap();
    send_acked(&mut sender, &receiver.id, 500).await;
    rabbitmq::restart().await.unwrap();
    cluster.nodes[receiving].signal("CONT").unwrap();

    let frames = frames_until(&mut receiver, |frames| count(frames, "message") >= 500).await;
    let numbers: Vec<u64> = frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        numbers,
        (0..500).collect::<Vec<u64>>(),
        "every message, in order, once"
    );
    // Nothing more comes: a duplicate would be before this marker.
    sender
        .send(&json!({"op":"send","to":receiver.id,"data":{"n":"end"},"id":"end"}))
        .await
        .unwrap();
    let after = frames_until(&mut receiver, |frames| !frames.is_empty()).await;
    assert_eq!(after[0]["data"]["n"], "end", "no duplicate: {after:?}");
    for node in &cluster.nodes {
        let (status, body) = node.get("/healthz").await.unwrap();
        assert_eq!(status, 200, "{}: {body}\n{}", node.id, cluster.logs(25));
    }
}

/// A node's queue deleted from outside: the node logs the loss, declares its queue and its
/// bindings again and consumes again within seconds; unicasts, groups and broadcasts reach
/// its clients again, and it is healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_queue_is_deleted_heals_itself() {
    let _alone = ALONE.lock().await;
    let (cluster, receiving, mut sender, mut receiver) = sender_and_member("deleted", &[]).await;

    rabbitmq::delete_queue(&cluster.queue(receiving))
        .await
        .unwrap();
    // Until the node has healed, sends to it may fail (no queue): retry until one is acked
    // and arrives, for each kind.
    let deadline = Instant::now() + WAIT;
    let mut healed = HashSet::new();
    let mut attempt = 0;
    while healed.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "not healed: {healed:?}\n{}",
            cluster.logs(25)
        );
        attempt += 1;
        let ops = [
            json!({"op":"send","to":receiver.id,"data":{"k":"unicast","a":attempt},"id":"u"}),
            json!({"op":"group","group":"room","data":{"k":"group","a":attempt},"id":"g"}),
            json!({"op":"broadcast","data":{"k":"broadcast","a":attempt},"id":"b"}),
        ];
        sender.send_all(&ops).await.unwrap();
        // The sender gets its own broadcast too: wait for the three answers.
        let answers = frames_until(&mut sender, |frames| {
            count(frames, "ack") + count(frames, "error") >= 3
        })
        .await;
        drop(answers);
        let until = Instant::now() + Duration::from_millis(500);
        while let Ok(Ok(Ok(frame))) = tokio::time::timeout(
            until.saturating_duration_since(Instant::now()),
            receiver.next_json(Duration::from_secs(1)),
        )
        .await
        {
            if let Some(kind) = frame["data"]["k"].as_str() {
                healed.insert(kind.to_owned());
            }
        }
    }
    let log = cluster.nodes[receiving].log();
    assert!(
        log.contains("consumer is lost"),
        "the loss is logged\n{}",
        cluster.logs(25)
    );
    assert!(
        log.contains("consumer is restored"),
        "the recovery is logged\n{}",
        cluster.logs(25)
    );
    let (status, body) = cluster.nodes[receiving].get("/healthz").await.unwrap();
    assert_eq!(status, 200, "{body}");
}

/// Messages confirmed to a node that then crashes are not lost with its queue: a survivor
/// takes the queue over once the node's lease runs out and answers each of them with a
/// `not_found` error to its sender, naming the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_nodes_waiting_messages_are_answered_by_a_survivor() {
    let _alone = ALONE.lock().await;
    let mut cluster = NodeCluster::new("faults-crashed");
    let surviving = start(&mut cluster, "crashed-a", 500, &[]).await;
    let crashing = start(&mut cluster, "crashed-b", 500, &[]).await;
    cluster.wait_for_nodes(2, WAIT).await;
    let mut sender = Client::connect(&cluster.nodes[surviving].ws_url())
        .await
        .unwrap();
    let receiver = Client::connect(&cluster.nodes[crashing].ws_url())
        .await
        .unwrap();

    // The node stops consuming (paused), 100 messages wait in its queue, then it dies.
    cluster.nodes[crashing].signal("STOP").unwrap();
    send_acked(&mut sender, &receiver.id, 100).await;
    cluster.nodes[crashing].signal("KILL").unwrap();
    let errors = frames_until(&mut sender, |frames| count(frames, "error") == 100).await;
    let mut answered: Vec<u64> = errors
        .iter()
        .filter(|f| f["type"] == "error")
        .map(|f| {
            assert_eq!(f["code"], "not_found", "{f}");
            f["id"].as_u64().unwrap()
        })
        .collect();
    answered.sort_unstable();
    assert_eq!(
        answered,
        (0..100).collect::<Vec<u64>>(),
        "each request answered once"
    );
    let log = cluster.nodes[surviving].log();
    assert!(
        log.contains("taking over the queue"),
        "{}",
        cluster.logs(25)
    );
}

/// Group keys in buckets across a RabbitMQ restart and a queue deleted from outside: each
/// time the node declares its topology again from what it recorded, with its bucket's key
/// (never a per-group key), and group messages reach its member again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_bucket_bindings_survive_a_broker_restart_and_a_deleted_queue() {
    let _alone = ALONE.lock().await;
    let (cluster, receiving, mut sender, mut receiver) =
        sender_and_member("buckets", &[("--group-buckets", "16")]).await;
    let queue = cluster.queue(receiving);
    let before = group_bindings(&queue).await;
    assert!(
        before.len() == 1 && before[0].starts_with("group-bucket."),
        "one bucket key: {before:?}"
    );

    rabbitmq::restart().await.unwrap();
    group_message_arrives(&mut sender, &mut receiver, &cluster).await;
    assert_eq!(group_bindings(&queue).await, before, "after the restart");
    let log = cluster.nodes[receiving].log();
    assert!(
        log.contains("reconnected to RabbitMQ"),
        "{}",
        cluster.logs(25)
    );

    rabbitmq::delete_queue(&queue).await.unwrap();
    group_message_arrives(&mut sender, &mut receiver, &cluster).await;
    assert_eq!(group_bindings(&queue).await, before, "after the deletion");
    let log = cluster.nodes[receiving].log();
    assert!(log.contains("consumer is restored"), "{}", cluster.logs(25));
}

/// Sends group messages to `room` from `sender` until one reaches `receiver` (while its node
/// is not back on RabbitMQ, they may reach nobody), within [`WAIT`].
async fn group_message_arrives(sender: &mut Client, receiver: &mut Client, cluster: &NodeCluster) {
    let deadline = Instant::now() + WAIT;
    for attempt in 0u64.. {
        assert!(
            Instant::now() < deadline,
            "no group message arrived\n{}",
            cluster.logs(25)
        );
        sender
            .send(&json!({"op":"group","group":"room","data":{"a":attempt},"id":attempt}))
            .await
            .unwrap();
        frames_until(sender, |frames| {
            count(frames, "ack") + count(frames, "error") == 1
        })
        .await;
        let arrived = tokio::time::timeout(
            Duration::from_millis(500),
            receiver.next_json(Duration::from_millis(500)),
        )
        .await;
        if let Ok(Ok(Ok(frame))) = arrived {
            assert_eq!(frame["type"], "group", "{frame}");
            // Earlier attempts may still come: take them, so the next wait starts clean.
            while let Ok(Ok(Ok(_))) = tokio::time::timeout(
                Duration::from_millis(200),
                receiver.next_json(Duration::from_millis(200)),
            )
            .await
            {}
            return;
        }
    }
}

/// The group routing keys bound to `queue`, from RabbitMQ itself.
async fn group_bindings(queue: &str) -> Vec<String> {
    rabbitmq::bindings()
        .await
        .unwrap()
        .into_iter()
        .filter(|b| b.destination == queue && b.routing_key.starts_with("group"))
        .map(|b| b.routing_key)
        .collect()
}
