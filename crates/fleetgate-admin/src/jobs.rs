//! Fleet jobs: one command for many devices (a group, explicit IDs, or both; a scene is a job
//! of several such steps). The handlers here only record a job; [`crate::job_runner`] sends
//! it, in bounded batches, from whichever admin process holds its lease.
//!
//! A job is a document in the bus (its steps, progress cursor and lease) plus, per step, the
//! bus's job executions (`Bus::job_push` and friends) under the ID `<job>.<step>`: a device
//! gets one command per step, with msgid `job-<job>-<step>`, whoever sends it and however
//! often a batch is sent again after a crash.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use fleetgate_bus::{Bus, BusError, DocExpect, DocKind, DocWrite, JobCounts};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Auth, need};
use crate::pipeline::{Note, noted};
use crate::rbac::{Principal, Scope};
use crate::{AdminConfig, AdminState, AppError, Body, ErrorBody, Res, now_ms};

/// Most explicit device IDs in one step.
pub(crate) const MAX_EXPLICIT: usize = 10_000;
/// Most steps in one job (scene actions).
pub(crate) const MAX_STEPS: usize = 100;

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) enum JobState {
    /// Commands are being queued.
    Running,
    /// Everything is queued; waiting for outcomes.
    Dispatched,
    /// Every execution has finished.
    Completed,
    /// Cancelled: what was not sent is being (or has been) removed.
    Cancelled,
    /// Stopped by its abort criteria; what was not sent is removed.
    Aborted,
}

/// One (target, command) pair.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Step {
    /// Every device of this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) group: Option<String>,
    /// These devices (at most 10,000).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 10_000)]
    pub(crate) devices: Vec<String>,
    /// The command's payload.
    pub(crate) payload: Value,
    /// 1 (default) or 2: jobs are queued.
    #[serde(default, deserialize_with = "crate::num::opt_unsigned")]
    #[schema(minimum = 1, maximum = 2)]
    pub(crate) qos: Option<u8>,
    /// How long each command stays queued unacknowledged.
    #[serde(default, deserialize_with = "crate::num::opt_unsigned")]
    #[schema(minimum = 1, maximum = 604_800_000)]
    pub(crate) ttl_ms: Option<u64>,
}

/// How far sending has got.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Progress {
    /// The step being sent.
    pub(crate) step: usize,
    /// Explicit devices of that step already sent.
    pub(crate) explicit_done: usize,
    /// The group's last device already sent (registry order).
    pub(crate) group_after: Option<String>,
}

/// Which admin process sends the job, until when.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Lease {
    pub(crate) owner: String,
    pub(crate) until_ms: i64,
}

/// A job as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JobDoc {
    pub(crate) id: String,
    pub(crate) created_ms: i64,
    pub(crate) created_by: String,
    /// The creator's groups: who may see the job, and which devices it may reach.
    pub(crate) scope: Vec<String>,
    pub(crate) steps: Vec<Step>,
    pub(crate) rate_per_sec: Option<u32>,
    pub(crate) abort_failed_percent: Option<u8>,
    pub(crate) abort_min_finished: u64,
    pub(crate) scene: Option<String>,
    pub(crate) state: JobState,
    pub(crate) progress: Progress,
    /// Executions created (queued, or refused by a full queue).
    pub(crate) pushed: u64,
    /// Named devices that do not exist or are outside the creator's scope.
    pub(crate) skipped: u64,
    pub(crate) lease: Option<Lease>,
    pub(crate) dispatched_ms: Option<i64>,
    pub(crate) finished_ms: Option<i64>,
}

impl JobDoc {
    /// The bus's job ID of step `i`.
    pub(crate) fn bus_id(&self, step: usize) -> String {
        format!("{}.{step}", self.id)
    }

    /// Executions per state, over every step.
    pub(crate) async fn counts(&self, bus: &dyn Bus) -> Result<JobCounts, BusError> {
        let mut total = JobCounts::default();
        for i in 0..self.steps.len() {
            total.add(&bus.job_counts(&self.bus_id(i)).await?);
        }
        Ok(total)
    }

    fn visible_to(&self, principal: &Principal) -> bool {
        principal.scope.contains(&Scope::from_groups(&self.scope))
    }
}

