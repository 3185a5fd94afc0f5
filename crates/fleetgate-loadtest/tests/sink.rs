//! The harness end to end against its own reference sink: several worker processes, source
//! addresses spread over 127.0.0.x, results written as JSON, and every message the devices
//! sent counted by the sink. Also: bad parameters are refused with a readable message.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_fleetgate-loadtest");

/// The sink, killed on drop.
struct Sink {
    child: Child,
    ws: String,
    metrics: String,
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sink() -> Sink {
    use std::io::BufRead;
    let mut child = Command::new(BIN)
        .args([
            "sink",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the sink");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("sink prints its addresses");
    let addrs: Value = serde_json::from_str(&line).expect("one JSON line");
    Sink {
        ws: format!("ws://{}/v1/device", addrs["sink"].as_str().unwrap()),
        metrics: format!("http://{}/metrics", addrs["metrics"].as_str().unwrap()),
        child,
    }
}

fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::blocking::get(url).unwrap().text().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from {text}"))
}

/// Runs the harness to the end (bounded) and returns its results file.
fn run(args: &[&str]) -> Value {
    let out = std::env::temp_dir().join(format!(
        "fleetgate-loadtest-{}-{}.json",
        std::process::id(),
        rand_suffix()
    ));
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--results")
        .arg(&out)
        .stdout(Stdio::null())
        .spawn()
        .expect("start the harness");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(status) => status.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("the harness did not finish within 60 s: {args:?}");
        }
    };
    assert!(status.success(), "{args:?}: {status}");
    let result: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out);
    result
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn fig(r: &Value, name: &str) -> f64 {
    r["figures"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("no figure {name} in {r}"))
}

#[test]
fn every_message_sent_by_two_workers_reaches_the_sink() {
    let s = sink();
    let r = run(&[
        "telemetry",
        "--ws-url",
        &s.ws,
        "--metrics-url",
        &s.metrics,
        "--auth",
        "none",
        "--devices",
        "6",
        "--workers",
        "2",
        "--qos",
        "0",
        "--rate",
        "200",
        "--duration",
        "1",
        "--source-ips",
        "127.0.0.2-127.0.0.3",
    ]);
    assert_eq!(r["scenario"], "telemetry");
    assert_eq!(fig(&r, "connected"), 6.0);
    assert_eq!(fig(&r, "connect_failed"), 0.0);
    assert_eq!(fig(&r, "send_failed"), 0.0);
    let sent = fig(&r, "messages_sent");
    // 6 devices at 200/s for 1 s, less what the pacer had not reached at the end.
    assert!((600.0..=1_300.0).contains(&sent), "{sent} sent");
    assert!(fig(&r, "server_msg_per_s") > 0.0);
    assert_eq!(
        metric(&s.metrics, "sink_messages_received_total"),
        sent,
        "the sink read exactly what the devices sent"
    );
    assert_eq!(metric(&s.metrics, "sink_connections_total"), 6.0);
    assert!(r["params"].get("api_key").is_none());
}

#[test]
fn connect_holds_every_device_and_reports_the_rate() {
    let s = sink();
    let r = run(&[
        "connect",
        "--ws-url",
        &s.ws,
        "--metrics-url",
        &s.metrics,
        "--auth",
        "none",
        "--devices",
        "300",
        "--workers",
        "3",
        "--duration",
        "0.2",
        "--connect-rate",
        "3000",
    ]);
    assert_eq!(fig(&r, "connected"), 300.0);
    assert_eq!(fig(&r, "connect_failed"), 0.0);
    let rate = fig(&r, "connect_per_s");
    // Paced at 3,000/s: 300 devices take at least ~0.1 s, so the rate cannot exceed the pace
    // by much whatever the machine.
    assert!(rate > 0.0 && rate < 3_500.0, "{rate}/s");
    assert!(fig(&r, "server_rss_bytes") > 0.0);
}

#[test]
fn a_dead_endpoint_is_counted_as_failures_not_a_crash() {
    // A port nobody listens on: every connection is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = run(&[
        "connect",
        "--ws-url",
        &format!("ws://127.0.0.1:{port}/v1/device"),
        "--auth",
        "none",
        "--devices",
        "4",
        "--duration",
        "0",
    ]);
    assert_eq!(fig(&r, "connected"), 0.0);
    assert_eq!(fig(&r, "connect_failed"), 4.0);
    assert_eq!(r["breakdown"]["connect_failed"]["refused"], 4);
}

#[test]
fn bad_parameters_are_refused_with_the_reason() {
    for (args, word) in [
        (vec!["telemetry", "--auth", "none", "--qos", "2"], "qos"),
        (vec!["reconnect-storm", "--api-key", "k"], "--trigger"),
        (
            vec!["connect", "--devices", "10", "--auth", "jwt"],
            "--jwt-secret",
        ),
        (
            vec!["connect", "--auth", "none", "--source-ips", "nonsense"],
            "nonsense",
        ),
        (
            vec!["connect", "--config", "/nonexistent/scenario.toml"],
            "scenario.toml",
        ),
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .env_remove("FLEETGATE_API_KEY")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(word), "{args:?}: {err}");
    }
}
