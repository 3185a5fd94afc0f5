//! An example integration (an MES or ERP connector) reading fleetgate's Redis streams: the
//! telemetry partitions `<prefix>tm:<p>` and the alerts stream `<prefix>alerts`.
//!
//! It reads through a consumer group, so that several copies share the work and a restarted
//! copy goes on where it stopped. It processes *at least once*: a record is acknowledged
//! (`XACK`) only after its line is in the output file and fsynced. A crash in between leaves the
//! record pending in the group, and it is processed again, by this consumer when it restarts
//! under the same name, or by another one once the record has been idle for
//! `--claim-idle-ms`. So the downstream system sees duplicates and must drop them: telemetry by
//! `(device, msgid)`, alerts by the stream entry `id`.
//!
//! To adapt it, replace [`Output::write`] with your database write, and return from it only
//! once the write is committed.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use fleetgate_bus::redis::shard_of;
use fred::prelude::*;
use fred::types::Value as RedisValue;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Exit code of the simulated crash (`--exit-after`).
const CRASH_EXIT_CODE: i32 = 3;
/// Pause before reading again after a Redis error (also bounds the error log's rate).
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Reads fleetgate's telemetry and alerts streams from Redis with a consumer group, at least once.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Redis URL of one shard; repeat it for each shard, in the gateways' order
    /// (`FLEETGATE_REDIS_URLS`).
    #[arg(long = "redis-url", default_value = "redis://127.0.0.1:6379")]
    redis_urls: Vec<String>,
    /// Prefix of the gateways' Redis keys.
    #[arg(long, default_value = "fleetgate:")]
    prefix: String,
    /// Telemetry partitions: the gateways' `telemetry_partitions` (`[bus]`).
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Consumer group: one per downstream system (each group gets every record).
    #[arg(long, default_value = "mes")]
    group: String,
    /// This consumer's name in the group [default: <hostname>-<pid>]. Give it a name that
    /// survives restarts (a StatefulSet pod name): a restart then re-processes its own pending
    /// records at once, instead of another consumer claiming them after `--claim-idle-ms`.
    #[arg(long)]
    consumer: Option<String>,
    /// Streams to read.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "telemetry,alerts"
    )]
    streams: Vec<Kind>,
    /// Most records read from each stream per call.
    #[arg(long, default_value_t = 100)]
    batch: u64,
    /// Records another consumer has left pending this long are taken over (it is presumed
    /// dead). Keep it well above the time one batch takes to process, or live consumers lose
    /// records to each other and process them twice.
    #[arg(long, default_value_t = 60_000)]
    claim_idle_ms: u64,
    /// File the records are appended to, one JSON line each (stands for the MES database).
    #[arg(long)]
    output: PathBuf,
    /// For tests: exit at once (code 3) after processing this many records, acknowledging
    /// nothing more, as a crash between processing and acknowledging would.
    #[arg(long)]
    exit_after: Option<u64>,
}

/// A kind of stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// Devices' accepted statuses and events, `<prefix>tm:<p>` (fields `device`, `msgid`,
    /// `kind`, `ts`, `rcv`, `payload`).
    Telemetry,
    /// Alerts as rules fire and resolve, `<prefix>alerts` on shard 0 (field `a`: the alert as
    /// JSON, `{"type":"alert","state":"open"|"resolved","id","device",...}`).
    Alerts,
}

/// One stream this consumer reads.
#[derive(Debug)]
struct Stream {
    key: String,
    kind: Kind,
}

/// Stream entries: ID and fields (`None` for an entry trimmed away while it was pending).
type Entries = Vec<(String, Option<HashMap<String, String>>)>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let consumer = args.consumer.clone().unwrap_or_else(default_consumer);
    let output = Arc::new(Output::open(&args.output, args.exit_after)?);
    let placed = place_streams(&args).await?;

    let stop = CancellationToken::new();
    let mut readers = JoinSet::new();
    for (url, streams) in args.redis_urls.iter().zip(placed) {
        if streams.is_empty() {
            continue;
        }
        let client = Builder::from_config(Config::from_url(url)?)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build()?;
        client
            .init()
            .await
            .with_context(|| format!("connect {url}"))?;
        let reader = Reader {
            client,
            streams,
            group: args.group.clone(),
            consumer: consumer.clone(),
            batch: args.batch.max(1),
            claim_idle_ms: args.claim_idle_ms,
            output: output.clone(),
        };
        readers.spawn(reader.run(stop.clone()));
    }
    info!(message = "consuming", %consumer, group = %args.group);

    shutdown_signal().await?;
    info!(message = "stopping; un-acknowledged records stay pending for the next start");
    stop.cancel();
    while readers.join_next().await.is_some() {}
    // No QUIT: it would wait behind a blocked XREADGROUP. Exiting closes the sockets; whatever
    // that read hands out meanwhile stays pending under this consumer's name.
    Ok(())
}

