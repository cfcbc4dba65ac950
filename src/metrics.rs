//! The metrics a node records, through the [`metrics`] facade.
//!
//! Install any `metrics` recorder to collect them (the node program installs
//! `metrics-exporter-prometheus` and serves `GET /metrics`). Every metric carries the label
//! `node` (this node's id).
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `hybrid_cluster_connections` | gauge | | live WebSocket connections on this node |
//! | `hybrid_cluster_nodes` | gauge | | nodes this node sees, itself included |
//! | `hybrid_cluster_upgrades_total` | counter | `outcome`: `accepted`, `redirected`, `refused` | WebSocket upgrades and what the layer did with them |
//! | `hybrid_cluster_messages_sent_total` | counter | `kind`: `unicast`, `broadcast`, `group`; `outcome`: `ok`, `error` | sends through a `ClusterHandle` |
//! | `hybrid_cluster_send_duration_seconds` | histogram | `kind` | from a send to the broker's confirmation (or local delivery) |
//! | `hybrid_cluster_messages_received_total` | counter | `kind` | messages that came through the broker for this node |
//! | `hybrid_cluster_messages_dropped_total` | counter | `reason`: `slow_client`, `connection_gone` | messages not handed to a client |
//! | `hybrid_cluster_slow_client_actions_total` | counter | `action`: `drop_oldest`, `close` | slow-client policy at work |
//! | `hybrid_cluster_broker_in_flight` | gauge | | messages sent to the broker and not yet confirmed |
//! | `hybrid_cluster_discovery_changes_total` | counter | `change`: `join`, `leave` | nodes joining and leaving this node's view |
//! | `hybrid_cluster_broker_deliveries_total` | counter | `outcome`: `handled`, `duplicate`, `dead_lettered`, `rejected` | what the receiver did with the broker's deliveries (`rejected`: failed authentication; they are dead-lettered too); read every heartbeat |

use std::sync::Arc;

use metrics::{Label, counter, gauge, histogram};

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
pub const BROKER_DELIVERIES: &str = "hybrid_cluster_broker_deliveries_total";

/// Records one node's metrics, every one labelled with the node's id.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    node: Arc<str>,
}

impl Metrics {
    pub(crate) fn new(node: &str) -> Self {
        Self {
            node: Arc::from(node),
        }
    }

    fn labels(&self, more: &[(&'static str, &'static str)]) -> Vec<Label> {
        std::iter::once(Label::new("node", self.node.to_string()))
            .chain(more.iter().map(|(k, v)| Label::new(*k, *v)))
            .collect()
    }

    pub(crate) fn connections(&self, count: usize) {
        gauge!(CONNECTIONS, self.labels(&[])).set(count as f64);
    }

    pub(crate) fn nodes(&self, count: usize) {
        gauge!(NODES, self.labels(&[])).set(count as f64);
    }

    pub(crate) fn upgrade(&self, outcome: &'static str) {
        counter!(UPGRADES, self.labels(&[("outcome", outcome)])).increment(1);
    }

    pub(crate) fn sent(&self, kind: &'static str, ok: bool, seconds: f64) {
        let outcome = if ok { "ok" } else { "error" };
        counter!(
            MESSAGES_SENT,
            self.labels(&[("kind", kind), ("outcome", outcome)])
        )
        .increment(1);
        histogram!(SEND_DURATION, self.labels(&[("kind", kind)])).record(seconds);
    }

    pub(crate) fn received(&self, kind: &'static str) {
        counter!(MESSAGES_RECEIVED, self.labels(&[("kind", kind)])).increment(1);
    }

    pub(crate) fn dropped(&self, reason: &'static str) {
        counter!(MESSAGES_DROPPED, self.labels(&[("reason", reason)])).increment(1);
    }

    pub(crate) fn slow_client(&self, action: &'static str) {
        counter!(SLOW_CLIENT_ACTIONS, self.labels(&[("action", action)])).increment(1);
    }

    pub(crate) fn in_flight(&self, count: usize) {
        gauge!(BROKER_IN_FLIGHT, self.labels(&[])).set(count as f64);
    }

    pub(crate) fn receiver(&self, stats: &hybrid_cluster_routing::ReceiveStats) {
        for (outcome, value) in [
            ("handled", stats.handled),
            ("duplicate", stats.duplicates),
            ("dead_lettered", stats.dead_lettered),
            ("rejected", stats.rejected),
        ] {
            counter!(BROKER_DELIVERIES, self.labels(&[("outcome", outcome)])).absolute(value);
        }
    }

    pub(crate) fn discovery_change(&self, change: &'static str) {
        counter!(DISCOVERY_CHANGES, self.labels(&[("change", change)])).increment(1);
    }
}
