//! This node's connections: their bounded inboxes, their groups, and their count.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_core::Stream;
use hybrid_cluster_core::{ConnectionId, Envelope, GroupName, MessageId, Target};
use hybrid_cluster_discovery::ConnectionCounter;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::config::SlowClientPolicy;
use crate::metrics::Metrics;

/// What a connection's socket task gets from its [`Inbox`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum InboxItem {
    /// A message for this connection (sent to it, broadcast, or sent to one of its groups).
    Message(Arc<Envelope>),
    /// A message this connection sent to a connection on another node was not delivered: the
    /// target closed before it arrived (or belonged to an earlier run of its node).
    Undeliverable(Undeliverable),
    /// Close the WebSocket with this frame, then stop: the client was too slow for its
    /// policy, or the node is shutting down.
    Close(CloseFrame),
}

/// The notice of a message that reached its node but not its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undeliverable {
    /// The id the send returned.
    pub message_id: MessageId,
    /// The connection it was for.
    pub to: ConnectionId,
}

/// A WebSocket close frame to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseFrame {
    /// The close code (1001 going away, 1008 policy violation, 1012 service restart, 1013 try
    /// again later).
    pub code: u16,
    /// The reason, at most 123 bytes.
    pub reason: String,
}

/// Why a message could not be put in an inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No such connection here.
    NotFound,
    /// The connection is closing: nothing more reaches its client.
    Closing,
}

/// A unicast that reached this node and will not reach its connection: what its notice needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Bounce {
    /// The message not delivered.
    pub(crate) message_id: MessageId,
    /// The connection it was for.
    pub(crate) to: ConnectionId,
    /// The connection that sent it, to be told.
    pub(crate) sender: ConnectionId,
}

impl Bounce {
    /// What a notice about `envelope` needs, when it is a unicast from a connection.
    pub(crate) fn of(envelope: &Envelope) -> Option<Self> {
        match (&envelope.target, &envelope.sender) {
            (Target::Connection(to), Some(sender)) => Some(Self {
                message_id: envelope.id,
                to: to.clone(),
                sender: sender.clone(),
            }),
            _ => None,
        }
    }
}

/// Unicasts that reached this node and will not reach their connection (it closed, or is
/// closing, or its slow-client policy dropped them): their senders are told, by the node's
/// notice task. Only what a notice needs is kept (ids, not payloads); past
/// [`Bounced::CAPACITY`] waiting, the excess is counted and logged, not told.
pub(crate) struct Bounced {
    /// The bounces waiting, and how many were taken and are being told.
    waiting: Mutex<(VecDeque<Bounce>, usize)>,
    ready: Notify,
    told: Notify,
    overflowed: std::sync::atomic::AtomicBool,
    metrics: Metrics,
}

impl Bounced {
    const CAPACITY: usize = 65_536;

    fn new(metrics: Metrics) -> Self {
        Self {
            waiting: Mutex::new((VecDeque::new(), 0)),
            ready: Notify::new(),
            told: Notify::new(),
            overflowed: std::sync::atomic::AtomicBool::new(false),
            metrics,
        }
    }

    /// Takes an item that will not reach its client: a unicast from a connection is kept
    /// for a notice to its sender; anything else has no one to tell.
    pub(crate) fn bounce(&self, item: InboxItem) {
        if let InboxItem::Message(envelope) = item {
            self.bounce_envelope(&envelope);
        }
    }

