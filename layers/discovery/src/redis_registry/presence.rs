//! The [`PresenceStore`] kept in Redis, next to the registry's keys.
//!
//! A group is a hash `{prefix}:presence:{group}`: for each user, the field `{user}` holds
//! their connections in the group on every node, and a field `{user}\n{connection}` stands
//! for each of those connections (neither a user id nor a connection id holds a newline; a
//! connection id starts with its node's), holding what its join answered. Each node has a
//! set `{prefix}:presence-node:{node}` of the groups it counts someone in, for a peer to reap
//! its shares; a leave leaves its answer in `{prefix}:presence-left:{group}\n{connection}` for
//! five minutes. Every step is one Lua script, and a join or leave tried again counts once
//! and answers as the first did. A node's set expires unless the node keeps it alive; a
//! group's hash, while any node keeps it alive.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_core::future::BoxFuture;
use hybrid_cluster_core::{
    ClusterPrefix, ConnectionId, GroupName, Joined, NodeId, PresenceShare, PresenceStore,
    RegistryError, UserId,
};
use redis::Script;
use redis::aio::ConnectionLike;

use super::{classify, invoke, millis};

/// How long the answer of a leave is kept, for a leave made again (ms).
const LEAVES_KEPT_MS: u64 = 300_000;

/// Counts a connection: `KEYS[1]` the group, `KEYS[2]` the node's set, `KEYS[3]` the answer
/// of its last leave; `ARGV`: user, connection, group, ttl (ms). Returns the user's count on
/// every node (the first answer, for a connection counted already), and 1 when it counted the
/// connection now.
static JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local field = ARGV[1] .. '\n' .. ARGV[2]
local total = redis.call('HGET', KEYS[1], field)
local new = 0
if total then
  total = tonumber(total)
else
  total = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
  redis.call('HSET', KEYS[1], field, total)
  redis.call('DEL', KEYS[3])
  new = 1
end
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {total, new}
"#,
    )
});

/// Counts a connection out: `KEYS[1]` the group, `KEYS[2]` the answer of its leave; `ARGV`:
/// user, connection, how long the answer is kept (ms). Returns the user's count on every node
/// (the first answer, for a leave made again), or -1 when the connection was not counted.
static LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HDEL', KEYS[1], ARGV[1] .. '\n' .. ARGV[2]) == 0 then
  return tonumber(redis.call('GET', KEYS[2]) or '-1')
end
local total = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if total <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  total = 0
end
redis.call('SET', KEYS[2], total, 'PX', ARGV[3])
return total
"#,
    )
});

/// Takes a node's shares away: `KEYS[1]` the node's set; `ARGV`: node, the groups' key
/// prefix. Returns group, user, group, user… of those who left a group altogether. The
/// groups' keys share the set's hash tag, so they are in its slot.
static REAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local left = {}
for _, group in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. group
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local user, connection = string.match(fields[i], '^([^\n]+)\n(.+)$')
    if connection and string.match(connection, '^[^:]+') == ARGV[1] then
      redis.call('HDEL', key, fields[i])
      local total = redis.call('HINCRBY', key, user, -1)
      if total <= 0 then
        redis.call('HDEL', key, user)
        table.insert(left, group)
        table.insert(left, user)
      end
    end
  end
end
redis.call('DEL', KEYS[1])
return left
"#,
    )
});

/// Keeps a node's keys: `KEYS[1]` the node's set, then its groups; `ARGV[1]` the ttl (ms).
/// Returns whether the node's set was there.
static KEEP_ALIVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local held = redis.call('EXISTS', KEYS[1])
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ARGV[1]) end
return held
"#,
    )
});

/// The names presence uses in Redis: under the cluster's hash tag, like the registry's keys.
#[derive(Debug)]
struct PresenceKeys {
    group_prefix: String,
    node_prefix: String,
    left_prefix: String,
}

impl PresenceKeys {
    fn group(&self, group: &GroupName) -> String {
        format!("{}{group}", self.group_prefix)
    }

    fn node(&self, node: &NodeId) -> String {
        format!("{}{node}", self.node_prefix)
    }

    fn left(&self, group: &GroupName, connection: &ConnectionId) -> String {
        format!("{}{group}\n{connection}", self.left_prefix)
    }
}

/// A [`PresenceStore`] in Redis (see the module docs for its keys), on the command connection
/// of a [`RedisRegistry`](super::RedisRegistry) or any redis-rs connection.
#[derive(Clone)]
pub struct RedisPresenceStore<C> {
    connection: C,
    keys: Arc<PresenceKeys>,
}

