//! Server -> device QoS 1/2 commands of one session: the in-flight window, retransmits with
//! exponential backoff, the QoS 2 release step, and outcome reports. The device's queue in
//! the bus is the source of truth; this is only the session's view of its head.

use std::time::Duration;

use fleetgate_bus::{
    Command, CommandOutcome, DeliveryState, FailReason, JobExecState, QueuedCommand,
};
use fleetgate_protocol::{
    Envelope, Frame, Handshake, HandshakeKind, MessageKind, MsgId, PROTOCOL_VERSION, Qos,
};
use serde_json::{Map, Value};
use tokio::time::Instant;
use tracing::{info_span, warn};

use crate::Shared;
use crate::metrics::OutcomeLabel;
use crate::node::report_failure;
use crate::{RESULT_TTL_MS, now_ms};

struct InFlight {
    queued: QueuedCommand,
    deadline: Instant,
    /// Sent by `fill`, which takes the queue in order: these are the queue's head, and the
    /// newest of them is where the next read starts. (A `rec` for a command sent on an earlier
    /// connection adds one out of order.)
    in_order: bool,
}

/// The commands a session has written and not yet seen answered. Empty (and unallocated)
/// while the device has nothing queued.
#[derive(Default)]
pub(crate) struct Outgoing {
    inflight: Vec<InFlight>,
}

/// The command frame for a queued or QoS 0 command.
pub(crate) fn command_frame(cmd: &Command, dup: bool) -> Frame {
    Frame::Message(Envelope {
        ver: PROTOCOL_VERSION.to_owned(),
        msgid: cmd.msgid.clone(),
        timestamp: now_ms(),
        from: "server".to_owned(),
        to: cmd.device.clone(),
        kind: MessageKind::Command,
        payload: cmd.payload.clone(),
        qos: cmd.qos,
        retain: false,
        dup,
        sig: None,
    })
}

/// The `delta` frame: desired state the device has not reported yet (QoS 0; the device
/// gets it again on its next connect while the delta lasts).
pub(crate) fn delta_frame(device: &str, version: u64, state: Map<String, Value>) -> Frame {
    Frame::Message(Envelope {
        ver: PROTOCOL_VERSION.to_owned(),
        msgid: MsgId::new(format!("delta-{version}")).expect("a valid msgid"),
        timestamp: now_ms(),
        from: "server".to_owned(),
        to: device.to_owned(),
        kind: MessageKind::Delta,
        payload: serde_json::json!({ "state": state, "version": version }),
        qos: Qos::AtMostOnce,
        retain: false,
        dup: false,
        sig: None,
    })
}

fn rel_frame(q: &QueuedCommand) -> Frame {
    Frame::Handshake(Handshake {
        kind: HandshakeKind::Rel,
        msgid: q.command.msgid.clone(),
        payload: None,
    })
}

/// The frame that (re)sends a queued command in its current state.
fn frame_for(q: &QueuedCommand, dup: bool) -> Frame {
    match q.state {
        DeliveryState::Pending => command_frame(&q.command, dup),
        DeliveryState::Released => rel_frame(q),
    }
}

/// Moves the execution of a job's command on. Only commands of a job cost the bus call.
pub(crate) async fn record_job(shared: &Shared, cmd: &Command, state: JobExecState) {
    let Some(job) = &cmd.job else { return };
    if let Err(error) = shared.bus.job_record(job, &cmd.device, state).await {
        shared.metrics.bus_errors.inc();
        warn!(message = "could not record a job execution", job = %job, %error);
    }
}

/// Records `span` as a step of `cmd`'s trace, which the admin call that sent it started: the
/// span is parented across processes, entered (started) and ended at once.
pub(crate) fn trace_point(span: tracing::Span, cmd: &Command) {
    fleetgate_bus::trace::continue_trace(&span, cmd.traceparent.as_deref());
    drop(span.entered());
}

/// Wait after the `attempts`-th send: `ack_timeout` doubling per attempt, capped.
fn backoff(c: &crate::GatewayConfig, attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(16);
    c.ack_timeout.saturating_mul(factor).min(c.max_ack_backoff)
}

