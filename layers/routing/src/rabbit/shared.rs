//! The state shared by a [`RabbitBroker`](super::RabbitBroker)'s handles and its tasks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Waker;

use hybrid_cluster_core::{
    BrokerError, BrokerMessage, ConsumerState, Delivery, NodeId, PublishError, QueueOptions,
    RoutingKey,
};
use lapin::types::ShortString;
use lapin::{BasicProperties, Connection};
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::RabbitConfig;
use super::error::RabbitError;
use super::wire::Names;

/// The connections to RabbitMQ, with their generation: 1 for the first pair, one more at each
/// reconnect. Publishing has a connection of its own, as RabbitMQ advises: during a resource
/// alarm it blocks the connections that publish (it stops reading from them), and consumers
/// (and their acknowledgements) on the other one keep draining the queues.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) generation: u64,
    /// Consumers, declarations and bindings.
    pub(crate) connection: Arc<Connection>,
    /// The publisher's channel.
    pub(crate) publishing: Arc<Connection>,
}

impl Link {
    /// Whether both connections are up.
    pub(crate) fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.publishing.status().connected()
    }
}

/// A publish waiting to be sent, or sent and waiting for its confirmation.
pub(crate) struct Pending {
    pub(crate) key: RoutingKey,
    pub(crate) routing_key: ShortString,
    pub(crate) properties: BasicProperties,
    /// The message itself: its body is published, and its id and headers go into a batch.
    pub(crate) message: BrokerMessage,
    pub(crate) enqueued_at: Instant,
    pub(crate) attempts: u32,
    pub(crate) reply: oneshot::Sender<Result<(), PublishError>>,
}

/// A live consumer, started again on each new connection, and restored when lost.
pub(crate) struct ConsumerEntry {
    pub(crate) id: u64,
    pub(crate) prefetch: u16,
    pub(crate) deliveries: mpsc::Sender<Result<Delivery, BrokerError>>,
    /// Whether it takes deliveries now.
    pub(crate) state: watch::Sender<ConsumerState>,
}

/// Whether publishes are taken now.
pub(crate) enum Flow {
    Ready,
    /// Not now; a waker is woken when it changes.
    Wait,
    /// Unavailable for longer than the outage bound: fail at once.
    Down,
    Closed,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) generation: u64,
    pub(crate) connected: bool,
    pub(crate) blocked: bool,
    /// RabbitMQ stopped confirming publishes on a connection it neither closed nor blocked
    /// (a stuck disk, a quorum queue without its majority): no more go out until it does.
    pub(crate) stuck: bool,
    pub(crate) unavailable_since: Option<Instant>,
    pub(crate) closed: bool,
    /// Publishes not yet on the wire, in call order.
    pub(crate) pending: VecDeque<Pending>,
    /// Publishes taken by the publisher task and not yet settled.
    pub(crate) in_flight: usize,
    flow_wakers: Vec<Waker>,
    /// What was declared through this broker, declared again on each new connection.
    pub(crate) queues: BTreeMap<NodeId, QueueOptions>,
    pub(crate) bindings: BTreeSet<(NodeId, RoutingKey)>,
    pub(crate) consumers: BTreeMap<NodeId, ConsumerEntry>,
}

/// One address of the broker.
pub(crate) struct Address {
    /// The connection string, password included: never logged.
    pub(crate) uri: String,
    /// The URL with its password hidden.
    pub(crate) url: String,
}

pub(crate) struct Shared {
    pub(crate) names: Names,
    pub(crate) config: RabbitConfig,
    /// The broker's addresses, tried in turn (never empty).
    pub(crate) addresses: Vec<Address>,
    /// The address of the current connection (or of the last one, during an outage).
    pub(crate) current: AtomicUsize,
    pub(crate) state: Mutex<State>,
    /// The current connection, `None` during an outage.
    pub(crate) link: watch::Sender<Option<Link>>,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Wakes the publisher task: a publish was queued, or flow changed.
    pub(crate) publisher_wake: Notify,
    /// Wakes the supervisor: a task found the connection of `broken_generation` broken.
    pub(crate) broken: Notify,
    pub(crate) broken_generation: AtomicU64,
    pub(crate) next_consumer: AtomicU64,
    /// Messages sent inside batches (several messages in one AMQP message).
    pub(crate) batched: AtomicU64,
    /// Places for topology operations (declarations, bindings, deletions) in progress.
    pub(crate) topology_slots: tokio::sync::Semaphore,
}

