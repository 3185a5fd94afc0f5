//! One `/v1/app` session: authentication, then one loop over the socket, the session's
//! byte-bounded queue and its timer (ping, idle deadline).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use fleetgate_authz::{AuthnError, Principal};
use fleetgate_bus::Channel;
use fleetgate_protocol::app::{AppErrorCode, AppReply, AppRequest, decode_request, encode_message};
use fleetgate_protocol::{CloseCode, retry_after_reason};
use futures_util::SinkExt;
use tokio::time::Instant;
use tracing::{Span, debug, warn};

use super::access::{Refusal, may_subscribe};
use super::command::{self, CommandFrame};
use super::hub::{ClientQueue, Item, Membership};
use super::{Admission, Slot, refusal_reason, take_slot};
use crate::Shared;
use crate::metrics::CodeLabel;

/// Extra time a slow consumer's close frame may take to get through.
const SLOW_CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// Commands one connection may have waiting at once.
const MAX_COMMANDS_IN_FLIGHT: usize = 16;

/// Most frames one subscribe's recovery sends (the history keeps fewer; see settings).
const RECOVERY_LIMIT: usize = 10_000;

/// How a session ends: the close frame to send.
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
}

/// One subscribed channel.
struct Sub {
    membership: Membership,
    /// The last offset written to the client; queued frames at or below it are skipped.
    last: u64,
}

struct AppSession {
    shared: Arc<Shared>,
    principal: Principal,
    client: u64,
    queue: Arc<ClientQueue>,
    subs: HashMap<Arc<str>, Sub>,
    last_activity: Instant,
    next_ping: Instant,
    /// When the principal's credential expires (plus the grace): the session ends then.
    expires_at: Option<Instant>,
    commands_in_flight: Arc<AtomicUsize>,
    _slot: Slot,
}

/// When a `/v1/app` or `/v1/mqtt` session of `principal` must end: its user token's `exp`
/// or its API key's `expiresAt`, plus `FLEETGATE_JWT_EXPIRY_GRACE_MS`. There is no refresh
/// on the socket: the client reconnects with a fresh token and recovers from its offsets.
pub(crate) fn principal_expiry(shared: &Shared, principal: &Principal) -> Option<Instant> {
    crate::session::expiry_instant(principal.expires_at_ms, shared.config.expiry_grace)
}

/// `wake`, or the credential's expiry if that comes first: when the session loop wakes.
pub(crate) fn no_later_than_expiry(wake: Instant, expires_at: Option<Instant>) -> Instant {
    expires_at.map_or(wake, |at| wake.min(at))
}

/// The close for a session whose credential expired at `expires_at`, once `now` is past it.
pub(crate) fn expired(expires_at: Option<Instant>, now: Instant) -> Result<(), Close> {
    match expires_at {
        Some(at) if now >= at => Err(Close::new(CloseCode::AuthFailed, "credentials expired")),
        _ => Ok(()),
    }
}

/// Runs a socket from upgrade to close.
pub(crate) async fn run(shared: Arc<Shared>, mut ws: WebSocket, client: u64, admission: Admission) {
    let authed = match admission {
        Admission::Authenticated(principal, slot) => Ok((principal, slot)),
        Admission::AwaitAuthFrame => auth_frame(&shared, &mut ws).await,
    };
    let close: Close = match authed {
        Ok((principal, slot)) => {
            Span::current().record("actor", principal.actor.as_str());
            let now = Instant::now();
            let expires_at = principal_expiry(&shared, &principal);
            let mut session = AppSession {
                queue: Arc::new(ClientQueue::new(shared.config.app.queue_bytes)),
                shared: shared.clone(),
                principal,
                client,
                subs: HashMap::new(),
                last_activity: now,
                next_ping: now + shared.config.heartbeat,
                expires_at,
                commands_in_flight: Arc::default(),
                _slot: slot,
            };
            shared.metrics.app_sessions.inc();
            let close = session
                .serve(&mut ws)
                .await
                .err()
                .unwrap_or_else(|| Close::new(CloseCode::Normal, "bye"));
            session.leave_all();
            shared.metrics.app_sessions.dec();
            close
        }
        Err(close) => close,
    };
    finish(&shared, &mut ws, close).await;
}

