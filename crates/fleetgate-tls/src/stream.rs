//! A server-side TLS stream over rustls' unbuffered API.
//!
//! Written by hand because the buffered `ServerConnection` (what tokio-rustls wraps) keeps its
//! incoming-record buffer at 4 KiB or more for the life of the connection, and a gateway's
//! connections are idle nearly all the time: with 19,000 devices that buffer was more than
//! half of what TLS cost per device (BENCHMARKS.md). Here ciphertext and plaintext buffers
//! exist only while they hold bytes: an idle connection keeps rustls' state and no buffer.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use rustls::{CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes read from the socket at a time (on the stack, then appended to `incoming`).
const READ_SIZE: usize = 8 * 1024;
/// Most plaintext encrypted per write call: one full record.
const MAX_WRITE: usize = 16 * 1024;
/// Past this much unsent ciphertext, writes wait for the socket.
const HIGH_WATER: usize = 64 * 1024;

/// A TLS connection accepted on a listener.
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Ciphertext received and not yet processed: a partial record, or records the reader has
    /// not asked for yet.
    incoming: Vec<u8>,
    /// Ciphertext to send, from `out_sent` on.
    outgoing: Vec<u8>,
    out_sent: usize,
    /// Decrypted bytes the reader has not taken yet, from `plain_read` on.
    plain: Vec<u8>,
    plain_read: usize,
    /// The peer closed (close_notify, or the socket ended).
    read_closed: bool,
    /// We queued our close_notify.
    close_sent: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("tcp", &self.tcp)
            .field("incoming", &self.incoming.len())
            .field("outgoing", &(self.outgoing.len() - self.out_sent))
            .field("plain", &(self.plain.len() - self.plain_read))
            .field("read_closed", &self.read_closed)
            .field("close_sent", &self.close_sent)
            .finish_non_exhaustive()
    }
}

/// Where [`TlsStream::process`] stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The handshake needs more bytes from the peer.
    Blocked,
    /// Application data can flow; nothing more to process without new bytes.
    Open,
    /// Both sides closed.
    Closed,
}

fn tls_error(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// Appends what `write` produces to `out`, growing it to the size rustls asks for.
fn append<E>(
    out: &mut Vec<u8>,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needed: impl Fn(&E) -> Option<usize>,
) -> io::Result<()>
where
    E: std::fmt::Debug,
{
    let start = out.len();
    let mut room = 512;
    loop {
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match needed(&e) {
                Some(required) if required > room => room = required,
                _ => {
                    out.truncate(start);
                    return Err(io::Error::other(format!("TLS encoding failed: {e:?}")));
                }
            },
        }
    }
}

fn encode_needed(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encrypt_needed(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

impl TlsStream {
    /// Runs the server handshake on `tcp`.
    ///
    /// # Errors
    /// The peer's or rustls' error, or `UnexpectedEof` if the peer left mid-handshake.
    pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut s = Self {
            tcp,
            conn,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            out_sent: 0,
            plain: Vec::new(),
            plain_read: 0,
            read_closed: false,
            close_sent: false,
        };
        loop {
            let stop = s.process(None)?;
            std::future::poll_fn(|cx| s.poll_send(cx)).await?;
            // TLS 1.3 lets the server send before the client's Finished: the handshake (and a
            // client certificate's verification) is only over once rustls says so.
            match stop {
                Stop::Open if !s.conn.is_handshaking() => return Ok(s),
                Stop::Closed => return Err(io::ErrorKind::UnexpectedEof.into()),
                Stop::Open | Stop::Blocked => {
                    if std::future::poll_fn(|cx| s.poll_receive(cx)).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
        }
    }

    /// The connection's TLS state: negotiated parameters, the client's certificates.
    pub fn state(&self) -> &CommonState {
        &self.conn
    }

    /// Processes buffered ciphertext until rustls needs input; encrypts `app` (all of it)
    /// once application data may flow.
    fn process(&mut self, mut app: Option<&[u8]>) -> io::Result<Stop> {
        loop {
            let Self {
                conn,
                incoming,
                outgoing,
                plain,
                read_closed,
                ..
            } = self;
            let status = conn.process_tls_records(incoming);
            let mut discard = status.discard;
            let stop = match status.state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    append(outgoing, |b| data.encode(b), encode_needed)?;
                    None
                }
                // The records are in `outgoing`, sent before anything written later.
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    *read_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    *read_closed = true;
                    Some(Stop::Closed)
                }
                ConnectionState::BlockedHandshake => Some(Stop::Blocked),
                ConnectionState::WriteTraffic(mut traffic) => {
                    if let Some(data) = app.take() {
                        append(outgoing, |b| traffic.encrypt(data, b), encrypt_needed)?;
                    }
                    Some(Stop::Open)
                }
                // Early data is off (the config's default), and future states are unknown.
                _ => return Err(io::Error::other("unexpected TLS connection state")),
            };
            incoming.drain(..discard);
            if incoming.is_empty() && incoming.capacity() > 0 {
                *incoming = Vec::new();
            }
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// Queues our close_notify.
    fn queue_close(&mut self) -> io::Result<()> {
        if self.close_sent {
            return Ok(());
        }
        self.close_sent = true;
        // Whatever rustls still has to say (records in flight, a key update) comes first,
        // and only an open connection can carry the alert.
        if self.process(None)? != Stop::Open {
            return Ok(());
        }
        let Self {
            conn,
            incoming,
            outgoing,
            ..
        } = self;
        let status = conn.process_tls_records(incoming);
        let discard = status.discard;
        if let Ok(ConnectionState::WriteTraffic(mut traffic)) = status.state {
            append(outgoing, |b| traffic.queue_close_notify(b), encrypt_needed)?;
        }
        incoming.drain(..discard);
        Ok(())
    }

    /// Writes queued ciphertext to the socket; `Ready` once all of it went.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_sent < self.outgoing.len() {
            let n =
                ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.out_sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_sent += n;
        }
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
            self.out_sent = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Reads once from the socket into `incoming`; the byte count, 0 at end of stream.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // On the stack, so an idle connection holds no read buffer between reads; left
        // uninitialised, so a poll that finds nothing to read costs no 8 KiB memset.
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_SIZE];
        let mut buf = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut buf))?;
        self.incoming.extend_from_slice(buf.filled());
        Poll::Ready(Ok(buf.filled().len()))
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_read < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_read);
                buf.put_slice(&this.plain[this.plain_read..this.plain_read + n]);
                this.plain_read += n;
                if this.plain_read == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_read = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            this.process(None)?;
            // Handshake messages after the handshake (tickets, key updates) go out as soon as
            // the socket takes them; a full send buffer must not stall reading.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if this.plain_read < this.plain.len() || this.read_closed {
                continue;
            }
            if ready!(this.poll_receive(cx))? == 0 {
                // The socket ended without close_notify: end of stream for the reader, as
                // HTTP servers treat a plain connection's end.
                this.read_closed = true;
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.outgoing.len() - this.out_sent >= HIGH_WATER {
            ready!(this.poll_send(cx))?;
        }
        let data = &buf[..buf.len().min(MAX_WRITE)];
        match this.process(Some(data))? {
            Stop::Open => {}
            Stop::Blocked | Stop::Closed => {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            }
        }
        // Sent as far as the socket takes it now; the rest goes with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.queue_close()?;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
