//! The application-facing half: [`Device`] starts an event loop, [`DeviceClient`] sends
//! through it, [`DeviceEvent`]s come back on a bounded channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetgate_protocol::{Envelope, ErrorFrame, MessageKind, MsgId, PROTOCOL_VERSION, Qos};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use crate::eventloop::EventLoop;
use crate::{DeviceError, DeviceOptions, MsgIdGen};

/// Whether the event loop currently holds an authenticated session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Connecting, or waiting to reconnect.
    Connecting,
    /// Authenticated; messages flow.
    Connected,
    /// The event loop ended and will not reconnect.
    Stopped,
}

/// What the event loop reports to the application.
///
/// After a final event (`AuthFailed`, or `Disconnected`/`ConnectFailed` with
/// `reconnect_in: None`) the channel closes.
#[derive(Debug)]
pub enum DeviceEvent {
    /// A session was authenticated.
    Connected {
        /// The gateway's ID for the session.
        session_id: String,
        /// How often the gateway pings.
        heartbeat_ms: u64,
        /// Sessions that came before this one (0 on the first connect).
        reconnects: u32,
    },
    /// An authenticated session ended.
    Disconnected {
        /// The gateway's close code; `None` when the link dropped without one.
        code: Option<u16>,
        /// The close reason or the transport error.
        reason: String,
        /// When the next attempt starts; `None` when the loop stops (final close code or
        /// [`DeviceClient::disconnect`]).
        reconnect_in: Option<Duration>,
    },
    /// A connection attempt failed before authentication completed.
    ConnectFailed {
        /// What failed.
        reason: String,
        /// When the next attempt starts; `None` when the failure is final.
        reconnect_in: Option<Duration>,
    },
    /// The gateway refused the credentials (auth_response error, close 4403 or HTTP
    /// 401/403). Final.
    AuthFailed {
        /// The gateway's words.
        reason: String,
    },
    /// A command to execute; answer it with [`IncomingCommand::respond`]. Redeliveries of a
    /// command already surfaced are not reported again.
    Command(Box<IncomingCommand>),
    /// The gateway rejected one message with an `error` frame; the session continues.
    Error(Box<ErrorFrame>),
    /// Operators want this state (desired keys that differ from what the device reported).
    /// Apply it and report it with a status; the shadow is in sync once reported matches.
    Delta {
        /// The shadow version the delta belongs to.
        version: u64,
        /// Keys and the values wanted for them.
        state: serde_json::Map<String, serde_json::Value>,
    },
}

/// The answer to a command, travelling to the event loop.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) msgid: MsgId,
    pub(crate) qos: Qos,
    pub(crate) payload: Option<Value>,
}

/// A message for the event loop to deliver, and whom to tell.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) env: Envelope,
    pub(crate) done: oneshot::Sender<Result<MsgId, DeviceError>>,
}

/// Client -> event loop requests; boxed so the channel's preallocated slots stay small.
#[derive(Debug)]
pub(crate) enum Request {
    Publish(Box<Outgoing>),
    Answer(Box<Answer>),
}

/// A command received from the gateway.
#[derive(Debug)]
pub struct IncomingCommand {
    /// The command's msgid; the answer reuses it.
    pub msgid: MsgId,
    /// The command body, opaque to the gateway.
    pub payload: Value,
    /// How the answer is expected: QoS 0 none, 1 `ack`, 2 `rec` (then `comp` on `rel`).
    pub qos: Qos,
    /// The gateway marked it a retransmission. Set when this device did not remember the
    /// msgid (e.g. after a restart), so it may have run before.
    pub dup: bool,
    /// The gateway's send time, ms since the epoch.
    pub timestamp: i64,
    pub(crate) responder: mpsc::WeakSender<Request>,
}

impl IncomingCommand {
    /// Answers with `payload.result` (QoS 1 `ack`, QoS 2 `rec`); `None` sends no payload.
    /// A no-op for QoS 0. The answer is remembered and re-sent if the command is
    /// redelivered.
    ///
    /// # Errors
    /// [`DeviceError::Stopped`] when the event loop has ended.
    pub async fn respond(self, result: Option<Value>) -> Result<(), DeviceError> {
        let payload = result.map(|r| json!({ "result": r }));
        self.answer(payload).await
    }

    /// Answers with `payload.error`, the way [`IncomingCommand::respond`] answers results.
    ///
    /// # Errors
    /// [`DeviceError::Stopped`] when the event loop has ended.
    pub async fn respond_error(self, error: Value) -> Result<(), DeviceError> {
        self.answer(Some(json!({ "error": error }))).await
    }

