//! `make bench`: the standard load-test suite on loopback. For every entry of
//! `loadtest/suite.toml` and every run, it starts the system afresh (one node on the memory
//! bus, the reference sink, or redis-server + N nodes behind nginx), runs the release
//! `fleetgate-loadtest` with the entry's scenario file and overrides, keeps the result in
//! `loadtest/results/<entry>/run<k>.json` (goose's HTML reports go to
//! `target/loadtest-reports/<entry>/`, out of git), and at the end regenerates the table in
//! BENCHMARKS.md.
//!
//! ```text
//! cargo build --release -p fleetgate -p fleetgate-loadtest
//! cargo bench -p fleetgate-e2e --bench loadtest -- [--only connect-node,storm-redis] [--runs 3]
//! ```
#![allow(clippy::print_stdout)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use fleetgate_test_support::{NginxOptions, NginxServer, RedisServer};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use support::node::{API_KEY, Node, quiet_env};

/// One run of one entry may take this long at most.
const RUN_DEADLINE: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Deserialize)]
struct Suite {
    runs: usize,
    #[serde(rename = "entry")]
    entries: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
struct Entry {
    name: String,
    system: System,
    #[serde(default = "one")]
    nodes: usize,
    #[serde(default)]
    direct: bool,
    #[serde(default = "two")]
    nginx_workers: usize,
    /// Source addresses nginx connects to the nodes from (127.0.1.1 and up); 0 = one.
    #[serde(default)]
    nginx_sources: u8,
    /// Nodes the devices connect to directly (no nginx), by index.
    device_nodes: Option<Vec<usize>>,
    /// Fanout: nodes the app subscribers connect to directly, by index (default: where the
    /// devices go).
    app_nodes: Option<Vec<usize>>,
    scenario: String,
    config: String,
    #[serde(default)]
    set: toml::Table,
    trigger: Option<String>,
    /// `node` only: the public listener serves TLS (a throwaway CA from scripts/dev-certs);
    /// devices connect to `wss://` and trust that CA.
    #[serde(default)]
    tls: bool,
}

fn one() -> usize {
    1
}

fn two() -> usize {
    2
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum System {
    Node,
    Sink,
    Cluster,
}

/// What a run's scenario is pointed at; dropping it stops everything.
struct Target {
    ws_urls: Vec<String>,
    /// `/v1/app` endpoints; empty: the scenario derives them from `ws_urls`.
    app_urls: Vec<String>,
    admin: Option<String>,
    metrics: Vec<String>,
    pids: Vec<u32>,
    _nodes: Vec<Node>,
    _sink: Option<Child>,
    nginx: Option<NginxServer>,
    redis: Option<RedisServer>,
    redis_url: Option<String>,
    tls_ca: Option<PathBuf>,
}

impl Drop for Target {
    fn drop(&mut self) {
        // nginx and redis wait for their processes on drop: fine here, the run is over.
        drop(self.nginx.take());
        drop(self.redis.take());
    }
}

/// Sockets one node may hold here: the machine's per-process file limit allows ~19,000.
const NODE_MAX_CONNECTIONS: usize = 19_500;

async fn start(entry: &Entry, loadtest: &Path) -> anyhow::Result<Target> {
    match entry.system {
        System::Node => {
            let mut env = quiet_env(NODE_MAX_CONNECTIONS);
            let tls_ca = if entry.tls {
                let dir = bench_certs()?;
                let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
                env.push(("FLEETGATE_TLS_CERT", path("server.pem")));
                env.push(("FLEETGATE_TLS_KEY", path("server.key")));
                Some(dir.join("ca.pem"))
            } else {
                None
            };
            let node = Node::start(&env).await?;
            let scheme = if entry.tls { "wss" } else { "ws" };
            Ok(Target {
                tls_ca,
                ws_urls: vec![format!("{scheme}://{}/v1/device", node.gateway)],
                app_urls: Vec::new(),
                admin: Some(format!("http://{}", node.admin)),
                metrics: vec![format!("http://{}/metrics", node.internal)],
                pids: vec![node.pid()],
                _nodes: vec![node],
                _sink: None,
                nginx: None,
                redis: None,
                redis_url: None,
            })
        }
        System::Sink => {
            let mut child = Command::new(loadtest)
                .args([
                    "sink",
                    "--listen",
                    "127.0.0.1:0",
                    "--metrics-listen",
                    "127.0.0.1:0",
                ])
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting the sink")?;
            let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
            let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
                .await
                .context("sink did not print its addresses")??
                .context("sink exited")?;
            let addrs: serde_json::Value = serde_json::from_str(&line)?;
            let pid = child.id().unwrap_or(0);
            Ok(Target {
                app_urls: Vec::new(),
                ws_urls: vec![format!(
                    "ws://{}/v1/device",
                    addrs["sink"].as_str().unwrap_or("")
                )],
                admin: None,
                metrics: vec![format!(
                    "http://{}/metrics",
                    addrs["metrics"].as_str().unwrap_or("")
                )],
                pids: vec![pid],
                _nodes: vec![],
                _sink: Some(child),
                nginx: None,
                redis: None,
                redis_url: None,
                tls_ca: None,
            })
        }
        System::Cluster => {
            let redis = support::redis::start().await?;
            let mut nodes = Vec::new();
            for i in 0..entry.nodes {
                let mut env = quiet_env(NODE_MAX_CONNECTIONS);
                env.push(("FLEETGATE_REDIS_URLS", redis.url()));
                env.push(("FLEETGATE_NODE_ID", format!("bench-{i}")));
                // A drained node hands its devices over quickly: the storm measures the others.
                env.push(("FLEETGATE_DRAIN_PERIOD_MS", "2000".into()));
                nodes.push(Node::start(&env).await?);
            }
            let gateways: Vec<String> = nodes.iter().map(|n| n.gateway.clone()).collect();
            let (ws_urls, nginx) = if let Some(only) = &entry.device_nodes {
                let urls = only
                    .iter()
                    .map(|i| gateways.get(*i).map(|g| format!("ws://{g}/v1/device")))
                    .collect::<Option<Vec<_>>>()
                    .context("device_nodes names a node the entry does not start")?;
                (urls, None)
            } else if entry.direct {
                (
                    gateways
                        .iter()
                        .map(|g| format!("ws://{g}/v1/device"))
                        .collect(),
                    None,
                )
            } else {
                // Two descriptors per proxied socket, at most 9,000 per worker, and accepts
                // spread unevenly over the workers: room for twice the devices.
                let opts = NginxOptions {
                    workers: entry.nginx_workers,
                    source_addrs: (1..=entry.nginx_sources)
                        .map(|i| format!("127.0.1.{i}"))
                        .collect(),
                };
                let n =
                    tokio::task::spawn_blocking(move || NginxServer::start_with(&gateways, &opts))
                        .await?;
                (vec![format!("ws://{}/v1/device", n.addr())], Some(n))
            };
            let app_urls = match &entry.app_nodes {
                Some(only) => only
                    .iter()
                    .map(|i| nodes.get(*i).map(|n| format!("ws://{}/v1/app", n.gateway)))
                    .collect::<Option<Vec<_>>>()
                    .context("app_nodes names a node the entry does not start")?,
                None => Vec::new(),
            };
            Ok(Target {
                ws_urls,
                app_urls,
                // The last node's admin API: storms drain node 0.
                admin: nodes.last().map(|n| format!("http://{}", n.admin)),
                metrics: nodes
                    .iter()
                    .map(|n| format!("http://{}/metrics", n.internal))
                    .collect(),
                pids: nodes.iter().map(Node::pid).collect(),
                _nodes: nodes,
                _sink: None,
                nginx,
                redis_url: Some(redis.url()),
                redis: Some(redis),
                tls_ca: None,
            })
        }
    }
}

/// A throwaway CA and server certificate for `tls` entries, made once per suite run by
/// scripts/dev-certs under target/.
fn bench_certs() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("target").join("bench-certs");
    if !dir.join("server.pem").exists() {
        let status = std::process::Command::new(root.join("scripts").join("dev-certs"))
            .arg("-o")
            .arg(&dir)
            .status()
            .context("running scripts/dev-certs")?;
        if !status.success() {
            bail!("scripts/dev-certs failed: {status}");
        }
    }
    Ok(dir)
}

fn flag_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn run_one(
    entry: &Entry,
    k: usize,
    root: &Path,
    results: &Path,
    loadtest: &Path,
) -> anyhow::Result<()> {
    let target = start(entry, loadtest).await?;
    let dir = results.join(&entry.name);
    let mut cmd = Command::new(loadtest);
    cmd.arg(&entry.scenario)
        .arg("--config")
        .arg(root.join("loadtest").join(&entry.config))
        .arg("--ws-url")
        .arg(target.ws_urls.join(","))
        .arg("--metrics-url")
        .arg(target.metrics.join(","))
        .arg("--results")
        .arg(dir.join(format!("run{k}.json")))
        // Relative to the repository (the current directory below), so the results name the
        // reports without a machine's path.
        .arg("--report-dir")
        .arg(Path::new("target/loadtest-reports").join(&entry.name))
        .current_dir(root)
        .arg("--label")
        .arg(format!("run{k}"))
        .env("FLEETGATE_API_KEY", API_KEY)
        .kill_on_drop(true);
    if let Some(admin) = &target.admin {
        cmd.arg("--admin-url").arg(admin);
    }
    if let Some(url) = &target.redis_url {
        cmd.arg("--redis-url").arg(url);
    }
    if let Some(ca) = &target.tls_ca {
        cmd.arg("--tls-ca").arg(ca);
    }
    if !target.app_urls.is_empty() {
        cmd.arg("--app-url").arg(target.app_urls.join(","));
    }
    for (key, v) in &entry.set {
        cmd.arg(format!("--{key}")).arg(flag_value(v));
    }
    if let Some(t) = &entry.trigger {
        let mut t = t.clone();
        for (i, pid) in target.pids.iter().enumerate() {
            t = t.replace(&format!("{{pid{i}}}"), &pid.to_string());
        }
        cmd.arg("--trigger").arg(t);
    }
    let status = tokio::time::timeout(RUN_DEADLINE, cmd.status())
        .await
        .with_context(|| format!("{} run {k} took longer than {RUN_DEADLINE:?}", entry.name))??;
    if !status.success() {
        bail!("{} run {k}: fleetgate-loadtest {status}", entry.name);
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("loadtest suite: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let only: Option<Vec<String>> =
        value("--only").map(|v| v.split(',').map(str::to_owned).collect());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("repository root")?
        .to_path_buf();
    let suite: Suite = toml::from_str(
        &std::fs::read_to_string(root.join("loadtest/suite.toml"))
            .context("loadtest/suite.toml")?,
    )?;
    let runs = match value("--runs") {
        Some(r) => r.parse().context("--runs")?,
        None => suite.runs,
    };
    let fleetgate = support::node::binary()?;
    let loadtest: PathBuf = fleetgate.with_file_name("fleetgate-loadtest");
    if !loadtest.exists() {
        bail!(
            "{} not found: `cargo build --release -p fleetgate-loadtest` (make bench does)",
            loadtest.display()
        );
    }
    let results = root.join("loadtest/results");
    let mut failed = Vec::new();
    for entry in &suite.entries {
        if only.as_ref().is_some_and(|o| !o.contains(&entry.name)) {
            continue;
        }
        // Medians are of this session's runs only.
        let _ = std::fs::remove_dir_all(results.join(&entry.name));
        for k in 1..=runs {
            println!("== {} run {k}/{runs}", entry.name);
            if let Err(e) = run_one(entry, k, &root, &results, &loadtest).await {
                eprintln!("{e:#}");
                failed.push(format!("{} run {k}", entry.name));
            }
        }
    }
    let status = Command::new(&loadtest)
        .arg("report")
        .arg("--results")
        .arg(&results)
        .arg("--benchmarks")
        .arg(root.join("BENCHMARKS.md"))
        .status()
        .await?;
    if !status.success() {
        bail!("fleetgate-loadtest report: {status}");
    }
    println!("BENCHMARKS.md regenerated from {}", results.display());
    if !failed.is_empty() {
        bail!("failed runs: {}", failed.join(", "));
    }
    Ok(())
}
