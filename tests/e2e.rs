//! End to end: several nodes started in this process, each serving [`server::router`] on a
//! loopback port, against the real Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`) and
//! the real RabbitMQ (`AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`), with real
//! WebSocket clients speaking the demo protocol.
//!
//! Every test runs its own cluster under a random prefix (so tests run in parallel, with each
//! other and with the other test binaries), waits on events with bounded timeouts, never on
//! the clock, and leaves nothing behind: its nodes shut down (which must remove their Redis
//! records and their queues, and the tests check it), then the cluster's exchanges and
//! dead-letter queue are deleted, even when the test fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hybrid_cluster::discovery::{DiscoveryConfig, RedisOptions, RedisRegistry};
use hybrid_cluster::routing::EnvelopeCodec;
use hybrid_cluster::server::{self, ServerConfig};
use hybrid_cluster::{
    AmqpUrl, Backends, Cluster, ClusterConfig, ClusterPrefix, ConnectionId, GroupKeys, NodeId,
    NodeInfo, NodeStatus, PlacementMode, RedisUrl, SlowClientPolicy,
};
use hybrid_cluster_test_support::placement::refused_in_band;
use hybrid_cluster_test_support::servers;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// The bound of every wait.
const WAIT: Duration = Duration::from_secs(10);
/// The heartbeat of most test nodes: a lease of 600 ms.
const FAST: Duration = Duration::from_millis(200);

fn redis_url() -> RedisUrl {
    servers::redis_url()
        .parse()
        .expect("REDIS_URL is a Redis connection string")
}

fn amqp_url() -> AmqpUrl {
    servers::amqp_url()
        .parse()
        .expect("AMQP_URL is an AMQP URL")
}

/// Logs to the test's output (`RUST_LOG` chooses; by default warnings, less lapin's error on
/// the passive declaration that checks a queue is gone).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin::channel=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"))
}

// ---------------------------------------------------------------------------------------------
// Nodes

/// One test's cluster: its prefix, and the nodes started under it (to clean up after them).
struct TestCluster {
    test: String,
    prefix: ClusterPrefix,
    nodes: Mutex<Vec<NodeId>>,
}

/// A node started by a test: its cluster and its server.
struct Node {
    cluster: Cluster,
    port: u16,
    server: JoinHandle<()>,
}

impl Node {
    fn id(&self) -> &NodeId {
        self.cluster.node_id()
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// Waits until this node sees exactly `nodes`.
    async fn wait_for_members(&self, nodes: &[&Node]) {
        let mut expected: Vec<String> = nodes.iter().map(|n| n.id().to_string()).collect();
        expected.sort();
        within(
            &format!("{} sees {expected:?}", self.id()),
            self.cluster
                .discovery()
                .view()
                .wait_until(|members| ids(members) == expected),
        )
        .await;
    }

    /// Shuts the node down gracefully and stops its server.
    async fn shutdown(self) {
        within("a node shuts down", self.cluster.shutdown())
            .await
            .unwrap();
        self.server.abort();
    }
}

fn ids(nodes: &[std::sync::Arc<NodeInfo>]) -> Vec<String> {
    let mut ids: Vec<String> = nodes.iter().map(|n| n.node_id.to_string()).collect();
    ids.sort();
    ids
}

impl TestCluster {
    fn new(test: &str) -> Self {
        init_tracing();
        let prefix = ClusterPrefix::new(format!("e2e-{test}-{:08x}", rand::random::<u32>()))
            .expect("a valid prefix");
        Self {
            test: test.to_owned(),
            prefix,
            nodes: Mutex::new(Vec::new()),
        }
    }

    fn config(&self, name: &str, port: u16) -> ClusterConfig {
        let id = NodeId::new(format!("{}-{name}", self.test)).unwrap();
        self.nodes.lock().push(id.clone());
        let mut config = ClusterConfig::new(id, "127.0.0.1", port);
        config.prefix = self.prefix.clone();
        config.discovery = DiscoveryConfig::default().with_heartbeat(FAST);
        config
    }

    /// Starts a node named `name` (its id is `{test}-{name}`), after `configure` adjusted
    /// its configuration.
    async fn start(&self, name: &str, configure: impl FnOnce(&mut ClusterConfig)) -> Node {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut config = self.config(name, port);
        configure(&mut config);
        serve(listener, config).await
    }

    /// Starts a node on a runtime of its own, which the test can shut down to kill it as a
    /// crash would: every task of the node stops at once, its sockets close, and it says no
    /// goodbye to anyone.
    async fn start_killable(&self, name: &str, runtime: &tokio::runtime::Runtime) -> Node {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = self.config(name, port);
        runtime
            .spawn(async move { serve(TcpListener::from_std(listener).unwrap(), config).await })
            .await
            .unwrap()
    }

    /// Redis keys of this cluster.
    async fn redis_keys(&self) -> Vec<String> {
        let registry = RedisRegistry::connect(&redis_url(), &self.prefix, RedisOptions::default())
            .await
            .unwrap();
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{{{}}}*", self.prefix))
            .query_async(&mut registry.connection())
            .await
            .unwrap();
        keys.sort();
        keys
    }

    /// Whether RabbitMQ has `node`'s queue.
    async fn has_queue(&self, node: &NodeId) -> bool {
        let connection = amqp_connection().await;
        let channel = connection.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let found = channel
            .queue_declare(
                format!("{}:node:{node}", self.prefix).into(),
                passive,
                FieldTable::default(),
            )
            .await
            .is_ok();
        let _ = connection.close(200, "OK".into()).await;
        found
    }

    /// Checks that the nodes that shut down left nothing: no Redis key of this cluster, no
    /// queue of theirs. (`crashed` nodes are expected to leave their queue, which expires.)
    async fn assert_left_nothing(&self, crashed: &[&NodeId]) {
        let keys = self.redis_keys().await;
        let stale_index: Vec<String> = crashed.iter().map(|_| self.index_key()).collect();
        assert!(
            keys.is_empty() || keys == stale_index,
            "Redis keys left behind: {keys:?}"
        );
        let nodes = self.nodes.lock().clone();
        for node in nodes.iter().filter(|n| !crashed.contains(n)) {
            assert!(!self.has_queue(node).await, "the queue of {node} is left");
        }
    }

    /// The (queue, routing key) bindings of this cluster's exchange for groups, from
    /// RabbitMQ itself.
    async fn group_bindings(&self) -> Vec<(String, String)> {
        hybrid_cluster_test_support::rabbitmq::bindings()
            .await
            .unwrap()
            .into_iter()
            .filter(|b| b.source == self.prefix.as_str() && b.routing_key.starts_with("group"))
            .map(|b| (b.destination, b.routing_key))
            .collect()
    }

