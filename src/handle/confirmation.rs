//! A started send's outcome.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use hybrid_cluster_core::MessageId;

use crate::error::SendError;

/// A send that was started: resolves once the message is in its local inboxes and confirmed
/// by the broker, or with the reason it failed.
#[must_use = "a confirmation holds a place of the node's bound on unconfirmed messages until it is polled to the end"]
pub struct Confirmation {
    pub(super) id: MessageId,
    pub(super) outcome: BoxFuture<'static, Result<MessageId, SendError>>,
}

impl Confirmation {
    /// The id of the message, known as soon as it is started.
    pub fn message_id(&self) -> MessageId {
        self.id
    }
}

impl fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Confirmation")
            .field("message_id", &self.id)
            .finish_non_exhaustive()
    }
}

impl std::future::Future for Confirmation {
    type Output = Result<MessageId, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.outcome.as_mut().poll(cx)
    }
}
