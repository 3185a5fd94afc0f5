//! The in-process bus: the embedded default for a single node.
//!
//! State lives in process memory behind std mutexes whose critical sections are short and
//! never span an `.await` (no call here awaits at all), one mutex per concern so that, say,
//! telemetry appends do not contend with presence reads. Nothing survives a restart.
//!
//! Clocks: node and QoS 2 dedupe TTLs run on [`tokio::time::Instant`] (tests may pause and
//! advance time); command TTLs are the wall-clock `expires_ms` carried by each [`Command`];
//! telemetry stream IDs are wall-clock milliseconds, kept strictly increasing per partition.
//!
//! Growth is bounded: queues have a maximum length, telemetry partitions are trimmed to a
//! maximum length (oldest first, like `XADD MAXLEN`), expired QoS 2 entries are purged lazily
//! and by amortised sweeps, channels are bounded and drop (and count) what a slow receiver
//! cannot take.

mod admin;
mod alerts;
mod fanout;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::node_tx::NodeTx;
use tokio::time::Instant;

use crate::{
    AcceptReport, Accepted, AlertRecord, AuditRecord, Bus, BusError, BusResult, Channel, Command,
    CommandOutcome, DeliveryState, DeviceQuery, DeviceRecord, Doc, DocExpect, DocKind, DocWrite,
    History, JobCounts, JobExec, JobExecState, JobPush, NodeInfo, NodeMessage, Presence,
    QueuedCommand, Shadow, StreamId, Subscription, TelemetryRecord, merge_patch, partition_for,
};
use crate::{DesiredGuard, DesiredMerge};

/// Sizing of a [`MemoryBus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBusConfig {
    /// Most commands queued per device; further pushes fail with [`BusError::QueueFull`].
    pub queue_max_len: usize,
    /// Number of telemetry partitions (at least 1).
    pub telemetry_partitions: u32,
    /// Most records kept per telemetry partition; the oldest are trimmed (at least 1).
    pub telemetry_max_len: usize,
    /// Capacity of each node's message channel (at least 1).
    pub node_channel_capacity: usize,
    /// Capacity of each fan-out subscription (at least 1).
    pub subscription_capacity: usize,
    /// What each watched fan-out channel keeps for subscribers that come back.
    pub history: crate::HistoryConfig,
    /// How long a job's executions are kept after their last change.
    pub job_retention: Duration,
    /// Most records kept in the alerts stream; the oldest are trimmed (at least 1).
    pub alerts_max_len: usize,
}

impl Default for MemoryBusConfig {
    fn default() -> Self {
        Self {
            queue_max_len: 1000,
            telemetry_partitions: 4,
            telemetry_max_len: 100_000,
            node_channel_capacity: 4096,
            subscription_capacity: 1024,
            history: crate::HistoryConfig::default(),
            job_retention: crate::JOB_RETENTION,
            alerts_max_len: crate::ALERTS_MAX_LEN,
        }
    }
}

/// Sizes of a [`MemoryBus`]'s state, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryBusStats {
    /// Registered devices.
    pub devices: usize,
    /// Membership entries held (live ones and expired ones not yet purged).
    pub node_entries: usize,
    /// Presence entries (including entries naming dead nodes, until swept).
    pub presence_entries: usize,
    /// Commands in all queues.
    pub queued_commands: usize,
    /// Devices with a non-empty queue.
    pub queued_devices: usize,
    /// Entries of the command expiry index (always equal to `queued_commands`).
    pub expiry_index: usize,
    /// QoS 2 dedupe entries held (live ones and expired ones not yet purged).
    pub qos2_entries: usize,
    /// Stored command outcomes (including expired ones not yet swept).
    pub stored_results: usize,
    /// Telemetry records held over all partitions.
    pub telemetry_records: usize,
    /// Device shadows.
    pub shadows: usize,
    /// Fan-out channels with a subscriber or a retained value.
    pub channels: usize,
    /// Fan-out subscriptions.
    pub subscribers: usize,
    /// Node message channels.
    pub node_subscribers: usize,
    /// Fan-out frames dropped because a subscriber was full.
    pub dropped_messages: u64,
    /// Node messages dropped because the node's receiver was full.
    pub dropped_node_messages: u64,
    /// Jobs whose executions are held.
    pub jobs: usize,
}

