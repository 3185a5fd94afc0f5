//! fleetgate device SDK: speaks wire protocol v1 to the gateway's `/v1/device` endpoint.
//!
//! Shaped like rumqttc: [`Device::connect`] spawns one event loop task per device and
//! returns a cloneable [`DeviceClient`] plus a bounded receiver of [`DeviceEvent`]s.
//!
//! ```no_run
//! # async fn demo() -> Result<(), fleetgate_device::DeviceError> {
//! use fleetgate_device::{Device, DeviceEvent, DeviceOptions, Qos};
//! let opts = DeviceOptions::new("ws://127.0.0.1:8080/v1/device", "sensor-001", "secret");
//! let (client, mut events) = Device::connect(opts)?;
//! client.send_status(serde_json::json!({"temp": 21.5}), Qos::AtLeastOnce).await?;
//! while let Some(event) = events.recv().await {
//!     if let DeviceEvent::Command(cmd) = event {
//!         cmd.respond(Some(serde_json::json!({"ok": true}))).await?;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! - Sends return once delivered as their QoS demands (QoS 0 written, 1 `ack`, 2 `comp`).
//!   Unacknowledged QoS 1/2 messages are retransmitted with `dup: true` after
//!   `ack_timeout` (doubling, up to `max_attempts`) and again after every reconnect, with
//!   their original msgids (a QoS 2 message whose `rec` arrived resends `rel`).
//! - Received commands are deduplicated by msgid (last `dedupe_capacity`); a redelivery is
//!   answered with the stored answer and not surfaced again.
//! - Reconnects use exponential backoff with full jitter, or the server's
//!   `retry-after=<ms>`; closes 4400, 4403, 4410 (and 4409 unless
//!   [`DeviceOptions::reconnect_on_replaced`]) stop the loop: see [`should_reconnect`].
//! - Every channel is bounded; the event channel drops (and counts) events rather than
//!   stall acks and heartbeats behind a slow reader.
//!
//! [`AppClient`] is the other end: a dashboard or integration subscribing to `/v1/app`
//! channels, recovering from its offsets after a reconnect.
//!
//! [`Connection`] is the low-level layer (upgrade, auth, typed frames) for tests that drive
//! the raw protocol.

mod app;
mod backoff;
mod client;
mod connection;
mod dedupe;
mod error;
mod eventloop;
mod msgid;
mod options;
mod refresh;
mod tls;

pub use app::{AppClient, AppError, AppEvent, Positions};
pub use backoff::should_reconnect;
pub use client::{BatchItem, Device, DeviceClient, DeviceEvent, IncomingCommand, LinkState};
pub use connection::{Connection, Session, WsStream};
pub use error::DeviceError;
pub use eventloop::EventLoop;
pub use msgid::MsgIdGen;
pub use options::{AuthMode, DeviceOptions};
pub use refresh::TokenSource;
/// The TLS library of [`DeviceOptions::tls`], for building a config by hand.
pub use rustls;
pub use tls::tls_client_config;

pub use fleetgate_protocol::{Codec, ErrorCode, ErrorFrame, Frame, MessageKind, MsgId, Qos};
/// The raw WebSocket message type of [`Connection::send_message`].
pub use tokio_tungstenite::tungstenite::Message as WsMessage;
