//! The running node behind a [`Cluster`](crate::Cluster): its parts (discovery, placement,
//! routing, its connections), its background tasks, and what it does with what it receives.
//!
//! Every other module of the facade reaches the node through this one; it reaches none of
//! them but the connections it holds ([`local`](crate::local)), so that the node is the leaf
//! of the facade's imports.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_core::future::BoxFuture;
use hybrid_cluster_balance::Placer;
use hybrid_cluster_core::{
    Broker, ConnectionId, ConnectionIds, ConsumerState, Envelope, Incarnation, LiveNodeInfo,
    NodeId, NodeStatus, PresenceStore, Target,
};
use hybrid_cluster_discovery::Discovery;
use hybrid_cluster_routing::{AckAfter, Forward, NodeTopology};
use parking_lot::Mutex;
use tokio::task::JoinSet;
use tokio::time::{Duration, Instant};
use tokio_util::task::AbortOnDropHandle;

use crate::config::ClusterConfig;
use crate::error::{ClusterError, error_chain};
use crate::local::{CloseFrame, FannedOut, InboxItem, LocalConnections, Refused};
use crate::metrics::Metrics;
use crate::session::NodeSessions;
use crate::shutdown::{CLOSE_SERVICE_RESTART, close_reason};
use crate::trace::TraceContext;

/// A message in this node's queue whose target is another node's: see
/// [`Node::deliver_incoming`].
#[derive(Debug, thiserror::Error)]
#[error("its target is not on this node: it was republished here, not routed")]
pub(crate) struct Misrouted;

/// One running node: what [`Cluster`](crate::Cluster), its handles and its layer share.
pub(crate) struct Node {
    pub(crate) id: NodeId,
    pub(crate) incarnation: Incarnation,
    pub(crate) config: ClusterConfig,
    pub(crate) local: Arc<LocalConnections>,
    pub(crate) topology: NodeTopology<dyn Broker>,
    pub(crate) forward: Forward<dyn Broker>,
    pub(crate) discovery: Discovery,
    pub(crate) placer: Placer,
    pub(crate) ids: ConnectionIds,
    /// This node's cell in the view, so that draining shows in placement at once.
    pub(crate) local_info: LiveNodeInfo,
    pub(crate) metrics: Metrics,
    /// Where the node is in its run: starts empty (nothing running, not draining).
    pub(crate) state: RunState,
    /// Its connections' sessions, when sessions are on.
    pub(crate) sessions: Option<Arc<NodeSessions>>,
    /// Where its users' presence is kept, and how long its entries live unless kept alive,
    /// when presence is on.
    pub(crate) presence: Option<(Arc<dyn PresenceStore>, Duration)>,
}

/// A node's run: its status flags and the tasks it owns.
#[derive(Default)]
pub(crate) struct RunState {
    draining: AtomicBool,
    pub(crate) stopped: AtomicBool,
    /// Why the node does not receive from the broker now; `None` while it does.
    not_receiving: Mutex<Option<String>>,
    /// Held while the node's status changes (drain, degraded, active again), so that the
    /// last change wins in the registry too.
    status_change: tokio::sync::Mutex<()>,
    /// The node's background tasks: each holds the node weakly, and all are aborted when the
    /// node is dropped or shut down.
    tasks: Mutex<JoinSet<()>>,
    /// The receiver's task, stopped first at shutdown.
    receiver: Mutex<Option<AbortOnDropHandle<()>>>,
}

impl Node {
    /// Runs `task` in the background until the node is dropped or shut down.
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.state.tasks.lock();
        // Finished tasks (a takeover that ended) are forgotten as new ones come.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// Runs the receiver's `task`, which [`Node::stop_receiving`] stops first at shutdown.
    pub(crate) fn spawn_receiver(
        &self,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        *self.state.receiver.lock() = Some(AbortOnDropHandle::new(tokio::spawn(task)));
    }

    /// Aborts every background task but the receiver's.
    pub(crate) fn stop_tasks(&self) {
        self.state.tasks.lock().abort_all();
    }
    /// Places of the bound on unconfirmed messages in use: messages sent to the broker and not
    /// yet confirmed, and places reserved for a send about to start.
    pub(crate) fn in_flight(&self) -> usize {
        self.config
            .forward
            .max_in_flight
            .saturating_sub(self.forward.available_permits())
    }

    /// The peers in view that key group messages otherwise than this node: between them and
    /// this node group messages are lost (see [`GroupKeys`](crate::GroupKeys)).
    pub(crate) fn peers_keying_groups_otherwise(&self) -> Vec<NodeId> {
        let own = self.config.group_keys.buckets();
        self.discovery
            .view()
            .members()
            .iter()
            .filter(|(id, info)| **id != self.id && info.get().group_buckets != own)
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.state.draining.load(Ordering::Acquire)
    }

