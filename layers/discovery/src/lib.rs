//! Service discovery for `hybrid-cluster`: nodes register in Redis under leases, keep
//! themselves alive with heartbeats, and see each other come and go, as a tower
//! [`Discover`](tower::discover::Discover) any tower balancer can use.
//!
//! # The model
//! - A [`Registrar`] writes this node's [`NodeInfo`](hybrid_cluster_core::NodeInfo) under a
//!   **lease kept by Redis itself** (`SET … PX`), and renews it every heartbeat (5 s by
//!   default; the lease is 3 heartbeats). Every heartbeat refreshes the figures: connection
//!   count from a [`ConnectionCounter`], CPU of this process as a percentage of the machine over
//!   the last interval, and memory (bytes and percent), measured with `sysinfo`; or whatever a
//!   [provider](DiscoveryConfig::with_provider) returns. An update pushed with
//!   [`Registrar::update_node_info`] or [`Registrar::set_status`] is published at once.
//! - A [`ClusterView`] follows every node: change events arrive on a Redis channel, a peer's
//!   record is checked again when its lease should have run out, and everything is listed on
//!   (re)connection and every 30 s. A node that stops heart-beating is gone within its lease; a
//!   node that leaves cleanly ([`Registrar::leave`]) is gone at once. No timestamps written by
//!   other machines' clocks are compared.
//! - [`ClusterView::discover`] turns the view into a `Stream` of
//!   `Change<NodeId, NodeService<S>>`, where the user's factory builds `S` from the node's info
//!   (no I/O at insert time). [`NodeService`] carries the node's
//!   [`LiveNodeInfo`](hybrid_cluster_core::LiveNodeInfo), updated in place on every heartbeat, and
//!   its [`tower::load::Load`] is the node's live connections relative to its capacity.
//! - A node can set itself Draining ([`Discovery::drain`]): peers still see it, but its load
//!   is infinite, so balancers stop choosing it.
//! - [`Discovery`] runs both for one node.
//! - With a cluster secret ([`DiscoveryConfig::with_secret`]), records are written signed (a
//!   `signature` field, see `NodeInfo`'s docs) and the view skips records that are unsigned,
//!   forged or replayed, and confirms a removal event by reading the record again before
//!   dropping a node: whoever can write to Redis without the secret cannot add a node, change
//!   one's info, or make peers drop one with a forged `left` event (see [`ClusterView`]).
//!
//! The registry is any [`Registry`](hybrid_cluster_core::Registry): [`RedisRegistry`] in
//! production (on one Redis, or on a Redis Cluster as a [`RedisClusterRegistry`] from seed
//! URLs), `hybrid_cluster_memory::MemoryRegistry` in tests and demos.
//!
//! # Keys in Redis
//! With the default prefix `websocket:cluster` (every key carries the hash tag `{prefix}`, so a
//! cluster's keys share one slot of a Redis Cluster and listing needs no `KEYS` or `SCAN`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{websocket:cluster}:nodes:{node_id}` | string, with a TTL (the lease) | the node's record, the JSON form documented on `NodeInfo` (with a `signature` field when the cluster has a secret) |
//! | `{websocket:cluster}:nodes` | set, with a TTL | the ids of registered nodes (an index; ids whose record expired are pruned on listing; the set expires a lease after the last heartbeat of any node) |
//! | `{websocket:cluster}:events` | pub/sub channel (sharded, `SPUBLISH`, on a Redis Cluster) | `updated {node_id} {lease_ms}` + newline + record, or `left {node_id}` |
//! | `{websocket:cluster}:routes:{name}` | string, with a TTL | a route's connection id |
//!
//! To look at a cluster with `redis-cli`:
//!
//! ```text
//! redis-cli SMEMBERS '{websocket:cluster}:nodes'
//! redis-cli GET '{websocket:cluster}:nodes:node-1'
//! redis-cli PTTL '{websocket:cluster}:nodes:node-1'     # lease left, in ms
//! redis-cli SUBSCRIBE '{websocket:cluster}:events'       # joins, heartbeats, leaves
//! redis-cli -c -p 7000 SSUBSCRIBE '{websocket:cluster}:events'   # the same, on a Redis Cluster
//! ```
//!
//! On a Redis Cluster the one hash tag puts every key in one slot, so the listing script and
//! the transactions run on that slot's master. When the master fails over to its replica,
//! commands follow the redirection and the view subscribes and lists again (see
//! [`RedisRegistry::connect_cluster`]).
//!
//! # When Redis goes away
//! Nothing stops. The registrar logs the failed heartbeat and retries with backoff (never later
//! than the next heartbeat), re-registering the node as soon as Redis answers again. The view
//! keeps the last known nodes, logs that it lost Redis, reconnects with backoff (100 ms doubling
//! to 5 s), lists the records again and resumes; the `Discover` stream stays open throughout and
//! only yields the changes found once Redis is back. A malformed node record is skipped with a
//! warning naming its key; it never stops discovery.
//!
//! # With tower's p2c balancer
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use hybrid_cluster_core::{Incarnation, NodeId, NodeInfo};
//! use hybrid_cluster_discovery::{Discovery, DiscoveryConfig};
//! use hybrid_cluster_memory::MemoryRegistry; // RedisRegistry::connect(..) in production
//! use tower::balance::p2c::Balance;
//! use tower::{Service, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let registry = Arc::new(MemoryRegistry::new());
//! let config = DiscoveryConfig::default().with_heartbeat(Duration::from_secs(1));
//! let mut nodes = Vec::new();
//! for (name, connections) in [("node-1", 900), ("node-2", 10)] {
//!     let info = NodeInfo::new(NodeId::new(name)?, Incarnation::random(), "127.0.0.1", 5001);
//!     let discovery = Discovery::start(registry.clone(), info, config.clone()).await?;
//!     discovery.connections().set(connections);
//!     discovery.registrar().refresh().await?; // publish the count now
//!     nodes.push(discovery);
//! }
//!
//! // Each node's service answers with the node's name: a real one would hold a lazy client.
//! let discover = nodes[0].discover(|info: &NodeInfo| {
//!     let name = info.node_id.to_string();
//!     tower::service_fn(move |()| {
//!         let name = name.clone();
//!         async move { Ok::<_, std::convert::Infallible>(name) }
//!     })
//! });
//! let mut balance = Balance::new(discover);
//! let chosen = balance.ready().await?.call(()).await?;
//! assert!(chosen == "node-1" || chosen == "node-2");
//! # Ok(())
//! # }
//! ```

pub mod config;
pub mod discover;
pub mod discovery;
pub mod error;
pub mod membership;
pub mod redis_registry;
pub mod registrar;
pub mod stats;
pub mod view;

#[cfg(test)]
mod tests;

pub use config::{DiscoveryConfig, NodeInfoProvider};
pub use discover::{NodeDiscover, NodeService};
pub use discovery::Discovery;
pub use error::DiscoveryError;
pub use membership::{MemberChange, Membership};
pub use redis_registry::{
    KeyLayout, RedisClusterRegistry, RedisOptions, RedisPresenceStore, RedisRegistry,
    RedisSessionStore,
};
pub use registrar::Registrar;
pub use stats::{ConnectionCounter, ConnectionGuard, ResourceSampler, ResourceUsage};
pub use view::ClusterView;
