//! The per-(device, rule) state machine: samples, presence events and ticks in,
//! transitions out.
//!
//! Each rule is closed, pending (its fire condition holds but `forMs` has not elapsed yet)
//! or open (fired, waiting for its clear condition). Fire and clear conditions never hold
//! together (validation keeps `clear` on the right side), so one input yields at most one
//! transition per rule.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::alert::{Transition, message};
use crate::rule::{Condition, Op, Rule};
use crate::tags::tag_value;

/// One status of one device: the payload as reported, and its time.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    /// The reporting device.
    pub device: &'a str,
    /// When the values were measured, ms since the epoch.
    pub at_ms: i64,
    /// The status payload, plain or IIoT shape (see [`mod@crate::tags`]); read, never copied.
    pub payload: &'a Value,
    /// The payload's tags, when already extracted (see [`Sample::indexed`]).
    index: Option<&'a [(&'a str, f64)]>,
}

impl<'a> Sample<'a> {
    /// A sample of `payload` reported by `device` at `at_ms`.
    pub fn new(device: &'a str, at_ms: i64, payload: &'a Value) -> Self {
        Self {
            device,
            at_ms,
            payload,
            index: None,
        }
    }

    /// The same sample, reading tags from `index` (the payload's [`crate::tags`], in order)
    /// instead of the JSON. Evaluating many rules, looking each tag up in the JSON costs most
    /// of the time (measured: about three quarters, in key comparisons).
    pub fn indexed(self, index: &'a [(&'a str, f64)]) -> Self {
        Self {
            index: Some(index),
            ..self
        }
    }

    /// The numeric value of `tag` in this sample, if present.
    pub fn value(&self, tag: &str) -> Option<f64> {
        match self.index {
            // Last entry wins, as in `tag_value`.
            Some(index) => index.iter().rev().find(|(t, _)| *t == tag).map(|(_, v)| *v),
            None => tag_value(self.payload, tag),
        }
    }
}

/// What one (device, rule) pair remembers between evaluations: 64 bytes in memory, a few
/// tens of bytes as JSON. Store it wherever the device's session goes; evaluation resumes
/// exactly where it stopped.
///
/// The serialized keys are short on purpose (they are stored per device and rule):
/// `v` last value, `t` last input time, `s` since when the condition holds (or the
/// device is offline), `f` when the open alert fired. Absent keys mean "none".
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuleState {
    #[serde(rename = "v", skip_serializing_if = "Option::is_none")]
    last_value: Option<f64>,
    #[serde(rename = "t", skip_serializing_if = "Option::is_none")]
    last_at_ms: Option<i64>,
    #[serde(rename = "s", skip_serializing_if = "Option::is_none")]
    since_ms: Option<i64>,
    #[serde(rename = "f", skip_serializing_if = "Option::is_none")]
    fired_at_ms: Option<i64>,
}

impl RuleState {
    /// Whether an alert is open.
    pub fn is_open(&self) -> bool {
        self.fired_at_ms.is_some()
    }

    /// When the open alert fired, if one is open (with rule and device, its id).
    pub fn fired_at_ms(&self) -> Option<i64> {
        self.fired_at_ms
    }

    /// Since when the fire condition has held (or the device has been offline), if it does.
    pub fn since_ms(&self) -> Option<i64> {
        self.since_ms
    }

    /// The earliest time at which [`tick`] could fire this rule, if a duration is running:
    /// `since + forMs` for pending threshold and band rules, `since + seconds` for offline
    /// ones. Lets the caller schedule ticks instead of polling every device.
    pub fn deadline(&self, rule: &Rule) -> Option<i64> {
        if self.fired_at_ms.is_some() {
            return None;
        }
        let since = self.since_ms?;
        let wait = match &rule.condition {
            Condition::Offline(c) => c.seconds.saturating_mul(1000),
            // A rate needs two samples; with no new sample there is nothing to measure.
            Condition::Rate(_) => return None,
            Condition::Threshold(_) | Condition::Band(_) if rule.for_ms > 0 => rule.for_ms,
            Condition::Threshold(_) | Condition::Band(_) => return None,
        };
        Some(since.saturating_add(wait))
    }

    /// The part worth persisting eagerly: losing `v`/`t` costs one rate comparison at most,
    /// losing `s`/`f` restarts a duration or forgets an open alert.
    pub(crate) fn durable(&self) -> (Option<i64>, Option<i64>) {
        (self.since_ms, self.fired_at_ms)
    }
}

