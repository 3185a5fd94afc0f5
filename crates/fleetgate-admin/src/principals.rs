//! Users (argon2id passwords, login with short-lived JWTs) and service API keys (shown once,
//! stored as a digest). Both are documents in the bus, so every admin process sees them and
//! they survive restarts on Redis.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fleetgate_bus::{Bus, BusError, DocExpect, DocKind, DocWrite};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Auth, KEY_PREFIX, key_digest, need};
use crate::pipeline::{Note, noted};
use crate::rbac::{Principal, Role, Scope};
use crate::{AdminState, AppError, Body, ErrorBody, Res, now_ms};
pub(crate) use fleetgate_authz::{ApiKeyDoc, UserDoc};

/// Shortest password accepted.
const MIN_PASSWORD: usize = 12;
/// Longest password accepted (argon2 takes any length; this bounds the work per login).
const MAX_PASSWORD: usize = 1024;
/// Most groups in one grant.
const MAX_GRANT_GROUPS: usize = 64;

fn corrupt(e: serde_json::Error) -> AppError {
    BusError::Corrupt(e.to_string()).into()
}

fn check_username(name: &str) -> Result<(), AppError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(AppError::bad_request(
            "username must be 1-64 characters of [a-z0-9._-]",
        ))
    }
}

fn check_password(password: &str) -> Result<(), AppError> {
    if (MIN_PASSWORD..=MAX_PASSWORD).contains(&password.chars().count()) {
        Ok(())
    } else {
        Err(AppError::bad_request(format!(
            "password must be {MIN_PASSWORD}-{MAX_PASSWORD} characters"
        )))
    }
}

/// Checks a grant's groups and that the granting principal holds all of it.
fn check_grant(granter: &Principal, groups: &[String]) -> Result<Scope, AppError> {
    if groups.is_empty() || groups.len() > MAX_GRANT_GROUPS {
        return Err(AppError::bad_request(format!(
            "groups must list 1-{MAX_GRANT_GROUPS} device groups, or [\"*\"]"
        )));
    }
    for g in groups.iter().filter(|g| *g != "*") {
        crate::devices::check_group(g)?;
    }
    let scope = Scope::from_groups(groups);
    if !granter.scope.contains(&scope) {
        return Err(AppError::forbidden(
            "a principal can only grant groups within its own scope",
        ));
    }
    Ok(scope)
}

/// Whether `admin` may see and change a principal granted `groups`: only within its own
/// scope, so an admin of `farm-a` cannot take over (or even see) an admin of `*`.
fn manages(admin: &Principal, groups: &[String]) -> bool {
    admin.scope.contains(&Scope::from_groups(groups))
}

/// A principal outside the caller's scope answers like a missing one.
fn out_of_scope(kind: &str, id: &str) -> AppError {
    AppError::not_found(format!("no {kind} {id}")).with_reason("out_of_scope")
}