/// Reads the streams of one Redis shard.
struct Reader {
    client: Client,
    streams: Vec<Stream>,
    group: String,
    consumer: String,
    batch: u64,
    claim_idle_ms: u64,
    output: Arc<Output>,
}

impl Reader {
    /// Consumes until `stop`, starting over after Redis errors.
    async fn run(self, stop: CancellationToken) {
        while let Err(error) = self.consume(&stop).await {
            warn!(message = "reading failed; retrying", error = %format!("{error:#}"));
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RETRY_DELAY) => {}
            }
        }
    }

    async fn consume(&self, stop: &CancellationToken) -> anyhow::Result<()> {
        self.create_groups().await?;
        let recover_every = Duration::from_millis(self.claim_idle_ms);
        // Wake up at least as often as recovery is due; BLOCK 0 would mean forever.
        let block_ms = self.claim_idle_ms.clamp(100, 5_000);
        let mut recovered_at: Option<Instant> = None;
        loop {
            if recovered_at.is_none_or(|t| t.elapsed() >= recover_every) {
                self.recover(stop).await?;
                recovered_at = Some(Instant::now());
            }
            let reply = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                reply = self.read(">", Some(block_ms)) => reply?,
            };
            self.process(reply).await?;
        }
    }

    async fn create_groups(&self) -> anyhow::Result<()> {
        for stream in &self.streams {
            // From `0`: a new group starts with all the stream still holds. MKSTREAM: the stream
            // need not exist yet (no device has reported, no alert has fired).
            let created: Result<(), Error> = self
                .client
                .xgroup_create(&stream.key, &self.group, "0", true)
                .await;
            match created {
                // The group exists: keep its position.
                Err(e) if e.details().contains("BUSYGROUP") => {}
                other => {
                    other.with_context(|| format!("XGROUP CREATE {}", stream.key))?;
                }
            }
        }
        Ok(())
    }

    /// Processes what was handed out but never acknowledged: first this consumer's own pending
    /// records (read before a crash), then those other consumers left idle for
    /// `--claim-idle-ms` (they are presumed dead; their records are taken over).
    async fn recover(&self, stop: &CancellationToken) -> anyhow::Result<()> {
        // ID `0` reads this consumer's pending list instead of new records; each pass
        // acknowledges what it read, so the list empties.
        while !stop.is_cancelled() {
            let reply = self.read("0", None).await?;
            if self.process(reply).await? == 0 {
                break;
            }
        }
        for stream in &self.streams {
            let mut cursor = "0-0".to_owned();
            while !stop.is_cancelled() {
                // [next cursor, entries, IDs of trimmed entries dropped from the pending list
                // (Redis 7)]; Redis 6.2 lists those as nil entries instead.
                let mut reply: Vec<RedisValue> = self
                    .client
                    .xautoclaim(
                        &stream.key,
                        &self.group,
                        &self.consumer,
                        self.claim_idle_ms,
                        cursor.as_str(),
                        Some(self.batch),
                        false,
                    )
                    .await
                    .with_context(|| format!("XAUTOCLAIM {}", stream.key))?;
                reply.truncate(2);
                let (Some(entries), Some(next)) = (reply.pop(), reply.pop()) else {
                    anyhow::bail!("XAUTOCLAIM {}: short reply", stream.key);
                };
                let next: String = next.convert()?;
                let entries: Entries = entries.flatten_array_values(1).convert()?;
                let claimed = entries.len();
                self.process(vec![(stream, entries)]).await?;
                if claimed > 0 {
                    info!(message = "took over pending records", stream = %stream.key, claimed);
                }
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }

    /// `XREADGROUP` on every stream of this shard from `id` (`>`: new records, `0`: own pending).
    async fn read(
        &self,
        id: &str,
        block_ms: Option<u64>,
    ) -> anyhow::Result<Vec<(&Stream, Entries)>> {
        let keys: Vec<&str> = self.streams.iter().map(|s| s.key.as_str()).collect();
        let ids = vec![id; keys.len()];
        // Read as a plain value: fred's ready-made map types refuse the nils Redis sends for
        // a BLOCK that timed out and for pending entries trimmed away.
        let reply: RedisValue = self
            .client
            .xreadgroup(
                &self.group,
                &self.consumer,
                Some(self.batch),
                block_ms,
                false,
                keys,
                ids,
            )
            .await
            .with_context(|| format!("XREADGROUP {id}"))?;
        let mut by_key: HashMap<String, Entries> = if reply.is_null() {
            HashMap::new()
        } else {
            reply.flatten_array_values(2).convert()?
        };
        Ok(self
            .streams
            .iter()
            .filter_map(|s| by_key.remove(&s.key).map(|entries| (s, entries)))
            .collect())
    }

    /// Writes the records, and only then acknowledges them. In this order a crash in between
    /// costs a duplicate (the records stay pending and are processed again); the other order
    /// would lose them. Returns how many entries it handled.
    async fn process(&self, batches: Vec<(&Stream, Entries)>) -> anyhow::Result<usize> {
        let lines: Vec<String> = batches
            .iter()
            .flat_map(|(stream, entries)| {
                entries
                    .iter()
                    .filter_map(|(id, fields)| line(stream, id, fields.as_ref()))
            })
            .collect();
        if !lines.is_empty() {
            let output = self.output.clone();
            // fsync blocks: keep it off the async threads.
            tokio::task::spawn_blocking(move || output.write(&lines))
                .await?
                .context("write the output")?;
        }
        let mut handled = 0;
        for (stream, entries) in &batches {
            if entries.is_empty() {
                continue;
            }
            let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
            let _: u64 = self.client.xack(&stream.key, &self.group, ids).await?;
            handled += entries.len();
        }
        Ok(handled)
    }
}

/// The output line of one record; `None` for an entry the stream trimmed (`MAXLEN`) while it
/// was pending: nothing is left of it to process.
fn line(stream: &Stream, id: &str, fields: Option<&HashMap<String, String>>) -> Option<String> {
    let Some(fields) = fields else {
        warn!(message = "record trimmed from the stream before it was processed", stream = %stream.key, id);
        return None;
    };
    // A value that is not JSON is kept as text rather than dropped.
    let json_field = |name: &str| {
        fields.get(name).map(|text| {
            serde_json::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.clone()))
        })
    };
    let record = match stream.kind {
        Kind::Telemetry => json!({
            "stream": stream.key,
            "id": id,
            "device": fields.get("device"),
            "msgid": fields.get("msgid"),
            "kind": fields.get("kind"),
            "ts": fields.get("ts").and_then(|t| t.parse::<i64>().ok()),
            "payload": json_field("payload"),
        }),
        Kind::Alerts => {
            let alert = json_field("a");
            json!({
                "stream": stream.key,
                "id": id,
                "device": alert.as_ref().and_then(|a| a.get("device")),
                // An alert has no msgid; its own `id` repeats when it resolves, so dedupe on the
                // entry `id`.
                "msgid": null,
                "payload": alert,
            })
        }
    };
    Some(record.to_string())
}

