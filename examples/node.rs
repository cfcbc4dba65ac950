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
//! a lone node on the embedded backends; `--redis-cluster URL,URL,…` instead of `--redis` for
//! a Redis Cluster, e.g. the one `scripts/redis-cluster.sh start` runs; `--amqp` takes the
//! nodes of a RabbitMQ cluster comma-separated, `amqp://…@h1:5672/%2f,amqp://…@h2:5673/%2f`,
//! with `--durability replicated`), `--strategy
//! least-connections|round-robin|least-resource-usage|random|p2c`, `--max-connections N`,
//! `--prefix P`, `--heartbeat-ms MS`, `--shutdown-grace-ms MS` (default 5000),
//! `--max-in-flight N` (the node's bound on messages awaiting the broker, default 256),
//! `--max-pending-per-connection N` (one client's requests in flight before the node stops
//! reading it, default 128), `--write-timeout-ms MS` (how long a write may wait for a client
//! that does not read before it is dropped, default 5000), `--durability
//! transient|durable|replicated` (what survives a broker restart, default durable: see the
//! README's delivery contract), `--group-buckets N` (group messages keyed by N buckets of
//! groups instead of one key per group, for heavy group churn: every node of a cluster needs
//! the same; see the README's Scale section), `--public-url URL` (the `ws://` or `wss://` URL clients reach
//! this node at, when it is behind TLS or a proxy: redirects and close reasons name it),
//! `--bind ADDR` (the address to listen on, default `0.0.0.0`), `--placement in-band|redirect`
//! (how a client the node does not keep learns where to go: `in-band`, the default, accepts
//! the WebSocket, sends `{"type":"redirect","url":URL,"reason":…}` or
//! `{"type":"unavailable","retry_after_ms":5000}` and closes with 4000 or 4001, which
//! browsers can read; `redirect` answers `307` with `Location:` or `503` with `Retry-After`,
//! for native clients that follow redirects), `--sessions` (with `--session-window-ms MS`,
//! `--session-max-messages N`, `--session-max-bytes BYTES`), `--jwt-secret SECRET` or
//! `--jwt-public-key FILE` (identify clients by an HS256 or RS256 JWT, `Authorization:
//! Bearer` or `?token=`; the welcome then names the user; prefer `HYBRID_CLUSTER_JWT_SECRET`
//! to the flag), `--jwt-audience AUD`, `--require-auth` (401 without a token), `--admin-token TOKEN` (or
//! `HYBRID_CLUSTER_ADMIN_TOKEN`: the token of `POST /cluster/users/{user}/disconnect`),
//! `--rate-limit N` (requests per second per connection, burst N). `RUST_LOG` sets the log level (default `info`);
//! `HYBRID_CLUSTER_SECRET` (at least 16 bytes, the same on every node) signs node-to-node
//! traffic.
//!
//! Serves `ws://HOST:P/ws` (the protocol of `hybrid_cluster::protocol`), `GET /cluster` (a
//! status page), `GET /cluster/nodes`, `GET /cluster/placement` (the node a new client should
//! connect to now, for clients that ask first), `GET /healthz` and `GET /metrics` (Prometheus
//! text form; see `hybrid_cluster::metrics` for what is there). Ctrl-C (or SIGTERM) shuts the node
//! down gracefully: clients are closed with code 1012 and a reason naming another node to
//! reconnect to, and the process ends within the shutdown grace period whatever state its
//! connections are in (the log names what was cut short); a second signal ends it at once.
//!
//! At start the node raises its open-file limit to the hard limit, so that it can hold as
//! many connections as the system allows, and warns when that is below `--max-connections`.

use std::error::Error;
use std::future::IntoFuture;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use clap::Parser;
use hybrid_cluster::server::{AdminToken, ServerAuth, ServerConfig, router_with};
use hybrid_cluster::{
    AmqpUrl, Backends, Cluster, ClusterConfig, ClusterPrefix, Durability, Identify, IdentityLayer,
    Jwt, NodeId, PlacementMode, RedisUrl, Strategy,
};
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::sync::Notify;
use tracing_subscriber::EnvFilter;

type BoxError = Box<dyn Error + Send + Sync>;

