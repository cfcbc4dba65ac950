//! Nodes for the unit tests: one way to make a node's info with a given load.

use hybrid_cluster_core::{Incarnation, LiveNodeInfo, NodeId, NodeInfo};

/// Node `name` at 10.0.0.1:5001 with `connections` of at most `max`.
pub(crate) fn info(name: &str, connections: u32, max: u32) -> NodeInfo {
    let mut info = NodeInfo::new(
        NodeId::new(name).unwrap(),
        Incarnation::from_u64(1),
        "10.0.0.1",
        5001,
    );
    info.connection_count = connections;
    info.max_connections = max;
    info
}

/// [`info`] in a live cell of its own.
pub(crate) fn cell(name: &str, connections: u32, max: u32) -> LiveNodeInfo {
    LiveNodeInfo::new(info(name, connections, max))
}