/// Where processed records go: the stand-in for the MES database.
struct Output {
    inner: Mutex<Written>,
    exit_after: Option<u64>,
}

struct Written {
    file: BufWriter<File>,
    records: u64,
}

impl Output {
    fn open(path: &Path, exit_after: Option<u64>) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        Ok(Self {
            inner: Mutex::new(Written {
                file: BufWriter::new(file),
                records: 0,
            }),
            exit_after,
        })
    }

    /// Appends `lines` and returns once they are on disk: the caller acknowledges them next.
    fn write(&self, lines: &[String]) -> std::io::Result<()> {
        // A panic while holding the lock leaves nothing half-done that matters here: lines not
        // synced are not acknowledged.
        let mut w = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        for line in lines {
            writeln!(w.file, "{line}")?;
            w.records += 1;
            if Some(w.records) == self.exit_after {
                w.file.flush()?;
                w.file.get_ref().sync_data()?;
                std::process::exit(CRASH_EXIT_CODE);
            }
        }
        w.file.flush()?;
        w.file.get_ref().sync_data()
    }
}

/// Each shard's streams: telemetry partition `p` lives on the shard the bus's hash ring gives
/// `telemetry:<p>`, the alerts stream on shard 0.
async fn place_streams(args: &Args) -> anyhow::Result<Vec<Vec<Stream>>> {
    let mut shards: Vec<Vec<Stream>> = args.redis_urls.iter().map(|_| Vec::new()).collect();
    if args.streams.contains(&Kind::Telemetry) {
        let homes = partition_shards(&args.redis_urls, args.partitions.max(1));
        for (p, shard) in homes.into_iter().enumerate() {
            shards[shard].push(Stream {
                key: format!("{}tm:{p}", args.prefix),
                kind: Kind::Telemetry,
            });
        }
    }
    if args.streams.contains(&Kind::Alerts) {
        shards[0].push(Stream {
            key: format!("{}alerts", args.prefix),
            kind: Kind::Alerts,
        });
    }
    Ok(shards)
}

/// The shard of each telemetry partition: the bus places partition `p` by the key
/// `telemetry:<p>` on its consistent-hash ring.
fn partition_shards(urls: &[String], partitions: u32) -> Vec<usize> {
    (0..partitions)
        .map(|p| shard_of(&format!("telemetry:{p}"), urls.len()))
        .collect()
}

fn default_consumer() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "consumer".to_owned());
    format!("{host}-{}", std::process::id())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r?,
    }
    Ok(())
}
