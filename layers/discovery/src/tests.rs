//! Discovery on the in-memory registry, with paused time: the lease logic, join, update, leave,
//! restart and malformed records.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hybrid_cluster_core::{Incarnation, NodeId, NodeInfo, NodeStatus, Registry};
use hybrid_cluster_memory::MemoryRegistry;
use tokio::time::Instant;
use tower::discover::Change;
use tower::load::Load;

use crate::{ClusterView, Discovery, DiscoveryConfig, DiscoveryError, NodeDiscover, NodeService};

fn node(id: &str) -> NodeId {
    NodeId::new(id).unwrap()
}

fn info(id: &str) -> NodeInfo {
    let mut info = NodeInfo::new(node(id), Incarnation::random(), "127.0.0.1", 5000);
    info.max_connections = 100;
    info
}

fn config() -> DiscoveryConfig {
    DiscoveryConfig::default().with_heartbeat(Duration::from_secs(5))
}

async fn start(registry: &Arc<MemoryRegistry>, id: &str) -> Discovery {
    Discovery::start(registry.clone(), info(id), config())
        .await
        .unwrap()
}

fn ids(view: &ClusterView) -> BTreeSet<String> {
    view.nodes().iter().map(|n| n.node_id.to_string()).collect()
}

async fn next_change<F, S>(discover: &mut NodeDiscover<F, S>) -> Change<NodeId, NodeService<S>>
where
    F: FnMut(&NodeInfo) -> S,
{
    tokio::time::timeout(Duration::from_secs(60), discover.next())
        .await
        .expect("a change in time")
        .expect("the stream is open")
        .expect("never an error")
}

fn inserted<S>(change: Change<NodeId, NodeService<S>>) -> NodeId {
    match change {
        Change::Insert(node, _) => node,
        Change::Remove(node) => panic!("expected an insert, got the removal of {node}"),
    }
}

fn removed<S>(change: Change<NodeId, NodeService<S>>) -> NodeId {
    match change {
        Change::Remove(node) => node,
        Change::Insert(node, _) => panic!("expected a removal, got the insert of {node}"),
    }
}

#[tokio::test(start_paused = true)]
async fn three_nodes_join_and_every_view_sees_all() {
    let registry = Arc::new(MemoryRegistry::new());
    let a = start(&registry, "a").await;
    let b = start(&registry, "b").await;
    let c = start(&registry, "c").await;
    let all: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
    for discovery in [&a, &b, &c] {
        discovery.view().wait_until(|nodes| nodes.len() == 3).await;
        assert_eq!(ids(discovery.view()), all);
    }

    let mut discover = a.discover(|info: &NodeInfo| info.node_id.to_string());
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        seen.insert(inserted(next_change(&mut discover).await).to_string());
    }
    assert_eq!(seen, all);
}

#[tokio::test(start_paused = true)]
async fn updates_are_seen_in_place_without_replacing_the_service() {
    let registry = Arc::new(MemoryRegistry::new());
    let a = start(&registry, "a").await;
    let b = start(&registry, "b").await;
    a.view().wait_until(|nodes| nodes.len() == 2).await;

    let mut discover = a.discover(|_: &NodeInfo| ());
    let mut services = Vec::new();
    for _ in 0..2 {
        match next_change(&mut discover).await {
            Change::Insert(node, service) => services.push((node, service)),
            Change::Remove(node) => panic!("unexpected removal of {node}"),
        }
    }
    let (_, b_service) = services.into_iter().find(|(n, _)| n == &node("b")).unwrap();
    assert_eq!(b_service.load(), 0.0);

    // A pushed update is seen at once, not at the next heartbeat.
    let epoch = a.view().epoch().current();
    b.connections().set(25);
    b.registrar().refresh().await.unwrap();
    a.view()
        .wait_until(|nodes| {
            nodes
                .iter()
                .any(|n| n.node_id == node("b") && n.connection_count == 25)
        })
        .await;
    assert_ne!(a.view().epoch().current(), epoch);
    assert_eq!(
        b_service.load(),
        0.25,
        "the inserted service reads the live info"
    );

    // The heartbeat publishes the counter by itself.
    b.connections().set(50);
    tokio::time::advance(Duration::from_secs(5)).await;
    a.view()
        .wait_until(|nodes| nodes.iter().any(|n| n.connection_count == 50))
        .await;
    assert_eq!(b_service.load(), 0.5);

    // Draining: still seen, but its load is infinite so balancers skip it.
    b.drain().await.unwrap();
    a.view()
        .wait_until(|nodes| nodes.iter().any(|n| n.status == NodeStatus::Draining))
        .await;
    assert!(b_service.load().is_infinite());
    assert_eq!(ids(a.view()).len(), 2);
    assert!(
        futures_util::FutureExt::now_or_never(discover.next()).is_none(),
        "no change for an update"
    );
}

