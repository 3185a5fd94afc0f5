//! The protocol driven by a client we did not write: Python's `websockets`.

use std::process::Stdio;

use crate::support::{API_KEY, Node};

/// Runs `interop/<script>` with `args` and asserts it passed every step.
async fn run_script(script: &str, args: &[&str]) {
    let path = format!("{}/interop/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new("python3")
        .arg(&path)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    let out = tokio::time::timeout(crate::support::DEADLINE * 3, out)
        .await
        .expect("script finished in time")
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python {script} failed (needs `pip install websockets`)\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("interop: all steps passed"), "{stdout}");
}

#[tokio::test]
async fn python_websockets_device_speaks_the_protocol() {
    let node = Node::start(&[]).await;
    let secret = node.provision("py-dev").await;
    let admin = format!("http://{}", node.admin);
    run_script(
        "device.py",
        &[&node.device_url(), &admin, API_KEY, "py-dev", &secret],
    )
    .await;
}

#[tokio::test]
async fn python_websockets_dashboard_subscribes_and_recovers() {
    let node = Node::start(&[]).await;
    let secret = node.provision("py-app-dev").await;
    let base = format!("ws://{}", node.gateway);
    run_script("app.py", &[&base, API_KEY, "py-app-dev", &secret]).await;
}

#[tokio::test]
async fn python_device_signs_messages_with_the_documented_canonical_form() {
    let node = Node::start(&[]).await;
    let secret = node.provision("py-signer").await;
    let (code, body) = node
        .admin("POST", "/v1/devices/py-signer/mac-key", None)
        .await;
    assert_eq!(code, 200, "{body}");
    let key = body["macKey"].as_str().expect("macKey");
    run_script(
        "signed.py",
        &[&node.device_url(), "py-signer", &secret, key],
    )
    .await;
}

/// The README's example device, signing with its MAC key: its reports reach the shadow.
#[tokio::test]
async fn the_example_device_signs_its_reports_with_a_mac_key() {
    let node = Node::start(&[]).await;
    let secret = node.provision("example-signer").await;
    let (_, body) = node
        .admin("POST", "/v1/devices/example-signer/mac-key", None)
        .await;
    let key = body["macKey"].as_str().expect("macKey").to_owned();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/device.py");
    let mut child = tokio::process::Command::new("python3")
        .args([script, "example-signer", &secret, &node.device_url()])
        .env("MAC_KEY", &key)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let reported = crate::support::eventually("the signed report reaches the shadow", || async {
        let (_, shadow) = node
            .admin("GET", "/v1/devices/example-signer/shadow", None)
            .await;
        shadow["reported"]
            .get("temperature")
            .is_some()
            .then_some(shadow["reported"].clone())
    })
    .await;
    assert!(reported["temperature"].is_number(), "{reported}");
    let (_, metrics) = node.internal_get("/metrics").await;
    assert!(
        !metrics.contains("fleetgate_signature_failures_total{"),
        "{metrics}"
    );
    child.kill().await.expect("stopped");
}
