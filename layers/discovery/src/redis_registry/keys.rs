//! The names a cluster uses in Redis, and the form of its change events.

use std::time::Duration;

use bytes::Bytes;
use hybrid_cluster_core::{ClusterPrefix, NodeId, NodeRecord, RegistryEvent, RemovalCause};

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

    /// The pub/sub channel of node changes, e.g. `{websocket:cluster}:events`: a plain channel
    /// (`PUBLISH`) on a single Redis, a sharded one (`SPUBLISH`, in the keys' slot) on a Redis
    /// Cluster.
    pub fn events_channel(&self) -> &str {
        &self.events
    }

    /// What every node key starts with: the key of `node` is this followed by its id.
    pub(super) fn node_prefix(&self) -> &str {
        &self.node_prefix
    }

    /// The key of the route `name`, e.g. `{websocket:cluster}:routes:user:42`.
    pub fn route_key(&self, name: &str) -> String {
        format!("{}{name}", self.route_prefix)
    }
}

/// Lists every live record in one round trip, and drops from the index the ids whose record
/// expired. Returns `id, record, pttl` triples, flattened.
pub(super) const LIST_SCRIPT: &str = r#"
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

/// Reads one message of the events channel: `updated {node} {lease_ms}\n{record}` or
/// `left {node}`.
pub(super) fn parse_event(keys: &KeyLayout, payload: &[u8]) -> Result<RegistryEvent, &'static str> {
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