/// What an answer's payload (`{"result"}` / `{"error"}`), or the one kept from a QoS 2 `rec`,
/// says about the command.
fn outcome_of(payload: Option<&Value>, kept: Option<&Value>) -> CommandOutcome {
    let from = |p: &Value| {
        if let Some(e) = p.get("error") {
            Some(CommandOutcome::Error(e.clone()))
        } else {
            p.get("result").map(|r| CommandOutcome::Result(r.clone()))
        }
    };
    payload
        .and_then(from)
        .or_else(|| kept.and_then(from))
        .unwrap_or(CommandOutcome::Done)
}

impl Outgoing {
    /// The earliest retransmit deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.inflight.iter().map(|f| f.deadline).min()
    }

    /// Where the next queue read starts: the newest in-order command in flight (`after`),
    /// every msgid in flight (`skip`) and the room left in the window.
    fn cursor(&self, window: usize) -> (Option<&str>, Vec<&str>, usize) {
        // What `fill` sent is the head of the queue (commands leave it when answered): read
        // only what comes after it.
        let after = self
            .inflight
            .iter()
            .rev()
            .find(|f| f.in_order)
            .map(|f| f.queued.command.msgid.as_str());
        // Nothing in flight is sent again or counted, whatever the cursor finds: a `rec` for a
        // command sent on an earlier connection puts one in flight out of order, and a cursor
        // command that left the queue (expired) makes the read start from the head.
        let skip = self
            .inflight
            .iter()
            .map(|f| f.queued.command.msgid.as_str())
            .collect();
        (after, skip, window.saturating_sub(self.inflight.len()))
    }

    /// Writes queued commands not yet in flight, oldest first, up to the window.
    pub(crate) async fn fill(&mut self, shared: &Shared, device: &str) -> Vec<Frame> {
        let (after, skip, room) = self.cursor(shared.config.inflight_window);
        if room == 0 {
            return Vec::new();
        }
        let next = shared.bus.queue_next(device, after, &skip, room).await;
        match next {
            Ok(pending) => self.send(shared, device, pending).await,
            Err(error) => {
                shared.metrics.bus_errors.inc();
                warn!(message = "could not read the command queue", %error);
                Vec::new()
            }
        }
    }

    /// Puts commands read from the queue (their attempt counted) in flight: their frames.
    async fn send(
        &mut self,
        shared: &Shared,
        device: &str,
        pending: Vec<QueuedCommand>,
    ) -> Vec<Frame> {
        let mut frames = Vec::new();
        for q in pending {
            // Counted by the read.
            let attempts = q.attempts;
            // A command sent before (on an earlier connection) goes out marked as a duplicate.
            frames.push(frame_for(&q, attempts > 1));
            if q.command.traceparent.is_some() {
                trace_point(
                    info_span!(
                        "command.deliver",
                        device,
                        msgid = q.command.msgid.as_str(),
                        attempt = attempts
                    ),
                    &q.command,
                );
            }
            if attempts > 1 {
                shared.metrics.commands_retransmitted.inc();
            } else {
                shared.metrics.commands_sent.inc();
                record_job(shared, &q.command, JobExecState::Delivered).await;
            }
            let deadline = Instant::now() + backoff(&shared.config, attempts);
            self.inflight.push(InFlight {
                queued: QueuedCommand { attempts, ..q },
                deadline,
                in_order: true,
            });
        }
        frames
    }

    /// Retransmits what timed out; fails what has used all its attempts.
    pub(crate) async fn on_timer(
        &mut self,
        shared: &Shared,
        device: &str,
        now: Instant,
    ) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut i = 0;
        let mut freed = false;
        while i < self.inflight.len() {
            if self.inflight[i].deadline > now {
                i += 1;
                continue;
            }
            let msgid = self.inflight[i].queued.command.msgid.clone();
            if self.inflight[i].queued.attempts >= shared.config.max_attempts {
                let f = self.inflight.remove(i);
                freed = true;
                match shared.bus.queue_fail(device, msgid.as_str()).await {
                    Ok(Some(q)) => report_failure(shared, &q, FailReason::AttemptsExhausted).await,
                    Ok(None) => {}
                    Err(error) => {
                        shared.metrics.bus_errors.inc();
                        warn!(message = "could not fail a command", %error);
                        self.inflight.insert(
                            i,
                            InFlight {
                                deadline: now + shared.config.ack_timeout,
                                ..f
                            },
                        );
                        i += 1;
                    }
                }
                continue;
            }
            match shared.bus.queue_attempt(device, msgid.as_str()).await {
                Ok(Some(attempts)) => {
                    let f = &mut self.inflight[i];
                    f.queued.attempts = attempts;
                    f.deadline = now + backoff(&shared.config, attempts);
                    frames.push(frame_for(&f.queued, true));
                    shared.metrics.commands_retransmitted.inc();
                    i += 1;
                }
                // Gone from the queue: expired, or answered through another connection.
                Ok(None) => {
                    self.inflight.remove(i);
                    freed = true;
                }
                Err(error) => {
                    shared.metrics.bus_errors.inc();
                    warn!(message = "could not count a retransmit", %error);
                    self.inflight[i].deadline = now + shared.config.ack_timeout;
                    i += 1;
                }
            }
        }
        if freed {
            frames.extend(self.fill(shared, device).await);
        }
        frames
    }

    /// Handles the device's ack / rec / comp for one of our commands.
    pub(crate) async fn on_handshake(
        &mut self,
        shared: &Shared,
        device: &str,
        h: Handshake,
    ) -> Vec<Frame> {
        let msgid = h.msgid.as_str();
        let pos = self
            .inflight
            .iter()
            .position(|f| f.queued.command.msgid == h.msgid);
        match h.kind {
            HandshakeKind::Rec => {
                let result = h
                    .payload
                    .as_ref()
                    .and_then(|p| p.get("result").or_else(|| p.get("error")).map(|_| p));
                // Keep the whole answer payload ({"result"} or {"error"}) for the comp.
                match shared.bus.queue_release(device, msgid, result).await {
                    Ok(Some(q)) => {
                        let deadline = Instant::now() + shared.config.ack_timeout;
                        match pos {
                            Some(i) => {
                                self.inflight[i].queued.state = DeliveryState::Released;
                                self.inflight[i].queued.result = q.result.clone();
                                self.inflight[i].deadline = deadline;
                            }
                            None => self.inflight.push(InFlight {
                                queued: q.clone(),
                                deadline,
                                in_order: false,
                            }),
                        }
                        vec![rel_frame(&q)]
                    }
                    // Not queued any more: answered already; release so the device can finish.
                    Ok(None) => vec![Frame::Handshake(Handshake {
                        kind: HandshakeKind::Rel,
                        msgid: h.msgid,
                        payload: None,
                    })],
                    Err(error) => {
                        shared.metrics.bus_errors.inc();
                        warn!(message = "could not release a command", %error);
                        Vec::new()
                    }
                }
            }
            HandshakeKind::Ack | HandshakeKind::Comp => match pos {
                Some(i) => self.on_answer(shared, device, h, i).await,
                None => self.on_stray_answer(shared, device, h).await,
            },
            HandshakeKind::Rel => Vec::new(),
        }
    }
}

