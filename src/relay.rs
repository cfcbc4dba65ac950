//! What a node does with a message for a connection that has a session: waits until the
//! session's log keeps it before the delivery is acknowledged, and sends it on to where the
//! session went when it moved (a node message to the session's node, read back by
//! [`Node::deliver_forwarded`]).

use std::sync::Arc;
use std::time::SystemTime;

use futures_core::future::BoxFuture;
use hybrid_cluster_core::{
    ConnectionId, DEFAULT_REPLAY_WINDOW, Envelope, NodeId, PayloadKind, SessionId, SessionRecord,
    Target,
};
use hybrid_cluster_routing::ForwardError;
use tower::{Service, ServiceExt};

use crate::local::{CloseFrame, InboxItem, Phase, Pushed};
use crate::node::Node;
use crate::session::{HEADER_SESSION_TO, Kept, from_stored, stored_form};
use crate::users::HEADER_DISCONNECT;

/// The close code of a connection whose session was resumed on another connection.
pub const CLOSE_SESSION_MOVED: u16 = 4002;

/// How many times a message follows a session that keeps moving before it is given up.
const MAX_HOPS: u8 = 4;

/// The most messages of one session logged in one step of the store.
const MAX_LOG_BATCH: usize = 256;

/// What a takeover of the queue of a node gone knows of it: its id, and the sessions it held
/// (read from the store once, on the first group message or broadcast that needs them).
pub(crate) struct Orphans {
    gone: NodeId,
    held: tokio::sync::OnceCell<Vec<SessionRecord>>,
}

impl Orphans {
    pub(crate) fn of(gone: NodeId) -> Self {
        Self {
            gone,
            held: tokio::sync::OnceCell::new(),
        }
    }
}

