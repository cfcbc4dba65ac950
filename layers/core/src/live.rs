//! Live node info: a peer's [`NodeInfo`] that discovery keeps current after the peer was
//! inserted, so balancers see connection counts and resources change without the service being
//! replaced.
//!
//! A discovery hands each service it builds a [`LiveNodeInfo`]; all the cells of one discovery
//! share one [`Epoch`], bumped on every update, so a balancer can tell with one atomic load
//! whether anything changed since it last looked.
//!
//! ```
//! use hybrid_cluster_core::live::{Epoch, LiveNodeInfo};
//! use hybrid_cluster_core::{Incarnation, NodeId, NodeInfo};
//!
//! let epoch = Epoch::new();
//! let info = NodeInfo::new(NodeId::new("node-1")?, Incarnation::random(), "10.0.0.5", 5001);
//! let live = LiveNodeInfo::with_epoch(info.clone(), epoch.clone());
//! let seen = epoch.current();
//!
//! let mut busier = info;
//! busier.connection_count = 500;
//! live.update(busier);
//! assert_eq!(live.get().connection_count, 500);
//! assert_ne!(epoch.current(), seen);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::node::NodeInfo;

/// A counter shared by the [`LiveNodeInfo`]s of one discovery, bumped on every update.
#[derive(Clone, Default)]
pub struct Epoch(Arc<AtomicU64>);

impl Epoch {
    /// A new counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current value; it changes whenever a cell sharing this epoch is updated.
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Whether `self` and `other` are the same counter (clones of one epoch).
    pub fn same_as(&self, other: &Epoch) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Marks a change no cell records, such as a node joining or leaving.
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({})", self.current())
    }
}

/// One peer's node info, kept current by discovery and shared by its clones.
#[derive(Clone)]
pub struct LiveNodeInfo {
    inner: Arc<Inner>,
}

struct Inner {
    info: RwLock<Arc<NodeInfo>>,
    version: AtomicU64,
    epoch: Epoch,
}

impl LiveNodeInfo {
    /// A cell holding `info`, with an epoch of its own.
    pub fn new(info: NodeInfo) -> Self {
        Self::with_epoch(info, Epoch::new())
    }

    /// A cell holding `info` that bumps `epoch` on every update.
    pub fn with_epoch(info: NodeInfo, epoch: Epoch) -> Self {
        Self {
            inner: Arc::new(Inner {
                info: RwLock::new(Arc::new(info)),
                version: AtomicU64::new(0),
                epoch,
            }),
        }
    }

    /// The current info.
    pub fn get(&self) -> Arc<NodeInfo> {
        Arc::clone(&self.inner.info.read())
    }

    /// Replaces the info, and bumps this cell's version and the shared epoch.
    pub fn update(&self, info: NodeInfo) {
        *self.inner.info.write() = Arc::new(info);
        self.inner.version.fetch_add(1, Ordering::AcqRel);
        self.inner.epoch.bump();
    }

    /// How many times the info was updated.
    pub fn version(&self) -> u64 {
        self.inner.version.load(Ordering::Acquire)
    }

    /// The epoch this cell bumps.
    pub fn epoch(&self) -> &Epoch {
        &self.inner.epoch
    }
}

impl fmt::Debug for LiveNodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveNodeInfo")
            .field("info", &self.get())
            .field("version", &self.version())
            .finish()
    }
}

/// A service (or anything) that knows the live info of the node it stands for.
///
/// Balancers require it of the services a discovery yields, to choose by connections, CPU and
/// memory.
pub trait HasNodeInfo {
    /// The node's live info.
    fn live_node_info(&self) -> &LiveNodeInfo;
}

impl HasNodeInfo for LiveNodeInfo {
    fn live_node_info(&self) -> &LiveNodeInfo {
        self
    }
}
