//! How a cluster node is set up.

use std::time::Duration;

use hybrid_cluster_balance::{PlacementPolicy, Strategy};
use hybrid_cluster_core::node::DEFAULT_ENDPOINT;
use hybrid_cluster_core::{
    AmqpUrl, Broker, ClusterPrefix, ClusterSecret, ConfigError, ConsumeOptions,
    DEFAULT_REPLAY_WINDOW, Durability, GroupKeys, NodeId, QueueOptions, RedisUrl, Registry,
    SECRET_ENV, SessionLimits, SessionStore,
};
use hybrid_cluster_discovery::DiscoveryConfig;
use hybrid_cluster_memory::{MemoryBroker, MemoryRegistry};
use hybrid_cluster_routing::{ForwardConfig, RabbitConfig};

/// What a connection whose inbox is full gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowClientPolicy {
    /// Drop the oldest queued message to make room (counted, and logged once per connection).
    DropOldest,
    /// Close the connection with this WebSocket close code: 1013 (try again later) or 1008
    /// (policy violation).
    Close {
        /// The close code.
        code: u16,
    },
}

impl SlowClientPolicy {
    /// Close with 1013, "try again later".
    pub const CLOSE_TRY_AGAIN_LATER: Self = Self::Close { code: 1013 };
    /// Close with 1008, "policy violation".
    pub const CLOSE_POLICY_VIOLATION: Self = Self::Close { code: 1008 };
}

impl Default for SlowClientPolicy {
    /// Close with 1013 ("try again later"): a client that falls behind learns it, and can
    /// reconnect and catch up, rather than miss messages without knowing.
    fn default() -> Self {
        Self::CLOSE_TRY_AGAIN_LATER
    }
}

/// How the cluster layer tells a new WebSocket client it does not keep where to go: see the
/// README's placement modes.
///
/// A browser's `WebSocket` cannot follow an HTTP redirect during the upgrade: any answer but
/// `101` fails the connection with close code 1006, telling the page nothing. So the default
/// is [`InBand`](PlacementMode::InBand), which every client can read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PlacementMode {
    /// In HTTP, for native clients that follow redirects: `307 Temporary Redirect` with
    /// `Location:` the other node's WebSocket URL (query string kept), or `503 Service
    /// Unavailable` with `Retry-After: 5` when no node has room.
    Redirect,
    /// In the WebSocket, for every client browsers included: the upgrade is accepted, the
    /// client gets one text frame, `{"type":"redirect","url":URL,"reason":"full"|"draining"|"balance"}`
    /// then a close with code 4000 ([`CLOSE_REDIRECT`](crate::CLOSE_REDIRECT)), or
    /// `{"type":"unavailable","retry_after_ms":5000}` then a close with code 4001
    /// ([`CLOSE_UNAVAILABLE`](crate::CLOSE_UNAVAILABLE)); the close reason is the same JSON
    /// (shortened to fit 123 bytes). The socket is never a cluster connection. A request
    /// that cannot be upgraded here (no valid `Sec-WebSocket-Key`, no hyper upgrade handle)
    /// gets the [`Redirect`](PlacementMode::Redirect) answer. The server must serve its
    /// connections with upgrades enabled (axum's `serve` does), as for any WebSocket.
    #[default]
    InBand,
}

/// Where the registry and the broker are.
#[derive(Clone, Debug)]
pub enum Backends {
    /// In this process: every node given clones of the same registry and broker forms one
    /// cluster (demos and tests).
    Embedded {
        /// The shared registry.
        registry: MemoryRegistry,
        /// The shared broker.
        broker: MemoryBroker,
    },
    /// Redis for discovery and RabbitMQ for routing.
    Servers {
        /// Redis.
        redis: RedisUrl,
        /// RabbitMQ.
        amqp: AmqpUrl,
    },
    /// A Redis Cluster for discovery and RabbitMQ for routing.
    RedisCluster {
        /// Seed nodes of the Redis Cluster (one that answers is enough: it names the others).
        seeds: Vec<RedisUrl>,
        /// RabbitMQ.
        amqp: AmqpUrl,
    },
    /// Any registry and broker: other client libraries or servers behind the two traits, or
    /// test doubles. Every node of a cluster needs ones that reach the same state.
    Custom {
        /// The registry.
        registry: std::sync::Arc<dyn Registry>,
        /// The broker.
        broker: std::sync::Arc<dyn Broker>,
        /// Where sessions live (used when [`ClusterConfig::sessions`] is set).
        sessions: std::sync::Arc<dyn SessionStore>,
        /// Where presence lives (used when [`ClusterConfig::presence`] is set).
        presence: std::sync::Arc<dyn hybrid_cluster_core::PresenceStore>,
    },
}

