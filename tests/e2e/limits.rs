//! Limits: capacity, frame size, rate, with their exact refusals.

use serde_json::json;

use crate::support::{Node, Raw, status};

#[tokio::test]
async fn past_max_connections_upgrades_get_503() {
    let node = Node::start(&[("FLEETGATE_MAX_CONNECTIONS", "2")]).await;
    let mut held = Vec::new();
    for i in 0..2 {
        let id = format!("cap-{i}");
        let secret = node.provision(&id).await;
        held.push(Raw::authed(&node.device_url(), &id, &secret).await);
    }
    assert_eq!(
        Raw::try_connect(&node.device_url(), &[]).await.err(),
        Some(503)
    );
    // A slot frees when a device leaves.
    drop(held.pop());
    let secret = node.provision("cap-late").await;
    crate::support::eventually("a free slot", || async {
        match Raw::try_connect(&node.device_url(), &[]).await {
            Ok(mut raw) => {
                raw.send(json!({"type":"auth","deviceId":"cap-late","token":secret}))
                    .await;
                Some(raw.recv().await)
            }
            Err(503) => None,
            Err(other) => panic!("unexpected {other}"),
        }
    })
    .await;
}

#[tokio::test]
async fn an_oversize_frame_closes_with_1009() {
    let node = Node::start(&[("FLEETGATE_MAX_FRAME_BYTES", "2048")]).await;
    let secret = node.provision("big").await;
    let mut raw = Raw::authed(&node.device_url(), "big", &secret).await;
    raw.send(status("big", "ok", 1, json!({"pad": "x".repeat(1000)})))
        .await;
    assert_eq!(raw.recv().await["type"], "ack", "under the limit is fine");
    raw.send(status("big", "huge", 1, json!({"pad": "x".repeat(4096)})))
        .await;
    assert_eq!(raw.closed().await.code, 1009);
}

#[tokio::test]
async fn a_device_over_its_rate_limit_is_closed_with_4429() {
    let node = Node::start(&[
        ("FLEETGATE_RATE_LIMIT_PER_SECOND", "5"),
        ("FLEETGATE_RATE_LIMIT_BURST", "10"),
    ])
    .await;
    let secret = node.provision("chatty").await;
    let mut raw = Raw::authed(&node.device_url(), "chatty", &secret).await;
    for i in 0..50 {
        raw.send(status("chatty", &format!("r{i}"), 0, json!({"i": i})))
            .await;
    }
    assert_eq!(raw.closed().await.code, 4429);
}

#[tokio::test]
async fn a_device_that_stops_reading_is_dropped_and_others_are_unaffected() {
    let node = Node::start(&[("FLEETGATE_WRITE_TIMEOUT_MS", "300")]).await;
    let stuck_secret = node.provision("stuck").await;
    let fine_secret = node.provision("fine").await;
    // Authenticated, then never read again: its socket buffers fill and writes block.
    let _stuck = Raw::authed(&node.device_url(), "stuck", &stuck_secret).await;
    let mut fine = Raw::authed(&node.device_url(), "fine", &fine_secret).await;
    let big = "x".repeat(512 * 1024);
    let mut sent = 0;
    let dropped = crate::support::eventually("the stuck device dropped", || {
        let big = big.clone();
        let node = &node;
        sent += 1;
        async move {
            let (status, _) = node
                .admin(
                    "POST",
                    "/v1/devices/stuck/commands",
                    Some(json!({"payload": big, "qos": 0})),
                )
                .await;
            (status == 409).then_some(())
        }
    })
    .await;
    let () = dropped;
    assert!(sent > 1, "it took more than one command to fill the socket");
    fine.send(status("fine", "f1", 1, json!({}))).await;
    assert_eq!(fine.recv().await, json!({"type":"ack","msgid":"f1"}));
}
