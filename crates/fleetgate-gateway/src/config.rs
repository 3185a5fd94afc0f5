//! Gateway settings. Defaults live here and nowhere else; the `fleetgate` binary layers the
//! config file, `FLEETGATE_*` environment variables and flags on top.

use std::time::Duration;

use fleetgate_protocol::Limits;

/// Everything a gateway node needs to know.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This node's ID in membership, presence and routing.
    pub node_id: String,
    /// First-frame auth must arrive within this.
    pub auth_timeout: Duration,
    /// The server pings this often.
    pub heartbeat: Duration,
    /// No frame or pong for this long closes the session with 4001.
    pub idle_timeout: Duration,
    /// First retransmit of an unacknowledged QoS 1/2 command after this; doubles per attempt.
    pub ack_timeout: Duration,
    /// Longest wait between retransmits.
    pub max_ack_backoff: Duration,
    /// Deliveries of one command before it is reported failed.
    pub max_attempts: u32,
    /// Authenticated device sessions this node holds. When full, upgrades get 503; a device
    /// that authenticates on a socket accepted just before the node filled up gets 1013.
    pub max_connections: usize,
    /// Sockets upgraded but not yet authenticated, on top of `max_connections` (each costs a
    /// file descriptor and about 5 KiB until its auth frame or the auth timeout).
    pub max_pending_auth: usize,
    /// Protocol limits (frame size, skew, replay window, batch size).
    pub limits: Limits,
    /// Sustained messages per second per device; above it (past the burst) the session closes
    /// with 4429.
    pub rate_limit_per_second: u32,
    /// Messages a device may send in a burst above the sustained rate.
    pub rate_limit_burst: u32,
    /// Frames waiting to be written to one device; a consumer that lets it fill is closed.
    pub outbox_capacity: usize,
    /// QoS 1/2 commands in flight to one device at once.
    pub inflight_window: usize,
    /// A write blocked longer than this marks the device a slow consumer and ends the session.
    pub write_timeout: Duration,
    /// Initial WebSocket read buffer; it grows only while a large frame is read.
    pub read_buffer_bytes: usize,
    /// On SIGTERM, sessions are closed with 1012 spread over this period.
    pub drain_period: Duration,
    /// Membership entry lifetime; refreshed every third of it.
    pub node_ttl: Duration,
    /// How long device -> server QoS 2 msgids are remembered awaiting `rel`.
    pub qos2_ttl: Duration,
    /// How often expired commands are collected and reported.
    pub expiry_sweep_interval: Duration,
    /// Limits of `/v1/app` sessions.
    pub app: AppConfig,
    /// How often the node re-reads the alert rules (a new rule applies within this).
    pub alert_rules_refresh: Duration,
    /// Most devices at once whose offline rules this node times after they disconnected.
    pub alert_offline_watch: usize,
    /// Where a verified client certificate names its device (mTLS).
    pub cert_identity: fleetgate_tls::IdentitySource,
    /// Proxies whose `X-Forwarded-For` and client certificate header are believed.
    pub trusted_proxies: crate::TrustedProxies,
    /// Header a trusted ingress forwards the verified client certificate in (URL-encoded
    /// PEM); `None` = no forwarded certificates.
    pub client_cert_header: Option<String>,
    /// Sockets one source address may have waiting for their auth frame (0 = no limit).
    pub max_pending_auth_per_source: usize,
    /// Failed authentications allowed per source address (generous: a site behind one NAT
    /// address may hold many devices).
    pub source_auth_throttle: fleetgate_authz::throttle::ThrottleConfig,
    /// Failed authentications allowed per device ID and source address.
    pub device_auth_throttle: fleetgate_authz::throttle::ThrottleConfig,
    /// How long a session may outlive its credentials' expiry (a JWT's `exp`) before it is
    /// closed with 4403, unless the device sent a fresh token.
    pub expiry_grace: Duration,
    /// Groups whose devices must sign every message, MAC key or not (one without a key has
    /// all its messages refused until it is given one).
    pub signed_groups: Vec<String>,
}

/// Limits of `/v1/app` sessions (dashboards and apps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConfig {
    /// Most channels one connection subscribes to at once.
    pub max_subscriptions: usize,
    /// Most connections one principal holds on this node at once.
    pub max_connections_per_principal: usize,
    /// Most bytes queued for one connection (more than the largest frame); a client that
    /// falls this far behind is closed
    /// with 4008 and recovers from its offsets when it comes back.
    pub queue_bytes: usize,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            max_subscriptions: 100,
            max_connections_per_principal: 100,
            queue_bytes: 2 << 20,
        }
    }
}

impl GatewayConfig {
    /// Default for [`GatewayConfig::max_connections`]: about one connection per 16 KiB of
    /// `memory_bytes` (each costs a few KiB idle, more while busy), capped at one million.
    pub fn max_connections_for_memory(memory_bytes: u64) -> usize {
        (memory_bytes / (16 * 1024)).clamp(1_000, 1_000_000) as usize
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            node_id: "node".to_owned(),
            auth_timeout: Duration::from_millis(10_000),
            heartbeat: Duration::from_millis(30_000),
            idle_timeout: Duration::from_millis(90_000),
            ack_timeout: Duration::from_millis(5_000),
            max_ack_backoff: Duration::from_millis(60_000),
            max_attempts: 5,
            max_connections: 100_000,
            max_pending_auth: 1024,
            limits: Limits::default(),
            rate_limit_per_second: 100,
            rate_limit_burst: 200,
            outbox_capacity: 64,
            inflight_window: 16,
            write_timeout: Duration::from_millis(10_000),
            read_buffer_bytes: 512,
            drain_period: Duration::from_millis(30_000),
            node_ttl: Duration::from_millis(15_000),
            qos2_ttl: Duration::from_millis(10 * 60 * 1000),
            expiry_sweep_interval: Duration::from_millis(1_000),
            app: AppConfig::default(),
            alert_rules_refresh: Duration::from_millis(5_000),
            alert_offline_watch: 100_000,
            cert_identity: fleetgate_tls::IdentitySource::default(),
            expiry_grace: Duration::ZERO,
            signed_groups: Vec::new(),
            trusted_proxies: crate::TrustedProxies::default(),
            client_cert_header: None,
            max_pending_auth_per_source: 128,
            source_auth_throttle: fleetgate_authz::throttle::ThrottleConfig {
                burst: 100,
                refill: Duration::from_millis(100),
                ..Default::default()
            },
            device_auth_throttle: fleetgate_authz::throttle::ThrottleConfig::default(),
        }
    }
}
