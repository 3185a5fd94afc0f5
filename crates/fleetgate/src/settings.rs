//! The effective configuration: built-in defaults (taken from each crate's `Default`), then
//! the TOML file, then `FLEETGATE_*` environment variables, then flags. `fleetgate config`
//! prints the result.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use fleetgate_admin::AdminConfig;
use fleetgate_bus::memory::MemoryBusConfig;
use fleetgate_bus::redis::RedisBusConfig;
use fleetgate_gateway::GatewayConfig;
use serde::{Deserialize, Serialize};

mod access;
mod jwt;
mod mqtt;
mod tls;

pub use access::{AccessOverrides, AccessSettings};
pub use jwt::{JwtOverrides, JwtSettings};
pub use mqtt::{MqttOverrides, MqttSettings};
pub use tls::{Listener, TlsOverrides, TlsSettings};

/// Everything configurable, with units in the names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Public WebSocket listener (`/v1/device`).
    pub listen: String,
    /// Admin REST listener.
    pub admin_listen: String,
    /// Internal listener: `/metrics`, `/healthz`, `/readyz`.
    pub internal_listen: String,
    /// This node's ID; empty = hostname + random suffix.
    pub node_id: String,
    /// Bootstrap admin API key.
    pub api_key: String,
    /// Redis shards; empty = the in-process memory bus.
    pub redis_urls: Vec<String>,
    /// TOML file of JWT verification keys (`[[keys]] kid, algorithm, secret | public_key_pem`).
    pub jwt_keys: Option<PathBuf>,
    /// OTLP collector endpoint.
    pub otlp_endpoint: Option<String>,
    /// `text` or `json` logs on stderr.
    pub log_format: String,
    /// Gateway node settings.
    pub gateway: GatewaySettings,
    /// Admin API settings.
    pub admin: AdminSettings,
    /// Memory bus settings.
    pub bus: BusSettings,
    /// The MQTT bridge (`/v1/mqtt`).
    pub mqtt: MqttSettings,
    /// Listener certificates and client-certificate identity.
    pub tls: TlsSettings,
    /// Device JWT keys (beside `jwt_keys`) and token rules.
    pub jwt: JwtSettings,
    /// Trusted proxies and failed-authentication limits.
    pub access: AccessSettings,
}

/// `[gateway]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    /// First-frame auth deadline.
    pub auth_timeout_ms: u64,
    /// Server ping interval.
    pub heartbeat_ms: u64,
    /// Silence that closes a session with 4001.
    pub idle_timeout_ms: u64,
    /// First retransmit delay of an unacknowledged command.
    pub ack_timeout_ms: u64,
    /// Longest retransmit delay.
    pub max_ack_backoff_ms: u64,
    /// Deliveries before a command is reported failed.
    pub max_attempts: u32,
    /// Authenticated device sessions per node; 0 = sized from memory and the open-file limit.
    pub max_connections: usize,
    /// Sockets waiting for their auth frame, on top of `max_connections`.
    pub max_pending_auth: usize,
    /// Largest frame.
    pub max_frame_bytes: usize,
    /// Accepted clock skew of message timestamps.
    pub max_skew_ms: i64,
    /// Per-device replay window.
    pub replay_window_ms: i64,
    /// Items per batch.
    pub max_batch_items: usize,
    /// Sustained messages per second per device.
    pub rate_limit_per_second: u32,
    /// Burst above the sustained rate.
    pub rate_limit_burst: u32,
    /// Frames queued for one device's socket.
    pub outbox_capacity: usize,
    /// Commands in flight per device.
    pub inflight_window: usize,
    /// A write blocked this long drops a slow consumer.
    pub write_timeout_ms: u64,
    /// Initial WebSocket read buffer.
    pub read_buffer_bytes: usize,
    /// Period over which SIGTERM closes sessions with 1012.
    pub drain_period_ms: u64,
    /// Membership entry lifetime.
    pub node_ttl_ms: u64,
    /// How long device QoS 2 msgids wait for `rel`.
    pub qos2_ttl_ms: u64,
    /// How often expired commands are collected.
    pub expiry_sweep_interval_ms: u64,
    /// Channels one `/v1/app` connection may subscribe to at once.
    pub app_max_subscriptions: usize,
    /// `/v1/app` connections one principal may hold on a node.
    pub app_max_connections_per_principal: usize,
    /// Bytes queued for one `/v1/app` connection before it is closed with 4008.
    pub app_queue_bytes: usize,
    /// How often a node re-reads the alert rules.
    pub alert_rules_refresh_ms: u64,
}

