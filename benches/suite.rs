//! The benchmark suite of issue 7: the whole system next to the physical limits of its parts,
//! measured in the same run, on the real Redis and RabbitMQ of this machine.
//!
//! ```sh
//! cargo bench --bench suite                    # every section (about 3 to 5 minutes)
//! cargo bench --bench suite -- --quick         # fewer messages, samples and connections
//! cargo bench --bench suite -- latency memory  # some sections only (names or numbers 1-6)
//! ```
//!
//! `REDIS_URL` (default `redis://127.0.0.1:6379`) and `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`) choose the servers. The table is printed and
//! written to `bench-results/suite.md`. Sections:
//!
//! 1. `throughput`: cross-node unicast, WebSocket client → node A → RabbitMQ → node B →
//!    WebSocket client, 128-byte `data`, `id`-less sends (no acks: the server still keeps up
//!    to `max_pending_per_connection` sends awaiting the broker's confirmation), 1 and 4
//!    sender/receiver pairs, in `transient` and in `durable` mode (the default: durable
//!    queues, persistent messages); next to raw lapin publish (confirms, 256 in flight) →
//!    consume, with a transient queue and with a durable one and persistent messages.
//! 2. `latency`: cross-node one-way latency (one message at a time, client on A to client on B,
//!    same process and clock), transient and durable, next to the raw AMQP publish → consume
//!    round and the raw tokio-tungstenite echo round trip.
//! 3. `local`: same-node one-way latency next to the raw WebSocket echo.
//! 4. `broadcast`: one broadcast reaching N clients spread over 3 nodes (the nodes run in a
//!    child process, so that N clients and N server sockets do not share one fd limit).
//! 5. `memory`: RSS growth per idle connection of one node (in a child process) next to a raw
//!    tokio-tungstenite server with the same 4 KiB buffers and with tungstenite's defaults.
//! 6. `balance`: the balancer's pick cost at 10/100/1000 nodes and discovery timings (join,
//!    graceful leave, crash), as `cargo bench -p hybrid-cluster-balance --bench pick` and
//!    `cargo bench -p hybrid-cluster-discovery --bench timings` measure them in more detail.
//!
//! Every run uses cluster prefixes of its own (`hc-suite:<run>:<section>`), shuts its nodes
//! down and deletes what they leave (exchanges, the dead-letter queue, Redis keys). Every loop
//! is bounded by a count and every wait by a timeout; all traffic stays on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::error::Error;
use std::fmt::Write as _;
use std::hint::black_box;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use clap::Parser;
use futures_util::stream::{self, FuturesUnordered, SplitSink};
use futures_util::{SinkExt, StreamExt};
use hybrid_cluster::balance::{NodeSet, Selector, Strategy};
use hybrid_cluster::discovery::{Discovery, DiscoveryConfig, RedisOptions, RedisRegistry};
use hybrid_cluster::server::{ServerConfig, router};
use hybrid_cluster::{
    AmqpUrl, Backends, Cluster, ClusterConfig, ClusterPrefix, Durability, Incarnation, NodeId,
    NodeInfo, RedisUrl,
};
use hybrid_cluster::{Epoch, LiveNodeInfo};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};

type BoxError = Box<dyn Error + Send + Sync>;
type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Sink = SplitSink<Ws, Message>;

/// The size of every payload: the `data` of a send, a raw AMQP body, a raw WebSocket frame.
const PAYLOAD: usize = 128;
/// Raw lapin publishes in flight (as the routing bench and TARGETS.md measure it).
const IN_FLIGHT: usize = 256;
/// The bound of any single wait (a frame, a connection, a shutdown).
const WAIT: Duration = Duration::from_secs(30);
/// The bound of a whole section.
const SECTION_LIMIT: Duration = Duration::from_secs(900);
/// Clients connecting at once.
const CONNECT_CONCURRENCY: usize = 64;
/// The environment variable that makes the bench binary a child server.
const CHILD_ENV: &str = "HC_SUITE_CHILD";
/// Where the table is written.
const RESULTS: &str = "bench-results/suite.md";

const SECTIONS: [&str; 6] = [
    "throughput",
    "latency",
    "local",
    "broadcast",
    "memory",
    "balance",
];

// ---------------------------------------------------------------------------------------------
// Options and sizes

/// The suite's command line.
#[derive(Debug, Parser)]
#[command(
    name = "suite",
    about = "The benchmark suite: ours next to the raw baselines"
)]
struct Options {
    /// Fewer messages, samples and connections.
    #[arg(long)]
    quick: bool,
    /// Passed by `cargo bench` to benches without a harness; nothing to do with it.
    #[arg(long, hide = true)]
    bench: bool,
    /// The sections to run, by name or number (1-6); every section when none is given.
    #[arg(value_name = "SECTION", value_parser = section_named)]
    sections: Vec<&'static str>,
}

impl Options {
    fn parse_args() -> Self {
        let mut options = Self::parse();
        if options.sections.is_empty() {
            options.sections = SECTIONS.to_vec();
        }
        options
    }
}

/// A section by its name or its number, counting from 1.
fn section_named(arg: &str) -> Result<&'static str, String> {
    SECTIONS
        .iter()
        .enumerate()
        .find(|(i, name)| **name == arg || arg.parse::<usize>().is_ok_and(|n| n == i + 1))
        .map(|(_, name)| *name)
        .ok_or_else(|| format!("expected a section ({} or 1-6)", SECTIONS.join(", ")))
}

struct Sizes {
    /// Messages per throughput run.
    messages: usize,
    /// Throughput rounds (the median is reported).
    rounds: usize,
    /// Latency samples per measure.
    samples: usize,
    /// Broadcast audiences.
    fanout: Vec<usize>,
    /// Broadcasts per audience (the median is reported).
    broadcasts: usize,
    /// Idle connections for the memory measure.
    idle: usize,
    /// Picks timed per strategy and size.
    picks: u32,
    /// Join and graceful-leave trials.
    join_trials: usize,
    /// Crash trials.
    crash_trials: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                messages: 20_000,
                rounds: 1,
                samples: 2_000,
                fanout: vec![1_000],
                broadcasts: 3,
                idle: 2_000,
                picks: 50_000,
                join_trials: 3,
                crash_trials: 1,
            }
        } else {
            Self {
                messages: 100_000,
                rounds: 3,
                samples: 10_000,
                fanout: vec![1_000, 10_000],
                broadcasts: 5,
                idle: 10_000,
                picks: 200_000,
                join_trials: 10,
                crash_trials: 2,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The report

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Met,
    Missed,
    Info,
}

impl Verdict {
    fn of(met: bool) -> Self {
        if met { Self::Met } else { Self::Missed }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Met => "MET",
            Self::Missed => "MISSED",
            Self::Info => "—",
        }
    }
}