/// Counts the close and sends its frame; `/v1/app` and `/v1/mqtt` sessions end here.
pub(crate) async fn finish(shared: &Shared, ws: &mut WebSocket, close: Close) {
    shared
        .metrics
        .closes
        .get_or_create(&CodeLabel {
            code: close.code.as_u16(),
        })
        .inc();
    debug!(message = "session closed", code = close.code.as_u16(), reason = %close.reason);
    let code = close.code;
    let frame = CloseFrame {
        code: code.as_u16(),
        reason: Utf8Bytes::from(close.reason),
    };
    // A slow consumer's close frame waits behind what its socket still holds: give it time
    // to drain, so the client learns why (4008) rather than seeing the connection drop.
    let linger = if code == CloseCode::SlowConsumer {
        SLOW_CLOSE_LINGER
    } else {
        std::time::Duration::ZERO
    };
    let _ = tokio::time::timeout(
        shared.config.write_timeout + linger,
        ws.send(Message::Close(Some(frame))),
    )
    .await;
}

pub(crate) async fn send_text(
    shared: &Shared,
    ws: &mut WebSocket,
    text: String,
) -> Result<(), Close> {
    write(shared, ws, Message::Text(text.into())).await
}

pub(crate) async fn write(shared: &Shared, ws: &mut WebSocket, msg: Message) -> Result<(), Close> {
    match tokio::time::timeout(shared.config.write_timeout, ws.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Close::new(CloseCode::GoingAway, "socket closed")),
        Err(_) => Err(Close::new(
            CloseCode::SlowConsumer,
            "slow consumer: write timed out",
        )),
    }
}

/// Waits for `{"type":"auth","token":...}` and checks it.
pub(crate) async fn auth_frame(
    shared: &Arc<Shared>,
    ws: &mut WebSocket,
) -> Result<(Principal, Slot), Close> {
    let text = loop {
        match tokio::time::timeout(shared.config.auth_timeout, ws.recv()).await {
            Err(_) => {
                return Err(Close::new(
                    CloseCode::AuthTimeout,
                    "no auth frame within the auth timeout",
                ));
            }
            Ok(None | Some(Err(_))) => {
                return Err(Close::new(CloseCode::GoingAway, "closed before auth"));
            }
            Ok(Some(Ok(Message::Text(t)))) => break t,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(_))) => {
                return Err(Close::new(
                    CloseCode::ProtocolError,
                    "first frame must be a JSON auth frame",
                ));
            }
        }
    };
    let Ok(AppRequest::Auth { token }) = decode_request(text.as_bytes()) else {
        return Err(Close::new(
            CloseCode::ProtocolError,
            "first frame must be auth",
        ));
    };
    let header = format!("Bearer {token}");
    match shared
        .app
        .authn
        .authenticate(&*shared.bus, Some(&header))
        .await
    {
        Ok(principal) => {
            let Some(slot) = take_slot(shared, &principal) else {
                return Err(Close::new(
                    CloseCode::RateLimited,
                    "too many connections for this principal",
                ));
            };
            let reply = AppReply::AuthResponse {
                status: "success".into(),
                actor: principal.actor.clone(),
                role: principal.role.as_str().into(),
            };
            send_text(shared, ws, reply.encode()).await?;
            Ok((principal, slot))
        }
        Err(AuthnError::Bus(error)) => {
            shared.metrics.bus_errors.inc();
            warn!(message = "app auth lookup failed", %error);
            Err(Close::new(
                CloseCode::TryAgainLater,
                retry_after_reason("bus unavailable", rand::random_range(500..5000)),
            ))
        }
        Err(refused) => {
            shared.metrics.auth_failures.inc();
            Err(Close::new(CloseCode::AuthFailed, refusal_reason(&refused)))
        }
    }
}

