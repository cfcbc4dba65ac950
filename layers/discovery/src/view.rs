//! The peers' view: which nodes exist, and their live info.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use hybrid_cluster_core::live::{Epoch, LiveNodeInfo};
use hybrid_cluster_core::registry::RegistryEvents;
use hybrid_cluster_core::{
    ClusterSecret, Incarnation, NodeId, NodeInfo, NodeRecord, NodeRecordError, NodeStatus,
    Registry, RegistryError, RegistryEvent, RemovalCause,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::DiscoveryConfig;
use crate::discover::NodeDiscover;
use hybrid_cluster_core::error::error_chain;

/// How long after a peer's lease should have run out its record is checked: Redis removes an
/// expired key exactly when read, so a few milliseconds suffice.
const EXPIRY_GRACE: Duration = Duration::from_millis(5);

/// How long the last record seen of a node that is gone is remembered, to refuse a replay of
/// an older one.
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

/// The nodes of the cluster as one node sees them, at one moment.
///
/// Membership changes (a node joins, leaves, expires, restarts under a new incarnation, goes
/// Offline) produce a new `Membership`; changes of a member's figures (connections, CPU,
/// memory, status Active/Draining) update its [`LiveNodeInfo`] in place.
#[derive(Clone, Default)]
pub struct Membership {
    nodes: BTreeMap<NodeId, LiveNodeInfo>,
}

impl Membership {
    /// The members, in id order, with their live info.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &LiveNodeInfo)> {
        self.nodes.iter()
    }

    /// A member's live info.
    pub fn get(&self, node: &NodeId) -> Option<&LiveNodeInfo> {
        self.nodes.get(node)
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

impl fmt::Debug for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.nodes.keys()).finish()
    }
}

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
    _task: Arc<AbortOnDrop>,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
        let worker = Worker {
            registry,
            updates: updates_sender,
            resync_interval: config.resync_interval,
            backoff: Backoff::new(config.min_reconnect_delay, config.max_reconnect_delay),
            sender,
            epoch: epoch.clone(),
            members: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            deadline_of: HashMap::new(),
            malformed: HashMap::new(),
            listed: false,
            secret: config.secret.clone(),
            max_clock_skew: config.max_clock_skew,
            seen: HashMap::new(),
            departed: HashMap::new(),
        };
        let task = tokio::spawn(worker.run());
        Self {
            members,
            updates,
            epoch,
            _task: Arc::new(AbortOnDrop(task)),
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

struct Worker {
    registry: Arc<dyn Registry>,
    updates: watch::Sender<u64>,
    resync_interval: Duration,
    backoff: Backoff,
    sender: watch::Sender<Arc<Membership>>,
    epoch: Epoch,
    members: BTreeMap<NodeId, LiveNodeInfo>,
    deadlines: BTreeSet<(Instant, NodeId)>,
    deadline_of: HashMap<NodeId, Instant>,
    /// The last malformed value seen per key, so each is reported once.
    malformed: HashMap<String, Bytes>,
    listed: bool,
    /// The cluster secret: records must be signed with it.
    secret: Option<ClusterSecret>,
    /// How far apart nodes' clocks may be, for a record's own lease.
    max_clock_skew: Duration,
    /// With a secret, the last good record seen of each node, to refuse older ones.
    seen: HashMap<NodeId, LastSeen>,
    /// The live info of nodes that dropped out, and since when: a node that comes back under
    /// the same incarnation (its lease ran out while it lived, e.g. Redis restarted) gets its
    /// cell back, so every holder of the cell (a balancer's service, a placer) follows it
    /// again.
    departed: HashMap<NodeId, (LiveNodeInfo, Instant)>,
}

/// The longest lease taken as told; a record claiming more is checked again after this.
const MAX_LEASE: Duration = Duration::from_secs(86_400);

/// What applying a record did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    /// The membership changed.
    Changed,
    /// Taken, the membership as it was.
    Unchanged,
    /// Not taken: malformed, unauthenticated, stale or without a lease.
    Refused,
}

impl From<bool> for Applied {
    fn from(changed: bool) -> Self {
        if changed {
            Self::Changed
        } else {
            Self::Unchanged
        }
    }
}

