//! Sessions: what outlives a client's connection, so that a client that lost its connection
//! resumes on any node and misses nothing.
//!
//! A session has a [`SessionId`] and, at any time, one **owner**: the connection that holds it
//! now. Every message delivered to the session gets the next number of its sequence (`seq`,
//! from 1, running on across connections) and goes into the session's **log** in a
//! [`SessionStore`] before its delivery is acknowledged to the broker. A client that comes back
//! says the last `seq` it has; the node it comes back to **claims** the session (its new
//! connection becomes the owner), reads the log past that number and hands those messages out
//! again, in order, then live traffic.
//!
//! The log is bounded ([`SessionLimits`]): past its bound in messages or bytes the oldest go,
//! and the store remembers the lowest `seq` it still has, so that a claim can tell whether the
//! client missed something the log no longer holds. A session nobody owns for
//! [`SessionLimits::resume_window`] expires with its log.
//!
//! Appends are **conditional on the owner**: an append by a connection that no longer owns the
//! session is refused with the owner in force ([`Appended::Moved`]), which is how the node of a
//! connection left behind learns where its session went and forwards what still comes to it.
//! When the owner's node is gone, anyone may append for it ([`SessionStore::append_orphan`]),
//! the store then numbering the message itself and dropping one it already holds.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use futures_core::future::BoxFuture;

use crate::auth::{ClusterSecret, Signature};
use crate::error::RegistryError;
use crate::ids::{ConnectionId, GroupName, MessageId, NodeId};

/// The id of a session: 128 random bits, written as 32 hex digits (`Display`; `Debug` shows
/// only the first 4, as the id is a credential when the cluster has no secret).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(u128);

/// The error returned for a string that is not a [`SessionId`] (32 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a session id is 32 hex digits")]
pub struct InvalidSessionId;

impl SessionId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// An id with a chosen value (tests and tools).
    pub const fn from_u128(value: u128) -> Self {
        Self(value)
    }
}

impl std::str::FromStr for SessionId {
    type Err = InvalidSessionId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InvalidSessionId);
        }
        u128::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| InvalidSessionId)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for SessionId {
    // Without a cluster secret, the id is what a client resumes with: a debug print (a log
    // line, a panic message) shows only its first 4 digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({:04x}…)", self.0 >> 112)
    }
}

/// The version tag that starts every token.
const TOKEN_VERSION: &str = "s1";

/// The MAC domain of session tokens.
const TOKEN_DOMAIN: &str = "hybrid-cluster session token v1";

/// Why a session token was refused. Says nothing of the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidToken {
    /// Not of the form `s1.<id>` or `s1.<id>.<mac>`.
    #[error("not a session token")]
    Malformed,
    /// The cluster has a secret and the token carries no valid MAC made with it.
    #[error("the session token is not signed with the cluster secret")]
    BadSignature,
}

/// The token a client resumes its session with: `s1.<id>`, and `.<mac>` (HMAC-SHA256 with the
/// cluster secret, hex) when the cluster has a secret, so that a token cannot be forged. The id
/// alone is 128 random bits: without a secret a token cannot be guessed, only stolen.
pub fn issue_token(session: SessionId, secret: Option<&ClusterSecret>) -> String {
    match secret {
        Some(secret) => {
            let mac = token_mac(session, secret).finish();
            format!("{TOKEN_VERSION}.{session}.{mac}")
        }
        None => format!("{TOKEN_VERSION}.{session}"),
    }
}

/// Reads a token [`issue_token`] made. With a secret, the MAC must be there and valid
/// (checked in constant time); without one, a MAC is ignored.
pub fn verify_token(
    token: &str,
    secret: Option<&ClusterSecret>,
) -> Result<SessionId, InvalidToken> {
    let mut parts = token.split('.');
    let (Some(TOKEN_VERSION), Some(id)) = (parts.next(), parts.next()) else {
        return Err(InvalidToken::Malformed);
    };
    let session: SessionId = id.parse().map_err(|_| InvalidToken::Malformed)?;
    let mac = parts.next();
    if parts.next().is_some() {
        return Err(InvalidToken::Malformed);
    }
    let Some(secret) = secret else {
        return Ok(session);
    };
    let signature = mac
        .and_then(Signature::from_hex)
        .ok_or(InvalidToken::BadSignature)?;
    token_mac(session, secret)
        .verify(&signature)
        .map_err(|_| InvalidToken::BadSignature)?;
    Ok(session)
}

fn token_mac(session: SessionId, secret: &ClusterSecret) -> crate::auth::MacInput {
    let mut mac = secret.mac(TOKEN_DOMAIN);
    mac.field(&session.0.to_be_bytes());
    mac
}

