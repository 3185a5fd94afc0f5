//! Several nodes sharing one Redis: commands cross nodes, queues follow devices.

use fleetgate_test_support::RedisServer;
use serde_json::json;

use crate::support::{Node, Raw};

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

    let call = a.command_in_background(
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

    let call = a.command_in_background(
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

/// Two Redis shards: devices spread over both, and every command crosses nodes whichever
/// shard its device lives on (nodes listen on their channel on every shard).
#[tokio::test]
async fn commands_cross_nodes_for_devices_on_every_redis_shard() {
    let shards = [RedisServer::start(), RedisServer::start()];
    let urls = format!("{},{}", shards[0].url(), shards[1].url());
    let mut nodes = Vec::new();
    for id in ["shard-node-0", "shard-node-1"] {
        nodes.push(
            Node::start(&[
                ("FLEETGATE_REDIS_URLS", urls.as_str()),
                ("FLEETGATE_NODE_ID", id),
            ])
            .await,
        );
    }
    let ids: Vec<String> = (0..16).map(|i| format!("sharded-{i}")).collect();
    let mut devices = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let secret = nodes[0].provision(id).await;
        // Even devices on node 1, odd on node 0; commands go through the other node.
        let home = &nodes[1 - i % 2];
        devices.push(Raw::authed(&home.device_url(), id, &secret).await);
    }
    let on_shard: Vec<usize> = shards
        .iter()
        .map(|s| s.keys("fleetgate:p:sharded-*").len())
        .collect();
    assert_eq!(on_shard.iter().sum::<usize>(), ids.len(), "{on_shard:?}");
    assert!(
        on_shard.iter().all(|&n| n > 0),
        "both shards hold devices: {on_shard:?}"
    );

    let mut answered = 0;
    for (i, (id, device)) in ids.iter().zip(devices.iter_mut()).enumerate() {
        let via = &nodes[i % 2];
        let call =
            via.command_in_background(id, json!({"payload": {"i": i}, "qos": 1, "waitMs": 5000}));
        let cmd = device.recv().await;
        assert_eq!(cmd["payload"], json!({"i": i}));
        device
            .send(json!({"type": "ack", "msgid": cmd["msgid"], "payload": {"result": i}}))
            .await;
        assert_eq!(
            call.await.unwrap(),
            (200, json!({"msgid": cmd["msgid"], "result": i}))
        );
        answered += 1;
    }
    assert_eq!(answered, ids.len());
}

#[tokio::test]
async fn queued_commands_follow_a_device_to_another_node_in_order() {
    let redis = RedisServer::start();
    let nodes = nodes_on(&redis, 2).await;
    let secret = nodes[0].provision("mover").await;
    let first = Raw::authed(&nodes[0].device_url(), "mover", &secret).await;
    drop(first);
    let mut sent = Vec::new();
    // More than the in-flight window (16), so the queue is read in several steps.
    for i in 0..40 {
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
    let qos2 = sent.len() / 2;
    let mut completed = 0;
    while got.len() < sent.len() || completed < qos2 {
        let frame = device.recv().await;
        let answer = match (frame["type"].as_str(), frame["qos"].as_u64()) {
            (Some("command"), Some(1)) => "ack",
            (Some("command"), _) => "rec",
            // Finishing each QoS 2 handshake frees its slot in the in-flight window.
            (Some("rel"), _) => "comp",
            _ => continue,
        };
        match answer {
            "comp" => completed += 1,
            _ => got.push(frame["msgid"].as_str().unwrap().to_owned()),
        }
        device
            .send(json!({"type": answer, "msgid": frame["msgid"]}))
            .await;
    }
    assert_eq!(
        got, sent,
        "every queued command, once, in order, on the other node"
    );
    crate::support::eventually("every handshake finished", || async {
        let (_, seen) = nodes[1].admin("GET", "/v1/devices/mover", None).await;
        (seen["queuedCommands"] == 0).then_some(())
    })
    .await;
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
    // New commands flow after the restart, and their results reach the REST call even when
    // the node had not resubscribed yet when the device answered (the result is stored).
    let call = nodes[0].command_in_background(
        "survivor",
        json!({"payload": {"after": true}, "qos": 1, "waitMs": 5000}),
    );
    let mut redelivered = 0;
    let next = loop {
        let f = device.recv().await;
        if f["msgid"] == queued {
            // At least once: an ack the node could not store during the restart is owed
            // again, as a real device would answer a redelivery.
            redelivered += 1;
            assert!(
                redelivered <= 3,
                "the queued command keeps coming back: {f}"
            );
            device.send(json!({"type": "ack", "msgid": queued})).await;
            continue;
        }
        break f;
    };
    assert_eq!(next["payload"], json!({"after": true}));
    device
        .send(json!({"type": "ack", "msgid": next["msgid"], "payload": {"result": "ok"}}))
        .await;
    assert_eq!(
        call.await.unwrap(),
        (200, json!({"msgid": next["msgid"], "result": "ok"}))
    );
    let (_, dev) = nodes[0].admin("GET", "/v1/devices/survivor", None).await;
    assert_eq!(dev["queuedCommands"], 0, "nothing left owed: {dev}");
}

/// While Redis is away a node keeps its sessions, reports not ready, and refuses new
/// authentications at once (1013 on the auth frame, 503 for header auth); when Redis is back
/// it is ready again without a restart and the kept session still gets commands.
#[tokio::test]
async fn while_redis_is_away_sessions_stay_and_new_auths_are_refused_with_1013() {
    use fleetgate_test_support::RedisOptions;
    let mut redis = RedisServer::start_with(RedisOptions { aof: true });
    let url = redis.url();
    let node = Node::start(&[
        ("FLEETGATE_REDIS_URLS", url.as_str()),
        ("FLEETGATE_NODE_ID", "away-node"),
        ("FLEETGATE_REDIS_COMMAND_TIMEOUT_MS", "1000"),
        // The test does not read the kept socket while Redis is away (its pongs wait).
        ("FLEETGATE_IDLE_TIMEOUT_MS", "30000"),
    ])
    .await;
    let keeper_secret = node.provision("keeper").await;
    let newcomer_secret = node.provision("newcomer").await;
    let leaver_secret = node.provision("leaver").await;
    let mut keeper = Raw::authed(&node.device_url(), "keeper", &keeper_secret).await;
    let leaver = Raw::authed(&node.device_url(), "leaver", &leaver_secret).await;

    redis.kill();
    crate::support::eventually("not ready while Redis is away", || async {
        (node.internal_get("/readyz").await.0 == 503).then_some(())
    })
    .await;
    assert_eq!(
        node.internal_get("/healthz").await.0,
        200,
        "alive all the same"
    );
    // A device that leaves now cannot be marked offline yet.
    drop(leaver);
    let mut newcomer = Raw::connect(&node.device_url(), &[]).await;
    newcomer
        .send(json!({"type": "auth", "deviceId": "newcomer", "token": newcomer_secret}))
        .await;
    let closed = newcomer.closed().await;
    assert_eq!(closed.code, 1013, "{closed:?}");
    assert!(closed.reason.contains("retry-after="), "{closed:?}");
    let bearer = format!("Bearer {newcomer_secret}");
    assert_eq!(
        Raw::try_connect(
            &node.device_url(),
            &[("Device-ID", "newcomer"), ("Authorization", &bearer)]
        )
        .await
        .err(),
        Some(503)
    );

    redis.restart();
    crate::support::eventually("ready again once Redis is back", || async {
        (node.internal_get("/readyz").await.0 == 200).then_some(())
    })
    .await;
    let call = node.command_in_background(
        "keeper",
        json!({"payload": {"still": "here"}, "qos": 1, "waitMs": 5000}),
    );
    let cmd = keeper.recv().await;
    assert_eq!(cmd["payload"], json!({"still": "here"}));
    keeper
        .send(json!({"type": "ack", "msgid": cmd["msgid"], "payload": {"result": 1}}))
        .await;
    assert_eq!(
        call.await.unwrap(),
        (200, json!({"msgid": cmd["msgid"], "result": 1}))
    );
    Raw::authed(&node.device_url(), "newcomer", &newcomer_secret).await;
    // The device that left while Redis was away reads offline once the node resynced.
    crate::support::eventually("the leaver reads offline", || async {
        let (_, dev) = node.admin("GET", "/v1/devices/leaver", None).await;
        (dev["online"] == false).then_some(())
    })
    .await;
}

/// Redis restarted without persistence has forgotten every session: nodes notice when their
/// subscriptions come back and ask their devices to reconnect (1012 with a retry-after),
/// instead of holding sessions nothing can route to.
#[tokio::test]
async fn sessions_the_bus_forgot_are_asked_to_reconnect() {
    let mut redis = RedisServer::start();
    let nodes = nodes_on(&redis, 1).await;
    let secret = nodes[0].provision("forgotten").await;
    let mut device = Raw::authed(&nodes[0].device_url(), "forgotten", &secret).await;
    redis.restart();
    let closed = device.closed().await;
    assert_eq!(closed.code, 1012, "{closed:?}");
    assert!(
        closed.reason.contains("retry-after="),
        "the device is told when to come back: {closed:?}"
    );
}

/// Two nodes (the first named [`LEAVING`]) on one Redis behind the nginx ingress, with `env` on both.
struct BehindIngress {
    _redis: RedisServer,
    nodes: Vec<Node>,
    _nginx: fleetgate_test_support::NginxServer,
    ingress: String,
}

impl BehindIngress {
    async fn start(staying: &str, env: &[(&str, &str)]) -> Self {
        let redis = RedisServer::start();
        let url = redis.url();
        let mut nodes = Vec::new();
        for id in [LEAVING, staying] {
            let mut all = vec![
                ("FLEETGATE_REDIS_URLS", url.as_str()),
                ("FLEETGATE_NODE_ID", id),
            ];
            all.extend_from_slice(env);
            nodes.push(Node::start(&all).await);
        }
        let nginx = fleetgate_test_support::NginxServer::start(
            &nodes.iter().map(|n| n.gateway.clone()).collect::<Vec<_>>(),
        );
        let ingress = format!("ws://{}/v1/device", nginx.addr());
        Self {
            _redis: redis,
            nodes,
            _nginx: nginx,
            ingress,
        }
    }

    /// Authenticates a device through the ingress.
    async fn connect(&self, id: &str, secret: &str) -> Raw {
        let mut raw = Raw::connect(&self.ingress, &[("Device-ID", id)]).await;
        raw.send(json!({"type": "auth", "deviceId": id, "token": secret}))
            .await;
        assert_eq!(
            raw.recv().await["status"],
            "success",
            "{id} through the ingress"
        );
        raw
    }

    /// Connects 16 devices named `<prefix>-<i>` and keeps those the ingress put on the leaving
    /// node.
    async fn devices_on_leaving(&self, prefix: &str) -> Vec<(String, String, Raw)> {
        let (leaving, staying) = (&self.nodes[0], &self.nodes[1]);
        let (_, who) = leaving.admin("GET", "/v1/nodes", None).await;
        assert!(
            who["nodes"].as_array().is_some_and(|n| n.len() == 2),
            "{who}"
        );
        let mut kept = Vec::new();
        for i in 0..16 {
            let id = format!("{prefix}-{i}");
            let secret = staying.provision(&id).await;
            let raw = self.connect(&id, &secret).await;
            let (_, seen) = staying
                .admin("GET", &format!("/v1/devices/{id}"), None)
                .await;
            if seen["node"] == LEAVING {
                kept.push((id, secret, raw));
            }
        }
        assert!(!kept.is_empty(), "some devices hashed to the leaving node");
        kept
    }
}

/// Node ID of the node the failure tests stop.
const LEAVING: &str = "leaving";

#[tokio::test]
async fn kill_9_of_a_node_moves_its_devices_and_every_queued_command_is_delivered() {
    let cluster = BehindIngress::start(
        "survivor",
        &[
            ("FLEETGATE_NODE_TTL_MS", "900"),
            ("FLEETGATE_ACK_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    let survivor = &cluster.nodes[1];
    let mut on_victim = cluster.devices_on_leaving("k9").await;

    // Each of them gets a QoS 2 and a QoS 1 command and answers neither before the crash.
    let mut queued = Vec::new();
    for (id, _, raw) in &mut on_victim {
        let mut ids = Vec::new();
        for qos in [2, 1] {
            let (status, body) = survivor
                .admin(
                    "POST",
                    &format!("/v1/devices/{id}/commands"),
                    Some(json!({"payload": {"qos": qos}, "qos": qos})),
                )
                .await;
            assert_eq!(status, 202, "{body}");
            ids.push(body["msgid"].clone());
            assert_eq!(
                raw.recv().await["msgid"],
                body["msgid"],
                "delivered by the victim first"
            );
        }
        queued.push(ids);
    }

    cluster.nodes[0].signal("KILL");

    let mut delivered = 0;
    for ((id, secret, mut raw), ids) in on_victim.into_iter().zip(queued) {
        raw.closed().await;
        // The device reconnects through the ingress, which skips the dead node.
        let mut raw = cluster.connect(&id, &secret).await;
        let (_, seen) = survivor
            .admin("GET", &format!("/v1/devices/{id}"), None)
            .await;
        assert_eq!(seen["node"], "survivor");
        // Both commands come again, in order, marked as duplicates.
        let qos2 = raw.recv().await;
        assert_eq!(
            (qos2["msgid"].clone(), qos2["dup"].clone()),
            (ids[0].clone(), json!(true)),
            "{qos2}"
        );
        raw.send(json!({"type": "rec", "msgid": ids[0]})).await;
        let mut rel_seen = false;
        let mut qos1_seen = false;
        while !(rel_seen && qos1_seen) {
            let f = raw.recv().await;
            match (f["type"].as_str(), &f["msgid"]) {
                (Some("rel"), m) if *m == ids[0] => {
                    rel_seen = true;
                    raw.send(json!({"type": "comp", "msgid": ids[0]})).await;
                }
                // QoS 1 may come twice (a retransmit crossing the ack): ack it again.
                (Some("command"), m) if *m == ids[1] => {
                    qos1_seen = true;
                    raw.send(json!({"type": "ack", "msgid": ids[1]})).await;
                }
                (Some("command"), m) if *m == ids[0] => {
                    panic!("the QoS 2 command is not delivered again after rec: {f}")
                }
                _ => panic!("unexpected frame {f}"),
            }
        }
        delivered += 2;
        // Nothing of it is left queued: a fresh command is the next thing the device sees.
        let call = survivor.command_in_background(
            &id,
            json!({"payload": {"fresh": true}, "qos": 1, "waitMs": 5000}),
        );
        let fresh = loop {
            let f = raw.recv().await;
            if f["type"] == "command" && f["payload"] == json!({"fresh": true}) {
                break f;
            }
            assert_ne!(f["msgid"], ids[0], "no QoS 2 redelivery after comp");
        };
        raw.send(json!({"type": "ack", "msgid": fresh["msgid"]}))
            .await;
        assert_eq!(call.await.unwrap().0, 200);
    }
    assert!(delivered >= 2);
}

#[tokio::test]
async fn sigterm_drain_moves_devices_to_the_other_node_with_no_command_lost() {
    let mut cluster =
        BehindIngress::start("staying", &[("FLEETGATE_DRAIN_PERIOD_MS", "600")]).await;
    let mut moving = cluster.devices_on_leaving("dr").await;
    let staying = &cluster.nodes[1];
    // One command each, delivered by the draining node and not answered yet.
    let mut pending = Vec::new();
    for (id, _, raw) in &mut moving {
        let (status, body) = staying
            .admin(
                "POST",
                &format!("/v1/devices/{id}/commands"),
                Some(json!({"payload": {"before": true}, "qos": 1})),
            )
            .await;
        assert_eq!(status, 202);
        assert_eq!(raw.recv().await["msgid"], body["msgid"]);
        pending.push(body["msgid"].clone());
    }

    cluster.nodes[0].signal("TERM");

    for ((id, secret, mut raw), msgid) in moving.into_iter().zip(pending) {
        let closed = raw.closed().await;
        assert_eq!(closed.code, 1012, "{id}: {closed:?}");
        assert!(closed.reason.contains("retry-after="), "{closed:?}");
        // Back through the ingress: the draining node refuses upgrades (503), so it goes on.
        let mut raw = cluster.connect(&id, &secret).await;
        let again = raw.recv().await;
        assert_eq!(
            (again["msgid"].clone(), again["dup"].clone()),
            (msgid.clone(), json!(true)),
            "the unanswered command follows the device"
        );
        raw.send(json!({"type": "ack", "msgid": msgid})).await;
        let (_, seen) = staying
            .admin("GET", &format!("/v1/devices/{id}"), None)
            .await;
        assert_eq!(seen["node"], "staying");
    }
    let exit = cluster.nodes[0].wait_exit().await;
    assert!(exit.success(), "the drained node exits cleanly: {exit:?}");
}

/// `fleetgate gateway` and `fleetgate admin` as separate processes, meeting only through
/// Redis: the admin process provisions, lists the gateway among the nodes, and sends a
/// command whose result comes back from the gateway process.
#[tokio::test]
async fn gateway_and_admin_run_as_separate_processes() {
    let redis = RedisServer::start();
    let url = redis.url();
    let common = [
        ("FLEETGATE_REDIS_URLS", url.as_str()),
        ("FLEETGATE_API_KEY", crate::support::API_KEY),
        ("FLEETGATE_LISTEN", "127.0.0.1:0"),
        ("FLEETGATE_ADMIN_LISTEN", "127.0.0.1:0"),
        ("FLEETGATE_INTERNAL_LISTEN", "127.0.0.1:0"),
        ("FLEETGATE_ACK_TIMEOUT_MS", "300"),
        ("RUST_LOG", "warn"),
    ];
    let start = |role: &'static str, id: &'static str| {
        let mut env = common.to_vec();
        env.push(("FLEETGATE_NODE_ID", id));
        async move {
            fleetgate_e2e::spawn_role(role, &env, crate::support::DEADLINE)
                .await
                .expect("start")
        }
    };
    let (_gw, gw) = start("gateway", "split-gateway").await;
    let (_admin, admin) = start("admin", "split-admin").await;
    assert_eq!(
        (gw.contains_key("admin"), admin.contains_key("gateway")),
        (false, false),
        "each role serves only its own listener: {gw:?} {admin:?}"
    );
    let http = reqwest::Client::new();
    let api = |path: &str| format!("http://{}{path}", admin["admin"]);
    let resp = http
        .post(api("/v1/devices"))
        .bearer_auth(crate::support::API_KEY)
        .json(&json!({"id": "split-dev"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let secret = resp.json::<serde_json::Value>().await.unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let nodes: serde_json::Value = http
        .get(api("/v1/nodes"))
        .bearer_auth(crate::support::API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        nodes.to_string().contains("split-gateway"),
        "the gateway process is a member: {nodes}"
    );
    let mut device = Raw::authed(
        &format!("ws://{}/v1/device", gw["gateway"]),
        "split-dev",
        &secret,
    )
    .await;
    let call = tokio::spawn(
        http.post(api("/v1/devices/split-dev/commands"))
            .bearer_auth(crate::support::API_KEY)
            .json(&json!({"payload": {"hello": 1}, "qos": 2, "waitMs": 5000}))
            .send(),
    );
    let cmd = device.recv().await;
    assert_eq!(
        (cmd["qos"].as_u64(), &cmd["payload"]),
        (Some(2), &json!({"hello": 1}))
    );
    device
        .send(json!({"type": "rec", "msgid": cmd["msgid"], "payload": {"result": "hi"}}))
        .await;
    let rel = device.recv().await;
    assert_eq!(
        (rel["type"].as_str(), &rel["msgid"]),
        (Some("rel"), &cmd["msgid"])
    );
    device
        .send(json!({"type": "comp", "msgid": cmd["msgid"]}))
        .await;
    let resp = call.await.unwrap().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap(),
        json!({"msgid": cmd["msgid"], "result": "hi"})
    );
    for internal in [&gw["internal"], &admin["internal"]] {
        let ready = http
            .get(format!("http://{internal}/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status().as_u16(), 200, "{internal}");
    }
}

/// Adding a shard the way an operator does: stop the nodes, `fleetgate reshard --apply`,
/// start them on the longer list. Every queued command still reaches its device, whichever
/// shard the device now lives on.
#[tokio::test]
async fn adding_a_shard_with_fleetgate_reshard_keeps_every_queued_command() {
    let shards = [RedisServer::start(), RedisServer::start()];
    let before = shards[0].url();
    let after = format!("{},{}", shards[0].url(), shards[1].url());
    let mut old = Node::start(&[
        ("FLEETGATE_REDIS_URLS", before.as_str()),
        ("FLEETGATE_NODE_ID", "resharded"),
    ])
    .await;
    let ids: Vec<String> = (0..16).map(|i| format!("grow-{i}")).collect();
    let mut owed = Vec::new();
    for id in &ids {
        let secret = old.provision(id).await;
        let (status, body) = old
            .admin(
                "POST",
                &format!("/v1/devices/{id}/commands"),
                Some(json!({"payload": {"for": id}, "qos": 1, "ttlMs": 600000})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        owed.push((id.clone(), secret, body["msgid"].clone()));
    }
    // A clean stop leaves membership, so the tool sees no live node.
    old.signal("TERM");
    assert!(old.wait_exit().await.success());

    let bin = fleetgate_e2e::fleetgate_binary().unwrap();
    let run = |apply: bool| {
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["reshard", "--from", &before, "--to", &after]);
        if apply {
            cmd.arg("--apply");
        }
        let out = cmd.output().expect("run fleetgate reshard");
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON report")
    };
    let plan = run(false);
    assert_eq!(plan["applied"], false);
    assert!(
        shards[1].keys("fleetgate:*").is_empty(),
        "a dry run moves nothing"
    );
    let done = run(true);
    assert_eq!(
        (done["applied"].clone(), done["moved"].clone()),
        (json!(true), plan["moved"].clone())
    );
    assert!(
        !shards[1].keys("fleetgate:q:grow-*").is_empty(),
        "some queues moved to the new shard: {done}"
    );

    let node = Node::start(&[
        ("FLEETGATE_REDIS_URLS", after.as_str()),
        ("FLEETGATE_NODE_ID", "resharded"),
    ])
    .await;
    let mut delivered = 0;
    for (id, secret, msgid) in owed {
        let mut device = Raw::authed(&node.device_url(), &id, &secret).await;
        let cmd = device.recv().await;
        assert_eq!(
            (cmd["msgid"].clone(), cmd["payload"]["for"].as_str()),
            (msgid, Some(id.as_str()))
        );
        delivered += 1;
    }
    assert_eq!(delivered, ids.len());
}

/// SIGTERM while Redis is away: the node still closes its sessions with 1012 and exits 0
/// without waiting out a Redis timeout per goodbye (its membership and presence expire).
#[tokio::test]
async fn sigterm_while_redis_is_away_still_drains_and_exits() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let mut node = Node::start(&[
        ("FLEETGATE_REDIS_URLS", url.as_str()),
        ("FLEETGATE_NODE_ID", "orphan"),
        ("FLEETGATE_DRAIN_PERIOD_MS", "2000"),
    ])
    .await;
    let secret = node.provision("orphaned").await;
    let mut device = Raw::authed(&node.device_url(), "orphaned", &secret).await;
    // An acknowledged message: the session is past its start-up bus calls.
    device
        .send(crate::support::status(
            "orphaned",
            "before",
            1,
            json!({"t": 1}),
        ))
        .await;
    assert_eq!(device.recv().await["type"], "ack");
    redis.kill();
    crate::support::eventually("not ready while Redis is away", || async {
        (node.internal_get("/readyz").await.0 == 503).then_some(())
    })
    .await;
    node.signal("TERM");
    assert_eq!(device.closed().await.code, 1012);
    assert!(node.wait_exit().await.success());
}
