//! The Lua scripts of the registry, admin documents, audit log and job executions. Each runs
//! atomically on one shard; the conventions are those of the `scripts` module (key names
//! derived from IDs with the prefix in `ARGV`, Lua `false` reaching the client as nil).
//!
//! Nothing here compares strings for order in Lua (its `<` follows the server's collation
//! locale): ordered reads come from `ZRANGEBYLEX`, and merges of several of them happen in
//! the client.

use super::scripts::queue_push_fn;

/// The groups of an encoded device record (`codec::encode_device`), as a Lua function
/// `device_groups(text)`. A record that does not decode has no groups: deleting or replacing
/// it must not fail on what it can no longer read.
macro_rules! device_groups_fn {
    () => {
        r"
local function device_groups(text)
  local ok, rec = pcall(cjson.decode, text)
  if ok and type(rec) == 'table' and type(rec.groups) == 'table' then
    local out = {}
    for _, g in ipairs(rec.groups) do
      if type(g) == 'string' then table.insert(out, g) end
    end
    return out
  end
  return {}
end
"
    };
}

/// Device create. `KEYS` = record key, ID index, then the group index of each of its groups;
/// `ARGV` = record, ID. 1 if created, 0 if the ID exists.
pub(super) const DEVICE_CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], 0, ARGV[2])
for i = 3, #KEYS do redis.call('ZADD', KEYS[i], 0, ARGV[2]) end
return 1
";

/// Device update. `KEYS` = record key, then the group index of each new group; `ARGV` =
/// record, ID, prefix. Takes the device out of the groups it leaves (read from the record it
/// replaces); 1 if updated, 0 if there is no such device.
pub(super) const DEVICE_UPDATE: &str = concat!(
    device_groups_fn!(),
    r"
local old = redis.call('GET', KEYS[1])
if not old then return 0 end
local keep = {}
for i = 2, #KEYS do keep[KEYS[i]] = true end
for _, g in ipairs(device_groups(old)) do
  local k = ARGV[3] .. 'grp:' .. g
  if not keep[k] then redis.call('ZREM', k, ARGV[2]) end
end
redis.call('SET', KEYS[1], ARGV[1])
for i = 2, #KEYS do redis.call('ZADD', KEYS[i], 0, ARGV[2]) end
return 1
"
);

/// Device delete, registry part (shard 0). `KEYS` = record key, ID index; `ARGV` = ID,
/// prefix. Removes the record, its index entry and its group index entries; 1 if it existed.
pub(super) const DEVICE_DELETE: &str = concat!(
    device_groups_fn!(),
    r"
local old = redis.call('GET', KEYS[1])
if not old then return 0 end
for _, g in ipairs(device_groups(old)) do
  redis.call('ZREM', ARGV[2] .. 'grp:' .. g, ARGV[1])
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"
);

/// Device delete, the device's own shard. `KEYS` = order zset, state hash, expiry zset,
/// old-format shadow, shadow; `ARGV[1]` = device. Drops the queue with its expiry index entries, and the shadow.
pub(super) const DEVICE_PURGE: &str = r"
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('ZREM', KEYS[3], m .. ' ' .. ARGV[1])
end
return redis.call('DEL', KEYS[1], KEYS[2], KEYS[4], KEYS[5])
";

/// Index ranges. `KEYS` = lex-ordered zsets (score 0); `ARGV` = `ZRANGEBYLEX` start, limit.
/// One array of up to `limit` members per key, from the start on.
pub(super) const INDEX_RANGE: &str = r"
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = redis.call('ZRANGEBYLEX', k, ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[2]))
end
return out
";

/// Document write. `KEYS` = document hash, kind index; `ARGV` = ID, body, expectation
/// (`absent`, `version` or `any`), expected version. `{1, new version}` when written, else
/// `{0, current version or nil}`.
pub(super) const DOC_PUT: &str = r"
local cur = redis.call('HGET', KEYS[1], 'v')
local ok
if ARGV[3] == 'absent' then
  ok = not cur
