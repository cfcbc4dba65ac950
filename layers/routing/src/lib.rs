//! Node-to-node message routing for `hybrid-cluster`: a tower forwarding `Service` over a
//! message broker (RabbitMQ in production), and the receiving loop that hands a node's
//! messages to their local destination.
//!
//! # The model
//!
//! The cluster has one exchange and **one queue per node**. A node's queue is bound to the
//! node's own key and to the broadcast key, and to a **group's key only while the node has
//! local members** of it ([`NodeTopology`], which counts members and binds on the first,
//! unbinds after the last). So:
//!
//! - a unicast ([`Target::Connection`](hybrid_cluster_core::Target), `Target::Node`) reaches
//!   the one node it names;
//! - a broadcast reaches every node, once;
//! - a group message reaches exactly the nodes with members of the group;
//! - a message no queue takes (its node is gone: its queue expired after
//!   [`QueueOptions::expires`](hybrid_cluster_core::QueueOptions), or nobody is in the group)
//!   **fails** with [`ForwardError::Unroutable`] instead of vanishing.
//!
//! **Sending** is [`Forward`], a `tower::Service<Envelope>`. Its `poll_ready` reports
//! back-pressure (a bound on messages sent and not yet confirmed, and the broker's own flow
//! control) and its future resolves only once the broker confirmed the message (publisher
//! confirms). It composes with `tower::timeout` and `tower::retry`: envelopes are `Clone`,
//! and sending one again is safe because receivers drop ids they have seen.
//!
//! **Receiving** is [`Receiver`]: it consumes the node's queue with a prefetch bound, reads
//! each message back into an envelope, drops duplicates by [`MessageId`] within a window,
//! dead-letters malformed messages with a warning (never the payload), hands each envelope to
//! a local `Service<Envelope>` and acknowledges it only after that service took it. Messages
//! are handled one at a time, so one sender's messages arrive in the order sent. The receiver
//! itself only pulls and settles: decoding, authentication, dedupe and the hand-over are tower
//! layers over the local service, each counting what it did in
//! [`DELIVERIES_METRIC`](receive::DELIVERIES_METRIC) through the `metrics` facade (see
//! [`receive`]).
//!
//! **Authentication** is optional: with a [`ClusterSecret`] in [`ForwardConfig::secret`] every
//! envelope is signed (HMAC-SHA256 over its metadata and payload, [`Envelope::sign`]) before
//! it is sent, and with the same secret in [`ReceiveConfig::secret`] a receiver dead-letters
//! what is unsigned, forged, or sent outside the replay window, and refuses replays (see
//! [`receive`]). A party that can publish to the broker but does not know the secret then
//! cannot get a message to a client.
//!
//! The wire form is [`EnvelopeCodec`]: the payload is the AMQP body, bytes as they are;
//! routing metadata travels as headers. No JSON wrapping, no base64.
//!
//! # Guarantees
//!
//! - **At least once between nodes, with duplicates suppressed.** A message is confirmed by
//!   the broker before a send succeeds, and acknowledged by the receiver only after its
//!   destination took it. A connection loss can make a message travel twice (sent again
//!   because its confirmation was lost, or delivered again because its acknowledgement was);
//!   the receiver drops the second copy by its id within
//!   [`ReceiveConfig::dedupe_window`].
//! - **Nothing is lost silently.** A send that does not succeed fails with a
//!   [`ForwardError`] that says whether the message was certainly not delivered
//!   (`Unroutable`, `Rejected`, `Encode`, `PayloadTooLarge`) or its fate is unknown because
//!   the broker failed (`Broker`, safe to retry).
//! - **Order per sender**: envelopes sent one after another through one [`Forward`] (and its
//!   clones) reach each node in that order, across reconnects too.
//! - **Bounded memory**: in-flight sends, the broker's publish queue, prefetched deliveries
//!   and the dedupe window all have bounds.
//!
//! What happens during a RabbitMQ outage is described on [`rabbit`]: sends wait within a
//! bound, then fail; consumers resume by themselves.
//!
//! # Example
//!
//! Two nodes on the in-memory broker ([`RabbitBroker`] is used the same way):
//!
//! ```
//! use std::sync::Arc;
//! use hybrid_cluster_core::{ConsumeOptions, Envelope, GroupName, NodeId, QueueOptions, Target};
//! use hybrid_cluster_memory::MemoryBroker;
//! use hybrid_cluster_routing::{Forward, ForwardError, NodeTopology, Receiver};
//! use tower::{ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = Arc::new(MemoryBroker::new());
//! let (a, b) = (NodeId::new("node-a")?, NodeId::new("node-b")?);
//! let node_b = NodeTopology::declare(broker.clone(), b.clone(), &QueueOptions::default()).await?;
//!
//! // Node b hands what it receives to its local destination (here, a bounded channel).
//! let (tx, mut inbox) = tokio::sync::mpsc::channel(64);
//! let local = service_fn(move |envelope: Envelope| {
//!     let tx = tx.clone();
//!     async move { tx.send(envelope).await }
//! });
//! let receiver = Receiver::new(node_b.consume(&ConsumeOptions::default()).await?);
//! tokio::spawn(receiver.run(local));
//!
//! // Node a sends through the forwarding service.
//! let forward = Forward::new(broker.clone());
//! forward.clone().oneshot(Envelope::text(a.clone(), Target::Node(b.clone()), "hello b")).await?;
//! assert_eq!(inbox.recv().await.unwrap().payload_text(), Some("hello b"));
//!
//! // A group reaches only nodes with members.
//! let room = GroupName::new("room-1")?;
//! let to_room = || Envelope::text(a.clone(), Target::Group(room.clone()), "hi room");
//! let err = forward.clone().oneshot(to_room()).await.unwrap_err();
//! assert!(matches!(err, ForwardError::Unroutable { .. }));
//! node_b.add_member(&room).await?;
//! forward.oneshot(to_room()).await?;
//! assert_eq!(inbox.recv().await.unwrap().payload_text(), Some("hi room"));
//! # Ok(())
//! # }
//! ```
//!
//! [`MessageId`]: hybrid_cluster_core::MessageId
//! [`ClusterSecret`]: hybrid_cluster_core::ClusterSecret
//! [`Envelope::sign`]: hybrid_cluster_core::Envelope::sign

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod codec;
pub mod error;
pub mod forward;
pub mod rabbit;
pub mod receive;
pub mod topology;

#[cfg(test)]
mod test_support;

pub use codec::EnvelopeCodec;
pub use error::{ForwardError, ReceiveError};
pub use forward::{Forward, ForwardConfig};
pub use rabbit::{RabbitBroker, RabbitConfig, RabbitError};
pub use receive::{AckAfter, ReceiveConfig, Receiver, Taken};
pub use topology::NodeTopology;
