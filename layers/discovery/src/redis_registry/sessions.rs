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
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use futures_core::future::BoxFuture;
use hybrid_cluster_core::{
    Appended, ClusterPrefix, ConnectionId, GroupName, LogEntry, MessageId, RegistryError,
    SessionId, SessionLimits, SessionRecord, SessionStore,
};
use redis::aio::ConnectionLike;
use redis::{Script, Value};

use super::{classify, millis};

/// The length of a log member's message-id prefix.
const ID_LEN: usize = 32;

/// Shared by every script: trims the log to its bounds, and refreshes the expiry of every key
/// (claims, orphan appends and keep-alives do; an owner's appends do not: a session parked
/// expires a resume window after its client went, however much it receives meanwhile).
/// `KEYS[1]` the record, `KEYS[2]` the log; `ttl`, `max_messages`, `max_bytes` and the
/// session-of prefix are arguments of the caller's script.
const TRIM_AND_TOUCH: &str = r#"
local function trim(max_messages, max_bytes)
  local bytes = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
  while true do
    local count = redis.call('ZCARD', KEYS[2])
    if count == 0 or (count <= max_messages and (bytes <= max_bytes or count <= 1)) then break end
    local oldest = redis.call('ZPOPMIN', KEYS[2])
    bytes = bytes - (string.len(oldest[1]) - 32)
  end
  redis.call('HSET', KEYS[1], 'bytes', bytes)
end
local function touch(ttl, index_prefix)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  local conns = redis.call('HGET', KEYS[1], 'conns') or ''
  for conn in string.gmatch(conns, '%S+') do
    redis.call('PEXPIRE', index_prefix .. conn, ttl)
  end
end
local function store(seq, member, max_messages, max_bytes)
  redis.call('ZADD', KEYS[2], seq, member)
  redis.call('HINCRBY', KEYS[1], 'bytes', string.len(member) - 32)
  local last = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
  if seq > last then redis.call('HSET', KEYS[1], 'last', seq) end
  trim(max_messages, max_bytes)
end
"#;

/// ARGV: id, owner, groups, ttl, index prefix.
const CREATE: &str = r#"
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'groups', ARGV[3], 'last', 0, 'bytes', 0, 'conns', ARGV[2])
redis.call('SET', ARGV[5] .. ARGV[2], ARGV[1], 'PX', ARGV[4])
touch(ARGV[4], ARGV[5])
return 1
"#;

/// ARGV: owner, ttl, max messages, max bytes, index prefix, then seq and member pairs.
/// Returns {0} unknown, {1, highest seq} stored, {2, owner} moved.
const APPEND: &str = r#"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return {0} end
if owner ~= ARGV[1] then return {2, owner} end
local highest = 0
for i = 6, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  store(seq, ARGV[i + 1], tonumber(ARGV[3]), tonumber(ARGV[4]))
  if seq > highest then highest = seq end
end
-- A log made before its expiry was set (its first append) gets the record's.
if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIRE', KEYS[2], redis.call('PTTL', KEYS[1])) end
return {1, highest}
"#;

/// ARGV: expected owner, message id, member, ttl, max messages, max bytes, index prefix.
const APPEND_ORPHAN: &str = r#"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return {0} end
local held = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #held, 2 do
  if string.sub(held[i], 1, 32) == ARGV[2] then return {1, tonumber(held[i + 1])} end
end
if owner ~= ARGV[1] then return {2, owner} end
local seq = tonumber(redis.call('HGET', KEYS[1], 'last') or '0') + 1
store(seq, ARGV[3], tonumber(ARGV[5]), tonumber(ARGV[6]))
touch(ARGV[4], ARGV[7])
return {1, seq}
"#;

/// ARGV: id, new owner, ttl, index prefix. Returns {} or {owner, groups, last, first}.
const CLAIM: &str = r#"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return {} end
local groups = redis.call('HGET', KEYS[1], 'groups') or '[]'
local last = redis.call('HGET', KEYS[1], 'last') or '0'
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local first_seq = tostring(tonumber(last) + 1)
if #first == 2 then first_seq = first[2] end
local conns = redis.call('HGET', KEYS[1], 'conns') or ''
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'conns', conns .. ' ' .. ARGV[2])
redis.call('SET', ARGV[4] .. ARGV[2], ARGV[1], 'PX', ARGV[3])
touch(ARGV[3], ARGV[4])
return {owner, groups, last, first_seq}
"#;

/// ARGV: owner, groups.
const SET_GROUPS: &str = r#"
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'groups', ARGV[2])
end
return 1
"#;

/// ARGV: ttl, index prefix.
const KEEP_ALIVE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then touch(ARGV[1], ARGV[2]) end
return 1
"#;

/// ARGV: owner, index prefix.
const END: &str = r#"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local conns = redis.call('HGET', KEYS[1], 'conns') or ''
for conn in string.gmatch(conns, '%S+') do
  redis.call('DEL', ARGV[2] .. conn)
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"#;

/// The scripts, each with the shared functions in front.
struct Scripts {
    create: Script,
    append: Script,
    append_orphan: Script,
    claim: Script,
    set_groups: Script,
    keep_alive: Script,
    end: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let with_helpers = |body: &str| Script::new(&format!("{TRIM_AND_TOUCH}\n{body}"));
    Scripts {
        create: with_helpers(CREATE),
        append: with_helpers(APPEND),
        append_orphan: with_helpers(APPEND_ORPHAN),
        claim: with_helpers(CLAIM),
        set_groups: Script::new(SET_GROUPS),
        keep_alive: with_helpers(KEEP_ALIVE),
        end: Script::new(END),
    }
});

/// The names sessions use in Redis: under the cluster's hash tag, like the registry's keys.
#[derive(Clone, Debug)]
struct SessionKeys {
    session_prefix: String,
    index_prefix: String,
}

impl SessionKeys {
    fn new(prefix: &ClusterPrefix) -> Self {
        let tag = format!("{{{prefix}}}");
        Self {
            session_prefix: format!("{tag}:sessions:"),
            index_prefix: format!("{tag}:session-of:"),
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
        let mut connection = self.connection.clone();
        let mut invocation = script.prepare_invoke();
        invocation.key(self.keys.record(id)).key(self.keys.log(id));
        for arg in args {
            invocation.arg(arg);
        }
        Box::pin(async move {
            invocation
                .invoke_async::<T>(&mut connection)
                .await
                .map_err(classify)
        })
    }

    fn index_prefix(&self) -> Vec<u8> {
        self.keys.index_prefix.clone().into_bytes()
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
                    vec![arg(ttl), self.index_prefix()],
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
        let args = vec![arg(owner), self.index_prefix()];
        let running = self.run::<i64>(&SCRIPTS.end, session, args);
        Box::pin(async move { running.await.map(drop) })
    }
}
