//! The request pipeline around every route: request ID, authentication, and the audit log.
//!
//! Audit is a stage of every request, not a call in handlers (as Kubernetes' audit filter):
//! - a state-changing request (`POST`, `PATCH`, `PUT`, `DELETE`) gets a `request` entry
//!   *before* it runs; when that entry cannot be written the request is refused with 503 and
//!   nothing changes (fail closed, as Vault does);
//! - once it has run, a `response` entry records its outcome (status, and the msgid of a
//!   command); reads get one only when they were refused (401, 403, an out-of-scope device);
//! - authentication failures get one `response` entry, whatever the method.
//!
//! Handlers add what only they know (a created resource's ID, a command's msgid) through a
//! [`Note`] in the response's extensions; errors add their code as the reason themselves.

use std::sync::Arc;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fleetgate_audit::{Draft, Stage};
use tracing::warn;

use crate::{AdminState, AppError};

/// What a handler tells the audit log about its request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Note {
    /// The resource acted on, when the path does not name it (a created device, a login).
    pub(crate) target: Option<String>,
    /// A command's msgid.
    pub(crate) msgid: Option<String>,
    /// Why it was refused.
    pub(crate) reason: Option<&'static str>,
    /// Who, when the request was not authenticated (a login names its user).
    pub(crate) actor: Option<String>,
    /// A job the request started.
    pub(crate) job: Option<String>,
}

impl Note {
    /// A note naming the target.
    pub(crate) fn target(target: String) -> Self {
        Self {
            target: Some(target),
            ..Self::default()
        }
    }
}

/// Adds `note` to a response (keeping what an error already noted).
pub(crate) fn noted(mut response: Response, note: Note) -> Response {
    let merged = match response.extensions_mut().remove::<Note>() {
        Some(old) => Note {
            target: note.target.or(old.target),
            msgid: note.msgid.or(old.msgid),
            reason: note.reason.or(old.reason),
            actor: note.actor.or(old.actor),
            job: note.job.or(old.job),
        },
        None => note,
    };
    response.extensions_mut().insert(merged);
    response
}

/// The audit action of a route.
fn action(method: &Method, path: &str) -> String {
    let name = match (method.as_str(), path) {
        ("POST", "/v1/auth/login") => "auth.login",
        ("POST", "/v1/auth/refresh") => "auth.refresh",
        ("GET", "/v1/auth/me") => "auth.me",
        ("POST", "/v1/users") => "user.create",
        ("GET", "/v1/users") => "user.list",
        ("PATCH", "/v1/users/{name}") => "user.update",
        ("DELETE", "/v1/users/{name}") => "user.delete",
        ("POST", "/v1/api-keys") => "key.create",
        ("GET", "/v1/api-keys") => "key.list",
        ("DELETE", "/v1/api-keys/{id}") => "key.revoke",
        ("POST", "/v1/devices") => "device.create",
        ("GET", "/v1/devices") => "device.list",
        ("GET", "/v1/devices/{id}") => "device.get",
        ("PATCH", "/v1/devices/{id}") => "device.update",
        ("DELETE", "/v1/devices/{id}") => "device.delete",
        ("POST", "/v1/devices/{id}/rotate") => "device.rotate",
        ("POST", "/v1/devices/{id}/revoke") => "device.revoke",
        ("POST", "/v1/devices/{id}/disconnect") => "device.disconnect",
        ("POST", "/v1/devices/{id}/mac-key") => "device.mac_key_issue",
        ("DELETE", "/v1/devices/{id}/mac-key") => "device.mac_key_drop",
        ("POST", "/v1/devices/{id}/certificates/revoke") => "device.certificate_revoke",
        ("POST", "/v1/devices/{id}/commands") => "command.send",
        ("GET", "/v1/devices/{id}/shadow") => "shadow.get",
        ("PATCH", "/v1/devices/{id}/shadow/desired") => "shadow.desire",
        ("GET", "/v1/nodes") => "node.list",
        ("GET", "/v1/audit") => "audit.list",
        ("GET", "/v1/audit/verify") => "audit.verify",
        ("GET", "/v1/audit/public-key") => "audit.public_key",
        ("GET", "/v1/audit/export") => "audit.export",
        ("POST", "/v1/jobs") => "job.create",
        ("GET", "/v1/jobs") => "job.list",
        ("GET", "/v1/jobs/{id}") => "job.get",
        ("POST", "/v1/jobs/{id}/cancel") => "job.cancel",
        ("PUT", "/v1/scenes/{name}") => "scene.put",
        ("GET", "/v1/scenes") => "scene.list",
        ("GET", "/v1/scenes/{name}") => "scene.get",
        ("DELETE", "/v1/scenes/{name}") => "scene.delete",
        ("POST", "/v1/scenes/{name}/activate") => "scene.activate",
        ("GET", "/v1/alert-rules") => "alert_rule.list",
        ("PUT", "/v1/alert-rules/{id}") => "alert_rule.put",
        ("GET", "/v1/alert-rules/{id}") => "alert_rule.get",
        ("DELETE", "/v1/alert-rules/{id}") => "alert_rule.delete",
        ("GET", "/v1/alerts") => "alert.list",
        (m, p) => return format!("{m} {p}"),
    };
    name.to_owned()
}

