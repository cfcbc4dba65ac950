//! The registry backend: node records kept alive by leases, and their changes.
//!
//! The model is the seed's `IRedisService` cut down to what discovery needs, so that Redis maps
//! onto it naturally and another store could be slotted in:
//!
//! - every node writes its **record** (the JSON form of [`NodeInfo`](crate::NodeInfo), as bytes:
//!   the registry does not read it) under its [`NodeId`] with a **lease**
//!   ([`Registry::put_node`]). The registry itself drops the record when the lease runs out
//!   without being renewed, so liveness never depends on comparing clocks of different
//!   machines;
//! - a node leaving cleanly removes its record at once ([`Registry::remove_node`]);
//! - peers read every live record ([`Registry::nodes`]) and **watch** changes
//!   ([`Registry::watch`]);
//! - **routes** map a name the application chooses (a user id, a session) to the
//!   [`ConnectionId`] serving it, under a lease as well.
//!
//! # Building a complete view
//! Watch first, then list, then apply the events: a change made between the two is then seen
//! at least once. Events are prompt hints, not a complete log: an expiry may be reported late
//! (Redis reports none without keyspace notifications), and a watcher that falls behind gets
//! [`RegistryEvent::Lagged`]. A view stays exact by listing again on `Lagged` and every so
//! often.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use futures_core::future::BoxFuture;
use futures_core::stream::BoxStream;

use crate::error::RegistryError;
use crate::ids::{ConnectionId, NodeId};

/// One node's record as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node the record was written under.
    pub node: NodeId,
    /// Where the backend keeps it (the Redis key), to name it in warnings.
    pub key: String,
    /// The record, as written.
    pub value: Bytes,
    /// How long the record's lease had left when it was read, where the backend tells.
    ///
    /// A watcher can arm its own timer with it, on its own clock, and check the record again
    /// when it runs out: crash detection within the lease, with no clock comparison between
    /// machines.
    pub expires_in: Option<Duration>,
}

impl fmt::Debug for NodeRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeRecord")
            .field("node", &self.node)
            .field("key", &self.key)
            .field("value", &String::from_utf8_lossy(&self.value))
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// Why a node's record is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RemovalCause {
    /// The node removed it: a graceful leave.
    Left,
    /// Its lease ran out: the node stopped heart-beating.
    Expired,
}

/// A change in the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryEvent {
    /// A node wrote its record: it joined, heart-beat, or pushed an update.
    Updated(NodeRecord),
    /// A node's record is gone.
    Removed {
        /// The node.
        node: NodeId,
        /// Why.
        cause: RemovalCause,
    },
    /// The watcher missed events: list again to be exact.
    Lagged,
}

/// The changes seen by one watcher. An `Err` reports a failure of the watch (a lost
/// connection); the stream may end after it, and the watcher should watch and list again.
pub type RegistryEvents = BoxStream<'static, Result<RegistryEvent, RegistryError>>;

/// The longest route name accepted, in bytes.
pub const MAX_ROUTE_NAME_LEN: usize = 256;

/// Checks a route name: 1 to 256 bytes, no control characters.
pub fn check_route_name(name: &str) -> Result<(), RegistryError> {
    let reason = if name.is_empty() {
        "route name is empty"
    } else if name.len() > MAX_ROUTE_NAME_LEN {
        "route name is longer than 256 bytes"
    } else if name.chars().any(char::is_control) {
        "route name contains control characters"
    } else {
        return Ok(());
    };
    Err(RegistryError::InvalidArgument { reason })
}

/// A store of node records under leases, with change notification.
///
/// See the [module docs](self) for the model. The trait is object safe (`Arc<dyn Registry>`
/// works); every method returns a `'static` future. A lease shorter than a millisecond counts
/// as one millisecond.
pub trait Registry: fmt::Debug + Send + Sync + 'static {
    /// Writes `node`'s record and starts its lease anew, then tells watchers.
    fn put_node(
        &self,
        node: &NodeId,
        record: Bytes,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), RegistryError>>;

    /// Removes `node`'s record at once and tells watchers it left. Removing a missing record
    /// succeeds.
    fn remove_node(&self, node: &NodeId) -> BoxFuture<'static, Result<(), RegistryError>>;

    /// `node`'s live record, if it has one.
    fn node(&self, node: &NodeId) -> BoxFuture<'static, Result<Option<NodeRecord>, RegistryError>>;

    /// Every live record.
    fn nodes(&self) -> BoxFuture<'static, Result<Vec<NodeRecord>, RegistryError>>;

    /// Whether every record this registry reads tells its lease ([`NodeRecord::expires_in`]).
    /// A watcher of such a registry drops a record that tells none (a key written by hand, with
    /// no lease) like a crashed node's. The default is `false`.
    fn reports_leases(&self) -> bool {
        false
    }

    /// Starts watching changes made from now on.
    fn watch(&self) -> BoxFuture<'static, Result<RegistryEvents, RegistryError>>;

    /// Points the route `name` at `connection` for `lease`.
    fn put_route(
        &self,
        name: &str,
        connection: &ConnectionId,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), RegistryError>>;

    /// The connection the route `name` points at, if the route is live.
    fn route(&self, name: &str) -> BoxFuture<'static, Result<Option<ConnectionId>, RegistryError>>;

    /// Removes the route `name`. Removing a missing route succeeds.
    fn remove_route(&self, name: &str) -> BoxFuture<'static, Result<(), RegistryError>>;
}

/// A shared registry is a registry: generic code can take `R: Registry` and be handed an `Arc`.
impl<R: Registry + ?Sized> Registry for std::sync::Arc<R> {
    fn put_node(
        &self,
        node: &NodeId,
        record: Bytes,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        (**self).put_node(node, record, lease)
    }

    fn remove_node(&self, node: &NodeId) -> BoxFuture<'static, Result<(), RegistryError>> {
        (**self).remove_node(node)
    }

    fn node(&self, node: &NodeId) -> BoxFuture<'static, Result<Option<NodeRecord>, RegistryError>> {
        (**self).node(node)
    }

    fn nodes(&self) -> BoxFuture<'static, Result<Vec<NodeRecord>, RegistryError>> {
        (**self).nodes()
    }

    fn reports_leases(&self) -> bool {
        (**self).reports_leases()
    }

    fn watch(&self) -> BoxFuture<'static, Result<RegistryEvents, RegistryError>> {
        (**self).watch()
    }

    fn put_route(
        &self,
        name: &str,
        connection: &ConnectionId,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        (**self).put_route(name, connection, lease)
    }

    fn route(&self, name: &str) -> BoxFuture<'static, Result<Option<ConnectionId>, RegistryError>> {
        (**self).route(name)
    }

    fn remove_route(&self, name: &str) -> BoxFuture<'static, Result<(), RegistryError>> {
        (**self).remove_route(name)
    }
}
