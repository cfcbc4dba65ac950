//! Section 3: same-node one-way latency, next to a raw WebSocket echo.

use hybrid_cluster::Durability;
use hybrid_cluster_test_support::BoxError;

use crate::probes::{Probe, measure};
use crate::report::{Verdict, ratio, us};
use crate::serve::{start_nodes, stop_nodes};
use crate::{Ctx, cleanup};

pub(crate) async fn run(ctx: &mut Ctx) -> Result<(), BoxError> {
    let samples = ctx.sizes.samples;
    let prefix = ctx.prefix("local");
    let nodes = start_nodes(&prefix, 1, Durability::default()).await?;
    let result = async {
        let probes = vec![
            Probe::one_way(&nodes[0].url(), &nodes[0].url()).await?,
            Probe::echo().await?,
        ];
        measure(probes, samples).await
    }
    .await;
    stop_nodes(nodes).await;
    cleanup(&prefix).await;
    let (ours, ws) = match result?[..] {
        [ours, ws] => (ours, ws),
        _ => return Err("two measures expected".into()),
    };
    let r = &mut ctx.report;
    r.row(
        "3. local delivery latency p50 (one node)",
        us(ours.p50),
        format!("{} WS echo", us(ws.p50)),
        ratio(ours.p50, ws.p50),
        format!("≤ 1.2 × WS echo = {}", us(1.2 * ws.p50)),
        Verdict::of(ours.p50 <= 1.2 * ws.p50),
    );
    r.row(
        "3. local delivery latency p99 / p999",
        format!("{:.0} / {:.0} µs", ours.p99, ours.p999),
        format!("{:.0} / {:.0} µs WS echo", ws.p99, ws.p999),
        ratio(ours.p99, ws.p99),
        "—",
        Verdict::Info,
    );
    Ok(())
}
