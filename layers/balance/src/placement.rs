//! Placement of new WebSocket clients: keep one here, send it to another node, or refuse it.
//!
//! The cluster layer sees each upgrade request before the handler does and asks a [`Placer`]
//! where the client should go. [`Placer::place`] is synchronous and cheap (a short lock, a
//! refresh that is one atomic load when nothing changed, an `O(log n)` pick), so it can run
//! on every upgrade. It answers:
//!
//! - [`Placement::Accept`]: serve the client on this node;
//! - [`Placement::Redirect`]: send it to another node, with the address, port and endpoint
//!   to give it ([`Redirect::ws_url`] builds the URL);
//! - [`Placement::Refuse`]: no node has room ([`NoAvailableNode`] says why).
//!
//! For many clients at once (those of a draining node), [`Placer::spread`] names a node for
//! each, in proportion to the nodes' free places ([`spread`](crate::spread)).
//!
//! # Policies
//! - [`PlacementPolicy::AcceptUnlessFull`] (default): keep the client when this node is
//!   Active and below its limit; otherwise redirect it to the node the strategy picks;
//!   otherwise refuse. A draining node therefore redirects every new client.
//! - [`PlacementPolicy::AlwaysOptimal`]: place every client on the node the strategy picks,
//!   this one included.
//!
//! # The view
//! A placer holds a shared view of the nodes: this node's own [`LiveNodeInfo`] (which the
//! node keeps current) and its peers', fed directly ([`Placer::insert`],
//! [`Placer::remove`]) or from a discovery ([`Placer::follow`]). Clones share the view.
//! Each decision [charges](NodeSet::charge) one connection to the node it chose, until that
//! node's info is next updated, so that clients placed between two heartbeats spread out
//! and stop at each node's limit rather than all going to the node that was least loaded at
//! the last heartbeat.
//!
//! ```
//! use hybrid_cluster_balance::{Placement, PlacementPolicy, Placer, Selector, Strategy};
//! use hybrid_cluster_core::{Incarnation, LiveNodeInfo, NodeId, NodeInfo};
//!
//! let node = |name: &str, address: &str, connections: u32| -> Result<LiveNodeInfo, Box<dyn std::error::Error>> {
//!     let mut info = NodeInfo::new(NodeId::new(name)?, Incarnation::random(), address, 5001);
//!     info.connection_count = connections;
//!     info.max_connections = 100;
//!     Ok(LiveNodeInfo::new(info))
//! };
//! let local = node("node-a", "10.0.0.1", 100)?; // full
//! let placer = Placer::new(local.clone());
//! placer.insert(node("node-b", "10.0.0.2", 10)?);
//!
//! match placer.place() {
//!     Placement::Redirect(to) => assert_eq!(to.ws_url(), "ws://10.0.0.2:5001/ws"),
//!     other => panic!("expected a redirect, got {other:?}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`NoAvailableNode`]: crate::NoAvailableNode

use std::fmt;
use std::pin::pin;
use std::sync::Arc;

use futures_util::future::poll_fn;
use hybrid_cluster_core::{Epoch, HasNodeInfo, LiveNodeInfo, NodeId};
use parking_lot::Mutex;
use rand::seq::SliceRandom;
use tower::discover::{Change, Discover};

use crate::error::{BoxError, NoAvailableNode};
use crate::nodes::{Candidate, NodeSet};
use crate::spread::apportion;
use crate::strategy::Selector;

/// Where a new client should go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Serve it on this node.
    Accept,
    /// Send it to another node.
    Redirect(Redirect),
    /// No node can take it.
    Refuse(NoAvailableNode),
}

/// The node a client is sent to, and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// The node.
    pub node: NodeId,
    /// Its host name or IP address.
    pub address: String,
    /// Its WebSocket port.
    pub port: u16,
    /// Its WebSocket endpoint path.
    pub endpoint: String,
    /// The URL clients reach it at, when its record names one (TLS in front of it, a proxy).
    pub public_url: Option<String>,
}

