//! `GET /v1/app`: WebSocket sessions for dashboards and apps. The protocol is in
//! docs/PROTOCOL.md; its frames are [`fleetgate_protocol::app`].
//!
//! Principals are the admin API's (user tokens, API keys), checked with the same
//! [`fleetgate_authz`] rules. Channels fan out through the node's [`hub::Hub`].

mod access;
mod command;
pub(crate) mod hub;
pub(crate) mod session;

pub use command::{AppCommands, CommandLimits};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use fleetgate_authz::{Authenticator, AuthnError, Principal};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::Shared;
use crate::http::{json_error, unavailable, upgradable};

/// The app side of a node: who may connect, the hub, and per-principal connection counts.
pub(crate) struct AppState {
    pub(crate) authn: Arc<Authenticator>,
    /// Commands from app sessions; `None` answers them `forbidden`.
    pub(crate) commands: Option<Arc<AppCommands>>,
    pub(crate) hub: Arc<hub::Hub>,
    /// Connections per principal (actor) on this node.
    connections: Mutex<HashMap<String, usize>>,
    /// Cancelled when the node drains: app sessions close with 1012.
    pub(crate) drain: CancellationToken,
}

impl AppState {
    pub(crate) fn new(access: AppAccess, hub: Arc<hub::Hub>) -> Self {
        Self {
            authn: access.principals,
            commands: access.commands.map(Arc::new),
            hub,
            connections: Mutex::default(),
            drain: CancellationToken::new(),
        }
    }
}

/// Who may use `/v1/app` and how its commands are sent and audited.
pub struct AppAccess {
    /// The admin API's principals (the same authenticator in one process, else one with the
    /// same token keys).
    pub principals: Arc<Authenticator>,
    /// Command frames; `None` refuses them (`forbidden`).
    pub commands: Option<AppCommands>,
}

/// One of a principal's connections on this node; released on drop.
pub(crate) struct Slot {
    shared: Arc<Shared>,
    actor: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self
            .shared
            .app
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.actor) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.actor);
            }
        }
    }
}

/// Takes one of `principal`'s connection slots, or `None` when it holds the most allowed.
pub(crate) fn take_slot(shared: &Arc<Shared>, principal: &Principal) -> Option<Slot> {
    let max = shared.config.app.max_connections_per_principal;
    let mut counts = shared
        .app
        .connections
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let n = counts.entry(principal.actor.clone()).or_default();
    if *n >= max {
        return None;
    }
    *n += 1;
    Some(Slot {
        shared: shared.clone(),
        actor: principal.actor.clone(),
    })
}

/// Publishes a device coming online or going offline on `presence:<group>` of each of its
/// groups. Costs nothing on the bus where nobody watches those channels.
pub(crate) async fn announce_presence(
    shared: &Shared,
    device: &str,
    groups: &[String],
    online: bool,
) {
    if groups.is_empty() {
        return;
    }
    let frame = serde_json::json!({
        "type": "presence",
        "device": device,
        "online": online,
        "node": shared.config.node_id,
        "timestamp": crate::now_ms(),
    });
    let frame = bytes::Bytes::from(frame.to_string());
    for g in groups {
        let channel = fleetgate_bus::Channel::Presence(g.clone());
        if let Err(error) = shared.bus.publish(&channel, frame.clone(), false).await {
            shared.metrics.bus_errors.inc();
            warn!(message = "presence publish failed", %error);
        }
    }
}

/// How a socket arrives at its session.
pub(crate) enum Admission {
    /// Authenticated by the `Authorization` header.
    Authenticated(Principal, Slot),
    /// Must send `{"type":"auth","token":...}` first.
    AwaitAuthFrame,
}

/// The refusal's reason as a stable string (it never quotes the credential).
pub(crate) fn refusal_reason(error: &AuthnError) -> &'static str {
    match error {
        AuthnError::Refused(reason) => reason,
        AuthnError::Bus(_) => "unavailable",
    }
}

/// Authenticates an upgrade by its `Authorization` header, as `/v1/app` and `/v1/mqtt` both
/// do: a principal with a connection slot, a first-frame auth to wait for when there is no
/// header, or the HTTP answer refusing the upgrade.
pub(crate) async fn header_admission(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
) -> Result<Admission, Box<Response>> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    Ok(match authorization {
        Some(value) => match shared
            .app
            .authn
            .authenticate(&*shared.bus, Some(value))
            .await
        {
            Ok(principal) => match take_slot(shared, &principal) {
                Some(slot) => Admission::Authenticated(principal, slot),
                None => {
                    return Err(Box::new(json_error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too_many_connections",
                        "the principal holds the most app and MQTT connections allowed on this node",
                    )));
                }
            },
            Err(AuthnError::Bus(error)) => {
                shared.metrics.bus_errors.inc();
                warn!(message = "app auth lookup failed", %error);
                return Err(Box::new(unavailable(
                    "bus_unavailable",
                    "cannot verify credentials now",
                    1,
                )));
            }
            Err(refused) => {
                shared.metrics.auth_failures.inc();
                return Err(Box::new(json_error(
                    StatusCode::UNAUTHORIZED,
                    refusal_reason(&refused),
                    "authentication failed",
                )));
            }
        },
        None => Admission::AwaitAuthFrame,
    })
}

pub(crate) async fn upgrade(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let admitted = match admit(&shared, &headers, ws).await {
        Ok(a) => a,
        Err(refused) => return *refused,
    };
    let span = info_span!("app", client = admitted.client, node_id = %shared.config.node_id,
        actor = tracing::field::Empty);
    let Admitted {
        ws,
        permit,
        admission,
        token,
        client,
    } = admitted;
    ws.on_failed_upgrade(|error| warn!(message = "app upgrade failed", %error))
        .on_upgrade(move |socket| {
            async move {
                session::run(shared, socket, client, admission).await;
                drop(permit);
                drop(token);
            }
            .instrument(span)
        })
}

/// A socket let through the prelude every `/v1/app` and `/v1/mqtt` upgrade shares.
pub(crate) struct Admitted {
    /// The upgrade, with the app sessions' buffer sizes and frame limits.
    pub(crate) ws: WebSocketUpgrade,
    /// One of the node's socket permits, held while the session lives.
    pub(crate) permit: tokio::sync::OwnedSemaphorePermit,
    /// What the headers said about the principal.
    pub(crate) admission: Admission,
    /// Keeps drain waiting for the session.
    pub(crate) token: tokio_util::task::task_tracker::TaskTrackerToken,
    /// A random ID for the session's log span.
    pub(crate) client: u64,
}

/// The shared prelude: the WebSocket and drain checks, a socket permit, header auth, and
/// the buffer sizes (no write buffer kept; queues are bounded in bytes instead).
pub(crate) async fn admit(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Admitted, Box<Response>> {
    let ws = upgradable(shared, ws)?;
    let Ok(permit) = shared.sockets_capacity.clone().try_acquire_owned() else {
        shared.metrics.connections_rejected.inc();
        return Err(Box::new(unavailable(
            "at_capacity",
            "node is at its connection limit",
            5,
        )));
    };
    let admission = header_admission(shared, headers).await?;
    let max = shared.config.limits.max_frame_bytes;
    let ws = ws
        .read_buffer_size(shared.config.read_buffer_bytes)
        .write_buffer_size(0)
        .max_write_buffer_size(max.max(shared.config.app.queue_bytes) + 64 * 1024)
        .max_message_size(max)
        .max_frame_size(max);
    Ok(Admitted {
        ws,
        permit,
        admission,
        token: shared.tracker.token(),
        client: rand::random(),
    })
}
