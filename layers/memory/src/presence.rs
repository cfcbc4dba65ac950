//! An in-memory [`PresenceStore`]: each node's share of each group in one process, expiring on
//! tokio's clock like their Redis keys do.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_core::future::BoxFuture;
use hybrid_cluster_core::{
    ConnectionId, GroupName, Joined, NodeId, PresenceShare, PresenceStore, RegistryError, UserId,
};
use parking_lot::Mutex;
use tokio::time::Instant;

/// How long the answer of a leave is kept, for a leave made again.
const LEAVES_KEPT: Duration = Duration::from_secs(300);

/// Presence kept in memory, shared by its clones (every node of a process gets one).
#[derive(Clone, Debug, Default)]
pub struct MemoryPresenceStore {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Per group, per user: the connections counted (each names its node), with what their
    /// join answered.
    groups: HashMap<GroupName, BTreeMap<UserId, BTreeMap<ConnectionId, u64>>>,
    /// What the latest leave of each connection from each group answered, and until when it
    /// is kept.
    left: HashMap<(GroupName, ConnectionId), (u64, Instant)>,
    /// Per node, when its entries expire.
    expiries: HashMap<NodeId, Instant>,
}

impl State {
    /// Drops the shares of nodes whose entries expired.
    fn expire(&mut self) {
        let now = Instant::now();
        self.left.retain(|_, (_, until)| *until > now);
        let expired: Vec<NodeId> = self
            .expiries
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(node, _)| node.clone())
            .collect();
        for node in expired {
            self.take(&node);
        }
    }

    /// Takes `node`'s shares away; returns who left a group with them.
    fn take(&mut self, node: &NodeId) -> Vec<(GroupName, UserId)> {
        self.expiries.remove(node);
        let mut left = Vec::new();
        for (group, users) in &mut self.groups {
            users.retain(|user, connections| {
                let before = connections.len();
                connections.retain(|connection, _| connection.node() != node);
                if connections.len() < before && connections.is_empty() {
                    left.push((group.clone(), user.clone()));
                }
                !connections.is_empty()
            });
        }
        self.groups.retain(|_, users| !users.is_empty());
        left
    }
}

impl MemoryPresenceStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl PresenceStore for MemoryPresenceStore {
    fn join(
        &self,
        group: &GroupName,
        user: &UserId,
        connection: &ConnectionId,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<Joined, RegistryError>> {
        let mut state = self.state.lock();
        state.expire();
        let node = connection.node().clone();
        state.expiries.insert(node, Instant::now() + ttl);
        state.left.remove(&(group.clone(), connection.clone()));
        let connections = state
            .groups
            .entry(group.clone())
            .or_default()
            .entry(user.clone())
            .or_default();
        let count = connections.len() as u64 + 1;
        let joined = match connections.get(connection) {
            Some(first) => Joined {
                connections: *first,
                new: false,
            },
            None => {
                connections.insert(connection.clone(), count);
                Joined {
                    connections: count,
                    new: true,
                }
            }
        };
        Box::pin(std::future::ready(Ok(joined)))
    }

    fn leave(
        &self,
        group: &GroupName,
        user: &UserId,
        connection: &ConnectionId,
    ) -> BoxFuture<'static, Result<Option<u64>, RegistryError>> {
        let mut state = self.state.lock();
        state.expire();
        let key = (group.clone(), connection.clone());
        let counted = state
            .groups
            .get_mut(group)
            .and_then(|users| users.get_mut(user))
            .and_then(|connections| {
                connections.remove(connection)?;
                Some(connections.len() as u64)
            });
        let Some(count) = counted else {
            let earlier = state.left.get(&key).map(|(count, _)| *count);
            return Box::pin(std::future::ready(Ok(earlier)));
        };
        if count == 0
            && let Some(users) = state.groups.get_mut(group)
        {
            users.remove(user);
            if users.is_empty() {
                state.groups.remove(group);
            }
        }
        state
            .left
            .insert(key, (count, Instant::now() + LEAVES_KEPT));
        Box::pin(std::future::ready(Ok(Some(count))))
    }

    fn members(
        &self,
        group: &GroupName,
    ) -> BoxFuture<'static, Result<Vec<PresenceShare>, RegistryError>> {
        let mut state = self.state.lock();
        state.expire();
        let mut counts: BTreeMap<(UserId, NodeId), u64> = BTreeMap::new();
        for (user, connections) in state.groups.get(group).into_iter().flatten() {
            for connection in connections.keys() {
                *counts
                    .entry((user.clone(), connection.node().clone()))
                    .or_insert(0) += 1;
            }
        }
        let shares: Vec<PresenceShare> = counts
            .into_iter()
            .map(|((user, node), connections)| PresenceShare {
                user,
                node,
                connections,
            })
            .collect();
        Box::pin(std::future::ready(Ok(shares)))
    }

    fn reap(
        &self,
        node: &NodeId,
    ) -> BoxFuture<'static, Result<Vec<(GroupName, UserId)>, RegistryError>> {
        let left = self.state.lock().take(node);
        Box::pin(std::future::ready(Ok(left)))
    }

    fn keep_alive(
        &self,
        node: &NodeId,
        _groups: Vec<GroupName>,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<bool, RegistryError>> {
        let mut state = self.state.lock();
        state.expire();
        let held = state
            .expiries
            .insert(node.clone(), Instant::now() + ttl)
            .is_some();
        Box::pin(std::future::ready(Ok(held)))
    }
}