/// The node program's command line. Its flags are a public interface: scripts and
/// deployments name them, so a flag is never renamed and its default never moves.
#[derive(Debug, Parser)]
#[command(
    name = "node",
    about = "One node of a hybrid-cluster, serving the demo protocol on ws://HOST:PORT/ws",
    after_help = "RUST_LOG sets the log level (default info). HYBRID_CLUSTER_SECRET (at least \
16 bytes, the same on every node) signs node-to-node traffic.",
    // A flag given twice keeps its last value, as scripts that append overrides expect.
    args_override_self = true,
    // A value may start with `-`, as the hand-written parser this replaced allowed.
    allow_hyphen_values = true
)]
struct Args {
    /// This node's id (1-64 characters of A-Z a-z 0-9 _ - .).
    #[arg(long, value_name = "ID")]
    node_id: NodeId,
    /// The port to serve on.
    #[arg(long, value_name = "P")]
    port: u16,
    /// The host clients and redirects use to reach this node.
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1")]
    address: String,
    /// Redis, for discovery (give --amqp too, or neither for a lone node on the embedded
    /// backends).
    #[arg(long, value_name = "URL")]
    redis: Option<RedisUrl>,
    /// A Redis Cluster, for discovery, instead of --redis: seed URLs, comma-separated
    /// (redis://h1:7000,redis://h2:7001,...); one that answers is enough.
    #[arg(
        long,
        value_name = "URLS",
        value_delimiter = ',',
        conflicts_with = "redis"
    )]
    redis_cluster: Vec<RedisUrl>,
    /// RabbitMQ, for routing (give --redis or --redis-cluster too, or neither); the nodes of a
    /// RabbitMQ cluster comma-separated, tried in turn on each (re)connection.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    amqp: Vec<AmqpUrl>,
    /// How the node chooses where a client goes when it does not keep it.
    #[arg(long, value_enum, default_value_t = Strategy::default())]
    strategy: Strategy,
    /// Connections this node holds at most [default: 10000].
    #[arg(long, value_name = "N")]
    max_connections: Option<u32>,
    /// The cluster's prefix in Redis keys and RabbitMQ names.
    #[arg(long, value_name = "P")]
    prefix: Option<ClusterPrefix>,
    /// How often the node publishes its info.
    #[arg(long, value_name = "MS")]
    heartbeat_ms: Option<u64>,
    /// How long a graceful shutdown may take [default: 5000].
    #[arg(long, value_name = "MS")]
    shutdown_grace_ms: Option<u64>,
    /// The node's bound on messages awaiting the broker (at least 1) [default: 256].
    #[arg(long, value_name = "N")]
    max_in_flight: Option<usize>,
    /// One client's requests in flight before the node stops reading it (at least 1)
    /// [default: 128].
    #[arg(long, value_name = "N")]
    max_pending_per_connection: Option<usize>,
    /// How long a write may wait for a client that does not read before it is dropped
    /// [default: 5000].
    #[arg(long, value_name = "MS")]
    write_timeout_ms: Option<u64>,
    /// What survives a broker restart (see the README's delivery contract) [default: durable].
    #[arg(long, value_parser = ["transient", "durable", "replicated"])]
    durability: Option<String>,
    /// Key group messages by this many buckets of groups rather than one key per group: a
    /// join or a leave then rarely changes a binding (see the README's Scale section). Every
    /// node of a cluster needs the same.
    #[arg(long, value_name = "N")]
    group_buckets: Option<std::num::NonZeroU32>,
    /// The ws:// or wss:// URL clients reach this node at, behind TLS or a proxy: redirects
    /// and close reasons name it.
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// The address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0")]
    bind: IpAddr,
    /// How a client this node does not keep (it is full or draining, or the balancer places
    /// it elsewhere) learns where to go.
    #[arg(long, value_enum, default_value_t = Placement::InBand)]
    placement: Placement,
    /// Sessions that outlive connections: the welcome carries a token, messages carry `seq`,
    /// and a client that reconnects with `?resume=TOKEN&last=N` (to any node) gets what it
    /// missed. Every node of a cluster needs the same.
    #[arg(long)]
    sessions: bool,
    /// With --sessions: how long a session waits for its client (default 120000).
    #[arg(long, value_name = "MS", requires = "sessions")]
    session_window_ms: Option<u64>,
    /// With --sessions: the most messages a session's log keeps (default 1024).
    #[arg(long, value_name = "N", requires = "sessions")]
    session_max_messages: Option<usize>,
    /// With --sessions: the most payload bytes a session's log keeps (default 1 MiB).
    #[arg(long, value_name = "BYTES", requires = "sessions")]
    session_max_bytes: Option<usize>,
    /// Identify clients by an HS256 JWT signed with SECRET (`Authorization: Bearer` or
    /// `?token=`); prefer the HYBRID_CLUSTER_JWT_SECRET environment variable, which other
    /// users of the machine cannot read.
    #[arg(long, value_name = "SECRET", conflicts_with = "jwt_public_key")]
    jwt_secret: Option<String>,
    /// Identify clients by an RS256 JWT, verified with this PEM public key file.
    #[arg(long, value_name = "FILE")]
    jwt_public_key: Option<std::path::PathBuf>,
    /// Accept only tokens whose `aud` names AUD (without it, a token's `aud` is not checked).
    #[arg(long, value_name = "AUD")]
    jwt_audience: Option<String>,
    /// Refuse (401) clients without a token: needs --jwt-secret, --jwt-public-key or
    /// HYBRID_CLUSTER_JWT_SECRET.
    #[arg(long)]
    require_auth: bool,
    /// The token of `POST /cluster/users/{user}/disconnect`; prefer the
    /// HYBRID_CLUSTER_ADMIN_TOKEN environment variable.
    #[arg(long, value_name = "TOKEN")]
    admin_token: Option<String>,
    /// Each connection may send N requests per second, with a burst of N; past it a request
    /// gets `rate_limited`, and 100 refusals within 10 s close the connection (1008).
    #[arg(long, value_name = "N")]
    rate_limit: Option<u32>,
}

