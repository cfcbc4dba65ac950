//! The innermost layer: hands an envelope to the local destination, a user
//! `Service<Envelope>`, and says to acknowledge it once taken, to dead-letter it if refused.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use hybrid_cluster_core::{BoxError, Envelope, MessageId, NodeId};
use metrics::Counter;
use pin_project::pin_project;
use tower_layer::Layer;
use tower_service::Service;
use tracing::warn;

use super::delivery::{DEAD_LETTERED, HANDLED, MetricLabels, Received, Settlement, Taken};

/// The outcomes a hand-over counts.
#[derive(Debug)]
struct Outcomes {
    handled: Counter,
    refused: Counter,
}

/// Wraps the local destination into a [`HandOver`].
#[derive(Clone, Debug)]
pub(crate) struct HandOverLayer {
    outcomes: Arc<Outcomes>,
}

impl HandOverLayer {
    pub(crate) fn new(labels: &MetricLabels) -> Self {
        Self {
            outcomes: Arc::new(Outcomes {
                handled: labels.counter(HANDLED),
                refused: labels.counter(DEAD_LETTERED),
            }),
        }
    }
}

impl<S> Layer<S> for HandOverLayer
where
    S: Service<Envelope>,
    S::Error: Into<BoxError>,
{
    type Service = HandOver<S>;

    fn layer(&self, destination: S) -> HandOver<S> {
        HandOver {
            destination,
            outcomes: Arc::clone(&self.outcomes),
            boxed: boxed::<S::Error>,
        }
    }
}

fn boxed<E: Into<BoxError>>(error: E) -> BoxError {
    error.into()
}

/// Calls the destination with each envelope. Its `poll_ready` is the destination's: its
/// back-pressure holds the receiver back, and its failure stops the receiver.
pub(crate) struct HandOver<S: Service<Envelope>> {
    destination: S,
    outcomes: Arc<Outcomes>,
    // A function, not an `Into` bound on the `Service` impl: a bound with `BoxError` there is
    // not proven for every lifetime when the receiver's future is checked to be `Send`.
    boxed: fn(S::Error) -> BoxError,
}

impl<S: Service<Envelope>> std::fmt::Debug for HandOver<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandOver").finish_non_exhaustive()
    }
}

impl<S> Service<Received<Envelope>> for HandOver<S>
where
    S: Service<Envelope>,
    S::Response: Taken,
{
    type Response = Settlement;
    type Error = BoxError;
    type Future = HandOverFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.destination.poll_ready(cx).map_err(self.boxed)
    }

    fn call(&mut self, received: Received<Envelope>) -> Self::Future {
        let envelope = received.message;
        HandOverFuture {
            id: envelope.id,
            origin: envelope.origin.clone(),
            outcomes: Arc::clone(&self.outcomes),
            boxed: self.boxed,
            taking: self.destination.call(envelope),
        }
    }
}

/// The destination taking an envelope: always resolves `Ok`, with what to do with the
/// delivery.
#[pin_project]
#[derive(Debug)]
pub(crate) struct HandOverFuture<F, E> {
    #[pin]
    taking: F,
    id: MessageId,
    origin: NodeId,
    outcomes: Arc<Outcomes>,
    boxed: fn(E) -> BoxError,
}

impl<F, T, E> Future for HandOverFuture<F, E>
where
    F: Future<Output = Result<T, E>>,
    T: Taken,
{
    type Output = Result<Settlement, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let settlement = match ready!(this.taking.poll(cx)) {
            Ok(taken) => {
                this.outcomes.handled.increment(1);
                match taken.ack_after() {
                    Some(kept) => Settlement::AcknowledgeAfter(kept),
                    None => Settlement::Acknowledge,
                }
            }
            Err(error) => {
                let error = (this.boxed)(error);
                warn!(
                    message_id = %this.id,
                    origin = %this.origin,
                    error = %hybrid_cluster_core::error::error_chain(&*error),
                    "the local destination refused a message: dead-lettered"
                );
                this.outcomes.refused.increment(1);
                Settlement::DeadLetter
            }
        };
        Poll::Ready(Ok(settlement))
    }
}
