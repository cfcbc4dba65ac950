//! Discovery on a real Redis Cluster: the loopback one `scripts/redis-cluster.sh start` runs
//! (3 masters, 3 replicas on ports 7000-7005), or the seeds in `REDIS_CLUSTER_URLS`
//! (comma-separated Redis URLs). Each test uses a prefix of its own.
//!
//! The failover test fails the slot's master over to its replica and back, which disturbs every
//! user of that slot: `.config/nextest.toml` runs this binary's tests one at a time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hybrid_cluster_core::{
    ClusterPrefix, ConnectionId, Incarnation, NodeId, NodeInfo, RedisUrl, Registry, RegistryEvent,
};
use hybrid_cluster_discovery::{
    Discovery, DiscoveryConfig, MemberChange, RedisClusterRegistry, RedisOptions,
};
use hybrid_cluster_test_support::servers;
use tokio::time::timeout;
use tokio_stream::StreamExt;

/// The cluster's seeds: `REDIS_CLUSTER_URLS`, by default the loopback cluster's masters.
fn seeds() -> Vec<RedisUrl> {
    servers::redis_cluster_urls()
        .iter()
        .map(|seed| seed.parse().expect("REDIS_CLUSTER_URLS holds Redis URLs"))
        .collect()
}

fn unique_prefix(test: &str) -> ClusterPrefix {
    ClusterPrefix::new(servers::unique_prefix(&format!("hc-test:{test}"))).unwrap()
}

async fn registry(prefix: &ClusterPrefix) -> Arc<RedisClusterRegistry> {
    Arc::new(
        RedisClusterRegistry::connect_cluster(&seeds(), prefix, RedisOptions::default())
            .await
            .expect("the Redis Cluster is running (./scripts/redis-cluster.sh start)"),
    )
}

fn info(id: &str) -> NodeInfo {
    NodeInfo::new(
        NodeId::new(id).unwrap(),
        Incarnation::random(),
        "127.0.0.1",
        5000,
    )
}

/// The default heartbeat (5 s) and lease (15 s): a manual failover pauses writes for up to
/// 5 s per attempt.
fn config() -> DiscoveryConfig {
    DiscoveryConfig::default()
}

async fn node(prefix: &ClusterPrefix, id: &str) -> Discovery {
    Discovery::start(registry(prefix).await, info(id), config())
        .await
        .unwrap()
}

fn ids(discovery: &Discovery) -> BTreeSet<String> {
    discovery
        .nodes()
        .iter()
        .map(|n| n.node_id.to_string())
        .collect()
}