struct Row {
    measure: String,
    ours: String,
    baseline: String,
    ratio: String,
    target: String,
    verdict: Verdict,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn row(
        &mut self,
        measure: impl Into<String>,
        ours: impl Into<String>,
        baseline: impl Into<String>,
        ratio: impl Into<String>,
        target: impl Into<String>,
        verdict: Verdict,
    ) {
        let row = Row {
            measure: measure.into(),
            ours: ours.into(),
            baseline: baseline.into(),
            ratio: ratio.into(),
            target: target.into(),
            verdict,
        };
        println!(
            "  {} | {} | {} | {} | {} | {}",
            row.measure,
            row.ours,
            row.baseline,
            row.ratio,
            row.target,
            row.verdict.as_str()
        );
        self.rows.push(row);
    }

    fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        println!("  note: {note}");
        self.notes.push(note);
    }

    fn markdown(&self, header: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{header}\n");
        let _ = writeln!(
            out,
            "| Measure | Ours | Baseline (same run) | Ratio | Target (issue 7) | Verdict |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---|---|");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                r.measure,
                r.ours,
                r.baseline,
                r.ratio,
                r.target,
                r.verdict.as_str()
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\nNotes:\n");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }
}

fn us(d: f64) -> String {
    format!("{d:.0} µs")
}

fn rate(r: f64) -> String {
    format!("{r:.0} msg/s")
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "—".to_owned()
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Latency percentiles, in microseconds.
#[derive(Clone, Copy)]
struct Lat {
    p50: f64,
    p99: f64,
    p999: f64,
}

impl Lat {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
            samples.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
        }
    }

    fn show(&self) -> String {
        format!("{:.0} / {:.0} / {:.0} µs", self.p50, self.p99, self.p999)
    }
}

// ---------------------------------------------------------------------------------------------
// Backends, nodes and their cleanup

fn redis_url() -> RedisUrl {
    std::env::var("REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
        .parse()
        .expect("REDIS_URL is a Redis connection string")
}

fn amqp_url() -> AmqpUrl {
    std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
        .parse()
        .expect("AMQP_URL is an AMQP URL")
}

const NODE_NAMES: [&str; 3] = ["a", "b", "c"];

struct RunningNode {
    cluster: Cluster,
    port: u16,
    server: JoinHandle<()>,
}

impl RunningNode {
    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }
}