    async fn answer(self, payload: Option<Value>) -> Result<(), DeviceError> {
        if self.qos == Qos::AtMostOnce {
            return Ok(());
        }
        let tx = self.responder.upgrade().ok_or(DeviceError::Stopped)?;
        let answer = Answer {
            msgid: self.msgid,
            qos: self.qos,
            payload,
        };
        tx.send(Request::Answer(Box::new(answer)))
            .await
            .map_err(|_| DeviceError::Stopped)
    }
}

/// One status or event inside a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    /// `Status` or `Event`.
    pub kind: MessageKind,
    /// The item's body.
    pub payload: Value,
    /// When it was measured (ms since the epoch); `None` = when the batch is built.
    pub timestamp: Option<i64>,
    /// Keep as the channel's last value.
    pub retain: bool,
}

impl BatchItem {
    /// A status item stamped now.
    pub fn status(payload: Value) -> Self {
        Self {
            kind: MessageKind::Status,
            payload,
            timestamp: None,
            retain: false,
        }
    }

    /// An event item stamped now.
    pub fn event(payload: Value) -> Self {
        Self {
            kind: MessageKind::Event,
            payload,
            timestamp: None,
            retain: false,
        }
    }
}

/// State shared by client handles and the event loop.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) device_id: String,
    pub(crate) ids: MsgIdGen,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) state: watch::Sender<LinkState>,
    pub(crate) dropped_events: AtomicU64,
}

/// Entry point: starts a device's event loop.
///
/// The event loop owns the connection, reconnects on its own and ends on
/// [`DeviceClient::disconnect`], on a final close (see [`crate::should_reconnect`]), or
/// when every [`DeviceClient`] clone has been dropped.
#[derive(Debug)]
pub struct Device;

impl Device {
    /// Validates `opts`, spawns the event loop on the current tokio runtime and returns a
    /// cloneable client plus the bounded event receiver.
    ///
    /// Events that find the channel full are dropped and counted
    /// ([`DeviceClient::dropped_events`]) so a slow reader never stalls acks or heartbeats;
    /// a dropped QoS 1/2 command is not remembered, so the gateway's redelivery surfaces it.
    ///
    /// # Errors
    /// [`DeviceError::InvalidOptions`].
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn connect(
        opts: DeviceOptions,
    ) -> Result<(DeviceClient, mpsc::Receiver<DeviceEvent>), DeviceError> {
        let (client, events, event_loop) = Self::prepare(opts)?;
        tokio::spawn(event_loop.run());
        Ok((client, events))
    }

    /// Like [`Device::connect`] but returns the event loop for the caller to spawn (e.g. on
    /// a `TaskTracker`); nothing happens until it runs.
    ///
    /// # Errors
    /// [`DeviceError::InvalidOptions`].
    pub fn prepare(
        opts: DeviceOptions,
    ) -> Result<(DeviceClient, mpsc::Receiver<DeviceEvent>, EventLoop), DeviceError> {
        opts.validate()?;
        let (req_tx, req_rx) = mpsc::channel(opts.request_capacity);
        let (ev_tx, ev_rx) = mpsc::channel(opts.event_capacity);
        let shared = Arc::new(Shared {
            device_id: opts.device_id.clone(),
            ids: MsgIdGen::new(),
            shutdown: watch::Sender::new(false),
            state: watch::Sender::new(LinkState::Connecting),
            dropped_events: AtomicU64::new(0),
        });
        let event_loop =
            EventLoop::new(opts, Arc::clone(&shared), req_rx, ev_tx, req_tx.downgrade());
        Ok((DeviceClient { tx: req_tx, shared }, ev_rx, event_loop))
    }
}

/// A cloneable handle for sending through a device's event loop.
#[derive(Debug, Clone)]
pub struct DeviceClient {
    tx: mpsc::Sender<Request>,
    shared: Arc<Shared>,
}

impl DeviceClient {
    /// The device ID messages are sent from.
    pub fn device_id(&self) -> &str {
        &self.shared.device_id
    }

    /// Sends a `status`; see [`DeviceClient::send`].
    ///
    /// # Errors
    /// As [`DeviceClient::send`].
    pub async fn send_status(&self, payload: Value, qos: Qos) -> Result<MsgId, DeviceError> {
        self.send(MessageKind::Status, payload, qos, false).await
    }

    /// Sends an `event`; see [`DeviceClient::send`].
    ///
    /// # Errors
    /// As [`DeviceClient::send`].
    pub async fn send_event(&self, payload: Value, qos: Qos) -> Result<MsgId, DeviceError> {
        self.send(MessageKind::Event, payload, qos, false).await
    }