#[tokio::test(start_paused = true)]
async fn a_graceful_leave_is_seen_at_once() {
    let registry = Arc::new(MemoryRegistry::new());
    let a = start(&registry, "a").await;
    let b = start(&registry, "b").await;
    a.view().wait_until(|nodes| nodes.len() == 2).await;
    let mut discover = a.discover(|_: &NodeInfo| ());
    next_change(&mut discover).await;
    next_change(&mut discover).await;

    let left = Instant::now();
    b.leave().await.unwrap();
    assert_eq!(removed(next_change(&mut discover).await), node("b"));
    assert_eq!(left.elapsed(), Duration::ZERO, "no timer is involved");
    assert_eq!(ids(a.view()), BTreeSet::from(["a".to_owned()]));
}

#[tokio::test(start_paused = true)]
async fn a_node_that_stops_heart_beating_is_removed_within_its_lease() {
    let registry = Arc::new(MemoryRegistry::new());
    let a = start(&registry, "a").await;
    let b = start(&registry, "b").await;
    a.view().wait_until(|nodes| nodes.len() == 2).await;
    let mut discover = a.discover(|_: &NodeInfo| ());
    next_change(&mut discover).await;
    next_change(&mut discover).await;

    // Let a few heartbeats pass, then b crashes right after one.
    tokio::time::advance(Duration::from_secs(12)).await;
    b.registrar().refresh().await.unwrap();
    let crashed = Instant::now();
    drop(b);
    assert_eq!(removed(next_change(&mut discover).await), node("b"));
    let seen_after = crashed.elapsed();
    let lease = config().lease;
    assert!(
        seen_after <= lease,
        "seen after {seen_after:?}, lease {lease:?}"
    );
    assert!(
        seen_after >= lease - Duration::from_secs(1),
        "too early: {seen_after:?}"
    );
    // a, which kept heart-beating, is still there.
    assert_eq!(ids(a.view()), BTreeSet::from(["a".to_owned()]));
}

