//! The device SDK against a scripted gateway on a real socket.

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use fleetgate_device::{
    AuthMode, BatchItem, Codec, Connection, Device, DeviceClient, DeviceError, DeviceEvent,
    DeviceOptions, ErrorCode, ErrorFrame, Frame, LinkState, MessageKind, MsgId, Qos,
};
use fleetgate_protocol::{Auth, AuthResponse, Envelope, HandshakeKind};
use serde_json::json;
use support::{Gateway, Peer, within};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const DEVICE: &str = "sensor-001";
const TOKEN: &str = "s3cret";

fn opts(gw: &Gateway) -> DeviceOptions {
    let mut o = DeviceOptions::new(gw.url.clone(), DEVICE, TOKEN);
    o.reconnect_backoff_min = Duration::from_millis(10);
    o.reconnect_backoff_max = Duration::from_millis(50);
    o.ack_timeout = Duration::from_secs(10);
    o
}

async fn next_event(events: &mut mpsc::Receiver<DeviceEvent>) -> DeviceEvent {
    within(events.recv()).await.expect("event channel closed")
}

/// Starts a device and completes its first session; returns the peer too.
async fn connected(
    gw: &Gateway,
    o: DeviceOptions,
) -> (DeviceClient, mpsc::Receiver<DeviceEvent>, Peer) {
    let (client, mut events) = Device::connect(o).unwrap();
    let peer = gw.accept_authed("sess-1").await;
    match next_event(&mut events).await {
        DeviceEvent::Connected {
            session_id,
            reconnects: 0,
            ..
        } => assert_eq!(session_id, "sess-1"),
        other => panic!("expected Connected, got {other:?}"),
    }
    within(client.wait_connected()).await.unwrap();
    (client, events, peer)
}

fn command(msgid: &str, qos: Qos, dup: bool) -> Frame {
    Frame::Message(Envelope {
        ver: "1.0".into(),
        msgid: MsgId::new(msgid).unwrap(),
        timestamp: 1_700_000_000_000,
        from: "server".into(),
        to: DEVICE.into(),
        kind: MessageKind::Command,
        payload: json!({"action": "reboot"}),
        qos,
        retain: false,
        dup,
        sig: None,
    })
}

async fn expect_command(
    events: &mut mpsc::Receiver<DeviceEvent>,
) -> Box<fleetgate_device::IncomingCommand> {
    match next_event(events).await {
        DeviceEvent::Command(cmd) => cmd,
        other => panic!("expected Command, got {other:?}"),
    }
}

#[tokio::test]
async fn header_auth_sends_bearer_device_id_and_subprotocol() {
    let gw = Gateway::bind().await;
    let (client, _events, peer) = connected(&gw, opts(&gw)).await;
    assert_eq!(peer.path, "/v1/device");
    assert_eq!(peer.header("authorization"), Some("Bearer s3cret"));
    assert_eq!(peer.header("device-id"), Some(DEVICE));
    assert_eq!(
        peer.header("sec-websocket-protocol"),
        Some("fleetgate.v1.json")
    );
    assert_eq!(client.state(), LinkState::Connected);
}

#[tokio::test]
async fn first_frame_auth_sends_auth_frame_and_no_header() {
    let gw = Gateway::bind().await;
    let (_client, mut events) = Device::connect(opts(&gw).with_auth(AuthMode::FirstFrame)).unwrap();
    let mut peer = gw.accept().await;
    assert_eq!(peer.header("authorization"), None);
    assert_eq!(peer.header("device-id"), Some(DEVICE));
    assert_eq!(
        peer.recv().await,
        Frame::Auth(Auth {
            device_id: DEVICE.into(),
            token: TOKEN.into()
        })
    );
    peer.auth_ok("sess-ff").await;
    assert!(matches!(
        next_event(&mut events).await,
        DeviceEvent::Connected { .. }
    ));
}

