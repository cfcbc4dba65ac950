#![doc = include_str!("../README.md")]

pub mod cluster;
pub mod config;
pub mod error;
pub mod handle;
pub mod hybrid;
pub mod local;
pub mod metrics;
mod notice;
pub mod protocol;
#[cfg(feature = "axum")]
pub mod server;
pub mod shutdown;
mod takeover;
pub mod trace;

pub use hybrid_cluster_balance as balance;
pub use hybrid_cluster_core::{broker, connection, envelope, live, node, registry};
pub use hybrid_cluster_discovery as discovery;
pub use hybrid_cluster_memory as memory;
pub use hybrid_cluster_routing as routing;

pub use cluster::Cluster;
pub use config::{Backends, ClusterConfig, SlowClientPolicy};
pub use error::{ClusterError, SendError};
pub use handle::{ClusterConnection, ClusterHandle, ConnectionSlot};
pub use hybrid::{HybridCluster, HybridClusterLayer};
pub use hybrid_cluster_balance::{PlacementPolicy, Strategy};
pub use hybrid_cluster_core::{
    AmqpUrl, Broker, BrokerError, BrokerMessage, ClusterPrefix, ClusterSecret, ConfigError,
    ConnectionId, ConnectionIds, ConsumerState, Durability, Envelope, GroupName, Incarnation,
    MessageId, NodeId, NodeInfo, NodeStatus, PayloadKind, PublishError, QueueOptions, RedisUrl,
    Registry, RegistryError, RoutingKey, Target,
};
pub use hybrid_cluster_memory::{MemoryBroker, MemoryRegistry};
pub use local::{CloseFrame, Inbox, InboxItem};
