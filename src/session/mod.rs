//! Sessions on a node: the store they live in, the stored form of their messages, and keeping
//! a message in a session's log (see [`hybrid_cluster_core::session`] for the model).
//!
//! A node numbers the messages of the sessions it holds as they reach their inboxes (see
//! [`local`](crate::local)), and logs each one in the store before its delivery is
//! acknowledged to the broker, so that a node that crashes loses no message its client did
//! not get: what it had logged is in the store, what it had not is still in its queue.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_core::future::BoxFuture;
use hybrid_cluster_core::{
    Appended, BrokerMessage, ClusterSecret, ConnectionId, Envelope, InvalidToken, LogEntry,
    RegistryError, SessionId, SessionLimits, SessionStore, issue_token, verify_token,
};
use hybrid_cluster_routing::EnvelopeCodec;

/// The header of a node message that carries a session's message to where the session went:
/// the connection it is for.
pub(crate) const HEADER_SESSION_TO: &str = "session-to";

/// What became of a message a node kept in a session's log.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Kept {
    /// The log holds it, under this `seq`.
    Logged(u64),
    /// The session moved to this connection: the message is for it.
    Moved(ConnectionId),
    /// No such session any more (it ended or expired).
    Unknown,
    /// The store could not be reached within the outage bound.
    Failed,
}

/// The sessions of one node: their store, limits and secret.
pub(crate) struct NodeSessions {
    pub(crate) store: Arc<dyn SessionStore>,
    pub(crate) limits: SessionLimits,
    secret: Option<ClusterSecret>,
    /// How long a write to the store is tried before it is given up.
    outage: Duration,
}

impl std::fmt::Debug for NodeSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSessions")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl NodeSessions {
    pub(crate) fn new(
        store: Arc<dyn SessionStore>,
        limits: SessionLimits,
        secret: Option<ClusterSecret>,
        outage: Duration,
    ) -> Self {
        Self {
            store,
            limits,
            secret,
            outage,
        }
    }

    /// The token a client resumes `session` with.
    pub(crate) fn token(&self, session: SessionId) -> String {
        issue_token(session, self.secret.as_ref())
    }

    /// The session a token names, if it is one of this cluster's.
    pub(crate) fn verify(&self, token: &str) -> Result<SessionId, InvalidToken> {
        verify_token(token, self.secret.as_ref())
    }

    /// Keeps `envelopes` in the log of `session`, each under its `seq`, as its owner `owner`
    /// (one step of the store for them all).
    pub(crate) fn log<'a>(
        &self,
        session: SessionId,
        owner: &ConnectionId,
        envelopes: impl Iterator<Item = (u64, &'a Envelope)>,
    ) -> BoxFuture<'static, Kept> {
        let entries: Vec<LogEntry> = envelopes
            .filter_map(|(seq, envelope)| {
                Some(LogEntry {
                    seq,
                    message_id: envelope.id,
                    bytes: self.stored_or_warn(envelope)?,
                })
            })
            .collect();
        let (store, limits, owner) = (Arc::clone(&self.store), self.limits, owner.clone());
        Box::pin(retrying(self.outage, move || {
            store.append(session, &owner, entries.clone(), &limits)
        }))
    }

    /// Keeps `envelope` in the log of `session`, whose owner `expected_owner` is gone: the
    /// store numbers it.
    pub(crate) fn log_orphan(
        &self,
        session: SessionId,
        expected_owner: &ConnectionId,
        envelope: &Envelope,
    ) -> BoxFuture<'static, Kept> {
        let Some(bytes) = self.stored_or_warn(envelope) else {
            return Box::pin(std::future::ready(Kept::Failed));
        };
        let (store, limits) = (Arc::clone(&self.store), self.limits);
        let (owner, id) = (expected_owner.clone(), envelope.id);
        Box::pin(retrying(self.outage, move || {
            store.append_orphan(session, &owner, id, bytes.clone(), &limits)
        }))
    }

    /// The session connection `id` had, asking the store again while it cannot be reached.
    pub(crate) async fn session_of(&self, id: &ConnectionId) -> Option<SessionId> {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            match self.store.session_of(id).await {
                Ok(found) => return found,
                Err(error) if started.elapsed() + pause < self.outage => {
                    tracing::debug!(error = %crate::error_chain(&error), "session store: trying again");
                }
                Err(error) => {
                    tracing::warn!(error = %crate::error_chain(&error), connection = %id, "could not find a connection's session: the session store cannot be reached");
                    return None;
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    fn stored_or_warn(&self, envelope: &Envelope) -> Option<Bytes> {
        match stored_form(envelope) {
            Ok(bytes) => Some(bytes),
            Err(error) => {
                tracing::warn!(message_id = %envelope.id, %error, "a session's message has no stored form: not logged");
                None
            }
        }
    }
}

/// Runs an append until it answers or `outage` passes.
async fn retrying(
    outage: Duration,
    mut append: impl FnMut() -> BoxFuture<'static, Result<Appended, RegistryError>>,
) -> Kept {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        match append().await {
            Ok(Appended::Stored(seq)) => return Kept::Logged(seq),
            Ok(Appended::Moved(to)) => return Kept::Moved(to),
            Ok(Appended::Unknown) => return Kept::Unknown,
            Err(error) if started.elapsed() + pause < outage => {
                tracing::debug!(error = %crate::error_chain(&error), "session store: trying the append again");
            }
            Err(error) => {
                tracing::error!(error = %crate::error_chain(&error), "a session's message could not be logged: the session store cannot be reached (a resume may miss it)");
                return Kept::Failed;
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// The bytes a session's log keeps of an envelope: its broker form (the message id and the
/// headers as a JSON line, then the payload), so that its MAC still verifies when it is read.
pub(crate) fn stored_form(envelope: &Envelope) -> Result<Bytes, String> {
    let message = envelope.to_message().map_err(|error| error.to_string())?;
    let head = serde_json::to_vec(&(&message.message_id, &message.headers))
        .map_err(|error| error.to_string())?;
    let mut bytes = BytesMut::with_capacity(head.len() + 1 + message.body.len());
    bytes.put_slice(&head);
    bytes.put_u8(b'\n');
    bytes.put_slice(&message.body);
    Ok(bytes.freeze())
}

/// Reads what [`stored_form`] wrote.
pub(crate) fn from_stored(bytes: Bytes) -> Result<Envelope, String> {
    let split = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let (message_id, headers): (String, BTreeMap<String, String>) =
        serde_json::from_slice(&bytes[..split]).map_err(|_| "the header line is not JSON")?;
    Envelope::from_message(BrokerMessage {
        message_id,
        headers,
        body: bytes.slice(split + 1..),
    })
    .map_err(|error| error.to_string())
}
