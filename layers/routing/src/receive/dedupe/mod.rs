//! The dedupe layer: drops (and acknowledges) a message whose id was handled before, and, with
//! a cluster secret, refuses what the replay memory can no longer vouch for.
//!
//! Without a secret, ids are remembered for the dedupe window once handed over
//! ([`recent`]); with one, every signed message passed on is remembered for the replay window
//! ([`replay`]), taken or refused by the destination, so that no replay gets through.

mod recent;
mod replay;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::Either;
use hybrid_cluster_core::{Envelope, MessageId};
use metrics::Counter;
use parking_lot::Mutex;
use pin_project::pin_project;
use tower_layer::Layer;
use tower_service::Service;
use tracing::{debug, warn};

pub(crate) use self::recent::BYTES_PER_ID;
use self::recent::RecentIds;
use self::replay::{ReplayMemory, Seen};
use super::config::ReceiveConfig;
use super::delivery::{Answer, DUPLICATE, MetricLabels, Received, Settlement, answer_now};
use super::verify::Rejections;

/// Why the replay memory refuses a message.
struct Forgotten;

impl std::fmt::Display for Forgotten {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("it was sent before the oldest message the replay memory still holds")
    }
}

/// The ids remembered, and whether their bound was reached (warned once).
#[derive(Debug)]
enum Memory {
    /// Without a secret: ids handed over within the dedupe window.
    Recent { ids: RecentIds, shortened: bool },
    /// With a secret: ids of the signed messages passed on within the replay window.
    Replay {
        ids: ReplayMemory,
        window: Duration,
        full: bool,
    },
}

/// What to remember of a message passed on, once the destination is done with it.
#[derive(Debug, Clone, Copy)]
struct Passed {
    id: MessageId,
    sent_ms: u64,
    now_ms: u64,
}

impl Memory {
    fn new(config: &ReceiveConfig) -> Self {
        if config.secret.is_some() {
            Self::Replay {
                ids: ReplayMemory::new(
                    config.dedupe_memory / BYTES_PER_ID,
                    u64::try_from(config.replay_window.as_millis()).unwrap_or(u64::MAX),
                ),
                window: config.replay_window,
                full: false,
            }
        } else {
            Self::Recent {
                ids: RecentIds::new(config.dedupe_window, config.dedupe_memory),
                shortened: false,
            }
        }
    }

    fn check(&self, passed: &Passed) -> Seen {
        match self {
            Self::Recent { ids, .. } if ids.contains(&passed.id) => Seen::Before,
            Self::Recent { .. } => Seen::New,
            Self::Replay { ids, .. } => ids.check(passed.id, passed.sent_ms),
        }
    }

    /// Remembers a message the destination took (`taken`) or refused.
    fn remember(&mut self, passed: Passed, taken: bool) {
        match self {
            Self::Recent { ids, shortened } => {
                let now = tokio::time::Instant::now();
                if taken && ids.insert(passed.id, now) && !*shortened {
                    *shortened = true;
                    warn!(
                        ids = ids.len(),
                        window_in_force = ?ids.span(now),
                        "the dedupe memory is full: ids go before their window ends, and a \
                         duplicate later than the window in force would be handed over; \
                         raise ReceiveConfig::dedupe_memory"
                    );
                }
            }
            // Handed over, taken or refused: a replay of it is refused from now on.
            Self::Replay { ids, window, full } => {
                if ids.insert(passed.id, passed.sent_ms, passed.now_ms) && !*full {
                    *full = true;
                    warn!(
                        ids = ids.len(),
                        window = ?window,
                        "the replay memory is full: messages sent before the oldest id it \
                         holds are dead-lettered; raise ReceiveConfig::dedupe_memory"
                    );
                }
            }
        }
    }
}

fn millis_since_epoch(time: SystemTime) -> u64 {
    let millis = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    u64::try_from(millis).unwrap_or(u64::MAX)
}

/// Wraps a service of envelopes into a [`Dedupe`].
#[derive(Debug)]
pub(crate) struct DedupeLayer {
    config: ReceiveConfig,
    duplicates: Counter,
    rejections: Rejections,
}

impl DedupeLayer {
    /// Remembers ids as `config` says (its window, memory bound and secret).
    pub(crate) fn new(config: &ReceiveConfig, labels: &MetricLabels) -> Self {
        Self {
            config: config.clone(),
            duplicates: labels.counter(DUPLICATE),
            rejections: Rejections::new(labels),
        }
    }
}

impl<S> Layer<S> for DedupeLayer {
    type Service = Dedupe<S>;

    fn layer(&self, inner: S) -> Dedupe<S> {
        Dedupe {
            inner,
            memory: Arc::new(Mutex::new(Memory::new(&self.config))),
            duplicates: self.duplicates.clone(),
            rejections: self.rejections.clone(),
        }
    }
}

/// Acknowledges and drops a duplicate; passes a new message on and remembers its id once the
/// destination is done with it.
#[derive(Debug)]
pub(crate) struct Dedupe<S> {
    inner: S,
    // Shared with the future that remembers a message; never locked across an await.
    memory: Arc<Mutex<Memory>>,
    duplicates: Counter,
    rejections: Rejections,
}

impl<S> Service<Received<Envelope>> for Dedupe<S>
where
    S: Service<Received<Envelope>, Response = Settlement>,
{
    type Response = Settlement;
    type Error = S::Error;
    type Future = Answer<RememberFuture<S::Future>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, received: Received<Envelope>) -> Self::Future {
        let passed = Passed {
            id: received.message.id,
            sent_ms: millis_since_epoch(received.message.sent_at),
            now_ms: millis_since_epoch(SystemTime::now()),
        };
        let seen = self.memory.lock().check(&passed);
        let settled = match seen {
            Seen::New => {
                return Either::Right(RememberFuture {
                    inner: self.inner.call(received),
                    memory: Arc::clone(&self.memory),
                    passed,
                });
            }
            Seen::Before => {
                debug!(
                    message_id = %passed.id,
                    redelivered = received.redelivered,
                    "duplicate message dropped"
                );
                self.duplicates.increment(1);
                Settlement::Acknowledge
            }
            Seen::Forgotten => self.rejections.reject(&received, &Forgotten),
        };
        answer_now(settled)
    }
}

/// The destination's answer for a message passed on, remembering its id when it comes.
#[pin_project]
#[derive(Debug)]
pub(crate) struct RememberFuture<F> {
    #[pin]
    inner: F,
    memory: Arc<Mutex<Memory>>,
    passed: Passed,
}

impl<F, E> Future for RememberFuture<F>
where
    F: Future<Output = Result<Settlement, E>>,
{
    type Output = Result<Settlement, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let settled = ready!(this.inner.poll(cx));
        if let Ok(settlement) = &settled {
            let taken = settlement.is_taken();
            this.memory.lock().remember(*this.passed, taken);
        }
        Poll::Ready(settled)
    }
}
