//! The members of the cluster at one moment, and what changed from one moment to the next.

use std::collections::BTreeMap;
use std::fmt;

use hybrid_cluster_core::NodeId;
use hybrid_cluster_core::live::LiveNodeInfo;

/// The nodes of the cluster as one node sees them, at one moment.
///
/// Membership changes (a node joins, leaves, expires, restarts under a new incarnation, goes
/// Offline) produce a new `Membership`; changes of a member's figures (connections, CPU,
/// memory, status Active/Draining) update its [`LiveNodeInfo`] in place.
#[derive(Clone, Default)]
pub struct Membership {
    nodes: BTreeMap<NodeId, LiveNodeInfo>,
}

/// How one node's membership changed between two [`Membership`]s
/// ([`Membership::changes_since`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// The node is a member now and was not before.
    Joined(NodeId),
    /// The node was a member before and is not now.
    Left(NodeId),
    /// The node is a member in both, under another incarnation now: a restart.
    Restarted(NodeId),
}

impl Membership {
    pub(crate) fn new(nodes: BTreeMap<NodeId, LiveNodeInfo>) -> Self {
        Self { nodes }
    }

    /// The members, in id order, with their live info.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &LiveNodeInfo)> {
        self.nodes.iter()
    }

    /// A member's live info.
    pub fn get(&self, node: &NodeId) -> Option<&LiveNodeInfo> {
        self.nodes.get(node)
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// What changed from `before` to this membership, node by node in id order: the nodes
    /// that left, then those that joined or restarted. Changes of a member's figures are not
    /// membership changes.
    pub fn changes_since(&self, before: &Membership) -> Vec<MemberChange> {
        let left = before
            .nodes
            .keys()
            .filter(|node| !self.nodes.contains_key(*node))
            .map(|node| MemberChange::Left(node.clone()));
        let entered = self
            .nodes
            .iter()
            .filter_map(|(node, live)| match before.nodes.get(node) {
                None => Some(MemberChange::Joined(node.clone())),
                Some(was) if was.get().incarnation != live.get().incarnation => {
                    Some(MemberChange::Restarted(node.clone()))
                }
                Some(_) => None,
            });
        left.chain(entered).collect()
    }
}

impl fmt::Debug for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.nodes.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use hybrid_cluster_core::{Incarnation, NodeInfo};

    use super::*;

    fn membership(nodes: &[(&str, u64)]) -> Membership {
        Membership::new(
            nodes
                .iter()
                .map(|(id, incarnation)| {
                    let node = NodeId::new(id).unwrap();
                    let info = NodeInfo::new(
                        node.clone(),
                        Incarnation::from_u64(*incarnation),
                        "10.0.0.1",
                        5000,
                    );
                    (node, LiveNodeInfo::new(info))
                })
                .collect(),
        )
    }

    #[test]
    fn changes_name_joins_leaves_and_restarts_in_id_order() {
        let before = membership(&[("a", 1), ("b", 1), ("c", 1)]);
        let after = membership(&[("b", 2), ("c", 1), ("d", 1)]);
        let node = |id| NodeId::new(id).unwrap();
        assert_eq!(
            after.changes_since(&before),
            vec![
                MemberChange::Left(node("a")),
                MemberChange::Restarted(node("b")),
                MemberChange::Joined(node("d")),
            ]
        );
        assert!(after.changes_since(&after).is_empty());
    }
}
