//! The admin API's error answers: `{"error":{"code","message"}}` with a 4xx/5xx status.
//! Internals are logged once here, never shown to clients.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleetgate_bus::BusError;
use tracing::warn;

/// An error answer.
#[derive(Debug)]
pub struct AppError {
    status: StatusCode,
    code: &'static str,
    message: String,
    msgid: Option<String>,
}

impl AppError {
    /// An error with a status, a stable code and a message for people.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            msgid: None,
        }
    }

    /// Names the command the error is about, so the caller can follow it up.
    pub fn with_msgid(mut self, msgid: impl Into<String>) -> Self {
        self.msgid = Some(msgid.into());
        self
    }

    /// 400 with code `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404 with code `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<BusError> for AppError {
    fn from(error: BusError) -> Self {
        match error {
            BusError::QueueFull { max } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!("the device's command queue holds {max} commands already"),
            ),
            other => {
                warn!(message = "bus call failed", error = %other);
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "bus_unavailable",
                    "the bus is unavailable; retry later",
                )
            }
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let mut error = serde_json::json!({ "code": self.code, "message": self.message });
        if let Some(msgid) = self.msgid {
            error["msgid"] = msgid.into();
        }
        (self.status, Json(serde_json::json!({ "error": error }))).into_response()
    }
}
