//! Section 4: one broadcast reaching N clients over 3 nodes of a child process.

use std::time::Duration;

use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use hybrid_cluster_test_support::BoxError;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::child::ChildServer;
use crate::clients::{connect_many, data, seq_of};
use crate::machine::client_budget;
use crate::report::{Verdict, median};
use crate::serve::WAIT;
use crate::{Ctx, Sink, Ws, cleanup};

/// Connects `budget` clients over `urls` and times `rounds` broadcasts from one of them to
/// all: (clients, failed connections, median time to the last, deliveries missing).
async fn fanout(
    urls: &[String],
    budget: usize,
    rounds: usize,
) -> Result<(usize, usize, f64, usize), BoxError> {
    let (clients, failures) = connect_many(urls, budget, true).await;
    let n = clients.len();
    if n == 0 {
        return Err::<_, BoxError>("no client connected".into());
    }
    let (tx, mut rx) = mpsc::channel::<(usize, Instant)>(n + 16);
    let mut sinks: Vec<Sink> = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    for ws in clients {
        let (sink, stream) = ws.split();
        sinks.push(sink);
        readers.push(tokio::spawn(read_broadcasts(stream, rounds, tx.clone())));
    }
    drop(tx);
    let mut times = Vec::new();
    let mut short = 0;
    for round in 0..rounds {
        let (got, time) = broadcast_once(&mut sinks[0], &mut rx, round, n).await?;
        short += n - got;
        times.push(time);
        // Let the nodes settle before the next round.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(sinks);
    for reader in readers {
        reader.abort();
    }
    Ok((n, failures, median(times), short))
}

/// A client's reader: the sequence number of each broadcast it gets, and when.
async fn read_broadcasts(
    mut stream: SplitStream<Ws>,
    rounds: usize,
    arrivals: mpsc::Sender<(usize, Instant)>,
) {
    for _ in 0..rounds + 10 {
        match timeout(Duration::from_secs(300), stream.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                if let Some(seq) = seq_of(text.as_str()) {
                    let _ = arrivals.send((seq, Instant::now())).await;
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
}

/// Broadcast `round` through `sink`, then waits (at most 60 s) until `n` clients have it:
/// (clients that had it, seconds from the send to the last of them).
async fn broadcast_once(
    sink: &mut Sink,
    arrivals: &mut mpsc::Receiver<(usize, Instant)>,
    round: usize,
    n: usize,
) -> Result<(usize, f64), BoxError> {
    let frame = format!(r#"{{"op":"broadcast","data":{}}}"#, data(round));
    let start = Instant::now();
    timeout(WAIT, sink.send(Message::text(frame)))
        .await
        .map_err(|_| "the broadcast was not sent")??;
    let mut got = 0;
    let mut last = start;
    let deadline = start + Duration::from_secs(60);
    while got < n {
        match tokio::time::timeout_at(deadline, arrivals.recv()).await {
            Ok(Some((seq, at))) if seq == round => {
                got += 1;
                last = last.max(at);
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    Ok((got, (last - start).as_secs_f64()))
}

/// One broadcast to `wanted` clients over 3 nodes of a child process, `rounds` times.
pub(crate) async fn broadcast_fanout(
    ctx: &mut Ctx,
    wanted: usize,
    rounds: usize,
) -> Result<(), BoxError> {
    let (budget, why) = client_budget(wanted);
    if let Some(why) = &why {
        ctx.report.note(format!("4: {why}"));
    }
    let prefix = ctx.prefix(&format!("broadcast{wanted}"));
    let child = ChildServer::nodes(&prefix, 3).await?;
    let result = fanout(&child.urls(), budget, rounds).await;
    child.stop().await;
    cleanup(&prefix).await;
    let (n, failures, time, short) = result?;
    ctx.report.row(
        format!("4. one broadcast → {n} clients on 3 nodes, time to the last"),
        format!("{:.1} ms", time * 1e3),
        "—",
        "—",
        "— (socket.io 30 ms, socketioxide 24 ms at 1k on 2 nodes, TARGETS.md)",
        Verdict::Info,
    );
    ctx.report.row(
        format!("4. broadcast deliveries per second ({n} clients)"),
        format!("{:.0} msg/s", n as f64 / time),
        "—",
        "—",
        "—",
        Verdict::Info,
    );
    if failures > 0 || short > 0 {
        ctx.report.note(format!(
            "4 ({wanted}): {failures} clients failed to connect; {short} deliveries missing over {rounds} broadcasts"
        ));
    }
    Ok(())
}

pub(crate) async fn run(ctx: &mut Ctx) -> Result<(), BoxError> {
    let rounds = ctx.sizes.broadcasts;
    for wanted in ctx.sizes.fanout.clone() {
        broadcast_fanout(ctx, wanted, rounds).await?;
    }
    ctx.report.note(format!(
        "4: the 3 nodes run in a child process (its own fd limit), the clients in this one; median of {rounds} broadcasts, the sender is one of the clients (it gets its broadcast too)"
    ));
    Ok(())
}
