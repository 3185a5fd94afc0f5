//! A device session's authentication: the first `auth` frame (with the throttles), the
//! refusal every failure ends with, and the credential expiry and refresh of a live session.

use axum::extract::ws::{Message, WebSocket};
use fleetgate_protocol::{Auth, AuthResponse, CloseCode, Codec, Frame, retry_after_reason};
use tokio::time::Instant;
use tracing::debug;

use super::{Close, Session, bus_unavailable, codec_decode, read_error, send_frame};
use crate::auth::{AuthError, AuthedDevice};
use crate::{Shared, now_ms};

/// Waits for the first frame, which must be `auth`, and checks it.
pub(super) async fn auth_frame(
    shared: &Shared,
    ws: &mut WebSocket,
    codec: Codec,
    routed_id: Option<String>,
    source_key: &str,
) -> Result<AuthedDevice, Close> {
    let first = loop {
        let msg = match tokio::time::timeout(shared.config.auth_timeout, ws.recv()).await {
            Err(_) => {
                return Err(Close::new(
                    CloseCode::AuthTimeout,
                    "no auth frame within the auth timeout",
                ));
            }
            Ok(None) => return Err(Close::new(CloseCode::GoingAway, "closed before auth")),
            Ok(Some(Err(error))) => return Err(read_error(&error)),
            Ok(Some(Ok(msg))) => msg,
        };
        match msg {
            Message::Text(t) => break codec_decode(codec, t.as_bytes()),
            Message::Binary(b) => break codec_decode(codec, &b),
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => return Err(Close::new(CloseCode::Normal, "closed before auth")),
        }
    };
    let auth = match first {
        Ok(Frame::Auth(auth)) => auth,
        Ok(_) => {
            return Err(Close::new(
                CloseCode::ProtocolError,
                "first frame must be auth",
            ));
        }
        Err(error) => return Err(Close::protocol(&error)),
    };
    // Refuse at once while the bus is away rather than after its command timeout: the
    // device retries later, the socket's slot frees now.
    if !shared.bus.connected() {
        return Err(bus_unavailable(shared));
    }
    let device_key = crate::http::device_key(&auth.device_id, source_key);
    if let Err(wait) = shared.device_throttle.check(&device_key) {
        shared.metrics.auth_throttled.inc();
        let reason = retry_after_reason(
            "too many failed authentications",
            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        );
        return Err(Close::new(CloseCode::RateLimited, reason));
    }
    let result = if routed_id.as_deref().is_some_and(|id| id != auth.device_id) {
        Err(AuthError::Mismatch)
    } else {
        shared
            .auth
            .authenticate(Some(&auth.device_id), &auth.token)
            .await
            .and_then(|device| {
                if device.id == auth.device_id {
                    Ok(device)
                } else {
                    Err(AuthError::Mismatch)
                }
            })
    };
    match result {
        Ok(device) => {
            shared.device_throttle.succeeded(&device_key);
            Ok(device)
        }
        Err(AuthError::Unavailable(_)) => Err(bus_unavailable(shared)),
        Err(error) => {
            shared.metrics.auth_failures.inc();
            shared.source_throttle.failed(source_key);
            shared.device_throttle.failed(&device_key);
            Err(refuse(shared, ws, codec, &error).await)
        }
    }
}

/// Tells the device why its credentials were refused and returns the close (4403) that
/// follows. The reason is the error's fixed message, never what the device sent.
pub(super) async fn refuse(
    shared: &Shared,
    ws: &mut WebSocket,
    codec: Codec,
    error: &AuthError,
) -> Close {
    debug!(message = "authentication refused", kind = error.kind());
    let reason = error.to_string();
    let response = AuthResponse::Error {
        timestamp: now_ms(),
        reason: reason.clone(),
    };
    let _ = send_frame(shared, ws, codec, &Frame::AuthResponse(response)).await;
    Close::new(CloseCode::AuthFailed, reason)
}

/// The instant `expires_at_ms` (wall clock) plus `grace` falls on, on the monotonic clock.
pub(crate) fn expiry_instant(
    expires_at_ms: Option<i64>,
    grace: std::time::Duration,
) -> Option<Instant> {
    let left = u64::try_from(expires_at_ms? - now_ms()).unwrap_or(0);
    // Far-future expiries (a ten-year certificate) stay far future without overflowing.
    let left = std::time::Duration::from_millis(left.min(10 * 365 * 86_400_000));
    Some(Instant::now() + left + grace)
}

impl Session {
    /// An `auth` frame on an authenticated session: fresh credentials for the same device
    /// move its expiry. A refused refresh is answered and leaves the session as it was (its
    /// old credentials still hold until they expire).
    pub(super) async fn refresh(&mut self, auth: Auth) -> Result<Vec<Frame>, Close> {
        self.charge(1)?;
        let result = if auth.device_id == self.device {
            self.shared
                .auth
                .authenticate(Some(&self.device), &auth.token)
                .await
        } else {
            Err(AuthError::Mismatch)
        };
        let response = match result {
            Ok(device) => {
                self.expires_at =
                    expiry_instant(device.expires_at_ms, self.shared.config.expiry_grace);
                self.shared.metrics.auth_refreshes.inc();
                AuthResponse::Success {
                    timestamp: now_ms(),
                    session_id: format!("{:016x}", self.conn_id),
                    heartbeat_ms: self.shared.config.heartbeat.as_millis() as u64,
                }
            }
            Err(error) => {
                self.shared.metrics.auth_failures.inc();
                debug!(message = "refresh refused", kind = error.kind());
                AuthResponse::Error {
                    timestamp: now_ms(),
                    reason: error.to_string(),
                }
            }
        };
        Ok(vec![Frame::AuthResponse(response)])
    }
}