impl Backends {
    /// A fresh in-process registry and broker; clone the result for every node of the cluster.
    pub fn embedded() -> Self {
        Self::Embedded {
            registry: MemoryRegistry::new(),
            broker: MemoryBroker::new(),
        }
    }

    /// Redis and RabbitMQ at these URLs.
    pub fn servers(redis: RedisUrl, amqp: AmqpUrl) -> Self {
        Self::Servers { redis, amqp }
    }

    /// The Redis Cluster that `seeds` belong to, and RabbitMQ at `amqp`. Discovery runs on the
    /// slot of the cluster's hash tag, with sharded pub/sub for its events (see
    /// [`RedisRegistry::connect_cluster`](hybrid_cluster_discovery::RedisRegistry::connect_cluster)).
    pub fn redis_cluster(seeds: Vec<RedisUrl>, amqp: AmqpUrl) -> Self {
        Self::RedisCluster { seeds, amqp }
    }

    /// The backends a program's address options name, as the node program and the demo take
    /// them: Redis (`redis`) or a Redis Cluster (`redis_cluster`, its seeds) together with
    /// RabbitMQ (`amqp`: the nodes of a RabbitMQ cluster, the first tried first), or none of
    /// them for the embedded backends. Returns the backends and the rest of `amqp`, for
    /// [`RabbitConfig::fallback_urls`].
    pub fn from_addresses(
        redis: Option<RedisUrl>,
        redis_cluster: Vec<RedisUrl>,
        amqp: Vec<AmqpUrl>,
    ) -> Result<(Self, Vec<AmqpUrl>), IncompleteBackends> {
        let mut amqp = amqp.into_iter();
        let backends = match (redis, amqp.next()) {
            (None, Some(first)) if !redis_cluster.is_empty() => {
                Self::redis_cluster(redis_cluster, first)
            }
            (Some(redis), Some(first)) if redis_cluster.is_empty() => Self::servers(redis, first),
            (None, None) if redis_cluster.is_empty() => Self::embedded(),
            _ => return Err(IncompleteBackends),
        };
        Ok((backends, amqp.collect()))
    }
}

/// Addresses that name only part of the backends: Redis (or a Redis Cluster) without
/// RabbitMQ, or the other way round, or both Redis and a Redis Cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("give Redis (or a Redis Cluster) and RabbitMQ, or neither")]
pub struct IncompleteBackends;

