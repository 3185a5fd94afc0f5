//! The conformance suite every [`crate::Bus`] backend must pass.
//!
//! Each behaviour is one public async function taking `&dyn Bus` that panics with a clear
//! message when the backend misbehaves; [`crate::bus_conformance_tests!`] turns the whole list
//! into `#[tokio::test]`s, so a backend's test file is one line:
//!
//! ```text
//! fleetgate_bus::bus_conformance_tests!(async { std::sync::Arc::new(MyBus::connect().await) });
//! ```
//!
//! The suite is written for a shared, persistent backend (one Redis for every test, tests
//! running in parallel, data left over from earlier runs):
//! - every test uses fresh IDs from [`unique_id`] and never assumes an empty bus (other
//!   nodes, devices, records and expired commands may be present; results are filtered);
//! - TTL behaviour is checked with short real TTLs and [`wait_until`], which polls up to a
//!   deadline, because Redis TTLs cannot be paused;
//! - only [`queue_expiry_exactly_once`] calls [`crate::Bus::queue_take_expired`] with a
//!   current clock, because that call takes any device's expired commands; nothing else (say,
//!   a running gateway) may call it on the same backend while the suite runs. Other tests
//!   call it with a `now_ms` in 1970, which reaches only commands they pushed expired then;
//!   the audit log, one per bus, is appended to by several tests at once (see
//!   [`append_at_head`]);
//! - telemetry tests read from a cursor a minute before the test (stream IDs are wall-clock
//!   milliseconds), so the backend's clock must be within a minute of the test's;
//! - a subscription (node or channel) is live once the subscribe call returns: messages
//!   published afterwards reach it.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fleetgate_protocol::{CloseCode, MessageKind, MsgId, Qos};
use serde_json::{Map, Value, json};

mod admin;
mod commands;
mod fanout;
mod ingest;

pub use admin::*;
pub use commands::*;
pub use fanout::*;
pub use ingest::*;

use crate::{
    Bus, BusError, Channel, Command, CommandOutcome, DeliveryState, DeviceRecord, FailReason,
    NodeInfo, NodeMessage, Presence, QueuedCommand, StreamId, Subscription, TelemetryRecord,
    partition_for,
};

/// How long a test waits for something that should happen promptly (a message, an expiry).
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A TTL short enough to wait out in a test.
const SHORT_TTL_MS: u64 = 200;
/// A TTL that does not end during a test.
const LONG_TTL_MS: u64 = 120_000;

/// An ID no other test, process or earlier run uses: `<prefix>-<pid>-<start ns>-<counter>`.
pub fn unique_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let start = START.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{start:x}-{n}", std::process::id())
}

/// Wall-clock milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Polls `check` every 20 ms until it returns `true`; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn recv_node(rx: &mut tokio::sync::mpsc::Receiver<NodeMessage>, what: &str) -> NodeMessage {
    match tokio::time::timeout(PATIENCE, rx.recv()).await {
        Ok(Some(m)) => m,
        Ok(None) => panic!("{what}: node channel closed"),
        Err(_) => panic!("{what}: no node message within {PATIENCE:?}"),
    }
}

async fn recv_frame(sub: &mut Subscription, what: &str) -> Bytes {
    recv_published(sub, what).await.frame
}

async fn recv_published(sub: &mut Subscription, what: &str) -> crate::Published {
    match tokio::time::timeout(PATIENCE, sub.recv()).await {
        Ok(Some(p)) => p,
        Ok(None) => panic!("{what}: subscription closed"),
        Err(_) => panic!("{what}: no frame within {PATIENCE:?}"),
    }
}

fn device_record(id: &str, groups: &[&str]) -> DeviceRecord {
    DeviceRecord {
        id: id.to_owned(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        secret_sha256: [7; 32],
        created_ms: 1_700_000_000_000,
        revoked: false,
        transport: Default::default(),
        mac_key: None,
        revoked_certs: Vec::new(),
    }
}

/// A live node's membership entry, for tests.
pub fn node_info(id: &str, connections: u64) -> NodeInfo {
    NodeInfo {
        id: id.to_owned(),
        connections,
        draining: false,
        started_ms: 1_700_000_000_000,
        updated_ms: now_ms(),
    }
}

fn presence(node: &str, conn_id: u64) -> Presence {
    Presence {
        node: node.to_owned(),
        conn_id,
        since_ms: now_ms(),
    }
}

fn msgid(s: &str) -> MsgId {
    MsgId::new(s).expect("valid test msgid")
}

fn command(device: &str, id: &str, qos: Qos, expires_ms: i64) -> Command {
    Command {
        msgid: msgid(id),
        device: device.to_owned(),
        payload: json!({"action": "set", "id": id, "nested": {"v": [1, 2, 3]}}),
        qos,
        created_ms: now_ms(),
        expires_ms,
        reply_to: Some("admin-1".to_owned()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()),
        job: None,
    }
}

fn live_command(device: &str, id: &str) -> Command {
    command(device, id, Qos::AtLeastOnce, now_ms() + LONG_TTL_MS as i64)
}

fn telemetry(device: &str, id: &str, kind: MessageKind, n: i64) -> TelemetryRecord {
    TelemetryRecord {
        device: device.to_owned(),
        msgid: id.to_owned(),
        kind,
        timestamp: 1_700_000_000_000 + n,
        received_ms: now_ms(),
        payload: json!({"values": [{"tag": "temp", "value": n, "unit": "C"}], "quality": "good"}),
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("test patch must be an object, got {other}"),
    }
}

fn parse_id(id: &StreamId) -> (u64, u64) {
    let (ms, seq) =
        id.0.split_once('-')
            .unwrap_or_else(|| panic!("stream id {:?} is not <ms>-<seq>", id.0));
    let ms = ms
        .parse()
        .unwrap_or_else(|_| panic!("stream id {:?}: bad ms", id.0));
    let seq = seq
        .parse()
        .unwrap_or_else(|_| panic!("stream id {:?}: bad seq", id.0));
    (ms, seq)
}

/// A cursor a minute before now, so reads skip older history but tolerate some clock skew.
fn recent_cursor() -> StreamId {
    StreamId(format!("{}-0", now_ms() - 60_000))
}

/// Every record of `device` in `partition` after `after`, paging through other devices'.
async fn read_device(
    bus: &dyn Bus,
    partition: u32,
    after: &StreamId,
    device: &str,
) -> Vec<(StreamId, TelemetryRecord)> {
    let mut cursor = after.clone();
    let mut out = Vec::new();
    loop {
        let page = bus
            .telemetry_read(partition, Some(&cursor), 500)
            .await
            .expect("telemetry_read");
        assert!(
            page.len() <= 500,
            "telemetry_read returned more than its limit"
        );
        let Some((last, _)) = page.last() else {
            return out;
        };
        assert!(
            parse_id(last) > parse_id(&cursor),
            "telemetry_read is not exclusive / not advancing past {:?}",
            cursor.0
        );
        cursor = last.clone();
        out.extend(page.into_iter().filter(|(_, r)| r.device == device));
    }
}

// --- ping and registry -----------------------------------------------------------------------

/// The backend answers `ping`.
pub async fn ping(bus: &dyn Bus) {
    bus.ping().await.expect("ping");
}

/// Create stores a device once; a second create is refused without changes; update replaces
/// only existing devices.
pub async fn registry_create_get_update(bus: &dyn Bus) {
    let id = unique_id("reg");
    let rec = device_record(&id, &["farm-a"]);
    assert_eq!(
        bus.device_get(&id).await.expect("device_get"),
        None,
        "unknown device must read as None"
    );
    assert!(
        bus.device_create(&rec).await.expect("device_create"),
        "first create must return true"
    );
    assert_eq!(
        bus.device_get(&id).await.expect("device_get").as_ref(),
        Some(&rec)
    );

    let other = device_record(&id, &["farm-b"]);
    assert!(
        !bus.device_create(&other).await.expect("device_create"),
        "create of an existing ID must return false"
    );
    assert_eq!(
        bus.device_get(&id).await.expect("device_get").as_ref(),
        Some(&rec),
        "a refused create must not change the record"
    );

    let mut updated = rec.clone();
    updated.revoked = true;
    updated.groups = vec!["farm-a".into(), "farm-c".into()];
    updated.secret_sha256 = [9; 32];
    updated.transport = crate::Transport::Mqtt;
    updated.mac_key = Some([4; 32]);
    updated.revoked_certs = vec![[5; 32], [6; 32]];
    assert!(
        bus.device_update(&updated).await.expect("device_update"),
        "update of an existing device"
    );
    assert_eq!(
        bus.device_get(&id).await.expect("device_get"),
        Some(updated)
    );

    let missing = device_record(&unique_id("reg-missing"), &[]);
    assert!(
        !bus.device_update(&missing).await.expect("device_update"),
        "update of an unknown device must return false"
    );
    assert_eq!(
        bus.device_get(&missing.id).await.expect("device_get"),
        None,
        "update must not create a device"
    );
}

/// `device_list` pages in ID order, exclusive of `after`, at most `limit` per page.
pub async fn registry_list_paging(bus: &dyn Bus) {
    let prefix = unique_id("list");
    let ids: Vec<String> = (0..5).map(|i| format!("{prefix}/{i}")).collect();
    // Created out of order: the listing must sort.
    for i in [3, 0, 4, 1, 2] {
        assert!(
            bus.device_create(&device_record(&ids[i], &[]))
                .await
                .expect("device_create")
        );
    }

    let start = format!("{prefix}/");
    let page1 = bus.device_list(Some(&start), 2).await.expect("device_list");
    let got: Vec<&str> = page1.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(got, [ids[0].as_str(), ids[1].as_str()], "first page");

    let page2 = bus
        .device_list(Some(&ids[1]), 2)
        .await
        .expect("device_list");
    let got: Vec<&str> = page2.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        got,
        [ids[2].as_str(), ids[3].as_str()],
        "second page (after is exclusive)"
    );

    let page3 = bus
        .device_list(Some(&ids[3]), 2)
        .await
        .expect("device_list");
    assert!(
        !page3.is_empty() && page3.len() <= 2,
        "third page size {}",
        page3.len()
    );
    assert_eq!(page3[0].id, ids[4], "third page starts after the cursor");
    assert!(
        page3.iter().all(|d| d.id > ids[3]),
        "page entries must sort after the cursor"
    );

    let all = bus.device_list(None, 50).await.expect("device_list");
    assert!(all.len() <= 50, "device_list returned more than its limit");
    assert!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "device_list must be in strictly increasing ID order"
    );
    assert!(
        bus.device_list(Some(&start), 0)
            .await
            .expect("device_list")
            .is_empty(),
        "limit 0 returns nothing"
    );
}