/// What was last seen of a node, to tell a replayed record from a new one.
struct LastSeen {
    incarnation: Incarnation,
    registered_at: SystemTime,
    last_heartbeat: SystemTime,
    /// When the node stopped being a member, if it has.
    gone_since: Option<Instant>,
}

impl LastSeen {
    /// Why `info` is older than what was seen, if it is.
    fn refuses(&self, info: &NodeInfo) -> Option<&'static str> {
        if info.incarnation == self.incarnation {
            (info.last_heartbeat < self.last_heartbeat)
                .then_some("its last_heartbeat is older than a record already seen (a replay)")
        } else {
            (info.registered_at < self.registered_at).then_some(
                "it is of an incarnation registered before the one already seen (a replay)",
            )
        }
    }
}

enum Disconnected {
    Registry(RegistryError),
    WatchEnded,
}

impl Worker {
    async fn run(mut self) {
        loop {
            let reason = self.follow().await;
            let delay = self.backoff.next_delay();
            match reason {
                Disconnected::Registry(error) => tracing::warn!(
                    error = %error_chain(&error),
                    nodes = self.members.len(),
                    retry_in = ?delay,
                    "lost the registry; keeping the last known view"
                ),
                Disconnected::WatchEnded => tracing::warn!(
                    nodes = self.members.len(),
                    retry_in = ?delay,
                    "the registry's change events stopped; keeping the last known view"
                ),
            }
            tokio::time::sleep(delay).await;
            if self.sender.is_closed() {
                return;
            }
        }
    }

