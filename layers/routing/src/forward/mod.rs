//! The forwarding [`Service`]: sends an [`Envelope`] to the node queues its target names.
//!
//! [`Forward`] is the endpoint of a stack, not a middleware around another service: its
//! "inner service" is the broker. Stack tower's own layers on top of it (`timeout`, `retry`,
//! `buffer`).
//!
//! - **Readiness** (`poll_ready`): a permit from a semaphore bounding the messages sent and
//!   not yet confirmed (shared by all clones, reserved in `poll_ready` and spent in `call`, as
//!   tower's `ConcurrencyLimit` does), then [`Broker::poll_flow`]: pending while the broker
//!   pushes back (flow control, a lost connection being restored), an error once the broker
//!   has been unreachable for longer than its bound, or was closed.
//!
//!   Callers waiting for a place are served in the order they asked (the semaphore is fair),
//!   so no clone can starve another. A place is held from the `poll_ready` that reserved it
//!   until the `call` that spends it, [`Forward::disarm`], or the clone's drop: **poll ready
//!   only when a `call` follows at once**, and disarm a clone that was polled (ready or
//!   pending) but will not be called. A clone that keeps a place while idle takes it from
//!   every other sender of the node. A `poll_ready` that fails gives its place back.
//! - **Call**: checks the payload size, signs the envelope when the service has a
//!   [`ClusterSecret`] ([`Envelope::sign`]: receivers with the secret refuse unsigned and
//!   forged messages), encodes it ([`EnvelopeCodec::to_message`]: the payload is the body as it
//!   is, metadata goes in headers) and publishes it. The message
//!   is ordered when `call` is made: envelopes sent one after another through one service
//!   reach each node in that order, even when their futures are awaited together.
//! - **Response**: the future resolves `Ok(())` once the broker confirmed the message, or
//!   with a [`ForwardError`] saying why it was not taken. Dropping the future never
//!   withdraws the message, on any broker (it was placed in its sender's order at `call`, and
//!   a withdrawal would leave a gap there): it only stops waiting for the confirmation, and
//!   gives its place of the in-flight bound back.
//!
//! ```
//! use std::sync::Arc;
//! use hybrid_cluster_core::{Envelope, NodeId, QueueOptions, Target};
//! use hybrid_cluster_memory::MemoryBroker;
//! use hybrid_cluster_routing::{Forward, ForwardError, NodeTopology};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = Arc::new(MemoryBroker::new());
//! let b = NodeId::new("node-b")?;
//! let _node_b = NodeTopology::declare(broker.clone(), b.clone(), &QueueOptions::default()).await?;
//!
//! let a = NodeId::new("node-a")?;
//! let forward = Forward::new(broker);
//! forward.clone().oneshot(Envelope::text(a.clone(), Target::Node(b), "hi")).await?;
//!
//! // A node that is gone: the caller learns of it.
//! let gone = Target::Node(NodeId::new("node-z")?);
//! let err = forward.oneshot(Envelope::text(a, gone, "hi")).await.unwrap_err();
//! assert!(matches!(err, ForwardError::Unroutable { .. }));
//! # Ok(())
//! # }
//! ```

mod future;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use hybrid_cluster_core::{Broker, ClusterSecret, Envelope, GroupKeys, Target};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

pub use self::future::ResponseFuture;
use crate::codec::EnvelopeCodec;
use crate::error::ForwardError;

/// How a [`Forward`] service behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardConfig {
    /// Messages sent and not yet confirmed, at most, over all clones of the service. At least 1.
    pub max_in_flight: usize,
    /// The largest payload sent, in bytes; larger ones fail with
    /// [`ForwardError::PayloadTooLarge`] before reaching the broker. It also bounds what a
    /// receiving node holds: RabbitMQ counts a consumer's prefetch in messages only, so the
    /// deliveries in flight to a node take up to its prefetch times this.
    pub max_payload: usize,
    /// The cluster secret every envelope is signed with before it is sent, if the cluster has
    /// one. An envelope that arrives already signed is signed again: the service signs what it
    /// sends.
    pub secret: Option<ClusterSecret>,
    /// The keys group messages are published with: the same as every node's
    /// [`NodeTopology`](crate::NodeTopology) binds (see [`GroupKeys`]).
    pub group_keys: GroupKeys,
}

impl Default for ForwardConfig {
    /// 256 messages in flight, payloads up to 1 MiB, no signing, one key per group.
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            max_payload: 1024 * 1024,
            secret: None,
            group_keys: GroupKeys::PerGroup,
        }
    }
}

impl ForwardConfig {
    /// Signs every envelope sent with `secret`.
    pub fn with_secret(mut self, secret: ClusterSecret) -> Self {
        self.secret = Some(secret);
        self
    }
}

type Acquire =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send + Sync>>;

