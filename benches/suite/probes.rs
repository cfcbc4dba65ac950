//! Latency probes, sampled one message at a time and interleaved: through the cluster, raw
//! AMQP, and a raw WebSocket echo.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hybrid_cluster_test_support::BoxError;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::amqp::RawQueue;
use crate::clients::{acked_send_frame, acked_send_user_frame, client, connect, next_text, seq_of};
use crate::report::Lat;
use crate::serve::{WAIT, echo_server};
use crate::{PAYLOAD, Ws};

/// One latency measure, sampled one message at a time.
#[allow(clippy::large_enum_variant)] // a handful of probes, built once
pub(crate) enum Probe {
    /// Raw AMQP: publish (confirms on) → the consumer on another connection has it. The
    /// confirm and the ack are awaited after the sample, before the next message.
    Amqp {
        raw: RawQueue,
        consumer: lapin::Consumer,
    },
    /// Raw tokio-tungstenite echo round trip on loopback (TCP_NODELAY both ways).
    Echo { ws: Box<Ws>, server: JoinHandle<()> },
    /// Through the cluster, one way: `from` sends to `to_id`, `to` has it (one process, one
    /// clock). The send's ack is awaited after the sample, before the next message.
    OneWay {
        from: Box<Ws>,
        to: Box<Ws>,
        to_id: String,
        seq: usize,
        /// Sent to this user (`send_user`, `to` being their one connection), not to `to_id`.
        user: Option<String>,
    },
}

impl Probe {
    pub(crate) async fn amqp() -> Result<Self, BoxError> {
        let raw = RawQueue::open("rtt", false).await?;
        let consumer = raw
            .sub_channel
            .basic_consume(
                raw.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self::Amqp { raw, consumer })
    }

    pub(crate) async fn echo() -> Result<Self, BoxError> {
        let (port, server) = echo_server(None, 4).await?;
        let ws = connect(&format!("ws://127.0.0.1:{port}/"), None).await?;
        Ok(Self::Echo {
            ws: Box::new(ws),
            server,
        })
    }

    pub(crate) async fn one_way(from_url: &str, to_url: &str) -> Result<Self, BoxError> {
        let (from, _) = client(from_url, None).await?;
        let (to, to_id) = client(to_url, None).await?;
        Ok(Self::OneWay {
            from: Box::new(from),
            to: Box::new(to),
            to_id,
            seq: 0,
            user: None,
        })
    }

    /// [`one_way`](Probe::one_way) to a user: `to_url` carries the user's token, and each
    /// message is a `send_user` to `user`.
    pub(crate) async fn one_way_to_user(
        from_url: &str,
        to_url: &str,
        user: &str,
    ) -> Result<Self, BoxError> {
        let mut probe = Self::one_way(from_url, to_url).await?;
        if let Self::OneWay { user: to_user, .. } = &mut probe {
            *to_user = Some(user.to_owned());
        }
        Ok(probe)
    }

    pub(crate) async fn sample(&mut self) -> Result<Duration, BoxError> {
        match self {
            Self::Amqp { raw, consumer } => {
                let payload = [7u8; PAYLOAD];
                let start = Instant::now();
                let confirm = raw
                    .channel
                    .basic_publish(
                        "".into(),
                        raw.queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &payload,
                        BasicProperties::default(),
                    )
                    .await?;
                let delivery = timeout(WAIT, consumer.next())
                    .await
                    .map_err(|_| "no delivery")?
                    .ok_or("the consumer ended")??;
                let elapsed = start.elapsed();
                delivery.ack(BasicAckOptions::default()).await?;
                timeout(WAIT, confirm).await.map_err(|_| "no confirm")??;
                Ok(elapsed)
            }
            Self::Echo { ws, .. } => {
                let payload = "x".repeat(PAYLOAD);
                let start = Instant::now();
                ws.send(Message::text(payload)).await?;
                next_text(ws).await?;
                Ok(start.elapsed())
            }
            Self::OneWay {
                from,
                to,
                to_id,
                seq,
                user,
            } => {
                *seq += 1;
                let frame = match user {
                    Some(user) => acked_send_user_frame(user, *seq),
                    None => acked_send_frame(to_id, *seq),
                };
                let start = Instant::now();
                from.send(Message::text(frame)).await?;
                let got = next_text(to).await?;
                let elapsed = start.elapsed();
                if seq_of(&got) != Some(*seq) {
                    return Err(format!("expected message {seq}, got {got}").into());
                }
                // As the raw AMQP probe awaits its confirmation: the next message goes out
                // once this one is settled, a lone message on an idle node.
                let ack = next_text(from).await?;
                if !ack.contains(r#""type":"ack""#) {
                    return Err(format!("expected the ack of message {seq}, got {ack}").into());
                }
                Ok(elapsed)
            }
        }
    }

    pub(crate) async fn close(self) {
        match self {
            Self::Amqp { raw, .. } => raw.close().await,
            Self::Echo { mut ws, server } => {
                let _ = timeout(WAIT, WebSocketStream::close(&mut *ws, None)).await;
                server.abort();
            }
            Self::OneWay { .. } => {}
        }
    }
}

/// Samples every probe `samples` times (after 200 warm-up samples each), interleaved in blocks
/// of 100 so that the load of this shared machine weighs on all of them alike.
pub(crate) async fn interleaved(
    probes: &mut [Probe],
    samples: usize,
) -> Result<Vec<Lat>, BoxError> {
    const BLOCK: usize = 100;
    for probe in probes.iter_mut() {
        for _ in 0..200 {
            probe.sample().await?;
        }
    }
    let mut measured: Vec<Vec<Duration>> = probes.iter().map(|_| Vec::new()).collect();
    for block in 0..samples.div_ceil(BLOCK) {
        let count = BLOCK.min(samples - block * BLOCK);
        for (probe, measured) in probes.iter_mut().zip(&mut measured) {
            for _ in 0..count {
                measured.push(probe.sample().await?);
            }
        }
    }
    Ok(measured.iter().map(|samples| Lat::of(samples)).collect())
}

/// Runs `interleaved` and closes the probes whatever happened.
pub(crate) async fn measure(mut probes: Vec<Probe>, samples: usize) -> Result<Vec<Lat>, BoxError> {
    let result = interleaved(&mut probes, samples).await;
    for probe in probes {
        probe.close().await;
    }
    result
}
