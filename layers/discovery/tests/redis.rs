//! Discovery against the real Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`), each test
//! under a prefix of its own so tests run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hybrid_cluster_core::{
    ClusterPrefix, ClusterSecret, Incarnation, NodeId, NodeInfo, RedisUrl, Registry,
};
use hybrid_cluster_discovery::{Discovery, DiscoveryConfig, RedisOptions, RedisRegistry};
use hybrid_cluster_test_support::servers;
use tokio::time::{Instant, timeout};
use tower::balance::p2c::Balance;
use tower::{Service, ServiceExt};

fn redis_url() -> RedisUrl {
    servers::redis_url()
        .parse()
        .expect("REDIS_URL is a Redis connection string")
}

/// A prefix no other test uses.
fn unique_prefix(test: &str) -> ClusterPrefix {
    ClusterPrefix::new(servers::unique_prefix(&format!("hc-test:{test}"))).unwrap()
}

/// A registry with a connection of its own, as a separate node process would have.
async fn registry(prefix: &ClusterPrefix, client_name: &str) -> Arc<RedisRegistry> {
    let options = RedisOptions {
        client_name: client_name.to_owned(),
        ..RedisOptions::default()
    };
    Arc::new(
        RedisRegistry::connect(&redis_url(), prefix, options)
            .await
            .expect("Redis is running (./scripts/test.sh starts it)"),
    )
}

fn info(id: &str) -> NodeInfo {
    let mut info = NodeInfo::new(
        NodeId::new(id).unwrap(),
        Incarnation::random(),
        "127.0.0.1",
        5000,
    );
    info.max_connections = 1000;
    info
}

fn fast() -> DiscoveryConfig {
    DiscoveryConfig::default().with_heartbeat(Duration::from_millis(200))
}

async fn node(prefix: &ClusterPrefix, id: &str, config: DiscoveryConfig) -> Discovery {
    let registry = registry(prefix, &format!("hc-{id}")).await;
    Discovery::start(registry, info(id), config).await.unwrap()
}

fn ids(discovery: &Discovery) -> BTreeSet<String> {
    discovery
        .nodes()
        .iter()
        .map(|n| n.node_id.to_string())
        .collect()
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"))
}

/// Deletes what a test left in Redis.
async fn clean(prefix: &ClusterPrefix) {
    let registry = registry(prefix, "hc-cleanup").await;
    let keys = registry.keys();
    let mut connection = registry.connection();
    let ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys.index_key())
        .query_async(&mut connection)
        .await
        .unwrap();
    let mut pipe = redis::pipe();
    pipe.cmd("DEL").arg(keys.index_key()).ignore();
    for id in ids {
        if let Ok(id) = NodeId::new(&id) {
            pipe.cmd("DEL").arg(keys.node_key(&id)).ignore();
        }
    }
    pipe.query_async::<()>(&mut connection).await.unwrap();
}

#[tokio::test]
async fn three_nodes_join_and_see_each_other() {
    let prefix = unique_prefix("join");
    let a = node(&prefix, "a", fast()).await;
    let b = node(&prefix, "b", fast()).await;
    let c = node(&prefix, "c", fast()).await;
    for discovery in [&a, &b, &c] {
        within(
            "all three are seen",
            discovery.view().wait_until(|n| n.len() == 3),
        )
        .await;
        assert_eq!(ids(discovery), ["a", "b", "c"].map(String::from).into());
    }
    // The records are where the docs say, with a lease running.
    let registry = registry(&prefix, "hc-inspect").await;
    let mut connection = registry.connection();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(registry.keys().node_key(&NodeId::new("a").unwrap()))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 600, "lease left: {pttl} ms");
    // The index set expires too, a lease after the last heartbeat: a cluster whose nodes all
    // crash leaves nothing behind.
    let index_ttl: i64 = redis::cmd("PTTL")
        .arg(registry.keys().index_key())
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(
        index_ttl > 0 && index_ttl <= 600,
        "index lease left: {index_ttl} ms"
    );
    for discovery in [a, b, c] {
        discovery.leave().await.unwrap();
    }
    clean(&prefix).await;
}