/// `[admin]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Command TTL when a request gives none.
    pub default_ttl_ms: u64,
    /// Longest command TTL.
    pub max_ttl_ms: u64,
    /// Longest `waitMs`.
    pub max_wait_ms: u64,
    /// Lifetime of a user token.
    pub token_ttl_ms: u64,
    /// TOML file of HS256 keys for user tokens (`[[keys]] kid, secret`; the first signs).
    pub token_keys: Option<PathBuf>,
    /// PKCS#8 PEM Ed25519 key that signs audit checkpoints.
    pub audit_signing_key: Option<PathBuf>,
    /// SPKI PEM public keys of earlier audit signing keys, still trusted by verification.
    pub audit_verify_keys: Vec<PathBuf>,
    /// How often the audit log's head is signed.
    pub audit_checkpoint_interval_ms: u64,
    /// Largest admin request body; larger ones answer 413.
    pub max_body_bytes: usize,
    /// Largest shadow document (reported + desired as JSON) a desired patch may make.
    pub shadow_max_bytes: usize,
    /// A job's lease: a job whose admin process died is taken over after this.
    pub job_lease_ms: u64,
    /// Most devices a job sends to per batch.
    pub job_batch_size: usize,
    /// How often each admin process looks for jobs to send or settle.
    pub job_poll_interval_ms: u64,
}

/// `[bus]` (both backends).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusSettings {
    /// Commands queued per device.
    pub queue_max_len: usize,
    /// Telemetry stream partitions.
    pub telemetry_partitions: u32,
    /// Records kept per partition.
    pub telemetry_max_len: usize,
    /// How long a Redis call may take, reconnecting included, before it fails.
    pub redis_command_timeout_ms: u64,
    /// How long a job's per-device outcomes are kept after their last change.
    pub job_retention_ms: u64,
    /// Frames kept per watched fan-out channel for app clients that reconnect (0: none).
    pub history_size: usize,
    /// How long those frames are kept, and a channel stays watched after its last
    /// subscriber left.
    pub history_ttl_ms: u64,
    /// Records kept in the alerts stream (approximately, on Redis).
    pub alerts_max_len: usize,
}

/// A list from the environment with its items trimmed and empty ones dropped.
fn trimmed(v: &[String]) -> Vec<String> {
    v.iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:8081".into(),
            internal_listen: "127.0.0.1:9090".into(),
            node_id: String::new(),
            api_key: String::new(),
            redis_urls: Vec::new(),
            jwt_keys: None,
            otlp_endpoint: None,
            log_format: "text".into(),
            gateway: GatewaySettings::default(),
            admin: AdminSettings::default(),
            bus: BusSettings::default(),
            mqtt: MqttSettings::default(),
            tls: TlsSettings::default(),
            jwt: JwtSettings::default(),
            access: AccessSettings::default(),
        }
    }
}