/// Starts a node of the cluster `prefix` serving the demo protocol on a loopback port, as
/// `examples/cluster.rs` does (TCP_NODELAY on every accepted socket).
async fn start_node(
    prefix: &ClusterPrefix,
    name: &str,
    durability: Durability,
) -> Result<RunningNode, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let mut config = ClusterConfig::new(NodeId::new(name)?, "127.0.0.1", port);
    config.prefix = prefix.clone();
    config.durability = durability;
    config.max_connections = 1_000_000;
    config.shutdown_grace = Duration::from_secs(5);
    let cluster = timeout(
        WAIT,
        Cluster::start(config, Backends::servers(redis_url(), amqp_url())),
    )
    .await??;
    let app = router(cluster.clone(), ServerConfig::default());
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
async fn start_nodes(
    prefix: &ClusterPrefix,
    count: usize,
    durability: Durability,
) -> Result<Vec<RunningNode>, BoxError> {
    let mut nodes = Vec::new();
    for name in NODE_NAMES.iter().take(count) {
        nodes.push(start_node(prefix, name, durability).await?);
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

async fn stop_nodes(nodes: Vec<RunningNode>) {
    for node in nodes {
        match timeout(WAIT, node.cluster.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("a node did not shut down cleanly: {error}"),
            Err(_) => eprintln!("a node did not shut down within {WAIT:?}"),
        }
        node.server.abort();
    }
}

/// Deletes what a cluster may leave: its exchanges and dead-letter queue (which no node
/// deletes), the queues of nodes that did not shut down, its Redis keys.
async fn cleanup(prefix: &ClusterPrefix) {
    let cleaning = async {
        let connection =
            Connection::connect(&amqp_url().to_connection_string(), Default::default()).await?;
        let channel = connection.create_channel().await?;
        let dead_letter = format!("{prefix}:dead-letter");
        let queues = NODE_NAMES
            .iter()
            .map(|node| format!("{prefix}:node:{node}"))
            .chain([dead_letter.clone()]);
        for queue in queues {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [prefix.to_string(), dead_letter] {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = connection.close(200, "OK".into()).await;

        let registry =
            RedisRegistry::connect(&redis_url(), prefix, RedisOptions::default()).await?;
        let mut redis = registry.connection();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{{{prefix}}}*"))
            .query_async(&mut redis)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(keys).query_async(&mut redis).await?;
        }
        Ok::<_, BoxError>(())
    };
    match timeout(WAIT, cleaning).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => eprintln!("cleaning up {prefix} failed: {error}"),
        Err(_) => eprintln!("cleaning up {prefix} timed out"),
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket clients and payloads

/// Client settings for the many idle clients of sections 4 and 5 (the parent's memory only).
fn small_buffers() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096)
}

async fn connect(url: &str, config: Option<WebSocketConfig>) -> Result<Ws, BoxError> {
    // `true`: TCP_NODELAY on the client socket.
    let (ws, _) = timeout(WAIT, connect_async_with_config(url, config, true)).await??;
    Ok(ws)
}

/// The next text frame (pings and pongs skipped), within `WAIT`.
async fn next_text(ws: &mut Ws) -> Result<String, BoxError> {
    for _ in 0..1000 {
        match timeout(WAIT, ws.next()).await {
            Err(_) => return Err("no frame arrived".into()),
            Ok(None) => return Err("the connection ended".into()),
            Ok(Some(Err(error))) => return Err(error.into()),
            Ok(Some(Ok(Message::Text(text)))) => return Ok(text.as_str().to_owned()),
            Ok(Some(Ok(Message::Close(close)))) => return Err(format!("closed: {close:?}").into()),
            Ok(Some(Ok(_))) => {}
        }
    }
    Err("only control frames arrived".into())
}

/// Connects a demo-protocol client and reads its welcome: the socket and its connection id.
async fn client(url: &str, config: Option<WebSocketConfig>) -> Result<(Ws, String), BoxError> {
    let mut ws = connect(url, config).await?;
    let welcome: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await?)?;
    let id = welcome["connection_id"]
        .as_str()
        .ok_or_else(|| format!("not a welcome: {welcome}"))?
        .to_owned();
    Ok((ws, id))
}

/// A `data` value of exactly `PAYLOAD` bytes: a JSON string starting with an 8-digit sequence.
fn data(seq: usize) -> String {
    let mut s = format!("\"{seq:08}");
    while s.len() < PAYLOAD - 1 {
        s.push('x');
    }
    s.push('"');
    s
}

fn send_frame(to: &str, seq: usize) -> String {
    format!(r#"{{"op":"send","to":"{to}","data":{}}}"#, data(seq))
}

/// The sequence number of a delivered message or broadcast.
fn seq_of(frame: &str) -> Option<usize> {
    let start = frame.find("\"data\":\"")? + 8;
    frame.get(start..start + 8)?.parse().ok()
}

/// Connects `n` clients round robin over `urls`, `CONNECT_CONCURRENCY` at a time; reads the
/// welcome of each when `welcome`. Returns the clients and the failures.
async fn connect_many(urls: &[String], n: usize, welcome: bool) -> (Vec<Ws>, usize) {
    let results: Vec<Result<Ws, BoxError>> = stream::iter(0..n)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            async move {
                if welcome {
                    client(&url, Some(small_buffers())).await.map(|(ws, _)| ws)
                } else {
                    connect(&url, Some(small_buffers())).await
                }
            }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let mut clients = Vec::with_capacity(n);
    let mut failures = 0;
    let mut first_error = None;
    for result in results {
        match result {
            Ok(ws) => clients.push(ws),
            Err(error) => {
                failures += 1;
                first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    if let Some(error) = first_error {
        eprintln!("{failures} of {n} clients could not connect; the first: {error}");
    }
    (clients, failures)
}

/// A raw tokio-tungstenite echo server on loopback (TCP_NODELAY), accepting at most
/// `max_accepts` connections; abort the task to stop it.
async fn echo_server(
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

// ---------------------------------------------------------------------------------------------
// Limits of this machine

/// The soft limit of open files of this process.
fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

/// Ephemeral ports available to connect from.
fn ephemeral_ports() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| {
            let mut it = range.split_whitespace().map(|v| v.parse::<usize>().ok());
            Some(it.next()??.abs_diff(it.next()??) + 1)
        })
        .unwrap_or(28_000)
}

/// How many clients of `wanted` this process can hold (its fd limit, less a margin for the
/// brokers' connections and the rest, and the ephemeral ports), and why fewer.
fn client_budget(wanted: usize) -> (usize, Option<String>) {
    let fds = fd_limit().saturating_sub(300);
    let ports = ephemeral_ports().saturating_sub(1000);
    let n = wanted.min(fds).min(ports);
    if n < wanted {
        (
            n,
            Some(format!(
                "{n} connections instead of {wanted}: open-file limit {}, {} ephemeral ports (raise with `ulimit -n`)",
                fd_limit(),
                ephemeral_ports()
            )),
        )
    } else {
        (n, None)
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Child processes: the servers whose resources must not be shared with the clients

/// A child server: this bench binary re-executed with `HC_SUITE_CHILD=<mode>`. It prints
/// `PORTS p1 p2 …` when serving, and stops (nodes shut down gracefully) when its stdin closes.
struct ChildServer {
    child: Child,
    ports: Vec<u16>,
}

impl ChildServer {
    async fn spawn(mode: String) -> Result<Self, BoxError> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(CHILD_ENV, &mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let reading = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = match timeout(Duration::from_secs(60), reading).await {
            Ok(Ok(Ok(line))) => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the child server `{mode}` did not start: {other:?}").into());
            }
        };
        let ports: Vec<u16> = line
            .strip_prefix("PORTS ")
            .map(|ports| {
                ports
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if ports.is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the child server `{mode}` said {line:?}").into());
        }
        Ok(Self { child, ports })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("ws://127.0.0.1:{p}/ws"))
            .collect()
    }

    /// Closes its stdin and waits for it to exit (killing it after `WAIT`).
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("the child server did not exit: killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's side: `nodes:<prefix>:<count>`, `raw:4k` or `raw:default`.
fn child_main(mode: &str) -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stdin_closed = || {
            tokio::task::spawn_blocking(|| {
                let mut sink = Vec::new();
                let _ = std::io::stdin().read_to_end(&mut sink);
            })
        };
        if let Some(rest) = mode.strip_prefix("nodes:") {
            let (prefix, count) = rest.rsplit_once(':').ok_or("nodes:<prefix>:<count>")?;
            let prefix = ClusterPrefix::new(prefix)?;
            let nodes = start_nodes(&prefix, count.parse()?, Durability::default()).await?;
            let ports: Vec<String> = nodes.iter().map(|n| n.port.to_string()).collect();
            println!("PORTS {}", ports.join(" "));
            let _ = stdin_closed().await;
            stop_nodes(nodes).await;
        } else {
            let config = match mode {
                "raw:4k" => small_buffers(),
                "raw:default" => WebSocketConfig::default(),
                other => return Err(format!("unknown child mode {other}").into()),
            };
            let (port, server) = echo_server(Some(config), 100_000).await?;
            println!("PORTS {port}");
            let _ = stdin_closed().await;
            server.abort();
        }
        Ok::<_, BoxError>(())
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Raw lapin (as layers/routing/benches/throughput.rs measures it)

fn tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

async fn amqp_connection() -> Result<Connection, BoxError> {
    Ok(Connection::connect(
        &amqp_url().to_connection_string(),
        ConnectionProperties::default(),
    )
    .await?)
}

async fn declare_raw_queue(
    channel: &lapin::Channel,
    queue: &str,
    durable: bool,
) -> Result<(), BoxError> {
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
    let options = QueueDeclareOptions {
        durable,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), options, arguments)
        .await?;
    Ok(())
}

/// Raw lapin: one connection publishes `n` × 128 B with publisher confirms, 256 in flight, to
/// a queue another connection consumes (prefetch 256), acknowledging each (pipelined) or not
/// at all (`no_ack`, the ceiling); `durable`: a durable queue and persistent messages, so a
/// confirm means on disk. Messages per second, first publish to last delivery. Also returns
/// how many deliveries came after one published later (out of order).
async fn raw_lapin_rate(n: usize, no_ack: bool, durable: bool) -> Result<(f64, usize), BoxError> {
    let publisher = amqp_connection().await?;
    let consumer_conn = amqp_connection().await?;
    let queue = format!("hc-suite:raw:{}", tag());
    let pub_channel = publisher.create_channel().await?;
    declare_raw_queue(&pub_channel, &queue, durable).await?;
    pub_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let sub_channel = consumer_conn.create_channel().await?;
    sub_channel
        .basic_qos(256, BasicQosOptions::default())
        .await?;
    let mut consumer = sub_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let consuming = tokio::spawn(async move {
        let mut acks = FuturesUnordered::new();
        let (mut seen, mut late, mut highest) = (0, 0, None);
        while seen < n {
            tokio::select! {
                biased;
                Some(()) = acks.next(), if !acks.is_empty() => continue,
                delivery = timeout(WAIT, consumer.next()) => {
                    let Ok(Some(Ok(delivery))) = delivery else { break };
                    seen += 1;
                    let seq = std::str::from_utf8(&delivery.data[..8]).ok().and_then(|s| s.parse::<usize>().ok());
                    if seq < highest {
                        late += 1;
                    }
                    highest = highest.max(seq);
                    if no_ack {
                        continue;
                    }
                    let mut ack = Box::pin(async move {
                        let _ = delivery.ack(BasicAckOptions::default()).await;
                    });
                    if std::future::poll_fn(|cx| std::task::Poll::Ready(ack.as_mut().poll(cx)))
                        .await
                        .is_pending()
                    {
                        acks.push(ack);
                    }
                }
            }
        }
        while let Ok(Some(())) = timeout(WAIT, acks.next()).await {}
        (seen, late)
    });

    let start = Instant::now();
    let mut confirms = FuturesUnordered::new();
    for i in 0..n {
        // The body starts with its 8-digit sequence number, so the consumer can check order.
        let mut payload = format!("{i:08}").into_bytes();
        payload.resize(PAYLOAD, b'x');
        if confirms.len() >= IN_FLIGHT {
            timeout(WAIT, confirms.next())
                .await
                .map_err(|_| "no confirm")?;
        }
        let channel = pub_channel.clone();
        let queue = queue.clone();
        let mut publish = Box::pin(async move {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default().with_delivery_mode(if durable { 2 } else { 1 }),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack());
        });
        // Poll once now so that publishes are written in order, as the forwarding service does.
        if std::future::poll_fn(|cx| std::task::Poll::Ready(publish.as_mut().poll(cx)))
            .await
            .is_pending()
        {
            confirms.push(publish);
        }
    }
    while let Ok(Some(())) = timeout(WAIT, confirms.next()).await {}
    let (seen, late) = consuming.await?;
    let elapsed = start.elapsed();
    let _ = pub_channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = publisher.close(200, "OK".into()).await;
    let _ = consumer_conn.close(200, "OK".into()).await;
    if seen < n {
        return Err(format!("raw lapin: {seen} of {n} consumed").into());
    }
    Ok((n as f64 / elapsed.as_secs_f64(), late))
}

/// One latency measure, sampled one message at a time.
#[allow(clippy::large_enum_variant)] // a handful of probes, built once
enum Probe {
    /// Raw AMQP: publish (confirms on) → the consumer on another connection has it. The
    /// confirm and the ack are awaited after the sample, before the next message.
    Amqp {
        publisher: Connection,
        consumer_conn: Connection,
        channel: lapin::Channel,
        consumer: lapin::Consumer,
        queue: String,
    },
    /// Raw tokio-tungstenite echo round trip on loopback (TCP_NODELAY both ways).
    Echo { ws: Box<Ws>, server: JoinHandle<()> },
    /// Through the cluster, one way: `from` sends to `to_id`, `to` has it (one process, one
    /// clock).
    OneWay {
        from: Box<Ws>,
        to: Box<Ws>,
        to_id: String,
        seq: usize,
    },
}

impl Probe {
    async fn amqp() -> Result<Self, BoxError> {
        let publisher = amqp_connection().await?;
        let consumer_conn = amqp_connection().await?;
        let queue = format!("hc-suite:rtt:{}", tag());
        let channel = publisher.create_channel().await?;
        declare_raw_queue(&channel, &queue, false).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let sub_channel = consumer_conn.create_channel().await?;
        let consumer = sub_channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self::Amqp {
            publisher,
            consumer_conn,
            channel,
            consumer,
            queue,
        })
    }

    async fn echo() -> Result<Self, BoxError> {
        let (port, server) = echo_server(None, 4).await?;
        let ws = connect(&format!("ws://127.0.0.1:{port}/"), None).await?;
        Ok(Self::Echo {
            ws: Box::new(ws),
            server,
        })
    }

    async fn one_way(from_url: &str, to_url: &str) -> Result<Self, BoxError> {
        let (from, _) = client(from_url, None).await?;
        let (to, to_id) = client(to_url, None).await?;
        Ok(Self::OneWay {
            from: Box::new(from),
            to: Box::new(to),
            to_id,
            seq: 0,
        })
    }

    async fn sample(&mut self) -> Result<Duration, BoxError> {
        match self {
            Self::Amqp {
                channel,
                consumer,
                queue,
                ..
            } => {
                let payload = [7u8; PAYLOAD];
                let start = Instant::now();
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &payload,
                        BasicProperties::default(),
                    )
                    .await?;
                let delivery = timeout(WAIT, consumer.next())
                    .await
                    .map_err(|_| "no delivery")?
                    .ok_or("the consumer ended")??;
                let elapsed = start.elapsed();
                delivery.ack(BasicAckOptions::default()).await?;
                timeout(WAIT, confirm).await.map_err(|_| "no confirm")??;
                Ok(elapsed)
            }
            Self::Echo { ws, .. } => {
                let payload = "x".repeat(PAYLOAD);
                let start = Instant::now();
                ws.send(Message::text(payload)).await?;
                next_text(ws).await?;
                Ok(start.elapsed())
            }
            Self::OneWay {
                from,
                to,
                to_id,
                seq,
            } => {
                *seq += 1;
                let frame = send_frame(to_id, *seq);
                let start = Instant::now();
                from.send(Message::text(frame)).await?;
                let got = next_text(to).await?;
                let elapsed = start.elapsed();
                if seq_of(&got) != Some(*seq) {
                    return Err(format!("expected message {seq}, got {got}").into());
                }
                Ok(elapsed)
            }
        }
    }

    async fn close(self) {
        match self {
            Self::Amqp {
                publisher,
                consumer_conn,
                channel,
                queue,
                ..
            } => {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
                let _ = publisher.close(200, "OK".into()).await;
                let _ = consumer_conn.close(200, "OK".into()).await;
            }
            Self::Echo { mut ws, server } => {
                let _ = timeout(WAIT, WebSocketStream::close(&mut *ws, None)).await;
                server.abort();
            }
            Self::OneWay { .. } => {}
        }
    }
}

/// Samples every probe `samples` times (after 200 warm-up samples each), interleaved in blocks
/// of 100 so that the load of this shared machine weighs on all of them alike.
async fn interleaved(probes: &mut [Probe], samples: usize) -> Result<Vec<Lat>, BoxError> {
    const BLOCK: usize = 100;
    for probe in probes.iter_mut() {
        for _ in 0..200 {
            probe.sample().await?;
        }
    }
    let mut measured: Vec<Vec<Duration>> = probes.iter().map(|_| Vec::new()).collect();
    for block in 0..samples.div_ceil(BLOCK) {
        let count = BLOCK.min(samples - block * BLOCK);
        for (probe, measured) in probes.iter_mut().zip(&mut measured) {
            for _ in 0..count {
                measured.push(probe.sample().await?);
            }
        }
    }
    Ok(measured.into_iter().map(Lat::of).collect())
}

/// Runs `interleaved` and closes the probes whatever happened.
async fn measure(mut probes: Vec<Probe>, samples: usize) -> Result<Vec<Lat>, BoxError> {
    let result = interleaved(&mut probes, samples).await;
    for probe in probes {
        probe.close().await;
    }
    result
}

// ---------------------------------------------------------------------------------------------
// The sections

struct Ctx {
    sizes: Sizes,
    run: String,
    report: Report,
}

impl Ctx {
    fn prefix(&self, section: &str) -> ClusterPrefix {
        ClusterPrefix::new(format!("hc-suite:{}:{section}", self.run)).expect("a valid prefix")
    }
}

/// What one cross-node throughput run saw.
struct Unicast {
    rate: f64,
    lost: usize,
    out_of_order: usize,
}

/// `pairs` senders on `a`, each sending `total / pairs` messages without ids to its receiver
/// on `b`, which counts them. Rate: messages received / (first send → last receipt).
async fn unicast_run(
    a: &RunningNode,
    b: &RunningNode,
    pairs: usize,
    total: usize,
) -> Result<Unicast, BoxError> {
    let per_pair = total / pairs;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..pairs {
        let (sender, _) = client(&a.url(), None).await?;
        let (receiver, receiver_id) = client(&b.url(), None).await?;
        let frames: Vec<String> = (0..per_pair).map(|i| send_frame(&receiver_id, i)).collect();
        senders.push((sender, frames));
        receivers.push(receiver);
    }
    // Receivers: count, check order, remember when the last one came.
    let receiving: Vec<JoinHandle<(usize, usize, Instant)>> = receivers
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                // Out of order: a message arriving after one sent later than it.
                let (mut got, mut out_of_order, mut highest) = (0, 0, None);
                let mut last = Instant::now();
                while got < per_pair {
                    match timeout(Duration::from_secs(10), ws.next()).await {
                        Ok(Some(Ok(Message::Text(text)))) => {
                            let seq = seq_of(text.as_str());
                            if seq < highest {
                                out_of_order += 1;
                            }
                            highest = highest.max(seq);
                            got += 1;
                            last = Instant::now();
                        }
                        Ok(Some(Ok(_))) => {}
                        _ => break,
                    }
                }
                (got, out_of_order, last)
            })
        })
        .collect();
    let start = Instant::now();
    let sending: Vec<JoinHandle<Result<Ws, BoxError>>> = senders
        .into_iter()
        .map(|(mut ws, frames)| {
            tokio::spawn(async move {
                // Frames are fed and flushed 16 at a time (a client writing as fast as it can).
                for (i, frame) in frames.into_iter().enumerate() {
                    timeout(WAIT, ws.feed(Message::text(frame)))
                        .await
                        .map_err(|_| "the node stopped reading")??;
                    if i % 16 == 15 {
                        timeout(WAIT, ws.flush()).await.map_err(|_| "flush")??;
                    }
                }
                timeout(WAIT, ws.flush()).await.map_err(|_| "flush")??;
                Ok(ws)
            })
        })
        .collect();
    let mut kept = Vec::new();
    for sending in sending {
        kept.push(sending.await??);
    }
    let (mut got, mut out_of_order, mut last) = (0, 0, start);
    for receiving in receiving {
        let (g, o, l) = receiving.await?;
        got += g;
        out_of_order += o;
        last = last.max(l);
    }
    drop(kept);
    Ok(Unicast {
        rate: got as f64 / (last - start).as_secs_f64(),
        lost: per_pair * pairs - got,
        out_of_order,
    })
}