/// How one node of the cluster runs.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// The node's id, unique in the cluster.
    pub node_id: NodeId,
    /// The host name or address clients reach this node at (redirects point there).
    pub address: String,
    /// The port of this node's WebSocket endpoint.
    pub port: u16,
    /// The path of the WebSocket endpoint. Default `/ws`.
    pub endpoint: String,
    /// The URL clients reach this node's endpoint at, when it is not
    /// `ws://{address}:{port}{endpoint}`: behind TLS (`wss://…`), a proxy or another port. It
    /// is what redirects, close reasons and the node's record name. Default none.
    pub public_url: Option<String>,
    /// Connections this node admits at most. Default 10,000.
    pub max_connections: u32,
    /// The prefix of every name the cluster uses in Redis and RabbitMQ. Default
    /// `websocket:cluster`.
    pub prefix: ClusterPrefix,
    /// How the balancer picks a node for new clients. Default least connections.
    pub strategy: Strategy,
    /// When a client is kept here rather than sent to the best node. Default accept unless
    /// full.
    pub placement: PlacementPolicy,
    /// How a client that is not kept here is told where to go. Default
    /// [`PlacementMode::InBand`], the one browsers can follow.
    pub placement_mode: PlacementMode,
    /// Heartbeat, lease and reconnection settings of discovery.
    pub discovery: DiscoveryConfig,
    /// Messages a connection's inbox holds at most. Default 1,024.
    pub inbox_capacity: usize,
    /// Payload bytes a connection's inbox holds at most (a message alone is taken whatever
    /// its size). Past either bound, the slow-client policy applies. Default 8 MiB.
    pub inbox_bytes: usize,
    /// What a connection whose inbox is full gets. Default close with 1013.
    pub slow_client: SlowClientPolicy,
    /// What survives the broker: see [`Durability`] and the README's delivery contract.
    /// Default [`Durability::Durable`]. It sets the node queue's durability (over
    /// `queue.durability`) and whether messages are published persistent (over
    /// `rabbitmq.persistent`). Every node of a cluster needs the same.
    pub durability: Durability,
    /// How group messages are keyed in the broker, and so what a join or a leave costs it:
    /// one binding per group a node has members of ([`GroupKeys::PerGroup`], the default), or
    /// one per bucket of groups ([`GroupKeys::Buckets`], for clusters whose group churn would
    /// outrun the broker's binding changes: see the README's Scale section). It sets
    /// `forward.group_keys`. Every node of a cluster needs the same.
    pub group_keys: GroupKeys,
    /// The node's queue in the broker (its durability comes from
    /// [`durability`](ClusterConfig::durability)).
    pub queue: QueueOptions,
    /// The forwarding service's in-flight bound and payload limit: see the README's
    /// concurrency bounds.
    pub forward: ForwardConfig,
    /// How the node's RabbitMQ connection behaves (with [`Backends::Servers`]): its own
    /// bounds on publishes in flight and queued, and how long sends wait through an outage
    /// before failing. Its connection name defaults to `hybrid-cluster {node_id}`.
    pub rabbitmq: RabbitConfig,
    /// How the node consumes its queue: deliveries handed out and not yet settled, at most.
    pub consume: ConsumeOptions,
    /// How long a shutdown takes at most: clients get most of it to close, the rest is for
    /// leaving discovery and deleting the queue; what is not done by then is cut short and
    /// logged. Default 5 s.
    pub shutdown_grace: Duration,
    /// The cluster secret. When set, every node-to-node message and every node record is
    /// signed with it (HMAC-SHA256), and unsigned or forged ones are refused: see the
    /// README's security section. Every node of a cluster needs the same one. Default none;
    /// [`ClusterConfig::with_secret_from_env`] reads `HYBRID_CLUSTER_SECRET`.
    pub secret: Option<ClusterSecret>,
    /// With a secret, how far a message's send time may be from this node's clock before it
    /// is refused as a replay. Default 60 s.
    pub replay_window: Duration,
    /// Without a secret, how long the ids of messages received are remembered to drop their
    /// duplicates (a peer's resend after a reconnect, a redelivery). Default 60 s.
    pub dedupe_window: Duration,
    /// The memory the remembered ids (for dedupe, or replays with a secret) may take, in
    /// bytes, about 64 an id. Default 64 MiB: a minute of about 17,000 messages a second;
    /// past it the window in force is shorter, and a warning says so.
    pub dedupe_memory: usize,
    /// Sessions that outlive their connections (see
    /// [`ClusterConnection::open_session`](crate::ClusterConnection::open_session)): how long
    /// one waits for its client and how much its log keeps. `None` (the default): connections have no session. Every node of
    /// a cluster needs the same setting.
    pub sessions: Option<SessionLimits>,
    /// How much each connection may send ([`RateLimit`](crate::RateLimit)), applied by the
    /// node server to its clients' requests (and by any socket task through
    /// [`ClusterHandle::rate_limiter`](crate::ClusterHandle::rate_limiter)). `None` (the
    /// default): no limit.
    pub rate_limit: Option<crate::RateLimit>,
    /// Whether connections with a user are counted in the groups they join, cluster-wide
    /// ([`ClusterHandle::presence`](crate::ClusterHandle::presence), `presence_join` and
    /// `presence_leave` events): one registry operation per join and leave of such a
    /// connection. Default `true`; connections without a user never cost any.
    pub presence: bool,
}

