//! Device -> server: QoS 0/1/2, batches, the seed's compact frames, and per-message
//! rejections that keep the session.

use serde_json::{Value, json};

use crate::support::{Node, Raw, eventually, now_ms, status};

async fn shadow(node: &Node, id: &str) -> Value {
    let (code, dev) = node.admin("GET", &format!("/v1/devices/{id}"), None).await;
    assert_eq!(code, 200, "{dev}");
    dev["shadow"].clone()
}

#[tokio::test]
async fn qos0_status_merges_into_the_shadow_without_an_answer() {
    let node = Node::start(&[]).await;
    let secret = node.provision("q0").await;
    let mut raw = Raw::authed(&node.device_url(), "q0", &secret).await;
    raw.send(status("q0", "s1", 0, json!({"temp": 21.5, "hum": 40})))
        .await;
    raw.send(status("q0", "s2", 0, json!({"hum": null, "battery": 80})))
        .await;
    let reported = eventually("both statuses merged", || async {
        let s = shadow(&node, "q0").await;
        (s["version"] == 2).then(|| s["reported"].clone())
    })
    .await;
    assert_eq!(reported, json!({"temp": 21.5, "battery": 80}));
    // QoS 0 gets no answer: the next frame the device sees is the ack of a QoS 1 probe.
    raw.send(status("q0", "probe", 1, json!({}))).await;
    assert_eq!(raw.recv().await, json!({"type":"ack","msgid":"probe"}));
}

#[tokio::test]
async fn qos1_status_is_acked_once_durable_and_dup_is_reacked_not_reprocessed() {
    let node = Node::start(&[]).await;
    let secret = node.provision("q1").await;
    let mut raw = Raw::authed(&node.device_url(), "q1", &secret).await;
    raw.send(status("q1", "m-1", 1, json!({"n": 1}))).await;
    assert_eq!(raw.recv().await, json!({"type":"ack","msgid":"m-1"}));
    let mut dup = status("q1", "m-1", 1, json!({"n": 1}));
    dup["dup"] = json!(true);
    raw.send(dup).await;
    assert_eq!(raw.recv().await, json!({"type":"ack","msgid":"m-1"}));
    assert_eq!(
        shadow(&node, "q1").await["version"],
        1,
        "the retransmission was processed again"
    );
}

#[tokio::test]
async fn qos2_status_runs_rec_rel_comp_and_is_processed_exactly_once() {
    let node = Node::start(&[]).await;
    let secret = node.provision("q2").await;
    let mut raw = Raw::authed(&node.device_url(), "q2", &secret).await;
    raw.send(status("q2", "x-1", 2, json!({"valve": "open"})))
        .await;
    assert_eq!(raw.recv().await, json!({"type":"rec","msgid":"x-1"}));
    // The device did not see the rec and retransmits: rec again, no second processing.
    let mut dup = status("q2", "x-1", 2, json!({"valve": "open"}));
    dup["dup"] = json!(true);
    raw.send(dup).await;
    assert_eq!(raw.recv().await, json!({"type":"rec","msgid":"x-1"}));
    raw.send(json!({"type":"rel","msgid":"x-1"})).await;
    assert_eq!(raw.recv().await, json!({"type":"comp","msgid":"x-1"}));
    assert_eq!(shadow(&node, "q2").await["version"], 1);
}

#[tokio::test]
async fn qos2_dedupe_survives_a_reconnect() {
    let node = Node::start(&[]).await;
    let secret = node.provision("q2r").await;
    let mut raw = Raw::authed(&node.device_url(), "q2r", &secret).await;
    raw.send(status("q2r", "y-1", 2, json!({"k": 1}))).await;
    assert_eq!(raw.recv().await["type"], "rec");
    drop(raw);
    // A new connection (the replay window is per connection; the QoS 2 store is in the bus).
    let mut raw = Raw::authed(&node.device_url(), "q2r", &secret).await;
    let mut dup = status("q2r", "y-1", 2, json!({"k": 1}));
    dup["dup"] = json!(true);
    raw.send(dup).await;
    assert_eq!(raw.recv().await, json!({"type":"rec","msgid":"y-1"}));
    raw.send(json!({"type":"rel","msgid":"y-1"})).await;
    assert_eq!(raw.recv().await, json!({"type":"comp","msgid":"y-1"}));
    assert_eq!(shadow(&node, "q2r").await["version"], 1);
}

