//! The JSON codec (`fleetgate.v1.json`), including the seed's compact frames.
//!
//! Decoding goes through one flat private struct whose scalar fields accept any JSON type
//! ([`Scalar`]). A field of the wrong type is therefore reported as that field's own error
//! (`BadQos`, `BadMsgId`, ...) instead of a generic serde message, and only when the frame type
//! says the field matters: a handshake may carry any other envelope field, valid or not. The
//! Protobuf codec fills the same struct, so both codecs share one set of rules and errors.
//! Every wire string of the protocol (`type`, `status`, field names) lives in this module.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    Auth, AuthResponse, Compact, CompactItem, Envelope, ErrorCode, ErrorFrame, Frame, Handshake,
    HandshakeKind, MessageKind, MsgId, PROTOCOL_VERSION, ProtocolError, Qos, Signature,
};

/// `to` when a frame leaves it out.
const DEFAULT_TO: &str = "server";
/// `auth_response.status` values.
const STATUS_SUCCESS: &str = "success";
const STATUS_ERROR: &str = "error";
/// Longest piece of peer-supplied text quoted back in an error, so a huge bogus `type` cannot
/// blow up logs.
const MAX_QUOTED: usize = 32;

/// Decodes one JSON frame.
///
/// # Errors
/// A [`ProtocolError`] for anything that is not a valid v1 frame.
pub fn decode(bytes: &[u8]) -> Result<Frame, ProtocolError> {
    // A derived struct would also accept a JSON array as positional fields; frames are objects.
    let first = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(&b'{') {
        return Err(ProtocolError::Malformed(
            "a frame must be a JSON object".into(),
        ));
    }
    let mut wire: Wire<'_> = serde_json::from_slice(bytes).map_err(malformed)?;
    if wire.sig.is_some() {
        let raw: RawPayload<'_> = serde_json::from_slice(bytes).map_err(malformed)?;
        wire.raw_payload = raw.payload.map(|p| p.get().as_bytes());
    }
    let ty = frame_type(wire.ty.as_ref())?;
    match ty {
        FrameType::Message(kind @ (MessageKind::Status | MessageKind::Event))
            if wire.msgid.is_none() && wire.device_id.is_some() =>
        {
            let item = compact_item(
                wire.device_id,
                wire.timestamp,
                wire.data,
                wire.values,
                wire.quality,
            )?;
            Ok(Frame::Compact(if kind == MessageKind::Status {
                Compact::Status(item)
            } else {
                Compact::Event(item)
            }))
        }
        FrameType::Message(MessageKind::Batch) if wire.msgid.is_none() && wire.data.is_some() => {
            compact_batch(wire.data).map(|items| Frame::Compact(Compact::Batch(items)))
        }
        _ => build(ty, wire),
    }
}

/// Encodes one frame as JSON.
pub fn encode(frame: &Frame) -> Vec<u8> {
    match frame {
        Frame::Auth(a) => to_vec(&AuthOut {
            ty: "auth",
            device_id: &a.device_id,
            token: &a.token,
        }),
        Frame::AuthResponse(r) => to_vec(&auth_response_out(r)),
        Frame::Message(env) => to_vec(&EnvelopeOut::new(env)),
        Frame::Handshake(h) => to_vec(&HandshakeOut {
            ty: h.kind.as_str(),
            msgid: h.msgid.as_str(),
            payload: h.payload.as_ref(),
        }),
        Frame::Error(e) => to_vec(&ErrorOut {
            ver: PROTOCOL_VERSION,
            ty: "error",
            msgid: e.msgid.as_ref().map(MsgId::as_str),
            payload: ErrorPayloadOut {
                code: e.code.as_str(),
                message: &e.message,
            },
        }),
        Frame::Compact(Compact::Status(item)) => to_vec(&CompactOut::new("status", item)),
        Frame::Compact(Compact::Event(item)) => to_vec(&CompactOut::new("event", item)),
        Frame::Compact(Compact::Batch(items)) => to_vec(&CompactBatchOut {
            ty: "batch",
            data: items.iter().map(CompactOut::new_item).collect(),
        }),
    }
}

/// Encodes one message envelope as JSON without wrapping it in a [`Frame`] (the gateway's
/// fan-out path encodes envelopes it still needs afterwards).
pub fn encode_envelope(env: &Envelope) -> Vec<u8> {
    to_vec(&EnvelopeOut::new(env))
}

/// Reads a status/event envelope from a JSON value (a batch item); a missing `from`
/// defaults to `device_id`.
///
/// # Errors
/// A [`ProtocolError`] for a missing or invalid field.
pub fn envelope_from_value(item: &Value, device_id: &str) -> Result<Envelope, ProtocolError> {
    if !item.is_object() {
        return Err(ProtocolError::Malformed(
            "a batch item must be a JSON object".into(),
        ));
    }
    let wire = Wire::deserialize(item).map_err(malformed)?;
    match frame_type(wire.ty.as_ref())? {
        FrameType::Message(kind) => envelope(kind, wire, Some(device_id)),
        _ => Err(ProtocolError::BadBatch(format!(
            "items must be status or event envelopes, not `{}`",
            quote(scalar_str(wire.ty.as_ref()).unwrap_or_default())
        ))),
    }
}

