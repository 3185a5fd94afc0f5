//! Connection and delivery settings of one device.

use std::net::IpAddr;
use std::time::Duration;

use fleetgate_protocol::Codec;
use http::{HeaderValue, Request};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::DeviceError;

/// How the device proves its identity (DESIGN.md, "Authentication").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// `Authorization: Bearer <token>` on the upgrade request.
    #[default]
    Header,
    /// First frame `{"type":"auth","deviceId","token"}` after the upgrade.
    FirstFrame,
}

/// Settings of one device; build with [`DeviceOptions::new`] and adjust the public fields.
///
/// The `Device-ID` header is sent in both auth modes so that the ingress can hash on it
/// before any frame is read.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeviceOptions {
    /// The device endpoint, e.g. `ws://127.0.0.1:8080/v1/device`.
    pub url: String,
    /// This device's ID; sent as `Device-ID` and as `from` on every message.
    pub device_id: String,
    /// A JWT or the provisioned device secret.
    pub token: String,
    /// Where fresh JWTs come from: asked at every connect and, on a live session, before the
    /// current token's `exp` (the gateway closes a session whose token expired). Unset = the
    /// fixed `token`.
    pub token_source: Option<crate::TokenSource>,
    /// Where the token travels.
    pub auth: AuthMode,
    /// Wire encoding, offered as the WebSocket subprotocol.
    pub codec: Codec,
    /// Wait this long for `ack`/`rec`/`comp` before retransmitting; doubles per attempt.
    pub ack_timeout: Duration,
    /// Transmissions of one QoS 1/2 message (or its `rel`) before the send fails; 0 = no limit.
    pub max_attempts: u32,
    /// Ping interval; the link counts as dead after two intervals without any inbound
    /// traffic. `Duration::ZERO` disables both.
    pub keepalive: Duration,
    /// Bound on TCP connect + WebSocket upgrade + authentication.
    pub connect_timeout: Duration,
    /// Smallest reconnect delay (and the base of the exponential backoff).
    pub reconnect_backoff_min: Duration,
    /// Largest reconnect delay chosen by backoff (a server's `retry-after` may exceed it).
    pub reconnect_backoff_max: Duration,
    /// Reconnect after close 4409 (replaced by a newer connection). Off by default, because
    /// two copies of one device would otherwise evict each other forever.
    pub reconnect_on_replaced: bool,
    /// Capacity of the client -> event loop request channel.
    pub request_capacity: usize,
    /// Capacity of the event channel; events that find it full are dropped and counted.
    pub event_capacity: usize,
    /// Most QoS 1/2 messages awaiting acknowledgement (or queued while offline); further
    /// sends wait.
    pub max_inflight: usize,
    /// How many received command msgids (with their answers) are remembered for dedupe.
    pub dedupe_capacity: usize,
    /// Largest inbound message accepted.
    pub max_frame_bytes: usize,
    /// Initial WebSocket read buffer; small because load tests hold ~19k devices per process.
    pub read_buffer_bytes: usize,
    /// The local address to connect from; load tests spread sockets over 127.0.0.x to get
    /// past the per-source ephemeral port range.
    pub bind_addr: Option<IpAddr>,
    /// TLS for `wss://` URLs: trusted roots and an optional client certificate (see
    /// [`crate::tls_client_config`]). Unset = the system's roots, no client certificate.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The MAC key the admin API issued (`POST /v1/devices/{id}/mac-key`): every message is
    /// then signed (`sig` and `nonce`). Unset = unsigned messages.
    pub mac_key: Option<fleetgate_protocol::MacKey>,
}

impl DeviceOptions {
    /// Options with the defaults of DESIGN.md: header auth, JSON, 5 s ack timeout,
    /// 25 s keepalive, 100 ms .. 30 s reconnect backoff.
    pub fn new(
        url: impl Into<String>,
        device_id: impl Into<String>,
        token: impl Into<String>,
    ) -> Self {
        Self {
            url: url.into(),
            device_id: device_id.into(),
            token: token.into(),
            token_source: None,
            auth: AuthMode::Header,
            codec: Codec::Json,
            ack_timeout: Duration::from_secs(5),
            max_attempts: 5,
            keepalive: Duration::from_secs(25),
            connect_timeout: Duration::from_secs(10),
            reconnect_backoff_min: Duration::from_millis(100),
            reconnect_backoff_max: Duration::from_secs(30),
            reconnect_on_replaced: false,
            request_capacity: 16,
            event_capacity: 16,
            max_inflight: 32,
            dedupe_capacity: 1024,
            max_frame_bytes: 1024 * 1024,
            read_buffer_bytes: 4096,
            bind_addr: None,
            tls: None,
            mac_key: None,
        }
    }

    /// Sets the auth mode.
    pub fn with_auth(mut self, auth: AuthMode) -> Self {
        self.auth = auth;
        self
    }

    /// Takes tokens from `source` (and refreshes them on live sessions).
    pub fn with_token_source(mut self, source: crate::TokenSource) -> Self {
        self.token = source.token();
        self.token_source = Some(source);
        self
    }

    /// Signs every message with `key` (see [`DeviceOptions::mac_key`]).
    pub fn with_mac_key(mut self, key: fleetgate_protocol::MacKey) -> Self {
        self.mac_key = Some(key);
        self
    }

    /// Sets the codec.
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// The upgrade request these options send: subprotocol, `Device-ID` and, in
    /// [`AuthMode::Header`], `Authorization`. Tests may alter it and pass it to
    /// [`crate::Connection::open_request`].
    ///
    /// # Errors
    /// [`DeviceError::InvalidOptions`] for a bad URL or a header value that is not visible
    /// ASCII.
    pub fn request(&self) -> Result<Request<()>, DeviceError> {
        let mut req = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| DeviceError::InvalidOptions(format!("url: {e}")))?;
        let headers = req.headers_mut();
        headers.insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(self.codec.subprotocol()),
        );
        headers.insert("Device-ID", header_value("device_id", &self.device_id)?);
        if self.auth == AuthMode::Header {
            let bearer = format!("Bearer {}", self.token);
            headers.insert("Authorization", header_value("token", &bearer)?);
        }
        Ok(req)
    }

    /// The WebSocket settings: a small read buffer, eager writes (nothing kept while idle)
    /// and the frame size limit.
    pub fn websocket_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_bytes)
            .write_buffer_size(0)
            .max_message_size(Some(self.max_frame_bytes))
            .max_frame_size(Some(self.max_frame_bytes))
    }

    pub(crate) fn validate(&self) -> Result<(), DeviceError> {
        let bad = |what: &str| Err(DeviceError::InvalidOptions(what.to_owned()));
        if self.device_id.is_empty() {
            return bad("device_id is empty");
        }
        if self.ack_timeout.is_zero() {
            return bad("ack_timeout must be positive");
        }
        if self.reconnect_backoff_min > self.reconnect_backoff_max {
            return bad("reconnect_backoff_min exceeds reconnect_backoff_max");
        }
        if self.request_capacity == 0 || self.event_capacity == 0 || self.max_inflight == 0 {
            return bad("channel capacities and max_inflight must be positive");
        }
        Ok(())
    }
}

fn header_value(what: &str, v: &str) -> Result<HeaderValue, DeviceError> {
    HeaderValue::from_str(v)
        .map_err(|_| DeviceError::InvalidOptions(format!("{what} is not a valid header value")))
}
