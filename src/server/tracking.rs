//! What one connection's requests keep track of: the correlation ids of its latest unicasts,
//! and its joins and leaves under way.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hybrid_cluster_core::MessageId;
use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Requests of one kind under way, and a wait for none to be.
#[derive(Default)]
pub(super) struct InFlight {
    count: AtomicUsize,
    done: Notify,
}

impl InFlight {
    /// Counts one in until the guard is dropped.
    pub(super) fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(Arc::clone(self))
    }

    /// Waits until none is under way.
    pub(super) async fn idle(&self) {
        loop {
            let done = self.done.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    }
}

pub(super) struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.done.notify_waiters();
    }
}

/// The correlation ids of a connection's latest unicasts, by message id, so that a notice of
/// a message not delivered can name the request it answers.
///
/// Bounded by time and by count: an id is kept for [`SentIds::WINDOW`] (a notice comes once
/// the message reached its node, long before that unless the node was away), and only the
/// latest [`SentIds::CAPACITY`]; memory given back when a burst is over. A notice that comes
/// later is still sent, naming the message but no request id.
#[derive(Default)]
pub(super) struct SentIds(VecDeque<(Instant, MessageId, Box<RawValue>)>);

impl SentIds {
    const CAPACITY: usize = 1024;
    const WINDOW: Duration = Duration::from_secs(60);

    pub(super) fn remember(&mut self, message_id: MessageId, id: Box<RawValue>) {
        let now = Instant::now();
        while let Some((sent, ..)) = self.0.front() {
            if self.0.len() < Self::CAPACITY && now.duration_since(*sent) < Self::WINDOW {
                break;
            }
            self.0.pop_front();
        }
        if self.0.capacity() > 64 && self.0.len() < self.0.capacity() / 4 {
            self.0.shrink_to(self.0.len() * 2);
        }
        self.0.push_back((now, message_id, id));
    }

    pub(super) fn client_id(&self, message_id: MessageId) -> Option<Box<RawValue>> {
        self.0
            .iter()
            .rev()
            .find(|(_, sent_id, _)| *sent_id == message_id)
            .map(|(.., id)| id.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sent_ids_are_forgotten_after_their_window_and_past_their_count() {
        let id = |n: u32| RawValue::from_string(n.to_string()).unwrap();
        let mut sent = SentIds::default();
        let first = MessageId::random();
        sent.remember(first, id(1));
        assert_eq!(sent.client_id(first).unwrap().get(), "1");
        tokio::time::advance(SentIds::WINDOW).await;
        let second = MessageId::random();
        sent.remember(second, id(2));
        assert!(sent.client_id(first).is_none(), "past its window");
        assert_eq!(sent.client_id(second).unwrap().get(), "2");
        for n in 0..SentIds::CAPACITY as u32 {
            sent.remember(MessageId::random(), id(n));
        }
        assert_eq!(sent.0.len(), SentIds::CAPACITY);
        assert!(sent.client_id(second).is_none(), "past the count");
        // A burst over, its memory goes back.
        tokio::time::advance(SentIds::WINDOW).await;
        sent.remember(MessageId::random(), id(0));
        assert_eq!(sent.0.len(), 1);
        assert!(sent.0.capacity() < SentIds::CAPACITY);
    }
}
