//! Section 7: CPU per delivered message at full rate, nodes and RabbitMQ together, for
//! unicast, group and broadcast, next to raw lapin's (the publishing and consuming process
//! and RabbitMQ). The nodes run in a child process, so that the clients' CPU is not theirs.

use futures_util::{SinkExt, StreamExt};
use hybrid_cluster_test_support::BoxError;
use hybrid_cluster_test_support::process::cpu_ticks;
use hybrid_cluster_test_support::rabbitmq::broker_pid;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

use crate::amqp::raw_lapin_rate;
use crate::child::ChildServer;
use crate::clients::{client, connect_many, data, next_text};
use crate::report::Verdict;
use crate::serve::WAIT;
use crate::throughput::{send, unicast_run};
use crate::{Ctx, Ws, cleanup};

/// The group every receiver of the group measure joins.
const GROUP: &str = "cpu";

/// The CPU time of `pids` together, in seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|pid| cpu_ticks(*pid)).sum::<u64>() as f64 / 100.0
}

/// What one measure used: deliveries, and the CPU µs of the measured processes per delivery.
struct Used {
    delivered: usize,
    micros_each: f64,
}

/// Runs `work` (which returns how many messages it delivered) and divides the CPU `pids`
/// used meanwhile by them.
async fn per_delivery(
    pids: &[u32],
    work: impl Future<Output = Result<usize, BoxError>>,
) -> Result<Used, BoxError> {
    let before = cpu_seconds(pids);
    let delivered = work.await?;
    let used = cpu_seconds(pids) - before;
    if delivered == 0 {
        return Err("nothing was delivered".into());
    }
    Ok(Used {
        delivered,
        micros_each: used * 1e6 / delivered as f64,
    })
}

/// `receivers` clients on the nodes but the first join the group; one client on the first
/// sends `messages` group messages as fast as it can. Returns the deliveries counted.
async fn group_run(urls: &[String], receivers: usize, messages: usize) -> Result<usize, BoxError> {
    let mut members = Vec::new();
    for i in 0..receivers {
        let (mut ws, _) = client(&urls[1 + i % (urls.len() - 1)], None).await?;
        ws.send(Message::text(format!(
            r#"{{"op":"join","group":"{GROUP}","id":1}}"#
        )))
        .await?;
        while !next_text(&mut ws).await?.contains(r#""type":"ack""#) {}
        members.push(ws);
    }
    let counting: Vec<_> = members
        .into_iter()
        .map(|ws| tokio::spawn(count(ws, "\"type\":\"group\"", messages)))
        .collect();
    let (sender, _) = client(&urls[0], None).await?;
    let frames = (0..messages)
        .map(|i| format!(r#"{{"op":"group","group":"{GROUP}","data":{}}}"#, data(i)))
        .collect();
    let sender = send(sender, frames).await?;
    let mut delivered = 0;
    for counting in counting {
        delivered += counting.await?;
    }
    drop(sender);
    Ok(delivered)
}

/// `clients` clients over every node; one of them sends `broadcasts` broadcasts as fast as
/// it can, which every client (the sender too) counts. Returns the deliveries counted.
async fn broadcast_run(
    urls: &[String],
    clients: usize,
    broadcasts: usize,
) -> Result<usize, BoxError> {
    let (mut connected, _) = connect_many(urls, clients, true).await;
    let sender = connected.pop().ok_or("no client connected")?;
    let (sink, stream) = sender.split();
    let counting: Vec<_> = connected
        .into_iter()
        .map(|ws| tokio::spawn(count(ws, "\"type\":\"broadcast\"", broadcasts)))
        .collect();
    let sender_counts = tokio::spawn(count_stream(stream, "\"type\":\"broadcast\"", broadcasts));
    let mut sink = sink;
    for i in 0..broadcasts {
        sink.feed(Message::text(format!(
            r#"{{"op":"broadcast","data":{}}}"#,
            data(i)
        )))
        .await?;
    }
    sink.flush().await?;
    let mut delivered = sender_counts.await?;
    for counting in counting {
        delivered += counting.await?;
    }
    Ok(delivered)
}

/// Counts frames holding `marker` on `ws`, up to `expected`, until none comes for a while.
async fn count(ws: Ws, marker: &'static str, expected: usize) -> usize {
    let (_sink, stream) = ws.split();
    count_stream(stream, marker, expected).await
}

async fn count_stream(
    mut stream: futures_util::stream::SplitStream<Ws>,
    marker: &'static str,
    expected: usize,
) -> usize {
    let mut got = 0;
    while got < expected {
        match timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if text.as_str().contains(marker) => got += 1,
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    got
}

pub(crate) async fn run(ctx: &mut Ctx) -> Result<(), BoxError> {
    let broker = broker_pid()
        .await
        .ok_or("RabbitMQ's pid is unknown (`rabbitmqctl eval 'os:getpid().'` failed)")?;
    let n = ctx.sizes.messages;
    let (receivers, group_messages) = (20, n / 20);
    let (clients, broadcasts) = (ctx.sizes.fanout[0], (n / ctx.sizes.fanout[0]).max(10));
    let prefix = ctx.prefix("cpu");
    let child = ChildServer::nodes(&prefix, 3).await?;
    let (urls, nodes) = (child.urls(), [child.pid(), broker]);
    let measured = async {
        let unicast = per_delivery(&nodes, async {
            let run = unicast_run(&urls[0], &urls[1], 1, n).await?;
            Ok(n - run.lost)
        })
        .await?;
        let group = per_delivery(&nodes, group_run(&urls, receivers, group_messages)).await?;
        let broadcast = per_delivery(&nodes, broadcast_run(&urls, clients, broadcasts)).await?;
        Ok::<_, BoxError>((unicast, group, broadcast))
    }
    .await;
    child.stop().await;
    cleanup(&prefix).await;
    let (unicast, group, broadcast) = measured?;
    let raw = per_delivery(&[std::process::id(), broker], async {
        raw_lapin_rate(n, false, true).await.map(|_| n)
    })
    .await?;
    ctx.report.row(
        "7: CPU per delivered message at full rate, nodes + RabbitMQ (`durable`): unicast / group / broadcast",
        format!(
            "{:.1} / {:.1} / {:.1} µs ({} / {} / {} deliveries; group: {receivers} members on 2 nodes, broadcast: {clients} clients on 3 nodes)",
            unicast.micros_each,
            group.micros_each,
            broadcast.micros_each,
            unicast.delivered,
            group.delivered,
            broadcast.delivered,
        ),
        format!(
            "raw lapin, durable queue, persistent, confirms + ack: {:.1} µs a message (its process + RabbitMQ)",
            raw.micros_each
        ),
        format!("{:.2} (unicast)", unicast.micros_each / raw.micros_each),
        "—",
        Verdict::Info,
    );
    Ok(())
}
