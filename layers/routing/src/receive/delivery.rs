//! What passes between the layers of the receive stack, and the one metric they record.

use std::sync::Arc;

use futures_core::future::BoxFuture;
use futures_util::future::{Either, Ready, ready};
use metrics::{Counter, Label, counter};

/// The counter of what the receiver did with the broker's deliveries, labelled `outcome`
/// ([`HANDLED`], [`DUPLICATE`], [`DEAD_LETTERED`], [`REJECTED`]) and with the receiver's own
/// labels ([`Receiver::with_metric_labels`](super::Receiver::with_metric_labels)).
pub const DELIVERIES_METRIC: &str = "hybrid_cluster_broker_deliveries_total";
/// Outcome: handed to the destination and acknowledged.
pub const HANDLED: &str = "handled";
/// Outcome: a duplicate, dropped and acknowledged.
pub const DUPLICATE: &str = "duplicate";
/// Outcome: dead-lettered (malformed, refused by the destination, or rejected).
pub const DEAD_LETTERED: &str = "dead_lettered";
/// Outcome: failed authentication (counted in [`DEAD_LETTERED`] as well).
pub const REJECTED: &str = "rejected";

/// A message taken from the node's queue: a raw broker message before the decoding layer, an
/// envelope after it.
#[derive(Debug)]
pub(crate) struct Received<T> {
    pub(crate) message: T,
    /// Whether the broker delivered it before (logged with every warning about it).
    pub(crate) redelivered: bool,
}

/// What the receiver does with a delivery once the stack is done with it.
pub(crate) enum Settlement {
    Acknowledge,
    /// Acknowledge once this completes: the destination took the message and keeps it
    /// somewhere first (see [`Taken`]).
    AcknowledgeAfter(BoxFuture<'static, ()>),
    DeadLetter,
}

impl Settlement {
    /// Whether the destination took the message (now or once it is kept).
    pub(crate) fn is_taken(&self) -> bool {
        matches!(self, Self::Acknowledge | Self::AcknowledgeAfter(_))
    }
}

impl std::fmt::Debug for Settlement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Acknowledge => "Acknowledge",
            Self::AcknowledgeAfter(_) => "AcknowledgeAfter",
            Self::DeadLetter => "DeadLetter",
        })
    }
}

/// What a local destination answers for a message it took: `()` when the message may be
/// acknowledged to the broker at once, or [`AckAfter`] when it is to be acknowledged only once
/// something completes (the message written to a store first). The receiver goes on with the
/// next delivery meanwhile: the wait holds back no other message.
pub trait Taken {
    /// What to wait for before the acknowledgement, if anything.
    fn ack_after(self) -> Option<BoxFuture<'static, ()>>;
}

impl Taken for () {
    fn ack_after(self) -> Option<BoxFuture<'static, ()>> {
        None
    }
}

/// The answer of a destination whose message is acknowledged once this future completes (or
/// at once, when there is none).
pub struct AckAfter(pub Option<BoxFuture<'static, ()>>);

impl std::fmt::Debug for AckAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AckAfter").field(&self.0.is_some()).finish()
    }
}

impl Taken for AckAfter {
    fn ack_after(self) -> Option<BoxFuture<'static, ()>> {
        self.0
    }
}

/// A layer's future: settled at once (`Left`), or the inner service's (`Right`).
pub(crate) type Answer<F, E> = Either<Ready<Result<Settlement, E>>, F>;

/// An answer given at once, without the inner service.
pub(crate) fn answer_now<F, E>(settlement: Settlement) -> Answer<F, E> {
    Either::Left(ready(Ok(settlement)))
}

/// The labels every series of [`DELIVERIES_METRIC`] of one receiver carries.
#[derive(Clone, Debug, Default)]
pub(crate) struct MetricLabels(Arc<[Label]>);

impl MetricLabels {
    pub(crate) fn new(labels: Vec<Label>) -> Self {
        Self(labels.into())
    }

    /// Registers the series of `outcome` once, so that recording costs no lookup per message.
    pub(crate) fn counter(&self, outcome: &'static str) -> Counter {
        let labels: Vec<Label> = self
            .0
            .iter()
            .cloned()
            .chain([Label::new("outcome", outcome)])
            .collect();
        counter!(DELIVERIES_METRIC, labels)
    }
}