/// Cross-node throughput of one cluster in one durability mode, 1 and 4 pairs, over the
/// rounds: the medians, and the messages lost and out of order over all runs.
struct ModeThroughput {
    one: f64,
    four: f64,
    lost: usize,
    late: usize,
}

async fn throughput_rounds(ctx: &Ctx, mode: Durability) -> Result<ModeThroughput, BoxError> {
    let (n, rounds) = (ctx.sizes.messages, ctx.sizes.rounds);
    let prefix = ctx.prefix(&format!("throughput-{mode}"));
    let nodes = start_nodes(&prefix, 2, mode).await?;
    let result = async {
        let (mut ones, mut fours, mut lost, mut late) = (Vec::new(), Vec::new(), 0, 0);
        for round in 1..=rounds {
            let one = unicast_run(&nodes[0], &nodes[1], 1, n).await?;
            let four = unicast_run(&nodes[0], &nodes[1], 4, n).await?;
            println!(
                "  round {round}, {mode}: cluster 1 pair {:.0}, 4 pairs {:.0} msg/s",
                one.rate, four.rate
            );
            lost += one.lost + four.lost;
            late += one.out_of_order + four.out_of_order;
            ones.push(one.rate);
            fours.push(four.rate);
        }
        Ok::<_, BoxError>(ModeThroughput {
            one: median(ones),
            four: median(fours),
            lost,
            late,
        })
    }
    .await;
    stop_nodes(nodes).await;
    cleanup(&prefix).await;
    result
}

