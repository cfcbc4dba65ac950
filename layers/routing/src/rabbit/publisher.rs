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
//!
//! **Returned messages are matched by identity.** Every AMQP publish carries its sequence
//! number on this channel as its `correlation_id`. lapin hands a `basic.return` to whichever
//! confirmation completes next (with `multiple` acks, in no set order), so the task reads the
//! correlation id of each returned message and fails as unroutable exactly the publish it
//! names. RabbitMQ sends a message's return before its ack, and lapin completes earlier
//! confirmations first, so every return is known by the time its own ack is: the task takes
//! every confirmation that is in before it settles any.

use std::collections::{BTreeMap, HashSet, VecDeque};
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

use super::error::RabbitError;
use super::shared::{Link, Pending, Shared, shut_down};
use super::wire;
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
    let channel = link.publishing.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// What one AMQP publish carries: a message alone, or a batch of several (see
/// [`wire::encode_batch`]), which the broker confirms, routes and refuses as one.
struct Outgoing {
    routing_key: ShortString,
    properties: lapin::BasicProperties,
    body: bytes::Bytes,
}

/// The publish of `group`. A batch that cannot be encoded (a message with more headers than a
/// batch frames) goes out as its first message alone, the others going back to `queue`.
fn outgoing(group: &mut Vec<Pending>, queue: &mut VecDeque<Pending>) -> Outgoing {
    if group.len() > 1 {
        let parts: Vec<wire::Part<'_>> = group
            .iter()
            .map(|pending| wire::Part {
                message_id: &pending.message.message_id,
                headers: &pending.message.headers,
                body: &pending.message.body,
            })
            .collect();
        if let Ok((properties, body)) = wire::encode_batch(&parts) {
            return Outgoing {
                routing_key: group[0].routing_key.clone(),
                properties,
                body,
            };
        }
        for pending in group.drain(1..).rev() {
            queue.push_front(pending);
        }
    }
    let one = &group[0];
    Outgoing {
        routing_key: one.routing_key.clone(),
        properties: one.properties.clone(),
        body: one.message.body.clone(),
    }
}

