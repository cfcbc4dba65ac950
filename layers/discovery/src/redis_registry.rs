//! The [`Registry`] kept in Redis.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use futures_core::future::BoxFuture;
use futures_util::StreamExt;
use hybrid_cluster_core::registry::{RegistryEvents, check_route_name};
use hybrid_cluster_core::{
    ClusterPrefix, ConnectionId, NodeId, NodeRecord, RedisUrl, Registry, RegistryError,
    RegistryEvent, RemovalCause,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, IntoConnectionInfo, RedisError};

/// How a [`RedisRegistry`] talks to Redis.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// How long a command may wait for its reply before it fails (redis-rs's own default is
    /// 500 ms; discovery tolerates a slow Redis better than that). Default 2 s.
    pub response_timeout: Duration,
    /// How long connecting may take before it fails. Default 2 s.
    pub connection_timeout: Duration,
    /// The library name the connections report (`CLIENT SETINFO LIB-NAME`), shown as `lib-name`
    /// by `CLIENT LIST`, so a cluster's connections can be told apart. Default `hybrid-cluster`.
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

/// The names a cluster uses in Redis. Every key carries the hash tag `{prefix}`, so all of one
/// cluster's keys live in one slot of a Redis Cluster and listing them is complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyLayout {
    node_prefix: String,
    index: String,
    events: String,
    route_prefix: String,
}

impl KeyLayout {
    /// The layout of the cluster with this prefix.
    pub fn new(prefix: &ClusterPrefix) -> Self {
        let tag = format!("{{{prefix}}}");
        Self {
            node_prefix: format!("{tag}:nodes:"),
            index: format!("{tag}:nodes"),
            events: format!("{tag}:events"),
            route_prefix: format!("{tag}:routes:"),
        }
    }

    /// The key holding `node`'s record, e.g. `{websocket:cluster}:nodes:node-1`.
    pub fn node_key(&self, node: &NodeId) -> String {
        format!("{}{node}", self.node_prefix)
    }

    /// The set of registered node ids, e.g. `{websocket:cluster}:nodes`; it expires one lease
    /// after the last write to it.
    pub fn index_key(&self) -> &str {
        &self.index
    }

    /// The pub/sub channel of node changes, e.g. `{websocket:cluster}:events`.
    pub fn events_channel(&self) -> &str {
        &self.events
    }

    /// The key of the route `name`, e.g. `{websocket:cluster}:routes:user:42`.
    pub fn route_key(&self, name: &str) -> String {
        format!("{}{name}", self.route_prefix)
    }
}

/// Lists every live record in one round trip, and drops from the index the ids whose record
/// expired. Returns `id, record, pttl` triples, flattened.
const LIST_SCRIPT: &str = r#"
local ids = redis.call('SMEMBERS', KEYS[1])
local out = {}
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  local value = redis.call('GET', key)
  if value then
    table.insert(out, id)
    table.insert(out, value)
    table.insert(out, redis.call('PTTL', key))
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
"#;

/// A [`Registry`] in Redis (a single server; the key layout also suits Redis Cluster).
///
/// See the crate docs for the key layout. Commands go through redis-rs's
/// [`ConnectionManager`], which reconnects by itself after a connection is lost (the command
/// that met the loss fails with [`RegistryError::Unavailable`]); each watcher holds a pub/sub
/// connection of its own, and its stream ends when that connection is lost.
#[derive(Clone)]
pub struct RedisRegistry {
    client: Client,
    connection: ConnectionManager,
    keys: KeyLayout,
    url: RedisUrl,
    options: RedisOptions,
}

impl fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("url", &self.url)
            .field("keys", &self.keys)
            .finish()
    }
}

fn classify(error: RedisError) -> RegistryError {
    if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
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

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// `PTTL`'s answer as a remaining lease: `None` for a key without expiry or without key.
fn remaining(pttl: i64) -> Option<Duration> {
    u64::try_from(pttl).ok().map(Duration::from_millis)
}

impl RedisRegistry {
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
        let connection = tokio::time::timeout(
            options.connection_timeout * 3,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|elapsed| RegistryError::Unavailable {
            source: Box::new(elapsed),
        })?
        .map_err(classify)?;
        Ok(Self {
            client,
            connection,
            keys: KeyLayout::new(prefix),
            url: url.clone(),
            options,
        })
    }

    /// The names this registry uses in Redis.
    pub fn keys(&self) -> &KeyLayout {
        &self.keys
    }

    /// A clone of the command connection, for tools and tests that inspect Redis directly.
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }
}

