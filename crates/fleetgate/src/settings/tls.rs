//! `[tls]`: certificates for the listeners and how client certificates name devices.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use fleetgate_tls::{ClientAuth, HandshakeLimits, IdentitySource, TlsFiles};
use serde::{Deserialize, Serialize};

/// `[tls]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain of the public listener; unset = plain `ws://`.
    pub cert: Option<PathBuf>,
    /// PEM private key of the public listener.
    pub key: Option<PathBuf>,
    /// PEM CA bundle for device certificates (mTLS on the public listener).
    pub client_ca: Option<PathBuf>,
    /// `required` (every client presents a certificate) or `optional`.
    pub client_auth: String,
    /// Where a client certificate names its device: `cn`, `dns` or `uri:<prefix>`.
    pub client_id_from: String,
    /// PEM CRL file checked against client certificates.
    pub crl: Option<PathBuf>,
    /// PEM certificate chain of the admin listener; unset = plain HTTP.
    pub admin_cert: Option<PathBuf>,
    /// PEM private key of the admin listener.
    pub admin_key: Option<PathBuf>,
    /// PEM certificate chain of the internal listener; unset = plain HTTP.
    pub internal_cert: Option<PathBuf>,
    /// PEM private key of the internal listener.
    pub internal_key: Option<PathBuf>,
    /// How often the files are checked for changes.
    pub reload_interval_ms: u64,
    /// A client that has not completed its handshake by then is dropped.
    pub handshake_timeout_ms: u64,
    /// Handshakes in progress at once per listener; more are closed before any cryptography.
    pub max_handshakes: usize,
}

impl Default for TlsSettings {
    fn default() -> Self {
        let limits = HandshakeLimits::default();
        Self {
            cert: None,
            key: None,
            client_ca: None,
            client_auth: "required".into(),
            client_id_from: IdentitySource::default().to_string(),
            crl: None,
            admin_cert: None,
            admin_key: None,
            internal_cert: None,
            internal_key: None,
            reload_interval_ms: 10_000,
            handshake_timeout_ms: limits.timeout.as_millis() as u64,
            max_handshakes: limits.max_in_progress,
        }
    }
}

/// The `[tls]` options as environment variables and flags. (An empty path in the TOML file
/// counts as unset; clap refuses an empty one in the environment.)
#[derive(Debug, Clone, Args)]
pub struct TlsOverrides {
    /// PEM certificate chain of the public listener (wss://).
    #[arg(long, env = "FLEETGATE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the public listener.
    #[arg(long, env = "FLEETGATE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: client certificates (mTLS) on the public listener.
    #[arg(long, env = "FLEETGATE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// `required` or `optional` client certificates.
    #[arg(long, env = "FLEETGATE_TLS_CLIENT_AUTH")]
    pub tls_client_auth: Option<String>,
    /// Where a client certificate names its device: `cn`, `dns` or `uri:<prefix>`.
    #[arg(long, env = "FLEETGATE_TLS_CLIENT_ID_FROM")]
    pub tls_client_id_from: Option<String>,
    /// PEM CRL file for client certificates.
    #[arg(long, env = "FLEETGATE_TLS_CRL")]
    pub tls_crl: Option<PathBuf>,
    /// PEM certificate chain of the admin listener (https://).
    #[arg(long, env = "FLEETGATE_ADMIN_TLS_CERT")]
    pub admin_tls_cert: Option<PathBuf>,
    /// PEM private key of the admin listener.
    #[arg(long, env = "FLEETGATE_ADMIN_TLS_KEY")]
    pub admin_tls_key: Option<PathBuf>,
    /// PEM certificate chain of the internal listener.
    #[arg(long, env = "FLEETGATE_INTERNAL_TLS_CERT")]
    pub internal_tls_cert: Option<PathBuf>,
    /// PEM private key of the internal listener.
    #[arg(long, env = "FLEETGATE_INTERNAL_TLS_KEY")]
    pub internal_tls_key: Option<PathBuf>,
    /// How often TLS files are checked for changes, ms.
    #[arg(long, env = "FLEETGATE_TLS_RELOAD_INTERVAL_MS")]
    pub tls_reload_interval_ms: Option<u64>,
    /// TLS handshake deadline, ms.
    #[arg(long, env = "FLEETGATE_TLS_HANDSHAKE_TIMEOUT_MS")]
    pub tls_handshake_timeout_ms: Option<u64>,
    /// TLS handshakes in progress at once per listener.
    #[arg(long, env = "FLEETGATE_TLS_MAX_HANDSHAKES")]
    pub tls_max_handshakes: Option<usize>,
}

