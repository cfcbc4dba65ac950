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
//! `--prefix P`, `--heartbeat-ms MS`, `--shutdown-grace-ms MS` (default 5000),
//! `--max-in-flight N` (the node's bound on messages awaiting the broker, default 256),
//! `--max-pending-per-connection N` (one client's requests in flight before the node stops
//! reading it, default 128), `--write-timeout-ms MS` (how long a write may wait for a client
//! that does not read before it is dropped, default 5000), `--durability
//! transient|durable|replicated` (what survives a broker restart, default durable: see the
//! README's delivery contract), `--public-url URL` (the `ws://` or `wss://` URL clients reach
//! this node at, when it is behind TLS or a proxy: redirects and close reasons name it),
//! `--bind ADDR` (the address to listen on, default `0.0.0.0`). `RUST_LOG` sets the log level (default `info`);
//! `HYBRID_CLUSTER_SECRET` (at least 16 bytes, the same on every node) signs node-to-node
//! traffic.
//!
//! Serves `ws://HOST:P/ws` (the protocol of `hybrid_cluster::protocol`), `GET /cluster` (a
//! status page), `GET /cluster/nodes`, `GET /healthz` and `GET /metrics` (Prometheus text
//! form; see `hybrid_cluster::metrics` for what is there). Ctrl-C (or SIGTERM) shuts the node
//! down gracefully: clients are closed with code 1012 and a reason naming another node to
//! reconnect to, and the process ends within the shutdown grace period whatever state its
//! connections are in (the log names what was cut short); a second signal ends it at once.
//!
//! At start the node raises its open-file limit to the hard limit, so that it can hold as
//! many connections as the system allows, and warns when that is below `--max-connections`.

use std::error::Error;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use hybrid_cluster::server::{ServerConfig, router};
use hybrid_cluster::{
    AmqpUrl, Backends, Cluster, ClusterConfig, ClusterPrefix, Durability, NodeId, RedisUrl,
    Strategy,
};
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::sync::Notify;
use tracing_subscriber::EnvFilter;

type BoxError = Box<dyn Error + Send + Sync>;

const USAGE: &str = "usage: node --node-id ID --port P [--address HOST] [--redis URL --amqp URL] \
[--strategy least-connections|round-robin|least-resource-usage|random|p2c] [--max-connections N] \
[--prefix P] [--heartbeat-ms MS] [--shutdown-grace-ms MS] [--max-in-flight N] \
[--max-pending-per-connection N] [--write-timeout-ms MS] [--durability transient|durable|replicated] \
[--public-url URL] [--bind ADDR]";

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

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, BoxError>
where
    T::Err: std::fmt::Display,
{
    value
        .parse::<T>()
        .map_err(|e| format!("{flag}: {e}\n{USAGE}").into())
}

fn parse_args() -> Result<(ClusterConfig, Backends, ServerConfig, std::net::IpAddr), BoxError> {
    let mut node_id = None;
    let mut port = None;
    let mut address = "127.0.0.1".to_owned();
    let mut redis = None;
    let mut amqp = None;
    let mut chosen_strategy = Strategy::default();
    let mut max_connections = None;
    let mut prefix = ClusterPrefix::default();
    let mut heartbeat = None;
    let mut grace = None;
    let mut durability = None;
    let mut public_url = None;
    let mut bind = std::net::IpAddr::from([0, 0, 0, 0]);
    let mut max_in_flight = None;
    let mut server = ServerConfig::default();
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
            "--max-connections" => max_connections = Some(number::<u32>(&arg, &value)?),
            "--prefix" => prefix = value.parse()?,
            "--heartbeat-ms" => {
                heartbeat = Some(Duration::from_millis(number(&arg, &value)?));
            }
            "--public-url" => public_url = Some(value),
            "--bind" => {
                bind = value
                    .parse::<std::net::IpAddr>()
                    .map_err(|e| format!("--bind: {e}\n{USAGE}"))?;
            }
            "--durability" => {
                durability = Some(
                    value
                        .parse::<Durability>()
                        .map_err(|e| format!("{e}\n{USAGE}"))?,
                )
            }
            "--shutdown-grace-ms" => grace = Some(Duration::from_millis(number(&arg, &value)?)),
            "--max-in-flight" => max_in_flight = Some(number::<usize>(&arg, &value)?.max(1)),
            "--write-timeout-ms" => {
                server.write_timeout = Duration::from_millis(number(&arg, &value)?);
            }
            "--max-pending-per-connection" => {
                server.max_pending_per_connection = number::<usize>(&arg, &value)?.max(1);
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
    if let Some(grace) = grace {
        config.shutdown_grace = grace;
    }
    if let Some(durability) = durability {
        config.durability = durability;
    }
    if let Some(max) = max_in_flight {
        config.forward.max_in_flight = max;
    }
    if let Some(url) = public_url {
        hybrid_cluster::check_public_url(&url)
            .map_err(|reason| format!("--public-url: {reason}\n{USAGE}"))?;
        config.public_url = Some(url);
    }
    Ok((config, backends, server, bind))
}

/// Raises the soft limit on open files to the hard one: each connection is a descriptor.
fn raise_open_files(max_connections: u32) {
    let wanted = u64::from(max_connections) + 256;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < wanted => tracing::warn!(
            limit,
            max_connections,
            "the open-file limit is below --max-connections: connections past it will be refused by the system (raise `ulimit -n`)"
        ),
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "could not read or raise the open-file limit"),
    }
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

