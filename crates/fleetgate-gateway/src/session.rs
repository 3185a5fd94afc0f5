//! One device session: authentication, then one loop over the socket, the session's bounded
//! outbox and its single timer (ping, idle deadline, retransmits).

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use fleetgate_bus::Presence;
use fleetgate_protocol::{
    AuthResponse, CloseCode, Codec, ErrorCode, ErrorFrame, Frame, MacError, MsgId, ProtocolError,
    Qos, ReplayWindow, retry_after_reason,
};
use std::sync::Arc;
use tokio::time::Instant;
use tracing::{Span, debug, warn};

use crate::auth::{AuthError, AuthedDevice};
use crate::metrics::CodeLabel;
use crate::outbound::Outgoing;
use crate::outbox::Outbox;
use crate::registry::{Outbound, SessionHandle};
use crate::{Shared, now_ms};

mod auth;

pub(crate) use auth::expiry_instant;
use auth::{auth_frame, refuse};

/// How a socket arrives at its session task.
pub(crate) enum Admission {
    /// Authenticated by the `Authorization` header before the upgrade.
    Authenticated(AuthedDevice),
    /// Must send an auth frame first; `routed_id` is the `Device-ID` header or query.
    AwaitAuthFrame {
        routed_id: Option<String>,
        /// The source's throttle key, charged when the auth frame fails.
        source_key: String,
        /// Its place among the source's pending sockets, held until auth ends.
        slot: crate::source::PendingSlot,
    },
    /// Its client certificate was refused: told so in an `auth_response`, then closed.
    Refused(AuthError),
}

/// Why a session ends.
#[derive(Debug)]
pub(crate) struct Close {
    pub(crate) code: CloseCode,
    pub(crate) reason: String,
}

impl Close {
    /// A close with `reason` cut to what a close frame can carry.
    pub(crate) fn new(code: CloseCode, reason: impl AsRef<str>) -> Self {
        Self {
            code,
            reason: fleetgate_protocol::close_reason(reason.as_ref()),
        }
    }

    /// A close that asks the device to come back (1011, 1013): the reason carries a
    /// `retry-after` jittered per device, so a crowd does not return at the same instant.
    pub(crate) fn come_back(code: CloseCode, text: &str) -> Self {
        Self::new(
            code,
            retry_after_reason(text, rand::random_range(500..5000)),
        )
    }

    fn protocol(error: &ProtocolError) -> Self {
        Self::new(
            error.close_code().unwrap_or(CloseCode::ProtocolError),
            error.close_reason(),
        )
    }
}

/// A token bucket: `rate` per second sustained, `burst` at once.
pub(crate) struct RateLimit {
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(burst: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            last: Instant::now(),
        }
    }

    fn take(&mut self, n: u32, rate: u32, burst: u32) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + refill).min(f64::from(burst));
        self.last = now;
        if self.tokens >= f64::from(n) {
            self.tokens -= f64::from(n);
            true
        } else {
            false
        }
    }
}

/// What woke the session loop.
enum Event {
    Outbound(Option<Outbound>),
    Socket(Option<Result<Message, axum::Error>>),
    Timer,
}

/// State of an authenticated session.
pub(crate) struct Session {
    pub(crate) shared: Arc<Shared>,
    pub(crate) device: String,
    pub(crate) groups: Vec<String>,
    pub(crate) conn_id: u64,
    pub(crate) codec: Codec,
    pub(crate) replay: ReplayWindow,
    /// The device's MAC key: set when its messages must be signed.
    pub(crate) mac_key: Option<Box<fleetgate_protocol::MacKey>>,
    /// Its messages must be signed: it has a MAC key, or one of its groups is signed.
    pub(crate) must_sign: bool,
    pub(crate) rate: RateLimit,
    pub(crate) outgoing: Outgoing,
    /// Alert rules and states, once any rule exists (see `alerts`).
    pub(crate) alerts: Option<Box<crate::alerts::DeviceAlerts>>,
    last_activity: Instant,
    next_ping: Instant,
    /// When the credentials it authenticated with expire (plus the configured grace): the
    /// session closes with 4403 then, unless an `auth` frame brought a fresh token.
    expires_at: Option<Instant>,
    /// Held while the session lives: one of `max_connections`.
    _session_permit: tokio::sync::OwnedSemaphorePermit,
}