#[tokio::test]
async fn node_info_updates_are_seen_by_peers() {
    let prefix = unique_prefix("update");
    let a = node(&prefix, "a", fast()).await;
    let b = node(&prefix, "b", fast()).await;
    within("b sees a", b.view().wait_until(|n| n.len() == 2)).await;

    // Pushed at once.
    let mut update = a.registrar().info();
    update.metadata.insert("zone".into(), "eu-1".into());
    a.update_node_info(update).await.unwrap();
    within(
        "b sees a's metadata",
        b.view().wait_until(|n| {
            n.iter()
                .any(|n| n.metadata.get("zone").is_some_and(|z| z == "eu-1"))
        }),
    )
    .await;

    // Published by the heartbeat, with measured resources.
    a.connections().set(321);
    within(
        "b sees a's connection count",
        b.view()
            .wait_until(|n| n.iter().any(|n| n.connection_count == 321)),
    )
    .await;
    let seen = b.view().node(&NodeId::new("a").unwrap()).unwrap();
    assert!(seen.memory_usage_bytes > 0, "memory is measured");
    assert!((0.0..=100.0).contains(&seen.cpu_usage_percent));
    a.leave().await.unwrap();
    b.leave().await.unwrap();
    clean(&prefix).await;
}

#[tokio::test]
async fn a_graceful_leave_is_seen_in_under_a_second() {
    let prefix = unique_prefix("leave");
    // A long heartbeat and lease: only the leave event can explain a prompt removal.
    let slow = DiscoveryConfig::default().with_heartbeat(Duration::from_secs(10));
    let a = node(&prefix, "a", slow.clone()).await;
    let b = node(&prefix, "b", slow).await;
    within("a sees b", a.view().wait_until(|n| n.len() == 2)).await;

    let left = Instant::now();
    b.leave().await.unwrap();
    within("b is gone", a.view().wait_until(|n| n.len() == 1)).await;
    let seen_after = left.elapsed();
    eprintln!("graceful leave seen after {seen_after:?}");
    assert!(
        seen_after < Duration::from_secs(1),
        "seen after {seen_after:?}"
    );
    a.leave().await.unwrap();
    clean(&prefix).await;
}

#[tokio::test]
async fn a_node_that_stops_heart_beating_is_removed_within_its_lease() {
    let prefix = unique_prefix("crash");
    let config = fast();
    let lease = config.lease;
    let a = node(&prefix, "a", config.clone()).await;
    let b = node(&prefix, "b", config).await;
    within("a sees b", a.view().wait_until(|n| n.len() == 2)).await;

    b.registrar().refresh().await.unwrap();
    let crashed = Instant::now();
    drop(b); // no goodbye: the heartbeat just stops
    within("b expires", a.view().wait_until(|n| n.len() == 1)).await;
    let seen_after = crashed.elapsed();
    eprintln!("crash seen after {seen_after:?} (lease {lease:?})");
    // Within the lease, plus the time to read the expired record and some scheduling slack.
    assert!(
        seen_after < lease + Duration::from_millis(300),
        "seen after {seen_after:?}"
    );
    assert!(
        seen_after >= lease - Duration::from_millis(50),
        "too early: {seen_after:?}"
    );
    a.leave().await.unwrap();
    clean(&prefix).await;
}

