//! Presence across the cluster: which users are in a group, on which nodes, and the
//! `presence_join` / `presence_leave` events its members get.
//!
//! The node applies its connections' presence changes ([`PresenceChanges`], in the order its
//! table made them) to the cluster's [`PresenceStore`], one at a time; the change that takes a
//! user's count in a group from 0 to 1 (or from 1 to 0) across the cluster is announced to the
//! group, so each arrival and departure is announced once. A node that goes without leaving
//! is reaped by the first peer to see it go, which announces who left with it; a node
//! starting reaps what a previous run of it left. A user's own group counts their
//! connections per node, which [`ClusterHandle::user_connections`] reads; it has no events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use hybrid_cluster_core::{
    Envelope, GroupName, NodeId, PayloadKind, PresenceShare, PresenceStore, RegistryError, UserId,
};
use serde::Serialize;

use crate::error::SendError;
use crate::handle::ClusterHandle;
use crate::local::PresenceChange;
use crate::node::Node;

/// The header of a presence event: `join` or `leave`.
pub(crate) const HEADER_PRESENCE: &str = "presence";
/// The header naming the user of a presence event.
pub(crate) const HEADER_PRESENCE_USER: &str = "presence-user";

/// How long a query of presence may take before it fails.
pub const PRESENCE_QUERY_BOUND: Duration = Duration::from_secs(2);

/// A node's presence: the store every node shares, and how long the node's entries live
/// unless it keeps them alive.
#[derive(Clone, Debug)]
pub(crate) struct NodePresence {
    pub(crate) store: Arc<dyn PresenceStore>,
    pub(crate) ttl: Duration,
}

impl NodePresence {
    fn of(node: &Node) -> Option<Self> {
        let (store, ttl) = node.presence.clone()?;
        Some(Self { store, ttl })
    }
}

/// One member of a group, as [`ClusterHandle::presence`] lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PresenceMember {
    /// The user.
    pub user: UserId,
    /// Their connections in the group, on the nodes that answered.
    pub connections: u64,
}

/// A group's members across the cluster ([`ClusterHandle::presence`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupPresence {
    /// Every user with a connection in the group, on a node this node sees alive, by user.
    pub members: Vec<PresenceMember>,
    /// Nodes that count members of the group but are not alive in this node's view (gone,
    /// not reaped yet): their members are left out.
    pub unreachable: Vec<NodeId>,
}

/// A user's connections across the cluster ([`ClusterHandle::user_connections`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserConnections {
    /// Each node alive in this node's view with connections of the user, and how many.
    pub nodes: Vec<(NodeId, u64)>,
    /// Nodes that count connections of the user but are not alive in this node's view.
    pub unreachable: Vec<NodeId>,
}

/// A presence event, as a member of the group receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PresenceEvent {
    /// The user's first connection joined the group.
    Join(UserId),
    /// The user's last connection left the group.
    Leave(UserId),
}

impl PresenceEvent {
    /// The event `envelope` carries, when it is one (a group message with the presence
    /// headers, as an [`InboxItem::Message`](crate::InboxItem::Message)).
    pub fn of(envelope: &Envelope) -> Option<Self> {
        let user = UserId::new(envelope.headers.get(HEADER_PRESENCE_USER)?).ok()?;
        match envelope.headers.get(HEADER_PRESENCE)?.as_str() {
            "join" => Some(Self::Join(user)),
            "leave" => Some(Self::Leave(user)),
            _ => None,
        }
    }
}

/// The shares of `shares` on nodes alive in `node`'s view, and the nodes that are not.
fn split_alive(node: &Node, shares: Vec<PresenceShare>) -> (Vec<PresenceShare>, Vec<NodeId>) {
    let view = node.discovery.view();
    let mut unreachable = BTreeSet::new();
    let alive = shares
        .into_iter()
        .filter(|share| {
            let alive = view.node(&share.node).is_some();
            if !alive {
                unreachable.insert(share.node.clone());
            }
            alive
        })
        .collect();
    (alive, unreachable.into_iter().collect())
}

impl ClusterHandle {
    async fn shares(&self, group: &GroupName) -> Result<Vec<PresenceShare>, SendError> {
        let store = NodePresence::of(self.node())
            .ok_or(SendError::PresenceOff)?
            .store;
        match tokio::time::timeout(PRESENCE_QUERY_BOUND, store.members(group)).await {
            Ok(shares) => shares.map_err(SendError::Presence),
            Err(_) => Err(SendError::Presence(RegistryError::Unavailable {
                source: "the presence store did not answer in time".into(),
            })),
        }
    }