/// Runs a socket from upgrade to close.
///
/// The socket is boxed before the future is built: an `async fn` taking it by value keeps a
/// second copy of it in its state (measured), and every idle connection would pay for both.
pub(crate) fn run(
    shared: Arc<Shared>,
    ws: WebSocket,
    codec: Codec,
    conn_id: u64,
    admission: Admission,
) -> impl Future<Output = ()> + Send {
    let ws = Box::new(ws);
    run_boxed(shared, ws, codec, conn_id, admission)
}

async fn run_boxed(
    shared: Arc<Shared>,
    mut ws: Box<WebSocket>,
    codec: Codec,
    conn_id: u64,
    admission: Admission,
) {
    let device = match admission {
        Admission::Authenticated(device) => device,
        Admission::Refused(error) => {
            let close = refuse(&shared, &mut ws, codec, &error).await;
            Box::pin(finish(&shared, &mut ws, close)).await;
            return;
        }
        Admission::AwaitAuthFrame {
            routed_id,
            source_key,
            slot,
        } => {
            let authed =
                Box::pin(auth_frame(&shared, &mut ws, codec, routed_id, &source_key)).await;
            drop(slot);
            match authed {
                Ok(device) => device,
                Err(close) => {
                    Box::pin(finish(&shared, &mut ws, close)).await;
                    return;
                }
            }
        }
    };
    Span::current().record("device_id", device.id.as_str());
    let outbox = Arc::new(Outbox::new(shared.config.outbox_capacity));
    let registered = Box::pin(register(&shared, device, conn_id, codec, outbox.clone())).await;
    let mut session = match registered {
        Ok(session) => session,
        Err(close) => {
            Box::pin(finish(&shared, &mut ws, close)).await;
            return;
        }
    };
    let close = session.serve(&mut ws, &outbox).await;
    outbox.close();
    Box::pin(session.unregister()).await;
    Box::pin(finish(&shared, &mut ws, close)).await;
}

/// Sends the close frame and counts it. Errors are ignored: the peer may be gone already.
async fn finish(shared: &Shared, ws: &mut WebSocket, close: Close) {
    shared
        .metrics
        .closes
        .get_or_create(&CodeLabel {
            code: close.code.as_u16(),
        })
        .inc();
    debug!(message = "closing", code = close.code.as_u16(), reason = %close.reason);
    let frame = CloseFrame {
        code: close.code.as_u16(),
        reason: Utf8Bytes::from(close.reason),
    };
    let sent = tokio::time::timeout(
        shared.config.write_timeout,
        ws.send(Message::Close(Some(frame))),
    )
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    // Wait (briefly) for the peer's close before dropping the socket: closing TCP with unread
    // input sends a reset, and a reset can destroy our close frame in the peer's receive
    // buffer before the device reads it, and with it the close code.
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Some(Ok(msg)) = ws.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// How long a closing session waits for the peer's close frame.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

async fn send_frame(
    shared: &Shared,
    ws: &mut WebSocket,
    codec: Codec,
    frame: &Frame,
) -> Result<(), Close> {
    let bytes = codec.encode(frame);
    let msg = match codec {
        Codec::Json => match Utf8Bytes::try_from(bytes) {
            Ok(text) => Message::Text(text),
            Err(_) => {
                return Err(Close::come_back(
                    CloseCode::InternalError,
                    "encoder produced invalid UTF-8",
                ));
            }
        },
        Codec::Protobuf => Message::Binary(bytes),
    };
    match tokio::time::timeout(shared.config.write_timeout, ws.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Close::new(CloseCode::GoingAway, "socket closed")),
        Err(_) => Err(Close::come_back(
            CloseCode::TryAgainLater,
            "slow consumer: write timed out",
        )),
    }
}

