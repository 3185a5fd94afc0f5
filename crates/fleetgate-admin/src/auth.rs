//! Authentication (bootstrap key, service API keys, user JWTs) and the extractors through
//! which every handler declares the permission it needs.
//!
//! The request pipeline ([`crate::pipeline`]) authenticates each request once and leaves the
//! [`Principal`] in the request's extensions; [`Auth`] and [`ScopedDevice`] then ask the
//! policy ([`crate::rbac`]) and answer 403 / 404 before the handler runs.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use axum::extract::{FromRequestParts, Path};
use axum::http::StatusCode;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fleetgate_bus::{Bus, BusError, DeviceRecord, DocExpect, DocKind};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::warn;

use crate::principals::{ApiKeyDoc, UserDoc};
use crate::rbac::{Permission, Principal, Role, Scope};
use crate::{AdminState, AppError, now_ms};

/// The audience of user tokens: a device JWT (no such audience) is never a user token.
pub(crate) const AUDIENCE: &str = "fleetgate-admin";
/// API keys start with this, so they are told apart from JWTs and the bootstrap key.
pub(crate) const KEY_PREFIX: &str = "fgk_";
/// A key's last-used time is written at most this often.
const TOUCH_EVERY_MS: i64 = 60_000;
/// Keys whose last write is remembered (the map is cleared when it grows past this).
const TOUCH_MEMORY: usize = 10_000;

/// One HS256 key for user tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenKey {
    /// Named in each token's header.
    pub kid: String,
    /// At least 32 bytes.
    pub secret: String,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    aud: String,
    iat: i64,
    exp: i64,
}

/// Why a request is not authenticated: a stable reason (audit and error code).
#[derive(Debug)]
pub(crate) enum AuthnError {
    Refused(&'static str),
    Bus(BusError),
}

impl From<BusError> for AuthnError {
    fn from(e: BusError) -> Self {
        Self::Bus(e)
    }
}

impl From<AuthnError> for AppError {
    fn from(e: AuthnError) -> Self {
        match e {
            AuthnError::Refused(reason) => AppError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: Bearer <API key or user token>",
            )
            .with_reason(reason),
            AuthnError::Bus(e) => e.into(),
        }
    }
}

/// Verifies credentials and issues user tokens.
pub(crate) struct Authenticator {
    bootstrap: String,
    signing: (String, EncodingKey),
    verifying: HashMap<String, DecodingKey>,
    token_ttl_ms: i64,
    /// Key ID -> when this process last wrote its last-used time.
    touched: Mutex<HashMap<String, i64>>,
}

