//! The [`SessionStore`] kept in Redis, next to the registry's keys.
//!
//! A session is a hash `{prefix}:sessions:{id}` (`owner`, `groups` as a JSON array, `last`,
//! the payload `bytes` its log holds, `conns`: every connection id it had, space-separated),
//! its log a sorted set `{prefix}:sessions:{id}:log` (score: the `seq`; member: the message
//! id's 32 hex digits, then the stored bytes), and each of its connection ids a key
//! `{prefix}:session-of:{connection}` holding the session's id. Every step is one Lua script,
//! so that a claim and an append never interleave; every key expires a resume window after
//! the session was created, claimed or kept alive (its owner's node does that while the client
//! is connected).

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use futures_core::future::BoxFuture;
use hybrid_cluster_core::{
    Appended, ClusterPrefix, ConnectionId, GroupName, LogEntry, MessageId, NodeId, RegistryError,
    SessionId, SessionLimits, SessionRecord, SessionStore,
};
use redis::aio::ConnectionLike;
use redis::{Script, Value};

mod scripts;

use self::scripts::SCRIPTS;
use super::{classify, invoke, millis};

/// The length of a log member's message-id prefix.
const ID_LEN: usize = 32;

/// The names sessions use in Redis: under the cluster's hash tag, like the registry's keys.
#[derive(Clone, Debug)]
struct SessionKeys {
    session_prefix: String,
    index_prefix: String,
    node_prefix: String,
}

impl SessionKeys {
    fn new(prefix: &ClusterPrefix) -> Self {
        let tag = format!("{{{prefix}}}");
        Self {
            session_prefix: format!("{tag}:sessions:"),
            index_prefix: format!("{tag}:session-of:"),
            node_prefix: format!("{tag}:node-sessions:"),
        }
    }

    fn record(&self, id: SessionId) -> String {
        format!("{}{id}", self.session_prefix)
    }

    fn log(&self, id: SessionId) -> String {
        format!("{}{id}:log", self.session_prefix)
    }

    fn index(&self, connection: &ConnectionId) -> String {
        format!("{}{connection}", self.index_prefix)
    }
}

/// A [`SessionStore`] in Redis (see the module docs for its keys), on the command connection
/// of a [`RedisRegistry`](super::RedisRegistry) or any redis-rs connection.
#[derive(Clone)]
pub struct RedisSessionStore<C> {
    connection: C,
    keys: Arc<SessionKeys>,
}

impl<C> std::fmt::Debug for RedisSessionStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSessionStore")
            .field("keys", &self.keys.session_prefix)
            .finish_non_exhaustive()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisSessionStore<C> {
    /// A store for the cluster `prefix` on `connection`.
    pub fn new(connection: C, prefix: &ClusterPrefix) -> Self {
        Self {
            connection,
            keys: Arc::new(SessionKeys::new(prefix)),
        }
    }

    fn run<T: redis::FromRedisValue + Send + 'static>(
        &self,
        script: &'static Script,
        id: SessionId,
        args: Vec<Vec<u8>>,
    ) -> BoxFuture<'static, Result<T, RegistryError>> {
        let keys = [self.keys.record(id), self.keys.log(id)];
        invoke(self.connection.clone(), script, keys, args)
    }

    fn index_prefix(&self) -> Vec<u8> {
        self.keys.index_prefix.clone().into_bytes()
    }

    fn node_prefix(&self) -> Vec<u8> {
        self.keys.node_prefix.clone().into_bytes()
    }
}

fn arg(value: impl ToString) -> Vec<u8> {
    value.to_string().into_bytes()
}

fn member(message_id: MessageId, bytes: &[u8]) -> Vec<u8> {
    let mut member = Vec::with_capacity(ID_LEN + bytes.len());
    member.extend_from_slice(message_id.to_string().as_bytes());
    member.extend_from_slice(bytes);
    member
}

fn groups_json(groups: &BTreeSet<GroupName>) -> Vec<u8> {
    serde_json::to_vec(groups).unwrap_or_else(|_| b"[]".to_vec())
}

fn malformed(key: String, reason: impl Into<String>) -> RegistryError {
    RegistryError::Malformed {
        key,
        reason: reason.into(),
    }
}

