//! What only the Redis ingest path has: shadows written by earlier versions (a JSON string)
//! are moved into the hash, a failing shadow or publish inside the batched script fails only
//! itself, a failing telemetry append fails the call, and messages spread over two shards.

use std::sync::OnceLock;

use bytes::Bytes;
use fleetgate_bus::conformance::unique_id;
use fleetgate_bus::redis::{RedisBus, RedisBusConfig};
use fleetgate_bus::{AcceptReport, Accepted, Bus, Channel, TelemetryRecord, partition_for};
use fleetgate_protocol::MessageKind;
use fleetgate_test_support::RedisServer;
use fred::interfaces::{ClientLike, KeysInterface, ListInterface};
use serde_json::{Map, Value, json};

fn servers() -> &'static [RedisServer; 2] {
    static SERVERS: OnceLock<[RedisServer; 2]> = OnceLock::new();
    SERVERS.get_or_init(|| [RedisServer::start(), RedisServer::start()])
}

async fn bus(urls: Vec<String>, prefix: &str) -> RedisBus {
    RedisBus::connect(RedisBusConfig {
        urls,
        key_prefix: prefix.to_owned(),
        ..RedisBusConfig::default()
    })
    .await
    .expect("connect")
}

async fn raw(url: &str) -> fred::clients::Client {
    let client =
        fred::types::Builder::from_config(fred::types::config::Config::from_url(url).expect("url"))
            .build()
            .expect("client");
    client.init().await.expect("raw connect");
    client
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("an object")
}

fn status(device: &str, msgid: &str, patch: Value) -> Accepted {
    Accepted {
        record: TelemetryRecord {
            device: device.to_owned(),
            msgid: msgid.to_owned(),
            kind: MessageKind::Status,
            timestamp: 1,
            received_ms: 2,
            payload: patch.clone(),
        },
        shadow: Some(obj(patch)),
        channels: vec![(Channel::Device(device.to_owned()), true)],
        frame: Bytes::from(format!("frame-{msgid}")),
    }
}

/// A shadow an earlier version stored as one JSON string reads back whole, and a reported
/// merge through `accept` moves it into the hash first: nothing of it is lost, exact
/// numbers included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_format_shadows_are_moved_not_lost() {
    let url = servers()[0].url();
    let prefix = format!("{}:", unique_id("sm"));
    let bus = bus(vec![url.clone()], &prefix).await;
    let redis = raw(&url).await;
    let old = json!({
        "reported": {"t": 21.25, "big": 12345678901234567_u64},
        "desired": {"t": 20},
        "version": 4,
        "updated_ms": 99
    })
    .to_string();
    for d in ["read", "merged"] {
        let _: () = redis
            .set(format!("{prefix}sh:{d}"), old.as_str(), None, None, false)
            .await
            .unwrap();
    }

    let shadow = bus.shadow_get("read").await.unwrap().expect("shadow");
    assert_eq!(shadow.version, 4);
    assert_eq!(shadow.updated_ms, 99);
    assert_eq!(
        shadow.reported,
        obj(json!({"t": 21.25, "big": 12345678901234567_u64}))
    );
    assert_eq!(shadow.delta, obj(json!({"t": 20})));
    let gone: i64 = redis.exists(format!("{prefix}sh:read")).await.unwrap();
    assert_eq!(gone, 0, "the old key is gone once moved");

    let report = bus
        .accept(&[status("merged", "m1", json!({"t": 20, "h": 1}))], 500)
        .await
        .unwrap();
    assert_eq!(report, AcceptReport::default());
    let shadow = bus.shadow_get("merged").await.unwrap().expect("shadow");
    assert_eq!(
        shadow.reported,
        obj(json!({"t": 20, "h": 1, "big": 12345678901234567_u64}))
    );
    assert_eq!(shadow.version, 5, "one change on top of the old version");
    assert_eq!(shadow.desired, obj(json!({"t": 20})));
    assert!(shadow.delta.is_empty(), "reported caught up with desired");
    let _ = redis.quit().await;
}

