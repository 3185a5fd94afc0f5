//! Device authentication: JWTs (algorithm pinned per key, `kid` for rotation) and
//! provisioned per-device secrets (stored as SHA-256, compared in constant time).

use std::collections::HashMap;
use std::sync::Arc;

use fleetgate_bus::{Bus, BusError};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// One verification key, as written in the JWT key file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeySpec {
    /// Key ID matched against the token header's `kid`.
    pub kid: String,
    /// `HS256`, `RS256` or `ES256`; tokens signed with anything else are refused.
    pub algorithm: String,
    /// Shared secret (HS256).
    #[serde(default)]
    pub secret: Option<String>,
    /// PEM public key (RS256, ES256).
    #[serde(default)]
    pub public_key_pem: Option<String>,
}

/// Errors loading JWT keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The algorithm is not one we accept.
    #[error("key {kid}: unsupported algorithm {algorithm} (use HS256, RS256 or ES256)")]
    Algorithm {
        /// Key ID.
        kid: String,
        /// What was given.
        algorithm: String,
    },
    /// The key material is missing or unreadable.
    #[error("key {kid}: {message}")]
    Material {
        /// Key ID.
        kid: String,
        /// What is wrong.
        message: String,
    },
}

struct JwtKey {
    algorithm: Algorithm,
    key: DecodingKey,
}

/// JWT verification keys by `kid`.
#[derive(Default, Clone)]
pub struct JwtKeys {
    keys: Arc<HashMap<String, JwtKey>>,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl JwtKeys {
    /// Builds the key set.
    ///
    /// # Errors
    /// [`KeyError`] for an unsupported algorithm or missing/invalid key material.
    pub fn from_specs(specs: &[JwtKeySpec]) -> Result<Self, KeyError> {
        let mut keys = HashMap::new();
        for spec in specs {
            let material = |what: &str| KeyError::Material {
                kid: spec.kid.clone(),
                message: what.to_owned(),
            };
            let (algorithm, key) = match spec.algorithm.as_str() {
                "HS256" => {
                    let secret = spec
                        .secret
                        .as_deref()
                        .ok_or_else(|| material("HS256 needs `secret`"))?;
                    if secret.len() < 32 {
                        return Err(material("HS256 secret must be at least 32 bytes"));
                    }
                    (
                        Algorithm::HS256,
                        DecodingKey::from_secret(secret.as_bytes()),
                    )
                }
                "RS256" => {
                    let pem = spec
                        .public_key_pem
                        .as_deref()
                        .ok_or_else(|| material("RS256 needs `public_key_pem`"))?;
                    let key = DecodingKey::from_rsa_pem(pem.as_bytes())
                        .map_err(|e| material(&e.to_string()))?;
                    (Algorithm::RS256, key)
                }
                "ES256" => {
                    let pem = spec
                        .public_key_pem
                        .as_deref()
                        .ok_or_else(|| material("ES256 needs `public_key_pem`"))?;
                    let key = DecodingKey::from_ec_pem(pem.as_bytes())
                        .map_err(|e| material(&e.to_string()))?;
                    (Algorithm::ES256, key)
                }
                other => {
                    return Err(KeyError::Algorithm {
                        kid: spec.kid.clone(),
                        algorithm: other.to_owned(),
                    });
                }
            };
            keys.insert(spec.kid.clone(), JwtKey { algorithm, key });
        }
        Ok(Self {
            keys: Arc::new(keys),
        })
    }

    /// Whether any key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Most groups a device token may name.
pub const MAX_GROUPS: usize = 64;

#[derive(Deserialize)]
struct DeviceClaims {
    sub: String,
    #[serde(default)]
    groups: Vec<String>,
}

/// Why authentication failed. All but `Unavailable` close with 4403.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No such device is provisioned.
    #[error("unknown device")]
    UnknownDevice,
    /// The secret does not match.
    #[error("invalid credentials")]
    BadSecret,
    /// The JWT is invalid, expired or signed with an unknown key.
    #[error("invalid token: {0}")]
    BadToken(String),
    /// The device's credentials were revoked.
    #[error("credentials revoked")]
    Revoked,
    /// The authenticated ID differs from the routed or claimed one.
    #[error("device ID does not match the credentials")]
    Mismatch,
    /// A secret was given but no device ID to look it up by.
    #[error("device ID required")]
    MissingDeviceId,
    /// The bus could not be asked; the device should retry later (1013).
    #[error("bus unavailable: {0}")]
    Unavailable(#[from] BusError),
}

/// A device that proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthedDevice {
    /// Its ID.
    pub id: String,
    /// Its groups (registry and token claims).
    pub groups: Vec<String>,
}

/// SHA-256 of a device secret: what the registry stores.
pub fn secret_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Checks device credentials against the JWT keys and the registry in the bus.
#[derive(Clone)]
pub struct Authenticator {
    bus: Arc<dyn Bus>,
    jwt: JwtKeys,
}

impl Authenticator {
    /// Creates an authenticator.
    pub fn new(bus: Arc<dyn Bus>, jwt: JwtKeys) -> Self {
        Self { bus, jwt }
    }

    /// Authenticates `token`, presented for `claimed_id` (routed header/query or auth frame)
    /// when known.
    ///
    /// # Errors
    /// An [`AuthError`] saying why.
    pub async fn authenticate(
        &self,
        claimed_id: Option<&str>,
        token: &str,
    ) -> Result<AuthedDevice, AuthError> {
        // A JWT has three dot-separated parts; provisioned secrets have none.
        if token.bytes().filter(|b| *b == b'.').count() == 2 {
            return self.authenticate_jwt(claimed_id, token).await;
        }
        let id = claimed_id.ok_or(AuthError::MissingDeviceId)?;
        let record = self
            .bus
            .device_get(id)
            .await?
            .ok_or(AuthError::UnknownDevice)?;
        let digest = secret_digest(token);
        if !bool::from(digest.ct_eq(&record.secret_sha256)) {
            return Err(AuthError::BadSecret);
        }
        if record.revoked {
            return Err(AuthError::Revoked);
        }
        Ok(AuthedDevice {
            id: record.id,
            groups: record.groups,
        })
    }

    async fn authenticate_jwt(
        &self,
        claimed_id: Option<&str>,
        token: &str,
    ) -> Result<AuthedDevice, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::BadToken(e.to_string()))?;
        let key = match header.kid.as_deref() {
            Some(kid) => self.jwt.keys.get(kid),
            // Without a kid, a single configured key is unambiguous.
            None if self.jwt.keys.len() == 1 => self.jwt.keys.values().next(),
            None => None,
        }
        .ok_or_else(|| AuthError::BadToken("unknown key".into()))?;
        let mut validation = Validation::new(key.algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 30;
        let data = jsonwebtoken::decode::<DeviceClaims>(token, &key.key, &validation)
            .map_err(|e| AuthError::BadToken(e.to_string()))?;
        let claims = data.claims;
        // Every accepted message is published once per group: bound the fan-out a token buys.
        if claims.groups.len() > MAX_GROUPS {
            return Err(AuthError::BadToken(format!(
                "more than {MAX_GROUPS} groups"
            )));
        }
        if claimed_id.is_some_and(|id| id != claims.sub) {
            return Err(AuthError::Mismatch);
        }
        let mut groups = claims.groups;
        // A JWT device need not be provisioned, but a registry entry can still revoke it.
        if let Some(record) = self.bus.device_get(&claims.sub).await? {
            if record.revoked {
                return Err(AuthError::Revoked);
            }
            for g in record.groups {
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
        }
        Ok(AuthedDevice {
            id: claims.sub,
            groups,
        })
    }
}
