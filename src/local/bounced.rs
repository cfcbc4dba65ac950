//! Unicasts that reached this node and will not reach their connection, kept (ids only)
//! until their senders are told.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};

use hybrid_cluster_core::{ConnectionId, Envelope, MessageId, Target};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::metrics::Metrics;

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
    overflowed: AtomicBool,
    metrics: Metrics,
}

impl Bounced {
    const CAPACITY: usize = 65_536;

    pub(super) fn new(metrics: Metrics) -> Self {
        Self {
            waiting: Mutex::new((VecDeque::new(), 0)),
            ready: Notify::new(),
            told: Notify::new(),
            overflowed: AtomicBool::new(false),
            metrics,
        }
    }

    /// Takes a message that will not reach its client: a unicast from a connection is kept
    /// for a notice to its sender; anything else has no one to tell.
    pub(crate) fn bounce_envelope(&self, envelope: &Envelope) {
        let Some(bounce) = Bounce::of(envelope) else {
            return;
        };
        {
            let mut waiting = self.waiting.lock();
            if waiting.0.len() >= Self::CAPACITY {
                self.metrics.notice_dropped();
                if !self.overflowed.swap(true, Ordering::Relaxed) {
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

    /// The ids of the messages waiting for a notice.
    #[cfg(test)]
    pub(super) fn waiting_ids(&self) -> Vec<MessageId> {
        let waiting = self.waiting.lock();
        waiting.0.iter().map(|bounce| bounce.message_id).collect()
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
