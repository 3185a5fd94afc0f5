//! Values stored in and carried by the bus.

use bytes::Bytes;
use fleetgate_protocol::{CloseCode, MessageKind, MsgId, Qos};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

/// A provisioned device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Device ID (the `sub` of its JWTs, the `Device-ID` header).
    pub id: String,
    /// Groups it belongs to (fan-out channels, RBAC scopes).
    pub groups: Vec<String>,
    /// SHA-256 of its secret; the secret itself is never stored.
    pub secret_sha256: [u8; 32],
    /// When it was provisioned, ms since the epoch.
    pub created_ms: i64,
    /// Revoked devices cannot authenticate.
    pub revoked: bool,
    /// How it reaches fleetgate, which decides where its commands go.
    pub transport: Transport,
    /// Its message-signing key: when set, every message it sends must carry a valid `sig`.
    pub mac_key: Option<[u8; 32]>,
    /// SHA-256 fingerprints of client certificates no longer accepted for it.
    pub revoked_certs: Vec<[u8; 32]>,
}

/// How a device connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// A WebSocket to `/v1/device` (the default).
    #[default]
    Websocket,
    /// Through the MQTT broker (`devices/<id>/...` topics), bridged by the gateway nodes.
    Mqtt,
}

impl Transport {
    /// The name in records and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Websocket => "websocket",
            Self::Mqtt => "mqtt",
        }
    }

    /// Parses [`Transport::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "websocket" => Some(Self::Websocket),
            "mqtt" => Some(Self::Mqtt),
            _ => None,
        }
    }
}

/// A live gateway node, as registered in membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node ID.
    pub id: String,
    /// Authenticated device connections it holds.
    pub connections: u64,
    /// Whether it is draining (accepts no new connections).
    pub draining: bool,
    /// When it started, ms since the epoch.
    pub started_ms: i64,
    /// When this entry was last refreshed, ms since the epoch.
    pub updated_ms: i64,
}

/// Where a device is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// Node holding the connection.
    pub node: String,
    /// Identifies the connection, for compare-and-delete and targeted closes.
    pub conn_id: u64,
    /// When the device authenticated, ms since the epoch.
    pub since_ms: i64,
}

/// A server -> device command.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// Message ID, unique per device.
    pub msgid: MsgId,
    /// Target device.
    pub device: String,
    /// Opaque body.
    pub payload: Value,
    /// Delivery guarantee.
    pub qos: Qos,
    /// When it was accepted, ms since the epoch.
    pub created_ms: i64,
    /// When it expires unacknowledged, ms since the epoch.
    pub expires_ms: i64,
    /// Node to tell the outcome (an admin API waiting for the result), if any.
    pub reply_to: Option<String>,
    /// W3C `traceparent` of the request that sent it.
    pub traceparent: Option<String>,
    /// The fleet job it belongs to: its outcome is recorded in the job's executions.
    pub job: Option<String>,
}

/// Delivery state of a queued QoS 1/2 command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for `ack` (QoS 1) or `rec` (QoS 2).
    Pending,
    /// QoS 2: `rec` received and `rel` sent; waiting for `comp`.
    Released,
}

/// A command in a device's queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedCommand {
    /// The command.
    pub command: Command,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Where the QoS handshake stands.
    pub state: DeliveryState,
    /// A result that rode on a QoS 2 `rec`, kept until `comp`.
    pub result: Option<Value>,
}

/// Why a command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// Its TTL ended before the device acknowledged it.
    Expired,
    /// It was sent `max_attempts` times without acknowledgement.
    AttemptsExhausted,
}

impl FailReason {
    /// Stable name for APIs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::AttemptsExhausted => "attempts_exhausted",
        }
    }
}

/// What became of a command.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandOutcome {
    /// The device acknowledged it with `payload.result`.
    Result(Value),
    /// The device acknowledged it with `payload.error`.
    Error(Value),
    /// The device acknowledged it without a result.
    Done,
    /// It was never acknowledged.
    Failed(FailReason),
}

