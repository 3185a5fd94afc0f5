//! The event loop: one task per device that owns the connection, the in-flight QoS state
//! and the command dedupe cache, and reconnects until told to stop.

use std::collections::VecDeque;
use std::future::pending;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use fleetgate_protocol::{
    Envelope, ErrorCode, ErrorFrame, Frame, Handshake, HandshakeKind, MessageKind, MsgId, Qos,
};
use serde_json::Value;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, warn};

use crate::backoff::{Backoff, should_reconnect};
use crate::client::{Answer, IncomingCommand, LinkState, Outgoing, Request, Shared};
use crate::connection::{encode, encode_signed, frame_name};
use crate::dedupe::{CmdState, DedupeCache};
use crate::{Connection, DeviceError, DeviceEvent, DeviceOptions};

/// How long a client-initiated close waits for the gateway's close reply.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Retransmission delays stop doubling after this many attempts.
const MAX_RETRY_DOUBLINGS: u32 = 6;

/// Where a message stands in its QoS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// QoS 0 queued while offline.
    Fire,
    /// QoS 1 waiting for `ack`.
    AwaitAck,
    /// QoS 2 waiting for `rec`.
    AwaitRec,
    /// QoS 2 released, waiting for `comp`.
    AwaitComp,
}

#[derive(Debug)]
struct Inflight {
    /// Always a `Frame::Message`; kept as a frame so retransmits only flip `dup`.
    frame: Frame,
    msgid: MsgId,
    step: Step,
    /// Transmissions of the current step.
    attempts: u32,
    /// Retransmission deadline; `None` until sent on the current connection.
    deadline: Option<Instant>,
    done: oneshot::Sender<Result<MsgId, DeviceError>>,
}

impl Inflight {
    fn new(out: Outgoing) -> Self {
        let step = match out.env.qos {
            Qos::AtMostOnce => Step::Fire,
            Qos::AtLeastOnce => Step::AwaitAck,
            Qos::ExactlyOnce => Step::AwaitRec,
        };
        let msgid = out.env.msgid.clone();
        Self {
            frame: Frame::Message(out.env),
            msgid,
            step,
            attempts: 0,
            deadline: None,
            done: out.done,
        }
    }

    fn finish(self, result: Result<(), DeviceError>) {
        let _ = self.done.send(result.map(|()| self.msgid));
    }
}

/// Whom to tell that a QoS 0 message was written.
type Completion = (MsgId, oneshot::Sender<Result<MsgId, DeviceError>>);

/// How a session ended.
enum SessionEnd {
    /// Shut down by the client; the loop stops.
    Stop,
    /// The link ended.
    Closed { code: Option<u16>, reason: String },
}

/// A device's event loop; returned by [`crate::Device::prepare`] for the caller to spawn.
#[derive(Debug)]
pub struct EventLoop {
    opts: DeviceOptions,
    shared: Arc<Shared>,
    requests: mpsc::Receiver<Request>,
    requests_open: bool,
    events: mpsc::Sender<DeviceEvent>,
    /// Only handed to `IncomingCommand`s, so commands alive in the app do not keep the
    /// loop running after every client is gone.
    responder: mpsc::WeakSender<Request>,
    inflight: VecDeque<Inflight>,
    /// Encoded messages waiting to be written, with the QoS 0 sender to tell.
    outbox: VecDeque<(Message, Option<Completion>)>,
    dedupe: DedupeCache,
    backoff: Backoff,
    sessions: u32,
}

impl EventLoop {
    pub(crate) fn new(
        opts: DeviceOptions,
        shared: Arc<Shared>,
        requests: mpsc::Receiver<Request>,
        events: mpsc::Sender<DeviceEvent>,
        responder: mpsc::WeakSender<Request>,
    ) -> Self {
        let backoff = Backoff::new(opts.reconnect_backoff_min, opts.reconnect_backoff_max);
        let dedupe = DedupeCache::new(opts.dedupe_capacity);
        Self {
            opts,
            shared,
            requests,
            requests_open: true,
            events,
            responder,
            inflight: VecDeque::new(),
            outbox: VecDeque::new(),
            dedupe,
            backoff,
            sessions: 0,
        }
    }

