//! Section 1: cross-node unicast throughput, next to raw lapin.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hybrid_cluster::Durability;
use hybrid_cluster_test_support::BoxError;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::amqp::raw_lapin_rate;
use crate::clients::{client, send_frame, seq_of};
use crate::report::{Verdict, median, rate, ratio};
use crate::serve::{RunningNode, WAIT, start_nodes, stop_nodes};
use crate::{Ctx, Ws, cleanup};

/// What one cross-node throughput run saw.
pub(crate) struct Unicast {
    rate: f64,
    lost: usize,
    out_of_order: usize,
}

/// `pairs` senders on `a`, each sending `total / pairs` messages without ids to its receiver
/// on `b`, which counts them. Rate: messages received / (first send → last receipt).
pub(crate) async fn unicast_run(
    a: &RunningNode,
    b: &RunningNode,
    pairs: usize,
    total: usize,
) -> Result<Unicast, BoxError> {
    let per_pair = total / pairs;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..pairs {
        let (sender, _) = client(&a.url(), None).await?;
        let (receiver, receiver_id) = client(&b.url(), None).await?;
        let frames: Vec<String> = (0..per_pair).map(|i| send_frame(&receiver_id, i)).collect();
        senders.push((sender, frames));
        receivers.push(receiver);
    }
    // Receivers: count, check order, remember when the last one came.
    let receiving: Vec<JoinHandle<(usize, usize, Instant)>> = receivers
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                // Out of order: a message arriving after one sent later than it.
                let (mut got, mut out_of_order, mut highest) = (0, 0, None);
                let mut last = Instant::now();
                while got < per_pair {
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
            })
        })
        .collect();
    let start = Instant::now();
    let sending: Vec<JoinHandle<Result<Ws, BoxError>>> = senders
        .into_iter()
        .map(|(mut ws, frames)| {
            tokio::spawn(async move {
                // Frames are fed and flushed 16 at a time (a client writing as fast as it can).
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
            })
        })
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
            let one = unicast_run(&nodes[0], &nodes[1], 1, n).await?;
            let four = unicast_run(&nodes[0], &nodes[1], 4, n).await?;
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

pub(crate) async fn run(ctx: &mut Ctx) -> Result<(), BoxError> {
    let n = ctx.sizes.messages;
    let rounds = ctx.sizes.rounds;
    // The raw broker, measured between the cluster runs so that both see the same machine.
    let (mut raw_acks, mut raw_no_acks, mut raw_durables, mut late_raw) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    let mut raw_errors = Vec::new();
    let transient = throughput_rounds(ctx, Durability::Transient).await?;
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
    let durable = throughput_rounds(ctx, Durability::Durable).await?;
    let (raw_ack, raw_no_ack, raw_durable) =
        (median(raw_acks), median(raw_no_acks), median(raw_durables));
    let r = &mut ctx.report;
    for (label, ours) in [("1 pair", transient.one), ("4 pairs", transient.four)] {
        r.row(
            format!("1. cross-node unicast, transient, {label} ({n} × 128 B, no ids)"),
            rate(ours),
            format!("{} raw lapin confirms + ack", rate(raw_ack)),
            ratio(ours, raw_ack),
            "≥ 0.80 × raw",
            Verdict::of(ours >= 0.8 * raw_ack),
        );
    }
    for (label, ours) in [("1 pair", durable.one), ("4 pairs", durable.four)] {
        r.row(
            format!("1. cross-node unicast, durable (the default), {label}"),
            rate(ours),
            format!(
                "{} raw lapin transient confirms + ack ({} durable)",
                rate(raw_ack),
                rate(raw_durable)
            ),
            ratio(ours, raw_ack),
            "≥ 1.0 × raw transient",
            Verdict::of(ours >= raw_ack),
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
    Ok(())
}
