//! Three nodes of one cluster in one process, with real WebSocket clients.
//!
//! ```sh
//! cargo run --example cluster                                  # embedded backends, no servers
//! cargo run --example cluster -- --redis redis://127.0.0.1:6379 --amqp amqp://guest:guest@127.0.0.1:5672/%2f
//! cargo run --example cluster -- --redis-cluster redis://127.0.0.1:7000,redis://127.0.0.1:7001 --amqp amqp://guest:guest@127.0.0.1:5672/%2f
//! cargo run --example cluster -- --redis redis://127.0.0.1:6379 --amqp amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f
//! ```
//!
//! Each node serves the demo protocol (see `hybrid_cluster::protocol`) on a loopback port.
//! Clients connect to different nodes; the demo prints placement (a full node redirects, in
//! the WebSocket itself), a message across nodes, a group, a broadcast, and a node leaving
//! gracefully, its client reconnecting where the close frame says.

use std::error::Error;
use std::time::Duration;

use axum::serve::ListenerExt;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hybrid_cluster::server::{ServerConfig, router};
use hybrid_cluster::{
    AmqpUrl, Backends, Cluster, ClusterConfig, ClusterPrefix, NodeId, RedisUrl, SessionLimits,
};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

type BoxError = Box<dyn Error + Send + Sync>;
type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Log(Instant);

impl Log {
    fn say(&self, line: impl AsRef<str>) {
        println!("[{:>5} ms] {}", self.0.elapsed().as_millis(), line.as_ref());
    }
}

/// A demo client: a name, its socket, and the id the cluster gave it.
struct Client {
    name: &'static str,
    socket: Socket,
    id: String,
    node: String,
    /// Its session's token, from its welcome.
    session: String,
    /// The `seq` of the last numbered frame it got.
    last_seq: u64,
}

impl Client {
    /// Connects to `url`, following one redirect (in-band, the default placement mode: the
    /// node's first frame names another node, then it closes with 4000), and reads the
    /// welcome.
    async fn connect(name: &'static str, url: &str, log: &Log) -> Result<Self, BoxError> {
        let mut client = Self::open(name, url).await?;
        let mut first = client.next().await?;
        if first["type"] == "redirect" {
            let location = first["url"]
                .as_str()
                .ok_or_else(|| format!("{name}: a redirect without a URL: {first}"))?
                .to_owned();
            let closed = client.next().await?;
            log.say(format!(
                "{name} -> {url}: {first}, then close {}; connecting there",
                closed["code"]
            ));
            client = Self::open(name, &location).await?;
            first = client.next().await?;
        }
        if first["type"] != "welcome" {
            return Err(format!("{name}: expected a welcome, got {first}").into());
        }
        client.id = first["connection_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        client.node = first["node_id"].as_str().unwrap_or_default().to_owned();
        client.session = first["session"].as_str().unwrap_or_default().to_owned();
        log.say(format!(
            "{name} is connection {} on {}",
            client.id, client.node
        ));
        Ok(client)
    }

    async fn open(name: &'static str, url: &str) -> Result<Self, BoxError> {
        let (socket, _) = connect_async(url).await?;
        Ok(Self {
            name,
            socket,
            id: String::new(),
            node: String::new(),
            session: String::new(),
            last_seq: 0,
        })
    }

    async fn send(&mut self, request: Value) -> Result<(), BoxError> {
        self.socket.send(Message::text(request.to_string())).await?;
        Ok(())
    }

    /// The next JSON frame, within a second.
    async fn next(&mut self) -> Result<Value, BoxError> {
        self.next_within(Duration::from_secs(1)).await
    }

    /// The next JSON frame, within `bound`; remembers the `seq` of a numbered one.
    async fn next_within(&mut self, bound: Duration) -> Result<Value, BoxError> {
        loop {
            let frame = timeout(bound, self.socket.next())
                .await
                .map_err(|_| format!("{}: nothing arrived", self.name))?
                .ok_or_else(|| format!("{}: the connection ended", self.name))??;
            match frame {
                Message::Text(text) => {
                    let frame: Value = serde_json::from_str(&text)?;
                    if let Some(seq) = frame["seq"].as_u64() {
                        self.last_seq = seq;
                    }
                    return Ok(frame);
                }
                Message::Close(close) => {
                    return Ok(json!({
                        "type": "closed",
                        "code": close.as_ref().map(|c| u16::from(c.code)),
                        "reason": close.as_ref().map(|c| c.reason.to_string()),
                    }));
                }
                _ => {}
            }
        }
    }

    /// Whether nothing arrives within 200 ms.
    async fn quiet(&mut self) -> bool {
        timeout(Duration::from_millis(200), self.socket.next())
            .await
            .is_err()
    }
}

/// The demo's command line.
#[derive(Debug, Parser)]
#[command(
    name = "cluster",
    about = "Three nodes of one cluster in one process, with real WebSocket clients"
)]
struct Cli {
    /// Redis, for discovery (give --amqp too, or neither for the embedded backends).
    #[arg(long, value_name = "URL")]
    redis: Option<RedisUrl>,
    /// A Redis Cluster, for discovery, instead of --redis: seed URLs, comma-separated.
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
}

