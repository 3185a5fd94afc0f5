//! Alert rules (CRUD) and alerts (`GET /v1/alerts`). Rules are admin documents that every
//! gateway node re-reads and evaluates at ingest (see `fleetgate-gateway`'s `alerts`);
//! alerts are what the nodes recorded in the bus when rules fired and resolved.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use fleetgate_alerts::{Rule, Target};
use fleetgate_bus::{BusError, DocKind, StreamId};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;

use crate::auth::{Auth, need};
use crate::rbac::{Principal, Scope};
use crate::{AdminState, AppError, Body, ErrorBody, Res, put_versioned};

/// Most rules a fleet may have (each node evaluates all that apply to a device).
const MAX_RULES: usize = 10_000;

fn corrupt(e: serde_json::Error) -> AppError {
    BusError::Corrupt(e.to_string()).into()
}

/// Whether the caller may see and change a rule: its group in scope, or its device.
async fn rule_in_scope(
    state: &AdminState,
    principal: &Principal,
    rule: &Rule,
) -> Result<bool, AppError> {
    Ok(match (&principal.scope, &rule.target) {
        (Scope::All, _) => true,
        (scope, Target::Group(g)) => scope.covers_groups(std::slice::from_ref(g)),
        (scope, Target::Device(d)) => state
            .bus
            .device_get(d)
            .await?
            .is_some_and(|r| scope.covers(&r)),
    })
}

/// A stored rule the caller may see; out-of-scope ones are 404, as devices are.
async fn load(
    state: &AdminState,
    principal: &Principal,
    id: &str,
) -> Result<(Rule, u64), AppError> {
    find(state, principal, id)
        .await?
        .ok_or_else(|| AppError::not_found(format!("no alert rule {id}")))
}

/// [`load`], with a missing rule as `None` (an invisible one is still a 404).
async fn find(
    state: &AdminState,
    principal: &Principal,
    id: &str,
) -> Result<Option<(Rule, u64)>, AppError> {
    let Some(doc) = state.bus.doc_get(DocKind::AlertRule, id).await? else {
        return Ok(None);
    };
    let rule: Rule = serde_json::from_str(&doc.body).map_err(corrupt)?;
    if rule_in_scope(state, principal, &rule).await? {
        Ok(Some((rule, doc.version)))
    } else {
        Err(AppError::not_found(format!("no alert rule {id}")).with_reason("out_of_scope"))
    }
}

/// Parses and validates a rule body; `id` (from the path) must match when the body has one.
pub(crate) fn parse_rule(mut body: Value, id: &str) -> Result<Rule, AppError> {
    if let Some(obj) = body.as_object_mut() {
        match obj.get("id") {
            None => {
                obj.insert("id".to_owned(), Value::String(id.to_owned()));
            }
            Some(Value::String(s)) if s == id => {}
            Some(_) => {
                return Err(AppError::bad_request(
                    "the body's id differs from the path's",
                ));
            }
        }
    }
    let rule: Rule = serde_json::from_value(body)
        .map_err(|e| AppError::bad_request(format!("invalid alert rule: {e}")))?;
    rule.validate()
        .map_err(|e| AppError::bad_request(format!("invalid alert rule: {e}")))?;
    Ok(rule)
}

