//! One node of a cluster as its own process, serving the demo protocol.
//!
//! ```sh
//! cargo run --example node -- --node-id node-1 --port 5001 \
//!     --redis redis://127.0.0.1:6379 --amqp amqp://guest:guest@127.0.0.1:5672/%2f
//! cargo run --example node -- --node-id node-2 --port 5002 \
//!     --redis redis://127.0.0.1:6379 --amqp amqp://guest:guest@127.0.0.1:5672/%2f
//! ```
//!
//! Options: `--node-id ID` (required), `--port P` (required), `--address HOST` (what clients
//! and redirects use, default 127.0.0.1), `--redis URL` and `--amqp URL` (both, or neither for
//! a lone node on the embedded backends), `--strategy
//! least-connections|round-robin|least-resource-usage|random|p2c`, `--max-connections N`,
//! `--prefix P`, `--heartbeat-ms MS`. `RUST_LOG` sets the log level (default `info`);
//! `HYBRID_CLUSTER_SECRET` (at least 16 bytes, the same on every node) signs node-to-node
//! traffic.
//!
//! Serves `ws://HOST:P/ws` (the protocol of `hybrid_cluster::protocol`), `GET /cluster` (a
//! status page), `GET /cluster/nodes`, `GET /healthz` and `GET /metrics` (Prometheus text
//! form; see `hybrid_cluster::metrics` for what is there). Ctrl-C (or SIGTERM) shuts the node down gracefully: clients are closed
//! with code 1012 and a reason naming another node to reconnect to.

use std::error::Error;
use std::time::Duration;

use axum::serve::ListenerExt;
use hybrid_cluster::server::{ServerConfig, router};
use hybrid_cluster::{
    AmqpUrl, Backends, Cluster, ClusterConfig, ClusterPrefix, NodeId, RedisUrl, Strategy,
};
use metrics_exporter_prometheus::PrometheusBuilder;
use tracing_subscriber::EnvFilter;

type BoxError = Box<dyn Error + Send + Sync>;

const USAGE: &str = "usage: node --node-id ID --port P [--address HOST] [--redis URL --amqp URL] \
[--strategy least-connections|round-robin|least-resource-usage|random|p2c] [--max-connections N] \
[--prefix P] [--heartbeat-ms MS]";

fn strategy(name: &str) -> Result<Strategy, BoxError> {
    Ok(match name {
        "least-connections" => Strategy::LeastConnections,
        "round-robin" => Strategy::RoundRobin,
        "least-resource-usage" => Strategy::LeastResourceUsage,
        "random" => Strategy::Random,
        "p2c" => Strategy::PowerOfTwoChoices,
        other => return Err(format!("unknown strategy `{other}`\n{USAGE}").into()),
    })
}

fn parse_args() -> Result<(ClusterConfig, Backends), BoxError> {
    let mut node_id = None;
    let mut port = None;
    let mut address = "127.0.0.1".to_owned();
    let mut redis = None;
    let mut amqp = None;
    let mut chosen_strategy = Strategy::default();
    let mut max_connections = None;
    let mut prefix = ClusterPrefix::default();
    let mut heartbeat = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))?;
        match arg.as_str() {
            "--node-id" => node_id = Some(NodeId::new(&value)?),
            "--port" => port = Some(value.parse::<u16>().map_err(|e| format!("--port: {e}"))?),
            "--address" => address = value,
            "--redis" => redis = Some(value.parse::<RedisUrl>()?),
            "--amqp" => amqp = Some(value.parse::<AmqpUrl>()?),
            "--strategy" => chosen_strategy = strategy(&value)?,
            "--max-connections" => {
                max_connections = Some(
                    value
                        .parse::<u32>()
                        .map_err(|e| format!("--max-connections: {e}"))?,
                )
            }
            "--prefix" => prefix = value.parse()?,
            "--heartbeat-ms" => {
                heartbeat = Some(Duration::from_millis(
                    value
                        .parse::<u64>()
                        .map_err(|e| format!("--heartbeat-ms: {e}"))?,
                ))
            }
            other => return Err(format!("unknown option {other}\n{USAGE}").into()),
        }
    }
    let node_id = node_id.ok_or_else(|| format!("--node-id is required\n{USAGE}"))?;
    let port = port.ok_or_else(|| format!("--port is required\n{USAGE}"))?;
    let backends = match (redis, amqp) {
        (Some(redis), Some(amqp)) => Backends::servers(redis, amqp),
        (None, None) => {
            tracing::warn!("no --redis/--amqp: a lone node on the embedded backends");
            Backends::embedded()
        }
        _ => return Err(format!("give both --redis and --amqp, or neither\n{USAGE}").into()),
    };
    // The cluster secret, when HYBRID_CLUSTER_SECRET is set: never on the command line, where
    // other users of the machine could read it.
    let mut config = ClusterConfig::new(node_id, address, port).with_secret_from_env()?;
    if config.secret.is_some() {
        tracing::info!("HYBRID_CLUSTER_SECRET is set: node-to-node traffic is signed");
    }
    config.strategy = chosen_strategy;
    config.prefix = prefix;
    if let Some(max) = max_connections {
        config.max_connections = max;
    }
    if let Some(heartbeat) = heartbeat {
        config.discovery = config.discovery.with_heartbeat(heartbeat);
    }
    Ok((config, backends))
}

async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let (config, backends) = match parse_args() {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", config.port)).await?;
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let cluster = Cluster::start(config, backends).await?;
    let app = router(cluster.clone(), ServerConfig::default()).route(
        "/metrics",
        axum::routing::get(move || std::future::ready(metrics.render())),
    );
    let stopping = cluster.clone();
    // Small frames go out at once (no Nagle delay).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stop_signal().await;
            tracing::info!("shutting down: closing clients with a redirect, leaving the cluster");
            if let Err(error) = stopping.shutdown().await {
                tracing::error!(%error, "shutdown failed");
            }
        })
        .await?;
    Ok(())
}
