//! Fleet jobs and scenes: exact per-state counts, cancel, abort, scenes as one job. The job
//! over 20,000 devices is in `tests/scale` (a binary of its own, so it runs alone).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::support::{API_KEY, Node, Raw, Seen, answering, eventually};

async fn job(node: &Node, id: &str) -> Value {
    let (s, job) = node
        .admin("GET", &format!("/v1/jobs/{id}?limit=1000"), None)
        .await;
    assert_eq!(s, 200, "{job}");
    job
}

async fn until_state(node: &Node, id: &str, state: &str) -> Value {
    eventually(&format!("job {id} {state}"), || async {
        let j = job(node, id).await;
        (j["state"] == state).then_some(j)
    })
    .await
}

async fn create(node: &Node, body: Value) -> String {
    let (s, created) = node.admin("POST", "/v1/jobs", Some(body)).await;
    assert_eq!(s, 202, "{created}");
    created["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_counts_every_device_by_outcome_and_completes() {
    let node = Node::start(&[("FLEETGATE_JOB_POLL_INTERVAL_MS", "100")]).await;
    let seen: Seen = Arc::default();
    let mut devices = Vec::new();
    for i in 0..6 {
        let id = format!("jd-{i}");
        let secret = node.provision_in(&id, &["plant"]).await;
        if i < 3 {
            let raw = Raw::authed(&node.device_url(), &id, &secret).await;
            devices.push(answering(raw, i == 2, seen.clone()));
        }
    }
    node.provision_in("other-group", &["elsewhere"]).await;
    let id = create(
        &node,
        json!({"group": "plant", "devices": ["jd-0", "nobody"], "payload": {"action": "reboot"}, "ttlMs": 1500}),
    )
    .await;
    let done = until_state(&node, &id, "completed").await;
    assert_eq!(
        done["counts"],
        json!({"queued": 0, "delivered": 0, "succeeded": 2, "failed": 1, "timedOut": 3, "cancelled": 0}),
        "{done}"
    );
    assert_eq!(
        (done["executions"].as_u64(), done["skipped"].as_u64()),
        (Some(6), Some(1)),
        "{done}"
    );
    let outcomes: Vec<(&str, &str)> = done["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["device"].as_str().unwrap(), o["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("jd-0", "succeeded"),
            ("jd-1", "succeeded"),
            ("jd-2", "failed"),
            ("jd-3", "timedOut"),
            ("jd-4", "timedOut"),
            ("jd-5", "timedOut")
        ]
    );
    // jd-0 was named twice (explicitly and by group): one command.
    let sends: Vec<u32> = seen.lock().unwrap().values().map(|s| s.0).collect();
    assert_eq!(
        sends,
        [3],
        "one msgid for the job's step; three devices, one first send each"
    );
    // The completion is in the audit log.
    let (_, audit) = node
        .admin(
            "GET",
            &format!("/v1/audit?action=job.complete&target=job:{id}"),
            None,
        )
        .await;
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1, "{audit}");
    // QoS 0 jobs are refused.
    let (s, _) = node
        .admin(
            "POST",
            "/v1/jobs",
            Some(json!({"group": "plant", "payload": {}, "qos": 0})),
        )
        .await;
    assert_eq!(s, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_removes_what_was_not_sent_and_abort_stops_a_failing_job() {
    let node = Node::start(&[("FLEETGATE_JOB_POLL_INTERVAL_MS", "100")]).await;
    for i in 0..40 {
        node.provision_in(&format!("off-{i:02}"), &["offline"])
            .await;
    }
    // Four devices per second: the cancel lands long before all forty are queued.
    let id = create(&node, json!({"group": "offline", "payload": {}, "rate": 4})).await;
    eventually("the first batch", || async {
        (job(&node, &id).await["executions"].as_u64() > Some(0)).then_some(())
    })
    .await;
    let (s, c) = node
        .admin("POST", &format!("/v1/jobs/{id}/cancel"), None)
        .await;
    assert_eq!((s, c["state"].as_str()), (202, Some("cancelled")));
    let done = eventually("every queued command withdrawn", || async {
        let j = job(&node, &id).await;
        (j["counts"]["queued"] == 0).then_some(j)
    })
    .await;
    let executions = done["executions"].as_u64().unwrap();
    assert!(executions > 0 && executions < 40, "{done}");
    assert_eq!(
        done["counts"]["cancelled"].as_u64(),
        Some(executions),
        "{done}"
    );
    for i in 0..40 {
        let (_, d) = node
            .admin("GET", &format!("/v1/devices/off-{i:02}"), None)
            .await;
        assert_eq!(d["queuedCommands"], 0, "off-{i:02}");
    }
    let (s, _) = node
        .admin("POST", &format!("/v1/jobs/{id}/cancel"), None)
        .await;
    assert_eq!(s, 202, "cancelling again is fine");

    // Every device refuses: past 10 finished, more than half failed, the job stops.
    let seen: Seen = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let dev = format!("bad-{i:02}");
        let secret = node.provision_in(&dev, &["refusers"]).await;
        tasks.push(answering(
            Raw::authed(&node.device_url(), &dev, &secret).await,
            true,
            seen.clone(),
        ));
    }
    let id = create(
        &node,
        json!({"group": "refusers", "payload": {}, "rate": 8, "abortFailedPercent": 50}),
    )
    .await;
    let aborted = until_state(&node, &id, "aborted").await;
    let executions = aborted["executions"].as_u64().unwrap();
    assert!((10..40).contains(&executions), "stopped early: {aborted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scene_runs_its_actions_as_one_audited_job() {
    let node = Node::start(&[("FLEETGATE_JOB_POLL_INTERVAL_MS", "100")]).await;
    let seen: Seen = Arc::default();
    let mut tasks = Vec::new();
    let mut raws = HashMap::new();
    for (id, group) in [
        ("lamp-1", "lights"),
        ("lamp-2", "lights"),
        ("lock-1", "locks"),
    ] {
        let secret = node.provision_in(id, &[group]).await;
        let per_device: Seen = Arc::default();
        raws.insert(id, per_device.clone());
        tasks.push(answering(
            Raw::authed(&node.device_url(), id, &secret).await,
            false,
            per_device,
        ));
    }
    drop(seen);
    let scene = json!({"actions": [
        {"group": "lights", "payload": {"power": "off"}},
        {"devices": ["lock-1"], "payload": {"lock": true}, "qos": 2},
    ]});
    let (s, put) = node
        .admin("PUT", "/v1/scenes/away", Some(scene.clone()))
        .await;
    assert_eq!(s, 201, "{put}");
    let (s, _) = node.admin("PUT", "/v1/scenes/away", Some(scene)).await;
    assert_eq!(s, 200, "replacing");
    let (s, act) = node
        .admin_request(
            "POST",
            "/v1/scenes/away/activate",
            None,
            Some(API_KEY),
            &[("x-request-id", "away-1")],
        )
        .await;
    assert_eq!(s, 202, "{act}");
    let id = act["job"].as_str().unwrap().to_owned();
    let done = until_state(&node, &id, "completed").await;
    assert_eq!(done["counts"]["succeeded"], 3, "{done}");
    assert_eq!(done["scene"], "away");
    for (device, msgid) in [
        ("lamp-1", format!("job-{id}-0")),
        ("lamp-2", format!("job-{id}-0")),
        ("lock-1", format!("job-{id}-1")),
    ] {
        let seen = raws[device].lock().unwrap();
        assert_eq!(seen.get(&msgid).map(|s| s.0), Some(1), "{device}: {seen:?}");
    }
    let (_, audit) = node
        .admin("GET", "/v1/audit?action=scene.activate", None)
        .await;
    let entries: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["requestId"] == "away-1")
        .collect();
    assert_eq!(entries.len(), 2, "request and response: {audit}");
    assert_eq!(
        (entries[1]["job"].as_str(), entries[1]["target"].as_str()),
        (Some(id.as_str()), Some("scene:away"))
    );
    let (s, _) = node.admin("POST", "/v1/scenes/nope/activate", None).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowly_paced_job_does_not_hold_up_another() {
    let node = Node::start(&[("FLEETGATE_JOB_POLL_INTERVAL_MS", "100")]).await;
    for i in 0..20 {
        node.provision_in(&format!("slow-{i:02}"), &["slow"]).await;
    }
    for i in 0..3 {
        node.provision_in(&format!("fast-{i}"), &["fast"]).await;
    }
    // One device per second: twenty seconds to send.
    let slow = create(&node, json!({"group": "slow", "payload": {}, "rate": 1})).await;
    let fast = create(&node, json!({"group": "fast", "payload": {}})).await;
    let done = until_state(&node, &fast, "dispatched").await;
    assert_eq!(done["executions"], 3);
    assert_eq!(job(&node, &slow).await["state"], "running");
}
