//! This node's connections: their bounded inboxes, their groups, and their count.

mod bounced;
mod changes;
mod inbox;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use hybrid_cluster_core::{ConnectionId, Envelope, GroupName, UserId};
use hybrid_cluster_discovery::ConnectionCounter;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

pub(crate) use self::bounced::{Bounce, Bounced};
pub(crate) use self::changes::{PresenceChange, PresenceChanges};
pub(crate) use self::inbox::{Phase, Pushed, Refused, SlotSession};

pub(crate) use self::inbox::InboxSlot;
use self::inbox::bounce;
pub use self::inbox::{CloseFrame, Inbox, InboxItem, Undeliverable};
use crate::config::SlowClientPolicy;
use crate::metrics::Metrics;

/// Removes its connection from the table when dropped.
pub(super) struct Registration {
    table: Arc<LocalConnections>,
    id: ConnectionId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.deregister(&self.id);
    }
}

struct Entry {
    slot: Arc<InboxSlot>,
    /// The groups it is a member of (group messages reach it), each with the number of the
    /// join that made it one.
    groups: BTreeMap<GroupName, u64>,
    /// Joins so far, to number them.
    joins: u64,
    /// Those of them its node's broker topology counts it in (the join's bind is done): what
    /// has to be taken off the count when it leaves or goes. A join still binding is in
    /// `groups` only.
    counted: BTreeSet<GroupName>,
    /// Who the connection belongs to, when its upgrade said.
    user: Option<UserId>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<ConnectionId, Entry>,
    groups: HashMap<GroupName, HashSet<ConnectionId>>,
    users: HashMap<UserId, HashSet<ConnectionId>>,
    /// Entries whose session is parked (their client away): not counted as connections.
    parked: usize,
}

/// The connections of this node.
pub(crate) struct LocalConnections {
    table: RwLock<Table>,
    counter: ConnectionCounter,
    capacity: usize,
    byte_bound: usize,
    policy: SlowClientPolicy,
    metrics: Metrics,
    /// Woken whenever a connection goes, for shutdown to wait on.
    emptied: Notify,
    /// Groups a departed connection left, to be unbound by the node.
    departed: Mutex<Vec<GroupName>>,
    departures: Notify,
    /// Unicasts that will not reach their connection, for notices to their senders.
    pub(crate) bounced: Arc<Bounced>,
    /// How long a parked session stays; `None`: sessions are off.
    park_window: Mutex<Option<std::time::Duration>>,
    /// Presence changes of connections with a user, when presence is on.
    presence: Option<PresenceChanges>,
}

impl LocalConnections {
    pub(crate) fn new(
        counter: ConnectionCounter,
        capacity: usize,
        policy: SlowClientPolicy,
        metrics: Metrics,
    ) -> Self {
        let bounced = Arc::new(Bounced::new(metrics.clone()));
        Self {
            table: RwLock::new(Table::default()),
            counter,
            capacity: capacity.max(1),
            byte_bound: usize::MAX,
            policy,
            metrics,
            emptied: Notify::new(),
            departed: Mutex::new(Vec::new()),
            departures: Notify::new(),
            bounced,
            park_window: Mutex::new(None),
            presence: None,
        }
    }

    /// Records the presence changes of connections with a user (see [`PresenceChanges`]).
    pub(crate) fn with_presence(mut self) -> Self {
        self.presence = Some(PresenceChanges::default());
        self
    }

    /// The presence changes, when presence is on.
    pub(crate) fn presence(&self) -> Option<&PresenceChanges> {
        self.presence.as_ref()
    }

