//! Cluster benchmark of the release `fleetgate all` binary on the Redis bus, on loopback, with
//! real processes: one `redis-server` (no persistence) and one or two nodes.
//!
//! 1. Command round trip across two nodes: D devices authenticate on node B; a driver sends
//!    QoS 1 commands with `waitMs` through node A's REST API at a fixed open-loop rate (each
//!    request starts at its scheduled instant, whatever the earlier ones are doing) and times
//!    every 200 answer. The devices ack each command with a result, which travels back through
//!    Redis to the waiting REST call on A. Also: how far the driver fell behind its schedule,
//!    the split of the round trip at the device, CPU per command of each process, and Redis
//!    commands per command (`INFO stats` / `INFO commandstats` before and after).
//! 2. Status ingest throughput, memory bus vs Redis bus: the `gateway` benchmark's QoS 0 and
//!    QoS 1 ingest against one node, once without and once with `FLEETGATE_REDIS_URLS`.
//! 3. Redis commands (and Redis CPU) per ingested message on the Redis runs.
//!
//! The machine is often shared: every run also reports the CPU that processes other than the
//! measured ones used meanwhile (`/proc/stat`), and the notes name the runs where it mattered.
//!
//! Every figure is measured `--runs` times on fresh processes; the median and all runs are
//! printed as Markdown and written to `<target>/bench-results-cluster.md` (or `--out`).
//!
//! ```text
//! cargo build --release -p fleetgate
//! cargo bench -p fleetgate-e2e --bench cluster -- [--runs 3] [--cmd-devices 200]
//!     [--rates 1000,10000] [--duration 5] [--warmup 1] [--max-in-flight 4096] [--wait-ms 5000]
//!     [--devices 50] [--messages 400000] [--qos1-messages 150000] [--window 32]
//!     [--concurrency 64] [--only rtt,qos0,qos1] [--out PATH]
//! ```
//! Each flag also reads `FLEETGATE_BENCH_<FLAG>` (e.g. `FLEETGATE_BENCH_RATES`).
//! Nothing waits on a fixed sleep for a condition: counts are polled with deadlines.
#![allow(clippy::print_stdout)]

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::Semaphore;

use support::device::{self, Answered, Receipts};
use support::ingest::{ACTIVE, IngestRun, Load};
use support::node::{API_KEY, Node, cpu_of, machine_busy, quiet_env};
use support::opts;
use support::redis::{Delta, Info};
use support::report::{Figure, machine, num, quantile, table};

/// The whole benchmark stops after this, whatever happens.
const TOTAL_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// How long the idle cluster's background Redis traffic is measured (a measurement window,
/// not a wait for a condition).
const BACKGROUND_WINDOW: Duration = Duration::from_secs(2);
/// A request is counted as started late when it began this long after its scheduled instant
/// (tokio's timer wheel ticks every millisecond, so up to ~1 ms is the timer, not the driver).
const LATE: Duration = Duration::from_millis(5);
/// Beyond `waitMs`, how long the driver waits for an answer before counting a client timeout.
const CLIENT_GRACE: Duration = Duration::from_secs(5);

