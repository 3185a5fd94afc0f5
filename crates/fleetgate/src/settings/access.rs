//! `[access]`: who is believed about a client's address and certificate, and how often
//! clients may fail to authenticate before they are refused unexamined.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fleetgate_authz::throttle::ThrottleConfig;
use fleetgate_gateway::{GatewayConfig, TrustedProxies};
use serde::{Deserialize, Serialize};

/// `[access]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessSettings {
    /// Proxies (addresses or CIDR blocks) whose `X-Forwarded-For` and client certificate
    /// header are believed.
    pub trusted_proxies: Vec<String>,
    /// Header in which a trusted ingress forwards the client certificate it verified
    /// (URL-encoded PEM, nginx's `$ssl_client_escaped_cert`); empty = none.
    pub client_cert_header: String,
    /// Sockets one source address may have waiting for their auth frame (0 = no limit).
    pub max_pending_auth_per_source: usize,
    /// Failed device authentications one source address may have in a row.
    pub auth_failure_burst_per_source: u32,
    /// One more failure per source is allowed per this long.
    pub auth_failure_refill_per_source_ms: u64,
    /// Failed authentications one device ID may have in a row.
    pub auth_failure_burst_per_device: u32,
    /// One more failure per device ID is allowed per this long.
    pub auth_failure_refill_per_device_ms: u64,
    /// Failed admin logins one username, and one source address, may have in a row.
    pub login_failure_burst: u32,
    /// One more failed login is allowed per this long.
    pub login_failure_refill_ms: u64,
    /// Groups whose devices must sign every message (docs/PROTOCOL.md, "Message
    /// signatures"); devices with a MAC key must anyway.
    pub signed_groups: Vec<String>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Default for AccessSettings {
    fn default() -> Self {
        let g = GatewayConfig::default();
        let login = fleetgate_admin::AdminConfig::default().login_throttle;
        Self {
            trusted_proxies: Vec::new(),
            client_cert_header: String::new(),
            max_pending_auth_per_source: g.max_pending_auth_per_source,
            auth_failure_burst_per_source: g.source_auth_throttle.burst,
            auth_failure_refill_per_source_ms: ms(g.source_auth_throttle.refill),
            auth_failure_burst_per_device: g.device_auth_throttle.burst,
            auth_failure_refill_per_device_ms: ms(g.device_auth_throttle.refill),
            login_failure_burst: login.burst,
            login_failure_refill_ms: ms(login.refill),
            signed_groups: Vec::new(),
        }
    }
}

/// The `[access]` options as environment variables and flags.
#[derive(Debug, Clone, Args)]
pub struct AccessOverrides {
    /// Comma-separated proxies (addresses, CIDR blocks) whose forwarding headers are believed.
    #[arg(long, env = "FLEETGATE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Header a trusted ingress forwards the verified client certificate in.
    #[arg(long, env = "FLEETGATE_CLIENT_CERT_HEADER")]
    pub client_cert_header: Option<String>,
    /// Sockets one address may have waiting for their auth frame (0 = no limit).
    #[arg(long, env = "FLEETGATE_MAX_PENDING_AUTH_PER_SOURCE")]
    pub max_pending_auth_per_source: Option<usize>,
    /// Failed device authentications per source address in a row (0 = no throttle).
    #[arg(long, env = "FLEETGATE_AUTH_FAILURE_BURST_PER_SOURCE")]
    pub auth_failure_burst_per_source: Option<u32>,
    /// One more failure per source address per this long, ms.
    #[arg(long, env = "FLEETGATE_AUTH_FAILURE_REFILL_PER_SOURCE_MS")]
    pub auth_failure_refill_per_source_ms: Option<u64>,
    /// Failed authentications per device ID in a row (0 = no throttle).
    #[arg(long, env = "FLEETGATE_AUTH_FAILURE_BURST_PER_DEVICE")]
    pub auth_failure_burst_per_device: Option<u32>,
    /// One more failure per device ID per this long, ms.
    #[arg(long, env = "FLEETGATE_AUTH_FAILURE_REFILL_PER_DEVICE_MS")]
    pub auth_failure_refill_per_device_ms: Option<u64>,
    /// Failed admin logins per username and per address in a row (0 = no throttle).
    #[arg(long, env = "FLEETGATE_LOGIN_FAILURE_BURST")]
    pub login_failure_burst: Option<u32>,
    /// One more failed login per this long, ms.
    #[arg(long, env = "FLEETGATE_LOGIN_FAILURE_REFILL_MS")]
    pub login_failure_refill_ms: Option<u64>,
    /// Comma-separated groups whose devices must sign every message.
    #[arg(long, env = "FLEETGATE_SIGNED_GROUPS", value_delimiter = ',')]
    pub signed_groups: Option<Vec<String>>,
}

fn throttle(burst: u32, refill_ms: u64) -> ThrottleConfig {
    ThrottleConfig {
        burst,
        refill: Duration::from_millis(refill_ms.max(1)),
        ..ThrottleConfig::default()
    }
}

impl AccessSettings {
    pub(super) fn apply(&mut self, o: &AccessOverrides) {
        if let Some(v) = &o.trusted_proxies {
            self.trusted_proxies = super::trimmed(v);
        }
        if let Some(v) = &o.client_cert_header {
            self.client_cert_header = v.trim().to_owned();
        }
        if let Some(v) = &o.signed_groups {
            self.signed_groups = super::trimmed(v);
        }
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = o.$field { self.$field = v; })* };
        }
        set!(
            max_pending_auth_per_source,
            auth_failure_burst_per_source,
            auth_failure_refill_per_source_ms,
            auth_failure_burst_per_device,
            auth_failure_refill_per_device_ms,
            login_failure_burst,
            login_failure_refill_ms
        );
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        self.proxies().map(drop)
    }

    fn proxies(&self) -> anyhow::Result<TrustedProxies> {
        TrustedProxies::parse(&self.trusted_proxies)
            .map_err(anyhow::Error::msg)
            .context("access trusted_proxies")
    }

    /// Applies the gateway's part to `c`.
    pub fn configure_gateway(&self, c: &mut GatewayConfig) {
        c.trusted_proxies = self.proxies().unwrap_or_default();
        c.client_cert_header =
            Some(self.client_cert_header.to_ascii_lowercase()).filter(|h| !h.is_empty());
        c.max_pending_auth_per_source = self.max_pending_auth_per_source;
        c.signed_groups = self.signed_groups.clone();
        c.source_auth_throttle = throttle(
            self.auth_failure_burst_per_source,
            self.auth_failure_refill_per_source_ms,
        );
        c.device_auth_throttle = throttle(
            self.auth_failure_burst_per_device,
            self.auth_failure_refill_per_device_ms,
        );
    }

    /// The admin API's login throttle.
    pub fn login_throttle(&self) -> ThrottleConfig {
        throttle(self.login_failure_burst, self.login_failure_refill_ms)
    }
}
