//! Node-wide tasks: membership heartbeat, the node channel dispatcher, the command expiry
//! sweeper, and drain.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleetgate_bus::{
    BusError, Channel, CommandOutcome, FailReason, NodeInfo, NodeMessage, QueuedCommand,
};
use fleetgate_protocol::{CloseCode, retry_after_reason};
use rand::Rng;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::OutcomeLabel;
use crate::registry::{Offer, Outbound};
use crate::{RESULT_TTL_MS, Shared, now_ms};

/// Subscribes to this node's channel and starts the background tasks; the returned handle
/// ends when `stop` fires.
pub(crate) async fn start(
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Result<JoinHandle<()>, BusError> {
    let mut inbox = shared.bus.node_subscribe(&shared.config.node_id).await?;
    heartbeat_once(&shared).await;
    // One resync at a time, off the inbox loop (it costs bus round trips); Resyncs arriving
    // while one runs coalesce into one more run.
    let resync_wanted = Arc::new(Notify::new());
    let resync_task = {
        let (shared, wanted, stop) = (shared.clone(), resync_wanted.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = wanted.notified() => resync(&shared).await,
                }
            }
        })
    };
    // Rules are read once before serving, so a node evaluates from its first device on.
    shared.alerts.refresh(&*shared.bus).await;
    tokio::spawn(crate::alerts::refresh_loop(
        shared.clone(),
        shared.config.alert_rules_refresh,
        stop.clone(),
    ));
    tokio::spawn(crate::alerts::offline::run(shared.clone(), stop.clone()));
    crate::mqtt::device::start(&shared, stop.clone());
    Ok(tokio::spawn(async move {
        let mut beat = tokio::time::interval(shared.config.node_ttl / 3);
        let mut sweep = tokio::time::interval(shared.config.expiry_sweep_interval);
        loop {
            tokio::select! {
                // Checked first: ticks pile up while a bus call hangs, and stopping must not
                // wait for a lucky draw among ready branches.
                biased;
                _ = stop.cancelled() => break,
                msg = inbox.recv() => match msg {
                    Some(NodeMessage::Resync) => resync_wanted.notify_one(),
                    Some(msg) => dispatch(&shared, msg),
                    None => {
                        warn!(message = "node channel closed; resubscribing");
                        shared.bus_ok.store(false, Ordering::Relaxed);
                        match shared.bus.node_subscribe(&shared.config.node_id).await {
                            Ok(rx) => inbox = rx,
                            Err(error) => {
                                warn!(message = "resubscribe failed", %error);
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                    }
                },
                _ = beat.tick() => {
                    heartbeat_once(&shared).await;
                    let window = Duration::from_millis(shared.config.limits.replay_window_ms.max(0) as u64);
                    shared.parked_windows.sweep(window);
                }
                _ = sweep.tick() => sweep_expired(&shared).await,
            }
        }
        resync_task.abort();
        if !shared.bus.connected() {
            // Not worth a command timeout: the membership entry expires by itself.
            warn!(message = "bus unavailable; leaving membership to expire");
        } else if let Err(error) = shared.bus.node_remove(&shared.config.node_id).await {
            warn!(message = "could not leave membership", %error);
        }
    }))
}

async fn heartbeat_once(shared: &Shared) {
    if !shared.bus.connected() {
        // A call now would only wait out the bus's timeout (and hold up drain).
        shared.bus_ok.store(false, Ordering::Relaxed);
        return;
    }
    let info = NodeInfo {
        id: shared.config.node_id.clone(),
        connections: shared.sessions.len() as u64,
        draining: shared.draining.load(Ordering::Relaxed),
        started_ms: shared.started_ms,
        updated_ms: now_ms(),
    };
    let ttl = shared.config.node_ttl.as_millis() as u64;
    let ok = match shared.bus.node_heartbeat(&info, ttl).await {
        Ok(()) => true,
        Err(error) => {
            shared.metrics.bus_errors.inc();
            warn!(message = "membership heartbeat failed", %error);
            false
        }
    };
    shared.bus_ok.store(ok, Ordering::Relaxed);
}

fn dispatch(shared: &Shared, msg: NodeMessage) {
    let (device, conn_id, out) = match msg {
        NodeMessage::Deliver { device } => (device, None, Outbound::Deliver),
        NodeMessage::Command(cmd) => (cmd.device.clone(), None, Outbound::Command(Box::new(cmd))),
        NodeMessage::Close {
            device,
            conn_id,
            code,
            reason,
        } => (device, conn_id, Outbound::Close(Box::new((code, reason)))),
        NodeMessage::Delta {
            device,
            version,
            delta,
        } => (device, None, Outbound::Delta(Box::new((version, delta)))),
        NodeMessage::MqttInbound {
            device,
            kind,
            payload,
        } => {
            crate::mqtt::device::forwarded(shared, device, &kind, payload);
            return;
        }
        // Results are for admin nodes; a gateway node has nobody waiting. Resync is handled
        // by the inbox loop.
        NodeMessage::CommandResult { .. } | NodeMessage::Resync => return,
    };
    if let Offer::Dropped = shared.sessions.offer(&device, conn_id, out) {
        shared.metrics.outbox_dropped.inc();
        warn!(message = "slow consumer dropped", device = %device);
    }
}

/// Sessions whose presence one resync reads per bus call.
const RESYNC_BATCH: usize = 1000;

/// Re-reads what lost node messages would have said, for every local session: whether it
/// is still its device's connection (a lost `Close` would have replaced it: 4409), and its
/// queue (a lost `Deliver`). A session whose presence is gone (the bus lost its data) is
/// asked to reconnect, which registers it again; reclaiming presence here could overwrite a
/// newer connection made elsewhere meanwhile.
async fn resync(shared: &Shared) {
    // Membership first: presence naming this node reads as offline until it is back.
    heartbeat_once(shared).await;
    let sessions = shared.sessions.list();
    info!(
        message = "resyncing sessions after lost node messages",
        sessions = sessions.len()
    );
    let node = &shared.config.node_id;
    let (mut replaced, mut lost) = (0usize, 0usize);
    for batch in sessions.chunks(RESYNC_BATCH) {
        let devices: Vec<String> = batch.iter().map(|(d, _)| d.clone()).collect();
        let presence = match shared.bus.presence_get_many(&devices).await {
            Ok(p) => p,
            Err(error) => {
                // The bus is away again; its next reconnect sends another Resync.
                shared.metrics.bus_errors.inc();
                warn!(message = "resync could not read presence", %error);
                return;
            }
        };
        for ((device, conn_id), presence) in batch.iter().zip(presence) {
            let out = match presence {
                Some(p) if p.node == *node && p.conn_id == *conn_id => Outbound::Deliver,
                Some(_) => {
                    replaced += 1;
                    Outbound::Close(Box::new((
                        CloseCode::Replaced,
                        "replaced by a newer connection".to_owned(),
                    )))
                }
                None => {
                    lost += 1;
                    let retry_ms = rand::rng().random_range(500..5000);
                    Outbound::Close(Box::new((
                        CloseCode::Draining,
                        retry_after_reason("session state lost; reconnect", retry_ms),
                    )))
                }
            };
            if let Offer::Dropped = shared.sessions.offer(device, Some(*conn_id), out) {
                shared.metrics.outbox_dropped.inc();
            }
        }
    }
    // Entries of sessions that closed while the bus was away (compare-and-delete: a newer
    // connection's entry stays).
    let stale = shared.stale_presence.take();
    let mut cleared = 0usize;
    for (i, (device, conn_id)) in stale.iter().enumerate() {
        match shared.bus.presence_remove(device, *conn_id).await {
            Ok(removed) => cleared += usize::from(removed),
            Err(error) => {
                shared.metrics.bus_errors.inc();
                warn!(message = "resync could not delete stale presence", %error);
                for (device, conn_id) in &stale[i..] {
                    shared.stale_presence.push(device, *conn_id);
                }
                break;
            }
        }
    }
    info!(
        message = "resync done",
        replaced,
        lost,
        stale_presence_cleared = cleared
    );
}

/// Reports commands whose TTL ended, whoever their device is connected to.
async fn sweep_expired(shared: &Shared) {
    if !shared.bus.connected() {
        // Another node (or this one, later) reports them once the bus is back.
        return;
    }
    loop {
        let expired = match shared.bus.queue_take_expired(now_ms(), 256).await {
            Ok(expired) => expired,
            Err(error) => {
                shared.metrics.bus_errors.inc();
                warn!(message = "expiry sweep failed", %error);
                return;
            }
        };
        let n = expired.len();
        for q in expired {
            report_failure(shared, &q, FailReason::Expired).await;
        }
        if n < 256 {
            return;
        }
    }
}

/// Tells whoever waits on a command, and the `alerts` channel, that it failed.
pub(crate) async fn report_failure(shared: &Shared, q: &QueuedCommand, reason: FailReason) {
    let cmd = &q.command;
    shared
        .metrics
        .commands_finished
        .get_or_create(&OutcomeLabel {
            outcome: reason.as_str(),
        })
        .inc();
    warn!(message = "command failed", device = %cmd.device, msgid = %cmd.msgid, reason = reason.as_str(), attempts = q.attempts);
    let state = match reason {
        FailReason::Expired => fleetgate_bus::JobExecState::TimedOut,
        FailReason::AttemptsExhausted => fleetgate_bus::JobExecState::Failed,
    };
    crate::outbound::record_job(shared, cmd, state).await;
    if let Some(node) = &cmd.reply_to {
        let outcome = CommandOutcome::Failed(reason);
        let sent = shared
            .bus
            .result_send(
                node,
                &cmd.device,
                cmd.msgid.as_str(),
                &outcome,
                RESULT_TTL_MS,
            )
            .await;
        if let Err(error) = sent {
            shared.metrics.bus_errors.inc();
            warn!(message = "could not report command failure", %error);
        }
    }
    let alert = serde_json::json!({
        "ver": fleetgate_protocol::PROTOCOL_VERSION,
        "type": "event",
        "from": "server",
        "timestamp": now_ms(),
        "payload": {
            "event": "command_failed",
            "device": cmd.device,
            "msgid": cmd.msgid.as_str(),
            "reason": reason.as_str(),
            "attempts": q.attempts,
        }
    });
    let frame = bytes::Bytes::from(alert.to_string());
    if let Err(error) = shared.bus.publish(&Channel::Alerts, frame, false).await {
        shared.metrics.bus_errors.inc();
        warn!(message = "could not publish command failure", %error);
    }
}

/// Drains the node: readiness off, membership marked draining, then every session closed
/// with 1012 at a point spread evenly over the drain period, then waits (bounded) for their
/// tasks to end.
pub(crate) async fn drain(shared: &Shared) {
    shared.draining.store(true, Ordering::Relaxed);
    // App clients recover from their offsets on another node; they go first.
    shared.app.drain.cancel();
    heartbeat_once(shared).await;
    let sessions = shared.sessions.snapshot();
    let period = shared.config.drain_period;
    info!(
        message = "draining",
        sessions = sessions.len(),
        period_ms = period.as_millis() as u64
    );
    let n = sessions.len().max(1) as u32;
    let start = tokio::time::Instant::now();
    for (i, outbox) in sessions.into_iter().enumerate() {
        let at = start + period.mul_f64(f64::from(i as u32) / f64::from(n));
        tokio::time::sleep_until(at).await;
        // Each device is told to come back after a jittered delay, so the survivors see a
        // ramp rather than a wall.
        let retry_ms = rand::rng().random_range(0..=period.as_millis().max(1) as u64);
        let reason = retry_after_reason("node draining", retry_ms);
        if outbox
            .try_push(Outbound::Close(Box::new((CloseCode::Draining, reason))))
            .is_err()
        {
            // Full: the session is stuck writing; closing its outbox ends it all the same.
            outbox.close();
        }
    }
    shared.tracker.close();
    let grace = period.max(Duration::from_secs(1));
    if tokio::time::timeout(grace, shared.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            message = "drain grace period ended with sessions still open",
            open = shared.tracker.len()
        );
    }
    if !shared.bus.connected() {
        // Presence naming this node reads as offline once its membership expires.
        warn!(message = "bus unavailable; leaving own presence to expire");
    } else if let Err(error) = shared.bus.presence_sweep_node(&shared.config.node_id).await {
        warn!(message = "could not sweep own presence", %error);
    }
}