fn corrupt(e: serde_json::Error) -> AppError {
    BusError::Corrupt(e.to_string()).into()
}

/// Reads a job document with its version.
pub(crate) async fn load(bus: &dyn Bus, id: &str) -> Result<Option<(JobDoc, u64)>, BusError> {
    match bus.doc_get(DocKind::Job, id).await? {
        Some(doc) => serde_json::from_str(&doc.body)
            .map(|j| Some((j, doc.version)))
            .map_err(|e| BusError::Corrupt(e.to_string())),
        None => Ok(None),
    }
}

/// A job the caller may see; one outside its scope is a 404 like a missing one (audited as
/// the refusal it is).
async fn visible(
    bus: &dyn Bus,
    principal: &Principal,
    id: &str,
) -> Result<(JobDoc, u64), AppError> {
    match load(bus, id).await? {
        Some((job, v)) if job.visible_to(principal) => Ok((job, v)),
        Some(_) => Err(AppError::not_found(format!("no job {id}")).with_reason("out_of_scope")),
        None => Err(AppError::not_found(format!("no job {id}"))),
    }
}

/// Writes a job document if it is still at `version`; the new version, or `None`.
pub(crate) async fn save(
    bus: &dyn Bus,
    job: &JobDoc,
    version: u64,
) -> Result<Option<u64>, BusError> {
    let text = serde_json::to_string(job).map_err(|e| BusError::Corrupt(e.to_string()))?;
    Ok(
        match bus
            .doc_put(DocKind::Job, &job.id, &text, DocExpect::Version(version))
            .await?
        {
            DocWrite::Written(v) => Some(v),
            DocWrite::Conflict(_) => None,
        },
    )
}

/// Checks steps against the caller's scope and the limits.
pub(crate) fn check_steps(
    cfg: &AdminConfig,
    principal: &Principal,
    steps: &[Step],
) -> Result<(), AppError> {
    if steps.is_empty() || steps.len() > MAX_STEPS {
        return Err(AppError::bad_request(format!(
            "a job has 1-{MAX_STEPS} steps"
        )));
    }
    for step in steps {
        if step.group.is_none() && step.devices.is_empty() {
            return Err(AppError::bad_request(
                "a step needs a group, devices, or both",
            ));
        }
        if step.devices.len() > MAX_EXPLICIT {
            return Err(AppError::bad_request(format!(
                "at most {MAX_EXPLICIT} explicit devices per step; target a group for more"
            )));
        }
        step.devices
            .iter()
            .try_for_each(|d| crate::devices::check_device_id(d))?;
        if let Some(g) = &step.group {
            crate::devices::check_group(g)?;
            if !principal.scope.covers_groups(std::slice::from_ref(g)) {
                return Err(AppError::forbidden("the group is outside your scope"));
            }
        }
        let (qos, _) = crate::commands::check_delivery(cfg, step.qos, step.ttl_ms)?;
        if qos == fleetgate_protocol::Qos::AtMostOnce {
            return Err(AppError::bad_request("jobs are queued: qos must be 1 or 2"));
        }
    }
    Ok(())
}

/// Records a new job and wakes the runner; returns its ID.
pub(crate) async fn create(
    state: &AdminState,
    principal: &Principal,
    steps: Vec<Step>,
    rate_per_sec: Option<u32>,
    abort_failed_percent: Option<u8>,
    scene: Option<String>,
) -> Result<String, AppError> {
    let id = hex::encode(rand::random::<[u8; 8]>());
    let job = JobDoc {
        id: id.clone(),
        created_ms: now_ms(),
        created_by: principal.actor.clone(),
        scope: principal.scope.to_groups(),
        steps,
        rate_per_sec,
        abort_failed_percent,
        abort_min_finished: 10,
        scene,
        state: JobState::Running,
        progress: Progress::default(),
        pushed: 0,
        skipped: 0,
        lease: None,
        dispatched_ms: None,
        finished_ms: None,
    };
    let text = serde_json::to_string(&job).map_err(corrupt)?;
    // The index entry first: a job without one would never be sent; an entry whose job is
    // missing is dropped by the runner.
    state
        .bus
        .doc_put(DocKind::ActiveJob, &id, "{}", DocExpect::Any)
        .await?;
    if let DocWrite::Conflict(_) = state
        .bus
        .doc_put(DocKind::Job, &id, &text, DocExpect::Absent)
        .await?
    {
        return Err(BusError::Unavailable("job ID collision".into()).into());
    }
    state.jobs_wake.notify_one();
    Ok(id)
}