/// A shadow that cannot be merged (its key holds something else) fails only that merge:
/// the record is stored, the frame published, the other devices' shadows merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_shadow_merge_fails_only_itself() {
    let url = servers()[0].url();
    let prefix = format!("{}:", unique_id("sf"));
    let bus = bus(vec![url.clone()], &prefix).await;
    let redis = raw(&url).await;
    let _: i64 = redis
        .lpush(format!("{prefix}shd:broken"), "not a hash")
        .await
        .unwrap();
    let report = bus
        .accept(
            &[
                status("broken", "b1", json!({"a": 1})),
                status("fine", "f1", json!({"a": 2})),
            ],
            1,
        )
        .await
        .unwrap();
    assert_eq!(
        report,
        AcceptReport {
            shadow_failed: 1,
            publish_failed: 0
        }
    );
    let p = partition_for("broken", bus.telemetry_partitions());
    let stored = bus.telemetry_read(p, None, 100).await.unwrap();
    assert!(
        stored.iter().any(|(_, r)| r.msgid == "b1"),
        "the record is stored"
    );
    assert_eq!(
        bus.retained(&Channel::Device("broken".into()))
            .await
            .unwrap(),
        Some(Bytes::from("frame-b1")),
        "and published"
    );
    let fine = bus.shadow_get("fine").await.unwrap().expect("shadow");
    assert_eq!(fine.reported, obj(json!({"a": 2})));
    let _ = redis.quit().await;
}

/// When the telemetry append fails the call fails: the session answers "unavailable" and
/// the device retries, rather than being acked for a record that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_append_fails_the_call() {
    let url = servers()[0].url();
    let prefix = format!("{}:", unique_id("tf"));
    let bus = bus(vec![url.clone()], &prefix).await;
    let redis = raw(&url).await;
    let p = partition_for("dev", bus.telemetry_partitions());
    let _: () = redis
        .set(format!("{prefix}tm:{p}"), "not a stream", None, None, false)
        .await
        .unwrap();
    let result = bus.accept(&[status("dev", "x1", json!({"a": 1}))], 1).await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(
        bus.retained(&Channel::Device("dev".into())).await.unwrap(),
        None,
        "nothing published for a record that was not stored"
    );
    let _ = redis.quit().await;
}

/// On two shards a message's record, shadow and channels may live apart: all of it is
/// still done, and each key is on its own shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_spread_over_two_shards() {
    let [a, b] = servers();
    let prefix = format!("{}:", unique_id("s2"));
    let bus = bus(vec![a.url(), b.url()], &prefix).await;
    let devices: Vec<String> = (0..32).map(|i| format!("d{i}")).collect();
    let group = Channel::Group("g".into());
    let mut sub = bus.subscribe(&group).await.unwrap();
    let messages: Vec<Accepted> = devices
        .iter()
        .map(|d| {
            let mut m = status(d, "s1", json!({"on": true}));
            m.channels.push((group.clone(), false));
            m
        })
        .collect();
    let report = bus.accept(&messages, 7).await.unwrap();
    assert_eq!(report, AcceptReport::default());
    let shards: std::collections::BTreeSet<usize> =
        devices.iter().map(|d| bus.shard_for_device(d)).collect();
    assert_eq!(shards.len(), 2, "devices on both shards");
    for d in &devices {
        let shadow = bus.shadow_get(d).await.unwrap().expect("shadow");
        assert_eq!(shadow.reported, obj(json!({"on": true})), "{d}");
        assert_eq!(
            bus.retained(&Channel::Device(d.clone())).await.unwrap(),
            Some(Bytes::from("frame-s1"))
        );
    }
    for _ in &devices {
        let got = tokio::time::timeout(fleetgate_bus::conformance::PATIENCE, sub.recv())
            .await
            .expect("a group frame in time")
            .expect("open");
        assert_eq!(got.frame, Bytes::from("frame-s1"));
    }
    let mut stored = 0;
    for p in 0..bus.telemetry_partitions() {
        stored += bus
            .telemetry_read(p, None, 1000)
            .await
            .unwrap()
            .iter()
            .filter(|(_, r)| devices.contains(&r.device))
            .count();
    }
    assert_eq!(stored, devices.len(), "every record once");
}
