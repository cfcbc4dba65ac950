//! A node's place in the broker: its queue, its bindings, and its group memberships.
//!
//! [`NodeTopology::declare`] declares the node's queue and binds it to the node's own key
//! and to the broadcast key. Groups (rooms) are bound by reference count:
//! [`add_member`](NodeTopology::add_member) binds the queue to the group's key when the
//! node's first local member joins, and [`remove_member`](NodeTopology::remove_member)
//! unbinds it when the last one leaves, so a group message reaches exactly the nodes that
//! have members of it, and a group with no member anywhere is unroutable. With
//! [`GroupKeys::Buckets`] (see [`declare_with`](NodeTopology::declare_with)) the count is kept
//! per bucket of groups instead: the queue is bound to a bucket while the node has a member
//! of any group of it.
//!
//! ```
//! use std::sync::Arc;
//! use hybrid_cluster_core::{GroupName, NodeId, QueueOptions, RoutingKey};
//! use hybrid_cluster_memory::MemoryBroker;
//! use hybrid_cluster_routing::NodeTopology;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = Arc::new(MemoryBroker::new());
//! let node = NodeId::new("node-1")?;
//! let topology = NodeTopology::declare(broker.clone(), node.clone(), &QueueOptions::default()).await?;
//! let lobby = GroupName::new("lobby")?;
//!
//! topology.add_member(&lobby).await?; // first member: binds
//! topology.add_member(&lobby).await?; // second: no broker call
//! assert!(broker.bindings(&node).contains(&RoutingKey::Group(lobby.clone())));
//! topology.remove_member(&lobby).await?;
//! assert_eq!(topology.members(&lobby), 1);
//! topology.remove_member(&lobby).await?; // last member: unbinds
//! assert!(!broker.bindings(&node).contains(&RoutingKey::Group(lobby)));
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use hybrid_cluster_core::{
    Broker, BrokerError, ConsumeOptions, Deliveries, GroupKeys, GroupName, NodeId, QueueOptions,
    RoutingKey,
};
use parking_lot::Mutex;

/// One node's queue, bindings and group memberships on a [`Broker`].
pub struct NodeTopology<B: ?Sized> {
    broker: Arc<B>,
    node: NodeId,
    /// How groups map to keys.
    group_keys: GroupKeys,
    /// Local members per group, readable at any time.
    members: Mutex<BTreeMap<GroupName, usize>>,
    /// Local members per group key (the same as per group, unless groups share bucket keys).
    keyed: Mutex<HashMap<RoutingKey, usize>>,
    /// One lock per group key being changed: it serialises that key's count changes and its
    /// bind or unbind, so that a first join and a last leave racing each other reach the
    /// broker in the order the counts changed. Held across the broker call, hence tokio's
    /// lock; per key, so that joining a group never waits for another key's bind. An
    /// entry lives while someone holds or waits for it.
    changes: Mutex<HashMap<RoutingKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// The right to change the membership of one group key, released (and its lock forgotten
/// when nobody else waits for it) when dropped.
struct GroupChange<'a> {
    changes: &'a Mutex<HashMap<RoutingKey, Arc<tokio::sync::Mutex<()>>>>,
    group: &'a RoutingKey,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<'a> GroupChange<'a> {
    async fn begin(
        changes: &'a Mutex<HashMap<RoutingKey, Arc<tokio::sync::Mutex<()>>>>,
        group: &'a RoutingKey,
    ) -> Self {
        let lock = Arc::clone(changes.lock().entry(group.clone()).or_default());
        // Built before the wait, so that a caller giving up while it waits still forgets the
        // lock on drop.
        let mut change = Self {
            changes,
            group,
            lock,
            guard: None,
        };
        change.guard = Some(Arc::clone(&change.lock).lock_owned().await);
        change
    }
}

impl Drop for GroupChange<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut changes = self.changes.lock();
        // Clones are only taken under this map lock: the map's and ours are the last two.
        if Arc::strong_count(&self.lock) == 2 {
            changes.remove(self.group);
        }
    }
}

