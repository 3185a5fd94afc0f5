//! Sending one command to one device and waiting for its outcome: the path every caller
//! shares (the admin API's REST call and the gateway's `/v1/app` command frames), so they
//! queue, notify and wait alike.
//!
//! [`Waiters`] is the waiting side: one listener task per process reads a node channel of its
//! own and completes the waiting call by msgid. When the bus says messages may have been lost
//! ([`NodeMessage::Resync`]), the listener reads every pending call's stored result instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use fleetgate_protocol::{MsgId, Qos};
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::warn;

use crate::{Bus, BusError, Command, CommandOutcome, NodeMessage, Presence};

/// Per msgid: the device (to read a stored result) and the waiting call.
type Pending = Arc<Mutex<HashMap<String, (String, oneshot::Sender<CommandOutcome>)>>>;

/// The calls waiting for results, by msgid.
pub struct Waiters {
    pending: Pending,
}

/// Removes its entry when the waiting call ends, however it ends.
pub struct Wait {
    pending: Pending,
    msgid: String,
    rx: Option<oneshot::Receiver<CommandOutcome>>,
}

impl Wait {
    /// The outcome, once the device answers (or the command fails).
    pub async fn outcome(&mut self) -> Option<CommandOutcome> {
        match self.rx.as_mut() {
            Some(rx) => rx.await.ok(),
            None => None,
        }
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        lock(&self.pending).remove(&self.msgid);
    }
}

fn lock(
    p: &Pending,
) -> std::sync::MutexGuard<'_, HashMap<String, (String, oneshot::Sender<CommandOutcome>)>> {
    // Every critical section is one map operation, so a poisoned map is still consistent.
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl Waiters {
    /// Starts the listener on node channel `node_id` (the `reply_to` of the commands).
    ///
    /// # Errors
    /// When the bus refuses the subscription.
    pub async fn start(bus: Arc<dyn Bus>, node_id: &str) -> Result<Self, BusError> {
        let mut rx = bus.node_subscribe(node_id).await?;
        let pending: Pending = Arc::default();
        let listener = pending.clone();
        let node_id = node_id.to_owned();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Some(NodeMessage::CommandResult { msgid, outcome, .. }) => {
                        complete(&listener, &msgid, outcome);
                    }
                    Some(NodeMessage::Resync) => {
                        tokio::spawn(read_back(bus.clone(), listener.clone()));
                    }
                    Some(_) => {}
                    None => {
                        // The bus dropped our subscription; take a new one so waits keep working.
                        match bus.node_subscribe(&node_id).await {
                            Ok(new) => rx = new,
                            Err(error) => {
                                warn!(message = "command result listener lost its subscription", %error);
                                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                            }
                        }
                    }
                }
                if Arc::strong_count(&listener) == 1 {
                    break;
                }
            }
        });
        Ok(Self { pending })
    }

    /// Registers interest in `msgid`'s outcome. Register before the command is queued, so
    /// a fast answer cannot be missed.
    pub fn wait(&self, device: &str, msgid: &str) -> Wait {
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(msgid.to_owned(), (device.to_owned(), tx));
        Wait {
            pending: self.pending.clone(),
            msgid: msgid.to_owned(),
            rx: Some(rx),
        }
    }
}

fn complete(pending: &Pending, msgid: &str, outcome: CommandOutcome) {
    if let Some((_, tx)) = lock(pending).remove(msgid) {
        let _ = tx.send(outcome);
    }
}

/// Completes every pending call whose result is stored: its message may have been lost.
async fn read_back(bus: Arc<dyn Bus>, pending: Pending) {
    let waiting: Vec<(String, String)> = lock(&pending)
        .iter()
        .map(|(msgid, (device, _))| (device.clone(), msgid.clone()))
        .collect();
    for (device, msgid) in waiting {
        match bus.result_get(&device, &msgid).await {
            Ok(Some(outcome)) => complete(&pending, &msgid, outcome),
            Ok(None) => {}
            Err(error) => {
                // The calls still end by their deadline, which reads the result once more.
                warn!(message = "could not read back command results", %error);
                return;
            }
        }
    }
}

/// A fresh msgid for a server-originated command.
pub fn new_msgid() -> MsgId {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 12]>());
    MsgId::new(raw).expect("base64url of 12 bytes is a valid msgid")
}

/// One command to send, already checked by the caller (role, scope, limits).
#[derive(Debug, Clone)]
pub struct CommandRequest {
    /// The device.
    pub device: String,
    /// Opaque to the gateway.
    pub payload: Value,
    /// Delivery guarantee.
    pub qos: Qos,
    /// How long it stays queued unacknowledged.
    pub ttl: Duration,
    /// How long to wait for the outcome (zero: answer once queued).
    pub wait: Duration,
    /// W3C trace context to carry to the owning node.
    pub traceparent: Option<String>,
}

/// What became of a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Dispatched {
    /// QoS 1/2 queued (not waited for), or QoS 0 written to the device's node.
    Queued,
    /// QoS 0 and the device is offline: nothing was sent (QoS 0 is never queued).
    Offline,
    /// The device's answer (or the command's failure).
    Outcome(CommandOutcome),
    /// No outcome within the wait; the command stays queued until its TTL.
    Timeout,
}

/// Sends `request` with a new msgid: QoS 0 straight to the device's node (`presence`, as the
/// caller read it), QoS 1/2 through the device's queue, whose push tells the owning node in
/// the same step. Waits as asked; a result message lost on the way is read from the stored
/// copy before giving up. Returns the msgid with the outcome.
///
/// # Errors
/// The bus's, with the msgid ([`BusError::QueueFull`] when the queue is full).
pub async fn dispatch(
    bus: &dyn Bus,
    waiters: &Waiters,
    reply_to: &str,
    presence: Option<&Presence>,
    request: CommandRequest,
) -> Result<(MsgId, Dispatched), (MsgId, BusError)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let msgid = new_msgid();
    let waits = !request.wait.is_zero();
    let command = Command {
        msgid: msgid.clone(),
        device: request.device.clone(),
        payload: request.payload,
        qos: request.qos,
        created_ms: now,
        expires_ms: now.saturating_add(i64::try_from(request.ttl.as_millis()).unwrap_or(i64::MAX)),
        reply_to: waits.then(|| reply_to.to_owned()),
        traceparent: request.traceparent,
        job: None,
    };
    if request.qos == Qos::AtMostOnce {
        let Some(p) = presence else {
            return Ok((msgid, Dispatched::Offline));
        };
        return match bus
            .node_publish(&p.node, &NodeMessage::Command(command))
            .await
        {
            Ok(()) => Ok((msgid, Dispatched::Queued)),
            Err(e) => Err((msgid, e)),
        };
    }
    let m = msgid.as_str().to_owned();
    let mut waiter = waits.then(|| waiters.wait(&request.device, &m));
    if let Err(e) = bus.queue_push(&command).await {
        return Err((msgid, e));
    }
    let Some(waiter) = waiter.as_mut() else {
        return Ok((msgid, Dispatched::Queued));
    };
    let outcome = match tokio::time::timeout(request.wait, waiter.outcome()).await {
        Ok(Some(outcome)) => Some(outcome),
        // The result message may have been lost on the way (a bus reconnect): the stored
        // copy decides before the call gives up.
        Ok(None) | Err(_) => bus.result_get(&request.device, &m).await.ok().flatten(),
    };
    Ok((
        msgid,
        outcome.map_or(Dispatched::Timeout, Dispatched::Outcome),
    ))
}
