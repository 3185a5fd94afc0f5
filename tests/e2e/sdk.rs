//! The device SDK against the real gateway: both QoS directions, both codecs and auth
//! modes, reconnect with queued commands following the device, final closes.

use std::time::Duration;

use fleetgate_device::{AuthMode, BatchItem, Codec, Device, DeviceEvent, DeviceOptions, Qos};
use serde_json::json;
use tokio::sync::mpsc;

use crate::support::{DEADLINE, Node};

fn options(node: &Node, id: &str, secret: &str) -> DeviceOptions {
    let mut o = DeviceOptions::new(node.device_url(), id, secret);
    o.ack_timeout = Duration::from_millis(300);
    o.reconnect_backoff_min = Duration::from_millis(20);
    o.reconnect_backoff_max = Duration::from_millis(200);
    o
}

async fn next_event(events: &mut mpsc::Receiver<DeviceEvent>) -> DeviceEvent {
    tokio::time::timeout(DEADLINE, events.recv())
        .await
        .expect("an event in time")
        .expect("event loop alive")
}

/// Waits for the next `Connected` event (past failed attempts) and returns its reconnects.
pub(crate) async fn connected(events: &mut mpsc::Receiver<DeviceEvent>) -> u32 {
    loop {
        match next_event(events).await {
            DeviceEvent::Connected { reconnects, .. } => return reconnects,
            DeviceEvent::ConnectFailed { .. } | DeviceEvent::Disconnected { .. } => continue,
            other => panic!("expected Connected, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn every_qos_both_ways_with_both_codecs_and_auth_modes() {
    let node = Node::start(&[]).await;
    for (i, (codec, auth)) in [
        (Codec::Json, AuthMode::Header),
        (Codec::Json, AuthMode::FirstFrame),
        (Codec::Protobuf, AuthMode::Header),
        (Codec::Protobuf, AuthMode::FirstFrame),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("sdk-{i}");
        let secret = node.provision(&id).await;
        let (client, mut events) = Device::connect(
            options(&node, &id, &secret)
                .with_codec(codec)
                .with_auth(auth),
        )
        .unwrap();
        connected(&mut events).await;
        for (n, qos) in [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce]
            .into_iter()
            .enumerate()
        {
            client
                .send_status(json!({ format!("q{n}"): n }), qos)
                .await
                .expect("status delivered");
        }
        client
            .send_event(json!({"door": "open"}), Qos::ExactlyOnce)
            .await
            .unwrap();
        client
            .send_batch(
                vec![
                    BatchItem::status(json!({"b": 1})),
                    BatchItem::event(json!({"e": 1})),
                ],
                Qos::AtLeastOnce,
            )
            .await
            .unwrap();
        let (_, dev) = node.admin("GET", &format!("/v1/devices/{id}"), None).await;
        assert_eq!(
            dev["shadow"]["reported"],
            json!({"q0": 0, "q1": 1, "q2": 2, "b": 1}),
            "{codec:?} {auth:?}"
        );

        for qos in [1, 2] {
            let call = node.command_in_background(
                &id,
                json!({"payload": {"set": qos}, "qos": qos, "waitMs": 5000}),
            );
            let cmd = loop {
                if let DeviceEvent::Command(cmd) = next_event(&mut events).await {
                    break cmd;
                }
            };
            assert_eq!(
                (cmd.qos.as_u8(), cmd.payload.clone()),
                (qos as u8, json!({"set": qos}))
            );
            cmd.respond(Some(json!({"applied": qos}))).await.unwrap();
            let (status, body) = call.await.unwrap();
            assert_eq!(
                (status, body["result"].clone()),
                (200, json!({"applied": qos})),
                "{codec:?} qos {qos}"
            );
        }
        client.disconnect().await;
    }
}

#[tokio::test]
async fn queued_commands_follow_the_device_across_a_reconnect_in_order() {
    let node = Node::start(&[]).await;
    let secret = node.provision("roamer").await;
    let (client, mut events) = Device::connect(options(&node, "roamer", &secret)).unwrap();
    assert_eq!(connected(&mut events).await, 0);
    // The operator kicks the device (1000): the SDK comes back on its own.
    let (status, _) = node
        .admin("POST", "/v1/devices/roamer/disconnect", None)
        .await;
    assert_eq!(status, 204);
    let mut sent = Vec::new();
    for i in 0..10 {
        let (status, body) = node
            .admin(
                "POST",
                "/v1/devices/roamer/commands",
                Some(json!({"payload": {"seq": i}, "qos": 1})),
            )
            .await;
        assert_eq!(status, 202);
        sent.push(body["msgid"].as_str().unwrap().to_owned());
    }
    let mut got = Vec::new();
    let mut reconnected = false;
    while got.len() < sent.len() {
        match next_event(&mut events).await {
            DeviceEvent::Connected { reconnects, .. } => {
                assert!(reconnects >= 1);
                reconnected = true;
            }
            DeviceEvent::Command(cmd) => {
                got.push(cmd.msgid.to_string());
                cmd.respond(None).await.unwrap();
            }
            _ => {}
        }
    }
    assert!(reconnected);
    assert_eq!(got, sent, "every queued command, once, in order");
    let _ = client;
}

#[tokio::test]
async fn a_replaced_sdk_device_stops_instead_of_fighting_back() {
    let node = Node::start(&[]).await;
    let secret = node.provision("dup-sdk").await;
    let (_first, mut first_events) = Device::connect(options(&node, "dup-sdk", &secret)).unwrap();
    connected(&mut first_events).await;
    let (_second, mut second_events) = Device::connect(options(&node, "dup-sdk", &secret)).unwrap();
    connected(&mut second_events).await;
    loop {
        if let DeviceEvent::Disconnected {
            code, reconnect_in, ..
        } = next_event(&mut first_events).await
        {
            assert_eq!((code, reconnect_in), (Some(4409), None));
            break;
        }
    }
}

/// Desired state reaches an SDK device as `DeviceEvent::Delta`, over both codecs; reporting
/// it puts the shadow in sync.
#[tokio::test]
async fn the_sdk_surfaces_deltas_and_reporting_them_syncs_the_shadow() {
    let node = Node::start(&[]).await;
    for (i, codec) in [Codec::Json, Codec::Protobuf].into_iter().enumerate() {
        let id = format!("sdk-delta-{i}");
        let secret = node.provision(&id).await;
        let (client, mut events) =
            Device::connect(options(&node, &id, &secret).with_codec(codec)).unwrap();
        connected(&mut events).await;
        let (s, _) = node
            .admin(
                "PATCH",
                &format!("/v1/devices/{id}/shadow/desired"),
                Some(json!({"state": {"mode": "eco"}})),
            )
            .await;
        assert_eq!(s, 200);
        let DeviceEvent::Delta { version, state } = next_event(&mut events).await else {
            panic!("expected the delta first");
        };
        assert_eq!(version, 1);
        assert_eq!(
            serde_json::Value::Object(state.clone()),
            json!({"mode": "eco"})
        );
        client
            .send_status(serde_json::Value::Object(state), Qos::AtLeastOnce)
            .await
            .unwrap();
        let (_, shadow) = node
            .admin("GET", &format!("/v1/devices/{id}/shadow"), None)
            .await;
        assert_eq!(shadow["inSync"], true, "{shadow}");
        client.disconnect().await;
    }
}

async fn next_app(app: &mut fleetgate_device::AppClient) -> fleetgate_device::AppEvent {
    tokio::time::timeout(DEADLINE, app.next())
        .await
        .expect("a frame in time")
        .unwrap()
}

/// The SDK's two ends: a device reports, an `AppClient` watches it, drops, and recovers
/// what it missed from its positions on a new connection.
#[tokio::test]
async fn an_app_client_follows_a_device_and_recovers_after_a_reconnect() {
    use fleetgate_device::{AppClient, AppEvent};
    let node = Node::start(&[]).await;
    let secret = node.provision("sdk-watched").await;
    let (client, mut events) = Device::connect(options(&node, "sdk-watched", &secret)).unwrap();
    connected(&mut events).await;
    let url = format!("ws://{}/v1/app", node.gateway);
    let mut app = AppClient::connect(&url, crate::support::API_KEY)
        .await
        .unwrap();
    assert_eq!(app.subscribe("device:sdk-watched").await.unwrap(), 0);
    for i in 0..10 {
        client
            .send_status(json!({"n": i}), Qos::AtLeastOnce)
            .await
            .unwrap();
    }
    for i in 0..10 {
        match next_app(&mut app).await {
            AppEvent::Message { data, .. } => assert_eq!(data["payload"]["n"], i),
            other => panic!("{other:?}"),
        }
    }
    let positions = app.positions().clone();
    drop(app);
    for i in 10..13 {
        client
            .send_status(json!({"n": i}), Qos::AtLeastOnce)
            .await
            .unwrap();
    }
    let mut back = AppClient::connect_with(&url, crate::support::API_KEY, positions)
        .await
        .unwrap();
    assert_eq!(back.subscribe("device:sdk-watched").await.unwrap(), 3);
    for i in 10..13 {
        match next_app(&mut back).await {
            AppEvent::Message { data, offset, .. } => {
                assert_eq!(data["payload"]["n"], i);
                assert_eq!(offset, Some(i + 1));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        back.positions().get("device:sdk-watched").map(|p| p.1),
        Some(13)
    );
}
