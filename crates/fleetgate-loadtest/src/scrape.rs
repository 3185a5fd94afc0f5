//! Reads the nodes' `/metrics` (Prometheus text) for what the server side spent: memory,
//! file descriptors, CPU and messages counted. Works the same against loopback and a remote
//! deployment.

use std::time::Duration;

/// Counters of accepted device messages: the gateway's, then the reference sink's.
pub const INGEST_COUNTERS: [&str; 2] = [
    "fleetgate_messages_received_total",
    "sink_messages_received_total",
];

/// Gauges of open device sessions: the gateway's, then the reference sink's.
pub const SESSION_GAUGES: [&str; 2] = ["fleetgate_connections_active", "sink_connections_active"];

/// The server-side figures of one moment, summed over every scraped node.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Resident memory, bytes.
    pub rss: f64,
    /// Open file descriptors.
    pub fds: f64,
    /// CPU seconds used so far.
    pub cpu: f64,
    /// Device messages accepted so far.
    pub ingested: f64,
    /// Device sessions open.
    pub sessions: f64,
    /// Nodes that answered.
    pub nodes: usize,
    /// CPU seconds redis-server used so far (`INFO cpu`), when `--redis-url` is given.
    pub redis_cpu: f64,
    /// Cumulative counts of `fleetgate_app_delivery_latency_seconds` per bucket of
    /// [`DELIVERY_BUCKETS_S`] (the last is `+Inf`).
    pub delivery: [f64; DELIVERY_BUCKETS_S.len() + 1],
}

/// Upper bounds of the gateway's app delivery latency buckets, seconds (100 us doubling).
pub const DELIVERY_BUCKETS_S: [f64; 16] = {
    let mut b = [0.0001; 16];
    let mut i = 1;
    while i < 16 {
        b[i] = b[i - 1] * 2.0;
        i += 1;
    }
    b
};

/// The cumulative bucket counts of the app delivery histogram on one page.
fn delivery_buckets(text: &str) -> [f64; DELIVERY_BUCKETS_S.len() + 1] {
    let mut out = [0.0; DELIVERY_BUCKETS_S.len() + 1];
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("fleetgate_app_delivery_latency_seconds_bucket{le=\"")
        else {
            continue;
        };
        let Some((le, value)) = rest.split_once("\"}") else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let slot = if le == "+Inf" {
            Some(DELIVERY_BUCKETS_S.len())
        } else {
            le.parse::<f64>().ok().and_then(|b| {
                DELIVERY_BUCKETS_S
                    .iter()
                    .position(|x| (x - b).abs() <= b * 1e-6)
            })
        };
        if let Some(i) = slot {
            out[i] = v;
        }
    }
    out
}

/// The bucket bound (ms) under which quantile `q` of the deliveries between two samples
/// fell: coarse (buckets double), but what the node itself measured.
pub fn delivery_quantile_ms(before: &Sample, after: &Sample, q: f64) -> Option<f64> {
    let total =
        after.delivery[DELIVERY_BUCKETS_S.len()] - before.delivery[DELIVERY_BUCKETS_S.len()];
    if total <= 0.0 {
        return None;
    }
    DELIVERY_BUCKETS_S
        .iter()
        .enumerate()
        .find(|(i, _)| after.delivery[*i] - before.delivery[*i] >= q * total)
        .map(|(_, b)| b * 1000.0)
}

/// The sum of every series of `name` (any labels); `None` when absent.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // Exact name: followed by labels or whitespace, not a longer name.
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest
            .rsplit_once('}')
            .map_or(rest, |(_, v)| v)
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Parses one node's page into a [`Sample`].
pub fn parse(text: &str) -> Sample {
    Sample {
        rss: metric_sum(text, "process_resident_memory_bytes").unwrap_or(0.0),
        fds: metric_sum(text, "process_open_fds").unwrap_or(0.0),
        cpu: metric_sum(text, "process_cpu_seconds_total").unwrap_or(0.0),
        ingested: INGEST_COUNTERS
            .iter()
            .filter_map(|n| metric_sum(text, n))
            .sum(),
        sessions: SESSION_GAUGES
            .iter()
            .filter_map(|n| metric_sum(text, n))
            .sum(),
        nodes: 1,
        redis_cpu: 0.0,
        delivery: delivery_buckets(text),
    }
}

/// Upper bound for one `INFO cpu` exchange.
const REDIS_DEADLINE: Duration = Duration::from_secs(5);

