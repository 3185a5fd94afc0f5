//! The sessions this node holds, by device ID.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use fleetgate_bus::Command;
use fleetgate_protocol::{CloseCode, ReplayWindow};
use std::sync::Arc;
use tokio::time::Instant;

use crate::outbox::{Outbox, PushError};

/// What a session is told from outside its own socket. Kept pointer-sized where it can be,
/// since every idle session's outbox pre-allocates a block of these.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// Commands were queued for the device: read its queue.
    Deliver,
    /// A QoS 0 command to write as is.
    Command(Box<Command>),
    /// Close the session.
    Close(Box<(CloseCode, String)>),
    /// Desired state changed: send the delta `(version, state)`.
    Delta(Box<(u64, serde_json::Map<String, serde_json::Value>)>),
    /// What an MQTT device published, for the node that holds it.
    Mqtt(Box<crate::mqtt::device::Inbound>),
}

/// A session as seen by the rest of the node.
pub(crate) struct SessionHandle {
    pub(crate) conn_id: u64,
    pub(crate) outbox: Arc<Outbox<Outbound>>,
    /// A `Deliver` sits in the outbox unread: more are coalesced into it, so a burst of
    /// commands to one device cannot fill its outbox with wake-ups and get it dropped.
    pub(crate) deliver_queued: bool,
}

/// Outcome of offering a message to a session.
pub(crate) enum Offer {
    Sent,
    NoSession,
    /// The outbox was full: the session is a slow consumer; its outbox is closed, which ends
    /// it, and it is gone from the registry.
    Dropped,
}

/// Sessions by device ID. Short critical sections only; never held across `.await`.
#[derive(Default)]
pub(crate) struct Sessions {
    inner: Mutex<HashMap<String, SessionHandle>>,
}

impl Sessions {
    /// Registers a session, returning the one it replaces.
    pub(crate) fn insert(&self, device: &str, handle: SessionHandle) -> Option<SessionHandle> {
        self.lock().insert(device.to_owned(), handle)
    }

    /// Removes `device`'s session if it is still connection `conn_id`.
    pub(crate) fn remove(&self, device: &str, conn_id: u64) -> bool {
        let mut map = self.lock();
        if map.get(device).is_some_and(|h| h.conn_id == conn_id) {
            map.remove(device);
            true
        } else {
            false
        }
    }

    /// Offers `msg` to `device`'s session (only connection `conn_id`, if given) without
    /// waiting.
    pub(crate) fn offer(&self, device: &str, conn_id: Option<u64>, msg: Outbound) -> Offer {
        let mut map = self.lock();
        let Some(handle) = map.get_mut(device) else {
            return Offer::NoSession;
        };
        if conn_id.is_some_and(|c| c != handle.conn_id) {
            return Offer::NoSession;
        }
        let deliver = matches!(msg, Outbound::Deliver);
        if deliver && handle.deliver_queued {
            return Offer::Sent;
        }
        match handle.outbox.try_push(msg) {
            Ok(()) => {
                handle.deliver_queued |= deliver;
                Offer::Sent
            }
            Err(PushError::Closed) => Offer::NoSession,
            Err(PushError::Full) => {
                handle.outbox.close();
                map.remove(device);
                Offer::Dropped
            }
        }
    }

    /// The session took its `Deliver` from the outbox: the next one must be sent.
    pub(crate) fn deliver_taken(&self, device: &str, conn_id: u64) {
        if let Some(h) = self.lock().get_mut(device).filter(|h| h.conn_id == conn_id) {
            h.deliver_queued = false;
        }
    }

    /// Every session's device and connection ID.
    pub(crate) fn list(&self) -> Vec<(String, u64)> {
        self.lock()
            .iter()
            .map(|(device, h)| (device.clone(), h.conn_id))
            .collect()
    }

    /// Senders of every session, for drain.
    pub(crate) fn snapshot(&self) -> Vec<Arc<Outbox<Outbound>>> {
        self.lock().values().map(|h| h.outbox.clone()).collect()
    }