/// The in-process [`Bus`]. Cloning is cheap: clones share the same state.
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl MemoryBus {
    /// Appends records to their partitions, trimming each to its maximum length.
    fn append_records<'a>(&self, records: impl Iterator<Item = &'a TelemetryRecord>) {
        let partitions = self.inner.config.telemetry_partitions;
        let max_len = self.inner.config.telemetry_max_len;
        let now = u64::try_from(wall_ms()).unwrap_or(0);
        for record in records {
            let p = partition_for(&record.device, partitions) as usize;
            let mut partition = lock(&self.inner.telemetry[p]);
            let id = partition.next_id(now);
            partition.records.push_back((id, record.clone()));
            while partition.records.len() > max_len {
                partition.records.pop_front();
            }
        }
    }

    /// A bus sized by `config` (zero sizes are raised to 1).
    pub fn new(config: MemoryBusConfig) -> Self {
        Self {
            inner: Arc::new(Inner::new(config)),
        }
    }

    /// The effective configuration.
    pub fn config(&self) -> &MemoryBusConfig {
        &self.inner.config
    }

    /// Fan-out frames dropped so far because a subscriber had no room.
    pub fn dropped_messages(&self) -> u64 {
        self.inner.fanout.dropped.load(Ordering::Relaxed)
    }

    /// Node messages dropped so far because the node's receiver had no room.
    pub fn dropped_node_messages(&self) -> u64 {
        self.inner.dropped_node_messages.load(Ordering::Relaxed)
    }

    /// Live subscriptions to `channel`.
    pub fn subscriber_count(&self, channel: &Channel) -> usize {
        self.inner.fanout.subscriber_count(channel)
    }

    /// Current sizes of the bus's state.
    pub fn stats(&self) -> MemoryBusStats {
        let inner = &*self.inner;
        let devices = lock(&inner.registry).len();
        let (node_entries, presence_entries) = {
            let c = lock(&inner.cluster);
            (c.nodes.len(), c.presence.len())
        };
        let (queued_commands, queued_devices, expiry_index) = {
            let q = lock(&inner.queues);
            (
                q.devices.values().map(|d| d.order.len()).sum(),
                q.devices.len(),
                q.expiry.len(),
            )
        };
        let qos2_entries = lock(&inner.qos2).len;
        let stored_results = lock(&inner.results).entries.len();
        let telemetry_records = inner.telemetry.iter().map(|p| lock(p).records.len()).sum();
        let shadows = lock(&inner.shadows).len();
        let (channels, subscribers) = inner.fanout.counts();
        let node_subscribers = lock(&inner.node_channels).len();
        MemoryBusStats {
            devices,
            node_entries,
            presence_entries,
            queued_commands,
            queued_devices,
            expiry_index,
            qos2_entries,
            stored_results,
            telemetry_records,
            shadows,
            channels,
            subscribers,
            node_subscribers,
            dropped_messages: self.dropped_messages(),
            dropped_node_messages: self.dropped_node_messages(),
            jobs: lock(&inner.jobs).len(),
        }
    }
}

struct Inner {
    config: MemoryBusConfig,
    registry: Mutex<admin::Registry>,
    docs: Mutex<admin::Docs>,
    audit: Mutex<admin::Audit>,
    alerts: Mutex<alerts::Alerts>,
    /// Locked before `queues` where both are held.
    jobs: Mutex<admin::Jobs>,
    cluster: Mutex<Cluster>,
    node_channels: Mutex<HashMap<String, NodeTx>>,
    queues: Mutex<Queues>,
    results: Mutex<Results>,
    qos2: Mutex<Qos2>,
    telemetry: Vec<Mutex<Partition>>,
    shadows: Mutex<HashMap<String, Shadow>>,
    fanout: Arc<fanout::Fanout>,
    dropped_node_messages: AtomicU64,
}

impl Default for Inner {
    fn default() -> Self {
        Self::new(MemoryBusConfig::default())
    }
}

impl Inner {
    fn new(mut config: MemoryBusConfig) -> Self {
        config.telemetry_partitions = config.telemetry_partitions.max(1);
        config.telemetry_max_len = config.telemetry_max_len.max(1);
        config.node_channel_capacity = config.node_channel_capacity.max(1);
        config.subscription_capacity = config.subscription_capacity.max(1);
        let telemetry = (0..config.telemetry_partitions)
            .map(|_| Mutex::new(Partition::default()))
            .collect();
        let jobs = Mutex::new(admin::Jobs::new(config.job_retention));
        let alerts = Mutex::new(alerts::Alerts::new(config.alerts_max_len));
        let fanout = Arc::new(fanout::Fanout::new(
            config.history,
            config.subscription_capacity,
        ));
        Self {
            config,
            registry: Mutex::default(),
            docs: Mutex::default(),
            audit: Mutex::default(),
            alerts,
            jobs,
            cluster: Mutex::default(),
            node_channels: Mutex::default(),
            queues: Mutex::default(),
            results: Mutex::default(),
            qos2: Mutex::new(Qos2::default()),
            telemetry,
            shadows: Mutex::default(),
            fanout,
            dropped_node_messages: AtomicU64::new(0),
        }
    }

