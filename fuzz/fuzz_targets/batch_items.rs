//! The items of a batch: `payload.items` is decoded from an already parsed JSON value, a
//! different path through the codec than a frame's bytes. The input is the items array (or a
//! single item), wrapped into a batch envelope from device `dev`.
#![no_main]

use fleetgate_protocol::{Envelope, Limits, MessageKind, MsgId, Qos, batch_items, json};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let Ok(items) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if !items.is_array() {
        // One item on its own, as the batch path reads each.
        if let Ok(env) = json::envelope_from_value(&items, "dev") {
            fleetgate_fuzz::round_trips(&fleetgate_protocol::Frame::Message(env));
        }
        return;
    }
    let batch = Envelope {
        ver: "1.0".into(),
        msgid: MsgId::new("b1").expect("a valid msgid"),
        timestamp: fleetgate_fuzz::NOW_MS,
        from: "dev".into(),
        to: "server".into(),
        kind: MessageKind::Batch,
        payload: json!({ "items": items }),
        qos: Qos::AtLeastOnce,
        retain: false,
        dup: false,
        sig: None,
    };
    match batch_items(&batch, "dev", fleetgate_fuzz::NOW_MS, &Limits::default()) {
        Ok(_) => fleetgate_fuzz::ingest(&batch),
        Err(error) => fleetgate_fuzz::error_is_answerable(&error),
    }
});
