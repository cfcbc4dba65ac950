//! The background tasks of a running node, each named for its one job. Every task holds the
//! node weakly (it stops once the node is dropped) and is aborted by the node's drop or
//! shutdown.

use std::future::Future;
use std::sync::{Arc, Weak};

use hybrid_cluster_core::{ConsumerState, Deliveries, Envelope, NodeId, NodeInfo};
use hybrid_cluster_discovery::{MemberChange, Membership};
use hybrid_cluster_routing::{ReceiveConfig, Receiver};
use tokio::time::Duration;

use crate::node::Node;

/// A background task of the node.
pub(super) trait Task: Future<Output = ()> + Send + 'static {}
impl<T: Future<Output = ()> + Send + 'static> Task for T {}

/// Starts every task of `node`, the receiver reading `deliveries` among them.
pub(super) fn spawn_all(node: &Arc<Node>, deliveries: Deliveries) {
    node.spawn_receiver(receiving(node, deliveries));
    node.spawn(placing(node));
    node.spawn(unbinding(node));
    node.spawn(watching(node));
    node.spawn(notifying(node));
    if let Some(following) = following_consumer(node) {
        node.spawn(following);
    }
    if node.sessions.is_some() {
        node.spawn(keeping_sessions_alive(node));
    }
    if node.presence.is_some() {
        node.spawn(crate::presence::follow(Arc::downgrade(node)));
        node.spawn(crate::presence::keep_alive(Arc::downgrade(node)));
    }
}

/// Pushes back the expiry of the sessions whose clients are connected here, four times a
/// resume window, so that a session expires only a window after its client went.
fn keeping_sessions_alive(node: &Arc<Node>) -> impl Task + use<> {
    let weak = Arc::downgrade(node);
    async move {
        loop {
            let Some(node) = weak.upgrade() else { return };
            let Some(sessions) = node.sessions.clone() else {
                return;
            };
            let live = node.local.live_sessions();
            drop(node);
            if !live.is_empty()
                && let Err(error) = sessions.store.keep_alive(&live, &sessions.limits).await
            {
                tracing::warn!(error = %crate::error_chain(&error), sessions = live.len(), "could not keep the sessions of connected clients alive");
            }
            tokio::time::sleep(sessions.limits.resume_window / 4).await;
        }
    }
}

/// Hands what comes through the broker to the local connections. The receiver records its
/// outcomes (`hybrid_cluster_broker_deliveries_total`) itself, labelled with the node's id.
fn receiving(node: &Arc<Node>, deliveries: Deliveries) -> impl Task + use<> {
    let receive = ReceiveConfig {
        secret: node.config.secret.clone(),
        replay_window: node.config.replay_window,
        dedupe_window: node.config.dedupe_window,
        dedupe_memory: node.config.dedupe_memory,
    };
    let weak = Arc::downgrade(node);
    let destination = tower::service_fn(move |envelope: Envelope| {
        let node = Weak::upgrade(&weak);
        async move {
            match node {
                Some(node) => node
                    .deliver_incoming(envelope)
                    .map_err(hybrid_cluster_core::BoxError::from),
                None => Err("the node stopped".into()),
            }
        }
    });
    let node_id = node.id.clone();
    // Run now, not in the task: the receiver's metrics are registered with the recorder in
    // force when the node starts.
    let running = Receiver::with_config(deliveries, receive)
        .with_metric_labels([metrics::Label::new("node", node_id.to_string())])
        .run(destination);
    async move {
        if let Err(error) = running.await {
            tracing::error!(node = %node_id, %error, "stopped receiving messages");
        }
    }
}

/// Keeps placement's view of the cluster current.
fn placing(node: &Arc<Node>) -> impl Task + use<> {
    let placer = node.placer.clone();
    let discover = node.discovery.discover(|_: &NodeInfo| ());
    async move {
        if let Err(error) = placer.follow(discover).await {
            tracing::error!(%error, "placement stopped following discovery");
        }
    }
}

/// Unbinds the node's queue from the groups whose last local member left.
fn unbinding(node: &Arc<Node>) -> impl Task + use<> {
    let weak = Arc::downgrade(node);
    let local = Arc::clone(&node.local);
    async move {
        loop {
            let groups = local.departed_groups().await;
            let Some(node) = weak.upgrade() else { return };
            for group in groups {
                if let Err(error) = node.topology.remove_member(&group).await {
                    tracing::warn!(%group, %error, "could not unbind a group its last member left");
                }
            }
        }
    }
}

