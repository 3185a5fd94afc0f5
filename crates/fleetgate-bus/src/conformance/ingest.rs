//! The part of the suite about [`Bus::accept`]: what an accepted device message does.

use bytes::Bytes;
use fleetgate_protocol::MessageKind;
use serde_json::json;

use super::{obj, read_device, recent_cursor, recv_published, telemetry, unique_id};
use crate::{AcceptReport, Accepted, Bus, Channel, partition_for};

fn accepted(
    device: &str,
    msgid: &str,
    n: i64,
    shadow: Option<serde_json::Value>,
    channels: Vec<(Channel, bool)>,
) -> Accepted {
    let kind = if shadow.is_some() {
        MessageKind::Status
    } else {
        MessageKind::Event
    };
    Accepted {
        record: telemetry(device, msgid, kind, n),
        shadow: shadow.map(obj),
        channels,
        frame: Bytes::from(format!("frame-{msgid}")),
    }
}

/// One call stores every record in order, merges each patch in order, and publishes each
/// frame on each of its channels in order; only the channel asked to retain keeps a value.
pub async fn accept_stores_merges_and_publishes(bus: &dyn Bus) {
    let dev = unique_id("adev");
    let group = Channel::Group(unique_id("agrp"));
    let own = Channel::Device(dev.clone());
    let mut own_sub = bus.subscribe(&own).await.expect("subscribe");
    let mut group_sub = bus.subscribe(&group).await.expect("subscribe");
    let cursor = recent_cursor();
    let both = |retain| vec![(own.clone(), retain), (group.clone(), false)];
    let messages = vec![
        accepted(&dev, "a1", 1, Some(json!({"t": 21.5, "h": 40})), both(true)),
        accepted(&dev, "a2", 2, None, both(false)),
        accepted(
            &dev,
            "a3",
            3,
            Some(json!({"t": null, "h": 41})),
            both(false),
        ),
    ];
    let report = bus.accept(&messages, 5_000).await.expect("accept");
    assert_eq!(report, AcceptReport::default(), "nothing failed");
    assert_eq!(
        bus.accept(&[], 5_000).await.expect("accepting nothing"),
        AcceptReport::default()
    );

    let p = partition_for(&dev, bus.telemetry_partitions());
    let stored: Vec<_> = read_device(bus, p, &cursor, &dev)
        .await
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let want: Vec<_> = messages.iter().map(|m| m.record.clone()).collect();
    assert_eq!(stored, want, "every record, unchanged, in order");

    for (sub, what) in [(&mut own_sub, "device channel"), (&mut group_sub, "group")] {
        let first = recv_published(sub, what).await;
        for (i, m) in messages.iter().enumerate() {
            let got = if i == 0 {
                first.clone()
            } else {
                recv_published(sub, what).await
            };
            assert_eq!(got.frame, m.frame, "{what}: frame {i} in order");
            assert_eq!(
                got.offset,
                first.offset + i as u64,
                "{what}: consecutive offsets"
            );
        }
    }
    assert_eq!(
        bus.retained(&own).await.expect("retained"),
        Some(messages[0].frame.clone()),
        "the retained value is the frame that asked for it"
    );
    assert_eq!(bus.retained(&group).await.expect("retained"), None);

    let shadow = bus
        .shadow_get(&dev)
        .await
        .expect("shadow_get")
        .expect("shadow");
    assert_eq!(
        shadow.reported,
        obj(json!({"h": 41})),
        "merged in order, null deleted"
    );
    assert_eq!(shadow.version, 2, "two changes");
    assert_eq!(shadow.updated_ms, 5_000);
}

/// Many sessions accepting at once (a backend may batch them together) each get their own
/// outcome: every device's records, in its order, and its own shadow version.
pub async fn accept_concurrent_sessions_stay_apart(bus: &dyn Bus) {
    const SESSIONS: usize = 24;
    const EACH: i64 = 10;
    let cursor = recent_cursor();
    let devices: Vec<String> = (0..SESSIONS).map(|_| unique_id("cdev")).collect();
    let sessions = devices.iter().map(|dev| async move {
        for n in 0..EACH {
            let m = accepted(
                dev,
                &format!("c{n}"),
                n,
                Some(json!({"n": n})),
                vec![(Channel::Device(dev.clone()), true)],
            );
            let report = bus.accept(&[m], 1_000 + n).await.expect("accept");
            assert_eq!(report, AcceptReport::default());
        }
    });
    futures_util::future::join_all(sessions).await;
    for dev in &devices {
        let p = partition_for(dev, bus.telemetry_partitions());
        let ids: Vec<String> = read_device(bus, p, &cursor, dev)
            .await
            .into_iter()
            .map(|(_, r)| r.msgid)
            .collect();
        let want: Vec<String> = (0..EACH).map(|n| format!("c{n}")).collect();
        assert_eq!(ids, want, "{dev}: its records, in its order");
        let shadow = bus
            .shadow_get(dev)
            .await
            .expect("shadow_get")
            .expect("shadow");
        assert_eq!(shadow.version, EACH as u64, "{dev}: one version per change");
        assert_eq!(shadow.reported, obj(json!({"n": EACH - 1})));
        assert_eq!(
            bus.retained(&Channel::Device(dev.clone()))
                .await
                .expect("retained"),
            Some(Bytes::from(format!("frame-c{}", EACH - 1)))
        );
    }
}

/// A status reporting many keys (more than a backend handles in one command) merges whole;
/// deleting many of them and changing one is one version; the same status again is none.
pub async fn accept_merges_long_patches(bus: &dyn Bus) {
    const KEYS: usize = 1_500;
    let dev = unique_id("ldev");
    let all: serde_json::Map<String, serde_json::Value> =
        (0..KEYS).map(|i| (format!("k{i}"), json!(i))).collect();
    let first = accepted(&dev, "l1", 1, Some(all.clone().into()), vec![]);
    bus.accept(&[first], 10).await.expect("accept");
    let mut second: serde_json::Map<String, serde_json::Value> = (0..KEYS)
        .filter(|i| i % 2 == 1)
        .map(|i| (format!("k{i}"), serde_json::Value::Null))
        .collect();
    second.insert("k0".into(), json!("changed"));
    second.insert("k2".into(), json!(2));
    let patch: serde_json::Value = second.into();
    let again = accepted(&dev, "l2", 2, Some(patch.clone()), vec![]);
    bus.accept(&[again], 20).await.expect("accept");
    let repeat = accepted(&dev, "l3", 3, Some(patch), vec![]);
    bus.accept(&[repeat], 30).await.expect("accept");

    let shadow = bus
        .shadow_get(&dev)
        .await
        .expect("shadow_get")
        .expect("shadow");
    let mut want: serde_json::Map<String, serde_json::Value> = (0..KEYS)
        .filter(|i| i % 2 == 0)
        .map(|i| (format!("k{i}"), json!(i)))
        .collect();
    want.insert("k0".into(), json!("changed"));
    assert_eq!(
        shadow.reported, want,
        "odd keys gone, k0 changed, rest kept"
    );
    assert_eq!(
        shadow.version, 2,
        "one version per status that changed something"
    );
    assert_eq!(
        shadow.updated_ms, 20,
        "the unchanged repeat did not touch it"
    );
}
