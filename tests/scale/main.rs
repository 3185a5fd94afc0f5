//! Tests at fleet scale, in a binary of their own so that they run alone, after the other
//! end-to-end tests (Cargo runs test binaries one at a time).

// The shared harness; this binary uses only part of it.
#[allow(dead_code)]
#[path = "../e2e/support.rs"]
mod support;

use std::sync::Arc;

use fleetgate_test_support::RedisServer;
use serde_json::{Value, json};

use crate::support::{API_KEY, DEADLINE, Raw, Seen, answering, eventually_within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_20000_devices_survives_its_admin_process_dying() {
    const DEVICES: usize = 20_000;
    let redis = RedisServer::start();
    let url = redis.url();
    let common = [
        ("FLEETGATE_REDIS_URLS", url.as_str()),
        ("FLEETGATE_API_KEY", API_KEY),
        ("FLEETGATE_LISTEN", "127.0.0.1:0"),
        ("FLEETGATE_ADMIN_LISTEN", "127.0.0.1:0"),
        ("FLEETGATE_INTERNAL_LISTEN", "127.0.0.1:0"),
        ("FLEETGATE_ACK_TIMEOUT_MS", "5000"),
        ("FLEETGATE_JOB_LEASE_MS", "1500"),
        ("FLEETGATE_JOB_POLL_INTERVAL_MS", "200"),
        // Pings every 5 s: 10,000 sockets at 1 s kept a debug-built gateway and this test's
        // own (debug) clients so busy that sessions idled out and commands expired.
        ("FLEETGATE_HEARTBEAT_MS", "5000"),
        ("FLEETGATE_IDLE_TIMEOUT_MS", "30000"),
        // 10,000 devices connect from this one address, hundreds waiting for auth at once.
        ("FLEETGATE_MAX_PENDING_AUTH_PER_SOURCE", "0"),
        ("RUST_LOG", "error"),
    ];
    let start = |role: &'static str, id: &'static str| {
        let mut env = common.to_vec();
        env.push(("FLEETGATE_NODE_ID", id));
        async move {
            fleetgate_e2e::spawn_role(role, &env, DEADLINE)
                .await
                .expect("start")
        }
    };
    let (_gw, gw) = start("gateway", "job-gw").await;
    let (mut admin_a, a) = start("admin", "job-admin-a").await;
    let (_admin_b, b) = start("admin", "job-admin-b").await;
    let http = reqwest::Client::new();
    let call = |admin: &std::collections::BTreeMap<String, String>,
                method: &str,
                path: &str,
                body: Option<Value>| {
        let mut req = http
            .request(
                method.parse().unwrap(),
                format!("http://{}{path}", admin["admin"]),
            )
            .bearer_auth(API_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let resp = req.send().await.unwrap();
            (
                resp.status().as_u16(),
                resp.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };

    // Provision through admin B, 32 calls at a time; keep the secrets of the online half.
    let mut secrets = vec![String::new(); DEVICES / 2];
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("f{i:05}")).collect();
    for chunk in ids.chunks(32) {
        let calls = chunk.iter().map(|id| {
            call(
                &b,
                "POST",
                "/v1/devices",
                Some(json!({"id": id, "groups": ["fleet"]})),
            )
        });
        for (id, (s, body)) in chunk
            .iter()
            .zip(futures_util::future::join_all(calls).await)
        {
            assert_eq!(s, 201, "{id}: {body}");
            let n: usize = id[1..].parse().unwrap();
            if n < DEVICES / 2 {
                secrets[n] = body["secret"].as_str().unwrap().to_owned();
            }
        }
    }
    // The online half.
    let seen: Seen = Arc::default();
    let device_url = format!("ws://{}/v1/device", gw["gateway"]);
    let mut online = Vec::new();
    for chunk in (0..DEVICES / 2).collect::<Vec<_>>().chunks(200) {
        let connects = chunk
            .iter()
            .map(|&n| Raw::authed(&device_url, &ids[n], &secrets[n]));
        for raw in futures_util::future::join_all(connects).await {
            online.push(answering(raw, false, seen.clone()));
        }
    }

    // The job, through admin A, paced so that A dies half-way.
    let (s, created) = call(
        &a,
        "POST",
        "/v1/jobs",
        Some(json!({"group": "fleet", "payload": {"fw": "2.1"}, "rate": 4000, "ttlMs": 45000})),
    )
    .await;
    assert_eq!(s, 202, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let progress = |admin| {
        let id = id.clone();
        let call = &call;
        async move {
            let (_, j) = call(admin, "GET", &format!("/v1/jobs/{id}?limit=0"), None).await;
            j
        }
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let j = progress(&b).await;
        let n = j["executions"].as_u64().unwrap_or(0);
        if n >= 4000 {
            assert!(n < DEVICES as u64, "A must die before it is done: {j}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress: {j}");
        // A poll interval, not a wait for the condition: back to back, these reads competed
        // with the job for the admin process and Redis.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    admin_a.kill().await.unwrap();
    let done = eventually_within(
        "the job to complete",
        std::time::Duration::from_secs(120),
        || async {
            let j = progress(&b).await;
            (j["state"] == "completed").then_some(j)
        },
    )
    .await;
    // A device whose socket ended cannot answer: say so rather than leave only a count.
    let mut ended = Vec::new();
    for (n, h) in online.into_iter().enumerate() {
        if h.is_finished() {
            ended.push(format!("{}: {:?}", ids[n], h.await));
        }
    }
    assert!(
        ended.is_empty(),
        "{} online devices lost their socket during the job, first {:?}",
        ended.len(),
        &ended[..ended.len().min(5)]
    );
    assert_eq!(
        done["counts"],
        json!({"queued": 0, "delivered": 0, "succeeded": DEVICES / 2, "failed": 0, "timedOut": DEVICES / 2, "cancelled": 0}),
        "{done}"
    );
    assert_eq!(done["executions"], DEVICES);
    let seen = seen.lock().unwrap();
    let (first, _dups) = seen
        .get(&format!("job-{id}-0"))
        .copied()
        .unwrap_or_default();
    assert_eq!(
        first as usize,
        DEVICES / 2,
        "each online device got the command exactly once"
    );
}
