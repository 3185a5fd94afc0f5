//! The Redis backend: [`RedisBus`], for clusters of gateway nodes.
//!
//! # Sharding
//!
//! Each URL of [`RedisBusConfig::urls`] is one shard: a plain Redis server (no Redis Cluster).
//! Shard `i` is identified by its position in the list, so every node and admin process must
//! list the same servers in the same order. A consistent-hash ring ([`hashring`], SipHash with
//! fixed keys, [`VNODES_PER_SHARD`] points per shard) maps a device ID to its shard; all of a
//! device's keys, its queue, its QoS 2 marks, its shadow and its `device:<id>` fan-out channel
//! live there, so every per-device operation is one round trip to one server (most are one
//! Lua script, atomic on that server). Group and alert channels hash by channel name;
//! telemetry partition `p` hashes by `telemetry:<p>`.
//!
//! Shard 0 also holds the device registry (one ordered index for [`Bus::device_query`], plus
//! one per group), the membership index (the set of node IDs behind [`Bus::nodes`]), the
//! admin documents and the audit log. A job's executions are kept per shard, next to the
//! queues of their devices, so that queueing a job's command and recording its execution is
//! one script; reading a job (counts, pages, cancel) visits every shard.
//!
//! # Key layout (every key starts with [`RedisBusConfig::key_prefix`], written `P` here)
//!
//! | key | type | shard | holds |
//! |---|---|---|---|
//! | `P dev:<id>` | string | 0 | encoded [`DeviceRecord`] |
//! | `P devices` | zset (score 0) | 0 | device IDs, listed with `ZRANGEBYLEX` |
//! | `P grp:<group>` | zset (score 0) | 0 | IDs of the group's devices, kept in step by the device create, update and delete scripts |
//! | `P doc:<kind>:<id>` | hash `v`,`b` | 0 | an admin document: version (from 1, one more per write) and body |
//! | `P docs:<kind>` | zset (score 0) | 0 | IDs of the kind's documents, listed with `ZRANGEBYLEX` |
//! | `P audit` | stream, field `e` | 0 | the audit log's entries, in append order |
//! | `P audit:head` | string | 0 | the audit log's head token (missing reads as empty) |
//! | `P alerts` | stream, field `a`, `MAXLEN ~` | 0 | alert records (JSON) as they fire and resolve; integrations read it with consumer groups |
//! | `P alerts:open` | hash | 0 | alert ID -> the open alert (JSON) |
//! | `P jx:<job>` | hash, `PEXPIRE` retention | every | device -> `<state> <updated_ms> <msgid>`: the job's executions of that shard's devices |
//! | `P jxi:<job>` | zset (score 0), `PEXPIRE` retention | every | device IDs of `jx`, for paging in device order |
//! | `P jc:<job>` | hash, `PEXPIRE` retention | every | state name -> executions in that state |
//! | `P jq:<job>` | set, `PEXPIRE` retention | every | devices whose execution is still queued (what a cancel takes) |
//! | `P nodes` | set | 0 | registered node IDs (dead ones pruned when listed) |
//! | `P node:<id>` | string, `PX` TTL | every | encoded [`NodeInfo`]; its existence is the node's liveness |
//! | `P p:<device>` | hash `node`,`conn`,`since` | device's | presence |
//! | `P pn:<node>` | set | every | devices whose presence names the node (for sweeps) |
//! | `P q:<device>` | zset msgid by push sequence | device's | FIFO order of the queue |
//! | `P qh:<device>` | hash | device's | per msgid: `c:` command, `e:` expires_ms, `a:` attempts, `r:` release mark |
//! | `P qexp` | zset `"<msgid> <device>"` by expires_ms | every | expiry index of that shard's queues |
//! | `P qseq` | counter | every | push sequence |
//! | `P q2:<device>:<msgid>` | string, `SET NX PX` | device's | QoS 2 receive marks |
//! | `P tm:<partition>` | stream, `MAXLEN ~` | ring(`telemetry:<p>`) | telemetry records |
//! | `P shd:<device>` | hash `v`,`t`,`d`,`r:<key>` | device's | shadow: version, updated_ms, desired (JSON), one field per reported key (JSON text); see `shadow.rs` |
//! | `P sh:<device>` | string (JSON) | device's | an earlier version's shadow, moved into `shd:` when first read or written |
//! | `P ret:<channel>` | string | channel's | retained frame |
//! | `P pos:<channel>` | hash `e`,`n`, `PEXPIRE` history TTL | channel's | epoch and last offset; exists only while the channel is watched (see `fanout.rs`) |
//! | `P hist:<channel>` | stream, IDs `<offset>-0`, `MAXLEN` history size, `PEXPIRE` TTL | channel's | the channel's last frames (`t` ms, `f` frame) |
//! | `P res:<device>:<msgid>` | string, `PX` TTL | device's | a command's outcome, for waiters that missed its message |
//!
//! Every write to a job's keys restarts their expiry at [`RedisBusConfig::job_retention`],
//! so a job's executions go away that long after its last change, as in the memory backend.
//!
//! Pub/sub channels: `P ch:<channel name>` on the channel's shard (payload `<offset> <frame>`),
//! and `P nodech:<node>` on every shard.
//!
//! Membership keys are written to every shard (one heartbeat costs one `SET PX` per shard) so
//! that the presence scripts can check a node's liveness atomically on the device's shard;
//! [`Bus::nodes`] reads shard 0. Presence rests on node liveness (see the crate docs): an idle
//! device costs nothing after authentication; entries naming a dead node read as offline and
//! [`Bus::presence_sweep_node`] deletes them, in batches, on every shard.
//!
//! The QoS queue keeps per-msgid state in one hash next to an order zset, so ack, attempt and
//! release are O(1)/O(log n) by msgid, `queue_len` is `ZCARD`, `QueueFull` is checked in the
//! push script, and [`Bus::queue_take_expired`] is one script per shard that pops the expiry
//! index and removes the commands it names: exactly one caller gets each command.
//!
//! # Routing
//!
//! Nodes subscribe to their node channel on every shard. [`Bus::node_publish`] publishes on
//! the shard of the device the message is about (every [`NodeMessage`] names one), the same
//! server that holds that device's queue and presence, so messages about one device arrive in
//! order; messages about different devices may interleave differently than sent. (A future
//! node-wide message without a device would go to shard 0.)
//!
//! Fan-out subscriptions share one Redis subscription per channel and process; a new local
//! subscriber starts at a marker published through the same connection, so it receives
//! exactly what is published after `subscribe` returns (see the `pubsub` module).
//!
//! # Requirements
//!
//! Redis 6.2 or later (exclusive `XRANGE` starts, `SPOP` with a count, effect replication of
//! scripts). Scripts derive some key names from IDs, which a plain server allows and Redis
//! Cluster would not; sharding here is client-side.
//!
//! # Connections
//!
//! Per shard: one multiplexed command connection and one subscriber connection, both
//! reconnecting with exponential backoff; subscriptions are restored after a reconnect.
//! Commands time out after [`RedisBusConfig::command_timeout`] with
//! [`BusError::Unavailable`]. [`RedisBus::is_connected`] serves readiness.

