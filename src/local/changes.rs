//! The presence changes of this node's connections, in the order the table made them: a
//! connection of a user counted in a group, or no longer. Pushed under the table's lock, so
//! that a leave is never queued before the join it undoes; applied by the node, one at a
//! time (see the presence module).

use std::collections::VecDeque;

use hybrid_cluster_core::{ConnectionId, GroupName, UserId};
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};

/// One change of presence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PresenceChange {
    /// Connection `.2`, of user `.1`, is counted in group `.0` now.
    Joined(GroupName, UserId, ConnectionId),
    /// It is not any more.
    Left(GroupName, UserId, ConnectionId),
    /// It is counted still, but the store lost it (the node was taken for gone): count it
    /// again.
    Recounted(GroupName, UserId, ConnectionId),
}

/// The queue of changes, with the number of the last one pushed and of the last one applied.
#[derive(Debug)]
pub(crate) struct PresenceChanges {
    queue: Mutex<(u64, VecDeque<PresenceChange>)>,
    pushed: Notify,
    applied: watch::Sender<u64>,
}

impl Default for PresenceChanges {
    fn default() -> Self {
        Self {
            queue: Mutex::new((0, VecDeque::new())),
            pushed: Notify::new(),
            applied: watch::Sender::new(0),
        }
    }
}

impl PresenceChanges {
    /// Queues `change`; returns its number.
    pub(crate) fn push(&self, change: PresenceChange) -> u64 {
        let number = {
            let mut queue = self.queue.lock();
            queue.0 += 1;
            queue.1.push_back(change);
            queue.0
        };
        self.pushed.notify_one();
        number
    }

    /// The number of the last change pushed.
    pub(crate) fn last(&self) -> u64 {
        self.queue.lock().0
    }

    /// Takes every change queued, waiting for one when there is none; with the number of the
    /// last one taken.
    pub(crate) async fn take(&self) -> (u64, Vec<PresenceChange>) {
        loop {
            let notified = self.pushed.notified();
            {
                let mut queue = self.queue.lock();
                if !queue.1.is_empty() {
                    let changes = queue.1.drain(..).collect();
                    return (queue.0, changes);
                }
            }
            notified.await;
        }
    }

    /// Marks every change up to `number` applied.
    pub(crate) fn applied(&self, number: u64) {
        self.applied.send_if_modified(|applied| {
            let newer = number > *applied;
            if newer {
                *applied = number;
            }
            newer
        });
    }

    /// Waits until every change up to `number` is applied.
    pub(crate) async fn wait_applied(&self, number: u64) {
        let mut applied = self.applied.subscribe();
        let _ = applied.wait_for(|applied| *applied >= number).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn changes_come_out_in_order_and_waiters_learn_when_they_are_applied() {
        let changes = PresenceChanges::default();
        let (g, u) = (GroupName::new("g").unwrap(), UserId::new("u").unwrap());
        let c: ConnectionId = "n:1:1".parse().unwrap();
        assert_eq!(
            changes.push(PresenceChange::Joined(g.clone(), u.clone(), c.clone())),
            1
        );
        assert_eq!(
            changes.push(PresenceChange::Left(g.clone(), u.clone(), c.clone())),
            2
        );
        let (last, taken) = changes.take().await;
        assert_eq!(last, 2);
        assert_eq!(
            taken,
            [
                PresenceChange::Joined(g.clone(), u.clone(), c.clone()),
                PresenceChange::Left(g, u, c)
            ]
        );
        let waiting = changes.wait_applied(2);
        changes.applied(2);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .unwrap();
    }
}
