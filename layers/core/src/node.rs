//! Node identity and the information a node publishes about itself.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::auth::{AuthError, ClusterSecret, MacInput, Signature};
use crate::ids::{Incarnation, NodeId};

/// The domain of node record MACs.
const RECORD_DOMAIN: &str = "hybrid-cluster node-record v1";

/// The field of a signed record that holds its MAC.
pub const SIGNATURE_FIELD: &str = "signature";

/// Whether a node takes part in the cluster, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Serving: accepts new connections and messages.
    Active,
    /// Leaving soon: still delivers messages to the connections it has, but balancers stop
    /// choosing it for new ones.
    Draining,
    /// Serving the connections it has, but not receiving from the broker now (its queue or
    /// consumer is being restored): balancers do not choose it for new ones until it is
    /// Active again.
    Degraded,
    /// Gone, or going: peers remove it from their view.
    Offline,
}

impl NodeStatus {
    /// The status's name as written in node records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Degraded => "degraded",
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
/// | `status` | `"active"`, `"draining"`, `"degraded"` or `"offline"` ([`NodeStatus`]); a reader that does not know a status skips the record |
/// | `metadata` | free string pairs for the user's own use |
/// | `lease_ms` | how long the record is live after `last_heartbeat`, in milliseconds (left out by older writers) |
/// | `public_url` | the `ws://` or `wss://` URL clients reach the node at, when not the one made of `address`, `port` and `endpoint` (left out then) |
/// | `signature` | only when the cluster has a [`ClusterSecret`]: the record's HMAC-SHA256, 64 lowercase hex digits (see below) |
///
/// # Signed records
///
/// With a cluster secret, a node writes its record with [`NodeInfo::to_signed_json`] and peers
/// read it with [`NodeInfo::from_signed_json`], which refuses records that are unsigned or
/// whose signature does not match. The `signature` field is the HMAC-SHA256, keyed with the
/// secret, over two length-prefixed fields (each its length in bytes as 8 bytes big-endian,
/// then the bytes): the domain `hybrid-cluster node-record v1`, then the record's JSON
/// without its `signature` field in canonical form: object keys sorted (by bytes) at every
/// level, no whitespace, strings and numbers as `serde_json` writes them. The canonical form
/// is computed from the JSON as read, so fields a reader does not know are covered too. The
/// record is written in that canonical form, with `signature` in its sorted place. Readers
/// without the secret ignore the field like any unknown one.
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
    /// How long the record is live after `last_heartbeat`, in milliseconds: it is a claim
    /// for that long, and no longer (signed with the record when the cluster has a secret, so
    /// a replayed record cannot outlive it). Written by every node of this version; a record
    /// without it (an older writer) is read as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// The URL clients reach the node's endpoint at, when it is not
    /// `ws://{address}:{port}{endpoint}` (TLS in front of it, a proxy, another port): a
    /// `ws://` or `wss://` URL, used in redirects and close reasons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// How the node keys group messages ([`GroupKeys`](crate::GroupKeys)): the number of
    /// buckets, or none for one key per group (what a record without it, from an older
    /// writer, means too). Every node of a cluster must agree; a peer that does not is told
    /// of in its logs and metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_buckets: Option<std::num::NonZeroU32>,
}