    fn index_key(&self) -> String {
        format!("{{{}}}:nodes", self.prefix)
    }
}

impl Drop for TestCluster {
    /// Deletes whatever the cluster may have left: the exchanges and the dead-letter queue
    /// (which no node deletes), the nodes' queues and Redis keys (when the test failed before
    /// shutting them down, or killed one).
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        let nodes = std::mem::take(&mut *self.nodes.lock());
        let nodes: Vec<String> = nodes.iter().map(ToString::to_string).collect();
        let cleaning = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(servers::remove_cluster(prefix.as_str(), &nodes));
        });
        if cleaning.join().is_err() && !std::thread::panicking() {
            panic!("cleaning up the test's cluster failed");
        }
    }
}

async fn amqp_connection() -> lapin::Connection {
    lapin::Connection::connect(
        &amqp_url().to_connection_string(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("RabbitMQ is running (./scripts/test.sh starts it)")
}

/// A runtime of its own for a node to be killed; shut down (never dropped in async code).
struct Killable(Option<tokio::runtime::Runtime>);

impl Killable {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Self(Some(runtime))
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().unwrap()
    }

    /// Stops every task of the runtime at once.
    fn kill(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the cluster of `config` and serves its node server on `listener`.
async fn serve(listener: TcpListener, config: ClusterConfig) -> Node {
    let port = config.port;
    let backends = Backends::servers(redis_url(), amqp_url());
    let cluster = Cluster::start(config, backends)
        .await
        .expect("Redis and RabbitMQ are running (./scripts/test.sh starts them)");
    let app = server::router(cluster.clone(), ServerConfig::default());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Node {
        cluster,
        port,
        server,
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client of the demo protocol.
struct Client {
    ws: Socket,
    id: String,
    node: String,
}

impl Client {
    /// Connects to `node` and reads its welcome.
    async fn connect(node: &Node) -> Self {
        Self::connect_url(&node.ws_url()).await
    }

    async fn connect_url(url: &str) -> Self {
        let (ws, response) = within("the upgrade", connect_async(url))
            .await
            .unwrap_or_else(|error| panic!("connecting to {url}: {error}"));
        assert_eq!(response.status(), 101);
        Self::welcomed(ws).await
    }

    /// Connects with a receive buffer of a few KiB, so that a client that does not read
    /// stalls its node's writes soon.
    async fn connect_with_small_buffer(node: &Node) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket
            .connect(([127, 0, 0, 1], node.port).into())
            .await
            .unwrap();
        let (ws, _) = within(
            "the upgrade",
            tokio_tungstenite::client_async(node.ws_url(), MaybeTlsStream::Plain(stream)),
        )
        .await
        .unwrap();
        Self::welcomed(ws).await
    }

    async fn welcomed(ws: Socket) -> Self {
        let mut client = Self {
            ws,
            id: String::new(),
            node: String::new(),
        };
        let welcome = client.next_json().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        client.id = welcome["connection_id"].as_str().unwrap().to_owned();
        client.node = welcome["node_id"].as_str().unwrap().to_owned();
        client
    }

    fn connection_id(&self) -> ConnectionId {
        self.id.parse().unwrap()
    }

    async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        within("a frame is sent", self.ws.send(Message::text(text)))
            .await
            .unwrap();
    }

    async fn send(&mut self, op: Value) {
        self.send_text(op.to_string()).await;
    }

    /// The next frame that is not a ping or a pong (`None` once the stream ended).
    async fn next_frame(&mut self) -> Option<Message> {
        loop {
            match within("a frame arrives", self.ws.next()).await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(message)) => return Some(message),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next text frame, as it was sent.
    async fn next_text(&mut self) -> String {
        match self.next_frame().await {
            Some(Message::Text(text)) => text.as_str().to_owned(),
            other => panic!("{}: expected a text frame, got {other:?}", self.id),
        }
    }

    async fn next_json(&mut self) -> Value {
        let text = self.next_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// The next frame that is not an ack; acks met on the way are returned too.
    async fn next_not_ack(&mut self) -> (Value, Vec<Value>) {
        let mut acks = Vec::new();
        loop {
            let frame = self.next_json().await;
            if frame["type"] == "ack" {
                acks.push(frame["id"].clone());
            } else {
                return (frame, acks);
            }
        }
    }

    /// The close frame the server sends next (text frames before it are returned).
    async fn until_close(&mut self) -> (Vec<Value>, Option<CloseFrame>) {
        let mut before = Vec::new();
        loop {
            match self.next_frame().await {
                Some(Message::Text(text)) => before.push(serde_json::from_str(&text).unwrap()),
                Some(Message::Close(frame)) => return (before, frame),
                Some(other) => panic!("unexpected frame {other:?}"),
                None => panic!("{}: the stream ended without a close frame", self.id),
            }
        }
    }
}

/// What a WebSocket upgrade to `url` was answered, when it was not a 101.
async fn refused_upgrade(url: &str) -> http::Response<Option<Vec<u8>>> {
    match within("the upgrade is answered", connect_async(url)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => *response,
        Err(error) => panic!("{url}: expected an HTTP answer, got {error}"),
        Ok((_, response)) => panic!("{url}: expected a refusal, got {}", response.status()),
    }
}

/// A plain HTTP/1.1 GET: the status and the body.
async fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    within("the HTTP response", stream.read_to_end(&mut response))
        .await
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicast_between_clients_on_different_nodes() {
    let tc = TestCluster::new("unicast");
    let a = tc.start("a", |_| {}).await;
    let b = tc.start("b", |_| {}).await;
    a.wait_for_members(&[&a, &b]).await;
    b.wait_for_members(&[&a, &b]).await;

    let mut alice = Client::connect(&a).await;
    let mut bob = Client::connect(&b).await;
    assert_eq!(alice.node, a.id().as_str());
    assert_eq!(bob.node, b.id().as_str());

    // `data` travels as the sender wrote it, spaces and `2.50` included.
    alice
        .send_text(format!(
            r#"{{"op":"send","to":"{}","data":{{"b": [1, 2.50]}},"id":1}}"#,
            bob.id
        ))
        .await;
    assert_eq!(
        bob.next_text().await,
        format!(
            r#"{{"type":"message","from":"{}","data":{{"b": [1, 2.50]}}}}"#,
            alice.id
        )
    );
    assert_eq!(alice.next_json().await, json!({"type": "ack", "id": 1}));

    // And back, with a correlation id of another JSON type.
    bob.send(json!({"op": "send", "to": alice.id, "data": "hi", "id": "x"}))
        .await;
    assert_eq!(
        alice.next_json().await,
        json!({"type": "message", "from": bob.id, "data": "hi"})
    );
    assert_eq!(bob.next_json().await, json!({"type": "ack", "id": "x"}));

    // A send from the node's own handle has no sender.
    b.cluster
        .handle()
        .send(&alice.connection_id(), r#"{"from":"the node"}"#)
        .await
        .unwrap();
    assert_eq!(
        alice.next_json().await,
        json!({"type": "message", "from": null, "data": {"from": "the node"}})
    );

    a.shutdown().await;
    b.shutdown().await;
    tc.assert_left_nothing(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_client_on_three_nodes_exactly_once() {
    let tc = TestCluster::new("broadcast");
    let a = tc.start("a", |_| {}).await;
    let b = tc.start("b", |_| {}).await;
    let c = tc.start("c", |_| {}).await;
    for node in [&a, &b, &c] {
        node.wait_for_members(&[&a, &b, &c]).await;
    }
    let mut clients = Vec::new();
    for node in [&a, &b, &c] {
        clients.push(Client::connect(node).await);
        clients.push(Client::connect(node).await);
    }
    let sender = clients[0].id.clone();

    clients[0]
        .send(json!({"op": "broadcast", "data": {"n": 1}, "id": 1}))
        .await;
    clients[0]
        .send(json!({"op": "broadcast", "data": {"n": 2}, "id": 2}))
        .await;

    // Each client, the sender included, gets the first broadcast, then the second one: a
    // duplicate of the first would arrive between them (one publisher, one order).
    for (i, client) in clients.iter_mut().enumerate() {
        let mut acks = Vec::new();
        for n in [1, 2] {
            let (frame, seen) = client.next_not_ack().await;
            acks.extend(seen);
            assert_eq!(
                frame,
                json!({"type": "broadcast", "from": sender, "data": {"n": n}}),
                "client {i} on {}",
                client.node
            );
        }
        if i == 0 {
            while acks.len() < 2 {
                let ack = client.next_json().await;
                assert_eq!(ack["type"], "ack", "{ack}");
                acks.push(ack["id"].clone());
            }
            assert_eq!(acks, vec![json!(1), json!(2)]);
        } else {
            assert!(acks.is_empty(), "client {i} got acks of others: {acks:?}");
        }
    }

    // Nothing else came: the next frame every client gets is a unicast marker.
    for (i, client) in clients.iter_mut().enumerate() {
        b.cluster
            .handle()
            .send(&client.connection_id(), "\"marker\"")
            .await
            .unwrap();
        assert_eq!(
            client.next_json().await,
            json!({"type": "message", "from": null, "data": "marker"}),
            "client {i}"
        );
    }

    for node in [a, b, c] {
        node.shutdown().await;
    }
    tc.assert_left_nothing(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_reaches_only_its_members_on_several_nodes() {
    let tc = TestCluster::new("group");
    let a = tc.start("a", |_| {}).await;
    let b = tc.start("b", |_| {}).await;
    let c = tc.start("c", |_| {}).await;
    for node in [&a, &b, &c] {
        node.wait_for_members(&[&a, &b, &c]).await;
    }
    let mut a1 = Client::connect(&a).await; // member
    let mut a2 = Client::connect(&a).await; // not a member, beside one
    let mut b1 = Client::connect(&b).await; // member
    let mut c1 = Client::connect(&c).await; // not a member, on a node without members

    for member in [&mut a1, &mut b1] {
        member
            .send(json!({"op": "join", "group": "g", "id": 1}))
            .await;
        assert_eq!(
            member.next_json().await,
            json!({"type": "joined", "group": "g"})
        );
        assert_eq!(member.next_json().await, json!({"type": "ack", "id": 1}));
    }
    assert_eq!(a.cluster.handle().local_members(&"g".parse().unwrap()), 1);

    // Then a broadcast marker: whoever was not sent the group message gets the marker next.
    async fn marker(from: &mut Client, n: u32) {
        from.send(json!({"op": "broadcast", "data": {"marker": n}}))
            .await;
    }
    let group = |from: &Client, data: &str| json!({"type": "group", "group": "g", "from": from.id, "data": data});
    let broadcast = |from: &Client, n: u32| json!({"type": "broadcast", "from": from.id, "data": {"marker": n}});

    // A non-member sends to the group.
    c1.send(json!({"op": "group", "group": "g", "data": "from c1", "id": 2}))
        .await;
    assert_eq!(c1.next_json().await, json!({"type": "ack", "id": 2}));
    marker(&mut c1, 1).await;
    let expected = group(&c1, "from c1");
    assert_eq!(a1.next_json().await, expected);
    assert_eq!(b1.next_json().await, expected);
    let expected = broadcast(&c1, 1);
    for client in [&mut a1, &mut a2, &mut b1, &mut c1] {
        assert_eq!(client.next_json().await, expected, "{}", client.id);
    }

    // A member sends: every member gets it, itself included, and nobody else.
    b1.send(json!({"op": "group", "group": "g", "data": "from b1", "id": 3}))
        .await;
    let expected = group(&b1, "from b1");
    let (frame, mut acks) = b1.next_not_ack().await;
    assert_eq!(frame, expected);
    if acks.is_empty() {
        acks.push(b1.next_json().await["id"].clone());
    }
    assert_eq!(acks, vec![json!(3)]);
    marker(&mut b1, 2).await;
    assert_eq!(a1.next_json().await, expected);
    let expected = broadcast(&b1, 2);
    for client in [&mut a1, &mut a2, &mut b1, &mut c1] {
        assert_eq!(client.next_json().await, expected, "{}", client.id);
    }

    // A member that left gets nothing more.
    a1.send(json!({"op": "leave", "group": "g"})).await;
    assert_eq!(a1.next_json().await, json!({"type": "left", "group": "g"}));
    c1.send(json!({"op": "group", "group": "g", "data": "after a1 left"}))
        .await;
    marker(&mut c1, 3).await;
    assert_eq!(b1.next_json().await, group(&c1, "after a1 left"));
    let expected = broadcast(&c1, 3);
    for client in [&mut a1, &mut a2, &mut b1, &mut c1] {
        assert_eq!(client.next_json().await, expected, "{}", client.id);
    }

    for node in [a, b, c] {
        node.shutdown().await;
    }
    tc.assert_left_nothing(&[]).await;
}

/// With every group in one bucket, a node bound for one group receives the messages of
/// another: it must hand them to nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_group_buckets_a_group_still_reaches_only_its_members() {
    let tc = TestCluster::new("buckets");
    let one_bucket = |config: &mut ClusterConfig| {
        config.group_keys = GroupKeys::Buckets(std::num::NonZeroU32::MIN);
    };
    let a = tc.start("a", one_bucket).await;
    let b = tc.start("b", one_bucket).await;
    let c = tc.start("c", one_bucket).await;
    for node in [&a, &b, &c] {
        node.wait_for_members(&[&a, &b, &c]).await;
    }
    let mut a1 = Client::connect(&a).await; // in g
    let mut b1 = Client::connect(&b).await; // in h: b is bound to the bucket g shares
    let mut b2 = Client::connect(&b).await; // in g too
    let mut c1 = Client::connect(&c).await; // in nothing
    for (member, group) in [(&mut a1, "g"), (&mut b1, "h"), (&mut b2, "g")] {
        member
            .send(json!({"op": "join", "group": group, "id": 1}))
            .await;
        assert_eq!(
            member.next_json().await,
            json!({"type": "joined", "group": group})
        );
        assert_eq!(member.next_json().await, json!({"type": "ack", "id": 1}));
    }
    // In RabbitMQ, the group keys are the bucket's: a and b bound to it, c (no member) not,
    // and no per-group key anywhere.
    let mut group_bindings = tc.group_bindings().await;
    group_bindings.sort();
    assert_eq!(
        group_bindings,
        [
            (
                format!("{}:node:buckets-a", tc.prefix),
                "group-bucket.0".to_owned()
            ),
            (
                format!("{}:node:buckets-b", tc.prefix),
                "group-bucket.0".to_owned()
            ),
        ]
    );
    let to_g = |from: &Client, data: &str| json!({"type": "group", "group": "g", "from": from.id, "data": data});
    let marker = |from: &Client, n: u32| json!({"type": "broadcast", "from": from.id, "data": {"marker": n}});

    c1.send(json!({"op": "group", "group": "g", "data": "for g", "id": 2}))
        .await;
    assert_eq!(c1.next_json().await, json!({"type": "ack", "id": 2}));
    c1.send(json!({"op": "broadcast", "data": {"marker": 1}}))
        .await;
    assert_eq!(a1.next_json().await, to_g(&c1, "for g"));
    assert_eq!(b2.next_json().await, to_g(&c1, "for g"));
    let expected = marker(&c1, 1);
    for client in [&mut a1, &mut b1, &mut b2, &mut c1] {
        assert_eq!(client.next_json().await, expected, "{}", client.id);
    }

    // g's only member on a leaves: a is no longer bound, g still reaches b2.
    a1.send(json!({"op": "leave", "group": "g"})).await;
    assert_eq!(a1.next_json().await, json!({"type": "left", "group": "g"}));
    c1.send(json!({"op": "group", "group": "g", "data": "after a1 left"}))
        .await;
    c1.send(json!({"op": "broadcast", "data": {"marker": 2}}))
        .await;
    assert_eq!(b2.next_json().await, to_g(&c1, "after a1 left"));
    let expected = marker(&c1, 2);
    for client in [&mut a1, &mut b1, &mut b2, &mut c1] {
        assert_eq!(client.next_json().await, expected, "{}", client.id);
    }

    for node in [a, b, c] {
        node.shutdown().await;
    }
    tc.assert_left_nothing(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_the_limit_is_redirected_and_refused_when_all_are_full() {
    let tc = TestCluster::new("redirect");
    // The HTTP answers of the redirect mode (the in-band one is tested below).
    let redirect_mode = |config: &mut ClusterConfig| {
        config.max_connections = 1;
        config.placement_mode = PlacementMode::Redirect;
    };
    let a = tc.start("a", redirect_mode).await;
    let b = tc.start("b", redirect_mode).await;
    a.wait_for_members(&[&a, &b]).await;
    b.wait_for_members(&[&a, &b]).await;

    let first = Client::connect(&a).await;
    assert_eq!(first.node, a.id().as_str());

    // A is full: the next client is sent to B, its query string kept.
    let response = refused_upgrade(&format!("{}?room=lobby", a.ws_url())).await;
    assert_eq!(response.status(), 307);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(location, format!("{}?room=lobby", b.ws_url()));
    let second = Client::connect_url(&location).await;
    assert_eq!(second.node, b.id().as_str());

    // Once each node knows the other is full too, nobody has room.
    for (node, other) in [(&a, &b), (&b, &a)] {
        within(
            "the other node's count is published",
            node.cluster.discovery().view().wait_until(|nodes| {
                nodes
                    .iter()
                    .any(|n| &n.node_id == other.id() && n.connection_count == 1)
            }),
        )
        .await;
    }
    for node in [&a, &b] {
        let response = refused_upgrade(&node.ws_url()).await;
        assert_eq!(response.status(), 503, "{}", node.id());
        assert_eq!(response.headers()["retry-after"], "5");
    }
    assert_eq!(a.cluster.local_connections(), 1);
    assert_eq!(b.cluster.local_connections(), 1);

    drop((first, second));
    a.shutdown().await;
    b.shutdown().await;
    tc.assert_left_nothing(&[]).await;
}

/// The default, in-band placement: a full node's new client is accepted only to be told, in a
/// frame and a close 4000, to go to the other node (query string kept); once both are full,
/// a client is told (close 4001) to come back later, and the pre-flight route says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_the_limit_is_redirected_in_band_and_told_to_wait_when_all_are_full() {
    let tc = TestCluster::new("in-band");
    let a = tc.start("a", |config| config.max_connections = 1).await;
    let b = tc.start("b", |config| config.max_connections = 1).await;
    a.wait_for_members(&[&a, &b]).await;
    b.wait_for_members(&[&a, &b]).await;

    let first = Client::connect(&a).await;
    assert_eq!(first.node, a.id().as_str());
    let to_b = format!("{}?room=lobby", b.ws_url());
    let refusal = refused_in_band(&format!("{}?room=lobby", a.ws_url()))
        .await
        .unwrap();
    let expected = json!({"type": "redirect", "url": to_b, "reason": "full"});
    assert_eq!(refusal.frame, expected);
    assert_eq!((refusal.code, &refusal.reason), (4000, &expected));
    assert_eq!(a.cluster.local_connections(), 1);
    let second = Client::connect_url(&to_b).await;
    assert_eq!(second.node, b.id().as_str());

    for (node, other) in [(&a, &b), (&b, &a)] {
        within(
            "the other node's count is published",
            node.cluster.discovery().view().wait_until(|nodes| {
                nodes
                    .iter()
                    .any(|n| &n.node_id == other.id() && n.connection_count == 1)
            }),
        )
        .await;
    }
    let unavailable = json!({"type": "unavailable", "retry_after_ms": 5000});
    for node in [&a, &b] {
        let refusal = refused_in_band(&node.ws_url()).await.unwrap();
        assert_eq!(refusal.frame, unavailable, "{}", node.id());
        assert_eq!((refusal.code, &refusal.reason), (4001, &unavailable));
        let (status, body) = http_get(node.port, "/cluster/placement").await;
        assert_eq!(status, 503, "{}", node.id());
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), unavailable);
    }
    assert_eq!(a.cluster.local_connections(), 1);
    assert_eq!(b.cluster.local_connections(), 1);

    drop((first, second));
    a.shutdown().await;
    b.shutdown().await;
    tc.assert_left_nothing(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_dropped_within_its_lease_and_sends_to_it_fail() {
    let tc = TestCluster::new("kill");
    let a = tc.start("a", |_| {}).await;
    let mut runtime = Killable::new();
    let k = tc.start_killable("k", runtime.runtime()).await;
    a.wait_for_members(&[&a, &k]).await;
    k.wait_for_members(&[&a, &k]).await;
    let k_id = k.id().clone();
    let lease = DiscoveryConfig::default().with_heartbeat(FAST).lease;

    let mut alice = Client::connect(&a).await;
    let mut kate = Client::connect(&k).await;
    alice
        .send(json!({"op": "send", "to": kate.id, "data": 1, "id": 1}))
        .await;
    assert_eq!(kate.next_json().await["data"], 1);
    assert_eq!(alice.next_json().await, json!({"type": "ack", "id": 1}));

    // Dropping the test's `Cluster` and stopping the accept loop does not stop the node:
    // the connected client's socket task holds it (as documented: "the node stops when the
    // last clone and the last connection are dropped"), so it still heartbeats and delivers.
    let Node {
        cluster, server, ..
    } = k;
    drop(cluster);
    server.abort();
    assert!(server.await.unwrap_err().is_cancelled());
    alice
        .send(json!({"op": "send", "to": kate.id, "data": 2, "id": 2}))
        .await;
    assert_eq!(kate.next_json().await["data"], 2);
    assert_eq!(alice.next_json().await, json!({"type": "ack", "id": 2}));

    // Kill it: every task of the node stops, as in a crash.
    let killed = Instant::now();
    runtime.kill();

    // Its client loses the connection without a close frame.
    assert!(
        !matches!(kate.next_frame().await, Some(Message::Close(_))),
        "a killed node sent a close frame"
    );
    // Its peers drop it within its lease.
    within(
        "the killed node expires",
        a.cluster
            .discovery()
            .view()
            .wait_until(|nodes| nodes.iter().all(|n| n.node_id != k_id)),
    )
    .await;
    let gone_after = killed.elapsed();
    assert!(
        gone_after <= lease + Duration::from_millis(400),
        "dropped {gone_after:?} after the kill, the lease is {lease:?}"
    );

    // A send to its client fails now, saying so.
    alice
        .send(json!({"op": "send", "to": kate.id, "data": 3, "id": 3}))
        .await;
    let error = alice.next_json().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["id"], 3, "{error}");
    assert_eq!(error["code"], "unreachable", "{error}");
    assert!(error["message"].as_str().unwrap().contains(k_id.as_str()));

    a.shutdown().await;
    // The killed node's id stays in the index set until someone lists the registry again.
    tc.assert_left_nothing(&[&k_id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_clients_with_1012_naming_another_node() {
    let tc = TestCluster::new("shutdown");
    // A slow heartbeat (a lease of 6 s), so that leaving "at once" cannot be expiry.
    let slow = DiscoveryConfig::default().with_heartbeat(Duration::from_secs(2));
    // A's new clients are redirected in HTTP (a draining node's in-band redirect is tested
    // on its own).
    let a = tc
        .start("a", |config| {
            config.discovery = slow.clone();
            config.placement_mode = PlacementMode::Redirect;
        })
        .await;
    let b = tc
        .start("b", |config| config.discovery = slow.clone())
        .await;
    a.wait_for_members(&[&a, &b]).await;
    b.wait_for_members(&[&a, &b]).await;
    let mut clients = vec![Client::connect(&a).await, Client::connect(&a).await];
    assert_eq!(http_get(a.port, "/healthz").await.0, 200);

    // Draining: the clients stay, new ones go to B, the health check fails, and B sees it.
    a.cluster.drain().await.unwrap();
    assert!(a.cluster.is_draining());
    assert_eq!(http_get(a.port, "/healthz").await.0, 503);
    let response = refused_upgrade(&a.ws_url()).await;
    assert_eq!(response.status(), 307);
    assert_eq!(response.headers()["location"], b.ws_url().as_str());
    within(
        "B sees A draining",
        b.cluster.discovery().view().wait_until(|nodes| {
            nodes
                .iter()
                .any(|n| n.node_id == *a.id() && n.status == NodeStatus::Draining)
        }),
    )
    .await;
    let to = clients[1].id.clone();
    clients[0]
        .send(json!({"op": "send", "to": to, "data": "still served", "id": 1}))
        .await;
    assert_eq!(clients[1].next_json().await["data"], "still served");
    assert_eq!(clients[0].next_json().await["type"], "ack");

    let a_id = a.id().clone();
    let shutting_down = {
        let cluster = a.cluster.clone();
        tokio::spawn(async move { cluster.shutdown().await })
    };
    for client in &mut clients {
        let (before, close) = client.until_close().await;
        assert!(before.is_empty(), "{before:?}");
        let close = close.expect("a close frame with a code");
        assert_eq!(u16::from(close.code), 1012);
        let reason: Value = serde_json::from_str(close.reason.as_str())
            .unwrap_or_else(|e| panic!("the reason is not JSON ({e}): {}", close.reason));
        assert_eq!(
            reason,
            json!({"node": b.id().as_str(), "reconnect": b.ws_url()})
        );
    }
    within("the shutdown", shutting_down)
        .await
        .unwrap()
        .unwrap();
    let left = Instant::now();
    assert_eq!(a.cluster.local_connections(), 0);
    within(
        "B drops A",
        b.cluster
            .discovery()
            .view()
            .wait_until(|nodes| nodes.iter().all(|n| n.node_id != a_id)),
    )
    .await;
    let dropped_after = left.elapsed();
    assert!(
        dropped_after < Duration::from_secs(1),
        "B dropped A {dropped_after:?} after it left; its lease is 6 s"
    );

    // The clients follow the reason to B.
    let moved = Client::connect_url(&b.ws_url()).await;
    assert_eq!(moved.node, b.id().as_str());
    a.server.abort();
    b.shutdown().await;
    tc.assert_left_nothing(&[]).await;
}

/// A node that shuts down spreads its clients over the others in proportion to their free
/// places rather than naming one node for all: peers with 10 and 30 free places are named
/// for 5 and 15 of 20 clients, each reason with the URL of the node it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_spreads_its_clients_over_the_others_by_free_places() {
    let tc = TestCluster::new("spread");
    let a = tc.start("a", |_| {}).await;
    let b = tc.start("b", |config| config.max_connections = 10).await;
    let c = tc.start("c", |config| config.max_connections = 30).await;
    for node in [&a, &b, &c] {
        node.wait_for_members(&[&a, &b, &c]).await;
    }
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(Client::connect(&a).await);
    }

    let shutting_down = {
        let cluster = a.cluster.clone();
        tokio::spawn(async move { cluster.shutdown().await })
    };
    let mut named = std::collections::HashMap::new();
    for client in &mut clients {
        let (before, close) = client.until_close().await;
        assert!(before.is_empty(), "{before:?}");
        let close = close.expect("a close frame with a code");
        assert_eq!(u16::from(close.code), 1012);
        let reason: Value = serde_json::from_str(close.reason.as_str()).unwrap();
        let node = reason["node"].as_str().expect("a node named").to_owned();
        let peer = [&b, &c]
            .into_iter()
            .find(|peer| peer.id().as_str() == node)
            .unwrap_or_else(|| panic!("{node} is not a peer"));
        assert_eq!(reason["reconnect"], peer.ws_url());
        *named.entry(node).or_insert(0) += 1;
    }
    assert_eq!(
        named,
        std::collections::HashMap::from([(b.id().to_string(), 5), (c.id().to_string(), 15)])
    );
    within("the shutdown", shutting_down)
        .await
        .unwrap()
        .unwrap();
    a.server.abort();
    b.shutdown().await;
    c.shutdown().await;
    tc.assert_left_nothing(&[]).await;
}

/// Sends `count` messages of `size` bytes to `slow`, which never reads, from node `from`,
/// each followed by a small one to `fast`, which reads them as they come; returns when the
/// fast client got them all.
async fn flood(from: &Node, slow: &Client, fast: &mut Client, count: usize, size: usize) {
    let handle = from.cluster.handle();
    let (slow_id, fast_id) = (slow.connection_id(), fast.connection_id());
    let pad = "x".repeat(size);
    for i in 0..count {
        handle
            .send(&slow_id, json!({"i": i, "pad": pad}).to_string())
            .await
            .unwrap();
        handle
            .send(&fast_id, json!({"i": i}).to_string())
            .await
            .unwrap();
        assert_eq!(
            fast.next_json().await,
            json!({"type": "message", "from": null, "data": {"i": i}}),
            "the fast client missed a message"
        );
    }
}

const FLOOD: usize = 160;
const FLOOD_SIZE: usize = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_closed_with_1013_while_others_keep_receiving() {
    let tc = TestCluster::new("slow-close");
    let a = tc
        .start("a", |config| {
            config.inbox_capacity = 8;
            config.slow_client = SlowClientPolicy::CLOSE_TRY_AGAIN_LATER;
        })
        .await;
    let b = tc.start("b", |_| {}).await;
    a.wait_for_members(&[&a, &b]).await;
    b.wait_for_members(&[&a, &b]).await;
    let mut slow = Client::connect_with_small_buffer(&a).await;
    let mut fast = Client::connect(&a).await;

    flood(&b, &slow, &mut fast, FLOOD, FLOOD_SIZE).await;

    // The slow client reads at last: what its node had written, in order and without a gap,
    // then a close frame with 1013.
    let (received, close) = slow.until_close().await;
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1013);
    assert_eq!(close.reason.as_str(), "too slow: inbox overflow");
    let indexes: Vec<u64> = received
        .iter()
        .map(|m| m["data"]["i"].as_u64().unwrap())
        .collect();
    assert!(
        indexes.len() < FLOOD,
        "the slow client got all {FLOOD} messages: it was never too slow"
    );
    assert_eq!(indexes, (0..indexes.len() as u64).collect::<Vec<_>>());
    assert!(slow.next_frame().await.is_none());

    // The node let it go, and the fast client is still served.
    within(
        "A publishes one connection",
        a.cluster.discovery().view().wait_until(|nodes| {
            nodes
                .iter()
                .any(|n| n.node_id == *a.id() && n.connection_count == 1)
        }),
    )
    .await;
    assert_eq!(a.cluster.local_connections(), 1);
    b.cluster
        .handle()
        .send(&fast.connection_id(), "\"after\"")
        .await
        .unwrap();
    assert_eq!(fast.next_json().await["data"], "after");

    a.shutdown().await;
    b.shutdown().await;
    tc.assert_left_nothing(&[]).await;
}

/// No message dropped without a word: a client too slow for its policy is closed while
/// messages keep coming for it from a client on another node. Each of them is either read by
/// the slow client before its close frame, or answered to its sender with `not_found` and
/// the request's id (dropped from the inbox at the close, or refused once it was closing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_a_closed_client_missed_is_answered_to_its_sender() {
    let tc = TestCluster::new("slow-notice");
    let a = tc
        .start("a", |config| {
            config.inbox_capacity = 8;
            config.slow_client = SlowClientPolicy::CLOSE_TRY_AGAIN_LATER;
        })
        .await;
    let b = tc.start("b", |_| {}).await;
    a.wait_for_members(&[&a, &b]).await;
    b.wait_for_members(&[&a, &b]).await;
    let mut slow = Client::connect_with_small_buffer(&a).await;
    let mut sender = Client::connect(&b).await;

    // As large as a client's frame may be (64 KiB), so that the slow client's buffers fill.
    let pad = "x".repeat(FLOOD_SIZE - 1024);
    for i in 0..FLOOD {
        sender
            .send(json!({"op": "send", "to": slow.id, "data": {"i": i, "pad": pad}, "id": i}))
            .await;
    }
    // Every send is confirmed by the broker: the messages reached the slow client's node.
    let mut acked = 0;
    let mut not_found = Vec::new();
    while acked < FLOOD {
        let frame = sender.next_json().await;
        match frame["type"].as_str() {
            Some("ack") => acked += 1,
            Some("error") => {
                assert_eq!(frame["code"], "not_found", "{frame}");
                not_found.push(frame["id"].as_u64().unwrap());
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    // The slow client reads at last: what its node wrote, then the close.
    let (received, close) = slow.until_close().await;
    assert_eq!(u16::from(close.expect("a close frame").code), 1013);
    let read: Vec<u64> = received
        .iter()
        .map(|m| m["data"]["i"].as_u64().unwrap())
        .collect();
    assert!(read.len() < FLOOD, "the client was never too slow");
    // Every other one comes back to its sender.
    while read.len() + not_found.len() < FLOOD {
        let frame = sender.next_json().await;
        assert_eq!(frame["code"], "not_found", "{frame}");
        not_found.push(frame["id"].as_u64().unwrap());
    }
    let mut all: Vec<u64> = read.iter().chain(&not_found).copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..FLOOD as u64).collect::<Vec<_>>(),
        "each message read or answered, once (read {}, answered {})",
        read.len(),
        not_found.len()
    );

    drop(slow);
    a.shutdown().await;
    b.shutdown().await;
    tc.assert_left_nothing(&[]).await;
}

/// A client that stops reading for good must still be let go under the close policy, and
/// without its help: its node must not keep it (counted against `max_connections`, holding
/// a socket task and the node) until it reads again.
///
/// The node server's socket task (`server::serve_connection`) once awaited each write with no
/// bound, so the close the policy decided waited behind a write that never completed and the
/// connection stayed registered; writes are now bounded by `ServerConfig::write_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_that_never_reads_is_let_go() {
    let tc = TestCluster::new("slow-stuck");
    let a = tc
        .start("a", |config| {
            config.inbox_capacity = 8;
            config.slow_client = SlowClientPolicy::CLOSE_TRY_AGAIN_LATER;
            config.shutdown_grace = Duration::from_millis(500);
        })
        .await;
    let b = tc.start("b", |_| {}).await;
    a.wait_for_members(&[&a, &b]).await;
    b.wait_for_members(&[&a, &b]).await;
    let slow = Client::connect_with_small_buffer(&a).await;
    let mut fast = Client::connect(&a).await;

    flood(&b, &slow, &mut fast, FLOOD, FLOOD_SIZE).await;

    // The policy closed the slow client's inbox during the flood (the test above shows it
    // once the client reads); the node should now let it go.
    let let_go = timeout(
        WAIT,
        a.cluster.discovery().view().wait_until(|nodes| {
            nodes
                .iter()
                .any(|n| n.node_id == *a.id() && n.connection_count == 1)
        }),
    )
    .await
    .is_ok();
    let still_registered = a.cluster.local_connections();

    drop((slow, fast));
    a.shutdown().await;
    b.shutdown().await;
    tc.assert_left_nothing(&[]).await;
    assert!(
        let_go,
        "the slow client closed by its policy was still registered {WAIT:?} later \
         ({still_registered} connections on its node): the socket task is stuck writing to it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_loses_its_oldest_messages_while_others_keep_receiving() {
    let tc = TestCluster::new("slow-drop");
    let a = tc
        .start("a", |config| {
            config.inbox_capacity = 8;
            config.slow_client = SlowClientPolicy::DropOldest;
        })
        .await;
    let b = tc.start("b", |_| {}).await;
    a.wait_for_members(&[&a, &b]).await;
    b.wait_for_members(&[&a, &b]).await;
    let mut slow = Client::connect_with_small_buffer(&a).await;
    let mut fast = Client::connect(&a).await;

    flood(&b, &slow, &mut fast, FLOOD, FLOOD_SIZE).await;

    // The slow client reads at last: in order, the first and the last messages, but not all.
    let mut indexes = Vec::new();
    while indexes.last() != Some(&(FLOOD as u64 - 1)) {
        let message = slow.next_json().await;
        indexes.push(message["data"]["i"].as_u64().unwrap());
    }
    assert_eq!(indexes[0], 0);
    assert!(indexes.windows(2).all(|w| w[0] < w[1]), "{indexes:?}");
    assert!(
        indexes.len() < FLOOD,
        "the slow client got all {FLOOD} messages: none was dropped"
    );
    // The newest ones are kept: the inbox's last eight at least.
    let tail: Vec<u64> = indexes[indexes.len() - 8..].to_vec();
    assert_eq!(tail, (FLOOD as u64 - 8..FLOOD as u64).collect::<Vec<_>>());

    // It stays connected and served.
    b.cluster
        .handle()
        .send(&slow.connection_id(), "\"after\"")
        .await
        .unwrap();
    assert_eq!(slow.next_json().await["data"], "after");
    assert_eq!(a.cluster.local_connections(), 2);

    a.shutdown().await;
    b.shutdown().await;
    tc.assert_left_nothing(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_the_http_routes_answer() {
    let tc = TestCluster::new("bad-request");
    let a = tc.start("a", |_| {}).await;
    let b = tc.start("b", |_| {}).await;
    a.wait_for_members(&[&a, &b]).await;
    b.wait_for_members(&[&a, &b]).await;
    let mut client = Client::connect(&a).await;

    let bad_request = |frame: &Value, id: Option<Value>| {
        assert_eq!(frame["type"], "error", "{frame}");
        assert_eq!(frame["code"], "bad_request", "{frame}");
        assert!(frame["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(frame.get("id").cloned(), id, "{frame}");
    };
    client.send_text("not json").await;
    bad_request(&client.next_json().await, None);
    client.send(json!({"op": "fly", "id": 7})).await;
    let frame = client.next_json().await;
    bad_request(&frame, Some(json!(7)));
    assert!(frame["message"].as_str().unwrap().contains("fly"));
    client.send(json!({"op": "send", "data": 1, "id": 8})).await;
    bad_request(&client.next_json().await, Some(json!(8)));
    client
        .send(json!({"op": "send", "to": "not an id", "data": 1, "id": 9}))
        .await;
    bad_request(&client.next_json().await, Some(json!(9)));
    client
        .send(json!({"op": "join", "group": "", "id": 10}))
        .await;
    bad_request(&client.next_json().await, Some(json!(10)));
    within(
        "a binary frame is sent",
        client.ws.send(Message::binary(vec![1, 2, 3])),
    )
    .await
    .unwrap();
    bad_request(&client.next_json().await, None);

    // The connection is still open and served.
    client
        .send(json!({"op": "send", "to": client.id, "data": "still here", "id": 11}))
        .await;
    let mut frames = vec![client.next_json().await, client.next_json().await];
    frames.sort_by_key(|f| f["type"].as_str().unwrap().to_owned());
    assert_eq!(
        frames,
        vec![
            json!({"type": "ack", "id": 11}),
            json!({"type": "message", "from": client.id, "data": "still here"}),
        ]
    );

    // The HTTP routes.
    assert_eq!(http_get(a.port, "/healthz").await, (200, String::new()));
    let (status, body) = http_get(b.port, "/cluster/nodes").await;
    assert_eq!(status, 200);
    let nodes: Vec<NodeInfo> = serde_json::from_str(&body).unwrap();
    let listed: Vec<(String, u16)> = nodes
        .iter()
        .map(|n| (n.node_id.to_string(), n.port))
        .collect();
    assert_eq!(
        listed,
        vec![(a.id().to_string(), a.port), (b.id().to_string(), b.port)]
    );
    assert!(nodes.iter().all(|n| n.status == NodeStatus::Active));

    drop(client);
    a.shutdown().await;
    b.shutdown().await;
    tc.assert_left_nothing(&[]).await;
}

#[tokio::test]
async fn a_send_to_a_connection_gone_on_another_node_comes_back_as_an_error() {
    let tc = TestCluster::new("gone");
    let a = tc.start("a", |_| {}).await;
    let b = tc.start("b", |_| {}).await;
    a.wait_for_members(&[&a, &b]).await;

    let mut alice = Client::connect(&a).await;
    let bob = Client::connect(&b).await;
    let bob_id = bob.id.clone();
    drop(bob);
    // Node b notices the closed socket on its own; there is no event to await for it.
    within("b lets bob go", async {
        while b.cluster.local_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    // Node a cannot know: b is alive and bob's id is of b's current run. The broker confirms
    // (ack), then b answers that bob is gone, and alice hears of it with her request's id.
    alice
        .send(json!({"op": "send", "to": bob_id, "data": "hello?", "id": 7}))
        .await;
    assert_eq!(alice.next_json().await, json!({"type": "ack", "id": 7}));
    let error = alice.next_json().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "not_found", "{error}");
    assert_eq!(error["id"], 7, "{error}");
    assert!(
        error["message"].as_str().unwrap().contains(&bob_id),
        "{error}"
    );

    a.shutdown().await;
    b.shutdown().await;
    tc.assert_left_nothing(&[]).await;
}

#[tokio::test]
async fn a_signed_cluster_refuses_messages_from_outside() {
    let tc = TestCluster::new("signed");
    let secret = hybrid_cluster::ClusterSecret::new("the secret of this test cluster").unwrap();
    let a = tc.start("a", |c| c.secret = Some(secret.clone())).await;
    let b = tc.start("b", |c| c.secret = Some(secret.clone())).await;
    a.wait_for_members(&[&a, &b]).await;
    let alice = Client::connect(&a).await;
    let mut bob = Client::connect(&b).await;
    let mut alice = alice;

    // An intruder who reaches RabbitMQ but has no secret publishes a well-formed envelope for
    // bob, claiming to come from alice on node a.
    use hybrid_cluster::Broker as _;
    let intruder = hybrid_cluster::routing::RabbitBroker::connect(
        &amqp_url(),
        &tc.prefix,
        hybrid_cluster::routing::RabbitConfig::default(),
    )
    .await
    .unwrap();
    let forged = hybrid_cluster::Envelope::text(
        a.id().clone(),
        hybrid_cluster::Target::Connection(bob.connection_id()),
        r#""forged""#,
    )
    .with_sender(alice.connection_id());
    intruder
        .publish(&forged.routing_key(), forged.to_message().unwrap())
        .await
        .unwrap();
    intruder.close().await;

    // Then a signed message through the cluster. Both went to b's queue in that order, so had
    // the forged one been handed over, bob would see it first.
    alice
        .send(json!({"op": "send", "to": bob.id, "data": "signed", "id": 1}))
        .await;
    assert_eq!(alice.next_json().await, json!({"type": "ack", "id": 1}));
    assert_eq!(
        bob.next_json().await,
        json!({"type": "message", "from": alice.id, "data": "signed"})
    );

    a.shutdown().await;
    b.shutdown().await;
    tc.assert_left_nothing(&[]).await;
}

/// A signed unicast captured and republished into another node's queue is refused (its
/// target is not there) and dead-lettered, never answered: its real sender gets no false
/// `not_found`.
#[tokio::test]
async fn a_signed_message_republished_elsewhere_is_refused_not_answered() {
    let tc = TestCluster::new("republished");
    let secret = hybrid_cluster::ClusterSecret::new("the secret of this test cluster").unwrap();
    let a = tc.start("a", |c| c.secret = Some(secret.clone())).await;
    let b = tc.start("b", |c| c.secret = Some(secret.clone())).await;
    a.wait_for_members(&[&a, &b]).await;
    b.wait_for_members(&[&a, &b]).await;
    let mut alice = Client::connect(&a).await;
    let bob = Client::connect(&b).await;

    // What alice's node signs for bob, as a wiretap on the broker would have captured it,
    // published again to node a's own queue.
    use hybrid_cluster::Broker as _;
    let mut captured = hybrid_cluster::Envelope::text(
        a.id().clone(),
        hybrid_cluster::Target::Connection(bob.connection_id()),
        r#""captured""#,
    )
    .with_sender(alice.connection_id());
    captured.sign(&secret);
    let intruder = hybrid_cluster::routing::RabbitBroker::connect(
        &amqp_url(),
        &tc.prefix,
        hybrid_cluster::routing::RabbitConfig::default(),
    )
    .await
    .unwrap();
    intruder
        .publish(
            &hybrid_cluster::RoutingKey::Node(a.id().clone()),
            captured.to_message().unwrap(),
        )
        .await
        .unwrap();
    intruder.close().await;

    // Then a message to alice through a's queue too: had the captured one been answered, its
    // notice would come first.
    b.cluster
        .handle()
        .send(&alice.connection_id(), "\"after\"")
        .await
        .unwrap();
    assert_eq!(
        alice.next_json().await["data"],
        "after",
        "no false not_found before"
    );

    a.shutdown().await;
    b.shutdown().await;
    tc.assert_left_nothing(&[]).await;
}

#[tokio::test]
async fn one_clients_messages_arrive_in_the_order_it_sent_them() {
    let tc = TestCluster::new("order");
    let a = tc.start("a", |_| {}).await;
    // Room for the whole burst: this test is about order, not about slow clients.
    let b = tc.start("b", |c| c.inbox_capacity = 8192).await;
    a.wait_for_members(&[&a, &b]).await;
    let mut alice = Client::connect(&a).await;
    let mut bob = Client::connect(&b).await;

    // A burst with no ids: the server keeps many sends in flight at once.
    const COUNT: u64 = 3000;
    let burst: Vec<Message> = (0..COUNT)
        .map(|n| Message::text(json!({"op": "send", "to": bob.id, "data": n}).to_string()))
        .collect();
    let sending = async {
        for frame in burst {
            alice.ws.feed(frame).await.unwrap();
        }
        alice.ws.flush().await.unwrap();
    };
    let receiving = async {
        let mut received = Vec::with_capacity(COUNT as usize);
        while (received.len() as u64) < COUNT {
            received.push(bob.next_json().await["data"].as_u64().unwrap());
        }
        received
    };
    let ((), received) = tokio::join!(sending, receiving);
    let out_of_order = received.windows(2).filter(|w| w[1] != w[0] + 1).count();
    assert_eq!(
        out_of_order,
        0,
        "first: {:?}",
        &received[..20.min(received.len())]
    );
    assert_eq!(received.last(), Some(&(COUNT - 1)));

    a.shutdown().await;
    b.shutdown().await;
    tc.assert_left_nothing(&[]).await;
}
