//! Redis discovery feeding tower's p2c balancer, with nothing else of hybrid-cluster.
//!
//! ```sh
//! cargo run -p hybrid-cluster-discovery --example p2c            # Redis on 127.0.0.1:6379
//! REDIS_URL=redis://cache:6379 cargo run -p hybrid-cluster-discovery --example p2c
//! ```
//!
//! Three nodes register under a prefix of their own with different connection counts; a p2c
//! balancer over one node's `Discover` sends 1,000 requests, mostly to the least loaded nodes;
//! then a node leaves and the balancer stops choosing it at once.

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use hybrid_cluster_core::{ClusterPrefix, Incarnation, NodeId, NodeInfo, RedisUrl};
use hybrid_cluster_discovery::{Discovery, DiscoveryConfig, RedisOptions, RedisRegistry};
use tower::balance::p2c::Balance;
use tower::{Service, ServiceExt};

type BoxError = Box<dyn Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url: RedisUrl = std::env::var("REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
        .parse()?;
    let prefix = ClusterPrefix::new(format!("p2c-example:{:08x}", rand::random::<u32>()))?;
    let config = DiscoveryConfig::default().with_heartbeat(Duration::from_secs(1));

    let mut nodes = Vec::new();
    for (i, (name, connections)) in [("node-1", 800), ("node-2", 300), ("node-3", 50)]
        .into_iter()
        .enumerate()
    {
        let registry = RedisRegistry::connect(&url, &prefix, RedisOptions::default())
            .await
            .map_err(|e| {
                format!("cannot reach Redis at {url}: {e} (start it, or set REDIS_URL)")
            })?;
        let mut info = NodeInfo::new(
            NodeId::new(name)?,
            Incarnation::random(),
            "127.0.0.1",
            5001 + i as u16,
        );
        info.max_connections = 1000;
        let discovery = Discovery::start(Arc::new(registry), info, config.clone()).await?;
        discovery.connections().set(connections);
        discovery.registrar().refresh().await?;
        println!("{name} registered with {connections} / 1000 connections");
        nodes.push(discovery);
    }
    nodes[0]
        .view()
        .wait_until(|n| n.len() == 3 && n.iter().all(|n| n.connection_count > 0))
        .await;

    // The factory builds each node's service from its info, with no I/O.
    let discover = nodes[0].discover(|info: &NodeInfo| {
        let name = info.node_id.to_string();
        tower::service_fn(move |()| {
            let name = name.clone();
            async move { Ok::<_, BoxError>(name) }
        })
    });
    let mut balance = Balance::new(discover);
    let mut chosen = BTreeMap::<String, u32>::new();
    for _ in 0..1000 {
        let name = balance.ready().await?.call(()).await?;
        *chosen.entry(name).or_default() += 1;
    }
    println!("p2c over live connection load, 1000 picks: {chosen:?}");

    let leaving = nodes.pop().ok_or("no node")?;
    leaving.leave().await?;
    nodes[0].view().wait_until(|n| n.len() == 2).await;
    let mut after = BTreeMap::<String, u32>::new();
    for _ in 0..100 {
        let name = balance.ready().await?.call(()).await?;
        *after.entry(name).or_default() += 1;
    }
    println!("after node-3 left, 100 picks: {after:?}");
    for node in nodes {
        node.leave().await?;
    }
    Ok(())
}