enum Event {
    Socket(Option<Result<Message, axum::Error>>),
    Queue(Result<Vec<Item>, super::hub::Overflowed>),
    Timer,
    Drain,
}

impl AppSession {
    /// The loop; returns the close to send.
    async fn serve(&mut self, ws: &mut WebSocket) -> Result<(), Close> {
        let (idle_timeout, heartbeat, drain_period) = {
            let c = &self.shared.config;
            (c.idle_timeout, c.heartbeat, c.drain_period)
        };
        let drain = self.shared.app.drain.clone();
        loop {
            let wake = no_later_than_expiry(
                self.next_ping.min(self.last_activity + idle_timeout),
                self.expires_at,
            );
            let queue = self.queue.clone();
            let event = tokio::select! {
                biased;
                () = drain.cancelled() => Event::Drain,
                msg = ws.recv() => Event::Socket(msg),
                items = queue.take() => Event::Queue(items),
                () = tokio::time::sleep_until(wake) => Event::Timer,
            };
            match event {
                Event::Drain => {
                    let retry = rand::random_range(0..=drain_period.as_millis().max(1) as u64);
                    return Err(Close::new(
                        CloseCode::Draining,
                        retry_after_reason("node draining", retry),
                    ));
                }
                Event::Socket(None | Some(Err(_))) => {
                    return Err(Close::new(CloseCode::GoingAway, "socket closed"));
                }
                Event::Socket(Some(Ok(msg))) => {
                    self.last_activity = Instant::now();
                    match msg {
                        Message::Text(t) => self.on_request(ws, t.as_bytes()).await?,
                        Message::Binary(_) => {
                            return Err(Close::new(
                                CloseCode::ProtocolError,
                                "app frames are JSON text",
                            ));
                        }
                        Message::Close(_) => return Ok(()),
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
                Event::Queue(Err(_)) => {
                    return Err(Close::new(
                        CloseCode::SlowConsumer,
                        "slow consumer: queue full; reconnect and recover from your offsets",
                    ));
                }
                Event::Queue(Ok(items)) => self.deliver(ws, items).await?,
                Event::Timer => {
                    let now = Instant::now();
                    expired(self.expires_at, now)?;
                    if now >= self.last_activity + idle_timeout {
                        return Err(Close::new(
                            CloseCode::HeartbeatTimeout,
                            "no frame or pong within the idle timeout",
                        ));
                    }
                    if now >= self.next_ping {
                        self.next_ping = now + heartbeat;
                        write(&self.shared, ws, Message::Ping(Bytes::new())).await?;
                    }
                }
            }
        }
    }

    /// Writes queued frames in one flush, skipping what the client already has.
    async fn deliver(&mut self, ws: &mut WebSocket, items: Vec<Item>) -> Result<(), Close> {
        let mut n = 0u64;
        let mut written = Vec::with_capacity(items.len());
        for item in items {
            if !item.channel.is_empty() {
                let Some(sub) = self.subs.get_mut(&item.channel) else {
                    // Unsubscribed meanwhile.
                    continue;
                };
                match item.offset {
                    Some(o) if o <= sub.last => continue,
                    Some(o) => sub.last = o,
                    // A gap notice: offsets may restart (a new epoch).
                    None => sub.last = 0,
                }
            }
            written.push(item.at);
            let Ok(text) = Utf8Bytes::try_from(item.frame) else {
                continue;
            };
            let feed = ws.feed(Message::Text(text));
            match tokio::time::timeout(self.shared.config.write_timeout, feed).await {
                Ok(Ok(())) => n += 1,
                Ok(Err(_)) => return Err(Close::new(CloseCode::GoingAway, "socket closed")),
                Err(_) => {
                    return Err(Close::new(
                        CloseCode::SlowConsumer,
                        "slow consumer: write timed out",
                    ));
                }
            }
        }
        match tokio::time::timeout(self.shared.config.write_timeout, ws.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Close::new(CloseCode::GoingAway, "socket closed")),
            Err(_) => {
                return Err(Close::new(
                    CloseCode::SlowConsumer,
                    "slow consumer: write timed out",
                ));
            }
        }
        self.shared.metrics.app_frames_delivered.inc_by(n);
        let latency = &self.shared.metrics.app_delivery_latency;
        for at in written {
            latency.observe(at.elapsed().as_secs_f64());
        }
        Ok(())
    }

    async fn on_request(&mut self, ws: &mut WebSocket, text: &[u8]) -> Result<(), Close> {
        let request = match decode_request(text) {
            Ok(r) => r,
            Err(message) => {
                let reply = AppReply::error(None, AppErrorCode::BadRequest, message);
                return self.answer(ws, &reply).await;
            }
        };
        match request {
            AppRequest::Auth { .. } => {
                let reply =
                    AppReply::error(None, AppErrorCode::BadRequest, "already authenticated");
                self.answer(ws, &reply).await
            }
            AppRequest::Subscribe {
                channel,
                id,
                since,
                epoch,
            } => self.subscribe(ws, channel, id, since, epoch).await,
            AppRequest::Unsubscribe { channel, id } => {
                let reply = match self.subs.remove(channel.as_str()) {
                    Some(sub) => {
                        self.shared.app.hub.leave(sub.membership);
                        self.shared.metrics.app_subscriptions.dec();
                        AppReply::Unsubscribed { channel, id }
                    }
                    None => channel_error(id, &channel, AppErrorCode::BadRequest, "not subscribed"),
                };
                self.answer(ws, &reply).await
            }
            AppRequest::Command {
                id,
                device,
                payload,
                qos,
                ttl_ms,
                wait_ms,
            } => {
                let frame = CommandFrame {
                    id,
                    device,
                    payload,
                    qos,
                    ttl_ms,
                    wait_ms,
                };
                self.command(ws, frame).await
            }
        }
    }

    /// Starts a command in its own task (a wait may take as long as `max_wait`, and the
    /// session keeps delivering meanwhile); its answer comes back through the queue.
    async fn command(&mut self, ws: &mut WebSocket, frame: CommandFrame) -> Result<(), Close> {
        let Some(commands) = self.shared.app.commands.clone() else {
            let reply = AppReply::error(
                frame.id,
                AppErrorCode::Forbidden,
                "commands over /v1/app are not enabled on this node",
            );
            return self.answer(ws, &reply).await;
        };
        let in_flight = self.commands_in_flight.clone();
        if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_COMMANDS_IN_FLIGHT {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            let reply = AppReply::error(
                frame.id,
                AppErrorCode::TooManyCommands,
                "too many commands waiting on this connection",
            );
            return self.answer(ws, &reply).await;
        }
        let shared = self.shared.clone();
        let principal = self.principal.clone();
        let queue = self.queue.clone();
        tokio::spawn(async move {
            let reply = command::run(&*shared.bus, &commands, &principal, frame).await;
            in_flight.fetch_sub(1, Ordering::AcqRel);
            let item = Item {
                channel: Arc::from(""),
                offset: None,
                frame: Bytes::from(reply.encode()),
                at: std::time::Instant::now(),
            };
            if !queue.push(item) {
                shared.metrics.app_overflows.inc();
            }
        });
        Ok(())
    }

    async fn subscribe(
        &mut self,
        ws: &mut WebSocket,
        name: String,
        id: Option<String>,
        since: Option<u64>,
        epoch: Option<String>,
    ) -> Result<(), Close> {
        let refuse = |code, message: &str| channel_error(id.clone(), &name, code, message);
        let Some(channel) = Channel::parse(&name) else {
            let reply = refuse(AppErrorCode::BadRequest, "unknown channel");
            return self.answer(ws, &reply).await;
        };
        if self.subs.contains_key(name.as_str()) {
            let reply = refuse(AppErrorCode::BadRequest, "already subscribed");
            return self.answer(ws, &reply).await;
        }
        if self.subs.len() >= self.shared.config.app.max_subscriptions {
            let reply = refuse(
                AppErrorCode::TooManySubscriptions,
                "the connection holds the most subscriptions allowed",
            );
            return self.answer(ws, &reply).await;
        }
        let shared = self.shared.clone();
        match may_subscribe(&*shared.bus, &self.principal, &channel).await {
            Ok(()) => {}
            Err(Refusal::Denied(code, message)) => {
                return send_text(&shared, ws, refuse(code, message).encode()).await;
            }
            Err(Refusal::Bus(error)) => return self.unavailable(ws, &id, &name, &error).await,
        }
        let membership = match shared
            .app
            .hub
            .join(&channel, self.client, self.queue.clone())
            .await
        {
            Ok(m) => m,
            Err(error) => return self.unavailable(ws, &id, &name, &error).await,
        };
        let history = match shared.bus.history(&channel, since, RECOVERY_LIMIT).await {
            Ok(h) => h,
            Err(error) => {
                shared.app.hub.leave(membership);
                return self.unavailable(ws, &id, &name, &error).await;
            }
        };
        let position = history.position;
        let mut frames: Vec<Bytes> = Vec::new();
        let (answer_offset, last, recovered) = match since {
            Some(since) => {
                let same_epoch = epoch.as_deref().is_none_or(|e| e == position.epoch);
                if !same_epoch || !history.complete {
                    shared.app.hub.leave(membership);
                    let reply = refuse(
                        AppErrorCode::GapTooOld,
                        "what came after `since` is no longer kept; re-read state over REST",
                    );
                    return send_text(&shared, ws, reply.encode()).await;
                }
                let last = history.frames.last().map_or(since, |p| p.offset);
                for p in &history.frames {
                    frames.push(Bytes::from(encode_message(&name, Some(p.offset), &p.frame)));
                }
                (since, last, Some(frames.len() as u64))
            }
            None => {
                match shared.bus.retained(&channel).await {
                    Ok(Some(value)) => {
                        frames.push(Bytes::from(encode_message(&name, None, &value)))
                    }
                    Ok(None) => {}
                    Err(error) => {
                        shared.app.hub.leave(membership);
                        return self.unavailable(ws, &id, &name, &error).await;
                    }
                }
                (position.offset, position.offset, None)
            }
        };
        let key: Arc<str> = name.as_str().into();
        self.subs.insert(key, Sub { membership, last });
        shared.metrics.app_subscriptions.inc();
        let reply = AppReply::Subscribed {
            channel: name,
            id,
            offset: answer_offset,
            epoch: position.epoch,
            recovered,
        };
        send_text(&shared, ws, reply.encode()).await?;
        for frame in frames {
            let Ok(text) = Utf8Bytes::try_from(frame) else {
                continue;
            };
            write(&shared, ws, Message::Text(text)).await?;
        }
        Ok(())
    }

    async fn unavailable(
        &self,
        ws: &mut WebSocket,
        id: &Option<String>,
        channel: &str,
        error: &fleetgate_bus::BusError,
    ) -> Result<(), Close> {
        self.shared.metrics.bus_errors.inc();
        warn!(message = "app subscribe failed", %error);
        let reply = channel_error(
            id.clone(),
            channel,
            AppErrorCode::Unavailable,
            "the bus is unavailable; retry",
        );
        self.answer(ws, &reply).await
    }

    /// Writes one reply frame.
    async fn answer(&self, ws: &mut WebSocket, reply: &AppReply) -> Result<(), Close> {
        send_text(&self.shared, ws, reply.encode()).await
    }

    fn leave_all(&mut self) {
        for (_, sub) in self.subs.drain() {
            self.shared.app.hub.leave(sub.membership);
            self.shared.metrics.app_subscriptions.dec();
        }
    }
}

fn channel_error(id: Option<String>, channel: &str, code: AppErrorCode, message: &str) -> AppReply {
    AppReply::Error {
        id,
        channel: Some(channel.to_owned()),
        msgid: None,
        code,
        message: message.to_owned(),
    }
}
