//! The memory of signed messages handled within the replay window.
//!
//! A signed message is refused when its send time is outside the window (checked by
//! [`Envelope::verify`](hybrid_cluster_core::Envelope::verify)), so only the ids of messages
//! sent within the window need remembering to refuse every replay. They are kept ordered by
//! send time; those that fall out of the window are forgotten. When more than `capacity`
//! messages were handled within the window, the oldest are forgotten early, and the
//! **horizon** moves up: a message sent before it is refused as well, since it could be the
//! replay of one forgotten. So memory stays bounded and no replay gets through; what a full
//! memory costs is that the effective window shrinks to the time the last `capacity` messages
//! span.

use std::collections::BTreeSet;

use hybrid_cluster_core::MessageId;

/// What the memory says of a signed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// Not seen: hand it over.
    New,
    /// Handled before: a duplicate or a replay.
    Before,
    /// Sent before the horizon: whether it was handled is no longer known.
    Forgotten,
}

#[derive(Debug)]
pub(super) struct ReplayMemory {
    capacity: usize,
    window_ms: u64,
    /// (send time in ms, id) of the messages handled, oldest first.
    handled: BTreeSet<(u64, MessageId)>,
    /// Messages sent before this (ms since the Unix epoch) are refused.
    horizon: u64,
}

impl ReplayMemory {
    pub(super) fn new(capacity: usize, window_ms: u64) -> Self {
        Self {
            capacity: capacity.max(1),
            window_ms,
            handled: BTreeSet::new(),
            horizon: 0,
        }
    }

    pub(super) fn check(&self, id: MessageId, sent_ms: u64) -> Seen {
        if self.handled.contains(&(sent_ms, id)) {
            Seen::Before
        } else if sent_ms < self.horizon {
            Seen::Forgotten
        } else {
            Seen::New
        }
    }

    /// Remembers a message handed over at `now_ms`, forgetting what fell out of the window and
    /// the oldest when full. Returns whether the horizon moved inside the window (memory full).
    pub(super) fn insert(&mut self, id: MessageId, sent_ms: u64, now_ms: u64) -> bool {
        // What the window refuses anyway. Kept as the horizon too, so that a clock stepping
        // back does not let a forgotten message in again.
        let cutoff = now_ms.saturating_sub(self.window_ms);
        if cutoff > self.horizon {
            self.horizon = cutoff;
            // Only the few entries that just fell out: split_off would rebuild the tree's edge
            // on nearly every message, as the cutoff moves every millisecond.
            while self.handled.first().is_some_and(|&(sent, _)| sent < cutoff) {
                self.handled.pop_first();
            }
        }
        self.handled.insert((sent_ms, id));
        let mut full = false;
        while self.handled.len() > self.capacity {
            if let Some((oldest, _)) = self.handled.pop_first() {
                self.horizon = self.horizon.max(oldest.saturating_add(1));
                full = true;
            }
        }
        full
    }

    pub(super) fn len(&self) -> usize {
        self.handled.len()
    }

    #[cfg(test)]
    pub(super) fn horizon(&self) -> u64 {
        self.horizon
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_the_window_and_refuses_what_it_forgot() {
        let id = MessageId::from_u128;
        let mut memory = ReplayMemory::new(3, 1_000);
        assert!(!memory.insert(id(1), 10_000, 10_000));
        assert_eq!(memory.check(id(1), 10_000), Seen::Before);
        assert_eq!(memory.check(id(2), 10_000), Seen::New);
        // A forged copy with another time is another message (its MAC would not verify).
        assert_eq!(memory.check(id(1), 10_001), Seen::New);

        // Out of the window: forgotten, and refused since.
        memory.insert(id(2), 11_500, 11_500);
        assert_eq!(memory.len(), 1);
        assert_eq!(memory.check(id(1), 10_000), Seen::Forgotten);
        assert_eq!(memory.horizon(), 10_500);

        // Full: the oldest is forgotten early, and the horizon moves past it.
        memory.insert(id(3), 11_600, 11_600);
        memory.insert(id(4), 11_700, 11_700);
        assert!(memory.insert(id(5), 11_800, 11_800));
        assert_eq!(memory.len(), 3);
        assert_eq!(memory.check(id(2), 11_500), Seen::Forgotten);
        assert_eq!(memory.check(id(6), 11_500), Seen::Forgotten);
        assert_eq!(memory.check(id(3), 11_600), Seen::Before);
        // Nothing sent after the forgotten one was forgotten.
        assert_eq!(memory.check(id(6), 11_550), Seen::New);

        // A clock stepping back does not lower the horizon.
        memory.insert(id(7), 11_900, 5_000);
        assert_eq!(memory.check(id(1), 10_000), Seen::Forgotten);
    }
}
