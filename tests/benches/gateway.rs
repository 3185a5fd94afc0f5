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
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{StreamExt, TryStreamExt};

use support::device;
use support::ingest::{ACTIVE, IngestRun, Load};
use support::node::{Mem, Node, quiet_env};
use support::opts;
use support::report::{Figure, machine, num, table};

const UPGRADES: &str = "fleetgate_connections_total";
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
        let flags = opts::collect(
            &[
                "connections",
                "runs",
                "devices",
                "messages",
                "qos1-messages",
                "window",
                "concurrency",
                "only",
                "out",
            ],
            HELP,
        )?;
        o.given = flags.given;
        for (k, v) in flags.pairs {
            let n = || opts::count(&k, &v);
            match k.as_str() {
                "connections" => o.connections = n()?,
                "runs" => o.runs = n()?,
                "devices" => o.devices = n()?,
                "messages" => o.messages = n()?,
                "qos1-messages" => o.qos1_messages = n()?,
                "window" => o.window = n()?,
                "concurrency" => o.concurrency = n()?,
                "only" => o.only = opts::list(&v),
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
    let node = Node::start(&quiet_env(n + 1000)).await?;
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
    let node = Node::start(&quiet_env(n + 1000)).await?;
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

async fn ingest_run(o: &Opts, run: usize, qos: u8) -> anyhow::Result<IngestRun> {
    let load = Load {
        qos,
        devices: o.devices,
        messages: if qos == 0 {
            o.messages
        } else {
            o.qos1_messages
        },
        window: o.window,
        concurrency: o.concurrency,
    };
    let node = Node::start(&quiet_env(o.devices + 100)).await?;
    let prepared = support::ingest::prepare(&node, load, &run.to_string()).await?;
    prepared.run(&node).await
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
    let _ = writeln!(
        md,
        "- command: `{}`",
        support::report::command_line("gateway", &o.given)
    );
    let _ = writeln!(
        md,
        "- server: {}; memory bus, one node, loopback; fresh process per run; {} runs per figure",
        support::report::binary(&bin),
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
    let out = support::report::write(&md, o.out.as_deref(), "bench-results.md")?;
    eprintln!("written to {}", out.display());
    Ok(())
}