/// `RUST_LOG` (default `info`), with lapin's warning on returned messages off unless
/// `RUST_LOG` names it: lapin logs a returned message whole, payload included.
fn log_filter() -> EnvFilter {
    const RETURNS: &str = "lapin::returned_messages";
    let asked = std::env::var(EnvFilter::DEFAULT_ENV).unwrap_or_default();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if asked.contains(RETURNS) {
        return filter;
    }
    match format!("{RETURNS}=error").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        // Colours only for a person at a terminal, not in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let (config, backends, server, bind) = match parse_args() {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    raise_open_files(config.max_connections);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config, backends, server, bind));
    // Socket tasks of connections cut short are dropped here, not waited for.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(
    config: ClusterConfig,
    backends: Backends,
    server: ServerConfig,
    bind: std::net::IpAddr,
) -> Result<(), BoxError> {
    let grace = config.shutdown_grace;
    let listener = tokio::net::TcpListener::bind((bind, config.port)).await?;
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let cluster = Cluster::start(config, backends).await?;
    let app = router(cluster.clone(), server).route(
        "/metrics",
        axum::routing::get(move || {
            let runtime = tokio::runtime::Handle::current().metrics();
            metrics::gauge!("hybrid_cluster_runtime_alive_tasks")
                .set(runtime.num_alive_tasks() as f64);
            std::future::ready(metrics.render())
        }),
    );
    // Small frames go out at once (no Nagle delay).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let stop_accepting = Arc::new(Notify::new());
    let serving = axum::serve(listener, app).with_graceful_shutdown({
        let stop = Arc::clone(&stop_accepting);
        async move { stop.notified().await }
    });
    let mut serving = tokio::spawn(serving.into_future());
    tokio::select! {
        served = &mut serving => return served?.map_err(Into::into),
        () = stop_signal() => {}
    }
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "shutting down: closing clients with a redirect, leaving the cluster"
    );
    stop_accepting.notify_one();
    // The grace period bounds the whole shutdown; a little more is allowed for the HTTP
    // server to let go of its last connections.
    let deadline = tokio::time::Instant::now() + grace + Duration::from_millis(500);
    let stopping = async {
        if let Err(error) = cluster.shutdown().await {
            tracing::error!(error = %hybrid_cluster::error_chain(&error), "shutdown was not clean");
        }
        match tokio::time::timeout_at(deadline, &mut serving).await {
            Ok(_) => {}
            Err(_) => tracing::warn!(
                "HTTP connections were still open at the end of the grace period: cut short"
            ),
        }
    };
    tokio::select! {
        () = stopping => {}
        () = stop_signal() => tracing::warn!("a second signal: stopping at once"),
        () = tokio::time::sleep_until(deadline) => {
            tracing::warn!("the shutdown did not end within its grace period: cut short");
        }
    }
    Ok(())
}
