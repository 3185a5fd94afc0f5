//! Validation of device frames after decoding: identity, clock skew, replay, batch shape.

use std::collections::{HashSet, VecDeque};

use crate::{Envelope, MessageKind, MsgId, ProtocolError};

/// Protocol limits; the defaults are DESIGN.md's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Largest accepted difference between a message's timestamp and server time.
    pub max_skew_ms: i64,
    /// How long a msgid is remembered per device to refuse replays.
    pub replay_window_ms: i64,
    /// Most msgids remembered per connection; older ones age out early under high rates.
    pub replay_capacity: usize,
    /// Most items in one batch.
    pub max_batch_items: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1024 * 1024,
            max_skew_ms: 5 * 60 * 1000,
            replay_window_ms: 10 * 60 * 1000,
            replay_capacity: 1024,
            max_batch_items: 1000,
        }
    }
}

/// Checks a message frame received from `device_id` at `now_ms`: sender identity, direction
/// and clock skew. Batch items are checked by [`batch_items`].
///
/// # Errors
/// [`ProtocolError::SpoofedFrom`], [`ProtocolError::UnexpectedType`] (a device sent a
/// command), [`ProtocolError::ClockSkew`].
pub fn check_from_device(
    env: &Envelope,
    device_id: &str,
    now_ms: i64,
    limits: &Limits,
) -> Result<(), ProtocolError> {
    if env.from != device_id {
        return Err(ProtocolError::SpoofedFrom);
    }
    if matches!(env.kind, MessageKind::Command | MessageKind::Delta) {
        return Err(ProtocolError::UnexpectedType(env.kind.as_str()));
    }
    let skew_ms = env.timestamp.saturating_sub(now_ms);
    // unsigned_abs: `i64::MIN.abs()` overflows, and in release builds it wraps to a negative
    // number that would pass the check.
    if skew_ms.unsigned_abs() > limits.max_skew_ms.unsigned_abs() {
        return Err(ProtocolError::ClockSkew { skew_ms });
    }
    Ok(())
}

/// Extracts and checks the items of a batch sent by `device_id`: each must be a status or
/// event envelope from that device, within the skew window.
///
/// # Errors
/// [`ProtocolError::BadBatch`] when `payload.items` is missing, too long, or holds a batch or
/// command; any error of [`check_from_device`] or of decoding an item.
pub fn batch_items(
    batch: &Envelope,
    device_id: &str,
    now_ms: i64,
    limits: &Limits,
) -> Result<Vec<Envelope>, ProtocolError> {
    let items = batch
        .payload
        .get("items")
        .and_then(|v| v.as_array())
        .ok_or_else(|| ProtocolError::BadBatch("payload.items must be an array".into()))?;
    if items.len() > limits.max_batch_items {
        return Err(ProtocolError::BadBatch(format!(
            "{} items exceed the limit of {}",
            items.len(),
            limits.max_batch_items
        )));
    }
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let env = crate::json::envelope_from_value(item, device_id)?;
        if !matches!(env.kind, MessageKind::Status | MessageKind::Event) {
            return Err(ProtocolError::BadBatch(format!(
                "items must be status or event, not {}",
                env.kind.as_str()
            )));
        }
        check_from_device(&env, device_id, now_ms, limits)?;
        out.push(env);
    }
    Ok(out)
}

/// The msgids one device sent recently, to refuse replays. Allocates nothing until the first
/// message, so an idle connection pays only for the empty struct.
///
/// It keeps 64-bit fingerprints, not the msgids: about 26 bytes per remembered message instead
/// of about 120, which matters for a device reporting every few seconds over a 10-minute
/// window. A collision would only refuse one of the device's own messages (probability about
/// n²/2⁶⁵ for n remembered msgids), and only the device chooses its msgids.
#[derive(Debug, Default)]
pub struct ReplayWindow {
    msgids: Seen,
    /// Nonces of signed messages ([`crate::mac`]); allocated at the first one.
    nonces: Option<Box<Seen>>,
}

/// Fingerprints seen recently, in arrival order, so the oldest expire first.
#[derive(Debug, Default)]
struct Seen {
    set: HashSet<u64>,
    order: VecDeque<(i64, u64)>,
}

impl Seen {
    fn expire(&mut self, now_ms: i64, window_ms: i64, capacity: usize) {
        while let Some((at, _)) = self.order.front() {
            if now_ms - at > window_ms || self.order.len() >= capacity {
                let (_, old) = self.order.pop_front().expect("front exists");
                self.set.remove(&old);
            } else {
                break;
            }
        }
    }

    /// Records `fp`; `false` if it was already there.
    fn insert(&mut self, fp: u64, now_ms: i64, window_ms: i64, capacity: usize) -> bool {
        self.expire(now_ms, window_ms, capacity);
        if self.set.contains(&fp) {
            return false;
        }
        if capacity > 0 {
            self.set.insert(fp);
            self.order.push_back((now_ms, fp));
        }
        true
    }
}

