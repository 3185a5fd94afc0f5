//! The load-test harness (`fleetgate-loadtest`) against real nodes: the commands scenario on
//! one node, and a reconnect storm through nginx on two nodes sharing Redis. The harness's own
//! counts must agree with what the system did: every command answered, none lost, every
//! drained device back.

use std::path::PathBuf;
use std::time::Duration;

use fleetgate_test_support::{NginxServer, RedisServer};
use serde_json::Value;

use crate::support::{API_KEY, Node};

fn harness() -> PathBuf {
    let bin = fleetgate_e2e::fleetgate_binary()
        .expect("fleetgate binary")
        .with_file_name("fleetgate-loadtest");
    assert!(
        bin.exists(),
        "{} missing: `cargo build --workspace --bins` (make test does)",
        bin.display()
    );
    bin
}

/// Runs a scenario to the end (bounded) and returns its results.
async fn run(args: &[String]) -> Value {
    let out = std::env::temp_dir().join(format!(
        "fleetgate-e2e-loadtest-{}-{}.json",
        std::process::id(),
        crate::support::now_ms()
    ));
    let mut child = tokio::process::Command::new(harness())
        .args(args)
        .arg("--results")
        .arg(&out)
        .env("FLEETGATE_API_KEY", API_KEY)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the harness");
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait())
        .await
        .unwrap_or_else(|_| panic!("harness still running after 120 s: {args:?}"))
        .unwrap();
    assert!(status.success(), "{args:?}: {status}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out);
    r
}

fn fig(r: &Value, name: &str) -> f64 {
    r["figures"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("no figure {name} in {r}"))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn commands_scenario_gets_every_result_from_one_node() {
    let node = Node::start(&[]).await;
    let mut a = args(&[
        "commands",
        "--devices",
        "8",
        "--workers",
        "2",
        "--rate",
        "100",
        "--operators",
        "4",
        "--wait-ms",
        "5000",
        "--duration",
        "1",
        "--settle-timeout",
        "10",
    ]);
    a.extend(args(&[
        "--ws-url",
        &node.device_url(),
        "--admin-url",
        &format!("http://{}", node.admin),
        "--metrics-url",
        &format!("http://{}/metrics", node.internal),
    ]));
    let r = run(&a).await;
    assert_eq!(fig(&r, "connected"), 8.0);
    assert_eq!(fig(&r, "provision_failed"), 0.0);
    let sent = fig(&r, "commands_sent");
    assert!(sent >= 50.0, "{sent} commands in 1 s at 100/s");
    assert_eq!(fig(&r, "commands_ok"), sent, "{}", r["breakdown"]);
    assert_eq!(fig(&r, "commands_received"), sent);
    assert_eq!(fig(&r, "commands_lost"), 0.0);
    assert!(fig(&r, "rtt_p99_ms") > 0.0);
    assert!(
        fig(&r, "server_rss_bytes") > 1e6,
        "read from the node's /metrics"
    );
}

#[tokio::test]
async fn reconnect_storm_through_nginx_brings_every_device_back() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut nodes = Vec::new();
    for id in ["storm-a", "storm-b"] {
        nodes.push(
            Node::start(&[
                ("FLEETGATE_REDIS_URLS", url.as_str()),
                ("FLEETGATE_NODE_ID", id),
                // Long enough that the harness's devices never miss a heartbeat.
                ("FLEETGATE_IDLE_TIMEOUT_MS", "30000"),
            ])
            .await,
        );
    }
    let nginx = NginxServer::start(&nodes.iter().map(|n| n.gateway.clone()).collect::<Vec<_>>());
    let mut a = args(&[
        "reconnect-storm",
        "--devices",
        "40",
        "--workers",
        "2",
        "--rate",
        "50",
        "--operators",
        "4",
        "--wait-ms",
        "0",
        "--warmup",
        "0.5",
        "--duration",
        "3",
        "--settle-timeout",
        "20",
    ]);
    a.extend(args(&[
        "--ws-url",
        &format!("ws://{}/v1/device", nginx.addr()),
        "--admin-url",
        &format!("http://{}", nodes[1].admin),
        "--metrics-url",
        &format!(
            "http://{}/metrics,http://{}/metrics",
            nodes[0].internal, nodes[1].internal
        ),
        "--trigger",
        &format!("kill -TERM {}", nodes[0].pid()),
    ]));
    let r = run(&a).await;
    assert_eq!(fig(&r, "connected"), 40.0);
    let dropped = fig(&r, "disconnects");
    assert!(
        dropped >= 1.0,
        "the drained node held devices: {}",
        r["breakdown"]
    );
    assert_eq!(
        r["breakdown"]["disconnected"]["1012"].as_f64(),
        Some(dropped),
        "every drop was the drain's 1012: {}",
        r["breakdown"]
    );
    assert_eq!(fig(&r, "not_back"), 0.0);
    assert_eq!(fig(&r, "reconnects"), dropped);
    assert!(fig(&r, "commands_accepted") > 0.0);
    assert_eq!(fig(&r, "commands_lost"), 0.0, "{}", r["breakdown"]);
    assert!(fig(&r, "all_back_s") > 0.0);
    drop(redis);
}
