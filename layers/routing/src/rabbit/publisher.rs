//! The publisher task: puts queued publishes on the wire in call order, keeps up to
//! `max_in_flight` of them unconfirmed, and settles each with its confirmation.
//!
//! lapin orders a `basic_publish` when its future is first polled (it then pushes the frames
//! and registers the confirmation), and resolves it once the frames are written. The task
//! therefore polls each publish once as soon as it creates it, in queue order, and keeps the
//! confirmations in flight together instead of awaiting them one by one.
//!
//! When the connection is lost, the publishes sent and not confirmed go back to the head of
//! the queue, in order, and are sent again on the next connection: a message may then reach
//! its queue twice, which receivers drop by message id.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::Poll;

use futures_core::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use hybrid_cluster_core::{BrokerError, PublishError};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{Channel, Confirmation};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::shared::{Link, Pending, Shared, shut_down};
use crate::receive::poll_once;

type Confirm = BoxFuture<'static, (u64, lapin::Result<Confirmation>)>;

enum Ended {
    /// The connection was replaced (or lost and reported by the supervisor).
    LinkChanged,
    /// A publish failed on this connection.
    Broken,
    Shutdown,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn run(shared: Arc<Shared>) {
    let mut links = shared.link.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    let mut failed_generation = 0;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let link = links
            .borrow_and_update()
            .clone()
            .filter(|link| link.generation > failed_generation);
        match link {
            Some(link) => match publish_on(&shared, &link, &mut links, &mut shutdown).await {
                Ended::LinkChanged => {}
                Ended::Broken => failed_generation = link.generation,
                Ended::Shutdown => break,
            },
            None => {
                // An outage: wait for the next connection, failing publishes that wait too long.
                let wake_at = shared.expire();
                tokio::select! {
                    changed = links.changed() => if changed.is_err() { break },
                    () = sleep_until(wake_at) => {}
                    () = shut_down(&mut shutdown) => break,
                }
            }
        }
    }
    shared.fail_pending(|| BrokerError::Closed);
}

async fn open_channel(link: &Link) -> lapin::Result<Channel> {
    let channel = link.connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

fn publish_one(channel: &Channel, exchange: &ShortString, pending: &Pending, seq: u64) -> Confirm {
    let channel = channel.clone();
    let exchange = exchange.clone();
    let routing_key = pending.routing_key.clone();
    let properties = pending.properties.clone();
    let body = pending.body.clone();
    Box::pin(async move {
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let result = async {
            channel
                .basic_publish(exchange, routing_key, options, &body, properties)
                .await?
                .await
        }
        .await;
        (seq, result)
    })
}

/// Settles the publish `seq` with its confirmation. `false` when the channel failed: the
/// publish stays in `sent`, to be sent again.
fn confirm(
    shared: &Shared,
    sent: &mut BTreeMap<u64, Pending>,
    seq: u64,
    result: lapin::Result<Confirmation>,
) -> bool {
    let confirmation = match result {
        Ok(confirmation) => confirmation,
        Err(error) => {
            debug!(%error, "a publish failed: its channel is lost");
            return false;
        }
    };
    let Some(pending) = sent.remove(&seq) else {
        return true;
    };
    let result = match confirmation {
        Confirmation::Ack(None) => Ok(()),
        // Returned (mandatory): no queue is bound to the key.
        Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable { key: pending.key }),
        // A bound queue is full (reject-publish), or RabbitMQ could not take it.
        Confirmation::Nack(_) => Err(PublishError::Rejected { key: pending.key }),
        Confirmation::NotRequested => Err(PublishError::Broker(BrokerError::Backend {
            source: "publisher confirms are not enabled on the channel".into(),
        })),
    };
    let _ = pending.reply.send(result);
    shared.settled(1);
    true
}

async fn publish_on(
    shared: &Shared,
    link: &Link,
    links: &mut watch::Receiver<Option<Link>>,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let channel = match open_channel(link).await {
        Ok(channel) => channel,
        Err(error) => {
            warn!(%error, "opening the publishing channel failed");
            shared.report_broken(link.generation);
            return Ended::Broken;
        }
    };
    let exchange = shared.names.exchange.clone();
    let max_in_flight = shared.config.max_in_flight.max(1);
    let mut confirms: FuturesUnordered<Confirm> = FuturesUnordered::new();
    let mut sent: BTreeMap<u64, Pending> = BTreeMap::new();
    let mut batch = Vec::new();
    let mut seq = 0u64;
    let ended = 'publishing: loop {
        // Put waiting publishes on the wire, in call order, up to the in-flight bound.
        let room = max_in_flight.saturating_sub(sent.len());
        if room > 0 {
            shared.take_pending(room, &mut batch);
        }
        for pending in batch.drain(..) {
            if pending.reply.is_closed() {
                // The caller stopped waiting before it was sent: it is not sent.
                shared.settled(1);
                continue;
            }
            seq += 1;
            let mut publish = publish_one(&channel, &exchange, &pending, seq);
            sent.insert(seq, pending);
            // The first poll pushes the frames: this fixes the message's place on the wire.
            match poll_once(&mut publish).await {
                Poll::Ready((seq, result)) => {
                    if !confirm(shared, &mut sent, seq, result) {
                        break 'publishing Ended::Broken;
                    }
                }
                Poll::Pending => confirms.push(publish),
            }
        }
        let wake_at = shared.expire();
        tokio::select! {
            biased;
            () = shut_down(shutdown) => break 'publishing Ended::Shutdown,
            _ = links.changed() => break 'publishing Ended::LinkChanged,
            Some((seq, result)) = confirms.next(), if !confirms.is_empty() => {
                if !confirm(shared, &mut sent, seq, result) {
                    break 'publishing Ended::Broken;
                }
                // Settle every confirmation already in before refilling.
                while let Some(Some((seq, result))) = confirms.next().now_or_never() {
                    if !confirm(shared, &mut sent, seq, result) {
                        break 'publishing Ended::Broken;
                    }
                }
            }
            () = shared.publisher_wake.notified() => {}
            () = sleep_until(wake_at) => {}
        }
    };
    if matches!(ended, Ended::Broken) {
        shared.report_broken(link.generation);
    }
    drop(confirms);
    // Sent and not confirmed: back to the head of the queue, in order, for the next connection.
    if !sent.is_empty() {
        debug!(
            count = sent.len(),
            "publishes to send again on the next connection"
        );
    }
    shared.requeue(sent.into_values().collect());
    ended
}
