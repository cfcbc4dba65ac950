//! The metrics a node records, through the [`metrics`] facade.
//!
//! Install any `metrics` recorder before starting the node to collect them: every series is
//! registered once at start, so recording costs no allocation or lookup per message (the node
//! program installs `metrics-exporter-prometheus` and serves `GET /metrics`). Every metric
//! carries the label `node` (this node's id).
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `hybrid_cluster_connections` | gauge | | live WebSocket connections on this node |
//! | `hybrid_cluster_nodes` | gauge | | nodes this node sees, itself included |
//! | `hybrid_cluster_upgrades_total` | counter | `outcome`: `accepted`, `redirected`, `refused` | WebSocket upgrades and what the layer did with them |
//! | `hybrid_cluster_messages_sent_total` | counter | `kind`: `unicast`, `broadcast`, `group`, `user` (to a user's connections); `outcome`: `ok`, `error` | sends through a `ClusterHandle` |
//! | `hybrid_cluster_send_duration_seconds` | histogram | `kind` | from a send to the broker's confirmation (or local delivery) |
//! | `hybrid_cluster_messages_received_total` | counter | `kind` | messages that came through the broker for this node |
//! | `hybrid_cluster_messages_dropped_total` | counter | `reason`: `slow_client`, `connection_gone`, `no_member` | messages not handed to a client (`no_member`: a group message that reached this node with no member of the group here, as with group keys in buckets) |
//! | `hybrid_cluster_slow_client_actions_total` | counter | `action`: `drop_oldest`, `close` | slow-client policy at work |
//! | `hybrid_cluster_broker_in_flight` | gauge | | messages sent to the broker and not yet confirmed |
//! | `hybrid_cluster_notices_dropped_total` | counter | | undeliverable notices not sent because too many were waiting (their senders are not told) |
//! | `hybrid_cluster_receiving` | gauge | | 1 while the node's consumer takes deliveries from the broker, 0 while it is being restored |
//! | `hybrid_cluster_discovery_changes_total` | counter | `change`: `join`, `leave` | nodes joining and leaving this node's view |
//! | `hybrid_cluster_broker_publishes_total` | counter | `route`: `node`, `group`, `broadcast` | messages this node published to the broker, by routing key (a unicast goes to one node's key) |
//! | `hybrid_cluster_broker_binding_changes_total` | counter | `change`: `bind`, `unbind` | binding changes this node asked of the broker: its queue's own keys at start, a group's key (or its bucket's, with `GroupKeys::Buckets`) when its first local member joins and its last one leaves |
//! | `hybrid_cluster_broker_group_bindings` | gauge | | group keys this node's queue is bound to now: groups with a local member, or with `GroupKeys::Buckets` buckets of groups with one |
//! | `hybrid_cluster_registry_operations_total` | counter | `op`: `put_node`, `remove_node`, `node`, `nodes`, `watch`, `put_route`, `route`, `remove_route` | round trips to the registry (Redis): `put_node` is the heartbeat, one `MULTI` of five commands |
//! | `hybrid_cluster_peers_with_other_group_keys` | gauge | | peers in view that key group messages otherwise than this node (`ClusterConfig::group_keys`): group messages between them are lost; 0 in a cluster set up right |
//! | `hybrid_cluster_registry_events_total` | counter | | discovery events this node received (one per heartbeat of every node, and per join and leave) |
//! | `hybrid_cluster_rate_limited_total` | counter | `action`: `refused`, `closed` | requests over their connection's rate limit refused, and connections closed (1008) for going on past it |
//! | `hybrid_cluster_broker_deliveries_total` | counter | `outcome`: `handled`, `duplicate`, `dead_lettered`, `rejected` | what the receiver did with the broker's deliveries (`rejected`: failed authentication; they are dead-lettered too) |

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Label, counter, gauge, histogram};

