//! Turns the merged counts and the server samples of a run into its figures: the numbers
//! BENCHMARKS.md quotes and an operator compares between changes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::params::{Scenario, Spec};
use crate::scrape::Sample;
use crate::tally::{Tally, now_ms};

/// Server samples and instants the coordinator took along the way.
#[derive(Debug, Clone, Default)]
pub struct Moments {
    /// After provisioning, before any device connected.
    pub idle: Option<Sample>,
    /// Right after every device connected.
    pub connected: Option<Sample>,
    /// After holding the devices (connect scenario).
    pub held: Option<Sample>,
    /// Start of the load: wall-clock ms and sample.
    pub run_start: Option<(u64, Sample)>,
    /// End of the load.
    pub run_end: Option<(u64, Sample)>,
    /// When the reconnect-storm trigger ran.
    pub trigger_ms: Option<u64>,
    /// Devices online once the settle phase ended.
    pub settled_online: Option<u64>,
    /// Seconds the settle phase took.
    pub settle_secs: f64,
}

/// One run's outcome, as written to `loadtest/results/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// Scenario name.
    pub scenario: String,
    /// The caller's name for this run (a suite entry).
    pub label: Option<String>,
    /// When it ended, ms since the epoch.
    pub finished_ms: u64,
    /// The parameters, secrets removed.
    pub params: Value,
    /// Named figures; see the scenario docs in README.md for each name.
    pub figures: BTreeMap<String, f64>,
    /// Counted outcomes by kind, e.g. `connect_failed` -> {"1013": 12}.
    pub breakdown: BTreeMap<String, BTreeMap<String, u64>>,
    /// goose's HTML reports of the workers.
    pub goose_reports: Vec<String>,
}

impl RunResult {
    /// A figure, if the run produced it.
    pub fn figure(&self, name: &str) -> Option<f64> {
        self.figures.get(name).copied()
    }

    /// Human-readable lines for the terminal.
    pub fn text(&self) -> String {
        let mut s = self.scenario.clone();
        if let Some(l) = &self.label {
            let _ = write!(s, " ({l})");
        }
        s.push('\n');
        for (k, v) in &self.figures {
            let _ = writeln!(s, "  {k:<28} {}", round(*v));
        }
        for (k, m) in &self.breakdown {
            let _ = writeln!(s, "  {k}: {m:?}");
        }
        s
    }
}