/// The forwarding service: a `Service<Envelope>` that publishes each envelope to the node
/// queues of its target and resolves once the broker confirmed it.
///
/// See the [module docs](self). Clones share the in-flight bound and the broker; each clone
/// must be polled ready before it is called.
pub struct Forward<B: ?Sized> {
    broker: Arc<B>,
    semaphore: Arc<Semaphore>,
    acquire: Option<Acquire>,
    permit: Option<OwnedSemaphorePermit>,
    max_payload: usize,
    secret: Option<ClusterSecret>,
    group_keys: GroupKeys,
}

impl<B: Broker + ?Sized> Forward<B> {
    /// A service publishing through `broker`, with the default [`ForwardConfig`].
    pub fn new(broker: Arc<B>) -> Self {
        Self::with_config(broker, ForwardConfig::default())
    }

    /// A service publishing through `broker` as `config` says.
    pub fn with_config(broker: Arc<B>, config: ForwardConfig) -> Self {
        Self {
            broker,
            semaphore: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            acquire: None,
            permit: None,
            max_payload: config.max_payload,
            secret: config.secret,
            group_keys: config.group_keys,
        }
    }

    /// The broker it publishes through.
    pub fn broker(&self) -> &Arc<B> {
        &self.broker
    }

    /// Messages that may be sent now before the in-flight bound is reached, over all clones.
    pub fn available_permits(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// Whether this clone holds a place reserved by `poll_ready` that no `call` spent yet.
    pub fn is_ready(&self) -> bool {
        self.permit.is_some()
    }

    /// Gives back the place this clone reserved (or is waiting for) and will not spend, as a
    /// tower service is disarmed when its caller changes its mind after `poll_ready`. Returns
    /// whether there was one. The next `call` needs a new `poll_ready`.
    pub fn disarm(&mut self) -> bool {
        let had = self.permit.is_some() || self.acquire.is_some();
        self.permit = None;
        self.acquire = None;
        had
    }
}

impl<B: ?Sized> Clone for Forward<B> {
    /// A clone shares the broker and the in-flight bound, but holds no permit: it must be
    /// polled ready on its own.
    fn clone(&self) -> Self {
        Self {
            broker: Arc::clone(&self.broker),
            semaphore: Arc::clone(&self.semaphore),
            acquire: None,
            permit: None,
            max_payload: self.max_payload,
            secret: self.secret.clone(),
            group_keys: self.group_keys,
        }
    }
}

impl<B: fmt::Debug + ?Sized> fmt::Debug for Forward<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field("broker", &self.broker)
            .field("available_permits", &self.semaphore.available_permits())
            .field("ready", &self.permit.is_some())
            .field("max_payload", &self.max_payload)
            .field("signing", &self.secret.is_some())
            .finish()
    }
}

impl<B: Broker + ?Sized> Service<Envelope> for Forward<B> {
    type Response = ();
    type Error = ForwardError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.permit.is_none() && self.acquire.is_none() {
            // A free place costs no allocation; only waiting for one boxes a future.
            if let Ok(permit) = Arc::clone(&self.semaphore).try_acquire_owned() {
                self.permit = Some(permit);
            }
        }
        if self.permit.is_none() {
            let acquire = self
                .acquire
                .get_or_insert_with(|| Box::pin(Arc::clone(&self.semaphore).acquire_owned()));
            let acquired = ready!(acquire.as_mut().poll(cx));
            self.acquire = None;
            match acquired {
                Ok(permit) => self.permit = Some(permit),
                // The semaphore is never closed; should it be, nothing can be sent.
                Err(_) => {
                    return Poll::Ready(Err(ForwardError::Broker(
                        hybrid_cluster_core::BrokerError::Closed,
                    )));
                }
            }
        }
        // Holding the permit, wait for the broker to take publishes.
        let flow = ready!(self.broker.poll_flow(cx));
        if let Err(error) = flow {
            // No call follows a failed readiness: the place goes back to the others.
            self.permit = None;
            return Poll::Ready(Err(ForwardError::Broker(error)));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut envelope: Envelope) -> Self::Future {
        let Some(permit) = self.permit.take() else {
            return ResponseFuture::failed(ForwardError::NotReady);
        };
        if envelope.payload.len() > self.max_payload {
            return ResponseFuture::failed(ForwardError::PayloadTooLarge {
                len: envelope.payload.len(),
                max: self.max_payload,
            });
        }
        if let Some(secret) = &self.secret {
            envelope.sign(secret);
        }
        let message = match envelope.to_message() {
            Ok(message) => message,
            Err(e) => return ResponseFuture::failed(ForwardError::Encode(e)),
        };
        // `publish` orders the message now, at the call.
        let key = match &envelope.target {
            Target::Group(group) => self.group_keys.key(group),
            target => target.routing_key(),
        };
        let publish = self.broker.publish(&key, message);
        ResponseFuture::publishing(publish, envelope.target, permit)
    }
}

#[cfg(test)]
mod tests;