/// The JSON object form of an envelope, as [`encode`] writes it; used to build
/// `payload.items` of a batch.
pub fn envelope_into_value(env: Envelope) -> Value {
    let mut m = Map::new();
    m.insert("ver".into(), Value::String(env.ver));
    m.insert("msgid".into(), Value::String(env.msgid.into_string()));
    m.insert("timestamp".into(), env.timestamp.into());
    m.insert("from".into(), Value::String(env.from));
    m.insert("to".into(), Value::String(env.to));
    m.insert("type".into(), env.kind.as_str().into());
    m.insert("payload".into(), env.payload);
    m.insert("qos".into(), env.qos.as_u8().into());
    if env.retain {
        m.insert("retain".into(), true.into());
    }
    if env.dup {
        m.insert("dup".into(), true.into());
    }
    Value::Object(m)
}

// ---------------------------------------------------------------------------------------------
// Decoding, shared with the Protobuf codec.

/// What a frame is, once `type` has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameType {
    Auth,
    AuthResponse,
    Message(MessageKind),
    Handshake(HandshakeKind),
    Error,
}

fn frame_type(ty: Option<&Scalar<'_>>) -> Result<FrameType, ProtocolError> {
    let ty = match ty {
        None => return Err(ProtocolError::MissingField("type")),
        Some(Scalar::Str(s)) => s,
        Some(_) => return Err(ProtocolError::Malformed("`type` must be a string".into())),
    };
    Ok(match ty.as_ref() {
        "status" => FrameType::Message(MessageKind::Status),
        "event" => FrameType::Message(MessageKind::Event),
        "command" => FrameType::Message(MessageKind::Command),
        "delta" => FrameType::Message(MessageKind::Delta),
        "batch" => FrameType::Message(MessageKind::Batch),
        "ack" => FrameType::Handshake(HandshakeKind::Ack),
        "rec" => FrameType::Handshake(HandshakeKind::Rec),
        "rel" => FrameType::Handshake(HandshakeKind::Rel),
        "comp" => FrameType::Handshake(HandshakeKind::Comp),
        "auth" => FrameType::Auth,
        "auth_response" => FrameType::AuthResponse,
        "error" => FrameType::Error,
        other => return Err(ProtocolError::UnknownType(quote(other).to_owned())),
    })
}

/// Any JSON value, keeping only what a scalar field needs. Containers are skipped.
#[derive(Debug)]
pub(crate) enum Scalar<'a> {
    /// A string, borrowed from the input when it has no escapes.
    Str(Cow<'a, str>),
    /// A negative integer.
    Int(i64),
    /// A non-negative integer.
    UInt(u64),
    /// `true` / `false`.
    Bool(bool),
    /// A float, array or object.
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor(PhantomData))
    }
}

struct ScalarVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for ScalarVisitor<'a> {
    type Value = Scalar<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(u64::try_from(v).map_or(Scalar::Int(v), Scalar::UInt))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::UInt(v))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Scalar::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

/// Every field any frame uses. `null` counts as absent throughout, as serde's `Option` reads
/// it. Unknown fields are ignored so that later minor versions can add some.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Wire<'a> {
    #[serde(rename = "type", borrow)]
    pub ty: Option<Scalar<'a>>,
    #[serde(borrow)]
    pub ver: Option<Scalar<'a>>,
    #[serde(borrow)]
    pub msgid: Option<Scalar<'a>>,
    #[serde(borrow)]
    pub timestamp: Option<Scalar<'a>>,
    #[serde(borrow)]
    pub from: Option<Scalar<'a>>,
    #[serde(borrow)]
    pub to: Option<Scalar<'a>>,
    #[serde(borrow)]
    pub qos: Option<Scalar<'a>>,
    #[serde(borrow)]
    pub retain: Option<Scalar<'a>>,
    #[serde(borrow)]
    pub dup: Option<Scalar<'a>>,
    pub payload: Option<Value>,
    #[serde(rename = "deviceId", borrow)]
    pub device_id: Option<Scalar<'a>>,
    #[serde(borrow)]
    pub token: Option<Scalar<'a>>,
    #[serde(borrow)]
    pub status: Option<Scalar<'a>>,
    #[serde(borrow)]
    pub reason: Option<Scalar<'a>>,
    #[serde(rename = "sessionId", borrow)]
    pub session_id: Option<Scalar<'a>>,
    #[serde(rename = "heartbeatMs", borrow)]
    pub heartbeat_ms: Option<Scalar<'a>>,
    /// Compact frames only (JSON only).
    pub data: Option<Value>,
    /// Compact IIoT frames only (JSON only).
    pub values: Option<Value>,
    /// Compact IIoT frames only (JSON only).
    pub quality: Option<Value>,
    /// Signed messages: the single-use value under the MAC.
    #[serde(borrow)]
    pub nonce: Option<Scalar<'a>>,
    /// Signed messages: hex HMAC-SHA256 of the canonical form ([`crate::mac`]).
    #[serde(borrow)]
    pub sig: Option<Scalar<'a>>,
    /// The payload's bytes as they were on the wire; filled only for signed frames, which is
    /// what their MAC covers.
    #[serde(skip)]
    pub raw_payload: Option<&'a [u8]>,
}