fn fingerprint(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl ReplayWindow {
    /// Records `msgid` (sent at `timestamp`) and refuses it if it was seen inside the window.
    /// A retransmission (`dup`) of a remembered msgid is answered, not refused, so the caller
    /// learns it with `Ok(false)` and skips reprocessing.
    ///
    /// # Errors
    /// [`ProtocolError::Replay`] for a remembered msgid sent again without `dup`.
    pub fn check(
        &mut self,
        msgid: &MsgId,
        dup: bool,
        now_ms: i64,
        limits: &Limits,
    ) -> Result<bool, ProtocolError> {
        let fp = fingerprint(msgid.as_str());
        if self
            .msgids
            .insert(fp, now_ms, limits.replay_window_ms, limits.replay_capacity)
        {
            Ok(true)
        } else if dup {
            Ok(false)
        } else {
            Err(ProtocolError::Replay)
        }
    }

    /// Records the nonce of a verified signed message and refuses one seen inside the window.
    /// Unlike msgids there is no `dup` exception: a retransmission is signed with a new nonce.
    /// Nonces are kept for at least twice the clock skew allowed, so a frame replayed after
    /// its nonce expired is already refused for its timestamp (up to `replay_capacity`).
    ///
    /// # Errors
    /// [`MacError::NonceReused`] for a nonce seen before.
    pub fn check_nonce(
        &mut self,
        nonce: &str,
        now_ms: i64,
        limits: &Limits,
    ) -> Result<(), crate::MacError> {
        let nonces = self.nonces.get_or_insert_with(Box::default);
        let window = limits
            .replay_window_ms
            .max(limits.max_skew_ms.saturating_mul(2));
        if nonces.insert(fingerprint(nonce), now_ms, window, limits.replay_capacity) {
            Ok(())
        } else {
            Err(crate::MacError::NonceReused)
        }
    }

    /// Forgets `msgid`, so that its next arrival counts as new: for a message that was
    /// checked but then could not be stored, whose retransmission must be processed.
    pub fn forget(&mut self, msgid: &MsgId) {
        let fp = fingerprint(msgid.as_str());
        if self.msgids.set.remove(&fp) {
            self.msgids.order.retain(|(_, id)| *id != fp);
        }
    }

    /// Number of msgids remembered.
    pub fn len(&self) -> usize {
        self.msgids.order.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.msgids.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Qos;
    use serde_json::json;

    fn env(from: &str, kind: MessageKind, ts: i64) -> Envelope {
        Envelope {
            ver: "1.0".into(),
            msgid: MsgId::new("m1").unwrap(),
            timestamp: ts,
            from: from.into(),
            to: "server".into(),
            kind,
            payload: json!({}),
            qos: Qos::AtMostOnce,
            retain: false,
            dup: false,
            sig: None,
        }
    }

    #[test]
    fn spoofed_from_is_refused() {
        let l = Limits::default();
        let e = env("other", MessageKind::Status, 1000);
        assert_eq!(
            check_from_device(&e, "me", 1000, &l),
            Err(ProtocolError::SpoofedFrom)
        );
        assert_eq!(
            check_from_device(&env("me", MessageKind::Status, 1000), "me", 1000, &l),
            Ok(())
        );
    }

    #[test]
    fn commands_from_devices_are_refused() {
        let l = Limits::default();
        let e = env("me", MessageKind::Command, 1000);
        assert_eq!(
            check_from_device(&e, "me", 1000, &l),
            Err(ProtocolError::UnexpectedType("command"))
        );
    }

    #[test]
    fn deltas_from_devices_are_refused() {
        let e = env("me", MessageKind::Delta, 1000);
        assert_eq!(
            check_from_device(&e, "me", 1000, &Limits::default()),
            Err(ProtocolError::UnexpectedType("delta"))
        );
    }

    #[test]
    fn skew_window_is_inclusive_and_symmetric() {
        let l = Limits::default();
        let now = 10_000_000;
        for ts in [now - l.max_skew_ms, now + l.max_skew_ms] {
            assert!(check_from_device(&env("me", MessageKind::Event, ts), "me", now, &l).is_ok());
        }
        for ts in [now - l.max_skew_ms - 1, now + l.max_skew_ms + 1] {
            assert!(matches!(
                check_from_device(&env("me", MessageKind::Event, ts), "me", now, &l),
                Err(ProtocolError::ClockSkew { .. })
            ));
        }
    }

    #[test]
    fn forgotten_msgids_count_as_new() {
        let l = Limits::default();
        let mut w = ReplayWindow::default();
        let a = MsgId::new("a").unwrap();
        assert_eq!(w.check(&a, false, 0, &l), Ok(true));
        w.forget(&a);
        assert!(w.is_empty());
        assert_eq!(w.check(&a, true, 1, &l), Ok(true));
        assert_eq!(w.check(&a, true, 2, &l), Ok(false));
    }

    #[test]
    fn extreme_timestamps_are_skewed_not_overflowed() {
        let l = Limits::default();
        for ts in [i64::MIN, i64::MAX] {
            assert!(matches!(
                check_from_device(&env("me", MessageKind::Status, ts), "me", 1_000_000, &l),
                Err(ProtocolError::ClockSkew { .. })
            ));
        }
    }

    #[test]
    fn replay_window_refuses_repeats_and_forgets_after_window() {
        let l = Limits {
            replay_capacity: 3,
            ..Limits::default()
        };
        let mut w = ReplayWindow::default();
        let a = MsgId::new("a").unwrap();
        assert_eq!(w.check(&a, false, 0, &l), Ok(true));
        assert_eq!(w.check(&a, false, 1, &l), Err(ProtocolError::Replay));
        assert_eq!(w.check(&a, true, 1, &l), Ok(false));
        assert_eq!(w.check(&a, false, l.replay_window_ms + 1, &l), Ok(true));
        for (i, id) in ["b", "c", "d", "e"].iter().enumerate() {
            w.check(
                &MsgId::new(*id).unwrap(),
                false,
                l.replay_window_ms + 2 + i as i64,
                &l,
            )
            .unwrap();
        }
        assert!(w.len() <= 3, "bounded by replay_capacity");
    }
}
