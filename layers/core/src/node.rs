//! Node identity and the information a node publishes about itself.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest node id accepted, in bytes.
pub const MAX_NODE_ID_LEN: usize = 64;

/// The name of a node, unique within a cluster.
///
/// 1 to 64 characters from `A-Z a-z 0-9 _ - .`, so that it can appear unescaped in Redis keys,
/// AMQP queue names and routing keys, and inside a [`ConnectionId`](crate::ConnectionId)
/// (which uses `:` as its separator). Cloning is cheap.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(Arc<str>);

/// The error returned for a string that is not a valid [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node id {id:?}: {reason}")]
pub struct InvalidNodeId {
    id: String,
    reason: &'static str,
}

impl NodeId {
    /// Checks `id` and makes a node id of it.
    pub fn new(id: impl AsRef<str>) -> Result<Self, InvalidNodeId> {
        let id = id.as_ref();
        let invalid = |reason| InvalidNodeId {
            id: id.chars().take(MAX_NODE_ID_LEN + 8).collect(),
            reason,
        };
        if id.is_empty() {
            return Err(invalid("it is empty"));
        }
        if id.len() > MAX_NODE_ID_LEN {
            return Err(invalid("it is longer than 64 bytes"));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(invalid("only A-Z, a-z, 0-9, '_', '-' and '.' are allowed"));
        }
        Ok(Self(Arc::from(id)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl FromStr for NodeId {
    type Err = InvalidNodeId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::new(&*s).map_err(serde::de::Error::custom)
    }
}

/// One run of a node: a random number drawn when the node process starts.
///
/// A node that restarts under the same [`NodeId`] gets a new incarnation, so connection ids
/// handed out by its previous run can be told apart from live ones. Written as 16 lowercase
/// hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Incarnation(u64);

impl Incarnation {
    /// A fresh random incarnation.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// An incarnation with a chosen value (tests and tools).
    pub const fn from_u64(value: u64) -> Self {
        Self(value)
    }

    /// The incarnation's value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Incarnation({self})")
    }
}

/// The error returned for a string that is not an [`Incarnation`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid incarnation: expected 1 to 16 hex digits")]
pub struct InvalidIncarnation;

impl FromStr for Incarnation {
    type Err = InvalidIncarnation;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InvalidIncarnation);
        }
        u64::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| InvalidIncarnation)
    }
}

impl Serialize for Incarnation {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Incarnation {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether a node takes part in the cluster, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Serving: accepts new connections and messages.
    Active,
    /// Leaving soon: still delivers messages to the connections it has, but balancers stop
    /// choosing it for new ones.
    Draining,
    /// Gone, or going: peers remove it from their view.
    Offline,
}

impl NodeStatus {
    /// The status's name as written in node records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Offline => "offline",
        }
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a node publishes about itself: where to reach it, how loaded it is, and its status.
///
/// # The JSON form of a node record
///
/// This is what a node writes to the registry (in Redis, the value of its node key) and what
/// every peer reads. The form is stable: fields are only ever added, readers ignore fields they
/// do not know, and `metadata` may be left out.
///
/// ```json
/// {
///   "node_id": "node-1",
///   "incarnation": "5f0c6a3e9b1d2c47",
///   "address": "10.0.0.5",
///   "port": 5001,
///   "endpoint": "/ws",
///   "connection_count": 120,
///   "max_connections": 10000,
///   "cpu_usage_percent": 12.5,
///   "memory_usage_bytes": 268435456,
///   "memory_usage_percent": 1.6,
///   "last_heartbeat": "2026-11-30T07:44:04.123Z",
///   "registered_at": "2026-11-30T07:40:00.000Z",
///   "status": "active",
///   "metadata": { "zone": "eu-west-1a" }
/// }
/// ```
///
/// | field | meaning |
/// |---|---|
/// | `node_id` | the node's [`NodeId`] |
/// | `incarnation` | this run of the node ([`Incarnation`]), 16 hex digits |
/// | `address`, `port`, `endpoint` | where clients reach the node's WebSocket endpoint |
/// | `connection_count` | live WebSocket connections on the node |
/// | `max_connections` | connections the node admits at most; `0` admits none |
/// | `cpu_usage_percent` | CPU used by the node's process, as a percentage of the whole machine (all cores together), `0..=100`, over the last heartbeat interval |
/// | `memory_usage_bytes` | resident memory of the node's process |
/// | `memory_usage_percent` | the same as a percentage of the machine's memory, `0..=100` |
/// | `last_heartbeat` | when the node last wrote its record (RFC 3339, UTC, by the node's clock: informational only, liveness is a lease kept by the registry) |
/// | `registered_at` | when this incarnation first registered (RFC 3339, UTC) |
/// | `status` | `"active"`, `"draining"` or `"offline"` ([`NodeStatus`]) |
/// | `metadata` | free string pairs for the user's own use |
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's id.
    pub node_id: NodeId,
    /// This run of the node.
    pub incarnation: Incarnation,
    /// Host name or IP address clients use to reach the node.
    pub address: String,
    /// Port of the node's WebSocket endpoint.
    pub port: u16,
    /// Path of the WebSocket endpoint, starting with `/`.
    pub endpoint: String,
    /// Live WebSocket connections.
    pub connection_count: u32,
    /// Connections admitted at most.
    pub max_connections: u32,
    /// CPU used by the node's process as a percentage of the whole machine, `0..=100`.
    pub cpu_usage_percent: f32,
    /// Resident memory of the node's process, in bytes.
    pub memory_usage_bytes: u64,
    /// Resident memory as a percentage of the machine's memory, `0..=100`.
    pub memory_usage_percent: f32,
    /// When the node last wrote its record, by its own clock.
    #[serde(with = "rfc3339")]
    pub last_heartbeat: SystemTime,
    /// When this incarnation first registered, by its own clock.
    #[serde(with = "rfc3339")]
    pub registered_at: SystemTime,
    /// The node's status.
    pub status: NodeStatus,
    /// The user's own key/value pairs.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// Connections a node admits when nothing else is configured (the seed's default).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;

/// The WebSocket endpoint path used when nothing else is configured.
pub const DEFAULT_ENDPOINT: &str = "/ws";

impl NodeInfo {
    /// Info for a freshly started, idle, Active node, registered now, with the default endpoint
    /// (`/ws`) and connection limit (10,000).
    pub fn new(
        node_id: NodeId,
        incarnation: Incarnation,
        address: impl Into<String>,
        port: u16,
    ) -> Self {
        let now = now_millis();
        Self {
            node_id,
            incarnation,
            address: address.into(),
            port,
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            connection_count: 0,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            cpu_usage_percent: 0.0,
            memory_usage_bytes: 0,
            memory_usage_percent: 0.0,
            last_heartbeat: now,
            registered_at: now,
            status: NodeStatus::Active,
            metadata: BTreeMap::new(),
        }
    }