    /// Unexpired commands of `device` after `after`, at most `limit`; when `count` holds the
    /// msgids to skip, those are left out and each returned command has an attempt counted.
    fn read_queue(
        &self,
        device: &str,
        after: Option<&str>,
        count: Option<&[&str]>,
        limit: usize,
    ) -> Vec<QueuedCommand> {
        use std::ops::Bound::{Excluded, Unbounded};
        let now = wall_ms();
        let mut queues = lock(&self.queues);
        let Some(q) = queues.devices.get_mut(device) else {
            return Vec::new();
        };
        let from = after
            .and_then(|m| q.by_msgid.get(m))
            .map_or(Unbounded, |&seq| Excluded(seq));
        let skip = count.unwrap_or_default();
        q.order
            .range_mut((from, Unbounded))
            .map(|(_, c)| c)
            .filter(|c| c.command.expires_ms > now && !skip.contains(&c.command.msgid.as_str()))
            .take(limit)
            .map(|c| {
                if count.is_some() {
                    c.attempts = c.attempts.saturating_add(1);
                }
                c.clone()
            })
            .collect()
    }

    /// Queues `command` (a no-op for a msgid already queued).
    fn push(&self, command: &Command) -> BusResult<()> {
        let max = self.config.queue_max_len;
        let mut queues = lock(&self.queues);
        let queues = &mut *queues;
        if let Some(q) = queues.devices.get(&command.device) {
            if q.by_msgid.contains_key(command.msgid.as_str()) {
                return Ok(());
            }
            if q.order.len() >= max {
                return Err(BusError::QueueFull { max });
            }
        } else if max == 0 {
            return Err(BusError::QueueFull { max });
        }
        let seq = queues.next_seq;
        queues.next_seq += 1;
        let q = queues.devices.entry(command.device.clone()).or_default();
        q.by_msgid.insert(command.msgid.as_str().to_owned(), seq);
        q.order.insert(
            seq,
            QueuedCommand {
                command: command.clone(),
                attempts: 0,
                state: DeliveryState::Pending,
                result: None,
            },
        );
        queues
            .expiry
            .insert((command.expires_ms, seq), command.device.clone());
        Ok(())
    }
}

/// Locks, recovering from poisoning: every critical section leaves the state consistent
/// before anything that could panic, so a panicking holder elsewhere must not wedge the bus.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

// --- membership and presence ---------------------------------------------------------------

/// Membership and presence share a lock because every presence read consults liveness.
#[derive(Default)]
struct Cluster {
    nodes: HashMap<String, (NodeInfo, Instant)>,
    presence: HashMap<String, Presence>,
}

impl Cluster {
    fn is_live(&self, node: &str, now: Instant) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|(_, deadline)| *deadline > now)
    }

    fn live_presence(&self, device: &str, now: Instant) -> Option<Presence> {
        self.presence
            .get(device)
            .filter(|p| self.is_live(&p.node, now))
            .cloned()
    }

    fn purge_dead_nodes(&mut self, now: Instant) {
        self.nodes.retain(|_, (_, deadline)| *deadline > now);
    }
}

// --- queues --------------------------------------------------------------------------------

#[derive(Default)]
struct Queues {
    devices: HashMap<String, DeviceQueue>,
    /// `(expires_ms, seq)` -> device: lets `queue_take_expired` find expired commands
    /// without scanning every queue.
    expiry: BTreeMap<(i64, u64), String>,
    next_seq: u64,
}

#[derive(Default)]
struct DeviceQueue {
    /// Push order: `seq` -> command.
    order: BTreeMap<u64, QueuedCommand>,
    by_msgid: HashMap<String, u64>,
}

impl Queues {
    fn get_mut(&mut self, device: &str, msgid: &str) -> Option<&mut QueuedCommand> {
        let q = self.devices.get_mut(device)?;
        let seq = *q.by_msgid.get(msgid)?;
        q.order.get_mut(&seq)
    }

    fn remove(&mut self, device: &str, msgid: &str) -> Option<QueuedCommand> {
        let q = self.devices.get_mut(device)?;
        let seq = q.by_msgid.remove(msgid)?;
        let removed = q.order.remove(&seq);
        if q.order.is_empty() {
            self.devices.remove(device);
        }
        let removed = removed?;
        self.expiry.remove(&(removed.command.expires_ms, seq));
        Some(removed)
    }

    fn remove_by_seq(&mut self, device: &str, seq: u64) -> Option<QueuedCommand> {
        let q = self.devices.get_mut(device)?;
        let removed = q.order.remove(&seq);
        if let Some(r) = &removed {
            q.by_msgid.remove(r.command.msgid.as_str());
        }
        if q.order.is_empty() {
            self.devices.remove(device);
        }
        removed
    }
}

