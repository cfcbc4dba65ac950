//! The node set: every known node with its current info, indexed for sub-linear picks.
//!
//! This is the balancer's view without any tower in it, shared by the [`Balance`] service,
//! the [`Placer`] and the benchmarks. A [`NodeSet`] holds one [`LiveNodeInfo`] per node and a
//! snapshot of its last read value; [`NodeSet::refresh`] re-reads the nodes whose info changed
//! and re-indexes only those. A [`Selector`] then picks among the *available* nodes.
//!
//! # What is available
//! A node is available when it is [`Active`](hybrid_cluster_core::NodeStatus::Active), below its
//! `max_connections` (counting the connections [charged](NodeSet::charge) to it since its
//! last update) and, inside the [`Balance`] service, when its service is ready. Only available
//! nodes are in the indexes; the others are only counted, so that [`NoAvailableNode`] can say
//! why none is left.
//!
//! # Indexes
//! Each available node sits in four structures, all maintained on change (insert, remove,
//! info update, charge, readiness) in `O(log n)`:
//!
//! | index | serves | a pick costs |
//! |---|---|---|
//! | ordered set by connection load, then join order | `LeastConnections` | `O(log n)` |
//! | ordered set by CPU % + memory %, then join order | `LeastResourceUsage` | `O(log n)` |
//! | ordered map by join order | `RoundRobin` | `O(log n)` |
//! | dense vector | `Random`, `PowerOfTwoChoices` | `O(1)` |
//!
//! # Following info changes
//! [`refresh`](NodeSet::refresh) loads the [`Epoch`] the inserted cells share (the cells of
//! one discovery share one) and scans the nodes' [`version`](LiveNodeInfo::version)s only when
//! it moved: one atomic load while nothing changed. The set adopts the first inserted cell's
//! epoch, or the one given to [`NodeSet::with_shared_epoch`]; once a cell with another epoch
//! is inserted, every refresh compares every node's version (`O(n)` atomic loads), so no
//! update is ever missed.
//!
//! ```
//! use hybrid_cluster_balance::{NodeSet, Selector, Strategy};
//! use hybrid_cluster_core::{Epoch, Incarnation, LiveNodeInfo, NodeId, NodeInfo};
//!
//! let epoch = Epoch::new();
//! let mut nodes = NodeSet::with_shared_epoch(epoch.clone());
//! let mut cells = Vec::new();
//! for (name, connections) in [("a", 40), ("b", 10), ("c", 30)] {
//!     let mut info = NodeInfo::new(NodeId::new(name)?, Incarnation::random(), "10.0.0.1", 5001);
//!     info.connection_count = connections;
//!     let cell = LiveNodeInfo::with_epoch(info, epoch.clone());
//!     nodes.insert(NodeId::new(name)?, cell.clone());
//!     cells.push(cell);
//! }
//! let mut selector = Selector::seeded(Strategy::LeastConnections, 7);
//! assert_eq!(selector.pick(&nodes)?.key.as_str(), "b");
//!
//! // b reports a burst of connections: the next refresh re-indexes it.
//! let mut busier = (*cells[1].get()).clone();
//! busier.connection_count = 90;
//! cells[1].update(busier);
//! nodes.refresh();
//! assert_eq!(selector.pick(&nodes)?.key.as_str(), "c");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`Balance`]: crate::Balance
//! [`Placer`]: crate::Placer
//! [`Selector`]: crate::Selector
//! [`NoAvailableNode`]: crate::NoAvailableNode

mod follow;
mod slot;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use hybrid_cluster_core::{Epoch, HasNodeInfo, LiveNodeInfo, NodeInfo};
use tower::discover::Change;

use self::follow::Follow;
pub(crate) use self::slot::Ratio;
use self::slot::{Class, Slot};
use crate::error::NoAvailableNode;

/// One node as the set sees it, returned by a pick.
#[derive(Debug)]
pub struct Candidate<'a, K> {
    /// The node's key (in a discovery, usually its [`NodeId`](hybrid_cluster_core::NodeId)).
    pub key: &'a K,
    /// The node's info as of the set's last [`refresh`](NodeSet::refresh).
    pub info: &'a Arc<NodeInfo>,
}

/// Every known node with its current info, indexed by load, resource usage and join order.
///
/// See the [module docs](self). Keys are whatever identifies a node to its source: a
/// [`NodeId`](hybrid_cluster_core::NodeId) for the placement view, the `Discover` key inside
/// the balancer.
pub struct NodeSet<K> {
    slots: Vec<Option<Slot<K>>>,
    free: Vec<usize>,
    by_key: HashMap<K, usize>,
    next_seq: u64,
    pub(crate) available: Vec<usize>,
    pub(crate) by_seq: BTreeMap<u64, usize>,
    pub(crate) by_load: BTreeSet<(Ratio, u64, usize)>,
    pub(crate) by_usage: BTreeSet<(u32, u64, usize)>,
    counts: [usize; 6],
    follow: Follow,
}