/// The longest `public_url` a record may carry, in bytes.
pub const MAX_PUBLIC_URL_LEN: usize = 1024;

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
            lease_ms: None,
            public_url: None,
            group_buckets: None,
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

    /// The load a load-based balancer (tower's p2c) compares: [`load`](Self::load) while the
    /// node may take new connections, infinite when it is Draining, Offline or full, so it is
    /// chosen only when no other node can be.
    pub fn balancing_load(&self) -> f64 {
        if self.is_available() {
            self.load()
        } else {
            f64::INFINITY
        }
    }

    /// The URL clients use to reach this node's WebSocket endpoint: its `public_url`, or
    /// `ws://{address}:{port}{endpoint}`, e.g. `ws://10.0.0.5:5001/ws`.
    pub fn ws_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| ws_url(&self.address, self.port, &self.endpoint))
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
        if let Some(url) = &self.public_url {
            check_public_url(url).or_else(|reason| invalid("public_url", reason))?;
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

    /// When the record's lease ends, by its writer's clock: `last_heartbeat + lease_ms`, when
    /// the record says.
    pub fn lease_ends_at(&self) -> Option<SystemTime> {
        self.last_heartbeat
            .checked_add(std::time::Duration::from_millis(self.lease_ms?))
    }

    /// Writes the record's JSON form (see the type's docs), after checking it.
    pub fn to_json(&self) -> Result<Vec<u8>, NodeRecordError> {
        self.validate()?;
        serde_json::to_vec(self).map_err(|source| NodeRecordError::Syntax { source })
    }

    /// Reads and checks a record in its JSON form. A `signature` field is ignored: this does
    /// not authenticate the record (see [`NodeInfo::from_signed_json`]).
    pub fn from_json(bytes: &[u8]) -> Result<Self, NodeRecordError> {
        let info: Self =
            serde_json::from_slice(bytes).map_err(|source| NodeRecordError::Syntax { source })?;
        info.validate()?;
        Ok(info)
    }

    /// Writes the record's JSON form, after checking it, signed with `secret`: the documented
    /// JSON plus a `signature` field (see the type's docs).
    pub fn to_signed_json(&self, secret: &ClusterSecret) -> Result<Vec<u8>, NodeRecordError> {
        let syntax = |source| NodeRecordError::Syntax { source };
        // Read back what `to_json` writes, so that the MAC covers numbers as a reader sees them.
        let mut value: serde_json::Value =
            serde_json::from_slice(&self.to_json()?).map_err(syntax)?;
        let signature = record_mac(secret, &value);
        if let Some(object) = value.as_object_mut() {
            object.insert(
                SIGNATURE_FIELD.to_owned(),
                serde_json::Value::String(signature.to_string()),
            );
        }
        let mut out = Vec::new();
        write_canonical(&value, &mut out).map_err(syntax)?;
        Ok(out)
    }

    /// Reads a signed record: checks its `signature` against `secret` (in constant time), then
    /// reads and checks the record as [`NodeInfo::from_json`] does.
    ///
    /// Fails with [`NodeRecordError::Unsigned`] when the record has no signature, and
    /// [`NodeRecordError::BadSignature`] when it does not match (forged, altered, or another
    /// cluster's secret).
    pub fn from_signed_json(bytes: &[u8], secret: &ClusterSecret) -> Result<Self, NodeRecordError> {
        let syntax = |source| NodeRecordError::Syntax { source };
        let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(syntax)?;
        let signature = match value
            .as_object_mut()
            .and_then(|object| object.remove(SIGNATURE_FIELD))
        {
            None => return Err(NodeRecordError::Unsigned),
            Some(serde_json::Value::String(hex)) => {
                Signature::from_hex(&hex).ok_or(NodeRecordError::BadSignature)?
            }
            Some(_) => return Err(NodeRecordError::BadSignature),
        };
        record_mac_input(secret, &value)
            .verify(&signature)
            .map_err(|_: AuthError| NodeRecordError::BadSignature)?;
        let info: Self = serde_json::from_value(value).map_err(syntax)?;
        info.validate()?;
        Ok(info)
    }
}

fn record_mac_input(secret: &ClusterSecret, value: &serde_json::Value) -> MacInput {
    let mut canonical = Vec::new();
    // Writing a `Value` to a `Vec` cannot fail; should it, the MAC cannot match.
    let _ = write_canonical(value, &mut canonical);
    let mut mac = secret.mac(RECORD_DOMAIN);
    mac.field(&canonical);
    mac
}

