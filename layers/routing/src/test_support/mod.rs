//! Helpers shared by the crate's unit tests.

pub(crate) mod broker;
pub(crate) mod outcomes;

use hybrid_cluster_core::{Broker, NodeId, QueueOptions, RoutingKey};

pub(crate) fn node(id: &str) -> NodeId {
    NodeId::new(id).unwrap()
}

/// Declares node `id`'s queue on `broker`, bound to the node's own key.
pub(crate) async fn node_queue<B: Broker + ?Sized>(broker: &B, id: &str) -> NodeId {
    let id = node(id);
    broker
        .declare_queue(&id, &QueueOptions::default())
        .await
        .unwrap();
    broker
        .bind(&id, &RoutingKey::Node(id.clone()))
        .await
        .unwrap();
    id
}
