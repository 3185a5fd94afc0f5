//! A `/v1/app` or `/v1/mqtt` client's text frame, decoded as the gateway does, with the
//! topic names and filters an MQTT request carries; and the same bytes as a broker
//! message's payload, which the gateway forwards to web clients.
#![no_main]

use fleetgate_mqtt::{Topic, TopicFilter};
use fleetgate_protocol::app::{self, AppRequest};
use fleetgate_protocol::mqtt::{self, MqttReply, MqttRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = app::decode_request(data) {
        let text = serde_json::to_vec(&request).expect("requests serialise");
        assert_eq!(app::decode_request(&text).as_ref(), Ok(&request));
        if let AppRequest::Subscribe { channel, .. } | AppRequest::Unsubscribe { channel, .. } =
            &request
        {
            let _ = app::encode_message(channel, Some(1), b"{}");
        }
    }
    if let Ok(request) = mqtt::decode_request(data) {
        let text = serde_json::to_vec(&request).expect("requests serialise");
        assert_eq!(mqtt::decode_request(&text).as_ref(), Ok(&request));
        match &request {
            MqttRequest::Subscribe { topic, .. } | MqttRequest::Unsubscribe { topic, .. } => {
                filter(topic);
            }
            MqttRequest::Publish { topic, payload, .. } => {
                let _ = mqtt::payload_bytes(payload);
                if let Ok(name) = Topic::new(topic.as_str()) {
                    let _ = (name.levels().count(), name.is_system());
                    let as_filter = TopicFilter::new(topic.as_str()).expect("names are filters");
                    assert!(matches_itself(&as_filter, &name), "{topic}");
                }
            }
            MqttRequest::Auth { .. } => {}
        }
    }
    broker_payload(data);
});

/// The checks a filter's subscription takes, and what must hold between a filter and itself.
fn filter(text: &str) {
    let Ok(f) = TopicFilter::new(text) else {
        return;
    };
    assert!(f.covers(&f) && f.intersects(&f), "{text}");
    let _ = f.has_wildcards();
    if let Ok(name) = Topic::new(text) {
        assert!(matches_itself(&f, &name), "{text}");
    }
}

/// A wildcard-free filter matches exactly the topic of the same text, but for a shared
/// subscription (`$share/<group>/<filter>`), which matches the topics of its inner filter.
fn matches_itself(filter: &TopicFilter, name: &Topic) -> bool {
    filter.matches(name) != is_shared(name.as_str())
}

fn is_shared(text: &str) -> bool {
    let mut levels = text.split('/');
    levels.next() == Some("$share") && levels.count() >= 2
}

/// A broker payload arrives as whatever bytes a device published: the `mqtt` frame built
/// from it must be JSON a client reads back to the same bytes.
fn broker_payload(data: &[u8]) {
    let frame = mqtt::encode_mqtt("devices/d1/status", data, false);
    let reply: MqttReply = serde_json::from_slice(&frame).expect("mqtt frames are JSON");
    let MqttReply::Mqtt {
        payload, encoding, ..
    } = reply
    else {
        panic!("not an mqtt frame");
    };
    let bytes = match encoding {
        None => payload.into_bytes(),
        Some(mqtt::PayloadEncoding::Base64) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(payload)
                .expect("valid base64")
        }
    };
    assert_eq!(bytes, data);
}
