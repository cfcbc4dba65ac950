//! The window of recently handled message ids.

use std::collections::{HashSet, VecDeque};

use hybrid_cluster_core::MessageId;

/// The last `capacity` message ids handled, oldest evicted first.
#[derive(Debug)]
pub(crate) struct Dedupe {
    capacity: usize,
    order: VecDeque<MessageId>,
    seen: HashSet<MessageId>,
}

impl Dedupe {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: VecDeque::new(),
            seen: HashSet::new(),
        }
    }

    pub(crate) fn contains(&self, id: &MessageId) -> bool {
        self.seen.contains(id)
    }

    /// Remembers `id`, forgetting the oldest id when the window is full.
    pub(crate) fn insert(&mut self, id: MessageId) {
        if self.capacity == 0 || !self.seen.insert(id) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_last_ids_only() {
        let mut dedupe = Dedupe::new(2);
        let id = MessageId::from_u128;
        dedupe.insert(id(1));
        dedupe.insert(id(2));
        dedupe.insert(id(2));
        assert!(dedupe.contains(&id(1)) && dedupe.contains(&id(2)));
        dedupe.insert(id(3));
        assert!(!dedupe.contains(&id(1)));
        assert!(dedupe.contains(&id(2)) && dedupe.contains(&id(3)));
        assert_eq!(dedupe.len(), 2);
        let mut off = Dedupe::new(0);
        off.insert(id(1));
        assert!(!off.contains(&id(1)));
    }
}
