#![doc = include_str!("../README.md")]

mod cluster;
mod config;
mod error;
mod handle;
mod hybrid;
pub mod identity;
mod limit;
mod local;
mod metered;
pub mod metrics;
mod node;
mod notice;
mod presence;
pub mod protocol;
#[cfg(feature = "axum")]
mod relay;
pub mod server;
mod session;
mod shutdown;
mod takeover;
mod trace;
mod users;

// Each layer, for use on its own.
pub use hybrid_cluster_balance as balance;
pub use hybrid_cluster_discovery as discovery;
pub use hybrid_cluster_memory as memory;
pub use hybrid_cluster_routing as routing;

// Everything else has one path: here.
pub use cluster::{Cluster, PlacementAdvice};
pub use config::{Backends, ClusterConfig, IncompleteBackends, PlacementMode, SlowClientPolicy};
pub use error::{ClusterError, SendError, error_chain};
pub use handle::{
    ClusterConnection, ClusterHandle, Confirmation, ConnectionSlot, OpenedSession, OrderedSender,
    Payload, ResumeRequest, Resumed, SessionError,
};
pub use hybrid::{
    CLOSE_REDIRECT, CLOSE_UNAVAILABLE, HybridCluster, HybridClusterLayer, RETRY_AFTER_MS,
    RETRY_AFTER_SECS, RedirectReason, ResponseFuture, is_websocket_upgrade,
};
pub use hybrid_cluster_balance::{PlacementPolicy, Redirect, Strategy};
pub use hybrid_cluster_core::node::check_public_url;
pub use hybrid_cluster_core::{
    Acker, Acknowledge, AmqpUrl, AuthError, BoxError, Broker, BrokerError, BrokerMessage,
    ClusterPrefix, ClusterSecret, ConfigError, ConnectionId, ConnectionIdError, ConnectionIds,
    ConsumeOptions, ConsumerState, DEFAULT_REPLAY_WINDOW, Deliveries, Delivery, Durability,
    Envelope, EnvelopeError, Epoch, GroupKeys, GroupName, HasNodeInfo, Incarnation,
    InvalidGroupName, InvalidIncarnation, InvalidMessageId, InvalidNodeId, InvalidTarget,
    InvalidUserId, LiveNodeInfo, MessageId, NodeId, NodeInfo, NodeRecord, NodeRecordError,
    NodeStatus, PayloadKind, PublishError, QueueOptions, RedisUrl, Registry, RegistryError,
    RegistryEvent, RegistryEvents, RemovalCause, RoutingKey, SECRET_ENV, SessionId, SessionLimits,
    SessionStore, Settlement, Signature, Target, UnknownDurability, UserId,
};
pub use hybrid_cluster_core::{PresenceShare, PresenceStore};
pub use hybrid_cluster_memory::{
    MemoryBroker, MemoryPresenceStore, MemoryRegistry, MemorySessionStore,
};
#[cfg(feature = "jwt")]
pub use identity::Jwt;
pub use identity::{Identify, IdentityLayer, Unauthorized};
pub use limit::{RateDecision, RateLimit, RateLimiter};
pub use local::{CloseFrame, Inbox, InboxItem, Undeliverable};
pub use presence::{
    GroupPresence, PRESENCE_QUERY_BOUND, PresenceEvent, PresenceMember, UserConnections,
};
pub use relay::CLOSE_SESSION_MOVED;
pub use shutdown::{CLOSE_SERVICE_RESTART, MAX_CLOSE_REASON, close_reason};
pub use trace::{HEADER_TRACEPARENT, TraceContext, TraceId};
pub use users::CLOSE_USER_DISCONNECTED;