impl<K> Default for NodeSet<K> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            next_seq: 0,
            available: Vec::new(),
            by_seq: BTreeMap::new(),
            by_load: BTreeSet::new(),
            by_usage: BTreeSet::new(),
            counts: [0; 6],
            follow: Follow::Undecided,
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for NodeSet<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeSet")
            .field(
                "nodes",
                &self
                    .slots
                    .iter()
                    .flatten()
                    .map(|s| (&s.key, s.class))
                    .collect::<Vec<_>>(),
            )
            .field("follow", &self.follow)
            .finish()
    }
}

impl<K> NodeSet<K> {
    /// An empty set. Its [`refresh`](Self::refresh) costs one atomic load while nothing
    /// changed when every inserted cell shares one [`Epoch`] (as the cells of one discovery
    /// do), and checks every node's version otherwise.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set whose [`refresh`](Self::refresh) costs one atomic load while `epoch` has
    /// not moved. A cell inserted with another epoch makes every refresh check every node, so
    /// no update is missed.
    pub fn with_shared_epoch(epoch: Epoch) -> Self {
        let seen = epoch.current();
        Self {
            follow: Follow::Shared { epoch, seen },
            ..Self::default()
        }
    }

    /// Nodes known, available or not.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Nodes a pick can choose now.
    pub fn available_len(&self) -> usize {
        self.available.len()
    }

    /// Every known node with its info as of the last refresh, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = Candidate<'_, K>> {
        self.slots.iter().flatten().map(|slot| Candidate {
            key: &slot.key,
            info: &slot.info,
        })
    }

    /// Every available node with its free places: its `max_connections` less its connections
    /// (those [charged](Self::charge) since its last update included), in no particular
    /// order. Nodes that are draining, degraded, offline, full or not ready are left out.
    pub fn with_room(&self) -> impl Iterator<Item = (Candidate<'_, K>, u64)> {
        self.available
            .iter()
            .filter_map(|&idx| self.slots.get(idx)?.as_ref())
            .map(|slot| {
                let free = u64::from(slot.info.max_connections).saturating_sub(slot.connections());
                let candidate = Candidate {
                    key: &slot.key,
                    info: &slot.info,
                };
                (candidate, free)
            })
    }

    /// Why no node can be chosen: the counts of nodes known and of each exclusion.
    pub fn unavailable(&self) -> NoAvailableNode {
        NoAvailableNode {
            known: self.len(),
            draining: self.counts[Class::Draining as usize],
            offline: self.counts[Class::Offline as usize],
            full: self.counts[Class::Full as usize],
            not_ready: self.counts[Class::NotReady as usize],
            degraded: self.counts[Class::Degraded as usize],
        }
    }

    /// Re-reads the info of the nodes whose cell was updated since the last look, resets
    /// their charged connections, and re-indexes them. Returns how many changed.
    ///
    /// With a shared epoch, this is one atomic load when nothing changed.
    pub fn refresh(&mut self) -> usize {
        if let Follow::Shared { epoch, seen } = &mut self.follow {
            let now = epoch.current();
            if now == *seen {
                return 0;
            }
            // Read the epoch before the versions: an update racing with the scan bumps the
            // epoch after this load, so the next refresh scans again.
            *seen = now;
        }
        let mut changed = 0;
        for idx in 0..self.slots.len() {
            let Some(slot) = &self.slots[idx] else {
                continue;
            };
            let version = slot.live.version();
            if version != slot.version {
                self.reindex(idx, |slot| {
                    slot.version = version;
                    slot.info = slot.live.get();
                    slot.charged = 0;
                });
                changed += 1;
            }
        }
        changed
    }

    /// Internal: the slot at `idx` (present while indexed).
    pub(crate) fn slot_key(&self, idx: usize) -> Option<(&K, &Arc<NodeInfo>, u64)> {
        self.slots
            .get(idx)?
            .as_ref()
            .map(|s| (&s.key, &s.info, s.seq))
    }

    pub(crate) fn slot_load(&self, idx: usize) -> Option<Ratio> {
        self.slots.get(idx)?.as_ref().map(|s| s.load)
    }

    /// Applies `change` to the slot, re-derives it and updates the indexes: only the keys
    /// that moved while its class stays the same (a heartbeat, a charge), everything when
    /// its class changed.
    fn reindex(&mut self, idx: usize, change: impl FnOnce(&mut Slot<K>)) {
        let Some(slot) = self.slots[idx].as_mut() else {
            return;
        };
        let (class, load, usage) = (slot.class, slot.load, slot.usage);
        change(slot);
        slot.derive();
        if slot.class != class {
            self.unindex_as(idx, class, load, usage);
            self.index(idx);
        } else if class == Class::Available {
            let seq = slot.seq;
            if slot.load != load {
                self.by_load.remove(&(load, seq, idx));
                self.by_load.insert((slot.load, seq, idx));
            }
            if slot.usage != usage {
                self.by_usage.remove(&(usage, seq, idx));
                self.by_usage.insert((slot.usage, seq, idx));
            }
        }
    }

    fn index(&mut self, idx: usize) {
        let Some(slot) = self.slots[idx].as_mut() else {
            return;
        };
        self.counts[slot.class as usize] += 1;
        if slot.class == Class::Available {
            slot.pos = self.available.len();
            self.available.push(idx);
            self.by_seq.insert(slot.seq, idx);
            self.by_load.insert((slot.load, slot.seq, idx));
            self.by_usage.insert((slot.usage, slot.seq, idx));
        }
    }

    /// Takes the slot out of the indexes.
    fn unindex(&mut self, idx: usize) {
        if let Some(slot) = self.slots[idx].as_ref() {
            let (class, load, usage) = (slot.class, slot.load, slot.usage);
            self.unindex_as(idx, class, load, usage);
        }
    }

    /// Takes the slot out of the indexes, where it was filed under `class`, `load` and
    /// `usage` (its values before a change).
    fn unindex_as(&mut self, idx: usize, class: Class, load: Ratio, usage: u32) {
        let Some(slot) = self.slots[idx].as_ref() else {
            return;
        };
        self.counts[class as usize] -= 1;
        if class == Class::Available {
            let (pos, seq) = (slot.pos, slot.seq);
            self.available.swap_remove(pos);
            if let Some(&moved) = self.available.get(pos)
                && let Some(moved) = self.slots[moved].as_mut()
            {
                moved.pos = pos;
            }
            self.by_seq.remove(&seq);
            self.by_load.remove(&(load, seq, idx));
            self.by_usage.remove(&(usage, seq, idx));
        }
    }
}

