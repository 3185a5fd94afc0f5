//! Desired state: the delta reaches an online device at once and a device connecting later
//! right after `auth_response`; versions make concurrent writers safe; the size is bounded.
//! Each test runs on the memory bus and on Redis.

use fleetgate_test_support::RedisServer;
use serde_json::{Value, json};

use crate::support::{API_KEY, Node, Raw, status};

async fn memory() -> (Node, Option<RedisServer>) {
    (
        Node::start(&[("FLEETGATE_SHADOW_MAX_BYTES", "4096")]).await,
        None,
    )
}

async fn redis() -> (Node, Option<RedisServer>) {
    let redis = RedisServer::start();
    let node = Node::start(&[
        ("FLEETGATE_REDIS_URLS", &redis.url()),
        ("FLEETGATE_SHADOW_MAX_BYTES", "4096"),
    ])
    .await;
    (node, Some(redis))
}

async fn desire(node: &Node, id: &str, body: Value, if_match: Option<&str>) -> (u16, Value) {
    let headers: Vec<(&str, &str)> = if_match.map(|v| ("if-match", v)).into_iter().collect();
    node.admin_request(
        "PATCH",
        &format!("/v1/devices/{id}/shadow/desired"),
        Some(body),
        Some(API_KEY),
        &headers,
    )
    .await
}

async fn delta_reaches_online_and_later_devices(node: Node) {
    let secret = node.provision("sh-1").await;
    let mut online = Raw::authed(&node.device_url(), "sh-1", &secret).await;
    let (s, shadow) = desire(
        &node,
        "sh-1",
        json!({"state": {"mode": "eco", "target": 21}}),
        None,
    )
    .await;
    assert_eq!(s, 200, "{shadow}");
    assert_eq!(
        (shadow["version"].as_u64(), shadow["inSync"].as_bool()),
        (Some(1), Some(false))
    );
    let frame = online.recv().await;
    assert_eq!(frame["type"], "delta", "{frame}");
    assert_eq!(frame["to"], "sh-1");
    assert_eq!(
        frame["payload"],
        json!({"state": {"mode": "eco", "target": 21}, "version": 1})
    );
    drop(online);

    // A later connection is told first thing, and again until the device reports it.
    for _ in 0..2 {
        let mut later = Raw::authed(&node.device_url(), "sh-1", &secret).await;
        let frame = later.recv().await;
        assert_eq!(
            (frame["type"].as_str(), frame["payload"]["version"].as_u64()),
            (Some("delta"), Some(1)),
            "{frame}"
        );
        drop(later);
    }
    // Reporting half of it leaves the other half in the delta; reporting all of it syncs.
    let mut device = Raw::authed(&node.device_url(), "sh-1", &secret).await;
    assert_eq!(device.recv().await["type"], "delta");
    device
        .send(status("sh-1", "r1", 1, json!({"mode": "eco"})))
        .await;
    assert_eq!(device.recv().await["type"], "ack");
    let (_, now) = node.admin("GET", "/v1/devices/sh-1/shadow", None).await;
    assert_eq!(now["delta"], json!({"target": 21}));
    device
        .send(status("sh-1", "r2", 1, json!({"target": 21})))
        .await;
    assert_eq!(device.recv().await["type"], "ack");
    let (_, now) = node.admin("GET", "/v1/devices/sh-1/shadow", None).await;
    assert_eq!(
        (now["delta"].clone(), now["inSync"].as_bool()),
        (json!({}), Some(true)),
        "{now}"
    );
    drop(device);
    // In sync: nothing is sent on connect (the first frame is the answer to our status).
    let mut synced = Raw::authed(&node.device_url(), "sh-1", &secret).await;
    synced
        .send(status("sh-1", "r3", 1, json!({"battery": 90})))
        .await;
    assert_eq!(synced.recv().await["type"], "ack");
}

async fn versions_make_concurrent_writers_safe(node: Node) {
    node.provision("sh-2").await;
    let (s, first) = desire(
        &node,
        "sh-2",
        json!({"state": {"a": 1}, "version": 0}),
        None,
    )
    .await;
    assert_eq!((s, first["version"].as_u64()), (200, Some(1)), "{first}");
    // Stale: 409 with the current version, nothing changed.
    let (s, stale) = desire(
        &node,
        "sh-2",
        json!({"state": {"a": 2}, "version": 0}),
        None,
    )
    .await;
    assert_eq!(
        (s, stale["error"]["code"].as_str()),
        (409, Some("version_conflict")),
        "{stale}"
    );
    assert_eq!(stale["error"]["currentVersion"], 1);
    // Two writers that read version 1: exactly one wins.
    let (a, b) = tokio::join!(
        desire(
            &node,
            "sh-2",
            json!({"state": {"x": "writer-a"}}),
            Some("\"1\"")
        ),
        desire(
            &node,
            "sh-2",
            json!({"state": {"y": "writer-b"}}),
            Some("\"1\"")
        ),
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{a:?} {b:?}");
    let (winner, loser_key, loser_value) = if a.0 == 200 {
        (a.1, "y", "writer-b")
    } else {
        (b.1, "x", "writer-a")
    };
    assert_eq!(winner["version"], 2);
    // The loser reads again and retries: both changes are there, nothing lost.
    let (s, read) = node.admin("GET", "/v1/devices/sh-2/shadow", None).await;
    assert_eq!(s, 200);
    let version = read["version"].as_u64().unwrap();
    let (s, last) = desire(
        &node,
        "sh-2",
        json!({"state": {loser_key: loser_value}, "version": version}),
        None,
    )
    .await;
    assert_eq!(s, 200, "{last}");
    assert_eq!(last["desired"]["a"], 1);
    assert_eq!(last["desired"]["x"], "writer-a");
    assert_eq!(last["desired"]["y"], "writer-b");
    assert_eq!(last["version"], 3);
    // null removes a key; an If-Match that disagrees with the version is a conflict.
    let (s, removed) = desire(&node, "sh-2", json!({"state": {"a": null}}), None).await;
    assert_eq!((s, removed["desired"].get("a")), (200, None));
    let (s, both) = desire(
        &node,
        "sh-2",
        json!({"state": {"a": 1}, "version": 4}),
        Some("\"9\""),
    )
    .await;
    assert_eq!(
        (s, both["error"]["currentVersion"].as_u64()),
        (409, Some(4)),
        "{both}"
    );
    // Too large: 413, and the shadow is unchanged.
    let (s, big) = desire(
        &node,
        "sh-2",
        json!({"state": {"blob": "x".repeat(5000)}}),
        None,
    )
    .await;
    assert_eq!(
        (s, big["error"]["code"].as_str()),
        (413, Some("too_large")),
        "{big}"
    );
    let (_, after) = node.admin("GET", "/v1/devices/sh-2/shadow", None).await;
    assert_eq!(after["version"], 4);
    // Unknown devices are 404.
    let (s, _) = desire(&node, "nobody", json!({"state": {"a": 1}}), None).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn delta_on_the_memory_bus() {
    delta_reaches_online_and_later_devices(memory().await.0).await;
}

#[tokio::test]
async fn delta_on_redis() {
    let (node, _redis) = redis().await;
    delta_reaches_online_and_later_devices(node).await;
}

#[tokio::test]
async fn versions_on_the_memory_bus() {
    versions_make_concurrent_writers_safe(memory().await.0).await;
}

#[tokio::test]
async fn versions_on_redis() {
    let (node, _redis) = redis().await;
    versions_make_concurrent_writers_safe(node).await;
}