    /// The members of `group` across the cluster: every user with a connection in it, and
    /// how many, on the nodes alive in this node's view; nodes gone but not reaped yet are
    /// named in [`GroupPresence::unreachable`], their members left out. Answers within
    /// [`PRESENCE_QUERY_BOUND`] or fails. Only connections with a user count.
    pub async fn presence(&self, group: &GroupName) -> Result<GroupPresence, SendError> {
        let (alive, unreachable) = split_alive(self.node(), self.shares(group).await?);
        let mut members: BTreeMap<UserId, u64> = BTreeMap::new();
        for share in alive {
            *members.entry(share.user).or_insert(0) += share.connections;
        }
        Ok(GroupPresence {
            members: members
                .into_iter()
                .map(|(user, connections)| PresenceMember { user, connections })
                .collect(),
            unreachable,
        })
    }

    /// Where `user`'s connections are: each node alive in this node's view with some, and
    /// how many; nodes gone but not reaped yet are named apart. Answers within
    /// [`PRESENCE_QUERY_BOUND`] or fails.
    pub async fn user_connections(&self, user: &UserId) -> Result<UserConnections, SendError> {
        let shares = self.shares(&GroupName::of_user(user)).await?;
        let (alive, unreachable) = split_alive(self.node(), shares);
        Ok(UserConnections {
            nodes: alive
                .into_iter()
                .filter(|share| &share.user == user)
                .map(|share| (share.node, share.connections))
                .collect(),
            unreachable,
        })
    }
}

/// Tells `group`'s members, on every node, that `user` joined or left it.
async fn announce(node: &Arc<Node>, group: &GroupName, event: &'static str, user: &UserId) {
    let handle = ClusterHandle::new(Arc::clone(node), None);
    let mut sender = handle.ordered();
    if let Err(error) = sender.ready().await {
        tracing::warn!(%group, error = %crate::error_chain(&error), "could not announce a presence change");
        return;
    }
    let headers = BTreeMap::from([
        (HEADER_PRESENCE.to_owned(), event.to_owned()),
        (HEADER_PRESENCE_USER.to_owned(), user.to_string()),
    ]);
    let sent = sender.group_with(group, PayloadKind::Text, Bytes::new(), headers);
    if let Err(error) = sent.await {
        tracing::warn!(%group, error = %crate::error_chain(&error), "could not announce a presence change");
    }
}

/// How often, at most, a change is tried while the presence store is out of reach; the waits
/// between tries double from [`RETRY_FIRST`] to [`RETRY_MOST`].
const TRIES: u32 = 12;
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MOST: Duration = Duration::from_secs(5);

/// Applies one change to the store (tried again while the store is out of reach: each
/// connection counts once however often it is tried), and announces it when it is an arrival
/// or a departure.
async fn apply(node: &Arc<Node>, presence: &NodePresence, change: PresenceChange) {
    let (group, user) = match &change {
        PresenceChange::Joined(group, user, _)
        | PresenceChange::Left(group, user, _)
        | PresenceChange::Recounted(group, user, _) => (group.clone(), user.clone()),
    };
    let tried = retried("record a presence change", || async {
        Ok(match &change {
            PresenceChange::Joined(group, user, connection) => {
                let joined = presence.store.join(group, user, connection, presence.ttl);
                (joined.await?.connections == 1).then_some("join")
            }
            // Counted again after the store lost it: an arrival only if this count made it.
            PresenceChange::Recounted(group, user, connection) => {
                let joined = presence.store.join(group, user, connection, presence.ttl);
                let joined = joined.await?;
                (joined.new && joined.connections == 1).then_some("join")
            }
            PresenceChange::Left(group, user, connection) => {
                let left = presence.store.leave(group, user, connection).await?;
                (left == Some(0)).then_some("leave")
            }
        })
    });
    if let Some(Some(event)) = tried.await
        && !group.is_reserved()
    {
        announce(node, &group, event, &user).await;
    }
}