    /// Sends a message and returns its msgid once delivered as `qos` demands: QoS 0 once
    /// written to the socket, QoS 1 on `ack`, QoS 2 on `comp`. While offline the message
    /// waits (up to `max_inflight`) and goes out after reconnecting; wrap the call in
    /// `tokio::time::timeout` to bound the wait.
    ///
    /// # Errors
    /// [`DeviceError::AckTimeout`] after `max_attempts` transmissions;
    /// [`DeviceError::Refused`] when the gateway answered with an `error` frame;
    /// [`DeviceError::Stopped`] when the event loop ended first; for QoS 0 the write error.
    pub async fn send(
        &self,
        kind: MessageKind,
        payload: Value,
        qos: Qos,
        retain: bool,
    ) -> Result<MsgId, DeviceError> {
        if kind == MessageKind::Command {
            return Err(DeviceError::InvalidOptions(
                "devices cannot send commands".into(),
            ));
        }
        let env = self.envelope(kind, payload, qos, retain, None);
        self.deliver(env).await
    }

    /// Sends a `batch` whose `payload.items` are the given statuses/events. Items are
    /// QoS 0 with their own msgids; the batch itself is delivered as `qos` demands, and its
    /// ack means the whole batch is durable.
    ///
    /// # Errors
    /// As [`DeviceClient::send`].
    pub async fn send_batch(&self, items: Vec<BatchItem>, qos: Qos) -> Result<MsgId, DeviceError> {
        let mut values = Vec::with_capacity(items.len());
        for item in items {
            if !matches!(item.kind, MessageKind::Status | MessageKind::Event) {
                return Err(DeviceError::InvalidOptions(
                    "batch items must be status or event".into(),
                ));
            }
            let env = self.envelope(
                item.kind,
                item.payload,
                Qos::AtMostOnce,
                item.retain,
                item.timestamp,
            );
            values.push(fleetgate_protocol::json::envelope_into_value(env));
        }
        let env = self.envelope(
            MessageKind::Batch,
            json!({ "items": values }),
            qos,
            false,
            None,
        );
        self.deliver(env).await
    }

    /// A fresh msgid from this device's generator.
    pub fn next_msgid(&self) -> MsgId {
        self.shared.ids.next_id()
    }

    /// The current link state.
    pub fn state(&self) -> LinkState {
        *self.shared.state.borrow()
    }

    /// A receiver of link state changes.
    pub fn watch_state(&self) -> watch::Receiver<LinkState> {
        self.shared.state.subscribe()
    }

    /// Waits until a session is authenticated.
    ///
    /// # Errors
    /// [`DeviceError::Stopped`] when the event loop ends instead.
    pub async fn wait_connected(&self) -> Result<(), DeviceError> {
        let mut rx = self.shared.state.subscribe();
        let state = *rx
            .wait_for(|s| *s != LinkState::Connecting)
            .await
            .map_err(|_| DeviceError::Stopped)?;
        match state {
            LinkState::Connected => Ok(()),
            _ => Err(DeviceError::Stopped),
        }
    }

    /// Events dropped because the event channel was full.
    pub fn dropped_events(&self) -> u64 {
        self.shared.dropped_events.load(Ordering::Relaxed)
    }

    /// Closes the session with 1000 and stops the event loop; pending sends fail with
    /// [`DeviceError::Stopped`]. Returns once the loop has stopped.
    pub async fn disconnect(&self) {
        self.shared.shutdown.send_replace(true);
        let mut rx = self.shared.state.subscribe();
        let _ = rx.wait_for(|s| *s == LinkState::Stopped).await;
    }

    fn envelope(
        &self,
        kind: MessageKind,
        payload: Value,
        qos: Qos,
        retain: bool,
        timestamp: Option<i64>,
    ) -> Envelope {
        Envelope {
            ver: PROTOCOL_VERSION.to_owned(),
            msgid: self.shared.ids.next_id(),
            timestamp: timestamp.unwrap_or_else(now_ms),
            from: self.shared.device_id.clone(),
            to: "server".to_owned(),
            kind,
            payload,
            qos,
            retain,
            dup: false,
            sig: None,
        }
    }

    async fn deliver(&self, env: Envelope) -> Result<MsgId, DeviceError> {
        let (done, rx) = oneshot::channel();
        let req = Request::Publish(Box::new(Outgoing { env, done }));
        self.tx.send(req).await.map_err(|_| DeviceError::Stopped)?;
        rx.await.map_err(|_| DeviceError::Stopped)?
    }
}

/// Wall clock in ms since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
