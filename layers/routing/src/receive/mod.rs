//! The receiving side: takes a node's deliveries and hands each envelope to a local
//! destination, acknowledging it only once the destination has taken it.
//!
//! A [`Receiver`] runs a loop over a node's [`Deliveries`] and calls a user
//! `Service<Envelope>` (the local destination: the node's connection table, a channel to a
//! socket task) for each message:
//!
//! 1. the message is read back into an [`Envelope`] ([`Envelope::from_message`]). A
//!    malformed message is **dead-lettered** with a `tracing` warning that names what was
//!    wrong (never the payload), and the loop goes on;
//! 2. a message whose id was handled within the last
//!    [`dedupe_window`](ReceiveConfig::dedupe_window) messages is a **duplicate** (a
//!    redelivery after a reconnect, or a sender's retry): it is acknowledged and dropped;
//! 3. otherwise the destination is polled ready and called; when its future resolves `Ok`
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
//! ```
//! use std::sync::Arc;
//! use hybrid_cluster_core::{Broker, ConsumeOptions, Envelope, NodeId, QueueOptions, Target};
//! use hybrid_cluster_memory::MemoryBroker;
//! use hybrid_cluster_routing::{NodeTopology, Receiver};
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

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use futures_core::future::BoxFuture;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hybrid_cluster_core::{BoxError, BrokerError, Deliveries, Delivery, Envelope, MessageId};
use tower_service::Service;
use tracing::{debug, warn};

use self::dedupe::Dedupe;
use crate::error::ReceiveError;

/// Settlements in progress, at most, before the loop waits for one to complete.
const MAX_SETTLING: usize = 1024;

/// How a [`Receiver`] behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveConfig {
    /// How many of the last handled message ids are remembered to drop duplicates. It should
    /// exceed the consumer's prefetch plus the senders' publishes in flight, the most that
    /// can be delivered again after a reconnect. 0 turns duplicate suppression off.
    pub dedupe_window: usize,
}

impl Default for ReceiveConfig {
    /// A window of 16,384 ids.
    fn default() -> Self {
        Self {
            dedupe_window: 16_384,
        }
    }
}

/// What a [`Receiver`] has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// Messages handed to the destination and acknowledged.
    pub handled: u64,
    /// Duplicates dropped (and acknowledged).
    pub duplicates: u64,
    /// Messages dead-lettered: malformed, or refused by the destination.
    pub dead_lettered: u64,
}

#[derive(Debug, Default)]
struct Counters {
    handled: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
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
        }
    }
}

/// Hands a node's deliveries to a local destination, one at a time, acknowledging each once
/// the destination took it. See the [module docs](self).
pub struct Receiver {
    deliveries: Deliveries,
    dedupe: Dedupe,
    counters: Arc<Counters>,
}

impl Receiver {
    /// A receiver of `deliveries` with the default [`ReceiveConfig`].
    pub fn new(deliveries: Deliveries) -> Self {
        Self::with_config(deliveries, ReceiveConfig::default())
    }

    /// A receiver of `deliveries` as `config` says.
    pub fn with_config(deliveries: Deliveries, config: ReceiveConfig) -> Self {
        Self {
            deliveries,
            dedupe: Dedupe::new(config.dedupe_window),
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
            counters,
        } = self;
        let mut settling = FuturesUnordered::new();
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
            if dedupe.contains(&id) {
                debug!(message_id = %id, redelivered, "duplicate message dropped");
                counters.duplicates.fetch_add(1, Ordering::Relaxed);
                settle(&mut settling, acker.ack()).await;
                continue;
            }
            let origin = envelope.origin.clone();
            if let Err(e) = poll_fn(|cx| destination.poll_ready(cx)).await {
                break Err(ReceiveError::Service(e.into()));
            }
            match destination.call(envelope).await {
                Ok(_) => {
                    dedupe.insert(id);
                    counters.handled.fetch_add(1, Ordering::Relaxed);
                    settle(&mut settling, acker.ack()).await;
                }
                Err(error) => {
                    let error: BoxError = error.into();
                    warn!(
                        message_id = %id,
                        %origin,
                        %error,
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
        f.debug_struct("Receiver")
            .field("remembered_ids", &self.dedupe.len())
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
        Err(error) => warn!(%error, "settling a delivery failed"),
    }
}

#[cfg(test)]
mod tests;