async fn within<T>(seconds: u64, what: &str, future: impl std::future::Future<Output = T>) -> T {
    timeout(Duration::from_secs(seconds), future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"))
}

async fn see_each_other(nodes: &[&Discovery], expected: &[&str]) {
    for discovery in nodes {
        within(
            10,
            "the nodes see each other",
            discovery.view().wait_until(|n| n.len() == expected.len()),
        )
        .await;
        let expected: BTreeSet<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(ids(discovery), expected);
    }
}

#[tokio::test]
async fn two_nodes_on_a_redis_cluster_see_each_other_and_route() {
    let prefix = unique_prefix("rc-join");
    let a = node(&prefix, "a").await;
    let b = node(&prefix, "b").await;
    see_each_other(&[&a, &b], &["a", "b"]).await;

    // Change events travel on the sharded channel: a watcher sees an update at once.
    let registry = registry(&prefix).await;
    let mut events = registry.watch().await.unwrap();
    let mut update = a.registrar().info();
    update.metadata.insert("zone".into(), "eu-1".into());
    a.update_node_info(update).await.unwrap();
    let event = within(5, "the update event arrives", events.next()).await;
    assert!(
        matches!(event, Some(Ok(RegistryEvent::Updated(ref record))) if record.node.as_str() == "a"),
        "{event:?}"
    );
    within(
        5,
        "b sees a's metadata",
        b.view().wait_until(|n| {
            n.iter()
                .any(|n| n.metadata.get("zone").is_some_and(|z| z == "eu-1"))
        }),
    )
    .await;

    // Routes live in the same slot.
    let connection = ConnectionId::new(NodeId::new("a").unwrap(), Incarnation::random(), 7);
    registry
        .put_route("user:42", &connection, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(registry.route("user:42").await.unwrap(), Some(connection));
    registry.remove_route("user:42").await.unwrap();
    assert_eq!(registry.route("user:42").await.unwrap(), None);

    b.leave().await.unwrap();
    within(5, "a sees b leave", a.view().wait_until(|n| n.len() == 1)).await;
    a.leave().await.unwrap();
}

#[tokio::test]
async fn no_seed_is_a_clear_error() {
    let error = RedisClusterRegistry::connect_cluster(
        &[],
        &ClusterPrefix::default(),
        RedisOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("seed"), "{error}");
    let options = RedisOptions {
        connection_timeout: Duration::from_millis(300),
        ..RedisOptions::default()
    };
    let error = RedisClusterRegistry::connect_cluster(
        &["redis://127.0.0.1:1".parse().unwrap()],
        &ClusterPrefix::default(),
        options,
    )
    .await
    .unwrap_err();
    assert!(error.is_transient(), "{error:?}");
}

/// One node of the Redis Cluster, as `CLUSTER NODES` lists it.
#[derive(Clone, Debug)]
struct ClusterNode {
    id: String,
    /// `host:port`.
    address: String,
    master: bool,
    /// The master's id, for a replica.
    replica_of: Option<String>,
    slots: Vec<(u16, u16)>,
}

fn parse_nodes(listing: &str) -> Vec<ClusterNode> {
    listing
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let address = fields[1].split('@').next().unwrap().to_owned();
            let slots = fields[8..]
                .iter()
                .filter(|range| !range.starts_with('['))
                .map(|range| match range.split_once('-') {
                    Some((from, to)) => (from.parse().unwrap(), to.parse().unwrap()),
                    None => (range.parse().unwrap(), range.parse().unwrap()),
                })
                .collect();
            ClusterNode {
                id: fields[0].to_owned(),
                address,
                master: fields[2].contains("master"),
                replica_of: (fields[3] != "-").then(|| fields[3].to_owned()),
                slots,
            }
        })
        .collect()
}

/// A plain connection to one node of the cluster, with the seeds' credentials.
fn node_connection(address: &str) -> redis::RedisResult<redis::Connection> {
    let seed = &seeds()[0];
    let auth = match (seed.username(), seed.password()) {
        (user, Some(password)) => format!("{}:{password}@", user.unwrap_or_default()),
        _ => String::new(),
    };
    let scheme = if seed.tls() { "rediss" } else { "redis" };
    redis::Client::open(format!("{scheme}://{auth}{address}"))?
        .get_connection_with_timeout(Duration::from_secs(2))
}

/// The cluster as the first seed sees it.
fn cluster_nodes() -> redis::RedisResult<Vec<ClusterNode>> {
    let seed = &seeds()[0];
    let mut connection = node_connection(&format!("{}:{}", seed.host(), seed.port()))?;
    let listing: String = redis::cmd("CLUSTER").arg("NODES").query(&mut connection)?;
    Ok(parse_nodes(&listing))
}

/// The master serving `slot`, and the replica of it, when the seed sees both.
fn master_and_replica(slot: u16) -> Option<(ClusterNode, ClusterNode)> {
    let mut nodes = cluster_nodes().ok()?;
    let master = nodes
        .iter()
        .position(|n| n.master && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))?;
    let master = nodes.swap_remove(master);
    let replica = nodes
        .into_iter()
        .find(|n| n.replica_of.as_deref() == Some(&master.id))?;
    Some((master, replica))
}