async fn section_throughput(ctx: &mut Ctx) -> Result<(), BoxError> {
    let n = ctx.sizes.messages;
    let rounds = ctx.sizes.rounds;
    // The raw broker, measured between the cluster runs so that both see the same machine.
    let (mut raw_acks, mut raw_no_acks, mut raw_durables, mut late_raw) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    let mut raw_errors = Vec::new();
    let transient = throughput_rounds(ctx, Durability::Transient).await?;
    for round in 1..=rounds {
        match async {
            let (raw_ack, late_ack) = raw_lapin_rate(n, false, false).await?;
            let (raw_no_ack, late_no_ack) = raw_lapin_rate(n, true, false).await?;
            let (raw_durable, late_durable) = raw_lapin_rate(n, false, true).await?;
            println!(
                "  round {round}: raw lapin ack {raw_ack:.0}, no-ack {raw_no_ack:.0}, durable {raw_durable:.0} msg/s"
            );
            Ok::<_, BoxError>((raw_ack, raw_no_ack, raw_durable, late_ack + late_no_ack + late_durable))
        }
        .await
        {
            Ok((ack, no_ack, durable, late)) => {
                raw_acks.push(ack);
                raw_no_acks.push(no_ack);
                raw_durables.push(durable);
                late_raw += late;
            }
            Err(error) => raw_errors.push(error.to_string()),
        }
    }
    if let Some(error) = raw_errors.first() {
        return Err(error.clone().into());
    }
    let durable = throughput_rounds(ctx, Durability::Durable).await?;
    let (raw_ack, raw_no_ack, raw_durable) =
        (median(raw_acks), median(raw_no_acks), median(raw_durables));
    let r = &mut ctx.report;
    for (label, ours) in [("1 pair", transient.one), ("4 pairs", transient.four)] {
        r.row(
            format!("1. cross-node unicast, transient, {label} ({n} × 128 B, no ids)"),
            rate(ours),
            format!("{} raw lapin confirms + ack", rate(raw_ack)),
            ratio(ours, raw_ack),
            "≥ 0.80 × raw",
            Verdict::of(ours >= 0.8 * raw_ack),
        );
    }
    for (label, ours) in [("1 pair", durable.one), ("4 pairs", durable.four)] {
        r.row(
            format!("1. cross-node unicast, durable (the default), {label}"),
            rate(ours),
            format!(
                "{} raw lapin transient confirms + ack ({} durable)",
                rate(raw_ack),
                rate(raw_durable)
            ),
            ratio(ours, raw_ack),
            "≥ 1.0 × raw transient",
            Verdict::of(ours >= raw_ack),
        );
    }
    r.row(
        "1. raw lapin confirms, consumer no-ack (ceiling)",
        "—",
        rate(raw_no_ack),
        format!("{} (transient, 4 pairs)", ratio(transient.four, raw_no_ack)),
        "—",
        Verdict::Info,
    );
    r.note(format!(
        "1: median of {rounds} round(s); over all cluster runs {} messages lost (transient {}, durable {}), {} arrived after a message their sender sent later (transient {}, durable {}); raw lapin (same poll-once publishing): {late_raw} out of order; raw durable: a durable queue, persistent messages, confirms, an ack per message",
        transient.lost + durable.lost,
        transient.lost,
        durable.lost,
        transient.late + durable.late,
        transient.late,
        durable.late
    ));
    Ok(())
}

