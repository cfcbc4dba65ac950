//! The Lua scripts of the session store: one per step, each with the shared functions in
//! front (see the parent module for the keys).

use std::sync::LazyLock;

use redis::Script;

/// Shared by every script: trims the log to its bounds, and refreshes the expiry of every key
/// (claims, orphan appends and keep-alives do; an owner's appends do not: a session parked
/// expires a resume window after its client went, however much it receives meanwhile).
/// `KEYS[1]` the record, `KEYS[2]` the log; `ttl`, `max_messages`, `max_bytes` and the
/// session-of prefix are arguments of the caller's script.
const TRIM_AND_TOUCH: &str = r#"
local function trim(max_messages, max_bytes)
  local bytes = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
  local count = redis.call('ZCARD', KEYS[2])
  if count > max_messages then
    local popped = redis.call('ZPOPMIN', KEYS[2], count - max_messages)
    for i = 1, #popped, 2 do bytes = bytes - (string.len(popped[i]) - 32) end
    count = max_messages
  end
  while count > 1 and bytes > max_bytes do
    local oldest = redis.call('ZPOPMIN', KEYS[2])
    bytes = bytes - (string.len(oldest[1]) - 32)
    count = count - 1
  end
  redis.call('HSET', KEYS[1], 'bytes', bytes)
end
local function node_of(connection)
  return string.match(connection, '^[^:]+')
end
local function touch(ttl, index_prefix, node_prefix)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  local conns = redis.call('HGET', KEYS[1], 'conns') or ''
  for conn in string.gmatch(conns, '%S+') do
    redis.call('PEXPIRE', index_prefix .. conn, ttl)
  end
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner then
    local node_key = node_prefix .. node_of(owner)
    redis.call('PEXPIRE', node_key, ttl, 'NX')
    redis.call('PEXPIRE', node_key, ttl, 'GT')
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

/// ARGV: id, owner, groups, ttl, index prefix, node prefix.
const CREATE: &str = r#"
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'groups', ARGV[3], 'last', 0, 'bytes', 0, 'conns', ARGV[2])
redis.call('SET', ARGV[5] .. ARGV[2], ARGV[1], 'PX', ARGV[4])
redis.call('SADD', ARGV[6] .. node_of(ARGV[2]), ARGV[1])
touch(ARGV[4], ARGV[5], ARGV[6])
return 1
"#;

/// ARGV: owner, ttl, max messages, max bytes, index prefix, then seq and member pairs.
/// Returns {0} unknown, {1, highest seq} stored, {2, owner} moved.
const APPEND: &str = r#"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return {0} end
if owner ~= ARGV[1] then return {2, owner} end
-- One ZADD, one count of bytes and one trim for the whole batch.
local members = {}
local added = 0
local highest = 0
for i = 6, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  table.insert(members, seq)
  table.insert(members, ARGV[i + 1])
  added = added + string.len(ARGV[i + 1]) - 32
  if seq > highest then highest = seq end
end
if #members > 0 then
  redis.call('ZADD', KEYS[2], unpack(members))
  redis.call('HINCRBY', KEYS[1], 'bytes', added)
  if highest > tonumber(redis.call('HGET', KEYS[1], 'last') or '0') then
    redis.call('HSET', KEYS[1], 'last', highest)
  end
  trim(tonumber(ARGV[3]), tonumber(ARGV[4]))
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
touch(ARGV[4], ARGV[7], ARGV[8])
return {1, seq}
"#;

/// ARGV: id, new owner, ttl, index prefix, node prefix. Returns {} or {owner, groups, last,
/// first}.
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
redis.call('SADD', ARGV[5] .. node_of(ARGV[2]), ARGV[1])
touch(ARGV[3], ARGV[4], ARGV[5])
return {owner, groups, last, first_seq}
"#;

/// ARGV: owner, groups.
const SET_GROUPS: &str = r#"
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'groups', ARGV[2])
end
return 1
"#;

/// ARGV: ttl, index prefix, node prefix.
const KEEP_ALIVE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then touch(ARGV[1], ARGV[2], ARGV[3]) end
return 1
"#;

/// ARGV: owner, index prefix, node prefix, id.
const END: &str = r#"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local conns = redis.call('HGET', KEYS[1], 'conns') or ''
for conn in string.gmatch(conns, '%S+') do
  redis.call('DEL', ARGV[2] .. conn)
end
redis.call('SREM', ARGV[3] .. node_of(ARGV[1]), ARGV[4])
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"#;

/// KEYS[1]: the node's set of sessions. ARGV: the node, the session prefix. Returns the
/// sessions that had a connection on the node, flattened: id, that connection, groups; drops
/// the ids of sessions gone.
const ON_NODE: &str = r#"
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local record = redis.call('HMGET', ARGV[2] .. id, 'conns', 'groups')
  local held = nil
  for conn in string.gmatch(record[1] or '', '%S+') do
    if string.match(conn, '^[^:]+') == ARGV[1] then held = conn end
  end
  if held then
    table.insert(out, id)
    table.insert(out, held)
    table.insert(out, record[2] or '[]')
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
"#;

/// The scripts, each with the shared functions in front.
pub(super) struct Scripts {
    pub(super) create: Script,
    pub(super) append: Script,
    pub(super) append_orphan: Script,
    pub(super) claim: Script,
    pub(super) set_groups: Script,
    pub(super) keep_alive: Script,
    pub(super) end: Script,
    pub(super) on_node: Script,
}

pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let with_helpers = |body: &str| Script::new(&format!("{TRIM_AND_TOUCH}\n{body}"));
    Scripts {
        create: with_helpers(CREATE),
        append: with_helpers(APPEND),
        append_orphan: with_helpers(APPEND_ORPHAN),
        claim: with_helpers(CLAIM),
        set_groups: Script::new(SET_GROUPS),
        keep_alive: with_helpers(KEEP_ALIVE),
        end: with_helpers(END),
        on_node: Script::new(ON_NODE),
    }
});
