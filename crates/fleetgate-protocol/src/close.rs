//! WebSocket close codes used by the gateway, as one closed enum.

/// Every close code the gateway sends (DESIGN.md, "Close codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// The session ended normally (for example an operator disconnect).
    Normal = 1000,
    /// The server is going away.
    GoingAway = 1001,
    /// A frame exceeded `max_frame_bytes`.
    TooBig = 1009,
    /// An internal error; the device should come back later.
    InternalError = 1011,
    /// The node is draining; reconnect elsewhere, with jitter.
    Draining = 1012,
    /// The node is at capacity or its bus is unavailable; try again later.
    TryAgainLater = 1013,
    /// No frame or pong within `idle_timeout`.
    HeartbeatTimeout = 4001,
    /// The peer broke the protocol (garbage, spoofed `from`, wrong first frame).
    ProtocolError = 4400,
    /// Authentication failed (unknown device, wrong secret, ID mismatch, bad token).
    AuthFailed = 4403,
    /// No auth frame within `auth_timeout`.
    AuthTimeout = 4408,
    /// A newer connection of the same device replaced this one.
    Replaced = 4409,
    /// The device's credentials were revoked.
    Revoked = 4410,
    /// An app client fell behind: its queue reached its byte limit. It may reconnect and
    /// recover from its last offsets.
    SlowConsumer = 4008,
    /// The device exceeded its message rate limit (or an app principal its connections).
    RateLimited = 4429,
}

impl CloseCode {
    /// The numeric code on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// Parses a numeric close code; `None` for codes fleetgate never sends.
    pub fn from_u16(code: u16) -> Option<Self> {
        Some(match code {
            1000 => Self::Normal,
            1001 => Self::GoingAway,
            1009 => Self::TooBig,
            1011 => Self::InternalError,
            1012 => Self::Draining,
            1013 => Self::TryAgainLater,
            4001 => Self::HeartbeatTimeout,
            4400 => Self::ProtocolError,
            4403 => Self::AuthFailed,
            4408 => Self::AuthTimeout,
            4409 => Self::Replaced,
            4410 => Self::Revoked,
            4008 => Self::SlowConsumer,
            4429 => Self::RateLimited,
            _ => return None,
        })
    }

    /// Whether a client should reconnect after this close (and honour `retry-after`).
    pub fn should_reconnect(self) -> bool {
        !matches!(
            self,
            Self::AuthFailed | Self::Replaced | Self::Revoked | Self::ProtocolError
        )
    }
}

/// Most bytes a close reason may have: a close frame's payload is at most 125 bytes, two of
/// them the code. A longer reason cannot be sent at all, and the peer would see 1006.
pub const MAX_CLOSE_REASON: usize = 123;

/// `text` cut to [`MAX_CLOSE_REASON`] bytes at a character boundary.
pub fn close_reason(text: &str) -> String {
    truncated(text, MAX_CLOSE_REASON).to_owned()
}

fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Formats a close reason that asks the client to wait `retry_after_ms` before reconnecting,
/// truncating `text` so that the whole fits [`MAX_CLOSE_REASON`].
pub fn retry_after_reason(text: &str, retry_after_ms: u64) -> String {
    let suffix = format!("; retry-after={retry_after_ms}");
    let room = MAX_CLOSE_REASON.saturating_sub(suffix.len());
    format!("{}{}", truncated(text, room), suffix)
}

/// Extracts `retry-after=<ms>` from a close reason, if present.
pub fn parse_retry_after(reason: &str) -> Option<u64> {
    let idx = reason.find("retry-after=")?;
    let digits: String = reason[idx + "retry-after=".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in [
            CloseCode::Normal,
            CloseCode::GoingAway,
            CloseCode::TooBig,
            CloseCode::InternalError,
            CloseCode::Draining,
            CloseCode::TryAgainLater,
            CloseCode::HeartbeatTimeout,
            CloseCode::ProtocolError,
            CloseCode::AuthFailed,
            CloseCode::AuthTimeout,
            CloseCode::Replaced,
            CloseCode::Revoked,
            CloseCode::RateLimited,
        ] {
            assert_eq!(CloseCode::from_u16(code.as_u16()), Some(code));
        }
        assert_eq!(CloseCode::from_u16(4999), None);
    }

    #[test]
    fn retry_after_is_parsed_back_and_fits() {
        let reason = retry_after_reason("node draining", 1234);
        assert_eq!(reason, "node draining; retry-after=1234");
        assert_eq!(parse_retry_after(&reason), Some(1234));
        let long = retry_after_reason(&"é".repeat(200), 5);
        assert!(long.len() <= 123);
        assert_eq!(parse_retry_after(&long), Some(5));
        assert_eq!(parse_retry_after("bye"), None);
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        assert_eq!(close_reason("bye"), "bye");
        let long = close_reason(&"é".repeat(100));
        assert!(long.len() <= MAX_CLOSE_REASON && long.len() >= MAX_CLOSE_REASON - 1);
        assert!(long.chars().all(|c| c == 'é'));
    }
}
