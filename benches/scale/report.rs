//! The report's tables.

use std::fmt::Write as _;

use crate::clients::{Kind, Tally};
use crate::measure::{NodeSample, Snapshot};

/// Per node and summed: the servers' load over the window.
pub(crate) fn write_nodes(
    report: &mut String,
    idle: &Snapshot,
    before: &Snapshot,
    after: &Snapshot,
    seconds: f64,
) -> std::fmt::Result {
    writeln!(
        report,
        "## Per node, over {seconds:.0} s of traffic\n\n| node | connections | registry round trips/s | Redis commands/s | discovery events/s | publishes/s (unicast / group / broadcast) | binds/s | unbinds/s | group bindings | deliveries from the broker/s | CPU % of a core | RSS MiB | KiB per connection |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    let mut total = NodeSample::default();
    let mut cpu_total = 0.0;
    let mut grown_total = 0.0;
    for ((a, b), start) in before.nodes.iter().zip(&after.nodes).zip(&idle.nodes) {
        let rate = |x: f64, y: f64| (y - x) / seconds;
        let cpu = (b.cpu_ticks.saturating_sub(a.cpu_ticks)) as f64 / seconds;
        let row = NodeSample {
            id: b.id.clone(),
            connections: b.connections,
            registry_ops: rate(a.registry_ops, b.registry_ops),
            redis_commands: rate(a.redis_commands, b.redis_commands),
            registry_events: rate(a.registry_events, b.registry_events),
            publishes: [0, 1, 2].map(|i| rate(a.publishes[i], b.publishes[i])),
            binds: rate(a.binds, b.binds),
            unbinds: rate(a.unbinds, b.unbinds),
            group_bindings: b.group_bindings,
            received: rate(a.received, b.received),
            cpu_ticks: 0,
            rss_mib: b.rss_mib,
        };
        let grown = b.rss_mib - start.rss_mib;
        write_node_row(report, &row, cpu, grown)?;
        grown_total += grown;
        total.connections += row.connections;
        total.registry_ops += row.registry_ops;
        total.redis_commands += row.redis_commands;
        total.registry_events += row.registry_events;
        for i in 0..3 {
            total.publishes[i] += row.publishes[i];
        }
        total.binds += row.binds;
        total.unbinds += row.unbinds;
        total.group_bindings += row.group_bindings;
        total.received += row.received;
        total.rss_mib += row.rss_mib;
        cpu_total += cpu;
    }
    total.id = "**cluster**".to_owned();
    write_node_row(report, &total, cpu_total, grown_total)?;
    writeln!(
        report,
        "\nRedis commands/s: the node's registry round trips by operation, times the commands each sends (`REDIS_COMMANDS` in `measure.rs`); Redis's own count for the whole cluster is below. KiB per connection: the node's resident memory grown since it had no connection, per connection (memberships, inbox and socket buffers included)."
    )
}

pub(crate) fn write_node_row(
    report: &mut String,
    row: &NodeSample,
    cpu: f64,
    grown_mib: f64,
) -> std::fmt::Result {
    writeln!(
        report,
        "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} / {:.0} / {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} |",
        row.id,
        row.connections,
        row.registry_ops,
        row.redis_commands,
        row.registry_events,
        row.publishes[0],
        row.publishes[1],
        row.publishes[2],
        row.binds,
        row.unbinds,
        row.group_bindings,
        row.received,
        cpu,
        row.rss_mib,
        if row.connections > 0.0 {
            grown_mib * 1024.0 / row.connections
        } else {
            0.0
        }
    )
}

/// Per kind of request over the window: sent, answered, errors, latency; then deliveries.
pub(crate) fn write_requests(report: &mut String, tally: &Tally, seconds: f64) -> std::fmt::Result {
    writeln!(
        report,
        "## Requests over the window (client-observed)\n\n| request | sent/s | acked | errors | answer p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|"
    )?;
    for kind in Kind::ALL {
        let Some(k) = tally.kinds.get(&kind) else {
            continue;
        };
        let errors = if k.errors.is_empty() {
            "0".to_owned()
        } else {
            k.errors
                .iter()
                .map(|(code, n)| format!("{n} {code}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            report,
            "| {} | {:.1} | {} | {} | {:.2} | {:.2} | {:.1} |",
            kind.name(),
            k.sent as f64 / seconds,
            k.acked,
            errors,
            k.latency.value_at_quantile(0.5) as f64 / 1_000.0,
            k.latency.value_at_quantile(0.99) as f64 / 1_000.0,
            k.latency.max() as f64 / 1_000.0
        )?;
    }
    let received = tally
        .received
        .iter()
        .map(|(kind, n)| format!("{:.0}/s {kind}", *n as f64 / seconds))
        .collect::<Vec<_>>()
        .join(", ");
    writeln!(
        report,
        "\nDelivered to clients: {received}. Connections that ended early: {}.",
        tally.ended
    )
}