// --- QoS 2 dedupe --------------------------------------------------------------------------

/// Sweeps never run more often than once per this many inserts.
const QOS2_MIN_SWEEP: usize = 1024;

/// Stored command outcomes by device and msgid, with their deadlines; expired entries go
/// in amortised sweeps, as for [`Qos2`].
struct Results {
    entries: HashMap<(String, String), (CommandOutcome, Instant)>,
    sweep_at: usize,
}

impl Default for Results {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            sweep_at: QOS2_MIN_SWEEP,
        }
    }
}

impl Results {
    fn key(device: &str, msgid: &str) -> (String, String) {
        (device.to_owned(), msgid.to_owned())
    }

    fn put(&mut self, device: &str, msgid: &str, outcome: CommandOutcome, deadline: Instant) {
        let now = Instant::now();
        if self.entries.len() >= self.sweep_at {
            self.entries.retain(|_, (_, d)| *d > now);
            self.sweep_at = (self.entries.len() * 2).max(QOS2_MIN_SWEEP);
        }
        self.entries
            .insert(Self::key(device, msgid), (outcome, deadline));
    }

    fn get(&self, device: &str, msgid: &str) -> Option<CommandOutcome> {
        let now = Instant::now();
        self.entries
            .get(&Self::key(device, msgid))
            .filter(|(_, d)| *d > now)
            .map(|(o, _)| o.clone())
    }
}

struct Qos2 {
    entries: HashMap<String, HashMap<String, Instant>>,
    len: usize,
    /// A full sweep runs when `len` reaches this; it is then set to twice the survivors, so
    /// sweeps cost O(1) amortised per insert and memory stays within twice the live set.
    sweep_at: usize,
}

impl Default for Qos2 {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            len: 0,
            sweep_at: QOS2_MIN_SWEEP,
        }
    }
}

impl Qos2 {
    fn receive(&mut self, device: &str, msgid: &str, deadline: Instant, now: Instant) -> bool {
        if let Some(ids) = self.entries.get_mut(device) {
            if let Some(d) = ids.get_mut(msgid) {
                if *d > now {
                    return false;
                }
                *d = deadline;
                return true;
            }
            ids.insert(msgid.to_owned(), deadline);
        } else {
            self.entries.insert(
                device.to_owned(),
                HashMap::from([(msgid.to_owned(), deadline)]),
            );
        }
        self.len += 1;
        if self.len >= self.sweep_at {
            self.sweep(now);
            self.sweep_at = (self.len * 2).max(QOS2_MIN_SWEEP);
        }
        true
    }

    fn release(&mut self, device: &str, msgid: &str, now: Instant) -> bool {
        let Some(ids) = self.entries.get_mut(device) else {
            return false;
        };
        let removed = ids.remove(msgid);
        if ids.is_empty() {
            self.entries.remove(device);
        }
        match removed {
            Some(deadline) => {
                self.len -= 1;
                deadline > now
            }
            None => false,
        }
    }

    fn sweep(&mut self, now: Instant) {
        let mut len = 0;
        self.entries.retain(|_, ids| {
            ids.retain(|_, deadline| *deadline > now);
            len += ids.len();
            !ids.is_empty()
        });
        self.len = len;
    }
}

// --- telemetry -----------------------------------------------------------------------------

#[derive(Default)]
struct Partition {
    /// Ascending by `(ms, seq)`.
    records: VecDeque<((u64, u64), TelemetryRecord)>,
    last: (u64, u64),
}

impl Partition {
    fn next_id(&mut self, wall_ms: u64) -> (u64, u64) {
        let id = if wall_ms > self.last.0 {
            (wall_ms, 0)
        } else {
            // The clock stood still or went back: stay on the last ms, like Redis does.
            (self.last.0, self.last.1 + 1)
        };
        self.last = id;
        id
    }
}

/// Parses `<ms>-<seq>` (or `<ms>`, read as `<ms>-0`).
fn format_stream_id((ms, seq): (u64, u64)) -> StreamId {
    StreamId(format!("{ms}-{seq}"))
}

// --- the trait -----------------------------------------------------------------------------

#[async_trait]
impl Bus for MemoryBus {
    async fn ping(&self) -> BusResult<()> {
        Ok(())
    }

    async fn device_create(&self, device: &DeviceRecord) -> BusResult<bool> {
        let mut reg = lock(&self.inner.registry);
        if reg.get(&device.id).is_some() {
            return Ok(false);
        }
        reg.put(device.clone());
        Ok(true)
    }

