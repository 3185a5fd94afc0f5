//! The fleetgate gateway node: device WebSocket sessions (`/v1/device`), app sessions
//! (`/v1/app`: dashboards subscribing to channels), the MQTT bridge for web clients
//! (`/v1/mqtt`), authentication,
//! the QoS engine in both directions, limits, drain, and the internal listener
//! (`/metrics`, `/healthz`, `/readyz`).
//!
//! The node holds no state that matters beyond its sockets: presence, queues, shadows and
//! telemetry live in the [`Bus`]. See docs/ARCHITECTURE.md for the map.

mod alerts;
mod app;
pub mod auth;
pub mod config;
mod http;
mod ingest;
pub mod metrics;
mod mqtt;
mod node;
mod outbound;
mod outbox;
mod registry;
mod session;
mod source;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use fleetgate_bus::Bus;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use app::{AppAccess, AppCommands, CommandLimits};
pub use auth::{
    AuthError, Authenticator, JwtKeySpec, JwtKeys, JwtPolicy, TokenError, secret_digest,
};
pub use config::GatewayConfig;
pub use metrics::Metrics;
pub use mqtt::MqttAccess;
pub use source::TrustedProxies;

/// [`fleetgate_bus::RESULT_TTL`] in the bus's unit.
pub(crate) const RESULT_TTL_MS: u64 = fleetgate_bus::RESULT_TTL.as_millis() as u64;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// State shared by every session of a node.
pub(crate) struct Shared {
    pub(crate) config: GatewayConfig,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) auth: Authenticator,
    pub(crate) sessions: registry::Sessions,
    pub(crate) parked_windows: registry::ParkedWindows,
    /// Presence entries of closed sessions that could not be deleted (the bus was away).
    pub(crate) stale_presence: registry::StalePresence,
    pub(crate) metrics: Arc<Metrics>,
    /// One permit per authenticated session (`max_connections`).
    pub(crate) sessions_capacity: Arc<Semaphore>,
    /// One permit per upgraded socket, authenticated or not (`max_connections +
    /// max_pending_auth`): bounds file descriptors and pre-auth memory.
    pub(crate) sockets_capacity: Arc<Semaphore>,
    /// Every upgraded socket's task, so drain can wait for them (axum's graceful shutdown
    /// does not).
    pub(crate) tracker: TaskTracker,
    pub(crate) draining: AtomicBool,
    pub(crate) bus_ok: AtomicBool,
    pub(crate) started_ms: i64,
    /// `/v1/app`: principals, the fan-out hub, per-principal counts.
    pub(crate) app: app::AppState,
    /// Alert rules, their evaluation counters and the offline watch.
    pub(crate) alerts: alerts::Alerts,
    /// Failed authentications by source address.
    pub(crate) source_throttle: fleetgate_authz::throttle::FailureThrottle,
    /// Failed authentications by device ID.
    pub(crate) device_throttle: fleetgate_authz::throttle::FailureThrottle,
    /// Sockets waiting for their auth frame, by source address.
    pub(crate) pending: Arc<source::PendingPerSource>,
    /// `/v1/mqtt`: set by [`Gateway::with_mqtt`]; unset answers 503.
    pub(crate) mqtt: OnceLock<mqtt::MqttAccess>,
    /// Messages of MQTT devices other nodes passed on, for this node's router.
    pub(crate) mqtt_forwarded: OnceLock<tokio::sync::mpsc::Sender<mqtt::device::Forwarded>>,
}

