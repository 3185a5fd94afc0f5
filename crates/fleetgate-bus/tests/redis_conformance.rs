//! The conformance suite against [`RedisBus`] on a real `redis-server`, plus sharding checks
//! against two servers and behaviour only the Redis backend has (drop counters, readiness).
//!
//! The servers are started once per test binary (each `#[tokio::test]` has its own runtime,
//! so only the server processes are shared; every test connects its own `RedisBus`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetgate_bus::conformance::{PATIENCE, node_info, now_ms, unique_id, wait_until};
use fleetgate_bus::redis::{RedisBus, RedisBusConfig};
use fleetgate_bus::{Bus, BusError, Channel, Command, NodeMessage, Presence};
use fleetgate_protocol::{MsgId, Qos};
use serde_json::json;

/// Servers shared by the whole test binary (the harness kills them when the process exits).
mod support {
    use std::sync::OnceLock;

    use fleetgate_test_support::RedisServer;

    /// The server the conformance suite runs against.
    pub fn shared() -> &'static RedisServer {
        static SERVER: OnceLock<RedisServer> = OnceLock::new();
        SERVER.get_or_init(RedisServer::start)
    }

    /// Two servers shared by the sharding tests.
    pub fn pair() -> &'static [RedisServer; 2] {
        static SERVERS: OnceLock<[RedisServer; 2]> = OnceLock::new();
        SERVERS.get_or_init(|| [RedisServer::start(), RedisServer::start()])
    }
}

fn config(urls: Vec<String>) -> RedisBusConfig {
    RedisBusConfig {
        urls,
        ..RedisBusConfig::default()
    }
}

async fn connect(urls: Vec<String>) -> RedisBus {
    RedisBus::connect(config(urls)).await.expect("connect")
}

async fn shared_bus() -> RedisBus {
    connect(vec![support::shared().url()]).await
}

async fn sharded_bus() -> RedisBus {
    let [a, b] = support::pair();
    connect(vec![a.url(), b.url()]).await
}

mod conformance {
    use std::sync::Arc;

    fleetgate_bus::bus_conformance_tests!(async { Arc::new(super::shared_bus().await) });
}

fn command(device: &str, msgid: &str, expires_ms: i64) -> Command {
    Command {
        msgid: MsgId::new(msgid).expect("msgid"),
        device: device.into(),
        payload: json!({"n": 1}),
        qos: Qos::AtLeastOnce,
        created_ms: 0,
        expires_ms,
        reply_to: None,
        traceparent: None,
        job: None,
    }
}

/// A raw connection to one server, to look at keys directly.
async fn raw(url: &str) -> fred::clients::Client {
    use fred::interfaces::ClientLike;
    let client =
        fred::types::Builder::from_config(fred::types::config::Config::from_url(url).expect("url"))
            .build()
            .expect("client");
    client.init().await.expect("raw connect");
    client
}

