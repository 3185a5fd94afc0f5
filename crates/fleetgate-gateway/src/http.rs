//! HTTP surface: the `/v1/device` upgrade (and the routes to `/v1/app` and `/v1/mqtt`) (capacity, drain and header auth are checked before
//! the upgrade) and the internal listener.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fleetgate_protocol::{Codec, SUBPROTOCOL_JSON, SUBPROTOCOL_PROTO};
use fleetgate_tls::Peer;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::Shared;
use crate::auth::AuthError;
use crate::session::{self, Admission};

pub(crate) fn public_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/device", get(device_upgrade))
        .route("/v1/app", get(crate::app::upgrade))
        .route("/v1/mqtt", get(crate::mqtt::upgrade))
        .fallback(|| async {
            json_error(
                StatusCode::NOT_FOUND,
                "not_found",
                "devices connect to /v1/device, apps to /v1/app, MQTT web clients to /v1/mqtt",
            )
        })
        .with_state(shared)
}

#[derive(Deserialize)]
struct DeviceQuery {
    device_id: Option<String>,
}

/// `{"error":{"code","message"}}` with a status, the error shape of every HTTP answer.
pub(crate) fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (status, axum::Json(body)).into_response()
}

pub(crate) fn unavailable(code: &str, message: &str, retry_after_s: u32) -> Response {
    let mut resp = json_error(StatusCode::SERVICE_UNAVAILABLE, code, message);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    resp
}

/// The checks every upgrade starts with: a WebSocket request, to a node that is not draining.
pub(crate) fn upgradable(
    shared: &Shared,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<WebSocketUpgrade, Box<Response>> {
    let ws = ws.map_err(|rejection| {
        Box::new(json_error(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            &rejection.body_text(),
        ))
    })?;
    if shared.draining.load(Ordering::Relaxed) {
        shared.metrics.connections_rejected.inc();
        return Err(Box::new(unavailable(
            "draining",
            "node is draining; connect to another node",
            1,
        )));
    }
    Ok(ws)
}

async fn device_upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    query: Result<Query<DeviceQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let ws = match upgradable(&shared, ws) {
        Ok(ws) => ws,
        Err(refused) => return *refused,
    };
    // Refuse before upgrading when the node is full: the cheapest answer, and one a load
    // balancer can act on.
    let full = || {
        shared.metrics.connections_rejected.inc();
        unavailable("at_capacity", "node is at its connection limit", 5)
    };
    if shared.sessions_capacity.available_permits() == 0 {
        return full();
    }
    let Ok(socket_permit) = shared.sockets_capacity.clone().try_acquire_owned() else {
        return full();
    };
    let routed_id = headers
        .get("device-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| query.ok().and_then(|q| q.0.device_id))
        .filter(|id| !id.is_empty());
    if routed_id.as_ref().is_some_and(|id| id.len() > 128) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_device_id",
            "device ID longer than 128 bytes",
        );
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let cert = peer.client_cert.as_deref();
    if (bearer.is_some() || cert.is_some()) && !shared.bus.connected() {
        shared.metrics.bus_errors.inc();
        return unavailable("bus_unavailable", "cannot verify credentials now", 1);
    }
    let authenticated = match (cert, bearer) {
        // The certificate is the stronger credential and the TLS layer checked it already.
        (Some(cert), _) => Some(
            shared
                .auth
                .authenticate_certificate(cert, &shared.config.cert_identity, routed_id.as_deref())
                .await,
        ),
        (None, Some(token)) => Some(shared.auth.authenticate(routed_id.as_deref(), token).await),
        (None, None) => None,
    };
    let admission = match authenticated {
        Some(Ok(device)) => Admission::Authenticated(device),
        Some(Err(AuthError::Unavailable(error))) => {
            shared.metrics.bus_errors.inc();
            warn!(message = "auth lookup failed", %error);
            return unavailable("bus_unavailable", "cannot verify credentials now", 1);
        }
        // A certificate's failure is told over the WebSocket (auth_response, then 4403): the
        // device has no other credential to retry with at the HTTP level.
        Some(Err(error)) if cert.is_some() => {
            shared.metrics.auth_failures.inc();
            Admission::Refused(error)
        }
        Some(Err(error)) => {
            shared.metrics.auth_failures.inc();
            return json_error(StatusCode::UNAUTHORIZED, "auth_failed", &error.to_string());
        }
        None => Admission::AwaitAuthFrame { routed_id },
    };
    let max = shared.config.limits.max_frame_bytes;
    let ws = ws
        .protocols([SUBPROTOCOL_JSON, SUBPROTOCOL_PROTO])
        .read_buffer_size(shared.config.read_buffer_bytes)
        // Write each frame straight to the socket; keeping a write buffer costs every idle
        // connection, and an unbounded one lets a slow consumer grow memory.
        .write_buffer_size(0)
        .max_write_buffer_size(max + 64 * 1024)
        .max_message_size(max)
        .max_frame_size(max);
    let codec = ws
        .selected_protocol()
        .and_then(|p| p.to_str().ok())
        .and_then(Codec::from_subprotocol)
        .unwrap_or_default();
    shared.metrics.connections_total.inc();
    let token = shared.tracker.token();
    let conn_id: u64 = rand::random();
    let span = info_span!("conn", conn_id, node_id = %shared.config.node_id, device_id = tracing::field::Empty);
    ws.on_failed_upgrade(|error| warn!(message = "upgrade failed", %error))
        .on_upgrade(move |socket| {
            async move {
                session::run(shared, socket, codec, conn_id, admission).await;
                drop(socket_permit);
                drop(token);
            }
            .instrument(span)
        })
}

pub(crate) fn internal_router(
    registry: Arc<Registry>,
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> Router {
    Router::new()
        // A GET because Kubernetes' preStop `httpGet` hook is the only hook a shell-less
        // image can run. It answers at once: the drain ends with the process, which would
        // cut a response sent at its end. Repeats are harmless.
        .route(
            "/drain",
            get(move || {
                let shutdown = shutdown.clone();
                async move {
                    if !shutdown.is_cancelled() {
                        tracing::info!(message = "drain requested on the internal listener");
                        shutdown.cancel();
                    }
                    (StatusCode::ACCEPTED, "draining")
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => (
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        )
                            .into_response(),
                        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready() {
                        (StatusCode::OK, "ready").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
                    }
                }
            }),
        )
}
