//! Three nodes of one cluster in one process, on the embedded in-memory backends.
//!
//! Run it with `cargo run --example cluster`: no Redis and no RabbitMQ needed. It shows what
//! every later layer builds on: nodes registering under leases and seeing each other, messages
//! routed to one node, to all, and to a group's members only, a send to a node that is gone
//! refused rather than lost, a crashed node dropped when its lease runs out, and a graceful
//! leave seen at once.

use std::collections::BTreeMap;
use std::error::Error;
use std::time::Duration;

use futures_util::StreamExt;
use hybrid_cluster::broker::ConsumeOptions;
use hybrid_cluster::registry::{RegistryEvent, RemovalCause};
use hybrid_cluster::{
    Broker, Envelope, GroupName, Incarnation, MemoryBroker, MemoryRegistry, NodeId, NodeInfo,
    QueueOptions, Registry, RoutingKey, Target,
};
use hybrid_cluster::{ConnectionIds, PublishError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const HEARTBEAT: Duration = Duration::from_millis(200);
const LEASE: Duration = Duration::from_millis(600);

/// What a node's consumer saw, for the main task to print in order.
struct Received {
    node: NodeId,
    envelope: Envelope,
}

struct DemoNode {
    id: NodeId,
    info: NodeInfo,
    connections: ConnectionIds,
    tasks: Vec<JoinHandle<()>>,
}

impl DemoNode {
    async fn start(
        name: &str,
        port: u16,
        registry: &MemoryRegistry,
        broker: &MemoryBroker,
        received: mpsc::Sender<Received>,
    ) -> Result<Self, Box<dyn Error>> {
        let id = NodeId::new(name)?;
        let incarnation = Incarnation::random();
        let mut info = NodeInfo::new(id.clone(), incarnation, "127.0.0.1", port);
        info.max_connections = 1_000;

        // The node's queue, bound to its own key and to the broadcast key.
        broker.declare_queue(&id, &QueueOptions::default()).await?;
        broker.bind(&id, &RoutingKey::Node(id.clone())).await?;
        broker.bind(&id, &RoutingKey::Broadcast).await?;
        let mut deliveries = broker.consume(&id, &ConsumeOptions::default()).await?;
        let node = id.clone();
        let consumer = tokio::spawn(async move {
            while let Some(Ok(delivery)) = deliveries.next().await {
                let envelope = match Envelope::from_message(delivery.message) {
                    Ok(envelope) => envelope,
                    Err(e) => {
                        println!("    {node} dead-letters a malformed message: {e}");
                        let _ = delivery.acker.dead_letter().await;
                        continue;
                    }
                };
                let _ = delivery.acker.ack().await;
                let _ = received
                    .send(Received {
                        node: node.clone(),
                        envelope,
                    })
                    .await;
            }
        });

        // Register, then keep the lease alive with a heartbeat.
        registry
            .put_node(&id, info.to_json()?.into(), LEASE)
            .await?;
        let heartbeat = {
            let registry = registry.clone();
            let mut info = info.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(HEARTBEAT);
                loop {
                    tick.tick().await;
                    info.last_heartbeat = hybrid_cluster::node::now_millis();
                    if let Ok(record) = info.to_json() {
                        let _ = registry.put_node(&info.node_id, record.into(), LEASE).await;
                    }
                }
            })
        };
        Ok(Self {
            connections: ConnectionIds::new(id.clone(), incarnation),
            id,
            info,
            tasks: vec![consumer, heartbeat],
        })
    }

    /// Stops heart-beating and consuming without a word to anyone, as a crash would.
    fn crash(self) {
        for task in self.tasks {
            task.abort();
        }
    }

    /// Leaves cleanly: deregisters at once, then removes its queue.
    async fn leave(
        self,
        registry: &MemoryRegistry,
        broker: &MemoryBroker,
    ) -> Result<(), Box<dyn Error>> {
        for task in &self.tasks {
            task.abort();
        }
        registry.remove_node(&self.id).await?;
        broker.delete_queue(&self.id).await?;
        Ok(())
    }
}

