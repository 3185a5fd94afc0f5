//! Device registry handlers: provision, list (filtered, cursor-paged, scoped in the bus
//! query), read, regroup, rotate credentials, revoke, disconnect, delete.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use base64::Engine;
use fleetgate_bus::{
    DesiredGuard, DesiredMerge, DeviceQuery, DeviceRecord, NodeMessage, Presence, Shadow, Transport,
};
use fleetgate_protocol::CloseCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Auth, ScopedDevice, need};
use crate::pipeline::{Note, noted};
use crate::rbac::{Principal, Scope};
use crate::{AdminState, AppError, Body, ErrorBody, Res, now_ms};

/// Most groups a device may belong to (the gateway bounds JWT claims the same way).
const MAX_GROUPS: usize = 64;
/// Largest page of a device listing.
const MAX_PAGE: usize = 1000;

/// Device IDs travel in headers, URLs and Redis keys: keep them to a safe alphabet.
pub(crate) fn check_device_id(id: &str) -> Result<(), AppError> {
    if safe_name(id) {
        Ok(())
    } else {
        Err(AppError::bad_request(
            "device id must be 1-128 characters of [A-Za-z0-9._:-]",
        ))
    }
}

/// Group names share the device ID alphabet (they are channel names too).
pub(crate) fn check_group(g: &str) -> Result<(), AppError> {
    if safe_name(g) {
        Ok(())
    } else {
        Err(AppError::bad_request(
            "group names must be 1-128 characters of [A-Za-z0-9._:-]",
        ))
    }
}

fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn check_groups(groups: &[String]) -> Result<(), AppError> {
    // Each accepted message is published once per group, so the list stays short.
    if groups.len() > MAX_GROUPS {
        return Err(AppError::bad_request(format!(
            "at most {MAX_GROUPS} groups per device"
        )));
    }
    groups.iter().try_for_each(|g| check_group(g))
}

/// A new secret: 256 random bits. base64url has no '.', which keeps secrets distinguishable
/// from JWTs.
fn new_secret() -> (String, [u8; 32]) {
    let secret =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let digest = Sha256::digest(secret.as_bytes()).into();
    (secret, digest)
}

pub(crate) fn shadow_json(shadow: &Shadow) -> Value {
    json!({
        "reported": shadow.reported,
        "desired": shadow.desired,
        "delta": shadow.delta,
        "version": shadow.version,
        "updatedMs": shadow.updated_ms,
        "inSync": shadow.delta.is_empty(),
    })
}

fn device_json(record: Option<&DeviceRecord>, id: &str, presence: Option<&Presence>) -> Value {
    json!({
        "id": id,
        "groups": record.map(|r| r.groups.clone()).unwrap_or_default(),
        "provisioned": record.is_some(),
        "createdMs": record.map(|r| r.created_ms),
        "revoked": record.is_some_and(|r| r.revoked),
        "transport": record.map(|r| r.transport.as_str()),
        "signed": record.is_some_and(|r| r.mac_key.is_some()),
        "revokedCertificates": record.map(|r| r.revoked_certs.iter().map(hex::encode).collect::<Vec<_>>()).unwrap_or_default(),
        "online": presence.is_some(),
        "node": presence.map(|p| p.node.clone()),
        "connectedSinceMs": presence.map(|p| p.since_ms),
    })
}

/// `POST /v1/devices` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateDevice {
    id: String,
    #[serde(default)]
    #[schema(max_items = 64)]
    groups: Vec<String>,
    /// How the device connects; `mqtt` devices are ingested from the broker and get their
    /// commands on `devices/<id>/commands`.
    #[serde(default)]
    transport: TransportBody,
}

/// How a device connects (`websocket` unless told).
#[derive(Deserialize, Serialize, ToSchema, Clone, Copy, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TransportBody {
    #[default]
    Websocket,
    Mqtt,
}

impl From<Transport> for TransportBody {
    fn from(t: Transport) -> Self {
        match t {
            Transport::Websocket => TransportBody::Websocket,
            Transport::Mqtt => TransportBody::Mqtt,
        }
    }
}

impl From<TransportBody> for Transport {
    fn from(t: TransportBody) -> Self {
        match t {
            TransportBody::Websocket => Transport::Websocket,
            TransportBody::Mqtt => Transport::Mqtt,
        }
    }
}

/// A provisioned device and its secret (shown once).
#[derive(Serialize, ToSchema)]
pub(crate) struct Provisioned {
    id: String,
    groups: Vec<String>,
    transport: TransportBody,
    secret: String,
}

