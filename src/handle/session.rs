//! Opening a connection's session: a new one, or one its client resumes with its token and the
//! last `seq` it has (see [`ClusterConnection::open_session`]).

use std::sync::Arc;

use hybrid_cluster_core::{RegistryError, SessionId, SessionRecord};

use super::{ClusterConnection, ClusterHandle};
use crate::local::{InboxItem, InboxSlot, Phase, SlotSession};
use crate::node::Node;
use crate::session::from_stored;

/// What a client asked to resume: its session's token, and the last `seq` it has.
#[derive(Clone, PartialEq, Eq)]
pub struct ResumeRequest {
    /// The token the `welcome` of its earlier connection carried.
    pub token: String,
    /// The `seq` of the last message it has (0: none).
    pub last_seq: u64,
}

impl std::fmt::Debug for ResumeRequest {
    // A token is a credential: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeRequest")
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

impl ResumeRequest {
    /// Reads `resume=TOKEN&last=N` from a request's query (`last` defaults to 0); `None` when
    /// it asks for no resume.
    pub fn from_query(query: &str) -> Option<Self> {
        let mut token = None;
        let mut last_seq = 0;
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "resume" => token = Some(value.into_owned()),
                "last" => last_seq = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        Some(Self {
            token: token.filter(|token| !token.is_empty())?,
            last_seq,
        })
    }
}

/// A connection's session, opened.
#[derive(Clone, PartialEq, Eq)]
pub struct OpenedSession {
    /// Its id.
    pub id: SessionId,
    /// What its client resumes it with: give it to the client (the node program's `welcome`
    /// carries it as `session`).
    pub token: String,
    /// What became of the resume the client asked for, if it asked.
    pub resumed: Option<Resumed>,
}

impl std::fmt::Debug for OpenedSession {
    // Neither the token nor the id: without a cluster secret the id is the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedSession")
            .field("resumed", &self.resumed)
            .finish_non_exhaustive()
    }
}

/// What became of a resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// Whether the session was resumed with nothing missed: `false` when the token was
    /// invalid, the session unknown or expired, or its log no longer held every message past
    /// the client's last `seq` (the connection then has a new session).
    pub recovered: bool,
    /// How many messages the client had missed: the inbox hands them out first, in order,
    /// with their `seq` ([`Inbox::last_seq`](crate::Inbox::last_seq)).
    pub missed: usize,
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The cluster runs without sessions ([`ClusterConfig::sessions`](crate::ClusterConfig)).
    #[error("sessions are off in this cluster")]
    Disabled,
    /// The connection is gone, or opened its session already.
    #[error("the connection is gone or has a session already")]
    NotAvailable,
    /// The session store could not be reached.
    #[error("the session store failed")]
    Store(#[from] RegistryError),
}

impl ClusterConnection {
    /// Opens this connection's session, which outlives the connection: every message for
    /// the connection (sent to it, to one of its groups, or broadcast) gets the next `seq`
    /// of the session and is kept in the session's log before its delivery is acknowledged;
    /// when the connection ends without its client ending the session
    /// ([`ClusterHandle::end_session`](crate::ClusterHandle::end_session)), the session
    /// waits for the client for the resume window, still taking its messages.
    ///
    /// When the upgrade asked to resume a session (`?resume=TOKEN&last=N`, read by the
    /// cluster layer, or [`with_resume`](ClusterConnection::with_resume)), this connection
    /// takes it over, wherever it was: the messages past `N` are queued first in the inbox,
    /// in order and with their `seq`, its groups are joined again, and messages sent to the
    /// session's earlier connection ids reach this one. When nothing missed can be proven
    /// (the token is invalid, the session unknown or expired, its log trimmed past `N`), the
    /// connection gets a new session and [`Resumed::recovered`] is false.
    pub async fn open_session(&mut self) -> Result<OpenedSession, SessionError> {
        let node = Arc::clone(self.handle.node());
        let sessions = node.sessions.clone().ok_or(SessionError::Disabled)?;
        let id = self.id().clone();
        let slot = node.local.slot(&id).ok_or(SessionError::NotAvailable)?;
        if slot.with_session(|_| ()).is_some() {
            return Err(SessionError::NotAvailable);
        }
        let Some(request) = self.resume.take() else {
            let opened = new_session(&node, &slot, Vec::new()).await?;
            node.metrics.session_opened("new");
            return Ok(opened);
        };
        let Ok(session) = sessions.verify(&request.token) else {
            tracing::info!(connection = %id, "a resume with an invalid token: a new session");
            node.metrics.session_opened("not_recovered");
            return new_session(&node, &slot, Vec::new())
                .await
                .map(not_recovered);
        };
        let opened = resume(&mut self.handle, &node, &slot, session, request.last_seq).await;
        if let Ok(OpenedSession {
            resumed: Some(resumed),
            ..
        }) = &opened
        {
            let outcome = if resumed.recovered {
                "recovered"
            } else {
                "not_recovered"
            };
            node.metrics.session_opened(outcome);
        }
        opened
    }
}