    /// Runs until [`crate::DeviceClient::disconnect`], a final close, or every client is
    /// dropped. Pending sends then fail with [`DeviceError::Stopped`].
    pub async fn run(mut self) {
        let mut shutdown = self.shared.shutdown.subscribe();
        loop {
            if *shutdown.borrow() || !self.requests_open {
                break;
            }
            self.shared.state.send_replace(LinkState::Connecting);
            if let Some(source) = &self.opts.token_source {
                self.opts.token = source.token();
            }
            // Boxed: the handshake future is large and only lives while connecting.
            let attempt = Box::pin(Connection::connect(&self.opts));
            // Boxed too: moving a 400-byte connection through select and match would
            // reserve several copies of it in this per-device future.
            let result = tokio::select! {
                r = attempt => r.map(Box::new),
                () = shutdown_requested(&mut shutdown) => break,
            };
            let delay = match result {
                Ok(mut conn) => {
                    self.backoff.reset();
                    let session = conn.session().cloned().unwrap_or_else(|| unreachable!());
                    self.shared.state.send_replace(LinkState::Connected);
                    debug!(session_id = %session.session_id, reconnects = self.sessions, "connected");
                    self.emit(DeviceEvent::Connected {
                        session_id: session.session_id,
                        heartbeat_ms: session.heartbeat_ms,
                        reconnects: self.sessions,
                    });
                    self.sessions = self.sessions.saturating_add(1);
                    let end = self.session(&mut conn, &mut shutdown).await;
                    self.shared.state.send_replace(LinkState::Connecting);
                    match end {
                        SessionEnd::Stop => {
                            self.emit(DeviceEvent::Disconnected {
                                code: Some(1000),
                                reason: "client disconnect".into(),
                                reconnect_in: None,
                            });
                            break;
                        }
                        SessionEnd::Closed { code, reason } => {
                            let again = should_reconnect(code, self.opts.reconnect_on_replaced);
                            let delay = again.then(|| self.backoff.delay_after_close(&reason));
                            debug!(?code, %reason, ?delay, "disconnected");
                            self.emit(DeviceEvent::Disconnected {
                                code,
                                reason,
                                reconnect_in: delay,
                            });
                            match delay {
                                Some(d) => d,
                                None => break,
                            }
                        }
                    }
                }
                Err(DeviceError::AuthFailed { reason }) => {
                    warn!(%reason, "authentication failed; not reconnecting");
                    self.emit(DeviceEvent::AuthFailed { reason });
                    break;
                }
                Err(e) => {
                    let delay = match &e {
                        DeviceError::Closed { code, reason } => {
                            should_reconnect(*code, self.opts.reconnect_on_replaced)
                                .then(|| self.backoff.delay_after_close(reason))
                        }
                        DeviceError::InvalidOptions(_) => None,
                        _ => Some(self.backoff.next_delay()),
                    };
                    debug!(error = %e, ?delay, "connect failed");
                    self.emit(DeviceEvent::ConnectFailed {
                        reason: e.to_string(),
                        reconnect_in: delay,
                    });
                    match delay {
                        Some(d) => d,
                        None => break,
                    }
                }
            };
            if !self.wait_offline(delay, &mut shutdown).await {
                break;
            }
        }
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.state.send_replace(LinkState::Stopped);
        for entry in self.inflight.drain(..) {
            entry.finish(Err(DeviceError::Stopped));
        }
        self.requests.close();
        while let Ok(req) = self.requests.try_recv() {
            if let Request::Publish(out) = req {
                let _ = out.done.send(Err(DeviceError::Stopped));
            }
        }
    }