impl CreateDevice {
    /// Checks the ID and groups, which a scoped caller must hold.
    pub(crate) fn check(&self, principal: &Principal) -> Result<(), AppError> {
        check_device_id(&self.id)?;
        check_groups(&self.groups)?;
        if !principal.scope.covers_groups(&self.groups) {
            return Err(AppError::forbidden(
                "a scoped caller can only provision devices in its own groups",
            ));
        }
        Ok(())
    }
}

/// Provisions a device and shows its secret once. A scoped caller must put it in its groups.
#[utoipa::path(post, path = "/v1/devices", tag = "devices", request_body = CreateDevice,
    responses((status = 201, body = Provisioned), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn create_device(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::DeviceWrite>,
    Body(req): Body<CreateDevice>,
) -> Res {
    req.check(&auth.principal)?;
    let (secret, secret_sha256) = new_secret();
    let record = DeviceRecord {
        id: req.id.clone(),
        groups: req.groups.clone(),
        secret_sha256,
        created_ms: now_ms(),
        revoked: false,
        transport: req.transport.into(),
        mac_key: None,
        revoked_certs: Vec::new(),
    };
    let note = Note::target(format!("device:{}", req.id));
    // IDs are global: a scoped caller provisioning an ID in use learns that it exists. It is
    // the one fact scoping cannot hide without allowing two devices one ID.
    if !state.bus.device_create(&record).await? {
        return Err(AppError::exists(format!("device {} exists", req.id)));
    }
    let answer = Provisioned {
        id: req.id,
        groups: req.groups,
        transport: req.transport,
        secret,
    };
    Ok(noted(
        (StatusCode::CREATED, Json(answer)).into_response(),
        note,
    ))
}

/// `GET /v1/devices` filters.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only devices of this group.
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    group: Option<String>,
    /// Only devices whose ID starts with this.
    #[param(max_length = 128)]
    prefix: Option<String>,
    /// Only online (`true`) or offline (`false`) devices.
    online: Option<bool>,
    /// Only devices connected to this node.
    node: Option<String>,
    /// The `next` of the previous page (`after` is an older name for it).
    #[serde(alias = "after")]
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    cursor: Option<String>,
    /// Devices per page, 1-1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// A page of devices.
#[derive(Serialize, ToSchema)]
pub(crate) struct DevicePage {
    devices: Vec<Value>,
    /// Cursor of the next page; `null` at the end. A page may hold fewer devices than asked
    /// (the `online` and `node` filters apply after the registry is read) and still have one.
    next: Option<String>,
}

/// Lists devices in ID order within the caller's scope, with filters and cursor paging:
/// every device that exists throughout is returned exactly once, however many are added.
#[utoipa::path(get, path = "/v1/devices", tag = "devices", params(ListQuery),
    responses((status = 200, body = DevicePage), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn list_devices(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::DeviceRead>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Res {
    let Query(q) = query.map_err(|r| AppError::bad_request(r.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(AppError::bad_request(format!("limit must be 1-{MAX_PAGE}")));
    }
    if q.prefix.as_ref().is_some_and(|p| p.chars().count() > 128) {
        return Err(AppError::bad_request("prefix is at most 128 characters"));
    }
    for id in [&q.cursor, &q.group].into_iter().flatten() {
        check_device_id(id)?;
    }
    // The scope goes into the bus query: a group outside it is simply empty.
    let groups = match (&q.group, &auth.principal.scope) {
        (Some(g), Scope::Groups(mine)) if !mine.contains(g) => Some(Vec::new()),
        (Some(g), _) => Some(vec![g.clone()]),
        (None, scope) => scope.query_groups(),
    };
    let records = state
        .bus
        .device_query(&DeviceQuery {
            groups,
            prefix: q.prefix.clone(),
            after: q.cursor.clone(),
            limit,
        })
        .await?;
    let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
    let presence = state.bus.presence_get_many(&ids).await?;
    let devices: Vec<Value> = records
        .iter()
        .zip(presence.iter())
        .filter(|(_, p)| q.online.is_none_or(|on| on == p.is_some()))
        .filter(|(_, p)| {
            q.node
                .as_ref()
                .is_none_or(|n| p.as_ref().is_some_and(|p| &p.node == n))
        })
        .map(|(r, p)| device_json(Some(r), &r.id, p.as_ref()))
        .collect();
    let next = (records.len() == limit)
        .then(|| records.last().map(|r| r.id.clone()))
        .flatten();
    Ok(Json(DevicePage { devices, next }).into_response())
}

/// Registry entry, presence, shadow and queue length.
#[utoipa::path(get, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "device ID")),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn get_device(
    State(state): State<Arc<AdminState>>,
    device: ScopedDevice<need::DeviceRead>,
) -> Res {
    let id = &device.id;
    let presence = state.bus.presence_get(id).await?;
    if device.record.is_none() && presence.is_none() {
        return Err(AppError::not_found(format!("no device {id}")));
    }
    let shadow = state.bus.shadow_get(id).await?.unwrap_or_default();
    let mut answer = device_json(device.record.as_ref(), id, presence.as_ref());
    answer["shadow"] = shadow_json(&shadow);
    // Commands still owed to the device (including expired ones not yet reported).
    answer["queuedCommands"] = json!(state.bus.queue_len(id).await?);
    Ok(Json(answer).into_response())
}

/// `PATCH /v1/devices/{id}` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateDevice {
    #[schema(max_items = 64)]
    groups: Vec<String>,
}

impl UpdateDevice {
    /// Checks the groups (the caller's scope is checked once the device is loaded).
    pub(crate) fn check(&self) -> Result<(), AppError> {
        check_groups(&self.groups)
    }
}

/// Replaces a device's groups. A live session keeps the groups it authenticated with (its
/// fan-out channels) until it reconnects.
#[utoipa::path(patch, path = "/v1/devices/{id}", tag = "devices", request_body = UpdateDevice,
    params(("id" = String, Path, description = "device ID")),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn update_device(
    State(state): State<Arc<AdminState>>,
    device: ScopedDevice<need::DeviceWrite>,
    Body(req): Body<UpdateDevice>,
) -> Res {
    req.check()?;
    let Some(mut record) = device.record else {
        return Err(AppError::not_found(format!("no device {}", device.id)));
    };
    if !device.principal.scope.covers_groups(&req.groups) {
        return Err(AppError::forbidden(
            "a scoped caller can only put devices in its own groups",
        ));
    }
    record.groups = req.groups;
    if !state.bus.device_update(&record).await? {
        return Err(AppError::not_found(format!("no device {}", device.id)));
    }
    let presence = state.bus.presence_get(&device.id).await?;
    Ok(Json(device_json(Some(&record), &device.id, presence.as_ref())).into_response())
}

/// Closes `id`'s live session, if any; `Ok(true)` if there was one.
pub(crate) async fn close_session(
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

/// Deletes a device: its credentials, queue and shadow go, and a live session is closed
/// with 4410.
#[utoipa::path(delete, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "device ID")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn delete_device(
    State(state): State<Arc<AdminState>>,
    device: ScopedDevice<need::DeviceWrite>,
) -> Res {
    // The record first: once it is gone the device cannot authenticate again.
    if !state.bus.device_delete(&device.id).await? {
        return Err(AppError::not_found(format!("no device {}", device.id)));
    }
    close_session(&state, &device.id, CloseCode::Revoked, "device deleted").await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Gives a device a new secret (shown once); the old one stops working at once. A live
/// session keeps running until it reconnects, when it must use the new secret.
#[utoipa::path(post, path = "/v1/devices/{id}/rotate", tag = "devices",
    params(("id" = String, Path, description = "device ID")),
    responses((status = 200, body = Provisioned), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn rotate(
    State(state): State<Arc<AdminState>>,
    device: ScopedDevice<need::DeviceWrite>,
) -> Res {
    let Some(mut record) = device.record else {
        return Err(AppError::not_found(format!("no device {}", device.id)));
    };
    let (secret, digest) = new_secret();
    record.secret_sha256 = digest;
    if !state.bus.device_update(&record).await? {
        return Err(AppError::not_found(format!("no device {}", device.id)));
    }
    Ok(Json(Provisioned {
        id: record.id,
        groups: record.groups,
        transport: record.transport.into(),
        secret,
    })
    .into_response())
}

/// Closes the live session with 1000.
#[utoipa::path(post, path = "/v1/devices/{id}/disconnect", tag = "devices",
    params(("id" = String, Path, description = "device ID")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn disconnect(
    State(state): State<Arc<AdminState>>,
    device: ScopedDevice<need::DeviceWrite>,
) -> Res {
    let was_online = close_session(
        &state,
        &device.id,
        CloseCode::Normal,
        "disconnected by operator",
    )
    .await?;
    if device.record.is_none() && !was_online {
        return Err(AppError::not_found(format!("no device {}", device.id)));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Refuses the device's credentials from now on and closes its live session with 4410.
#[utoipa::path(post, path = "/v1/devices/{id}/revoke", tag = "devices",
    params(("id" = String, Path, description = "device ID")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn revoke(
    State(state): State<Arc<AdminState>>,
    device: ScopedDevice<need::DeviceWrite>,
) -> Res {
    let Some(mut record) = device.record else {
        return Err(AppError::not_found(format!("no device {}", device.id)));
    };
    record.revoked = true;
    state.bus.device_update(&record).await?;
    close_session(
        &state,
        &device.id,
        CloseCode::Revoked,
        "credentials revoked",
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The shadow as JSON, with its version as the `ETag` (send it back as `If-Match`).
fn shadow_answer(shadow: &Shadow) -> axum::response::Response {
    (
        [(axum::http::header::ETAG, format!("\"{}\"", shadow.version))],
        Json(shadow_json(shadow)),
    )
        .into_response()
}

/// The device's shadow (`ETag`: its version).
#[utoipa::path(get, path = "/v1/devices/{id}/shadow", tag = "devices",
    params(("id" = String, Path, description = "device ID")),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn get_shadow(
    State(state): State<Arc<AdminState>>,
    device: ScopedDevice<need::DeviceRead>,
) -> Res {
    let shadow = state.bus.shadow_get(&device.id).await?;
    if device.record.is_none() && shadow.is_none() {
        return Err(AppError::not_found(format!("no device {}", device.id)));
    }
    Ok(shadow_answer(&shadow.unwrap_or_default()))
}

/// `PATCH /v1/devices/{id}/shadow/desired` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetDesired {
    /// Keys to set; `null` removes a key.
    #[schema(value_type = Object)]
    pub(crate) state: serde_json::Map<String, Value>,
    /// The version read; a shadow at another version answers 409 (`If-Match` works too).
    #[serde(default, deserialize_with = "crate::num::opt_unsigned")]
    #[schema(minimum = 0)]
    version: Option<u64>,
}

/// The version an `If-Match` header names (`"7"`, `W/"7"` or `7`).
fn if_match(headers: &axum::http::HeaderMap) -> Result<Option<u64>, AppError> {
    let Some(v) = headers.get(axum::http::header::IF_MATCH) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or_default().trim();
    let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    text.parse()
        .map(Some)
        .map_err(|_| AppError::bad_request("If-Match must be a shadow version"))
}

/// Merges desired state with optimistic concurrency. An online device is sent the delta at
/// once; a device connecting later gets it right after `auth_response` while it lasts.
#[utoipa::path(patch, path = "/v1/devices/{id}/shadow/desired", tag = "devices",
    request_body = SetDesired,
    params(("id" = String, Path, description = "device ID"),
        ("If-Match" = Option<String>, Header, description = "the shadow version read")),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn set_desired(
    State(state): State<Arc<AdminState>>,
    device: ScopedDevice<need::ShadowWrite>,
    headers: axum::http::HeaderMap,
    Body(req): Body<SetDesired>,
) -> Res {
    let expected = match (req.version, if_match(&headers)?) {
        // The shadow cannot be at both versions: at least one is stale.
        (Some(a), Some(b)) if a != b => {
            let current = state
                .bus
                .shadow_get(&device.id)
                .await?
                .map_or(0, |s| s.version);
            return Err(AppError::new(
                StatusCode::CONFLICT,
                "version_conflict",
                format!("version and If-Match disagree; the shadow is at version {current}"),
            )
            .with_current_version(current));
        }
        (a, b) => a.or(b),
    };
    if device.record.is_none() {
        return Err(AppError::not_found(format!("no device {}", device.id)));
    }
    let guard = DesiredGuard {
        expected_version: expected,
        max_bytes: Some(state.config.shadow_max_bytes),
    };
    let merged = state
        .bus
        .shadow_set_desired(&device.id, &req.state, &guard, now_ms())
        .await?;
    let shadow = match merged {
        DesiredMerge::Merged(shadow) => shadow,
        DesiredMerge::Stale { current } => {
            return Err(AppError::new(
                StatusCode::CONFLICT,
                "version_conflict",
                format!("the shadow is at version {current}; read it and try again"),
            )
            .with_current_version(current));
        }
        DesiredMerge::TooLarge { bytes } => {
            return Err(AppError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "the shadow would be {bytes} bytes; at most {} are kept",
                    state.config.shadow_max_bytes
                ),
            ));
        }
    };
    if !shadow.delta.is_empty()
        && let Some(p) = state.bus.presence_get(&device.id).await?
    {
        let msg = NodeMessage::Delta {
            device: device.id.clone(),
            version: shadow.version,
            delta: shadow.delta.clone(),
        };
        // Best effort: the device is sent the delta again when it next connects.
        if let Err(error) = state.bus.node_publish(&p.node, &msg).await {
            tracing::warn!(message = "could not tell a device its delta", %error);
        }
    }
    Ok(shadow_answer(&shadow))
}
