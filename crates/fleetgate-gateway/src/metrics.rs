//! Prometheus metrics of a gateway node. Labels come from small fixed sets, never device IDs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

/// The node's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Authenticated device sessions open now.
    pub connections_active: Gauge,
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
    /// Device messages accepted, by type.
    pub messages_received: Family<KindLabel, Counter>,
    /// Device messages refused (error frame or close).
    pub messages_rejected: Counter,
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
    }
}
