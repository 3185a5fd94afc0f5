//! Alert rules end to end: CRUD over REST, evaluation at ingest with `forMs` and hysteresis
//! on a scripted sequence of values, offline rules, rule state surviving a node move, and
//! what an alert reaches (the `alerts` and `group:` channels, `GET /v1/alerts`).

use fleetgate_test_support::RedisServer;
use serde_json::{Value, json};

use crate::support::{API_KEY, Node, Raw, eventually, now_ms};

/// Nodes re-read rules every 100 ms in these tests.
const REFRESH: (&str, &str) = ("FLEETGATE_ALERT_RULES_REFRESH_MS", "100");

async fn app(node: &Node) -> Raw {
    Raw::connect(
        &format!("ws://{}/v1/app", node.gateway),
        &[("Authorization", &format!("Bearer {API_KEY}"))],
    )
    .await
}

async fn subscribe(app: &mut Raw, channel: &str) {
    app.send(json!({"type": "subscribe", "channel": channel, "id": channel}))
        .await;
    let answer = app.recv().await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
}

/// Waits until `node` evaluates `n` rules.
async fn rules_loaded(node: &Node, n: usize) {
    let want = format!("fleetgate_alert_rules {n}\n");
    eventually("the node to load the rules", || async {
        let (_, metrics) = node.internal_get("/metrics").await;
        metrics.contains(&want).then_some(())
    })
    .await;
}

async fn put_rule(node: &Node, id: &str, rule: Value) {
    let (s, b) = node
        .admin("PUT", &format!("/v1/alert-rules/{id}"), Some(rule))
        .await;
    assert_eq!(s, 201, "{b}");
}

/// A QoS 1 IIoT status of one tag taken at `at_ms`, acked before returning.
async fn report(device: &mut Raw, id: &str, msgid: &str, tag: &str, value: f64, at_ms: i64) {
    device
        .send(
            json!({"ver":"1.0","msgid":msgid,"timestamp":at_ms,"from":id,"to":"server",
            "type":"status","qos":1,"payload":{"values":[{"tag":tag,"value":value}]}}),
        )
        .await;
    let ack = device.recv().await;
    assert_eq!(ack["type"], "ack", "{ack}");
}

/// An event with a severity: it goes to `alerts` too, so it marks the end of what a
/// sequence raised (anything raised before it arrives before it).
async fn sentinel(device: &mut Raw, id: &str) {
    device
        .send(
            json!({"ver":"1.0","msgid":"sentinel","timestamp":now_ms(),"from":id,
            "to":"server","type":"event","qos":1,"payload":{"severity":"info","code":"end"}}),
        )
        .await;
    assert_eq!(device.recv().await["type"], "ack");
}

/// Alert frames on `app`'s `channel` up to the sentinel event.
async fn alerts_until_sentinel(app: &mut Raw, channel: &str) -> Vec<Value> {
    let mut alerts = Vec::new();
    loop {
        let m = app.recv().await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["channel"], channel, "{m}");
        if m["data"]["type"] == "event" {
            assert_eq!(m["data"]["payload"]["code"], "end", "{m}");
            return alerts;
        }
        assert_eq!(m["data"]["type"], "alert", "{m}");
        alerts.push(m["data"].clone());
    }
}

