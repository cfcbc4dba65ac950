//! Section 8: sessions on next to off, in the same run: cross-node throughput and lone-message
//! latency (durable mode, a Redis write per message delivered), and the memory of an idle
//! connection with its session, on the node and in Redis.

use hybrid_cluster::Durability;
use hybrid_cluster_test_support::BoxError;

use crate::child::ChildServer;
use crate::machine::client_budget;
use crate::memory::idle_memory;
use crate::probes::{Probe, measure};
use crate::redis_info::{info_number, redis_info};
use crate::report::{Lat, Verdict, median, rate, ratio, us};
use crate::serve::{start_nodes_with, stop_nodes};
use crate::throughput::unicast_run;
use crate::{Ctx, cleanup};

/// Throughput medians of one cluster: (1 pair, 4 pairs), and messages lost or late.
struct Rates {
    one: Vec<f64>,
    four: Vec<f64>,
    lost: usize,
    late: usize,
}

impl Rates {
    fn new() -> Self {
        Self {
            one: Vec::new(),
            four: Vec::new(),
            lost: 0,
            late: 0,
        }
    }

    async fn round(&mut self, a: &str, b: &str, n: usize) -> Result<(), BoxError> {
        let one = unicast_run(a, b, 1, n).await?;
        let four = unicast_run(a, b, 4, n).await?;
        self.lost += one.lost + four.lost;
        self.late += one.out_of_order + four.out_of_order;
        self.one.push(one.rate);
        self.four.push(four.rate);
        Ok(())
    }
}

pub(crate) async fn run(ctx: &mut Ctx) -> Result<(), BoxError> {
    let (n, rounds, samples) = (ctx.sizes.messages, ctx.sizes.rounds, ctx.sizes.samples);
    let (off_prefix, on_prefix) = (ctx.prefix("sessions-off"), ctx.prefix("sessions-on"));
    let off = start_nodes_with(&off_prefix, 2, Durability::Durable, false).await?;
    let on = start_nodes_with(&on_prefix, 2, Durability::Durable, true).await?;
    let measured = async {
        let (mut without, mut with) = (Rates::new(), Rates::new());
        for round in 1..=rounds {
            without.round(&off[0].url(), &off[1].url(), n).await?;
            with.round(&on[0].url(), &on[1].url(), n).await?;
            println!(
                "  round {round}: sessions off {:.0} / {:.0}, on {:.0} / {:.0} msg/s (1 / 4 pairs)",
                without.one[round - 1],
                without.four[round - 1],
                with.one[round - 1],
                with.four[round - 1]
            );
        }
        let probes = vec![
            Probe::one_way(&off[0].url(), &off[1].url()).await?,
            Probe::one_way(&on[0].url(), &on[1].url()).await?,
        ];
        let latencies = measure(probes, samples).await?;
        Ok::<_, BoxError>((without, with, latencies))
    }
    .await;
    stop_nodes(off).await;
    stop_nodes(on).await;
    cleanup(&off_prefix).await;
    cleanup(&on_prefix).await;
    let (without, with, latencies) = measured?;
    let [lat_off, lat_on] = latencies[..] else {
        return Err("two latency measures expected".into());
    };
    report_speed(ctx, without, with, lat_off, lat_on);
    report_memory(ctx).await
}

fn report_speed(ctx: &mut Ctx, without: Rates, with: Rates, off: Lat, on: Lat) {
    let r = &mut ctx.report;
    for (pairs, on_rate, off_rate) in [
        (1, median(with.one.clone()), median(without.one.clone())),
        (4, median(with.four.clone()), median(without.four.clone())),
    ] {
        r.row(
            format!("8. cross-node throughput with sessions, {pairs} pair(s), durable"),
            rate(on_rate),
            format!("{} sessions off", rate(off_rate)),
            ratio(on_rate, off_rate),
            format!("≥ 0.8 × off = {}", rate(0.8 * off_rate)),
            Verdict::of(on_rate >= 0.8 * off_rate),
        );
    }
    r.row(
        "8. … lost / out of order, sessions on (off)",
        format!("{} / {}", with.lost, with.late),
        format!("{} / {}", without.lost, without.late),
        "—",
        "0 / 0",
        Verdict::of(with.lost + with.late == 0),
    );
    r.row(
        "8. cross-node latency with sessions, p50, durable",
        us(on.p50),
        format!("{} sessions off", us(off.p50)),
        format!("+{}", us(on.p50 - off.p50)),
        format!("≤ off + 30 µs = {}", us(off.p50 + 30.0)),
        Verdict::of(on.p50 <= off.p50 + 30.0),
    );
    r.row(
        "8. … p99 / p999",
        format!("{} / {}", us(on.p99), us(on.p999)),
        format!("{} / {} sessions off", us(off.p99), us(off.p999)),
        ratio(on.p99, off.p99),
        "—",
        Verdict::Info,
    );
    r.note("8: sessions on: every message delivered is written to its session's log in Redis (one Lua script) before the client is handed it and before its delivery is acknowledged to RabbitMQ");
}

/// Idle connections with sessions on one node in a child process, next to one without: the
/// node's memory per connection, and Redis's per session.
async fn report_memory(ctx: &mut Ctx) -> Result<(), BoxError> {
    let (budget, _) = client_budget(ctx.sizes.idle);
    let prefix = ctx.prefix("sessions-memory");
    let before = redis_used_memory().await?;
    let child = ChildServer::nodes_with_sessions(&prefix, 1).await;
    let with = idle_memory(child, budget, true).await;
    let after = redis_used_memory().await?;
    cleanup(&prefix).await;
    let (with, n) = with?;
    let off_prefix = ctx.prefix("sessions-memory-off");
    let without = idle_memory(ChildServer::nodes(&off_prefix, 1).await, budget, true).await;
    cleanup(&off_prefix).await;
    let (without, _) = without?;
    let redis_per_session = after.saturating_sub(before) as f64 / n as f64;
    let r = &mut ctx.report;
    r.row(
        format!("8. memory per idle connection with a session, one node ({n})"),
        format!("{with:.1} KiB"),
        format!("{without:.1} KiB sessions off"),
        ratio(with, without),
        "—",
        Verdict::Info,
    );
    r.row(
        "8. … Redis memory per idle session",
        format!("{redis_per_session:.0} B"),
        "—",
        "—",
        "—",
        Verdict::Info,
    );
    Ok(())
}

/// Redis's `used_memory`, in bytes.
async fn redis_used_memory() -> Result<u64, BoxError> {
    let info = redis_info("memory").await?;
    info_number(&info, "used_memory").ok_or_else(|| "no used_memory in INFO".into())
}