/// `step` until it succeeds, tried again while the store is out of reach (for about a
/// minute); `None`, logged, when it fails for good.
async fn retried<T, F, Fut>(what: &'static str, mut step: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RegistryError>>,
{
    let mut wait = RETRY_FIRST;
    for tries in 1..=TRIES {
        match step().await {
            Ok(value) => return Some(value),
            Err(error) if error.is_transient() && tries < TRIES => {
                tracing::debug!(error = %crate::error_chain(&error), "the presence store is out of reach: trying again to {what}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MOST);
            }
            Err(error) => {
                tracing::warn!(error = %crate::error_chain(&error), tries, "could not {what}: the presence of that group may be off until its members join or leave again");
                return None;
            }
        }
    }
    None
}

/// Takes away what `gone` counted, and announces who left with it (to the first node that
/// does so only).
pub(crate) async fn reap(node: &Arc<Node>, gone: &NodeId) -> bool {
    let Some(presence) = NodePresence::of(node) else {
        return true;
    };
    let Some(left) = retried("take away the presence of a node gone", || {
        presence.store.reap(gone)
    })
    .await
    else {
        return false;
    };
    if !left.is_empty() {
        tracing::info!(node = %gone, departures = left.len(), "presence of a node gone taken away");
    }
    for (group, user) in left.iter().filter(|(group, _)| !group.is_reserved()) {
        announce(node, group, "leave", user).await;
    }
    true
}

/// Applies the node's presence changes as they come, once what a previous run of the node
/// left is taken away (tried until it is). Holds the node weakly while it waits.
pub(crate) async fn follow(node: Weak<Node>) {
    let Some(local) = node.upgrade().map(|node| Arc::clone(&node.local)) else {
        return;
    };
    let Some(queue) = local.presence() else {
        return;
    };
    loop {
        let Some(first) = node.upgrade() else { return };
        let own = first.id.clone();
        if reap(&first, &own).await {
            break;
        }
        drop(first);
        tokio::time::sleep(RETRY_MOST).await;
    }
    loop {
        let (last, taken) = queue.take().await;
        let Some(node) = node.upgrade() else { return };
        let Some(presence) = NodePresence::of(&node) else {
            return;
        };
        for change in taken {
            apply(&node, &presence, change).await;
        }
        queue.applied(last);
    }
}

/// Keeps the node's presence entries alive, once a lease; when the store lost them (the node
/// was taken for gone and reaped, or they expired), counts its connections again.
pub(crate) async fn keep_alive(node: Weak<Node>) {
    let Some((ttl, lease)) = node.upgrade().and_then(|node| {
        let ttl = NodePresence::of(&node)?.ttl;
        Some((ttl, node.config.discovery.lease))
    }) else {
        return;
    };
    // Once a lease: a node taken for gone and reaped counts its connections again about as
    // soon as its peers see it back.
    let mut ticks = tokio::time::interval(lease.max(Duration::from_millis(500)).min(ttl / 4));
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(node) = node.upgrade() else { return };
        let Some(presence) = NodePresence::of(&node) else {
            return;
        };
        let groups = node.local.presence_groups();
        if groups.is_empty() {
            continue;
        }
        match presence.store.keep_alive(&node.id, groups, ttl).await {
            Ok(true) => {}
            Ok(false) => {
                let recounted = node.local.recount_presence();
                tracing::warn!(
                    recounted,
                    "this node's presence was gone from the store (taken for gone, or expired): counting its connections again"
                );
            }
            Err(error) => {
                tracing::warn!(error = %crate::error_chain(&error), "could not keep this node's presence alive");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use hybrid_cluster_core::{
        ConnectionId, GroupName, Incarnation, NodeId, PresenceStore, UserId,
    };
    use hybrid_cluster_memory::{MemoryBroker, MemoryRegistry};

    use super::*;
    use crate::cluster::Cluster;
    use crate::config::{Backends, ClusterConfig};

    #[tokio::test]
    async fn a_query_leaves_out_and_names_the_nodes_not_alive_in_view() {
        let registry = MemoryRegistry::new();
        let store = registry.presence();
        let backends = Backends::Embedded {
            registry,
            broker: MemoryBroker::new(),
        };
        let here = NodeId::new("presence-here").unwrap();
        let config = ClusterConfig::new(here.clone(), "127.0.0.1", 1);
        let cluster = Cluster::start(config, backends).await.unwrap();
        let (room, ghost) = (
            GroupName::new("room").unwrap(),
            NodeId::new("ghost").unwrap(),
        );
        let ttl = Duration::from_secs(60);
        let (alice, bob) = (UserId::new("alice").unwrap(), UserId::new("bob").unwrap());
        let on = |node: &NodeId, n| ConnectionId::new(node.clone(), Incarnation::from_u64(1), n);
        store.join(&room, &alice, &on(&here, 1), ttl).await.unwrap();
        store
            .join(&room, &alice, &on(&ghost, 1), ttl)
            .await
            .unwrap();
        store.join(&room, &bob, &on(&ghost, 2), ttl).await.unwrap();
        let of_alice = GroupName::of_user(&alice);
        store
            .join(&of_alice, &alice, &on(&here, 1), ttl)
            .await
            .unwrap();
        store
            .join(&of_alice, &alice, &on(&here, 2), ttl)
            .await
            .unwrap();
        store
            .join(&of_alice, &alice, &on(&ghost, 1), ttl)
            .await
            .unwrap();

        let handle = cluster.handle();
        let presence = handle.presence(&room).await.unwrap();
        assert_eq!(
            presence.members,
            [PresenceMember {
                user: alice.clone(),
                connections: 1
            }]
        );
        assert_eq!(presence.unreachable, std::slice::from_ref(&ghost));
        let connections = handle.user_connections(&alice).await.unwrap();
        assert_eq!(connections.nodes, [(here, 2)]);
        assert_eq!(connections.unreachable, [ghost]);
        cluster.shutdown().await.unwrap();
    }
}
