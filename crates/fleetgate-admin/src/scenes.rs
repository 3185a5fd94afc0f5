//! Scenes: named sets of (target, command) pairs such as "away mode"; activating one runs
//! all of its pairs as one job, in one audited call.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use fleetgate_bus::{BusError, DocKind};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::auth::{Auth, need};
use crate::jobs::{Step, check_steps};
use crate::pipeline::{Note, noted};
use crate::rbac::{Principal, Scope};
use crate::{AdminConfig, AdminState, AppError, Body, ErrorBody, Res, now_ms, put_versioned};

/// A scene as stored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SceneDoc {
    name: String,
    actions: Vec<Step>,
    /// Its author's groups: who may see and activate it.
    scope: Vec<String>,
    updated_ms: i64,
    updated_by: String,
}

/// `PUT /v1/scenes/{name}` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutScene {
    /// 1-100 (target, command) pairs.
    #[schema(min_items = 1, max_items = 100)]
    actions: Vec<Step>,
}

impl PutScene {
    /// Checks the scene's name and actions against the limits and `principal`'s scope.
    pub(crate) fn check(
        &self,
        name: &str,
        cfg: &AdminConfig,
        principal: &Principal,
    ) -> Result<(), AppError> {
        check_name(name)?;
        check_steps(cfg, principal, &self.actions)
    }
}

fn check_name(name: &str) -> Result<(), AppError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(AppError::bad_request(
            "scene names are 1-64 characters of [A-Za-z0-9._-]",
        ))
    }
}

async fn load(state: &AdminState, principal: &Principal, name: &str) -> Result<SceneDoc, AppError> {
    let missing = || AppError::not_found(format!("no scene {name}"));
    let Some(doc) = state.bus.doc_get(DocKind::Scene, name).await? else {
        return Err(missing());
    };
    let scene: SceneDoc =
        serde_json::from_str(&doc.body).map_err(|e| BusError::Corrupt(e.to_string()))?;
    if principal.scope.contains(&Scope::from_groups(&scene.scope)) {
        Ok(scene)
    } else {
        Err(missing().with_reason("out_of_scope"))
    }
}

/// Creates or replaces a scene.
#[utoipa::path(put, path = "/v1/scenes/{name}", tag = "jobs", request_body = PutScene,
    params(("name" = String, Path, description = "scene name")),
    responses((status = 200, body = SceneDoc), (status = 201, body = SceneDoc),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn put_scene(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::JobWrite>,
    Path(name): Path<String>,
    Body(req): Body<PutScene>,
) -> Res {
    req.check(&name, &state.config, &auth.principal)?;
    let existing = state.bus.doc_get(DocKind::Scene, &name).await?;
    if existing.is_some() {
        // Replacing needs the scene to be visible (a scene of another scope is a 404).
        load(&state, &auth.principal, &name).await?;
    }
    let scene = SceneDoc {
        name: name.clone(),
        actions: req.actions,
        scope: auth.principal.scope.to_groups(),
        updated_ms: now_ms(),
        updated_by: auth.principal.actor.clone(),
    };
    let text = serde_json::to_string(&scene).map_err(|e| BusError::Corrupt(e.to_string()))?;
    let status = put_versioned(
        &state,
        DocKind::Scene,
        &name,
        &text,
        existing.map(|d| d.version),
        "scene",
    )
    .await?;
    Ok((status, Json(scene)).into_response())
}

/// A scene.
#[utoipa::path(get, path = "/v1/scenes/{name}", tag = "jobs",
    params(("name" = String, Path, description = "scene name")),
    responses((status = 200, body = SceneDoc), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn get_scene(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::JobRead>,
    Path(name): Path<String>,
) -> Res {
    Ok(Json(load(&state, &auth.principal, &name).await?).into_response())
}

/// Scenes the caller may see (at most 1000).
#[utoipa::path(get, path = "/v1/scenes", tag = "jobs",
    responses((status = 200, body = Object), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn list_scenes(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::JobRead>,
) -> Res {
    let docs = state.bus.doc_list(DocKind::Scene, None, 1000).await?;
    let mut scenes = Vec::new();
    for d in &docs {
        let scene: SceneDoc =
            serde_json::from_str(&d.body).map_err(|e| BusError::Corrupt(e.to_string()))?;
        if auth
            .principal
            .scope
            .contains(&Scope::from_groups(&scene.scope))
        {
            scenes.push(scene);
        }
    }
    Ok(Json(json!({ "scenes": scenes })).into_response())
}

/// Deletes a scene (jobs it started go on).
#[utoipa::path(delete, path = "/v1/scenes/{name}", tag = "jobs",
    params(("name" = String, Path, description = "scene name")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn delete_scene(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::JobWrite>,
    Path(name): Path<String>,
) -> Res {
    load(&state, &auth.principal, &name).await?;
    state.bus.doc_delete(DocKind::Scene, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Runs every action of the scene as one job; answers with the job's ID.
#[utoipa::path(post, path = "/v1/scenes/{name}/activate", tag = "jobs",
    params(("name" = String, Path, description = "scene name")),
    responses((status = 202, body = Object), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn activate(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::JobWrite>,
    Path(name): Path<String>,
) -> Res {
    let scene = load(&state, &auth.principal, &name).await?;
    let id = crate::jobs::create(
        &state,
        &auth.principal,
        scene.actions,
        None,
        None,
        Some(name),
    )
    .await?;
    Ok(noted(
        (StatusCode::ACCEPTED, Json(json!({ "job": id }))).into_response(),
        Note {
            job: Some(id),
            ..Note::default()
        },
    ))
}
