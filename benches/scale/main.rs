//! The scale simulation: many node programs, tens of thousands of connections, thousands of
//! groups with membership churn, and unicast, group and broadcast traffic, on the real Redis
//! and RabbitMQ of this machine. It measures what each node costs the servers (Redis round
//! trips, publishes, bindings and binding changes), its memory and CPU, and the cluster's
//! totals, for the README's cost model. It is not a test: it reports, it does not judge.
//!
//! ```sh
//! cargo bench --bench scale                      # 8 nodes, 24,000 connections, 10,000 groups
//! cargo bench --bench scale -- --seconds 20      # a shorter measured window
//! cargo bench --bench scale -- --help            # every knob
//! ```
//!
//! It builds the node program in release (`cargo build --release --example node`, unless
//! `HC_NODE_BINARY` names one) and starts `--nodes` of them under a prefix of its own; the
//! clients run in child processes of this program (see `clients`), so that tens of thousands
//! of sockets fit under the open-file limit. Then:
//!
//! 1. **Raw bindings**: the binding changes a second this RabbitMQ takes from raw lapin
//!    (a durable queue, one channel, then eight channels at once): the ceiling of group churn.
//! 2. **Setup**: `--connections` clients spread evenly over the nodes (following a placement
//!    redirect when a node sends one), each joining `--memberships` of `--groups` groups drawn
//!    at random: the first member of a group on a node binds the node's queue to it.
//! 3. **Traffic** for `--warmup` seconds, then `--seconds` measured: unicasts between random
//!    connections (most of them cross-node), group messages from a member to one of its
//!    groups, broadcasts, and membership churn (a connection leaves one of its groups and joins
//!    another), each as a Poisson-like stream at its rate. Every request carries an `id` and is
//!    answered.
//!
//! Per node, over the measured window: registry round trips/s, discovery events/s, publishes/s
//! by route, binding changes/s, group bindings, CPU (% of one core), resident memory; for the
//! cluster: those summed, Redis's own commands/s and CPU (from `INFO`), RabbitMQ's CPU and
//! memory and its count of the cluster's bindings, this process's CPU (the clients share the
//! machine), and per kind of request the answers and their latency. Written to
//! `bench-results/scale.md`. `REDIS_URL` and `AMQP_URL` choose the servers.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod clients;
mod measure;
mod raw;
mod report;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use hybrid_cluster_test_support::BoxError;
use hybrid_cluster_test_support::node::{
    NodeOptions, NodeProgram, build_release_node_program, start_programs, stop_programs,
};
use hybrid_cluster_test_support::servers::{amqp_url, redis_url, unique_prefix};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::{Instant, sleep, timeout};

use crate::clients::{CLIENTS_PER_PROCESS, Tally};
use hybrid_cluster_test_support::process::cpu_ticks;
use hybrid_cluster_test_support::rabbitmq::broker_pid;

use crate::measure::{RedisInfo, Snapshot, count_bindings, rss_mib};
use crate::raw::raw_bindings;
use crate::report::{write_nodes, write_requests};

