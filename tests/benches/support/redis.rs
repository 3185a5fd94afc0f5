//! What a benchmark reads from `redis-server`: `INFO stats commandstats cpu` over a plain RESP
//! exchange on a fresh loopback connection (no client library needed for one command).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use fleetgate_test_support::RedisServer;

/// Upper bound for one INFO exchange.
const DEADLINE: Duration = Duration::from_secs(5);

/// Starts a `redis-server` (no persistence) on a free loopback port. The harness blocks while
/// it waits for the server and panics on failure, so it runs on a blocking thread.
pub async fn start() -> anyhow::Result<RedisServer> {
    tokio::task::spawn_blocking(RedisServer::start)
        .await
        .context("redis-server did not start")
}

/// Stops a server off the async threads (dropping it waits for the process).
pub async fn stop(server: RedisServer) {
    let _ = tokio::task::spawn_blocking(move || drop(server)).await;
}

/// One reading of a server's counters.
#[derive(Debug, Clone, Default)]
pub struct Info {
    /// `total_commands_processed`: every command, those run inside Lua scripts included.
    pub commands: u64,
    /// `cmdstat_<name>` calls.
    pub calls: BTreeMap<String, u64>,
    /// `used_cpu_user + used_cpu_sys`, seconds (the main thread and its I/O threads).
    pub cpu: f64,
    /// `total_net_input_bytes + total_net_output_bytes`.
    pub net_bytes: u64,
}

/// The difference between two readings, without the `INFO` calls themselves.
#[derive(Debug, Clone, Default)]
pub struct Delta {
    /// Commands processed, inner commands of scripts included.
    pub commands: u64,
    /// Calls per command, most called first.
    pub calls: Vec<(String, u64)>,
    /// CPU seconds.
    pub cpu: f64,
    /// Bytes in and out.
    pub net_bytes: u64,
}

impl Info {
    /// Reads `INFO stats commandstats cpu` from the server on `127.0.0.1:port`.
    pub async fn read(port: u16) -> anyhow::Result<Info> {
        let text = tokio::time::timeout(DEADLINE, info_text(port))
            .await
            .context("redis INFO took too long")??;
        Ok(Info::parse(&text))
    }

    fn parse(text: &str) -> Info {
        let mut info = Info::default();
        for line in text.lines() {
            let Some((k, v)) = line.trim().split_once(':') else {
                continue;
            };
            let int = || v.parse::<u64>().unwrap_or(0);
            match k {
                "total_commands_processed" => info.commands = int(),
                "used_cpu_user" | "used_cpu_sys" => info.cpu += v.parse::<f64>().unwrap_or(0.0),
                "total_net_input_bytes" | "total_net_output_bytes" => info.net_bytes += int(),
                _ => {
                    if let Some(name) = k.strip_prefix("cmdstat_") {
                        let calls = v
                            .split(',')
                            .find_map(|f| f.strip_prefix("calls="))
                            .and_then(|c| c.parse().ok())
                            .unwrap_or(0);
                        info.calls.insert(name.to_owned(), calls);
                    }
                }
            }
        }
        info
    }

    /// What happened between `before` and this reading. The INFO that took `before` counts
    /// itself after its answer, so it is subtracted here.
    pub fn since(&self, before: &Info) -> Delta {
        let info_calls = self
            .calls
            .get("info")
            .copied()
            .unwrap_or(0)
            .saturating_sub(before.calls.get("info").copied().unwrap_or(0));
        let mut calls: Vec<(String, u64)> = self
            .calls
            .iter()
            .filter(|(k, _)| k.as_str() != "info")
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.saturating_sub(before.calls.get(k).copied().unwrap_or(0)),
                )
            })
            .filter(|(_, v)| *v > 0)
            .collect();
        calls.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Delta {
            commands: self
                .commands
                .saturating_sub(before.commands)
                .saturating_sub(info_calls),
            calls,
            cpu: (self.cpu - before.cpu).max(0.0),
            net_bytes: self.net_bytes.saturating_sub(before.net_bytes),
        }
    }
}

impl Delta {
    /// The sum of two deltas (for totals over runs).
    pub fn add(&mut self, other: &Delta) {
        self.commands += other.commands;
        self.cpu += other.cpu;
        self.net_bytes += other.net_bytes;
        for (k, v) in &other.calls {
            match self.calls.iter_mut().find(|(n, _)| n == k) {
                Some((_, n)) => *n += v,
                None => self.calls.push((k.clone(), *v)),
            }
        }
        self.calls
            .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    }

    /// `calls` per `per` (e.g. per message), the top `n`, as `name 1.00, ...`.
    pub fn top(&self, n: usize, per: f64) -> String {
        self.calls
            .iter()
            // What rounds to 0.00 per message is start-up noise (script loads, sweeps).
            .filter(|(_, v)| *v as f64 / per >= 0.005)
            .take(n)
            .map(|(k, v)| format!("`{k}` {:.2}", *v as f64 / per))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

async fn info_text(port: u16) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connect to redis on port {port}"))?;
    s.write_all(b"*4\r\n$4\r\nINFO\r\n$5\r\nstats\r\n$12\r\ncommandstats\r\n$3\r\ncpu\r\n")
        .await?;
    let mut r = BufReader::new(s);
    let mut header = String::new();
    r.read_line(&mut header).await?;
    let Some(len) = header.trim_end().strip_prefix('$') else {
        bail!("INFO answered {header:?}");
    };
    let len: usize = len
        .parse()
        .with_context(|| format!("INFO header {header:?}"))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}
