//! The receiving side: takes a node's deliveries and hands each envelope to a local
//! destination, acknowledging it only once the destination has taken it.
//!
//! A [`Receiver`] runs a loop over a node's [`Deliveries`] and calls a user
//! `Service<Envelope>` (the local destination: the node's connection table, a channel to a
//! socket task) for each message:
//!
//! 1. the message is read back into an [`Envelope`] ([`EnvelopeCodec::from_message`]). A
//!    malformed message is **dead-lettered** with a `tracing` warning that names what was
//!    wrong (never the payload), and the loop goes on;
//! 2. when the receiver has a [`ClusterSecret`](ReceiveConfig::secret), the envelope is
//!    **authenticated** ([`Envelope::verify`]): a message that is unsigned, whose MAC does not
//!    match (forged, altered, another cluster's secret), or whose send time is more than
//!    [`replay_window`](ReceiveConfig::replay_window) away from this node's clock is
//!    **dead-lettered** with a warning naming its claimed origin, its id and the reason (never
//!    the payload), and counted in [`ReceiveStats::rejected`];
//! 3. a message whose id was handled before is a **duplicate** (a redelivery after a
//!    reconnect, a sender's resend or retry, or a replay): it is acknowledged and dropped,
//!    and counted in [`ReceiveStats::duplicates`]. Without a secret, "before" means within
//!    the last [`dedupe_window`](ReceiveConfig::dedupe_window) (60 s by default). With one,
//!    the ids of every signed message handled within the replay window are remembered, so no
//!    replay gets through (see [Replays](#replays)). Either memory is bounded by
//!    [`dedupe_memory`](ReceiveConfig::dedupe_memory) (64 MiB by default, about a million
//!    ids): at more messages a second than it holds over the window, the oldest ids go
//!    early, a warning says so once, and the window in force is shorter (see below);
//! 4. otherwise the destination is polled ready and called; when its future resolves `Ok`
//!    the message is **acknowledged**. When it resolves with an error, the destination has
//!    refused the message: it is dead-lettered with a warning.
//!
//! Messages are handled one at a time, in queue order, so messages from one sender are handed
//! over in the order they were sent. Back-pressure from the destination (its `poll_ready`)
//! holds the acknowledgement back, and the consumer's prefetch bound then stops the broker
//! from sending more: nothing queues up unboundedly in the node.
//!
//! Acknowledgements are sent without waiting for the previous one to complete. A message
//! handed over whose acknowledgement is lost (the connection dropped) is delivered again and
//! then dropped as a duplicate: delivery between nodes is **at least once, with duplicates
//! suppressed within the window**.
//!
//! # Replays
//!
//! With a secret, a captured signed message published again is refused either way: within the
//! replay window its id is remembered (dropped as a duplicate: acknowledged, not handed over,
//! counted in `duplicates`, exactly like a genuine redelivery, which it cannot be told from);
//! outside the window it is stale (dead-lettered, counted in `rejected`). The memory is bounded
//! by [`dedupe_memory`](ReceiveConfig::dedupe_memory): when more signed messages than it holds
//! are handled within one window, the oldest ids are forgotten early and any message sent
//! before the newest forgotten one is refused as stale too (a warning says so once). So a
//! replay never gets through; the cost of a full memory is that a message delayed longer than
//! the time the ids it holds span (queued behind them, or from a sender whose clock is
//! behind) is dead-lettered. At the default 64 MiB and 60 s, that takes more than about
//! 17,000 messages a second on one node, for a minute. The window itself must exceed the
//! longest time a message may wait in a queue (a broker outage): older messages are
//! dead-lettered, never handed over.
//!
//! ```
//! use std::sync::Arc;
//! use hybrid_cluster_core::{Broker, ConsumeOptions, Envelope, NodeId, QueueOptions, Target};
//! use hybrid_cluster_memory::MemoryBroker;
//! use hybrid_cluster_routing::{EnvelopeCodec, NodeTopology, Receiver};
//! use tower::{ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = Arc::new(MemoryBroker::new());
//! let node = NodeId::new("node-1")?;
//! let topology = NodeTopology::declare(broker.clone(), node.clone(), &QueueOptions::default()).await?;
//! let receiver = Receiver::new(topology.consume(&ConsumeOptions::default()).await?);
//!
//! let (tx, mut rx) = tokio::sync::mpsc::channel(16);
//! let local = service_fn(move |envelope: Envelope| {
//!     let tx = tx.clone();
//!     async move { tx.send(envelope).await }
//! });
//! tokio::spawn(receiver.run(local));
//!
//! let hello = Envelope::text(node.clone(), Target::Node(node.clone()), "hello");
//! broker.publish(&hello.routing_key(), hello.to_message()?).await?;
//! assert_eq!(rx.recv().await.unwrap().payload_text(), Some("hello"));
//! # Ok(())
//! # }
//! ```

