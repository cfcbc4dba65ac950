//! Under load: node programs (`examples/node.rs`, each a process of its own) on the real Redis
//! and RabbitMQ, with thousands of WebSocket clients that all send at once. Every request
//! must be answered, every message delivered once and in its sender's order, and a node told
//! to stop must stop within its grace period whatever its connections are doing.
//!
//! These tests load every core of a small machine, so each runs alone: nextest gives each all
//! of its slots (`.config/nextest.toml`), and under `cargo test` they take turns on a lock.
//! They raise the open-file limit for their clients (and the nodes they start) when the
//! system allows, and say so when it does not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::{StreamExt, stream};
use hybrid_cluster_test_support::client::{Client, Ended};
use hybrid_cluster_test_support::limits::raise_open_files;
use hybrid_cluster_test_support::node::{NodeCluster, NodeProgram};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The bound of each phase of a test: generous, as the nodes are debug builds sharing two
/// cores with the clients and both servers. A phase waits on frames, never on the clock.
const PHASE: Duration = Duration::from_secs(60);
/// Connections opened at once while a test connects its clients.
const CONNECTING: usize = 64;

/// Taken by every test for its whole run, so that tests of this binary never overlap.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts `count` nodes named `{test}-0`, `{test}-1`, … with `extra` arguments each, and
/// waits until every one sees all of them.
async fn start(test: &str, count: usize, extra: &[(&str, String)]) -> NodeCluster {
    let mut cluster = NodeCluster::new(&format!("load-{test}"));
    let mut options = cluster.options().arg("--max-connections", 10_000);
    // A node saturated by the test (debug builds, two cores for everything) may not heartbeat
    // for a while: a lease of 6 s keeps its peers from taking it for dead, which is not what
    // these tests are about.
    options.heartbeat_ms = 2_000;
    for (flag, value) in extra {
        options = options.arg(flag, value);
    }
    for i in 0..count {
        cluster.start(&format!("{test}-{i}"), &options).await;
    }
    cluster.wait_for_nodes(count, Duration::from_secs(30)).await;
    cluster
}

/// Connects `per_node` clients to each node; `clients[n]` are node `n`'s, each welcomed by
/// the node it connected to.
async fn connect(cluster: &NodeCluster, per_node: usize) -> Vec<Vec<Client>> {
    raise_open_files((cluster.nodes.len() * per_node) as u64 * 2 + 1024);
    let mut clients = Vec::new();
    for node in &cluster.nodes {
        let url = node.ws_url();
        let connected: Vec<Client> = stream::iter(0..per_node)
            .map(|_| Client::connect(&url))
            .buffered(CONNECTING)
            .map(|client| client.unwrap_or_else(|e| panic!("connecting to {url}: {e}")))
            .collect()
            .await;
        for client in &connected {
            assert_eq!(client.node, node.id, "the client was placed on its node");
        }
        clients.push(connected);
    }
    clients
}

/// What one client still expects in a phase, and what went wrong.
#[derive(Default)]
struct Expected {
    /// Frames still to come, by key (see [`key`]), with how many of each.
    remaining: HashMap<String, usize>,
    /// The last `seq` seen from each (sender, kind), to check each sender's order.
    last_seq: HashMap<(String, String), u64>,
    problems: Vec<String>,
}

impl Expected {
    fn expect(&mut self, key: impl Into<String>) {
        *self.remaining.entry(key.into()).or_default() += 1;
    }

    fn is_done(&self) -> bool {
        self.remaining.is_empty()
    }

    fn take(&mut self, frame: &Value) {
        let key = key(frame);
        match self.remaining.get_mut(&key) {
            Some(count) => {
                *count -= 1;
                if *count == 0 {
                    self.remaining.remove(&key);
                }
            }
            None => self.problems.push(format!("unexpected {frame}")),
        }
        if let (Some(from), Some(kind), Some(seq)) = (
            frame["from"].as_str(),
            frame["data"]["k"].as_str(),
            frame["data"]["seq"].as_u64(),
        ) {
            let last = self
                .last_seq
                .insert((from.to_owned(), kind.to_owned()), seq);
            if last.is_some_and(|last| last >= seq) {
                self.problems
                    .push(format!("out of order: {seq} after {last:?} from {from}"));
            }
        }
    }
}

