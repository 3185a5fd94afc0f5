//! Commands to one device: queued (QoS 1/2) or sent (QoS 0), optionally waiting for the
//! device's result.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use fleetgate_bus::CommandOutcome;
use fleetgate_bus::dispatch::{CommandRequest, Dispatched, dispatch};
use fleetgate_protocol::Qos;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;
use utoipa::ToSchema;

use crate::auth::{ScopedDevice, need};
use crate::pipeline::{Note, noted};
use crate::{AdminConfig, AdminState, AppError, Body, ErrorBody, Res};

/// `POST /v1/devices/{id}/commands` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SendCommand {
    /// Opaque to the gateway.
    payload: Value,
    /// 0, 1 (default) or 2.
    #[serde(default, deserialize_with = "crate::num::opt_unsigned")]
    #[schema(minimum = 0, maximum = 2)]
    qos: Option<u8>,
    /// How long the command stays queued unacknowledged (at most the configured maximum,
    /// 7 days by default).
    #[serde(default, deserialize_with = "crate::num::opt_unsigned")]
    #[schema(minimum = 1, maximum = 604_800_000)]
    ttl_ms: Option<u64>,
    /// How long to wait for the device's result (QoS 1 and 2; at most the configured
    /// maximum, 60 s by default).
    #[serde(default, deserialize_with = "crate::num::opt_unsigned")]
    #[schema(minimum = 0, maximum = 60_000)]
    wait_ms: Option<u64>,
}

impl SendCommand {
    /// QoS, TTL and wait, checked against the limits.
    pub(crate) fn check(&self, cfg: &AdminConfig) -> Result<(Qos, Duration, Duration), AppError> {
        let (qos, ttl) = check_delivery(cfg, self.qos, self.ttl_ms)?;
        let wait = Duration::from_millis(self.wait_ms.unwrap_or(0));
        if wait > cfg.max_wait {
            return Err(AppError::bad_request(format!(
                "waitMs must be at most {}",
                cfg.max_wait.as_millis()
            )));
        }
        Ok((qos, ttl, wait))
    }
}

/// Checks QoS and TTL as every command path (single, job) does.
pub(crate) fn check_delivery(
    cfg: &AdminConfig,
    qos: Option<u8>,
    ttl_ms: Option<u64>,
) -> Result<(Qos, Duration), AppError> {
    let qos = Qos::from_u8(u64::from(qos.unwrap_or(1)))
        .map_err(|_| AppError::bad_request("qos must be 0, 1 or 2"))?;
    let ttl = ttl_ms.map_or(cfg.default_ttl, Duration::from_millis);
    if ttl.is_zero() || ttl > cfg.max_ttl {
        return Err(AppError::bad_request(format!(
            "ttlMs must be 1..={}",
            cfg.max_ttl.as_millis()
        )));
    }
    Ok((qos, ttl))
}

/// Queues (QoS 1/2) or sends (QoS 0) a command and optionally waits for its result: 202
/// queued, 200 with the result, 504 when no result came within `waitMs`. The command carries
/// this call's trace context (continuing the caller's `traceparent` header) to the node.
#[utoipa::path(post, path = "/v1/devices/{id}/commands", tag = "devices", request_body = SendCommand,
    params(("id" = String, Path, description = "device ID")),
    responses((status = 200, body = Object), (status = 202, body = Object),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody),
        (status = 504, body = ErrorBody)))]
pub(crate) async fn send_command(
    State(state): State<Arc<AdminState>>,
    device: ScopedDevice<need::CommandSend>,
    headers: HeaderMap,
    Body(req): Body<SendCommand>,
) -> Res {
    let span = tracing::info_span!("admin.send_command", device = %device.id, msgid = tracing::field::Empty);
    // The parent must be set before the span is first entered.
    let incoming = headers.get("traceparent").and_then(|v| v.to_str().ok());
    fleetgate_bus::trace::continue_trace(&span, incoming);
    send_in_span(state, device, req).instrument(span).await
}

async fn send_in_span(
    state: Arc<AdminState>,
    device: ScopedDevice<need::CommandSend>,
    req: SendCommand,
) -> Res {
    let id = device.id;
    let (qos, ttl, wait) = req.check(&state.config)?;
    // Presence is read only where it decides something: QoS 0 goes to the device's node, and
    // a device with no record exists only while connected. A queued command's push tells the
    // owning node itself, so a provisioned device's QoS 1/2 path skips this round trip.
    let presence = if qos == Qos::AtMostOnce || device.record.is_none() {
        state.bus.presence_get(&id).await?
    } else {
        None
    };
    if presence.is_none() && device.record.is_none() {
        return Err(AppError::not_found(format!("no device {id}")));
    }
    let request = CommandRequest {
        device: id,
        payload: req.payload,
        qos,
        ttl,
        wait,
        traceparent: fleetgate_bus::trace::current_traceparent(),
    };
    let dispatched = dispatch(
        &*state.bus,
        &state.waiters,
        &state.config.node_id,
        presence.as_ref(),
        request,
    )
    .await;
    let (msgid, dispatched) = match dispatched {
        Ok(d) => d,
        Err((msgid, e)) => return Err(AppError::from(e).with_msgid(msgid.into_string())),
    };
    let m = msgid.into_string();
    tracing::Span::current().record("msgid", m.as_str());
    let note = Note {
        msgid: Some(m.clone()),
        ..Note::default()
    };
    let answer = |status: StatusCode, body: Value| {
        Ok(noted((status, Json(body)).into_response(), note.clone()))
    };
    match dispatched {
        Dispatched::Queued => answer(StatusCode::ACCEPTED, json!({ "msgid": m })),
        Dispatched::Offline => Err(AppError::new(
            StatusCode::CONFLICT,
            "device_offline",
            "QoS 0 commands are not queued; the device is offline",
        )
        .with_msgid(m)),
        Dispatched::Outcome(CommandOutcome::Result(result)) => {
            answer(StatusCode::OK, json!({ "msgid": m, "result": result }))
        }
        Dispatched::Outcome(CommandOutcome::Error(error)) => {
            answer(StatusCode::OK, json!({ "msgid": m, "error": error }))
        }
        Dispatched::Outcome(CommandOutcome::Done) => {
            answer(StatusCode::OK, json!({ "msgid": m, "result": null }))
        }
        Dispatched::Outcome(CommandOutcome::Failed(reason)) => Err(AppError::new(
            StatusCode::GATEWAY_TIMEOUT,
            reason.as_str(),
            "the device never acknowledged the command",
        )
        .with_msgid(m)),
        Dispatched::Timeout => Err(AppError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "no result within waitMs; the command stays queued until its TTL",
        )
        .with_msgid(m)),
    }
}