#[tokio::test]
async fn qos1_send_returns_on_ack() {
    let gw = Gateway::bind().await;
    let (client, _events, mut peer) = connected(&gw, opts(&gw)).await;
    let before = fleetgate_now();
    let send = tokio::spawn(async move {
        client
            .send_status(json!({"temp": 21.5}), Qos::AtLeastOnce)
            .await
    });
    let env = peer.recv_message().await;
    assert_eq!(env.kind, MessageKind::Status);
    assert_eq!(env.from, DEVICE);
    assert_eq!(env.to, "server");
    assert_eq!(env.qos, Qos::AtLeastOnce);
    assert!(!env.dup && !env.retain);
    assert_eq!(env.payload, json!({"temp": 21.5}));
    assert!(env.timestamp >= before && env.timestamp <= fleetgate_now());
    assert!(!send.is_finished(), "must wait for the ack");
    peer.handshake(HandshakeKind::Ack, &env.msgid, None).await;
    assert_eq!(within(send).await.unwrap().unwrap(), env.msgid);
}

#[tokio::test]
async fn qos0_send_returns_once_written() {
    let gw = Gateway::bind().await;
    let (client, _events, mut peer) = connected(&gw, opts(&gw)).await;
    let id = within(client.send(
        MessageKind::Event,
        json!({"alarm": true}),
        Qos::AtMostOnce,
        true,
    ))
    .await
    .unwrap();
    let env = peer.recv_message().await;
    assert_eq!(env.msgid, id);
    assert_eq!(env.kind, MessageKind::Event);
    assert_eq!(env.qos, Qos::AtMostOnce);
    assert!(env.retain);
}

#[tokio::test]
async fn qos1_is_retransmitted_with_dup_after_ack_timeout() {
    let gw = Gateway::bind().await;
    let mut o = opts(&gw);
    o.ack_timeout = Duration::from_millis(100);
    let (client, _events, mut peer) = connected(&gw, o).await;
    let send =
        tokio::spawn(async move { client.send_event(json!({"n": 1}), Qos::AtLeastOnce).await });
    let first = peer.recv_message().await;
    let t0 = Instant::now();
    assert!(!first.dup);
    let second = peer.recv_message().await;
    assert!(
        t0.elapsed() >= Duration::from_millis(90),
        "retransmitted too early"
    );
    assert!(second.dup);
    assert_eq!(second.msgid, first.msgid);
    assert_eq!(second.payload, first.payload);
    peer.handshake(HandshakeKind::Ack, &first.msgid, None).await;
    assert_eq!(within(send).await.unwrap().unwrap(), first.msgid);
}

#[tokio::test]
async fn qos1_fails_after_max_attempts() {
    let gw = Gateway::bind().await;
    let mut o = opts(&gw);
    o.ack_timeout = Duration::from_millis(20);
    o.max_attempts = 2;
    let (client, _events, mut peer) = connected(&gw, o).await;
    let send = tokio::spawn(async move { client.send_status(json!({}), Qos::AtLeastOnce).await });
    let first = peer.recv_message().await;
    let second = peer.recv_message().await;
    assert!(second.dup);
    match within(send).await.unwrap() {
        Err(DeviceError::AckTimeout { msgid, attempts: 2 }) => assert_eq!(msgid, first.msgid),
        other => panic!("expected AckTimeout, got {other:?}"),
    }
}

#[tokio::test]
async fn qos2_completes_after_rec_rel_comp() {
    let gw = Gateway::bind().await;
    let (client, _events, mut peer) = connected(&gw, opts(&gw)).await;
    let send =
        tokio::spawn(async move { client.send_status(json!({"x": 1}), Qos::ExactlyOnce).await });
    let env = peer.recv_message().await;
    assert_eq!(env.qos, Qos::ExactlyOnce);
    peer.handshake(HandshakeKind::Rec, &env.msgid, None).await;
    let rel = peer.recv_handshake().await;
    assert_eq!((rel.kind, &rel.msgid), (HandshakeKind::Rel, &env.msgid));
    assert!(!send.is_finished(), "QoS 2 waits for comp");
    peer.handshake(HandshakeKind::Comp, &env.msgid, None).await;
    assert_eq!(within(send).await.unwrap().unwrap(), env.msgid);
}

