//! Admission: what becomes of a new WebSocket client.

use std::sync::Arc;

use hybrid_cluster_balance::{Placement, Redirect};
use hybrid_cluster_core::UserId;

use super::in_band::RedirectReason;
use crate::cluster::accepts_here;
use crate::handle::{ClusterConnection, ClusterHandle};
use crate::node::Node;

/// What the cluster layer decided for one upgrade request.
pub(crate) enum Admission {
    /// Serve it here, as this connection.
    Accept(ClusterConnection),
    /// Send the client to this URL, for this reason.
    Redirect {
        /// The other node's WebSocket URL.
        url: String,
        /// Why not this node.
        reason: RedirectReason,
    },
    /// No node has room.
    Unavailable,
}

/// Decides what becomes of a new WebSocket client of `node`, of `user` when its upgrade said
/// who: the balancer's placement, and the node's own limits (a draining node, or one at its
/// connection limit, never accepts).
pub(crate) fn admit(node: &Arc<Node>, user: Option<UserId>) -> Admission {
    match node.placer.place() {
        Placement::Accept if accepts_here(node) => {
            let id = node.ids.next_id();
            let inbox = node.local.register(id.clone(), user.clone());
            node.metrics.upgrade("accepted");
            tracing::debug!(connection = %id, "accepted a WebSocket client");
            let handle = ClusterHandle::new(Arc::clone(node), Some(id));
            Admission::Accept(ClusterConnection::new(handle, inbox).of_user(user))
        }
        Placement::Redirect(redirect) => redirect_to(node, &redirect),
        // The balancer would keep the client, but this node cannot (draining, or full with
        // clients its view has not counted yet): another node with room takes it.
        Placement::Accept => match node.placer.spread(1).pop().flatten() {
            Some(redirect) => redirect_to(node, &redirect),
            None => refuse(node),
        },
        Placement::Refuse(_) => refuse(node),
    }
}

fn redirect_to(node: &Node, redirect: &Redirect) -> Admission {
    node.metrics.upgrade("redirected");
    tracing::debug!(to = %redirect.node, "redirecting a WebSocket client");
    Admission::Redirect {
        url: redirect.ws_url(),
        reason: redirect_reason(node),
    }
}

fn refuse(node: &Node) -> Admission {
    node.metrics.upgrade("refused");
    Admission::Unavailable
}

/// Why a client placed on another node is not kept here.
fn redirect_reason(node: &Node) -> RedirectReason {
    if node.is_draining() {
        RedirectReason::Draining
    } else if node.local.len() >= node.config.max_connections as usize {
        RedirectReason::Full
    } else {
        RedirectReason::Balance
    }
}
