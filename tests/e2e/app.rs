//! `/v1/app`: dashboards subscribing to channels, on one node and across two nodes on
//! Redis; recovery by offset; scope; slow clients; limits.

use fleetgate_test_support::RedisServer;
use serde_json::{Value, json};

use crate::support::{API_KEY, Node, Raw, eventually, status};

const PASSWORD: &str = "correct horse battery staple";

fn app_url(node: &Node) -> String {
    format!("ws://{}/v1/app", node.gateway)
}

/// An app socket authenticated by header with `key`.
async fn app(node: &Node, key: &str) -> Raw {
    Raw::connect(
        &app_url(node),
        &[("Authorization", &format!("Bearer {key}"))],
    )
    .await
}

async fn subscribe(app: &mut Raw, channel: &str, extra: Value) -> Value {
    let mut frame = json!({"type": "subscribe", "channel": channel, "id": channel});
    for (k, v) in extra.as_object().unwrap() {
        frame[k] = v.clone();
    }
    app.send(frame).await;
    app.recv().await
}

/// Sends `n` QoS 1 statuses numbered from `from` and waits for each ack.
async fn report(device: &mut Raw, id: &str, from: u64, n: u64) {
    for i in from..from + n {
        device
            .send(status(id, &format!("m{i}"), 1, json!({"n": i})))
            .await;
        let ack = device.recv().await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
}

/// The next `n` frames, each a `message` on `channel` with consecutive offsets from
/// `first` carrying statuses numbered from `from`.
async fn expect_messages(app: &mut Raw, channel: &str, first: u64, from: u64, n: u64) {
    for i in 0..n {
        let m = app.recv().await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["channel"], channel);
        assert_eq!(m["offset"], first + i, "{m}");
        assert_eq!(m["data"]["payload"]["n"], from + i, "{m}");
        assert_eq!(m["data"]["msgid"], format!("m{}", from + i));
    }
}

