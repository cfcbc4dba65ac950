//! The soak benchmark: minutes of mixed traffic from thousands of connections on several node
//! programs, on the real Redis and RabbitMQ, with connections closing and new ones opening
//! all along. It is not a test: it reports, it does not judge.
//!
//! ```sh
//! cargo bench --bench soak                       # 10 minutes, 3 nodes, 10,000 connections
//! cargo bench --bench soak -- --minutes 1        # a quick look
//! cargo bench --bench soak -- --help             # every knob
//! ```
//!
//! It builds the node program in release (`cargo build --release --example node`, unless
//! `HC_NODE_BINARY` names one), starts `--nodes` of them under a prefix of its own, and
//! spreads `--connections` clients over them. Every client joins a room, then sends at random
//! (about `--rate` requests a second over all of them): messages to a connection of its own
//! node and of another node, messages to one of its rooms, now and then a broadcast, joins
//! and leaves; `--churn` clients a second close (after their requests are answered) and are
//! replaced by new ones. Every request carries an `id`, so every one must be answered.
//!
//! Every `--sample-secs` it prints, and at the end writes to `bench-results/soak.md`: requests
//! answered and their p50/p99 in that interval, and per node its connections, resident memory,
//! open file descriptors and live tokio tasks (flat lines are expected). At the end: per kind
//! of request, how many were sent, acked, answered with an error (by code) and never answered
//! (expected: none), with p50/p99/max. `REDIS_URL` and `AMQP_URL` choose the servers.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use futures_util::stream;
use hdrhistogram::Histogram;
use hybrid_cluster_test_support::BoxError;
use hybrid_cluster_test_support::client::Client;
use hybrid_cluster_test_support::limits::raise_open_files;
use hybrid_cluster_test_support::node::{
    NodeOptions, NodeProgram, build_release_node_program, start_programs, stop_programs,
};
use hybrid_cluster_test_support::servers::unique_prefix;
use parking_lot::{Mutex, RwLock};
use rand::distr::{Distribution, Uniform};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};

#[derive(Parser, Debug, Clone)]
#[command(about = "Soak: mixed traffic from many connections on several nodes, for minutes")]
struct Args {
    /// How long the traffic runs.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Node programs started.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Connections open at any time, spread evenly over the nodes.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Requests a second, over all connections.
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    /// Connections closed (and replaced) a second.
    #[arg(long, default_value_t = 20.0)]
    churn: f64,
    /// Rooms the connections join and send to.
    #[arg(long, default_value_t = 200)]
    rooms: usize,
    /// Broadcasts a second (each reaches every connection).
    #[arg(long, default_value_t = 0.5)]
    broadcasts: f64,
    /// Seconds between two samples of the nodes.
    #[arg(long, default_value_t = 30)]
    sample_secs: u64,
    /// Where the report is written.
    #[arg(long, default_value = "bench-results/soak.md")]
    report: PathBuf,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// What a request is, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    LocalUnicast,
    CrossUnicast,
    Group,
    Broadcast,
    Join,
    Leave,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::LocalUnicast,
        Kind::CrossUnicast,
        Kind::Group,
        Kind::Broadcast,
        Kind::Join,
        Kind::Leave,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::LocalUnicast => "unicast, same node",
            Kind::CrossUnicast => "unicast, other node",
            Kind::Group => "group message",
            Kind::Broadcast => "broadcast",
            Kind::Join => "join",
            Kind::Leave => "leave",
        }
    }
}

/// Reply latencies in microseconds, up to a minute.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

struct KindStats {
    sent: u64,
    acked: u64,
    errors: BTreeMap<String, u64>,
    never: u64,
    latency: Histogram<u64>,
}

impl Default for KindStats {
    fn default() -> Self {
        Self {
            sent: 0,
            acked: 0,
            errors: BTreeMap::new(),
            never: 0,
            latency: histogram(),
        }
    }
}

