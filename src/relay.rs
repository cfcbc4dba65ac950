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
use tower::{Service, ServiceExt};

use crate::local::{CloseFrame, InboxItem, Phase, Pushed};
use crate::node::Node;
use crate::session::{HEADER_SESSION_TO, Kept, from_stored, stored_form};

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
        }
    }

    /// Logs `envelope` in `session` under `seq` as its owner `owner`, after the messages
    /// numbered before it; when the session moved, sends it there instead, placed in the
    /// broker's order after those before it too.
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
        let slot = self.local.slot(&owner);
        Box::pin(async move {
            if let Some(slot) = &slot {
                slot.turn_to_log(seq).await;
            }
            let moved = slot.as_ref().and_then(|slot| slot.moved_to());
            let kept = match moved {
                Some(next) => Kept::Moved(next),
                None => sessions.log(session, &owner, seq, &envelope).await,
            };
            let mark = || {
                if let Some(slot) = &slot {
                    slot.mark_logged(seq);
                }
            };
            match kept {
                Kept::Logged(_) | Kept::Failed => mark(),
                Kept::Moved(next) => {
                    self.session_moved(&owner, &next);
                    let confirming = self.place_on(&next, &envelope).await;
                    mark();
                    self.settle_sent_on(Some(session), next, envelope, hops, confirming)
                        .await;
                }
                Kept::Unknown => {
                    mark();
                    // The session ended or expired: a client away will never get it.
                    if slot.as_ref().is_some_and(|slot| slot.parked()) {
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

    /// Sends `envelope` to connection `next`, where its session went, as a node message to
    /// `next`'s node. When that node is gone, the message goes to the session's log, for the
    /// session's next owner.
    pub(crate) fn send_on(
        self: Arc<Self>,
        session: Option<SessionId>,
        next: ConnectionId,
        envelope: Arc<Envelope>,
        hops: u8,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let confirming = self.place_on(&next, &envelope).await;
            self.settle_sent_on(session, next, envelope, hops, confirming)
                .await;
        })
    }

    /// Places `envelope`, as a node message for connection `next`, in the broker's order
    /// (through the broker even to this node: into its queue, behind what other nodes sent on
    /// to the session before); returns its confirmation.
    async fn place_on(
        &self,
        next: &ConnectionId,
        envelope: &Envelope,
    ) -> Option<BoxFuture<'static, Result<(), ForwardError>>> {
        let payload = stored_form(envelope).ok()?;
        let mut outer = Envelope::new(
            self.id.clone(),
            Target::Node(next.node().clone()),
            PayloadKind::Binary,
            payload,
        );
        outer
            .headers
            .insert(HEADER_SESSION_TO.to_owned(), next.to_string());
        let mut forward = self.forward.clone();
        if forward.ready().await.is_err() {
            return None;
        }
        Some(Box::pin(forward.call(outer)))
    }

    /// Waits for a message sent on to `next` to be confirmed; when `next`'s node is gone, the
    /// session's log keeps it for whoever resumes the session next.
    async fn settle_sent_on(
        self: Arc<Self>,
        session: Option<SessionId>,
        next: ConnectionId,
        envelope: Arc<Envelope>,
        hops: u8,
        confirming: Option<BoxFuture<'static, Result<(), ForwardError>>>,
    ) {
        if let Some(confirming) = confirming
            && confirming.await.is_ok()
        {
            return;
        }
        let (Some(sessions), Some(session)) = (self.sessions.clone(), session) else {
            self.local.bounced.bounce_envelope(&envelope);
            return;
        };
        if hops >= MAX_HOPS {
            tracing::warn!(message_id = %envelope.id, "a message followed a session that kept moving: given up");
            return;
        }
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
