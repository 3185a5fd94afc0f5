//! `GET /v1/mqtt`: web clients subscribing and publishing to MQTT topics through the node's
//! one shared MQTT client ([`fleetgate_mqtt::Bridge`]). The protocol is in docs/PROTOCOL.md;
//! its frames are [`fleetgate_protocol::mqtt`].
//!
//! Principals, authentication and per-principal connection slots are `/v1/app`'s (the same
//! helpers); what a principal may do is decided by the topic ACLs alone.

pub(crate) mod device;
mod session;

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use fleetgate_mqtt::{Bridge, TopicAcl};
use tracing::{Instrument, info_span, warn};

use crate::Shared;
use crate::app::{Admitted, admit};

/// What `/v1/mqtt` needs: the node's bridge and the topic ACLs.
#[derive(Debug, Clone)]
pub struct MqttAccess {
    /// The node's shared MQTT client.
    pub bridge: Bridge,
    /// Who may publish and subscribe to what.
    pub acl: TopicAcl,
    /// How long a node holds an MQTT device that publishes nothing (it then reads as
    /// offline until its next message).
    pub device_idle: std::time::Duration,
}

/// The 503 when no broker is configured, in the error shape of every HTTP answer.
fn not_configured() -> Response {
    crate::http::json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "mqtt_unavailable",
        "this node has no MQTT broker configured (FLEETGATE_MQTT_URL)",
    )
}

pub(crate) async fn upgrade(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Some(access) = shared.mqtt.get().cloned() else {
        return not_configured();
    };
    let admitted = match admit(&shared, &headers, ws).await {
        Ok(a) => a,
        Err(refused) => return *refused,
    };
    let span = info_span!("mqtt", client = admitted.client, node_id = %shared.config.node_id,
        actor = tracing::field::Empty);
    let Admitted {
        ws,
        permit,
        admission,
        token,
        ..
    } = admitted;
    ws.on_failed_upgrade(|error| warn!(message = "mqtt upgrade failed", %error))
        .on_upgrade(move |socket| {
            async move {
                session::run(shared, access, socket, admission).await;
                drop(permit);
                drop(token);
            }
            .instrument(span)
        })
}
