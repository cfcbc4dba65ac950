//! The memory of recently handled message ids, bounded by time and by bytes.
//!
//! Without a cluster secret, a message is a duplicate when a message with its id was handled
//! within the last `window` (a publisher's resend after a reconnect, a redelivery after a
//! consumer's reconnect, a caller's retry). The ids are forgotten once older than the window,
//! or, past the memory bound, oldest first: then the window is shorter than asked, which a
//! warning says once, and a duplicate arriving later than the shortened window is handed
//! over again.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use hybrid_cluster_core::MessageId;
use tokio::time::Instant;

/// Bytes one remembered id costs, about: its place in the order queue and in the set, with
/// their spare capacity.
pub(crate) const BYTES_PER_ID: usize = 64;

/// Message ids handled within the last `window`, at most `max_ids` of them.
#[derive(Debug)]
pub(super) struct RecentIds {
    window: Duration,
    max_ids: usize,
    order: VecDeque<(Instant, MessageId)>,
    seen: HashSet<MessageId>,
}

impl RecentIds {
    /// Remembers ids for `window`, within about `memory` bytes; a zero window or memory turns
    /// duplicate suppression off.
    pub(super) fn new(window: Duration, memory: usize) -> Self {
        Self {
            window,
            max_ids: memory / BYTES_PER_ID,
            order: VecDeque::new(),
            seen: HashSet::new(),
        }
    }

    pub(super) fn contains(&self, id: &MessageId) -> bool {
        self.seen.contains(id)
    }

    /// Remembers `id`, handled `now`, forgetting what fell out of the window. Returns whether
    /// the memory bound made it forget an id still inside the window.
    pub(super) fn insert(&mut self, id: MessageId, now: Instant) -> bool {
        if self.max_ids == 0 || self.window.is_zero() {
            return false;
        }
        while let Some(&(handled, oldest)) = self.order.front() {
            if now.duration_since(handled) < self.window {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&oldest);
        }
        if !self.seen.insert(id) {
            return false;
        }
        self.order.push_back((now, id));
        let mut shortened = false;
        while self.order.len() > self.max_ids {
            if let Some((_, oldest)) = self.order.pop_front() {
                self.seen.remove(&oldest);
                shortened = true;
            }
        }
        shortened
    }

    pub(super) fn len(&self) -> usize {
        self.order.len()
    }

    /// How long ago the oldest id remembered was handled: the window in force now.
    pub(super) fn span(&self, now: Instant) -> Duration {
        self.order
            .front()
            .map_or(Duration::ZERO, |&(handled, _)| now.duration_since(handled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn remembers_within_the_window_and_the_memory_bound() {
        let id = MessageId::from_u128;
        let mut dedupe = RecentIds::new(Duration::from_secs(10), 3 * BYTES_PER_ID);
        let start = Instant::now();
        assert!(!dedupe.insert(id(1), start));
        assert!(!dedupe.insert(id(2), start + Duration::from_secs(5)));
        assert!(!dedupe.insert(id(2), start + Duration::from_secs(5)));
        assert!(dedupe.contains(&id(1)) && dedupe.contains(&id(2)));
        // 1 falls out of the window.
        assert!(!dedupe.insert(id(3), start + Duration::from_secs(10)));
        assert!(!dedupe.contains(&id(1)));
        assert_eq!(dedupe.len(), 2);
        // Past the memory bound, the oldest goes although it is inside the window.
        assert!(!dedupe.insert(id(4), start + Duration::from_secs(11)));
        assert!(dedupe.insert(id(5), start + Duration::from_secs(11)));
        assert!(!dedupe.contains(&id(2)));
        assert!(dedupe.contains(&id(3)) && dedupe.contains(&id(5)));
        assert_eq!(
            dedupe.span(start + Duration::from_secs(12)),
            Duration::from_secs(2)
        );

        let mut off = RecentIds::new(Duration::ZERO, 1 << 20);
        off.insert(id(1), start);
        assert!(!off.contains(&id(1)));
    }
}