mod dedupe;
mod replay;

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_core::future::BoxFuture;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hybrid_cluster_core::{
    AuthError, BoxError, BrokerError, ClusterSecret, DEFAULT_REPLAY_WINDOW, Deliveries, Delivery,
    Envelope, MessageId,
};
use tower_service::Service;
use tracing::{debug, warn};

use self::dedupe::Dedupe;
use self::replay::{ReplayMemory, Seen};
use crate::codec::EnvelopeCodec;
use crate::error::ReceiveError;

/// Settlements in progress, at most, before the loop waits for one to complete.
const MAX_SETTLING: usize = 1024;

/// How a [`Receiver`] behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveConfig {
    /// How long the id of a handled message is remembered, to drop its duplicates. It should
    /// exceed the longest time between a message and its duplicate: a publisher's outage
    /// bound (its resends come at most that long after), a consumer's reconnection (its
    /// redeliveries). Zero turns duplicate suppression off. Not used with a
    /// [`secret`](ReceiveConfig::secret), where the replay window takes its place.
    pub dedupe_window: Duration,
    /// The memory, in bytes, the remembered ids (for dedupe, or replays with a secret) may
    /// take, about: each costs about 64 bytes. Past it the oldest go early (see the
    /// [module docs](self)).
    pub dedupe_memory: usize,
    /// The cluster secret: when set, only messages signed with it are handed over (see the
    /// [module docs](self)).
    pub secret: Option<ClusterSecret>,
    /// With a secret, how far a message's send time may be from this node's clock, either
    /// way. Default 60 s.
    pub replay_window: Duration,
}

impl Default for ReceiveConfig {
    /// A dedupe window of 60 s within 64 MiB; no secret; with one, a replay window of 60 s.
    fn default() -> Self {
        Self {
            dedupe_window: Duration::from_secs(60),
            dedupe_memory: 64 * 1024 * 1024,
            secret: None,
            replay_window: DEFAULT_REPLAY_WINDOW,
        }
    }
}

impl ReceiveConfig {
    /// Hands over only messages signed with `secret`.
    pub fn with_secret(mut self, secret: ClusterSecret) -> Self {
        self.secret = Some(secret);
        self
    }
}

/// What a [`Receiver`] has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// Messages handed to the destination and acknowledged.
    pub handled: u64,
    /// Duplicates dropped (and acknowledged).
    pub duplicates: u64,
    /// Messages dead-lettered: malformed, refused by the destination, or rejected.
    pub dead_lettered: u64,
    /// Of the messages dead-lettered, those that failed authentication: unsigned, forged, or
    /// sent outside the replay window.
    pub rejected: u64,
}

#[derive(Debug, Default)]
struct Counters {
    handled: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    rejected: AtomicU64,
}

/// A handle that reads a [`Receiver`]'s [`ReceiveStats`] while it runs.
#[derive(Clone, Debug)]
pub struct StatsHandle(Arc<Counters>);

impl StatsHandle {
    /// The counts now.
    pub fn get(&self) -> ReceiveStats {
        ReceiveStats {
            handled: self.0.handled.load(Ordering::Relaxed),
            duplicates: self.0.duplicates.load(Ordering::Relaxed),
            dead_lettered: self.0.dead_lettered.load(Ordering::Relaxed),
            rejected: self.0.rejected.load(Ordering::Relaxed),
        }
    }
}

