//! The Helm chart, the plain manifests and the Dockerfile without a cluster:
//! `scripts/chart.py check` renders the chart with Helm's own template engine for the default
//! values and every file in `helm/fleetgate/ci/`, validates each object against the Kubernetes
//! OpenAPI schemas, lints the YAML and the Dockerfile, builds `k8s/` with `kubectl kustomize`,
//! feeds the rendered config to this `fleetgate` binary, and asserts what the chart promises
//! (probes on the internal port, preStop drain within the grace period, the device-ID hash,
//! no metrics port on a public Service, every setting reachable from values).

use std::process::Command;

#[test]
fn the_chart_renders_validates_and_keeps_its_promises() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let binary = fleetgate_e2e::fleetgate_binary().expect("fleetgate binary");
    let out = Command::new("python3")
        .arg(format!("{root}/scripts/chart.py"))
        .arg("check")
        .env("FLEETGATE_BIN", binary)
        .output()
        .expect("python3 runs (make test installs the chart tools: scripts/test-deps)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "chart checks failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The summary line proves the checks ran (a script that checked nothing would pass).
    let summary = report
        .lines()
        .find(|l| l.starts_with("chart checks:"))
        .unwrap_or_else(|| panic!("no summary: {report}"));
    let passed: usize = summary
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(passed >= 500, "{summary}");
    assert!(summary.contains("7 value sets"), "{summary}");
}