/// How long a session waits for its client, and how much its log keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// How long a session nobody owns (its client away) is kept: past it, it expires with its
    /// log, and a client that comes back starts a new one.
    pub resume_window: Duration,
    /// The most messages its log keeps; past it, the oldest go.
    pub max_messages: usize,
    /// The most payload bytes its log keeps; past it, the oldest go.
    pub max_bytes: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            resume_window: Duration::from_secs(120),
            max_messages: 1024,
            max_bytes: 1024 * 1024,
        }
    }
}

/// A session as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// Its id.
    pub id: SessionId,
    /// The connection that holds it now.
    pub owner: ConnectionId,
    /// The groups it is a member of.
    pub groups: BTreeSet<GroupName>,
    /// The last `seq` given out (0: none yet).
    pub last_seq: u64,
    /// The lowest `seq` its log still holds, or `last_seq + 1` when it holds none: a client
    /// whose last `seq` is below `first_seq - 1` missed messages the log no longer has.
    pub first_seq: u64,
}

/// One message of a session's log: its number and its bytes (an envelope's stored form, opaque
/// to the store).
#[derive(Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Its number in the session.
    pub seq: u64,
    /// The message's id, for the store to drop one appended twice.
    pub message_id: MessageId,
    /// What was stored.
    pub bytes: Bytes,
}

impl fmt::Debug for LogEntry {
    // The bytes hold the user's payload: never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogEntry")
            .field("seq", &self.seq)
            .field("message_id", &self.message_id)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// What became of an append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// The log holds it, under this `seq` (a message it held already keeps its first number).
    Stored(u64),
    /// Another connection owns the session now: the message is for it.
    Moved(ConnectionId),
    /// No such session (it ended, or expired).
    Unknown,
}

