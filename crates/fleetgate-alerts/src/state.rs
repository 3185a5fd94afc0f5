//! All rule states of one device, and evaluation of a rule set against it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::alert::Transition;
use crate::eval::{self, RuleState, Sample};
use crate::rule::{Rule, applies_to};

/// The states of every rule that has seen one device, keyed by rule id. Serializes as a
/// JSON object `{ruleId: RuleState}`: one value to store per device.
///
/// Each method returns whether the durable part changed (an alert opened or closed, a
/// duration started or reset), i.e. whether storing the state now is worth it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceState {
    rules: BTreeMap<String, RuleState>,
}

impl DeviceState {
    /// The state of one rule, if it has one.
    pub fn get(&self, rule_id: &str) -> Option<&RuleState> {
        self.rules.get(rule_id)
    }

    /// Whether no rule has state for this device.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any alert is open on this device.
    pub fn any_open(&self) -> bool {
        self.rules.values().any(RuleState::is_open)
    }

    /// Feeds a sample to every rule of `rules` that applies to the device, appending
    /// transitions to `out`. Allocates only for transitions and for a rule's first state.
    pub fn evaluate<S: AsRef<str>>(
        &mut self,
        rules: &[Rule],
        groups: &[S],
        sample: &Sample<'_>,
        out: &mut Vec<Transition>,
    ) -> bool {
        // With a few rules, one pass over the payload for all of them beats a lookup in the
        // JSON per rule (measured: the pass costs about as much as two lookups).
        let index: Vec<(&str, f64)> = if rules.len() >= 3 {
            crate::tags::tags(sample.payload).collect()
        } else {
            Vec::new()
        };
        let sample = if rules.len() >= 3 {
            sample.indexed(&index)
        } else {
            *sample
        };
        self.each(rules, sample.device, groups, out, |rule, state| {
            eval::evaluate(rule, state, &sample)
        })
    }

    /// Tells the offline rules that apply that the device went offline at `at_ms`.
    pub fn device_offline<S: AsRef<str>>(
        &mut self,
        rules: &[Rule],
        device: &str,
        groups: &[S],
        at_ms: i64,
        out: &mut Vec<Transition>,
    ) -> bool {
        self.each(rules, device, groups, out, |rule, state| {
            eval::device_offline(rule, state, device, at_ms)
        })
    }

    /// Tells the offline rules that apply that the device came online at `at_ms`.
    pub fn device_online<S: AsRef<str>>(
        &mut self,
        rules: &[Rule],
        device: &str,
        groups: &[S],
        at_ms: i64,
        out: &mut Vec<Transition>,
    ) -> bool {
        self.each(rules, device, groups, out, |rule, state| {
            eval::device_online(rule, state, device, at_ms)
        })
    }

    /// Fires the rules of this device whose duration elapsed by `now_ms`.
    pub fn tick<S: AsRef<str>>(
        &mut self,
        rules: &[Rule],
        device: &str,
        groups: &[S],
        now_ms: i64,
        out: &mut Vec<Transition>,
    ) -> bool {
        self.each(rules, device, groups, out, |rule, state| {
            eval::tick(rule, state, device, now_ms)
        })
    }

    /// The earliest [`RuleState::deadline`] over the rules that apply: when to tick next.
    pub fn next_deadline<S: AsRef<str>>(
        &self,
        rules: &[Rule],
        device: &str,
        groups: &[S],
    ) -> Option<i64> {
        rules
            .iter()
            .filter(|r| applies_to(r, device, groups))
            .filter_map(|r| self.rules.get(&r.id)?.deadline(r))
            .min()
    }

    /// Drops the states of rules that no longer exist or no longer apply to the device.
    /// Their open alerts stay open in the alert store: resolve those there.
    pub fn retain<S: AsRef<str>>(&mut self, rules: &[Rule], device: &str, groups: &[S]) {
        self.rules.retain(|id, _| {
            rules
                .iter()
                .any(|r| r.id == *id && applies_to(r, device, groups))
        });
    }