/// Argon2id with the crate's defaults (OWASP's recommended minimum: 19 MiB, 2 passes). Run
/// on the blocking pool: it is deliberately slow.
async fn hash_password(password: String) -> Result<String, AppError> {
    tokio::task::spawn_blocking(move || {
        let salt =
            SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r)
    .map_err(|e| BusError::Corrupt(format!("password hashing failed: {e}")).into())
}

/// A hash of a password nobody has, checked when the user does not exist so that a login's
/// time does not tell whether the user exists.
static DUMMY_HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn verify_password(password: String, hash: Option<String>) -> bool {
    tokio::task::spawn_blocking(move || {
        let hash = hash.unwrap_or_else(|| {
            DUMMY_HASH
                .get_or_init(|| {
                    let salt = SaltString::encode_b64(&[7; 16]).expect("16 bytes encode");
                    argon2::Argon2::default()
                        .hash_password(b"no such user's password", &salt)
                        .map(|h| h.to_string())
                        .unwrap_or_default()
                })
                .clone()
        });
        PasswordHash::new(&hash).is_ok_and(|parsed| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
    })
    .await
    .unwrap_or(false)
}

async fn load_user(bus: &dyn Bus, name: &str) -> Result<Option<(UserDoc, u64)>, AppError> {
    match bus.doc_get(DocKind::User, name).await? {
        Some(doc) => Ok(Some((
            serde_json::from_str(&doc.body).map_err(corrupt)?,
            doc.version,
        ))),
        None => Ok(None),
    }
}

/// A user as the API shows it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UserView {
    username: String,
    role: Role,
    groups: Vec<String>,
    created_ms: i64,
    created_by: String,
}

impl From<&UserDoc> for UserView {
    fn from(u: &UserDoc) -> Self {
        Self {
            username: u.username.clone(),
            role: u.role,
            groups: u.groups.clone(),
            created_ms: u.created_ms,
            created_by: u.created_by.clone(),
        }
    }
}

/// `POST /v1/users` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateUser {
    username: String,
    #[schema(min_length = 12, max_length = 1024)]
    password: String,
    role: Role,
    /// Device groups, or `["*"]`.
    #[schema(min_items = 1, max_items = 64)]
    groups: Vec<String>,
}

impl CreateUser {
    /// Checks name, password and a grant `granter` may give.
    pub(crate) fn check(&self, granter: &Principal) -> Result<(), AppError> {
        check_username(&self.username)?;
        check_password(&self.password)?;
        check_grant(granter, &self.groups).map(drop)
    }
}