impl<B: Broker + ?Sized> NodeTopology<B> {
    /// Declares `node`'s queue with `options` and binds it to the node's own key and to the
    /// broadcast key. Idempotent: a restarted node finds its queue (and the messages waiting
    /// in it) again, as long as the queue has not expired.
    pub async fn declare(
        broker: Arc<B>,
        node: NodeId,
        options: &QueueOptions,
    ) -> Result<Self, BrokerError> {
        Self::declare_with(broker, node, options, GroupKeys::PerGroup).await
    }

    /// [`declare`](Self::declare), binding groups by `group_keys` (the same as every
    /// node's [`Forward`](crate::Forward) publishes with: see [`GroupKeys`]).
    pub async fn declare_with(
        broker: Arc<B>,
        node: NodeId,
        options: &QueueOptions,
        group_keys: GroupKeys,
    ) -> Result<Self, BrokerError> {
        broker.declare_queue(&node, options).await?;
        broker.bind(&node, &RoutingKey::Node(node.clone())).await?;
        broker.bind(&node, &RoutingKey::Broadcast).await?;
        Ok(Self {
            broker,
            node,
            group_keys,
            members: Mutex::new(BTreeMap::new()),
            keyed: Mutex::new(HashMap::new()),
            changes: Mutex::new(HashMap::new()),
        })
    }

    /// How groups map to keys.
    pub fn group_keys(&self) -> GroupKeys {
        self.group_keys
    }

    /// The node.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<B> {
        &self.broker
    }

    /// Starts the one consumer of the node's queue (see [`Receiver`](crate::Receiver)).
    pub async fn consume(&self, options: &ConsumeOptions) -> Result<Deliveries, BrokerError> {
        self.broker.consume(&self.node, options).await
    }

    /// Counts one more local member of `group`, binding the node's queue to the group's key
    /// when it is the first (of any group of the key's bucket, with buckets). Returns the
    /// number of local members of `group` now.
    ///
    /// When the bind fails the count is unchanged and the error is returned: the member was
    /// not added.
    pub async fn add_member(&self, group: &GroupName) -> Result<usize, BrokerError> {
        let key = self.group_keys.key(group);
        let _changing = GroupChange::begin(&self.changes, &key).await;
        if self.keyed.lock().get(&key).copied().unwrap_or(0) == 0 {
            self.broker.bind(&self.node, &key).await?;
        }
        *self.keyed.lock().entry(key.clone()).or_insert(0) += 1;
        let mut members = self.members.lock();
        let entry = members.entry(group.clone()).or_insert(0);
        *entry += 1;
        Ok(*entry)
    }

    /// Counts one local member of `group` less, unbinding the node's queue from the group's
    /// key when it was the last (of any group of the key's bucket, with buckets). Returns the
    /// number of local members of `group` now; removing from a group with no local member
    /// does nothing and returns 0.
    ///
    /// When the unbind fails the count is unchanged (the member is still counted) and the
    /// error is returned, so the call can be made again.
    pub async fn remove_member(&self, group: &GroupName) -> Result<usize, BrokerError> {
        let key = self.group_keys.key(group);
        let _changing = GroupChange::begin(&self.changes, &key).await;
        if self.members(group) == 0 {
            return Ok(0);
        }
        // Every member of `group` is counted under its key too: at least 1 here.
        if self.keyed.lock().get(&key).copied().unwrap_or(0) <= 1 {
            self.broker.unbind(&self.node, &key).await?;
        }
        {
            let mut keyed = self.keyed.lock();
            match keyed.get_mut(&key) {
                Some(count) if *count > 1 => *count -= 1,
                _ => {
                    keyed.remove(&key);
                }
            }
        }
        let mut members = self.members.lock();
        let left = match members.get_mut(group) {
            Some(count) if *count > 1 => {
                *count -= 1;
                *count
            }
            _ => {
                members.remove(group);
                0
            }
        };
        Ok(left)
    }

    /// The number of local members of `group`.
    pub fn members(&self, group: &GroupName) -> usize {
        self.members.lock().get(group).copied().unwrap_or(0)
    }

    /// The groups with local members, with their counts, in name order.
    pub fn groups(&self) -> Vec<(GroupName, usize)> {
        self.members
            .lock()
            .iter()
            .map(|(group, count)| (group.clone(), *count))
            .collect()
    }

    /// Leaves the cluster for good: deletes the node's queue, with its bindings and the
    /// messages still in it. (A node that crashes instead has its queue expire.)
    pub async fn leave(self) -> Result<(), BrokerError> {
        self.broker.delete_queue(&self.node).await
    }
}

