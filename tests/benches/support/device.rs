//! Cheap device clients: a plain `TcpStream` (no TLS wrapper) under tokio-tungstenite with a
//! small read buffer, first-frame auth, the QoS 0 / QoS 1 senders, and a device that answers
//! commands.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{FutureExt, SinkExt, StreamExt, TryStreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::node::Node;

/// A device socket.
pub type Ws = WebSocketStream<TcpStream>;

/// Upper bound for one connect + auth.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);

/// Client socket settings: `read_buffer_bytes` is allocated eagerly per socket (tungstenite's
/// default is 128 KiB); `write_buffer_bytes` 0 writes each frame at once, larger batches
/// frames until a flush.
pub fn config(read_buffer_bytes: usize, write_buffer_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer_bytes)
        .write_buffer_size(write_buffer_bytes)
}

/// Opens `ws://{gateway}/v1/device` and authenticates with the first frame; returns once
/// the server answered `auth_response` success.
pub async fn connect_authed(
    gateway: &str,
    id: &str,
    secret: &str,
    cfg: WebSocketConfig,
) -> anyhow::Result<Ws> {
    tokio::time::timeout(CONNECT_DEADLINE, async {
        let tcp = TcpStream::connect(gateway)
            .await
            .with_context(|| format!("{id}: TCP connect to {gateway}"))?;
        tcp.set_nodelay(true)?;
        let url = format!("ws://{gateway}/v1/device");
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(url.as_str(), tcp, Some(cfg))
            .await
            .with_context(|| format!("{id}: WebSocket upgrade"))?;
        ws.send(Message::text(
            json!({"type":"auth","deviceId":id,"token":secret}).to_string(),
        ))
        .await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t)?;
                    if v["type"] == "auth_response" && v["status"] == "success" {
                        return Ok(ws);
                    }
                    bail!("{id}: auth answered {v}");
                }
                Some(Ok(Message::Close(f))) => bail!("{id}: closed during auth: {f:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("{id}: during auth: {e}"),
                None => bail!("{id}: socket ended during auth"),
            }
        }
    })
    .await
    .with_context(|| format!("{id}: connect + auth took longer than {CONNECT_DEADLINE:?}"))?
}

/// Opens a TCP connection and nothing else (the server's HTTP/1 connection waits for a request).
pub async fn connect_tcp(gateway: &str) -> anyhow::Result<TcpStream> {
    let tcp = tokio::time::timeout(CONNECT_DEADLINE, TcpStream::connect(gateway))
        .await
        .context("TCP connect timed out")??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Opens `ws://{gateway}/v1/device` and stops there: the server waits for the auth frame.
pub async fn connect_unauthed(gateway: &str, cfg: WebSocketConfig) -> anyhow::Result<Ws> {
    tokio::time::timeout(CONNECT_DEADLINE, async {
        let tcp = connect_tcp(gateway).await?;
        let url = format!("ws://{gateway}/v1/device");
        let (ws, _) = tokio_tungstenite::client_async_with_config(url.as_str(), tcp, Some(cfg))
            .await
            .context("WebSocket upgrade")?;
        Ok(ws)
    })
    .await
    .context("upgrade timed out")?
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A status envelope as sent on the wire (an IIoT reading, ~230 bytes).
pub fn status_frame(device: &str, msgid: &str, qos: u8, seq: u64) -> String {
    json!({
        "ver":"1.0","msgid":msgid,"timestamp":now_ms(),"from":device,"to":"server","type":"status",
        "payload":{"values":[
            {"tag":"temperature","value":20.0 + (seq % 100) as f64 / 10.0,"unit":"C"},
            {"tag":"pressure","value":101.3,"unit":"kPa"}
        ],"quality":"good"},
        "qos":qos
    })
    .to_string()
}

/// What the server sent devices besides what the test waits for.
#[derive(Debug, Default)]
pub struct Unexpected {
    /// `error` frames (a message refused).
    pub errors: AtomicU64,
    /// Sockets the server closed or that failed mid-run.
    pub closed: AtomicU64,
    /// One example, for the report.
    pub example: std::sync::Mutex<Option<String>>,
}

impl Unexpected {
    fn note(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut ex = self.example.lock().unwrap_or_else(|e| e.into_inner());
        if ex.is_none() {
            *ex = Some(what);
        }
    }
}

/// Sends `frames` as fast as the socket takes them, flushing every `batch` frames. The socket
/// is returned (still open) so that the caller closes it only after the server counted
/// everything; a reader task notes error frames and closes in `unexpected`.
pub async fn send_qos0(
    ws: Ws,
    frames: Vec<String>,
    batch: usize,
    unexpected: Arc<Unexpected>,
) -> anyhow::Result<(
    futures_util::stream::SplitSink<Ws, Message>,
    tokio::task::JoinHandle<()>,
)> {
    let (mut sink, mut stream) = ws.split();
    let reader = tokio::spawn(async move {
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(Message::Text(t)) => unexpected.note(&unexpected.errors, t.to_string()),
                Ok(Message::Close(f)) => {
                    unexpected.note(&unexpected.closed, format!("close {f:?}"));
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    unexpected.note(&unexpected.closed, format!("read error {e}"));
                    return;
                }
            }
        }
    });
    let mut n = 0;
    for f in frames {
        sink.feed(Message::text(f)).await?;
        n += 1;
        if n % batch == 0 {
            sink.flush().await?;
        }
    }
    sink.flush().await?;
    Ok((sink, reader))
}