/// The payload of a frame, unparsed: read in a second pass, and only for signed frames, so
/// unsigned traffic pays nothing for it.
#[derive(Deserialize)]
struct RawPayload<'a> {
    #[serde(borrow)]
    payload: Option<&'a serde_json::value::RawValue>,
}

/// One item of a compact batch.
#[derive(Deserialize)]
struct CompactWire<'a> {
    #[serde(rename = "deviceId", borrow)]
    device_id: Option<Scalar<'a>>,
    #[serde(borrow)]
    timestamp: Option<Scalar<'a>>,
    data: Option<Value>,
    values: Option<Value>,
    quality: Option<Value>,
}

/// Builds a non-compact frame of type `ty` from its fields.
pub(crate) fn build(ty: FrameType, w: Wire<'_>) -> Result<Frame, ProtocolError> {
    match ty {
        FrameType::Auth => Ok(Frame::Auth(Auth {
            device_id: req_string("deviceId", w.device_id)?,
            token: req_string("token", w.token)?,
        })),
        FrameType::AuthResponse => {
            // The design's failure example has no timestamp, so it is optional here.
            let timestamp = opt_timestamp(w.timestamp)?.unwrap_or(0);
            let status = req_string("status", w.status)?;
            match status.as_str() {
                STATUS_SUCCESS => Ok(Frame::AuthResponse(AuthResponse::Success {
                    timestamp,
                    session_id: req_string("sessionId", w.session_id)?,
                    heartbeat_ms: match w.heartbeat_ms {
                        None => return Err(ProtocolError::MissingField("heartbeatMs")),
                        Some(Scalar::UInt(v)) => v,
                        Some(_) => return Err(type_error("heartbeatMs", "a non-negative integer")),
                    },
                })),
                STATUS_ERROR => Ok(Frame::AuthResponse(AuthResponse::Error {
                    timestamp,
                    reason: req_string("reason", w.reason)?,
                })),
                other => Err(ProtocolError::Malformed(format!(
                    "`status` must be `success` or `error`, not `{}`",
                    quote(other)
                ))),
            }
        }
        FrameType::Message(kind) => envelope(kind, w, None).map(Frame::Message),
        FrameType::Handshake(kind) => Ok(Frame::Handshake(Handshake {
            kind,
            msgid: req_msgid(w.msgid)?,
            payload: w.payload,
        })),
        FrameType::Error => {
            let msgid = w.msgid.map(msgid).transpose()?;
            let Some(payload) = w.payload else {
                return Err(ProtocolError::MissingField("payload"));
            };
            let Value::Object(mut p) = payload else {
                return Err(type_error("payload", "an object"));
            };
            let code = match p.get("code") {
                None | Some(Value::Null) => {
                    return Err(ProtocolError::MissingField("payload.code"));
                }
                Some(Value::String(c)) => ErrorCode::parse(c),
                Some(_) => return Err(type_error("payload.code", "a string")),
            };
            let message = match p.remove("message") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(m)) => m,
                Some(_) => return Err(type_error("payload.message", "a string")),
            };
            Ok(Frame::Error(ErrorFrame {
                msgid,
                code,
                message,
            }))
        }
    }
}

/// Builds a message envelope; `default_from` stands in for a missing `from` (batch items).
fn envelope(
    kind: MessageKind,
    w: Wire<'_>,
    default_from: Option<&str>,
) -> Result<Envelope, ProtocolError> {
    let msgid = req_msgid(w.msgid)?;
    let timestamp = opt_timestamp(w.timestamp)?.ok_or(ProtocolError::MissingField("timestamp"))?;
    let from = match (w.from, default_from) {
        (None, Some(d)) => d.to_owned(),
        (from, _) => req_string("from", from)?,
    };
    let payload = w.payload.ok_or(ProtocolError::MissingField("payload"))?;
    let sig = match (w.sig, w.raw_payload) {
        (Some(sig), Some(raw)) => Some(Box::new(Signature::received(
            opt_string("nonce", w.nonce)?.unwrap_or_default(),
            req_string("sig", Some(sig))?,
            raw.to_vec(),
        ))),
        _ => None,
    };
    let ver = match w.ver {
        None => PROTOCOL_VERSION.to_owned(),
        Some(Scalar::Str(v)) if is_v1(&v) => v.into_owned(),
        Some(Scalar::Str(v)) => {
            return Err(ProtocolError::Malformed(format!(
                "unsupported protocol version `{}`; this server speaks 1.x",
                quote(&v)
            )));
        }
        Some(_) => return Err(type_error("ver", "a string")),
    };
    let to = opt_string("to", w.to)?.unwrap_or_else(|| DEFAULT_TO.to_owned());
    let qos = match w.qos {
        None => Qos::AtMostOnce,
        Some(Scalar::UInt(q)) => Qos::from_u8(q)?,
        Some(_) => return Err(ProtocolError::BadQos),
    };
    Ok(Envelope {
        ver,
        msgid,
        timestamp,
        from,
        to,
        kind,
        payload,
        qos,
        retain: opt_bool("retain", w.retain)?,
        dup: opt_bool("dup", w.dup)?,
        sig,
    })
}