fn wake_all(wakers: Vec<Waker>) {
    for waker in wakers {
        waker.wake();
    }
}

impl Shared {
    pub(crate) fn new(names: Names, config: RabbitConfig, addresses: Vec<Address>) -> Self {
        let topology_slots = tokio::sync::Semaphore::new(
            config
                .max_topology_operations
                .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        );
        Self {
            names,
            config,
            addresses,
            current: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
            link: watch::Sender::new(None),
            shutdown: watch::Sender::new(false),
            publisher_wake: Notify::new(),
            broken: Notify::new(),
            broken_generation: AtomicU64::new(0),
            next_consumer: AtomicU64::new(1),
            batched: AtomicU64::new(0),
            topology_slots,
        }
    }

    /// The URL of the current (or last) connection, password hidden.
    pub(crate) fn url(&self) -> &str {
        let current = self.current.load(Ordering::Relaxed);
        self.addresses
            .get(current)
            .map_or("", |address| address.url.as_str())
    }

    fn flow_of(&self, state: &State, now: Instant) -> Flow {
        if state.closed {
            return Flow::Closed;
        }
        if let Some(since) = state.unavailable_since {
            if since + self.config.outage_timeout <= now {
                return Flow::Down;
            }
            return Flow::Wait;
        }
        if !state.connected || state.blocked || state.stuck {
            return Flow::Wait;
        }
        if state.pending.len() + state.in_flight >= self.config.max_pending {
            return Flow::Wait;
        }
        Flow::Ready
    }

    /// The flow now; on `Wait`, `waker` is woken when it may have changed.
    pub(crate) fn flow(&self, waker: &Waker) -> Flow {
        let mut state = self.state.lock();
        let flow = self.flow_of(&state, Instant::now());
        if matches!(flow, Flow::Wait) && !state.flow_wakers.iter().any(|w| w.will_wake(waker)) {
            state.flow_wakers.push(waker.clone());
        }
        flow
    }

    pub(crate) fn outage_error(&self) -> BrokerError {
        BrokerError::Unavailable {
            source: Box::new(RabbitError::Outage {
                after: self.config.outage_timeout,
            }),
        }
    }

    /// Queues a publish at call time, or says why it cannot be taken.
    pub(crate) fn enqueue(&self, pending: Pending) -> Result<(), PublishError> {
        {
            let mut state = self.state.lock();
            match self.flow_of(&state, Instant::now()) {
                Flow::Closed => return Err(BrokerError::Closed.into()),
                Flow::Down => return Err(self.outage_error().into()),
                Flow::Ready | Flow::Wait => {}
            }
            if state.pending.len() + state.in_flight >= self.config.max_pending {
                return Err(BrokerError::Overloaded {
                    source: Box::new(RabbitError::Backpressure {
                        max_pending: self.config.max_pending,
                    }),
                }
                .into());
            }
            state.pending.push_back(pending);
        }
        tracing::trace!(name: "hybrid_cluster.stage.publish_queued", "publish queued");
        self.publisher_wake.notify_one();
        Ok(())
    }

    /// Takes up to `room` publishes to put on the wire, if publishing is possible now.
    pub(crate) fn take_pending(&self, room: usize, out: &mut Vec<Pending>) {
        let mut state = self.state.lock();
        if !state.connected || state.blocked || state.closed {
            return;
        }
        let n = room.min(state.pending.len());
        out.extend(state.pending.drain(..n));
        state.in_flight += n;
    }