    /// Watches, lists, then applies events until the registry is lost.
    async fn follow(&mut self) -> Disconnected {
        let mut events: RegistryEvents = match self.registry.watch().await {
            Ok(events) => events,
            Err(error) => return Disconnected::Registry(error),
        };
        if let Err(error) = self.resync().await {
            return Disconnected::Registry(error);
        }
        if self.listed {
            tracing::debug!(nodes = self.members.len(), "following the registry");
        }
        self.backoff.reset();
        let mut resync =
            tokio::time::interval_at(Instant::now() + self.resync_interval, self.resync_interval);
        loop {
            let next_deadline = self.deadlines.first().map(|(at, _)| *at);
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(RegistryEvent::Updated(record))) => {
                        // A refused update does not remove a member: its lease does.
                        if self.apply(record) == Applied::Changed {
                            self.publish();
                        }
                    }
                    Some(Ok(RegistryEvent::Removed { node, cause })) => {
                        let changed = if self.secret.is_some() {
                            match self.confirm_removal(&node, cause).await {
                                Ok(changed) => changed,
                                Err(error) => return Disconnected::Registry(error),
                            }
                        } else {
                            self.remove(&node, cause)
                        };
                        if changed {
                            self.publish();
                        }
                    }
                    Some(Ok(RegistryEvent::Lagged)) => {
                        if let Err(error) = self.resync().await {
                            return Disconnected::Registry(error);
                        }
                    }
                    Some(Err(error)) => return Disconnected::Registry(error),
                    None => return Disconnected::WatchEnded,
                },
                () = sleep_until(next_deadline), if next_deadline.is_some() => {
                    if let Err(error) = self.check_due().await {
                        return Disconnected::Registry(error);
                    }
                }
                _ = resync.tick() => {
                    if let Err(error) = self.resync().await {
                        return Disconnected::Registry(error);
                    }
                }
                () = self.sender.closed() => return Disconnected::WatchEnded,
            }
        }
    }

    /// Lists every record and makes the view match it.
    async fn resync(&mut self) -> Result<(), RegistryError> {
        let records = self.registry.nodes().await?;
        let mut changed = !self.listed;
        let mut listed: BTreeSet<NodeId> = BTreeSet::new();
        for record in records {
            let node = record.node.clone();
            match self.apply(record) {
                Applied::Refused => {}
                applied => {
                    changed |= applied == Applied::Changed;
                    listed.insert(node);
                }
            }
        }
        let gone: Vec<NodeId> = self
            .members
            .keys()
            .filter(|node| !listed.contains(*node))
            .cloned()
            .collect();
        for node in gone {
            changed |= self.remove(&node, RemovalCause::Expired);
        }
        let now = Instant::now();
        self.departed
            .retain(|_, (_, since)| now.duration_since(*since) < TOMBSTONE_TTL);
        self.seen.retain(|node, seen| {
            listed.contains(node)
                || seen
                    .gone_since
                    .is_none_or(|since| now.duration_since(since) < TOMBSTONE_TTL)
        });
        self.listed = true;
        if changed {
            self.publish();
        }
        Ok(())
    }

    /// Checks the records whose lease should have run out.
    async fn check_due(&mut self) -> Result<(), RegistryError> {
        let now = Instant::now();
        let due: Vec<NodeId> = self
            .deadlines
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, node)| node.clone())
            .collect();
        let mut changed = false;
        for node in due {
            self.clear_deadline(&node);
            match self
                .registry
                .node(&node)
                .await?
                .map(|record| self.apply(record))
            {
                Some(Applied::Changed) => changed = true,
                Some(Applied::Unchanged) => {}
                // Gone, or what is left under its key is no live record: its lease ran out.
                Some(Applied::Refused) | None => {
                    changed |= self.remove(&node, RemovalCause::Expired);
                }
            }
        }
        if changed {
            self.publish();
        }
        Ok(())
    }

    /// With a secret: acts on a removal event only once the node's record is gone, since the
    /// events are not signed. Returns whether the membership changed.
    async fn confirm_removal(
        &mut self,
        node: &NodeId,
        cause: RemovalCause,
    ) -> Result<bool, RegistryError> {
        match self.registry.node(node).await? {
            None => Ok(self.remove(node, cause)),
            Some(record) => {
                if self.members.contains_key(node) {
                    tracing::warn!(
                        %node,
                        ?cause,
                        key = %record.key,
                        "ignoring a removal event: the node's record is still there \
                         (the event may be forged)"
                    );
                }
                Ok(self.apply(record) == Applied::Changed)
            }
        }
    }

    /// Applies one record: whether the membership changed, or the record was refused.
    fn apply(&mut self, record: NodeRecord) -> Applied {
        let read = match &self.secret {
            Some(secret) => NodeInfo::from_signed_json(&record.value, secret),
            None => NodeInfo::from_json(&record.value),
        };
        let info = match read {
            Ok(info) if info.node_id == record.node => info,
            Ok(info) => {
                self.skip(
                    &record,
                    "malformed",
                    &format!("it names node {}", info.node_id),
                );
                return Applied::Refused;
            }
            Err(error @ (NodeRecordError::Unsigned | NodeRecordError::BadSignature)) => {
                self.skip(&record, "unauthenticated", &error.to_string());
                return Applied::Refused;
            }
            Err(error) => {
                self.skip(&record, "malformed", &error_chain(&error));
                return Applied::Refused;
            }
        };
        if self.secret.is_some() {
            let older = self
                .seen
                .get(&info.node_id)
                .and_then(|seen| seen.refuses(&info));
            if let Some(reason) = older {
                self.skip(&record, "unauthenticated", reason);
                return Applied::Refused;
            }
            self.seen.insert(
                info.node_id.clone(),
                LastSeen {
                    incarnation: info.incarnation,
                    registered_at: info.registered_at,
                    last_heartbeat: info.last_heartbeat,
                    gone_since: None,
                },
            );
        }
        let lease = match self.lease_of(&record, &info) {
            Ok(lease) => lease,
            Err(reason) => {
                self.skip(&record, "stale", reason);
                return Applied::Refused;
            }
        };
        self.malformed.remove(&record.key);
        match lease {
            // A lease longer than a day is nobody's (a forged or broken event): checked then.
            Some(lease) => self.set_deadline(
                &info.node_id,
                Instant::now() + lease.min(MAX_LEASE) + EXPIRY_GRACE,
            ),
            None => self.clear_deadline(&info.node_id),
        }
        if info.status == NodeStatus::Offline {
            return Applied::from(self.remove(&info.node_id, RemovalCause::Left));
        }
        match self.members.get(&info.node_id) {
            Some(live) if live.get().incarnation == info.incarnation => {
                if *live.get() != info {
                    live.update(info);
                    self.updates.send_replace(self.epoch.current());
                }
                Applied::Unchanged
            }
            Some(_) => {
                tracing::info!(node = %info.node_id, incarnation = %info.incarnation, "node restarted");
                let live = LiveNodeInfo::with_epoch(info.clone(), self.epoch.clone());
                self.members.insert(info.node_id, live);
                Applied::Changed
            }
            None => {
                tracing::info!(
                    node = %info.node_id,
                    url = %info.ws_url(),
                    status = %info.status,
                    "node joined"
                );
                let live = match self.departed.remove(&info.node_id) {
                    Some((live, _)) if live.get().incarnation == info.incarnation => {
                        live.update(info.clone());
                        live
                    }
                    _ => LiveNodeInfo::with_epoch(info.clone(), self.epoch.clone()),
                };
                self.members.insert(info.node_id, live);
                Applied::Changed
            }
        }
    }

    /// How long `record` (read as `info`) is live from now on this node's clock: the lease the
    /// registry tells (`None`: it tells none), no longer than the record's own signed lease
    /// allows. Refused (with why) when the registry tells leases and this record has none (a
    /// key written by hand, or left without a TTL), or when the record's own lease ended longer
    /// ago than the clock skew allows (left over, or replayed).
    fn lease_of(
        &self,
        record: &NodeRecord,
        info: &NodeInfo,
    ) -> Result<Option<Duration>, &'static str> {
        if record.expires_in.is_none() && self.registry.reports_leases() {
            return Err(
                "its key has no lease (written by hand, or left over): taken as a crashed node's",
            );
        }
        let Some(ends) = info.lease_ends_at() else {
            return Ok(record.expires_in);
        };
        let now = SystemTime::now();
        let left = match ends.duration_since(now) {
            Ok(left) => left.saturating_add(self.max_clock_skew),
            Err(past) if past.duration() <= self.max_clock_skew => {
                self.max_clock_skew - past.duration()
            }
            Err(_) => {
                return Err(
                    "its own lease ended before now, beyond the clock skew allowed: a stale or replayed record",
                );
            }
        };
        Ok(Some(record.expires_in.map_or(left, |told| told.min(left))))
    }

    /// Skips a record that cannot be used (`what`: malformed or unauthenticated), reporting
    /// it once per distinct value. The record's content is not logged: only its key and why.
    fn skip(&mut self, record: &NodeRecord, what: &str, reason: &str) {
        if self.malformed.get(&record.key) != Some(&record.value) {
            tracing::warn!(key = %record.key, reason, "skipping a {what} node record");
            self.malformed
                .insert(record.key.clone(), record.value.clone());
        }
    }

    /// Removes a member; returns whether it was one.
    fn remove(&mut self, node: &NodeId, cause: RemovalCause) -> bool {
        self.clear_deadline(node);
        let Some(live) = self.members.remove(node) else {
            return false;
        };
        self.departed.insert(node.clone(), (live, Instant::now()));
        if let Some(seen) = self.seen.get_mut(node) {
            seen.gone_since = Some(Instant::now());
        }
        match cause {
            RemovalCause::Left => tracing::info!(%node, "node left"),
            RemovalCause::Expired => tracing::warn!(%node, "node expired: its lease ran out"),
        }
        true
    }

    fn set_deadline(&mut self, node: &NodeId, at: Instant) {
        self.clear_deadline(node);
        self.deadlines.insert((at, node.clone()));
        self.deadline_of.insert(node.clone(), at);
    }

    fn clear_deadline(&mut self, node: &NodeId) {
        if let Some(at) = self.deadline_of.remove(node) {
            self.deadlines.remove(&(at, node.clone()));
        }
    }

    fn publish(&mut self) {
        // A membership change is a change balancers must see too.
        self.epoch.bump();
        self.sender.send_replace(Arc::new(Membership {
            nodes: self.members.clone(),
        }));
        self.updates.send_replace(self.epoch.current());
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
