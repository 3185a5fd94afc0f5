//! fleetgate's shared state and messaging, behind one [`Bus`] trait.
//!
//! Gateway nodes and the admin API meet only here: presence, node membership, command
//! routing, per-device QoS queues, QoS 2 dedupe, telemetry streams, shadows, fan-out channels
//! and the device registry. Two backends implement it: [`memory::MemoryBus`] (one process,
//! the embedded default) and Redis (for clusters). [`conformance`] holds the test suite
//! both must pass.
//!
//! Presence rests on node liveness: an entry names the node holding the device and stays
//! valid while that node's membership entry is alive, so an idle device costs the bus nothing
//! after it authenticates. Entries naming a dead node read as offline and are swept by
//! survivors ([`Bus::presence_sweep_node`]).

pub mod conformance;
pub mod dispatch;
pub mod memory;
mod node_tx;
mod partition;
pub mod redis;
mod store;
pub mod trace;
mod types;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

pub use partition::partition_for;

/// How long gateways keep a command's outcome for [`Bus::result_get`]: at least as long as any
/// REST call waits (the admin API's `max_wait` may not exceed it). Only commands someone waits
/// on store one, so a cluster holds about (waited commands per second) × 120 of them.
pub const RESULT_TTL: std::time::Duration = std::time::Duration::from_secs(120);
/// How long job executions are kept after their last change, by default.
pub const JOB_RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Default most records kept in the alerts stream (trimmed approximately on Redis).
pub const ALERTS_MAX_LEN: usize = 100_000;
pub use store::*;
pub use types::*;

/// Errors of a bus backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The backend cannot be reached; the caller may retry later.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The device's command queue holds `max` commands already.
    #[error("command queue full ({max} commands)")]
    QueueFull {
        /// The configured maximum queue length.
        max: usize,
    },
    /// Stored data could not be decoded.
    #[error("corrupt bus data: {0}")]
    Corrupt(String),
}

/// Result of a bus call.
pub type BusResult<T> = Result<T, BusError>;

