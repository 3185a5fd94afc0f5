//! Load benchmark of the release `fleetgate all` binary on loopback, single node, memory bus.
//!
//! 1. Memory per idle authenticated connection: provision N devices, hold N authenticated
//!    sockets that say nothing, and divide the server's RSS growth (`/proc/<pid>/status`) by N.
//!    Also the connect + auth rate, and (`breakdown`) the same growth for connections held
//!    before the upgrade (plain TCP) and before auth (upgraded, no auth frame yet).
//! 2. Status ingest throughput: M devices send status frames as fast as the socket takes them,
//!    QoS 0 (counted server-side from `/metrics`) and QoS 1 with a window of unacknowledged
//!    messages per device (counted from the acks).
//!
//! Every figure is measured `--runs` times on a fresh node; the median and all runs are printed
//! as Markdown and written to `<target>/bench-results.md` (or `--out`).
//!
//! ```text
//! cargo build --release -p fleetgate
//! cargo bench -p fleetgate-e2e --bench gateway -- [--connections 10000] [--runs 3]
//!     [--devices 50] [--messages 400000] [--qos1-messages 150000] [--window 32]
//!     [--concurrency 64] [--only memory,breakdown,qos0,qos1] [--out PATH]
//! ```
//! Each flag also reads `FLEETGATE_BENCH_<FLAG>` (e.g. `FLEETGATE_BENCH_CONNECTIONS`).
//! Nothing waits on a fixed sleep for a condition: counts are polled with deadlines.
#![allow(clippy::print_stdout)]

mod support;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{StreamExt, TryStreamExt};
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use support::device::{self, Unexpected};
use support::node::{Mem, Node};
use support::report::{Figure, machine, num, table};

const ACTIVE: &str = "fleetgate_connections_active";
const UPGRADES: &str = "fleetgate_connections_total";
const STATUS_RECEIVED: &str = "fleetgate_messages_received_total{kind=\"status\"}";
const KIB: f64 = 1024.0;
/// The whole benchmark stops after this, whatever happens.
const TOTAL_DEADLINE: Duration = Duration::from_secs(15 * 60);

/// Command-line / environment settings.
#[derive(Debug, Clone)]
struct Opts {
    connections: usize,
    runs: usize,
    devices: usize,
    messages: usize,
    qos1_messages: usize,
    window: usize,
    concurrency: usize,
    only: Vec<String>,
    out: Option<PathBuf>,
    /// The flags as given, for the report.
    given: Vec<String>,
}

impl Opts {
    fn parse() -> anyhow::Result<Opts> {
        let env = |k: &str| std::env::var(format!("FLEETGATE_BENCH_{k}")).ok();
        let mut o = Opts {
            connections: 10_000,
            runs: 3,
            devices: 50,
            messages: 400_000,
            qos1_messages: 150_000,
            window: 32,
            concurrency: 64,
            only: vec![
                "memory".into(),
                "breakdown".into(),
                "qos0".into(),
                "qos1".into(),
            ],
            out: None,
            given: Vec::new(),
        };
        let mut args: Vec<(String, String)> = Vec::new();
        for k in [
            "CONNECTIONS",
            "RUNS",
            "DEVICES",
            "MESSAGES",
            "QOS1_MESSAGES",
            "WINDOW",
            "CONCURRENCY",
            "ONLY",
            "OUT",
        ] {
            if let Some(v) = env(k) {
                args.push((k.to_lowercase().replace('_', "-"), v));
            }
        }
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            match a.as_str() {
                // `cargo bench` passes `--bench` to harness-less benchmarks.
                "--bench" => continue,
                "-h" | "--help" => {
                    println!("{}", HELP);
                    std::process::exit(0);
                }
                _ => {}
            }
            let Some(flag) = a.strip_prefix("--") else {
                bail!("unexpected argument {a:?}\n{HELP}")
            };
            let (k, v) = match flag.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (
                    flag.to_owned(),
                    it.next()
                        .with_context(|| format!("--{flag} needs a value"))?,
                ),
            };
            o.given.push(format!("--{k} {v}"));
            args.push((k, v));
        }
        for (k, v) in args {
            let n = || {
                v.replace('_', "")
                    .parse::<usize>()
                    .with_context(|| format!("--{k} {v}: not a number"))
            };
            match k.as_str() {
                "connections" => o.connections = n()?,
                "runs" => o.runs = n()?,
                "devices" => o.devices = n()?,
                "messages" => o.messages = n()?,
                "qos1-messages" => o.qos1_messages = n()?,
                "window" => o.window = n()?,
                "concurrency" => o.concurrency = n()?,
                "only" => o.only = v.split(',').map(|s| s.trim().to_owned()).collect(),
                "out" => o.out = Some(v.into()),
                _ => bail!("unknown flag --{k}\n{HELP}"),
            }
        }
        if o.runs == 0 || o.devices == 0 || o.concurrency == 0 || o.window == 0 {
            bail!("--runs, --devices, --concurrency and --window must be positive");
        }
        if o.connections > 18_000 {
            bail!(
                "--connections {}: one client process holds at most ~18k sockets under a 20k open-file limit",
                o.connections
            );
        }
        for s in &o.only {
            if !["memory", "breakdown", "qos0", "qos1"].contains(&s.as_str()) {
                bail!("--only: unknown part {s:?} (memory, breakdown, qos0, qos1)");
            }
        }
        Ok(o)
    }

    fn wants(&self, part: &str) -> bool {
        self.only.iter().any(|p| p == part)
    }
}

