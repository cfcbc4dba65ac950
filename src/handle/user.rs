//! Sending to a user (every connection of theirs, on every node) and disconnecting one: see
//! [`crate::users`].

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use hybrid_cluster_core::{GroupName, MessageId, PayloadKind, Target, UserId};
use hybrid_cluster_routing::ForwardError;

use super::{ClusterHandle, Confirmation, OrderedSender, Payload, after_kept, invalid_or};
use crate::error::SendError;
use crate::users::{HEADER_DISCONNECT, fit_reason};

impl ClusterHandle {
    /// Sends `payload` to every connection of `user`, on every node, once each, and returns
    /// the message's id once this node's connections have it and the broker confirmed it for
    /// the others. Fails with [`SendError::UserNotFound`] when the user has no connection
    /// anywhere (none here, and no node's queue bound to the user's group), and as a group
    /// message does otherwise.
    ///
    /// Receivers see it from this handle's connection (if any), in their inbox as a message
    /// whose target is [`GroupName::of_user`]; the node server renders it as
    /// `{"type":"message","from":…,"user":…,"data":…}`.
    pub async fn send_user(
        &self,
        user: &UserId,
        payload: impl Into<Payload>,
    ) -> Result<MessageId, SendError> {
        let mut sender = self.ordered();
        sender.ready().await?;
        sender.send_user(user, payload).await
    }

    /// Closes every connection of `user`, on every node, with close code
    /// [`CLOSE_USER_DISCONNECTED`](crate::CLOSE_USER_DISCONNECTED) and `reason` (cut to the
    /// 123 bytes of a close frame); their sessions end. Returns once this node's connections
    /// are closing and the broker confirmed the others'. [`SendError::UserNotFound`] when the
    /// user has no connection anywhere.
    pub async fn disconnect_user(&self, user: &UserId, reason: &str) -> Result<(), SendError> {
        let mut sender = self.ordered();
        sender.ready().await?;
        let here = self.node.disconnect_local(user, reason);
        let group = GroupName::of_user(user);
        let mut envelope = self.envelope(Target::Group(group), PayloadKind::Text, Bytes::new());
        envelope.headers = BTreeMap::from([(HEADER_DISCONNECT.to_owned(), fit_reason(reason))]);
        let user = user.clone();
        sender
            .publish("user", envelope, move |error| {
                not_found_unless(here, user, error)
            })
            .await
            .map(|_| ())
    }
}

/// A message for a user's group that no node was bound to: fine when `here` connections of
/// the user on this node had it, `UserNotFound` otherwise.
fn not_found_unless(here: usize, user: UserId, error: ForwardError) -> Result<(), SendError> {
    match error {
        ForwardError::Unroutable { .. } if here > 0 => Ok(()),
        ForwardError::Unroutable { .. } => Err(SendError::UserNotFound { user }),
        error => Err(invalid_or(error, SendError::Broadcast)),
    }
}

impl OrderedSender {
    /// Starts sending `payload` to every connection of `user` (see
    /// [`ClusterHandle::send_user`]) and returns its [`Confirmation`] at once; like a group
    /// message, it needs the place [`ready`](OrderedSender::ready) reserved.
    pub fn send_user(&mut self, user: &UserId, payload: impl Into<Payload>) -> Confirmation {
        let (kind, bytes) = payload.into().into_parts();
        let group = GroupName::of_user(user);
        let envelope = self
            .handle
            .envelope(Target::Group(group.clone()), kind, bytes);
        let shared = Arc::new(envelope.clone());
        let node = &self.handle.node;
        let fanned = node.local.deliver_group(&group, &shared);
        let here = fanned.count;
        let kept = node.settle_fanned(fanned);
        let user = user.clone();
        let confirmation = self.publish("user", envelope, move |error| {
            not_found_unless(here, user, error)
        });
        after_kept(confirmation, kept)
    }
}
