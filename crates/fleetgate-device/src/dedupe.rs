//! Remembers recently received commands and the answers given, so a redelivery is answered
//! again instead of being run twice. Bounded: the oldest msgid is forgotten first.

use std::collections::{HashMap, VecDeque};

use fleetgate_protocol::{MsgId, Qos};
use serde_json::Value;

/// Where a received command stands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CmdState {
    /// Handed to the app, not answered yet: a redelivery is ignored.
    Pending,
    /// Answered with this `ack`/`rec` payload; `released` once the QoS 2 `rel` arrived.
    Answered {
        payload: Option<Value>,
        released: bool,
    },
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) qos: Qos,
    pub(crate) state: CmdState,
}

/// Allocates nothing until the first command.
#[derive(Debug)]
pub(crate) struct DedupeCache {
    map: HashMap<MsgId, Entry>,
    order: VecDeque<MsgId>,
    cap: usize,
}

impl DedupeCache {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    pub(crate) fn get(&self, id: &MsgId) -> Option<&Entry> {
        self.map.get(id)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Records a command handed to the app.
    pub(crate) fn insert_pending(&mut self, id: MsgId, qos: Qos) {
        self.put(
            id,
            Entry {
                qos,
                state: CmdState::Pending,
            },
        );
    }

    /// Records the app's answer; also for a msgid already forgotten, so a later
    /// redelivery still gets it.
    pub(crate) fn answer(&mut self, id: &MsgId, qos: Qos, payload: Option<Value>) {
        let state = CmdState::Answered {
            payload,
            released: false,
        };
        match self.map.get_mut(id) {
            Some(e) => e.state = state,
            None => self.put(id.clone(), Entry { qos, state }),
        }
    }

    /// Marks a QoS 2 command released; returns whether the app had answered it.
    pub(crate) fn release(&mut self, id: &MsgId) -> Option<&CmdState> {
        let e = self.map.get_mut(id)?;
        if let CmdState::Answered { released, .. } = &mut e.state {
            *released = true;
        }
        Some(&e.state)
    }

    fn put(&mut self, id: MsgId, entry: Entry) {
        if self.cap == 0 {
            return;
        }
        while self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        self.order.push_back(id.clone());
        self.map.insert(id, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(n: usize) -> MsgId {
        MsgId::new(format!("m{n}")).unwrap()
    }

    #[test]
    fn is_bounded_and_forgets_oldest_first() {
        let mut c = DedupeCache::new(4);
        for n in 0..10 {
            c.insert_pending(id(n), Qos::AtLeastOnce);
            assert!(c.len() <= 4);
        }
        assert_eq!(c.len(), 4);
        assert!(c.get(&id(5)).is_none());
        for n in 6..10 {
            assert!(c.get(&id(n)).is_some(), "m{n} kept");
        }
        assert!(c.order.len() == c.map.len());
    }

    #[test]
    fn answers_are_kept_and_released() {
        let mut c = DedupeCache::new(8);
        c.insert_pending(id(1), Qos::ExactlyOnce);
        assert_eq!(c.get(&id(1)).unwrap().state, CmdState::Pending);
        c.answer(&id(1), Qos::ExactlyOnce, Some(json!({"result": 1})));
        let st = c.release(&id(1)).unwrap().clone();
        assert_eq!(
            st,
            CmdState::Answered {
                payload: Some(json!({"result": 1})),
                released: true
            }
        );
        assert!(c.release(&id(2)).is_none());
    }

    #[test]
    fn answer_for_forgotten_msgid_is_recorded() {
        let mut c = DedupeCache::new(1);
        c.insert_pending(id(1), Qos::AtLeastOnce);
        c.insert_pending(id(2), Qos::AtLeastOnce);
        c.answer(&id(1), Qos::AtLeastOnce, None);
        assert!(matches!(
            c.get(&id(1)).unwrap().state,
            CmdState::Answered { .. }
        ));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut c = DedupeCache::new(0);
        c.insert_pending(id(1), Qos::AtLeastOnce);
        assert_eq!(c.len(), 0);
    }
}
