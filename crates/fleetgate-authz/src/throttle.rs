//! Throttling of failed authentications, keyed by source address or claimed identity: each
//! key may fail `burst` times, then once per `refill`. A key that has used up its failures is
//! refused before any credential is looked at, so a credential-stuffing client or a
//! reconnect storm with a bad token costs a map lookup per attempt, not a registry read or a
//! signature check.
//!
//! Written here rather than taken from a rate-limiting crate: those limit every request,
//! while this counts only failures (a fleet reconnecting with good credentials is never
//! slowed), and it must bound its memory against keys an attacker invents.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many failures a key may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failures allowed in a row before the key is refused; 0 disables the throttle.
    pub burst: u32,
    /// One more failure is allowed per this much time.
    pub refill: Duration,
    /// Most keys tracked at once. Past it, keys not yet tracked are not throttled (the
    /// other key of an attempt, its address or its identity, still is).
    pub max_keys: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            burst: 10,
            refill: Duration::from_secs(6),
            max_keys: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Failures still allowed, fractional while refilling.
    left: f64,
    at: Instant,
}

const SHARDS: usize = 16;

/// Failure counts by key.
#[derive(Debug)]
pub struct FailureThrottle {
    config: ThrottleConfig,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<String, Bucket>>>,
}

impl FailureThrottle {
    /// A throttle with `config`.
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, HashMap<String, Bucket>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> Bucket {
        let gained = now.duration_since(bucket.at).as_secs_f64() / self.config.refill.as_secs_f64();
        Bucket {
            left: (bucket.left + gained).min(f64::from(self.config.burst)),
            at: now,
        }
    }

    /// `Err(retry_after)` when `key` has no failures left: refuse the attempt unexamined.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.config.burst == 0 {
            return Ok(());
        }
        let shard = self.shard(key);
        let Some(bucket) = shard.get(key) else {
            return Ok(());
        };
        let bucket = self.refilled(*bucket, now);
        if bucket.left >= 1.0 {
            Ok(())
        } else {
            Err(self.config.refill.mul_f64(1.0 - bucket.left))
        }
    }

    /// Counts a failed attempt of `key`.
    pub fn failed(&self, key: &str) {
        self.failed_at(key, Instant::now());
    }

    fn failed_at(&self, key: &str, now: Instant) {
        if self.config.burst == 0 {
            return;
        }
        let per_shard = self.config.max_keys.div_ceil(SHARDS).max(1);
        let mut shard = self.shard(key);
        if let Some(bucket) = shard.get_mut(key) {
            let mut b = self.refilled(*bucket, now);
            b.left = (b.left - 1.0).max(0.0);
            *bucket = b;
            return;
        }
        if shard.len() >= per_shard {
            // Keys whose failures have all grown back carry no information: drop them.
            let full = f64::from(self.config.burst);
            shard.retain(|_, b| self.refilled(*b, now).left < full);
            if shard.len() >= per_shard {
                return;
            }
        }
        let left = f64::from(self.config.burst) - 1.0;
        shard.insert(key.to_owned(), Bucket { left, at: now });
    }

    /// Forgets `key`'s failures (a device that authenticated is not a guessing attacker).
    pub fn succeeded(&self, key: &str) {
        if self.config.burst != 0 {
            self.shard(key).remove(key);
        }
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The throttle key of a source address: the address itself for IPv4, its /64 for IPv6 (one
/// host holds a whole /64 and could otherwise rotate through it).
pub fn source_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("ip:{v4}"),
            None => {
                let s = v6.segments();
                format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(burst: u32, refill_ms: u64, max_keys: usize) -> FailureThrottle {
        FailureThrottle::new(ThrottleConfig {
            burst,
            refill: Duration::from_millis(refill_ms),
            max_keys,
        })
    }

    #[test]
    fn a_key_is_refused_after_its_burst_and_others_are_not() {
        let t = throttle(3, 60_000, 100);
        for _ in 0..3 {
            assert!(t.check("ip:10.0.0.1").is_ok());
            t.failed("ip:10.0.0.1");
        }
        let wait = t.check("ip:10.0.0.1").unwrap_err();
        assert!(
            wait > Duration::from_secs(59) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert!(t.check("ip:10.0.0.2").is_ok());
        t.succeeded("ip:10.0.0.1");
        assert!(t.check("ip:10.0.0.1").is_ok());
    }

    #[test]
    fn failures_grow_back() {
        let t = throttle(2, 1_000, 100);
        let start = Instant::now();
        t.failed_at("k", start);
        t.failed_at("k", start);
        assert!(t.check_at("k", start + Duration::from_millis(500)).is_err());
        assert!(
            t.check_at("k", start + Duration::from_millis(1_001))
                .is_ok()
        );
        t.failed_at("k", start + Duration::from_millis(1_001));
        assert!(
            t.check_at("k", start + Duration::from_millis(1_002))
                .is_err()
        );
    }

    #[test]
    fn memory_is_bounded_and_a_zero_burst_disables() {
        let t = throttle(5, 60_000, 64);
        for i in 0..10_000 {
            t.failed(&format!("dev:{i}"));
        }
        assert!(t.len() <= 64, "{}", t.len());
        let off = throttle(0, 1, 10);
        for _ in 0..100 {
            off.failed("k");
        }
        assert!(off.check("k").is_ok() && off.is_empty());
    }

    #[test]
    fn ipv6_sources_are_keyed_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_eq!(
            source_key("::ffff:10.1.2.3".parse().unwrap()),
            "ip:10.1.2.3"
        );
    }
}