    /// `n` messages went out in one batch.
    pub(crate) fn batched(&self, n: usize) {
        self.batched.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// `n` publishes taken by the publisher were settled.
    pub(crate) fn settled(&self, n: usize) {
        let wakers = {
            let mut state = self.state.lock();
            state.in_flight = state.in_flight.saturating_sub(n);
            if !state.flow_wakers.is_empty()
                && state.pending.len() + state.in_flight < self.config.max_pending
            {
                std::mem::take(&mut state.flow_wakers)
            } else {
                Vec::new()
            }
        };
        wake_all(wakers);
    }

    /// Puts publishes back at the head of the queue, in order: those sent without
    /// confirmation (those sent too often already fail), then those taken and not sent yet.
    pub(crate) fn requeue(&self, sent: Vec<Pending>, unsent: Vec<Pending>) {
        let mut failed = Vec::new();
        {
            let mut state = self.state.lock();
            state.in_flight = state.in_flight.saturating_sub(sent.len() + unsent.len());
            // Taken but never put on the wire: back at the head as they were, no attempt spent.
            for pending in unsent.into_iter().rev() {
                if state.closed {
                    failed.push((pending, BrokerError::Closed));
                } else {
                    state.pending.push_front(pending);
                }
            }
            for mut pending in sent.into_iter().rev() {
                pending.attempts += 1;
                if state.closed {
                    failed.push((pending, BrokerError::Closed));
                } else if pending.attempts >= self.config.publish_attempts {
                    let attempts = pending.attempts;
                    failed.push((
                        pending,
                        BrokerError::Unavailable {
                            source: Box::new(RabbitError::NoConfirmation { attempts }),
                        },
                    ));
                } else {
                    state.pending.push_front(pending);
                }
            }
        }
        for (pending, error) in failed {
            let _ = pending.reply.send(Err(error.into()));
        }
    }

    /// Fails the publishes that have waited through an outage for longer than its bound, wakes
    /// the flow waiters once the outage passes the bound, and returns when to call it again
    /// (`None` while RabbitMQ is available).
    pub(crate) fn expire(&self) -> Option<Instant> {
        let bound = self.config.outage_timeout;
        let now = Instant::now();
        let mut expired = Vec::new();
        let (next, wakers) = {
            let mut state = self.state.lock();
            let since = state.unavailable_since?;
            while let Some(front) = state.pending.front() {
                if front.enqueued_at.max(since) + bound > now {
                    break;
                }
                expired.extend(state.pending.pop_front());
            }
            let outage_end = since + bound;
            let mut next = state
                .pending
                .front()
                .map(|front| front.enqueued_at.max(since) + bound);
            let wakers = if outage_end <= now {
                std::mem::take(&mut state.flow_wakers)
            } else {
                next = Some(next.map_or(outage_end, |n| n.min(outage_end)));
                Vec::new()
            };
            (next, wakers)
        };
        for pending in expired {
            let _ = pending.reply.send(Err(self.outage_error().into()));
        }
        wake_all(wakers);
        next
    }

    /// Fails every publish not yet on the wire.
    pub(crate) fn fail_pending(&self, error: impl Fn() -> BrokerError) {
        let pending = std::mem::take(&mut self.state.lock().pending);
        for pending in pending {
            let _ = pending.reply.send(Err(error().into()));
        }
    }

    /// Records whether consumer `id` of `node` takes deliveries; `false` when it is not the
    /// node's consumer any more.
    pub(crate) fn set_consumer_state(&self, node: &NodeId, id: u64, to: ConsumerState) -> bool {
        let state = self.state.lock();
        match state.consumers.get(node) {
            Some(entry) if entry.id == id => {
                entry.state.send_if_modified(|now| {
                    let changed = *now != to;
                    *now = to;
                    changed
                });
                true
            }
            _ => false,
        }
    }

    /// The connection was lost.
    pub(crate) fn set_down(&self) {
        {
            let mut state = self.state.lock();
            state.connected = false;
            state.unavailable_since.get_or_insert_with(Instant::now);
            for entry in state.consumers.values() {
                entry.state.send_replace(ConsumerState::Interrupted {
                    reason: "the connection to RabbitMQ was lost".to_owned(),
                });
            }
        }
        self.link.send_replace(None);
        self.publisher_wake.notify_one();
    }

    /// A new connection is ready, its topology declared again.
    pub(crate) fn set_up(&self, link: Link) {
        let wakers = {
            let mut state = self.state.lock();
            state.connected = true;
            state.blocked = false;
            state.stuck = false;
            state.unavailable_since = None;
            std::mem::take(&mut state.flow_wakers)
        };
        self.link.send_replace(Some(link));
        self.publisher_wake.notify_one();
        wake_all(wakers);
    }

    /// RabbitMQ stopped confirming (a publish expired unconfirmed), or confirms again: while
    /// it does not, the broker counts as unavailable, so that sends fail after the outage
    /// bound rather than pile up.
    pub(crate) fn set_stuck(&self, stuck: bool) {
        let wakers = {
            let mut state = self.state.lock();
            if state.stuck == stuck {
                return;
            }
            state.stuck = stuck;
            if stuck {
                state.unavailable_since.get_or_insert_with(Instant::now);
                Vec::new()
            } else {
                if state.connected && !state.blocked {
                    state.unavailable_since = None;
                }
                std::mem::take(&mut state.flow_wakers)
            }
        };
        if stuck {
            tracing::warn!(
                "RabbitMQ stopped confirming publishes: sends wait, then fail after the outage bound"
            );
        } else {
            tracing::info!("RabbitMQ confirms publishes again");
        }
        self.publisher_wake.notify_one();
        wake_all(wakers);
    }

    /// RabbitMQ blocked or unblocked publishing (a resource alarm).
    pub(crate) fn set_blocked(&self, blocked: bool) {
        let wakers = {
            let mut state = self.state.lock();
            state.blocked = blocked;
            if blocked {
                state.unavailable_since.get_or_insert_with(Instant::now);
                Vec::new()
            } else {
                if state.connected && !state.stuck {
                    state.unavailable_since = None;
                }
                std::mem::take(&mut state.flow_wakers)
            }
        };
        self.publisher_wake.notify_one();
        wake_all(wakers);
    }

    /// Marks the broker closed, failing what waits.
    pub(crate) fn set_closed(&self) {
        let (wakers, consumers) = {
            let mut state = self.state.lock();
            state.closed = true;
            (
                std::mem::take(&mut state.flow_wakers),
                std::mem::take(&mut state.consumers),
            )
        };
        drop(consumers);
        self.fail_pending(|| BrokerError::Closed);
        self.shutdown.send_replace(true);
        self.publisher_wake.notify_one();
        wake_all(wakers);
    }

    /// A task found the connection of `generation` broken.
    pub(crate) fn report_broken(&self, generation: u64) {
        self.broken_generation
            .fetch_max(generation, Ordering::SeqCst);
        self.broken.notify_one();
    }

    /// Runs `commit` if the connection of `generation` is still the current one; `None` when
    /// it was lost meanwhile (the operation must then be done again on the next one).
    pub(crate) fn commit<R>(
        &self,
        generation: u64,
        commit: impl FnOnce(&mut State) -> R,
    ) -> Option<R> {
        let mut state = self.state.lock();
        (state.generation == generation && state.connected && !state.closed)
            .then(|| commit(&mut state))
    }

    /// Waits for a connection of at least `min_generation`, until `deadline`.
    pub(crate) async fn wait_link(
        &self,
        min_generation: u64,
        deadline: Instant,
    ) -> Result<Link, BrokerError> {
        let mut links = self.link.subscribe();
        loop {
            {
                let state = self.state.lock();
                if state.closed {
                    return Err(BrokerError::Closed);
                }
                // Down for longer than the bound already: fail at once.
                if !state.connected
                    && state
                        .unavailable_since
                        .is_some_and(|since| since + self.config.outage_timeout <= Instant::now())
                {
                    return Err(self.outage_error());
                }
            }
            if let Some(link) = links.borrow_and_update().as_ref()
                && link.generation >= min_generation
            {
                return Ok(link.clone());
            }
            match tokio::time::timeout_at(deadline, links.changed()).await {
                Err(_) => return Err(self.outage_error()),
                Ok(Err(_)) => return Err(BrokerError::Closed),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// Resolves when the broker shuts down.
pub(crate) async fn shut_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}
