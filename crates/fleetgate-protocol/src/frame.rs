//! The typed frames of protocol v1. Codecs turn bytes into these and back; nothing past the
//! codec matches on strings.

use serde_json::Value;
use std::fmt;

use crate::ProtocolError;

/// The protocol version this crate speaks, sent as `ver`.
pub const PROTOCOL_VERSION: &str = "1.0";

/// A message identifier: 1-64 characters of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId(String);

impl MsgId {
    /// The longest msgid accepted.
    pub const MAX_LEN: usize = 64;

    /// Validates and wraps a msgid.
    ///
    /// # Errors
    /// [`ProtocolError::BadMsgId`] when it is empty, too long or has other characters.
    pub fn new(id: impl Into<String>) -> Result<Self, ProtocolError> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= Self::MAX_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(id))
        } else {
            Err(ProtocolError::BadMsgId)
        }
    }

    /// The msgid as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Consumes the msgid, returning its text.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Delivery guarantee of a message (MQTT semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum Qos {
    /// At most once: no acknowledgement.
    #[default]
    AtMostOnce = 0,
    /// At least once: `ack`, retransmit with `dup`, receiver dedupes.
    AtLeastOnce = 1,
    /// Exactly once: `rec` / `rel` / `comp`.
    ExactlyOnce = 2,
}

impl Qos {
    /// Parses the wire value.
    ///
    /// # Errors
    /// [`ProtocolError::BadQos`] for anything but 0, 1 or 2.
    pub fn from_u8(v: u64) -> Result<Self, ProtocolError> {
        match v {
            0 => Ok(Self::AtMostOnce),
            1 => Ok(Self::AtLeastOnce),
            2 => Ok(Self::ExactlyOnce),
            _ => Err(ProtocolError::BadQos),
        }
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// Kinds of message frames (frames that carry a payload and their own msgid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Reported state / telemetry, merged into the shadow.
    Status,
    /// An alert or happening, delivered to subscribers at once.
    Event,
    /// Server -> device control; the payload is opaque to the gateway.
    Command,
    /// `payload.items` holds status/event envelopes.
    Batch,
    /// Server -> device: desired state that differs from the reported one,
    /// `payload = {"state": {...}, "version": n}`.
    Delta,
}

impl MessageKind {
    /// The `type` string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Event => "event",
            Self::Command => "command",
            Self::Batch => "batch",
            Self::Delta => "delta",
        }
    }
}

/// Kinds of QoS handshake frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeKind {
    /// QoS 1 acknowledgement.
    Ack,
    /// QoS 2 step 1: received and stored.
    Rec,
    /// QoS 2 step 2: release.
    Rel,
    /// QoS 2 step 3: complete.
    Comp,
}

impl HandshakeKind {
    /// The `type` string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Rec => "rec",
            Self::Rel => "rel",
            Self::Comp => "comp",
        }
    }
}

/// A message frame: status, event, command or batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Protocol version (`"1.0"`).
    pub ver: String,
    /// Message identifier, unique per sender within the replay window.
    pub msgid: MsgId,
    /// Sender's clock, milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// Sender: the device ID, or `"server"`.
    pub from: String,
    /// Receiver: `"server"`, or the device ID.
    pub to: String,
    /// What the message is.
    pub kind: MessageKind,
    /// The body; opaque for commands.
    pub payload: Value,
    /// Delivery guarantee.
    pub qos: Qos,
    /// Keep as the channel's last value for new subscribers.
    pub retain: bool,
    /// Set on retransmissions.
    pub dup: bool,
    /// `nonce` and `sig` of a signed message ([`crate::mac`]); boxed, as most are unsigned.
    pub sig: Option<Box<crate::Signature>>,
}

/// A QoS handshake frame; it reuses the msgid of the message it answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Handshake {
    /// Which step.
    pub kind: HandshakeKind,
    /// The msgid of the message being answered.
    pub msgid: MsgId,
    /// Optional body: `{"result": ...}` or `{"error": ...}` for command answers.
    pub payload: Option<Value>,
}

