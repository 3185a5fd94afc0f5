//! The OpenAPI document against the running API, with a fuzzer we did not write:
//! schemathesis generates requests from the document (valid and invalid ones, single calls
//! and sequences) and checks every answer against it: no 5xx, only documented statuses,
//! bodies matching their schemas, invalid input refused, valid input accepted.

use std::process::Command;

use crate::support::{API_KEY, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_against_the_running_api() {
    // Short waits: the fuzzer sends commands to devices it made, which are offline, and a
    // call waits as long as it asks (the document states the limit).
    let node = Node::start(&[
        ("RUST_LOG", "error"),
        ("FLEETGATE_ADMIN_MAX_WAIT_MS", "300"),
    ])
    .await;
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/schemathesis.toml");
    let url = format!("http://{}/v1/openapi.json", node.admin);
    let out = tokio::task::spawn_blocking(move || {
        // Through Python, so it does not matter where pip put the `schemathesis` script.
        Command::new("python3")
            .args([
                "-c",
                "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
            ])
            .args(["--no-color", "--config-file", config, "run", &url])
            .args(["--header", &format!("Authorization: Bearer {API_KEY}")])
            // One worker: CPython 3.11 can fail `ast.parse` in hypothesis when two threads
            // describe strategies at once ("AST constructor recursion depth mismatch").
            .args(["--seed", "1", "--workers", "1"])
            .output()
            .expect("python3 runs (make test installs schemathesis: scripts/test-deps)")
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems (rerun: see tests/fuzz/schemathesis.toml):\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("43 selected / 43 total"),
        "every operation was tested:\n{report}"
    );
}