/// What a frame is, for counting: `ack:ID`, `joined:G`, `left:G`, `message:KIND`,
/// `group:G:KIND`, `broadcast:KIND`, `error:ID:CODE`.
fn key(frame: &Value) -> String {
    let kind = frame["data"]["k"].as_str().unwrap_or("?");
    match frame["type"].as_str().unwrap_or("?") {
        "ack" => format!("ack:{}", frame["id"]),
        "joined" => format!("joined:{}", frame["group"].as_str().unwrap_or("?")),
        "left" => format!("left:{}", frame["group"].as_str().unwrap_or("?")),
        "message" => format!("message:{kind}"),
        "group" => format!("group:{}:{kind}", frame["group"].as_str().unwrap_or("?")),
        "broadcast" => format!("broadcast:{kind}"),
        "error" => format!("error:{}:{}", frame["id"], frame["code"]),
        other => format!("{other}:{frame}"),
    }
}

/// Reads `client`'s frames until it got everything `expected` lists, the phase's deadline
/// passed, or the connection ended. Returns the problems (none when all is well).
async fn collect(client: &mut Client, mut expected: Expected, deadline: Instant) -> Vec<String> {
    while !expected.is_done() {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_json(left.max(Duration::from_millis(1))).await {
            Ok(Ok(frame)) => expected.take(&frame),
            Ok(Err(ended)) => {
                expected
                    .problems
                    .push(format!("the connection ended: {ended:?}"));
                break;
            }
            Err(_) => break,
        }
    }
    if !expected.is_done() {
        let mut missing: Vec<_> = expected.remaining.iter().collect();
        missing.sort();
        expected
            .problems
            .push(format!("never answered: {missing:?}"));
    }
    expected.problems
}

/// Runs one phase on every client at once: `plan` gives each client the ops it sends (in
/// one flush) and what it must then receive. Panics with a summary when any client missed
/// anything.
async fn phase(
    cluster: &NodeCluster,
    what: &str,
    clients: &mut [Vec<Client>],
    plan: impl Fn(usize, usize, &Client) -> (Vec<Value>, Expected),
) -> Duration {
    let started = Instant::now();
    let deadline = started + PHASE;
    let runs = clients.iter_mut().enumerate().flat_map(|(n, clients)| {
        clients
            .iter_mut()
            .enumerate()
            .map(move |(i, client)| (n, i, client))
    });
    let runs = runs.map(|(n, i, client)| {
        let (ops, expected) = plan(n, i, client);
        async move {
            if let Err(error) = client.send_all(&ops).await {
                return (n, vec![format!("could not send: {error}")]);
            }
            (n, collect(client, expected, deadline).await)
        }
    });
    let problems: Vec<(usize, Vec<String>)> = join_all(runs).await;
    let failed: Vec<&(usize, Vec<String>)> =
        problems.iter().filter(|(_, p)| !p.is_empty()).collect();
    let per_node: Vec<usize> = (0..clients.len())
        .map(|n| failed.iter().filter(|(node, _)| *node == n).count())
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} clients missed something (per node {per_node:?}), e.g. {:?}\n{}",
        failed.len(),
        problems.len(),
        failed.iter().take(3).collect::<Vec<_>>(),
        cluster.logs(15)
    );
    started.elapsed()
}

fn ids(clients: &[Vec<Client>]) -> Vec<Vec<String>> {
    clients
        .iter()
        .map(|node| node.iter().map(|c| c.id.clone()).collect())
        .collect()
}