    /// Queues, for the groups `counted` of connection `id` of `user` that goes or leaves
    /// them, that it left them (called under the table's lock).
    fn push_left<'a>(
        &self,
        id: &ConnectionId,
        user: Option<&UserId>,
        counted: impl IntoIterator<Item = &'a GroupName>,
    ) {
        if let (Some(presence), Some(user)) = (&self.presence, user) {
            for group in counted {
                let change = PresenceChange::Left(group.clone(), user.clone(), id.clone());
                presence.push(change);
            }
        }
    }

    /// Bounds every inbox to `bytes` of payload too (a message alone in an inbox is taken
    /// whatever its size).
    pub(crate) fn with_byte_bound(mut self, bytes: usize) -> Self {
        self.byte_bound = bytes.max(1);
        self
    }

    /// Adds a connection of `user` (if known) and returns its inbox.
    pub(crate) fn register(self: &Arc<Self>, id: ConnectionId, user: Option<UserId>) -> Inbox {
        let slot = Arc::new(InboxSlot::new(
            id.clone(),
            (self.capacity, self.byte_bound),
            self.policy,
            self.metrics.clone(),
            Arc::clone(&self.bounced),
        ));
        let count = {
            let mut table = self.table.write();
            table.entries.insert(
                id.clone(),
                Entry {
                    slot: Arc::clone(&slot),
                    groups: BTreeMap::new(),
                    joins: 0,
                    counted: BTreeSet::new(),
                    user: user.clone(),
                },
            );
            if let Some(user) = user {
                table.users.entry(user).or_default().insert(id.clone());
            }
            table.entries.len() - table.parked
        };
        self.counter.increment();
        self.metrics.connections(count);
        Inbox {
            slot,
            _registration: Registration {
                table: Arc::clone(self),
                id,
            },
        }
    }

    fn deregister(self: &Arc<Self>, id: &ConnectionId) {
        let slot = self.slot(id);
        if slot.as_ref().is_some_and(|slot| slot.park()) {
            self.parked(id);
            return;
        }
        self.remove(id, true);
    }

    /// Counts connection `id` out, its session parked, until the resume window passes.
    fn parked(self: &Arc<Self>, id: &ConnectionId) {
        let count = {
            let mut table = self.table.write();
            table.parked += 1;
            table.entries.len() - table.parked
        };
        self.counter.decrement();
        self.metrics.connections(count);
        self.emptied.notify_waiters();
        let (Some(window), Ok(runtime)) = (
            *self.park_window.lock(),
            tokio::runtime::Handle::try_current(),
        ) else {
            self.forget(id);
            return;
        };
        let table = Arc::downgrade(self);
        let id = id.clone();
        runtime.spawn(async move {
            tokio::time::sleep(window).await;
            if let Some(table) = table.upgrade() {
                table.forget(&id);
            }
        });
    }

    /// Removes connection `id` if its session is parked (it expired, or resumed elsewhere).
    pub(crate) fn forget(&self, id: &ConnectionId) {
        if self.slot(id).is_some_and(|slot| slot.parked()) {
            self.remove(id, false);
        }
    }

    /// Sets how long a parked session stays (the sessions' resume window).
    pub(crate) fn park_for(&self, window: std::time::Duration) {
        *self.park_window.lock() = Some(window);
    }

    /// Takes connection `id` out of the table; `live`: it is counted as a connection still.
    fn remove(&self, id: &ConnectionId, live: bool) {
        let (left, count) = {
            let mut table = self.table.write();
            let Some(entry) = table.entries.remove(id) else {
                return;
            };
            if !live {
                table.parked -= 1;
            }
            if let Some(user) = &entry.user
                && let Some(connections) = table.users.get_mut(user)
            {
                connections.remove(id);
                if connections.is_empty() {
                    table.users.remove(user);
                }
            }
            for group in entry.groups.keys() {
                if let Some(members) = table.groups.get_mut(group) {
                    members.remove(id);
                    if members.is_empty() {
                        table.groups.remove(group);
                    }
                }
            }
            self.push_left(id, entry.user.as_ref(), &entry.counted);
            (entry, table.entries.len() - table.parked)
        };
        // Messages the socket task never took: their senders are told.
        for item in left.slot.take_queued() {
            self.metrics.dropped("connection_gone");
            bounce(&self.bounced, item);
        }
        let left = left.counted;
        if live {
            self.counter.decrement();
        }
        self.metrics.connections(count);
        if !left.is_empty() {
            self.departed.lock().extend(left);
            self.departures.notify_one();
        }
        self.emptied.notify_waiters();
    }

    /// Takes the groups departed connections left, waiting for some when there are none.
    pub(crate) async fn departed_groups(&self) -> Vec<GroupName> {
        loop {
            let notified = self.departures.notified();
            let groups = std::mem::take(&mut *self.departed.lock());
            if !groups.is_empty() {
                return groups;
            }
            notified.await;
        }
    }

    /// The connections of this node (parked sessions aside).
    pub(crate) fn len(&self) -> usize {
        let table = self.table.read();
        table.entries.len() - table.parked
    }

    pub(crate) fn contains(&self, id: &ConnectionId) -> bool {
        self.table.read().entries.contains_key(id)
    }

    /// Puts a message or a notice in one connection's inbox (a parked session's included).
    pub(crate) fn deliver_to(&self, id: &ConnectionId, item: InboxItem) -> Result<Pushed, Refused> {
        self.slot(id).ok_or(Refused::NotFound)?.push(item)
    }

    /// The inbox of connection `id`, if it is here (live, or its session parked).
    pub(crate) fn slot(&self, id: &ConnectionId) -> Option<Arc<InboxSlot>> {
        self.table
            .read()
            .entries
            .get(id)
            .map(|entry| Arc::clone(&entry.slot))
    }

    /// Puts a message in every connection's inbox; returns how many, and what the sessions
    /// among them are to do with it.
    pub(crate) fn deliver_all(&self, envelope: &Arc<Envelope>) -> FannedOut {
        fan_out(&self.all_slots(), envelope)
    }

    /// Puts a message in the inbox of every local member of `group`; returns how many, and
    /// what the sessions among them are to do with it.
    pub(crate) fn deliver_group(&self, group: &GroupName, envelope: &Arc<Envelope>) -> FannedOut {
        let slots: Vec<Arc<InboxSlot>> = {
            let table = self.table.read();
            let Some(members) = table.groups.get(group) else {
                return FannedOut::default();
            };
            members
                .iter()
                .filter_map(|id| table.entries.get(id))
                .map(|entry| Arc::clone(&entry.slot))
                .collect()
        };
        fan_out(&slots, envelope)
    }

    /// Adds a connection to a group; returns the number of this join, or `None` when it was a
    /// member already.
    pub(crate) fn join(
        &self,
        id: &ConnectionId,
        group: &GroupName,
    ) -> Result<Option<u64>, Refused> {
        let mut table = self.table.write();
        let entry = table.entries.get_mut(id).ok_or(Refused::NotFound)?;
        if entry.groups.contains_key(group) {
            return Ok(None);
        }
        entry.joins += 1;
        let join = entry.joins;
        entry.groups.insert(group.clone(), join);
        table
            .groups
            .entry(group.clone())
            .or_default()
            .insert(id.clone());
        Ok(Some(join))
    }

    /// Marks the member of `group` that join number `join` made as counted by the node's
    /// topology, once that join's bind is done. Returns false when the count just added is not
    /// its to keep and must be taken back: the connection went or left the group while the
    /// bind was under way, or joined again and a later join's count is kept instead.
    pub(crate) fn counted(&self, id: &ConnectionId, group: &GroupName, join: u64) -> bool {
        let mut table = self.table.write();
        let Some(entry) = table.entries.get_mut(id) else {
            return false;
        };
        let counted = entry.groups.get(group) == Some(&join) && entry.counted.insert(group.clone());
        if counted && let (Some(presence), Some(user)) = (&self.presence, &entry.user) {
            presence.push(PresenceChange::Joined(
                group.clone(),
                user.clone(),
                id.clone(),
            ));
        }
        counted
    }

    /// Undoes join number `join` of `group`, whose bind failed: the membership goes, unless
    /// it is another join's by now (the connection left and joined again meanwhile) or
    /// counted.
    pub(crate) fn abandon(&self, id: &ConnectionId, group: &GroupName, join: u64) {
        let mut table = self.table.write();
        let Some(entry) = table.entries.get_mut(id) else {
            return;
        };
        if entry.groups.get(group) != Some(&join) || entry.counted.contains(group) {
            return;
        }
        entry.groups.remove(group);
        if let Some(members) = table.groups.get_mut(group) {
            members.remove(id);
            if members.is_empty() {
                table.groups.remove(group);
            }
        }
    }

    /// Hands a count of `group` that could not be taken off (its unbind failed) to the node's
    /// unbinding task, to be tried again.
    pub(crate) fn retry_removal(&self, group: GroupName) {
        self.departed.lock().push(group);
        self.departures.notify_one();
    }

    /// Removes a connection from a group; returns whether the node's topology counted it in
    /// the group (the count to take off). A member whose join is still binding is not counted
    /// yet: that join takes its own count back when it finds the member gone.
    pub(crate) fn leave(&self, id: &ConnectionId, group: &GroupName) -> Result<bool, Refused> {
        let mut table = self.table.write();
        let entry = table.entries.get_mut(id).ok_or(Refused::NotFound)?;
        let counted = entry.counted.remove(group);
        if counted {
            self.push_left(id, entry.user.as_ref(), [group]);
        }
        if entry.groups.remove(group).is_none() {
            return Ok(counted);
        }
        if let Some(members) = table.groups.get_mut(group) {
            members.remove(id);
            if members.is_empty() {
                table.groups.remove(group);
            }
        }
        Ok(counted)
    }

    /// Takes connection `id` out of every group it is a member of (its session moved).
    pub(crate) fn leave_all(&self, id: &ConnectionId) {
        let counted = {
            let mut table = self.table.write();
            let Some(entry) = table.entries.get_mut(id) else {
                return;
            };
            let groups = std::mem::take(&mut entry.groups);
            let counted = std::mem::take(&mut entry.counted);
            self.push_left(id, entry.user.as_ref(), &counted);
            for group in groups.keys() {
                if let Some(members) = table.groups.get_mut(group) {
                    members.remove(id);
                    if members.is_empty() {
                        table.groups.remove(group);
                    }
                }
            }
            counted
        };
        if !counted.is_empty() {
            self.departed.lock().extend(counted);
            self.departures.notify_one();
        }
    }

    /// The groups connection `id` is a member of.
    pub(crate) fn groups_of(&self, id: &ConnectionId) -> BTreeSet<GroupName> {
        self.table
            .read()
            .entries
            .get(id)
            .map(|entry| entry.groups.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The sessions of the connections here whose clients are connected.
    pub(crate) fn live_sessions(&self) -> Vec<hybrid_cluster_core::SessionId> {
        self.all_slots()
            .iter()
            .filter_map(|slot| {
                slot.with_session(|session| {
                    matches!(session.phase, Phase::Live).then_some(session.id)
                })
                .flatten()
            })
            .collect()
    }

    /// Queues every connection with a user as counted again in each group it is counted in
    /// (the presence store lost them); returns how many changes that made. Under the table's
    /// lock, so that a leave made meanwhile comes after.
    pub(crate) fn recount_presence(&self) -> usize {
        let Some(presence) = &self.presence else {
            return 0;
        };
        let table = self.table.write();
        let mut count = 0;
        for (id, entry) in &table.entries {
            let Some(user) = &entry.user else { continue };
            for group in &entry.counted {
                presence.push(PresenceChange::Recounted(
                    group.clone(),
                    user.clone(),
                    id.clone(),
                ));
                count += 1;
            }
        }
        count
    }

    /// The groups this node counts a connection with a user in (presence to keep alive).
    pub(crate) fn presence_groups(&self) -> Vec<GroupName> {
        let table = self.table.read();
        let groups: BTreeSet<&GroupName> = table
            .entries
            .values()
            .filter(|entry| entry.user.is_some())
            .flat_map(|entry| &entry.counted)
            .collect();
        groups.into_iter().cloned().collect()
    }

    /// The user connection `id` belongs to, if known.
    pub(crate) fn user_of(&self, id: &ConnectionId) -> Option<UserId> {
        self.table.read().entries.get(id)?.user.clone()
    }

    /// The connections of `user` on this node (parked sessions included).
    pub(crate) fn connections_of(&self, user: &UserId) -> Vec<ConnectionId> {
        self.table
            .read()
            .users
            .get(user)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Local members of a group.
    pub(crate) fn members(&self, group: &GroupName) -> usize {
        self.table.read().groups.get(group).map_or(0, HashSet::len)
    }

    /// Closes every inbox once its queued messages are out, each with the frame `frame`
    /// makes for it (one call per connection), so that different clients can be told
    /// different things (the nodes to reconnect to, when this one drains).
    pub(crate) fn close_all(&self, mut frame: impl FnMut() -> CloseFrame) {
        for slot in self.all_slots() {
            slot.close(frame());
        }
    }

    /// Every connection's inbox, taken out of the table's lock.
    fn all_slots(&self) -> Vec<Arc<InboxSlot>> {
        self.table
            .read()
            .entries
            .values()
            .map(|entry| Arc::clone(&entry.slot))
            .collect()
    }

    /// Waits until no connection is left.
    pub(crate) async fn wait_empty(&self) {
        loop {
            let notified = self.emptied.notified();
            if self.len() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl fmt::Debug for LocalConnections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalConnections")
            .field("connections", &self.len())
            .field("capacity", &self.capacity)
            .field("policy", &self.policy)
            .finish()
    }
}

/// What a message put in several inboxes came to.
#[derive(Debug, Default)]
pub(crate) struct FannedOut {
    /// The inboxes it was put in.
    pub(crate) count: usize,
    /// The connections with a session that have something to do with it (log it, wait for
    /// a resume, send it where the session went).
    pub(crate) sessions: Vec<(ConnectionId, Pushed)>,
}

/// Puts a message in each of `slots`.
fn fan_out(slots: &[Arc<InboxSlot>], envelope: &Arc<Envelope>) -> FannedOut {
    let mut out = FannedOut {
        count: slots.len(),
        sessions: Vec::new(),
    };
    for slot in slots {
        // A closing connection misses a broadcast or group message: nobody to tell.
        match slot.push(InboxItem::Message(Arc::clone(envelope))) {
            Ok(Pushed::Queued | Pushed::Duplicate) | Err(_) => {}
            Ok(pushed) => out.sessions.push((slot.id.clone(), pushed)),
        }
    }
    out
}
