//! The example integration `telemetry-consumer` (examples/telemetry-consumer) against a node
//! on Redis: nothing lost across a crash between processing and acknowledging, resumption under
//! the same name, work shared within a group, a dead consumer's records claimed by another,
//! partitions spread over two shards, and the alerts stream.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use fleetgate_test_support::{RedisServer, require_program};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::support::{DEADLINE, Node, Raw, eventually, status};

/// What the simulated crash (`--exit-after`) exits with.
const CRASH_EXIT_CODE: i32 = 3;
/// The bus's default, which the nodes here keep.
const PARTITIONS: u32 = 4;

fn consumer_binary() -> PathBuf {
    let bin = fleetgate_e2e::fleetgate_binary()
        .expect("fleetgate binary")
        .with_file_name("telemetry-consumer");
    assert!(
        bin.exists(),
        "{} missing: `cargo build -p fleetgate-telemetry-consumer` (make test builds every binary)",
        bin.display()
    );
    bin
}

/// A running `telemetry-consumer`, killed on drop.
struct Consumer {
    child: Child,
}

impl Consumer {
    fn start(urls: &[String], name: &str, group: &str, output: &Path, extra: &[&str]) -> Consumer {
        let mut cmd = Command::new(consumer_binary());
        for url in urls {
            cmd.arg("--redis-url").arg(url);
        }
        cmd.args(["--consumer", name, "--group", group])
            .args(["--partitions", &PARTITIONS.to_string()])
            .arg("--output")
            .arg(output)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        Consumer {
            child: cmd.spawn().expect("start telemetry-consumer"),
        }
    }

    /// Stops it with SIGTERM, as a supervisor would.
    fn terminate(&self) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    async fn exit_code(&mut self) -> Option<i32> {
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("consumer exited in time")
            .expect("wait")
            .code()
    }
}

/// A fresh output file path (the consumer creates it).
fn output_path(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "fleetgate-e2e-consumer-{}-{}-{name}.jsonl",
        std::process::id(),
        crate::support::now_ms()
    ));
    let _ = std::fs::remove_file(&path);
    path
}

/// The complete lines of an output file (a line being written may lack its newline yet).
fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).expect("output line is JSON"))
        .collect()
}

fn msgids(path: &Path) -> Vec<String> {
    lines(path)
        .iter()
        .filter_map(|l| l["msgid"].as_str().map(str::to_owned))
        .collect()
}

