//! Admin API contract: auth, error bodies, provisioning, reads.

use serde_json::json;

use crate::support::{Node, Raw};

#[tokio::test]
async fn requests_without_the_api_key_get_401_with_a_json_error() {
    let node = Node::start(&[]).await;
    for key in [None, Some("wrong-key")] {
        let (status, body) = node.admin_with_key("GET", "/v1/devices", None, key).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"]["code"], "unauthorized");
        assert!(body["error"]["message"].is_string());
    }
}

#[tokio::test]
async fn provisioning_shows_the_secret_once_and_refuses_duplicates() {
    let node = Node::start(&[]).await;
    let (status, body) = node
        .admin(
            "POST",
            "/v1/devices",
            Some(json!({"id":"p-1","groups":["farm-a"]})),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(body["id"], "p-1");
    assert!(body["secret"].as_str().is_some_and(|s| s.len() >= 43));
    let (status, body) = node
        .admin("POST", "/v1/devices", Some(json!({"id":"p-1"})))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("exists"))
    );
    let (status, dev) = node.admin("GET", "/v1/devices/p-1", None).await;
    assert_eq!(status, 200);
    assert_eq!(dev["groups"], json!(["farm-a"]));
    assert_eq!(dev["online"], false);
    assert!(
        dev.get("secret").is_none(),
        "the secret is never shown again"
    );
}

#[tokio::test]
async fn bad_requests_get_4xx_with_json_bodies() {
    let node = Node::start(&[]).await;
    node.provision("bad-req").await;
    let cases = [
        ("POST", "/v1/devices", Some(json!({"id":"has space"})), 400),
        ("POST", "/v1/devices", Some(json!({"nope":1})), 400),
        (
            "POST",
            "/v1/devices",
            Some(
                json!({"id":"many-groups","groups":(0..65).map(|i| format!("g{i}")).collect::<Vec<_>>()}),
            ),
            400,
        ),
        ("GET", "/v1/devices/nobody", None, 404),
        (
            "POST",
            "/v1/devices/nobody/commands",
            Some(json!({"payload":{}})),
            404,
        ),
        (
            "POST",
            "/v1/devices/bad-req/commands",
            Some(json!({"payload":{},"qos":3})),
            400,
        ),
        (
            "POST",
            "/v1/devices/bad-req/commands",
            Some(json!({"payload":{},"ttlMs":0})),
            400,
        ),
        (
            "POST",
            "/v1/devices/bad-req/commands",
            Some(json!({"qos":1})),
            400,
        ),
        ("GET", "/v1/nothing-here", None, 404),
    ];
    for (method, path, body, want) in cases {
        let (status, resp) = node.admin(method, path, body.clone()).await;
        assert_eq!(status, want, "{method} {path} {body:?}: {resp}");
        assert!(resp["error"]["code"].is_string(), "{method} {path}: {resp}");
    }
}

#[tokio::test]
async fn listing_pages_through_devices_with_presence() {
    let node = Node::start(&[]).await;
    let mut secrets = Vec::new();
    for i in 0..5 {
        secrets.push(node.provision(&format!("list-{i}")).await);
    }
    let _online = Raw::authed(&node.device_url(), "list-3", &secrets[3]).await;
    let (status, page1) = node.admin("GET", "/v1/devices?limit=3", None).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = page1["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["list-0", "list-1", "list-2"]);
    let next = page1["next"].as_str().unwrap();
    let (_, page2) = node
        .admin("GET", &format!("/v1/devices?limit=3&after={next}"), None)
        .await;
    let devices = page2["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(
        (devices[0]["id"].as_str(), devices[0]["online"].as_bool()),
        (Some("list-3"), Some(true))
    );
    assert_eq!(page2["next"], serde_json::Value::Null);
}

#[tokio::test]
async fn deleting_a_device_closes_its_session_with_4410_and_removes_its_state() {
    let node = Node::start(&[]).await;
    let secret = node.provision_in("gone-1", &["farm-a"]).await;
    let mut live = Raw::authed(&node.device_url(), "gone-1", &secret).await;
    let (s, _) = node
        .admin(
            "PATCH",
            "/v1/devices/gone-1/shadow/desired",
            Some(json!({"state": {"mode": "eco"}})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(live.recv().await["type"], "delta");
    drop(live);
    let (s, _) = node
        .admin(
            "POST",
            "/v1/devices/gone-1/commands",
            Some(json!({"payload": {"a": 1}, "qos": 1})),
        )
        .await;
    assert_eq!(s, 202);
    let mut live = Raw::authed(&node.device_url(), "gone-1", &secret).await;
    // The delta and the queued command come first; then the delete closes the session.
    let (s, _) = node.admin("DELETE", "/v1/devices/gone-1", None).await;
    assert_eq!(s, 204);
    assert_eq!(live.closed().await.code, 4410);
    let (s, _) = node.admin("GET", "/v1/devices/gone-1", None).await;
    assert_eq!(s, 404);
    let (_, refused) = Raw::auth(&node.device_url(), "gone-1", &secret).await;
    assert_eq!(refused["status"], "error", "its credentials are gone");
    // Provisioned again, it starts empty: no queue, no shadow.
    node.provision_in("gone-1", &["farm-a"]).await;
    let (_, dev) = node.admin("GET", "/v1/devices/gone-1", None).await;
    assert_eq!(
        (
            dev["queuedCommands"].as_u64(),
            dev["shadow"]["version"].as_u64()
        ),
        (Some(0), Some(0)),
        "{dev}"
    );
    let (s, _) = node.admin("DELETE", "/v1/devices/gone-1x", None).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn rotating_credentials_refuses_the_old_secret_and_keeps_the_live_session() {
    let node = Node::start(&[]).await;
    let old = node.provision("rot-1").await;
    let mut live = Raw::authed(&node.device_url(), "rot-1", &old).await;
    let (s, rotated) = node.admin("POST", "/v1/devices/rot-1/rotate", None).await;
    assert_eq!(s, 200);
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    // The live session goes on.
    live.send(crate::support::status("rot-1", "r-1", 1, json!({"t": 1})))
        .await;
    assert_eq!(live.recv().await["type"], "ack");
    let (_, refused) = Raw::auth(&node.device_url(), "rot-1", &old).await;
    assert_eq!(refused["status"], "error", "the old secret is refused");
    // The new one works (and replaces the old session).
    let _fresh = Raw::authed(&node.device_url(), "rot-1", &new).await;
    assert_eq!(live.closed().await.code, 4409);
}