fn round(v: f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Computes a run's figures.
pub fn summarize(
    spec: &Spec,
    t: &Tally,
    m: &Moments,
    label: Option<String>,
    goose_reports: Vec<String>,
) -> RunResult {
    let mut f = BTreeMap::new();
    let mut put = |k: &str, v: f64| {
        if v.is_finite() {
            f.insert(k.to_owned(), v);
        }
    };
    let connected = t.count("connected") as f64;
    put("devices", spec.devices as f64);
    put("connected", connected);
    put("connect_failed", t.total("connect_failed") as f64);
    put("provision_failed", t.total("provision_failed") as f64);
    // Connect rate: from the first attempt to the last success, all workers together.
    if let (Some(a), Some(b)) = (t.span("connect_started"), t.span("connected")) {
        let secs = b.last_ms.saturating_sub(a.first_ms) as f64 / 1000.0;
        if secs > 0.0 {
            put("connect_per_s", connected / secs);
        }
    }
    if let Some(h) = t.latencies_of("connect") {
        put("connect_p50_ms", h.quantile_ms(0.5));
        put("connect_p99_ms", h.quantile_ms(0.99));
    }
    if let (Some(idle), Some(after)) = (m.idle, m.held.or(m.connected))
        && idle.nodes > 0
        && connected > 0.0
    {
        put("server_rss_bytes", after.rss);
        put(
            "server_rss_per_device_bytes",
            (after.rss - idle.rss) / connected,
        );
        if after.fds > 0.0 {
            put("server_fds", after.fds);
        }
    }
    // The nodes' CPU per connection (handshakes, authentication, registration), apart from the
    // load generator's, which shares the machine.
    if let (Some(idle), Some(done)) = (m.idle, m.connected)
        && idle.nodes > 0
        && done.nodes == idle.nodes
        && done.cpu > idle.cpu
        && connected > 0.0
    {
        put(
            "server_cpu_per_connect_us",
            (done.cpu - idle.cpu) * 1e6 / connected,
        );
    }

    let run_secs = match (m.run_start, m.run_end) {
        (Some((a, _)), Some((b, _))) => b.saturating_sub(a) as f64 / 1000.0,
        _ => 0.0,
    };
    if let (Some((_, s0)), Some((_, s1))) = (m.run_start, m.run_end)
        && s1.nodes > 0
        && s1.nodes == s0.nodes
        && run_secs > 0.0
        && s1.cpu > 0.0
    {
        put("server_cpu_per_s", (s1.cpu - s0.cpu) / run_secs);
    }
    // The run's CPU per unit of work (message, command): nodes and redis-server apart.
    let per_unit = |put: &mut dyn FnMut(&str, f64), what: &str, units: f64| {
        let (Some((_, s0)), Some((_, s1))) = (m.run_start, m.run_end) else {
            return;
        };
        if units <= 0.0 {
            return;
        }
        if s1.nodes > 0 && s1.nodes == s0.nodes && s1.cpu > s0.cpu {
            put(
                &format!("server_cpu_per_{what}_us"),
                (s1.cpu - s0.cpu) * 1e6 / units,
            );
        }
        if s1.redis_cpu > s0.redis_cpu && s0.redis_cpu > 0.0 {
            put(
                &format!("redis_cpu_per_{what}_us"),
                (s1.redis_cpu - s0.redis_cpu) * 1e6 / units,
            );
        }
    };

    match spec.scenario {
        Scenario::Connect => {}
        Scenario::Telemetry => {
            let sent = t.count("messages_sent") as f64;
            let acked = t.count("messages_acked") as f64;
            put("messages_sent", sent);
            put("send_failed", t.total("send_failed") as f64);
            let load = t.span("load").map_or(0.0, |s| s.secs());
            if load > 0.0 {
                put("client_msg_per_s", acked / load);
            }
            // The server's own count is the truth for QoS 0, where nothing is acknowledged.
            if let (Some((a, s0)), Some((b, s1))) = (m.run_start, m.run_end) {
                let secs = b.saturating_sub(a) as f64 / 1000.0;
                if s1.nodes > 0 && secs > 0.0 && s1.ingested > s0.ingested {
                    put("server_msg_per_s", (s1.ingested - s0.ingested) / secs);
                    per_unit(&mut put, "msg", s1.ingested - s0.ingested);
                }
            }
            if let Some(h) = t.latencies_of("ack") {
                put("ack_p50_ms", h.quantile_ms(0.5));
                put("ack_p99_ms", h.quantile_ms(0.99));
                put("ack_p999_ms", h.quantile_ms(0.999));
            }
        }
        Scenario::Fanout => {
            let sent = t.count("messages_sent") as f64;
            let delivered = t.count("app_frames") as f64;
            let apps = t.count("apps_connected") as f64;
            put("messages_sent", sent);
            put("apps_connected", apps);
            put("app_failed", t.total("app_failed") as f64);
            put("app_closed", t.total("app_closed") as f64);
            put("frames_delivered", delivered);
            // Every frame reaches each of its channel's subscribers: apps x channels per app
            // / devices of them.
            if sent > 0.0 && spec.devices > 0 {
                let expected = sent * apps * spec.channels_per_app as f64 / spec.devices as f64;
                put("delivered_ratio", delivered / expected);
            }
            let load = t.span("load").map_or(0.0, |s| s.secs());
            if load > 0.0 {
                put("delivered_per_s", delivered / load);
                put("client_msg_per_s", sent / load);
            }
            if let Some(h) = t.latencies_of("delivery") {
                put("delivery_p50_ms", h.quantile_ms(0.5));
                put("delivery_p99_ms", h.quantile_ms(0.99));
                put("delivery_p999_ms", h.quantile_ms(0.999));
            }
            if let (Some((_, s0)), Some((_, s1))) = (m.run_start, m.run_end) {
                // The node's own share: from a frame reaching it to its socket write.
                for (name, q) in [
                    ("node_delivery_p50_ms", 0.5),
                    ("node_delivery_p99_ms", 0.99),
                ] {
                    if let Some(v) = crate::scrape::delivery_quantile_ms(&s0, &s1, q) {
                        put(name, v);
                    }
                }
            }
            if let (Some((a, s0)), Some((b, s1))) = (m.run_start, m.run_end) {
                let secs = b.saturating_sub(a) as f64 / 1000.0;
                if s1.nodes > 0 && s1.nodes == s0.nodes && secs > 0.0 && s1.cpu > s0.cpu {
                    let cpu = s1.cpu - s0.cpu;
                    let ingested = s1.ingested - s0.ingested;
                    if delivered > 0.0 {
                        put("server_cpu_per_delivered_us", cpu * 1e6 / delivered);
                    }
                    if ingested > 0.0 {
                        put("server_msg_per_s", ingested / secs);
                    }
                }
            }
            // Memory per socket held: apps and their devices together (devices are
            // apps / (apps per channel) of them, a few percent).
            if let (Some(idle), Some(after)) = (m.idle, m.connected)
                && idle.nodes > 0
                && apps > 0.0
            {
                put(
                    "server_rss_per_socket_bytes",
                    (after.rss - idle.rss) / (apps + connected),
                );
            }
        }
        Scenario::Commands | Scenario::ReconnectStorm => {
            let statuses = t.breakdown("command_status");
            let ok = statuses.get("200").copied().unwrap_or(0) as f64;
            let accepted = t.count("commands_accepted") as f64;
            let received = t.count("commands_received") as f64;
            put("commands_sent", statuses.values().sum::<u64>() as f64);
            put("commands_ok", ok);
            put("commands_accepted", accepted);
            put("commands_received", received);
            put("commands_lost", (accepted - received).max(0.0));
            put(
                "commands_duplicated",
                t.count("commands_received_dup") as f64,
            );
            if let Some(s) = t.span("commands").filter(|s| s.secs() > 0.0) {
                put("commands_ok_per_s", ok / s.secs());
            }
            if spec.scenario == Scenario::Commands {
                per_unit(&mut put, "command", ok);
            }
            if spec.wait_ms > 0 {
                put("offered_per_s", spec.rate);
            }
            if let Some(h) = t.latencies_of("command_rtt") {
                put("rtt_p50_ms", h.quantile_ms(0.5));
                put("rtt_p99_ms", h.quantile_ms(0.99));
                put("rtt_p999_ms", h.quantile_ms(0.999));
            }
            if let Some(h) = t.latencies_of("command_delivery") {
                put("delivery_p99_ms", h.quantile_ms(0.99));
            }
        }
    }

    if spec.scenario == Scenario::ReconnectStorm {
        let dropped = t.total("disconnected") as f64;
        put("disconnects", dropped);
        put("reconnects", t.count("reconnected") as f64);
        let online = m.settled_online.unwrap_or(0) as f64;
        put("not_back", (connected - online).max(0.0));
        if let (Some(trigger), Some(back)) = (m.trigger_ms, t.span("reconnected")) {
            put(
                "all_back_s",
                back.last_ms.saturating_sub(trigger) as f64 / 1000.0,
            );
        }
        if let Some(h) = t.latencies_of("down") {
            put("down_p50_ms", h.quantile_ms(0.5));
            put("down_p99_ms", h.quantile_ms(0.99));
        }
    }

    let mut breakdown = BTreeMap::new();
    for kind in [
        "connect_failed",
        "provision_failed",
        "disconnected",
        "reconnect_failed",
        "send_failed",
        "command_status",
        "answer_failed",
        "error_frame",
        "app_failed",
        "app_closed",
    ] {
        let b = t.breakdown(kind);
        if !b.is_empty() {
            breakdown.insert(kind.to_owned(), b);
        }
    }
    let mut params = serde_json::to_value(spec).unwrap_or_default();
    if let Some(o) = params.as_object_mut() {
        o.remove("api_key");
        o.remove("jwt_secret");
    }
    RunResult {
        scenario: spec.scenario.name().to_owned(),
        label,
        finished_ms: now_ms(),
        params,
        figures: f,
        breakdown,
        goose_reports,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::params::Params;

    fn spec(s: Scenario) -> Spec {
        Params {
            devices: Some(4),
            api_key: Some("secret-key".into()),
            trigger: Some("true".into()),
            ..Params::default()
        }
        .resolve(s)
        .unwrap()
    }

    fn sample(rss: f64, cpu: f64, ingested: f64) -> Sample {
        Sample {
            rss,
            fds: 10.0,
            cpu,
            ingested,
            sessions: 0.0,
            nodes: 1,
            ..Sample::default()
        }
    }

    #[test]
    fn connect_figures_come_from_spans_and_memory_growth() {
        let mut t = Tally::default();
        t.add("connected", 4);
        t.mark("connect_started", 10_000);
        t.mark("connected", 10_100);
        t.mark("connected", 10_400);
        t.latency("connect", Duration::from_millis(3));
        let m = Moments {
            idle: Some(sample(10_000_000.0, 1.0, 0.0)),
            connected: Some(sample(10_016_000.0, 1.002, 0.0)),
            held: Some(sample(10_016_000.0, 1.002, 0.0)),
            ..Moments::default()
        };
        let r = summarize(&spec(Scenario::Connect), &t, &m, None, vec![]);
        assert_eq!(r.figure("connect_per_s"), Some(10.0));
        let cpu = r
            .figure("server_cpu_per_connect_us")
            .expect("CPU per connect");
        assert!((cpu - 500.0).abs() < 1e-6, "{cpu}");
        assert_eq!(r.figure("server_rss_per_device_bytes"), Some(4_000.0));
        assert_eq!(r.figure("connect_failed"), Some(0.0));
        assert!(
            r.params.get("api_key").is_none(),
            "secrets never reach results"
        );
        assert_eq!(r.params["devices"], 4);
    }

    #[test]
    fn storm_counts_lost_commands_and_time_until_all_back() {
        let mut t = Tally::default();
        t.add("connected", 4);
        t.add("command_status:200", 7);
        t.add("command_status:404", 1);
        t.add("commands_accepted", 9);
        t.add("commands_received", 8);
        t.add("disconnected:1012", 2);
        t.add("reconnected", 2);
        t.mark("reconnected", 52_500);
        let m = Moments {
            trigger_ms: Some(50_000),
            settled_online: Some(4),
            run_start: Some((40_000, sample(0.0, 1.0, 0.0))),
            run_end: Some((60_000, sample(0.0, 3.0, 0.0))),
            ..Moments::default()
        };
        let r = summarize(
            &spec(Scenario::ReconnectStorm),
            &t,
            &m,
            Some("x".into()),
            vec![],
        );
        assert_eq!(r.figure("commands_lost"), Some(1.0));
        assert_eq!(r.figure("commands_sent"), Some(8.0));
        assert_eq!(r.figure("all_back_s"), Some(2.5));
        assert_eq!(r.figure("not_back"), Some(0.0));
        assert_eq!(r.figure("disconnects"), Some(2.0));
        assert_eq!(r.figure("server_cpu_per_s"), Some(0.1));
        assert_eq!(r.breakdown["command_status"]["404"], 1);
    }

    #[test]
    fn telemetry_prefers_the_servers_count() {
        let mut t = Tally::default();
        t.add("messages_sent", 1_000);
        t.add("messages_acked", 1_000);
        t.mark("load", 0);
        t.mark("load", 2_000);
        let m = Moments {
            run_start: Some((0, sample(0.0, 0.0, 100.0))),
            run_end: Some((2_000, sample(0.0, 0.0, 900.0))),
            ..Moments::default()
        };
        let r = summarize(&spec(Scenario::Telemetry), &t, &m, None, vec![]);
        assert_eq!(r.figure("client_msg_per_s"), Some(500.0));
        assert_eq!(r.figure("server_msg_per_s"), Some(400.0));
        assert_eq!(r.figure("redis_cpu_per_msg_us"), None, "no redis sampled");
    }

    #[test]
    fn cpu_per_message_splits_nodes_and_redis() {
        let mut t = Tally::default();
        t.mark("load", 0);
        t.mark("load", 2_000);
        let at = |cpu: f64, redis_cpu: f64, ingested: f64| Sample {
            redis_cpu,
            ..sample(0.0, cpu, ingested)
        };
        let m = Moments {
            run_start: Some((0, at(1.0, 5.0, 0.0))),
            run_end: Some((2_000, at(1.5, 5.1, 10_000.0))),
            ..Moments::default()
        };
        let r = summarize(&spec(Scenario::Telemetry), &t, &m, None, vec![]);
        let near = |k: &str, v: f64| (r.figure(k).unwrap() - v).abs() < 1e-6;
        assert!(near("server_cpu_per_msg_us", 50.0));
        assert!(near("redis_cpu_per_msg_us", 10.0));
    }
}
