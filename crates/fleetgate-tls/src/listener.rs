//! The listener axum serves: plain TCP, or TLS with handshakes done off the accept loop.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::stream::TlsStream;
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::cert::ClientCert;
use crate::config::ServerTls;
use crate::metrics::TlsMetrics;

/// Who is on the other end of a connection. Handlers take it as `ConnectInfo<Peer>`.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The TCP peer's address.
    pub addr: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The client certificate the handshake verified, if one was presented.
    pub client_cert: Option<Arc<ClientCert>>,
}

impl Connected<IncomingStream<'_, Acceptor>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Acceptor>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A connection's byte stream: plain or TLS.
#[derive(Debug)]
pub enum Io {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP; boxed because rustls' connection state is large and most of a plain
    /// node's connections would carry the size of the biggest variant.
    Tls(Box<TlsStream>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Limits on handshakes in progress.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// A client that has not finished its handshake by then is dropped.
    pub timeout: Duration,
    /// Handshakes in progress at once; a connection beyond it is closed at once, before any
    /// cryptography, so a flood of half-open handshakes costs a socket accept each.
    pub max_in_progress: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_in_progress: 1024,
        }
    }
}

enum Inner {
    Plain(TcpListener),
    Tls {
        done: mpsc::Receiver<(Io, Peer)>,
        _accepting: AbortOnDrop,
    },
}

/// Decides at accept whether a peer address gets any further: `false` closes the
/// connection at once, before HTTP or a TLS handshake.
pub type Gate = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// A listening socket for `axum::serve`: sets `TCP_NODELAY` on every connection and, for
/// TLS, hands over connections whose handshake completed.
pub struct Acceptor {
    local: SocketAddr,
    inner: Inner,
    gate: Arc<OnceLock<Gate>>,
}

fn admitted(gate: &OnceLock<Gate>, addr: SocketAddr) -> bool {
    gate.get().is_none_or(|gate| gate(addr.ip()))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// axum leaves Nagle on. A session writing a second small frame (the ack of a device's next
/// message) while the first is unacknowledged would wait for the peer's delayed ACK, ~40 ms.
fn no_delay(tcp: &TcpStream) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(message = "TCP_NODELAY refused", %error);
    }
}

impl Acceptor {
    /// Plain TCP.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn plain(listener: TcpListener) -> std::io::Result<Self> {
        Ok(Self {
            local: listener.local_addr()?,
            inner: Inner::Plain(listener),
            gate: Arc::default(),
        })
    }

    /// Closes connections from addresses `gate` refuses, right after accept (a later call
    /// is ignored).
    pub fn set_gate(&self, gate: Gate) {
        let _ = self.gate.set(gate);
    }

    /// TLS with `tls`'s current config at each handshake. Must be called inside a Tokio
    /// runtime: the accept loop runs as its own task.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn tls(
        listener: TcpListener,
        tls: Arc<ServerTls>,
        limits: HandshakeLimits,
        metrics: TlsMetrics,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        // Completed handshakes wait here for axum's accept; small, as axum accepts promptly.
        let (tx, done) = mpsc::channel(64);
        let gate: Arc<OnceLock<Gate>> = Arc::default();
        let accepting = tokio::spawn(accept_loop(
            listener,
            tls,
            limits,
            metrics,
            tx,
            gate.clone(),
        ));
        Ok(Self {
            local,
            inner: Inner::Tls {
                done,
                _accepting: AbortOnDrop(accepting),
            },
            gate,
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    limits: HandshakeLimits,
    metrics: TlsMetrics,
    tx: mpsc::Sender<(Io, Peer)>,
    gate: Arc<OnceLock<Gate>>,
) {
    let in_progress = Arc::new(Semaphore::new(limits.max_in_progress));
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                accept_failed(&error).await;
                continue;
            }
        };
        if !admitted(&gate, addr) {
            continue;
        }
        let Ok(permit) = in_progress.clone().try_acquire_owned() else {
            metrics.handshake_failed(tls.name(), "busy");
            continue;
        };
        no_delay(&tcp);
        let config = tls.config();
        let tx = tx.clone();
        let metrics = metrics.clone();
        let name = tls.name().to_owned();
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(limits.timeout, TlsStream::accept(tcp, config)).await;
            drop(permit);
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(message = "TLS handshake failed", peer = %addr, %error);
                    metrics.handshake_failed(&name, "refused");
                    return;
                }
                Err(_) => {
                    metrics.handshake_failed(&name, "timeout");
                    return;
                }
            };
            metrics.handshake_done(&name);
            let client_cert = stream
                .state()
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| ClientCert::from_der(leaf.as_ref()))
                .map(Arc::new);
            let peer = Peer {
                addr,
                tls: true,
                client_cert,
            };
            let _ = tx.send((Io::Tls(Box::new(stream)), peer)).await;
        });
    }
}

/// Out of file descriptors (or another transient accept error): wait a moment rather than
/// spin, as axum's own listener does.
async fn accept_failed(error: &std::io::Error) {
    tracing::warn!(message = "accept failed", %error);
    tokio::time::sleep(Duration::from_millis(50)).await;
}

impl Listener for Acceptor {
    type Io = Io;
    type Addr = Peer;

    async fn accept(&mut self) -> (Io, Peer) {
        match &mut self.inner {
            Inner::Plain(listener) => loop {
                match TcpListener::accept(listener).await {
                    Ok((_, addr)) if !admitted(&self.gate, addr) => continue,
                    Ok((tcp, addr)) => {
                        no_delay(&tcp);
                        let peer = Peer {
                            addr,
                            tls: false,
                            client_cert: None,
                        };
                        return (Io::Plain(tcp), peer);
                    }
                    Err(error) => accept_failed(&error).await,
                }
            },
            Inner::Tls { done, .. } => match done.recv().await {
                Some(accepted) => accepted,
                // The accept loop never ends on its own; it is gone only when aborted, and
                // then so is this listener.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer {
            addr: self.local,
            tls: matches!(self.inner, Inner::Tls { .. }),
            client_cert: None,
        })
    }
}
