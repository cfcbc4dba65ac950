//! What serves the clients: nodes of a cluster in this process, and a raw WebSocket echo
//! server. Shared by the suite and its child program (`suite-child`), which runs them apart
//! from the clients when a section needs thousands of connections.

use std::time::Duration;

use axum::serve::ListenerExt;
use futures_util::{SinkExt, StreamExt};
use hybrid_cluster::server::{ServerAuth, ServerConfig, router_with};
use hybrid_cluster::{
    AmqpUrl, Backends, Cluster, ClusterConfig, ClusterPrefix, Durability, NodeId, RedisUrl,
    SessionLimits,
};
use hybrid_cluster_test_support::{BoxError, servers};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The bound of any single wait (a frame, a connection, a shutdown).
pub(crate) const WAIT: Duration = Duration::from_secs(30);

pub(crate) const NODE_NAMES: [&str; 3] = ["a", "b", "c"];

pub(crate) struct RunningNode {
    pub(crate) cluster: Cluster,
    pub(crate) port: u16,
    pub(crate) server: JoinHandle<()>,
}

impl RunningNode {
    /// Its WebSocket URL.
    pub(crate) fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }
}

/// Starts a node of the cluster `prefix` serving the demo protocol on a loopback port, as
/// `examples/cluster.rs` does (TCP_NODELAY on every accepted socket).
pub(crate) async fn start_node(
    prefix: &ClusterPrefix,
    name: &str,
    durability: Durability,
    sessions: bool,
) -> Result<RunningNode, BoxError> {
    start_node_with(prefix, name, durability, sessions, ServerAuth::default()).await
}

/// [`start_node`], its clients identified as `auth` says.
pub(crate) async fn start_node_with(
    prefix: &ClusterPrefix,
    name: &str,
    durability: Durability,
    sessions: bool,
    auth: ServerAuth,
) -> Result<RunningNode, BoxError> {
    let redis: RedisUrl = servers::redis_url().parse()?;
    let amqp: AmqpUrl = servers::amqp_url().parse()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let mut config = ClusterConfig::new(NodeId::new(name)?, "127.0.0.1", port);
    config.prefix = prefix.clone();
    config.durability = durability;
    config.max_connections = 1_000_000;
    config.shutdown_grace = Duration::from_secs(5);
    config.sessions = sessions.then(SessionLimits::default);
    let cluster = timeout(WAIT, Cluster::start(config, Backends::servers(redis, amqp))).await??;
    let app = router_with(cluster.clone(), ServerConfig::default(), auth);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(RunningNode {
        cluster,
        port,
        server,
    })
}

/// Starts `count` nodes (named a, b, c) in `durability` mode and waits until each sees all
/// of them.
pub(crate) async fn start_nodes(
    prefix: &ClusterPrefix,
    count: usize,
    durability: Durability,
) -> Result<Vec<RunningNode>, BoxError> {
    start_nodes_with(prefix, count, durability, false).await
}

/// [`start_nodes`], with sessions when `sessions` (at their default limits).
pub(crate) async fn start_nodes_with(
    prefix: &ClusterPrefix,
    count: usize,
    durability: Durability,
    sessions: bool,
) -> Result<Vec<RunningNode>, BoxError> {
    let mut nodes = Vec::new();
    for name in NODE_NAMES.iter().take(count) {
        nodes.push(start_node(prefix, name, durability, sessions).await?);
    }
    for node in &nodes {
        timeout(
            WAIT,
            node.cluster
                .discovery()
                .view()
                .wait_until(|members| members.len() == count),
        )
        .await
        .map_err(|_| "the nodes did not see each other")?;
    }
    Ok(nodes)
}

pub(crate) async fn stop_nodes(nodes: Vec<RunningNode>) {
    for node in nodes {
        match timeout(WAIT, node.cluster.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("a node did not shut down cleanly: {error}"),
            Err(_) => eprintln!("a node did not shut down within {WAIT:?}"),
        }
        node.server.abort();
    }
}

/// Client settings for the many idle clients of sections 4 and 5 (the parent's memory only).
pub(crate) fn small_buffers() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096)
}

/// A raw tokio-tungstenite echo server on loopback (TCP_NODELAY), accepting at most
/// `max_accepts` connections; abort the task to stop it.
pub(crate) async fn echo_server(
    config: Option<WebSocketConfig>,
    max_accepts: usize,
) -> Result<(u16, JoinHandle<()>), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        for _ in 0..max_accepts {
            let Ok((tcp, _)) = listener.accept().await else {
                break;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(tcp, config).await
                else {
                    return;
                };
                // Ends when the client goes.
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    Ok((port, task))
}

/// Warnings to stderr (`RUST_LOG` chooses), lapin's own off, with `extra` beside it.
pub(crate) fn init_logging_with<L>(extra: L)
where
    L: tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync,
{
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin=off"));
    let logged = filter.max_level_hint();
    let _ = tracing_subscriber::registry()
        .with(extra)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .try_init();
    // The `extra` layers' trace-level events leave the subscriber without a level bound, so
    // every `log` record of a dependency (tungstenite logs each frame at trace level) would be
    // turned into an event and then thrown away: `log` records go only as far as `RUST_LOG`.
    log::set_max_level(match logged {
        Some(level) if level == tracing::level_filters::LevelFilter::OFF => log::LevelFilter::Off,
        Some(level) if level == tracing::level_filters::LevelFilter::ERROR => {
            log::LevelFilter::Error
        }
        Some(level) if level == tracing::level_filters::LevelFilter::WARN => log::LevelFilter::Warn,
        Some(level) if level == tracing::level_filters::LevelFilter::INFO => log::LevelFilter::Info,
        Some(level) if level == tracing::level_filters::LevelFilter::DEBUG => {
            log::LevelFilter::Debug
        }
        _ => log::LevelFilter::Trace,
    });
}

/// The runtime of the suite and of its child: two workers, as many as this machine's cores
/// the measures were tuned on.
pub(crate) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
