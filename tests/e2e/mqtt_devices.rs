//! MQTT devices: provisioned with `"transport": "mqtt"`, they publish through a real
//! `mosquitto` with `mosquitto_pub` and read `devices/<id>/commands` with `mosquitto_sub`;
//! fleetgate ingests them like WebSocket devices and routes their commands through the broker.

use fleetgate_test_support::{MosquittoServer, RedisServer};
use serde_json::{Value, json};
use tokio::io::{BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use crate::mqtt::{bridged, metric, mosquitto_pub, mosquitto_sub};
use crate::support::{API_KEY, DEADLINE, Node, Raw, eventually};

/// Reads `devices/<id>/commands` with `mosquitto_sub`, one JSON frame per line.
struct CommandsTopic {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl CommandsTopic {
    /// Subscribed once this returns (its SUBACK was read).
    async fn subscribe(broker: &MosquittoServer, device: &str) -> CommandsTopic {
        let topic = format!("devices/{device}/commands");
        let (child, lines) = mosquitto_sub(broker, &["-q", "1", "-t", &topic]).await;
        CommandsTopic {
            _child: child,
            lines,
        }
    }

    /// The next frame fleetgate published (debug lines of `-d` skipped).
    async fn recv(&mut self) -> Value {
        let next = async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                if line.starts_with('{') {
                    return serde_json::from_str(&line).expect("a JSON frame");
                }
            }
            panic!("mosquitto_sub ended");
        };
        tokio::time::timeout(DEADLINE, next)
            .await
            .expect("a frame on the commands topic in time")
    }
}

async fn provision_mqtt(node: &Node, id: &str, groups: &[&str]) {
    let body = json!({"id": id, "groups": groups, "transport": "mqtt"});
    let (s, b) = node.admin("POST", "/v1/devices", Some(body)).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["transport"], "mqtt", "{b}");
}

async fn publish(broker: &MosquittoServer, device: &str, kind: &str, frame: &Value) {
    let topic = format!("devices/{device}/{kind}");
    mosquitto_pub(broker, &topic, frame.to_string().as_bytes()).await;
}