/// Creates a user with one grant (role + groups).
#[utoipa::path(post, path = "/v1/users", tag = "principals", request_body = CreateUser,
    responses((status = 201, body = UserView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn create_user(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::PrincipalAdmin>,
    Body(req): Body<CreateUser>,
) -> Res {
    req.check(&auth.principal)?;
    let now = now_ms();
    let user = UserDoc {
        username: req.username.clone(),
        password_hash: hash_password(req.password).await?,
        role: req.role,
        groups: req.groups,
        created_ms: now,
        created_by: auth.principal.actor.clone(),
        tokens_after_ms: 0,
    };
    let text = serde_json::to_string(&user).map_err(corrupt)?;
    let note = Note::target(format!("user:{}", user.username));
    match state
        .bus
        .doc_put(DocKind::User, &user.username, &text, DocExpect::Absent)
        .await?
    {
        DocWrite::Written(_) => Ok(noted(
            (StatusCode::CREATED, Json(UserView::from(&user))).into_response(),
            note,
        )),
        DocWrite::Conflict(_) => Err(AppError::exists(format!("user {} exists", user.username))),
    }
}

/// Lists users (at most 1000).
#[utoipa::path(get, path = "/v1/users", tag = "principals",
    responses((status = 200, body = UserList), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn list_users(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::PrincipalAdmin>,
) -> Res {
    let docs = state.bus.doc_list(DocKind::User, None, 1000).await?;
    let mut users = Vec::new();
    for d in &docs {
        let u: UserDoc = serde_json::from_str(&d.body).map_err(corrupt)?;
        if manages(&auth.principal, &u.groups) {
            users.push(UserView::from(&u));
        }
    }
    Ok(Json(UserList { users }).into_response())
}

/// Users.
#[derive(Serialize, ToSchema)]
pub(crate) struct UserList {
    users: Vec<UserView>,
}

/// `PATCH /v1/users/{name}` body: any of password, role, groups.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateUser {
    #[schema(min_length = 12, max_length = 1024)]
    password: Option<String>,
    role: Option<Role>,
    #[schema(min_items = 1, max_items = 64)]
    groups: Option<Vec<String>>,
}

impl UpdateUser {
    /// Checks the new grant, which `granter` must hold, and the new password.
    pub(crate) fn check(&self, granter: &Principal) -> Result<(), AppError> {
        if let Some(groups) = &self.groups {
            check_grant(granter, groups)?;
        }
        self.password.as_deref().map_or(Ok(()), check_password)
    }
}

/// Changes a user's password or grant. Tokens issued before stop working.
#[utoipa::path(patch, path = "/v1/users/{name}", tag = "principals", request_body = UpdateUser,
    params(("name" = String, Path, description = "username")),
    responses((status = 200, body = UserView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn update_user(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::PrincipalAdmin>,
    Path(name): Path<String>,
    Body(req): Body<UpdateUser>,
) -> Res {
    let Some((mut user, version)) = load_user(&*state.bus, &name).await? else {
        return Err(AppError::not_found(format!("no user {name}")));
    };
    if !manages(&auth.principal, &user.groups) {
        return Err(out_of_scope("user", &name));
    }
    req.check(&auth.principal)?;
    if let Some(groups) = &req.groups {
        user.groups.clone_from(groups);
    }
    if let Some(role) = req.role {
        user.role = role;
    }
    if let Some(password) = req.password {
        user.password_hash = hash_password(password).await?;
    }
    user.tokens_after_ms = now_ms();
    let text = serde_json::to_string(&user).map_err(corrupt)?;
    match state
        .bus
        .doc_put(DocKind::User, &name, &text, DocExpect::Version(version))
        .await?
    {
        DocWrite::Written(_) => Ok(Json(UserView::from(&user)).into_response()),
        DocWrite::Conflict(_) => Err(AppError::new(
            StatusCode::CONFLICT,
            "conflict",
            "the user changed meanwhile; read it and try again",
        )),
    }
}

/// Deletes a user; its tokens stop working at once.
#[utoipa::path(delete, path = "/v1/users/{name}", tag = "principals",
    params(("name" = String, Path, description = "username")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn delete_user(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::PrincipalAdmin>,
    Path(name): Path<String>,
) -> Res {
    match load_user(&*state.bus, &name).await? {
        Some((user, _)) if !manages(&auth.principal, &user.groups) => {
            return Err(out_of_scope("user", &name));
        }
        _ => {}
    }
    if state.bus.doc_delete(DocKind::User, &name).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(AppError::not_found(format!("no user {name}")))
    }
}

/// `POST /v1/auth/login` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Login {
    username: String,
    password: String,
}

/// A user token.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TokenView {
    token: String,
    /// ms since the epoch.
    expires_at: i64,
    role: Role,
    groups: Vec<String>,
}

fn token_for(state: &AdminState, user: &UserDoc) -> Response {
    let (token, expires_at) = state.authn.issue(&user.username);
    Json(TokenView {
        token,
        expires_at,
        role: user.role,
        groups: user.groups.clone(),
    })
    .into_response()
}

/// Exchanges a username and password for a short-lived token.
#[utoipa::path(post, path = "/v1/auth/login", tag = "principals", request_body = Login,
    security(()),
    responses((status = 200, body = TokenView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn login(
    State(state): State<Arc<AdminState>>,
    source: SourceAddr,
    Body(req): Body<Login>,
) -> Res {
    let note = Note {
        actor: Some(format!("user:{}", req.username)),
        target: Some(format!("user:{}", req.username)),
        ..Note::default()
    };
    // Refused before the password hash is computed: a guessing client costs a lookup, not
    // an argon2 run per attempt.
    let keys = [
        Some(format!("user:{}", req.username)),
        source
            .0
            .map(|addr| fleetgate_authz::throttle::source_key(addr.ip())),
    ];
    let keys = keys.iter().flatten();
    if let Some(wait) = keys
        .clone()
        .find_map(|k| state.login_failures.check(k).err())
    {
        let refused = AppError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_failures",
            "too many failed logins; retry later",
        )
        .with_retry_after(wait);
        return Ok(noted(refused.into_response(), note));
    }
    let user = if req.username.len() <= 64 && req.password.len() <= MAX_PASSWORD {
        load_user(&*state.bus, &req.username).await?
    } else {
        None
    };
    let hash = user.as_ref().map(|(u, _)| u.password_hash.clone());
    let ok = verify_password(req.password, hash).await;
    match user {
        Some((user, _)) if ok => {
            state
                .login_failures
                .succeeded(&format!("user:{}", user.username));
            Ok(noted(token_for(&state, &user), note))
        }
        _ => {
            for k in keys {
                state.login_failures.failed(k);
            }
            let refused = AppError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "wrong username or password",
            )
            .with_reason("bad_credentials");
            Ok(noted(refused.into_response(), note))
        }
    }
}

/// The client's address, when the listener records it (the admin router is served with
/// `ConnectInfo<Peer>`); absent in-process, which no extractor should fail for.
pub(crate) struct SourceAddr(Option<std::net::SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for SourceAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<fleetgate_tls::Peer>>()
                .map(|c| c.0.addr),
        ))
    }
}

