//! Limits: capacity, frame size, rate, with their exact refusals.

use serde_json::json;

use crate::support::{Node, Raw, status};

#[tokio::test]
async fn a_full_node_refuses_upgrades_with_503_and_late_authentications_with_1013() {
    let node = Node::start(&[("FLEETGATE_MAX_CONNECTIONS", "2")]).await;
    let mut secrets = Vec::new();
    for i in 0..4 {
        secrets.push(node.provision(&format!("cap-{i}")).await);
    }
    // Two sockets upgrade while the node is empty; both may authenticate.
    let mut a = Raw::connect(&node.device_url(), &[]).await;
    let mut b = Raw::connect(&node.device_url(), &[]).await;
    // A third upgrades before either has authenticated: sockets awaiting auth are allowed.
    let mut late = Raw::connect(&node.device_url(), &[]).await;
    for (raw, i) in [(&mut a, 0), (&mut b, 1)] {
        raw.send(json!({"type":"auth","deviceId":format!("cap-{i}"),"token":secrets[i]}))
            .await;
        assert_eq!(raw.recv().await["status"], "success");
    }
    // The node is full now: the late socket's auth is refused with 1013 and a retry hint.
    late.send(json!({"type":"auth","deviceId":"cap-2","token":secrets[2]}))
        .await;
    let closed = late.closed().await;
    assert_eq!(closed.code, 1013, "{closed:?}");
    assert!(closed.reason.contains("retry-after="), "{closed:?}");
    // New upgrades are refused before the upgrade.
    assert_eq!(
        Raw::try_connect(&node.device_url(), &[]).await.err(),
        Some(503)
    );
    // A slot frees when a device leaves.
    drop(a);
    let secret = secrets[3].clone();
    crate::support::eventually("a free slot", || async {
        match Raw::try_connect(&node.device_url(), &[]).await {
            Ok(mut raw) => {
                raw.send(json!({"type":"auth","deviceId":"cap-3","token":secret}))
                    .await;
                (raw.recv().await["status"] == "success").then_some(())
            }
            Err(503) => None,
            Err(other) => panic!("unexpected {other}"),
        }
    })
    .await;
}

#[tokio::test]
async fn sockets_waiting_for_auth_are_bounded() {
    let node = Node::start(&[
        ("FLEETGATE_MAX_CONNECTIONS", "2"),
        ("FLEETGATE_MAX_PENDING_AUTH", "1"),
    ])
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Raw::connect(&node.device_url(), &[]).await);
    }
    assert_eq!(
        Raw::try_connect(&node.device_url(), &[]).await.err(),
        Some(503),
        "2 + 1 sockets at most"
    );
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

#[tokio::test]
async fn plain_http_on_the_device_listener_gets_json_errors() {
    let node = Node::start(&[]).await;
    let http = reqwest::Client::new();
    for (path, want) in [("/v1/device", 400), ("/v1/nothing", 404), ("/", 404)] {
        let resp = http
            .get(format!("http://{}{path}", node.gateway))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), want, "{path}");
        let body: serde_json::Value = resp.json().await.expect("a JSON body");
        assert!(body["error"]["code"].is_string(), "{path}: {body}");
    }
}

/// Container runtimes (containerd 2 among them) start processes with a soft open-file limit of
/// 1024 under a far higher hard one; one descriptor per device would cap a pod at ~800
/// devices. The node raises its soft limit to the hard one and sizes its cap from that.
#[tokio::test]
async fn the_node_raises_a_low_soft_open_file_limit_to_the_hard_one() {
    let real = fleetgate_e2e::fleetgate_binary().unwrap();
    let wrapper = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/low-nofile.sh"));
    let hard: u64 = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "ulimit -Hn"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .expect("a finite hard limit");
    assert!(
        hard > 1024,
        "this test needs a hard limit above 1024, not {hard}"
    );
    let env = [
        ("FLEETGATE_REAL", real.to_str().unwrap()),
        ("FLEETGATE_API_KEY", crate::support::API_KEY),
        ("FLEETGATE_LISTEN", "127.0.0.1:0"),
        ("FLEETGATE_ADMIN_LISTEN", "127.0.0.1:0"),
        ("FLEETGATE_INTERNAL_LISTEN", "127.0.0.1:0"),
        ("RUST_LOG", "warn"),
    ];
    let (_child, listeners) =
        fleetgate_e2e::spawn_binary(wrapper, "all", &env, crate::support::DEADLINE)
            .await
            .unwrap();
    let text = reqwest::get(format!("http://{}/metrics", listeners["internal"]))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sample = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name}: {text}"))
    };
    assert_eq!(sample("process_max_fds"), hard as f64, "{text}");
    // The automatic cap follows the raised limit (memory permitting), not the 1024 it started with.
    assert!(sample("fleetgate_connections_max") > 1024.0, "{text}");
}
