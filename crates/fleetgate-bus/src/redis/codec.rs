//! Explicit encoding of the bus's values as stored in Redis (internal types derive no serde).
//!
//! Structured values are JSON objects with short, stable field names; every decoding failure
//! is [`BusError::Corrupt`]. Integers are JSON integers (exact for `i64`/`u64`), payloads are
//! embedded JSON values, a device secret hash is lowercase hex.

use fleetgate_protocol::{CloseCode, MessageKind, MsgId, Qos};
use serde_json::{Map, Value, json};

use crate::{
    BusError, BusResult, Command, CommandOutcome, DeliveryState, DeviceRecord, FailReason, JobExec,
    JobExecState, NodeInfo, NodeMessage, Presence, QueuedCommand, Shadow, TelemetryRecord,
    Transport,
};

fn corrupt(what: &str, detail: impl std::fmt::Display) -> BusError {
    BusError::Corrupt(format!("{what}: {detail}"))
}

fn parse_object(what: &str, text: &str) -> BusResult<Map<String, Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(corrupt(what, format!("expected an object, got {other}"))),
        Err(e) => Err(corrupt(what, e)),
    }
}

struct Fields<'a> {
    what: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn new(what: &'a str, map: &'a Map<String, Value>) -> Self {
        Self { what, map }
    }

    fn value(&self, key: &str) -> BusResult<&'a Value> {
        self.map
            .get(key)
            .ok_or_else(|| corrupt(self.what, format!("missing field {key:?}")))
    }

    fn str(&self, key: &str) -> BusResult<&'a str> {
        self.value(key)?
            .as_str()
            .ok_or_else(|| corrupt(self.what, format!("field {key:?} is not a string")))
    }

    fn opt_str(&self, key: &str) -> BusResult<Option<String>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(corrupt(self.what, format!("field {key:?} is not a string"))),
        }
    }

    fn i64(&self, key: &str) -> BusResult<i64> {
        self.value(key)?
            .as_i64()
            .ok_or_else(|| corrupt(self.what, format!("field {key:?} is not an i64")))
    }

    fn u64(&self, key: &str) -> BusResult<u64> {
        self.value(key)?
            .as_u64()
            .ok_or_else(|| corrupt(self.what, format!("field {key:?} is not a u64")))
    }

    fn opt_u64(&self, key: &str) -> BusResult<Option<u64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| corrupt(self.what, format!("field {key:?} is not a u64"))),
        }
    }

    fn bool(&self, key: &str) -> BusResult<bool> {
        self.value(key)?
            .as_bool()
            .ok_or_else(|| corrupt(self.what, format!("field {key:?} is not a bool")))
    }

    fn object(&self, key: &str) -> BusResult<Map<String, Value>> {
        match self.value(key)? {
            Value::Object(m) => Ok(m.clone()),
            _ => Err(corrupt(
                self.what,
                format!("field {key:?} is not an object"),
            )),
        }
    }
}

// --- registry and membership ---------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]])
        .map(char::from)
        .collect()
}

