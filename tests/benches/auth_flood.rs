//! Does a flood of failing authentications from one address slow down everyone else's?
//!
//! `cargo build --release -p fleetgate && cargo bench -p fleetgate-e2e --bench auth_flood`
//!
//! One node (memory bus, release build). Good devices connect and authenticate with their
//! provisioned secrets by an auth frame, from 127.0.0.2, 16 at a time, one after another: the
//! figure is their connect-to-`auth_response` latency and rate. Three phases per run, each on
//! a fresh node: `quiet` (nothing else), `flood` (64 connections at a time from 127.0.0.3
//! retrying, as fast as they can, an RS256 JWT that names a configured key but was signed by
//! another, so that each attempt the throttle lets through costs a signature check) and
//! `flood-unthrottled` (the same with the failure throttle off: what it buys). The node's CPU
//! per flood attempt is measured too. Medians of `--runs` (default 3).
//! Results: loadtest/auth-flood/results.json.

// A benchmark reports on stdout.
#![allow(clippy::print_stdout)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use support::node::{Node, quiet_env};

const GOOD_DEVICES: usize = 3_000;
const GOOD_CONCURRENCY: usize = 16;
const FLOOD_CONCURRENCY: usize = 64;

async fn tcp_from(from: &str, gateway: &str) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse::<SocketAddr>()?)?;
    let tcp = socket.connect(gateway.parse()?).await?;
    tcp.set_nodelay(true)?;
    // Closed with a reset: thousands of client-side TIME_WAIT sockets per second would make
    // the kernel's search for a free port on bind slow for every connect of this process,
    // good devices included, and measure that instead of the node.
    #[allow(deprecated)]
    tcp.set_linger(Some(Duration::ZERO))?;
    Ok(tcp)
}

/// One good device: connect, upgrade, auth frame, `auth_response` success; the latency.
async fn good_auth(gateway: &str, id: &str, secret: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let tcp = tcp_from("127.0.0.2", gateway).await?;
    let url = format!("ws://{gateway}/v1/device");
    let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp).await?;
    ws.send(Message::text(
        json!({"type":"auth","deviceId":id,"token":secret}).to_string(),
    ))
    .await?;
    while let Some(msg) = ws.next().await {
        if let Message::Text(t) = msg? {
            let v: Value = serde_json::from_str(&t)?;
            if v["status"] == "success" {
                let took = started.elapsed();
                let _ = ws.close(None).await;
                return Ok(took);
            }
            bail!("{id}: {v}");
        }
    }
    bail!("{id}: closed before auth_response")
}

/// An RSA key pair by `openssl`: (private PEM, the JWKS document of its public half).
fn rsa_key(dir: &std::path::Path, name: &str) -> anyhow::Result<(Vec<u8>, Value)> {
    let key = dir.join(format!("{name}.pem"));
    let run = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
        let out = std::process::Command::new("openssl").args(args).output()?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out.stdout)
    };
    let k = key.to_str().context("path")?;
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        k,
    ])?;
    let modulus = String::from_utf8(run(&["rsa", "-in", k, "-noout", "-modulus"])?)?;
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<_, _>>()?;
    use base64::Engine as _;
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(n);
    let jwks = json!({"keys":[{"kty":"RSA","kid":"fleet","alg":"RS256","n":n,"e":"AQAB"}]});
    Ok((std::fs::read(&key)?, jwks))
}

/// One failing attempt: the upgrade with `token` in the header; the HTTP status it got.
async fn bad_attempt(gateway: &str, n: u64, token: &str) -> u16 {
    let Ok(tcp) = tcp_from("127.0.0.3", gateway).await else {
        return 0;
    };
    let mut req = format!("ws://{gateway}/v1/device")
        .into_client_request()
        .expect("request");
    let headers = req.headers_mut();
    headers.insert("device-id", format!("flood-{}", n % 1000).parse().unwrap());
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    match tokio_tungstenite::client_async(req, tcp).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(_) => 0,
    }
}