    /// Sleeps before reconnecting while still queueing sends; false to stop.
    async fn wait_offline(
        &mut self,
        delay: Duration,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        let until = Instant::now() + delay;
        loop {
            let room = self.requests_open && self.inflight.len() < self.opts.max_inflight;
            tokio::select! {
                () = sleep_until(until) => return true,
                () = shutdown_requested(shutdown) => return false,
                req = self.requests.recv(), if room => match req {
                    None => {
                        self.requests_open = false;
                        return false;
                    }
                    Some(Request::Publish(out)) => self.inflight.push_back(Inflight::new(*out)),
                    Some(Request::Answer(a)) => {
                        // Sent when the gateway redelivers the command after reconnecting.
                        self.dedupe.answer(&a.msgid, a.qos, a.payload);
                    }
                },
            }
        }
    }

    async fn session(
        &mut self,
        conn: &mut Connection,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> SessionEnd {
        // Everything unacknowledged goes out again, in order, with its original msgid.
        let mut i = 0;
        while i < self.inflight.len() {
            if self.transmit(i) {
                i += 1;
            }
        }
        let keepalive = self.opts.keepalive;
        let mut next_ping = (!keepalive.is_zero()).then(|| Instant::now() + keepalive);
        let mut next_refresh = self.next_refresh();
        loop {
            if let Err(e) = self.flush(conn).await {
                return self.ended(conn, e);
            }
            let deadline = self
                .next_deadline(next_ping)
                .into_iter()
                .chain(next_refresh)
                .min();
            let room = self.requests_open && self.inflight.len() < self.opts.max_inflight;
            // Handlers are synchronous and queue what they send in `outbox`, so the one
            // `flush` above is the only write future this (per-device) state machine holds.
            let step = tokio::select! {
                biased;
                () = shutdown_requested(shutdown) => {
                    let _ = Box::pin(conn.close(1000, "client disconnect", CLOSE_GRACE)).await;
                    return SessionEnd::Stop;
                }
                frame = conn.recv_frame() => match frame {
                    Ok(frame) => {
                        self.on_frame(frame);
                        Ok(())
                    }
                    Err(DeviceError::Protocol(e)) => {
                        warn!(error = %e, "undecodable frame from gateway ignored");
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                req = self.requests.recv(), if room => match req {
                    Some(req) => {
                        self.on_request(req);
                        Ok(())
                    }
                    None => {
                        self.requests_open = false;
                        let _ = Box::pin(conn.close(1000, "client dropped", CLOSE_GRACE)).await;
                        return SessionEnd::Stop;
                    }
                },
                () = sleep_opt(deadline) => {
                    if next_refresh.is_some_and(|at| at <= Instant::now()) {
                        next_refresh = self.refresh();
                    }
                    self.on_timer(conn.last_activity(), &mut next_ping)
                }
            };
            if let Err(e) = step {
                return self.ended(conn, e);
            }
        }
    }

    /// When the current token needs replacing: only with a token source and a JWT.
    fn next_refresh(&self) -> Option<Instant> {
        self.opts.token_source.as_ref()?;
        crate::refresh::refresh_at(&self.opts.token, Instant::now())
    }

    /// Sends a fresh token on the live session and returns when to send the next one.
    fn refresh(&mut self) -> Option<Instant> {
        let source = self.opts.token_source.clone()?;
        self.opts.token = source.token();
        let auth = fleetgate_protocol::Auth {
            device_id: self.opts.device_id.clone(),
            token: self.opts.token.clone(),
        };
        self.send(&Frame::Auth(auth));
        self.next_refresh()
    }

    /// Writes everything queued; QoS 0 senders learn the outcome of their write.
    async fn flush(&mut self, conn: &mut Connection) -> Result<(), DeviceError> {
        while let Some((msg, done)) = self.outbox.pop_front() {
            let result = conn.send_message(msg).await;
            if let Some((msgid, done)) = done {
                let outcome = match &result {
                    Ok(()) => Ok(msgid),
                    Err(e) => Err(DeviceError::Closed {
                        code: None,
                        reason: e.to_string(),
                    }),
                };
                let _ = done.send(outcome);
            }
            result?;
        }
        Ok(())
    }

    /// Maps the error that ended a session; unsent QoS 0 messages fail (at most once).
    fn ended(&mut self, conn: &Connection, e: DeviceError) -> SessionEnd {
        let (code, reason) = match e {
            DeviceError::Closed { code, reason } => (code, reason),
            other => (conn.close_code(), other.to_string()),
        };
        for (_, done) in self.outbox.drain(..) {
            if let Some((_, done)) = done {
                let _ = done.send(Err(DeviceError::Closed {
                    code,
                    reason: reason.clone(),
                }));
            }
        }
        SessionEnd::Closed { code, reason }
    }

    fn send(&mut self, frame: &Frame) {
        match encode_signed(self.opts.codec, frame, self.opts.mac_key.as_ref()) {
            Ok(msg) => self.outbox.push_back((msg, None)),
            Err(e) => warn!(error = %e, "frame not encodable; dropped"),
        }
    }

    fn next_deadline(&self, next_ping: Option<Instant>) -> Option<Instant> {
        self.inflight
            .iter()
            .filter_map(|e| e.deadline)
            .chain(next_ping)
            .min()
    }

    fn on_timer(
        &mut self,
        last_activity: std::time::Instant,
        next_ping: &mut Option<Instant>,
    ) -> Result<(), DeviceError> {
        let now = Instant::now();
        if let Some(at) = *next_ping
            && now >= at
        {
            let keepalive = self.opts.keepalive;
            if now.into_std().duration_since(last_activity) >= keepalive * 2 {
                return Err(DeviceError::Closed {
                    code: None,
                    reason: "keepalive timeout: nothing received".into(),
                });
            }
            self.outbox.push_back((Message::Ping(Bytes::new()), None));
            *next_ping = Some(now + keepalive);
        }
        let mut i = 0;
        while i < self.inflight.len() {
            let due = self.inflight[i].deadline.is_some_and(|d| d <= now);
            if !due || self.transmit(i) {
                i += 1;
            }
        }
        Ok(())
    }

    /// Queues (re)transmission of entry `i`; returns false when the entry was removed.
    fn transmit(&mut self, i: usize) -> bool {
        let max = self.opts.max_attempts;
        let codec = self.opts.codec;
        let entry = &mut self.inflight[i];
        if max != 0 && entry.attempts >= max {
            let entry = self.inflight.remove(i).unwrap_or_else(|| unreachable!());
            let attempts = entry.attempts;
            warn!(msgid = %entry.msgid, attempts, "message not acknowledged; giving up");
            let msgid = entry.msgid.clone();
            entry.finish(Err(DeviceError::AckTimeout { msgid, attempts }));
            return false;
        }
        let encoded = match entry.step {
            Step::Fire => {
                let entry = self.inflight.remove(i).unwrap_or_else(|| unreachable!());
                match encode_signed(codec, &entry.frame, self.opts.mac_key.as_ref()) {
                    Ok(msg) => self
                        .outbox
                        .push_back((msg, Some((entry.msgid, entry.done)))),
                    Err(e) => entry.finish(Err(e)),
                }
                return false;
            }
            Step::AwaitAck | Step::AwaitRec => {
                if let Frame::Message(env) = &mut entry.frame {
                    env.dup = entry.attempts > 0;
                }
                encode_signed(codec, &entry.frame, self.opts.mac_key.as_ref())
            }
            Step::AwaitComp => encode(
                codec,
                &handshake(HandshakeKind::Rel, entry.msgid.clone(), None),
            ),
        };
        entry.attempts += 1;
        entry.deadline = Some(Instant::now() + retry_delay(self.opts.ack_timeout, entry.attempts));
        match encoded {
            Ok(msg) => {
                self.outbox.push_back((msg, None));
                true
            }
            Err(e) => {
                let entry = self.inflight.remove(i).unwrap_or_else(|| unreachable!());
                entry.finish(Err(e));
                false
            }
        }
    }

    fn on_request(&mut self, req: Request) {
        match req {
            Request::Publish(out) => {
                self.inflight.push_back(Inflight::new(*out));
                self.transmit(self.inflight.len() - 1);
            }
            Request::Answer(a) => {
                let Answer {
                    msgid,
                    qos,
                    payload,
                } = *a;
                self.dedupe.answer(&msgid, qos, payload.clone());
                let kind = if qos == Qos::ExactlyOnce {
                    HandshakeKind::Rec
                } else {
                    HandshakeKind::Ack
                };
                self.send(&handshake(kind, msgid, payload));
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Handshake(h) => self.on_handshake(h),
            Frame::Message(env) if env.kind == MessageKind::Command => self.on_command(env),
            Frame::Message(env) if env.kind == MessageKind::Delta => self.on_delta(env),
            Frame::Error(err) => self.on_error(err),
            // The answer to a refresh. A refused one leaves the old token in force; the next
            // refresh (or the close at expiry) follows.
            Frame::AuthResponse(fleetgate_protocol::AuthResponse::Error { reason, .. }) => {
                warn!(%reason, "token refresh refused");
            }
            other => debug!(
                kind = frame_name(&other),
                "unexpected frame from gateway ignored"
            ),
        }
    }

    fn on_handshake(&mut self, h: Handshake) {
        let pos = self.inflight.iter().position(|e| e.msgid == h.msgid);
        match (h.kind, pos) {
            (HandshakeKind::Ack, Some(i)) if self.inflight[i].step == Step::AwaitAck => {
                let entry = self.inflight.remove(i).unwrap_or_else(|| unreachable!());
                let refused = h.payload.as_ref().and_then(|p| p.get("error"));
                let result = match refused {
                    Some(err) => Err(DeviceError::Refused {
                        msgid: entry.msgid.clone(),
                        code: None,
                        message: err.to_string(),
                    }),
                    None => Ok(()),
                };
                entry.finish(result);
            }
            (HandshakeKind::Rec, Some(i)) if self.inflight[i].step == Step::AwaitRec => {
                let entry = &mut self.inflight[i];
                entry.step = Step::AwaitComp;
                entry.attempts = 0;
                self.transmit(i);
            }
            (HandshakeKind::Rec, _) => {
                // A repeated rec (our rel was lost) or one for a message we gave up on: release
                // it so the gateway's handshake completes.
                self.send(&handshake(HandshakeKind::Rel, h.msgid, None));
            }
            (HandshakeKind::Comp, Some(i)) if self.inflight[i].step == Step::AwaitComp => {
                let entry = self.inflight.remove(i).unwrap_or_else(|| unreachable!());
                entry.finish(Ok(()));
            }
            (HandshakeKind::Rel, _) => {
                let answered = match self.dedupe.release(&h.msgid) {
                    Some(CmdState::Pending) => false,
                    Some(CmdState::Answered { .. }) | None => true,
                };
                if answered {
                    self.send(&handshake(HandshakeKind::Comp, h.msgid, None));
                }
            }
            (kind, _) => debug!(kind = kind.as_str(), msgid = %h.msgid, "stray handshake ignored"),
        }
    }

    fn on_command(&mut self, env: Envelope) {
        if let Some(entry) = self.dedupe.get(&env.msgid) {
            let resend = match &entry.state {
                CmdState::Pending => None,
                CmdState::Answered { payload, .. } => Some((entry.qos, payload.clone())),
            };
            debug!(msgid = %env.msgid, answered = resend.is_some(), "redelivered command deduped");
            match resend {
                Some((Qos::AtLeastOnce, payload)) => {
                    self.send(&handshake(HandshakeKind::Ack, env.msgid, payload));
                }
                Some((Qos::ExactlyOnce, payload)) => {
                    self.send(&handshake(HandshakeKind::Rec, env.msgid, payload));
                }
                _ => {}
            }
            return;
        }
        let permit = match self.events.try_reserve() {
            Ok(permit) => permit,
            Err(TrySendError::Full(())) => {
                self.shared.dropped_events.fetch_add(1, Ordering::Relaxed);
                warn!(msgid = %env.msgid, "event channel full; command dropped until redelivered");
                return;
            }
            Err(TrySendError::Closed(())) => return,
        };
        if env.qos != Qos::AtMostOnce {
            self.dedupe.insert_pending(env.msgid.clone(), env.qos);
        }
        permit.send(DeviceEvent::Command(Box::new(IncomingCommand {
            msgid: env.msgid,
            payload: env.payload,
            qos: env.qos,
            dup: env.dup,
            timestamp: env.timestamp,
            responder: self.responder.clone(),
        })));
    }

    /// Desired state the device has not reported: surfaced as is (QoS 0; the gateway sends
    /// it again on the next connect while it lasts). The device applies it and reports the
    /// new state, which empties the delta.
    fn on_delta(&mut self, env: Envelope) {
        let version = env
            .payload
            .get("version")
            .and_then(serde_json::Value::as_u64);
        let state = env
            .payload
            .get("state")
            .and_then(|s| s.as_object())
            .cloned();
        match (version, state) {
            (Some(version), Some(state)) => self.emit(DeviceEvent::Delta { version, state }),
            _ => warn!(msgid = %env.msgid, "malformed delta from gateway ignored"),
        }
    }

    fn on_error(&mut self, err: ErrorFrame) {
        warn!(code = err.code.as_str(), msgid = ?err.msgid, message = %err.message, "gateway error frame");
        let pos = err
            .msgid
            .as_ref()
            .and_then(|id| self.inflight.iter().position(|e| &e.msgid == id));
        // `unavailable` means "retry it": leave the message to its retransmission timer.
        if let Some(i) = pos
            && err.code != ErrorCode::Unavailable
        {
            let entry = self.inflight.remove(i).unwrap_or_else(|| unreachable!());
            let msgid = entry.msgid.clone();
            entry.finish(Err(DeviceError::Refused {
                msgid,
                code: Some(err.code),
                message: err.message.clone(),
            }));
        }
        self.emit(DeviceEvent::Error(Box::new(err)));
    }

    fn emit(&self, event: DeviceEvent) {
        match self.events.try_send(event) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.shared.dropped_events.fetch_add(1, Ordering::Relaxed);
                debug!("event channel full; event dropped");
            }
        }
    }
}

fn handshake(kind: HandshakeKind, msgid: MsgId, payload: Option<Value>) -> Frame {
    Frame::Handshake(Handshake {
        kind,
        msgid,
        payload,
    })
}

/// Wait before retransmission number `attempts + 1`: `ack_timeout * 2^(attempts-1)`.
pub(crate) fn retry_delay(ack_timeout: Duration, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(MAX_RETRY_DOUBLINGS);
    ack_timeout.saturating_mul(1 << doublings)
}

async fn sleep_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => pending().await,
    }
}

