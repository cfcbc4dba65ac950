//! The benchmark suite's child server (`benches/suite/main.rs` spawns it): the servers of a
//! section run in their own process, so that thousands of clients and as many server sockets
//! do not share one open-file limit, and a server's memory can be measured alone.
//!
//! ```sh
//! suite-child nodes <PREFIX> <COUNT>   # COUNT nodes of the cluster PREFIX (on REDIS_URL, AMQP_URL)
//! suite-child raw 4k|default           # a raw tokio-tungstenite echo server
//! ```
//!
//! It prints `PORTS p1 p2 …` once serving, and stops (nodes shut down gracefully) when its
//! stdin closes. Meanwhile it answers lines on its stdin: `watch` (answered `WATCHING`) starts
//! recording a broadcast's time on the server side, and `span` stops it, answered
//! `SPAN <microseconds>` (or `SPAN none`): see [`writes`].

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

// Shared with the suite, which uses all of it; this program only part.
#[allow(dead_code)]
#[path = "../serve.rs"]
mod serve;
mod writes;

use std::io::BufRead;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use hybrid_cluster::{ClusterPrefix, Durability};
use hybrid_cluster_test_support::BoxError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::serve::{
    echo_server, init_logging_with, runtime, small_buffers, start_nodes_with, stop_nodes,
};

/// The child's command line: what to serve.
#[derive(Debug, Parser)]
#[command(
    name = "suite-child",
    about = "A server of the benchmark suite, in its own process"
)]
struct Args {
    #[command(subcommand)]
    serve: Serve,
}

#[derive(Debug, Subcommand)]
enum Serve {
    /// Nodes of one cluster, on the real Redis and RabbitMQ.
    Nodes {
        /// The cluster's prefix.
        prefix: ClusterPrefix,
        /// How many nodes.
        count: usize,
        /// With sessions.
        #[arg(long)]
        sessions: bool,
    },
    /// A raw tokio-tungstenite echo server.
    Raw {
        /// Its read and write buffers.
        buffers: Buffers,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Buffers {
    /// 4 KiB, as the node server's.
    #[value(name = "4k")]
    Small,
    /// tungstenite's defaults.
    Default,
}

fn main() -> Result<(), BoxError> {
    init_logging_with(writes::layer());
    let args = Args::parse();
    let runtime = runtime()?;
    runtime.block_on(serve(args.serve))?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

async fn serve(what: Serve) -> Result<(), BoxError> {
    // Answers the suite's questions until stdin closes.
    let stdin_closed = || {
        tokio::task::spawn_blocking(|| {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                match line.trim() {
                    "watch" => {
                        writes::watch();
                        println!("WATCHING");
                    }
                    "span" => match writes::span() {
                        Some(span) => println!("SPAN {}", span.as_micros()),
                        None => println!("SPAN none"),
                    },
                    _ => println!("UNKNOWN"),
                }
            }
        })
    };
    match what {
        Serve::Nodes {
            prefix,
            count,
            sessions,
        } => {
            let nodes = start_nodes_with(&prefix, count, Durability::default(), sessions).await?;
            let ports: Vec<String> = nodes.iter().map(|n| n.port.to_string()).collect();
            println!("PORTS {}", ports.join(" "));
            let _ = stdin_closed().await;
            stop_nodes(nodes).await;
        }
        Serve::Raw { buffers } => {
            let config = match buffers {
                Buffers::Small => small_buffers(),
                Buffers::Default => WebSocketConfig::default(),
            };
            let (port, server) = echo_server(Some(config), 100_000).await?;
            println!("PORTS {port}");
            let _ = stdin_closed().await;
            server.abort();
        }
    }
    Ok(())
}
