//! In-memory backends for `hybrid-cluster`: a [`MemoryRegistry`], a [`MemoryBroker`] and a
//! [`MemorySessionStore`].
//!
//! They are the embedded default: the demo and the unit tests run several nodes in one process
//! on them, with no Redis and no RabbitMQ. Every node gets a clone of the same registry and the
//! same broker (clones share state), just as every node connects to the same servers.
//!
//! They behave like the real servers on every point the cluster relies on, not just store
//! values:
//!
//! - **leases expire**: a node record not renewed in time disappears from listings, and
//!   watchers are told ([`RemovalCause::Expired`](hybrid_cluster_core::RemovalCause));
//! - **unroutable messages are refused**: publishing to a key no queue is bound to fails with
//!   [`PublishError::Unroutable`](hybrid_cluster_core::PublishError), so a message for a node
//!   that is gone is never silently dropped;
//! - **groups only reach members**: a group message goes to the queues bound to the group's
//!   key, and nowhere else;
//! - consumers get at most `prefetch` unacknowledged deliveries, messages left unacknowledged
//!   by a closed consumer are delivered again marked redelivered, rejected messages are
//!   dead-lettered, full queues refuse publishes, and unused queues expire.
//!
//! Time is tokio's, so tests can pause and advance it.
//!
//! ```
//! use hybrid_cluster_core::{Broker, BrokerMessage, NodeId, PublishError, QueueOptions, RoutingKey};
//! use hybrid_cluster_memory::MemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = MemoryBroker::new();
//! let node = NodeId::new("node-1")?;
//! broker.declare_queue(&node, &QueueOptions::default()).await?;
//! broker.bind(&node, &RoutingKey::Node(node.clone())).await?;
//!
//! broker.publish(&RoutingKey::Node(node), BrokerMessage::default()).await?;
//!
//! let gone = RoutingKey::Node(NodeId::new("node-2")?);
//! let refused = broker.publish(&gone, BrokerMessage::default()).await;
//! assert!(matches!(refused, Err(PublishError::Unroutable { .. })));
//! # Ok(())
//! # }
//! ```

pub mod broker;
pub mod presence;
pub mod registry;
pub mod sessions;

pub use broker::{DeadLetter, MemoryBroker};
pub use presence::MemoryPresenceStore;
pub use registry::MemoryRegistry;
pub use sessions::MemorySessionStore;