/// Feeds one sample to one rule. Samples without the rule's tag, samples older than the
/// last one seen, and all samples of offline rules leave the state untouched.
///
/// Allocates only when it returns a transition.
pub fn evaluate(rule: &Rule, state: &mut RuleState, sample: &Sample<'_>) -> Option<Transition> {
    let tag = rule.condition.tag()?;
    let value = sample.value(tag)?;
    let at = sample.at_ms;
    // Batches and buffered readings can arrive after newer ones; they must not rewind time.
    if state.last_at_ms.is_some_and(|t| at < t) {
        return None;
    }
    let prev = state.last_value.zip(state.last_at_ms);
    state.last_value = Some(value);
    state.last_at_ms = Some(at);
    let (measured, fire, clear) = match &rule.condition {
        Condition::Threshold(c) => {
            let level = c.clear.unwrap_or(c.value);
            match c.op {
                Op::Gt => (value, value > c.value, value <= level),
                Op::Lt => (value, value < c.value, value >= level),
                Op::Eq => (value, value == c.value, value != c.value),
            }
        }
        Condition::Band(c) => {
            let m = c.margin.unwrap_or(0.0);
            let outside = value < c.low || value > c.high;
            let inside = value >= c.low + m && value <= c.high - m;
            (value, outside, inside)
        }
        Condition::Rate(c) => {
            // The first sample only sets the baseline; a same-time sample replaces it
            // (a zero interval has no rate).
            let (pv, pt) = prev?;
            if at == pt {
                return None;
            }
            let rate = (value - pv).abs() * 1000.0 / at.saturating_sub(pt) as f64;
            (
                rate,
                rate > c.per_second,
                rate <= c.clear.unwrap_or(c.per_second),
            )
        }
        Condition::Offline(_) => return None,
    };
    step(rule, state, sample.device, at, measured, fire, clear)
}

/// The shared open/pending/closed logic of sample-driven rules.
fn step(
    rule: &Rule,
    state: &mut RuleState,
    device: &str,
    at: i64,
    measured: f64,
    fire: bool,
    clear: bool,
) -> Option<Transition> {
    if let Some(fired_at_ms) = state.fired_at_ms {
        // Open: only the clear condition matters; hovering in the hysteresis zone does nothing.
        if !clear {
            return None;
        }
        state.fired_at_ms = None;
        state.since_ms = None;
        return Some(resolved(rule, device, measured, at, fired_at_ms));
    }
    if !fire {
        // One false sample resets a running `forMs`: the condition must hold continuously.
        state.since_ms = None;
        return None;
    }
    let since = *state.since_ms.get_or_insert(at);
    if at.saturating_sub(since) < rule.for_ms {
        return None;
    }
    // `since` is only needed while pending; dropping it keeps the stored state short.
    state.since_ms = None;
    state.fired_at_ms = Some(at);
    Some(fired(rule, device, measured, at))
}

/// The device went offline at `at_ms` (its session ended). Starts an offline rule's clock,
/// and fires at once when its `seconds` is 0. Other rules ignore it.
pub fn device_offline(
    rule: &Rule,
    state: &mut RuleState,
    device: &str,
    at_ms: i64,
) -> Option<Transition> {
    if !presence_event(rule, state, at_ms) || state.fired_at_ms.is_some() {
        return None;
    }
    // A repeated offline event keeps the earliest start: the device has been gone since then.
    state.since_ms.get_or_insert(at_ms);
    tick(rule, state, device, at_ms)
}

/// The device came online at `at_ms`. Resolves an open offline alert (its value is the
/// seconds offline) and stops the clock. Other rules ignore it.
pub fn device_online(
    rule: &Rule,
    state: &mut RuleState,
    device: &str,
    at_ms: i64,
) -> Option<Transition> {
    if !presence_event(rule, state, at_ms) {
        return None;
    }
    let since = state.since_ms.take();
    let fired_at_ms = state.fired_at_ms.take()?;
    let offline_s = seconds(at_ms, since.unwrap_or(fired_at_ms));
    Some(resolved(rule, device, offline_s, at_ms, fired_at_ms))
}

/// Records a presence event of an offline rule; false for other rules and for events
/// older than the last one (on a node move, the old node's "offline" can arrive after the
/// new node's "online").
fn presence_event(rule: &Rule, state: &mut RuleState, at_ms: i64) -> bool {
    if !matches!(rule.condition, Condition::Offline(_))
        || state.last_at_ms.is_some_and(|t| at_ms < t)
    {
        return false;
    }
    state.last_at_ms = Some(at_ms);
    true
}

/// Fires a rule whose duration elapsed without a new input: offline rules after `seconds`,
/// threshold and band rules after `forMs` (with the last sample's value, which still
/// holds as far as anyone knows). Call it at or after [`RuleState::deadline`].
pub fn tick(rule: &Rule, state: &mut RuleState, device: &str, now_ms: i64) -> Option<Transition> {
    let deadline = state.deadline(rule)?;
    if now_ms < deadline {
        return None;
    }
    let value = match rule.condition {
        // Offline rules keep `since`: the resolution reports the whole time offline.
        Condition::Offline(_) => seconds(now_ms, state.since_ms?),
        _ => {
            let v = state.last_value?;
            state.since_ms = None;
            v
        }
    };
    state.fired_at_ms = Some(now_ms);
    Some(fired(rule, device, value, now_ms))
}

fn seconds(to_ms: i64, from_ms: i64) -> f64 {
    to_ms.saturating_sub(from_ms) as f64 / 1000.0
}

fn fired(rule: &Rule, device: &str, value: f64, at_ms: i64) -> Transition {
    Transition::Fired {
        rule_id: rule.id.clone(),
        device: device.to_owned(),
        value,
        at_ms,
        severity: rule.severity,
        message: message(rule, device, value),
    }
}

fn resolved(rule: &Rule, device: &str, value: f64, at_ms: i64, fired_at_ms: i64) -> Transition {
    Transition::Resolved {
        rule_id: rule.id.clone(),
        device: device.to_owned(),
        value,
        at_ms,
        fired_at_ms,
    }
}

#[cfg(test)]
mod tests;