/// Reads an append script's answer.
fn appended(key: String, reply: Vec<Value>) -> Result<Appended, RegistryError> {
    let number = |value: &Value| match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    match reply.as_slice() {
        [Value::Int(0)] => Ok(Appended::Unknown),
        [Value::Int(1), seq] => number(seq)
            .map(Appended::Stored)
            .ok_or_else(|| malformed(key, "an append answered no seq")),
        [Value::Int(2), owner] => {
            let owner: String = redis::from_redis_value(owner.clone())
                .map_err(|_| malformed(key.clone(), "the owner is not text"))?;
            owner
                .parse()
                .map(Appended::Moved)
                .map_err(|_| malformed(key, "the owner is not a connection id"))
        }
        _ => Err(malformed(key, "an append answered something unexpected")),
    }
}

/// Reads a claim script's answer: the record as it was.
fn claimed(
    key: String,
    id: SessionId,
    reply: Vec<String>,
) -> Result<Option<SessionRecord>, RegistryError> {
    let [owner, groups, last, first] = reply.as_slice() else {
        return if reply.is_empty() {
            Ok(None)
        } else {
            Err(malformed(key, "a claim answered something unexpected"))
        };
    };
    let owner = owner
        .parse()
        .map_err(|_| malformed(key.clone(), "the owner is not a connection id"))?;
    let groups: BTreeSet<GroupName> = serde_json::from_str(groups).map_err(|_| {
        malformed(
            key.clone(),
            "the groups are not a JSON array of group names",
        )
    })?;
    let number = |text: &str| {
        text.parse::<u64>()
            .map_err(|_| malformed(key.clone(), "a seq is not a number"))
    };
    Ok(Some(SessionRecord {
        id,
        owner,
        groups,
        last_seq: number(last)?,
        first_seq: number(first)?,
    }))
}

/// Reads one session of [`ON_NODE`]'s answer: id, owner, groups (its seq is not read).
fn on_node_record(key: &str, triple: &[String]) -> Result<SessionRecord, RegistryError> {
    let [id, owner, groups] = triple else {
        return Err(malformed(
            key.to_owned(),
            "a node's sessions came in pieces",
        ));
    };
    let bad = |what: &str| malformed(key.to_owned(), what.to_owned());
    Ok(SessionRecord {
        id: id.parse().map_err(|_| bad("not a session id"))?,
        owner: owner
            .parse()
            .map_err(|_| bad("the owner is not a connection id"))?,
        groups: serde_json::from_str(groups).map_err(|_| bad("the groups are not a JSON array"))?,
        last_seq: 0,
        first_seq: 0,
    })
}

