//! Server -> device commands through the admin API: every QoS, results, queueing while
//! offline, order, retransmits, failure reports.

use serde_json::json;

use crate::support::{Node, Raw};

#[tokio::test]
async fn qos0_command_reaches_an_online_device_and_an_offline_one_gets_409() {
    let node = Node::start(&[]).await;
    let secret = node.provision("c0").await;
    let (status, body) = node
        .admin(
            "POST",
            "/v1/devices/c0/commands",
            Some(json!({"payload":{"x":1},"qos":0})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("device_offline"))
    );
    let mut raw = Raw::authed(&node.device_url(), "c0", &secret).await;
    let (status, body) = node
        .admin(
            "POST",
            "/v1/devices/c0/commands",
            Some(json!({"payload":{"x":2},"qos":0})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let cmd = raw.recv().await;
    assert_eq!(
        (
            cmd["type"].as_str(),
            cmd["qos"].as_u64(),
            cmd["to"].as_str()
        ),
        (Some("command"), Some(0), Some("c0"))
    );
    assert_eq!(cmd["payload"], json!({"x": 2}));
    assert_eq!(cmd["msgid"], body["msgid"]);
}

#[tokio::test]
async fn qos1_command_with_wait_returns_the_devices_result() {
    let node = Node::start(&[]).await;
    let secret = node.provision("c1").await;
    let mut raw = Raw::authed(&node.device_url(), "c1", &secret).await;
    let call = node.command_in_background(
        "c1",
        json!({"payload":{"action":"on"},"qos":1,"waitMs":5000}),
    );
    let cmd = raw.recv().await;
    assert_eq!(
        (cmd["type"].as_str(), cmd["qos"].as_u64()),
        (Some("command"), Some(1))
    );
    raw.send(json!({"type":"ack","msgid":cmd["msgid"],"payload":{"result":{"state":"on"}}}))
        .await;
    let (status, body) = call.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"msgid": cmd["msgid"], "result": {"state": "on"}})
    );
}

#[tokio::test]
async fn an_ack_carrying_an_error_answers_200_with_the_error() {
    let node = Node::start(&[]).await;
    let secret = node.provision("c1e").await;
    let mut raw = Raw::authed(&node.device_url(), "c1e", &secret).await;
    let call = node.command_in_background("c1e", json!({"payload":{"action":"fly"},"waitMs":5000}));
    let cmd = raw.recv().await;
    raw.send(json!({"type":"ack","msgid":cmd["msgid"],"payload":{"error":"unsupported"}}))
        .await;
    let (status, body) = call.await.unwrap();
    assert_eq!(
        (status, body),
        (200, json!({"msgid": cmd["msgid"], "error": "unsupported"}))
    );
}

#[tokio::test]
async fn qos2_command_runs_rec_rel_comp_with_the_result_on_rec() {
    let node = Node::start(&[]).await;
    let secret = node.provision("c2").await;
    let mut raw = Raw::authed(&node.device_url(), "c2", &secret).await;
    let call =
        node.command_in_background("c2", json!({"payload":{"dose":5},"qos":2,"waitMs":5000}));
    let cmd = raw.recv().await;
    assert_eq!(cmd["qos"], 2);
    raw.send(json!({"type":"rec","msgid":cmd["msgid"],"payload":{"result":{"dosed":5}}}))
        .await;
    assert_eq!(raw.recv().await, json!({"type":"rel","msgid":cmd["msgid"]}));
    raw.send(json!({"type":"comp","msgid":cmd["msgid"]})).await;
    let (status, body) = call.await.unwrap();
    assert_eq!(
        (status, body),
        (200, json!({"msgid": cmd["msgid"], "result": {"dosed": 5}}))
    );
}

#[tokio::test]
async fn qos2_command_without_a_result_answers_on_comp() {
    let node = Node::start(&[]).await;
    let secret = node.provision("c2n").await;
    let mut raw = Raw::authed(&node.device_url(), "c2n", &secret).await;
    let call = node.command_in_background("c2n", json!({"payload":{},"qos":2,"waitMs":5000}));
    let cmd = raw.recv().await;
    raw.send(json!({"type":"rec","msgid":cmd["msgid"]})).await;
    assert_eq!(raw.recv().await["type"], "rel");
    raw.send(json!({"type":"comp","msgid":cmd["msgid"]})).await;
    let (status, body) = call.await.unwrap();
    assert_eq!(
        (status, body),
        (200, json!({"msgid": cmd["msgid"], "result": null}))
    );
}