/// Every connection of two nodes at once sends a message to a connection of its own node,
/// one to a connection of the other node, and joins a room, each with an id: every op is
/// answered. Then one member per room sends to it, and one client per node broadcasts: every
/// client gets each once, which shows every join took effect and no connection was left
/// hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_of_two_nodes_is_answered_when_all_send_at_once() {
    const PER_NODE: usize = 1_500;
    const ROOMS: usize = 10;
    let _alone = ALONE.lock().await;
    let cluster = start("at-once", 2, &[]).await;
    let mut clients = connect(&cluster, PER_NODE).await;
    let ids = ids(&clients);
    let room = |i: usize| format!("room-{}", i % ROOMS);

    let took = phase(
        &cluster,
        "local, cross-node and join",
        &mut clients,
        |n, i, _| {
            let neighbour = &ids[n][(i + 1) % PER_NODE];
            let peer = &ids[1 - n][i];
            let ops = vec![
                json!({"op":"send","to":neighbour,"data":{"k":"local","seq":1},"id":"local"}),
                json!({"op":"send","to":peer,"data":{"k":"cross","seq":1},"id":"cross"}),
                json!({"op":"join","group":room(i),"id":"join"}),
            ];
            let mut expected = Expected::default();
            for key in [
                "ack:\"local\"",
                "ack:\"cross\"",
                "ack:\"join\"",
                "message:local",
                "message:cross",
            ] {
                expected.expect(key);
            }
            expected.expect(format!("joined:{}", room(i)));
            (ops, expected)
        },
    )
    .await;
    eprintln!(
        "{} clients, 3 ops each, all answered in {took:?}",
        2 * PER_NODE
    );

    phase(
        &cluster,
        "a message to each room",
        &mut clients,
        |n, i, _| {
            let mut ops = Vec::new();
            let mut expected = Expected::default();
            // The first ROOMS clients of node 0 speak, one per room.
            if n == 0 && i < ROOMS {
                ops.push(json!({"op":"group","group":room(i),"data":{"k":"room"},"id":"room"}));
                expected.expect("ack:\"room\"");
            }
            expected.expect(format!("group:{}:room", room(i)));
            (ops, expected)
        },
    )
    .await;

    phase(
        &cluster,
        "a broadcast from each node",
        &mut clients,
        |_, i, _| {
            let mut ops = Vec::new();
            let mut expected = Expected::default();
            if i == PER_NODE - 1 {
                ops.push(json!({"op":"broadcast","data":{"k":"all"},"id":"all"}));
                expected.expect("ack:\"all\"");
            }
            expected.expect("broadcast:all");
            expected.expect("broadcast:all");
            (ops, expected)
        },
    )
    .await;

    for node in &cluster.nodes {
        assert_eq!(node.get("/healthz").await.unwrap().0, 200);
    }
}

/// Tens of thousands of ops in flight at once: every connection pipelines ten messages to a
/// connection of its node, ten to one of the other node, a join and a leave, all without
/// waiting. Every op is answered and every message arrives once, in its sender's order,
/// although the node-wide bound on unconfirmed messages (256) is far below what is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tens_of_thousands_of_ops_in_flight_are_all_answered_in_order() {
    const PER_NODE: usize = 1_000;
    const EACH: u64 = 10;
    let _alone = ALONE.lock().await;
    let cluster = start("in-flight", 2, &[]).await;
    let mut clients = connect(&cluster, PER_NODE).await;
    let ids = ids(&clients);

    let took = phase(&cluster, "pipelined ops", &mut clients, |n, i, _| {
        let neighbour = &ids[n][(i + 1) % PER_NODE];
        let peer = &ids[1 - n][i];
        let group = format!("g-{}", i % 7);
        let mut ops = vec![json!({"op":"join","group":group,"id":"join"})];
        let mut expected = Expected::default();
        for seq in 1..=EACH {
            ops.push(json!({"op":"send","to":neighbour,"data":{"k":"local","seq":seq},"id":format!("l{seq}")}));
            ops.push(json!({"op":"send","to":peer,"data":{"k":"cross","seq":seq},"id":format!("x{seq}")}));
            expected.expect(format!("ack:\"l{seq}\""));
            expected.expect(format!("ack:\"x{seq}\""));
            expected.expect("message:local");
            expected.expect("message:cross");
        }
        ops.push(json!({"op":"leave","group":group,"id":"leave"}));
        expected.expect("ack:\"join\"");
        expected.expect("ack:\"leave\"");
        expected.expect(format!("joined:{group}"));
        expected.expect(format!("left:{group}"));
        (ops, expected)
    })
    .await;
    let ops = 2 * PER_NODE * (2 * EACH as usize + 2);
    eprintln!("{ops} ops in flight at once, all answered in {took:?}");
}