fn record_mac(secret: &ClusterSecret, value: &serde_json::Value) -> Signature {
    record_mac_input(secret, value).finish()
}

/// Writes `value` as JSON with object keys sorted at every level and no whitespace, whatever
/// order the map type keeps.
fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    use serde_json::Value;
    match value {
        Value::Object(object) => {
            let mut entries: Vec<_> = object.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                write_canonical(value, out)?;
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar)?,
    }
    Ok(())
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
    /// The record carries no signature, and the cluster has a secret.
    #[error("node record is not signed")]
    Unsigned,
    /// The record's signature does not match: forged, altered, or another cluster's secret.
    #[error("node record signature does not match (forged, altered, or another cluster's secret)")]
    BadSignature,
}

/// Checks a node's public URL: `ws://` or `wss://`, a host, at most
/// [`MAX_PUBLIC_URL_LEN`] bytes, nothing that could break a header or a log line.
pub fn check_public_url(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("wss://")
        .or_else(|| url.strip_prefix("ws://"))
        .ok_or("it does not start with ws:// or wss://")?;
    if url.len() > MAX_PUBLIC_URL_LEN {
        return Err("it is longer than 1024 bytes");
    }
    if rest.is_empty() || rest.starts_with('/') {
        return Err("it names no host");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("it holds spaces or control characters");
    }
    Ok(())
}