async fn exists(client: &fred::clients::Client, key: &str) -> bool {
    use fred::interfaces::KeysInterface;
    client.exists::<i64, _>(key).await.expect("exists") == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut cfg = config(vec![format!("redis://127.0.0.1:{port}")]);
    cfg.connect_timeout = Duration::from_millis(500);
    match RedisBus::connect(cfg).await {
        Err(BusError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(matches!(
        RedisBus::connect(config(vec![])).await,
        Err(BusError::Unavailable(_))
    ));
}

/// Telemetry partitions are plain Redis streams that downstream consumers read with consumer
/// groups (`XREADGROUP`, `XACK`): every record once, in order per device, with named fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_streams_serve_consumer_groups() {
    use fleetgate_bus::TelemetryRecord;
    use fleetgate_protocol::MessageKind;
    use fred::interfaces::ClientLike;
    use fred::types::{ClusterHash, CustomCommand, Value};

    let prefix = format!("{}:", unique_id("tg"));
    let bus = RedisBus::connect(RedisBusConfig {
        key_prefix: prefix.clone(),
        ..config(vec![support::shared().url()])
    })
    .await
    .expect("connect");
    let devices: Vec<String> = (0..6).map(|i| format!("cg-{i}")).collect();
    let mut sent = 0;
    for n in 0..5 {
        let records: Vec<TelemetryRecord> = devices
            .iter()
            .map(|d| TelemetryRecord {
                device: d.clone(),
                msgid: format!("m{n}"),
                kind: MessageKind::Status,
                timestamp: n,
                received_ms: n,
                payload: json!({ "n": n }),
            })
            .collect();
        sent += records.len();
        bus.telemetry_append(&records).await.unwrap();
    }
    let redis = raw(&support::shared().url()).await;
    let call = |args: Vec<&str>| {
        let redis = redis.clone();
        let args: Vec<Value> = args
            .into_iter()
            .map(|a| Value::from(a.to_owned()))
            .collect();
        let cmd = args[0].as_str().unwrap().to_string();
        async move {
            redis
                .custom::<Value, Value>(
                    CustomCommand::new(cmd, ClusterHash::FirstKey, false),
                    args[1..].to_vec(),
                )
                .await
                .expect("redis command")
        }
    };
    // What the group has not been given yet, up to 1000 entries.
    let read_group = |key: &str| {
        call(vec![
            "XREADGROUP",
            "GROUP",
            "analytics",
            "c1",
            "COUNT",
            "1000",
            "STREAMS",
            key,
            ">",
        ])
    };
    let mut per_device: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut read = 0;
    for p in 0..bus.telemetry_partitions() {
        let key = format!("{prefix}tm:{p}");
        call(vec!["XGROUP", "CREATE", &key, "analytics", "0", "MKSTREAM"]).await;
        let reply = read_group(&key).await;
        let mut ids = Vec::new();
        if let Value::Array(streams) = reply {
            for stream in streams {
                let Value::Array(mut kv) = stream else {
                    panic!("stream entry")
                };
                let Value::Array(entries) = kv.remove(1) else {
                    panic!("entries")
                };
                for entry in entries {
                    let Value::Array(mut e) = entry else {
                        panic!("entry")
                    };
                    let Value::Array(fields) = e.remove(1) else {
                        panic!("fields")
                    };
                    ids.push(e.remove(0).as_string().unwrap());
                    let fields: Vec<String> =
                        fields.into_iter().map(|f| f.as_string().unwrap()).collect();
                    let names: Vec<&str> = fields.iter().step_by(2).map(String::as_str).collect();
                    assert_eq!(names, ["device", "msgid", "kind", "ts", "rcv", "payload"]);
                    per_device
                        .entry(fields[1].clone())
                        .or_default()
                        .push(fields[3].clone());
                    read += 1;
                }
            }
        }
        for id in &ids {
            call(vec!["XACK", &key, "analytics", id]).await;
        }
        let again = read_group(&key).await;
        assert!(again.is_null(), "nothing new for the group: {again:?}");
        let pending = call(vec!["XPENDING", &key, "analytics"]).await;
        let Value::Array(summary) = pending else {
            panic!("xpending")
        };
        assert_eq!(
            summary[0].clone().as_i64(),
            Some(0),
            "every entry acknowledged"
        );
    }
    assert_eq!(read, sent, "every record once");
    for d in &devices {
        assert_eq!(
            per_device[d],
            ["m0", "m1", "m2", "m3", "m4"],
            "{d}: in order"
        );
    }
    let _ = redis.quit().await;
}

/// A bus of its own key prefix on the shared server: state no other test touches.
async fn private_bus(tag: &str, f: impl FnOnce(&mut RedisBusConfig)) -> (RedisBus, String) {
    let prefix = format!("{}:", unique_id(tag));
    let mut cfg = RedisBusConfig {
        key_prefix: prefix.clone(),
        ..config(vec![support::shared().url()])
    };
    f(&mut cfg);
    (RedisBus::connect(cfg).await.expect("connect"), prefix)
}

/// With the log to itself, a test sees the head exactly: missing reads as empty, every
/// append sets it (one of no entries too, which is not the same as a refused one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_head_of_a_log_of_its_own() {
    use fleetgate_bus::StreamId;
    let (bus, prefix) = private_bus("raudit", |_| {}).await;
    assert_eq!(bus.audit_head().await.unwrap(), "");
    assert!(bus.audit_read(None, 10).await.unwrap().is_empty());
    assert_eq!(
        bus.audit_append("x", "h1", &["e".into()]).await.unwrap(),
        None
    );
    let ids = bus
        .audit_append("", "h1", &["e1".into(), "e2".into()])
        .await
        .unwrap()
        .expect("appended on the empty head");
    assert_eq!(bus.audit_head().await.unwrap(), "h1");
    assert_eq!(
        bus.audit_append("h1", "h2", &[]).await.unwrap(),
        Some(Vec::new()),
        "nothing appended, head moved"
    );
    assert_eq!(bus.audit_head().await.unwrap(), "h2");
    assert_eq!(
        bus.audit_append("h1", "h3", &["late".into()])
            .await
            .unwrap(),
        None
    );
    let all = bus.audit_read(None, 10).await.unwrap();
    let entries: Vec<(&StreamId, &str)> = all.iter().map(|r| (&r.id, r.entry.as_str())).collect();
    assert_eq!(entries, [(&ids[0], "e1"), (&ids[1], "e2")]);
    let redis = raw(&support::shared().url()).await;
    assert!(exists(&redis, &format!("{prefix}audit")).await);
    assert!(exists(&redis, &format!("{prefix}audit:head")).await);
    let _ = fred::interfaces::ClientLike::quit(&redis).await;
}

