//! Section 2: cross-node one-way latency, next to raw AMQP and a raw WebSocket echo.

use std::time::Duration;

use hybrid_cluster::Durability;
use hybrid_cluster_test_support::BoxError;
use tokio::time::Instant;

use crate::probes::{Probe, measure};
use crate::report::{Lat, Report, Verdict, ratio, us};
use crate::serve::{start_nodes, stop_nodes};
use crate::stages::{self, Mark, STAGE_NAMES, STAGES};
use crate::{Ctx, cleanup};

/// Measures and reports the section.
pub(crate) async fn run(ctx: &mut Ctx) -> Result<(), BoxError> {
    let samples = ctx.sizes.samples;
    let prefix = ctx.prefix("latency");
    let durable_prefix = ctx.prefix("latency-durable");
    let nodes = start_nodes(&prefix, 2, Durability::Transient).await?;
    let durable_nodes = start_nodes(&durable_prefix, 2, Durability::Durable).await?;
    let result = async {
        let probes = vec![
            Probe::one_way(&nodes[0].url(), &nodes[1].url()).await?,
            Probe::amqp().await?,
            Probe::echo().await?,
            Probe::one_way(&durable_nodes[0].url(), &durable_nodes[1].url()).await?,
        ];
        let latencies = measure(probes, samples).await?;
        let stages = breakdown(&nodes[0].url(), &nodes[1].url(), samples.min(2_000)).await?;
        Ok::<_, BoxError>((latencies, stages))
    }
    .await;
    stop_nodes(nodes).await;
    stop_nodes(durable_nodes).await;
    cleanup(&prefix).await;
    cleanup(&durable_prefix).await;
    let (latencies, stages) = result?;
    let (ours, amqp, ws, durable) = match latencies[..] {
        [ours, amqp, ws, durable] => (ours, amqp, ws, durable),
        _ => return Err("four measures expected".into()),
    };
    report(&mut ctx.report, ours, amqp, ws, durable, samples);
    report_breakdown(&mut ctx.report, &stages, samples.min(2_000));
    Ok(())
}

/// Where a lone message's time goes (see [`stages`]): `samples` messages one at a time from
/// a client on `from` to one on `to`, with the nodes' marks recorded; each message's stages.
async fn breakdown(
    from: &str,
    to: &str,
    samples: usize,
) -> Result<Vec<[Duration; STAGES]>, BoxError> {
    let mut probe = Probe::one_way(from, to).await?;
    for _ in 0..200 {
        probe.sample().await?;
    }
    let mut measured = Vec::with_capacity(samples);
    stages::start();
    let result = async {
        for _ in 0..samples {
            stages::take();
            let sent = Instant::now();
            let elapsed = probe.sample().await?;
            let received = sent + elapsed;
            // The confirmation may come after the receipt: wait for it, a little.
            let mut marks = stages::take();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !marks.iter().any(|(m, _)| *m == Mark::SendClosed) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_micros(100)).await;
                marks.extend(stages::take());
            }
            if let Some(stages) = stages::stages(&marks, sent, received) {
                measured.push(stages);
            }
        }
        Ok::<_, BoxError>(())
    }
    .await;
    stages::stop();
    probe.close().await;
    result?;
    Ok(measured)
}

/// The breakdown's rows: each stage's p50/p99/p999, and what the slowest messages waited on.
fn report_breakdown(r: &mut Report, measured: &[[Duration; STAGES]], samples: usize) {
    r.note(format!(
        "2. breakdown: {} of {samples} lone messages had every mark; the stages follow the path, their p50s add up to about the one-way p50",
        measured.len()
    ));
    for (i, name) in STAGE_NAMES.iter().enumerate() {
        let all: Vec<Duration> = measured.iter().map(|s| s[i]).collect();
        r.row(
            format!("2. breakdown, transient: {name}"),
            Lat::of(&all).show(),
            "—",
            "—",
            "—",
            Verdict::Info,
        );
    }
    for (share, label) in [(0.01, "1 %"), (0.001, "0.1 %")] {
        let tail = stages::tail(measured, share);
        let parts: Vec<String> = tail
            .iter()
            .take(3)
            .map(|(stage, excess, part)| {
                format!(
                    "{} +{excess:.0} µs ({:.0} %)",
                    STAGE_NAMES[*stage],
                    part * 100.0
                )
            })
            .collect();
        r.row(
            format!("2. tail: the slowest {label} of messages wait longer than the median in"),
            parts.join("; "),
            "—",
            "—",
            "—",
            Verdict::Info,
        );
    }
}

/// The rows of the section: ours next to the sum of its parts.
fn report(r: &mut Report, ours: Lat, amqp: Lat, ws: Lat, durable: Lat, samples: usize) {
    let (sum50, sum99, sum999) = (amqp.p50 + ws.p50, amqp.p99 + ws.p99, amqp.p999 + ws.p999);
    let budget = sum50 + 50.0;
    r.row(
        "2. cross-node latency p50, transient (one-way, A → B)",
        us(ours.p50),
        format!("{} AMQP + WS echo", us(sum50)),
        ratio(ours.p50, sum50),
        format!("≤ sum + 50 µs = {}", us(budget)),
        Verdict::of(ours.p50 <= budget),
    );
    r.row(
        "2. cross-node latency p99, transient",
        us(ours.p99),
        format!("{} AMQP p99 + WS p99", us(sum99)),
        ratio(ours.p99, sum99),
        format!("≤ 1.3 × sum = {}", us(1.3 * sum99)),
        Verdict::of(ours.p99 <= 1.3 * sum99),
    );
    r.row(
        "2. cross-node latency p999, transient",
        us(ours.p999),
        format!("{} AMQP p999 + WS p999", us(sum999)),
        ratio(ours.p999, sum999),
        format!("≤ 2 × sum = {}", us(2.0 * sum999)),
        Verdict::of(ours.p999 <= 2.0 * sum999),
    );
    r.row(
        "2. cross-node latency, durable (the default), p50/p99/p999",
        durable.show(),
        format!("{} transient p99", us(ours.p99)),
        ratio(durable.p99, ours.p99),
        "p99 ≤ 2 ms",
        Verdict::of(durable.p99 <= 2_000.0),
    );
    r.row(
        "2. raw AMQP publish → consume p50/p99/p999",
        "—",
        amqp.show(),
        "—",
        "—",
        Verdict::Info,
    );
    r.row(
        "2. raw WebSocket echo RTT p50/p99/p999",
        "—",
        ws.show(),
        "—",
        "—",
        Verdict::Info,
    );
    r.note(format!(
        "2, 3: {samples} samples each after 200 warm-up, the measures interleaved in blocks of 100; cluster latency is one-way (send → the target client has it), raw AMQP is publish → delivery (confirms on, awaited after), raw WS is a full echo round trip"
    ));
}
