//! What fleetgate reads from certificates: expiry, and a client certificate's identity.

use std::str::FromStr;

use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A certificate's `notAfter`, Unix seconds.
pub(crate) fn not_after(der: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    Ok(cert.validity().not_after.timestamp())
}

/// Where a client certificate names its device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum IdentitySource {
    /// The subject's common name.
    #[default]
    CommonName,
    /// The first DNS subject alternative name.
    DnsSan,
    /// The first URI subject alternative name starting with this prefix, without it
    /// (`spiffe://fleet/device/` names `sensor-1` in `spiffe://fleet/device/sensor-1`).
    UriSan(String),
}

impl FromStr for IdentitySource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cn" => Ok(Self::CommonName),
            "dns" => Ok(Self::DnsSan),
            _ => match s.strip_prefix("uri:") {
                Some(prefix) => Ok(Self::UriSan(prefix.to_owned())),
                None => Err(format!("`{s}`: expected `cn`, `dns` or `uri:<prefix>`")),
            },
        }
    }
}

impl std::fmt::Display for IdentitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CommonName => f.write_str("cn"),
            Self::DnsSan => f.write_str("dns"),
            Self::UriSan(prefix) => write!(f, "uri:{prefix}"),
        }
    }
}

/// A verified client certificate, as the handshake left it: the chain was checked against the
/// CA bundle (and CRLs) before this exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-256 of the leaf certificate's DER: what a registry revokes.
    pub fingerprint: [u8; 32],
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// URI subject alternative names.
    pub uris: Vec<String>,
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
}

impl ClientCert {
    /// Reads the leaf certificate `der`; `None` when it does not parse (the verifier
    /// accepted it, so this does not happen for a certificate that reached a session).
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let mut dns_names = Vec::new();
        let mut uris = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                    GeneralName::URI(uri) => uris.push((*uri).to_owned()),
                    _ => {}
                }
            }
        }
        Some(Self {
            fingerprint: Sha256::digest(der).into(),
            common_name,
            dns_names,
            uris,
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// The device ID this certificate names, read from `source`.
    pub fn identity(&self, source: &IdentitySource) -> Option<&str> {
        match source {
            IdentitySource::CommonName => self.common_name.as_deref(),
            IdentitySource::DnsSan => self.dns_names.first().map(String::as_str),
            IdentitySource::UriSan(prefix) => self
                .uris
                .iter()
                .find_map(|uri| uri.strip_prefix(prefix.as_str())),
        }
        .filter(|id| !id.is_empty())
    }

    /// The fingerprint as lowercase hex, as the registry stores it.
    pub fn fingerprint_hex(&self) -> String {
        self.fingerprint
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, sans: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_comes_from_the_configured_place() {
        let der = cert("sensor-1", &["gw-7.devices.example"]);
        let c = ClientCert::from_der(&der).unwrap();
        assert_eq!(c.identity(&IdentitySource::CommonName), Some("sensor-1"));
        assert_eq!(
            c.identity(&IdentitySource::DnsSan),
            Some("gw-7.devices.example")
        );
        assert_eq!(c.identity(&"uri:spiffe://x/".parse().unwrap()), None);
        assert_eq!(c.fingerprint_hex().len(), 64);
    }

    #[test]
    fn uri_identity_strips_its_prefix() {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://fleet/device/pump-9".try_into().unwrap(),
        )];
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let c = ClientCert::from_der(&der).unwrap();
        let source: IdentitySource = "uri:spiffe://fleet/device/".parse().unwrap();
        assert_eq!(c.identity(&source), Some("pump-9"));
        assert_eq!(c.identity(&"uri:spiffe://other/".parse().unwrap()), None);
        assert!("common-name".parse::<IdentitySource>().is_err());
    }
}