/// Every write to a job's keys restarts their expiry at the configured retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_keys_expire_after_the_retention() {
    use fleetgate_bus::{JobExecState, JobPush};
    use fred::interfaces::KeysInterface;
    let retention = Duration::from_secs(600);
    let (bus, prefix) = private_bus("rjob", |c| c.job_retention = retention).await;
    let dev = unique_id("rjdev");
    let job = unique_id("rjob");
    let c = Command {
        job: Some(job.clone()),
        ..command(&dev, "j", now_ms() + 60_000)
    };
    assert_eq!(bus.job_push(&job, &[c]).await.unwrap(), [JobPush::Queued]);
    let redis = raw(&support::shared().url()).await;
    let ttls = || async {
        let mut out = Vec::new();
        for tag in ["jx:", "jxi:", "jc:", "jq:"] {
            let ttl: i64 = redis.pttl(format!("{prefix}{tag}{job}")).await.unwrap();
            out.push(ttl);
        }
        out
    };
    let limit = i64::try_from(retention.as_millis()).unwrap();
    for ttl in ttls().await {
        assert!(
            ttl > 0 && ttl <= limit,
            "expiry {ttl} ms, retention {limit} ms"
        );
    }
    assert!(
        bus.job_record(&job, &dev, JobExecState::Delivered)
            .await
            .unwrap()
    );
    let after = ttls().await;
    assert!(
        after[..3].iter().all(|&t| t > 0 && t <= limit),
        "refreshed: {after:?}"
    );
    assert_eq!(after[3], -2, "nothing queued is left: the set is gone");
    bus.queue_ack(&dev, "j").await.unwrap();
    let _ = fred::interfaces::ClientLike::quit(&redis).await;
}

