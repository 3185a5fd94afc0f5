//! What evaluation produces: transitions, and the alert records built from them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::rule::{Condition, Rule, Severity};

/// The id of the alert `rule_id` fired on `device` at `fired_at_ms`: `rule:device:ms`.
///
/// Deterministic, so every node derives the same id for the same firing; rule ids cannot
/// contain `:`, so the rule id is everything before the first `:` and the time everything
/// after the last one (device ids may contain `:`).
pub fn alert_id(rule_id: &str, device: &str, fired_at_ms: i64) -> String {
    format!("{rule_id}:{device}:{fired_at_ms}")
}

/// A change of an alert's state, produced by evaluation.
///
/// `value` is the measured quantity: the tag value for threshold and band rules, the
/// absolute change per second for rate rules, the seconds offline for offline rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Transition {
    /// The alert opened.
    Fired {
        /// The rule that fired.
        rule_id: String,
        /// The device it fired on.
        device: String,
        /// The measured quantity at firing.
        value: f64,
        /// When it fired (the sample, tick or event time), ms since the epoch.
        at_ms: i64,
        /// The rule's severity.
        severity: Severity,
        /// A one-line human-readable summary.
        message: String,
    },
    /// The alert's clear condition held: it is closed.
    Resolved {
        /// The rule whose alert resolved.
        rule_id: String,
        /// The device.
        device: String,
        /// The measured quantity at resolution.
        value: f64,
        /// When it resolved, ms since the epoch.
        at_ms: i64,
        /// When the alert it closes fired (with rule and device, its id).
        fired_at_ms: i64,
    },
}

impl Transition {
    /// The id of the alert this transition opens or closes.
    pub fn alert_id(&self) -> String {
        match self {
            Self::Fired {
                rule_id,
                device,
                at_ms,
                ..
            } => alert_id(rule_id, device, *at_ms),
            Self::Resolved {
                rule_id,
                device,
                fired_at_ms,
                ..
            } => alert_id(rule_id, device, *fired_at_ms),
        }
    }

    /// The rule this transition belongs to.
    pub fn rule_id(&self) -> &str {
        match self {
            Self::Fired { rule_id, .. } | Self::Resolved { rule_id, .. } => rule_id,
        }
    }

    /// The device this transition belongs to.
    pub fn device(&self) -> &str {
        match self {
            Self::Fired { device, .. } | Self::Resolved { device, .. } => device,
        }
    }

    /// The open alert record a `Fired` transition creates; `None` for `Resolved`.
    pub fn to_alert(&self) -> Option<Alert> {
        match self {
            Self::Fired {
                rule_id,
                device,
                value,
                at_ms,
                severity,
                message,
            } => Some(Alert {
                id: alert_id(rule_id, device, *at_ms),
                rule_id: rule_id.clone(),
                device: device.clone(),
                severity: *severity,
                message: message.clone(),
                value: *value,
                fired_at_ms: *at_ms,
                resolved_at_ms: None,
            }),
            Self::Resolved { .. } => None,
        }
    }
}

/// An alert as published on the `alerts` channel and listed by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// `rule:device:firedAtMs` (see [`alert_id`]).
    pub id: String,
    /// The rule that fired.
    pub rule_id: String,
    /// The device it fired on.
    pub device: String,
    /// The rule's severity at firing.
    pub severity: Severity,
    /// A one-line human-readable summary.
    pub message: String,
    /// The measured quantity at firing (see [`Transition`]).
    pub value: f64,
    /// When it fired, ms since the epoch.
    pub fired_at_ms: i64,
    /// When it resolved; `null` while open.
    #[serde(default)]
    pub resolved_at_ms: Option<i64>,
}

impl Alert {
    /// Whether the alert is still open.
    pub fn is_open(&self) -> bool {
        self.resolved_at_ms.is_none()
    }

    /// Applies a transition: a matching `Resolved` closes the alert. Returns whether it
    /// matched (same rule, device and fire time).
    pub fn apply(&mut self, t: &Transition) -> bool {
        match t {
            Transition::Resolved {
                rule_id,
                device,
                at_ms,
                fired_at_ms,
                ..
            } if *rule_id == self.rule_id
                && *device == self.device
                && *fired_at_ms == self.fired_at_ms =>
            {
                self.resolved_at_ms = Some(*at_ms);
                true
            }
            _ => false,
        }
    }
}