const HELP: &str = "cargo bench -p fleetgate-e2e --bench gateway -- [--connections N] [--runs R] [--devices M] \
[--messages K] [--qos1-messages K1] [--window W] [--concurrency C] [--only memory,breakdown,qos0,qos1] [--out PATH]";

/// Env of a node under test: room for the connections and quiet, long timers so idle sockets
/// stay open and nothing but the measured traffic runs.
fn node_env(max_connections: usize) -> Vec<(&'static str, String)> {
    vec![
        ("FLEETGATE_MAX_CONNECTIONS", max_connections.to_string()),
        ("FLEETGATE_HEARTBEAT_MS", "600000".into()),
        ("FLEETGATE_IDLE_TIMEOUT_MS", "1800000".into()),
        ("FLEETGATE_AUTH_TIMEOUT_MS", "60000".into()),
        ("FLEETGATE_RATE_LIMIT_PER_SECOND", "1000000".into()),
        ("FLEETGATE_RATE_LIMIT_BURST", "1000000".into()),
    ]
}

/// Provisions and connects `n` devices named `{prefix}-{i}`; returns IDs and sockets in order.
async fn fleet(
    node: &Node,
    prefix: &str,
    n: usize,
    concurrency: usize,
    cfg: WebSocketConfig,
) -> anyhow::Result<(Vec<String>, Vec<device::Ws>)> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:06}")).collect();
    let secrets = node.provision_all(&ids, concurrency).await?;
    let gateway = node.gateway.clone();
    let sockets: Vec<device::Ws> =
        futures_util::stream::iter(ids.iter().zip(&secrets).map(|(id, secret)| {
            let gateway = gateway.clone();
            async move { device::connect_authed(&gateway, id, secret, cfg).await }
        }))
        .buffered(concurrency)
        .try_collect()
        .await?;
    Ok((ids, sockets))
}

/// Results of one memory run.
struct MemRun {
    start: Mem,
    provisioned: Mem,
    connected: Mem,
    provision: Duration,
    connect: Duration,
    client_delta: u64,
}

async fn memory_run(o: &Opts, run: usize) -> anyhow::Result<MemRun> {
    let n = o.connections;
    let node = Node::start(&node_env(n + 1000)).await?;
    let start = node.settled_mem(Duration::from_secs(3)).await?;
    // Provision first and measure again: the registry and audit log grow with N too, but that
    // is not what a connection costs.
    let ids: Vec<String> = (0..n).map(|i| format!("mem-{run}-{i:06}")).collect();
    let t = Instant::now();
    let secrets = node.provision_all(&ids, o.concurrency).await?;
    let provision = t.elapsed();
    let provisioned = node.settled_mem(Duration::from_secs(3)).await?;
    let client_before = Mem::own()?;
    let cfg = device::config(4096, 0);
    let gateway = node.gateway.clone();
    let t = Instant::now();
    let sockets: Vec<device::Ws> =
        futures_util::stream::iter(ids.iter().zip(&secrets).map(|(id, secret)| {
            let gateway = gateway.clone();
            async move { device::connect_authed(&gateway, id, secret, cfg).await }
        }))
        .buffer_unordered(o.concurrency)
        .try_collect()
        .await?;
    let connect = t.elapsed();
    node.wait_metric(ACTIVE, n as f64, Duration::from_secs(60))
        .await?;
    let connected = node.settled_mem(Duration::from_secs(5)).await?;
    let client_delta = Mem::own()?.rss.saturating_sub(client_before.rss);
    // Still all there? (Nothing closed them while we measured.)
    let active = node.metrics().await?.count(ACTIVE);
    if active != n as u64 {
        bail!("{active} of {n} sessions still active after the measurement");
    }
    drop(node);
    drop(sockets);
    Ok(MemRun {
        start,
        provisioned,
        connected,
        provision,
        connect,
        client_delta,
    })
}

