//! `[jwt]`: where device JWT keys come from beside the TOML key file, and what every token
//! must satisfy.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use fleetgate_gateway::JwtPolicy;
use serde::{Deserialize, Serialize};

/// `[jwt]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    /// A JWKS document (`{"keys":[...]}`) of verification keys, reloaded on change.
    pub jwks: Option<PathBuf>,
    /// Clock tolerance for `exp`, `nbf` and `iat`.
    pub leeway_ms: u64,
    /// Accepted `aud` values; empty = not checked.
    pub audience: Vec<String>,
    /// Accepted `iss` values; empty = not checked.
    pub issuer: Vec<String>,
    /// How long a session may outlive its token's `exp` before it is closed with 4403.
    pub expiry_grace_ms: u64,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            jwks: None,
            leeway_ms: 30_000,
            audience: Vec::new(),
            issuer: Vec::new(),
            expiry_grace_ms: 0,
        }
    }
}

/// The `[jwt]` options as environment variables and flags.
#[derive(Debug, Clone, Args)]
pub struct JwtOverrides {
    /// JWKS file of device JWT verification keys.
    #[arg(long, env = "FLEETGATE_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,
    /// Clock tolerance for exp, nbf and iat, ms.
    #[arg(long, env = "FLEETGATE_JWT_LEEWAY_MS")]
    pub jwt_leeway_ms: Option<u64>,
    /// Comma-separated accepted `aud` values.
    #[arg(long, env = "FLEETGATE_JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Option<Vec<String>>,
    /// Comma-separated accepted `iss` values.
    #[arg(long, env = "FLEETGATE_JWT_ISSUER", value_delimiter = ',')]
    pub jwt_issuer: Option<Vec<String>>,
    /// How long a session may outlive its token's exp, ms.
    #[arg(long, env = "FLEETGATE_JWT_EXPIRY_GRACE_MS")]
    pub jwt_expiry_grace_ms: Option<u64>,
}

impl JwtSettings {
    pub(super) fn apply(&mut self, o: &JwtOverrides) {
        if let Some(path) = &o.jwt_jwks {
            self.jwks = Some(path.clone()).filter(|p| !p.as_os_str().is_empty());
        }
        if let Some(v) = o.jwt_leeway_ms {
            self.leeway_ms = v;
        }
        if let Some(v) = &o.jwt_audience {
            self.audience = super::trimmed(v);
        }
        if let Some(v) = &o.jwt_issuer {
            self.issuer = super::trimmed(v);
        }
        if let Some(v) = o.jwt_expiry_grace_ms {
            self.expiry_grace_ms = v;
        }
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        // A leeway of minutes would let an expired token live on for minutes.
        if self.leeway_ms > 300_000 {
            bail!("jwt leeway_ms must be at most 300000");
        }
        Ok(())
    }

    /// The rules every token is held to.
    pub fn policy(&self) -> JwtPolicy {
        JwtPolicy {
            leeway_s: self.leeway_ms.div_ceil(1000),
            audience: self.audience.clone(),
            issuer: self.issuer.clone(),
        }
    }

    /// The grace after a token's expiry.
    pub fn expiry_grace(&self) -> Duration {
        Duration::from_millis(self.expiry_grace_ms)
    }
}