/// A node told to stop (SIGTERM) while it is busy, with clients that read nothing and so
/// hold their socket tasks in writes, ends within its grace period and says in its log what
/// it cut short; its peer sees it leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_a_busy_node_within_its_grace_period() {
    const GRACE_MS: u64 = 2_000;
    let _alone = ALONE.lock().await;
    let cluster = start(
        "sigterm",
        2,
        &[
            ("--shutdown-grace-ms", GRACE_MS.to_string()),
            // Writes to a client that reads nothing wait far longer than the grace period.
            ("--write-timeout-ms", "60000".to_owned()),
        ],
    )
    .await;
    let busy = &cluster.nodes[0];
    // Clients of the busy node that never read: their node's writes to them stall once the
    // kernel's buffers are full (4 MiB at most on loopback).
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(
            Client::connect_small(&busy.ws_url(), busy.port, 4096)
                .await
                .unwrap(),
        );
    }
    // A sender on the other node fills them up, through the broker.
    let mut sender = Client::connect(&cluster.nodes[1].ws_url()).await.unwrap();
    let chunk = "x".repeat(60 * 1024);
    let mut ops = Vec::new();
    for client in &stalled {
        for _ in 0..100 {
            ops.push(json!({"op":"send","to":client.id,"data":chunk}));
        }
    }
    ops.push(json!({"op":"broadcast","data":"last","id":"last"}));
    sender.send_all(&ops).await.unwrap();
    // Once the last send is acked, every earlier one was confirmed by the broker.
    let deadline = Instant::now() + PHASE;
    loop {
        let frame = sender
            .next_json(deadline.saturating_duration_since(Instant::now()))
            .await
            .unwrap()
            .unwrap();
        if frame["type"] == "ack" {
            break;
        }
    }

    let stopping = Instant::now();
    busy.signal("TERM").unwrap();
    let mut cluster = cluster;
    let mut busy = cluster.nodes.remove(0);
    let exited = busy
        .wait_exit(Duration::from_millis(GRACE_MS) + Duration::from_secs(3))
        .await;
    let took = stopping.elapsed();
    let log = busy.log();
    assert!(
        exited.is_some(),
        "the node did not exit within {GRACE_MS} ms (+3 s)\n{}",
        busy.log_tail(20)
    );
    assert!(exited.unwrap().success(), "{}", busy.log_tail(20));
    assert!(
        log.contains("cutting short the connections still open"),
        "the log says what was cut short:\n{}",
        busy.log_tail(20)
    );
    assert!(
        log.contains("node left the cluster"),
        "{}",
        busy.log_tail(20)
    );
    eprintln!("a busy node stopped in {took:?} with a grace period of {GRACE_MS} ms");
    cluster.nodes[0]
        .wait_for_nodes(1, Duration::from_secs(10))
        .await
        .unwrap();
    cluster.nodes.push(busy);
    drop(stalled);
}