/// The WebSocket URL of an endpoint, e.g. `ws://10.0.0.5:5001/ws`; an IPv6 address is put in
/// brackets.
pub fn ws_url(address: &str, port: u16, endpoint: &str) -> String {
    if address.contains(':') && !address.starts_with('[') {
        format!("ws://[{address}]:{port}{endpoint}")
    } else {
        format!("ws://{address}:{port}{endpoint}")
    }
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

    fn secret() -> ClusterSecret {
        ClusterSecret::new("the cluster secret of these tests").unwrap()
    }

    #[test]
    fn signed_records_round_trip_and_plain_readers_still_read_them() {
        let info = sample();
        let signed = info.to_signed_json(&secret()).unwrap();
        assert_eq!(
            NodeInfo::from_signed_json(&signed, &secret()).unwrap(),
            info
        );
        // Readers without the secret ignore the field.
        assert_eq!(NodeInfo::from_json(&signed).unwrap(), info);
        let value: serde_json::Value = serde_json::from_slice(&signed).unwrap();
        let hex = value[SIGNATURE_FIELD].as_str().unwrap();
        assert_eq!(hex.len(), 64);
        // Canonical: keys sorted, no whitespace.
        let text = String::from_utf8(signed.clone()).unwrap();
        assert!(
            text.starts_with("{\"address\":\"10.0.0.5\",\"connection_count\":120,"),
            "{text}"
        );
        assert!(!text.contains(' '), "{text}");
        // Key order and whitespace are not part of what is signed: a reader that re-orders the
        // record still verifies it.
        let reordered = serde_json::to_vec_pretty(&value).unwrap();
        assert_eq!(
            NodeInfo::from_signed_json(&reordered, &secret()).unwrap(),
            info
        );
        // Figures that are not exact in binary verify after their trip through text.
        let mut inexact = info.clone();
        inexact.memory_usage_percent = 1.6;
        inexact.cpu_usage_percent = 0.1;
        let signed = inexact.to_signed_json(&secret()).unwrap();
        assert_eq!(
            NodeInfo::from_signed_json(&signed, &secret()).unwrap(),
            inexact
        );
        // A record from a newer writer, with a field this reader does not know, verifies.
        let mut newer: serde_json::Value =
            serde_json::from_slice(&info.to_json().unwrap()).unwrap();
        newer["a_field_from_the_future"] = serde_json::json!({"b": [1.5, "x"], "a": null});
        let signature = record_mac(&secret(), &newer);
        newer[SIGNATURE_FIELD] = serde_json::json!(signature.to_string());
        let bytes = serde_json::to_vec(&newer).unwrap();
        assert_eq!(NodeInfo::from_signed_json(&bytes, &secret()).unwrap(), info);
    }

    #[test]
    fn tampered_forged_and_unsigned_records_are_refused() {
        let signed = sample().to_signed_json(&secret()).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&signed).unwrap();
        let edited = |field: &str, new: serde_json::Value| {
            let mut v = value.clone();
            v[field] = new;
            NodeInfo::from_signed_json(&serde_json::to_vec(&v).unwrap(), &secret()).unwrap_err()
        };
        assert!(matches!(
            edited("address", serde_json::json!("10.6.6.6")),
            NodeRecordError::BadSignature
        ));
        assert!(matches!(
            edited("status", serde_json::json!("offline")),
            NodeRecordError::BadSignature
        ));
        assert!(matches!(
            edited("an_added_field", serde_json::json!(1)),
            NodeRecordError::BadSignature
        ));
        assert!(matches!(
            edited(SIGNATURE_FIELD, serde_json::json!("00".repeat(32))),
            NodeRecordError::BadSignature
        ));
        assert!(matches!(
            edited(SIGNATURE_FIELD, serde_json::json!(42)),
            NodeRecordError::BadSignature
        ));
        let other = ClusterSecret::new("another cluster's secret, as long").unwrap();
        let forged = sample().to_signed_json(&other).unwrap();
        assert!(matches!(
            NodeInfo::from_signed_json(&forged, &secret()),
            Err(NodeRecordError::BadSignature)
        ));
        let unsigned = sample().to_json().unwrap();
        assert!(matches!(
            NodeInfo::from_signed_json(&unsigned, &secret()),
            Err(NodeRecordError::Unsigned)
        ));
        assert!(matches!(
            NodeInfo::from_signed_json(b"[1]", &secret()),
            Err(NodeRecordError::Unsigned)
        ));
        assert!(matches!(
            NodeInfo::from_signed_json(b"{not json", &secret()),
            Err(NodeRecordError::Syntax { .. })
        ));
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

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn record_json() -> serde_json::Value {
            let mut info = NodeInfo::new(
                NodeId::new("n1").unwrap(),
                Incarnation::from_u64(7),
                "10.0.0.5",
                5001,
            );
            info.lease_ms = Some(15_000);
            serde_json::from_slice(&info.to_json().unwrap()).unwrap()
        }

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                any::<String>().prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(2, 8, 4, |inner| {
                proptest::collection::vec(inner, 0..4).prop_map(serde_json::Value::from)
            })
        }

        proptest! {
            /// Any bytes in a node's key read to a record or an error, signed or not.
            #[test]
            fn any_bytes_read_to_a_record_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let secret = crate::ClusterSecret::new("the secret of a property test").unwrap();
                let _ = NodeInfo::from_json(&bytes);
                let _ = NodeInfo::from_signed_json(&bytes, &secret);
            }

            /// A good record with any one field replaced by any JSON value reads to a record
            /// or an error, and a record it reads to checks out.
            #[test]
            fn any_field_replaced_reads_to_a_valid_record_or_an_error(
                field in prop_oneof![
                    Just("node_id"), Just("incarnation"), Just("address"), Just("port"),
                    Just("endpoint"), Just("connection_count"), Just("max_connections"),
                    Just("cpu_usage_percent"), Just("memory_usage_percent"),
                    Just("last_heartbeat"), Just("registered_at"), Just("status"),
                    Just("metadata"), Just("lease_ms"), Just("public_url"),
                ],
                value in json_value(),
            ) {
                let mut record = record_json();
                record[field] = value;
                let bytes = serde_json::to_vec(&record).unwrap();
                if let Ok(info) = NodeInfo::from_json(&bytes) {
                    prop_assert!(info.validate().is_ok());
                    let _ = info.lease_ends_at();
                    let _ = info.ws_url();
                }
            }
        }
    }
}