/// Creates or replaces an alert rule. Nodes apply it within their refresh interval.
#[utoipa::path(put, path = "/v1/alert-rules/{id}", tag = "alerts", request_body = Rule,
    params(("id" = String, Path, description = "rule ID: 1-64 characters of [A-Za-z0-9_.-]")),
    responses((status = 200, body = Rule), (status = 201, body = Rule),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn put_rule(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::AlertWrite>,
    Path(id): Path<String>,
    Body(body): Body<Value>,
) -> Res {
    let rule = parse_rule(body, &id)?;
    if !rule_in_scope(&state, &auth.principal, &rule).await? {
        // As for jobs and scenes: a group outside the caller's scope is forbidden; a device
        // it cannot see reads as missing, as it does everywhere else.
        return Err(match &rule.target {
            Target::Group(_) => AppError::forbidden("the group is outside your scope"),
            Target::Device(d) => {
                AppError::not_found(format!("no device {d}")).with_reason("out_of_scope")
            }
        });
    }
    // Replacing needs the rule to be visible (a rule of another scope is a 404).
    let existing = match find(&state, &auth.principal, &id).await? {
        Some((_, version)) => Some(version),
        None => {
            let count = state
                .bus
                .doc_list(DocKind::AlertRule, None, MAX_RULES)
                .await?
                .len();
            if count >= MAX_RULES {
                return Err(AppError::new(
                    StatusCode::CONFLICT,
                    "too_many_rules",
                    format!("at most {MAX_RULES} alert rules"),
                ));
            }
            None
        }
    };
    let text = serde_json::to_string(&rule).map_err(corrupt)?;
    let status = put_versioned(&state, DocKind::AlertRule, &id, &text, existing, "rule").await?;
    Ok((status, Json(rule)).into_response())
}

/// An alert rule.
#[utoipa::path(get, path = "/v1/alert-rules/{id}", tag = "alerts",
    params(("id" = String, Path, description = "rule ID")),
    responses((status = 200, body = Rule), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn get_rule(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::DeviceRead>,
    Path(id): Path<String>,
) -> Res {
    Ok(Json(load(&state, &auth.principal, &id).await?.0).into_response())
}

/// The alert rules the caller may see.
#[utoipa::path(get, path = "/v1/alert-rules", tag = "alerts",
    responses((status = 200, body = Object), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn list_rules(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::DeviceRead>,
) -> Res {
    let docs = state
        .bus
        .doc_list(DocKind::AlertRule, None, MAX_RULES)
        .await?;
    let mut rules = Vec::new();
    for d in &docs {
        let rule: Rule = serde_json::from_str(&d.body).map_err(corrupt)?;
        if rule_in_scope(&state, &auth.principal, &rule).await? {
            rules.push(rule);
        }
    }
    Ok(Json(json!({ "rules": rules })).into_response())
}

/// Deletes an alert rule. Its open alerts stay open (resolve them by hand in the systems
/// that read the stream); nodes stop evaluating it within their refresh interval.
#[utoipa::path(delete, path = "/v1/alert-rules/{id}", tag = "alerts",
    params(("id" = String, Path, description = "rule ID")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn delete_rule(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::AlertWrite>,
    Path(id): Path<String>,
) -> Res {
    load(&state, &auth.principal, &id).await?;
    state.bus.doc_delete(DocKind::AlertRule, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/alerts` query.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AlertQuery {
    /// `open`: the alerts open now. `all` (the default): the alerts stream's records (each
    /// alert as it fired and as it resolved) in order, oldest retained first.
    #[param(pattern = "^(open|all)$")]
    state: Option<String>,
    /// Continue after this record (the previous page's `next`).
    #[param(pattern = "^[0-9]{1,19}-[0-9]{1,19}$")]
    after: Option<String>,
    /// At most this many (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// Alerts on the caller's devices: the open ones, or the stream's records page by page.
#[utoipa::path(get, path = "/v1/alerts", tag = "alerts", params(AlertQuery),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn list_alerts(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::DeviceRead>,
    query: Result<Query<AlertQuery>, QueryRejection>,
) -> Res {
    let Query(q) = query.map_err(|r| AppError::bad_request(r.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(AppError::bad_request("limit must be 1-1000"));
    }
    // Checked whatever `state` is: a malformed parameter is an error even where unused.
    if let Some(a) = &q.after
        && (!a.contains('-') || StreamId(a.clone()).parts().is_err())
    {
        return Err(AppError::bad_request(
            "after must be a record ID (<ms>-<seq>)",
        ));
    }
    let (alerts, next) = match q.state.as_deref() {
        Some("open") => {
            let texts = state.bus.alerts_open(limit).await?;
            (texts, None)
        }
        None | Some("all") => {
            let after = q.after.map(StreamId);
            let records = state.bus.alerts_read(after.as_ref(), limit).await?;
            let next = (records.len() == limit)
                .then(|| records.last().map(|r| r.id.0.clone()))
                .flatten();
            (records.into_iter().map(|r| r.alert).collect(), next)
        }
        Some(_) => return Err(AppError::bad_request("state must be open or all")),
    };
    let mut values: Vec<Value> = alerts
        .iter()
        .map(|t| serde_json::from_str(t))
        .collect::<Result<_, _>>()
        .map_err(corrupt)?;
    if let Scope::Groups(_) = auth.principal.scope {
        values = in_scope(&state, &auth.principal, values).await?;
    }
    Ok(Json(json!({ "alerts": values, "next": next })).into_response())
}

/// Only the alerts of devices in the caller's scope (one registry read per page).
async fn in_scope(
    state: &AdminState,
    principal: &Principal,
    alerts: Vec<Value>,
) -> Result<Vec<Value>, AppError> {
    let devices: Vec<String> = alerts
        .iter()
        .filter_map(|a| a.get("device")?.as_str().map(str::to_owned))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let records = state.bus.device_get_many(&devices).await?;
    let visible: HashSet<&str> = devices
        .iter()
        .zip(&records)
        .filter(|(_, r)| r.as_ref().is_some_and(|r| principal.scope.covers(r)))
        .map(|(d, _)| d.as_str())
        .collect();
    Ok(alerts
        .into_iter()
        .filter(|a| {
            a.get("device")
                .and_then(Value::as_str)
                .is_some_and(|d| visible.contains(d))
        })
        .collect())
}
