//! The data path of accepted device messages on Redis: telemetry append, shadow merge and
//! fan-out publish of many sessions' messages in one script call per shard.
//!
//! Each shard has one writer task fed by a bounded channel. A session's [`Bus::accept`]
//! call becomes one job per shard (the operations of its messages whose keys live there);
//! the writer takes every job waiting when it is free (up to [`MAX_BATCH_OPS`] operations),
//! runs them as one `INGEST` script call, and answers each job with its own results. While a
//! call is in flight the next batch gathers, so a quiet node sends one message per call with
//! no added delay and a busy one sends hundreds: the number of round trips, wake-ups and
//! `EVALSHA`s per message falls as load rises. A full channel makes sessions wait
//! (backpressure), never buffers without bound.
//!
//! QoS answers promise durability: a job is answered only after the script returned, and a
//! failed call fails every job in it (their sessions answer "unavailable; retry"). A failed
//! shadow merge or publish inside the script (`pcall`) fails only itself, counted in the
//! report, as when those were separate calls. When a message's keys live on different shards
//! (several Redis URLs) its telemetry goes first and its shadow and fan-out follow once that
//! is stored, so nothing is published that was not stored.
//!
//! [`Bus::accept`]: crate::Bus::accept

use std::collections::BTreeMap;

use fred::clients::Client;
use fred::types::Value;
use fred::types::scripts::Script;
use tokio::sync::{mpsc, oneshot};

use super::{RedisBus, array, codec, fred_err, scripts, shadow, v};
use crate::{AcceptReport, Accepted, BusError, BusResult, partition_for};

/// Most operations one script call carries: bounds the time Redis spends in one call
/// (a few milliseconds at most) and the size of one request.
const MAX_BATCH_OPS: usize = 2048;
/// Jobs waiting per shard before sessions wait for room.
const QUEUE: usize = 1024;

