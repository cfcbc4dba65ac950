//! The receiving side: takes a node's deliveries and hands each envelope to a local
//! destination, acknowledging it only once the destination has taken it.
//!
//! A [`Receiver`] only pulls a node's [`Deliveries`] and settles each one (acknowledges or
//! dead-letters it). What to do with a message is decided by a stack of tower layers over the
//! user's `Service<Envelope>` (the local destination: the node's connection table, a channel
//! to a socket task), outermost first, each recording its outcomes in the
//! [`DELIVERIES_METRIC`] counter through the `metrics` facade:
//!
//! 1. **decoding**: the message is read back into an [`Envelope`]
//!    ([`EnvelopeCodec::from_message`](crate::EnvelopeCodec::from_message)). A malformed message is **dead-lettered** with a `tracing`
//!    warning that names what was wrong (never the payload), and the loop goes on;
//! 2. **authentication**: when the receiver has a [`ClusterSecret`](ReceiveConfig::secret),
//!    the envelope is verified ([`Envelope::verify`]): a message that is unsigned, whose MAC
//!    does not match (forged, altered, another cluster's secret), or whose send time is more
//!    than [`replay_window`](ReceiveConfig::replay_window) away from this node's clock is
//!    **dead-lettered** with a warning naming its claimed origin, its id and the reason (never
//!    the payload), and counted as [`REJECTED`] (and [`DEAD_LETTERED`]);
//! 3. **dedupe**: a message whose id was handled before is a **duplicate** (a redelivery
//!    after a reconnect, a sender's resend or retry, or a replay): it is acknowledged and
//!    dropped, and counted as [`DUPLICATE`]. Without a secret, "before" means within
//!    the last [`dedupe_window`](ReceiveConfig::dedupe_window) (60 s by default). With one,
//!    the ids of every signed message handled within the replay window are remembered, so no
//!    replay gets through (see [Replays](#replays)). Either memory is bounded by
//!    [`dedupe_memory`](ReceiveConfig::dedupe_memory) (64 MiB by default, about a million
//!    ids): at more messages a second than it holds over the window, the oldest ids go
//!    early, a warning says so once, and the window in force is shorter (see below);
//! 4. **hand-over**: otherwise the destination is called; when its future resolves `Ok`
//!    the message is **acknowledged** (counted as [`HANDLED`]). When it resolves with an
//!    error, the destination has refused the message: it is dead-lettered with a warning.
//!
//! The stack's `poll_ready` is the destination's, polled before each delivery is handled.
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
//! counted as a duplicate, exactly like a genuine redelivery, which it cannot be told from);
//! outside the window it is stale (dead-lettered, counted as rejected). The memory is bounded
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

mod config;
mod decode;
mod dedupe;
mod delivery;
mod hand_over;
mod verify;

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;

use futures_core::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use hybrid_cluster_core::{BoxError, BrokerError, BrokerMessage, Deliveries, Delivery, Envelope};
use metrics::Label;
use tower::ServiceBuilder;
use tower_service::Service;
use tracing::{debug, warn};

pub use self::config::ReceiveConfig;
use self::decode::DecodeLayer;
use self::dedupe::DedupeLayer;
pub use self::delivery::{
    AckAfter, DEAD_LETTERED, DELIVERIES_METRIC, DUPLICATE, HANDLED, REJECTED, Taken,
};
use self::delivery::{MetricLabels, Received, Settlement};
use self::hand_over::HandOverLayer;
use self::verify::VerifyLayer;
use crate::error::ReceiveError;

/// Settlements in progress, at most, before the loop waits for one to complete.
const MAX_SETTLING: usize = 1024;

