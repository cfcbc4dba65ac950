//! Stopping a node within its grace period, step by step: see
//! [`Cluster::shutdown`](crate::Cluster::shutdown).

use std::sync::atomic::Ordering;

use tokio::time::{Duration, Instant};

use crate::error::ClusterError;
use crate::node::Node;

/// Shuts `node` down: its clients closed, then the cluster left. Every step is taken even
/// when one fails, each within its part of the grace period; a failed shutdown can be called
/// again.
pub(super) async fn shutdown(node: &Node) -> Result<(), ClusterError> {
    if node.state.stopped.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    let grace = node.config.shutdown_grace;
    let deadline = Instant::now() + grace;
    // Clients get most of the period; the last quarter, at most 2 s, is kept for leaving.
    let leaving = (grace / 4).min(Duration::from_secs(2));
    node.close_clients(deadline - leaving).await;
    let deadline = deadline.max(Instant::now() + leaving / 2);
    let left = leave(node, deadline).await;
    let deadline = deadline.max(Instant::now() + leaving / 2);
    let deleted = within(deadline, "deleting the node's queue", delete_queue(node)).await;
    match left.and(deleted) {
        Ok(()) => {
            tracing::info!(node = %node.id, "node left the cluster");
            Ok(())
        }
        Err(error) => {
            node.state.stopped.store(false, Ordering::Release);
            Err(error)
        }
    }
}

/// Leaves discovery, stops receiving, answers the senders of messages that found their
/// connection closed, then stops the node's tasks.
async fn leave(node: &Node, deadline: Instant) -> Result<(), ClusterError> {
    let left = within(deadline, "leaving discovery", async {
        node.discovery
            .registrar()
            .leave()
            .await
            .map_err(ClusterError::from)
    })
    .await;
    // Receiving stops: what still waits in the queue stays there, for a peer to take over
    // and answer once it sees this node gone.
    let stopped = within(deadline, "stopping the receiver", async {
        node.stop_receiving().await;
        Ok(())
    })
    .await;
    // Messages that found their connection closed are answered before the tasks stop.
    let told = within(
        deadline,
        "telling senders of undeliverable messages",
        async {
            node.local.bounced.all_told().await;
            Ok(())
        },
    )
    .await;
    node.stop_tasks();
    left.and(stopped).and(told)
}

/// Deletes the node's queue, unless it still holds messages: those are left for a peer to
/// take over and answer. With sessions the queue stays whatever it holds: senders to a
/// session's old connection id publish there while it exists, and the peer that takes it over
/// sends them on in order, then deletes it once empty (its unsettled deliveries, back in the
/// queue, would go with a delete now).
async fn delete_queue(node: &Node) -> Result<(), ClusterError> {
    if node.sessions.is_some() {
        return Ok(());
    }
    let deleting = node.topology.broker().delete_queue_if_empty(&node.id);
    if !deleting.await? {
        tracing::info!(node = %node.id, "the node's queue still holds messages: left for a peer to take over and answer");
    }
    Ok(())
}

/// A step of a shutdown, cut short (and named in the log) at `deadline`.
async fn within(
    deadline: Instant,
    step: &'static str,
    doing: impl std::future::Future<Output = Result<(), ClusterError>>,
) -> Result<(), ClusterError> {
    match tokio::time::timeout_at(deadline, doing).await {
        Ok(done) => done,
        Err(_) => {
            tracing::warn!(
                step,
                "a shutdown step took too long: cut short (peers drop this node when its lease runs out; its queue expires on its own)"
            );
            Err(ClusterError::TimedOut(step))
        }
    }
}
