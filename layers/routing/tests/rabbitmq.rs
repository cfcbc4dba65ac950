//! The routing layer against a real RabbitMQ (env `AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). Each test uses its own cluster prefix, so they run
//! in parallel, and cleans up what it declared (node queues also expire on their own).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt, TryStreamExt, stream};
use hybrid_cluster_core::{
    AmqpUrl, Broker, BrokerError, ClusterPrefix, ClusterSecret, ConsumeOptions, Envelope,
    GroupName, MessageId, NodeId, QueueOptions, RoutingKey, Target,
};
use hybrid_cluster_routing::EnvelopeCodec;
use hybrid_cluster_routing::{
    Forward, ForwardConfig, ForwardError, NodeTopology, RabbitBroker, RabbitConfig, RabbitError,
    ReceiveConfig, Receiver,
};
use hybrid_cluster_test_support::proxy::Proxy;
use hybrid_cluster_test_support::servers::{amqp_url, remove_cluster, unique_prefix};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};

#[path = "../src/test_support/outcomes.rs"]
mod outcomes;

use outcomes::Outcomes;

const WAIT: Duration = Duration::from_secs(20);

fn url() -> AmqpUrl {
    amqp_url().parse().expect("a valid AMQP_URL")
}

/// A cluster of its own for one test.
struct Cluster {
    prefix: ClusterPrefix,
}

impl Cluster {
    fn new(test: &str) -> Self {
        Self {
            prefix: ClusterPrefix::new(unique_prefix(&format!("hc-test:{test}"))).unwrap(),
        }
    }

    fn connection_name(&self, node: &str) -> String {
        format!("{}:{node}", self.prefix)
    }

    /// A broker for one node (each node has its own connection, as in production).
    async fn broker(&self, node: &str) -> Arc<RabbitBroker> {
        let config = RabbitConfig {
            connection_name: Some(self.connection_name(node)),
            dead_letter_expires: Some(Duration::from_secs(60)),
            ..RabbitConfig::default()
        };
        Arc::new(
            RabbitBroker::connect(&url(), &self.prefix, config)
                .await
                .unwrap(),
        )
    }

    /// Deletes the cluster's exchanges and dead-letter queue (node queues go as their
    /// nodes leave, or expire).
    async fn clean_up(&self) {
        remove_cluster(self.prefix.as_str(), &[]).await;
    }
}

async fn raw_connection() -> Connection {
    Connection::connect(
        &url().to_connection_string(),
        ConnectionProperties::default(),
    )
    .await
    .unwrap()
}

fn node_id(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn queue_options() -> QueueOptions {
    QueueOptions {
        expires: Some(Duration::from_secs(30)),
        ..QueueOptions::default()
    }
}

/// A node: its topology and a receiver handing envelopes to a channel.
struct Node {
    topology: NodeTopology<RabbitBroker>,
    inbox: mpsc::Receiver<Envelope>,
    stats: Outcomes,
    task: JoinHandle<()>,
}

async fn start_node(broker: Arc<RabbitBroker>, name: &str) -> Node {
    start_node_with(broker, name, ReceiveConfig::default()).await
}

async fn start_node_with(broker: Arc<RabbitBroker>, name: &str, config: ReceiveConfig) -> Node {
    let topology = NodeTopology::declare(broker, node_id(name), &queue_options())
        .await
        .unwrap();
    let deliveries = topology
        .consume(&ConsumeOptions { prefetch: 64 })
        .await
        .unwrap();
    let receiver = Receiver::with_config(deliveries, config);
    let (tx, inbox) = mpsc::channel(1024);
    let local = service_fn(move |envelope: Envelope| {
        let tx = tx.clone();
        async move { tx.send(envelope).await.map_err(BoxError::from) }
    });
    let (run, stats) = Outcomes::record(|| receiver.run(local));
    let task = tokio::spawn(async move {
        run.await.unwrap();
    });
    Node {
        topology,
        inbox,
        stats,
        task,
    }
}

impl Node {
    async fn recv(&mut self) -> Envelope {
        tokio::time::timeout(WAIT, self.inbox.recv())
            .await
            .expect("a message in time")
            .expect("the receiver is running")
    }

    /// Receives until the envelope with id `until` and returns the payloads before it.
    async fn recv_until(&mut self, until: MessageId) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            let envelope = self.recv().await;
            if envelope.id == until {
                return got;
            }
            got.push(envelope.payload_text().unwrap().to_owned());
        }
    }

    async fn leave(self) {
        self.task.abort();
        self.topology.leave().await.unwrap();
    }
}

fn text(from: &str, target: Target, text: impl Into<String>) -> Envelope {
    Envelope::text(node_id(from), target, text)
}

/// Sends every envelope through `forward`, many in flight, in order.
async fn send_all(forward: &Forward<RabbitBroker>, envelopes: Vec<Envelope>) {
    forward
        .clone()
        .call_all(stream::iter(envelopes))
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
}

fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| i.to_string()).collect()
}

async fn rabbitmqctl(args: &[&str]) -> String {
    hybrid_cluster_test_support::rabbitmq::rabbitmqctl(args)
        .await
        .unwrap()
}