async fn section_latency(ctx: &mut Ctx) -> Result<(), BoxError> {
    let samples = ctx.sizes.samples;
    let prefix = ctx.prefix("latency");
    let durable_prefix = ctx.prefix("latency-durable");
    let nodes = start_nodes(&prefix, 2, Durability::Transient).await?;
    let durable_nodes = start_nodes(&durable_prefix, 2, Durability::Durable).await?;
    let result = async {
        let probes = vec![
            Probe::one_way(&nodes[0].url(), &nodes[1].url()).await?,
            Probe::amqp().await?,
            Probe::echo().await?,
            Probe::one_way(&durable_nodes[0].url(), &durable_nodes[1].url()).await?,
        ];
        measure(probes, samples).await
    }
    .await;
    stop_nodes(nodes).await;
    stop_nodes(durable_nodes).await;
    cleanup(&prefix).await;
    cleanup(&durable_prefix).await;
    let (ours, amqp, ws, durable) = match result?[..] {
        [ours, amqp, ws, durable] => (ours, amqp, ws, durable),
        _ => return Err("four measures expected".into()),
    };
    let sum50 = amqp.p50 + ws.p50;
    let budget = sum50 + 100.0;
    let r = &mut ctx.report;
    r.row(
        "2. cross-node latency p50, transient (one-way, A → B)",
        us(ours.p50),
        format!("{} AMQP + WS echo", us(sum50)),
        ratio(ours.p50, sum50),
        format!("≤ sum + 100 µs = {}", us(budget)),
        Verdict::of(ours.p50 <= budget),
    );
    r.row(
        "2. cross-node latency p99, transient",
        us(ours.p99),
        format!("{} AMQP p99 + WS p99", us(amqp.p99 + ws.p99)),
        ratio(ours.p99, amqp.p99 + ws.p99),
        format!("≤ 2 × (p50 sum + 100 µs) = {}", us(2.0 * budget)),
        Verdict::of(ours.p99 <= 2.0 * budget),
    );
    r.row(
        "2. cross-node latency p999, transient",
        us(ours.p999),
        format!("{} AMQP p999 + WS p999", us(amqp.p999 + ws.p999)),
        ratio(ours.p999, amqp.p999 + ws.p999),
        "—",
        Verdict::Info,
    );
    r.row(
        "2. cross-node latency, durable (the default), p50/p99/p999",
        durable.show(),
        format!("{} transient p99", us(ours.p99)),
        ratio(durable.p99, ours.p99),
        "p99 ≤ 2 ms",
        Verdict::of(durable.p99 <= 2_000.0),
    );
    r.row(
        "2. raw AMQP publish → consume p50/p99/p999",
        "—",
        amqp.show(),
        "—",
        "—",
        Verdict::Info,
    );
    r.row(
        "2. raw WebSocket echo RTT p50/p99/p999",
        "—",
        ws.show(),
        "—",
        "—",
        Verdict::Info,
    );
    r.note(format!(
        "2, 3: {samples} samples each after 200 warm-up, the measures interleaved in blocks of 100; cluster latency is one-way (send → the target client has it), raw AMQP is publish → delivery (confirms on, awaited after), raw WS is a full echo round trip"
    ));
    Ok(())
}

async fn section_local(ctx: &mut Ctx) -> Result<(), BoxError> {
    let samples = ctx.sizes.samples;
    let prefix = ctx.prefix("local");
    let nodes = start_nodes(&prefix, 1, Durability::default()).await?;
    let result = async {
        let probes = vec![
            Probe::one_way(&nodes[0].url(), &nodes[0].url()).await?,
            Probe::echo().await?,
        ];
        measure(probes, samples).await
    }
    .await;
    stop_nodes(nodes).await;
    cleanup(&prefix).await;
    let (ours, ws) = match result?[..] {
        [ours, ws] => (ours, ws),
        _ => return Err("two measures expected".into()),
    };
    let r = &mut ctx.report;
    r.row(
        "3. local delivery latency p50 (one node)",
        us(ours.p50),
        format!("{} WS echo", us(ws.p50)),
        ratio(ours.p50, ws.p50),
        format!("≤ 1.5 × WS echo = {}", us(1.5 * ws.p50)),
        Verdict::of(ours.p50 <= 1.5 * ws.p50),
    );
    r.row(
        "3. local delivery latency p99 / p999",
        format!("{:.0} / {:.0} µs", ours.p99, ours.p999),
        format!("{:.0} / {:.0} µs WS echo", ws.p99, ws.p999),
        ratio(ours.p99, ws.p99),
        "—",
        Verdict::Info,
    );
    Ok(())
}