    /// Takes a message that will not reach its client (see [`bounce`](Bounced::bounce)).
    pub(crate) fn bounce_envelope(&self, envelope: &Envelope) {
        let Some(bounce) = Bounce::of(envelope) else {
            return;
        };
        {
            let mut waiting = self.waiting.lock();
            if waiting.0.len() >= Self::CAPACITY {
                self.metrics.notice_dropped();
                if !self
                    .overflowed
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(
                        capacity = Self::CAPACITY,
                        "too many undeliverable notices waiting: some senders are not told"
                    );
                }
                return;
            }
            waiting.0.push_back(bounce);
        }
        self.ready.notify_one();
    }

    /// Takes the unicasts waiting for a notice, waiting for some when there are none; call
    /// [`told`](Bounced::told) once their notices are sent.
    pub(crate) async fn next(&self) -> Vec<Bounce> {
        loop {
            let notified = self.ready.notified();
            {
                let mut waiting = self.waiting.lock();
                if !waiting.0.is_empty() {
                    let taken: Vec<Bounce> = waiting.0.drain(..).collect();
                    waiting.1 = taken.len();
                    return taken;
                }
            }
            notified.await;
        }
    }

    /// The notices of the last [`next`](Bounced::next) were sent.
    pub(crate) fn told(&self) {
        self.waiting.lock().1 = 0;
        self.told.notify_waiters();
    }

    /// Waits until no notice waits or is being sent.
    pub(crate) async fn all_told(&self) {
        loop {
            let told = self.told.notified();
            {
                let waiting = self.waiting.lock();
                if waiting.0.is_empty() && waiting.1 == 0 {
                    return;
                }
            }
            told.await;
        }
    }
}

struct InboxState {
    queue: VecDeque<InboxItem>,
    /// The payload bytes queued.
    bytes: usize,
    close: Option<CloseFrame>,
    /// The close frame was handed out: the stream has ended.
    finished: bool,
    waker: Option<Waker>,
    dropped: u64,
}

/// The shared half of one inbox, held by the connection table.
pub(crate) struct InboxSlot {
    state: Mutex<InboxState>,
    capacity: usize,
    byte_bound: usize,
    policy: SlowClientPolicy,
    id: ConnectionId,
    metrics: Metrics,
    bounced: Arc<Bounced>,
}

impl InboxSlot {
    /// Queues a message by the slow-client policy. A closing connection refuses it (its
    /// caller tells the sender); messages the policy drops are bounced (their senders told).
    fn push(&self, item: InboxItem) -> Result<(), Refused> {
        let waker = {
            let mut state = self.state.lock();
            if state.close.is_some() || state.finished {
                self.metrics.dropped("connection_gone");
                return Err(Refused::Closing);
            }
            let size = item_bytes(&item);
            let over = |state: &InboxState| {
                !state.queue.is_empty()
                    && (state.queue.len() >= self.capacity || state.bytes + size > self.byte_bound)
            };
            if over(&state) {
                match self.policy {
                    SlowClientPolicy::DropOldest => {
                        while over(&state) {
                            let Some(oldest) = state.queue.pop_front() else {
                                break;
                            };
                            state.bytes -= item_bytes(&oldest);
                            self.bounced.bounce(oldest);
                            state.dropped += 1;
                            self.metrics.dropped("slow_client");
                        }
                        self.metrics.slow_client("drop_oldest");
                        if state.dropped == 1 {
                            tracing::warn!(
                                connection = %self.id,
                                capacity = self.capacity,
                                "slow client: its inbox is full, dropping its oldest messages"
                            );
                        }
                    }
                    SlowClientPolicy::Close { code } => {
                        state.bytes = 0;
                        for dropped in state.queue.drain(..) {
                            self.bounced.bounce(dropped);
                        }
                        state.close = Some(CloseFrame {
                            code,
                            reason: "too slow: inbox overflow".to_owned(),
                        });
                        self.metrics.dropped("slow_client");
                        self.metrics.slow_client("close");
                        tracing::warn!(
                            connection = %self.id,
                            capacity = self.capacity,
                            code,
                            "slow client: its inbox is full, closing it"
                        );
                        wake(state.waker.take());
                        // This one is refused too: its caller tells its sender.
                        return Err(Refused::Closing);
                    }
                }
            }
            state.bytes += size;
            state.queue.push_back(item);
            state.waker.take()
        };
        wake(waker);
        Ok(())
    }

    /// What was queued and never handed out: the connection went.
    fn take_queued(&self) -> VecDeque<InboxItem> {
        let mut state = self.state.lock();
        state.bytes = 0;
        std::mem::take(&mut state.queue)
    }