impl<K: Clone + Eq + Hash> NodeSet<K> {
    /// Adds a node, ready, or replaces the cell of a known one (keeping its place in the
    /// rotation). Returns whether it replaced one.
    pub fn insert(&mut self, key: K, live: LiveNodeInfo) -> bool {
        self.insert_with(key, live, true)
    }

    /// As [`insert`](Self::insert), the node (new or replaced) ready or not as `ready` says.
    pub(crate) fn insert_with(&mut self, key: K, live: LiveNodeInfo, ready: bool) -> bool {
        self.follow.admit(&live);
        let version = live.version();
        let info = live.get();
        if let Some(&idx) = self.by_key.get(&key) {
            self.reindex(idx, |slot| {
                slot.live = live;
                slot.info = info;
                slot.version = version;
                slot.charged = 0;
                slot.ready = ready;
            });
            return true;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut slot = Slot {
            key: key.clone(),
            live,
            info,
            version,
            seq,
            ready,
            charged: 0,
            class: Class::NotReady,
            load: Ratio::new(0, 1),
            usage: 0,
            pos: 0,
        };
        slot.derive();
        let idx = match self.free.pop() {
            Some(idx) => {
                self.slots[idx] = Some(slot);
                idx
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.by_key.insert(key, idx);
        self.index(idx);
        false
    }

    /// Forgets a node. Returns whether it was known.
    pub fn remove(&mut self, key: &K) -> bool {
        let Some(idx) = self.by_key.remove(key) else {
            return false;
        };
        self.unindex(idx);
        self.slots[idx] = None;
        self.free.push(idx);
        true
    }

    /// Applies one change of a discovery: an inserted node with its service's live info,
    /// ready or not as `ready` says (a re-inserted node keeps its place in the rotation), or
    /// a removed one. The one place where the balancer and the placer follow membership.
    pub(crate) fn apply<S: HasNodeInfo>(&mut self, change: &Change<K, S>, ready: bool) {
        match change {
            Change::Insert(key, service) => {
                self.insert_with(key.clone(), service.live_node_info().clone(), ready);
            }
            Change::Remove(key) => {
                self.remove(key);
            }
        }
    }

    /// The node's info as of the last refresh.
    pub fn get(&self, key: &K) -> Option<&Arc<NodeInfo>> {
        let idx = *self.by_key.get(key)?;
        self.slots[idx].as_ref().map(|slot| &slot.info)
    }

    /// Whether the node is known and a pick may choose it now.
    pub fn is_available(&self, key: &K) -> bool {
        self.by_key
            .get(key)
            .and_then(|&idx| self.slots[idx].as_ref())
            .is_some_and(|slot| slot.class == Class::Available)
    }

    /// Counts one more connection on the node until its info is next updated, so that picks
    /// made between two heartbeats see the clients already sent there (and stop at
    /// `max_connections`). Returns whether the node is known.
    pub fn charge(&mut self, key: &K) -> bool {
        self.charge_many(key, 1)
    }

    /// Counts `connections` more on the node, as [`charge`](Self::charge) does one: for
    /// clients sent there all at once. Returns whether the node is known.
    pub fn charge_many(&mut self, key: &K, connections: u32) -> bool {
        let Some(&idx) = self.by_key.get(key) else {
            return false;
        };
        self.reindex(idx, |slot| {
            slot.charged = slot.charged.saturating_add(connections)
        });
        true
    }

    /// Marks the node's service ready or not (the balancer's readiness tracking).
    pub(crate) fn set_ready(&mut self, key: &K, ready: bool) {
        let Some(&idx) = self.by_key.get(key) else {
            return;
        };
        if self.slots[idx].as_ref().is_some_and(|s| s.ready != ready) {
            self.reindex(idx, |slot| slot.ready = ready);
        }
    }
}