/// Routes anyone may call: they authenticate themselves, or serve public documents.
fn is_public(method: &Method, path: &str) -> bool {
    matches!(
        (method.as_str(), path),
        ("POST", "/v1/auth/login") | ("GET", "/v1/openapi.json")
    )
}

/// The resource a path names: `/v1/devices/{id}/...` with `id` = `s-1` is `device:s-1`.
fn target(matched: &str, actual: &str) -> Option<String> {
    let kinds = [
        ("devices", "device"),
        ("users", "user"),
        ("api-keys", "key"),
        ("jobs", "job"),
        ("scenes", "scene"),
        ("alert-rules", "alert_rule"),
    ];
    let m: Vec<&str> = matched.split('/').collect();
    let a: Vec<&str> = actual.split('/').collect();
    if m.len() != a.len() {
        return None;
    }
    let i = m.iter().position(|s| s.starts_with('{'))?;
    let kind = kinds.iter().find(|(seg, _)| m[i - 1] == *seg)?.1;
    Some(format!("{kind}:{}", percent_decode(a[i])))
}

/// `%XX` escapes in a path segment (IDs use a safe alphabet; anything else stays as sent).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        })
        .map_or_else(|| hex::encode(rand::random::<[u8; 12]>()), str::to_owned)
}

fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The middleware (a route layer, so the matched path is known).
pub(crate) async fn pipeline(
    State(state): State<Arc<AdminState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(matched) = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
    else {
        return next.run(req).await;
    };
    let method = req.method().clone();
    let rid = request_id(&req);
    let mut draft = Draft {
        actor: "anonymous".to_owned(),
        source: req
            .extensions()
            .get::<ConnectInfo<fleetgate_tls::Peer>>()
            .map(|c| c.0.addr.to_string()),
        request_id: Some(rid.clone()),
        action: action(&method, &matched),
        target: target(&matched, req.uri().path()),
        ..Draft::default()
    };
    if !is_public(&method, &matched) {
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match state.authn.authenticate(&*state.bus, authorization).await {
            Ok(principal) => {
                principal.actor.clone_into(&mut draft.actor);
                draft.role = Some(principal.role.as_str().to_owned());
                req.extensions_mut().insert(principal);
            }
            Err(refused) => {
                let response = AppError::from(refused).into_response();
                return finish(&state, draft, response, rid).await;
            }
        }
    }
    if changes_state(&method)
        && let Err(error) = state
            .audit
            .append(Draft {
                stage: Some(Stage::Request),
                ..draft.clone()
            })
            .await
    {
        let mut response = AppError::from(error).into_response();
        set_request_id(&mut response, &rid);
        return response;
    }
    let response = next.run(req).await;
    let audited = changes_state(&method)
        || matches!(
            response.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        )
        || response
            .extensions()
            .get::<Note>()
            .is_some_and(|n| n.reason == Some("out_of_scope"));
    if audited {
        finish(&state, draft, response, rid).await
    } else {
        let mut response = response;
        set_request_id(&mut response, &rid);
        response
    }
}

/// Appends the response entry and returns the response.
async fn finish(
    state: &AdminState,
    mut draft: Draft,
    mut response: Response,
    rid: String,
) -> Response {
    let status = response.status();
    let note = response
        .extensions_mut()
        .remove::<Note>()
        .unwrap_or_default();
    draft.stage = Some(Stage::Response);
    draft.outcome = Some(status.as_u16());
    draft.msgid = note.msgid;
    draft.job = note.job;
    if !status.is_success() {
        draft.reason = note.reason.map(str::to_owned);
    }
    if let Some(t) = note.target {
        draft.target = Some(t);
    }
    if draft.actor == "anonymous"
        && let Some(a) = note.actor
    {
        draft.actor = a;
    }
    if let Err(error) = state.audit.append(draft).await {
        // The request has run: its outcome stands, and the log shows its request entry
        // without a response.
        state
            .audit_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        warn!(message = "could not audit a response", %error);
    }
    set_request_id(&mut response, &rid);
    response
}

fn set_request_id(response: &mut Response, rid: &str) {
    if let Ok(v) = HeaderValue::from_str(rid) {
        response.headers_mut().insert("x-request-id", v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_come_from_the_path() {
        assert_eq!(
            target("/v1/devices/{id}/commands", "/v1/devices/s-1/commands").as_deref(),
            Some("device:s-1")
        );
        assert_eq!(
            target("/v1/api-keys/{id}", "/v1/api-keys/ab%3Ac").as_deref(),
            Some("key:ab:c")
        );
        assert_eq!(target("/v1/devices", "/v1/devices"), None);
    }

    #[test]
    fn known_routes_have_names() {
        assert_eq!(action(&Method::POST, "/v1/devices"), "device.create");
        assert_eq!(action(&Method::PUT, "/v1/x"), "PUT /v1/x");
    }
}