    /// Runs `f` on the state of each applicable rule. A missing state is created only when
    /// `f` leaves it non-default, so rules whose tag a device never reports cost no storage.
    fn each<S: AsRef<str>>(
        &mut self,
        rules: &[Rule],
        device: &str,
        groups: &[S],
        out: &mut Vec<Transition>,
        mut f: impl FnMut(&Rule, &mut RuleState) -> Option<Transition>,
    ) -> bool {
        let mut changed = false;
        for rule in rules.iter().filter(|r| applies_to(r, device, groups)) {
            let (t, durable_changed) = match self.rules.get_mut(&rule.id) {
                Some(state) => {
                    let before = state.durable();
                    let t = f(rule, state);
                    (t, state.durable() != before)
                }
                None => {
                    let mut state = RuleState::default();
                    let t = f(rule, &mut state);
                    let durable_changed = state.durable() != RuleState::default().durable();
                    if state != RuleState::default() {
                        self.rules.insert(rule.id.clone(), state);
                    }
                    (t, durable_changed)
                }
            };
            changed |= durable_changed;
            out.extend(t);
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rules() -> Vec<Rule> {
        serde_json::from_value(json!([
            {"id":"hot","target":{"group":"farm-a"},
             "condition":{"threshold":{"tag":"temperature","op":">","value":80,"clear":78}}},
            {"id":"low-batt","target":{"device":"s1"},
             "condition":{"threshold":{"tag":"battery","op":"<","value":20}},"forMs":10000},
            {"id":"gone","target":{"group":"farm-a"},"condition":{"offline":{"seconds":60}}},
            {"id":"other","target":{"group":"farm-b"},
             "condition":{"threshold":{"tag":"temperature","op":">","value":0}}}
        ]))
        .unwrap()
    }

    #[test]
    fn evaluates_only_applicable_rules_and_reports_durable_changes() {
        let rules = rules();
        let groups = ["farm-a"];
        let mut st = DeviceState::default();
        let mut out = Vec::new();
        let p = json!({"temperature": 79, "battery": 50});
        // First sample: states created (baseline), nothing durable, no "other" state.
        assert!(!st.evaluate(&rules, &groups, &Sample::new("s1", 0, &p), &mut out));
        assert!(out.is_empty());
        assert!(st.get("hot").is_some() && st.get("low-batt").is_some());
        assert!(st.get("other").is_none() && st.get("gone").is_none());

        let p = json!({"temperature": 81, "battery": 10});
        assert!(st.evaluate(&rules, &groups, &Sample::new("s1", 1_000, &p), &mut out));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].alert_id(), "hot:s1:1000");
        assert!(st.any_open());
        assert_eq!(st.next_deadline(&rules, "s1", &groups), Some(11_000));

        out.clear();
        assert!(!st.tick(&rules, "s1", &groups, 10_999, &mut out));
        assert!(st.tick(&rules, "s1", &groups, 11_000, &mut out));
        assert_eq!(out[0].alert_id(), "low-batt:s1:11000");
        assert_eq!(st.next_deadline(&rules, "s1", &groups), None);

        out.clear();
        assert!(st.device_offline(&rules, "s1", &groups, 20_000, &mut out));
        assert_eq!(st.next_deadline(&rules, "s1", &groups), Some(80_000));
        assert!(st.tick(&rules, "s1", &groups, 80_000, &mut out));
        assert!(st.device_online(&rules, "s1", &groups, 90_000, &mut out));
        assert!(matches!(&out[..], [
            Transition::Fired { rule_id: a, value: v1, .. },
            Transition::Resolved { rule_id: b, value: v2, fired_at_ms: 80_000, .. },
        ] if a == "gone" && b == "gone" && *v1 == 60.0 && *v2 == 70.0));

        // The whole device state survives a JSON round trip.
        let back: DeviceState = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        assert_eq!(back, st);

        // Leaving farm-a drops the group rules' states but keeps the device rule.
        st.retain(&rules, "s1", &["farm-b"]);
        assert!(st.get("hot").is_none() && st.get("gone").is_none());
        assert!(st.get("low-batt").is_some());
    }

    #[test]
    fn stale_offline_after_online_is_ignored() {
        // A node move: the new node reports "online" before the old node's "offline" lands.
        let rules = rules();
        let mut st = DeviceState::default();
        let mut out = Vec::new();
        assert!(!st.device_online(&rules, "s9", &["farm-a"], 5_000, &mut out));
        assert!(!st.device_offline(&rules, "s9", &["farm-a"], 4_000, &mut out));
        assert!(!st.tick(&rules, "s9", &["farm-a"], 1_000_000, &mut out));
        assert!(out.is_empty());
        assert_eq!(st.next_deadline(&rules, "s9", &["farm-a"]), None);
        // A device that never reports a rule's tag gets no state for it.
        let p = json!({"humidity": 3});
        st.evaluate(&rules, &["farm-a"], &Sample::new("s9", 6_000, &p), &mut out);
        assert!(st.get("hot").is_none() && st.get("gone").is_some());
    }
}
