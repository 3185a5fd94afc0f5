//! `/v1/mqtt`: web clients bridged to a real `mosquitto` through the node's one shared MQTT
//! client, with real MQTT clients (`mosquitto_pub`, `mosquitto_sub`) on the other side.

use std::process::Stdio;

use fleetgate_test_support::MosquittoServer;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::support::{API_KEY, DEADLINE, Node, Raw, eventually};

const PASSWORD: &str = "correct horse battery staple";

fn mqtt_url(node: &Node) -> String {
    format!("ws://{}/v1/mqtt", node.gateway)
}

/// Filters every bridged node holds for MQTT devices (`$share/fleetgate/devices/+/status`,
/// `/events`, `/acks`).
const DEVICE_FILTERS: u64 = 3;

/// A node bridged to `broker`, once its MQTT connection is up and the broker confirmed its
/// MQTT device filters.
pub(crate) async fn bridged(broker: &MosquittoServer, extra: &[(&str, &str)]) -> Node {
    let url = broker.url();
    let mut env = vec![("FLEETGATE_MQTT_URL", url.as_str())];
    env.extend_from_slice(extra);
    let node = Node::start(&env).await;
    eventually("the bridge connects with its device filters", || async {
        let connected = metric(&node, "fleetgate_mqtt_bridge_connected").await == 1;
        let confirmed = metric(&node, "fleetgate_mqtt_bridge_filters_confirmed").await;
        (connected && confirmed == DEVICE_FILTERS).then_some(())
    })
    .await;
    node
}

/// The value of an unlabelled metric (`name` or `name_total`), 0 when absent.
pub(crate) async fn metric(node: &Node, name: &str) -> u64 {
    let (_, text) = node.internal_get("/metrics").await;
    text.lines()
        .find_map(|l| {
            let (key, value) = l.split_once(' ')?;
            (key == name || key == format!("{name}_total")).then(|| value.parse::<f64>().ok())?
        })
        .map_or(0, |v| v as u64)
}

/// A `/v1/mqtt` socket authenticated by header.
async fn web(node: &Node, token: &str) -> Raw {
    Raw::connect(
        &mqtt_url(node),
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await
}

async fn request(ws: &mut Raw, frame: Value) -> Value {
    ws.send(frame).await;
    ws.recv().await
}

async fn subscribe(ws: &mut Raw, topic: &str) -> Value {
    request(
        ws,
        json!({"type": "subscribe", "topic": topic, "id": topic}),
    )
    .await
}

async fn publish(ws: &mut Raw, topic: &str, payload: Value, qos: u8) -> Value {
    request(
        ws,
        json!({"type": "publish", "topic": topic, "payload": payload, "qos": qos, "id": "p"}),
    )
    .await
}

/// Publishes with `mosquitto_pub` (a real MQTT client) and waits for it to finish.
pub(crate) async fn mosquitto_pub(broker: &MosquittoServer, topic: &str, payload: &[u8]) {
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port().to_string(),
            "-q",
            "1",
        ])
        .args(["-t", topic, "-s"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (Debian package mosquitto-clients; scripts/test-deps)");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(payload).await.unwrap();
    }
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("mosquitto_pub in time")
        .unwrap();
    assert!(status.success(), "mosquitto_pub {topic}");
}

/// Runs `mosquitto_sub` (a real MQTT client) with `args` and waits for its SUBACK; its
/// stdout lines follow (with `-d` debug lines among them).
pub(crate) async fn mosquitto_sub(
    broker: &MosquittoServer,
    args: &[&str],
) -> (Child, Lines<BufReader<ChildStdout>>) {
    // Line-buffered, so its SUBACK line arrives when it happens (stdout is a pipe).
    let mut child = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-d"])
        .args(["-p", &broker.port().to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients; scripts/test-deps)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let subscribed = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("SUBACK") {
                return;
            }
        }
        panic!("mosquitto_sub ended before subscribing");
    };
    tokio::time::timeout(DEADLINE, subscribed)
        .await
        .expect("mosquitto_sub subscribed in time");
    (child, lines)
}

fn expect_mqtt(frame: &Value, topic: &str, payload: &str) {
    assert_eq!(frame["type"], "mqtt", "{frame}");
    assert_eq!(frame["topic"], topic, "{frame}");
    assert_eq!(frame["payload"], payload, "{frame}");
}

