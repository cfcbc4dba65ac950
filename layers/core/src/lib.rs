//! The shared model of `hybrid-cluster`.
//!
//! Every layer of the cluster speaks the types defined here, so that each layer crate can be
//! used alone without depending on the facade:
//!
//! - [`ids`]: every id, made the same way: [`NodeId`], [`Incarnation`] (one run of a node),
//!   [`ConnectionId`] (which names the node a WebSocket connection lives on, so a message for it
//!   needs no lookup to find its way), [`MessageId`] and [`GroupName`].
//! - [`node`]: what a node tells its peers ([`NodeInfo`], with a stable JSON form documented on
//!   the type).
//! - [`target`]: [`Target`], where a message goes, and the [`RoutingKey`] that takes it there.
//! - [`envelope`]: [`Envelope`], a message between nodes, and the MAC that authenticates it.
//!   Its payload is bytes carried as bytes; the routing metadata travels beside it, never
//!   wrapped around it (the broker wire form lives with the publisher, in
//!   `hybrid-cluster-routing`).
//! - [`auth`]: the optional [`ClusterSecret`] that signs envelopes and node records
//!   (HMAC-SHA256), so that nodes refuse what is unsigned, forged or replayed ([`AuthError`]).
//! - [`config`]: connection strings ([`RedisUrl`], [`AmqpUrl`]) and the cluster prefix
//!   ([`ClusterPrefix`]), checked at start-up with errors that name the problem.
//! - [`live`]: [`LiveNodeInfo`], a peer's info kept current by discovery after the peer was
//!   inserted, which balancers read through [`HasNodeInfo`].
//! - [`registry`] and [`broker`]: the two backend traits. A [`Registry`] keeps node records under
//!   leases and tells watchers when they change (Redis in production); a [`Broker`] moves
//!   messages between node queues with publisher confirmation and acknowledged delivery
//!   (RabbitMQ in production). Both are object safe, so a backend can be chosen at run time,
//!   and small, so another client library or broker can be slotted in.
//!
//! The in-memory implementations of both traits live in `hybrid-cluster-memory`.
//!
//! ```
//! use hybrid_cluster_core::{ConnectionId, Incarnation, NodeId, NodeInfo};
//!
//! let node = NodeId::new("node-1")?;
//! let info = NodeInfo::new(node.clone(), Incarnation::random(), "10.0.0.5", 5001);
//! assert!(info.is_available());
//!
//! // A connection id names its node, so a sender knows where to route without a lookup.
//! let id: ConnectionId = "node-1:00000000000000a1:7".parse()?;
//! assert_eq!(id.node(), &node);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod auth;
pub mod broker;
pub mod config;
pub mod envelope;
pub mod error;
pub mod ids;
pub mod live;
pub mod node;
pub mod presence;
pub mod registry;
pub mod session;
pub mod target;

pub use auth::{AuthError, ClusterSecret, DEFAULT_REPLAY_WINDOW, SECRET_ENV, Signature};
pub use broker::{
    Acker, Acknowledge, Broker, BrokerMessage, ConsumeOptions, ConsumerState, Deliveries, Delivery,
    Durability, GroupKeys, PublishError, QueueOptions, RoutingKey, Settlement, UnknownDurability,
};
pub use config::{AmqpUrl, ClusterPrefix, ConfigError, RedisUrl};
pub use envelope::{Envelope, EnvelopeError, PayloadKind};
pub use error::{BoxError, BrokerError, RegistryError};
pub use ids::{
    ConnectionId, ConnectionIdError, ConnectionIds, GroupName, Incarnation, InvalidGroupName,
    InvalidIncarnation, InvalidMessageId, InvalidNodeId, InvalidUserId, MAX_USER_ID_LEN, MessageId,
    NodeId, RESERVED_GROUP_PREFIX, USER_GROUP_PREFIX, UserId,
};
pub use live::{Epoch, HasNodeInfo, LiveNodeInfo};
pub use node::{NodeInfo, NodeRecordError, NodeStatus};
pub use presence::{Joined, PresenceShare, PresenceStore};
pub use registry::{NodeRecord, Registry, RegistryEvent, RegistryEvents, RemovalCause};
pub use session::{
    Appended, InvalidSessionId, InvalidToken, LogEntry, SessionId, SessionLimits, SessionRecord,
    SessionStore, issue_token, verify_token,
};
pub use target::{InvalidTarget, Target};
