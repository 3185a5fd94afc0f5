//! Shadows on Redis: one hash per device (`shd:<device>`), so a device's reported state
//! merges in one script with no read-modify-write in the node, inside the same script call as
//! the message's telemetry record and fan-out (see `ingest.rs`).
//!
//! Fields: `v` version, `t` last change (ms), `d` the desired state (one JSON object, written
//! only by the guarded desired path), and `r:<key>` one reported top-level key's value as the
//! JSON text serde_json wrote. Lua compares and stores those texts and never parses them, so
//! numbers stay exactly as the node encoded them (Lua's cjson would turn them into doubles).
//! serde_json writes equal values as equal texts (objects with sorted keys), so "changed" in
//! Lua means what [`crate::merge_patch`] means.
//!
//! Shadows written by earlier versions live in a JSON string at `sh:<device>`; the first
//! read or write of such a device moves it into the hash ([`RedisBus::shadow_migrate`]).

use fred::interfaces::{HashesInterface, KeysInterface};
use fred::types::Value;
use serde_json::Map;

use super::{RedisBus, codec, fred_err, int, v};
use crate::{BusError, BusResult, DesiredMerge, Shadow};

/// How often a guarded desired write retries after losing a race with another writer.
const SHADOW_RETRIES: usize = 64;

/// The Lua function that merges reported values; shared by [`SHADOW_MERGE`] and the ingest
/// script. `patch[first..=last]` holds `key, json text` pairs, `''` deleting the key. Answers
/// the version (unchanged when nothing changed; 0 and no hash created when there was none),
/// or -1 when the shadow is still in the old format at `old` (the caller migrates it first).
///
/// One `HMGET` reads the version and every patched field, one `HSET` writes the changed
/// fields with the new version and time (plus an `HDEL` only when keys are removed): each
/// `redis.call` costs more than the hash work it does, so a status costs two calls however
/// many keys it reports. Long patches go in chunks, as Lua's `unpack` is bounded.
pub(super) const MERGE_REPORTED_FN: &str = r"
local function chunked(cmd, k, list)
  local out = {}
  for i = 1, #list, 512 do
    local r = redis.call(cmd, k, unpack(list, i, math.min(i + 511, #list)))
    if type(r) == 'table' then
      for j = 1, #r do out[#out + 1] = r[j] end
    end
  end
  return out
end
local function merge_reported(k, old, now, patch, first, last)
  local fields = {'v'}
  for i = first, last, 2 do fields[#fields + 1] = 'r:' .. patch[i] end
  local cur = chunked('HMGET', k, fields)
  if not cur[1] and redis.call('EXISTS', old) == 1 then
    return -1
  end
  local set, del = {}, {}
  for j = 2, #fields do
    local val = patch[first + 2 * (j - 2) + 1]
    if val == '' then
      if cur[j] then del[#del + 1] = fields[j] end
    elseif cur[j] ~= val then
      set[#set + 1] = fields[j]
      set[#set + 1] = val
    end
  end
  local version = tonumber(cur[1] or '0')
  if #set == 0 and #del == 0 then
    return version
  end
  version = version + 1
  if #del > 0 then chunked('HDEL', k, del) end
  set[#set + 1] = 't'
  set[#set + 1] = now
  set[#set + 1] = 'v'
  set[#set + 1] = version
  chunked('HSET', k, set)
  return version
end
";

/// Reported merge on its own. `KEYS` = shadow hash, old shadow key; `ARGV` = now, then
/// `key, json text` pairs.
pub(super) const SHADOW_MERGE: &str = r"
return merge_reported(KEYS[1], KEYS[2], ARGV[1], ARGV, 2, #ARGV)
";

/// Desired write, compare-and-set on the version. `KEYS[1]` = shadow hash; `ARGV` = expected
/// version, desired JSON, new version, now. 1 when written, 0 when the version moved.
pub(super) const SHADOW_SET_DESIRED: &str = r"
if tonumber(redis.call('HGET', KEYS[1], 'v') or '0') ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'd', ARGV[2], 'v', ARGV[3], 't', ARGV[4])
return 1
";

/// Moves an old-format shadow into its hash. `KEYS` = old string key, hash; `ARGV` = the
/// old text as read, then field/value pairs. Only while the old key still holds that text
/// and no hash exists; 1 when moved.
pub(super) const SHADOW_MIGRATE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('DEL', KEYS[1])
return 1
";

/// A reported patch as the script's `key, json text` pairs (`''` = delete).
pub(super) fn patch_args(patch: &Map<String, serde_json::Value>) -> Vec<Value> {
    let mut out = Vec::with_capacity(patch.len() * 2);
    for (k, val) in patch {
        out.push(v(k.as_str()));
        out.push(v(if val.is_null() {
            String::new()
        } else {
            val.to_string()
        }));
    }
    out
}

/// The hash's fields for a whole shadow (what a migration writes).
fn shadow_fields(s: &Shadow) -> Vec<Value> {
    let mut out = vec![
        v("v"),
        v(s.version.to_string()),
        v("t"),
        v(s.updated_ms.to_string()),
        v("d"),
        v(serde_json::Value::Object(s.desired.clone()).to_string()),
    ];
    for (k, val) in &s.reported {
        out.push(v(format!("r:{k}")));
        out.push(v(val.to_string()));
    }
    out
}

/// A shadow from its hash's fields; `None` for an empty hash.
fn decode_hash(pairs: Vec<(String, String)>) -> BusResult<Option<Shadow>> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let corrupt = |what: &str| BusError::Corrupt(format!("shadow hash: {what}"));
    let mut s = Shadow::default();
    for (field, text) in pairs {
        match field.as_str() {
            "v" => s.version = text.parse().map_err(|_| corrupt("version"))?,
            "t" => s.updated_ms = text.parse().map_err(|_| corrupt("updated_ms"))?,
            "d" => {
                s.desired = serde_json::from_str(&text).map_err(|_| corrupt("desired"))?;
            }
            other => {
                let key = other.strip_prefix("r:").ok_or_else(|| corrupt("field"))?;
                let val = serde_json::from_str(&text).map_err(|_| corrupt("reported value"))?;
                s.reported.insert(key.to_owned(), val);
            }
        }
    }
    s.recompute_delta();
    Ok(Some(s))
}

impl RedisBus {
    /// The shadow hash's key and the old-format key of `device`.
    pub(super) fn shadow_keys(&self, device: &str) -> [String; 2] {
        [self.key("shd:", device), self.key("sh:", device)]
    }

    /// Reads `device`'s shadow, moving an old-format one into its hash on the way.
    pub(super) async fn shadow_load(&self, device: &str) -> BusResult<Option<Shadow>> {
        let shard = self.shard_for(device);
        let [hash, old] = self.shadow_keys(device);
        for _ in 0..SHADOW_RETRIES {
            let pairs: Vec<(String, String)> = self
                .client(shard)
                .hgetall::<Vec<(String, String)>, _>(&hash)
                .await
                .map_err(fred_err)?;
            if !pairs.is_empty() {
                return decode_hash(pairs);
            }
            let text: Option<String> = self.client(shard).get(&old).await.map_err(fred_err)?;
            let Some(text) = text else {
                return Ok(None);
            };
            let shadow = codec::decode_shadow(&text)?;
            let mut args = vec![v(text)];
            args.extend(shadow_fields(&shadow));
            let moved = self
                .eval(
                    shard,
                    &self.inner.scripts.shadow_migrate,
                    vec![old.clone(), hash.clone()],
                    args,
                )
                .await?;
            if int("shadow migrate", moved)? == 1 {
                return Ok(Some(shadow));
            }
            // Someone else moved or changed it meanwhile: read again.
        }
        Err(BusError::Unavailable(format!(
            "shadow of {device} changed concurrently {SHADOW_RETRIES} times"
        )))
    }

    /// Moves an old-format shadow into its hash (nothing when there is none).
    pub(super) async fn shadow_migrate(&self, device: &str) -> BusResult<()> {
        self.shadow_load(device).await.map(drop)
    }

    /// Merges a reported patch by script, migrating an old-format shadow first.
    pub(super) async fn shadow_merge(
        &self,
        device: &str,
        patch: &Map<String, serde_json::Value>,
        now_ms: i64,
    ) -> BusResult<u64> {
        let shard = self.shard_for(device);
        let keys = self.shadow_keys(device).to_vec();
        let mut args = vec![Value::Integer(now_ms)];
        args.extend(patch_args(patch));
        for _ in 0..2 {
            let reply = self
                .eval(
                    shard,
                    &self.inner.scripts.shadow_merge,
                    keys.clone(),
                    args.clone(),
                )
                .await?;
            match int("shadow merge", reply)? {
                -1 => self.shadow_migrate(device).await?,
                version => {
                    return u64::try_from(version)
                        .map_err(|_| BusError::Corrupt("shadow version".into()));
                }
            }
        }
        Err(BusError::Corrupt(format!(
            "shadow of {device} would not migrate"
        )))
    }

    /// A guarded desired write: read, let [`crate::types::apply_desired`] decide, then
    /// compare-and-set on the version (retrying when another write came in between).
    pub(super) async fn shadow_desired(
        &self,
        device: &str,
        patch: &Map<String, serde_json::Value>,
        guard: &crate::DesiredGuard,
        now_ms: i64,
    ) -> BusResult<DesiredMerge> {
        let shard = self.shard_for(device);
        let [hash, _] = self.shadow_keys(device);
        for _ in 0..SHADOW_RETRIES {
            let current = self.shadow_load(device).await?;
            let next = match crate::types::apply_desired(current.as_ref(), patch, guard, now_ms) {
                Err(refused) => return Ok(refused),
                Ok(None) => return Ok(DesiredMerge::Merged(current.unwrap_or_default())),
                Ok(Some(next)) => next,
            };
            let written = self
                .eval(
                    shard,
                    &self.inner.scripts.shadow_set_desired,
                    vec![hash.clone()],
                    vec![
                        v(current.as_ref().map_or(0, |s| s.version).to_string()),
                        v(serde_json::Value::Object(next.desired.clone()).to_string()),
                        v(next.version.to_string()),
                        Value::Integer(now_ms),
                    ],
                )
                .await?;
            if int("shadow desired", written)? == 1 {
                return Ok(DesiredMerge::Merged(next));
            }
        }
        Err(BusError::Unavailable(format!(
            "shadow of {device} changed concurrently {SHADOW_RETRIES} times"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patches_become_json_texts_and_null_deletes() {
        let patch = json!({"a": 1.5, "b": null, "c": {"y": 1, "x": "s"}});
        let args = patch_args(patch.as_object().unwrap());
        let texts: Vec<String> = args.into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(texts, ["a", "1.5", "b", "", "c", r#"{"x":"s","y":1}"#]);
    }

    #[test]
    fn hash_fields_read_back_as_the_shadow() {
        let mut s = Shadow {
            reported: json!({"t": 21.5, "on": true}).as_object().unwrap().clone(),
            desired: json!({"t": 20}).as_object().unwrap().clone(),
            version: 7,
            updated_ms: 1234,
            ..Shadow::default()
        };
        s.recompute_delta();
        let fields: Vec<String> = shadow_fields(&s)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let pairs = fields
            .chunks(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect();
        assert_eq!(decode_hash(pairs).unwrap(), Some(s));
        assert_eq!(decode_hash(Vec::new()).unwrap(), None);
        assert!(decode_hash(vec![("x".into(), "1".into())]).is_err());
    }
}