/// Live connections.
pub const CONNECTIONS: &str = "hybrid_cluster_connections";
/// Nodes in view.
pub const NODES: &str = "hybrid_cluster_nodes";
/// Upgrades by outcome.
pub const UPGRADES: &str = "hybrid_cluster_upgrades_total";
/// Sends by kind and outcome.
pub const MESSAGES_SENT: &str = "hybrid_cluster_messages_sent_total";
/// Send duration.
pub const SEND_DURATION: &str = "hybrid_cluster_send_duration_seconds";
/// Messages received through the broker.
pub const MESSAGES_RECEIVED: &str = "hybrid_cluster_messages_received_total";
/// Messages not handed to a client.
pub const MESSAGES_DROPPED: &str = "hybrid_cluster_messages_dropped_total";
/// Slow-client policy actions.
pub const SLOW_CLIENT_ACTIONS: &str = "hybrid_cluster_slow_client_actions_total";
/// Unconfirmed broker messages.
pub const BROKER_IN_FLIGHT: &str = "hybrid_cluster_broker_in_flight";
/// Discovery changes.
pub const DISCOVERY_CHANGES: &str = "hybrid_cluster_discovery_changes_total";
/// The receiver's outcomes.
pub const BROKER_DELIVERIES: &str = hybrid_cluster_routing::receive::DELIVERIES_METRIC;
/// Broker publishes by routing key.
pub const BROKER_PUBLISHES: &str = "hybrid_cluster_broker_publishes_total";
/// Binding changes asked of the broker.
pub const BROKER_BINDING_CHANGES: &str = "hybrid_cluster_broker_binding_changes_total";
/// Groups the node's queue is bound to.
pub const BROKER_GROUP_BINDINGS: &str = "hybrid_cluster_broker_group_bindings";
/// Registry round trips by operation.
pub const REGISTRY_OPERATIONS: &str = "hybrid_cluster_registry_operations_total";
/// Discovery events received.
pub const REGISTRY_EVENTS: &str = "hybrid_cluster_registry_events_total";
/// Peers keying group messages otherwise.
pub const PEERS_WITH_OTHER_GROUP_KEYS: &str = "hybrid_cluster_peers_with_other_group_keys";
/// Whether the node's consumer takes deliveries.
pub const RECEIVING: &str = "hybrid_cluster_receiving";
/// Notices not sent: too many waiting.
pub const NOTICES_DROPPED: &str = "hybrid_cluster_notices_dropped_total";

/// The kinds of send, in the order of the per-kind handles.
const KINDS: [&str; 4] = ["unicast", "broadcast", "group", "user"];
/// Upgrade outcomes, in order.
const UPGRADE_OUTCOMES: [&str; 3] = ["accepted", "redirected", "refused"];
/// Reasons for dropping a message, in order.
const DROP_REASONS: [&str; 3] = ["slow_client", "connection_gone", "no_member"];
/// Slow-client actions, in order.
const SLOW_ACTIONS: [&str; 2] = ["drop_oldest", "close"];
/// Discovery changes, in order.
const CHANGES: [&str; 2] = ["join", "leave"];

/// Sessions opened on a connection: `new`, or a resume `recovered` / `not_recovered`.
pub const SESSIONS_OPENED: &str = "hybrid_cluster_sessions_opened_total";
/// Messages of sessions logged (`logged`), sent on where their session moved (`moved`),
/// found without a session any more (`unknown`), or not logged, the store out of reach for
/// longer than the outage bound (`failed`).
pub const SESSION_MESSAGES: &str = "hybrid_cluster_session_messages_total";

const OPENED: [&str; 3] = ["new", "recovered", "not_recovered"];
const LOGGED: [&str; 4] = ["logged", "moved", "unknown", "failed"];

/// Requests refused by a connection's rate limit (`refused`), and connections closed for
/// going on past it (`closed`).
pub const RATE_LIMITED: &str = "hybrid_cluster_rate_limited_total";

const RATE_ACTIONS: [&str; 2] = ["refused", "closed"];

/// Records one node's metrics, every one labelled with the node's id.
///
/// Every series is registered once, when the node starts, so recording on the message path
/// allocates nothing and looks nothing up: install the recorder before starting the node.
#[derive(Clone, Debug)]
pub(crate) struct Metrics(Arc<Handles>);

#[derive(Debug)]
struct Handles {
    connections: Gauge,
    nodes: Gauge,
    in_flight: Gauge,
    receiving: Gauge,
    other_group_keys: Gauge,
    notices_dropped: Counter,
    upgrades: [Counter; 3],
    sent_ok: [Counter; 4],
    sent_error: [Counter; 4],
    duration: [Histogram; 4],
    received: [Counter; 4],
    dropped: [Counter; 3],
    slow: [Counter; 2],
    changes: [Counter; 2],
    opened: [Counter; 3],
    logged: [Counter; 4],
    rate_limited: [Counter; 2],
}

/// The position of `name` among `names` (the call sites only use listed names).
fn at<const N: usize>(names: &[&str; N], name: &str) -> usize {
    names.iter().position(|n| *n == name).unwrap_or(0)
}

