//! fleetgate admin REST API, first slice: device provisioning, device reads with presence and
//! shadow, commands with QoS / TTL / wait, disconnect and revoke. Authenticated with a
//! bootstrap API key. It reaches gateway nodes only through the [`Bus`].

mod error;
mod handlers;
mod waiters;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use fleetgate_bus::{Bus, BusError};
use subtle::ConstantTimeEq;

pub use error::AppError;

/// Admin API settings; defaults here are the documented ones.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// ID this admin process receives command results under (distinct from any gateway's).
    pub node_id: String,
    /// Bootstrap API key; requests must send `Authorization: Bearer <key>`.
    pub api_key: String,
    /// Command TTL when a request gives none.
    pub default_ttl: Duration,
    /// Longest TTL a request may ask for.
    pub max_ttl: Duration,
    /// Longest `waitMs` a request may ask for.
    pub max_wait: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            node_id: "admin".to_owned(),
            api_key: String::new(),
            default_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(7 * 24 * 3600),
            max_wait: Duration::from_secs(60),
        }
    }
}

/// Why the admin API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No API key (or a short one) was configured.
    #[error("the admin API needs an API key of at least 16 characters (FLEETGATE_API_KEY)")]
    NoApiKey,
    /// The bus refused the result subscription.
    #[error(transparent)]
    Bus(#[from] BusError),
}

pub(crate) struct AdminState {
    pub(crate) config: AdminConfig,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) waiters: waiters::Waiters,
}

/// A running admin API.
#[derive(Clone)]
pub struct Admin {
    state: Arc<AdminState>,
}

impl Admin {
    /// Starts the admin API's background work (the command result listener).
    ///
    /// # Errors
    /// [`StartError`] without a usable API key, or when the bus refuses the subscription.
    pub async fn start(config: AdminConfig, bus: Arc<dyn Bus>) -> Result<Self, StartError> {
        if config.api_key.len() < 16 {
            return Err(StartError::NoApiKey);
        }
        let waiters = waiters::Waiters::start(bus.clone(), &config.node_id).await?;
        Ok(Self {
            state: Arc::new(AdminState {
                config,
                bus,
                waiters,
            }),
        })
    }

    /// The admin REST router (`/v1/...`).
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/v1/devices",
                post(handlers::create_device).get(handlers::list_devices),
            )
            .route("/v1/devices/{id}", get(handlers::get_device))
            .route("/v1/devices/{id}/commands", post(handlers::send_command))
            .route("/v1/devices/{id}/disconnect", post(handlers::disconnect))
            .route("/v1/devices/{id}/revoke", post(handlers::revoke))
            .route("/v1/nodes", get(handlers::list_nodes))
            .fallback(handlers::not_found)
            .layer(middleware::from_fn_with_state(
                self.state.clone(),
                require_api_key,
            ))
            .with_state(self.state.clone())
    }
}

async fn require_api_key(
    State(state): State<Arc<AdminState>>,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = presented
        .is_some_and(|key| bool::from(key.as_bytes().ct_eq(state.config.api_key.as_bytes())));
    if ok {
        Ok(next.run(request).await)
    } else {
        Err(AppError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <API key>",
        ))
    }
}
