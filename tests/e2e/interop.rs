//! The protocol driven by a client we did not write: Python's `websockets`.

use std::process::Stdio;

use crate::support::{API_KEY, Node};

#[tokio::test]
async fn python_websockets_device_speaks_the_protocol() {
    let node = Node::start(&[]).await;
    let secret = node.provision("py-dev").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/device.py");
    let out = tokio::process::Command::new("python3")
        .args([
            script,
            &node.device_url(),
            &format!("http://{}", node.admin),
            API_KEY,
            "py-dev",
            &secret,
        ])
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
        "python device failed (needs `pip install websockets`)\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("interop: all steps passed"), "{stdout}");
}

#[tokio::test]
async fn python_websockets_dashboard_subscribes_and_recovers() {
    let node = Node::start(&[]).await;
    let secret = node.provision("py-app-dev").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/app.py");
    let out = tokio::process::Command::new("python3")
        .args([
            script,
            &format!("ws://{}", node.gateway),
            API_KEY,
            "py-app-dev",
            &secret,
        ])
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
        "python dashboard failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("interop: all steps passed"), "{stdout}");
}
