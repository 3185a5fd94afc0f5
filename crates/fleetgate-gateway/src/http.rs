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

use crate::source::{ForwardedCertError, Source, forwarded_cert};
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
    let admission = match admit(&shared, &peer, &headers, routed_id).await {
        Ok(admission) => admission,
        Err(refused) => return *refused,
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

/// The device key of the failure throttle: the device ID as tried from one source. Not the
/// ID alone: anyone who knows a device's ID could then keep it locked out by failing for it,
/// while guessing a 256-bit secret or forging a signature is hopeless anyway. What this
/// stops is one client retrying bad credentials for a device in a loop.
pub(crate) fn device_key(id: &str, source_key: &str) -> String {
    format!("dev:{id}@{source_key}")
}

/// `429` with `Retry-After`: this source or device failed too often; nothing was checked.
fn throttled(retry_after: std::time::Duration) -> Response {
    let mut resp = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_failures",
        "too many failed authentications; retry later",
    );
    let secs = u32::try_from(retry_after.as_secs().saturating_add(1)).unwrap_or(u32::MAX);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// Decides how a device upgrade proceeds, before any frame: refused outright (throttled
/// source or device, an untrusted or unreadable forwarded certificate, a bad header token),
/// authenticated by its certificate or header token, or waiting for its auth frame.
async fn admit(
    shared: &Arc<Shared>,
    peer: &Peer,
    headers: &HeaderMap,
    routed_id: Option<String>,
) -> Result<Admission, Box<Response>> {
    let source = Source::of(peer, headers, &shared.config.trusted_proxies);
    let source_key = source.key();
    // The cheap refusal: a source or device that used up its failures costs a map lookup.
    let throttled_key = shared.source_throttle.check(&source_key).err().or_else(|| {
        let id = routed_id.as_deref()?;
        shared
            .device_throttle
            .check(&device_key(id, &source_key))
            .err()
    });
    if let Some(wait) = throttled_key {
        shared.metrics.auth_throttled.inc();
        return Err(Box::new(throttled(wait)));
    }
    let forwarded = forwarded_cert(
        &source,
        headers,
        shared.config.client_cert_header.as_deref(),
    )
    .map_err(|error| {
        shared.metrics.auth_failures.inc();
        Box::new(match error {
            ForwardedCertError::Untrusted => json_error(
                StatusCode::FORBIDDEN,
                "untrusted_proxy",
                "client certificate header from a peer that is not a trusted proxy",
            ),
            ForwardedCertError::Unreadable => json_error(
                StatusCode::BAD_REQUEST,
                "bad_client_certificate",
                "the forwarded client certificate is not a PEM certificate",
            ),
        })
    })?;
    let cert = peer.client_cert.as_deref().or(forwarded.as_ref());
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if (bearer.is_some() || cert.is_some()) && !shared.bus.connected() {
        shared.metrics.bus_errors.inc();
        return Err(Box::new(unavailable(
            "bus_unavailable",
            "cannot verify credentials now",
            1,
        )));
    }
    let authenticated = match (cert, bearer) {
        // The certificate is the stronger credential and TLS (ours or the ingress's) checked
        // it already.
        (Some(cert), _) => {
            shared
                .auth
                .authenticate_certificate(cert, &shared.config.cert_identity, routed_id.as_deref())
                .await
        }
        (None, Some(token)) => shared.auth.authenticate(routed_id.as_deref(), token).await,
        (None, None) => {
            let max = shared.config.max_pending_auth_per_source;
            let Some(slot) = shared.pending.acquire(source.ip, max) else {
                shared.metrics.connections_rejected.inc();
                return Err(Box::new(json_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_pending",
                    "too many connections from this address are waiting to authenticate",
                )));
            };
            return Ok(Admission::AwaitAuthFrame {
                routed_id,
                source_key,
                slot,
            });
        }
    };
    match authenticated {
        Ok(device) => {
            shared
                .device_throttle
                .succeeded(&device_key(&device.id, &source_key));
            Ok(Admission::Authenticated(device))
        }
        Err(AuthError::Unavailable(error)) => {
            shared.metrics.bus_errors.inc();
            warn!(message = "auth lookup failed", %error);
            Err(Box::new(unavailable(
                "bus_unavailable",
                "cannot verify credentials now",
                1,
            )))
        }
        Err(error) => {
            shared.metrics.auth_failures.inc();
            shared.source_throttle.failed(&source_key);
            if let Some(id) = &routed_id {
                shared.device_throttle.failed(&device_key(id, &source_key));
            }
            // A certificate's failure is told over the WebSocket (auth_response, then
            // 4403): the device has no other credential to retry with at the HTTP level.
            if cert.is_some() {
                Ok(Admission::Refused(error))
            } else {
                Err(Box::new(json_error(
                    StatusCode::UNAUTHORIZED,
                    "auth_failed",
                    &error.to_string(),
                )))
            }
        }
    }
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