impl Default for GatewaySettings {
    fn default() -> Self {
        let g = GatewayConfig::default();
        Self {
            auth_timeout_ms: ms(g.auth_timeout),
            heartbeat_ms: ms(g.heartbeat),
            idle_timeout_ms: ms(g.idle_timeout),
            ack_timeout_ms: ms(g.ack_timeout),
            max_ack_backoff_ms: ms(g.max_ack_backoff),
            max_attempts: g.max_attempts,
            max_connections: 0,
            max_pending_auth: g.max_pending_auth,
            max_frame_bytes: g.limits.max_frame_bytes,
            max_skew_ms: g.limits.max_skew_ms,
            replay_window_ms: g.limits.replay_window_ms,
            max_batch_items: g.limits.max_batch_items,
            rate_limit_per_second: g.rate_limit_per_second,
            rate_limit_burst: g.rate_limit_burst,
            outbox_capacity: g.outbox_capacity,
            inflight_window: g.inflight_window,
            write_timeout_ms: ms(g.write_timeout),
            read_buffer_bytes: g.read_buffer_bytes,
            drain_period_ms: ms(g.drain_period),
            node_ttl_ms: ms(g.node_ttl),
            qos2_ttl_ms: ms(g.qos2_ttl),
            expiry_sweep_interval_ms: ms(g.expiry_sweep_interval),
            app_max_subscriptions: g.app.max_subscriptions,
            app_max_connections_per_principal: g.app.max_connections_per_principal,
            app_queue_bytes: g.app.queue_bytes,
            alert_rules_refresh_ms: ms(g.alert_rules_refresh),
        }
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        let a = AdminConfig::default();
        Self {
            default_ttl_ms: ms(a.default_ttl),
            max_ttl_ms: ms(a.max_ttl),
            max_wait_ms: ms(a.max_wait),
            token_ttl_ms: ms(a.token_ttl),
            token_keys: None,
            audit_signing_key: None,
            audit_verify_keys: Vec::new(),
            audit_checkpoint_interval_ms: ms(a.audit_checkpoint_interval),
            max_body_bytes: a.max_body_bytes,
            shadow_max_bytes: a.shadow_max_bytes,
            job_lease_ms: ms(a.job_lease),
            job_batch_size: a.job_batch_size,
            job_poll_interval_ms: ms(a.job_poll_interval),
        }
    }
}

impl Default for BusSettings {
    fn default() -> Self {
        let b = MemoryBusConfig::default();
        Self {
            queue_max_len: b.queue_max_len,
            telemetry_partitions: b.telemetry_partitions,
            telemetry_max_len: b.telemetry_max_len,
            redis_command_timeout_ms: ms(RedisBusConfig::default().command_timeout),
            job_retention_ms: ms(b.job_retention),
            history_size: b.history.size,
            history_ttl_ms: ms(b.history.ttl),
            alerts_max_len: b.alerts_max_len,
        }
    }
}