/// Resolves once shutdown is requested; the watch guard is released before returning so the
/// future stays `Send`.
async fn shutdown_requested(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Device, DeviceEvent};

    #[test]
    fn retransmit_delay_doubles_then_levels_off() {
        let t = Duration::from_millis(100);
        assert_eq!(retry_delay(t, 1), t);
        assert_eq!(retry_delay(t, 2), t * 2);
        assert_eq!(retry_delay(t, 4), t * 8);
        assert_eq!(retry_delay(t, 100), t * 64);
    }

    /// ~19k devices share one load-test process: the per-device task and channel slots
    /// must stay small.
    #[tokio::test]
    async fn per_device_footprint_is_small() {
        let opts = DeviceOptions::new("ws://127.0.0.1:1/v1/device", "d", "t");
        let (_client, _events, event_loop) = Device::prepare(opts).unwrap();
        let fut = event_loop.run();
        let sizes = (
            std::mem::size_of_val(&fut),
            std::mem::size_of::<Request>(),
            std::mem::size_of::<DeviceEvent>(),
        );
        assert!(sizes.0 <= 2048, "event loop future {sizes:?}");
        assert!(sizes.1 <= 16, "request slot {sizes:?}");
        assert!(sizes.2 <= 48, "event slot {sizes:?}");
    }
}
