//! The strategies, and the [`Selector`] that applies one to a [`NodeSet`].
//!
//! Every strategy chooses among the *available* nodes only (Active, below their connection
//! limit, and ready inside the balancer); when none is, the pick fails with
//! [`NoAvailableNode`], which counts the nodes known and why each was left out.
//!
//! | strategy | chooses | ties | cost |
//! |---|---|---|---|
//! | [`LeastConnections`](Strategy::LeastConnections) (default) | lowest `connections / max_connections` | rotate among the tied nodes | `O(log n)` |
//! | [`RoundRobin`](Strategy::RoundRobin) | the next node in join order after the last one chosen | | `O(log n)` |
//! | [`LeastResourceUsage`](Strategy::LeastResourceUsage) | lowest CPU % + memory % | rotate among the tied nodes | `O(log n)` |
//! | [`Random`](Strategy::Random) | uniformly at random | | `O(1)` |
//! | [`PowerOfTwoChoices`](Strategy::PowerOfTwoChoices) | the less loaded (connections) of two distinct random nodes | the first drawn | `O(1)` |
//!
//! Rotation follows join order, not positions in a vector, so it stays fair when nodes join
//! and leave: a node that leaves simply drops out of the lap, a node that joins takes its turn
//! at the end of it, and nobody else is skipped or served twice.
//!
//! ```
//! use hybrid_cluster_balance::{NodeSet, Selector, Strategy};
//! use hybrid_cluster_core::{Incarnation, LiveNodeInfo, NodeId, NodeInfo};
//!
//! let mut nodes = NodeSet::new();
//! for name in ["a", "b", "c"] {
//!     let info = NodeInfo::new(NodeId::new(name)?, Incarnation::random(), "10.0.0.1", 5001);
//!     nodes.insert(name, LiveNodeInfo::new(info));
//! }
//! // Three idle nodes tie: least-connections rotates among them.
//! let mut selector = Selector::seeded(Strategy::LeastConnections, 1);
//! let picks: Vec<&str> = (0..6).map(|_| *selector.pick(&nodes).unwrap().key).collect();
//! assert_eq!(picks, ["a", "b", "c", "a", "b", "c"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::NoAvailableNode;
use crate::nodes::{Candidate, NodeSet};

/// How a node is chosen among the available ones. See the [module docs](self).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Strategy {
    /// Fewest live connections relative to `max_connections`; equal nodes take turns.
    #[default]
    LeastConnections,
    /// Each available node in turn, in the order they joined.
    RoundRobin,
    /// Lowest CPU % + memory % (both of the machine, 0–100); equal nodes take turns.
    LeastResourceUsage,
    /// Uniformly at random.
    Random,
    /// Two distinct nodes at random, the one with fewer connections relative to its limit.
    PowerOfTwoChoices,
}

impl Strategy {
    /// Every strategy, in declaration order.
    pub const ALL: [Strategy; 5] = [
        Strategy::LeastConnections,
        Strategy::RoundRobin,
        Strategy::LeastResourceUsage,
        Strategy::Random,
        Strategy::PowerOfTwoChoices,
    ];

    /// The strategy's name, the one spelling written everywhere (command lines, `Display`):
    /// `least-connections`, `round-robin`, `least-resource-usage`, `random`, `p2c`.
    ///
    /// [`FromStr`] reads these and, for configurations written before
    /// there was one spelling, the older snake_case names (`least_connections`, `round_robin`,
    /// `least_resource_usage`, `power_of_two_choices`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeastConnections => "least-connections",
            Self::RoundRobin => "round-robin",
            Self::LeastResourceUsage => "least-resource-usage",
            Self::Random => "random",
            Self::PowerOfTwoChoices => "p2c",
        }
    }

    /// The snake_case name `as_str` returned before there was one spelling: still read, so
    /// that scripts and configurations holding it keep working, never written.
    fn legacy_name(self) -> &'static str {
        match self {
            Self::LeastConnections => "least_connections",
            Self::RoundRobin => "round_robin",
            Self::LeastResourceUsage => "least_resource_usage",
            Self::Random => "random",
            Self::PowerOfTwoChoices => "power_of_two_choices",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|strategy| name == strategy.as_str() || name == strategy.legacy_name())
            .ok_or_else(|| UnknownStrategy(name.to_owned()))
    }
}

/// A name [`Strategy::from_str`](std::str::FromStr::from_str) does not know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownStrategy(String);

