//! The project's nginx ingress (`nginx/fleetgate.conf.template`) in front of several nodes:
//! consistent hashing on the device ID.

use std::collections::{HashMap, HashSet};

use fleetgate_test_support::NginxServer;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;

use crate::support::{Node, Raw, now_ms};

const SECRET: &str = "ingress-test-secret-0123456789abcdefghij";

fn token(device: &str) -> String {
    let claims = json!({"sub": device, "exp": now_ms() / 1000 + 300});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Three independent single nodes that all trust the same JWT key, so any device can land on
/// any of them; which one it landed on is what the test observes.
async fn three_nodes() -> Vec<Node> {
    let path = std::env::temp_dir().join(format!(
        "fleetgate-ingress-keys-{}-{}.toml",
        std::process::id(),
        now_ms()
    ));
    crate::support::write_secret(
        &path,
        format!("[[keys]]\nkid = \"k\"\nalgorithm = \"HS256\"\nsecret = \"{SECRET}\"\n"),
    );
    let mut nodes = Vec::new();
    for i in 0..3 {
        let id = format!("node-{i}");
        nodes.push(
            Node::start(&[
                ("FLEETGATE_JWT_KEYS", path.to_str().unwrap()),
                ("FLEETGATE_NODE_ID", &id),
            ])
            .await,
        );
    }
    nodes
}

/// Which node holds `device` now.
async fn holder(nodes: &[Node], device: &str) -> usize {
    let mut found = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let (status, dev) = node
            .admin("GET", &format!("/v1/devices/{device}"), None)
            .await;
        if status == 200 && dev["online"] == true {
            found.push(i);
        }
    }
    assert_eq!(
        found.len(),
        1,
        "{device} is online on exactly one node: {found:?}"
    );
    found[0]
}

#[tokio::test]
async fn the_same_device_always_lands_on_the_same_node_and_devices_spread_over_all() {
    let nodes = three_nodes().await;
    let nginx = NginxServer::start(&nodes.iter().map(|n| n.gateway.clone()).collect::<Vec<_>>());
    let url = format!("ws://{}/v1/device", nginx.addr());

    let mut placement: HashMap<String, usize> = HashMap::new();
    for d in 0..30 {
        let device = format!("dev-{d}");
        let bearer = format!("Bearer {}", token(&device));
        let mut raw =
            Raw::connect(&url, &[("Device-ID", &device), ("Authorization", &bearer)]).await;
        assert_eq!(raw.recv().await["status"], "success");
        placement.insert(device.clone(), holder(&nodes, &device).await);
    }
    let used: HashSet<usize> = placement.values().copied().collect();
    assert_eq!(
        used.len(),
        3,
        "30 devices spread over all 3 nodes: {placement:?}"
    );

    // Reconnecting, by header or by query parameter, lands on the same node every time.
    for device in ["dev-0", "dev-7", "dev-19"] {
        for attempt in 0..4 {
            let bearer = format!("Bearer {}", token(device));
            let mut raw = if attempt % 2 == 0 {
                Raw::connect(&url, &[("Device-ID", device), ("Authorization", &bearer)]).await
            } else {
                let by_query = format!("{url}?device_id={device}");
                Raw::connect(&by_query, &[("Authorization", &bearer)]).await
            };
            assert_eq!(raw.recv().await["status"], "success");
            assert_eq!(
                holder(&nodes, device).await,
                placement[device],
                "{device} attempt {attempt}"
            );
        }
    }
}
