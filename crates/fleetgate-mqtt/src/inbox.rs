//! A subscriber's queue, bounded in bytes and in messages. The router pushes without waiting;
//! a push that would pass either bound empties the queue and marks it overflowed, and the
//! subscriber is dropped: one slow consumer never delays the others or grows memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::Message;

#[derive(Default)]
struct State {
    items: VecDeque<Arc<Message>>,
    bytes: usize,
    closed: Option<Closed>,
}

/// Why a subscriber receives no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Its queue passed a bound; it was dropped from every filter.
    Overflowed,
    /// The bridge stopped.
    Stopped,
}

pub(crate) struct Inbox {
    state: Mutex<State>,
    notify: Notify,
    max_bytes: usize,
    max_messages: usize,
}

impl Inbox {
    pub(crate) fn new(max_bytes: usize, max_messages: usize) -> Self {
        Self {
            state: Mutex::default(),
            notify: Notify::new(),
            max_bytes: max_bytes.max(1),
            max_messages: max_messages.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each critical section leaves the queue consistent: a poisoned one is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `message`; `false` when that overflowed the queue (now closed).
    pub(crate) fn push(&self, message: Arc<Message>) -> bool {
        let mut s = self.lock();
        if s.closed.is_some() {
            return false;
        }
        let size = message.size();
        if s.bytes + size > self.max_bytes || s.items.len() >= self.max_messages {
            s.items.clear();
            s.bytes = 0;
            s.closed = Some(Closed::Overflowed);
            drop(s);
            self.notify.notify_one();
            return false;
        }
        s.bytes += size;
        s.items.push_back(message);
        drop(s);
        self.notify.notify_one();
        true
    }

    pub(crate) fn close(&self, why: Closed) {
        let mut s = self.lock();
        if s.closed.is_none() {
            s.closed = Some(why);
            s.items.clear();
            s.bytes = 0;
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Everything queued, waiting until there is something. Cancel-safe: messages are taken
    /// only when this returns them.
    pub(crate) async fn take(&self) -> Result<Vec<Arc<Message>>, Closed> {
        loop {
            {
                let mut s = self.lock();
                if let Some(why) = s.closed {
                    return Err(why);
                }
                if !s.items.is_empty() {
                    s.bytes = 0;
                    return Ok(s.items.drain(..).collect());
                }
            }
            // `notify_one` keeps a permit when nobody waits: a push between the check and
            // this wait is not missed.
            self.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Topic;
    use bytes::Bytes;

    fn msg(payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message::new(
            Topic::new("a").unwrap(),
            Bytes::from_static(payload),
            false,
        ))
    }

    #[tokio::test]
    async fn overflow_by_bytes_closes_and_empties() {
        let inbox = Inbox::new(msg(b"12345").size() * 2, 100);
        assert!(inbox.push(msg(b"12345")));
        assert!(inbox.push(msg(b"12345")));
        assert!(!inbox.push(msg(b"1")));
        assert_eq!(inbox.take().await.unwrap_err(), Closed::Overflowed);
        assert!(!inbox.push(msg(b"1")), "stays closed");
    }

    #[tokio::test]
    async fn overflow_by_count_and_take_drains_all() {
        let inbox = Inbox::new(1 << 20, 2);
        assert!(inbox.push(msg(b"a")));
        assert!(inbox.push(msg(b"b")));
        assert_eq!(inbox.take().await.unwrap().len(), 2);
        assert!(inbox.push(msg(b"c")));
        assert!(inbox.push(msg(b"d")));
        assert!(!inbox.push(msg(b"e")));
    }
}