/// Messages addressed to one node.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeMessage {
    /// New commands are queued for `device`: read its queue.
    Deliver {
        /// The device.
        device: String,
    },
    /// A QoS 0 command: deliver if connected, never queued.
    Command(Command),
    /// Close `device`'s session with `code`, if it is still connection `conn_id` (any
    /// connection of the device when `None`).
    Close {
        /// The device.
        device: String,
        /// The connection to close, if a particular one.
        conn_id: Option<u64>,
        /// Close code to send.
        code: CloseCode,
        /// Close reason.
        reason: String,
    },
    /// A message an MQTT device published, received by another node (the broker shares
    /// device topics among nodes) and passed on to this one, which holds the device.
    MqttInbound {
        /// The device.
        device: String,
        /// The topic's last level: `status`, `events` or `acks`.
        kind: String,
        /// The payload as published (UTF-8 JSON).
        payload: String,
    },
    /// A command's outcome, for the node waiting on it.
    CommandResult {
        /// The device.
        device: String,
        /// The command.
        msgid: String,
        /// What happened.
        outcome: CommandOutcome,
    },
    /// `device`'s desired state changed: send it the delta (desired keys whose value differs
    /// from the reported one), if it is connected here.
    Delta {
        /// The device.
        device: String,
        /// The shadow's version.
        version: u64,
        /// What to change.
        delta: Map<String, Value>,
    },
    /// Messages to this node may have been lost before this one (the backend reconnected,
    /// or the receiver was full): re-read what the lost messages would have announced from
    /// durable state (queues, presence, stored results). The bus sends it itself, after the
    /// subscription is whole again, so anything published later is delivered.
    Resync,
}

/// One accepted status or event, as stored in a telemetry stream.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryRecord {
    /// Sender.
    pub device: String,
    /// Its msgid.
    pub msgid: String,
    /// Status or event.
    pub kind: MessageKind,
    /// Sender's timestamp.
    pub timestamp: i64,
    /// When the gateway accepted it.
    pub received_ms: i64,
    /// The body.
    pub payload: Value,
}

/// An accepted device message and what it does on the bus: its telemetry record, the
/// reported-state patch it carries (statuses), and the frame its channels get.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The record to store.
    pub record: TelemetryRecord,
    /// Top-level keys to merge into the device's reported state (`null` deletes).
    pub shadow: Option<Map<String, Value>>,
    /// Channels to publish on, with whether each keeps the frame as its retained value.
    pub channels: Vec<(Channel, bool)>,
    /// The encoded frame subscribers get.
    pub frame: bytes::Bytes,
}

/// What [`crate::Bus::accept`] could not do after the records were stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AcceptReport {
    /// Shadow merges that failed.
    pub shadow_failed: usize,
    /// Channel publishes that failed.
    pub publish_failed: usize,
}

/// Position of a record in a telemetry stream (a Redis stream ID such as `1700000000000-0`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub String);

impl StreamId {
    /// The `(milliseconds, sequence)` pair, which orders IDs numerically (as strings they do
    /// not). A bare `<ms>` means sequence 0.
    ///
    /// # Errors
    /// [`crate::BusError::Corrupt`] when the ID is not `<ms>[-<seq>]`.
    pub fn parts(&self) -> Result<(u64, u64), crate::BusError> {
        let bad = || crate::BusError::Corrupt(format!("bad stream id {:?}", self.0));
        let (ms, seq) = match self.0.split_once('-') {
            Some((ms, seq)) => (ms, seq.parse::<u64>().map_err(|_| bad())?),
            None => (self.0.as_str(), 0),
        };
        Ok((ms.parse::<u64>().map_err(|_| bad())?, seq))
    }
}

/// A device's shadow: reported and desired state and their difference.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Shadow {
    /// What the device reported.
    pub reported: Map<String, Value>,
    /// What operators want.
    pub desired: Map<String, Value>,
    /// Desired keys whose value differs from the reported one.
    pub delta: Map<String, Value>,
    /// Incremented on every change.
    pub version: u64,
    /// Last change, ms since the epoch.
    pub updated_ms: i64,
}

impl Shadow {
    /// Recomputes `delta` from `desired` and `reported`.
    pub fn recompute_delta(&mut self) {
        self.delta = self
            .desired
            .iter()
            .filter(|(k, v)| self.reported.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    }
}

impl Shadow {
    /// Size of the document a device and its operators share: reported and desired state as
    /// JSON (what the shadow size limit bounds).
    pub fn document_bytes(&self) -> usize {
        serde_json::to_vec(&serde_json::json!({"reported": self.reported, "desired": self.desired}))
            .map_or(0, |v| v.len())
    }
}

/// Conditions on a desired-state write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DesiredGuard {
    /// Write only if the shadow is at this version (0: no shadow yet).
    pub expected_version: Option<u64>,
    /// Refuse a write that would make the document larger than this.
    pub max_bytes: Option<usize>,
}

/// The result of a guarded desired-state write.
#[derive(Debug, Clone, PartialEq)]
pub enum DesiredMerge {
    /// Written (or a no-op that left it as it was): the whole shadow.
    Merged(Shadow),
    /// Not written: the shadow is at another version.
    Stale {
        /// Its version.
        current: u64,
    },
    /// Not written: the document would exceed the limit.
    TooLarge {
        /// Its size with the patch applied.
        bytes: usize,
    },
}