fn describe(target: &Target) -> String {
    match target {
        Target::Connection(id) => format!("connection {id}"),
        Target::Node(node) => format!("node {node}"),
        Target::Broadcast => "everyone".to_owned(),
        Target::Group(group) => format!("group {group:?}"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let started = Instant::now();
    let log = |line: String| println!("[{:>5} ms] {line}", started.elapsed().as_millis());

    println!("hybrid-cluster demo: 3 nodes in one process on the embedded in-memory backends");
    println!(
        "(heartbeat every {} ms, lease {} ms)\n",
        HEARTBEAT.as_millis(),
        LEASE.as_millis()
    );

    // Every node shares these, as every node would share one Redis and one RabbitMQ.
    let registry = MemoryRegistry::new();
    let broker = MemoryBroker::new();

    // node-a's view of the cluster: watch, then list (see the registry docs).
    let mut events = registry.watch().await?;
    let (received_tx, mut received) = mpsc::channel(64);

    let a = DemoNode::start("node-a", 5001, &registry, &broker, received_tx.clone()).await?;
    let b = DemoNode::start("node-b", 5002, &registry, &broker, received_tx.clone()).await?;
    let c = DemoNode::start("node-c", 5003, &registry, &broker, received_tx.clone()).await?;
    drop(received_tx);

    let mut seen = BTreeMap::new();
    while seen.len() < 3 {
        if let Some(Ok(RegistryEvent::Updated(record))) = events.next().await {
            let info = NodeInfo::from_json(&record.value)?;
            if seen.insert(info.node_id.clone(), ()).is_none() {
                log(format!(
                    "node-a sees {} join at {} ({} / {} connections, {})",
                    info.node_id,
                    info.ws_url(),
                    info.connection_count,
                    info.max_connections,
                    info.status
                ));
            }
        }
    }
    let listed: Vec<String> = registry
        .nodes()
        .await?
        .into_iter()
        .map(|r| r.node.to_string())
        .collect();
    log(format!("registry lists {}", listed.join(", ")));
    println!();

    let expect = |count: usize, what: &str| {
        log(what.to_owned());
        count
    };
    let mut print_deliveries = async |count: usize| {
        for _ in 0..count {
            let Some(Received { node, envelope }) = received.recv().await else {
                break;
            };
            log(format!(
                "    {node} receives {:?} for {} from {}",
                envelope.payload_text().unwrap_or("<binary>"),
                describe(&envelope.target),
                envelope.origin
            ));
        }
    };

    // A connection on node-b: its id names node-b, so node-a routes with no lookup.
    let bob = b.connections.next_id();
    let alice = a.connections.next_id();
    let n = expect(1, &format!("{alice} on node-a sends to {bob} on node-b"));
    let hello = Envelope::text(a.id.clone(), Target::Connection(bob.clone()), "hello, bob")
        .with_sender(alice.clone());
    broker
        .publish(&hello.routing_key(), hello.to_message()?)
        .await?;
    print_deliveries(n).await;

    let n = expect(3, "node-c broadcasts");
    let news = Envelope::text(c.id.clone(), Target::Broadcast, "news for all");
    broker
        .publish(&news.routing_key(), news.to_message()?)
        .await?;
    print_deliveries(n).await;

    let lobby = GroupName::new("lobby")?;
    let lobby_key = RoutingKey::Group(lobby.clone());
    broker.bind(&b.id, &lobby_key).await?;
    broker.bind(&c.id, &lobby_key).await?;
    let n = expect(
        2,
        "node-b and node-c have members in group \"lobby\"; node-a sends to the group",
    );
    let invite = Envelope::text(a.id.clone(), Target::Group(lobby), "lobby opens");
    broker
        .publish(&invite.routing_key(), invite.to_message()?)
        .await?;
    print_deliveries(n).await;

    let ghost = NodeId::new("node-x")?;
    let lost = Envelope::text(a.id.clone(), Target::Node(ghost.clone()), "anyone?");
    match broker
        .publish(&lost.routing_key(), lost.to_message()?)
        .await
    {
        Err(PublishError::Unroutable { key }) => log(format!(
            "node-a sends to {ghost}, which never existed: refused ({key} is unroutable), not lost"
        )),
        other => log(format!("unexpected outcome for {ghost}: {other:?}")),
    }
    println!();

    log("node-c crashes: no goodbye, its heartbeat stops".to_owned());
    let crashed_at = Instant::now();
    c.crash();
    await_removal(&mut events, &log, RemovalCause::Expired, crashed_at).await;

    log("node-b leaves gracefully".to_owned());
    let left_at = Instant::now();
    b.leave(&registry, &broker).await?;
    await_removal(&mut events, &log, RemovalCause::Left, left_at).await;

    let late = Envelope::text(
        a.id.clone(),
        Target::Connection(bob.clone()),
        "still there?",
    );
    match broker
        .publish(&late.routing_key(), late.to_message()?)
        .await
    {
        Err(e) => log(format!("node-a sends to {bob} again: refused ({e})")),
        Ok(()) => log(format!("node-a sends to {bob} again: accepted")),
    }

    let listed: Vec<String> = registry
        .nodes()
        .await?
        .into_iter()
        .map(|r| r.node.to_string())
        .collect();
    log(format!("registry lists {}", listed.join(", ")));
    println!(
        "\n{} stays up with {} of {} connections used. Done.",
        a.info.node_id, a.info.connection_count, a.info.max_connections
    );
    a.crash();
    Ok(())
}

/// Waits for node-a's view to drop a node, and says how long it took.
async fn await_removal(
    events: &mut hybrid_cluster::registry::RegistryEvents,
    log: &impl Fn(String),
    expected: RemovalCause,
    since: Instant,
) {
    while let Some(event) = events.next().await {
        if let Ok(RegistryEvent::Removed { node, cause }) = event {
            let how = match cause {
                RemovalCause::Expired => "its lease ran out",
                RemovalCause::Left => "it said goodbye",
            };
            log(format!(
                "    node-a drops {node} after {} ms: {how}",
                since.elapsed().as_millis()
            ));
            if cause == expected {
                return;
            }
        }
    }
}