impl Redirect {
    /// The redirect to `candidate`.
    fn to(candidate: &Candidate<'_, NodeId>) -> Self {
        Self {
            node: candidate.key.clone(),
            address: candidate.info.address.clone(),
            port: candidate.info.port,
            endpoint: candidate.info.endpoint.clone(),
            public_url: candidate.info.public_url.clone(),
        }
    }

    /// The URL of the node's endpoint: its public URL, or e.g. `ws://10.0.0.5:5001/ws` (IPv6
    /// in brackets).
    pub fn ws_url(&self) -> String {
        self.public_url.clone().unwrap_or_else(|| {
            hybrid_cluster_core::node::ws_url(&self.address, self.port, &self.endpoint)
        })
    }
}

/// When a client is kept on this node. See the [module docs](self).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PlacementPolicy {
    /// Keep it unless this node is full or not Active; then the strategy's pick.
    #[default]
    AcceptUnlessFull,
    /// Always the strategy's pick, this node included.
    AlwaysOptimal,
}

struct View {
    nodes: NodeSet<NodeId>,
    selector: Selector,
}

/// Decides where new clients go, from a shared view of the nodes. Cloning is cheap and
/// shares the view. See the [module docs](self).
#[derive(Clone)]
pub struct Placer {
    local: NodeId,
    policy: PlacementPolicy,
    view: Arc<Mutex<View>>,
}

impl fmt::Debug for Placer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let view = self.view.lock();
        f.debug_struct("Placer")
            .field("local", &self.local)
            .field("policy", &self.policy)
            .field("strategy", &view.selector.strategy())
            .field("nodes", &view.nodes)
            .finish()
    }
}

impl Placer {
    /// A placer for the node whose live info is `local`, with the default policy
    /// ([`AcceptUnlessFull`](PlacementPolicy::AcceptUnlessFull)) and strategy (least
    /// connections).
    pub fn new(local: LiveNodeInfo) -> Self {
        Self::with(local, PlacementPolicy::default(), Selector::default(), None)
    }

    /// A placer with a chosen policy and selector. With `epoch`, the view follows info
    /// changes by that one shared epoch (every cell inserted, `local` included, must bump
    /// it); without, by each node's version.
    pub fn with(
        local: LiveNodeInfo,
        policy: PlacementPolicy,
        selector: Selector,
        epoch: Option<Epoch>,
    ) -> Self {
        let mut nodes = match epoch {
            Some(epoch) => NodeSet::with_shared_epoch(epoch),
            None => NodeSet::new(),
        };
        let id = local.get().node_id.clone();
        nodes.insert(id.clone(), local);
        Self {
            local: id,
            policy,
            view: Arc::new(Mutex::new(View { nodes, selector })),
        }
    }

    /// This node's id.
    pub fn local(&self) -> &NodeId {
        &self.local
    }

    /// The policy applied.
    pub fn policy(&self) -> PlacementPolicy {
        self.policy
    }

    /// Nodes in the view, this one included.
    pub fn len(&self) -> usize {
        self.view.lock().nodes.len()
    }

    /// Whether the view is empty (never: it holds this node).
    pub fn is_empty(&self) -> bool {
        self.view.lock().nodes.is_empty()
    }

    /// Adds a peer, or replaces its cell. A cell for this node's own id is ignored: the
    /// placer keeps the one it was built with.
    pub fn insert(&self, peer: LiveNodeInfo) {
        let id = peer.get().node_id.clone();
        if id != self.local {
            self.view.lock().nodes.insert(id, peer);
        }
    }

    /// Forgets a peer. This node cannot be removed. Returns whether the peer was known.
    pub fn remove(&self, peer: &NodeId) -> bool {
        *peer != self.local && self.view.lock().nodes.remove(peer)
    }

