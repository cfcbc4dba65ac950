//! The broker backend: moves messages between node queues.
//!
//! The model is AMQP's, cut down to what the cluster needs, so that RabbitMQ maps onto it
//! one-to-one and another broker (MQTT is the seed's next candidate) can be slotted in:
//!
//! - one **exchange** per cluster, chosen when the backend is built;
//! - one **queue per node**, named by its [`NodeId`] ([`Broker::declare_queue`]), which the
//!   broker deletes by itself once it has gone unused for [`QueueOptions::expires`];
//! - **bindings** of a queue to [`RoutingKey`]s: the node's own key, the broadcast key, and the
//!   key of each group the node has members of ([`Broker::bind`], [`Broker::unbind`]);
//! - **publishing** to a routing key resolves only once the broker has taken responsibility for
//!   the message (publisher confirms), and fails with [`PublishError::Unroutable`] when no
//!   queue is bound to the key (mandatory publishing): nothing is dropped without the caller
//!   learning of it;
//! - **consuming** a queue yields [`Delivery`]s, at most `prefetch` of them unacknowledged at a
//!   time; each is acknowledged, dead-lettered or requeued through its [`Acker`]. Messages a
//!   consumer leaves unacknowledged are delivered again, marked redelivered, to the queue's
//!   next consumer.

use std::collections::BTreeMap;
use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::future::BoxFuture;
use futures_core::stream::BoxStream;
use tokio::sync::watch;

use crate::error::BrokerError;
use crate::ids::{GroupName, NodeId};

/// Where a published message goes: the queues bound to this key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RoutingKey {
    /// The queue of one node.
    Node(NodeId),
    /// Every node's queue.
    Broadcast,
    /// The queues of the nodes that have members of the group.
    Group(GroupName),
    /// The queues of the nodes that have members of any group of this bucket (see
    /// [`GroupKeys::Buckets`]).
    GroupBucket(u32),
}

impl fmt::Display for RoutingKey {
    /// The key's text form, used as the AMQP routing key: `node.{id}`, `broadcast`,
    /// `group.{name}` or `group-bucket.{n}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node(node) => write!(f, "node.{node}"),
            Self::Broadcast => f.write_str("broadcast"),
            Self::Group(group) => write!(f, "group.{group}"),
            Self::GroupBucket(bucket) => write!(f, "group-bucket.{bucket}"),
        }
    }
}

/// The keys group messages travel by, and so the bindings a node's queue has for its groups.
///
/// - [`PerGroup`](GroupKeys::PerGroup) (the default): one key per group. A group message
///   reaches exactly the nodes with members, but the first member of a group to join on a
///   node, and the last to leave, each change a binding: the broker's binding changes a
///   second (about a thousand on one RabbitMQ) bound the cluster's group churn.
/// - [`Buckets(n)`](GroupKeys::Buckets): groups are hashed into `n` buckets and a node's queue
///   is bound to a bucket while it has a member of any group of it. Once a node has members
///   in most buckets its bindings stop changing, whatever the churn, and it has at most `n`
///   of them; the price is that a group message also reaches nodes with members of other
///   groups of its bucket, which drop it.
///
/// Every node of a cluster must key groups the same way: a node binding per group does not
/// receive what another publishes per bucket. Change it with the whole cluster stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GroupKeys {
    /// One key per group.
    #[default]
    PerGroup,
    /// Groups hashed into this many buckets, one key each.
    Buckets(std::num::NonZeroU32),
}

impl GroupKeys {
    /// The number of buckets, or none for one key per group (as a node's record says it).
    pub fn buckets(&self) -> Option<std::num::NonZeroU32> {
        match self {
            Self::PerGroup => None,
            Self::Buckets(buckets) => Some(*buckets),
        }
    }

    /// The key messages to `group` are published with, and that a node with members of it
    /// binds.
    pub fn key(&self, group: &GroupName) -> RoutingKey {
        match self {
            Self::PerGroup => RoutingKey::Group(group.clone()),
            Self::Buckets(buckets) => RoutingKey::GroupBucket(bucket(group, buckets.get())),
        }
    }
}

