//! The conformance suite against [`MemoryBus`], plus behaviour only the memory backend can
//! show (paused time, internal sizes, drop counters).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetgate_bus::conformance::node_info;
use fleetgate_bus::memory::{MemoryBus, MemoryBusConfig};
use fleetgate_bus::{
    Bus, BusError, Channel, Command, CommandOutcome, NodeMessage, Presence, StreamId,
    TelemetryRecord, partition_for,
};
use fleetgate_protocol::{MessageKind, MsgId, Qos};
use serde_json::json;

mod conformance {
    use std::sync::Arc;

    use fleetgate_bus::memory::MemoryBus;

    fleetgate_bus::bus_conformance_tests!(async { Arc::new(MemoryBus::default()) });
}

fn presence(node: &str, conn_id: u64) -> Presence {
    Presence {
        node: node.into(),
        conn_id,
        since_ms: 0,
    }
}

fn command(device: &str, msgid: &str, expires_ms: i64) -> Command {
    Command {
        msgid: MsgId::new(msgid).expect("msgid"),
        device: device.into(),
        payload: json!({}),
        qos: Qos::AtLeastOnce,
        created_ms: 0,
        expires_ms,
        reply_to: None,
        traceparent: None,
        job: None,
    }
}

fn record(device: &str, n: usize) -> TelemetryRecord {
    TelemetryRecord {
        device: device.into(),
        msgid: format!("m{n}"),
        kind: MessageKind::Status,
        timestamp: 0,
        received_ms: 0,
        payload: json!({ "n": n }),
    }
}

fn small(f: impl FnOnce(&mut MemoryBusConfig)) -> MemoryBus {
    let mut config = MemoryBusConfig::default();
    f(&mut config);
    MemoryBus::new(config)
}

#[test]
fn config_defaults() {
    let c = MemoryBusConfig::default();
    assert_eq!(c.queue_max_len, 1000);
    assert_eq!(c.telemetry_partitions, 4);
    assert_eq!(c.telemetry_max_len, 100_000);
    assert_eq!(c.node_channel_capacity, 4096);
    assert_eq!(c.subscription_capacity, 1024);
    let zero = MemoryBus::new(MemoryBusConfig {
        queue_max_len: 0,
        telemetry_partitions: 0,
        telemetry_max_len: 0,
        node_channel_capacity: 0,
        subscription_capacity: 0,
        history: fleetgate_bus::HistoryConfig::default(),
        job_retention: std::time::Duration::ZERO,
        alerts_max_len: 0,
    });
    assert_eq!(
        zero.telemetry_partitions(),
        1,
        "zero partitions is raised to one"
    );
    assert_eq!(zero.config().subscription_capacity, 1);
}

#[test]
fn partition_for_is_stable() {
    // Pinned values: every backend, node and consumer must agree on them forever.
    assert_eq!(partition_for("sensor-001", 4), 0x4ffd_5259 % 4);
    assert_eq!(partition_for("a", 16), 0xe40c_292c % 16);
    let mut seen = HashSet::new();
    for i in 0..1000 {
        let p = partition_for(&format!("device-{i}"), 4);
        assert!(p < 4);
        seen.insert(p);
    }
    assert_eq!(seen.len(), 4, "1000 devices spread over every partition");
}

#[tokio::test(start_paused = true)]
async fn node_ttl_on_paused_clock() {
    let bus = MemoryBus::default();
    bus.node_heartbeat(&node_info("n1", 0), 1_000)
        .await
        .unwrap();
    bus.presence_set("d1", &presence("n1", 1)).await.unwrap();
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(bus.nodes().await.unwrap().len(), 1);
    assert!(bus.presence_get("d1").await.unwrap().is_some());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(
        bus.nodes().await.unwrap().is_empty(),
        "dead exactly at the TTL"
    );
    assert_eq!(bus.presence_get("d1").await.unwrap(), None);
    assert_eq!(
        bus.presence_set("d1", &presence("n2", 2)).await.unwrap(),
        None,
        "the previous entry's node is dead"
    );
    assert_eq!(bus.stats().node_entries, 0, "expired nodes are purged");
}