    /// Feeds the view from `discover` until it ends (`Ok`) or fails (its error). Spawn it
    /// beside the server; the view keeps the last nodes seen once it returns. Changes for
    /// this node's own id are ignored.
    pub async fn follow<D>(&self, discover: D) -> Result<(), BoxError>
    where
        D: Discover<Key = NodeId>,
        D::Service: HasNodeInfo,
        D::Error: Into<BoxError>,
    {
        let mut discover = pin!(discover);
        while let Some(change) = poll_fn(|cx| discover.as_mut().poll_discover(cx)).await {
            let change = change.map_err(Into::into)?;
            let (Change::Insert(id, _) | Change::Remove(id)) = &change;
            // This node's own entry is the cell the placer was built with: never replaced.
            if *id != self.local {
                self.view.lock().nodes.apply(&change, true);
            }
        }
        Ok(())
    }

    /// Where a new client should go, by the policy and the strategy, from the current view.
    /// The node chosen is [charged](NodeSet::charge) the client until its next update.
    pub fn place(&self) -> Placement {
        self.decide(true)
    }

    /// Where a new client should go, as [`place`](Self::place) would say, without charging
    /// any node: advice to a client that has not connected yet (it is placed, and charged,
    /// when it does), which asking any number of times cannot make a node look full.
    pub fn advise(&self) -> Placement {
        self.decide(false)
    }

    fn decide(&self, charge: bool) -> Placement {
        let mut view = self.view.lock();
        let View { nodes, selector } = &mut *view;
        nodes.refresh();
        if self.policy == PlacementPolicy::AcceptUnlessFull && nodes.is_available(&self.local) {
            if charge {
                nodes.charge(&self.local);
            }
            return Placement::Accept;
        }
        let placement = match selector.pick(nodes) {
            Err(none) => return Placement::Refuse(none),
            Ok(candidate) if *candidate.key == self.local => Placement::Accept,
            Ok(candidate) => Placement::Redirect(Redirect::to(&candidate)),
        };
        if charge {
            let chosen = match &placement {
                Placement::Redirect(redirect) => &redirect.node,
                _ => &self.local,
            };
            nodes.charge(chosen);
        }
        placement
    }

    /// The other node with the most free places, if one has room, charged nothing: where to
    /// send a client this node cannot take although the balancer would keep it here (its
    /// view of its own count lags behind the clients it admitted since its last update).
    pub fn roomiest_peer(&self) -> Option<Redirect> {
        let mut view = self.view.lock();
        view.nodes.refresh();
        view.nodes
            .with_room()
            .filter(|(candidate, _)| *candidate.key != self.local)
            .max_by_key(|(_, free)| *free)
            .map(|(candidate, _)| Redirect::to(&candidate))
    }