impl Node {
    /// What to wait for before acknowledging a message `pushed` to connection `to`'s inbox.
    pub(crate) fn settle_pushed(
        self: &Arc<Self>,
        to: &ConnectionId,
        pushed: Pushed,
    ) -> Option<BoxFuture<'static, ()>> {
        let node = Arc::clone(self);
        let to = to.clone();
        match pushed {
            Pushed::Queued | Pushed::Duplicate => None,
            Pushed::Held(kept) => Some(Box::pin(async move {
                let _ = kept.await;
            })),
            // The flusher in a task of its own: the log's order waits on it, whether or not
            // the caller waits.
            Pushed::Numbered { waiting, flush } => {
                if let Some(session) = flush {
                    tokio::spawn(node.flush_log(to, session));
                }
                Some(Box::pin(async move {
                    let _ = waiting.await;
                }))
            }
        }
    }

    /// Logs the messages numbered in the session of connection `owner`, as many at a time as
    /// have come, until none waits; when the session moved, sends them there instead, placed
    /// in the broker's order as they were numbered.
    async fn flush_log(self: Arc<Self>, owner: ConnectionId, session: SessionId) {
        let (Some(sessions), Some(slot)) = (self.sessions.clone(), self.local.slot(&owner)) else {
            return;
        };
        while let Some(batch) = slot.take_pending(MAX_LOG_BATCH) {
            let last = batch.last().map_or(0, |(seq, _, _)| *seq);
            let count = batch.len();
            let kept = match slot.moved_to() {
                Some(next) => Kept::Moved(next),
                None => {
                    let envelopes = batch.iter().map(|(seq, envelope, _)| (*seq, &**envelope));
                    sessions.log(session, &owner, envelopes).await
                }
            };
            let outcome = match &kept {
                Kept::Logged(_) => "logged",
                Kept::Moved(_) => "moved",
                Kept::Unknown => "unknown",
                Kept::Failed => "failed",
            };
            self.metrics.session_messages(outcome, count);
            match kept {
                Kept::Logged(_) | Kept::Failed => {
                    slot.mark_logged(last);
                    for (_, _, done) in batch {
                        let _ = done.send(());
                    }
                }
                Kept::Moved(next) => {
                    self.session_moved(&owner, &next);
                    let mut placed = Vec::with_capacity(batch.len());
                    for (_, envelope, done) in batch {
                        placed.push((self.place_on(&next, &envelope).await, envelope, done));
                    }
                    slot.mark_logged(last);
                    for (confirming, envelope, done) in placed {
                        let node = Arc::clone(&self);
                        node.settle_sent_on(Some(session), next.clone(), envelope, 0, confirming)
                            .await;
                        let _ = done.send(());
                    }
                }
                Kept::Unknown => {
                    slot.mark_logged(last);
                    // The session ended or expired: a client away will never get these.
                    let away = slot.parked();
                    if away {
                        self.local.forget(&owner);
                    }
                    for (_, envelope, done) in batch {
                        if away {
                            self.local.bounced.bounce_envelope(&envelope);
                        }
                        let _ = done.send(());
                    }
                }
            }
        }
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
    ) -> BoxFuture<'static, ()> {
        let pushed = if to.incarnation() == self.incarnation {
            self.local
                .deliver_to(&to, InboxItem::Message(Arc::clone(&envelope)))
        } else {
            Err(crate::local::Refused::NotFound)
        };
        match pushed {
            Ok(pushed) => self
                .settle_pushed(&to, pushed)
                .unwrap_or_else(|| Box::pin(std::future::ready(()))),
            Err(_) => {
                self.local.bounced.bounce_envelope(&envelope);
                Box::pin(std::future::ready(()))
            }
        }
    }

    /// Answers a message found in the queue of `gone`, a node gone: a unicast is kept for
    /// the session of its connection (in its log, or sent where the session is now), or its
    /// sender told; a group message or broadcast is kept for the sessions `gone` held that it
    /// is for.
    /// What a takeover of `gone`'s queue does with each message it reads: see
    /// [`take_in_orphan`](Node::take_in_orphan). Holds the node weakly.
    pub(crate) fn orphan_taker(
        self: &Arc<Self>,
        gone: NodeId,
    ) -> impl Fn(Envelope) -> BoxFuture<'static, ()> + Send + Sync + 'static {
        let (node, orphans) = (Arc::downgrade(self), Arc::new(Orphans::of(gone)));
        move |envelope: Envelope| -> BoxFuture<'static, ()> {
            match node.upgrade() {
                Some(node) => node.take_in_orphan(Arc::clone(&orphans), envelope),
                None => Box::pin(std::future::ready(())),
            }
        }
    }

    pub(crate) fn take_in_orphan(
        self: Arc<Self>,
        orphans: Arc<Orphans>,
        envelope: Envelope,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let Target::Connection(to) = envelope.target.clone() else {
                self.take_in_fan_out(&orphans, envelope).await;
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

    /// Keeps a group message or broadcast of the queue of `gone` for the sessions `gone` held
    /// that it is for (its own were delivered there when sent).
    async fn take_in_fan_out(self: Arc<Self>, orphans: &Orphans, envelope: Envelope) {
        let Some(sessions) = self.sessions.clone() else {
            return;
        };
        let gone = &orphans.gone;
        if envelope.origin == *gone {
            return;
        }
        let reading = orphans
            .held
            .get_or_try_init(|| sessions.store.sessions_on(gone));
        let held = match reading.await {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(node = %gone, error = %crate::error_chain(&error), "could not find the sessions of a node gone: its queue's group messages and broadcasts do not reach them");
                return;
            }
        };
        let envelope = Arc::new(envelope);
        // A user disconnected while their node was gone: their sessions end, nothing is kept.
        let disconnects = envelope.headers.contains_key(HEADER_DISCONNECT);
        for record in held.iter() {
            let member = match &envelope.target {
                Target::Broadcast => true,
                Target::Group(group) => record.groups.contains(group),
                Target::Connection(_) | Target::Node(_) => false,
            };
            if !member {
                continue;
            }
            if disconnects {
                if let Err(error) = sessions.store.end(record.id, &record.owner).await {
                    tracing::warn!(error = %crate::error_chain(&error), "could not end the session of a user disconnected while their node was gone: it expires with its window");
                }
                continue;
            }
            let logging = sessions.log_orphan(record.id, &record.owner, &envelope);
            if let Kept::Moved(next) = logging.await {
                let node = Arc::clone(&self);
                node.send_on(Some(record.id), next, Arc::clone(&envelope), 0)
                    .await;
            }
        }
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
        Some(Arc::clone(self).deliver_moved(to, Arc::new(inner)))
    }
}
