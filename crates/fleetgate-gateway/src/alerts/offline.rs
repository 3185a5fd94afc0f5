//! Offline rules of devices that left this node: the node that held a device when it went
//! away times its offline rules, and fires them unless the device is back (on any node).
//!
//! The timers are this node's memory: when the node itself dies, its devices' offline rules
//! do not fire (their presence is swept by the survivors, which hold no timers for them).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetgate_alerts::{Rule, applies_to};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{emit, load_state, save_state};
use crate::{Shared, now_ms};

/// One device's next offline deadline.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    deadline_ms: i64,
    device: String,
    groups: Vec<String>,
}

/// Deadlines in a bounded heap, earliest first.
pub(crate) struct OfflineWatch {
    heap: Mutex<BinaryHeap<Reverse<Entry>>>,
    capacity: usize,
    wake: Notify,
}

impl OfflineWatch {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            heap: Mutex::new(BinaryHeap::new()),
            capacity: capacity.max(1),
            wake: Notify::new(),
        }
    }

    /// Times `device` until `deadline_ms`. Past the capacity the device is not timed (and a
    /// warning says so): a mass disconnect must not grow memory without bound.
    pub(crate) fn watch(&self, device: &str, groups: &[String], deadline_ms: i64) {
        let mut heap = self.heap.lock().unwrap_or_else(|p| p.into_inner());
        if heap.len() >= self.capacity {
            warn!(message = "offline watch full; an offline rule will not fire", %device);
            return;
        }
        let earliest = heap.peek().is_none_or(|e| deadline_ms < e.0.deadline_ms);
        heap.push(Reverse(Entry {
            deadline_ms,
            device: device.to_owned(),
            groups: groups.to_vec(),
        }));
        drop(heap);
        if earliest {
            self.wake.notify_one();
        }
    }

    fn pop_due(&self, now_ms: i64) -> Result<Entry, Option<i64>> {
        let mut heap = self.heap.lock().unwrap_or_else(|p| p.into_inner());
        match heap.peek() {
            Some(e) if e.0.deadline_ms <= now_ms => Ok(heap.pop().expect("peeked").0),
            Some(e) => Err(Some(e.0.deadline_ms)),
            None => Err(None),
        }
    }
}

/// Fires due offline rules until `stop`.
pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let watch = &shared.alerts.offline;
    loop {
        let wait = match watch.pop_due(now_ms()) {
            Ok(entry) => {
                fire(&shared, entry).await;
                continue;
            }
            Err(Some(next)) => Duration::from_millis(u64::try_from(next - now_ms()).unwrap_or(0)),
            // Nothing timed: sleep until something is.
            Err(None) => Duration::from_secs(3600),
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = watch.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn fire(shared: &Shared, entry: Entry) {
    let Entry { device, groups, .. } = entry;
    match shared.bus.presence_get(&device).await {
        // Back, here or elsewhere: its session resolved or reset the clock.
        Ok(Some(_)) => return,
        Ok(None) => {}
        Err(error) => {
            warn!(message = "offline rule skipped: presence unknown", %device, %error);
            return;
        }
    }
    let set = shared.alerts.rules();
    let rules: Vec<Rule> = set
        .rules
        .iter()
        .filter(|r| applies_to(r, &device, &groups))
        .cloned()
        .collect();
    let mut state = load_state(&*shared.bus, &device).await;
    let now = now_ms();
    let mut out = Vec::new();
    let dirty = state.tick(&rules, &device, &groups, now, &mut out);
    for t in &out {
        emit(shared, &rules, &groups, t).await;
    }
    if dirty {
        save_state(shared, &device, &state).await;
    }
    if let Some(next) = state.next_deadline(&rules, &device, &groups)
        && next > now
    {
        shared.alerts.offline.watch(&device, &groups, next);
    }
}