    /// Where each of `clients` clients should go when they all move at once, e.g. the
    /// clients of this node when it drains: the other nodes with room, each named for a
    /// share of the clients in proportion to its free places (`max_connections` less its
    /// connections; see [`apportion`]), never for more than its free places, in random
    /// order. Nodes that are draining, degraded, offline or full get none. `None` for the
    /// clients beyond the free places of all of them (or all, when no node has room).
    ///
    /// The result has `clients` entries; each node named is [charged](NodeSet::charge_many)
    /// its share, so that placements until its next update see the clients sent there.
    pub fn spread(&self, clients: usize) -> Vec<Option<Redirect>> {
        let mut spread = {
            let mut view = self.view.lock();
            let nodes = &mut view.nodes;
            nodes.refresh();
            let (targets, free): (Vec<Redirect>, Vec<u64>) = nodes
                .with_room()
                .filter(|(candidate, _)| *candidate.key != self.local)
                .map(|(candidate, free)| (Redirect::to(&candidate), free))
                .unzip();
            let shares = apportion(u64::try_from(clients).unwrap_or(u64::MAX), &free);
            let mut spread = Vec::with_capacity(clients);
            for (target, share) in targets.into_iter().zip(shares) {
                nodes.charge_many(&target.node, u32::try_from(share).unwrap_or(u32::MAX));
                let share = usize::try_from(share).unwrap_or(clients);
                spread.extend(std::iter::repeat_n(Some(target), share));
            }
            spread
        };
        spread.resize(clients, None);
        spread.shuffle(&mut rand::rng());
        spread
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use hybrid_cluster_core::NodeStatus;

    use super::*;
    use crate::strategy::Strategy;
    use crate::test_nodes::info;

    /// A node whose address names it, so that a redirect shows where it points.
    fn cell(name: &str, connections: u32, max: u32) -> LiveNodeInfo {
        let mut info = info(name, connections, max);
        info.address = format!("{name}.local");
        LiveNodeInfo::new(info)
    }

    fn set_status(cell: &LiveNodeInfo, status: NodeStatus) {
        let mut info = (*cell.get()).clone();
        info.status = status;
        cell.update(info);
    }

    fn target(placement: &Placement) -> &str {
        match placement {
            Placement::Accept => "local",
            Placement::Redirect(redirect) => redirect.node.as_str(),
            Placement::Refuse(_) => "refused",
        }
    }

    #[test]
    fn accepts_while_there_is_room_then_redirects_then_refuses() {
        let local = cell("a", 8, 10);
        let placer = Placer::new(local.clone());
        placer.insert(cell("b", 0, 1));
        // Two places left here, then one on b, then none.
        let decisions: Vec<Placement> = (0..4).map(|_| placer.place()).collect();
        assert_eq!(decisions[0], Placement::Accept);
        assert_eq!(decisions[1], Placement::Accept);
        let Placement::Redirect(redirect) = &decisions[2] else {
            panic!("expected a redirect: {:?}", decisions[2]);
        };
        assert_eq!(redirect.node.as_str(), "b");
        assert_eq!(redirect.ws_url(), "ws://b.local:5001/ws");
        assert_eq!(
            decisions[3],
            Placement::Refuse(NoAvailableNode {
                known: 2,
                full: 2,
                ..NoAvailableNode::default()
            })
        );

        // The heartbeat reports what is really there: two clients left a.
        let mut info = (*local.get()).clone();
        info.connection_count = 8;
        local.update(info);
        assert_eq!(placer.place(), Placement::Accept);
    }

    #[test]
    fn a_draining_node_redirects_every_client() {
        let local = cell("a", 0, 100);
        let placer = Placer::new(local.clone());
        placer.insert(cell("b", 50, 100));
        placer.insert(cell("c", 50, 100));
        set_status(&local, NodeStatus::Draining);
        let mut counts = HashMap::new();
        for _ in 0..20 {
            *counts
                .entry(target(&placer.place()).to_owned())
                .or_insert(0) += 1;
        }
        assert_eq!(counts, HashMap::from([("b".into(), 10), ("c".into(), 10)]));
    }

    #[test]
    fn always_optimal_places_by_the_strategy_this_node_included() {
        let local = cell("a", 20, 100);
        let placer = Placer::with(
            local,
            PlacementPolicy::AlwaysOptimal,
            Selector::seeded(Strategy::LeastConnections, 1),
            None,
        );
        placer.insert(cell("b", 0, 100));
        placer.insert(cell("c", 10, 100));
        let mut counts = HashMap::new();
        for _ in 0..60 {
            *counts
                .entry(target(&placer.place()).to_owned())
                .or_insert(0) += 1;
        }
        // 30 + 60 = 90 connections: 30 each, so b took 30, c 20 and this node 10.
        assert_eq!(
            counts,
            HashMap::from([("b".into(), 30), ("c".into(), 20), ("local".into(), 10)])
        );
    }

    #[test]
    fn the_local_node_cannot_be_replaced_or_removed_by_peers() {
        let local = cell("a", 0, 10);
        let placer = Placer::new(local);
        placer.insert(cell("a", 10, 10));
        assert!(!placer.remove(&NodeId::new("a").unwrap()));
        assert_eq!(placer.len(), 1);
        assert_eq!(placer.place(), Placement::Accept);
    }

    /// How many of `spread` name each node (`"none"` for those without).
    fn counts(spread: &[Option<Redirect>]) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for redirect in spread {
            let node = redirect.as_ref().map_or("none", |r| r.node.as_str());
            *counts.entry(node.to_owned()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn advice_charges_no_node_and_the_roomiest_peer_is_named_without_charge() {
        let local = cell("a", 10, 10); // full
        let placer = Placer::new(local);
        placer.insert(cell("b", 0, 1)); // one place
        placer.insert(cell("c", 5, 6)); // one place
        placer.insert(cell("d", 0, 3)); // three places
        for _ in 0..10 {
            match placer.advise() {
                Placement::Redirect(redirect) => assert_ne!(redirect.node.as_str(), "a"),
                other => panic!("advice names a peer with room: {other:?}"),
            }
        }
        for _ in 0..10 {
            let roomiest = placer.roomiest_peer().unwrap();
            assert_eq!(
                roomiest.node.as_str(),
                "d",
                "three free places, never charged"
            );
        }
        // Placing does charge: five placements take the five places, and none is left.
        let placed: Vec<Placement> = (0..5).map(|_| placer.place()).collect();
        assert!(
            placed.iter().all(|p| matches!(p, Placement::Redirect(_))),
            "{placed:?}"
        );
        assert!(matches!(placer.place(), Placement::Refuse(_)));
        assert!(placer.roomiest_peer().is_none());
    }

    #[test]
    fn spread_follows_free_places_and_leaves_out_nodes_without_room() {
        let local = cell("a", 1_000, 10_000);
        set_status(&local, NodeStatus::Draining);
        let placer = Placer::new(local);
        placer.insert(cell("b", 100, 500)); // 400 free
        placer.insert(cell("c", 0, 600)); // 600 free
        placer.insert(cell("d", 1_000, 2_000)); // 1,000 free
        placer.insert(cell("full", 50, 50));
        let degraded = cell("degraded", 0, 1_000);
        set_status(&degraded, NodeStatus::Degraded);
        placer.insert(degraded);
        let draining = cell("draining", 0, 1_000);
        set_status(&draining, NodeStatus::Draining);
        placer.insert(draining);

        let spread = placer.spread(1_000);
        assert_eq!(spread.len(), 1_000);
        assert_eq!(
            counts(&spread),
            HashMap::from([("b".into(), 200), ("c".into(), 300), ("d".into(), 500)])
        );
        assert_eq!(spread[0].as_ref().unwrap().ws_url().split(':').count(), 3);
        // The shares were charged: the 1,000 places left go the same way.
        assert_eq!(
            counts(&placer.spread(1_000)),
            HashMap::from([("b".into(), 200), ("c".into(), 300), ("d".into(), 500)])
        );
        // Now every node is full.
        assert_eq!(
            counts(&placer.spread(3)),
            HashMap::from([("none".into(), 3)])
        );
    }

    #[test]
    fn spread_never_names_a_node_for_more_than_its_free_places() {
        let local = cell("a", 0, 10_000);
        let placer = Placer::new(local);
        placer.insert(cell("b", 90, 100));
        placer.insert(cell("c", 70, 100));
        let spread = placer.spread(50);
        assert_eq!(
            counts(&spread),
            HashMap::from([("b".into(), 10), ("c".into(), 30), ("none".into(), 10)])
        );
    }

    #[test]
    fn spread_is_random_in_order() {
        let placer = Placer::new(cell("a", 0, 10));
        placer.insert(cell("b", 0, 1_000));
        placer.insert(cell("c", 0, 1_000));
        let spread = placer.spread(200);
        let first: Vec<_> = spread[..100].iter().flatten().map(|r| &r.node).collect();
        // Not all of one node first: the chance a shuffle does that is 2 in C(200, 100).
        assert!(first.iter().any(|n| n.as_str() == "b"));
        assert!(first.iter().any(|n| n.as_str() == "c"));
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let redirect = Redirect {
            node: NodeId::new("b").unwrap(),
            address: "::1".into(),
            port: 9000,
            endpoint: "/ws".into(),
            public_url: None,
        };
        assert_eq!(redirect.ws_url(), "ws://[::1]:9000/ws");
    }
}
