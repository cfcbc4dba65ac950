//! Starting a node, step by step: its backends connected, its queue declared and consumed,
//! its record registered, its parts assembled and its background tasks running.

use std::sync::Arc;

use hybrid_cluster_balance::{Placer, Selector};
use hybrid_cluster_core::{
    AmqpUrl, Broker, BrokerError, ConnectionIds, ConsumeOptions, Deliveries, Incarnation,
    LiveNodeInfo, NodeInfo, PresenceStore, Registry, SessionStore,
};
use hybrid_cluster_discovery::{
    ConnectionCounter, Discovery, RedisOptions, RedisPresenceStore, RedisRegistry,
    RedisSessionStore,
};
use hybrid_cluster_routing::{Forward, NodeTopology, RabbitBroker};
use tokio::time::{Duration, Instant};

use super::tasks;
use crate::config::{Backends, ClusterConfig};
use crate::error::ClusterError;
use crate::local::LocalConnections;
use crate::metered::{MeteredBroker, MeteredRegistry};
use crate::metrics::Metrics;
use crate::node::{Node, RunState};
use crate::session::NodeSessions;

/// Starts the node of `config` on `backends`: see [`Cluster::start`](crate::Cluster::start).
pub(super) async fn start(
    config: ClusterConfig,
    backends: Backends,
) -> Result<Arc<Node>, ClusterError> {
    let config = settled(config);
    let Stores {
        registry,
        broker,
        sessions,
        presence,
    } = connect_backends(&config, backends).await?;
    let sessions = node_sessions(&config, sessions);
    let presence = config.presence.then(|| (presence, presence_ttl(&config)));
    let id = config.node_id.clone();
    let incarnation = Incarnation::random();
    let topology = NodeTopology::declare_with(
        Arc::clone(&broker),
        id.clone(),
        &config.queue,
        config.group_keys,
    )
    .await?;
    let deliveries = consume_own_queue(&topology, &config.consume).await?;

    let counter = ConnectionCounter::new();
    let metrics = Metrics::new(id.as_str());
    let local = local_connections(&config, &counter, &metrics);
    let discovery = register(&config, incarnation, registry, counter).await?;
    let local_info = discovery
        .view()
        .members()
        .get(&id)
        .cloned()
        .unwrap_or_else(|| LiveNodeInfo::new(discovery.registrar().info()));
    let placer = Placer::with(
        local_info.clone(),
        config.placement,
        Selector::new(config.strategy),
        Some(discovery.view().epoch().clone()),
    );
    let forward = Forward::with_config(broker, config.forward.clone());
    let node = Arc::new(Node {
        ids: ConnectionIds::new(id.clone(), incarnation),
        id,
        incarnation,
        config,
        local,
        topology,
        forward,
        discovery,
        placer,
        local_info,
        metrics,
        state: RunState::default(),
        sessions,
        presence,
    });
    run(&node, deliveries);
    Ok(node)
}

/// The table of the node's connections, bounded as `config` says.
fn local_connections(
    config: &ClusterConfig,
    counter: &ConnectionCounter,
    metrics: &Metrics,
) -> Arc<LocalConnections> {
    let mut local = LocalConnections::new(
        counter.clone(),
        config.inbox_capacity,
        config.slow_client,
        metrics.clone(),
    )
    .with_byte_bound(config.inbox_bytes);
    if config.presence {
        local = local.with_presence();
    }
    let local = Arc::new(local);
    if let Some(limits) = &config.sessions {
        local.park_for(limits.resume_window);
    }
    local
}

/// How long a node's presence entries live unless it keeps them alive: well past the time
/// its peers take to see it gone and reap them (a lease), so that only a cluster gone whole
/// leaves them to expire.
fn presence_ttl(config: &ClusterConfig) -> Duration {
    (config.discovery.lease * 10).max(Duration::from_secs(60))
}

/// What a node keeps its state in, connected.
struct Stores {
    registry: Arc<dyn Registry>,
    broker: Arc<dyn Broker>,
    sessions: Arc<dyn SessionStore>,
    presence: Arc<dyn PresenceStore>,
}

/// The node's sessions on `store`, when `config` turns them on.
fn node_sessions(
    config: &ClusterConfig,
    store: Arc<dyn SessionStore>,
) -> Option<Arc<NodeSessions>> {
    let limits = config.sessions?;
    Some(Arc::new(NodeSessions::new(
        store,
        limits,
        config.secret.clone(),
        config.rabbitmq.outage_timeout,
    )))
}

/// `config` with what its top-level settings imply for the layers' own: the durability of
/// the queue and the messages, the group keys, the secret of routing and discovery.
fn settled(mut config: ClusterConfig) -> ClusterConfig {
    config.queue.durability = config.durability;
    config.rabbitmq.persistent = config.durability.is_persistent();
    config.forward.group_keys = config.group_keys;
    if let Some(secret) = &config.secret {
        config.forward.secret = Some(secret.clone());
        config.discovery = config.discovery.clone().with_secret(secret.clone());
    }
    config
}