impl Outgoing {
    /// The ack / comp of command `i` in flight: the session knows the command (who waits,
    /// any result kept from its `rec`), so removing it, reporting its result and reading the
    /// next commands is one bus step.
    async fn on_answer(
        &mut self,
        shared: &Shared,
        device: &str,
        h: Handshake,
        i: usize,
    ) -> Vec<Frame> {
        let f = self.inflight.remove(i);
        let outcome = outcome_of(h.payload.as_ref(), f.queued.result.as_ref());
        let (after, skip, room) = self.cursor(shared.config.inflight_window);
        let reply = f
            .queued
            .command
            .reply_to
            .as_deref()
            .map(|node| (node, &outcome, RESULT_TTL_MS));
        let step = shared
            .bus
            .queue_ack_next(device, h.msgid.as_str(), reply, after, &skip, room)
            .await;
        match step {
            Ok((removed, next)) => {
                if let Some(q) = removed {
                    finished(shared, device, h.kind, &q, &outcome).await;
                }
                self.send(shared, device, next).await
            }
            Err(error) => {
                // Still queued: a later read (the next answer, a `Deliver`, the node's
                // periodic check) sends it again.
                shared.metrics.bus_errors.inc();
                warn!(message = "could not acknowledge a command", %error);
                Vec::new()
            }
        }
    }