    /// Number of sessions.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionHandle>> {
        // A panic while holding this lock cannot leave the map half-updated (every critical
        // section is a single map operation), so a poisoned lock is safe to reuse.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Most stale presence entries remembered; past it, the oldest are forgotten (they then stay
/// until their device connects again, or this node's membership ends).
const MAX_STALE_PRESENCE: usize = 100_000;

/// Presence entries of sessions that closed while the bus was away, to delete (compare-and-
/// delete by connection) once it is back: otherwise they would name this live node for a
/// device it no longer holds, and the device would read as online.
#[derive(Default)]
pub(crate) struct StalePresence {
    inner: Mutex<std::collections::VecDeque<(String, u64)>>,
}

impl StalePresence {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(String, u64)>> {
        // One push or one take per critical section: a poisoned queue is consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers `device`'s entry for connection `conn_id`.
    pub(crate) fn push(&self, device: &str, conn_id: u64) {
        let mut q = self.lock();
        if q.len() >= MAX_STALE_PRESENCE {
            q.pop_front();
        }
        q.push_back((device.to_owned(), conn_id));
    }

    /// Takes every remembered entry.
    pub(crate) fn take(&self) -> Vec<(String, u64)> {
        self.lock().drain(..).collect()
    }
}

/// Most replay windows kept for disconnected devices; past it, windows are not kept (the
/// device's QoS 2 dedupe, which lives in the bus, is unaffected).
const MAX_PARKED_WINDOWS: usize = 100_000;

/// Replay windows of devices that disconnected recently, so that a device reconnecting to
/// this node keeps its window: replay protection is per device, not per connection. Entries
/// leave when the device comes back or when they are older than the replay window. A device
/// that reconnects to another node starts with an empty window there.
#[derive(Default)]
pub(crate) struct ParkedWindows {
    inner: Mutex<HashMap<String, (Instant, ReplayWindow)>>,
}

impl ParkedWindows {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, ReplayWindow)>> {
        // Each critical section is one map operation or a retain: a poisoned map is consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The window `device` left behind, if any.
    pub(crate) fn take(&self, device: &str) -> ReplayWindow {
        self.lock()
            .remove(device)
            .map(|(_, w)| w)
            .unwrap_or_default()
    }

    /// Keeps a closing session's window (an empty one costs nothing to forget).
    pub(crate) fn park(&self, device: &str, window: ReplayWindow) {
        if window.is_empty() {
            return;
        }
        let mut map = self.lock();
        if map.len() < MAX_PARKED_WINDOWS || map.contains_key(device) {
            map.insert(device.to_owned(), (Instant::now(), window));
        }
    }

    /// Drops windows parked longer than `max_age`.
    pub(crate) fn sweep(&self, max_age: Duration) {
        let now = Instant::now();
        self.lock()
            .retain(|_, (at, _)| now.duration_since(*at) < max_age);
    }

    /// Number of parked windows.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate_protocol::{Limits, MsgId};

    #[tokio::test(start_paused = true)]
    async fn a_parked_window_comes_back_and_old_ones_are_swept() {
        let parked = ParkedWindows::default();
        let limits = Limits::default();
        let mut w = ReplayWindow::default();
        let m = MsgId::new("m1").unwrap();
        w.check(&m, false, 0, &limits).unwrap();
        parked.park("dev", w);
        parked.park("idle", ReplayWindow::default());
        assert_eq!(parked.len(), 1, "empty windows are not kept");
        let mut back = parked.take("dev");
        assert!(
            back.check(&m, false, 1, &limits).is_err(),
            "the msgid is still remembered"
        );
        assert_eq!(parked.len(), 0);
        parked.park("dev", back);
        tokio::time::advance(Duration::from_secs(601)).await;
        parked.sweep(Duration::from_secs(600));
        assert_eq!(parked.len(), 0);
    }
}