fn unhex32(what: &str, s: &str) -> BusResult<[u8; 32]> {
    let bad = || corrupt(what, "bad secret hash");
    if s.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte =
            u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

pub(super) fn encode_device(d: &DeviceRecord) -> String {
    json!({
        "id": d.id,
        "groups": d.groups,
        "secret_sha256": hex(&d.secret_sha256),
        "created_ms": d.created_ms,
        "revoked": d.revoked,
        "transport": d.transport.as_str(),
        "mac_key": d.mac_key.as_ref().map(|k| hex(k)),
        "revoked_certs": d.revoked_certs.iter().map(|c| hex(c)).collect::<Vec<_>>(),
    })
    .to_string()
}

pub(super) fn decode_device(text: &str) -> BusResult<DeviceRecord> {
    const WHAT: &str = "device record";
    let m = parse_object(WHAT, text)?;
    let f = Fields::new(WHAT, &m);
    let groups = match f.value("groups")? {
        Value::Array(a) => a
            .iter()
            .map(|g| {
                g.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| corrupt(WHAT, "group is not a string"))
            })
            .collect::<BusResult<Vec<_>>>()?,
        _ => return Err(corrupt(WHAT, "groups is not an array")),
    };
    Ok(DeviceRecord {
        id: f.str("id")?.to_owned(),
        groups,
        secret_sha256: unhex32(WHAT, f.str("secret_sha256")?)?,
        created_ms: f.i64("created_ms")?,
        revoked: f.bool("revoked")?,
        // Records written before transports existed are WebSocket devices.
        transport: match m.get("transport").and_then(Value::as_str) {
            None => Transport::Websocket,
            Some(t) => Transport::parse(t).ok_or_else(|| corrupt(WHAT, "unknown transport"))?,
        },
        // Older records have neither field.
        mac_key: match m.get("mac_key") {
            None | Some(Value::Null) => None,
            Some(Value::String(k)) => Some(unhex32(WHAT, k)?),
            Some(_) => return Err(corrupt(WHAT, "mac_key is not a string")),
        },
        revoked_certs: match m.get("revoked_certs") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|c| {
                    c.as_str()
                        .ok_or_else(|| corrupt(WHAT, "revoked certificate is not a string"))
                        .and_then(|c| unhex32(WHAT, c))
                })
                .collect::<BusResult<Vec<_>>>()?,
            Some(_) => return Err(corrupt(WHAT, "revoked_certs is not an array")),
        },
    })
}

pub(super) fn encode_node(n: &NodeInfo) -> String {
    json!({
        "id": n.id,
        "connections": n.connections,
        "draining": n.draining,
        "started_ms": n.started_ms,
        "updated_ms": n.updated_ms,
    })
    .to_string()
}

pub(super) fn decode_node(text: &str) -> BusResult<NodeInfo> {
    const WHAT: &str = "node info";
    let m = parse_object(WHAT, text)?;
    let f = Fields::new(WHAT, &m);
    Ok(NodeInfo {
        id: f.str("id")?.to_owned(),
        connections: f.u64("connections")?,
        draining: f.bool("draining")?,
        started_ms: f.i64("started_ms")?,
        updated_ms: f.i64("updated_ms")?,
    })
}

/// A presence entry from its hash fields `node`, `conn`, `since`.
pub(super) fn decode_presence(node: String, conn: &str, since: &str) -> BusResult<Presence> {
    const WHAT: &str = "presence";
    Ok(Presence {
        node,
        conn_id: conn
            .parse()
            .map_err(|_| corrupt(WHAT, format!("bad conn id {conn:?}")))?,
        since_ms: since
            .parse()
            .map_err(|_| corrupt(WHAT, format!("bad since {since:?}")))?,
    })
}

// --- commands and queues -------------------------------------------------------------------

/// Optional fields that are unset are left out rather than stored as `null`: a queued command
/// is kept in Redis until delivered, and the three nulls were ~45 of its ~250 bytes. Readers
/// (this one and earlier releases) take a missing optional field as unset.
fn command_value(c: &Command) -> Value {
    let mut v = json!({
        "msgid": c.msgid.as_str(),
        "device": c.device,
        "payload": c.payload,
        "qos": c.qos.as_u8(),
        "created_ms": c.created_ms,
        "expires_ms": c.expires_ms,
    });
    let m = v.as_object_mut().expect("a JSON object");
    for (key, value) in [
        ("reply_to", &c.reply_to),
        ("traceparent", &c.traceparent),
        ("job", &c.job),
    ] {
        if let Some(value) = value {
            m.insert(key.to_owned(), Value::from(value.as_str()));
        }
    }
    v
}

fn command_from(what: &str, m: &Map<String, Value>) -> BusResult<Command> {
    let f = Fields::new(what, m);
    Ok(Command {
        msgid: MsgId::new(f.str("msgid")?).map_err(|e| corrupt(what, e))?,
        device: f.str("device")?.to_owned(),
        payload: f.value("payload")?.clone(),
        qos: Qos::from_u8(f.u64("qos")?).map_err(|e| corrupt(what, e))?,
        created_ms: f.i64("created_ms")?,
        expires_ms: f.i64("expires_ms")?,
        reply_to: f.opt_str("reply_to")?,
        traceparent: f.opt_str("traceparent")?,
        job: f.opt_str("job")?,
    })
}

