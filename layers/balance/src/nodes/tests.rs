use hybrid_cluster_core::NodeStatus;

use super::slot::{Class, Ratio};
use super::*;
use crate::test_nodes::cell;

/// Every index holds exactly the available nodes.
fn check_invariants<K: Clone + Eq + Hash>(set: &NodeSet<K>) {
    let available: Vec<usize> = (0..set.slots.len())
        .filter(|&i| {
            set.slots[i]
                .as_ref()
                .is_some_and(|s| s.class == Class::Available)
        })
        .collect();
    assert_eq!(set.available.len(), available.len());
    assert_eq!(set.by_seq.len(), available.len());
    assert_eq!(set.by_load.len(), available.len());
    assert_eq!(set.by_usage.len(), available.len());
    for (pos, &idx) in set.available.iter().enumerate() {
        let slot = set.slots[idx].as_ref().unwrap();
        assert_eq!(slot.pos, pos);
        assert_eq!(set.by_seq.get(&slot.seq), Some(&idx));
        assert!(set.by_load.contains(&(slot.load, slot.seq, idx)));
        assert!(set.by_usage.contains(&(slot.usage, slot.seq, idx)));
    }
    assert_eq!(set.counts.iter().sum::<usize>(), set.len());
}

#[test]
fn ratios_compare_exactly() {
    assert_eq!(Ratio::new(1, 2), Ratio::new(50, 100));
    assert!(Ratio::new(1, 3) < Ratio::new(34, 100));
    assert!(Ratio::new(0, 10) < Ratio::new(1, 10_000));
}

#[test]
fn classes_and_counts_follow_changes() {
    let mut set = NodeSet::new();
    let a = cell("a", 0, 10);
    set.insert("a", a.clone());
    set.insert("b", cell("b", 10, 10));
    let mut draining = (*cell("c", 0, 10).get()).clone();
    draining.status = NodeStatus::Draining;
    set.insert("c", LiveNodeInfo::new(draining));
    check_invariants(&set);
    assert_eq!(set.available_len(), 1);
    assert_eq!(
        set.unavailable(),
        NoAvailableNode {
            known: 3,
            draining: 1,
            offline: 0,
            full: 1,
            not_ready: 0,
            degraded: 0
        }
    );

    // Charging fills a up to its limit; its next update resets the charge.
    for _ in 0..10 {
        assert!(set.is_available(&"a"));
        set.charge(&"a");
    }
    assert!(!set.is_available(&"a"));
    check_invariants(&set);
    a.update((*a.get()).clone());
    assert_eq!(set.refresh(), 1);
    assert!(set.is_available(&"a"));

    set.set_ready(&"a", false);
    assert_eq!(set.unavailable().not_ready, 1);
    check_invariants(&set);
    assert!(set.remove(&"a"));
    assert!(!set.remove(&"a"));
    check_invariants(&set);
    assert_eq!(set.len(), 2);
    assert_eq!(set.available_len(), 0);
}

#[test]
fn shared_epoch_refresh_skips_when_unchanged_and_catches_updates() {
    let epoch = Epoch::new();
    let mut set = NodeSet::with_shared_epoch(epoch.clone());
    let a = LiveNodeInfo::with_epoch((*cell("a", 1, 10).get()).clone(), epoch.clone());
    set.insert("a", a.clone());
    assert_eq!(set.refresh(), 0);
    let mut info = (*a.get()).clone();
    info.connection_count = 7;
    a.update(info);
    assert_eq!(set.refresh(), 1);
    assert_eq!(set.get(&"a").unwrap().connection_count, 7);
    assert_eq!(set.refresh(), 0);
}

#[test]
fn indexed_picks_match_a_linear_scan_under_random_churn() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use crate::strategy::{Selector, Strategy};

    let mut rng = StdRng::seed_from_u64(5);
    let mut set = NodeSet::new();
    let mut cells: HashMap<u32, LiveNodeInfo> = HashMap::new();
    let mut least_connections = Selector::seeded(Strategy::LeastConnections, 1);
    let mut least_usage = Selector::seeded(Strategy::LeastResourceUsage, 1);
    for _ in 0..5000 {
        let key = rng.random_range(0..40u32);
        match rng.random_range(0..6) {
            0 => {
                let live = cell("n", rng.random_range(0..12), rng.random_range(0..12));
                set.insert(key, live.clone());
                cells.insert(key, live);
            }
            1 => {
                set.remove(&key);
                cells.remove(&key);
            }
            2 => {
                set.charge(&key);
            }
            3 => set.set_ready(&key, rng.random()),
            _ => {
                if let Some(live) = cells.get(&key) {
                    let mut info = (*live.get()).clone();
                    info.connection_count = rng.random_range(0..12);
                    info.cpu_usage_percent = rng.random_range(0..4) as f32 * 10.0;
                    info.status = match rng.random_range(0..8) {
                        0 => NodeStatus::Draining,
                        1 => NodeStatus::Offline,
                        _ => NodeStatus::Active,
                    };
                    live.update(info);
                }
                set.refresh();
            }
        }
        check_invariants(&set);
        let available = || {
            set.slots
                .iter()
                .flatten()
                .filter(|slot| slot.class == Class::Available)
        };
        match least_connections.pick(&set) {
            Ok(candidate) => {
                let min = available().map(|slot| slot.load).min().unwrap();
                let idx = set.by_key[candidate.key];
                assert_eq!(set.slots[idx].as_ref().unwrap().load, min);
                let usage = least_usage.pick(&set).unwrap();
                let min = available().map(|slot| slot.usage).min().unwrap();
                let idx = set.by_key[usage.key];
                assert_eq!(set.slots[idx].as_ref().unwrap().usage, min);
            }
            Err(none) => {
                assert_eq!(available().count(), 0);
                assert_eq!(none.known, cells.len());
            }
        }
    }
}

#[test]
fn slots_are_reused_without_breaking_indexes() {
    let mut set = NodeSet::new();
    for round in 0..50u32 {
        for i in 0..20u32 {
            set.insert(i, cell("n", (i * 7 + round) % 12, 10));
        }
        for i in (0..20u32).step_by(3) {
            set.remove(&i);
        }
        check_invariants(&set);
    }
    assert!(set.slots.len() <= 20);
}
