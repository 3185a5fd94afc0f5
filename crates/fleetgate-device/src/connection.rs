//! One WebSocket session speaking protocol v1: upgrade, authenticate, then typed frames in
//! and out. The event loop builds on it; tests use it to drive the raw protocol.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use fleetgate_protocol::{Auth, AuthResponse, Codec, Frame};
use futures_util::{SinkExt, StreamExt};
use http::Request;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::{
    Connector, MaybeTlsStream, WebSocketStream, client_async_tls_with_config,
    connect_async_tls_with_config,
};

use crate::{AuthMode, DeviceError, DeviceOptions};

/// How long to wait for our close reply to be written before giving up on the socket.
const CLOSE_REPLY_GRACE: Duration = Duration::from_millis(500);

/// The client WebSocket type underneath a [`Connection`].
pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the gateway said when it accepted the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The gateway's ID for this session.
    pub session_id: String,
    /// How often the gateway pings.
    pub heartbeat_ms: u64,
    /// The gateway's clock at auth, ms since the epoch.
    pub server_timestamp: i64,
}

/// A device WebSocket speaking protocol v1 frames.
///
/// Pings are answered by the WebSocket layer; pongs and pings are not returned as frames but
/// count as activity ([`Connection::last_activity`]).
#[derive(Debug)]
pub struct Connection {
    ws: WsStream,
    codec: Codec,
    session: Option<Session>,
    close: Option<(Option<u16>, String)>,
    last_rx: Instant,
}

impl Connection {
    /// Upgrades and authenticates as `opts` say, waiting for a successful `auth_response`;
    /// all of it bounded by `opts.connect_timeout`.
    ///
    /// # Errors
    /// [`DeviceError::AuthFailed`] when the gateway refuses the credentials,
    /// [`DeviceError::Timeout`], or any transport error.
    pub async fn connect(opts: &DeviceOptions) -> Result<Self, DeviceError> {
        opts.validate()?;
        let steps = async {
            let mut conn = Self::open(opts).await?;
            conn.authenticate(opts).await?;
            Ok(conn)
        };
        tokio::time::timeout(opts.connect_timeout, steps)
            .await
            .map_err(|_| DeviceError::Timeout("connect"))?
    }

    /// Performs only the WebSocket upgrade (with the `Authorization` header in
    /// [`AuthMode::Header`]); no frame is sent or read.
    ///
    /// # Errors
    /// [`DeviceError::AuthFailed`] for HTTP 401/403, [`DeviceError::UpgradeRefused`] for
    /// other statuses, or a transport error.
    pub async fn open(opts: &DeviceOptions) -> Result<Self, DeviceError> {
        Self::open_request_tls(
            opts.request()?,
            opts.codec,
            opts.websocket_config(),
            opts.bind_addr,
            opts.tls.clone(),
        )
        .await
    }

    /// Performs the upgrade with a hand-made request (see [`DeviceOptions::request`]).
    ///
    /// # Errors
    /// As [`Connection::open`].
    pub async fn open_request(
        req: Request<()>,
        codec: Codec,
        config: WebSocketConfig,
    ) -> Result<Self, DeviceError> {
        Self::open_request_from(req, codec, config, None).await
    }

    /// As [`Connection::open_request`], connecting from local address `bind` when given
    /// (see [`DeviceOptions::bind_addr`]).
    ///
    /// # Errors
    /// As [`Connection::open`]; [`DeviceError::InvalidOptions`] for a `bind` with a URL
    /// other than `ws://` or whose host has no address of `bind`'s family.
    pub async fn open_request_from(
        req: Request<()>,
        codec: Codec,
        config: WebSocketConfig,
        bind: Option<IpAddr>,
    ) -> Result<Self, DeviceError> {
        Self::open_request_tls(req, codec, config, bind, None).await
    }