elseif ARGV[3] == 'version' then
  ok = cur == ARGV[4]
else
  ok = true
end
if not ok then return {0, cur} end
local v = redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[1], 'b', ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return {1, v}
";

/// Document list. `KEYS[1]` = kind index; `ARGV` = prefix of the kind's document keys,
/// `ZRANGEBYLEX` start, limit. Flat `{id, version, body, ...}` in ID order.
pub(super) const DOC_LIST: &str = r"
local ids = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[2], '+', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', ARGV[1] .. id, 'v', 'b')
  if f[1] then
    table.insert(out, id)
    table.insert(out, f[1])
    table.insert(out, f[2] or '')
  end
end
return out
";

/// Document delete. `KEYS` = document hash, kind index; `ARGV[1]` = ID. 1 if it existed.
pub(super) const DOC_DELETE: &str = r"
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return n
";

/// Conditional audit append. `KEYS` = stream, head string; `ARGV` = expected head (a missing
/// head is ''), new head, then the entries. The new entries' IDs in order, or nil (nothing
/// written) when the head is not the expected one.
pub(super) const AUDIT_APPEND: &str = r"
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[1] then return false end
local ids = {}
for i = 3, #ARGV do
  table.insert(ids, redis.call('XADD', KEYS[1], '*', 'e', ARGV[i]))
end
redis.call('SET', KEYS[2], ARGV[2])
return ids
";

/// An alert's new state. `KEYS` = alerts stream, open-alerts hash; `ARGV` = stream length
/// bound (approximate), alert ID, alert JSON, `1` (open) or `0` (resolved). The new
/// record's stream ID.
pub(super) const ALERT_RECORD: &str = r"
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'a', ARGV[3])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
else
  redis.call('HDEL', KEYS[2], ARGV[2])
end
return id
";

/// Job execution helpers, as Lua functions over one job's keys on one shard: `jx` (device
/// -> `<state> <updated_ms> <msgid>`, see `codec::decode_job_exec`), `jc` (state -> count),
/// `jq` (devices still queued).
/// - `job_rank(state)`: as `JobExecState::rank`.
/// - `job_get(jx, device)`: `state, msgid`; nil if there is none, false if it is unreadable.
/// - `job_set(jx, jc, jq, device, old state or nil, new state, now, msgid)`.
/// - `job_touch(keys, ttl)`: restarts the retention of every key.
macro_rules! job_fns {
    () => {
        r"
local JOB_RANK = {queued = 0, delivered = 1}
local function job_rank(state) return JOB_RANK[state] or 2 end
local function job_get(jx, dev)
  local cur = redis.call('HGET', jx, dev)
  if not cur then return nil end
  local st, m = string.match(cur, '^(%S+) %S+ (.+)$')
  if not st then return false end
  return st, m
end
local function job_set(jx, jc, jq, dev, old, new, now, m)
  redis.call('HSET', jx, dev, new .. ' ' .. now .. ' ' .. m)
  if old then redis.call('HINCRBY', jc, old, -1) end
  redis.call('HINCRBY', jc, new, 1)
  if old == 'queued' then redis.call('SREM', jq, dev) end
  if new == 'queued' then redis.call('SADD', jq, dev) end
end
local function job_touch(keys, ttl)
  for _, k in ipairs(keys) do redis.call('PEXPIRE', k, ttl) end
end
"
    };
}

