//! Section 1: cross-node unicast throughput, next to raw lapin.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hybrid_cluster::Durability;
use hybrid_cluster_test_support::BoxError;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::amqp::raw_lapin_rate;
use crate::clients::{client, send_frame, send_user_frame, seq_of};
use crate::report::{Report, Verdict, median, rate, ratio};
use crate::serve::{WAIT, start_nodes, stop_nodes};
use crate::{Ctx, Ws, cleanup};

/// What one cross-node throughput run saw.
pub(crate) struct Unicast {
    pub(crate) rate: f64,
    pub(crate) lost: usize,
    pub(crate) out_of_order: usize,
}

/// `pairs` senders on `a`, each sending `total / pairs` messages without ids to its receiver
/// on `b`, which counts them. Rate: messages received / (first send → last receipt).
pub(crate) async fn unicast_run(
    a: &str,
    b: &str,
    pairs: usize,
    total: usize,
) -> Result<Unicast, BoxError> {
    pairs_run(a, b, pairs, total, None).await
}

/// [`unicast_run`], or with `users` (a JWT maker), each receiver connected as user `u{k}`
/// and each sender sending to that user (`send_user`) rather than to its connection.
pub(crate) async fn pairs_run(
    a: &str,
    b: &str,
    pairs: usize,
    total: usize,
    users: Option<&dyn Fn(&str) -> String>,
) -> Result<Unicast, BoxError> {
    let per_pair = total / pairs;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for k in 0..pairs {
        let (sender, _) = client(a, None).await?;
        let user = format!("u{k}");
        let url = match users {
            Some(token) => format!("{b}?token={}", token(&user)),
            None => b.to_owned(),
        };
        let (receiver, receiver_id) = client(&url, None).await?;
        let frames: Vec<String> = (0..per_pair)
            .map(|i| match users {
                Some(_) => send_user_frame(&user, i),
                None => send_frame(&receiver_id, i),
            })
            .collect();
        senders.push((sender, frames));
        receivers.push(receiver);
    }
    // Receivers: count, check order, remember when the last one came.
    let receiving: Vec<JoinHandle<(usize, usize, Instant)>> = receivers
        .into_iter()
        .map(|ws| tokio::spawn(receive(ws, per_pair)))
        .collect();
    let start = Instant::now();
    let sending: Vec<JoinHandle<Result<Ws, BoxError>>> = senders
        .into_iter()
        .map(|(ws, frames)| tokio::spawn(send(ws, frames)))
        .collect();
    let mut kept = Vec::new();
    for sending in sending {
        kept.push(sending.await??);
    }
    let (mut got, mut out_of_order, mut last) = (0, 0, start);
    for receiving in receiving {
        let (g, o, l) = receiving.await?;
        got += g;
        out_of_order += o;
        last = last.max(l);
    }
    drop(kept);
    Ok(Unicast {
        rate: got as f64 / (last - start).as_secs_f64(),
        lost: per_pair * pairs - got,
        out_of_order,
    })
}

