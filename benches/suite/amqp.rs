//! Raw lapin, the broker's own ceiling (as `layers/routing/benches/throughput.rs` measures it).

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hybrid_cluster_test_support::{BoxError, servers};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::time::{Instant, timeout};

use crate::serve::WAIT;
use crate::{PAYLOAD, tag};

/// Raw lapin publishes in flight (as the routing bench and TARGETS.md measure it).
pub(crate) const IN_FLIGHT: usize = 256;

/// A queue of its own between two connections: one publishes with confirms, the other
/// consumes. The queue expires a minute after its last consumer, should `close` not run.
pub(crate) struct RawQueue {
    publisher: Connection,
    consumer_conn: Connection,
    /// The publishing channel (confirms on).
    pub(crate) channel: lapin::Channel,
    /// A channel of the consuming connection.
    pub(crate) sub_channel: lapin::Channel,
    pub(crate) queue: String,
}

impl RawQueue {
    /// A queue named `hc-suite:<what>:<random>`, durable or not.
    pub(crate) async fn open(what: &str, durable: bool) -> Result<Self, BoxError> {
        let publisher = amqp_connection().await?;
        let consumer_conn = amqp_connection().await?;
        let queue = format!("hc-suite:{what}:{}", tag());
        let channel = publisher.create_channel().await?;
        declare_raw_queue(&channel, &queue, durable).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let sub_channel = consumer_conn.create_channel().await?;
        Ok(Self {
            publisher,
            consumer_conn,
            channel,
            sub_channel,
            queue,
        })
    }

    /// Deletes the queue and closes both connections.
    pub(crate) async fn close(self) {
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self.publisher.close(200, "OK".into()).await;
        let _ = self.consumer_conn.close(200, "OK".into()).await;
    }
}

async fn amqp_connection() -> Result<Connection, BoxError> {
    Ok(Connection::connect(&servers::amqp_url(), ConnectionProperties::default()).await?)
}

async fn declare_raw_queue(
    channel: &lapin::Channel,
    queue: &str,
    durable: bool,
) -> Result<(), BoxError> {
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
    let options = QueueDeclareOptions {
        durable,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), options, arguments)
        .await?;
    Ok(())
}

/// Raw lapin: one connection publishes `n` × 128 B with publisher confirms, 256 in flight, to
/// a queue another connection consumes (prefetch 256), acknowledging each (pipelined) or not
/// at all (`no_ack`, the ceiling); `durable`: a durable queue and persistent messages, so a
/// confirm means on disk. Messages per second, first publish to last delivery. Also returns
/// how many deliveries came after one published later (out of order).
pub(crate) async fn raw_lapin_rate(
    n: usize,
    no_ack: bool,
    durable: bool,
) -> Result<(f64, usize), BoxError> {
    let raw = RawQueue::open("raw", durable).await?;
    raw.sub_channel
        .basic_qos(256, BasicQosOptions::default())
        .await?;
    let consumer = raw
        .sub_channel
        .basic_consume(
            raw.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let consuming = tokio::spawn(consume(consumer, n, no_ack));
    let start = Instant::now();
    publish(&raw.channel, &raw.queue, n, durable).await?;
    let (seen, late) = consuming.await?;
    let elapsed = start.elapsed();
    raw.close().await;
    if seen < n {
        return Err(format!("raw lapin: {seen} of {n} consumed").into());
    }
    Ok((n as f64 / elapsed.as_secs_f64(), late))
}

/// Consumes `n` messages, acknowledging each (pipelined) unless `no_ack`: (consumed, out of
/// order).
async fn consume(mut consumer: lapin::Consumer, n: usize, no_ack: bool) -> (usize, usize) {
    let mut acks = FuturesUnordered::new();
    let (mut seen, mut late, mut highest) = (0, 0, None);
    while seen < n {
        tokio::select! {
            biased;
            Some(()) = acks.next(), if !acks.is_empty() => continue,
            delivery = timeout(WAIT, consumer.next()) => {
                let Ok(Some(Ok(delivery))) = delivery else { break };
                seen += 1;
                let seq = std::str::from_utf8(&delivery.data[..8]).ok().and_then(|s| s.parse::<usize>().ok());
                if seq < highest {
                    late += 1;
                }
                highest = highest.max(seq);
                if no_ack {
                    continue;
                }
                let mut ack = Box::pin(async move {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                });
                if std::future::poll_fn(|cx| std::task::Poll::Ready(ack.as_mut().poll(cx)))
                    .await
                    .is_pending()
                {
                    acks.push(ack);
                }
            }
        }
    }
    while let Ok(Some(())) = timeout(WAIT, acks.next()).await {}
    (seen, late)
}

/// Publishes `n` × 128 B to `queue` with confirms, 256 in flight, persistent when `durable`,
/// each body starting with its sequence number; waits for the last confirms.
async fn publish(
    pub_channel: &lapin::Channel,
    queue: &str,
    n: usize,
    durable: bool,
) -> Result<(), BoxError> {
    let mut confirms = FuturesUnordered::new();
    for i in 0..n {
        // The body starts with its 8-digit sequence number, so the consumer can check order.
        let mut payload = format!("{i:08}").into_bytes();
        payload.resize(PAYLOAD, b'x');
        if confirms.len() >= IN_FLIGHT {
            timeout(WAIT, confirms.next())
                .await
                .map_err(|_| "no confirm")?;
        }
        let channel = pub_channel.clone();
        let queue = queue.to_owned();
        let mut publish = Box::pin(async move {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default().with_delivery_mode(if durable { 2 } else { 1 }),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack());
        });
        // Poll once now so that publishes are written in order, as the forwarding service does.
        if std::future::poll_fn(|cx| std::task::Poll::Ready(publish.as_mut().poll(cx)))
            .await
            .is_pending()
        {
            confirms.push(publish);
        }
    }
    while let Ok(Some(())) = timeout(WAIT, confirms.next()).await {}
    Ok(())
}
