//! Where the bridge connects and what it counts.

use std::time::Duration;

use crate::MqttError;

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl BrokerAddr {
    /// Parses `mqtt://host[:port]` (default port 1883).
    ///
    /// # Errors
    /// [`MqttError::InvalidUrl`] for another scheme, credentials in the URL, a path, or a bad
    /// port; `mqtts://` is refused until TLS to the broker is supported.
    pub fn parse(url: &str) -> Result<Self, MqttError> {
        let bad = |why: &str| MqttError::InvalidUrl(why.to_owned());
        if url.starts_with("mqtts://") || url.starts_with("ssl://") {
            return Err(bad(
                "mqtts:// (TLS to the broker) is not supported yet; use mqtt:// on a trusted network",
            ));
        }
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .ok_or_else(|| bad("expected mqtt://host:port"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(bad(
                "credentials do not go in the URL; set the MQTT username and password file",
            ));
        }
        if rest.contains(['/', '?', '#']) {
            return Err(bad("the URL takes no path or query"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            (host, after.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None => 1883,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

/// How the bridge connects.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// The broker.
    pub broker: BrokerAddr,
    /// MQTT client ID (unique per node: the broker drops an older connection with the same).
    pub client_id: String,
    /// Username, if the broker wants one.
    pub username: Option<String>,
    /// Password (with a username).
    pub password: Option<String>,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Largest packet either way (payload plus topic plus headers).
    pub max_packet_bytes: usize,
    /// How long a subscribe waits for its SUBACK, and a QoS 1 publish for its PUBACK.
    pub request_timeout: Duration,
}

impl BridgeConfig {
    /// A config with defaults for everything but the broker and client ID.
    pub fn new(broker: BrokerAddr, client_id: impl Into<String>) -> Self {
        Self {
            broker,
            client_id: client_id.into(),
            username: None,
            password: None,
            keep_alive: Duration::from_secs(30),
            max_packet_bytes: 1 << 20,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Counts for metrics, read at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Whether the broker connection is up.
    pub connected: bool,
    /// ConnAcks received (the first connect and every reconnect).
    pub connects: u64,
    /// Filters held by at least one subscriber now.
    pub filters: u64,
    /// Of those, the ones the broker confirmed (SUBACK) on the current connection.
    pub filters_confirmed: u64,
    /// Subscribers registered now.
    pub subscribers: u64,
    /// Filters sent to the broker in SUBSCRIBE packets (resubscribes included).
    pub broker_subscribes: u64,
    /// SUBACKs received (each confirms one SUBSCRIBE packet).
    pub broker_subacks: u64,
    /// Filters sent to the broker in UNSUBSCRIBE packets.
    pub broker_unsubscribes: u64,
    /// PUBLISH packets received from the broker.
    pub messages_received: u64,
    /// Messages handed to subscribers' queues.
    pub deliveries: u64,
    /// Messages published towards the broker.
    pub published: u64,
    /// Subscribers dropped because their queue was full.
    pub overflows: u64,
    /// Broker messages dropped for a payload over `max_packet_bytes`.
    pub oversized: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let a = BrokerAddr::parse("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 1884));
        assert_eq!(BrokerAddr::parse("mqtt://broker").unwrap().port, 1883);
        let v6 = BrokerAddr::parse("mqtt://[::1]:1885/").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 1885));
        let tls = BrokerAddr::parse("mqtts://broker:8883")
            .unwrap_err()
            .to_string();
        assert!(tls.contains("not supported"), "{tls}");
        for bad in [
            "http://x",
            "mqtt://u:p@x",
            "mqtt://x/path",
            "mqtt://:1883",
            "mqtt://x:99999",
        ] {
            assert!(BrokerAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