/// Hands a node's deliveries to a local destination, one at a time, acknowledging each once
/// the destination took it. See the [module docs](self).
pub struct Receiver {
    deliveries: Deliveries,
    config: ReceiveConfig,
    labels: Vec<Label>,
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
            config,
            labels: Vec::new(),
        }
    }

    /// Adds `labels` to every series the receiver records ([`DELIVERIES_METRIC`]), besides
    /// its `outcome` (the cluster labels them with the node's id).
    pub fn with_metric_labels(mut self, labels: impl IntoIterator<Item = Label>) -> Self {
        self.labels.extend(labels);
        self
    }

    /// Runs until the deliveries end (`Ok`: the queue was deleted or the broker closed), the
    /// consumer fails, or `destination` fails in `poll_ready`.
    ///
    /// Each envelope is handed to `destination` and acknowledged once its future resolves
    /// `Ok`; see the [module docs](self) for malformed messages, duplicates and refusals.
    /// When the loop ends with an error, the message being handled (if any) is left
    /// unacknowledged, to be delivered again to the queue's next consumer.
    ///
    /// The receiver's metrics are registered when this is called, with the `metrics`
    /// recorder in force then (not when the future is first polled).
    pub fn run<S>(self, destination: S) -> impl Future<Output = Result<(), ReceiveError>> + use<S>
    where
        S: Service<Envelope>,
        S::Response: Taken,
        S::Error: Into<BoxError>,
    {
        let labels = MetricLabels::new(self.labels);
        let config = self.config;
        let stack = ServiceBuilder::new()
            .layer(DecodeLayer::new(&labels))
            .layer(VerifyLayer::new(
                config.secret.clone(),
                config.replay_window,
                &labels,
            ))
            .layer(DedupeLayer::new(&config, &labels))
            .layer(HandOverLayer::new(&labels))
            .service(destination);
        pull_and_settle(self.deliveries, stack)
    }
}

/// The receiver proper: pulls each delivery, has `stack` (decoding, authentication, dedupe,
/// hand-over) say what to do with it, and settles it so.
async fn pull_and_settle<S>(mut deliveries: Deliveries, mut stack: S) -> Result<(), ReceiveError>
where
    S: Service<Received<BrokerMessage>, Response = Settlement, Error = BoxError>,
{
    let mut settling = FuturesUnordered::new();
    // A delivery taken early, to learn whether another one was waiting.
    let mut taken = None;
    let result = loop {
        let next = match taken.take() {
            Some(next) => next,
            None => next_delivery(&mut deliveries, &mut settling).await,
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
        tracing::trace!(name: "hybrid_cluster.stage.pulled", "delivery pulled");
        if let Err(e) = poll_fn(|cx| stack.poll_ready(cx)).await {
            break Err(ReceiveError::Service(e));
        }
        let settlement = match stack
            .call(Received {
                message,
                redelivered,
            })
            .await
        {
            Ok(settlement) => settlement,
            Err(e) => break Err(ReceiveError::Service(e)),
        };
        taken = waiting_delivery_or_step_aside(&mut deliveries).await;
        let settling_one = match settlement {
            Settlement::Acknowledge => acker.ack(),
            Settlement::AcknowledgeAfter(kept) => Box::pin(async move {
                kept.await;
                acker.ack().await
            }),
            Settlement::DeadLetter => acker.dead_letter(),
        };
        settle(&mut settling, settling_one).await;
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

/// The next delivery of `deliveries`, reporting the settlements that complete meanwhile.
async fn next_delivery(
    deliveries: &mut Deliveries,
    settling: &mut FuturesUnordered<Settle>,
) -> Option<Result<Delivery, BrokerError>> {
    loop {
        tokio::select! {
            biased;
            Some(settled) = settling.next(), if !settling.is_empty() => report_settlement(settled),
            next = deliveries.next() => return next,
        }
    }
}

/// After a hand-over, before its settlement: the next delivery if one is waiting already,
/// else `None` once this task stepped aside. The hand-over has just woken the message's
/// consumer (a socket task), most likely into this worker's next-to-run slot, which no other
/// worker may take: stepping aside lets it write the message before the settlement's work
/// rather than after (in the suite's breakdown of a lone message: 17 → 2 µs from the inbox to
/// the socket task, at the median). Under load the next delivery is handled at once: yielding
/// for every one halved the throughput.
async fn waiting_delivery_or_step_aside(
    deliveries: &mut Deliveries,
) -> Option<Option<Result<Delivery, BrokerError>>> {
    let waiting = deliveries.next().now_or_never();
    if waiting.is_none() {
        tokio::task::yield_now().await;
    }
    waiting
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("config", &self.config)
            .field("labels", &self.labels)
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
