//! The benchmark suite (issues 7 and 17): the whole system next to the physical limits of its
//! parts, measured in the same run, on the real Redis and RabbitMQ of this machine; each target
//! of issue 17 printed as MET or MISSED.
//!
//! ```sh
//! cargo bench --bench suite                    # every section (about 3 to 5 minutes)
//! cargo bench --bench suite -- --quick         # fewer messages, samples and connections
//! cargo bench --bench suite -- latency memory  # some sections only (names or numbers 1-7)
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
//!    round and the raw tokio-tungstenite echo round trip; and a lone message's eleven stages
//!    (see `stages.rs`), with what the slowest 1 % and 0.1 % wait on.
//! 3. `local`: same-node one-way latency next to the raw WebSocket echo.
//! 4. `broadcast`: one broadcast reaching N clients spread over 3 nodes (the nodes run in a
//!    child process, the `suite-child` program of `child/main.rs`, so that N clients and N
//!    server sockets do not share one fd limit); the time to the last client, the nodes' own
//!    time (frame read → last frame written) and both sides' CPU per broadcast.
//! 5. `memory`: RSS growth per idle connection of one node (in a child process) next to a raw
//!    tokio-tungstenite server with the same 4 KiB buffers and with tungstenite's defaults.
//! 6. `balance`: the balancer's pick cost at 10/100/1000 nodes and discovery timings (join,
//!    graceful leave, crash), as `cargo bench -p hybrid-cluster-balance --bench pick` and
//!    `cargo bench -p hybrid-cluster-discovery --bench timings` measure them in more detail.
//! 7. `cpu`: CPU per delivered message at full rate, of the nodes (in a child process) and
//!    RabbitMQ together, for unicast, a group of 20 members on two nodes, and a broadcast to
//!    the first broadcast audience over 3 nodes; next to raw lapin's per message (its process
//!    and RabbitMQ; durable queue, persistent messages, confirms and acks).
//! 8. `sessions`: sessions on next to off (throughput, latency, memory per session).
//! 9. `users`: `send_user` next to plain unicast on the same nodes (throughput, latency), and
//!    Redis commands per user connection (presence) and per `send_user`.
//!
//! Every run uses cluster prefixes of its own (`hc-suite:<run>:<section>`), shuts its nodes
//! down and deletes what they leave (exchanges, the dead-letter queue, Redis keys). Every loop
//! is bounded by a count and every wait by a timeout; all traffic stays on 127.0.0.1.

//!
//! One module per section; `serve` (nodes and a raw echo server) is shared with the child
//! program, which the suite builds (`cargo build --example suite-child`, same profile) and
//! spawns, unless `HC_SUITE_CHILD_BINARY` names it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod amqp;
mod balance;
mod broadcast;
mod child;
mod clients;
mod cpu;
mod latency;
mod local;
mod machine;
mod memory;
mod probes;
mod redis_info;
mod report;
mod serve;
mod sessions;
mod stages;
mod throughput;
mod users;

use std::time::Duration;

use clap::Parser;
use futures_util::stream::SplitSink;
use hybrid_cluster::ClusterPrefix;
use hybrid_cluster_test_support::BoxError;
use hybrid_cluster_test_support::servers::remove_cluster;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::machine::fd_limit;
use crate::report::{Report, Verdict};
use crate::serve::{NODE_NAMES, WAIT, runtime};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Sink = SplitSink<Ws, Message>;

/// The size of every payload: the `data` of a send, a raw AMQP body, a raw WebSocket frame.
pub(crate) const PAYLOAD: usize = 128;

/// The bound of a whole section.
pub(crate) const SECTION_LIMIT: Duration = Duration::from_secs(900);

/// Where the table is written.
pub(crate) const RESULTS: &str = "bench-results/suite.md";

pub(crate) const SECTIONS: [&str; 9] = [
    "throughput",
    "latency",
    "local",
    "broadcast",
    "memory",
    "balance",
    "cpu",
    "sessions",
    "users",
];

/// The suite's command line.
#[derive(Debug, Parser)]
#[command(
    name = "suite",
    about = "The benchmark suite: ours next to the raw baselines"
)]
pub(crate) struct Options {
    /// Fewer messages, samples and connections.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Passed by `cargo bench` to benches without a harness; nothing to do with it.
    #[arg(long, hide = true)]
    bench: bool,
    /// The sections to run, by name or number (1-9); every section when none is given.
    #[arg(value_name = "SECTION", value_parser = section_named)]
    pub(crate) sections: Vec<&'static str>,
}