/// Job push, for the devices of one shard. `KEYS` = `jx`, `jxi`, `jc`, `jq` of the job,
/// expiry zset, sequence counter; `ARGV` = prefix, max queue length, retention in ms, now_ms,
/// then per command: device, msgid, encoded command, expires_ms, encoded `Deliver`. Per
/// command, in order: 0 when the device already has an execution (nothing queued), else
/// the queue push of `queue_push_fn` with its execution recorded: 1 queued, 2 queue full
/// (recorded as failed).
pub(super) const JOB_PUSH: &str = concat!(
    queue_push_fn!(),
    job_fns!(),
    r"
local prefix, max, now = ARGV[1], tonumber(ARGV[2]), ARGV[4]
local out = {}
local wrote = false
for i = 5, #ARGV, 5 do
  local d, m = ARGV[i], ARGV[i + 1]
  if redis.call('HEXISTS', KEYS[1], d) == 1 then
    table.insert(out, 0)
  else
    local r = queue_push(prefix .. 'q:' .. d, prefix .. 'qh:' .. d, KEYS[5], KEYS[6],
      prefix .. 'p:' .. d, m, ARGV[i + 2], ARGV[i + 3], max, d, prefix, ARGV[i + 4])
    local state = 'queued'
    if r[1] == -1 then
      state = 'failed'
      table.insert(out, 2)
    else
      table.insert(out, 1)
    end
    redis.call('ZADD', KEYS[2], 0, d)
    job_set(KEYS[1], KEYS[3], KEYS[4], d, nil, state, now, m)
    wrote = true
  end
end
if wrote then job_touch({KEYS[1], KEYS[2], KEYS[3], KEYS[4]}, ARGV[3]) end
return out
"
);

/// Job record. `KEYS` = `jx`, `jxi`, `jc`, `jq`; `ARGV` = device, state, its rank, now_ms,
/// retention in ms. 1 if the execution moved up to the state, 0 if there is none or it is
/// as far already, -1 if it is unreadable.
pub(super) const JOB_RECORD: &str = concat!(
    job_fns!(),
    r"
local st, m = job_get(KEYS[1], ARGV[1])
if st == nil then return 0 end
if st == false then return -1 end
if tonumber(ARGV[3]) <= job_rank(st) then return 0 end
job_set(KEYS[1], KEYS[3], KEYS[4], ARGV[1], st, ARGV[2], ARGV[4], m)
job_touch(KEYS, ARGV[5])
return 1
"
);

/// Job executions. `KEYS` = `jxi`, `jx`; `ARGV` = `ZRANGEBYLEX` start, limit. Flat
/// `{device, encoded execution, ...}` in device order.
pub(super) const JOB_EXECS: &str = r"
local ids = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, d in ipairs(ids) do
  local e = redis.call('HGET', KEYS[2], d)
  if e then
    table.insert(out, d)
    table.insert(out, e)
  end
end
return out
";

/// Job cancel, on one shard. `KEYS` = `jx`, `jxi`, `jc`, `jq`, expiry zset; `ARGV` = prefix,
/// limit, now_ms, retention in ms. Takes up to `limit` queued executions: a command still in
/// its queue with no delivery attempt leaves the queue and is cancelled, any other was sent
/// meanwhile and is delivered. Returns how many it took.
pub(super) const JOB_CANCEL: &str = concat!(
    job_fns!(),
    r"
local devs = redis.call('SPOP', KEYS[4], tonumber(ARGV[2]))
for _, d in ipairs(devs) do
  local st, m = job_get(KEYS[1], d)
  if st == 'queued' then
    local qh = ARGV[1] .. 'qh:' .. d
    local f = redis.call('HMGET', qh, 'c:' .. m, 'a:' .. m)
    local new = 'delivered'
    if f[1] and tonumber(f[2] or '0') == 0 then
      redis.call('HDEL', qh, 'c:' .. m, 'e:' .. m, 'a:' .. m, 'r:' .. m)
      redis.call('ZREM', ARGV[1] .. 'q:' .. d, m)
      redis.call('ZREM', KEYS[5], m .. ' ' .. d)
      new = 'cancelled'
    end
    job_set(KEYS[1], KEYS[3], KEYS[4], d, st, new, ARGV[3], m)
  end
end
if #devs > 0 then job_touch({KEYS[1], KEYS[2], KEYS[3], KEYS[4]}, ARGV[4]) end
return #devs
"
);