// --- membership ------------------------------------------------------------------------------

/// A heartbeat registers (and a second one updates) a node; `node_remove` removes it.
pub async fn membership_heartbeat_and_remove(bus: &dyn Bus) {
    let id = unique_id("node");
    let first = node_info(&id, 3);
    bus.node_heartbeat(&first, LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    let listed = bus.nodes().await.expect("nodes");
    assert_eq!(
        listed.iter().find(|n| n.id == id),
        Some(&first),
        "a heartbeat must register the node as sent"
    );

    let mut second = first.clone();
    second.connections = 42;
    second.draining = true;
    bus.node_heartbeat(&second, LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    let listed = bus.nodes().await.expect("nodes");
    let mine: Vec<_> = listed.iter().filter(|n| n.id == id).collect();
    assert_eq!(
        mine,
        [&second],
        "a refresh must replace the entry, not add one"
    );

    bus.node_remove(&id).await.expect("node_remove");
    assert!(
        !bus.nodes().await.expect("nodes").iter().any(|n| n.id == id),
        "a removed node must not be listed"
    );
    bus.node_remove(&id)
        .await
        .expect("removing an absent node is not an error");
}

/// A node that stops heartbeating drops out of membership once its TTL ends.
pub async fn membership_ttl_expiry(bus: &dyn Bus) {
    let id = unique_id("node-ttl");
    let node = node_info(&id, 0);
    bus.node_heartbeat(&node, LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    assert!(bus.nodes().await.expect("nodes").iter().any(|n| n.id == id));
    // A refresh with a short TTL replaces the long one.
    bus.node_heartbeat(&node, SHORT_TTL_MS)
        .await
        .expect("node_heartbeat");
    wait_until("the node's membership TTL has ended", PATIENCE, || async {
        !bus.nodes().await.expect("nodes").iter().any(|n| n.id == id)
    })
    .await;
}

// --- presence --------------------------------------------------------------------------------

/// Presence reads back as written; `presence_get_many` answers in request order.
pub async fn presence_set_get_many(bus: &dyn Bus) {
    let node = unique_id("pnode");
    bus.node_heartbeat(&node_info(&node, 2), LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    let a = unique_id("pdev");
    let b = unique_id("pdev");
    let missing = unique_id("pdev-missing");
    let pa = presence(&node, 1);
    let pb = presence(&node, 2);
    assert_eq!(
        bus.presence_set(&a, &pa).await.expect("presence_set"),
        None,
        "no previous entry"
    );
    assert_eq!(
        bus.presence_set(&b, &pb).await.expect("presence_set"),
        None,
        "no previous entry"
    );
    assert_eq!(
        bus.presence_get(&a).await.expect("presence_get"),
        Some(pa.clone())
    );
    assert_eq!(
        bus.presence_get(&missing).await.expect("presence_get"),
        None
    );

    let many = bus
        .presence_get_many(&[b.clone(), missing.clone(), a.clone(), b.clone()])
        .await
        .expect("presence_get_many");
    assert_eq!(
        many,
        vec![Some(pb.clone()), None, Some(pa), Some(pb)],
        "same order as asked"
    );
    assert!(
        bus.presence_get_many(&[])
            .await
            .expect("presence_get_many")
            .is_empty(),
        "no devices, no answers"
    );
    bus.node_remove(&node).await.expect("node_remove");
}

/// A newer connection replaces the entry and returns the previous one while it was live; an
/// entry naming a dead node is not returned.
pub async fn presence_replace_returns_previous(bus: &dyn Bus) {
    let node_a = unique_id("pnode-a");
    let node_b = unique_id("pnode-b");
    bus.node_heartbeat(&node_info(&node_a, 1), LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    bus.node_heartbeat(&node_info(&node_b, 1), LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    let dev = unique_id("pdev");

    let p1 = presence(&node_a, 10);
    assert_eq!(
        bus.presence_set(&dev, &p1).await.expect("presence_set"),
        None
    );
    let p2 = presence(&node_b, 11);
    assert_eq!(
        bus.presence_set(&dev, &p2).await.expect("presence_set"),
        Some(p1),
        "replacing a live entry must return it (its node closes it with 4409)"
    );
    assert_eq!(
        bus.presence_get(&dev).await.expect("presence_get"),
        Some(p2)
    );

    bus.node_remove(&node_b).await.expect("node_remove");
    let p3 = presence(&node_a, 12);
    assert_eq!(
        bus.presence_set(&dev, &p3).await.expect("presence_set"),
        None,
        "an entry naming a dead node is not a live previous connection"
    );
    assert_eq!(
        bus.presence_get(&dev).await.expect("presence_get"),
        Some(p3)
    );
    bus.node_remove(&node_a).await.expect("node_remove");
}

/// `presence_remove` deletes only when the connection ID still matches.
pub async fn presence_compare_and_delete(bus: &dyn Bus) {
    let node = unique_id("pnode");
    bus.node_heartbeat(&node_info(&node, 1), LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    let dev = unique_id("pdev");
    let p = presence(&node, 77);
    bus.presence_set(&dev, &p).await.expect("presence_set");

    assert!(
        !bus.presence_remove(&dev, 76)
            .await
            .expect("presence_remove"),
        "a stale connection ID must not delete the newer entry"
    );
    assert_eq!(bus.presence_get(&dev).await.expect("presence_get"), Some(p));
    assert!(
        bus.presence_remove(&dev, 77)
            .await
            .expect("presence_remove"),
        "matching ID deletes"
    );
    assert_eq!(bus.presence_get(&dev).await.expect("presence_get"), None);
    assert!(
        !bus.presence_remove(&dev, 77)
            .await
            .expect("presence_remove"),
        "deleting twice returns false"
    );
    assert!(
        !bus.presence_remove(&unique_id("pdev-missing"), 1)
            .await
            .expect("presence_remove"),
        "unknown device returns false"
    );
    bus.node_remove(&node).await.expect("node_remove");
}

/// Presence rests on node liveness: an entry naming a removed node reads as offline (also in
/// `presence_get_many`), and reads as online again if the node heartbeats again before the
/// entry was swept.
pub async fn presence_dead_node_reads_offline(bus: &dyn Bus) {
    let node = unique_id("pnode");
    let info = node_info(&node, 1);
    bus.node_heartbeat(&info, LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    let dev = unique_id("pdev");
    let p = presence(&node, 5);
    bus.presence_set(&dev, &p).await.expect("presence_set");
    assert_eq!(
        bus.presence_get(&dev).await.expect("presence_get"),
        Some(p.clone())
    );

    bus.node_remove(&node).await.expect("node_remove");
    assert_eq!(
        bus.presence_get(&dev).await.expect("presence_get"),
        None,
        "an entry naming a dead node must read as offline"
    );
    assert_eq!(
        bus.presence_get_many(std::slice::from_ref(&dev))
            .await
            .expect("presence_get_many"),
        vec![None],
        "presence_get_many must apply liveness too"
    );

    bus.node_heartbeat(&info, LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    assert_eq!(
        bus.presence_get(&dev).await.expect("presence_get"),
        Some(p),
        "an unswept entry is live again once its node is"
    );
    bus.node_remove(&node).await.expect("node_remove");
}

/// An entry reads as offline once its node's membership TTL ends.
pub async fn presence_node_ttl_expiry(bus: &dyn Bus) {
    let node = unique_id("pnode-ttl");
    let info = node_info(&node, 1);
    bus.node_heartbeat(&info, LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    let dev = unique_id("pdev");
    bus.presence_set(&dev, &presence(&node, 1))
        .await
        .expect("presence_set");
    assert!(
        bus.presence_get(&dev)
            .await
            .expect("presence_get")
            .is_some()
    );
    bus.node_heartbeat(&info, SHORT_TTL_MS)
        .await
        .expect("node_heartbeat");
    wait_until(
        "presence reads offline after its node's TTL",
        PATIENCE,
        || async {
            bus.presence_get(&dev)
                .await
                .expect("presence_get")
                .is_none()
        },
    )
    .await;
}

/// `presence_sweep_node` deletes exactly the entries naming that node.
pub async fn presence_sweep_node(bus: &dyn Bus) {
    let dead = unique_id("pnode-dead");
    let alive = unique_id("pnode-alive");
    bus.node_heartbeat(&node_info(&alive, 1), LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    bus.node_heartbeat(&node_info(&dead, 3), LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    let on_dead: Vec<String> = (0..3).map(|_| unique_id("pdev")).collect();
    for (i, d) in on_dead.iter().enumerate() {
        bus.presence_set(d, &presence(&dead, i as u64))
            .await
            .expect("presence_set");
    }
    let survivor = unique_id("pdev");
    let ps = presence(&alive, 99);
    bus.presence_set(&survivor, &ps)
        .await
        .expect("presence_set");
    bus.node_remove(&dead).await.expect("node_remove");

    assert_eq!(
        bus.presence_sweep_node(&dead)
            .await
            .expect("presence_sweep_node"),
        3,
        "sweep must count the entries it deleted"
    );
    assert_eq!(
        bus.presence_sweep_node(&dead)
            .await
            .expect("presence_sweep_node"),
        0,
        "second sweep"
    );
    // Back alive, the dead node's former devices stay offline: their entries are gone.
    bus.node_heartbeat(&node_info(&dead, 0), LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    let got = bus
        .presence_get_many(&on_dead)
        .await
        .expect("presence_get_many");
    assert_eq!(got, vec![None, None, None], "swept entries must be deleted");
    assert_eq!(
        bus.presence_get(&survivor).await.expect("presence_get"),
        Some(ps),
        "entries naming other nodes must survive"
    );
    bus.node_remove(&dead).await.expect("node_remove");
    bus.node_remove(&alive).await.expect("node_remove");
}

// --- routing ---------------------------------------------------------------------------------

/// Every [`NodeMessage`] variant arrives at the node's subscriber unchanged and in order.
pub async fn routing_roundtrip_every_variant(bus: &dyn Bus) {
    let node = unique_id("rnode");
    let dev = unique_id("rdev");
    let mut rx = bus.node_subscribe(&node).await.expect("node_subscribe");
    let mut qos0 = live_command(&dev, "q0-cmd");
    qos0.qos = Qos::AtMostOnce;
    qos0.reply_to = None;
    qos0.traceparent = None;
    let result = |outcome| NodeMessage::CommandResult {
        device: dev.clone(),
        msgid: "c-1".into(),
        outcome,
    };
    let messages = vec![
        NodeMessage::Deliver {
            device: dev.clone(),
        },
        NodeMessage::Command(live_command(&dev, "full-cmd")),
        NodeMessage::Command(qos0),
        NodeMessage::Close {
            device: dev.clone(),
            conn_id: Some(u64::MAX),
            code: CloseCode::Replaced,
            reason: "replaced by a newer connection".into(),
        },
        NodeMessage::Close {
            device: dev.clone(),
            conn_id: None,
            code: CloseCode::Revoked,
            reason: String::new(),
        },
        NodeMessage::Close {
            device: dev.clone(),
            conn_id: Some(0),
            code: CloseCode::Draining,
            reason: "draining; retry-after=1500".into(),
        },
        result(CommandOutcome::Result(
            json!({"ok": true, "n": 1.5, "list": [null, "x"]}),
        )),
        result(CommandOutcome::Error(json!("boom"))),
        result(CommandOutcome::Done),
        result(CommandOutcome::Failed(FailReason::Expired)),
        result(CommandOutcome::Failed(FailReason::AttemptsExhausted)),
        NodeMessage::Resync,
    ];
    for m in &messages {
        bus.node_publish(&node, m).await.expect("node_publish");
    }
    for (i, sent) in messages.iter().enumerate() {
        let got = recv_node(&mut rx, &format!("node message {i}")).await;
        assert_eq!(
            &got, sent,
            "node message {i} must arrive unchanged and in order"
        );
    }
}

/// Publishing to a node nobody subscribes to succeeds (best effort) and is not delivered to
/// other nodes.
pub async fn routing_publish_without_subscriber(bus: &dyn Bus) {
    let listener = unique_id("rnode");
    let nobody = unique_id("rnode-nobody");
    let mut rx = bus.node_subscribe(&listener).await.expect("node_subscribe");
    let dev = unique_id("rdev");
    bus.node_publish(
        &nobody,
        &NodeMessage::Deliver {
            device: "elsewhere".into(),
        },
    )
    .await
    .expect("publishing to a node without subscriber must be Ok");
    let mine = NodeMessage::Deliver { device: dev };
    bus.node_publish(&listener, &mine)
        .await
        .expect("node_publish");
    assert_eq!(
        recv_node(&mut rx, "own message").await,
        mine,
        "a node must receive only its own messages"
    );
}

/// A sent result reaches the waiting node and stays readable until its TTL ends; results
/// of other commands or devices are not confused with it.
pub async fn results_sent_and_stored(bus: &dyn Bus) {
    let node = unique_id("rnode");
    let dev = unique_id("rdev");
    let mut rx = bus.node_subscribe(&node).await.expect("node_subscribe");
    let outcome = CommandOutcome::Result(json!({"temp": 21.5, "ok": [true, null]}));
    bus.result_send(&node, &dev, "cmd-1", &outcome, LONG_TTL_MS)
        .await
        .expect("result_send");
    assert_eq!(
        recv_node(&mut rx, "result").await,
        NodeMessage::CommandResult {
            device: dev.clone(),
            msgid: "cmd-1".into(),
            outcome: outcome.clone(),
        }
    );
    assert_eq!(bus.result_get(&dev, "cmd-1").await.unwrap(), Some(outcome));
    assert_eq!(bus.result_get(&dev, "cmd-2").await.unwrap(), None);
    assert_eq!(
        bus.result_get(&unique_id("rdev"), "cmd-1").await.unwrap(),
        None
    );
    // Every outcome kind is stored faithfully, and a result for a node without subscriber
    // is still stored.
    for (i, outcome) in [
        CommandOutcome::Error(json!("boom")),
        CommandOutcome::Done,
        CommandOutcome::Failed(FailReason::Expired),
        CommandOutcome::Failed(FailReason::AttemptsExhausted),
    ]
    .into_iter()
    .enumerate()
    {
        let msgid = format!("kind-{i}");
        bus.result_send(&unique_id("nobody"), &dev, &msgid, &outcome, LONG_TTL_MS)
            .await
            .expect("result_send");
        assert_eq!(bus.result_get(&dev, &msgid).await.unwrap(), Some(outcome));
    }
    bus.result_send(&node, &dev, "short", &CommandOutcome::Done, SHORT_TTL_MS)
        .await
        .expect("result_send");
    wait_until("the short-lived result expired", PATIENCE, || async {
        bus.result_get(&dev, "short").await.unwrap().is_none()
    })
    .await;
}

// --- queues ----------------------------------------------------------------------------------

/// `queue_next` reads like `queue_pending` (cursor, limit, skip list) and counts one delivery
/// attempt for each command it returns, and only for those.
pub async fn queue_next_counts_what_it_returns(bus: &dyn Bus) {
    let dev = unique_id("qnext");
    for m in ["a", "b", "c", "d"] {
        bus.queue_push(&live_command(&dev, m)).await.expect("push");
    }
    let next = |after: Option<&'static str>, skip: &'static [&'static str], limit: usize| {
        let dev = dev.clone();
        async move {
            bus.queue_next(&dev, after, skip, limit)
                .await
                .expect("queue_next")
                .into_iter()
                .map(|q| (q.command.msgid.as_str().to_owned(), q.attempts))
                .collect::<Vec<_>>()
        }
    };
    let got = next(None, &[], 2).await;
    assert_eq!(got, [("a".to_owned(), 1), ("b".to_owned(), 1)]);
    let got = next(Some("b"), &[], 10).await;
    assert_eq!(got, [("c".to_owned(), 1), ("d".to_owned(), 1)]);
    let got = next(None, &["a"], 2).await;
    assert_eq!(
        got,
        [("b".to_owned(), 2), ("c".to_owned(), 2)],
        "a skipped, not counted"
    );
    assert!(next(None, &[], 0).await.is_empty());
    assert!(
        bus.queue_next(&unique_id("qnext-none"), None, &[], 5)
            .await
            .expect("queue_next")
            .is_empty()
    );
    let counts: Vec<(String, u32)> = bus
        .queue_pending(&dev, None, 10)
        .await
        .expect("queue_pending")
        .into_iter()
        .map(|q| (q.command.msgid.as_str().to_owned(), q.attempts))
        .collect();
    assert_eq!(
        counts,
        [
            ("a".to_owned(), 1),
            ("b".to_owned(), 2),
            ("c".to_owned(), 2),
            ("d".to_owned(), 1)
        ],
        "reading with queue_pending counts nothing"
    );
}

/// A push tells the node the device is connected to (and says where that is); a device that
/// is offline, or whose node is dead, gets no message.
pub async fn queue_push_tells_the_owning_node(bus: &dyn Bus) {
    let node = unique_id("qnode");
    let dead = unique_id("qnode-dead");
    bus.node_heartbeat(&node_info(&node, 1), LONG_TTL_MS)
        .await
        .expect("node_heartbeat");
    let mut rx = bus.node_subscribe(&node).await.expect("node_subscribe");
    let online = unique_id("qdev-on");
    let offline = unique_id("qdev-off");
    let orphaned = unique_id("qdev-orphan");
    bus.presence_set(&online, &presence(&node, 7))
        .await
        .expect("presence_set");
    bus.presence_set(&orphaned, &presence(&dead, 8))
        .await
        .expect("presence_set");

    assert_eq!(
        bus.queue_push(&live_command(&offline, "c1"))
            .await
            .expect("push"),
        None
    );
    assert_eq!(
        bus.queue_push(&live_command(&orphaned, "c1"))
            .await
            .expect("push"),
        None,
        "presence naming a dead node is offline"
    );
    let found = bus
        .queue_push(&live_command(&online, "c1"))
        .await
        .expect("push");
    assert_eq!(found.map(|p| (p.node, p.conn_id)), Some((node.clone(), 7)));
    assert_eq!(
        recv_node(&mut rx, "deliver").await,
        NodeMessage::Deliver {
            device: online.clone()
        },
        "only the online device's node hears, and only about it"
    );
    // A retried push queues nothing more but tells the node again.
    bus.queue_push(&live_command(&online, "c1"))
        .await
        .expect("push");
    assert_eq!(
        recv_node(&mut rx, "deliver again").await,
        NodeMessage::Deliver {
            device: online.clone()
        }
    );
    assert_eq!(bus.queue_len(&online).await.expect("queue_len"), 1);
}

/// Commands come back oldest first, `limit` at a time, with zero attempts and state Pending.
pub async fn queue_push_order_and_limit(bus: &dyn Bus) {
    let dev = unique_id("qdev");
    let other = unique_id("qdev-other");
    let cmds: Vec<Command> = (0..5)
        .map(|i| live_command(&dev, &format!("m{i}")))
        .collect();
    for (i, c) in cmds.iter().enumerate() {
        bus.queue_push(c).await.expect("queue_push");
        if i == 2 {
            bus.queue_push(&live_command(&other, "m0"))
                .await
                .expect("queue_push");
        }
    }
    assert_eq!(bus.queue_len(&dev).await.expect("queue_len"), 5);
    assert_eq!(
        bus.queue_len(&other).await.expect("queue_len"),
        1,
        "queues are per device"
    );
    assert_eq!(
        bus.queue_len(&unique_id("qdev-none"))
            .await
            .expect("queue_len"),
        0
    );

    let all = bus
        .queue_pending(&dev, None, 100)
        .await
        .expect("queue_pending");
    let got: Vec<&Command> = all.iter().map(|q| &q.command).collect();
    let want: Vec<&Command> = cmds.iter().collect();
    assert_eq!(
        got, want,
        "pending must return the commands unchanged, in push order"
    );
    for q in &all {
        assert_eq!(q.attempts, 0, "a fresh command has no attempts");
        assert_eq!(q.state, DeliveryState::Pending);
        assert_eq!(q.result, None);
    }
    let first2 = bus
        .queue_pending(&dev, None, 2)
        .await
        .expect("queue_pending");
    let ids: Vec<&str> = first2.iter().map(|q| q.command.msgid.as_str()).collect();
    assert_eq!(ids, ["m0", "m1"], "limit takes the oldest");
    let ids_after = |after: &'static str, limit: usize| {
        let dev = dev.clone();
        async move {
            bus.queue_pending(&dev, Some(after), limit)
                .await
                .expect("queue_pending")
                .into_iter()
                .map(|q| q.command.msgid.as_str().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        ids_after("m1", 2).await,
        ["m2", "m3"],
        "a cursor reads on after it"
    );
    assert_eq!(
        ids_after("m4", 10).await,
        Vec::<String>::new(),
        "nothing after the last"
    );
    assert_eq!(
        ids_after("gone", 2).await,
        ["m0", "m1"],
        "a cursor no longer queued reads from the oldest"
    );
    assert!(
        bus.queue_pending(&dev, None, 0)
            .await
            .expect("queue_pending")
            .is_empty(),
        "limit 0"
    );
    assert!(
        bus.queue_pending(&unique_id("qdev-none"), None, 10)
            .await
            .expect("queue_pending")
            .is_empty(),
        "unknown device has no pending commands"
    );
    for c in &cmds {
        bus.queue_ack(&dev, c.msgid.as_str())
            .await
            .expect("queue_ack");
    }
    bus.queue_ack(&other, "m0").await.expect("queue_ack");
}

/// A queue at its maximum length refuses pushes with [`BusError::QueueFull`] (learning the
/// maximum from the error) until a command leaves.
pub async fn queue_full(bus: &dyn Bus) {
    const CAP: usize = 100_000;
    let dev = unique_id("qfull");
    let mut pushed = 0usize;
    let max = loop {
        match bus
            .queue_push(&live_command(&dev, &format!("f{pushed}")))
            .await
        {
            Ok(_) => pushed += 1,
            Err(BusError::QueueFull { max }) => break max,
            Err(e) => panic!("queue_push failed with {e}"),
        }
        assert!(
            pushed <= CAP,
            "queue accepted {CAP} commands without QueueFull"
        );
    };
    assert_eq!(
        pushed, max,
        "QueueFull must report the maximum actually enforced"
    );
    assert!(max > 0, "a queue must hold at least one command");
    assert_eq!(bus.queue_len(&dev).await.expect("queue_len"), max);

    // Room again after an ack; then full again.
    assert!(
        bus.queue_ack(&dev, "f0")
            .await
            .expect("queue_ack")
            .is_some()
    );
    bus.queue_push(&live_command(&dev, "again"))
        .await
        .expect("push after ack must succeed");
    assert_eq!(
        bus.queue_push(&live_command(&dev, "overflow")).await,
        Err(BusError::QueueFull { max }),
        "full again"
    );
    // A duplicate of a queued command is not a new command: idempotent even when full.
    bus.queue_push(&live_command(&dev, "again"))
        .await
        .expect("duplicate push into a full queue must be a no-op, not QueueFull");

    let rest = bus
        .queue_pending(&dev, None, max + 10)
        .await
        .expect("queue_pending");
    assert_eq!(rest.len(), max);
    assert_eq!(rest.last().map(|q| q.command.msgid.as_str()), Some("again"));
    for q in rest {
        bus.queue_ack(&dev, q.command.msgid.as_str())
            .await
            .expect("queue_ack");
    }
    assert_eq!(bus.queue_len(&dev).await.expect("queue_len"), 0);
}

/// `queue_attempt` counts up per command and is `None` for unknown commands.
pub async fn queue_attempt_counting(bus: &dyn Bus) {
    let dev = unique_id("qatt");
    bus.queue_push(&live_command(&dev, "a"))
        .await
        .expect("queue_push");
    bus.queue_push(&live_command(&dev, "b"))
        .await
        .expect("queue_push");
    assert_eq!(
        bus.queue_attempt(&dev, "a").await.expect("queue_attempt"),
        Some(1)
    );
    assert_eq!(
        bus.queue_attempt(&dev, "a").await.expect("queue_attempt"),
        Some(2)
    );
    assert_eq!(
        bus.queue_attempt(&dev, "b").await.expect("queue_attempt"),
        Some(1)
    );
    assert_eq!(
        bus.queue_attempt(&dev, "a").await.expect("queue_attempt"),
        Some(3)
    );
    assert_eq!(
        bus.queue_attempt(&dev, "zzz").await.expect("queue_attempt"),
        None,
        "unknown msgid"
    );
    assert_eq!(
        bus.queue_attempt(&unique_id("qatt-none"), "a")
            .await
            .expect("queue_attempt"),
        None,
        "unknown device"
    );
    let pending = bus
        .queue_pending(&dev, None, 10)
        .await
        .expect("queue_pending");
    let attempts: Vec<(&str, u32)> = pending
        .iter()
        .map(|q| (q.command.msgid.as_str(), q.attempts))
        .collect();
    assert_eq!(
        attempts,
        [("a", 3), ("b", 1)],
        "pending must show the attempt counts, order kept"
    );
    let acked = bus
        .queue_ack(&dev, "a")
        .await
        .expect("queue_ack")
        .expect("queued");
    assert_eq!(
        acked.attempts, 3,
        "ack returns the command with its attempts"
    );
    bus.queue_ack(&dev, "b").await.expect("queue_ack");
}

/// Releasing a QoS 2 command marks it Released and keeps the `rec`'s result (also across a
/// repeated release without one); the command stays queued until `comp`.
pub async fn queue_release_keeps_result(bus: &dyn Bus) {
    let dev = unique_id("qrel");
    let cmd = command(&dev, "q2", Qos::ExactlyOnce, now_ms() + LONG_TTL_MS as i64);
    bus.queue_push(&cmd).await.expect("queue_push");
    bus.queue_attempt(&dev, "q2").await.expect("queue_attempt");
    let result = json!({"temperature": 21.5, "ok": true});

    let released = bus
        .queue_release(&dev, "q2", Some(&result))
        .await
        .expect("queue_release")
        .expect("release of a queued command returns it");
    assert_eq!(released.state, DeliveryState::Released);
    assert_eq!(released.result.as_ref(), Some(&result));
    assert_eq!(released.command, cmd);
    assert_eq!(released.attempts, 1, "release keeps the attempt count");

    let again = bus
        .queue_release(&dev, "q2", None)
        .await
        .expect("queue_release")
        .expect("still queued");
    assert_eq!(
        again.result.as_ref(),
        Some(&result),
        "a release without result keeps the stored one"
    );
    assert_eq!(again.state, DeliveryState::Released);

    let pending = bus
        .queue_pending(&dev, None, 10)
        .await
        .expect("queue_pending");
    assert_eq!(
        pending.len(),
        1,
        "a released command stays queued until comp"
    );
    assert_eq!(pending[0].state, DeliveryState::Released);
    assert_eq!(pending[0].result.as_ref(), Some(&result));
    assert_eq!(bus.queue_len(&dev).await.expect("queue_len"), 1);

    assert_eq!(
        bus.queue_release(&dev, "nope", Some(&result))
            .await
            .expect("queue_release"),
        None,
        "release of an unknown command"
    );
    let done = bus
        .queue_ack(&dev, "q2")
        .await
        .expect("queue_ack")
        .expect("queued");
    assert_eq!(
        done.result,
        Some(result),
        "comp (ack) returns the kept result"
    );
    assert_eq!(done.state, DeliveryState::Released);
}

/// An ack removes exactly that command and returns it; a second ack finds nothing.
pub async fn queue_ack_removes(bus: &dyn Bus) {
    let dev = unique_id("qack");
    let a = live_command(&dev, "a");
    let b = live_command(&dev, "b");
    let c = live_command(&dev, "c");
    for cmd in [&a, &b, &c] {
        bus.queue_push(cmd).await.expect("queue_push");
    }
    let acked = bus
        .queue_ack(&dev, "b")
        .await
        .expect("queue_ack")
        .expect("b was queued");
    assert_eq!(acked.command, b);
    assert_eq!(
        bus.queue_ack(&dev, "b").await.expect("queue_ack"),
        None,
        "acked twice"
    );
    assert_eq!(bus.queue_len(&dev).await.expect("queue_len"), 2);
    let ids: Vec<String> = bus
        .queue_pending(&dev, None, 10)
        .await
        .expect("queue_pending")
        .into_iter()
        .map(|q| q.command.msgid.into_string())
        .collect();
    assert_eq!(ids, ["a", "c"], "removing from the middle keeps the order");
    assert_eq!(
        bus.queue_ack(&unique_id("qack-none"), "a")
            .await
            .expect("queue_ack"),
        None,
        "msgids are per device"
    );
    bus.queue_ack(&dev, "a").await.expect("queue_ack");
    bus.queue_ack(&dev, "c").await.expect("queue_ack");
    assert_eq!(bus.queue_len(&dev).await.expect("queue_len"), 0);
}

/// A failed command is removed and returned, like an ack.
pub async fn queue_fail_removes(bus: &dyn Bus) {
    let dev = unique_id("qfail");
    let a = live_command(&dev, "a");
    bus.queue_push(&a).await.expect("queue_push");
    bus.queue_attempt(&dev, "a").await.expect("queue_attempt");
    let failed = bus
        .queue_fail(&dev, "a")
        .await
        .expect("queue_fail")
        .expect("a was queued");
    assert_eq!(failed.command, a);
    assert_eq!(failed.attempts, 1);
    assert_eq!(
        bus.queue_fail(&dev, "a").await.expect("queue_fail"),
        None,
        "failed twice"
    );
    assert_eq!(
        bus.queue_ack(&dev, "a").await.expect("queue_ack"),
        None,
        "gone for ack too"
    );
    assert_eq!(bus.queue_len(&dev).await.expect("queue_len"), 0);
}

/// Pushing a msgid already queued for the device is a no-op: no second copy, the first keeps
/// its place, attempts and payload. The same msgid for another device is a different command.
pub async fn queue_duplicate_push_idempotent(bus: &dyn Bus) {
    let dev = unique_id("qdup");
    let other = unique_id("qdup-other");
    let first = live_command(&dev, "same");
    bus.queue_push(&first).await.expect("queue_push");
    bus.queue_push(&live_command(&dev, "next"))
        .await
        .expect("queue_push");
    bus.queue_attempt(&dev, "same")
        .await
        .expect("queue_attempt");
    let mut changed = live_command(&dev, "same");
    changed.payload = json!({"different": true});
    bus.queue_push(&changed)
        .await
        .expect("duplicate push must be Ok");
    bus.queue_push(&first)
        .await
        .expect("duplicate push must be Ok");

    assert_eq!(
        bus.queue_len(&dev).await.expect("queue_len"),
        2,
        "no second copy"
    );
    let pending = bus
        .queue_pending(&dev, None, 10)
        .await
        .expect("queue_pending");
    assert_eq!(pending[0].command, first, "the first copy stays, unchanged");
    assert_eq!(pending[0].attempts, 1, "the first copy keeps its attempts");
    assert_eq!(pending[1].command.msgid.as_str(), "next", "and its place");

    bus.queue_push(&live_command(&other, "same"))
        .await
        .expect("queue_push");
    assert_eq!(
        bus.queue_len(&other).await.expect("queue_len"),
        1,
        "msgids are per device"
    );
    for (d, m) in [(&dev, "same"), (&dev, "next"), (&other, "same")] {
        bus.queue_ack(d, m).await.expect("queue_ack");
    }
}

/// `queue_pending` leaves out commands whose TTL has ended (by the wall clock), though they
/// stay queued (and counted) until `queue_take_expired` reports them.
pub async fn queue_pending_excludes_expired(bus: &dyn Bus) {
    let dev = unique_id("qexp");
    let now = now_ms();
    bus.queue_push(&command(&dev, "old", Qos::AtLeastOnce, now - 1_000))
        .await
        .expect("queue_push");
    bus.queue_push(&live_command(&dev, "fresh"))
        .await
        .expect("queue_push");
    bus.queue_push(&command(
        &dev,
        "soon",
        Qos::AtLeastOnce,
        now + SHORT_TTL_MS as i64,
    ))
    .await
    .expect("queue_push");
    let ids = |v: Vec<QueuedCommand>| -> Vec<String> {
        v.into_iter()
            .map(|q| q.command.msgid.into_string())
            .collect()
    };
    let pending = ids(bus
        .queue_pending(&dev, None, 10)
        .await
        .expect("queue_pending"));
    assert!(
        !pending.contains(&"old".to_owned()),
        "expired command listed as pending: {pending:?}"
    );
    assert!(pending.contains(&"fresh".to_owned()));
    let first = ids(bus
        .queue_pending(&dev, None, 1)
        .await
        .expect("queue_pending"));
    assert_eq!(first, ["fresh"], "the limit counts only unexpired commands");
    assert_eq!(
        bus.queue_len(&dev).await.expect("queue_len"),
        3,
        "expired commands stay queued until taken (they must be reported, not lost)"
    );
    wait_until(
        "a command's TTL has ended for queue_pending",
        PATIENCE,
        || async {
            ids(bus
                .queue_pending(&dev, None, 10)
                .await
                .expect("queue_pending"))
                == ["fresh"]
        },
    )
    .await;
    for m in ["old", "fresh", "soon"] {
        bus.queue_ack(&dev, m).await.expect("queue_ack");
    }
}

/// `queue_take_expired` hands each command whose TTL ended at or before `now_ms` to exactly
/// one of several concurrent callers, at most `limit` per call, of any device, and leaves the
/// others queued.
pub async fn queue_expiry_exactly_once(bus: &dyn Bus) {
    let dev_a = unique_id("qtake-a");
    let dev_b = unique_id("qtake-b");
    let ours = |c: &QueuedCommand| c.command.device == dev_a || c.command.device == dev_b;
    // `t` lies in the past, so every command below is also expired by the wall clock.
    let t = now_ms() - 60_000;
    let mut expected = HashSet::new();
    for i in 0..12 {
        let a = command(&dev_a, &format!("e{i}"), Qos::AtLeastOnce, t - i64::from(i));
        let b = command(&dev_b, &format!("e{i}"), Qos::ExactlyOnce, t);
        bus.queue_push(&a).await.expect("queue_push");
        bus.queue_push(&b).await.expect("queue_push");
        expected.insert((dev_a.clone(), format!("e{i}")));
        expected.insert((dev_b.clone(), format!("e{i}")));
    }
    let later = command(&dev_a, "later", Qos::AtLeastOnce, t + 1);
    bus.queue_push(&later).await.expect("queue_push");
    bus.queue_push(&live_command(&dev_a, "live"))
        .await
        .expect("queue_push");
    bus.queue_release(&dev_b, "e0", Some(&json!("r")))
        .await
        .expect("queue_release");

    const LIMIT: usize = 3;
    let mut taken: Vec<QueuedCommand> = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (r1, r2, r3, r4) = tokio::join!(
            bus.queue_take_expired(t, LIMIT),
            bus.queue_take_expired(t, LIMIT),
            bus.queue_take_expired(t, LIMIT),
            bus.queue_take_expired(t, LIMIT),
        );
        let mut all_empty = true;
        for r in [r1, r2, r3, r4] {
            let r = r.expect("queue_take_expired");
            assert!(
                r.len() <= LIMIT,
                "queue_take_expired returned {} > limit {LIMIT}",
                r.len()
            );
            all_empty &= r.is_empty();
            for c in r {
                assert!(
                    c.command.expires_ms <= t,
                    "took a command expiring at {} with now_ms {t}",
                    c.command.expires_ms
                );
                if ours(&c) {
                    taken.push(c);
                }
            }
        }
        if all_empty {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue_take_expired never ran dry"
        );
    }
    let mut seen = HashSet::new();
    for c in &taken {
        let key = (
            c.command.device.clone(),
            c.command.msgid.as_str().to_owned(),
        );
        assert!(
            seen.insert(key.clone()),
            "command {key:?} was handed out twice"
        );
    }
    assert_eq!(
        seen, expected,
        "every expired command must be taken exactly once"
    );
    let released = taken
        .iter()
        .find(|c| c.command.device == dev_b && c.command.msgid.as_str() == "e0")
        .expect("taken");
    assert_eq!(
        released.state,
        DeliveryState::Released,
        "taken commands keep their state"
    );
    assert_eq!(released.result, Some(json!("r")), "and their result");
    assert_eq!(released.command.qos, Qos::ExactlyOnce);

    assert_eq!(
        bus.queue_len(&dev_b).await.expect("queue_len"),
        0,
        "taken commands leave the queue"
    );
    assert_eq!(
        bus.queue_len(&dev_a).await.expect("queue_len"),
        2,
        "later and live stay"
    );
    assert_eq!(
        bus.queue_ack(&dev_a, "e1").await.expect("queue_ack"),
        None,
        "taken, not ackable"
    );

    // With the real clock, `later` has expired too, but `live` has not.
    let mut later_taken = Vec::new();
    loop {
        let r = bus
            .queue_take_expired(now_ms(), 100)
            .await
            .expect("queue_take_expired");
        if r.is_empty() {
            break;
        }
        later_taken.extend(r.into_iter().filter(|c| ours(c)));
    }
    let ids: Vec<&str> = later_taken
        .iter()
        .map(|c| c.command.msgid.as_str())
        .collect();
    assert_eq!(ids, ["later"], "only `later` was left to expire");
    assert_eq!(later_taken[0].command, later);
    let left = bus
        .queue_pending(&dev_a, None, 10)
        .await
        .expect("queue_pending");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].command.msgid.as_str(), "live");
    bus.queue_ack(&dev_a, "live").await.expect("queue_ack");
}

// --- QoS 2 dedupe ----------------------------------------------------------------------------

/// `qos2_receive` is set-if-absent per device; `qos2_release` forgets the msgid.
pub async fn qos2_receive_dup_release(bus: &dyn Bus) {
    let dev = unique_id("q2dev");
    let other = unique_id("q2dev-other");
    assert!(
        bus.qos2_receive(&dev, "m1", LONG_TTL_MS)
            .await
            .expect("qos2_receive"),
        "new msgid"
    );
    assert!(
        !bus.qos2_receive(&dev, "m1", LONG_TTL_MS)
            .await
            .expect("qos2_receive"),
        "duplicate"
    );
    assert!(
        !bus.qos2_receive(&dev, "m1", LONG_TTL_MS)
            .await
            .expect("qos2_receive"),
        "duplicate"
    );
    assert!(
        bus.qos2_receive(&dev, "m2", LONG_TTL_MS)
            .await
            .expect("qos2_receive"),
        "other msgid"
    );
    assert!(
        bus.qos2_receive(&other, "m1", LONG_TTL_MS)
            .await
            .expect("qos2_receive"),
        "msgids are per device"
    );
    assert!(
        bus.qos2_release(&dev, "m1").await.expect("qos2_release"),
        "stored msgid released"
    );
    assert!(
        !bus.qos2_release(&dev, "m1").await.expect("qos2_release"),
        "released twice"
    );
    assert!(
        !bus.qos2_release(&dev, "never").await.expect("qos2_release"),
        "unknown msgid"
    );
    assert!(
        !bus.qos2_receive(&dev, "m2", LONG_TTL_MS)
            .await
            .expect("qos2_receive"),
        "releasing m1 must not forget m2"
    );
    assert!(
        bus.qos2_receive(&dev, "m1", LONG_TTL_MS)
            .await
            .expect("qos2_receive"),
        "after release the msgid is new again"
    );
    for (d, m) in [(&dev, "m1"), (&dev, "m2"), (&other, "m1")] {
        bus.qos2_release(d, m).await.expect("qos2_release");
    }
}

/// A received msgid is forgotten once its TTL ends.
pub async fn qos2_ttl(bus: &dyn Bus) {
    let dev = unique_id("q2ttl");
    assert!(
        bus.qos2_receive(&dev, "t", SHORT_TTL_MS)
            .await
            .expect("qos2_receive")
    );
    wait_until("the QoS 2 entry's TTL has ended", PATIENCE, || async {
        bus.qos2_receive(&dev, "t", LONG_TTL_MS)
            .await
            .expect("qos2_receive")
    })
    .await;
    assert!(
        !bus.qos2_receive(&dev, "t", LONG_TTL_MS)
            .await
            .expect("qos2_receive"),
        "re-received after expiry, the msgid is stored again"
    );
    bus.qos2_release(&dev, "t").await.expect("qos2_release");
}

// --- telemetry -------------------------------------------------------------------------------

/// Appended records read back unchanged, in append order, with strictly increasing
/// `<ms>-<seq>` IDs; reads honour `limit`.
pub async fn telemetry_append_read_order(bus: &dyn Bus) {
    let parts = bus.telemetry_partitions();
    assert!(parts >= 1, "at least one telemetry partition");
    let dev = unique_id("tdev");
    let p = partition_for(&dev, parts);
    let cursor = recent_cursor();
    let records: Vec<TelemetryRecord> = (0..25)
        .map(|i| {
            let kind = if i % 5 == 4 {
                MessageKind::Event
            } else {
                MessageKind::Status
            };
            telemetry(&dev, &format!("t{i}"), kind, i)
        })
        .collect();
    bus.telemetry_append(&records[..20])
        .await
        .expect("telemetry_append");
    bus.telemetry_append(&[])
        .await
        .expect("appending nothing is Ok");
    bus.telemetry_append(&records[20..])
        .await
        .expect("telemetry_append");

    let got = read_device(bus, p, &cursor, &dev).await;
    let got_records: Vec<&TelemetryRecord> = got.iter().map(|(_, r)| r).collect();
    let want: Vec<&TelemetryRecord> = records.iter().collect();
    assert_eq!(
        got_records, want,
        "records must read back unchanged and in append order"
    );
    assert!(
        got.windows(2)
            .all(|w| parse_id(&w[0].0) < parse_id(&w[1].0)),
        "stream IDs must increase strictly (numerically)"
    );

    let one = bus
        .telemetry_read(p, Some(&cursor), 1)
        .await
        .expect("telemetry_read");
    assert_eq!(one.len(), 1, "limit 1 returns one record");
    assert!(
        bus.telemetry_read(p, Some(&cursor), 0)
            .await
            .expect("telemetry_read")
            .is_empty(),
        "limit 0 returns nothing"
    );
    let first = bus
        .telemetry_read(p, None, 1)
        .await
        .expect("telemetry_read");
    assert_eq!(first.len(), 1, "reading from the start finds records");
    assert!(
        parse_id(&first[0].0) <= parse_id(&got[0].0),
        "reading from the start begins at or before our records"
    );
}

/// A device's records all go to partition [`partition_for`]`(device, partitions)` and to no
/// other.
pub async fn telemetry_partition_stability(bus: &dyn Bus) {
    let parts = bus.telemetry_partitions();
    let cursor = recent_cursor();
    let devices: Vec<String> = (0..8).map(|_| unique_id("tpart")).collect();
    for round in 0..2 {
        let batch: Vec<TelemetryRecord> = devices
            .iter()
            .map(|d| telemetry(d, &format!("r{round}"), MessageKind::Status, round))
            .collect();
        bus.telemetry_append(&batch)
            .await
            .expect("telemetry_append");
    }
    for d in &devices {
        assert_eq!(
            partition_for(d, parts),
            partition_for(d, parts),
            "partition_for is a function"
        );
        let home = partition_for(d, parts);
        assert!(home < parts);
        for p in 0..parts {
            let found = read_device(bus, p, &cursor, d).await;
            if p == home {
                let ids: Vec<&str> = found.iter().map(|(_, r)| r.msgid.as_str()).collect();
                assert_eq!(
                    ids,
                    ["r0", "r1"],
                    "device {d} must find both records in partition {p}"
                );
            } else {
                assert!(
                    found.is_empty(),
                    "device {d} has records in foreign partition {p}"
                );
            }
        }
    }
}

/// `after` is exclusive and compares IDs by number (`<ms>-10` follows `<ms>-9`).
pub async fn telemetry_exclusive_cursor(bus: &dyn Bus) {
    let parts = bus.telemetry_partitions();
    let dev = unique_id("tcur");
    let p = partition_for(&dev, parts);
    let cursor = recent_cursor();
    // One call, so the records likely share a millisecond and reach sequence numbers >= 10.
    let records: Vec<TelemetryRecord> = (0..30)
        .map(|i| telemetry(&dev, &format!("c{i}"), MessageKind::Status, i))
        .collect();
    bus.telemetry_append(&records)
        .await
        .expect("telemetry_append");
    let got = read_device(bus, p, &cursor, &dev).await;
    assert_eq!(got.len(), 30);
    for k in [0usize, 9, 10, 28, 29] {
        let after = read_device(bus, p, &got[k].0, &dev).await;
        let ids: Vec<&str> = after.iter().map(|(_, r)| r.msgid.as_str()).collect();
        let want: Vec<String> = (k + 1..30).map(|i| format!("c{i}")).collect();
        assert_eq!(
            ids,
            want,
            "read after record {k} ({:?}) must start at record {}",
            got[k].0.0,
            k + 1
        );
    }
    let page = bus
        .telemetry_read(p, Some(&got[9].0), 1)
        .await
        .expect("telemetry_read");
    assert_ne!(
        page.first().map(|(id, _)| id),
        Some(&got[9].0),
        "after is exclusive"
    );
    assert!(
        parse_id(&page[0].0) > parse_id(&got[9].0),
        "the record after {:?} must have a larger ID",
        got[9].0.0
    );
}

// --- shadow ----------------------------------------------------------------------------------

/// Reported patches merge at the top level, `null` deletes a key, each change bumps the version.
pub async fn shadow_reported_merge(bus: &dyn Bus) {
    let dev = unique_id("sdev");
    assert_eq!(
        bus.shadow_get(&dev).await.expect("shadow_get"),
        None,
        "no shadow yet"
    );
    let v1 = bus
        .shadow_merge_reported(&dev, &obj(json!({"a": 1, "b": {"x": 1, "y": 2}})), 1_000)
        .await
        .expect("shadow_merge_reported");
    assert!(v1 >= 1, "a first change yields version >= 1");
    let v2 = bus
        .shadow_merge_reported(&dev, &obj(json!({"b": {"x": 5}, "c": "on"})), 2_000)
        .await
        .expect("shadow_merge_reported");
    assert!(v2 > v1, "each change bumps the version ({v1} -> {v2})");
    let s = bus
        .shadow_get(&dev)
        .await
        .expect("shadow_get")
        .expect("shadow exists");
    assert_eq!(
        Value::Object(s.reported.clone()),
        json!({"a": 1, "b": {"x": 5}, "c": "on"}),
        "top-level merge: nested objects are replaced whole"
    );
    assert_eq!(s.version, v2);
    assert_eq!(s.updated_ms, 2_000);
    assert!(s.desired.is_empty() && s.delta.is_empty());

    let v3 = bus
        .shadow_merge_reported(&dev, &obj(json!({"a": null, "missing": null})), 3_000)
        .await
        .expect("shadow_merge_reported");
    assert!(v3 > v2);
    let s = bus
        .shadow_get(&dev)
        .await
        .expect("shadow_get")
        .expect("shadow exists");
    assert_eq!(
        Value::Object(s.reported),
        json!({"b": {"x": 5}, "c": "on"}),
        "null deletes"
    );
    assert_eq!(s.version, v3);
}

/// A merge that changes nothing keeps the version and `updated_ms`, and creates no shadow.
pub async fn shadow_noop_merge_keeps_version(bus: &dyn Bus) {
    let dev = unique_id("snoop");
    let v0 = bus
        .shadow_merge_reported(&dev, &obj(json!({"gone": null})), 500)
        .await
        .expect("shadow_merge_reported");
    assert_eq!(
        v0, 0,
        "nothing changed on a device without shadow: version 0"
    );
    assert_eq!(
        bus.shadow_get(&dev).await.expect("shadow_get"),
        None,
        "no shadow created"
    );

    let v1 = bus
        .shadow_merge_reported(&dev, &obj(json!({"t": 20})), 1_000)
        .await
        .expect("shadow_merge_reported");
    let again = bus
        .shadow_merge_reported(&dev, &obj(json!({"t": 20})), 2_000)
        .await
        .expect("shadow_merge_reported");
    assert_eq!(again, v1, "an identical report is not a change");
    let empty = bus
        .shadow_merge_reported(&dev, &Map::new(), 2_500)
        .await
        .expect("shadow_merge_reported");
    assert_eq!(empty, v1, "an empty patch is not a change");
    let s = bus
        .shadow_merge_desired(&dev, &obj(json!({"absent": null})), 3_000)
        .await
        .expect("shadow_merge_desired");
    assert_eq!(
        s.version, v1,
        "deleting an absent desired key is not a change"
    );
    assert_eq!(s.updated_ms, 1_000, "updated_ms marks the last change");
    assert_eq!(Value::Object(s.reported), json!({"t": 20}));
}

/// Desired patches merge like reported ones; `delta` holds desired keys whose value differs
/// from the reported one, and is recomputed by both kinds of merge.
pub async fn shadow_desired_delta(bus: &dyn Bus) {
    let dev = unique_id("sdelta");
    let v1 = bus
        .shadow_merge_reported(
            &dev,
            &obj(json!({"temp": 20, "mode": "eco", "fw": "1.0"})),
            1_000,
        )
        .await
        .expect("shadow_merge_reported");
    let s = bus
        .shadow_merge_desired(
            &dev,
            &obj(json!({"temp": 22, "mode": "eco", "light": true})),
            2_000,
        )
        .await
        .expect("shadow_merge_desired");
    assert!(s.version > v1, "a desired change bumps the version");
    assert_eq!(s.updated_ms, 2_000);
    assert_eq!(
        Value::Object(s.desired.clone()),
        json!({"temp": 22, "mode": "eco", "light": true})
    );
    assert_eq!(
        Value::Object(s.delta.clone()),
        json!({"temp": 22, "light": true}),
        "delta = desired keys that differ from reported"
    );
    assert_eq!(
        Value::Object(s.reported.clone()),
        json!({"temp": 20, "mode": "eco", "fw": "1.0"})
    );
    assert_eq!(
        bus.shadow_get(&dev).await.expect("shadow_get").as_ref(),
        Some(&s),
        "shadow_get returns what merge_desired returned"
    );

    let v3 = bus
        .shadow_merge_reported(&dev, &obj(json!({"temp": 22})), 3_000)
        .await
        .expect("shadow_merge_reported");
    assert!(v3 > s.version);
    let s = bus
        .shadow_get(&dev)
        .await
        .expect("shadow_get")
        .expect("shadow");
    assert_eq!(
        Value::Object(s.delta.clone()),
        json!({"light": true}),
        "a report matching desired clears that key from delta"
    );

    let s = bus
        .shadow_merge_desired(&dev, &obj(json!({"light": null})), 4_000)
        .await
        .expect("shadow_merge_desired");
    assert!(
        s.delta.is_empty(),
        "deleting a desired key removes it from delta"
    );
    assert_eq!(Value::Object(s.desired), json!({"temp": 22, "mode": "eco"}));

    let fresh = unique_id("sdelta-fresh");
    let s = bus
        .shadow_merge_desired(&fresh, &obj(json!({"on": true})), 5_000)
        .await
        .expect("shadow_merge_desired");
    assert!(s.version >= 1);
    assert!(s.reported.is_empty());
    assert_eq!(
        Value::Object(s.delta),
        json!({"on": true}),
        "with nothing reported, all of desired is delta"
    );
}

// --- fan-out ---------------------------------------------------------------------------------

/// Every subscriber of a channel receives each frame, in order; other channels' frames do not
/// leak in.
pub async fn pubsub_fan_out(bus: &dyn Bus) {
    let ch = Channel::Device(unique_id("pdev"));
    let other = Channel::Group(unique_id("pgrp"));
    let mut s1 = bus.subscribe(&ch).await.expect("subscribe");
    let mut s2 = bus.subscribe(&ch).await.expect("subscribe");
    let mut so = bus.subscribe(&other).await.expect("subscribe");
    let frames: Vec<Bytes> = (0..5).map(|i| Bytes::from(format!("frame-{i}"))).collect();
    for f in &frames {
        bus.publish(&ch, f.clone(), false).await.expect("publish");
    }
    bus.publish(&other, Bytes::from_static(b"group"), false)
        .await
        .expect("publish");
    for f in &frames {
        assert_eq!(
            &recv_frame(&mut s1, "subscriber 1").await,
            f,
            "subscriber 1 order"
        );
        assert_eq!(
            &recv_frame(&mut s2, "subscriber 2").await,
            f,
            "subscriber 2 order"
        );
    }
    assert_eq!(
        recv_frame(&mut so, "other channel").await,
        Bytes::from_static(b"group"),
        "the other channel gets only its own frame"
    );
    // Binary frames (Protobuf) pass unchanged.
    let binary = Bytes::from(vec![0u8, 255, 10, 13, 0x80, 0]);
    bus.publish(&ch, binary.clone(), false)
        .await
        .expect("publish");
    assert_eq!(recv_frame(&mut s1, "binary frame").await, binary);
    assert_eq!(recv_frame(&mut s2, "binary frame").await, binary);
    bus.publish(&Channel::Alerts, Bytes::from_static(b"alert"), false)
        .await
        .expect("publishing to a channel without subscribers is Ok");
}

/// Dropping a subscription unsubscribes it without disturbing the channel's other subscribers.
pub async fn pubsub_unsubscribe_on_drop(bus: &dyn Bus) {
    let ch = Channel::Device(unique_id("pdrop"));
    let s1 = bus.subscribe(&ch).await.expect("subscribe");
    let mut s2 = bus.subscribe(&ch).await.expect("subscribe");
    drop(s1);
    bus.publish(&ch, Bytes::from_static(b"one"), false)
        .await
        .expect("publish after a drop");
    assert_eq!(
        recv_frame(&mut s2, "remaining subscriber").await,
        Bytes::from_static(b"one")
    );
    drop(s2);
    bus.publish(&ch, Bytes::from_static(b"none"), false)
        .await
        .expect("publish with every subscriber gone");
    let mut s3 = bus.subscribe(&ch).await.expect("resubscribe");
    bus.publish(&ch, Bytes::from_static(b"two"), false)
        .await
        .expect("publish");
    assert_eq!(
        recv_frame(&mut s3, "new subscriber").await,
        Bytes::from_static(b"two"),
        "a new subscription after all were dropped works, and misses earlier frames"
    );
}

/// A retained publish becomes the channel's last value; a plain publish leaves it alone.
pub async fn pubsub_retained(bus: &dyn Bus) {
    let ch = Channel::Group(unique_id("pret"));
    assert_eq!(
        bus.retained(&ch).await.expect("retained"),
        None,
        "nothing retained yet"
    );
    bus.publish(&ch, Bytes::from_static(b"first"), true)
        .await
        .expect("publish");
    assert_eq!(
        bus.retained(&ch).await.expect("retained"),
        Some(Bytes::from_static(b"first"))
    );
    bus.publish(&ch, Bytes::from_static(b"plain"), false)
        .await
        .expect("publish");
    assert_eq!(
        bus.retained(&ch).await.expect("retained"),
        Some(Bytes::from_static(b"first")),
        "a non-retained publish keeps the retained value"
    );
    let mut sub = bus.subscribe(&ch).await.expect("subscribe");
    bus.publish(&ch, Bytes::from_static(b"second"), true)
        .await
        .expect("publish");
    assert_eq!(
        recv_frame(&mut sub, "retained publish").await,
        Bytes::from_static(b"second"),
        "a retained publish is also delivered"
    );
    assert_eq!(
        bus.retained(&ch).await.expect("retained"),
        Some(Bytes::from_static(b"second"))
    );
    assert_eq!(
        bus.retained(&Channel::Device(unique_id("pret-none")))
            .await
            .expect("retained"),
        None
    );
}

/// One frame to several channels: each watched one delivers it with its own next offset and
/// history, the retained value is kept only where asked, an unwatched one costs nothing.
pub async fn pubsub_publish_many(bus: &dyn Bus) {
    let device = Channel::Device(unique_id("pmany"));
    let group = Channel::Group(unique_id("pmany-g"));
    let unwatched = Channel::Group(unique_id("pmany-u"));
    let mut on_device = bus.subscribe(&device).await.expect("subscribe");
    let mut on_group = bus.subscribe(&group).await.expect("subscribe");
    bus.publish(&group, Bytes::from_static(b"zero"), false)
        .await
        .expect("publish");
    assert_eq!(recv_published(&mut on_group, "first").await.offset, 1);
    let channels = [
        (device.clone(), true),
        (group.clone(), false),
        (unwatched.clone(), false),
    ];
    bus.publish_many(&channels, Bytes::from_static(b"one"))
        .await
        .expect("publish_many");
    let d = recv_published(&mut on_device, "device channel").await;
    let g = recv_published(&mut on_group, "group channel").await;
    assert_eq!((d.offset, d.frame.as_ref()), (1, &b"one"[..]));
    assert_eq!(
        (g.offset, g.frame.as_ref()),
        (2, &b"one"[..]),
        "offsets are per channel"
    );
    assert_eq!(
        bus.retained(&device).await.expect("retained"),
        Some(Bytes::from_static(b"one"))
    );
    assert_eq!(bus.retained(&group).await.expect("retained"), None);
    let h = bus.history(&group, Some(1), 10).await.expect("history");
    let kept: Vec<(u64, &[u8])> = h
        .frames
        .iter()
        .map(|p| (p.offset, p.frame.as_ref()))
        .collect();
    assert_eq!(kept, [(2, &b"one"[..])]);
    assert_eq!(bus.retained(&unwatched).await.expect("retained"), None);
    bus.publish_many(&[], Bytes::from_static(b"none"))
        .await
        .expect("publishing to no channel is nothing");
}

/// A subscriber that never reads does not block publishing (frames are dropped for it, not
/// buffered without bound), and the channel keeps working for others.
pub async fn pubsub_slow_subscriber_does_not_block(bus: &dyn Bus) {
    const FRAMES: usize = 5_000;
    let ch = Channel::Device(unique_id("pslow"));
    let mut slow = bus.subscribe(&ch).await.expect("subscribe");
    let publishing = async {
        for i in 0..FRAMES {
            bus.publish(&ch, Bytes::from(format!("f{i}")), false)
                .await
                .expect("publish");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), publishing)
        .await
        .expect("publishing to a channel with a stalled subscriber must not block");
    let mut fresh = bus.subscribe(&ch).await.expect("subscribe");
    bus.publish(&ch, Bytes::from_static(b"after"), false)
        .await
        .expect("publish");
    // The fresh subscriber may first see frames still in flight from the loop above.
    let mut got = recv_frame(&mut fresh, "fresh subscriber").await;
    while got != Bytes::from_static(b"after") {
        got = recv_frame(&mut fresh, "fresh subscriber").await;
    }
    let first = recv_frame(&mut slow, "stalled subscriber").await;
    assert!(
        first.starts_with(b"f"),
        "the stalled subscriber keeps what it had room for"
    );
}

/// Expands into one `#[tokio::test]` per conformance behaviour, each calling the async
/// `factory` for a fresh handle to the backend under test.
///
/// `factory` is an expression evaluating to a future whose output derefs to a [`crate::Bus`]
/// (`Arc<MyBus>`, `Box<MyBus>`, `Arc<dyn Bus>`); the calling crate needs `tokio` with the
/// `macros` and `rt-multi-thread` features.
///
/// (`tests/memory_conformance.rs` is the working example.)
/// ```text
/// fleetgate_bus::bus_conformance_tests!(async { std::sync::Arc::new(MemoryBus::default()) });
/// ```
#[macro_export]
macro_rules! bus_conformance_tests {
    ($factory:expr $(,)?) => {
        $crate::bus_conformance_tests!(@each $factory;
            ping,
            registry_create_get_update,
            registry_list_paging,
            membership_heartbeat_and_remove,
            membership_ttl_expiry,
            presence_set_get_many,
            presence_replace_returns_previous,
            presence_compare_and_delete,
            presence_dead_node_reads_offline,
            presence_node_ttl_expiry,
            presence_sweep_node,
            routing_roundtrip_every_variant,
            routing_publish_without_subscriber,
            results_sent_and_stored,
            queue_push_tells_the_owning_node,
            queue_next_counts_what_it_returns,
            queue_push_order_and_limit,
            queue_full,
            queue_attempt_counting,
            queue_release_keeps_result,
            queue_ack_removes,
            queue_ack_next_acks_reports_and_refills,
            queue_fail_removes,
            queue_duplicate_push_idempotent,
            queue_pending_excludes_expired,
            queue_expiry_exactly_once,
            qos2_receive_dup_release,
            qos2_ttl,
            telemetry_append_read_order,
            telemetry_partition_stability,
            telemetry_exclusive_cursor,
            shadow_reported_merge,
            shadow_noop_merge_keeps_version,
            shadow_desired_delta,
            accept_stores_merges_and_publishes,
            accept_concurrent_sessions_stay_apart,
            accept_merges_long_patches,
            pubsub_fan_out,
            pubsub_unsubscribe_on_drop,
            pubsub_retained,
            pubsub_publish_many,
            pubsub_slow_subscriber_does_not_block,
            fanout_offsets_and_history,
            fanout_unwatched_channel_keeps_nothing,
            fanout_history_is_bounded,
            fanout_recovery_after_unsubscribe,
            alerts_stream_and_open_set,
            doc_put_expectations,
            doc_concurrent_writers_one_wins,
            doc_list_order_and_paging,
            doc_delete_removes,
            audit_append_is_conditional,
            audit_read_pages_exclusively,
            audit_concurrent_appenders_form_one_chain,
            device_query_by_groups,
            device_query_prefix_and_after,
            device_query_paging_while_adding,
            device_group_index_follows_update_and_delete,
            device_delete_removes_queue_and_shadow,
            device_get_many_keeps_order,
            job_push_queues_once,
            job_push_full_queue_is_failed,
            job_push_tells_the_online_devices_node,
            job_record_moves_up_only,
            job_counts_and_execs_paging,
            job_cancel_unsent_and_sent,
        );
    };
    (@each $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let bus = $factory.await;
                $crate::conformance::$name(&*bus).await;
            }
        )*
    };
}