/// The variable holding the JWT secret (HS256).
const JWT_SECRET_ENV: &str = "HYBRID_CLUSTER_JWT_SECRET";
/// The variable holding the admin token.
const ADMIN_TOKEN_ENV: &str = "HYBRID_CLUSTER_ADMIN_TOKEN";

/// A setting from its flag, else from its environment variable (set and not empty).
fn flag_or_env(flag: Option<String>, variable: &str) -> Option<String> {
    flag.or_else(|| std::env::var(variable).ok())
        .filter(|value| !value.is_empty())
}

/// `--placement`: the node's [`PlacementMode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Placement {
    /// Accept the WebSocket, send one frame naming the node to connect to (or saying that
    /// none has room), then close with 4000 (or 4001): browsers can read it.
    InBand,
    /// Answer 307 with Location: the other node (or 503 with Retry-After), for native
    /// clients that follow redirects; a browser sees only a failed connection.
    Redirect,
}

impl From<Placement> for PlacementMode {
    fn from(placement: Placement) -> Self {
        match placement {
            Placement::InBand => Self::InBand,
            Placement::Redirect => Self::Redirect,
        }
    }
}

impl Args {
    /// Who clients are and the admin token, from the flags and the environment; never
    /// logged.
    fn auth(&mut self) -> Result<ServerAuth, BoxError> {
        let secret = flag_or_env(self.jwt_secret.take(), JWT_SECRET_ENV);
        let jwt = match (secret, &self.jwt_public_key) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "--jwt-public-key and a JWT secret ({JWT_SECRET_ENV} or --jwt-secret) \
                     exclude each other: tokens are verified one way"
                )
                .into());
            }
            (Some(secret), None) => Some(Jwt::hs256(secret.as_bytes())?),
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("--jwt-public-key {}: {e}", path.display()))?;
                Some(Jwt::rs256_pem(&pem).map_err(|e| format!("--jwt-public-key: {e}"))?)
            }
            (None, None) if self.require_auth => {
                return Err(format!(
                    "--require-auth needs --jwt-secret, --jwt-public-key or {JWT_SECRET_ENV}"
                )
                .into());
            }
            (None, None) => None,
        };
        let audience = self.jwt_audience.take();
        let jwt = jwt.map(|jwt| match &audience {
            Some(audience) => jwt.with_audience(&[audience.as_str()]),
            None => jwt,
        });
        let identity = jwt.map(|jwt| {
            let identify: Arc<dyn Identify> = Arc::new(jwt);
            let layer = IdentityLayer::new(identify);
            if self.require_auth {
                layer.required()
            } else {
                layer
            }
        });
        let admin_token =
            flag_or_env(self.admin_token.take(), ADMIN_TOKEN_ENV).and_then(AdminToken::new);
        Ok(ServerAuth {
            identity,
            admin_token,
        })
    }

    /// The cluster's and the server's configuration, and the backends, from the flags.
    fn into_config(self) -> Result<(ClusterConfig, Backends, ServerConfig), BoxError> {
        let (backends, amqp_fallbacks) =
            Backends::from_addresses(self.redis, self.redis_cluster, self.amqp)
                .map_err(|_| "give --redis (or --redis-cluster) and --amqp, or neither")?;
        if matches!(backends, Backends::Embedded { .. }) {
            tracing::warn!("no --redis/--amqp: a lone node on the embedded backends");
        }
        // The cluster secret, when HYBRID_CLUSTER_SECRET is set: never on the command line,
        // where other users of the machine could read it.
        let mut config =
            ClusterConfig::new(self.node_id, self.address, self.port).with_secret_from_env()?;
        if config.secret.is_some() {
            tracing::info!("HYBRID_CLUSTER_SECRET is set: node-to-node traffic is signed");
        }
        // The other nodes of a RabbitMQ cluster, tried after the first.
        config.rabbitmq.fallback_urls = amqp_fallbacks;
        config.strategy = self.strategy;
        config.placement_mode = self.placement.into();
        if let Some(prefix) = self.prefix {
            config.prefix = prefix;
        }
        if let Some(max) = self.max_connections {
            config.max_connections = max;
        }
        if let Some(ms) = self.heartbeat_ms {
            config.discovery = config.discovery.with_heartbeat(Duration::from_millis(ms));
        }
        if let Some(ms) = self.shutdown_grace_ms {
            config.shutdown_grace = Duration::from_millis(ms);
        }
        if let Some(durability) = self.durability {
            config.durability = durability.parse::<Durability>()?;
        }
        if let Some(buckets) = self.group_buckets {
            config.group_keys = hybrid_cluster::GroupKeys::Buckets(buckets);
        }
        if let Some(max) = self.max_in_flight {
            config.forward.max_in_flight = max.max(1);
        }
        if self.sessions {
            let mut limits = hybrid_cluster::SessionLimits::default();
            if let Some(ms) = self.session_window_ms {
                limits.resume_window = Duration::from_millis(ms.max(1));
            }
            if let Some(n) = self.session_max_messages {
                limits.max_messages = n.max(1);
            }
            if let Some(bytes) = self.session_max_bytes {
                limits.max_bytes = bytes;
            }
            config.sessions = Some(limits);
        }
        if let Some(n) = self.rate_limit {
            config.rate_limit = Some(hybrid_cluster::RateLimit::messages_per_second(n));
        }
        if let Some(url) = self.public_url {
            hybrid_cluster::check_public_url(&url)
                .map_err(|reason| format!("--public-url: {reason}"))?;
            config.public_url = Some(url);
        }
        let mut server = ServerConfig::default();
        if let Some(ms) = self.write_timeout_ms {
            server.write_timeout = Duration::from_millis(ms);
        }
        if let Some(max) = self.max_pending_per_connection {
            server.max_pending_per_connection = max.max(1);
        }
        Ok((config, backends, server))
    }
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
    let mut args = Args::parse();
    let bind = args.bind;
    let parsed = args.auth().and_then(|auth| Ok((args.into_config()?, auth)));
    let ((config, backends, server), auth) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("error: {error}\n\nFor more information, try '--help'.");
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
    let result = runtime.block_on(run(config, backends, server, auth, bind));
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
    auth: ServerAuth,
    bind: IpAddr,
) -> Result<(), BoxError> {
    let grace = config.shutdown_grace;
    let listener = tokio::net::TcpListener::bind((bind, config.port)).await?;
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let cluster = Cluster::start(config, backends).await?;
    let app = router_with(cluster.clone(), server, auth).route(
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
