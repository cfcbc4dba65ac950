//! Section 6: the balancer's pick cost and discovery timings.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use hybrid_cluster::balance::{NodeSet, Selector, Strategy};
use hybrid_cluster::discovery::{Discovery, DiscoveryConfig, RedisOptions, RedisRegistry};
use hybrid_cluster::{ClusterPrefix, Epoch, Incarnation, LiveNodeInfo, NodeId, NodeInfo, RedisUrl};
use hybrid_cluster_test_support::{BoxError, servers};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{Instant, timeout};

use crate::report::{Report, Verdict, median, ratio};
use crate::{Ctx, cleanup};

pub(crate) fn node_set(n: usize, epoch: &Epoch) -> NodeSet<NodeId> {
    let mut rng = StdRng::seed_from_u64(n as u64);
    let mut set = NodeSet::with_shared_epoch(epoch.clone());
    for i in 0..n {
        let id = NodeId::new(format!("node-{i}")).unwrap();
        let mut info = NodeInfo::new(
            id.clone(),
            Incarnation::from_u64(i as u64),
            "10.0.0.1",
            5001,
        );
        info.max_connections = 1_000_000_000;
        info.connection_count = rng.random_range(0..10_000);
        info.cpu_usage_percent = rng.random_range(0.0..100.0);
        info.memory_usage_percent = rng.random_range(0.0..100.0);
        set.insert(id, LiveNodeInfo::with_epoch(info, epoch.clone()));
    }
    set
}

/// Nanoseconds per `Selector::pick`, as the balance crate's `pick` bench measures it.
pub(crate) fn pick_ns(strategy: Strategy, n: usize, picks: u32) -> f64 {
    let set = node_set(n, &Epoch::new());
    let mut selector = Selector::seeded(strategy, 1);
    for _ in 0..1000 {
        black_box(&selector.pick(black_box(&set)).unwrap().key);
    }
    let start = Instant::now();
    for _ in 0..picks {
        black_box(&selector.pick(black_box(&set)).unwrap().key);
    }
    start.elapsed().as_secs_f64() * 1e9 / f64::from(picks)
}

pub(crate) async fn start_discovery(
    prefix: &ClusterPrefix,
    name: &str,
    config: &DiscoveryConfig,
) -> Result<Discovery, BoxError> {
    let redis: RedisUrl = servers::redis_url().parse()?;
    let registry = RedisRegistry::connect(&redis, prefix, RedisOptions::default()).await?;
    let info = NodeInfo::new(NodeId::new(name)?, Incarnation::random(), "127.0.0.1", 5000);
    Ok(Discovery::start(Arc::new(registry), info, config.clone()).await?)
}

/// Waits (at most `limit`) until `observer` sees `id` in the cluster (`present`) or gone;
/// `what` names the event in the error.
async fn wait_seen(
    observer: &Discovery,
    id: &NodeId,
    present: bool,
    limit: Duration,
    what: &str,
) -> Result<(), BoxError> {
    timeout(
        limit,
        observer
            .view()
            .wait_until(|n| n.iter().any(|n| n.node_id == *id) == present),
    )
    .await
    .map_err(|_| format!("a {what} was not seen"))?;
    Ok(())
}

/// Join, graceful leave and crash, as `layers/discovery/benches/timings.rs` measures them.
pub(crate) async fn discovery_timings(
    prefix: &ClusterPrefix,
    config: &DiscoveryConfig,
    join_trials: usize,
    crash_trials: usize,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>), BoxError> {
    let observer = start_discovery(prefix, "observer", config).await?;
    let (mut joins, mut leaves, mut crashes) = (Vec::new(), Vec::new(), Vec::new());
    let limit = config.lease * 4;
    for i in 0..join_trials {
        let name = format!("joiner-{i}");
        let id = NodeId::new(&name)?;
        let started = Instant::now();
        let node = start_discovery(prefix, &name, config).await?;
        wait_seen(&observer, &id, true, limit, "join").await?;
        joins.push(started.elapsed().as_secs_f64() * 1e3);
        let leaving = Instant::now();
        node.leave().await?;
        wait_seen(&observer, &id, false, limit, "leave").await?;
        leaves.push(leaving.elapsed().as_secs_f64() * 1e3);
    }
    for i in 0..crash_trials {
        let name = format!("crasher-{i}");
        let id = NodeId::new(&name)?;
        let node = start_discovery(prefix, &name, config).await?;
        wait_seen(&observer, &id, true, limit, "join").await?;
        node.registrar().refresh().await?;
        let crashed = Instant::now();
        drop(node);
        wait_seen(&observer, &id, false, limit, "crash").await?;
        crashes.push(crashed.elapsed().as_secs_f64() * 1e3);
    }
    observer.leave().await?;
    Ok((joins, leaves, crashes))
}

