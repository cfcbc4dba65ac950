//! The node's own load on Redis and RabbitMQ, counted: a [`Registry`] and a [`Broker`] that
//! pass every call through to the ones they wrap and count it on the way (see
//! [`metrics`](crate::metrics) for the series).
//!
//! They are what an operator sizes the servers by, and what the scale benchmark
//! (`cargo bench --bench scale`) reads per node: registry round trips and the discovery
//! events a node receives grow with the number of nodes, publishes with the traffic, binding
//! changes with group membership churn. Counting costs one atomic add per call; nothing is
//! looked up or allocated per message.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use hybrid_cluster_core::{
    Broker, BrokerError, BrokerMessage, ConnectionId, ConsumeOptions, ConsumerState, Deliveries,
    NodeId, NodeRecord, PublishError, QueueOptions, Registry, RegistryError, RoutingKey,
    registry::RegistryEvents,
};
use metrics::{Counter, Gauge, Label, counter, gauge};
use tokio::sync::watch;

use crate::metrics::{
    BROKER_BINDING_CHANGES, BROKER_GROUP_BINDINGS, BROKER_PUBLISHES, REGISTRY_EVENTS,
    REGISTRY_OPERATIONS,
};

/// The registry's operations, in the order of [`MeteredRegistry`]'s counters.
const REGISTRY_OPS: [&str; 8] = [
    "put_node",
    "remove_node",
    "node",
    "nodes",
    "watch",
    "put_route",
    "route",
    "remove_route",
];

/// Publishes by routing key, in order.
const ROUTES: [&str; 3] = ["node", "group", "broadcast"];

fn node_labels(node: &NodeId, more: &[(&'static str, &'static str)]) -> Vec<Label> {
    std::iter::once(Label::new("node", node.as_str().to_owned()))
        .chain(more.iter().map(|(k, v)| Label::new(*k, *v)))
        .collect()
}

/// A [`Registry`] whose calls are counted, and whose watch streams count the events they
/// bring.
pub(crate) struct MeteredRegistry {
    inner: Arc<dyn Registry>,
    operations: [Counter; 8],
    events: Counter,
}

impl MeteredRegistry {
    /// Counts `inner`'s calls as `node`'s.
    pub(crate) fn new(inner: Arc<dyn Registry>, node: &NodeId) -> Self {
        Self {
            inner,
            operations: REGISTRY_OPS
                .map(|op| counter!(REGISTRY_OPERATIONS, node_labels(node, &[("op", op)]))),
            events: counter!(REGISTRY_EVENTS, node_labels(node, &[])),
        }
    }

    fn count(&self, op: &'static str) {
        if let Some(i) = REGISTRY_OPS.iter().position(|o| *o == op) {
            self.operations[i].increment(1);
        }
    }
}

impl fmt::Debug for MeteredRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl Registry for MeteredRegistry {
    fn put_node(
        &self,
        node: &NodeId,
        record: Bytes,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        self.count("put_node");
        self.inner.put_node(node, record, lease)
    }

    fn remove_node(&self, node: &NodeId) -> BoxFuture<'static, Result<(), RegistryError>> {
        self.count("remove_node");
        self.inner.remove_node(node)
    }

    fn node(&self, node: &NodeId) -> BoxFuture<'static, Result<Option<NodeRecord>, RegistryError>> {
        self.count("node");
        self.inner.node(node)
    }

    fn nodes(&self) -> BoxFuture<'static, Result<Vec<NodeRecord>, RegistryError>> {
        self.count("nodes");
        self.inner.nodes()
    }

    fn reports_leases(&self) -> bool {
        self.inner.reports_leases()
    }

    fn watch(&self) -> BoxFuture<'static, Result<RegistryEvents, RegistryError>> {
        self.count("watch");
        let events = self.events.clone();
        self.inner
            .watch()
            .map(move |watching| {
                watching.map(|stream| {
                    stream
                        .inspect(move |event| {
                            if event.is_ok() {
                                events.increment(1);
                            }
                        })
                        .boxed()
                })
            })
            .boxed()
    }

    fn put_route(
        &self,
        name: &str,
        connection: &ConnectionId,
        lease: Duration,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        self.count("put_route");
        self.inner.put_route(name, connection, lease)
    }

    fn route(&self, name: &str) -> BoxFuture<'static, Result<Option<ConnectionId>, RegistryError>> {
        self.count("route");
        self.inner.route(name)
    }

    fn remove_route(&self, name: &str) -> BoxFuture<'static, Result<(), RegistryError>> {
        self.count("remove_route");
        self.inner.remove_route(name)
    }
}