/// A record that no longer decodes can still be replaced or deleted (its groups are unknown
/// then, so they are left as they are).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_records_can_be_replaced_and_deleted() {
    use fleetgate_bus::{DeviceQuery, DeviceRecord};
    use fred::interfaces::KeysInterface;
    let (bus, prefix) = private_bus("rbad", |_| {}).await;
    let record = |id: &str, groups: &[&str]| DeviceRecord {
        id: id.to_owned(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        secret_sha256: [1; 32],
        created_ms: 1,
        revoked: false,
        transport: Default::default(),
        mac_key: None,
        revoked_certs: Vec::new(),
    };
    let redis = raw(&support::shared().url()).await;
    for id in ["replaced", "deleted"] {
        assert!(bus.device_create(&record(id, &["g"])).await.unwrap());
        let _: () = redis
            .set(format!("{prefix}dev:{id}"), "{not json", None, None, false)
            .await
            .unwrap();
        assert!(matches!(
            bus.device_get(id).await,
            Err(BusError::Corrupt(_))
        ));
    }
    assert!(
        bus.device_update(&record("replaced", &["h"]))
            .await
            .unwrap()
    );
    assert_eq!(
        bus.device_get("replaced").await.unwrap(),
        Some(record("replaced", &["h"]))
    );
    assert!(bus.device_delete("deleted").await.unwrap());
    assert_eq!(bus.device_get("deleted").await.unwrap(), None);
    let in_h = bus
        .device_query(&DeviceQuery {
            groups: Some(vec!["h".into()]),
            limit: 10,
            ..DeviceQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(in_h, [record("replaced", &["h"])]);
    let _ = fred::interfaces::ClientLike::quit(&redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_stats() {
    let bus = shared_bus().await;
    assert!(bus.is_connected());
    assert_eq!(bus.shard_count(), 1);
    assert_eq!(bus.stats().dropped_messages, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_drops_are_counted() {
    let mut cfg = config(vec![support::shared().url()]);
    cfg.subscription_capacity = 4;
    let bus = RedisBus::connect(cfg).await.expect("connect");
    let ch = Channel::Device(unique_id("rslow"));
    let mut slow = bus.subscribe(&ch).await.unwrap();
    let mut fast = bus.subscribe(&ch).await.unwrap();
    assert_eq!(bus.subscriber_count(&ch), 2);
    for i in 0..10u8 {
        bus.publish(&ch, Bytes::from(vec![i]), false).await.unwrap();
        assert_eq!(fast.recv().await.unwrap().frame, Bytes::from(vec![i]));
    }
    wait_until("6 of 10 frames dropped", PATIENCE, || async {
        bus.stats().dropped_messages == 6
    })
    .await;
    for i in 0..4u8 {
        assert_eq!(slow.recv().await.unwrap().frame, Bytes::from(vec![i]));
    }
    drop(slow);
    drop(fast);
    assert_eq!(bus.subscriber_count(&ch), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_subscribe_replaces_and_drops_are_counted() {
    let mut cfg = config(vec![support::shared().url()]);
    cfg.node_channel_capacity = 2;
    let bus = RedisBus::connect(cfg).await.expect("connect");
    let n = unique_id("rnode");
    let msg = |i: usize| NodeMessage::Deliver {
        device: format!("d{i}"),
    };
    let mut first = bus.node_subscribe(&n).await.unwrap();
    let mut second = bus.node_subscribe(&n).await.unwrap();
    assert_eq!(
        first.recv().await,
        None,
        "a second subscribe closes the first"
    );
    // Same device: one shard, so arrival order is publish order.
    for _ in 0..5 {
        bus.node_publish(&n, &msg(0)).await.unwrap();
    }
    wait_until("3 node messages dropped", PATIENCE, || async {
        bus.stats().dropped_node_messages == 3
    })
    .await;
    assert_eq!(second.recv().await, Some(msg(0)));
    assert_eq!(second.recv().await, Some(msg(0)));
    // The receiver lost messages: it hears so before the next one.
    bus.node_publish(&n, &msg(1)).await.unwrap();
    assert_eq!(second.recv().await, Some(NodeMessage::Resync));
    assert_eq!(second.recv().await, Some(msg(1)));
}

/// After Redis comes back, every node receiver is told it may have missed messages, once its
/// subscription is whole again: a message published after the `Resync` arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_receivers_resync_after_a_redis_restart() {
    let mut server = fleetgate_test_support::RedisServer::start();
    let mut cfg = config(vec![server.url()]);
    cfg.reconnect_max_delay_ms = 200;
    let bus = RedisBus::connect(cfg).await.expect("connect");
    let n = unique_id("rnode");
    let mut rx = bus.node_subscribe(&n).await.unwrap();
    server.restart();
    let got = tokio::time::timeout(PATIENCE, rx.recv()).await;
    assert_eq!(got, Ok(Some(NodeMessage::Resync)));
    // The subscriber is whole before the Resync (the task marks it so first); the command
    // connection reconnects on its own schedule, a moment later on a loaded machine.
    wait_until("the bus whole again", PATIENCE, || async {
        bus.is_connected()
    })
    .await;
    let after = NodeMessage::Deliver {
        device: unique_id("rdev"),
    };
    bus.node_publish(&n, &after).await.unwrap();
    let got = tokio::time::timeout(PATIENCE, rx.recv()).await;
    assert_eq!(got, Ok(Some(after)));
}

/// A Redis that comes back empty has lost every channel's position; the bus watches its
/// subscribed channels again once resubscribed, so their frames flow again (under a new
/// epoch, which the history read shows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_watched_again_after_redis_lost_its_data() {
    let mut server = fleetgate_test_support::RedisServer::start();
    let mut cfg = config(vec![server.url()]);
    cfg.reconnect_max_delay_ms = 200;
    let bus = RedisBus::connect(cfg).await.expect("connect");
    let ch = Channel::Device(unique_id("rwatch"));
    let mut sub = bus.subscribe(&ch).await.unwrap();
    let before = bus.history(&ch, None, 1).await.unwrap().position;
    server.restart();
    wait_until("the bus whole again", PATIENCE, || async {
        bus.is_connected()
    })
    .await;
    // Publish until one arrives: the re-watch follows the resubscribe by a round trip.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let got = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no frame after the restart"
        );
        if bus
            .publish(&ch, Bytes::from_static(b"again"), false)
            .await
            .is_err()
        {
            continue;
        }
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            break p;
        }
    };
    assert_eq!(got.frame, Bytes::from_static(b"again"));
    let after = bus.history(&ch, None, 1).await.unwrap().position;
    assert_ne!(
        after.epoch, before.epoch,
        "offsets restarted under a new epoch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_bus_closes_subscriptions() {
    let bus = shared_bus().await;
    let mut sub = bus.subscribe(&Channel::Alerts).await.unwrap();
    drop(bus);
    let got = tokio::time::timeout(PATIENCE, sub.recv()).await;
    assert_eq!(got, Ok(None));
}

mod sharding {
    use super::*;

    fn devices_on_both_shards(bus: &RedisBus) -> (Vec<String>, [usize; 2]) {
        let devices: Vec<String> = (0..64).map(|_| unique_id("sdev")).collect();
        let mut per_shard = [0usize; 2];
        for d in &devices {
            per_shard[bus.shard_for_device(d)] += 1;
        }
        (devices, per_shard)
    }

    /// Keys of a device land on the shard the ring picks, and only there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn device_keys_live_on_their_shard() {
        let bus = sharded_bus().await;
        let [a, b] = support::pair();
        let raws = [raw(&a.url()).await, raw(&b.url()).await];
        let n = unique_id("snode");
        bus.node_heartbeat(&node_info(&n, 0), 60_000).await.unwrap();
        let (devices, per_shard) = devices_on_both_shards(&bus);
        assert!(
            per_shard[0] > 0 && per_shard[1] > 0,
            "64 devices spread over both shards: {per_shard:?}"
        );
        for (i, d) in devices.iter().enumerate() {
            bus.presence_set(
                d,
                &Presence {
                    node: n.clone(),
                    conn_id: i as u64,
                    since_ms: 0,
                },
            )
            .await
            .unwrap();
            bus.queue_push(&command(d, "m1", now_ms() + 60_000))
                .await
                .unwrap();
            bus.shadow_merge_reported(d, json!({"on": true}).as_object().unwrap(), 1)
                .await
                .unwrap();
            assert!(bus.qos2_receive(d, "q", 60_000).await.unwrap());
        }
        for d in &devices {
            let home = bus.shard_for_device(d);
            for key in bus.device_keys(d) {
                assert!(exists(&raws[home], &key).await, "{key} on shard {home}");
                assert!(
                    !exists(&raws[1 - home], &key).await,
                    "{key} must not be on shard {}",
                    1 - home
                );
            }
            let q2 = format!("{}q2:{d}:q", bus.config().key_prefix);
            assert!(exists(&raws[home], &q2).await, "qos2 mark on its shard");
            assert!(!exists(&raws[1 - home], &q2).await);
            // And the bus reads them back.
            assert_eq!(bus.queue_len(d).await.unwrap(), 1);
            assert!(bus.presence_get(d).await.unwrap().is_some());
        }
        // Presence sweeps and expiry span every shard.
        assert_eq!(bus.presence_sweep_node(&n).await.unwrap(), devices.len());
        for d in &devices {
            bus.queue_ack(d, "m1").await.unwrap();
        }
    }

    /// The admin state with devices on both shards: group queries merge both shards' devices
    /// (the registry is on shard 0 whatever the device's shard), job counts and pages add up
    /// every shard's executions in device order, a cancel reaches every shard, and a delete
    /// leaves none of the device's keys on its shard.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admin_state_across_shards() {
        use fleetgate_bus::{DeviceQuery, DeviceRecord, JobCounts, JobExecState, JobPush};
        use fred::interfaces::SortedSetsInterface;
        let bus = sharded_bus().await;
        let [a, b] = support::pair();
        let raws = [raw(&a.url()).await, raw(&b.url()).await];
        let (mut devices, per_shard) = devices_on_both_shards(&bus);
        assert!(per_shard[0] > 0 && per_shard[1] > 0, "{per_shard:?}");
        devices.sort();
        let (ga, gb) = (unique_id("sga"), unique_id("sgb"));
        for (i, d) in devices.iter().enumerate() {
            let mut groups = Vec::new();
            if i % 2 == 0 {
                groups.push(ga.clone());
            }
            if i % 3 == 0 {
                groups.push(gb.clone());
            }
            let record = DeviceRecord {
                id: d.clone(),
                groups,
                secret_sha256: [3; 32],
                created_ms: 1,
                revoked: false,
                transport: Default::default(),
                mac_key: None,
                revoked_certs: Vec::new(),
            };
            assert!(bus.device_create(&record).await.unwrap());
        }
        let union: Vec<String> = devices
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == 0 || i % 3 == 0)
            .map(|(_, d)| d.clone())
            .collect();
        let mut paged = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = bus
                .device_query(&DeviceQuery {
                    groups: Some(vec![ga.clone(), gb.clone()]),
                    after: after.clone(),
                    limit: 5,
                    ..DeviceQuery::default()
                })
                .await
                .unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            paged.extend(page.into_iter().map(|d| d.id));
        }
        assert_eq!(
            paged, union,
            "the union of both groups, in ID order, once each"
        );

        let job = unique_id("sjob");
        let batch: Vec<Command> = devices
            .iter()
            .map(|d| Command {
                job: Some(job.clone()),
                ..command(d, "sj", now_ms() + 60_000)
            })
            .collect();
        assert_eq!(
            bus.job_push(&job, &batch).await.unwrap(),
            vec![JobPush::Queued; devices.len()]
        );
        assert_eq!(
            bus.job_push(&job, &batch).await.unwrap(),
            vec![JobPush::Exists; devices.len()],
            "answers in input order across shards"
        );
        for d in &devices[..10] {
            assert!(
                bus.job_record(&job, d, JobExecState::Succeeded)
                    .await
                    .unwrap()
            );
        }
        for d in &devices[10..15] {
            assert_eq!(bus.queue_next(d, None, &[], 10).await.unwrap().len(), 1);
        }
        let n = devices.len() as u64;
        assert_eq!(
            bus.job_counts(&job).await.unwrap(),
            JobCounts {
                queued: n - 10,
                succeeded: 10,
                ..JobCounts::default()
            },
            "summed over both shards"
        );
        let mut execs = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = bus.job_execs(&job, after.as_deref(), 7).await.unwrap();
            assert!(page.len() <= 7);
            let Some(last) = page.last() else { break };
            after = Some(last.device.clone());
            execs.extend(page);
        }
        let order: Vec<&String> = execs.iter().map(|e| &e.device).collect();
        assert_eq!(
            order,
            devices.iter().collect::<Vec<_>>(),
            "device order across shards"
        );

        let mut taken = 0;
        loop {
            let got = bus.job_cancel(&job, 10).await.unwrap();
            assert!(got <= 10);
            if got == 0 {
                break;
            }
            taken += got;
        }
        assert_eq!(taken, devices.len() - 10);
        assert_eq!(
            bus.job_counts(&job).await.unwrap(),
            JobCounts {
                succeeded: 10,
                delivered: 5,
                cancelled: n - 15,
                ..JobCounts::default()
            }
        );
        for d in &devices[15..] {
            assert_eq!(
                bus.queue_len(d).await.unwrap(),
                0,
                "{d}: cancelled, unqueued"
            );
        }

        // One device per shard, each with a queued command and a shadow, deleted.
        let doomed: Vec<String> = (0..2)
            .map(|shard| {
                devices[10..15]
                    .iter()
                    .chain(&devices[..10])
                    .find(|d| bus.shard_for_device(d) == shard)
                    .cloned()
                    .expect("a device on each shard")
            })
            .collect();
        for d in &doomed {
            bus.queue_push(&command(d, "extra", now_ms() + 60_000))
                .await
                .unwrap();
            bus.shadow_merge_reported(d, json!({"on": true}).as_object().unwrap(), 1)
                .await
                .unwrap();
            assert!(bus.device_delete(d).await.unwrap());
            let home = bus.shard_for_device(d);
            for key in bus.device_keys(d).into_iter().skip(1) {
                assert!(
                    !exists(&raws[home], &key).await,
                    "{key} left on shard {home}"
                );
            }
            let qexp = format!("{}qexp", bus.config().key_prefix);
            for m in ["sj", "extra"] {
                let score: Option<f64> =
                    raws[home].zscore(&qexp, format!("{m} {d}")).await.unwrap();
                assert_eq!(score, None, "expiry entry of {m} {d} left on shard {home}");
            }
            assert_eq!(bus.device_get(d).await.unwrap(), None);
        }
        let left = bus
            .device_query(&DeviceQuery {
                groups: Some(vec![ga.clone(), gb.clone()]),
                limit: 1000,
                ..DeviceQuery::default()
            })
            .await
            .unwrap();
        assert!(
            left.iter().all(|r| !doomed.contains(&r.id)),
            "out of the group index"
        );
        for d in &devices[10..15] {
            bus.queue_ack(d, "sj").await.unwrap();
        }
    }

    /// The admin part of the conformance suite on two shards, so that its devices spread
    /// over both. (Not the device delete test: it pushes commands expired long ago, and the
    /// expiry test here counts on live ones only.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admin_conformance_on_two_shards() {
        use fleetgate_bus::conformance as c;
        let bus = sharded_bus().await;
        c::doc_put_expectations(&bus).await;
        c::doc_concurrent_writers_one_wins(&bus).await;
        c::doc_list_order_and_paging(&bus).await;
        c::doc_delete_removes(&bus).await;
        c::audit_append_is_conditional(&bus).await;
        c::audit_read_pages_exclusively(&bus).await;
        c::audit_concurrent_appenders_form_one_chain(&bus).await;
        c::device_query_by_groups(&bus).await;
        c::device_query_prefix_and_after(&bus).await;
        c::device_query_paging_while_adding(&bus).await;
        c::device_group_index_follows_update_and_delete(&bus).await;
        c::device_get_many_keeps_order(&bus).await;
        c::job_push_queues_once(&bus).await;
        c::job_push_full_queue_is_failed(&bus).await;
        c::job_push_tells_the_online_devices_node(&bus).await;
        c::job_record_moves_up_only(&bus).await;
        c::job_counts_and_execs_paging(&bus).await;
        c::job_cancel_unsent_and_sent(&bus).await;
    }

    /// A second process with the same URL list agrees on placement.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_buses_agree() {
        let one = sharded_bus().await;
        let two = sharded_bus().await;
        let n = unique_id("snode");
        one.node_heartbeat(&node_info(&n, 0), 60_000).await.unwrap();
        let (devices, _) = devices_on_both_shards(&one);
        for d in &devices {
            assert_eq!(one.shard_for_device(d), two.shard_for_device(d));
            one.presence_set(
                d,
                &Presence {
                    node: n.clone(),
                    conn_id: 1,
                    since_ms: 0,
                },
            )
            .await
            .unwrap();
        }
        let seen = two.presence_get_many(&devices).await.unwrap();
        assert!(
            seen.iter().all(Option::is_some),
            "visible from the other bus"
        );
        assert!(two.nodes().await.unwrap().iter().any(|x| x.id == n));
        two.node_remove(&n).await.unwrap();
        let seen = one.presence_get_many(&devices).await.unwrap();
        assert!(
            seen.iter().all(Option::is_none),
            "node liveness is checked on every shard"
        );
        assert_eq!(one.presence_sweep_node(&n).await.unwrap(), devices.len());
    }

    /// A node subscribed on every shard receives messages published via any shard.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_channel_spans_every_shard() {
        use fred::interfaces::PubsubInterface;
        let bus = sharded_bus().await;
        let sender = sharded_bus().await;
        let n = unique_id("snode");
        let mut rx = bus.node_subscribe(&n).await.unwrap();
        let (devices, _) = devices_on_both_shards(&bus);
        let mut want: Vec<String> = Vec::new();
        for d in devices.iter().take(16) {
            sender
                .node_publish(&n, &NodeMessage::Deliver { device: d.clone() })
                .await
                .unwrap();
            want.push(d.clone());
        }
        // Straight onto each server's channel, too.
        let [a, b] = support::pair();
        let channel = format!("{}nodech:{n}", bus.config().key_prefix);
        for (i, url) in [a.url(), b.url()].iter().enumerate() {
            let client = raw(url).await;
            let message = format!(r#"{{"t":"deliver","device":"raw-{i}"}}"#);
            let receivers: i64 = client.publish(&channel, message).await.unwrap();
            assert_eq!(receivers, 1, "subscribed on shard {i}");
            want.push(format!("raw-{i}"));
        }
        let mut got = Vec::new();
        while got.len() < want.len() {
            match tokio::time::timeout(PATIENCE, rx.recv()).await {
                Ok(Some(NodeMessage::Deliver { device })) => got.push(device),
                other => panic!("unexpected {other:?}"),
            }
        }
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }

    /// Fan-out, retained values and queue expiry work with channels and queues spread over
    /// both shards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fan_out_and_expiry_across_shards() {
        let bus = Arc::new(sharded_bus().await);
        let (devices, _) = devices_on_both_shards(&bus);
        let mut subs = Vec::new();
        for d in devices.iter().take(8) {
            subs.push(bus.subscribe(&Channel::Device(d.clone())).await.unwrap());
        }
        for (d, sub) in devices.iter().zip(subs.iter_mut()) {
            bus.publish(&Channel::Device(d.clone()), Bytes::from(d.clone()), true)
                .await
                .unwrap();
            let got = tokio::time::timeout(PATIENCE, sub.recv()).await.unwrap();
            assert_eq!(got.map(|p| p.frame), Some(Bytes::from(d.clone())));
            assert_eq!(
                bus.retained(&Channel::Device(d.clone())).await.unwrap(),
                Some(Bytes::from(d.clone()))
            );
        }
        // Expired commands on both shards are all reported (other tests on these servers
        // use only live commands, so everything taken here is ours).
        let past = now_ms() - 1_000;
        for d in &devices {
            bus.queue_push(&command(d, "x", past)).await.unwrap();
        }
        let mut taken = 0;
        loop {
            let got = bus.queue_take_expired(now_ms(), 10).await.unwrap();
            assert!(got.len() <= 10);
            if got.is_empty() {
                break;
            }
            taken += got.len();
        }
        assert_eq!(taken, devices.len());
    }
}
