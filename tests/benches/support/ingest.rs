//! Status ingest throughput: M devices send status frames as fast as the socket takes them,
//! QoS 0 (counted server-side from `/metrics`) or QoS 1 with a window of unacknowledged
//! messages per device (counted from the acks).
//!
//! Split in two so that a caller can read other counters (Redis's) between the connected,
//! idle fleet and the traffic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Barrier;

use super::device::{self, Unexpected, Ws};
use super::node::{Node, cpu_of, machine_busy};

/// Sessions open on the node (authenticated).
pub const ACTIVE: &str = "fleetgate_connections_active";
/// Status frames the node accepted (stored in the bus).
pub const STATUS_RECEIVED: &str = "fleetgate_messages_received_total{kind=\"status\"}";

/// What one ingest run sends.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// 0 or 1.
    pub qos: u8,
    /// Devices sending at once.
    pub devices: usize,
    /// Messages in all (rounded up to a multiple of `devices`).
    pub messages: usize,
    /// QoS 1: unacknowledged messages per device.
    pub window: usize,
    /// Provisioning and connecting: requests in flight.
    pub concurrency: usize,
}

/// Devices connected and authenticated, their frames encoded, nothing sent yet.
pub struct Prepared {
    load: Load,
    sockets: Vec<Ws>,
    frames: Vec<Vec<String>>,
    total: usize,
}

/// Results of one ingest run.
#[derive(Debug)]
pub struct IngestRun {
    /// Messages sent (and, when the run succeeded, counted by the server).
    pub messages: usize,
    /// QoS 0: server-counted msg/s; QoS 1: acked msg/s.
    pub rate: f64,
    /// Server CPU (user + sys) per message.
    pub cpu_per_msg: Duration,
    /// Server CPU over `wall`.
    pub node_cpu: Duration,
    /// Until every frame was written by the client.
    pub client_send: Duration,
    /// From the start of the traffic until the server counted everything.
    pub wall: Duration,
    /// CPU of this process (the devices) over `wall`.
    pub client_cpu: Duration,
    /// Busy CPU of the whole machine over `wall`.
    pub machine_cpu: Duration,
    /// Error frames or closed sockets, if any.
    pub note: Option<String>,
}

/// Provisions and connects `load.devices` devices named after `tag` and encodes their frames.
pub async fn prepare(node: &Node, load: Load, tag: &str) -> anyhow::Result<Prepared> {
    let m = load.devices;
    let per = load.messages.div_ceil(m);
    // Small read buffer as for idle devices, a 64 KiB write buffer so frames go out in batches.
    let (ids, sockets) = device::fleet(
        node,
        &format!("q{}-{tag}", load.qos),
        m,
        load.concurrency,
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
                .map(|s| device::status_frame(id, &format!("r{tag}-{s}"), load.qos, s as u64))
                .collect()
        })
        .collect();
    Ok(Prepared {
        load,
        sockets,
        frames,
        total: per * m,
    })
}

impl Prepared {
    /// Messages this run sends.
    pub fn messages(&self) -> usize {
        self.total
    }

    /// Sends everything and returns once the server counted every message (QoS 0) or every
    /// message was answered (QoS 1).
    pub async fn run(self, node: &Node) -> anyhow::Result<IngestRun> {
        let Prepared {
            load,
            sockets,
            frames,
            total,
        } = self;
        let (qos, m) = (load.qos, load.devices);
        let base = node.metrics().await?.count(STATUS_RECEIVED);
        let unexpected = Arc::new(Unexpected::default());
        let acked = Arc::new(AtomicU64::new(0));
        let barrier = Arc::new(Barrier::new(m + 1));
        let mut tasks = Vec::new();
        for (ws, frames) in sockets.into_iter().zip(frames) {
            let (barrier, unexpected, acked, window) = (
                barrier.clone(),
                unexpected.clone(),
                acked.clone(),
                load.window,
            );
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                if qos == 0 {
                    let held = device::send_qos0(ws, frames, 64, unexpected).await?;
                    Ok::<_, anyhow::Error>((Instant::now(), Instant::now(), Some(held)))
                } else {
                    let (ws, last) =
                        device::send_qos1(ws, frames, window, unexpected, acked).await?;
                    drop(ws);
                    Ok((Instant::now(), last, None))
                }
            }));
        }
        let cpu0 = [node.cpu()?, cpu_of("self")?, machine_busy()?];
        barrier.wait().await;
        let t0 = Instant::now();
        let deadline = Duration::from_secs(120);
        let counted = node
            .wait_metric(STATUS_RECEIVED, (base + total as u64) as f64, deadline)
            .await;
        let wall = t0.elapsed();
        let cpu1 = [node.cpu()?, cpu_of("self")?, machine_busy()?];
        let [cpu, client_cpu, machine_cpu] =
            std::array::from_fn(|i| cpu1[i].saturating_sub(cpu0[i]));
        let mut sent_at = t0;
        let mut last_ack = t0;
        // QoS 0 sockets stay open until the server counted everything, then close with the run.
        let mut held = Vec::new();
        for t in tasks {
            let (sent, last, h) = tokio::time::timeout(deadline, t)
                .await
                .context("device task did not finish")???;
            sent_at = sent_at.max(sent);
            last_ack = last_ack.max(last);
            held.extend(h);
        }
        let counted = counted
            .with_context(|| format!("server counted less than the {total} messages sent"))?;
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
        drop(held);
        Ok(IngestRun {
            messages: total,
            rate,
            cpu_per_msg: cpu / total as u32,
            node_cpu: cpu,
            client_send: sent_at.duration_since(t0),
            wall,
            client_cpu,
            machine_cpu,
            note,
        })
    }
}
