//! Admin API benchmark (release build, Redis bus, loopback):
//!
//! 1. **Request overhead of RBAC and audit.** The same two calls, a read
//!    (`GET /v1/devices/{id}`) and a state change (`POST /v1/devices/{id}/disconnect`, which
//!    now writes two audit entries), at a fixed open-loop rate, against this build and, when
//!    `FLEETGATE_BASELINE_BIN` names one, a build from before RBAC and audit. Figures: latency
//!    p50/p99 and the node's CPU time per call; with this build also as a user (JWT) rather
//!    than the bootstrap key.
//! 2. **A job over 100,000 devices.** Time from `POST /v1/jobs` to every command queued
//!    (`dispatchedMs - createdMs`), and the Redis memory the job added.
//!
//! `cargo build --release -p fleetgate && cargo bench -p fleetgate-e2e --bench admin`
//! (`-- --runs N --rate R --seconds S --devices D`). Results go to
//! `loadtest/results/admin/results.json` and to stdout.

// A benchmark reports on stdout.
#![allow(clippy::print_stdout)]

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fleetgate_test_support::RedisServer;
use serde_json::{Value, json};
use support::node::{API_KEY, cpu_of};

const PASSWORD: &str = "bench password 0123456789";

struct Server {
    _child: tokio::process::Child,
    pid: u32,
    admin: String,
    http: reqwest::Client,
    auth: String,
}

impl Server {
    async fn start(
        bin: &Path,
        redis: &RedisServer,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        let url = redis.url();
        let mut env = vec![
            ("FLEETGATE_API_KEY", API_KEY),
            ("FLEETGATE_LISTEN", "127.0.0.1:0"),
            ("FLEETGATE_ADMIN_LISTEN", "127.0.0.1:0"),
            ("FLEETGATE_INTERNAL_LISTEN", "127.0.0.1:0"),
            ("FLEETGATE_REDIS_URLS", url.as_str()),
            ("RUST_LOG", "error"),
        ];
        env.extend_from_slice(extra);
        let (child, addrs) =
            fleetgate_e2e::spawn_binary(bin, "all", &env, Duration::from_secs(20)).await?;
        Ok(Server {
            pid: child.id().context("pid")?,
            _child: child,
            admin: addrs["admin"].clone(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()?,
            auth: API_KEY.to_owned(),
        })
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method.parse()?, format!("http://{}{path}", self.admin))
            .bearer_auth(&self.auth);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }
}