/// Options every role takes; each is also an environment variable and a config-file key.
#[derive(Debug, Clone, Args)]
pub struct Overrides {
    /// TOML config file.
    #[arg(long, env = "FLEETGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The MQTT bridge's options.
    #[command(flatten)]
    pub mqtt: MqttOverrides,
    /// The listeners' TLS options.
    #[command(flatten)]
    pub tls: TlsOverrides,
    /// Device JWT options.
    #[command(flatten)]
    pub jwt: JwtOverrides,
    /// Proxy trust and failed-authentication limits.
    #[command(flatten)]
    pub access: AccessOverrides,
    /// Public WebSocket listener (port 0 = any free port).
    #[arg(long, env = "FLEETGATE_LISTEN")]
    pub listen: Option<String>,
    /// Admin REST listener.
    #[arg(long, env = "FLEETGATE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Internal listener (/metrics, /healthz, /readyz).
    #[arg(long, env = "FLEETGATE_INTERNAL_LISTEN")]
    pub internal_listen: Option<String>,
    /// Bootstrap admin API key.
    #[arg(long, env = "FLEETGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Comma-separated Redis shard URLs; unset = memory bus.
    #[arg(long, env = "FLEETGATE_REDIS_URLS", value_delimiter = ',')]
    pub redis_urls: Option<Vec<String>>,
    /// This node's ID.
    #[arg(long, env = "FLEETGATE_NODE_ID")]
    pub node_id: Option<String>,
    /// JWT key file.
    #[arg(long, env = "FLEETGATE_JWT_KEYS")]
    pub jwt_keys: Option<PathBuf>,
    /// OTLP collector endpoint.
    #[arg(long, env = "FLEETGATE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `text` or `json`.
    #[arg(long, env = "FLEETGATE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// First-frame auth deadline, ms.
    #[arg(long, env = "FLEETGATE_AUTH_TIMEOUT_MS")]
    pub auth_timeout_ms: Option<u64>,
    /// Server ping interval, ms.
    #[arg(long, env = "FLEETGATE_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Idle time that closes a session with 4001, ms.
    #[arg(long, env = "FLEETGATE_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// First command retransmit delay, ms.
    #[arg(long, env = "FLEETGATE_ACK_TIMEOUT_MS")]
    pub ack_timeout_ms: Option<u64>,
    /// Deliveries before a command fails.
    #[arg(long, env = "FLEETGATE_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// Authenticated device sessions per node (0 = sized from memory and open-file limit).
    #[arg(long, env = "FLEETGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Sockets waiting for their auth frame, on top of max connections.
    #[arg(long, env = "FLEETGATE_MAX_PENDING_AUTH")]
    pub max_pending_auth: Option<usize>,
    /// Largest frame, bytes.
    #[arg(long, env = "FLEETGATE_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Sustained messages per second per device.
    #[arg(long, env = "FLEETGATE_RATE_LIMIT_PER_SECOND")]
    pub rate_limit_per_second: Option<u32>,
    /// Burst above the sustained rate.
    #[arg(long, env = "FLEETGATE_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
    /// Drain period on SIGTERM, ms.
    #[arg(long, env = "FLEETGATE_DRAIN_PERIOD_MS")]
    pub drain_period_ms: Option<u64>,
    /// A socket write blocked this long drops the device as a slow consumer, ms.
    #[arg(long, env = "FLEETGATE_WRITE_TIMEOUT_MS")]
    pub write_timeout_ms: Option<u64>,
    /// Membership lifetime, ms: a node silent this long is dead and its devices offline.
    #[arg(long, env = "FLEETGATE_NODE_TTL_MS")]
    pub node_ttl_ms: Option<u64>,
    /// How long a Redis call may take, reconnecting included, ms.
    #[arg(long, env = "FLEETGATE_REDIS_COMMAND_TIMEOUT_MS")]
    pub redis_command_timeout_ms: Option<u64>,
    /// Lifetime of a user token, ms.
    #[arg(long, env = "FLEETGATE_ADMIN_TOKEN_TTL_MS")]
    pub admin_token_ttl_ms: Option<u64>,
    /// TOML file of HS256 user token keys (`[[keys]] kid, secret`; the first signs).
    #[arg(long, env = "FLEETGATE_ADMIN_TOKEN_KEYS")]
    pub admin_token_keys: Option<PathBuf>,
    /// PKCS#8 PEM Ed25519 key that signs audit checkpoints.
    #[arg(long, env = "FLEETGATE_AUDIT_SIGNING_KEY")]
    pub audit_signing_key: Option<PathBuf>,
    /// Comma-separated SPKI PEM public keys of earlier audit signing keys.
    #[arg(long, env = "FLEETGATE_AUDIT_VERIFY_KEYS", value_delimiter = ',')]
    pub audit_verify_keys: Option<Vec<PathBuf>>,
    /// How often the audit log's head is signed, ms.
    #[arg(long, env = "FLEETGATE_AUDIT_CHECKPOINT_INTERVAL_MS")]
    pub audit_checkpoint_interval_ms: Option<u64>,
    /// Largest admin request body, bytes (larger: 413).
    #[arg(long, env = "FLEETGATE_ADMIN_MAX_BODY_BYTES")]
    pub admin_max_body_bytes: Option<usize>,
    /// Longest `waitMs` a command request may ask for, ms (at most 120000).
    #[arg(long, env = "FLEETGATE_ADMIN_MAX_WAIT_MS")]
    pub admin_max_wait_ms: Option<u64>,
    /// Largest shadow document a desired patch may make, bytes (larger: 413).
    #[arg(long, env = "FLEETGATE_SHADOW_MAX_BYTES")]
    pub shadow_max_bytes: Option<usize>,
    /// A job's lease, ms: a job whose admin process died is taken over after this.
    #[arg(long, env = "FLEETGATE_JOB_LEASE_MS")]
    pub job_lease_ms: Option<u64>,
    /// Most devices a job sends to per batch.
    #[arg(long, env = "FLEETGATE_JOB_BATCH_SIZE")]
    pub job_batch_size: Option<usize>,
    /// How often each admin process looks for jobs to send or settle, ms.
    #[arg(long, env = "FLEETGATE_JOB_POLL_INTERVAL_MS")]
    pub job_poll_interval_ms: Option<u64>,
    /// How long a job's per-device outcomes are kept after their last change, ms.
    #[arg(long, env = "FLEETGATE_JOB_RETENTION_MS")]
    pub job_retention_ms: Option<u64>,
    /// Frames kept per watched channel for app clients that reconnect.
    #[arg(long, env = "FLEETGATE_HISTORY_SIZE")]
    pub history_size: Option<usize>,
    /// How long channel history is kept, ms.
    #[arg(long, env = "FLEETGATE_HISTORY_TTL_MS")]
    pub history_ttl_ms: Option<u64>,
    /// Channels one /v1/app connection may subscribe to.
    #[arg(long, env = "FLEETGATE_APP_MAX_SUBSCRIPTIONS")]
    pub app_max_subscriptions: Option<usize>,
    /// /v1/app connections per principal on a node.
    #[arg(long, env = "FLEETGATE_APP_MAX_CONNECTIONS_PER_PRINCIPAL")]
    pub app_max_connections_per_principal: Option<usize>,
    /// Bytes queued for one /v1/app connection before it is closed with 4008.
    #[arg(long, env = "FLEETGATE_APP_QUEUE_BYTES")]
    pub app_queue_bytes: Option<usize>,
    /// How often a node re-reads the alert rules, ms.
    #[arg(long, env = "FLEETGATE_ALERT_RULES_REFRESH_MS")]
    pub alert_rules_refresh_ms: Option<u64>,
    /// Records kept in the alerts stream.
    #[arg(long, env = "FLEETGATE_ALERTS_MAX_LEN")]
    pub alerts_max_len: Option<usize>,
}

