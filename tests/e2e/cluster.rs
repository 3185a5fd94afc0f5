//! Several nodes sharing one Redis: commands cross nodes, queues follow devices.

use fleetgate_test_support::RedisServer;
use serde_json::{Value, json};

use crate::support::{API_KEY, Node, Raw};

async fn nodes_on(redis: &RedisServer, n: usize) -> Vec<Node> {
    let url = redis.url();
    let mut nodes = Vec::new();
    for i in 0..n {
        let id = format!("cluster-node-{i}");
        nodes.push(
            Node::start(&[
                ("FLEETGATE_REDIS_URLS", url.as_str()),
                ("FLEETGATE_NODE_ID", &id),
            ])
            .await,
        );
    }
    nodes
}

fn command(node: &Node, device: &str, body: Value) -> tokio::task::JoinHandle<(u16, Value)> {
    let url = format!("http://{}/v1/devices/{device}/commands", node.admin);
    tokio::spawn(async move {
        let resp = reqwest::Client::new()
            .post(url)
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    })
}

#[tokio::test]
async fn a_command_sent_through_one_node_reaches_a_device_on_another_with_its_result() {
    let redis = RedisServer::start();
    let nodes = nodes_on(&redis, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let secret = a.provision("x-node").await;
    let mut device = Raw::authed(&b.device_url(), "x-node", &secret).await;
    let (_, seen) = a.admin("GET", "/v1/devices/x-node", None).await;
    assert_eq!(
        (seen["online"].as_bool(), seen["node"].as_str()),
        (Some(true), Some("cluster-node-1"))
    );

    let call = command(
        a,
        "x-node",
        json!({"payload": {"n": 1}, "qos": 1, "waitMs": 5000}),
    );
    let cmd = device.recv().await;
    assert_eq!(cmd["payload"], json!({"n": 1}));
    device
        .send(json!({"type": "ack", "msgid": cmd["msgid"], "payload": {"result": "one"}}))
        .await;
    assert_eq!(
        call.await.unwrap(),
        (200, json!({"msgid": cmd["msgid"], "result": "one"}))
    );

    let call = command(
        a,
        "x-node",
        json!({"payload": {"n": 2}, "qos": 2, "waitMs": 5000}),
    );
    let cmd = device.recv().await;
    assert_eq!(cmd["qos"], 2);
    device
        .send(json!({"type": "rec", "msgid": cmd["msgid"], "payload": {"result": "two"}}))
        .await;
    assert_eq!(
        device.recv().await,
        json!({"type": "rel", "msgid": cmd["msgid"]})
    );
    device
        .send(json!({"type": "comp", "msgid": cmd["msgid"]}))
        .await;
    assert_eq!(
        call.await.unwrap(),
        (200, json!({"msgid": cmd["msgid"], "result": "two"}))
    );
}

#[tokio::test]
async fn queued_commands_follow_a_device_to_another_node_in_order() {
    let redis = RedisServer::start();
    let nodes = nodes_on(&redis, 2).await;
    let secret = nodes[0].provision("mover").await;
    let first = Raw::authed(&nodes[0].device_url(), "mover", &secret).await;
    drop(first);
    let mut sent = Vec::new();
    for i in 0..6 {
        let (status, body) = nodes[0]
            .admin(
                "POST",
                "/v1/devices/mover/commands",
                Some(json!({"payload": {"seq": i}, "qos": 1 + (i % 2)})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        sent.push(body["msgid"].as_str().unwrap().to_owned());
    }
    let mut device = Raw::authed(&nodes[1].device_url(), "mover", &secret).await;
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let cmd = device.recv().await;
        if cmd["type"] != "command" {
            continue;
        }
        got.push(cmd["msgid"].as_str().unwrap().to_owned());
        let answer = if cmd["qos"] == 1 { "ack" } else { "rec" };
        device
            .send(json!({"type": answer, "msgid": cmd["msgid"]}))
            .await;
    }
    assert_eq!(
        got, sent,
        "every queued command, once, in order, on the other node"
    );
}

#[tokio::test]
async fn a_second_connection_on_another_node_replaces_the_first_with_4409() {
    let redis = RedisServer::start();
    let nodes = nodes_on(&redis, 2).await;
    let secret = nodes[0].provision("twin-x").await;
    let mut old = Raw::authed(&nodes[0].device_url(), "twin-x", &secret).await;
    let _new = Raw::authed(&nodes[1].device_url(), "twin-x", &secret).await;
    assert_eq!(old.closed().await.code, 4409);
    let (_, seen) = nodes[0].admin("GET", "/v1/devices/twin-x", None).await;
    assert_eq!(seen["node"], "cluster-node-1");
}

#[tokio::test]
async fn a_redis_restart_with_aof_loses_nothing_acknowledged_and_nodes_recover_without_restart() {
    use fleetgate_test_support::RedisOptions;
    let mut redis = RedisServer::start_with(RedisOptions { aof: true });
    let nodes = nodes_on(&redis, 2).await;
    let secret = nodes[0].provision("survivor").await;
    let mut device = Raw::authed(&nodes[1].device_url(), "survivor", &secret).await;
    for i in 0..20 {
        device
            .send(crate::support::status(
                "survivor",
                &format!("before-{i}"),
                1,
                json!({ format!("k{i}"): i }),
            ))
            .await;
        assert_eq!(device.recv().await["type"], "ack");
    }
    let (status, body) = nodes[0]
        .admin(
            "POST",
            "/v1/devices/survivor/commands",
            Some(json!({"payload": {"queued": true}, "qos": 1, "ttlMs": 60000})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let queued = body["msgid"].clone();
    // The device does not answer yet: the command stays in the queue across the restart.
    let cmd = device.recv().await;
    assert_eq!(cmd["msgid"], queued);

    redis.restart();
    for node in &nodes {
        crate::support::eventually("node ready again after the Redis restart", || async {
            (node.internal_get("/readyz").await.0 == 200).then_some(())
        })
        .await;
    }
    // Everything acknowledged before the restart is still there.
    let (_, dev) = nodes[0].admin("GET", "/v1/devices/survivor", None).await;
    let reported = dev["shadow"]["reported"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        reported.len(),
        20,
        "every acknowledged status survived: {dev}"
    );
    // The session survived too; the queued command is still owed and can be answered.
    device
        .send(json!({"type": "ack", "msgid": queued, "payload": {"result": "late"}}))
        .await;
    // New commands flow after the restart, and the answered one is not delivered again (a
    // retransmission already on the wire may still arrive first).
    let call = command(
        &nodes[0],
        "survivor",
        json!({"payload": {"after": true}, "qos": 1, "waitMs": 5000}),
    );
    let mut next = device.recv().await;
    while next["msgid"] == queued {
        next = device.recv().await;
    }
    assert_eq!(next["payload"], json!({"after": true}));
    device
        .send(json!({"type": "ack", "msgid": next["msgid"], "payload": {"result": "ok"}}))
        .await;
    assert_eq!(
        call.await.unwrap(),
        (200, json!({"msgid": next["msgid"], "result": "ok"}))
    );
}