/// A viewer (or other role) scoped to `groups`, logged in: its token.
async fn user_token(node: &Node, name: &str, role: &str, groups: &[&str]) -> String {
    let (s, b) = node
        .admin(
            "POST",
            "/v1/users",
            Some(json!({"username": name, "password": PASSWORD, "role": role, "groups": groups})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = node
        .admin_with_key(
            "POST",
            "/v1/auth/login",
            Some(json!({"username": name, "password": PASSWORD})),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    b["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_app_receives_every_status_of_a_device_with_consecutive_offsets() {
    let node = Node::start(&[]).await;
    let secret = node.provision_in("app-d1", &["farm-a"]).await;
    let mut device = Raw::authed(&node.device_url(), "app-d1", &secret).await;
    let mut dash = app(&node, API_KEY).await;
    let sub = subscribe(&mut dash, "device:app-d1", json!({})).await;
    assert_eq!(sub["type"], "subscribed", "{sub}");
    assert_eq!(sub["id"], "device:app-d1");
    let start = sub["offset"].as_u64().unwrap();
    let mut group = app(&node, API_KEY).await;
    let gsub = subscribe(&mut group, "group:farm-a", json!({})).await;
    assert_eq!(gsub["type"], "subscribed", "{gsub}");
    let gstart = gsub["offset"].as_u64().unwrap();
    report(&mut device, "app-d1", 0, 50).await;
    expect_messages(&mut dash, "device:app-d1", start + 1, 0, 50).await;
    expect_messages(&mut group, "group:farm-a", gstart + 1, 0, 50).await;
    // Unsubscribed, nothing more arrives: the next frame is the answer to a later request.
    dash.send(json!({"type": "unsubscribe", "channel": "device:app-d1", "id": "u"}))
        .await;
    assert_eq!(
        dash.recv().await,
        json!({"type": "unsubscribed", "channel": "device:app-d1", "id": "u"})
    );
    report(&mut device, "app-d1", 50, 3).await;
    dash.send(json!({"type": "unsubscribe", "channel": "device:app-d1", "id": "again"}))
        .await;
    let again = dash.recv().await;
    assert_eq!(
        (again["type"].as_str(), again["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    let (_, metrics) = node.internal_get("/metrics").await;
    assert!(metrics.contains("fleetgate_app_sessions 2"), "{metrics}");
}

#[tokio::test]
async fn a_retained_value_comes_first_and_presence_follows_devices() {
    let node = Node::start(&[]).await;
    let secret = node.provision_in("app-ret", &["farm-r"]).await;
    let mut device = Raw::authed(&node.device_url(), "app-ret", &secret).await;
    let mut retained = status("app-ret", "r1", 1, json!({"mode": "eco"}));
    retained["retain"] = json!(true);
    device.send(retained).await;
    assert_eq!(device.recv().await["type"], "ack");
    let mut dash = app(&node, API_KEY).await;
    assert_eq!(
        subscribe(&mut dash, "device:app-ret", json!({})).await["type"],
        "subscribed"
    );
    let first = dash.recv().await;
    assert_eq!(first["retained"], true, "{first}");
    assert_eq!(first["data"]["payload"], json!({"mode": "eco"}));
    assert!(first.get("offset").is_none());

    assert_eq!(
        subscribe(&mut dash, "presence:farm-r", json!({})).await["type"],
        "subscribed"
    );
    drop(device);
    let off = dash.recv().await;
    assert_eq!(off["channel"], "presence:farm-r", "{off}");
    assert_eq!(
        (
            off["data"]["device"].as_str(),
            off["data"]["online"].as_bool()
        ),
        (Some("app-ret"), Some(false))
    );
    let _device = Raw::authed(&node.device_url(), "app-ret", &secret).await;
    let on = dash.recv().await;
    assert_eq!(on["data"]["online"], true, "{on}");
    assert_eq!(on["offset"], off["offset"].as_u64().unwrap() + 1);
}

#[tokio::test]
async fn first_frame_auth_works_and_bad_credentials_close_with_4403() {
    let node = Node::start(&[]).await;
    let mut dash = Raw::connect(&app_url(&node), &[]).await;
    dash.send(json!({"type": "auth", "token": API_KEY})).await;
    let ok = dash.recv().await;
    assert_eq!(
        (
            ok["type"].as_str(),
            ok["status"].as_str(),
            ok["role"].as_str()
        ),
        (Some("auth_response"), Some("success"), Some("admin"))
    );
    let mut bad = Raw::connect(&app_url(&node), &[]).await;
    bad.send(json!({"type": "auth", "token": "fg_nope"})).await;
    assert_eq!(bad.closed().await.code, 4403);
    let mut wrong = Raw::connect(&app_url(&node), &[]).await;
    wrong
        .send(json!({"type": "subscribe", "channel": "alerts"}))
        .await;
    assert_eq!(wrong.closed().await.code, 4400);
    let mut silent = Raw::connect(&app_url(&node), &[]).await;
    assert_eq!(silent.closed().await.code, 4408);
    assert_eq!(
        Raw::try_connect(&app_url(&node), &[("Authorization", "Bearer fg_nope")])
            .await
            .err(),
        Some(401)
    );
}

#[tokio::test]
async fn a_viewer_sees_only_its_groups() {
    let node = Node::start(&[]).await;
    node.provision_in("scope-a", &["farm-a"]).await;
    node.provision_in("scope-b", &["farm-b"]).await;
    let token = user_token(&node, "viewer-a", "viewer", &["farm-a"]).await;
    let mut dash = app(&node, &token).await;
    let code = |v: &Value| {
        (
            v["type"].as_str().map(str::to_owned),
            v["code"].as_str().map(str::to_owned),
        )
    };
    let e = |c: &str| (Some("error".to_owned()), Some(c.to_owned()));
    assert_eq!(
        code(&subscribe(&mut dash, "device:scope-b", json!({})).await),
        e("not_found")
    );
    assert_eq!(
        code(&subscribe(&mut dash, "device:nobody", json!({})).await),
        e("not_found")
    );
    assert_eq!(
        code(&subscribe(&mut dash, "group:farm-b", json!({})).await),
        e("forbidden")
    );
    assert_eq!(
        code(&subscribe(&mut dash, "presence:farm-b", json!({})).await),
        e("forbidden")
    );
    assert_eq!(
        code(&subscribe(&mut dash, "alerts", json!({})).await),
        e("forbidden")
    );
    assert_eq!(
        code(&subscribe(&mut dash, "weather:x", json!({})).await),
        e("bad_request")
    );
    for ok in ["device:scope-a", "group:farm-a", "presence:farm-a"] {
        assert_eq!(
            subscribe(&mut dash, ok, json!({})).await["type"],
            "subscribed",
            "{ok}"
        );
    }
    assert_eq!(
        code(&subscribe(&mut dash, "group:farm-a", json!({})).await),
        e("bad_request")
    );
    let auditor = user_token(&node, "auditor-a", "auditor", &["*"]).await;
    let mut audit = app(&node, &auditor).await;
    assert_eq!(
        code(&subscribe(&mut audit, "group:farm-a", json!({})).await),
        e("forbidden")
    );
    dash.send_text("{not json".into()).await;
    assert_eq!(code(&dash.recv().await), e("bad_request"));
}

#[tokio::test]
async fn an_app_that_comes_back_recovers_what_it_missed_or_hears_it_is_too_old() {
    let node = Node::start(&[("FLEETGATE_HISTORY_SIZE", "20")]).await;
    let secret = node.provision_in("rec-1", &["farm-a"]).await;
    let mut device = Raw::authed(&node.device_url(), "rec-1", &secret).await;
    let mut dash = app(&node, API_KEY).await;
    let sub = subscribe(&mut dash, "device:rec-1", json!({})).await;
    let (start, epoch) = (sub["offset"].as_u64().unwrap(), sub["epoch"].clone());
    report(&mut device, "rec-1", 0, 5).await;
    expect_messages(&mut dash, "device:rec-1", start + 1, 0, 5).await;
    drop(dash);
    report(&mut device, "rec-1", 5, 7).await;

    let mut back = app(&node, API_KEY).await;
    let sub = subscribe(
        &mut back,
        "device:rec-1",
        json!({"since": start + 5, "epoch": epoch}),
    )
    .await;
    assert_eq!(sub["type"], "subscribed", "{sub}");
    assert_eq!(
        (sub["offset"].as_u64(), sub["recovered"].as_u64()),
        (Some(start + 5), Some(7))
    );
    expect_messages(&mut back, "device:rec-1", start + 6, 5, 7).await;
    // Live frames follow the recovered ones without a gap or a duplicate.
    report(&mut device, "rec-1", 12, 2).await;
    expect_messages(&mut back, "device:rec-1", start + 13, 12, 2).await;

    let mut other = app(&node, API_KEY).await;
    let wrong_epoch = subscribe(
        &mut other,
        "device:rec-1",
        json!({"since": start + 5, "epoch": "nope"}),
    )
    .await;
    assert_eq!(wrong_epoch["code"], "gap_too_old", "{wrong_epoch}");
    report(&mut device, "rec-1", 14, 25).await;
    let too_old = subscribe(
        &mut other,
        "device:rec-1",
        json!({"since": start + 5, "epoch": epoch}),
    )
    .await;
    assert_eq!(too_old["code"], "gap_too_old", "{too_old}");
    // The refused subscribe left nothing behind: a plain one works.
    assert_eq!(
        subscribe(&mut other, "device:rec-1", json!({})).await["type"],
        "subscribed"
    );
}

#[tokio::test]
async fn a_slow_app_is_closed_with_4008_while_a_fast_one_gets_every_frame() {
    let node = Node::start(&[
        ("FLEETGATE_MAX_FRAME_BYTES", "16384"),
        ("FLEETGATE_APP_QUEUE_BYTES", "262144"),
        ("FLEETGATE_WRITE_TIMEOUT_MS", "500"),
        ("FLEETGATE_RATE_LIMIT_PER_SECOND", "100000"),
        ("FLEETGATE_RATE_LIMIT_BURST", "100000"),
    ])
    .await;
    let secret = node.provision_in("slow-src", &["farm-s"]).await;
    let mut device = Raw::authed(&node.device_url(), "slow-src", &secret).await;
    let mut fast = app(&node, API_KEY).await;
    let start = subscribe(&mut fast, "group:farm-s", json!({})).await["offset"]
        .as_u64()
        .unwrap();
    let mut slow = app(&node, API_KEY).await;
    assert_eq!(
        subscribe(&mut slow, "group:farm-s", json!({})).await["type"],
        "subscribed"
    );
    // The slow client reads nothing from here on; 3,000 frames of 8 KiB (24 MB) overrun
    // the socket buffers and its 256 KiB queue, so it is dropped. The device waits for each
    // ack, which paces it at what the node sustains; the fast client keeps up.
    const N: u64 = 3000;
    let blob = "x".repeat(8000);
    let reader = tokio::spawn(async move {
        for i in 0..N {
            let m = fast.recv().await;
            assert_eq!(m["offset"], start + 1 + i, "frame {i}");
        }
        fast
    });
    let send_all = async {
        for i in 0..N {
            device
                .send(status(
                    "slow-src",
                    &format!("s{i}"),
                    1,
                    json!({"n": i, "blob": blob}),
                ))
                .await;
            // QoS 1, each ack awaited: an unpaced QoS 0 sender outran the fast client's reader
            // on a loaded CI machine and had it dropped too.
            let ack = device.recv().await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
    };
    // Once dropped, the slow client reads again: its close frame waits behind what its
    // socket still holds, and the node keeps it only a few seconds (a client that never
    // reads again sees the connection end without one).
    let dropped_then_read = async {
        eventually("the slow client's overflow", || async {
            let (_, metrics) = node.internal_get("/metrics").await;
            metrics
                .contains("fleetgate_app_overflows_total 1")
                .then_some(())
        })
        .await;
        slow.closed().await
    };
    let ((), closed) = tokio::join!(send_all, dropped_then_read);
    let fast = reader.await.expect("the fast client got every frame");
    drop(fast);
    assert_eq!(closed.code, 4008, "{closed:?}");
    let (_, metrics) = node.internal_get("/metrics").await;
    assert!(
        metrics.contains("fleetgate_closes_total{code=\"4008\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn limits_on_subscriptions_and_connections_per_principal() {
    let node = Node::start(&[
        ("FLEETGATE_APP_MAX_SUBSCRIPTIONS", "2"),
        ("FLEETGATE_APP_MAX_CONNECTIONS_PER_PRINCIPAL", "2"),
    ])
    .await;
    let mut one = app(&node, API_KEY).await;
    let _two = app(&node, API_KEY).await;
    assert_eq!(
        Raw::try_connect(
            &app_url(&node),
            &[("Authorization", &format!("Bearer {API_KEY}"))]
        )
        .await
        .err(),
        Some(429)
    );
    let mut third = Raw::connect(&app_url(&node), &[]).await;
    third.send(json!({"type": "auth", "token": API_KEY})).await;
    assert_eq!(third.closed().await.code, 4429);
    for g in ["group:a", "group:b"] {
        assert_eq!(
            subscribe(&mut one, g, json!({})).await["type"],
            "subscribed"
        );
    }
    assert_eq!(
        subscribe(&mut one, "group:c", json!({})).await["code"],
        "too_many_subscriptions"
    );
    // A closed connection frees its slot.
    drop(one);
    eventually("a slot is free again", || async {
        Raw::try_connect(
            &app_url(&node),
            &[("Authorization", &format!("Bearer {API_KEY}"))],
        )
        .await
        .is_ok()
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_app_on_one_node_receives_a_device_on_another_through_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = Node::start(&[
        ("FLEETGATE_REDIS_URLS", url.as_str()),
        ("FLEETGATE_NODE_ID", "app-a"),
    ])
    .await;
    let b = Node::start(&[
        ("FLEETGATE_REDIS_URLS", url.as_str()),
        ("FLEETGATE_NODE_ID", "app-b"),
    ])
    .await;
    let secret = a.provision_in("x-app", &["farm-x"]).await;
    let mut device = Raw::authed(&a.device_url(), "x-app", &secret).await;
    let mut dash = app(&b, API_KEY).await;
    let mut twin = app(&b, API_KEY).await;
    let sub = subscribe(&mut dash, "device:x-app", json!({})).await;
    let (start, epoch) = (sub["offset"].as_u64().unwrap(), sub["epoch"].clone());
    assert_eq!(
        subscribe(&mut twin, "device:x-app", json!({})).await["offset"],
        start
    );
    report(&mut device, "x-app", 0, 100).await;
    expect_messages(&mut dash, "device:x-app", start + 1, 0, 100).await;
    expect_messages(&mut twin, "device:x-app", start + 1, 0, 100).await;
    // Two sessions, one channel: node B holds one bus subscription for both.
    let (_, metrics) = b.internal_get("/metrics").await;
    assert!(metrics.contains("fleetgate_app_channels 1"), "{metrics}");
    // Recovery works across nodes too: the app moves to node A.
    drop(dash);
    report(&mut device, "x-app", 100, 4).await;
    let mut moved = app(&a, API_KEY).await;
    let sub = subscribe(
        &mut moved,
        "device:x-app",
        json!({"since": start + 100, "epoch": epoch}),
    )
    .await;
    assert_eq!(sub["recovered"], 4, "{sub}");
    expect_messages(&mut moved, "device:x-app", start + 101, 100, 4).await;
    // A command from an app on node B reaches the device on node A, and its result comes back.
    let seen = crate::support::Seen::default();
    let _answering = crate::support::answering(device, false, seen.clone());
    twin.send(json!({"type": "command", "id": "x", "device": "x-app", "payload": {"go": 1}, "waitMs": 5000}))
        .await;
    let result = loop {
        let f = twin.recv().await;
        if f["type"] != "message" {
            break f;
        }
    };
    assert_eq!(
        (result["type"].as_str(), result["status"].as_str()),
        (Some("command_result"), Some("done")),
        "{result}"
    );
}

/// What `GET /v1/audit` holds for `actor`'s `command.send` calls: (stage, outcome, reason).
async fn command_audit(node: &Node, actor: &str) -> Vec<(String, Option<u64>, Option<String>)> {
    let (s, audit) = node
        .admin(
            "GET",
            &format!("/v1/audit?action=command.send&actor={actor}"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{audit}");
    audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["stage"].as_str().unwrap().to_owned(),
                e["outcome"].as_u64(),
                e["reason"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_operator_commands_a_device_over_the_app_socket_and_it_is_audited_as_over_rest() {
    let node = Node::start(&[]).await;
    let secret = node.provision_in("cmd-a", &["farm-a"]).await;
    node.provision_in("cmd-b", &["farm-b"]).await;
    let device = Raw::authed(&node.device_url(), "cmd-a", &secret).await;
    let seen = crate::support::Seen::default();
    let _answering = crate::support::answering(device, false, seen.clone());
    let operator = user_token(&node, "op-a", "operator", &["farm-a"]).await;
    let viewer = user_token(&node, "view-a", "viewer", &["farm-a"]).await;
    let mut op = app(&node, &operator).await;
    op.send(json!({"type": "command", "id": "c1", "device": "cmd-a", "payload": {"on": true}, "qos": 1, "waitMs": 5000}))
        .await;
    let result = op.recv().await;
    assert_eq!(
        (
            result["type"].as_str(),
            result["id"].as_str(),
            result["status"].as_str()
        ),
        (Some("command_result"), Some("c1"), Some("done")),
        "{result}"
    );
    let msgid = result["msgid"].as_str().unwrap().to_owned();
    assert!(
        result["result"].is_object(),
        "the device's result: {result}"
    );
    assert_eq!(
        seen.lock().unwrap().get(&msgid).map(|s| s.0),
        Some(1),
        "delivered once"
    );
    op.send(json!({"type": "command", "id": "c2", "device": "cmd-a", "payload": {}, "qos": 1}))
        .await;
    let queued = op.recv().await;
    assert_eq!(
        (queued["status"].as_str(), queued["id"].as_str()),
        (Some("queued"), Some("c2")),
        "{queued}"
    );
    op.send(json!({"type": "command", "id": "c3", "device": "cmd-b", "payload": {}}))
        .await;
    assert_eq!(op.recv().await["code"], "not_found");
    op.send(
        json!({"type": "command", "id": "c4", "device": "cmd-a", "payload": {}, "waitMs": 999999}),
    )
    .await;
    assert_eq!(op.recv().await["code"], "bad_request");
    let mut view = app(&node, &viewer).await;
    view.send(json!({"type": "command", "id": "v1", "device": "cmd-a", "payload": {}}))
        .await;
    let refused = view.recv().await;
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_str()),
        (Some("forbidden"), Some("v1"))
    );

    // Each command left a request entry, then a response entry with what REST would answer.
    let entries = command_audit(&node, "user:op-a").await;
    let pairs = |outcome: u64, reason: Option<&str>| {
        vec![
            ("request".to_owned(), None, None),
            (
                "response".to_owned(),
                Some(outcome),
                reason.map(str::to_owned),
            ),
        ]
    };
    let expected: Vec<_> = [
        pairs(200, None),
        pairs(202, None),
        pairs(404, Some("out_of_scope")),
        pairs(400, Some("bad_request")),
    ]
    .concat();
    assert_eq!(entries, expected);
    assert_eq!(
        command_audit(&node, "user:view-a").await,
        pairs(403, Some("forbidden"))
    );
    let (_, verify) = node.admin("GET", "/v1/audit/verify", None).await;
    assert_eq!(verify["ok"], true, "{verify}");
}