    /// Whether the node has room for one more connection.
    pub fn has_capacity(&self) -> bool {
        self.connection_count < self.max_connections
    }

    /// Whether a balancer may place a new connection on this node: it is Active and not full.
    pub fn is_available(&self) -> bool {
        self.status == NodeStatus::Active && self.has_capacity()
    }

    /// Live connections relative to capacity: `0.0` when idle, `1.0` when full (or more when
    /// over-admitted), infinite when the node admits no connections at all.
    pub fn load(&self) -> f64 {
        if self.max_connections == 0 {
            return f64::INFINITY;
        }
        f64::from(self.connection_count) / f64::from(self.max_connections)
    }

    /// The URL clients use to reach this node's WebSocket endpoint, e.g. `ws://10.0.0.5:5001/ws`.
    pub fn ws_url(&self) -> String {
        if self.address.contains(':') && !self.address.starts_with('[') {
            format!("ws://[{}]:{}{}", self.address, self.port, self.endpoint)
        } else {
            format!("ws://{}:{}{}", self.address, self.port, self.endpoint)
        }
    }

    /// Checks the values that JSON alone cannot: percentages in range, a usable address, port
    /// and endpoint.
    pub fn validate(&self) -> Result<(), NodeRecordError> {
        let invalid = |field, reason: &str| {
            Err(NodeRecordError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.address.trim().is_empty() {
            return invalid("address", "it is empty");
        }
        if self.port == 0 {
            return invalid("port", "it is 0");
        }
        if !self.endpoint.starts_with('/') {
            return invalid("endpoint", "it does not start with '/'");
        }
        for (field, value) in [
            ("cpu_usage_percent", self.cpu_usage_percent),
            ("memory_usage_percent", self.memory_usage_percent),
        ] {
            if !(0.0..=100.0).contains(&value) {
                return invalid(field, "it is not a number from 0 to 100");
            }
        }
        Ok(())
    }

    /// Writes the record's JSON form (see the type's docs), after checking it.
    pub fn to_json(&self) -> Result<Vec<u8>, NodeRecordError> {
        self.validate()?;
        serde_json::to_vec(self).map_err(|source| NodeRecordError::Syntax { source })
    }

    /// Reads and checks a record in its JSON form.
    pub fn from_json(bytes: &[u8]) -> Result<Self, NodeRecordError> {
        let info: Self =
            serde_json::from_slice(bytes).map_err(|source| NodeRecordError::Syntax { source })?;
        info.validate()?;
        Ok(info)
    }
}

/// Why a node record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NodeRecordError {
    /// The record is not JSON of the documented form.
    #[error("node record is not valid JSON of the node record form")]
    Syntax {
        /// What the JSON parser found.
        #[source]
        source: serde_json::Error,
    },
    /// A field holds a value out of its range.
    #[error("node record field `{field}` is invalid: {reason}")]
    Invalid {
        /// The field's name in the JSON form.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The wall-clock time now, cut to the millisecond precision records and envelopes carry, so
/// that a value read back equals the value written.
pub fn now_millis() -> SystemTime {
    let since_epoch = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let millis = since_epoch.as_millis().min(u128::from(u64::MAX)) as u64;
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis)
}

/// RFC 3339 timestamps with millisecond precision, in UTC.
mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        time: &SystemTime,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_millis(*time))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<SystemTime, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        humantime::parse_rfc3339_weak(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn sample() -> NodeInfo {
        let mut info = NodeInfo::new(
            NodeId::new("node-1").unwrap(),
            Incarnation::from_u64(0x5f0c_6a3e_9b1d_2c47),
            "10.0.0.5",
            5001,
        );
        info.connection_count = 120;
        info.cpu_usage_percent = 12.5;
        info.memory_usage_bytes = 268_435_456;
        info.memory_usage_percent = 1.5;
        info.last_heartbeat = UNIX_EPOCH + Duration::from_millis(1_796_024_644_123);
        info.registered_at = UNIX_EPOCH + Duration::from_millis(1_796_024_400_000);
        info.metadata.insert("zone".into(), "eu-west-1a".into());
        info
    }

    #[test]
    fn node_ids_are_checked() {
        assert!(NodeId::new("node-1.eu_west").is_ok());
        assert!(NodeId::new("").is_err());
        assert!(NodeId::new("a:b").is_err());
        assert!(NodeId::new("a b").is_err());
        assert!(NodeId::new("x".repeat(65)).is_err());
        assert!(NodeId::new("x".repeat(64)).is_ok());
        let err = NodeId::new("no/slash").unwrap_err().to_string();
        assert!(err.contains("no/slash") && err.contains("allowed"), "{err}");
    }

    #[test]
    fn json_form_is_the_documented_one() {
        let json: serde_json::Value = serde_json::from_slice(&sample().to_json().unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "node_id": "node-1",
                "incarnation": "5f0c6a3e9b1d2c47",
                "address": "10.0.0.5",
                "port": 5001,
                "endpoint": "/ws",
                "connection_count": 120,
                "max_connections": 10000,
                "cpu_usage_percent": 12.5,
                "memory_usage_bytes": 268435456u64,
                "memory_usage_percent": 1.5,
                "last_heartbeat": "2026-11-30T07:44:04.123Z",
                "registered_at": "2026-11-30T07:40:00.000Z",
                "status": "active",
                "metadata": { "zone": "eu-west-1a" }
            })
        );
    }