#[tokio::test]
async fn qos1_command_is_answered_with_result_and_error() {
    let gw = Gateway::bind().await;
    let (_client, mut events, mut peer) = connected(&gw, opts(&gw)).await;
    peer.send(&command("cmd-1", Qos::AtLeastOnce, false)).await;
    let cmd = expect_command(&mut events).await;
    assert_eq!(cmd.msgid.as_str(), "cmd-1");
    assert_eq!(cmd.qos, Qos::AtLeastOnce);
    assert_eq!(cmd.payload, json!({"action": "reboot"}));
    within(cmd.respond(Some(json!({"rebooted": true}))))
        .await
        .unwrap();
    let ack = peer.recv_handshake().await;
    assert_eq!(ack.kind, HandshakeKind::Ack);
    assert_eq!(ack.msgid.as_str(), "cmd-1");
    assert_eq!(ack.payload, Some(json!({"result": {"rebooted": true}})));

    peer.send(&command("cmd-2", Qos::AtLeastOnce, false)).await;
    let cmd = expect_command(&mut events).await;
    within(cmd.respond_error(json!("unsupported")))
        .await
        .unwrap();
    let ack = peer.recv_handshake().await;
    assert_eq!(ack.payload, Some(json!({"error": "unsupported"})));
}

#[tokio::test]
async fn qos2_command_gets_rec_with_result_then_comp_on_rel() {
    let gw = Gateway::bind().await;
    let (_client, mut events, mut peer) = connected(&gw, opts(&gw)).await;
    peer.send(&command("cmd-q2", Qos::ExactlyOnce, false)).await;
    let cmd = expect_command(&mut events).await;
    assert_eq!(cmd.qos, Qos::ExactlyOnce);
    within(cmd.respond(Some(json!(42)))).await.unwrap();
    let rec = peer.recv_handshake().await;
    assert_eq!(rec.kind, HandshakeKind::Rec);
    assert_eq!(rec.payload, Some(json!({"result": 42})));
    peer.handshake(HandshakeKind::Rel, &rec.msgid, None).await;
    let comp = peer.recv_handshake().await;
    assert_eq!(
        (comp.kind, comp.msgid.as_str()),
        (HandshakeKind::Comp, "cmd-q2")
    );
    // A repeated rel (our comp was lost) is answered again.
    peer.handshake(HandshakeKind::Rel, &rec.msgid, None).await;
    assert_eq!(peer.recv_handshake().await.kind, HandshakeKind::Comp);
}

#[tokio::test]
async fn redelivered_commands_are_answered_from_cache_not_surfaced() {
    let gw = Gateway::bind().await;
    let (_client, mut events, mut peer) = connected(&gw, opts(&gw)).await;

    // Redelivery while the app still works on it: ignored, answered once.
    peer.send(&command("cmd-a", Qos::AtLeastOnce, false)).await;
    let cmd = expect_command(&mut events).await;
    peer.send(&command("cmd-a", Qos::AtLeastOnce, true)).await;
    // Frames are handled in order: once the probe surfaces, the redelivery was handled.
    peer.send(&command("probe", Qos::AtMostOnce, false)).await;
    assert_eq!(expect_command(&mut events).await.msgid.as_str(), "probe");
    within(cmd.respond(Some(json!("done")))).await.unwrap();
    let ack = peer.recv_handshake().await;
    assert_eq!(ack.payload, Some(json!({"result": "done"})));

    // Redelivery after the answer: the stored answer goes out again.
    peer.send(&command("cmd-a", Qos::AtLeastOnce, true)).await;
    let again = peer.recv_handshake().await;
    assert_eq!(
        (again.kind, again.msgid.as_str()),
        (HandshakeKind::Ack, "cmd-a")
    );
    assert_eq!(again.payload, Some(json!({"result": "done"})));

    // QoS 2: the stored rec goes out again.
    peer.send(&command("cmd-b", Qos::ExactlyOnce, false)).await;
    let cmd = expect_command(&mut events).await;
    within(cmd.respond(None)).await.unwrap();
    assert_eq!(peer.recv_handshake().await.kind, HandshakeKind::Rec);
    peer.send(&command("cmd-b", Qos::ExactlyOnce, true)).await;
    let rec = peer.recv_handshake().await;
    assert_eq!(
        (rec.kind, rec.msgid.as_str(), rec.payload),
        (HandshakeKind::Rec, "cmd-b", None)
    );

    // The loop answered each redelivery before reading on, so nothing else is queued.
    assert!(matches!(
        events.try_recv(),
        Err(mpsc::error::TryRecvError::Empty)
    ));
}