/// One broadcast to `wanted` clients over 3 nodes of a child process, `rounds` times.
async fn broadcast_fanout(ctx: &mut Ctx, wanted: usize, rounds: usize) -> Result<(), BoxError> {
    let (budget, why) = client_budget(wanted);
    if let Some(why) = &why {
        ctx.report.note(format!("4: {why}"));
    }
    let prefix = ctx.prefix(&format!("broadcast{wanted}"));
    let child = ChildServer::spawn(format!("nodes:{prefix}:3")).await?;
    let result = async {
        let (clients, failures) = connect_many(&child.urls(), budget, true).await;
        let n = clients.len();
        if n == 0 {
            return Err::<_, BoxError>("no client connected".into());
        }
        let (tx, mut rx) = mpsc::channel::<(usize, Instant)>(n + 16);
        let mut sinks: Vec<Sink> = Vec::with_capacity(n);
        let mut readers = Vec::with_capacity(n);
        for ws in clients {
            let (sink, mut stream) = ws.split();
            sinks.push(sink);
            let tx = tx.clone();
            readers.push(tokio::spawn(async move {
                for _ in 0..rounds + 10 {
                    match timeout(Duration::from_secs(300), stream.next()).await {
                        Ok(Some(Ok(Message::Text(text)))) => {
                            if let Some(seq) = seq_of(text.as_str()) {
                                let _ = tx.send((seq, Instant::now())).await;
                            }
                        }
                        Ok(Some(Ok(_))) => {}
                        _ => break,
                    }
                }
            }));
        }
        drop(tx);
        let mut times = Vec::new();
        let mut short = 0;
        for round in 0..rounds {
            let frame = format!(r#"{{"op":"broadcast","data":{}}}"#, data(round));
            let start = Instant::now();
            timeout(WAIT, sinks[0].send(Message::text(frame)))
                .await
                .map_err(|_| "the broadcast was not sent")??;
            let mut got = 0;
            let mut last = start;
            let deadline = start + Duration::from_secs(60);
            while got < n {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some((seq, at))) if seq == round => {
                        got += 1;
                        last = last.max(at);
                    }
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            short += n - got;
            times.push((last - start).as_secs_f64());
            // Let the nodes settle before the next round.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(sinks);
        for reader in readers {
            reader.abort();
        }
        Ok((n, failures, median(times), short))
    }
    .await;
    child.stop().await;
    cleanup(&prefix).await;
    let (n, failures, time, short) = result?;
    ctx.report.row(
        format!("4. one broadcast → {n} clients on 3 nodes, time to the last"),
        format!("{:.1} ms", time * 1e3),
        "—",
        "—",
        "— (socket.io 30 ms, socketioxide 24 ms at 1k on 2 nodes, TARGETS.md)",
        Verdict::Info,
    );
    ctx.report.row(
        format!("4. broadcast deliveries per second ({n} clients)"),
        format!("{:.0} msg/s", n as f64 / time),
        "—",
        "—",
        "—",
        Verdict::Info,
    );
    if failures > 0 || short > 0 {
        ctx.report.note(format!(
            "4 ({wanted}): {failures} clients failed to connect; {short} deliveries missing over {rounds} broadcasts"
        ));
    }
    Ok(())
}

async fn section_broadcast(ctx: &mut Ctx) -> Result<(), BoxError> {
    let rounds = ctx.sizes.broadcasts;
    for wanted in ctx.sizes.fanout.clone() {
        broadcast_fanout(ctx, wanted, rounds).await?;
    }
    ctx.report.note(format!(
        "4: the 3 nodes run in a child process (its own fd limit), the clients in this one; median of {rounds} broadcasts, the sender is one of the clients (it gets its broadcast too)"
    ));
    Ok(())
}

/// RSS growth of a child server per idle connection: (KiB per connection, connections).
async fn idle_memory(mode: String, wanted: usize, welcome: bool) -> Result<(f64, usize), BoxError> {
    let child = ChildServer::spawn(mode).await?;
    let result = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(child.pid()).ok_or("no VmRSS")?;
        let (clients, _) = connect_many(&child.urls(), wanted, welcome).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_kib(child.pid()).ok_or("no VmRSS")?;
        let n = clients.len();
        drop(clients);
        if n == 0 {
            return Err::<_, BoxError>("no client connected".into());
        }
        Ok((after.saturating_sub(before) as f64 / n as f64, n))
    }
    .await;
    child.stop().await;
    result
}

async fn section_memory(ctx: &mut Ctx) -> Result<(), BoxError> {
    let (budget, why) = client_budget(ctx.sizes.idle);
    if let Some(why) = &why {
        ctx.report.note(format!("5: {why}"));
    }
    let prefix = ctx.prefix("memory");
    let node = idle_memory(format!("nodes:{prefix}:1"), budget, true).await;
    cleanup(&prefix).await;
    let (node, n) = node?;
    let (raw_4k, n_4k) = idle_memory("raw:4k".to_owned(), budget, false).await?;
    let (raw_default, n_default) = idle_memory("raw:default".to_owned(), budget, false).await?;
    let r = &mut ctx.report;
    r.row(
        format!("5. memory per idle connection, one node ({n} connections)"),
        format!("{node:.1} KiB"),
        format!("{raw_4k:.1} KiB raw tokio-tungstenite, 4 KiB buffers ({n_4k})"),
        ratio(node, raw_4k),
        "≤ 16 KiB",
        Verdict::of(node <= 16.0),
    );
    r.row(
        format!("5. raw tokio-tungstenite, default buffers ({n_default} connections)"),
        "—",
        format!("{raw_default:.1} KiB"),
        ratio(node, raw_default),
        "—",
        Verdict::Info,
    );
    r.note("5: VmRSS of the server's child process after the clients connected (and were welcomed) minus before, divided by the connections");
    Ok(())
}

fn node_set(n: usize, epoch: &Epoch) -> NodeSet<NodeId> {
    let mut rng = StdRng::seed_from_u64(n as u64);
    let mut set = NodeSet::with_shared_epoch(epoch.clone());
    for i in 0..n {
        let id = NodeId::new(format!("node-{i}")).unwrap();
        let mut info = NodeInfo::new(
            id.clone(),
            Incarnation::from_u64(i as u64),
            "10.0.0.1",
            5001,
        );
        info.max_connections = 1_000_000_000;
        info.connection_count = rng.random_range(0..10_000);
        info.cpu_usage_percent = rng.random_range(0.0..100.0);
        info.memory_usage_percent = rng.random_range(0.0..100.0);
        set.insert(id, LiveNodeInfo::with_epoch(info, epoch.clone()));
    }
    set
}

/// Nanoseconds per `Selector::pick`, as the balance crate's `pick` bench measures it.
fn pick_ns(strategy: Strategy, n: usize, picks: u32) -> f64 {
    let set = node_set(n, &Epoch::new());
    let mut selector = Selector::seeded(strategy, 1);
    for _ in 0..1000 {
        black_box(&selector.pick(black_box(&set)).unwrap().key);
    }
    let start = Instant::now();
    for _ in 0..picks {
        black_box(&selector.pick(black_box(&set)).unwrap().key);
    }
    start.elapsed().as_secs_f64() * 1e9 / f64::from(picks)
}

async fn start_discovery(
    prefix: &ClusterPrefix,
    name: &str,
    config: &DiscoveryConfig,
) -> Result<Discovery, BoxError> {
    let registry = RedisRegistry::connect(&redis_url(), prefix, RedisOptions::default()).await?;
    let info = NodeInfo::new(NodeId::new(name)?, Incarnation::random(), "127.0.0.1", 5000);
    Ok(Discovery::start(Arc::new(registry), info, config.clone()).await?)
}

/// Join, graceful leave and crash, as `layers/discovery/benches/timings.rs` measures them.
async fn discovery_timings(
    prefix: &ClusterPrefix,
    config: &DiscoveryConfig,
    join_trials: usize,
    crash_trials: usize,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>), BoxError> {
    let observer = start_discovery(prefix, "observer", config).await?;
    let (mut joins, mut leaves, mut crashes) = (Vec::new(), Vec::new(), Vec::new());
    let limit = config.lease * 4;
    for i in 0..join_trials {
        let name = format!("joiner-{i}");
        let id = NodeId::new(&name)?;
        let started = Instant::now();
        let node = start_discovery(prefix, &name, config).await?;
        timeout(
            limit,
            observer
                .view()
                .wait_until(|n| n.iter().any(|n| n.node_id == id)),
        )
        .await
        .map_err(|_| "a join was not seen")?;
        joins.push(started.elapsed().as_secs_f64() * 1e3);
        let leaving = Instant::now();
        node.leave().await?;
        timeout(
            limit,
            observer
                .view()
                .wait_until(|n| n.iter().all(|n| n.node_id != id)),
        )
        .await
        .map_err(|_| "a leave was not seen")?;
        leaves.push(leaving.elapsed().as_secs_f64() * 1e3);
    }
    for i in 0..crash_trials {
        let name = format!("crasher-{i}");
        let id = NodeId::new(&name)?;
        let node = start_discovery(prefix, &name, config).await?;
        timeout(
            limit,
            observer
                .view()
                .wait_until(|n| n.iter().any(|n| n.node_id == id)),
        )
        .await
        .map_err(|_| "a join was not seen")?;
        node.registrar().refresh().await?;
        let crashed = Instant::now();
        drop(node);
        timeout(
            limit,
            observer
                .view()
                .wait_until(|n| n.iter().all(|n| n.node_id != id)),
        )
        .await
        .map_err(|_| "a crash was not seen")?;
        crashes.push(crashed.elapsed().as_secs_f64() * 1e3);
    }
    observer.leave().await?;
    Ok((joins, leaves, crashes))
}

async fn section_balance(ctx: &mut Ctx) -> Result<(), BoxError> {
    let picks = ctx.sizes.picks;
    let mut others = Vec::new();
    for strategy in Strategy::ALL {
        for n in [10, 100, 1000] {
            let ns = pick_ns(strategy, n, picks);
            let targeted = n == 1000
                && matches!(
                    strategy,
                    Strategy::LeastConnections | Strategy::PowerOfTwoChoices
                );
            if targeted {
                ctx.report.row(
                    format!("6. pick, {} at 1000 nodes", strategy.as_str()),
                    format!("{ns:.0} ns"),
                    "—",
                    "—",
                    "≤ 1 µs",
                    Verdict::of(ns <= 1000.0),
                );
            } else {
                others.push(format!("{} @{n}: {ns:.0} ns", strategy.as_str()));
            }
        }
    }
    ctx.report.note(format!(
        "6: pick cost ({picks} picks each, `Selector::pick` on a seeded set as `cargo bench -p hybrid-cluster-balance --bench pick` does): {}",
        others.join(", ")
    ));

    let prefix = ctx.prefix("discovery");
    // As the discovery bench: a 1 s heartbeat, so a 3 s lease.
    let config = DiscoveryConfig::default().with_heartbeat(Duration::from_secs(1));
    let timings = discovery_timings(
        &prefix,
        &config,
        ctx.sizes.join_trials,
        ctx.sizes.crash_trials,
    )
    .await;
    cleanup(&prefix).await;
    let (joins, leaves, crashes) = timings?;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let lease_ms = config.lease.as_secs_f64() * 1e3;
    let r = &mut ctx.report;
    r.row(
        format!(
            "6. discovery: join seen by a peer, p50 / max ({})",
            joins.len()
        ),
        format!("{:.1} / {:.1} ms", median(joins.clone()), max(&joins)),
        "—",
        "—",
        "—",
        Verdict::Info,
    );
    r.row(
        format!(
            "6. discovery: graceful leave seen, p50 / max ({})",
            leaves.len()
        ),
        format!("{:.1} / {:.1} ms", median(leaves.clone()), max(&leaves)),
        "—",
        "—",
        "< 1 s",
        Verdict::of(max(&leaves) < 1000.0),
    );
    r.row(
        format!(
            "6. discovery: crash seen, from the last heartbeat, max ({})",
            crashes.len()
        ),
        format!("{:.0} ms", max(&crashes)),
        format!("lease {lease_ms:.0} ms"),
        ratio(max(&crashes), lease_ms),
        format!("≤ lease + 50 ms = {:.0} ms", lease_ms + 50.0),
        Verdict::of(max(&crashes) <= lease_ms + 50.0),
    );
    r.note("6: discovery against the real Redis with a 1 s heartbeat / 3 s lease, as `cargo bench -p hybrid-cluster-discovery --bench timings` (20 + 3 trials there); a crash cannot be seen before the lease runs out (no other failure detector), the view re-checks a peer 5 ms after its lease should have run out (`EXPIRY_GRACE`), hence the 50 ms allowance");
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn main() -> Result<(), BoxError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        return child_main(&mode);
    }
    let options = Options::parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut ctx = Ctx {
        sizes: Sizes::new(options.quick),
        run: tag(),
        report: Report::default(),
    };
    let started = Instant::now();
    runtime.block_on(async {
        for section in &options.sections {
            println!("== {section}");
            let running = async {
                match *section {
                    "throughput" => section_throughput(&mut ctx).await,
                    "latency" => section_latency(&mut ctx).await,
                    "local" => section_local(&mut ctx).await,
                    "broadcast" => section_broadcast(&mut ctx).await,
                    "memory" => section_memory(&mut ctx).await,
                    _ => section_balance(&mut ctx).await,
                }
            };
            let outcome = timeout(SECTION_LIMIT, running).await;
            let failure = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(error.to_string()),
                Err(_) => Some(format!("did not finish within {SECTION_LIMIT:?}")),
            };
            if let Some(failure) = failure {
                eprintln!("section {section} failed: {failure}");
                ctx.report.row(
                    format!("{section}: FAILED"),
                    failure,
                    "—",
                    "—",
                    "—",
                    Verdict::Missed,
                );
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));

    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut args: Vec<&str> = Vec::new();
    if options.quick {
        args.push("--quick");
    }
    if options.sections.len() < SECTIONS.len() {
        args.extend(options.sections.iter().copied());
    }
    let args = if args.is_empty() {
        String::new()
    } else {
        format!(" -- {}", args.join(" "))
    };
    let header = format!(
        "# hybrid-cluster benchmark suite\n\n`cargo bench --bench suite{args}` — run {} at unix time {unix}, {cores} cores, {:.0} s; sections: {}; open-file limit {}.\nOurs and the baselines are measured in this run, on this machine, against the same Redis and RabbitMQ.",
        ctx.run,
        started.elapsed().as_secs_f64(),
        options.sections.join(", "),
        fd_limit(),
    );
    let table = ctx.report.markdown(&header);
    println!("\n{table}");
    std::fs::create_dir_all("bench-results")?;
    std::fs::write(RESULTS, &table)?;
    println!("written to {RESULTS}");
    Ok(())
}
