//! One connection's inbox: what reaches its socket task, bounded by count and bytes under
//! the node's slow-client policy.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_core::Stream;
use hybrid_cluster_core::{ConnectionId, Envelope, MessageId, SessionId};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::Registration;
use super::bounced::Bounced;
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

/// What became of a message put in an inbox.
#[derive(Debug)]
pub(crate) enum Pushed {
    /// Queued for the socket task (a connection without a session).
    Queued,
    /// Numbered in the connection's session (and queued, unless the client is away), to be
    /// logged: `waiting` says once it is (or sent on, when the session moved). When `flush`
    /// names the session, the caller starts its flusher (see [`InboxSlot::take_pending`]).
    Numbered {
        waiting: oneshot::Receiver<()>,
        flush: Option<SessionId>,
    },
    /// The session holds it already (it came twice), or it is a notice for a client away:
    /// nothing to do.
    Duplicate,
    /// The session is being resumed: the message waits for the resume to number it, which
    /// says on this channel once it is kept.
    Held(oneshot::Receiver<()>),
}

/// Where a connection's session is in its life, on this node.
#[derive(Debug)]
pub(crate) enum Phase {
    /// Being resumed: messages wait in `held` until the missed ones are queued.
    Resuming {
        held: Vec<(InboxItem, oneshot::Sender<()>)>,
    },
    /// Its client is connected: messages are numbered and queued.
    Live,
    /// Its client is away: messages are numbered and only logged, until it resumes (here or
    /// elsewhere) or the resume window passes.
    Parked,
    /// Resumed as another connection: messages go there.
    Moved(ConnectionId),
}

/// The session of a connection, as its inbox keeps it.
#[derive(Debug)]
pub(crate) struct SlotSession {
    pub(crate) id: SessionId,
    /// The `seq` given last.
    pub(crate) seq: u64,
    /// The `seq` up to which every message is in the session's log: the inbox hands out no
    /// numbered message past it, so that a client never has a message its log could lose.
    pub(crate) logged: u64,
    pub(crate) phase: Phase,
    /// The ids of the messages numbered lately, oldest first, to drop one that comes twice
    /// (a message forwarded from the session's former node that reached this node too).
    recent: VecDeque<MessageId>,
    /// The same ids, to look one up without a scan on every message.
    recent_set: HashSet<MessageId>,
    /// Numbered, not logged yet, in `seq` order, each with whom to tell once it is.
    pending: Vec<PendingLog>,
    /// A flusher is logging `pending`.
    flushing: bool,
}

/// A message numbered in a session and waiting to be logged: its `seq`, itself, and whom to
/// tell once it is.
pub(crate) type PendingLog = (u64, Arc<Envelope>, oneshot::Sender<()>);

/// How many message ids a session remembers to drop duplicates.
const RECENT_IDS: usize = 4096;

impl SlotSession {
    pub(crate) fn new(id: SessionId, seq: u64, phase: Phase) -> Self {
        Self {
            id,
            seq,
            logged: seq,
            phase,
            recent: VecDeque::new(),
            recent_set: HashSet::new(),
            pending: Vec::new(),
            flushing: false,
        }
    }

    /// Numbers `envelope` (the next `seq`) for its log.
    fn number(&mut self, envelope: &Arc<Envelope>) -> Pushed {
        self.seq += 1;
        let (done, waiting) = oneshot::channel();
        self.pending.push((self.seq, Arc::clone(envelope), done));
        let flush = (!self.flushing).then_some(self.id);
        self.flushing = true;
        Pushed::Numbered { waiting, flush }
    }

    /// Remembers `id`; false when it was remembered already.
    pub(crate) fn first_time(&mut self, id: MessageId) -> bool {
        if !self.recent_set.insert(id) {
            return false;
        }
        if self.recent.len() == RECENT_IDS
            && let Some(oldest) = self.recent.pop_front()
        {
            self.recent_set.remove(&oldest);
        }
        self.recent.push_back(id);
        true
    }
}

struct InboxState {
    /// Each item with its `seq`, for a message of a session.
    queue: VecDeque<(InboxItem, Option<u64>)>,
    /// The payload bytes queued.
    bytes: usize,
    close: Option<CloseFrame>,
    /// The close frame was handed out: the stream has ended.
    finished: bool,
    waker: Option<Waker>,
    dropped: u64,
    session: Option<SlotSession>,
    /// The `seq` of the message handed out last.
    last_seq: Option<u64>,
}

/// The shared half of one inbox, held by the connection table.
pub(crate) struct InboxSlot {
    state: Mutex<InboxState>,
    capacity: usize,
    byte_bound: usize,
    policy: SlowClientPolicy,
    pub(crate) id: ConnectionId,
    metrics: Metrics,
    bounced: Arc<Bounced>,
}