#[tokio::test]
async fn a_malformed_record_is_skipped() {
    let prefix = unique_prefix("malformed");
    let registry = registry(&prefix, "hc-writer").await;
    let keys = registry.keys().clone();
    let mut connection = registry.connection();
    // Garbage under a node key, a record naming another node, and an invalid index member.
    redis::pipe()
        .cmd("SET")
        .arg(keys.node_key(&NodeId::new("garbage").unwrap()))
        .arg("{not json")
        .arg("PX")
        .arg(60_000)
        .ignore()
        .cmd("SET")
        .arg(keys.node_key(&NodeId::new("impostor").unwrap()))
        .arg(info("someone-else").to_json().unwrap())
        .arg("PX")
        .arg(60_000)
        .ignore()
        .cmd("SADD")
        .arg(keys.index_key())
        .arg("garbage")
        .arg("impostor")
        .arg("not a node id")
        .ignore()
        .query_async::<()>(&mut connection)
        .await
        .unwrap();

    let a = node(&prefix, "a", fast()).await;
    let b = node(&prefix, "b", fast()).await;
    within("a sees b", a.view().wait_until(|n| n.len() == 2)).await;
    assert_eq!(ids(&a), ["a", "b"].map(String::from).into());
    // Discovery keeps going: a heartbeat's update is still seen.
    b.connections().set(9);
    within(
        "a sees b's update",
        a.view()
            .wait_until(|n| n.iter().any(|n| n.connection_count == 9)),
    )
    .await;
    a.leave().await.unwrap();
    b.leave().await.unwrap();
    clean(&prefix).await;
}

#[tokio::test]
async fn forged_records_and_a_forged_leave_are_ignored_with_a_secret() {
    let prefix = unique_prefix("signed");
    let secret = ClusterSecret::new("the cluster secret of this test").unwrap();
    let config = fast().with_secret(secret.clone());
    let a = node(&prefix, "a", config.clone()).await;
    let b = node(&prefix, "b", config).await;
    within("a sees b", a.view().wait_until(|n| n.len() == 2)).await;

    let mut membership = a.view().subscribe();
    membership.borrow_and_update();

    // Someone who can write to Redis but does not know the secret, with raw commands.
    let registry = registry(&prefix, "hc-intruder").await;
    let keys = registry.keys().clone();
    let mut connection = registry.connection();
    let guessed = ClusterSecret::new("a guess at the cluster secret").unwrap();
    let forged = info("forger").to_signed_json(&guessed).unwrap();
    let unsigned = info("intruder").to_json().unwrap();
    let mut impostor = b.registrar().info();
    impostor.address = "10.6.6.6".into();
    let impostor = impostor.to_signed_json(&guessed).unwrap();
    let updated = |id: &str, record: &[u8]| {
        let mut event = format!("updated {id} 60000\n").into_bytes();
        event.extend_from_slice(record);
        event
    };
    redis::pipe()
        .cmd("SET")
        .arg(keys.node_key(&NodeId::new("forger").unwrap()))
        .arg(&forged)
        .arg("PX")
        .arg(60_000)
        .ignore()
        .cmd("SET")
        .arg(keys.node_key(&NodeId::new("intruder").unwrap()))
        .arg(&unsigned)
        .arg("PX")
        .arg(60_000)
        .ignore()
        .cmd("SADD")
        .arg(keys.index_key())
        .arg("forger")
        .arg("intruder")
        .ignore()
        .cmd("PUBLISH")
        .arg(keys.events_channel())
        .arg(updated("forger", &forged))
        .ignore()
        .cmd("PUBLISH")
        .arg(keys.events_channel())
        .arg(updated("b", &impostor))
        .ignore()
        // The events channel is not signed: anyone can say b left.
        .cmd("PUBLISH")
        .arg(keys.events_channel())
        .arg("left b")
        .ignore()
        .query_async::<()>(&mut connection)
        .await
        .unwrap();

    // Events arrive in order: once a sees b's next update, it has handled the forged ones.
    b.connections().set(9);
    b.registrar().refresh().await.unwrap();
    within(
        "a sees b's update",
        a.view()
            .wait_until(|n| n.iter().any(|n| n.connection_count == 9)),
    )
    .await;
    assert!(
        !membership.has_changed().unwrap(),
        "nobody joined and b was never removed, not even for a moment"
    );
    assert_eq!(ids(&a), ["a", "b"].map(String::from).into());
    assert_eq!(
        a.view().node(&NodeId::new("b").unwrap()).unwrap().address,
        "127.0.0.1"
    );
    // A listing skips the forged records too.
    let c = node(&prefix, "c", fast().with_secret(secret)).await;
    within("c sees a and b", c.view().wait_until(|n| n.len() == 3)).await;
    assert_eq!(ids(&c), ["a", "b", "c"].map(String::from).into());

    // A real leave is still seen at once.
    b.leave().await.unwrap();
    within("b is gone", a.view().wait_until(|n| n.len() == 2)).await;
    a.leave().await.unwrap();
    c.leave().await.unwrap();
    clean(&prefix).await;
}

