//! The audit log on the Redis bus: tampering done directly in Redis is found where it
//! happened, an export verifies offline against its signed checkpoints, paging under
//! concurrent appends returns every entry once, and with Redis stopped a state change is
//! refused and leaves nothing behind.

use std::collections::BTreeSet;
use std::process::Command;

use fleetgate_test_support::{RedisOptions, RedisServer, require_program};
use serde_json::{Value, json};

use crate::support::{Node, eventually, now_ms};

/// A fixed Ed25519 key (PKCS#8) and its public half (SPKI), as openssl writes them.
const SIGNING_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fleetgate-audit-{}-{}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

async fn node_on(redis: &RedisServer, checkpoint_ms: &str) -> Node {
    let key = scratch("signing.pem");
    crate::support::write_secret(&key, SIGNING_KEY);
    Node::start(&[
        ("FLEETGATE_REDIS_URLS", &redis.url()),
        ("FLEETGATE_AUDIT_SIGNING_KEY", key.to_str().unwrap()),
        ("FLEETGATE_AUDIT_CHECKPOINT_INTERVAL_MS", checkpoint_ms),
        ("FLEETGATE_REDIS_COMMAND_TIMEOUT_MS", "1000"),
    ])
    .await
}

/// The log as the export gives it: `(id, text)` per entry.
async fn export(node: &Node) -> Vec<(String, String)> {
    let (status, body) = node.admin("GET", "/v1/audit/export", None).await;
    assert_eq!(status, 200);
    let text = match body {
        Value::String(s) => s,
        Value::Null => String::new(),
        // A one-line export parses as JSON.
        other => other.to_string(),
    };
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_str().unwrap().to_owned(),
                v["entry"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn redis_cli(redis: &RedisServer, args: &[&str]) -> String {
    let cli = require_program("redis-cli", "redis-tools");
    let out = Command::new(cli)
        .arg("-p")
        .arg(redis.port().to_string())
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Replaces the stream with `entries`, as someone with write access to Redis could:
/// with their own IDs where given, fresh ones otherwise.
fn rewrite(redis: &RedisServer, entries: &[(Option<String>, String)]) {
    redis_cli(redis, &["DEL", "fleetgate:audit"]);
    for (id, text) in entries {
        redis_cli(
            redis,
            &[
                "XADD",
                "fleetgate:audit",
                id.as_deref().unwrap_or("*"),
                "e",
                text,
            ],
        );
    }
}

async fn verify(node: &Node) -> Value {
    let (status, report) = node.admin("GET", "/v1/audit/verify", None).await;
    assert_eq!(status, 200, "{report}");
    report
}

fn edit(text: &str, f: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(text).unwrap();
    f(&mut v);
    v.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_in_redis_is_found_where_it_happened_and_exports_verify_offline() {
    let redis = RedisServer::start();
    let node = node_on(&redis, "300").await;
    for i in 0..6 {
        node.provision_in(&format!("t-{i}"), &["farm-a"]).await;
    }
    // A checkpoint vouches for what was appended so far.
    eventually("a checkpoint", || async {
        export(&node)
            .await
            .iter()
            .any(|(_, e)| e.contains("\"stage\":\"checkpoint\""))
            .then_some(())
    })
    .await;
    let original = export(&node).await;
    assert!(original.len() >= 13, "{} entries", original.len());
    let report = verify(&node).await;
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["checkpoints"].as_u64().unwrap() >= 1);

    // Offline: the export and the public key, through the CLI.
    let file = scratch("export.jsonl");
    let lines: String = original
        .iter()
        .map(|(id, e)| json!({"id": id, "entry": e}).to_string() + "\n")
        .collect();
    std::fs::write(&file, &lines).unwrap();
    let (s, key) = node.admin("GET", "/v1/audit/public-key", None).await;
    assert_eq!(s, 200);
    let public = scratch("public.pem");
    std::fs::write(&public, key["publicKeyPem"].as_str().unwrap()).unwrap();
    let cli = |path: &std::path::Path| {
        let out = Command::new(fleetgate_e2e::fleetgate_binary().unwrap())
            .args(["audit", "verify", "--export"])
            .arg(path)
            .arg("--public-key")
            .arg(&public)
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.code(), report)
    };
    let (code, report) = cli(&file);
    assert_eq!(
        (code, report["ok"].as_bool()),
        (Some(0), Some(true)),
        "{report}"
    );
    // An edited copy does not verify, and the CLI names the entry.
    let mut forged = original.clone();
    forged[3].1 = edit(&forged[3].1, |v| v["actor"] = json!("user:mallory"));
    let forged_file = scratch("forged.jsonl");
    std::fs::write(
        &forged_file,
        forged
            .iter()
            .map(|(id, e)| json!({"id": id, "entry": e}).to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let (code, report) = cli(&forged_file);
    assert_eq!(
        (code, report["firstBad"].as_str()),
        (Some(1), Some(original[3].0.as_str())),
        "{report}"
    );

    let with_ids = |list: &[(String, String)]| -> Vec<(Option<String>, String)> {
        list.iter()
            .map(|(id, e)| (Some(id.clone()), e.clone()))
            .collect()
    };
    let fresh = |list: &[(String, String)]| -> Vec<(Option<String>, String)> {
        list.iter().map(|(_, e)| (None, e.clone())).collect()
    };

    // Edited in place: the edited entry is named.
    let mut edited = with_ids(&original);
    edited[4].1 = edit(&edited[4].1, |v| v["outcome"] = json!(403));
    rewrite(&redis, &edited);
    let r = verify(&node).await;
    assert_eq!(
        (r["ok"].as_bool(), r["firstBad"].as_str()),
        (Some(false), Some(original[4].0.as_str())),
        "{r}"
    );

    // Deleted: the entry after the gap is named.
    let mut deleted = with_ids(&original);
    deleted.remove(4);
    rewrite(&redis, &deleted);
    let r = verify(&node).await;
    assert_eq!(r["firstBad"].as_str(), Some(original[5].0.as_str()), "{r}");

    // Inserted (new IDs, since stream IDs only grow): the entry after the forgery is named.
    let mut inserted = fresh(&original);
    let forgery = edit(&original[4].1, |v| v["action"] = json!("user.create"));
    inserted.insert(5, (None, forgery));
    rewrite(&redis, &inserted);
    let now = export(&node).await;
    let r = verify(&node).await;
    assert_eq!(
        r["firstBad"].as_str(),
        Some(now[5].0.as_str()),
        "the forgery: {r}"
    );

    // Reordered.
    let mut reordered = fresh(&original);
    reordered.swap(4, 5);
    rewrite(&redis, &reordered);
    let now = export(&node).await;
    let r = verify(&node).await;
    assert_eq!(r["firstBad"].as_str(), Some(now[4].0.as_str()), "{r}");

    // Put back as it was: it verifies again, and new appends chain onto it.
    rewrite(&redis, &with_ids(&original));
    assert_eq!(verify(&node).await["ok"], true);
    node.provision_in("after-repair", &["farm-a"]).await;
    assert_eq!(verify(&node).await["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_while_entries_are_appended_returns_every_entry_once() {
    let redis = RedisServer::start();
    let node = node_on(&redis, "3600000").await;
    let writer = {
        let url = format!("http://{}/v1/devices", node.admin);
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0..150 {
                let resp = http
                    .post(&url)
                    .bearer_auth(crate::support::API_KEY)
                    .json(&json!({"id": format!("p-{i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status().as_u16(), 201);
            }
        })
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut writer = Some(writer);
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/audit?limit=7&cursor={c}"),
            None => "/v1/audit?limit=7".to_owned(),
        };
        let (s, page) = node.admin("GET", &path, None).await;
        assert_eq!(s, 200, "{page}");
        seen.extend(
            page["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_owned()),
        );
        if let Some(next) = page["next"].as_str() {
            cursor = Some(next.to_owned());
        } else if writer.as_ref().is_some_and(|w| w.is_finished()) {
            writer.take().unwrap().await.unwrap();
        } else if writer.is_none() {
            break;
        }
    }
    let all: Vec<String> = export(&node).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(all.len(), 300, "a request and a response entry per call");
    assert_eq!(seen, all, "every entry exactly once, in order");
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_a_state_change_is_refused_and_nothing_is_changed_or_lost() {
    let mut redis = RedisServer::start_with(RedisOptions { aof: true });
    let node = node_on(&redis, "3600000").await;
    node.provision("before-1").await;
    node.provision("before-2").await;
    let before = export(&node).await;
    assert_eq!(before.len(), 4);

    redis.kill();
    let (status, body) = node
        .admin_request(
            "POST",
            "/v1/devices",
            Some(json!({"id": "during"})),
            Some(crate::support::API_KEY),
            &[("x-request-id", "refused-1")],
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["code"].is_string());

    redis.restart();
    eventually("the node to reconnect", || async {
        let (s, _) = node.internal_get("/readyz").await;
        (s == 200).then_some(())
    })
    .await;
    let (s, _) = node.admin("GET", "/v1/devices/during", None).await;
    assert_eq!(s, 404, "the refused call changed nothing");
    let after = export(&node).await;
    assert_eq!(&after[..4], &before[..], "every entry from before is there");
    assert!(
        after.iter().all(|(_, e)| !e.contains("refused-1")),
        "nothing for the refused call"
    );
    assert_eq!(verify(&node).await["ok"], true);
    // And the log goes on.
    node.provision("after-1").await;
    let r = verify(&node).await;
    assert_eq!(
        (r["ok"].as_bool(), r["entries"].as_u64()),
        (Some(true), Some(6)),
        "{r}"
    );
}