/// A new token for the caller's user (its current token must still be valid).
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "principals",
    responses((status = 200, body = TokenView), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn refresh(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::Authenticated>,
) -> Res {
    let Some(name) = &auth.principal.username else {
        return Err(AppError::forbidden("only user tokens can be refreshed"));
    };
    let Some((user, _)) = load_user(&*state.bus, name).await? else {
        return Err(AppError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the user is gone",
        ));
    };
    Ok(token_for(&state, &user))
}

/// Who the caller is.
#[derive(Serialize, ToSchema)]
pub(crate) struct WhoAmI {
    actor: String,
    role: Role,
    groups: Vec<String>,
}

/// The caller's identity and grant.
#[utoipa::path(get, path = "/v1/auth/me", tag = "principals",
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)))]
pub(crate) async fn me(auth: Auth<need::Authenticated>) -> Res {
    let p = auth.principal;
    Ok(Json(WhoAmI {
        actor: p.actor,
        role: p.role,
        groups: p.scope.to_groups(),
    })
    .into_response())
}

/// `POST /v1/api-keys` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CreateKey {
    #[schema(min_length = 1, max_length = 128)]
    name: String,
    role: Role,
    #[schema(min_items = 1, max_items = 64)]
    groups: Vec<String>,
    /// ms since the epoch; in the future.
    #[serde(default, deserialize_with = "crate::num::opt_signed")]
    expires_at: Option<i64>,
}

impl CreateKey {
    /// Checks name, a grant `granter` may give, and an expiry after `now_ms`.
    pub(crate) fn check(&self, granter: &Principal, now_ms: i64) -> Result<(), AppError> {
        if self.name.is_empty() || self.name.len() > 128 {
            return Err(AppError::bad_request("name must be 1-128 characters"));
        }
        check_grant(granter, &self.groups)?;
        if self.expires_at.is_some_and(|e| e <= now_ms) {
            return Err(AppError::bad_request("expiresAt must be in the future"));
        }
        Ok(())
    }
}

/// An API key as listed (never the key).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct KeyView {
    id: String,
    name: String,
    role: Role,
    groups: Vec<String>,
    created_ms: i64,
    created_by: String,
    expires_at: Option<i64>,
    last_used_ms: Option<i64>,
    revoked_ms: Option<i64>,
    /// Only in the answer to its creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

impl From<&ApiKeyDoc> for KeyView {
    fn from(k: &ApiKeyDoc) -> Self {
        Self {
            id: k.id.clone(),
            name: k.name.clone(),
            role: k.role,
            groups: k.groups.clone(),
            created_ms: k.created_ms,
            created_by: k.created_by.clone(),
            expires_at: k.expires_at,
            last_used_ms: k.last_used_ms,
            revoked_ms: k.revoked_ms,
            key: None,
        }
    }
}