#[tokio::test]
async fn a_threshold_rule_with_for_and_hysteresis_raises_exactly_the_expected_alerts() {
    let node = Node::start(&[REFRESH]).await;
    let secret = node.provision_in("al-1", &["farm-a"]).await;
    put_rule(
        &node,
        "hot",
        json!({"name": "Too hot", "target": {"group": "farm-a"},
            "condition": {"threshold": {"tag": "temperature", "op": ">", "value": 80, "clear": 78}},
            "forMs": 3000, "severity": "critical"}),
    )
    .await;
    rules_loaded(&node, 1).await;
    let mut alerts = app(&node).await;
    subscribe(&mut alerts, "alerts").await;
    let mut group = app(&node).await;
    subscribe(&mut group, "group:farm-a").await;
    let mut device = Raw::authed(&node.device_url(), "al-1", &secret).await;
    // One value per second of device time, starting a minute ago (inside the clock-skew
    // window): durations are measured on the devices' timestamps.
    let t0 = now_ms() - 60_000;
    let script = [
        79.0, // below
        81.0, // above: the 3 s start
        82.0, // above for 1 s
        79.5, // not above: the clock restarts (no alert is open, so no hysteresis yet)
        81.0, // t4: above again
        81.0, 81.0, // t5, t6
        81.0, // t7: above for 3 s -> fires (1)
        79.0, // inside the hysteresis band: stays open, nothing new
        80.5, // above again while open: nothing new
        77.0, // t10: at or below the clear level -> resolves (1)
        79.0, // below the threshold
        85.0, // t12: above
        85.0, 85.0, // t13, t14
        85.0, // t15: above for 3 s -> fires (2)
        90.0, // still open
    ];
    for (i, v) in script.iter().enumerate() {
        let at = t0 + 1000 * i as i64;
        report(&mut device, "al-1", &format!("s{i}"), "temperature", *v, at).await;
    }
    sentinel(&mut device, "al-1").await;
    let raised = alerts_until_sentinel(&mut alerts, "alerts").await;
    let summary: Vec<(&str, i64)> = raised
        .iter()
        .map(|a| {
            (
                a["state"].as_str().unwrap(),
                a["firedAtMs"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("open", t0 + 7000),
            ("resolved", t0 + 7000),
            ("open", t0 + 15_000)
        ],
        "{raised:#?}"
    );
    assert_eq!(raised[0]["id"], format!("hot:al-1:{}", t0 + 7000));
    assert_eq!(raised[0]["severity"], "critical");
    assert_eq!(raised[0]["value"], 81.0);
    assert_eq!(raised[1]["resolvedAtMs"], t0 + 10_000);
    assert_eq!(
        raised[1]["message"], raised[0]["message"],
        "resolution keeps the message"
    );
    // The group's channel carries the same alerts, and the device's statuses around them.
    let mut on_group = Vec::new();
    loop {
        let m = group.recv().await;
        if m["data"]["type"] == "event" {
            break;
        }
        if m["data"]["type"] == "alert" {
            on_group.push(m["data"].clone());
        }
    }
    assert_eq!(on_group, raised);

    let (s, all) = node.admin("GET", "/v1/alerts", None).await;
    assert_eq!(s, 200, "{all}");
    assert_eq!(all["alerts"].as_array().unwrap(), &raised);
    let (s, open) = node.admin("GET", "/v1/alerts?state=open", None).await;
    assert_eq!(s, 200, "{open}");
    assert_eq!(open["alerts"], json!([raised[2]]));
    let (_, metrics) = node.internal_get("/metrics").await;
    assert!(
        metrics.contains("fleetgate_alerts_fired_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleetgate_alerts_resolved_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn rules_are_managed_over_rest_with_validation_scope_and_audit() {
    let node = Node::start(&[]).await;
    node.provision_in("al-scope", &["farm-b"]).await;
    let rule = json!({"name": "Low battery", "target": {"device": "al-scope"},
        "condition": {"threshold": {"tag": "battery", "op": "<", "value": 20, "clear": 25}}});
    put_rule(&node, "battery", rule.clone()).await;
    let (s, b) = node
        .admin("PUT", "/v1/alert-rules/battery", Some(rule))
        .await;
    assert_eq!(s, 200, "replacing: {b}");
    let (s, b) = node.admin("GET", "/v1/alert-rules/battery", None).await;
    assert_eq!((s, b["id"].as_str()), (200, Some("battery")), "{b}");
    let (s, b) = node.admin("GET", "/v1/alert-rules", None).await;
    assert_eq!(
        (s, b["rules"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{b}"
    );

    let bad = [
        json!({"name": "x", "target": {"group": "g"},
            "condition": {"threshold": {"tag": "t", "op": ">=", "value": 1}}}),
        json!({"name": "x", "target": {"group": "g"},
            "condition": {"threshold": {"tag": "t", "op": ">", "value": 1, "clear": 2}}}),
        json!({"name": "x", "target": {"group": "g"}, "condition": {"offline": {"seconds": -1}}}),
        json!({"id": "other", "name": "x", "target": {"group": "g"},
            "condition": {"offline": {"seconds": 5}}}),
        json!([1, 2]),
    ];
    for body in bad {
        let (s, b) = node
            .admin("PUT", "/v1/alert-rules/bad", Some(body.clone()))
            .await;
        assert_eq!(s, 400, "{body} -> {b}");
        assert_eq!(b["error"]["code"], "bad_request", "{b}");
    }
    let (s, _) = node.admin("GET", "/v1/alert-rules/bad", None).await;
    assert_eq!(s, 404);

    // A viewer of farm-a cannot see farm-b's rule, nor write any.
    let (s, b) = node
        .admin(
            "POST",
            "/v1/api-keys",
            Some(json!({"name": "viewer-a", "role": "viewer", "groups": ["farm-a"]})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let viewer = b["key"].as_str().unwrap().to_owned();
    let (s, b) = node
        .admin_with_key("GET", "/v1/alert-rules/battery", None, Some(&viewer))
        .await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = node
        .admin_with_key("GET", "/v1/alert-rules", None, Some(&viewer))
        .await;
    assert_eq!((s, b["rules"].clone()), (200, json!([])));
    let (s, _) = node
        .admin_with_key(
            "PUT",
            "/v1/alert-rules/mine",
            Some(json!({"name": "x", "target": {"group": "farm-a"},
                "condition": {"offline": {"seconds": 5}}})),
            Some(&viewer),
        )
        .await;
    assert_eq!(s, 403);

    let (s, _) = node.admin("DELETE", "/v1/alert-rules/battery", None).await;
    assert_eq!(s, 204);
    let (s, _) = node.admin("DELETE", "/v1/alert-rules/battery", None).await;
    assert_eq!(s, 404);
    let (s, audit) = node.admin("GET", "/v1/audit?limit=1000", None).await;
    assert_eq!(s, 200);
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["stage"] == "response" && e["target"] == "alert_rule:battery")
        .filter_map(|e| e["action"].as_str())
        .collect();
    // Both writes, the viewer's refused read, and both deletes.
    assert_eq!(
        actions,
        vec![
            "alert_rule.put",
            "alert_rule.put",
            "alert_rule.get",
            "alert_rule.delete",
            "alert_rule.delete"
        ],
        "{audit}"
    );
}

#[tokio::test]
async fn an_offline_rule_fires_when_a_device_stays_away_and_resolves_when_it_returns() {
    let node = Node::start(&[REFRESH]).await;
    let secret = node.provision_in("al-off", &["farm-o"]).await;
    put_rule(
        &node,
        "gone",
        json!({"name": "Gone", "target": {"device": "al-off"},
            "condition": {"offline": {"seconds": 1}}}),
    )
    .await;
    rules_loaded(&node, 1).await;
    let mut alerts = app(&node).await;
    subscribe(&mut alerts, "alerts").await;
    let device = Raw::authed(&node.device_url(), "al-off", &secret).await;
    let left = now_ms();
    drop(device);
    let fired = alerts.recv().await;
    assert_eq!(fired["data"]["type"], "alert", "{fired}");
    assert_eq!(fired["data"]["state"], "open", "{fired}");
    assert!(
        fired["data"]["firedAtMs"].as_i64().unwrap() >= left + 1000,
        "{fired}"
    );
    let _back = Raw::authed(&node.device_url(), "al-off", &secret).await;
    let resolved = alerts.recv().await;
    assert_eq!(resolved["data"]["state"], "resolved", "{resolved}");
    assert_eq!(resolved["data"]["id"], fired["data"]["id"]);
    let (_, open) = node.admin("GET", "/v1/alerts?state=open", None).await;
    assert_eq!(open["alerts"], json!([]));
}

#[tokio::test]
async fn a_pending_duration_survives_the_device_moving_nodes_on_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = Node::start(&[
        ("FLEETGATE_REDIS_URLS", url.as_str()),
        ("FLEETGATE_NODE_ID", "al-a"),
        REFRESH,
    ])
    .await;
    let b = Node::start(&[
        ("FLEETGATE_REDIS_URLS", url.as_str()),
        ("FLEETGATE_NODE_ID", "al-b"),
        REFRESH,
    ])
    .await;
    let secret = a.provision_in("al-move", &["farm-m"]).await;
    put_rule(
        &a,
        "hot",
        json!({"name": "Too hot", "target": {"group": "farm-m"},
            "condition": {"threshold": {"tag": "t", "op": ">", "value": 50}}, "forMs": 2000}),
    )
    .await;
    rules_loaded(&a, 1).await;
    rules_loaded(&b, 1).await;
    let mut alerts = app(&b).await;
    subscribe(&mut alerts, "alerts").await;
    let t0 = now_ms() - 30_000;
    let mut on_a = Raw::authed(&a.device_url(), "al-move", &secret).await;
    report(&mut on_a, "al-move", "m0", "t", 60.0, t0).await;
    report(&mut on_a, "al-move", "m1", "t", 61.0, t0 + 1000).await;
    drop(on_a);
    // On node B the clock started on node A still runs: 2 s after t0 it fires.
    let mut on_b = Raw::authed(&b.device_url(), "al-move", &secret).await;
    report(&mut on_b, "al-move", "m2", "t", 62.0, t0 + 2000).await;
    sentinel(&mut on_b, "al-move").await;
    let raised = alerts_until_sentinel(&mut alerts, "alerts").await;
    assert_eq!(raised.len(), 1, "{raised:#?}");
    assert_eq!(raised[0]["firedAtMs"], t0 + 2000);
    assert_eq!(raised[0]["value"], 62.0);
}