impl ClusterConfig {
    /// A node reachable at `address:port`, with every other setting at its default.
    pub fn new(node_id: NodeId, address: impl Into<String>, port: u16) -> Self {
        Self {
            node_id,
            address: address.into(),
            port,
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            public_url: None,
            max_connections: hybrid_cluster_core::node::DEFAULT_MAX_CONNECTIONS,
            prefix: ClusterPrefix::default(),
            strategy: Strategy::default(),
            placement: PlacementPolicy::default(),
            placement_mode: PlacementMode::default(),
            discovery: DiscoveryConfig::default(),
            inbox_capacity: 1024,
            inbox_bytes: 8 * 1024 * 1024,
            slow_client: SlowClientPolicy::default(),
            durability: Durability::default(),
            group_keys: GroupKeys::default(),
            queue: QueueOptions::default(),
            forward: ForwardConfig::default(),
            rabbitmq: RabbitConfig::default(),
            consume: ConsumeOptions::default(),
            shutdown_grace: Duration::from_secs(5),
            secret: None,
            replay_window: DEFAULT_REPLAY_WINDOW,
            dedupe_window: Duration::from_secs(60),
            dedupe_memory: 64 * 1024 * 1024,
            sessions: None,
            rate_limit: None,
            presence: true,
        }
    }

    /// Signs and checks node-to-node traffic with `secret`.
    pub fn with_secret(mut self, secret: ClusterSecret) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Takes the cluster secret from the environment variable `HYBRID_CLUSTER_SECRET` when it
    /// is set (an empty or short value is an error naming the variable, never its value); an
    /// unset variable leaves the configuration as it is.
    pub fn with_secret_from_env(mut self) -> Result<Self, ConfigError> {
        if let Some(secret) = ClusterSecret::from_env(SECRET_ENV)? {
            self.secret = Some(secret);
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis(port: u16) -> RedisUrl {
        format!("redis://127.0.0.1:{port}").parse().unwrap()
    }

    fn amqp(port: u16) -> AmqpUrl {
        format!("amqp://127.0.0.1:{port}/%2f").parse().unwrap()
    }

    #[test]
    fn backends_from_addresses() {
        let (backends, rest) = Backends::from_addresses(None, vec![], vec![]).unwrap();
        assert!(matches!(backends, Backends::Embedded { .. }) && rest.is_empty());

        let (backends, rest) =
            Backends::from_addresses(Some(redis(6379)), vec![], vec![amqp(1), amqp(2), amqp(3)])
                .unwrap();
        assert!(matches!(backends, Backends::Servers { amqp: ref first, .. } if *first == amqp(1)));
        assert_eq!(
            rest,
            [amqp(2), amqp(3)],
            "the cluster's other nodes, in order"
        );

        let (backends, rest) =
            Backends::from_addresses(None, vec![redis(7000), redis(7001)], vec![amqp(1)]).unwrap();
        assert!(matches!(backends, Backends::RedisCluster { ref seeds, .. } if seeds.len() == 2));
        assert!(rest.is_empty());

        for (redis_url, seeds, amqp_urls) in [
            (Some(redis(6379)), vec![], vec![]),
            (None, vec![redis(7000)], vec![]),
            (None, vec![], vec![amqp(1)]),
            (Some(redis(6379)), vec![redis(7000)], vec![amqp(1)]),
        ] {
            assert_eq!(
                Backends::from_addresses(redis_url, seeds, amqp_urls).err(),
                Some(IncompleteBackends)
            );
        }
    }
}
