//! The outermost layer: reads a raw message back into an envelope, and dead-letters what is
//! malformed.

use std::task::{Context, Poll};

use futures_util::future::Either;
use hybrid_cluster_core::{BrokerMessage, Envelope, MessageId};
use metrics::Counter;
use tower_layer::Layer;
use tower_service::Service;
use tracing::warn;

use super::delivery::{Answer, DEAD_LETTERED, MetricLabels, Received, Settlement, answer_now};
use crate::codec::EnvelopeCodec;

/// Wraps a service of envelopes into a [`Decode`] of raw messages.
#[derive(Clone, Debug)]
pub(crate) struct DecodeLayer {
    malformed: Counter,
}

impl DecodeLayer {
    pub(crate) fn new(labels: &MetricLabels) -> Self {
        Self {
            malformed: labels.counter(DEAD_LETTERED),
        }
    }
}

impl<S> Layer<S> for DecodeLayer {
    type Service = Decode<S>;

    fn layer(&self, inner: S) -> Decode<S> {
        Decode {
            inner,
            malformed: self.malformed.clone(),
        }
    }
}

/// Decodes each raw message ([`EnvelopeCodec::from_message`](crate::EnvelopeCodec::from_message)) and passes the envelope on; a
/// malformed message is dead-lettered with a warning that names what was wrong, never the
/// payload.
#[derive(Debug)]
pub(crate) struct Decode<S> {
    inner: S,
    malformed: Counter,
}

impl<S> Service<Received<BrokerMessage>> for Decode<S>
where
    S: Service<Received<Envelope>, Response = Settlement>,
{
    type Response = Settlement;
    type Error = S::Error;
    type Future = Answer<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, received: Received<BrokerMessage>) -> Self::Future {
        let Received {
            message,
            redelivered,
        } = received;
        // Only a well-formed id is ever logged; the payload never is.
        let message_id = message.message_id.parse::<MessageId>().ok();
        match Envelope::from_message(message) {
            Ok(envelope) => Either::Right(self.inner.call(Received {
                message: envelope,
                redelivered,
            })),
            Err(error) => {
                warn!(
                    ?message_id,
                    redelivered,
                    %error,
                    "malformed message dead-lettered"
                );
                self.malformed.increment(1);
                answer_now(Settlement::DeadLetter)
            }
        }
    }
}
