//! What a worker counted, in a form that merges across workers: counters, latency histograms
//! and time spans, each under a name. The coordinator adds the workers' tallies up and
//! derives the figures from the sum.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Microsecond latencies with 3 significant digits, up to an hour.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid"))
    }
}

impl Latency {
    /// Records one duration (saturating at the upper bound).
    pub fn record(&mut self, d: Duration) {
        self.0.saturating_record(d.as_micros().max(1) as u64);
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Latency) {
        self.0
            .add(&other.0)
            .expect("histograms with equal bounds always add");
    }

    /// The `q` quantile in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Serialised as `[[micros, count], ...]`, which any tool can read back.
impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(u64, u64)> = self
            .0
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        pairs.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let pairs = Vec::<(u64, u64)>::deserialize(d)?;
        let mut h = Latency::default();
        for (v, n) in pairs {
            h.0.saturating_record_n(v, n);
        }
        Ok(h)
    }
}

/// Earliest and latest wall-clock instants of something, ms since the epoch, so that spans
/// from different processes combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// First occurrence.
    pub first_ms: u64,
    /// Last occurrence.
    pub last_ms: u64,
}

impl Span {
    /// Seconds from first to last.
    pub fn secs(&self) -> f64 {
        self.last_ms.saturating_sub(self.first_ms) as f64 / 1000.0
    }
}

/// Wall-clock now, ms since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A worker's (or the whole run's) counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Event counts by name, e.g. `connected` or `connect_failed:4403`.
    pub counts: BTreeMap<String, u64>,
    /// Latencies by name.
    pub latencies: BTreeMap<String, Latency>,
    /// Time spans by name.
    pub spans: BTreeMap<String, Span>,
}

impl Tally {
    /// Adds `n` to counter `name`.
    pub fn add(&mut self, name: &str, n: u64) {
        if n > 0 {
            *self.counts.entry(name.to_owned()).or_default() += n;
        }
    }

    /// The counter's value (0 when never counted).
    pub fn count(&self, name: &str) -> u64 {
        self.counts.get(name).copied().unwrap_or(0)
    }

    /// Counters whose name starts with `prefix:`, without the prefix.
    pub fn breakdown(&self, prefix: &str) -> BTreeMap<String, u64> {
        let p = format!("{prefix}:");
        self.counts
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&p).map(|r| (r.to_owned(), *v)))
            .collect()
    }

    /// The sum of the counters [`Tally::breakdown`] returns for `prefix`, without building it.
    pub fn total(&self, prefix: &str) -> u64 {
        let p = format!("{prefix}:");
        self.counts
            .iter()
            .filter(|(k, _)| k.starts_with(&p))
            .map(|(_, v)| v)
            .sum()
    }

    /// Records one latency under `name`.
    pub fn latency(&mut self, name: &str, d: Duration) {
        self.latencies.entry(name.to_owned()).or_default().record(d);
    }

    /// The histogram under `name`, if anything was recorded.
    pub fn latencies_of(&self, name: &str) -> Option<&Latency> {
        self.latencies.get(name)
    }

    /// Widens span `name` to include `at_ms`.
    pub fn mark(&mut self, name: &str, at_ms: u64) {
        self.spans
            .entry(name.to_owned())
            .and_modify(|s| {
                s.first_ms = s.first_ms.min(at_ms);
                s.last_ms = s.last_ms.max(at_ms);
            })
            .or_insert(Span {
                first_ms: at_ms,
                last_ms: at_ms,
            });
    }

    /// The span under `name`.
    pub fn span(&self, name: &str) -> Option<Span> {
        self.spans.get(name).copied()
    }

    /// Adds everything `other` counted.
    pub fn merge(&mut self, other: &Tally) {
        for (k, v) in &other.counts {
            self.add(k, *v);
        }
        for (k, h) in &other.latencies {
            self.latencies.entry(k.clone()).or_default().merge(h);
        }
        for (k, s) in &other.spans {
            self.mark(k, s.first_ms);
            self.mark(k, s.last_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_merge_counts_latencies_and_spans() {
        let mut a = Tally::default();
        a.add("connected", 3);
        a.add("connect_failed:4403", 1);
        a.mark("connect", 1_000);
        a.mark("connect", 1_500);
        for ms in 1..=100 {
            a.latency("rtt", Duration::from_millis(ms));
        }
        let mut b = Tally::default();
        b.add("connected", 2);
        b.add("connect_failed:timeout", 4);
        b.mark("connect", 900);
        b.latency("rtt", Duration::from_millis(1000));

        // Through JSON, as between processes.
        let b: Tally = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        a.merge(&b);
        assert_eq!(a.count("connected"), 5);
        assert_eq!(a.count("nothing"), 0);
        let failed = a.breakdown("connect_failed");
        assert_eq!(failed.get("4403"), Some(&1));
        assert_eq!(failed.get("timeout"), Some(&4));
        assert_eq!(a.total("connect_failed"), 5);
        assert_eq!(a.total("nothing"), 0);
        assert_eq!(
            a.span("connect"),
            Some(Span {
                first_ms: 900,
                last_ms: 1_500
            })
        );
        assert_eq!(a.span("connect").unwrap().secs(), 0.6);
        let rtt = a.latencies_of("rtt").unwrap();
        assert_eq!(rtt.0.len(), 101);
        // 3 significant digits: within 0.1 %.
        assert!(
            (rtt.quantile_ms(0.5) - 51.0).abs() < 0.1,
            "{}",
            rtt.quantile_ms(0.5)
        );
        assert!((rtt.quantile_ms(1.0) - 1000.0).abs() < 1.0);
        assert_eq!(Latency::default().quantile_ms(0.99), 0.0);
    }
}
