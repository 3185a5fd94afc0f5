//! fleetgate alert rules: the rule type the REST API accepts, and the pure evaluation
//! engine that turns device statuses and presence events into fired and resolved alerts.
//! No I/O and no clocks: the caller feeds inputs with their times and stores the state.
//!
//! # Model
//!
//! A [`Rule`] targets a group or one device and has one [`Condition`]: a threshold (`>`,
//! `<`, `==`), a band, a rate of change, or being offline. For each (device, rule) pair a
//! small serializable [`RuleState`] is closed, pending (`forMs` running) or open:
//!
//! - **Fire** when the condition holds continuously for `forMs` (measured on sample
//!   times; one sample where it does not hold restarts the clock). [`tick`] completes a
//!   running `forMs` or offline duration without a new sample.
//! - **Resolve** when the clear condition holds: threshold at or past `clear` (default: the
//!   threshold), band back inside by `margin`, rate at or below `clear` (default: the
//!   limit), device online. Fire and clear never hold together, and firing again needs a
//!   resolution in between: a value hovering at the threshold raises one alert.
//!
//! Each evaluation returns at most one [`Transition`] per rule; [`Transition::to_alert`]
//! builds the [`Alert`] record, whose id is deterministic ([`alert_id`]).
//! [`DeviceState`] holds all rule states of one device and evaluates a rule set at once.
//!
//! # Cost
//!
//! Per applicable rule and sample: a target check (string compares over the device's
//! groups), one tag lookup in the payload (a map lookup, or a scan of the IIoT `values`
//! array) and a few float comparisons. Nothing is allocated or copied unless a transition
//! is produced (rule id, device id and message strings) or a rule sees a device for the
//! first time (its key in [`DeviceState`]). Rules are not indexed by tag or group, so cost
//! grows linearly with the number of rules; the caller should pre-filter rules per group
//! if that number grows large.
//!
//! # Example
//!
//! ```
//! use fleetgate_alerts::{Rule, RuleState, Sample, Transition, evaluate};
//! use serde_json::json;
//!
//! let rule: Rule = serde_json::from_value(json!({
//!     "id": "hot", "name": "Too hot", "target": {"group": "farm-a"},
//!     "condition": {"threshold": {"tag": "temperature", "op": ">", "value": 80, "clear": 78}},
//!     "severity": "warning"
//! })).unwrap();
//! rule.validate().unwrap();
//!
//! let mut state = RuleState::default();
//! let status = json!({"temperature": 81.2, "battery": 40});
//! let t = evaluate(&rule, &mut state, &Sample::new("sensor-001", 1_000, &status));
//! let alert = t.as_ref().and_then(Transition::to_alert).unwrap();
//! assert_eq!(alert.id, "hot:sensor-001:1000");
//! assert_eq!(alert.message, "Too hot on sensor-001: temperature 81.2 > 80");
//!
//! // 79 is inside the hysteresis zone: still open, nothing new.
//! let status = json!({"values": [{"tag": "temperature", "value": 79}], "quality": "good"});
//! assert!(evaluate(&rule, &mut state, &Sample::new("sensor-001", 2_000, &status)).is_none());
//! assert!(state.is_open());
//! ```

mod alert;
mod eval;
mod rule;
mod state;
pub mod tags;

pub use alert::{Alert, Transition, alert_id};
pub use eval::{RuleState, Sample, device_offline, device_online, evaluate, tick};
pub use rule::{
    Band, Condition, MAX_DURATION_MS, MAX_NAME_CHARS, MAX_TAG_BYTES, Offline, Op, Rate, Rule,
    RuleError, Severity, Target, Threshold, applies_to,
};
pub use state::DeviceState;
pub use tags::{Tags, tag_value, tags};
