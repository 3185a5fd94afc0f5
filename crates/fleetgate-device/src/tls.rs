//! TLS settings for `wss://`: the roots a device trusts and the certificate it presents.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::DeviceError;

/// A client config trusting the CA certificates in `ca_pem` (PEM, one or more) and, with
/// `client` (certificate chain PEM, key PEM), presenting that certificate for mTLS. ALPN
/// `http/1.1`, TLS 1.2 and 1.3.
///
/// # Errors
/// [`DeviceError::InvalidOptions`] when the PEM holds no certificate or key, or rustls
/// refuses them.
pub fn tls_client_config(
    ca_pem: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<Arc<rustls::ClientConfig>, DeviceError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        DeviceError::InvalidOptions(format!("tls {what}: {e}"))
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(ca.map_err(|e| bad("ca", &e))?)
            .map_err(|e| bad("ca", &e))?;
    }
    if roots.is_empty() {
        return Err(bad("ca", &"no CERTIFICATE in the PEM"));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad("versions", &e))?
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("client certificate", &e))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad("client key", &e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad("client certificate", &e))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