#[tokio::test(start_paused = true)]
async fn a_malformed_record_is_skipped_and_discovery_goes_on() {
    let registry = Arc::new(MemoryRegistry::new());
    registry
        .put_node(
            &node("garbage"),
            "{not json".into(),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let impostor = info("someone-else").to_json().unwrap();
    registry
        .put_node(&node("impostor"), impostor.into(), Duration::from_secs(60))
        .await
        .unwrap();
    let a = start(&registry, "a").await;
    let b = start(&registry, "b").await;
    a.view().wait_until(|nodes| nodes.len() == 2).await;
    assert_eq!(
        ids(a.view()),
        BTreeSet::from(["a".to_owned(), "b".to_owned()])
    );

    // A known node whose record turns malformed keeps its last good info.
    let before = a.view().node(&node("b")).expect("b is known");
    registry
        .put_node(&node("b"), "[]".into(), Duration::from_secs(60))
        .await
        .unwrap();
    // Events arrive in order: once a sees its own later update, it has read the bad record.
    a.connections().set(1);
    a.registrar().refresh().await.unwrap();
    a.view()
        .wait_until(|nodes| {
            nodes
                .iter()
                .any(|n| n.node_id == node("a") && n.connection_count == 1)
        })
        .await;
    assert_eq!(
        a.view().node(&node("b")).as_deref(),
        Some(&*before),
        "b is still there, with its last good info"
    );
    // And b's next good record is taken.
    b.connections().set(7);
    b.registrar().refresh().await.unwrap();
    a.view()
        .wait_until(|nodes| nodes.iter().any(|n| n.connection_count == 7))
        .await;
    assert_eq!(ids(a.view()).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn offline_and_restarted_nodes_are_replaced() {
    let registry = Arc::new(MemoryRegistry::new());
    let a = start(&registry, "a").await;
    let b = start(&registry, "b").await;
    a.view().wait_until(|nodes| nodes.len() == 2).await;
    let mut discover = a.discover(|info: &NodeInfo| info.incarnation);
    next_change(&mut discover).await;
    next_change(&mut discover).await;

    // b restarts under a new incarnation: its old service goes, a new one comes.
    drop(b);
    let b = start(&registry, "b").await;
    assert_eq!(removed(next_change(&mut discover).await), node("b"));
    match next_change(&mut discover).await {
        Change::Insert(id, service) => {
            assert_eq!(id, node("b"));
            assert_eq!(*service.get_ref(), b.registrar().info().incarnation);
        }
        Change::Remove(id) => panic!("unexpected removal of {id}"),
    }

    // Offline means gone.
    b.registrar().set_status(NodeStatus::Offline).await.unwrap();
    assert_eq!(removed(next_change(&mut discover).await), node("b"));
}

#[tokio::test(start_paused = true)]
async fn updates_for_another_node_and_invalid_configs_are_refused() {
    let registry = Arc::new(MemoryRegistry::new());
    let a = start(&registry, "a").await;
    assert!(matches!(
        a.update_node_info(info("b")).await,
        Err(DiscoveryError::WrongNode { .. })
    ));
    let mut bad = info("a");
    bad.cpu_usage_percent = 250.0;
    assert!(matches!(
        a.update_node_info(bad).await,
        Err(DiscoveryError::InvalidNodeInfo(_))
    ));
    let config = DiscoveryConfig::default().with_lease(Duration::from_secs(1));
    assert!(matches!(
        Discovery::start(registry.clone(), info("c"), config).await,
        Err(DiscoveryError::InvalidConfig { .. })
    ));
    a.leave().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_provider_supplies_the_figures_but_not_the_identity() {
    let registry = Arc::new(MemoryRegistry::new());
    let config = config().with_provider(|| async {
        let mut info = info("not-me");
        info.connection_count = 42;
        info.cpu_usage_percent = 12.5;
        info.status = NodeStatus::Offline;
        info
    });
    let a = Discovery::start(registry.clone(), info("a"), config)
        .await
        .unwrap();
    a.view().wait_until(|nodes| !nodes.is_empty()).await;
    let seen = a
        .view()
        .node(&node("a"))
        .expect("a is registered under its own id");
    assert_eq!(seen.connection_count, 42);
    assert_eq!(seen.cpu_usage_percent, 12.5);
    assert_eq!(
        seen.status,
        NodeStatus::Active,
        "the status stays the registrar's"
    );
}

mod signed {
    use futures_core::future::BoxFuture;
    use hybrid_cluster_core::registry::RegistryEvents;
    use hybrid_cluster_core::{
        ClusterSecret, ConnectionId, NodeRecord, RegistryError, RegistryEvent, RemovalCause,
    };
    use parking_lot::Mutex;
    use tokio::sync::mpsc;

    use super::*;

    fn secret() -> ClusterSecret {
        ClusterSecret::new("the cluster secret of these tests").unwrap()
    }

    fn other_secret() -> ClusterSecret {
        ClusterSecret::new("another cluster's secret, as long").unwrap()
    }

    fn signed_config() -> DiscoveryConfig {
        config().with_secret(secret())
    }

    async fn start_signed(registry: Arc<dyn Registry>, id: &str) -> Discovery {
        Discovery::start(registry, info(id), signed_config())
            .await
            .unwrap()
    }

    /// A memory registry whose watchers can also be sent events nobody made, as anyone who can
    /// publish on Redis's events channel can.
    #[derive(Debug, Default)]
    struct Injecting {
        inner: MemoryRegistry,
        injectors: Mutex<Vec<mpsc::UnboundedSender<RegistryEvent>>>,
    }

    impl Injecting {
        fn inject(&self, event: RegistryEvent) {
            self.injectors
                .lock()
                .retain(|tx| tx.send(event.clone()).is_ok());
        }
    }

    impl Registry for Injecting {
        fn put_node(
            &self,
            node: &NodeId,
            record: bytes::Bytes,
            lease: Duration,
        ) -> BoxFuture<'static, Result<(), RegistryError>> {
            self.inner.put_node(node, record, lease)
        }
        fn remove_node(&self, node: &NodeId) -> BoxFuture<'static, Result<(), RegistryError>> {
            self.inner.remove_node(node)
        }
        fn node(
            &self,
            node: &NodeId,
        ) -> BoxFuture<'static, Result<Option<NodeRecord>, RegistryError>> {
            self.inner.node(node)
        }
        fn nodes(&self) -> BoxFuture<'static, Result<Vec<NodeRecord>, RegistryError>> {
            self.inner.nodes()
        }
        fn watch(&self) -> BoxFuture<'static, Result<RegistryEvents, RegistryError>> {
            let (tx, rx) = mpsc::unbounded_channel();
            self.injectors.lock().push(tx);
            let inner = self.inner.watch();
            Box::pin(async move {
                let injected = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|event| (Ok(event), rx))
                });
                let events: RegistryEvents =
                    Box::pin(futures_util::stream::select(inner.await?, injected));
                Ok(events)
            })
        }
        fn put_route(
            &self,
            name: &str,
            connection: &ConnectionId,
            lease: Duration,
        ) -> BoxFuture<'static, Result<(), RegistryError>> {
            self.inner.put_route(name, connection, lease)
        }
        fn route(
            &self,
            name: &str,
        ) -> BoxFuture<'static, Result<Option<ConnectionId>, RegistryError>> {
            self.inner.route(name)
        }
        fn remove_route(&self, name: &str) -> BoxFuture<'static, Result<(), RegistryError>> {
            self.inner.remove_route(name)
        }
    }

    /// Waits until every event sent before now was applied by `a`'s view: `a` pushes a
    /// connection count of `marker`, and events reach a watcher in order.
    async fn settle(a: &Discovery, marker: u32) {
        a.connections().set(marker);
        a.registrar().refresh().await.unwrap();
        a.view()
            .wait_until(|nodes| {
                nodes
                    .iter()
                    .any(|n| n.node_id == node("a") && n.connection_count == marker)
            })
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn forged_unsigned_and_replayed_records_are_ignored_while_signed_peers_are_seen() {
        let registry = Arc::new(MemoryRegistry::new());
        let lease = Duration::from_secs(60);
        // Records from nodes without the secret: one unsigned, one signed with a guess.
        registry
            .put_node(
                &node("intruder"),
                info("intruder").to_json().unwrap().into(),
                lease,
            )
            .await
            .unwrap();
        let forged = info("forger").to_signed_json(&other_secret()).unwrap();
        registry
            .put_node(&node("forger"), forged.into(), lease)
            .await
            .unwrap();
        let a = start_signed(registry.clone(), "a").await;
        let b = start_signed(registry.clone(), "b").await;
        a.view().wait_until(|nodes| nodes.len() == 2).await;
        assert_eq!(ids(a.view()), BTreeSet::from(["a".into(), "b".into()]));

        let mut membership = a.view().subscribe();
        membership.borrow_and_update();

        // A node without the secret impersonates b: a keeps b's last good info.
        let mut impostor = b.registrar().info();
        impostor.address = "10.6.6.6".into();
        let impostor_record = impostor.to_json().unwrap();
        registry
            .put_node(&node("b"), impostor_record.into(), lease)
            .await
            .unwrap();
        let forged = impostor.to_signed_json(&other_secret()).unwrap();
        registry
            .put_node(&node("b"), forged.into(), lease)
            .await
            .unwrap();
        // A replay of an older record of b, validly signed.
        let mut old = b.registrar().info();
        old.last_heartbeat -= Duration::from_secs(10);
        old.connection_count = 99;
        registry
            .put_node(
                &node("b"),
                old.to_signed_json(&secret()).unwrap().into(),
                lease,
            )
            .await
            .unwrap();
        settle(&a, 1).await;
        assert!(!membership.has_changed().unwrap(), "no join, no removal");
        let seen_b = a.view().node(&node("b")).unwrap();
        assert_eq!(seen_b.address, "127.0.0.1");
        assert_eq!(seen_b.connection_count, 0);
        assert_eq!(ids(a.view()).len(), 2);

        // b's own next record is seen.
        b.connections().set(7);
        b.registrar().refresh().await.unwrap();
        a.view()
            .wait_until(|nodes| nodes.iter().any(|n| n.connection_count == 7))
            .await;

        // Every listing skips them too.
        tokio::time::advance(Duration::from_secs(31)).await;
        settle(&a, 2).await;
        assert_eq!(ids(a.view()), BTreeSet::from(["a".into(), "b".into()]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_forged_leave_does_not_evict_a_signed_node() {
        let registry = Arc::new(Injecting::default());
        let a = start_signed(registry.clone(), "a").await;
        let b = start_signed(registry.clone(), "b").await;
        a.view().wait_until(|nodes| nodes.len() == 2).await;
        let mut membership = a.view().subscribe();
        membership.borrow_and_update();

        registry.inject(RegistryEvent::Removed {
            node: node("b"),
            cause: RemovalCause::Left,
        });
        registry.inject(RegistryEvent::Removed {
            node: node("b"),
            cause: RemovalCause::Expired,
        });
        settle(&a, 1).await;
        assert!(!membership.has_changed().unwrap(), "b was never removed");
        assert_eq!(ids(a.view()), BTreeSet::from(["a".into(), "b".into()]));

        // A real leave is still seen at once.
        let left = Instant::now();
        b.leave().await.unwrap();
        a.view().wait_until(|nodes| nodes.len() == 1).await;
        assert_eq!(left.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_secret_a_forged_leave_evicts() {
        // What the confirmation above prevents.
        let registry = Arc::new(Injecting::default());
        let a = Discovery::start(registry.clone(), info("a"), config())
            .await
            .unwrap();
        let _b = Discovery::start(registry.clone(), info("b"), config())
            .await
            .unwrap();
        a.view().wait_until(|nodes| nodes.len() == 2).await;
        registry.inject(RegistryEvent::Removed {
            node: node("b"),
            cause: RemovalCause::Left,
        });
        a.view().wait_until(|nodes| nodes.len() == 1).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_under_a_new_incarnation_is_seen_but_not_an_older_one() {
        let registry = Arc::new(MemoryRegistry::new());
        let a = start_signed(registry.clone(), "a").await;
        let b = start_signed(registry.clone(), "b").await;
        a.view().wait_until(|nodes| nodes.len() == 2).await;
        let first_run = b.registrar().info();
        drop(b);

        let mut restarted = info("b");
        restarted.registered_at = first_run.registered_at + Duration::from_secs(1);
        let b = Discovery::start(registry.clone(), restarted, signed_config())
            .await
            .unwrap();
        let incarnation = b.registrar().info().incarnation;
        a.view()
            .wait_until(|nodes| nodes.iter().any(|n| n.incarnation == incarnation))
            .await;

        // The first run's record, replayed: refused.
        registry
            .put_node(
                &node("b"),
                first_run.to_signed_json(&secret()).unwrap().into(),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        settle(&a, 1).await;
        assert_eq!(a.view().node(&node("b")).unwrap().incarnation, incarnation);
    }
}

#[tokio::test(start_paused = true)]
async fn a_node_back_under_the_same_incarnation_keeps_its_live_info_cell() {
    let registry = Arc::new(MemoryRegistry::new());
    let a = start(&registry, "a").await;
    let b = start(&registry, "b").await;
    a.view().wait_until(|nodes| nodes.len() == 2).await;
    let mut discover = a.discover(|_: &NodeInfo| ());
    let mut b_service = None;
    for _ in 0..2 {
        if let Change::Insert(id, service) = next_change(&mut discover).await
            && id == node("b")
        {
            b_service = Some(service);
        }
    }
    let b_service = b_service.expect("b was inserted");

    // b's record vanishes while b lives (as when Redis restarts without persistence)...
    registry.remove_node(&node("b")).await.unwrap();
    a.view().wait_until(|nodes| nodes.len() == 1).await;
    // ...and its next heartbeat brings it back, same incarnation.
    b.connections().set(33);
    b.registrar().refresh().await.unwrap();
    a.view()
        .wait_until(|nodes| nodes.iter().any(|n| n.connection_count == 33))
        .await;
    // What held b's cell before follows it again, not a frozen copy.
    assert_eq!(b_service.load(), 0.33);
    b.connections().set(44);
    b.registrar().refresh().await.unwrap();
    a.view()
        .wait_until(|nodes| nodes.iter().any(|n| n.connection_count == 44))
        .await;
    assert_eq!(b_service.load(), 0.44);
}
