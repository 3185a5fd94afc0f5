//! The SDK's errors.

use fleetgate_protocol::{CloseCode, ErrorCode, MsgId, ProtocolError};
use tokio_tungstenite::tungstenite;

/// What went wrong with a connection or a send.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The options or the request cannot work (bad URL, empty device ID, zero capacity, a
    /// device sending a command...).
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// Transport or WebSocket failure; boxed because it is large and cold.
    #[error("websocket: {0}")]
    WebSocket(#[source] Box<tungstenite::Error>),
    /// The upgrade was answered with an HTTP status other than 101 (401/403 are
    /// [`DeviceError::AuthFailed`] instead).
    #[error("upgrade refused with HTTP {status}")]
    UpgradeRefused {
        /// The HTTP status.
        status: u16,
    },
    /// The gateway refused the credentials (auth_response error, close 4403, HTTP 401/403).
    /// Final: the event loop does not reconnect.
    #[error("authentication failed: {reason}")]
    AuthFailed {
        /// The gateway's words, or the HTTP status.
        reason: String,
    },
    /// The peer closed the WebSocket, or the TCP connection ended (`code` is `None`).
    #[error("connection closed (code {code:?}): {reason}")]
    Closed {
        /// The close code, when a close frame arrived.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
    /// A connect, upgrade or authentication step did not finish in time.
    #[error("timed out during {0}")]
    Timeout(&'static str),
    /// An inbound frame did not decode.
    #[error("bad frame from gateway: {0}")]
    Protocol(#[from] ProtocolError),
    /// A frame arrived that makes no sense at this point (e.g. a message before auth).
    #[error("unexpected {0} frame")]
    UnexpectedFrame(&'static str),
    /// A QoS 1/2 message (or its `rel`) went unanswered through `max_attempts`
    /// transmissions.
    #[error("message {msgid} not acknowledged after {attempts} attempts")]
    AckTimeout {
        /// The message.
        msgid: MsgId,
        /// Transmissions made.
        attempts: u32,
    },
    /// The gateway refused the message with an `error` frame (or an ack carrying
    /// `payload.error`).
    #[error("message {msgid} refused ({code:?}): {message}")]
    Refused {
        /// The message.
        msgid: MsgId,
        /// The error frame's code; `None` for an ack with `payload.error`.
        code: Option<ErrorCode>,
        /// Why.
        message: String,
    },
    /// The event loop has stopped (disconnect, final close, or every client dropped).
    #[error("device event loop stopped")]
    Stopped,
}

impl From<tungstenite::Error> for DeviceError {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Http(resp) => {
                let status = resp.status().as_u16();
                if status == 401 || status == 403 {
                    Self::AuthFailed {
                        reason: format!("HTTP {status} at upgrade"),
                    }
                } else {
                    Self::UpgradeRefused { status }
                }
            }
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                Self::Closed {
                    code: None,
                    reason: "connection closed".into(),
                }
            }
            e => Self::WebSocket(Box::new(e)),
        }
    }
}

impl DeviceError {
    /// The close code, for [`DeviceError::Closed`] (and 4403 for [`DeviceError::AuthFailed`]).
    pub fn close_code(&self) -> Option<u16> {
        match self {
            Self::Closed { code, .. } => *code,
            Self::AuthFailed { .. } => Some(CloseCode::AuthFailed.as_u16()),
            _ => None,
        }
    }
}