/// A [`Broker`] whose publishes and binding changes are counted, with a gauge of the group
/// keys (groups, or buckets of groups) the node's queue is bound to.
pub(crate) struct MeteredBroker {
    inner: Arc<dyn Broker>,
    node: NodeId,
    publishes: [Counter; 3],
    binds: Counter,
    unbinds: Counter,
    group_bindings: Gauge,
}

impl MeteredBroker {
    /// Counts `inner`'s calls as `node`'s.
    pub(crate) fn new(inner: Arc<dyn Broker>, node: &NodeId) -> Self {
        Self {
            inner,
            node: node.clone(),
            publishes: ROUTES
                .map(|route| counter!(BROKER_PUBLISHES, node_labels(node, &[("route", route)]))),
            binds: counter!(
                BROKER_BINDING_CHANGES,
                node_labels(node, &[("change", "bind")])
            ),
            unbinds: counter!(
                BROKER_BINDING_CHANGES,
                node_labels(node, &[("change", "unbind")])
            ),
            group_bindings: gauge!(BROKER_GROUP_BINDINGS, node_labels(node, &[])),
        }
    }

    /// Whether a change of `node`'s binding to `key` is one of this node's group bindings.
    fn own_group(&self, node: &NodeId, key: &RoutingKey) -> bool {
        *node == self.node && matches!(key, RoutingKey::Group(_) | RoutingKey::GroupBucket(_))
    }
}

impl fmt::Debug for MeteredBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl Broker for MeteredBroker {
    fn declare_queue(
        &self,
        node: &NodeId,
        options: &QueueOptions,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.inner.declare_queue(node, options)
    }

    /// The queue goes with its bindings: the node's own, and so its gauge, drop to none.
    fn delete_queue(&self, node: &NodeId) -> BoxFuture<'static, Result<(), BrokerError>> {
        let deleting = self.inner.delete_queue(node);
        if *node != self.node {
            return deleting;
        }
        let bound = self.group_bindings.clone();
        deleting
            .inspect(move |result| {
                if result.is_ok() {
                    bound.set(0.0);
                }
            })
            .boxed()
    }

    fn delete_queue_if_empty(
        &self,
        node: &NodeId,
    ) -> BoxFuture<'static, Result<bool, BrokerError>> {
        let deleting = self.inner.delete_queue_if_empty(node);
        if *node != self.node {
            return deleting;
        }
        let bound = self.group_bindings.clone();
        deleting
            .inspect(move |result| {
                if matches!(result, Ok(true)) {
                    bound.set(0.0);
                }
            })
            .boxed()
    }

    fn bind(&self, node: &NodeId, key: &RoutingKey) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.binds.increment(1);
        let binding = self.inner.bind(node, key);
        if !self.own_group(node, key) {
            return binding;
        }
        let bound = self.group_bindings.clone();
        binding
            .inspect(move |result| {
                if result.is_ok() {
                    bound.increment(1.0);
                }
            })
            .boxed()
    }

    fn unbind(
        &self,
        node: &NodeId,
        key: &RoutingKey,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.unbinds.increment(1);
        let unbinding = self.inner.unbind(node, key);
        if !self.own_group(node, key) {
            return unbinding;
        }
        let bound = self.group_bindings.clone();
        unbinding
            .inspect(move |result| {
                if result.is_ok() {
                    bound.decrement(1.0);
                }
            })
            .boxed()
    }

    fn publish(
        &self,
        key: &RoutingKey,
        message: BrokerMessage,
    ) -> BoxFuture<'static, Result<(), PublishError>> {
        let route = match key {
            RoutingKey::Node(_) => 0,
            RoutingKey::Group(_) | RoutingKey::GroupBucket(_) => 1,
            RoutingKey::Broadcast => 2,
        };
        self.publishes[route].increment(1);
        self.inner.publish(key, message)
    }

    fn consume(
        &self,
        node: &NodeId,
        options: &ConsumeOptions,
    ) -> BoxFuture<'static, Result<Deliveries, BrokerError>> {
        self.inner.consume(node, options)
    }

    fn consumer_state(&self, node: &NodeId) -> Option<watch::Receiver<ConsumerState>> {
        self.inner.consumer_state(node)
    }

    fn poll_flow(&self, cx: &mut Context<'_>) -> Poll<Result<(), BrokerError>> {
        self.inner.poll_flow(cx)
    }
}