impl fmt::Display for UnknownStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known: Vec<&str> = Strategy::ALL.iter().map(|s| s.as_str()).collect();
        write!(
            f,
            "unknown strategy `{}` (known: {})",
            self.0,
            known.join(", ")
        )
    }
}

impl std::error::Error for UnknownStrategy {}

/// `--strategy` for command lines built with clap (the `clap` feature): the names of
/// [`Strategy::as_str`] in `--help`, the older snake_case names accepted as hidden aliases.
#[cfg(feature = "clap")]
impl clap::ValueEnum for Strategy {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        let value = clap::builder::PossibleValue::new(self.as_str());
        Some(match self.legacy_name() {
            legacy if legacy != self.as_str() => value.alias(legacy),
            _ => value,
        })
    }
}

/// A strategy with the state it needs between picks: its random number generator and the
/// rotation cursor (the join order of the last node chosen).
///
/// Picks are synchronous and cheap (see the [module docs](self) for their cost); the
/// selector does not mutate the [`NodeSet`].
#[derive(Clone, Debug)]
pub struct Selector {
    strategy: Strategy,
    rng: StdRng,
    cursor: Option<u64>,
}

impl Default for Selector {
    /// Least connections, with a generator seeded from the operating system.
    fn default() -> Self {
        Self::new(Strategy::default())
    }
}

impl Selector {
    /// A selector for `strategy`, with a generator seeded from the operating system.
    pub fn new(strategy: Strategy) -> Self {
        Self::with_rng(strategy, StdRng::from_os_rng())
    }

    /// A selector for `strategy` whose random choices are reproducible from `seed`.
    pub fn seeded(strategy: Strategy, seed: u64) -> Self {
        Self::with_rng(strategy, StdRng::seed_from_u64(seed))
    }

    /// A selector for `strategy` drawing from `rng`.
    pub fn with_rng(strategy: Strategy, rng: StdRng) -> Self {
        Self {
            strategy,
            rng,
            cursor: None,
        }
    }

    /// The strategy applied.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Chooses an available node of `nodes` by the strategy.
    ///
    /// The set is read as of its last [`refresh`](NodeSet::refresh); call that first when
    /// the cells may have changed.
    pub fn pick<'a, K>(
        &mut self,
        nodes: &'a NodeSet<K>,
    ) -> Result<Candidate<'a, K>, NoAvailableNode> {
        let idx = match self.strategy {
            Strategy::LeastConnections => rotate_min(&nodes.by_load, self.cursor),
            Strategy::LeastResourceUsage => rotate_min(&nodes.by_usage, self.cursor),
            Strategy::RoundRobin => {
                let after = self.cursor.map_or(0, |c| c.saturating_add(1));
                nodes
                    .by_seq
                    .range(after..)
                    .next()
                    .or_else(|| nodes.by_seq.first_key_value())
                    .map(|(_, &idx)| idx)
            }
            Strategy::Random => match nodes.available.len() {
                0 => None,
                len => Some(nodes.available[self.rng.random_range(0..len)]),
            },
            Strategy::PowerOfTwoChoices => self.p2c(nodes),
        };
        let Some((key, info, seq)) = idx.and_then(|idx| nodes.slot_key(idx)) else {
            return Err(nodes.unavailable());
        };
        self.cursor = Some(seq);
        Ok(Candidate { key, info })
    }

    fn p2c<K>(&mut self, nodes: &NodeSet<K>) -> Option<usize> {
        let available = &nodes.available;
        match available.len() {
            0 => None,
            1 => Some(available[0]),
            len => {
                // Two distinct positions, uniformly: the second is drawn from the others.
                let a = self.rng.random_range(0..len);
                let mut b = self.rng.random_range(0..len - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (available[a], available[b]);
                match (nodes.slot_load(a), nodes.slot_load(b)) {
                    (Some(load_a), Some(load_b)) if load_b < load_a => Some(b),
                    _ => Some(a),
                }
            }
        }
    }
}