    async fn device_get(&self, id: &str) -> BusResult<Option<DeviceRecord>> {
        Ok(lock(&self.inner.registry).get(id).cloned())
    }

    async fn device_update(&self, device: &DeviceRecord) -> BusResult<bool> {
        let mut reg = lock(&self.inner.registry);
        if reg.get(&device.id).is_none() {
            return Ok(false);
        }
        reg.put(device.clone());
        Ok(true)
    }

    async fn device_query(&self, query: &DeviceQuery) -> BusResult<Vec<DeviceRecord>> {
        Ok(lock(&self.inner.registry).query(query))
    }

    async fn device_get_many(&self, ids: &[String]) -> BusResult<Vec<Option<DeviceRecord>>> {
        let reg = lock(&self.inner.registry);
        Ok(ids.iter().map(|id| reg.get(id).cloned()).collect())
    }

    async fn device_delete(&self, id: &str) -> BusResult<bool> {
        if lock(&self.inner.registry).remove(id).is_none() {
            return Ok(false);
        }
        {
            let mut queues = lock(&self.inner.queues);
            if let Some(q) = queues.devices.remove(id) {
                for (seq, c) in q.order {
                    queues.expiry.remove(&(c.command.expires_ms, seq));
                }
            }
        }
        lock(&self.inner.shadows).remove(id);
        Ok(true)
    }

    async fn node_heartbeat(&self, node: &NodeInfo, ttl_ms: u64) -> BusResult<()> {
        let now = Instant::now();
        let deadline = now + Duration::from_millis(ttl_ms);
        let mut cluster = lock(&self.inner.cluster);
        cluster.purge_dead_nodes(now);
        cluster
            .nodes
            .insert(node.id.clone(), (node.clone(), deadline));
        Ok(())
    }

    async fn node_remove(&self, node_id: &str) -> BusResult<()> {
        lock(&self.inner.cluster).nodes.remove(node_id);
        Ok(())
    }

