//! The Lua scripts of the Redis backend. Each runs atomically on one shard.
//!
//! Some scripts derive further key names from a device or node ID (`ARGV` carries the key
//! prefix); that is fine on a plain Redis server, which is all this backend targets (sharding
//! is client-side, no Redis Cluster), and keeps each operation to one round trip.
//!
//! Lua `false` reaches the client as nil; arrays may hold nils as `false` entries.

/// Presence set. `KEYS[1]` = presence hash; `ARGV` = prefix, device, node, conn, since.
/// Writes the entry, moves the device between node index sets, and returns the previous
/// entry `{node, conn, since}` if its node is alive, else nil.
pub(super) const PRESENCE_SET: &str = r"
local old = redis.call('HMGET', KEYS[1], 'node', 'conn', 'since')
redis.call('HSET', KEYS[1], 'node', ARGV[3], 'conn', ARGV[4], 'since', ARGV[5])
if old[1] and old[1] ~= ARGV[3] then
  redis.call('SREM', ARGV[1] .. 'pn:' .. old[1], ARGV[2])
end
redis.call('SADD', ARGV[1] .. 'pn:' .. ARGV[3], ARGV[2])
if old[1] and redis.call('EXISTS', ARGV[1] .. 'node:' .. old[1]) == 1 then
  return old
end
return false
";

/// Presence get. `KEYS` = presence hashes; `ARGV[1]` = prefix. One entry per key:
/// `{node, conn, since}` when present and its node is alive, else nil.
pub(super) const PRESENCE_GET: &str = r"
local out = {}
for i, k in ipairs(KEYS) do
  local p = redis.call('HMGET', k, 'node', 'conn', 'since')
  if p[1] and redis.call('EXISTS', ARGV[1] .. 'node:' .. p[1]) == 1 then
    out[i] = p
  else
    out[i] = false
  end
end
return out
";

/// Presence compare-and-delete. `KEYS[1]` = presence hash; `ARGV` = prefix, device, conn.
pub(super) const PRESENCE_REMOVE: &str = r"
local p = redis.call('HMGET', KEYS[1], 'node', 'conn')
if p[1] and p[2] == ARGV[3] then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', ARGV[1] .. 'pn:' .. p[1], ARGV[2])
  return 1
end
return 0
";

/// One batch of a node sweep. `KEYS[1]` = the node's index set; `ARGV` = prefix, node,
/// batch size. Pops up to a batch of devices, deletes those whose entry still names the node;
/// returns `{deleted, left in the index}`.
pub(super) const PRESENCE_SWEEP: &str = r"
local devs = redis.call('SPOP', KEYS[1], tonumber(ARGV[3]))
local n = 0
for _, d in ipairs(devs) do
  local k = ARGV[1] .. 'p:' .. d
  if redis.call('HGET', k, 'node') == ARGV[2] then
    redis.call('DEL', k)
    n = n + 1
  end
end
return {n, redis.call('SCARD', KEYS[1])}
";

/// Lists live nodes. `KEYS[1]` = node ID set; `ARGV[1]` = prefix. Returns the encoded
/// entries; IDs whose key expired are dropped from the set.
pub(super) const NODES_LIST: &str = r"
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('GET', ARGV[1] .. 'node:' .. id)
  if v then
    table.insert(out, v)
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
";

/// The queue push step as a Lua function, shared by [`QUEUE_PUSH`] and the job push script
/// (`admin_scripts::JOB_PUSH`) so that a job's command is queued exactly like any other.
/// `queue_push(q, qh, qexp, qseq, p, msgid, command, expires_ms, max, device, prefix,
/// deliver)` takes the order zset, state hash, expiry zset, sequence counter and presence
/// hash keys, and returns `{status}` (1 pushed, 0 duplicate, -1 full), followed by the
/// presence `node, conn, since` when the device is online, whose node is then sent `deliver`.
macro_rules! queue_push_fn {
    () => {
        r"
local function queue_push(q, qh, qexp, qseq, p, m, cmd, exp, max, dev, prefix, deliver)
  local status = 1
  if redis.call('HEXISTS', qh, 'c:' .. m) == 1 then
    status = 0
  elseif redis.call('ZCARD', q) >= max then
    return {-1}
  else
    local seq = redis.call('INCR', qseq)
    redis.call('ZADD', q, seq, m)
    redis.call('HSET', qh, 'c:' .. m, cmd, 'e:' .. m, exp)
    redis.call('ZADD', qexp, exp, m .. ' ' .. dev)
  end
  local pr = redis.call('HMGET', p, 'node', 'conn', 'since')
  if pr[1] and redis.call('EXISTS', prefix .. 'node:' .. pr[1]) == 1 then
    redis.call('PUBLISH', prefix .. 'nodech:' .. pr[1], deliver)
    return {status, pr[1], pr[2], pr[3]}
  end
  return {status}
end
"
    };
}
pub(super) use queue_push_fn;

