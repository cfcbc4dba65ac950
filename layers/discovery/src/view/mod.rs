//! The peers' view: which nodes exist, and their live info.
//!
//! [`ClusterView`] is the handle; a background task (the private `worker` module) follows the
//! registry, and applies each node record it reads in named steps (`records`).

mod records;
mod worker;

use std::fmt;
use std::sync::Arc;

use hybrid_cluster_core::live::{Epoch, LiveNodeInfo};
use hybrid_cluster_core::{NodeId, NodeInfo, Registry};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use self::worker::Worker;
use crate::config::DiscoveryConfig;
use crate::discover::NodeDiscover;
use crate::membership::Membership;

/// Follows the registry and keeps the view of every node, this one included.
///
/// A background task watches the registry's change events, lists all records when it
/// (re)connects and every [`resync_interval`](DiscoveryConfig::resync_interval), and checks a
/// peer's record again when its lease should have run out, so a crashed node is dropped within
/// its lease (measured on this node's clock from the lease the peer wrote, never by comparing
/// clocks). A graceful leave arrives as an event, at once.
///
/// # When the registry goes away
/// The view keeps the last known nodes (a lost registry is not a lost cluster), logs the
/// failure, and reconnects with backoff. Once back, it lists the records again: nodes that
/// left or expired meanwhile are removed then, and nodes that re-registered stay.
///
/// A malformed record (not the documented JSON, or naming another node than its key) is
/// skipped with a warning naming its key, once per distinct value; it never stops discovery,
/// and a node already known keeps its last good info.
///
/// # With a cluster secret
/// When [`DiscoveryConfig::secret`] is set, a node record must carry a valid signature
/// ([`NodeInfo::from_signed_json`]): an unsigned or forged record is skipped like a malformed
/// one (a warning naming its key, once per distinct value; a known node keeps its last good
/// info). So is a validly signed record **older** than one already seen of the same node (a
/// replay): for the same incarnation, an earlier `last_heartbeat`; for another incarnation, an
/// earlier `registered_at`. Only a node's own timestamps are compared with each other, never
/// with another machine's clock; a node whose clock steps back keeps its last good info until
/// its clock catches up. What was last seen of a node that is gone is remembered for 10
/// minutes.
///
/// The registry's change events themselves are not signed (in Redis, anyone who can publish on
/// the channel can send `left {node}`), so a removal event is confirmed by reading the node's
/// record again: while a record is there, the removal is ignored with a warning. A node's
/// lease running out (its record gone) is acted on as before.
///
/// Signing protects the content of the registry, not its availability: whoever can write to
/// it can still delete a node's record, and the node is then dropped like a crashed one.
///
/// Dropping the last clone stops the task.
#[derive(Clone)]
pub struct ClusterView {
    members: watch::Receiver<Arc<Membership>>,
    updates: watch::Receiver<u64>,
    epoch: Epoch,
    _task: Arc<AbortOnDropHandle<()>>,
}

impl fmt::Debug for ClusterView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterView")
            .field("members", &*self.members.borrow())
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl ClusterView {
    /// Starts following `registry`.
    ///
    /// It returns at once; the first listing arrives shortly after. Use
    /// [`ClusterView::ready`] to wait for it.
    pub fn start(registry: Arc<dyn Registry>, config: &DiscoveryConfig) -> Self {
        let (sender, members) = watch::channel(Arc::new(Membership::default()));
        let (updates_sender, updates) = watch::channel(0);
        let epoch = Epoch::new();
        let worker = Worker::new(registry, config, sender, updates_sender, epoch.clone());
        let task = tokio::spawn(worker.run());
        Self {
            members,
            updates,
            epoch,
            _task: Arc::new(AbortOnDropHandle::new(task)),
        }
    }

    /// Waits until the registry was listed once (or the view stopped).
    pub async fn ready(&self) {
        // The worker publishes after its first listing, even an empty one, and never before:
        // any change since this view was made means the registry was listed.
        let mut members = self.members.clone();
        let _ = members.changed().await;
    }

    /// The current members.
    pub fn members(&self) -> Arc<Membership> {
        Arc::clone(&self.members.borrow())
    }

    /// Every member's current info, in id order.
    pub fn nodes(&self) -> Vec<Arc<NodeInfo>> {
        self.members().iter().map(|(_, live)| live.get()).collect()
    }

    /// One member's current info.
    pub fn node(&self, node: &NodeId) -> Option<Arc<NodeInfo>> {
        self.members().get(node).map(LiveNodeInfo::get)
    }

    /// The epoch every member's live info bumps when it changes.
    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// A receiver of membership changes (joins, leaves, restarts).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Membership>> {
        self.members.clone()
    }

    /// A receiver that is told of every change, membership or a member's info; its value is
    /// the [`epoch`](ClusterView::epoch) after the change. For status pages and tests that
    /// wait for the view to reach some state.
    pub fn updates(&self) -> watch::Receiver<u64> {
        self.updates.clone()
    }

    /// Waits until `condition` holds for the current nodes, checking again after every change.
    pub async fn wait_until(&self, mut condition: impl FnMut(&[Arc<NodeInfo>]) -> bool) {
        let mut updates = self.updates();
        loop {
            updates.borrow_and_update();
            if condition(&self.nodes()) {
                return;
            }
            if updates.changed().await.is_err() {
                return;
            }
        }
    }

    /// A tower `Discover` of the members: services built by `make_service` from a node's
    /// info when it joins (no I/O allowed there), removed when it leaves.
    pub fn discover<F, S>(&self, make_service: F) -> NodeDiscover<F, S>
    where
        F: FnMut(&NodeInfo) -> S,
    {
        NodeDiscover::new(self.subscribe(), make_service)
    }
}