#[tokio::test]
async fn unacked_qos1_is_resent_with_dup_and_same_msgid_after_reconnect() {
    let gw = Gateway::bind().await;
    let (client, mut events, mut peer) = connected(&gw, opts(&gw)).await;
    let send =
        tokio::spawn(async move { client.send_status(json!({"v": 7}), Qos::AtLeastOnce).await });
    let first = peer.recv_message().await;
    drop(peer); // the gateway vanishes without a close frame

    match next_event(&mut events).await {
        DeviceEvent::Disconnected {
            code: None,
            reconnect_in: Some(_),
            ..
        } => {}
        other => panic!("expected Disconnected, got {other:?}"),
    }
    let mut peer = gw.accept_authed("sess-2").await;
    match next_event(&mut events).await {
        DeviceEvent::Connected {
            session_id,
            reconnects: 1,
            ..
        } => assert_eq!(session_id, "sess-2"),
        other => panic!("expected Connected, got {other:?}"),
    }
    let resent = peer.recv_message().await;
    assert!(resent.dup);
    assert_eq!(resent.msgid, first.msgid);
    assert_eq!(resent.payload, json!({"v": 7}));
    peer.handshake(HandshakeKind::Ack, &first.msgid, None).await;
    assert_eq!(within(send).await.unwrap().unwrap(), first.msgid);
}

#[tokio::test]
async fn qos2_after_rec_resends_rel_after_reconnect() {
    let gw = Gateway::bind().await;
    let (client, _events, mut peer) = connected(&gw, opts(&gw)).await;
    let send = tokio::spawn(async move { client.send_event(json!({}), Qos::ExactlyOnce).await });
    let env = peer.recv_message().await;
    peer.handshake(HandshakeKind::Rec, &env.msgid, None).await;
    assert_eq!(peer.recv_handshake().await.kind, HandshakeKind::Rel);
    peer.close(1011, "oops").await;

    let mut peer = gw.accept_authed("sess-2").await;
    let rel = peer.recv_handshake().await;
    assert_eq!((rel.kind, &rel.msgid), (HandshakeKind::Rel, &env.msgid));
    peer.handshake(HandshakeKind::Comp, &env.msgid, None).await;
    assert_eq!(within(send).await.unwrap().unwrap(), env.msgid);
}

#[tokio::test]
async fn messages_sent_while_offline_go_out_after_reconnect() {
    let gw = Gateway::bind().await;
    let (client, mut events, mut peer) = connected(&gw, opts(&gw)).await;
    peer.close(1012, "draining; retry-after=200").await;
    assert!(matches!(
        next_event(&mut events).await,
        DeviceEvent::Disconnected { .. }
    ));
    let send = tokio::spawn(async move {
        client
            .send_status(json!({"offline": 1}), Qos::AtLeastOnce)
            .await
    });
    let mut peer = gw.accept_authed("sess-2").await;
    let env = peer.recv_message().await;
    assert!(!env.dup, "never sent before, so not a duplicate");
    peer.handshake(HandshakeKind::Ack, &env.msgid, None).await;
    within(send).await.unwrap().unwrap();
}

