//! `reshard` against real servers: state written through a one-shard bus reads back the same
//! through a two-shard bus after the move, and nothing of a moved device stays behind.

use bytes::Bytes;
use fleetgate_bus::conformance::{node_info, now_ms, unique_id};
use fleetgate_bus::redis::{RedisBus, RedisBusConfig, reshard};
use fleetgate_bus::{
    Bus, Channel, Command, CommandOutcome, DeviceQuery, DeviceRecord, DocExpect, DocKind, DocWrite,
    JobCounts, JobPush, TelemetryRecord,
};
use fleetgate_protocol::{MessageKind, MsgId, Qos};
use fleetgate_test_support::RedisServer;
use serde_json::json;

const DEVICES: usize = 40;
const COMMANDS: usize = 3;

async fn bus(urls: &[String], prefix: &str) -> RedisBus {
    RedisBus::connect(RedisBusConfig {
        urls: urls.to_vec(),
        key_prefix: prefix.to_owned(),
        ..RedisBusConfig::default()
    })
    .await
    .expect("connect")
}

fn command(device: &str, i: usize) -> Command {
    Command {
        msgid: MsgId::new(format!("m{i}")).unwrap(),
        device: device.to_owned(),
        payload: json!({ "i": i }),
        qos: Qos::AtLeastOnce,
        created_ms: now_ms(),
        expires_ms: now_ms() + 3_600_000,
        reply_to: None,
        traceparent: None,
        job: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_shard_moves_what_it_owns_and_keeps_everything_readable() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let prefix = format!("{}:", unique_id("rs"));
    let before = vec![a.url()];
    let after = vec![a.url(), b.url()];
    // Device IDs with a ':' too: the tool must split `<device>:<msgid>` keys right.
    let devices: Vec<String> = (0..DEVICES).map(|i| format!("site:{i}")).collect();

    let one = bus(&before, &prefix).await;
    for d in &devices {
        let record = DeviceRecord {
            id: d.clone(),
            groups: vec!["g".into()],
            secret_sha256: [7; 32],
            created_ms: 1,
            revoked: false,
            transport: Default::default(),
            mac_key: None,
            revoked_certs: Vec::new(),
        };
        assert!(one.device_create(&record).await.unwrap());
        for i in 0..COMMANDS {
            one.queue_push(&command(d, i)).await.unwrap();
        }
        let patch = json!({ "id": d }).as_object().cloned().unwrap();
        one.shadow_merge_reported(d, &patch, 1).await.unwrap();
        assert!(one.qos2_receive(d, "up-1", 3_600_000).await.unwrap());
        one.result_send("nobody", d, "done-1", &CommandOutcome::Done, 3_600_000)
            .await
            .unwrap();
        one.publish(&Channel::Device(d.clone()), Bytes::from(d.clone()), true)
            .await
            .unwrap();
        one.telemetry_append(&[TelemetryRecord {
            device: d.clone(),
            msgid: "t1".into(),
            kind: MessageKind::Status,
            timestamp: 1,
            received_ms: 1,
            payload: json!({ "d": d }),
        }])
        .await
        .unwrap();
    }
    one.publish(
        &Channel::Group("g".into()),
        Bytes::from_static(b"grp"),
        true,
    )
    .await
    .unwrap();
    // Admin state: a document, audit entries, and a job whose commands are the queued `m0`s
    // (a job push of a queued msgid queues nothing more).
    assert_eq!(
        one.doc_put(DocKind::Scene, "s1", "scene", DocExpect::Absent)
            .await
            .unwrap(),
        DocWrite::Written(1)
    );
    let audit = one
        .audit_append("", "h1", &["e1".into(), "e2".into()])
        .await
        .unwrap()
        .expect("empty log");
    let job_batch: Vec<Command> = devices
        .iter()
        .map(|d| Command {
            job: Some("job-1".into()),
            ..command(d, 0)
        })
        .collect();
    assert_eq!(
        one.job_push("job-1", &job_batch).await.unwrap(),
        vec![JobPush::Queued; DEVICES]
    );
    let partitions = one.telemetry_partitions();

    // A live node blocks the move.
    one.node_heartbeat(&node_info("still-up", 0), 60_000)
        .await
        .unwrap();
    let refused = reshard(&before, &after, &prefix, true).await;
    assert!(refused.is_err(), "refused while a node is alive");
    one.node_remove("still-up").await.unwrap();
    drop(one);

    let plan = reshard(&before, &after, &prefix, false).await.unwrap();
    assert!(!plan.applied);
    assert!(
        plan.moved > 0,
        "some keys belong on the new shard: {plan:?}"
    );
    assert!(
        b.keys(&format!("{prefix}*")).is_empty(),
        "a dry run moves nothing"
    );
    let done = reshard(&before, &after, &prefix, true).await.unwrap();
    assert_eq!(
        (done.moved, done.expiry_entries_moved),
        (plan.moved, plan.expiry_entries_moved),
        "the move does what the plan said"
    );
    assert!(
        done.conflicts.is_empty() && done.unknown.is_empty(),
        "{done:?}"
    );
    assert_eq!(done.job_keys, 4, "the job's keys, left in place: {done:?}");
    assert_eq!(done.moved_to.get(&b.url()), Some(&done.moved));
    // Running again finds nothing left to move.
    let again = reshard(&before, &after, &prefix, true).await.unwrap();
    assert_eq!(
        (again.moved, again.expiry_entries_moved),
        (0, 0),
        "{again:?}"
    );

    let two = bus(&after, &prefix).await;
    let mut moved_devices = 0;
    for d in &devices {
        let home = two.shard_for_device(d);
        if home == 1 {
            moved_devices += 1;
            let left = a.keys(&format!("{prefix}*{d}*"));
            assert!(
                left.iter().all(|k| k.starts_with(&format!("{prefix}dev:"))),
                "only the registry entry of {d} stays on the first shard: {left:?}"
            );
        }
        assert!(two.device_get(d).await.unwrap().is_some(), "{d}");
        let pending = two.queue_pending(d, None, 10).await.unwrap();
        let ids: Vec<&str> = pending.iter().map(|q| q.command.msgid.as_str()).collect();
        assert_eq!(ids, ["m0", "m1", "m2"], "{d}: queue kept, in order");
        // A push after the move sorts after the moved commands.
        two.queue_push(&command(d, 3)).await.unwrap();
        let ids: Vec<String> = two
            .queue_pending(d, None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|q| q.command.msgid.as_str().to_owned())
            .collect();
        assert_eq!(ids, ["m0", "m1", "m2", "m3"], "{d}");
        assert_eq!(
            two.shadow_get(d).await.unwrap().map(|s| s.reported),
            Some(json!({ "id": d }).as_object().cloned().unwrap()),
            "{d}"
        );
        assert!(
            !two.qos2_receive(d, "up-1", 3_600_000).await.unwrap(),
            "{d}: QoS 2 mark kept"
        );
        assert_eq!(
            two.result_get(d, "done-1").await.unwrap(),
            Some(CommandOutcome::Done),
            "{d}"
        );
        assert_eq!(
            two.retained(&Channel::Device(d.clone())).await.unwrap(),
            Some(Bytes::from(d.clone())),
            "{d}"
        );
    }
    assert!(
        moved_devices > 0 && moved_devices < DEVICES,
        "the new shard took some devices, not all: {moved_devices}"
    );
    assert_eq!(
        two.retained(&Channel::Group("g".into())).await.unwrap(),
        Some(Bytes::from_static(b"grp"))
    );
    let mut records = 0;
    for p in 0..partitions {
        records += two.telemetry_read(p, None, 10_000).await.unwrap().len();
    }
    assert_eq!(records, DEVICES, "every telemetry record readable");
    assert_eq!(two.device_list(None, 1_000).await.unwrap().len(), DEVICES);
    let in_group = two
        .device_query(&DeviceQuery {
            groups: Some(vec!["g".into()]),
            limit: 1_000,
            ..DeviceQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(in_group.len(), DEVICES, "the group index stays on shard 0");
    assert_eq!(
        two.doc_get(DocKind::Scene, "s1")
            .await
            .unwrap()
            .map(|d| d.body),
        Some("scene".into())
    );
    assert_eq!(two.audit_head().await.unwrap(), "h1");
    let entries: Vec<_> = two.audit_read(None, 10).await.unwrap();
    assert_eq!(
        entries.iter().map(|r| &r.id).collect::<Vec<_>>(),
        audit.iter().collect::<Vec<_>>()
    );
    // The job's keys stayed on the first shard; every shard is read, so it reads whole.
    assert_eq!(
        two.job_counts("job-1").await.unwrap(),
        JobCounts {
            queued: DEVICES as u64,
            ..JobCounts::default()
        }
    );
    assert_eq!(
        two.job_execs("job-1", None, 1_000).await.unwrap().len(),
        DEVICES
    );
    // The expiry index moved with the queues: every command is found by the sweeper once.
    let expired = two
        .queue_take_expired(now_ms() + 7_200_000, 100_000)
        .await
        .unwrap();
    assert_eq!(expired.len(), DEVICES * (COMMANDS + 1));
}

/// A key the destination already has is left on the source and reported, not overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_destination_already_has_is_reported_not_overwritten() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let prefix = format!("{}:", unique_id("rc"));
    let before = vec![a.url()];
    let after = vec![a.url(), b.url()];
    let one = bus(&before, &prefix).await;
    let two = bus(&after, &prefix).await;
    let moving = (0..100)
        .map(|i| format!("c{i}"))
        .find(|d| two.shard_for_device(d) == 1)
        .expect("some device moves to the new shard");
    let patch = json!({ "v": 1 }).as_object().cloned().unwrap();
    one.shadow_merge_reported(&moving, &patch, 1).await.unwrap();
    // Something else wrote the same key on the new shard already.
    let shadow_key = format!("{prefix}shd:{moving}");
    let client =
        fred::types::Builder::from_config(fred::types::config::Config::from_url(&b.url()).unwrap())
            .build()
            .unwrap();
    {
        use fred::interfaces::{ClientLike, KeysInterface};
        client.init().await.unwrap();
        let _: () = client
            .set(&shadow_key, "not ours", None, None, false)
            .await
            .unwrap();
    }
    drop((one, two));
    let report = reshard(&before, &after, &prefix, true).await.unwrap();
    assert_eq!(report.conflicts, std::slice::from_ref(&shadow_key));
    assert_eq!(a.keys(&shadow_key), [shadow_key], "left on the source");
}