/// Command-line / environment settings.
#[derive(Debug, Clone)]
struct Opts {
    runs: usize,
    cmd_devices: usize,
    rates: Vec<f64>,
    duration: f64,
    warmup: f64,
    max_in_flight: usize,
    wait_ms: u64,
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

const HELP: &str = "cargo bench -p fleetgate-e2e --bench cluster -- [--runs R] [--cmd-devices D] \
[--rates 1000,10000] [--duration SECS] [--warmup SECS] [--max-in-flight N] [--wait-ms MS] \
[--devices M] [--messages K] [--qos1-messages K1] [--window W] [--concurrency C] \
[--only rtt,qos0,qos1] [--out PATH]";

impl Opts {
    fn parse() -> anyhow::Result<Opts> {
        let mut o = Opts {
            runs: 3,
            cmd_devices: 200,
            rates: vec![1_000.0, 10_000.0],
            duration: 5.0,
            warmup: 1.0,
            max_in_flight: 4096,
            wait_ms: 5000,
            devices: 50,
            messages: 400_000,
            qos1_messages: 150_000,
            window: 32,
            concurrency: 64,
            only: vec!["rtt".into(), "qos0".into(), "qos1".into()],
            out: None,
            given: Vec::new(),
        };
        let flags = opts::collect(
            &[
                "runs",
                "cmd-devices",
                "rates",
                "duration",
                "warmup",
                "max-in-flight",
                "wait-ms",
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
            let secs = || {
                v.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .with_context(|| format!("--{k} {v}: not a number of seconds"))
            };
            match k.as_str() {
                "runs" => o.runs = n()?,
                "cmd-devices" => o.cmd_devices = n()?,
                "rates" => {
                    o.rates = opts::list(&v)
                        .iter()
                        .map(|r| opts::count(&k, r).map(|r| r as f64))
                        .collect::<anyhow::Result<_>>()?;
                }
                "duration" => o.duration = secs()?,
                "warmup" => o.warmup = secs()?,
                "max-in-flight" => o.max_in_flight = n()?,
                "wait-ms" => o.wait_ms = n()? as u64,
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
        if [
            o.runs,
            o.cmd_devices,
            o.max_in_flight,
            o.devices,
            o.window,
            o.concurrency,
        ]
        .contains(&0)
            || o.rates.iter().any(|r| *r <= 0.0)
            || o.duration <= 0.0
            || o.wait_ms == 0
        {
            bail!(
                "--runs, --cmd-devices, --rates, --duration, --max-in-flight, --wait-ms, \
                 --devices, --window and --concurrency must be positive"
            );
        }
        if o.max_in_flight + o.cmd_devices > 16_000 {
            bail!("--max-in-flight + --cmd-devices: one client process holds at most ~18k sockets");
        }
        for s in &o.only {
            if !["rtt", "qos0", "qos1"].contains(&s.as_str()) {
                bail!("--only: unknown part {s:?} (rtt, qos0, qos1)");
            }
        }
        Ok(o)
    }

    fn wants(&self, part: &str) -> bool {
        self.only.iter().any(|p| p == part)
    }
}

/// Env of a node on the Redis bus at `url`, named `id`.
fn redis_env(url: &str, id: &str, max_connections: usize) -> Vec<(&'static str, String)> {
    let mut env = quiet_env(max_connections);
    env.push(("FLEETGATE_REDIS_URLS", url.to_owned()));
    env.push(("FLEETGATE_NODE_ID", id.to_owned()));
    env
}

/// How one REST command call ended.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// An HTTP answer; for 200, whether the body carried the device's result.
    Status(u16, bool),
    /// No HTTP answer.
    Failed(&'static str),
}

/// One REST command call.
#[derive(Debug, Clone, Copy)]
struct Sample {
    seq: usize,
    scheduled: Instant,
    start: Instant,
    end: Instant,
    outcome: Outcome,
}

impl Sample {
    fn ok(&self) -> bool {
        matches!(self.outcome, Outcome::Status(200, true))
    }

    fn label(&self) -> String {
        match self.outcome {
            Outcome::Status(200, true) => "200".into(),
            Outcome::Status(200, false) => "200 without result".into(),
            Outcome::Status(s, _) => s.to_string(),
            Outcome::Failed(why) => format!("no answer ({why})"),
        }
    }
}

/// Sends commands through one node's admin API on an open-loop schedule.
struct Driver {
    client: reqwest::Client,
    /// `POST` URL per device; command `seq` goes to device `seq % len`.
    urls: Vec<Arc<str>>,
    wait_ms: u64,
    in_flight: Arc<Semaphore>,
}

impl Driver {
    fn new(
        admin: &str,
        ids: &[String],
        wait_ms: u64,
        max_in_flight: usize,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(max_in_flight)
                .tcp_nodelay(true)
                .build()?,
            urls: ids
                .iter()
                .map(|id| Arc::from(format!("http://{admin}/v1/devices/{id}/commands")))
                .collect(),
            wait_ms,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
        })
    }

    /// Sends `rate * secs` commands numbered from `first_seq`, command i scheduled at
    /// `t0 + i / rate`, and returns every call once all have ended. A call that finds
    /// `max_in_flight` calls open waits for one to end: that shows as lag.
    async fn drive(&self, rate: f64, secs: f64, first_seq: usize) -> anyhow::Result<Vec<Sample>> {
        let n = (rate * secs).round() as usize;
        let mut calls = Vec::with_capacity(n);
        let client_deadline = Duration::from_millis(self.wait_ms) + CLIENT_GRACE;
        // A little ahead so the first requests are not late by the setup of the loop.
        let t0 = Instant::now() + Duration::from_millis(5);
        for i in 0..n {
            let scheduled = t0 + Duration::from_secs_f64(i as f64 / rate);
            if scheduled > Instant::now() {
                tokio::time::sleep_until(scheduled.into()).await;
            }
            let permit = self.in_flight.clone().acquire_owned().await?;
            let seq = first_seq + i;
            let request = self
                .client
                .post(&*self.urls[seq % self.urls.len()])
                .bearer_auth(API_KEY)
                .header("content-type", "application/json")
                .body(format!(
                    r#"{{"payload":{{"seq":{seq}}},"qos":1,"waitMs":{}}}"#,
                    self.wait_ms
                ));
            calls.push(tokio::spawn(async move {
                let start = Instant::now();
                let answer = tokio::time::timeout(client_deadline, async {
                    let resp = request.send().await?;
                    let status = resp.status().as_u16();
                    let body = resp.bytes().await?;
                    let has_result = body.windows(9).any(|w| w == b"\"result\":");
                    Ok::<_, reqwest::Error>((status, has_result))
                })
                .await;
                let end = Instant::now();
                drop(permit);
                let outcome = match answer {
                    Ok(Ok((status, has_result))) => Outcome::Status(status, has_result),
                    Ok(Err(e)) if e.is_connect() => Outcome::Failed("connect"),
                    Ok(Err(_)) => Outcome::Failed("transport"),
                    Err(_) => Outcome::Failed("client timeout"),
                };
                Sample {
                    seq,
                    scheduled,
                    start,
                    end,
                    outcome,
                }
            }));
        }
        let all = async {
            let mut samples = Vec::with_capacity(calls.len());
            for c in calls {
                samples.push(c.await?);
            }
            Ok::<_, anyhow::Error>(samples)
        };
        tokio::time::timeout(client_deadline + Duration::from_secs(10), all)
            .await
            .context("command calls did not end after their own deadline")?
    }
}

/// CPU (user + sys) of node A, node B, this process, and the whole machine (busy).
fn cpus(a: &Node, b: &Node) -> anyhow::Result<[Duration; 4]> {
    Ok([a.cpu()?, b.cpu()?, cpu_of("self")?, machine_busy()?])
}

/// Cores' worth of CPU that processes other than those measured used over `wall`: another
/// load on the machine, which the figures of that run then share it with.
fn other_cores(machine: Duration, measured: &[Duration], redis_cpu: f64, wall: Duration) -> f64 {
    let ours = measured.iter().map(Duration::as_secs_f64).sum::<f64>() + redis_cpu;
    ((machine.as_secs_f64() - ours) / wall.as_secs_f64()).max(0.0)
}

/// Results of one command round-trip run at one rate.
struct RttRun {
    sent: usize,
    ok: usize,
    /// Answers by label (`200`, `504`, `no answer (client timeout)`, ...).
    outcomes: BTreeMap<String, usize>,
    /// Sent / time between the first and the last request start.
    achieved: f64,
    /// 200 answers / time from the first scheduled instant to the last answer.
    answered: f64,
    /// 200s: send to answer, ms, ascending.
    latency: Vec<f64>,
    /// 200s: scheduled instant to answer, ms, ascending.
    from_schedule: Vec<f64>,
    /// 200s: send to the command reaching the device, ms, ascending.
    outbound: Vec<f64>,
    /// 200s: the command reaching the device to the answer, ms, ascending.
    inbound: Vec<f64>,
    /// Start minus scheduled instant, ms, ascending.
    lag: Vec<f64>,
    late: usize,
    /// CPU per command of node A, node B, the client.
    cpu: [Duration; 3],
    redis: Delta,
    /// Redis commands/s of the idle cluster before the run.
    background: f64,
    /// Cores used by other processes on the machine during the run.
    other: f64,
    commands_seen: u64,
    dups: u64,
    device_note: Option<String>,
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn rtt_run(o: &Opts, rate: f64, run: usize) -> anyhow::Result<RttRun> {
    let d = o.cmd_devices;
    let redis = support::redis::start().await?;
    let url = redis.url();
    let a = Node::start(&redis_env(&url, "bench-a", 1000)).await?;
    let b = Node::start(&redis_env(&url, "bench-b", d + 100)).await?;
    let (ids, sockets) = device::fleet(
        &b,
        &format!("cmd-{}-{run}", rate as u64),
        d,
        o.concurrency,
        device::config(4096, 0),
    )
    .await?;
    b.wait_metric(ACTIVE, d as f64, Duration::from_secs(30))
        .await?;
    let warm_n = (rate * o.warmup).round() as usize;
    let n = (rate * o.duration).round() as usize;
    let receipts = Arc::new(Receipts::new(warm_n + n));
    let answered = Arc::new(Answered::default());
    let devices: Vec<_> = sockets
        .into_iter()
        .map(|ws| {
            tokio::spawn(device::answer_commands(
                ws,
                receipts.clone(),
                answered.clone(),
            ))
        })
        .collect();
    let driver = Driver::new(&a.admin, &ids, o.wait_ms, o.max_in_flight)?;

    let idle0 = Info::read(redis.port()).await?;
    let t = Instant::now();
    tokio::time::sleep(BACKGROUND_WINDOW).await;
    let background =
        Info::read(redis.port()).await?.since(&idle0).commands as f64 / t.elapsed().as_secs_f64();

    // Warm-up at the same rate: opens the driver's connections to A and warms both nodes; its
    // answers are not counted, but if none succeeded the cluster is broken and the run stops.
    if warm_n > 0 {
        let warm = driver.drive(rate, o.warmup, 0).await?;
        if !warm.iter().any(Sample::ok) {
            bail!(
                "no warm-up command answered 200 (e.g. {})",
                warm.first().map(Sample::label).unwrap_or_default()
            );
        }
    }

    let commands0 = answered.commands.load(Ordering::Relaxed);
    let dups0 = answered.dups.load(Ordering::Relaxed);
    let cpu0 = cpus(&a, &b)?;
    let info0 = Info::read(redis.port()).await?;
    let measured = Instant::now();
    let samples = driver.drive(rate, o.duration, warm_n).await?;
    let info1 = Info::read(redis.port()).await?;
    let cpu1 = cpus(&a, &b)?;
    let wall = measured.elapsed();
    let used: [Duration; 4] = std::array::from_fn(|i| cpu1[i].saturating_sub(cpu0[i]));
    let commands_seen = answered.commands.load(Ordering::Relaxed) - commands0;
    let dups = answered.dups.load(Ordering::Relaxed) - dups0;
    for t in &devices {
        t.abort();
    }

    let first = samples.first().context("no commands sent")?;
    let (t0, first_start) = (first.scheduled, first.start);
    let last_start = samples.iter().map(|s| s.start).max().unwrap_or(first_start);
    let last_end = samples.iter().map(|s| s.end).max().unwrap_or(t0);
    let mut outcomes = BTreeMap::new();
    let (mut latency, mut from_schedule, mut outbound, mut inbound, mut lag) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut late = 0;
    for s in &samples {
        *outcomes.entry(s.label()).or_insert(0) += 1;
        let l = s.start.saturating_duration_since(s.scheduled);
        late += usize::from(l > LATE);
        lag.push(ms(l));
        if s.ok() {
            latency.push(ms(s.end - s.start));
            from_schedule.push(ms(s.end - s.scheduled));
            if let Some(at) = receipts.get(s.seq) {
                outbound.push(ms(at.saturating_duration_since(s.start)));
                inbound.push(ms(s.end.saturating_duration_since(at)));
            }
        }
    }
    let sent = samples.len();
    let ok = latency.len();
    let span = last_start.duration_since(first_start).as_secs_f64();
    let per = |i: usize| used[i] / sent as u32;
    let redis_delta = info1.since(&info0);
    let device_note = {
        let u = &answered.unexpected;
        let (errors, closed) = (
            u.errors.load(Ordering::Relaxed),
            u.closed.load(Ordering::Relaxed),
        );
        (errors + closed > 0).then(|| {
            format!(
                "devices saw {errors} unexpected frames, {closed} closed sockets; e.g. {}",
                u.example
                    .lock()
                    .map(|e| e.clone().unwrap_or_default())
                    .unwrap_or_default()
            )
        })
    };
    let run = RttRun {
        sent,
        ok,
        outcomes,
        achieved: if sent > 1 && span > 0.0 {
            (sent - 1) as f64 / span
        } else {
            f64::NAN
        },
        answered: ok as f64 / last_end.duration_since(t0).as_secs_f64(),
        latency: sorted(latency),
        from_schedule: sorted(from_schedule),
        outbound: sorted(outbound),
        inbound: sorted(inbound),
        lag: sorted(lag),
        late,
        cpu: [per(0), per(1), per(2)],
        other: other_cores(used[3], &used[..3], redis_delta.cpu, wall),
        redis: redis_delta,
        background,
        commands_seen,
        dups,
        device_note,
    };
    drop(b);
    drop(a);
    support::redis::stop(redis).await;
    Ok(run)
}

/// One ingest run against a single node; on the Redis bus also what Redis did during it.
async fn ingest_run(
    o: &Opts,
    qos: u8,
    run: usize,
    on_redis: bool,
) -> anyhow::Result<(IngestRun, Option<Delta>)> {
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
    let max = o.devices + 100;
    let tag = format!("{}{run}", if on_redis { "r" } else { "m" });
    if !on_redis {
        let node = Node::start(&quiet_env(max)).await?;
        let prepared = support::ingest::prepare(&node, load, &tag).await?;
        return Ok((prepared.run(&node).await?, None));
    }
    let redis = support::redis::start().await?;
    let node = Node::start(&redis_env(&redis.url(), "bench-ingest", max)).await?;
    let prepared = support::ingest::prepare(&node, load, &tag).await?;
    let before = Info::read(redis.port()).await?;
    let r = prepared.run(&node).await?;
    let delta = Info::read(redis.port()).await?.since(&before);
    drop(node);
    support::redis::stop(redis).await;
    Ok((r, Some(delta)))
}

#[tokio::main]
async fn main() {
    match tokio::time::timeout(TOTAL_DEADLINE, run()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("cluster bench failed: {e:#}");
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("cluster bench: gave up after {TOTAL_DEADLINE:?}");
            std::process::exit(1);
        }
    }
}

/// `a: 1, b: 2`.
fn counts(m: &BTreeMap<String, usize>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn run() -> anyhow::Result<()> {
    let o = Opts::parse()?;
    let bin = support::node::binary()?;
    let started = Instant::now();
    let mut sections = String::new();
    let mut notes: Vec<String> = Vec::new();

    if o.wants("rtt") {
        let mut figures = Vec::new();
        let mut details = format!(
            "| offered | run | sent | answers | achieved send rate | p50 | p99 | p99.9 | max | lag max | late > {} ms | Redis cmds / command |\n\
             |---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            LATE.as_millis()
        );
        let mut breakdown = String::new();
        for &rate in &o.rates {
            let r = num(rate, 0);
            let mut f = vec![
                Figure::new(
                    format!(
                        "**{r} commands/s offered** for {} s: achieved send rate",
                        o.duration
                    ),
                    "cmd/s",
                    0,
                ),
                Figure::new("  200 answers per second", "cmd/s", 0),
                Figure::new("  non-200 answers and calls without an answer", "calls", 0),
                Figure::new("  latency p50 (200s, send → answer)", "ms", 2),
                Figure::new("  latency p99", "ms", 2),
                Figure::new("  latency p99.9", "ms", 2),
                Figure::new("  latency max", "ms", 2),
                Figure::new("  latency p99 from the scheduled instant", "ms", 2),
                Figure::new(
                    "  p50 outbound leg: send → command at the device (REST, A, Redis, B)",
                    "ms",
                    2,
                ),
                Figure::new(
                    "  p50 return leg: command at the device → answer (ack, B, Redis, A, REST)",
                    "ms",
                    2,
                ),
                Figure::new("  driver lag behind the schedule, p99", "ms", 2),
                Figure::new("  driver lag behind the schedule, max", "ms", 2),
                Figure::new(
                    format!("  calls started more than {} ms late", LATE.as_millis()),
                    "calls",
                    0,
                ),
                Figure::new(
                    "  Redis commands per command (total_commands_processed, incl. inside scripts)",
                    "cmds",
                    1,
                ),
                Figure::new("  Redis CPU per command", "µs", 1),
                Figure::new("  node A CPU per command (REST, waiter)", "µs", 1),
                Figure::new("  node B CPU per command (session, device socket)", "µs", 1),
                Figure::new("  bench client CPU per command (driver + devices)", "µs", 1),
                Figure::new(
                    "  Redis commands/s of the idle cluster (background)",
                    "/s",
                    1,
                ),
                Figure::new(
                    "  CPU of other processes on the machine during the run (not measured here)",
                    "cores",
                    2,
                ),
            ];
            let mut total = Delta::default();
            let mut total_sent = 0usize;
            for run in 1..=o.runs {
                eprintln!("rtt {r}/s run {run}/{}", o.runs);
                let x = rtt_run(&o, rate, run)
                    .await
                    .with_context(|| format!("command round trip at {r}/s, run {run}"))?;
                let values = [
                    x.achieved,
                    x.answered,
                    (x.sent - x.ok) as f64,
                    quantile(&x.latency, 0.5),
                    quantile(&x.latency, 0.99),
                    quantile(&x.latency, 0.999),
                    quantile(&x.latency, 1.0),
                    quantile(&x.from_schedule, 0.99),
                    quantile(&x.outbound, 0.5),
                    quantile(&x.inbound, 0.5),
                    quantile(&x.lag, 0.99),
                    quantile(&x.lag, 1.0),
                    x.late as f64,
                    x.redis.commands as f64 / x.sent as f64,
                    x.redis.cpu * 1e6 / x.sent as f64,
                    x.cpu[0].as_secs_f64() * 1e6,
                    x.cpu[1].as_secs_f64() * 1e6,
                    x.cpu[2].as_secs_f64() * 1e6,
                    x.background,
                    x.other,
                ];
                for (fig, v) in f.iter_mut().zip(values) {
                    fig.runs.push(v);
                }
                let _ = writeln!(
                    details,
                    "| {r}/s | {run} | {} | {} | {} /s | {} ms | {} ms | {} ms | {} ms | {} ms | {} | {} |",
                    num(x.sent as f64, 0),
                    counts(&x.outcomes),
                    num(x.achieved, 0),
                    num(quantile(&x.latency, 0.5), 2),
                    num(quantile(&x.latency, 0.99), 2),
                    num(quantile(&x.latency, 0.999), 2),
                    num(quantile(&x.latency, 1.0), 2),
                    num(quantile(&x.lag, 1.0), 2),
                    num(x.late as f64, 0),
                    num(x.redis.commands as f64 / x.sent as f64, 1),
                );
                if x.dups > 0 || x.commands_seen != x.sent as u64 {
                    notes.push(format!(
                        "{r}/s run {run}: devices received {} command frames for {} calls ({} marked dup)",
                        x.commands_seen, x.sent, x.dups
                    ));
                }
                if x.other > 0.1 {
                    notes.push(format!(
                        "{r}/s run {run}: other processes used {:.2} cores during the run",
                        x.other
                    ));
                }
                if let Some(n) = x.device_note {
                    notes.push(format!("{r}/s run {run}: {n}"));
                }
                eprintln!(
                    "  sent {} at {:.0}/s, {}; p50 {:.2} ms p99 {:.2} ms max {:.2} ms; lag max {:.2} ms; {:.1} redis cmds/cmd",
                    x.sent,
                    x.achieved,
                    counts(&x.outcomes),
                    quantile(&x.latency, 0.5),
                    quantile(&x.latency, 0.99),
                    quantile(&x.latency, 1.0),
                    quantile(&x.lag, 1.0),
                    x.redis.commands as f64 / x.sent as f64
                );
                total.add(&x.redis);
                total_sent += x.sent;
            }
            let _ = writeln!(breakdown, "- {r}/s: {}", total.top(12, total_sent as f64));
            figures.extend(f);
        }
        let _ = writeln!(
            sections,
            "## Command round trip across two nodes\n\n\
             {} devices authenticated on node B; QoS 1 commands with `waitMs: {}` sent through node A's \
             `POST /v1/devices/{{id}}/commands` (round robin over the devices) on an open-loop schedule, \
             after a {} s warm-up at the same rate; each device acks every command with \
             `payload: {{\"result\": ...}}`. Latency is of the 200 answers carrying the result, from the \
             moment the request was started; lag is how late a request started after its scheduled \
             instant (the driver caps open calls at {}).\n",
            o.cmd_devices, o.wait_ms, o.warmup, o.max_in_flight
        );
        sections.push_str(&table(&figures));
        sections.push_str("\nRuns:\n\n");
        sections.push_str(&details);
        let _ = writeln!(
            sections,
            "\nRedis commands per command round trip, by command (all runs; `evalsha` is one Lua \
             script call, whose inner commands are counted under their own names):\n\n{breakdown}"
        );
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
        let what = if qos == 0 {
            format!(
                "QoS 0 status ingest, server-counted ({} devices, {} msgs/run)",
                o.devices,
                num(total as f64, 0)
            )
        } else {
            format!(
                "QoS 1 status ingest, acked ({} devices, window {}, {} msgs/run)",
                o.devices,
                o.window,
                num(total as f64, 0)
            )
        };
        let mut mem_rate = Figure::new(format!("{what}: **memory bus**"), "msg/s", 0);
        let mut redis_rate = Figure::new(format!("{what}: **Redis bus**"), "msg/s", 0);
        let mut ratio = Figure::new("  Redis / memory (per run pair)", "×", 2);
        let mut mem_cpu = Figure::new("  node CPU per message, memory bus", "µs", 1);
        let mut redis_cpu = Figure::new("  node CPU per message, Redis bus", "µs", 1);
        let mut ops = Figure::new(
            "  Redis commands per message (total_commands_processed, incl. inside scripts)",
            "cmds",
            2,
        );
        let mut redis_cpu_msg = Figure::new("  Redis CPU per message", "µs", 1);
        let mut bytes = Figure::new("  Redis network bytes (in + out) per message", "B", 0);
        let mut other = Figure::new(
            "  CPU of other processes on the machine during the memory runs (not measured here)",
            "cores",
            2,
        );
        let mut other_redis = Figure::new("  same, during the Redis runs", "cores", 2);
        let mut sum = Delta::default();
        let mut messages = 0usize;
        for run in 1..=o.runs {
            // Memory and Redis alternate so that drifts of the machine hit both alike.
            eprintln!("{part} run {run}/{}: memory bus", o.runs);
            let (m, _) = ingest_run(&o, qos, run, false)
                .await
                .with_context(|| format!("{part} memory run {run}"))?;
            eprintln!("  {} msg/s; Redis bus", num(m.rate, 0));
            let (r, delta) = ingest_run(&o, qos, run, true)
                .await
                .with_context(|| format!("{part} redis run {run}"))?;
            let delta = delta.unwrap_or_default();
            let per = r.messages as f64;
            eprintln!(
                "  {} msg/s, {:.2} redis cmds/msg",
                num(r.rate, 0),
                delta.commands as f64 / per
            );
            mem_rate.runs.push(m.rate);
            redis_rate.runs.push(r.rate);
            ratio.runs.push(r.rate / m.rate);
            mem_cpu.runs.push(m.cpu_per_msg.as_secs_f64() * 1e6);
            redis_cpu.runs.push(r.cpu_per_msg.as_secs_f64() * 1e6);
            ops.runs.push(delta.commands as f64 / per);
            redis_cpu_msg.runs.push(delta.cpu * 1e6 / per);
            bytes.runs.push(delta.net_bytes as f64 / per);
            let others = [
                other_cores(m.machine_cpu, &[m.node_cpu, m.client_cpu], 0.0, m.wall),
                other_cores(
                    r.machine_cpu,
                    &[r.node_cpu, r.client_cpu],
                    delta.cpu,
                    r.wall,
                ),
            ];
            other.runs.push(others[0]);
            other_redis.runs.push(others[1]);
            for (bus, cores) in [("memory", others[0]), ("redis", others[1])] {
                if cores > 0.1 {
                    notes.push(format!(
                        "{part} {bus} run {run}: other processes used {cores:.2} cores during the run"
                    ));
                }
            }
            for (bus, x) in [("memory", &m), ("redis", &r)] {
                if let Some(n) = &x.note {
                    notes.push(format!("{part} {bus} run {run}: {n}"));
                }
            }
            sum.add(&delta);
            messages += r.messages;
        }
        let _ = writeln!(
            sections,
            "\n## {} ingest: memory bus vs Redis bus\n\n\
             The `gateway` benchmark's ingest against one `fleetgate all` node, once on the memory \
             bus and once with `FLEETGATE_REDIS_URLS` (one local redis-server), fresh processes per run.\n",
            if qos == 0 { "QoS 0" } else { "QoS 1" }
        );
        sections.push_str(&table(&[
            mem_rate,
            redis_rate,
            ratio,
            mem_cpu,
            redis_cpu,
            ops,
            redis_cpu_msg,
            bytes,
            other,
            other_redis,
        ]));
        let _ = writeln!(
            sections,
            "\nRedis commands per message, by command (all runs): {}",
            sum.top(12, messages as f64)
        );
    }

    let mut md = String::from("# fleetgate cluster benchmark (Redis bus)\n\n");
    let _ = writeln!(
        md,
        "- command: `{}`",
        support::report::command_line("cluster", &o.given)
    );
    let redis_version = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .find_map(|w| w.strip_prefix("v=").map(str::to_owned))
        })
        .unwrap_or_else(|| "unknown".into());
    let _ = writeln!(
        md,
        "- servers: {}, redis-server {redis_version} (no persistence), all on loopback; fresh processes per run; {} runs per figure",
        support::report::binary(&bin),
        o.runs
    );
    let _ = writeln!(md, "- machine: {}", machine());
    let _ = writeln!(
        md,
        "- node env: heartbeat 600 s, idle timeout 1800 s, rate limit 1,000,000/s burst 1,000,000; the bench client, the nodes and redis-server share the machine"
    );
    let _ = writeln!(
        md,
        "- wall time: {:.0} s\n",
        started.elapsed().as_secs_f64()
    );
    md.push_str(&sections);
    if !notes.is_empty() {
        md.push_str("\nNotes:\n\n");
        for n in &notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    println!("{md}");
    let out = support::report::write(&md, o.out.as_deref(), "bench-results-cluster.md")?;
    eprintln!("written to {}", out.display());
    Ok(())
}
