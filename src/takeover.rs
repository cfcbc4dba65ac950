//! A node gone without leaving (crashed, cut off) leaves its queue behind, with the messages
//! peers sent it before they learnt it was gone: each of them was confirmed to its sender.
//! A surviving node takes the queue over and answers every unicast in it with an
//! undeliverable notice to its sender, so that none of them is lost without a word.
//!
//! Every survivor tries; the consumer is exclusive, so one wins and the others find the queue
//! in use (or gone: a node that left gracefully deleted its own, if it was empty) and try
//! again for a while. The winner reads the queue in rounds of at most [`ROUND`]: broadcasts
//! and group messages keep coming to a queue still bound, so a round ends when the queue is
//! idle for [`IDLE`] or the round is over, and the queue is let go in between, so that its
//! node, back under the same id, can take it again (it tries every 250 ms). After the last
//! round the queue expires on its own (its `x-expires`). A node that comes back while its
//! queue is being read gets it back at once: the message in hand is put back for it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use futures_core::future::BoxFuture;
use futures_util::StreamExt;
use hybrid_cluster_core::{
    Broker, BrokerError, ClusterSecret, ConsumeOptions, DEFAULT_REPLAY_WINDOW, Envelope, NodeId,
    Target,
};
use hybrid_cluster_routing::EnvelopeCodec;

/// How long a taken-over queue may stay idle before it is let go.
pub(crate) const IDLE: Duration = Duration::from_secs(2);

/// How long one round of reading a taken-over queue lasts at most.
pub(crate) const ROUND: Duration = Duration::from_secs(5);

/// How long a queue still in use (its node frozen, its connection not yet given up on) is
/// tried again.
const HOLD: Duration = Duration::from_secs(90);

/// Reads the queue of `gone`, if no one else does and it is still there, handing each unicast
/// (and, for the sessions its node held, each group message and broadcast) to `answer` (which
/// tells its sender, or keeps it for the sessions it is for), until it is idle or `is_back`
/// says its node returned. Returns how many unicasts were answered.
///
/// With `sessions`, the queue is read for as long as messages keep coming (senders to a
/// session's old connection id publish there while it exists, to stay in order behind what it
/// holds), and deleted once it is idle and empty: from then on those sends follow the session.
pub(crate) async fn take_over(
    broker: Arc<dyn Broker>,
    gone: NodeId,
    secret: Option<ClusterSecret>,
    sessions: bool,
    is_back: impl Fn() -> bool,
    answer: impl Fn(Envelope) -> BoxFuture<'static, ()>,
) -> usize {
    let mut giving_up = Instant::now() + HOLD;
    let mut answered = 0;
    while Instant::now() < giving_up && !is_back() {
        match read_round(&*broker, &gone, secret.as_ref(), &is_back, &answer).await {
            Round::InUse => tokio::time::sleep(IDLE).await,
            // Busy to the end of the round: let its node have a chance, then go on.
            Round::Busy(n) => {
                answered += n;
                if sessions {
                    giving_up = Instant::now() + HOLD;
                }
                tokio::time::sleep(IDLE / 4).await;
            }
            Round::Done(n) => {
                answered += n;
                if !sessions || is_back() {
                    break;
                }
                match broker.delete_queue_if_empty(&gone).await {
                    Ok(true) => break,
                    // A message came meanwhile, or the queue is in use: another round.
                    Ok(false) | Err(_) => tokio::time::sleep(IDLE / 4).await,
                }
            }
        }
    }
    if answered > 0 {
        tracing::info!(node = %gone, answered, "let go of the queue of a node gone");
    }
    answered
}

/// How a round of reading a taken-over queue ended.
enum Round {
    /// Someone else reads it (its node, frozen or back, or another survivor).
    InUse,
    /// Messages kept coming until the end of the round; this many were answered.
    Busy(usize),
    /// Nothing more to do: idle, gone, or its node is back; this many were answered.
    Done(usize),
}

async fn read_round(
    broker: &dyn Broker,
    gone: &NodeId,
    secret: Option<&ClusterSecret>,
    is_back: &impl Fn() -> bool,
    answer: &impl Fn(Envelope) -> BoxFuture<'static, ()>,
) -> Round {
    let options = ConsumeOptions { prefetch: 64 };
    let mut deliveries = match broker.consume(gone, &options).await {
        Ok(deliveries) => deliveries,
        Err(BrokerError::QueueInUse { .. }) => return Round::InUse,
        // No queue (it left gracefully), or it cannot be read.
        Err(_) => return Round::Done(0),
    };
    tracing::info!(node = %gone, "taking over the queue of a node gone: answering the messages it never received");
    let round_ends = Instant::now() + ROUND;
    let mut answered = 0;
    loop {
        let next =
            tokio::time::timeout_at(round_ends.min(Instant::now() + IDLE), deliveries.next());
        let delivery = match next.await {
            Ok(Some(Ok(delivery))) => delivery,
            Err(_) if Instant::now() >= round_ends => return Round::Busy(answered),
            // Idle, or the queue went.
            Err(_) | Ok(None) | Ok(Some(Err(_))) => return Round::Done(answered),
        };
        if is_back() {
            let _ = delivery.acker.requeue().await;
            tracing::info!(node = %gone, "the node is back: its queue is its own again");
            return Round::Done(answered);
        }
        let envelope = match Envelope::from_message(delivery.message) {
            Ok(envelope) => envelope,
            Err(_) => {
                let _ = delivery.acker.dead_letter().await;
                continue;
            }
        };
        let authentic = secret.is_none_or(|secret| {
            envelope
                .verify(secret, SystemTime::now(), DEFAULT_REPLAY_WINDOW * 10)
                .is_ok()
        });
        if !authentic {
            let _ = delivery.acker.dead_letter().await;
            continue;
        }
        if matches!(envelope.target, Target::Connection(_)) {
            answered += 1;
        }
        answer(envelope).await;
        let _ = delivery.acker.ack().await;
    }
}
