//! Alert rules on the gateway: the node's copy of the rules, evaluation of each accepted
//! status on the node that holds the device ([`DeviceAlerts`]), offline timers for devices
//! that left this node ([`offline`]), and what a fired or resolved alert does: one record
//! in the alerts stream (and the open set), one frame on `alerts` and on each of the
//! device's `group:<name>` channels.
//!
//! A device's rule states live in the session while it is connected and in the bus
//! ([`DocKind::AlertState`]) whenever they change in a way worth keeping, so the node that
//! holds the device next starts from them.

mod device;
pub(crate) mod offline;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use fleetgate_alerts::{Alert, DeviceState, Rule, Transition};
use fleetgate_bus::{Bus, Channel, DocExpect, DocKind};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::Shared;

pub(crate) use device::DeviceAlerts;

/// Most rules a node loads (the admin API refuses more).
pub(crate) const MAX_RULES: usize = 10_000;

/// The rules as last read, with a generation that changes whenever they do.
#[derive(Default)]
pub(crate) struct RuleSet {
    pub(crate) generation: u64,
    pub(crate) rules: Vec<Rule>,
    /// Each rule's document version, to tell a changed set from the same one.
    versions: Vec<(String, u64)>,
}

/// The node's alert state: the current rules and the counters.
pub(crate) struct Alerts {
    current: RwLock<Arc<RuleSet>>,
    pub(crate) metrics: AlertMetrics,
    pub(crate) offline: offline::OfflineWatch,
}

impl Alerts {
    pub(crate) fn new(offline_capacity: usize) -> Self {
        Self {
            current: RwLock::new(Arc::new(RuleSet::default())),
            metrics: AlertMetrics::default(),
            offline: offline::OfflineWatch::new(offline_capacity),
        }
    }

    /// The current rules (a cheap clone of an `Arc`).
    pub(crate) fn rules(&self) -> Arc<RuleSet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the rules from the bus; replaces the set when a rule was added, changed or
    /// removed. Unparsable rules are skipped with a warning (the admin API validates, so
    /// only a hand edit of the store makes one).
    pub(crate) async fn refresh(&self, bus: &dyn Bus) {
        let docs = match bus.doc_list(DocKind::AlertRule, None, MAX_RULES).await {
            Ok(docs) => docs,
            Err(error) => {
                warn!(message = "could not read alert rules", %error);
                return;
            }
        };
        let versions: Vec<(String, u64)> = docs.iter().map(|d| (d.id.clone(), d.version)).collect();
        let old = self.rules();
        if versions == old.versions {
            return;
        }
        let rules: Vec<Rule> = docs
            .iter()
            .filter_map(|d| match serde_json::from_str::<Rule>(&d.body) {
                Ok(rule) if rule.validate().is_ok() => Some(rule),
                _ => {
                    warn!(message = "skipping an invalid alert rule", rule = %d.id);
                    None
                }
            })
            .collect();
        self.metrics.rules.set(rules.len() as i64);
        let set = RuleSet {
            generation: old.generation + 1,
            rules,
            versions,
        };
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
    }
}

/// Re-reads the rules every `every` until `stop`.
pub(crate) async fn refresh_loop(shared: Arc<Shared>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => shared.alerts.refresh(&*shared.bus).await,
        }
    }
}

/// Counters of rule evaluation.
#[derive(Default)]
pub(crate) struct AlertMetrics {
    rules: Gauge,
    pub(crate) evaluations: Counter,
    fired: Counter,
    resolved: Counter,
    errors: Counter,
}

impl AlertMetrics {
    /// Registers under the `fleetgate_` prefix.
    pub(crate) fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("fleetgate");
        r.register(
            "alert_rules",
            "Alert rules this node evaluates",
            self.rules.clone(),
        );
        r.register(
            "alert_evaluations",
            "Statuses and presence changes evaluated against at least one alert rule",
            self.evaluations.clone(),
        );
        r.register(
            "alerts_fired",
            "Alerts this node raised",
            self.fired.clone(),
        );
        r.register(
            "alerts_resolved",
            "Alerts this node resolved",
            self.resolved.clone(),
        );
        r.register(
            "alert_errors",
            "Alert records or rule states the bus refused (the alert is lost)",
            self.errors.clone(),
        );
    }
}