/// The ingest script: `ARGV` = now (ms), telemetry max length, history size, history TTL (ms),
/// then operations, each consuming its keys in order:
/// - `T device msgid kind ts rcv payload` (1 key, the partition stream): append; errors abort
///   the call (durability is what the caller waits for);
/// - `S now n key1 text1 ...` (2 keys, shadow hash and old-format key): reported merge;
/// - `F frame`: the frame the following `P`s publish;
/// - `P channel retain` (3 keys, position, history, retained): publish.
///
/// Answers one value per `T`/`S`/`P`: 1, the shadow version (-1: old format, migrate
/// first), or -2 when that shadow merge or publish failed.
const INGEST_BODY: &str = r"
local now, maxlen, size, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local out, a, k, frame = {}, 5, 1, ''
while a <= #ARGV do
  local op = ARGV[a]
  if op == 'T' then
    redis.call('XADD', KEYS[k], 'MAXLEN', '~', maxlen, '*',
      'device', ARGV[a + 1], 'msgid', ARGV[a + 2], 'kind', ARGV[a + 3],
      'ts', ARGV[a + 4], 'rcv', ARGV[a + 5], 'payload', ARGV[a + 6])
    out[#out + 1] = 1
    k, a = k + 1, a + 7
  elseif op == 'S' then
    local last = a + 2 + 2 * tonumber(ARGV[a + 2])
    local ok, r = pcall(merge_reported, KEYS[k], KEYS[k + 1], ARGV[a + 1], ARGV, a + 3, last)
    out[#out + 1] = ok and r or -2
    k, a = k + 2, last + 1
  elseif op == 'F' then
    frame, a = ARGV[a + 1], a + 2
  elseif op == 'P' then
    local ok = pcall(publish_one, KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[a + 1],
      ARGV[a + 2] == '1', frame, now, size, ttl)
    out[#out + 1] = ok and 1 or -2
    k, a = k + 3, a + 3
  else
    return redis.error_reply('ingest: unknown operation at argument ' .. a)
  end
end
return out
";

/// The whole ingest script, with the functions it shares with other scripts.
pub(super) fn script() -> Script {
    Script::from_lua(format!(
        "{}{}{}",
        shadow::MERGE_REPORTED_FN,
        scripts::PUBLISH_ONE_FN,
        INGEST_BODY
    ))
}

/// What an answer is about.
#[derive(Debug, Clone, Copy)]
enum Op {
    Telemetry,
    /// The shadow merge of message `i`.
    Shadow(usize),
    Publish,
}

/// The operations of one job: keys, arguments, and what each answer is about.
#[derive(Default)]
struct Ops {
    keys: Vec<String>,
    args: Vec<Value>,
    answers: Vec<Op>,
}

/// One session's operations on one shard, and where their answers go.
pub(super) struct Job {
    keys: Vec<String>,
    args: Vec<Value>,
    answers: usize,
    reply: oneshot::Sender<BusResult<Vec<Value>>>,
}

/// The sending side of one shard's writer.
pub(super) type Writer = mpsc::Sender<Job>;

/// Starts the writer of one shard; it ends when every sender is gone.
pub(super) fn spawn_writer(
    client: Client,
    script: Script,
    header: [Value; 3],
) -> (Writer, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (tx, tokio::spawn(writer(client, script, header, rx)))
}

async fn writer(client: Client, script: Script, header: [Value; 3], mut rx: mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut ops = first.answers;
        batch.push(first);
        while ops < MAX_BATCH_OPS {
            match rx.try_recv() {
                Ok(job) => {
                    ops += job.answers;
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let mut keys = Vec::with_capacity(batch.iter().map(|j| j.keys.len()).sum());
        let mut args = Vec::with_capacity(4 + batch.iter().map(|j| j.args.len()).sum::<usize>());
        args.push(Value::Integer(super::wall_ms()));
        args.extend(header.iter().cloned());
        for job in &mut batch {
            keys.append(&mut job.keys);
            args.append(&mut job.args);
        }
        let reply = script
            .evalsha_with_reload::<Value, _, _>(&client, keys, args)
            .await
            .map_err(fred_err)
            .and_then(|v| array("ingest", v))
            .and_then(|values| {
                if values.len() == ops {
                    Ok(values)
                } else {
                    Err(BusError::Corrupt("ingest: wrong number of answers".into()))
                }
            });
        match reply {
            Ok(values) => {
                let mut values = values.into_iter();
                for job in batch.drain(..) {
                    let mine = values.by_ref().take(job.answers).collect();
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(error) => {
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

impl RedisBus {
    /// Adds a message's telemetry append.
    fn telemetry_op(&self, ops: &mut Ops, m: &Accepted) {
        let p = partition_for(&m.record.device, self.inner.config.telemetry_partitions);
        ops.keys.push(self.key("tm:", &p.to_string()));
        ops.args.push(v("T"));
        ops.args.extend(
            codec::telemetry_fields(&m.record)
                .into_iter()
                .map(Value::from),
        );
        ops.answers.push(Op::Telemetry);
    }

    /// Adds message `i`'s shadow merge, if it carries a patch.
    fn shadow_op(&self, ops: &mut Ops, i: usize, m: &Accepted, now_ms: i64) {
        let Some(patch) = &m.shadow else {
            return;
        };
        ops.keys.extend(self.shadow_keys(&m.record.device));
        let pairs = shadow::patch_args(patch);
        ops.args.extend([
            v("S"),
            Value::Integer(now_ms),
            Value::Integer((pairs.len() / 2) as i64),
        ]);
        ops.args.extend(pairs);
        ops.answers.push(Op::Shadow(i));
    }

    /// Adds the frame once and its publishes to the channels `keep` selects.
    fn publish_ops(&self, ops: &mut Ops, m: &Accepted, keep: impl Fn(&crate::Channel) -> bool) {
        let mut framed = false;
        for (channel, retain) in m.channels.iter().filter(|(c, _)| keep(c)) {
            if !framed {
                ops.args.extend([v("F"), Value::Bytes(m.frame.clone())]);
                framed = true;
            }
            ops.keys.extend(self.publish_keys(channel));
            ops.args.extend([
                v("P"),
                v(self.channel_name(channel)),
                v(if *retain { "1" } else { "0" }),
            ]);
            ops.answers.push(Op::Publish);
        }
    }

    /// Sends one job to `shard`'s writer and waits for its answers.
    async fn submit(&self, shard: usize, ops: Ops) -> BusResult<Vec<(Op, Value)>> {
        if ops.answers.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            keys: ops.keys,
            args: ops.args,
            answers: ops.answers.len(),
            reply,
        };
        let gone = || BusError::Unavailable("ingest writer stopped".into());
        self.inner.writers[shard]
            .send(job)
            .await
            .map_err(|_| gone())?;
        let values = answer.await.map_err(|_| gone())??;
        Ok(ops.answers.into_iter().zip(values).collect())
    }

    /// [`crate::Bus::accept`] on Redis (see the module docs).
    pub(super) async fn ingest(
        &self,
        messages: &[Accepted],
        now_ms: i64,
    ) -> BusResult<AcceptReport> {
        let mut report = AcceptReport::default();
        if messages.is_empty() {
            return Ok(report);
        }
        let answers = if self.inner.shards.len() == 1 {
            let mut ops = Ops::default();
            for (i, m) in messages.iter().enumerate() {
                self.telemetry_op(&mut ops, m);
                self.shadow_op(&mut ops, i, m, now_ms);
                self.publish_ops(&mut ops, m, |_| true);
            }
            self.submit(0, ops).await?
        } else {
            self.ingest_sharded(messages, now_ms).await?
        };
        for (op, answer) in answers {
            match (op, answer.as_i64()) {
                (Op::Telemetry, _) => {}
                (Op::Shadow(i), Some(-1)) => {
                    let m = &messages[i];
                    let patch = m.shadow.as_ref().expect("a shadow op has a patch");
                    if self
                        .shadow_merge(&m.record.device, patch, now_ms)
                        .await
                        .is_err()
                    {
                        report.shadow_failed += 1;
                    }
                }
                (Op::Shadow(_), Some(v)) if v >= 0 => {}
                (Op::Shadow(_), _) => report.shadow_failed += 1,
                (Op::Publish, Some(1)) => {}
                (Op::Publish, _) => report.publish_failed += 1,
            }
        }
        Ok(report)
    }

    /// Several shards: every shard's telemetry at once, then every shard's shadows and
    /// fan-out at once.
    async fn ingest_sharded(
        &self,
        messages: &[Accepted],
        now_ms: i64,
    ) -> BusResult<Vec<(Op, Value)>> {
        let partitions = self.inner.config.telemetry_partitions;
        let mut stored: BTreeMap<usize, Ops> = BTreeMap::new();
        for m in messages {
            let p = partition_for(&m.record.device, partitions);
            self.telemetry_op(stored.entry(self.telemetry_shard(p)).or_default(), m);
        }
        let mut answers = Vec::new();
        let calls = stored
            .into_iter()
            .map(|(shard, ops)| self.submit(shard, ops));
        for result in futures_util::future::join_all(calls).await {
            answers.extend(result?);
        }
        let mut effects: BTreeMap<usize, Ops> = BTreeMap::new();
        for (i, m) in messages.iter().enumerate() {
            let device_shard = self.shard_for(&m.record.device);
            self.shadow_op(effects.entry(device_shard).or_default(), i, m, now_ms);
            let shards: std::collections::BTreeSet<usize> = m
                .channels
                .iter()
                .map(|(c, _)| self.channel_shard(c))
                .collect();
            for shard in shards {
                let ops = effects.entry(shard).or_default();
                self.publish_ops(ops, m, |c| self.channel_shard(c) == shard);
            }
        }
        let calls = effects.into_iter().map(|(shard, ops)| {
            let failed: Vec<(Op, Value)> = ops
                .answers
                .iter()
                .map(|op| (*op, Value::Integer(-2)))
                .collect();
            // Stored already: what fails now is counted as failed, not returned as an error.
            async move { self.submit(shard, ops).await.unwrap_or(failed) }
        });
        for result in futures_util::future::join_all(calls).await {
            answers.extend(result);
        }
        Ok(answers)
    }
}