#[tokio::test]
async fn retry_after_in_close_reason_is_honoured() {
    let gw = Gateway::bind().await;
    let (_client, mut events, mut peer) = connected(&gw, opts(&gw)).await;
    let closed_at = Instant::now();
    peer.close(1012, "node draining; retry-after=400").await;
    match next_event(&mut events).await {
        DeviceEvent::Disconnected {
            code: Some(1012),
            reconnect_in,
            ..
        } => {
            assert_eq!(reconnect_in, Some(Duration::from_millis(400)));
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    let _peer = gw.accept_authed("sess-2").await;
    let waited = closed_at.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "reconnected after {waited:?}"
    );
    assert!(matches!(
        next_event(&mut events).await,
        DeviceEvent::Connected { reconnects: 1, .. }
    ));
}

#[tokio::test]
async fn auth_failure_is_final() {
    let gw = Gateway::bind().await;
    let (client, mut events) = Device::connect(opts(&gw)).unwrap();
    let mut peer = gw.accept().await;
    peer.send(&Frame::AuthResponse(AuthResponse::Error {
        timestamp: 1,
        reason: "bad token".into(),
    }))
    .await;
    peer.close(4403, "authentication failed").await;
    match next_event(&mut events).await {
        DeviceEvent::AuthFailed { reason } => assert_eq!(reason, "bad token"),
        other => panic!("expected AuthFailed, got {other:?}"),
    }
    assert!(
        within(events.recv()).await.is_none(),
        "event channel closes after a final event"
    );
    assert!(
        !gw.connection_within(Duration::from_millis(300)).await,
        "must not reconnect"
    );
    assert_eq!(client.state(), LinkState::Stopped);
    assert!(matches!(
        within(client.send_status(json!({}), Qos::AtMostOnce)).await,
        Err(DeviceError::Stopped)
    ));
}

#[tokio::test]
async fn close_4403_mid_session_and_4409_are_final() {
    for code in [4403u16, 4409, 4410] {
        let gw = Gateway::bind().await;
        let (client, mut events, mut peer) = connected(&gw, opts(&gw)).await;
        peer.close(code, "bye").await;
        match next_event(&mut events).await {
            DeviceEvent::Disconnected {
                code: c,
                reconnect_in: None,
                ..
            } => assert_eq!(c, Some(code)),
            other => panic!("{code}: expected final Disconnected, got {other:?}"),
        }
        assert!(within(events.recv()).await.is_none());
        assert!(
            !gw.connection_within(Duration::from_millis(200)).await,
            "{code}: reconnected"
        );
        assert!(within(client.wait_connected()).await.is_err());
    }
}

#[tokio::test]
async fn replaced_reconnects_when_configured() {
    let gw = Gateway::bind().await;
    let mut o = opts(&gw);
    o.reconnect_on_replaced = true;
    let (_client, mut events, mut peer) = connected(&gw, o).await;
    peer.close(4409, "replaced").await;
    assert!(matches!(
        next_event(&mut events).await,
        DeviceEvent::Disconnected {
            code: Some(4409),
            reconnect_in: Some(_),
            ..
        }
    ));
    let _peer = gw.accept_authed("sess-2").await;
    assert!(matches!(
        next_event(&mut events).await,
        DeviceEvent::Connected { reconnects: 1, .. }
    ));
}

#[tokio::test]
async fn error_frame_fails_the_send_and_is_reported() {
    let gw = Gateway::bind().await;
    let (client, mut events, mut peer) = connected(&gw, opts(&gw)).await;
    let send = tokio::spawn(async move { client.send_status(json!({}), Qos::AtLeastOnce).await });
    let env = peer.recv_message().await;
    let err = ErrorFrame {
        msgid: Some(env.msgid.clone()),
        code: ErrorCode::ClockSkew,
        message: "skew".into(),
    };
    peer.send(&Frame::Error(err.clone())).await;
    match within(send).await.unwrap() {
        Err(DeviceError::Refused {
            msgid,
            code: Some(ErrorCode::ClockSkew),
            ..
        }) => {
            assert_eq!(msgid, env.msgid);
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    match next_event(&mut events).await {
        DeviceEvent::Error(e) => assert_eq!(*e, err),
        other => panic!("expected Error, got {other:?}"),
    }
}

#[tokio::test]
async fn batch_carries_item_envelopes() {
    let gw = Gateway::bind().await;
    let (client, _events, mut peer) = connected(&gw, opts(&gw)).await;
    let items = vec![
        BatchItem::status(json!({"t": 1})),
        BatchItem::event(json!({"alarm": "hot"})),
    ];
    let send = tokio::spawn(async move { client.send_batch(items, Qos::AtLeastOnce).await });
    let env = peer.recv_message().await;
    assert_eq!(env.kind, MessageKind::Batch);
    let items = env.payload["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let first = fleetgate_protocol::json::envelope_from_value(&items[0], DEVICE).unwrap();
    let second = fleetgate_protocol::json::envelope_from_value(&items[1], DEVICE).unwrap();
    assert_eq!(
        (first.kind, second.kind),
        (MessageKind::Status, MessageKind::Event)
    );
    assert_eq!(first.from, DEVICE);
    assert_ne!(first.msgid, second.msgid);
    assert_ne!(first.msgid, env.msgid);
    peer.handshake(HandshakeKind::Ack, &env.msgid, None).await;
    assert_eq!(within(send).await.unwrap().unwrap(), env.msgid);
}

#[tokio::test]
async fn protobuf_codec_uses_binary_frames() {
    let gw = Gateway::bind().await;
    let (client, _events, mut peer) = connected(&gw, opts(&gw).with_codec(Codec::Protobuf)).await;
    assert_eq!(
        peer.header("sec-websocket-protocol"),
        Some("fleetgate.v1.proto")
    );
    let send =
        tokio::spawn(async move { client.send_status(json!({"p": 1}), Qos::AtLeastOnce).await });
    let env = peer.recv_message().await;
    assert_eq!(env.payload, json!({"p": 1}));
    peer.handshake(HandshakeKind::Ack, &env.msgid, None).await;
    within(send).await.unwrap().unwrap();
}

#[tokio::test]
async fn keepalive_pings_and_pongs_keep_the_link_up() {
    let gw = Gateway::bind().await;
    let mut o = opts(&gw);
    o.keepalive = Duration::from_millis(50);
    let (client, mut events, mut peer) = connected(&gw, o).await;
    // Reading answers the pings with pongs, which the device counts as activity.
    within(peer.wait_pings(5)).await;
    within(client.send_status(json!({}), Qos::AtMostOnce))
        .await
        .unwrap();
    peer.recv_message().await;
    assert!(
        matches!(events.try_recv(), Err(mpsc::error::TryRecvError::Empty)),
        "no disconnect"
    );
}

#[tokio::test]
async fn silent_gateway_is_detected_by_keepalive() {
    let gw = Gateway::bind().await;
    let mut o = opts(&gw);
    o.keepalive = Duration::from_millis(50);
    let (_client, mut events, _silent_peer) = connected(&gw, o).await;
    match next_event(&mut events).await {
        DeviceEvent::Disconnected {
            code: None,
            reason,
            reconnect_in: Some(_),
        } => {
            assert!(reason.contains("keepalive"), "{reason}");
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    let _peer = gw.accept_authed("sess-2").await;
    assert!(matches!(
        next_event(&mut events).await,
        DeviceEvent::Connected { reconnects: 1, .. }
    ));
}

#[tokio::test]
async fn disconnect_closes_with_1000_and_stops() {
    let gw = Gateway::bind().await;
    let (client, mut events, mut peer) = connected(&gw, opts(&gw)).await;
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { client.send_status(json!({}), Qos::AtLeastOnce).await })
    };
    peer.recv_message().await;
    let closer = tokio::spawn({
        let client = client.clone();
        async move { client.disconnect().await }
    });
    assert_eq!(peer.expect_close().await, Some(1000));
    within(closer).await.unwrap();
    assert!(matches!(
        within(pending).await.unwrap(),
        Err(DeviceError::Stopped)
    ));
    assert!(matches!(
        next_event(&mut events).await,
        DeviceEvent::Disconnected {
            code: Some(1000),
            reconnect_in: None,
            ..
        }
    ));
    assert!(within(events.recv()).await.is_none());
}

#[tokio::test]
async fn dropping_every_client_stops_the_loop() {
    let gw = Gateway::bind().await;
    let (client, mut events, mut peer) = connected(&gw, opts(&gw)).await;
    drop(client);
    assert_eq!(peer.expect_close().await, Some(1000));
    let _ = next_event(&mut events).await;
    assert!(within(events.recv()).await.is_none());
}

#[tokio::test]
async fn connection_drives_raw_frames_and_reports_close_code() {
    let gw = Gateway::bind().await;
    let o = opts(&gw).with_auth(AuthMode::FirstFrame);
    let server = async {
        let mut peer = gw.accept().await;
        assert!(matches!(peer.recv().await, Frame::Auth(_)));
        peer.auth_ok("raw").await;
        let env = peer.recv_message().await;
        peer.handshake(HandshakeKind::Ack, &env.msgid, None).await;
        peer.close(4409, "replaced by a newer connection").await;
    };
    let client = async {
        let mut conn = within(Connection::connect(&o)).await.unwrap();
        assert_eq!(conn.session().unwrap().session_id, "raw");
        let msg = Envelope {
            ver: "1.0".into(),
            msgid: MsgId::new("raw-1").unwrap(),
            timestamp: fleetgate_now(),
            from: DEVICE.into(),
            to: "server".into(),
            kind: MessageKind::Status,
            payload: json!({}),
            qos: Qos::AtLeastOnce,
            retain: false,
            dup: false,
            sig: None,
        };
        conn.send_frame(&Frame::Message(msg)).await.unwrap();
        match within(conn.recv_frame()).await.unwrap() {
            Frame::Handshake(h) => assert_eq!(h.msgid.as_str(), "raw-1"),
            other => panic!("expected ack, got {other:?}"),
        }
        let err = within(conn.recv_frame()).await.unwrap_err();
        assert_eq!(err.close_code(), Some(4409));
        assert_eq!(conn.close_code(), Some(4409));
        assert_eq!(conn.close_reason(), Some("replaced by a newer connection"));
    };
    tokio::join!(server, client);
}

#[tokio::test]
async fn connection_reports_auth_failure() {
    let gw = Gateway::bind().await;
    let o = opts(&gw);
    let server = async {
        let mut peer = gw.accept().await;
        peer.close(4403, "unknown device").await;
    };
    let client = async {
        match within(Connection::connect(&o)).await {
            Err(DeviceError::AuthFailed { reason }) => assert_eq!(reason, "unknown device"),
            other => panic!("expected AuthFailed, got {other:?}"),
        }
    };
    tokio::join!(server, client);
}

#[tokio::test]
async fn bind_addr_is_the_local_address_of_the_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/device", listener.local_addr().unwrap());
    let mut o = DeviceOptions::new(url, DEVICE, TOKEN);
    // Linux loopback answers the whole of 127/8.
    let from = IpAddr::from([127, 0, 0, 2]);
    o.bind_addr = Some(from);
    let open = tokio::spawn(async move { Connection::open(&o).await });
    let (tcp, peer) = within(listener.accept()).await.unwrap();
    assert_eq!(peer.ip(), from);
    // The listener speaks no HTTP: the upgrade fails once the socket is gone.
    drop(tcp);
    let result = within(open).await.unwrap();
    assert!(result.is_err(), "upgrade against a bare socket: {result:?}");
}

#[tokio::test]
async fn a_session_works_over_a_bound_socket() {
    let gw = Gateway::bind().await;
    let mut o = opts(&gw);
    o.bind_addr = Some(IpAddr::from([127, 0, 0, 3]));
    let (client, _events, mut peer) = connected(&gw, o).await;
    let id = within(client.send_status(json!({"temp": 21.5}), Qos::AtMostOnce))
        .await
        .unwrap();
    let env = peer.recv_message().await;
    assert_eq!(env.msgid, id);
    assert_eq!(env.payload, json!({"temp": 21.5}));
}

fn fleetgate_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