#[tokio::test]
async fn a_killed_redis_connection_is_recovered_from() {
    let prefix = unique_prefix("kill");
    // Node a connects as a Redis user of its own, so its connections, and no other test's,
    // can be killed with `CLIENT KILL USER`.
    let admin = registry(&prefix, "hc-admin").await;
    let mut connection = admin.connection();
    let user = servers::unique_prefix("hc-victim");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(">victim-password")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut connection)
        .await
        .unwrap();
    let base = redis_url();
    let victim_url: RedisUrl = format!(
        "redis://{user}:victim-password@{}:{}/{}",
        base.host(),
        base.port(),
        base.db()
    )
    .parse()
    .unwrap();
    let victim_registry = Arc::new(
        RedisRegistry::connect(&victim_url, &prefix, RedisOptions::default())
            .await
            .unwrap(),
    );
    let a = Discovery::start(victim_registry, info("a"), fast())
        .await
        .unwrap();
    let b = node(&prefix, "b", fast()).await;
    within("a sees b", a.view().wait_until(|n| n.len() == 2)).await;

    // Kill every connection of node a: its commands and its subscription.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("USER")
        .arg(&user)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(
        killed >= 2,
        "a's command and pub/sub connections, killed {killed}"
    );

    // a's heartbeat reconnects (it stays registered), and a's view resubscribes (it sees b's
    // updates again).
    a.connections().set(11);
    within(
        "b sees a's heartbeat after the kill",
        b.view().wait_until(|n| {
            n.iter()
                .any(|n| n.node_id.as_str() == "a" && n.connection_count == 11)
        }),
    )
    .await;
    b.connections().set(22);
    within(
        "a's view follows b again",
        a.view().wait_until(|n| {
            n.iter()
                .any(|n| n.node_id.as_str() == "b" && n.connection_count == 22)
        }),
    )
    .await;
    assert_eq!(ids(&a), ["a", "b"].map(String::from).into());
    let listed = admin.nodes().await.unwrap();
    assert_eq!(listed.len(), 2, "a is still registered");
    a.leave().await.unwrap();
    b.leave().await.unwrap();
    let _: i64 = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut connection)
        .await
        .unwrap();
    clean(&prefix).await;
}

#[tokio::test]
async fn p2c_balances_over_the_discovered_nodes() {
    let prefix = unique_prefix("p2c");
    let busy = node(&prefix, "busy", fast()).await;
    let idle = node(&prefix, "idle", fast()).await;
    busy.connections().set(900);
    busy.registrar().refresh().await.unwrap();
    idle.connections().set(10);
    idle.registrar().refresh().await.unwrap();
    within(
        "loads are seen",
        busy.view().wait_until(|n| {
            n.len() == 2
                && n.iter().any(|n| n.connection_count == 900)
                && n.iter().any(|n| n.connection_count == 10)
        }),
    )
    .await;

    let discover = busy.discover(|info: &NodeInfo| {
        let name = info.node_id.to_string();
        tower::service_fn(move |()| {
            let name = name.clone();
            async move { Ok::<_, std::convert::Infallible>(name) }
        })
    });
    let mut balance = Balance::new(discover);
    // With two nodes p2c compares both every time: the idle one always wins.
    for _ in 0..20 {
        let chosen = balance.ready().await.unwrap().call(()).await.unwrap();
        assert_eq!(chosen, "idle");
    }
    // Draining takes a node out of the running even when it is the least loaded.
    idle.drain().await.unwrap();
    within(
        "the drain is seen",
        busy.view().wait_until(|n| {
            n.iter()
                .any(|n| n.status == hybrid_cluster_core::NodeStatus::Draining)
        }),
    )
    .await;
    let chosen = balance.ready().await.unwrap().call(()).await.unwrap();
    assert_eq!(chosen, "busy");
    busy.leave().await.unwrap();
    idle.leave().await.unwrap();
    clean(&prefix).await;
}