impl Settings {
    /// Defaults, then the file, then env and flags.
    ///
    /// # Errors
    /// An unreadable or invalid file, or an invalid combination of values.
    pub fn load(o: &Overrides) -> anyhow::Result<Self> {
        let mut s = match &o.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let s: Settings =
                    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
                if !s.api_key.is_empty() {
                    crate::secret_files::refuse_world_readable(path)?;
                }
                s
            }
            None => Settings::default(),
        };
        macro_rules! set {
            ($($src:ident => $($dst:ident).+),* $(,)?) => {
                $(if let Some(v) = o.$src.clone() { s.$($dst).+ = v.into(); })*
            };
        }
        set!(
            listen => listen, admin_listen => admin_listen, internal_listen => internal_listen,
            api_key => api_key, node_id => node_id, log_format => log_format,
            auth_timeout_ms => gateway.auth_timeout_ms, heartbeat_ms => gateway.heartbeat_ms,
            idle_timeout_ms => gateway.idle_timeout_ms, ack_timeout_ms => gateway.ack_timeout_ms,
            max_attempts => gateway.max_attempts, max_connections => gateway.max_connections,
            max_pending_auth => gateway.max_pending_auth,
            max_frame_bytes => gateway.max_frame_bytes,
            rate_limit_per_second => gateway.rate_limit_per_second,
            rate_limit_burst => gateway.rate_limit_burst, drain_period_ms => gateway.drain_period_ms,
            write_timeout_ms => gateway.write_timeout_ms, node_ttl_ms => gateway.node_ttl_ms,
            redis_command_timeout_ms => bus.redis_command_timeout_ms,
            admin_token_ttl_ms => admin.token_ttl_ms,
            audit_checkpoint_interval_ms => admin.audit_checkpoint_interval_ms,
            admin_max_body_bytes => admin.max_body_bytes,
            admin_max_wait_ms => admin.max_wait_ms,
            shadow_max_bytes => admin.shadow_max_bytes,
            job_lease_ms => admin.job_lease_ms, job_batch_size => admin.job_batch_size,
            job_poll_interval_ms => admin.job_poll_interval_ms,
            job_retention_ms => bus.job_retention_ms,
            history_size => bus.history_size, history_ttl_ms => bus.history_ttl_ms,
            app_max_subscriptions => gateway.app_max_subscriptions,
            app_max_connections_per_principal => gateway.app_max_connections_per_principal,
            app_queue_bytes => gateway.app_queue_bytes,
            alert_rules_refresh_ms => gateway.alert_rules_refresh_ms,
            alerts_max_len => bus.alerts_max_len,
        );
        if o.admin_token_keys.is_some() {
            s.admin.token_keys = o.admin_token_keys.clone();
        }
        if o.audit_signing_key.is_some() {
            s.admin.audit_signing_key = o.audit_signing_key.clone();
        }
        if let Some(keys) = &o.audit_verify_keys {
            s.admin.audit_verify_keys = keys.clone();
        }
        if let Some(v) = &o.redis_urls {
            s.redis_urls = v
                .iter()
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty())
                .collect();
        }
        if o.jwt_keys.is_some() {
            s.jwt_keys = o.jwt_keys.clone();
        }
        if o.otlp_endpoint.is_some() {
            s.otlp_endpoint = o.otlp_endpoint.clone();
        }
        s.mqtt.apply(&o.mqtt);
        s.tls.apply(&o.tls);
        s.jwt.apply(&o.jwt);
        s.access.apply(&o.access);
        if s.node_id.is_empty() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "fleetgate".into());
            s.node_id = format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        }
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.mqtt.validate()?;
        self.tls.validate()?;
        self.jwt.validate()?;
        self.access.validate()?;
        let g = &self.gateway;
        if g.heartbeat_ms == 0 || g.idle_timeout_ms <= g.heartbeat_ms {
            bail!(
                "idle_timeout_ms ({}) must exceed heartbeat_ms ({}) > 0",
                g.idle_timeout_ms,
                g.heartbeat_ms
            );
        }
        if g.auth_timeout_ms == 0 || g.ack_timeout_ms == 0 || g.max_attempts == 0 {
            bail!("auth_timeout_ms, ack_timeout_ms and max_attempts must be positive");
        }
        if g.node_ttl_ms < 300 {
            bail!("node_ttl_ms must be at least 300 (the node refreshes it every third)");
        }
        if g.max_frame_bytes < 1024 {
            bail!("max_frame_bytes must be at least 1024");
        }
        if g.outbox_capacity == 0 || g.inflight_window == 0 || g.rate_limit_burst == 0 {
            bail!("outbox_capacity, inflight_window and rate_limit_burst must be positive");
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            bail!("log_format must be `text` or `json`");
        }
        if self.admin.max_wait_ms > ms(fleetgate_bus::RESULT_TTL) {
            bail!(
                "admin max_wait_ms must be at most {} (how long command results are kept)",
                ms(fleetgate_bus::RESULT_TTL)
            );
        }
        if self.admin.token_ttl_ms < 1000 || self.admin.audit_checkpoint_interval_ms < 100 {
            bail!(
                "admin token_ttl_ms must be at least 1000 and audit_checkpoint_interval_ms at least 100"
            );
        }
        if self.admin.job_lease_ms < 500
            || self.admin.job_batch_size == 0
            || self.admin.job_poll_interval_ms == 0
        {
            bail!(
                "admin job_lease_ms must be at least 500, job_batch_size and job_poll_interval_ms positive"
            );
        }
        if self.admin.max_body_bytes < 1024 {
            bail!("admin max_body_bytes must be at least 1024");
        }
        if self.bus.redis_command_timeout_ms == 0 {
            bail!("redis_command_timeout_ms must be positive");
        }
        if self.gateway.alert_rules_refresh_ms < 100 || self.bus.alerts_max_len == 0 {
            bail!("alert_rules_refresh_ms must be at least 100 and alerts_max_len positive");
        }
        if self.bus.history_size > 10_000 || self.bus.history_ttl_ms < 1000 {
            bail!("history_size must be at most 10000 and history_ttl_ms at least 1000");
        }
        if g.app_max_subscriptions == 0
            || g.app_max_connections_per_principal == 0
            || g.app_queue_bytes < g.max_frame_bytes + 1024
        {
            bail!(
                "app_max_subscriptions and app_max_connections_per_principal must be positive, app_queue_bytes at least max_frame_bytes + 1024"
            );
        }
        if self.node_id.len() > 128 {
            bail!("node_id is longer than 128 bytes");
        }
        Ok(())
    }

    /// The gateway crate's config.
    pub fn gateway_config(&self) -> GatewayConfig {
        let g = &self.gateway;
        let d = Duration::from_millis;
        let mut c = GatewayConfig {
            node_id: self.node_id.clone(),
            auth_timeout: d(g.auth_timeout_ms),
            heartbeat: d(g.heartbeat_ms),
            idle_timeout: d(g.idle_timeout_ms),
            ack_timeout: d(g.ack_timeout_ms),
            max_ack_backoff: d(g.max_ack_backoff_ms),
            max_attempts: g.max_attempts,
            max_connections: g.max_connections,
            max_pending_auth: g.max_pending_auth,
            rate_limit_per_second: g.rate_limit_per_second,
            rate_limit_burst: g.rate_limit_burst,
            outbox_capacity: g.outbox_capacity,
            inflight_window: g.inflight_window,
            write_timeout: d(g.write_timeout_ms),
            read_buffer_bytes: g.read_buffer_bytes,
            drain_period: d(g.drain_period_ms),
            node_ttl: d(g.node_ttl_ms),
            qos2_ttl: d(g.qos2_ttl_ms),
            expiry_sweep_interval: d(g.expiry_sweep_interval_ms),
            app: fleetgate_gateway::config::AppConfig {
                max_subscriptions: g.app_max_subscriptions,
                max_connections_per_principal: g.app_max_connections_per_principal,
                queue_bytes: g.app_queue_bytes,
            },
            alert_rules_refresh: d(g.alert_rules_refresh_ms),
            cert_identity: self.tls.identity_source().unwrap_or_default(),
            expiry_grace: self.jwt.expiry_grace(),
            ..GatewayConfig::default()
        };
        c.limits.max_frame_bytes = g.max_frame_bytes;
        c.limits.max_skew_ms = g.max_skew_ms;
        c.limits.replay_window_ms = g.replay_window_ms;
        c.limits.max_batch_items = g.max_batch_items;
        if c.max_connections == 0 {
            c.max_connections = auto_max_connections(c.max_pending_auth);
        }
        self.access.configure_gateway(&mut c);
        c
    }

    /// The user token keys (`admin.token_keys`), read from their file; none configured is
    /// an empty list (an ephemeral key).
    ///
    /// # Errors
    /// An unreadable or invalid key file.
    pub fn token_keys(&self) -> anyhow::Result<Vec<fleetgate_admin::TokenKey>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct TokenKeyFile {
            keys: Vec<fleetgate_admin::TokenKey>,
        }
        let Some(path) = &self.admin.token_keys else {
            return Ok(Vec::new());
        };
        let text = crate::secret_files::read_secret(path)?;
        let file: TokenKeyFile =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if file.keys.is_empty() {
            bail!("{}: no [[keys]]", path.display());
        }
        Ok(file.keys)
    }

    /// The admin crate's config, with the key files it names read.
    ///
    /// # Errors
    /// An unreadable or invalid key file.
    pub fn admin_config(&self) -> anyhow::Result<AdminConfig> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
        };
        let a = &self.admin;
        let token_keys = self.token_keys()?;
        Ok(AdminConfig {
            node_id: format!("{}-admin", self.node_id),
            api_key: self.api_key.clone(),
            default_ttl: Duration::from_millis(a.default_ttl_ms),
            max_ttl: Duration::from_millis(a.max_ttl_ms),
            max_wait: Duration::from_millis(a.max_wait_ms),
            token_ttl: Duration::from_millis(a.token_ttl_ms),
            token_keys,
            audit_signing_key_pem: a
                .audit_signing_key
                .as_deref()
                .map(crate::secret_files::read_secret)
                .transpose()?,
            audit_verify_keys_pem: a
                .audit_verify_keys
                .iter()
                .map(read)
                .collect::<Result<_, _>>()?,
            audit_checkpoint_interval: Duration::from_millis(a.audit_checkpoint_interval_ms),
            max_body_bytes: a.max_body_bytes,
            shadow_max_bytes: a.shadow_max_bytes,
            job_lease: Duration::from_millis(a.job_lease_ms),
            job_batch_size: a.job_batch_size,
            job_poll_interval: Duration::from_millis(a.job_poll_interval_ms),
            login_throttle: self.access.login_throttle(),
        })
    }

    /// The Redis bus's config (one shard per URL, in the configured order).
    pub fn redis_bus_config(&self) -> RedisBusConfig {
        RedisBusConfig {
            urls: self.redis_urls.clone(),
            queue_max_len: self.bus.queue_max_len,
            telemetry_partitions: self.bus.telemetry_partitions,
            telemetry_max_len: self.bus.telemetry_max_len,
            command_timeout: Duration::from_millis(self.bus.redis_command_timeout_ms),
            job_retention: Duration::from_millis(self.bus.job_retention_ms),
            history: self.history_config(),
            alerts_max_len: self.bus.alerts_max_len,
            ..RedisBusConfig::default()
        }
    }

    /// The memory bus's config.
    pub fn memory_bus_config(&self) -> MemoryBusConfig {
        MemoryBusConfig {
            queue_max_len: self.bus.queue_max_len,
            telemetry_partitions: self.bus.telemetry_partitions,
            telemetry_max_len: self.bus.telemetry_max_len,
            job_retention: Duration::from_millis(self.bus.job_retention_ms),
            history: self.history_config(),
            alerts_max_len: self.bus.alerts_max_len,
            ..MemoryBusConfig::default()
        }
    }

    fn history_config(&self) -> fleetgate_bus::HistoryConfig {
        fleetgate_bus::HistoryConfig {
            size: self.bus.history_size,
            ttl: Duration::from_millis(self.bus.history_ttl_ms),
        }
    }
}