impl Authenticator {
    /// `keys`: the first signs, all verify (rotation). None: a random key of this process.
    pub(crate) fn new(bootstrap: String, keys: &[TokenKey], token_ttl_ms: i64) -> Self {
        let ephemeral;
        let keys = if keys.is_empty() {
            warn!(
                message = "no user token keys configured: tokens are signed with a random key and stop working when this process restarts, and other admin processes refuse them (set FLEETGATE_ADMIN_TOKEN_KEYS)"
            );
            ephemeral = [TokenKey {
                kid: "ephemeral".to_owned(),
                secret: URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>()),
            }];
            &ephemeral[..]
        } else {
            keys
        };
        let first = &keys[0];
        Self {
            bootstrap,
            signing: (
                first.kid.clone(),
                EncodingKey::from_secret(first.secret.as_bytes()),
            ),
            verifying: keys
                .iter()
                .map(|k| (k.kid.clone(), DecodingKey::from_secret(k.secret.as_bytes())))
                .collect(),
            token_ttl_ms,
            touched: Mutex::default(),
        }
    }

    /// A token for `username`, and when it expires (ms).
    pub(crate) fn issue(&self, username: &str) -> (String, i64) {
        let now = now_ms();
        let exp_ms = now + self.token_ttl_ms;
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.signing.0.clone());
        let claims = Claims {
            sub: username.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now / 1000,
            exp: exp_ms / 1000,
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.signing.1).unwrap_or_default();
        (token, (exp_ms / 1000) * 1000)
    }

    /// Who sent `authorization` (the header's value).
    pub(crate) async fn authenticate(
        &self,
        bus: &dyn Bus,
        authorization: Option<&str>,
    ) -> Result<Principal, AuthnError> {
        let Some(token) = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return Err(AuthnError::Refused("missing_credentials"));
        };
        if let Some(rest) = token.strip_prefix(KEY_PREFIX) {
            return self.api_key(bus, rest).await;
        }
        if token.matches('.').count() == 2 {
            return self.user_token(bus, token).await;
        }
        if !self.bootstrap.is_empty()
            && bool::from(token.as_bytes().ct_eq(self.bootstrap.as_bytes()))
        {
            return Ok(Principal {
                actor: "bootstrap".to_owned(),
                role: Role::Admin,
                scope: Scope::All,
                username: None,
            });
        }
        Err(AuthnError::Refused("bad_credentials"))
    }

    async fn api_key(&self, bus: &dyn Bus, rest: &str) -> Result<Principal, AuthnError> {
        let Some((id, _)) = rest.split_once('_') else {
            return Err(AuthnError::Refused("bad_credentials"));
        };
        let Some(doc) = bus.doc_get(DocKind::ApiKey, id).await? else {
            return Err(AuthnError::Refused("unknown_key"));
        };
        let key: ApiKeyDoc =
            serde_json::from_str(&doc.body).map_err(|e| BusError::Corrupt(e.to_string()))?;
        let presented = key_digest(&format!("{KEY_PREFIX}{rest}"));
        if !bool::from(presented.as_bytes().ct_eq(key.sha256.as_bytes())) {
            return Err(AuthnError::Refused("bad_credentials"));
        }
        let now = now_ms();
        if key.revoked_ms.is_some() {
            return Err(AuthnError::Refused("revoked_key"));
        }
        if key.expires_at.is_some_and(|e| e <= now) {
            return Err(AuthnError::Refused("expired_key"));
        }
        self.touch(bus, id, doc.version, &key, now).await;
        Ok(Principal {
            actor: format!("key:{id}"),
            role: key.role,
            scope: Scope::from_groups(&key.groups),
            username: None,
        })
    }

    /// Records the key's last use, at most once a minute per key and process. A write that
    /// loses to a concurrent change (a revoke) is dropped: it must never undo one.
    async fn touch(&self, bus: &dyn Bus, id: &str, version: u64, key: &ApiKeyDoc, now: i64) {
        if key.last_used_ms.is_some_and(|t| now - t < TOUCH_EVERY_MS) {
            return;
        }
        {
            let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
            if touched.get(id).is_some_and(|t| now - t < TOUCH_EVERY_MS) {
                return;
            }
            if touched.len() >= TOUCH_MEMORY {
                touched.clear();
            }
            touched.insert(id.to_owned(), now);
        }
        let mut updated = key.clone();
        updated.last_used_ms = Some(now);
        if let Ok(body) = serde_json::to_string(&updated)
            && let Err(error) = bus
                .doc_put(DocKind::ApiKey, id, &body, DocExpect::Version(version))
                .await
        {
            warn!(message = "could not record an API key's last use", %error);
        }
    }

    async fn user_token(&self, bus: &dyn Bus, token: &str) -> Result<Principal, AuthnError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthnError::Refused("bad_token"))?;
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.verifying.get(kid))
            .ok_or(AuthnError::Refused("bad_token"))?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    AuthnError::Refused("expired_token")
                }
                _ => AuthnError::Refused("bad_token"),
            })?
            .claims;
        let Some(doc) = bus.doc_get(DocKind::User, &claims.sub).await? else {
            return Err(AuthnError::Refused("unknown_user"));
        };
        let user: UserDoc =
            serde_json::from_str(&doc.body).map_err(|e| BusError::Corrupt(e.to_string()))?;
        // Tokens issued before a password change or a role change stop working.
        if claims.iat * 1000 < user.tokens_after_ms / 1000 * 1000 {
            return Err(AuthnError::Refused("token_revoked"));
        }
        Ok(Principal {
            actor: format!("user:{}", user.username),
            role: user.role,
            scope: Scope::from_groups(&user.groups),
            username: Some(user.username),
        })
    }
}

/// SHA-256 of an API key, hex: what is stored instead of the key.
pub(crate) fn key_digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A permission a handler needs, as a type (see [`Auth`]).
pub(crate) trait Needs: Send + Sync + 'static {
    const PERMISSION: Permission;
}

pub(crate) use crate::rbac::need;

/// The caller, allowed to do `N`: the extractor every handler declares its permission with.
pub(crate) struct Auth<N: Needs> {
    pub(crate) principal: Principal,
    _needs: PhantomData<N>,
}

impl<N: Needs> FromRequestParts<Arc<AdminState>> for Auth<N> {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &Arc<AdminState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(principal) = parts.extensions.get::<Principal>().cloned() else {
            return Err(AuthnError::Refused("missing_credentials").into());
        };
        if !principal.role.allows(N::PERMISSION) {
            return Err(AppError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("role {} may not do this", principal.role.as_str()),
            ));
        }
        Ok(Self {
            principal,
            _needs: PhantomData,
        })
    }
}

/// The device named by the path's `{id}`, visible to a caller allowed to do `N`. A device
/// outside the caller's scope answers 404 exactly like a missing one.
pub(crate) struct ScopedDevice<N: Needs> {
    pub(crate) principal: Principal,
    pub(crate) id: String,
    /// The registry entry. `None` only for callers of scope `*` reaching an unprovisioned
    /// device (one that authenticated with a JWT): handlers decide whether that exists.
    pub(crate) record: Option<DeviceRecord>,
    _needs: PhantomData<N>,
}

impl<N: Needs> FromRequestParts<Arc<AdminState>> for ScopedDevice<N> {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AdminState>,
    ) -> Result<Self, Self::Rejection> {
        let Auth { principal, .. } = Auth::<N>::from_request_parts(parts, state).await?;
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|r| AppError::bad_request(r.body_text()))?;
        crate::devices::check_device_id(&id)?;
        let record = state.bus.device_get(&id).await?;
        let visible = match (&record, &principal.scope) {
            (_, Scope::All) => true,
            (Some(r), scope) => scope.covers(r),
            (None, _) => false,
        };
        if !visible {
            let missing = AppError::not_found(format!("no device {id}"));
            // Audited as what it is: a refusal, though the caller cannot tell.
            return Err(if record.is_some() {
                missing.with_reason("out_of_scope")
            } else {
                missing
            });
        }
        Ok(Self {
            principal,
            id,
            record,
            _needs: PhantomData,
        })
    }
}