/// Reads one message of the events channel: `updated {node} {lease_ms}\n{record}` or
/// `left {node}`.
fn parse_event(keys: &KeyLayout, payload: &[u8]) -> Result<RegistryEvent, &'static str> {
    let (head, record) = match payload.iter().position(|&b| b == b'\n') {
        Some(newline) => (&payload[..newline], Some(&payload[newline + 1..])),
        None => (payload, None),
    };
    let head = std::str::from_utf8(head).map_err(|_| "the event header is not UTF-8")?;
    let words: Vec<&str> = head.split(' ').collect();
    let parse_node = |node: &str| NodeId::new(node).map_err(|_| "the event's node id is invalid");
    match (words.as_slice(), record) {
        (["updated", node, lease_ms], Some(record)) => {
            let node = parse_node(node)?;
            let lease = lease_ms
                .parse()
                .map(Duration::from_millis)
                .map_err(|_| "the update's lease is not a number of milliseconds")?;
            Ok(RegistryEvent::Updated(NodeRecord {
                key: keys.node_key(&node),
                node,
                value: Bytes::copy_from_slice(record),
                expires_in: Some(lease),
            }))
        }
        (["left", node], None) => Ok(RegistryEvent::Removed {
            node: parse_node(node)?,
            cause: RemovalCause::Left,
        }),
        _ => Err("not an `updated` or `left` event of the documented form"),
    }
}

impl Registry for RedisRegistry {
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
            .cmd("PUBLISH")
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
            .cmd("PUBLISH")
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
                .arg(&keys.node_prefix)
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
        let client = self.client.clone();
        let keys = self.keys.clone();
        let limit = self.options.connection_timeout + self.options.response_timeout;
        Box::pin(async move {
            let subscribe = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(keys.events_channel()).await?;
                Ok::<_, RedisError>(pubsub)
            };
            let pubsub = tokio::time::timeout(limit, subscribe)
                .await
                .map_err(|elapsed| RegistryError::Unavailable {
                    source: Box::new(elapsed),
                })?
                .map_err(classify)?;
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
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let keys = KeyLayout::new(&ClusterPrefix::default());
        let node = NodeId::new("node-1").unwrap();
        assert_eq!(keys.node_key(&node), "{websocket:cluster}:nodes:node-1");
        assert_eq!(keys.index_key(), "{websocket:cluster}:nodes");
        assert_eq!(keys.events_channel(), "{websocket:cluster}:events");
        assert_eq!(
            keys.route_key("user:42"),
            "{websocket:cluster}:routes:user:42"
        );
    }

    #[test]
    fn events_are_parsed_defensively() {
        let keys = KeyLayout::new(&ClusterPrefix::default());
        let RegistryEvent::Updated(record) =
            parse_event(&keys, b"updated n1 15000\n{\"x\":1}").unwrap()
        else {
            panic!("expected an update");
        };
        assert_eq!(record.node.as_str(), "n1");
        assert_eq!(&record.value[..], b"{\"x\":1}");
        assert_eq!(record.expires_in, Some(Duration::from_secs(15)));
        assert_eq!(
            parse_event(&keys, b"left n1").unwrap(),
            RegistryEvent::Removed {
                node: NodeId::new("n1").unwrap(),
                cause: RemovalCause::Left
            }
        );
        for bad in [
            &b""[..],
            b"left",
            b"left bad id",
            b"updated n1\n{}",
            b"updated n1 soon\n{}",
            b"joined n1",
            b"\xff\xfe n1",
            b"left n1\nextra",
        ] {
            assert!(
                parse_event(&keys, bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Any payload on the events channel reads to an event or an error.
            #[test]
            fn any_event_reads_to_an_event_or_an_error(
                payload in prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..128),
                    "(updated|left) [a-z0-9]{1,8}( [0-9]{1,25})?\n?.{0,40}".prop_map(String::into_bytes),
                ],
            ) {
                let keys = KeyLayout::new(&ClusterPrefix::default());
                let _ = parse_event(&keys, &payload);
            }
        }
    }
}
