//! Device authentication: JWTs (algorithm pinned per key, `kid` for rotation), provisioned
//! per-device secrets (stored as SHA-256, compared in constant time) and client certificates
//! the TLS handshake verified.

mod jwt;

use std::sync::Arc;

use fleetgate_bus::{Bus, BusError};
use fleetgate_tls::{ClientCert, IdentitySource};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use jwt::{JwtKeySpec, JwtKeys, JwtPolicy, KeyError, MAX_GROUPS, TokenError};

/// Why authentication failed. All but `Unavailable` close with 4403; the messages go back
/// to the peer, so none names what it sent.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No such device is provisioned. Same message as a wrong secret: the answer must not
    /// tell which device IDs exist.
    #[error("invalid credentials")]
    UnknownDevice,
    /// The secret does not match.
    #[error("invalid credentials")]
    BadSecret,
    /// The JWT was refused.
    #[error("invalid token: {0}")]
    BadToken(#[from] TokenError),
    /// The client certificate names no device where the listener looks for one.
    #[error("certificate names no device")]
    NoCertificateIdentity,
    /// The device's credentials (or this certificate) were revoked.
    #[error("credentials revoked")]
    Revoked,
    /// The authenticated ID differs from the routed or claimed one.
    #[error("device ID does not match the credentials")]
    Mismatch,
    /// A secret was given but no device ID to look it up by.
    #[error("device ID required")]
    MissingDeviceId,
    /// The bus could not be asked; the device should retry later (1013).
    #[error("bus unavailable")]
    Unavailable(#[from] BusError),
}

impl AuthError {
    /// A label for the failures metric and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownDevice => "unknown_device",
            Self::BadSecret => "bad_secret",
            Self::BadToken(_) => "bad_token",
            Self::NoCertificateIdentity => "no_certificate_identity",
            Self::Revoked => "revoked",
            Self::Mismatch => "mismatch",
            Self::MissingDeviceId => "missing_device_id",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

/// A device that proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthedDevice {
    /// Its ID.
    pub id: String,
    /// Its groups (registry and token claims).
    pub groups: Vec<String>,
    /// When its credentials stop being valid (a JWT's `exp`), ms since the epoch; the
    /// session ends then unless the device presents a fresh token.
    pub expires_at_ms: Option<i64>,
    /// Its registry MAC key: when set, its messages must be signed. Boxed: this value sits
    /// in every connection's future until registration, and most devices have none.
    pub mac_key: Option<Box<[u8; 32]>>,
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
        let record = self.bus.device_get(id).await?;
        // An unknown device is compared against a digest no secret has, so that it costs
        // what a wrong secret costs and the two cannot be told apart by timing.
        let stored = record
            .as_ref()
            .map_or(&UNKNOWN_DIGEST, |r| &r.secret_sha256);
        let matches = bool::from(secret_digest(token).ct_eq(stored));
        let record = match record {
            Some(record) if matches => record,
            Some(_) => return Err(AuthError::BadSecret),
            None => return Err(AuthError::UnknownDevice),
        };
        if record.revoked {
            return Err(AuthError::Revoked);
        }
        Ok(AuthedDevice {
            id: record.id,
            groups: record.groups,
            expires_at_ms: None,
            mac_key: record.mac_key.map(Box::new),
        })
    }

    async fn authenticate_jwt(
        &self,
        claimed_id: Option<&str>,
        token: &str,
    ) -> Result<AuthedDevice, AuthError> {
        let claims = self.jwt.verify(token, crate::now_ms() / 1000)?;
        if claimed_id.is_some_and(|id| id != claims.sub) {
            return Err(AuthError::Mismatch);
        }
        let mut groups = claims.groups;
        // A JWT device need not be provisioned, but a registry entry can still revoke it.
        let mac_key = self.merge_registry(&claims.sub, &mut groups, None).await?;
        Ok(AuthedDevice {
            id: claims.sub,
            groups,
            expires_at_ms: Some(claims.exp.saturating_mul(1000)),
            mac_key,
        })
    }

    /// Authenticates a device by the client certificate its TLS handshake verified: the ID
    /// is read from `source` and must equal `claimed_id` when one is given. The CA vouches
    /// for the certificate; a registry entry can still revoke the device.
    ///
    /// # Errors
    /// An [`AuthError`] saying why.
    pub async fn authenticate_certificate(
        &self,
        cert: &ClientCert,
        source: &IdentitySource,
        claimed_id: Option<&str>,
    ) -> Result<AuthedDevice, AuthError> {
        let id = cert
            .identity(source)
            .ok_or(AuthError::NoCertificateIdentity)?;
        if claimed_id.is_some_and(|claimed| claimed != id) {
            return Err(AuthError::Mismatch);
        }
        let mut groups = Vec::new();
        let mac_key = self
            .merge_registry(id, &mut groups, Some(&cert.fingerprint))
            .await?;
        Ok(AuthedDevice {
            id: id.to_owned(),
            groups,
            expires_at_ms: Some(cert.not_after.saturating_mul(1000)),
            mac_key,
        })
    }

    /// Refuses a revoked registry entry of `id` (or a revoked `certificate` of it), adds its
    /// groups to `groups` and returns its MAC key.
    async fn merge_registry(
        &self,
        id: &str,
        groups: &mut Vec<String>,
        certificate: Option<&[u8; 32]>,
    ) -> Result<Option<Box<[u8; 32]>>, AuthError> {
        let Some(record) = self.bus.device_get(id).await? else {
            return Ok(None);
        };
        if record.revoked || certificate.is_some_and(|c| record.revoked_certs.contains(c)) {
            return Err(AuthError::Revoked);
        }
        for g in record.groups {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        Ok(record.mac_key.map(Box::new))
    }
}

/// What an unknown device's secret is compared against: the digest of no secret anyone has
/// (finding a preimage of it is as hard as forging any digest).
const UNKNOWN_DIGEST: [u8; 32] = [0xa5; 32];