    /// Hands an envelope that came through the broker to the local connections it is for.
    ///
    /// A message whose target cannot be on this node (a unicast or notice for another node's
    /// connection, a node message for another node) was republished into this node's queue,
    /// not routed here: it is refused (and dead-lettered by the receiver), never answered, so
    /// that a captured message replayed elsewhere cannot make a node tell its real sender a
    /// false `not_found`.
    pub(crate) fn deliver_incoming(
        self: &Arc<Self>,
        envelope: Envelope,
    ) -> Result<AckAfter, Misrouted> {
        if !self.routes_here(&envelope.target) {
            return Err(Misrouted);
        }
        let trace_id = TraceContext::of(&envelope).trace_id();
        let span = tracing::info_span!(
            "hybrid_cluster.deliver",
            node = %self.id,
            from = %envelope.origin,
            message_id = %envelope.id,
            trace_id = %trace_id,
        );
        let _entered = span.enter();
        let envelope = Arc::new(envelope);
        let kept = match &envelope.target {
            Target::Connection(id) => self.deliver_unicast(id, &envelope),
            // This node delivered its own broadcasts and group messages locally already.
            Target::Broadcast if envelope.origin != self.id => {
                self.metrics.received("broadcast");
                let fanned = self.local.deliver_all(&envelope);
                self.settle_fanned(fanned)
            }
            Target::Group(group) if envelope.origin != self.id => {
                if self.took_disconnect(group, &envelope) {
                    return Ok(AckAfter(None));
                }
                self.metrics
                    .received(if group.is_reserved() && group.user().is_some() {
                        "user"
                    } else {
                        "group"
                    });
                // A node bound for a group's key may have no member of it: a member that just
                // left, or with group keys in buckets, another group of the bucket.
                let fanned = self.local.deliver_group(group, &envelope);
                if fanned.count == 0 {
                    self.metrics.dropped("no_member");
                }
                self.settle_fanned(fanned)
            }
            Target::Broadcast | Target::Group(_) => None,
            Target::Node(_) => {
                let forwarded = self.deliver_forwarded(&envelope);
                if forwarded.is_none() {
                    tracing::debug!(from = %envelope.origin, "ignoring a node message that carries no session message");
                }
                forwarded
            }
        };
        Ok(AckAfter(kept))
    }

