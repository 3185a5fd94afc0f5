//! Open-loop pacing shared by many tasks: the k-th caller may start at `start + k / rate`,
//! whenever the previous ones finish, so a slow server shows up as latency rather than as a
//! lower offered rate.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Hands out start times at a fixed rate; the clock starts with the first caller.
#[derive(Debug)]
pub struct Pacer {
    interval: Option<Duration>,
    /// How long after the first caller slot 0 is.
    phase: Duration,
    start: OnceLock<Instant>,
    next: AtomicU64,
}

impl Pacer {
    /// `rate` starts per second; 0 means no pacing.
    pub fn new(rate: f64) -> Self {
        Pacer {
            interval: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)),
            phase: Duration::ZERO,
            start: OnceLock::new(),
            next: AtomicU64::new(0),
        }
    }

    /// Like [`Pacer::new`], with slot 0 at a random point of the first interval: many
    /// devices that start together then send spread out, as a real fleet does, instead of
    /// all at the same instant once per interval (bursts that measure the burst, not the
    /// rate).
    pub fn with_random_phase(rate: f64) -> Self {
        let mut p = Pacer::new(rate);
        if let Some(i) = p.interval {
            p.phase = i.mul_f64(rand::random::<f64>());
        }
        p
    }

    /// When slot `k` may start, `None` when unpaced.
    pub fn slot(&self, k: u64) -> Option<Instant> {
        let start = *self.start.get_or_init(|| Instant::now() + self.phase);
        self.interval.map(|i| start + i.mul_f64(k as f64))
    }

    /// Takes the next slot if its time has come (always when unpaced): lets a caller that
    /// is behind its schedule start several at once.
    pub fn take_due(&self) -> bool {
        let k = self.next.load(Ordering::Relaxed);
        let due = self.slot(k).is_none_or(|at| at <= Instant::now());
        due && self
            .next
            .compare_exchange(k, k + 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Takes the next slot and waits for its time.
    pub async fn wait(&self) {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(at) = self.slot(k) {
            tokio::time::sleep_until(at).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_evenly_spaced_from_the_first_call() {
        let p = Pacer::new(4.0);
        let s0 = p.slot(0).unwrap();
        assert_eq!(p.slot(4).unwrap() - s0, Duration::from_secs(1));
        assert_eq!(p.slot(1).unwrap() - s0, Duration::from_millis(250));
        assert!(Pacer::new(0.0).slot(10).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_random_phase_stays_within_the_first_interval() {
        let t0 = Instant::now();
        for _ in 0..50 {
            let p = Pacer::with_random_phase(10.0);
            let s0 = p.slot(0).unwrap();
            assert!(s0 >= t0 && s0 < t0 + Duration::from_millis(100));
            assert_eq!(p.slot(1).unwrap() - s0, Duration::from_millis(100));
        }
        assert!(Pacer::with_random_phase(0.0).slot(0).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn only_slots_whose_time_has_come_are_taken_at_once() {
        let p = Pacer::new(10.0);
        p.wait().await;
        assert!(!p.take_due(), "slot 1 is 100 ms away");
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(p.take_due() && p.take_due(), "slots 1 and 2 are due");
        assert!(!p.take_due(), "slot 3 is not");
        let unpaced = Pacer::new(0.0);
        assert!((0..100).all(|_| unpaced.take_due()));
    }

    #[tokio::test(start_paused = true)]
    async fn callers_take_consecutive_slots() {
        let p = Pacer::new(10.0);
        let t0 = tokio::time::Instant::now();
        for _ in 0..5 {
            p.wait().await;
        }
        // Slots 0..4 at 10/s: the fifth starts 400 ms after the first.
        assert_eq!(t0.elapsed(), Duration::from_millis(400));
    }
}