#[derive(Parser, Debug, Clone)]
#[command(about = "Scale: many nodes, connections and groups; the servers' cost per node")]
struct Args {
    /// Node programs started.
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    /// Connections, spread evenly over the nodes.
    #[arg(long, default_value_t = 24_000)]
    connections: usize,
    /// Groups the connections join.
    #[arg(long, default_value_t = 10_000)]
    groups: usize,
    /// Groups each connection is a member of at any time.
    #[arg(long, default_value_t = 3)]
    memberships: usize,
    /// Membership changes a second over the cluster (each: leave one group, join another).
    #[arg(long, default_value_t = 300.0)]
    churn: f64,
    /// Unicasts a second, between random connections.
    #[arg(long, default_value_t = 2_000.0)]
    unicast: f64,
    /// Group messages a second, from a member to one of its groups.
    #[arg(long, default_value_t = 300.0)]
    group: f64,
    /// Broadcasts a second (each reaches every connection).
    #[arg(long, default_value_t = 0.2)]
    broadcasts: f64,
    /// Seconds of traffic before the measured window.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The nodes' heartbeat.
    #[arg(long, default_value_t = 1_000)]
    heartbeat_ms: u64,
    /// The nodes' `--group-buckets` (group messages keyed by buckets of groups); one key per
    /// group when not given.
    #[arg(long)]
    group_buckets: Option<u32>,
    /// Binding changes of the raw-binding baseline.
    #[arg(long, default_value_t = 4_000)]
    raw_bindings: usize,
    /// Only the raw-binding baseline (point `AMQP_URL` at a RabbitMQ cluster's node to see what
    /// replication costs a binding).
    #[arg(long)]
    raw_only: bool,
    /// Where the report is written.
    #[arg(long, default_value = "bench-results/scale.md")]
    report: PathBuf,
    /// Runs as a client process of a parent (see `clients`).
    #[arg(long, hide = true)]
    child: bool,
    /// A client process's nodes.
    #[arg(long, hide = true, value_delimiter = ',')]
    urls: Vec<String>,
    /// A client process's seed.
    #[arg(long, hide = true, default_value_t = 7)]
    seed: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// How long any one step may wait.
pub(crate) const WAIT: Duration = Duration::from_secs(180);

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    if !args.child {
        build_release_node_program(env!("CARGO"), env!("CARGO_MANIFEST_DIR"))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.child {
        runtime.block_on(clients::child(args))
    } else {
        runtime.block_on(run(args))
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    if args.memberships == 0 || args.groups <= args.memberships || args.connections < 2 {
        return Err(
            "--memberships must be at least 1 and below --groups, --connections at least 2".into(),
        );
    }
    let mut report = String::new();
    writeln!(
        report,
        "# Scale: {} nodes, {} connections, {} groups × {} memberships each\n\n`cargo bench --bench scale -- --nodes {} --connections {} --groups {} --memberships {} --churn {} --unicast {} --group {} --broadcasts {} --seconds {}{}` on {} cores; Redis {} and RabbitMQ {} on this machine, the nodes' heartbeat {} ms; group keys: {}.\n",
        args.nodes,
        args.connections,
        args.groups,
        args.memberships,
        args.nodes,
        args.connections,
        args.groups,
        args.memberships,
        args.churn,
        args.unicast,
        args.group,
        args.broadcasts,
        args.seconds,
        args.group_buckets
            .map_or(String::new(), |b| format!(" --group-buckets {b}")),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        redis_url(),
        redact(&amqp_url()),
        args.heartbeat_ms,
        args.group_buckets
            .map_or("one per group".to_owned(), |b| format!("{b} buckets")),
    )?;
    raw_bindings(&args, &mut report).await?;
    if args.raw_only {
        println!("\n{report}");
        return Ok(());
    }
    let prefix = unique_prefix("scale");
    let mut options = NodeOptions::servers(&prefix)
        .arg("--max-connections", args.connections)
        .arg("--strategy", "least-connections");
    if let Some(buckets) = args.group_buckets {
        options = options.arg("--group-buckets", buckets);
    }
    let options = NodeOptions {
        heartbeat_ms: args.heartbeat_ms,
        log_filter: "warn".to_owned(),
        ..options
    };
    let nodes = start_programs("scale", args.nodes, &options, Duration::from_secs(60)).await?;
    let result = simulate(&args, &prefix, &nodes, &mut report).await;
    stop_programs(nodes, &prefix, Duration::from_secs(20)).await;
    result?;
    println!("\n{report}");
    if let Some(dir) = args.report.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.report, &report)?;
    eprintln!("written to {}", args.report.display());
    Ok(())
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &url[..scheme], &url[at..]),
        _ => url.to_owned(),
    }
}

/// The client processes, each spoken to on its stdin and answering a JSON line on its stdout.
struct Children {
    procs: Vec<(Child, ChildStdin, Lines<BufReader<ChildStdout>>)>,
}