#[tokio::test]
async fn an_unreachable_redis_is_a_clear_error_at_start_up() {
    let url: RedisUrl = "redis://127.0.0.1:1".parse().unwrap();
    let options = RedisOptions {
        connection_timeout: Duration::from_millis(500),
        ..RedisOptions::default()
    };
    let error = RedisRegistry::connect(&url, &ClusterPrefix::default(), options)
        .await
        .unwrap_err();
    assert!(error.is_transient(), "{error:?}");
    assert_eq!(error.to_string(), "the registry is unreachable");
}

#[tokio::test]
async fn routes_are_leased_in_redis() {
    let prefix = unique_prefix("routes");
    let registry = registry(&prefix, "hc-routes").await;
    let connection: hybrid_cluster_core::ConnectionId = "a:00000000000000a1:7".parse().unwrap();
    registry
        .put_route("user:42", &connection, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(
        registry.route("user:42").await.unwrap(),
        Some(connection.clone())
    );
    assert_eq!(registry.route("user:43").await.unwrap(), None);

    // The lease is Redis's own: the route is gone once it runs out.
    let mut redis = registry.connection();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(registry.keys().route_key("user:42"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 300, "route lease left: {pttl} ms");
    registry
        .put_route("user:44", &connection, Duration::from_secs(60))
        .await
        .unwrap();
    registry.remove_route("user:44").await.unwrap();
    assert_eq!(registry.route("user:44").await.unwrap(), None);

    // A value that is not a connection id is an error naming its key.
    let _: () = redis::cmd("SET")
        .arg(registry.keys().route_key("bad"))
        .arg("not an id")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    match registry.route("bad").await {
        Err(hybrid_cluster_core::RegistryError::Malformed { key, .. }) => {
            assert!(key.ends_with(":routes:bad"), "{key}")
        }
        other => panic!("expected a malformed-route error, got {other:?}"),
    }
    let _: () = redis::cmd("DEL")
        .arg(registry.keys().route_key("bad"))
        .query_async(&mut redis)
        .await
        .unwrap();
}

/// Without a secret: a crashed node's key written again with no lease (a `SET` by hand, or a
/// script gone wrong) does not keep the node in anyone's view: it is dropped within its
/// lease like any crashed node.
#[tokio::test]
async fn a_crashed_nodes_key_set_again_without_a_lease_does_not_keep_it_alive() {
    let prefix = unique_prefix("zombie");
    let config = fast();
    let lease = config.lease;
    let a = node(&prefix, "a", config.clone()).await;
    let b = node(&prefix, "b", config).await;
    within("a sees b", a.view().wait_until(|n| n.len() == 2)).await;
    let last = b.registrar().refresh().await.unwrap();
    drop(b); // a crash: no goodbye

    // Its last record written back under its key, with no TTL.
    let registry = registry(&prefix, "hc-writer").await;
    let key = registry.keys().node_key(&last.node_id);
    let () = redis::cmd("SET")
        .arg(&key)
        .arg(last.to_json().unwrap())
        .query_async(&mut registry.connection())
        .await
        .unwrap();
    let crashed = Instant::now();
    within("b is dropped", a.view().wait_until(|n| n.len() == 1)).await;
    assert!(
        crashed.elapsed() < lease + Duration::from_millis(500),
        "dropped after {:?} (lease {lease:?})",
        crashed.elapsed()
    );
    // And a later full read does not bring it back.
    let c = node(&prefix, "c", fast()).await;
    within("c sees a and itself", c.view().wait_until(|n| n.len() == 2)).await;
    assert!(!ids(&c).contains(last.node_id.as_str()), "{:?}", ids(&c));
    a.leave().await.unwrap();
    c.leave().await.unwrap();
    clean(&prefix).await;
}

/// With a secret: a departed node's signed record replayed into Redis (with a fresh TTL)
/// once its own lease is over is refused, by a peer that saw the node and by one started
/// after it left.
#[tokio::test]
async fn a_replayed_old_record_does_not_bring_a_node_back() {
    let prefix = unique_prefix("ghost");
    let secret = ClusterSecret::new("the cluster secret of this test").unwrap();
    let config = DiscoveryConfig {
        max_clock_skew: Duration::from_millis(100),
        ..fast().with_secret(secret.clone())
    };
    let lease = config.lease;
    let a = node(&prefix, "a", config.clone()).await;
    let b = node(&prefix, "b", config.clone()).await;
    within("a sees b", a.view().wait_until(|n| n.len() == 2)).await;
    let last = b.registrar().refresh().await.unwrap();
    let captured = last.to_signed_json(&secret).unwrap();
    b.leave().await.unwrap();
    within("b left", a.view().wait_until(|n| n.len() == 1)).await;
    // Its own lease ends, and the clock skew allowed passes.
    tokio::time::sleep(lease + Duration::from_millis(200)).await;

    let registry = registry(&prefix, "hc-replayer").await;
    let keys = registry.keys().clone();
    let mut connection = registry.connection();
    let () = redis::cmd("SET")
        .arg(keys.node_key(&last.node_id))
        .arg(&captured)
        .arg("PX")
        .arg(60_000)
        .query_async(&mut connection)
        .await
        .unwrap();
    let () = redis::cmd("SADD")
        .arg(keys.index_key())
        .arg(last.node_id.as_str())
        .query_async(&mut connection)
        .await
        .unwrap();
    let mut event = format!("updated {} 60000\n", last.node_id).into_bytes();
    event.extend_from_slice(&captured);
    let _: i64 = redis::cmd("PUBLISH")
        .arg(keys.events_channel())
        .arg(event)
        .query_async(&mut connection)
        .await
        .unwrap();
    // A peer started after b left reads everything from Redis: b is not among its nodes.
    let c = node(&prefix, "c", config).await;
    within("c sees a and itself", c.view().wait_until(|n| n.len() == 2)).await;
    assert!(!ids(&c).contains(last.node_id.as_str()), "{:?}", ids(&c));
    // Nor does a take it back (its event came before c joined, whose event comes after).
    within("a sees c", a.view().wait_until(|n| n.len() == 2)).await;
    assert!(!ids(&a).contains(last.node_id.as_str()), "{:?}", ids(&a));
    a.leave().await.unwrap();
    c.leave().await.unwrap();
    clean(&prefix).await;
}

/// An event claiming an absurd lease (or a record claiming an absurd `lease_ms`) does not
/// break the view: it goes on following the cluster.
#[tokio::test]
async fn absurd_leases_in_events_and_records_do_not_break_the_view() {
    let prefix = unique_prefix("absurd");
    let a = node(&prefix, "a", fast()).await;
    let registry = registry(&prefix, "hc-absurd").await;
    let keys = registry.keys().clone();
    let mut connection = registry.connection();
    let mut odd = info("odd");
    odd.lease_ms = Some(u64::MAX);
    let mut event = b"updated odd 18446744073709551615\n".to_vec();
    event.extend_from_slice(&odd.to_json().unwrap());
    let _: i64 = redis::cmd("PUBLISH")
        .arg(keys.events_channel())
        .arg(event)
        .query_async(&mut connection)
        .await
        .unwrap();
    // The view still follows: a node joining now is seen.
    let b = node(&prefix, "b", fast()).await;
    within(
        "a sees b",
        a.view()
            .wait_until(|n| n.iter().any(|n| n.node_id.as_str() == "b")),
    )
    .await;
    a.leave().await.unwrap();
    b.leave().await.unwrap();
    clean(&prefix).await;
}
