//! The [`Registry`] kept in Redis: a single server, or a Redis Cluster.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use futures_core::future::BoxFuture;
use futures_util::StreamExt;
use hybrid_cluster_core::registry::{RegistryEvents, check_route_name};
use hybrid_cluster_core::{
    ClusterPrefix, ConnectionId, NodeId, NodeRecord, RedisUrl, Registry, RegistryError,
};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ErrorKind, IntoConnectionInfo, RedisError, ServerErrorKind};

mod cluster;
mod keys;
mod presence;
mod sessions;

pub use cluster::RedisClusterRegistry;
pub use keys::KeyLayout;
use keys::{LIST_SCRIPT, parse_event};
pub use presence::RedisPresenceStore;
pub use sessions::RedisSessionStore;

/// How a [`RedisRegistry`] talks to Redis.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// How long a command may wait for its reply before it fails (redis-rs's own default is
    /// 500 ms; discovery tolerates a slow Redis better than that). Default 2 s.
    pub response_timeout: Duration,
    /// How long connecting may take before it fails. Default 2 s.
    pub connection_timeout: Duration,
    /// The library name the connections report (`CLIENT SETINFO LIB-NAME`), shown as `lib-name`
    /// by `CLIENT LIST`, so a cluster's connections can be told apart (on a single Redis: the
    /// cluster client of redis-rs does not pass it on). Default `hybrid-cluster`.
    pub client_name: String,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            response_timeout: Duration::from_secs(2),
            connection_timeout: Duration::from_secs(2),
            client_name: "hybrid-cluster".to_owned(),
        }
    }
}

/// A [`Registry`] in Redis: a single server ([`connect`](RedisRegistry::connect)), or a Redis
/// Cluster ([`RedisClusterRegistry`], from
/// [`connect_cluster`](RedisRegistry::connect_cluster)).
///
/// See the crate docs for the key layout. On a single server, commands go through redis-rs's
/// [`ConnectionManager`], which reconnects by itself after a connection is lost (the command
/// that met the loss fails with [`RegistryError::Unavailable`]); each watcher holds a pub/sub
/// connection of its own, and its stream ends when that connection is lost. `C` is the
/// command connection: [`ConnectionManager`] for a single server, redis-rs's
/// [`ClusterConnection`](redis::cluster_async::ClusterConnection) for a Redis Cluster.
#[derive(Clone)]
pub struct RedisRegistry<C = ConnectionManager> {
    connection: C,
    subscriber: Subscriber,
    keys: KeyLayout,
    servers: Vec<RedisUrl>,
    options: RedisOptions,
}

/// Where change events are published and how a watcher subscribes to them.
#[derive(Clone)]
enum Subscriber {
    /// `PUBLISH`/`SUBSCRIBE`, on a pub/sub connection of each watcher's own.
    Single(Box<Client>),
    /// `SPUBLISH`/`SSUBSCRIBE` in the keys' slot, through a cluster client of each watcher's
    /// own: a plain channel would be copied to every node of the cluster.
    Sharded(cluster::Seeds),
}

impl Subscriber {
    fn publish_command(&self) -> &'static str {
        match self {
            Self::Single(_) => "PUBLISH",
            Self::Sharded(_) => "SPUBLISH",
        }
    }
}

impl<C> fmt::Debug for RedisRegistry<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let debug = &mut f.debug_struct("RedisRegistry");
        match &self.servers[..] {
            [url] if matches!(self.subscriber, Subscriber::Single(_)) => debug.field("url", url),
            seeds => debug.field("cluster_seeds", &seeds),
        };
        debug.field("keys", &self.keys).finish()
    }
}

fn classify(error: RedisError) -> RegistryError {
    // A Redis Cluster in the middle of a failover answers CLUSTERDOWN, TRYAGAIN or MASTERDOWN,
    // or has no connection to the slot's new master yet: all pass.
    let failing_over = error.is_cluster_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(ServerErrorKind::MasterDown) | ErrorKind::ClusterConnectionNotFound
        );
    if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || failing_over
    {
        RegistryError::Unavailable {
            source: Box::new(error),
        }
    } else {
        RegistryError::Backend {
            source: Box::new(error),
        }
    }
}