fn bus_unavailable(shared: &Shared) -> Close {
    shared.metrics.bus_errors.inc();
    Close::come_back(CloseCode::TryAgainLater, "bus unavailable")
}

fn codec_decode(codec: Codec, bytes: &[u8]) -> Result<Frame, ProtocolError> {
    codec.decode(bytes)
}

fn read_error(error: &axum::Error) -> Close {
    let text = error.to_string();
    // tungstenite reports oversize frames as a capacity error; the peer learns it by 1009.
    if text.contains("too long") || text.contains("Space limit") || text.contains("apacity") {
        Close::new(CloseCode::TooBig, "frame exceeds max_frame_bytes")
    } else {
        Close::new(CloseCode::ProtocolError, "invalid WebSocket stream")
    }
}

/// Claims the device: local registry, presence (replacing an older connection, 4409), then
/// confirms with `auth_response`.
async fn register(
    shared: &Arc<Shared>,
    device: AuthedDevice,
    conn_id: u64,
    codec: Codec,
    outbox: Arc<Outbox<Outbound>>,
) -> Result<Box<Session>, Close> {
    shared.metrics.auth_success.inc();
    // The node may have filled up since this socket was accepted.
    let Ok(session_permit) = shared.sessions_capacity.clone().try_acquire_owned() else {
        shared.metrics.connections_rejected.inc();
        return Err(Close::come_back(
            CloseCode::TryAgainLater,
            "node at capacity",
        ));
    };
    insert_local(shared, &device.id, conn_id, outbox);
    register_claimed(shared, device, conn_id, codec, session_permit).await
}

/// Puts a session in this node's registry, closing (4409) the one it replaces here.
pub(crate) fn insert_local(
    shared: &Shared,
    device: &str,
    conn_id: u64,
    outbox: Arc<Outbox<Outbound>>,
) {
    if let Some(old) = shared.sessions.insert(
        device,
        SessionHandle {
            conn_id,
            outbox,
            deliver_queued: false,
        },
    ) {
        let close = Outbound::Close(Box::new((
            CloseCode::Replaced,
            "replaced by a newer connection".to_owned(),
        )));
        if old.outbox.try_push(close).is_err() {
            old.outbox.close();
        }
    }
}