/// The (queue, routing key) bindings of the cluster's exchange, from RabbitMQ itself.
async fn bindings(cluster: &Cluster) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = hybrid_cluster_test_support::rabbitmq::bindings()
        .await
        .unwrap()
        .into_iter()
        .filter(|b| b.source == cluster.prefix.as_str())
        .map(|b| (b.destination, b.routing_key))
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn unicast_between_two_nodes_in_order() {
    let cluster = Cluster::new("unicast");
    let (broker_a, broker_b) = (cluster.broker("a").await, cluster.broker("b").await);
    let mut b = start_node(broker_b, "b").await;
    let forward = Forward::new(broker_a);

    let mut envelopes: Vec<Envelope> = (0..500)
        .map(|i| text("a", Target::Node(node_id("b")), i.to_string()))
        .collect();
    // Binary payloads travel as they are.
    let binary = Envelope::binary(
        node_id("a"),
        Target::Node(node_id("b")),
        vec![0u8, 255, 1, 254],
    );
    envelopes.push(binary.clone());
    send_all(&forward, envelopes).await;
    let mut got = Vec::new();
    for _ in 0..500 {
        got.push(b.recv().await.payload_text().unwrap().to_owned());
    }
    assert_eq!(got, numbered(500));
    let last = b.recv().await;
    assert_eq!(last, binary);
    assert_eq!(b.stats.get().handled, 501);
    b.leave().await;
    cluster.clean_up().await;
}

#[tokio::test]
async fn broadcast_reaches_every_node_exactly_once() {
    let cluster = Cluster::new("broadcast");
    let broker_a = cluster.broker("a").await;
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let broker = if name == "a" {
            broker_a.clone()
        } else {
            cluster.broker(name).await
        };
        nodes.push((name, start_node(broker, name).await));
    }
    let forward = Forward::new(broker_a);
    let broadcasts = (0..50)
        .map(|i| text("a", Target::Broadcast, i.to_string()))
        .collect();
    send_all(&forward, broadcasts).await;
    // A unicast to each node after the broadcasts: per-sender order means any extra copy
    // would arrive before it.
    for (name, node) in &mut nodes {
        let marker = text("a", Target::Node(node_id(name)), "end");
        let id = marker.id;
        send_all(&forward, vec![marker]).await;
        assert_eq!(node.recv_until(id).await, numbered(50), "node {name}");
    }
    for (_, node) in nodes {
        node.leave().await;
    }
    cluster.clean_up().await;
}

#[tokio::test]
async fn a_group_reaches_only_the_nodes_with_members() {
    let cluster = Cluster::new("group");
    let broker_a = cluster.broker("a").await;
    let mut b = start_node(cluster.broker("b").await, "b").await;
    let mut c = start_node(cluster.broker("c").await, "c").await;
    let forward = Forward::new(broker_a.clone());
    let room = GroupName::new("room-1").unwrap();
    let to_room = |t: &str| text("a", Target::Group(room.clone()), t);

    // No member anywhere: unroutable, and said so.
    let err = forward
        .clone()
        .oneshot(to_room("nobody"))
        .await
        .unwrap_err();
    assert!(matches!(err, ForwardError::Unroutable { .. }), "{err:?}");

    b.topology.add_member(&room).await.unwrap();
    b.topology.add_member(&room).await.unwrap();
    let queue_b = broker_a.queue_name(&node_id("b"));
    let queue_c = broker_a.queue_name(&node_id("c"));
    let group_bindings: Vec<_> = bindings(&cluster)
        .await
        .into_iter()
        .filter(|(_, key)| key.starts_with("group."))
        .collect();
    assert_eq!(
        group_bindings,
        vec![(queue_b.clone(), "group.room-1".to_owned())]
    );

    send_all(&forward, vec![to_room("for members")]).await;
    for (name, node) in [("b", &mut b), ("c", &mut c)] {
        let marker = text("a", Target::Node(node_id(name)), "end");
        let id = marker.id;
        send_all(&forward, vec![marker]).await;
        let got = node.recv_until(id).await;
        let expected: Vec<String> = if name == "b" {
            vec!["for members".into()]
        } else {
            vec![]
        };
        assert_eq!(got, expected, "node {name}");
    }

    // The last local member leaves: the binding goes, the group is unroutable again.
    b.topology.remove_member(&room).await.unwrap();
    assert!(
        bindings(&cluster)
            .await
            .iter()
            .any(|(_, k)| k == "group.room-1")
    );
    b.topology.remove_member(&room).await.unwrap();
    let all = bindings(&cluster).await;
    assert!(!all.iter().any(|(_, k)| k.starts_with("group.")), "{all:?}");
    assert!(all.contains(&(queue_c, "broadcast".to_owned())));
    let err = forward.oneshot(to_room("gone")).await.unwrap_err();
    assert!(matches!(err, ForwardError::Unroutable { .. }));

    b.leave().await;
    c.leave().await;
    cluster.clean_up().await;
}

/// A burst of joins past the connection's channel limit (2,047): each bind needs a channel,
/// so they take turns rather than fail, and every one is made.
#[tokio::test]
async fn a_burst_of_joins_past_the_channel_limit_binds_every_group() {
    const GROUPS: usize = 2_500;
    let cluster = Cluster::new("join-burst");
    let b = start_node(cluster.broker("b").await, "b").await;
    let topology = &b.topology;
    let groups: Vec<GroupName> = (0..GROUPS)
        .map(|i| GroupName::new(format!("burst-{i}")).unwrap())
        .collect();
    let joined =
        futures_util::future::join_all(groups.iter().map(|g| topology.add_member(g))).await;
    let failed: Vec<_> = joined.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {GROUPS} joins failed: {:?}",
        failed.len(),
        failed.first()
    );
    let bound = bindings(&cluster)
        .await
        .into_iter()
        .filter(|(_, key)| key.starts_with("group.burst-"))
        .count();
    assert_eq!(bound, GROUPS);
    let left =
        futures_util::future::join_all(groups.iter().map(|g| topology.remove_member(g))).await;
    assert!(left.iter().all(Result::is_ok));
    let all = bindings(&cluster).await;
    assert!(!all.iter().any(|(_, k)| k.starts_with("group.")), "{all:?}");
    b.leave().await;
    cluster.clean_up().await;
}

