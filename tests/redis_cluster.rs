//! Two nodes on a Redis Cluster (the loopback one `scripts/redis-cluster.sh start` runs, or the
//! seeds in `REDIS_CLUSTER_URLS`) and the real RabbitMQ (`AMQP_URL`): they see each other and
//! route a message between WebSocket clients; the registry's contract (the conformance suite
//! the single Redis passes) holds on the cluster. The failover itself is tested at the discovery
//! layer (`layers/discovery/tests/redis_cluster.rs`); `.config/nextest.toml` runs this binary
//! alone too, so that failover never meets it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hybrid_cluster::discovery::{DiscoveryConfig, RedisClusterRegistry, RedisOptions};
use hybrid_cluster::server::{self, ServerConfig};
use hybrid_cluster::{
    AmqpUrl, Backends, Cluster, ClusterConfig, ClusterPrefix, NodeId, RedisUrl, Registry,
};
use hybrid_cluster_test_support::conformance::Cleanup;
use hybrid_cluster_test_support::{registry_conformance, servers};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

const WAIT: Duration = Duration::from_secs(10);

fn seeds() -> Vec<RedisUrl> {
    servers::redis_cluster_urls()
        .iter()
        .map(|seed| seed.parse().expect("REDIS_CLUSTER_URLS holds Redis URLs"))
        .collect()
}

fn amqp_url() -> AmqpUrl {
    servers::amqp_url()
        .parse()
        .expect("AMQP_URL is an AMQP URL")
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"))
}

async fn start(prefix: &ClusterPrefix, id: &str) -> (Cluster, u16, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = ClusterConfig::new(NodeId::new(id).unwrap(), "127.0.0.1", port);
    config.prefix = prefix.clone();
    config.discovery = DiscoveryConfig::default().with_heartbeat(Duration::from_millis(500));
    let backends = Backends::redis_cluster(seeds(), amqp_url());
    let cluster = Cluster::start(config, backends)
        .await
        .expect("the Redis Cluster (./scripts/redis-cluster.sh start) and RabbitMQ are running");
    let app = server::router(cluster.clone(), ServerConfig::default());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (cluster, port, server)
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn next_json(ws: &mut Socket) -> Value {
    loop {
        match within("a frame arrives", ws.next()).await {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Connects to the node on `port` and returns the socket and its connection id.
async fn client(port: u16) -> (Socket, String) {
    let (mut ws, _) = within(
        "the upgrade",
        connect_async(format!("ws://127.0.0.1:{port}/ws")),
    )
    .await
    .unwrap();
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let id = welcome["connection_id"].as_str().unwrap().to_owned();
    (ws, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_a_redis_cluster_see_each_other_and_route() {
    let prefix = ClusterPrefix::new(servers::unique_prefix("e2e-redis-cluster")).unwrap();
    let (a, a_port, a_server) = start(&prefix, "rc-a").await;
    let (b, b_port, b_server) = start(&prefix, "rc-b").await;
    for node in [&a, &b] {
        within(
            "both nodes see each other",
            node.discovery().view().wait_until(|n| n.len() == 2),
        )
        .await;
    }

    let (mut alice, alice_id) = client(a_port).await;
    let (mut bob, bob_id) = client(b_port).await;
    let send = json!({"op": "send", "to": bob_id, "data": "hi", "id": 1});
    within(
        "a frame is sent",
        alice.send(Message::text(send.to_string())),
    )
    .await
    .unwrap();
    assert_eq!(
        next_json(&mut bob).await,
        json!({"type": "message", "from": alice_id, "data": "hi"})
    );
    assert_eq!(next_json(&mut alice).await, json!({"type": "ack", "id": 1}));

    drop((alice, bob));
    for cluster in [a, b] {
        within("a node shuts down", cluster.shutdown())
            .await
            .unwrap();
    }
    a_server.abort();
    b_server.abort();
    servers::remove_cluster(prefix.as_str(), &["rc-a".to_owned(), "rc-b".to_owned()]).await;
}

/// A registry on the Redis Cluster under a prefix of the case's own; the cleanup deletes the
/// prefix's keys (all in one slot).
async fn redis_cluster(case: &str) -> (Arc<dyn Registry>, Cleanup) {
    let prefix =
        ClusterPrefix::new(servers::unique_prefix(&format!("conformance-{case}"))).unwrap();
    let registry =
        RedisClusterRegistry::connect_cluster(&seeds(), &prefix, RedisOptions::default())
            .await
            .unwrap();
    let mut connection = registry.connection();
    let pattern = format!("{{{prefix}}}*");
    (
        Arc::new(registry),
        Box::pin(async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut connection)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL")
                    .arg(keys)
                    .query_async(&mut connection)
                    .await;
            }
        }),
    )
}

registry_conformance!(redis_cluster);