/// Which listener a set of TLS files serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `/v1/device`, `/v1/app`, `/v1/mqtt`.
    Public,
    /// The admin REST API.
    Admin,
    /// `/metrics`, `/healthz`, `/readyz`.
    Internal,
}

impl Listener {
    /// The metrics label and log name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Admin => "admin",
            Self::Internal => "internal",
        }
    }
}

fn path(v: &Option<PathBuf>) -> Option<PathBuf> {
    v.clone().filter(|p| !p.as_os_str().is_empty())
}

impl TlsSettings {
    pub(super) fn apply(&mut self, o: &TlsOverrides) {
        macro_rules! paths {
            ($($src:ident => $dst:ident),* $(,)?) => {
                $(if o.$src.is_some() { self.$dst = path(&o.$src); })*
            };
        }
        paths!(
            tls_cert => cert, tls_key => key, tls_client_ca => client_ca, tls_crl => crl,
            admin_tls_cert => admin_cert, admin_tls_key => admin_key,
            internal_tls_cert => internal_cert, internal_tls_key => internal_key,
        );
        if let Some(v) = &o.tls_client_auth {
            self.client_auth = v.clone();
        }
        if let Some(v) = &o.tls_client_id_from {
            self.client_id_from = v.clone();
        }
        if let Some(v) = o.tls_reload_interval_ms {
            self.reload_interval_ms = v;
        }
        if let Some(v) = o.tls_handshake_timeout_ms {
            self.handshake_timeout_ms = v;
        }
        if let Some(v) = o.tls_max_handshakes {
            self.max_handshakes = v;
        }
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        for listener in [Listener::Public, Listener::Admin, Listener::Internal] {
            self.files(listener)?;
        }
        if self.client_ca.is_none() && self.crl.is_some() {
            bail!("tls crl needs tls client_ca");
        }
        self.client_auth()?;
        self.identity_source()?;
        if self.reload_interval_ms == 0 || self.handshake_timeout_ms == 0 {
            bail!("tls reload_interval_ms and handshake_timeout_ms must be > 0");
        }
        if self.max_handshakes == 0 {
            bail!("tls max_handshakes must be > 0");
        }
        Ok(())
    }

    fn client_auth(&self) -> anyhow::Result<ClientAuth> {
        match self.client_auth.as_str() {
            "required" => Ok(ClientAuth::Required),
            "optional" => Ok(ClientAuth::Optional),
            other => bail!("tls client_auth `{other}`: expected `required` or `optional`"),
        }
    }

    /// Where device certificates name their device.
    pub fn identity_source(&self) -> anyhow::Result<IdentitySource> {
        self.client_id_from
            .parse()
            .map_err(|e: String| anyhow::anyhow!("tls client_id_from {e}"))
    }

    /// The files `listener` serves TLS from; `None` = plain.
    ///
    /// # Errors
    /// A certificate without its key or the other way round; a client CA on a plain
    /// listener; a key file others may read.
    pub fn files(&self, listener: Listener) -> anyhow::Result<Option<TlsFiles>> {
        let (cert, key) = match listener {
            Listener::Public => (&self.cert, &self.key),
            Listener::Admin => (&self.admin_cert, &self.admin_key),
            Listener::Internal => (&self.internal_cert, &self.internal_key),
        };
        let name = listener.name();
        let (cert, key) = match (path(cert), path(key)) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) => {
                if listener == Listener::Public && self.client_ca.is_some() {
                    bail!("tls client_ca needs the public listener's cert and key");
                }
                return Ok(None);
            }
            _ => bail!("the {name} listener's TLS certificate and key go together"),
        };
        crate::secret_files::refuse_world_readable(&key)?;
        let public = listener == Listener::Public;
        Ok(Some(TlsFiles {
            cert,
            key,
            client_ca: path(&self.client_ca).filter(|_| public),
            client_auth: self.client_auth()?,
            crl: path(&self.crl).filter(|_| public),
        }))
    }

    /// Handshake timeout and cap.
    pub fn handshake_limits(&self) -> HandshakeLimits {
        HandshakeLimits {
            timeout: Duration::from_millis(self.handshake_timeout_ms),
            max_in_progress: self.max_handshakes,
        }
    }
}
