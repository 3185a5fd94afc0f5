//! Authentication: the bootstrap key, service API keys (stored as digests) and user JWTs
//! (HS256, audience `fleetgate-admin`), verified against the principals kept in the bus. The
//! admin API issues and checks tokens with it; the gateway checks app clients with it.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fleetgate_bus::{Bus, BusError, DocExpect, DocKind};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::warn;

use crate::policy::{Principal, Role, Scope};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The audience of user tokens: a device JWT (no such audience) is never a user token.
pub const AUDIENCE: &str = "fleetgate-admin";
/// API keys start with this, so they are told apart from JWTs and the bootstrap key.
pub const KEY_PREFIX: &str = "fgk_";
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
pub enum AuthnError {
    /// Refused, with a stable reason (`bad_credentials`, `expired_token`, ...).
    Refused(&'static str),
    /// The bus could not be asked.
    Bus(BusError),
}

impl From<BusError> for AuthnError {
    fn from(e: BusError) -> Self {
        Self::Bus(e)
    }
}

/// Verifies credentials and issues user tokens.
pub struct Authenticator {
    bootstrap: String,
    signing: (String, EncodingKey),
    verifying: HashMap<String, DecodingKey>,
    token_ttl_ms: i64,
    /// Key ID -> when this process last wrote its last-used time.
    touched: Mutex<HashMap<String, i64>>,
}

impl Authenticator {
    /// `keys`: the first signs, all verify (rotation). None: a random key of this process.
    pub fn new(bootstrap: String, keys: &[TokenKey], token_ttl_ms: i64) -> Self {
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
    pub fn issue(&self, username: &str) -> (String, i64) {
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
    pub async fn authenticate(
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
                expires_at_ms: None,
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
            expires_at_ms: key.expires_at,
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
            expires_at_ms: Some(claims.exp.saturating_mul(1000)),
        })
    }
}

/// SHA-256 of an API key, hex: what is stored instead of the key.
pub fn key_digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A user as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserDoc {
    /// Login name.
    pub username: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Its role.
    pub role: Role,
    /// Its device groups (`*` = all).
    pub groups: Vec<String>,
    /// When it was created (ms).
    pub created_ms: i64,
    /// Who created it (an audit actor).
    pub created_by: String,
    /// Tokens issued before this are refused (set on password and grant changes).
    pub tokens_after_ms: i64,
}

/// An API key as stored: never the key itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyDoc {
    /// Key ID (the part of the key before its secret).
    pub id: String,
    /// A label for people.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its device groups (`*` = all).
    pub groups: Vec<String>,
    /// SHA-256 of the whole key, hex.
    pub sha256: String,
    /// When it was created (ms).
    pub created_ms: i64,
    /// Who created it (an audit actor).
    pub created_by: String,
    /// Refused from this time on (ms).
    pub expires_at: Option<i64>,
    /// Last use, written at most once a minute.
    pub last_used_ms: Option<i64>,
    /// Refused since (ms).
    pub revoked_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use fleetgate_bus::memory::MemoryBus;

    use super::*;

    const BOOTSTRAP: &str = "bootstrap-key-0123456789";

    fn authenticator() -> Authenticator {
        let key = TokenKey {
            kid: "k1".into(),
            secret: "a-secret-of-at-least-thirty-two-bytes".into(),
        };
        Authenticator::new(BOOTSTRAP.into(), &[key], 60_000)
    }

    async fn put(bus: &MemoryBus, kind: DocKind, id: &str, body: &impl Serialize) {
        let body = serde_json::to_string(body).unwrap();
        bus.doc_put(kind, id, &body, DocExpect::Absent)
            .await
            .unwrap();
    }

    async fn replace(bus: &MemoryBus, kind: DocKind, id: &str, body: &impl Serialize) {
        let stored = bus.doc_get(kind, id).await.unwrap().unwrap();
        let body = serde_json::to_string(body).unwrap();
        let expect = DocExpect::Version(stored.version);
        bus.doc_put(kind, id, &body, expect).await.unwrap();
    }

    fn refused(r: Result<Principal, AuthnError>) -> &'static str {
        match r {
            Err(AuthnError::Refused(reason)) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_bootstrap_key_is_an_admin_of_every_group_and_nothing_else_passes() {
        let bus = MemoryBus::default();
        let a = authenticator();
        let p = a
            .authenticate(&bus, Some(&format!("Bearer {BOOTSTRAP}")))
            .await
            .unwrap();
        assert_eq!(
            (p.role, p.scope, p.actor.as_str()),
            (Role::Admin, Scope::All, "bootstrap")
        );
        assert_eq!(
            refused(a.authenticate(&bus, None).await),
            "missing_credentials"
        );
        assert_eq!(
            refused(a.authenticate(&bus, Some("Bearer nope")).await),
            "bad_credentials"
        );
    }

    #[tokio::test]
    async fn a_user_token_names_the_user_until_their_tokens_are_revoked() {
        let bus = MemoryBus::default();
        let a = authenticator();
        let mut user = UserDoc {
            username: "olga".into(),
            password_hash: String::new(),
            role: Role::Viewer,
            groups: vec!["farm-a".into()],
            created_ms: 0,
            created_by: "bootstrap".into(),
            tokens_after_ms: 0,
        };
        let (token, _) = a.issue("olga");
        let header = format!("Bearer {token}");
        assert_eq!(
            refused(a.authenticate(&bus, Some(&header)).await),
            "unknown_user"
        );
        put(&bus, DocKind::User, "olga", &user).await;
        let p = a.authenticate(&bus, Some(&header)).await.unwrap();
        assert_eq!(p.actor, "user:olga");
        assert_eq!(p.role, Role::Viewer);
        assert_eq!(p.scope, Scope::from_groups(&["farm-a".into()]));
        // Another process with other keys refuses it.
        let other = Authenticator::new(String::new(), &[], 60_000);
        assert_eq!(
            refused(other.authenticate(&bus, Some(&header)).await),
            "bad_token"
        );
        user.tokens_after_ms = now_ms() + 2_000;
        replace(&bus, DocKind::User, "olga", &user).await;
        assert_eq!(
            refused(a.authenticate(&bus, Some(&header)).await),
            "token_revoked"
        );
    }

    #[tokio::test]
    async fn an_api_key_is_checked_by_digest_and_refused_once_revoked() {
        let bus = MemoryBus::default();
        let a = authenticator();
        let key = format!("{KEY_PREFIX}abc123_s3cr3t");
        let mut doc = ApiKeyDoc {
            id: "abc123".into(),
            name: "dashboard".into(),
            role: Role::Operator,
            groups: vec!["*".into()],
            sha256: key_digest(&key),
            created_ms: 0,
            created_by: "bootstrap".into(),
            expires_at: None,
            last_used_ms: None,
            revoked_ms: None,
        };
        put(&bus, DocKind::ApiKey, "abc123", &doc).await;
        let p = a
            .authenticate(&bus, Some(&format!("Bearer {key}")))
            .await
            .unwrap();
        assert_eq!((p.actor.as_str(), p.role), ("key:abc123", Role::Operator));
        let wrong = format!("Bearer {KEY_PREFIX}abc123_guess");
        assert_eq!(
            refused(a.authenticate(&bus, Some(&wrong)).await),
            "bad_credentials"
        );
        doc.revoked_ms = Some(1);
        replace(&bus, DocKind::ApiKey, "abc123", &doc).await;
        assert_eq!(
            refused(a.authenticate(&bus, Some(&format!("Bearer {key}"))).await),
            "revoked_key"
        );
    }
}