/// The bucket of `group` among `buckets`: FNV-1a of its name, so that every node, on every
/// platform and version, agrees.
fn bucket(group: &GroupName, buckets: u32) -> u32 {
    let hash = group
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    u32::try_from(hash % u64::from(buckets)).unwrap_or(0)
}

/// A message as the broker carries it: an id, string headers, and the body as bytes.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BrokerMessage {
    /// The message's id (AMQP's `message_id` property).
    pub message_id: String,
    /// Headers (AMQP's `headers` table).
    pub headers: BTreeMap<String, String>,
    /// The body, as it is.
    pub body: Bytes,
}

impl fmt::Debug for BrokerMessage {
    // The body is the user's data: never print it, only its size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerMessage")
            .field("message_id", &self.message_id)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// What survives the broker: how a node's queue and the messages in it are kept.
///
/// Every node of a cluster uses the same. See the README's delivery contract for what each
/// mode promises through which fault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Durability {
    /// Messages live in the broker's memory: the fastest. A confirmation means the broker
    /// holds the message; a broker restart (or the loss of the broker node holding the
    /// queue) loses the messages waiting in it, without a word to their senders. The queue
    /// itself (and its bindings) survives.
    Transient,
    /// Queues and messages are written to disk: a confirmation means the broker has the
    /// message on disk, and a broker restart loses nothing confirmed.
    #[default]
    Durable,
    /// Quorum queues, replicated over the nodes of a RabbitMQ cluster: a confirmation means
    /// a majority of them have the message, and the loss of a minority of broker nodes
    /// loses nothing confirmed.
    Replicated,
}

impl Durability {
    /// The mode's name: `transient`, `durable` or `replicated`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Durable => "durable",
            Self::Replicated => "replicated",
        }
    }

    /// Whether messages are written to disk before they are confirmed.
    pub fn is_persistent(self) -> bool {
        !matches!(self, Self::Transient)
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A durability name that is not one of `transient`, `durable`, `replicated`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown durability `{0}` (expected transient, durable or replicated)")]
pub struct UnknownDurability(pub String);

impl std::str::FromStr for Durability {
    type Err = UnknownDurability;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "transient" => Ok(Self::Transient),
            "durable" => Ok(Self::Durable),
            "replicated" => Ok(Self::Replicated),
            other => Err(UnknownDurability(other.to_owned())),
        }
    }
}

/// How a node's queue behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueOptions {
    /// The broker deletes the queue, with the messages in it, once it has had no consumer for
    /// this long (AMQP `x-expires`), so that nodes gone for good do not pile up messages.
    /// `None` keeps it until it is deleted.
    pub expires: Option<Duration>,
    /// Messages the queue holds at most (ready and unacknowledged); a publish past it is
    /// refused with [`PublishError::Rejected`] rather than dropping anything (AMQP
    /// `x-max-length` with `x-overflow: reject-publish`). `None` sets no bound.
    pub max_length: Option<u32>,
    /// Whether dead-lettered messages are kept in the cluster's dead-letter queue for
    /// inspection (AMQP `x-dead-letter-exchange`), rather than discarded.
    pub dead_letter: bool,
    /// What of the queue survives the broker: on RabbitMQ, every mode declares a durable
    /// queue (so it and its bindings outlive a restart), [`Durability::Replicated`] a quorum
    /// queue. Whether the messages in it survive is the publisher's choice (persistent
    /// messages), which a cluster makes with the same setting.
    pub durability: Durability,
}

impl Default for QueueOptions {
    /// Expires after 60 s without a consumer, no length bound, dead-lettering on, durable.
    fn default() -> Self {
        Self {
            expires: Some(Duration::from_secs(60)),
            max_length: None,
            dead_letter: true,
            durability: Durability::default(),
        }
    }
}

/// How a consumer takes messages from its queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// Deliveries handed out and not yet settled, at most (AMQP `basic.qos` prefetch count).
    /// At least 1.
    pub prefetch: u16,
}

impl Default for ConsumeOptions {
    /// A prefetch of 256.
    fn default() -> Self {
        Self { prefetch: 256 }
    }
}