/// `1`, or `1.` followed by digits: other major versions are a different protocol.
fn is_v1(ver: &str) -> bool {
    match ver.strip_prefix('1') {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix('.')
            .is_some_and(|minor| !minor.is_empty() && minor.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

fn compact_item(
    device_id: Option<Scalar<'_>>,
    timestamp: Option<Scalar<'_>>,
    data: Option<Value>,
    values: Option<Value>,
    quality: Option<Value>,
) -> Result<CompactItem, ProtocolError> {
    let device_id = req_string("deviceId", device_id)?;
    let timestamp = opt_timestamp(timestamp)?;
    let data = match (data, values, quality) {
        (Some(data), _, _) => data,
        (None, None, None) => return Err(ProtocolError::MissingField("data")),
        // The seed's IIoT shape: the readings travel at top level instead of under `data`.
        (None, values, quality) => {
            let mut m = Map::new();
            if let Some(v) = values {
                m.insert("values".into(), v);
            }
            if let Some(q) = quality {
                m.insert("quality".into(), q);
            }
            Value::Object(m)
        }
    };
    Ok(CompactItem {
        device_id,
        timestamp,
        data,
    })
}

fn compact_batch(data: Option<Value>) -> Result<Vec<CompactItem>, ProtocolError> {
    let Some(Value::Array(items)) = data else {
        return Err(type_error("data", "an array"));
    };
    if items.is_empty() {
        // The normalised batch takes its `from` from the items; with none there is no sender.
        return Err(ProtocolError::BadBatch(
            "a compact batch needs at least one item".into(),
        ));
    }
    items
        .into_iter()
        .map(|item| {
            if !item.is_object() {
                return Err(ProtocolError::Malformed(
                    "a batch item must be a JSON object".into(),
                ));
            }
            let w = CompactWire::deserialize(item).map_err(malformed)?;
            compact_item(w.device_id, w.timestamp, w.data, w.values, w.quality)
        })
        .collect()
}

fn req_msgid(s: Option<Scalar<'_>>) -> Result<MsgId, ProtocolError> {
    s.map(msgid)
        .unwrap_or(Err(ProtocolError::MissingField("msgid")))
}

fn msgid(s: Scalar<'_>) -> Result<MsgId, ProtocolError> {
    match s {
        Scalar::Str(s) => MsgId::new(s),
        _ => Err(ProtocolError::BadMsgId),
    }
}

fn opt_string(field: &'static str, s: Option<Scalar<'_>>) -> Result<Option<String>, ProtocolError> {
    match s {
        None => Ok(None),
        Some(Scalar::Str(s)) => Ok(Some(s.into_owned())),
        Some(_) => Err(type_error(field, "a string")),
    }
}

fn req_string(field: &'static str, s: Option<Scalar<'_>>) -> Result<String, ProtocolError> {
    opt_string(field, s)?.ok_or(ProtocolError::MissingField(field))
}

fn opt_timestamp(s: Option<Scalar<'_>>) -> Result<Option<i64>, ProtocolError> {
    match s {
        None => Ok(None),
        Some(Scalar::Int(v)) => Ok(Some(v)),
        Some(Scalar::UInt(v)) => i64::try_from(v)
            .map(Some)
            .map_err(|_| type_error("timestamp", "an integer (ms since the epoch)")),
        Some(_) => Err(type_error("timestamp", "an integer (ms since the epoch)")),
    }
}

fn opt_bool(field: &'static str, s: Option<Scalar<'_>>) -> Result<bool, ProtocolError> {
    match s {
        None => Ok(false),
        Some(Scalar::Bool(b)) => Ok(b),
        Some(_) => Err(type_error(field, "a boolean")),
    }
}

fn scalar_str<'s>(s: Option<&'s Scalar<'_>>) -> Option<&'s str> {
    match s {
        Some(Scalar::Str(s)) => Some(s),
        _ => None,
    }
}

fn type_error(field: &str, expected: &str) -> ProtocolError {
    ProtocolError::Malformed(format!("`{field}` must be {expected}"))
}

fn malformed(e: serde_json::Error) -> ProtocolError {
    ProtocolError::Malformed(e.to_string())
}

/// At most [`MAX_QUOTED`] bytes of `s`, cut at a character boundary.
fn quote(s: &str) -> &str {
    let mut end = s.len().min(MAX_QUOTED);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Encoding, shared with the Protobuf codec.

/// The `status` string of an `auth_response`.
pub(crate) fn auth_status(r: &AuthResponse) -> &'static str {
    match r {
        AuthResponse::Success { .. } => STATUS_SUCCESS,
        AuthResponse::Error { .. } => STATUS_ERROR,
    }
}

/// The payload of an `error` frame: `{"code","message"}`.
pub(crate) fn error_payload(e: &ErrorFrame) -> Vec<u8> {
    to_vec(&ErrorPayloadOut {
        code: e.code.as_str(),
        message: &e.message,
    })
}

/// The items of a compact batch as the seed's `data` array.
pub(crate) fn compact_items_json(items: &[CompactItem]) -> Vec<u8> {
    to_vec(&items.iter().map(CompactOut::new_item).collect::<Vec<_>>())
}

fn to_vec<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these types cannot fail: every map key is a string and no Serialize impl
    // here reports errors.
    serde_json::to_vec(v).expect("frame types always serialise")
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize)]
struct AuthOut<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(rename = "deviceId")]
    device_id: &'a str,
    token: &'a str,
}