#[derive(Default)]
struct Stats {
    kinds: HashMap<Kind, KindStats>,
    /// Replies in the current interval, and their latencies.
    interval: Option<Histogram<u64>>,
    received: BTreeMap<String, u64>,
    connects: u64,
    connect_failures: u64,
    closes: u64,
    dropped_by_server: u64,
}

impl Stats {
    fn answered(&mut self, kind: Kind, code: Option<&str>, took: Duration) {
        let stats = self.kinds.entry(kind).or_default();
        match code {
            None => stats.acked += 1,
            Some(code) => *stats.errors.entry(code.to_owned()).or_default() += 1,
        }
        let micros = (took.as_micros() as u64).clamp(1, 60_000_000);
        let _ = stats.latency.record(micros);
        let _ = self.interval.get_or_insert_with(histogram).record(micros);
    }
}

/// What every connection task shares.
struct Shared {
    args: Args,
    urls: Vec<String>,
    /// Per node, per slot: the id of the connection living there now.
    directory: Vec<RwLock<Vec<Option<String>>>>,
    stats: Mutex<Stats>,
    stopping: AtomicBool,
    stop: Notify,
}

impl Shared {
    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// A live connection of node `node`, other than `not`, if one is found in a few tries.
    fn pick(&self, node: usize, not: &str, rng: &mut impl Rng) -> Option<String> {
        let slots = self.directory[node].read();
        for _ in 0..4 {
            let slot = rng.random_range(0..slots.len());
            if let Some(id) = slots[slot].as_ref().filter(|id| *id != not) {
                return Some(id.clone());
            }
        }
        None
    }
}

/// One client connection of a connection task's life.
struct Conn {
    client: Client,
    pending: HashMap<u64, (Kind, Instant)>,
    next_id: u64,
    rooms: Vec<String>,
}

impl Conn {
    async fn request(&mut self, shared: &Shared, kind: Kind, mut op: Value) -> bool {
        self.next_id += 1;
        op["id"] = json!(self.next_id);
        self.pending.insert(self.next_id, (kind, Instant::now()));
        shared.stats.lock().kinds.entry(kind).or_default().sent += 1;
        self.client.send(&op).await.is_ok()
    }

    /// Takes one frame from the server.
    fn take(&mut self, shared: &Shared, frame: &Value) {
        let kind = frame["type"].as_str().unwrap_or("?");
        match kind {
            "ack" | "error" => {
                let Some(id) = frame["id"].as_u64() else {
                    *shared
                        .stats
                        .lock()
                        .received
                        .entry("error without id".to_owned())
                        .or_default() += 1;
                    return;
                };
                if let Some((kind, sent)) = self.pending.remove(&id) {
                    let code = frame["code"].as_str().filter(|_| frame["type"] == "error");
                    shared.stats.lock().answered(kind, code, sent.elapsed());
                }
            }
            // Joins and leaves are answered by these and then an ack.
            "joined" | "left" => {}
            other => {
                *shared
                    .stats
                    .lock()
                    .received
                    .entry(other.to_owned())
                    .or_default() += 1;
            }
        }
    }

