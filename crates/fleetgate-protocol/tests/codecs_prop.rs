//! Property tests of both codecs: every valid frame round-trips through JSON, Protobuf and
//! JSON -> Protobuf; no input, however broken, makes a decoder panic.

use fleetgate_protocol::Envelope;
use fleetgate_protocol::{
    Auth, AuthResponse, Codec, Compact, CompactItem, ErrorCode, ErrorFrame, Frame, Handshake,
    HandshakeKind, MessageKind, MsgId, Qos, json, proto,
};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn msgid() -> impl Strategy<Value = MsgId> {
    "[A-Za-z0-9_-]{1,64}".prop_map(|s| MsgId::new(s).expect("strategy yields valid msgids"))
}

fn text() -> impl Strategy<Value = String> {
    // Any Unicode, including quotes, escapes and control characters.
    any::<String>()
}

/// Arbitrary JSON with integers of the full i64/u64 range and floats that print and parse back
/// exactly (quarters), nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-4000i32..4000).prop_map(|n| Value::from(f64::from(n) / 4.0)),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(text(), json_value(), 0..6)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn qos() -> impl Strategy<Value = Qos> {
    prop_oneof![
        Just(Qos::AtMostOnce),
        Just(Qos::AtLeastOnce),
        Just(Qos::ExactlyOnce)
    ]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    let kind = prop_oneof![
        Just(MessageKind::Status),
        Just(MessageKind::Event),
        Just(MessageKind::Command),
        Just(MessageKind::Batch),
    ];
    let ver = prop_oneof![
        Just("1.0".to_owned()),
        Just("1".to_owned()),
        "1\\.[0-9]{1,3}"
    ];
    (
        ver,
        msgid(),
        any::<i64>(),
        text(),
        text(),
        kind,
        json_object(),
        qos(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(ver, msgid, timestamp, from, to, kind, payload, qos, retain, dup)| Envelope {
                ver,
                msgid,
                timestamp,
                from,
                to,
                kind,
                payload,
                qos,
                retain,
                dup,
                sig: None,
            },
        )
}

fn frame() -> impl Strategy<Value = Frame> {
    let handshake_kind = prop_oneof![
        Just(HandshakeKind::Ack),
        Just(HandshakeKind::Rec),
        Just(HandshakeKind::Rel),
        Just(HandshakeKind::Comp),
    ];
    let code = prop_oneof![
        Just(ErrorCode::Malformed),
        Just(ErrorCode::ClockSkew),
        Just(ErrorCode::Replay),
        Just(ErrorCode::UnsupportedType),
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::Internal),
    ];
    prop_oneof![
        (text(), text()).prop_map(|(device_id, token)| Frame::Auth(Auth { device_id, token })),
        (any::<i64>(), text(), any::<u64>()).prop_map(|(timestamp, session_id, heartbeat_ms)| {
            Frame::AuthResponse(AuthResponse::Success {
                timestamp,
                session_id,
                heartbeat_ms,
            })
        }),
        (any::<i64>(), text()).prop_map(|(timestamp, reason)| {
            Frame::AuthResponse(AuthResponse::Error { timestamp, reason })
        }),
        envelope().prop_map(Frame::Message),
        (handshake_kind, msgid(), prop::option::of(json_object())).prop_map(
            |(kind, msgid, payload)| Frame::Handshake(Handshake {
                kind,
                msgid,
                payload
            })
        ),
        (prop::option::of(msgid()), code, text()).prop_map(|(msgid, code, message)| Frame::Error(
            ErrorFrame {
                msgid,
                code,
                message
            }
        )),
    ]
}

fn compact_item() -> impl Strategy<Value = CompactItem> {
    // `data: null` reads as absent, so compact data is never null.
    let data = json_value().prop_filter("null data reads as absent", |v| !v.is_null());
    (text(), prop::option::of(any::<i64>()), data).prop_map(|(device_id, timestamp, data)| {
        CompactItem {
            device_id,
            timestamp,
            data,
        }
    })
}

fn compact() -> impl Strategy<Value = Compact> {
    prop_oneof![
        compact_item().prop_map(Compact::Status),
        compact_item().prop_map(Compact::Event),
        prop::collection::vec(compact_item(), 1..5).prop_map(Compact::Batch),
    ]
}

/// A byte-level edit of a valid encoding.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let m = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        // JSON-significant bytes make structural damage likelier than random bytes do.
        (
            any::<usize>(),
            prop::sample::select(b"{}[]\":,\\0-9.e ntf".to_vec())
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ];
    prop::collection::vec(m, 1..8)
}

fn mutate(mut bytes: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let len = bytes.len();
        match *m {
            Mutation::Set(i, b) if len > 0 => bytes[i % len] = b,
            Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
            Mutation::Remove(i) if len > 0 => {
                bytes.remove(i % len);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (len + 1)),
            _ => {}
        }
    }
    bytes
}

proptest! {
    #[test]
    fn json_round_trips(f in frame()) {
        prop_assert_eq!(json::decode(&json::encode(&f)), Ok(f));
    }

    #[test]
    fn protobuf_round_trips(f in frame()) {
        prop_assert_eq!(proto::decode(&proto::encode(&f)), Ok(f));
    }

    #[test]
    fn json_to_protobuf_to_frame_is_lossless(f in frame()) {
        let via_json = json::decode(&json::encode(&f)).expect("valid frame");
        let via_proto = Codec::Protobuf.decode(&Codec::Protobuf.encode(&via_json));
        prop_assert_eq!(via_proto, Ok(f));
    }

    #[test]
    fn compact_frames_round_trip_through_json(c in compact()) {
        let f = Frame::Compact(c);
        prop_assert_eq!(json::decode(&json::encode(&f)), Ok(f));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = json::decode(&bytes);
        let _ = proto::decode(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic(f in frame(), ms in mutations()) {
        let _ = json::decode(&mutate(json::encode(&f), &ms));
        let _ = proto::decode(&mutate(proto::encode(&f), &ms));
    }

    #[test]
    fn mutated_compact_frames_never_panic(ms in mutations()) {
        let seeds: [&[u8]; 3] = [
            br#"{"type":"status","deviceId":"sensor-001","timestamp":1634567890123,"data":{"t":21.5}}"#,
            br#"{"type":"status","deviceId":"plc-101","timestamp":1,"values":[{"tag":"p","value":1,"unit":"kPa"}],"quality":"good"}"#,
            br#"{"type":"batch","data":[{"deviceId":"a","timestamp":1,"data":{}},{"deviceId":"b","data":[1]}]}"#,
        ];
        for seed in seeds {
            let _ = json::decode(&mutate(seed.to_vec(), &ms));
        }
    }
}