/// What becomes of a delivered message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Settlement {
    /// Handled: remove it from the queue.
    Ack,
    /// Malformed or refused: move it to the dead-letter queue (or drop it where the queue has
    /// dead-lettering off).
    DeadLetter,
    /// Not handled now: put it back in the queue, to be delivered again.
    Requeue,
}

/// Settles one delivery: what a backend implements to acknowledge its messages.
pub trait Acknowledge: Send + 'static {
    /// Settles the delivery this was handed out with.
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BrokerError>>;
}

/// The handle that settles one [`Delivery`].
///
/// Dropping it without settling leaves the message unacknowledged: it counts against the
/// consumer's prefetch until the consumer closes, and is then delivered again.
pub struct Acker(Box<dyn Acknowledge>);

impl Acker {
    /// Wraps a backend's acknowledger.
    pub fn new(acknowledge: impl Acknowledge) -> Self {
        Self(Box::new(acknowledge))
    }

    /// Settles the delivery as `settlement` says.
    pub fn settle(self, settlement: Settlement) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.0.settle(settlement)
    }

    /// Acknowledges the delivery: it was handled.
    pub fn ack(self) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.settle(Settlement::Ack)
    }

    /// Dead-letters the delivery: it was malformed or refused.
    pub fn dead_letter(self) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.settle(Settlement::DeadLetter)
    }

    /// Puts the delivery back in its queue.
    pub fn requeue(self) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.settle(Settlement::Requeue)
    }
}

impl fmt::Debug for Acker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acker").finish_non_exhaustive()
    }
}

/// One message taken from a queue, to be settled through its [`Acker`].
#[derive(Debug)]
pub struct Delivery {
    /// The message.
    pub message: BrokerMessage,
    /// Whether it was delivered before and not acknowledged (a consumer closed, or it was
    /// requeued).
    pub redelivered: bool,
    /// Settles it.
    pub acker: Acker,
}

/// The deliveries of one consumer. An `Err` item reports a failure of the consumer; the stream
/// ends when the consumer is cancelled for good (its queue was deleted through the broker, or
/// the backend closed). A broker that restores lost consumers (see
/// [`Broker::consumer_state`]) keeps the stream going through the loss.
pub type Deliveries = BoxStream<'static, Result<Delivery, BrokerError>>;

/// Whether a node's consumer is taking deliveries (see [`Broker::consumer_state`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsumerState {
    /// Taking deliveries.
    Consuming,
    /// Not taking deliveries now, and being restored: the connection was lost, or the
    /// consumer was cancelled (its queue deleted from outside, the broker node holding it
    /// lost) or its channel closed. The reason is in words, for logs.
    Interrupted {
        /// Why, in words.
        reason: String,
    },
}

/// Why a publish was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// No queue is bound to the routing key: the node is gone, or no node has members of the
    /// group. Nothing was delivered.
    #[error("no queue is bound to routing key {key}")]
    Unroutable {
        /// The key published to.
        key: RoutingKey,
    },
    /// The broker refused the message (a bound queue is full, or the broker nacked it). For a
    /// key bound to several queues, some of them may have taken it.
    #[error("the broker refused the message for routing key {key}")]
    Rejected {
        /// The key published to.
        key: RoutingKey,
    },
    /// The broker failed before confirming the message: whether it was delivered is unknown.
    #[error("publishing failed")]
    Broker(#[from] BrokerError),
}

