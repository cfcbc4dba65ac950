//! Consumers: a node's deliveries, kept flowing across reconnects.
//!
//! Each consumer has its own channel (its prefetch is the channel's `basic.qos`) and an
//! exclusive `basic.consume` on the node's queue. A forwarding task moves lapin's deliveries
//! into a channel bounded by the prefetch, read by the owner's [`Deliveries`] stream. On a
//! new connection the supervisor starts the consumer again and a new forwarding task feeds
//! the same stream, so the stream survives reconnects.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use futures_core::future::BoxFuture;
use futures_util::StreamExt;
use hybrid_cluster_core::{Acker, Acknowledge, BrokerError, Delivery, NodeId, Settlement};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Consumer};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::shared::{Link, Shared};
use super::wire;

/// The owner's end of a consumer.
pub(crate) struct DeliveryStream {
    pub(crate) deliveries: mpsc::Receiver<Result<Delivery, BrokerError>>,
}

impl Stream for DeliveryStream {
    type Item = Result<Delivery, BrokerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.deliveries.poll_recv(cx)
    }
}

/// Opens a channel with the prefetch bound and starts an exclusive consumer on `queue`.
pub(crate) async fn start(
    link: &Link,
    queue: &ShortString,
    prefetch: u16,
) -> lapin::Result<(Channel, Consumer)> {
    let channel = link.connection.create_channel().await?;
    channel
        .basic_qos(prefetch.max(1), BasicQosOptions::default())
        .await?;
    let options = BasicConsumeOptions {
        exclusive: true,
        ..BasicConsumeOptions::default()
    };
    let consumer = channel
        .basic_consume(queue.clone(), "".into(), options, FieldTable::default())
        .await?;
    Ok((channel, consumer))
}

/// Moves one connection's deliveries to the owner's stream until the owner drops it, the
/// consumer is cancelled by RabbitMQ (its queue was deleted), or the connection is lost.
pub(crate) async fn forward(
    shared: Arc<Shared>,
    generation: u64,
    node: NodeId,
    id: u64,
    channel: Channel,
    mut consumer: Consumer,
    deliveries: mpsc::Sender<Result<Delivery, BrokerError>>,
) {
    loop {
        let next = tokio::select! {
            () = deliveries.closed() => None,
            next = consumer.next() => Some(next),
        };
        let next = match next {
            // The owner dropped the stream: stop consuming; the channel's unacknowledged
            // messages go back to the queue when it closes.
            None => break,
            Some(next) => next,
        };
        match next {
            Some(Ok(delivery)) => {
                let mut delivery = delivery;
                let parts = match wire::batch_count(&delivery.properties) {
                    None => None,
                    Some(count) => {
                        // The messages' bodies are slices of the batch's, not copies.
                        let data = Bytes::from(std::mem::take(&mut delivery.data));
                        match wire::decode_batch(&data, count) {
                            Ok(messages) => Some(messages),
                            Err(reason) => {
                                // Handed on as it is: the receiver dead-letters it as malformed.
                                warn!(%node, reason, "a batch that cannot be read");
                                delivery.data = Vec::from(data);
                                None
                            }
                        }
                    }
                };
                let redelivered = delivery.redelivered;
                let handed = match parts {
                    Some(messages) => {
                        let acker = Arc::new(Mutex::new(BatchState {
                            acker: Some(delivery.acker),
                            remaining: messages.len(),
                            settlement: Settlement::Ack,
                        }));
                        let mut handed = true;
                        for message in messages {
                            let delivery = Delivery {
                                message,
                                redelivered,
                                acker: Acker::new(BatchPart(Arc::clone(&acker))),
                            };
                            if deliveries.send(Ok(delivery)).await.is_err() {
                                handed = false;
                                break;
                            }
                        }
                        handed
                    }
                    None => {
                        let message = wire::decode(&delivery.properties, delivery.data);
                        let delivery = Delivery {
                            message,
                            redelivered,
                            acker: Acker::new(RabbitAcker(delivery.acker)),
                        };
                        deliveries.send(Ok(delivery)).await.is_ok()
                    }
                };
                if !handed {
                    break;
                }
            }
            Some(Err(error)) => {
                debug!(%node, %error, "consumer interrupted; it resumes on the next connection");
                return;
            }
            None => {
                if channel.status().connected() && link_is_current(&shared, generation) {
                    // Cancelled by RabbitMQ (the queue was deleted): the stream ends.
                    debug!(%node, "consumer cancelled by RabbitMQ");
                    remove(&shared, &node, id);
                    return;
                }
                debug!(%node, "consumer interrupted; it resumes on the next connection");
                return;
            }
        }
    }
    remove(&shared, &node, id);
    let _ = channel.close(200, "consumer dropped".into()).await;
}

fn link_is_current(shared: &Shared, generation: u64) -> bool {
    let state = shared.state.lock();
    state.connected && state.generation == generation
}

fn remove(shared: &Shared, node: &NodeId, id: u64) {
    let mut state = shared.state.lock();
    if state
        .consumers
        .get(node)
        .is_some_and(|entry| entry.id == id)
    {
        state.consumers.remove(node);
    }
}

/// Settles a delivery through lapin. An acknowledgement for a channel that is gone fails
/// with [`BrokerError::StaleDelivery`]: RabbitMQ delivers the message again.
struct RabbitAcker(lapin::Acker);

impl Acknowledge for RabbitAcker {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(settle(self.0, settlement))
    }
}

/// The messages of one batch share its AMQP delivery: it is settled once every message is.
/// Acknowledged when all were; dead-lettered whole when any was (the dead-letter queue then
/// holds the batch, its good messages included, which were handed over already); put back
/// whole when any was (the messages handed over come again and are dropped as duplicates).
/// A message dropped unsettled leaves the batch unacknowledged until its consumer closes,
/// as a lone delivery would be.
struct BatchState {
    acker: Option<lapin::Acker>,
    remaining: usize,
    settlement: Settlement,
}

struct BatchPart(Arc<Mutex<BatchState>>);

fn severity(settlement: Settlement) -> u8 {
    match settlement {
        Settlement::Ack => 0,
        Settlement::DeadLetter => 1,
        Settlement::Requeue => 2,
    }
}

impl Acknowledge for BatchPart {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        let last = {
            let mut state = self.0.lock();
            state.remaining = state.remaining.saturating_sub(1);
            if severity(settlement) > severity(state.settlement) {
                state.settlement = settlement;
            }
            if state.remaining == 0 {
                state.acker.take().map(|acker| (acker, state.settlement))
            } else {
                None
            }
        };
        match last {
            Some((acker, settlement)) => Box::pin(settle(acker, settlement)),
            None => Box::pin(std::future::ready(Ok(()))),
        }
    }
}

async fn settle(acker: lapin::Acker, settlement: Settlement) -> Result<(), BrokerError> {
    let done = match settlement {
        Settlement::Ack => acker.ack(BasicAckOptions::default()).await,
        // With the queue's dead-letter exchange set, RabbitMQ moves it there.
        Settlement::DeadLetter => acker.reject(BasicRejectOptions { requeue: false }).await,
        Settlement::Requeue => {
            acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
        }
    };
    match done {
        Ok(true) => Ok(()),
        Ok(false) | Err(_) => Err(BrokerError::StaleDelivery),
    }
}