/// Sends `frames` with QoS 1 keeping at most `window` unacknowledged; returns when every frame
/// was answered (ack or error) with the time of the last answer.
pub async fn send_qos1(
    ws: Ws,
    frames: Vec<String>,
    window: usize,
    unexpected: Arc<Unexpected>,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<(Ws, Instant)> {
    let total = frames.len() as u64;
    let credit = Arc::new(Semaphore::new(window));
    let (mut sink, mut stream) = ws.split();
    let reader = {
        let credit = credit.clone();
        tokio::spawn(async move {
            let mut answered = 0u64;
            let mut last = Instant::now();
            while answered < total {
                match stream.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                        if v["type"] == "ack" {
                            acked.fetch_add(1, Ordering::Relaxed);
                        } else {
                            unexpected.note(&unexpected.errors, t.to_string());
                        }
                        answered += 1;
                        last = Instant::now();
                        credit.add_permits(1);
                    }
                    Some(Ok(Message::Close(f))) => {
                        unexpected.note(&unexpected.closed, format!("close {f:?}"));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        unexpected.note(&unexpected.closed, format!("read error {e}"));
                        break;
                    }
                    None => break,
                }
            }
            (stream, last, answered)
        })
    };
    for f in frames {
        match credit.clone().try_acquire_owned() {
            Ok(p) => p.forget(),
            Err(_) => {
                // The window is full: push what is buffered, then wait for an answer.
                sink.flush().await?;
                credit.acquire().await?.forget();
            }
        }
        sink.feed(Message::text(f)).await?;
    }
    sink.flush().await?;
    let (stream, last, answered) = reader.await?;
    if answered < total {
        bail!("socket ended after {answered} of {total} answers");
    }
    let ws = stream
        .reunite(sink)
        .map_err(|_| anyhow::anyhow!("reunite"))?;
    Ok((ws, last))
}

/// Provisions and connects `n` devices named `{prefix}-{i}`; returns IDs and sockets in order.
pub async fn fleet(
    node: &Node,
    prefix: &str,
    n: usize,
    concurrency: usize,
    cfg: WebSocketConfig,
) -> anyhow::Result<(Vec<String>, Vec<Ws>)> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:06}")).collect();
    let secrets = node.provision_all(&ids, concurrency).await?;
    let gateway = node.gateway.clone();
    let sockets: Vec<Ws> =
        futures_util::stream::iter(ids.iter().zip(&secrets).map(|(id, secret)| {
            let gateway = gateway.clone();
            async move { connect_authed(&gateway, id, secret, cfg).await }
        }))
        .buffered(concurrency)
        .try_collect()
        .await?;
    Ok((ids, sockets))
}

/// When each command (by the `seq` in its payload) first reached a device.
#[derive(Debug)]
pub struct Receipts {
    base: Instant,
    /// Nanoseconds since `base`, plus one; 0 = not (yet) received.
    at: Vec<AtomicU64>,
}

impl Receipts {
    /// Room for `seq` 0..n.
    pub fn new(n: usize) -> Self {
        Self {
            base: Instant::now(),
            at: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Notes the first arrival of `seq`; later ones (redeliveries) keep the first time.
    fn record(&self, seq: u64) {
        if let Some(slot) = usize::try_from(seq).ok().and_then(|i| self.at.get(i)) {
            let ns = self.base.elapsed().as_nanos() as u64 + 1;
            let _ = slot.compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// When `seq` first arrived, if it did.
    pub fn get(&self, seq: usize) -> Option<Instant> {
        match self.at.get(seq)?.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.base + Duration::from_nanos(ns - 1)),
        }
    }
}

/// What answering devices saw.
#[derive(Debug, Default)]
pub struct Answered {
    /// Command frames received, redeliveries included.
    pub commands: AtomicU64,
    /// Of those, frames marked `dup` (the gateway retransmitted: no ack within its timeout).
    pub dups: AtomicU64,
    /// Anything else that arrived.
    pub unexpected: Unexpected,
}

/// Plays a device that answers every command with an `ack` carrying
/// `payload: {"result": {"seq": <payload.seq>}}`, until the socket ends. Acks for commands that
/// arrived together go out in one flush.
pub async fn answer_commands(
    ws: Ws,
    receipts: Arc<Receipts>,
    answered: Arc<Answered>,
) -> anyhow::Result<()> {
    let (mut sink, mut stream) = ws.split();
    while let Some(first) = stream.next().await {
        let mut msg = Some(first);
        while let Some(m) = msg.take() {
            match m {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    if v["type"] == "command" {
                        answered.commands.fetch_add(1, Ordering::Relaxed);
                        if v["dup"] == true {
                            answered.dups.fetch_add(1, Ordering::Relaxed);
                        }
                        let seq = v["payload"]["seq"].as_u64();
                        if let Some(seq) = seq {
                            receipts.record(seq);
                        }
                        let ack = json!({"type":"ack","msgid":v["msgid"],"payload":{"result":{"seq":seq}}});
                        sink.feed(Message::text(ack.to_string())).await?;
                    } else {
                        answered
                            .unexpected
                            .note(&answered.unexpected.errors, t.to_string());
                    }
                }
                Ok(Message::Close(f)) => {
                    answered
                        .unexpected
                        .note(&answered.unexpected.closed, format!("close {f:?}"));
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => {
                    answered
                        .unexpected
                        .note(&answered.unexpected.closed, format!("read error {e}"));
                    return Ok(());
                }
            }
            // Whatever else already arrived is answered in the same flush.
            msg = stream.next().now_or_never().flatten();
        }
        sink.flush().await?;
    }
    Ok(())
}