#[derive(Debug, Clone, serde::Serialize)]
struct Phase {
    phase: String,
    good_per_s: f64,
    good_p50_ms: f64,
    good_p99_ms: f64,
    flood_attempts_per_s: f64,
    node_cpu_us_per_flood_attempt: f64,
    flood_throttled: u64,
    flood_refused_401: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// The JWKS file the node trusts and a token it refuses (signed by another key).
struct Keys {
    jwks: std::path::PathBuf,
    forged: String,
}

fn keys() -> anyhow::Result<Keys> {
    let dir = std::env::temp_dir().join(format!("fleetgate-auth-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (_, trusted) = rsa_key(&dir, "trusted")?;
    let (other, _) = rsa_key(&dir, "other")?;
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, trusted.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&jwks, std::fs::Permissions::from_mode(0o600))?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("fleet".into());
    let exp = support::device::now_ms() / 1000 + 3600;
    let forged = jsonwebtoken::encode(
        &header,
        &json!({"sub": "flood", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(&other)?,
    )?;
    Ok(Keys { jwks, forged })
}

async fn phase(name: &str, flood: bool, throttle: bool, keys: &Keys) -> anyhow::Result<Phase> {
    let mut env = quiet_env(20_000);
    env.push((
        "FLEETGATE_JWT_JWKS",
        keys.jwks.to_string_lossy().into_owned(),
    ));
    if !throttle {
        env.push(("FLEETGATE_AUTH_FAILURE_BURST_PER_SOURCE", "0".into()));
        env.push(("FLEETGATE_AUTH_FAILURE_BURST_PER_DEVICE", "0".into()));
    }
    let node = Node::start(&env).await?;
    let ids: Vec<String> = (0..GOOD_DEVICES).map(|i| format!("good-{i}")).collect();
    let secrets = node.provision_all(&ids, 32).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let throttled = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut flooders = Vec::new();
    if flood {
        for _ in 0..FLOOD_CONCURRENCY {
            let (stop, attempts, throttled, refused) = (
                stop.clone(),
                attempts.clone(),
                throttled.clone(),
                refused.clone(),
            );
            let gateway = node.gateway.clone();
            let token = keys.forged.clone();
            flooders.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = attempts.fetch_add(1, Ordering::Relaxed);
                    match bad_attempt(&gateway, n, &token).await {
                        429 => throttled.fetch_add(1, Ordering::Relaxed),
                        401 => refused.fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                }
            }));
        }
        // Let the flood reach its steady state (and the throttle engage) first.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let flood_start = (Instant::now(), attempts.load(Ordering::Relaxed));
    let cpu_start = node.cpu()?;
    let started = Instant::now();
    let gateway = node.gateway.clone();
    let mut latencies: Vec<Duration> = futures_util::stream::iter(ids.iter().zip(&secrets))
        .map(|(id, secret)| {
            let gateway = gateway.clone();
            async move { good_auth(&gateway, id, secret).await }
        })
        .buffer_unordered(GOOD_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .context("a good device failed to authenticate")?;
    let elapsed = started.elapsed();
    let flood_attempts = attempts.load(Ordering::Relaxed) - flood_start.1;
    let flood_secs = flood_start.0.elapsed().as_secs_f64();
    let node_cpu = node.cpu()? - cpu_start;
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        let _ = f.await;
    }
    latencies.sort();
    Ok(Phase {
        phase: name.to_owned(),
        good_per_s: GOOD_DEVICES as f64 / elapsed.as_secs_f64(),
        good_p50_ms: percentile(&latencies, 0.50),
        good_p99_ms: percentile(&latencies, 0.99),
        flood_attempts_per_s: flood_attempts as f64 / flood_secs,
        // The good devices' share is subtracted at the quiet phase's cost per device when
        // comparing; here it is the node's whole CPU over the flood's attempts.
        node_cpu_us_per_flood_attempt: if flood_attempts == 0 {
            0.0
        } else {
            node_cpu.as_secs_f64() * 1e6 / flood_attempts as f64
        },
        flood_throttled: throttled.load(Ordering::Relaxed),
        flood_refused_401: refused.load(Ordering::Relaxed),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let keys = keys()?;
    let mut all = Vec::new();
    for run in 1..=runs {
        // Alternated, so drift over the session falls on every phase alike.
        for (name, flood, throttle) in [
            ("quiet", false, true),
            ("flood", true, true),
            ("flood-unthrottled", true, false),
        ] {
            let p = phase(name, flood, throttle, &keys).await?;
            println!(
                "run {run} {name:>18}: good {:>6.0}/s p50 {:>6.2} ms p99 {:>6.2} ms | flood {:>6.0}/s (429: {}, 401: {})",
                p.good_per_s,
                p.good_p50_ms,
                p.good_p99_ms,
                p.flood_attempts_per_s,
                p.flood_throttled,
                p.flood_refused_401
            );
            all.push((run, p));
        }
    }
    println!("medians of {runs} runs:");
    let mut summary = Vec::new();
    for name in ["quiet", "flood", "flood-unthrottled"] {
        let of = |f: fn(&Phase) -> f64| {
            median(
                all.iter()
                    .filter(|(_, p)| p.phase == name)
                    .map(|(_, p)| f(p))
                    .collect(),
            )
        };
        let row = json!({
            "phase": name,
            "good_per_s": of(|p| p.good_per_s),
            "good_p50_ms": of(|p| p.good_p50_ms),
            "good_p99_ms": of(|p| p.good_p99_ms),
            "flood_attempts_per_s": of(|p| p.flood_attempts_per_s),
            "node_cpu_us_per_flood_attempt": of(|p| p.node_cpu_us_per_flood_attempt),
        });
        println!("  {row}");
        summary.push(row);
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("loadtest").join("auth-flood");
    std::fs::create_dir_all(&dir)?;
    let runs_json: Vec<Value> = all
        .iter()
        .map(|(run, p)| json!({"run": run, "result": p}))
        .collect();
    let doc = json!({
        "command": "cargo bench -p fleetgate-e2e --bench auth_flood",
        "good_devices": GOOD_DEVICES,
        "good_concurrency": GOOD_CONCURRENCY,
        "flood_concurrency": FLOOD_CONCURRENCY,
        "medians": summary,
        "runs": runs_json,
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    Ok(())
}
