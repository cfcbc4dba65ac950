//! One connection's inbox: what reaches its socket task, bounded by count and bytes under
//! the node's slow-client policy.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_core::Stream;
use hybrid_cluster_core::{ConnectionId, Envelope, MessageId};
use parking_lot::Mutex;

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
pub(super) struct InboxSlot {
    state: Mutex<InboxState>,
    capacity: usize,
    byte_bound: usize,
    policy: SlowClientPolicy,
    id: ConnectionId,
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
            }),
            capacity,
            byte_bound,
            policy,
            id,
            metrics,
            bounced,
        }
    }

    /// Queues a message by the slow-client policy. A closing connection refuses it (its
    /// caller tells the sender); messages the policy drops are bounced (their senders told).
    pub(super) fn push(&self, item: InboxItem) -> Result<(), Refused> {
        let waker = {
            let mut state = self.state.lock();
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
            state.queue.push_back(item);
            state.waker.take()
        };
        wake(waker);
        Ok(())
    }

    /// Whether an item of `size` bytes does not fit (an item alone always fits).
    fn over(&self, state: &InboxState, size: usize) -> bool {
        !state.queue.is_empty()
            && (state.queue.len() >= self.capacity || state.bytes + size > self.byte_bound)
    }

    /// The drop-oldest policy: makes room for an item of `size` bytes.
    fn drop_oldest(&self, state: &mut InboxState, size: usize) {
        while self.over(state, size) {
            let Some(oldest) = state.queue.pop_front() else {
                break;
            };
            state.bytes -= item_bytes(&oldest);
            bounce(&self.bounced, oldest);
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
        for dropped in state.queue.drain(..) {
            bounce(&self.bounced, dropped);
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

    /// What was queued and never handed out: the connection went.
    pub(super) fn take_queued(&self) -> VecDeque<InboxItem> {
        let mut state = self.state.lock();
        state.bytes = 0;
        std::mem::take(&mut state.queue)
    }

    /// Closes the inbox once its queued messages are handed out.
    pub(super) fn close(&self, frame: CloseFrame) {
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

/// Takes an item that will not reach its client: a unicast from a connection is kept for a
/// notice to its sender; anything else has no one to tell.
pub(super) fn bounce(bounced: &Bounced, item: InboxItem) {
    if let InboxItem::Message(envelope) = item {
        bounced.bounce_envelope(&envelope);
    }
}
