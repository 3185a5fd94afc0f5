//! Prometheus metrics of a gateway node. Labels come from small fixed sets, never device IDs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label for message counters: the frame type.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `status`, `event`, `batch`, ...
    pub kind: &'static str,
}

/// Label for close counters: the close code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// Close code as a number.
    pub code: u16,
}

/// Label for command outcome counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `acked`, `expired`, `attempts_exhausted`.
    pub outcome: &'static str,
}

/// Label for refusals by reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why, as a fixed word.
    pub reason: &'static str,
}

/// The node's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Authenticated device sessions open now.
    pub connections_active: Gauge,
    /// The node's session cap (`max_connections`), so alerts can compare against it.
    pub connections_max: Gauge,
    /// WebSocket upgrades accepted.
    pub connections_total: Counter,
    /// Upgrades refused with 503 because the node was full or draining.
    pub connections_rejected: Counter,
    /// Sessions closed, by close code.
    pub closes: Family<CodeLabel, Counter>,
    /// Successful authentications.
    pub auth_success: Counter,
    /// Failed authentications.
    pub auth_failures: Counter,
    /// Authentication attempts refused unexamined: their source or device ID failed too often.
    pub auth_throttled: Counter,
    /// Fresh credentials accepted on a live session (`auth` frame after authentication).
    pub auth_refreshes: Counter,
    /// Device messages accepted, by type.
    pub messages_received: Family<KindLabel, Counter>,
    /// Device messages refused (error frame or close).
    pub messages_rejected: Counter,
    /// Messages of signing devices refused for their signature, by reason.
    pub signature_failures: Family<ReasonLabel, Counter>,
    /// Commands written to devices (first sends).
    pub commands_sent: Counter,
    /// Command retransmissions.
    pub commands_retransmitted: Counter,
    /// Commands finished, by outcome.
    pub commands_finished: Family<OutcomeLabel, Counter>,
    /// Node messages dropped because a session's outbox was full.
    pub outbox_dropped: Counter,
    /// Bus calls that failed.
    pub bus_errors: Counter,
    /// Time from reading a QoS 1/2 device message to its answer being queued, i.e. until
    /// the message is durable in the bus.
    pub ack_latency: Histogram,
    /// `/v1/app` sessions open now.
    pub app_sessions: Gauge,
    /// Channel subscriptions of `/v1/app` sessions now.
    pub app_subscriptions: Gauge,
    /// Channels this node holds a bus subscription to for app sessions (one each, shared).
    pub app_channels: Gauge,
    /// Frames the node's channels received and fanned out (each encoded once).
    pub app_frames_fanned_out: Counter,
    /// Frames written to app clients.
    pub app_frames_delivered: Counter,
    /// App clients closed because their queue reached its byte limit.
    pub app_overflows: Counter,
    /// Offset gaps seen on a channel (frames dropped or lost in transit).
    pub app_gaps: Counter,
    /// Time from a channel frame reaching this node to its write to an app client.
    pub app_delivery_latency: Histogram,
    /// `/v1/mqtt` sessions open now.
    pub mqtt_sessions: Gauge,
    /// Topic filters held by `/v1/mqtt` sessions now (each session's own count; the broker
    /// sees one subscription per distinct filter per node).
    pub mqtt_subscriptions: Gauge,
    /// Broker messages written to `/v1/mqtt` clients.
    pub mqtt_frames_delivered: Counter,
    /// Publishes from `/v1/mqtt` clients accepted by the bridge.
    pub mqtt_published: Counter,
    /// `/v1/mqtt` clients closed with 4008 because their queue was full.
    pub mqtt_overflows: Counter,
    /// Messages of MQTT devices this node received, by what became of them.
    pub mqtt_device_messages: Family<OutcomeLabel, Counter>,
    /// MQTT devices this node holds now (also counted in `connections_active`).
    pub mqtt_devices_held: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connections_active: Gauge::default(),
            connections_max: Gauge::default(),
            connections_total: Counter::default(),
            connections_rejected: Counter::default(),
            closes: Family::default(),
            auth_success: Counter::default(),
            auth_failures: Counter::default(),
            auth_refreshes: Counter::default(),
            auth_throttled: Counter::default(),
            messages_received: Family::default(),
            messages_rejected: Counter::default(),
            signature_failures: Family::default(),
            commands_sent: Counter::default(),
            commands_retransmitted: Counter::default(),
            commands_finished: Family::default(),
            outbox_dropped: Counter::default(),
            bus_errors: Counter::default(),
            // 100 us .. ~3.3 s: a memory-bus ack is sub-millisecond, a Redis one a few ms,
            // and anything past a second is an outage.
            ack_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
            ),
            app_sessions: Gauge::default(),
            app_subscriptions: Gauge::default(),
            app_channels: Gauge::default(),
            app_frames_fanned_out: Counter::default(),
            app_frames_delivered: Counter::default(),
            app_overflows: Counter::default(),
            app_gaps: Counter::default(),
            // The same 100 us .. ~3.3 s buckets as acks: a fast node delivers in well under
            // a millisecond, a backlogged client shows here before it is closed with 4008.
            app_delivery_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
            ),
            mqtt_sessions: Gauge::default(),
            mqtt_subscriptions: Gauge::default(),
            mqtt_frames_delivered: Counter::default(),
            mqtt_published: Counter::default(),
            mqtt_overflows: Counter::default(),
            mqtt_device_messages: Family::default(),
            mqtt_devices_held: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric under the `fleetgate_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("fleetgate");
        r.register(
            "connections_active",
            "Authenticated device sessions open now",
            self.connections_active.clone(),
        );
        r.register(
            "connections_max",
            "Authenticated device sessions this node accepts (max_connections)",
            self.connections_max.clone(),
        );
        r.register(
            "connections",
            "WebSocket upgrades accepted",
            self.connections_total.clone(),
        );
        r.register(
            "connections_rejected",
            "Upgrades refused (full or draining)",
            self.connections_rejected.clone(),
        );
        r.register(
            "closes",
            "Sessions closed, by close code",
            self.closes.clone(),
        );
        r.register(
            "auth_success",
            "Successful device authentications",
            self.auth_success.clone(),
        );
        r.register(
            "auth_failures",
            "Failed device authentications",
            self.auth_failures.clone(),
        );
        r.register(
            "auth_throttled",
            "Device authentications refused unexamined after too many failures from their source or for their device ID",
            self.auth_throttled.clone(),
        );
        r.register(
            "auth_refreshes",
            "Fresh device credentials accepted on live sessions",
            self.auth_refreshes.clone(),
        );
        r.register(
            "messages_received",
            "Device messages accepted, by type",
            self.messages_received.clone(),
        );
        r.register(
            "messages_rejected",
            "Device messages refused",
            self.messages_rejected.clone(),
        );
        r.register(
            "signature_failures",
            "Messages of signing devices refused for their signature, by reason",
            self.signature_failures.clone(),
        );
        r.register(
            "commands_sent",
            "Commands written to devices",
            self.commands_sent.clone(),
        );
        r.register(
            "commands_retransmitted",
            "Command retransmissions",
            self.commands_retransmitted.clone(),
        );
        r.register(
            "commands_finished",
            "Commands finished, by outcome",
            self.commands_finished.clone(),
        );
        r.register(
            "outbox_dropped_messages",
            "Node messages dropped on a full session outbox",
            self.outbox_dropped.clone(),
        );
        r.register("bus_errors", "Failed bus calls", self.bus_errors.clone());
        r.register(
            "mqtt_device_messages",
            "Messages of MQTT devices received from the broker or another node, by outcome",
            self.mqtt_device_messages.clone(),
        );
        r.register(
            "mqtt_devices_held",
            "MQTT devices this node holds a session for",
            self.mqtt_devices_held.clone(),
        );
        r.register_with_unit(
            "ack_latency",
            "Time from reading a QoS 1/2 device message to queueing its answer (durable in the bus)",
            prometheus_client::registry::Unit::Seconds,
            self.ack_latency.clone(),
        );
        r.register(
            "app_sessions",
            "/v1/app sessions open now",
            self.app_sessions.clone(),
        );
        r.register(
            "app_subscriptions",
            "Channel subscriptions of /v1/app sessions now",
            self.app_subscriptions.clone(),
        );
        r.register(
            "app_channels",
            "Channels with a bus subscription on this node for app sessions",
            self.app_channels.clone(),
        );
        r.register(
            "app_frames_fanned_out",
            "Channel frames received by this node for app subscribers (each encoded once)",
            self.app_frames_fanned_out.clone(),
        );
        r.register(
            "app_frames_delivered",
            "Frames written to app clients",
            self.app_frames_delivered.clone(),
        );
        r.register(
            "app_overflows",
            "App clients closed with 4008 because their queue was full",
            self.app_overflows.clone(),
        );
        r.register_with_unit(
            "app_delivery_latency",
            "Time from a channel frame reaching this node to its write to an app client",
            prometheus_client::registry::Unit::Seconds,
            self.app_delivery_latency.clone(),
        );
        r.register(
            "app_gaps",
            "Offset gaps on app channels (filled from history or reported)",
            self.app_gaps.clone(),
        );
        r.register(
            "mqtt_sessions",
            "/v1/mqtt sessions open now",
            self.mqtt_sessions.clone(),
        );
        r.register(
            "mqtt_subscriptions",
            "Topic filters held by /v1/mqtt sessions now",
            self.mqtt_subscriptions.clone(),
        );
        r.register(
            "mqtt_frames_delivered",
            "Broker messages written to /v1/mqtt clients",
            self.mqtt_frames_delivered.clone(),
        );
        r.register(
            "mqtt_published",
            "Publishes from /v1/mqtt clients accepted by the bridge",
            self.mqtt_published.clone(),
        );
        r.register(
            "mqtt_overflows",
            "/v1/mqtt clients closed with 4008 because their queue was full",
            self.mqtt_overflows.clone(),
        );
    }
}

/// The MQTT bridge's own counts (`fleetgate_mqtt_bridge_*`), read at scrape time.
#[derive(Debug)]
pub struct BridgeMetrics(pub fleetgate_mqtt::Bridge);

impl prometheus_client::collector::Collector for BridgeMetrics {
    fn encode(&self, mut e: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let s = self.0.stats();
        let gauges = [
            (
                "fleetgate_mqtt_bridge_connected",
                "1 while the node's MQTT broker connection is up",
                i64::from(s.connected),
            ),
            (
                "fleetgate_mqtt_bridge_filters",
                "Distinct topic filters this node holds on the broker (one subscription each)",
                i64::try_from(s.filters).unwrap_or(i64::MAX),
            ),
            (
                "fleetgate_mqtt_bridge_filters_confirmed",
                "Of those filters, the ones the broker confirmed on the current connection",
                i64::try_from(s.filters_confirmed).unwrap_or(i64::MAX),
            ),
            (
                "fleetgate_mqtt_bridge_subscribers",
                "Subscribers of the bridge (sessions and node-level consumers)",
                i64::try_from(s.subscribers).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let counters = [
            (
                "fleetgate_mqtt_bridge_connects",
                "ConnAcks from the broker (first connect and reconnects)",
                s.connects,
            ),
            (
                "fleetgate_mqtt_bridge_broker_subscribes",
                "Filters sent to the broker in SUBSCRIBE packets, resubscribes included",
                s.broker_subscribes,
            ),
            (
                "fleetgate_mqtt_bridge_broker_subacks",
                "SUBACKs from the broker (each confirms one SUBSCRIBE packet)",
                s.broker_subacks,
            ),
            (
                "fleetgate_mqtt_bridge_broker_unsubscribes",
                "Filters sent to the broker in UNSUBSCRIBE packets",
                s.broker_unsubscribes,
            ),
            (
                "fleetgate_mqtt_bridge_messages_received",
                "PUBLISH packets received from the broker",
                s.messages_received,
            ),
            (
                "fleetgate_mqtt_bridge_deliveries",
                "Broker messages handed to subscribers' queues",
                s.deliveries,
            ),
            (
                "fleetgate_mqtt_bridge_published",
                "Messages published towards the broker",
                s.published,
            ),
            (
                "fleetgate_mqtt_bridge_overflows",
                "Subscribers dropped because their queue was full",
                s.overflows,
            ),
            (
                "fleetgate_mqtt_bridge_oversized",
                "Broker messages dropped for a payload over the frame limit",
                s.oversized,
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}