fn put_on_wire(
    channel: &Channel,
    exchange: &ShortString,
    outgoing: Outgoing,
    seq: u64,
    persistent: bool,
) -> Confirm {
    let channel = channel.clone();
    let exchange = exchange.clone();
    let Outgoing {
        routing_key,
        properties,
        body,
    } = outgoing;
    // Names this publish in a return (see the module docs).
    let properties = properties
        .with_correlation_id(ShortString::from(seq.to_string()))
        .with_delivery_mode(if persistent { 2 } else { 1 });
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

/// The confirmations in, not yet settled; and the publishes whose messages came back.
#[derive(Default)]
struct Confirmations {
    ready: Vec<(u64, lapin::Result<Confirmation>)>,
    returned: HashSet<u64>,
    /// Whether a publish expired unconfirmed since RabbitMQ last confirmed one.
    stuck: bool,
}

impl Confirmations {
    /// Notes a confirmation that came in, and the return it carries, whoever's it is.
    fn take(&mut self, seq: u64, result: lapin::Result<Confirmation>) {
        if let Ok(Confirmation::Ack(Some(message)) | Confirmation::Nack(Some(message))) = &result {
            match returned_seq(message) {
                Some(returned) => {
                    self.returned.insert(returned);
                }
                None => warn!("RabbitMQ returned a message this publisher cannot name"),
            }
        }
        self.ready.push((seq, result));
    }

    /// Settles every confirmation taken. `false` when the channel failed: the publishes not
    /// settled stay in `sent`, to be sent again.
    fn settle(
        &mut self,
        shared: &Shared,
        sent: &mut BTreeMap<u64, Vec<Pending>>,
        expired: &mut BTreeMap<u64, usize>,
    ) -> bool {
        let mut healthy = true;
        for (seq, result) in self.ready.drain(..) {
            let returned = self.returned.remove(&seq);
            if self.stuck && result.is_ok() {
                // RabbitMQ confirms again.
                self.stuck = false;
                shared.set_stuck(false);
            }
            if expired.remove(&seq).is_some() {
                // Its senders were told already; its room is free again.
                healthy &= result.is_ok();
                continue;
            }
            healthy &= confirm(shared, sent, seq, result, returned);
        }
        // A return is always followed by its publish's confirmation: what is left names a
        // publish settled already (none should), and must not pile up.
        if let Some(&oldest) = sent.keys().next() {
            self.returned.retain(|&seq| seq >= oldest);
        } else {
            self.returned.clear();
        }
        healthy
    }
}

/// The publish a returned message names by its correlation id.
fn returned_seq(message: &lapin::message::BasicReturnMessage) -> Option<u64> {
    message
        .delivery
        .properties
        .correlation_id()
        .as_ref()?
        .as_str()
        .parse()
        .ok()
}

/// Settles the publish `seq` with its confirmation; `returned` when its own message came
/// back. `false` when the channel failed: the publish stays in `sent`, to be sent again.
fn confirm(
    shared: &Shared,
    sent: &mut BTreeMap<u64, Vec<Pending>>,
    seq: u64,
    result: lapin::Result<Confirmation>,
    returned: bool,
) -> bool {
    let confirmation = match result {
        Ok(confirmation) => confirmation,
        Err(error) => {
            debug!(%error, "a publish failed: its channel is lost");
            return false;
        }
    };
    let Some(group) = sent.remove(&seq) else {
        return true;
    };
    let count = group.len();
    for pending in group {
        let result = match &confirmation {
            // Returned (mandatory): no queue is bound to the key.
            Confirmation::Ack(_) if returned => Err(PublishError::Unroutable { key: pending.key }),
            Confirmation::Ack(_) => Ok(()),
            // A bound queue is full (reject-publish), or RabbitMQ could not take it.
            Confirmation::Nack(_) => Err(PublishError::Rejected { key: pending.key }),
            Confirmation::NotRequested => Err(PublishError::Broker(BrokerError::Backend {
                source: "publisher confirms are not enabled on the channel".into(),
            })),
        };
        let _ = pending.reply.send(result);
    }
    shared.settled(count);
    true
}

/// Fails the publishes on the wire and unconfirmed for longer than the outage bound, and
/// returns when the next one would be due.
fn expire_unconfirmed(
    shared: &Shared,
    sent: &mut BTreeMap<u64, Vec<Pending>>,
    sent_at: &mut VecDeque<(u64, Instant)>,
    expired: &mut BTreeMap<u64, usize>,
) -> Option<Instant> {
    let bound = shared.config.outage_timeout;
    let now = Instant::now();
    while let Some(&(seq, at)) = sent_at.front() {
        if !sent.contains_key(&seq) {
            sent_at.pop_front();
            continue;
        }
        if at + bound > now {
            return Some(at + bound);
        }
        sent_at.pop_front();
        if let Some(group) = sent.remove(&seq) {
            expired.insert(seq, group.len());
            shared.set_stuck(true);
            warn!(
                messages = group.len(),
                after = ?bound,
                "RabbitMQ did not confirm a publish in time: its senders are told it is unavailable"
            );
            let count = group.len();
            for pending in group {
                let error = BrokerError::Unavailable {
                    source: Box::new(RabbitError::Unconfirmed { after: bound }),
                };
                let _ = pending.reply.send(Err(error.into()));
            }
            shared.settled(count);
        }
    }
    None
}

/// Takes from the head of `queue` the next group to publish as one AMQP message: the run of
/// messages for the same routing key that follows it, within the batch bounds. Only runs are
/// grouped, so every queue still receives its messages in call order.
fn next_group(queue: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut group = Vec::new();
    let mut bytes = 0;
    while let Some(next) = queue.front() {
        let same_key = group
            .first()
            .is_none_or(|first: &Pending| first.routing_key == next.routing_key);
        let fits = group.is_empty()
            || (group.len() < wire::MAX_BATCH
                && bytes + next.message.body.len() <= wire::MAX_BATCH_BYTES);
        if !same_key || !fits {
            break;
        }
        bytes += next.message.body.len();
        group.extend(queue.pop_front());
    }
    group
}

/// Publishes on `link` until it changes or breaks, or the broker shuts down.
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
    let mut round = Round::new(shared, channel);
    let ended = loop {
        if !round.send_waiting().await {
            break Ended::Broken;
        }
        let wake_at = round.expire();
        tokio::select! {
            biased;
            () = shut_down(shutdown) => break Ended::Shutdown,
            _ = links.changed() => break Ended::LinkChanged,
            Some((seq, result)) = round.confirms.next(), if !round.confirms.is_empty() => {
                if !round.confirmed(seq, result) {
                    break Ended::Broken;
                }
            }
            () = shared.publisher_wake.notified() => {}
            () = sleep_until(wake_at) => {}
        }
    };
    if matches!(ended, Ended::Broken) {
        shared.report_broken(link.generation);
    }
    round.end();
    ended
}