/// A message broker that moves messages between the queues of a cluster's nodes.
///
/// See the [module docs](self) for the model. The trait is object safe (`Arc<dyn Broker>`
/// works); every method returns a `'static` future, so a call can be moved into a task.
///
/// # Ordering
/// A message is ordered when [`publish`](Broker::publish) is *called*, not when its future is
/// polled: messages published by one caller one after another reach each queue in that order,
/// even when their confirmations are awaited together.
pub trait Broker: fmt::Debug + Send + Sync + 'static {
    /// Declares `node`'s queue, or checks an existing one. Idempotent.
    fn declare_queue(
        &self,
        node: &NodeId,
        options: &QueueOptions,
    ) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// Deletes `node`'s queue with its messages and bindings (a node leaving for good).
    /// Deleting a missing queue succeeds.
    fn delete_queue(&self, node: &NodeId) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// Deletes `node`'s queue if no message waits in it, and says whether it did. A queue
    /// still holding messages is left as it is (a node leaving then lets a peer take it
    /// over). The default deletes it whatever it holds.
    fn delete_queue_if_empty(
        &self,
        node: &NodeId,
    ) -> BoxFuture<'static, Result<bool, BrokerError>> {
        let deleting = self.delete_queue(node);
        Box::pin(async move { deleting.await.map(|()| true) })
    }

    /// Binds `node`'s queue to `key`. Idempotent.
    fn bind(&self, node: &NodeId, key: &RoutingKey) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// Unbinds `node`'s queue from `key`. Unbinding a missing binding succeeds.
    fn unbind(
        &self,
        node: &NodeId,
        key: &RoutingKey,
    ) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// Publishes `message` to the queues bound to `key`. The future resolves `Ok` once the
    /// broker has confirmed it, or with the reason it was not taken. The message is taken at
    /// the call: dropping the future does not withdraw it.
    fn publish(
        &self,
        key: &RoutingKey,
        message: BrokerMessage,
    ) -> BoxFuture<'static, Result<(), PublishError>>;

    /// Starts the one consumer of `node`'s queue.
    fn consume(
        &self,
        node: &NodeId,
        options: &ConsumeOptions,
    ) -> BoxFuture<'static, Result<Deliveries, BrokerError>>;

    /// Follows the consumer of `node` started by [`consume`](Broker::consume): whether it is
    /// taking deliveries now, as that changes. `None` when there is no such consumer, or the
    /// broker does not say (the default): its consumers are then never lost while their
    /// streams live. A broker that says drops the sender once the consumer is gone (its
    /// stream dropped): a node that shuts down waits for that to know it receives no more.
    fn consumer_state(&self, node: &NodeId) -> Option<watch::Receiver<ConsumerState>> {
        let _ = node;
        None
    }

    /// Whether the broker takes publishes now: `Pending` while it pushes back (flow control,
    /// a lost connection being restored), waking `cx` when that ends. The default is always
    /// ready.
    fn poll_flow(&self, cx: &mut Context<'_>) -> Poll<Result<(), BrokerError>> {
        let _ = cx;
        Poll::Ready(Ok(()))
    }
}

/// A shared broker is a broker: generic code can take `B: Broker` and be handed an `Arc`.
impl<B: Broker + ?Sized> Broker for std::sync::Arc<B> {
    fn declare_queue(
        &self,
        node: &NodeId,
        options: &QueueOptions,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        (**self).declare_queue(node, options)
    }

    fn delete_queue(&self, node: &NodeId) -> BoxFuture<'static, Result<(), BrokerError>> {
        (**self).delete_queue(node)
    }

    fn delete_queue_if_empty(
        &self,
        node: &NodeId,
    ) -> BoxFuture<'static, Result<bool, BrokerError>> {
        (**self).delete_queue_if_empty(node)
    }

    fn bind(&self, node: &NodeId, key: &RoutingKey) -> BoxFuture<'static, Result<(), BrokerError>> {
        (**self).bind(node, key)
    }

    fn unbind(
        &self,
        node: &NodeId,
        key: &RoutingKey,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        (**self).unbind(node, key)
    }

    fn publish(
        &self,
        key: &RoutingKey,
        message: BrokerMessage,
    ) -> BoxFuture<'static, Result<(), PublishError>> {
        (**self).publish(key, message)
    }

    fn consume(
        &self,
        node: &NodeId,
        options: &ConsumeOptions,
    ) -> BoxFuture<'static, Result<Deliveries, BrokerError>> {
        (**self).consume(node, options)
    }

    fn consumer_state(&self, node: &NodeId) -> Option<watch::Receiver<ConsumerState>> {
        (**self).consumer_state(node)
    }

    fn poll_flow(&self, cx: &mut Context<'_>) -> Poll<Result<(), BrokerError>> {
        (**self).poll_flow(cx)
    }
}
