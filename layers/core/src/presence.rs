//! Presence: which users are in which group, across the cluster, each node's share counted
//! under its own name.
//!
//! A node counts a user in a group once per connection of the user that is a member there,
//! each connection under its own id, so that a join or leave tried again (its answer lost)
//! counts once. [`PresenceStore::join`] and [`PresenceStore::leave`] answer the user's count in
//! the group across every node, so the node that takes it from 0 to 1 (or from 1 to 0) is the
//! one that announces the user's arrival (or departure), exactly once. A node that goes without
//! leaving (a crash) leaves its share behind; the first peer to call
//! [`PresenceStore::reap`] for it takes that share away and learns which users left which
//! groups with it, once. Every entry of a node expires unless the node keeps it alive, so a
//! cluster that dies whole leaves nothing behind.

use std::fmt;
use std::time::Duration;

use futures_core::future::BoxFuture;

use crate::error::RegistryError;
use crate::ids::{ConnectionId, GroupName, NodeId, UserId};

/// A user's connections in a group on one node, as [`PresenceStore::members`] lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceShare {
    /// The user.
    pub user: UserId,
    /// The node they are counted on.
    pub node: NodeId,
    /// Their connections in the group on that node.
    pub connections: u64,
}

/// What a [`PresenceStore::join`] answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Joined {
    /// The user's connections in the group on every node (1: the user arrived), as the first
    /// count of this connection answered.
    pub connections: u64,
    /// Whether this call counted the connection (false: it was counted already).
    pub new: bool,
}

/// Where presence is kept, shared by every node of a cluster: see the [module docs](self).
pub trait PresenceStore: fmt::Debug + Send + Sync + 'static {
    /// Counts `connection` (of `user`, on its node) in `group`, the node's entries kept for
    /// `ttl`; returns the user's connections in the group on every node now (1: the user just
    /// arrived). Counting a connection counted already changes nothing and answers what the
    /// first count answered, so that a join tried again after its answer was lost says the
    /// same.
    fn join(
        &self,
        group: &GroupName,
        user: &UserId,
        connection: &ConnectionId,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<Joined, RegistryError>>;

    /// Counts `connection` (of `user`) out of `group`; returns the user's connections in the
    /// group on every node now (0: the user just left), or `None` when it was not counted (its
    /// node reaped, say): nothing changed. A leave made again (its answer lost) answers what
    /// the first one did, for a few minutes.
    fn leave(
        &self,
        group: &GroupName,
        user: &UserId,
        connection: &ConnectionId,
    ) -> BoxFuture<'static, Result<Option<u64>, RegistryError>>;

    /// Every share of `group`: each user, on each node that counts them.
    fn members(
        &self,
        group: &GroupName,
    ) -> BoxFuture<'static, Result<Vec<PresenceShare>, RegistryError>>;

    /// Takes away everything `node` counted, and returns the users it took out of a group
    /// altogether (no connection left on any node), with the group. Only the first call for
    /// a node finds anything.
    fn reap(
        &self,
        node: &NodeId,
    ) -> BoxFuture<'static, Result<Vec<(GroupName, UserId)>, RegistryError>>;

    /// Keeps `node`'s entries in `groups` for `ttl` more; returns whether the store still
    /// held them (false: they expired or were reaped, the node taken for gone: it counts its
    /// connections again).
    fn keep_alive(
        &self,
        node: &NodeId,
        groups: Vec<GroupName>,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<bool, RegistryError>>;
}