/// A number for messages: at most three decimals, no trailing zeros (`6.667`, `80`).
struct Num(f64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rounded = (self.0 * 1000.0).round() / 1000.0;
        // `-0` reads oddly in a message.
        let rounded = if rounded == 0.0 { 0.0 } else { rounded };
        write!(f, "{rounded}")
    }
}

/// The summary of a firing, e.g. `Too hot on sensor-001: temperature 81.2 > 80`.
pub(crate) fn message(rule: &Rule, device: &str, value: f64) -> String {
    let name = rule.display_name();
    let v = Num(value);
    let what = match &rule.condition {
        Condition::Threshold(c) => format!("{} {v} {} {}", c.tag, c.op, Num(c.value)),
        Condition::Band(c) => format!("{} {v} outside [{}, {}]", c.tag, Num(c.low), Num(c.high)),
        Condition::Rate(c) => {
            format!("{} changing {v}/s (limit {}/s)", c.tag, Num(c.per_second))
        }
        Condition::Offline(_) => format!("offline for {v} s"),
    };
    let held = if rule.for_ms > 0 {
        format!(" for {} s", Num(rule.for_ms as f64 / 1000.0))
    } else {
        String::new()
    };
    format!("{name} on {device}: {what}{held}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fired() -> Transition {
        Transition::Fired {
            rule_id: "hot".into(),
            device: "plc:7".into(),
            value: 81.2,
            at_ms: 1_000,
            severity: Severity::Critical,
            message: "m".into(),
        }
    }

    #[test]
    fn alert_json_shape_and_resolution() {
        let t = fired();
        assert_eq!(t.alert_id(), "hot:plc:7:1000");
        assert_eq!((t.rule_id(), t.device()), ("hot", "plc:7"));
        let mut a = t.to_alert().unwrap();
        assert!(a.is_open());
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            json!({"id":"hot:plc:7:1000","ruleId":"hot","device":"plc:7","severity":"critical",
                   "message":"m","value":81.2,"firedAtMs":1000,"resolvedAtMs":null})
        );
        let other = Transition::Resolved {
            rule_id: "hot".into(),
            device: "plc:7".into(),
            value: 70.0,
            at_ms: 5_000,
            fired_at_ms: 999,
        };
        assert!(!a.apply(&other));
        assert!(!a.apply(&t));
        let resolved = Transition::Resolved {
            rule_id: "hot".into(),
            device: "plc:7".into(),
            value: 70.0,
            at_ms: 5_000,
            fired_at_ms: 1_000,
        };
        assert_eq!(resolved.alert_id(), a.id);
        assert!(resolved.to_alert().is_none());
        assert!(a.apply(&resolved));
        assert_eq!(a.resolved_at_ms, Some(5_000));
        let back: Alert = serde_json::from_value(serde_json::to_value(&a).unwrap()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn transition_json_shape() {
        assert_eq!(
            serde_json::to_value(fired()).unwrap(),
            json!({"type":"fired","ruleId":"hot","device":"plc:7","value":81.2,"atMs":1000,
                   "severity":"critical","message":"m"})
        );
    }

    #[test]
    fn messages() {
        let rule = |c: serde_json::Value, for_ms: i64| -> Rule {
            serde_json::from_value(json!({"id":"r","name":"Too hot","target":{"group":"g"},
                "condition":c,"forMs":for_ms}))
            .unwrap()
        };
        let th = rule(
            json!({"threshold":{"tag":"temperature","op":">","value":80}}),
            0,
        );
        assert_eq!(
            message(&th, "s1", 81.2),
            "Too hot on s1: temperature 81.2 > 80"
        );
        let band = rule(json!({"band":{"tag":"h","low":10,"high":30.5}}), 30_000);
        assert_eq!(
            message(&band, "s1", 9.0),
            "Too hot on s1: h 9 outside [10, 30.5] for 30 s"
        );
        let rate = rule(json!({"rate":{"tag":"p","perSecond":5}}), 0);
        assert_eq!(
            message(&rate, "s1", 20.0 / 3.0),
            "Too hot on s1: p changing 6.667/s (limit 5/s)"
        );
        let mut off = rule(json!({"offline":{"seconds":60}}), 0);
        off.name.clear();
        assert_eq!(message(&off, "s1", 61.5), "r on s1: offline for 61.5 s");
    }
}