/// `POST /v1/jobs` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CreateJob {
    /// Every device of this group.
    group: Option<String>,
    /// These devices (at most 10,000).
    #[serde(default)]
    #[schema(max_items = 10_000)]
    devices: Vec<String>,
    /// The command's payload.
    payload: Value,
    /// 1 (default) or 2.
    #[serde(default, deserialize_with = "crate::num::opt_unsigned")]
    #[schema(minimum = 1, maximum = 2)]
    qos: Option<u8>,
    /// Each command's TTL.
    #[serde(default, deserialize_with = "crate::num::opt_unsigned")]
    #[schema(minimum = 1, maximum = 604_800_000)]
    ttl_ms: Option<u64>,
    /// Devices per second to send to (default: as fast as batches go).
    #[serde(default, deserialize_with = "crate::num::opt_unsigned")]
    #[schema(minimum = 1, maximum = 100_000)]
    rate: Option<u32>,
    /// Stop (and remove what is unsent) once more than this percentage of finished
    /// executions failed or timed out (checked once at least 10 have finished).
    #[serde(default, deserialize_with = "crate::num::opt_unsigned")]
    #[schema(minimum = 0, maximum = 100)]
    abort_failed_percent: Option<u8>,
}

impl CreateJob {
    /// Checks the job against the limits and `principal`'s scope; its one step.
    pub(crate) fn check(
        self,
        cfg: &AdminConfig,
        principal: &Principal,
    ) -> Result<Vec<Step>, AppError> {
        if !self.rate.is_none_or(|r| (1..=100_000).contains(&r))
            || self.abort_failed_percent.is_some_and(|p| p > 100)
        {
            return Err(AppError::bad_request(
                "rate must be 1-100000 and abortFailedPercent 0-100",
            ));
        }
        let steps = vec![Step {
            group: self.group,
            devices: self.devices,
            payload: self.payload,
            qos: self.qos,
            ttl_ms: self.ttl_ms,
        }];
        check_steps(cfg, principal, &steps)?;
        Ok(steps)
    }
}

/// Queues a command for a set of devices; answers at once with the job's ID.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = CreateJob,
    responses((status = 202, body = Object), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn create_job(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::JobWrite>,
    Body(req): Body<CreateJob>,
) -> Res {
    let (rate, abort_failed_percent) = (req.rate, req.abort_failed_percent);
    let steps = req.check(&state.config, &auth.principal)?;
    let id = create(
        &state,
        &auth.principal,
        steps,
        rate,
        abort_failed_percent,
        None,
    )
    .await?;
    Ok(noted(
        (StatusCode::ACCEPTED, Json(json!({ "id": id }))).into_response(),
        Note::target(format!("job:{id}")),
    ))
}

/// `GET /v1/jobs/{id}` paging of per-device outcomes.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct JobQuery {
    /// Which step's executions to list (default 0).
    #[param(minimum = 0, maximum = 99)]
    step: Option<usize>,
    /// The `next` of the previous page of executions.
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    cursor: Option<String>,
    /// Executions per page, 0-1000 (default 100).
    #[param(minimum = 0, maximum = 1000)]
    limit: Option<usize>,
}

fn job_json(job: &JobDoc, counts: &JobCounts) -> Value {
    json!({
        "id": job.id,
        "state": job.state,
        "createdMs": job.created_ms,
        "createdBy": job.created_by,
        "scene": job.scene,
        "steps": job.steps,
        "rate": job.rate_per_sec,
        "abortFailedPercent": job.abort_failed_percent,
        "counts": {
            "queued": counts.queued,
            "delivered": counts.delivered,
            "succeeded": counts.succeeded,
            "failed": counts.failed,
            "timedOut": counts.timed_out,
            "cancelled": counts.cancelled,
        },
        "executions": counts.total(),
        "skipped": job.skipped,
        "dispatchedMs": job.dispatched_ms,
        "finishedMs": job.finished_ms,
    })
}

