//! How long peers take to see a join, a graceful leave and a crash, against the real Redis.
//!
//! ```sh
//! cargo bench -p hybrid-cluster-discovery --bench timings
//! ```
//!
//! `REDIS_URL` picks the server (default `redis://127.0.0.1:6379`). Every run uses a prefix of
//! its own and removes what it wrote.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use hybrid_cluster_core::{ClusterPrefix, Incarnation, NodeId, NodeInfo, RedisUrl};
use hybrid_cluster_discovery::{Discovery, DiscoveryConfig, RedisOptions, RedisRegistry};
use hybrid_cluster_test_support::servers;
use tokio::time::Instant;

type BoxError = Box<dyn Error + Send + Sync>;

const JOIN_LEAVE_TRIALS: usize = 20;
const CRASH_TRIALS: usize = 3;

async fn start(
    url: &RedisUrl,
    prefix: &ClusterPrefix,
    name: &str,
    config: &DiscoveryConfig,
) -> Result<Discovery, BoxError> {
    let registry = RedisRegistry::connect(url, prefix, RedisOptions::default()).await?;
    let info = NodeInfo::new(NodeId::new(name)?, Incarnation::random(), "127.0.0.1", 5000);
    Ok(Discovery::start(Arc::new(registry), info, config.clone()).await?)
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let p50 = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    format!(
        "{:>10.3} ms {:>10.3} ms",
        p50.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    )
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url: RedisUrl = servers::redis_url().parse()?;
    let prefix = ClusterPrefix::new(servers::unique_prefix("bench-timings"))?;
    // Crash detection is bounded by the lease: measure it with a short one (1 s heartbeat,
    // 3 s lease), which the defaults (5 s / 15 s) scale up.
    let config = DiscoveryConfig::default().with_heartbeat(Duration::from_secs(1));
    let observer = start(&url, &prefix, "observer", &config).await?;

    let mut joins = Vec::new();
    let mut leaves = Vec::new();
    for i in 0..JOIN_LEAVE_TRIALS {
        let name = format!("joiner-{i}");
        let id = NodeId::new(&name)?;
        let started = Instant::now();
        let node = start(&url, &prefix, &name, &config).await?;
        observer
            .view()
            .wait_until(|n| n.iter().any(|n| n.node_id == id))
            .await;
        joins.push(started.elapsed());
        let leaving = Instant::now();
        node.leave().await?;
        observer
            .view()
            .wait_until(|n| n.iter().all(|n| n.node_id != id))
            .await;
        leaves.push(leaving.elapsed());
    }

    let mut crashes = Vec::new();
    for i in 0..CRASH_TRIALS {
        let name = format!("crasher-{i}");
        let id = NodeId::new(&name)?;
        let node = start(&url, &prefix, &name, &config).await?;
        observer
            .view()
            .wait_until(|n| n.iter().any(|n| n.node_id == id))
            .await;
        node.registrar().refresh().await?;
        let crashed = Instant::now();
        drop(node);
        observer
            .view()
            .wait_until(|n| n.iter().all(|n| n.node_id != id))
            .await;
        crashes.push(crashed.elapsed());
    }
    observer.leave().await?;

    println!(
        "discovery timings against {url} (heartbeat {:?}, lease {:?})",
        config.heartbeat, config.lease
    );
    println!("{:<40} {:>13} {:>13}", "event seen by a peer", "p50", "max");
    println!(
        "{:<40} {}",
        format!("join ({JOIN_LEAVE_TRIALS} trials)"),
        summary(&mut joins)
    );
    println!(
        "{:<40} {}",
        format!("graceful leave ({JOIN_LEAVE_TRIALS} trials)"),
        summary(&mut leaves)
    );
    println!(
        "{:<40} {}",
        format!("crash, from the last heartbeat ({CRASH_TRIALS})"),
        summary(&mut crashes)
    );
    Ok(())
}