    #[test]
    fn json_round_trips_and_tolerates_new_fields() {
        let info = sample();
        assert_eq!(NodeInfo::from_json(&info.to_json().unwrap()).unwrap(), info);

        let mut value: serde_json::Value =
            serde_json::from_slice(&info.to_json().unwrap()).unwrap();
        value["a_field_from_the_future"] = serde_json::json!([1, 2]);
        value.as_object_mut().unwrap().remove("metadata");
        let read = NodeInfo::from_json(&serde_json::to_vec(&value).unwrap()).unwrap();
        assert!(read.metadata.is_empty());
        assert_eq!(read.connection_count, 120);
    }

    #[test]
    fn malformed_records_are_refused_with_the_field_named() {
        let good: serde_json::Value = serde_json::from_slice(&sample().to_json().unwrap()).unwrap();
        let with = |field: &str, value: serde_json::Value| {
            let mut v = good.clone();
            v[field] = value;
            NodeInfo::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err()
        };
        assert!(matches!(
            with("cpu_usage_percent", serde_json::json!(140.0)),
            NodeRecordError::Invalid {
                field: "cpu_usage_percent",
                ..
            }
        ));
        assert!(matches!(
            with("endpoint", serde_json::json!("ws")),
            NodeRecordError::Invalid {
                field: "endpoint",
                ..
            }
        ));
        assert!(matches!(
            with("status", serde_json::json!("sleeping")),
            NodeRecordError::Syntax { .. }
        ));
        assert!(matches!(
            with("node_id", serde_json::json!("bad id")),
            NodeRecordError::Syntax { .. }
        ));
        assert!(matches!(
            with("port", serde_json::json!(70000)),
            NodeRecordError::Syntax { .. }
        ));
        assert!(NodeInfo::from_json(b"{\"node_id\":").is_err());
        assert!(NodeInfo::from_json(b"\xff\xfe").is_err());
    }

    #[test]
    fn writing_a_record_with_nan_is_refused() {
        let mut info = sample();
        info.cpu_usage_percent = f32::NAN;
        assert!(matches!(
            info.to_json(),
            Err(NodeRecordError::Invalid {
                field: "cpu_usage_percent",
                ..
            })
        ));
    }

    #[test]
    fn availability_and_load() {
        let mut info = sample();
        assert!(info.is_available());
        assert!((info.load() - 0.012).abs() < 1e-9);
        info.status = NodeStatus::Draining;
        assert!(!info.is_available());
        info.status = NodeStatus::Active;
        info.connection_count = info.max_connections;
        assert!(!info.is_available());
        info.max_connections = 0;
        assert!(info.load().is_infinite());
    }

    #[test]
    fn ws_url_brackets_ipv6() {
        let mut info = sample();
        assert_eq!(info.ws_url(), "ws://10.0.0.5:5001/ws");
        info.address = "::1".into();
        assert_eq!(info.ws_url(), "ws://[::1]:5001/ws");
    }
}
