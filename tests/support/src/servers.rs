//! The real servers under test, and cleaning up after a test's cluster.

/// The Redis the suite runs against: `REDIS_URL`, by default the loopback one
/// `scripts/test.sh` starts.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The RabbitMQ the suite runs against: `AMQP_URL`, by default the loopback one
/// `scripts/test.sh` starts.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The loopback Redis Cluster's seeds (`scripts/redis-cluster.sh`: its three masters), or the
/// comma-separated ones in `REDIS_CLUSTER_URLS`.
pub fn redis_cluster_urls() -> Vec<String> {
    std::env::var("REDIS_CLUSTER_URLS")
        .unwrap_or_else(|_| {
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002".to_owned()
        })
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// A cluster prefix no other test or run uses: `{what}-{random}`.
pub fn unique_prefix(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{what}-{:08x}{:04x}", nanos, std::process::id() & 0xffff)
}

/// Deletes what a cluster under `prefix` may leave behind: the queues of `nodes`, the
/// dead-letter queue, the exchanges, and every Redis key of the prefix. Errors are reported,
/// not raised: cleanup runs after a test, often after a failure.
pub async fn remove_cluster(prefix: &str, nodes: &[String]) {
    if let Err(error) = remove_from_rabbitmq(prefix, nodes).await {
        eprintln!("cleanup of {prefix} in RabbitMQ failed: {error}");
    }
    if let Err(error) = remove_from_redis(prefix).await {
        eprintln!("cleanup of {prefix} in Redis failed: {error}");
    }
}

async fn remove_from_rabbitmq(prefix: &str, nodes: &[String]) -> Result<(), crate::BoxError> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let dead_letter = format!("{prefix}:dead-letter");
    let queues = nodes
        .iter()
        .map(|node| format!("{prefix}:node:{node}"))
        .chain([dead_letter.clone()]);
    for queue in queues {
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in [prefix.to_owned(), dead_letter] {
        channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await?;
    }
    connection.close(200, "OK".into()).await?;
    Ok(())
}

async fn remove_from_redis(prefix: &str) -> Result<(), crate::BoxError> {
    let client = redis::Client::open(redis_url())?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}}}*"))
        .query_async(&mut redis)
        .await?;
    if !keys.is_empty() {
        let () = redis::cmd("DEL").arg(keys).query_async(&mut redis).await?;
    }
    Ok(())
}
