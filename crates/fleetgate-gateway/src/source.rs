//! Who is connecting, before any credential is read: the client's address (through trusted
//! proxies), the client certificate an ingress verified, and the limits applied per source
//! before authentication (sockets waiting for their auth frame, failed authentications).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use fleetgate_authz::throttle::source_key;
use fleetgate_tls::{ClientCert, Peer};
use ipnet::IpNet;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Proxies whose forwarding headers (`X-Forwarded-For`, the client certificate header) are
/// believed. Anyone else sending them is lying or misconfigured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses addresses and CIDR blocks (`10.0.0.0/8`, `127.0.0.1`, `::1`).
    ///
    /// # Errors
    /// The entry that is neither.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| {
                e.parse::<IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("`{e}` is not an IP address or CIDR block"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Where a connection comes from, as far as this node can tell.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    /// The client's address: the TCP peer, or what a trusted proxy says it forwarded for.
    pub(crate) ip: IpAddr,
    /// Whether the TCP peer is a trusted proxy.
    pub(crate) via_proxy: bool,
}

impl Source {
    /// The source of a request from `peer` with `headers`. Behind trusted proxies the client
    /// is the right-most `X-Forwarded-For` hop that is not itself a trusted proxy (each proxy
    /// appends the address it saw, so entries left of it are the client's own claims).
    pub(crate) fn of(peer: &Peer, headers: &HeaderMap, proxies: &TrustedProxies) -> Self {
        let tcp = canonical(peer.addr.ip());
        if !proxies.contains(tcp) {
            return Self {
                ip: tcp,
                via_proxy: false,
            };
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        let client = forwarded
            .iter()
            .rev()
            .filter_map(|hop| hop.parse::<IpAddr>().ok())
            .map(canonical)
            .find(|ip| !proxies.contains(*ip));
        Self {
            ip: client.unwrap_or(tcp),
            via_proxy: true,
        }
    }

    /// The throttle key of this source.
    pub(crate) fn key(&self) -> String {
        source_key(self.ip)
    }
}

/// The public listener's accept gate: an address that is over its failed-authentication
/// budget is disconnected right after accept, before HTTP is parsed or a TLS handshake
/// computed; a flood from it then costs an accept and a close. Trusted proxies are never
/// gated here: their clients are told apart only once the request's headers are read.
pub(crate) fn accept_gate(shared: &std::sync::Arc<crate::Shared>) -> fleetgate_tls::Gate {
    let shared = std::sync::Arc::downgrade(shared);
    std::sync::Arc::new(move |ip: IpAddr| {
        let Some(shared) = shared.upgrade() else {
            return true;
        };
        if shared.config.trusted_proxies.contains(ip) {
            return true;
        }
        let refused = shared
            .source_throttle
            .check(&source_key(canonical(ip)))
            .is_err();
        if refused {
            shared.metrics.auth_throttled.inc();
        }
        !refused
    })
}

/// Why a forwarded client certificate was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForwardedCertError {
    /// The header came from a peer that is not a trusted proxy.
    Untrusted,
    /// It does not hold a PEM certificate.
    Unreadable,
}

/// The client certificate an ingress verified and forwarded in `header` (nginx:
/// `proxy_set_header X-Client-Cert $ssl_client_escaped_cert;`, URL-encoded PEM).
/// `Ok(None)` without the header, or when no header name is configured.
pub(crate) fn forwarded_cert(
    source: &Source,
    headers: &HeaderMap,
    header: Option<&str>,
) -> Result<Option<ClientCert>, ForwardedCertError> {
    let Some(value) = header.and_then(|name| headers.get(name)) else {
        return Ok(None);
    };
    if !source.via_proxy {
        return Err(ForwardedCertError::Untrusted);
    }
    let bytes = value.as_bytes();
    // nginx sends an empty value (or "-" in some setups) when the client had no certificate.
    if bytes.is_empty() || bytes == b"-" {
        return Ok(None);
    }
    let pem = percent_encoding::percent_decode(bytes).collect::<Vec<u8>>();
    let der = CertificateDer::from_pem_slice(&pem).map_err(|_| ForwardedCertError::Unreadable)?;
    ClientCert::from_der(der.as_ref())
        .map(Some)
        .ok_or(ForwardedCertError::Unreadable)
}

/// Sockets waiting for their auth frame, per source: one address cannot hold the node's whole
/// pre-auth budget (`max_pending_auth`) and starve everyone else's connects.
#[derive(Debug, Default)]
pub(crate) struct PendingPerSource {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One pending socket of a source; released when dropped.
#[derive(Debug)]
pub(crate) struct PendingSlot {
    owner: Arc<PendingPerSource>,
    ip: IpAddr,
}

impl PendingPerSource {
    /// A slot for `ip` unless it holds `max` already (`max` 0 = no limit).
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PendingSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_default();
        if max != 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(PendingSlot {
            owner: self.clone(),
            ip,
        })
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(addr: &str) -> Peer {
        Peer {
            addr: addr.parse().unwrap(),
            tls: false,
            client_cert: None,
        }
    }

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", xff.parse().unwrap());
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8".into(), "::1".into()]).unwrap();
        let spoof = headers("1.2.3.4");
        let direct = Source::of(&peer("203.0.113.9:5000"), &spoof, &proxies);
        assert_eq!(direct.ip.to_string(), "203.0.113.9");
        assert!(!direct.via_proxy);
        // The client put a fake hop first; the proxy appended what it saw.
        let chained = Source::of(
            &peer("10.1.1.1:80"),
            &headers("6.6.6.6, 198.51.100.7, 10.2.2.2"),
            &proxies,
        );
        assert_eq!(chained.ip.to_string(), "198.51.100.7");
        let bare = Source::of(&peer("10.1.1.1:80"), &HeaderMap::new(), &proxies);
        assert_eq!(bare.ip.to_string(), "10.1.1.1");
        assert!(TrustedProxies::parse(&["nginx".into()]).is_err());
    }

    #[test]
    fn a_certificate_header_from_an_untrusted_peer_is_refused() {
        let source = Source {
            ip: "203.0.113.9".parse().unwrap(),
            via_proxy: false,
        };
        let mut h = HeaderMap::new();
        h.insert(
            "x-client-cert",
            "-----BEGIN%20CERTIFICATE-----".parse().unwrap(),
        );
        assert_eq!(
            forwarded_cert(&source, &h, Some("x-client-cert")),
            Err(ForwardedCertError::Untrusted)
        );
        assert_eq!(forwarded_cert(&source, &h, None), Ok(None));
        let proxied = Source {
            via_proxy: true,
            ..source
        };
        assert_eq!(
            forwarded_cert(&proxied, &h, Some("x-client-cert")),
            Err(ForwardedCertError::Unreadable)
        );
    }

    #[test]
    fn pending_slots_are_capped_per_source_and_released() {
        let pending = Arc::new(PendingPerSource::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = pending.acquire(ip, 2).unwrap();
        let _b = pending.acquire(ip, 2).unwrap();
        assert!(pending.acquire(ip, 2).is_none());
        assert!(pending.acquire("192.0.2.2".parse().unwrap(), 2).is_some());
        drop(a);
        assert!(pending.acquire(ip, 2).is_some());
    }
}