/// A viewer scoped to `groups`, logged in: its token.
async fn user_token(node: &Node, name: &str, groups: &[&str]) -> String {
    let user = json!({"username": name, "password": PASSWORD, "role": "viewer", "groups": groups});
    let (s, b) = node.admin("POST", "/v1/users", Some(user)).await;
    assert_eq!(s, 201, "{b}");
    let login = json!({"username": name, "password": PASSWORD});
    let (s, b) = node
        .admin_with_key("POST", "/v1/auth/login", Some(login), None)
        .await;
    assert_eq!(s, 200, "{b}");
    b["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn without_a_broker_v1_mqtt_answers_503_with_a_json_body() {
    let node = Node::start(&[]).await;
    let resp = reqwest::get(format!("http://{}/v1/mqtt", node.gateway))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "mqtt_unavailable", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert_eq!(
        Raw::try_connect(&mqtt_url(&node), &[]).await.err(),
        Some(503),
        "refused before the upgrade"
    );
    // Nothing else changes: /v1/app still upgrades.
    let app = format!("ws://{}/v1/app", node.gateway);
    assert!(Raw::try_connect(&app, &[]).await.is_ok());
}

#[tokio::test]
async fn a_wildcard_subscriber_receives_exactly_what_mosquitto_pub_publishes() {
    let broker = MosquittoServer::start();
    let node = bridged(&broker, &[]).await;
    // Header auth sends no auth_response, as on /v1/app.
    let mut ws = web(&node, API_KEY).await;
    let reply = subscribe(&mut ws, "groups/+/temp").await;
    assert_eq!(
        reply,
        json!({"type":"subscribed","topic":"groups/+/temp","id":"groups/+/temp"})
    );

    let sent = [
        ("groups/farm-a/temp", "21.5"),
        ("groups/farm-b/temp", "{\"c\":19}"),
        ("groups/farm-a/humidity", "not for us"),
        ("other/farm-a/temp", "not for us either"),
        ("groups/farm-c/temp", "héllo"),
    ];
    for (topic, payload) in sent {
        mosquitto_pub(&broker, topic, payload.as_bytes()).await;
    }
    mosquitto_pub(&broker, "groups/bin/temp", &[0xff, 0x00, 0x01]).await;
    mosquitto_pub(&broker, "groups/last/temp", b"sentinel").await;

    expect_mqtt(&ws.recv().await, "groups/farm-a/temp", "21.5");
    expect_mqtt(&ws.recv().await, "groups/farm-b/temp", "{\"c\":19}");
    expect_mqtt(&ws.recv().await, "groups/farm-c/temp", "héllo");
    let bin = ws.recv().await;
    expect_mqtt(&bin, "groups/bin/temp", "/wAB");
    assert_eq!(bin["encoding"], "base64", "{bin}");
    // The sentinel comes next: nothing that did not match arrived in between.
    expect_mqtt(&ws.recv().await, "groups/last/temp", "sentinel");
    assert_eq!(
        metric(&node, "fleetgate_mqtt_bridge_messages_received").await,
        5
    );
}

#[tokio::test]
async fn a_web_publish_reaches_a_real_mqtt_subscriber() {
    let broker = MosquittoServer::start();
    let node = bridged(&broker, &[]).await;
    let (_sub, mut lines) =
        mosquitto_sub(&broker, &["-t", "apps/bootstrap/#", "-v", "-C", "3"]).await;

    let mut ws = web(&node, API_KEY).await;
    let ok = json!({"type":"published","topic":"apps/bootstrap/a","id":"p"});
    assert_eq!(
        publish(&mut ws, "apps/bootstrap/a", json!("hello"), 0).await,
        ok
    );
    assert_eq!(
        publish(&mut ws, "apps/bootstrap/a", json!({"n": 1}), 1).await,
        ok
    );
    assert_eq!(
        publish(&mut ws, "apps/bootstrap/a", json!(2.5), 1).await,
        ok
    );

    let mut got = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("apps/") {
                got.push(line);
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("mosquitto_sub received 3 and exited");
    assert_eq!(
        got,
        [
            "apps/bootstrap/a hello",
            "apps/bootstrap/a {\"n\":1}",
            "apps/bootstrap/a 2.5"
        ]
    );
    assert_eq!(metric(&node, "fleetgate_mqtt_published").await, 3);
}

#[tokio::test]
async fn acls_refuse_what_they_should_with_exact_codes() {
    let broker = MosquittoServer::start();
    let node = bridged(&broker, &[("FLEETGATE_APP_MAX_SUBSCRIPTIONS", "3")]).await;
    let token = user_token(&node, "ann", &["farm-a"]).await;
    // First-frame auth, as for /v1/app.
    let mut ws = Raw::connect(&mqtt_url(&node), &[]).await;
    let auth = request(&mut ws, json!({"type": "auth", "token": token})).await;
    assert_eq!(auth["actor"], "user:ann", "{auth}");

    let code = |v: &Value| v["code"].as_str().map(str::to_owned).unwrap_or_default();
    for allowed in ["groups/farm-a/#", "apps/user:ann/+/x"] {
        assert_eq!(subscribe(&mut ws, allowed).await["type"], "subscribed");
    }
    for (filter, want) in [
        ("groups/farm-b/#", "forbidden"),
        ("groups/+/temp", "forbidden"),
        ("#", "forbidden"),
        ("devices/+/status", "forbidden"),
        ("apps/user:bob/#", "forbidden"),
        ("a/#/b", "bad_request"),
        ("a+", "bad_request"),
    ] {
        let reply = subscribe(&mut ws, filter).await;
        assert_eq!(reply["type"], "error", "{filter}: {reply}");
        assert_eq!(code(&reply), want, "{filter}: {reply}");
        assert_eq!(reply["id"], filter);
    }
    assert_eq!(
        subscribe(&mut ws, "apps/user:ann/#").await["type"],
        "subscribed"
    );
    let full = subscribe(&mut ws, "groups/farm-a/x").await;
    assert_eq!(code(&full), "too_many_subscriptions", "{full}");

    for (topic, want) in [
        ("devices/d1/commands", "forbidden"),
        ("groups/farm-a/x", "forbidden"),
        ("apps/user:bob/x", "forbidden"),
        ("apps/user:ann/+", "bad_request"),
    ] {
        let reply = publish(&mut ws, topic, json!("x"), 0).await;
        assert_eq!(code(&reply), want, "{topic}: {reply}");
    }
    let own = publish(&mut ws, "apps/user:ann/x", json!("x"), 1).await;
    assert_eq!(own["type"], "published", "{own}");
    // Its own subscription (apps/user:ann/#) hears it back through the broker.
    expect_mqtt(&ws.recv().await, "apps/user:ann/x", "x");

    let unsub = request(
        &mut ws,
        json!({"type":"unsubscribe","topic":"nope","id":"u"}),
    )
    .await;
    assert_eq!(code(&unsub), "bad_request", "{unsub}");

    let mut bad = Raw::connect(&mqtt_url(&node), &[]).await;
    bad.send(json!({"type": "auth", "token": "not-a-token"}))
        .await;
    assert_eq!(bad.closed().await.code, 4403);
}

#[tokio::test]
async fn a_broker_restart_loses_no_subscription() {
    let mut broker = MosquittoServer::start();
    let node = bridged(&broker, &[]).await;
    let mut ws = web(&node, API_KEY).await;
    assert_eq!(
        subscribe(&mut ws, "groups/+/temp").await["type"],
        "subscribed"
    );
    mosquitto_pub(&broker, "groups/a/temp", b"before").await;
    expect_mqtt(&ws.recv().await, "groups/a/temp", "before");
    let subacks = metric(&node, "fleetgate_mqtt_bridge_broker_subacks").await;

    broker.restart();
    // Reconnected, and the broker acknowledged the resubscription.
    eventually("the bridge resubscribes after the restart", || async {
        let connects = metric(&node, "fleetgate_mqtt_bridge_connects").await;
        let now = metric(&node, "fleetgate_mqtt_bridge_broker_subacks").await;
        (connects >= 2 && now > subacks).then_some(())
    })
    .await;
    let publish = json!({"type":"publish","topic":"apps/bootstrap/x","payload":"up","id":"p"});
    assert_eq!(request(&mut ws, publish).await["type"], "published");
    for n in 0..3 {
        mosquitto_pub(&broker, "groups/b/temp", format!("after-{n}").as_bytes()).await;
    }
    for n in 0..3 {
        expect_mqtt(&ws.recv().await, "groups/b/temp", &format!("after-{n}"));
    }
}

#[tokio::test]
async fn sessions_on_one_filter_share_one_broker_subscription() {
    let broker = MosquittoServer::start();
    let node = bridged(&broker, &[]).await;
    let base = metric(&node, "fleetgate_mqtt_bridge_broker_subscribes").await;
    let mut a = web(&node, API_KEY).await;
    let mut b = web(&node, API_KEY).await;
    assert_eq!(
        subscribe(&mut a, "groups/+/temp").await["type"],
        "subscribed"
    );
    assert_eq!(
        subscribe(&mut b, "groups/+/temp").await["type"],
        "subscribed"
    );
    // Overlapping filters of one session still deliver each message once.
    assert_eq!(subscribe(&mut b, "groups/+/#").await["type"], "subscribed");
    assert_eq!(
        metric(&node, "fleetgate_mqtt_bridge_broker_subscribes").await,
        base + 2
    );
    assert_eq!(
        metric(&node, "fleetgate_mqtt_bridge_filters").await,
        DEVICE_FILTERS + 2
    );
    assert_eq!(metric(&node, "fleetgate_mqtt_subscriptions").await, 3);

    for n in 0..3 {
        mosquitto_pub(&broker, "groups/x/temp", format!("m{n}").as_bytes()).await;
    }
    mosquitto_pub(&broker, "groups/end", b"end").await;
    for n in 0..3 {
        expect_mqtt(&a.recv().await, "groups/x/temp", &format!("m{n}"));
        expect_mqtt(&b.recv().await, "groups/x/temp", &format!("m{n}"));
    }
    expect_mqtt(&b.recv().await, "groups/end", "end");

    let unsub = json!({"type":"unsubscribe","topic":"groups/+/temp","id":"u"});
    assert_eq!(request(&mut a, unsub.clone()).await["type"], "unsubscribed");
    assert_eq!(
        metric(&node, "fleetgate_mqtt_bridge_broker_unsubscribes").await,
        0,
        "b holds it"
    );
    drop(b);
    eventually("the last holder's close unsubscribes", || async {
        let unsubscribed = metric(&node, "fleetgate_mqtt_bridge_broker_unsubscribes").await;
        let filters = metric(&node, "fleetgate_mqtt_bridge_filters").await;
        (unsubscribed == 2 && filters == DEVICE_FILTERS).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_broker_outage_answers_publishes_unavailable_and_drain_closes_with_1012() {
    let mut broker = MosquittoServer::start();
    let mut node = bridged(&broker, &[]).await;
    let mut ws = web(&node, API_KEY).await;
    broker.kill();
    eventually("the bridge notices the broker is gone", || async {
        (metric(&node, "fleetgate_mqtt_bridge_connected").await == 0).then_some(())
    })
    .await;
    let reply = publish(&mut ws, "apps/bootstrap/x", json!("x"), 1).await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    // A subscription made meanwhile is kept, to be made on reconnect.
    assert_eq!(subscribe(&mut ws, "groups/+/t").await["type"], "subscribed");
    node.signal("TERM");
    assert_eq!(ws.closed().await.code, 1012);
    node.wait_exit().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_4008_and_drops_its_filters() {
    let broker = MosquittoServer::start();
    let node = bridged(
        &broker,
        &[
            ("FLEETGATE_MAX_FRAME_BYTES", "1024"),
            ("FLEETGATE_APP_QUEUE_BYTES", "2048"),
            ("FLEETGATE_WRITE_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let mut ws = web(&node, API_KEY).await;
    assert_eq!(
        subscribe(&mut ws, "groups/+/flood").await["type"],
        "subscribed"
    );
    // Far more than the socket buffers and the 2 KiB queue hold, while the client reads
    // nothing: one mosquitto_pub sends a message per line.
    let line = "x".repeat(900);
    let lines: String = (0..12_000).map(|_| format!("{line}\n")).collect();
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .args(["-t", "groups/a/flood", "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(lines.as_bytes()).await.unwrap();
    }
    tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("mosquitto_pub in time")
        .unwrap();
    eventually("the slow session is dropped from its filter", || async {
        (metric(&node, "fleetgate_mqtt_bridge_filters").await == DEVICE_FILTERS).then_some(())
    })
    .await;
    assert_eq!(ws.closed().await.code, 4008);
}
