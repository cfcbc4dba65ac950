#![doc = include_str!("../README.md")]

pub use hybrid_cluster_core::{broker, config, connection, envelope, error, node, registry};
pub use hybrid_cluster_discovery as discovery;
pub use hybrid_cluster_memory as memory;

pub use hybrid_cluster_core::{
    AmqpUrl, Broker, BrokerError, BrokerMessage, ClusterPrefix, ConfigError, ConnectionId,
    ConnectionIds, Envelope, GroupName, Incarnation, MessageId, NodeId, NodeInfo, NodeStatus,
    PayloadKind, PublishError, QueueOptions, Registry, RegistryError, RoutingKey, Target,
};
pub use hybrid_cluster_memory::{MemoryBroker, MemoryRegistry};