/// A drained node's 1,000 clients are spread over the other nodes in proportion to their free
/// places, not sent all to one: three peers with 300, 500 and 1,200 free places (the last
/// holding 200 clients of its own) are named for about 150, 250 and 600 of them. Every client
/// reads its 1012 close, waits a little (jitter), reconnects to the node its reason names and
/// is welcomed there; no node goes past its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_nodes_clients_spread_over_the_others_by_free_places() {
    const CLIENTS: usize = 1_000;
    const JITTER_MS: u64 = 500;
    // Each peer: its limit and the clients it already holds.
    const PEERS: [(u32, usize); 3] = [(300, 0), (500, 0), (1_400, 200)];
    let _alone = ALONE.lock().await;
    raise_open_files(6 * CLIENTS as u64 + 1024);
    let mut cluster = NodeCluster::new("load-spread");
    let mut options = cluster.options();
    // A fast heartbeat, so that the drained node soon sees the peers' own clients.
    options.heartbeat_ms = 500;
    cluster
        .start(
            "spread-0",
            &options.clone().arg("--max-connections", 10_000),
        )
        .await;
    for (i, (max, _)) in PEERS.iter().enumerate() {
        let options = options.clone().arg("--max-connections", max);
        cluster.start(&format!("spread-{}", i + 1), &options).await;
    }
    cluster.wait_for_nodes(4, Duration::from_secs(30)).await;

    let mut own = Vec::new();
    for (i, (_, holding)) in PEERS.iter().enumerate() {
        own.extend(connect_to(&cluster.nodes[i + 1], *holding).await);
    }
    let drained = &cluster.nodes[0];
    let mut clients = connect_to(drained, CLIENTS).await;
    // The drained node must see what the peers hold before it spreads its clients.
    seen_by(drained, &cluster, &PEERS).await;

    let stopping = Instant::now();
    drained.signal("TERM").unwrap();
    let moves = clients.drain(..).map(|client| async move {
        let jitter = Duration::from_millis(rand::random_range(0..JITTER_MS));
        let (node, client) = reconnect_as_told(client, jitter).await?;
        let after = stopping.elapsed();
        Ok::<_, String>(Moved {
            node,
            after,
            _client: client,
        })
    });
    let moves: Vec<Result<Moved, String>> = join_all(moves).await;
    let took = stopping.elapsed();
    let failed: Vec<&String> = moves.iter().filter_map(|m| m.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {CLIENTS} clients did not move, e.g. {:?}\n{}",
        failed.len(),
        &failed[..failed.len().min(3)],
        cluster.logs(15)
    );
    let mut got: HashMap<String, usize> = HashMap::new();
    let mut welcomed_after = Vec::new();
    for moved in moves.iter().flatten() {
        *got.entry(moved.node.clone()).or_default() += 1;
        welcomed_after.push(moved.after);
    }
    welcomed_after.sort();
    let percentile = |p: usize| welcomed_after[(welcomed_after.len() - 1) * p / 100];

    let free: Vec<usize> = PEERS
        .iter()
        .map(|&(max, held)| max as usize - held)
        .collect();
    let total_free: usize = free.iter().sum();
    eprintln!(
        "{CLIENTS} clients of a drained node, reconnecting with up to {JITTER_MS} ms of jitter:"
    );
    for (i, (&(max, held), places)) in PEERS.iter().zip(&free).enumerate() {
        let id = &cluster.nodes[i + 1].id;
        let expected = (CLIENTS * places) as f64 / total_free as f64;
        let landed = got.get(id).copied().unwrap_or(0);
        eprintln!(
            "  {id}: limit {max}, {held} clients before, {places} free: expected {expected:.0}, got {landed}"
        );
        assert!(
            (landed as f64 - expected).abs() <= expected * 0.1,
            "{id} got {landed} of the clients, expected {expected:.0} ± 10%: {got:?}"
        );
        assert!(
            held + landed <= max as usize,
            "{id} welcomed {held} + {landed} clients, over its limit of {max}"
        );
        let (_, body) = cluster.nodes[i + 1].get("/cluster/nodes").await.unwrap();
        let connections = connections_of(&body, id);
        assert!(
            connections <= u64::from(max),
            "{id} holds {connections} connections, over its limit of {max}"
        );
    }
    eprintln!(
        "  all {CLIENTS} welcomed again within {took:?} of the SIGTERM (p50 {:?}, p99 {:?})",
        percentile(50),
        percentile(99)
    );
    assert_eq!(got.values().sum::<usize>(), CLIENTS);
    let mut drained = cluster.nodes.remove(0);
    assert!(
        drained
            .wait_exit(Duration::from_secs(15))
            .await
            .is_some_and(|status| status.success()),
        "{}",
        drained.log_tail(20)
    );
    drop(own);
}