#[tokio::test]
async fn a_send_to_a_node_that_is_gone_fails_with_unroutable() {
    let cluster = Cluster::new("unroutable");
    let broker_a = cluster.broker("a").await;
    let forward = Forward::new(broker_a.clone());
    let ghost = Target::Node(node_id("ghost"));
    let err = forward
        .clone()
        .oneshot(text("a", ghost.clone(), "hello?"))
        .await
        .unwrap_err();
    assert!(matches!(err, ForwardError::Unroutable { ref target } if *target == ghost));

    // A node that leaves for good becomes unroutable at once.
    let mut b = start_node(cluster.broker("b").await, "b").await;
    send_all(&forward, vec![text("a", Target::Node(node_id("b")), "hi")]).await;
    assert_eq!(b.recv().await.payload_text(), Some("hi"));
    b.leave().await;
    let err = forward
        .oneshot(text("a", Target::Node(node_id("b")), "still there?"))
        .await
        .unwrap_err();
    assert!(matches!(err, ForwardError::Unroutable { .. }), "{err:?}");
    cluster.clean_up().await;
}

#[tokio::test]
async fn a_malformed_message_is_dead_lettered_and_good_ones_keep_flowing() {
    let cluster = Cluster::new("malformed");
    let broker_a = cluster.broker("a").await;
    let mut b = start_node(cluster.broker("b").await, "b").await;
    let forward = Forward::new(broker_a.clone());
    let to_b = |t: &str| text("a", Target::Node(node_id("b")), t);

    send_all(&forward, vec![to_b("before")]).await;
    // Someone else publishes to node b's key without the envelope headers. With confirms on,
    // so that the junk is in the queue before "after" is sent (without them the publish
    // resolves at once and races the next one).
    let raw = raw_connection().await;
    let channel = raw.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    channel
        .basic_publish(
            cluster.prefix.as_str().into(),
            "node.b".into(),
            BasicPublishOptions::default(),
            b"not an envelope",
            BasicProperties::default().with_message_id("junk".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    send_all(&forward, vec![to_b("after")]).await;

    assert_eq!(b.recv().await.payload_text(), Some("before"));
    assert_eq!(b.recv().await.payload_text(), Some("after"));
    assert_eq!(b.stats.get().dead_lettered, 1);

    // The dead letter reaches the cluster's dead-letter queue, body unchanged. RabbitMQ routes
    // it there after the reject, asynchronously: wait for it as a consumer would.
    let mut dead_letters = channel
        .basic_consume(
            broker_a.dead_letter_name().into(),
            "dead-letter-check".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let dead = tokio::time::timeout(Duration::from_secs(10), dead_letters.next())
        .await
        .expect("a dead letter in time")
        .expect("the consumer is open")
        .unwrap();
    assert_eq!(dead.data, b"not an envelope");
    b.leave().await;
    cluster.clean_up().await;
}

#[tokio::test]
async fn signed_traffic_flows_and_forged_messages_are_dead_lettered() {
    let cluster = Cluster::new("signed");
    let secret = ClusterSecret::new("the cluster secret of this test").unwrap();
    let broker_a = cluster.broker("a").await;
    let config = ReceiveConfig::default().with_secret(secret.clone());
    let mut b = start_node_with(cluster.broker("b").await, "b", config).await;
    let forward = Forward::with_config(
        broker_a.clone(),
        ForwardConfig::default().with_secret(secret.clone()),
    );
    let to_b = |t: &str| text("a", Target::Node(node_id("b")), t);

    send_all(&forward, vec![to_b("before")]).await;
    // Someone with access to the broker but not the secret: an unsigned envelope, one signed
    // with a guessed secret, and a captured signed one whose payload was replaced.
    let intruder = cluster.broker("intruder").await;
    let key = RoutingKey::Node(node_id("b"));
    intruder
        .publish(&key, to_b("forged: unsigned").to_message().unwrap())
        .await
        .unwrap();
    let mut guessed = to_b("forged: guessed secret");
    guessed.sign(&ClusterSecret::new("a guess at the cluster secret").unwrap());
    intruder
        .publish(&key, guessed.to_message().unwrap())
        .await
        .unwrap();
    let mut captured = to_b("before");
    captured.sign(&secret);
    let mut altered = captured.to_message().unwrap();
    altered.body = "forged: altered".into();
    intruder.publish(&key, altered).await.unwrap();
    send_all(&forward, vec![to_b("after")]).await;

    let first = b.recv().await;
    assert_eq!(first.payload_text(), Some("before"));
    assert!(
        first.signature.is_some(),
        "the forwarding service signed it"
    );
    assert_eq!(b.recv().await.payload_text(), Some("after"));
    let stats = b.stats.get();
    assert_eq!(
        (stats.handled, stats.rejected, stats.dead_lettered),
        (2, 3, 3)
    );

    // The refused messages reach the cluster's dead-letter queue, for inspection.
    let raw = raw_connection().await;
    let channel = raw.create_channel().await.unwrap();
    let mut dead_letters = channel
        .basic_consume(
            broker_a.dead_letter_name().into(),
            "dead-letter-check".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let dead = tokio::time::timeout(Duration::from_secs(10), dead_letters.next())
            .await
            .expect("a dead letter in time")
            .expect("the consumer is open")
            .unwrap();
        bodies.push(String::from_utf8(dead.data).unwrap());
    }
    bodies.sort();
    assert_eq!(
        bodies,
        [
            "forged: altered",
            "forged: guessed secret",
            "forged: unsigned"
        ]
    );
    b.leave().await;
    cluster.clean_up().await;
}

/// The pid of the connection named `name`, from `rabbitmqctl list_connections` (RabbitMQ 3.10
/// has no `user_provided_name` column: the name is in the client properties).
/// The server-side ids of the connections (consuming and publishing) of the broker named
/// `name`.
async fn connection_pids(name: &str) -> Vec<String> {
    let out = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ])
    .await;
    let named = format!("\"{name} (");
    let pids: Vec<String> = out
        .lines()
        .filter_map(|line| {
            let (pid, properties) = line.split_once('\t')?;
            properties.contains(&named).then(|| pid.trim().to_owned())
        })
        .collect();
    assert_eq!(pids.len(), 2, "two connections named {name} in {out}");
    pids
}

#[tokio::test]
async fn a_forced_connection_close_loses_and_duplicates_nothing() {
    let cluster = Cluster::new("close");
    let (broker_a, broker_b) = (cluster.broker("a").await, cluster.broker("b").await);
    let mut b = start_node(broker_b.clone(), "b").await;
    let forward = Forward::new(broker_a.clone());
    let mut pids = connection_pids(&cluster.connection_name("a")).await;
    pids.extend(connection_pids(&cluster.connection_name("b")).await);

    // A steady stream of sends (1 per ms), many in flight, across the close.
    const N: usize = 3000;
    let sender = {
        let mut forward = forward.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(1));
            let mut in_flight = FuturesUnordered::new();
            for i in 0..N {
                ticks.tick().await;
                while let Some(Some(sent)) = in_flight.next().now_or_never() {
                    sent?;
                }
                let envelope = text("a", Target::Node(node_id("b")), i.to_string());
                let ready = forward.ready().await?;
                in_flight.push(ready.call(envelope));
            }
            while let Some(sent) = in_flight.next().await {
                sent?;
            }
            Ok::<(), ForwardError>(())
        })
    };

    let mut got = Vec::with_capacity(N);
    while got.len() < 300 {
        got.push(b.recv().await.payload_text().unwrap().to_owned());
    }
    // And bursts with no pacing, until after the close, so that the publisher holds many
    // messages per round when the connection drops.
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burst = {
        let forward = forward.clone();
        let closed = Arc::clone(&closed);
        tokio::spawn(async move {
            let mut sent = 0;
            let mut rounds_after_close = 0;
            while rounds_after_close < 5 {
                if closed.load(std::sync::atomic::Ordering::Relaxed) {
                    rounds_after_close += 1;
                }
                let envelopes = (sent..sent + 200)
                    .map(|i| text("a", Target::Node(node_id("b")), format!("burst-{i}")))
                    .collect();
                send_all(&forward, envelopes).await;
                sent += 200;
            }
            sent
        })
    };
    // Close both nodes' connections from the server side, mid-stream.
    for pid in &pids {
        rabbitmqctl(&["close_connection", pid, "test: forced close"]).await;
    }
    closed.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.await.unwrap().expect("every send confirmed");
    let bursts_sent = burst.await.expect("every burst send confirmed");
    while got.len() < N + bursts_sent {
        got.push(b.recv().await.payload_text().unwrap().to_owned());
    }

    let (bursts, got): (Vec<String>, Vec<String>) =
        got.into_iter().partition(|text| text.starts_with("burst-"));
    let expected_bursts: Vec<String> = (0..bursts_sent).map(|i| format!("burst-{i}")).collect();
    assert_eq!(
        bursts, expected_bursts,
        "the burst: nothing lost, duplicated or reordered"
    );
    assert_eq!(got, numbered(N), "nothing lost, duplicated or reordered");
    assert!(broker_a.reconnections() >= 1, "a reconnected");
    assert!(broker_b.reconnections() >= 1, "b reconnected");
    // Nothing more is waiting: a marker comes next.
    let marker = text("a", Target::Node(node_id("b")), "end");
    let id = marker.id;
    send_all(&forward, vec![marker]).await;
    assert!(b.recv_until(id).await.is_empty());
    eprintln!("across the close: {:?}", b.stats.get());
    b.leave().await;
    cluster.clean_up().await;
}