/// The first entry of the lowest key whose join order comes after `cursor`, or the first of
/// the lowest key: tied nodes take turns. `O(log n)`.
fn rotate_min<T: Ord + Copy>(
    set: &BTreeSet<(T, u64, usize)>,
    cursor: Option<u64>,
) -> Option<usize> {
    let &(min, _, first) = set.first()?;
    if let Some(after) = cursor.and_then(|c| c.checked_add(1))
        && let Some(&(key, _, idx)) = set.range((min, after, 0)..).next()
        && key == min
    {
        return Some(idx);
    }
    Some(first)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use hybrid_cluster_core::{LiveNodeInfo, NodeStatus};

    use super::*;
    use crate::test_nodes::info;

    fn set_of(nodes: &[(&'static str, u32, u32)]) -> NodeSet<&'static str> {
        let mut set = NodeSet::new();
        for &(name, connections, max) in nodes {
            set.insert(name, LiveNodeInfo::new(info(name, connections, max)));
        }
        set
    }

    fn picks(
        selector: &mut Selector,
        set: &NodeSet<&'static str>,
        n: usize,
    ) -> HashMap<&'static str, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            *counts.entry(*selector.pick(set).unwrap().key).or_default() += 1;
        }
        counts
    }

    #[test]
    fn least_connections_is_relative_to_capacity() {
        // b has more connections but far more room.
        let set = set_of(&[("a", 50, 100), ("b", 200, 1000), ("c", 80, 100)]);
        let mut selector = Selector::seeded(Strategy::LeastConnections, 1);
        for _ in 0..5 {
            assert_eq!(*selector.pick(&set).unwrap().key, "b");
        }
    }

    #[test]
    fn least_connections_spreads_evenly_over_equal_nodes() {
        let set = set_of(&[
            ("a", 10, 100),
            ("b", 10, 100),
            ("c", 10, 100),
            ("d", 90, 100),
        ]);
        let mut selector = Selector::seeded(Strategy::LeastConnections, 1);
        let counts = picks(&mut selector, &set, 3000);
        assert_eq!(counts.get("a"), Some(&1000));
        assert_eq!(counts.get("b"), Some(&1000));
        assert_eq!(counts.get("c"), Some(&1000));
        assert_eq!(counts.get("d"), None);
    }

    #[test]
    fn least_connections_with_charges_fills_nodes_level() {
        let mut set = set_of(&[("a", 0, 100), ("b", 5, 100), ("c", 10, 100)]);
        let mut selector = Selector::seeded(Strategy::LeastConnections, 1);
        let mut counts = HashMap::new();
        for _ in 0..45 {
            let key = *selector.pick(&set).unwrap().key;
            set.charge(&key);
            *counts.entry(key).or_insert(0) += 1;
        }
        // 0+5+10 reported and 45 charged: 20 each, so a took 20, b 15 and c 10.
        assert_eq!(counts, HashMap::from([("a", 20), ("b", 15), ("c", 10)]));
    }

    #[test]
    fn least_resource_usage_adds_cpu_and_memory() {
        let mut set = NodeSet::new();
        for (name, cpu, mem) in [("a", 30.0, 30.0), ("b", 50.0, 5.0), ("c", 10.0, 60.0)] {
            let mut info = info(name, 0, 100);
            info.cpu_usage_percent = cpu;
            info.memory_usage_percent = mem;
            set.insert(name, LiveNodeInfo::new(info));
        }
        let mut selector = Selector::seeded(Strategy::LeastResourceUsage, 1);
        assert_eq!(*selector.pick(&set).unwrap().key, "b");
        assert_eq!(*selector.pick(&set).unwrap().key, "b");
    }

    #[test]
    fn round_robin_rotates_and_stays_fair_under_churn() {
        let mut set = set_of(&[("a", 0, 10), ("b", 9, 10), ("c", 0, 10)]);
        let mut selector = Selector::seeded(Strategy::RoundRobin, 1);
        let mut next = || *selector.pick(&set).unwrap().key;
        assert_eq!([next(), next(), next(), next()], ["a", "b", "c", "a"]);

        // b leaves while it is next: c follows, nobody is skipped or served twice.
        set.remove(&"b");
        let mut next = || *selector.pick(&set).unwrap().key;
        assert_eq!([next(), next()], ["c", "a"]);

        // d joins: it takes its turn at the end of the lap.
        set.insert("d", LiveNodeInfo::new(info("d", 0, 10)));
        let mut next = || *selector.pick(&set).unwrap().key;
        assert_eq!([next(), next(), next(), next()], ["c", "d", "a", "c"]);

        // b comes back: it joins the end of the lap, a and c keep their order.
        set.insert("b", LiveNodeInfo::new(info("b", 0, 10)));
        let mut next = || *selector.pick(&set).unwrap().key;
        assert_eq!([next(), next(), next(), next()], ["d", "b", "a", "c"]);
    }

    #[test]
    fn random_is_uniform_within_tolerance() {
        let set = set_of(&[
            ("a", 0, 10),
            ("b", 5, 10),
            ("c", 9, 10),
            ("d", 1, 10),
            ("e", 0, 10),
        ]);
        let mut selector = Selector::seeded(Strategy::Random, 42);
        let n = 100_000;
        let counts = picks(&mut selector, &set, n);
        assert_eq!(counts.len(), 5);
        let expected = n as f64 / 5.0;
        for (node, &count) in &counts {
            let deviation = (count as f64 - expected).abs() / expected;
            assert!(
                deviation < 0.03,
                "{node}: {count} picks, expected ~{expected}"
            );
        }
    }

    #[test]
    fn power_of_two_choices_prefers_the_less_loaded_but_spreads() {
        let set = set_of(&[
            ("a", 0, 100),
            ("b", 25, 100),
            ("c", 50, 100),
            ("d", 75, 100),
        ]);
        let mut selector = Selector::seeded(Strategy::PowerOfTwoChoices, 7);
        let n = 60_000;
        let counts = picks(&mut selector, &set, n);
        // With 4 nodes and distinct pairs, the node of rank r wins (3 - r) of the 6 pairs.
        for (node, wins) in [("a", 3.0), ("b", 2.0), ("c", 1.0)] {
            let expected = n as f64 * wins / 6.0;
            let count = counts[node] as f64;
            assert!(
                (count - expected).abs() / expected < 0.03,
                "{node}: {count}, expected ~{expected}"
            );
        }
        assert_eq!(counts.get("d"), None, "the most loaded never wins a pair");
    }

    #[test]
    fn every_strategy_excludes_draining_offline_and_full_nodes() {
        let mut set = NodeSet::new();
        for (name, status, connections) in [
            ("draining", NodeStatus::Draining, 0),
            ("offline", NodeStatus::Offline, 0),
            ("full", NodeStatus::Active, 10),
            ("ok", NodeStatus::Active, 9),
        ] {
            let mut info = info(name, connections, 10);
            info.status = status;
            set.insert(name, LiveNodeInfo::new(info));
        }
        for strategy in Strategy::ALL {
            let mut selector = Selector::seeded(strategy, 3);
            for _ in 0..50 {
                assert_eq!(*selector.pick(&set).unwrap().key, "ok", "{strategy}");
            }
        }
        set.remove(&"ok");
        for strategy in Strategy::ALL {
            let err = Selector::seeded(strategy, 3).pick(&set).unwrap_err();
            assert_eq!(
                err,
                NoAvailableNode {
                    known: 3,
                    draining: 1,
                    offline: 1,
                    full: 1,
                    not_ready: 0,
                    degraded: 0
                }
            );
            assert_eq!(
                err.to_string(),
                "no node available: 3 known (1 draining, 0 degraded, 1 offline, 1 full, 0 not ready)"
            );
        }
        let empty = NodeSet::<&str>::new();
        let err = Selector::default().pick(&empty).unwrap_err();
        assert_eq!(err.known, 0);
        assert_eq!(err.to_string(), "no node available: none known");
    }

    #[test]
    fn a_node_with_no_capacity_is_never_chosen() {
        let set = set_of(&[("zero", 0, 0), ("ok", 3, 4)]);
        for strategy in Strategy::ALL {
            let mut selector = Selector::seeded(strategy, 9);
            for _ in 0..20 {
                assert_eq!(*selector.pick(&set).unwrap().key, "ok");
            }
        }
    }

    #[test]
    fn seeded_selectors_repeat_their_choices() {
        let set = set_of(&[("a", 1, 10), ("b", 2, 10), ("c", 3, 10), ("d", 4, 10)]);
        for strategy in [Strategy::Random, Strategy::PowerOfTwoChoices] {
            let mut one = Selector::seeded(strategy, 11);
            let mut two = Selector::seeded(strategy, 11);
            for _ in 0..100 {
                assert_eq!(one.pick(&set).unwrap().key, two.pick(&set).unwrap().key);
            }
        }
    }

    #[test]
    fn names_read_back_in_both_spellings_and_write_in_one() {
        for strategy in Strategy::ALL {
            assert_eq!(strategy.as_str().parse::<Strategy>(), Ok(strategy));
            assert_eq!(strategy.legacy_name().parse::<Strategy>(), Ok(strategy));
            assert_eq!(strategy.to_string(), strategy.as_str());
        }
        assert_eq!("p2c".parse::<Strategy>(), Ok(Strategy::PowerOfTwoChoices));
        assert!("least connections".parse::<Strategy>().is_err());
        assert!("Random".parse::<Strategy>().is_err());
    }
}