/// Resumes `session` on the connection of `slot` for a client whose last `seq` is `last`.
async fn resume(
    handle: &mut super::ClusterHandle,
    node: &Arc<Node>,
    slot: &Arc<InboxSlot>,
    session: SessionId,
    last: u64,
) -> Result<OpenedSession, SessionError> {
    let sessions = node.sessions.clone().ok_or(SessionError::Disabled)?;
    let id = slot.id.clone();
    let resuming = Phase::Resuming { held: Vec::new() };
    slot.start_session(SlotSession::new(session, 0, resuming));
    let before = match sessions.store.claim(session, &id, &sessions.limits).await {
        Ok(Some(before)) => before,
        Ok(None) => {
            let held = take_held(slot);
            return new_session(node, slot, held).await.map(not_recovered);
        }
        Err(error) => {
            // No session: what came meanwhile is queued plainly, and its senders told when
            // the connection closes.
            let held = take_held(slot);
            slot.take_session();
            release(node, slot, held);
            return Err(error.into());
        }
    };
    let Some(missed) = missed_messages(node, &before, last).await else {
        // Never the session's id: without a cluster secret it is the token itself.
        tracing::info!(connection = %id, "a resume past what the session's log holds: a new session");
        let _ = sessions.store.end(session, &id).await;
        let held = take_held(slot);
        return new_session(node, slot, held).await.map(not_recovered);
    };
    let count = missed.len();
    replay(node, slot, missed, before.last_seq);
    // A user's own group is the new connection's identity's to join, not the session's.
    for group in before.groups.iter().filter(|group| !group.is_reserved()) {
        if let Err(error) = handle.join(group).await {
            tracing::warn!(connection = %id, %group, error = %crate::error_chain(&error), "a resumed session could not join one of its groups again");
        }
    }
    tracing::debug!(connection = %id, missed = count, "a session resumed");
    Ok(OpenedSession {
        id: session,
        token: sessions.token(session),
        resumed: Some(Resumed {
            recovered: true,
            missed: count,
        }),
    })
}

/// Queues the `missed` messages of a resumed session, numbering on after `last_seq`, then
/// what came meanwhile.
fn replay(node: &Arc<Node>, slot: &Arc<InboxSlot>, missed: Vec<(InboxItem, u64)>, last_seq: u64) {
    let ids: Vec<_> = missed
        .iter()
        .filter_map(|(item, _)| item_id(item))
        .collect();
    slot.queue_numbered(missed);
    let held = slot
        .with_session(|state| {
            for id in ids {
                state.first_time(id);
            }
            state.seq = last_seq;
            state.logged = last_seq;
            std::mem::replace(&mut state.phase, Phase::Live)
        })
        .map(|phase| match phase {
            Phase::Resuming { held } => held,
            _ => Vec::new(),
        })
        .unwrap_or_default();
    release(node, slot, held);
}

fn not_recovered(mut opened: OpenedSession) -> OpenedSession {
    opened.resumed = Some(Resumed {
        recovered: false,
        missed: 0,
    });
    opened
}

fn item_id(item: &InboxItem) -> Option<hybrid_cluster_core::MessageId> {
    match item {
        InboxItem::Message(envelope) => Some(envelope.id),
        _ => None,
    }
}

/// Messages that came while a resume was under way, with their waiters.
type Held = Vec<(InboxItem, tokio::sync::oneshot::Sender<()>)>;

fn take_held(slot: &InboxSlot) -> Held {
    slot.with_session(
        |state| match std::mem::replace(&mut state.phase, Phase::Live) {
            Phase::Resuming { held } => held,
            _ => Vec::new(),
        },
    )
    .unwrap_or_default()
}

/// A new session for the connection of `slot`, numbering `held` first.
async fn new_session(
    node: &Arc<Node>,
    slot: &Arc<InboxSlot>,
    held: Held,
) -> Result<OpenedSession, SessionError> {
    let sessions = node.sessions.clone().ok_or(SessionError::Disabled)?;
    let session = SessionId::random();
    let record = SessionRecord {
        id: session,
        owner: slot.id.clone(),
        groups: node.local.groups_of(&slot.id),
        last_seq: 0,
        first_seq: 1,
    };
    sessions.store.create(&record, &sessions.limits).await?;
    slot.start_session(SlotSession::new(session, 0, Phase::Live));
    release(node, slot, held);
    Ok(OpenedSession {
        id: session,
        token: sessions.token(session),
        resumed: None,
    })
}

/// Numbers and logs the messages held while a resume was under way, telling each waiter once
/// its message is kept.
fn release(node: &Arc<Node>, slot: &Arc<InboxSlot>, held: Held) {
    for (item, kept) in held {
        let waiting = slot
            .push(item)
            .ok()
            .and_then(|pushed| node.settle_pushed(&slot.id, pushed));
        tokio::spawn(async move {
            if let Some(waiting) = waiting {
                waiting.await;
            }
            let _ = kept.send(());
        });
    }
}

/// The messages of the session past `last`, if the log proves none is missing.
async fn missed_messages(
    node: &Node,
    before: &SessionRecord,
    last: u64,
) -> Option<Vec<(InboxItem, u64)>> {
    let sessions = node.sessions.as_ref()?;
    if last > before.last_seq || last + 1 < before.first_seq {
        return None;
    }
    let entries = sessions.store.read(before.id, last).await.ok()?;
    let contiguous = entries.len() as u64 == before.last_seq - last
        && entries
            .iter()
            .zip(last + 1..)
            .all(|(entry, seq)| entry.seq == seq);
    if !contiguous {
        return None;
    }
    entries
        .into_iter()
        .map(|entry| {
            let envelope = from_stored(entry.bytes).ok()?;
            Some((InboxItem::Message(Arc::new(envelope)), entry.seq))
        })
        .collect()
}

impl ClusterHandle {
    /// Ends the session of this handle's connection for good (its client said goodbye): the
    /// session and its log go at once, and the connection, when it closes, is not waited for.
    /// Nothing happens when the connection has no session.
    pub async fn end_session(&self) -> Result<(), SessionError> {
        let id = self.sender().map_err(|_| SessionError::NotAvailable)?;
        let (Some(sessions), Some(slot)) = (&self.node.sessions, self.node.local.slot(id)) else {
            return Ok(());
        };
        let Some(session) = slot.take_session() else {
            return Ok(());
        };
        Ok(sessions.store.end(session.id, id).await?)
    }
}