mod admin;
mod admin_scripts;
mod alerts;
mod codec;
mod fanout;
mod ingest;
mod pubsub;
mod queue;
mod reshard;
mod scripts;
mod shadow;

pub use reshard::{ReshardReport, reshard};

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use fred::clients::{Client, SubscriberClient};
use fred::error::{Error as FredError, ErrorKind};
use fred::interfaces::{ClientLike, EventInterface, KeysInterface, PubsubInterface};
use fred::types::config::{Config, ReconnectPolicy};
use fred::types::scripts::Script;
use fred::types::{Builder, ClusterHash, CustomCommand, Expiration, SetOptions, Value};
use hashring::HashRing;
use serde_json::Map;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{
    AcceptReport, Accepted, AlertRecord, AuditRecord, Bus, BusError, BusResult, Channel, Command,
    CommandOutcome, DeviceQuery, DeviceRecord, Doc, DocExpect, DocKind, DocWrite, History,
    JobCounts, JobExec, JobExecState, JobPush, NodeInfo, NodeMessage, Presence, QueuedCommand,
    Shadow, StreamId, Subscription, TelemetryRecord, partition_for,
};
use crate::{DesiredGuard, DesiredMerge};

/// Points each shard occupies on the consistent-hash ring.
pub const VNODES_PER_SHARD: u32 = 64;

/// Devices a presence sweep handles per script call.
const SWEEP_BATCH: usize = 1000;
/// Keys per presence read script call.
const PRESENCE_READ_BATCH: usize = 1000;
/// Records per telemetry append script call.
const TELEMETRY_BATCH: usize = 500;

/// Configuration of a [`RedisBus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisBusConfig {
    /// One `redis://` URL per shard, in the same order on every process (at least one).
    pub urls: Vec<String>,
    /// Prefix of every key and channel name.
    pub key_prefix: String,
    /// Most commands queued per device; further pushes fail with [`BusError::QueueFull`].
    pub queue_max_len: usize,
    /// Number of telemetry partitions (at least 1).
    pub telemetry_partitions: u32,
    /// Approximate most records kept per telemetry partition (`XADD MAXLEN ~`).
    pub telemetry_max_len: usize,
    /// Capacity of each node's message channel (at least 1).
    pub node_channel_capacity: usize,
    /// Capacity of each fan-out subscription (at least 1).
    pub subscription_capacity: usize,
    /// How long a command may wait for an answer (including while reconnecting).
    pub command_timeout: Duration,
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// Shortest reconnect delay, in ms.
    pub reconnect_min_delay_ms: u32,
    /// Longest reconnect delay, in ms.
    pub reconnect_max_delay_ms: u32,
    /// Messages buffered between a subscriber connection and its reader task.
    pub pubsub_buffer: usize,
    /// How long a job's executions are kept after their last change.
    pub job_retention: Duration,
    /// What each watched fan-out channel keeps for subscribers that come back.
    pub history: crate::HistoryConfig,
    /// Approximate most records kept in the alerts stream (`XADD MAXLEN ~`).
    pub alerts_max_len: usize,
}

impl Default for RedisBusConfig {
    fn default() -> Self {
        Self {
            urls: vec!["redis://127.0.0.1:6379".to_owned()],
            key_prefix: "fleetgate:".to_owned(),
            queue_max_len: 1000,
            telemetry_partitions: 4,
            telemetry_max_len: 100_000,
            node_channel_capacity: 4096,
            subscription_capacity: 1024,
            command_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            reconnect_min_delay_ms: 100,
            reconnect_max_delay_ms: 5_000,
            pubsub_buffer: 8192,
            job_retention: crate::JOB_RETENTION,
            history: crate::HistoryConfig::default(),
            alerts_max_len: crate::ALERTS_MAX_LEN,
        }
    }
}

/// Counters of a [`RedisBus`], for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisBusStats {
    /// Fan-out frames dropped because a local subscriber was full.
    pub dropped_messages: u64,
    /// Node messages dropped because the node's receiver was full.
    pub dropped_node_messages: u64,
    /// Pub/sub messages missed because a reader task fell behind its connection.
    pub lagged_messages: u64,
    /// Node messages that could not be decoded.
    pub corrupt_messages: u64,
    /// Failed attempts to re-issue subscriptions after a reconnect.
    pub resubscribe_failures: u64,
}

/// A point of a shard on the hash ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VNode {
    shard: usize,
    replica: u32,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Fixed-width, explicit bytes: the ring must be the same on every process.
        state.write(&(self.shard as u64).to_le_bytes());
        state.write(&self.replica.to_le_bytes());
    }
}

/// The shard (index into the URL list) that a cluster of `shards` Redis servers places `key`
/// on: a device ID, or `telemetry:<p>` for telemetry partition `p`. For integrations that
/// read the streams without connecting a bus.
pub fn shard_of(key: &str, shards: usize) -> usize {
    Ring::new(shards).shard(key)
}

/// Which shard holds a key, for a number of shards: the same answer in every process (and
/// in the reshard tool, which compares two of these).
pub(crate) struct Ring {
    ring: HashRing<VNode>,
    shards: usize,
}

impl Ring {
    pub(crate) fn new(shards: usize) -> Self {
        let mut ring = HashRing::new();
        for shard in 0..shards {
            for replica in 0..VNODES_PER_SHARD {
                ring.add(VNode { shard, replica });
            }
        }
        Self { ring, shards }
    }

    /// The shard of `key` (a device ID, a channel name or `telemetry:<p>`).
    pub(crate) fn shard(&self, key: &str) -> usize {
        if self.shards <= 1 {
            return 0;
        }
        self.ring.get(&key).map_or(0, |n| n.shard)
    }
}

struct Scripts {
    presence_set: Script,
    presence_get: Script,
    presence_remove: Script,
    presence_sweep: Script,
    nodes_list: Script,
    queue_push: Script,
    queue_pending: Script,
    queue_attempt: Script,
    queue_release: Script,
    queue_remove: Script,
    queue_ack_next: Script,
    queue_take_expired: Script,
    telemetry_append: Script,
    shadow_merge: Script,
    shadow_set_desired: Script,
    shadow_migrate: Script,
    fanout_publish: Script,
    fanout_watch: Script,
    fanout_history: Script,
    result_send: Script,
    admin: admin::AdminScripts,
}