#[derive(Clone)]
struct RetryTransient(usize);

impl tower::retry::Policy<Envelope, (), BoxError> for RetryTransient {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut Envelope,
        result: &mut Result<(), BoxError>,
    ) -> Option<Self::Future> {
        let transient = match result {
            Ok(()) => false,
            Err(e) => {
                e.is::<tower::timeout::error::Elapsed>()
                    || e.downcast_ref::<ForwardError>()
                        .is_some_and(ForwardError::is_transient)
            }
        };
        (transient && self.0 > 0).then(|| {
            self.0 -= 1;
            std::future::ready(())
        })
    }

    fn clone_request(&mut self, request: &Envelope) -> Option<Envelope> {
        Some(request.clone())
    }
}

#[tokio::test]
async fn the_service_composes_with_timeout_and_retry() {
    let cluster = Cluster::new("stack");
    let broker_a = cluster.broker("a").await;
    let mut b = start_node(cluster.broker("b").await, "b").await;
    let stack = ServiceBuilder::new()
        .retry(RetryTransient(3))
        .timeout(Duration::from_secs(5))
        .service(Forward::new(broker_a));

    let envelopes: Vec<Envelope> = (0..200)
        .map(|i| text("a", Target::Node(node_id("b")), i.to_string()))
        .collect();
    stack
        .clone()
        .call_all(stream::iter(envelopes))
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..200 {
        got.push(b.recv().await.payload_text().unwrap().to_owned());
    }
    assert_eq!(got, numbered(200));

    // A definite failure is not retried and comes out typed through the stack.
    let err = stack
        .oneshot(text("a", Target::Node(node_id("ghost")), "x"))
        .await
        .unwrap_err();
    let err = err.downcast::<ForwardError>().expect("a ForwardError");
    assert!(matches!(*err, ForwardError::Unroutable { .. }));
    b.leave().await;
    cluster.clean_up().await;
}

