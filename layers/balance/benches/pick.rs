//! The cost of one pick, per strategy, with 10, 100 and 1000 nodes.
//!
//! `cargo bench -p hybrid-cluster-balance --bench pick -- --warm-up-time 1 --measurement-time 2`
//!
//! Nodes have varied loads and resource usage (seeded), all available. `pick` measures
//! `Selector::pick` alone (the set is not changed); `pick_and_charge` adds what the placer
//! does after each decision (one more connection on the chosen node, re-indexed), and
//! `refresh_unchanged` the per-`poll_ready` check of a set following a shared epoch.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hybrid_cluster_balance::{NodeSet, Selector, Strategy};
use hybrid_cluster_core::{Epoch, Incarnation, LiveNodeInfo, NodeId, NodeInfo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZES: [usize; 3] = [10, 100, 1000];

fn node_set(n: usize, epoch: &Epoch) -> NodeSet<NodeId> {
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

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for strategy in Strategy::ALL {
        for n in SIZES {
            let set = node_set(n, &Epoch::new());
            let mut selector = Selector::seeded(strategy, 1);
            group.bench_with_input(BenchmarkId::new(strategy.as_str(), n), &n, |b, _| {
                b.iter(|| black_box(selector.pick(black_box(&set)).unwrap().key))
            });
        }
    }
    group.finish();
}

fn pick_and_charge(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick_and_charge");
    for strategy in [Strategy::LeastConnections, Strategy::PowerOfTwoChoices] {
        for n in SIZES {
            let mut set = node_set(n, &Epoch::new());
            let mut selector = Selector::seeded(strategy, 1);
            group.bench_with_input(BenchmarkId::new(strategy.as_str(), n), &n, |b, _| {
                b.iter(|| {
                    let key = selector.pick(&set).unwrap().key.clone();
                    set.charge(black_box(&key))
                })
            });
        }
    }
    group.finish();
}

fn refresh_unchanged(c: &mut Criterion) {
    let mut group = c.benchmark_group("refresh_unchanged");
    for n in SIZES {
        let epoch = Epoch::new();
        let mut set = node_set(n, &epoch);
        group.bench_with_input(BenchmarkId::new("shared_epoch", n), &n, |b, _| {
            b.iter(|| black_box(set.refresh()))
        });
    }
    group.finish();
}

criterion_group!(benches, pick, pick_and_charge, refresh_unchanged);
criterion_main!(benches);
