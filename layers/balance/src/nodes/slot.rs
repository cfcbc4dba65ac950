//! One node's entry in the set: its info, the keys it is indexed under, and why it is or
//! is not available.

use std::cmp::Ordering;
use std::sync::Arc;

use hybrid_cluster_core::{LiveNodeInfo, NodeInfo, NodeStatus};

/// Connections relative to capacity, as an exact fraction (`den > 0`), compared by
/// cross-multiplication so that equal loads are exactly equal (no float noise in ties).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ratio {
    num: u64,
    den: u64,
}

impl Ratio {
    pub(super) fn new(connections: u64, max: u32) -> Self {
        Self {
            num: connections,
            den: u64::from(max.max(1)),
        }
    }
}

impl PartialEq for Ratio {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ratio {}

impl PartialOrd for Ratio {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ratio {
    fn cmp(&self, other: &Self) -> Ordering {
        (u128::from(self.num) * u128::from(other.den))
            .cmp(&(u128::from(other.num) * u128::from(self.den)))
    }
}

/// CPU % + memory %, in thousandths of a percent (`0..=200_000`); unreadable values sort last.
pub(super) fn usage_of(info: &NodeInfo) -> u32 {
    let sum = f64::from(info.cpu_usage_percent) + f64::from(info.memory_usage_percent);
    if sum.is_nan() {
        return u32::MAX;
    }
    // Clamped to 0..=200 first, so the cast cannot truncate.
    (sum.clamp(0.0, 200.0) * 1000.0).round() as u32
}

/// Why a node is or is not in the indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    Available = 0,
    Draining = 1,
    Offline = 2,
    Full = 3,
    NotReady = 4,
    Degraded = 5,
}

pub(super) struct Slot<K> {
    pub(super) key: K,
    pub(super) live: LiveNodeInfo,
    pub(super) info: Arc<NodeInfo>,
    pub(super) version: u64,
    /// Join order: unique, never reused; the rotation order of round robin and of ties.
    pub(super) seq: u64,
    pub(super) ready: bool,
    /// Connections charged since the last update, added to the reported count.
    pub(super) charged: u32,
    pub(super) class: Class,
    pub(super) load: Ratio,
    pub(super) usage: u32,
    /// Position in `available` while available.
    pub(super) pos: usize,
}

impl<K> Slot<K> {
    pub(super) fn connections(&self) -> u64 {
        u64::from(self.info.connection_count) + u64::from(self.charged)
    }

    /// Recomputes the derived keys and class from `info`, `charged` and `ready`.
    pub(super) fn derive(&mut self) {
        let connections = self.connections();
        self.load = Ratio::new(connections, self.info.max_connections);
        self.usage = usage_of(&self.info);
        self.class = match self.info.status {
            NodeStatus::Draining => Class::Draining,
            NodeStatus::Degraded => Class::Degraded,
            NodeStatus::Offline => Class::Offline,
            NodeStatus::Active if connections >= u64::from(self.info.max_connections) => {
                Class::Full
            }
            NodeStatus::Active if !self.ready => Class::NotReady,
            NodeStatus::Active => Class::Available,
        };
    }
}
