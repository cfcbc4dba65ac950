//! What a node does with a message for a connection that has a session: waits until the
//! session's log keeps it before the delivery is acknowledged, and sends it on to where the
//! session went when it moved (a node message to the session's node, read back by
//! [`Node::deliver_forwarded`]).

use std::sync::Arc;
use std::time::SystemTime;

use futures_core::future::BoxFuture;
use hybrid_cluster_core::{
    ConnectionId, DEFAULT_REPLAY_WINDOW, Envelope, PayloadKind, SessionId, Target,
};
use hybrid_cluster_routing::ForwardError;
use tower::ServiceExt;

use super::{HEADER_SESSION_TO, Kept, from_stored, stored_form};
use crate::local::{CloseFrame, InboxItem, Phase, Pushed};
use crate::node::Node;

/// The close code of a connection whose session was resumed on another connection.
pub const CLOSE_SESSION_MOVED: u16 = 4002;

/// How many times a message follows a session that keeps moving before it is given up.
const MAX_HOPS: u8 = 4;

impl Node {
    /// What to wait for before acknowledging a message `pushed` to connection `to`'s inbox.
    pub(crate) fn settle_pushed(
        self: &Arc<Self>,
        to: &ConnectionId,
        pushed: Pushed,
        envelope: Arc<Envelope>,
    ) -> Option<BoxFuture<'static, ()>> {
        let node = Arc::clone(self);
        let to = to.clone();
        match pushed {
            Pushed::Queued | Pushed::Duplicate => None,
            Pushed::Held(kept) => Some(Box::pin(async move {
                let _ = kept.await;
            })),
            // In a task of its own: the log's order waits on it, whether or not its caller
            // waits for it.
            Pushed::Numbered(session, seq) => {
                let keeping = tokio::spawn(node.keep(to, session, seq, envelope, 0));
                Some(Box::pin(async move {
                    let _ = keeping.await;
                }))
            }
            Pushed::Moved(next) => {
                let session = node
                    .local
                    .slot(&to)
                    .and_then(|slot| slot.with_session(|s| s.id));
                Some(node.send_on(session, next, envelope, 0))
            }
        }
    }

    /// Logs `envelope` in `session` under `seq` as its owner `owner`; when the session moved,
    /// sends it there.
    fn keep(
        self: Arc<Self>,
        owner: ConnectionId,
        session: SessionId,
        seq: u64,
        envelope: Arc<Envelope>,
        hops: u8,
    ) -> BoxFuture<'static, ()> {
        let Some(sessions) = self.sessions.clone() else {
            return Box::pin(std::future::ready(()));
        };
        let logging = sessions.log(session, &owner, seq, &envelope);
        let slot = self.local.slot(&owner);
        Box::pin(async move {
            if let Some(slot) = &slot {
                slot.turn_to_log(seq).await;
            }
            let kept = logging.await;
            if let Some(slot) = &slot {
                slot.mark_logged(seq);
            }
            match kept {
                Kept::Logged(_) | Kept::Failed => {}
                Kept::Moved(next) => {
                    self.session_moved(&owner, &next);
                    self.send_on(Some(session), next, envelope, hops).await;
                }
                Kept::Unknown => {
                    // The session ended or expired: a client away will never get it.
                    if self.local.slot(&owner).is_some_and(|slot| slot.parked()) {
                        self.local.forget(&owner);
                        self.local.bounced.bounce_envelope(&envelope);
                    }
                }
            }
        })
    }

    /// The session of connection `owner` was resumed as `next`: what comes for `owner` goes
    /// there from now on (for the resume window), `owner` leaves its groups, and a client still
    /// connected as `owner` is closed (4002).
    fn session_moved(&self, owner: &ConnectionId, next: &ConnectionId) {
        let Some(slot) = self.local.slot(owner) else {
            return;
        };
        let live = !slot.parked();
        slot.with_session(|session| session.phase = Phase::Moved(next.clone()));
        // Its groups are the new connection's now.
        self.local.leave_all(owner);
        if live {
            slot.close(CloseFrame {
                code: CLOSE_SESSION_MOVED,
                reason: "session resumed on another connection".to_owned(),
            });
            tracing::info!(connection = %owner, to = %next, "a session moved: its old connection is closed");
        }
    }

    /// Sends `envelope` to connection `next`, where its session went: here, or as a node
    /// message to `next`'s node. When that node is gone, the message goes to the session's
    /// log, for the session's next owner.
    pub(crate) fn send_on(
        self: Arc<Self>,
        session: Option<SessionId>,
        next: ConnectionId,
        envelope: Arc<Envelope>,
        hops: u8,
    ) -> BoxFuture<'static, ()> {
        if hops >= MAX_HOPS {
            tracing::warn!(message_id = %envelope.id, "a message followed a session that kept moving: given up");
            return Box::pin(std::future::ready(()));
        }
        if next.node() == &self.id {
            return self.deliver_moved(next, envelope, hops + 1);
        }
        Box::pin(self.publish_on(session, next, envelope, hops))
    }

    /// Sends `envelope` on to `next` on another node (see [`Node::send_on`]).
    async fn publish_on(
        self: Arc<Self>,
        session: Option<SessionId>,
        next: ConnectionId,
        envelope: Arc<Envelope>,
        hops: u8,
    ) {
        let Ok(payload) = stored_form(&envelope) else {
            return;
        };
        let mut outer = Envelope::new(
            self.id.clone(),
            Target::Node(next.node().clone()),
            PayloadKind::Binary,
            payload,
        );
        outer
            .headers
            .insert(HEADER_SESSION_TO.to_owned(), next.to_string());
        let publishing: BoxFuture<'static, Result<(), ForwardError>> =
            Box::pin(self.forward.clone().oneshot(outer));
        if publishing.await.is_ok() {
            return;
        }
        // Its node is gone: the session's log keeps it for whoever resumes it next.
        let (Some(sessions), Some(session)) = (self.sessions.clone(), session) else {
            self.local.bounced.bounce_envelope(&envelope);
            return;
        };
        let logging = sessions.log_orphan(session, &next, &envelope);
        match logging.await {
            Kept::Moved(further) => {
                self.send_on(Some(session), further, envelope, hops + 1)
                    .await
            }
            Kept::Unknown => self.local.bounced.bounce_envelope(&envelope),
            Kept::Logged(_) | Kept::Failed => {}
        }
    }

    /// Puts a message that followed its session in the session's inbox here.
    fn deliver_moved(
        self: Arc<Self>,
        to: ConnectionId,
        envelope: Arc<Envelope>,
        hops: u8,
    ) -> BoxFuture<'static, ()> {
        let pushed = if to.incarnation() == self.incarnation {
            self.local
                .deliver_to(&to, InboxItem::Message(Arc::clone(&envelope)))
        } else {
            Err(crate::local::Refused::NotFound)
        };
        match pushed {
            Ok(Pushed::Numbered(session, seq)) => {
                let keeping = tokio::spawn(self.keep(to, session, seq, envelope, hops));
                Box::pin(async move {
                    let _ = keeping.await;
                })
            }
            Ok(pushed) => self
                .settle_pushed(&to, pushed, envelope)
                .unwrap_or_else(|| Box::pin(std::future::ready(()))),
            Err(_) => {
                self.local.bounced.bounce_envelope(&envelope);
                Box::pin(std::future::ready(()))
            }
        }
    }

    /// Answers a unicast found in the queue of a node gone: kept for the session of its
    /// connection (in its log, or sent where the session is now), or its sender told.
    pub(crate) fn take_in_orphan(self: Arc<Self>, envelope: Envelope) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let Target::Connection(to) = envelope.target.clone() else {
                return;
            };
            if crate::notice::read(&envelope).is_some() {
                return;
            }
            if let Some(sessions) = self.sessions.clone()
                && let Some(session) = sessions.session_of(&to).await
            {
                let envelope = Arc::new(envelope);
                match sessions.log_orphan(session, &to, &envelope).await {
                    Kept::Logged(_) => {}
                    Kept::Moved(next) => self.send_on(Some(session), next, envelope, 0).await,
                    Kept::Unknown | Kept::Failed => self.local.bounced.bounce_envelope(&envelope),
                }
                return;
            }
            self.local.bounced.bounce_envelope(&envelope);
        })
    }

    /// Reads a node message that carries a session's message to its connection here.
    pub(crate) fn deliver_forwarded(
        self: &Arc<Self>,
        outer: &Envelope,
    ) -> Option<BoxFuture<'static, ()>> {
        let to: ConnectionId = outer.headers.get(HEADER_SESSION_TO)?.parse().ok()?;
        if to.node() != &self.id {
            return None;
        }
        let inner = match from_stored(outer.payload.clone()) {
            Ok(inner) => inner,
            Err(error) => {
                tracing::warn!(from = %outer.origin, %error, "a forwarded session message is malformed: dropped");
                return None;
            }
        };
        let authentic = self.config.secret.as_ref().is_none_or(|secret| {
            inner
                .verify(secret, SystemTime::now(), DEFAULT_REPLAY_WINDOW * 10)
                .is_ok()
        });
        if !authentic {
            tracing::warn!(from = %outer.origin, "a forwarded session message failed authentication: dropped");
            return None;
        }
        Some(Arc::clone(self).deliver_moved(to, Arc::new(inner), 0))
    }
}