impl Scripts {
    fn new() -> Self {
        Self {
            presence_set: Script::from_lua(scripts::PRESENCE_SET),
            presence_get: Script::from_lua(scripts::PRESENCE_GET),
            presence_remove: Script::from_lua(scripts::PRESENCE_REMOVE),
            presence_sweep: Script::from_lua(scripts::PRESENCE_SWEEP),
            nodes_list: Script::from_lua(scripts::NODES_LIST),
            queue_push: Script::from_lua(scripts::QUEUE_PUSH),
            queue_pending: Script::from_lua(format!(
                "{}{}",
                scripts::QUEUE_PENDING_FN,
                scripts::QUEUE_PENDING
            )),
            queue_attempt: Script::from_lua(scripts::QUEUE_ATTEMPT),
            queue_release: Script::from_lua(scripts::QUEUE_RELEASE),
            queue_remove: Script::from_lua(format!(
                "{}{}",
                scripts::QUEUE_REMOVE_FN,
                scripts::QUEUE_REMOVE
            )),
            queue_ack_next: Script::from_lua(format!(
                "{}{}{}",
                scripts::QUEUE_REMOVE_FN,
                scripts::QUEUE_PENDING_FN,
                scripts::QUEUE_ACK_NEXT
            )),
            queue_take_expired: Script::from_lua(scripts::QUEUE_TAKE_EXPIRED),
            telemetry_append: Script::from_lua(scripts::TELEMETRY_APPEND),
            shadow_merge: Script::from_lua(format!(
                "{}{}",
                shadow::MERGE_REPORTED_FN,
                shadow::SHADOW_MERGE
            )),
            shadow_set_desired: Script::from_lua(shadow::SHADOW_SET_DESIRED),
            shadow_migrate: Script::from_lua(shadow::SHADOW_MIGRATE),
            fanout_publish: Script::from_lua(format!(
                "{}{}",
                scripts::PUBLISH_ONE_FN,
                scripts::FANOUT_PUBLISH
            )),
            fanout_watch: Script::from_lua(scripts::FANOUT_WATCH),
            fanout_history: Script::from_lua(scripts::FANOUT_HISTORY),
            result_send: Script::from_lua(scripts::RESULT_SEND),
            admin: admin::AdminScripts::new(),
        }
    }
}

struct Shard {
    client: Client,
    subscriber: SubscriberClient,
    /// False from a subscriber reconnect until every subscription is re-established: a
    /// reconnected link that is not yet subscribed again must not count as ready.
    subscribed: Arc<AtomicBool>,
}

struct Inner {
    config: RedisBusConfig,
    shards: Vec<Shard>,
    ring: Ring,
    scripts: Scripts,
    router: Arc<pubsub::Router>,
    /// One ingest writer per shard (see `ingest.rs`).
    writers: Vec<ingest::Writer>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            for shard in &self.shards {
                let client = shard.client.clone();
                let subscriber = shard.subscriber.clone();
                rt.spawn(async move {
                    let _ = subscriber.quit().await;
                    let _ = client.quit().await;
                });
            }
        }
    }
}

/// The Redis-backed [`Bus`]. Cloning is cheap: clones share connections and subscriptions.
#[derive(Clone)]
pub struct RedisBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Maps a fred error: undecodable replies are [`BusError::Corrupt`], anything else means
/// Redis could not answer properly, [`BusError::Unavailable`].
pub(crate) fn fred_err(e: FredError) -> BusError {
    match e.kind() {
        ErrorKind::Parse => BusError::Corrupt(e.to_string()),
        _ => BusError::Unavailable(e.to_string()),
    }
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

// --- reply decoding ------------------------------------------------------------------------

fn bad_reply(what: &str, v: &Value) -> BusError {
    BusError::Corrupt(format!("unexpected reply to {what}: {v:?}"))
}

/// A bulk string reply (or nil).
fn opt_string(what: &str, v: Value) -> BusResult<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.to_string())),
        Value::Bytes(b) => String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| BusError::Corrupt(format!("{what}: reply is not UTF-8"))),
        Value::Integer(i) => Ok(Some(i.to_string())),
        other => Err(bad_reply(what, &other)),
    }
}

fn string(what: &str, v: Value) -> BusResult<String> {
    match opt_string(what, v)? {
        Some(s) => Ok(s),
        None => Err(BusError::Corrupt(format!("{what}: unexpected nil"))),
    }
}

fn int(what: &str, v: Value) -> BusResult<i64> {
    match v {
        Value::Integer(i) => Ok(i),
        Value::String(ref s) => s.parse().map_err(|_| bad_reply(what, &v)),
        other => Err(bad_reply(what, &other)),
    }
}

/// An array reply (nil reads as empty).
fn array(what: &str, v: Value) -> BusResult<Vec<Value>> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(a) => Ok(a),
        other => Err(bad_reply(what, &other)),
    }
}

/// The `XRANGE` start after an exclusive position (`None`: from the first entry); `None` when
/// nothing can follow it. `(ms-seq` would do for all but the last sequence number, which
/// Redis rejects as an exclusive start.
fn stream_start(after: Option<(u64, u64)>) -> Option<String> {
    match after {
        None => Some("-".to_owned()),
        Some((u64::MAX, u64::MAX)) => None,
        Some((ms, u64::MAX)) => Some(format!("{}-0", ms + 1)),
        Some((ms, seq)) => Some(format!("({ms}-{seq}")),
    }
}

/// `{command, attempts, release mark}` from a queue script, or nil.
fn queued(what: &str, v: Value) -> BusResult<Option<QueuedCommand>> {
    if v.is_null() {
        return Ok(None);
    }
    let mut parts = array(what, v)?.into_iter();
    let (Some(c), Some(a)) = (parts.next(), parts.next()) else {
        return Err(BusError::Corrupt(format!("{what}: short reply")));
    };
    let release = match parts.next() {
        Some(r) => opt_string(what, r)?,
        None => None,
    };
    let command = string(what, c)?;
    let attempts = string(what, a)?;
    codec::decode_queued(&command, &attempts, release.as_deref()).map(Some)
}

/// A list of `{command, attempts, release mark}` replies, none of them nil.
fn queued_list(what: &str, v: Value) -> BusResult<Vec<QueuedCommand>> {
    array(what, v)?
        .into_iter()
        .map(|q| queued(what, q)?.ok_or_else(|| BusError::Corrupt(format!("{what}: nil entry"))))
        .collect()
}

/// `{node, conn, since}` from a presence script, or nil.
fn presence_reply(what: &str, v: Value) -> BusResult<Option<Presence>> {
    if v.is_null() {
        return Ok(None);
    }
    let parts = array(what, v)?;
    let [node, conn, since]: [Value; 3] = parts
        .try_into()
        .map_err(|_| BusError::Corrupt(format!("{what}: presence is not 3 fields")))?;
    let node = string(what, node)?;
    let conn = string(what, conn)?;
    let since = string(what, since)?;
    codec::decode_presence(node, &conn, &since).map(Some)
}

