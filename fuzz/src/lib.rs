//! What the fuzz targets share: a gateway session's handling of one decoded device frame,
//! and the invariants that must hold for any input.
//!
//! Each target hands its bytes to the decoder the server runs on them; a panic, an overflow
//! or a failed assertion here is a bug in the crate that owns the code, never in the input.

use fleetgate_alerts::{Rule, RuleState, Sample, evaluate, tag_value, tags};
use fleetgate_protocol::{
    Codec, Envelope, Frame, Limits, MessageKind, MsgId, ProtocolError, ReplayWindow, batch_items,
    check_from_device, json,
};
use serde_json::Value;

/// The server clock every check runs against: fixed, so that a crash reproduces.
pub const NOW_MS: i64 = 1_700_000_000_000;

/// The msgid the gateway would assign to a compact frame (any valid one will do).
const COMPACT_MSGID: &str = "c0123456789abcdef";

/// Decodes `bytes` as a device frame and runs what a session does with it: validation of
/// messages and batch items, normalisation of compact frames, the replay window and alert
/// evaluation, asserting the codecs' round trips on the way.
pub fn device_frame(codec: Codec, bytes: &[u8]) {
    let frame = match codec.decode(bytes) {
        Ok(frame) => frame,
        Err(error) => return error_is_answerable(&error),
    };
    round_trips(&frame);
    match frame {
        Frame::Message(env) => ingest(&env),
        Frame::Compact(compact) => {
            let is_batch = matches!(compact, fleetgate_protocol::Compact::Batch(_));
            let msgid = MsgId::new(COMPACT_MSGID).expect("a valid msgid");
            let env = compact.into_envelope(msgid, NOW_MS);
            // What normalisation builds must be a frame both codecs can carry.
            round_trips(&Frame::Message(env.clone()));
            if is_batch {
                // Items it built must decode; only identity, clock and size may refuse them.
                let items = batch_items(&env, &env.from, NOW_MS, &Limits::default());
                assert!(
                    matches!(
                        items,
                        Ok(_)
                            | Err(ProtocolError::SpoofedFrom
                                | ProtocolError::ClockSkew { .. }
                                | ProtocolError::BadBatch(_))
                    ),
                    "normalised batch refused: {items:?}"
                );
            }
            ingest(&env);
        }
        Frame::Handshake(_) | Frame::Auth(_) | Frame::AuthResponse(_) | Frame::Error(_) => {}
    }
}

/// Every frame a decoder returns encodes back to itself, in JSON and (but for the JSON-only
/// compact frames) in Protobuf.
pub fn round_trips(frame: &Frame) {
    let text = json::encode(frame);
    assert_eq!(
        json::decode(&text).as_ref(),
        Ok(frame),
        "JSON round trip of {}",
        String::from_utf8_lossy(&text)
    );
    if !matches!(frame, Frame::Compact(_)) {
        let bytes = Codec::Protobuf.encode(frame);
        assert_eq!(
            Codec::Protobuf.decode(&bytes).as_ref(),
            Ok(frame),
            "Protobuf round trip"
        );
    }
}

/// What a session does with an accepted message envelope from its device (`ingest.rs`).
pub fn ingest(env: &Envelope) {
    let limits = Limits::default();
    // The session's device is whoever the frame claims to be: otherwise nearly every input
    // would stop at the identity check.
    let device = env.from.as_str();
    if let Some(sig) = env.sig.as_deref() {
        // Whatever the fields hold, checking a signature answers; a frame signed with a key
        // verifies with it and with no other.
        let _ = sig.verify(env, &[0; 32]);
        let mut resigned = env.clone();
        let fresh = fleetgate_protocol::Signature::sign(env, sig.nonce.clone(), &[1; 32]);
        resigned.sig = Some(Box::new(fresh.clone()));
        if fresh.verify(&resigned, &[1; 32]).is_ok() {
            assert!(fresh.verify(&resigned, &[2; 32]).is_err());
        }
        let mut nonces = ReplayWindow::default();
        if nonces.check_nonce(&sig.nonce, NOW_MS, &limits).is_ok() {
            assert!(nonces.check_nonce(&sig.nonce, NOW_MS, &limits).is_err());
        }
    }
    let items = if env.kind == MessageKind::Batch {
        match batch_items(env, device, NOW_MS, &limits) {
            Ok(items) => items,
            Err(error) => return error_is_answerable(&error),
        }
    } else {
        Vec::new()
    };
    if let Err(error) = check_from_device(env, device, NOW_MS, &limits) {
        assert_ne!(error, ProtocolError::SpoofedFrom);
        return error_is_answerable(&error);
    }
    let mut replay = ReplayWindow::default();
    assert_eq!(replay.check(&env.msgid, false, NOW_MS, &limits), Ok(true));
    assert_eq!(
        replay.check(&env.msgid, false, NOW_MS, &limits),
        Err(ProtocolError::Replay)
    );
    assert_eq!(replay.check(&env.msgid, true, NOW_MS, &limits), Ok(false));
    for item in &items {
        // A batch item is an envelope; written back as one it reads the same.
        let value = json::envelope_into_value(item.clone());
        assert_eq!(json::envelope_from_value(&value, device).as_ref(), Ok(item));
        let _ = replay.check(&item.msgid, item.dup, NOW_MS, &limits);
    }
    let statuses = std::iter::once(env)
        .chain(&items)
        .filter(|e| e.kind == MessageKind::Status);
    let mut alerts = Alerts::new();
    for status in statuses {
        alerts.observe(status);
    }
}

/// Decoding errors become an `error` frame or a close: both must be producible.
pub fn error_is_answerable(error: &ProtocolError) {
    let _ = (error.to_string(), error.close_code(), error.error_code());
}

/// Alert evaluation of accepted statuses, as the gateway runs it after the telemetry append.
struct Alerts {
    rules: Vec<(Rule, RuleState)>,
}

impl Alerts {
    fn new() -> Self {
        // One rule of each kind that reads tags, on tags the seed corpus reports.
        let rules = [
            r#"{"id":"hot","target":{"group":"g"},"forMs":1000,
                "condition":{"threshold":{"tag":"temperature","op":">","value":80,"clear":75}}}"#,
            r#"{"id":"code","target":{"group":"g"},
                "condition":{"threshold":{"tag":"state","op":"==","value":3}}}"#,
            r#"{"id":"band","target":{"group":"g"},
                "condition":{"band":{"tag":"humidity","low":10,"high":30.5,"margin":1}}}"#,
            r#"{"id":"rate","target":{"group":"g"},
                "condition":{"rate":{"tag":"pressure","perSecond":5,"clear":4}}}"#,
        ];
        let rules = rules
            .iter()
            .map(|text| {
                let rule: Rule = serde_json::from_str(text).expect("a valid rule");
                rule.validate().expect("a valid rule");
                (rule, RuleState::default())
            })
            .collect();
        Self { rules }
    }

    fn observe(&mut self, status: &Envelope) {
        let payload: &Value = &status.payload;
        let index: Vec<(&str, f64)> = tags(payload).collect();
        let plain = Sample::new(&status.from, status.timestamp, payload);
        let indexed = plain.indexed(&index);
        for (tag, _) in &index {
            // Reading through the index is an optimisation: it must agree with the JSON.
            assert_eq!(
                indexed.value(tag).map(f64::to_bits),
                tag_value(payload, tag).map(f64::to_bits),
                "tag {tag}"
            );
        }
        for (rule, state) in &mut self.rules {
            if let Some(transition) = evaluate(rule, state, &indexed) {
                let _ = (transition.alert_id(), transition.to_alert());
            }
        }
    }
}
