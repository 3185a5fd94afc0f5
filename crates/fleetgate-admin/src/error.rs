//! The admin API's error answers: `{"error":{"code","message"}}` with a 4xx/5xx status.
//! Internals are logged once here, never shown to clients.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleetgate_audit::AuditError;
use fleetgate_bus::BusError;
use serde::Serialize;
use tracing::warn;

use crate::pipeline::Note;

/// An error answer.
#[derive(Debug)]
pub struct AppError {
    status: StatusCode,
    code: &'static str,
    message: String,
    msgid: Option<String>,
    current_version: Option<u64>,
    reason: Option<&'static str>,
    retry_after: Option<std::time::Duration>,
}

/// The error body (the OpenAPI document's shared error shape).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    /// Stable, machine-readable code (`bad_request`, `not_found`, `forbidden`, ...).
    pub code: String,
    /// For people.
    pub message: String,
    /// The command the error is about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msgid: Option<String>,
    /// On a version conflict: the current version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
}

impl AppError {
    /// An error with a status, a stable code and a message for people.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            msgid: None,
            current_version: None,
            reason: None,
            retry_after: None,
        }
    }

    /// Sends `Retry-After` (whole seconds, rounded up).
    pub fn with_retry_after(mut self, wait: std::time::Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// Names the command the error is about, so the caller can follow it up.
    pub fn with_msgid(mut self, msgid: impl Into<String>) -> Self {
        self.msgid = Some(msgid.into());
        self
    }

    /// On a version conflict: tells the caller the current version.
    pub fn with_current_version(mut self, version: u64) -> Self {
        self.current_version = Some(version);
        self
    }

    /// What the audit log records as the reason, when it says more than the code.
    pub fn with_reason(mut self, reason: &'static str) -> Self {
        self.reason = Some(reason);
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

    /// 409 with code `exists`.
    pub fn exists(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "exists", message)
    }

    /// 403 with code `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
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

impl From<AuditError> for AppError {
    fn from(error: AuditError) -> Self {
        warn!(message = "audit log unavailable", %error);
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            "the audit log cannot be written, so nothing was changed; retry later",
        )
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                msgid: self.msgid.clone(),
                current_version: self.current_version,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response.extensions_mut().insert(Note {
            reason: Some(self.reason.unwrap_or(self.code)),
            msgid: self.msgid,
            ..Note::default()
        });
        response
    }
}
