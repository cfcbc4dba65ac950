//! A node gone without leaving (crashed, cut off) leaves its queue behind, with the messages
//! peers sent it before they learnt it was gone: each of them was confirmed to its sender.
//! A surviving node takes the queue over and answers every unicast in it with an
//! undeliverable notice to its sender, so that none of them is lost without a word.
//!
//! Every survivor tries; the consumer is exclusive, so one wins and the others find the queue
//! in use (or gone: a node that left gracefully deleted its own). The winner reads the queue
//! until it has been idle for [`IDLE`], then lets go: the queue expires on its own (its
//! `x-expires`), or its node, back under the same id, consumes it again. A node that comes
//! back while its queue is being read gets it back at once: what is left is put back for it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use hybrid_cluster_core::{
    Broker, BrokerError, ClusterSecret, ConsumeOptions, DEFAULT_REPLAY_WINDOW, Envelope, NodeId,
    Target,
};

/// How long a taken-over queue may stay idle before it is let go.
pub(crate) const IDLE: Duration = Duration::from_secs(2);

/// How long a queue still in use (its node frozen, its connection not yet given up on) is
/// tried again.
const HOLD: Duration = Duration::from_secs(90);

/// Reads the queue of `gone`, if no one else does and it is still there, handing each unicast
/// from a connection to `bounce`, until it is idle or `is_back` says its node returned.
/// Returns how many messages were answered.
pub(crate) async fn take_over(
    broker: Arc<dyn Broker>,
    gone: NodeId,
    secret: Option<ClusterSecret>,
    is_back: impl Fn() -> bool,
    bounce: impl Fn(Arc<Envelope>),
) -> usize {
    let options = ConsumeOptions { prefetch: 64 };
    // A node frozen rather than dead still holds its consumer until RabbitMQ gives up on its
    // connection (its heartbeat timeout, 60 s by default): try for a while.
    let giving_up = tokio::time::Instant::now() + HOLD;
    let mut deliveries = loop {
        match broker.consume(&gone, &options).await {
            Ok(deliveries) => break deliveries,
            Err(BrokerError::QueueInUse { .. })
                if tokio::time::Instant::now() < giving_up && !is_back() =>
            {
                tokio::time::sleep(IDLE).await;
            }
            // No queue (it left gracefully), another survivor reads it, or it is back.
            Err(_) => return 0,
        }
    };
    tracing::info!(node = %gone, "taking over the queue of a node gone: answering the messages it never received");
    let mut answered = 0;
    loop {
        let delivery = match tokio::time::timeout(IDLE, deliveries.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            // Idle, or the queue went.
            Err(_) | Ok(None) | Ok(Some(Err(_))) => break,
        };
        if is_back() {
            let _ = delivery.acker.requeue().await;
            tracing::info!(node = %gone, "the node is back: its queue is its own again");
            break;
        }
        let envelope = match Envelope::from_message(delivery.message) {
            Ok(envelope) => envelope,
            Err(_) => {
                let _ = delivery.acker.dead_letter().await;
                continue;
            }
        };
        let authentic = secret.as_ref().is_none_or(|secret| {
            envelope
                .verify(secret, SystemTime::now(), DEFAULT_REPLAY_WINDOW * 10)
                .is_ok()
        });
        if !authentic {
            let _ = delivery.acker.dead_letter().await;
            continue;
        }
        if matches!(envelope.target, Target::Connection(_)) && envelope.sender.is_some() {
            answered += 1;
            bounce(Arc::new(envelope));
        }
        let _ = delivery.acker.ack().await;
    }
    tracing::info!(node = %gone, answered, "let go of the queue of a node gone");
    answered
}