#[derive(Serialize)]
struct AuthResponseOut<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    status: &'static str,
    timestamp: i64,
    #[serde(rename = "sessionId", skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
    #[serde(rename = "heartbeatMs", skip_serializing_if = "Option::is_none")]
    heartbeat_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

fn auth_response_out(r: &AuthResponse) -> AuthResponseOut<'_> {
    let mut out = AuthResponseOut {
        ty: "auth_response",
        status: auth_status(r),
        timestamp: 0,
        session_id: None,
        heartbeat_ms: None,
        reason: None,
    };
    match r {
        AuthResponse::Success {
            timestamp,
            session_id,
            heartbeat_ms,
        } => {
            out.timestamp = *timestamp;
            out.session_id = Some(session_id);
            out.heartbeat_ms = Some(*heartbeat_ms);
        }
        AuthResponse::Error { timestamp, reason } => {
            out.timestamp = *timestamp;
            out.reason = Some(reason);
        }
    }
    out
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    ver: &'a str,
    msgid: &'a str,
    timestamp: i64,
    from: &'a str,
    to: &'a str,
    #[serde(rename = "type")]
    ty: &'static str,
    payload: &'a Value,
    qos: u8,
    #[serde(skip_serializing_if = "is_false")]
    retain: bool,
    #[serde(skip_serializing_if = "is_false")]
    dup: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sig: Option<&'a str>,
}

impl<'a> EnvelopeOut<'a> {
    fn new(env: &'a Envelope) -> Self {
        Self {
            ver: &env.ver,
            msgid: env.msgid.as_str(),
            timestamp: env.timestamp,
            from: &env.from,
            to: &env.to,
            ty: env.kind.as_str(),
            payload: &env.payload,
            qos: env.qos.as_u8(),
            retain: env.retain,
            dup: env.dup,
            nonce: env.sig.as_deref().map(|s| s.nonce.as_str()),
            sig: env.sig.as_deref().map(|s| s.sig.as_str()),
        }
    }
}

#[derive(Serialize)]
struct HandshakeOut<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    msgid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a Value>,
}

#[derive(Serialize)]
struct ErrorOut<'a> {
    ver: &'static str,
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    msgid: Option<&'a str>,
    payload: ErrorPayloadOut<'a>,
}

#[derive(Serialize)]
struct ErrorPayloadOut<'a> {
    code: &'static str,
    message: &'a str,
}

#[derive(Serialize)]
struct CompactOut<'a> {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    ty: Option<&'static str>,
    #[serde(rename = "deviceId")]
    device_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<i64>,
    data: &'a Value,
}

impl<'a> CompactOut<'a> {
    fn new(ty: &'static str, item: &'a CompactItem) -> Self {
        Self {
            ty: Some(ty),
            ..Self::new_item(item)
        }
    }

    fn new_item(item: &'a CompactItem) -> Self {
        Self {
            ty: None,
            device_id: &item.device_id,
            timestamp: item.timestamp,
            data: &item.data,
        }
    }
}