/// A job with its counts per state and a page of per-device outcomes.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path, description = "job ID"), JobQuery),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn get_job(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::JobRead>,
    Path(id): Path<String>,
    query: Result<Query<JobQuery>, QueryRejection>,
) -> Res {
    let Query(q) = query.map_err(|r| AppError::bad_request(r.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if limit > 1000 {
        return Err(AppError::bad_request("limit must be 0-1000"));
    }
    let (job, _) = visible(&*state.bus, &auth.principal, &id).await?;
    let step = q.step.unwrap_or(0);
    if step >= job.steps.len() {
        return Err(AppError::not_found(format!("job {id} has no step {step}")));
    }
    if let Some(c) = &q.cursor {
        crate::devices::check_device_id(c)?;
    }
    let counts = job.counts(&*state.bus).await?;
    let mut answer = job_json(&job, &counts);
    let execs = state
        .bus
        .job_execs(&job.bus_id(step), q.cursor.as_deref(), limit)
        .await?;
    answer["next"] = json!(
        (execs.len() == limit && limit > 0)
            .then(|| execs.last().map(|e| e.device.clone()))
            .flatten()
    );
    answer["outcomes"] = execs
        .iter()
        .map(|e| json!({"device": e.device, "msgid": e.msgid, "state": e.state.as_str(), "updatedMs": e.updated_ms}))
        .collect();
    Ok(Json(answer).into_response())
}

/// `GET /v1/jobs` paging.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// The `next` of the previous page.
    #[param(pattern = "^[0-9a-f]{16}$")]
    cursor: Option<String>,
    /// Jobs per page, 1-100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<usize>,
}

/// Jobs the caller may see, by ID, without counts.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListQuery),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn list_jobs(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::JobRead>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Res {
    let Query(q) = query.map_err(|r| AppError::bad_request(r.body_text()))?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(AppError::bad_request("limit must be 1-100"));
    }
    if q.cursor
        .as_ref()
        .is_some_and(|c| c.len() != 16 || !c.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(AppError::bad_request("cursor must be a job ID"));
    }
    let docs = state
        .bus
        .doc_list(DocKind::Job, q.cursor.as_deref(), limit)
        .await?;
    let mut jobs = Vec::new();
    for d in &docs {
        let job: JobDoc = serde_json::from_str(&d.body).map_err(corrupt)?;
        if job.visible_to(&auth.principal) {
            jobs.push(json!({"id": job.id, "state": job.state, "createdMs": job.created_ms, "createdBy": job.created_by, "scene": job.scene}));
        }
    }
    let next = (docs.len() == limit)
        .then(|| docs.last().map(|d| d.id.clone()))
        .flatten();
    Ok(Json(json!({ "jobs": jobs, "next": next })).into_response())
}

/// Cancels a job: nothing more is sent, and what is queued but not yet sent is removed
/// (shortly after this answer, by the runner); executions already sent finish as they will.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path, description = "job ID")),
    responses((status = 202, body = Object), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn cancel_job(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::JobWrite>,
    Path(id): Path<String>,
) -> Res {
    for _ in 0..16 {
        let (mut job, version) = visible(&*state.bus, &auth.principal, &id).await?;
        match job.state {
            JobState::Cancelled => {
                return Ok((
                    StatusCode::ACCEPTED,
                    Json(json!({"id": id, "state": job.state})),
                )
                    .into_response());
            }
            JobState::Completed | JobState::Aborted => {
                return Err(AppError::new(
                    StatusCode::CONFLICT,
                    "finished",
                    format!("job {id} has finished"),
                ));
            }
            JobState::Running | JobState::Dispatched => {}
        }
        job.state = JobState::Cancelled;
        if save(&*state.bus, &job, version).await?.is_some() {
            // The index entry again: a dispatched job may have finished meanwhile and lost it.
            state
                .bus
                .doc_put(DocKind::ActiveJob, &id, "{}", DocExpect::Any)
                .await?;
            state.jobs_wake.notify_one();
            return Ok((
                StatusCode::ACCEPTED,
                Json(json!({"id": id, "state": job.state})),
            )
                .into_response());
        }
    }
    Err(BusError::Unavailable("the job kept changing".into()).into())
}