/// Measures and reports the section.
pub(crate) async fn run(ctx: &mut Ctx) -> Result<(), BoxError> {
    report_picks(&mut ctx.report, ctx.sizes.picks);
    let prefix = ctx.prefix("discovery");
    // As the discovery bench: a 1 s heartbeat, so a 3 s lease.
    let config = DiscoveryConfig::default().with_heartbeat(Duration::from_secs(1));
    let timings = discovery_timings(
        &prefix,
        &config,
        ctx.sizes.join_trials,
        ctx.sizes.crash_trials,
    )
    .await;
    cleanup(&prefix).await;
    let (joins, leaves, crashes) = timings?;
    let lease_ms = config.lease.as_secs_f64() * 1e3;
    report_discovery(&mut ctx.report, &joins, &leaves, &crashes, lease_ms);
    Ok(())
}

/// Times `picks` picks of every strategy at 10, 100 and 1000 nodes: a row for the targeted
/// ones, a note for the others.
fn report_picks(report: &mut Report, picks: u32) {
    let mut others = Vec::new();
    for strategy in Strategy::ALL {
        for n in [10, 100, 1000] {
            let ns = pick_ns(strategy, n, picks);
            let targeted = n == 1000
                && matches!(
                    strategy,
                    Strategy::LeastConnections | Strategy::PowerOfTwoChoices
                );
            if targeted {
                report.row(
                    format!("6. pick, {} at 1000 nodes", strategy.as_str()),
                    format!("{ns:.0} ns"),
                    "—",
                    "—",
                    "≤ 1 µs",
                    Verdict::of(ns <= 1000.0),
                );
            } else {
                others.push(format!("{} @{n}: {ns:.0} ns", strategy.as_str()));
            }
        }
    }
    report.note(format!(
        "6: pick cost ({picks} picks each, `Selector::pick` on a seeded set as `cargo bench -p hybrid-cluster-balance --bench pick` does): {}",
        others.join(", ")
    ));
}

/// The discovery rows: join, graceful leave and crash, in milliseconds.
fn report_discovery(r: &mut Report, joins: &[f64], leaves: &[f64], crashes: &[f64], lease_ms: f64) {
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    r.row(
        format!(
            "6. discovery: join seen by a peer, p50 / max ({})",
            joins.len()
        ),
        format!("{:.1} / {:.1} ms", median(joins.to_vec()), max(joins)),
        "—",
        "—",
        "—",
        Verdict::Info,
    );
    r.row(
        format!(
            "6. discovery: graceful leave seen, p50 / max ({})",
            leaves.len()
        ),
        format!("{:.1} / {:.1} ms", median(leaves.to_vec()), max(leaves)),
        "—",
        "—",
        "< 1 s",
        Verdict::of(max(leaves) < 1000.0),
    );
    r.row(
        format!(
            "6. discovery: crash seen, from the last heartbeat, max ({})",
            crashes.len()
        ),
        format!("{:.0} ms", max(crashes)),
        format!("lease {lease_ms:.0} ms"),
        ratio(max(crashes), lease_ms),
        format!("≤ lease + 50 ms = {:.0} ms", lease_ms + 50.0),
        Verdict::of(max(crashes) <= lease_ms + 50.0),
    );
    r.note("6: discovery against the real Redis with a 1 s heartbeat / 3 s lease, as `cargo bench -p hybrid-cluster-discovery --bench timings` (20 + 3 trials there); a crash cannot be seen before the lease runs out (no other failure detector), the view re-checks a peer 5 ms after its lease should have run out (`EXPIRY_GRACE`), hence the 50 ms allowance");
}