#[derive(Serialize)]
struct CompactBatchOut<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    data: Vec<CompactOut<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dec(v: Value) -> Result<Frame, ProtocolError> {
        decode(v.to_string().as_bytes())
    }

    fn enc(f: &Frame) -> Value {
        serde_json::from_slice(&encode(f)).unwrap()
    }

    fn id(s: &str) -> MsgId {
        MsgId::new(s).unwrap()
    }

    fn status_env() -> Envelope {
        Envelope {
            ver: "1.0".into(),
            msgid: id("a1b2c3d4"),
            timestamp: 1_634_567_890_123,
            from: "device-001".into(),
            to: "server".into(),
            kind: MessageKind::Status,
            payload: json!({"temp": 21}),
            qos: Qos::AtLeastOnce,
            retain: false,
            dup: false,
            sig: None,
        }
    }

    #[test]
    fn auth_round_trips_in_seed_shape() {
        let f = Frame::Auth(Auth {
            device_id: "sensor-001".into(),
            token: "t".into(),
        });
        assert_eq!(
            encode(&f),
            br#"{"type":"auth","deviceId":"sensor-001","token":"t"}"#
        );
        assert_eq!(decode(&encode(&f)), Ok(f));
    }

    #[test]
    fn auth_requires_device_id_and_token() {
        assert_eq!(
            dec(json!({"type":"auth","token":"t"})),
            Err(ProtocolError::MissingField("deviceId"))
        );
        assert_eq!(
            dec(json!({"type":"auth","deviceId":"d"})),
            Err(ProtocolError::MissingField("token"))
        );
        assert!(matches!(
            dec(json!({"type":"auth","deviceId":7,"token":"t"})),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn auth_response_shapes() {
        let ok = Frame::AuthResponse(AuthResponse::Success {
            timestamp: 5,
            session_id: "s1".into(),
            heartbeat_ms: 30_000,
        });
        assert_eq!(
            encode(&ok),
            br#"{"type":"auth_response","status":"success","timestamp":5,"sessionId":"s1","heartbeatMs":30000}"#
        );
        assert_eq!(decode(&encode(&ok)), Ok(ok));
        let err = Frame::AuthResponse(AuthResponse::Error {
            timestamp: 5,
            reason: "no".into(),
        });
        assert_eq!(
            encode(&err),
            br#"{"type":"auth_response","status":"error","timestamp":5,"reason":"no"}"#
        );
        assert_eq!(decode(&encode(&err)), Ok(err));
        // DESIGN.md's failure example carries no timestamp.
        assert_eq!(
            dec(json!({"type":"auth_response","status":"error","reason":"bad"})),
            Ok(Frame::AuthResponse(AuthResponse::Error {
                timestamp: 0,
                reason: "bad".into()
            }))
        );
        assert_eq!(
            dec(json!({"type":"auth_response","status":"success","timestamp":1,"heartbeatMs":1})),
            Err(ProtocolError::MissingField("sessionId"))
        );
        assert!(matches!(
            dec(json!({"type":"auth_response","status":"maybe"})),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn envelope_encodes_every_field_but_false_flags() {
        let f = Frame::Message(status_env());
        assert_eq!(
            encode(&f),
            br#"{"ver":"1.0","msgid":"a1b2c3d4","timestamp":1634567890123,"from":"device-001","to":"server","type":"status","payload":{"temp":21},"qos":1}"#
        );
        assert_eq!(decode(&encode(&f)), Ok(f));
        let mut e = status_env();
        e.retain = true;
        e.dup = true;
        let v = enc(&Frame::Message(e.clone()));
        assert_eq!(v["retain"], json!(true));
        assert_eq!(v["dup"], json!(true));
        assert_eq!(dec(v), Ok(Frame::Message(e)));
    }

    #[test]
    fn envelope_defaults() {
        let f = dec(json!({"type":"event","msgid":"m1","timestamp":1,"from":"d","payload":{}}));
        let Ok(Frame::Message(e)) = f else {
            panic!("{f:?}")
        };
        assert_eq!((e.ver.as_str(), e.to.as_str()), ("1.0", "server"));
        assert_eq!((e.qos, e.retain, e.dup), (Qos::AtMostOnce, false, false));
        assert_eq!(e.kind, MessageKind::Event);
        // null counts as absent
        let f = dec(
            json!({"type":"event","msgid":"m1","timestamp":1,"from":"d","payload":{},
            "qos":null,"to":null,"ver":null}),
        );
        assert!(matches!(f, Ok(Frame::Message(_))), "{f:?}");
    }

    #[test]
    fn every_message_kind_decodes() {
        for (t, k) in [
            ("status", MessageKind::Status),
            ("event", MessageKind::Event),
            ("command", MessageKind::Command),
            ("batch", MessageKind::Batch),
            ("delta", MessageKind::Delta),
        ] {
            let mut e = status_env();
            e.kind = k;
            let v = enc(&Frame::Message(e.clone()));
            assert_eq!(v["type"], json!(t));
            assert_eq!(dec(v), Ok(Frame::Message(e)));
        }
    }

    #[test]
    fn envelope_errors_map_to_their_fields() {
        let base = json!({"ver":"1.0","msgid":"m1","timestamp":1,"from":"d","to":"server",
            "type":"status","payload":{},"qos":0,"retain":false,"dup":false});
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            dec(b)
        };
        let without = |k: &str| {
            let mut b = base.clone();
            b.as_object_mut().unwrap().remove(k);
            dec(b)
        };
        assert!(matches!(dec(base.clone()), Ok(Frame::Message(_))));
        assert_eq!(with("qos", json!("x")), Err(ProtocolError::BadQos));
        assert_eq!(with("qos", json!(3)), Err(ProtocolError::BadQos));
        assert_eq!(with("qos", json!(-1)), Err(ProtocolError::BadQos));
        assert_eq!(with("qos", json!(1.5)), Err(ProtocolError::BadQos));
        assert_eq!(
            with("msgid", json!("has space")),
            Err(ProtocolError::BadMsgId)
        );
        assert_eq!(with("msgid", json!("")), Err(ProtocolError::BadMsgId));
        assert_eq!(
            with("msgid", json!("x".repeat(65))),
            Err(ProtocolError::BadMsgId)
        );
        assert_eq!(with("msgid", json!(12)), Err(ProtocolError::BadMsgId));
        assert!(matches!(
            with("timestamp", json!("1")),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            with("timestamp", json!(1.5)),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            with("timestamp", json!(u64::MAX)),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            with("from", json!(1)),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            with("to", json!([])),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            with("retain", json!(0)),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            with("dup", json!("true")),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            with("ver", json!("2.0")),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            with("ver", json!("10.0")),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            with("ver", json!(1.0)),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(with("ver", json!("1.1")), Ok(Frame::Message(_))));
        assert!(matches!(with("ver", json!("1")), Ok(Frame::Message(_))));
        assert!(matches!(
            with("type", json!(5)),
            Err(ProtocolError::Malformed(_))
        ));
        assert_eq!(
            with("type", json!("control")),
            Err(ProtocolError::UnknownType("control".into()))
        );
        for f in ["type", "msgid", "timestamp", "from", "payload"] {
            let want = ProtocolError::MissingField(f);
            assert_eq!(without(f), Err(want), "{f}");
        }
        assert_eq!(
            with("payload", Value::Null),
            Err(ProtocolError::MissingField("payload"))
        );
    }

    #[test]
    fn unknown_type_is_quoted_briefly() {
        let Err(ProtocolError::UnknownType(t)) = dec(json!({"type": "é".repeat(100)})) else {
            panic!()
        };
        assert!(t.len() <= MAX_QUOTED);
    }

    #[test]
    fn handshakes_need_only_type_and_msgid() {
        for k in [
            HandshakeKind::Ack,
            HandshakeKind::Rec,
            HandshakeKind::Rel,
            HandshakeKind::Comp,
        ] {
            let f = Frame::Handshake(Handshake {
                kind: k,
                msgid: id("m1"),
                payload: None,
            });
            let expected = format!(r#"{{"type":"{}","msgid":"m1"}}"#, k.as_str());
            assert_eq!(encode(&f), expected.as_bytes());
            assert_eq!(decode(&encode(&f)), Ok(f));
        }
        let f = Frame::Handshake(Handshake {
            kind: HandshakeKind::Ack,
            msgid: id("m1"),
            payload: Some(json!({"result": {"on": true}})),
        });
        assert_eq!(
            encode(&f),
            br#"{"type":"ack","msgid":"m1","payload":{"result":{"on":true}}}"#
        );
        assert_eq!(decode(&encode(&f)), Ok(f));
        // Other envelope fields are ignored, even ill-typed ones.
        assert_eq!(
            dec(json!({"type":"ack","msgid":"m1","qos":"x","timestamp":"y","from":3,"ver":"9"})),
            Ok(Frame::Handshake(Handshake {
                kind: HandshakeKind::Ack,
                msgid: id("m1"),
                payload: None
            }))
        );
        assert_eq!(
            dec(json!({"type":"rec"})),
            Err(ProtocolError::MissingField("msgid"))
        );
        assert_eq!(
            dec(json!({"type":"rel","msgid":"a b"})),
            Err(ProtocolError::BadMsgId)
        );
    }

    #[test]
    fn error_frames() {
        let f = Frame::Error(ErrorFrame {
            msgid: Some(id("x")),
            code: ErrorCode::Replay,
            message: "seen".into(),
        });
        assert_eq!(
            encode(&f),
            br#"{"ver":"1.0","type":"error","msgid":"x","payload":{"code":"replay","message":"seen"}}"#
        );
        assert_eq!(decode(&encode(&f)), Ok(f));
        let f = Frame::Error(ErrorFrame {
            msgid: None,
            code: ErrorCode::Malformed,
            message: "m".into(),
        });
        assert_eq!(
            encode(&f),
            br#"{"ver":"1.0","type":"error","payload":{"code":"malformed","message":"m"}}"#
        );
        assert_eq!(decode(&encode(&f)), Ok(f));
        assert_eq!(
            dec(json!({"type":"error"})),
            Err(ProtocolError::MissingField("payload"))
        );
        assert_eq!(
            dec(json!({"type":"error","payload":{}})),
            Err(ProtocolError::MissingField("payload.code"))
        );
        assert!(matches!(
            dec(json!({"type":"error","payload":[]})),
            Err(ProtocolError::Malformed(_))
        ));
        assert_eq!(
            dec(json!({"type":"error","payload":{"code":"whatever"}})),
            Ok(Frame::Error(ErrorFrame {
                msgid: None,
                code: ErrorCode::Internal,
                message: String::new()
            }))
        );
    }

    #[test]
    fn compact_status_and_event_from_the_seed() {
        let f = dec(json!({"type":"status","deviceId":"sensor-001","timestamp":7,"data":{"t":1}}));
        assert_eq!(
            f,
            Ok(Frame::Compact(Compact::Status(CompactItem {
                device_id: "sensor-001".into(),
                timestamp: Some(7),
                data: json!({"t":1}),
            })))
        );
        let f = f.unwrap();
        assert_eq!(
            encode(&f),
            br#"{"type":"status","deviceId":"sensor-001","timestamp":7,"data":{"t":1}}"#
        );
        assert_eq!(decode(&encode(&f)), Ok(f));
        let f = dec(json!({"type":"event","deviceId":"d","data":"door open"}));
        assert_eq!(
            f,
            Ok(Frame::Compact(Compact::Event(CompactItem {
                device_id: "d".into(),
                timestamp: None,
                data: json!("door open"),
            })))
        );
        assert_eq!(decode(&encode(&f.clone().unwrap())), f);
    }

    #[test]
    fn compact_iiot_values_normalise_into_data() {
        let f = dec(
            json!({"type":"status","deviceId":"plc-101","timestamp":1634567890123_i64,
            "values":[{"tag":"temperature","value":42.5,"unit":"°C"}],"quality":"good"}),
        );
        assert_eq!(
            f,
            Ok(Frame::Compact(Compact::Status(CompactItem {
                device_id: "plc-101".into(),
                timestamp: Some(1_634_567_890_123),
                data: json!({"values":[{"tag":"temperature","value":42.5,"unit":"°C"}],
                    "quality":"good"}),
            })))
        );
        assert_eq!(decode(&encode(&f.clone().unwrap())), f);
    }

    #[test]
    fn compact_errors() {
        assert_eq!(
            dec(json!({"type":"status","deviceId":"d"})),
            Err(ProtocolError::MissingField("data"))
        );
        assert!(matches!(
            dec(json!({"type":"status","deviceId":5,"data":{}})),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            dec(json!({"type":"status","deviceId":"d","timestamp":"now","data":{}})),
            Err(ProtocolError::Malformed(_))
        ));
        // neither msgid nor deviceId: an envelope missing its msgid
        assert_eq!(
            dec(json!({"type":"status","data":{}})),
            Err(ProtocolError::MissingField("msgid"))
        );
        // commands have no compact form
        assert_eq!(
            dec(json!({"type":"command","deviceId":"d","data":{}})),
            Err(ProtocolError::MissingField("msgid"))
        );
        assert!(matches!(
            dec(json!({"type":"batch","data":[]})),
            Err(ProtocolError::BadBatch(_))
        ));
        assert!(matches!(
            dec(json!({"type":"batch","data":{}})),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            dec(json!({"type":"batch","data":[1]})),
            Err(ProtocolError::Malformed(_))
        ));
        assert_eq!(
            dec(json!({"type":"batch","data":[{"data":{}}]})),
            Err(ProtocolError::MissingField("deviceId"))
        );
    }

    #[test]
    fn compact_batch_from_the_seed_batcher() {
        let f = dec(json!({"type":"batch","data":[
            {"deviceId":"sensor-001","timestamp":1,"data":{"t":1}},
            {"deviceId":"plc-101","values":[{"tag":"p","value":1}],"quality":"good"},
        ]}));
        let expected = Frame::Compact(Compact::Batch(vec![
            CompactItem {
                device_id: "sensor-001".into(),
                timestamp: Some(1),
                data: json!({"t":1}),
            },
            CompactItem {
                device_id: "plc-101".into(),
                timestamp: None,
                data: json!({"values":[{"tag":"p","value":1}],"quality":"good"}),
            },
        ]));
        assert_eq!(f, Ok(expected.clone()));
        assert_eq!(
            enc(&expected),
            json!({"type":"batch","data":[
                {"deviceId":"sensor-001","timestamp":1,"data":{"t":1}},
                {"deviceId":"plc-101","data":{"values":[{"tag":"p","value":1}],"quality":"good"}},
            ]})
        );
        assert_eq!(decode(&encode(&expected)), Ok(expected));
    }

    #[test]
    fn non_objects_and_garbage_are_malformed() {
        for bad in [
            &b""[..],
            b"   ",
            b"null",
            b"[]",
            br#"["status","m1"]"#,
            b"42",
            br#""status""#,
            b"{",
            b"{}}",
            b"\xff\xfe",
            b"{\"type\":\"auth\",\"deviceId\":\"\xff\",\"token\":\"t\"}",
            br#"{"type":"ack","type":"ack","msgid":"m"}"#,
        ] {
            assert!(
                matches!(decode(bad), Err(ProtocolError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert_eq!(decode(b"{}"), Err(ProtocolError::MissingField("type")));
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let deep = format!(
            r#"{{"type":"status","msgid":"m","timestamp":1,"from":"d","payload":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(matches!(
            decode(deep.as_bytes()),
            Err(ProtocolError::Malformed(_))
        ));
        // Skipped containers are walked iteratively by serde_json: no depth limit needed.
        let deep = format!(
            r#"{{"type":"status","msgid":"m","timestamp":1,"from":"d","payload":{{}},"qos":{}1{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(decode(deep.as_bytes()), Err(ProtocolError::BadQos));
    }

    #[test]
    fn batch_items_via_envelope_from_value() {
        let item = json!({"msgid":"i1","timestamp":1,"type":"event","payload":{"x":1}});
        let e = envelope_from_value(&item, "dev").unwrap();
        assert_eq!(
            (e.from.as_str(), e.kind, e.msgid.as_str()),
            ("dev", MessageKind::Event, "i1")
        );
        let spoof = json!({"msgid":"i1","timestamp":1,"type":"event","payload":{},"from":"x"});
        assert_eq!(envelope_from_value(&spoof, "dev").unwrap().from, "x");
        assert_eq!(
            envelope_from_value(&json!({"timestamp":1,"type":"status","payload":{}}), "d"),
            Err(ProtocolError::MissingField("msgid"))
        );
        assert!(matches!(
            envelope_from_value(&json!({"msgid":"a","type":"ack"}), "d"),
            Err(ProtocolError::BadBatch(_))
        ));
        assert!(matches!(
            envelope_from_value(&json!([1]), "d"),
            Err(ProtocolError::Malformed(_))
        ));
        assert_eq!(
            envelope_from_value(
                &json!({"msgid":"a","timestamp":1,"type":"status","payload":{},"qos":7}),
                "d"
            ),
            Err(ProtocolError::BadQos)
        );
    }

    #[test]
    fn envelope_into_value_matches_encode() {
        let mut e = status_env();
        e.retain = true;
        assert_eq!(envelope_into_value(e.clone()), enc(&Frame::Message(e)));
        let e = status_env();
        assert_eq!(envelope_into_value(e.clone()), enc(&Frame::Message(e)));
    }
}