pub(super) fn encode_command(c: &Command) -> String {
    command_value(c).to_string()
}

pub(super) fn decode_command(text: &str) -> BusResult<Command> {
    const WHAT: &str = "command";
    command_from(WHAT, &parse_object(WHAT, text)?)
}

/// A queued command from its stored parts: the encoded command, the attempt count, and the
/// release mark (`None`: pending; `Some("")`: released without result; `Some(json)`:
/// released with that result).
pub(super) fn decode_queued(
    command: &str,
    attempts: &str,
    release: Option<&str>,
) -> BusResult<QueuedCommand> {
    const WHAT: &str = "queued command";
    let attempts = attempts
        .parse::<u64>()
        .map_err(|_| corrupt(WHAT, format!("bad attempts {attempts:?}")))?;
    let (state, result) = match release {
        None => (DeliveryState::Pending, None),
        Some("") => (DeliveryState::Released, None),
        Some(r) => (
            DeliveryState::Released,
            Some(serde_json::from_str(r).map_err(|e| corrupt(WHAT, e))?),
        ),
    };
    Ok(QueuedCommand {
        command: decode_command(command)?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        state,
        result,
    })
}

// --- node messages -------------------------------------------------------------------------

pub(super) fn encode_node_message(m: &NodeMessage) -> String {
    let v = match m {
        NodeMessage::Deliver { device } => json!({"t": "deliver", "device": device}),
        NodeMessage::Command(c) => json!({"t": "command", "command": command_value(c)}),
        NodeMessage::Close {
            device,
            conn_id,
            code,
            reason,
        } => json!({
            "t": "close",
            "device": device,
            "conn_id": conn_id,
            "code": code.as_u16(),
            "reason": reason,
        }),
        NodeMessage::CommandResult {
            device,
            msgid,
            outcome,
        } => json!({
            "t": "result",
            "device": device,
            "msgid": msgid,
            "outcome": outcome_value(outcome),
        }),
        NodeMessage::Delta {
            device,
            version,
            delta,
        } => json!({"t": "delta", "device": device, "version": version, "delta": delta}),
        NodeMessage::MqttInbound {
            device,
            kind,
            payload,
        } => json!({"t": "mqtt", "device": device, "kind": kind, "payload": payload}),
        NodeMessage::Resync => json!({"t": "resync"}),
    };
    v.to_string()
}

fn outcome_value(outcome: &CommandOutcome) -> Value {
    match outcome {
        CommandOutcome::Result(v) => json!({"k": "result", "v": v}),
        CommandOutcome::Error(v) => json!({"k": "error", "v": v}),
        CommandOutcome::Done => json!({"k": "done"}),
        CommandOutcome::Failed(r) => json!({"k": "failed", "reason": r.as_str()}),
    }
}

fn outcome_from(what: &str, o: &Map<String, Value>) -> BusResult<CommandOutcome> {
    let of = Fields::new(what, o);
    Ok(match of.str("k")? {
        "result" => CommandOutcome::Result(of.value("v")?.clone()),
        "error" => CommandOutcome::Error(of.value("v")?.clone()),
        "done" => CommandOutcome::Done,
        "failed" => CommandOutcome::Failed(match of.str("reason")? {
            "expired" => FailReason::Expired,
            "attempts_exhausted" => FailReason::AttemptsExhausted,
            other => return Err(corrupt(what, format!("unknown reason {other:?}"))),
        }),
        other => return Err(corrupt(what, format!("unknown outcome {other:?}"))),
    })
}

/// A stored command outcome (the value of a `res:` key).
pub(super) fn encode_outcome(outcome: &CommandOutcome) -> String {
    outcome_value(outcome).to_string()
}

pub(super) fn decode_outcome(bytes: &[u8]) -> BusResult<CommandOutcome> {
    const WHAT: &str = "command outcome";
    let text = std::str::from_utf8(bytes).map_err(|e| corrupt(WHAT, e))?;
    outcome_from(WHAT, &parse_object(WHAT, text)?)
}