impl Children {
    /// Starts enough client processes for `args.connections`, each with its share of the
    /// clients and of every rate, and waits until each has connected its clients; how long
    /// the slowest took.
    async fn start(args: &Args, urls: &[String]) -> Result<(Self, f64), BoxError> {
        let count = args.connections.div_ceil(CLIENTS_PER_PROCESS);
        let exe = std::env::current_exe()?;
        let mut procs = Vec::new();
        for i in 0..count {
            let share = args.connections / count + usize::from(i < args.connections % count);
            let rate = |r: f64| (r / count as f64).to_string();
            let mut child = Command::new(&exe)
                .arg("--child")
                .args(["--urls", &urls.join(",")])
                .args(["--connections", &share.to_string()])
                .args(["--groups", &args.groups.to_string()])
                .args(["--memberships", &args.memberships.to_string()])
                .args(["--churn", &rate(args.churn)])
                .args(["--unicast", &rate(args.unicast)])
                .args(["--group", &rate(args.group)])
                .args(["--broadcasts", &rate(args.broadcasts)])
                .args(["--seed", &(7 + i as u64).to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let stdin = child.stdin.take().ok_or("no stdin")?;
            let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
            procs.push((child, stdin, stdout));
        }
        let mut children = Self { procs };
        let answers = children.answers().await?;
        let slowest = answers
            .iter()
            .filter_map(|a| a["connected"].as_f64())
            .fold(0.0, f64::max);
        Ok((children, slowest))
    }

    /// Sends `command` to every child and returns their answers.
    async fn command(&mut self, command: &str) -> Result<Vec<Value>, BoxError> {
        for (_, stdin, _) in &mut self.procs {
            stdin.write_all(format!("{command}\n").as_bytes()).await?;
            stdin.flush().await?;
        }
        self.answers().await
    }

    async fn answers(&mut self) -> Result<Vec<Value>, BoxError> {
        let mut answers = Vec::new();
        for (_, _, stdout) in &mut self.procs {
            let line = timeout(WAIT, stdout.next_line())
                .await
                .map_err(|_| "a client process did not answer")??
                .ok_or("a client process ended")?;
            answers.push(serde_json::from_str(&line)?);
        }
        Ok(answers)
    }

    /// The client processes' CPU time, in ticks.
    fn cpu_ticks(&self) -> u64 {
        self.procs
            .iter()
            .filter_map(|(child, _, _)| child.id().and_then(cpu_ticks))
            .sum()
    }
}

/// Sections 2 and 3 on running nodes.
async fn simulate(
    args: &Args,
    prefix: &str,
    nodes: &[NodeProgram],
    report: &mut String,
) -> Result<(), BoxError> {
    let idle = Snapshot::take(nodes).await;
    let urls: Vec<String> = nodes.iter().map(NodeProgram::ws_url).collect();
    let (mut children, connected) = Children::start(args, &urls).await?;
    println!("{} connections open in {connected:.1} s", args.connections);
    let before_joins = Snapshot::take(nodes).await;
    let joined = children
        .command("join")
        .await?
        .iter()
        .filter_map(|a| a["joined"].as_f64())
        .fold(0.0, f64::max);
    let after_joins = Snapshot::take(nodes).await;
    let mut setup = Tally::default();
    for answer in children.command("report").await? {
        setup.merge(&answer);
    }
    for (kind, k) in &setup.kinds {
        if !k.errors.is_empty() {
            println!("setup: {} errors {:?}", kind.name(), k.errors);
        }
    }
    let binds = after_joins.sum("bind") - before_joins.sum("bind");
    let joins = args.connections * args.memberships;
    writeln!(
        report,
        "## Setup\n\n{} connections opened in {connected:.1} s over {} nodes ({}), from {} client processes. {joins} joins answered in {joined:.1} s ({:.0}/s): the nodes made {binds:.0} group bindings ({:.0} binds/s; {:.1} per group over {} nodes).\n",
        args.connections,
        nodes.len(),
        after_joins
            .nodes
            .iter()
            .map(|n| format!("{:.0}", n.connections))
            .collect::<Vec<_>>()
            .join(" / "),
        children.procs.len(),
        joins as f64 / joined,
        binds / joined,
        binds / args.groups as f64,
        nodes.len()
    )?;
    println!("{joins} joins answered in {joined:.1} s, {binds:.0} binds");
    children.command("go").await?;
    sleep(Duration::from_secs(args.warmup)).await;
    let redis_before = RedisInfo::take().await?;
    let rabbit_pid = broker_pid().await;
    let rabbit_before = rabbit_pid.and_then(cpu_ticks);
    let clients_before = children.cpu_ticks();
    children.command("reset").await?;
    let before = Snapshot::take(nodes).await;
    let window = Instant::now();
    sleep(Duration::from_secs(args.seconds)).await;
    let after = Snapshot::take(nodes).await;
    let seconds = window.elapsed().as_secs_f64();
    let redis_after = RedisInfo::take().await?;
    let rabbit_after = rabbit_pid.and_then(cpu_ticks);
    let clients_after = children.cpu_ticks();
    let mut tally = Tally::default();
    for answer in children.command("report").await? {
        tally.merge(&answer);
    }
    let broker_bindings = count_bindings(prefix);
    let unanswered: u64 = children
        .command("stop")
        .await?
        .iter()
        .filter_map(|a| a["unanswered"].as_u64())
        .sum();
    write_nodes(report, &idle, &before, &after, seconds)?;
    let cpu = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.0} %", b.saturating_sub(a) as f64 / seconds),
        _ => "?".to_owned(),
    };
    writeln!(
        report,
        "\n**Servers over the window.** Redis: {:.0} commands/s, CPU {:.1} % of a core, {:.1} MiB used. RabbitMQ: CPU {} of a core, {} resident, {} bindings of this cluster (the nodes count {:.0} group bindings, plus 2 of each node's own and the dead-letter queue's). The clients ({} processes): CPU {} of a core.\n",
        redis_after.commands.saturating_sub(redis_before.commands) as f64 / seconds,
        (redis_after.cpu_seconds - redis_before.cpu_seconds) / seconds * 100.0,
        redis_after.used_memory as f64 / (1024.0 * 1024.0),
        cpu(rabbit_before, rabbit_after),
        rabbit_pid
            .and_then(rss_mib)
            .map_or("?".to_owned(), |m| format!("{m:.0} MiB")),
        broker_bindings.map_or("?".to_owned(), |n| n.to_string()),
        after.sum("group_bindings"),
        children.procs.len(),
        cpu(Some(clients_before), Some(clients_after)),
    )?;
    write_requests(report, &tally, seconds)?;
    writeln!(
        report,
        "Requests still unanswered 30 s after the traffic stopped: {unanswered}."
    )?;
    Ok(())
}