/// Queue push. `KEYS` = order zset, state hash, expiry zset, sequence counter, presence
/// hash; `ARGV` = msgid, command, expires_ms, max length, device, prefix, encoded `Deliver`.
/// Replies as `queue_push` in [`queue_push_fn`].
pub(super) const QUEUE_PUSH: &str = concat!(
    queue_push_fn!(),
    r"
return queue_push(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
  ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7])
"
);

/// The queue read as a Lua function, shared by [`QUEUE_PENDING`] and [`QUEUE_ACK_NEXT`].
/// `queue_pending(q, qh, now, limit, after, count, skip)` takes the order zset and state
/// hash, and returns up to `limit` unexpired commands in push order, starting after `after`
/// if it is queued (so a caller with commands in flight reads only the new ones), minus the
/// msgids that are keys of `skip`, each `{command, attempts, release mark}`; with `count`
/// it counts a delivery attempt for each returned command.
pub(super) const QUEUE_PENDING_FN: &str = r"
local function queue_pending(q, qh, now, limit, after, count, skip)
  local out = {}
  local start = 0
  if after ~= '' then
    local rank = redis.call('ZRANK', q, after)
    if rank then start = rank + 1 end
  end
  while #out < limit do
    local ids = redis.call('ZRANGE', q, start, start + 99)
    if #ids == 0 then break end
    for _, m in ipairs(ids) do
      if not skip[m] then
        local f = redis.call('HMGET', qh, 'c:' .. m, 'e:' .. m, 'a:' .. m, 'r:' .. m)
        if f[1] and tonumber(f[2]) > now then
          local attempts = f[3] or '0'
          if count then
            attempts = tostring(redis.call('HINCRBY', qh, 'a:' .. m, 1))
          end
          table.insert(out, {f[1], attempts, f[4]})
          if #out >= limit then break end
        end
      end
    end
    start = start + 100
  end
  return out
end
local function skip_set(first)
  local skip = {}
  for i = first, #ARGV do skip[ARGV[i]] = true end
  return skip
end
";

/// Pending commands. `KEYS` = order zset, state hash; `ARGV` = now_ms, limit, after (a msgid
/// or ''), count ('1' to count a delivery attempt for each returned command), then msgids to
/// skip. Replies as `queue_pending` in [`QUEUE_PENDING_FN`].
pub(super) const QUEUE_PENDING: &str = r"
return queue_pending(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3],
  ARGV[4] == '1', skip_set(5))
";

/// Attempt count. `KEYS[1]` = state hash; `ARGV[1]` = msgid. The new count or nil.
pub(super) const QUEUE_ATTEMPT: &str = r"
if redis.call('HEXISTS', KEYS[1], 'c:' .. ARGV[1]) == 0 then return false end
return redis.call('HINCRBY', KEYS[1], 'a:' .. ARGV[1], 1)
";

/// QoS 2 release. `KEYS[1]` = state hash; `ARGV` = msgid, '1' if a result is given, result.
/// Returns `{command, attempts, release mark}` or nil.
pub(super) const QUEUE_RELEASE: &str = r"
local c = redis.call('HGET', KEYS[1], 'c:' .. ARGV[1])
if not c then return false end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'r:' .. ARGV[1], ARGV[3])
elseif redis.call('HEXISTS', KEYS[1], 'r:' .. ARGV[1]) == 0 then
  redis.call('HSET', KEYS[1], 'r:' .. ARGV[1], '')