pub(super) fn decode_node_message(bytes: &[u8]) -> BusResult<NodeMessage> {
    const WHAT: &str = "node message";
    let text = std::str::from_utf8(bytes).map_err(|e| corrupt(WHAT, e))?;
    let m = parse_object(WHAT, text)?;
    let f = Fields::new(WHAT, &m);
    Ok(match f.str("t")? {
        "deliver" => NodeMessage::Deliver {
            device: f.str("device")?.to_owned(),
        },
        "command" => NodeMessage::Command(command_from(WHAT, &f.object("command")?)?),
        "close" => {
            let code = f.u64("code")?;
            NodeMessage::Close {
                device: f.str("device")?.to_owned(),
                conn_id: f.opt_u64("conn_id")?,
                code: u16::try_from(code)
                    .ok()
                    .and_then(CloseCode::from_u16)
                    .ok_or_else(|| corrupt(WHAT, format!("unknown close code {code}")))?,
                reason: f.str("reason")?.to_owned(),
            }
        }
        "result" => NodeMessage::CommandResult {
            device: f.str("device")?.to_owned(),
            msgid: f.str("msgid")?.to_owned(),
            outcome: outcome_from(WHAT, &f.object("outcome")?)?,
        },
        "delta" => NodeMessage::Delta {
            device: f.str("device")?.to_owned(),
            version: f.u64("version")?,
            delta: f.object("delta")?,
        },
        "mqtt" => NodeMessage::MqttInbound {
            device: f.str("device")?.to_owned(),
            kind: f.str("kind")?.to_owned(),
            payload: f.str("payload")?.to_owned(),
        },
        "resync" => NodeMessage::Resync,
        other => return Err(corrupt(WHAT, format!("unknown message type {other:?}"))),
    })
}

// --- telemetry -----------------------------------------------------------------------------

/// The stream fields of a record, in the order `XADD` receives them (names are fixed:
/// `device`, `msgid`, `kind`, `ts`, `rcv`, `payload`).
pub(super) fn telemetry_fields(r: &TelemetryRecord) -> [String; 6] {
    [
        r.device.clone(),
        r.msgid.clone(),
        r.kind.as_str().to_owned(),
        r.timestamp.to_string(),
        r.received_ms.to_string(),
        r.payload.to_string(),
    ]
}

fn parse_kind(s: &str) -> Option<MessageKind> {
    Some(match s {
        "status" => MessageKind::Status,
        "event" => MessageKind::Event,
        "command" => MessageKind::Command,
        "batch" => MessageKind::Batch,
        _ => return None,
    })
}

/// A record from its stream fields (name, value pairs in any order).
pub(super) fn decode_telemetry(fields: &[(String, String)]) -> BusResult<TelemetryRecord> {
    const WHAT: &str = "telemetry record";
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| corrupt(WHAT, format!("missing field {name:?}")))
    };
    let int = |name: &str| -> BusResult<i64> {
        let v = get(name)?;
        v.parse()
            .map_err(|_| corrupt(WHAT, format!("bad {name} {v:?}")))
    };
    let kind = get("kind")?;
    Ok(TelemetryRecord {
        device: get("device")?.to_owned(),
        msgid: get("msgid")?.to_owned(),
        kind: parse_kind(kind).ok_or_else(|| corrupt(WHAT, format!("bad kind {kind:?}")))?,
        timestamp: int("ts")?,
        received_ms: int("rcv")?,
        payload: serde_json::from_str(get("payload")?).map_err(|e| corrupt(WHAT, e))?,
    })
}

// --- shadows -------------------------------------------------------------------------------

/// Decodes a shadow; its delta is recomputed, not stored.
pub(super) fn decode_shadow(text: &str) -> BusResult<Shadow> {
    const WHAT: &str = "shadow";
    let m = parse_object(WHAT, text)?;
    let f = Fields::new(WHAT, &m);
    let mut s = Shadow {
        reported: f.object("reported")?,
        desired: f.object("desired")?,
        delta: Map::new(),
        version: f.u64("version")?,
        updated_ms: f.i64("updated_ms")?,
    };
    s.recompute_delta();
    Ok(s)
}

// --- jobs ----------------------------------------------------------------------------------