impl Metrics {
    pub(crate) fn new(node: &str) -> Self {
        let labels = |more: &[(&'static str, &'static str)]| -> Vec<Label> {
            std::iter::once(Label::new("node", node.to_owned()))
                .chain(more.iter().map(|(k, v)| Label::new(*k, *v)))
                .collect()
        };
        let sent = |outcome: &'static str| {
            KINDS.map(|kind| {
                counter!(
                    MESSAGES_SENT,
                    labels(&[("kind", kind), ("outcome", outcome)])
                )
            })
        };
        Self(Arc::new(Handles {
            connections: gauge!(CONNECTIONS, labels(&[])),
            nodes: gauge!(NODES, labels(&[])),
            in_flight: gauge!(BROKER_IN_FLIGHT, labels(&[])),
            receiving: gauge!(RECEIVING, labels(&[])),
            other_group_keys: gauge!(PEERS_WITH_OTHER_GROUP_KEYS, labels(&[])),
            notices_dropped: counter!(NOTICES_DROPPED, labels(&[])),
            upgrades: UPGRADE_OUTCOMES.map(|o| counter!(UPGRADES, labels(&[("outcome", o)]))),
            sent_ok: sent("ok"),
            sent_error: sent("error"),
            duration: KINDS.map(|kind| histogram!(SEND_DURATION, labels(&[("kind", kind)]))),
            received: KINDS.map(|kind| counter!(MESSAGES_RECEIVED, labels(&[("kind", kind)]))),
            dropped: DROP_REASONS.map(|r| counter!(MESSAGES_DROPPED, labels(&[("reason", r)]))),
            slow: SLOW_ACTIONS.map(|a| counter!(SLOW_CLIENT_ACTIONS, labels(&[("action", a)]))),
            changes: CHANGES.map(|c| counter!(DISCOVERY_CHANGES, labels(&[("change", c)]))),
            opened: OPENED.map(|o| counter!(SESSIONS_OPENED, labels(&[("outcome", o)]))),
            logged: LOGGED.map(|o| counter!(SESSION_MESSAGES, labels(&[("outcome", o)]))),
            rate_limited: RATE_ACTIONS.map(|a| counter!(RATE_LIMITED, labels(&[("action", a)]))),
        }))
    }

    /// A connection's rate limit at work: `refused` (one request) or `closed`.
    pub(crate) fn rate_limited(&self, action: &'static str) {
        self.0.rate_limited[at(&RATE_ACTIONS, action)].increment(1);
    }

    /// A session opened: `new`, `recovered` or `not_recovered`.
    pub(crate) fn session_opened(&self, outcome: &'static str) {
        self.0.opened[at(&OPENED, outcome)].increment(1);
    }

    /// `count` messages of a session: `logged`, `moved`, `unknown` or `failed`.
    pub(crate) fn session_messages(&self, outcome: &'static str, count: usize) {
        self.0.logged[at(&LOGGED, outcome)].increment(count as u64);
    }

    pub(crate) fn connections(&self, count: usize) {
        self.0.connections.set(count as f64);
    }

    pub(crate) fn nodes(&self, count: usize) {
        self.0.nodes.set(count as f64);
    }

    pub(crate) fn upgrade(&self, outcome: &'static str) {
        self.0.upgrades[at(&UPGRADE_OUTCOMES, outcome)].increment(1);
    }

    pub(crate) fn sent(&self, kind: &'static str, ok: bool, seconds: f64) {
        let kind = at(&KINDS, kind);
        let counters = if ok {
            &self.0.sent_ok
        } else {
            &self.0.sent_error
        };
        counters[kind].increment(1);
        self.0.duration[kind].record(seconds);
    }

    pub(crate) fn received(&self, kind: &'static str) {
        self.0.received[at(&KINDS, kind)].increment(1);
    }

    pub(crate) fn dropped(&self, reason: &'static str) {
        self.0.dropped[at(&DROP_REASONS, reason)].increment(1);
    }

    pub(crate) fn slow_client(&self, action: &'static str) {
        self.0.slow[at(&SLOW_ACTIONS, action)].increment(1);
    }

    pub(crate) fn notice_dropped(&self) {
        self.0.notices_dropped.increment(1);
    }

    pub(crate) fn receiving(&self, receiving: bool) {
        self.0.receiving.set(if receiving { 1.0 } else { 0.0 });
    }

    pub(crate) fn peers_with_other_group_keys(&self, count: usize) {
        self.0.other_group_keys.set(count as f64);
    }

    pub(crate) fn in_flight(&self, count: usize) {
        self.0.in_flight.set(count as f64);
    }

    pub(crate) fn discovery_change(&self, change: &'static str) {
        self.0.changes[at(&CHANGES, change)].increment(1);
    }
}
