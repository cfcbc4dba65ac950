//! The authentication layer: with a cluster secret, only envelopes whose MAC verifies and whose
//! send time is within the replay window go on.

use std::fmt;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::future::Either;
use hybrid_cluster_core::{ClusterSecret, Envelope};
use metrics::Counter;
use tower_layer::Layer;
use tower_service::Service;
use tracing::warn;

use super::delivery::{
    Answer, DEAD_LETTERED, MetricLabels, REJECTED, Received, Settlement, answer_now,
};

/// Refuses a message that failed authentication: warns and counts it.
#[derive(Clone, Debug)]
pub(super) struct Rejections {
    rejected: Counter,
    dead_lettered: Counter,
}

impl Rejections {
    pub(super) fn new(labels: &MetricLabels) -> Self {
        Self {
            rejected: labels.counter(REJECTED),
            dead_lettered: labels.counter(DEAD_LETTERED),
        }
    }

    /// Warns that `received` is dead-lettered for `reason` (never with its payload), counts it,
    /// and says to dead-letter it.
    pub(super) fn reject(
        &self,
        received: &Received<Envelope>,
        reason: &dyn fmt::Display,
    ) -> Settlement {
        // The origin is as claimed: nothing vouches for it.
        warn!(
            claimed_origin = %received.message.origin,
            message_id = %received.message.id,
            redelivered = received.redelivered,
            %reason,
            "unauthenticated message dead-lettered"
        );
        self.rejected.increment(1);
        self.dead_lettered.increment(1);
        Settlement::DeadLetter
    }
}

/// The secret and how far a send time may be from this node's clock.
#[derive(Clone, Debug)]
struct Auth {
    secret: ClusterSecret,
    window: Duration,
}

/// Wraps a service of envelopes into a [`Verify`].
#[derive(Clone, Debug)]
pub(crate) struct VerifyLayer {
    auth: Option<Auth>,
    rejections: Rejections,
}

impl VerifyLayer {
    /// Checks envelopes against `secret` within `window`; without a secret, lets every one
    /// through.
    pub(crate) fn new(
        secret: Option<ClusterSecret>,
        window: Duration,
        labels: &MetricLabels,
    ) -> Self {
        Self {
            auth: secret.map(|secret| Auth { secret, window }),
            rejections: Rejections::new(labels),
        }
    }
}

impl<S> Layer<S> for VerifyLayer {
    type Service = Verify<S>;

    fn layer(&self, inner: S) -> Verify<S> {
        Verify {
            inner,
            auth: self.auth.clone(),
            rejections: self.rejections.clone(),
        }
    }
}

/// Dead-letters, with a warning naming its claimed origin, its id and the reason, an envelope
/// that is unsigned, whose MAC does not match, or that was sent outside the replay window
/// ([`Envelope::verify`]).
#[derive(Debug)]
pub(crate) struct Verify<S> {
    inner: S,
    auth: Option<Auth>,
    rejections: Rejections,
}

impl<S> Service<Received<Envelope>> for Verify<S>
where
    S: Service<Received<Envelope>, Response = Settlement>,
{
    type Response = Settlement;
    type Error = S::Error;
    type Future = Answer<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, received: Received<Envelope>) -> Self::Future {
        if let Some(auth) = &self.auth {
            let verified = received
                .message
                .verify(&auth.secret, SystemTime::now(), auth.window);
            if let Err(reason) = verified {
                return answer_now(self.rejections.reject(&received, &reason));
            }
        }
        Either::Right(self.inner.call(received))
    }
}