impl InboxSlot {
    /// The empty inbox of connection `id`, bounded to `(count, bytes)` under `policy`.
    pub(super) fn new(
        id: ConnectionId,
        (capacity, byte_bound): (usize, usize),
        policy: SlowClientPolicy,
        metrics: Metrics,
        bounced: Arc<Bounced>,
    ) -> Self {
        Self {
            state: Mutex::new(InboxState {
                queue: VecDeque::new(),
                bytes: 0,
                close: None,
                finished: false,
                waker: None,
                dropped: 0,
                session: None,
                last_seq: None,
            }),
            capacity,
            byte_bound,
            policy,
            id,
            metrics,
            bounced,
        }
    }

    /// Takes up to `max` messages of the session waiting to be logged, oldest first; `None`
    /// (and the flusher is done) when there are none.
    pub(crate) fn take_pending(&self, max: usize) -> Option<Vec<PendingLog>> {
        let mut state = self.state.lock();
        let session = state.session.as_mut()?;
        if session.pending.is_empty() {
            session.flushing = false;
            return None;
        }
        let n = session.pending.len().min(max);
        Some(session.pending.drain(..n).collect())
    }

    /// Records that the session's messages up to `seq` are logged (or given up): they may be
    /// handed out.
    pub(crate) fn mark_logged(&self, seq: u64) {
        let waker = {
            let mut state = self.state.lock();
            if let Some(session) = &mut state.session {
                session.logged = session.logged.max(seq);
            }
            state.waker.take()
        };
        wake(waker);
    }

    /// Queues a message by the slow-client policy. A closing connection refuses it (its
    /// caller tells the sender); messages the policy drops are bounced (their senders told).
    pub(crate) fn push(&self, item: InboxItem) -> Result<Pushed, Refused> {
        let mut state = self.state.lock();
        let numbered = match session_step(&mut state, &item) {
            Step::Plain => None,
            Step::Number(pushed, seq) => Some((pushed, seq)),
            Step::Answer(pushed) => return Ok(pushed),
            Step::Hold => {
                let (kept, waiting) = oneshot::channel();
                if let Some(SlotSession {
                    phase: Phase::Resuming { held },
                    ..
                }) = &mut state.session
                {
                    held.push((item, kept));
                }
                return Ok(Pushed::Held(waiting));
            }
        };
        match numbered {
            None => self.queue(state, item, None).map(|()| Pushed::Queued),
            Some((pushed, seq)) => {
                // Numbered, it is logged whether or not it can be queued.
                let _ = self.queue(state, item, Some(seq));
                Ok(pushed)
            }
        }
    }

    /// Queues an item (with its `seq`, if numbered) by the slow-client policy.
    fn queue(
        &self,
        mut state: parking_lot::MutexGuard<'_, InboxState>,
        item: InboxItem,
        seq: Option<u64>,
    ) -> Result<(), Refused> {
        let waker = {
            if state.close.is_some() || state.finished {
                self.metrics.dropped("connection_gone");
                return Err(Refused::Closing);
            }
            let size = item_bytes(&item);
            if self.over(&state, size) {
                match self.policy {
                    SlowClientPolicy::DropOldest => self.drop_oldest(&mut state, size),
                    SlowClientPolicy::Close { code } => {
                        self.close_slow(&mut state, code);
                        // This one is refused too: its caller tells its sender.
                        return Err(Refused::Closing);
                    }
                }
            }
            state.bytes += size;
            state.queue.push_back((item, seq));
            state.waker.take()
        };
        drop(state);
        wake(waker);
        Ok(())
    }

    /// Whether an item of `size` bytes does not fit (an item alone always fits).
    fn over(&self, state: &InboxState, size: usize) -> bool {
        // Messages of a session waiting for its log are not the client's to take yet: they do
        // not count against it (the receiver's prefetch and each sender's bound on open
        // requests bound them).
        let waiting_for_log = state.session.as_ref().map_or(0, |session| {
            usize::try_from(session.seq.saturating_sub(session.logged)).unwrap_or(usize::MAX)
        });
        let queued = state.queue.len().saturating_sub(waiting_for_log);
        !state.queue.is_empty() && (queued >= self.capacity || state.bytes + size > self.byte_bound)
    }