/// First-frame authentication (`{"type":"auth","deviceId","token"}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// The device authenticating.
    pub device_id: String,
    /// A JWT or a provisioned device secret.
    pub token: String,
}

/// The server's answer to authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthResponse {
    /// Authenticated.
    Success {
        /// Server clock, ms since the epoch.
        timestamp: i64,
        /// Identifies this session in logs and metrics.
        session_id: String,
        /// How often the server pings.
        heartbeat_ms: u64,
    },
    /// Refused; the server closes with 4403 next.
    Error {
        /// Server clock, ms since the epoch.
        timestamp: i64,
        /// Why, in words.
        reason: String,
    },
}

/// Machine-readable reasons carried by an `error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame could not be parsed or lacked a required field.
    Malformed,
    /// `timestamp` was outside the allowed skew window.
    ClockSkew,
    /// The msgid was seen before inside the replay window.
    Replay,
    /// The message type is not accepted in this direction.
    UnsupportedType,
    /// The message's signature is missing, malformed or wrong, or its nonce was used before.
    BadSignature,
    /// The bus could not store the message; retry it.
    Unavailable,
    /// Anything else the server could not do.
    Internal,
}

impl ErrorCode {
    /// The `code` string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::ClockSkew => "clock_skew",
            Self::Replay => "replay",
            Self::UnsupportedType => "unsupported_type",
            Self::BadSignature => "bad_signature",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// Parses the `code` string; unknown codes map to `Internal`.
    pub fn parse(s: &str) -> Self {
        match s {
            "malformed" => Self::Malformed,
            "clock_skew" => Self::ClockSkew,
            "replay" => Self::Replay,
            "unsupported_type" => Self::UnsupportedType,
            "bad_signature" => Self::BadSignature,
            "unavailable" => Self::Unavailable,
            _ => Self::Internal,
        }
    }
}

/// An `error` frame: the server rejected one message but keeps the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// The rejected message, when it had a usable msgid.
    pub msgid: Option<MsgId>,
    /// Why, for machines.
    pub code: ErrorCode,
    /// Why, for people.
    pub message: String,
}

/// One reading in the seed's compact device frames (`{"type":"status","deviceId","timestamp","data"}`).
#[derive(Debug, Clone, PartialEq)]
pub struct CompactItem {
    /// `deviceId`.
    pub device_id: String,
    /// `timestamp`, when given.
    pub timestamp: Option<i64>,
    /// `data` (or, for IIoT frames, `{"values":[...],"quality":...}`).
    pub data: Value,
}

/// A compact frame in the seed's format; the gateway normalises it into an [`Envelope`]
/// with [`Compact::into_envelope`] once it has assigned a msgid.
#[derive(Debug, Clone, PartialEq)]
pub enum Compact {
    /// `{"type":"status","deviceId","timestamp","data"}`.
    Status(CompactItem),
    /// `{"type":"event","deviceId","timestamp","data"}`.
    Event(CompactItem),
    /// `{"type":"batch","data":[{deviceId,timestamp,data}, ...]}`.
    Batch(Vec<CompactItem>),
}

impl Compact {
    /// Normalises a compact frame into an envelope with the gateway-assigned `msgid`: QoS 0,
    /// `to` = `"server"`, a missing timestamp replaced by `now_ms`. A batch becomes a `batch`
    /// envelope whose `payload.items` are status envelopes with msgids `<msgid>-<index>`, each
    /// `from` its item's `deviceId`; the batch itself is `from` its first item's device.
    pub fn into_envelope(self, msgid: MsgId, now_ms: i64) -> Envelope {
        let (kind, from, timestamp, payload) = match self {
            Self::Status(item) => (
                MessageKind::Status,
                item.device_id,
                item.timestamp.unwrap_or(now_ms),
                item.data,
            ),
            Self::Event(item) => (
                MessageKind::Event,
                item.device_id,
                item.timestamp.unwrap_or(now_ms),
                item.data,
            ),
            Self::Batch(items) => {
                let from = items
                    .first()
                    .map(|i| i.device_id.clone())
                    .unwrap_or_default();
                let items = items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| {
                        let env = Self::Status(item).into_envelope(item_msgid(&msgid, i), now_ms);
                        crate::json::envelope_into_value(env)
                    })
                    .collect();
                let mut payload = serde_json::Map::new();
                payload.insert("items".into(), Value::Array(items));
                (MessageKind::Batch, from, now_ms, Value::Object(payload))
            }
        };
        Envelope {
            ver: PROTOCOL_VERSION.to_owned(),
            msgid,
            timestamp,
            from,
            to: "server".to_owned(),
            kind,
            payload,
            qos: Qos::AtMostOnce,
            retain: false,
            dup: false,
            sig: None,
        }
    }
}