#[tokio::test]
async fn batch_items_and_the_batch_are_acked_by_their_own_msgids() {
    let node = Node::start(&[]).await;
    let secret = node.provision("b1").await;
    let mut raw = Raw::authed(&node.device_url(), "b1", &secret).await;
    let items: Vec<Value> = (0..5)
        .map(|i| status("b1", &format!("it-{i}"), 1, json!({ format!("k{i}"): i })))
        .collect();
    raw.send(json!({"ver":"1.0","msgid":"batch-1","timestamp":now_ms(),"from":"b1","to":"server","type":"batch","payload":{"items":items},"qos":1})).await;
    let mut acked = Vec::new();
    for _ in 0..6 {
        let f = raw.recv().await;
        assert_eq!(f["type"], "ack", "{f}");
        acked.push(f["msgid"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        acked,
        vec!["it-0", "it-1", "it-2", "it-3", "it-4", "batch-1"]
    );
    let s = shadow(&node, "b1").await;
    assert_eq!(s["reported"], json!({"k0":0,"k1":1,"k2":2,"k3":3,"k4":4}));
}

#[tokio::test]
async fn seed_compact_frames_are_normalised() {
    let node = Node::start(&[]).await;
    let secret = node.provision("plc-101").await;
    let mut raw = Raw::authed(&node.device_url(), "plc-101", &secret).await;
    raw.send(
        json!({"type":"status","deviceId":"plc-101","timestamp":now_ms(),"data":{"battery":90}}),
    )
    .await;
    raw.send(json!({"type":"status","deviceId":"plc-101","timestamp":now_ms(),
        "values":[{"tag":"temperature","value":42.5,"unit":"°C"},{"tag":"pressure","value":101.3,"unit":"kPa"}],"quality":"good"})).await;
    raw.send(json!({"type":"batch","data":[{"deviceId":"plc-101","timestamp":now_ms(),"data":{"vibration":0.15}}]})).await;
    let reported = eventually("compact frames merged", || async {
        let s = shadow(&node, "plc-101").await;
        (s["version"] == 3).then(|| s["reported"].clone())
    })
    .await;
    assert_eq!(
        reported,
        json!({"battery":90,"temperature":42.5,"pressure":101.3,"quality":"good","vibration":0.15})
    );
}

#[tokio::test]
async fn replayed_msgid_and_clock_skew_get_error_frames_and_the_session_goes_on() {
    let node = Node::start(&[]).await;
    let secret = node.provision("r1").await;
    let mut raw = Raw::authed(&node.device_url(), "r1", &secret).await;
    raw.send(status("r1", "once", 1, json!({"a": 1}))).await;
    assert_eq!(raw.recv().await["type"], "ack");
    raw.send(status("r1", "once", 1, json!({"a": 2}))).await;
    let err = raw.recv().await;
    assert_eq!(
        (
            err["type"].as_str(),
            err["msgid"].as_str(),
            err["payload"]["code"].as_str()
        ),
        (Some("error"), Some("once"), Some("replay"))
    );
    let mut old = status("r1", "late", 1, json!({"a": 3}));
    old["timestamp"] = json!(now_ms() - 10 * 60 * 1000);
    raw.send(old).await;
    let err = raw.recv().await;
    assert_eq!(err["payload"]["code"], "clock_skew", "{err}");
    raw.send(status("r1", "after", 1, json!({"a": 4}))).await;
    assert_eq!(raw.recv().await, json!({"type":"ack","msgid":"after"}));
    assert_eq!(shadow(&node, "r1").await["reported"], json!({"a": 4}));
}

#[tokio::test]
async fn spoofed_from_and_garbage_close_with_4400_and_nothing_else_is_affected() {
    let node = Node::start(&[]).await;
    let good_secret = node.provision("good").await;
    let bad_secret = node.provision("bad").await;
    let mut good = Raw::authed(&node.device_url(), "good", &good_secret).await;

    let mut spoofer = Raw::authed(&node.device_url(), "bad", &bad_secret).await;
    spoofer
        .send(status("good", "spoof-1", 1, json!({"owned": true})))
        .await;
    assert_eq!(spoofer.closed().await.code, 4400);

    for garbage in [
        "not json",
        "[1,2,3]",
        "{\"type\":\"status\"}",
        "{\"type\":\"warp\",\"msgid\":\"a\"}",
        "{\"ver\":\"1.0\",\"msgid\":\"bad id!\",\"timestamp\":1,\"from\":\"bad\",\"type\":\"status\",\"payload\":{}}",
    ] {
        let mut raw = Raw::authed(&node.device_url(), "bad", &bad_secret).await;
        raw.send_text(garbage.to_owned()).await;
        let closed = raw.closed().await;
        assert_eq!(closed.code, 4400, "{garbage}: {closed:?}");
        assert!(!closed.reason.is_empty(), "a 4400 says why");
    }
    let mut raw = Raw::authed(&node.device_url(), "bad", &bad_secret).await;
    raw.send_binary(vec![0xff, 0x00, 0x13]).await;
    assert_eq!(raw.closed().await.code, 4400);

    good.send(status("good", "still-fine", 1, json!({"ok": true})))
        .await;
    assert_eq!(
        good.recv().await,
        json!({"type":"ack","msgid":"still-fine"})
    );
    assert_eq!(
        shadow(&node, "good").await["reported"],
        json!({"ok": true}),
        "the spoofed status never landed"
    );
}

#[tokio::test]
async fn a_protobuf_session_speaks_binary_frames() {
    use fleetgate_protocol::{Auth, Codec, Envelope, Frame, MessageKind, MsgId, Qos};
    let node = Node::start(&[]).await;
    let secret = node.provision("pb-1").await;
    let mut raw = Raw::connect(
        &node.device_url(),
        &[("Sec-WebSocket-Protocol", "fleetgate.v1.proto")],
    )
    .await;
    let auth = Frame::Auth(Auth {
        device_id: "pb-1".into(),
        token: secret,
    });
    raw.send_binary(Codec::Protobuf.encode(&auth).to_vec())
        .await;
    let decode = |v: Value| {
        let bytes: Vec<u8> = serde_json::from_value(v["binary"].clone()).expect("a binary frame");
        Codec::Protobuf.decode(&bytes).expect("valid protobuf")
    };
    assert!(matches!(
        decode(raw.recv().await),
        Frame::AuthResponse(fleetgate_protocol::AuthResponse::Success { .. })
    ));
    let status = Frame::Message(Envelope {
        ver: "1.0".into(),
        msgid: MsgId::new("pb-m1").unwrap(),
        timestamp: now_ms(),
        from: "pb-1".into(),
        to: "server".into(),
        kind: MessageKind::Status,
        payload: json!({"rpm": 1200, "ok": true}),
        qos: Qos::AtLeastOnce,
        retain: false,
        dup: false,
        sig: None,
    });
    raw.send_binary(Codec::Protobuf.encode(&status).to_vec())
        .await;
    match decode(raw.recv().await) {
        Frame::Handshake(h) => assert_eq!((h.kind.as_str(), h.msgid.as_str()), ("ack", "pb-m1")),
        other => panic!("expected an ack, got {other:?}"),
    }
    assert_eq!(
        shadow(&node, "pb-1").await["reported"],
        json!({"rpm": 1200, "ok": true})
    );
}

#[tokio::test]
async fn the_replay_window_is_per_device_and_survives_a_reconnect() {
    let node = Node::start(&[]).await;
    let secret = node.provision("rw").await;
    let mut raw = Raw::authed(&node.device_url(), "rw", &secret).await;
    raw.send(status("rw", "only-once", 1, json!({"n": 1})))
        .await;
    assert_eq!(raw.recv().await["type"], "ack");
    let (status_code, _) = node.admin("POST", "/v1/devices/rw/disconnect", None).await;
    assert_eq!(status_code, 204);
    assert_eq!(raw.closed().await.code, 1000);
    let mut raw = Raw::authed(&node.device_url(), "rw", &secret).await;
    raw.send(status("rw", "only-once", 1, json!({"n": 2})))
        .await;
    assert_eq!(raw.recv().await["payload"]["code"], "replay");
    assert_eq!(shadow(&node, "rw").await["reported"], json!({"n": 1}));
}
