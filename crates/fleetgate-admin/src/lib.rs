//! fleetgate admin REST API: principals (users, API keys, the bootstrap key) with roles scoped
//! to device groups, the device registry, commands, shadows, nodes and the audit log. It
//! reaches gateway nodes only through the [`Bus`], where it also keeps all of its state.
//!
//! Where things live:
//! - who the caller is: [`auth`] (once per request, in the [`pipeline`]);
//! - what it may do: [`rbac`], asked by the extractors each handler declares;
//! - what is recorded: [`pipeline`] appends every state change, login and refusal to the
//!   audit log (`fleetgate-audit`), failing closed.

mod alerts;
mod audit_api;
mod auth;
mod commands;
mod device_keys;
mod devices;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod job_runner;
mod jobs;
mod num;
mod openapi;
mod pipeline;
mod principals;
mod rbac;
mod scenes;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, middleware};
use fleetgate_audit::{AuditConfig, AuditLog, Signer};
use fleetgate_bus::{Bus, BusError, DocExpect, DocKind, DocWrite};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{AppError, ErrorBody};
pub use fleetgate_authz::Role;
pub use fleetgate_authz::TokenKey;

/// Admin API settings; defaults here are the documented ones.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// ID this admin process receives command results under (distinct from any gateway's).
    pub node_id: String,
    /// Bootstrap API key (an admin of scope `*`); empty once admin users exist.
    pub api_key: String,
    /// Command TTL when a request gives none.
    pub default_ttl: Duration,
    /// Longest TTL a request may ask for.
    pub max_ttl: Duration,
    /// Longest `waitMs` a request may ask for.
    pub max_wait: Duration,
    /// Lifetime of a user token.
    pub token_ttl: Duration,
    /// HS256 keys for user tokens: the first signs, all verify. Empty: a random key.
    pub token_keys: Vec<TokenKey>,
    /// PKCS#8 PEM Ed25519 key that signs audit checkpoints. `None`: a random key.
    pub audit_signing_key_pem: Option<String>,
    /// Public keys (SPKI PEM) of earlier signing keys, still trusted when verifying.
    pub audit_verify_keys_pem: Vec<String>,
    /// How often the audit log's head is signed.
    pub audit_checkpoint_interval: Duration,
    /// Largest request body; larger ones answer 413.
    pub max_body_bytes: usize,
    /// Largest shadow document (reported + desired, as JSON); desired patches past it
    /// answer 413.
    pub shadow_max_bytes: usize,
    /// How long a job's lease lasts: a job whose admin process died is taken over after it.
    pub job_lease: Duration,
    /// Most devices a job sends to per batch (one bus call per shard).
    pub job_batch_size: usize,
    /// How often each admin process looks for jobs to send or settle.
    pub job_poll_interval: Duration,
    /// Failed logins allowed per username and per source address before logins are refused
    /// unexamined (429).
    pub login_throttle: fleetgate_authz::throttle::ThrottleConfig,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            node_id: "admin".to_owned(),
            api_key: String::new(),
            default_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(7 * 24 * 3600),
            max_wait: Duration::from_secs(60),
            token_ttl: Duration::from_secs(15 * 60),
            token_keys: Vec::new(),
            audit_signing_key_pem: None,
            audit_verify_keys_pem: Vec::new(),
            audit_checkpoint_interval: Duration::from_secs(60),
            max_body_bytes: 1 << 20,
            shadow_max_bytes: 32 * 1024,
            job_lease: Duration::from_secs(10),
            job_batch_size: 500,
            job_poll_interval: Duration::from_secs(1),
            login_throttle: fleetgate_authz::throttle::ThrottleConfig::default(),
        }
    }
}

/// Why the admin API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No API key (or a short one), and no admin user to log in as.
    #[error(
        "the admin API needs an API key of at least 16 characters (FLEETGATE_API_KEY) until an admin user exists"
    )]
    NoApiKey,
    /// A user token key is too short.
    #[error("user token key {0}: the secret must be at least 32 bytes")]
    TokenKey(String),
    /// The audit keys are unusable.
    #[error("audit key: {0}")]
    AuditKey(#[from] fleetgate_audit::KeyError),
    /// The bus refused the result subscription.
    #[error(transparent)]
    Bus(#[from] BusError),
}

pub(crate) struct AdminState {
    pub(crate) config: AdminConfig,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) waiters: fleetgate_bus::dispatch::Waiters,
    pub(crate) authn: Arc<auth::Authenticator>,
    pub(crate) audit: AuditLog,
    pub(crate) audit_keys: Vec<fleetgate_audit::VerifyingKey>,
    pub(crate) audit_failures: AtomicU64,
    /// Wakes the job runner (a job was created or cancelled here).
    pub(crate) jobs_wake: Arc<tokio::sync::Notify>,
    /// The OpenAPI document, with this process's limits.
    pub(crate) openapi: serde_json::Value,
    /// Failed logins by username and by source address.
    pub(crate) login_failures: fleetgate_authz::throttle::FailureThrottle,
}