/// One connection's publishing: what is on the wire, unconfirmed, and what waits to go.
struct Round<'a> {
    shared: &'a Shared,
    channel: Channel,
    exchange: ShortString,
    max_in_flight: usize,
    persistent: bool,
    confirms: FuturesUnordered<Confirm>,
    confirmations: Confirmations,
    sent: BTreeMap<u64, Vec<Pending>>,
    /// When each publish went on the wire, in order: one unconfirmed past the outage bound
    /// fails (a blocked or stuck broker must not hold its senders, nor their places, forever).
    sent_at: VecDeque<(u64, Instant)>,
    /// Publishes failed that way and still on the wire, by message count: they keep their
    /// room until lapin settles them, so that a broker that stopped confirming never gets more
    /// than the in-flight bound.
    expired: BTreeMap<u64, usize>,
    batch: Vec<Pending>,
    /// Taken from the shared queue and not on the wire yet.
    queue: VecDeque<Pending>,
    seq: u64,
}

impl<'a> Round<'a> {
    fn new(shared: &'a Shared, channel: Channel) -> Self {
        Self {
            shared,
            channel,
            exchange: shared.names.exchange.clone(),
            max_in_flight: shared.config.max_in_flight.max(1),
            persistent: shared.config.persistent,
            confirms: FuturesUnordered::new(),
            confirmations: Confirmations::default(),
            sent: BTreeMap::new(),
            sent_at: VecDeque::new(),
            expired: BTreeMap::new(),
            batch: Vec::new(),
            queue: VecDeque::new(),
            seq: 0,
        }
    }

    /// Puts waiting publishes on the wire, in call order, up to the in-flight bound. Returns
    /// whether the connection still works.
    async fn send_waiting(&mut self) -> bool {
        // Messages, not AMQP publishes: a batch counts for each message it carries.
        let in_flight: usize =
            self.sent.values().map(Vec::len).sum::<usize>() + self.expired.values().sum::<usize>();
        let room = self.max_in_flight.saturating_sub(in_flight);
        if room > 0 {
            self.shared.take_pending(room, &mut self.batch);
        }
        // Sent even when its caller stopped waiting: a publish is placed in order at its
        // call, and withdrawing it would leave a gap in its sender's sequence.
        self.queue.extend(self.batch.drain(..));
        while !self.queue.is_empty() {
            if !self.send_next().await {
                return false;
            }
        }
        true
    }

    /// Puts the next group of the queue on the wire. Returns whether the connection still
    /// works.
    async fn send_next(&mut self) -> bool {
        let mut group = next_group(&mut self.queue);
        let outgoing = outgoing(&mut group, &mut self.queue);
        self.seq += 1;
        if group.len() > 1 {
            self.shared.batched(group.len());
        }
        let mut publish = put_on_wire(
            &self.channel,
            &self.exchange,
            outgoing,
            self.seq,
            self.persistent,
        );
        self.sent.insert(self.seq, group);
        self.sent_at.push_back((self.seq, Instant::now()));
        // The first poll pushes the frames: this fixes the message's place on the wire.
        tracing::trace!(name: "hybrid_cluster.stage.publishing", "publishing");
        match poll_once(&mut publish).await {
            Poll::Ready((seq, result)) => {
                self.confirmations.take(seq, result);
                self.settle()
            }
            Poll::Pending => {
                self.confirms.push(publish);
                true
            }
        }
    }

    /// Takes a confirmation in, and every other already in, then settles them. Returns whether
    /// the connection still works.
    fn confirmed(&mut self, seq: u64, result: lapin::Result<Confirmation>) -> bool {
        // Every confirmation already in is taken before any is settled, so that each return is
        // known before its own ack (see the module docs).
        self.confirmations.take(seq, result);
        while let Some(Some((seq, result))) = self.confirms.next().now_or_never() {
            self.confirmations.take(seq, result);
        }
        self.settle()
    }

    fn settle(&mut self) -> bool {
        self.confirmations
            .settle(self.shared, &mut self.sent, &mut self.expired)
    }

    /// Fails what waited too long; returns when something will have waited too long next.
    fn expire(&mut self) -> Option<Instant> {
        let unconfirmed_at = expire_unconfirmed(
            self.shared,
            &mut self.sent,
            &mut self.sent_at,
            &mut self.expired,
        );
        self.confirmations.stuck |= !self.expired.is_empty();
        match (self.shared.expire(), unconfirmed_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Gives back, in order, what this connection did not get confirmed.
    fn end(self) {
        drop(self.confirms);
        // Sent and not confirmed: back to the head of the queue, in order, for the next
        // connection.
        if !self.sent.is_empty() {
            debug!(
                count = self.sent.len(),
                "publishes to send again on the next connection"
            );
        }
        // A round cut short leaves the messages it had taken and not sent: they go back too.
        self.shared.requeue(
            self.sent.into_values().flatten().collect(),
            self.queue.into(),
        );
    }
}