    /// Closes the inbox once its queued messages are handed out.
    fn close(&self, frame: CloseFrame) {
        let waker = {
            let mut state = self.state.lock();
            if state.close.is_none() && !state.finished {
                state.close = Some(frame);
            }
            state.waker.take()
        };
        wake(waker);
    }
}

/// What an item costs an inbox's byte bound: its payload.
fn item_bytes(item: &InboxItem) -> usize {
    match item {
        InboxItem::Message(envelope) => envelope.payload.len(),
        InboxItem::Undeliverable(_) | InboxItem::Close(_) => 0,
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// The messages for one connection, from anywhere in the cluster.
///
/// Bounded: when the socket task does not keep up, the node's
/// [`SlowClientPolicy`] applies (drop the oldest, or close the connection). The stream ends
/// after an [`InboxItem::Close`]. Dropping the inbox removes the connection from the node
/// (it leaves its groups, and its count goes down).
pub struct Inbox {
    slot: Arc<InboxSlot>,
    _registration: Registration,
}

impl Inbox {
    /// The connection this inbox belongs to.
    pub fn connection_id(&self) -> &ConnectionId {
        &self.slot.id
    }

    /// Messages dropped from this inbox under the drop-oldest policy.
    pub fn dropped(&self) -> u64 {
        self.slot.state.lock().dropped
    }
}

impl fmt::Debug for Inbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.slot.state.lock();
        f.debug_struct("Inbox")
            .field("connection", &self.slot.id)
            .field("queued", &state.queue.len())
            .field("capacity", &self.slot.capacity)
            .field("dropped", &state.dropped)
            .finish()
    }
}