/// Server VmRSS growth per connection for connections held at an earlier stage than auth:
/// `tcp` (accepted, HTTP/1 waiting for a request) or `upgraded` (WebSocket open, the session
/// task waiting for the auth frame). Returns bytes per connection.
async fn stage_run(o: &Opts, stage: &str) -> anyhow::Result<f64> {
    let n = o.connections;
    let node = Node::start(&node_env(n + 1000)).await?;
    let before = node.settled_mem(Duration::from_secs(3)).await?;
    let fds = node.fds()?;
    let gateway = node.gateway.clone();
    let after = if stage == "tcp" {
        let held: Vec<tokio::net::TcpStream> = futures_util::stream::iter(0..n)
            .map(|_| device::connect_tcp(&gateway))
            .buffer_unordered(o.concurrency)
            .try_collect()
            .await?;
        node.wait_fds(fds + n, Duration::from_secs(60)).await?;
        let after = node.settled_mem(Duration::from_secs(5)).await?;
        node.wait_fds(fds + n, Duration::ZERO)
            .await
            .context("connections closed during the measurement")?;
        drop(node);
        drop(held);
        after
    } else {
        let cfg = device::config(4096, 0);
        let held: Vec<device::Ws> = futures_util::stream::iter(0..n)
            .map(|_| device::connect_unauthed(&gateway, cfg))
            .buffer_unordered(o.concurrency)
            .try_collect()
            .await?;
        node.wait_metric(UPGRADES, n as f64, Duration::from_secs(60))
            .await?;
        node.wait_fds(fds + n, Duration::from_secs(60)).await?;
        let after = node.settled_mem(Duration::from_secs(5)).await?;
        node.wait_fds(fds + n, Duration::ZERO)
            .await
            .context("connections closed during the measurement (auth timeout?)")?;
        drop(node);
        drop(held);
        after
    };
    Ok(after.rss.saturating_sub(before.rss) as f64 / n as f64)
}

/// Results of one throughput run.
struct IngestRun {
    rate: f64,
    cpu_per_msg: Duration,
    client_send: Duration,
    note: Option<String>,
}

async fn ingest_run(o: &Opts, run: usize, qos: u8) -> anyhow::Result<IngestRun> {
    let m = o.devices;
    let total = if qos == 0 {
        o.messages
    } else {
        o.qos1_messages
    };
    let per = total.div_ceil(m);
    let total = per * m;
    let node = Node::start(&node_env(m + 100)).await?;
    // Small read buffer as for idle devices, a 64 KiB write buffer so frames go out in batches.
    let (ids, sockets) = fleet(
        &node,
        &format!("q{qos}-{run}"),
        m,
        o.concurrency,
        device::config(4096, 64 * 1024),
    )
    .await?;
    node.wait_metric(ACTIVE, m as f64, Duration::from_secs(30))
        .await?;
    // Frames are encoded before the clock starts so the client spends its CPU on sending.
    let frames: Vec<Vec<String>> = ids
        .iter()
        .map(|id| {
            (0..per)
                .map(|s| device::status_frame(id, &format!("r{run}-{s}"), qos, s as u64))
                .collect()
        })
        .collect();
    let base = node.metrics().await?.count(STATUS_RECEIVED);
    let unexpected = Arc::new(Unexpected::default());
    let acked = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(m + 1));
    let mut tasks = Vec::new();
    for (ws, frames) in sockets.into_iter().zip(frames) {
        let (barrier, unexpected, acked, window) =
            (barrier.clone(), unexpected.clone(), acked.clone(), o.window);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            if qos == 0 {
                let held = device::send_qos0(ws, frames, 64, unexpected).await?;
                Ok::<_, anyhow::Error>((Instant::now(), Instant::now(), Some(held)))
            } else {
                let (ws, last) = device::send_qos1(ws, frames, window, unexpected, acked).await?;
                drop(ws);
                Ok((Instant::now(), last, None))
            }
        }));
    }
    let cpu0 = node.cpu()?;
    barrier.wait().await;
    let t0 = Instant::now();
    let deadline = Duration::from_secs(120);
    let counted = node
        .wait_metric(STATUS_RECEIVED, (base + total as u64) as f64, deadline)
        .await;
    let cpu = node.cpu()?.saturating_sub(cpu0);
    let mut sent_at = t0;
    let mut last_ack = t0;
    let mut held = Vec::new();
    for t in tasks {
        let (sent, last, h) = tokio::time::timeout(deadline, t)
            .await
            .context("device task did not finish")???;
        sent_at = sent_at.max(sent);
        last_ack = last_ack.max(last);
        held.extend(h);
    }
    let counted =
        counted.with_context(|| format!("server counted less than the {total} messages sent"))?;
    let errors = unexpected.errors.load(Ordering::Relaxed);
    let closed = unexpected.closed.load(Ordering::Relaxed);
    let note = (errors + closed > 0).then(|| {
        format!(
            "{errors} error frames, {closed} sockets closed; e.g. {}",
            unexpected
                .example
                .lock()
                .map(|e| e.clone().unwrap_or_default())
                .unwrap_or_default()
        )
    });
    let rate = if qos == 0 {
        total as f64 / counted.duration_since(t0).as_secs_f64()
    } else {
        acked.load(Ordering::Relaxed) as f64 / last_ack.duration_since(t0).as_secs_f64()
    };
    drop(node);
    drop(held);
    Ok(IngestRun {
        rate,
        cpu_per_msg: cpu / total as u32,
        client_send: sent_at.duration_since(t0),
        note,
    })
}

