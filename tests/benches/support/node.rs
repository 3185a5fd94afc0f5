//! The server under test: a `fleetgate all` child process (release build) on free loopback
//! ports, plus what the benchmark reads from it: `/metrics`, `/readyz`, `/proc/<pid>/status`,
//! `/proc/<pid>/stat`, and the admin API for provisioning.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};

use tokio::process::Child;

/// The API key every benchmark node starts with.
pub const API_KEY: &str = "bench-api-key-0123456789";

pub use fleetgate_e2e::fleetgate_binary as binary;

/// The target dir this benchmark runs from (`<target>`), for the default report path.
pub fn target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.to_path_buf())
}

/// A running `fleetgate all`, killed on drop.
pub struct Node {
    /// Held only to be dropped: the child is spawned with `kill_on_drop`.
    _child: Child,
    pid: u32,
    /// Public WebSocket listener.
    pub gateway: String,
    /// Admin REST listener.
    pub admin: String,
    /// Internal listener (`/metrics`).
    pub internal: String,
    http: reqwest::Client,
}

impl Node {
    /// Starts a node: loopback ports, warn logs, plus `env` (which wins).
    pub async fn start(env: &[(&str, String)]) -> anyhow::Result<Node> {
        let mut all: Vec<(&str, &str)> = vec![
            ("FLEETGATE_API_KEY", API_KEY),
            ("FLEETGATE_LISTEN", "127.0.0.1:0"),
            ("FLEETGATE_ADMIN_LISTEN", "127.0.0.1:0"),
            ("FLEETGATE_INTERNAL_LISTEN", "127.0.0.1:0"),
            ("RUST_LOG", "warn"),
        ];
        all.extend(env.iter().map(|(k, v)| (*k, v.as_str())));
        let (child, addrs) = fleetgate_e2e::spawn_all(&all, Duration::from_secs(20)).await?;
        let pid = child.id().context("child pid")?;
        let node = Node {
            gateway: addrs.gateway,
            admin: addrs.admin,
            internal: addrs.internal,
            pid,
            _child: child,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(128)
                .build()?,
        };
        // Ready = /readyz answers 200: the listeners are up and, on the Redis bus, the link is.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !node.ready().await {
            if Instant::now() > deadline {
                bail!("fleetgate /readyz did not answer 200 within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(node)
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether `GET /readyz` answers 200.
    pub async fn ready(&self) -> bool {
        self.http
            .get(format!("http://{}/readyz", self.internal))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let resp = self
            .http
            .get(format!("http://{}/metrics", self.internal))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("/metrics answered {}", resp.status());
        }
        Ok(Metrics(resp.text().await?))
    }

    /// Polls `/metrics` until `metric` (exact sample name with labels) reaches `want`;
    /// returns when it did. Fails after `deadline` with the last value seen.
    pub async fn wait_metric(
        &self,
        metric: &str,
        want: f64,
        deadline: Duration,
    ) -> anyhow::Result<Instant> {
        let end = Instant::now() + deadline;
        let mut last = 0.0;
        loop {
            let m = self.metrics().await?;
            last = m.get(metric).unwrap_or(last);
            if last >= want {
                return Ok(Instant::now());
            }
            if Instant::now() > end {
                bail!(
                    "{metric} reached {last}, not {want}, within {deadline:?}\n{}",
                    m.summary()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Provisions `ids` with `concurrency` requests in flight; returns the secrets in order.
    pub async fn provision_all(
        &self,
        ids: &[String],
        concurrency: usize,
    ) -> anyhow::Result<Vec<String>> {
        let url = format!("http://{}/v1/devices", self.admin);
        let results: Vec<anyhow::Result<String>> =
            futures_util::stream::iter(ids.iter().map(|id| {
                let req = self
                    .http
                    .post(&url)
                    .bearer_auth(API_KEY)
                    .json(&json!({ "id": id }));
                async move {
                    let resp = req
                        .send()
                        .await
                        .with_context(|| format!("provision {id}"))?;
                    let status = resp.status();
                    let body: Value = resp
                        .json()
                        .await
                        .with_context(|| format!("provision {id}: body"))?;
                    if status.as_u16() != 201 {
                        bail!("provision {id}: {status} {body}");
                    }
                    body["secret"]
                        .as_str()
                        .map(str::to_owned)
                        .with_context(|| format!("provision {id}: no secret in {body}"))
                }
            }))
            .buffered(concurrency)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// `/proc/<pid>/status` memory fields, bytes.
    pub fn mem(&self) -> anyhow::Result<Mem> {
        Mem::of(self.pid)
    }

    /// Reads memory until it stops moving (three reads 100 ms apart within 64 KiB of each
    /// other), at most `max`; returns the last reading. This is a measurement settle, not a
    /// wait for a condition: the condition (count reached) was waited for before.
    pub async fn settled_mem(&self, max: Duration) -> anyhow::Result<Mem> {
        let end = Instant::now() + max;
        let mut prev = self.mem()?;
        let mut stable = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.mem()?;
            if now.rss.abs_diff(prev.rss) <= 64 * 1024 {
                stable += 1;
            } else {
                stable = 0;
            }
            prev = now;
            if stable >= 2 || Instant::now() > end {
                return Ok(prev);
            }
        }
    }

    /// Open file descriptors of the server (listeners, sockets, ...).
    pub fn fds(&self) -> anyhow::Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.pid))?.count())
    }

    /// Polls the server's open descriptors until there are at least `want`.
    pub async fn wait_fds(&self, want: usize, deadline: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + deadline;
        loop {
            let n = self.fds()?;
            if n >= want {
                return Ok(());
            }
            if Instant::now() > end {
                bail!("server holds {n} descriptors, not {want}, after {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// User + system CPU time of the server so far.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        cpu_of(&self.pid.to_string())
    }
}

/// User + system CPU time so far of process `pid` (`"self"` for this one), from
/// `/proc/<pid>/stat`.
pub fn cpu_of(pid: &str) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`; utime and stime are fields 14 and 15 (1-based).
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// CPU time all processors spent in processes (user, nice, system) since boot, from
/// `/proc/stat`: compared with the processes under test, it shows what else ran meanwhile.
/// Interrupt time is left out: loopback traffic is partly accounted there rather than to
/// the processes that caused it.
pub fn machine_busy() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat: no cpu line")?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq ...
    let ticks: u64 = f.iter().take(3).sum();
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// Env of a node under test: room for the connections and quiet, long timers so idle sockets
/// stay open and nothing but the measured traffic runs.
pub fn quiet_env(max_connections: usize) -> Vec<(&'static str, String)> {
    vec![
        ("FLEETGATE_MAX_CONNECTIONS", max_connections.to_string()),
        ("FLEETGATE_HEARTBEAT_MS", "600000".into()),
        ("FLEETGATE_IDLE_TIMEOUT_MS", "1800000".into()),
        ("FLEETGATE_AUTH_TIMEOUT_MS", "60000".into()),
        ("FLEETGATE_RATE_LIMIT_PER_SECOND", "1000000".into()),
        ("FLEETGATE_RATE_LIMIT_BURST", "1000000".into()),
        // Fanout runs connect every app subscriber with the one API key.
        (
            "FLEETGATE_APP_MAX_CONNECTIONS_PER_PRINCIPAL",
            "1000000".into(),
        ),
        // The whole fleet comes from one host (or through one nginx): a real fleet's connect
        // storm comes from many addresses, so the per-source pre-auth cap is off here.
        ("FLEETGATE_MAX_PENDING_AUTH_PER_SOURCE", "0".into()),
    ]
}

fn clock_ticks() -> u64 {
    static TCK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// A `/metrics` scrape.
pub struct Metrics(String);

impl Metrics {
    /// The value of a sample, by its exact name and label set as printed
    /// (`fleetgate_messages_received_total{kind="status"}`).
    pub fn get(&self, sample: &str) -> Option<f64> {
        self.0.lines().find_map(|l| {
            let rest = l.strip_prefix(sample)?;
            let rest = rest.strip_prefix(' ')?;
            rest.split_whitespace().next()?.parse().ok()
        })
    }

    /// Like [`Metrics::get`], 0 when absent (counters with labels appear on first use).
    pub fn count(&self, sample: &str) -> u64 {
        self.get(sample).unwrap_or(0.0) as u64
    }

    /// The non-comment samples, for error messages.
    pub fn summary(&self) -> String {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Memory of a process from `/proc/<pid>/status`, bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    /// `VmRSS`.
    pub rss: u64,
    /// `RssAnon`: heap and stacks, without the mapped binary.
    pub anon: u64,
}

impl Mem {
    /// Reads `/proc/<pid>/status`.
    pub fn of(pid: u32) -> anyhow::Result<Mem> {
        Self::parse(
            &std::fs::read_to_string(format!("/proc/{pid}/status"))
                .with_context(|| format!("/proc/{pid}/status"))?,
        )
    }

    /// This process.
    pub fn own() -> anyhow::Result<Mem> {
        Self::parse(&std::fs::read_to_string("/proc/self/status")?)
    }

    fn parse(status: &str) -> anyhow::Result<Mem> {
        let kb = |key: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(key))
                .with_context(|| format!("no {key}"))?;
            let v: u64 = line[key.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()?;
            Ok(v * 1024)
        };
        Ok(Mem {
            rss: kb("VmRSS:")?,
            anon: kb("RssAnon:")?,
        })
    }
}