impl<C> std::fmt::Debug for RedisPresenceStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPresenceStore")
            .field("keys", &self.keys.group_prefix)
            .finish_non_exhaustive()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisPresenceStore<C> {
    /// A store for the cluster `prefix` on `connection`.
    pub fn new(connection: C, prefix: &ClusterPrefix) -> Self {
        let tag = format!("{{{prefix}}}");
        Self {
            connection,
            keys: Arc::new(PresenceKeys {
                group_prefix: format!("{tag}:presence:"),
                node_prefix: format!("{tag}:presence-node:"),
                left_prefix: format!("{tag}:presence-left:"),
            }),
        }
    }

    fn run<T: redis::FromRedisValue + Send + 'static>(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BoxFuture<'static, Result<T, RegistryError>> {
        invoke(self.connection.clone(), script, keys, args)
    }
}

fn malformed(key: String, reason: &str) -> RegistryError {
    RegistryError::Malformed {
        key,
        reason: reason.to_owned(),
    }
}

/// Reads a group's hash: a share for each user and node, counting its `{user}\n{connection}`
/// fields.
fn shares(key: String, fields: Vec<(String, String)>) -> Result<Vec<PresenceShare>, RegistryError> {
    let mut counts: BTreeMap<(UserId, NodeId), u64> = BTreeMap::new();
    for (field, _) in fields {
        let Some((user, connection)) = field.split_once('\n') else {
            continue;
        };
        let user = UserId::new(user).map_err(|_| malformed(key.clone(), "a user id is invalid"))?;
        let connection: ConnectionId = connection
            .parse()
            .map_err(|_| malformed(key.clone(), "a connection id is invalid"))?;
        *counts.entry((user, connection.node().clone())).or_insert(0) += 1;
    }
    Ok(counts
        .into_iter()
        .map(|((user, node), connections)| PresenceShare {
            user,
            node,
            connections,
        })
        .collect())
}

/// Reads a reap's answer: group, user, group, user…
fn left(key: String, flat: Vec<String>) -> Result<Vec<(GroupName, UserId)>, RegistryError> {
    flat.chunks(2)
        .map(|pair| match pair {
            [group, user] => Ok((
                GroupName::new(group).map_err(|_| malformed(key.clone(), "a group is invalid"))?,
                UserId::new(user).map_err(|_| malformed(key.clone(), "a user id is invalid"))?,
            )),
            _ => Err(malformed(key.clone(), "a reap answered an odd list")),
        })
        .collect()
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> PresenceStore for RedisPresenceStore<C> {
    fn join(
        &self,
        group: &GroupName,
        user: &UserId,
        connection: &ConnectionId,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<Joined, RegistryError>> {
        let keys = vec![
            self.keys.group(group),
            self.keys.node(connection.node()),
            self.keys.left(group, connection),
        ];
        let args = vec![
            user.to_string(),
            connection.to_string(),
            group.to_string(),
            millis(ttl).to_string(),
        ];
        let joined = self.run::<(i64, i64)>(&JOIN, keys, args);
        Box::pin(async move {
            let (connections, new) = joined.await?;
            Ok(Joined {
                connections: u64::try_from(connections).unwrap_or(0),
                new: new == 1,
            })
        })
    }

    fn leave(
        &self,
        group: &GroupName,
        user: &UserId,
        connection: &ConnectionId,
    ) -> BoxFuture<'static, Result<Option<u64>, RegistryError>> {
        let keys = vec![self.keys.group(group), self.keys.left(group, connection)];
        let args = vec![
            user.to_string(),
            connection.to_string(),
            LEAVES_KEPT_MS.to_string(),
        ];
        let left = self.run::<i64>(&LEAVE, keys, args);
        Box::pin(async move { Ok(u64::try_from(left.await?).ok()) })
    }

    fn members(
        &self,
        group: &GroupName,
    ) -> BoxFuture<'static, Result<Vec<PresenceShare>, RegistryError>> {
        let key = self.keys.group(group);
        let mut connection = self.connection.clone();
        Box::pin(async move {
            let fields: Vec<(String, String)> = redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .map_err(classify)?;
            shares(key, fields)
        })
    }

    fn reap(
        &self,
        node: &NodeId,
    ) -> BoxFuture<'static, Result<Vec<(GroupName, UserId)>, RegistryError>> {
        let key = self.keys.node(node);
        let args = vec![node.to_string(), self.keys.group_prefix.clone()];
        let reaped = self.run::<Vec<String>>(&REAP, vec![key.clone()], args);
        Box::pin(async move { left(key, reaped.await?) })
    }

    fn keep_alive(
        &self,
        node: &NodeId,
        groups: Vec<GroupName>,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<bool, RegistryError>> {
        let keys = std::iter::once(self.keys.node(node))
            .chain(groups.iter().map(|group| self.keys.group(group)))
            .collect();
        let kept = self.run::<i64>(&KEEP_ALIVE, keys, vec![millis(ttl).to_string()]);
        Box::pin(async move { kept.await.map(|held| held == 1) })
    }
}