struct Args {
    backends: Backends,
    /// The other nodes of a RabbitMQ cluster, after the first `--amqp`.
    amqp_fallbacks: Vec<AmqpUrl>,
    prefix: ClusterPrefix,
    servers: bool,
}

fn args() -> Result<Args, BoxError> {
    let Cli {
        redis,
        redis_cluster,
        amqp,
    } = Cli::parse();
    // One fixed prefix: every run reuses the same exchange and dead-letter queue in RabbitMQ
    // rather than leaving new ones behind (nodes remove their own queues and keys on leaving).
    let prefix = ClusterPrefix::new("hybrid-cluster-demo")?;
    let (backends, amqp_fallbacks) = Backends::from_addresses(redis, redis_cluster, amqp)
        .map_err(|_| "give --redis (or --redis-cluster) and --amqp, or neither")?;
    let servers = !matches!(backends, Backends::Embedded { .. });
    Ok(Args {
        backends,
        amqp_fallbacks,
        prefix,
        servers,
    })
}

async fn start_node(
    name: &str,
    max_connections: u32,
    args: &Args,
) -> Result<(Cluster, String), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let mut config = ClusterConfig::new(NodeId::new(name)?, "127.0.0.1", port);
    config.max_connections = max_connections;
    config.prefix = args.prefix.clone();
    config.rabbitmq.fallback_urls = args.amqp_fallbacks.clone();
    config.discovery = config.discovery.with_heartbeat(Duration::from_millis(500));
    config.shutdown_grace = Duration::from_secs(2);
    // Sessions: a client that loses its connection resumes on any node and misses nothing.
    config.sessions = Some(SessionLimits::default());
    let cluster = Cluster::start(config, args.backends.clone()).await?;
    let app = router(cluster.clone(), ServerConfig::default());
    // Small frames go out at once: without TCP_NODELAY, Nagle's algorithm and delayed ACKs
    // hold a reply for up to 40 ms.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((cluster, format!("ws://127.0.0.1:{port}/ws")))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = args()?;
    let log = Log(Instant::now());
    if args.servers {
        println!(
            "hybrid-cluster demo: 3 nodes on Redis and RabbitMQ (prefix {})\n",
            args.prefix
        );
    } else {
        println!(
            "hybrid-cluster demo: 3 nodes in one process on the embedded backends (no Redis, no RabbitMQ)\n"
        );
    }
    let [(node1, url1), (node2, url2), (node3, url3)] = start_nodes(&args, &log).await?;

    let mut alice = Client::connect("alice", &url1, &log).await?;
    let mut bob = Client::connect("bob", &url2, &log).await?;
    let mut carol = Client::connect("carol", &url3, &log).await?;
    let mut dave = Client::connect("dave", &url1, &log).await?;
    // node-1 is full now (alice, dave): erin is sent elsewhere by the balancer.
    let mut erin = Client::connect("erin", &url1, &log).await?;
    println!();

    unicast(&mut alice, &mut bob, &log).await?;
    group(&mut alice, &mut bob, &mut carol, &mut dave, &log).await?;
    log.say("carol broadcasts");
    carol
        .send(json!({"op": "broadcast", "data": "news for all"}))
        .await?;
    for client in [&mut alice, &mut bob, &mut carol, &mut dave, &mut erin] {
        let message = client.next().await?;
        log.say(format!(
            "    {:<5} on {} gets {message}",
            client.name, client.node
        ));
    }
    log.say("dave -> a connection that never existed");
    dave.send(json!({"op": "send", "to": "node-2:00000000000000aa:99", "data": 1, "id": "x"}))
        .await?;
    log.say(format!("    dave gets {}", dave.next().await?));
    println!();

    let carol = leave(&node1, node3, &mut carol, &mut alice, &log).await?;
    println!();
    let seen: Vec<String> = node1
        .nodes()
        .iter()
        .map(|n| {
            format!(
                "{} ({} connections, {})",
                n.node_id, n.connection_count, n.status
            )
        })
        .collect();
    log.say(format!("node-1 sees {}", seen.join(", ")));
    drop((alice, bob, carol, dave, erin));
    node1.shutdown().await?;
    node2.shutdown().await?;
    println!("\nDone.");
    Ok(())
}