    /// As [`Connection::open_request_from`], with `tls` for a `wss://` URL (unset = the
    /// system's roots).
    ///
    /// # Errors
    /// As [`Connection::open`].
    pub async fn open_request_tls(
        req: Request<()>,
        codec: Codec,
        config: WebSocketConfig,
        bind: Option<IpAddr>,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<Self, DeviceError> {
        let connector = tls.map(Connector::Rustls);
        let ws = match bind {
            // `true` disables Nagle: frames are small and latency-bound.
            None => {
                connect_async_tls_with_config(req, Some(config), true, connector)
                    .await?
                    .0
            }
            Some(ip) => {
                let tcp = connect_from(&req, ip).await?;
                client_async_tls_with_config(req, tcp, Some(config), connector)
                    .await?
                    .0
            }
        };
        Ok(Self {
            ws,
            codec,
            session: None,
            close: None,
            last_rx: Instant::now(),
        })
    }

    /// Sends the auth frame in [`AuthMode::FirstFrame`], then waits for `auth_response`.
    ///
    /// # Errors
    /// [`DeviceError::AuthFailed`] for an error response or close 4403;
    /// [`DeviceError::UnexpectedFrame`] when something else arrives first.
    pub async fn authenticate(&mut self, opts: &DeviceOptions) -> Result<&Session, DeviceError> {
        if opts.auth == AuthMode::FirstFrame {
            let auth = Auth {
                device_id: opts.device_id.clone(),
                token: opts.token.clone(),
            };
            self.send_frame(&Frame::Auth(auth)).await?;
        }
        match self.recv_frame().await {
            Ok(Frame::AuthResponse(AuthResponse::Success {
                timestamp,
                session_id,
                heartbeat_ms,
            })) => Ok(self.session.insert(Session {
                session_id,
                heartbeat_ms,
                server_timestamp: timestamp,
            })),
            Ok(Frame::AuthResponse(AuthResponse::Error { reason, .. })) => {
                Err(DeviceError::AuthFailed { reason })
            }
            Ok(other) => Err(DeviceError::UnexpectedFrame(frame_name(&other))),
            Err(DeviceError::Closed {
                code: Some(4403),
                reason,
            }) => Err(DeviceError::AuthFailed { reason }),
            Err(e) => Err(e),
        }
    }

    /// The session, once authenticated.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// The codec negotiated for this connection.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Encodes and sends one frame (text for JSON, binary for Protobuf).
    ///
    /// # Errors
    /// A transport error; the connection is then unusable.
    pub async fn send_frame(&mut self, frame: &Frame) -> Result<(), DeviceError> {
        let msg = encode(self.codec, frame)?;
        self.send_message(msg).await
    }

    /// Sends an already encoded WebSocket message.
    ///
    /// # Errors
    /// A transport error; the connection is then unusable.
    pub async fn send_message(&mut self, msg: Message) -> Result<(), DeviceError> {
        self.ws.send(msg).await.map_err(DeviceError::from)
    }

    /// Sends a WebSocket ping (keepalive).
    ///
    /// # Errors
    /// A transport error.
    pub async fn send_ping(&mut self) -> Result<(), DeviceError> {
        self.ws
            .send(Message::Ping(bytes::Bytes::new()))
            .await
            .map_err(DeviceError::from)
    }

    /// Receives the next protocol frame. Cancel-safe: a frame is never lost when the
    /// future is dropped.
    ///
    /// # Errors
    /// [`DeviceError::Closed`] when the peer closed (see [`Connection::close_code`]);
    /// [`DeviceError::Protocol`] for a frame that does not decode (the connection stays
    /// usable); a transport error.
    pub async fn recv_frame(&mut self) -> Result<Frame, DeviceError> {
        loop {
            let msg = match self.ws.next().await {
                Some(Ok(msg)) => msg,
                None => return Err(self.closed_error("connection closed")),
                Some(Err(e)) => match DeviceError::from(e) {
                    DeviceError::Closed { reason, .. } => return Err(self.closed_error(&reason)),
                    DeviceError::WebSocket(e) => {
                        return Err(self.closed_error(&e.to_string()));
                    }
                    other => return Err(other),
                },
            };
            self.last_rx = Instant::now();
            match msg {
                Message::Text(text) => return Ok(self.codec.decode(text.as_bytes())?),
                Message::Binary(bin) => return Ok(self.codec.decode(&bin)?),
                Message::Close(frame) => {
                    let (code, reason) = match frame {
                        Some(f) => (Some(u16::from(f.code)), f.reason.as_str().to_owned()),
                        None => (None, String::new()),
                    };
                    self.close.get_or_insert((code, reason));
                    // The close reply is queued; push it out now rather than waiting for the
                    // server to drop TCP, which it may only do after seeing the reply.
                    // Boxed: a cold path that would otherwise enlarge every recv future.
                    let _ =
                        Box::pin(tokio::time::timeout(CLOSE_REPLY_GRACE, self.ws.flush())).await;
                    return Err(self.closed_error(""));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Sends a close frame and waits up to `grace` for the peer to finish the handshake.
    ///
    /// # Errors
    /// A transport error while sending the close frame.
    pub async fn close(
        &mut self,
        code: u16,
        reason: &str,
        grace: Duration,
    ) -> Result<(), DeviceError> {
        let frame = CloseFrame {
            code: WsCloseCode::from(code),
            reason: reason.into(),
        };
        self.ws
            .close(Some(frame))
            .await
            .map_err(DeviceError::from)?;
        let drain = async { while let Some(Ok(_)) = self.ws.next().await {} };
        let _ = tokio::time::timeout(grace, drain).await;
        Ok(())
    }

    /// The close code the peer sent, once the connection has closed.
    pub fn close_code(&self) -> Option<u16> {
        self.close.as_ref().and_then(|(code, _)| *code)
    }

    /// The close reason the peer sent, once the connection has closed.
    pub fn close_reason(&self) -> Option<&str> {
        self.close.as_ref().map(|(_, reason)| reason.as_str())
    }

    /// When anything (frame, ping, pong) last arrived.
    pub fn last_activity(&self) -> Instant {
        self.last_rx
    }

    /// The raw WebSocket, for tests that send malformed or unusual messages.
    pub fn get_mut(&mut self) -> &mut WsStream {
        &mut self.ws
    }

    fn closed_error(&mut self, fallback: &str) -> DeviceError {
        let (code, reason) = self
            .close
            .get_or_insert_with(|| (None, fallback.to_owned()))
            .clone();
        DeviceError::Closed { code, reason }
    }
}

/// A TCP connection to the host of `req` (a `ws://` URL) from local address `ip`, trying the
/// host's addresses of `ip`'s family in turn.
async fn connect_from(req: &Request<()>, ip: IpAddr) -> Result<TcpStream, DeviceError> {
    let uri = req.uri();
    let tls = uri
        .scheme_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("wss"));
    let host = uri
        .host()
        .ok_or_else(|| DeviceError::InvalidOptions("url has no host".into()))?;
    // An IPv6 literal keeps its URL brackets here, which the resolver does not take.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let mut last_err = None;
    for addr in tokio::net::lookup_host((host, port)).await.map_err(io)? {
        if addr.is_ipv4() != ip.is_ipv4() {
            continue;
        }
        match connect_one(ip, addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.map_or_else(
        || DeviceError::InvalidOptions(format!("{host} has no address of bind_addr's family")),
        io,
    ))
}

async fn connect_one(ip: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if ip.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    let tcp = socket.connect(to).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// A socket error, reported as `connect_async` reports its own.
fn io(e: std::io::Error) -> DeviceError {
    DeviceError::from(tungstenite::Error::Io(e))
}

/// Encodes a frame as the WebSocket message `codec` uses (text for JSON, binary for
/// Protobuf).
pub(crate) fn encode(codec: Codec, frame: &Frame) -> Result<Message, DeviceError> {
    let bytes = codec.encode(frame);
    Ok(match codec {
        Codec::Json => Message::Text(
            Utf8Bytes::try_from(bytes)
                .map_err(|_| DeviceError::UnexpectedFrame("non-UTF-8 JSON"))?,
        ),
        Codec::Protobuf => Message::Binary(bytes),
    })
}

/// [`encode`], signing a message frame first when the device has a MAC key: each
/// transmission, retransmissions included, gets its own nonce (the gateway refuses a nonce
/// twice).
pub(crate) fn encode_signed(
    codec: Codec,
    frame: &Frame,
    key: Option<&fleetgate_protocol::MacKey>,
) -> Result<Message, DeviceError> {
    match (frame, key) {
        (Frame::Message(env), Some(key)) => {
            let nonce = hex::encode(rand::random::<[u8; 12]>());
            let mut signed = env.clone();
            signed.sig = Some(Box::new(fleetgate_protocol::Signature::sign(
                env, nonce, key,
            )));
            encode(codec, &Frame::Message(signed))
        }
        _ => encode(codec, frame),
    }
}

/// A short name of the frame's kind, for errors and logs.
pub(crate) fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Auth(_) => "auth",
        Frame::AuthResponse(_) => "auth_response",
        Frame::Message(env) => env.kind.as_str(),
        Frame::Handshake(h) => h.kind.as_str(),
        Frame::Error(_) => "error",
        Frame::Compact(_) => "compact",
    }
}