/// The stores of a node on Redis (`registry`, and its command connection for sessions and
/// presence: a single server's or a Redis Cluster's, two types) and RabbitMQ (`amqp`).
macro_rules! on_servers {
    ($config:expr, $registry:expr, $amqp:expr) => {{
        warn_if_lapin_logs_payloads();
        let (config, registry, prefix) = ($config, $registry, &$config.prefix);
        Stores {
            sessions: Arc::new(RedisSessionStore::new(registry.connection(), prefix)),
            presence: Arc::new(RedisPresenceStore::new(registry.connection(), prefix)),
            broker: connect_rabbitmq(config, &$amqp).await?,
            registry: Arc::new(registry),
        }
    }};
}

/// The registry and broker of `backends`, connected, and counting what the node asks of them
/// (see [`metered`](crate::metered)).
async fn connect_backends(
    config: &ClusterConfig,
    backends: Backends,
) -> Result<Stores, ClusterError> {
    let stores = match backends {
        Backends::Embedded { registry, broker } => Stores {
            sessions: Arc::new(registry.sessions()),
            presence: Arc::new(registry.presence()),
            registry: Arc::new(registry),
            broker: Arc::new(broker),
        },
        Backends::Custom {
            registry,
            broker,
            sessions,
            presence,
        } => Stores {
            registry,
            broker,
            sessions,
            presence,
        },
        Backends::Servers { redis, amqp } => {
            let registry =
                RedisRegistry::connect(&redis, &config.prefix, RedisOptions::default()).await?;
            on_servers!(config, registry, amqp)
        }
        Backends::RedisCluster { seeds, amqp } => {
            let registry =
                RedisRegistry::connect_cluster(&seeds, &config.prefix, RedisOptions::default())
                    .await?;
            on_servers!(config, registry, amqp)
        }
    };
    let node = &config.node_id;
    Ok(Stores {
        registry: Arc::new(MeteredRegistry::new(stores.registry, node)),
        broker: Arc::new(MeteredBroker::new(stores.broker, node)),
        ..stores
    })
}

/// The node's RabbitMQ connection, named after the node.
async fn connect_rabbitmq(
    config: &ClusterConfig,
    amqp: &AmqpUrl,
) -> Result<Arc<dyn Broker>, ClusterError> {
    let mut rabbit = config.rabbitmq.clone();
    rabbit
        .connection_name
        .get_or_insert_with(|| format!("hybrid-cluster {}", config.node_id));
    let broker = RabbitBroker::connect(amqp, &config.prefix, rabbit).await?;
    Ok(Arc::new(broker))
}

/// lapin logs a returned message whole: a library cannot turn that off for its user's
/// subscriber, so it says so, once, when the user's filter would print it.
fn warn_if_lapin_logs_payloads() {
    if tracing::enabled!(target: "lapin::returned_messages", tracing::Level::WARN) {
        tracing::warn!(
            "lapin logs each message RabbitMQ returns (a group with no member elsewhere, a node \
             gone) whole, payload included, at WARN under the target \
             `lapin::returned_messages`: filter it out (`lapin::returned_messages=error`) to \
             keep payloads out of the logs"
        );
    }
}

/// Starts consuming this node's queue. A peer may be reading it still (taking it over after
/// this node's previous run went without leaving, see [`takeover`](crate::takeover)): it lets
/// go within seconds, so a queue in use is tried again for a while.
async fn consume_own_queue(
    topology: &NodeTopology<dyn Broker>,
    options: &ConsumeOptions,
) -> Result<Deliveries, ClusterError> {
    // Longer than a taker's round, so that the node gets its queue between two of them.
    let deadline = Instant::now() + crate::takeover::ROUND * 3;
    loop {
        match topology.consume(options).await {
            Err(BrokerError::QueueInUse { .. }) if Instant::now() < deadline => {
                tracing::info!(
                    "this node's queue is read by a peer that took it over: waiting for it to let go"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            consumed => return Ok(consumed?),
        }
    }
}

/// Registers the node's record and starts following the cluster.
async fn register(
    config: &ClusterConfig,
    incarnation: Incarnation,
    registry: Arc<dyn Registry>,
    connections: ConnectionCounter,
) -> Result<Discovery, ClusterError> {
    let mut info = NodeInfo::new(
        config.node_id.clone(),
        incarnation,
        config.address.clone(),
        config.port,
    );
    info.endpoint = config.endpoint.clone();
    info.public_url = config.public_url.clone();
    info.max_connections = config.max_connections;
    info.group_buckets = config.group_keys.buckets();
    let discovery_config = config.discovery.clone().with_connections(connections);
    Ok(Discovery::start(registry, info, discovery_config).await?)
}

/// Starts the node's background tasks, the receiver reading `deliveries` among them.
fn run(node: &Arc<Node>, deliveries: Deliveries) {
    tasks::spawn_all(node, deliveries);
    tracing::info!(
        node = %node.id,
        incarnation = %node.incarnation,
        url = %node.local_info.get().ws_url(),
        "node started"
    );
}