    /// Sends one request chosen at random.
    async fn random_request(&mut self, shared: &Shared, node: usize, rng: &mut impl Rng) -> bool {
        let args = &shared.args;
        let broadcast_share = (args.broadcasts / args.rate).clamp(0.0, 1.0);
        let roll: f64 = rng.random();
        if roll < broadcast_share {
            return self
                .request(
                    shared,
                    Kind::Broadcast,
                    json!({"op":"broadcast","data":"all"}),
                )
                .await;
        }
        let roll: f64 = rng.random();
        if roll < 0.05 {
            if self.rooms.len() < 3 {
                let group = format!("room-{}", rng.random_range(0..args.rooms));
                self.rooms.push(group.clone());
                return self
                    .request(shared, Kind::Join, json!({"op":"join","group":group}))
                    .await;
            }
            let group = self
                .rooms
                .swap_remove(rng.random_range(0..self.rooms.len()));
            return self
                .request(shared, Kind::Leave, json!({"op":"leave","group":group}))
                .await;
        }
        if roll < 0.25 && !self.rooms.is_empty() {
            let group = &self.rooms[rng.random_range(0..self.rooms.len())];
            let op = json!({"op":"group","group":group,"data":{"room":group}});
            return self.request(shared, Kind::Group, op).await;
        }
        let (kind, target_node) = if roll < 0.625 || shared.urls.len() == 1 {
            (Kind::LocalUnicast, node)
        } else {
            let other = (node + rng.random_range(1..shared.urls.len())) % shared.urls.len();
            (Kind::CrossUnicast, other)
        };
        match shared.pick(target_node, &self.client.id, rng) {
            Some(to) => {
                let op = json!({"op":"send","to":to,"data":{"n":self.next_id}});
                self.request(shared, kind, op).await
            }
            None => true,
        }
    }
}

/// An exponentially distributed wait with mean `mean` seconds.
fn exponential(mean: f64, rng: &mut impl Rng) -> Duration {
    let u: f64 = Uniform::new(f64::EPSILON, 1.0)
        .expect("a valid range")
        .sample(rng);
    Duration::from_secs_f64((-u.ln() * mean).min(3_600.0))
}

