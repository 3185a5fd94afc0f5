//! Reconnect pacing: which closes end the device for good, and how long to wait otherwise.

use std::time::Duration;

use fleetgate_protocol::{CloseCode, parse_retry_after};

/// A server-supplied `retry-after` longer than this is treated as a typo, not obeyed.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Whether the SDK reconnects after the gateway closed with `code` (`None` = the TCP
/// connection ended without a close frame).
///
/// Policy: 4400 (protocol error), 4403 (auth failed) and 4410 (revoked) are final, since
/// retrying cannot succeed and only adds load; 4409 (replaced) is final unless
/// `reconnect_on_replaced`, since two copies of a device would evict each other forever.
/// Everything else, including 1000 (an operator disconnect) and unknown codes, reconnects.
pub fn should_reconnect(code: Option<u16>, reconnect_on_replaced: bool) -> bool {
    match code.and_then(CloseCode::from_u16) {
        Some(CloseCode::Replaced) => reconnect_on_replaced,
        Some(c) => c.should_reconnect(),
        None => true,
    }
}

/// Exponential backoff with full jitter: attempt `n` waits a uniform random delay in
/// `[min, min(max, min * 2^n)]`, which spreads a fleet's reconnect storm over the window.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The upper bound of the next delay.
    pub(crate) fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        if cap <= self.min {
            return self.min;
        }
        let lo = self.min.as_micros() as u64;
        let hi = cap.as_micros() as u64;
        Duration::from_micros(rand::random_range(lo..=hi))
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The delay before reconnecting after a close with `reason`: the server's
    /// `retry-after=<ms>` when it gave one (it already jitters per device), else backoff.
    pub(crate) fn delay_after_close(&mut self, reason: &str) -> Duration {
        match parse_retry_after(reason) {
            Some(ms) => {
                // Still advance, so a server that keeps refusing backs us off further.
                self.attempt = self.attempt.saturating_add(1);
                Duration::from_millis(ms).min(MAX_RETRY_AFTER)
            }
            None => self.next_delay(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_min_and_growing_cap() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(30);
        let mut b = Backoff::new(min, max);
        for n in 0..40u32 {
            let cap = b.cap();
            let expected = min.saturating_mul(1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX));
            assert_eq!(cap, expected.min(max), "attempt {n}");
            for _ in 0..50 {
                let mut probe = b.clone();
                let d = probe.next_delay();
                assert!(
                    d >= min && d <= cap,
                    "attempt {n}: {d:?} outside [{min:?}, {cap:?}]"
                );
            }
            b.next_delay();
        }
        assert_eq!(b.cap(), max);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        for _ in 0..8 {
            b.next_delay();
        }
        let delays: std::collections::HashSet<_> =
            (0..20).map(|_| b.clone().next_delay()).collect();
        assert!(
            delays.len() > 10,
            "full jitter should rarely repeat: {delays:?}"
        );
    }

    #[test]
    fn reset_returns_to_min_cap() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.cap(), Duration::from_millis(10));
    }

    #[test]
    fn retry_after_is_honoured_exactly_and_capped() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(20));
        assert_eq!(
            b.delay_after_close("node draining; retry-after=1500"),
            Duration::from_millis(1500),
            "retry-after wins even above backoff max"
        );
        assert_eq!(
            b.delay_after_close("retry-after=99999999999"),
            MAX_RETRY_AFTER
        );
        let d = b.delay_after_close("bye");
        assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(20));
    }

    #[test]
    fn final_close_codes_do_not_reconnect() {
        for code in [4400, 4403, 4410] {
            assert!(!should_reconnect(Some(code), true), "{code}");
        }
        assert!(!should_reconnect(Some(4409), false));
        assert!(should_reconnect(Some(4409), true));
        for code in [1000, 1001, 1006, 1011, 1012, 1013, 4001, 4408, 4429, 4999] {
            assert!(should_reconnect(Some(code), false), "{code}");
        }
        assert!(should_reconnect(None, false));
    }
}