/// The shared state and messaging of a fleetgate cluster. Every call may fail (the Redis
/// backend can be away); calls taking slices are batched (one round trip in Redis).
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Checks that the backend answers (readiness).
    async fn ping(&self) -> BusResult<()>;
    /// Whether the backend is reachable as far as the client knows, without a round trip:
    /// `false` lets callers refuse work at once instead of waiting for a timeout.
    fn connected(&self) -> bool {
        true
    }

    // --- device registry -------------------------------------------------------------

    /// Stores a new device; `Ok(false)` if the ID exists (nothing changes).
    async fn device_create(&self, device: &DeviceRecord) -> BusResult<bool>;
    /// Reads a device.
    async fn device_get(&self, id: &str) -> BusResult<Option<DeviceRecord>>;
    /// Replaces an existing device's record; `Ok(false)` if it does not exist.
    async fn device_update(&self, device: &DeviceRecord) -> BusResult<bool>;
    /// Lists devices in ID order, starting after `after`, at most `limit`.
    async fn device_list(&self, after: Option<&str>, limit: usize) -> BusResult<Vec<DeviceRecord>> {
        let query = DeviceQuery {
            after: after.map(str::to_owned),
            limit,
            ..DeviceQuery::default()
        };
        self.device_query(&query).await
    }
    /// A page of devices in ID order matching the query's filters. Paging with the last ID
    /// of each page as the next `after` returns every device that exists throughout exactly
    /// once, however many are added or removed meanwhile.
    async fn device_query(&self, query: &DeviceQuery) -> BusResult<Vec<DeviceRecord>>;
    /// [`Bus::device_get`] for many devices, in the same order.
    async fn device_get_many(&self, ids: &[String]) -> BusResult<Vec<Option<DeviceRecord>>>;
    /// Deletes a device: its record (and group memberships), its command queue and its
    /// shadow. Presence is left to the session, which the caller closes. `Ok(false)` if
    /// there was no record.
    async fn device_delete(&self, id: &str) -> BusResult<bool>;

    // --- membership ------------------------------------------------------------------

    /// Registers or refreshes this node, alive for `ttl_ms` unless refreshed again.
    async fn node_heartbeat(&self, node: &NodeInfo, ttl_ms: u64) -> BusResult<()>;
    /// Removes a node's membership entry (clean shutdown).
    async fn node_remove(&self, node_id: &str) -> BusResult<()>;
    /// The live nodes.
    async fn nodes(&self) -> BusResult<Vec<NodeInfo>>;

    // --- presence --------------------------------------------------------------------

    /// Records that `device` is connected as `presence`, returning the previous entry if it
    /// was live (so the caller can ask that node to close the older connection with 4409).
    async fn presence_set(&self, device: &str, presence: &Presence) -> BusResult<Option<Presence>>;
    /// Where `device` is connected; `None` when offline or its node is dead.
    async fn presence_get(&self, device: &str) -> BusResult<Option<Presence>>;
    /// [`Bus::presence_get`] for many devices, in the same order.
    async fn presence_get_many(&self, devices: &[String]) -> BusResult<Vec<Option<Presence>>>;
    /// Deletes `device`'s entry only if it still names connection `conn_id`
    /// (compare-and-delete); `Ok(true)` if deleted.
    async fn presence_remove(&self, device: &str, conn_id: u64) -> BusResult<bool>;
    /// Deletes every entry naming `node_id` (a dead or drained node); returns how many.
    async fn presence_sweep_node(&self, node_id: &str) -> BusResult<usize>;

    // --- routing ---------------------------------------------------------------------

    /// Sends a message to one node. Delivery is best effort: the QoS queue is the source of
    /// truth, so a lost message costs latency, not a command.
    async fn node_publish(&self, node_id: &str, message: &NodeMessage) -> BusResult<()>;
    /// Receives the messages sent to `node_id`. The channel is bounded; when the receiver
    /// falls behind, messages are dropped (and counted by the backend), never buffered
    /// without bound. A second subscribe for the same node replaces (closes) the first.
    async fn node_subscribe(&self, node_id: &str) -> BusResult<mpsc::Receiver<NodeMessage>>;
    /// Stores a command's outcome for `ttl_ms` next to the device's queue, then sends it to
    /// `node_id` as a [`NodeMessage::CommandResult`]. A waiter that may have missed the
    /// message (it got a [`NodeMessage::Resync`], or its wait is ending) reads the stored
    /// copy with [`Bus::result_get`], so a lost message costs latency, not the answer.
    async fn result_send(
        &self,
        node_id: &str,
        device: &str,
        msgid: &str,
        outcome: &CommandOutcome,
        ttl_ms: u64,
    ) -> BusResult<()>;
    /// The stored outcome of `device`'s command `msgid`, until its TTL ends.
    async fn result_get(&self, device: &str, msgid: &str) -> BusResult<Option<CommandOutcome>>;

    // --- server -> device QoS queues -------------------------------------------------

    /// Appends a QoS 1/2 command to its device's queue and, when the device is online, sends
    /// its node a [`NodeMessage::Deliver`] in the same step (so no session can register in
    /// between unnoticed); returns the presence it found. Pushing a msgid already queued for
    /// the device queues nothing (`Ok`, even when the queue is full) but notifies again, so a
    /// retried push is safe.
    ///
    /// # Errors
    /// [`BusError::QueueFull`] when the queue is at its maximum length.
    async fn queue_push(&self, command: &Command) -> BusResult<Option<Presence>>;
    /// Up to `limit` queued commands of `device`, oldest first, expired ones excluded: those
    /// queued after command `after` (a cursor: the last one the caller already has), or from
    /// the oldest when `after` is `None` or no longer queued.
    async fn queue_pending(
        &self,
        device: &str,
        after: Option<&str>,
        limit: usize,
    ) -> BusResult<Vec<QueuedCommand>>;
    /// The next commands to send, counting a delivery attempt for each in the same step: as
    /// [`Bus::queue_pending`], minus the msgids in `skip` (the caller's commands in flight),
    /// each returned with its new attempt count.
    async fn queue_next(
        &self,
        device: &str,
        after: Option<&str>,
        skip: &[&str],
        limit: usize,
    ) -> BusResult<Vec<QueuedCommand>>;
    /// Counts one more delivery attempt; returns the new count (`None` if not queued).
    async fn queue_attempt(&self, device: &str, msgid: &str) -> BusResult<Option<u32>>;
    /// Marks a QoS 2 command as released (the device answered `rec`, the server sent `rel`),
    /// keeping any result the `rec` carried (a later release without one keeps it too).
    async fn queue_release(
        &self,
        device: &str,
        msgid: &str,
        result: Option<&serde_json::Value>,
    ) -> BusResult<Option<QueuedCommand>>;
    /// Removes an acknowledged command; returns it if it was queued.
    async fn queue_ack(&self, device: &str, msgid: &str) -> BusResult<Option<QueuedCommand>>;
    /// Removes an acknowledged command and reads the next ones to send, in one step where the
    /// bus can: [`Bus::queue_ack`]; then, if the command was still queued and `result` names
    /// the node waiting for it (node ID, outcome, TTL in ms), [`Bus::result_send`]; then
    /// [`Bus::queue_next`] with `after`, `skip` and `limit`. Returns the removed command and
    /// the next ones.
    async fn queue_ack_next(
        &self,
        device: &str,
        msgid: &str,
        result: Option<(&str, &CommandOutcome, u64)>,
        after: Option<&str>,
        skip: &[&str],
        limit: usize,
    ) -> BusResult<(Option<QueuedCommand>, Vec<QueuedCommand>)> {
        let removed = self.queue_ack(device, msgid).await?;
        if let (Some(_), Some((node, outcome, ttl_ms))) = (&removed, result) {
            self.result_send(node, device, msgid, outcome, ttl_ms)
                .await?;
        }
        let next = self.queue_next(device, after, skip, limit).await?;
        Ok((removed, next))
    }
    /// Removes a command that failed (attempts exhausted); returns it if it was queued.
    async fn queue_fail(&self, device: &str, msgid: &str) -> BusResult<Option<QueuedCommand>>;
    /// Atomically removes and returns up to `limit` commands, of any device, whose TTL ended
    /// at or before `now_ms`. Exactly one caller gets each expired command, so exactly one
    /// node reports it.
    async fn queue_take_expired(&self, now_ms: i64, limit: usize) -> BusResult<Vec<QueuedCommand>>;
    /// Number of commands queued for `device`, counting expired ones not yet taken.
    async fn queue_len(&self, device: &str) -> BusResult<usize>;

    // --- device -> server QoS 2 dedupe -----------------------------------------------

    /// Stores `msgid` as received from `device` for `ttl_ms`; `Ok(true)` if it is new
    /// (process it), `Ok(false)` if already stored (answer `rec` again, don't reprocess).
    async fn qos2_receive(&self, device: &str, msgid: &str, ttl_ms: u64) -> BusResult<bool>;
    /// Forgets a received msgid on `rel`; `Ok(true)` if it was stored.
    async fn qos2_release(&self, device: &str, msgid: &str) -> BusResult<bool>;

    // --- telemetry, shadow, fan-out --------------------------------------------------

    /// Appends accepted status/event records to their telemetry stream partitions. Once this
    /// returns `Ok`, the records are as durable as the backend makes them (QoS 1 acks wait
    /// for it).
    async fn telemetry_append(&self, records: &[TelemetryRecord]) -> BusResult<()>;
    /// What accepted messages do, in order: their records are appended (which decides the
    /// result: `Ok` means every record is as durable as [`Bus::telemetry_append`] makes it),
    /// then each status's shadow patch is merged and each frame published on its channels,
    /// as [`Bus::shadow_merge_reported`] and [`Bus::publish_many`] would. Those later steps
    /// failing does not fail the call; the report counts them. A backend may do it all in
    /// one round trip and batch the calls of many sessions (Redis does both).
    async fn accept(&self, messages: &[Accepted], now_ms: i64) -> BusResult<AcceptReport>;
    /// Reads a partition after `after` (exclusive; `None` = from the start), at most `limit`.
    async fn telemetry_read(
        &self,
        partition: u32,
        after: Option<&StreamId>,
        limit: usize,
    ) -> BusResult<Vec<(StreamId, TelemetryRecord)>>;
    /// Number of telemetry partitions; a device's records all go to one of them.
    fn telemetry_partitions(&self) -> u32;

    /// Merges a reported-state patch into `device`'s shadow (top-level keys; `null` deletes
    /// a key) and returns the new version. A patch that changes nothing keeps the version
    /// (0 and no shadow created when there was none).
    async fn shadow_merge_reported(
        &self,
        device: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
        now_ms: i64,
    ) -> BusResult<u64>;
    /// Merges a desired-state patch and returns the whole new shadow (its `delta` is what
    /// the device should be told). A no-op patch keeps the version, as for reported.
    async fn shadow_merge_desired(
        &self,
        device: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
        now_ms: i64,
    ) -> BusResult<Shadow> {
        match self
            .shadow_set_desired(device, patch, &DesiredGuard::default(), now_ms)
            .await?
        {
            DesiredMerge::Merged(shadow) => Ok(shadow),
            // An empty guard refuses nothing.
            refused => Err(BusError::Corrupt(format!(
                "unguarded write refused: {refused:?}"
            ))),
        }
    }
    /// [`Bus::shadow_merge_desired`] under a guard: only at the expected version, only
    /// within the size limit (checked atomically with the write).
    async fn shadow_set_desired(
        &self,
        device: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
        guard: &DesiredGuard,
        now_ms: i64,
    ) -> BusResult<DesiredMerge>;
    /// Reads `device`'s shadow.
    async fn shadow_get(&self, device: &str) -> BusResult<Option<Shadow>>;

    /// Publishes an encoded frame on a fan-out channel; with `retain` it also becomes the
    /// channel's last value. Only a *watched* channel (one with a subscriber somewhere, or
    /// whose last subscriber left less than the history TTL ago, or whose history was read
    /// that recently) gives the frame an offset, keeps it in its history and delivers it;
    /// on any other channel a publish costs no more than the retained write.
    async fn publish(&self, channel: &Channel, frame: Bytes, retain: bool) -> BusResult<()>;
    /// [`Bus::publish`] of one frame to several channels, `retain` per channel: what an
    /// accepted message does (its device's channel, its groups'). A backend may do it in
    /// fewer round trips (Redis: one script call per shard); an error may leave some of the
    /// channels published.
    async fn publish_many(&self, channels: &[(Channel, bool)], frame: Bytes) -> BusResult<()> {
        for (channel, retain) in channels {
            self.publish(channel, frame.clone(), *retain).await?;
        }
        Ok(())
    }
    /// Subscribes to a channel, which is watched from then on; dropping the
    /// [`Subscription`] unsubscribes. Frames published after this returns are delivered, in
    /// offset order; the retained value is not replayed (see [`Bus::retained`]). When the
    /// subscriber falls behind, frames are dropped (and counted); the offsets show the gap,
    /// which [`Bus::history`] may fill.
    async fn subscribe(&self, channel: &Channel) -> BusResult<Subscription>;
    /// The channel's retained value, if any.
    async fn retained(&self, channel: &Channel) -> BusResult<Option<Bytes>>;
    /// The channel's position and, when `since` is given, up to `limit` kept frames after
    /// that offset. Reading watches the channel for the history TTL, so a position read now
    /// stays valid for a subscriber that comes back within it.
    async fn history(
        &self,
        channel: &Channel,
        since: Option<u64>,
        limit: usize,
    ) -> BusResult<History>;

    // --- admin documents -------------------------------------------------------------

    /// Writes a document if it is as `expect`ed (atomically: concurrent writers with the same
    /// expectation see exactly one `Written`).
    async fn doc_put(
        &self,
        kind: DocKind,
        id: &str,
        body: &str,
        expect: DocExpect,
    ) -> BusResult<DocWrite>;
    /// Reads a document.
    async fn doc_get(&self, kind: DocKind, id: &str) -> BusResult<Option<Doc>>;
    /// Documents of a kind in ID order, after `after`, at most `limit`.
    async fn doc_list(
        &self,
        kind: DocKind,
        after: Option<&str>,
        limit: usize,
    ) -> BusResult<Vec<Doc>>;
    /// Deletes a document; `Ok(false)` if there was none.
    async fn doc_delete(&self, kind: DocKind, id: &str) -> BusResult<bool>;

    // --- audit log -------------------------------------------------------------------

    /// The log's head token, as last set by [`Bus::audit_append`] (empty for a new log).
    async fn audit_head(&self) -> BusResult<String>;
    /// Appends `entries` in order and sets the head token to `new_head`, but only if the head
    /// is still `expected_head`; atomically, so appends from many processes form one chain.
    /// Returns the new entries' positions, or `None` (nothing written) if the head moved.
    async fn audit_append(
        &self,
        expected_head: &str,
        new_head: &str,
        entries: &[String],
    ) -> BusResult<Option<Vec<StreamId>>>;
    /// Entries after position `after` (exclusive; `None` = from the start) in append order,
    /// at most `limit`. Entries appended while a reader pages are returned after the ones it
    /// has, so paging returns each entry exactly once.
    async fn audit_read(
        &self,
        after: Option<&StreamId>,
        limit: usize,
    ) -> BusResult<Vec<AuditRecord>>;

    // --- alerts ----------------------------------------------------------------------

    /// Records an alert's new state in one step: appends `alert` (JSON) to the alerts
    /// stream, which integrations read with consumer groups, and keeps it as open alert `id`
    /// (`open`) or forgets the open alert (`!open`, a resolution). Returns its position.
    async fn alert_record(&self, id: &str, alert: &str, open: bool) -> BusResult<StreamId>;
    /// The open alert `id`, as last recorded.
    async fn alert_open(&self, id: &str) -> BusResult<Option<String>>;
    /// Every open alert (at most `limit`), in no particular order.
    async fn alerts_open(&self, limit: usize) -> BusResult<Vec<String>>;
    /// Records of the alerts stream after position `after` (exclusive; `None` = the oldest
    /// retained), in append order, at most `limit`.
    async fn alerts_read(
        &self,
        after: Option<&StreamId>,
        limit: usize,
    ) -> BusResult<Vec<AlertRecord>>;

    // --- jobs ------------------------------------------------------------------------

    /// Queues each command (all with [`Command::job`] = `job`) and records its device's
    /// execution as `Queued`, in one step per device; a device that already has an execution
    /// of the job gets nothing queued ([`JobPush::Exists`]). Answers per command, in order.
    async fn job_push(&self, job: &str, commands: &[Command]) -> BusResult<Vec<JobPush>>;
    /// Moves a device's execution to `state` if that is higher in rank
    /// ([`JobExecState::rank`]); `Ok(false)` if there is no execution or it is already as far.
    async fn job_record(&self, job: &str, device: &str, state: JobExecState) -> BusResult<bool>;
    /// Executions per state.
    async fn job_counts(&self, job: &str) -> BusResult<JobCounts>;
    /// Executions in device ID order after `after`, at most `limit`.
    async fn job_execs(
        &self,
        job: &str,
        after: Option<&str>,
        limit: usize,
    ) -> BusResult<Vec<JobExec>>;
    /// Takes up to `limit` executions still `Queued`: those whose command was never sent are
    /// removed from their device's queue and become `Cancelled`; any sent meanwhile become
    /// `Delivered`. Returns how many it took; call until 0.
    async fn job_cancel(&self, job: &str, limit: usize) -> BusResult<usize>;
}