/// Starts the three nodes (node-1 holds at most 2 connections) and waits until node-1 sees
/// them all.
async fn start_nodes(args: &Args, log: &Log) -> Result<[(Cluster, String); 3], BoxError> {
    let (node1, url1) = start_node("node-1", 2, args).await?;
    log.say(format!("node-1 serves {url1} (at most 2 connections)"));
    let (node2, url2) = start_node("node-2", 100, args).await?;
    log.say(format!("node-2 serves {url2}"));
    let (node3, url3) = start_node("node-3", 100, args).await?;
    log.say(format!("node-3 serves {url3}"));
    node1
        .discovery()
        .view()
        .wait_until(|nodes| nodes.len() == 3)
        .await;
    let seen: Vec<String> = node1
        .nodes()
        .iter()
        .map(|n| n.node_id.to_string())
        .collect();
    log.say(format!("node-1 sees {}", seen.join(", ")));
    println!();
    Ok([(node1, url1), (node2, url2), (node3, url3)])
}

/// A message across nodes, acked once the broker confirmed it.
async fn unicast(alice: &mut Client, bob: &mut Client, log: &Log) -> Result<(), BoxError> {
    log.say(format!(
        "alice -> bob: {{\"op\":\"send\",\"to\":\"{}\",\"data\":\"hi bob\",\"id\":1}}",
        bob.id
    ));
    alice
        .send(json!({"op": "send", "to": bob.id, "data": "hi bob", "id": 1}))
        .await?;
    log.say(format!("    bob   gets {}", bob.next().await?));
    log.say(format!(
        "    alice gets {} (confirmed by the broker)",
        alice.next().await?
    ));
    Ok(())
}

/// Bob and carol join a group; a message to it reaches them only.
async fn group(
    alice: &mut Client,
    bob: &mut Client,
    carol: &mut Client,
    dave: &mut Client,
    log: &Log,
) -> Result<(), BoxError> {
    for client in [&mut *bob, &mut *carol] {
        client.send(json!({"op": "join", "group": "lobby"})).await?;
        let reply = client.next().await?;
        log.say(format!("{} on {} gets {reply}", client.name, client.node));
    }
    log.say("alice -> group lobby");
    alice
        .send(json!({"op": "group", "group": "lobby", "data": {"text": "lobby opens"}}))
        .await?;
    log.say(format!("    bob   gets {}", bob.next().await?));
    log.say(format!("    carol gets {}", carol.next().await?));
    log.say(format!(
        "    alice and dave get nothing: {}",
        alice.quiet().await && dave.quiet().await
    ));
    Ok(())
}

/// Node-3 shuts down gracefully: carol is closed with a reason naming another node; alice
/// writes to her meanwhile; carol reconnects there and resumes her session, missing nothing.
/// Returns carol's new client.
async fn leave(
    node1: &Cluster,
    node3: Cluster,
    carol: &mut Client,
    alice: &mut Client,
    log: &Log,
) -> Result<Client, BoxError> {
    log.say("node-3 shuts down gracefully");
    let left = Instant::now();
    let shutdown = tokio::spawn(async move { node3.shutdown().await });
    let closed = carol.next().await?;
    log.say(format!("    carol gets {closed}"));
    log.say("alice -> carol, who is away");
    alice
        .send(json!({"op": "send", "to": carol.id, "data": "while you were away", "id": 2}))
        .await?;
    log.say(format!("    alice gets {}", alice.next().await?));
    shutdown.await??;
    node1
        .discovery()
        .view()
        .wait_until(|nodes| nodes.len() == 2)
        .await;
    log.say(format!(
        "    node-1 no longer sees node-3 ({} ms after the shutdown began)",
        left.elapsed().as_millis()
    ));
    let reconnect = closed["reason"]
        .as_str()
        .and_then(|reason| serde_json::from_str::<Value>(reason).ok())
        .and_then(|reason| reason["reconnect"].as_str().map(str::to_owned))
        .ok_or("the close reason names no node")?;
    let resume = format!(
        "{reconnect}?resume={}&last={}",
        carol.session, carol.last_seq
    );
    log.say(format!(
        "carol reconnects there with her session's token and the last seq she got ({})",
        carol.last_seq
    ));
    let mut back = Client::connect("carol", &resume, log).await?;
    log.say(format!("    carol gets {}", back.next().await?));
    // What alice wrote comes now: from the log, or sent on by the node that took over
    // node-3's queue.
    let missed = back.next_within(Duration::from_secs(10)).await?;
    log.say(format!("    carol gets {missed}"));
    log.say(format!(
        "carol is back, on {}, in her groups still",
        back.node
    ));
    Ok(back)
}
