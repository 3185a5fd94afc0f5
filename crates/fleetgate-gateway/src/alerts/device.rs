//! One connected device's rules and rule states, kept by its session.

use fleetgate_alerts::{Condition, DeviceState, Rule, Sample, Transition, applies_to};
use serde_json::Value;

use super::{emit, load_state, save_state};
use crate::Shared;

/// The rules that apply to one device, as of a rule-set generation, and their states.
/// Sessions hold one only once some rule exists, so idle devices of a rule-free fleet pay
/// one empty `Option`.
pub(crate) struct DeviceAlerts {
    generation: u64,
    rules: Vec<Rule>,
    state: DeviceState,
}

impl DeviceAlerts {
    /// Brings `slot` up to the node's current rules: the first time, the stored states are
    /// read (the device may come from another node). `None` when no rule exists at all.
    async fn sync<'a>(
        slot: &'a mut Option<Box<DeviceAlerts>>,
        shared: &Shared,
        device: &str,
        groups: &[String],
    ) -> Option<&'a mut DeviceAlerts> {
        let set = shared.alerts.rules();
        if set.rules.is_empty() && slot.is_none() {
            return None;
        }
        if slot.as_ref().map(|a| a.generation) != Some(set.generation) {
            let rules: Vec<Rule> = set
                .rules
                .iter()
                .filter(|r| applies_to(r, device, groups))
                .cloned()
                .collect();
            let state = match slot.take() {
                Some(old) => old.state,
                // A device no rule applies to is not worth a read.
                None if rules.is_empty() => DeviceState::default(),
                None => load_state(&*shared.bus, device).await,
            };
            let mut alerts = Box::new(DeviceAlerts {
                generation: set.generation,
                rules,
                state,
            });
            alerts.state.retain(&alerts.rules, device, groups);
            *slot = Some(alerts);
        }
        slot.as_deref_mut()
    }

    /// Evaluates an accepted status taken at `at_ms` (the device's timestamp: durations and
    /// rates are measured on when values were taken, so a batch replayed later still
    /// evaluates in its own time).
    pub(crate) async fn on_status(
        slot: &mut Option<Box<DeviceAlerts>>,
        shared: &Shared,
        device: &str,
        groups: &[String],
        payload: &Value,
        at_ms: i64,
    ) {
        let Some(a) = Self::sync(slot, shared, device, groups).await else {
            return;
        };
        if a.rules.is_empty() {
            return;
        }
        shared.alerts.metrics.evaluations.inc();
        let mut out = Vec::new();
        let dirty = a.state.evaluate(
            &a.rules,
            groups,
            &Sample::new(device, at_ms, payload),
            &mut out,
        );
        a.finish(shared, device, groups, dirty, &out).await;
    }

    /// The device came online (`online`) or went offline at `now_ms`. Coming online
    /// resolves its open offline alerts; going offline starts their clocks and hands the
    /// device to the node's offline watch, which fires them if it stays away.
    pub(crate) async fn on_presence(
        slot: &mut Option<Box<DeviceAlerts>>,
        shared: &Shared,
        device: &str,
        groups: &[String],
        online: bool,
        now_ms: i64,
    ) {
        // Checked before `sync`: a connect or close must not cost a state read for devices
        // that only have reading-driven rules (a reconnect storm would pay it per device).
        if !has_offline_rule(shared, device, groups) {
            return;
        }
        let Some(a) = Self::sync(slot, shared, device, groups).await else {
            return;
        };
        shared.alerts.metrics.evaluations.inc();
        let mut out = Vec::new();
        let dirty = if online {
            a.state
                .device_online(&a.rules, device, groups, now_ms, &mut out)
        } else {
            a.state
                .device_offline(&a.rules, device, groups, now_ms, &mut out)
        };
        a.finish(shared, device, groups, dirty, &out).await;
        if !online && let Some(deadline) = a.state.next_deadline(&a.rules, device, groups) {
            shared.alerts.offline.watch(device, groups, deadline);
        }
    }

    async fn finish(
        &self,
        shared: &Shared,
        device: &str,
        groups: &[String],
        dirty: bool,
        out: &[Transition],
    ) {
        // Alerts first: a node dying between the two leaves the stored state behind, so the
        // next node raises the alert again rather than never (at least once).
        for t in out {
            emit(shared, &self.rules, groups, t).await;
        }
        if dirty {
            save_state(shared, device, &self.state).await;
        }
    }
}

fn has_offline_rule(shared: &Shared, device: &str, groups: &[String]) -> bool {
    shared
        .alerts
        .rules()
        .rules
        .iter()
        .any(|r| matches!(r.condition, Condition::Offline(_)) && applies_to(r, device, groups))
}
