//! A listener's TLS material, loaded from PEM files into a rustls server config, and swapped
//! whole when the files change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{ProducesTickets, ServerConfig, WebPkiClientVerifier};
use sha2::{Digest, Sha256};

use crate::cert::not_after;

/// Whether a listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// Every client must present a certificate the CA bundle vouches for.
    #[default]
    Required,
    /// A client may present one (and is then identified by it) or authenticate otherwise.
    Optional,
}

/// Where a listener's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle for client certificates; `None` = no mTLS.
    pub client_ca: Option<PathBuf>,
    /// Whether client certificates are required when `client_ca` is set.
    pub client_auth: ClientAuth,
    /// PEM certificate revocation lists checked against client certificates.
    pub crl: Option<PathBuf>,
}

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the kind expected.
    #[error("{}: {message}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the material (a key that does not match the certificate, say).
    #[error("{0}")]
    Config(String),
}

/// The material as last loaded.
struct Loaded {
    config: Arc<ServerConfig>,
    /// SHA-256 over every file's bytes: a change of any file is a change of this.
    digest: [u8; 32],
    /// The leaf certificate's `notAfter`, Unix seconds.
    not_after: i64,
}

/// One listener's TLS state. Handshakes take [`ServerTls::config`]; a reload replaces it for
/// new handshakes and leaves established sessions alone.
pub struct ServerTls {
    name: String,
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    /// Kept across reloads so that session tickets issued before a rotation stay valid.
    ticketer: Arc<dyn ProducesTickets>,
    current: RwLock<Loaded>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("name", &self.name)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads `files` for the listener called `name` (a metrics label: `public`, `admin`).
    ///
    /// # Errors
    /// [`TlsError`] when a file is unreadable, holds no certificate or key, or rustls refuses it.
    pub fn load(name: &str, files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let loaded = build(&files, &provider, &ticketer)?;
        Ok(Arc::new(Self {
            name: name.to_owned(),
            files,
            provider,
            ticketer,
            current: RwLock::new(loaded),
        }))
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The files this state is loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The config for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.read().config.clone()
    }

    /// The served certificate's `notAfter`, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.read().not_after
    }

    /// Reloads when any file's content changed. `Ok(false)` = nothing changed.
    ///
    /// # Errors
    /// The new material's [`TlsError`]; the old config then stays in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let (digest, _) = read_all(&self.files)?;
        if digest == self.read().digest {
            return Ok(false);
        }
        let loaded = build(&self.files, &self.provider, &self.ticketer)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        Ok(true)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn paths(files: &TlsFiles) -> impl Iterator<Item = &Path> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
        files.crl.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(PathBuf::as_path)
}

/// Every file's bytes, and one digest over them all: a change of any file is a change of it.
fn read_all(files: &TlsFiles) -> Result<([u8; 32], Vec<Vec<u8>>), TlsError> {
    let mut hash = Sha256::new();
    let mut contents = Vec::new();
    for path in paths(files) {
        let bytes = read(path)?;
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(&bytes);
        contents.push(bytes);
    }
    Ok((hash.finalize().into(), contents))
}

fn pem_error(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn certificates(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

fn build(
    files: &TlsFiles,
    provider: &Arc<CryptoProvider>,
    ticketer: &Arc<dyn ProducesTickets>,
) -> Result<Loaded, TlsError> {
    // Parse what was digested: a file replaced between two reads would otherwise be loaded
    // but never noticed as changed.
    let (digest, contents) = read_all(files)?;
    let mut contents = contents.into_iter();
    let cert_pem = contents.next().unwrap_or_default();
    let key_pem = contents.next().unwrap_or_default();
    let certs = certificates(&files.cert, &cert_pem)?;
    let not_after = not_after(&certs[0]).map_err(|e| pem_error(&files.cert, e))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| pem_error(&files.key, format!("no usable private key: {e}")))?;

    let config_error = |e: rustls::Error| TlsError::Config(e.to_string());
    // rustls has no TLS 1.0/1.1 and no CBC or RSA key-exchange suites: its defaults are
    // the modern set the issue asks for.
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(config_error)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let ca_pem = contents.next().unwrap_or_default();
            let mut roots = RootCertStore::empty();
            for ca in certificates(ca_path, &ca_pem)? {
                roots
                    .add(ca)
                    .map_err(|e| pem_error(ca_path, e.to_string()))?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            if let Some(crl_path) = &files.crl {
                let crl_pem = contents.next().unwrap_or_default();
                let crls = CertificateRevocationListDer::pem_slice_iter(&crl_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| pem_error(crl_path, e.to_string()))?;
                if crls.is_empty() {
                    return Err(pem_error(crl_path, "no X509 CRL in the file"));
                }
                verifier = verifier.with_crls(crls);
            }
            if files.client_auth == ClientAuth::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?,
            )
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(config_error)?;
    // The only protocol spoken on these listeners; a client offering h2 alone is refused.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ticketer = ticketer.clone();
    Ok(Loaded {
        config: Arc::new(config),
        digest,
        not_after,
    })
}