/// The backend that keeps sessions and their logs (Redis in production, memory in tests and
/// the embedded mode).
///
/// Every call is one atomic step of the store: a claim and an append never interleave.
pub trait SessionStore: fmt::Debug + Send + Sync + 'static {
    /// Creates a session owned by `record.owner` (its `seq` and log start empty), and indexes
    /// the owner's connection id to it.
    fn create(
        &self,
        record: &SessionRecord,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<(), RegistryError>>;

    /// Appends `entries`, each under its own `seq`, if `owner` owns the session (all or
    /// none); the log is then trimmed to the limits. The session's expiry stays as it is: a
    /// session parked expires a resume window after its client went.
    /// [`Appended::Stored`] carries the highest `seq` appended.
    fn append(
        &self,
        session: SessionId,
        owner: &ConnectionId,
        entries: Vec<LogEntry>,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<Appended, RegistryError>>;

    /// Appends a message for a session whose owner `expected_owner` is gone (its node left
    /// or crashed), numbering it `last_seq + 1`. A message whose id the log holds already
    /// answers [`Appended::Stored`] with its number, whoever owns the session; a new one is
    /// refused with [`Appended::Moved`] when someone else owns the session now.
    fn append_orphan(
        &self,
        session: SessionId,
        expected_owner: &ConnectionId,
        message_id: MessageId,
        bytes: Bytes,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<Appended, RegistryError>>;

    /// Makes `new_owner` the session's owner, whoever owned it, indexes the new connection id
    /// to it, and returns the record as it was before (`None`: no such session).
    fn claim(
        &self,
        session: SessionId,
        new_owner: &ConnectionId,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<Option<SessionRecord>, RegistryError>>;

    /// The log's entries with a `seq` above `after`, in order.
    fn read(
        &self,
        session: SessionId,
        after: u64,
    ) -> BoxFuture<'static, Result<Vec<LogEntry>, RegistryError>>;

    /// Records the session's groups, if `owner` owns it.
    fn set_groups(
        &self,
        session: SessionId,
        owner: &ConnectionId,
        groups: &BTreeSet<GroupName>,
    ) -> BoxFuture<'static, Result<(), RegistryError>>;

    /// The session a connection id held (its first connection, or any it was resumed on),
    /// while the session lasts.
    fn session_of(
        &self,
        connection: &ConnectionId,
    ) -> BoxFuture<'static, Result<Option<SessionId>, RegistryError>>;

    /// Pushes back the expiry of these sessions (their owners are connected): a session
    /// expires only a resume window after its owner was last seen.
    fn keep_alive(
        &self,
        sessions: &[SessionId],
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<(), RegistryError>>;

    /// Ends a session at once (its client closed it for good), if `owner` owns it.
    fn end(
        &self,
        session: SessionId,
        owner: &ConnectionId,
    ) -> BoxFuture<'static, Result<(), RegistryError>>;

    /// The sessions that have had a connection on `node`, whoever owns them now: their `id`,
    /// `groups`, and as `owner` that connection (their `seq` fields are not read). Those a
    /// node gone held, for the group messages and broadcasts its queue still holds: appended
    /// as orphans of that connection, they go where each session is now.
    fn sessions_on(
        &self,
        node: &NodeId,
    ) -> BoxFuture<'static, Result<Vec<SessionRecord>, RegistryError>>;
}

impl<S: SessionStore + ?Sized> SessionStore for std::sync::Arc<S> {
    fn create(
        &self,
        record: &SessionRecord,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        (**self).create(record, limits)
    }

    fn append(
        &self,
        session: SessionId,
        owner: &ConnectionId,
        entries: Vec<LogEntry>,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<Appended, RegistryError>> {
        (**self).append(session, owner, entries, limits)
    }

    fn append_orphan(
        &self,
        session: SessionId,
        expected_owner: &ConnectionId,
        message_id: MessageId,
        bytes: Bytes,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<Appended, RegistryError>> {
        (**self).append_orphan(session, expected_owner, message_id, bytes, limits)
    }

    fn claim(
        &self,
        session: SessionId,
        new_owner: &ConnectionId,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<Option<SessionRecord>, RegistryError>> {
        (**self).claim(session, new_owner, limits)
    }

    fn read(
        &self,
        session: SessionId,
        after: u64,
    ) -> BoxFuture<'static, Result<Vec<LogEntry>, RegistryError>> {
        (**self).read(session, after)
    }

    fn set_groups(
        &self,
        session: SessionId,
        owner: &ConnectionId,
        groups: &BTreeSet<GroupName>,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        (**self).set_groups(session, owner, groups)
    }

    fn session_of(
        &self,
        connection: &ConnectionId,
    ) -> BoxFuture<'static, Result<Option<SessionId>, RegistryError>> {
        (**self).session_of(connection)
    }

    fn keep_alive(
        &self,
        sessions: &[SessionId],
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        (**self).keep_alive(sessions, limits)
    }

    fn end(
        &self,
        session: SessionId,
        owner: &ConnectionId,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        (**self).end(session, owner)
    }

    fn sessions_on(
        &self,
        node: &NodeId,
    ) -> BoxFuture<'static, Result<Vec<SessionRecord>, RegistryError>> {
        (**self).sessions_on(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> ClusterSecret {
        ClusterSecret::new("a cluster secret of 32 bytes....").unwrap()
    }

    #[test]
    fn session_ids_are_32_hex_digits() {
        let id = SessionId::from_u128(0xab);
        assert_eq!(id.to_string(), format!("{:032x}", 0xab));
        let secret = SessionId::from_u128(0x1234_5678 << 96);
        assert_eq!(format!("{secret:?}"), "SessionId(1234…)");
        assert_eq!(id.to_string().parse::<SessionId>(), Ok(id));
        assert!("ab".parse::<SessionId>().is_err());
        assert!(format!("{:032}", "x").parse::<SessionId>().is_err());
        assert_ne!(SessionId::random(), SessionId::random());
    }

    #[test]
    fn signed_tokens_verify_and_forged_ones_do_not() {
        let id = SessionId::random();
        let token = issue_token(id, Some(&secret()));
        assert_eq!(verify_token(&token, Some(&secret())), Ok(id));
        // Another id under the same MAC, a token without a MAC, another secret: refused.
        let other = SessionId::random();
        let forged = token.replacen(&id.to_string(), &other.to_string(), 1);
        assert_eq!(
            verify_token(&forged, Some(&secret())),
            Err(InvalidToken::BadSignature)
        );
        let bare = issue_token(id, None);
        assert_eq!(
            verify_token(&bare, Some(&secret())),
            Err(InvalidToken::BadSignature)
        );
        let elsewhere = ClusterSecret::new("another secret of 32 bytes......").unwrap();
        assert_eq!(
            verify_token(&token, Some(&elsewhere)),
            Err(InvalidToken::BadSignature)
        );
        // Without a secret, the id is what counts.
        assert_eq!(verify_token(&bare, None), Ok(id));
        assert_eq!(verify_token(&token, None), Ok(id));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for token in [
            "",
            "s1",
            "s1.",
            "s2.00000000000000000000000000000001",
            "s1.xyz",
            "s1.a.b.c",
        ] {
            assert_eq!(
                verify_token(token, None),
                Err(InvalidToken::Malformed),
                "{token:?}"
            );
        }
    }
}