#[tokio::test]
async fn commands_queued_offline_are_delivered_in_order_on_connect() {
    let node = Node::start(&[]).await;
    let secret = node.provision("off-1").await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let (status, body) = node
            .admin(
                "POST",
                "/v1/devices/off-1/commands",
                Some(json!({"payload":{"seq":i},"qos":1 + (i % 2)})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        sent.push(body["msgid"].as_str().unwrap().to_owned());
    }
    let mut raw = Raw::authed(&node.device_url(), "off-1", &secret).await;
    let mut got = Vec::new();
    for i in 0..5 {
        let cmd = raw.recv().await;
        assert_eq!(cmd["payload"]["seq"], i, "in order");
        got.push(cmd["msgid"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, sent);
}

#[tokio::test]
async fn an_unacked_command_is_retransmitted_with_dup_and_the_same_msgid() {
    let node = Node::start(&[
        ("FLEETGATE_ACK_TIMEOUT_MS", "200"),
        ("FLEETGATE_MAX_ATTEMPTS", "5"),
    ])
    .await;
    let secret = node.provision("rt").await;
    let mut raw = Raw::authed(&node.device_url(), "rt", &secret).await;
    let call = node.command_in_background("rt", json!({"payload":{"go":1},"waitMs":10000}));
    let first = raw.recv().await;
    assert_eq!(first.get("dup"), None, "first send is not a duplicate");
    let again = raw.recv().await;
    assert_eq!(again["msgid"], first["msgid"]);
    assert_eq!(again["dup"], true);
    raw.send(json!({"type":"ack","msgid":first["msgid"],"payload":{"result":1}}))
        .await;
    assert_eq!(
        call.await.unwrap(),
        (200, json!({"msgid": first["msgid"], "result": 1}))
    );
}

#[tokio::test]
async fn a_command_never_acked_fails_after_max_attempts_and_is_reported() {
    let node = Node::start(&[
        ("FLEETGATE_ACK_TIMEOUT_MS", "100"),
        ("FLEETGATE_MAX_ATTEMPTS", "3"),
    ])
    .await;
    let secret = node.provision("dead").await;
    let mut raw = Raw::authed(&node.device_url(), "dead", &secret).await;
    let call = node.command_in_background("dead", json!({"payload":{},"waitMs":10000}));
    let mut sends = 0;
    let msgid = raw.recv().await["msgid"].clone();
    sends += 1;
    let (status, body) = call.await.unwrap();
    assert_eq!(status, 504);
    assert_eq!(body["error"]["code"], "attempts_exhausted");
    assert_eq!(body["error"]["msgid"], msgid);
    // Count the retransmissions that reached the device before the failure.
    while let Ok(Ok(f)) =
        tokio::time::timeout(std::time::Duration::from_millis(50), raw.next()).await
    {
        assert_eq!(f["msgid"], msgid);
        sends += 1;
    }
    assert_eq!(sends, 3, "exactly max_attempts deliveries");
}

#[tokio::test]
async fn a_command_that_outlives_its_ttl_is_reported_expired() {
    let node = Node::start(&[]).await;
    node.provision("ttl").await;
    let call = node.command_in_background("ttl", json!({"payload":{},"ttlMs":200,"waitMs":5000}));
    let (status, body) = call.await.unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("expired"))
    );
}

#[tokio::test]
async fn waiting_longer_than_the_device_takes_answers_504_timeout_and_keeps_the_command() {
    let node = Node::start(&[]).await;
    node.provision("slow").await;
    let (status, body) = node
        .admin(
            "POST",
            "/v1/devices/slow/commands",
            Some(json!({"payload":{},"waitMs":200})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("timeout"))
    );
    assert!(body["error"]["msgid"].is_string());
}

#[tokio::test]
async fn a_burst_of_commands_to_one_device_is_delivered_whole_without_dropping_it() {
    let node = Node::start(&[]).await;
    let secret = node.provision("burst").await;
    let mut raw = Raw::authed(&node.device_url(), "burst", &secret).await;
    const N: usize = 300;
    let calls: Vec<_> = (0..N)
        .map(|i| node.command_in_background("burst", json!({"payload": {"i": i}, "qos": 1})))
        .collect();
    let mut queued = std::collections::HashSet::new();
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 202, "{body}");
        queued.insert(body["msgid"].as_str().unwrap().to_owned());
    }
    let mut delivered = std::collections::HashSet::new();
    let mut first_sends = 0;
    while delivered.len() < N {
        let cmd = raw.recv().await;
        assert_eq!(cmd["type"], "command", "{cmd}");
        raw.send(json!({"type":"ack","msgid":cmd["msgid"]})).await;
        delivered.insert(cmd["msgid"].as_str().unwrap().to_owned());
        if cmd["dup"] != true {
            first_sends += 1;
        }
    }
    assert_eq!(delivered, queued, "every command, and only those");
    assert_eq!(
        first_sends, N,
        "each sent once (only retransmits carry dup)"
    );
}