/// A running admin API.
#[derive(Clone)]
pub struct Admin {
    state: Arc<AdminState>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("node_id", &self.state.config.node_id)
            .finish_non_exhaustive()
    }
}

pub(crate) type Res = Result<Response, AppError>;

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A JSON object body of type `T`. Refused: a body past the size limit (413), one without a
/// JSON content type (415), anything else that is not an object of that shape (400; serde
/// would otherwise read a struct from an array too).
pub(crate) struct Body<T>(pub(crate) T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = AppError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, AppError> {
        let Json(value) = Json::<serde_json::Value>::from_request(req, state)
            .await
            .map_err(|rejection| {
                let (status, code) = match rejection.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
                    }
                    _ => (StatusCode::BAD_REQUEST, "bad_request"),
                };
                AppError::new(status, code, rejection.body_text())
            })?;
        body_from_value(value).map(Body)
    }
}

/// What [`Body`] makes of a parsed JSON body: an object of `T`'s shape, else 400.
pub(crate) fn body_from_value<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, AppError> {
    if !value.is_object() {
        return Err(AppError::bad_request("the body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| AppError::bad_request(format!("invalid body: {e}")))
}

impl Admin {
    /// Starts the admin API's background work (the command result listener, the audit
    /// writer and its checkpoints).
    ///
    /// # Errors
    /// [`StartError`] without a usable API key or admin user, with unusable keys, or when
    /// the bus refuses the subscription.
    pub async fn start(config: AdminConfig, bus: Arc<dyn Bus>) -> Result<Self, StartError> {
        if config.api_key.len() < 16
            && !(config.api_key.is_empty() && principals::admin_user_exists(&*bus).await?)
        {
            return Err(StartError::NoApiKey);
        }
        if let Some(k) = config.token_keys.iter().find(|k| k.secret.len() < 32) {
            return Err(StartError::TokenKey(k.kid.clone()));
        }
        let signer = match &config.audit_signing_key_pem {
            Some(pem) => Signer::from_pem(pem)?,
            None => {
                tracing::warn!(
                    message = "no audit signing key configured: checkpoints are signed with a random key that is lost on restart (set FLEETGATE_AUDIT_SIGNING_KEY)"
                );
                Signer::generate()
            }
        };
        let audit_keys = config
            .audit_verify_keys_pem
            .iter()
            .map(|pem| fleetgate_audit::public_key_from_pem(pem))
            .collect::<Result<Vec<_>, _>>()?;
        let audit_config = AuditConfig {
            checkpoint_interval: config.audit_checkpoint_interval,
            ..AuditConfig::default()
        };
        let audit = AuditLog::start(bus.clone(), signer, &audit_config);
        let waiters = fleetgate_bus::dispatch::Waiters::start(bus.clone(), &config.node_id).await?;
        let authn = Arc::new(auth::Authenticator::new(
            config.api_key.clone(),
            &config.token_keys,
            i64::try_from(config.token_ttl.as_millis()).unwrap_or(i64::MAX),
        ));
        let poll = config.job_poll_interval;
        let generated = serde_json::to_value(api_router().split_for_parts().1).unwrap_or_default();
        let openapi = openapi::complete(generated, &config);
        let state = Arc::new(AdminState {
            bus,
            waiters,
            authn,
            audit,
            audit_keys,
            audit_failures: AtomicU64::new(0),
            jobs_wake: Arc::default(),
            login_failures: fleetgate_authz::throttle::FailureThrottle::new(config.login_throttle),
            config,
            openapi,
        });
        job_runner::start(Arc::downgrade(&state), poll);
        Ok(Self { state })
    }

    /// The authenticator of this admin API's principals, for a gateway in the same process
    /// (`/v1/app` accepts the same tokens and keys, even with an ephemeral token key).
    pub fn authenticator(&self) -> Arc<fleetgate_authz::Authenticator> {
        self.state.authn.clone()
    }

    /// The audit log handle, for a gateway in the same process (its `/v1/app` commands are
    /// audited on the same chain, by the same writer).
    pub fn audit_log(&self) -> AuditLog {
        self.state.audit.clone()
    }

    /// Response audit entries that could not be written (the request had already run).
    pub fn audit_failures(&self) -> u64 {
        self.state
            .audit_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The admin REST router (`/v1/...`), and its OpenAPI document.
    pub fn router(&self) -> Router {
        let (router, _) = api_router().split_for_parts();
        router
            .route_layer(middleware::from_fn_with_state(
                self.state.clone(),
                pipeline::pipeline,
            ))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::max(self.state.config.max_body_bytes))
            .with_state(self.state.clone())
    }

    /// The OpenAPI document (every route, generated from the handlers).
    pub fn openapi(&self) -> &serde_json::Value {
        &self.state.openapi
    }
}

/// This document: every route of the admin API with its statuses and bodies, and the limits
/// this process runs with.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta", security(()),
    responses((status = 200, body = Object)))]
async fn openapi_json(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    Json(state.openapi.clone())
}

#[derive(OpenApi)]
#[openapi(
    info(title = "fleetgate admin API", description = "Devices, commands, shadows, principals and the audit log of a fleetgate cluster. Authenticate with `Authorization: Bearer <API key or user token>`; errors are `{\"error\":{\"code\",\"message\"}}`."),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

fn api_router() -> OpenApiRouter<Arc<AdminState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(principals::login))
        .routes(routes!(principals::refresh))
        .routes(routes!(principals::me))
        .routes(routes!(principals::create_user, principals::list_users))
        .routes(routes!(principals::update_user, principals::delete_user))
        .routes(routes!(principals::create_key, principals::list_keys))
        .routes(routes!(principals::revoke_key))
        .routes(routes!(devices::create_device, devices::list_devices))
        .routes(routes!(
            devices::get_device,
            devices::update_device,
            devices::delete_device
        ))
        .routes(routes!(devices::rotate))
        .routes(routes!(devices::disconnect))
        .routes(routes!(devices::revoke))
        .routes(routes!(
            device_keys::issue_mac_key,
            device_keys::drop_mac_key
        ))
        .routes(routes!(device_keys::revoke_certificate))
        .routes(routes!(devices::get_shadow))
        .routes(routes!(devices::set_desired))
        .routes(routes!(commands::send_command))
        .routes(routes!(jobs::create_job, jobs::list_jobs))
        .routes(routes!(jobs::get_job))
        .routes(routes!(jobs::cancel_job))
        .routes(routes!(scenes::list_scenes))
        .routes(routes!(
            scenes::put_scene,
            scenes::get_scene,
            scenes::delete_scene
        ))
        .routes(routes!(scenes::activate))
        .routes(routes!(alerts::list_rules))
        .routes(routes!(
            alerts::put_rule,
            alerts::get_rule,
            alerts::delete_rule
        ))
        .routes(routes!(alerts::list_alerts))
        .routes(routes!(list_nodes))
        .routes(routes!(audit_api::list))
        .routes(routes!(audit_api::verify))
        .routes(routes!(audit_api::public_key))
        .routes(routes!(audit_api::export))
        .routes(routes!(openapi_json))
}