#[tokio::test(start_paused = true)]
async fn qos2_ttl_on_paused_clock() {
    let bus = MemoryBus::default();
    assert!(bus.qos2_receive("d", "m", 500).await.unwrap());
    tokio::time::advance(Duration::from_millis(499)).await;
    assert!(
        !bus.qos2_receive("d", "m", 500).await.unwrap(),
        "a duplicate does not extend the TTL"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(
        bus.qos2_receive("d", "m", 500).await.unwrap(),
        "expired: new again"
    );
    tokio::time::advance(Duration::from_millis(500)).await;
    assert!(
        !bus.qos2_release("d", "m").await.unwrap(),
        "releasing an expired entry finds nothing"
    );
    assert_eq!(bus.stats().qos2_entries, 0, "but removes it");
}

#[tokio::test(start_paused = true)]
async fn qos2_entries_stay_bounded() {
    let bus = MemoryBus::default();
    for round in 0..20 {
        for i in 0..1_000 {
            assert!(
                bus.qos2_receive(&format!("d{}", i % 50), &format!("r{round}m{i}"), 100)
                    .await
                    .unwrap()
            );
        }
        tokio::time::advance(Duration::from_millis(200)).await;
    }
    // 20 000 entries were stored, only the last 1 000 are within any sweep's reach of being live.
    let held = bus.stats().qos2_entries;
    assert!(
        held <= 2_048,
        "expired QoS 2 entries must be purged, {held} held"
    );
}

#[tokio::test]
async fn telemetry_is_trimmed_and_ordered() {
    let bus = small(|c| {
        c.telemetry_partitions = 1;
        c.telemetry_max_len = 10;
    });
    let records: Vec<TelemetryRecord> = (0..25).map(|n| record("dev", n)).collect();
    bus.telemetry_append(&records).await.unwrap();
    let got = bus.telemetry_read(0, None, 100).await.unwrap();
    let ns: Vec<usize> = got
        .iter()
        .map(|(_, r)| r.payload["n"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(
        ns,
        (15..25).collect::<Vec<_>>(),
        "oldest records are trimmed"
    );
    assert_eq!(bus.stats().telemetry_records, 10);

    // Numeric, not string, comparison: "<ms>-9" precedes "<ms>-10".
    let (ms, _) = got[0].0.0.split_once('-').unwrap();
    let ms: u64 = ms.parse().unwrap();
    let after = bus
        .telemetry_read(0, Some(&StreamId(format!("{ms}-9"))), 100)
        .await
        .unwrap();
    assert!(after.iter().all(|(id, _)| {
        let (m, s) = id.0.split_once('-').unwrap();
        (m.parse::<u64>().unwrap(), s.parse::<u64>().unwrap()) > (ms, 9)
    }));
    let shorter = bus
        .telemetry_read(0, Some(&StreamId("9".into())), 100)
        .await
        .unwrap();
    assert_eq!(
        shorter.len(),
        10,
        "a shorter ms number is smaller, whatever the string order"
    );
    assert!(matches!(
        bus.telemetry_read(0, Some(&StreamId("x-1".into())), 1)
            .await,
        Err(BusError::Corrupt(_))
    ));
    assert!(
        bus.telemetry_read(7, None, 10).await.unwrap().is_empty(),
        "no such partition"
    );
}

#[tokio::test]
async fn queue_full_with_small_config_and_index_stays_consistent() {
    let bus = small(|c| c.queue_max_len = 2);
    let far = i64::MAX;
    bus.queue_push(&command("d", "a", far)).await.unwrap();
    bus.queue_push(&command("d", "b", 5)).await.unwrap();
    assert_eq!(
        bus.queue_push(&command("d", "c", far)).await,
        Err(BusError::QueueFull { max: 2 })
    );
    bus.queue_push(&command("d", "a", far))
        .await
        .expect("duplicate is a no-op even when full");
    bus.queue_push(&command("e", "a", far))
        .await
        .expect("other devices have their own queue");
    let s = bus.stats();
    assert_eq!(
        (s.queued_commands, s.queued_devices, s.expiry_index),
        (3, 2, 3)
    );

    bus.queue_ack("d", "a").await.unwrap();
    bus.queue_fail("e", "a").await.unwrap();
    let taken = bus.queue_take_expired(10, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    let s = bus.stats();
    assert_eq!(
        (s.queued_commands, s.queued_devices, s.expiry_index),
        (0, 0, 0),
        "empty queues and their index entries are freed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn take_expired_exactly_once_across_threads() {
    let bus = Arc::new(MemoryBus::default());
    for d in 0..40 {
        for m in 0..25 {
            bus.queue_push(&command(&format!("d{d}"), &format!("m{m}"), 1_000 + m))
                .await
                .unwrap();
        }
    }
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let bus = Arc::clone(&bus);
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = bus.queue_take_expired(2_000, 7).await.unwrap();
                    if got.is_empty() {
                        return mine;
                    }
                    mine.extend(got.into_iter().map(|c| (c.command.device, c.command.msgid)));
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let mut all = HashSet::new();
    for t in tasks {
        for key in t.await.unwrap() {
            assert!(all.insert(key.clone()), "{key:?} taken twice");
        }
    }
    assert_eq!(all.len(), 1_000);
    assert_eq!(bus.stats().queued_commands, 0);
}

#[tokio::test]
async fn slow_subscriber_drops_are_counted() {
    let bus = small(|c| c.subscription_capacity = 4);
    let ch = Channel::Device("d".into());
    let mut slow = bus.subscribe(&ch).await.unwrap();
    let mut fast = bus.subscribe(&ch).await.unwrap();
    for i in 0..10u8 {
        bus.publish(&ch, Bytes::from(vec![i]), false).await.unwrap();
        assert_eq!(fast.recv().await.unwrap().frame, Bytes::from(vec![i]));
    }
    assert_eq!(
        bus.dropped_messages(),
        6,
        "the slow subscriber had room for 4 of 10"
    );
    for i in 0..4u8 {
        assert_eq!(
            slow.recv().await.unwrap().frame,
            Bytes::from(vec![i]),
            "it keeps the oldest"
        );
    }
}

#[tokio::test]
async fn a_full_node_receiver_is_told_it_lost_messages() {
    let bus = small(|c| c.node_channel_capacity = 2);
    let mut rx = bus.node_subscribe("n").await.unwrap();
    let msg = |i: usize| NodeMessage::Deliver {
        device: format!("d{i}"),
    };
    for i in 0..5 {
        bus.node_publish("n", &msg(i)).await.unwrap();
    }
    assert_eq!(bus.dropped_node_messages(), 3);
    assert_eq!(rx.recv().await, Some(msg(0)));
    // Room for one: the owed Resync takes it, so the next message is lost too, and is owed
    // a Resync of its own.
    bus.node_publish("n", &msg(5)).await.unwrap();
    assert_eq!(bus.dropped_node_messages(), 4);
    assert_eq!(rx.recv().await, Some(msg(1)));
    assert_eq!(rx.recv().await, Some(NodeMessage::Resync));
    bus.node_publish("n", &msg(6)).await.unwrap();
    assert_eq!(rx.recv().await, Some(NodeMessage::Resync));
    assert_eq!(rx.recv().await, Some(msg(6)));
    bus.node_publish("n", &msg(7)).await.unwrap();
    assert_eq!(
        rx.recv().await,
        Some(msg(7)),
        "no Resync once nothing was lost"
    );
    assert!(rx.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn stored_results_expire_and_stay_bounded() {
    let bus = MemoryBus::default();
    for round in 0..20 {
        for i in 0..1_000 {
            bus.result_send(
                "n",
                "d",
                &format!("r{round}m{i}"),
                &CommandOutcome::Done,
                100,
            )
            .await
            .unwrap();
        }
        tokio::time::advance(Duration::from_millis(200)).await;
    }
    assert_eq!(bus.result_get("d", "r19m999").await.unwrap(), None);
    let held = bus.stats().stored_results;
    assert!(held <= 2_048, "expired results must be purged, {held} held");
}

#[tokio::test(start_paused = true)]
async fn dropping_subscriptions_frees_channels() {
    let bus = MemoryBus::default();
    let ch = Channel::Group("g".into());
    let a = bus.subscribe(&ch).await.unwrap();
    let b = bus.subscribe(&ch).await.unwrap();
    assert_eq!(bus.subscriber_count(&ch), 2);
    drop(a);
    assert_eq!(bus.subscriber_count(&ch), 1);
    drop(b);
    assert_eq!(bus.subscriber_count(&ch), 0);
    assert_eq!(bus.stats().channels, 1, "kept watched for the history TTL");
    tokio::time::advance(fleetgate_bus::HistoryConfig::default().ttl).await;
    assert_eq!(
        bus.stats().channels,
        0,
        "a channel without subscribers, retained value or watch is freed"
    );
    bus.publish(&ch, Bytes::from_static(b"r"), true)
        .await
        .unwrap();
    assert_eq!(bus.stats().channels, 1, "the retained value keeps it");
}

#[tokio::test]
async fn dropping_the_bus_closes_subscriptions() {
    let bus = MemoryBus::default();
    let mut sub = bus.subscribe(&Channel::Alerts).await.unwrap();
    drop(bus);
    assert_eq!(sub.recv().await, None);
}

#[tokio::test]
async fn node_subscribe_replaces_and_drops_are_counted() {
    let bus = small(|c| c.node_channel_capacity = 2);
    let msg = |i: usize| NodeMessage::Deliver {
        device: format!("d{i}"),
    };
    let mut first = bus.node_subscribe("n").await.unwrap();
    let mut second = bus.node_subscribe("n").await.unwrap();
    assert_eq!(
        first.recv().await,
        None,
        "a second subscribe closes the first"
    );
    for i in 0..5 {
        bus.node_publish("n", &msg(i)).await.unwrap();
    }
    assert_eq!(bus.dropped_node_messages(), 3);
    assert_eq!(second.recv().await, Some(msg(0)));
    assert_eq!(second.recv().await, Some(msg(1)));
    drop(second);
    bus.node_publish("n", &msg(9)).await.unwrap();
    assert_eq!(
        bus.stats().node_subscribers,
        0,
        "a closed node channel is forgotten"
    );
}

#[tokio::test]
async fn clones_share_state() {
    let bus = MemoryBus::default();
    let clone = bus.clone();
    bus.qos2_receive("d", "m", 60_000).await.unwrap();
    assert!(!clone.qos2_receive("d", "m", 60_000).await.unwrap());
    let shared: Arc<dyn Bus> = Arc::new(clone);
    shared.ping().await.unwrap();
}

#[tokio::test]
async fn device_delete_and_job_cancel_keep_the_expiry_index_in_step() {
    use fleetgate_bus::{DeviceRecord, JobExecState};
    let bus = MemoryBus::default();
    for d in ["gone", "kept"] {
        let record = DeviceRecord {
            id: d.into(),
            groups: vec!["g".into()],
            secret_sha256: [0; 32],
            created_ms: 0,
            revoked: false,
            transport: Default::default(),
            mac_key: None,
            revoked_certs: Vec::new(),
        };
        assert!(bus.device_create(&record).await.unwrap());
        for m in ["a", "b"] {
            bus.queue_push(&command(d, m, i64::MAX)).await.unwrap();
        }
        let patch = json!({"on": true}).as_object().cloned().unwrap();
        bus.shadow_merge_reported(d, &patch, 1).await.unwrap();
    }
    assert!(bus.device_delete("gone").await.unwrap());
    let s = bus.stats();
    assert_eq!(
        (
            s.devices,
            s.queued_commands,
            s.queued_devices,
            s.expiry_index,
            s.shadows
        ),
        (1, 2, 1, 2, 1)
    );
    let job = Command {
        job: Some("j".into()),
        ..command("kept", "c", i64::MAX)
    };
    bus.job_push("j", &[job]).await.unwrap();
    assert_eq!(bus.job_cancel("j", 10).await.unwrap(), 1);
    let execs = bus.job_execs("j", None, 10).await.unwrap();
    assert_eq!(execs[0].state, JobExecState::Cancelled);
    let s = bus.stats();
    assert_eq!((s.queued_commands, s.expiry_index, s.jobs), (2, 2, 1));
}

#[tokio::test(start_paused = true)]
async fn jobs_are_forgotten_after_the_retention() {
    use fleetgate_bus::{JobCounts, JobExecState};
    let bus = small(|c| c.job_retention = Duration::from_secs(3600));
    let push = |job: &'static str| {
        let bus = bus.clone();
        async move {
            let c = Command {
                job: Some(job.into()),
                ..command("d", job, i64::MAX)
            };
            bus.job_push(job, &[c]).await.unwrap();
        }
    };
    push("old").await;
    push("busy").await;
    tokio::time::advance(Duration::from_secs(3000)).await;
    // A change restarts the retention.
    assert!(
        bus.job_record("busy", "d", JobExecState::Delivered)
            .await
            .unwrap()
    );
    tokio::time::advance(Duration::from_secs(1000)).await;
    // Forgotten as soon as the retention ends, not only when another job is written.
    assert_eq!(bus.job_counts("old").await.unwrap(), JobCounts::default());
    assert!(bus.job_execs("old", None, 10).await.unwrap().is_empty());
    assert!(
        !bus.job_record("old", "d", JobExecState::Delivered)
            .await
            .unwrap()
    );
    assert_eq!(bus.job_cancel("old", 10).await.unwrap(), 0);
    assert_eq!(bus.job_counts("busy").await.unwrap().delivered, 1);
    push("new").await;
    assert_eq!(bus.stats().jobs, 2, "busy and new");
    // A forgotten job's device can take part in it again, as on Redis, whose keys expired.
    push("old").await;
    assert_eq!(bus.job_counts("old").await.unwrap().queued, 1);
}