/// Asks `replica` to take over `slot` from its master, and waits until the seed sees it
/// serving the slot. A manual failover pauses the master's clients and gives up after 5 s when
/// the masters do not vote (each votes once per failing master per two node timeouts, so
/// failing the same pair over again soon is refused for a while): it is asked again after a
/// pause in which writes flow, for up to 45 s.
fn fail_over_to(replica: &ClusterNode, slot: u16) -> redis::RedisResult<bool> {
    for attempt in 0..4 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(5));
        }
        let () = redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query(&mut node_connection(&replica.address)?)?;
        for _ in 0..60 {
            if master_and_replica(slot).is_some_and(|(master, _)| master.id == replica.id) {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(false)
}

/// Gives the slot back to the master it had when the test began, even when the test fails.
struct FailBack {
    original_master: String,
    slot: u16,
}

impl Drop for FailBack {
    fn drop(&mut self) {
        // Best effort, and never a panic here: this may run while a failure unwinds.
        if let Some((master, replica)) = master_and_replica(self.slot)
            && master.id != self.original_master
            && replica.id == self.original_master
            && !matches!(fail_over_to(&replica, self.slot), Ok(true))
        {
            eprintln!("could not give slot {} back to its first master", self.slot);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_survives_a_failover_of_the_slots_master() {
    let prefix = unique_prefix("rc-failover");
    let registry = registry(&prefix).await;
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(registry.keys().index_key())
        .query_async(&mut registry.connection())
        .await
        .unwrap();
    let (master, replica) = master_and_replica(slot).expect("the slot's master has a replica");
    let fail_back = FailBack {
        original_master: master.id.clone(),
        slot,
    };

    let a = node(&prefix, "a").await;
    let b = node(&prefix, "b").await;
    see_each_other(&[&a, &b], &["a", "b"]).await;

    let mut raw_events = registry.watch().await.unwrap();
    // Every member change either node sees from now on: none may be a departure.
    let dropped = Arc::new(AtomicBool::new(false));
    for discovery in [&a, &b] {
        let mut members = discovery.view().subscribe();
        let dropped = dropped.clone();
        tokio::spawn(async move {
            let mut before = members.borrow_and_update().clone();
            while members.changed().await.is_ok() {
                let now = members.borrow_and_update().clone();
                if now
                    .changes_since(&before)
                    .iter()
                    .any(|change| matches!(change, MemberChange::Left(_)))
                {
                    dropped.store(true, Ordering::SeqCst);
                }
                before = now;
            }
        });
    }

    assert!(
        tokio::task::spawn_blocking({
            let replica = replica.clone();
            move || fail_over_to(&replica, slot)
        })
        .await
        .unwrap()
        .unwrap(),
        "the replica took over within 45 s"
    );
    eprintln!(
        "slot {slot}: {} took over from {}",
        replica.address, master.address
    );
    // A watcher from before the failover is never left silent: its stream ends (the server
    // dropped the subscription when the slot moved, and the view subscribes again) or goes
    // on with the heartbeats.
    let failed_over = tokio::time::Instant::now();
    loop {
        match timeout(Duration::from_secs(8), raw_events.next()).await {
            // Two seconds on, it is a heartbeat sent through the new master.
            Ok(Some(Ok(_))) if failed_over.elapsed() > Duration::from_secs(2) => break,
            Ok(Some(Ok(_))) => continue,
            Ok(None | Some(Err(_))) => break,
            Err(_) => panic!("a watcher went silent after the failover"),
        }
    }
    // A few heartbeats through the new master.
    tokio::time::sleep(Duration::from_secs(3)).await;
    see_each_other(&[&a, &b], &["a", "b"]).await;
    // A record written after the failover reaches both, well before their periodic resync.
    let c = node(&prefix, "c").await;
    see_each_other(&[&a, &b, &c], &["a", "b", "c"]).await;
    assert!(
        !dropped.load(Ordering::SeqCst),
        "a node with a good lease was dropped during the failover"
    );

    // And back: the cluster is left as found.
    let old_master = within(30, "the old master follows the new one", async {
        loop {
            match master_and_replica(slot) {
                Some((_, old_master)) if old_master.id == master.id => return old_master,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    assert!(
        tokio::task::spawn_blocking(move || fail_over_to(&old_master, slot))
            .await
            .unwrap()
            .unwrap(),
        "the old master took the slot back within 45 s"
    );
    let d = node(&prefix, "d").await;
    see_each_other(&[&a, &b, &c, &d], &["a", "b", "c", "d"]).await;
    assert!(!dropped.load(Ordering::SeqCst), "dropped on failing back");
    drop(fail_back);
    for discovery in [a, b, c, d] {
        discovery.leave().await.unwrap();
    }
}