/// Hands a node's deliveries to a local destination, one at a time, acknowledging each once
/// the destination took it. See the [module docs](self).
pub struct Receiver {
    deliveries: Deliveries,
    dedupe: Dedupe,
    auth: Option<Auth>,
    counters: Arc<Counters>,
}

/// What a receiver with a secret checks.
struct Auth {
    secret: ClusterSecret,
    window: Duration,
    memory: ReplayMemory,
    /// Whether the memory filled up within the window (warned once).
    full: bool,
}

/// Whether the dedupe memory shortened its window (warned once).
#[derive(Default)]
struct Shortened(bool);

/// Why a message was refused by authentication.
enum Rejection {
    Auth(AuthError),
    Forgotten,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auth(error) => error.fmt(f),
            Self::Forgotten => {
                f.write_str("it was sent before the oldest message the replay memory still holds")
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

impl Receiver {
    /// A receiver of `deliveries` with the default [`ReceiveConfig`].
    pub fn new(deliveries: Deliveries) -> Self {
        Self::with_config(deliveries, ReceiveConfig::default())
    }

    /// A receiver of `deliveries` as `config` says.
    pub fn with_config(deliveries: Deliveries, config: ReceiveConfig) -> Self {
        let auth = config.secret.map(|secret| Auth {
            secret,
            window: config.replay_window,
            memory: ReplayMemory::new(
                config.dedupe_memory / dedupe::BYTES_PER_ID,
                u64::try_from(config.replay_window.as_millis()).unwrap_or(u64::MAX),
            ),
            full: false,
        });
        Self {
            deliveries,
            // With a secret the replay memory remembers ids; the dedupe window stays empty.
            dedupe: Dedupe::new(
                if auth.is_some() {
                    Duration::ZERO
                } else {
                    config.dedupe_window
                },
                config.dedupe_memory,
            ),
            auth,
            counters: Arc::default(),
        }
    }

    /// A handle to read the receiver's counts while it runs.
    pub fn stats(&self) -> StatsHandle {
        StatsHandle(Arc::clone(&self.counters))
    }

    /// Runs until the deliveries end (`Ok`: the queue was deleted or the broker closed), the
    /// consumer fails, or `destination` fails in `poll_ready`.
    ///
    /// Each envelope is handed to `destination` and acknowledged once its future resolves
    /// `Ok`; see the [module docs](self) for malformed messages, duplicates and refusals.
    /// When the loop ends with an error, the message being handled (if any) is left
    /// unacknowledged, to be delivered again to the queue's next consumer.
    pub async fn run<S>(self, mut destination: S) -> Result<(), ReceiveError>
    where
        S: Service<Envelope>,
        S::Error: Into<BoxError>,
    {
        let Self {
            mut deliveries,
            mut dedupe,
            mut auth,
            counters,
        } = self;
        let mut settling = FuturesUnordered::new();
        let mut shortened = Shortened::default();
        let result = loop {
            let next = tokio::select! {
                biased;
                Some(settled) = settling.next(), if !settling.is_empty() => {
                    report_settlement(settled);
                    continue;
                }
                next = deliveries.next() => next,
            };
            let Delivery {
                message,
                redelivered,
                acker,
            } = match next {
                None => break Ok(()),
                Some(Err(e)) => break Err(ReceiveError::Broker(e)),
                Some(Ok(delivery)) => delivery,
            };
            // Only a well-formed id is ever logged; the payload never is.
            let message_id = message.message_id.parse::<MessageId>().ok();
            let envelope = match Envelope::from_message(message) {
                Ok(envelope) => envelope,
                Err(error) => {
                    warn!(
                        ?message_id,
                        redelivered,
                        %error,
                        "malformed message dead-lettered"
                    );
                    counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    settle(&mut settling, acker.dead_letter()).await;
                    continue;
                }
            };
            let id = envelope.id;
            let sent_ms = millis_since_epoch(envelope.sent_at);
            let now = SystemTime::now();
            let duplicate = match &auth {
                None => dedupe.contains(&id),
                Some(auth) => {
                    let checked = envelope
                        .verify(&auth.secret, now, auth.window)
                        .map_err(Rejection::Auth)
                        .and_then(|()| match auth.memory.check(id, sent_ms) {
                            Seen::New => Ok(false),
                            Seen::Before => Ok(true),
                            Seen::Forgotten => Err(Rejection::Forgotten),
                        });
                    match checked {
                        Ok(duplicate) => duplicate,
                        Err(reason) => {
                            // The origin is as claimed: nothing vouches for it.
                            warn!(
                                claimed_origin = %envelope.origin,
                                message_id = %id,
                                redelivered,
                                %reason,
                                "unauthenticated message dead-lettered"
                            );
                            counters.rejected.fetch_add(1, Ordering::Relaxed);
                            counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                            settle(&mut settling, acker.dead_letter()).await;
                            continue;
                        }
                    }
                }
            };
            if duplicate {
                debug!(message_id = %id, redelivered, "duplicate message dropped");
                counters.duplicates.fetch_add(1, Ordering::Relaxed);
                settle(&mut settling, acker.ack()).await;
                continue;
            }
            let origin = envelope.origin.clone();
            if let Err(e) = poll_fn(|cx| destination.poll_ready(cx)).await {
                break Err(ReceiveError::Service(e.into()));
            }
            let outcome = destination.call(envelope).await;
            if let Some(auth) = &mut auth {
                // Handed over, taken or refused: a replay of it is refused from now on.
                if auth.memory.insert(id, sent_ms, millis_since_epoch(now)) && !auth.full {
                    auth.full = true;
                    warn!(
                        ids = auth.memory.len(),
                        window = ?auth.window,
                        "the replay memory is full: messages sent before the oldest id it \
                         holds are dead-lettered; raise ReceiveConfig::dedupe_memory"
                    );
                }
            }
            match outcome {
                Ok(_) => {
                    let now = tokio::time::Instant::now();
                    if dedupe.insert(id, now) && !shortened.0 {
                        shortened.0 = true;
                        warn!(
                            ids = dedupe.len(),
                            window_in_force = ?dedupe.span(now),
                            "the dedupe memory is full: ids go before their window ends, and a \
                             duplicate later than the window in force would be handed over; \
                             raise ReceiveConfig::dedupe_memory"
                        );
                    }
                    counters.handled.fetch_add(1, Ordering::Relaxed);
                    settle(&mut settling, acker.ack()).await;
                }
                Err(error) => {
                    let error: BoxError = error.into();
                    warn!(
                        message_id = %id,
                        %origin,
                        error = %hybrid_cluster_core::error::error_chain(&*error),
                        "the local destination refused a message: dead-lettered"
                    );
                    counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    settle(&mut settling, acker.dead_letter()).await;
                }
            }
            while settling.len() >= MAX_SETTLING {
                if let Some(settled) = settling.next().await {
                    report_settlement(settled);
                }
            }
        };
        // Let the settlements already made reach the broker.
        while let Some(settled) = settling.next().await {
            report_settlement(settled);
        }
        result
    }
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let remembered = match &self.auth {
            Some(auth) => auth.memory.len(),
            None => self.dedupe.len(),
        };
        f.debug_struct("Receiver")
            .field("remembered_ids", &remembered)
            .field("authenticating", &self.auth.is_some())
            .field("stats", &StatsHandle(Arc::clone(&self.counters)).get())
            .finish_non_exhaustive()
    }
}

type Settle = BoxFuture<'static, Result<(), BrokerError>>;

/// Starts a settlement at once (so its frame goes out while the next message is handled) and
/// keeps it to completion.
async fn settle(settling: &mut FuturesUnordered<Settle>, mut settlement: Settle) {
    match poll_once(&mut settlement).await {
        Poll::Ready(result) => report_settlement(result),
        Poll::Pending => settling.push(settlement),
    }
}

/// Polls `future` once in the current task.
pub(crate) async fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx))).await
}

fn report_settlement(result: Result<(), BrokerError>) {
    match result {
        Ok(()) => {}
        Err(BrokerError::StaleDelivery) => debug!(
            "a settlement came after its consumer was gone: the message will be delivered again \
             and dropped as a duplicate"
        ),
        Err(error) => warn!(
            error = %hybrid_cluster_core::error::error_chain(&error),
            "settling a delivery failed"
        ),
    }
}

#[cfg(test)]
mod tests;
