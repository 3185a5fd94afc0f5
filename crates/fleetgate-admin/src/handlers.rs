//! Admin REST handlers. Request and response bodies are JSON with camelCase keys.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use fleetgate_bus::{Command, CommandOutcome, DeviceRecord, NodeMessage, Presence, Shadow};
use fleetgate_protocol::{CloseCode, MsgId, Qos};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::{AdminState, AppError};

type Res = Result<Response, AppError>;

/// Most groups a device may belong to (the gateway bounds JWT claims the same way).
const MAX_GROUPS: usize = 64;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Device IDs travel in headers, URLs and Redis keys: keep them to a safe alphabet.
fn check_device_id(id: &str) -> Result<(), AppError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(AppError::bad_request(
            "device id must be 1-128 characters of [A-Za-z0-9._:-]",
        ))
    }
}

fn body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, AppError> {
    body.map(|Json(b)| b)
        .map_err(|rejection| AppError::bad_request(rejection.body_text()))
}

fn shadow_json(shadow: &Shadow) -> Value {
    json!({
        "reported": shadow.reported,
        "desired": shadow.desired,
        "delta": shadow.delta,
        "version": shadow.version,
        "updatedMs": shadow.updated_ms,
    })
}

fn device_json(record: Option<&DeviceRecord>, id: &str, presence: Option<&Presence>) -> Value {
    json!({
        "id": id,
        "groups": record.map(|r| r.groups.clone()).unwrap_or_default(),
        "provisioned": record.is_some(),
        "createdMs": record.map(|r| r.created_ms),
        "revoked": record.is_some_and(|r| r.revoked),
        "online": presence.is_some(),
        "node": presence.map(|p| p.node.clone()),
        "connectedSinceMs": presence.map(|p| p.since_ms),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateDevice {
    id: String,
    #[serde(default)]
    groups: Vec<String>,
}

/// `POST /v1/devices`: provisions a device and shows its secret once.
pub(crate) async fn create_device(
    State(state): State<Arc<AdminState>>,
    req: Result<Json<CreateDevice>, JsonRejection>,
) -> Res {
    let req = body(req)?;
    check_device_id(&req.id)?;
    // Each accepted message is published once per group, so the list stays short.
    if req.groups.len() > MAX_GROUPS {
        return Err(AppError::bad_request(format!(
            "at most {MAX_GROUPS} groups per device"
        )));
    }
    for g in &req.groups {
        check_device_id(g).map_err(|_| {
            AppError::bad_request("group names must be 1-128 characters of [A-Za-z0-9._:-]")
        })?;
    }
    // 256 random bits; base64url has no '.', which keeps secrets distinguishable from JWTs.
    let secret =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let record = DeviceRecord {
        id: req.id.clone(),
        groups: req.groups.clone(),
        secret_sha256: Sha256::digest(secret.as_bytes()).into(),
        created_ms: now_ms(),
        revoked: false,
    };
    if !state.bus.device_create(&record).await? {
        return Err(AppError::new(
            StatusCode::CONFLICT,
            "exists",
            format!("device {} exists", req.id),
        ));
    }
    let answer = json!({ "id": req.id, "groups": req.groups, "secret": secret });
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/devices?after=&limit=`: provisioned devices with presence, in ID order.
pub(crate) async fn list_devices(
    State(state): State<Arc<AdminState>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Res {
    let Query(q) = query.map_err(|r| AppError::bad_request(r.body_text()))?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let records = state.bus.device_list(q.after.as_deref(), limit).await?;
    let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
    let presence = state.bus.presence_get_many(&ids).await?;
    let devices: Vec<Value> = records
        .iter()
        .zip(presence.iter())
        .map(|(r, p)| device_json(Some(r), &r.id, p.as_ref()))
        .collect();
    let next = if records.len() == limit {
        records.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(Json(json!({ "devices": devices, "next": next })).into_response())
}

/// `GET /v1/devices/{id}`: registry entry, presence and shadow.
pub(crate) async fn get_device(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Res {
    check_device_id(&id)?;
    let record = state.bus.device_get(&id).await?;
    let presence = state.bus.presence_get(&id).await?;
    if record.is_none() && presence.is_none() {
        return Err(AppError::not_found(format!("no device {id}")));
    }
    let shadow = state.bus.shadow_get(&id).await?.unwrap_or_default();
    let mut answer = device_json(record.as_ref(), &id, presence.as_ref());
    answer["shadow"] = shadow_json(&shadow);
    // Commands still owed to the device (including expired ones not yet reported).
    answer["queuedCommands"] = json!(state.bus.queue_len(&id).await?);
    Ok(Json(answer).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SendCommand {
    payload: Value,
    qos: Option<u8>,
    ttl_ms: Option<u64>,
    wait_ms: Option<u64>,
}

fn new_msgid() -> MsgId {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 12]>());
    MsgId::new(raw).expect("base64url of 12 bytes is a valid msgid")
}

/// `POST /v1/devices/{id}/commands`: queues (QoS 1/2) or sends (QoS 0) a command, and
/// optionally waits for its result. The command carries this call's trace context (which
/// continues the caller's `traceparent` header, if any) to the node that delivers it.
pub(crate) async fn send_command(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    req: Result<Json<SendCommand>, JsonRejection>,
) -> Res {
    let span =
        tracing::info_span!("admin.send_command", device = %id, msgid = tracing::field::Empty);
    // The parent must be set before the span is first entered.
    let incoming = headers.get("traceparent").and_then(|v| v.to_str().ok());
    fleetgate_bus::trace::continue_trace(&span, incoming);
    send_command_in_span(state, id, req).instrument(span).await
}

async fn send_command_in_span(
    state: Arc<AdminState>,
    id: String,
    req: Result<Json<SendCommand>, JsonRejection>,
) -> Res {
    check_device_id(&id)?;
    let req = body(req)?;
    let qos = Qos::from_u8(u64::from(req.qos.unwrap_or(1)))
        .map_err(|_| AppError::bad_request("qos must be 0, 1 or 2"))?;
    let cfg = &state.config;
    let ttl = req.ttl_ms.map_or(cfg.default_ttl, Duration::from_millis);
    if ttl.is_zero() || ttl > cfg.max_ttl {
        return Err(AppError::bad_request(format!(
            "ttlMs must be 1..={}",
            cfg.max_ttl.as_millis()
        )));
    }
    let wait = Duration::from_millis(req.wait_ms.unwrap_or(0));
    if wait > cfg.max_wait {
        return Err(AppError::bad_request(format!(
            "waitMs must be at most {}",
            cfg.max_wait.as_millis()
        )));
    }
    let presence = state.bus.presence_get(&id).await?;
    if presence.is_none() && state.bus.device_get(&id).await?.is_none() {
        return Err(AppError::not_found(format!("no device {id}")));
    }
    let now = now_ms();
    let msgid = new_msgid();
    let command = Command {
        msgid: msgid.clone(),
        device: id.clone(),
        payload: req.payload,
        qos,
        created_ms: now,
        expires_ms: now.saturating_add(ttl.as_millis() as i64),
        reply_to: (!wait.is_zero()).then(|| cfg.node_id.clone()),
        traceparent: fleetgate_bus::trace::current_traceparent(),
        job: None,
    };
    tracing::Span::current().record("msgid", msgid.as_str());
    if qos == Qos::AtMostOnce {
        let Some(p) = presence else {
            return Err(AppError::new(
                StatusCode::CONFLICT,
                "device_offline",
                "QoS 0 commands are not queued; the device is offline",
            ));
        };
        state
            .bus
            .node_publish(&p.node, &NodeMessage::Command(command))
            .await?;
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "msgid": msgid.as_str() })),
        )
            .into_response());
    }
    let mut waiter = (!wait.is_zero()).then(|| state.waiters.wait(&id, msgid.as_str()));
    // The push also tells the device's node, reading presence in the same step: a session
    // that registered just before is told, one registering just after reads the queue.
    state.bus.queue_push(&command).await?;
    let Some(waiter) = waiter.as_mut() else {
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "msgid": msgid.as_str() })),
        )
            .into_response());
    };
    let m = msgid.as_str();
    let outcome = match tokio::time::timeout(wait, waiter.outcome()).await {
        Ok(Some(outcome)) => Some(outcome),
        // The result message may have been lost on the way (a bus reconnect): the stored
        // copy decides before the call gives up.
        Ok(None) | Err(_) => state.bus.result_get(&id, m).await.ok().flatten(),
    };
    match outcome {
        Some(CommandOutcome::Result(result)) => {
            Ok(Json(json!({ "msgid": m, "result": result })).into_response())
        }
        Some(CommandOutcome::Error(error)) => {
            Ok(Json(json!({ "msgid": m, "error": error })).into_response())
        }
        Some(CommandOutcome::Done) => {
            Ok(Json(json!({ "msgid": m, "result": null })).into_response())
        }
        Some(CommandOutcome::Failed(reason)) => Err(AppError::new(
            StatusCode::GATEWAY_TIMEOUT,
            reason.as_str(),
            "the device never acknowledged the command",
        )
        .with_msgid(m)),
        None => Err(AppError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "no result within waitMs; the command stays queued until its TTL",
        )
        .with_msgid(m)),
    }
}

async fn close_session(
    state: &AdminState,
    id: &str,
    code: CloseCode,
    reason: &str,
) -> Result<bool, AppError> {
    let Some(p) = state.bus.presence_get(id).await? else {
        return Ok(false);
    };
    let msg = NodeMessage::Close {
        device: id.to_owned(),
        conn_id: Some(p.conn_id),
        code,
        reason: reason.to_owned(),
    };
    state.bus.node_publish(&p.node, &msg).await?;
    Ok(true)
}

/// `POST /v1/devices/{id}/disconnect`: closes the live session with 1000.
pub(crate) async fn disconnect(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Res {
    check_device_id(&id)?;
    let known = state.bus.device_get(&id).await?.is_some();
    let was_online =
        close_session(&state, &id, CloseCode::Normal, "disconnected by operator").await?;
    if !known && !was_online {
        return Err(AppError::not_found(format!("no device {id}")));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1/devices/{id}/revoke`: refuses the device's credentials from now on and closes its
/// live session with 4410.
pub(crate) async fn revoke(State(state): State<Arc<AdminState>>, Path(id): Path<String>) -> Res {
    check_device_id(&id)?;
    let Some(mut record) = state.bus.device_get(&id).await? else {
        return Err(AppError::not_found(format!("no device {id}")));
    };
    record.revoked = true;
    state.bus.device_update(&record).await?;
    close_session(&state, &id, CloseCode::Revoked, "credentials revoked").await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/nodes`: live gateway nodes and their load.
pub(crate) async fn list_nodes(State(state): State<Arc<AdminState>>) -> Res {
    let nodes: Vec<Value> = state
        .bus
        .nodes()
        .await?
        .into_iter()
        .map(|n| json!({ "id": n.id, "connections": n.connections, "draining": n.draining, "startedMs": n.started_ms, "updatedMs": n.updated_ms }))
        .collect();
    Ok(Json(json!({ "nodes": nodes })).into_response())
}

/// Any other path.
pub(crate) async fn not_found() -> AppError {
    AppError::not_found("no such endpoint")
}