/// A job execution from its `jx:` hash field (the device) and value
/// `<state> <updated_ms> <msgid>`. The job scripts write these values themselves (they change
/// states atomically), so the format is plain text that Lua splits with one pattern.
pub(super) fn decode_job_exec(device: &str, text: &str) -> BusResult<JobExec> {
    const WHAT: &str = "job execution";
    let mut parts = text.splitn(3, ' ');
    let (Some(state), Some(updated), Some(msgid)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(corrupt(
            WHAT,
            format!("{text:?} is not <state> <ms> <msgid>"),
        ));
    };
    Ok(JobExec {
        device: device.to_owned(),
        msgid: msgid.to_owned(),
        state: JobExecState::parse(state)
            .ok_or_else(|| corrupt(WHAT, format!("unknown state {state:?}")))?,
        updated_ms: updated
            .parse()
            .map_err(|_| corrupt(WHAT, format!("bad updated_ms {updated:?}")))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip() {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(37);
        }
        assert_eq!(unhex32("t", &hex(&b)).unwrap(), b);
        assert!(unhex32("t", "zz").is_err());
    }

    #[test]
    fn job_exec_text() {
        let e = decode_job_exec("d 1", "timedOut 1700000000000 m-1").unwrap();
        assert_eq!(
            (e.device.as_str(), e.msgid.as_str(), e.state, e.updated_ms),
            ("d 1", "m-1", JobExecState::TimedOut, 1_700_000_000_000)
        );
        assert!(decode_job_exec("d", "queued 1").is_err());
        assert!(decode_job_exec("d", "lost 1 m").is_err());
        assert!(decode_job_exec("d", "queued x m").is_err());
    }

    #[test]
    fn mqtt_inbound_and_transports_roundtrip() {
        let m = NodeMessage::MqttInbound {
            device: "d-1".into(),
            kind: "status".into(),
            payload: r#"{"temp":"21\u00b0"}"#.into(),
        };
        assert_eq!(
            decode_node_message(encode_node_message(&m).as_bytes()).unwrap(),
            m
        );
        let mut d = DeviceRecord {
            id: "d-1".into(),
            groups: vec![],
            secret_sha256: [1; 32],
            created_ms: 5,
            revoked: false,
            transport: Transport::Mqtt,
            mac_key: None,
            revoked_certs: Vec::new(),
        };
        assert_eq!(decode_device(&encode_device(&d)).unwrap(), d);
        let old = encode_device(&d).replace(r#","transport":"mqtt""#, "");
        d.transport = Transport::Websocket;
        assert_eq!(decode_device(&old).unwrap(), d, "records before transports");
        let bad = encode_device(&d).replace("websocket", "carrier-pigeon");
        assert!(matches!(decode_device(&bad), Err(BusError::Corrupt(_))));
    }

    #[test]
    fn commands_leave_unset_fields_out_and_read_old_nulls() {
        let mut c = Command {
            msgid: MsgId::new("m-1").unwrap(),
            device: "d-1".into(),
            payload: json!({"on": true}),
            qos: Qos::AtLeastOnce,
            created_ms: 1,
            expires_ms: 2,
            reply_to: None,
            traceparent: None,
            job: None,
        };
        let text = encode_command(&c);
        assert!(!text.contains("null"), "{text}");
        assert_eq!(decode_command(&text).unwrap(), c);
        let old = r#"{"msgid":"m-1","device":"d-1","payload":{"on":true},"qos":1,"created_ms":1,"expires_ms":2,"reply_to":null,"traceparent":null,"job":null}"#;
        assert_eq!(
            decode_command(old).unwrap(),
            c,
            "stored by an earlier release"
        );
        c.reply_to = Some("node-a".into());
        c.job = Some("j-1".into());
        assert_eq!(decode_command(&encode_command(&c)).unwrap(), c);
    }

    #[test]
    fn corrupt_inputs_are_corrupt() {
        assert!(matches!(decode_node("[1]"), Err(BusError::Corrupt(_))));
        assert!(matches!(
            decode_node_message(b"{\"t\":\"nope\"}"),
            Err(BusError::Corrupt(_))
        ));
        assert!(matches!(
            decode_queued("{}", "x", None),
            Err(BusError::Corrupt(_))
        ));
    }
}