impl Options {
    pub(crate) fn parse_args() -> Self {
        let mut options = Self::parse();
        if options.sections.is_empty() {
            options.sections = SECTIONS.to_vec();
        }
        options
    }
}

/// A section by its name or its number, counting from 1.
pub(crate) fn section_named(arg: &str) -> Result<&'static str, String> {
    SECTIONS
        .iter()
        .enumerate()
        .find(|(i, name)| **name == arg || arg.parse::<usize>().is_ok_and(|n| n == i + 1))
        .map(|(_, name)| *name)
        .ok_or_else(|| format!("expected a section ({} or 1-8)", SECTIONS.join(", ")))
}

pub(crate) struct Sizes {
    /// Messages per throughput run.
    pub(crate) messages: usize,
    /// Throughput rounds (the median is reported).
    pub(crate) rounds: usize,
    /// Latency samples per measure.
    pub(crate) samples: usize,
    /// Broadcast audiences.
    pub(crate) fanout: Vec<usize>,
    /// Broadcasts per audience (the median is reported).
    pub(crate) broadcasts: usize,
    /// Idle connections for the memory measure.
    pub(crate) idle: usize,
    /// Picks timed per strategy and size.
    pub(crate) picks: u32,
    /// Join and graceful-leave trials.
    pub(crate) join_trials: usize,
    /// Crash trials.
    pub(crate) crash_trials: usize,
}

impl Sizes {
    pub(crate) fn new(quick: bool) -> Self {
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

pub(crate) struct Ctx {
    pub(crate) sizes: Sizes,
    pub(crate) run: String,
    pub(crate) report: Report,
}

impl Ctx {
    pub(crate) fn prefix(&self, section: &str) -> ClusterPrefix {
        ClusterPrefix::new(format!("hc-suite:{}:{section}", self.run)).expect("a valid prefix")
    }
}

pub(crate) fn tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn main() -> Result<(), BoxError> {
    serve::init_logging_with(stages::layer());
    let options = Options::parse_args();
    let runtime = runtime()?;
    let mut ctx = Ctx {
        sizes: Sizes::new(options.quick),
        run: tag(),
        report: Report::default(),
    };
    let started = Instant::now();
    runtime.block_on(async {
        for section in &options.sections {
            run_section(&mut ctx, section).await;
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    let table = ctx.report.markdown(&header(&ctx, &options, started));
    println!("\n{table}");
    std::fs::create_dir_all("bench-results")?;
    std::fs::write(RESULTS, &table)?;
    println!("written to {RESULTS}");
    Ok(())
}

/// Runs one section within `SECTION_LIMIT`; a failure is a row of the table, not the end
/// of the run.
async fn run_section(ctx: &mut Ctx, section: &str) {
    println!("== {section}");
    let running = async {
        match section {
            "throughput" => throughput::run(ctx).await,
            "latency" => latency::run(ctx).await,
            "local" => local::run(ctx).await,
            "broadcast" => broadcast::run(ctx).await,
            "memory" => memory::run(ctx).await,
            "cpu" => cpu::run(ctx).await,
            "sessions" => sessions::run(ctx).await,
            "users" => users::run(ctx).await,
            _ => balance::run(ctx).await,
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

/// The table's header: the command that ran, when, on what.
fn header(ctx: &Ctx, options: &Options, started: Instant) -> String {
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
    format!(
        "# hybrid-cluster benchmark suite\n\n`cargo bench --bench suite{args}` — run {} at unix time {unix}, {cores} cores, {:.0} s; sections: {}; open-file limit {}.\nOurs and the baselines are measured in this run, on this machine, against the same Redis and RabbitMQ.",
        ctx.run,
        started.elapsed().as_secs_f64(),
        options.sections.join(", "),
        fd_limit(),
    )
}

/// Deletes what a cluster may leave: its exchanges and dead-letter queue (which no node
/// deletes), the queues of nodes that did not shut down, its Redis keys.
async fn cleanup(prefix: &ClusterPrefix) {
    let nodes: Vec<String> = NODE_NAMES.iter().map(|node| (*node).to_owned()).collect();
    if timeout(WAIT, remove_cluster(prefix.as_str(), &nodes))
        .await
        .is_err()
    {
        eprintln!("cleaning up {prefix} timed out");
    }
}