/// Live gateway nodes and their load.
#[utoipa::path(get, path = "/v1/nodes", tag = "cluster",
    responses((status = 200, body = Object), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list_nodes(
    State(state): State<Arc<AdminState>>,
    _auth: auth::Auth<auth::need::NodeRead>,
) -> Res {
    let nodes: Vec<serde_json::Value> = state
        .bus
        .nodes()
        .await?
        .into_iter()
        .map(|n| serde_json::json!({ "id": n.id, "connections": n.connections, "draining": n.draining, "startedMs": n.started_ms, "updatedMs": n.updated_ms }))
        .collect();
    Ok(Json(serde_json::json!({ "nodes": nodes })).into_response())
}

async fn not_found() -> AppError {
    AppError::not_found("no such endpoint")
}

async fn method_not_allowed() -> AppError {
    AppError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// Creates (`existing` = `None`) or replaces, at exactly version `existing`, a document:
/// 201 or 200, or 409 when another writer came first.
pub(crate) async fn put_versioned(
    state: &AdminState,
    kind: DocKind,
    id: &str,
    text: &str,
    existing: Option<u64>,
    what: &str,
) -> Result<StatusCode, AppError> {
    let expect = existing.map_or(DocExpect::Absent, DocExpect::Version);
    match state.bus.doc_put(kind, id, text, expect).await? {
        DocWrite::Written(_) if existing.is_some() => Ok(StatusCode::OK),
        DocWrite::Written(_) => Ok(StatusCode::CREATED),
        DocWrite::Conflict(_) => Err(AppError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("the {what} changed meanwhile; try again"),
        )),
    }
}