/// A client of a drained node, welcomed again.
struct Moved {
    /// The node its close reason named, which welcomed it.
    node: String,
    /// When it was welcomed, from the SIGTERM.
    after: Duration,
    /// Kept open until the test has counted every node's clients.
    _client: Client,
}

/// Connects `count` clients to `node`, each welcomed there.
async fn connect_to(node: &NodeProgram, count: usize) -> Vec<Client> {
    let url = node.ws_url();
    let clients: Vec<Client> = stream::iter(0..count)
        .map(|_| Client::connect(&url))
        .buffered(CONNECTING)
        .map(|client| client.unwrap_or_else(|e| panic!("connecting to {url}: {e}")))
        .collect()
        .await;
    for client in &clients {
        assert_eq!(client.node, node.id, "the client was placed on its node");
    }
    clients
}

/// Waits until `node` sees each peer (`cluster.nodes[1..]`) holding the clients `peers` says.
async fn seen_by(node: &NodeProgram, cluster: &NodeCluster, peers: &[(u32, usize)]) {
    let deadline = Instant::now() + PHASE;
    loop {
        let (_, body) = node.get("/cluster/nodes").await.unwrap();
        let seen = peers
            .iter()
            .enumerate()
            .all(|(i, &(_, held))| connections_of(&body, &cluster.nodes[i + 1].id) == held as u64);
        if seen {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never saw the peers' clients: {body}",
            node.id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The connections node `id` reports in a `/cluster/nodes` body.
fn connections_of(body: &str, id: &str) -> u64 {
    let nodes: Value = serde_json::from_str(body).unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|node| node["node_id"] == id)
        .and_then(|node| node["connection_count"].as_u64())
        .unwrap_or_else(|| panic!("no connection count for {id} in {body}"))
}

/// Reads `client`'s close (1012, a reason naming a node), waits `jitter`, reconnects to that
/// node and is welcomed there: returns the node named and the new client.
async fn reconnect_as_told(
    mut client: Client,
    jitter: Duration,
) -> Result<(String, Client), String> {
    let frame = loop {
        match client.next_json(PHASE).await {
            Ok(Ok(_)) => continue,
            Ok(Err(Ended::Closed(Some(frame)))) => break frame,
            Ok(Err(ended)) => return Err(format!("{}: ended with {ended:?}", client.id)),
            Err(error) => return Err(error.to_string()),
        }
    };
    if u16::from(frame.code) != 1012 {
        return Err(format!("{}: closed with {}", client.id, frame.code));
    }
    let reason: Value = serde_json::from_str(frame.reason.as_str())
        .map_err(|e| format!("{}: the reason is not JSON ({e})", client.id))?;
    let (Some(url), Some(named)) = (reason["reconnect"].as_str(), reason["node"].as_str()) else {
        return Err(format!("{}: no node named: {reason}", client.id));
    };
    tokio::time::sleep(jitter).await;
    let again = Client::connect(url)
        .await
        .map_err(|e| format!("reconnecting to {named} at {url}: {e}"))?;
    if again.node != named {
        return Err(format!("welcomed by {} instead of {named}", again.node));
    }
    Ok((named.to_owned(), again))
}
