//! A user's connections across the cluster: each joins the user's own (reserved) group, so a
//! message to the user is a group message, routed by the broker to exactly the nodes where
//! the user has a connection, once each, and a disconnect is one too, carrying
//! [`HEADER_DISCONNECT`].

use std::sync::Arc;

use hybrid_cluster_core::{Envelope, GroupName, UserId};

use crate::local::CloseFrame;
use crate::node::Node;
use crate::shutdown::MAX_CLOSE_REASON;

/// The close code of a connection whose user was disconnected ([`ClusterHandle::disconnect_user`](crate::ClusterHandle::disconnect_user)),
/// with the reason given: 4003. Its session, if any, ends: a client told this should not
/// reconnect on its own.
pub const CLOSE_USER_DISCONNECTED: u16 = 4003;

/// The header of a message to a user's group that disconnects the user, its value the reason
/// for the close frame.
pub(crate) const HEADER_DISCONNECT: &str = "disconnect";

/// `reason` cut to fit a close frame, on a character boundary.
pub(crate) fn fit_reason(reason: &str) -> String {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

impl Node {
    /// Disconnects the user of `group` here when `envelope` says so; returns whether it did
    /// (the message is then taken: nothing to deliver).
    pub(crate) fn took_disconnect(
        self: &Arc<Self>,
        group: &GroupName,
        envelope: &Envelope,
    ) -> bool {
        let (Some(reason), Some(user)) = (envelope.headers.get(HEADER_DISCONNECT), group.user())
        else {
            return false;
        };
        self.disconnect_local(&user, reason);
        true
    }

    /// Closes every connection of `user` on this node with [`CLOSE_USER_DISCONNECTED`] and
    /// `reason`, ending their sessions; returns how many there were.
    pub(crate) fn disconnect_local(self: &Arc<Self>, user: &UserId, reason: &str) -> usize {
        let connections = self.local.connections_of(user);
        for id in &connections {
            let Some(slot) = self.local.slot(id) else {
                continue;
            };
            if let (Some(sessions), Some(session)) = (&self.sessions, slot.take_session()) {
                let (store, id) = (Arc::clone(&sessions.store), id.clone());
                self.spawn(async move {
                    if let Err(error) = store.end(session.id, &id).await {
                        tracing::warn!(connection = %id, error = %crate::error_chain(&error), "could not end the session of a disconnected user: it expires with its window");
                    }
                });
            }
            slot.close(CloseFrame {
                code: CLOSE_USER_DISCONNECTED,
                reason: fit_reason(reason),
            });
            // A parked session's connection has no client to close: it goes now.
            self.local.forget(id);
        }
        connections.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_cut_to_a_close_frame_on_a_character_boundary() {
        assert_eq!(fit_reason("banned"), "banned");
        let long = "é".repeat(100);
        let fitted = fit_reason(&long);
        assert!(fitted.len() <= MAX_CLOSE_REASON);
        assert!(long.starts_with(&fitted));
        assert_eq!(fitted.len(), 122);
    }
}