/// Re-issues every subscription after each reconnect of a shard's subscriber connection, and
/// says when it is done (fred's own `manage_subscriptions` gives no such signal).
async fn resubscribe_task(
    subscriber: SubscriberClient,
    subscribed: Arc<AtomicBool>,
    router: std::sync::Weak<pubsub::Router>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let mut reconnects = subscriber.reconnect_rx();
    loop {
        match reconnects.recv().await {
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
        subscribed.store(false, Ordering::Release);
        loop {
            match subscriber.resubscribe_all().await {
                Ok(()) => {
                    subscribed.store(true, Ordering::Release);
                    // Node messages published while the link was down are gone; the
                    // receivers re-read durable state.
                    if let Some(router) = router.upgrade() {
                        router.resync_nodes();
                        // Redis may have lost the channel positions with its data.
                        router.rewatch.notify_one();
                    }
                    break;
                }
                Err(error) => {
                    tracing::warn!(message = "resubscribing after a Redis reconnect failed", %error);
                    if let Some(router) = router.upgrade() {
                        router.resubscribe_failures.fetch_add(1, Ordering::Relaxed);
                    }
                    // The next reconnect event retries; a failure on a live link retries here.
                    if !subscriber.is_connected() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// Unique per bus instance: `<pid>-<start ns>-<counter>`.
fn instance_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{nanos:x}-{n}", std::process::id())
}

fn v(s: impl Into<String>) -> Value {
    Value::from(s.into())
}

impl RedisBus {
    /// Connects to every shard (failing with [`BusError::Unavailable`] if one cannot be
    /// reached now; later outages are retried with backoff) and starts the pub/sub tasks.
    pub async fn connect(mut config: RedisBusConfig) -> BusResult<Self> {
        if config.urls.is_empty() {
            return Err(BusError::Unavailable("no redis urls configured".into()));
        }
        config.telemetry_partitions = config.telemetry_partitions.max(1);
        config.telemetry_max_len = config.telemetry_max_len.max(1);
        config.node_channel_capacity = config.node_channel_capacity.max(1);
        config.subscription_capacity = config.subscription_capacity.max(1);
        config.pubsub_buffer = config.pubsub_buffer.max(16);

        let mut shards = Vec::with_capacity(config.urls.len());
        for url in &config.urls {
            let fred_config = Config::from_url(url)
                .map_err(|e| BusError::Unavailable(format!("bad redis url {url:?}: {e}")))?;
            let mut builder = Builder::from_config(fred_config);
            builder
                .set_policy(ReconnectPolicy::new_exponential(
                    0,
                    config.reconnect_min_delay_ms,
                    config
                        .reconnect_max_delay_ms
                        .max(config.reconnect_min_delay_ms),
                    2,
                ))
                .with_connection_config(|c| {
                    c.connection_timeout = config.connect_timeout;
                    c.internal_command_timeout = config.command_timeout;
                    // Requests are written as soon as they are ready (a batch is one write);
                    // with Nagle a request written while an earlier one is unacknowledged
                    // waits for that ACK, which Redis may delay.
                    c.tcp.nodelay = Some(true);
                })
                .with_performance_config(|p| {
                    p.default_command_timeout = config.command_timeout;
                    p.broadcast_channel_capacity = config.pubsub_buffer;
                });
            let client = builder.build().map_err(fred_err)?;
            let subscriber = builder.build_subscriber_client().map_err(fred_err)?;
            client.init().await.map_err(fred_err)?;
            subscriber.init().await.map_err(fred_err)?;
            shards.push(Shard {
                client,
                subscriber,
                subscribed: Arc::new(AtomicBool::new(true)),
            });
        }

        let ring = Ring::new(shards.len());

        let marker_channel = format!("{}marker:{}", config.key_prefix, instance_id());
        for shard in &shards {
            shard
                .subscriber
                .subscribe(marker_channel.clone())
                .await
                .map_err(fred_err)?;
        }
        let (router, control_rx) =
            pubsub::Router::new(shards.len(), marker_channel, config.command_timeout * 2);
        let node_prefix = format!("{}nodech:", config.key_prefix);
        let mut tasks = Vec::new();
        for (shard, rx) in shards.iter().zip(control_rx) {
            tasks.push(tokio::spawn(resubscribe_task(
                shard.subscriber.clone(),
                shard.subscribed.clone(),
                Arc::downgrade(&router),
            )));
            tasks.push(tokio::spawn(pubsub::reader_task(
                Arc::downgrade(&router),
                shard.subscriber.message_rx(),
                node_prefix.clone(),
            )));
            tasks.push(tokio::spawn(pubsub::control_task(
                Arc::downgrade(&router),
                shard.subscriber.clone(),
                shard.client.clone(),
                rx,
            )));
        }

        let ingest_script = ingest::script();
        let header = [
            Value::Integer(config.telemetry_max_len as i64),
            Value::Integer(config.history.size as i64),
            Value::Integer(config.history.ttl.as_millis().max(1000) as i64),
        ];
        let mut writers = Vec::with_capacity(shards.len());
        for shard in &shards {
            let (writer, task) =
                ingest::spawn_writer(shard.client.clone(), ingest_script.clone(), header.clone());
            writers.push(writer);
            tasks.push(task);
        }

        let ttl = config.history.ttl.max(Duration::from_secs(1));
        let period = ttl / 3;
        let rewatch = router.rewatch.clone();
        Ok(Self {
            inner: Arc::new_cyclic(|weak| {
                tasks.push(tokio::spawn(fanout::watch_task(
                    weak.clone(),
                    rewatch,
                    period,
                )));
                Inner {
                    config,
                    shards,
                    ring,
                    scripts: Scripts::new(),
                    router,
                    writers,
                    tasks,
                }
            }),
        })
    }

    /// The effective configuration.
    pub fn config(&self) -> &RedisBusConfig {
        &self.inner.config
    }

    /// Whether every command and subscriber connection is up and every subscription is in
    /// place again after a reconnect (readiness).
    pub fn is_connected(&self) -> bool {
        // Only the resubscribe task writes `subscribed`: a second writer here could store a
        // stale "down" after the task restored it, leaving the node unready for good. Between
        // a reconnect and the task noticing it this may read ready a moment early; messages
        // lost then are covered by the `Resync` the task sends when it is done.
        self.inner.shards.iter().all(|s| {
            s.client.is_connected()
                && s.subscriber.is_connected()
                && s.subscribed.load(Ordering::Acquire)
        })
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.inner.shards.len()
    }

    /// The shard (index into [`RedisBusConfig::urls`]) holding `device`'s keys and channel.
    pub fn shard_for_device(&self, device: &str) -> usize {
        self.shard_for(device)
    }

    /// The full Redis key names of `device`'s per-device keys (presence, queue order, queue
    /// state, shadow), for operations and tests.
    pub fn device_keys(&self, device: &str) -> Vec<String> {
        vec![
            self.key("p:", device),
            self.key("q:", device),
            self.key("qh:", device),
            self.key("shd:", device),
        ]
    }

    /// Live local subscriptions to `channel`.
    pub fn subscriber_count(&self, channel: &Channel) -> usize {
        self.inner.router.counts(&self.channel_name(channel))
    }

    /// Drop and loss counters.
    pub fn stats(&self) -> RedisBusStats {
        let r = &self.inner.router;
        RedisBusStats {
            dropped_messages: r.dropped.load(Ordering::Relaxed),
            dropped_node_messages: r.dropped_node.load(Ordering::Relaxed),
            lagged_messages: r.lagged.load(Ordering::Relaxed),
            corrupt_messages: r.corrupt.load(Ordering::Relaxed),
            resubscribe_failures: r.resubscribe_failures.load(Ordering::Relaxed),
        }
    }

    fn shard_for(&self, key: &str) -> usize {
        self.inner.ring.shard(key)
    }

    fn channel_shard(&self, channel: &Channel) -> usize {
        match channel {
            Channel::Device(id) => self.shard_for(id),
            other => self.shard_for(&other.name()),
        }
    }

    fn telemetry_shard(&self, partition: u32) -> usize {
        self.shard_for(&format!("telemetry:{partition}"))
    }

    fn key(&self, tag: &str, id: &str) -> String {
        format!("{}{tag}{id}", self.inner.config.key_prefix)
    }

    fn prefix(&self) -> Value {
        v(self.inner.config.key_prefix.clone())
    }

    fn channel_name(&self, channel: &Channel) -> String {
        self.key("ch:", &channel.name())
    }

    fn node_channel(&self, node: &str) -> String {
        self.key("nodech:", node)
    }

    fn client(&self, shard: usize) -> &Client {
        &self.inner.shards[shard].client
    }

    async fn eval(
        &self,
        shard: usize,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> BusResult<Value> {
        script
            .evalsha_with_reload::<Value, _, _>(self.client(shard), keys, args)
            .await
            .map_err(fred_err)
    }

    /// Runs `script` for items that each live on one device's shard: grouped by shard, at
    /// most `batch` per call, with the keys and arguments `call` makes for a chunk (item
    /// indices). The script answers one value per item; the answers come back in item order.
    pub(super) async fn eval_per_device(
        &self,
        what: &str,
        devices: &[&str],
        batch: usize,
        script: &Script,
        mut call: impl FnMut(&[usize]) -> (Vec<String>, Vec<Value>),
    ) -> BusResult<Vec<Value>> {
        let mut by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, d) in devices.iter().enumerate() {
            by_shard.entry(self.shard_for(d)).or_default().push(i);
        }
        let mut out = vec![Value::Null; devices.len()];
        for (shard, indices) in by_shard {
            for chunk in indices.chunks(batch) {
                let (keys, args) = call(chunk);
                let answers = array(what, self.eval(shard, script, keys, args).await?)?;
                if answers.len() != chunk.len() {
                    return Err(BusError::Corrupt(format!(
                        "{what}: wrong number of answers"
                    )));
                }
                for (&i, a) in chunk.iter().zip(answers) {
                    out[i] = a;
                }
            }
        }
        Ok(out)
    }

    /// `QUEUE_PENDING`; counting an attempt for each returned command when `count` holds the
    /// msgids to skip.
    async fn read_queue(
        &self,
        device: &str,
        after: Option<&str>,
        count: Option<&[&str]>,
        limit: usize,
    ) -> BusResult<Vec<QueuedCommand>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut args = vec![
            v(wall_ms().to_string()),
            Value::from(i64::try_from(limit).unwrap_or(i64::MAX)),
            v(after.unwrap_or_default()),
            v(if count.is_some() { "1" } else { "0" }),
        ];
        args.extend(count.unwrap_or_default().iter().map(|m| v(*m)));
        let reply = self
            .eval(
                self.shard_for(device),
                &self.inner.scripts.queue_pending,
                vec![self.key("q:", device), self.key("qh:", device)],
                args,
            )
            .await?;
        queued_list("queue_pending", reply)
    }

    async fn custom(&self, shard: usize, cmd: &'static str, args: Vec<Value>) -> BusResult<Value> {
        self.client(shard)
            .custom::<Value, Value>(
                CustomCommand::new_static(cmd, ClusterHash::FirstKey, false),
                args,
            )
            .await
            .map_err(fred_err)
    }

    /// Up to `limit` entries of a stream from `start` (see [`stream_start`]): each entry's ID
    /// and its field, value pairs.
    /// Entries of stream `key` on shard 0 after `after` (exclusive), at most `limit`, each
    /// as its ID and the text of its one field `field` (the audit log's and the alerts').
    async fn stream_texts(
        &self,
        key: String,
        field: &str,
        after: Option<&StreamId>,
        limit: usize,
    ) -> BusResult<Vec<(StreamId, String)>> {
        let after = after.map(StreamId::parts).transpose()?;
        let Some(start) = stream_start(after) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.stream_range(0, key, start, limit)
            .await?
            .into_iter()
            .map(|(id, fields)| {
                let text = fields
                    .into_iter()
                    .find(|(k, _)| k == field)
                    .map(|(_, t)| t)
                    .ok_or_else(|| {
                        BusError::Corrupt(format!("stream entry {id} has no {field}"))
                    })?;
                Ok((StreamId(id), text))
            })
            .collect()
    }

    async fn stream_range(
        &self,
        shard: usize,
        key: String,
        start: String,
        limit: usize,
    ) -> BusResult<Vec<(String, Vec<(String, String)>)>> {
        const WHAT: &str = "XRANGE";
        let reply = self
            .custom(
                shard,
                "XRANGE",
                vec![
                    v(key),
                    v(start),
                    v("+"),
                    v("COUNT"),
                    Value::from(i64::try_from(limit).unwrap_or(i64::MAX)),
                ],
            )
            .await?;
        let mut out = Vec::new();
        for entry in array(WHAT, reply)? {
            let mut parts = array(WHAT, entry)?.into_iter();
            let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
                return Err(BusError::Corrupt(format!("{WHAT}: short entry")));
            };
            let id = string(WHAT, id)?;
            let flat = array(WHAT, fields)?;
            let mut pairs = Vec::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(k), Some(val)) = (it.next(), it.next()) {
                pairs.push((string(WHAT, k)?, string(WHAT, val)?));
            }
            out.push((id, pairs));
        }
        Ok(out)
    }

    async fn queue_remove(&self, device: &str, msgid: &str) -> BusResult<Option<QueuedCommand>> {
        let shard = self.shard_for(device);
        let reply = self
            .eval(
                shard,
                &self.inner.scripts.queue_remove,
                vec![
                    self.key("q:", device),
                    self.key("qh:", device),
                    self.key("qexp", ""),
                ],
                vec![v(msgid), v(device)],
            )
            .await?;
        queued("queue remove", reply)
    }
}

#[async_trait]
impl Bus for RedisBus {
    async fn ping(&self) -> BusResult<()> {
        for shard in &self.inner.shards {
            shard.client.ping::<Value>(None).await.map_err(fred_err)?;
        }
        Ok(())
    }

    async fn device_create(&self, device: &DeviceRecord) -> BusResult<bool> {
        self.create_device(device).await
    }

    async fn device_get(&self, id: &str) -> BusResult<Option<DeviceRecord>> {
        self.get_device(id).await
    }

    async fn device_update(&self, device: &DeviceRecord) -> BusResult<bool> {
        self.update_device(device).await
    }

    async fn device_query(&self, query: &DeviceQuery) -> BusResult<Vec<DeviceRecord>> {
        self.query_devices(query).await
    }

    async fn device_get_many(&self, ids: &[String]) -> BusResult<Vec<Option<DeviceRecord>>> {
        self.get_devices(ids).await
    }

    /// The registry part is atomic on shard 0 and the queue and shadow part on the device's
    /// shard; see `RedisBus::delete_device` for the order of the two.
    async fn device_delete(&self, id: &str) -> BusResult<bool> {
        self.delete_device(id).await
    }

    async fn node_heartbeat(&self, node: &NodeInfo, ttl_ms: u64) -> BusResult<()> {
        let key = self.key("node:", &node.id);
        let encoded = codec::encode_node(node);
        let ttl = i64::try_from(ttl_ms.max(1)).unwrap_or(i64::MAX);
        for shard in 0..self.inner.shards.len() {
            self.client(shard)
                .set::<Value, _, _>(
                    &key,
                    encoded.clone(),
                    Some(Expiration::PX(ttl)),
                    None,
                    false,
                )
                .await
                .map_err(fred_err)?;
        }
        self.client(0)
            .custom::<Value, Value>(
                CustomCommand::new_static("SADD", ClusterHash::FirstKey, false),
                vec![v(self.key("nodes", "")), v(node.id.clone())],
            )
            .await
            .map_err(fred_err)?;
        Ok(())
    }

    async fn node_remove(&self, node_id: &str) -> BusResult<()> {
        let key = self.key("node:", node_id);
        for shard in 0..self.inner.shards.len() {
            self.client(shard)
                .del::<Value, _>(&key)
                .await
                .map_err(fred_err)?;
        }
        self.custom(0, "SREM", vec![v(self.key("nodes", "")), v(node_id)])
            .await?;
        Ok(())
    }

    async fn nodes(&self) -> BusResult<Vec<NodeInfo>> {
        let reply = self
            .eval(
                0,
                &self.inner.scripts.nodes_list,
                vec![self.key("nodes", "")],
                vec![self.prefix()],
            )
            .await?;
        let mut nodes = array("nodes", reply)?
            .into_iter()
            .map(|n| codec::decode_node(&string("nodes", n)?))
            .collect::<BusResult<Vec<_>>>()?;
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    async fn presence_set(&self, device: &str, presence: &Presence) -> BusResult<Option<Presence>> {
        let reply = self
            .eval(
                self.shard_for(device),
                &self.inner.scripts.presence_set,
                vec![self.key("p:", device)],
                vec![
                    self.prefix(),
                    v(device),
                    v(presence.node.clone()),
                    v(presence.conn_id.to_string()),
                    v(presence.since_ms.to_string()),
                ],
            )
            .await?;
        presence_reply("presence_set", reply)
    }

    async fn presence_get(&self, device: &str) -> BusResult<Option<Presence>> {
        let reply = self
            .eval(
                self.shard_for(device),
                &self.inner.scripts.presence_get,
                vec![self.key("p:", device)],
                vec![self.prefix()],
            )
            .await?;
        match array("presence_get", reply)?.into_iter().next() {
            Some(p) => presence_reply("presence_get", p),
            None => Ok(None),
        }
    }

    async fn presence_get_many(&self, devices: &[String]) -> BusResult<Vec<Option<Presence>>> {
        let ids: Vec<&str> = devices.iter().map(String::as_str).collect();
        let answers = self
            .eval_per_device(
                "presence_get_many",
                &ids,
                PRESENCE_READ_BATCH,
                &self.inner.scripts.presence_get,
                |chunk| {
                    let keys = chunk.iter().map(|&i| self.key("p:", ids[i])).collect();
                    (keys, vec![self.prefix()])
                },
            )
            .await?;
        answers
            .into_iter()
            .map(|p| presence_reply("presence_get_many", p))
            .collect()
    }

    async fn presence_remove(&self, device: &str, conn_id: u64) -> BusResult<bool> {
        let reply = self
            .eval(
                self.shard_for(device),
                &self.inner.scripts.presence_remove,
                vec![self.key("p:", device)],
                vec![self.prefix(), v(device), v(conn_id.to_string())],
            )
            .await?;
        Ok(int("presence_remove", reply)? == 1)
    }

    async fn presence_sweep_node(&self, node_id: &str) -> BusResult<usize> {
        let mut total = 0usize;
        for shard in 0..self.inner.shards.len() {
            loop {
                let reply = self
                    .eval(
                        shard,
                        &self.inner.scripts.presence_sweep,
                        vec![self.key("pn:", node_id)],
                        vec![self.prefix(), v(node_id), Value::from(SWEEP_BATCH as i64)],
                    )
                    .await?;
                let mut parts = array("presence_sweep_node", reply)?.into_iter();
                let (Some(n), Some(left)) = (parts.next(), parts.next()) else {
                    return Err(BusError::Corrupt("presence_sweep_node: short reply".into()));
                };
                total += usize::try_from(int("presence_sweep_node", n)?).unwrap_or(0);
                if int("presence_sweep_node", left)? == 0 {
                    break;
                }
            }
        }
        Ok(total)
    }

    fn connected(&self) -> bool {
        self.is_connected()
    }

    async fn node_publish(&self, node_id: &str, message: &NodeMessage) -> BusResult<()> {
        let shard = match message {
            NodeMessage::Deliver { device }
            | NodeMessage::Close { device, .. }
            | NodeMessage::CommandResult { device, .. }
            | NodeMessage::Delta { device, .. }
            | NodeMessage::MqttInbound { device, .. } => self.shard_for(device),
            NodeMessage::Command(c) => self.shard_for(&c.device),
            NodeMessage::Resync => 0,
        };
        self.client(shard)
            .publish::<Value, _, _>(
                self.node_channel(node_id),
                codec::encode_node_message(message),
            )
            .await
            .map_err(fred_err)?;
        Ok(())
    }

    async fn node_subscribe(&self, node_id: &str) -> BusResult<mpsc::Receiver<NodeMessage>> {
        let channel = self.node_channel(node_id);
        let (tx, rx) = mpsc::channel(self.inner.config.node_channel_capacity);
        self.inner.router.set_node(&channel, tx);
        for shard in 0..self.inner.shards.len() {
            self.inner.router.confirm(shard, &channel, None).await?;
        }
        Ok(rx)
    }

    async fn result_send(
        &self,
        node_id: &str,
        device: &str,
        msgid: &str,
        outcome: &CommandOutcome,
        ttl_ms: u64,
    ) -> BusResult<()> {
        self.eval(
            self.shard_for(device),
            &self.inner.scripts.result_send,
            vec![self.result_key(device, msgid)],
            self.result_args(node_id, device, msgid, outcome, ttl_ms)
                .into(),
        )
        .await?;
        Ok(())
    }

    async fn result_get(&self, device: &str, msgid: &str) -> BusResult<Option<CommandOutcome>> {
        let reply: Value = self
            .client(self.shard_for(device))
            .get(self.result_key(device, msgid))
            .await
            .map_err(fred_err)?;
        match reply.into_bytes() {
            Some(bytes) => codec::decode_outcome(&bytes).map(Some),
            None => Ok(None),
        }
    }

    async fn queue_push(&self, command: &Command) -> BusResult<Option<Presence>> {
        let max = self.inner.config.queue_max_len;
        let device = &command.device;
        let deliver = NodeMessage::Deliver {
            device: device.clone(),
        };
        let reply = self
            .eval(
                self.shard_for(device),
                &self.inner.scripts.queue_push,
                vec![
                    self.key("q:", device),
                    self.key("qh:", device),
                    self.key("qexp", ""),
                    self.key("qseq", ""),
                    self.key("p:", device),
                ],
                vec![
                    v(command.msgid.as_str()),
                    v(codec::encode_command(command)),
                    v(command.expires_ms.to_string()),
                    Value::from(i64::try_from(max).unwrap_or(i64::MAX)),
                    v(device.clone()),
                    self.prefix(),
                    v(codec::encode_node_message(&deliver)),
                ],
            )
            .await?;
        let mut parts = array("queue_push", reply)?;
        if parts.is_empty() {
            return Err(BusError::Corrupt("queue_push: empty reply".into()));
        }
        let status = int("queue_push", parts.remove(0))?;
        if status == -1 {
            return Err(BusError::QueueFull { max });
        }
        if parts.is_empty() {
            return Ok(None);
        }
        presence_reply("queue_push", Value::Array(parts))
    }

    async fn queue_pending(
        &self,
        device: &str,
        after: Option<&str>,
        limit: usize,
    ) -> BusResult<Vec<QueuedCommand>> {
        self.read_queue(device, after, None, limit).await
    }

    async fn queue_next(
        &self,
        device: &str,
        after: Option<&str>,
        skip: &[&str],
        limit: usize,
    ) -> BusResult<Vec<QueuedCommand>> {
        self.read_queue(device, after, Some(skip), limit).await
    }

    async fn queue_attempt(&self, device: &str, msgid: &str) -> BusResult<Option<u32>> {
        let reply = self
            .eval(
                self.shard_for(device),
                &self.inner.scripts.queue_attempt,
                vec![self.key("qh:", device)],
                vec![v(msgid)],
            )
            .await?;
        if reply.is_null() {
            return Ok(None);
        }
        let n = int("queue_attempt", reply)?;
        Ok(Some(u32::try_from(n).unwrap_or(u32::MAX)))
    }

    async fn queue_release(
        &self,
        device: &str,
        msgid: &str,
        result: Option<&serde_json::Value>,
    ) -> BusResult<Option<QueuedCommand>> {
        let (flag, text) = match result {
            Some(r) => ("1", r.to_string()),
            None => ("0", String::new()),
        };
        let reply = self
            .eval(
                self.shard_for(device),
                &self.inner.scripts.queue_release,
                vec![self.key("qh:", device)],
                vec![v(msgid), v(flag), v(text)],
            )
            .await?;
        queued("queue_release", reply)
    }

    async fn queue_ack(&self, device: &str, msgid: &str) -> BusResult<Option<QueuedCommand>> {
        self.queue_remove(device, msgid).await
    }

    async fn queue_fail(&self, device: &str, msgid: &str) -> BusResult<Option<QueuedCommand>> {
        self.queue_remove(device, msgid).await
    }

    async fn queue_ack_next(
        &self,
        device: &str,
        msgid: &str,
        result: Option<(&str, &CommandOutcome, u64)>,
        after: Option<&str>,
        skip: &[&str],
        limit: usize,
    ) -> BusResult<(Option<QueuedCommand>, Vec<QueuedCommand>)> {
        self.ack_next(device, msgid, result, after, skip, limit)
            .await
    }

    async fn queue_take_expired(&self, now_ms: i64, limit: usize) -> BusResult<Vec<QueuedCommand>> {
        let mut taken = Vec::new();
        for shard in 0..self.inner.shards.len() {
            if taken.len() >= limit {
                break;
            }
            let want = limit - taken.len();
            let reply = self
                .eval(
                    shard,
                    &self.inner.scripts.queue_take_expired,
                    vec![self.key("qexp", "")],
                    vec![
                        self.prefix(),
                        v(now_ms.to_string()),
                        Value::from(i64::try_from(want).unwrap_or(i64::MAX)),
                    ],
                )
                .await?;
            for q in array("queue_take_expired", reply)? {
                if let Some(q) = queued("queue_take_expired", q)? {
                    taken.push(q);
                }
            }
        }
        Ok(taken)
    }

    async fn queue_len(&self, device: &str) -> BusResult<usize> {
        let reply = self
            .custom(
                self.shard_for(device),
                "ZCARD",
                vec![v(self.key("q:", device))],
            )
            .await?;
        Ok(usize::try_from(int("queue_len", reply)?).unwrap_or(0))
    }

    async fn qos2_receive(&self, device: &str, msgid: &str, ttl_ms: u64) -> BusResult<bool> {
        let ttl = i64::try_from(ttl_ms.max(1)).unwrap_or(i64::MAX);
        let reply: Value = self
            .client(self.shard_for(device))
            .set(
                self.key("q2:", &format!("{device}:{msgid}")),
                "1",
                Some(Expiration::PX(ttl)),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(fred_err)?;
        Ok(!reply.is_null())
    }

    async fn qos2_release(&self, device: &str, msgid: &str) -> BusResult<bool> {
        let n: i64 = self
            .client(self.shard_for(device))
            .del(self.key("q2:", &format!("{device}:{msgid}")))
            .await
            .map_err(fred_err)?;
        Ok(n > 0)
    }

    async fn telemetry_append(&self, records: &[TelemetryRecord]) -> BusResult<()> {
        let partitions = self.inner.config.telemetry_partitions;
        let mut by_shard: BTreeMap<usize, Vec<(u32, &TelemetryRecord)>> = BTreeMap::new();
        for r in records {
            let p = partition_for(&r.device, partitions);
            by_shard
                .entry(self.telemetry_shard(p))
                .or_default()
                .push((p, r));
        }
        let max_len = self.inner.config.telemetry_max_len.to_string();
        for (shard, batch) in by_shard {
            for chunk in batch.chunks(TELEMETRY_BATCH) {
                let keys = chunk
                    .iter()
                    .map(|(p, _)| self.key("tm:", &p.to_string()))
                    .collect();
                let mut args = Vec::with_capacity(1 + chunk.len() * 6);
                args.push(v(max_len.clone()));
                for (_, r) in chunk {
                    args.extend(codec::telemetry_fields(r).into_iter().map(Value::from));
                }
                self.eval(shard, &self.inner.scripts.telemetry_append, keys, args)
                    .await?;
            }
        }
        Ok(())
    }

    /// A partition outside `0..telemetry_partitions()` reads as empty; a malformed `after`
    /// is [`BusError::Corrupt`].
    async fn accept(&self, messages: &[Accepted], now_ms: i64) -> BusResult<AcceptReport> {
        self.ingest(messages, now_ms).await
    }

    async fn telemetry_read(
        &self,
        partition: u32,
        after: Option<&StreamId>,
        limit: usize,
    ) -> BusResult<Vec<(StreamId, TelemetryRecord)>> {
        let after = after.map(StreamId::parts).transpose()?;
        if partition >= self.inner.config.telemetry_partitions || limit == 0 {
            return Ok(Vec::new());
        }
        let Some(start) = stream_start(after) else {
            return Ok(Vec::new());
        };
        let entries = self
            .stream_range(
                self.telemetry_shard(partition),
                self.key("tm:", &partition.to_string()),
                start,
                limit,
            )
            .await?;
        entries
            .into_iter()
            .map(|(id, pairs)| Ok((StreamId(id), codec::decode_telemetry(&pairs)?)))
            .collect()
    }

    fn telemetry_partitions(&self) -> u32 {
        self.inner.config.telemetry_partitions
    }

    /// A merge that changes nothing leaves the version (and `updated_ms`) as they were and
    /// creates no shadow; one script call (see `shadow.rs`).
    async fn shadow_merge_reported(
        &self,
        device: &str,
        patch: &Map<String, serde_json::Value>,
        now_ms: i64,
    ) -> BusResult<u64> {
        self.shadow_merge(device, patch, now_ms).await
    }

    /// A merge that changes nothing leaves the version (and `updated_ms`) as they were and
    /// creates no shadow.
    async fn shadow_set_desired(
        &self,
        device: &str,
        patch: &Map<String, serde_json::Value>,
        guard: &DesiredGuard,
        now_ms: i64,
    ) -> BusResult<DesiredMerge> {
        self.shadow_desired(device, patch, guard, now_ms).await
    }

    async fn shadow_get(&self, device: &str) -> BusResult<Option<Shadow>> {
        self.shadow_load(device).await
    }

    async fn publish(&self, channel: &Channel, frame: Bytes, retain: bool) -> BusResult<()> {
        self.fanout_publish(&[(channel.clone(), retain)], frame)
            .await
    }

    async fn publish_many(&self, channels: &[(Channel, bool)], frame: Bytes) -> BusResult<()> {
        self.fanout_publish(channels, frame).await
    }

    async fn subscribe(&self, channel: &Channel) -> BusResult<Subscription> {
        self.fanout_subscribe(channel).await
    }

    async fn history(
        &self,
        channel: &Channel,
        since: Option<u64>,
        limit: usize,
    ) -> BusResult<History> {
        self.fanout_history(channel, since, limit).await
    }

    async fn retained(&self, channel: &Channel) -> BusResult<Option<Bytes>> {
        let reply: Value = self
            .client(self.channel_shard(channel))
            .get(self.key("ret:", &channel.name()))
            .await
            .map_err(fred_err)?;
        Ok(reply.into_bytes())
    }

    async fn doc_put(
        &self,
        kind: DocKind,
        id: &str,
        body: &str,
        expect: DocExpect,
    ) -> BusResult<DocWrite> {
        self.put_doc(kind, id, body, expect).await
    }

    async fn doc_get(&self, kind: DocKind, id: &str) -> BusResult<Option<Doc>> {
        self.get_doc(kind, id).await
    }

    async fn doc_list(
        &self,
        kind: DocKind,
        after: Option<&str>,
        limit: usize,
    ) -> BusResult<Vec<Doc>> {
        self.list_docs(kind, after, limit).await
    }

    async fn doc_delete(&self, kind: DocKind, id: &str) -> BusResult<bool> {
        self.delete_doc(kind, id).await
    }

    async fn audit_head(&self) -> BusResult<String> {
        self.read_audit_head().await
    }

    async fn audit_append(
        &self,
        expected_head: &str,
        new_head: &str,
        entries: &[String],
    ) -> BusResult<Option<Vec<StreamId>>> {
        self.append_audit(expected_head, new_head, entries).await
    }

    /// A malformed `after` is [`BusError::Corrupt`].
    async fn audit_read(
        &self,
        after: Option<&StreamId>,
        limit: usize,
    ) -> BusResult<Vec<AuditRecord>> {
        self.read_audit(after, limit).await
    }

    async fn alert_record(&self, id: &str, alert: &str, open: bool) -> BusResult<StreamId> {
        self.record_alert(id, alert, open).await
    }

    async fn alert_open(&self, id: &str) -> BusResult<Option<String>> {
        self.open_alert(id).await
    }

    async fn alerts_open(&self, limit: usize) -> BusResult<Vec<String>> {
        self.open_alerts(limit).await
    }

    async fn alerts_read(
        &self,
        after: Option<&StreamId>,
        limit: usize,
    ) -> BusResult<Vec<AlertRecord>> {
        self.read_alerts(after, limit).await
    }

    /// One script per shard (and per batch of commands) queues and records its devices'
    /// commands; answers keep the order of `commands`.
    async fn job_push(&self, job: &str, commands: &[Command]) -> BusResult<Vec<JobPush>> {
        self.push_job(job, commands).await
    }

    async fn job_record(&self, job: &str, device: &str, state: JobExecState) -> BusResult<bool> {
        self.record_job(job, device, state).await
    }

    async fn job_counts(&self, job: &str) -> BusResult<JobCounts> {
        self.count_job(job).await
    }

    async fn job_execs(
        &self,
        job: &str,
        after: Option<&str>,
        limit: usize,
    ) -> BusResult<Vec<JobExec>> {
        self.list_job_execs(job, after, limit).await
    }

    /// Takes queued executions shard by shard, in no particular order.
    async fn job_cancel(&self, job: &str, limit: usize) -> BusResult<usize> {
        self.cancel_job(job, limit).await
    }
}
