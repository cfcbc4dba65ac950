//! An in-memory [`PresenceStore`]: each node's share of each group in one process, expiring on
//! tokio's clock like their Redis keys do.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_core::future::BoxFuture;
use hybrid_cluster_core::{GroupName, NodeId, PresenceShare, PresenceStore, RegistryError, UserId};
use parking_lot::Mutex;
use tokio::time::Instant;

/// Presence kept in memory, shared by its clones (every node of a process gets one).
#[derive(Clone, Debug, Default)]
pub struct MemoryPresenceStore {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Per group, per user, per node: connections counted.
    groups: HashMap<GroupName, BTreeMap<UserId, BTreeMap<NodeId, u64>>>,
    /// Per node, when its entries expire.
    expiries: HashMap<NodeId, Instant>,
}

impl State {
    /// Drops the shares of nodes whose entries expired.
    fn expire(&mut self) {
        let now = Instant::now();
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
            users.retain(|user, nodes| {
                if nodes.remove(node).is_some() && nodes.is_empty() {
                    left.push((group.clone(), user.clone()));
                }
                !nodes.is_empty()
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

fn total(nodes: &BTreeMap<NodeId, u64>) -> u64 {
    nodes.values().sum()
}

impl PresenceStore for MemoryPresenceStore {
    fn join(
        &self,
        node: &NodeId,
        group: &GroupName,
        user: &UserId,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<u64, RegistryError>> {
        let mut state = self.state.lock();
        state.expire();
        state.expiries.insert(node.clone(), Instant::now() + ttl);
        let nodes = state
            .groups
            .entry(group.clone())
            .or_default()
            .entry(user.clone())
            .or_default();
        *nodes.entry(node.clone()).or_insert(0) += 1;
        let count = total(nodes);
        Box::pin(std::future::ready(Ok(count)))
    }

    fn leave(
        &self,
        node: &NodeId,
        group: &GroupName,
        user: &UserId,
    ) -> BoxFuture<'static, Result<Option<u64>, RegistryError>> {
        let mut state = self.state.lock();
        state.expire();
        let Some(users) = state.groups.get_mut(group) else {
            return Box::pin(std::future::ready(Ok(None)));
        };
        let Some(nodes) = users.get_mut(user) else {
            return Box::pin(std::future::ready(Ok(None)));
        };
        let Some(mine) = nodes.get_mut(node) else {
            return Box::pin(std::future::ready(Ok(None)));
        };
        *mine -= 1;
        if *mine == 0 {
            nodes.remove(node);
        }
        let count = total(nodes);
        if count == 0 {
            users.remove(user);
            if users.is_empty() {
                state.groups.remove(group);
            }
        }
        Box::pin(std::future::ready(Ok(Some(count))))
    }

    fn members(
        &self,
        group: &GroupName,
    ) -> BoxFuture<'static, Result<Vec<PresenceShare>, RegistryError>> {
        let mut state = self.state.lock();
        state.expire();
        let shares = state
            .groups
            .get(group)
            .into_iter()
            .flatten()
            .flat_map(|(user, nodes)| {
                nodes.iter().map(|(node, connections)| PresenceShare {
                    user: user.clone(),
                    node: node.clone(),
                    connections: *connections,
                })
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
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        let mut state = self.state.lock();
        state.expire();
        state.expiries.insert(node.clone(), Instant::now() + ttl);
        Box::pin(std::future::ready(Ok(())))
    }
}