end
local f = redis.call('HMGET', KEYS[1], 'a:' .. ARGV[1], 'r:' .. ARGV[1])
return {c, f[1] or '0', f[2]}
";

/// Ack / fail as a Lua function, shared by [`QUEUE_REMOVE`] and [`QUEUE_ACK_NEXT`].
/// `queue_remove(q, qh, qexp, msgid, device)` removes the command from every structure and
/// returns it as `{command, attempts, release mark}`, or false when it was not queued.
pub(super) const QUEUE_REMOVE_FN: &str = r"
local function queue_remove(q, qh, qexp, m, dev)
  local f = redis.call('HMGET', qh, 'c:' .. m, 'a:' .. m, 'r:' .. m)
  if not f[1] then return false end
  redis.call('HDEL', qh, 'c:' .. m, 'e:' .. m, 'a:' .. m, 'r:' .. m)
  redis.call('ZREM', q, m)
  redis.call('ZREM', qexp, m .. ' ' .. dev)
  return {f[1], f[2] or '0', f[3]}
end
";

/// Ack / fail. `KEYS` = order zset, state hash, expiry zset; `ARGV` = msgid, device.
/// Returns the removed `{command, attempts, release mark}` or nil.
pub(super) const QUEUE_REMOVE: &str = r"
return queue_remove(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
";

/// Ack, result and refill in one step. `KEYS` = order zset, state hash, expiry zset, result
/// key; `ARGV` = msgid, device, now_ms, limit, after (a msgid or ''), node channel ('' when
/// nobody waits), encoded outcome, encoded result message, result TTL (ms), then msgids to
/// skip. Removes the command; if it was queued and someone waits, stores its outcome and
/// publishes it (as [`RESULT_SEND`]); then reads the next commands counting an attempt each
/// (as [`QUEUE_PENDING`] with count). Returns `{removed or nil, next}`.
pub(super) const QUEUE_ACK_NEXT: &str = r"
local removed = queue_remove(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
if removed and ARGV[6] ~= '' then
  redis.call('SET', KEYS[4], ARGV[7], 'PX', ARGV[9])
  redis.call('PUBLISH', ARGV[6], ARGV[8])
end
local next = queue_pending(KEYS[1], KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5],
  true, skip_set(10))
return {removed, next}
";

/// Take expired. `KEYS[1]` = expiry zset; `ARGV` = prefix, now_ms, limit. Removes up to
/// `limit` commands expiring at or before now from every structure and returns them as
/// `{command, attempts, release mark}`.
pub(super) const QUEUE_TAKE_EXPIRED: &str = r"
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, item in ipairs(items) do
  redis.call('ZREM', KEYS[1], item)
  local sp = string.find(item, ' ', 1, true)
  if sp then
    local m = string.sub(item, 1, sp - 1)
    local d = string.sub(item, sp + 1)
    local h = ARGV[1] .. 'qh:' .. d
    local f = redis.call('HMGET', h, 'c:' .. m, 'a:' .. m, 'r:' .. m)
    if f[1] then
      redis.call('HDEL', h, 'c:' .. m, 'e:' .. m, 'a:' .. m, 'r:' .. m)
      redis.call('ZREM', ARGV[1] .. 'q:' .. d, m)
      table.insert(out, {f[1], f[2] or '0', f[3]})
    end
  end
end
return out
";

/// Telemetry append. `KEYS` = one stream per record; `ARGV` = max length, then six fields
/// per record (see `codec::telemetry_fields`).
pub(super) const TELEMETRY_APPEND: &str = r"
for i, k in ipairs(KEYS) do
  local b = 1 + (i - 1) * 6
  redis.call('XADD', k, 'MAXLEN', '~', ARGV[1], '*',
    'device', ARGV[b + 1], 'msgid', ARGV[b + 2], 'kind', ARGV[b + 3],
    'ts', ARGV[b + 4], 'rcv', ARGV[b + 5], 'payload', ARGV[b + 6])
end
return #KEYS
";

/// Result send. `KEYS[1]` = result key; `ARGV` = node channel, encoded outcome, encoded
/// message, TTL in ms. Stores before publishing, so a waiter that hears nothing can read it.
pub(super) const RESULT_SEND: &str = r"
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
return redis.call('PUBLISH', ARGV[1], ARGV[3])
";

/// Fan-out publish of one frame to one shard's channels. `KEYS` = per channel: position
/// hash, history stream, retained key; `ARGV` = frame, now (ms), history size, history TTL
/// (ms), then per channel: Redis channel, retain (`1`/`0`). For each channel: sets the
/// retained value if asked; on a watched channel (its position hash exists) also assigns the
/// next offset, keeps the frame in the history and publishes `<offset> <frame>`. Returns the
/// number of channels.
pub(super) const FANOUT_PUBLISH: &str = r"
local size = tonumber(ARGV[3])
local channels = #KEYS / 3
for c = 0, channels - 1 do
  publish_one(KEYS[3 * c + 1], KEYS[3 * c + 2], KEYS[3 * c + 3], ARGV[5 + 2 * c],
    ARGV[6 + 2 * c] == '1', ARGV[1], ARGV[2], size, ARGV[4])
end
return channels
";

/// The Lua function behind [`FANOUT_PUBLISH`] and the ingest script: one frame to one
/// channel (position hash, history stream, retained key, Redis channel).
pub(super) const PUBLISH_ONE_FN: &str = r"
local function publish_one(pos, hist, ret, channel, retain, frame, now, size, ttl)
  if retain then
    redis.call('SET', ret, frame)
  end
  if redis.call('EXISTS', pos) == 1 then
    local n = redis.call('HINCRBY', pos, 'n', 1)
    if size > 0 then
      if n == 1 then
        redis.call('DEL', hist)
      end
      redis.call('XADD', hist, 'MAXLEN', size, n .. '-0', 't', now, 'f', frame)
      redis.call('PEXPIRE', hist, ttl)
    end
    redis.call('PUBLISH', channel, n .. ' ' .. frame)
  end
end
";

/// Fan-out watch. `KEYS` = position hashes (one shard's); `ARGV` = TTL (ms), epoch prefix.
/// Creates each missing position (offset 0, a new epoch) and keeps it for the TTL.
pub(super) const FANOUT_WATCH: &str = r"
for i, k in ipairs(KEYS) do
  if redis.call('HSETNX', k, 'e', ARGV[2] .. '-' .. i) == 1 then
    redis.call('HSET', k, 'n', 0)
  end
  redis.call('PEXPIRE', k, ARGV[1])
end
return #KEYS
";

/// Fan-out history. `KEYS` = position hash, history stream; `ARGV` = TTL (ms), epoch
/// prefix, since (empty: none), limit, now (ms). Watches the channel as [`FANOUT_WATCH`]
/// does, then answers `{epoch, offset, complete, offset1, frame1, ...}` with the kept frames
/// after `since` that are younger than the TTL.
pub(super) const FANOUT_HISTORY: &str = r"
if redis.call('HSETNX', KEYS[1], 'e', ARGV[2]) == 1 then
  redis.call('HSET', KEYS[1], 'n', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
local pos = redis.call('HMGET', KEYS[1], 'e', 'n')
local n = tonumber(pos[2])
local out = {pos[1], n, 1}
if ARGV[3] == '' then
  return out
end
local since = tonumber(ARGV[3])
local oldest = tonumber(ARGV[5]) - tonumber(ARGV[1])
local first = nil
if since < n then
  local entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+', 'COUNT', tonumber(ARGV[4]))
  for _, e in ipairs(entries) do
    local f = e[2]
    local t, frame = nil, nil
    for j = 1, #f, 2 do
      if f[j] == 't' then t = tonumber(f[j + 1]) elseif f[j] == 'f' then frame = f[j + 1] end
    end
    if t and frame and t >= oldest then
      local off = tonumber(string.match(e[1], '^(%d+)'))
      if not first then first = off end
      out[#out + 1] = off
      out[#out + 1] = frame
    end
  end
end
if since > n or (since < n and first ~= since + 1) then
  out[3] = 0
end
return out
";
