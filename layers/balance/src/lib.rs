//! Load balancing for `hybrid-cluster`: choose a node among those discovered, by strategy,
//! as a tower [`Service`](tower_service::Service) over any [`Discover`], and decide where new
//! WebSocket clients go.
//!
//! # The model
//! - A **node** is known through its [`LiveNodeInfo`](hybrid_cluster_core::LiveNodeInfo):
//!   discovery keeps it current on every heartbeat, so connection counts, CPU, memory and
//!   status change without the node's service being replaced. Services handed to the
//!   balancer expose it through [`HasNodeInfo`](hybrid_cluster_core::HasNodeInfo).
//! - A [`NodeSet`] ([`nodes`]) is the view: every known node indexed by load, resource usage
//!   and join order, re-indexed only when a node's info changes. A [`Selector`]
//!   ([`strategy`]) applies a [`Strategy`] to it: least connections (default), round robin,
//!   least resource usage, random, power of two choices. Every strategy leaves out nodes
//!   that are draining, offline or full; with none left, a pick fails with
//!   [`NoAvailableNode`]. Least connections and p2c pick in `O(log n)` and `O(1)`.
//! - [`Balance`] ([`balance`]) is the tower service: it routes each request to the chosen
//!   node's service, reserving the node by key in `poll_ready` so that a removal before
//!   `call` cannot misroute (tower-rs/tower#856). [`BalanceLayer`] builds it from a
//!   discovery; it is not `Clone`, so share it behind a [`Buffer`](tower::buffer::Buffer)
//!   ([`Balance::buffered`]).
//! - [`Placer`] ([`placement`]) answers, per WebSocket upgrade, whether to accept the client
//!   here, redirect it to another node, or refuse it; [`Placer::spread`] tells the clients
//!   of a draining node where to reconnect, spread over the nodes with room ([`spread`]).
//! - [`ConnectionLoad`] ([`load`]) gives tower's own balancers our live-connection load.
//!
//! # Example
//! A discovery is any stream of `Change`s; here a channel, as in tests.
//!
//! ```
//! use std::convert::Infallible;
//! use std::task::{Context, Poll};
//!
//! use hybrid_cluster_balance::{Balance, Selector, Strategy};
//! use hybrid_cluster_core::{HasNodeInfo, Incarnation, LiveNodeInfo, NodeId, NodeInfo};
//! use tower::discover::Change;
//! use tower::{Service, ServiceExt};
//!
//! /// A node's service: answers with the node's name.
//! #[derive(Clone)]
//! struct Node(LiveNodeInfo);
//!
//! impl HasNodeInfo for Node {
//!     fn live_node_info(&self) -> &LiveNodeInfo {
//!         &self.0
//!     }
//! }
//!
//! impl Service<&'static str> for Node {
//!     type Response = String;
//!     type Error = Infallible;
//!     type Future = std::future::Ready<Result<String, Infallible>>;
//!     fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
//!         Poll::Ready(Ok(()))
//!     }
//!     fn call(&mut self, _: &'static str) -> Self::Future {
//!         std::future::ready(Ok(self.0.get().node_id.to_string()))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let (changes, discover) = tokio::sync::mpsc::unbounded_channel();
//! let mut discover = discover;
//! let discover = futures_util::stream::poll_fn(move |cx| discover.poll_recv(cx));
//!
//! for (name, connections) in [("node-a", 700), ("node-b", 200)] {
//!     let mut info = NodeInfo::new(NodeId::new(name)?, Incarnation::random(), "10.0.0.1", 5001);
//!     info.connection_count = connections;
//!     let node = Node(LiveNodeInfo::new(info));
//!     changes.send(Ok::<_, Infallible>(Change::Insert(NodeId::new(name)?, node)))?;
//! }
//!
//! let balance = Balance::with_selector(discover, Selector::seeded(Strategy::LeastConnections, 1));
//! let mut balance = balance.buffered(64); // a cloneable handle
//! let chosen = balance.ready().await?.call("hello").await?;
//! assert_eq!(chosen, "node-b");
//! # Ok(())
//! # }
//! ```
//!
//! [`Discover`]: tower::discover::Discover

pub mod balance;
pub mod error;
pub mod load;
pub mod nodes;
pub mod placement;
pub mod spread;
pub mod strategy;
#[cfg(test)]
mod test_nodes;

pub use balance::{Balance, BalanceLayer, BufferedBalance, ResponseFuture};
pub use error::{BoxError, DiscoverError, NoAvailableNode, NotReady};
pub use load::ConnectionLoad;
pub use nodes::{Candidate, NodeSet};
pub use placement::{Placement, PlacementPolicy, Placer, Redirect};
pub use spread::apportion;
pub use strategy::{Selector, Strategy, UnknownStrategy};