impl Stream for Inbox {
    type Item = InboxItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<InboxItem>> {
        let mut state = self.slot.state.lock();
        if state.finished {
            return Poll::Ready(None);
        }
        if let Some(item) = state.queue.pop_front() {
            state.bytes -= item_bytes(&item);
            return Poll::Ready(Some(item));
        }
        if let Some(frame) = state.close.take() {
            state.finished = true;
            return Poll::Ready(Some(InboxItem::Close(frame)));
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Removes its connection from the table when dropped.
struct Registration {
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
    groups: BTreeSet<GroupName>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<ConnectionId, Entry>,
    groups: HashMap<GroupName, HashSet<ConnectionId>>,
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
        }
    }

    /// Bounds every inbox to `bytes` of payload too (a message alone in an inbox is taken
    /// whatever its size).
    pub(crate) fn with_byte_bound(mut self, bytes: usize) -> Self {
        self.byte_bound = bytes.max(1);
        self
    }

    /// Adds a connection and returns its inbox.
    pub(crate) fn register(self: &Arc<Self>, id: ConnectionId) -> Inbox {
        let slot = Arc::new(InboxSlot {
            state: Mutex::new(InboxState {
                queue: VecDeque::new(),
                bytes: 0,
                close: None,
                finished: false,
                waker: None,
                dropped: 0,
            }),
            capacity: self.capacity,
            byte_bound: self.byte_bound,
            policy: self.policy,
            id: id.clone(),
            metrics: self.metrics.clone(),
            bounced: Arc::clone(&self.bounced),
        });
        let count = {
            let mut table = self.table.write();
            table.entries.insert(
                id.clone(),
                Entry {
                    slot: Arc::clone(&slot),
                    groups: BTreeSet::new(),
                },
            );
            table.entries.len()
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

    fn deregister(&self, id: &ConnectionId) {
        let (left, count) = {
            let mut table = self.table.write();
            let Some(entry) = table.entries.remove(id) else {
                return;
            };
            for group in &entry.groups {
                if let Some(members) = table.groups.get_mut(group) {
                    members.remove(id);
                    if members.is_empty() {
                        table.groups.remove(group);
                    }
                }
            }
            (entry, table.entries.len())
        };
        // Messages the socket task never took: their senders are told.
        for item in left.slot.take_queued() {
            self.metrics.dropped("connection_gone");
            self.bounced.bounce(item);
        }
        let left = left.groups;
        self.counter.decrement();
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

    pub(crate) fn len(&self) -> usize {
        self.table.read().entries.len()
    }

    pub(crate) fn contains(&self, id: &ConnectionId) -> bool {
        self.table.read().entries.contains_key(id)
    }

    /// Puts a message or a notice in one connection's inbox.
    pub(crate) fn deliver_to(&self, id: &ConnectionId, item: InboxItem) -> Result<(), Refused> {
        let slot = self
            .table
            .read()
            .entries
            .get(id)
            .map(|entry| Arc::clone(&entry.slot))
            .ok_or(Refused::NotFound)?;
        slot.push(item)
    }

    /// Puts a message in every connection's inbox; returns how many.
    pub(crate) fn deliver_all(&self, envelope: &Arc<Envelope>) -> usize {
        let slots: Vec<Arc<InboxSlot>> = self
            .table
            .read()
            .entries
            .values()
            .map(|entry| Arc::clone(&entry.slot))
            .collect();
        // A closing connection misses a broadcast or group message: nobody to tell.
        for slot in &slots {
            let _ = slot.push(InboxItem::Message(Arc::clone(envelope)));
        }
        slots.len()
    }

    /// Puts a message in the inbox of every local member of `group`; returns how many.
    pub(crate) fn deliver_group(&self, group: &GroupName, envelope: &Arc<Envelope>) -> usize {
        let slots: Vec<Arc<InboxSlot>> = {
            let table = self.table.read();
            let Some(members) = table.groups.get(group) else {
                return 0;
            };
            members
                .iter()
                .filter_map(|id| table.entries.get(id))
                .map(|entry| Arc::clone(&entry.slot))
                .collect()
        };
        // A closing connection misses a broadcast or group message: nobody to tell.
        for slot in &slots {
            let _ = slot.push(InboxItem::Message(Arc::clone(envelope)));
        }
        slots.len()
    }

    /// Adds a connection to a group; returns whether it was not a member yet.
    pub(crate) fn join(&self, id: &ConnectionId, group: &GroupName) -> Result<bool, Refused> {
        let mut table = self.table.write();
        let entry = table.entries.get_mut(id).ok_or(Refused::NotFound)?;
        if !entry.groups.insert(group.clone()) {
            return Ok(false);
        }
        table
            .groups
            .entry(group.clone())
            .or_default()
            .insert(id.clone());
        Ok(true)
    }

    /// Removes a connection from a group; returns whether it was a member.
    pub(crate) fn leave(&self, id: &ConnectionId, group: &GroupName) -> Result<bool, Refused> {
        let mut table = self.table.write();
        let entry = table.entries.get_mut(id).ok_or(Refused::NotFound)?;
        if !entry.groups.remove(group) {
            return Ok(false);
        }
        if let Some(members) = table.groups.get_mut(group) {
            members.remove(id);
            if members.is_empty() {
                table.groups.remove(group);
            }
        }
        Ok(true)
    }

    /// Local members of a group.
    pub(crate) fn members(&self, group: &GroupName) -> usize {
        self.table.read().groups.get(group).map_or(0, HashSet::len)
    }

    /// Closes every inbox with `frame` once its queued messages are out.
    pub(crate) fn close_all(&self, frame: &CloseFrame) {
        let slots: Vec<Arc<InboxSlot>> = self
            .table
            .read()
            .entries
            .values()
            .map(|entry| Arc::clone(&entry.slot))
            .collect();
        for slot in slots {
            slot.close(frame.clone());
        }
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

#[cfg(test)]
mod tests {
    use futures_util::{FutureExt, StreamExt};
    use hybrid_cluster_core::{Incarnation, NodeId, Target};

    use super::*;

    fn id(n: u64) -> ConnectionId {
        ConnectionId::new(NodeId::new("a").unwrap(), Incarnation::from_u64(1), n)
    }

    fn message(text: &str) -> Arc<Envelope> {
        Arc::new(Envelope::text(
            NodeId::new("a").unwrap(),
            Target::Broadcast,
            text,
        ))
    }

    fn next_text(inbox: &mut Inbox) -> Option<String> {
        match inbox.next().now_or_never()?? {
            InboxItem::Message(envelope) => envelope.payload_text().map(str::to_owned),
            InboxItem::Close(frame) => Some(format!("close {}", frame.code)),
            InboxItem::Undeliverable(notice) => Some(format!("undeliverable {}", notice.to)),
        }
    }

    #[test]
    fn registration_counts_and_dropping_the_inbox_deregisters() {
        let counter = ConnectionCounter::new();
        let table = Arc::new(LocalConnections::new(
            counter.clone(),
            8,
            SlowClientPolicy::DropOldest,
            Metrics::new("a"),
        ));
        let inbox = table.register(id(1));
        let _other = table.register(id(2));
        assert_eq!((table.len(), counter.get()), (2, 2));
        let group = GroupName::new("g").unwrap();
        assert_eq!(table.join(&id(1), &group), Ok(true));
        assert_eq!(table.join(&id(1), &group), Ok(false));
        drop(inbox);
        assert_eq!((table.len(), counter.get()), (1, 1));
        assert_eq!(table.members(&group), 0);
        assert_eq!(std::mem::take(&mut *table.departed.lock()), vec![group]);
        assert_eq!(
            table.deliver_to(&id(1), InboxItem::Message(message("x"))),
            Err(Refused::NotFound)
        );
    }

    #[test]
    fn drop_oldest_keeps_the_newest_within_the_bound() {
        let table = Arc::new(LocalConnections::new(
            ConnectionCounter::new(),
            2,
            SlowClientPolicy::DropOldest,
            Metrics::new("a"),
        ));
        let mut inbox = table.register(id(1));
        for text in ["1", "2", "3", "4"] {
            table
                .deliver_to(&id(1), InboxItem::Message(message(text)))
                .unwrap();
        }
        assert_eq!(next_text(&mut inbox).as_deref(), Some("3"));
        assert_eq!(next_text(&mut inbox).as_deref(), Some("4"));
        assert_eq!(next_text(&mut inbox), None);
        assert_eq!(inbox.dropped(), 2);
    }

    #[test]
    fn inboxes_are_bounded_in_bytes_too() {
        let table = Arc::new(
            LocalConnections::new(
                ConnectionCounter::new(),
                100,
                SlowClientPolicy::DropOldest,
                Metrics::new("a"),
            )
            .with_byte_bound(10),
        );
        let mut inbox = table.register(id(1));
        for text in ["aaaa", "bbbb", "cccc"] {
            table
                .deliver_to(&id(1), InboxItem::Message(message(text)))
                .unwrap();
        }
        // 12 bytes do not fit in 10: the oldest went.
        assert_eq!(inbox.dropped(), 1);
        assert_eq!(next_text(&mut inbox).as_deref(), Some("bbbb"));
        assert_eq!(next_text(&mut inbox).as_deref(), Some("cccc"));
        // A message larger than the bound, alone, is still taken.
        let big = "x".repeat(64);
        table
            .deliver_to(&id(1), InboxItem::Message(message(&big)))
            .unwrap();
        assert_eq!(next_text(&mut inbox).as_deref(), Some(big.as_str()));

        let closing = Arc::new(
            LocalConnections::new(
                ConnectionCounter::new(),
                100,
                SlowClientPolicy::CLOSE_TRY_AGAIN_LATER,
                Metrics::new("a"),
            )
            .with_byte_bound(10),
        );
        let mut inbox = closing.register(id(2));
        for text in ["aaaa", "bbbb"] {
            closing
                .deliver_to(&id(2), InboxItem::Message(message(text)))
                .unwrap();
        }
        assert_eq!(
            closing.deliver_to(&id(2), InboxItem::Message(message("cccc"))),
            Err(Refused::Closing)
        );
        assert_eq!(next_text(&mut inbox).as_deref(), Some("close 1013"));
    }

    #[test]
    fn close_policy_closes_the_slow_connection_at_once() {
        let table = Arc::new(LocalConnections::new(
            ConnectionCounter::new(),
            2,
            SlowClientPolicy::Close { code: 1013 },
            Metrics::new("a"),
        ));
        let mut inbox = table.register(id(1));
        for text in ["1", "2"] {
            table
                .deliver_to(&id(1), InboxItem::Message(message(text)))
                .unwrap();
        }
        // The one over the bound closes the connection and is refused, as is every one after
        // it: their callers tell their senders.
        for text in ["3", "4"] {
            assert_eq!(
                table.deliver_to(&id(1), InboxItem::Message(message(text))),
                Err(Refused::Closing)
            );
        }
        assert_eq!(next_text(&mut inbox).as_deref(), Some("close 1013"));
        assert!(
            matches!(inbox.next().now_or_never(), Some(None)),
            "the stream ends after the close"
        );
    }

    /// A unicast from a connection, as received from anywhere, and its id.
    fn unicast(to: u64, from: u64) -> (InboxItem, MessageId) {
        let mut envelope =
            Envelope::text(NodeId::new("a").unwrap(), Target::Connection(id(to)), "x");
        envelope.sender = Some(id(from));
        let message_id = envelope.id;
        (InboxItem::Message(Arc::new(envelope)), message_id)
    }

    fn bounced_ids(table: &LocalConnections) -> Vec<MessageId> {
        let waiting = table.bounced.waiting.lock();
        waiting.0.iter().map(|bounce| bounce.message_id).collect()
    }

    #[test]
    fn unicasts_that_will_not_reach_their_client_are_bounced_for_a_notice() {
        let table = Arc::new(LocalConnections::new(
            ConnectionCounter::new(),
            2,
            SlowClientPolicy::Close { code: 1013 },
            Metrics::new("a"),
        ));
        let inbox = table.register(id(1));
        let (kept, kept_id) = unicast(1, 9);
        table.deliver_to(&id(1), kept).unwrap();
        table.deliver_all(&message("broadcast"));
        // Over capacity: the close drops what was queued, unicasts bounced (not broadcasts);
        // the one over the bound is refused, for its caller to tell.
        let (over, _) = unicast(1, 9);
        assert_eq!(table.deliver_to(&id(1), over), Err(Refused::Closing));
        assert_eq!(bounced_ids(&table), [kept_id]);

        // A connection that goes with messages still queued: they are bounced too.
        let other = table.register(id(2));
        let (never_read, never_read_id) = unicast(2, 9);
        table.deliver_to(&id(2), never_read).unwrap();
        drop(other);
        assert_eq!(bounced_ids(&table), [kept_id, never_read_id]);
        drop(inbox);
    }

    #[test]
    fn shutdown_close_comes_after_the_queued_messages() {
        let table = Arc::new(LocalConnections::new(
            ConnectionCounter::new(),
            8,
            SlowClientPolicy::DropOldest,
            Metrics::new("a"),
        ));
        let mut inbox = table.register(id(1));
        table.deliver_all(&message("last words"));
        table.close_all(&CloseFrame {
            code: 1012,
            reason: "{}".to_owned(),
        });
        assert_eq!(next_text(&mut inbox).as_deref(), Some("last words"));
        assert_eq!(next_text(&mut inbox).as_deref(), Some("close 1012"));
    }

    #[test]
    fn groups_reach_only_their_members() {
        let table = Arc::new(LocalConnections::new(
            ConnectionCounter::new(),
            8,
            SlowClientPolicy::DropOldest,
            Metrics::new("a"),
        ));
        let mut a = table.register(id(1));
        let mut b = table.register(id(2));
        let group = GroupName::new("g").unwrap();
        table.join(&id(2), &group).unwrap();
        assert_eq!(table.deliver_group(&group, &message("members")), 1);
        assert_eq!(next_text(&mut a), None);
        assert_eq!(next_text(&mut b).as_deref(), Some("members"));
        assert_eq!(table.leave(&id(2), &group), Ok(true));
        assert_eq!(table.deliver_group(&group, &message("nobody")), 0);
    }
}