#[tokio::test]
async fn a_wrong_url_is_a_clear_error() {
    let prefix = Cluster::new("url").prefix;
    let unreachable: AmqpUrl = "amqp://guest:s3cret@127.0.0.1:1/%2f".parse().unwrap();
    let err = RabbitBroker::connect(&unreachable, &prefix, RabbitConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable { .. }));
    let source = std::error::Error::source(&err).unwrap();
    let message = source.to_string();
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(!message.contains("s3cret"), "{message}");
    assert!(source.downcast_ref::<RabbitError>().is_some());

    let mut wrong_password = url().to_connection_string();
    wrong_password = wrong_password.replacen(":guest@", ":not-the-password@", 1);
    let wrong: AmqpUrl = wrong_password.parse().unwrap();
    let err = RabbitBroker::connect(&wrong, &prefix, RabbitConfig::default())
        .await
        .unwrap_err();
    let message = std::error::Error::source(&err).unwrap().to_string();
    assert!(!message.contains("not-the-password"), "{message}");
}

/// `connect_any` (and `connect` with fallback addresses) connects to the first address that
/// answers, skipping those that do not;
/// an empty list is an error of its own, and when none answers the error is the last one's.
#[tokio::test]
async fn connect_any_takes_the_first_address_that_answers() {
    let cluster = Cluster::new("any");
    let unreachable: AmqpUrl = "amqp://guest:s3cret@127.0.0.1:1/%2f".parse().unwrap();
    let broker = RabbitBroker::connect_any(
        &[unreachable.clone(), url()],
        &cluster.prefix,
        RabbitConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(broker.connected_url(), url().to_string());
    assert!(broker.is_connected());
    broker.close().await;

    // The configuration's fallback addresses come after the one given to `connect`.
    let config = RabbitConfig {
        fallback_urls: vec![url()],
        ..RabbitConfig::default()
    };
    let broker = RabbitBroker::connect(&unreachable, &cluster.prefix, config)
        .await
        .unwrap();
    assert_eq!(broker.connected_url(), url().to_string());
    broker.close().await;

    let err = RabbitBroker::connect_any(&[], &cluster.prefix, RabbitConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(
        std::error::Error::source(&err).and_then(|s| s.downcast_ref::<RabbitError>()),
        Some(RabbitError::NoAddress)
    ));

    let other: AmqpUrl = "amqp://guest:s3cret@127.0.0.1:2/%2f".parse().unwrap();
    let err = RabbitBroker::connect_any(
        &[unreachable, other],
        &cluster.prefix,
        RabbitConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable { .. }));
    let message = std::error::Error::source(&err).unwrap().to_string();
    assert!(message.contains("127.0.0.1:2"), "{message}");
    assert!(!message.contains("s3cret"), "{message}");
    cluster.clean_up().await;
}

#[tokio::test]
async fn a_busy_destination_gets_batches_in_order_and_exactly_once() {
    let cluster = Cluster::new("batch");
    let (broker_a, broker_b) = (cluster.broker("a").await, cluster.broker("b").await);
    let mut b = start_node(broker_b, "b").await;
    let forward = Forward::new(Arc::clone(&broker_a));

    // A burst to b, with broadcasts in between: batches group runs for one key only, so b's
    // queue still receives everything in the order it was sent.
    let envelopes: Vec<Envelope> = (0..3000)
        .map(|i| {
            let target = if i % 500 == 499 {
                Target::Broadcast
            } else {
                Target::Node(node_id("b"))
            };
            text("a", target, i.to_string())
        })
        .collect();
    send_all(&forward, envelopes).await;
    let mut got = Vec::new();
    for _ in 0..3000 {
        got.push(b.recv().await.payload_text().unwrap().to_owned());
    }
    assert_eq!(got, numbered(3000));
    assert!(
        broker_a.batched_messages() > 0,
        "a burst of 3000 made no batch"
    );
    let stats = b.stats.get();
    assert_eq!(
        (stats.handled, stats.duplicates, stats.dead_lettered),
        (3000, 0, 0)
    );
    // Every batch was acknowledged once all its messages were: b's queue empties. (RabbitMQ
    // counts no event for it: ask it, a bounded number of times.)
    let queue = broker_a.queue_name(&node_id("b"));
    let mut left = String::new();
    for _ in 0..50 {
        let out = rabbitmqctl(&[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages",
        ])
        .await;
        left = out
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{queue}\t")).map(str::to_owned))
            .unwrap_or_default();
        if left.trim() == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        left.trim(),
        "0",
        "messages left in b's queue (ready or unacknowledged)"
    );
    b.leave().await;
    cluster.clean_up().await;
}