/// The rest of [`register`] once the session is in the local registry: presence (replacing
/// a connection on another node), announcements, the session's state.
pub(crate) async fn register_claimed(
    shared: &Arc<Shared>,
    device: AuthedDevice,
    conn_id: u64,
    codec: Codec,
    session_permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<Box<Session>, Close> {
    let node = &shared.config.node_id;
    let presence = Presence {
        node: node.clone(),
        conn_id,
        since_ms: now_ms(),
    };
    match shared.bus.presence_set(&device.id, &presence).await {
        Ok(Some(prev)) if prev.node != *node => {
            let msg = fleetgate_bus::NodeMessage::Close {
                device: device.id.clone(),
                conn_id: Some(prev.conn_id),
                code: CloseCode::Replaced,
                reason: "replaced by a newer connection".to_owned(),
            };
            if let Err(error) = shared.bus.node_publish(&prev.node, &msg).await {
                warn!(message = "could not ask the old node to close the replaced session", %error);
            }
        }
        Ok(_) => {}
        Err(error) => {
            warn!(message = "presence write failed", %error);
            shared.sessions.remove(&device.id, conn_id);
            return Err(bus_unavailable(shared));
        }
    }
    shared.metrics.connections_active.inc();
    crate::app::announce_presence(shared, &device.id, &device.groups, true).await;
    let mut alerts = None;
    crate::alerts::DeviceAlerts::on_presence(
        &mut alerts,
        shared,
        &device.id,
        &device.groups,
        true,
        now_ms(),
    )
    .await;
    let now = Instant::now();
    // Boxed: the session's state then sits once on the heap instead of in two slots of the
    // connection's future.
    let replay = shared.parked_windows.take(&device.id);
    let must_sign = device.mac_key.is_some()
        || device
            .groups
            .iter()
            .any(|g| shared.config.signed_groups.contains(g));
    Ok(Box::new(Session {
        shared: shared.clone(),
        device: device.id,
        groups: device.groups,
        conn_id,
        codec,
        replay,
        must_sign,
        mac_key: device.mac_key,
        rate: RateLimit::new(shared.config.rate_limit_burst),
        outgoing: Outgoing::default(),
        alerts,
        last_activity: now,
        next_ping: now + shared.config.heartbeat,
        expires_at: expiry_instant(device.expires_at_ms, shared.config.expiry_grace),
        _session_permit: session_permit,
    }))
}

impl Session {
    pub(crate) async fn unregister(mut self: Box<Self>) {
        self.shared.metrics.connections_active.dec();
        let window = std::mem::take(&mut self.replay);
        self.shared.parked_windows.park(&self.device, window);
        self.shared.sessions.remove(&self.device, self.conn_id);
        if !self.shared.bus.connected() {
            // Waiting out the bus's timeout would hold back the close frame: the next resync
            // deletes the entry.
            self.shared.stale_presence.push(&self.device, self.conn_id);
            return;
        }
        match self
            .shared
            .bus
            .presence_remove(&self.device, self.conn_id)
            .await
        {
            // Only the connection that still held the presence is the device going offline
            // (a replaced one is not).
            Ok(true) => {
                crate::app::announce_presence(&self.shared, &self.device, &self.groups, false)
                    .await;
                crate::alerts::DeviceAlerts::on_presence(
                    &mut self.alerts,
                    &self.shared,
                    &self.device,
                    &self.groups,
                    false,
                    now_ms(),
                )
                .await;
            }
            Ok(false) => {}
            Err(error) => {
                self.shared.metrics.bus_errors.inc();
                self.shared.stale_presence.push(&self.device, self.conn_id);
                warn!(message = "presence delete failed; retried after the bus comes back", %error);
            }
        }
    }

    /// Writes frames in order; the first failure ends the session.
    pub(crate) async fn send_all(
        &self,
        ws: &mut WebSocket,
        frames: Vec<Frame>,
    ) -> Result<(), Close> {
        for frame in &frames {
            send_frame(&self.shared, ws, self.codec, frame).await?;
        }
        Ok(())
    }

    /// Answers one rejected message with an `error` frame.
    pub(crate) fn error_frame(msgid: Option<MsgId>, code: ErrorCode, message: String) -> Frame {
        Frame::Error(ErrorFrame {
            msgid,
            code,
            message,
        })
    }

    fn next_wake(&self) -> Instant {
        let idle = self.last_activity + self.shared.config.idle_timeout;
        let mut at = self.next_ping.min(idle);
        if let Some(expiry) = self.expires_at {
            at = at.min(expiry);
        }
        if let Some(retry) = self.outgoing.next_deadline() {
            at = at.min(retry);
        }
        at
    }

    /// Sends `auth_response` and the commands queued while the device was offline. Its own
    /// future, so the welcome frame is not kept in the idle loop's state.
    async fn welcome(&mut self, ws: &mut WebSocket) -> Result<(), Close> {
        let welcome = Frame::AuthResponse(AuthResponse::Success {
            timestamp: now_ms(),
            session_id: format!("{:016x}", self.conn_id),
            heartbeat_ms: self.shared.config.heartbeat.as_millis() as u64,
        });
        send_frame(&self.shared, ws, self.codec, &welcome).await?;
        self.send_delta(ws).await?;
        self.deliver(ws).await
    }

    /// Tells a device that connects the desired state it has not reported yet. A shadow the
    /// bus cannot read now is not worth refusing the session: the next change sends it.
    async fn send_delta(&mut self, ws: &mut WebSocket) -> Result<(), Close> {
        match self.pending_delta().await {
            Some(frame) => send_frame(&self.shared, ws, self.codec, &frame).await,
            None => Ok(()),
        }
    }

    /// The `delta` frame owed to a device that (re)appears, if its shadow has one.
    pub(crate) async fn pending_delta(&self) -> Option<Frame> {
        match self.shared.bus.shadow_get(&self.device).await {
            Ok(Some(shadow)) if !shadow.delta.is_empty() => Some(crate::outbound::delta_frame(
                &self.device,
                shadow.version,
                shadow.delta,
            )),
            Ok(_) => None,
            Err(error) => {
                self.shared.metrics.bus_errors.inc();
                tracing::warn!(message = "could not read the shadow for its delta", %error);
                None
            }
        }
    }

    /// The session loop. Handlers run boxed: only the loop's own few hundred bytes stay
    /// allocated while the session idles, not the largest handler's state.
    async fn serve(&mut self, ws: &mut WebSocket, outbox: &Outbox<Outbound>) -> Close {
        if let Err(close) = Box::pin(self.welcome(ws)).await {
            return close;
        }
        let timer = tokio::time::sleep_until(self.next_wake());
        tokio::pin!(timer);
        loop {
            let event = tokio::select! {
                biased;
                out = outbox.recv() => Event::Outbound(out),
                msg = ws.recv() => Event::Socket(msg),
                () = &mut timer => Event::Timer,
            };
            let result = match event {
                Event::Outbound(Some(out)) => Box::pin(self.on_outbound(ws, out)).await,
                Event::Outbound(None) => Err(Close::come_back(
                    CloseCode::TryAgainLater,
                    "slow consumer: outbox closed",
                )),
                Event::Socket(Some(Ok(msg))) => Box::pin(self.on_message(ws, msg)).await,
                Event::Socket(Some(Err(error))) => Err(read_error(&error)),
                Event::Socket(None) => Err(Close::new(CloseCode::GoingAway, "peer went away")),
                Event::Timer => Box::pin(self.on_timer(ws)).await,
            };
            if let Err(close) = result {
                return close;
            }
            timer.as_mut().reset(self.next_wake());
        }
    }

    async fn on_outbound(&mut self, ws: &mut WebSocket, out: Outbound) -> Result<(), Close> {
        let frames = self.outbound_frames(out).await?;
        self.send_all(ws, frames).await
    }

    /// What a message from outside the socket makes the session write (or why it ends).
    pub(crate) async fn outbound_frames(&mut self, out: Outbound) -> Result<Vec<Frame>, Close> {
        match out {
            Outbound::Deliver => {
                self.shared
                    .sessions
                    .deliver_taken(&self.device, self.conn_id);
                Ok(self.outgoing.fill(&self.shared, &self.device).await)
            }
            Outbound::Command(cmd) => {
                let frame = crate::outbound::command_frame(&cmd, false);
                if cmd.traceparent.is_some() {
                    crate::outbound::trace_point(
                        tracing::info_span!("command.deliver", device = %self.device, msgid = cmd.msgid.as_str(), attempt = 1),
                        &cmd,
                    );
                }
                self.shared.metrics.commands_sent.inc();
                Ok(vec![frame])
            }
            Outbound::Close(close) => {
                let (code, reason) = *close;
                Err(Close::new(code, reason))
            }
            Outbound::Delta(delta) => {
                let (version, state) = *delta;
                Ok(vec![crate::outbound::delta_frame(
                    &self.device,
                    version,
                    state,
                )])
            }
            // Broker messages are for the MQTT holder of a device; a WebSocket session that
            // took the device over does not answer them.
            Outbound::Mqtt(_) => {
                self.shared.metrics.messages_rejected.inc();
                Ok(Vec::new())
            }
        }
    }

    async fn deliver(&mut self, ws: &mut WebSocket) -> Result<(), Close> {
        let frames = self.outgoing.fill(&self.shared, &self.device).await;
        self.send_all(ws, frames).await
    }

    async fn on_timer(&mut self, ws: &mut WebSocket) -> Result<(), Close> {
        let now = Instant::now();
        if now >= self.last_activity + self.shared.config.idle_timeout {
            return Err(Close::new(CloseCode::HeartbeatTimeout, "heartbeat timeout"));
        }
        if self.expires_at.is_some_and(|at| now >= at) {
            return Err(Close::new(CloseCode::AuthFailed, "credentials expired"));
        }
        if now >= self.next_ping {
            self.next_ping = now + self.shared.config.heartbeat;
            let ping = tokio::time::timeout(
                self.shared.config.write_timeout,
                ws.send(Message::Ping(Default::default())),
            );
            match ping.await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Close::new(CloseCode::GoingAway, "socket closed")),
                Err(_) => {
                    return Err(Close::come_back(
                        CloseCode::TryAgainLater,
                        "slow consumer: write timed out",
                    ));
                }
            }
        }
        let frames = self
            .outgoing
            .on_timer(&self.shared, &self.device, now)
            .await;
        self.send_all(ws, frames).await
    }

    async fn on_message(&mut self, ws: &mut WebSocket, msg: Message) -> Result<(), Close> {
        self.last_activity = Instant::now();
        let decoded = match msg {
            Message::Text(t) => self.codec_decode(t.as_bytes()),
            Message::Binary(b) => self.codec_decode(&b),
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
            Message::Close(_) => return Err(Close::new(CloseCode::Normal, "closed by device")),
        };
        let frame = match decoded {
            Ok(frame) => frame,
            Err(error) => {
                self.shared.metrics.messages_rejected.inc();
                return Err(Close::protocol(&error));
            }
        };
        let replies = Box::pin(self.on_frame(frame)).await?;
        self.send_all(ws, replies).await
    }

    fn codec_decode(&self, bytes: &[u8]) -> Result<Frame, ProtocolError> {
        codec_decode(self.codec, bytes)
    }

    /// Handles one decoded frame, returning the frames to write back.
    pub(crate) async fn on_frame(&mut self, frame: Frame) -> Result<Vec<Frame>, Close> {
        match frame {
            Frame::Message(env) => {
                let timed = (env.qos != Qos::AtMostOnce).then(std::time::Instant::now);
                let answered = self.ingest(env).await;
                if let Some(start) = timed {
                    self.shared
                        .metrics
                        .ack_latency
                        .observe(start.elapsed().as_secs_f64());
                }
                answered
            }
            Frame::Compact(_) if self.must_sign => {
                Ok(vec![self.signature_refused(None, MacError::Unsignable)])
            }
            Frame::Compact(compact) => {
                let msgid = MsgId::new(format!("c{:x}", rand::random::<u64>()))
                    .map_err(|e| Close::protocol(&e))?;
                self.ingest(compact.into_envelope(msgid, now_ms())).await
            }
            Frame::Handshake(h) => self.on_handshake(h).await,
            Frame::Auth(auth) => self.refresh(auth).await,
            Frame::AuthResponse(_) | Frame::Error(_) => Err(Close::new(
                CloseCode::ProtocolError,
                "frame type not accepted from devices",
            )),
        }
    }

    /// Rate-limit check for `n` messages; past the burst the session ends with 4429.
    pub(crate) fn charge(&mut self, n: u32) -> Result<(), Close> {
        let c = &self.shared.config;
        if self
            .rate
            .take(n, c.rate_limit_per_second, c.rate_limit_burst)
        {
            Ok(())
        } else {
            Err(Close::new(CloseCode::RateLimited, "rate limit exceeded"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RateLimit;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn rate_limit_allows_the_burst_then_the_sustained_rate() {
        let (rate, burst) = (10, 20);
        let mut bucket = RateLimit::new(burst);
        assert!(
            (0..20).all(|_| bucket.take(1, rate, burst)),
            "the whole burst passes"
        );
        assert!(!bucket.take(1, rate, burst), "nothing left");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(
            (0..5).all(|_| bucket.take(1, rate, burst)),
            "half a second refills five"
        );
        assert!(!bucket.take(1, rate, burst));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(bucket.take(20, rate, burst), "refill stops at the burst");
        assert!(!bucket.take(1, rate, burst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_charged_per_item() {
        let mut bucket = RateLimit::new(10);
        assert!(
            !bucket.take(11, 10, 10),
            "a batch larger than the burst never passes"
        );
        assert!(bucket.take(10, 10, 10));
    }
}