/// Reads a log member: the message id, then the bytes.
fn entry(key: &str, member: Vec<u8>, seq: f64) -> Result<LogEntry, RegistryError> {
    let id = member
        .get(..ID_LEN)
        .and_then(|id| std::str::from_utf8(id).ok())
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| {
            malformed(
                key.to_owned(),
                "a log entry does not start with a message id",
            )
        })?;
    let mut bytes = Bytes::from(member);
    let bytes = bytes.split_off(ID_LEN);
    Ok(LogEntry {
        seq: seq as u64,
        message_id: id,
        bytes,
    })
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> SessionStore for RedisSessionStore<C> {
    fn create(
        &self,
        record: &SessionRecord,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        let args = vec![
            arg(record.id),
            arg(&record.owner),
            groups_json(&record.groups),
            arg(millis(limits.resume_window)),
            self.index_prefix(),
            self.node_prefix(),
        ];
        let running = self.run::<i64>(&SCRIPTS.create, record.id, args);
        Box::pin(async move { running.await.map(drop) })
    }

    fn append(
        &self,
        session: SessionId,
        owner: &ConnectionId,
        entries: Vec<LogEntry>,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<Appended, RegistryError>> {
        let mut args = vec![
            arg(owner),
            arg(millis(limits.resume_window)),
            arg(limits.max_messages.max(1)),
            arg(limits.max_bytes),
            self.index_prefix(),
        ];
        for entry in &entries {
            args.push(arg(entry.seq));
            args.push(member(entry.message_id, &entry.bytes));
        }
        let key = self.keys.record(session);
        let running = self.run::<Vec<Value>>(&SCRIPTS.append, session, args);
        Box::pin(async move { appended(key, running.await?) })
    }

    fn append_orphan(
        &self,
        session: SessionId,
        expected_owner: &ConnectionId,
        message_id: MessageId,
        bytes: Bytes,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<Appended, RegistryError>> {
        let args = vec![
            arg(expected_owner),
            arg(message_id),
            member(message_id, &bytes),
            arg(millis(limits.resume_window)),
            arg(limits.max_messages.max(1)),
            arg(limits.max_bytes),
            self.index_prefix(),
            self.node_prefix(),
        ];
        let key = self.keys.record(session);
        let running = self.run::<Vec<Value>>(&SCRIPTS.append_orphan, session, args);
        Box::pin(async move { appended(key, running.await?) })
    }

    fn claim(
        &self,
        session: SessionId,
        new_owner: &ConnectionId,
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<Option<SessionRecord>, RegistryError>> {
        let args = vec![
            arg(session),
            arg(new_owner),
            arg(millis(limits.resume_window)),
            self.index_prefix(),
            self.node_prefix(),
        ];
        let key = self.keys.record(session);
        let running = self.run::<Vec<String>>(&SCRIPTS.claim, session, args);
        Box::pin(async move { claimed(key, session, running.await?) })
    }

    fn read(
        &self,
        session: SessionId,
        after: u64,
    ) -> BoxFuture<'static, Result<Vec<LogEntry>, RegistryError>> {
        let mut connection = self.connection.clone();
        let key = self.keys.log(session);
        Box::pin(async move {
            let flat: Vec<(Vec<u8>, f64)> = redis::cmd("ZRANGE")
                .arg(&key)
                .arg(format!("({after}"))
                .arg("+inf")
                .arg("BYSCORE")
                .arg("WITHSCORES")
                .query_async(&mut connection)
                .await
                .map_err(classify)?;
            flat.into_iter()
                .map(|(member, seq)| entry(&key, member, seq))
                .collect()
        })
    }

    fn set_groups(
        &self,
        session: SessionId,
        owner: &ConnectionId,
        groups: &BTreeSet<GroupName>,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        let args = vec![arg(owner), groups_json(groups)];
        let running = self.run::<i64>(&SCRIPTS.set_groups, session, args);
        Box::pin(async move { running.await.map(drop) })
    }

    fn session_of(
        &self,
        connection: &ConnectionId,
    ) -> BoxFuture<'static, Result<Option<SessionId>, RegistryError>> {
        let mut redis = self.connection.clone();
        let key = self.keys.index(connection);
        let keys = Arc::clone(&self.keys);
        Box::pin(async move {
            let id: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .map_err(classify)?;
            let Some(id) = id else { return Ok(None) };
            let id: SessionId = id.parse().map_err(|_| malformed(key, "not a session id"))?;
            let live: bool = redis::cmd("EXISTS")
                .arg(keys.record(id))
                .query_async(&mut redis)
                .await
                .map_err(classify)?;
            Ok(live.then_some(id))
        })
    }

    fn keep_alive(
        &self,
        sessions: &[SessionId],
        limits: &SessionLimits,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        let ttl = millis(limits.resume_window);
        // One script per session, all sent at once: the connection pipelines them.
        let running: Vec<_> = sessions
            .iter()
            .map(|id| {
                self.run::<i64>(
                    &SCRIPTS.keep_alive,
                    *id,
                    vec![arg(ttl), self.index_prefix(), self.node_prefix()],
                )
            })
            .collect();
        Box::pin(async move {
            for result in futures_util::future::join_all(running).await {
                result?;
            }
            Ok(())
        })
    }

    fn end(
        &self,
        session: SessionId,
        owner: &ConnectionId,
    ) -> BoxFuture<'static, Result<(), RegistryError>> {
        let args = vec![
            arg(owner),
            self.index_prefix(),
            self.node_prefix(),
            arg(session),
        ];
        let running = self.run::<i64>(&SCRIPTS.end, session, args);
        Box::pin(async move { running.await.map(drop) })
    }

    fn sessions_on(
        &self,
        node: &NodeId,
    ) -> BoxFuture<'static, Result<Vec<SessionRecord>, RegistryError>> {
        let mut connection = self.connection.clone();
        let key = format!("{}{node}", self.keys.node_prefix);
        let mut invocation = SCRIPTS.on_node.prepare_invoke();
        invocation
            .key(&key)
            .arg(node.as_str())
            .arg(&self.keys.session_prefix);
        Box::pin(async move {
            let flat: Vec<String> = invocation
                .invoke_async(&mut connection)
                .await
                .map_err(classify)?;
            flat.chunks(3)
                .map(|triple| on_node_record(&key, triple))
                .collect()
        })
    }
}