/// Sessions the machine can hold: bounded by memory (about 16 KiB each, busy; the cgroup's
/// limit where one is set) and by the open-file limit (one descriptor each, less the
/// pending-auth sockets and a reserve for listeners, Redis and logs).
fn auto_max_connections(pending: usize) -> usize {
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(1 << 30, |kb| kb * 1024);
    // In a container MemTotal is the host's; the cgroup's limit is what the pod may use.
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|m| m.trim().parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    let mem = mem.min(cgroup);
    let by_mem = GatewayConfig::max_connections_for_memory(mem);
    let by_files = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|soft| soft.parse::<usize>().ok())
        })
        .map_or(usize::MAX, |n| n.saturating_sub(200 + pending).max(100));
    by_mem.min(by_files)
}

#[cfg(test)]
mod tests {
    use super::Settings;

    #[test]
    fn the_defaults_are_valid() {
        Settings::default().validate().unwrap();
    }

    #[test]
    fn a_rest_wait_longer_than_results_are_kept_is_refused() {
        let mut s = Settings::default();
        s.admin.max_wait_ms = super::ms(fleetgate_bus::RESULT_TTL);
        s.validate().unwrap();
        s.admin.max_wait_ms += 1;
        let error = s.validate().unwrap_err().to_string();
        assert!(error.contains("max_wait_ms"), "{error}");
    }

    #[test]
    fn mqtt_defaults_keep_devices_out_and_bad_values_are_refused() {
        let s = Settings::default();
        assert!(s.mqtt.url.is_none());
        assert!(s.mqtt.publish_acl.iter().all(|p| !p.starts_with("devices")));
        let mut bad = Settings::default();
        bad.mqtt.url = Some("mqtts://broker:8883".into());
        let e = format!("{:#}", bad.validate().unwrap_err());
        assert!(e.contains("not supported"), "{e}");
        let mut acl = Settings::default();
        acl.mqtt.subscribe_acl = vec!["a/#/b".into()];
        assert!(acl.validate().is_err());
    }

    #[test]
    fn a_zero_redis_timeout_is_refused() {
        let mut s = Settings::default();
        s.bus.redis_command_timeout_ms = 0;
        assert!(s.validate().is_err());
    }
}
