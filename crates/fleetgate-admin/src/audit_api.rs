//! Reading and verifying the audit log over REST.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::IntoResponse;
use fleetgate_audit::Entry;
use fleetgate_bus::StreamId;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Auth, need};
use crate::{AdminState, AppError, ErrorBody, Res};

/// Entries read from the log per call at most, whatever the filters (so a filter that
/// matches nothing still answers quickly, with a cursor to go on from).
const SCAN: usize = 5000;

/// `GET /v1/audit` filters; all optional, combined with AND.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AuditQuery {
    /// Exact actor (`user:ann`, `key:<id>`, `bootstrap`).
    actor: Option<String>,
    /// Exact action (`device.create`, `command.send`, ...).
    action: Option<String>,
    /// Exact target (`device:sensor-001`).
    target: Option<String>,
    /// HTTP status of the outcome.
    #[param(minimum = 100, maximum = 599)]
    outcome: Option<u16>,
    /// Entries at or after this time, ms since the epoch.
    since: Option<i64>,
    /// Entries before this time, ms since the epoch.
    until: Option<i64>,
    /// The `next` of the previous page.
    #[param(pattern = "^[0-9]{1,19}-[0-9]{1,19}$")]
    cursor: Option<String>,
    /// Entries per page, 1-1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// A page of entries.
#[derive(Serialize, ToSchema)]
pub(crate) struct AuditPage {
    /// Each entry with its position `id`.
    entries: Vec<Value>,
    /// Cursor of the next page (the position of the last entry read); `null` when the log
    /// has no more entries yet. Pages may hold fewer entries than asked and still go on.
    next: Option<String>,
}

/// A position `<ms>-<seq>` as the log hands them out (a bare `<ms>` is not one).
fn valid_cursor(c: &str) -> Result<StreamId, AppError> {
    let id = StreamId(c.to_owned());
    if !c.contains('-') || id.parts().is_err() {
        return Err(AppError::bad_request("positions look like 1700000000000-0"));
    }
    Ok(id)
}

/// Entries in log order, filtered, with cursor paging that returns every entry exactly once
/// while entries are being appended.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn list(
    State(state): State<Arc<AdminState>>,
    _auth: Auth<need::AuditRead>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Res {
    let Query(q) = query.map_err(|r| AppError::bad_request(r.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(AppError::bad_request("limit must be 1-1000"));
    }
    if q.outcome.is_some_and(|o| !(100..=599).contains(&o)) {
        return Err(AppError::bad_request(
            "outcome must be an HTTP status, 100-599",
        ));
    }
    let mut after = match (&q.cursor, q.since) {
        (Some(c), _) => Some(valid_cursor(c)?),
        // Positions start with the append time in ms: start just before `since`.
        (None, Some(since)) if since > 0 => Some(StreamId(format!("{}-{}", since - 1, u64::MAX))),
        _ => None,
    };
    let mut entries = Vec::new();
    let mut scanned = 0;
    let mut next = None;
    'scan: while scanned < SCAN {
        let page = state
            .audit
            .read(after.as_ref(), 1000.min(SCAN - scanned))
            .await?;
        if page.is_empty() {
            break;
        }
        for record in &page {
            scanned += 1;
            next = Some(record.id.0.clone());
            let Ok(e) = Entry::parse(&record.entry) else {
                continue;
            };
            if q.until.is_some_and(|u| e.ts >= u) {
                break 'scan;
            }
            let keep = q.actor.as_ref().is_none_or(|a| &e.actor == a)
                && q.action.as_ref().is_none_or(|a| &e.action == a)
                && q.target
                    .as_ref()
                    .is_none_or(|t| e.target.as_ref() == Some(t))
                && q.outcome.is_none_or(|o| e.outcome == Some(o));
            if keep {
                let mut v = serde_json::to_value(&e).unwrap_or(Value::Null);
                v["id"] = json!(record.id.0);
                entries.push(v);
                if entries.len() == limit {
                    break 'scan;
                }
            }
        }
        after = page.last().map(|r| r.id.clone());
    }
    Ok(Json(AuditPage { entries, next }).into_response())
}

/// `GET /v1/audit/verify` parameters.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct VerifyQuery {
    /// Verify from this entry on (its own link backwards is not checked).
    #[param(pattern = "^[0-9]{1,19}-[0-9]{1,19}$")]
    from: Option<String>,
}

/// Checks the chain and the signed checkpoints; names the first entry that does not verify.
#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit", params(VerifyQuery),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn verify(
    State(state): State<Arc<AdminState>>,
    _auth: Auth<need::AuditRead>,
    query: Result<Query<VerifyQuery>, QueryRejection>,
) -> Res {
    let Query(q) = query.map_err(|r| AppError::bad_request(r.body_text()))?;
    let from = q.from.as_deref().map(valid_cursor).transpose()?;
    let report = state.audit.verify(from.as_ref(), &state.audit_keys).await?;
    let mut answer = json!({
        "ok": report.ok(),
        "entries": report.entries,
        "checkpoints": report.checkpoints,
        "lastCheckpointSeq": report.last_checkpoint_seq,
    });
    if let Some(b) = report.broken {
        answer["firstBad"] = json!(b.first_bad.map(|id| id.0));
        answer["firstBadSeq"] = json!(b.seq);
        answer["reason"] = json!(b.reason);
    }
    Ok(Json(answer).into_response())
}

/// `GET /v1/audit/export` parameters.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ExportQuery {
    /// Export the entries after this position (default: from the first entry).
    #[param(pattern = "^[0-9]{1,19}-[0-9]{1,19}$")]
    cursor: Option<String>,
}

/// The log as JSON lines `{"id","entry"}` with each entry's exact text, from the start (or
/// after `cursor`) to its current end, streamed. Verify a copy offline with
/// `fleetgate audit verify --export FILE --public-key KEY.pem`.
#[utoipa::path(get, path = "/v1/audit/export", tag = "audit", params(ExportQuery),
    responses((status = 200, content_type = "application/x-ndjson", body = String),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn export(
    State(state): State<Arc<AdminState>>,
    _auth: Auth<need::AuditRead>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Res {
    let Query(q) = query.map_err(|r| AppError::bad_request(r.body_text()))?;
    let after = q.cursor.as_deref().map(valid_cursor).transpose()?;
    // The first page is read before answering, so an unavailable bus is a 503, not a cut
    // stream.
    let first = state.audit.read(after.as_ref(), 1000).await?;
    let audit = state.audit.clone();
    let pages = futures_util::stream::unfold(Some(first), move |page| {
        let audit = audit.clone();
        async move {
            let page = page?;
            if page.is_empty() {
                return None;
            }
            let mut text = String::new();
            for r in &page {
                text.push_str(&fleetgate_audit::export_line(r));
                text.push('\n');
            }
            let next = if page.len() < 1000 {
                Some(Vec::new())
            } else {
                // A failure ends the stream early; the verifier then reports a short copy.
                audit.read(page.last().map(|r| &r.id), 1000).await.ok()
            };
            Some((Ok::<_, std::convert::Infallible>(text), next))
        }
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(pages),
    )
        .into_response())
}

/// The checkpoint signing key's public half (PEM) and ID, for verifying exported copies.
#[utoipa::path(get, path = "/v1/audit/public-key", tag = "audit",
    responses((status = 200, body = Object), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub(crate) async fn public_key(
    State(state): State<Arc<AdminState>>,
    _auth: Auth<need::AuditRead>,
) -> Res {
    let signer = state.audit.signer();
    Ok(
        Json(json!({ "kid": signer.kid(), "publicKeyPem": signer.public_key_pem() }))
            .into_response(),
    )
}
