//! Message ID generation: a random per-client prefix plus a counter, so IDs stay unique
//! across restarts (the gateway's replay window spans reconnects) without coordination.

use std::sync::atomic::{AtomicU64, Ordering};

use fleetgate_protocol::MsgId;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Base62 digits of `u64::MAX`; fixed width keeps the prefix and counter apart.
const PREFIX_LEN: usize = 11;

/// Generates msgids `<11 base62 chars of a random u64>-<base62 counter>`, at most 23
/// characters of `[A-Za-z0-9-]`.
#[derive(Debug)]
pub struct MsgIdGen {
    prefix: [u8; PREFIX_LEN],
    counter: AtomicU64,
}

impl MsgIdGen {
    /// A generator with a random prefix.
    pub fn new() -> Self {
        Self::with_prefix(rand::random())
    }

    /// A generator with a chosen prefix (tests).
    pub fn with_prefix(prefix: u64) -> Self {
        let mut buf = [b'0'; PREFIX_LEN];
        let mut n = prefix;
        for slot in buf.iter_mut().rev() {
            *slot = ALPHABET[(n % 62) as usize];
            n /= 62;
        }
        Self {
            prefix: buf,
            counter: AtomicU64::new(0),
        }
    }

    /// The next msgid; one allocation of at most 23 bytes.
    pub fn next_id(&self) -> MsgId {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut digits = [0u8; PREFIX_LEN];
        let mut len = 0;
        let mut m = n;
        loop {
            digits[len] = ALPHABET[(m % 62) as usize];
            len += 1;
            m /= 62;
            if m == 0 {
                break;
            }
        }
        let mut s = String::with_capacity(PREFIX_LEN + 1 + len);
        s.extend(self.prefix.iter().map(|&b| b as char));
        s.push('-');
        s.extend(digits[..len].iter().rev().map(|&b| b as char));
        MsgId::new(s).expect("base62 with a dash is a valid msgid")
    }
}

impl Default for MsgIdGen {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_valid_short_and_unique() {
        let g = MsgIdGen::new();
        let mut seen = HashSet::new();
        for _ in 0..100_000 {
            let id = g.next_id();
            assert!(id.as_str().len() <= 23, "{id}");
            assert!(MsgId::new(id.as_str()).is_ok());
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn counter_is_base62_after_fixed_prefix() {
        let g = MsgIdGen::with_prefix(0);
        assert_eq!(g.next_id().as_str(), "00000000000-0");
        for _ in 1..62 {
            g.next_id();
        }
        assert_eq!(g.next_id().as_str(), "00000000000-10");
        let max = MsgIdGen::with_prefix(u64::MAX);
        assert_eq!(max.next_id().as_str(), "LygHa16AHYF-0");
    }

    #[test]
    fn prefixes_differ_between_generators() {
        let a = MsgIdGen::new().next_id();
        let b = MsgIdGen::new().next_id();
        assert_ne!(a, b);
    }

    #[test]
    fn counter_wraps_to_full_width() {
        let g = MsgIdGen::with_prefix(7);
        g.counter.store(u64::MAX, Ordering::Relaxed);
        let id = g.next_id();
        assert_eq!(id.as_str().len(), 23);
    }
}