/// Latencies and the server's CPU time per call of `count` calls at `rate` per second.
async fn paced(
    server: &Server,
    method: &'static str,
    path: &str,
    rate: u32,
    seconds: u64,
) -> anyhow::Result<(f64, f64, f64)> {
    let count = (u64::from(rate) * seconds) as usize;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let cpu_before = cpu_of(&server.pid.to_string())?;
    let start = tokio::time::Instant::now();
    let mut calls = Vec::with_capacity(count);
    for i in 0..count {
        // Open loop: each call starts at its slot, whatever earlier calls are doing.
        tokio::time::sleep_until(start + period * i as u32).await;
        let req = server
            .http
            .request(method.parse()?, format!("http://{}{path}", server.admin))
            .bearer_auth(&server.auth);
        calls.push(tokio::spawn(async move {
            let t = Instant::now();
            let resp = req.send().await;
            let ok = resp.is_ok_and(|r| r.status().is_success());
            (ok, t.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for c in calls {
        let (ok, d) = c.await?;
        if !ok {
            bail!("{method} {path} failed during the run");
        }
        latencies.push(d.as_secs_f64() * 1000.0);
    }
    let cpu = cpu_of(&server.pid.to_string())? - cpu_before;
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    Ok((q(0.5), q(0.99), cpu.as_secs_f64() * 1e6 / count as f64))
}

fn used_memory(redis: &RedisServer) -> anyhow::Result<u64> {
    let cli = fleetgate_test_support::require_program("redis-cli", "redis-tools");
    let out = std::process::Command::new(cli)
        .args(["-p", &redis.port().to_string(), "INFO", "memory"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .context("used_memory in INFO")?
        .trim()
        .parse()
        .context("used_memory value")
}

fn flag(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .context(name.to_owned())?
            .parse()
            .context(name.to_owned()),
        None => Ok(default),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs = flag(&args, "--runs", 3)? as usize;
    let rate = flag(&args, "--rate", 500)? as u32;
    let seconds = flag(&args, "--seconds", 10)?;
    let devices = flag(&args, "--devices", 100_000)? as usize;
    let current = support::node::binary()?;
    let mut builds: Vec<(&str, PathBuf)> = Vec::new();
    if let Ok(base) = std::env::var("FLEETGATE_BASELINE_BIN") {
        builds.push(("baseline", PathBuf::from(base)));
    }
    builds.push(("current", current.clone()));

    let mut overhead = Vec::new();
    for (label, bin) in &builds {
        let credentials: &[&str] = if *label == "current" {
            &["bootstrap key", "user token"]
        } else {
            &["bootstrap key"]
        };
        for cred in credentials {
            let mut series: Vec<[f64; 6]> = Vec::new();
            for run in 0..runs {
                let redis = support::redis::start().await?;
                let mut server = Server::start(
                    bin,
                    &redis,
                    &[("FLEETGATE_AUDIT_CHECKPOINT_INTERVAL_MS", "3600000")],
                )
                .await?;
                let (s, _) = server
                    .call(
                        "POST",
                        "/v1/devices",
                        Some(json!({"id": "bench-dev", "groups": ["g"]})),
                    )
                    .await?;
                anyhow::ensure!(s == 201, "provision: {s}");
                if *cred == "user token" {
                    server.call("POST", "/v1/users", Some(json!({"username": "op", "password": PASSWORD, "role": "operator", "groups": ["g"]}))).await?;
                    let (_, t) = server
                        .call(
                            "POST",
                            "/v1/auth/login",
                            Some(json!({"username": "op", "password": PASSWORD})),
                        )
                        .await?;
                    server.auth = t["token"].as_str().context("token")?.to_owned();
                }
                // Warm up connections and code paths.
                paced(&server, "GET", "/v1/devices/bench-dev", rate, 1).await?;
                let read = paced(&server, "GET", "/v1/devices/bench-dev", rate, seconds).await?;
                let write = paced(
                    &server,
                    "POST",
                    "/v1/devices/bench-dev/disconnect",
                    rate,
                    seconds,
                )
                .await?;
                println!(
                    "{label} / {cred} run {run}: read p50 {:.3} ms p99 {:.3} ms {:.0} µs CPU; write p50 {:.3} ms p99 {:.3} ms {:.0} µs CPU",
                    read.0, read.1, read.2, write.0, write.1, write.2
                );
                series.push([read.0, read.1, read.2, write.0, write.1, write.2]);
                drop(server);
                support::redis::stop(redis).await;
            }
            let col = |i: usize| median(&mut series.iter().map(|r| r[i]).collect::<Vec<_>>());
            overhead.push(json!({
                "build": label, "credential": cred, "rate_per_s": rate, "seconds": seconds,
                "runs": series,
                "median": {"read_p50_ms": col(0), "read_p99_ms": col(1), "read_cpu_us": col(2),
                            "write_p50_ms": col(3), "write_p99_ms": col(4), "write_cpu_us": col(5)},
            }));
        }
    }

    // A job over `devices` devices, `runs` times on one provisioned fleet.
    let redis = support::redis::start().await?;
    let server = Server::start(
        &current,
        &redis,
        &[("FLEETGATE_AUDIT_CHECKPOINT_INTERVAL_MS", "3600000")],
    )
    .await?;
    let ids: Vec<String> = (0..devices).map(|i| format!("d{i:06}")).collect();
    let t = Instant::now();
    let url = format!("http://{}/v1/devices", server.admin);
    let results: Vec<anyhow::Result<()>> =
        futures_util::StreamExt::collect(futures_util::StreamExt::buffer_unordered(
            futures_util::stream::iter(ids.iter().map(|id| {
                let req = server
                    .http
                    .post(&url)
                    .bearer_auth(API_KEY)
                    .json(&json!({"id": id, "groups": ["fleet"]}));
                async move {
                    let r = req.send().await?;
                    anyhow::ensure!(r.status().as_u16() == 201, "provision {id}: {}", r.status());
                    Ok(())
                }
            })),
            64,
        ))
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let provision_s = t.elapsed().as_secs_f64();
    println!("provisioned {devices} devices in {provision_s:.1} s");
    let mut jobs = Vec::new();
    for run in 0..runs {
        let before = used_memory(&redis)?;
        let (s, created) = server.call("POST", "/v1/jobs", Some(json!({"group": "fleet", "payload": {"fw": "2.1"}, "qos": 1, "ttlMs": 3_600_000}))).await?;
        anyhow::ensure!(s == 202, "job: {s} {created}");
        let id = created["id"].as_str().context("job id")?.to_owned();
        let deadline = Instant::now() + Duration::from_secs(600);
        let job = loop {
            let (_, j) = server
                .call("GET", &format!("/v1/jobs/{id}?limit=0"), None)
                .await?;
            if !j["dispatchedMs"].is_null() {
                break j;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "job not dispatched in 600 s: {j}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let after = used_memory(&redis)?;
        let queue_s = (job["dispatchedMs"].as_i64().unwrap_or(0)
            - job["createdMs"].as_i64().unwrap_or(0)) as f64
            / 1000.0;
        anyhow::ensure!(
            job["counts"]["queued"] == devices,
            "every device queued: {job}"
        );
        let bytes = after.saturating_sub(before);
        println!(
            "job run {run}: {devices} queued in {queue_s:.2} s, Redis +{:.1} MiB ({:.0} B per device)",
            bytes as f64 / 1048576.0,
            bytes as f64 / devices as f64
        );
        jobs.push(json!({"queue_s": queue_s, "redis_bytes": bytes, "bytes_per_device": bytes as f64 / devices as f64}));
    }
    drop(server);
    support::redis::stop(redis).await;
    let mut q: Vec<f64> = jobs
        .iter()
        .map(|j| j["queue_s"].as_f64().unwrap_or(0.0))
        .collect();
    let mut b: Vec<f64> = jobs
        .iter()
        .map(|j| j["bytes_per_device"].as_f64().unwrap_or(0.0))
        .collect();
    let doc = json!({
        "machine": fleetgate_loadtest::report::machine(),
        "command": "cargo bench -p fleetgate-e2e --bench admin",
        "overhead": overhead,
        "job": {"devices": devices, "provision_s": provision_s, "runs": jobs,
                "median": {"queue_s": median(&mut q), "bytes_per_device": median(&mut b)}},
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../loadtest/results/admin");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    println!("{}", serde_json::to_string_pretty(&doc["overhead"].as_array().map(|o| o.iter().map(|x| json!({"build": x["build"], "credential": x["credential"], "median": x["median"]})).collect::<Vec<_>>()))?);
    println!("job median: {}", doc["job"]["median"]);
    Ok(())
}