    async fn nodes(&self) -> BusResult<Vec<NodeInfo>> {
        let now = Instant::now();
        let mut cluster = lock(&self.inner.cluster);
        cluster.purge_dead_nodes(now);
        let mut nodes: Vec<NodeInfo> = cluster.nodes.values().map(|(n, _)| n.clone()).collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    async fn presence_set(&self, device: &str, presence: &Presence) -> BusResult<Option<Presence>> {
        let now = Instant::now();
        let mut cluster = lock(&self.inner.cluster);
        let previous = cluster.presence.insert(device.to_owned(), presence.clone());
        Ok(previous.filter(|p| cluster.is_live(&p.node, now)))
    }

    async fn presence_get(&self, device: &str) -> BusResult<Option<Presence>> {
        let now = Instant::now();
        Ok(lock(&self.inner.cluster).live_presence(device, now))
    }

    async fn presence_get_many(&self, devices: &[String]) -> BusResult<Vec<Option<Presence>>> {
        let now = Instant::now();
        let cluster = lock(&self.inner.cluster);
        Ok(devices
            .iter()
            .map(|d| cluster.live_presence(d, now))
            .collect())
    }

    async fn presence_remove(&self, device: &str, conn_id: u64) -> BusResult<bool> {
        let mut cluster = lock(&self.inner.cluster);
        if cluster
            .presence
            .get(device)
            .is_some_and(|p| p.conn_id == conn_id)
        {
            cluster.presence.remove(device);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    async fn presence_sweep_node(&self, node_id: &str) -> BusResult<usize> {
        let mut cluster = lock(&self.inner.cluster);
        let before = cluster.presence.len();
        cluster.presence.retain(|_, p| p.node != node_id);
        Ok(before - cluster.presence.len())
    }

    async fn node_publish(&self, node_id: &str, message: &NodeMessage) -> BusResult<()> {
        let mut channels = lock(&self.inner.node_channels);
        let Some(node) = channels.get_mut(node_id) else {
            return Ok(());
        };
        if node
            .send(message.clone(), &self.inner.dropped_node_messages)
            .is_err()
        {
            channels.remove(node_id);
        }
        Ok(())
    }

    async fn node_subscribe(&self, node_id: &str) -> BusResult<mpsc::Receiver<NodeMessage>> {
        let (tx, rx) = mpsc::channel(self.inner.config.node_channel_capacity);
        let mut channels = lock(&self.inner.node_channels);
        channels.retain(|_, node| !node.is_closed());
        // Replacing the sender closes the previous receiver: one subscriber per node.
        channels.insert(node_id.to_owned(), NodeTx::new(tx));
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
        let deadline = Instant::now() + Duration::from_millis(ttl_ms);
        lock(&self.inner.results).put(device, msgid, outcome.clone(), deadline);
        let message = NodeMessage::CommandResult {
            device: device.to_owned(),
            msgid: msgid.to_owned(),
            outcome: outcome.clone(),
        };
        self.node_publish(node_id, &message).await
    }

    async fn result_get(&self, device: &str, msgid: &str) -> BusResult<Option<CommandOutcome>> {
        Ok(lock(&self.inner.results).get(device, msgid))
    }

    /// A push repeating a msgid already queued for the device is a no-op (`Ok`), so that a
    /// retried push after an ambiguous failure cannot queue the command twice.
    async fn queue_push(&self, command: &Command) -> BusResult<Option<Presence>> {
        self.inner.push(command)?;
        // After the push: a session registering meanwhile either is seen here or reads its
        // queue after the push.
        let presence = self.presence_get(&command.device).await?;
        if let Some(p) = &presence {
            let deliver = NodeMessage::Deliver {
                device: command.device.clone(),
            };
            self.node_publish(&p.node, &deliver).await?;
        }
        Ok(presence)
    }

    async fn queue_pending(
        &self,
        device: &str,
        after: Option<&str>,
        limit: usize,
    ) -> BusResult<Vec<QueuedCommand>> {
        Ok(self.inner.read_queue(device, after, None, limit))
    }

    async fn queue_next(
        &self,
        device: &str,
        after: Option<&str>,
        skip: &[&str],
        limit: usize,
    ) -> BusResult<Vec<QueuedCommand>> {
        Ok(self.inner.read_queue(device, after, Some(skip), limit))
    }

    async fn queue_attempt(&self, device: &str, msgid: &str) -> BusResult<Option<u32>> {
        let mut queues = lock(&self.inner.queues);
        Ok(queues.get_mut(device, msgid).map(|c| {
            c.attempts = c.attempts.saturating_add(1);
            c.attempts
        }))
    }

    /// A release without a result keeps a result stored by an earlier release (a repeated
    /// `rec` need not repeat it).
    async fn queue_release(
        &self,
        device: &str,
        msgid: &str,
        result: Option<&Value>,
    ) -> BusResult<Option<QueuedCommand>> {
        let mut queues = lock(&self.inner.queues);
        Ok(queues.get_mut(device, msgid).map(|c| {
            c.state = DeliveryState::Released;
            if let Some(r) = result {
                c.result = Some(r.clone());
            }
            c.clone()
        }))
    }

    async fn queue_ack(&self, device: &str, msgid: &str) -> BusResult<Option<QueuedCommand>> {
        Ok(lock(&self.inner.queues).remove(device, msgid))
    }

    async fn queue_fail(&self, device: &str, msgid: &str) -> BusResult<Option<QueuedCommand>> {
        Ok(lock(&self.inner.queues).remove(device, msgid))
    }

    async fn queue_take_expired(&self, now_ms: i64, limit: usize) -> BusResult<Vec<QueuedCommand>> {
        let mut queues = lock(&self.inner.queues);
        let mut taken = Vec::new();
        while taken.len() < limit {
            let Some(entry) = queues.expiry.first_entry() else {
                break;
            };
            if entry.key().0 > now_ms {
                break;
            }
            let ((_, seq), device) = entry.remove_entry();
            if let Some(c) = queues.remove_by_seq(&device, seq) {
                taken.push(c);
            }
        }
        Ok(taken)
    }

    async fn queue_len(&self, device: &str) -> BusResult<usize> {
        Ok(lock(&self.inner.queues)
            .devices
            .get(device)
            .map_or(0, |q| q.order.len()))
    }

    async fn qos2_receive(&self, device: &str, msgid: &str, ttl_ms: u64) -> BusResult<bool> {
        let now = Instant::now();
        let deadline = now + Duration::from_millis(ttl_ms);
        Ok(lock(&self.inner.qos2).receive(device, msgid, deadline, now))
    }

    async fn qos2_release(&self, device: &str, msgid: &str) -> BusResult<bool> {
        let now = Instant::now();
        Ok(lock(&self.inner.qos2).release(device, msgid, now))
    }

    async fn telemetry_append(&self, records: &[TelemetryRecord]) -> BusResult<()> {
        self.append_records(records.iter());
        Ok(())
    }

    async fn accept(&self, messages: &[Accepted], now_ms: i64) -> BusResult<AcceptReport> {
        self.append_records(messages.iter().map(|m| &m.record));
        let mut report = AcceptReport::default();
        for m in messages {
            if let Some(patch) = &m.shadow
                && self
                    .shadow_merge_reported(&m.record.device, patch, now_ms)
                    .await
                    .is_err()
            {
                report.shadow_failed += 1;
            }
            if !m.channels.is_empty()
                && self
                    .publish_many(&m.channels, m.frame.clone())
                    .await
                    .is_err()
            {
                report.publish_failed += m.channels.len();
            }
        }
        Ok(report)
    }

    /// A partition outside `0..telemetry_partitions()` reads as empty; a malformed `after`
    /// is [`BusError::Corrupt`].
    async fn telemetry_read(
        &self,
        partition: u32,
        after: Option<&StreamId>,
        limit: usize,
    ) -> BusResult<Vec<(StreamId, TelemetryRecord)>> {
        let after = after.map(StreamId::parts).transpose()?;
        let Some(partition) = self.inner.telemetry.get(partition as usize) else {
            return Ok(Vec::new());
        };
        let partition = lock(partition);
        let start = after.map_or(0, |a| partition.records.partition_point(|(id, _)| *id <= a));
        Ok(partition
            .records
            .range(start..)
            .take(limit)
            .map(|(id, r)| (format_stream_id(*id), r.clone()))
            .collect())
    }

    fn telemetry_partitions(&self) -> u32 {
        self.inner.config.telemetry_partitions
    }

    /// A merge that changes nothing leaves the version (and `updated_ms`) as they were and
    /// creates no shadow.
    async fn shadow_merge_reported(
        &self,
        device: &str,
        patch: &Map<String, Value>,
        now_ms: i64,
    ) -> BusResult<u64> {
        let mut shadows = lock(&self.inner.shadows);
        Ok(
            merge_into(&mut shadows, device, patch, now_ms, |s| &mut s.reported)
                .map_or(0, |s| s.version),
        )
    }

    /// A merge that changes nothing leaves the version (and `updated_ms`) as they were and
    /// creates no shadow.
    async fn shadow_set_desired(
        &self,
        device: &str,
        patch: &Map<String, Value>,
        guard: &DesiredGuard,
        now_ms: i64,
    ) -> BusResult<DesiredMerge> {
        let mut shadows = lock(&self.inner.shadows);
        Ok(
            match crate::types::apply_desired(shadows.get(device), patch, guard, now_ms) {
                Ok(Some(next)) => {
                    shadows.insert(device.to_owned(), next.clone());
                    DesiredMerge::Merged(next)
                }
                Ok(None) => DesiredMerge::Merged(shadows.get(device).cloned().unwrap_or_default()),
                Err(refused) => refused,
            },
        )
    }

    async fn shadow_get(&self, device: &str) -> BusResult<Option<Shadow>> {
        Ok(lock(&self.inner.shadows).get(device).cloned())
    }

    async fn publish(&self, channel: &Channel, frame: Bytes, retain: bool) -> BusResult<()> {
        self.inner.fanout.publish(channel, frame, retain);
        Ok(())
    }

    async fn subscribe(&self, channel: &Channel) -> BusResult<Subscription> {
        Ok(self.inner.fanout.subscribe(channel))
    }

    async fn retained(&self, channel: &Channel) -> BusResult<Option<Bytes>> {
        Ok(self.inner.fanout.retained(channel))
    }

    async fn history(
        &self,
        channel: &Channel,
        since: Option<u64>,
        limit: usize,
    ) -> BusResult<History> {
        Ok(self.inner.fanout.history(channel, since, limit))
    }

    async fn doc_put(
        &self,
        kind: DocKind,
        id: &str,
        body: &str,
        expect: DocExpect,
    ) -> BusResult<DocWrite> {
        Ok(lock(&self.inner.docs).put(kind, id, body, expect))
    }

    async fn doc_get(&self, kind: DocKind, id: &str) -> BusResult<Option<Doc>> {
        Ok(lock(&self.inner.docs).get(kind, id))
    }

    async fn doc_list(
        &self,
        kind: DocKind,
        after: Option<&str>,
        limit: usize,
    ) -> BusResult<Vec<Doc>> {
        Ok(lock(&self.inner.docs).list(kind, after, limit))
    }

    async fn doc_delete(&self, kind: DocKind, id: &str) -> BusResult<bool> {
        Ok(lock(&self.inner.docs).delete(kind, id))
    }

    async fn audit_head(&self) -> BusResult<String> {
        Ok(lock(&self.inner.audit).head())
    }

    async fn audit_append(
        &self,
        expected_head: &str,
        new_head: &str,
        entries: &[String],
    ) -> BusResult<Option<Vec<StreamId>>> {
        let now = u64::try_from(wall_ms()).unwrap_or(0);
        Ok(lock(&self.inner.audit).append(now, expected_head, new_head, entries))
    }

    async fn audit_read(
        &self,
        after: Option<&StreamId>,
        limit: usize,
    ) -> BusResult<Vec<AuditRecord>> {
        let after = after.map(StreamId::parts).transpose()?;
        Ok(lock(&self.inner.audit).read(after, limit))
    }

    async fn alert_record(&self, id: &str, alert: &str, open: bool) -> BusResult<StreamId> {
        let now = u64::try_from(wall_ms()).unwrap_or(0);
        Ok(lock(&self.inner.alerts).record(now, id, alert, open))
    }

    async fn alert_open(&self, id: &str) -> BusResult<Option<String>> {
        Ok(lock(&self.inner.alerts).open(id))
    }

    async fn alerts_open(&self, limit: usize) -> BusResult<Vec<String>> {
        Ok(lock(&self.inner.alerts).all_open(limit))
    }

    async fn alerts_read(
        &self,
        after: Option<&StreamId>,
        limit: usize,
    ) -> BusResult<Vec<AlertRecord>> {
        let after = after.map(StreamId::parts).transpose()?;
        Ok(lock(&self.inner.alerts).read(after, limit))
    }

    async fn job_push(&self, job: &str, commands: &[Command]) -> BusResult<Vec<JobPush>> {
        let mut answers = Vec::with_capacity(commands.len());
        let mut queued = Vec::new();
        {
            let mut jobs = lock(&self.inner.jobs);
            for c in commands {
                let device = c.device.as_str();
                let msgid = c.msgid.as_str();
                if jobs.has(job, device) {
                    answers.push(JobPush::Exists);
                    continue;
                }
                match self.inner.push(c) {
                    Ok(()) => {
                        jobs.insert(job, device, msgid, JobExecState::Queued, wall_ms());
                        answers.push(JobPush::Queued);
                        queued.push(device);
                    }
                    Err(BusError::QueueFull { .. }) => {
                        jobs.insert(job, device, msgid, JobExecState::Failed, wall_ms());
                        answers.push(JobPush::QueueFull);
                    }
                    Err(other) => return Err(other),
                }
            }
        }
        // As in `queue_push`: after the push, so a session registering meanwhile is either
        // told here or reads its queue itself.
        for device in queued {
            if let Some(p) = self.presence_get(device).await? {
                let deliver = NodeMessage::Deliver {
                    device: device.to_owned(),
                };
                self.node_publish(&p.node, &deliver).await?;
            }
        }
        Ok(answers)
    }

    async fn job_record(&self, job: &str, device: &str, state: JobExecState) -> BusResult<bool> {
        Ok(lock(&self.inner.jobs).record(job, device, state, wall_ms()))
    }

    async fn job_counts(&self, job: &str) -> BusResult<JobCounts> {
        Ok(lock(&self.inner.jobs).counts(job))
    }

    async fn job_execs(
        &self,
        job: &str,
        after: Option<&str>,
        limit: usize,
    ) -> BusResult<Vec<JobExec>> {
        Ok(lock(&self.inner.jobs).execs(job, after, limit))
    }

    async fn job_cancel(&self, job: &str, limit: usize) -> BusResult<usize> {
        let mut jobs = lock(&self.inner.jobs);
        let taken = jobs.queued(job, limit);
        let mut queues = lock(&self.inner.queues);
        for (device, msgid) in &taken {
            let unsent = queues
                .get_mut(device, msgid)
                .is_some_and(|c| c.attempts == 0);
            let state = if unsent {
                queues.remove(device, msgid);
                JobExecState::Cancelled
            } else {
                // Sent (or even answered) meanwhile: its outcome is on its way.
                JobExecState::Delivered
            };
            jobs.record(job, device, state, wall_ms());
        }
        Ok(taken.len())
    }
}

/// Merges `patch` into the part of `device`'s shadow that `part` selects, bumping the version
/// and recomputing the delta only when something changed; `None` when there is no shadow
/// (none existed and the patch added nothing).
fn merge_into<'a>(
    shadows: &'a mut HashMap<String, Shadow>,
    device: &str,
    patch: &Map<String, Value>,
    now_ms: i64,
    part: impl Fn(&mut Shadow) -> &mut Map<String, Value>,
) -> Option<&'a Shadow> {
    if !shadows.contains_key(device) {
        let mut fresh = Shadow::default();
        if !merge_patch(part(&mut fresh), patch) {
            return None;
        }
        fresh.version = 1;
        fresh.updated_ms = now_ms;
        fresh.recompute_delta();
        return Some(shadows.entry(device.to_owned()).or_insert(fresh));
    }
    let shadow = shadows.get_mut(device)?;
    if merge_patch(part(shadow), patch) {
        shadow.version += 1;
        shadow.updated_ms = now_ms;
        shadow.recompute_delta();
    }
    Some(shadow)
}
