//! The view's background task: watches the registry, lists it when it (re)connects and on
//! every resync, checks leases that should have run out, and reconnects with backoff.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use hybrid_cluster_core::error::error_chain;
use hybrid_cluster_core::live::{Epoch, LiveNodeInfo};
use hybrid_cluster_core::registry::RegistryEvents;
use hybrid_cluster_core::{
    ClusterSecret, NodeId, Registry, RegistryError, RegistryEvent, RemovalCause,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};

use super::records::{Applied, LastSeen};
use crate::config::DiscoveryConfig;
use crate::membership::Membership;

/// How long after a peer's lease should have run out its record is checked: Redis removes an
/// expired key exactly when read, so a few milliseconds suffice.
pub(super) const EXPIRY_GRACE: Duration = Duration::from_millis(5);

/// How long the last record seen of a node that is gone is remembered, to refuse a replay of
/// an older one.
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

/// The view's background task: follows the registry and keeps the membership.
pub(super) struct Worker {
    pub(super) registry: Arc<dyn Registry>,
    pub(super) updates: watch::Sender<u64>,
    resync_interval: Duration,
    /// Makes the backoff between reconnection attempts; a new one after each success.
    reconnect: ExponentialBackoffMaker,
    backoff: ExponentialBackoff,
    sender: watch::Sender<Arc<Membership>>,
    pub(super) epoch: Epoch,
    pub(super) members: BTreeMap<NodeId, LiveNodeInfo>,
    deadlines: BTreeSet<(Instant, NodeId)>,
    deadline_of: HashMap<NodeId, Instant>,
    /// The last malformed value seen per key, so each is reported once.
    pub(super) malformed: HashMap<String, Bytes>,
    listed: bool,
    /// The cluster secret: records must be signed with it.
    pub(super) secret: Option<ClusterSecret>,
    /// How far apart nodes' clocks may be, for a record's own lease.
    pub(super) max_clock_skew: Duration,
    /// With a secret, the last good record seen of each node, to refuse older ones.
    pub(super) seen: HashMap<NodeId, LastSeen>,
    /// The live info of nodes that dropped out, and since when: a node that comes back under
    /// the same incarnation (its lease ran out while it lived, e.g. Redis restarted) gets its
    /// cell back, so every holder of the cell (a balancer's service, a placer) follows it
    /// again.
    pub(super) departed: HashMap<NodeId, (LiveNodeInfo, Instant)>,
}

enum Disconnected {
    Registry(RegistryError),
    WatchEnded,
}

impl Worker {
    pub(super) fn new(
        registry: Arc<dyn Registry>,
        config: &DiscoveryConfig,
        sender: watch::Sender<Arc<Membership>>,
        updates: watch::Sender<u64>,
        epoch: Epoch,
    ) -> Self {
        let mut reconnect = config.reconnect_backoff();
        Self {
            registry,
            updates,
            resync_interval: config.resync_interval,
            backoff: reconnect.make_backoff(),
            reconnect,
            sender,
            epoch,
            members: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            deadline_of: HashMap::new(),
            malformed: HashMap::new(),
            listed: false,
            secret: config.secret.clone(),
            max_clock_skew: config.max_clock_skew,
            seen: HashMap::new(),
            departed: HashMap::new(),
        }
    }

    pub(super) async fn run(mut self) {
        loop {
            let reason = self.follow().await;
            let sleep = self.backoff.next_backoff();
            let delay = sleep.deadline().saturating_duration_since(Instant::now());
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
            sleep.await;
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
        self.backoff = self.reconnect.make_backoff();
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

    /// Removes a member; returns whether it was one.
    pub(super) fn remove(&mut self, node: &NodeId, cause: RemovalCause) -> bool {
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

    pub(super) fn set_deadline(&mut self, node: &NodeId, at: Instant) {
        self.clear_deadline(node);
        self.deadlines.insert((at, node.clone()));
        self.deadline_of.insert(node.clone(), at);
    }

    pub(super) fn clear_deadline(&mut self, node: &NodeId) {
        if let Some(at) = self.deadline_of.remove(node) {
            self.deadlines.remove(&(at, node.clone()));
        }
    }

    fn publish(&mut self) {
        // A membership change is a change balancers must see too.
        self.epoch.bump();
        self.sender
            .send_replace(Arc::new(Membership::new(self.members.clone())));
        self.updates.send_replace(self.epoch.current());
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