/// `<batch msgid>-<index>`, with the prefix cut so that the result stays a valid msgid.
fn item_msgid(batch: &MsgId, index: usize) -> MsgId {
    let suffix = format!("-{index}");
    // msgids are ASCII, so any byte offset is a character boundary.
    let keep = batch.0.len().min(MsgId::MAX_LEN - suffix.len());
    MsgId(format!("{}{suffix}", &batch.0[..keep]))
}

/// Every frame of protocol v1, in either direction.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Client -> server first-frame authentication.
    Auth(Auth),
    /// Server -> client authentication result.
    AuthResponse(AuthResponse),
    /// Status, event, command or batch.
    Message(Envelope),
    /// ack / rec / rel / comp.
    Handshake(Handshake),
    /// Server -> client rejection of one message.
    Error(ErrorFrame),
    /// Seed-format compact device frame, not yet normalised.
    Compact(Compact),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(dev: &str, ts: Option<i64>, data: Value) -> CompactItem {
        CompactItem {
            device_id: dev.into(),
            timestamp: ts,
            data,
        }
    }

    #[test]
    fn compact_status_and_event_normalise() {
        let id = MsgId::new("g1").unwrap();
        let e = Compact::Status(item("d", Some(5), json!({"t":1}))).into_envelope(id.clone(), 99);
        assert_eq!(
            e,
            Envelope {
                ver: "1.0".into(),
                msgid: id.clone(),
                timestamp: 5,
                from: "d".into(),
                to: "server".into(),
                kind: MessageKind::Status,
                payload: json!({"t":1}),
                qos: Qos::AtMostOnce,
                retain: false,
                dup: false,
                sig: None,
            }
        );
        let e = Compact::Event(item("d", None, json!("x"))).into_envelope(id, 99);
        assert_eq!(
            (e.kind, e.timestamp, e.payload),
            (MessageKind::Event, 99, json!("x"))
        );
    }

    #[test]
    fn compact_batch_normalises_into_item_envelopes() {
        let c = Compact::Batch(vec![
            item("a", Some(1), json!({"x":1})),
            item("b", None, json!({})),
        ]);
        let e = c.into_envelope(MsgId::new("b1").unwrap(), 50);
        assert_eq!(
            (e.kind, e.from.as_str(), e.timestamp),
            (MessageKind::Batch, "a", 50)
        );
        assert_eq!(
            e.payload,
            json!({"items":[
                {"ver":"1.0","msgid":"b1-0","timestamp":1,"from":"a","to":"server","type":"status",
                 "payload":{"x":1},"qos":0},
                {"ver":"1.0","msgid":"b1-1","timestamp":50,"from":"b","to":"server","type":"status",
                 "payload":{},"qos":0},
            ]})
        );
        // The items decode back as batch items of their own devices.
        let items = e.payload["items"].as_array().unwrap();
        let first = crate::json::envelope_from_value(&items[0], "a").unwrap();
        assert_eq!(first.msgid.as_str(), "b1-0");
    }

    #[test]
    fn item_msgids_stay_valid_for_long_batch_ids() {
        let long = MsgId::new("x".repeat(64)).unwrap();
        for i in [0, 9, 10, 12345, usize::MAX] {
            let id = item_msgid(&long, i);
            assert!(id.as_str().len() <= MsgId::MAX_LEN);
            assert!(id.as_str().ends_with(&format!("-{i}")));
            assert_eq!(MsgId::new(id.as_str()), Ok(id));
        }
    }
}