/// A labelled counter of `fleetgate_mqtt_device_messages`, 0 when absent.
async fn outcome(node: &Node, outcome: &str) -> u64 {
    let (_, text) = node.internal_get("/metrics").await;
    let key = format!("fleetgate_mqtt_device_messages_total{{outcome=\"{outcome}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(&key)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn app_subscribed(node: &Node, channel: &str) -> Raw {
    let url = format!("ws://{}/v1/app", node.gateway);
    let mut app = Raw::connect(&url, &[("Authorization", &format!("Bearer {API_KEY}"))]).await;
    app.send(json!({"type": "subscribe", "channel": channel, "id": "s"}))
        .await;
    let answer = app.recv().await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    app
}

fn envelope(device: &str, kind: &str, msgid: &str, qos: u8, payload: Value) -> Value {
    json!({"ver": "1.0", "type": kind, "msgid": msgid, "timestamp": crate::support::now_ms(),
        "from": device, "to": "server", "payload": payload, "qos": qos})
}

/// A broker and two nodes `<prefix>-0`, `<prefix>-1` on one Redis, bridged to it.
async fn two_nodes(prefix: &str) -> (MosquittoServer, RedisServer, Vec<Node>) {
    let broker = MosquittoServer::start();
    let redis = RedisServer::start();
    let url = redis.url();
    let mut nodes = Vec::new();
    for i in 0..2 {
        let id = format!("{prefix}-{i}");
        let env = [
            ("FLEETGATE_REDIS_URLS", url.as_str()),
            ("FLEETGATE_NODE_ID", &id),
        ];
        nodes.push(bridged(&broker, &env).await);
    }
    (broker, redis, nodes)
}

#[tokio::test]
async fn an_mqtt_devices_status_reaches_an_app_subscriber_its_shadow_and_is_acked() {
    let broker = MosquittoServer::start();
    let node = bridged(&broker, &[]).await;
    provision_mqtt(&node, "pump-1", &["farm-a"]).await;
    // A WebSocket device publishing on the broker is not taken for itself.
    node.provision_in("ws-1", &["farm-a"]).await;
    let mut app = app_subscribed(&node, "group:farm-a").await;
    let mut commands = CommandsTopic::subscribe(&broker, "pump-1").await;

    publish(&broker, "ws-1", "status", &json!({"temp": 99})).await;
    // A plain object is a QoS 0 status; an envelope keeps its msgid and QoS.
    publish(&broker, "pump-1", "status", &json!({"temp": 21.5})).await;
    let env = envelope("pump-1", "event", "e-1", 1, json!({"code": "door"}));
    publish(&broker, "pump-1", "events", &env).await;
    // Not JSON: answered with an error on the commands topic, nothing else changes.
    mosquitto_pub(&broker, "devices/pump-1/status", b"not json").await;

    let first = app.recv().await;
    assert_eq!(first["type"], "message", "{first}");
    assert_eq!(
        (
            &first["data"]["from"],
            &first["data"]["type"],
            &first["data"]["payload"]
        ),
        (&json!("pump-1"), &json!("status"), &json!({"temp": 21.5})),
        "{first}"
    );
    let second = app.recv().await;
    assert_eq!(
        (&second["data"]["msgid"], &second["data"]["type"]),
        (&json!("e-1"), &json!("event")),
        "{second}"
    );
    assert_eq!(
        commands.recv().await,
        json!({"type": "ack", "msgid": "e-1"})
    );
    let error = commands.recv().await;
    assert_eq!(
        (&error["type"], &error["payload"]["code"]),
        (&json!("error"), &json!("malformed")),
        "{error}"
    );

    let (s, shadow) = node.admin("GET", "/v1/devices/pump-1/shadow", None).await;
    assert_eq!(s, 200, "{shadow}");
    assert_eq!(shadow["reported"]["temp"], 21.5, "{shadow}");
    let (_, device) = node.admin("GET", "/v1/devices/pump-1", None).await;
    assert_eq!(
        (&device["online"], &device["transport"]),
        (&json!(true), &json!("mqtt")),
        "{device}"
    );
    // Nothing of ws-1's reached the group; counted instead.
    assert_eq!(outcome(&node, "unknown_device").await, 1);
    assert_eq!(outcome(&node, "claimed").await, 1);
    assert_eq!(metric(&node, "fleetgate_mqtt_devices_held").await, 1);
}

#[tokio::test]
async fn a_rest_command_reaches_an_mqtt_device_and_its_ack_completes_it() {
    let broker = MosquittoServer::start();
    let node = bridged(&broker, &[]).await;
    provision_mqtt(&node, "valve-1", &[]).await;
    let mut commands = CommandsTopic::subscribe(&broker, "valve-1").await;

    // Queued while nobody holds the device: delivered when it first publishes.
    let (s, queued) = node
        .admin(
            "POST",
            "/v1/devices/valve-1/commands",
            Some(json!({"payload": {"open": true}, "qos": 1})),
        )
        .await;
    assert_eq!(s, 202, "{queued}");
    publish(&broker, "valve-1", "status", &json!({"open": false})).await;
    let cmd = commands.recv().await;
    assert_eq!(
        (&cmd["type"], &cmd["msgid"], &cmd["payload"], &cmd["qos"]),
        (
            &json!("command"),
            &queued["msgid"],
            &json!({"open": true}),
            &json!(1)
        ),
        "{cmd}"
    );
    publish(
        &broker,
        "valve-1",
        "acks",
        &json!({"type": "ack", "msgid": cmd["msgid"]}),
    )
    .await;

    // Held now: a REST call waits for the device's answer.
    let call = node.command_in_background(
        "valve-1",
        json!({"payload": {"open": 2}, "qos": 1, "waitMs": 8000}),
    );
    let cmd = commands.recv().await;
    assert_eq!(
        cmd["payload"],
        json!({"open": 2}),
        "acked, not resent: {cmd}"
    );
    let ack = json!({"type": "ack", "msgid": cmd["msgid"], "payload": {"result": {"open": true}}});
    publish(&broker, "valve-1", "acks", &ack).await;
    assert_eq!(
        call.await.unwrap(),
        (
            200,
            json!({"msgid": cmd["msgid"], "result": {"open": true}})
        )
    );

    // QoS 2 while held: command, rec -> rel, comp.
    let call = node.command_in_background(
        "valve-1",
        json!({"payload": {"open": false}, "qos": 2, "waitMs": 8000}),
    );
    let cmd = commands.recv().await;
    assert_eq!(cmd["qos"], 2, "{cmd}");
    let rec = json!({"type": "rec", "msgid": cmd["msgid"], "payload": {"result": "closed"}});
    publish(&broker, "valve-1", "acks", &rec).await;
    assert_eq!(
        commands.recv().await,
        json!({"type": "rel", "msgid": cmd["msgid"]})
    );
    publish(
        &broker,
        "valve-1",
        "acks",
        &json!({"type": "comp", "msgid": cmd["msgid"]}),
    )
    .await;
    assert_eq!(
        call.await.unwrap(),
        (200, json!({"msgid": cmd["msgid"], "result": "closed"}))
    );
}

#[tokio::test]
async fn an_idle_mqtt_device_goes_offline_and_comes_back_with_its_next_message() {
    let broker = MosquittoServer::start();
    let node = bridged(&broker, &[("FLEETGATE_MQTT_DEVICE_IDLE_MS", "300")]).await;
    provision_mqtt(&node, "meter-1", &["farm-a"]).await;
    let mut app = app_subscribed(&node, "presence:farm-a").await;
    publish(&broker, "meter-1", "status", &json!({"kwh": 1})).await;
    let online = app.recv().await;
    assert_eq!(online["data"]["online"], true, "{online}");
    let offline = app.recv().await;
    assert_eq!(offline["data"]["online"], false, "{offline}");
    let (_, device) = node.admin("GET", "/v1/devices/meter-1", None).await;
    assert_eq!(device["online"], false, "{device}");
    publish(&broker, "meter-1", "status", &json!({"kwh": 2})).await;
    let again = app.recv().await;
    assert_eq!(again["data"]["online"], true, "{again}");
    assert_eq!(outcome(&node, "claimed").await, 2);
}

/// Two nodes on Redis share the device topics: the broker hands each message to one of them,
/// and the node that does not hold the device passes it to the one that does. Every message
/// is ingested once, and a command through either node's REST reaches the device.
#[tokio::test]
async fn across_two_nodes_every_message_is_ingested_once_by_the_holder() {
    let (broker, _redis, nodes) = two_nodes("mqtt-node").await;
    provision_mqtt(&nodes[0], "tank-1", &[]).await;
    let mut app = app_subscribed(&nodes[1], "device:tank-1").await;
    let mut commands = CommandsTopic::subscribe(&broker, "tank-1").await;

    const N: u64 = 20;
    for i in 0..N {
        let env = envelope("tank-1", "status", &format!("s{i}"), 1, json!({"n": i}));
        publish(&broker, "tank-1", "status", &env).await;
    }
    let mut seen = Vec::new();
    for _ in 0..N {
        let m = app.recv().await;
        assert_eq!(m["type"], "message", "{m}");
        seen.push(m["data"]["payload"]["n"].as_u64().unwrap());
    }
    let mut acks = Vec::new();
    for _ in 0..N {
        let a = commands.recv().await;
        assert_eq!(a["type"], "ack", "{a}");
        acks.push(a["msgid"].as_str().unwrap().to_owned());
    }
    seen.sort_unstable();
    acks.sort_unstable();
    let mut want: Vec<String> = (0..N).map(|i| format!("s{i}")).collect();
    want.sort_unstable();
    assert_eq!(seen, (0..N).collect::<Vec<_>>(), "each status once");
    assert_eq!(acks, want, "each acked once");
    // Both nodes may claim the device at first (each saw no presence yet); the later claim
    // replaces the earlier, as a newer connection does, and one node holds it.
    let (mut claimed, mut passed, mut held) = (0, 0, 0);
    for node in &nodes {
        claimed += outcome(node, "claimed").await;
        passed += outcome(node, "passed_on").await;
        held += metric(node, "fleetgate_mqtt_devices_held").await;
    }
    assert!((1..=2).contains(&claimed), "claimed {claimed} times");
    assert_eq!(held, 1, "one node holds the device");
    assert!(
        passed > 0,
        "the broker shared the messages between the nodes"
    );

    // Through the REST of the node that does not hold the device.
    let (_, device) = nodes[0].admin("GET", "/v1/devices/tank-1", None).await;
    let other = match device["node"].as_str() {
        Some("mqtt-node-0") => &nodes[1],
        Some("mqtt-node-1") => &nodes[0],
        _ => panic!("held by a node: {device}"),
    };
    let call = other.command_in_background(
        "tank-1",
        json!({"payload": {"fill": 1}, "qos": 1, "waitMs": 8000}),
    );
    let cmd = commands.recv().await;
    assert_eq!(cmd["payload"], json!({"fill": 1}), "{cmd}");
    publish(
        &broker,
        "tank-1",
        "acks",
        &json!({"type": "ack", "msgid": cmd["msgid"]}),
    )
    .await;
    let (s, body) = call.await.unwrap();
    assert_eq!(s, 200, "{body}");
}

/// The node holding an MQTT device drains: it lets go of the device and leaves the shared
/// subscription, and the other node takes every later message.
#[tokio::test]
async fn when_the_holder_drains_the_other_node_takes_the_device_over() {
    let (broker, _redis, mut nodes) = two_nodes("drain-node").await;
    provision_mqtt(&nodes[0], "silo-1", &[]).await;
    publish(&broker, "silo-1", "status", &json!({"level": 0})).await;
    let (_, device) = eventually("a node holds the device", || async {
        let (s, d) = nodes[0].admin("GET", "/v1/devices/silo-1", None).await;
        (d["online"] == true).then_some((s, d))
    })
    .await;
    let holder = match device["node"].as_str() {
        Some("drain-node-0") => 0,
        Some("drain-node-1") => 1,
        _ => panic!("held by a node: {device}"),
    };
    let mut survivor = nodes.remove(1 - holder);
    let mut drained = nodes.pop().unwrap();
    drained.signal("TERM");
    assert!(drained.wait_exit().await.success());
    let mut app = app_subscribed(&survivor, "device:silo-1").await;

    const N: u64 = 10;
    for i in 1..=N {
        let env = envelope("silo-1", "status", &format!("l{i}"), 1, json!({"level": i}));
        publish(&broker, "silo-1", "status", &env).await;
    }
    for i in 1..=N {
        let m = app.recv().await;
        assert_eq!(m["data"]["payload"]["level"], i, "{m}");
    }
    let (_, device) = survivor.admin("GET", "/v1/devices/silo-1", None).await;
    assert_eq!(device["online"], true, "{device}");
    assert_eq!(outcome(&survivor, "claimed").await, 1);
    survivor.signal("TERM");
    assert!(survivor.wait_exit().await.success());
}

/// A status the broker retained is replayed to a node that subscribes: old state, not a new
/// message, so it is not ingested.
#[tokio::test]
async fn a_retained_status_replayed_on_subscribe_is_not_ingested() {
    let broker = MosquittoServer::start();
    let status = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .args([
            "-t",
            "devices/old-1/status",
            "-r",
            "-q",
            "1",
            "-m",
            r#"{"level":1}"#,
        ])
        .status()
        .await
        .expect("mosquitto_pub");
    assert!(status.success());
    let node = bridged(&broker, &[]).await;
    crate::support::eventually("the retained message arrives", || async {
        (outcome(&node, "retained").await == 1).then_some(())
    })
    .await;
    assert_eq!(outcome(&node, "unknown_device").await, 0);
    assert_eq!(outcome(&node, "claimed").await, 0);
}