/// One slot of node `node`: a connection lives there, closes after a random life (churn), and
/// is replaced, until the run stops.
async fn connection_slot(shared: Arc<Shared>, node: usize, slot: usize, first: Client) {
    let mut rng = StdRng::from_os_rng();
    let args = shared.args.clone();
    let mut next = Some(first);
    while !shared.is_stopping() {
        let client = match next.take() {
            Some(client) => client,
            None => match Client::connect(&shared.urls[node]).await {
                Ok(client) => client,
                Err(_) => {
                    shared.stats.lock().connect_failures += 1;
                    sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        shared.stats.lock().connects += 1;
        shared.directory[node].write()[slot] = Some(client.id.clone());
        let mut conn = Conn {
            client,
            pending: HashMap::new(),
            next_id: 0,
            rooms: Vec::new(),
        };
        let first_room = format!("room-{}", rng.random_range(0..args.rooms));
        conn.rooms.push(first_room.clone());
        let alive = conn
            .request(&shared, Kind::Join, json!({"op":"join","group":first_room}))
            .await;
        let life_ends = if args.churn > 0.0 {
            Instant::now() + exponential(args.connections as f64 / args.churn, &mut rng)
        } else {
            Instant::now() + Duration::from_secs(365 * 24 * 3600)
        };
        let alive = live(&mut conn, &shared, node, life_ends, alive, &mut rng).await;
        shared.directory[node].write()[slot] = None;
        close(conn, &shared, alive).await;
    }
}

/// A connection's life: random requests at the configured rate, answers taken as they come,
/// until it ends (`life_ends`), the server drops it or the run stops. Whether it is still
/// alive.
async fn live(
    conn: &mut Conn,
    shared: &Shared,
    node: usize,
    life_ends: Instant,
    mut alive: bool,
    rng: &mut StdRng,
) -> bool {
    let args = &shared.args;
    let mean_gap = args.connections as f64 / args.rate;
    let mut next_request = Instant::now() + exponential(mean_gap, rng);
    while alive && !shared.is_stopping() && Instant::now() < life_ends {
        tokio::select! {
            () = sleep_until(next_request.min(life_ends)) => {
                if Instant::now() >= life_ends {
                    break;
                }
                alive = conn.random_request(shared, node, rng).await;
                next_request = Instant::now() + exponential(mean_gap, rng);
            }
            frame = conn.client.next_json(Duration::from_secs(3_600)) => match frame {
                Ok(Ok(frame)) => conn.take(shared, &frame),
                Ok(Err(_)) | Err(_) => {
                    shared.stats.lock().dropped_by_server += 1;
                    alive = false;
                }
            },
            () = shared.stop.notified() => {}
        }
    }
    alive
}

/// Before closing, every request of the connection is answered (or given up on after 30 s);
/// the ones never answered are counted.
async fn close(mut conn: Conn, shared: &Shared, alive: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive && !conn.pending.is_empty() && Instant::now() < deadline {
        match conn
            .client
            .next_json(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Ok(Ok(frame)) => conn.take(shared, &frame),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    {
        let mut stats = shared.stats.lock();
        for (kind, _) in conn.pending.values() {
            stats.kinds.entry(*kind).or_default().never += 1;
        }
        stats.closes += 1;
    }
    conn.client.close().await;
}

/// One sample of one node.
struct NodeSample {
    connections: u64,
    rss_mib: f64,
    fds: usize,
    tasks: u64,
}

async fn sample_node(node: &NodeProgram) -> NodeSample {
    let tasks = match node.get("/metrics").await {
        Ok((_, body)) => body
            .lines()
            .find(|l| l.starts_with("hybrid_cluster_runtime_alive_tasks"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64,
        Err(_) => 0,
    };
    let connections = match node.get("/cluster/nodes").await {
        Ok((_, body)) => serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|nodes| {
                nodes.as_array()?.iter().find_map(|n| {
                    (n["node_id"] == node.id.as_str()).then(|| n["connection_count"].as_u64())?
                })
            })
            .unwrap_or(0),
        Err(_) => 0,
    };
    NodeSample {
        connections,
        rss_mib: node.rss_kib().unwrap_or(0) as f64 / 1024.0,
        fds: node.open_fds().unwrap_or(0),
        tasks,
    }
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    build_release_node_program(env!("CARGO"), env!("CARGO_MANIFEST_DIR"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<(), BoxError> {
    raise_open_files(args.connections as u64 * 2 + 1_024);
    let prefix = unique_prefix("soak");
    let options = NodeOptions::servers(&prefix)
        .arg("--max-connections", args.connections * 2)
        // The default heartbeat, as a deployment would run.
        .arg("--heartbeat-ms", 5_000);
    let nodes = start_programs("soak", args.nodes, &options, Duration::from_secs(30)).await?;
    let result = soak(&args, &nodes).await;
    stop_programs(nodes, &prefix, Duration::from_secs(10)).await;
    result
}

async fn soak(args: &Args, nodes: &[NodeProgram]) -> Result<(), BoxError> {
    let per_node = args.connections.div_ceil(args.nodes);
    let shared = Arc::new(Shared {
        args: args.clone(),
        urls: nodes.iter().map(NodeProgram::ws_url).collect(),
        directory: (0..args.nodes)
            .map(|_| RwLock::new(vec![None; per_node]))
            .collect(),
        stats: Mutex::new(Stats::default()),
        stopping: AtomicBool::new(false),
        stop: Notify::new(),
    });
    let connecting = Instant::now();
    let tasks = open_connections(&shared, per_node).await?;
    let mut report = String::new();
    writeln!(
        report,
        "# Soak: {} min, {} nodes, {} connections, {} requests/s, {} closed and replaced/s, {} rooms, {} broadcasts/s\n",
        args.minutes,
        args.nodes,
        args.connections,
        args.rate,
        args.churn,
        args.rooms,
        args.broadcasts
    )?;
    writeln!(
        report,
        "{} connections opened in {:.1} s.\n",
        per_node * args.nodes,
        connecting.elapsed().as_secs_f64()
    )?;
    sample_until_the_end(&shared, nodes, &mut report).await?;
    shared.stopping.store(true, Ordering::Release);
    shared.stop.notify_waiters();
    let draining = Instant::now();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
    }
    writeln!(
        report,
        "\nStopped sending; every connection drained its answers and closed in {:.1} s.\n",
        draining.elapsed().as_secs_f64()
    )?;
    write_totals(&mut report, &shared.stats.lock())?;
    println!("\n{report}");
    if let Some(dir) = args.report.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.report, &report)?;
    eprintln!("written to {}", args.report.display());
    Ok(())
}

/// Opens `per_node` connections to every node, 64 at a time, each in its slot's task.
async fn open_connections(
    shared: &Arc<Shared>,
    per_node: usize,
) -> Result<Vec<JoinHandle<()>>, BoxError> {
    let mut tasks = Vec::new();
    for (n, url) in shared.urls.clone().iter().enumerate() {
        let clients: Vec<Result<Client, BoxError>> = stream::iter(0..per_node)
            .map(|_| Client::connect(url))
            .buffered(64)
            .collect()
            .await;
        for (slot, client) in clients.into_iter().enumerate() {
            tasks.push(tokio::spawn(connection_slot(
                Arc::clone(shared),
                n,
                slot,
                client?,
            )));
        }
    }
    Ok(tasks)
}

/// Every `sample_secs` until the run's end: the answers of the interval and each node's
/// resources, printed and added to `report` as table rows.
async fn sample_until_the_end(
    shared: &Shared,
    nodes: &[NodeProgram],
    report: &mut String,
) -> std::fmt::Result {
    let args = &shared.args;
    writeln!(
        report,
        "| t (s) | answered/s | p50 ms | p99 ms | node | connections | RSS MiB | fds | tasks |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|---|---|---|")?;
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(args.minutes * 60.0);
    let every = Duration::from_secs(args.sample_secs.max(1));
    let mut next_sample = started + every;
    loop {
        sleep_until(next_sample.min(end)).await;
        let interval = shared
            .stats
            .lock()
            .interval
            .take()
            .unwrap_or_else(histogram);
        let elapsed = started.elapsed().as_secs_f64();
        for (i, node) in nodes.iter().enumerate() {
            let sample = sample_node(node).await;
            let line = if i == 0 {
                format!(
                    "| {elapsed:.0} | {:.0} | {:.2} | {:.2} |",
                    interval.len() as f64 / every.as_secs_f64(),
                    interval.value_at_quantile(0.5) as f64 / 1_000.0,
                    interval.value_at_quantile(0.99) as f64 / 1_000.0
                )
            } else {
                "| | | | |".to_owned()
            };
            let line = format!(
                "{line} {} | {} | {:.1} | {} | {} |",
                node.id, sample.connections, sample.rss_mib, sample.fds, sample.tasks
            );
            println!("{line}");
            writeln!(report, "{line}")?;
        }
        if Instant::now() >= end {
            return Ok(());
        }
        next_sample += every;
    }
}

/// The totals of the run: per kind of request, then what clients received and connection
/// counts.
fn write_totals(report: &mut String, stats: &Stats) -> std::fmt::Result {
    writeln!(
        report,
        "| request | sent | acked | errors | never answered | p50 ms | p99 ms | max ms |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|---|---|")?;
    let mut never = 0;
    for kind in Kind::ALL {
        let Some(k) = stats.kinds.get(&kind) else {
            continue;
        };
        never += k.never;
        let errors = if k.errors.is_empty() {
            "0".to_owned()
        } else {
            k.errors
                .iter()
                .map(|(code, n)| format!("{n} {code}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            report,
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.1} |",
            kind.name(),
            k.sent,
            k.acked,
            errors,
            k.never,
            k.latency.value_at_quantile(0.5) as f64 / 1_000.0,
            k.latency.value_at_quantile(0.99) as f64 / 1_000.0,
            k.latency.max() as f64 / 1_000.0
        )?;
    }
    let received = stats
        .received
        .iter()
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect::<Vec<_>>()
        .join(", ");
    writeln!(
        report,
        "\nDelivered to clients: {received}. Connections opened {} (failed {}), closed {}, dropped by a node {}. Requests never answered: {never}.",
        stats.connects, stats.connect_failures, stats.closes, stats.dropped_by_server
    )
}