/// `used_cpu_user + used_cpu_sys` of the redis-server at `url` (`redis://host:port`), seconds;
/// `None` when it cannot be read. One inline command on a fresh connection: no client library
/// is needed to read one bulk reply.
pub async fn redis_cpu(url: &str) -> Option<f64> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let addr = url.strip_prefix("redis://").unwrap_or(url);
    let addr = addr
        .rsplit_once('@')
        .map_or(addr, |(_, a)| a)
        .trim_end_matches('/');
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"INFO cpu\r\n").await.ok()?;
        let mut r = BufReader::new(s);
        let mut header = String::new();
        r.read_line(&mut header).await.ok()?;
        let len: usize = header.trim_end().strip_prefix('$')?.parse().ok()?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await.ok()?;
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(REDIS_DEADLINE, exchange)
        .await
        .ok()??;
    Some(redis_cpu_of(&text))
}

fn redis_cpu_of(info: &str) -> f64 {
    info.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| matches!(*k, "used_cpu_user" | "used_cpu_sys"))
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// Scrapes every URL; a node that does not answer is left out of the sum (and of `nodes`).
pub async fn sample(http: &reqwest::Client, urls: &[String]) -> Sample {
    let mut total = Sample::default();
    for s in per_node(http, urls).await.into_iter().flatten() {
        total.rss += s.rss;
        total.fds += s.fds;
        total.cpu += s.cpu;
        total.ingested += s.ingested;
        total.sessions += s.sessions;
        total.nodes += 1;
        for (t, d) in total.delivery.iter_mut().zip(s.delivery) {
            *t += d;
        }
    }
    total
}

/// One sample per URL, `None` for a node that did not answer.
pub async fn per_node(http: &reqwest::Client, urls: &[String]) -> Vec<Option<Sample>> {
    let mut out = Vec::new();
    for url in urls {
        let page = async {
            http.get(url)
                .timeout(Duration::from_secs(5))
                .send()
                .await?
                .error_for_status()?
                .text()
                .await
        };
        out.push(page.await.ok().map(|text| parse(&text)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
# HELP process_resident_memory_bytes Resident memory.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1048576
process_resident_memory_bytes_extra 7
process_open_fds 12
process_cpu_seconds_total 3.5
fleetgate_messages_received_total{type=\"status\"} 100
fleetgate_messages_received_total{type=\"event\",x=\"a}b\"} 5
";

    #[test]
    fn redis_cpu_is_user_plus_system() {
        let info = "# CPU\r\nused_cpu_sys:1.25\r\nused_cpu_user:2.5\r\nused_cpu_sys_children:9\r\n";
        assert!((redis_cpu_of(info) - 3.75).abs() < 1e-9);
    }

    #[test]
    fn sums_every_series_of_exactly_that_name() {
        assert_eq!(
            metric_sum(PAGE, "process_resident_memory_bytes"),
            Some(1048576.0)
        );
        assert_eq!(
            metric_sum(PAGE, "fleetgate_messages_received_total"),
            Some(105.0)
        );
        assert_eq!(metric_sum(PAGE, "missing"), None);
        let s = parse(PAGE);
        assert_eq!(s.fds, 12.0);
        assert_eq!(s.cpu, 3.5);
        assert_eq!(s.ingested, 105.0);
        let before = parse(
            "fleetgate_app_delivery_latency_seconds_bucket{le=\"0.0001\"} 0\nfleetgate_app_delivery_latency_seconds_bucket{le=\"+Inf\"} 0\n",
        );
        let after = parse(concat!(
            "fleetgate_app_delivery_latency_seconds_bucket{le=\"0.0001\"} 50\n",
            "fleetgate_app_delivery_latency_seconds_bucket{le=\"0.0002\"} 98\n",
            "fleetgate_app_delivery_latency_seconds_bucket{le=\"0.0004\"} 100\n",
            "fleetgate_app_delivery_latency_seconds_bucket{le=\"+Inf\"} 100\n",
        ));
        assert_eq!(delivery_quantile_ms(&before, &after, 0.5), Some(0.1));
        assert_eq!(delivery_quantile_ms(&before, &after, 0.99), Some(0.4));
        assert_eq!(parse("sink_messages_received_total 9\n").ingested, 9.0);
        assert_eq!(
            parse("fleetgate_connections_active 19000\n").sessions,
            19000.0
        );
    }
}