/// Follows the cluster's membership: counts joins and leaves, and takes over the queue of
/// each node that left (see [`takeover`](crate::takeover)).
fn watching(node: &Arc<Node>) -> impl Task + use<> {
    let metrics = node.metrics.clone();
    let mut members = node.discovery.view().subscribe();
    let weak = Arc::downgrade(node);
    async move {
        let mut known = Arc::new(Membership::default());
        let mut disagreeing = Vec::new();
        loop {
            let now = Arc::clone(&members.borrow_and_update());
            for change in now.changes_since(&known) {
                match change {
                    MemberChange::Joined(_) => metrics.discovery_change("join"),
                    MemberChange::Left(gone) => {
                        metrics.discovery_change("leave");
                        if let Some(node) = weak.upgrade() {
                            reap_presence(&node, &gone);
                            node.take_over_queue(gone);
                        }
                    }
                    // Back under a new run, the node consumes its own queue: nothing to take.
                    MemberChange::Restarted(_) => {}
                }
            }
            metrics.nodes(now.len());
            if let Some(node) = weak.upgrade() {
                disagreeing = warn_of_other_group_keys(&node, &disagreeing);
            }
            known = now;
            if members.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Takes away the presence of `gone`, a node that left, in a task of its own.
fn reap_presence(node: &Arc<Node>, gone: &NodeId) {
    if node.presence.is_none() || gone == &node.id {
        return;
    }
    let (weak, gone) = (Arc::downgrade(node), gone.clone());
    node.spawn(async move {
        if let Some(node) = weak.upgrade() {
            let _ = crate::presence::reap(&node, &gone).await;
        }
    });
}

/// Logs each peer newly seen to key group messages otherwise (of those not in `known`), sets
/// the gauge, and returns them all.
fn warn_of_other_group_keys(node: &Node, known: &[NodeId]) -> Vec<NodeId> {
    let disagreeing = node.peers_keying_groups_otherwise();
    for peer in disagreeing.iter().filter(|peer| !known.contains(peer)) {
        tracing::error!(
            %peer,
            ours = ?node.config.group_keys,
            "a peer keys group messages otherwise than this node: group messages between the \
             two are lost; every node of a cluster needs the same group keys"
        );
    }
    node.metrics.peers_with_other_group_keys(disagreeing.len());
    disagreeing
}

/// Answers the senders of unicasts that did not reach their connection (see
/// [`notice`](crate::notice)).
fn notifying(node: &Arc<Node>) -> impl Task + use<> {
    let weak = Arc::downgrade(node);
    let bounced = Arc::clone(&node.local.bounced);
    async move {
        loop {
            let batch = bounced.next().await;
            let Some(node) = weak.upgrade() else { return };
            crate::notice::send(&node.id, &node.local, &node.forward, batch).await;
            bounced.told();
        }
    }
}

/// An interruption shorter than this (a reconnect, a consumer restored at once) does not
/// degrade the node: every node of a cluster would otherwise flap on each broker blip.
const DEBOUNCE: Duration = Duration::from_secs(1);

/// Follows the node's consumer, when its broker tells how it is: the node is degraded while
/// it does not receive, for longer than [`DEBOUNCE`].
fn following_consumer(node: &Arc<Node>) -> Option<impl Task + use<>> {
    let mut states = node.topology.broker().consumer_state(&node.id)?;
    node.metrics.receiving(true);
    let weak = Arc::downgrade(node);
    Some(async move {
        loop {
            let interrupted = matches!(
                *states.borrow_and_update(),
                ConsumerState::Interrupted { .. }
            );
            if interrupted {
                let consuming = states.wait_for(|state| matches!(state, ConsumerState::Consuming));
                match tokio::time::timeout(DEBOUNCE, consuming).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(_)) => return,
                    Err(_) => {}
                }
            }
            let state = states.borrow_and_update().clone();
            let Some(node) = weak.upgrade() else { return };
            node.follow_consumer(state).await;
            drop(node);
            if states.changed().await.is_err() {
                return;
            }
        }
    })
}