    /// Hands a unicast (or a notice) to connection `id` here; returns what to wait for before
    /// acknowledging it.
    fn deliver_unicast(
        self: &Arc<Self>,
        id: &ConnectionId,
        envelope: &Arc<Envelope>,
    ) -> Option<BoxFuture<'static, ()>> {
        if let Some(notice) = crate::notice::read(envelope) {
            // Best effort: the sender may have closed meanwhile too.
            let _ = self.local.deliver_to(id, InboxItem::Undeliverable(notice));
            return None;
        }
        let pushed = if id.incarnation() == self.incarnation {
            self.local
                .deliver_to(id, InboxItem::Message(Arc::clone(envelope)))
        } else {
            Err(Refused::NotFound)
        };
        match pushed {
            Ok(pushed) => {
                self.metrics.received("unicast");
                self.settle_pushed(id, pushed)
            }
            Err(_) => {
                self.metrics.dropped("connection_gone");
                self.local.bounced.bounce_envelope(envelope);
                None
            }
        }
    }

    /// What to wait for before acknowledging a message put in several inboxes: the sessions
    /// among them keeping it.
    pub(crate) fn settle_fanned(
        self: &Arc<Self>,
        fanned: FannedOut,
    ) -> Option<BoxFuture<'static, ()>> {
        let waits: Vec<_> = fanned
            .sessions
            .into_iter()
            .filter_map(|(to, pushed)| self.settle_pushed(&to, pushed))
            .collect();
        if waits.is_empty() {
            return None;
        }
        Some(Box::pin(async move {
            futures_util::future::join_all(waits).await;
        }))
    }

    /// Whether a message for `target` is routed to this node's queue.
    fn routes_here(&self, target: &Target) -> bool {
        match target {
            Target::Connection(id) => id.node() == &self.id,
            Target::Node(node) => node == &self.id,
            Target::Broadcast | Target::Group(_) => true,
        }
    }

    /// Marks this node Draining, here at once and for its peers.
    pub(crate) async fn drain(&self) -> Result<(), ClusterError> {
        let _changing = self.state.status_change.lock().await;
        if self.state.draining.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.set_local_status(NodeStatus::Draining);
        self.discovery.drain().await?;
        Ok(())
    }

    /// Takes over the queue of `gone`, a node that left this node's view, in a task of its
    /// own: see [`takeover`](crate::takeover).
    pub(crate) fn take_over_queue(self: &Arc<Self>, gone: NodeId) {
        if gone == self.id || self.is_draining() {
            return;
        }
        let broker = Arc::clone(self.topology.broker());
        let secret = self.config.secret.clone();
        let sessions = self.sessions.is_some();
        let weak = Arc::downgrade(self);
        let answer = self.orphan_taker(gone.clone());
        self.spawn(async move {
            let is_back = {
                let gone = gone.clone();
                move || {
                    weak.upgrade()
                        .is_none_or(|node| node.discovery.view().node(&gone).is_some())
                }
            };
            crate::takeover::take_over(broker, gone, secret, sessions, is_back, answer).await;
        });
    }

    /// Stops the receiver, and waits until the broker has let go of its consumer (so that
    /// what it had not settled is back in the queue).
    pub(crate) async fn stop_receiving(&self) {
        let consumer = self.topology.broker().consumer_state(&self.id);
        // Dropping its handle aborts the receiver's task.
        drop(self.state.receiver.lock().take());
        if let Some(mut consumer) = consumer {
            // The broker drops its end once the consumer is gone.
            while consumer.changed().await.is_ok() {}
        }
    }

    /// The first part of a shutdown: drains, and closes every client with 1012 and a reason
    /// naming a node to reconnect to; waits for them to go until `deadline`, then says in the
    /// log what it cut short.
    pub(crate) async fn close_clients(&self, deadline: Instant) {
        match tokio::time::timeout_at(deadline, self.drain()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = %error_chain(&error), "could not publish the drain; leaving anyway")
            }
            Err(_) => {
                tracing::warn!("publishing the drain took too long: cut short, leaving anyway")
            }
        }
        self.close_all_spread();
        if tokio::time::timeout_at(deadline, self.local.wait_empty())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = self.local.len(),
                awaiting_confirmation = self.in_flight(),
                grace_ms = self.config.shutdown_grace.as_millis() as u64,
                "shutdown grace period ran out: cutting short the connections still open (their clients were sent the close) and the messages still awaiting the broker's confirmation (their senders get no answer)"
            );
        }
    }

    /// Closes every client with 1012 and a reason naming the node it should reconnect to,
    /// the clients spread over the other nodes in proportion to their free places (see
    /// [`Placer::spread`]) so that they do not all land on one. Clients beyond the places
    /// free (or that connected since the count, none while draining) get `{}`.
    fn close_all_spread(&self) {
        let clients = self.local.len();
        let spread = self.placer.spread(clients);
        let named = spread.iter().flatten().count();
        tracing::info!(
            clients,
            named,
            "closing the clients, each told a node to reconnect to"
        );
        let mut redirects = spread.into_iter();
        self.local.close_all(|| CloseFrame {
            code: CLOSE_SERVICE_RESTART,
            reason: close_reason(redirects.next().flatten().as_ref()),
        });
    }

    /// This node's status in its own cell of the view, which placement reads at once.
    fn set_local_status(&self, status: NodeStatus) {
        let mut info = (*self.local_info.get()).clone();
        info.status = status;
        self.local_info.update(info);
    }

    /// Why the node does not receive from the broker now, if it does not.
    pub(crate) fn not_receiving(&self) -> Option<String> {
        self.state.not_receiving.lock().clone()
    }

    /// Follows the node's consumer: while it is not taking deliveries the node is Degraded
    /// (here, for placement, and in its record, for its peers) and not healthy, and says so
    /// in the log; once it takes them again, the node is Active again (unless it drains).
    pub(crate) async fn follow_consumer(&self, state: ConsumerState) {
        let _changing = self.state.status_change.lock().await;
        let status = match state {
            ConsumerState::Consuming => {
                if self.state.not_receiving.lock().take().is_none() {
                    return;
                }
                tracing::info!(node = %self.id, "receiving from the broker again: the node is active");
                NodeStatus::Active
            }
            ConsumerState::Interrupted { reason } => {
                tracing::error!(node = %self.id, %reason, "the node does not receive from the broker: it is degraded (no new clients, /healthz 503) until its consumer is restored");
                *self.state.not_receiving.lock() = Some(reason);
                NodeStatus::Degraded
            }
        };
        self.metrics.receiving(status == NodeStatus::Active);
        if self.is_draining() {
            return;
        }
        self.set_local_status(status);
        if let Err(error) = self.discovery.registrar().set_status(status).await {
            tracing::warn!(error = %error_chain(&error), %status, "could not publish the node's status");
        }
    }
}