/// The desired-state write both backends make: `Err` when the guard refuses it, `Ok(None)`
/// when the patch changes nothing (the version stays), else the new shadow to store.
pub(crate) fn apply_desired(
    current: Option<&Shadow>,
    patch: &Map<String, Value>,
    guard: &DesiredGuard,
    now_ms: i64,
) -> Result<Option<Shadow>, DesiredMerge> {
    let mut next = current.cloned().unwrap_or_default();
    if let Some(want) = guard.expected_version
        && want != next.version
    {
        return Err(DesiredMerge::Stale {
            current: next.version,
        });
    }
    if !merge_patch(&mut next.desired, patch) {
        return Ok(None);
    }
    if let Some(max) = guard.max_bytes {
        let bytes = next.document_bytes();
        if bytes > max {
            return Err(DesiredMerge::TooLarge { bytes });
        }
    }
    next.version += 1;
    next.updated_ms = now_ms;
    next.recompute_delta();
    Ok(Some(next))
}

/// Applies a top-level merge patch: keys are replaced, `null` deletes. Returns whether
/// anything changed, so callers can keep the version of a no-op merge without comparing a
/// copy of the whole map.
pub fn merge_patch(target: &mut Map<String, Value>, patch: &Map<String, Value>) -> bool {
    let mut changed = false;
    for (k, v) in patch {
        if v.is_null() {
            changed |= target.remove(k).is_some();
        } else if target.get(k) != Some(v) {
            target.insert(k.clone(), v.clone());
            changed = true;
        }
    }
    changed
}

/// A fan-out channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// Everything one device publishes: `device:<id>`.
    Device(String),
    /// Everything the devices of a group publish: `group:<name>`.
    Group(String),
    /// Alerts: events flagged as alerts, failed commands.
    Alerts,
    /// Devices of a group coming online and going offline: `presence:<group>`.
    Presence(String),
}

impl Channel {
    /// The channel's name (`device:<id>`, `group:<name>`, `alerts`, `presence:<group>`).
    pub fn name(&self) -> String {
        match self {
            Self::Device(id) => format!("device:{id}"),
            Self::Group(g) => format!("group:{g}"),
            Self::Alerts => "alerts".to_owned(),
            Self::Presence(g) => format!("presence:{g}"),
        }
    }

    /// Parses a channel name.
    pub fn parse(name: &str) -> Option<Self> {
        if name == "alerts" {
            Some(Self::Alerts)
        } else if let Some(id) = name.strip_prefix("device:").filter(|s| !s.is_empty()) {
            Some(Self::Device(id.to_owned()))
        } else if let Some(g) = name.strip_prefix("group:").filter(|s| !s.is_empty()) {
            Some(Self::Group(g.to_owned()))
        } else {
            name.strip_prefix("presence:")
                .filter(|s| !s.is_empty())
                .map(|g| Self::Presence(g.to_owned()))
        }
    }
}

/// How much of each watched channel's stream the bus keeps, so that a subscriber that
/// reconnects can get what it missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Most frames kept per channel (0 keeps none: offsets only).
    pub size: usize,
    /// How long frames are kept, and how long a channel stays watched after its last
    /// subscriber left (at least one second).
    pub ttl: std::time::Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            size: 100,
            ttl: std::time::Duration::from_secs(300),
        }
    }
}

/// A frame as published on a channel, with its position in the channel's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Position in the channel's stream: 1 for the first frame of an epoch, then +1 each.
    pub offset: u64,
    /// The frame, shared with every other receiver.
    pub frame: Bytes,
}

/// Where a channel's stream stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPosition {
    /// Names one run of offsets: when a channel's state is lost (it was unwatched for longer
    /// than the history TTL, or the backend lost its data) offsets restart under a new epoch.
    pub epoch: String,
    /// The offset of the last frame published (0 before the first).
    pub offset: u64,
}

/// What [`crate::Bus::history`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The channel's position when read (the channel is watched from then on).
    pub position: ChannelPosition,
    /// The kept frames after the requested offset, oldest first.
    pub frames: Vec<Published>,
    /// Whether `frames` holds every frame after the requested offset (`false`: some are no
    /// longer kept, or the offset is not of this epoch).
    pub complete: bool,
}

/// A live subscription to a channel; dropping it unsubscribes.
pub struct Subscription {
    rx: mpsc::Receiver<Published>,
    _guard: Box<dyn Send + Sync>,
}

impl Subscription {
    /// Wraps a receiver and whatever must be dropped to unsubscribe.
    pub fn new(rx: mpsc::Receiver<Published>, guard: impl Send + Sync + 'static) -> Self {
        Self {
            rx,
            _guard: Box::new(guard),
        }
    }

    /// The next frame; `None` once the bus closed the subscription.
    pub async fn recv(&mut self) -> Option<Published> {
        self.rx.recv().await
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}
