//! Message signatures: a device with a MAC key must sign every message; tampered, unsigned
//! and replayed frames are refused with an error frame, counted, and not processed. The
//! canonical form is built here by hand from docs/PROTOCOL.md, not with the protocol crate.

use std::time::Duration;

use fleetgate_device::{Device, DeviceOptions};
use fleetgate_protocol::{Codec, Qos};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::support::{Node, Raw, eventually, now_ms};

/// Provisions `id` and gives it a MAC key; returns (secret, key).
async fn signing_device(node: &Node, id: &str) -> (String, [u8; 32]) {
    let secret = node.provision(id).await;
    let (code, body) = node
        .admin("POST", &format!("/v1/devices/{id}/mac-key"), None)
        .await;
    assert_eq!(code, 200, "{body}");
    let mut key = [0u8; 32];
    hex::decode_to_slice(body["macKey"].as_str().expect("macKey"), &mut key).expect("64 hex");
    (secret, key)
}

/// A status frame as text, with `payload_text` embedded verbatim and signed over `signed_text`
/// (equal unless the test tampers).
fn signed_status(
    key: &[u8; 32],
    device: &str,
    msgid: &str,
    nonce: &str,
    payload_text: &str,
    signed_text: &str,
) -> String {
    let ts = now_ms();
    let canonical = format!(
        "fleetgate-mac-v1\n1.0\nstatus\n{msgid}\n{ts}\n{device}\nserver\n1\n0\n0\n{nonce}\n{signed_text}"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(canonical.as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    format!(
        r#"{{"ver":"1.0","msgid":"{msgid}","timestamp":{ts},"from":"{device}","to":"server","type":"status","payload":{payload_text},"qos":1,"nonce":"{nonce}","sig":"{sig}"}}"#
    )
}

fn refusal(frame: &Value) -> (&str, Option<&str>, &str) {
    (
        frame["payload"]["code"].as_str().unwrap_or_default(),
        frame["msgid"].as_str(),
        frame["payload"]["message"].as_str().unwrap_or_default(),
    )
}

async fn failures(node: &Node, reason: &str) -> u64 {
    let (_, metrics) = node.internal_get("/metrics").await;
    let name = format!("fleetgate_signature_failures_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&name))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn signed_messages_are_verified_and_tampered_unsigned_or_replayed_ones_refused() {
    let node = Node::start(&[]).await;
    let id = "sig-dev-1";
    let (secret, key) = signing_device(&node, id).await;
    let (_, device) = node.admin("GET", &format!("/v1/devices/{id}"), None).await;
    assert_eq!(device["signed"], true, "{device}");
    let mut raw = Raw::authed(&node.device_url(), id, &secret).await;

    // The payload is covered as sent: spaces and all.
    let first = signed_status(
        &key,
        id,
        "m1",
        "nonce-0001",
        r#"{ "t" : 1 }"#,
        r#"{ "t" : 1 }"#,
    );
    raw.send_text(first.clone()).await;
    assert_eq!(raw.recv().await, json!({"type":"ack","msgid":"m1"}));

    let tampered = signed_status(&key, id, "m2", "nonce-0002", r#"{"t":3}"#, r#"{"t":2}"#);
    raw.send_text(tampered).await;
    let refused = raw.recv().await;
    assert_eq!(
        refusal(&refused),
        ("bad_signature", Some("m2"), "signature mismatch")
    );

    raw.send(crate::support::status(id, "m3", 1, json!({"t": 4})))
        .await;
    let refused = raw.recv().await;
    assert_eq!(
        refusal(&refused),
        ("bad_signature", Some("m3"), "signature required")
    );

    // The exact frame again: its MAC is fine, its nonce is spent.
    raw.send_text(first).await;
    let refused = raw.recv().await;
    assert_eq!(
        refusal(&refused),
        (
            "bad_signature",
            Some("m1"),
            "nonce seen before inside the replay window"
        )
    );

    let wrong_key = signed_status(&[9; 32], id, "m5", "nonce-0005", r#"{"t":5}"#, r#"{"t":5}"#);
    raw.send_text(wrong_key).await;
    assert_eq!(refusal(&raw.recv().await).2, "signature mismatch");

    let bad_nonce = signed_status(&key, id, "m6", "short", r#"{"t":6}"#, r#"{"t":6}"#);
    raw.send_text(bad_nonce).await;
    assert_eq!(
        refusal(&raw.recv().await).2,
        "nonce must be 8-64 characters of [A-Za-z0-9_-]"
    );

    // The seed's compact frames have no envelope to sign.
    raw.send(json!({"type":"status","deviceId":id,"timestamp":now_ms(),"data":{"t":7}}))
        .await;
    let refused = raw.recv().await;
    assert_eq!(
        refusal(&refused),
        (
            "bad_signature",
            None,
            "compact frames cannot be signed; send envelopes"
        )
    );

    // The session goes on: the next good frame is accepted.
    let good = signed_status(&key, id, "m8", "nonce-0008", r#"{"t":8}"#, r#"{"t":8}"#);
    raw.send_text(good).await;
    assert_eq!(raw.recv().await, json!({"type":"ack","msgid":"m8"}));

    // Only the two good messages reached the shadow.
    let (_, shadow) = node
        .admin("GET", &format!("/v1/devices/{id}/shadow"), None)
        .await;
    assert_eq!(shadow["reported"], json!({"t": 8}), "{shadow}");
    for (reason, n) in [
        ("mismatch", 2),
        ("missing", 1),
        ("nonce_reused", 1),
        ("bad_nonce", 1),
        ("unsignable", 1),
    ] {
        assert_eq!(failures(&node, reason).await, n, "{reason}");
    }
}

#[tokio::test]
async fn the_sdk_signs_every_message_in_both_codecs_and_an_unsigned_device_is_refused() {
    let node = Node::start(&[]).await;
    for (id, codec) in [
        ("sig-sdk-json", Codec::Json),
        ("sig-sdk-proto", Codec::Protobuf),
    ] {
        let (secret, key) = signing_device(&node, id).await;
        let opts = DeviceOptions::new(node.device_url(), id, &secret)
            .with_codec(codec)
            .with_mac_key(key);
        let (device, _events) = Device::connect(opts).expect("valid options");
        device.wait_connected().await.expect("connected");
        for n in 0..5 {
            device
                .send_status(json!({"n": n}), Qos::AtLeastOnce)
                .await
                .unwrap_or_else(|e| panic!("{id} message {n}: {e}"));
        }
        device.disconnect().await;
    }
    assert_eq!(failures(&node, "mismatch").await, 0);

    // The same device without its key: every message is refused.
    let id = "sig-sdk-unsigned";
    let (secret, _) = signing_device(&node, id).await;
    let mut opts = DeviceOptions::new(node.device_url(), id, &secret);
    opts.max_attempts = 1;
    opts.ack_timeout = Duration::from_millis(200);
    let (device, _events) = Device::connect(opts).expect("valid options");
    device.wait_connected().await.expect("connected");
    assert!(
        device
            .send_status(json!({"n": 0}), Qos::AtLeastOnce)
            .await
            .is_err()
    );
    eventually("the unsigned message is counted", || async {
        (failures(&node, "missing").await == 1).then_some(())
    })
    .await;

    // Dropping the key lifts the rule from the next connection.
    let path = format!("/v1/devices/{id}/mac-key");
    assert_eq!(node.admin("DELETE", &path, None).await.0, 204);
    assert_eq!(node.admin("DELETE", &path, None).await.0, 204, "idempotent");
    assert_eq!(
        node.admin("DELETE", "/v1/devices/nobody/mac-key", None)
            .await
            .0,
        404
    );
    let mut raw = Raw::authed(&node.device_url(), id, &secret).await;
    raw.send(crate::support::status(id, "u1", 1, json!({"n": 1})))
        .await;
    assert_eq!(raw.recv().await, json!({"type":"ack","msgid":"u1"}));
}

#[tokio::test]
async fn a_signed_group_requires_signatures_from_every_device_in_it() {
    let node = Node::start(&[("FLEETGATE_SIGNED_GROUPS", "plant-7, other")]).await;
    let keyless = node.provision_in("sig-group-1", &["plant-7"]).await;
    let elsewhere = node.provision_in("sig-group-2", &["office"]).await;

    let mut raw = Raw::authed(&node.device_url(), "sig-group-1", &keyless).await;
    raw.send(crate::support::status(
        "sig-group-1",
        "g1",
        1,
        json!({"t": 1}),
    ))
    .await;
    assert_eq!(
        refusal(&raw.recv().await),
        ("bad_signature", Some("g1"), "signature required")
    );
    // Signed with a key of its own invention: there is none to check it against.
    let invented = signed_status(&[1; 32], "sig-group-1", "g2", "nonce-0g02", "{}", "{}");
    raw.send_text(invented).await;
    assert_eq!(
        refusal(&raw.recv().await),
        (
            "bad_signature",
            Some("g2"),
            "signature required; no MAC key was issued for this device"
        )
    );
    assert_eq!(failures(&node, "no_key").await, 1);

    // Given a key, it signs and is accepted; a device outside the groups needs nothing.
    let (code, body) = node
        .admin("POST", "/v1/devices/sig-group-1/mac-key", None)
        .await;
    assert_eq!(code, 200, "{body}");
    let mut key = [0u8; 32];
    hex::decode_to_slice(body["macKey"].as_str().unwrap(), &mut key).unwrap();
    drop(raw);
    let mut raw = Raw::authed(&node.device_url(), "sig-group-1", &keyless).await;
    raw.send_text(signed_status(
        &key,
        "sig-group-1",
        "g3",
        "nonce-0g03",
        "{}",
        "{}",
    ))
    .await;
    assert_eq!(raw.recv().await, json!({"type":"ack","msgid":"g3"}));
    let mut other = Raw::authed(&node.device_url(), "sig-group-2", &elsewhere).await;
    other
        .send(crate::support::status(
            "sig-group-2",
            "o1",
            1,
            json!({"t": 1}),
        ))
        .await;
    assert_eq!(other.recv().await, json!({"type":"ack","msgid":"o1"}));
}