fn redis_cli(redis: &RedisServer, args: &[&str]) -> String {
    let out = std::process::Command::new(require_program("redis-cli", "redis-tools"))
        .args(["-h", "127.0.0.1", "-p", &redis.port().to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli");
    // An error reply (a stream or group not made yet) comes back as text for the caller.
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Entries handed out to `group` and not acknowledged, over every telemetry partition.
fn pending(redis: &RedisServer, group: &str) -> u64 {
    (0..PARTITIONS)
        .map(|p| {
            let reply = redis_cli(redis, &["XPENDING", &format!("fleetgate:tm:{p}"), group]);
            let count = reply.lines().next().unwrap_or_default();
            count
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("XPENDING: {reply}"))
        })
        .sum()
}

/// Names of the consumers `group` has on `stream`.
fn consumers(redis: &RedisServer, stream: &str, group: &str) -> Vec<String> {
    let reply = redis_cli(redis, &["XINFO", "CONSUMERS", stream, group]);
    let fields: Vec<&str> = reply.lines().collect();
    fields
        .windows(2)
        .filter(|w| w[0] == "name")
        .map(|w| w[1].to_owned())
        .collect()
}

/// `devices` devices (IDs `<tag>-<i>`) each send `each` QoS 1 statuses; returns the msgids,
/// every one acked, so each is in a telemetry stream.
async fn send_statuses(node: &Node, tag: &str, devices: usize, each: usize) -> BTreeSet<String> {
    let mut sent = BTreeSet::new();
    for d in 0..devices {
        let device = format!("{tag}-{d}");
        let secret = node.provision(&device).await;
        let mut raw = Raw::authed(&node.device_url(), &device, &secret).await;
        for i in 0..each {
            let msgid = format!("{device}-m{i}");
            raw.send(status(&device, &msgid, 1, json!({"n": i}))).await;
            assert_eq!(raw.recv().await, json!({"type": "ack", "msgid": msgid}));
            sent.insert(msgid);
        }
    }
    sent
}

/// Waits until every msgid of `sent` is in one of the `outputs`.
async fn all_processed(sent: &BTreeSet<String>, outputs: &[&Path]) {
    eventually("every record in the output", || async {
        let seen: BTreeSet<String> = outputs.iter().flat_map(|p| msgids(p)).collect();
        sent.is_subset(&seen).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_consumer_that_crashes_before_acknowledging_resumes_under_its_name_losing_nothing() {
    let redis = RedisServer::start();
    let urls = [redis.url()];
    let node = Node::start(&[("FLEETGATE_REDIS_URLS", urls[0].as_str())]).await;
    let sent = send_statuses(&node, "resume", 4, 10).await;
    let out = output_path("resume");
    // Claims stay out of it: the restart must find its records by its own name.
    let no_claims = ["--claim-idle-ms", "600000"];

    let mut crashed = Consumer::start(
        &urls,
        "c1",
        "mes",
        &out,
        &[&["--batch", "8", "--exit-after", "13"], &no_claims[..]].concat(),
    );
    assert_eq!(crashed.exit_code().await, Some(CRASH_EXIT_CODE));
    assert_eq!(lines(&out).len(), 13);
    assert!(
        pending(&redis, "mes") > 0,
        "the batch in flight at the crash is still pending"
    );

    let mut resumed = Consumer::start(
        &urls,
        "c1",
        "mes",
        &out,
        &[&["--batch", "8"], &no_claims[..]].concat(),
    );
    all_processed(&sent, &[&out]).await;
    eventually("no pending entry", || async {
        (pending(&redis, "mes") == 0).then_some(())
    })
    .await;
    resumed.terminate();
    assert_eq!(resumed.exit_code().await, Some(0));

    let written = lines(&out);
    assert!(
        written.len() > sent.len(),
        "the records written but not acknowledged before the crash are processed again \
         (at least once): {} lines for {} records",
        written.len(),
        sent.len()
    );
    let first = written
        .iter()
        .find(|l| l["msgid"] == "resume-2-m3")
        .expect("a record");
    assert_eq!(
        (&first["device"], &first["kind"], &first["payload"]),
        (&json!("resume-2"), &json!("status"), &json!({"n": 3}))
    );
    assert!(
        first["stream"]
            .as_str()
            .unwrap()
            .starts_with("fleetgate:tm:")
    );
    assert_eq!(
        consumers(&redis, first["stream"].as_str().unwrap(), "mes"),
        ["c1"]
    );
}

#[tokio::test]
async fn consumers_in_one_group_share_the_records() {
    let redis = RedisServer::start();
    let urls = [redis.url()];
    let node = Node::start(&[("FLEETGATE_REDIS_URLS", urls[0].as_str())]).await;
    let (out_a, out_b) = (output_path("share-a"), output_path("share-b"));
    let mut a = Consumer::start(&urls, "a", "shared", &out_a, &["--batch", "1"]);
    let mut b = Consumer::start(&urls, "b", "shared", &out_b, &["--batch", "1"]);
    // Both must be reading before the records arrive, or the first could take them all.
    eventually("both consumers in the group", || async {
        (0..PARTITIONS)
            .all(|p| consumers(&redis, &format!("fleetgate:tm:{p}"), "shared").len() == 2)
            .then_some(())
    })
    .await;

    let sent = send_statuses(&node, "share", 4, 10).await;
    all_processed(&sent, &[&out_a, &out_b]).await;
    eventually("no pending entry", || async {
        (pending(&redis, "shared") == 0).then_some(())
    })
    .await;
    a.terminate();
    b.terminate();
    assert_eq!(
        (a.exit_code().await, b.exit_code().await),
        (Some(0), Some(0))
    );

    let (by_a, by_b) = (msgids(&out_a), msgids(&out_b));
    assert!(
        !by_a.is_empty() && !by_b.is_empty(),
        "both consumers processed some: {} and {}",
        by_a.len(),
        by_b.len()
    );
    // Without a crash or a claim, each record is handed to one consumer exactly once.
    assert_eq!(by_a.len() + by_b.len(), sent.len());
    let union: BTreeSet<String> = by_a.into_iter().chain(by_b).collect();
    assert_eq!(union, sent);
}

#[tokio::test]
async fn a_dead_consumers_pending_records_are_claimed_by_another_after_the_idle_time() {
    let redis = RedisServer::start();
    let urls = [redis.url()];
    let node = Node::start(&[("FLEETGATE_REDIS_URLS", urls[0].as_str())]).await;
    let sent = send_statuses(&node, "claim", 4, 10).await;
    let (out_dead, out_alive) = (output_path("claim-dead"), output_path("claim-alive"));

    let mut dead = Consumer::start(
        &urls,
        "dead",
        "claims",
        &out_dead,
        &["--batch", "10", "--exit-after", "5"],
    );
    assert_eq!(dead.exit_code().await, Some(CRASH_EXIT_CODE));
    let written_by_dead: BTreeSet<String> = msgids(&out_dead).into_iter().collect();
    assert_eq!(written_by_dead.len(), 5);
    assert!(pending(&redis, "claims") > 0);

    let mut alive = Consumer::start(
        &urls,
        "alive",
        "claims",
        &out_alive,
        &["--batch", "10", "--claim-idle-ms", "500"],
    );
    all_processed(&sent, &[&out_alive]).await;
    eventually("no pending entry", || async {
        (pending(&redis, "claims") == 0).then_some(())
    })
    .await;
    alive.terminate();
    assert_eq!(alive.exit_code().await, Some(0));
    let by_alive: BTreeSet<String> = msgids(&out_alive).into_iter().collect();
    assert!(
        written_by_dead.is_subset(&by_alive),
        "what the dead consumer wrote but never acknowledged is processed again"
    );
}

#[tokio::test]
async fn partitions_are_read_on_the_redis_shard_the_ring_puts_them_on() {
    let shards = [RedisServer::start(), RedisServer::start()];
    let urls = [shards[0].url(), shards[1].url()];
    let node = Node::start(&[("FLEETGATE_REDIS_URLS", urls.join(",").as_str())]).await;
    let sent = send_statuses(&node, "sharded", 8, 3).await;
    for shard in &shards {
        assert!(
            !shard.keys("fleetgate:tm:*").is_empty(),
            "telemetry partitions on both shards, or this test proves nothing"
        );
    }

    let out = output_path("sharded");
    let mut consumer = Consumer::start(&urls, "sharded", "mes", &out, &["--streams", "telemetry"]);
    all_processed(&sent, &[&out]).await;
    consumer.terminate();
    assert_eq!(consumer.exit_code().await, Some(0));
    assert_eq!(lines(&out).len(), sent.len());
}

#[tokio::test]
async fn alerts_are_read_from_the_alerts_stream_created_if_missing() {
    let redis = RedisServer::start();
    let out = output_path("alerts");
    let mut consumer = Consumer::start(&[redis.url()], "a1", "mes", &out, &["--streams", "alerts"]);
    // MKSTREAM: the group is made before any alert exists.
    eventually("the alerts stream and its group", || async {
        redis_cli(&redis, &["XINFO", "GROUPS", "fleetgate:alerts"])
            .contains("mes")
            .then_some(())
    })
    .await;
    let alert = json!({"id": "hot:d1:1", "ruleId": "hot", "device": "d1", "severity": "critical"});
    let id = redis_cli(
        &redis,
        &["XADD", "fleetgate:alerts", "*", "a", &alert.to_string()],
    );

    let line = eventually("the alert in the output", || async {
        lines(&out).into_iter().next()
    })
    .await;
    assert_eq!(
        line,
        json!({"stream": "fleetgate:alerts", "id": id, "device": "d1", "msgid": null, "payload": alert})
    );
    eventually("no pending alert", || async {
        redis_cli(&redis, &["XPENDING", "fleetgate:alerts", "mes"])
            .starts_with('0')
            .then_some(())
    })
    .await;
    consumer.terminate();
    assert_eq!(consumer.exit_code().await, Some(0));
}

#[tokio::test]
async fn pending_records_trimmed_from_the_stream_are_acknowledged_not_retried_forever() {
    let redis = RedisServer::start();
    let key = "fleetgate:tm:0";
    for i in 1..=6 {
        let msgid = format!("t{i}");
        redis_cli(
            &redis,
            &[
                "XADD", key, "*", "device", "d", "msgid", &msgid, "kind", "status", "ts", "1",
                "rcv", "1", "payload", "{}",
            ],
        );
    }
    redis_cli(&redis, &["XGROUP", "CREATE", key, "mes", "0"]);
    // A consumer took four and died; then the stream was trimmed (MAXLEN) under them.
    redis_cli(
        &redis,
        &[
            "XREADGROUP",
            "GROUP",
            "mes",
            "c",
            "COUNT",
            "4",
            "STREAMS",
            key,
            ">",
        ],
    );
    redis_cli(&redis, &["XTRIM", key, "MAXLEN", "3"]);

    let out = output_path("trimmed");
    let mut consumer = Consumer::start(
        &[redis.url()],
        "c",
        "mes",
        &out,
        &["--streams", "telemetry"],
    );
    let expected: BTreeSet<String> = ["t4", "t5", "t6"].map(String::from).into();
    all_processed(&expected, &[&out]).await;
    eventually("no pending entry", || async {
        (pending(&redis, "mes") == 0).then_some(())
    })
    .await;
    consumer.terminate();
    assert_eq!(consumer.exit_code().await, Some(0));
    assert_eq!(msgids(&out), ["t4", "t5", "t6"]);
}

/// The whole path: a rule fires and resolves on a node, and the consumer reads both records
/// of the alert from the stream the node appends them to.
#[tokio::test]
async fn alerts_a_node_raises_reach_the_consumer() {
    let redis = RedisServer::start();
    let urls = [redis.url()];
    let node = Node::start(&[
        ("FLEETGATE_REDIS_URLS", urls[0].as_str()),
        ("FLEETGATE_ALERT_RULES_REFRESH_MS", "100"),
    ])
    .await;
    let out = output_path("raised");
    let mut consumer = Consumer::start(&urls, "raised", "mes", &out, &[]);
    let secret = node.provision_in("hot-1", &["farm-a"]).await;
    let (s, b) = node
        .admin(
            "PUT",
            "/v1/alert-rules/hot",
            Some(
                json!({"name": "Too hot", "target": {"group": "farm-a"}, "severity": "critical",
                "condition": {"threshold": {"tag": "temperature", "op": ">", "value": 80}}}),
            ),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    eventually("the node to load the rule", || async {
        let (_, metrics) = node.internal_get("/metrics").await;
        metrics.contains("fleetgate_alert_rules 1\n").then_some(())
    })
    .await;

    let mut device = Raw::authed(&node.device_url(), "hot-1", &secret).await;
    for (msgid, value) in [("hot", 90.0), ("cool", 70.0)] {
        device
            .send(status(
                "hot-1",
                msgid,
                1,
                json!({"values": [{"tag": "temperature", "value": value}]}),
            ))
            .await;
        assert_eq!(device.recv().await["type"], "ack");
    }

    let states = eventually("the alert opened and resolved in the output", || async {
        let states: Vec<Value> = lines(&out)
            .into_iter()
            .filter(|l| l["stream"] == "fleetgate:alerts")
            .map(|l| {
                assert_eq!((&l["device"], &l["msgid"]), (&json!("hot-1"), &Value::Null));
                l["payload"]["state"].clone()
            })
            .collect();
        (states.len() == 2).then_some(states)
    })
    .await;
    assert_eq!(states, [json!("open"), json!("resolved")]);
    all_processed(&["hot".to_owned(), "cool".to_owned()].into(), &[&out]).await;
    consumer.terminate();
    assert_eq!(consumer.exit_code().await, Some(0));
}