/// A receiver: counts up to `expected` messages, checks their order, and tells when the last
/// one came: (received, out of order, the last one's arrival).
async fn receive(mut ws: Ws, expected: usize) -> (usize, usize, Instant) {
    // Out of order: a message arriving after one sent later than it.
    let (mut got, mut out_of_order, mut highest) = (0, 0, None);
    let mut last = Instant::now();
    while got < expected {
        match timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let seq = seq_of(text.as_str());
                if seq < highest {
                    out_of_order += 1;
                }
                highest = highest.max(seq);
                got += 1;
                last = Instant::now();
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    (got, out_of_order, last)
}

/// A sender: writes `frames` as fast as it can, fed and flushed 16 at a time. Returns the
/// socket, kept open until every receiver is done.
pub(crate) async fn send(mut ws: Ws, frames: Vec<String>) -> Result<Ws, BoxError> {
    for (i, frame) in frames.into_iter().enumerate() {
        timeout(WAIT, ws.feed(Message::text(frame)))
            .await
            .map_err(|_| "the node stopped reading")??;
        if i % 16 == 15 {
            timeout(WAIT, ws.flush()).await.map_err(|_| "flush")??;
        }
    }
    timeout(WAIT, ws.flush()).await.map_err(|_| "flush")??;
    Ok(ws)
}

/// Cross-node throughput of one cluster in one durability mode, 1 and 4 pairs, over the
/// rounds: the medians, and the messages lost and out of order over all runs.
pub(crate) struct ModeThroughput {
    one: f64,
    four: f64,
    lost: usize,
    late: usize,
}

pub(crate) async fn throughput_rounds(
    ctx: &Ctx,
    mode: Durability,
) -> Result<ModeThroughput, BoxError> {
    let (n, rounds) = (ctx.sizes.messages, ctx.sizes.rounds);
    let prefix = ctx.prefix(&format!("throughput-{mode}"));
    let nodes = start_nodes(&prefix, 2, mode).await?;
    let result = async {
        let (mut ones, mut fours, mut lost, mut late) = (Vec::new(), Vec::new(), 0, 0);
        for round in 1..=rounds {
            let (a, b) = (nodes[0].url(), nodes[1].url());
            let one = unicast_run(&a, &b, 1, n).await?;
            let four = unicast_run(&a, &b, 4, n).await?;
            println!(
                "  round {round}, {mode}: cluster 1 pair {:.0}, 4 pairs {:.0} msg/s",
                one.rate, four.rate
            );
            lost += one.lost + four.lost;
            late += one.out_of_order + four.out_of_order;
            ones.push(one.rate);
            fours.push(four.rate);
        }
        Ok::<_, BoxError>(ModeThroughput {
            one: median(ones),
            four: median(fours),
            lost,
            late,
        })
    }
    .await;
    stop_nodes(nodes).await;
    cleanup(&prefix).await;
    result
}

/// Raw lapin's throughput over the rounds: the medians, and the deliveries out of order over
/// all runs.
struct RawThroughput {
    ack: f64,
    no_ack: f64,
    durable: f64,
    late: usize,
}

/// Raw lapin with an ack per message, without acks, and durable, `rounds` times; the first
/// error once every round has run.
async fn raw_rounds(n: usize, rounds: usize) -> Result<RawThroughput, BoxError> {
    let (mut raw_acks, mut raw_no_acks, mut raw_durables, mut late_raw) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    let mut raw_errors = Vec::new();
    for round in 1..=rounds {
        match async {
            let (raw_ack, late_ack) = raw_lapin_rate(n, false, false).await?;
            let (raw_no_ack, late_no_ack) = raw_lapin_rate(n, true, false).await?;
            let (raw_durable, late_durable) = raw_lapin_rate(n, false, true).await?;
            println!(
                "  round {round}: raw lapin ack {raw_ack:.0}, no-ack {raw_no_ack:.0}, durable {raw_durable:.0} msg/s"
            );
            Ok::<_, BoxError>((raw_ack, raw_no_ack, raw_durable, late_ack + late_no_ack + late_durable))
        }
        .await
        {
            Ok((ack, no_ack, durable, late)) => {
                raw_acks.push(ack);
                raw_no_acks.push(no_ack);
                raw_durables.push(durable);
                late_raw += late;
            }
            Err(error) => raw_errors.push(error.to_string()),
        }
    }
    if let Some(error) = raw_errors.first() {
        return Err(error.clone().into());
    }
    Ok(RawThroughput {
        ack: median(raw_acks),
        no_ack: median(raw_no_acks),
        durable: median(raw_durables),
        late: late_raw,
    })
}

/// Measures and reports the section.
pub(crate) async fn run(ctx: &mut Ctx) -> Result<(), BoxError> {
    let n = ctx.sizes.messages;
    let rounds = ctx.sizes.rounds;
    // The raw broker, measured between the cluster runs so that both see the same machine.
    let transient = throughput_rounds(ctx, Durability::Transient).await?;
    let raw = raw_rounds(n, rounds).await?;
    let durable = throughput_rounds(ctx, Durability::Durable).await?;
    report(&mut ctx.report, n, rounds, &transient, &durable, &raw);
    Ok(())
}

/// The rows of the section: each durability mode next to raw lapin.
fn report(
    r: &mut Report,
    n: usize,
    rounds: usize,
    transient: &ModeThroughput,
    durable: &ModeThroughput,
    raw: &RawThroughput,
) {
    let (raw_ack, raw_no_ack, raw_durable, late_raw) = (raw.ack, raw.no_ack, raw.durable, raw.late);
    let transient_clean = transient.lost == 0 && transient.late == 0;
    for (label, ours) in [("1 pair", transient.one), ("4 pairs", transient.four)] {
        r.row(
            format!("1. cross-node unicast, transient, {label} ({n} × 128 B, no ids)"),
            rate(ours),
            format!("{} raw lapin confirms + ack", rate(raw_ack)),
            ratio(ours, raw_ack),
            "≥ 3 × raw, 0 lost, 0 reordered",
            Verdict::of(ours >= 3.0 * raw_ack && transient_clean),
        );
    }
    let durable_clean = durable.lost == 0 && durable.late == 0;
    for (label, ours) in [("1 pair", durable.one), ("4 pairs", durable.four)] {
        r.row(
            format!("1. cross-node unicast, durable (the default), {label}"),
            rate(ours),
            format!(
                "{} raw lapin durable: persistent, confirms + ack ({} transient)",
                rate(raw_durable),
                rate(raw_ack)
            ),
            ratio(ours, raw_durable),
            "≥ 3 × raw durable, 0 lost, 0 reordered",
            Verdict::of(ours >= 3.0 * raw_durable && durable_clean),
        );
    }
    r.row(
        "1. raw lapin confirms, consumer no-ack (ceiling)",
        "—",
        rate(raw_no_ack),
        format!("{} (transient, 4 pairs)", ratio(transient.four, raw_no_ack)),
        "—",
        Verdict::Info,
    );
    r.note(format!(
        "1: median of {rounds} round(s); over all cluster runs {} messages lost (transient {}, durable {}), {} arrived after a message their sender sent later (transient {}, durable {}); raw lapin (same poll-once publishing): {late_raw} out of order; raw durable: a durable queue, persistent messages, confirms, an ack per message",
        transient.lost + durable.lost,
        transient.lost,
        durable.lost,
        transient.late + durable.late,
        transient.late,
        durable.late
    ));
}