/// An alert as channels carry it: `data` of a `message` frame on `alerts` or `group:<name>`.
#[derive(Serialize)]
struct AlertFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    state: &'static str,
    #[serde(flatten)]
    alert: &'a Alert,
}

/// What a transition does: the alert record (and open set), then the frames.
pub(crate) async fn emit(shared: &Shared, rules: &[Rule], groups: &[String], t: &Transition) {
    let alert = match t.to_alert() {
        Some(alert) => alert,
        None => resolved_alert(&*shared.bus, rules, t).await,
    };
    let open = alert.is_open();
    let frame = AlertFrame {
        kind: "alert",
        state: if open { "open" } else { "resolved" },
        alert: &alert,
    };
    let text = serde_json::to_string(&frame).expect("alerts serialize");
    if let Err(error) = shared.bus.alert_record(&alert.id, &text, open).await {
        shared.alerts.metrics.errors.inc();
        warn!(message = "could not record an alert", alert = %alert.id, %error);
        return;
    }
    if open {
        shared.alerts.metrics.fired.inc();
    } else {
        shared.alerts.metrics.resolved.inc();
    }
    let bytes = Bytes::from(text);
    let channels =
        std::iter::once(Channel::Alerts).chain(groups.iter().cloned().map(Channel::Group));
    for channel in channels {
        if let Err(error) = shared.bus.publish(&channel, bytes.clone(), false).await {
            shared.metrics.bus_errors.inc();
            warn!(message = "alert publish failed", %error);
        }
    }
}

/// The record a resolution writes: the open alert as stored, closed. When the store lost
/// it, one rebuilt from the rule, so the resolution is still told.
async fn resolved_alert(bus: &dyn Bus, rules: &[Rule], t: &Transition) -> Alert {
    let id = t.alert_id();
    if let Ok(Some(text)) = bus.alert_open(&id).await
        && let Ok(frame) = serde_json::from_str::<Alert>(&text)
    {
        let mut alert = frame;
        if alert.apply(t) {
            return alert;
        }
    }
    let Transition::Resolved {
        rule_id,
        device,
        value,
        at_ms,
        fired_at_ms,
    } = t
    else {
        unreachable!("a fired transition builds its own alert")
    };
    let rule = rules.iter().find(|r| r.id == *rule_id);
    Alert {
        id,
        rule_id: rule_id.clone(),
        device: device.clone(),
        severity: rule.map_or_else(Default::default, |r| r.severity),
        message: format!(
            "{} on {device}",
            rule.map_or(rule_id.as_str(), Rule::display_name)
        ),
        value: *value,
        fired_at_ms: *fired_at_ms,
        resolved_at_ms: Some(*at_ms),
    }
}

/// A device's stored rule states (empty when none are stored or they do not parse).
pub(crate) async fn load_state(bus: &dyn Bus, device: &str) -> DeviceState {
    match bus.doc_get(DocKind::AlertState, device).await {
        Ok(Some(doc)) => serde_json::from_str(&doc.body).unwrap_or_default(),
        Ok(None) => DeviceState::default(),
        Err(error) => {
            warn!(message = "could not read alert state", %device, %error);
            DeviceState::default()
        }
    }
}

/// Stores a device's rule states (deleted when empty: most devices never need any).
pub(crate) async fn save_state(shared: &Shared, device: &str, state: &DeviceState) {
    let result = if state.is_empty() {
        shared
            .bus
            .doc_delete(DocKind::AlertState, device)
            .await
            .map(|_| ())
    } else {
        let text = serde_json::to_string(state).expect("states serialize");
        shared
            .bus
            .doc_put(DocKind::AlertState, device, &text, DocExpect::Any)
            .await
            .map(|_| ())
    };
    if let Err(error) = result {
        shared.alerts.metrics.errors.inc();
        warn!(message = "could not store alert state", %device, %error);
    }
}
