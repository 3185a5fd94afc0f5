//! Protocol errors: what a peer can get wrong, and how the gateway answers each.

use crate::{CloseCode, ErrorCode};

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Not JSON / not Protobuf / wrong shape.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// `type` names no frame of protocol v1.
    #[error("unknown frame type `{0}`")]
    UnknownType(String),
    /// msgid is not 1-64 characters of `[A-Za-z0-9_-]`.
    #[error("msgid must be 1-64 characters of [A-Za-z0-9_-]")]
    BadMsgId,
    /// qos is not 0, 1 or 2.
    #[error("qos must be 0, 1 or 2")]
    BadQos,
    /// `from` differs from the authenticated device ID.
    #[error("`from` does not match the authenticated device")]
    SpoofedFrom,
    /// The frame type is not accepted in this direction or state.
    #[error("frame type `{0}` not accepted here")]
    UnexpectedType(&'static str),
    /// A batch has too many items, or nests batches or commands.
    #[error("bad batch: {0}")]
    BadBatch(String),
    /// `timestamp` is outside the skew window.
    #[error("timestamp is {skew_ms} ms away from server time")]
    ClockSkew {
        /// Sender's clock minus ours.
        skew_ms: i64,
    },
    /// The msgid was seen before inside the replay window (without `dup`).
    #[error("msgid seen before inside the replay window")]
    Replay,
    /// The frame exceeds `max_frame_bytes`.
    #[error("frame of {size} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// Frame size.
        size: usize,
        /// The limit.
        max: usize,
    },
}

impl ProtocolError {
    /// Whether the session must end: `Some(code)` to close, `None` to answer with an `error`
    /// frame and keep the session.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            Self::ClockSkew { .. } | Self::Replay => None,
            Self::TooLarge { .. } => Some(CloseCode::TooBig),
            _ => Some(CloseCode::ProtocolError),
        }
    }

    /// A short reason for a close frame: never the peer's input (a parser's message quotes
    /// it) and never longer than [`crate::MAX_CLOSE_REASON`].
    pub fn close_reason(&self) -> String {
        match self {
            Self::Malformed(_) => "malformed frame".to_owned(),
            Self::UnknownType(_) => "unknown frame type".to_owned(),
            Self::BadBatch(_) => "bad batch".to_owned(),
            other => crate::close_reason(&other.to_string()),
        }
    }

    /// The code for an `error` frame.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::ClockSkew { .. } => ErrorCode::ClockSkew,
            Self::Replay => ErrorCode::Replay,
            Self::UnexpectedType(_) | Self::UnknownType(_) => ErrorCode::UnsupportedType,
            _ => ErrorCode::Malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_never_quote_the_input() {
        let input = "x".repeat(500);
        for error in [
            ProtocolError::Malformed(format!("expected value at `{input}`")),
            ProtocolError::UnknownType(input.clone()),
            ProtocolError::BadBatch(input.clone()),
        ] {
            let reason = error.close_reason();
            assert!(!reason.contains("xx"), "{reason}");
            assert!(reason.len() <= crate::MAX_CLOSE_REASON);
        }
        assert_eq!(
            ProtocolError::MissingField("msgid").close_reason(),
            "missing field `msgid`"
        );
    }
}