impl<B: fmt::Debug + ?Sized> fmt::Debug for NodeTopology<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTopology")
            .field("node", &self.node)
            .field("groups", &self.members.lock().len())
            .field("broker", &self.broker)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use hybrid_cluster_memory::MemoryBroker;

    use super::*;
    use crate::test_support::broker::TestBroker;

    fn group(name: &str) -> GroupName {
        GroupName::new(name).unwrap()
    }

    #[tokio::test]
    async fn with_buckets_a_bucket_is_bound_while_any_of_its_groups_has_local_members() {
        let broker = Arc::new(MemoryBroker::new());
        let a = NodeId::new("a").unwrap();
        let one_bucket = GroupKeys::Buckets(std::num::NonZeroU32::MIN);
        let node_a = NodeTopology::declare_with(
            broker.clone(),
            a.clone(),
            &QueueOptions::default(),
            one_bucket,
        )
        .await
        .unwrap();
        let (red, blue) = (group("red"), group("blue"));
        let bucket = RoutingKey::GroupBucket(0);
        assert_eq!(one_bucket.key(&red), bucket);

        assert_eq!(node_a.add_member(&red).await.unwrap(), 1);
        assert_eq!(node_a.add_member(&blue).await.unwrap(), 1);
        assert_eq!(node_a.add_member(&blue).await.unwrap(), 2);
        assert_eq!(
            broker.bindings(&a),
            [
                RoutingKey::Node(a.clone()),
                RoutingKey::Broadcast,
                bucket.clone()
            ]
        );
        assert_eq!(node_a.remove_member(&red).await.unwrap(), 0);
        assert_eq!(
            node_a.remove_member(&red).await.unwrap(),
            0,
            "not a member any more"
        );
        assert_eq!(node_a.remove_member(&blue).await.unwrap(), 1);
        assert!(
            broker.bindings(&a).contains(&bucket),
            "blue has a member left"
        );
        assert_eq!(node_a.remove_member(&blue).await.unwrap(), 0);
        assert!(!broker.bindings(&a).contains(&bucket));
        assert!(node_a.groups().is_empty());
    }

    #[test]
    fn buckets_spread_groups_and_every_node_agrees_on_them() {
        let keys = GroupKeys::Buckets(std::num::NonZeroU32::new(64).unwrap());
        let mut used = std::collections::BTreeSet::new();
        for i in 0..1_000 {
            let RoutingKey::GroupBucket(bucket) = keys.key(&group(&format!("g-{i}"))) else {
                panic!("a bucket key");
            };
            assert!(bucket < 64);
            used.insert(bucket);
        }
        assert_eq!(used.len(), 64, "1,000 groups reach every one of 64 buckets");
        // Fixed by the name alone (FNV-1a), the same on every node and version.
        assert_eq!(keys.key(&group("lobby")), RoutingKey::GroupBucket(51));
        assert_eq!(
            GroupKeys::PerGroup.key(&group("lobby")),
            RoutingKey::Group(group("lobby"))
        );
    }

    #[tokio::test]
    async fn groups_are_bound_while_they_have_local_members() {
        let broker = Arc::new(MemoryBroker::new());
        let a = NodeId::new("a").unwrap();
        let b = NodeId::new("b").unwrap();
        let options = QueueOptions::default();
        let node_a = NodeTopology::declare(broker.clone(), a.clone(), &options)
            .await
            .unwrap();
        let node_b = NodeTopology::declare(broker.clone(), b.clone(), &options)
            .await
            .unwrap();
        let room = group("room");
        let key = RoutingKey::Group(room.clone());

        assert_eq!(node_a.add_member(&room).await.unwrap(), 1);
        assert_eq!(node_a.add_member(&room).await.unwrap(), 2);
        assert_eq!(
            broker.bindings(&a),
            [
                RoutingKey::Node(a.clone()),
                RoutingKey::Broadcast,
                key.clone()
            ]
        );
        assert_eq!(
            broker.bindings(&b),
            [RoutingKey::Node(b.clone()), RoutingKey::Broadcast]
        );

        assert_eq!(node_a.remove_member(&room).await.unwrap(), 1);
        assert!(broker.bindings(&a).contains(&key), "a member is left");
        assert_eq!(node_a.remove_member(&room).await.unwrap(), 0);
        assert!(!broker.bindings(&a).contains(&key));
        assert_eq!(node_a.remove_member(&room).await.unwrap(), 0);
        assert!(node_a.groups().is_empty());

        // The other node's membership is its own.
        node_b.add_member(&room).await.unwrap();
        assert!(broker.bindings(&b).contains(&key));
        assert!(!broker.bindings(&a).contains(&key));
    }

    #[tokio::test]
    async fn a_failed_bind_adds_no_member() {
        let broker = Arc::new(MemoryBroker::new());
        let a = NodeId::new("a").unwrap();
        let node_a = NodeTopology::declare(broker.clone(), a.clone(), &QueueOptions::default())
            .await
            .unwrap();
        broker.delete_queue(&a).await.unwrap();
        let err = node_a.add_member(&group("room")).await.unwrap_err();
        assert!(matches!(err, BrokerError::QueueNotFound { .. }));
        assert_eq!(node_a.members(&group("room")), 0);
    }

    #[tokio::test]
    async fn a_slow_bind_of_one_group_never_holds_a_join_of_another() {
        let (broker, gate) = TestBroker::slow_bind(RoutingKey::Group(group("slow")));
        let broker = Arc::new(broker);
        let a = NodeId::new("a").unwrap();
        let node_a = Arc::new(
            NodeTopology::declare(broker, a, &QueueOptions::default())
                .await
                .unwrap(),
        );
        let slow = tokio::spawn({
            let node_a = Arc::clone(&node_a);
            async move { node_a.add_member(&group("slow")).await }
        });
        tokio::task::yield_now().await;
        let other = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            node_a.add_member(&group("other")),
        )
        .await
        .expect("another group's join does not wait for the slow bind");
        assert_eq!(other.unwrap(), 1);
        assert!(!slow.is_finished());
        gate.add_permits(1);
        assert_eq!(slow.await.unwrap().unwrap(), 1);
        assert!(
            node_a.changes.lock().is_empty(),
            "no lock is kept for groups nobody is changing"
        );
    }

    #[tokio::test]
    async fn concurrent_joins_and_leaves_end_consistent() {
        let broker = Arc::new(MemoryBroker::new());
        let a = NodeId::new("a").unwrap();
        let node_a = Arc::new(
            NodeTopology::declare(broker.clone(), a.clone(), &QueueOptions::default())
                .await
                .unwrap(),
        );
        let room = group("room");
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (node_a, room) = (node_a.clone(), room.clone());
            tasks.push(tokio::spawn(async move {
                node_a.add_member(&room).await.unwrap();
                node_a.remove_member(&room).await.unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(node_a.members(&room), 0);
        assert!(!broker.bindings(&a).contains(&RoutingKey::Group(room)));
        assert!(node_a.changes.lock().is_empty());
    }
}
