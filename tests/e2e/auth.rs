//! Both auth modes, every failure with its exact close code.

use serde_json::json;

use crate::support::{Node, Raw};

#[tokio::test]
async fn first_frame_auth_succeeds_with_provisioned_secret() {
    let node = Node::start(&[]).await;
    let secret = node.provision("sensor-001").await;
    let (_raw, resp) = Raw::auth(&node.device_url(), "sensor-001", &secret).await;
    assert_eq!(resp["type"], "auth_response");
    assert_eq!(resp["status"], "success");
    assert_eq!(resp["heartbeatMs"], 1000);
    assert!(resp["sessionId"].as_str().is_some_and(|s| !s.is_empty()));
    let (_, dev) = node.admin("GET", "/v1/devices/sensor-001", None).await;
    assert_eq!(dev["online"], true);
}

#[tokio::test]
async fn header_auth_succeeds_and_server_still_sends_auth_response() {
    let node = Node::start(&[]).await;
    let secret = node.provision("hdr-1").await;
    let bearer = format!("Bearer {secret}");
    let mut raw = Raw::connect(
        &node.device_url(),
        &[("Authorization", &bearer), ("Device-ID", "hdr-1")],
    )
    .await;
    let resp = raw.recv().await;
    assert_eq!(resp["status"], "success", "{resp}");
}

#[tokio::test]
async fn header_auth_with_bad_secret_is_refused_at_upgrade_with_401() {
    let node = Node::start(&[]).await;
    node.provision("hdr-2").await;
    let status = Raw::try_connect(
        &node.device_url(),
        &[("Authorization", "Bearer wrong"), ("Device-ID", "hdr-2")],
    )
    .await
    .err();
    assert_eq!(status, Some(401));
}

#[tokio::test]
async fn wrong_secret_gets_error_response_then_4403() {
    let node = Node::start(&[]).await;
    node.provision("sensor-002").await;
    let (mut raw, resp) = Raw::auth(&node.device_url(), "sensor-002", "not-the-secret").await;
    assert_eq!(resp["type"], "auth_response");
    assert_eq!(resp["status"], "error");
    assert!(resp["reason"].as_str().is_some());
    assert_eq!(raw.closed().await.code, 4403);
}

#[tokio::test]
async fn unknown_device_is_4403() {
    let node = Node::start(&[]).await;
    let (mut raw, resp) = Raw::auth(&node.device_url(), "nobody", "whatever").await;
    assert_eq!(resp["status"], "error");
    assert_eq!(raw.closed().await.code, 4403);
}

#[tokio::test]
async fn routed_id_must_match_the_authenticated_one() {
    let node = Node::start(&[]).await;
    let secret = node.provision("sensor-003").await;
    let url = format!("{}?device_id=someone-else", node.device_url());
    let (mut raw, resp) = Raw::auth(&url, "sensor-003", &secret).await;
    assert_eq!(resp["status"], "error");
    assert_eq!(raw.closed().await.code, 4403);
}

#[tokio::test]
async fn another_devices_secret_is_refused() {
    let node = Node::start(&[]).await;
    node.provision("a-dev").await;
    let b_secret = node.provision("b-dev").await;
    let (mut raw, _) = Raw::auth(&node.device_url(), "a-dev", &b_secret).await;
    assert_eq!(raw.closed().await.code, 4403);
}

#[tokio::test]
async fn no_auth_frame_within_auth_timeout_is_4408() {
    let node = Node::start(&[("FLEETGATE_AUTH_TIMEOUT_MS", "300")]).await;
    let mut raw = Raw::connect(&node.device_url(), &[]).await;
    let closed = raw.closed().await;
    assert_eq!(closed.code, 4408, "{closed:?}");
}

#[tokio::test]
async fn non_auth_first_frame_is_4400() {
    let node = Node::start(&[]).await;
    node.provision("sensor-004").await;
    let mut raw = Raw::connect(&node.device_url(), &[]).await;
    raw.send(json!({"type":"status","deviceId":"sensor-004","data":{"t":1}}))
        .await;
    assert_eq!(raw.closed().await.code, 4400);
}

#[tokio::test]
async fn revoked_device_is_closed_with_4410_and_cannot_return() {
    let node = Node::start(&[]).await;
    let secret = node.provision("rev-1").await;
    let mut raw = Raw::authed(&node.device_url(), "rev-1", &secret).await;
    let (status, _) = node.admin("POST", "/v1/devices/rev-1/revoke", None).await;
    assert_eq!(status, 204);
    assert_eq!(raw.closed().await.code, 4410);
    let (mut again, resp) = Raw::auth(&node.device_url(), "rev-1", &secret).await;
    assert_eq!(resp["status"], "error");
    assert_eq!(again.closed().await.code, 4403);
}
