//! Inputs the fuzz targets (`fuzz/`) found that broke an invariant, each kept as the smallest
//! frame that shows it. The reproducers themselves stay in the fuzz corpus.

use fleetgate_protocol::{Codec, Frame, json};

fn round_trips(frame: &[u8]) {
    let decoded = json::decode(frame).expect("a valid frame");
    assert_eq!(json::decode(&json::encode(&decoded)), Ok(decoded.clone()));
    if !matches!(decoded, Frame::Compact(_)) {
        let proto = Codec::Protobuf.encode(&decoded);
        assert_eq!(Codec::Protobuf.decode(&proto), Ok(decoded));
    }
}

/// A float in a payload must read as the nearest double: serde_json's default parser may
/// be one unit in the last place off, so a reading the gateway re-encoded (telemetry,
/// fan-out, Protobuf) came out as a different number than the device sent.
#[test]
fn payload_floats_survive_re_encoding() {
    // Long integers past u64 read as floats, and long mantissas, are where it was off.
    let long = [
        format!("1{}7000000000000", "3".repeat(82)),
        format!("710{}0000", "1".repeat(100)),
    ];
    for number in &long {
        let frame = format!(
            r#"{{"msgid":"m1","timestamp":1,"from":"d","type":"status","payload":{{"t":{number}}}}}"#
        );
        round_trips(frame.as_bytes());
    }
}

/// A signed frame keeps the payload's wire bytes for its MAC; a re-encoding writes the payload
/// in serde's form (here a long decimal shortened), and must still equal the decoded frame:
/// the kept bytes are how it arrived, not what it says.
#[test]
fn signed_frames_round_trip_whatever_their_payload_text() {
    let frame = br#"{"ver":"1.0","msgid":"s1","timestamp":1700000000000,"from":"d","type":"status","payload":{"t":21.5555555555555555555555},"qos":1,"nonce":"n0nce-0001","sig":"abab"}"#;
    round_trips(frame);
    let Ok(Frame::Message(env)) = json::decode(frame) else {
        panic!("a message");
    };
    let sig = env.sig.as_deref().expect("signature kept");
    // The MAC is still checked over the bytes as sent (here it is simply malformed).
    assert_eq!(
        sig.verify(&env, &[0; 32]),
        Err(fleetgate_protocol::MacError::BadFormat)
    );
}