/// Messages in `node`'s queue, read with a passive declaration.
async fn queue_depth(cluster: &Cluster, node: &str) -> u32 {
    let connection = raw_connection().await;
    let channel = connection.create_channel().await.unwrap();
    let queue = channel
        .queue_declare(
            format!("{}:node:{node}", cluster.prefix).into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let depth = queue.message_count();
    let _ = connection.close(200, "OK".into()).await;
    depth
}

#[tokio::test]
async fn a_returned_message_fails_its_own_publish_and_no_other() {
    let cluster = Cluster::new("returns");
    let broker = cluster.broker("a").await;
    let b = node_id("b");
    broker.declare_queue(&b, &queue_options()).await.unwrap();
    broker.bind(&b, &RoutingKey::Node(b.clone())).await.unwrap();
    let bound = RoutingKey::Node(b.clone());
    let unbound = RoutingKey::Node(node_id("nobody"));
    let message = |i: usize| {
        Envelope::text(node_id("a"), Target::Node(b.clone()), i.to_string())
            .to_message()
            .unwrap()
    };

    // Thousands in flight at once, alternating a bound and an unbound key, none awaited
    // before all are sent: confirmations come back in multiple acks, returns among them.
    const COUNT: usize = 4_000;
    let publishes: Vec<_> = (0..COUNT)
        .map(|i| broker.publish(if i % 2 == 0 { &bound } else { &unbound }, message(i)))
        .collect();
    let results = futures_util::future::join_all(publishes).await;
    let mut ok = 0;
    for (i, result) in results.iter().enumerate() {
        if i % 2 == 0 {
            assert!(result.is_ok(), "publish {i} to a bound key: {result:?}");
            ok += 1;
        } else {
            assert!(
                matches!(
                    result,
                    Err(hybrid_cluster_core::PublishError::Unroutable { .. })
                ),
                "publish {i} to an unbound key: {result:?}"
            );
        }
    }
    assert_eq!(queue_depth(&cluster, "b").await as usize, ok);

    // Runs for one key travel as batches: a returned batch fails its own messages only.
    let publishes: Vec<_> = (0..COUNT)
        .map(|i| broker.publish(if (i / 5) % 2 == 0 { &bound } else { &unbound }, message(i)))
        .collect();
    let results = futures_util::future::join_all(publishes).await;
    for (i, result) in results.iter().enumerate() {
        let expected_ok = (i / 5) % 2 == 0;
        assert_eq!(result.is_ok(), expected_ok, "publish {i}: {result:?}");
    }

    broker.delete_queue(&b).await.unwrap();
    cluster.clean_up().await;
}

#[tokio::test]
async fn a_dropped_publish_is_still_sent() {
    let cluster = Cluster::new("dropped");
    let broker = cluster.broker("a").await;
    let mut b = start_node(broker.clone(), "b").await;
    let key = RoutingKey::Node(node_id("b"));
    for i in 0..100 {
        let message = Envelope::text(node_id("a"), Target::Node(node_id("b")), i.to_string());
        drop(broker.publish(&key, message.to_message().unwrap()));
    }
    // One awaited after them: the dropped ones went before it, in order.
    let last = Envelope::text(node_id("a"), Target::Node(node_id("b")), "100");
    broker
        .publish(&key, last.to_message().unwrap())
        .await
        .unwrap();
    for i in 0..=100 {
        let envelope = tokio::time::timeout(WAIT, b.inbox.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(envelope.payload_text(), Some(i.to_string().as_str()));
    }
    b.leave().await;
    cluster.clean_up().await;
}

/// A broker for node `node` whose connections go through `proxy`.
async fn broker_through(cluster: &Cluster, node: &str, proxy: &Proxy) -> Arc<RabbitBroker> {
    let direct = url();
    let vhost = if direct.vhost() == "/" {
        "%2f".to_owned()
    } else {
        direct.vhost().to_owned()
    };
    let proxied: AmqpUrl = format!(
        "amqp://{}:{}@{}/{vhost}",
        direct.username(),
        direct.password(),
        proxy.addr
    )
    .parse()
    .unwrap();
    let config = RabbitConfig {
        connection_name: Some(cluster.connection_name(node)),
        dead_letter_expires: Some(Duration::from_secs(60)),
        ..RabbitConfig::default()
    };
    Arc::new(
        RabbitBroker::connect(&proxied, &cluster.prefix, config)
            .await
            .unwrap(),
    )
}

/// A sender cut off from RabbitMQ for two seconds, mid-stream, sends again what was not
/// confirmed; meanwhile two other senders keep the receiver's queue busy (40,000 messages a
/// second), so that resent copies arrive some 100,000 messages after the first ones; and
/// copies of its first 500 messages are sent again at the end, as a late resend would be.
/// The receiver hands every message over exactly once (the old dedupe, a count of 16,384
/// ids, let such late copies through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_after_a_long_cut_are_dropped_at_full_rate() {
    let cluster = Cluster::new("resends");
    let mut b = start_node(cluster.broker("b").await, "b").await;
    let server = tokio::net::lookup_host((url().host().to_owned(), url().port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = Proxy::start(server).await.unwrap();
    let cut_off = Forward::new(broker_through(&cluster, "a", &proxy).await);
    let busy: Vec<Forward<RabbitBroker>> = vec![
        Forward::new(cluster.broker("c").await),
        Forward::new(cluster.broker("d").await),
    ];

    // The cut-off sender: a steady stream, many in flight, across the cut.
    const CUT_OFF: usize = 4_000;
    const RESENT: usize = 500;
    let envelopes: Vec<Envelope> = (0..CUT_OFF)
        .map(|i| text("a", Target::Node(node_id("b")), format!("a-{i}")))
        .collect();
    let first_ids: Vec<MessageId> = envelopes.iter().take(RESENT).map(|e| e.id).collect();
    // The cut comes when a quarter of the stream is sent, whatever the machine's speed: the
    // sender waits for it there, with its messages still in flight, then sends the rest.
    let (at_cut, reached_cut) = tokio::sync::oneshot::channel::<()>();
    let (cut_made, mut wait_for_cut) = tokio::sync::oneshot::channel::<()>();
    let cutting = {
        let mut forward = cut_off.clone();
        tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            let mut failed = 0;
            let mut at_cut = Some(at_cut);
            for (n, envelope) in envelopes.into_iter().enumerate() {
                if n == CUT_OFF / 4
                    && let Some(at_cut) = at_cut.take()
                {
                    let _ = at_cut.send(());
                    let _ = (&mut wait_for_cut).await;
                }
                // Confirmations are taken while waiting for a place: they give places back.
                loop {
                    tokio::select! {
                        biased;
                        Some(sent) = in_flight.next(), if !in_flight.is_empty() => {
                            let sent: Result<(), ForwardError> = sent;
                            failed += usize::from(sent.is_err());
                        }
                        ready = forward.ready() => {
                            in_flight.push(ready.unwrap().call(envelope));
                            break;
                        }
                    }
                }
            }
            while let Some(sent) = in_flight.next().await {
                failed += usize::from(sent.is_err());
            }
            failed
        })
    };
    // The busy senders: 20,000 messages a second each until the cut-off sender is done, so
    // that some 100,000 messages pass while it is cut off.
    let flooding: Vec<_> = busy
        .into_iter()
        .enumerate()
        .map(|(n, forward)| {
            let done = cutting.abort_handle();
            tokio::spawn(async move {
                let mut sent = 0;
                let mut pace = tokio::time::interval(Duration::from_millis(25));
                while !done.is_finished() {
                    pace.tick().await;
                    let envelopes = (sent..sent + 500)
                        .map(|i| text("c", Target::Node(node_id("b")), format!("busy{n}-{i}")))
                        .collect();
                    send_all(&forward, envelopes).await;
                    sent += 500;
                }
                sent
            })
        })
        .collect();
    // Cut once the stream is well on its way.
    let mut received: Vec<String> = Vec::new();
    reached_cut.await.unwrap();
    proxy.cut(Duration::from_secs(2));
    cut_made.send(()).unwrap();
    let failed = cutting.await.unwrap();
    assert_eq!(
        failed, 0,
        "every send of the cut-off sender confirmed in the end"
    );
    assert!(cut_off.broker().reconnections() >= 1, "it was cut off");
    // Copies of the cut-off sender's first messages, sent again now as a resend would be,
    // long after them: some 100,000 messages passed since.
    let resent: Vec<Envelope> = (0..RESENT)
        .map(|i| {
            let mut copy = text("a", Target::Node(node_id("b")), format!("a-{i}"));
            copy.id = first_ids[i];
            copy
        })
        .collect();
    send_all(&cluster_forward_direct(&cluster).await, resent).await;
    let mut busy_sent = Vec::new();
    for flood in flooding {
        busy_sent.push(flood.await.unwrap());
    }
    let total = CUT_OFF + busy_sent.iter().sum::<usize>();
    while received.len() < total {
        received.push(b.recv().await.payload_text().unwrap().to_owned());
    }
    // Nothing more is waiting: a marker comes next.
    let marker = text("c", Target::Node(node_id("b")), "end");
    let id = marker.id;
    send_all(&cluster_forward_direct(&cluster).await, vec![marker]).await;
    let late = b.recv_until(id).await;
    assert!(late.is_empty(), "{} copies came late", late.len());
    let from_a: Vec<String> = received
        .iter()
        .filter(|t| t.starts_with("a-"))
        .cloned()
        .collect();
    let expected: Vec<String> = (0..CUT_OFF).map(|i| format!("a-{i}")).collect();
    assert_eq!(
        from_a, expected,
        "the cut-off sender's: once each, in order"
    );
    let unique: std::collections::HashSet<&String> = received.iter().collect();
    assert_eq!(unique.len(), received.len(), "no message twice");
    let stats = b.stats.get();
    eprintln!(
        "across a 2 s cut: {total} messages, {} duplicates dropped ({stats:?})",
        stats.duplicates
    );
    assert!(
        stats.duplicates >= RESENT as u64,
        "the late copies were dropped: {stats:?}"
    );
    b.leave().await;
    cluster.clean_up().await;
}

/// A forwarding service for a node of its own, on a direct connection.
async fn cluster_forward_direct(cluster: &Cluster) -> Forward<RabbitBroker> {
    Forward::new(cluster.broker("marker").await)
}

/// Every durability mode declares its queue and carries messages; `replicated` makes the node
/// queue a quorum queue.
#[tokio::test]
async fn every_durability_mode_declares_its_queue_and_carries_messages() {
    use hybrid_cluster_core::Durability;
    for durability in [
        Durability::Transient,
        Durability::Durable,
        Durability::Replicated,
    ] {
        let cluster = Cluster::new(durability.as_str());
        let broker = cluster.broker("a").await;
        let name = format!("node-{durability}");
        let options = QueueOptions {
            durability,
            ..queue_options()
        };
        let topology = NodeTopology::declare(broker.clone(), node_id(&name), &options)
            .await
            .unwrap();
        let deliveries = topology
            .consume(&ConsumeOptions { prefetch: 16 })
            .await
            .unwrap();
        let (tx, mut inbox) = mpsc::channel(16);
        let task = tokio::spawn(Receiver::new(deliveries).run(service_fn(
            move |envelope: Envelope| {
                let tx = tx.clone();
                async move { tx.send(envelope).await.map_err(BoxError::from) }
            },
        )));
        let forward = Forward::new(broker.clone());
        send_all(
            &forward,
            vec![text("a", Target::Node(node_id(&name)), durability.as_str())],
        )
        .await;
        let got = tokio::time::timeout(WAIT, inbox.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.payload_text(), Some(durability.as_str()));
        let queues = rabbitmqctl(&[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "type",
            "durable",
        ])
        .await;
        let line = queues
            .lines()
            .find(|line| line.starts_with(&broker.queue_name(&node_id(&name))))
            .unwrap_or_else(|| panic!("no queue in {queues}"));
        let expected_type = if durability == Durability::Replicated {
            "quorum"
        } else {
            "classic"
        };
        assert!(line.contains(expected_type), "{durability}: {line}");
        assert!(
            line.contains("true"),
            "{durability}: durable in every mode: {line}"
        );
        task.abort();
        topology.leave().await.unwrap();
        cluster.clean_up().await;
    }
}

/// The same for a quorum queue (`replicated`), which RabbitMQ before 3.13 refuses to delete
/// with `if-empty` (closing the connection): it is kept while a message waits, deleted once
/// empty, and the connection stays up.
#[tokio::test]
async fn a_quorum_queue_is_deleted_only_once_empty() {
    let cluster = Cluster::new("if-empty-quorum");
    let broker = cluster.broker("a").await;
    let b = node_id("b");
    let options = QueueOptions {
        durability: hybrid_cluster_core::Durability::Replicated,
        ..queue_options()
    };
    broker.declare_queue(&b, &options).await.unwrap();
    broker.bind(&b, &RoutingKey::Node(b.clone())).await.unwrap();
    let message = text("a", Target::Node(b.clone()), "waiting");
    broker
        .publish(&RoutingKey::Node(b.clone()), message.to_message().unwrap())
        .await
        .unwrap();
    assert!(
        !broker.delete_queue_if_empty(&b).await.unwrap(),
        "a message waits"
    );
    // It was unbound before its depth was read, so nothing can slip in between the count and
    // a deletion: a message sent to it now is refused to its sender, not lost.
    let late = text("a", Target::Node(b.clone()), "late");
    let refused = broker
        .publish(&RoutingKey::Node(b.clone()), late.to_message().unwrap())
        .await;
    assert!(refused.is_err(), "unroutable once unbound: {refused:?}");
    assert_eq!(queue_depth(&cluster, "b").await, 1, "still there");

    take_one(&broker, &b).await;
    // The broker knows a queue is a quorum queue from its declaration (as a node's own).
    broker.declare_queue(&b, &options).await.unwrap();
    assert!(broker.delete_queue_if_empty(&b).await.unwrap(), "empty now");
    assert_eq!(broker.reconnections(), 0, "the connection stayed up");
    cluster.clean_up().await;
}

/// Consumes `node`'s queue for one message and acknowledges it, then stops consuming.
async fn take_one(broker: &RabbitBroker, node: &NodeId) {
    let mut deliveries = broker
        .consume(node, &ConsumeOptions { prefetch: 1 })
        .await
        .unwrap();
    let delivery = tokio::time::timeout(WAIT, deliveries.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    delivery.acker.ack().await.unwrap();
}

/// A queue holding messages is not deleted by `delete_queue_if_empty` (a node leaving lets a
/// peer take over what it holds); once empty, it is.
#[tokio::test]
async fn a_queue_is_deleted_only_once_empty() {
    let cluster = Cluster::new("if-empty");
    let broker = cluster.broker("a").await;
    let b = node_id("b");
    broker.declare_queue(&b, &queue_options()).await.unwrap();
    broker.bind(&b, &RoutingKey::Node(b.clone())).await.unwrap();
    let message = text("a", Target::Node(b.clone()), "waiting");
    broker
        .publish(&RoutingKey::Node(b.clone()), message.to_message().unwrap())
        .await
        .unwrap();
    assert!(
        !broker.delete_queue_if_empty(&b).await.unwrap(),
        "a message waits"
    );
    assert_eq!(
        queue_depth(&cluster, "b").await,
        1,
        "the queue and its message are still there"
    );

    take_one(&broker, &b).await;
    assert!(broker.delete_queue_if_empty(&b).await.unwrap(), "empty now");
    cluster.clean_up().await;
}