/// Runs a Redis step (connecting, subscribing) within `limit`: past it the registry is
/// unavailable, and a Redis error is classified as any other.
async fn within<T>(
    limit: Duration,
    step: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, RegistryError> {
    tokio::time::timeout(limit, step)
        .await
        .map_err(|elapsed| RegistryError::Unavailable {
            source: Box::new(elapsed),
        })?
        .map_err(classify)
}

/// Runs `script` on `connection` with `keys` and `args`, its errors classified.
fn invoke<C, T>(
    mut connection: C,
    script: &'static redis::Script,
    keys: impl IntoIterator<Item = String>,
    args: impl IntoIterator<Item = impl redis::ToRedisArgs>,
) -> BoxFuture<'static, Result<T, RegistryError>>
where
    C: ConnectionLike + Send + 'static,
    T: redis::FromRedisValue + Send + 'static,
{
    let mut invocation = script.prepare_invoke();
    for key in keys {
        invocation.key(key);
    }
    for arg in args {
        invocation.arg(arg);
    }
    Box::pin(async move {
        invocation
            .invoke_async::<T>(&mut connection)
            .await
            .map_err(classify)
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// `PTTL`'s answer as a remaining lease: `None` for a key without expiry or without key.
fn remaining(pttl: i64) -> Option<Duration> {
    u64::try_from(pttl).ok().map(Duration::from_millis)
}

impl RedisRegistry<ConnectionManager> {
    /// Connects to Redis at `url` for the cluster `prefix`.
    ///
    /// Fails with [`RegistryError::Unavailable`] when Redis cannot be reached within the
    /// connection timeout, and with [`RegistryError::Backend`] when it refuses the connection
    /// (a wrong password, a `rediss://` URL without TLS support built in).
    pub async fn connect(
        url: &RedisUrl,
        prefix: &ClusterPrefix,
        options: RedisOptions,
    ) -> Result<Self, RegistryError> {
        let info = url
            .to_connection_string()
            .into_connection_info()
            .map_err(classify)?;
        let settings = info
            .redis_settings()
            .clone()
            .set_lib_name(&options.client_name, env!("CARGO_PKG_VERSION"));
        let info = info.set_redis_settings(settings);
        let client = Client::open(info).map_err(classify)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(options.response_timeout))
            .set_connection_timeout(Some(options.connection_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let connection = within(
            options.connection_timeout * 3,
            client.get_connection_manager_with_config(config),
        )
        .await?;
        Ok(Self {
            connection,
            subscriber: Subscriber::Single(Box::new(client)),
            keys: KeyLayout::new(prefix),
            servers: vec![url.clone()],
            options,
        })
    }
}

impl<C: Clone> RedisRegistry<C> {
    /// The names this registry uses in Redis.
    pub fn keys(&self) -> &KeyLayout {
        &self.keys
    }

    /// A clone of the command connection, for tools and tests that inspect Redis directly.
    pub fn connection(&self) -> C {
        self.connection.clone()
    }
}

impl<C> Registry for RedisRegistry<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn put_node(
        &self,
        node: &NodeId,
        record: Bytes,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        let mut connection = self.connection.clone();
        let lease_ms = millis(lease);
        let mut event = format!("updated {node} {lease_ms}\n").into_bytes();
        event.extend_from_slice(&record);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.keys.node_key(node))
            .arg(&record[..])
            .arg("PX")
            .arg(lease_ms)
            .ignore()
            .cmd("SADD")
            .arg(self.keys.index_key())
            .arg(node.as_str())
            .ignore()
            // The index outlives its last record by one lease at most: when every node is
            // gone without a word, nothing of the cluster stays in Redis. (NX sets the first
            // expiry, GT only ever extends it, so one node's shorter lease never cuts
            // another's.)
            .cmd("PEXPIRE")
            .arg(self.keys.index_key())
            .arg(lease_ms)
            .arg("NX")
            .ignore()
            .cmd("PEXPIRE")
            .arg(self.keys.index_key())
            .arg(lease_ms)
            .arg("GT")
            .ignore()
            .cmd(self.subscriber.publish_command())
            .arg(self.keys.events_channel())
            .arg(event)
            .ignore();
        Box::pin(async move {
            pipe.query_async::<()>(&mut connection)
                .await
                .map_err(classify)
        })
    }

    fn remove_node(&self, node: &NodeId) -> BoxFuture<'static, Result<(), RegistryError>> {
        let mut connection = self.connection.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("DEL")
            .arg(self.keys.node_key(node))
            .ignore()
            .cmd("SREM")
            .arg(self.keys.index_key())
            .arg(node.as_str())
            .ignore()
            .cmd(self.subscriber.publish_command())
            .arg(self.keys.events_channel())
            .arg(format!("left {node}"))
            .ignore();
        Box::pin(async move {
            pipe.query_async::<()>(&mut connection)
                .await
                .map_err(classify)
        })
    }

    fn node(&self, node: &NodeId) -> BoxFuture<'static, Result<Option<NodeRecord>, RegistryError>> {
        let mut connection = self.connection.clone();
        let key = self.keys.node_key(node);
        let node = node.clone();
        Box::pin(async move {
            let (value, pttl): (Option<Vec<u8>>, i64) = redis::pipe()
                .cmd("GET")
                .arg(&key)
                .cmd("PTTL")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .map_err(classify)?;
            Ok(value.map(|value| NodeRecord {
                node,
                key,
                value: value.into(),
                expires_in: remaining(pttl),
            }))
        })
    }

    /// Every record read carries its key's remaining TTL: one with none has no lease.
    fn reports_leases(&self) -> bool {
        true
    }

    fn nodes(&self) -> BoxFuture<'static, Result<Vec<NodeRecord>, RegistryError>> {
        let mut connection = self.connection.clone();
        let keys = self.keys.clone();
        Box::pin(async move {
            let flat: Vec<redis::Value> = redis::cmd("EVAL")
                .arg(LIST_SCRIPT)
                .arg(1)
                .arg(keys.index_key())
                .arg(keys.node_prefix())
                .query_async(&mut connection)
                .await
                .map_err(classify)?;
            let mut records = Vec::with_capacity(flat.len() / 3);
            for triple in flat.chunks(3) {
                let [id, value, pttl] = triple else {
                    return Err(RegistryError::Malformed {
                        key: keys.index_key().to_owned(),
                        reason: "the listing script returned an incomplete entry".to_owned(),
                    });
                };
                let (redis::Value::BulkString(id), redis::Value::BulkString(value)) = (id, value)
                else {
                    return Err(RegistryError::Malformed {
                        key: keys.index_key().to_owned(),
                        reason: "the listing script returned a non-string entry".to_owned(),
                    });
                };
                let pttl = match pttl {
                    redis::Value::Int(pttl) => *pttl,
                    _ => -1,
                };
                let id = String::from_utf8_lossy(id);
                let Ok(node) = NodeId::new(&*id) else {
                    tracing::warn!(
                        key = %keys.index_key(),
                        member = %id,
                        "skipping an invalid node id in the node index"
                    );
                    continue;
                };
                records.push(NodeRecord {
                    key: keys.node_key(&node),
                    node,
                    value: Bytes::copy_from_slice(value),
                    expires_in: remaining(pttl),
                });
            }
            Ok(records)
        })
    }

    fn watch(&self) -> BoxFuture<'static, Result<RegistryEvents, RegistryError>> {
        let keys = self.keys.clone();
        let limit = self.options.connection_timeout + self.options.response_timeout;
        match &self.subscriber {
            Subscriber::Single(client) => {
                Box::pin(watch_single(Client::clone(client), keys, limit))
            }
            Subscriber::Sharded(seeds) => Box::pin(cluster::watch_sharded(
                seeds.clone(),
                keys,
                self.options.clone(),
            )),
        }
    }

    fn put_route(
        &self,
        name: &str,
        connection_id: &ConnectionId,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        if let Err(e) = check_route_name(name) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let mut connection = self.connection.clone();
        let key = self.keys.route_key(name);
        let value = connection_id.to_string();
        let lease_ms = millis(lease);
        Box::pin(async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(lease_ms)
                .query_async::<()>(&mut connection)
                .await
                .map_err(classify)
        })
    }

    fn route(&self, name: &str) -> BoxFuture<'static, Result<Option<ConnectionId>, RegistryError>> {
        if let Err(e) = check_route_name(name) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let mut connection = self.connection.clone();
        let key = self.keys.route_key(name);
        Box::pin(async move {
            let value: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .map_err(classify)?;
            value
                .map(|value| {
                    value.parse().map_err(|e| RegistryError::Malformed {
                        key: key.clone(),
                        reason: format!("{e}"),
                    })
                })
                .transpose()
        })
    }

    fn remove_route(&self, name: &str) -> BoxFuture<'static, Result<(), RegistryError>> {
        if let Err(e) = check_route_name(name) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let mut connection = self.connection.clone();
        let key = self.keys.route_key(name);
        Box::pin(async move {
            redis::cmd("DEL")
                .arg(key)
                .query_async::<()>(&mut connection)
                .await
                .map_err(classify)
        })
    }
}

/// Subscribes to the events channel of a single Redis, on a pub/sub connection of its own.
async fn watch_single(
    client: Client,
    keys: KeyLayout,
    limit: Duration,
) -> Result<RegistryEvents, RegistryError> {
    let subscribe = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(keys.events_channel()).await?;
        Ok::<_, RedisError>(pubsub)
    };
    let pubsub = within(limit, subscribe).await?;
    let (sink, stream) = pubsub.split();
    let events = stream.filter_map(move |message| {
        // The sink keeps the subscription's connection open as long as the stream.
        let _subscription = &sink;
        let event = match parse_event(&keys, message.get_payload_bytes()) {
            Ok(event) => Some(Ok(event)),
            Err(reason) => {
                tracing::warn!(
                    channel = %keys.events_channel(),
                    reason,
                    "ignoring a malformed discovery event"
                );
                None
            }
        };
        std::future::ready(event)
    });
    Ok(Box::pin(events) as RegistryEvents)
}