/// Creates a service API key; the key is in this answer only.
#[utoipa::path(post, path = "/v1/api-keys", tag = "principals", request_body = CreateKey,
    responses((status = 201, body = KeyView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn create_key(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::PrincipalAdmin>,
    Body(req): Body<CreateKey>,
) -> Res {
    let now = now_ms();
    req.check(&auth.principal, now)?;
    let id = hex::encode(rand::random::<[u8; 8]>());
    let key = format!(
        "{KEY_PREFIX}{id}_{}",
        URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    );
    let doc = ApiKeyDoc {
        id: id.clone(),
        name: req.name,
        role: req.role,
        groups: req.groups,
        sha256: key_digest(&key),
        created_ms: now,
        created_by: auth.principal.actor.clone(),
        expires_at: req.expires_at,
        last_used_ms: None,
        revoked_ms: None,
    };
    let text = serde_json::to_string(&doc).map_err(corrupt)?;
    match state
        .bus
        .doc_put(DocKind::ApiKey, &id, &text, DocExpect::Absent)
        .await?
    {
        DocWrite::Written(_) => {
            let mut view = KeyView::from(&doc);
            view.key = Some(key);
            Ok(noted(
                (StatusCode::CREATED, Json(view)).into_response(),
                Note::target(format!("key:{id}")),
            ))
        }
        DocWrite::Conflict(_) => Err(BusError::Unavailable("API key ID collision".into()).into()),
    }
}

/// Lists API keys (at most 1000), revoked ones included.
#[utoipa::path(get, path = "/v1/api-keys", tag = "principals",
    responses((status = 200, body = KeyList), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn list_keys(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::PrincipalAdmin>,
) -> Res {
    let docs = state.bus.doc_list(DocKind::ApiKey, None, 1000).await?;
    let mut keys = Vec::new();
    for d in &docs {
        let k: ApiKeyDoc = serde_json::from_str(&d.body).map_err(corrupt)?;
        if manages(&auth.principal, &k.groups) {
            keys.push(KeyView::from(&k));
        }
    }
    Ok(Json(KeyList { keys }).into_response())
}

/// API keys.
#[derive(Serialize, ToSchema)]
pub(crate) struct KeyList {
    keys: Vec<KeyView>,
}

/// Revokes an API key: it stops working at once (it stays listed, marked revoked).
#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "principals",
    params(("id" = String, Path, description = "key ID")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn revoke_key(
    State(state): State<Arc<AdminState>>,
    auth: Auth<need::PrincipalAdmin>,
    Path(id): Path<String>,
) -> Res {
    // Compare-and-set: a concurrent last-used write must not undo the revoke.
    for _ in 0..16 {
        let Some(doc) = state.bus.doc_get(DocKind::ApiKey, &id).await? else {
            return Err(AppError::not_found(format!("no API key {id}")));
        };
        let mut key: ApiKeyDoc = serde_json::from_str(&doc.body).map_err(corrupt)?;
        if !manages(&auth.principal, &key.groups) {
            return Err(out_of_scope("API key", &id));
        }
        if key.revoked_ms.is_some() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        key.revoked_ms = Some(now_ms());
        let text = serde_json::to_string(&key).map_err(corrupt)?;
        if let DocWrite::Written(_) = state
            .bus
            .doc_put(DocKind::ApiKey, &id, &text, DocExpect::Version(doc.version))
            .await?
        {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
    Err(BusError::Unavailable("API key kept changing".into()).into())
}

/// Whether any admin user exists (then the bootstrap key may be retired).
pub(crate) async fn admin_user_exists(bus: &dyn Bus) -> Result<bool, BusError> {
    let mut after: Option<String> = None;
    loop {
        let page = bus.doc_list(DocKind::User, after.as_deref(), 500).await?;
        for d in &page {
            if serde_json::from_str::<UserDoc>(&d.body).is_ok_and(|u| u.role == Role::Admin) {
                return Ok(true);
            }
        }
        if page.len() < 500 {
            return Ok(false);
        }
        after = page.last().map(|d| d.id.clone());
    }
}