/// A gateway node, ready to serve.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// Creates a node on `bus`, registering its metrics in `registry`. Devices authenticate
    /// with `jwt` keys or their secrets; `/v1/app` clients as `app` says.
    pub fn new(
        config: GatewayConfig,
        bus: Arc<dyn Bus>,
        jwt: JwtKeys,
        app: AppAccess,
        registry: &mut Registry,
    ) -> Self {
        let metrics = Arc::new(Metrics::default());
        metrics.register(registry);
        let alerts = alerts::Alerts::new(config.alert_offline_watch);
        alerts.metrics.register(registry);
        metrics
            .connections_max
            .set(i64::try_from(config.max_connections).unwrap_or(i64::MAX));
        let shared = Shared {
            sessions_capacity: Arc::new(Semaphore::new(config.max_connections)),
            sockets_capacity: Arc::new(Semaphore::new(
                config
                    .max_connections
                    .saturating_add(config.max_pending_auth),
            )),
            auth: Authenticator::new(bus.clone(), jwt),
            source_throttle: fleetgate_authz::throttle::FailureThrottle::new(
                config.source_auth_throttle,
            ),
            device_throttle: fleetgate_authz::throttle::FailureThrottle::new(
                config.device_auth_throttle,
            ),
            pending: Arc::default(),
            sessions: registry::Sessions::default(),
            parked_windows: registry::ParkedWindows::default(),
            stale_presence: registry::StalePresence::default(),
            app: app::AppState::new(app, app::hub::Hub::new(bus.clone(), metrics.clone())),
            alerts,
            config,
            bus,
            metrics,
            tracker: TaskTracker::new(),
            draining: AtomicBool::new(false),
            bus_ok: AtomicBool::new(true),
            started_ms: now_ms(),
            mqtt: OnceLock::new(),
            mqtt_forwarded: OnceLock::new(),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Serves `/v1/mqtt` through `access.bridge`, registering the bridge's metrics. Call
    /// before [`Gateway::run`]; a second call is ignored.
    pub fn with_mqtt(self, access: MqttAccess, registry: &mut Registry) -> Self {
        registry.register_collector(Box::new(metrics::BridgeMetrics(access.bridge.clone())));
        let _ = self.shared.mqtt.set(access);
        self
    }

    /// The router of the public listener (`/v1/device`, `/v1/app`, `/v1/mqtt`).
    pub fn router(&self) -> axum::Router {
        http::public_router(self.shared.clone())
    }

    /// Whether the node should receive traffic: not draining and its bus answers.
    pub fn is_ready(&self) -> bool {
        !self.shared.draining.load(Ordering::Relaxed) && self.shared.bus_ok.load(Ordering::Relaxed)
    }

    /// Number of authenticated sessions open now.
    pub fn connections(&self) -> usize {
        self.shared.sessions.len()
    }

    /// Serves `listener` until `shutdown` fires, then drains: readiness off, sessions closed
    /// with 1012 spread over the drain period, and waits for every socket task.
    ///
    /// # Errors
    /// When the bus refuses this node's subscription at start, or the listener fails.
    pub async fn run(
        self,
        listener: fleetgate_tls::Acceptor,
        shutdown: CancellationToken,
    ) -> Result<(), std::io::Error> {
        let shared = self.shared.clone();
        listener.set_gate(source::accept_gate(&shared));
        let background = CancellationToken::new();
        let node_tasks = node::start(shared.clone(), background.clone())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let stop_accepting = CancellationToken::new();
        let server = {
            let stop = stop_accepting.clone();
            // The peer (its address, its client certificate) reaches the upgrade handlers.
            let app = self
                .router()
                .into_make_service_with_connect_info::<fleetgate_tls::Peer>();
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            })
        };
        shutdown.cancelled().await;
        node::drain(&shared).await;
        stop_accepting.cancel();
        background.cancel();
        let _ = node_tasks.await;
        match server.await {
            Ok(result) => result,
            Err(join) => Err(std::io::Error::other(join.to_string())),
        }
    }
}

/// The router of the internal listener: `/metrics`, `/healthz`, `/readyz` and `/drain`.
/// `ready` decides readiness (it can combine several roles of one process); `/drain` cancels
/// `shutdown`, exactly as SIGTERM does.
pub fn internal_router(
    registry: Arc<Registry>,
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> axum::Router {
    http::internal_router(registry, ready, shutdown)
}