#[tokio::main]
async fn main() {
    match tokio::time::timeout(TOTAL_DEADLINE, run()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("gateway bench failed: {e:#}");
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("gateway bench: gave up after {TOTAL_DEADLINE:?}");
            std::process::exit(1);
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let o = Opts::parse()?;
    let bin = support::node::binary()?;
    let started = Instant::now();
    let mut figures: Vec<Figure> = Vec::new();
    let mut details = String::new();
    let mut notes: Vec<String> = Vec::new();

    if o.wants("memory") {
        let n = o.connections;
        let mut per_conn = Figure::new(
            format!(
                "Server memory per idle authenticated connection, VmRSS delta / N (N = {})",
                num(n as f64, 0)
            ),
            "B",
            0,
        );
        let mut per_conn_kib = Figure::new("  same, in KiB", "KiB", 2);
        let mut per_conn_anon = Figure::new("  RssAnon delta / N", "B", 0);
        let mut with_prov = Figure::new(
            "  incl. provisioning (registry, audit): (VmRSS with N connected − at start) / N",
            "B",
            0,
        );
        let mut connect = Figure::new(
            format!("Connect + auth rate ({} in flight)", o.concurrency),
            "conn/s",
            0,
        );
        let mut provision = Figure::new(
            format!(
                "Provisioning rate, POST /v1/devices ({} in flight)",
                o.concurrency
            ),
            "dev/s",
            0,
        );
        let mut client = Figure::new(
            "Client (bench process) VmRSS delta / N, tokio-tungstenite, 4 KiB read buffer (first run only: later runs reuse the heap)",
            "B",
            0,
        );
        let _ = writeln!(
            details,
            "| run | VmRSS at start | after provisioning N | with N idle sessions | delta / N |\n|---|---:|---:|---:|---:|"
        );
        for run in 1..=o.runs {
            eprintln!("memory run {run}/{}: {n} connections", o.runs);
            let r = memory_run(&o, run)
                .await
                .with_context(|| format!("memory run {run}"))?;
            let d = r.connected.rss.saturating_sub(r.provisioned.rss) as f64 / n as f64;
            per_conn.runs.push(d);
            per_conn_kib.runs.push(d / KIB);
            per_conn_anon
                .runs
                .push(r.connected.anon.saturating_sub(r.provisioned.anon) as f64 / n as f64);
            with_prov
                .runs
                .push(r.connected.rss.saturating_sub(r.start.rss) as f64 / n as f64);
            connect.runs.push(n as f64 / r.connect.as_secs_f64());
            provision.runs.push(n as f64 / r.provision.as_secs_f64());
            if run == 1 {
                client.runs.push(r.client_delta as f64 / n as f64);
            }
            let mib = |b: u64| format!("{:.1} MiB", b as f64 / KIB / KIB);
            let _ = writeln!(
                details,
                "| {run} | {} | {} | {} | {} B |",
                mib(r.start.rss),
                mib(r.provisioned.rss),
                mib(r.connected.rss),
                num(d, 0)
            );
            eprintln!(
                "  {} B/conn, connect {:.0}/s",
                num(d, 0),
                n as f64 / r.connect.as_secs_f64()
            );
        }
        figures.extend([
            per_conn,
            per_conn_kib,
            per_conn_anon,
            with_prov,
            connect,
            provision,
            client,
        ]);
    }
    if o.wants("breakdown") {
        let n = o.connections;
        let mut tcp = Figure::new(
            format!(
                "Breakdown: server VmRSS / connection, TCP accepted, no request yet (N = {})",
                num(n as f64, 0)
            ),
            "B",
            0,
        );
        let mut upgraded = Figure::new(
            "Breakdown: server VmRSS / connection, WebSocket upgraded, waiting for the auth frame",
            "B",
            0,
        );
        for run in 1..=o.runs {
            eprintln!("breakdown run {run}/{}", o.runs);
            tcp.runs.push(
                stage_run(&o, "tcp")
                    .await
                    .with_context(|| format!("breakdown tcp run {run}"))?,
            );
            upgraded.runs.push(
                stage_run(&o, "upgraded")
                    .await
                    .with_context(|| format!("breakdown upgraded run {run}"))?,
            );
            eprintln!(
                "  tcp {} B, upgraded {} B",
                num(*tcp.runs.last().unwrap_or(&0.0), 0),
                num(*upgraded.runs.last().unwrap_or(&0.0), 0)
            );
        }
        figures.extend([tcp, upgraded]);
    }
    for (part, qos) in [("qos0", 0u8), ("qos1", 1u8)] {
        if !o.wants(part) {
            continue;
        }
        let total = if qos == 0 {
            o.messages
        } else {
            o.qos1_messages
        };
        let (mut rate, mut cpu, mut send) = if qos == 0 {
            (
                Figure::new(
                    format!(
                        "QoS 0 status ingest, server-counted ({} devices, {} msgs/run)",
                        o.devices,
                        num(total as f64, 0)
                    ),
                    "msg/s",
                    0,
                ),
                Figure::new("  server CPU per message (user+sys)", "µs", 1),
                Figure::new("  client send time (all frames written)", "ms", 0),
            )
        } else {
            (
                Figure::new(
                    format!(
                        "QoS 1 status ingest, acked ({} devices, window {}, {} msgs/run)",
                        o.devices,
                        o.window,
                        num(total as f64, 0)
                    ),
                    "msg/s",
                    0,
                ),
                Figure::new("  server CPU per message (user+sys)", "µs", 1),
                Figure::new("  client send time (all frames written)", "ms", 0),
            )
        };
        for run in 1..=o.runs {
            eprintln!("{part} run {run}/{}", o.runs);
            let r = ingest_run(&o, run, qos)
                .await
                .with_context(|| format!("{part} run {run}"))?;
            rate.runs.push(r.rate);
            cpu.runs.push(r.cpu_per_msg.as_secs_f64() * 1e6);
            send.runs.push(r.client_send.as_secs_f64() * 1e3);
            if let Some(n) = r.note {
                notes.push(format!("{part} run {run}: {n}"));
            }
            eprintln!("  {} msg/s", num(r.rate, 0));
        }
        figures.extend([rate, cpu, send]);
    }

    let mut md = String::from("# fleetgate gateway benchmark\n\n");
    let mut args = o.given.join(" ");
    if !args.is_empty() {
        args.insert_str(0, " -- ");
    }
    let env: Vec<String> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("FLEETGATE_BENCH_") || k == "FLEETGATE_BIN" || k == "CARGO_TARGET_DIR"
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let env = if env.is_empty() {
        String::new()
    } else {
        format!("{} ", env.join(" "))
    };
    let _ = writeln!(
        md,
        "- command: `{env}cargo bench -p fleetgate-e2e --bench gateway{args}`"
    );
    let _ = writeln!(
        md,
        "- server: `{} all` (built {}; memory bus, one node, loopback), fresh process per run; {} runs per figure",
        // Relative to the workspace, so reports name no machine's paths.
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .and_then(|root| bin.strip_prefix(root).ok())
            .unwrap_or(&bin)
            .display(),
        std::process::Command::new("date")
            .args(["-u", "-r"])
            .arg(&bin)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default(),
        o.runs
    );
    let _ = writeln!(md, "- machine: {}", machine());
    let _ = writeln!(
        md,
        "- server env: heartbeat 600 s, idle timeout 1800 s, rate limit 1,000,000/s burst 1,000,000; client and server share the machine"
    );
    let _ = writeln!(
        md,
        "- wall time: {:.0} s\n",
        started.elapsed().as_secs_f64()
    );
    md.push_str(&table(&figures));
    if !details.is_empty() {
        md.push_str("\nMemory runs (VmRSS of the server; the per-connection delta is taken after provisioning):\n\n");
        md.push_str(&details);
    }
    if !notes.is_empty() {
        md.push_str("\nNotes:\n\n");
        for n in &notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    println!("{md}");
    let out = match &o.out {
        Some(p) => p.clone(),
        None => support::node::target_dir()
            .unwrap_or_else(|| PathBuf::from("target"))
            .join("bench-results.md"),
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("written to {}", out.display());
    Ok(())
}
