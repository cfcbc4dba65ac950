//! The backend traits' contract (`hybrid_cluster_test_support::conformance`), run against the
//! embedded memory backends and the real Redis and RabbitMQ alike: the embedded default
//! provably behaves like the servers.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use hybrid_cluster::discovery::{
    RedisOptions, RedisPresenceStore, RedisRegistry, RedisSessionStore,
};
use hybrid_cluster::routing::{RabbitBroker, RabbitConfig};
use hybrid_cluster::{Broker, ClusterPrefix, MemoryBroker, MemoryRegistry, Registry};
use hybrid_cluster_core::{PresenceStore, SessionStore};
use hybrid_cluster_memory::{MemoryPresenceStore, MemorySessionStore};
use hybrid_cluster_test_support::conformance::{Cleanup, broker::NODES};
use hybrid_cluster_test_support::servers::{amqp_url, redis_url, remove_cluster, unique_prefix};
use hybrid_cluster_test_support::{
    broker_conformance, presence_store_conformance, registry_conformance, session_store_conformance,
};

async fn memory_registry(_case: &str) -> (Arc<dyn Registry>, Cleanup) {
    (Arc::new(MemoryRegistry::new()), Box::pin(async {}))
}

async fn redis(case: &str) -> (Arc<dyn Registry>, Cleanup) {
    let (registry, _, cleanup) = redis_registry(case).await;
    (Arc::new(registry), cleanup)
}

async fn memory_broker(_case: &str) -> (Arc<dyn Broker>, Cleanup) {
    (Arc::new(MemoryBroker::new()), Box::pin(async {}))
}

async fn rabbitmq(case: &str) -> (Arc<dyn Broker>, Cleanup) {
    let prefix = unique_prefix(&format!("conformance-{case}"));
    let broker = RabbitBroker::connect(
        &amqp_url().parse().unwrap(),
        &ClusterPrefix::new(&prefix).unwrap(),
        RabbitConfig::default(),
    )
    .await
    .unwrap();
    let nodes: Vec<String> = NODES.iter().map(|&node| node.to_owned()).collect();
    (
        Arc::new(broker),
        Box::pin(async move { remove_cluster(&prefix, &nodes).await }),
    )
}

async fn memory_sessions(_case: &str) -> (Arc<dyn SessionStore>, Cleanup) {
    (Arc::new(MemorySessionStore::new()), Box::pin(async {}))
}

/// A registry on the real Redis under a prefix of `case`'s own, its prefix, and the cleanup.
async fn redis_registry(case: &str) -> (RedisRegistry, ClusterPrefix, Cleanup) {
    let prefix = unique_prefix(&format!("conformance-{case}"));
    let prefix_name = ClusterPrefix::new(&prefix).unwrap();
    let registry = RedisRegistry::connect(
        &redis_url().parse().unwrap(),
        &prefix_name,
        RedisOptions::default(),
    )
    .await
    .unwrap();
    let cleanup: Cleanup = Box::pin(async move { remove_cluster(&prefix, &[]).await });
    (registry, prefix_name, cleanup)
}

async fn redis_sessions(case: &str) -> (Arc<dyn SessionStore>, Cleanup) {
    let (registry, prefix, cleanup) = redis_registry(case).await;
    let store = RedisSessionStore::new(registry.connection(), &prefix);
    (Arc::new(store), cleanup)
}

async fn memory_presence(_case: &str) -> (Arc<dyn PresenceStore>, Cleanup) {
    (Arc::new(MemoryPresenceStore::new()), Box::pin(async {}))
}

async fn redis_presence(case: &str) -> (Arc<dyn PresenceStore>, Cleanup) {
    let (registry, prefix, cleanup) = redis_registry(case).await;
    let store = RedisPresenceStore::new(registry.connection(), &prefix);
    (Arc::new(store), cleanup)
}

registry_conformance!(memory_registry);
registry_conformance!(redis);
broker_conformance!(memory_broker);
broker_conformance!(rabbitmq);
session_store_conformance!(memory_sessions);
session_store_conformance!(redis_sessions);
presence_store_conformance!(memory_presence);
presence_store_conformance!(redis_presence);