    /// An ack / comp for a command not in flight here (sent on an earlier connection): what
    /// it carried is read back from the queue as it is removed.
    async fn on_stray_answer(&mut self, shared: &Shared, device: &str, h: Handshake) -> Vec<Frame> {
        let msgid = h.msgid.as_str();
        match shared.bus.queue_ack(device, msgid).await {
            Ok(Some(q)) => {
                let outcome = outcome_of(h.payload.as_ref(), q.result.as_ref());
                finished(shared, device, h.kind, &q, &outcome).await;
                if let Some(node) = &q.command.reply_to {
                    let sent = shared
                        .bus
                        .result_send(node, device, msgid, &outcome, RESULT_TTL_MS)
                        .await;
                    if let Err(error) = sent {
                        shared.metrics.bus_errors.inc();
                        warn!(message = "could not report a command result", %error);
                    }
                }
            }
            Ok(None) => {}
            Err(error) => {
                shared.metrics.bus_errors.inc();
                warn!(message = "could not acknowledge a command", %error);
            }
        }
        self.fill(shared, device).await
    }
}

/// The bookkeeping of a command the device answered: a warning for the wrong handshake,
/// its trace point, the metric and its job's execution state.
async fn finished(
    shared: &Shared,
    device: &str,
    kind: HandshakeKind,
    q: &QueuedCommand,
    outcome: &CommandOutcome,
) {
    let msgid = q.command.msgid.as_str();
    let expected = match q.command.qos {
        Qos::ExactlyOnce => HandshakeKind::Comp,
        _ => HandshakeKind::Ack,
    };
    if expected != kind {
        warn!(
            message = "command answered with the wrong handshake",
            msgid,
            kind = kind.as_str()
        );
    }
    if q.command.traceparent.is_some() {
        trace_point(
            info_span!("command.ack", device, msgid, attempts = q.attempts),
            &q.command,
        );
    }
    shared
        .metrics
        .commands_finished
        .get_or_create(&OutcomeLabel { outcome: "acked" })
        .inc();
    let state = match outcome {
        CommandOutcome::Error(_) => JobExecState::Failed,
        _ => JobExecState::Succeeded,
    };
    record_job(shared, &q.command, state).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn backoff_doubles_per_attempt_up_to_the_cap() {
        let c = crate::GatewayConfig {
            ack_timeout: Duration::from_millis(100),
            max_ack_backoff: Duration::from_millis(1000),
            ..Default::default()
        };
        let waits: Vec<u64> = (1..=6).map(|a| backoff(&c, a).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(
            backoff(&c, u32::MAX),
            Duration::from_millis(1000),
            "no overflow"
        );
    }

    #[test]
    fn outcome_prefers_the_answer_then_the_kept_rec_payload() {
        let rec = json!({"result": {"from": "rec"}});
        assert_eq!(
            outcome_of(Some(&json!({"result": 1})), Some(&rec)),
            CommandOutcome::Result(json!(1))
        );
        assert_eq!(
            outcome_of(None, Some(&rec)),
            CommandOutcome::Result(json!({"from": "rec"}))
        );
        assert_eq!(
            outcome_of(Some(&json!({"error": "nope"})), None),
            CommandOutcome::Error(json!("nope"))
        );
        assert_eq!(
            outcome_of(Some(&json!({"other": 1})), None),
            CommandOutcome::Done
        );
        assert_eq!(outcome_of(None, None), CommandOutcome::Done);
    }
}