    /// The drop-oldest policy: makes room for an item of `size` bytes.
    fn drop_oldest(&self, state: &mut InboxState, size: usize) {
        while self.over(state, size) {
            let Some((oldest, seq)) = state.queue.pop_front() else {
                break;
            };
            state.bytes -= item_bytes(&oldest);
            // A message of a session stays in its log: the client gets it when it resumes.
            if seq.is_none() {
                bounce(&self.bounced, oldest);
            }
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

    /// The close policy: drops what is queued (bouncing it) and closes with `code`.
    fn close_slow(&self, state: &mut InboxState, code: u16) {
        state.bytes = 0;
        for (dropped, seq) in state.queue.drain(..) {
            if seq.is_none() {
                bounce(&self.bounced, dropped);
            }
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
    }

    /// What was queued and never handed out, but what a session's log keeps: the
    /// connection went.
    pub(super) fn take_queued(&self) -> Vec<InboxItem> {
        let mut state = self.state.lock();
        state.bytes = 0;
        std::mem::take(&mut state.queue)
            .into_iter()
            .filter(|(_, seq)| seq.is_none())
            .map(|(item, _)| item)
            .collect()
    }

    /// Gives the connection a session, numbered on from `seq`, in `phase`.
    pub(crate) fn start_session(&self, session: SlotSession) {
        self.state.lock().session = Some(session);
    }

    /// Where the connection's session moved, if it did.
    pub(crate) fn moved_to(&self) -> Option<ConnectionId> {
        match &self.state.lock().session {
            Some(SlotSession {
                phase: Phase::Moved(to),
                ..
            }) => Some(to.clone()),
            _ => None,
        }
    }

    /// Takes the connection's session away (it ended).
    pub(crate) fn take_session(&self) -> Option<SlotSession> {
        self.state.lock().session.take()
    }

    /// Runs `f` on the connection's session, if it has one.
    pub(crate) fn with_session<T>(&self, f: impl FnOnce(&mut SlotSession) -> T) -> Option<T> {
        self.state.lock().session.as_mut().map(f)
    }

    /// Queues messages of a session with their `seq` (those missed, when it resumes), past
    /// the slow-client bound if need be: the client asked for them.
    pub(crate) fn queue_numbered(&self, items: Vec<(InboxItem, u64)>) {
        let waker = {
            let mut state = self.state.lock();
            for (item, seq) in items {
                state.bytes += item_bytes(&item);
                state.queue.push_back((item, Some(seq)));
            }
            state.waker.take()
        };
        wake(waker);
    }

    /// Whether the connection's client is away and its session kept: parked here, or moved
    /// (its old id still leads there).
    pub(crate) fn parked(&self) -> bool {
        matches!(
            self.state.lock().session,
            Some(SlotSession {
                phase: Phase::Parked | Phase::Moved(_),
                ..
            })
        )
    }

    /// Parks the connection's session when its socket task is done (a moved one stays, for
    /// its old id): returns whether it is kept.
    pub(super) fn park(&self) -> bool {
        let mut state = self.state.lock();
        let parked = match &mut state.session {
            Some(session) if matches!(session.phase, Phase::Live) => {
                session.phase = Phase::Parked;
                true
            }
            Some(session) => matches!(session.phase, Phase::Moved(_)),
            None => false,
        };
        if parked {
            state.queue.clear();
            state.bytes = 0;
        }
        parked
    }

    /// Closes the inbox once its queued messages are handed out.
    pub(crate) fn close(&self, frame: CloseFrame) {
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
/// What a push does for the session of the inbox, if it has one.
enum Step {
    /// No session: queue it.
    Plain,
    /// Numbered (this `seq`) for its log: queue it too.
    Number(Pushed, u64),
    /// Hold it until the resume is done.
    Hold,
    /// Nothing to queue (numbered for its log while the client is away, or a duplicate):
    /// answer this.
    Answer(Pushed),
}

fn session_step(state: &mut InboxState, item: &InboxItem) -> Step {
    // A connection closing keeps numbering its session's messages: they stay in its log.
    let closing = state.close.is_some() || state.finished;
    let Some(session) = &mut state.session else {
        return Step::Plain;
    };
    let InboxItem::Message(envelope) = item else {
        // A notice for a client away has no one to read it.
        return match session.phase {
            Phase::Parked | Phase::Moved(_) => Step::Answer(Pushed::Duplicate),
            Phase::Live | Phase::Resuming { .. } => Step::Plain,
        };
    };
    match &session.phase {
        Phase::Resuming { .. } => return Step::Hold,
        // A moved session's messages are numbered too, to be sent on in that order.
        Phase::Live | Phase::Parked | Phase::Moved(_) => {}
    }
    if !session.first_time(envelope.id) {
        return Step::Answer(Pushed::Duplicate);
    }
    let pushed = session.number(envelope);
    if closing || matches!(session.phase, Phase::Parked | Phase::Moved(_)) {
        Step::Answer(pushed)
    } else {
        Step::Number(pushed, session.seq)
    }
}

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
    pub(super) slot: Arc<InboxSlot>,
    pub(super) _registration: Registration,
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

    /// The `seq` of the message this inbox handed out last, when the connection has a session
    /// (see [`ClusterConnection::open_session`](crate::ClusterConnection::open_session)): the
    /// number its client says it has when it resumes.
    pub fn last_seq(&self) -> Option<u64> {
        self.slot.state.lock().last_seq
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
        let unlogged = match (state.queue.front(), &state.session) {
            (Some((_, Some(seq))), Some(session)) => *seq > session.logged,
            _ => false,
        };
        if unlogged {
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if let Some((item, seq)) = state.queue.pop_front() {
            state.bytes -= item_bytes(&item);
            if seq.is_some() {
                state.last_seq = seq;
            }
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

/// Takes an item that will not reach its client: a unicast from a connection is kept for a
/// notice to its sender; anything else has no one to tell.
pub(super) fn bounce(bounced: &Bounced, item: InboxItem) {
    if let InboxItem::Message(envelope) = item {
        bounced.bounce_envelope(&envelope);
    }
}
