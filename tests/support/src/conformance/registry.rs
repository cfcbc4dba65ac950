//! The contract of [`Registry`]: node records under leases, their changes, and routes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use hybrid_cluster_core::{
    ConnectionId, Incarnation, NodeId, NodeRecord, Registry, RegistryError, RegistryEvent,
    RegistryEvents, RemovalCause,
};

use super::within;

/// A lease long enough never to run out during a case.
const LONG: Duration = Duration::from_secs(60);

/// A lease a case waits out.
const SHORT: Duration = Duration::from_millis(300);

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn connection(node_name: &str, n: u64) -> ConnectionId {
    ConnectionId::new(node(node_name), Incarnation::from_u64(7), n)
}

async fn put(registry: &Arc<dyn Registry>, name: &str, value: &'static str, lease: Duration) {
    registry
        .put_node(&node(name), Bytes::from_static(value.as_bytes()), lease)
        .await
        .unwrap();
}

async fn listed(registry: &Arc<dyn Registry>) -> Vec<(NodeId, Bytes)> {
    let mut records: Vec<(NodeId, Bytes)> = registry
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|record| (record.node, record.value))
        .collect();
    records.sort_by(|a, b| a.0.cmp(&b.0));
    records
}

/// The next event that is not `Lagged`.
async fn next_event(events: &mut RegistryEvents) -> RegistryEvent {
    loop {
        match within("a registry event", events.next()).await {
            Some(Ok(RegistryEvent::Lagged)) => {}
            Some(Ok(event)) => return event,
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

/// Waits until `node`'s record is gone, polling: expiry is the registry's own business.
async fn gone(registry: &Arc<dyn Registry>, name: &str) {
    within("the record's expiry", async {
        while registry.node(&node(name)).await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// What is put is what is read, by node and in the listing, under the node it was put for.
pub async fn a_record_put_is_read_back_and_listed(registry: Arc<dyn Registry>) {
    assert_eq!(registry.node(&node("a")).await.unwrap(), None);
    assert!(listed(&registry).await.is_empty());
    put(&registry, "a", r#"{"a":1}"#, LONG).await;
    put(&registry, "b", r#"{"b":2}"#, LONG).await;
    let record: NodeRecord = registry.node(&node("a")).await.unwrap().unwrap();
    assert_eq!(record.node, node("a"));
    assert_eq!(record.value, Bytes::from_static(br#"{"a":1}"#));
    assert!(!record.key.is_empty(), "a record names where it is kept");
    assert_eq!(
        listed(&registry).await,
        [
            (node("a"), Bytes::from_static(br#"{"a":1}"#)),
            (node("b"), Bytes::from_static(br#"{"b":2}"#)),
        ]
    );
    for name in ["a", "b"] {
        registry.remove_node(&node(name)).await.unwrap();
    }
}

/// A second put replaces the record, and its lease starts anew.
pub async fn a_record_put_again_replaces_the_last_and_renews_its_lease(
    registry: Arc<dyn Registry>,
) {
    put(&registry, "a", "first", SHORT).await;
    tokio::time::sleep(SHORT / 2).await;
    put(&registry, "a", "second", SHORT * 4).await;
    tokio::time::sleep(SHORT).await;
    let record = registry.node(&node("a")).await.unwrap();
    assert_eq!(
        record.map(|r| r.value),
        Some(Bytes::from_static(b"second")),
        "the renewed record outlives the first lease"
    );
    assert_eq!(listed(&registry).await.len(), 1, "one record per node");
    registry.remove_node(&node("a")).await.unwrap();
}

/// A removal takes effect at once; removing a missing record succeeds.
pub async fn a_removed_record_is_gone_at_once(registry: Arc<dyn Registry>) {
    put(&registry, "a", "here", LONG).await;
    put(&registry, "b", "here", LONG).await;
    registry.remove_node(&node("a")).await.unwrap();
    assert_eq!(registry.node(&node("a")).await.unwrap(), None);
    assert_eq!(
        listed(&registry).await,
        [(node("b"), Bytes::from_static(b"here"))]
    );
    registry.remove_node(&node("a")).await.unwrap();
    registry.remove_node(&node("never-there")).await.unwrap();
    registry.remove_node(&node("b")).await.unwrap();
}

/// A record not renewed within its lease is dropped by the registry itself.
pub async fn a_record_whose_lease_ran_out_is_gone(registry: Arc<dyn Registry>) {
    put(&registry, "a", "short", SHORT).await;
    put(&registry, "b", "long", LONG).await;
    gone(&registry, "a").await;
    assert_eq!(
        listed(&registry).await,
        [(node("b"), Bytes::from_static(b"long"))]
    );
    registry.remove_node(&node("b")).await.unwrap();
}

/// A lease shorter than a millisecond is one millisecond, not an error.
pub async fn a_lease_shorter_than_a_millisecond_counts_as_one(registry: Arc<dyn Registry>) {
    registry
        .put_node(&node("a"), Bytes::from_static(b"brief"), Duration::ZERO)
        .await
        .unwrap();
    registry
        .put_node(
            &node("b"),
            Bytes::from_static(b"brief"),
            Duration::from_micros(10),
        )
        .await
        .unwrap();
    gone(&registry, "a").await;
    gone(&registry, "b").await;
}

/// A registry that says it reports leases tells every record's, within the lease put.
pub async fn leases_are_reported_when_the_registry_says_so(registry: Arc<dyn Registry>) {
    put(&registry, "a", "leased", LONG).await;
    let read = registry.node(&node("a")).await.unwrap().unwrap();
    let listed = registry.nodes().await.unwrap();
    for record in std::iter::once(&read).chain(&listed) {
        match record.expires_in {
            Some(left) => assert!(left <= LONG, "{left:?} left of a {LONG:?} lease"),
            None => assert!(
                !registry.reports_leases(),
                "a registry that reports leases tells every record's"
            ),
        }
    }
    if registry.reports_leases() {
        let left = read.expires_in.unwrap();
        assert!(
            left > LONG / 2,
            "{left:?} left of a {LONG:?} lease just put"
        );
    }
    registry.remove_node(&node("a")).await.unwrap();
}

/// A watcher sees every put (with its record) and every removal (as a leave), in order.
pub async fn watchers_see_puts_and_removals_in_order(registry: Arc<dyn Registry>) {
    let mut events = registry.watch().await.unwrap();
    put(&registry, "a", "one", LONG).await;
    put(&registry, "a", "two", LONG).await;
    registry.remove_node(&node("a")).await.unwrap();
    let mut updates = Vec::new();
    for _ in 0..2 {
        match next_event(&mut events).await {
            RegistryEvent::Updated(record) => {
                assert_eq!(record.node, node("a"));
                updates.push(record.value);
            }
            other => panic!("expected an update, got {other:?}"),
        }
    }
    assert_eq!(
        updates,
        [Bytes::from_static(b"one"), Bytes::from_static(b"two")]
    );
    assert_eq!(
        next_event(&mut events).await,
        RegistryEvent::Removed {
            node: node("a"),
            cause: RemovalCause::Left,
        }
    );
}

/// A route points at its connection until removed or until its lease runs out; removing a
/// missing route succeeds.
pub async fn routes_point_at_a_connection_for_their_lease(registry: Arc<dyn Registry>) {
    assert_eq!(registry.route("user:1").await.unwrap(), None);
    registry
        .put_route("user:1", &connection("a", 1), LONG)
        .await
        .unwrap();
    registry
        .put_route("user:2", &connection("b", 2), SHORT)
        .await
        .unwrap();
    assert_eq!(
        registry.route("user:1").await.unwrap(),
        Some(connection("a", 1))
    );
    registry
        .put_route("user:1", &connection("c", 3), LONG)
        .await
        .unwrap();
    assert_eq!(
        registry.route("user:1").await.unwrap(),
        Some(connection("c", 3)),
        "a route put again points at the new connection"
    );
    registry.remove_route("user:1").await.unwrap();
    assert_eq!(registry.route("user:1").await.unwrap(), None);
    registry.remove_route("user:1").await.unwrap();
    within("the route's expiry", async {
        while registry.route("user:2").await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// An empty, overlong or control-character route name is refused as an invalid argument.
pub async fn route_names_are_checked(registry: Arc<dyn Registry>) {
    let long = "x".repeat(257);
    for name in ["", long.as_str(), "user\n1"] {
        let invalid = |result: Result<(), RegistryError>| {
            matches!(result, Err(RegistryError::InvalidArgument { .. }))
        };
        let put = registry.put_route(name, &connection("a", 1), LONG).await;
        assert!(invalid(put), "put_route({name:?})");
        let read = registry.route(name).await.map(|_| ());
        assert!(invalid(read), "route({name:?})");
        let removed = registry.remove_route(name).await;
        assert!(invalid(removed), "remove_route({name:?})");
    }
    let longest = "x".repeat(256);
    registry
        .put_route(&longest, &connection("a", 1), LONG)
        .await
        .unwrap();
    registry.remove_route(&longest).await.unwrap();
}
