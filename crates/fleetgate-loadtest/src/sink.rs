//! The reference ceiling: a WebSocket server that accepts, reads and discards, with no auth
//! and no bus. Run by the same scenarios, it shows what this machine's kernel and the harness
//! can do at all, so gateway figures can be quoted as a fraction of it.
//!
//! Its only protocol knowledge is one canned `auth_response` after the upgrade (so the device
//! SDK, which waits for it, runs unchanged), echoing the offered subprotocol, and an `ack` for
//! each QoS 1 JSON frame (parsed as a plain gateway would, stored nowhere), so QoS 1 scenarios
//! compare CPU per message against a server that does the least any gateway must.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, http::HeaderValue};

use crate::tally::now_ms;

/// Counts the sink keeps.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Data frames read.
    pub frames: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Upgrades accepted.
    pub accepted: AtomicU64,
}

/// Binds a listener with a deep accept queue, as the gateway's.
///
/// # Errors
/// Bind errors.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(8192)
}

/// Serves WebSocket connections on `ws` and `/metrics` on `metrics` until the process ends.
///
/// # Errors
/// When the metrics listener fails.
pub async fn serve(ws: TcpListener, metrics: TcpListener) -> anyhow::Result<()> {
    let stats = Arc::new(SinkStats::default());
    let s = stats.clone();
    tokio::spawn(async move {
        loop {
            match ws.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, s.clone()));
                }
                // Out of files or similar: keep serving the connections we have.
                Err(e) => {
                    eprintln!("sink: accept: {e}");
                    tokio::task::yield_now().await;
                }
            }
        }
    });
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let s = stats.clone();
            async move { page(&s) }
        }),
    );
    axum::serve(metrics, app).await.context("metrics listener")
}

async fn connection(stream: TcpStream, stats: Arc<SinkStats>) {
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0);
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, echo_subprotocol, Some(config))
            .await
    else {
        return;
    };
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    stats.open.fetch_add(1, Ordering::Relaxed);
    let welcome = format!(
        r#"{{"type":"auth_response","status":"success","timestamp":{},"sessionId":"sink","heartbeatMs":30000}}"#,
        now_ms()
    );
    if ws.send(Message::text(welcome)).await.is_ok() {
        while let Some(Ok(msg)) = ws.next().await {
            match msg {
                Message::Text(text) => {
                    stats.frames.fetch_add(1, Ordering::Relaxed);
                    if let Some(ack) = ack_for(text.as_bytes())
                        && ws.send(Message::text(ack)).await.is_err()
                    {
                        break;
                    }
                }
                Message::Binary(_) => {
                    stats.frames.fetch_add(1, Ordering::Relaxed);
                }
                Message::Close(_) => break,
                // tungstenite answers pings itself.
                _ => {}
            }
        }
    }
    stats.open.fetch_sub(1, Ordering::Relaxed);
}

/// The fields of a device frame the sink looks at.
#[derive(serde::Deserialize)]
struct Probe<'a> {
    #[serde(borrow)]
    msgid: Option<std::borrow::Cow<'a, str>>,
    qos: Option<u8>,
}

/// The `ack` a QoS 1 frame is owed; `None` for anything else.
fn ack_for(frame: &[u8]) -> Option<String> {
    let probe: Probe<'_> = serde_json::from_slice(frame).ok()?;
    let msgid = probe.msgid.filter(|_| probe.qos == Some(1))?;
    Some(serde_json::json!({"type": "ack", "msgid": msgid}).to_string())
}

/// Accepts the first subprotocol the client offers, as a server that speaks it would.
// The error type is tungstenite's, fixed by its callback signature.
#[allow(clippy::result_large_err)]
fn echo_subprotocol(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    let first = req
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
        .and_then(|v| HeaderValue::from_str(v).ok());
    if let Some(p) = first {
        resp.headers_mut().insert("sec-websocket-protocol", p);
    }
    Ok(resp)
}

fn page(s: &SinkStats) -> String {
    let mut out = format!(
        "# TYPE sink_messages_received_total counter\nsink_messages_received_total {}\n\
         # TYPE sink_connections_active gauge\nsink_connections_active {}\n\
         # TYPE sink_connections_total counter\nsink_connections_total {}\n",
        s.frames.load(Ordering::Relaxed),
        s.open.load(Ordering::Relaxed),
        s.accepted.load(Ordering::Relaxed),
    );
    // The same memory figure the gateway exports, so per-connection cost compares directly.
    if let Some(rss) = resident_bytes() {
        out.push_str(&format!(
            "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}\n"
        ));
    }
    if let Some(cpu) = cpu_seconds() {
        out.push_str(&format!(
            "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n"
        ));
    }
    out
}

/// CPU time used so far (user + system), from `/proc/self/stat`, whose times are in
/// `USER_HZ` = 100 ticks per second on Linux whatever the kernel's own tick.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces: the fields counted here follow its closing ')'.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Resident memory: `VmRSS` of `/proc/self/status` (Linux), in bytes.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_qos_1_frames_are_acked() {
        let ack = ack_for(br#"{"type":"status","msgid":"m\"1","qos":1,"payload":{}}"#).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&ack).unwrap(),
            serde_json::json!({"type": "ack", "msgid": "m\"1"})
        );
        assert_eq!(ack_for(br#"{"type":"status","msgid":"m1","qos":0}"#), None);
        assert_eq!(ack_for(b"not json"), None);
    }

    #[test]
    fn own_cpu_time_is_read() {
        assert!(cpu_seconds().is_some());
    }
}
